//! End-to-end benchmarks through the real daemon, each against the tap's own floor measured in
//! the same run (the machine is noisy; only same-run ratios mean something).
//!
//! - RX: UDP generator threads (sendmmsg, 64-byte frames) in a private network namespace → tap →
//!   daemon → synthetic guest recycling buffers as fast as it can (the XDP-drop equivalent, case
//!   `rx`), or reading every frame from a 256-entry ring, QEMU's default (case `rxread`).
//!   Floor: a plain loop reading the same tap under the same generator.
//! - TX: synthetic guest sending 64-byte frames as fast as it can → daemon → tap. Floor: a plain
//!   loop writing the same frames to the tap.
//!
//! The guest's rings hold 1024 entries, except in `rxread` (VUT_BENCH_QUEUE_SIZE; QEMU's rx_queue_size and
//! tx_queue_size go up to 1024 for vhost-user devices, the usual setting for throughput; 256 is
//! QEMU's default). TX uses pktgen-style buffers written once (`--tx-prefilled`), as the floor
//! loop writes one buffer.
//!
//! VUT_BENCH_PIN=1 places the thread that reads or writes the tap (the floor loop, or the daemon)
//! alone on CPU 1 and the generator and the synthetic guest on CPU 0. Off by default: on 2 CPUs
//! the guest then competes with the generator and both lose (measured: BENCHMARK-HISTORY.md).
//!
//! `sudo cargo bench --bench e2e` (root: taps and namespaces). VUT_BENCH_SECS (default 5) and
//! VUT_BENCH_RUNS (default 3) set the length; the median run is reported, with the spread of the
//! daemon/floor ratios of each interleaved pair of runs; VUT_BENCH_DAEMON_ARGS
//! passes options to the daemon (e.g. "--busy-poll-us 50"), VUT_BENCH_GUEST_ARGS to the synthetic
//! guest (e.g. "--migration-log": dirty logging on, as during a migration); VUT_BENCH_TCP_MB sizes the TCP runs. Results also go to
//! target/vut-bench/e2e.json. VUT_BENCH_CASES picks cases (default "rx,rxread,tx,tcp");
//! VUT_BENCH_VERBOSE=1 prints the daemon's final counters of every run.
//!
//! VUT_BENCH_PEER=dpdk runs the RX and TX cases through DPDK's testpmd too (vhost PMD + tap PMD,
//! io forwarding, one polling core; kit::dpdk), after each floor/daemon pair, in rows of their
//! own whose daemon columns hold testpmd's numbers.

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vhost_user_tap::netlink;
use vhost_user_tap::tap::Tap;

use vhost_user_tap_guest::kit::{
    cpu_ticks, daemon_bin, dpdk, guest_bin, loadavg, pin, tcp_through_daemon, Daemon, Netns,
    Testpmd,
};

const TAP: &str = "vutb0";
const HOST_IP: &str = "10.98.0.1";
const GUEST_IP: &str = "10.98.0.2";
const GUEST_MAC: &str = "52:54:00:12:34:56";
/// 18 bytes of UDP payload: 14 + 20 + 8 + 18 = 60 bytes on the wire, 64 with the FCS.
const PAYLOAD: usize = 18;

/// The network namespace of the bench: a persistent tap both the floor loops and the daemon
/// attach to, with the guest's address reachable through a permanent neighbour entry.
fn bench_netns(tap_flags: &[&str]) -> Netns {
    let ns = Netns::new("bench");
    ns.add_tap(TAP, tap_flags);
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
    ns.ip(&["link", "set", TAP, "up"]);
    ns.ip(&[
        "neigh",
        "replace",
        GUEST_IP,
        "lladdr",
        GUEST_MAC,
        "dev",
        TAP,
        "nud",
        "permanent",
    ]);
    ns
}

fn tap_counters(ns: &Netns) -> netlink::LinkCounters {
    ns.within(|| netlink::link_counters(netlink::ifindex(TAP).unwrap()).unwrap())
}

/// A raw packet socket bound to `dev` (in the calling thread's namespace).
fn packet_socket(dev: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = netlink::ifindex(dev).unwrap() as i32;
    // SAFETY: binds with a valid sockaddr_ll of the stated size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
    fd
}

