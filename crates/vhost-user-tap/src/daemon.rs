//! The daemon's lifetime: open the tap, bind the listener once, serve one frontend at a time, and
//! stop cleanly on SIGTERM/SIGINT.
//!
//! Each connection gets a fresh `Session`; the tap, the counters and any staged RX frame belong to
//! the daemon and carry over, so a VM reboot or a QEMU restart loses nothing that was taken from
//! the tap. A disconnect (clean or not) ends the session: its workers are stopped and joined
//! before the next `accept`.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use log::{error, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::backpressure;
use crate::config::{Config, Listen};
use crate::device::{Device, Opened};
use crate::kernel;
use crate::metrics::{self, MetricsServer};
use crate::protocol::{Connection, ProtocolError, Recv, MESSAGE_DEADLINE};
use crate::ratelog::{self, RateLimited};
use crate::session::Session;
use crate::stats::{self, PairStats};
use crate::sys::{Listener, SignalFd};
use crate::systemd::{self, Watchdog};

/// How long after SET_FEATURES a missing memory table is reported (QEMU sends it at once).
const MEMORY_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// How long accepting pauses after running out of descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

const SIGNAL: u64 = 1;
const FATAL: u64 = 2;
const CONN: u64 = 3;

/// The sessions' epoll set: signals and the workers' fatal eventfd always, the connection while
/// a frontend is served.
struct SessionEpoll {
    epoll: Epoll,
}

impl SessionEpoll {
    fn new(signals: &SignalFd, fatal: &EventFd) -> io::Result<SessionEpoll> {
        let epoll = Epoll::new()?;
        for (fd, token) in [(signals.as_raw_fd(), SIGNAL), (fatal.as_raw_fd(), FATAL)] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(SessionEpoll { epoll })
    }

    /// Watch the connection for requests, or for room for replies (`writing`).
    fn watch(&self, fd: i32, op: ControlOperation, writing: bool) -> io::Result<()> {
        let set = if writing {
            EventSet::OUT
        } else {
            EventSet::IN | EventSet::READ_HANG_UP
        };
        self.epoll.ctl(op, fd, EpollEvent::new(set, CONN))
    }
}

/// The shorter of an epoll timeout in ms (-1: none) and a duration.
fn min_timeout(ms: i32, d: Option<Duration>) -> i32 {
    match d {
        None => ms,
        Some(d) => {
            // Rounded up: waking a millisecond early would spin until the deadline.
            let d = i32::try_from(d.as_millis())
                .unwrap_or(i32::MAX)
                .saturating_add(1);
            if ms < 0 {
                d
            } else {
                ms.min(d)
            }
        }
    }
}

