//! RX: tap → guest. The daemon's defining promise lives here.
//!
//! Design
//! - A frame is read from the tap only into a place that will deliver it: guest buffers, or the
//!   pair's staging buffer (small frames, below). A frame larger than the gathered buffers lands
//!   (partly) in staging and stays there, owned by the pair, until the guest posts room for it;
//!   it survives worker restarts and reconnects. No frame taken from the tap is dropped, except
//!   one no guest buffer can ever hold (counted as `rx_dropped_oversize`).
//! - Popped chains sit in a window until used, so a frame never needs chains to be popped twice
//!   and rolled back (the rollback is what makes `Queue::enable_notification` spin and stall).
//!   On stop the window is returned to the avail ring (`into_queue`).
//! - When the guest has no room: publish what was delivered and interrupt, arm the kick at the
//!   index consumed so far, full fence, re-check the avail index; stall only if the guest posted
//!   nothing beyond it (`DeviceQueue::arm_kick` holds the barrier argument). While stalled the worker stops polling
//!   the tap, so frames wait in the kernel. The guest's kick resumes RX.
//! - One used-index publish per batch; a batch ends after `FRAME_BUDGET` frames or
//!   `BYTE_BUDGET` bytes (vhost-net's weights) so TX is not starved.
//! - Interrupts under load are moderated: after a batch that ran out of budget (the next one
//!   follows at once) the guest is interrupted only once half its ring has been used since the
//!   last interrupt decision; after any other batch (the tap ran dry, the guest's ring is full,
//!   an error) at once, as before. The used entries are published every batch either way, so
//!   a guest that is polling sees each frame as soon as without moderation; only a guest that
//!   sleeps is woken at most one batch later, and then with twice the frames to take. Why: on a
//!   shared CPU each interrupt costs the guest a wake-up and the worker the guest's preemption
//!   and a cold cache; moderating them cut the CPU per 64-byte frame, worker and synthetic
//!   guest together, by about 3 %, the guest's by 11 % (BENCHMARK-HISTORY.md, "RX at the
//!   floor"). It never delays the interrupt a guest needs to go on: one whose ring runs out is
//!   interrupted before RX stops, and a stopping worker makes the decision it deferred
//!   (`into_parts`).
//! - Small frames are read whole into a staging slot and copied into the guest's buffers; large
//!   ones straight into guest buffers with the slot as the tail. Why: a read into a chain and a
//!   tail has two pieces, and the kernel's import of a two-piece iovec array cost more than
//!   copying a small frame again (on the bench machine a 64-byte frame's read into one piece
//!   saved about 40 ns, 7 %, and the copy costs about 15); for a 64 KiB frame the second copy
//!   would cost microseconds. Which way the next reads go follows the size of the last ones
//!   (`COPY_MAX`); both are lossless, so a wrong guess costs time only.
//! - Reads go to the kernel in batches through io_uring where the kernel allows it (`uring`):
//!   up to `RX_BATCH` reads with one `io_uring_enter`, each into a staging slot of its own (or
//!   one guest chain with that slot as the tail), so small frames cost no syscall of their own.
//!   A read the tap had no frame for fails at once (RWF_NOWAIT), and the batch size follows how
//!   many frames the tap held. Frames go to the guest in the order they were read: a frame that
//!   outgrew its chain, or came after a read that got nothing, waits in its slot (staged) with
//!   every frame after it, and all are delivered from there, in order, as room allows. A frame
//!   that outgrew one chain (large frames, mergeable buffers) also switches RX to gathering
//!   reads, one `readv` per frame over as many chains as the largest frame needs, until
//!   `GATHER_FRAMES` frames in a row would have fitted one chain: large frames land in guest
//!   buffers without the extra copy, and their syscall is a small part of their cost.
//!
//! Limitations: reading into more than `MAX_RX_IOVS` guest segments at once is not attempted; a
//! frame beyond them is finished from staging with one extra copy.

use std::collections::VecDeque;
use std::io;

use libc::iovec;
use log::{error, warn};
use thiserror::Error;
use vm_memory::{Bytes, VolatileSlice};

use crate::ratelog::{self, RateLimited};
use crate::ring::{
    DeviceQueue, RingError, Segment, Verdict, CHAIN_BUDGET, DESC_BUDGET, GARBAGE_CHAINS,
    MAX_CHAIN_SEGS,
};
use crate::stats::{self, PairStats};
use crate::tap::Tap;
use crate::uring::{RxRing, RX_BATCH};
use crate::virtio_net::{NetFeatures, HDR_LEN, HDR_LEN_LEGACY, MAX_GSO_FRAME, NUM_BUFFERS_OFFSET};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
};

