//! DPDK's testpmd as the daemon's peer in benchmarks: its vhost PMD (a vhost-user backend
//! listening on a unix socket, where the synthetic guest connects exactly as it connects to the
//! daemon) forwarding to and from its tap PMD, io mode, one forwarding core: DPDK as it comes,
//! configured the way its documentation runs a vhost-to-tap path.
//!
//! testpmd runs interactively with its command line on a pipe: it reads the tap (and drops what
//! it cannot hand on) from its start, before the guest connects, so "clear fwd stats all" right
//! before the guest starts and "stop" right after it has gone bound its counters to the guest's
//! run, as the tap's counters are bound for the daemon.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{ChildStdin, Stdio};
use std::time::{Duration, Instant};

use super::process::Lines;
use super::{on_path, Netns, Proc, TempDir};

/// What installs testpmd: Debian ships it in dpdk-dev (the dpdk package holds only the
/// libraries and scripts).
pub const INSTALL: &str = "apt-get install dpdk-dev";

const TESTPMD: &str = "dpdk-testpmd";

/// How long DPDK may take to start: it zeroes its memory first, slow on a loaded machine.
const START: Duration = Duration::from_secs(60);
/// How long testpmd may take to answer a command or to exit.
const ANSWER: Duration = Duration::from_secs(10);

/// Whether testpmd is installed, or what to install.
pub fn testpmd_present() -> Result<(), String> {
    if on_path(TESTPMD) {
        Ok(())
    } else {
        Err(format!("{TESTPMD} is not installed: {INSTALL}"))
    }
}

