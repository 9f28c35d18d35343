//! The tap through io_uring, in batches: one `io_uring_enter` per batch of frames instead of one
//! `writev` or `readv` per frame.
//!
//! Why: a tap read or write is mostly kernel work that no batching removes (building, delivering
//! or copying out the skb), but each syscall also pays the entry and exit, the seccomp filter
//! and, in a multi-threaded process, a reference on the file. Measured on the bench machine
//! (README, "Where the time goes"), reaching the kernel is 20-40% of a 64-byte frame in a bare
//! `read` or `write` loop. Submitted as a batch, the operations run inline in the submitting
//! thread, in order, and pay the entry, the filter and the file reference once; io_uring's own
//! work per operation costs 65-80% of what the syscall did. Every operation carries RWF_NOWAIT,
//! so none is ever parked in the kernel: a read of an empty tap or a write to a full one fails
//! at once with EAGAIN, as on the non-blocking tap, and the submission never waits.
//!
//! The sandbox stays closed. io_uring operations do not pass through seccomp, so each ring is
//! made before the filter is installed, disabled (IORING_SETUP_R_DISABLED) until it is locked
//! down: exactly one registered file, the pair's tap queue; READV and READ only for an RX ring,
//! and WRITEV and WRITE only for a TX ring; IOSQE_FIXED_FILE required, so no other descriptor
//! can be named; no registration operation allowed afterwards except unregistering the files.
//! The filter then allows `io_uring_enter`, `io_uring_register` only to unregister files, and
//! not `io_uring_setup`, so the only thing any ring in the process can ever do is read or write
//! frames of its tap, which `readv` and `writev` could do anyway.
//!
//! Letting go of the tap: the kernel frees a closed ring, and drops the files registered with
//! it, from a workqueue some milliseconds later, so a daemon that exited would still hold its tap
//! for a moment (a tap it created would outlive it; a restarted daemon would find it busy).
//! Dropping a `TapRing` unregisters the file first, which releases it before the call returns.
//!
//! Where io_uring is unavailable (an old kernel, `kernel.io_uring_disabled`, a container's
//! filter) or cannot reach the tap, the daemon logs why and uses `readv`/`writev`. The second
//! case is every kernel before 6.4: tun only accepts non-blocking (RWF_NOWAIT) reads and writes
//! from Linux 6.4 (commit 438b406055cd, "tun: flag the device as supporting FMODE_NOWAIT");
//! before that each one fails with EOPNOTSUPP. A ring can be made there, so making one proves
//! nothing: [`TapRing::probe`] tries a write that sends nothing. The flag is the file's, so a
//! tap that takes the probe's write takes reads too.

use std::io;

use io_uring::register::Restriction;
use io_uring::squeue::Flags;
use io_uring::{opcode, types, IoUring};
use libc::iovec;

use crate::tap::Tap;

/// `IORING_UNREGISTER_FILES` (include/uapi/linux/io_uring.h); the crate keeps its constants
/// private.
pub const IORING_UNREGISTER_FILES: u8 = 3;

/// TX frames per submission. Larger batches measured no faster; the ring needs this many entries.
pub const BATCH: usize = 64;

/// RX reads per submission at most. Each read needs a frame-sized staging buffer of its own
/// (`rx::RxCarry`), so this is also what a pair keeps allocated for RX: 32 x 64 KiB.
pub const RX_BATCH: usize = 32;

/// What a ring may do to its tap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

pub struct TapRing {
    ring: IoUring,
    op: Op,
}

/// The TX side's ring.
pub type TxRing = TapRing;
/// The RX side's ring.
pub type RxRing = TapRing;

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

impl TapRing {
    /// A ring that can only read (`Op::Read`) or only write (`Op::Write`) frames of `tap`. Must
    /// be called before seccomp is installed.
    pub fn new(tap: &Tap, op: Op) -> io::Result<TapRing> {
        use std::os::fd::AsRawFd;
        let (entries, code) = match op {
            Op::Read => (RX_BATCH, opcode::Readv::CODE),
            Op::Write => (BATCH, opcode::Writev::CODE),
        };
        #[allow(clippy::cast_possible_truncation)] // 32 or 64
        let ring = IoUring::builder()
            .setup_r_disabled()
            .build(entries as u32)?;
        let s = ring.submitter();
        s.register_files(&[tap.as_raw_fd()])?;
        // Frames in one piece go with READ or WRITE (no iovec array to copy in).
        let single = match op {
            Op::Read => opcode::Read::CODE,
            Op::Write => opcode::Write::CODE,
        };
        s.register_restrictions(&mut [
            Restriction::sqe_op(code),
            Restriction::sqe_op(single),
            Restriction::sqe_flags_allowed(Flags::FIXED_FILE.bits()),
            Restriction::sqe_flags_required(Flags::FIXED_FILE.bits()),
            Restriction::register_op(IORING_UNREGISTER_FILES),
        ])?;
        s.register_enable_rings()?;
        Ok(TapRing { ring, op })
    }

