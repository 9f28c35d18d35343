//! The daemon's lifetime: open the tap, bind the listener once, serve one frontend at a time, and
//! stop cleanly on SIGTERM/SIGINT.
//!
//! Each connection gets a fresh `Session`; the tap, the counters and any staged RX frame belong to
//! the daemon and carry over, so a VM reboot or a QEMU restart loses nothing that was taken from
//! the tap. A disconnect (clean or not) ends the session: its workers are stopped and joined
//! before the next `accept`.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use log::{error, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use std::sync::atomic::{AtomicBool, Ordering};

use crate::backpressure;
use crate::config::{Config, Listen};
use crate::kernel::{self, KernelSupport, TxPath};
use crate::metrics::{self, MetricsServer};
use crate::pair::PairRest;
use crate::protocol::{Connection, ProtocolError};
use crate::session::{Device, PairSlot, Session};
use crate::stats::PairStats;
use crate::systemd::{self, Watchdog};
use crate::tap::Tap;
use crate::uring::TxRing;
use crate::virtio_net::{self, GUEST_OFFLOADS, HOST_OFFLOADS};

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
        (n as usize == len).then_some(info.ssi_signo as i32)
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A listener plus, when we created the socket file, its path (removed on drop).
pub struct Listener {
    inner: UnixListener,
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
        let mut listening: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `listening`; it fails cleanly on an
        // fd that is not a socket.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ACCEPTCONN,
                (&mut listening as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 || listening == 0 {
            bail!("--fd {fd} is not a listening unix socket");
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

/// How long after SET_FEATURES a missing memory table is reported (QEMU sends it at once).
const MEMORY_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a session ended.
enum SessionEnd {
    Disconnected,
    Signal(i32),
    TapFailed,
}

/// The virtio features to offer, given the `TUN_F_*` flags the tap accepts.
fn offered_features(tun_offloads: u32, pairs: usize) -> u64 {
    let mut offered = virtio_net::base_features();
    for &(feature, tun) in GUEST_OFFLOADS.iter().chain(HOST_OFFLOADS.iter()) {
        if tun_offloads & tun == tun {
            offered |= virtio_net::bit(feature);
        }
    }
    if pairs == 1 {
        offered &= !virtio_net::bit(virtio_bindings::virtio_net::VIRTIO_NET_F_MQ);
    }
    offered
}

/// One io_uring per pair for TX, made now because seccomp will forbid it later, and tried with
/// a write that sends nothing (a kernel may make rings its tap refuses to write through). All
/// or none: a failure means the kernel (or a filter around us) does not allow it, and TX uses
/// writev. The log says which path was chosen and why.
fn tx_rings(config: &Config, taps: &[Tap]) -> (Vec<Option<TxRing>>, TxPath) {
    let none = || taps.iter().map(|_| None).collect();
    if !config.io_uring {
        info!("TX: one writev per frame (--no-io-uring)");
        return (none(), TxPath::Disabled);
    }
    let rings = match taps.iter().map(TxRing::new).collect::<io::Result<Vec<_>>>() {
        Ok(rings) => rings,
        Err(e) => {
            info!("TX: one writev per frame: io_uring unavailable ({e})");
            return (none(), TxPath::NoRing(e.to_string()));
        }
    };
    let mut rings = rings;
    if let Some(e) = rings.iter_mut().find_map(|r| r.probe().err()) {
        info!("TX: one writev per frame: {e}");
        return (none(), TxPath::TapRefuses(e.to_string()));
    }
    info!(
        "TX: frames written in batches of up to {} through io_uring ({} ring(s), each limited \
         to writing its tap queue)",
        crate::uring::BATCH,
        rings.len()
    );
    (rings.into_iter().map(Some).collect(), TxPath::IoUring)
}

pub struct Daemon {
    dev: Device,
    listener: Listener,
    signals: SignalFd,
    backpressure: bool,
    connected: Arc<AtomicBool>,
    _metrics: Option<MetricsServer>,
    watchdog: Watchdog,
}

impl Daemon {
    /// Open the tap and the listener; nothing is served yet.
    pub fn new(config: Config) -> anyhow::Result<Daemon> {
        let release = kernel::release();
        kernel::check_minimum(&release)?;
        let signals = SignalFd::new().context("setting up signal handling")?;
        let tun_features = crate::tap::tun_features()?;
        let (taps, backpressure) = backpressure::open_tap(
            &config.tap,
            config.queue_pairs,
            config.backpressure,
            tun_features,
        )?;
        if let Some(kind) = &config.qdisc {
            backpressure::install_qdisc(&config.tap, kind)?;
        }
        backpressure::check_qdisc(&config.tap, backpressure);
        let groups: Vec<u32> = GUEST_OFFLOADS.iter().map(|&(_, t)| t).collect();
        let tun_offloads = taps[0].probe_offloads(&groups);
        let offered = offered_features(tun_offloads, taps.len());
        let listener = match &config.listen {
            Listen::Path(p) => Listener::bind(p, config.socket_group)?,
            Listen::Fd(fd) => Listener::from_fd(*fd)?,
        };
        let (tx_rings, tx_path) = tx_rings(&config, &taps);
        let support = KernelSupport {
            release,
            tun_features,
            tun_offloads,
            tx: tx_path,
        };
        info!("{}", support.summary());
        let mut pairs: Vec<PairSlot> = taps
            .into_iter()
            .zip(tx_rings)
            .map(|(t, tx_ring)| PairSlot {
                tap: Arc::new(t),
                stats: Arc::new(PairStats::default()),
                rest: Some(PairRest {
                    carry: Default::default(),
                    tx_ring,
                }),
                attached: true,
            })
            .collect();
        // A fresh multiqueue tap has every queue attached; until the guest enables a pair only
        // queue 0 may receive flows.
        for slot in pairs.iter_mut().skip(1) {
            slot.tap.set_attached(false)?;
            slot.attached = false;
        }
        let fatal = Arc::new(EventFd::new(EFD_NONBLOCK).context("creating eventfd")?);
        let connected = Arc::new(AtomicBool::new(false));
        let metrics = match &config.metrics {
            Some(addr) => {
                let source = metrics::Source {
                    tap: config.tap.clone(),
                    pairs: pairs.iter().map(|p| p.stats.clone()).collect(),
                    backpressure,
                    connected: connected.clone(),
                    kernel: support.clone(),
                };
                Some(MetricsServer::start(addr, Arc::new(source))?)
            }
            None => None,
        };
        info!(
            "tap {} ({} queue pair(s)), offering features {offered:#x}; listening on {}",
            config.tap,
            config.queue_pairs,
            match &config.listen {
                Listen::Path(p) => p.display().to_string(),
                Listen::Fd(fd) => format!("inherited fd {fd}"),
            }
        );
        Ok(Daemon {
            dev: Device {
                config,
                pairs,
                offered,
                fatal,
            },
            listener,
            signals,
            backpressure,
            connected,
            _metrics: metrics,
            watchdog: Watchdog::from_env(),
        })
    }

    pub fn stats(&self) -> Vec<Arc<PairStats>> {
        self.dev.pairs.iter().map(|p| p.stats.clone()).collect()
    }

    /// Serve frontends until a signal arrives. Err: the daemon cannot go on (the tap failed).
    pub fn run(mut self) -> anyhow::Result<()> {
        let epoll = Epoll::new()?;
        let listen_fd = self.listener.inner.as_raw_fd();
        epoll.ctl(
            ControlOperation::Add,
            listen_fd,
            EpollEvent::new(EventSet::IN, 0),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            self.signals.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 1),
        )?;
        let mut events = [EpollEvent::default(); 2];
        let result = loop {
            let n = match epoll.wait(self.watchdog.epoll_timeout_ms(), &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(anyhow!("epoll: {e}")),
            };
            self.watchdog.tick();
            if events[..n].iter().any(|e| e.data() == 1) {
                if let Some(sig) = self.signals.read() {
                    info!("signal {sig}: shutting down");
                    systemd::notify_stopping();
                    break Ok(());
                }
            }
            if !events[..n].iter().any(|e| e.data() == 0) {
                continue;
            }
            let stream = match self.listener.inner.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("accept failed: {e}");
                    continue;
                }
            };
            info!("frontend connected");
            backpressure::check_qdisc(&self.dev.config.tap, self.backpressure);
            self.connected.store(true, Ordering::Relaxed);
            let end = self.serve(stream);
            self.connected.store(false, Ordering::Relaxed);
            match end {
                Ok(SessionEnd::Disconnected) => {
                    info!("frontend disconnected; waiting for the next")
                }
                Ok(SessionEnd::Signal(sig)) => {
                    info!("signal {sig}: shutting down");
                    systemd::notify_stopping();
                    break Ok(());
                }
                Ok(SessionEnd::TapFailed) => {
                    break Err(anyhow!(
                        "tap {} failed; see the log above",
                        self.dev.config.tap
                    ))
                }
                Err(e) => break Err(e),
            }
        };
        self.log_stats();
        result
    }

