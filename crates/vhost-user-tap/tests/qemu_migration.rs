//! Live migration and save/restore of a real QEMU guest whose NIC is served by the daemon.
//!
//! Topology (everything on the host side lives in a fresh network namespace):
//!
//! ```text
//!  netns vut-mig-<case>-<pid>-<n>
//!  br0 10.77.0.1/24 ─┬─ tap vutA <-> daemon A <-> QEMU a1, later a2  ┐ one guest,
//!                    └─ tap vutB <-> daemon B <-> QEMU b             ┘ 10.77.0.2
//! ```
//!
//! Live migration, there and back: the guest (`vut.mode=migrate` of
//! `qemu-scripts/build-guest.sh`, booted with `init_on_alloc=0`) boots on daemon A. The host
//! sends it a deterministic TCP stream; once the stream runs, the guest migrates to a QEMU on
//! daemon B and from there straight back to a new QEMU on daemon A, each time over a unix socket
//! with the migration bandwidth capped, so RAM goes over in several passes while the daemon
//! keeps writing frames into guest memory. The sender holds the stream's tail back until the
//! guest is back, so the stream always ends after both switches. A ping every 100 ms runs
//! throughout. The guest's byte count and SHA-256 of the stream must equal the sender's: a page
//! a daemon wrote without marking it in the dirty log reaches the destination stale and breaks
//! the hash (or TCP's checksum, which stalls the stream). The guest must answer pings on B and
//! back on A; each source daemon must have marked pages; daemon A must deliver again once the
//! guest is back (a daemon that served the VM before is a destination too: frames the bridge
//! sent to its tap after the first switch wait there). Reported per migration: QEMU's downtime
//! and total time, the longest gap between ping replies (the downtime as the network sees it),
//! the frames left unread in the source's tap.
//!
//! Save/restore, with the README's recipe (QEMU started by `qemu-scripts/run-vm.sh`, the save
//! by `qemu-scripts/migrate-vm.sh`): a stream to the guest, then the VM is saved to a file
//! (`migrate "exec:cat > FILE"`), the source QEMU quits, and a new QEMU restores it on daemon B
//! (`--incoming "exec:cat FILE"`): the guest answers pings and a second stream hashes right.
//! The NIC has `guest_announce=off` here, so QEMU asks daemon B to announce the guest
//! (SEND_RARP), which it must do; the live migration keeps GUEST_ANNOUNCE, with which QEMU
//! sends no SEND_RARP and the guest announces itself.
//!
//! Why `init_on_alloc=0`: Debian's kernel zeroes every page it allocates, and a zeroed page
//! makes QEMU send the NIC's receive buffers again at the end, which hides a backend that does
//! not log its writes.
//!
//! Prerequisites (a missing one fails the test with instructions; with `VUT_SKIP_QEMU=1` it
//! prints `SKIPPED: <reason>` and passes): root; the guest image of
//! `qemu-scripts/build-guest.sh` (with the migrate mode: an image built by an older script fails
//! the test with "rebuild"); QEMU 7.2 at /usr/bin/qemu-system-x86_64; QEMU 10.0.2 from
//! `qemu-scripts/fetch-qemu.sh`; `qemu-scripts/migrate-vm.sh` installs socat and jq itself when
//! they are missing. `VUT_MIG_SEED` fixes the stream's contents (the seed is
//! printed); `VUT_E2E_KEEP=1` keeps each run's work directory (QEMU's stderr, the saved VM).
//!
//! Run: `cargo test --test qemu_migration -- --nocapture --test-threads 1` (as root).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};
use vhost_user_tap_guest::kit::{
    cache_dir, guest_image, is_root, on_path, one_vm_at_a_time, prerequisite, qemu_10,
    qemu_present, qemu_version, repo_root, run_within, scrape, Console, Daemon, GuestImage,
    LinkStats, Netns, Proc, Qmp, TempDir,
};

const BRIDGE: &str = "br0";
const TAP_A: &str = "vutA";
const TAP_B: &str = "vutB";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const PREFIX_LEN: u8 = 24;
const GUEST_MAC: &str = "52:54:00:12:34:56";
const STREAM_PORT: u16 = 5001;
const MIB: u64 = 1 << 20;
const GUEST_MEM_MIB: u64 = 256;

/// The live-migration stream: its size (enough to run through both migrations: the TCG guest
/// takes about 3 MiB/s), the tail held back until the guest is back, the most it is sent at,
/// and how much must have gone before the first migration starts.
const LIVE_STREAM: u64 = 72 * MIB;
const LIVE_TAIL: u64 = 8 * MIB;
const LIVE_PACE: u64 = 4 * MIB;
const LIVE_RUNNING: u64 = 4 * MIB;
/// Migration bandwidth cap, bytes/s: RAM (mostly zero pages, sent cheaply) goes in several
/// passes while the stream rewrites the receive buffers.
const MAX_BANDWIDTH: u64 = 16 * MIB;
/// QEMU's downtime limit (its default is 300 ms).
const DOWNTIME_LIMIT_MS: u64 = 300;

/// The save/restore streams: run unpaced, one before the save and one after the restore.
const SAVE_STREAM_1: u64 = 8 * MIB;
const SAVE_STREAM_2: u64 = 16 * MIB;

