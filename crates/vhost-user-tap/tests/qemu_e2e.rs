//! End-to-end tests with a real QEMU booting a real Linux guest.
//!
//! Topology (everything on the host side lives in a fresh network namespace):
//!
//! ```text
//!  netns vut-e2e-<pid>-<case>                        guest (TCG)
//!  10.77.0.1/24 on tap vut0 <-> vhost-user-tap <-> virtio-net eth0 10.77.0.2/24
//!                           (or QEMU's own tap backend for the baseline)
//! ```
//!
//! The guest (kernel + initramfs from `qemu-scripts/build-guest.sh`) reports
//! on its serial console with `VUT-*` markers: it pings the host, counts
//! the UDP datagrams it receives, then powers off. The test pings the guest,
//! checks the host's neighbour entry, sends 1000 numbered UDP datagrams and
//! requires the guest to see each exactly once.
//!
//! Prerequisites (a missing one fails the test with instructions; with
//! `VUT_SKIP_QEMU=1` it prints `SKIPPED: <reason>` and passes instead):
//! - root (network namespaces, taps);
//! - the guest: `qemu-scripts/build-guest.sh` (also installs QEMU 7.2);
//! - QEMU 7.2 at /usr/bin/qemu-system-x86_64 (`apt-get install qemu-system-x86`);
//! - QEMU 10.0.2: `qemu-scripts/fetch-qemu.sh`.
//!
//! Both scripts put their output under `${VUT_CACHE:-$HOME/.cache/vhost-user-tap}`.
//! `VUT_E2E_SEED` fixes the random datagram sizes (the seed is printed).
//!
//! Run: `cargo test --test qemu_e2e -- --nocapture` (as root).

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SYSTEM_QEMU: &str = "/usr/bin/qemu-system-x86_64";
const TAP: &str = "vut0";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const PREFIX_LEN: u8 = 24;
const GUEST_MAC: &str = "52:54:00:12:34:56";
const UDP_PORT: u16 = 5000;
const UDP_COUNT: u32 = 1000;
/// Largest UDP payload that fits a 1500-byte MTU without fragmentation.
const UDP_MAX_PAYLOAD: usize = 1472;
/// Datagrams per burst and the pause between bursts. The guest runs under
/// TCG, and whatever its RX ring (256) and the backend cannot absorb piles up
/// in tun's queue (txqueuelen 1000, tail drop), so the test leaves a margin:
/// 25 per 10 ms is ~2500/s, 0.4 s in total. (Measured here: a single unpaced
/// blast of 1000 also arrived complete with either backend and QEMU.)
const UDP_BURST: u32 = 25;
const UDP_PAUSE: Duration = Duration::from_millis(10);

const SOCKET_DEADLINE: Duration = Duration::from_secs(10);
/// Boot to `VUT-READY`; ~5 s alone on this machine, more when the tests run in parallel.
const BOOT_DEADLINE: Duration = Duration::from_secs(60);
/// The guest's ping gives up after 30 s (`ping -w 30`).
const GUEST_PING_DEADLINE: Duration = Duration::from_secs(45);
/// Fail if the guest's UDP count does not move for this long.
const UDP_STALL_DEADLINE: Duration = Duration::from_secs(15);
const UDP_TOTAL_DEADLINE: Duration = Duration::from_secs(60);
/// Guest timeout for the UDP counter; above our own deadlines so that we, not
/// the guest, decide when a run has failed.
const GUEST_UDP_TIMEOUT_SECS: u32 = 90;
const POWEROFF_DEADLINE: Duration = Duration::from_secs(30);
const DAEMON_EXIT_DEADLINE: Duration = Duration::from_secs(10);

/// What sits behind the guest's virtio-net device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// Our daemon, over `-netdev vhost-user`.
    VhostUser,
    /// QEMU's built-in `-netdev tap`: validates the guest and the harness
    /// without the daemon.
    QemuTap,
}

impl Backend {
    fn short(self) -> &'static str {
        match self {
            Backend::VhostUser => "vu",
            Backend::QemuTap => "tap",
        }
    }
}

fn qemu10_wrapper() -> PathBuf {
    vhost_user_tap_guest::kit::cache_dir().join("qemu-10/qemu-system-x86_64")
}

