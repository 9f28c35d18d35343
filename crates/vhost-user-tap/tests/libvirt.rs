//! libvirt as operators run it: `virsh create` of a domain with an `<interface type='vhostuser'>`
//! connected to the daemon, QEMU 7.2 under TCG as libvirt's unprivileged user, reconnect on.
//!
//! ```text
//!  netns vut-libvirt-<pid>-<n>                      private libvirtd (own mount namespace)
//!  10.99.0.1/24 on persistent tap vut0                 └─ QEMU 7.2, TCG, user libvirt-qemu
//!     <-> vhost-user-tap --socket-group libvirt-qemu <-> virtio-net eth0 10.99.0.2/24 (guest)
//! ```
//!
//! The test starts a libvirtd of its own in a private mount namespace: the private directories
//! under a temp dir are bind-mounted over /etc/libvirt, /run/libvirt, /var/lib/libvirt and
//! /var/log/libvirt, and QEMU's capability cache over /var/cache/libvirt (kept in
//! `$VUT_CACHE/libvirt-cache`, so that only the first run pays the ~4 s probe). The host's own
//! libvirt state (if any) is never seen or touched; missing mount points are created empty and
//! removed again. Everything the test starts (the domain, QEMU, libvirtd, the daemon, the
//! namespace) is stopped on drop, also when the test fails.
//!
//! Deviations from a stock libvirt setup, all in the private qemu.conf and all unrelated to
//! vhost-user: `stdio_handler = "file"` (no virtlogd), `cgroup_controllers = [ ]` (no cgroups
//! created on the host), `namespaces = [ ]` (see below). This machine's /dev/kvm exists but is
//! root-only for libvirt-qemu and hangs guests; libvirt then finds its capability cache "with KVM"
//! invalid on every look-up and probes QEMU again each time (~4 s, ~10 times per `virsh create`).
//! The test hides /dev/kvm in libvirtd's namespace behind an empty root-only file (the domain is
//! TCG anyway), and libvirt cannot move that bind mount into a per-QEMU /dev namespace, hence
//! `namespaces = [ ]`.
//!
//! The guest (qemu-scripts/build-guest.sh) runs in `vut.mode=shell`: it configures eth0 with a
//! static ARP entry for the host and gives a shell on the serial console, a unix socket the test
//! reads and writes. Assertions: QEMU runs as libvirt-qemu; the guest pings the host and the host
//! pings the guest; then the daemon is SIGKILLed and started again on the same socket, QEMU
//! reconnects (reconnect timeout 1 s) and both pings succeed again within RECOVERY_DEADLINE.
//!
//! Prerequisites (a missing one fails the test with the fix; `VUT_SKIP_LIBVIRT=1` or
//! `VUT_SKIP_QEMU=1` prints `SKIPPED: ...` and passes instead): root, PID 1 not systemd (with
//! systemd, libvirtd would register the domain with machined), `qemu-scripts/libvirt-tools.sh`
//! (libvirt 9.0, virsh, user libvirt-qemu) and `qemu-scripts/build-guest.sh` (QEMU 7.2, the guest).
//!
//! Run: `cargo test --test libvirt -- --nocapture` (as root).

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use vhost_user_tap_guest::kit::{
    daemon_bin, on_path, Daemon, Netns, TempDir, GUEST_IP, GUEST_MAC, HOST_IP, TAP,
};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const LIBVIRTD: &str = "/usr/sbin/libvirtd";
/// The user and group Debian's libvirt runs QEMU as (built in; the private qemu.conf leaves
/// `user`/`group` unset). The daemon's socket gets this group.
const QEMU_USER: &str = "libvirt-qemu";
const QEMU_GROUP: &str = "libvirt-qemu";
/// libvirt's fixed alias for the NIC: `ua-` is the prefix for user aliases, which
/// `<qemu:override>` needs to name the device.
const NIC_ALIAS: &str = "ua-net0";

/// libvirtd answering (a cold capability probe of QEMU 7.2 takes ~4 s).
const LIBVIRTD_DEADLINE: Duration = Duration::from_secs(60);
/// `virsh create` returns once QEMU runs; it hangs (domain "paused (starting up)") while QEMU
/// cannot connect to the daemon's socket.
const CREATE_DEADLINE: Duration = Duration::from_secs(30);
/// Boot to the guest's shell; ~7 s under TCG alone, more under load.
const BOOT_DEADLINE: Duration = Duration::from_secs(90);
/// The guest's `ping -w` and our wait for its answer.
const GUEST_PING_SECS: u32 = 20;
/// From the restarted daemon listening to the host's first answered ping.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(15);

