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
use virtio_queue::QueueOwnedT;
use vm_memory::GuestMemoryMmap;

use crate::ratelog::{self, RateLimited};
use crate::ring::{ChainError, DeviceQueue, RingError, Segment, MAX_CHAIN_SEGS};
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
    pub fn poll_guest(&self, mem: &GuestMemoryMmap) -> Result<bool, TxError> {
        Ok(self.q.pending(mem)? > 0)
    }

    pub fn process(
        &mut self,
        mem: &GuestMemoryMmap,
        tap: &Tap,
        stats: &PairStats,
    ) -> Result<TxOutcome, TxError> {
        let (mut frames, mut bytes, mut bad, mut refused) = (0u64, 0u64, 0u64, 0u64);
        let result = (|| {
            self.q.suppress_kicks(mem)?;
            loop {
                if frames >= FRAME_BUDGET || bytes >= BYTE_BUDGET {
                    return Ok(TxOutcome::Budget);
                }
                let Some((head, res)) = self.q.pop(mem, false, &mut self.segs)? else {
                    if self.q.arm_kick(mem)? {
                        continue;
                    }
                    return Ok(TxOutcome::Empty);
                };
                let len = match res.and_then(|len| {
                    if (len as usize) < self.hdr_len {
                        Err(ChainError::TooSmall(len, self.hdr_len))
                    } else {
                        Ok(len)
                    }
                }) {
                    Ok(len) => len,
                    Err(e) => {
                        if let Some(n) = self.bad_log.allow() {
                            warn!("TX chain {head} rejected: {e}{}", ratelog::suppressed(n));
                        }
                        bad += 1;
                        self.q.add_used(mem, head, 0)?;
                        continue;
                    }
                };
                self.iovs.clear();
                self.iovs.extend(self.segs.iter().map(Segment::iovec));
                match tap.writev(&self.iovs) {
                    Ok(_) => {
                        frames += 1;
                        bytes += u64::from(len) - self.hdr_len as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.q.queue.go_to_previous_position();
                        stats::inc(&stats.tx_blocked);
                        return Ok(TxOutcome::TapFull);
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                        self.q.queue.go_to_previous_position();
                        return Err(TxError::TapGone(tap.name().to_string(), e));
                    }
                    Err(e) => {
                        if let Some(n) = self.refused_log.allow() {
                            warn!(
                                "tap {} refused a {len}-byte TX frame: {e}{}",
                                tap.name(),
                                ratelog::suppressed(n)
                            );
                        }
                        refused += 1;
                    }
                }
                self.q.add_used(mem, head, 0)?;
            }
        })();
        let published = self
            .q
            .publish(mem)
            .and_then(|_| self.q.needs_interrupt(mem));
        if let Ok(true) = published {
            self.call.signal();
            stats::inc(&stats.tx_interrupts);
        }
        stats::add(&stats.tx_frames, frames);
        stats::add(&stats.tx_bytes, bytes);
        stats::add(&stats.tx_dropped_bad_desc, bad);
        stats::add(&stats.tx_dropped_tap_error, refused);
        published?;
        result
    }
}