/// Boot to the stream sink; ~7 s alone on this machine under TCG, more under load.
const BOOT_DEADLINE: Duration = Duration::from_secs(90);
const MIGRATION_DEADLINE: Duration = Duration::from_secs(150);
const STREAM_DEADLINE: Duration = Duration::from_secs(90);
const QUIT_DEADLINE: Duration = Duration::from_secs(20);

#[test]
fn a_qemu_7_2_guest_migrates_to_daemon_b_and_back_with_its_tcp_stream_intact() {
    live_migration(Path::new(SYSTEM_QEMU), "q72");
}

#[test]
fn a_qemu_10_0_2_guest_migrates_to_daemon_b_and_back_with_its_tcp_stream_intact() {
    live_migration(&qemu_10(), "q10");
}

#[test]
fn a_qemu_7_2_guest_saved_to_a_file_is_restored_on_another_daemon_and_its_streams_hash_right() {
    save_restore(Path::new(SYSTEM_QEMU), "q72");
}

#[test]
fn a_qemu_10_0_2_guest_saved_to_a_file_is_restored_on_another_daemon_and_its_streams_hash_right() {
    save_restore(&qemu_10(), "q10");
}

const SYSTEM_QEMU: &str = vhost_user_tap_guest::kit::SYSTEM_QEMU;

/// The guest image with the migrate mode, or what is missing and how to get it.
fn prerequisites(qemu: &Path) -> Result<GuestImage, String> {
    is_root()?;
    for (tool, package) in [("ip", "iproute2"), ("ping", "iputils-ping")] {
        if !on_path(tool) {
            return Err(format!("`{tool}` not found: apt-get install {package}"));
        }
    }
    let image = guest_image()?;
    // The image is cached by build-guest.sh's checksum: one built by a version of the script
    // without the migrate mode would only fail at boot, with "unknown vut.mode".
    let inputs = cache_dir().join("guest/inputs");
    let built = fs::read_to_string(&inputs).unwrap_or_default();
    let script = repo_root().join("qemu-scripts/build-guest.sh");
    let sum = Command::new("sha256sum")
        .arg(&script)
        .output()
        .map_err(|e| format!("sha256sum {}: {e}", script.display()))?;
    let sum = String::from_utf8_lossy(&sum.stdout);
    let sum = sum.split_whitespace().next().unwrap_or_default();
    if !built.contains(&format!("build-guest={sum}")) {
        return Err(format!(
            "the guest image in {} was built by another version of build-guest.sh \
             (this test needs its vut.mode=migrate): rebuild it with qemu-scripts/build-guest.sh",
            inputs.parent().expect("guest/").display()
        ));
    }
    qemu_present(qemu)?;
    Ok(image)
}

/// One QEMU process: its serial console, its QMP socket and where its stderr goes.
struct Vm {
    name: &'static str,
    proc: Proc,
    console: Console,
    qmp: Qmp,
    stderr: PathBuf,
}

/// Everything one run owns. Fields drop in declaration order: the QEMUs first, then the
/// daemons, the namespace (with the bridge) and the work directory.
struct Rig {
    tag: String,
    start: Instant,
    vms: Vec<Vm>,
    daemons: Vec<(&'static str, Daemon)>,
    ns: Netns,
    work: TempDir,
    qemu: PathBuf,
    image: GuestImage,
    /// Extra virtio-net-pci properties, the same on every QEMU of the run (a migration needs
    /// identical devices).
    device_props: &'static str,
    /// Start QEMU with qemu-scripts/run-vm.sh (and save with migrate-vm.sh) instead of a
    /// command line of the test's own: the scripts' recipes are what the README documents.
    scripts: bool,
}

impl Rig {
    fn new(
        qemu: &Path,
        image: GuestImage,
        tag: String,
        device_props: &'static str,
        scripts: bool,
    ) -> Rig {
        let keep = std::env::var("VUT_E2E_KEEP").as_deref() == Ok("1");
        let ns = Netns::new(&format!("mig-{tag}"));
        let work = TempDir::new(&format!("mig-{tag}")).kept_when(keep);
        let mut rig = Rig {
            start: Instant::now(),
            vms: Vec::new(),
            daemons: Vec::new(),
            ns,
            work,
            qemu: qemu.to_path_buf(),
            image,
            tag,
            device_props,
            scripts,
        };
        // A bridge with STP off forwards at once; the host's address sits on it, so both
        // daemons' taps reach the host the way two hosts' taps reach one switch.
        rig.ns
            .ip(&["link", "add", BRIDGE, "type", "bridge", "stp_state", "0"]);
        let host_cidr = format!("{HOST_IP}/{PREFIX_LEN}");
        rig.ns.ip(&["addr", "add", &host_cidr, "dev", BRIDGE]);
        rig.ns.ip(&["link", "set", BRIDGE, "up"]);
        for (name, tap) in [("A", TAP_A), ("B", TAP_B)] {
            let daemon = Daemon::start(&rig.ns, tap, &[]);
            rig.ns.ip(&["link", "set", tap, "master", BRIDGE]);
            rig.ns.ip(&["link", "set", tap, "up"]);
            rig.daemons.push((name, daemon));
        }
        rig.log("daemons A and B listening, their taps on the bridge");
        rig
    }

