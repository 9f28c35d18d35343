//! Target (b): one queue pair's RX and TX over the in-process loopback (the daemon's `Pair` on a
//! synthetic guest's rings, a SOCK_SEQPACKET socketpair for the tap). The input picks the ring
//! geometry and features, then a program: frames injected from the host side, the guest's
//! driver posting buffers and frames (well-formed or raw malformed chains), hostile writes
//! straight into a ring (descriptors, indirect tables, avail entries and index, suppression
//! words; from then on the driver leaves that ring alone), RX/TX batches, RX kicks, the wire
//! drained or left full, worker restarts (stop, then start on a dup of the tap, with a
//! migration's dirty log covering guest memory or short of it or none, with or
//! without an io_uring) as the session does around every control message.
//!
//! Checked:
//! - every batch is bounded: under `worker::STOP_DEADLINE`, at most the frame budget, at most
//!   `CHAIN_BUDGET` + one pop of chains completed as malformed or sent, and the used index
//!   moves by at most that plus a ring (RX's window) from where the device left it;
//! - no error a guest can cause ends the daemon (`PairError::ends_daemon`);
//! - frames taken from the tap = delivered + counted drops + staged, and every frame
//!   the wire received is one `tx_frames` counted, once the pair is stopped;
//! - no descriptor is left open.

use std::fs::File;
use std::num::Wrapping;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Instant;

