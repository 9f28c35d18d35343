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
//! Then `virsh save` to a file (a migration through the daemon's dirty log; QEMU exits) and
//! `virsh restore` (a new QEMU on the same daemon): both pings succeed again.
//!
//! Prerequisites (a missing one fails the test with the fix; `VUT_SKIP_LIBVIRT=1` or
//! `VUT_SKIP_QEMU=1` prints `SKIPPED: ...` and passes instead): root, PID 1 not systemd (with
//! systemd, libvirtd would register the domain with machined), `qemu-scripts/libvirt-tools.sh`
//! (libvirt 9.0, virsh, user libvirt-qemu) and `qemu-scripts/build-guest.sh` (QEMU 7.2, the guest).
//!
//! Run: `cargo test --test libvirt -- --nocapture` (as root).

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use vhost_user_tap_guest::kit::{
    cache_dir, guest_image, is_root, mac_string, on_path, one_vm_at_a_time, prerequisite,
    proc_status_field, qemu_present, run_within, Console, Daemon, GuestImage, Netns, Proc, TempDir,
    GUEST_IP, GUEST_MAC, HOST_IP, SYSTEM_QEMU, TAP,
};

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
/// `virsh save` of a 256 MiB guest to a file (a couple of seconds here).
const SAVE_DEADLINE: Duration = Duration::from_secs(60);

/// The guest image, or what is missing and how to fix it.
fn prerequisites() -> Result<GuestImage, String> {
    is_root()?;
    let pid1 = fs::read_to_string("/proc/1/comm").unwrap_or_default();
    if pid1.trim() == "systemd" {
        return Err(
            "PID 1 is systemd: the test's private libvirtd would register its domain \
                    with the host's machined; run it on a machine without systemd"
                .into(),
        );
    }
    let tools = "run qemu-scripts/libvirt-tools.sh";
    if !Path::new(LIBVIRTD).is_file() {
        return Err(format!(
            "libvirtd (package libvirt-daemon) missing at {LIBVIRTD}: {tools}"
        ));
    }
    qemu_present(Path::new(SYSTEM_QEMU))?;
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
    guest_image()
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
    proc: Proc,
    created: Vec<PathBuf>,
    domain: Option<String>,
    qemu_pid: Option<libc::pid_t>,
}

