//! Device side of a split virtqueue. `virtio_queue::Queue` holds the ring's configuration and
//! position (what the frontend sets and reads back); the per-frame work is done here, for
//! reasons measured on this project (see field notes):
//! - used entries are written without touching `used.idx`, which is published once per batch, so
//!   the guest never sees the head of a multi-buffer frame before its tail (`Queue::add_used`
//!   publishes per element);
//! - the guest notification is armed by `arm_kick`, which re-checks against `next_avail` after a
//!   full fence; `Queue::enable_notification` cannot be used because RX keeps popped chains it
//!   cannot use yet, and the crate's answer ("avail != next_avail") is then true forever if chains
//!   are rolled back, so we never roll back while running;
//! - the interrupt decision uses the used index at the previous decision, counted here;
//! - the avail and used ring words and the descriptor table are accessed through host addresses
//!   resolved once per worker start (`RingHost`), and buffers are translated through a sorted
//!   copy of the memory table (`Regions`), not through vm-memory's checked accessors per access
//!   (the lookups and copies were 40-60 ns of every frame); avail chains are popped in batches
//!   with one read of the avail index.
//!
//! The chain walk (`Walk::chain`) follows `virtio_queue::DescriptorChain` rule for rule (when a
//! chain ends, indirect tables, the 4 GiB limit), so a guest sees the same device whichever
//! parses its rings; the ring fuzz target runs both on every input and fails on any difference.
//!
//! Notification protocol (virtio 1.2, 2.7.7 and 2.7.10): with VIRTIO_F_EVENT_IDX the device writes
//! `avail_event` and reads `used_event`; without it, it writes `used.flags` (NO_NOTIFY) and reads
//! `avail.flags` (NO_INTERRUPT).

use std::fs::File;
use std::io::Write;
use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;

use libc::iovec;
use thiserror::Error;
use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::dirty_log::DirtyLog;

// The ring flags are single low bits (virtio 1.2, 2.7.5-2.7.8): exact in the rings' u16 fields.
#[allow(clippy::cast_possible_truncation)]
const NO_INTERRUPT: u16 = VRING_AVAIL_F_NO_INTERRUPT as u16;
#[allow(clippy::cast_possible_truncation)]
const NO_NOTIFY: u16 = VRING_USED_F_NO_NOTIFY as u16;
#[allow(clippy::cast_possible_truncation)]
const DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
#[allow(clippy::cast_possible_truncation)]
const DESC_F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
#[allow(clippy::cast_possible_truncation)]
const DESC_F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Bytes of a split-ring descriptor (virtio 1.2, 2.7.5).
const DESC_SIZE: usize = 16;

/// Most segments accepted in one descriptor chain. Linux uses at most MAX_SKB_FRAGS + 2.
pub const MAX_CHAIN_SEGS: usize = 64;

/// Most descriptors one chain may take, zero-length ones and indirect tables included: the work
/// one chain can cost is bounded by it. Linux posts at most MAX_SKB_FRAGS + 2 (19); a longer chain
/// is a guest wasting our time, rejected once this many were visited.
pub const MAX_CHAIN_DESCS: usize = 256;

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    #[error(
        "avail index {avail} is more than the ring size {size} ahead of {next}: ring corrupted"
    )]
    AvailIndex { avail: u16, next: u16, size: u16 },
    #[error("ring memory is not accessible at {0:#x}")]
    RingMemory(u64),
    #[error("the guest posted {0} malformed chains in a row: not a driver, stopping the queue")]
    Garbage(u32),
}

/// The work one batch may do on a queue whatever the guest posts, besides the frame and byte
/// budgets of RX and TX: chains popped (good or rejected) and descriptors visited. With
/// `MAX_CHAIN_DESCS` per chain and up to `WINDOW_REFILL`/`BATCH` (64) chains per pop, a batch
/// visits at most `DESC_BUDGET + 64 * MAX_CHAIN_DESCS` descriptors before the worker is back in
/// its event loop (where it sees stop requests).
pub const CHAIN_BUDGET: u64 = 512;
pub const DESC_BUDGET: u64 = 4096;

/// Malformed chains in a row (none good between) after which a queue is taken for hostile and
/// its pair stopped, like a corrupted index: a Linux driver never posts one.
pub const GARBAGE_CHAINS: u32 = 1024;

