//! Request/response latency: one 64-byte UDP frame out, its reply back, one outstanding at a
//! time, round trips timed with the monotonic clock (`Instant`, CLOCK_MONOTONIC) around a
//! `send` and the `recv` of the matching reply.
//!
//! - floor: client → tap → a thread in this process that waits for the tap with `poll`, reads a
//!   frame, swaps its addresses and writes it back (no daemon, no rings) → tap → client.
//! - daemon: client → tap → daemon → synthetic guest in echo mode (`--echo`: it sleeps on the
//!   RX interrupt, swaps the addresses, sends the reply on TX) → daemon → tap → client.
//! - daemon, busy poll: the same with `--busy-poll-us 50`.
//! - optional (VUT_LAT_CASES=...,guest-poll): busy poll and a guest spinning on its used ring
//!   (`--echo --poll`), a whole CPU each, on a 2-CPU machine the client's as well.
//!
//! The client is a UDP socket in the bench's namespace (the host stack, as a netperf UDP_RR
//! would use it), the same in every case. The echo swaps Ethernet, IPv4 and UDP source and
//! destination (`net::udp_echo_reply`), so the reply is an ordinary datagram for that socket;
//! AF_PACKET would leave the host stack out and measure less of what an application sees.
//!
//! Each payload carries a sequence number and the reply must carry it back; a reply that does
//! not come within VUT_LAT_TIMEOUT_MS (default 1000) is counted as a timeout, one that comes
//! after its deadline is counted as late and discarded. Before timing, the client waits (10 s at
//! most) for a first reply, so the guest has connected and posted its buffers, then discards
//! VUT_LAT_WARMUP (default 1000) round trips.
//!
//! `sudo cargo bench --bench latency` (root: taps and namespaces). VUT_LAT_COUNT (default 50000)
//! round trips per case, or VUT_LAT_SECS seconds per case instead; VUT_LAT_CASES picks cases
//! (default "floor,daemon,busy-poll"); VUT_LAT_DAEMON_ARGS and VUT_LAT_GUEST_ARGS add options to
//! the daemon and the synthetic guest. No CPU placement by default: the scheduler places the
//! client, the daemon and the guest; VUT_LAT_CPU=N puts the whole bench (client, floor thread,
//! daemon, guest) on CPU N, so every wake-up is on the waker's own CPU. Results: a markdown table
//! and target/vut-bench/latency.json, with the load average before each case.

use std::io::{self, Read};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vhost_user_tap::tap::Tap;
use vhost_user_tap_guest::kit::{
    cpu_ticks, daemon_bin, guest_bin, is_root, loadavg, pin, repo_root, Daemon, Netns, Proc,
    GUEST_IP, GUEST_PORT, HOST_IP, HOST_PORT,
};
use vhost_user_tap_guest::net::{udp_echo_reply, VIRTIO_NET_HDR_F_NEEDS_CSUM};

const TAP: &str = "vutl0";
/// 18 bytes of UDP payload: 14 + 20 + 8 + 18 = 60 bytes on the wire, 64 with the FCS.
const PAYLOAD: usize = 18;
const HDR_LEN: usize = 12;
/// Consecutive timeouts after which a case is broken, not slow.
const MAX_CONSECUTIVE_TIMEOUTS: u64 = 20;

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn env_args(name: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

#[derive(Clone, Copy)]
struct Settings {
    /// Round trips per case, unless `secs` is set.
    count: u64,
    secs: Option<f64>,
    warmup: u64,
    timeout: Duration,
}

/// What the client measured.
struct Sample {
    rtts_ns: Vec<u64>,
    timeouts: u64,
    warmup_timeouts: u64,
    late: u64,
    /// Rescheduling and function-call IPIs of the whole machine while timing.
    ipis: u64,
    /// The daemon's CPU time while timing, as a share of one CPU.
    daemon_cpu: f64,
}

/// Rescheduling and function-call IPIs so far, all CPUs (/proc/interrupts). A wake-up of a task
/// on another CPU costs one; on a VM that is an exit to the hypervisor.
fn ipis() -> u64 {
    let text = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
    text.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("RES:") || l.starts_with("CAL:"))
        .flat_map(|l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|w| w.parse::<u64>().ok())
        })
        .sum()
}

