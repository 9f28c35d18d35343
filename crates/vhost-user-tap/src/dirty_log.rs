//! The migration dirty log (SET_LOG_BASE): a bitmap in a memfd the frontend shares, one bit per
//! 4 KiB guest-physical page, which the daemon sets for every page it writes while the frontend
//! copies guest memory to the destination. QEMU reads and clears it 64 bits at a time with an
//! atomic exchange and then copies the pages it found set, so every bit is set with an atomic OR
//! *after* the write it stands for, with release ordering: a page is either copied after our
//! write became visible or its bit is still set for the next pass (vhost-user.rst, "Migration").
//!
//! A write outside the log (a guest address past what it covers) cannot happen: the session only
//! runs pairs while the log covers the whole guest memory and every used ring's log address
//! (`covers`), and `mark` still checks each page against the mapping's length.

use std::fs::File;
use std::sync::atomic::{AtomicU8, Ordering};

use thiserror::Error;
use vm_memory::mmap::{MmapRegion, MmapRegionError};
use vm_memory::FileOffset;

/// The page size the log counts in (`VHOST_LOG_PAGE`).
pub const LOG_PAGE: u64 = 0x1000;

#[derive(Debug, Error)]
pub enum LogError {
    #[error("a log of {0} bytes is empty or does not fit this host's addresses")]
    BadSize(u64),
    #[error("its file holds {have:#x} bytes, the log needs {need:#x} (offset + size)")]
    ShortFile { need: u64, have: u64 },
    #[error("fstat of its file failed: {0}")]
    Stat(#[source] std::io::Error),
    #[error("mapping it failed: {0}")]
    Map(#[source] MmapRegionError),
    #[error(
        "its file can shrink (not a memfd, or one that cannot be sealed with F_SEAL_SHRINK): \
         shrunk while mapped, it would crash the daemon; QEMU's logs are sealable memfds"
    )]
    CanShrink,
}

/// The mapped log.
pub struct DirtyLog {
    map: MmapRegion,
}

// SAFETY: the mapping is only accessed through atomics (`mark`), from any thread.
unsafe impl Sync for DirtyLog {}
// SAFETY: as above; the mapping is unmapped by whichever thread drops the last reference.
unsafe impl Send for DirtyLog {}

