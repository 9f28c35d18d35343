//! Driver side of a virtio 1.x split virtqueue, modelled on Linux's `drivers/virtio/virtio_ring.c`.
//!
//! * Chains are written into the descriptor table, the head goes into the avail ring, and
//!   `avail.idx` is published with a release store (Linux: `virtio_wmb` + store).
//! * `used.idx` is read with an acquire load before the used elements (Linux: `virtio_rmb`).
//! * Notifications follow `virtqueue_kick_prepare_split`: a full fence between publishing
//!   `avail.idx` and reading `avail_event` (EVENT_IDX) or `used.flags` (NO_NOTIFY), and a kick
//!   only when [`vring_need_event`] says so.
//! * Interrupt suppression follows `virtqueue_{disable_cb,enable_cb_prepare,enable_cb_delayed,
//!   poll}_split`: `used_event` with EVENT_IDX, `VRING_AVAIL_F_NO_INTERRUPT` otherwise, with a
//!   full fence between arming and re-checking `used.idx` so wakeups are not lost.
//!
//! Nothing the device writes is trusted: used ids, used lengths and `used.idx` are validated and
//! a violation is reported as a [`RingError`], never a panic.
//!
//! The three areas are reached through host pointers taken once, when the ring is set up, as a
//! driver reaches its rings: through vm-memory's checked accessors each ring access cost more
//! than the daemon's whole handling of a frame, and on a 2-CPU bench machine the synthetic
//! guest's CPU is taken from the daemon's.

use std::sync::atomic::{fence, AtomicU16, Ordering};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap};

use super::mem::{GuestRam, MemError, PAGE_SIZE};

/// Descriptor continues via the `next` field.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor is device writable.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptor points to an indirect descriptor table.
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// Driver → device: don't interrupt me (only without EVENT_IDX).
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Device → driver: don't kick me (only without EVENT_IDX).
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;
/// Size of one split-ring descriptor.
pub const DESC_SIZE: u64 = 16;
/// Largest queue size of a split ring.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Errors of the split-ring driver.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// Queue size is not a power of two in 1..=32768.
    #[error("invalid queue size {0} (must be a power of two between 1 and 32768)")]
    InvalidSize(u16),
    /// A ring area is misaligned or outside guest memory.
    #[error("ring {area} at {addr:#x} is misaligned or not inside guest memory")]
    BadLayout {
        /// Which area.
        area: &'static str,
        /// Its guest physical address.
        addr: u64,
    },
    /// A chain without descriptors was passed.
    #[error("cannot add an empty descriptor chain")]
    EmptyChain,
    /// Not enough free descriptors.
    #[error("descriptor chain of {needed} descriptors does not fit: {free} free")]
    Full {
        /// Descriptors needed.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },
    /// A raw descriptor's `next` refers to a chain position that does not exist.
    #[error("raw descriptor {index}: next refers to chain position {pos}, but the chain has {len} descriptors")]
    BadRawNext {
        /// Position of the offending descriptor.
        index: usize,
        /// Position it refers to.
        pos: u16,
        /// Chain length.
        len: usize,
    },
    /// Guest memory access failed.
    #[error("guest memory access failed while {what} at {addr:#x}: {source}")]
    Memory {
        /// What was being accessed.
        what: &'static str,
        /// Guest physical address.
        addr: u64,
        /// Cause.
        #[source]
        source: GuestMemoryError,
    },
    /// The device advanced `used.idx` past what was in flight.
    #[error("device published used.idx {used_idx} with last_used {last_used}, but only {in_flight} chains were in flight")]
    UsedIdxAhead {
        /// used.idx read.
        used_idx: u16,
        /// Driver's last_used_idx.
        last_used: u16,
        /// Chains in flight.
        in_flight: u16,
    },
    /// A used element carries an id outside the queue.
    #[error("device returned used id {id} outside the queue (size {size})")]
    UsedIdOutOfRange {
        /// The id.
        id: u32,
        /// Queue size.
        size: u16,
    },
    /// A used element names a descriptor that is not the head of an in-flight chain.
    #[error("device returned used id {id}, which is not the head of an in-flight chain")]
    UsedIdNotInFlight {
        /// The id.
        id: u32,
    },
    /// A used element reports more bytes written than the chain could hold.
    #[error("device returned used len {len} for chain {id}, whose device-writable capacity is {capacity} bytes")]
    UsedLenTooLarge {
        /// Head id.
        id: u16,
        /// Reported length.
        len: u32,
        /// Writable capacity of the chain.
        capacity: u64,
    },
}

type Result<T> = std::result::Result<T, RingError>;

/// Deliberately independent of the daemon's `ring::vring_need_event`: the guest checks the
/// daemon's notifications against its own copy of Linux's.
///
/// Linux's `vring_need_event`: should the other side be notified, given its event index, the new
/// index and the index at the time of the previous notification decision?
pub fn vring_need_event(event_idx: u16, new_idx: u16, old: u16) -> bool {
    new_idx.wrapping_sub(event_idx).wrapping_sub(1) < new_idx.wrapping_sub(old)
}

/// Guest-physical placement of one split ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Queue size (number of descriptors).
    pub size: u16,
    /// Descriptor table (16-byte aligned, 16 × size bytes).
    pub desc_table: GuestAddress,
    /// Avail ring: flags, idx, ring[size], used_event (2-byte aligned).
    pub avail_ring: GuestAddress,
    /// Used ring: flags, idx, ring[size] of {id, len}, avail_event (4-byte aligned).
    pub used_ring: GuestAddress,
}

impl RingLayout {
    /// Bytes of the descriptor table.
    pub fn desc_table_bytes(size: u16) -> u64 {
        DESC_SIZE * u64::from(size)
    }

