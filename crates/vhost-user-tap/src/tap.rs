//! The tap device: open or attach, configure, and move frames with readv/writev.
//!
//! This is the only module that issues tun ioctls. Every call that can fail says which step failed
//! and for which tap, because the usual failures (no permission, tap held by another process, a
//! name that is not a tap) each have a different fix.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};

use libc::{c_int, c_short, c_uint, iovec};
use thiserror::Error;

use crate::virtio_net::HDR_LEN_LEGACY;

const TUN_PATH: &str = "/dev/net/tun";

/// The seed series' opt-in flag (Linux 7.3+): when the tun ring is full, stop the device queue
/// instead of tail-dropping, so a qdisc holds the frames. Older kernels ignore unknown flags at
/// TUNSETIFF, so support is probed with TUNGETFEATURES, and its effect read back with TUNGETIFF.
pub const IFF_BACKPRESSURE: c_int = 0x0080;

#[derive(Debug, Error)]
pub enum TapError {
    #[error("tap name {0:?} is invalid: 1 to 15 bytes, no '/', ':' or whitespace")]
    BadName(String),
    #[error("cannot open {TUN_PATH}: {0} (is the tun module loaded and the device visible here?)")]
    OpenTun(io::Error),
    #[error(
        "cannot open {TUN_PATH}: permission denied (distributions make it mode 0666; here it is \
         not, so run as root or `chmod 0666 {TUN_PATH}`)"
    )]
    OpenTunDenied,
    #[error(
        "no permission to create or attach tap {0}: run as root (CAP_NET_ADMIN) or pre-create it \
         for this user: `ip tuntap add {0} mode tap user $USER vnet_hdr{1}`"
    )]
    Permission(String, &'static str),
    #[error(
        "tap {0} is busy: another process holds it (a tap without multi_queue admits one reader)"
    )]
    Busy(String),
    #[error(
        "{0} exists but cannot be attached as a tap with the flags we need (is it a tun device, \
         or a tap created {1} multi_queue?): {2}"
    )]
    Incompatible(String, &'static str, io::Error),
    #[error("TUNSETIFF on tap {0} failed: {1}")]
    SetIff(String, io::Error),
    #[error("{step} on tap {name} failed: {err}")]
    Ioctl {
        step: &'static str,
        name: String,
        err: io::Error,
    },
}

/// The IFF_* flags this kernel's tun driver understands (TUNGETFEATURES, no tap needed).
pub fn tun_features() -> Result<c_uint, TapError> {
    let file = Tap::open_tun()?;
    let mut features: c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one unsigned int, which `features` is and outlives.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(&file, libc::TUNGETFEATURES, &mut features)
    };
    check(ret).map_err(|err| TapError::Ioctl {
        step: "TUNGETFEATURES",
        name: TUN_PATH.into(),
        err,
    })?;
    Ok(features)
}

impl TapError {
    /// The tap was deleted under us: the kernel answers EBADFD on a detached tun file.
    pub fn is_gone(&self) -> bool {
        matches!(self, TapError::Ioctl { err, .. } if err.raw_os_error() == Some(libc::EBADFD))
    }
}

/// One queue of a tap device (one file descriptor). With `--queues N` a tap has N of these.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// The vnet header length tun reads in front of every frame written to it, as last set (or
    /// found at open). A frontend's features say what the *guest* uses; between two frontends,
    /// and before the new one's SET_FEATURES, the tap still has the old length, and a frame the
    /// daemon writes on its own (SEND_RARP) must carry the header tun expects.
    vnet_hdr_len: AtomicUsize,
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        // The kernel reads the name as bytes; c_char is their C spelling.
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    ifr
}

fn check(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn validate_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_string()))
    }
}

impl Tap {
    /// Open `queues` file descriptors on tap `name`, creating it if it does not exist.
    ///
    /// Flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, plus IFF_MULTI_QUEUE when `queues > 1`; each fd is
    /// non-blocking so the workers can poll them.
    pub fn open_queues(name: &str, queues: usize, extra: c_int) -> Result<Vec<Tap>, TapError> {
        validate_name(name)?;
        let multi = queues > 1;
        (0..queues)
            .map(|_| Tap::open_one(name, multi, extra))
            .collect()
    }

