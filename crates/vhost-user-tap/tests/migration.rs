//! Migration with the synthetic guest as the source frontend: the dirty log the daemon keeps
//! while VHOST_F_LOG_ALL is on, checked page by page; the refusals that keep a log from being
//! half set up; SEND_RARP's announce on the tap. The QEMU migrations are in `qemu_migration.rs`.
//!
//! Needs root (a namespace and a tap); VUT_SKIP_ROOT=1 skips (prints SKIPPED).

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use vhost_user_tap_guest::kit::*;
use vhost_user_tap_guest::net::VHOST_F_LOG_ALL;
use vhost_user_tap_guest::ring::{RawDesc, RawNext, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vhost_user_tap_guest::vhost_user::proto;
use vhost_user_tap_guest::{Guest, RawCompletion};

const PAGE: u64 = 4096;

fn pages(gpa: u64, len: u64) -> impl Iterator<Item = u64> {
    let last = if len == 0 { gpa } else { gpa + len - 1 };
    (gpa / PAGE)..=(last / PAGE).max(gpa / PAGE)
}

/// Used ring bytes of a ring of `size` entries (flags, idx, elements, avail_event).
fn used_ring_pages(g: &Guest, rx: bool) -> BTreeSet<u64> {
    let p = g.pair(0).unwrap();
    let l = if rx {
        *p.rx_ring().layout()
    } else {
        *p.tx_ring().layout()
    };
    pages(l.used_ring.0, 6 + 8 * u64::from(l.size)).collect()
}

fn setup(test: &str) -> Option<(Netns, Daemon, Guest, std::net::UdpSocket)> {
    if !root_or_skip(test) {
        return None;
    }
    let ns = Netns::new(test);
    let mut d = Daemon::start(&ns, TAP, &[]);
    ns.configure_tap(TAP);
    let g = d.connect(guest_config(&d.socket));
    let host = ns.udp_socket(&format!("{HOST_IP}:{HOST_PORT}"));
    Some((ns, d, g, host))
}

/// Poll pair 0's RX until `n` raw chains came back.
fn raw_completions(g: &mut Guest, n: usize) -> Vec<RawCompletion> {
    let deadline = Instant::now() + WAIT;
    let mut done = Vec::new();
    while done.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} RX chains came back: {done:?}",
            done.len()
        );
        g.wait_interrupt(0, Duration::from_millis(100)).unwrap();
        g.poll_rx(|_, _| {}).unwrap();
        done.extend(g.take_raw_completions());
    }
    done
}

