//! The daemon as a systemd service, without a running systemd: the unit files checked by
//! `systemd-analyze`, socket activation through `systemd-socket-activate` and through a socket the
//! test holds (as systemd does across restarts), sd_notify readiness/watchdog/stopping on a
//! NOTIFY_SOCKET of our own, the seccomp filter, options from the environment.
//!
//! Needs the systemd tools (Debian package systemd; qemu-scripts/systemd-tools.sh installs it) and,
//! for the daemon tests, root. A missing prerequisite fails the test unless VUT_SKIP_SYSTEMD=1 /
//! VUT_SKIP_ROOT=1 asks to skip it (prints SKIPPED).

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use vhost_user_tap::seccomp;
use vhost_user_tap_guest::kit::*;
use vhost_user_tap_guest::Guest;

fn unit_dir() -> PathBuf {
    repo_root().join("qemu-scripts/systemd")
}

fn unit_text(name: &str) -> String {
    let p = unit_dir().join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Copies of the two unit templates in `dir` whose ExecStart*= point at this build's daemon and
/// the repository's prepare script instead of /usr/libexec (which `verify` wants to exist).
fn staged_units(dir: &Path) -> (PathBuf, PathBuf) {
    let prepare = unit_dir()
        .join("vhost-user-tap-prepare")
        .display()
        .to_string();
    let mut out = Vec::new();
    for name in ["vhost-user-tap@.socket", "vhost-user-tap@.service"] {
        let text = unit_text(name);
        let staged = text
            .replace("/usr/libexec/vhost-user-tap-prepare", &prepare)
            .replace("/usr/libexec/vhost-user-tap", daemon_bin());
        if name.ends_with(".service") {
            assert!(
                text.contains("ExecStart=/usr/libexec/vhost-user-tap\n")
                    && staged.contains(&format!("ExecStart={}\n", daemon_bin()))
                    && staged.contains(&format!("ExecStartPre=+{prepare} ")),
                "the service's ExecStart/ExecStartPre are not where the test expects them"
            );
        }
        let p = dir.join(name);
        std::fs::write(&p, staged).unwrap();
        out.push(p);
    }
    (out[0].clone(), out[1].clone())
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    if !systemd_tools_or_skip("verify", &["systemd-analyze"]) {
        return;
    }
    let dir = TempDir::new("verify");
    let (socket, service) = staged_units(dir.path());
    // Only our units count: on a host with a populated /etc/systemd, their dependencies
    // (sockets.target, multi-user.target, ...) may carry warnings of their own.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "--recursive-errors=no"])
        .arg(&socket)
        .arg(&service)
        .output()
        .expect("running systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("vhost-user-tap"),
        "systemd-analyze verify: {}\n{err}",
        out.status
    );
}

#[test]
fn the_service_is_rated_ok_or_better_by_systemd_analyze_security() {
    if !systemd_tools_or_skip("security", &["systemd-analyze"]) {
        return;
    }
    let dir = TempDir::new("security");
    let (_, service) = staged_units(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&service)
        .output()
        .expect("running systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no overall exposure in:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let level = overall.split_whitespace().nth(7).unwrap_or("");
    assert!(
        ["OK", "SAFE", "PERFECT"].contains(&level),
        "exposure is {level}, not OK or better: {overall}"
    );
}

/// The unit's `SystemCallFilter=` lines resolved to syscall names with `systemd-analyze
/// syscall-filter` (first line an allow-list, later `~` lines remove).
fn unit_syscall_set() -> BTreeSet<String> {
    let out = run(Command::new("systemd-analyze").arg("syscall-filter"));
    let mut groups: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut current = None;
    for line in out.lines() {
        let item = line.trim();
        if item.is_empty() || item.starts_with('#') {
            continue;
        }
        if line.starts_with('@') {
            current = Some(item.to_string());
            groups.insert(item.to_string(), Vec::new());
        } else if let Some(g) = &current {
            groups.get_mut(g).unwrap().push(item.to_string());
        }
    }
    fn expand(
        groups: &std::collections::HashMap<String, Vec<String>>,
        item: &str,
    ) -> BTreeSet<String> {
        match groups.get(item) {
            Some(members) => members.iter().flat_map(|m| expand(groups, m)).collect(),
            None if item.starts_with('@') => panic!("unknown syscall group {item}"),
            None => BTreeSet::from([item.to_string()]),
        }
    }
    let mut set: Option<BTreeSet<String>> = None;
    for line in unit_text("vhost-user-tap@.service").lines() {
        let Some(value) = line.strip_prefix("SystemCallFilter=") else {
            continue;
        };
        let (deny, list) = match value.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, value),
        };
        let names: BTreeSet<String> = list
            .split_whitespace()
            .flat_map(|i| expand(&groups, i))
            .collect();
        match (&mut set, deny) {
            (None, false) => set = Some(names),
            (Some(s), false) => s.extend(names),
            (Some(s), true) => s.retain(|n| !names.contains(n)),
            (None, true) => panic!("the unit's first SystemCallFilter= is a deny list"),
        }
    }
    set.expect("the unit has a SystemCallFilter=")
}