pub const FRAME_BUDGET: u64 = 256;
pub const BYTE_BUDGET: u64 = 512 * 1024;
/// Guest segments handed to one readv (the staging tail is one more).
const MAX_RX_IOVS: usize = 64;
/// Chains popped per avail-ring read when the window runs dry.
const WINDOW_REFILL: usize = 64;
/// Frames that must fit one chain in a row before RX goes back from gathering reads to batches.
const GATHER_FRAMES: u32 = 64;
/// Frames up to this size (vnet header included) are read whole into a staging slot and copied
/// into the guest's buffers (see the top): while the last reads were all this small, the next
/// ones are made that way.
const COPY_MAX: usize = 2048;

#[derive(Debug, Error)]
pub enum RxError {
    #[error("RX ring: {0}")]
    Ring(#[from] RingError),
    #[error("reading tap {0} failed: {1} (was the tap deleted?)")]
    Tap(String, io::Error),
    #[error("the guest's buffers are not all backed by its memory file (EFAULT on read)")]
    GuestMemory,
    #[error("RX io_uring submission failed: {0}")]
    Uring(io::Error),
}

/// A frame taken from the tap that is not in the guest yet: the staging slot holding it and its
/// length, vnet header included.
#[derive(Clone, Copy, Debug)]
struct Staged {
    slot: usize,
    len: usize,
}

/// Bytes of one staging slot: the largest frame the tap can hand us, with its header.
const SLOT: usize = HDR_LEN + MAX_GSO_FRAME;

/// What RX keeps across worker restarts and sessions: frames taken from the tap that are not yet
/// in the guest, and the buffer they wait in.
pub struct RxCarry {
    /// `RX_BATCH` slots of `SLOT` bytes, one per read of a batch (one allocation, whose pages
    /// are backed only once touched).
    staging: Box<[u8]>,
    /// Frames waiting for room in the guest, in the order they were read, at most one per slot.
    staged: VecDeque<Staged>,
    /// The vnet header size the staged frames were read with.
    hdr_len: usize,
}

impl RxCarry {
    /// Whether a frame waits here for room in the guest's RX ring.
    pub fn holds_frame(&self) -> bool {
        !self.staged.is_empty()
    }

    /// How many frames wait here.
    pub fn staged_frames(&self) -> usize {
        self.staged.len()
    }

    fn slot(&self, i: usize) -> &[u8] {
        &self.staging[i * SLOT..(i + 1) * SLOT]
    }

    fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.staging[i * SLOT..(i + 1) * SLOT]
    }
}

impl Default for RxCarry {
    fn default() -> Self {
        RxCarry {
            staging: vec![0u8; RX_BATCH * SLOT].into_boxed_slice(),
            staged: VecDeque::with_capacity(RX_BATCH),
            hdr_len: HDR_LEN,
        }
    }
}

impl RxCarry {
    /// Make the staged frames fit the features a (new) guest negotiated: the header resized to
    /// theirs (`num_buffers` added or taken away), and a frame it cannot parse at all, one
    /// checksum-partial or segmented under offloads it did not accept, dropped (the one other
    /// drop RX ever makes; counted). Returns how many it dropped.
    fn adapt(&mut self, f: &NetFeatures) -> u64 {
        let (from, want) = (self.hdr_len, f.hdr_len());
        self.hdr_len = want;
        let offloads = f.tun_offloads();
        let before = self.staged.len();
        let staging = &mut self.staging;
        self.staged.retain_mut(|s| {
            let slot = &mut staging[s.slot * SLOT..(s.slot + 1) * SLOT];
            adapt_frame(slot, &mut s.len, from, want, offloads)
        });
        (before - self.staged.len()) as u64
    }
}