#[test]
fn vhost_user_backend_with_system_qemu_7_2() {
    run_e2e(Path::new(SYSTEM_QEMU), Backend::VhostUser, 1);
}

#[test]
fn vhost_user_backend_with_qemu_10_0_2() {
    run_e2e(&qemu10_wrapper(), Backend::VhostUser, 1);
}

/// Two vCPUs and `queues=2`: the guest brings up both queue pairs (Linux enables one per CPU)
/// and both carry traffic. QEMU 10 only: under TCG QEMU 7.2 needs vectors=0 (see run_case),
/// and without MSI-X the guest has no per-queue interrupts to spread work with.
#[test]
fn two_queue_pairs_with_qemu_10_0_2() {
    run_e2e(&qemu10_wrapper(), Backend::VhostUser, 2);
}

/// Checks the guest image and this harness with QEMU's own tap backend, for
/// both QEMUs; needs no daemon.
#[test]
fn qemu_tap_backend_baseline() {
    run_e2e(Path::new(SYSTEM_QEMU), Backend::QemuTap, 1);
    run_e2e(&qemu10_wrapper(), Backend::QemuTap, 1);
}

// --- prerequisites -------------------------------------------------------------

struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
}

/// Returns the guest image, or why the test cannot run and how to fix it.
fn check_prerequisites(qemu: &Path) -> Result<Guest, String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("must run as root (network namespaces, tap devices): \
                    run the tests with sudo or as root"
            .into());
    }
    for (tool, package) in [("ip", "iproute2"), ("ping", "iputils-ping")] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Err(format!(
                "`{tool}` not found: apt-get install {package} \
                 (qemu-scripts/build-guest.sh installs it)"
            ));
        }
    }
    let guest_dir = vhost_user_tap_guest::kit::cache_dir().join("guest");
    let guest = Guest {
        kernel: guest_dir.join("vmlinuz"),
        initrd: guest_dir.join("initrd.img"),
    };
    for f in [&guest.kernel, &guest.initrd] {
        if !f.is_file() {
            return Err(format!(
                "guest image {} missing: run qemu-scripts/build-guest.sh",
                f.display()
            ));
        }
    }
    if !qemu.is_file() {
        let how = if qemu == Path::new(SYSTEM_QEMU) {
            "apt-get install qemu-system-x86 (qemu-scripts/build-guest.sh does it)"
        } else {
            "run qemu-scripts/fetch-qemu.sh"
        };
        return Err(format!("QEMU {} missing: {how}", qemu.display()));
    }
    Ok(guest)
}

// --- processes -----------------------------------------------------------------

/// A child process whose exit is reported over a channel by a waiter thread,
/// so waits can have deadlines without polling. Killed (SIGKILL) on drop if
/// still running; it also dies with the spawning thread (PR_SET_PDEATHSIG),
/// so an aborted test run leaves no QEMU or daemon behind.
struct Proc {
    name: String,
    pid: libc::pid_t,
    exited: Receiver<ExitStatus>,
    status: Option<ExitStatus>,
}

impl Proc {
    fn spawn(
        name: &str,
        cmd: &mut Command,
    ) -> Result<(Proc, Option<std::process::ChildStdout>), String> {
        // SAFETY: the closure runs between fork and exec and only calls prctl,
        // which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({cmd:?}): {e}"))?;
        let stdout = child.stdout.take();
        let pid = child.id() as libc::pid_t;
        let (tx, exited) = mpsc::channel();
        thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = tx.send(status);
            }
        });
        let proc = Proc {
            name: name.to_string(),
            pid,
            exited,
            status: None,
        };
        Ok((proc, stdout))
    }

    /// The exit status, waiting at most until `deadline`.
    fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        if self.status.is_none() {
            let timeout = deadline.saturating_duration_since(Instant::now());
            self.status = self.exited.recv_timeout(timeout).ok();
        }
        self.status
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.exited.try_recv().ok();
        }
        self.status
    }

    fn signal(&mut self, sig: libc::c_int) {
        // The waiter thread reaps the child only after it exits; checking for
        // a reported status first keeps us from signalling a recycled pid
        // (all but a tiny window between reaping and reporting).
        if self.try_status().is_none() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(self.pid, sig) };
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            self.signal(libc::SIGKILL);
            if self
                .wait_until(Instant::now() + Duration::from_secs(5))
                .is_none()
            {
                eprintln!(
                    "warning: {} (pid {}) did not die on SIGKILL",
                    self.name, self.pid
                );
            }
        }
    }
}