    fn serve(&mut self, stream: UnixStream) -> anyhow::Result<SessionEnd> {
        let mut conn = Connection::new(stream);
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (conn.socket().as_raw_fd(), 0),
            (self.signals.as_raw_fd(), 1),
            (self.dev.fatal.as_raw_fd(), 2),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let signals = &self.signals;
        let watchdog = &self.watchdog;
        let fatal = self.dev.fatal.clone();
        let mut session = Session::new(&mut self.dev);
        let mut events = [EpollEvent::default(); 3];
        let mut memory_warned = false;
        loop {
            let mut timeout = watchdog.epoll_timeout_ms();
            if let (Some(t), false) = (session.memory_overdue(), memory_warned) {
                let left = MEMORY_GRACE.saturating_sub(t).as_millis() as i32 + 1;
                timeout = if timeout < 0 { left } else { timeout.min(left) };
            }
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(anyhow!("epoll: {e}")),
            };
            watchdog.tick();
            if let Some(t) = session.memory_overdue().filter(|t| *t >= MEMORY_GRACE) {
                if !memory_warned {
                    error!(
                        "the frontend acked features {} ms ago but sent no memory table: the \
                         guest's memory is not shared, so its NIC cannot work (QEMU: -object \
                         memory-backend-memfd,id=mem,size=<RAM>,share=on -numa node,memdev=mem; \
                         libvirt: <memoryBacking><source type='memfd'/><access \
                         mode='shared'/></memoryBacking>)",
                        t.as_millis()
                    );
                    memory_warned = true;
                }
            }
            for ev in &events[..n] {
                match ev.data() {
                    1 => {
                        if let Some(sig) = signals.read() {
                            return Ok(SessionEnd::Signal(sig));
                        }
                    }
                    2 => {
                        let _ = fatal.read();
                        return Ok(SessionEnd::TapFailed);
                    }
                    _ => match conn.recv() {
                        Ok(None) => return Ok(SessionEnd::Disconnected),
                        Ok(Some(req)) => {
                            if let Err(e) = conn.dispatch(&mut session, req) {
                                error!("frontend protocol error: {e}; closing the connection");
                                return Ok(SessionEnd::Disconnected);
                            }
                        }
                        Err(e @ ProtocolError::Io(_)) => {
                            warn!("frontend connection failed: {e}");
                            return Ok(SessionEnd::Disconnected);
                        }
                        Err(e) => {
                            error!("frontend protocol error: {e}; closing the connection");
                            return Ok(SessionEnd::Disconnected);
                        }
                    },
                }
            }
        }
    }

    fn log_stats(&self) {
        for (p, slot) in self.dev.pairs.iter().enumerate() {
            let snap = slot.stats.snapshot();
            let fields: Vec<String> = snap
                .fields()
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            info!("queue pair {p}: {}", fields.join(" "));
        }
    }
}
