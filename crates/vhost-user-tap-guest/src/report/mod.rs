//! The accounting of the project's benchmark and labs (`vut-report`): the scripts in
//! qemu-scripts/ boot the VMs and collect raw records (counters as the kernel, the daemon's
//! `--metrics` scrape, the senders and the guests print them); this reads those records, checks
//! that every run adds up, and writes the tables, results.json and chart data.
//!
//! - [`xdp`]: `xdp-bench` (qemu-scripts/xdp-bench.sh);
//! - [`bplab`]: `backpressure-lab` (qemu-scripts/backpressure-lab.sh);
//! - [`klab`]: `kernel-lab` (qemu-scripts/kernel-lab.sh);
//! - [`prom`]: the Prometheus text the daemon serves, parsed; [`record`]: the other inputs.
//!
//! Exit status: 0 when everything ran and added up, 1 when something did not (the reports are
//! still written) or an input could not be read, 2 for a bad command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod bplab;
pub mod klab;
pub mod prom;
pub mod record;
pub mod xdp;

/// Tables, results.json and chart data of the XDP-drop benchmark, the backpressure lab and the
/// kernel lab, from what their scripts collected.
#[derive(Debug, Parser)]
#[command(name = "vut-report", version)]
struct Cli {
    #[command(subcommand)]
    tool: Tool,
}

#[derive(Debug, Subcommand)]
enum Tool {
    /// qemu-scripts/xdp-bench.sh: reads OUT/runs/*/, writes OUT/table.txt, results.json,
    /// chart.dat and chart.gp.
    XdpBench(xdp::XdpArgs),
    /// qemu-scripts/backpressure-lab.sh: reads the VM's console, prints the table, writes
    /// table.txt and results.json with --out.
    BackpressureLab(bplab::LabArgs),
    /// qemu-scripts/kernel-lab.sh: reads RESULTS/<kernel>/{run.txt,console.log}, writes
    /// RESULTS/results.json and table.txt, prints the table.
    KernelLab(klab::KlabArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let (tool, outcome) = match cli.tool {
        Tool::XdpBench(a) => ("xdp-bench", xdp::report(a)),
        Tool::BackpressureLab(a) => ("backpressure-lab", bplab::report(a)),
        Tool::KernelLab(a) => ("kernel-lab", klab::report(a)),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vut-report {tool}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