/// Round trips from a UDP socket at HOST_IP:HOST_PORT to GUEST_IP:GUEST_PORT, one at a time.
struct Client {
    sock: UdpSocket,
    seq: u64,
    late: u64,
    /// The socket's SO_RCVTIMEO, changed only when a wait needs another.
    rcv_timeout: Duration,
}

impl Client {
    fn new() -> Client {
        let sock = UdpSocket::bind((HOST_IP, HOST_PORT)).expect("bind the client's socket");
        sock.connect((GUEST_IP, GUEST_PORT))
            .expect("connect the client's socket");
        Client {
            sock,
            seq: 0,
            late: 0,
            rcv_timeout: Duration::ZERO,
        }
    }

    /// `recv` gives up after `t` (not zero).
    fn set_timeout(&mut self, t: Duration) {
        if self.rcv_timeout != t {
            self.sock.set_read_timeout(Some(t)).expect("SO_RCVTIMEO");
            self.rcv_timeout = t;
        }
    }

    /// One request and its reply: the round trip, or None when no reply came within `timeout`.
    fn round_trip(&mut self, timeout: Duration) -> Option<Duration> {
        self.seq += 1;
        let mut req = [0x5au8; PAYLOAD];
        req[..8].copy_from_slice(&self.seq.to_be_bytes());
        let mut reply = [0u8; 64];
        self.set_timeout(timeout);
        let start = Instant::now();
        self.sock.send(&req).expect("send a request");
        loop {
            match self.sock.recv(&mut reply) {
                Ok(n) if n == PAYLOAD && reply[..n] == req => return Some(start.elapsed()),
                Ok(n) => {
                    let seq = (n >= 8).then(|| u64::from_be_bytes(reply[..8].try_into().unwrap()));
                    assert!(
                        seq.is_some_and(|s| s < self.seq) && n == PAYLOAD,
                        "a reply that answers no request: {:?} (waiting for {})",
                        &reply[..n],
                        self.seq
                    );
                    self.late += 1;
                    // SO_RCVTIMEO restarts with every recv: wait only for what is left.
                    let left = timeout.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        return None;
                    }
                    self.set_timeout(left);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
    }

    /// Until the path answers: the guest may still be connecting or posting its buffers.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.round_trip(Duration::from_millis(100)).is_none() {
            assert!(Instant::now() < deadline, "no reply within 10 s");
        }
    }

    /// Wait until the path answers, warm up, then time round trips (and the CPU time of
    /// process `daemon`, if any).
    fn measure(&mut self, s: &Settings, daemon: Option<u32>) -> Sample {
        self.wait_ready();
        let warmup_timeouts = (0..s.warmup)
            .filter(|_| self.round_trip(s.timeout).is_none())
            .count() as u64;
        let late_before = self.late;
        let mut rtts_ns = Vec::with_capacity(s.count as usize);
        let (mut timeouts, mut consecutive) = (0, 0);
        let ipis_before = ipis();
        let cpu_before = daemon.map(cpu_ticks);
        let start = Instant::now();
        loop {
            let done = match s.secs {
                Some(secs) => start.elapsed().as_secs_f64() >= secs,
                None => rtts_ns.len() as u64 + timeouts >= s.count,
            };
            if done {
                break;
            }
            match self.round_trip(s.timeout) {
                Some(rtt) => {
                    rtts_ns.push(rtt.as_nanos() as u64);
                    consecutive = 0;
                }
                None => {
                    timeouts += 1;
                    consecutive += 1;
                    assert!(
                        consecutive < MAX_CONSECUTIVE_TIMEOUTS,
                        "{consecutive} requests in a row without a reply"
                    );
                }
            }
        }
        Sample {
            rtts_ns,
            timeouts,
            warmup_timeouts,
            late: self.late - late_before,
            ipis: ipis() - ipis_before,
            // Clock ticks of 10 ms: coarse, but the runs last seconds.
            daemon_cpu: daemon.zip(cpu_before).map_or(0.0, |(pid, t0)| {
                (cpu_ticks(pid) - t0) as f64 / 100.0 / start.elapsed().as_secs_f64()
            }),
        }
    }
}

/// The bench's namespace: a persistent tap with the host's address and a permanent neighbour
/// entry for the guest (no ARP on the way).
fn bench_netns() -> Netns {
    let ns = Netns::new("lat");
    ns.add_tap(TAP, &["vnet_hdr"]);
    ns.configure_tap(TAP);
    ns
}