/// Why a descriptor chain was rejected. The chain is returned to the guest with length 0.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor {0} has the wrong direction for this queue")]
    WrongDirection(usize),
    #[error("chain ends in a loop, an out-of-range next index or a bad indirect table")]
    Truncated,
    #[error("buffer at {addr:#x} (+{len}) is outside guest memory")]
    BadAddress { addr: u64, len: u32 },
    #[error("chain holds {0} bytes, fewer than the {1}-byte virtio-net header")]
    TooSmall(u32, usize),
    #[error("chain has more than {MAX_CHAIN_SEGS} segments")]
    TooManySegments,
    #[error("chain has more than {MAX_CHAIN_DESCS} descriptors")]
    TooManyDescriptors,
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

    /// Start loading the segment's first 128 bytes (a small frame whole, a large one's headers)
    /// into the cache. Why: the guest's buffers are many and spread out, so the copy of a frame
    /// that has not been near this CPU for a ring's turn misses the cache; asked for while a
    /// batch is gathered, the lines arrive while the rest of the batch is walked and the earlier
    /// frames are copied. A prefetch never faults, so any address will do.
    #[inline]
    pub fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let p = self.host.cast::<i8>().cast_const();
            // SAFETY: a prefetch is a hint: it never faults and changes no memory, whatever
            // the address; SSE is part of x86_64's baseline.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(p);
                if self.len > 64 {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
                }
            }
        }
    }
}

/// What `DeviceQueue::pop_batch` does with a chain its caller was shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The caller keeps the chain (it completes it later with `add_used`).
    Keep,
    /// Complete the chain now with length 0 (sent, or rejected).
    Complete,
    /// Give the chain back to the avail ring and stop popping.
    Rewind,
}

/// Host addresses of a queue's avail and used rings, resolved and checked once when the queue
/// is set up, so the per-frame path does not look up guest memory regions for them.
struct RingHost {
    avail: *mut u8,
    used: *mut u8,
    /// The descriptor table: at a host address when it lies in one region (always, with QEMU);
    /// otherwise read through guest memory, as the frontend may lay it out.
    desc: Table,
    size: u16,
}

impl RingHost {
    fn new(mem: &Arc<GuestMemoryMmap>, queue: &Queue) -> Option<RingHost> {
        let size = queue.size();
        // flags, idx, ring, used_event / avail_event
        let avail = resolve(mem, queue.avail_ring(), 6 + 2 * usize::from(size), 2)?;
        let used = resolve(mem, queue.used_ring(), 6 + 8 * usize::from(size), 4)?;
        let desc = Table::new(mem, queue.desc_table(), size);
        Some(RingHost {
            avail,
            used,
            desc,
            size,
        })
    }

    /// The head index in the avail ring's slot for `idx`.
    fn avail_entry(&self, idx: u16) -> u16 {
        // The avail ring's `ring[]` starts at byte 4, two bytes an entry.
        u16::from_le(
            self.word(false, 4 + 2 * usize::from(idx % self.size))
                .load(Ordering::Relaxed),
        )
    }

    /// The 16-bit ring word at byte `off` of the avail (`used == false`) or used ring.
    fn word(&self, used: bool, off: usize) -> &AtomicU16 {
        let base = if used { self.used } else { self.avail };
        let entry = if used { 8 } else { 2 };
        debug_assert!(off + 2 <= 6 + entry * usize::from(self.size));
        // SAFETY: `off` is within the ring (callers index by the ring layout for `size`, which
        // `new` checked lies in one mapped region); the base is 2-aligned and every offset used
        // is even; the mapping outlives `self` (the `DeviceQueue` holding it holds the memory). Guest memory shared with the guest is
        // only read and written atomically here.
        unsafe { AtomicU16::from_ptr(base.add(off).cast()) }
    }

    fn avail_idx(&self) -> u16 {
        u16::from_le(self.word(false, 2).load(Ordering::Acquire))
    }

    /// Write the used element at `next_used` and advance it (not published).
    fn push_used(&self, next_used: &mut Wrapping<u16>, head: u16, len: u32) {
        let off = 4 + 8 * usize::from(next_used.0 % self.size);
        // SAFETY: as in `word`; the element is 8 bytes at a 4-aligned offset of a 4-aligned ring.
        let (id, l) = unsafe {
            (
                AtomicU32::from_ptr(self.used.add(off).cast()),
                AtomicU32::from_ptr(self.used.add(off + 4).cast()),
            )
        };
        id.store(u32::from(head).to_le(), Ordering::Relaxed);
        l.store(len.to_le(), Ordering::Relaxed);
        *next_used += Wrapping(1);
    }
}

/// A queue's `RingHost`, borrowed apart from the rest of the `DeviceQueue` so its position can
/// be updated while the rings are accessed.
fn ring_host<'a>(host: &'a Option<RingHost>, queue: &Queue) -> Result<&'a RingHost, RingError> {
    host.as_ref()
        .ok_or(RingError::RingMemory(queue.used_ring()))
}