fn skip_requested() -> bool {
    ["VUT_SKIP_LIBVIRT", "VUT_SKIP_QEMU"]
        .iter()
        .any(|v| std::env::var(v).as_deref() == Ok("1"))
}

/// The guest image, or what is missing and how to fix it.
fn prerequisites() -> Result<(PathBuf, PathBuf), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("must run as root (network namespaces, taps, libvirtd)".into());
    }
    let pid1 = fs::read_to_string("/proc/1/comm").unwrap_or_default();
    if pid1.trim() == "systemd" {
        return Err(
            "PID 1 is systemd: the test's private libvirtd would register its domain \
                    with the host's machined; run it on a machine without systemd"
                .into(),
        );
    }
    let tools = "run qemu-scripts/libvirt-tools.sh";
    for (file, what) in [
        (LIBVIRTD, "libvirtd (package libvirt-daemon)"),
        (QEMU, "QEMU 7.2 (package qemu-system-x86)"),
    ] {
        if !Path::new(file).is_file() {
            return Err(format!("{what} missing at {file}: {tools}"));
        }
    }
    for tool in ["virsh", "ip", "ping", "unshare", "mount"] {
        if !on_path(tool) {
            return Err(format!("`{tool}` not found: {tools}"));
        }
    }
    if qemu_driver().is_none() {
        return Err(format!(
            "libvirt's QEMU driver (package libvirt-daemon-driver-qemu) missing: {tools}"
        ));
    }
    if user_ids(QEMU_USER).is_none() || group_id(QEMU_GROUP).is_none() {
        return Err(format!(
            "user/group {QEMU_USER} (libvirt's QEMU user) missing: {tools}"
        ));
    }
    let guest = vhost_user_tap_guest::kit::cache_dir().join("guest");
    let (kernel, initrd) = (guest.join("vmlinuz"), guest.join("initrd.img"));
    for f in [&kernel, &initrd] {
        if !f.is_file() {
            return Err(format!(
                "guest image {} missing: run qemu-scripts/build-guest.sh",
                f.display()
            ));
        }
    }
    Ok((kernel, initrd))
}

fn qemu_driver() -> Option<PathBuf> {
    let lib = Path::new("/usr/lib");
    let mut dirs = vec![lib.to_path_buf(), PathBuf::from("/usr/lib64")];
    if let Ok(entries) = fs::read_dir(lib) {
        dirs.extend(entries.flatten().map(|e| e.path()));
    }
    dirs.into_iter()
        .map(|d| d.join("libvirt/connection-driver/libvirt_driver_qemu.so"))
        .find(|p| p.is_file())
}

/// (uid, primary gid) of a user.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    // SAFETY: getpwnam returns NULL or a pointer to static storage, read at once (the test does
    // not call it concurrently).
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    // SAFETY: checked for NULL; the fields are plain integers.
    (!pw.is_null()).then(|| unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

fn group_id(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: as in user_ids.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    // SAFETY: checked for NULL.
    (!gr.is_null()).then(|| unsafe { (*gr).gr_gid })
}

/// Run a command with a deadline; stdout+stderr, or why it failed. A command still running at
/// the deadline is killed.
fn run_for(cmd: &mut Command, timeout: Duration) -> Result<String, String> {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(out)) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if out.status.success() {
                Ok(text)
            } else {
                Err(format!(
                    "{what} failed ({}): {}",
                    out.status,
                    text.trim_end()
                ))
            }
        }
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => {
            // SAFETY: the waiting thread has not reaped the child (it has not exited).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = rx.recv();
            Err(format!("{what} still running after {timeout:?}"))
        }
    }
}

// --- the private libvirtd ------------------------------------------------------------------

/// Mount points of libvirt's state directories, each bound to a private directory.
const STATE_DIRS: [(&str, &str); 5] = [
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
];

/// A libvirtd in a mount namespace of its own; on drop the domain is destroyed (its QEMU killed if
/// that fails), libvirtd is stopped, and the mount points it created are removed.
struct Libvirtd {
    root: TempDir,
    child: Option<Child>,
    created: Vec<PathBuf>,
    domain: Option<String>,
    qemu_pid: Option<libc::pid_t>,
}

