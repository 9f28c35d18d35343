//! TX: guest → tap.
//!
//! Each chain is written to the tap with one writev straight from guest memory, vnet header
//! included (the tap's header size is set to what the guest negotiated). When the tap would block,
//! the chain goes back to the avail ring and the worker waits for the tap to become writable: the
//! frame is kept, not dropped. A malformed chain is completed with length 0, counted, and logged
//! (at most once a second).
//!
//! A tap that refuses frames is not congestion. When the kernel refuses io_uring's writes
//! (EOPNOTSUPP: tun before Linux 6.4, if the start-up probe was ever wrong) TX switches to writev
//! for good and writes the refused frames again. When the tap refuses every frame with the same
//! error for a second (at least `REFUSING_FRAMES` of them, none accepted), the pair stops with
//! an error in the log and the metrics instead of dropping the guest's traffic a frame at a time
//! behind rate-limited warnings. A tap that is down (EIO) is the one exception: that is the
//! operator's choice, and the pair goes on once it is up.

use std::io;
use std::time::{Duration, Instant};

use libc::iovec;
use log::{error, warn};
use thiserror::Error;

use crate::ratelog::{self, RateLimited};
use crate::ring::{
    ChainError, DeviceQueue, RingError, Segment, Verdict, CHAIN_BUDGET, DESC_BUDGET,
    GARBAGE_CHAINS, MAX_CHAIN_SEGS,
};
use crate::stats::{self, PairStats};
use crate::tap::Tap;
use crate::uring::{TxRing, BATCH};

pub const FRAME_BUDGET: u64 = 256;
pub const BYTE_BUDGET: u64 = 512 * 1024;

/// Refusals in a row (same error, nothing accepted) that stop the pair, once they have lasted
/// `REFUSING_TIME`.
const REFUSING_FRAMES: u64 = 64;
const REFUSING_TIME: Duration = Duration::from_secs(1);

/// The most one batch waits for the tap to take frames that can no longer go back to the ring
/// (`Tx::complete`), all of them together: a worker sees stop requests only between batches,
/// and must stop within `worker::STOP_DEADLINE`.
const HELD_WAIT: Duration = Duration::from_millis(100);

#[derive(Debug, Error)]
pub enum TxError {
    #[error("TX ring: {0}")]
    Ring(#[from] RingError),
    #[error("tap {0} is gone: {1}")]
    TapGone(String, io::Error),
    #[error("the guest's buffers are not all backed by its memory file (EFAULT on write)")]
    GuestMemory,
    #[error(
        "tap {tap} refused every TX frame for {secs:.1} s ({frames} frames, none accepted): \
         {err}; stopping this queue pair"
    )]
    TapRefusesAll {
        tap: String,
        frames: u64,
        secs: f64,
        err: io::Error,
    },
}

/// Where TX stands between two batches; the worker derives what it waits for from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxState {
    /// There may be work right away: the last batch ran out of budget, or the guest kicked.
    Ready,
    /// The guest has nothing more to send: wait for its kick.
    Idle,
    /// The tap would block: wait for it to become writable (the frame stays in the ring).
    TapFull,
}

pub struct Tx {
    q: DeviceQueue,
    state: TxState,
    hdr_len: usize,
    ring: Option<TxRing>,
    segs: Vec<Segment>,
    /// The gathered batch: its chains in avail order, their iovecs, and each chain's result.
    batch: Vec<Gathered>,
    iovs: Vec<iovec>,
    results: Vec<i32>,
    bad_log: RateLimited,
    refused_log: RateLimited,
    /// The tap's current run of refusals, if its last write was refused.
    refusing: Option<Refusing>,
    /// Malformed chains popped in a row (see `GARBAGE_CHAINS`).
    garbage: u32,
}

/// A run of frames the tap refused with one error and nothing accepted in between.
struct Refusing {
    errno: i32,
    since: Instant,
    frames: u64,
}

/// A chain popped for this batch.
struct Gathered {
    head: u16,
    /// Frame length (vnet header included), or why the chain was rejected.
    len: Result<u32, ChainError>,
    /// Where its iovecs are in `Tx::iovs` (none for a rejected chain).
    iovs: std::ops::Range<usize>,
}

/// `results` entry of a chain that was not written (a write before it would block).
const NOT_TRIED: i32 = i32::MIN;
/// `results` entry of a chain still to be written with writev.
const PENDING: i32 = i32::MIN + 1;

impl Tx {
    pub fn new(q: DeviceQueue, hdr_len: usize, ring: Option<TxRing>) -> Self {
        Tx {
            q,
            state: TxState::Ready,
            hdr_len,
            ring,
            segs: Vec::with_capacity(MAX_CHAIN_SEGS),
            batch: Vec::with_capacity(BATCH),
            iovs: Vec::with_capacity(BATCH * MAX_CHAIN_SEGS),
            results: vec![0; BATCH],
            bad_log: RateLimited::default(),
            refused_log: RateLimited::default(),
            refusing: None,
            garbage: 0,
        }
    }

