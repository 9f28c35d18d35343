//! Device side of a split virtqueue, on top of `virtio_queue::Queue`.
//!
//! `Queue` parses the avail ring and descriptor chains (indirect tables, loop limits). Three things
//! are done here instead, for reasons measured on this project (see field notes):
//! - used entries are written without touching `used.idx`, which is published once per batch, so
//!   the guest never sees the head of a multi-buffer frame before its tail (`Queue::add_used`
//!   publishes per element);
//! - the guest notification is armed by `arm_kick`, which re-checks against `next_avail` after a
//!   full fence; `Queue::enable_notification` cannot be used because RX keeps popped chains it
//!   cannot use yet, and the crate's answer ("avail != next_avail") is then true forever if chains
//!   are rolled back, so we never roll back while running;
//! - the interrupt decision uses the used index at the previous decision, counted here.
//!
//! Notification protocol (virtio 1.2, 2.7.7 and 2.7.10): with VIRTIO_F_EVENT_IDX the device writes
//! `avail_event` and reads `used_event`; without it, it writes `used.flags` (NO_NOTIFY) and reads
//! `avail.flags` (NO_INTERRUPT).

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use libc::iovec;
use thiserror::Error;
use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

/// Most segments accepted in one descriptor chain. Linux uses at most MAX_SKB_FRAGS + 2.
pub const MAX_CHAIN_SEGS: usize = 64;

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    #[error(
        "avail index {avail} is more than the ring size {size} ahead of {next}: ring corrupted"
    )]
    AvailIndex { avail: u16, next: u16, size: u16 },
    #[error("ring memory is not accessible at {0:#x}")]
    RingMemory(u64),
}

/// Why a descriptor chain was rejected. The chain is returned to the guest with length 0.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor {0} has the wrong direction for this queue")]
    WrongDirection(u16),
    #[error("chain ends in a loop, an out-of-range next index or a bad indirect table")]
    Truncated,
    #[error("buffer at {addr:#x} (+{len}) is outside guest memory")]
    BadAddress { addr: u64, len: u32 },
    #[error("chain holds {0} bytes, fewer than the {1}-byte virtio-net header")]
    TooSmall(u32, usize),
    #[error("chain has more than {MAX_CHAIN_SEGS} segments")]
    TooManySegments,
    #[error("chain is empty")]
    Empty,
}

/// A popped chain: its head index and either its total length or why it was rejected.
pub type Popped = (u16, Result<u32, ChainError>);

/// One contiguous piece of a guest buffer, with its host mapping.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
    pub host: *mut u8,
}

impl Segment {
    pub fn iovec(&self) -> iovec {
        iovec {
            iov_base: self.host.cast(),
            iov_len: self.len as usize,
        }
    }
}

/// Vring configuration and the device's position in it.
pub struct DeviceQueue {
    pub queue: Queue,
    event_idx: bool,
    next_used: Wrapping<u16>,
    /// `used.idx` at the last interrupt decision; the next decision looks at what was added since.
    signalled_used: Wrapping<u16>,
}

// SAFETY: a Segment is an address into a guest memory mapping; it is only dereferenced (by
// readv/writev) on the worker thread that owns the mapping and keeps it alive while segments exist.
unsafe impl Send for Segment {}

impl DeviceQueue {
    pub fn new(queue: Queue, event_idx: bool) -> Self {
        let next_used = Wrapping(queue.next_used());
        let mut queue = queue;
        queue.set_event_idx(event_idx);
        DeviceQueue {
            queue,
            event_idx,
            next_used,
            signalled_used: next_used,
        }
    }

    /// Hand the queue back with `next_used` folded in; `rewind` chains popped but not used are
    /// returned to the avail ring (so GET_VRING_BASE reports them as not consumed).
    pub fn into_queue(mut self, rewind: u16) -> Queue {
        self.queue.set_next_used(self.next_used.0);
        let next_avail = Wrapping(self.queue.next_avail()) - Wrapping(rewind);
        self.queue.set_next_avail(next_avail.0);
        self.queue
    }

    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    fn used_addr(&self) -> GuestAddress {
        GuestAddress(self.queue.used_ring())
    }