    fn log(&self, msg: &str) {
        println!(
            "[{} {:6.2}s] {msg}",
            self.tag,
            self.start.elapsed().as_secs_f64()
        );
    }

    fn daemon(&self, name: &str) -> &Daemon {
        &self
            .daemons
            .iter()
            .find(|(n, _)| *n == name)
            .expect("daemon")
            .1
    }

    fn vm(&mut self, name: &str) -> &mut Vm {
        self.vms
            .iter_mut()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("no QEMU {name}"))
    }

    /// Start QEMU `name` on daemon `daemon`; with `incoming` it waits for a migration stream.
    fn start_vm(&mut self, name: &'static str, daemon: &str, incoming: Option<&str>) {
        let append = format!(
            "console=ttyS0 quiet panic=-1 init_on_alloc=0 vut.mode=migrate \
             vut.ip={GUEST_IP}/{PREFIX_LEN} vut.peer={HOST_IP} vut.tcp_port={STREAM_PORT}"
        );
        let qmp_path = self.work.path().join(format!("qmp-{name}.sock"));
        let stderr = self.work.path().join(format!("qemu-{name}-stderr.log"));
        let socket = self.daemon(daemon).socket.clone();
        let mut device = format!(
            "virtio-net-pci,netdev=net0,mac={GUEST_MAC}{}",
            self.device_props
        );
        let version = qemu_version(&self.qemu);
        if version.0 < 8 {
            // QEMU 7.2 + vhost-user + TCG + MSI-X crashes QEMU (see qemu_e2e.rs and README).
            device.push_str(",vectors=0");
        }
        let mut cmd = if self.scripts {
            self.run_vm_command(&append, &socket, &qmp_path, incoming)
        } else {
            self.qemu_command(&append, &socket, &qmp_path, &device, incoming)
        };
        let err = fs::File::create(&stderr)
            .unwrap_or_else(|e| panic!("create {}: {e}", stderr.display()));
        cmd.stdout(Stdio::piped()).stderr(err);
        self.log(&format!(
            "starting QEMU {name} {}.{}.{} on daemon {daemon}{}{}",
            version.0,
            version.1,
            version.2,
            incoming.map_or(String::new(), |u| format!(", -incoming {u}")),
            if self.scripts { " (run-vm.sh)" } else { "" }
        ));
        let mut proc = Proc::spawn(&format!("qemu-{name}"), &mut cmd);
        let stdout = proc.take_stdout().expect("piped");
        let console = Console::new(stdout, &format!("{}-{name}", self.tag), self.start);
        let mut qmp = Qmp::connect(
            &qmp_path,
            &format!("{}-{name}", self.tag),
            Instant::now() + Duration::from_secs(30),
        );
        // MIGRATION events tell when a migration completes or fails.
        qmp.run(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        );
        self.vms.push(Vm {
            name,
            proc,
            console,
            qmp,
            stderr,
        });
    }