/// The host address of `[addr, addr + len)` if it lies in one region and is `align`-aligned.
fn resolve(mem: &GuestMemoryMmap, addr: u64, len: usize, align: usize) -> Option<*mut u8> {
    let slice = mem.get_slice(GuestAddress(addr), len).ok()?;
    let ptr = slice.ptr_guard_mut().as_ptr();
    (ptr as usize % align == 0).then_some(ptr)
}

/// A split-ring descriptor as the guest wrote it, read once: everything decided about it is
/// decided on this copy, whatever the guest writes meanwhile.
#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Desc {
    /// The descriptor from its two 8-byte halves, as numbers: the address, then length, flags
    /// and next.
    // The second half's fields, by position.
    #[allow(clippy::cast_possible_truncation)]
    fn from_halves(lo: u64, hi: u64) -> Desc {
        Desc {
            addr: lo,
            len: hi as u32,
            flags: (hi >> 32) as u16,
            next: (hi >> 48) as u16,
        }
    }

    // The halves of a u128, by position.
    #[allow(clippy::cast_possible_truncation)]
    fn from_le_bytes(b: [u8; DESC_SIZE]) -> Desc {
        let x = u128::from_le_bytes(b);
        Desc::from_halves(x as u64, (x >> 64) as u64)
    }
}

/// A descriptor table (the ring's, or an indirect one) of `len` descriptors.
#[derive(Clone, Copy)]
enum Table {
    /// Mapped in one piece at this host address.
    Host(*const u8, u16),
    /// Not in one region: each descriptor is read through guest memory (and may not be there).
    Guest(GuestAddress, u16),
}

impl Table {
    fn new(mem: &GuestMemoryMmap, addr: u64, len: u16) -> Table {
        match resolve(mem, addr, DESC_SIZE * usize::from(len), 1) {
            Some(p) => Table::Host(p, len),
            None => Table::Guest(GuestAddress(addr), len),
        }
    }

    fn len(&self) -> u16 {
        match *self {
            Table::Host(_, n) | Table::Guest(_, n) => n,
        }
    }

    /// Descriptor `i` (`i < len`), or None if guest memory does not hold it.
    fn get(&self, mem: &GuestMemoryMmap, i: u16) -> Option<Desc> {
        debug_assert!(i < self.len());
        match *self {
            Table::Host(base, _) => {
                // SAFETY: `i < len` and the table's `len` descriptors lie in one mapped region
                // (`Table::new`), which the owning `DeviceQueue` keeps mapped.
                let p = unsafe { base.add(DESC_SIZE * usize::from(i)) };
                if p as usize % 8 == 0 {
                    // Every ring table (virtio aligns it to 16) and Linux's indirect tables:
                    // two loads instead of sixteen.
                    // SAFETY: 16 bytes at `p` are mapped (above) and 8-aligned. The guest may
                    // write them at any time: they are read once, volatile, as plain integers
                    // (any value is valid), and only the copy is used.
                    let (lo, hi) = unsafe {
                        (
                            std::ptr::read_volatile(p.cast::<u64>()),
                            std::ptr::read_volatile(p.add(8).cast::<u64>()),
                        )
                    };
                    return Some(Desc::from_halves(u64::from_le(lo), u64::from_le(hi)));
                }
                // SAFETY: as above, read as bytes (no alignment needed).
                let bytes = unsafe { std::ptr::read_volatile(p.cast::<[u8; DESC_SIZE]>()) };
                Some(Desc::from_le_bytes(bytes))
            }
            Table::Guest(base, _) => {
                let mut bytes = [0u8; DESC_SIZE];
                let at = base.checked_add(DESC_SIZE as u64 * u64::from(i))?;
                mem.read_slice(&mut bytes, at).ok()?;
                Some(Desc::from_le_bytes(bytes))
            }
        }
    }
}

/// Guest memory's regions, sorted by guest address, with their host mappings: the buffer of a
/// descriptor is translated by a binary search here, without vm-memory's per-access checks.
struct Regions(Box<[(u64, u64, *mut u8)]>);