/// Runs a short command to completion; its stdout, or an error with stderr.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim_end()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// --- network namespace -----------------------------------------------------------

const NETNS_PREFIX: &str = "vut-e2e-";

/// A network namespace deleted on drop (with the tap in it).
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: &str) -> Result<Netns, String> {
        remove_stale_netns();
        let name = name.to_string();
        // Left over from an earlier run with the same pid: start clean.
        if Path::new("/run/netns").join(&name).exists() {
            let _ = run("ip", &["netns", "delete", &name]);
        }
        run("ip", &["netns", "add", &name])?;
        Ok(Netns { name })
    }

    fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    fn exec_command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // A persistent tap (the QemuTap case) would otherwise keep its name in
        // the namespace until the namespace itself is gone; delete it first.
        let _ = self.ip(&["link", "del", TAP]);
        if let Err(e) = run("ip", &["netns", "delete", &self.name]) {
            eprintln!("warning: cannot delete netns {}: {e}", self.name);
        }
    }
}

/// Deletes namespaces of earlier runs whose test process is gone (e.g. after
/// a SIGKILL), so they do not pile up.
fn remove_stale_netns() {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["-n", &name, "link", "del", TAP]);
            let _ = run("ip", &["netns", "delete", &name]);
        }
    }
}

/// A scratch directory (socket, logs), removed on drop unless
/// `VUT_E2E_KEEP=1`. Failures print the logs, so nothing is lost.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn create(name: &str) -> Result<WorkDir, String> {
        let path = std::env::temp_dir().join(name);
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let keep = std::env::var_os("VUT_E2E_KEEP").is_some_and(|v| v == "1");
        Ok(WorkDir { path, keep })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// --- serial console ------------------------------------------------------------

/// The guest's serial console (QEMU's stdout), read line by line in a thread.
struct Console {
    /// Lines with the time they were read: the test thread is not always
    /// waiting on the console (e.g. while it pings), so it prints them later.
    lines: Receiver<(Instant, String)>,
    transcript: Vec<String>,
    closed: bool,
    start: Instant,
    tag: String,
}

impl Console {
    fn new(stdout: impl Read + Send + 'static, tag: &str, start: Instant) -> Console {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = strip_escapes(&String::from_utf8_lossy(&buf));
                        if tx.send((Instant::now(), line)).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Console {
            lines: rx,
            transcript: Vec::new(),
            closed: false,
            start,
            tag: tag.to_string(),
        }
    }

    /// The next line, `Ok(None)` when QEMU closed its stdout (it exited), or
    /// an error at the deadline.
    fn next_line(
        &mut self,
        deadline: Instant,
        waiting_for: &str,
    ) -> Result<Option<String>, String> {
        if self.closed {
            return Ok(None);
        }
        let timeout = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(timeout) {
            Ok((at, line)) => {
                println!(
                    "[{} {:6.2}s guest] {line}",
                    self.tag,
                    at.duration_since(self.start).as_secs_f64()
                );
                self.transcript.push(line.clone());
                Ok(Some(line))
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.closed = true;
                Ok(None)
            }
            Err(RecvTimeoutError::Timeout) => Err(format!("timed out waiting for {waiting_for}")),
        }
    }

    /// Waits for a line containing one of `markers` (also looking at lines
    /// already received); returns the index of the marker and the line. A
    /// guest error, a premature `VUT-DONE`, a kernel panic or QEMU exiting
    /// fail at once instead of running into the deadline.
    fn wait_for_any(
        &mut self,
        markers: &[&str],
        deadline: Instant,
    ) -> Result<(usize, String), String> {
        let what = markers.join(" or ");
        let find = |line: &str| markers.iter().position(|m| line.contains(m));
        if let Some((i, line)) = self
            .transcript
            .iter()
            .find_map(|l| find(l).map(|i| (i, l.clone())))
        {
            return Ok((i, line));
        }
        loop {
            let Some(line) = self.next_line(deadline, &what)? else {
                return Err(format!("QEMU exited while waiting for {what}"));
            };
            if let Some(i) = find(&line) {
                return Ok((i, line));
            }
            if line.contains("VUT-ERROR") || line.contains("Kernel panic") {
                return Err(format!("guest failed while waiting for {what}: {line}"));
            }
            if line.contains("VUT-DONE") {
                return Err(format!("guest finished before {what}"));
            }
        }
    }