    /// QEMU's command line, spelled out by the test.
    fn qemu_command(
        &self,
        append: &str,
        socket: &Path,
        qmp_path: &Path,
        device: &str,
        incoming: Option<&str>,
    ) -> Command {
        let mem = format!("memory-backend-memfd,id=mem,size={GUEST_MEM_MIB}M,share=on");
        let mut cmd = Command::new(&self.qemu);
        cmd.args(["-accel", "tcg", "-m", &GUEST_MEM_MIB.to_string()])
            .args(["-smp", "1", "-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.image.kernel)
            .arg("-initrd")
            .arg(&self.image.initrd)
            .args(["-append", append])
            .args(["-object", &mem, "-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=chr0,path={}", socket.display()))
            .args(["-netdev", "vhost-user,id=net0,chardev=chr0"])
            .args(["-device", device])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if let Some(uri) = incoming {
            cmd.args(["-incoming", uri]);
        }
        cmd
    }

    /// `qemu-scripts/run-vm.sh` with what the test needs. The script's own QMP socket is for
    /// migrate-vm.sh (`script-qmp-<name>.sock` beside the test's); the test keeps one of its
    /// own, since a QMP socket serves one client at a time.
    fn run_vm_command(
        &self,
        append: &str,
        socket: &Path,
        qmp_path: &Path,
        incoming: Option<&str>,
    ) -> Command {
        let mut cmd = Command::new(repo_root().join("qemu-scripts/run-vm.sh"));
        cmd.arg("--qemu")
            .arg(&self.qemu)
            .args(["--accel", "tcg", "--mem", &format!("{GUEST_MEM_MIB}M")])
            .args(["--mac", GUEST_MAC])
            .arg("--kernel")
            .arg(&self.image.kernel)
            .arg("--initrd")
            .arg(&self.image.initrd)
            .args(["--append", append])
            .arg("--socket")
            .arg(socket)
            .arg("--qmp")
            .arg(script_qmp_path(qmp_path));
        if let Some(uri) = incoming {
            cmd.args(["--incoming", uri]);
        }
        cmd.args(["--", "-no-reboot", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        for prop in self.device_props.split(',').filter(|p| !p.is_empty()) {
            cmd.args(["-global", &format!("virtio-net-pci.{prop}")]);
        }
        cmd
    }

    /// Migrate QEMU `name` to `uri` and wait until it completes: QEMU's query-migrate then.
    fn migrate(&mut self, name: &str, uri: &str, bandwidth: Option<u64>) -> Value {
        let vm = self.vm(name);
        let mut params = json!({"downtime-limit": DOWNTIME_LIMIT_MS});
        if let Some(b) = bandwidth {
            params["max-bandwidth"] = json!(b);
        }
        vm.qmp.run("migrate-set-parameters", params);
        vm.qmp.run("migrate", json!({"uri": uri}));
        let deadline = Instant::now() + MIGRATION_DEADLINE;
        // A QEMU that was itself a migration's destination reports that migration's end as
        // well (after its RESUME): only an end after this migration's start counts.
        vm.qmp
            .wait_event("MIGRATION", deadline, |d| d["status"] == "setup");
        let ev = vm.qmp.wait_event("MIGRATION", deadline, |d| {
            matches!(
                d["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        });
        // QEMU 7.2 sends the event before it has filled in the times: a query right after it
        // can read total-time 0 (seen 3 times in 4). No event marks the times; poll briefly.
        let mut info = vm.qmp.run("query-migrate", json!({}));
        let until = Instant::now() + Duration::from_secs(5);
        while ev["data"]["status"] == "completed"
            && info["total-time"].as_u64().unwrap_or(0) == 0
            && Instant::now() < until
        {
            thread::sleep(Duration::from_millis(20));
            info = vm.qmp.run("query-migrate", json!({}));
        }
        assert_eq!(
            ev["data"]["status"], "completed",
            "[{}] migration of QEMU {name} to {uri} ended {}: {info}",
            self.tag, ev["data"]["status"]
        );
        info
    }

    /// Quit QEMU `name` through QMP and wait for its exit.
    fn quit(&mut self, name: &str) {
        let vm = self.vm(name);
        // QEMU may close QMP before answering: the exit is what counts.
        let _ = vm.qmp.execute("quit", json!({}));
        let st = vm
            .proc
            .wait_until(Instant::now() + QUIT_DEADLINE)
            .unwrap_or_else(|| panic!("QEMU {name} did not quit"));
        assert!(st.success(), "QEMU {name} {}", Proc::describe(st));
        self.vms.retain(|v| v.name != name);
        self.log(&format!("QEMU {name} quit"));
    }

    /// Wait on QEMU `vm`'s console for the sink of stream `n` to listen.
    fn wait_listening(&mut self, vm: &str, n: u32, deadline: Instant) {
        let marker = format!("VUT-STREAM-LISTENING n={n} ");
        self.vm(vm).console.wait_for(&marker, deadline);
    }

    /// Wait on QEMU `vm`'s console for stream `n`'s result: (bytes, sha256).
    fn stream_result(&mut self, vm: &str, n: u32, deadline: Instant) -> (u64, String) {
        let marker = format!("VUT-STREAM n={n} ");
        let line = self.vm(vm).console.wait_for_line(&marker, deadline, |l| {
            l.contains(&marker).then(|| l.to_string())
        });
        let bytes = field(&line, "bytes")
            .and_then(|b| b.parse().ok())
            .unwrap_or_else(|| panic!("no byte count in {line:?}"));
        let sum = field(&line, "sha256").unwrap_or_default().to_string();
        (bytes, sum)
    }

    fn counters(&self, daemon: &str) -> vhost_user_tap_guest::kit::Counters {
        self.daemon(daemon).counters(0)
    }
}

impl Drop for Rig {
    /// On failure: how each QEMU ended and its stderr, then the daemons' logs.
    fn drop(&mut self) {
        if !thread::panicking() {
            return;
        }
        let tag = self.tag.clone();
        for mut vm in self.vms.drain(..) {
            match vm.proc.status() {
                Some(st) => eprintln!("[{tag}] QEMU {} had {}", vm.name, Proc::describe(st)),
                None => eprintln!("[{tag}] QEMU {} was still running (killed now)", vm.name),
            }
            drop(vm.proc);
            let text = fs::read_to_string(&vm.stderr).unwrap_or_else(|e| format!("({e})"));
            eprintln!("----- [{tag}] QEMU {} stderr -----\n{text}", vm.name);
        }
        for (name, d) in &mut self.daemons {
            d.stop();
            eprintln!("----- [{tag}] daemon {name} log -----\n{}", d.log());
        }
        eprintln!(
            "[{tag}] FAILED after {:.1}s",
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// Packets `dev`'s root qdisc handed to the driver (for a tap: to tun).
fn qdisc_packets(ns: &Netns, dev: &str) -> u64 {
    let out = ns.exec(&["tc", "-s", "-j", "qdisc", "show", "dev", dev]);
    let v: Value = serde_json::from_str(&out).expect("tc -j output");
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|q| q["root"] == true)
        .filter_map(|q| q["packets"].as_u64())
        .sum()
}

/// Where run-vm.sh puts the QMP socket migrate-vm.sh uses.
fn script_qmp_path(test_qmp: &Path) -> PathBuf {
    let name = test_qmp.file_name().expect("a file name").to_string_lossy();
    test_qmp.with_file_name(format!("script-{name}"))
}

/// `key=value` from a marker line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn seed() -> u64 {
    match std::env::var("VUT_MIG_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|e| panic!("VUT_MIG_SEED={s:?}: {e}")),
        Err(_) => rand::rng().random(),
    }
}

/// How far a stream has come, from the sender's thread.
enum Progress {
    /// This many bytes are sent.
    Sent(u64),
    /// Everything up to the held-back tail is sent; the tail waits for the go.
    Holding(u64),
}

/// A TCP stream of `total` bytes from a seeded generator to the guest's sink, sent from inside
/// the namespace. With `pace` (bytes/s) it is rate limited; the last `tail` bytes wait until
/// `go` says so. Progress goes to `progress`; the result is (bytes sent, their SHA-256).
fn send_stream(
    ns: &Netns,
    seed: u64,
    total: u64,
    pace: Option<u64>,
    tail: u64,
    go: mpsc::Receiver<()>,
    progress: mpsc::Sender<Progress>,
) -> thread::JoinHandle<(u64, String)> {
    ns.spawn_within(move || {
        let dest = SocketAddrV4::new(GUEST_IP, STREAM_PORT);
        let mut sock = TcpStream::connect_timeout(&dest.into(), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect to the guest's sink {dest}: {e}"));
        // The sender's own hash, from the same bytes: sha256sum is the tool the guest uses too.
        let mut hasher = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sha256sum");
        let mut hin = hasher.stdin.take().expect("piped");
        let mut rng = StdRng::seed_from_u64(seed);
        let mut chunk = vec![0u8; 64 << 10];
        let start = Instant::now();
        let mut sent = 0u64;
        let mut reported = 0u64;
        let mut held = tail == 0;
        while sent < total {
            if !held && sent >= total - tail {
                let _ = progress.send(Progress::Holding(sent));
                go.recv().expect("the go for the stream's tail");
                held = true;
            }
            let n = chunk.len().min((total - sent) as usize);
            rng.fill_bytes(&mut chunk[..n]);
            sock.write_all(&chunk[..n])
                .unwrap_or_else(|e| panic!("sending the stream at byte {sent}: {e}"));
            hin.write_all(&chunk[..n]).expect("feeding sha256sum");
            sent += n as u64;
            if sent - reported >= MIB {
                reported = sent;
                let _ = progress.send(Progress::Sent(sent));
            }
            if let Some(rate) = pace {
                // Rate limiting, not synchronisation.
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    thread::sleep(wait);
                }
            }
        }
        sock.shutdown(std::net::Shutdown::Write)
            .expect("closing the stream");
        drop(hin);
        let out = hasher.wait_with_output().expect("sha256sum");
        let sum = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        (sent, sum)
    })
}

/// `ping -D -i 0.1` from the namespace to the guest, its replies collected as they come:
/// (wall-clock time of the reply in seconds, icmp_seq).
struct PingWatch {
    proc: Proc,
    replies: Arc<Mutex<Vec<(f64, u64)>>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl PingWatch {
    fn start(ns: &Netns) -> PingWatch {
        let mut cmd = ns.command("ping");
        cmd.args(["-n", "-D", "-i", "0.1", &GUEST_IP.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut proc = Proc::spawn("ping", &mut cmd);
        let out = proc.take_stdout().expect("piped");
        let replies = Arc::new(Mutex::new(Vec::new()));
        let r = replies.clone();
        let reader = thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // "[1733577000.123456] 64 bytes from 10.77.0.2: icmp_seq=12 ttl=64 time=1.2 ms"
                let at = line
                    .strip_prefix('[')
                    .and_then(|l| l.split_once(']'))
                    .and_then(|(t, _)| t.parse::<f64>().ok());
                let seq = field(&line, "icmp_seq").and_then(|s| s.parse::<u64>().ok());
                if let (Some(at), Some(seq), true) = (at, seq, line.contains("bytes from")) {
                    r.lock().unwrap().push((at, seq));
                }
            }
        });
        PingWatch {
            proc,
            replies,
            reader: Some(reader),
        }
    }

    /// Stop pinging; the replies.
    fn stop(mut self) -> Vec<(f64, u64)> {
        self.proc.signal(libc::SIGINT);
        let _ = self
            .proc
            .wait_until(Instant::now() + Duration::from_secs(5));
        self.proc.kill_group();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let v = self.replies.lock().unwrap().clone();
        v
    }
}

fn wall_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// The longest time between two consecutive ping replies within [from, to] (wall clock, s).
fn longest_gap(replies: &[(f64, u64)], from: f64, to: f64) -> f64 {
    let times: Vec<f64> = replies
        .iter()
        .map(|r| r.0)
        .filter(|t| (from..=to).contains(t))
        .collect();
    times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max)
}

fn ms(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// One live migration of the round trip, as seen from the test.
struct Hop {
    /// QEMU's `query-migrate` once it completed.
    info: Value,
    /// Wall-clock time of the completion (ping replies are stamped so).
    switched: f64,
    /// Pages the source's daemon marked dirty during the migration.
    marks: u64,
    /// How far the stream had come at the switch, and whether it was holding its tail.
    sent_at_switch: u64,
    holding: bool,
    /// The source's tap at the switch: its qdisc's count and tun's counters.
    handed_at_switch: u64,
    tap_at_switch: LinkStats,
}

/// Migrate QEMU `from` (on daemon `from_daemon`) live to QEMU `to`, which waits on `uri`, with
/// the bandwidth capped; wait until `to` runs and quit `from`.
fn hop(
    rig: &mut Rig,
    (from, from_daemon): (&str, &str),
    to: &str,
    uri: &str,
    progress: &mpsc::Receiver<Progress>,
) -> Hop {
    let marks_before = rig.counters(from_daemon)["dirty_pages_logged"];
    rig.log(&format!(
        "migrating {from} -> {to} over {uri}, max-bandwidth {} MiB/s, downtime-limit \
         {DOWNTIME_LIMIT_MS} ms",
        MAX_BANDWIDTH / MIB
    ));
    let start = Instant::now();
    let info = rig.migrate(from, uri, Some(MAX_BANDWIDTH));
    let switched = wall_now();
    let tap = tap_of(from_daemon);
    let handed_at_switch = qdisc_packets(&rig.ns, tap);
    let tap_at_switch = rig.ns.link_stats(tap);
    let mut sent_at_switch = 0;
    let mut holding = false;
    while let Ok(p) = progress.try_recv() {
        match p {
            Progress::Sent(n) => sent_at_switch = n,
            Progress::Holding(n) => {
                sent_at_switch = n;
                holding = true;
            }
        }
    }
    let marks = rig.counters(from_daemon)["dirty_pages_logged"] - marks_before;
    rig.log(&format!(
        "migration {from} -> {to} completed in {:.2}s: QEMU says downtime {} ms, total {} ms, \
         setup {} ms, {} RAM passes (dirty-sync-count), {} MiB transferred; daemon \
         {from_daemon} marked {marks} pages dirty meanwhile; the stream had sent {:.1} MiB{}",
        start.elapsed().as_secs_f64(),
        ms(&info, "downtime"),
        ms(&info, "total-time"),
        ms(&info, "setup-time"),
        info["ram"]["dirty-sync-count"],
        info["ram"]["transferred"].as_u64().unwrap_or(0) / MIB,
        sent_at_switch as f64 / MIB as f64,
        if holding {
            " and was holding its tail"
        } else {
            ", still running"
        }
    ));
    assert!(
        marks > 0,
        "daemon {from_daemon} marked no page dirty while {from} migrated with a stream running"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    rig.vm(to).qmp.wait_event("RESUME", deadline, |_| true);
    rig.log(&format!("{to} running"));
    // The source stays paused after a migration; it has nothing left to do.
    rig.quit(from);
    Hop {
        info,
        switched,
        marks,
        sent_at_switch,
        holding,
        handed_at_switch,
        tap_at_switch,
    }
}

fn tap_of(daemon: &str) -> &'static str {
    if daemon == "A" {
        TAP_A
    } else {
        TAP_B
    }
}

/// Frames the bridge still sent to a migration source's port after the switch (before the
/// guest's announce taught it the new one) wait unread in that tap's tun ring: its daemon has no
/// guest to give them to. Counted from the switch on: what the tap's qdisc handed to tun (GSO
/// segments counted singly, as the qdisc counts them) minus what the daemon still read and what
/// tun dropped. Valid until a guest runs on that daemon again (it then reads them: old TCP
/// segments, which the guest drops as duplicates).
fn unread_since(rig: &Rig, daemon: &str, h: &Hop) -> u64 {
    let tap = tap_of(daemon);
    let now = rig.ns.link_stats(tap);
    let handed = qdisc_packets(&rig.ns, tap) - h.handed_at_switch;
    let read = now.tx_packets - h.tap_at_switch.tx_packets;
    let dropped = now.tx_dropped - h.tap_at_switch.tx_dropped;
    let unread = handed.saturating_sub(read + dropped);
    rig.log(&format!(
        "tap {tap} since the switch: {handed} frames handed to tun, {read} read by daemon \
         {daemon}, {dropped} dropped by tun: {unread} left unread in tun's ring"
    ));
    unread
}

/// The live test: A -> B -> A with one TCP stream running across both migrations.
fn live_migration(qemu: &Path, label: &str) {
    let tag = format!("live-{label}");
    let Some(image) = prerequisite(&tag, &["VUT_SKIP_QEMU"], prerequisites(qemu)) else {
        return;
    };
    let _vm = one_vm_at_a_time();
    let mut rig = Rig::new(qemu, image, tag.clone(), "", false);

    rig.start_vm("a1", "A", None);
    let deadline = Instant::now() + BOOT_DEADLINE;
    rig.wait_listening("a1", 1, deadline);
    let ping = rig.ns.ping(&GUEST_IP.to_string(), 3, 20);
    assert_eq!(
        (ping.transmitted, ping.received),
        (3, 3),
        "the host cannot ping the guest before the migration: {}",
        ping.output
    );
    rig.log(&format!("guest up on daemon A: {}", ping.summary));

    let uri_b = format!("unix:{}", rig.work.path().join("to-b.sock").display());
    rig.start_vm("b", "B", Some(&uri_b));

    let pings = PingWatch::start(&rig.ns);
    let seed = seed();
    let (go_tx, go_rx) = mpsc::channel();
    let (prog_tx, prog_rx) = mpsc::channel();
    let sender = send_stream(
        &rig.ns,
        seed,
        LIVE_STREAM,
        Some(LIVE_PACE),
        LIVE_TAIL,
        go_rx,
        prog_tx,
    );
    rig.log(&format!(
        "stream of {} MiB at up to {} MiB/s to {GUEST_IP}:{STREAM_PORT} (VUT_MIG_SEED={seed}); \
         the last {} MiB wait until the guest is back on daemon A",
        LIVE_STREAM / MIB,
        LIVE_PACE / MIB,
        LIVE_TAIL / MIB
    ));
    let deadline = Instant::now() + STREAM_DEADLINE;
    loop {
        match prog_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Progress::Sent(n)) if n >= LIVE_RUNNING => break,
            Ok(Progress::Holding(n)) => panic!("the stream reached its tail ({n} bytes) early"),
            Ok(_) => {}
            Err(e) => panic!("the stream did not get going: {e}"),
        }
    }
    let to_b = hop(&mut rig, ("a1", "A"), "b", &uri_b, &prog_rx);

    // Back to daemon A, which served the guest before: its session starts afresh for a new
    // QEMU that resumes the rings where B left them.
    let unread_a = unread_since(&rig, "A", &to_b);
    let uri_a = format!("unix:{}", rig.work.path().join("to-a.sock").display());
    rig.start_vm("a2", "A", Some(&uri_a));
    let rx_a_before = rig.counters("A")["rx_frames"];
    let back = hop(&mut rig, ("b", "B"), "a2", &uri_a, &prog_rx);
    go_tx.send(()).expect("the sender waits for the go");

    let deadline = Instant::now() + STREAM_DEADLINE;
    let (bytes, sum) = rig.stream_result("a2", 1, deadline);
    let (sent, sent_sum) = sender.join().expect("the sender");
    rig.log(&format!(
        "guest received {bytes} bytes, sha256 {sum}; host sent {sent}, sha256 {sent_sum}"
    ));
    assert_eq!(
        (bytes, sum.as_str()),
        (sent, sent_sum.as_str()),
        "the stream arrived changed across the migrations (byte count, SHA-256)"
    );
    // A few more replies after the stream, then the ping's account.
    let after = rig.ns.ping(&GUEST_IP.to_string(), 3, 20);
    let replies = pings.stop();
    let end = wall_now();
    assert_eq!(
        after.received, 3,
        "the guest back on daemon A does not answer pings: {}",
        after.output
    );
    let between = replies
        .iter()
        .filter(|r| (to_b.switched..back.switched).contains(&r.0))
        .count();
    let after_back = replies.iter().filter(|r| r.0 > back.switched).count();
    assert!(
        between >= 5 && after_back >= 10,
        "ping replies: {between} while on daemon B, {after_back} after the return to A"
    );
    let mid = (to_b.switched + back.switched) / 2.0;
    let gap_b = longest_gap(&replies, 0.0, mid);
    let gap_a = longest_gap(&replies, mid, end);
    let unread_b = unread_since(&rig, "B", &back);

    let a = rig.counters("A");
    let b = rig.counters("B");
    let rarp: Vec<f64> = ["A", "B"]
        .iter()
        .map(|d| {
            scrape(rig.daemon(d).metrics_path())
                .get("vhost_user_tap_rarp_announces_total")
                .copied()
                .unwrap_or(-1.0)
        })
        .collect();
    rig.log(&format!(
        "daemon A: dirty_log_marks {} rx_frames {} rx_stops {}; daemon B: dirty_log_marks {} \
         rx_frames {} rx_stops {}; rarp_announces A {} B {} (the guest has GUEST_ANNOUNCE: \
         QEMU sends no SEND_RARP)",
        a["dirty_pages_logged"],
        a["rx_frames"],
        a["rx_stops"],
        b["dirty_pages_logged"],
        b["rx_frames"],
        b["rx_stops"],
        rarp[0],
        rarp[1]
    ));
    assert!(b["rx_frames"] > 0, "daemon B delivered no frame: {b:?}");
    assert!(
        a["rx_frames"] > rx_a_before,
        "daemon A delivered nothing once the guest was back: {a:?}"
    );
    for (name, h, gap, unread) in [
        ("A->B", &to_b, gap_b, unread_a),
        ("B->A", &back, gap_a, unread_b),
    ] {
        println!(
            "[{tag}] MIGRATION {label} {name}: downtime_ms={} total_ms={} ping_gap_ms={:.0} \
             passes={} dirty_marks={} stream_sent_at_switch_mib={:.1}{} unread_in_source_tap={unread}",
            ms(&h.info, "downtime"),
            ms(&h.info, "total-time"),
            gap * 1000.0,
            h.info["ram"]["dirty-sync-count"],
            h.marks,
            h.sent_at_switch as f64 / MIB as f64,
            if h.holding { " (holding its tail)" } else { "" },
        );
    }
    println!(
        "[{tag}] PASS in {:.1}s: stream_bytes={sent} stream_sha256={sent_sum} \
         ping_replies_on_b={between} ping_replies_back_on_a={after_back} rarp_announces={}",
        rig.start.elapsed().as_secs_f64(),
        rarp[0] + rarp[1]
    );
}

fn save_restore(qemu: &Path, label: &str) {
    let tag = format!("save-{label}");
    let Some(image) = prerequisite(&tag, &["VUT_SKIP_QEMU"], prerequisites(qemu)) else {
        return;
    };
    let _vm = one_vm_at_a_time();
    // Without GUEST_ANNOUNCE the guest cannot announce itself after the restore, so QEMU asks
    // the backend to (SEND_RARP): this run covers that path, the live one the other.
    let mut rig = Rig::new(qemu, image, tag.clone(), ",guest_announce=off", true);
    rig.start_vm("src", "A", None);
    let deadline = Instant::now() + BOOT_DEADLINE;
    rig.wait_listening("src", 1, deadline);

    let seed = seed();
    let unpaced = |rig: &Rig, seed: u64, total: u64| {
        let (_go_tx, go_rx) = mpsc::channel();
        let (prog_tx, _prog_rx) = mpsc::channel();
        send_stream(&rig.ns, seed, total, None, 0, go_rx, prog_tx)
            .join()
            .expect("the sender")
    };
    let (sent, sent_sum) = unpaced(&rig, seed, SAVE_STREAM_1);
    let deadline = Instant::now() + STREAM_DEADLINE;
    let got = rig.stream_result("src", 1, deadline);
    assert_eq!(
        (got.0, got.1.as_str()),
        (sent, sent_sum.as_str()),
        "stream 1 arrived changed"
    );
    rig.log(&format!(
        "stream 1: {sent} bytes, sha256 {sent_sum} (VUT_MIG_SEED={seed})"
    ));
    rig.wait_listening("src", 2, deadline);

    let file = rig.work.path().join("vm.state");
    let save_uri = format!("exec:cat > {}", file.display());
    // The documented recipe: migrate-vm.sh on run-vm.sh's QMP socket.
    let script_qmp = script_qmp_path(&rig.work.path().join("qmp-src.sock"));
    let out = run_within(
        Command::new(repo_root().join("qemu-scripts/migrate-vm.sh"))
            .arg("--qmp")
            .arg(&script_qmp)
            .args(["--to", &save_uri, "--timeout", "120"]),
        MIGRATION_DEADLINE,
    )
    .unwrap_or_else(|e| panic!("migrate-vm.sh: {e}"));
    let report = |key: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("migrate-vm.sh printed no {key}=: {out}"))
    };
    assert!(
        out.lines().any(|l| l == "status=completed"),
        "migrate-vm.sh: {out}"
    );
    // The test's own QMP sees the same end.
    let deadline = Instant::now() + Duration::from_secs(10);
    rig.vm("src").qmp.wait_event("MIGRATION", deadline, |d| {
        d["status"].as_str() == Some("completed")
    });
    let info = json!({
        "total-time": report("total_time_ms"),
        "downtime": report("downtime_ms"),
    });
    let size = fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    rig.log(&format!(
        "saved to {} ({} MiB) by migrate-vm.sh: {}",
        file.display(),
        size / MIB,
        out.lines()
            .filter(|l| l.contains('=') && !l.starts_with("migrate-vm:"))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    rig.quit("src");

    let restore_uri = format!("exec:cat {}", file.display());
    let restore_start = Instant::now();
    rig.start_vm("dst", "B", Some(&restore_uri));
    let deadline = Instant::now() + MIGRATION_DEADLINE;
    rig.vm("dst").qmp.wait_event("RESUME", deadline, |_| true);
    let restore_time = restore_start.elapsed();
    rig.log(&format!(
        "restored on daemon B in {:.2}s",
        restore_time.as_secs_f64()
    ));
    let ping = rig.ns.ping(&GUEST_IP.to_string(), 5, 30);
    assert!(
        ping.received >= 3,
        "the restored guest does not answer pings: {}",
        ping.output
    );
    let seed2 = seed.wrapping_add(1);
    let (sent, sent_sum) = unpaced(&rig, seed2, SAVE_STREAM_2);
    let deadline = Instant::now() + STREAM_DEADLINE;
    let got = rig.stream_result("dst", 2, deadline);
    assert_eq!(
        (got.0, got.1.as_str()),
        (sent, sent_sum.as_str()),
        "stream 2 arrived changed after the restore"
    );
    let b = rig.counters("B");
    assert!(b["rx_frames"] > 0, "daemon B delivered no frame: {b:?}");
    let rarp = scrape(rig.daemon("B").metrics_path())
        .get("vhost_user_tap_rarp_announces_total")
        .copied()
        .unwrap_or(-1.0);
    rig.log(&format!("daemon B: rarp_announces {rarp}"));
    // QEMU's announce after an incoming migration, for a guest without GUEST_ANNOUNCE, ends in
    // SEND_RARP (five rounds by default; 7.2 and 10.0.2 both send them).
    assert!(
        rarp >= 1.0,
        "QEMU restored a guest without GUEST_ANNOUNCE, yet daemon B wrote no RARP"
    );
    println!(
        "[{tag}] PASS in {:.1}s: SAVE-RESTORE {label} save_ms={} state_mib={} restore_ms={} \
         ping_after_restore={}/{} stream2_bytes={sent} stream2_sha256={sent_sum}",
        rig.start.elapsed().as_secs_f64(),
        ms(&info, "total-time"),
        size / MIB,
        restore_time.as_millis(),
        ping.received,
        ping.transmitted
    );
}
