//! The daemon binary as a child process: started in a namespace or through any command line,
//! its log captured, stopped on drop; its counters read from its metrics endpoint.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{daemon_bin, Netns, TempDir};

/// The daemon binary running in a namespace, its stderr captured.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
    /// Reads the daemon's stderr until it closes: joined after exit so the log is complete.
    reader: Option<std::thread::JoinHandle<()>>,
    /// The daemon's metrics socket, where its counters are read.
    metrics: Option<PathBuf>,
    _dir: TempDir,
}

impl Daemon {
    /// Start `vhost-user-tap --socket-path <tmp> --tap <tap> <extra>` in `ns` and wait until it
    /// says it is listening.
    pub fn start(ns: &Netns, tap: &str, extra: &[&str]) -> Daemon {
        let dir = TempDir::new("sock");
        let socket = dir.0.join("vhost.sock");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name, daemon_bin(), "--socket-path"])
            .arg(&socket)
            .args(["--tap", tap])
            .args(extra);
        Daemon::spawn_in(&mut cmd, socket, "listening on", dir)
    }

    /// Wait for a log line containing `needle` (lines already seen do not count twice).
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!(
                    "daemon did not log {needle:?} within {timeout:?}; log:\n{}",
                    self.log()
                ),
            }
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Wait for the daemon to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.wait_status(timeout, "did not exit")
    }

    /// SIGTERM the daemon (through `ip netns exec`, which execs it) and wait for its exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_status(Duration::from_secs(10), "ignored SIGTERM")
    }

    /// SIGKILL the daemon (no clean-up of any kind) and reap it.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_status(Duration::from_secs(10), "survived SIGKILL")
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.pid() as i32;
        // SAFETY: kill with the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(pid, sig) };
    }

    /// The exit status, awaited on a thread so the wait has a deadline; then the end of its log.
    fn wait_status(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id() as i32;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(timeout) {
            Ok(Ok(st)) => {
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                st
            }
            _ => {
                // SAFETY: as in `signal`; the waiting thread reaps it.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("daemon {what} within {timeout:?}; log:\n{}", self.log());
            }
        }
    }

    /// Queue pair `pair`'s counters, from a scrape of the daemon's metrics. Every counter the
    /// daemon declares must be there: a missing one fails the test (it is never read as 0).
    pub fn counters(&self, pair: usize) -> Counters {
        let path = self
            .metrics
            .as_ref()
            .expect("this daemon serves no metrics on a unix socket");
        Counters::from_scrape(&scrape(path), pair)
    }

    /// The counters once no frontend is connected: the session's workers have stopped, so the
    /// numbers are final (call after the guest disconnected, before stopping the daemon).
    pub fn counters_when_idle(&self, pair: usize) -> Counters {
        let path = self
            .metrics
            .as_ref()
            .expect("this daemon serves no metrics on a unix socket");
        counters_when_idle(path, pair)
    }
}

/// `Daemon::counters_when_idle` for a daemon serving metrics at `path`.
pub fn counters_when_idle(path: &Path, pair: usize) -> Counters {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(path);
        if m.get("vhost_user_tap_frontend_connected") == Some(&0.0) {
            return Counters::from_scrape(&m, pair);
        }
        assert!(
            Instant::now() < deadline,
            "the frontend never went away: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One queue pair's counters, by the names the daemon declares
/// (`vhost_user_tap::stats::COUNTERS`). Indexing with a name the daemon does not declare panics.
pub struct Counters(std::collections::BTreeMap<&'static str, u64>);

impl Counters {
    fn from_scrape(m: &HashMap<String, f64>, pair: usize) -> Counters {
        let values = vhost_user_tap::stats::COUNTERS
            .iter()
            .map(|c| {
                let labels: String = c
                    .labels
                    .iter()
                    .map(|(k, v)| format!(",{k}=\"{v}\""))
                    .collect();
                let key = format!(
                    "vhost_user_tap_{}_total{{queue=\"{pair}\"{labels}}}",
                    c.metric
                );
                let v = m
                    .get(&key)
                    .unwrap_or_else(|| panic!("{key} missing from the daemon's metrics: {m:?}"));
                (c.field, *v as u64)
            })
            .collect();
        Counters(values)
    }

    /// Frames the daemon dropped, all reasons.
    pub fn drops(&self) -> u64 {
        self.0
            .iter()
            .filter(|(k, _)| k.contains("dropped"))
            .map(|(_, v)| v)
            .sum()
    }
}

impl std::ops::Index<&str> for Counters {
    type Output = u64;

    fn index(&self, name: &str) -> &u64 {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("the daemon declares no counter named {name:?}"))
    }
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().filter(|(_, v)| **v != 0))
            .finish()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn socket_gone(p: &Path) -> bool {
    !p.exists()
}

/// Scrape a metrics endpoint on a unix socket; returns `name{labels}` → value.
pub fn scrape(path: &Path) -> HashMap<String, f64> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("metrics socket {}: {e}", path.display()));
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    body.lines()
        .filter(|l| l.starts_with("vhost_user_tap_"))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| {
            let value = v
                .parse()
                .unwrap_or_else(|e| panic!("metric {k}: value {v:?}: {e}"));
            (k.to_string(), value)
        })
        .collect()
}

impl Daemon {
    /// Start the daemon through any command line (socket activation, another user, extra
    /// environment), capture its stderr and wait until its log contains `ready`. `socket` is
    /// where frontends connect. The command's stdin/stdout/stderr are set here.
    pub fn spawn(cmd: &mut Command, socket: PathBuf, ready: &str) -> Daemon {
        Daemon::spawn_in(cmd, socket, ready, TempDir::new("spawned"))
    }

    fn spawn_in(cmd: &mut Command, socket: PathBuf, ready: &str, dir: TempDir) -> Daemon {
        let metrics = metrics_socket(cmd, &dir);
        let mut child = cmd
            .env(
                "RUST_LOG",
                std::env::var("VUT_DAEMON_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let stderr = child.stderr.take().expect("piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var("VUT_ECHO_DAEMON").is_ok() {
                    eprintln!("daemon: {line}");
                }
                log2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let mut d = Daemon {
            child: Some(child),
            socket,
            log,
            lines: rx,
            reader: Some(reader),
            metrics,
            _dir: dir,
        };
        d.wait_for_log(ready, Duration::from_secs(10));
        d
    }
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
            let _ = std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777));
            let path = dir.0.join("metrics.sock");
            cmd.env("VHOST_USER_TAP_METRICS", format!("unix:{}", path.display()));
            Some(path)
        }
    }
}