/// `RxCarry::adapt` for one frame in `buf` of `len` bytes read with a `from`-byte header: false
/// if the guest cannot take it.
fn adapt_frame(buf: &mut [u8], len: &mut usize, from: usize, want: usize, offloads: u32) -> bool {
    let (flags, gso) = (u32::from(buf[0]), u32::from(buf[1]));
    let has = |t: u32| offloads & t == t;
    let csum_ok = flags & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 || has(libc::TUN_F_CSUM);
    let gso_ok = (gso & VIRTIO_NET_HDR_GSO_ECN == 0 || has(libc::TUN_F_TSO_ECN))
        && match gso & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE => true,
            VIRTIO_NET_HDR_GSO_TCPV4 => has(libc::TUN_F_TSO4),
            VIRTIO_NET_HDR_GSO_TCPV6 => has(libc::TUN_F_TSO6),
            VIRTIO_NET_HDR_GSO_UDP => has(libc::TUN_F_UFO),
            VIRTIO_NET_HDR_GSO_UDP_L4 => has(libc::TUN_F_USO4 | libc::TUN_F_USO6),
            _ => false,
        };
    if !(csum_ok && gso_ok) {
        return false;
    }
    match (from, want) {
        (HDR_LEN, HDR_LEN_LEGACY) => {
            buf.copy_within(HDR_LEN..*len, HDR_LEN_LEGACY);
            *len -= 2;
        }
        (HDR_LEN_LEGACY, HDR_LEN) => {
            // Room: a slot holds HDR_LEN + MAX_GSO_FRAME, a legacy frame at most 2 less.
            buf.copy_within(HDR_LEN_LEGACY..*len, HDR_LEN);
            buf[NUM_BUFFERS_OFFSET..HDR_LEN].fill(0);
            *len += 2;
        }
        _ => {}
    }
    true
}

/// Where RX stands between two batches. The worker derives what it waits for from it: nothing
/// (`Ready`), the tap (`TapEmpty`) or the guest's kick (`WaitingForBuffers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxState {
    /// There may be work right away: the last batch ran out of budget, or something woke RX.
    Ready,
    /// The tap had no frame: wait for it to become readable.
    TapEmpty,
    /// The guest had no room for the next frame (or for the staged one): wait for its kick. The
    /// tap is not polled meanwhile, so frames wait in the kernel.
    WaitingForBuffers,
}

struct WinChain {
    head: u16,
    cap: u32,
    nsegs: usize,
}

/// Chains popped from the avail ring and not yet used, in ring order.
struct Window {
    chains: VecDeque<WinChain>,
    segs: VecDeque<Segment>,
    cap: usize,
    /// A malformed chain popped after the window's chains was completed already, so they can
    /// no longer be handed back by rewinding the avail index (see `Rx::into_parts`).
    completed_behind: bool,
}

impl Window {
    fn pop_front(&mut self) -> WinChain {
        let c = self.chains.pop_front().expect("caller checked");
        self.segs.drain(..c.nsegs);
        self.cap -= c.cap as usize;
        if self.chains.is_empty() {
            self.completed_behind = false;
        }
        c
    }
}

pub struct Rx {
    q: DeviceQueue,
    win: Window,
    carry: RxCarry,
    /// Reads through io_uring in batches; `None`: one `readv` per frame.
    ring: Option<RxRing>,
    hdr_len: usize,
    mrg: bool,
    /// Buffer bytes gathered before a read: the largest frame expected with the acked features.
    target: usize,
    state: RxState,
    /// Frames the last `process` call moved.
    last_batch: u64,
    scratch: Vec<Segment>,
    iovs: Vec<iovec>,
    /// Each read's iovecs in `iovs`, and its result, for a batch through the io_uring.
    ranges: Vec<std::ops::Range<usize>>,
    results: [i32; RX_BATCH],
    /// Reads the next batch tries: doubled while the tap fills them all, else what it held.
    batch: usize,
    /// Frames still to be read by gathering reads before batching again (see the top).
    gather: u32,
    /// Read whole frames into staging and copy them in (small frames; see the top).
    copy: bool,
    bad_log: RateLimited,
    oversize_log: RateLimited,
    /// Malformed chains popped in a row (see `GARBAGE_CHAINS`).
    garbage: u32,
}

/// Totals of one batch, added to the shared counters once.
#[derive(Default)]
struct Tally {
    /// Chains popped, good or rejected, and descriptors visited: the batch's work.
    popped: u64,
    visited: u64,
    frames: u64,
    /// Of `frames`, those already added to `rx_frames` (at a publish inside the batch).
    frames_counted: u64,
    bytes: u64,
    bad: u64,
    oversize: u64,
    staged: u64,
    races: u64,
    interrupts: u64,
}

impl Tally {
    fn spent(&self) -> bool {
        self.frames >= FRAME_BUDGET
            || self.bytes >= BYTE_BUDGET
            || self.popped >= CHAIN_BUDGET
            || self.visited >= DESC_BUDGET
    }
}