/// What the daemon calls before its own filter is in place (start-up, the tap, the listener, the
/// metrics endpoint, installing the filter), as `strace -f` of the whole test suite showed.
const SETUP_SYSCALLS: &[&str] = &[
    "access",
    "arch_prctl",
    "bind",
    "execve",
    "getpid",
    "getsockopt",
    "listen",
    "newfstatat",
    "openat",
    "poll",
    "prctl",
    "pread64",
    "prlimit64",
    "seccomp",
    "set_tid_address",
    "setsockopt",
    "signalfd4",
    "socket",
    "statx",
];

#[test]
fn the_seccomp_allow_list_fits_inside_the_units_sandbox() {
    if !systemd_tools_or_skip("syscallfilter", &["systemd-analyze"]) {
        return;
    }
    let allowed = unit_syscall_set();
    let missing: Vec<&str> = seccomp::ALLOWED
        .iter()
        .map(|a| a.0)
        .chain(SETUP_SYSCALLS.iter().copied())
        .filter(|n| !allowed.contains(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "the unit's SystemCallFilter= refuses {missing:?}, which the daemon needs"
    );
    // The filter's socket() rule and the unit's RestrictAddressFamilies= agree.
    let families = unit_text("vhost-user-tap@.service")
        .lines()
        .find_map(|l| {
            l.strip_prefix("RestrictAddressFamilies=")
                .map(str::to_string)
        })
        .expect("RestrictAddressFamilies=");
    assert_eq!(families, "AF_UNIX AF_NETLINK");
}

fn daemon_with(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(daemon_bin());
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    c.envs(env.iter().copied()).args(args);
    output_within(&mut c, WAIT)
}

fn one_line_error(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    err
}

#[test]
fn every_option_can_come_from_the_environment() {
    let out = daemon_with(&[("VHOST_USER_TAP_PRINT_CAPABILITIES", "1")], &[]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"type": "net"}"#
    );

    let base = [
        ("VHOST_USER_TAP_SOCKET_PATH", "/nonexistent/s.sock"),
        ("VHOST_USER_TAP_TAP", "vut0"),
    ];
    for (var, value, needle) in [
        ("VHOST_USER_TAP_MTU", "12", "--mtu 12"),
        ("VHOST_USER_TAP_QUEUE_SIZE", "3", "--queue-size 3"),
        ("VHOST_USER_TAP_QUEUES", "0", "--queues 0"),
        ("VHOST_USER_TAP_MAC", "zz", "--mac \"zz\""),
        ("VHOST_USER_TAP_BACKPRESSURE", "sometimes", "sometimes"),
        ("VHOST_USER_TAP_QDISC", "fq codel", "--qdisc \"fq codel\""),
        ("VHOST_USER_TAP_BUSY_POLL_US", "2000000", "--busy-poll-us"),
        ("VHOST_USER_TAP_METRICS", "nowhere", "nowhere"),
        ("VHOST_USER_TAP_NO_SECCOMP", "perhaps", "perhaps"),
        ("VHOST_USER_TAP_FD", "1", "--fd"),
    ] {
        let mut env = base.to_vec();
        env.push((var, value));
        let out = daemon_with(&env, &[]);
        let err = one_line_error(&out);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {err}");
        assert!(
            err.contains(needle),
            "{var}={value}: {err:?} lacks {needle:?}"
        );
    }
    // The command line wins over the environment; an empty variable counts as unset.
    let env = [base[0], base[1], ("VHOST_USER_TAP_MTU", "1500")];
    let err = one_line_error(&daemon_with(&env, &["--mtu", "13"]));
    assert!(err.contains("--mtu 13"), "{err}");
    let env = [base[0], ("VHOST_USER_TAP_TAP", "")];
    let err = one_line_error(&daemon_with(&env, &[]));
    assert!(err.contains("--tap is required"), "{err}");
}