impl DirtyLog {
    /// Map `size` bytes of `file` at `offset` shared, once the file is checked to hold them
    /// (a mapping past a file's end is a SIGBUS at the first mark).
    pub fn map(file: File, size: u64, offset: u64) -> Result<DirtyLog, LogError> {
        let len = usize::try_from(size)
            .ok()
            .filter(|&l| l > 0)
            .ok_or(LogError::BadSize(size))?;
        let need = offset.checked_add(size).ok_or(LogError::BadSize(size))?;
        let st = crate::sys::fstat(&file).map_err(LogError::Stat)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(LogError::CanShrink);
        }
        let have = u64::try_from(st.st_size).unwrap_or(0);
        if have < need {
            return Err(LogError::ShortFile { need, have });
        }
        // Unlike guest memory (which may be a hugetlbfs file), a log is always a memfd in QEMU:
        // one that could still shrink under the mapping is refused rather than trusted.
        if crate::sys::seal_against_shrinking(&file) != crate::sys::Shrink::Sealed {
            return Err(LogError::CanShrink);
        }
        let map =
            MmapRegion::from_file(FileOffset::new(file, offset), len).map_err(LogError::Map)?;
        Ok(DirtyLog { map })
    }

    /// Bytes of bitmap.
    pub fn bytes(&self) -> usize {
        self.map.size()
    }

    /// Guest-physical addresses the log covers: `[0, covers())`.
    pub fn covers(&self) -> u64 {
        (self.bytes() as u64).saturating_mul(8 * LOG_PAGE)
    }

    /// Whether `[gpa, gpa + len)` lies inside what the log covers.
    pub fn covers_range(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= self.covers())
    }

    /// Mark the pages `[gpa, gpa + len)` touches dirty; returns how many pages it marked.
    pub fn mark(&self, gpa: u64, len: u64) -> u64 {
        if len == 0 {
            return 0;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        let base = self.map.as_ptr();
        let bytes = self.bytes() as u64;
        let mut marked = 0;
        for page in first..=last {
            let byte = page / 8;
            if byte >= bytes {
                break;
            }
            // Exact: `byte < bytes`, the mapping's length, a usize.
            #[allow(clippy::cast_possible_truncation)]
            let byte = byte as usize;
            // SAFETY: `byte` is inside the mapping, which lives as long as `self`; the frontend
            // reads and clears the log concurrently, so it is only accessed atomically.
            let cell = unsafe { AtomicU8::from_ptr(base.add(byte)) };
            #[allow(clippy::cast_possible_truncation)]
            cell.fetch_or(1 << (page % 8) as u8, Ordering::Release);
            marked += 1;
        }
        marked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn memfd(flags: libc::c_uint) -> File {
        use std::os::fd::FromRawFd;
        // SAFETY: a valid name; the fd is checked and then owned by the File.
        let fd = unsafe { libc::memfd_create(c"test-log".as_ptr(), flags) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and is owned by nobody else.
        unsafe { File::from_raw_fd(fd) }
    }

    fn log_file(size: usize) -> File {
        let mut f = memfd(libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
        f.write_all(&vec![0u8; size]).unwrap();
        f
    }

    fn bits(log: &DirtyLog) -> Vec<u64> {
        let base = log.map.as_ptr();
        (0..log.bytes() as u64 * 8)
            .filter(|p| {
                // SAFETY: inside the mapping.
                let b = unsafe { *base.add(usize::try_from(p / 8).unwrap()) };
                b & (1 << (p % 8)) != 0
            })
            .collect()
    }

    #[test]
    fn a_write_marks_every_page_it_touches_and_nothing_else() {
        let log = DirtyLog::map(log_file(16), 16, 0).unwrap();
        assert_eq!(log.covers(), 16 * 8 * LOG_PAGE);
        assert_eq!(log.mark(0x1ffe, 4), 2);
        assert_eq!(log.mark(0x5000, 1), 1);
        assert_eq!(log.mark(0x9000, 0), 0);
        assert_eq!(bits(&log), vec![1, 2, 5]);
    }

    #[test]
    fn marks_past_the_log_are_not_written() {
        let log = DirtyLog::map(log_file(1), 1, 0).unwrap();
        assert_eq!(log.mark(7 * LOG_PAGE, 2 * LOG_PAGE), 1);
        assert_eq!(log.mark(u64::MAX - 10, 100), 0);
        assert!(!log.covers_range(7 * LOG_PAGE, LOG_PAGE + 1));
        assert_eq!(bits(&log), vec![7]);
    }

    #[test]
    fn a_log_that_could_shrink_is_refused_and_an_accepted_one_cannot() {
        let f = log_file(16);
        let keep = f.try_clone().unwrap();
        let _log = DirtyLog::map(f, 16, 0).unwrap();
        assert!(keep.set_len(8).is_err(), "sealed against shrinking");
        let mut unsealable = memfd(libc::MFD_CLOEXEC);
        unsealable.write_all(&[0; 16]).unwrap();
        assert!(matches!(
            DirtyLog::map(unsealable, 16, 0),
            Err(LogError::CanShrink)
        ));
        let t = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let mut plain = t.as_file().try_clone().unwrap();
        plain.write_all(&[0; 16]).unwrap();
        assert!(matches!(
            DirtyLog::map(plain, 16, 0),
            Err(LogError::CanShrink)
        ));
    }

    #[test]
    fn a_file_shorter_than_the_log_is_refused() {
        assert!(matches!(
            DirtyLog::map(log_file(8), 16, 0),
            Err(LogError::ShortFile { .. })
        ));
        assert!(matches!(
            DirtyLog::map(log_file(8), 0, 0),
            Err(LogError::BadSize(0))
        ));
    }
}