impl Rx {
    /// RX on `q` with the features the guest negotiated; a frame staged under other features
    /// is adapted to them first (`RxCarry::adapt`). A frame it drops is counted here: a
    /// worker may be restarted again before it runs a batch.
    pub fn new(
        q: DeviceQueue,
        mut carry: RxCarry,
        ring: Option<RxRing>,
        f: NetFeatures,
        mtu: u16,
        stats: &PairStats,
    ) -> Self {
        let size = usize::from(q.size());
        stats::add(&stats.rx_dropped_unfit, carry.adapt(&f));
        let (hdr_len, mrg, target) = (f.hdr_len(), f.mrg_rxbuf(), f.max_rx_frame(mtu));
        Rx {
            win: Window {
                chains: VecDeque::with_capacity(size),
                segs: VecDeque::with_capacity(size * 2),
                cap: 0,
                completed_behind: false,
            },
            q,
            carry,
            ring,
            hdr_len,
            mrg,
            target,
            state: RxState::Ready,
            last_batch: 0,
            scratch: Vec::with_capacity(crate::ring::MAX_CHAIN_SEGS),
            iovs: Vec::with_capacity(RX_BATCH * (MAX_CHAIN_SEGS + 1)),
            ranges: Vec::with_capacity(RX_BATCH),
            results: [0; RX_BATCH],
            batch: 1,
            gather: 0,
            copy: true,
            bad_log: RateLimited::default(),
            oversize_log: RateLimited::default(),
            garbage: 0,
        }
    }

    /// Give back the queue (unused window chains returned to the avail ring), the carry and the
    /// io_uring. An interrupt that moderation deferred is sent on the way: the next worker's
    /// queue starts with no decision pending, so a guest asleep on frames published under load
    /// would never be told of them otherwise.
    pub fn into_parts(
        mut self,
        stats: &PairStats,
    ) -> (virtio_queue::Queue, RxCarry, Option<RxRing>) {
        // Exact: the window holds at most a ring of chains (<= 32768).
        #[allow(clippy::cast_possible_truncation)]
        let mut rewind = self.win.chains.len() as u16;
        if self.win.completed_behind {
            // Rewinding would hand the completed malformed chain out again; return the window's
            // buffers as used and empty instead (the guest counts them as length errors). Only
            // a guest that posted a malformed chain gets here.
            while let Some(c) = self.win.chains.pop_front() {
                let _ = self.q.add_used(c.head, 0);
            }
            let _ = self.q.publish();
            rewind = 0;
        }
        if let Ok(true) = self.q.interrupt() {
            stats::inc(&stats.rx_interrupts);
        }
        (self.q.into_queue(rewind), self.carry, self.ring)
    }

    pub fn state(&self) -> RxState {
        self.state
    }

    /// The tap became readable (or failed): a read will tell.
    pub fn tap_ready(&mut self) {
        if self.state == RxState::TapEmpty {
            self.state = RxState::Ready;
        }
    }

    /// Frames the last batch moved: how busy the tap is.
    pub fn last_batch(&self) -> u64 {
        self.last_batch
    }

    /// The guest kicked the RX queue: it posted buffers. The avail index is checked here even
    /// when the window holds enough buffers, so a corrupted index is caught at the kick.
    pub fn on_kick(&mut self, stats: &PairStats) -> Result<(), RxError> {
        self.q.pending()?;
        match self.state {
            RxState::WaitingForBuffers => {
                stats::inc(&stats.rx_wakes);
                self.q.suppress_kicks()?;
            }
            // Buffers are no reason to read an empty tap.
            RxState::TapEmpty => return Ok(()),
            RxState::Ready => {}
        }
        self.state = RxState::Ready;
        Ok(())
    }

