//! Hostile guests and frontends against the real daemon: whatever they write into their rings or
//! send over the socket, the daemon answers control messages promptly, keeps its other queue
//! pairs flowing, exits on SIGTERM within a second, and counts what it refused.
//!
//! Timing: on an idle machine a control message under attack is answered in a few milliseconds
//! (the README has the measurements); the tests allow `REPLY_LIMIT` because CI machines are
//! loaded, and print what they measured. Needs root; VUT_SKIP_ROOT=1 skips (prints SKIPPED).

use std::fs::File;
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_tap_guest::hostile::{self, Attack, HostileRing};
use vhost_user_tap_guest::kit::*;
use vhost_user_tap_guest::vhost_user::req;
use vhost_user_tap_guest::Guest;

/// The most a control message may take under attack here (100 ms on an idle machine is the
/// promise; CI runs other jobs beside this one).
const REPLY_LIMIT: Duration = Duration::from_millis(500);
/// SIGTERM to exit: a second is the promise; see `REPLY_LIMIT`.
const EXIT_LIMIT: Duration = Duration::from_secs(2);

/// A daemon with two queue pairs and a guest on both, 1024-entry rings.
fn two_pairs(test: &str, extra: &[&str]) -> Option<(Netns, Daemon, Guest, UdpSocket)> {
    if !root_or_skip(test) {
        return None;
    }
    let ns = Netns::new(test);
    let mut args = vec!["--queues", "2"];
    args.extend_from_slice(extra);
    let mut d = Daemon::start(&ns, TAP, &args);
    ns.configure_tap(TAP);
    let mut cfg = guest_config(&d.socket);
    cfg.queue_pairs = 2;
    cfg.queue_size = 1024;
    let g = d.connect(cfg);
    let host = ns.udp_socket(&format!("{HOST_IP}:{HOST_PORT}"));
    Some((ns, d, g, host))
}

/// Pair `pair` carries `n` datagrams guest → host, each checked byte for byte.
fn pair_to_host(ns: &Netns, host: &UdpSocket, g: &mut Guest, pair: usize, n: u64) {
    let spec = guest_to_host_spec(ns);
    host.set_read_timeout(Some(WAIT)).unwrap();
    let (mut frame, mut buf) = (Vec::new(), [0u8; 2048]);
    for seq in 0..n {
        spec.build(60 + (seq as usize * 29) % 1000, 0, seq, &mut frame)
            .unwrap();
        let deadline = Instant::now() + WAIT;
        while !g.pair_mut(pair).unwrap().send_frame(&frame).unwrap() {
            assert!(
                Instant::now() < deadline,
                "pair {pair}'s TX ring never drained"
            );
            g.wait_interrupt(2 * pair + 1, WAIT).unwrap();
        }
        let got = loop {
            match host.recv_from(&mut buf) {
                Ok((n, _)) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("datagram {seq} on pair {pair}: {e}"),
            }
        };
        assert_eq!(&buf[..got], &frame[14 + 20 + 8..], "datagram {seq} differs");
    }
}

/// A control message that makes the session stop and restart pair `pair`'s worker (the one
/// that wedged when a worker never returned to its event loop); returns how long it took.
fn restart_pair(g: &mut Guest, pair: u32) -> Duration {
    let t = Instant::now();
    g.set_vring_enable(2 * pair + 1, true)
        .expect("SET_VRING_ENABLE answered");
    t.elapsed()
}

/// SIGTERM exits 0 within `EXIT_LIMIT`; returns how long it took.
fn sigterm_within_limit(d: &mut Daemon) -> Duration {
    let t = Instant::now();
    d.signal(libc::SIGTERM);
    let st = d.wait_exit(EXIT_LIMIT);
    assert!(st.success(), "{st}: {}", d.log());
    t.elapsed()
}