    /// Bytes of the avail ring including `used_event`.
    pub fn avail_ring_bytes(size: u16) -> u64 {
        6 + 2 * u64::from(size)
    }

    /// Bytes of the used ring including `avail_event`.
    pub fn used_ring_bytes(size: u16) -> u64 {
        6 + 8 * u64::from(size)
    }

    /// Allocate a ring in guest memory like Linux's legacy `vring_init`: the descriptor table
    /// page aligned, the avail ring right behind it, the used ring on the next page boundary.
    pub fn allocate(ram: &mut GuestRam, size: u16) -> std::result::Result<Self, MemError> {
        let desc_bytes = Self::desc_table_bytes(size);
        let desc = ram.alloc(
            desc_bytes + Self::avail_ring_bytes(size),
            PAGE_SIZE,
            "descriptor table + avail ring",
        )?;
        let used = ram.alloc(Self::used_ring_bytes(size), PAGE_SIZE, "used ring")?;
        Ok(RingLayout {
            size,
            desc_table: desc,
            avail_ring: desc.unchecked_add(desc_bytes),
            used_ring: used,
        })
    }

    /// Address of `used_event` (last field of the avail ring).
    pub fn used_event_addr(&self) -> GuestAddress {
        self.avail_ring.unchecked_add(4 + 2 * u64::from(self.size))
    }

    /// Address of `avail_event` (last field of the used ring).
    pub fn avail_event_addr(&self) -> GuestAddress {
        self.used_ring.unchecked_add(4 + 8 * u64::from(self.size))
    }
}

/// One descriptor of a well-formed chain. `VRING_DESC_F_NEXT` is added by the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `VRING_DESC_F_WRITE` for device-writable buffers, else 0.
    pub flags: u16,
}

impl Desc {
    /// A device-readable buffer.
    pub fn readable(addr: GuestAddress, len: u32) -> Self {
        Desc {
            addr: addr.0,
            len,
            flags: 0,
        }
    }

    /// A device-writable buffer.
    pub fn writable(addr: GuestAddress, len: u32) -> Self {
        Desc {
            addr: addr.0,
            len,
            flags: VRING_DESC_F_WRITE,
        }
    }
}

/// How a raw descriptor's `next` field is filled in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RawNext {
    /// The descriptor that follows in the slice (0 for the last one).
    #[default]
    Follow,
    /// The descriptor at this position of the slice (e.g. an earlier one, to build a loop).
    Chain(u16),
    /// This literal descriptor-table index.
    Absolute(u16),
}

/// A descriptor written verbatim (flags included) for malformed-chain tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest physical address (may be outside guest memory).
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Flags exactly as written (NEXT is *not* added automatically).
    pub flags: u16,
    /// What to put in `next`.
    pub next: RawNext,
}

/// A completed chain taken from the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index.
    pub head: u16,
    /// Bytes the device reports to have written.
    pub len: u32,
    /// The caller's token given when the chain was added.
    pub token: u64,
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    ndesc: u16,
    token: u64,
    capacity: u64,
}

/// Encode one split descriptor.
pub fn encode_desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&next.to_le_bytes());
    b
}

/// Write a descriptor table (e.g. an indirect table) of raw descriptors at `table`.
/// `RawNext::Follow` means index `i + 1`, `RawNext::Chain(k)` means index `k` (tables are
/// self-relative), `RawNext::Absolute(v)` means `v`.
pub fn write_desc_table(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    descs: &[RawDesc],
) -> Result<()> {
    for (i, d) in descs.iter().enumerate() {
        let next = match d.next {
            RawNext::Follow => {
                if i + 1 < descs.len() {
                    (i + 1) as u16
                } else {
                    0
                }
            }
            RawNext::Chain(k) | RawNext::Absolute(k) => k,
        };
        let at = table.unchecked_add(i as u64 * DESC_SIZE);
        mem.write_slice(&encode_desc(d.addr, d.len, d.flags, next), at)
            .map_err(|source| RingError::Memory {
                what: "writing an indirect descriptor",
                addr: at.0,
                source,
            })?;
    }
    Ok(())
}

/// One ring area mapped in this process.
#[derive(Clone, Copy, Debug)]
struct HostArea {
    gpa: u64,
    len: u64,
    ptr: *mut u8,
}

impl Default for HostArea {
    fn default() -> Self {
        HostArea {
            gpa: 0,
            len: 0,
            ptr: std::ptr::null_mut(),
        }
    }
}

// SAFETY: the pointer is into guest memory mappings owned (through `mem`) by the same
// `DriverRing`; the areas are shared with the device by design, and every access is atomic or
// volatile.
unsafe impl Send for HostArea {}

/// The driver side of one split virtqueue.
#[derive(Debug)]
pub struct DriverRing {
    mem: GuestMemoryMmap,
    layout: RingLayout,
    /// Host addresses of the descriptor table, the avail ring and the used ring, in `mem`'s
    /// mappings (kept alive by `mem`), each checked at set-up to hold its area's bytes.
    host: [HostArea; 3],
    event_idx: bool,
    /// Free descriptor indices (LIFO, like Linux's free list).
    free: Vec<u16>,
    /// Shadow of each descriptor's chain successor (never read back from guest memory).
    next: Vec<u16>,
    /// In-flight chains by head index.
    heads: Vec<Option<InFlight>>,
    /// Scratch for descriptor allocation.
    ids: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
    num_added: u16,
    in_flight: u16,
    avail_flags_shadow: u16,
    event_triggered: bool,
}

