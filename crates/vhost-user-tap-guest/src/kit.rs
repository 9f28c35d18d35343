//! The test kit every integration test and benchmark uses: where the binaries and the project's
//! scripts are, throwaway network namespaces, the real daemon binary inside one, sockets created
//! in a namespace, and the daemon's counters.
//!
//! Every namespace is deleted on drop and every daemon is stopped on drop, also when a test fails.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The top of the repository (qemu-scripts/, target/).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository")
}

/// `target/<profile>` of the running test or benchmark: the binaries cargo built for it sit
/// beside its `deps/` directory.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable");
    let deps = exe.parent().expect("deps/");
    if deps.ends_with("deps") {
        deps.parent().expect("target/<profile>").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// A workspace binary of this build: `$env` when set, else the one beside the running test,
/// built first (`cargo build -p package`) when a test of another package runs alone.
fn workspace_bin(env: &str, package: &str, name: &str) -> String {
    if let Ok(bin) = std::env::var(env) {
        if !bin.is_empty() {
            return bin;
        }
    }
    let dir = profile_dir();
    let path = dir.join(name);
    if !path.exists() {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(repo_root())
            .args(["build", "--quiet", "-p", package, "--bin", name]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        run(&mut cmd);
    }
    path.to_string_lossy().into_owned()
}

/// The daemon binary under test: the one this build made, or `VUT_DAEMON_BIN` when set. The
/// kernel lab (qemu-scripts/kernel-lab.sh) runs these test binaries inside a VM, where the host's
/// target directory does not exist.
pub fn daemon_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("VUT_DAEMON_BIN", "vhost-user-tap", "vhost-user-tap"))
}

/// The synthetic guest's binary of this build, or `VUT_GUEST_BIN` when set.
pub fn guest_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        workspace_bin(
            "VUT_GUEST_BIN",
            "vhost-user-tap-guest",
            "vhost-user-tap-guest",
        )
    })
}

/// Where downloads and built images live: `$VUT_CACHE` or `~/.cache/vhost-user-tap` (the
/// scripts' lib-vm.sh uses the same).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VUT_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/vhost-user-tap")
}

pub const HOST_IP: &str = "10.99.0.1";
pub const GUEST_IP: &str = "10.99.0.2";
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x01];
pub const TAP: &str = "vut0";
pub const GUEST_PORT: u16 = 5000;
pub const HOST_PORT: u16 = 7000;

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// True if the test may run. Without root it fails loudly, unless VUT_SKIP_ROOT=1 asks to skip.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("VUT_SKIP_ROOT").as_deref() == Ok("1") {
        println!("SKIPPED: {test}: needs root (taps, network namespaces)");
        return false;
    }
    panic!(
        "{test}: needs root to create taps and network namespaces (set VUT_SKIP_ROOT=1 to skip)"
    );
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace of our own, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "vut-{}-{}-{}",
            tag,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        // No IPv6 autoconfiguration noise on the tap: tests count frames exactly.
        for key in ["all", "default"] {
            ns.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
            ]);
        }
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn exec(&self, args: &[&str]) -> String {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    pub fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Bring the daemon's tap up with the host address and a permanent neighbour entry for the
    /// guest, so the host stack sends without ARP.
    pub fn configure_tap(&self, tap: &str) {
        self.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", tap]);
        self.ip(&["link", "set", tap, "up"]);
        let mac = GUEST_MAC
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        self.ip(&[
            "neigh",
            "replace",
            GUEST_IP,
            "lladdr",
            &mac,
            "dev",
            tap,
            "nud",
            "permanent",
        ]);
    }

    /// Run `f` on a thread that has entered this namespace; sockets it creates stay in it.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_within(f).join().expect("netns thread")
    }

    /// Like `within`, without waiting for the thread.
    pub fn spawn_within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a valid netns fd only changes this thread's namespace.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    pub fn udp_socket(&self, bind: &str) -> UdpSocket {
        let bind = bind.to_string();
        self.within(move || UdpSocket::bind(&bind).unwrap_or_else(|e| panic!("bind {bind}: {e}")))
    }

    /// The tap's kernel counters (`ip -s -j link`).
    pub fn link_stats(&self, dev: &str) -> LinkStats {
        let out = self.ip(&["-s", "-j", "link", "show", dev]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
        let s = &v[0]["stats64"];
        let get = |dir: &str, k: &str| {
            s[dir][k]
                .as_u64()
                .unwrap_or_else(|| panic!("no {dir} {k} in `ip -s -j link show {dev}`: {out}"))
        };
        LinkStats {
            tx_packets: get("tx", "packets"),
            tx_dropped: get("tx", "dropped"),
            rx_packets: get("rx", "packets"),
            rx_dropped: get("rx", "dropped"),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkStats {
    /// Frames the kernel handed to the tap's reader (our daemon), i.e. consumed from the ring.
    pub tx_packets: u64,
    /// Frames tun dropped (ring full, among others).
    pub tx_dropped: u64,
    pub rx_packets: u64,
    pub rx_dropped: u64,
}

/// A private directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "vut-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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

// ---- systemd integration (tests/systemd.rs) ----

/// Is `tool` on PATH?
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .any(|dir| std::fs::metadata(dir.join(tool)).is_ok_and(|m| m.is_file()))
    })
}