/// Run the daemon with `LISTEN_FDS=n` and `LISTEN_PID` set to its own pid (as systemd does:
/// `sh` sets it, then execs) and `fds` as its descriptors 3, 4, ...
fn activated(n: &str, fds: &[i32], args: &[&str]) -> Output {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("LISTEN_PID=$$ LISTEN_FDS={n} exec \"$0\" \"$@\""))
        .arg(daemon_bin())
        .args(args);
    let fds = fds.to_vec();
    // SAFETY: only dup2/fcntl (async-signal-safe) between fork and exec.
    unsafe { c.pre_exec(move || inherit_as(&fds, 3)) };
    output_within(&mut c, WAIT)
}

/// Make `fds` descriptors `first`, `first + 1`, ... of the child, inheritable (between fork and
/// exec). Each is first copied above the targets (close-on-exec), so sources and targets may
/// overlap.
fn inherit_as(fds: &[i32], first: i32) -> std::io::Result<()> {
    let check = |r: i32| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    let mut copies = [0; 8];
    for (copy, &fd) in copies.iter_mut().zip(fds) {
        // SAFETY: fcntl on a descriptor of the forked child; async-signal-safe.
        *copy = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) })?;
    }
    for (target, &copy) in (first..).zip(&copies[..fds.len()]) {
        // SAFETY: dup2 on descriptors of the forked child; async-signal-safe. The new descriptor
        // is not close-on-exec.
        check(unsafe { libc::dup2(copy, target) })?;
    }
    Ok(())
}

