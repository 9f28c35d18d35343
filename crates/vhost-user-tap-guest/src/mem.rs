//! Guest memory: one memfd, mapped `MAP_SHARED` in this process and handed to the backend in
//! `SET_MEM_TABLE`, exactly like QEMU's `memory-backend-memfd,share=on`.
//!
//! Guest physical addresses (GPAs) start at a configurable base (default 0). The "userspace
//! address" the frontend reports for the region is the address of our own mapping, as QEMU does.
//! A simple bump allocator hands out aligned GPA ranges for rings and buffer pools.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// Errors of the guest-memory module.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// The requested size is zero, not page aligned or overflows the address space.
    #[error("invalid guest memory size {size:#x} at base {base:#x} (must be a non-zero multiple of 4 KiB)")]
    InvalidSize {
        /// Requested size.
        size: u64,
        /// Requested base GPA.
        base: u64,
    },
    /// `memfd_create` failed.
    #[error("memfd_create for guest memory failed: {0}")]
    MemfdCreate(#[source] std::io::Error),
    /// `ftruncate` of the memfd failed.
    #[error("sizing the guest memfd to {size} bytes failed: {source}")]
    Truncate {
        /// Requested size.
        size: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Mapping the memfd failed.
    #[error("mapping guest memory failed: {0}")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// The bump allocator ran out of guest memory.
    #[error("guest memory exhausted: {what} needs {size} bytes (align {align}), only {free} bytes left; raise the guest memory size")]
    OutOfMemory {
        /// What the allocation was for.
        what: &'static str,
        /// Requested size.
        size: u64,
        /// Requested alignment.
        align: u64,
        /// Bytes left.
        free: u64,
    },
}

/// Page size used for alignment of rings.
pub const PAGE_SIZE: u64 = 4096;

/// The guest's RAM: a single memfd-backed region.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    base: GuestAddress,
    size: u64,
    next: u64,
}

impl GuestRam {
    /// Create `size` bytes of shared guest memory at guest physical address `base`.
    pub fn new(size: u64, base: u64) -> Result<Self, MemError> {
        if size == 0
            || size % PAGE_SIZE != 0
            || base % PAGE_SIZE != 0
            || base.checked_add(size).is_none()
            || usize::try_from(size).is_err()
        {
            return Err(MemError::InvalidSize { size, base });
        }
        // Sealable, as QEMU's memory-backend-memfd makes its memfds.
        let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        // SAFETY: the name is a valid NUL-terminated C string; memfd_create has no other
        // memory-safety preconditions. The returned fd is checked below.
        let fd = unsafe { libc::memfd_create(c"vhost-user-tap-guest".as_ptr(), flags) };
        if fd < 0 {
            return Err(MemError::MemfdCreate(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create, is valid and owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|source| MemError::Truncate { size, source })?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(base),
            size as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(MemError::Map)?;
        Ok(GuestRam {
            mem,
            base: GuestAddress(base),
            size,
            next: 0,
        })
    }

    /// The vm-memory view of guest memory (cheap to clone; clones share the mapping).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// First guest physical address.
    pub fn base(&self) -> GuestAddress {
        self.base
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn region(&self) -> &vm_memory::GuestRegionMmap {
        // The collection has exactly one region, created in `new`.
        self.mem.iter().next().expect("guest memory has one region")
    }

    /// Address of our own mapping of the region (the "userspace address" in SET_MEM_TABLE).
    pub fn host_addr(&self) -> u64 {
        self.region().as_ptr() as u64
    }

    /// The memfd backing guest memory (sent to the backend with SET_MEM_TABLE).
    pub fn memfd(&self) -> RawFd {
        self.region()
            .file_offset()
            .expect("guest memory is file backed")
            .file()
            .as_raw_fd()
    }

    /// Offset of the region inside the memfd (always 0 here).
    pub fn mmap_offset(&self) -> u64 {
        self.region().file_offset().map(|f| f.start()).unwrap_or(0)
    }

    /// Translate a guest physical address to the frontend's userspace address.
    pub fn gpa_to_uva(&self, gpa: GuestAddress) -> Option<u64> {
        let off = gpa.checked_offset_from(self.base)?;
        if off >= self.size {
            return None;
        }
        Some(self.host_addr() + off)
    }

    /// True if `[gpa, gpa + len)` lies inside guest memory.
    pub fn contains(&self, gpa: GuestAddress, len: u64) -> bool {
        match gpa.checked_offset_from(self.base) {
            Some(off) => off.checked_add(len).is_some_and(|end| end <= self.size),
            None => false,
        }
    }

    /// Bytes not yet handed out by the allocator.
    pub fn free_bytes(&self) -> u64 {
        self.size - self.next
    }

    /// Allocate `size` bytes aligned to `align` (a power of two). Memory is never freed.
    pub fn alloc(
        &mut self,
        size: u64,
        align: u64,
        what: &'static str,
    ) -> Result<GuestAddress, MemError> {
        let align = align.max(1);
        debug_assert!(align.is_power_of_two());
        let free = self.free_bytes();
        let oom = || MemError::OutOfMemory {
            what,
            size,
            align,
            free,
        };
        // Alignment is of the GPA, so align base + next.
        let cur = self.base.0 + self.next;
        let aligned = cur.checked_add(align - 1).ok_or_else(oom)? & !(align - 1);
        let end = (aligned - self.base.0).checked_add(size).ok_or_else(oom)?;
        if end > self.size {
            return Err(oom());
        }
        self.next = end;
        Ok(GuestAddress(aligned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn alloc_and_translate() {
        let mut ram = GuestRam::new(1 << 20, 0x10000).unwrap();
        assert_eq!(ram.base(), GuestAddress(0x10000));
        let a = ram.alloc(10, 1, "a").unwrap();
        assert_eq!(a, GuestAddress(0x10000));
        let b = ram.alloc(16, 4096, "b").unwrap();
        assert_eq!(b, GuestAddress(0x11000));
        assert_eq!(ram.gpa_to_uva(b), Some(ram.host_addr() + 0x1000));
        assert_eq!(ram.gpa_to_uva(GuestAddress(0x100)), None);
        assert!(ram.contains(GuestAddress(0x10000), 1 << 20));
        assert!(!ram.contains(GuestAddress(0x10001), 1 << 20));
        assert!(matches!(
            ram.alloc(1 << 21, 8, "big"),
            Err(MemError::OutOfMemory { .. })
        ));
        ram.memory().write_obj(0x1234u32, b).unwrap();
        assert_eq!(ram.memory().read_obj::<u32>(b).unwrap(), 0x1234);
        assert!(ram.memfd() >= 0);
        assert!(GuestRam::new(100, 0).is_err());
    }
}