/// Attack pair 0's TX ring while pair 1 carries traffic and control messages restart pair 0;
/// pair 0's counters at the end (`None`: skipped).
fn tx_attack(test: &str, attack: Attack, stopped_by_itself: bool) -> Option<Counters> {
    let (ns, mut d, mut g, host) = two_pairs(test, &[])?;
    let pair = g.pair(0).unwrap();
    let ring = HostileRing::new(
        g.memory().clone(),
        *pair.tx_ring().layout(),
        attack,
        pair.tx_ring().avail_idx(),
    );
    // SAFETY: dup of the guest's open kick eventfd; the copy is the attacker's.
    let kick = unsafe { File::from_raw_fd(libc::dup(pair.tx_kick_fd())) };
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = hostile::spawn(ring, kick, stop.clone());
    // A ring of nothing but garbage stops its pair by itself (within `GARBAGE_CHAINS`); one
    // with good chains among the garbage keeps it busy. Either way, with the attack going on:
    if stopped_by_itself {
        let deadline = Instant::now() + WAIT;
        while d.counters(0)["ring_errors"] == 0 {
            assert!(
                Instant::now() < deadline,
                "never stopped: {:?}",
                d.counters(0)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        worst = worst.max(restart_pair(&mut g, 0));
        pair_to_host(&ns, &host, &mut g, 1, 10);
    }
    let c = d.counters(0);
    // SIGTERM while the attack goes on.
    let exit = sigterm_within_limit(&mut d);
    stop.store(true, Ordering::Relaxed);
    let posted = attacker.join().unwrap();
    eprintln!(
        "{test}: control replies within {worst:?}, SIGTERM exit in {exit:?}, {posted} hostile \
         chains posted"
    );
    assert!(worst < REPLY_LIMIT, "a control message took {worst:?}");
    Some(c)
}

#[test]
fn a_tx_ring_full_of_long_zero_length_chains_wedges_nothing_and_is_stopped() {
    let attack = Attack::ZeroLengthChains {
        descs: 1024,
        writable: false,
    };
    let Some(c) = tx_attack("txzero", attack, true) else {
        return;
    };
    assert!(c["tx_dropped_bad_desc"] >= 1024, "{c:?}");
    assert!(
        c["ring_errors"] >= 1,
        "the ring of garbage was not stopped: {c:?}"
    );
    assert_eq!(c["tx_frames"], 0, "{c:?}");
}

#[test]
fn a_tx_ring_full_of_out_of_range_heads_wedges_nothing_and_is_stopped() {
    let Some(c) = tx_attack("txheads", Attack::OutOfRangeHeads, true) else {
        return;
    };
    assert!(c["tx_dropped_bad_desc"] >= 1024, "{c:?}");
    assert!(c["ring_errors"] >= 1, "{c:?}");
}

#[test]
fn a_tx_ring_of_mostly_garbage_keeps_the_control_plane_answering() {
    // Every 16th chain is a real frame: never 1024 rejected in a row, so the pair is not
    // stopped and the worker stays busy with it the whole time.
    let attack = Attack::MostlyZeroLength {
        descs: 1023,
        every: 16,
        buf: vm_memory::GuestAddress(60 << 20),
        len: 12 + 60,
        rx: false,
    };
    let Some(c) = tx_attack("txmostly", attack, false) else {
        return;
    };
    assert!(c["tx_dropped_bad_desc"] > 0 && c["tx_frames"] > 0, "{c:?}");
    assert_eq!(c["ring_errors"], 0, "{c:?}");
}

#[test]
fn a_blocking_call_eventfd_at_its_limit_wedges_nothing() {
    let Some((ns, mut d, mut g, host)) = two_pairs("callfd", &[]) else {
        return;
    };
    // A blocking eventfd one short of its maximum: a blocking write would never return.
    // SAFETY: eventfd(2) with flags 0 returns a new blocking eventfd.
    let fd = unsafe { libc::eventfd(0, 0) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    let mut call = unsafe { File::from_raw_fd(fd) };
    call.write_all(&0xffff_ffff_ffff_fffeu64.to_ne_bytes())
        .unwrap();
    // Both RX queues: the tap steers the flow below to one of them.
    for vring in [0, 2] {
        g.send_vring_fd_raw(req::SET_VRING_CALL, vring, &call)
            .expect("an eventfd is accepted as a call fd");
    }
    // RX interrupts through it all the time.
    let spray = ns.udp_socket(&format!("{HOST_IP}:0"));
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let sender = std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            let _ = spray.send_to(&payload(n as usize), format!("{GUEST_IP}:{GUEST_PORT}"));
            n += 1;
        }
        n
    });
    for p in 0..2 {
        g.pair_mut(p).unwrap().post_rx_buffers(usize::MAX).unwrap();
    }
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        // Keep RX going on both pairs: harvest what arrived, give the buffers back.
        for p in 0..2 {
            let q = g.pair_mut(p).unwrap();
            let n = q.poll_rx(|_, _| {}).unwrap();
            q.post_rx_buffers(n).unwrap();
        }
        worst = worst.max(restart_pair(&mut g, 0));
        pair_to_host(&ns, &host, &mut g, 1, 10);
    }
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    let rx = d.counters(0)["rx_frames"] + d.counters(1)["rx_frames"];
    let exit = sigterm_within_limit(&mut d);
    eprintln!(
        "callfd: control replies within {worst:?}, SIGTERM exit in {exit:?}, {rx} frames received"
    );
    assert!(worst < REPLY_LIMIT, "a control message took {worst:?}");
    assert!(rx > 0, "RX did not run");
}

