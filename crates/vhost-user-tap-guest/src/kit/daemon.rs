//! The daemon binary as a child process: started in a namespace or through any command line,
//! its log captured, stopped on drop (with its whole process group); its counters read from its
//! metrics endpoint, which every daemon the kit starts serves.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::metrics::{counters_when_idle, scrape, Counters};
use super::process::Lines;
use super::{daemon_bin, guest_config, Netns, Proc, TempDir, WAIT};
use crate::{Guest, GuestConfig};

/// The daemon binary running as our child, its stderr captured.
pub struct Daemon {
    // Field order is drop order: the process (and its group) goes before its directory.
    proc: Proc,
    pub socket: PathBuf,
    lines: Lines,
    /// Reads the daemon's stderr until it closes: joined after exit so the log is complete.
    reader: Option<JoinHandle<()>>,
    /// The daemon's metrics socket, where its counters are read.
    metrics: Option<PathBuf>,
    _dir: TempDir,
}

impl Daemon {
    /// Start `vhost-user-tap --socket-path <tmp> --tap <tap> <extra>` in `ns` and wait until it
    /// says it is listening.
    pub fn start(ns: &Netns, tap: &str, extra: &[&str]) -> Daemon {
        let dir = TempDir::new("sock");
        let socket = dir.path().join("vhost.sock");
        Daemon::spawn_in(
            &mut start_command(ns, tap, &socket, extra),
            socket,
            "listening on",
            dir,
        )
    }

    /// Like `start`, listening on `socket` (a path the test chose, e.g. to start a daemon again
    /// where a frontend reconnects).
    pub fn start_on(ns: &Netns, tap: &str, socket: &Path, extra: &[&str]) -> Daemon {
        let mut cmd = start_command(ns, tap, socket, extra);
        Daemon::spawn(&mut cmd, socket.to_path_buf(), "listening on")
    }

    /// Start the daemon through any command line (socket activation, another user, extra
    /// environment), capture its stderr and wait until its log contains `ready`. `socket` is
    /// where frontends connect. The command's stdin/stdout/stderr are set here.
    pub fn spawn(cmd: &mut Command, socket: PathBuf, ready: &str) -> Daemon {
        Daemon::spawn_in(cmd, socket, ready, TempDir::new("spawned"))
    }

    fn spawn_in(cmd: &mut Command, socket: PathBuf, ready: &str, dir: TempDir) -> Daemon {
        let metrics = metrics_socket(cmd, &dir);
        cmd.env(
            "RUST_LOG",
            std::env::var("VUT_DAEMON_LOG").unwrap_or("info".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut proc = Proc::spawn("vhost-user-tap", cmd);
        let stderr = Box::new(proc.take_stderr().expect("piped"));
        let (lines, reader) = Lines::follow(vec![stderr], "VUT_ECHO_DAEMON", "daemon");
        let mut d = Daemon {
            proc,
            socket,
            lines,
            reader: reader.into_iter().next(),
            metrics,
            _dir: dir,
        };
        d.wait_for_log(ready, Duration::from_secs(10));
        d
    }

    /// Connect a synthetic guest and wait until the daemon has its features.
    pub fn connect(&mut self, cfg: GuestConfig) -> Guest {
        let g = Guest::connect(cfg).expect("the guest connects");
        self.wait_for_log("features acked", WAIT);
        g
    }

    /// `connect` with the kit's guest configuration ([`guest_config`]).
    pub fn connect_guest(&mut self) -> Guest {
        let cfg = guest_config(&self.socket);
        self.connect(cfg)
    }

    /// Wait for a log line containing `needle` (lines already seen do not count twice).
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        self.lines.wait_for(needle, timeout).unwrap_or_else(|_| {
            panic!(
                "daemon did not log {needle:?} within {timeout:?}; log:\n{}",
                self.log()
            )
        })
    }

    pub fn log(&self) -> String {
        self.lines.text()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Send `sig` to the daemon (`ip netns exec` and the other wrappers exec it: same pid).
    pub fn signal(&self, sig: libc::c_int) {
        self.proc.signal(sig);
    }

    /// Wait for the daemon to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.wait_status(timeout, "did not exit")
    }

    /// SIGTERM the daemon and wait for its exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_status(Duration::from_secs(10), "ignored SIGTERM")
    }