impl DriverRing {
    /// Set up the ring at `layout` (zeroing it). Interrupts start enabled, as in Linux.
    pub fn new(mem: GuestMemoryMmap, layout: RingLayout, event_idx: bool) -> Result<Self> {
        let size = layout.size;
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(RingError::InvalidSize(size));
        }
        let areas = [
            (
                "descriptor table",
                layout.desc_table,
                RingLayout::desc_table_bytes(size),
                16,
            ),
            (
                "avail ring",
                layout.avail_ring,
                RingLayout::avail_ring_bytes(size),
                2,
            ),
            (
                "used ring",
                layout.used_ring,
                RingLayout::used_ring_bytes(size),
                4,
            ),
        ];
        for (area, addr, len, align) in areas {
            if addr.0 % align != 0
                || !mem.check_range(addr, len as usize, vm_memory::Permissions::ReadWrite)
            {
                return Err(RingError::BadLayout { area, addr: addr.0 });
            }
            let zeros = vec![0u8; len as usize];
            mem.write_slice(&zeros, addr)
                .map_err(|source| RingError::Memory {
                    what: "zeroing the ring",
                    addr: addr.0,
                    source,
                })?;
        }
        let mut host = [HostArea::default(); 3];
        for (h, (area, addr, len, _)) in host.iter_mut().zip(areas) {
            let slice = vm_memory::GuestMemoryBackend::get_slice(&mem, addr, len as usize)
                .map_err(|_| RingError::BadLayout { area, addr: addr.0 })?;
            *h = HostArea {
                gpa: addr.0,
                len,
                ptr: slice.ptr_guard_mut().as_ptr(),
            };
        }
        let n = usize::from(size);
        Ok(DriverRing {
            mem,
            layout,
            host,
            event_idx,
            free: (0..size).rev().collect(),
            next: vec![0; n],
            heads: vec![None; n],
            ids: Vec::with_capacity(n),
            avail_idx: 0,
            last_used: 0,
            num_added: 0,
            in_flight: 0,
            avail_flags_shadow: 0,
            event_triggered: false,
        })
    }

    /// The host address of the `len` bytes at `addr`, which must lie in one of the ring's areas.
    fn host_ptr(&self, addr: GuestAddress, len: u64, what: &'static str) -> Result<*mut u8> {
        self.host
            .iter()
            .find(|h| addr.0 >= h.gpa && addr.0 - h.gpa + len <= h.len)
            // Exact: the offset is below the area's length, which fits the mapping.
            .map(|h| h.ptr.wrapping_add((addr.0 - h.gpa) as usize))
            .ok_or(RingError::Memory {
                what,
                addr: addr.0,
                source: GuestMemoryError::InvalidGuestAddress(addr),
            })
    }

    fn load_u16(&self, addr: GuestAddress, order: Ordering, what: &'static str) -> Result<u16> {
        let p = self.host_ptr(addr, 2, what)?;
        // SAFETY: `host_ptr` checked the two bytes lie in a ring area, mapped while `self.mem`
        // lives; ring fields are 2-byte aligned (the areas' alignment is checked at set-up and
        // every u16 field is at an even offset); the device accesses them concurrently, which
        // atomics allow.
        let v = unsafe { AtomicU16::from_ptr(p.cast()) }.load(order);
        Ok(u16::from_le(v))
    }

    fn store_u16(
        &self,
        val: u16,
        addr: GuestAddress,
        order: Ordering,
        what: &'static str,
    ) -> Result<()> {
        let p = self.host_ptr(addr, 2, what)?;
        // SAFETY: as in `load_u16`.
        unsafe { AtomicU16::from_ptr(p.cast()) }.store(val.to_le(), order);
        Ok(())
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// Where the ring lives.
    pub fn layout(&self) -> &RingLayout {
        &self.layout
    }

    /// Whether EVENT_IDX is in use.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Free descriptors.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Chains made available and not yet returned by the device.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// The driver's avail index (already published).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The driver's last used index.
    pub fn last_used_idx(&self) -> u16 {
        self.last_used
    }

    /// Whether interrupts ("callbacks") are currently requested.
    pub fn callbacks_enabled(&self) -> bool {
        self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT == 0
    }

    /// Memory the ring lives in.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    fn take_descs(&mut self, n: usize) -> Result<Vec<u16>> {
        if n == 0 {
            return Err(RingError::EmptyChain);
        }
        if n > self.free.len() {
            return Err(RingError::Full {
                needed: n,
                free: self.free.len(),
            });
        }
        let mut ids = std::mem::take(&mut self.ids);
        ids.clear();
        for _ in 0..n {
            // Checked above: enough free descriptors.
            ids.push(self.free.pop().unwrap_or_default());
        }
        // Record the chain structure in the shadow so freeing never trusts guest memory.
        for w in ids.windows(2) {
            self.next[usize::from(w[0])] = w[1];
        }
        Ok(ids)
    }

    fn give_back(&mut self, ids: Vec<u16>) {
        for &id in ids.iter().rev() {
            self.free.push(id);
        }
        self.ids = ids;
    }

    fn write_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) -> Result<()> {
        let at = self
            .layout
            .desc_table
            .unchecked_add(u64::from(idx) * DESC_SIZE);
        let p = self.host_ptr(at, DESC_SIZE, "writing a descriptor")?;
        // SAFETY: `host_ptr` checked the 16 bytes lie in the descriptor table, mapped while
        // `self.mem` lives; the device only reads published descriptors, and this one is not.
        unsafe {
            std::ptr::write_volatile(p.cast::<[u8; 16]>(), encode_desc(addr, len, flags, next))
        };
        Ok(())
    }

    /// Put `head` into the avail ring and publish the new `avail.idx` (release).
    fn publish(&mut self, ids: Vec<u16>, token: u64, capacity: u64) -> Result<u16> {
        let head = ids[0];
        let slot = self.avail_idx & (self.layout.size - 1);
        let at = self
            .layout
            .avail_ring
            .unchecked_add(4 + 2 * u64::from(slot));
        if let Err(e) = self.store_u16(head, at, Ordering::Relaxed, "writing the avail ring") {
            self.give_back(ids);
            return Err(e);
        }
        self.heads[usize::from(head)] = Some(InFlight {
            ndesc: ids.len() as u16,
            token,
            capacity,
        });
        self.ids = ids;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.num_added = self.num_added.wrapping_add(1);
        self.in_flight += 1;
        // Linux: virtio_wmb() then avail->idx = shadow. A release store orders all the
        // descriptor and ring writes above before the index.
        self.store_u16(
            self.avail_idx,
            self.layout.avail_ring.unchecked_add(2),
            Ordering::Release,
            "publishing avail.idx",
        )?;
        Ok(head)
    }

    /// Add a chain of direct descriptors and publish it. Returns the head index.
    pub fn add(&mut self, descs: &[Desc], token: u64) -> Result<u16> {
        let ids = self.take_descs(descs.len())?;
        let mut capacity = 0u64;
        for (i, d) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = (d.flags & !VRING_DESC_F_NEXT) | if last { 0 } else { VRING_DESC_F_NEXT };
            let next = if last { 0 } else { ids[i + 1] };
            if d.flags & VRING_DESC_F_WRITE != 0 {
                capacity += u64::from(d.len);
            }
            if let Err(e) = self.write_desc(ids[i], d.addr, d.len, flags, next) {
                self.give_back(ids);
                return Err(e);
            }
        }
        self.publish(ids, token, capacity)
    }

    /// Add a chain through an indirect table written at `table` (16 × descs.len() bytes the
    /// caller owns), using one ring descriptor. Returns the head index.
    pub fn add_indirect(&mut self, table: GuestAddress, descs: &[Desc], token: u64) -> Result<u16> {
        if descs.is_empty() {
            return Err(RingError::EmptyChain);
        }
        let raw: Vec<RawDesc> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| RawDesc {
                addr: d.addr,
                len: d.len,
                flags: (d.flags & !VRING_DESC_F_NEXT)
                    | if i + 1 < descs.len() {
                        VRING_DESC_F_NEXT
                    } else {
                        0
                    },
                next: RawNext::Follow,
            })
            .collect();
        write_desc_table(&self.mem, table, &raw)?;
        let capacity = descs
            .iter()
            .filter(|d| d.flags & VRING_DESC_F_WRITE != 0)
            .map(|d| u64::from(d.len))
            .sum();
        let ids = self.take_descs(1)?;
        let len = (descs.len() as u64 * DESC_SIZE) as u32;
        if let Err(e) = self.write_desc(ids[0], table.0, len, VRING_DESC_F_INDIRECT, 0) {
            self.give_back(ids);
            return Err(e);
        }
        self.publish(ids, token, capacity)
    }

    /// Add a chain of raw descriptors, flags and `next` written as given, and publish it.
    /// The device's used length is not validated for such chains.
    pub fn add_raw(&mut self, descs: &[RawDesc], token: u64) -> Result<u16> {
        for (index, d) in descs.iter().enumerate() {
            if let RawNext::Chain(pos) = d.next {
                if usize::from(pos) >= descs.len() {
                    return Err(RingError::BadRawNext {
                        index,
                        pos,
                        len: descs.len(),
                    });
                }
            }
        }
        let ids = self.take_descs(descs.len())?;
        for (i, d) in descs.iter().enumerate() {
            let next = match d.next {
                RawNext::Follow => ids.get(i + 1).copied().unwrap_or(0),
                RawNext::Chain(pos) => ids[usize::from(pos)],
                RawNext::Absolute(v) => v,
            };
            if let Err(e) = self.write_desc(ids[i], d.addr, d.len, d.flags, next) {
                self.give_back(ids);
                return Err(e);
            }
        }
        self.publish(ids, token, u64::MAX)
    }

    /// Linux `virtqueue_kick_prepare_split`: after publishing, decide whether the device wants
    /// a notification. Resets the "added since last decision" counter.
    pub fn kick_prepare(&mut self) -> Result<bool> {
        // Linux: virtio_mb() — the avail.idx store must be visible before we read the
        // device's suppression state, or both sides may decide not to act.
        fence(Ordering::SeqCst);
        let new = self.avail_idx;
        let old = new.wrapping_sub(self.num_added);
        let added = self.num_added;
        self.num_added = 0;
        if added == 0 {
            return Ok(false);
        }
        if self.event_idx {
            let ev = self.read_avail_event()?;
            Ok(vring_need_event(ev, new, old))
        } else {
            Ok(self.read_used_flags()? & VRING_USED_F_NO_NOTIFY == 0)
        }
    }

    /// Number of used entries the device has published that we have not consumed (acquire).
    pub fn used_pending(&self) -> Result<u16> {
        let used_idx = self.read_used_idx_acquire()?;
        Ok(used_idx.wrapping_sub(self.last_used))
    }

    /// True if the device has published used entries we have not consumed (acquire).
    pub fn has_used(&self) -> Result<bool> {
        Ok(self.used_pending()? != 0)
    }

    fn read_used_idx_acquire(&self) -> Result<u16> {
        self.load_u16(
            self.layout.used_ring.unchecked_add(2),
            Ordering::Acquire,
            "reading used.idx",
        )
    }

    /// Take the next used element, validating everything the device wrote.
    pub fn pop_used(&mut self) -> Result<Option<UsedElem>> {
        let used_idx = self.read_used_idx_acquire()?;
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.in_flight {
            return Err(RingError::UsedIdxAhead {
                used_idx,
                last_used: self.last_used,
                in_flight: self.in_flight,
            });
        }
        let slot = self.last_used & (self.layout.size - 1);
        let at = self.layout.used_ring.unchecked_add(4 + 8 * u64::from(slot));
        let p = self.host_ptr(at, 8, "reading a used element")?;
        // SAFETY: `host_ptr` checked the 8 bytes lie in the used ring, mapped while `self.mem`
        // lives; the element was published before `used.idx` (read with acquire above), and the
        // device does not write it again before we consume it.
        let raw = u64::from_le_bytes(unsafe { std::ptr::read_volatile(p.cast::<[u8; 8]>()) });
        let id = raw as u32;
        let len = (raw >> 32) as u32;
        if id >= u32::from(self.layout.size) {
            return Err(RingError::UsedIdOutOfRange {
                id,
                size: self.layout.size,
            });
        }
        let head = id as u16;
        let Some(inflight) = self.heads[usize::from(head)] else {
            return Err(RingError::UsedIdNotInFlight { id });
        };
        if u64::from(len) > inflight.capacity {
            return Err(RingError::UsedLenTooLarge {
                id: head,
                len,
                capacity: inflight.capacity,
            });
        }
        self.heads[usize::from(head)] = None;
        let mut d = head;
        for k in 0..inflight.ndesc {
            self.free.push(d);
            if k + 1 < inflight.ndesc {
                d = self.next[usize::from(d)];
            }
        }
        self.in_flight -= 1;
        self.last_used = self.last_used.wrapping_add(1);
        // Linux: with callbacks enabled, keep used_event at last_used so the device interrupts
        // on the next completion (virtio_store_mb).
        if self.event_idx && self.callbacks_enabled() {
            self.store_u16(
                self.last_used,
                self.layout.used_event_addr(),
                Ordering::Relaxed,
                "writing used_event",
            )?;
            fence(Ordering::SeqCst);
        }
        Ok(Some(UsedElem {
            head,
            len,
            token: inflight.token,
        }))
    }

    /// Linux `virtqueue_disable_cb_split`: ask the device not to interrupt.
    pub fn disable_cb(&mut self) -> Result<()> {
        if self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT != 0 {
            return Ok(());
        }
        self.avail_flags_shadow |= VRING_AVAIL_F_NO_INTERRUPT;
        if self.event_idx {
            // After an interrupt the device will not signal again until used_event moves.
            if self.event_triggered {
                return Ok(());
            }
            // Linux writes 0 here ("a hack"); half the index space away from last_used is the
            // value least likely to be crossed soon.
            self.store_u16(
                self.last_used.wrapping_add(0x8000),
                self.layout.used_event_addr(),
                Ordering::Relaxed,
                "writing used_event",
            )
        } else {
            self.write_avail_flags()
        }
    }

    fn write_avail_flags(&self) -> Result<()> {
        self.store_u16(
            self.avail_flags_shadow,
            self.layout.avail_ring,
            Ordering::Relaxed,
            "writing avail.flags",
        )
    }

    /// Record that an interrupt for this queue was received (Linux `vring_interrupt` sets
    /// `event_triggered` with EVENT_IDX).
    pub fn interrupt_received(&mut self) {
        if self.event_idx {
            self.event_triggered = true;
        }
    }

    /// Linux `virtqueue_enable_cb_prepare_split`: request an interrupt for the next used entry.
    /// Returns the index to pass to [`DriverRing::poll`].
    pub fn enable_cb_prepare(&mut self) -> Result<u16> {
        self.event_triggered = false;
        if self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT != 0 {
            self.avail_flags_shadow &= !VRING_AVAIL_F_NO_INTERRUPT;
            if !self.event_idx {
                self.write_avail_flags()?;
            }
        }
        if self.event_idx {
            self.store_u16(
                self.last_used,
                self.layout.used_event_addr(),
                Ordering::Relaxed,
                "writing used_event",
            )?;
        }
        Ok(self.last_used)
    }

    /// Linux `virtqueue_poll_split`: full fence, then "has the device used anything past
    /// `last_used`?" Use after [`DriverRing::enable_cb_prepare`] before sleeping.
    pub fn poll(&self, last_used: u16) -> Result<bool> {
        fence(Ordering::SeqCst);
        Ok(self.read_used_idx_acquire()? != last_used)
    }

    /// Linux `virtqueue_enable_cb`: arm and return true if nothing is pending (safe to sleep).
    pub fn enable_cb(&mut self) -> Result<bool> {
        let last = self.enable_cb_prepare()?;
        Ok(!self.poll(last)?)
    }

    /// Linux `virtqueue_enable_cb_delayed_split`: request an interrupt only after ~3/4 of the
    /// outstanding chains completed. Returns false if that many are already done.
    pub fn enable_cb_delayed(&mut self) -> Result<bool> {
        self.event_triggered = false;
        if self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT != 0 {
            self.avail_flags_shadow &= !VRING_AVAIL_F_NO_INTERRUPT;
            if !self.event_idx {
                self.write_avail_flags()?;
            }
        }
        let bufs = (u32::from(self.avail_idx.wrapping_sub(self.last_used)) * 3 / 4) as u16;
        if self.event_idx {
            self.store_u16(
                self.last_used.wrapping_add(bufs),
                self.layout.used_event_addr(),
                Ordering::Relaxed,
                "writing used_event",
            )?;
        }
        fence(Ordering::SeqCst);
        let used_idx = self.read_used_idx_acquire()?;
        Ok(used_idx.wrapping_sub(self.last_used) <= bufs)
    }

    /// Current `used_event` (what we asked the device for).
    pub fn read_used_event(&self) -> Result<u16> {
        self.load_u16(
            self.layout.used_event_addr(),
            Ordering::Relaxed,
            "reading used_event",
        )
    }

    /// Current `avail.flags`.
    pub fn read_avail_flags(&self) -> Result<u16> {
        self.load_u16(
            self.layout.avail_ring,
            Ordering::Relaxed,
            "reading avail.flags",
        )
    }

    /// The device's `avail_event`.
    pub fn read_avail_event(&self) -> Result<u16> {
        self.load_u16(
            self.layout.avail_event_addr(),
            Ordering::Relaxed,
            "reading avail_event",
        )
    }

    /// The device's `used.flags`.
    pub fn read_used_flags(&self) -> Result<u16> {
        self.load_u16(
            self.layout.used_ring,
            Ordering::Relaxed,
            "reading used.flags",
        )
    }

    /// The device's `used.idx` (acquire).
    pub fn read_used_idx(&self) -> Result<u16> {
        self.read_used_idx_acquire()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testdev::device_queue;
    use super::*;
    use virtio_queue::{Queue, QueueT};

    fn setup(size: u16, event_idx: bool) -> (GuestRam, DriverRing, Queue) {
        let mut ram = GuestRam::new(4 << 20, 0).unwrap();
        let layout = RingLayout::allocate(&mut ram, size).unwrap();
        let ring = DriverRing::new(ram.memory().clone(), layout, event_idx).unwrap();
        let q = device_queue(&layout, event_idx);
        (ram, ring, q)
    }

    #[test]
    fn layout_alignment() {
        let mut ram = GuestRam::new(4 << 20, 0x100000).unwrap();
        ram.alloc(3, 1, "skew").unwrap();
        let l = RingLayout::allocate(&mut ram, 256).unwrap();
        assert_eq!(l.desc_table.0 % 4096, 0);
        assert_eq!(l.avail_ring.0, l.desc_table.0 + 4096);
        assert_eq!(l.used_ring.0 % 4096, 0);
        assert!(l.used_ring.0 >= l.avail_ring.0 + 6 + 512);
        assert_eq!(l.used_event_addr().0, l.avail_ring.0 + 4 + 512);
        assert_eq!(l.avail_event_addr().0, l.used_ring.0 + 4 + 2048);
        assert!(matches!(
            DriverRing::new(ram.memory().clone(), RingLayout { size: 3, ..l }, false),
            Err(RingError::InvalidSize(3))
        ));
    }

    #[test]
    fn need_event_matches_linux() {
        assert!(vring_need_event(0, 1, 0));
        assert!(!vring_need_event(0, 2, 1));
        assert!(vring_need_event(1, 2, 1));
        assert!(vring_need_event(5, 10, 0));
        assert!(!vring_need_event(10, 10, 0));
        // Wrap-around.
        assert!(vring_need_event(0xffff, 1, 0xfffe));
        assert!(!vring_need_event(2, 1, 0xfffe));
    }

    #[test]
    fn chains_round_trip_through_device() {
        let (ram, mut ring, mut q) = setup(8, false);
        let mem = ram.memory();
        let a = GuestAddress(0x100000);
        let h1 = ring
            .add(
                &[
                    Desc::readable(a, 12),
                    Desc::readable(a.unchecked_add(12), 100),
                ],
                11,
            )
            .unwrap();
        let h2 = ring
            .add(&[Desc::writable(a.unchecked_add(4096), 1500)], 22)
            .unwrap();
        assert_eq!(ring.num_free(), 5);
        assert_eq!(ring.in_flight(), 2);

        let c1 = q.pop_descriptor_chain(mem).unwrap();
        assert_eq!(c1.head_index(), h1);
        let d: Vec<_> = c1.clone().collect();
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].addr(), d[0].len(), d[0].is_write_only()),
            (a, 12, false)
        );
        assert!(d[0].has_next());
        assert_eq!(d[1].addr(), a.unchecked_add(12));
        assert_eq!(d[1].len(), 100);
        assert!(!d[1].has_next());
        let c2 = q.pop_descriptor_chain(mem).unwrap();
        assert_eq!(c2.head_index(), h2);
        let d: Vec<_> = c2.collect();
        assert_eq!(d.len(), 1);
        assert!(d[0].is_write_only());
        assert!(q.pop_descriptor_chain(mem).is_none());

        // Complete out of order.
        assert_eq!(ring.pop_used().unwrap(), None);
        q.add_used(mem, h2, 1000).unwrap();
        q.add_used(mem, h1, 0).unwrap();
        assert_eq!(
            ring.pop_used().unwrap(),
            Some(UsedElem {
                head: h2,
                len: 1000,
                token: 22
            })
        );
        assert_eq!(
            ring.pop_used().unwrap(),
            Some(UsedElem {
                head: h1,
                len: 0,
                token: 11
            })
        );
        assert_eq!(ring.pop_used().unwrap(), None);
        assert_eq!(ring.num_free(), 8);
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn ring_full_and_index_wraparound() {
        let (ram, mut ring, mut q) = setup(4, true);
        let mem = ram.memory();
        let buf = GuestAddress(0x200000);
        for _ in 0..4 {
            ring.add(&[Desc::writable(buf, 64)], 0).unwrap();
        }
        assert!(matches!(
            ring.add(&[Desc::writable(buf, 64)], 0),
            Err(RingError::Full { needed: 1, free: 0 })
        ));
        let mut token = 0u64;
        // Drive indices through several u16 wraps.
        for i in 0..140_000u32 {
            let c = q.pop_descriptor_chain(mem).unwrap();
            q.add_used(mem, c.head_index(), (i % 64) + 1).unwrap();
            let u = ring.pop_used().unwrap().unwrap();
            assert_eq!(u.head, c.head_index());
            assert_eq!(u.len, (i % 64) + 1);
            token += 1;
            ring.add(&[Desc::writable(buf, 64)], token).unwrap();
        }
        assert_eq!(ring.in_flight(), 4);
        assert_eq!(ring.avail_idx(), (140_004u32 % 65536) as u16);
    }

    #[test]
    fn indirect_chain_is_walked_by_device() {
        let (mut ram, mut ring, mut q) = setup(8, false);
        let table = ram.alloc(64, 16, "table").unwrap();
        let mem = ram.memory().clone();
        let a = GuestAddress(0x300000);
        let h = ring
            .add_indirect(
                table,
                &[
                    Desc::readable(a, 12),
                    Desc::writable(a.unchecked_add(64), 200),
                ],
                5,
            )
            .unwrap();
        assert_eq!(ring.num_free(), 7);
        let c = q.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(c.head_index(), h);
        let d: Vec<_> = c.collect();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].len(), 12);
        assert!(!d[0].is_write_only());
        assert_eq!(d[1].len(), 200);
        assert!(d[1].is_write_only());
        // Capacity of the indirect chain is the writable part.
        q.add_used(&mem, h, 201).unwrap();
        assert!(matches!(
            ring.pop_used(),
            Err(RingError::UsedLenTooLarge {
                len: 201,
                capacity: 200,
                ..
            })
        ));
    }

    #[test]
    fn kick_decisions_with_event_idx() {
        let (ram, mut ring, mut q) = setup(16, true);
        let mem = ram.memory();
        let buf = GuestAddress(0x200000);
        // avail_event starts at 0: the first buffer needs a kick.
        ring.add(&[Desc::writable(buf, 64)], 0).unwrap();
        assert!(ring.kick_prepare().unwrap());
        // Device has not consumed: avail_event still 0, a second add does not kick.
        ring.add(&[Desc::writable(buf, 64)], 0).unwrap();
        assert!(!ring.kick_prepare().unwrap());
        // Nothing added: no kick.
        assert!(!ring.kick_prepare().unwrap());
        // Device drains and re-arms at next_avail = 2.
        while let Some(c) = q.pop_descriptor_chain(mem) {
            q.add_used(mem, c.head_index(), 0).unwrap();
        }
        assert!(!q.enable_notification(mem).unwrap());
        assert_eq!(ring.read_avail_event().unwrap(), 2);
        ring.add(&[Desc::writable(buf, 64)], 0).unwrap();
        ring.add(&[Desc::writable(buf, 64)], 0).unwrap();
        // Batch of two crossing avail_event=2 → one kick.
        assert!(ring.kick_prepare().unwrap());
        ring.add(&[Desc::writable(buf, 64)], 0).unwrap();
        assert!(!ring.kick_prepare().unwrap());
        // With EVENT_IDX the used.flags NO_NOTIFY bit is ignored by the driver.
        assert!(q.disable_notification(mem).is_ok());
        assert_eq!(ring.read_used_flags().unwrap(), 0);
    }

    #[test]
    fn kick_decisions_without_event_idx() {
        let (ram, mut ring, mut q) = setup(16, false);
        let mem = ram.memory();
        let buf = GuestAddress(0x200000);
        ring.add(&[Desc::writable(buf, 64)], 0).unwrap();
        assert!(ring.kick_prepare().unwrap());
        q.disable_notification(mem).unwrap();
        assert_eq!(ring.read_used_flags().unwrap(), VRING_USED_F_NO_NOTIFY);
        ring.add(&[Desc::writable(buf, 64)], 0).unwrap();
        assert!(!ring.kick_prepare().unwrap());
        q.enable_notification(mem).unwrap();
        ring.add(&[Desc::writable(buf, 64)], 0).unwrap();
        assert!(ring.kick_prepare().unwrap());
    }

    #[test]
    fn interrupt_suppression_with_event_idx() {
        let (ram, mut ring, mut q) = setup(16, true);
        let mem = ram.memory();
        let buf = GuestAddress(0x200000);
        for t in 0..8 {
            ring.add(&[Desc::writable(buf, 64)], t).unwrap();
        }
        let heads: Vec<u16> = std::iter::from_fn(|| q.pop_descriptor_chain(mem))
            .map(|c| c.head_index())
            .collect();
        assert_eq!(heads.len(), 8);

        // Callbacks enabled, used_event = 0: the first completion interrupts.
        let last = ring.enable_cb_prepare().unwrap();
        assert_eq!(last, 0);
        assert!(!ring.poll(last).unwrap());
        q.add_used(mem, heads[0], 1).unwrap();
        assert!(q.needs_notification(mem).unwrap());
        assert!(ring.poll(last).unwrap());
        // Consuming with callbacks enabled keeps used_event = last_used.
        ring.pop_used().unwrap().unwrap();
        assert_eq!(ring.read_used_event().unwrap(), 1);
        q.add_used(mem, heads[1], 1).unwrap();
        assert!(q.needs_notification(mem).unwrap());

        // Disabled: the device must not interrupt.
        ring.disable_cb().unwrap();
        assert!(!ring.callbacks_enabled());
        q.add_used(mem, heads[2], 1).unwrap();
        assert!(!q.needs_notification(mem).unwrap());
        // Harvesting with callbacks disabled does not move used_event.
        let ev = ring.read_used_event().unwrap();
        ring.pop_used().unwrap().unwrap();
        ring.pop_used().unwrap().unwrap();
        assert_eq!(ring.read_used_event().unwrap(), ev);

        // Re-enabled: wake on the next one; nothing pending means safe to sleep.
        assert!(ring.enable_cb().unwrap());
        assert_eq!(ring.read_used_event().unwrap(), 3);
        q.add_used(mem, heads[3], 1).unwrap();
        assert!(q.needs_notification(mem).unwrap());
        // A completion that raced with arming is seen by the re-check.
        ring.disable_cb().unwrap();
        ring.pop_used().unwrap().unwrap();
        q.add_used(mem, heads[4], 1).unwrap();
        assert!(!ring.enable_cb().unwrap());
        ring.pop_used().unwrap().unwrap();

        // Delayed: 3 outstanding → interrupt after 3*3/4 = 2 more.
        assert!(ring.enable_cb_delayed().unwrap());
        assert_eq!(ring.read_used_event().unwrap(), 5 + 2);
        q.add_used(mem, heads[5], 1).unwrap();
        assert!(!q.needs_notification(mem).unwrap());
        q.add_used(mem, heads[6], 1).unwrap();
        assert!(!q.needs_notification(mem).unwrap());
        q.add_used(mem, heads[7], 1).unwrap();
        assert!(q.needs_notification(mem).unwrap());
        // Already past the delayed threshold: returns false.
        assert!(!ring.enable_cb_delayed().unwrap());
    }

    #[test]
    fn interrupt_suppression_without_event_idx() {
        let (_ram, mut ring, _q) = setup(16, false);
        assert_eq!(ring.read_avail_flags().unwrap(), 0);
        ring.disable_cb().unwrap();
        assert_eq!(ring.read_avail_flags().unwrap(), VRING_AVAIL_F_NO_INTERRUPT);
        assert!(ring.enable_cb().unwrap());
        assert_eq!(ring.read_avail_flags().unwrap(), 0);
        ring.disable_cb().unwrap();
        assert!(ring.enable_cb_delayed().unwrap());
        assert_eq!(ring.read_avail_flags().unwrap(), 0);
    }

    #[test]
    fn bogus_used_entries_are_errors() {
        let (ram, mut ring, mut q) = setup(8, false);
        let mem = ram.memory().clone();
        let buf = GuestAddress(0x200000);
        let h = ring.add(&[Desc::writable(buf, 100)], 1).unwrap();
        let used = ring.layout().used_ring;

        // Out-of-range id.
        mem.write_obj(u64::from(100u32), used.unchecked_add(4))
            .unwrap();
        mem.store(1u16, used.unchecked_add(2), Ordering::Release)
            .unwrap();
        assert!(matches!(
            ring.pop_used(),
            Err(RingError::UsedIdOutOfRange { id: 100, size: 8 })
        ));
        // Id that is not an in-flight head.
        let other = (h + 1) % 8;
        mem.write_obj(u64::from(other), used.unchecked_add(4))
            .unwrap();
        assert!(matches!(
            ring.pop_used(),
            Err(RingError::UsedIdNotInFlight { .. })
        ));
        // used.idx running ahead of what is in flight.
        mem.store(2u16, used.unchecked_add(2), Ordering::Release)
            .unwrap();
        assert!(matches!(
            ring.pop_used(),
            Err(RingError::UsedIdxAhead { .. })
        ));
        // Length larger than the buffer.
        mem.store(0u16, used.unchecked_add(2), Ordering::Release)
            .unwrap();
        let c = q.pop_descriptor_chain(&mem).unwrap();
        q.add_used(&mem, c.head_index(), 101).unwrap();
        assert!(matches!(
            ring.pop_used(),
            Err(RingError::UsedLenTooLarge { len: 101, .. })
        ));
    }

    #[test]
    fn raw_loop_chain_is_recovered() {
        let (ram, mut ring, mut q) = setup(8, false);
        let mem = ram.memory();
        let buf = GuestAddress(0x200000);
        // Three descriptors, the last pointing back to the first.
        let raw = [
            RawDesc {
                addr: buf.0,
                len: 64,
                flags: VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                next: RawNext::Follow,
            },
            RawDesc {
                addr: buf.0 + 64,
                len: 64,
                flags: VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                next: RawNext::Follow,
            },
            RawDesc {
                addr: buf.0 + 128,
                len: 64,
                flags: VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                next: RawNext::Chain(0),
            },
        ];
        assert!(matches!(
            ring.add_raw(
                &[RawDesc {
                    next: RawNext::Chain(5),
                    ..raw[0]
                }],
                0
            ),
            Err(RingError::BadRawNext { .. })
        ));
        let h = ring.add_raw(&raw, 99).unwrap();
        let c = q.pop_descriptor_chain(mem).unwrap();
        assert_eq!(c.head_index(), h);
        // virtio-queue stops after `size` descriptors (ttl).
        assert_eq!(c.count(), 8);
        q.add_used(mem, h, 0).unwrap();
        let u = ring.pop_used().unwrap().unwrap();
        assert_eq!((u.head, u.len, u.token), (h, 0, 99));
        assert_eq!(ring.num_free(), 8);
        // The ring keeps working: fill it completely.
        for t in 0..8 {
            ring.add(&[Desc::writable(buf, 64)], t).unwrap();
        }
        let mut n = 0;
        while let Some(c) = q.pop_descriptor_chain(mem) {
            assert_eq!(c.count(), 1);
            n += 1;
        }
        assert_eq!(n, 8);
    }
}