/// What the issue asks of the dirty log: while LOG_ALL is on, every page the daemon wrote (RX
/// frame bytes, vnet header included, and the used rings) is marked, and nothing else is; once
/// it is off, nothing is marked. The RX buffers are placed so that frames cross page boundaries
/// and chains have segments on pages apart from each other.
#[test]
fn dirty_log_marks_exactly_the_pages_written() {
    let Some((ns, d, mut g, host)) = setup("mig-log") else {
        return;
    };
    assert!(
        g.offered_features() & (1 << VHOST_F_LOG_ALL) != 0,
        "VHOST_F_LOG_ALL offered"
    );
    let pf = g.protocol_features();
    assert_eq!(
        pf & (proto::LOG_SHMFD | proto::RARP),
        proto::LOG_SHMFD | proto::RARP,
        "LOG_SHMFD and RARP negotiated"
    );
    // Traffic before logging: its pages must not show up in the log.
    // (Exactly as many buffers as datagrams: none may be left for the chains below.)
    g.post_rx_buffers(8).unwrap();
    send_to_guest(&host, 0..8);
    let (got, _) = receive(&mut g, 8, false);
    assert_in_order(&got, 0);

    g.start_migration_log().unwrap();
    // Restarting the rings with their log addresses re-arms kicks: at most the used rings'
    // `avail_event` is written so far.
    let (rx_used, tx_used) = (used_ring_pages(&g, true), used_ring_pages(&g, false));
    let first = g.take_dirty_pages();
    assert!(
        first
            .iter()
            .all(|p| rx_used.contains(p) || tx_used.contains(p)),
        "at the start of logging only used rings marked: {first:?}"
    );

    // Eight chains, each a single 2 KiB buffer starting 1000 bytes before a page end (every
    // frame of more than 1000 bytes crosses into the next page), and four chains of two
    // segments on pages four apart: 200 bytes, then the rest.
    let hdr = g.hdr_len() as u64;
    let area = g.alloc_scratch(64 * PAGE, PAGE).unwrap().0;
    let mut chains: Vec<(u16, Vec<(u64, u64)>)> = Vec::new();
    let one = |addr: u64, len: u64, next: RawNext, more: bool| RawDesc {
        addr,
        len: len as u32,
        flags: VRING_DESC_F_WRITE | if more { VRING_DESC_F_NEXT } else { 0 },
        next,
    };
    for i in 0..8u64 {
        let a = area + (2 * i + 1) * PAGE - 1000;
        let head = g
            .post_raw_rx_chain(&[one(a, 2048, RawNext::Follow, false)])
            .unwrap();
        chains.push((head, vec![(a, 2048)]));
    }
    for i in 0..4u64 {
        let (a, b) = (area + (32 + 8 * i) * PAGE, area + (36 + 8 * i) * PAGE);
        let head = g
            .post_raw_rx_chain(&[
                one(a, 200, RawNext::Follow, true),
                one(b, 2048, RawNext::Follow, false),
            ])
            .unwrap();
        chains.push((head, vec![(a, 200), (b, 2048)]));
    }
    // Datagrams 30..38 and 68..72 carry 1126 to 1385 bytes of payload: they cross a page in
    // the single-buffer chains and fill both segments of the others. The kernel may add a frame
    // of its own (IPv6 neighbour discovery), which lands in a chain like any other and is
    // accounted the same way.
    send_to_guest(&host, 30..38);
    send_to_guest(&host, 68..72);
    let done = raw_completions(&mut g, chains.len());
    let mut written = BTreeSet::new();
    let mut bytes = 0;
    for c in &done {
        let (_, segs) = chains
            .iter()
            .find(|(h, _)| *h == c.head)
            .expect("our chain");
        assert!(u64::from(c.len) > hdr, "a frame in chain {}", c.head);
        let mut left = u64::from(c.len);
        bytes += left;
        for &(addr, len) in segs {
            let n = left.min(len);
            if n > 0 {
                written.extend(pages(addr, n));
            }
            left -= n;
        }
        assert_eq!(left, 0, "chain {} holds its frame", c.head);
    }
    // And TX: the daemon writes only the TX used ring.
    let spec = guest_to_host_spec(&ns);
    let mut frame = Vec::new();
    for seq in 0..4 {
        spec.build(100 + seq * 300, 0, seq as u64, &mut frame)
            .unwrap();
        assert!(g.send_frame(&frame).unwrap());
    }
    let deadline = Instant::now() + WAIT;
    while d.counters(0)["tx_frames"] < 4 {
        assert!(Instant::now() < deadline, "TX frames never sent");
        g.wait_interrupt(1, Duration::from_millis(100)).unwrap();
    }
    // Logging off first: SET_FEATURES stops and restarts the pair, so every mark of the batches
    // above (the used rings' are made as they are published, after the guest may already see
    // the frames) is in the log when it is read.
    g.stop_migration_log().unwrap();
    let marked = g.take_dirty_pages();
    let missing: Vec<_> = written.difference(&marked).collect();
    assert!(
        missing.is_empty(),
        "pages written with RX frame data ({bytes} bytes) but not marked: {missing:?} (marked {marked:?})"
    );
    assert!(
        !marked.is_disjoint(&rx_used),
        "the RX used ring's pages {rx_used:?} marked: {marked:?}"
    );
    assert!(
        !marked.is_disjoint(&tx_used),
        "the TX used ring's pages {tx_used:?} marked: {marked:?}"
    );
    let allowed: BTreeSet<u64> = written.union(&rx_used).chain(&tx_used).copied().collect();
    let extra: Vec<_> = marked.difference(&allowed).collect();
    assert!(
        extra.is_empty(),
        "pages marked that the daemon never wrote: {extra:?}"
    );
    assert!(g.take_log_signals() > 0, "the log fd signalled");
    let logged = d.counters(0)["dirty_pages_logged"];
    assert!(
        logged >= marked.len() as u64,
        "dirty_log_marks counts every page marked: {logged} < {}",
        marked.len()
    );

    // Logging off: traffic both ways marks nothing and the counter stands still.
    g.post_rx_buffers(usize::MAX).unwrap();
    host_to_guest(&host, &mut g, 100..140);
    for seq in 10..14 {
        spec.build(200, 0, seq, &mut frame).unwrap();
        assert!(g.send_frame(&frame).unwrap());
    }
    let deadline = Instant::now() + WAIT;
    while d.counters(0)["tx_frames"] < 8 {
        assert!(Instant::now() < deadline, "TX frames never sent");
        g.wait_interrupt(1, Duration::from_millis(100)).unwrap();
    }
    assert_eq!(
        g.take_dirty_pages(),
        BTreeSet::new(),
        "no marks without LOG_ALL"
    );
    assert_eq!(d.counters(0)["dirty_pages_logged"], logged);
    drop(ns);
}