/// CPU time (user + system) the daemon used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn kick_fds_that_are_not_eventfds_are_refused_or_stop_their_pair_without_spinning() {
    let Some((ns, mut d, mut g, host)) = two_pairs("kickfd", &[]) else {
        return;
    };
    // A socket whose peer has gone (readable forever, at EOF) and a pipe whose writer has:
    // refused when they arrive.
    let (sock, peer) = UnixStream::pair().unwrap();
    drop(peer);
    let e = g
        .send_vring_fd_raw(req::SET_VRING_KICK, 1, &sock)
        .unwrap_err();
    assert!(e.to_string().contains("SET_VRING_KICK"), "{e}");
    let mut fds = [0; 2];
    // SAFETY: pipe writes two new descriptors into `fds`.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fresh descriptors nothing else owns.
    let (rd, wr) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    drop(wr);
    assert!(g.send_vring_fd_raw(req::SET_VRING_KICK, 1, &rd).is_err());
    d.wait_for_log("not an eventfd", WAIT);
    // An epoll fd passes the inode check but does not read like an eventfd: the pair stops at
    // its first wake-up instead of spinning on it.
    // SAFETY: epoll_create1 returns a new descriptor.
    let ep = unsafe { File::from_raw_fd(libc::epoll_create1(libc::EPOLL_CLOEXEC)) };
    g.send_vring_fd_raw(req::SET_VRING_KICK, 1, &ep)
        .expect("an anonymous inode passes the first check");
    // Something to read on it, so it wakes the worker.
    let (a, b) = UnixStream::pair().unwrap();
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: 0,
    };
    // SAFETY: a valid epoll fd, a valid socket fd and an event that outlives the call.
    unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, a.as_raw_fd(), &mut ev) };
    (&b).write_all(b"x").unwrap();
    d.wait_for_log("kick fd misbehaves", WAIT);
    let before = cpu_ticks(d.pid());
    pair_to_host(&ns, &host, &mut g, 1, 20);
    std::thread::sleep(Duration::from_millis(500)); // the interval itself is what is measured
    let used = cpu_ticks(d.pid()) - before;
    assert!(used < 25, "the daemon spun: {used} ticks of CPU in ~0.5 s");
    let c = d.counters(0);
    assert!(c["ring_errors"] >= 1, "{c:?}");
    let rejected = scrape(d.metrics_path());
    let key = "vhost_user_tap_frontend_rejected_requests_total{request=\"SET_VRING_KICK\"}";
    assert_eq!(rejected[key], 2.0, "{rejected:?}");
    sigterm_within_limit(&mut d);
    drop((a, b));
}