impl Libvirtd {
    fn start() -> Libvirtd {
        let root = TempDir::new("libvirt-state");
        let cache = vhost_user_tap_guest::kit::cache_dir().join("libvirt-cache");
        fs::create_dir_all(&cache).unwrap();
        let mut created = Vec::new();
        let mut script = String::from("set -e\n");
        for (sub, target) in STATE_DIRS {
            let src = if sub == "cache" {
                cache.clone()
            } else {
                let d = root.path().join(sub);
                fs::create_dir_all(&d).unwrap();
                d
            };
            if !Path::new(target).exists() {
                fs::create_dir_all(target).unwrap_or_else(|e| panic!("mkdir {target}: {e}"));
                created.push(PathBuf::from(target));
            }
            script.push_str(&format!("mount --bind '{}' '{target}'\n", src.display()));
        }
        if Path::new("/dev/kvm").exists() {
            // See the module comment: libvirt would re-probe QEMU on every capability look-up.
            let stub = root.path().join("no-kvm");
            fs::write(&stub, "").unwrap();
            fs::set_permissions(&stub, fs::Permissions::from_mode(0o600)).unwrap();
            script.push_str(&format!("mount --bind '{}' /dev/kvm\n", stub.display()));
        }
        fs::write(
            root.path().join("etc/libvirtd.conf"),
            "log_outputs = \"3:stderr\"\n",
        )
        .unwrap();
        fs::write(
            root.path().join("etc/qemu.conf"),
            "stdio_handler = \"file\"\ncgroup_controllers = [ ]\nnamespaces = [ ]\n",
        )
        .unwrap();
        script.push_str(&format!(
            "exec {LIBVIRTD} --config /etc/libvirt/libvirtd.conf --pid-file /run/libvirt/libvirtd.pid\n"
        ));
        let log = fs::File::create(root.path().join("libvirtd.log")).unwrap();
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting unshare ... libvirtd");
        let mut l = Libvirtd {
            root,
            child: Some(child),
            created,
            domain: None,
            qemu_pid: None,
        };
        // Poll with a deadline: libvirtd has no readiness notification without systemd.
        let deadline = Instant::now() + LIBVIRTD_DEADLINE;
        loop {
            if let Some(st) = l.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("libvirtd exited ({st}) at start; its log:\n{}", l.log());
            }
            if l.socket().exists() && l.virsh(&["version"], WAIT).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd did not answer within {LIBVIRTD_DEADLINE:?}; its log:\n{}",
                l.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        l
    }