    fn avail_addr(&self) -> GuestAddress {
        GuestAddress(self.queue.avail_ring())
    }

    pub fn avail_idx(&self, mem: &GuestMemoryMmap) -> Result<Wrapping<u16>, RingError> {
        self.queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|_| RingError::RingMemory(self.queue.avail_ring()))
    }

    /// Chains the guest has posted that we have not popped.
    pub fn pending(&self, mem: &GuestMemoryMmap) -> Result<u16, RingError> {
        let avail = self.avail_idx(mem)?;
        let pending = (avail - Wrapping(self.queue.next_avail())).0;
        if pending > self.size() {
            return Err(RingError::AvailIndex {
                avail: avail.0,
                next: self.queue.next_avail(),
                size: self.size(),
            });
        }
        Ok(pending)
    }

    /// Pop the next chain and map its buffers into `segs` (cleared first). `Ok(None)`: ring empty.
    /// `Ok(Some((head, Err(_))))`: the chain is malformed; the caller completes it with length 0.
    pub fn pop(
        &mut self,
        mem: &GuestMemoryMmap,
        device_writes: bool,
        segs: &mut Vec<Segment>,
    ) -> Result<Option<Popped>, RingError> {
        // One acquire load of avail.idx, in iter(), which also rejects an index more than a ring
        // ahead of us: a corrupted ring.
        let mut it = match self.queue.iter(mem) {
            Ok(it) => it,
            Err(virtio_queue::Error::InvalidAvailRingIndex) => {
                return Err(RingError::AvailIndex {
                    avail: self.avail_idx(mem)?.0,
                    next: self.queue.next_avail(),
                    size: self.size(),
                })
            }
            Err(_) => return Err(RingError::RingMemory(self.queue.avail_ring())),
        };
        let Some(chain) = it.next() else {
            return Ok(None);
        };
        let head = chain.head_index();
        segs.clear();
        Ok(Some((head, map_chain(mem, chain, device_writes, segs))))
    }

    /// Write a used element without publishing it.
    pub fn add_used(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), RingError> {
        let slot = u64::from(self.next_used.0 % self.size());
        let addr = self.used_addr().unchecked_add(4 + slot * 8);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr)
            .map_err(|_| RingError::RingMemory(addr.0))?;
        self.next_used += Wrapping(1);
        Ok(())
    }

    /// Make every used element written so far visible to the guest (one release store).
    pub fn publish(&mut self, mem: &GuestMemoryMmap) -> Result<(), RingError> {
        let addr = self.used_addr().unchecked_add(2);
        mem.store(self.next_used.0.to_le(), addr, Ordering::Release)
            .map_err(|_| RingError::RingMemory(addr.0))
    }

    /// Whether the guest wants an interrupt for what was published since the last decision.
    pub fn needs_interrupt(&mut self, mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        let new = self.next_used;
        let old = self.signalled_used;
        if new == old {
            return Ok(false);
        }
        self.signalled_used = new;
        // The used.idx store must be visible before we read the guest's suppression state, or we
        // could read a stale used_event and skip an interrupt the guest is waiting for.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let off = 4 + 2 * u64::from(self.size());
            let used_event: u16 = self
                .load_avail(mem, off)
                .map(u16::from_le)
                .map_err(|_| RingError::RingMemory(self.queue.avail_ring() + off))?;
            Ok(vring_need_event(used_event, new.0, old.0))
        } else {
            let flags = self
                .load_avail(mem, 0)
                .map(u16::from_le)
                .map_err(|_| RingError::RingMemory(self.queue.avail_ring()))?;
            Ok(flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
        }
    }

    fn load_avail(
        &self,
        mem: &GuestMemoryMmap,
        off: u64,
    ) -> Result<u16, vm_memory::GuestMemoryError> {
        mem.load(self.avail_addr().unchecked_add(off), Ordering::Relaxed)
    }

    /// Ask the guest not to kick (only meaningful without EVENT_IDX; with it, a stale
    /// `avail_event` already suppresses kicks).
    pub fn suppress_kicks(&self, mem: &GuestMemoryMmap) -> Result<(), RingError> {
        if self.event_idx {
            return Ok(());
        }
        let addr = self.used_addr();
        mem.store(
            (VRING_USED_F_NO_NOTIFY as u16).to_le(),
            addr,
            Ordering::Relaxed,
        )
        .map_err(|_| RingError::RingMemory(addr.0))
    }

    /// Ask for a kick when the guest posts beyond what we have popped, then re-check.
    /// Returns true if the guest has posted chains we have not popped (the caller must not sleep).
    ///
    /// This is the consumer half of a store-buffering pair, the seed patch's recipe one level up:
    /// we store `avail_event = next_avail` (or clear NO_NOTIFY), full fence, load `avail.idx`; the
    /// driver stores `avail.idx`, full fence (virtio_mb in virtqueue_kick_prepare), loads
    /// `avail_event`. Under SC-fence semantics at least one side sees the other's store: either
    /// our re-check sees the new index, or the driver sees the event and kicks. A wake-up cannot
    /// be lost.
    ///
    /// The event names `next_avail`, the index we have consumed up to, never an index read from
    /// the ring: a chain posted between our last pop and this call is then caught by the
    /// re-check (it moved `avail.idx` past `next_avail`), while an event set at a freshly read
    /// `avail.idx` would cover it up and the driver, having read the old event, would not kick.
    /// This is sound because RX never rolls popped chains back while running (they wait in its
    /// window), so `next_avail` is never behind an index the driver has been told about.
    pub fn arm_kick(&self, mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        let consumed = Wrapping(self.queue.next_avail());
        if self.event_idx {
            let off = 4 + 8 * u64::from(self.size());
            let addr = self.used_addr().unchecked_add(off);
            mem.store(consumed.0.to_le(), addr, Ordering::Relaxed)
                .map_err(|_| RingError::RingMemory(addr.0))?;
        } else {
            let addr = self.used_addr();
            mem.store(0u16, addr, Ordering::Relaxed)
                .map_err(|_| RingError::RingMemory(addr.0))?;
        }
        fence(Ordering::SeqCst);
        Ok(self.avail_idx(mem)? != consumed)
    }
}

