//! TX: guest → tap.
//!
//! Each chain is written to the tap with one writev straight from guest memory, vnet header
//! included (the tap's header size is set to what the guest negotiated). When the tap would block,
//! the chain goes back to the avail ring and the worker waits for the tap to become writable: the
//! frame is kept, not dropped. A malformed chain is completed with length 0, counted, and logged
//! (at most once a second).

use std::io;

use libc::iovec;
use log::warn;
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use crate::ratelog::{self, RateLimited};
use crate::ring::{DeviceQueue, RingError, Segment, Verdict, MAX_CHAIN_SEGS};
use crate::rx::Notifier;
use crate::stats::{self, PairStats};
use crate::tap::Tap;

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
    segs: Vec<Segment>,
    iovs: Vec<iovec>,
    bad_log: RateLimited,
    refused_log: RateLimited,
}

impl Tx {
    pub fn new(q: DeviceQueue, hdr_len: usize, call: Notifier) -> Self {
        Tx {
            q,
            hdr_len,
            call,
            segs: Vec::with_capacity(MAX_CHAIN_SEGS),
            iovs: Vec::with_capacity(MAX_CHAIN_SEGS),
            bad_log: RateLimited::default(),
            refused_log: RateLimited::default(),
        }
    }

    pub fn into_queue(self) -> virtio_queue::Queue {
        self.q.into_queue(0)
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
            let max = (FRAME_BUDGET - t.frames) as usize;
            let mut stop = None;
            let (hdr_len, iovs) = (self.hdr_len, &mut self.iovs);
            let (bad_log, refused_log) = (&mut self.bad_log, &mut self.refused_log);
            let taken = self.q.pop_batch(
                mem,
                false,
                hdr_len,
                max,
                &mut self.segs,
                |head, res, segs| {
                    if t.bytes >= BYTE_BUDGET {
                        stop = Some(Ok(TxOutcome::Budget));
                        return Verdict::Rewind;
                    }
                    let len = match res {
                        Ok(len) => len,
                        Err(e) => {
                            if let Some(n) = bad_log.allow() {
                                warn!("TX chain {head} rejected: {e}{}", ratelog::suppressed(n));
                            }
                            t.bad += 1;
                            return Verdict::Complete;
                        }
                    };
                    iovs.clear();
                    iovs.extend(segs.iter().map(Segment::iovec));
                    match tap.writev(iovs) {
                        Ok(_) => {
                            t.frames += 1;
                            t.bytes += u64::from(len) - hdr_len as u64;
                        }
                        // The frame stays in the ring until the tap has room.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            t.blocked += 1;
                            stop = Some(Ok(TxOutcome::TapFull));
                            return Verdict::Rewind;
                        }
                        Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                            stop = Some(Err(TxError::TapGone(tap.name().to_string(), e)));
                            return Verdict::Rewind;
                        }
                        Err(e) => {
                            if let Some(n) = refused_log.allow() {
                                warn!(
                                    "tap {} refused a {len}-byte TX frame: {e}{}",
                                    tap.name(),
                                    ratelog::suppressed(n)
                                );
                            }
                            t.refused += 1;
                        }
                    }
                    Verdict::Complete
                },
            )?;
            if let Some(outcome) = stop {
                return outcome;
            }
            if taken < max {
                if self.q.arm_kick()? {
                    continue;
                }
                return Ok(TxOutcome::Empty);
            }
        }
    }
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