    /// Waits until libvirt no longer knows the (transient) domain: QEMU has exited.
    fn wait_gone(&mut self, timeout: Duration) {
        let name = self.domain.clone().expect("a domain");
        let deadline = Instant::now() + timeout;
        loop {
            match self.virsh(&["domstate", &name], WAIT) {
                Err(e) if e.contains("failed to get domain") || e.contains("not found") => break,
                r => assert!(
                    Instant::now() < deadline,
                    "domain {name} still there {timeout:?} after the guest's poweroff: {r:?}"
                ),
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.domain = None;
        self.qemu_pid = None;
    }

    fn socket(&self) -> PathBuf {
        self.root.path().join("run/libvirt-sock")
    }

    fn uri(&self) -> String {
        format!("qemu:///system?socket={}", self.socket().display())
    }

    fn virsh(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        run_for(
            Command::new("virsh").args(["-c", &self.uri()]).args(args),
            timeout,
        )
    }

    fn log(&self) -> String {
        fs::read_to_string(self.root.path().join("libvirtd.log")).unwrap_or_default()
    }

    fn qemu_log(&self, domain: &str) -> String {
        fs::read_to_string(self.root.path().join(format!("log/qemu/{domain}.log")))
            .unwrap_or_default()
    }

    /// `virsh create`; on failure or a hang, the error with the end of QEMU's log.
    fn create(&mut self, name: &str, xml: &Path) -> Result<(), String> {
        self.domain = Some(name.to_string());
        let r = self.virsh(&["create", &xml.display().to_string()], CREATE_DEADLINE);
        let pid_file = self.root.path().join(format!("run/qemu/{name}.pid"));
        self.qemu_pid = fs::read_to_string(pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok());
        r.map(drop).map_err(|e| {
            let state = self
                .virsh(&["domstate", "--reason", name], WAIT)
                .unwrap_or_else(|e| e);
            let log = self.qemu_log(name);
            let tail: Vec<&str> = log.lines().rev().take(6).collect();
            let hint = if log.contains("Permission denied") {
                format!(
                    "\n(QEMU runs as {QEMU_USER}: the daemon needs --socket-group {QEMU_GROUP})"
                )
            } else {
                String::new()
            };
            format!(
                "{e}\ndomain state: {}\nend of QEMU's log:\n{}{hint}",
                state.trim(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        let name = self.domain.take();
        if let Some(name) = &name {
            if let Err(e) = self.virsh(&["destroy", name], WAIT) {
                if !e.contains("failed to get domain") && !e.contains("not running") {
                    eprintln!("warning: virsh destroy {name}: {e}");
                }
            }
        }
        if let (Some(pid), Some(name)) = (self.qemu_pid, &name) {
            // Only if it is still our domain's QEMU (destroy failed, or libvirtd hung).
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&format!("guest={name},")) {
                // SAFETY: kill on a pid whose command line we just checked.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Some(mut child) = self.child.take() {
            // SAFETY: our child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + WAIT;
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        // Mount points we made; empty (the mounts lived in libvirtd's namespace only).
        for d in self.created.iter().rev() {
            let _ = fs::remove_dir(d);
        }
    }
}

// --- the serial console --------------------------------------------------------------------

/// The guest's serial console on a unix socket (libvirt `<serial type='unix'>`, QEMU listens).
struct Console {
    stream: UnixStream,
    lines: Receiver<String>,
    transcript: Vec<String>,
    start: Instant,
}

impl Console {
    fn connect(path: &Path, start: Instant) -> Console {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("serial console {}: {e}", path.display()));
        let mut reader = stream.try_clone().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut line = Vec::new();
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                for &b in &buf[..n] {
                    if b == b'\n' {
                        let text = strip_escapes(&String::from_utf8_lossy(&line));
                        line.clear();
                        if tx.send(text).is_err() {
                            return;
                        }
                    } else {
                        line.push(b);
                    }
                }
            }
        });
        Console {
            stream,
            lines,
            transcript: Vec::new(),
            start,
        }
    }

    fn send(&mut self, command: &str) {
        self.stream
            .write_all(format!("{command}\n").as_bytes())
            .expect("writing to the serial console");
    }

    /// The first new line for which `f` returns a value.
    fn wait_for<T>(
        &mut self,
        what: &str,
        deadline: Instant,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> T {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    println!("[{:6.2}s guest] {line}", self.start.elapsed().as_secs_f64());
                    self.transcript.push(line.clone());
                    if line.contains("Kernel panic") || line.contains("VUT-ERROR") {
                        panic!("guest failed while waiting for {what}: {line}");
                    }
                    if let Some(v) = f(&line) {
                        return v;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("timed out waiting for {what}"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("serial console closed (QEMU exited?) while waiting for {what}")
                }
            }
        }
    }

    /// The guest pings the host `count` times; returns how many answers it got. The marker is
    /// built by sed from ping's summary, so the echoed command line never matches it.
    fn guest_ping(&mut self, round: u32, count: u32) -> u32 {
        self.send(&format!(
            "ping -q -c {count} -i 0.2 -w {GUEST_PING_SECS} {HOST_IP} | \
             sed -n 's/.* \\([0-9]*\\) packets received.*/VUT-PING-{round}-\\1-END/p'"
        ));
        let prefix = format!("VUT-PING-{round}-");
        let deadline = Instant::now() + Duration::from_secs(GUEST_PING_SECS as u64 + 10);
        self.wait_for(&format!("guest ping round {round}"), deadline, |l| {
            let rest = &l[l.find(&prefix)? + prefix.len()..];
            rest[..rest.find("-END")?].parse().ok()
        })
    }
}

/// The line without carriage returns and terminal control sequences.
fn strip_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                }
            }
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

// --- the test ------------------------------------------------------------------------------

/// Packets the host got back out of `count` pings to the guest (from the namespace).
fn host_ping(ns: &Netns, count: u32, wait_secs: u32) -> u32 {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ping", "-q", "-n"])
        .args(["-c", &count.to_string(), "-i", "0.2"])
        .args(["-w", &wait_secs.to_string(), GUEST_IP])
        .output()
        .expect("running ping");
    let text = String::from_utf8_lossy(&out.stdout);
    // "3 packets transmitted, 3 received, 0% packet loss, time 402ms"
    text.lines()
        .find_map(|l| {
            let (_, rest) = l.split_once("transmitted, ")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// Deletes the persistent tap before its namespace goes.
struct TapGuard(String);

impl Drop for TapGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.0, "link", "del", TAP])
            .status();
    }
}

