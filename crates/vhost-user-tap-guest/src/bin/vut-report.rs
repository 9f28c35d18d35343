//! `vut-report`: the accounting of qemu-scripts/xdp-bench.sh, backpressure-lab.sh and
//! kernel-lab.sh (tables, results.json, chart data), from the raw records those scripts collect.
//! See `src/report/`.

#[path = "../report/mod.rs"]
mod report;

fn main() -> std::process::ExitCode {
    report::main()
}