impl Regions {
    fn new(mem: &GuestMemoryMmap) -> Regions {
        let mut v: Vec<_> = mem
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()?;
                Some((r.start_addr().0, r.len(), host))
            })
            .collect();
        v.sort_unstable_by_key(|r| r.0);
        Regions(v.into_boxed_slice())
    }

    /// The host address of `[addr, addr + len)` if it lies in one region.
    fn host(&self, addr: u64, len: u32) -> Option<*mut u8> {
        let i = self.0.partition_point(|r| r.0 <= addr).checked_sub(1)?;
        let (start, size, host) = self.0[i];
        let off = addr - start;
        // `off < size` is not implied: the region before `addr` may end before it.
        if off >= size || u64::from(len) > size - off {
            return None;
        }
        let off = usize::try_from(off).ok()?;
        // SAFETY: `off + len <= size`: the result points into the region's mapping.
        Some(unsafe { host.add(off) })
    }
}

/// An eventfd to signal the other side through (the guest's call fd, a ring's error fd), or
/// none when the frontend gave none (it polls).
#[derive(Clone, Default)]
pub struct Notifier(pub Option<Arc<File>>);

impl Notifier {
    pub fn signal(&self) {
        if let Some(f) = &self.0 {
            // An eventfd write only fails if the counter would overflow, which a reader prevents.
            let _ = (&**f).write(&1u64.to_ne_bytes());
        }
    }
}

/// Vring configuration and the device's position in it, with the guest memory it lives in and
/// the eventfd that interrupts the guest.
pub struct DeviceQueue {
    pub queue: Queue,
    /// The mapping every pointer of this queue (ring words, segments) points into: held here, so
    /// it outlives them.
    mem: Arc<GuestMemoryMmap>,
    call: Notifier,
    /// None when the rings are not in guest memory (or misaligned): every ring access then fails
    /// with `RingError::RingMemory`, which stops the pair as any broken ring does.
    host: Option<RingHost>,
    regions: Regions,
    event_idx: bool,
    next_used: Wrapping<u16>,
    /// `used.idx` at the last interrupt decision; the next decision looks at what was added since.
    signalled_used: Wrapping<u16>,
    /// Descriptors visited since the last `take_visited`: the work the guest made us do.
    visited: u64,
    /// Where this queue's writes are logged while the frontend migrates the guest.
    log: Option<QueueLog>,
    /// Pages marked since the last `take_logged`.
    logged: u64,
}

/// Dirty logging of one queue: the log, the guest-physical address its used ring is logged at
/// (`log_guest_addr`), and the eventfd that tells the frontend the log changed (SET_LOG_FD).
pub struct QueueLog {
    pub log: Arc<DirtyLog>,
    pub used_gpa: u64,
    pub signal: Notifier,
    /// `next_used` when the used ring was last logged: elements written from here on are not.
    logged_used: Wrapping<u16>,
}

impl QueueLog {
    pub fn new(log: Arc<DirtyLog>, used_gpa: u64, signal: Notifier) -> QueueLog {
        QueueLog {
            log,
            used_gpa,
            signal,
            logged_used: Wrapping(0),
        }
    }
}

/// Byte offsets into a split used ring (virtio 1.2, 2.7.8).
const USED_FLAGS: u64 = 0;
const USED_IDX: u64 = 2;
const USED_RING: u64 = 4;
const USED_ELEM: u64 = 8;

// SAFETY: a Segment is an address into a guest memory mapping; it is only dereferenced (by
// readv/writev) on the worker thread that owns the mapping and keeps it alive while segments exist.
unsafe impl Send for Segment {}

impl DeviceQueue {
    pub fn new(queue: Queue, event_idx: bool, mem: &Arc<GuestMemoryMmap>, call: Notifier) -> Self {
        let next_used = Wrapping(queue.next_used());
        let mut queue = queue;
        queue.set_event_idx(event_idx);
        DeviceQueue {
            host: RingHost::new(mem, &queue),
            regions: Regions::new(mem),
            mem: mem.clone(),
            call,
            queue,
            event_idx,
            next_used,
            signalled_used: next_used,
            visited: 0,
            log: None,
            logged: 0,
        }
    }

    /// Log every write into guest memory from now on (the frontend is migrating the guest).
    pub fn set_log(&mut self, mut log: QueueLog) {
        log.logged_used = self.next_used;
        self.log = Some(log);
    }

    /// Bytes of the used ring, flags to `avail_event`: what the log must cover at `used_gpa`.
    pub fn used_ring_len(size: u16) -> u64 {
        USED_RING + USED_ELEM * u64::from(size) + 2
    }

    /// Whether writes into guest memory are logged.
    pub fn logging(&self) -> bool {
        self.log.is_some()
    }

    /// Pages marked in the dirty log since the last call.
    pub fn take_logged(&mut self) -> u64 {
        std::mem::take(&mut self.logged)
    }