#[test]
fn a_memory_file_shorter_than_its_region_costs_only_that_connection() {
    if !root_or_skip("shortmem") {
        return;
    }
    let ns = Netns::new("shortmem");
    let mut d = Daemon::start(&ns, TAP, &[]);
    ns.configure_tap(TAP);
    let mut cfg = guest_config(&d.socket);
    cfg.mem_table_overstate = 16 << 20;
    let Err(e) = Guest::connect(cfg) else {
        panic!("the lying table was accepted");
    };
    assert!(e.to_string().contains("SET_MEM_TABLE"), "{e}");
    d.wait_for_log("its file holds", WAIT);
    // The daemon lives on and serves the next frontend.
    let mut g = d.connect_guest();
    let host = ns.udp_socket(&format!("{HOST_IP}:{HOST_PORT}"));
    host_to_guest(&host, &mut g, 0..50);
    drop(g);
    let m = scrape(d.metrics_path());
    let key = "vhost_user_tap_frontend_rejected_requests_total{request=\"SET_MEM_TABLE\"}";
    assert_eq!(m[key], 1.0);
    sigterm_within_limit(&mut d);
}

/// A raw connection to the daemon, speaking vhost-user by hand.
fn raw(d: &Daemon) -> UnixStream {
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn header(code: u32, size: u32) -> Vec<u8> {
    [code.to_le_bytes(), 1u32.to_le_bytes(), size.to_le_bytes()].concat()
}

#[test]
fn a_frontend_that_stops_mid_message_loses_its_connection_not_the_daemon() {
    if !root_or_skip("partial") {
        return;
    }
    let ns = Netns::new("partial");
    let mut d = Daemon::start(&ns, TAP, &[]);
    let mut s = raw(&d);
    // SET_FEATURES announces 8 bytes of body and sends 3.
    s.write_all(&header(2, 8)).unwrap();
    s.write_all(&[1, 2, 3]).unwrap();
    d.wait_for_log("frontend connected", WAIT);
    let t = Instant::now();
    let mut buf = [0u8; 1];
    // The connection is closed after the message deadline: EOF.
    let n = loop {
        match s.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            r => break r.unwrap(),
        }
    };
    assert_eq!(n, 0, "connection still open");
    let closed = t.elapsed();
    d.wait_for_log("in the middle of a message", WAIT);
    // The next frontend is served.
    let g = d.connect_guest();
    drop(g);
    let exit = sigterm_within_limit(&mut d);
    eprintln!("partial message: connection closed after {closed:?}, SIGTERM exit in {exit:?}");
}

#[test]
fn sigterm_is_served_while_a_frontend_hangs_mid_message() {
    if !root_or_skip("partialterm") {
        return;
    }
    let ns = Netns::new("partialterm");
    let mut d = Daemon::start(&ns, TAP, &[]);
    let mut s = raw(&d);
    s.write_all(&header(2, 8)).unwrap();
    d.wait_for_log("frontend connected", WAIT);
    let exit = sigterm_within_limit(&mut d);
    eprintln!("SIGTERM with a message hanging: exit in {exit:?}");
}

#[test]
fn a_frontend_that_never_reads_its_replies_loses_its_connection_not_the_daemon() {
    if !root_or_skip("noread") {
        return;
    }
    let ns = Netns::new("noread");
    let mut d = Daemon::start(&ns, TAP, &[]);
    let mut s = raw(&d);
    s.set_nonblocking(true).unwrap();
    // GET_FEATURES in a loop, replies never read, until the socket buffers are full both ways.
    let msg = header(1, 0);
    let t = Instant::now();
    let mut sent = 0;
    while t.elapsed() < Duration::from_secs(3) {
        match s.write(&msg) {
            Ok(_) => sent += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(_) => break, // closed by the daemon
        }
    }
    d.wait_for_log("did not read its replies", WAIT);
    eprintln!("{sent} GET_FEATURES sent before the daemon gave up on the connection");
    let g = d.connect_guest();
    drop(g);
    sigterm_within_limit(&mut d);
}