    /// The queue, and the io_uring for the next worker.
    pub fn into_parts(self) -> (virtio_queue::Queue, Option<TxRing>) {
        (self.q.into_queue(0), self.ring)
    }

    pub fn state(&self) -> TxState {
        self.state
    }

    /// The guest kicked: it posted frames (a full tap still has to make room first).
    pub fn on_kick(&mut self) {
        if self.state == TxState::Idle {
            self.state = TxState::Ready;
        }
    }

    /// The tap became writable.
    pub fn tap_writable(&mut self) {
        if self.state == TxState::TapFull {
            self.state = TxState::Ready;
        }
    }

    /// Busy polling: resume an idle TX when the guest posted frames (it may not kick yet).
    pub fn poll_guest(&mut self) -> Result<bool, TxError> {
        if self.state == TxState::Idle && self.q.pending()? > 0 {
            self.state = TxState::Ready;
            return Ok(true);
        }
        Ok(false)
    }

    /// Send frames until the guest has none, the tap is full, or the budget is spent; returns
    /// the state TX is left in.
    pub fn process(&mut self, tap: &Tap, stats: &PairStats) -> Result<TxState, TxError> {
        let mut t = Tally::default();
        let result = self.run_batch(tap, stats, &mut t);
        if let Err(TxError::TapRefusesAll { .. }) = &result {
            stats::inc(&stats.tx_stops_tap_refusing);
        }
        self.settle(stats, &mut t)?;
        let state = result?;
        self.state = state;
        Ok(state)
    }

    /// Count what was done since the last settle, then publish the used entries and interrupt
    /// the guest if it asked for it. Done after every batch, not once per `process`: a guest
    /// that waits for room (Linux's delayed TX interrupt asks for one at 3/4 of the ring) learns
    /// of it one batch after the point it asked for, not up to a whole budget later, so it
    /// refills before the ring runs dry.
    fn settle(&mut self, stats: &PairStats, t: &mut Tally) -> Result<(), TxError> {
        // Counted before the publish, as in RX: the guest never sees more than the counters.
        let c = std::mem::take(&mut t.counted);
        stats::add(&stats.tx_frames, c.frames);
        stats::add(&stats.tx_bytes, c.bytes);
        stats::add(&stats.tx_dropped_bad_desc, c.bad);
        stats::add(&stats.tx_dropped_tap_error, c.refused);
        stats::add(&stats.tx_blocked, c.blocked);
        stats::add(&stats.tx_io_uring_fallbacks, c.uring_fallbacks);
        let published = self.q.publish().and_then(|_| self.q.interrupt());
        if let Ok(true) = published {
            stats::inc(&stats.tx_interrupts);
        }
        stats::add(&stats.dirty_pages_logged, self.q.take_logged());
        published?;
        Ok(())
    }

    fn run_batch(
        &mut self,
        tap: &Tap,
        stats: &PairStats,
        t: &mut Tally,
    ) -> Result<TxState, TxError> {
        self.q.suppress_kicks()?;
        loop {
            if t.spent() {
                return Ok(TxState::Ready);
            }
            let max = usize::try_from(FRAME_BUDGET - t.frames)
                .unwrap_or(BATCH)
                .min(BATCH);
            let (taken, budget_hit) = self.gather(max, BYTE_BUDGET - t.bytes)?;
            t.popped += taken as u64;
            t.visited += self.q.take_visited();
            if self.garbage >= GARBAGE_CHAINS {
                // Every chain of this batch was rejected (the run is longer than a batch): they
                // go back to the guest, counted, before the queue stops.
                self.complete(tap, t)?;
                return Err(RingError::Garbage(self.garbage).into());
            }
            if !self.batch.is_empty() {
                self.write(tap, t);
                if let Some(stop) = self.complete(tap, t)? {
                    return stop;
                }
                self.settle(stats, t)?;
            }
            if budget_hit {
                return Ok(TxState::Ready);
            }
            if taken < max {
                if self.q.arm_kick()? {
                    continue;
                }
                return Ok(TxState::Idle);
            }
        }
    }