#[test]
fn socket_activation_mistakes_are_named_at_start() {
    let dir = TempDir::new("actfail");
    let one = UnixListener::bind(dir.path().join("1.sock")).unwrap();
    let two = UnixListener::bind(dir.path().join("2.sock")).unwrap();
    let connected = std::os::unix::net::UnixStream::connect(dir.path().join("1.sock")).unwrap();
    let file = std::fs::File::open("/dev/null").unwrap();
    let (l1, l2) = (one.as_raw_fd(), two.as_raw_fd());
    for (n, fds, args, needle) in [
        (
            "2",
            vec![l1, l2],
            vec!["--tap", "vut0"],
            "systemd passed 2 sockets",
        ),
        (
            "1",
            vec![l1],
            vec!["--tap", "vut0", "--socket-path", "/tmp/x.sock"],
            "and --socket-path /tmp/x.sock was given too",
        ),
        ("1", vec![l1], vec!["--tap", "vut0", "--fd", "4"], "--fd 4"),
        (
            "1",
            vec![file.as_raw_fd()],
            vec!["--tap", "vut0"],
            "fd 3 is not a socket",
        ),
        (
            "1",
            vec![connected.as_raw_fd()],
            vec!["--tap", "vut0"],
            "fd 3 is a connected unix socket",
        ),
    ] {
        let out = activated(n, &fds, &args);
        let err = one_line_error(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
    }
}

// ---- the daemon in a network namespace, driven by the synthetic guest ----

#[test]
fn systemd_socket_activate_starts_the_daemon_and_traffic_flows() {
    if !root_or_skip("sdactivate")
        || !systemd_tools_or_skip("sdactivate", &["systemd-socket-activate"])
    {
        return;
    }
    let ns = Netns::new("sdact");
    let dir = TempDir::new("sdact");
    let socket = dir.path().join("vm1.sock");
    // systemd-socket-activate binds and listens; the first connection makes it set
    // LISTEN_FDS/LISTEN_PID and exec the daemon, which takes its settings from the environment
    // as under the unit (EnvironmentFile=).
    let mut cmd = ns.command("systemd-socket-activate");
    cmd.arg("-l")
        .arg(&socket)
        .args(["-E", "RUST_LOG=info", "-E"])
        .arg(format!("VHOST_USER_TAP_TAP={TAP}"))
        .arg("-E")
        .arg(format!(
            "VHOST_USER_TAP_METRICS=unix:{}",
            dir.path().join("metrics.sock").display()
        ))
        .arg(daemon_bin());
    let mut d = Daemon::spawn(&mut cmd, socket.clone(), "Listening on");
    assert!(
        !d.log().contains("vhost_user_tap"),
        "the daemon started before a frontend connected"
    );
    let cfg = guest_config(&socket);
    let connecting = std::thread::spawn(move || Guest::connect(cfg));
    d.wait_for_log(
        "systemd socket activation: listening socket inherited as fd 3",
        WAIT,
    );
    d.wait_for_log("seccomp: ", WAIT);
    ns.configure_tap(TAP);
    let host = ns.udp_socket(&format!("{HOST_IP}:{HOST_PORT}"));
    let mut g = connecting.join().unwrap().expect("the guest connects");
    d.wait_for_log("features acked", WAIT);
    host_to_guest(&host, &mut g, 0..200);
    guest_to_host(&ns, &host, &mut g, 50, |_| 100);
    drop(g);
    let c = d.counters_when_idle(0);
    d.terminate_ok();
    assert!(
        socket.exists(),
        "the daemon removed a socket it did not create (systemd owns it)"
    );
    assert_eq!((c["rx_frames"], c["tx_frames"]), (200, 50), "{c:?}");
}

/// A datagram socket standing in for systemd's NOTIFY_SOCKET.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: TempDir,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = TempDir::new("notify");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            sock,
            path,
            _dir: dir,
        }
    }

    /// The next notification (one datagram, lines joined), or None after `timeout`.
    fn next(&self, timeout: Duration) -> Option<String> {
        let timeout = timeout.max(Duration::from_millis(1));
        self.sock.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
            Err(e) => panic!("notify socket: {e}"),
        }
    }

    /// Wait for a notification containing `line`; returns the ones seen before it.
    fn wait_for(&self, line: &str) -> (String, Vec<String>) {
        let deadline = Instant::now() + WAIT;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(m) if m.lines().any(|l| l == line) => return (m, before),
                Some(m) => before.push(m),
                None => panic!("no {line} within {WAIT:?}; got {before:?}"),
            }
        }
    }

    /// Count WATCHDOG=1 pings during `span`.
    fn pings(&self, span: Duration) -> usize {
        let end = Instant::now() + span;
        let mut n = 0;
        while let Some(m) = self.next(end.saturating_duration_since(Instant::now())) {
            n += usize::from(m.lines().any(|l| l == "WATCHDOG=1"));
            if Instant::now() >= end {
                break;
            }
        }
        n
    }
}