/// LOG_ALL is refused while no log covers guest memory (a backend that accepted it would write
/// unlogged pages); a log too small for guest memory, or one whose file could shrink under the
/// daemon's mapping, is refused at SET_LOG_BASE; the pair keeps running through all of it.
#[test]
fn log_all_needs_a_log_that_covers_memory() {
    let Some((_ns, _d, mut g, host)) = setup("mig-nolog") else {
        return;
    };
    g.post_rx_buffers(usize::MAX).unwrap();
    let err = g
        .set_features_raw(g.features() | (1 << VHOST_F_LOG_ALL))
        .expect_err("LOG_ALL without a log refused");
    println!("LOG_ALL without a log: {err}");
    let size = g.ram().size();
    // SAFETY: memfd_create with a valid name; the fd is checked and then owned by `f`.
    let fd = unsafe { libc::memfd_create(c"short-log".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just created and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(8).unwrap();
    let need = size / PAGE / 8;
    assert!(need > 8, "guest memory larger than one log word covers");
    assert_eq!(
        g.set_log_base_raw(8, 0, &f).unwrap(),
        1,
        "a log of 8 bytes for {size} bytes of memory refused"
    );
    // Big enough, but a memfd that cannot be sealed: the frontend could shrink it under the
    // daemon's mapping (a SIGBUS at the next mark), so it is refused too.
    f.set_len(need.next_multiple_of(8)).unwrap();
    assert_eq!(
        g.set_log_base_raw(need.next_multiple_of(8), 0, &f).unwrap(),
        1,
        "an unsealable log refused"
    );
    g.set_features_raw(g.features() | (1 << VHOST_F_LOG_ALL))
        .expect_err("LOG_ALL with a refused log refused");
    host_to_guest(&host, &mut g, 0..16);
    // A sealable one is accepted, and sealed: it cannot shrink any more.
    g.start_migration_log().unwrap();
    let log = g.dirty_log().unwrap();
    // SAFETY: the log's fd is open for as long as `log` lives; the duplicate is owned by `dup`.
    let dup = unsafe { File::from_raw_fd(libc::dup(log.fd())) };
    assert!(dup.set_len(0).is_err(), "the daemon sealed the log");
    host_to_guest(&host, &mut g, 16..32);
}

/// SEND_RARP writes one RARP broadcast for the given MAC into the tap: a bridge learns the
/// guest's new port from it. Counted in `rarp_announces`.
#[test]
fn send_rarp_announces_on_the_tap() {
    let Some((ns, d, mut g, _host)) = setup("mig-rarp") else {
        return;
    };
    let sniffer = Sniffer::open(&ns, ETH_P_RARP);
    let mac = [0x52, 0x54, 0x00, 0x11, 0x22, 0x33];
    g.send_rarp(mac).unwrap();
    let frame = sniffer.recv(WAIT).expect("a RARP frame on the tap");
    assert_rarp(&frame, mac);
    let m = scrape(d.metrics_path());
    assert_eq!(m.get("vhost_user_tap_rarp_announces_total"), Some(&1.0));
}

/// After a migration the source daemon may still hold one frame per pair: taken from the tap
/// while the guest's RX ring was full, staged, never delivered because the guest left. It is not
/// dropped with the frontend: it stays staged (`rx_staged` 1, nothing delivered, no drop) and the
/// next frontend on this daemon gets it (the VM migrated back, or restored here from a file).
/// If the daemon exits first, it says so and counts the frame (`rx_dropped_at_exit`, in its
/// final report; no metrics endpoint is left to read it from).
#[test]
fn a_frame_staged_on_the_source_waits_for_the_next_frontend() {
    if !root_or_skip("mig-staged") {
        return;
    }
    let ns = Netns::new("mig-staged");
    let mut d = Daemon::start(&ns, TAP, &[]);
    ns.configure_tap(TAP);
    let host = ns.udp_socket(&format!("{HOST_IP}:{HOST_PORT}"));
    let big: Vec<usize> = (0..).filter(|i| payload(*i).len() > 1300).take(2).collect();
    // 256-byte buffers: a 1400-byte datagram does not fit in two.
    let small_buffers = |d: &mut Daemon| {
        let mut cfg = guest_config(&d.socket);
        cfg.rx_buf_len = 256;
        d.connect(cfg)
    };
    let stage = |g: &mut Guest, i: usize, read_before: u64| {
        g.post_rx_buffers(2).unwrap();
        g.start_migration_log().unwrap();
        send_to_guest(&host, i..i + 1);
        // The kernel's counter is the only witness of the daemon's read; poll it.
        let deadline = Instant::now() + WAIT;
        while ns.link_stats(TAP).tx_packets == read_before {
            assert!(Instant::now() < deadline, "the daemon never read the frame");
            std::thread::sleep(Duration::from_millis(5));
        }
    };

    let mut g = small_buffers(&mut d);
    stage(&mut g, big[0], 0);
    g.disconnect().unwrap();
    let c = d.counters_when_idle(0);
    assert_eq!(
        (c["rx_staged"], c["rx_frames"], c.drops()),
        (1, 0, 0),
        "held, not delivered, not dropped: {c:?}"
    );

    // The VM comes back to this daemon: its frame is the first thing it receives.
    let mut g = d.connect(guest_config(&d.socket));
    g.post_rx_buffers(usize::MAX).unwrap();
    let (got, _) = receive(&mut g, 1, false);
    assert_in_order(&got, big[0]);
    g.disconnect().unwrap();
    let c = d.counters_when_idle(0);
    assert_eq!((c["rx_frames"], c.drops()), (1, 0), "{c:?}");

    // Held again, and the daemon stops instead: not a silent loss.
    let mut g = small_buffers(&mut d);
    stage(&mut g, big[1], 1);
    g.disconnect().unwrap();
    assert_eq!(d.counters_when_idle(0)["rx_staged"], 2);
    assert!(d.terminate().success(), "clean exit");
    assert!(
        d.log()
            .contains("queue pair 0: exiting with 1 staged RX frame(s) no guest took; dropped"),
        "the daemon says it dropped the frame:\n{}",
        d.log()
    );
}

/// A guest moved from daemon A to daemon B as a migration moves it (same guest memory, rings
/// resumed from GET_VRING_BASE's indices; both taps on a bridge), with logging on at A and
/// buffers posted and frames in flight at the switch: no frame host → guest or guest → host is
/// lost or repeated, the avail index A hands over is its used index (chains it had taken but
/// not used are given back), B resumes from the used index in memory, and B's RARP moves the
/// bridge's entry for the guest to B's port.
#[test]
fn a_guest_moves_between_daemons_without_losing_or_repeating_a_frame() {
    if !root_or_skip("mig-move") {
        return;
    }
    let ns = Netns::new("mig-move");
    let mut a = Daemon::start(&ns, "vuta", &[]);
    let mut b = Daemon::start(&ns, "vutb", &[]);
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    for tap in ["vuta", "vutb"] {
        ns.ip(&["link", "set", tap, "master", "br0", "up"]);
    }
    // The host side on the bridge: HOST_IP, up, the guest's MAC as a permanent neighbour.
    ns.configure_tap("br0");
    let host = ns.udp_socket(&format!("{HOST_IP}:{HOST_PORT}"));
    host.set_read_timeout(Some(WAIT)).unwrap();
    let spec = vhost_user_tap_guest::FrameSpec {
        dst_mac: vhost_user_tap::config::parse_mac(&ns.mac("br0")).unwrap(),
        ..guest_to_host_spec_for(&ns)
    };
    let mut g = a.connect(guest_config(&a.socket));
    let mut buf = [0u8; 2048];
    let to_host = |g: &mut Guest, seqs: std::ops::Range<u64>, buf: &mut [u8]| {
        let mut frames = Vec::new();
        for seq in seqs {
            let mut frame = Vec::new();
            spec.build(60 + (seq as usize * 13) % 1400, 0, seq, &mut frame)
                .unwrap();
            assert!(g.send_frame(&frame).unwrap(), "TX ring has room");
            frames.push((seq, frame));
        }
        for (seq, frame) in frames {
            let (n, _) = host
                .recv_from(buf)
                .unwrap_or_else(|e| panic!("datagram {seq} from the guest: {e}"));
            assert_eq!(
                &buf[..n],
                &frame[14 + 20 + 8..],
                "guest → host datagram {seq}: in order, once, intact"
            );
        }
    };
    // Guest → host first: the bridge learns the guest's port before anything is sent to it.
    to_host(&mut g, 0..20, &mut buf);
    g.post_rx_buffers(usize::MAX).unwrap();
    // Frames other than the test's reach the guest too (the bridge floods what it has not
    // learnt, to both taps): counted, so that the daemons' counts must add up to what the
    // guest saw.
    let mut others = 0;
    let mut to_guest = |g: &mut Guest, range: std::ops::Range<usize>| {
        send_to_guest(&host, range.clone());
        let (got, other) = receive(g, range.len(), true);
        assert_in_order(&got, range.start);
        others += other as u64;
    };
    to_guest(&mut g, 0..100);

    // The migration: logging on, traffic while it runs, then the switch with a full RX ring
    // posted and frames the guest sent but A has not yet sent.
    g.start_migration_log().unwrap();
    to_guest(&mut g, 100..200);
    to_host(&mut g, 20..40, &mut buf);
    assert!(!g.take_dirty_pages().is_empty(), "A logged its writes");
    // The switch in two steps, to read the used indices in between: GET_VRING_BASE has
    // stopped A (its last batch published), B has not started.
    let bases = g.disconnect().unwrap();
    let used: Vec<u16> = (0..2).map(|q| g.used_index(q).unwrap()).collect();
    g.resume_on(&b.socket, &bases).unwrap();
    assert_eq!(
        bases.iter().map(|&x| x as u16).collect::<Vec<_>>(),
        used,
        "A hands over its used indices as the next avail indices (taken, unused chains back)"
    );
    g.send_rarp(GUEST_MAC).unwrap();
    let a_counters = a.counters_when_idle(0);

    // On B: the buffers posted at A are used, new frames both ways, each once.
    to_guest(&mut g, 200..300);
    to_host(&mut g, 40..60, &mut buf);
    let b_counters = b.counters(0);
    println!("frames other than the test's: {others}");
    assert_eq!(
        a_counters["rx_frames"] + b_counters["rx_frames"],
        300 + others,
        "A: {a_counters:?}\nB: {b_counters:?}"
    );
    assert_eq!(a_counters["tx_frames"] + b_counters["tx_frames"], 60);
    assert!(a_counters["dirty_pages_logged"] > 0);
    assert_eq!(b_counters["dirty_pages_logged"], 0);
    assert_eq!(
        scrape(b.metrics_path()).get("vhost_user_tap_rarp_announces_total"),
        Some(&1.0)
    );
    drop(g);
    a.terminate_ok();
    b.terminate_ok();
}

/// The kit's guest → host frames, to HOST_IP on whatever interface holds it.
fn guest_to_host_spec_for(_ns: &Netns) -> vhost_user_tap_guest::FrameSpec {
    vhost_user_tap_guest::FrameSpec {
        dst_mac: [0; 6],
        src_mac: GUEST_MAC,
        udp: Some(vhost_user_tap_guest::UdpFlow {
            src: format!("{GUEST_IP}:{GUEST_PORT}").parse().unwrap(),
            dst: format!("{HOST_IP}:{HOST_PORT}").parse().unwrap(),
        }),
    }
}

/// QEMU sends a new SET_LOG_BASE whenever guest memory changes during a migration: the new log
/// replaces the old one at once, while the rings run, and the old one is no longer written.
#[test]
fn a_new_log_base_replaces_the_old_one() {
    let Some((_ns, _d, mut g, host)) = setup("mig-relog") else {
        return;
    };
    g.post_rx_buffers(usize::MAX).unwrap();
    g.start_migration_log().unwrap();
    let old = g.dirty_log().unwrap();
    host_to_guest(&host, &mut g, 0..20);
    // The new log replaces the old one with the pairs stopped: the old one's marks are complete
    // once it answers.
    g.start_migration_log().unwrap();
    assert!(!old.take_dirty().is_empty(), "the first log is written");
    host_to_guest(&host, &mut g, 20..40);
    assert!(
        old.take_dirty().is_empty(),
        "the replaced log is not written any more"
    );
    g.stop_migration_log().unwrap();
    assert!(!g.take_dirty_pages().is_empty(), "the new log is written");
    host_to_guest(&host, &mut g, 40..60);
    assert!(g.take_dirty_pages().is_empty());
}

/// SEND_RARP from a frontend that asks in a loop: a burst goes out, the rest is refused and
/// counted instead of flooding the host's bridge with broadcasts.
#[test]
fn send_rarp_in_a_loop_is_held_to_a_burst() {
    let Some((ns, d, mut g, _host)) = setup("mig-rarp-flood") else {
        return;
    };
    let before = ns.link_stats(TAP).rx_packets;
    let t = Instant::now();
    let mut refused = 0;
    for _ in 0..100 {
        if g.send_rarp(GUEST_MAC).is_err() {
            refused += 1;
        }
    }
    let elapsed = t.elapsed();
    let sent = ns.link_stats(TAP).rx_packets - before;
    let m = scrape(d.metrics_path());
    let announced = m["vhost_user_tap_rarp_announces_total"] as u64;
    assert_eq!(announced, sent, "every announce counted is on the tap");
    assert_eq!(announced + refused, 100);
    // 10 at once and one per 100 ms after that.
    let allowed = 10 + (elapsed.as_millis() / 100) as u64;
    assert!(
        (10..=allowed).contains(&announced),
        "{announced} announces in {elapsed:?} (at most {allowed})"
    );
    let key = "vhost_user_tap_frontend_rejected_requests_total{request=\"SEND_RARP\"}";
    assert_eq!(m.get(key).map(|v| *v as u64), Some(refused), "{m:?}");
}