/// True if the systemd tools the test needs are installed. A missing one fails the test loudly,
/// unless VUT_SKIP_SYSTEMD=1 asks to skip (prints SKIPPED).
pub fn systemd_tools_or_skip(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("VUT_SKIP_SYSTEMD").as_deref() == Ok("1") {
        println!("SKIPPED: {test}: {} not installed", missing.join(", "));
        return false;
    }
    panic!(
        "{test}: needs {} (Debian package systemd; qemu-scripts/systemd-tools.sh installs it; set \
         VUT_SKIP_SYSTEMD=1 to skip)",
        missing.join(", ")
    );
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

/// Throughput of one TCP transfer through the daemon, and whether the bytes arrived intact.
#[derive(Clone, Copy, Debug)]
pub struct TcpRun {
    pub host_to_guest_gbps: f64,
    pub guest_to_host_gbps: f64,
}

/// A real TCP stack on both sides of the daemon: host namespace A holds the daemon's tap
/// (10.97.0.1); the synthetic guest bridges its rings to a second tap in namespace B (10.97.0.2).
/// Sends `bytes` each way over one connection and checks every byte. With `offloads` the guest
/// negotiates checksum and TSO offloads both ways and the frames cross as GSO super-frames.
pub fn tcp_through_daemon(tag: &str, offloads: bool, bytes: usize) -> TcpRun {
    use crate::{bridge::bridge, Guest, GuestConfig};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::AtomicBool;
    use vhost_user_tap::tap::Tap;
    use virtio_bindings::virtio_net::*;

    const A_IP: &str = "10.97.0.1";
    const B_IP: &str = "10.97.0.2";
    const BR: &str = "vutbr0";
    let a = Netns::new(&format!("{tag}a"));
    let b = Netns::new(&format!("{tag}b"));
    let mut daemon = Daemon::start(&a, TAP, &[]);
    a.ip(&["addr", "add", &format!("{A_IP}/24"), "dev", TAP]);
    a.ip(&["link", "set", TAP, "up"]);
    let tap2 = b.within(move || {
        let t = Tap::open_queues(BR, 1, 0)
            .expect("second tap")
            .pop()
            .unwrap();
        t.set_vnet_hdr_len(12).unwrap();
        if offloads {
            t.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
                .unwrap();
        }
        t
    });
    b.ip(&["addr", "add", &format!("{B_IP}/24"), "dev", BR]);
    b.ip(&["link", "set", BR, "up"]);

    let mut cfg = GuestConfig::new(&daemon.socket);
    cfg.read_config = false;
    cfg.mem_size = 128 << 20;
    cfg.tx_max_frame = 65_550;
    // Linux grows its mergeable RX buffers toward a page under bulk traffic (an EWMA of packet
    // sizes); 1536 is only its floor.
    cfg.rx_buf_len = 4096;
    if offloads {
        cfg.extra_features = [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
        ]
        .iter()
        .fold(0u64, |acc, f| acc | (1u64 << f));
    }
    let mut guest = Guest::connect(cfg).expect("guest connects");
    daemon.wait_for_log("features acked", Duration::from_secs(10));
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let hdr_len = guest.hdr_len();
    let bridge_thread = std::thread::spawn(move || {
        let r = bridge(guest.pair_mut(0).unwrap(), &tap2, hdr_len, &stop2);
        if let Err(e) = &r {
            eprintln!("bridge stopped: {e}");
        }
        (guest, r)
    });

    // Deterministic bytes both ends can regenerate: byte i is table[i % PERIOD]. Sending and
    // checking are slices of a precomputed table (a memcpy and a memcmp per read), so the
    // check does not take the CPU the network path is being measured with. PERIOD is prime,
    // so no loss, duplication or reordering of whole segments lines the pattern up again.
    const PERIOD: usize = 65_521;
    const CHUNK: usize = 1 << 16;
    let table: Arc<Vec<u8>> = Arc::new(
        (0..PERIOD + CHUNK)
            .map(|i| ((i % PERIOD).wrapping_mul(2654435761) >> 13) as u8)
            .collect(),
    );
    let transfer = |server_ns: &Netns, server_ip: &'static str, client_ns: &Netns, port: u16| {
        let listener =
            server_ns.within(move || TcpListener::bind((server_ip, port)).expect("listen"));
        let expect = table.clone();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut buf = vec![0u8; CHUNK];
            let mut off = 0usize;
            loop {
                let n = s.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                let at = off % PERIOD;
                if buf[..n] != expect[at..at + n] {
                    let k = (0..n).find(|&k| buf[k] != expect[at + k]).unwrap_or(0);
                    panic!("byte {} corrupted", off + k);
                }
                off += n;
            }
            off
        });
        let table = table.clone();
        let start = Instant::now();
        let sent = client_ns.within(move || {
            let mut s = TcpStream::connect((server_ip, port)).expect("connect");
            s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut off = 0;
            while off < bytes {
                let n = CHUNK.min(bytes - off);
                let at = off % PERIOD;
                if let Err(e) = s.write_all(&table[at..at + n]) {
                    return Err(format!("write at byte {off}: {e}"));
                }
                off += n;
            }
            Ok(off)
        });
        let sent = match sent {
            Ok(n) => n,
            Err(e) => {
                eprintln!("server side:\n{}", server_ns.ip(&["-s", "link"]));
                eprintln!("client side:\n{}", client_ns.ip(&["-s", "link"]));
                eprintln!(
                    "ss client: {}",
                    run(Command::new("ip").args(["netns", "exec", &client_ns.name, "ss", "-tin"]))
                );
                eprintln!(
                    "ss server: {}",
                    run(Command::new("ip").args(["netns", "exec", &server_ns.name, "ss", "-tin"]))
                );
                panic!("TCP client failed: {e}");
            }
        };
        let received = match server.join() {
            Ok(r) => r,
            Err(_) => {
                eprintln!("server side:\n{}", server_ns.ip(&["-s", "link"]));
                eprintln!("client side:\n{}", client_ns.ip(&["-s", "link"]));
                eprintln!(
                    "tc client: {}",
                    run(Command::new("tc").args(["-n", &client_ns.name, "-s", "qdisc"]))
                );
                panic!("TCP server failed");
            }
        };
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(received, sent, "bytes lost on the way");
        received as f64 * 8.0 / secs / 1e9
    };
    let host_to_guest_gbps = transfer(&b, B_IP, &a, 5001);
    let guest_to_host_gbps = transfer(&a, A_IP, &b, 5002);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (guest, r) = bridge_thread.join().expect("bridge");
    r.expect("bridge ran without errors");
    drop(guest);
    let c = daemon.counters_when_idle(0);
    assert!(daemon.terminate().success(), "{}", daemon.log());
    assert_eq!(
        c["rx_dropped_oversize"] + c["tx_dropped_bad_desc"] + c["tx_dropped_tap_error"],
        0,
        "{c:?}"
    );
    TcpRun {
        host_to_guest_gbps,
        guest_to_host_gbps,
    }
}

/// UDP frames from GUEST_IP:GUEST_PORT to HOST_IP:HOST_PORT, addressed to the MAC of the tap in
/// `ns`, as a guest sends them to the host.
pub fn guest_to_host_spec(ns: &Netns) -> crate::FrameSpec {
    let out = ns.ip(&["-j", "link", "show", TAP]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tap_mac = vhost_user_tap::config::parse_mac(v[0]["address"].as_str().unwrap()).unwrap();
    crate::FrameSpec {
        dst_mac: tap_mac,
        src_mac: GUEST_MAC,
        udp: Some(crate::UdpFlow {
            src: format!("{GUEST_IP}:{GUEST_PORT}").parse().unwrap(),
            dst: format!("{HOST_IP}:{HOST_PORT}").parse().unwrap(),
        }),
    }
}