#[test]
fn readiness_watchdog_pings_and_stopping_reach_notify_socket() {
    if !root_or_skip("notify") {
        return;
    }
    let ns = Netns::new("notify");
    let notify = NotifySocket::new();
    let dir = TempDir::new("notify-sock");
    let socket = dir.path().join("vm1.sock");
    let mut cmd = ns.command(daemon_bin());
    cmd.args(["--tap", TAP, "--socket-path"])
        .arg(&socket)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "400000");
    let mut d = Daemon::spawn(&mut cmd, socket.clone(), "listening on");
    let (ready, before) = notify.wait_for("READY=1");
    assert!(
        before.is_empty(),
        "notifications before READY=1: {before:?}"
    );
    assert!(
        ready.contains("STATUS=serving tap vut0"),
        "READY=1 comes with a status line: {ready:?}"
    );
    // Ready means ready: the socket accepts and the seccomp filter is on.
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());
    // The filter is logged before READY=1; the log reader thread may not have caught up yet.
    d.wait_for_log("seccomp: ", WAIT);
    // WatchdogSec=400ms: the idle accept loop pings at least every 300 ms.
    let idle = notify.pings(Duration::from_millis(1200));
    assert!(idle >= 4, "{idle} pings in 1.2 s while idle");
    // ... and so does the session loop while a guest is connected and traffic flows.
    ns.configure_tap(TAP);
    let host = ns.udp_socket(&format!("{HOST_IP}:{HOST_PORT}"));
    let mut g = d.connect(guest_config(&socket));
    host_to_guest(&host, &mut g, 0..50);
    let busy = notify.pings(Duration::from_millis(1200));
    assert!(busy >= 4, "{busy} pings in 1.2 s with a guest connected");
    // SIGTERM: STOPPING=1, then a clean exit.
    d.signal(libc::SIGTERM);
    let (stopping, _) = notify.wait_for("STOPPING=1");
    assert!(stopping.contains("STATUS=shutting down"), "{stopping:?}");
    drop(g);
    d.terminate_ok();
}

#[test]
fn seccomp_refuses_a_forbidden_syscall_unless_turned_off() {
    if !root_or_skip("seccomp") {
        return;
    }
    let ns = Netns::new("seccomp");
    let dir = TempDir::new("seccomp");
    let socket = dir.path().join("s.sock");
    let run_selftest = |extra_env: &[(&str, &str)]| {
        output_within(
            ns.command(daemon_bin())
                .args(["--tap", TAP, "--socket-path"])
                .arg(&socket)
                .env("RUST_LOG", "info")
                .env(seccomp::SELFTEST_ENV, "1")
                .envs(extra_env.iter().copied()),
            WAIT,
        )
    };
    let out = run_selftest(&[]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(i32::from(seccomp::SELFTEST_REFUSED)),
        "{log}"
    );
    for probe in ["ptrace(", "socket(AF_INET6", "ioctl(-1, TUNSETIFF)"] {
        assert!(
            log.lines()
                .any(|l| l.contains(probe) && l.contains("refused: Operation not permitted")),
            "no refusal of {probe} in:\n{log}"
        );
    }
    assert!(!socket.exists(), "socket left behind");
    // Off (here from the environment, as a unit's EnvironmentFile= would): nothing is refused.
    let out = run_selftest(&[("VHOST_USER_TAP_NO_SECCOMP", "1")]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(i32::from(seccomp::SELFTEST_ALLOWED)),
        "{log}"
    );
    assert!(log.contains("seccomp off (--no-seccomp)"), "{log}");
}

/// The prepare script run twice for `tap` with `queues`: the tap is created once, persistent,
/// with a vnet header, up, owned by the service user, multi-queue when `queues` > 1.
fn prepare_body(tag: &str, tap: &str, queues: &str, multi: bool) {
    if !root_or_skip(tag) {
        return;
    }
    let ns = Netns::new(tag);
    let run_prepare = || {
        run(ns
            .command(unit_dir().join("vhost-user-tap-prepare"))
            .arg("nobody")
            .env("VHOST_USER_TAP_TAP", tap)
            .env("VHOST_USER_TAP_QUEUES", queues))
    };
    let first = run_prepare();
    assert!(
        first.contains(&format!("created tap {tap} for user nobody")),
        "{first}"
    );
    let again = run_prepare();
    assert!(!again.contains("created"), "created twice: {again}");
    let info = ns.ip(&["-details", "link", "show", "dev", tap]);
    assert!(info.contains("tun type tap"), "{info}");
    assert!(info.contains("vnet_hdr on"), "{info}");
    assert!(info.contains("persist on"), "{info}");
    assert!(info.contains("user nobody"), "{info}");
    assert_eq!(info.contains("multi_queue"), multi, "{info}");
    assert!(info.contains("state") && info.contains(",UP"), "{info}");
}