/// virtio's `vring_need_event`: did `new` pass `event` since `old`?
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Map every descriptor of `chain` into host segments; returns the total length.
fn map_chain<M>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
    device_writes: bool,
    segs: &mut Vec<Segment>,
) -> Result<u32, ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut total: u32 = 0;
    let mut last_has_next = false;
    let mut count: u16 = 0;
    for desc in chain {
        last_has_next = desc.has_next();
        let writable = desc.flags() & VRING_DESC_F_WRITE as u16 != 0;
        if writable != device_writes {
            return Err(ChainError::WrongDirection(count));
        }
        count += 1;
        if desc.len() == 0 {
            continue;
        }
        let bad = ChainError::BadAddress {
            addr: desc.addr().0,
            len: desc.len(),
        };
        // get_slices splits only at region boundaries, so the pieces are consecutive from
        // desc.addr().
        let mut addr = desc.addr();
        for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), desc.len() as usize) {
            let slice = slice.map_err(|_| bad)?;
            if segs.len() == MAX_CHAIN_SEGS {
                return Err(ChainError::TooManySegments);
            }
            let len = slice.len() as u32;
            segs.push(Segment {
                addr,
                len,
                host: slice.ptr_guard_mut().as_ptr(),
            });
            addr = addr.unchecked_add(u64::from(len));
        }
        total = total.checked_add(desc.len()).ok_or(ChainError::Truncated)?;
    }
    if last_has_next {
        return Err(ChainError::Truncated);
    }
    if count == 0 {
        return Err(ChainError::Empty);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_the_spec_formula() {
        // Driver asked for an interrupt once used idx passes 5.
        assert!(vring_need_event(5, 6, 5));
        assert!(vring_need_event(5, 10, 3));
        assert!(!vring_need_event(5, 5, 3));
        assert!(!vring_need_event(10, 8, 3));
        // Wrap-around.
        assert!(vring_need_event(65535, 1, 65530));
        assert!(!vring_need_event(2, 1, 65530));
    }
}
