//! A hostile guest: it writes a queue's rings straight into guest memory, as a guest's vCPU can,
//! with no driver bookkeeping, and keeps the avail ring full of what it likes. Tests use it to
//! show what the daemon does when the guest works against it (README, "Hostile guests").
//!
//! The attacked queue must not be driven by the synthetic guest's own driver meanwhile (its
//! ring state would be meaningless); other queues are unaffected.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::ring::{encode_desc, RingLayout, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

/// What the hostile guest keeps its avail ring full of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attack {
    /// Every avail entry names one chain of `descs` zero-length descriptors (the descriptor
    /// table from index 0 on), device-writable or not (RX or TX): each costs the device a walk
    /// to reject.
    ZeroLengthChains { descs: u16, writable: bool },
    /// Every avail entry names a head index beyond the queue (virtio-queue yields a chain with no
    /// descriptor at all).
    OutOfRangeHeads,
    /// Like `ZeroLengthChains`, but every `every`-th avail entry names a well-formed chain (one
    /// `len`-byte buffer at `buf`, device-writable for RX): a guest that is never all garbage.
    MostlyZeroLength {
        descs: u16,
        every: u16,
        buf: GuestAddress,
        len: u32,
        rx: bool,
    },
}

/// One queue's rings, written directly.
pub struct HostileRing {
    mem: GuestMemoryMmap,
    layout: RingLayout,
    attack: Attack,
    /// Avail entries written so far (the avail index this ring publishes).
    avail: u16,
}

impl HostileRing {
    /// Take over the queue at `layout`: lay out the descriptors `attack` needs. `avail` is the
    /// queue's current avail index (its driver's), from which the attack goes on.
    pub fn new(
        mem: GuestMemoryMmap,
        layout: RingLayout,
        attack: Attack,
        avail: u16,
    ) -> HostileRing {
        let ring = HostileRing {
            mem,
            layout,
            attack,
            avail,
        };
        let chain = |descs: u16, flags: u16| {
            for i in 0..descs.min(layout.size) {
                let last = i + 1 == descs.min(layout.size);
                let f = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT
                };
                ring.write_desc(i, encode_desc(0, 0, f, i + 1));
            }
        };
        match attack {
            Attack::ZeroLengthChains { descs, writable } => {
                chain(descs, if writable { VRING_DESC_F_WRITE } else { 0 })
            }
            Attack::MostlyZeroLength {
                descs,
                buf,
                len,
                rx,
                ..
            } => {
                // The garbage chain in 0..descs-1 (one short), the good one in the last slot.
                let flags = if rx { VRING_DESC_F_WRITE } else { 0 };
                chain(descs.min(layout.size - 1), flags);
                ring.write_desc(layout.size - 1, encode_desc(buf.0, len, flags, 0));
            }
            Attack::OutOfRangeHeads => {}
        }
        ring
    }

    fn write_desc(&self, index: u16, bytes: [u8; 16]) {
        let at = self.layout.desc_table.unchecked_add(16 * u64::from(index));
        self.mem
            .write_slice(&bytes, at)
            .expect("descriptor table in guest memory");
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj::<u16>(self.layout.used_ring.unchecked_add(2))
            .expect("used ring in guest memory")
    }

    /// The head the `n`-th avail entry names.
    fn head(&self, n: u16) -> u16 {
        match self.attack {
            Attack::ZeroLengthChains { .. } => 0,
            Attack::OutOfRangeHeads => self.layout.size.wrapping_add(n % 7),
            Attack::MostlyZeroLength { every, .. } => {
                if n % every.max(1) == 0 {
                    self.layout.size - 1
                } else {
                    0
                }
            }
        }
    }

    /// Fill the avail ring up to a ring ahead of the device's used index (never more: that would
    /// be a corrupted index, which stops the queue at once). Returns the entries added.
    pub fn refill(&mut self) -> u16 {
        let size = self.layout.size;
        let room = size - self.avail.wrapping_sub(self.used_idx()).min(size);
        for _ in 0..room {
            let slot = self.avail % size;
            let at = self
                .layout
                .avail_ring
                .unchecked_add(4 + 2 * u64::from(slot));
            self.mem
                .write_obj(self.head(self.avail), at)
                .expect("avail ring in guest memory");
            self.avail = self.avail.wrapping_add(1);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem
            .write_obj(self.avail, self.layout.avail_ring.unchecked_add(2))
            .expect("avail ring in guest memory");
        room
    }
}

/// Keep `ring` full on a thread of its own, kicking through `kick` after each refill, until
/// `stop`; returns the avail entries it posted.
pub fn spawn(mut ring: HostileRing, mut kick: File, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut posted = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let n = ring.refill();
            posted += u64::from(n);
            if n > 0 {
                let _ = kick.write(&1u64.to_ne_bytes());
            } else {
                std::thread::yield_now();
            }
        }
        posted
    })
}
