//! TX: guest → tap.
//!
//! Each chain is written to the tap with one writev straight from guest memory, vnet header
//! included (the tap's header size is set to what the guest negotiated). When the tap would block,
//! the chain goes back to the avail ring and the worker waits for the tap to become writable: the
//! frame is kept, not dropped. A malformed chain is completed with length 0, counted, and logged
//! (at most once a second).

use std::io;

use libc::iovec;
use log::{error, warn};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use crate::ratelog::{self, RateLimited};
use crate::ring::{ChainError, DeviceQueue, RingError, Segment, Verdict, MAX_CHAIN_SEGS};
use crate::rx::Notifier;
use crate::stats::{self, PairStats};
use crate::tap::Tap;
use crate::uring::{TxRing, BATCH};

pub const FRAME_BUDGET: u64 = 256;
pub const BYTE_BUDGET: u64 = 512 * 1024;

#[derive(Debug, Error)]
pub enum TxError {
    #[error("TX ring: {0}")]
    Ring(#[from] RingError),
    #[error("tap {0} is gone: {1}")]
    TapGone(String, io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxOutcome {
    Budget,
    /// The guest has nothing more to send.
    Empty,
    /// The tap would block; wait for it to become writable.
    TapFull,
}

pub struct Tx {
    q: DeviceQueue,
    hdr_len: usize,
    call: Notifier,
    ring: Option<TxRing>,
    segs: Vec<Segment>,
    /// The gathered batch: its chains in avail order, their iovecs, and each chain's result.
    batch: Vec<Gathered>,
    iovs: Vec<iovec>,
    results: Vec<i32>,
    bad_log: RateLimited,
    refused_log: RateLimited,
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

impl Tx {
    pub fn new(q: DeviceQueue, hdr_len: usize, call: Notifier, ring: Option<TxRing>) -> Self {
        Tx {
            q,
            hdr_len,
            call,
            ring,
            segs: Vec::with_capacity(MAX_CHAIN_SEGS),
            batch: Vec::with_capacity(BATCH),
            iovs: Vec::with_capacity(BATCH * MAX_CHAIN_SEGS),
            results: vec![0; BATCH],
            bad_log: RateLimited::default(),
            refused_log: RateLimited::default(),
        }
    }

    /// The queue, and the io_uring for the next worker.
    pub fn into_parts(self) -> (virtio_queue::Queue, Option<TxRing>) {
        (self.q.into_queue(0), self.ring)
    }

    /// Busy polling: whether the guest posted frames.
    pub fn poll_guest(&self) -> Result<bool, TxError> {
        Ok(self.q.pending()? > 0)
    }

    pub fn process(
        &mut self,
        mem: &GuestMemoryMmap,
        tap: &Tap,
        stats: &PairStats,
    ) -> Result<TxOutcome, TxError> {
        let mut t = Tally::default();
        let result = self.run_batch(mem, tap, &mut t);
        // Counted before the publish, as in RX: the guest never sees more than the counters.
        stats::add(&stats.tx_frames, t.frames);
        stats::add(&stats.tx_bytes, t.bytes);
        stats::add(&stats.tx_dropped_bad_desc, t.bad);
        stats::add(&stats.tx_dropped_tap_error, t.refused);
        stats::add(&stats.tx_blocked, t.blocked);
        let published = self.q.publish().and_then(|_| self.q.needs_interrupt());
        if let Ok(true) = published {
            self.call.signal();
            stats::inc(&stats.tx_interrupts);
        }
        published?;
        result
    }

    fn run_batch(
        &mut self,
        mem: &GuestMemoryMmap,
        tap: &Tap,
        t: &mut Tally,
    ) -> Result<TxOutcome, TxError> {
        self.q.suppress_kicks()?;
        loop {
            if t.frames >= FRAME_BUDGET || t.bytes >= BYTE_BUDGET {
                return Ok(TxOutcome::Budget);
            }
            let max = ((FRAME_BUDGET - t.frames) as usize).min(BATCH);
            let (taken, budget_hit) = self.gather(mem, max, BYTE_BUDGET - t.bytes)?;
            if !self.batch.is_empty() {
                self.write(tap);
                if let Some(stop) = self.complete(tap, t)? {
                    return stop;
                }
            }
            if budget_hit {
                return Ok(TxOutcome::Budget);
            }
            if taken < max {
                if self.q.arm_kick()? {
                    continue;
                }
                return Ok(TxOutcome::Empty);
            }
        }
    }

    /// Pop up to `max` chains (fewer once they hold `bytes_left` bytes of frames). Returns how
    /// many were popped and whether the byte budget stopped it.
    fn gather(
        &mut self,
        mem: &GuestMemoryMmap,
        max: usize,
        bytes_left: u64,
    ) -> Result<(usize, bool), TxError> {
        self.batch.clear();
        self.iovs.clear();
        let (batch, iovs) = (&mut self.batch, &mut self.iovs);
        let hdr_len = self.hdr_len as u64;
        let mut bytes = 0u64;
        let mut budget_hit = false;
        let taken = self.q.pop_batch(
            mem,
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
                if let Ok(l) = len {
                    bytes += u64::from(l) - hdr_len;
                    iovs.extend(segs.iter().map(Segment::iovec));
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
    fn write(&mut self, tap: &Tap) {
        let n = self.batch.len();
        if let Some(ring) = self.ring.as_mut() {
            // Rejected chains have no iovecs and are not submitted.
            let frames = self.batch.iter().map(|g| &self.iovs[g.iovs.clone()]);
            // SAFETY: the iovecs point into guest memory mapped by `map_chain`, which stays
            // mapped while the worker holds the memory, i.e. for this call.
            match unsafe { ring.write_batch(frames, &mut self.results[..n]) } {
                Ok(()) => return,
                Err(e) => {
                    // Never seen; the frames were not written (the kernel refused the whole
                    // submission), so writev takes over for good.
                    error!(
                        "tap {}: io_uring failed ({e}); TX uses writev from now on",
                        tap.name()
                    );
                    self.ring = None;
                }
            }
        }
        let mut blocked = false;
        for (i, g) in self.batch.iter().enumerate() {
            if blocked {
                self.results[i] = NOT_TRIED;
                continue;
            }
            if g.len.is_err() {
                self.results[i] = 0;
                continue;
            }
            self.results[i] = match tap.writev(&self.iovs[g.iovs.clone()]) {
                Ok(len) => len as i32,
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
    ) -> Result<Option<Result<TxOutcome, TxError>>, TxError> {
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
            for i in 0..n {
                if self.batch[i].len.is_ok() && held(self.results[i]) {
                    let iovs = self.batch[i].iovs.clone();
                    self.results[i] = write_waiting(tap, &self.iovs[iovs]);
                }
            }
        }
        let end = if inverted { n } else { cut.unwrap_or(n) };
        let mut gone = false;
        for i in 0..end {
            let Gathered { head, len, .. } = self.batch[i];
            match len {
                Ok(len) => {
                    let r = self.results[i];
                    // Only reachable when inverted: the tap went away mid-batch. The frames
                    // after it may have been written, so nothing goes back to the ring.
                    gone |= r == -libc::EBADFD;
                    if r >= 0 {
                        t.frames += 1;
                        t.bytes += u64::from(len) - self.hdr_len as u64;
                    } else {
                        if let Some(s) = self.refused_log.allow() {
                            warn!(
                                "tap {} refused a {len}-byte TX frame: {}{}",
                                tap.name(),
                                io::Error::from_raw_os_error(-r),
                                ratelog::suppressed(s)
                            );
                        }
                        t.refused += 1;
                    }
                }
                Err(e) => {
                    if let Some(s) = self.bad_log.allow() {
                        warn!("TX chain {head} rejected: {e}{}", ratelog::suppressed(s));
                    }
                    t.bad += 1;
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
        let Some(cut) = cut.filter(|_| !inverted) else {
            return Ok(None);
        };
        self.q.rewind((n - cut) as u16);
        if self.results[cut] == -libc::EBADFD {
            return tap_gone();
        }
        // The frame stays in the ring until the tap has room.
        t.blocked += 1;
        Ok(Some(Ok(TxOutcome::TapFull)))
    }
}

/// Write one frame, waiting for the tap to have room (the rare path of `Tx::complete`): up to
/// about a second, then the frame is refused with the last error.
fn write_waiting(tap: &Tap, iov: &[iovec]) -> i32 {
    use std::os::fd::AsRawFd;
    let mut last = -libc::EAGAIN;
    for _ in 0..50 {
        match tap.writev(iov) {
            Ok(n) => return n as i32,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd {
                    fd: tap.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 20) };
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
    frames: u64,
    bytes: u64,
    bad: u64,
    refused: u64,
    blocked: u64,
}