/// Why a session ended.
enum SessionEnd {
    Disconnected,
    Signal(i32),
    TapFailed,
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
        let Opened {
            device,
            backpressure,
            kernel,
        } = Device::open(config, release)?;
        let config = &device.config;
        let listener = match &config.listen {
            Listen::Path(p) => Listener::bind(p, config.socket_group)?,
            Listen::Fd(fd) => Listener::from_fd(*fd)?,
        };
        let connected = Arc::new(AtomicBool::new(false));
        let metrics = match &config.metrics {
            Some(addr) => {
                let source = metrics::Source {
                    tap: config.tap.clone(),
                    pairs: device.pairs.iter().map(|p| p.stats.clone()).collect(),
                    backpressure,
                    connected: connected.clone(),
                    kernel,
                    frontend: device.frontend.clone(),
                };
                Some(MetricsServer::start(addr, Arc::new(source))?)
            }
            None => None,
        };
        info!(
            "tap {} ({} queue pair(s)), offering features {:#x}; listening on {}",
            config.tap,
            config.queue_pairs,
            device.offered,
            match &config.listen {
                Listen::Path(p) => p.display().to_string(),
                Listen::Fd(fd) => format!("inherited fd {fd}"),
            }
        );
        Ok(Daemon {
            dev: device,
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
        let listen = |op| epoll.ctl(op, listen_fd, EpollEvent::new(EventSet::IN, 0));
        listen(ControlOperation::Add)?;
        epoll.ctl(
            ControlOperation::Add,
            self.signals.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 1),
        )?;
        // Made now, not per connection: when descriptors run out, a frontend must still be
        // servable (and the loop must not end over it).
        let session_epoll = SessionEpoll::new(&self.signals, &self.dev.fatal)?;
        let mut accept_log = RateLimited::default();
        let mut paused_until: Option<Instant> = None;
        let mut events = [EpollEvent::default(); 2];
        let result = loop {
            let timeout = min_timeout(
                self.watchdog.epoll_timeout_ms(),
                paused_until.map(|t| t.saturating_duration_since(Instant::now())),
            );
            let n = match epoll.wait(timeout, &mut events) {
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
            if paused_until.is_some_and(|t| Instant::now() >= t) {
                listen(ControlOperation::Add)?;
                paused_until = None;
            }
            if !events[..n].iter().any(|e| e.data() == 0) {
                continue;
            }
            let stream = match self.listener.inner.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    if let Some(sup) = accept_log.allow() {
                        warn!("accept failed: {e}{}", ratelog::suppressed(sup));
                    }
                    // Out of descriptors (or memory), the listener stays readable: polling it
                    // would spin. Look again in a while; the frontend waits in the backlog.
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) {
                        listen(ControlOperation::Delete)?;
                        paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    }
                    continue;
                }
            };
            info!("frontend connected");
            backpressure::check_qdisc(&self.dev.config.tap, self.backpressure);
            self.connected.store(true, Ordering::Relaxed);
            let end = self.serve(stream, &session_epoll);
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
                        "tap {} failed or a worker could not be stopped; see the log above",
                        self.dev.config.tap
                    ))
                }
                Err(e) => break Err(e),
            }
        };
        self.count_staged_at_exit();
        self.log_stats();
        result
    }

    /// A pair's staged frame outlives its frontend (the next one gets it), not the daemon: say
    /// which pairs lose one now. After a migration this is where the source's frame ends.
    fn count_staged_at_exit(&self) {
        for (p, slot) in self.dev.pairs.iter().enumerate() {
            let n = slot.rest.as_ref().map_or(0, |r| r.carry.staged_frames());
            if n > 0 {
                stats::add(&slot.stats.rx_dropped_at_exit, n as u64);
                warn!("queue pair {p}: exiting with {n} staged RX frame(s) no guest took; dropped");
            }
        }
    }

    fn serve(&mut self, stream: UnixStream, ep: &SessionEpoll) -> anyhow::Result<SessionEnd> {
        let mut conn = match Connection::new(stream) {
            Ok(c) => c,
            Err(e) => {
                warn!("frontend connection unusable: {e}");
                return Ok(SessionEnd::Disconnected);
            }
        };
        if let Err(e) = ep.watch(conn.socket().as_raw_fd(), ControlOperation::Add, false) {
            warn!("frontend connection: epoll: {e}");
            return Ok(SessionEnd::Disconnected);
        }
        let end = self.serve_on(&mut conn, ep);
        let _ = ep.watch(conn.socket().as_raw_fd(), ControlOperation::Delete, false);
        end
    }

    /// The session's loop. Nothing in it blocks: requests are read as they come, replies wait
    /// in the connection until the frontend takes them, and a frontend that stalls for
    /// `MESSAGE_DEADLINE` loses its connection.
    fn serve_on(&mut self, conn: &mut Connection, ep: &SessionEpoll) -> anyhow::Result<SessionEnd> {
        let signals = &self.signals;
        let watchdog = &self.watchdog;
        let fatal = self.dev.fatal.clone();
        let mut session = Session::new(&mut self.dev);
        let mut events = [EpollEvent::default(); 3];
        let mut memory_warned = false;
        let mut writing = false;
        loop {
            let now = Instant::now();
            let mut timeout = min_timeout(
                watchdog.epoll_timeout_ms(),
                conn.deadline().map(|d| d.saturating_duration_since(now)),
            );
            if let (Some(t), false) = (session.memory_overdue(), memory_warned) {
                timeout = min_timeout(timeout, Some(MEMORY_GRACE.saturating_sub(t)));
            }
            let n = match ep.epoll.wait(timeout, &mut events) {
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
            if conn.deadline().is_some_and(|d| Instant::now() >= d) {
                warn!(
                    "the frontend {} for {} ms; closing the connection",
                    if conn.wants_write() {
                        "did not read its replies"
                    } else {
                        "stopped in the middle of a message"
                    },
                    MESSAGE_DEADLINE.as_millis()
                );
                return Ok(SessionEnd::Disconnected);
            }
            for ev in &events[..n] {
                match ev.data() {
                    SIGNAL => {
                        if let Some(sig) = signals.read() {
                            return Ok(SessionEnd::Signal(sig));
                        }
                    }
                    FATAL => {
                        let _ = fatal.read();
                        return Ok(SessionEnd::TapFailed);
                    }
                    _ => {
                        if let Err(e) = conn.flush() {
                            warn!("frontend connection failed: {e}");
                            return Ok(SessionEnd::Disconnected);
                        }
                        while !conn.wants_write() {
                            match conn.recv() {
                                Ok(Recv::Request(req)) => {
                                    let code = req.raw();
                                    if let Err(e) = conn.dispatch(&mut session, req) {
                                        session.rejected(code);
                                        error!(
                                            "frontend protocol error: {e}; closing the connection"
                                        );
                                        return Ok(SessionEnd::Disconnected);
                                    }
                                }
                                Ok(Recv::Pending) => break,
                                Ok(Recv::Closed) => return Ok(SessionEnd::Disconnected),
                                Err(e @ ProtocolError::Io(_)) => {
                                    warn!("frontend connection failed: {e}");
                                    return Ok(SessionEnd::Disconnected);
                                }
                                Err(e) => {
                                    error!("frontend protocol error: {e}; closing the connection");
                                    session.rejected(u32::MAX);
                                    return Ok(SessionEnd::Disconnected);
                                }
                            }
                        }
                    }
                }
            }
            // Replies the frontend has not taken: wait for room instead of reading more.
            if conn.wants_write() != writing {
                writing = conn.wants_write();
                ep.watch(conn.socket().as_raw_fd(), ControlOperation::Modify, writing)?;
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