/// Everything a run owns. Fields drop in order: the domain and libvirtd first, then the daemon,
/// the tap, the namespace, the work directory.
struct Rig {
    libvirt: Option<Libvirtd>,
    daemon: Option<Daemon>,
    _tap: TapGuard,
    ns: Netns,
    work: TempDir,
    console: Option<Console>,
    domain: String,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if !thread::panicking() {
            return;
        }
        if let Some(l) = &self.libvirt {
            eprintln!(
                "----- QEMU log -----\n{}\n----- libvirtd log -----\n{}",
                l.qemu_log(&self.domain),
                l.log()
            );
        }
        if let Some(d) = &self.daemon {
            eprintln!("----- daemon log -----\n{}", d.log());
        }
        if let Some(c) = &self.console {
            eprintln!("----- guest console -----\n{}", c.transcript.join("\n"));
        }
    }
}

fn start_daemon(socket: &Path, ns: &Netns) -> Daemon {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, daemon_bin(), "--socket-path"])
        .arg(socket)
        .args(["--tap", TAP, "--socket-group", QEMU_GROUP]);
    let d = Daemon::spawn(&mut cmd, socket.to_path_buf(), "listening on");
    let meta = fs::metadata(socket).unwrap();
    assert_eq!(
        (meta.gid(), meta.mode() & 0o777),
        (group_id(QEMU_GROUP).unwrap(), 0o660),
        "--socket-group {QEMU_GROUP}: the socket's group and mode"
    );
    d
}

fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The domain: the README's interface element plus what libvirt 9.0 + QEMU 7.2 + TCG need
/// (shared memfd memory, vectors=0), a kernel boot and a unix-socket serial console.
fn domain_xml(name: &str, work: &Path, socket: &Path, cmdline: &str) -> String {
    let w = work.display();
    format!(
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{w}/vmlinuz</kernel>
    <initrd>{w}/initrd.img</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{QEMU}</emulator>
    <interface type='vhostuser'>
      <mac address='{mac}'/>
      <source type='unix' path='{socket}' mode='client'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <model type='virtio'/>
      <driver queues='1'/>
      <alias name='{NIC_ALIAS}'/>
    </interface>
    <serial type='unix'>
      <source mode='bind' path='{w}/console.sock'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:override>
    <qemu:device alias='{NIC_ALIAS}'>
      <qemu:frontend>
        <qemu:property name='vectors' type='unsigned' value='0'/>
      </qemu:frontend>
    </qemu:device>
  </qemu:override>
</domain>
",
        mac = mac_string(&GUEST_MAC),
        socket = socket.display(),
    )
}

/// QEMU's real uid and gid, from /proc.
fn process_ids(pid: libc::pid_t) -> (u32, u32) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |key: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
    };
    (field("Uid:"), field("Gid:"))
}