use vhost_user_tap::pair::PairError;
use vhost_user_tap::ring::CHAIN_BUDGET;
use vhost_user_tap::stats::PairSnapshot;
use vhost_user_tap::tap::Tap;
use vhost_user_tap::worker::STOP_DEADLINE;
use vhost_user_tap_guest::loopback::{Loopback, LoopbackConfig};
use vhost_user_tap_guest::ring::{
    RingLayout, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vhost_user_tap_guest::{RawDesc, RawNext};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::Input;

const MAX_OPS: usize = 160;
/// The loopback's guest RAM (`Loopback::new`).
const RAM: u64 = 64 << 20;
/// Where hostile indirect tables go: far above what the guest allocates for rings and buffers.
const SCRATCH: u64 = 48 << 20;
/// One pop's most chains (RX's window refill, TX's io_uring batch).
const POP: u64 = 64;

pub fn datapath(data: &[u8]) {
    crate::exclusive(|| {
        let fds = crate::open_fds();
        run(data);
        assert_eq!(crate::open_fds(), fds, "descriptors leaked");
    })
}

struct Dir {
    /// The guest wrote this ring directly: its driver's bookkeeping no longer holds.
    hostile: bool,
    /// The pair stopped on an error of this direction: no batch until a restart.
    failed: bool,
    /// The used index this direction's last batch left (unknown after a restart). A guest can
    /// have RX write frames over any ring, used rings included: a batch's used entries are
    /// counted only from an index the device itself left.
    used: Option<Wrapping<u16>>,
}

fn run(data: &[u8]) {
    let mut r = Input::new(data);
    let queue_size = 1u16 << (1 + r.u8() % 8);
    let rx_buf_len = match r.u8() % 6 {
        0 => 64,
        1 => 256,
        2 => 1536,
        3 => 4096,
        4 => 13 + u32::from(r.u16()) % 16384,
        _ => 65562,
    };
    let cfg = LoopbackConfig {
        queue_size,
        mrg_rxbuf: r.bool(),
        event_idx: r.bool(),
        rx_buf_len: if queue_size > 64 {
            rx_buf_len.min(16384)
        } else {
            rx_buf_len
        },
        io_uring: r.u8() % 4 == 0,
    };
    let Ok(mut lb) = Loopback::new(cfg) else {
        return;
    };
    let mem = lb.guest.memory().clone();
    let layouts = [*lb.guest.rx_ring().layout(), *lb.guest.tx_ring().layout()];
    let mut dirs = [false, false].map(|_| Dir {
        hostile: false,
        failed: false,
        used: None,
    });
    let mut injected = 0u64;
    let mut on_wire = 0u64;
    let mut wire_buf = vec![0u8; 70_000];

    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        match r.u8() % 16 {
            0 | 1 => {
                let len = frame_len(&mut r);
                let frame = frame(injected, len);
                match lb.inject(&frame) {
                    Ok(true) => injected += 1,
                    Ok(false) => {}
                    // Larger than the socket takes (EMSGSIZE): never sent.
                    Err(_) => {}
                }
            }
            2 if !dirs[0].hostile => {
                let _ = lb.guest.post_rx_buffers(usize::from(r.u8()));
            }
            3 if !dirs[1].hostile => {
                let len = 14 + usize::from(r.u16()) % 1500;
                let _ = lb.guest.send_frame(&frame(u64::from(r.u8()), len));
            }
            4 => {
                if !dirs[0].hostile {
                    let _ = lb.guest.poll_rx(|_, _| {});
                }
                if !dirs[1].hostile {
                    let _ = lb.guest.reclaim_tx();
                }
                let _ = lb.guest.take_raw_completions();
            }
            // A malformed chain through the driver (its bookkeeping stays right).
            5 => {
                let rx = r.bool();
                if !dirs[usize::from(!rx)].hostile {
                    let n = 1 + usize::from(r.u8() % 6);
                    let descs: Vec<RawDesc> = (0..n).map(|_| raw_desc(&mut r, rx)).collect();
                    let _ = if rx {
                        lb.guest.post_raw_rx_chain(&descs)
                    } else {
                        lb.guest.post_raw_tx_chain(&descs)
                    };
                }
            }
            6 | 7 => {
                let d = usize::from(r.bool());
                dirs[d].hostile = true;
                hostile_write(&mut r, &mem, &layouts[d], d == 0);
            }
            8 | 9 if !dirs[0].failed => {
                let d = &mut dirs[0];
                let res = batch(&mut lb, &layouts[0], true, &mut d.used, |lb| {
                    lb.rx_process().map(drop)
                });
                d.failed = res.is_err();
            }
            10 | 11 if !dirs[1].failed => {
                let d = &mut dirs[1];
                let res = batch(&mut lb, &layouts[1], false, &mut d.used, |lb| {
                    lb.tx_process().map(drop)
                });
                d.failed = res.is_err();
            }
            12 if !dirs[0].failed => {
                let res = lb.rx_kick();
                check_error(&res);
                dirs[0].failed = res.is_err();
            }
            13 => on_wire += drain_wire(&lb, &mut wire_buf),
            14 => {
                // A migration's dirty log from this start on (covering guest memory, or short
                // of it: marks past its end must be skipped), or none.
                match r.u8() % 4 {
                    0 => lb.set_log(Some(dirty_log(RAM >> (r.u8() % 8)))),
                    1 => lb.set_log(None),
                    _ => {}
                }
                let tap = dup_tap(&lb.tap);
                let io_uring = r.u8() % 4 == 0;
                let t = Instant::now();
                lb.restart_with(tap, io_uring).expect("a restart");
                assert!(
                    t.elapsed() < STOP_DEADLINE,
                    "a restart took {:?}",
                    t.elapsed()
                );
                for d in &mut dirs {
                    d.failed = false;
                    d.used = None;
                }
            }
            _ => {}
        }
    }

    // Stopped, the pair's accounts must close.
    let stopped = lb.stop();
    on_wire += drain_wire(&lb, &mut wire_buf);
    let left = drain_fd(&*lb.tap, &mut wire_buf);
    let s = lb.stats.snapshot();
    let taken = injected - left;
    let staged = stopped.rest.carry.staged_frames() as u64;
    let accounted = s.rx_frames + s.rx_dropped_oversize + s.rx_dropped_unfit + staged;
    assert_eq!(
        accounted,
        taken,
        "{taken} frames taken from the tap, {} delivered, {} dropped, {staged} staged",
        s.rx_frames,
        s.rx_dropped_oversize + s.rx_dropped_unfit,
    );
    assert_eq!(on_wire, s.tx_frames, "frames on the wire vs tx_frames");
}

/// Mostly small frames, sometimes large ones (up to the staging buffer and past it).
fn frame_len(r: &mut Input) -> usize {
    match r.u8() % 8 {
        0 => usize::from(r.u16()),
        1 => 1514 + usize::from(r.u16()) % 8192,
        _ => 14 + usize::from(r.u8()) * 4,
    }
}

fn frame(seq: u64, len: usize) -> Vec<u8> {
    let mut f = vec![0xffu8; len];
    let tag = seq.to_le_bytes();
    for (i, b) in f.iter_mut().enumerate().skip(14) {
        *b = tag[i % 8] ^ (i as u8);
    }
    f
}

fn raw_desc(r: &mut Input, rx: bool) -> RawDesc {
    let addr = r.addr(RAM);
    let len = match r.u8() % 4 {
        0 => r.u32(),
        1 => 0,
        _ => u32::from(r.u16()) % 4096,
    };
    let mut flags = u16::from(r.u8() % 8);
    if rx && r.u8() % 4 != 0 {
        flags |= VRING_DESC_F_WRITE;
    }
    let next = match r.u8() % 4 {
        0 => RawNext::Chain(u16::from(r.u8() % 8)),
        1 => RawNext::Absolute(r.u16()),
        _ => RawNext::Follow,
    };
    RawDesc {
        addr,
        len,
        flags,
        next,
    }
}

