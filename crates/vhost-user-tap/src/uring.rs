//! TX writes to the tap in batches, through io_uring: one `io_uring_enter` per batch instead of
//! one `writev` per frame.
//!
//! Why: a tap write is mostly kernel work that no batching removes (building and delivering the
//! skb), but each `writev` also pays the syscall entry, the seccomp filter and, in a
//! multi-threaded process, a reference on the file. Measured on the bench machine (README,
//! "TX through io_uring"), those are ~10% of a 64-byte write; submitted as a batch, the writes
//! run inline in the submitting thread, in order, and pay them once.
//!
//! The sandbox stays closed. io_uring operations do not pass through seccomp, so each ring is
//! made before the filter is installed, disabled (IORING_SETUP_R_DISABLED) until it is locked
//! down: exactly one registered file, the pair's tap queue; WRITEV as the only operation;
//! IOSQE_FIXED_FILE required, so no other descriptor can be named; no registration operation
//! allowed afterwards except unregistering the files. The filter then allows `io_uring_enter`,
//! `io_uring_register` only to unregister files, and not `io_uring_setup`, so the only thing any
//! ring in the process can ever do is write frames to the tap, which `writev` could do anyway.
//!
//! Letting go of the tap: the kernel frees a closed ring, and drops the files registered with
//! it, from a workqueue some milliseconds later, so a daemon that exited would still hold its tap
//! for a moment (a tap it created would outlive it; a restarted daemon would find it busy).
//! Dropping a `TxRing` unregisters the file first, which releases it before the call returns.
//!
//! Where io_uring is unavailable (an old kernel, `kernel.io_uring_disabled`, a container's
//! filter) or cannot write to the tap, the daemon logs why and writes with `writev`. The second
//! case is every kernel before 6.4: tun only accepts non-blocking (RWF_NOWAIT) writes from
//! Linux 6.4 (commit 438b406055cd, "tun: flag the device as supporting FMODE_NOWAIT"); before
//! that each such write fails with EOPNOTSUPP. A ring can be made there, so making one proves
//! nothing: [`TxRing::probe`] tries a write that sends nothing.

use std::io;

use io_uring::register::Restriction;
use io_uring::squeue::Flags;
use io_uring::{opcode, types, IoUring};
use libc::iovec;

use crate::tap::Tap;

/// `IORING_UNREGISTER_FILES` (include/uapi/linux/io_uring.h); the crate keeps its constants
/// private.
pub const IORING_UNREGISTER_FILES: u8 = 3;

/// Frames per submission. Larger batches measured no faster; the ring needs this many entries.
pub const BATCH: usize = 64;

pub struct TxRing {
    ring: IoUring,
}

/// Why a ring cannot write to the tap.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "tun on this kernel refuses non-blocking writes through io_uring (EOPNOTSUPP; it takes \
         them from Linux 6.4)"
    )]
    NoNowait,
    #[error("the test write returned {0} instead of EINVAL")]
    Unexpected(i32),
    #[error("the test write failed: {0}")]
    Io(#[source] io::Error),
}

impl TxRing {
    /// A ring that can only write to `tap`. Must be called before seccomp is installed.
    pub fn new(tap: &Tap) -> io::Result<TxRing> {
        use std::os::fd::AsRawFd;
        #[allow(clippy::cast_possible_truncation)] // 64
        let ring = IoUring::builder().setup_r_disabled().build(BATCH as u32)?;
        let s = ring.submitter();
        s.register_files(&[tap.as_raw_fd()])?;
        s.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_flags_allowed(Flags::FIXED_FILE.bits()),
            Restriction::sqe_flags_required(Flags::FIXED_FILE.bits()),
            Restriction::register_op(IORING_UNREGISTER_FILES),
        ])?;
        s.register_enable_rings()?;
        Ok(TxRing { ring })
    }

    /// Whether the tap takes this ring's writes: one write of a single byte, shorter than any
    /// vnet header. A kernel whose tun lacks non-blocking writes refuses it with EOPNOTSUPP
    /// before tun sees it; one that has them passes it to tun, which refuses it with EINVAL
    /// before building a frame (no frame is sent, no counter moves). A zero-length write would
    /// not do: the kernel may complete it without looking at the flags.
    pub fn probe(&mut self) -> Result<(), ProbeError> {
        let byte = [0u8; 1];
        let iov = [iovec {
            iov_base: byte.as_ptr() as *mut libc::c_void,
            iov_len: 1,
        }];
        let mut out = [0i32; 1];
        // SAFETY: `byte` and `iov` live on this frame for the whole call, which waits for the
        // completion.
        unsafe { self.write_batch(std::iter::once(&iov[..]), &mut out) }.map_err(ProbeError::Io)?;
        match -out[0] {
            libc::EINVAL | libc::EBADFD => Ok(()),
            libc::EOPNOTSUPP => Err(ProbeError::NoNowait),
            _ => Err(ProbeError::Unexpected(out[0])),
        }
    }

    /// Write `frames` (each the iovecs of one frame) to the tap, in order, with one submission;
    /// `out[i]` gets frame `i`'s result: bytes written or -errno (0 for a frame without iovecs,
    /// which is skipped). Every write completes (or fails with -EAGAIN) inline, in submission
    /// order; the call still waits for every completion before returning.
    ///
    /// # Safety
    /// Every iovec must describe memory readable for the whole call.
    pub unsafe fn write_batch<'a>(
        &mut self,
        frames: impl Iterator<Item = &'a [iovec]>,
        out: &mut [i32],
    ) -> io::Result<()> {
        let mut n = 0;
        {
            let mut sq = self.ring.submission();
            for (i, iov) in frames.enumerate() {
                if iov.is_empty() {
                    out[i] = 0;
                    continue;
                }
                n += 1;
                // RWF_NOWAIT: without it a write that would block is parked on the tap's poll
                // queue and the submission waits for room, stalling the whole worker; with it
                // the write fails with EAGAIN, like writev on the non-blocking tap.
                // Exact: a frame has at most MAX_CHAIN_SEGS (64) iovecs.
                #[allow(clippy::cast_possible_truncation)]
                let n_iov = iov.len() as u32;
                let sqe = opcode::Writev::new(types::Fixed(0), iov.as_ptr(), n_iov)
                    .rw_flags(libc::RWF_NOWAIT)
                    .build()
                    .user_data(i as u64);
                // SAFETY: the caller keeps the buffers readable for the call, `iov` lives in the
                // caller's slice for the call, and we wait for every completion below. The queue
                // has BATCH entries and is empty on entry, so the push cannot fail.
                if unsafe { sq.push(&sqe) }.is_err() {
                    unreachable!("submission queue holds BATCH entries");
                }
            }
        }
        let mut done = 0;
        while done < n {
            match self.ring.submit_and_wait(n - done) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EBUSY: completions must be reaped first (done below).
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            for cqe in self.ring.completion() {
                // user_data is the frame's index in `out`, as pushed above.
                if let Some(slot) = usize::try_from(cqe.user_data())
                    .ok()
                    .and_then(|i| out.get_mut(i))
                {
                    *slot = cqe.result();
                }
                done += 1;
            }
        }
        Ok(())
    }
}

impl Drop for TxRing {
    fn drop(&mut self) {
        if let Err(e) = self.ring.submitter().unregister_files() {
            log::warn!(
                "io_uring: unregistering the tap failed ({e}); the kernel lets go of it later"
            );
        }
    }
}