    fn wait_for(&mut self, marker: &str, deadline: Instant) -> Result<String, String> {
        self.wait_for_any(&[marker], deadline).map(|(_, line)| line)
    }
}

/// The line without its end-of-line and terminal control sequences (SeaBIOS
/// and the kernel clear the screen; `ESC [ ... final` and `ESC x`).
fn strip_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.next() == Some('[') {
                    // Parameters and intermediates up to the final byte.
                    for c in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// The text after `marker` in `line`, if any.
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| line[i + marker.len()..].trim())
}

/// `key=value` from a marker line such as `VUT-UDP-RESULT total=1000 distinct=1000`.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

// --- UDP sender ------------------------------------------------------------------

/// Sends `UDP_COUNT` datagrams from a socket inside the namespace. Each
/// payload starts with its decimal sequence number and a newline, padded to a
/// random length; the guest counts distinct sequence numbers.
fn send_udp(netns: &str, seed: u64, flows: usize) -> Result<u32, String> {
    let ns_path = PathBuf::from("/run/netns").join(netns);
    // setns changes only the calling thread's namespace, and a socket stays in
    // the namespace it was created in: a dedicated thread keeps the test's
    // own thread in the host namespace.
    thread::spawn(move || -> Result<u32, String> {
        let ns = File::open(&ns_path).map_err(|e| format!("open {}: {e}", ns_path.display()))?;
        // SAFETY: setns with a valid namespace fd only switches this thread's
        // network namespace; no memory is involved.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        // One socket per flow: tun steers flows (not datagrams) across queue pairs.
        let socks = (0..flows)
            .map(|_| UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("bind UDP socket to {HOST_IP}: {e}"))?;
        let dest = SocketAddrV4::new(GUEST_IP, UDP_PORT);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut payload = Vec::with_capacity(UDP_MAX_PAYLOAD);
        let mut sent = 0;
        for seq in 0..UDP_COUNT {
            payload.clear();
            payload.extend_from_slice(format!("{seq}\n").as_bytes());
            let len = rng.random_range(payload.len()..=UDP_MAX_PAYLOAD);
            payload.resize(len, b'.');
            socks[seq as usize % flows]
                .send_to(&payload, dest)
                .map_err(|e| format!("send_to {dest} (datagram {seq}): {e}"))?;
            sent += 1;
            if sent % UDP_BURST == 0 {
                // Rate limiting, not synchronisation: see UDP_BURST.
                thread::sleep(UDP_PAUSE);
            }
        }
        Ok(sent)
    })
    .join()
    .map_err(|_| "UDP sender thread panicked".to_string())?
}

// --- the test --------------------------------------------------------------------

