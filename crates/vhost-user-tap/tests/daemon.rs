//! The real daemon binary in a throwaway network namespace with a real tap, driven by the
//! synthetic guest. Needs root; set VUT_SKIP_ROOT=1 to skip (prints SKIPPED).

use std::net::{SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use rand::Rng;
use vhost_user_tap_guest::kit::*;
use vhost_user_tap_guest::{Guest, GuestConfig, RawDesc, RawNext};

struct Rig {
    // Field order is drop order: the guest disconnects before the daemon and the namespace go.
    guest: Guest,
    daemon: Daemon,
    ns: Netns,
    host: UdpSocket,
}

fn rig(test: &str) -> Option<Rig> {
    rig_with(test, |_| {})
}

fn rig_with(test: &str, tweak: impl FnOnce(&mut GuestConfig)) -> Option<Rig> {
    rig_full(test, &[], tweak)
}

fn rig_full(test: &str, args: &[&str], tweak: impl FnOnce(&mut GuestConfig)) -> Option<Rig> {
    if !root_or_skip(test) {
        return None;
    }
    let ns = Netns::new(test);
    let mut daemon = Daemon::start(&ns, TAP, args);
    ns.configure_tap(TAP);
    let mut cfg = guest_config(&daemon.socket);
    tweak(&mut cfg);
    let guest = daemon.connect(cfg);
    let host = ns.udp_socket(&format!("{HOST_IP}:{HOST_PORT}"));
    Some(Rig {
        guest,
        daemon,
        ns,
        host,
    })
}

fn stop_and_counters(mut r: Rig) -> Counters {
    drop(r.guest);
    let c = r.daemon.counters_when_idle(0);
    let st = r.daemon.terminate();
    assert!(
        st.success(),
        "daemon exit status {st}; log:\n{}",
        r.daemon.log()
    );
    c
}

/// With the kit's guest: mergeable buffers and EVENT_IDX.
#[test]
fn host_datagrams_reach_the_guest_byte_exact_and_in_order() {
    let Some(mut r) = rig("h2g") else { return };
    r.guest.post_rx_buffers(usize::MAX).unwrap();
    const N: usize = 3000;
    // Send in slices the ring can absorb so this test is about integrity, not overload.
    let mut got = Vec::new();
    for chunk in (0..N).collect::<Vec<_>>().chunks(200) {
        send_to_guest(&r.host, chunk[0]..chunk[0] + chunk.len());
        let (g, _) = receive(&mut r.guest, chunk.len(), true);
        got.extend(g);
    }
    assert_eq!(got.len(), N);
    assert_in_order(&got, 0);
    let tap = r.ns.link_stats(TAP);
    let c = stop_and_counters(r);
    assert_eq!(
        c["rx_frames"], tap.tx_packets,
        "every frame read from the tap was delivered"
    );
    assert_eq!(c["rx_dropped_oversize"], 0);
}

/// The feature sets a guest may negotiate that change the RX path. The kit's guest negotiates
/// both; the tests below run their body once per set, each set a test of its own.
#[derive(Clone, Copy, Debug)]
struct RxFeatures {
    mrg_rxbuf: bool,
    event_idx: bool,
}

const MRG_RXBUF_AND_EVENT_IDX: RxFeatures = RxFeatures {
    mrg_rxbuf: true,
    event_idx: true,
};
const EVENT_IDX_ONLY: RxFeatures = RxFeatures {
    mrg_rxbuf: false,
    event_idx: true,
};
const MRG_RXBUF_ONLY: RxFeatures = RxFeatures {
    mrg_rxbuf: true,
    event_idx: false,
};
const NEITHER: RxFeatures = RxFeatures {
    mrg_rxbuf: false,
    event_idx: false,
};

impl RxFeatures {
    fn apply(self, cfg: &mut GuestConfig) {
        cfg.mrg_rxbuf = self.mrg_rxbuf;
        cfg.event_idx = self.event_idx;
    }
}

/// 1000 datagrams in slices of 100 arrive byte-exact and in order with `features` negotiated.
fn byte_exact_body(tag: &str, features: RxFeatures) {
    let Some(mut r) = rig_with(tag, |c| features.apply(c)) else {
        return;
    };
    r.guest.post_rx_buffers(usize::MAX).unwrap();
    let mut got = Vec::new();
    for start in (0..1000).step_by(100) {
        send_to_guest(&r.host, start..start + 100);
        got.extend(receive(&mut r.guest, 100, true).0);
    }
    assert_in_order(&got, 0);
    let c = stop_and_counters(r);
    assert_eq!(c["rx_dropped_oversize"], 0, "{features:?}");
}

#[test]
fn host_datagrams_reach_the_guest_byte_exact_and_in_order_without_mrg_rxbuf() {
    byte_exact_body("exact1", EVENT_IDX_ONLY);
}

#[test]
fn host_datagrams_reach_the_guest_byte_exact_and_in_order_without_event_idx() {
    byte_exact_body("exact2", MRG_RXBUF_ONLY);
}

#[test]
fn host_datagrams_reach_the_guest_byte_exact_and_in_order_without_mrg_rxbuf_or_event_idx() {
    byte_exact_body("exact3", NEITHER);
}

/// `iterations` rounds of: K buffers posted, M > K datagrams sent; exactly K are taken from the
/// tap and delivered in order, and the rest once the guest posts room for them.
fn stop_wake_body(tag: &str, args: &[&str], features: RxFeatures, iterations: usize) {
    let Some(mut r) = rig_full(tag, args, |c| features.apply(c)) else {
        return;
    };
    let mut rng = rand::rng();
    let mut next = 0usize;
    let mut taken = r.ns.link_stats(TAP).tx_packets;
    for it in 0..iterations {
        let k = rng.random_range(1..=32usize);
        let m = k + rng.random_range(1..=48usize);
        assert_eq!(r.guest.post_rx_buffers(k).unwrap(), k);
        send_to_guest(&r.host, next..next + m);
        let (got, other) = receive(&mut r.guest, k, false);
        assert_eq!(other, 0, "iteration {it}: unexpected non-test frames");
        assert_in_order(&got, next);
        // The guest has no buffer left, so the daemon must not have taken frame k+1 from the tap.
        let now = r.ns.link_stats(TAP).tx_packets;
        assert_eq!(
            now - taken,
            k as u64,
            "iteration {it}: K={k} buffers, M={m} frames: the daemon read more frames than it had \
             room for"
        );
        // Room for the rest: they arrive, in order, without loss.
        r.guest.post_rx_buffers(m - k).unwrap();
        let (rest, _) = receive(&mut r.guest, m - k, false);
        assert_in_order(&rest, next + k);
        next += m;
        taken += m as u64;
    }
    let tap = r.ns.link_stats(TAP);
    assert_eq!(tap.tx_dropped, 0, "the kernel dropped frames");
    let c = stop_and_counters(r);
    assert_eq!(c["rx_frames"], next as u64);
    assert_eq!(c["rx_dropped_oversize"], 0);
    assert!(c["rx_stops"] >= iterations as u64, "{c:?}");
    assert!(c["rx_wakes"] >= iterations as u64, "{c:?}");
}

/// VUT_STOPWAKE_ITERATIONS, or `default` (the kernel lab's quick mode runs fewer).
fn iterations(default: usize) -> usize {
    std::env::var("VUT_STOPWAKE_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// With mergeable buffers and EVENT_IDX, the set Linux guests negotiate.
#[test]
fn full_rx_ring_stops_reading_the_tap_and_resumes_on_kick_1000_times() {
    stop_wake_body("stopwake", &[], MRG_RXBUF_AND_EVENT_IDX, iterations(1000));
}

#[test]
fn full_rx_ring_stops_reading_the_tap_and_resumes_on_kick_without_mrg_rxbuf() {
    stop_wake_body("stopwake1", &[], EVENT_IDX_ONLY, iterations(300));
}

#[test]
fn full_rx_ring_stops_reading_the_tap_and_resumes_on_kick_without_event_idx() {
    stop_wake_body("stopwake2", &[], MRG_RXBUF_ONLY, iterations(300));
}

#[test]
fn full_rx_ring_stops_reading_the_tap_and_resumes_on_kick_without_mrg_rxbuf_or_event_idx() {
    stop_wake_body("stopwake3", &[], NEITHER, iterations(300));
}

#[test]
fn full_rx_ring_stops_reading_the_tap_and_resumes_on_kick_with_busy_polling() {
    stop_wake_body(
        "busypoll",
        &["--busy-poll-us", "200"],
        MRG_RXBUF_AND_EVENT_IDX,
        iterations(300),
    );
}

/// The worker reads a busy tap with its epoll registration dropped and registers again once a
/// read finds the tap empty; without that, a lone frame after a burst would wait for ever. The
/// burst waits in the kernel while the guest has no buffers, so the batch that takes it is a busy
/// one every round, and the first lone frame is read with the registration dropped.
#[test]
fn lone_frames_after_a_burst_are_delivered() {
    let Some(mut r) = rig("lone") else { return };
    let mut next = 0usize;
    for round in 0..50 {
        send_to_guest(&r.host, next..next + 64);
        assert_eq!(r.guest.post_rx_buffers(64 + 2).unwrap(), 64 + 2);
        let (got, other) = receive(&mut r.guest, 64, false);
        assert_eq!(other, 0, "round {round}: unexpected non-test frames");
        assert_in_order(&got, next);
        next += 64;
        for _ in 0..2 {
            send_to_guest(&r.host, next..next + 1);
            let (got, _) = receive(&mut r.guest, 1, false);
            assert_in_order(&got, next);
            next += 1;
        }
    }
    let tap = r.ns.link_stats(TAP);
    assert_eq!(tap.tx_dropped, 0, "the kernel dropped frames");
    let c = stop_and_counters(r);
    assert_eq!(c["rx_frames"], next as u64);
}

#[test]
fn a_frame_larger_than_the_posted_buffers_waits_and_is_delivered_whole() {
    // 256-byte mergeable buffers: a 1400-byte datagram needs six.
    let Some(mut r) = rig_with("staged", |c| c.rx_buf_len = 256) else {
        return;
    };
    let i = (0..).find(|i| payload(*i).len() > 1300).unwrap();
    r.guest.post_rx_buffers(2).unwrap();
    send_to_guest(&r.host, i..i + 1);
    // The daemon takes the frame (it cannot know its size before reading) and keeps it: nothing
    // reaches the guest, nothing is lost.
    // The kernel's counter is the only witness of the read; poll it with a deadline.
    let deadline = Instant::now() + WAIT;
    while r.ns.link_stats(TAP).tx_packets == 0 {
        assert!(Instant::now() < deadline, "the daemon never read the frame");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!r
        .guest
        .wait_interrupt(0, Duration::from_millis(300))
        .unwrap());
    assert_eq!(
        r.guest
            .poll_rx(|_, _| panic!("a partial frame was delivered"))
            .unwrap(),
        0
    );
    // More buffers: the guest's kick wakes the daemon and the whole frame arrives.
    r.guest.post_rx_buffers(8).unwrap();
    let (got, _) = receive(&mut r.guest, 1, false);
    assert_in_order(&got, i);
    let c = stop_and_counters(r);
    assert_eq!(c["rx_staged"], 1, "{c:?}");
    assert_eq!(c["rx_frames"], 1);
    assert_eq!(c["rx_dropped_oversize"], 0);
}

#[test]
fn guest_frames_reach_a_host_socket() {
    let Some(mut r) = rig("g2h") else { return };
    const N: u64 = 500;
    guest_to_host(&r.ns, &r.host, &mut r.guest, N, |seq| {
        60 + (seq as usize * 13) % 1400
    });
    let c = stop_and_counters(r);
    assert_eq!(c["tx_frames"], N);
    assert_eq!(c["tx_dropped_bad_desc"] + c["tx_dropped_tap_error"], 0);
}

#[test]
fn malformed_descriptors_are_rejected_and_traffic_goes_on() {
    let Some(mut r) = rig("baddesc") else { return };
    let buf = r.guest.alloc_scratch(4096, 64).unwrap().0;
    let outside = 1u64 << 40;
    const WRITE: u16 = 2;
    const NEXT: u16 = 1;
    let one = |addr, len, flags| RawDesc {
        addr,
        len,
        flags,
        next: RawNext::Follow,
    };
    let bad_rx: Vec<Vec<RawDesc>> = vec![
        vec![one(buf, 1536, 0)],         // read-only RX buffer
        vec![one(buf + 2048, 4, WRITE)], // smaller than the vnet header
        vec![one(outside, 1536, WRITE)], // outside guest memory
        vec![RawDesc {
            addr: buf,
            len: 512,
            flags: WRITE | NEXT,
            next: RawNext::Chain(0), // a descriptor loop
        }],
    ];
    let mut heads = Vec::new();
    for chain in &bad_rx {
        heads.push(r.guest.post_raw_rx_chain(chain).unwrap());
    }
    r.guest.post_rx_buffers(64).unwrap();
    send_to_guest(&r.host, 0..20);
    let (got, _) = receive(&mut r.guest, 20, true);
    assert_in_order(&got, 0);
    let done = r.guest.take_raw_completions();
    assert_eq!(
        done.len(),
        4,
        "every malformed RX chain came back: {done:?}"
    );
    assert!(done.iter().all(|c| c.len == 0 && heads.contains(&c.head)));

    let bad_tx: Vec<Vec<RawDesc>> = vec![
        vec![one(buf, 100, WRITE)], // device-writable TX buffer
        vec![one(buf, 4, 0)],       // smaller than the vnet header
        vec![one(outside, 100, 0)], // outside guest memory
        vec![RawDesc {
            addr: buf,
            len: 64,
            flags: NEXT,
            next: RawNext::Chain(0),
        }],
    ];
    for chain in &bad_tx {
        r.guest.post_raw_tx_chain(chain).unwrap();
    }
    let deadline = Instant::now() + WAIT;
    let mut tx_done = Vec::new();
    while tx_done.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "malformed TX chains not completed: {tx_done:?}"
        );
        r.guest.wait_interrupt(1, WAIT).unwrap();
        let _ = r.guest.send_frames(&[]);
        tx_done.extend(r.guest.take_raw_completions());
    }
    assert!(tx_done.iter().all(|c| c.len == 0));
    // Traffic still flows both ways.
    send_to_guest(&r.host, 20..40);
    let (got, _) = receive(&mut r.guest, 20, true);
    assert_in_order(&got, 20);
    let c = stop_and_counters(r);
    assert_eq!(c["rx_bad_desc"], 4, "{c:?}");
    assert_eq!(c["tx_dropped_bad_desc"], 4, "{c:?}");
    assert_eq!(c["ring_errors"], 0);
}

#[test]
fn each_of_three_reconnects_carries_traffic_and_leaks_no_fds_or_threads() {
    if !root_or_skip("reconnect") {
        return;
    }
    let ns = Netns::new("reconnect");
    let mut daemon = Daemon::start(&ns, TAP, &[]);
    ns.configure_tap(TAP);
    let host = ns.udp_socket(&format!("{HOST_IP}:{HOST_PORT}"));
    let resources = |pid: u32| {
        let count = |what: &str| {
            std::fs::read_dir(format!("/proc/{pid}/{what}"))
                .unwrap()
                .count()
        };
        (count("fd"), count("task"))
    };
    let idle = resources(daemon.pid());
    let mut next = 0;
    for cycle in 0..3 {
        let mut g = daemon.connect_guest();
        g.post_rx_buffers(usize::MAX).unwrap();
        send_to_guest(&host, next..next + 100);
        let (got, _) = receive(&mut g, 100, true);
        assert_in_order(&got, next);
        next += 100;
        if cycle == 1 {
            // An abrupt end: no GET_VRING_BASE, just a closed socket.
            drop(g);
        } else {
            g.disconnect().expect("clean disconnect");
        }
        daemon.wait_for_log("frontend disconnected", WAIT);
        assert_eq!(
            resources(daemon.pid()),
            idle,
            "cycle {cycle}: (fds, threads) after the disconnect differ from before any connection"
        );
    }
    assert_eq!(daemon.counters_when_idle(0)["rx_frames"], 300);
    let st = daemon.terminate();
    assert!(st.success(), "{st}; log:\n{}", daemon.log());
}

#[test]
fn sigterm_exits_zero_and_removes_the_socket() {
    if !root_or_skip("sigterm") {
        return;
    }
    let ns = Netns::new("sigterm");
    let mut daemon = Daemon::start(&ns, TAP, &[]);
    let socket = daemon.socket.clone();
    assert!(socket.exists());
    // Also while a frontend is connected.
    let _g = daemon.connect_guest();
    let st = daemon.terminate();
    assert_eq!(st.code(), Some(0), "log:\n{}", daemon.log());
    assert!(!socket.exists(), "socket {} left behind", socket.display());
    // The daemon created the tap, so the tap goes with it, at once: no ring (io_uring holds the
    // tap's file) keeps it alive after the exit, and a restart does not find it busy.
    assert!(
        !ns.has_link(TAP),
        "tap {TAP} outlived the daemon; log:\n{}",
        daemon.log()
    );
}

#[test]
fn slow_guest_receives_every_frame_the_daemon_took_from_the_tap() {
    let Some(mut r) = rig_with("overload", |c| c.queue_size = 64) else {
        return;
    };
    r.guest.post_rx_buffers(usize::MAX).unwrap();
    const N: usize = 20_000;
    let host = r.host.try_clone().unwrap();
    let sender = std::thread::spawn(move || send_to_guest(&host, 0..N));
    // A slow guest: harvest a few frames, then pause, so the ring runs full again and again.
    let mut got = Vec::new();
    let mut other = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sender = Some(sender);
    loop {
        assert!(
            Instant::now() < deadline,
            "guest stopped receiving ({} so far)",
            got.len()
        );
        r.guest
            .wait_interrupt(0, Duration::from_millis(200))
            .unwrap();
        let n = r
            .guest
            .poll_rx(|f, _| match udp_payload_to_guest(f) {
                Some(p) => got.push(p),
                None => other += 1,
            })
            .unwrap();
        r.guest.post_rx_buffers(n).unwrap();
        if sender.as_ref().is_some_and(|s| s.is_finished()) {
            sender.take().unwrap().join().unwrap();
        }
        if sender.is_none() {
            let tap = r.ns.link_stats(TAP);
            let received = (got.len() + other) as u64;
            if tap.tx_packets + tap.tx_dropped >= N as u64 && received == tap.tx_packets {
                break;
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    // Whatever the kernel dropped, what arrived is in order and intact.
    let mut last = None;
    for p in &got {
        let i = payload_index(p);
        assert_eq!(*p, payload(i));
        assert!(last.is_none_or(|l| i > l), "out of order at {i}");
        last = Some(i);
    }
    let tap = r.ns.link_stats(TAP);
    let received = (got.len() + other) as u64;
    let c = stop_and_counters(r);
    assert_eq!(
        received, tap.tx_packets,
        "frames the daemon took from the tap = frames the guest got"
    );
    assert_eq!(c["rx_frames"], tap.tx_packets);
    assert_eq!(c["rx_dropped_oversize"], 0, "daemon drops");
    assert!(
        c["rx_stops"] > 0,
        "the guest was never slower than the sender: {c:?}"
    );
    eprintln!(
        "overload: sent {N}, delivered {received}, kernel tail-drops {}, stops {}, wakes {}",
        tap.tx_dropped, c["rx_stops"], c["rx_wakes"]
    );
}

#[test]
fn a_deleted_tap_ends_the_daemon_with_a_clear_error() {
    let Some(mut r) = rig("tapgone") else { return };
    r.guest.post_rx_buffers(usize::MAX).unwrap();
    r.ns.ip(&["link", "del", TAP]);
    let st = r.daemon.wait_exit(WAIT);
    assert_eq!(st.code(), Some(1), "log:\n{}", r.daemon.log());
    let log = r.daemon.log();
    assert!(log.contains("tap vut0 failed"), "{log}");
    assert!(log.contains("was the tap deleted?"), "{log}");
}

#[test]
fn a_corrupted_avail_index_stops_the_pair_and_the_next_guest_is_served() {
    let Some(mut r) = rig("corrupt") else { return };
    r.guest.post_rx_buffers(8).unwrap();
    let (avail, kick) = {
        let p = r.guest.pair(0).unwrap();
        (p.rx_ring().layout().avail_ring, p.rx_kick_fd())
    };
    // avail.idx 1000 ahead of what was posted: impossible for a sane driver.
    let bogus: u16 = 1008;
    vm_memory::Bytes::store(
        r.guest.memory(),
        bogus.to_le(),
        vm_memory::GuestAddress(avail.0 + 2),
        std::sync::atomic::Ordering::Release,
    )
    .unwrap();
    // SAFETY: writing 8 bytes to the guest's kick eventfd, which it keeps open.
    let n = unsafe { libc::write(kick, 1u64.to_ne_bytes().as_ptr().cast(), 8) };
    assert_eq!(n, 8);
    r.daemon.wait_for_log("ring corrupted", WAIT);
    // The daemon lives on: the broken guest leaves, a new one is served.
    drop(r.guest);
    r.daemon.wait_for_log("frontend disconnected", WAIT);
    let mut g = r.daemon.connect_guest();
    g.post_rx_buffers(usize::MAX).unwrap();
    send_to_guest(&r.host, 0..50);
    let (got, _) = receive(&mut g, 50, true);
    assert_in_order(&got, 0);
    drop(g);
    assert_eq!(r.daemon.counters_when_idle(0)["ring_errors"], 1);
    let st = r.daemon.terminate();
    assert!(st.success());
}

#[test]
fn metrics_show_where_frames_went_and_move_with_traffic() {
    let dir = TempDir::new("metrics");
    let msock = dir.path().join("metrics.sock");
    let arg = format!("unix:{}", msock.display());
    // Stock mode on every kernel (the kernel lab runs this on 7.3 too): the overload below must
    // end in tun's tail drop, which IFF_BACKPRESSURE would turn into a blocked sender.
    let args = [
        "--metrics",
        &arg,
        "--qdisc",
        "pfifo",
        "--backpressure",
        "off",
    ];
    let Some(mut r) = rig_full("metrics", &args, |c| c.queue_size = 64) else {
        return;
    };
    let before = scrape(&msock);
    let names = [
        "vhost_user_tap_build_info{version=\"0.1.0\"}",
        "vhost_user_tap_frontend_connected",
        "vhost_user_tap_backpressure{tap=\"vut0\"}",
        "vhost_user_tap_rx_frames_total{queue=\"0\"}",
        "vhost_user_tap_tx_frames_total{queue=\"0\"}",
        "vhost_user_tap_rx_stops_total{queue=\"0\"}",
        "vhost_user_tap_rx_wakes_total{queue=\"0\"}",
        "vhost_user_tap_rx_kicks_total{queue=\"0\"}",
        "vhost_user_tap_rx_interrupts_total{queue=\"0\"}",
        "vhost_user_tap_daemon_dropped_frames_total{queue=\"0\",direction=\"rx\",reason=\"oversize\"}",
        "vhost_user_tap_tap_tx_packets_total{tap=\"vut0\"}",
        "vhost_user_tap_tap_tx_dropped_total{tap=\"vut0\"}",
        "vhost_user_tap_qdisc_dropped_packets_total{tap=\"vut0\",qdisc=\"pfifo\",reason=\"limit\"}",
        "vhost_user_tap_qdisc_backlog_packets{tap=\"vut0\",qdisc=\"pfifo\"}",
    ];
    for n in names {
        assert!(
            before.contains_key(n),
            "{n} missing from the scrape: {before:?}"
        );
    }
    assert_eq!(before["vhost_user_tap_frontend_connected"], 1.0);
    // Overload with a 64-entry ring the guest does not refill: tun must tail-drop (stock kernel).
    r.guest.post_rx_buffers(usize::MAX).unwrap();
    send_to_guest(&r.host, 0..3000);
    let (got, _) = receive(&mut r.guest, 64, false);
    assert_eq!(got.len(), 64);
    // The stop is counted right after the interrupt that delivered the 64th frame: wait for it.
    let deadline = Instant::now() + WAIT;
    let mid = loop {
        let m = scrape(&msock);
        if m["vhost_user_tap_rx_stops_total{queue=\"0\"}"] >= 1.0 {
            break m;
        }
        assert!(Instant::now() < deadline, "RX never stopped: {m:?}");
        std::thread::yield_now();
    };
    let rx = |m: &std::collections::HashMap<String, f64>| {
        m["vhost_user_tap_rx_frames_total{queue=\"0\"}"]
    };
    let taken = |m: &std::collections::HashMap<String, f64>| {
        m["vhost_user_tap_tap_tx_packets_total{tap=\"vut0\"}"]
    };
    let tun_drops = |m: &std::collections::HashMap<String, f64>| {
        m["vhost_user_tap_tap_tx_dropped_total{tap=\"vut0\"}"]
    };
    assert_eq!(rx(&mid) - rx(&before), 64.0);
    assert_eq!(
        taken(&mid) - taken(&before),
        64.0,
        "the daemon took only what it delivered"
    );
    assert!(
        tun_drops(&mid) > tun_drops(&before),
        "stock tun should have tail-dropped: {mid:?}"
    );
    // Drain: every frame the kernel queued reaches the guest, and the numbers add up.
    r.guest.post_rx_buffers(usize::MAX).unwrap();
    let end_deadline = Instant::now() + WAIT;
    let mut delivered = 64.0;
    loop {
        r.guest
            .wait_interrupt(0, Duration::from_millis(200))
            .unwrap();
        let n = r.guest.poll_rx(|_, _| {}).unwrap();
        r.guest.post_rx_buffers(n).unwrap();
        delivered += n as f64;
        let m = scrape(&msock);
        // A scrape can land between the daemon's tap reads and the publish that counts them
        // (taken > delivered for a moment), so "delivered = taken" is the settled state we wait
        // for; if it never settles, the deadline below fails the test with the numbers.
        if taken(&m) - taken(&before) + tun_drops(&m) - tun_drops(&before) >= 3000.0
            && rx(&m) - rx(&before) == delivered
            && rx(&m) == taken(&m)
        {
            let daemon_drops: f64 = m
                .iter()
                .filter(|(k, _)| k.starts_with("vhost_user_tap_daemon_dropped_frames_total"))
                .map(|(_, v)| v)
                .sum();
            assert_eq!(daemon_drops, 0.0);
            assert!(m["vhost_user_tap_rx_wakes_total{queue=\"0\"}"] >= 1.0);
            break;
        }
        assert!(
            Instant::now() < end_deadline,
            "numbers never added up: {m:?}"
        );
    }
}

#[test]
fn flows_spread_over_four_queue_pairs_all_arrive() {
    if !root_or_skip("mq") {
        return;
    }
    const PAIRS: usize = 4;
    let ns = Netns::new("mq");
    let mut daemon = Daemon::start(&ns, TAP, &["--queues", "4"]);
    ns.configure_tap(TAP);
    let mut cfg = guest_config(&daemon.socket);
    cfg.queue_pairs = PAIRS as u16;
    let mut g = daemon.connect(cfg);
    for p in 0..PAIRS {
        g.pair_mut(p).unwrap().post_rx_buffers(usize::MAX).unwrap();
    }
    // 64 flows (source ports), 50 datagrams each.
    let socks: Vec<UdpSocket> = (0..64)
        .map(|_| ns.udp_socket(&format!("{HOST_IP}:0")))
        .collect();
    let dst = SocketAddrV4::new(GUEST_IP.parse().unwrap(), GUEST_PORT);
    let mut per_pair = [0usize; PAIRS];
    let mut total = 0;
    for round in 0..50 {
        for s in &socks {
            s.send_to(&payload(round), dst).unwrap();
        }
        // Keep up so no ring overflows: this test is about steering, not overload.
        let want = (round + 1) * socks.len();
        let deadline = Instant::now() + WAIT;
        while total < want {
            assert!(
                Instant::now() < deadline,
                "{total} of {want} arrived: {per_pair:?}"
            );
            for (p, count) in per_pair.iter_mut().enumerate() {
                let pair = g.pair_mut(p).unwrap();
                pair.wait_rx_interrupt(Some(Duration::from_millis(1)))
                    .unwrap();
                let n = pair
                    .poll_rx(|f, _| assert!(udp_payload_to_guest(f).is_some()))
                    .unwrap();
                pair.post_rx_buffers(n).unwrap();
                *count += n;
                total += n;
            }
        }
    }
    assert_eq!(total, 50 * 64);
    assert!(
        per_pair.iter().all(|&n| n > 0),
        "every pair should carry some flows: {per_pair:?}"
    );
    drop(g);
    let delivered: u64 = (0..PAIRS)
        .map(|p| daemon.counters_when_idle(p)["rx_frames"])
        .sum();
    assert!(daemon.terminate().success());
    assert_eq!(delivered, 50 * 64);
    eprintln!("frames per pair: {per_pair:?}");
}

/// VUT_TCP_BYTES bytes each way (default 16 MiB; the kernel lab's quick mode moves less under
/// TCG), checked byte for byte.
fn tcp_body(tag: &str, offloads: bool) {
    if !root_or_skip(tag) {
        return;
    }
    let bytes = std::env::var("VUT_TCP_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16 << 20);
    let r = tcp_through_daemon(tag, offloads, bytes);
    eprintln!("TCP offloads={offloads}: {r:?}");
}

/// Checksum and TSO offloads negotiated both ways: the frames cross as GSO super-frames.
#[test]
fn tcp_through_the_daemon_arrives_intact_with_offloads() {
    tcp_body("tcpo", true);
}

#[test]
fn tcp_through_the_daemon_arrives_intact_without_offloads() {
    tcp_body("tcpn", false);
}

#[test]
fn malformed_frontend_messages_close_that_connection_only() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    if !root_or_skip("badmsg") {
        return;
    }
    let ns = Netns::new("badmsg");
    let mut daemon = Daemon::start(&ns, TAP, &[]);
    let header = |req: u32, flags: u32, size: u32| {
        let mut h = Vec::new();
        for w in [req, flags, size] {
            h.extend_from_slice(&w.to_le_bytes());
        }
        h
    };
    for (what, bytes) in [
        ("version 0", header(1, 0, 0)),
        ("a reply flag on a request", header(1, 0x5, 0)),
        (
            "a body larger than the protocol allows",
            header(2, 0x1, 1 << 20),
        ),
    ] {
        let mut s = UnixStream::connect(&daemon.socket).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(&bytes).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            s.read(&mut buf).unwrap(),
            0,
            "{what}: the daemon should close the connection"
        );
        daemon.wait_for_log("frontend protocol error", WAIT);
    }
    // GET_FEATURES still answered on a fresh connection, then a real guest is served.
    let mut s = UnixStream::connect(&daemon.socket).unwrap();
    s.write_all(&header(1, 0x1, 0)).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(reply[4..8].try_into().unwrap()), 0x5);
    drop(s);
    ns.configure_tap(TAP);
    let mut g = daemon.connect_guest();
    g.post_rx_buffers(usize::MAX).unwrap();
    let host = ns.udp_socket(&format!("{HOST_IP}:{HOST_PORT}"));
    send_to_guest(&host, 0..10);
    let (got, _) = receive(&mut g, 10, true);
    assert_in_order(&got, 0);
    drop(g);
    assert!(daemon.terminate().success());
}

/// What this kernel should offer the daemon, by version: the lab runs this test on 5.10, 6.1,
/// 6.12 and 7.3 (qemu-scripts/kernel-lab.sh), the suite on this machine's kernel. Each entry is
/// the first kernel that has the feature (README, "Supported kernels").
fn expected_support(release: &str) -> Vec<(&'static str, bool)> {
    let v = vhost_user_tap::kernel::version(release).expect("kernel version");
    let io_uring_disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .is_ok_and(|s| s.trim() != "0");
    vec![
        ("tun_multi_queue", true),
        ("tun_offload_csum", true),
        ("tun_offload_tso", true),
        ("tun_offload_ecn", true),
        ("tun_offload_ufo", true),
        ("tun_offload_uso", v >= (6, 2)),
        ("tun_backpressure", v >= (7, 3)),
        ("io_uring", !io_uring_disabled),
        ("io_uring_tap_writes", !io_uring_disabled && v >= (6, 4)),
    ]
}

#[test]
fn startup_report_matches_what_this_kernel_supports() {
    use virtio_bindings::virtio_net::*;
    let dir = TempDir::new("report");
    let msock = dir.path().join("metrics.sock");
    let arg = format!("unix:{}", msock.display());
    let Some(mut r) = rig_full("report", &["--metrics", &arg, "--qdisc", "pfifo"], |_| {}) else {
        return;
    };
    let release = vhost_user_tap::kernel::release();
    let m = scrape(&msock);
    let want = expected_support(&release);
    for &(feature, present) in &want {
        let key = format!("vhost_user_tap_kernel_support{{feature=\"{feature}\"}}");
        let got = m
            .get(&key)
            .unwrap_or_else(|| panic!("{key} missing from the scrape: {m:?}"));
        assert_eq!(*got, f64::from(present), "{feature} on Linux {release}");
    }
    let uring = want.contains(&("io_uring_tap_writes", true));
    assert_eq!(
        m["vhost_user_tap_tx_io_uring{queue=\"0\"}"],
        f64::from(uring),
        "TX path on Linux {release}"
    );
    let bp = want.contains(&("tun_backpressure", true));
    assert_eq!(
        m["vhost_user_tap_backpressure{tap=\"vut0\"}"],
        f64::from(bp)
    );
    // The log says which TX path was chosen and why.
    let log = r.daemon.log();
    let tx_line = log.lines().find(|l| l.contains("TX: ")).expect("TX line");
    assert_eq!(
        tx_line.contains("frames written in batches"),
        uring,
        "{tx_line}"
    );
    assert_eq!(
        tx_line.contains("RX: frames read in batches"),
        uring,
        "{tx_line}"
    );
    if !uring && want.contains(&("io_uring", true)) {
        assert!(tx_line.contains("Linux 6.4"), "{tx_line}");
    }

    // What is offered follows the tap: UDP segmentation both ways only where tun has it.
    let uso = want.contains(&("tun_offload_uso", true));
    let offered = r.guest.offered_features();
    for f in [
        VIRTIO_NET_F_GUEST_USO4,
        VIRTIO_NET_F_GUEST_USO6,
        VIRTIO_NET_F_HOST_USO,
    ] {
        assert_eq!(
            offered & (1 << f) != 0,
            uso,
            "feature bit {f} on Linux {release}"
        );
    }

    // Whatever path was chosen, TX delivers, and the probe sent nothing into the tap.
    guest_to_host(&r.ns, &r.host, &mut r.guest, 50, |_| 100);
    let link = r.ns.link_stats(TAP);
    assert_eq!((link.rx_packets, link.rx_dropped), (50, 0), "{link:?}");
    let c = stop_and_counters(r);
    assert_eq!(c["tx_frames"], 50);
    assert_eq!(
        c["tx_dropped_tap_error"] + c["tx_io_uring_fallbacks"],
        0,
        "{c:?}"
    );
}

#[test]
fn a_daemon_started_right_after_a_sigkill_gets_the_tap() {
    if !root_or_skip("restart") {
        return;
    }
    let ns = Netns::new("restart");
    for round in 0..5 {
        // Default options: TX through io_uring, whose ring holds the tap a moment after the
        // process is gone.
        let mut d = Daemon::start(&ns, TAP, &[]);
        d.kill();
        let mut again = Daemon::start(&ns, TAP, &[]);
        assert!(
            again.terminate().success(),
            "round {round}: {}",
            again.log()
        );
    }
}

#[test]
fn a_frontend_without_shared_memory_is_named_in_the_log() {
    use vhost_user_tap_guest::HandshakeOrder;
    if !root_or_skip("unshared") {
        return;
    }
    let ns = Netns::new("unshared");
    let mut d = Daemon::start(&ns, TAP, &[]);
    let mut cfg = guest_config(&d.socket);
    cfg.order = HandshakeOrder::QemuUnsharedMemory;
    let g = Guest::connect(cfg).expect("the handshake up to SET_FEATURES");
    let line = d.wait_for_log("sent no memory table", WAIT);
    assert!(
        line.contains("ERROR") && line.contains("share=on") && line.contains("memoryBacking"),
        "{line}"
    );
    drop(g);
    // A frontend that does send its table is not warned about.
    let g = Guest::connect(guest_config(&d.socket)).expect("guest connects");
    d.wait_for_log("guest memory:", WAIT);
    drop(g);
    assert!(d.terminate().success());
    assert_eq!(d.log().matches("sent no memory table").count(), 1);
}