#[test]
fn libvirt_guest_reaches_the_host_both_ways_and_again_after_the_daemon_is_killed_and_restarted() {
    let (kernel, initrd) = match prerequisites() {
        Ok(g) => g,
        Err(why) if skip_requested() => {
            println!("SKIPPED: libvirt: {why}");
            return;
        }
        Err(why) => panic!("libvirt: {why} (set VUT_SKIP_LIBVIRT=1 to skip)"),
    };
    let start = Instant::now();
    let log = |msg: &str| println!("[{:6.2}s] {msg}", start.elapsed().as_secs_f64());

    let ns = Netns::new("libvirt");
    // Persistent, as the systemd unit's prepare script makes it: it keeps its address and MAC
    // (the guest's static ARP entry) across daemon restarts.
    ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"]);
    let tap = TapGuard(ns.name.clone());
    ns.configure_tap(TAP);
    let out = ns.ip(&["-j", "link", "show", TAP]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tap_mac = v[0]["address"].as_str().unwrap().to_string();

    // The domain's files, readable by libvirt-qemu (libvirt chowns the kernel and initrd it
    // boots: copies, not the cache's files).
    let work = TempDir::new("libvirt");
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::copy(&kernel, work.path().join("vmlinuz")).unwrap();
    fs::copy(&initrd, work.path().join("initrd.img")).unwrap();
    let socket = work.path().join("vm1.sock");
    let domain = format!("vut-libvirt-{}", std::process::id());
    let mut rig = Rig {
        libvirt: None,
        daemon: None,
        _tap: tap,
        ns,
        work,
        console: None,
        domain: domain.clone(),
    };

    rig.daemon = Some(start_daemon(&socket, &rig.ns));
    log(&format!(
        "daemon listening on {} (group {QEMU_GROUP}, 0660)",
        socket.display()
    ));
    rig.libvirt = Some(Libvirtd::start());
    log("private libvirtd answering");

    let cmdline = format!(
        "console=ttyS0 quiet panic=-1 vut.mode=shell vut.ip={GUEST_IP}/24 vut.peer={HOST_IP} \
         vut.peer_mac={tap_mac}"
    );
    let xml = rig.work.path().join("domain.xml");
    fs::write(
        &xml,
        domain_xml(&domain, rig.work.path(), &socket, &cmdline),
    )
    .unwrap();
    let libvirt = rig.libvirt.as_mut().unwrap();
    if let Err(e) = libvirt.create(&domain, &xml) {
        panic!("virsh create: {e}");
    }
    let qemu_pid = libvirt.qemu_pid.expect("QEMU's pid file");
    let (uid, gid) = process_ids(qemu_pid);
    assert_eq!(
        (uid, gid),
        (
            user_ids(QEMU_USER).unwrap().0,
            group_id(QEMU_GROUP).unwrap()
        ),
        "QEMU runs as libvirt's unprivileged user and group"
    );
    log(&format!(
        "domain {domain} created; QEMU pid {qemu_pid} runs as {QEMU_USER}:{QEMU_GROUP}"
    ));
    let console = Console::connect(&rig.work.path().join("console.sock"), start);
    let console = rig.console.insert(console);
    let daemon = rig.daemon.as_mut().unwrap();
    daemon.wait_for_log("frontend connected", WAIT);

    // The guest's /init prints VUT-DONE just before it execs the shell.
    console.wait_for("the guest's shell", Instant::now() + BOOT_DEADLINE, |l| {
        l.contains("VUT-DONE").then_some(())
    });
    log("guest booted to its shell");
    let got = console.guest_ping(1, 3);
    assert_eq!(got, 3, "guest -> host ping: {got} of 3 answered");
    log("guest -> host: 3/3");
    let got = host_ping(&rig.ns, 3, 10);
    assert_eq!(got, 3, "host -> guest ping: {got} of 3 answered");
    log("host -> guest: 3/3");

    // The daemon dies without any clean-up; a new one takes over the same socket path.
    let mut old = rig.daemon.take().unwrap();
    old.kill();
    drop(old);
    // Restarted at once, as a supervisor would: the daemon waits for the dead one's tap itself.
    log("daemon killed (SIGKILL)");
    let restarted = Instant::now();
    let daemon = rig.daemon.insert(start_daemon(&socket, &rig.ns));
    daemon.wait_for_log("frontend connected", WAIT);
    daemon.wait_for_log("guest memory", WAIT);
    log(&format!(
        "restarted daemon: QEMU reconnected after {:.1}s",
        restarted.elapsed().as_secs_f64()
    ));
    let deadline = restarted + RECOVERY_DEADLINE;
    while host_ping(&rig.ns, 1, 1) != 1 {
        assert!(
            Instant::now() < deadline,
            "the guest did not answer the host's pings within {RECOVERY_DEADLINE:?} of the restart"
        );
    }
    log(&format!(
        "host -> guest answered {:.1}s after the restart",
        restarted.elapsed().as_secs_f64()
    ));
    let got = host_ping(&rig.ns, 3, 10);
    assert_eq!(got, 3, "host -> guest ping after the restart: {got} of 3");
    let got = rig.console.as_mut().unwrap().guest_ping(2, 3);
    assert_eq!(got, 3, "guest -> host ping after the restart: {got} of 3");
    log("after the restart: host -> guest 3/3, guest -> host 3/3");

    // Orderly end: the guest powers off (on_poweroff destroy), QEMU exits and libvirt drops the
    // transient domain; then the daemon exits 0 on SIGTERM.
    rig.console.as_mut().unwrap().send("poweroff -f");
    let daemon = rig.daemon.as_mut().unwrap();
    daemon.wait_for_log("frontend disconnected", WAIT);
    rig.libvirt.as_mut().unwrap().wait_gone(WAIT);
    log("guest powered off, domain gone");
    let st = daemon.terminate();
    assert_eq!(st.code(), Some(0), "daemon exit on SIGTERM");
    log("PASS");
}