impl Libvirtd {
    fn start() -> Libvirtd {
        let root = TempDir::new("libvirt-state");
        let cache = cache_dir().join("libvirt-cache");
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
        let proc = Proc::spawn(
            "libvirtd",
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "sh", "-c", &script])
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        );
        let mut l = Libvirtd {
            root,
            proc,
            created,
            domain: None,
            qemu_pid: None,
        };
        // Poll with a deadline: libvirtd has no readiness notification without systemd.
        let deadline = Instant::now() + LIBVIRTD_DEADLINE;
        loop {
            if let Some(st) = l.proc.status() {
                panic!(
                    "libvirtd {} at start; its log:\n{}",
                    Proc::describe(st),
                    l.log()
                );
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
        run_within(
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

    /// `virsh restore` of a domain saved as `name`.
    fn restore(&mut self, name: &str, file: &Path) -> Result<(), String> {
        self.domain = Some(name.to_string());
        let r = self.virsh(&["restore", &file.display().to_string()], CREATE_DEADLINE);
        let pid_file = self.root.path().join(format!("run/qemu/{name}.pid"));
        self.qemu_pid = fs::read_to_string(pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok());
        r.map(drop).map_err(|e| {
            format!(
                "{e}
QEMU's log:
{}",
                self.qemu_log(name)
            )
        })
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
        // A clean stop; what is left of its process group when the handle goes is killed.
        self.proc.signal(libc::SIGTERM);
        self.proc.wait_until(Instant::now() + WAIT);
        // Mount points we made; empty (the mounts lived in libvirtd's namespace only).
        for d in self.created.iter().rev() {
            let _ = fs::remove_dir(d);
        }
    }
}

// --- the serial console --------------------------------------------------------------------

/// The guest pings the host `count` times; returns how many answers it got. The marker is built
/// by sed from ping's summary, so the echoed command line never matches it.
fn guest_ping(console: &mut Console, round: u32, count: u32) -> u32 {
    console.send(&format!(
        "ping -q -c {count} -i 0.2 -w {GUEST_PING_SECS} {HOST_IP} | \
         sed -n 's/.* \\([0-9]*\\) packets received.*/VUT-PING-{round}-\\1-END/p'"
    ));
    let prefix = format!("VUT-PING-{round}-");
    let deadline = Instant::now() + Duration::from_secs(GUEST_PING_SECS as u64 + 10);
    console.wait_for_line(&format!("guest ping round {round}"), deadline, |l| {
        let rest = &l[l.find(&prefix)? + prefix.len()..];
        rest[..rest.find("-END")?].parse().ok()
    })
}

// --- the test ------------------------------------------------------------------------------

/// Everything a run owns. Fields drop in order: the domain and libvirtd first, then the daemon,
/// the namespace (and the tap in it), the work directory.
struct Rig {
    libvirt: Option<Libvirtd>,
    daemon: Option<Daemon>,
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
        // libvirt's logs before its state goes with it; the daemon's once it has stopped (then
        // it is complete).
        if let Some(l) = self.libvirt.take() {
            eprintln!(
                "----- QEMU log -----\n{}\n----- libvirtd log -----\n{}",
                l.qemu_log(&self.domain),
                l.log()
            );
        }
        if let Some(d) = &mut self.daemon {
            d.stop();
            eprintln!("----- daemon log -----\n{}", d.log());
        }
        if let Some(c) = &self.console {
            eprintln!("----- guest console -----\n{}", c.transcript().join("\n"));
        }
    }
}

fn start_daemon(socket: &Path, ns: &Netns) -> Daemon {
    let d = Daemon::start_on(ns, TAP, socket, &["--socket-group", QEMU_GROUP]);
    let meta = fs::metadata(socket).unwrap();
    assert_eq!(
        (meta.gid(), meta.mode() & 0o777),
        (group_id(QEMU_GROUP).unwrap(), 0o660),
        "--socket-group {QEMU_GROUP}: the socket's group and mode"
    );
    d
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
    <emulator>{SYSTEM_QEMU}</emulator>
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
    let first = |key: &str| -> u32 {
        let value = proc_status_field(pid as u32, key);
        value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} {value:?} in /proc/{pid}/status"))
    };
    (first("Uid:"), first("Gid:"))
}