fn encode(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    vhost_user_tap_guest::ring::encode_desc(addr, len, flags, next)
}

/// A hostile guest's write into one ring (never into the used ring, which only the device
/// writes: the batch bounds read it).
fn hostile_write(r: &mut Input, mem: &GuestMemoryMmap, l: &RingLayout, rx: bool) {
    let size = l.size;
    let desc = |r: &mut Input| {
        let addr = match r.u8() % 8 {
            0 => r.addr(RAM),
            // The rings themselves, as buffers.
            1 => l.desc_table.0 + u64::from(r.u16()) % 8192,
            _ => 0x10_0000 + u64::from(r.u32()) % (16 << 20),
        };
        let len = match r.u8() % 8 {
            0 => r.u32(),
            1 => 0,
            2 => 16 * u32::from(r.u8()),
            _ => u32::from(r.u16()) % 4096,
        };
        let mut flags = match r.u8() {
            f @ 0..=250 => u16::from(f % 8),
            _ => r.u16(),
        };
        if rx && r.bool() {
            flags |= VRING_DESC_F_WRITE;
        }
        (addr, len, flags)
    };
    match r.u8() % 6 {
        0 | 1 => {
            let i = r.index(size);
            let (addr, len, flags) = desc(r);
            let next = r.index(size);
            let at = l.desc_table.0 + 16 * u64::from(i);
            let _ = mem.write_slice(&encode(addr, len, flags, next), GuestAddress(at));
        }
        // An indirect table in scratch memory and a descriptor naming it.
        2 => {
            let n = 1 + u16::from(r.u8());
            let table = SCRATCH + 4096 * u64::from(r.u8() % 64);
            for k in 0..n.min(64) {
                let (addr, len, flags) = desc(r);
                let flags = if k + 1 < n {
                    flags | VRING_DESC_F_NEXT
                } else {
                    flags
                };
                let next = if r.u8() % 8 == 0 { r.u16() } else { k + 1 };
                let at = table + 16 * u64::from(k);
                let _ = mem.write_slice(&encode(addr, len, flags, next), GuestAddress(at));
            }
            let i = r.index(size);
            let at = l.desc_table.0 + 16 * u64::from(i);
            let d = encode(table, 16 * u32::from(n), VRING_DESC_F_INDIRECT, 0);
            let _ = mem.write_slice(&d, GuestAddress(at));
        }
        // Avail entries, then the index past them (or anywhere).
        3 | 4 => {
            let idx_at = l.avail_ring.unchecked_add(2);
            let idx: u16 = mem.read_obj(idx_at).unwrap_or(0);
            let n = u16::from(r.u8()) % (size + 1);
            for k in 0..n {
                let slot = idx.wrapping_add(k) % size;
                let at = l.avail_ring.0 + 4 + 2 * u64::from(slot);
                let _ = mem.write_obj(r.index(size), GuestAddress(at));
            }
            let new = if r.u8() % 16 == 0 {
                r.u16()
            } else {
                idx.wrapping_add(n)
            };
            let _ = mem.write_obj(new, idx_at);
        }
        // Suppression words: avail flags, used_event.
        _ => {
            let _ = mem.write_obj(r.u16(), l.avail_ring);
            let _ = mem.write_obj(r.u16(), l.used_event_addr());
        }
    }
}

fn used_idx(mem: &GuestMemoryMmap, l: &RingLayout) -> Wrapping<u16> {
    Wrapping(
        mem.read_obj(l.used_ring.unchecked_add(2))
            .expect("used ring in memory"),
    )
}