/// testpmd's arguments for a vhost-user socket `socket` and the tap `tap`, forwarding on CPU
/// `lcores`' second entry (the first, its main thread, waits on its command line).
///
/// `--no-huge`: no hugepages here, and none needed: the vhost PMD maps the guest's memory from
/// the fds the guest sends and copies into DPDK's own buffers, which nobody else maps.
/// `--no-shconf`: no files under /var/run/dpdk, so runs never meet another DPDK's.
pub fn testpmd_args(socket: &str, tap: &str, lcores: &str) -> Vec<String> {
    [
        "-l",
        lcores,
        "--no-pci",
        "--no-huge",
        "--no-shconf",
        "-m",
        "1024",
        "--vdev",
        &format!("net_vhost0,iface={socket},queues=1"),
        "--vdev",
        &format!("net_tap0,iface={tap}"),
        "--",
        "-i",
        "--forward-mode=io",
        "--auto-start",
        "--nb-cores=1",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// testpmd's forwarding counters, summed over its ports ("Accumulated forward statistics").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FwdStats {
    pub rx_packets: u64,
    /// Frames its ports missed (imissed).
    pub rx_dropped: u64,
    pub tx_packets: u64,
    /// Frames it read and could not hand on (the other port's transmit took fewer).
    pub tx_dropped: u64,
}

impl FwdStats {
    /// Read the block testpmd prints on "stop" or "show fwd stats all": the two lines after
    /// the "Accumulated" header. None if the output has no such block.
    pub fn parse(lines: &[String]) -> Option<FwdStats> {
        let at = lines
            .iter()
            .rposition(|l| l.contains("Accumulated forward statistics"))?;
        let field = |line: &str, name: &str| -> Option<u64> {
            let rest = &line[line.find(name)? + name.len()..];
            rest.split_whitespace().next()?.parse().ok()
        };
        let rx = lines.get(at + 1)?;
        let tx = lines.get(at + 2)?;
        Some(FwdStats {
            rx_packets: field(rx, "RX-packets:")?,
            rx_dropped: field(rx, "RX-dropped:")?,
            tx_packets: field(tx, "TX-packets:")?,
            tx_dropped: field(tx, "TX-dropped:")?,
        })
    }
}

/// testpmd running in a namespace as our child, killed with its process group on drop.
pub struct Testpmd {
    // Field order is drop order: the process goes before the directory of its socket.
    proc: Proc,
    stdin: Option<ChildStdin>,
    lines: Lines,
    /// Where its vhost PMD listens for the guest.
    pub socket: PathBuf,
    _dir: TempDir,
}

impl Testpmd {
    /// Start testpmd in `ns` on the existing tap `tap`, forwarding on CPU 1 (CPU 0 holds its
    /// idle main thread), and wait until it forwards and its socket is there. DPDK's tap PMD
    /// opens the tap with IFF_MULTI_QUEUE: `tap` must be a multi-queue tap (tun refuses that
    /// opener on a single-queue one), and testpmd brings it up on start, down on exit.
    pub fn start(ns: &Netns, tap: &str) -> Testpmd {
        if let Err(why) = testpmd_present() {
            panic!("{why}");
        }
        let dir = TempDir::new("dpdk");
        let socket = dir.path().join("vhost.sock");
        // Line-buffered: testpmd prints through stdio, which would hold a pipe's output until
        // it exits, and the kit waits for its lines.
        let mut cmd = ns.command("stdbuf");
        cmd.args(["-oL", TESTPMD])
            .args(testpmd_args(socket.to_str().unwrap(), tap, "0,1"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn_with_stdin(TESTPMD, &mut cmd, Stdio::piped());
        let stdin = proc.take_stdin();
        let out: Box<dyn Read + Send> = Box::new(proc.take_stdout().expect("piped"));
        let err: Box<dyn Read + Send> = Box::new(proc.take_stderr().expect("piped"));
        // The readers end with the pipes, when testpmd exits or its group is killed.
        let (lines, _readers) = Lines::follow(vec![out, err], "VUT_ECHO_DPDK", "testpmd");
        let mut t = Testpmd {
            proc,
            stdin,
            lines,
            socket,
            _dir: dir,
        };
        // Printed as the forwarding core is launched, after the ports (the vhost socket among
        // them) have started.
        t.wait_for_line("forwards packets on", START);
        assert!(
            t.socket.exists(),
            "testpmd forwards but {} is missing; its output:\n{}",
            t.socket.display(),
            t.log()
        );
        t
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Everything it printed so far.
    pub fn log(&self) -> String {
        self.lines.text()
    }

    /// Zero its forwarding counters.
    pub fn clear_stats(&mut self) {
        self.send("clear fwd stats all");
        // Its command line echoes a command as it reads it and runs it at the newline, before
        // reading anything else: the echo is the acknowledgement.
        self.wait_for_line("clear fwd stats all", ANSWER);
    }

    /// Stop forwarding; its counters since the last `clear_stats` (or its start).
    pub fn stop_forwarding(&mut self) -> FwdStats {
        let start = self.lines.count();
        self.send("stop");
        self.wait_for_line("Accumulated forward statistics", ANSWER);
        // Closes the statistics "stop" prints.
        self.wait_for_line("Done.", ANSWER);
        let lines = self.lines.since(start);
        FwdStats::parse(&lines).unwrap_or_else(|| {
            panic!(
                "no forward statistics from testpmd's \"stop\"; its output:\n{}",
                self.log()
            )
        })
    }

    /// End it the way its command line ends (end of input: it closes its ports, which also
    /// brings the tap down) and wait for its exit; past the deadline, drop kills it.
    pub fn quit(mut self) {
        self.stdin = None;
        if self.proc.wait_until(Instant::now() + ANSWER).is_none() {
            eprintln!(
                "warning: testpmd did not exit within {ANSWER:?} of its input's end; killing it"
            );
        }
    }

    fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("testpmd's command line is open");
        if let Err(e) = writeln!(stdin, "{command}") {
            panic!(
                "testpmd did not take {command:?}: {e}; its output:\n{}",
                self.log()
            );
        }
    }

    /// Wait for a line containing `needle` (lines already seen do not count twice).
    fn wait_for_line(&mut self, needle: &str, timeout: Duration) {
        if self.lines.wait_for(needle, timeout).is_err() {
            panic!(
                "testpmd did not print {needle:?} within {timeout:?} ({}); its output:\n{}",
                match self.proc.status() {
                    Some(st) => Proc::describe(st),
                    None => "still running".into(),
                },
                self.log()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FwdStats;

    #[test]
    fn testpmds_accumulated_forward_statistics_are_read() {
        let out = "\
  ---------------------- Forward statistics for port 1  ----------------------
  RX-packets: 4              RX-dropped: 0             RX-total: 4
  TX-packets: 0              TX-dropped: 0             TX-total: 0
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 3562871        RX-dropped: 2             RX-total: 3562873
  TX-packets: 3312871        TX-dropped: 250000        TX-total: 3562871
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++

Done.";
        let lines: Vec<String> = out.lines().map(String::from).collect();
        assert_eq!(
            FwdStats::parse(&lines),
            Some(FwdStats {
                rx_packets: 3562871,
                rx_dropped: 2,
                tx_packets: 3312871,
                tx_dropped: 250000,
            })
        );
        assert_eq!(FwdStats::parse(&lines[..4]), None);
    }
}