    /// Log a write of `len` bytes into guest memory at `gpa` (nothing unless logging).
    pub fn log_write(&mut self, gpa: u64, len: u64) {
        if let Some(l) = &self.log {
            self.logged += l.log.mark(gpa, len);
        }
    }

    /// Log the used-ring bytes `[off, off + len)`.
    fn log_used(&mut self, off: u64, len: u64) {
        if let Some(gpa) = self.log.as_ref().map(|l| l.used_gpa + off) {
            self.log_write(gpa, len);
        }
    }

    /// Log the used elements written since the last call (at most a ring's worth, in one or two
    /// runs when they wrap).
    fn log_used_elements(&mut self) {
        let Some(l) = &mut self.log else {
            return;
        };
        let (from, to) = (l.logged_used, self.next_used);
        l.logged_used = to;
        let n = u64::from((to - from).0).min(u64::from(self.queue.size()));
        if n == 0 {
            return;
        }
        let size = u64::from(self.queue.size());
        let first = u64::from(from.0) % size;
        let run = n.min(size - first);
        self.log_used(USED_RING + USED_ELEM * first, USED_ELEM * run);
        if n > run {
            self.log_used(USED_RING, USED_ELEM * (n - run));
        }
    }

    fn host(&self) -> Result<&RingHost, RingError> {
        ring_host(&self.host, &self.queue)
    }

    /// Hand the queue back with `next_used` folded in; `rewind` chains popped but not used are
    /// returned to the avail ring (so GET_VRING_BASE reports them as not consumed).
    pub fn into_queue(mut self, rewind: u16) -> Queue {
        self.log_used_elements();
        self.queue.set_next_used(self.next_used.0);
        let next_avail = Wrapping(self.queue.next_avail()) - Wrapping(rewind);
        self.queue.set_next_avail(next_avail.0);
        self.queue
    }

    /// Hand the last `n` popped chains back to the avail ring (none of them completed).
    pub fn rewind(&mut self, n: u16) {
        let next_avail = Wrapping(self.queue.next_avail()) - Wrapping(n);
        self.queue.set_next_avail(next_avail.0);
    }

    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// Descriptors visited since the last call (popped chains, good or not).
    pub fn take_visited(&mut self) -> u64 {
        std::mem::take(&mut self.visited)
    }