#[test]
fn libvirt_guest_reaches_the_host_both_ways_after_a_daemon_restart_and_a_save_and_restore() {
    let Some(image) = prerequisite(
        "libvirt",
        &["VUT_SKIP_LIBVIRT", "VUT_SKIP_QEMU"],
        prerequisites(),
    ) else {
        return;
    };
    let _vm = one_vm_at_a_time();
    let start = Instant::now();
    let log = |msg: &str| println!("[{:6.2}s] {msg}", start.elapsed().as_secs_f64());

    let ns = Netns::new("libvirt");
    // Persistent, as the systemd unit's prepare script makes it: it keeps its address and MAC
    // (the guest's static ARP entry) across daemon restarts.
    ns.add_tap(TAP, &["vnet_hdr"]);
    ns.configure_tap(TAP);
    let tap_mac = ns.mac(TAP);

    // The domain's files, readable by libvirt-qemu (libvirt chowns the kernel and initrd it
    // boots: copies, not the cache's files).
    let work = TempDir::new("libvirt");
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::copy(&image.kernel, work.path().join("vmlinuz")).unwrap();
    fs::copy(&image.initrd, work.path().join("initrd.img")).unwrap();
    let socket = work.path().join("vm1.sock");
    let domain = format!("vut-libvirt-{}", std::process::id());
    let mut rig = Rig {
        libvirt: None,
        daemon: None,
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
    let console = Console::connect(&rig.work.path().join("console.sock"), "libvirt", start);
    let console = rig.console.insert(console);
    let daemon = rig.daemon.as_mut().unwrap();
    daemon.wait_for_log("frontend connected", WAIT);

    // The guest's /init prints VUT-DONE just before it execs the shell.
    console.wait_for_line("the guest's shell", Instant::now() + BOOT_DEADLINE, |l| {
        l.contains("VUT-DONE").then_some(())
    });
    log("guest booted to its shell");
    let got = guest_ping(console, 1, 3);
    assert_eq!(got, 3, "guest -> host ping: {got} of 3 answered");
    log("guest -> host: 3/3");
    let got = rig.ns.ping(GUEST_IP, 3, 10).received;
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
    while rig.ns.ping(GUEST_IP, 1, 1).received != 1 {
        assert!(
            Instant::now() < deadline,
            "the guest did not answer the host's pings within {RECOVERY_DEADLINE:?} of the restart"
        );
    }
    log(&format!(
        "host -> guest answered {:.1}s after the restart",
        restarted.elapsed().as_secs_f64()
    ));
    let got = rig.ns.ping(GUEST_IP, 3, 10).received;
    assert_eq!(got, 3, "host -> guest ping after the restart: {got} of 3");
    let got = guest_ping(rig.console.as_mut().unwrap(), 2, 3);
    assert_eq!(got, 3, "guest -> host ping after the restart: {got} of 3");
    log("after the restart: host -> guest 3/3, guest -> host 3/3");

    // virsh save / restore: libvirt pauses the guest and has QEMU migrate it into a file, which
    // goes through the daemon's migration support (QEMU refuses to migrate a vhost-user NIC
    // without LOG_SHMFD); QEMU exits. The restore starts a new QEMU on the same daemon, which
    // resumes the rings from the saved indices and the used indices in guest memory.
    let save = rig.work.path().join("vm1.save");
    let save_arg = save.display().to_string();
    let saved = Instant::now();
    let libvirt = rig.libvirt.as_mut().unwrap();
    libvirt
        .virsh(&["save", &domain, &save_arg], SAVE_DEADLINE)
        .unwrap_or_else(|e| {
            panic!(
                "virsh save: {e}
QEMU's log:
{}",
                libvirt.qemu_log(&domain)
            )
        });
    libvirt.wait_gone(WAIT);
    rig.console = None;
    let daemon = rig.daemon.as_mut().unwrap();
    daemon.wait_for_log("frontend disconnected", WAIT);
    log(&format!(
        "virsh save: {:.1} MiB in {:.1}s, domain gone, daemon waiting",
        fs::metadata(&save).map(|m| m.len()).unwrap_or(0) as f64 / (1 << 20) as f64,
        saved.elapsed().as_secs_f64()
    ));
    let restored = Instant::now();
    let libvirt = rig.libvirt.as_mut().unwrap();
    libvirt
        .restore(&domain, &save)
        .unwrap_or_else(|e| panic!("virsh restore: {e}"));
    let daemon = rig.daemon.as_mut().unwrap();
    daemon.wait_for_log("frontend connected", WAIT);
    let console = rig.console.insert(Console::connect(
        &rig.work.path().join("console.sock"),
        "libvirt",
        start,
    ));
    let got = guest_ping(console, 3, 3);
    assert_eq!(got, 3, "guest -> host ping after the restore: {got} of 3");
    let got = rig.ns.ping(GUEST_IP, 3, 10).received;
    assert_eq!(got, 3, "host -> guest ping after the restore: {got} of 3");
    log(&format!(
        "virsh restore: both ways 3/3, {:.1}s after the restore began",
        restored.elapsed().as_secs_f64()
    ));

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