/// A 60-byte IPv4/UDP frame from the host to the guest's MAC (64 bytes with the FCS).
fn udp_frame() -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0x52, 0x54, 0x00, 0x12, 0x34, 0x56]); // GUEST_MAC
    f.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, 0x00, 0x01]);
    f.extend_from_slice(&[0x08, 0x00]);
    let ip_len = (20 + 8 + PAYLOAD) as u16;
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 98, 0, 1, 10, 98, 0, 2,
    ];
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    let sum = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0x30, 0x39, 0x00, 0x09]);
    f.extend_from_slice(&((8 + PAYLOAD) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(60, 0x5a);
    f
}

/// The CPUs of the placement described at the top, or None when placement is off.
fn placement() -> Option<(usize, usize)> {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let on = cpus >= 2 && std::env::var("VUT_BENCH_PIN").is_ok_and(|v| v == "1");
    on.then_some((0, 1))
}

/// Senders: `threads` packet sockets blasting 64-byte frames with sendmmsg until stopped.
struct Generator {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Generator {
    fn start(ns: &Netns, threads: usize) -> Generator {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|_| {
                let (stop, sent) = (stop.clone(), sent.clone());
                ns.spawn_within(move || {
                    if let Some((side, _)) = placement() {
                        pin(0, side);
                    }
                    // AF_PACKET straight onto the tap: through the qdisc into tun, without the
                    // IP stack, so the generator outruns the reader as the floor requires.
                    let s = packet_socket(TAP);
                    const BATCH: usize = 64;
                    let payload = udp_frame();
                    let mut iov = [libc::iovec {
                        iov_base: payload.as_ptr() as *mut _,
                        iov_len: payload.len(),
                    }; BATCH];
                    // SAFETY: mmsghdr is plain data; zero is a valid value.
                    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
                    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
                        m.msg_hdr.msg_iov = v;
                        m.msg_hdr.msg_iovlen = 1;
                    }
                    while !stop.load(Ordering::Relaxed) {
                        // SAFETY: every header points at one live iovec of the stated length.
                        let n = unsafe {
                            libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0)
                        };
                        if n > 0 {
                            sent.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Generator {
            stop,
            sent,
            threads,
        }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.sent.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
struct Rate {
    pps: f64,
    /// Frames lost in tun (ring tail-drops) per second.
    tun_drops_pps: f64,
    daemon_drops: u64,
    /// Daemon CPU time per frame, ns (0 for the floor).
    cpu_ns_per_frame: f64,
    /// Synthetic guest CPU time per frame, ns (0 for the floor).
    guest_cpu_ns_per_frame: f64,
    /// The machine's state when the run began: the 1-minute load average (the bench's own
    /// threads included, so about 1-2 on an otherwise idle machine).
    load1: f64,
}

/// The 1-minute load average.
fn load1() -> f64 {
    loadavg()
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(f64::NAN)
}

/// CPU time (user + system) of the children this process has waited for, in ns.
fn children_cpu_ns() -> f64 {
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid rusage to fill.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let ns = |t: libc::timeval| t.tv_sec as f64 * 1e9 + t.tv_usec as f64 * 1e3;
    ns(ru.ru_utime) + ns(ru.ru_stime)
}

/// Whether a floor loop that began at `start` has run `secs`: the clock is read every 64th call
/// only, so the loop is the syscall and little else (a clock read costs about 5 % of a 64-byte
/// frame's read).
fn over(start: Instant, secs: f64, calls: &mut u64) -> bool {
    *calls += 1;
    *calls % 64 == 0 && start.elapsed().as_secs_f64() >= secs
}

fn floor_rx(ns: &Netns, threads: usize, secs: f64) -> Rate {
    let load1 = load1();
    let gen = Generator::start(ns, threads);
    thread::sleep(Duration::from_millis(300));
    let before = tap_counters(ns);
    let frames = ns.within(move || {
        if let Some((_, reader)) = placement() {
            pin(0, reader);
        }
        let tap = Tap::open_queues(TAP, 1, 0).unwrap().pop().unwrap();
        let mut buf = vec![0u8; 65_600];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let start = Instant::now();
        let (mut n, mut tries) = (0u64, 0u64);
        // Sleep when the tap is empty, as the daemon does (spinning would steal the
        // generator's core on a small machine).
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        while !over(start, secs, &mut tries) {
            // One iovec: `Tap::readv` makes it a plain read.
            match tap.readv(&iov) {
                Ok(_) => n += 1,
                Err(_) => {
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                }
            }
        }
        n as f64 / start.elapsed().as_secs_f64()
    });
    let after = tap_counters(ns);
    gen.stop();
    Rate {
        pps: frames,
        tun_drops_pps: (after.tx_dropped - before.tx_dropped) as f64 / secs,
        load1,
        ..Rate::default()
    }
}

/// The guest's ring size (see the top of the file).
fn queue_size() -> String {
    std::env::var("VUT_BENCH_QUEUE_SIZE").unwrap_or_else(|_| "1024".into())
}

/// Extra daemon options for a run, e.g. VUT_BENCH_DAEMON_ARGS="--busy-poll-us 50".
fn daemon_args() -> Vec<&'static str> {
    let args = std::env::var("VUT_BENCH_DAEMON_ARGS").unwrap_or_default();
    args.split_whitespace()
        .map(|a| &*Box::leak(a.to_string().into_boxed_str()))
        .collect()
}

/// Extra options for the synthetic guest, e.g. VUT_BENCH_GUEST_ARGS="--migration-log" (the
/// datapath's cost while a migration logs dirty pages).
fn guest_extra_args() -> Vec<&'static str> {
    let args = std::env::var("VUT_BENCH_GUEST_ARGS").unwrap_or_default();
    args.split_whitespace()
        .map(|a| &*Box::leak(a.to_string().into_boxed_str()))
        .collect()
}

/// The sum of the daemon's drop counters, read from its metrics once the guest has gone.
fn stop_daemon(mut d: Daemon) -> u64 {
    let c = d.counters_when_idle(0);
    if std::env::var("VUT_BENCH_VERBOSE").is_ok() {
        eprintln!("{c:?}");
    }
    assert!(d.terminate().success(), "{}", d.log());
    c.drops()
}

fn guest_json(args: &[&str]) -> serde_json::Value {
    let mut cmd = match placement() {
        Some((side, _)) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &side.to_string(), guest_bin()]);
            c
        }
        None => Command::new(guest_bin()),
    };
    let out = cmd.args(args).stderr(Stdio::inherit()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("{}")).expect("guest JSON")
}

/// Run the synthetic guest for `secs` with `guest_args` through the backend at `sock` (process
/// `pid`), then stop the backend with `stop`, which returns its drops. Returns the guest's frame
/// count of `counter` per second, the backend's CPU per frame and its drops, and the guest's run
/// time; `during` runs (e.g. reads kernel counters) right before and after the guest.
#[allow(clippy::too_many_arguments)]
fn through_backend<T>(
    load1: f64,
    pid: u32,
    sock: &str,
    secs: f64,
    counter: &str,
    guest_args: &[&str],
    mut during: impl FnMut() -> T,
    stop: impl FnOnce() -> u64,
) -> (Rate, f64, T, T) {
    let duration = secs.to_string();
    let mut args = vec!["--socket-path", sock, "--duration", &duration, "--json"];
    args.extend_from_slice(guest_args);
    args.extend(guest_extra_args());
    let before = during();
    let cpu0 = cpu_ticks(pid);
    let guest0 = children_cpu_ns();
    let v = guest_json(&args);
    if std::env::var("VUT_BENCH_VERBOSE").is_ok() {
        eprintln!("guest: {v}");
    }
    let guest1 = children_cpu_ns();
    let cpu1 = cpu_ticks(pid);
    let after = during();
    let drops = stop();
    let frames = v[counter].as_u64().unwrap_or(0) as f64;
    let elapsed = v["elapsed_secs"].as_f64().unwrap_or(secs);
    // /proc/<pid>/stat counts CPU time in clock ticks of 10 ms.
    let tick_ns = 1e9 / 100.0;
    let rate = Rate {
        pps: frames / elapsed,
        daemon_drops: drops,
        cpu_ns_per_frame: (cpu1 - cpu0) as f64 * tick_ns / frames.max(1.0),
        guest_cpu_ns_per_frame: (guest1 - guest0) / frames.max(1.0),
        load1,
        ..Rate::default()
    };
    (rate, elapsed, before, after)
}

/// `through_backend` with a backend started for the run: the daemon, or with `peer` DPDK's
/// testpmd in its place (its drops: frames it read and could not hand on, counted between the
/// guest's start and end).
fn through<T>(
    peer: bool,
    ns: &Netns,
    secs: f64,
    counter: &str,
    guest_args: &[&str],
    during: impl FnMut() -> T,
) -> (Rate, f64, T, T) {
    let load1 = load1();
    let (pid, sock, stop): (u32, String, Box<dyn FnOnce() -> u64>) = if peer {
        let mut t = Testpmd::start(ns, TAP);
        let (pid, sock) = (t.pid(), t.socket.to_str().unwrap().to_string());
        t.clear_stats();
        let stop = move || {
            let stats = t.stop_forwarding();
            t.quit();
            if std::env::var("VUT_BENCH_VERBOSE").is_ok() {
                eprintln!("{stats:?}");
            }
            stats.rx_dropped + stats.tx_dropped
        };
        (pid, sock, Box::new(stop))
    } else {
        let d = Daemon::start(ns, TAP, &daemon_args());
        if let Some((_, daemon_cpu)) = placement() {
            // The workers are spawned when the guest connects and inherit the main thread's
            // CPUs.
            pin(d.pid(), daemon_cpu);
        }
        let (pid, sock) = (d.pid(), d.socket.to_str().unwrap().to_string());
        (pid, sock, Box::new(move || stop_daemon(d)))
    };
    through_backend(load1, pid, &sock, secs, counter, guest_args, during, stop)
}

/// With VUT_BENCH_PEER=dpdk, a namespace for testpmd: DPDK's tap PMD opens its tap as a
/// multi-queue one, which tun refuses on the bench's single-queue tap, so testpmd gets a
/// multi-queue tap of the same name, set up the same way, in a namespace of its own.
fn peer_netns() -> Option<Netns> {
    match std::env::var("VUT_BENCH_PEER").as_deref() {
        Err(_) | Ok("") => None,
        Ok("dpdk") => {
            if let Err(why) = dpdk::testpmd_present() {
                eprintln!("e2e benchmark: VUT_BENCH_PEER=dpdk: {why}");
                std::process::exit(1);
            }
            Some(bench_netns(&["multi_queue"]))
        }
        Ok(other) => {
            eprintln!("e2e benchmark: VUT_BENCH_PEER={other}: the one peer is dpdk");
            std::process::exit(1);
        }
    }
}

/// Percent of one CPU `pid` uses over `secs` while no guest is connected.
fn idle_cpu_percent(pid: u32, secs: u64) -> f64 {
    let t0 = cpu_ticks(pid);
    // A measurement interval, not a wait for anything.
    thread::sleep(Duration::from_secs(secs));
    // Ticks are 10 ms: ticks per second are percent.
    (cpu_ticks(pid) - t0) as f64 / secs as f64
}

/// The synthetic guest of an RX case.
#[derive(Clone, Copy)]
enum RxGuest {
    /// Recycles buffers without reading the frames (XDP-drop equivalent), rings of
    /// VUT_BENCH_QUEUE_SIZE.
    Drop,
    /// Reads every frame, from a 256-entry ring (QEMU's default).
    Read,
}

fn daemon_rx(ns: &Netns, threads: usize, secs: f64, guest: RxGuest, peer: bool) -> Rate {
    let gen = Generator::start(ns, threads);
    let qs = queue_size();
    let args: &[&str] = match guest {
        RxGuest::Drop => &["--rx-drop", "--queue-size", &qs],
        RxGuest::Read => &["--queue-size", "256"],
    };
    let (rate, elapsed, before, after) =
        through(peer, ns, secs, "rx_frames", args, || tap_counters(ns));
    gen.stop();
    Rate {
        tun_drops_pps: (after.tx_dropped - before.tx_dropped) as f64 / elapsed,
        ..rate
    }
}

fn frame_64() -> Vec<u8> {
    // vnet header (12 zero bytes) + a 60-byte frame to a MAC nobody has: the host drops it
    // right after the tap, so the kernel's cost stays small and equal for both sides.
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&[
        0x02, 0, 0, 0, 0, 0x99, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x88, 0xb5,
    ]);
    f.resize(12 + 60, 0x5a);
    f
}

fn floor_tx(ns: &Netns, secs: f64) -> Rate {
    let load1 = load1();
    let pps = ns.within(move || {
        if let Some((_, writer)) = placement() {
            pin(0, writer);
        }
        let tap = Tap::open_queues(TAP, 1, 0).unwrap().pop().unwrap();
        tap.set_vnet_hdr_len(12).unwrap();
        let f = frame_64();
        let iov = [libc::iovec {
            iov_base: f.as_ptr() as *mut _,
            iov_len: f.len(),
        }];
        let start = Instant::now();
        let (mut n, mut tries) = (0u64, 0u64);
        while !over(start, secs, &mut tries) {
            // One iovec: `Tap::writev` makes it a plain write.
            if tap.writev(&iov).is_ok() {
                n += 1;
            }
        }
        n as f64 / start.elapsed().as_secs_f64()
    });
    Rate {
        pps,
        load1,
        ..Rate::default()
    }
}

fn daemon_tx(ns: &Netns, secs: f64, peer: bool) -> Rate {
    let qs = queue_size();
    let args = [
        "--tx-frames",
        "4000000000",
        "--tx-size",
        "60",
        "--tx-batch",
        "32",
        "--tx-dst-mac",
        "02:00:00:00:00:99",
        // pktgen-style: buffers written once and sent again (the floor sends one buffer too).
        "--tx-prefilled",
        "--queue-size",
        &qs,
    ];
    through(peer, ns, secs, "tx_frames", &args, || ()).0
}

/// The CPU's model name, for the record of the machine's state.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The middle element of `v` by `key` (runs are at least one).
fn median<T: Copy>(v: &[T], key: impl Fn(&T) -> f64) -> T {
    let mut v = v.to_vec();
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    v[v.len() / 2]
}

/// A table row from interleaved floor/daemon runs: medians, their ratio, and the spread of the
/// ratios of each floor run and the daemon run right after it (how much one invocation moves).
fn row(case: String, floor: Vec<Rate>, daemon: Vec<Rate>) -> Row {
    let mut pair_ratios: Vec<f64> = floor
        .iter()
        .zip(&daemon)
        .map(|(f, d)| d.pps / f.pps)
        .collect();
    pair_ratios.sort_by(f64::total_cmp);
    let pps = |r: &Rate| r.pps;
    let (f, d) = (median(&floor, pps), median(&daemon, pps));
    Row {
        case,
        ratio: d.pps / f.pps,
        floor: f,
        daemon: d,
        pair_ratios,
        floor_runs: floor,
        daemon_runs: daemon,
    }
}

#[derive(serde::Serialize)]
struct Row {
    case: String,
    floor: Rate,
    daemon: Rate,
    ratio: f64,
    /// daemon/floor of each interleaved pair of runs, sorted.
    pair_ratios: Vec<f64>,
    /// Every run, in order (floor run i came right before daemon run i): the machine's speed
    /// drifts between runs, and a comparison between commits needs to see it.
    floor_runs: Vec<Rate>,
    daemon_runs: Vec<Rate>,
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("e2e: a benchmark; run it with `cargo bench --bench e2e` (root)");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("e2e benchmark: needs root (taps, network namespaces)");
        std::process::exit(1);
    }
    // Both binaries built before anything is timed: a build during a run would count as the
    // guest's CPU (a child of this process) and load the machine.
    let _ = (daemon_bin(), guest_bin());
    let secs: f64 = std::env::var("VUT_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5.0);
    let runs: usize = std::env::var("VUT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let cases = std::env::var("VUT_BENCH_CASES").unwrap_or_else(|_| "rx,rxread,tx,tcp".into());
    let want = |c: &str| cases.split(',').any(|x| x.trim() == c);
    // First: a missing testpmd ends the bench before anything is set up.
    let peer = peer_netns().filter(|_| want("rx") || want("rxread") || want("tx"));
    let ns = bench_netns(&["vnet_hdr"]);
    let mut rows = Vec::new();
    let rx_cases = [
        ("rx", 1, RxGuest::Drop),
        ("rx", 2, RxGuest::Drop),
        ("rxread", 1, RxGuest::Read),
    ];
    for (_, threads, guest) in rx_cases.into_iter().filter(|c| want(c.0)) {
        let (mut f, mut d, mut p) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            f.push(floor_rx(&ns, threads, secs));
            d.push(daemon_rx(&ns, threads, secs, guest, false));
            if let Some(pns) = &peer {
                p.push(daemon_rx(pns, threads, secs, guest, true));
            }
        }
        let who = match guest {
            RxGuest::Drop => format!("dropping guest, {}-entry ring", queue_size()),
            RxGuest::Read => "reading guest, 256-entry ring".to_string(),
        };
        let case = format!("RX 64B, {threads} sender thread(s), {who}");
        rows.push(row(case.clone(), f.clone(), d));
        if peer.is_some() {
            rows.push(row(format!("{case} — DPDK testpmd"), f, p));
        }
    }
    if want("tx") {
        let (mut f, mut d, mut p) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            f.push(floor_tx(&ns, secs));
            d.push(daemon_tx(&ns, secs, false));
            if let Some(pns) = &peer {
                p.push(daemon_tx(pns, secs, true));
            }
        }
        rows.push(row("TX 64B".into(), f.clone(), d));
        if peer.is_some() {
            rows.push(row("TX 64B — DPDK testpmd".into(), f, p));
        }
    }
    // Idle: no guest connected, nothing to move.
    let idle = peer.as_ref().map(|pns| {
        let mut d = Daemon::start(&ns, TAP, &daemon_args());
        let daemon = idle_cpu_percent(d.pid(), 3);
        d.stop();
        let t = Testpmd::start(pns, TAP);
        let testpmd = idle_cpu_percent(t.pid(), 3);
        t.quit();
        (daemon, testpmd)
    });

    // TCP through the daemon: one stream each way, offloads on and off.
    let tcp_bytes: usize = std::env::var("VUT_BENCH_TCP_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
        << 20;
    let mut tcp = Vec::new();
    for offloads in [true, false].into_iter().filter(|_| want("tcp")) {
        let tag = |i: usize| format!("btcp{i}{}", u8::from(offloads));
        let runs: Vec<vhost_user_tap_guest::kit::TcpRun> = (0..runs)
            .map(|i| tcp_through_daemon(&tag(i), offloads, tcp_bytes))
            .collect();
        let med = |f: fn(&vhost_user_tap_guest::kit::TcpRun) -> f64| {
            median(&runs.iter().map(f).collect::<Vec<_>>(), |x| *x)
        };
        tcp.push((
            offloads,
            med(|r| r.host_to_guest_gbps),
            med(|r| r.guest_to_host_gbps),
        ));
    }

    println!(
        "\n{} s per run, median of {runs} runs, {} CPUs ({}), Linux {}, guest rings of {} unless \
         stated, {}",
        secs,
        thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        queue_size(),
        match placement() {
            Some((side, tap_cpu)) => format!(
                "tap reader/writer (floor loop or daemon) on CPU {tap_cpu}, generator and guest on CPU {side}"
            ),
            None => "no CPU placement".into(),
        }
    );
    println!(
        "| case | floor Mpps | daemon Mpps | daemon/floor | per-pair ratios | tun drops/s (floor, daemon) | daemon drops | CPU ns/frame (daemon, guest) | load (min–max) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let loads = r.floor_runs.iter().chain(&r.daemon_runs).map(|x| x.load1);
        let (lo, hi) = loads.fold((f64::MAX, f64::MIN), |(a, b), l| (a.min(l), b.max(l)));
        println!(
            "| {} | {:.3} | {:.3} | {:.2} | {:.2}–{:.2} | {:.0}, {:.0} | {} | {:.0}, {:.0} | {lo:.1}–{hi:.1} |",
            r.case,
            r.floor.pps / 1e6,
            r.daemon.pps / 1e6,
            r.ratio,
            r.pair_ratios[0],
            r.pair_ratios[r.pair_ratios.len() - 1],
            r.floor.tun_drops_pps,
            r.daemon.tun_drops_pps,
            r.daemon.daemon_drops,
            r.daemon.cpu_ns_per_frame,
            r.daemon.guest_cpu_ns_per_frame
        );
    }
    if let Some((daemon, testpmd)) = idle {
        println!(
            "rows \"— DPDK testpmd\": the daemon columns hold dpdk-testpmd's numbers (its drops: \
             frames it read and could not hand on); idle, 3 s without a guest: daemon {daemon:.0}% \
             of a CPU, testpmd {testpmd:.0}%"
        );
    }
    println!("\n| TCP, one stream | host → guest Gbit/s | guest → host Gbit/s |");
    println!("|---|---|---|");
    for (offloads, h2g, g2h) in &tcp {
        println!(
            "| offloads {} | {h2g:.2} | {g2h:.2} |",
            if *offloads { "on" } else { "off" }
        );
    }
    if let [(_, on_h, on_g), (_, off_h, off_g)] = tcp[..] {
        println!(
            "offloads on / off: host → guest {:.1}x, guest → host {:.1}x",
            on_h / off_h,
            on_g / off_g
        );
    }
    let dir = vhost_user_tap_guest::kit::repo_root().join("target/vut-bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("e2e.json"),
        serde_json::to_string_pretty(&rows).unwrap(),
    )
    .unwrap();
    println!("raw numbers: {}", dir.join("e2e.json").display());
}