    /// Pop up to `max` chains (fewer once they hold `bytes_left` bytes of frames). Returns how
    /// many were popped and whether the byte budget stopped it.
    fn gather(&mut self, max: usize, bytes_left: u64) -> Result<(usize, bool), TxError> {
        self.batch.clear();
        self.iovs.clear();
        let (batch, iovs, garbage) = (&mut self.batch, &mut self.iovs, &mut self.garbage);
        let hdr_len = self.hdr_len as u64;
        let mut bytes = 0u64;
        let mut budget_hit = false;
        let taken = self.q.pop_batch(
            false,
            self.hdr_len,
            max,
            &mut self.segs,
            |head, len, segs| {
                if bytes >= bytes_left {
                    budget_hit = true;
                    return Verdict::Rewind;
                }
                let start = iovs.len();
                match len {
                    Ok(l) => {
                        *garbage = 0;
                        bytes += u64::from(l) - hdr_len;
                        // The header and the frame's start, often two segments.
                        segs.iter().take(2).for_each(Segment::prefetch);
                        iovs.extend(segs.iter().map(Segment::iovec));
                    }
                    Err(_) => *garbage += 1,
                }
                batch.push(Gathered {
                    head,
                    len,
                    iovs: start..iovs.len(),
                });
                // Completed after the writes, in ring order (see `complete`).
                Verdict::Keep
            },
        )?;
        Ok((taken, budget_hit))
    }

    /// Write the gathered frames: one io_uring submission, or one writev each up to the first
    /// that would block. Fills `results` (bytes, -errno, or NOT_TRIED).
    fn write(&mut self, tap: &Tap, t: &mut Tally) {
        let n = self.batch.len();
        let results = &mut self.results[..n];
        if let Some(ring) = self.ring.as_mut() {
            // Rejected chains have no iovecs and are not submitted.
            let frames = self.batch.iter().map(|g| &self.iovs[g.iovs.clone()]);
            // SAFETY: the iovecs point into guest memory mapped by `map_chain`, which stays
            // mapped while the worker holds the memory, i.e. for this call.
            match unsafe { ring.submit(frames, results) } {
                Ok(()) if !results.contains(&-libc::EOPNOTSUPP) => return,
                Ok(()) => {
                    // The kernel checks the flag before the file sees the write, so every frame
                    // of the batch was refused and none went out: writing them again keeps the
                    // order.
                    error!(
                        "tap {}: the kernel refuses io_uring's non-blocking writes to the tap \
                         (EOPNOTSUPP; tun takes them from Linux 6.4); TX uses writev from now on \
                         and writes the refused frames again",
                        tap.name()
                    );
                    for r in results.iter_mut().filter(|r| **r == -libc::EOPNOTSUPP) {
                        *r = PENDING;
                    }
                }
                Err(e) => {
                    // Never seen; the frames were not written (the kernel refused the whole
                    // submission), so writev takes over for good.
                    error!(
                        "tap {}: io_uring failed ({e}); TX uses writev from now on",
                        tap.name()
                    );
                    results.fill(PENDING);
                }
            }
            self.ring = None;
            t.counted.uring_fallbacks += 1;
        } else {
            results.fill(PENDING);
        }
        let mut blocked = false;
        for (r, g) in results.iter_mut().zip(&self.batch) {
            if *r != PENDING {
                continue;
            }
            if blocked {
                *r = NOT_TRIED;
                continue;
            }
            if g.len.is_err() {
                *r = 0;
                continue;
            }
            *r = match tap.writev(&self.iovs[g.iovs.clone()]) {
                Ok(len) => i32::try_from(len).unwrap_or(i32::MAX),
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    blocked = errno == libc::EAGAIN || errno == libc::EBADFD;
                    -errno
                }
            };
        }
    }

    /// Complete the batch in ring order. A chain the tap could not take yet goes back to the
    /// avail ring with everything after it, so no frame is lost or reordered. Returns the
    /// worker's next step when the tap stopped the batch.
    fn complete(
        &mut self,
        tap: &Tap,
        t: &mut Tally,
    ) -> Result<Option<Result<TxState, TxError>>, TxError> {
        let n = self.batch.len();
        let held = |r: i32| r == -libc::EAGAIN || r == -libc::EBADFD || r == NOT_TRIED;
        let cut = (0..n).find(|&i| self.batch[i].len.is_ok() && held(self.results[i]));
        // io_uring runs the writes one after the other; if the tap made room between two of
        // them, a later frame went out while an earlier one was refused. That frame cannot go
        // back to the ring any more: the earlier ones are written now, waiting for room.
        let inverted = cut.is_some_and(|c| {
            (c + 1..n).any(|i| self.batch[i].len.is_ok() && !held(self.results[i]))
        });
        if inverted {
            let deadline = Instant::now() + HELD_WAIT;
            for i in 0..n {
                if self.batch[i].len.is_ok() && held(self.results[i]) {
                    let iovs = self.batch[i].iovs.clone();
                    self.results[i] = write_waiting(tap, &self.iovs[iovs], deadline);
                }
            }
        }
        let end = if inverted { n } else { cut.unwrap_or(n) };
        let mut gone = false;
        let mut fault = false;
        for i in 0..end {
            let Gathered { head, len, .. } = self.batch[i];
            match len {
                Ok(len) => {
                    let r = self.results[i];
                    // Only reachable when inverted: the tap went away mid-batch. The frames
                    // after it may have been written, so nothing goes back to the ring.
                    gone |= r == -libc::EBADFD;
                    // The kernel could not read a guest buffer: the guest's memory, not the tap.
                    fault |= r == -libc::EFAULT;
                    if r >= 0 {
                        t.sent(u64::from(len) - self.hdr_len as u64);
                        self.refusing = None;
                    } else {
                        if let Some(s) = self.refused_log.allow() {
                            warn!(
                                "tap {} refused a {len}-byte TX frame: {}{}{}",
                                tap.name(),
                                io::Error::from_raw_os_error(-r),
                                if r == -libc::EIO {
                                    " (is the tap down?)"
                                } else {
                                    ""
                                },
                                ratelog::suppressed(s)
                            );
                        }
                        t.counted.refused += 1;
                        match &mut self.refusing {
                            Some(run) if run.errno == -r => run.frames += 1,
                            _ => {
                                self.refusing = Some(Refusing {
                                    errno: -r,
                                    since: Instant::now(),
                                    frames: 1,
                                })
                            }
                        }
                    }
                }
                Err(e) => {
                    if let Some(s) = self.bad_log.allow() {
                        warn!("TX chain {head} rejected: {e}{}", ratelog::suppressed(s));
                    }
                    t.counted.bad += 1;
                }
            }
            self.q.add_used(head, 0)?;
        }
        let tap_gone = || {
            let e = io::Error::from_raw_os_error(libc::EBADFD);
            Ok(Some(Err(TxError::TapGone(tap.name().to_string(), e))))
        };
        if gone {
            return tap_gone();
        }
        if fault {
            return Ok(Some(Err(TxError::GuestMemory)));
        }
        if let Some(run) = self.refusing.as_ref().filter(|r| {
            r.errno != libc::EIO
                && r.frames >= REFUSING_FRAMES
                && r.since.elapsed() >= REFUSING_TIME
        }) {
            return Ok(Some(Err(TxError::TapRefusesAll {
                tap: tap.name().to_string(),
                frames: run.frames,
                secs: run.since.elapsed().as_secs_f64(),
                err: io::Error::from_raw_os_error(run.errno),
            })));
        }
        let Some(cut) = cut.filter(|_| !inverted) else {
            return Ok(None);
        };
        // Exact: a batch holds at most BATCH (64) chains.
        #[allow(clippy::cast_possible_truncation)]
        self.q.rewind((n - cut) as u16);
        if self.results[cut] == -libc::EBADFD {
            return tap_gone();
        }
        // The frame stays in the ring until the tap has room.
        t.counted.blocked += 1;
        Ok(Some(Ok(TxState::TapFull)))
    }
}