    /// `open_queues`, waiting up to `patience` while the tap is busy. A daemon that was just
    /// killed holds its tap a little longer than its process lives: the kernel drops the files
    /// registered with an io_uring from a workqueue after the ring is freed (20-40 ms measured),
    /// and a supervisor that restarts at once must not find the tap busy then. There is no event
    /// to wait for, so it polls every 10 ms.
    pub fn open_queues_patiently(
        name: &str,
        queues: usize,
        extra: c_int,
        patience: std::time::Duration,
    ) -> Result<Vec<Tap>, TapError> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            match Tap::open_queues(name, queues, extra) {
                Err(TapError::Busy(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                r => return r,
            }
        }
    }

    fn open_tun() -> Result<File, TapError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|e| match e.kind() {
                io::ErrorKind::PermissionDenied => TapError::OpenTunDenied,
                _ => TapError::OpenTun(e),
            })
    }

    fn open_one(name: &str, multi_queue: bool, extra: c_int) -> Result<Tap, TapError> {
        let file = Tap::open_tun()?;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | extra;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut ifr = ifreq_for(name);
        // Exact: the IFF_* flags tun takes fit ifr_flags, a short in the kernel's ABI.
        #[allow(clippy::cast_possible_truncation)]
        let short = flags as c_short;
        ifr.ifr_ifru.ifru_flags = short;
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `ifr` is and outlives the call.
        let ret =
            unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut ifr) };
        if let Err(e) = check(ret) {
            let mq_hint = if multi_queue { " multi_queue" } else { "" };
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    TapError::Permission(name.to_string(), mq_hint)
                }
                Some(libc::EBUSY) => TapError::Busy(name.to_string()),
                Some(libc::EINVAL) => TapError::Incompatible(
                    name.to_string(),
                    if multi_queue { "without" } else { "with" },
                    e,
                ),
                _ => TapError::SetIff(name.to_string(), e),
            });
        }
        // SAFETY: the kernel wrote a NUL-terminated name of at most IFNAMSIZ bytes.
        let actual = unsafe { CStr::from_ptr(ifr.ifr_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        // A persistent tap keeps the length a previous user set; tun's default is the legacy
        // header.
        let mut len: c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one int through the pointer, which `len` outlives.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(&file, libc::TUNGETVNETHDRSZ, &mut len)
        };
        let len = match usize::try_from(len) {
            Ok(len) if ret >= 0 && len > 0 => len,
            _ => HDR_LEN_LEGACY,
        };
        Ok(Tap {
            file,
            name: actual,
            vnet_hdr_len: AtomicUsize::new(len),
        })
    }

    /// Wrap an already open, non-blocking tap-like descriptor (tests and benchmarks use a
    /// SOCK_SEQPACKET socketpair, which keeps frame boundaries as a tap does).
    pub fn from_file(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.to_string(),
            vnet_hdr_len: AtomicUsize::new(HDR_LEN_LEGACY),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn ioctl_val(&self, step: &'static str, req: libc::Ioctl, val: u64) -> Result<(), TapError> {
        // SAFETY: these tun ioctls take their argument by value and touch no memory of ours.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_val(&self.file, req, val) };
        check(ret).map(drop).map_err(|err| TapError::Ioctl {
            step,
            name: self.name.clone(),
            err,
        })
    }

    /// The header length the kernel prepends/expects; must equal what the guest negotiated.
    pub fn set_vnet_hdr_len(&self, len: usize) -> Result<(), TapError> {
        let len = c_int::try_from(len).map_err(|_| TapError::Ioctl {
            step: "TUNSETVNETHDRSZ",
            name: self.name.clone(),
            err: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which `len` outlives.
        let ret =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.file, libc::TUNSETVNETHDRSZ, &len) };
        check(ret).map_err(|err| TapError::Ioctl {
            step: "TUNSETVNETHDRSZ",
            name: self.name.clone(),
            err,
        })?;
        self.vnet_hdr_len
            .store(usize::try_from(len).unwrap_or(0), Ordering::Relaxed);
        Ok(())
    }

    /// The vnet header length tun expects in front of a frame written now.
    pub fn vnet_hdr_len(&self) -> usize {
        self.vnet_hdr_len.load(Ordering::Relaxed)
    }

    /// Which offloads the kernel may hand us (checksum-partial and GSO frames toward the guest).
    pub fn set_offload(&self, tun_flags: u32) -> Result<(), TapError> {
        self.ioctl_val("TUNSETOFFLOAD", libc::TUNSETOFFLOAD, u64::from(tun_flags))
    }

    /// The subset of `candidates` (groups of TUN_F_* flags) this kernel accepts, probed
    /// cumulatively (ECN needs TSO, USO4 and USO6 go together) and left at 0 afterwards.
    /// Offloads the kernel lacks (USO before 6.2) are then not offered.
    pub fn probe_offloads(&self, candidates: &[u32]) -> u32 {
        let mut supported = 0;
        for &group in candidates {
            if self.set_offload(supported | group).is_ok() {
                supported |= group;
            }
        }
        let _ = self.set_offload(0);
        supported
    }

    /// Attach or detach this queue (multiqueue taps): the kernel steers flows only to attached
    /// queues, so a queue nobody reads must be detached.
    pub fn set_attached(&self, attach: bool) -> Result<(), TapError> {
        let mut ifr = ifreq_for(&self.name);
        let flag = if attach {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        // Exact: both flags fit ifr_flags, a short in the kernel's ABI.
        #[allow(clippy::cast_possible_truncation)]
        let short = flag as c_short;
        ifr.ifr_ifru.ifru_flags = short;
        // SAFETY: TUNSETQUEUE reads an ifreq, which `ifr` is and outlives the call.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.file, libc::TUNSETQUEUE, &mut ifr)
        };
        check(ret).map(drop).map_err(|err| TapError::Ioctl {
            step: if attach {
                "TUNSETQUEUE attach"
            } else {
                "TUNSETQUEUE detach"
            },
            name: self.name.clone(),
            err,
        })
    }

    /// The IFF_* flags in force on this tap queue (TUNGETIFF).
    pub fn flags(&self) -> Result<c_int, TapError> {
        let mut ifr = ifreq_for(&self.name);
        // SAFETY: TUNGETIFF writes an ifreq, which `ifr` is and outlives the call.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.file, libc::TUNGETIFF, &mut ifr)
        };
        check(ret).map_err(|err| TapError::Ioctl {
            step: "TUNGETIFF",
            name: self.name.clone(),
            err,
        })?;
        // SAFETY: the kernel filled the flags member of the union.
        Ok(c_int::from(unsafe { ifr.ifr_ifru.ifru_flags }) & 0xffff)
    }

    /// Read one frame (vnet header first) into `iov`; into one piece with read, which spares
    /// the kernel copying in and checking an iovec array.
    pub fn readv(&self, iov: &[iovec]) -> io::Result<usize> {
        if let [one] = iov {
            // SAFETY: the iovec points at memory the caller owns for writing (a guest buffer
            // that stays mapped while the worker holds the memory, or a staging slot) with the
            // stated length.
            let n = unsafe { libc::read(self.file.as_raw_fd(), one.iov_base, one.iov_len) };
            return usize::try_from(n).map_err(|_| io::Error::last_os_error());
        }
        let count =
            c_int::try_from(iov.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: every iovec points at memory the caller owns for writing (guest buffers that stay
        // mapped while the worker holds the memory, or our staging buffer) with the stated length.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), count) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Write one frame (vnet header first) gathered from `iov`; a frame in one piece (most
    /// small ones: Linux puts the header in the frame's headroom) with write, which spares the
    /// kernel copying in and checking an iovec array.
    pub fn writev(&self, iov: &[iovec]) -> io::Result<usize> {
        if let [one] = iov {
            // SAFETY: the iovec points at readable memory of the stated length (a guest buffer
            // that stays mapped while the worker holds the memory); the kernel only reads it.
            let n = unsafe { libc::write(self.file.as_raw_fd(), one.iov_base, one.iov_len) };
            return usize::try_from(n).map_err(|_| io::Error::last_os_error());
        }
        let count =
            c_int::try_from(iov.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: every iovec points at readable memory of the stated length (guest buffers that
        // stay mapped while the worker holds the memory); the kernel only reads it.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), count) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_validated_before_any_syscall() {
        assert!(validate_name("vut0").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("has space").is_err());
        assert!(validate_name("sixteen-chars-xx").is_err());
        let e = validate_name("x:y").unwrap_err().to_string();
        assert!(e.contains("\"x:y\""), "{e}");
    }
}