/// One end-to-end run: boot the guest behind `backend` with `qemu`, ping both
/// ways, send UDP, shut everything down. Panics with diagnostics on failure.
fn run_e2e(qemu: &Path, backend: Backend, queues: usize) {
    let qemu_label = if qemu == Path::new(SYSTEM_QEMU) {
        "q72"
    } else {
        "q10"
    };
    let tag = if queues > 1 {
        format!("{}-{qemu_label}-mq{queues}", backend.short())
    } else {
        format!("{}-{qemu_label}", backend.short())
    };
    let guest = match check_prerequisites(qemu) {
        Ok(g) => g,
        Err(reason) => {
            if std::env::var_os("VUT_SKIP_QEMU").is_some_and(|v| v == "1") {
                println!("SKIPPED: {reason}");
                return;
            }
            panic!("prerequisite missing for {tag}: {reason} (set VUT_SKIP_QEMU=1 to skip)");
        }
    };
    let start = Instant::now();
    // Unique per test process and case: the tests may run in parallel.
    let name = format!("{NETNS_PREFIX}{}-{tag}", std::process::id());
    // Outlives run_case, whose guards tear down QEMU, the daemon and the
    // namespace: the logs in it are printed after that.
    let workdir = match WorkDir::create(&name) {
        Ok(w) => w,
        Err(e) => panic!("[{tag}] {e}"),
    };
    let mut diag = Diagnostics::default();
    if workdir.keep {
        diag.workdir = Some(workdir.path.clone());
    }
    match run_case(
        qemu,
        backend,
        queues,
        &tag,
        &guest,
        &name,
        &workdir.path,
        start,
        &mut diag,
    ) {
        Ok(summary) => println!(
            "[{tag}] PASS in {:.1}s: {summary}",
            start.elapsed().as_secs_f64()
        ),
        Err(e) => {
            diag.print(&tag);
            panic!(
                "[{tag}] FAILED after {:.1}s: {e}",
                start.elapsed().as_secs_f64()
            );
        }
    }
}

/// What to show when a run fails (collected as the run goes; printed after
/// everything has been torn down, so the daemon's log is complete).
#[derive(Default)]
struct Diagnostics {
    daemon_log: Option<PathBuf>,
    qemu_log: Option<PathBuf>,
    tap_stats: Option<String>,
    workdir: Option<PathBuf>,
}