/// Write one frame, waiting for the tap to have room (the rare path of `Tx::complete`): until
/// `deadline` (shared by the batch's frames) or 50 attempts, then the frame is refused with the
/// last error.
fn write_waiting(tap: &Tap, iov: &[iovec], deadline: Instant) -> i32 {
    use std::os::fd::AsRawFd;
    let mut last = -libc::EAGAIN;
    for _ in 0..50 {
        match tap.writev(iov) {
            Ok(n) => return i32::try_from(n).unwrap_or(i32::MAX),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return -libc::EAGAIN;
                }
                let mut pfd = libc::pollfd {
                    fd: tap.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // Rounded up, so a wait never ends before the tap could have made room.
                let ms = i32::try_from(left.as_micros().div_ceil(1000)).map_or(20, |m| m.min(20));
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, ms) };
            }
            Err(e) => {
                last = -e.raw_os_error().unwrap_or(libc::EIO);
                if last == -libc::EBADFD {
                    return last;
                }
            }
        }
    }
    last
}

/// Totals of one batch, added to the shared counters once.
#[derive(Default)]
struct Tally {
    /// Chains popped, good or rejected, and descriptors visited: the batch's work.
    popped: u64,
    visited: u64,
    frames: u64,
    bytes: u64,
    /// What the counters have not been told yet (`Tx::settle`).
    counted: Counts,
}

#[derive(Default)]
struct Counts {
    frames: u64,
    bytes: u64,
    bad: u64,
    refused: u64,
    blocked: u64,
    uring_fallbacks: u64,
}

impl Tally {
    fn sent(&mut self, bytes: u64) {
        self.frames += 1;
        self.bytes += bytes;
        self.counted.frames += 1;
        self.counted.bytes += bytes;
    }

    fn spent(&self) -> bool {
        self.frames >= FRAME_BUDGET
            || self.bytes >= BYTE_BUDGET
            || self.popped >= CHAIN_BUDGET
            || self.visited >= DESC_BUDGET
    }
}