    /// Busy polling: resume a stalled RX when the guest posted buffers (it may not kick yet).
    pub fn poll_guest(&mut self, stats: &PairStats) -> Result<bool, RxError> {
        if self.state == RxState::WaitingForBuffers && self.q.pending()? > 0 {
            self.on_kick(stats)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Move frames until the tap is empty, the guest is full, or the budget is spent; returns
    /// the state RX is left in.
    pub fn process(&mut self, tap: &Tap, stats: &PairStats) -> Result<RxState, RxError> {
        let mut t = Tally::default();
        let result = self.run_batch(tap, stats, &mut t);
        self.last_batch = t.frames;
        // Publish and interrupt even after an error: what was delivered is the guest's. Under
        // load the interrupt waits for half a ring (see the top).
        let busy = matches!(result, Ok(RxState::Ready));
        let notify = !busy || self.q.undecided() >= self.q.size() / 2;
        let published = self.publish(stats, &mut t, notify);
        stats::add(&stats.rx_interrupts, t.interrupts);
        stats::add(&stats.rx_bytes, t.bytes);
        stats::add(&stats.rx_bad_desc, t.bad);
        stats::add(&stats.rx_dropped_oversize, t.oversize);
        stats::add(&stats.rx_staged, t.staged);
        stats::add(&stats.rx_notify_races, t.races);
        stats::add(&stats.dirty_pages_logged, self.q.take_logged());
        published?;
        let state = result?;
        log::trace!(
            "RX batch: {state:?}, {} frames, window {}",
            t.frames,
            self.win.chains.len()
        );
        if state == RxState::WaitingForBuffers {
            stats::inc(&stats.rx_stops);
        }
        self.state = state;
        Ok(state)
    }

    /// Publish the used entries written so far and, if `notify`, interrupt if the guest asks.
    /// The frames are counted first, so a guest that sees a frame never sees a counter without
    /// it.
    fn publish(&mut self, stats: &PairStats, t: &mut Tally, notify: bool) -> Result<(), RingError> {
        stats::add(&stats.rx_frames, t.frames - t.frames_counted);
        t.frames_counted = t.frames;
        self.q.publish()?;
        if notify && self.q.interrupt()? {
            t.interrupts += 1;
        }
        Ok(())
    }

    fn run_batch(
        &mut self,
        tap: &Tap,
        stats: &PairStats,
        t: &mut Tally,
    ) -> Result<RxState, RxError> {
        loop {
            if t.spent() {
                return Ok(RxState::Ready);
            }
            if !self.carry.staged.is_empty() {
                if self.deliver_staged(t)? {
                    continue;
                }
            } else {
                let batching = self.ring.is_some() && self.gather == 0;
                if batching {
                    self.fill_window(0, self.batch, t)?;
                } else {
                    self.fill_window(self.target, 1, t)?;
                }
                if t.spent() && self.win.chains.is_empty() {
                    // Rejected chains ate the budget: back to the event loop, then on.
                    return Ok(RxState::Ready);
                }
                if !self.win.chains.is_empty() {
                    let drained = if batching {
                        self.read_batch(tap, t)?
                    } else {
                        !self.read_frame(tap, t)?
                    };
                    // Staged frames first: they were read, and the tap may stay empty.
                    if drained && self.carry.staged.is_empty() {
                        return Ok(RxState::TapEmpty);
                    }
                    continue;
                }
            }
            // No room: let the guest see what we delivered before asking it for more.
            self.publish(stats, t, true)?;
            if self.q.arm_kick()? {
                t.races += 1;
                continue;
            }
            return Ok(RxState::WaitingForBuffers);
        }
    }

    /// Pop chains until the window holds `want` bytes in at least `chains` chains, the avail
    /// ring is empty or the batch's work budget is spent. Malformed chains go straight back to
    /// the guest with length 0.
    fn fill_window(&mut self, want: usize, chains: usize, t: &mut Tally) -> Result<(), RxError> {
        let size = usize::from(self.q.size());
        let hdr_len = self.hdr_len;
        while (self.win.cap < want || self.win.chains.len() < chains)
            && self.win.chains.len() < size
            && !t.spent()
        {
            // More than `want` asks for: one avail-index read serves the next frames too.
            let max = (size - self.win.chains.len()).min(WINDOW_REFILL);
            let (win, bad_log, garbage) = (&mut self.win, &mut self.bad_log, &mut self.garbage);
            let taken = self.q.pop_batch(
                true,
                hdr_len,
                max,
                &mut self.scratch,
                |head, res, segs| match res {
                    Ok(cap) => {
                        *garbage = 0;
                        win.segs.extend(segs.iter().copied());
                        win.chains.push_back(WinChain {
                            head,
                            cap,
                            nsegs: segs.len(),
                        });
                        win.cap += cap as usize;
                        Verdict::Keep
                    }
                    Err(e) => {
                        if let Some(n) = bad_log.allow() {
                            warn!("RX chain {head} rejected: {e}{}", ratelog::suppressed(n));
                        }
                        t.bad += 1;
                        *garbage += 1;
                        win.completed_behind |= !win.chains.is_empty();
                        Verdict::Complete
                    }
                },
            )?;
            t.popped += taken as u64;
            t.visited += self.q.take_visited();
            if self.garbage >= GARBAGE_CHAINS {
                return Err(RingError::Garbage(self.garbage).into());
            }
            if taken < max {
                break;
            }
        }
        Ok(())
    }

    /// Read one frame into the window (and the staging tail), gathering as many chains as the
    /// largest frame needs. Returns false if the tap is empty.
    fn read_frame(&mut self, tap: &Tap, t: &mut Tally) -> Result<bool, RxError> {
        self.iovs.clear();
        let mut cap = 0usize;
        if self.copy {
            let slot = self.carry.slot_mut(0);
            self.iovs.push(iovec {
                iov_base: slot.as_mut_ptr().cast(),
                iov_len: slot.len(),
            });
        } else {
            let mut segs = self.win.segs.iter();
            for (i, c) in self.win.chains.iter().enumerate() {
                let enough = !self.mrg || cap >= self.target;
                if i > 0 && (enough || self.iovs.len() + c.nsegs > MAX_RX_IOVS) {
                    break;
                }
                self.iovs
                    .extend(segs.by_ref().take(c.nsegs).map(Segment::iovec));
                cap += c.cap as usize;
            }
            let staging = self.carry.slot_mut(0);
            if cap < staging.len() {
                self.iovs.push(iovec {
                    iov_base: staging[cap..].as_mut_ptr().cast(),
                    iov_len: staging.len() - cap,
                });
            }
        }
        let n = match tap.readv(&self.iovs) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            // The kernel could not write into a guest buffer: the guest's memory, not the tap.
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => return Err(RxError::GuestMemory),
            Err(e) => return Err(RxError::Tap(tap.name().to_string(), e)),
        };
        let first = self.win.chains.front().map_or(0, |c| c.cap as usize);
        self.gather = if self.mrg && n > first {
            GATHER_FRAMES
        } else {
            self.gather.saturating_sub(1)
        };
        if std::mem::replace(&mut self.copy, n <= COPY_MAX) {
            self.place(0, n, t)?;
        } else if n <= cap {
            self.complete_frame(n, t)?;
        } else {
            // The frame outgrew the gathered buffers: move its head into staging so the whole
            // frame waits in one place for the guest to post room.
            self.stage(0, 0, n, cap, t)?;
        }
        Ok(true)
    }

    /// Read up to `self.batch` frames with one io_uring submission, each into one window chain
    /// with its own staging slot as the tail. Every frame read is delivered or staged before
    /// this returns, unless the guest's ring itself fails (which stops the pair). Returns
    /// whether the tap ran out of frames.
    fn read_batch(&mut self, tap: &Tap, t: &mut Tally) -> Result<bool, RxError> {
        let left = usize::try_from(FRAME_BUDGET.saturating_sub(t.frames)).unwrap_or(1);
        let k = self
            .batch
            .min(self.win.chains.len())
            .min(left.max(1))
            .min(RX_BATCH);
        self.iovs.clear();
        self.ranges.clear();
        let copy = self.copy;
        let mut segs = self.win.segs.iter();
        for (c, slot) in self
            .win
            .chains
            .iter()
            .take(k)
            .zip(self.carry.staging.chunks_exact_mut(SLOT))
        {
            let start = self.iovs.len();
            // Copying: the whole slot, one piece. Else the chain, with the slot as its tail.
            let cap = if copy {
                0
            } else {
                self.iovs
                    .extend(segs.by_ref().take(c.nsegs).map(Segment::iovec));
                c.cap as usize
            };
            if cap < slot.len() {
                self.iovs.push(iovec {
                    iov_base: slot[cap..].as_mut_ptr().cast(),
                    iov_len: slot.len() - cap,
                });
            }
            self.ranges.push(start..self.iovs.len());
        }
        let Some(ring) = self.ring.as_mut() else {
            unreachable!("batching needs the ring");
        };
        let frames = self.ranges.iter().map(|r| &self.iovs[r.clone()]);
        // SAFETY: every iovec points into a window chain (guest memory mapped while the worker
        // holds it, and not touched by us until the call returns) or into the carry's slots,
        // which live in `self` and are not accessed during the call.
        unsafe { ring.submit(frames, &mut self.results[..k]) }.map_err(RxError::Uring)?;

        // Chains completed so far in this batch: while every earlier read delivered its frame,
        // read `j`'s chain is the window's front and its frame goes to the guest at once.
        let (mut popped, mut read, mut largest) = (0, 0, 0);
        let (mut drained, mut refused) = (false, false);
        let mut failed = None;
        for j in 0..k {
            let res = self.results[j];
            let n = match usize::try_from(res) {
                Ok(n) if n > 0 => n,
                _ => {
                    match -res {
                        0 | libc::EAGAIN => drained = true,
                        libc::EINTR => {}
                        libc::EOPNOTSUPP => refused = true,
                        libc::EFAULT => {
                            failed.get_or_insert(RxError::GuestMemory);
                        }
                        e => {
                            failed.get_or_insert(RxError::Tap(
                                tap.name().to_string(),
                                io::Error::from_raw_os_error(e),
                            ));
                        }
                    }
                    continue;
                }
            };
            read += 1;
            largest = largest.max(n);
            if copy {
                self.place(j, n, t)?;
                continue;
            }
            let idx = j - popped;
            let cap = self.win.chains[idx].cap as usize;
            if idx == 0 && n <= cap {
                self.complete_frame(n, t)?;
                popped += 1;
            } else if n > SLOT {
                // Only a chain larger than a slot reads such a frame whole, and tun never
                // hands out one larger than a slot; a socket standing in for the tap might.
                // It cannot wait in order, so it goes, counted.
                self.drop_oversize(n, t);
            } else {
                if self.mrg && n > cap {
                    self.gather = GATHER_FRAMES;
                }
                self.stage(idx, j, n, cap, t)?;
            }
        }
        if read > 0 {
            self.copy = largest <= COPY_MAX;
        }
        self.batch = if drained {
            (read + 1).min(RX_BATCH)
        } else {
            (self.batch * 2).min(RX_BATCH)
        };
        if refused {
            warn!(
                "RX: the kernel refuses non-blocking tap reads through io_uring (EOPNOTSUPP); \
                 reading with readv from now on"
            );
            self.ring = None;
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(drained),
        }
    }

    /// Stage a frame of `n` bytes read into window chain `idx` (capacity `cap`, the first of the
    /// chains the read had if it had several) and the tail of slot `slot`: its head is copied
    /// into the slot, so the whole frame waits there.
    fn stage(
        &mut self,
        idx: usize,
        slot: usize,
        n: usize,
        cap: usize,
        t: &mut Tally,
    ) -> Result<(), RxError> {
        let skip: usize = self.win.chains.iter().take(idx).map(|c| c.nsegs).sum();
        let buf = &mut self.carry.staging[slot * SLOT..(slot + 1) * SLOT];
        let head = n.min(cap);
        let mut off = 0;
        for s in self.win.segs.iter().skip(skip) {
            if off >= head {
                break;
            }
            let len = (s.len as usize).min(head - off);
            self.q
                .memory()
                .read_slice(&mut buf[off..off + len], s.addr)
                .map_err(|_| RingError::RingMemory(s.addr.0))?;
            off += len;
        }
        self.hold(slot, n, t);
        Ok(())
    }

    /// A frame of `n` bytes (header included) fills the front of the window: set num_buffers and
    /// write the used entries (published later, once per batch).
    fn complete_frame(&mut self, n: usize, t: &mut Tally) -> Result<(), RxError> {
        let mut chains = 0usize;
        let mut left = n;
        for c in self.win.chains.iter() {
            if left == 0 {
                break;
            }
            left = left.saturating_sub(c.cap as usize);
            chains += 1;
        }
        if self.hdr_len == HDR_LEN {
            // Exact: a frame spans at most the window, a ring of chains (<= 32768).
            #[allow(clippy::cast_possible_truncation)]
            let num_buffers = if self.mrg { chains as u16 } else { 1 };
            self.write_front(NUM_BUFFERS_OFFSET, &num_buffers.to_le_bytes());
        }
        if self.q.logging() {
            // The frame's bytes, header with `num_buffers` included, once all are written: a
            // mark set before a write can be collected (and cleared) by the frontend's log sync
            // and the page copied before the write lands, leaving the destination a stale page
            // that is no longer marked.
            let mut left = n;
            for s in self.win.segs.iter() {
                if left == 0 {
                    break;
                }
                let len = (s.len as usize).min(left);
                self.q.log_write(s.addr.0, len as u64);
                left -= len;
            }
        }
        let mut left = n;
        for _ in 0..chains {
            let c = self.win.pop_front();
            let len = u32::try_from(left).map_or(c.cap, |l| l.min(c.cap));
            left -= len as usize;
            self.q.add_used(c.head, len)?;
        }
        t.frames += 1;
        t.bytes += n.saturating_sub(self.hdr_len) as u64;
        Ok(())
    }

    /// Write `bytes` at `offset` into the window's front buffers (the header may be split).
    fn write_front(&self, mut offset: usize, bytes: &[u8]) {
        let mut bytes = bytes.iter();
        for s in self.win.segs.iter() {
            let len = s.len as usize;
            if offset >= len {
                offset -= len;
                continue;
            }
            for (i, b) in (offset..len).zip(bytes.by_ref()) {
                // SAFETY: `i < s.len`, and the segment's `len` bytes at `host` were mapped from
                // guest memory by `map_chain` and stay mapped while the worker holds the memory.
                unsafe { s.host.add(i).write_volatile(*b) };
            }
            if bytes.len() == 0 {
                break;
            }
            offset = 0;
        }
    }

    /// Try to move the first staged frame into guest buffers. False: not enough room yet.
    fn deliver_staged(&mut self, t: &mut Tally) -> Result<bool, RxError> {
        let Some(&Staged { slot, len: n }) = self.carry.staged.front() else {
            return Ok(true);
        };
        let want = if self.mrg { n } else { 1 };
        self.fill_window(want, 1, t)?;
        let room = self.room();
        if room < n {
            // Mergeable: hopeless only once every chain of the ring is ours and still too
            // small (however many segments each has). Otherwise the first buffer decides.
            let hopeless = if self.mrg {
                self.win.chains.len() == usize::from(self.q.size())
            } else {
                !self.win.chains.is_empty()
            };
            if hopeless {
                if let Some(s) = self.oversize_log.allow() {
                    error!(
                        "RX frame of {n} bytes dropped: larger than the guest's buffers can hold \
                         ({room} bytes{}){}",
                        if self.mrg {
                            " in the whole ring"
                        } else {
                            " in one buffer"
                        },
                        ratelog::suppressed(s)
                    );
                }
                self.carry.staged.pop_front();
                t.oversize += 1;
                return Ok(true);
            }
            return Ok(false);
        }
        self.copy_in(slot, n);
        self.carry.staged.pop_front();
        self.complete_frame(n, t)?;
        Ok(true)
    }

    /// Bytes of the window a frame can fill now: all of it when buffers merge, else the first
    /// chain.
    fn room(&self) -> usize {
        if self.mrg {
            self.win.cap
        } else {
            self.win.chains.front().map_or(0, |c| c.cap as usize)
        }
    }

    /// A frame of `n` bytes read whole into staging slot `slot`: into the guest now if no frame
    /// waits ahead of it and the window has room, else it waits in the slot, in order.
    fn place(&mut self, slot: usize, n: usize, t: &mut Tally) -> Result<(), RxError> {
        if n > SLOT {
            // Truncated (tun reports a frame's whole length): tun never hands out one larger
            // than a slot.
            self.drop_oversize(n, t);
            return Ok(());
        }
        if self.carry.staged.is_empty() && self.room() >= n {
            self.copy_in(slot, n);
            return self.complete_frame(n, t);
        }
        self.hold(slot, n, t);
        Ok(())
    }

    /// A frame of `n` bytes now whole in staging slot `slot` waits there for room, in order.
    fn hold(&mut self, slot: usize, n: usize, t: &mut Tally) {
        self.carry.staged.push_back(Staged { slot, len: n });
        self.carry.hdr_len = self.hdr_len;
        t.staged += 1;
    }

    /// A frame of `n` bytes, more than a staging slot holds, is dropped and counted.
    fn drop_oversize(&mut self, n: usize, t: &mut Tally) {
        if let Some(s) = self.oversize_log.allow() {
            error!(
                "RX frame of {n} bytes dropped: larger than a staging slot{}",
                ratelog::suppressed(s)
            );
        }
        t.oversize += 1;
    }

    /// Copy the first `n` bytes of staging slot `slot` into the window's front buffers, which
    /// the caller checked can hold them.
    fn copy_in(&self, slot: usize, n: usize) {
        let src = &self.carry.slot(slot)[..n];
        let mut off = 0;
        for s in self.win.segs.iter() {
            if off >= n {
                break;
            }
            let len = (s.len as usize).min(n - off);
            // SAFETY: the segment's `len` bytes at `host` were mapped from guest memory by the
            // chain walk and stay mapped while the worker holds the memory; the guest may write
            // them concurrently, which a volatile slice allows.
            let dst = unsafe { VolatileSlice::new(s.host, len) };
            dst.copy_from(&src[off..off + len]);
            off += len;
        }
    }
}
