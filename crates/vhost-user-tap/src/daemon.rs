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

use anyhow::{anyhow, Context};
use log::{error, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::backpressure;
use crate::config::{Config, Listen};
use crate::device::{Device, Opened};
use crate::kernel;
use crate::metrics::{self, MetricsServer};
use crate::protocol::{Connection, ProtocolError};
use crate::session::Session;
use crate::stats::PairStats;
use crate::sys::{Listener, SignalFd};
use crate::systemd::{self, Watchdog};

/// How long after SET_FEATURES a missing memory table is reported (QEMU sends it at once).
const MEMORY_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

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
                let left = i32::try_from(MEMORY_GRACE.saturating_sub(t).as_millis())
                    .unwrap_or(i32::MAX)
                    .saturating_add(1);
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