/// The floor: a thread that answers every request on the tap itself, until `stop`.
fn floor_echo(ns: &Netns, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    ns.spawn_within(move || {
        let tap = Tap::open_queues(TAP, 1, 0).unwrap().pop().unwrap();
        tap.set_vnet_hdr_len(HDR_LEN).unwrap();
        // No offloads: the host computes the UDP checksum itself (a few ns at 60 bytes); a
        // partial one, left by an earlier daemon's setting, would be handled all the same.
        tap.set_offload(0).unwrap();
        let mut buf = vec![0u8; 65_600];
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let mut echoed = 0;
        while !stop.load(Ordering::Relaxed) {
            let iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            match tap.readv(&iov) {
                Ok(n) if n > HDR_LEN => {
                    let partial = buf[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
                    let gso = buf[1] != 0;
                    if !gso && udp_echo_reply(&mut buf[HDR_LEN..n], partial) {
                        buf[..HDR_LEN].fill(0);
                        let iov = [libc::iovec {
                            iov_base: buf.as_mut_ptr().cast(),
                            iov_len: n,
                        }];
                        tap.writev(&iov).expect("write a reply to the tap");
                        echoed += 1;
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The timeout only bounds how late `stop` is seen.
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                }
                Err(e) => panic!("read the tap: {e}"),
            }
        }
        echoed
    })
}

#[derive(serde::Serialize)]
struct Row {
    case: String,
    round_trips: usize,
    timeouts: u64,
    /// Requests of the warm-up without a reply (not in `timeouts`).
    warmup_timeouts: u64,
    /// Replies that came after their request's deadline (discarded).
    late: u64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    mean_us: f64,
    /// IPIs per round trip, whole machine (see `ipis`): about 2 when the client and the daemon's
    /// worker run on different CPUs.
    ipis_per_round_trip: f64,
    /// /proc/loadavg right before the case.
    loadavg_before: String,
    daemon_args: Vec<String>,
    guest_args: Vec<String>,
    /// CPU time of the daemon over the timed part, as a share of one CPU (0 for the floor).
    daemon_cpu: f64,
    /// Replies the echo sent (the floor thread's or the guest's count).
    echoed: u64,
    /// The guest's JSON report.
    guest: Option<serde_json::Value>,
}

/// Nearest-rank percentile of sorted `v`, in µs.
fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1e3
}

fn row(case: &str, mut s: Sample, load: String) -> Row {
    s.rtts_ns.sort_unstable();
    let v = &s.rtts_ns;
    Row {
        case: case.to_string(),
        round_trips: v.len(),
        timeouts: s.timeouts,
        warmup_timeouts: s.warmup_timeouts,
        late: s.late,
        p50_us: percentile_us(v, 50.0),
        p99_us: percentile_us(v, 99.0),
        p999_us: percentile_us(v, 99.9),
        max_us: v.last().map_or(f64::NAN, |&m| m as f64 / 1e3),
        mean_us: v.iter().sum::<u64>() as f64 / v.len().max(1) as f64 / 1e3,
        ipis_per_round_trip: s.ipis as f64 / (v.len() as u64 + s.timeouts).max(1) as f64,
        loadavg_before: load,
        daemon_args: Vec::new(),
        guest_args: Vec::new(),
        daemon_cpu: s.daemon_cpu,
        echoed: 0,
        guest: None,
    }
}

fn floor(ns: &Netns, s: Settings) -> Row {
    let load = loadavg();
    let stop = Arc::new(AtomicBool::new(false));
    let echo = floor_echo(ns, stop.clone());
    let sample = ns.within(move || Client::new().measure(&s, None));
    stop.store(true, Ordering::Relaxed);
    let echoed = echo.join().expect("the floor's echo thread");
    Row {
        echoed,
        ..row("floor: tap echo loop", sample, load)
    }
}

fn through_daemon(ns: &Netns, s: Settings, case: &str, daemon: &[&str], guest: &[&str]) -> Row {
    let load = loadavg();
    let mut daemon_args: Vec<String> = daemon.iter().map(|a| a.to_string()).collect();
    daemon_args.extend(env_args("VUT_LAT_DAEMON_ARGS"));
    let mut d = Daemon::start(
        ns,
        TAP,
        &daemon_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut guest_args: Vec<String> = ["--echo", "--json", "--queue-size", "256"]
        .iter()
        .chain(guest)
        .map(|a| a.to_string())
        .collect();
    guest_args.extend(env_args("VUT_LAT_GUEST_ARGS"));
    let mut g = Proc::spawn(
        "vhost-user-tap-guest",
        Command::new(guest_bin())
            .arg("--socket-path")
            .arg(&d.socket)
            .args(&guest_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let pid = d.pid();
    let sample = ns.within(move || Client::new().measure(&s, Some(pid)));
    g.signal(libc::SIGTERM);
    let status = g.wait_until(Instant::now() + Duration::from_secs(10));
    let mut out = String::new();
    if status.is_some() {
        g.take_stdout()
            .expect("piped")
            .read_to_string(&mut out)
            .unwrap();
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "the synthetic guest {}: {out}",
        status.map_or("did not stop within 10 s".into(), Proc::describe)
    );
    let report: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or("{}")).expect("the guest's JSON");
    assert!(d.terminate().success(), "{}", d.log());
    Row {
        echoed: report["echoed"].as_u64().unwrap_or(0),
        guest: Some(report),
        daemon_args,
        guest_args,
        ..row(case, sample, load)
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("latency: a benchmark; run it with `cargo bench --bench latency` (root)");
        return;
    }
    if let Err(why) = is_root() {
        eprintln!("latency benchmark: {why}");
        std::process::exit(1);
    }
    // Both binaries built before anything is timed.
    let _ = (daemon_bin(), guest_bin());
    let s = Settings {
        count: env("VUT_LAT_COUNT").unwrap_or(50_000),
        secs: env("VUT_LAT_SECS"),
        warmup: env("VUT_LAT_WARMUP").unwrap_or(1000),
        timeout: Duration::from_millis(env("VUT_LAT_TIMEOUT_MS").unwrap_or(1000)),
    };
    let cases = std::env::var("VUT_LAT_CASES").unwrap_or_else(|_| "floor,daemon,busy-poll".into());
    let want = |c: &str| cases.split(',').any(|x| x.trim() == c);
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let cpu: Option<usize> = env("VUT_LAT_CPU");
    let placement = match cpu {
        Some(cpu) => {
            // Before any thread or child exists: they all inherit it.
            pin(0, cpu);
            format!("everything on CPU {cpu}")
        }
        None => "no CPU placement".to_string(),
    };
    let load = loadavg();
    let ns = bench_netns();
    let mut rows = Vec::new();
    if want("floor") {
        rows.push(floor(&ns, s));
    }
    if want("daemon") {
        rows.push(through_daemon(&ns, s, "daemon", &[], &[]));
    }
    if want("busy-poll") {
        rows.push(through_daemon(
            &ns,
            s,
            "daemon, --busy-poll-us 50",
            &["--busy-poll-us", "50"],
            &[],
        ));
    }
    if want("guest-poll") {
        rows.push(through_daemon(
            &ns,
            s,
            "daemon, --busy-poll-us 50, guest polling",
            &["--busy-poll-us", "50"],
            &["--poll"],
        ));
    }
    drop(ns);

    println!(
        "\n{} per case after {} warm-up round trips, 64-byte frames, {cpus} CPUs, {placement}; \
         load average before: {load}",
        match s.secs {
            Some(secs) => format!("{secs} s"),
            None => format!("{} round trips", s.count),
        },
        s.warmup
    );
    println!("| case | round trips | p50 µs | p99 µs | p99.9 µs | max µs | timeouts | late | IPIs per round trip | daemon CPU | load before |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {} | {} | {:.1} | {:.0} % | {} |",
            r.case,
            r.round_trips,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.max_us,
            r.timeouts,
            r.late,
            r.ipis_per_round_trip,
            r.daemon_cpu * 100.0,
            r.loadavg_before
        );
    }
    let dir = repo_root().join("target/vut-bench");
    std::fs::create_dir_all(&dir).unwrap();
    let json = serde_json::json!({
        "cpus": cpus,
        "placement": placement,
        "loadavg_before": load,
        "count": s.count,
        "secs": s.secs,
        "warmup": s.warmup,
        "timeout_ms": s.timeout.as_millis() as u64,
        "cases": rows,
    });
    std::fs::write(
        dir.join("latency.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("raw numbers: {}", dir.join("latency.json").display());
    let lost: u64 = rows.iter().map(|r| r.timeouts + r.warmup_timeouts).sum();
    if lost > 0 {
        eprintln!(
            "latency benchmark: {lost} requests without a reply (the table's timeouts; warm-up \
             ones in latency.json)"
        );
        std::process::exit(1);
    }
}
