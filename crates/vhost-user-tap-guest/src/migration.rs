//! The frontend's side of a migration's dirty log: the bitmap QEMU shares with a backend in
//! SET_LOG_BASE (one bit per 4 KiB guest-physical page, in a memfd), read and cleared the way
//! QEMU's migration thread does it, 64 bits at a time with an atomic exchange, so a test sees
//! exactly the pages a backend marked between two reads.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

use crate::mem::PAGE_SIZE;

/// Errors creating the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `memfd_create` or sizing it failed.
    #[error("creating the dirty log's memfd failed: {0}")]
    Memfd(#[source] std::io::Error),
    /// Mapping it failed.
    #[error("mapping the dirty log failed: {0}")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
}

/// A dirty log for guest memory up to a guest-physical end address.
#[derive(Debug)]
pub struct DirtyLog {
    map: MmapRegion,
    file: File,
    words: usize,
}

impl DirtyLog {
    /// A zeroed log covering guest-physical addresses `0..mem_end`, sized as QEMU sizes it (a
    /// whole number of 64-bit words).
    pub fn new(mem_end: u64) -> Result<DirtyLog, LogError> {
        let pages = mem_end.div_ceil(PAGE_SIZE);
        let words = pages.div_ceil(64).max(1) as usize;
        // Sealable, as QEMU makes its logs (the daemon refuses a log that could shrink).
        let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        // SAFETY: the name is a valid NUL-terminated C string; the fd is checked below.
        let fd = unsafe { libc::memfd_create(c"vhost-user-tap-log".as_ptr(), flags) };
        if fd < 0 {
            return Err(LogError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len((words * 8) as u64).map_err(LogError::Memfd)?;
        let dup = file.try_clone().map_err(LogError::Memfd)?;
        let map =
            MmapRegion::from_file(FileOffset::new(dup, 0), words * 8).map_err(LogError::Map)?;
        Ok(DirtyLog { map, file, words })
    }

    /// The log's size in bytes (SET_LOG_BASE's `mmap_size`).
    pub fn size(&self) -> u64 {
        (self.words * 8) as u64
    }

    /// The memfd to send in SET_LOG_BASE.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.words);
        // SAFETY: the mapping is `words * 8` bytes long, page aligned (so every word is 8-byte
        // aligned), lives as long as `self`, and is only accessed atomically, by us and by the
        // backend in another process.
        unsafe { AtomicU64::from_ptr(self.map.as_ptr().cast::<u64>().add(i)) }
    }

    /// The pages (guest-physical page numbers) marked since the last call, cleared as read.
    pub fn take_dirty(&self) -> BTreeSet<u64> {
        let mut pages = BTreeSet::new();
        for i in 0..self.words {
            let mut w = self.word(i).swap(0, Ordering::Acquire);
            while w != 0 {
                let b = u64::from(w.trailing_zeros());
                pages.insert(i as u64 * 64 + b);
                w &= w - 1;
            }
        }
        pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sized_in_words_and_read_by_exchange() {
        let log = DirtyLog::new(65 * PAGE_SIZE).unwrap();
        assert_eq!(log.size(), 16, "65 pages need two 64-bit words");
        log.word(0).fetch_or(1 << 3, Ordering::Release);
        log.word(1).fetch_or(1, Ordering::Release);
        assert_eq!(log.take_dirty(), BTreeSet::from([3, 64]));
        assert!(log.take_dirty().is_empty(), "reading clears");
    }
}