    /// The guest memory the queue and its buffers live in.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn avail_idx(&self) -> Result<Wrapping<u16>, RingError> {
        Ok(Wrapping(self.host()?.avail_idx()))
    }

    fn index_error(&self) -> RingError {
        RingError::AvailIndex {
            avail: self.host.as_ref().map_or(0, RingHost::avail_idx),
            next: self.queue.next_avail(),
            size: self.size(),
        }
    }

    /// Chains the guest has posted that we have not popped.
    pub fn pending(&self) -> Result<u16, RingError> {
        let avail = self.avail_idx()?;
        let pending = (avail - Wrapping(self.queue.next_avail())).0;
        if pending > self.size() {
            return Err(self.index_error());
        }
        Ok(pending)
    }

    /// Pop up to `max` chains, mapping each one's buffers into `segs` and showing it to `f`,
    /// which decides its fate. Malformed chains, and chains shorter than `min_len` (the vnet
    /// header), are shown with `Err` (the caller logs and counts them; `Verdict::Complete`
    /// returns them with length 0). One read of the avail index for the whole batch. Returns the
    /// number of chains popped and not rewound; fewer than `max` without a rewind means the ring
    /// is empty.
    pub fn pop_batch(
        &mut self,
        device_writes: bool,
        min_len: usize,
        max: usize,
        segs: &mut Vec<Segment>,
        mut f: impl FnMut(u16, Result<u32, ChainError>, &[Segment]) -> Verdict,
    ) -> Result<usize, RingError> {
        let host = ring_host(&self.host, &self.queue)?;
        let avail = Wrapping(host.avail_idx());
        let mut next = Wrapping(self.queue.next_avail());
        if (avail - next).0 > host.size {
            return Err(self.index_error());
        }
        let walk = Walk {
            mem: &self.mem,
            regions: &self.regions,
            ring: host.desc,
            device_writes,
        };
        let mut taken = 0;
        while taken < max && next != avail {
            let head = host.avail_entry(next.0);
            next += Wrapping(1);
            segs.clear();
            let res = walk.chain(head, segs, &mut self.visited).and_then(|len| {
                if (len as usize) < min_len {
                    Err(ChainError::TooSmall(len, min_len))
                } else {
                    Ok(len)
                }
            });
            match f(head, res, segs) {
                Verdict::Keep => {}
                Verdict::Complete => host.push_used(&mut self.next_used, head, 0),
                Verdict::Rewind => {
                    next -= Wrapping(1);
                    break;
                }
            }
            taken += 1;
        }
        self.queue.set_next_avail(next.0);
        Ok(taken)
    }

    /// Write a used element without publishing it.
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), RingError> {
        ring_host(&self.host, &self.queue)?.push_used(&mut self.next_used, head, len);
        Ok(())
    }

    /// Make every used element written so far visible to the guest (one release store).
    pub fn publish(&mut self) -> Result<(), RingError> {
        self.host()?
            .word(true, 2)
            .store(self.next_used.0.to_le(), Ordering::Release);
        if self.log.is_some() {
            let before = self.logged;
            self.log_used_elements();
            self.log_used(USED_IDX, 2);
            if self.logged != before {
                if let Some(l) = &self.log {
                    l.signal.signal();
                }
            }
        }
        Ok(())
    }

    /// Interrupt the guest if it wants one for what was published since the last decision;
    /// returns whether it did.
    pub fn interrupt(&mut self) -> Result<bool, RingError> {
        let needed = self.needs_interrupt()?;
        if needed {
            self.call.signal();
        }
        Ok(needed)
    }

    /// Used entries written since the last interrupt decision (`interrupt`).
    pub fn undecided(&self) -> u16 {
        (self.next_used - self.signalled_used).0
    }

    /// Whether the guest wants an interrupt for what was published since the last decision.
    fn needs_interrupt(&mut self) -> Result<bool, RingError> {
        let new = self.next_used;
        let old = self.signalled_used;
        if new == old {
            return Ok(false);
        }
        let host = ring_host(&self.host, &self.queue)?;
        self.signalled_used = new;
        // The used.idx store must be visible before we read the guest's suppression state, or we
        // could read a stale used_event and skip an interrupt the guest is waiting for.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let off = 4 + 2 * usize::from(host.size);
            let used_event = u16::from_le(host.word(false, off).load(Ordering::Relaxed));
            Ok(vring_need_event(used_event, new.0, old.0))
        } else {
            let flags = u16::from_le(host.word(false, 0).load(Ordering::Relaxed));
            Ok(flags & NO_INTERRUPT == 0)
        }
    }

    /// Ask the guest not to kick (only meaningful without EVENT_IDX; with it, a stale
    /// `avail_event` already suppresses kicks).
    pub fn suppress_kicks(&mut self) -> Result<(), RingError> {
        if self.event_idx {
            return Ok(());
        }
        self.host()?
            .word(true, 0)
            .store(NO_NOTIFY.to_le(), Ordering::Relaxed);
        self.log_used(USED_FLAGS, 2);
        Ok(())
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
    pub fn arm_kick(&mut self) -> Result<bool, RingError> {
        let host = self.host()?;
        let consumed = self.queue.next_avail();
        let off = if self.event_idx {
            let off = 4 + 8 * usize::from(host.size);
            host.word(true, off)
                .store(consumed.to_le(), Ordering::Relaxed);
            off
        } else {
            host.word(true, 0).store(0, Ordering::Relaxed);
            0
        };
        fence(Ordering::SeqCst);
        let posted = host.avail_idx() != consumed;
        self.log_used(off as u64, 2);
        Ok(posted)
    }
}

/// virtio's `vring_need_event`: did `new` pass `event` since `old`?
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// What walking a chain needs: guest memory, its regions, the ring's descriptor table, and the
/// direction the queue's buffers must have.
struct Walk<'a> {
    mem: &'a GuestMemoryMmap,
    regions: &'a Regions,
    ring: Table,
    device_writes: bool,
}