/// One RX or TX batch, timed and bounded. `last_used` is the used index the direction's
/// previous batch left, if known; it is updated.
fn batch(
    lb: &mut Loopback,
    l: &RingLayout,
    rx: bool,
    last_used: &mut Option<Wrapping<u16>>,
    f: impl FnOnce(&mut Loopback) -> Result<(), PairError>,
) -> Result<(), PairError> {
    let mem = lb.guest.memory().clone();
    let (used0, s0) = (used_idx(&mem, l), lb.stats.snapshot());
    let t = Instant::now();
    let res = f(lb);
    let took = t.elapsed();
    let (used1, s1) = (used_idx(&mem, l), lb.stats.snapshot());
    let d = |f: fn(&PairSnapshot) -> u64| f(&s1) - f(&s0);
    let dir = if rx { "RX" } else { "TX" };
    assert!(took < STOP_DEADLINE, "an {dir} batch took {took:?}");
    // Counted only from an index the device left (see `Dir::used`).
    let used = (*last_used == Some(used0)).then(|| u64::from((used1 - used0).0));
    *last_used = Some(used1);
    if rx {
        let (frames, bad) = (d(|s| s.rx_frames), d(|s| s.rx_bad_desc));
        assert!(
            frames <= vhost_user_tap::rx::FRAME_BUDGET,
            "RX: {frames} frames in a batch"
        );
        assert!(
            bad <= CHAIN_BUDGET + POP,
            "RX: {bad} malformed chains in a batch"
        );
        let bound = CHAIN_BUDGET + POP + u64::from(l.size);
        if let Some(used) = used {
            assert!(
                used <= bound,
                "RX: {used} used entries in a batch (bound {bound})"
            );
        }
    } else {
        let frames = d(|s| s.tx_frames);
        let chains = frames + d(|s| s.tx_dropped_bad_desc) + d(|s| s.tx_dropped_tap_error);
        assert!(
            frames <= vhost_user_tap::tx::FRAME_BUDGET,
            "TX: {frames} frames in a batch"
        );
        assert!(
            chains <= CHAIN_BUDGET + POP,
            "TX: {chains} chains completed in a batch"
        );
        if let Some(used) = used {
            assert!(
                used <= CHAIN_BUDGET + POP,
                "TX: {used} used entries in a batch"
            );
        }
    }
    check_error(&res);
    res
}

fn check_error(res: &Result<(), PairError>) {
    if let Err(e) = res {
        assert!(!e.ends_daemon(), "a guest ended the daemon: {e}");
    }
}

/// Frames the daemon wrote toward the host, each at least a vnet header.
fn drain_wire(lb: &Loopback, buf: &mut [u8]) -> u64 {
    let mut short = 0;
    let n = lb.drain_wire(buf, |f| short += usize::from(f.len() < 12));
    assert_eq!(short, 0, "frames shorter than a vnet header on the wire");
    n as u64
}

/// Frames still queued on the daemon's end of the tap (read now, uncounted by the daemon).
fn drain_fd(f: &impl AsRawFd, buf: &mut [u8]) -> u64 {
    let mut n = 0;
    loop {
        // SAFETY: reads at most buf.len() bytes into `buf`.
        let r = unsafe {
            libc::recv(
                f.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            return n;
        }
        n += 1;
    }
}

/// A sealable memfd log covering guest addresses below `covers`.
fn dirty_log(covers: u64) -> std::sync::Arc<vhost_user_tap::dirty_log::DirtyLog> {
    use std::os::fd::FromRawFd;
    let size = (covers / 4096 / 8).max(8);
    // SAFETY: a valid NUL-terminated name; checked.
    let fd = unsafe {
        libc::memfd_create(
            c"fuzz-log".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(size).expect("sizing the log");
    std::sync::Arc::new(vhost_user_tap::dirty_log::DirtyLog::map(f, size, 0).expect("a log"))
}

/// The same socket as a new `Tap` (the restarted pair's).
fn dup_tap(tap: &Tap) -> Tap {
    let fd = tap.as_fd().try_clone_to_owned().expect("dup");
    Tap::from_file(File::from(fd), "fuzz")
}

#[cfg(test)]
mod tests {
    use std::panic::{catch_unwind, AssertUnwindSafe};

    use super::*;

    /// The used-index bound must not blame the device for an index something else wrote (RX
    /// frames the guest pointed at the ring), and must still catch a device that publishes
    /// past its batch from an index it left.
    #[test]
    fn the_used_bound_blames_only_the_device() {
        let cfg = LoopbackConfig {
            queue_size: 256,
            mrg_rxbuf: false,
            event_idx: false,
            rx_buf_len: 1536,
            io_uring: false,
        };
        let mut lb = Loopback::new(cfg).expect("a loopback");
        let mem = lb.guest.memory().clone();
        let l = *lb.guest.tx_ring().layout();
        let idx_at = l.used_ring.unchecked_add(2);
        let tx = |lb: &mut Loopback| lb.tx_process().map(drop);
        let mut left = None;
        batch(&mut lb, &l, false, &mut left, tx).expect("an idle TX batch");

        let moved = used_idx(&mem, &l) + Wrapping(30_000);
        mem.write_obj(moved.0, idx_at).unwrap();
        batch(&mut lb, &l, false, &mut left, tx).expect("the device's own index restored");

        let over = catch_unwind(AssertUnwindSafe(|| {
            batch(&mut lb, &l, false, &mut left, |lb| {
                let r = lb.tx_process().map(drop);
                let past = used_idx(&mem, &l) + Wrapping(30_000);
                mem.write_obj(past.0, idx_at).unwrap();
                r
            })
        }));
        assert!(over.is_err(), "an over-publishing device went unnoticed");
    }
}