    /// SIGTERM the daemon and require exit status 0 (the log is in the message otherwise).
    pub fn terminate_ok(&mut self) {
        let st = self.terminate();
        assert_eq!(
            st.code(),
            Some(0),
            "daemon {} on SIGTERM; log:\n{}",
            Proc::describe(st),
            self.log()
        );
    }

    /// SIGKILL the daemon (no clean-up of any kind) and wait for its end.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_status(Duration::from_secs(10), "survived SIGKILL")
    }

    /// Stop it for good without failing: SIGTERM, SIGKILL to its group if it does not exit
    /// within 10 s; then its log is complete. For clean-up and diagnostics (never panics).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if self.proc.status().is_none() {
            self.signal(libc::SIGTERM);
            if self
                .proc
                .wait_until(Instant::now() + Duration::from_secs(10))
                .is_none()
            {
                self.proc.kill_group();
                self.proc
                    .wait_until(Instant::now() + Duration::from_secs(5))?;
            }
        }
        self.join_reader();
        self.proc.status()
    }

    /// The exit status within `timeout`; then the end of its log. Past the deadline the daemon
    /// is killed and the test fails with its log.
    fn wait_status(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        match self.proc.wait_until(Instant::now() + timeout) {
            Some(st) => {
                self.join_reader();
                st
            }
            None => {
                self.proc.kill_group();
                panic!("daemon {what} within {timeout:?}; log:\n{}", self.log());
            }
        }
    }

    fn join_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }

    /// Queue pair `pair`'s counters, from a scrape of the daemon's metrics. Every counter the
    /// daemon declares must be there: a missing one fails the test (it is never read as 0).
    pub fn counters(&self, pair: usize) -> Counters {
        Counters::from_scrape(&scrape(self.metrics_path()), pair)
    }

    /// The counters once no frontend is connected: the session's workers have stopped, so the
    /// numbers are final (call after the guest disconnected, before stopping the daemon).
    pub fn counters_when_idle(&self, pair: usize) -> Counters {
        counters_when_idle(self.metrics_path(), pair)
    }

    /// Where the daemon serves its metrics.
    pub fn metrics_path(&self) -> &Path {
        self.metrics
            .as_deref()
            .expect("this daemon serves no metrics on a unix socket")
    }
}

/// `ip netns exec <ns> vhost-user-tap --socket-path <socket> --tap <tap> <extra>`.
fn start_command(ns: &Netns, tap: &str, socket: &Path, extra: &[&str]) -> Command {
    let mut cmd = ns.command(daemon_bin());
    cmd.arg("--socket-path")
        .arg(socket)
        .args(["--tap", tap])
        .args(extra);
    cmd
}

/// Where a daemon started by `cmd` serves its metrics: the `unix:` address the test gave
/// (`--metrics` or VHOST_USER_TAP_METRICS, in its arguments or environment), or else one in `dir`
/// added to its environment, so the kit can always read its counters.
fn metrics_socket(cmd: &mut Command, dir: &TempDir) -> Option<PathBuf> {
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let given = args
        .iter()
        .position(|a| a == "--metrics")
        .and_then(|i| args.get(i + 1).cloned())
        // Passed on by a wrapper (systemd-socket-activate -E VAR=VALUE).
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("VHOST_USER_TAP_METRICS=").map(String::from))
        })
        .or_else(|| {
            cmd.get_envs()
                .find(|(k, _)| *k == "VHOST_USER_TAP_METRICS")
                .and_then(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()))
        });
    match given {
        Some(addr) => addr.strip_prefix("unix:").map(PathBuf::from),
        None => {
            use std::os::unix::fs::PermissionsExt;
            // A daemon that runs as another user must be able to create its socket here.
            let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777));
            let path = dir.path().join("metrics.sock");
            cmd.env("VHOST_USER_TAP_METRICS", format!("unix:{}", path.display()));
            Some(path)
        }
    }
}
