//! The syscalls of the daemon's lifetime, apart from the tap and the datapath: signals as an fd,
//! the listening socket (created, or inherited and checked), and socket checks shared with
//! socket activation.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use log::info;

/// SIGTERM and SIGINT as a readable fd, so the event loops can wait for them with everything else.
pub struct SignalFd(OwnedFd);

impl SignalFd {
    /// Blocks the signals in the calling thread (threads spawned later inherit the mask) and
    /// returns an fd that becomes readable when one is pending.
    pub fn new() -> io::Result<SignalFd> {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
        }
        // SAFETY: `set` is initialised; a null old-set pointer is allowed.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        // SAFETY: `set` is initialised; -1 asks for a new fd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a fresh descriptor that nothing else owns.
        Ok(SignalFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The pending signal's number, if any.
    pub fn read(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let len = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: we read at most `len` bytes into `info`, which is `len` bytes long.
        let n = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                len,
            )
        };
        (usize::try_from(n) == Ok(len))
            .then(|| i32::try_from(info.ssi_signo).ok())
            .flatten()
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A listener plus, when we created the socket file, its path (removed on drop).
pub struct Listener {
    pub inner: UnixListener,
    owned_path: Option<PathBuf>,
}

impl Listener {
    /// Bind a fresh socket at `path`; with `group`, give it that group and mode 0660 (who may
    /// connect is then decided by group membership, e.g. libvirt's QEMU user).
    pub fn bind(path: &Path, group: Option<u32>) -> anyhow::Result<Listener> {
        if let Ok(meta) = fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                );
            }
            if UnixStream::connect(path).is_ok() {
                bail!("{} is in use by another running backend", path.display());
            }
            // A socket nobody listens on: left behind by a backend that was killed.
            fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        let inner = UnixListener::bind(path)
            .with_context(|| format!("binding vhost-user socket {}", path.display()))?;
        let listener = Listener {
            inner,
            owned_path: Some(path.to_path_buf()),
        };
        if let Some(gid) = group {
            use std::os::unix::fs::PermissionsExt;
            // Group first, then the mode that lets it in: the socket is never connectable by
            // others in between (a fresh socket's mode comes from the umask, 0755 by default,
            // and connecting needs write permission).
            std::os::unix::fs::chown(path, None, Some(gid))
                .with_context(|| format!("giving {} the group {gid}", path.display()))?;
            fs::set_permissions(path, fs::Permissions::from_mode(0o660))
                .with_context(|| format!("setting mode 0660 on {}", path.display()))?;
            info!("socket {}: group {gid}, mode 0660", path.display());
        }
        Ok(listener)
    }

    /// Adopt an inherited listening socket (`--fd`, systemd socket activation).
    pub fn from_fd(fd: RawFd) -> anyhow::Result<Listener> {
        if let Err(what) = check_listening_unix_stream(fd) {
            bail!("--fd {fd} is not a listening unix socket: it is {what}");
        }
        // SAFETY: the fd is a listening socket inherited for us to own; nothing else closes it.
        let inner = unsafe { UnixListener::from_raw_fd(fd) };
        Ok(Listener {
            inner,
            owned_path: None,
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(p) = &self.owned_path {
            let _ = fs::remove_file(p);
        }
    }
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    // 4: exact.
    #[allow(clippy::cast_possible_truncation)]
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `val`, which is that long and outlives
    // the call; on an fd that is not a socket it fails without touching anything.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(val)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// fstat(2) itself: std's metadata tries statx first, which the seccomp filter does not allow
/// (glibc's fstat is newfstatat, which it does).
pub fn fstat(file: &File) -> io::Result<libc::stat> {
    // SAFETY: `stat` is plain data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid stat buffer for the call; the fd is open (owned by `file`).
    if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Whether a file can no longer shrink, after trying to make it so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shrink {
    /// A memfd sealed with F_SEAL_SHRINK (by its maker, or now by us).
    Sealed,
    /// A memfd that cannot be sealed (made without MFD_ALLOW_SEALING, or F_SEAL_SEAL set).
    Unsealable,
    /// Not a memfd: nothing prevents its size from changing.
    NotMemfd,
}

/// Seal a memfd against shrinking: a file mapped by the daemon that shrinks makes the next
/// access to the lost part a SIGBUS, which would kill the daemon.
pub fn seal_against_shrinking(file: &File) -> Shrink {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl with F_GET_SEALS on an open fd only reads its seals.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals < 0 {
        return Shrink::NotMemfd;
    }
    if seals & libc::F_SEAL_SHRINK != 0 {
        return Shrink::Sealed;
    }
    // SAFETY: F_ADD_SEALS only restricts what can be done to the file later.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } == 0 {
        Shrink::Sealed
    } else {
        Shrink::Unsealable
    }
}

/// O_NONBLOCK with fcntl: the seccomp filter allows no FIONBIO ioctl (what std's
/// `set_nonblocking` uses).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on an open fd reads its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on an open fd changes only its status flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Check that an fd the frontend sent where an eventfd belongs (kick, call, error) is one, and
/// make it non-blocking: a frontend must not be able to block a worker with a full counter or a
/// pipe nobody reads. What fstat can tell is the inode type: eventfds are anonymous inodes (no
/// file type bits); pipes, sockets and files are refused here, and the kick's reads catch the
/// other anonymous kinds (an epoll or timer fd does not read like an eventfd).
pub fn frontend_eventfd(file: &File) -> Result<(), String> {
    let st = fstat(file).map_err(|e| format!("fstat: {e}"))?;
    let kind = st.st_mode & libc::S_IFMT;
    if kind != 0 {
        let what = match kind {
            libc::S_IFIFO => "a pipe",
            libc::S_IFSOCK => "a socket",
            libc::S_IFREG => "a regular file",
            libc::S_IFCHR => "a character device",
            _ => "not an anonymous inode",
        };
        return Err(format!("{what}, not an eventfd"));
    }
    set_nonblocking(file.as_raw_fd()).map_err(|e| format!("fcntl: {e}"))?;
    Ok(())
}

/// Whether `fd` is a listening unix stream socket; `Err` says what it is instead.
pub fn check_listening_unix_stream(fd: RawFd) -> Result<(), String> {
    let bad = |what: String| what;
    let domain = sockopt(fd, libc::SO_DOMAIN).map_err(|e| bad(format!("not a socket ({e})")))?;
    if domain != libc::AF_UNIX {
        return Err(bad(format!(
            "a socket of address family {domain}, not AF_UNIX"
        )));
    }
    let ty = sockopt(fd, libc::SO_TYPE).map_err(|e| bad(format!("unreadable ({e})")))?;
    if ty != libc::SOCK_STREAM {
        return Err(bad(format!("a unix socket of type {ty}, not SOCK_STREAM")));
    }
    let listening =
        sockopt(fd, libc::SO_ACCEPTCONN).map_err(|e| bad(format!("unreadable ({e})")))?;
    if listening == 0 {
        return Err(bad("a connected unix socket, not a listening one".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inherited_fd_must_be_a_listening_unix_stream_socket() {
        use std::os::fd::AsRawFd;
        let dir = std::env::temp_dir().join(format!("vut-sd-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(check_listening_unix_stream(listener.as_raw_fd()).is_ok());
        let conn = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let e = check_listening_unix_stream(conn.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("connected unix socket"), "{e}");
        let dgram = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let e = check_listening_unix_stream(dgram.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("not SOCK_STREAM"), "{e}");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = check_listening_unix_stream(udp.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("not AF_UNIX"), "{e}");
        let file = std::fs::File::open("/dev/null").unwrap();
        let e = check_listening_unix_stream(file.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