#[test]
fn a_refused_ring_size_never_runs_and_says_so() {
    if !root_or_skip("vringnum") {
        return;
    }
    let ns = Netns::new("vringnum");
    let mut d = Daemon::start(&ns, TAP, &["--queue-size", "1024"]);
    ns.configure_tap(TAP);
    // Like DPDK's virtio-user: no reply asked for, so the frontend goes on regardless.
    let mut cfg = guest_config(&d.socket);
    cfg.queue_size = 2048;
    cfg.reply_ack = false;
    let mut g = d.connect(cfg);
    d.wait_for_log("does not run until", WAIT);
    // Neither direction runs: nothing taken from the tap, nothing sent.
    g.post_rx_buffers(usize::MAX).unwrap();
    let host = ns.udp_socket(&format!("{HOST_IP}:{HOST_PORT}"));
    send_to_guest(&host, 0..20);
    let spec = guest_to_host_spec(&ns);
    let mut frame = Vec::new();
    spec.build(100, 0, 0, &mut frame).unwrap();
    assert!(g.send_frame(&frame).unwrap());
    assert!(!g.wait_interrupt(0, Duration::from_millis(300)).unwrap());
    let c = d.counters(0);
    assert_eq!((c["rx_frames"], c["tx_frames"]), (0, 0), "{c:?}");
    let m = scrape(d.metrics_path());
    let key = "vhost_user_tap_frontend_rejected_requests_total{request=\"SET_VRING_NUM\"}";
    assert_eq!(m[key], 2.0, "both rings of the pair");
    drop(g);
    // The same ring size is fine with the default limit (a split ring's 32768).
    d.terminate_ok();
    let mut d = Daemon::start(&ns, TAP, &[]);
    ns.configure_tap(TAP);
    let mut cfg = guest_config(&d.socket);
    cfg.queue_size = 2048;
    let mut g = d.connect(cfg);
    host_to_guest(&host, &mut g, 0..20);
    drop(g);
    d.terminate_ok();
}

#[test]
fn a_staged_frame_gets_the_next_guests_header_layout() {
    if !root_or_skip("hdrswitch") {
        return;
    }
    let ns = Netns::new("hdrswitch");
    let mut d = Daemon::start(&ns, TAP, &[]);
    ns.configure_tap(TAP);
    let host = ns.udp_socket(&format!("{HOST_IP}:{HOST_PORT}"));
    // Guest 1: 12-byte headers, mergeable, buffers of 256 bytes, only two posted: a 1400-byte
    // datagram waits in the daemon's staging buffer for room that never comes.
    let mut cfg = guest_config(&d.socket);
    cfg.rx_buf_len = 256;
    let mut g = d.connect(cfg);
    g.post_rx_buffers(2).unwrap();
    let big = payload(227); // 16 + 227 * 37 % 1400 = 1415 bytes: the longest payload() makes
    host.send_to(&big, format!("{GUEST_IP}:{GUEST_PORT}"))
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while d.counters(0)["rx_staged"] == 0 {
        assert!(
            Instant::now() < deadline,
            "the datagram was never staged: {:?}",
            d.counters(0)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(g);
    // Guest 2: a legacy device, 10-byte headers, large buffers. It gets the staged datagram
    // with its own header layout, byte for byte.
    let mut cfg = guest_config(&d.socket);
    cfg.version_1 = false;
    cfg.mrg_rxbuf = false;
    let mut g = d.connect(cfg);
    assert_eq!(g.hdr_len(), 10);
    g.post_rx_buffers(usize::MAX).unwrap();
    let (got, other) = receive(&mut g, 1, false);
    assert_eq!(other, 0);
    assert!(got[0] == big, "the staged datagram arrived altered");
    drop(g);
    d.terminate_ok();
}