impl Walk<'_> {
    /// Map every descriptor of the chain at `head` into host segments; returns the total length.
    /// Every descriptor looked at is added to `visited`, and at most `MAX_CHAIN_DESCS` are.
    ///
    /// The chain ends as `virtio_queue::DescriptorChain` ends it: at a descriptor without NEXT,
    /// after as many descriptors as its table holds (a loop), at an index outside its table, at
    /// a descriptor guest memory does not hold, at a second indirect table or one whose length
    /// is not a whole number of descriptors, or where the chain would pass 4 GiB. A chain that
    /// ends anywhere but at a descriptor without NEXT is `Truncated`.
    fn chain(
        &self,
        head: u16,
        segs: &mut Vec<Segment>,
        visited: &mut u64,
    ) -> Result<u32, ChainError> {
        let mut table = self.ring;
        let mut index = head;
        // Descriptors the current table may still yield: a chain longer than its table loops.
        let mut ttl = table.len();
        let mut indirect = false;
        let mut total: u32 = 0;
        let mut last_has_next = false;
        let mut count: usize = 0;
        while ttl > 0 && index < table.len() {
            let Some(desc) = table.get(self.mem, index) else {
                break;
            };
            if desc.flags & DESC_F_INDIRECT != 0 {
                // Its NEXT flag, if set, is ignored; a table inside a table ends the chain.
                if indirect || desc.len as usize % DESC_SIZE != 0 {
                    break;
                }
                let Ok(n) = u16::try_from(desc.len as usize / DESC_SIZE) else {
                    break;
                };
                table = Table::new(self.mem, desc.addr, n);
                index = 0;
                ttl = n;
                indirect = true;
                continue;
            }
            let Some(sum) = total.checked_add(desc.len) else {
                break;
            };
            let has_next = desc.flags & DESC_F_NEXT != 0;
            if has_next {
                index = desc.next;
                ttl -= 1;
            } else {
                ttl = 0;
            }
            if count == MAX_CHAIN_DESCS {
                return Err(ChainError::TooManyDescriptors);
            }
            count += 1;
            *visited += 1;
            last_has_next = has_next;
            let writable = desc.flags & DESC_F_WRITE != 0;
            if writable != self.device_writes {
                return Err(ChainError::WrongDirection(count - 1));
            }
            if desc.len == 0 {
                continue;
            }
            self.map(desc, segs)?;
            total = sum;
        }
        if last_has_next {
            return Err(ChainError::Truncated);
        }
        if count == 0 {
            return Err(ChainError::Empty);
        }
        Ok(total)
    }

    /// Add the host segments of a descriptor's buffer to `segs`.
    fn map(&self, desc: Desc, segs: &mut Vec<Segment>) -> Result<(), ChainError> {
        if segs.len() == MAX_CHAIN_SEGS {
            return Err(ChainError::TooManySegments);
        }
        let addr = GuestAddress(desc.addr);
        // Nearly every buffer lies in one region.
        if let Some(host) = self.regions.host(desc.addr, desc.len) {
            segs.push(Segment {
                addr,
                len: desc.len,
                host,
            });
            return Ok(());
        }
        let bad = ChainError::BadAddress {
            addr: desc.addr,
            len: desc.len,
        };
        // get_slices splits only at region boundaries, so the pieces are consecutive from
        // the descriptor's address.
        let mut at = addr;
        for slice in GuestMemoryBackend::get_slices(self.mem, addr, desc.len as usize) {
            let slice = slice.map_err(|_| bad)?;
            if segs.len() == MAX_CHAIN_SEGS {
                return Err(ChainError::TooManySegments);
            }
            // A piece of one descriptor, whose length is a u32.
            let len = u32::try_from(slice.len()).map_err(|_| bad)?;
            segs.push(Segment {
                addr: at,
                len,
                host: slice.ptr_guard_mut().as_ptr(),
            });
            at = at.unchecked_add(u64::from(len));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const SIZE: u16 = 8;

    /// A chain as `pop_batch` shows it: head, result, segments (guest address, length).
    type Shown = (u16, Result<u32, ChainError>, Vec<(u64, u32)>);

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; DESC_SIZE] {
        let mut d = [0u8; DESC_SIZE];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        d
    }

    /// Write the descriptors `table` at guest address `at`.
    fn write_table(mem: &GuestMemoryMmap, at: u64, table: &[[u8; DESC_SIZE]]) {
        for (i, d) in table.iter().enumerate() {
            mem.write_slice(d, GuestAddress(at + (DESC_SIZE * i) as u64))
                .unwrap();
        }
    }

    /// A ring of `SIZE` in `mem` with `table` as its descriptor table, and `heads` posted;
    /// returns what one pop of TX (device-readable) chains shows.
    fn pop(mem: GuestMemoryMmap, table: &[[u8; DESC_SIZE]], heads: &[u16]) -> Vec<Shown> {
        let mem = Arc::new(mem);
        let mut q = Queue::new(SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_ready(true);
        write_table(&mem, DESC, table);
        for (i, h) in heads.iter().enumerate() {
            mem.write_obj(*h, GuestAddress(AVAIL + 4 + 2 * i as u64))
                .unwrap();
        }
        mem.write_obj(u16::try_from(heads.len()).unwrap(), GuestAddress(AVAIL + 2))
            .unwrap();
        let mut dq = DeviceQueue::new(q, true, &mem, Notifier::default());
        let mut shown = Vec::new();
        let mut segs = Vec::new();
        dq.pop_batch(false, 0, 64, &mut segs, |head, res, segs| {
            let segs = segs.iter().map(|s| (s.addr.0, s.len)).collect();
            shown.push((head, res, segs));
            Verdict::Keep
        })
        .unwrap();
        shown
    }

    fn memory(ranges: &[(u64, usize)]) -> GuestMemoryMmap {
        let ranges: Vec<_> = ranges.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    const NEXT: u16 = DESC_F_NEXT;
    const INDIRECT: u16 = DESC_F_INDIRECT;

    #[test]
    fn chains_end_where_virtio_queue_ends_them() {
        let mem = || memory(&[(0, 0x10000)]);
        let ok = |len| Ok(len);
        // Two descriptors; then two through an indirect table.
        let shown = pop(
            mem(),
            &[desc(0x4000, 12, NEXT, 1), desc(0x5000, 60, 0, 0)],
            &[0],
        );
        assert_eq!(shown[0], (0, ok(72), vec![(0x4000, 12), (0x5000, 60)]));
        // An indirect table, aligned and at an odd address (read byte by byte).
        for table in [0x6000, 0x6003] {
            let mem2 = mem();
            write_table(
                &mem2,
                table,
                &[desc(0x7000, 10, NEXT, 1), desc(0x8000, 20, 0, 0)],
            );
            let shown = pop(mem2, &[desc(table, 32, INDIRECT, 0)], &[0]);
            assert_eq!(shown[0], (0, ok(30), vec![(0x7000, 10), (0x8000, 20)]));
        }

        let truncated = Err(ChainError::Truncated);
        // A loop: ends after as many descriptors as the table holds.
        let shown = pop(
            mem(),
            &[desc(0x4000, 1, NEXT, 1), desc(0x4000, 1, NEXT, 0)],
            &[0],
        );
        assert_eq!(shown[0].1, truncated);
        // A next index outside the table.
        let shown = pop(mem(), &[desc(0x4000, 1, NEXT, SIZE)], &[0]);
        assert_eq!(shown[0].1, truncated);
        // A head outside the table: nothing to walk.
        let shown = pop(mem(), &[], &[SIZE]);
        assert_eq!(shown[0], (SIZE, Err(ChainError::Empty), vec![]));
        // A table inside a table: the chain ends at it.
        let mem2 = mem();
        write_table(
            &mem2,
            0x6000,
            &[desc(0x7000, 10, NEXT, 1), desc(0x6000, 32, INDIRECT, 0)],
        );
        let shown = pop(mem2, &[desc(0x6000, 32, INDIRECT, 0)], &[0]);
        assert_eq!(shown[0].1, truncated);
        // An indirect table whose length is not a whole number of descriptors.
        let shown = pop(mem(), &[desc(0x6000, 24, INDIRECT, 0)], &[0]);
        assert_eq!(shown[0].1, Err(ChainError::Empty));
        // An indirect table outside guest memory.
        let shown = pop(mem(), &[desc(0x20000, 32, INDIRECT, 0)], &[0]);
        assert_eq!(shown[0].1, Err(ChainError::Empty));
        // A buffer outside guest memory.
        let shown = pop(mem(), &[desc(0xff00, 0x200, 0, 0)], &[0]);
        let bad = ChainError::BadAddress {
            addr: 0xff00,
            len: 0x200,
        };
        assert_eq!(shown[0].1, Err(bad));
    }

    #[test]
    fn a_chain_past_4_gib_is_truncated_before_its_last_descriptor() {
        // Mapped, never touched: the walk only translates addresses.
        let mem = memory(&[(0, 0x1_0000_1000)]);
        let half = 0x8000_0000;
        let shown = pop(mem, &[desc(0, half, NEXT, 1), desc(0, half, 0, 0)], &[0]);
        assert_eq!(shown[0].1, Err(ChainError::Truncated));
    }

    #[test]
    fn tables_and_buffers_across_two_adjacent_regions_are_walked() {
        // The ring's table straddles the regions' boundary at 0x1010: its second descriptor is
        // read through guest memory, and the buffer across the boundary is two segments.
        let mem = memory(&[(0, 0x1010), (0x1010, 0xf000)]);
        let shown = pop(
            mem,
            &[desc(0x1000, 12, NEXT, 1), desc(0x0ff0, 0x40, 0, 0)],
            &[0],
        );
        assert_eq!(
            shown[0],
            (
                0,
                Ok(0x4c),
                vec![(0x1000, 12), (0x0ff0, 0x20), (0x1010, 0x20)]
            )
        );
    }

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