impl Diagnostics {
    fn print(&self, tag: &str) {
        for (what, path) in [
            ("daemon log", &self.daemon_log),
            ("QEMU stderr", &self.qemu_log),
        ] {
            if let Some(path) = path {
                let text =
                    fs::read_to_string(path).unwrap_or_else(|e| format!("(unreadable: {e})"));
                eprintln!("----- [{tag}] {what} ({}) -----\n{text}", path.display());
            }
        }
        if let Some(stats) = &self.tap_stats {
            eprintln!("----- [{tag}] host tap {TAP} -----\n{stats}");
        }
        if let Some(dir) = &self.workdir {
            eprintln!("----- [{tag}] files kept in {} -----", dir.display());
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_case(
    qemu: &Path,
    backend: Backend,
    queues: usize,
    tag: &str,
    guest: &Guest,
    name: &str,
    workdir: &Path,
    start: Instant,
    diag: &mut Diagnostics,
) -> Result<String, String> {
    let log = |msg: &str| println!("[{tag} {:6.2}s] {msg}", start.elapsed().as_secs_f64());
    // Locals drop in reverse declaration order: on any return QEMU is killed
    // first, then the daemon, then the namespace (and its tap) is deleted.
    let netns = Netns::create(name)?;
    let socket = workdir.join("vhost.sock");
    let mut daemon = None;

    match backend {
        Backend::VhostUser => {
            let daemon_log = workdir.join("daemon.log");
            diag.daemon_log = Some(daemon_log.clone());
            let out = File::create(&daemon_log)
                .map_err(|e| format!("create {}: {e}", daemon_log.display()))?;
            let err = out.try_clone().map_err(|e| e.to_string())?;
            let mut cmd = netns.exec_command(Path::new(env!("CARGO_BIN_EXE_vhost-user-tap")));
            cmd.arg("--socket-path")
                .arg(&socket)
                .args(["--tap", TAP, "--queues", &queues.to_string()])
                .arg("--metrics")
                .arg(format!("unix:{}", workdir.join("metrics.sock").display()))
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
            let (mut proc, _) = Proc::spawn("vhost-user-tap", &mut cmd)?;
            // The daemon is an external process with no readiness signal we
            // can wait on: poll for its socket, with a deadline.
            let deadline = Instant::now() + SOCKET_DEADLINE;
            while !socket.exists() {
                if let Some(status) = proc.try_status() {
                    return Err(format!(
                        "daemon exited before creating its socket: {status}"
                    ));
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "daemon did not create {} within {SOCKET_DEADLINE:?}",
                        socket.display()
                    ));
                }
                thread::sleep(Duration::from_millis(20));
            }
            log("daemon listening");
            daemon = Some(proc);
        }
        Backend::QemuTap => {
            // vnet_hdr: QEMU's tap backend negotiates it, as the daemon does.
            netns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"])?;
        }
    }
    let host_cidr = format!("{HOST_IP}/{PREFIX_LEN}");
    netns.ip(&["addr", "add", &host_cidr, "dev", TAP])?;
    netns.ip(&["link", "set", TAP, "up"])?;
    netns.ip(&["link", "set", "lo", "up"])?;
    let tap_mac = tap_mac(&netns)?;

    // --- boot ---
    let qemu_log = workdir.join("qemu-stderr.log");
    diag.qemu_log = Some(qemu_log.clone());
    let append = format!(
        "console=ttyS0 quiet panic=-1 vut.ip={GUEST_IP}/{PREFIX_LEN} vut.peer={HOST_IP} \
         vut.peer_mac={tap_mac} vut.udp_port={UDP_PORT} vut.udp_count={UDP_COUNT} \
         vut.udp_timeout={GUEST_UDP_TIMEOUT_SECS}"
    );
    let mut cmd = match backend {
        // QEMU only talks to the daemon over the unix socket: no netns needed.
        Backend::VhostUser => Command::new(qemu),
        // QEMU opens the tap itself, so it must run inside the namespace.
        Backend::QemuTap => netns.exec_command(qemu),
    };
    cmd.args(["-accel", "tcg", "-m", "256", "-smp", &queues.to_string()])
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .args(["-append", &append])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-numa", "node,memdev=mem"]);
    match backend {
        Backend::VhostUser => {
            let chardev = format!("socket,id=chr0,path={}", socket.display());
            let netdev = format!("vhost-user,id=net0,chardev=chr0,queues={queues}");
            cmd.args(["-chardev", &chardev]).args(["-netdev", &netdev]);
        }
        Backend::QemuTap => {
            let netdev = format!("tap,id=net0,ifname={TAP},script=no,downscript=no,vhost=off");
            cmd.args(["-netdev", &netdev]);
        }
    }
    let mut device = format!("virtio-net-pci,netdev=net0,mac={GUEST_MAC}");
    if queues > 1 {
        device.push_str(&format!(",mq=on,vectors={}", 2 * queues + 2));
    }
    let version = qemu_version(qemu)?;
    if backend == Backend::VhostUser && version.0 < 8 {
        // QEMU 7.2 + vhost-user + TCG + MSI-X = SIGSEGV in QEMU when the guest
        // driver starts the device, before any ring is set up: vhost_net_start
        // turns off use_guest_notifier_mask for vhost-user, and 7.2's
        // virtio_pci_set_guest_notifiers still installs the MSI-X vector
        // notifiers, whose unmask then takes the KVM irqfd path with
        // proxy->vector_irqfd == NULL (no irqfd without KVM). QEMU 8.0 guards
        // that with use_guest_notifier_mask. Not the backend's fault, and not
        // reachable with KVM; INTx (vectors=0) avoids the path.
        device.push_str(",vectors=0");
    }
    cmd.args(["-device", &device]);
    let qemu_err =
        File::create(&qemu_log).map_err(|e| format!("create {}: {e}", qemu_log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(qemu_err);
    log(&format!(
        "starting QEMU {}.{}.{} ({}) with -device {device}",
        version.0,
        version.1,
        version.2,
        qemu.display()
    ));
    let (mut qemu_proc, stdout) = Proc::spawn("qemu", &mut cmd)?;
    let mut console = Console::new(stdout.expect("stdout is piped"), tag, start);

    let result = drive_guest(&netns, &mut console, &log, if queues > 1 { 16 } else { 1 });
    diag.tap_stats = netns.ip(&["-s", "link", "show", "dev", TAP]).ok();
    let summary = result.map_err(|e| {
        if console.closed {
            // QEMU closed its stdout: it is exiting; say how.
            match qemu_proc.wait_until(Instant::now() + Duration::from_secs(5)) {
                Some(status) => format!("{e} (QEMU {})", describe(status)),
                None => e,
            }
        } else {
            e
        }
    })?;

    // --- shutdown ---
    // The guest powers off by itself after VUT-DONE; QEMU then exits and
    // closes its stdout, which ends the console.
    let deadline = Instant::now() + POWEROFF_DEADLINE;
    console.wait_for("VUT-DONE", deadline)?;
    while console
        .next_line(deadline, "QEMU to exit after the guest's poweroff")?
        .is_some()
    {}
    let status = qemu_proc
        .wait_until(deadline)
        .ok_or("QEMU closed its stdout but did not exit")?;
    if !status.success() {
        return Err(format!(
            "QEMU exited with {status} after the guest powered off"
        ));
    }
    log(&format!("QEMU exited: {status}"));

    if let Some(mut daemon) = daemon.take() {
        // QEMU is gone, so the counters are final: every pair carried RX traffic.
        for pair in 0..queues {
            let c =
                vhost_user_tap_guest::kit::counters_when_idle(&workdir.join("metrics.sock"), pair);
            if c["rx_frames"] == 0 {
                return Err(format!("queue pair {pair} carried no RX traffic: {c:?}"));
            }
        }
        daemon.signal(libc::SIGTERM);
        let status = daemon
            .wait_until(Instant::now() + DAEMON_EXIT_DEADLINE)
            .ok_or_else(|| {
                format!("daemon still running {DAEMON_EXIT_DEADLINE:?} after SIGTERM")
            })?;
        if status.code() != Some(0) {
            return Err(format!(
                "daemon did not exit cleanly on SIGTERM: {}",
                describe(status)
            ));
        }
        if socket.exists() {
            return Err(format!(
                "daemon exited but left its socket {}",
                socket.display()
            ));
        }
        log("daemon exited 0 on SIGTERM and removed its socket");
        if let Some(path) = &diag.daemon_log {
            let text = fs::read_to_string(path).unwrap_or_default();
            println!("----- [{tag}] daemon log -----\n{}", text.trim_end());
        }
    }
    Ok(summary)
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!(
            "killed by signal {sig}{}",
            if status.core_dumped() {
                " (core dumped)"
            } else {
                ""
            }
        ),
        _ => status.to_string(),
    }
}

/// The guest-visible part of the test, from boot to the UDP result.
fn drive_guest(
    netns: &Netns,
    console: &mut Console,
    log: &dyn Fn(&str),
    flows: usize,
) -> Result<String, String> {
    let deadline = Instant::now() + BOOT_DEADLINE;
    let net = console.wait_for("VUT-NET", deadline)?;
    let guest_mac = after(&net, "mac=")
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    if guest_mac != GUEST_MAC {
        return Err(format!(
            "guest eth0 has MAC {guest_mac:?}, QEMU was told mac={GUEST_MAC}"
        ));
    }
    console.wait_for("VUT-READY", deadline)?;
    console.wait_for("VUT-UDP-LISTENING", deadline)?;
    let boot_time = console.start.elapsed();

    // Guest -> host: the guest's static ARP entry means its first frame is an
    // ICMP echo request; the replies need the host to ARP the guest.
    let deadline = Instant::now() + GUEST_PING_DEADLINE;
    let (i, _) = console.wait_for_any(&["VUT-PING-OK", "VUT-PING-FAIL"], deadline)?;
    if i != 0 {
        let stats = console
            .transcript
            .iter()
            .rev()
            .find_map(|l| after(l, "VUT-PING-STATS"))
            .unwrap_or("no statistics")
            .to_string();
        return Err(format!("guest could not ping the host {HOST_IP}: {stats}"));
    }
    log("guest -> host ping ok");

    // Host -> guest.
    let out = Command::new("ip")
        .args(["netns", "exec", &netns.name, "ping", "-c", "3", "-W", "2"])
        .arg(GUEST_IP.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ping: {e}"))?;
    let ping_out = String::from_utf8_lossy(&out.stdout);
    let ping_summary = ping_out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("")
        .to_string();
    if !out.status.success() || !ping_summary.contains(" 3 received") {
        return Err(format!(
            "host could not ping the guest {GUEST_IP} ({}): {ping_out}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    log(&format!("host -> guest ping ok: {ping_summary}"));

    // The host learnt the guest's MAC through the data path (ARP).
    let neigh = netns.ip(&["neigh", "show", &GUEST_IP.to_string(), "dev", TAP])?;
    if !neigh.contains(&format!("lladdr {GUEST_MAC}")) {
        return Err(format!(
            "host neighbour entry for {GUEST_IP} does not have lladdr {GUEST_MAC}: {:?}",
            neigh.trim()
        ));
    }
    log(&format!("host neighbour: {}", neigh.trim()));

    // UDP host -> guest.
    let seed = match std::env::var("VUT_E2E_SEED") {
        Ok(s) => s.parse().map_err(|e| format!("VUT_E2E_SEED={s:?}: {e}"))?,
        Err(_) => rand::rng().random(),
    };
    let send_start = Instant::now();
    let sent = send_udp(&netns.name, seed, flows)?;
    log(&format!(
        "sent {sent} datagrams to {GUEST_IP}:{UDP_PORT} in {:.2}s (VUT_E2E_SEED={seed})",
        send_start.elapsed().as_secs_f64()
    ));
    if sent != UDP_COUNT {
        return Err(format!("sent {sent} datagrams, wanted {UDP_COUNT}"));
    }
    // Wait for the result, failing early if the count stops moving.
    let total_deadline = Instant::now() + UDP_TOTAL_DEADLINE;
    let mut last_count = None;
    let mut stall_deadline = Instant::now() + UDP_STALL_DEADLINE;
    let result = loop {
        let deadline = stall_deadline.min(total_deadline);
        let what = format!(
            "VUT-UDP-RESULT (last VUT-UDP-COUNT: {})",
            last_count.map_or("none".to_string(), |c: u64| c.to_string())
        );
        let line = match console.next_line(deadline, &what) {
            Ok(Some(line)) => line,
            Ok(None) => return Err(format!("QEMU exited while waiting for {what}")),
            Err(_) if stall_deadline <= total_deadline => {
                return Err(format!(
                    "guest's UDP count stalled at {} of {UDP_COUNT} for {UDP_STALL_DEADLINE:?}",
                    last_count.map_or("none".to_string(), |c| c.to_string())
                ))
            }
            Err(e) => return Err(e),
        };
        if let Some(n) = after(&line, "VUT-UDP-COUNT").and_then(|s| s.parse::<u64>().ok()) {
            if last_count != Some(n) {
                stall_deadline = Instant::now() + UDP_STALL_DEADLINE;
            }
            last_count = Some(n);
        }
        if line.contains("VUT-UDP-RESULT") {
            break line;
        }
        if line.contains("VUT-ERROR") || line.contains("VUT-DONE") {
            return Err(format!("guest stopped before reporting UDP: {line}"));
        }
    };
    let udp_time = send_start.elapsed();
    let total = field(&result, "total");
    let distinct = field(&result, "distinct");
    let expected = Some(u64::from(UDP_COUNT));
    if last_count != expected || total != expected || distinct != expected {
        return Err(format!(
            "guest received {} of {UDP_COUNT} datagrams: {}",
            last_count.map_or("?".to_string(), |c| c.to_string()),
            after(&result, "VUT-UDP-RESULT").unwrap_or(&result)
        ));
    }
    log(&format!(
        "guest counted VUT-UDP-COUNT {UDP_COUNT}, all distinct"
    ));
    Ok(format!(
        "boot {:.1}s, ping guest->host ok, ping host->guest 3/3, \
         UDP {UDP_COUNT}/{UDP_COUNT} distinct in {:.1}s",
        boot_time.as_secs_f64(),
        udp_time.as_secs_f64()
    ))
}

/// QEMU's version, from `--version` ("QEMU emulator version 7.2.22 (Debian ...)").
fn qemu_version(qemu: &Path) -> Result<(u32, u32, u32), String> {
    let out = run(&qemu.to_string_lossy(), &["--version"])?;
    let version = after(&out, "version ")
        .and_then(|s| s.split_whitespace().next())
        .ok_or_else(|| format!("unexpected `{} --version` output: {out}", qemu.display()))?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    Ok((
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    ))
}

/// The tap's MAC address, for the guest's static ARP entry.
fn tap_mac(netns: &Netns) -> Result<String, String> {
    let out = netns.ip(&["-o", "link", "show", "dev", TAP])?;
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| format!("no MAC address in `ip link show {TAP}`: {out}"))
}