    /// Whether the tap takes this ring's writes: one write of a single byte, shorter than any
    /// vnet header. A kernel whose tun lacks non-blocking writes refuses it with EOPNOTSUPP
    /// before tun sees it; one that has them passes it to tun, which refuses it with EINVAL
    /// before building a frame (no frame is sent, no counter moves). A zero-length write would
    /// not do: the kernel may complete it without looking at the flags.
    pub fn probe(&mut self) -> Result<(), ProbeError> {
        debug_assert_eq!(
            self.op,
            Op::Write,
            "only a write probes without taking a frame"
        );
        let byte = [0u8; 1];
        let iov = [iovec {
            iov_base: byte.as_ptr() as *mut libc::c_void,
            iov_len: 1,
        }];
        let mut out = [0i32; 1];
        // SAFETY: `byte` and `iov` live on this frame for the whole call, which waits for the
        // completion.
        unsafe { self.submit(std::iter::once(&iov[..]), &mut out) }.map_err(ProbeError::Io)?;
        match -out[0] {
            libc::EINVAL | libc::EBADFD => Ok(()),
            libc::EOPNOTSUPP => Err(ProbeError::NoNowait),
            _ => Err(ProbeError::Unexpected(out[0])),
        }
    }

    /// Write `frames` (each the iovecs of one frame) to the tap, or read one frame into each, in
    /// order, with one submission; `out[i]` gets frame `i`'s result: bytes written or read, or
    /// -errno (0 for a frame without iovecs, which is skipped). Every operation completes (or
    /// fails with -EAGAIN) inline, in submission order; the call still waits for every
    /// completion before returning.
    ///
    /// # Safety
    /// Every iovec must describe memory readable (a write) or writable (a read) for the whole
    /// call, and not otherwise accessed during it.
    pub unsafe fn submit<'a>(
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
                // RWF_NOWAIT: without it a write that would block (a read of an empty tap) is
                // parked on the tap's poll queue and the submission waits, stalling the whole
                // worker; with it the operation fails with EAGAIN, as on the non-blocking tap.
                // Exact: a frame has at most MAX_CHAIN_SEGS (64) iovecs, and a staging tail.
                #[allow(clippy::cast_possible_truncation)]
                let n_iov = iov.len() as u32;
                let sqe = match (self.op, iov) {
                    // A frame in one piece (most small ones), without an iovec array to import.
                    // Exact: one descriptor's length is a u32.
                    #[allow(clippy::cast_possible_truncation)]
                    (Op::Write, [one]) => {
                        opcode::Write::new(types::Fixed(0), one.iov_base.cast(), one.iov_len as u32)
                            .rw_flags(libc::RWF_NOWAIT)
                            .build()
                    }
                    (Op::Write, _) => opcode::Writev::new(types::Fixed(0), iov.as_ptr(), n_iov)
                        .rw_flags(libc::RWF_NOWAIT)
                        .build(),
                    // Exact: a staging slot's or one descriptor's length fits a u32.
                    #[allow(clippy::cast_possible_truncation)]
                    (Op::Read, [one]) => {
                        opcode::Read::new(types::Fixed(0), one.iov_base.cast(), one.iov_len as u32)
                            .rw_flags(libc::RWF_NOWAIT)
                            .build()
                    }
                    (Op::Read, _) => opcode::Readv::new(types::Fixed(0), iov.as_ptr(), n_iov)
                        .rw_flags(libc::RWF_NOWAIT)
                        .build(),
                }
                .user_data(i as u64);
                // SAFETY: the caller keeps the buffers valid for the call, `iov` lives in the
                // caller's slice for the call, and we wait for every completion below. The queue
                // is empty on entry; a caller handing more frames than it holds gets an error.
                if unsafe { sq.push(&sqe) }.is_err() {
                    return Err(io::Error::other("more frames than the ring's entries"));
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

impl Drop for TapRing {
    fn drop(&mut self) {
        if let Err(e) = self.ring.submitter().unregister_files() {
            log::warn!(
                "io_uring: unregistering the tap failed ({e}); the kernel lets go of it later"
            );
        }
    }
}