#[test]
fn the_prepare_script_creates_a_single_queue_tap_for_the_service_user_once() {
    prepare_body("prepare", "vutsq0", "1", false);
}

#[test]
fn the_prepare_script_creates_a_multi_queue_tap_for_the_service_user_once() {
    prepare_body("preparemq", "vutmq0", "4", true);
}

/// The daemon as vhost-user-tap@.service runs it: user nobody, no capabilities (see
/// [`Netns::unprivileged`]), LISTEN_PID/LISTEN_FDS=1 for its own pid and `listener` as its
/// descriptor 3.
fn activated_unprivileged(ns: &Netns, listener: &UnixListener) -> Command {
    let mut c = ns.unprivileged("export LISTEN_PID=$$ LISTEN_FDS=1 &&", daemon_bin());
    c.env("VHOST_USER_TAP_TAP", TAP);
    let fd = listener.as_raw_fd();
    // SAFETY: only dup2/fcntl (async-signal-safe) between fork and exec.
    unsafe { c.pre_exec(move || inherit_as(&[fd], 3)) };
    c
}

#[test]
fn a_killed_daemon_restarts_on_the_held_socket_and_traffic_resumes() {
    if !root_or_skip("restart") {
        return;
    }
    let ns = Netns::new("restart");
    // The tap as the unit's ExecStartPre creates it: persistent, for the service user.
    run(ns
        .command(unit_dir().join("vhost-user-tap-prepare"))
        .arg("nobody")
        .env("VHOST_USER_TAP_TAP", TAP));
    ns.configure_tap(TAP);
    let host = ns.udp_socket(&format!("{HOST_IP}:{HOST_PORT}"));
    // The listening socket, held across daemon lifetimes as systemd's .socket unit holds it.
    let dir = TempDir::new("restart");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("vm1.sock");
    let listener = UnixListener::bind(&socket).unwrap();

    let ready = "syscalls allowed";
    let mut first = Daemon::spawn(
        &mut activated_unprivileged(&ns, &listener),
        socket.clone(),
        ready,
    );
    // Unprivileged indeed: user nobody, no capabilities, seccomp on.
    assert_eq!(
        proc_status_field(first.pid(), "Uid:")
            .split_whitespace()
            .next(),
        Some("65534")
    );
    assert_eq!(
        proc_status_field(first.pid(), "CapEff:"),
        "0000000000000000"
    );
    assert_eq!(proc_status_field(first.pid(), "Seccomp:"), "2");
    let mut g = first.connect(guest_config(&socket));
    host_to_guest(&host, &mut g, 0..100);

    let st = first.kill();
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st}");
    drop(g);
    // The guest reconnects while no daemon runs: the held socket queues the connection (as
    // systemd's does while it restarts the service), and the handshake waits for the new daemon.
    let cfg = guest_config(&socket);
    let reconnect = std::thread::spawn(move || Guest::connect(cfg));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !reconnect.is_finished(),
        "the handshake finished with no daemon"
    );
    let mut second = Daemon::spawn(
        &mut activated_unprivileged(&ns, &listener),
        socket.clone(),
        ready,
    );
    let mut g = reconnect
        .join()
        .unwrap()
        .expect("the guest's queued connection is served by the new daemon");
    second.wait_for_log("features acked", WAIT);
    host_to_guest(&host, &mut g, 100..200);
    guest_to_host(&ns, &host, &mut g, 20, |_| 100);
    drop(g);
    let c = second.counters_when_idle(0);
    second.terminate_ok();
    assert_eq!((c["rx_frames"], c["tx_frames"]), (100, 20), "{c:?}");
    assert!(
        socket.exists(),
        "the held socket's file is not the daemon's to remove"
    );
}
