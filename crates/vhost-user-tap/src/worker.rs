//! One worker thread per queue pair: an epoll loop over the tap queue, the two kick eventfds and
//! a stop eventfd, driving a [`Pair`].
//!
//! The worker owns the pair, so the per-frame path takes no lock. The session stops the worker
//! (stop eventfd, join) before it changes anything the pair uses, and gets the pair's state back
//! from `stop`. What the loop waits for comes from the pair's states (`Pair::has_work`,
//! `Pair::tap_interest`); the tap fd is level-triggered and registered only while a direction
//! waits for it.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, error};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::pair::{Pair, PairError, PairSetup, Stopped};

const STOP: u64 = 0;
const TAP: u64 = 1;
const RX_KICK: u64 = 2;
const TX_KICK: u64 = 3;

/// How long `Worker::stop` waits. A worker's batches are bounded (README, "Hostile guests"), so
/// it sees its stop eventfd within milliseconds; not seeing it within this is a bug.
pub const STOP_DEADLINE: Duration = Duration::from_secs(1);

pub struct Worker {
    index: usize,
    stop: EventFd,
    stopped: mpsc::Receiver<Stopped>,
    handle: JoinHandle<()>,
}

/// A worker that did not stop within `STOP_DEADLINE`: its pair's state is lost with it.
#[derive(Debug, thiserror::Error)]
#[error("queue pair {0}: the worker did not stop within {STOP_DEADLINE:?}")]
pub struct Stuck(pub usize);

impl Worker {
    /// Start the pair on a thread of its own (it is made there: its ring and buffer pointers
    /// never cross threads). `fatal` is written when the pair's tap failed: the daemon cannot go
    /// on (the session watches it). On failure (no descriptor or thread to be had) the setup
    /// comes back, so nothing it carries (a staged frame) is lost.
    pub fn spawn(
        setup: PairSetup,
        fatal: Arc<EventFd>,
    ) -> Result<Worker, (std::io::Error, Box<PairSetup>)> {
        let index = setup.index;
        let fds = EventFd::new(EFD_NONBLOCK).and_then(|s| Ok((s.try_clone()?, s)));
        let (stop, stop_clone) = match fds {
            Ok(fds) => fds,
            Err(e) => return Err((e, Box::new(setup))),
        };
        // The setup goes over once the thread exists: if it cannot be made, we still hold it.
        let (give, take) = mpsc::channel::<PairSetup>();
        let (done, stopped) = mpsc::channel();
        let spawned = thread::Builder::new()
            .name(format!("vut-pair{index}"))
            .spawn(move || {
                if let Ok(setup) = take.recv() {
                    let _ = done.send(run(Pair::start(setup), &stop_clone, &fatal));
                }
            });
        let handle = match spawned {
            Ok(h) => h,
            Err(e) => return Err((e, Box::new(setup))),
        };
        if let Err(mpsc::SendError(setup)) = give.send(setup) {
            return Err((
                std::io::Error::other("the worker thread ended at once"),
                Box::new(setup),
            ));
        }
        Ok(Worker {
            index,
            stop,
            stopped,
            handle,
        })
    }

    /// Stop the worker and take the pair's state back, within `STOP_DEADLINE`.
    pub fn stop(self) -> Result<Stopped, Stuck> {
        let _ = self.stop.write(1);
        match self.stopped.recv_timeout(STOP_DEADLINE) {
            Ok(stopped) => {
                let _ = self.handle.join();
                Ok(stopped)
            }
            // Left to run detached; the session ends the daemon.
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Stuck(self.index)),
            // The thread ended without handing the pair back: it panicked. A panic in a worker
            // is a bug with no state left to recover (the pair's staged frame and ring positions
            // went with the thread): it takes the daemon down with it, with the worker's panic
            // message on stderr, and the service manager restarts it.
            Err(mpsc::RecvTimeoutError::Disconnected) => match self.handle.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(()) => Err(Stuck(self.index)),
            },
        }
    }
}

/// Consume a kick. An eventfd reads 8 bytes, or nothing yet (EAGAIN: another reader was first);
/// anything else (a socket at EOF, a pipe whose writer left, a timer fd) is not a kick and would
/// stay readable forever: the pair stops instead of spinning.
fn drain(f: &File, rx: bool) -> Result<(), PairError> {
    let mut buf = [0u8; 8];
    match (&*f).read(&mut buf) {
        Ok(8) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
        Ok(n) => Err(PairError::Kick {
            rx,
            why: format!("read {n} bytes, not an eventfd's 8"),
        }),
        Err(e) => Err(PairError::Kick {
            rx,
            why: e.to_string(),
        }),
    }
}

/// The worker's epoll set and what the tap is registered for in it.
struct Loop {
    epoll: Epoll,
    tap_interest: EventSet,
}

impl Loop {
    fn new(pair: &Pair, stop: &EventFd) -> std::io::Result<Loop> {
        let lp = Loop {
            epoll: Epoll::new()?,
            tap_interest: EventSet::empty(),
        };
        let (rx_kick, tx_kick) = pair.kicks();
        let fds = [
            (Some(stop.as_raw_fd()), STOP),
            (rx_kick.map(|k| k.as_raw_fd()), RX_KICK),
            (tx_kick.map(|k| k.as_raw_fd()), TX_KICK),
        ];
        for (fd, token) in fds {
            if let Some(fd) = fd {
                lp.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )?;
            }
        }
        Ok(lp)
    }

    /// Register the tap for what the pair waits for (`Pair::tap_interest`).
    fn watch_tap(&mut self, pair: &Pair) -> std::io::Result<()> {
        let (readable, writable) = pair.tap_interest();
        let mut want = EventSet::empty();
        if readable {
            want |= EventSet::IN;
        }
        if writable {
            want |= EventSet::OUT;
        }
        if want == self.tap_interest {
            return Ok(());
        }
        let op = if self.tap_interest.is_empty() {
            ControlOperation::Add
        } else if want.is_empty() {
            ControlOperation::Delete
        } else {
            ControlOperation::Modify
        };
        self.epoll
            .ctl(op, pair.tap().as_raw_fd(), EpollEvent::new(want, TAP))?;
        self.tap_interest = want;
        Ok(())
    }
}

fn run(mut pair: Pair, stop: &EventFd, fatal: &EventFd) -> Stopped {
    let index = pair.index();
    if let Err(e) = serve(&mut pair, stop) {
        // The session collects the pair's state on its next reconfiguration or at teardown.
        error!("queue pair {index}: worker stopped: {e}");
        if e.ends_daemon() {
            let _ = fatal.write(1);
        } else {
            pair.report(&e);
        }
    }
    debug!("queue pair {index}: worker exiting");
    pair.stop()
}

/// The event loop; returns when asked to stop, or with the error that stopped the pair.
fn serve(pair: &mut Pair, stop: &EventFd) -> Result<(), PairError> {
    let mut lp = Loop::new(pair, stop).map_err(PairError::EventLoop)?;
    let (rx_kick, tx_kick) = pair.kicks();
    let busy_poll = pair.busy_poll();
    let mut idle_since: Option<Instant> = None;
    let mut events = vec![EpollEvent::default(); 8];
    loop {
        let idle = !pair.has_work();
        // Busy polling: instead of sleeping right away, keep looking (epoll without blocking,
        // plus the guest's avail rings, which a guest under EVENT_IDX may fill without
        // kicking) for up to `busy_poll`.
        let spinning = idle && idle_since.is_some_and(|t| t.elapsed() < busy_poll);
        let timeout = if !idle || spinning { 0 } else { -1 };
        let n = match lp.epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(PairError::EventLoop(e)),
        };
        if spinning && n == 0 {
            pair.poll_guest()?;
            std::hint::spin_loop();
        }
        for ev in &events[..n] {
            match ev.data() {
                STOP => return Ok(()),
                RX_KICK => {
                    if let Some(k) = &rx_kick {
                        drain(k, true)?;
                    }
                    pair.rx_kicked()?;
                }
                TX_KICK => {
                    if let Some(k) = &tx_kick {
                        drain(k, false)?;
                    }
                    pair.tx_kicked();
                }
                TAP => {
                    let set = ev.event_set();
                    // ERR/HUP: the tap was deleted; the next read reports it (EBADFD).
                    let readable =
                        set.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP);
                    pair.tap_event(readable, set.contains(EventSet::OUT));
                }
                _ => {}
            }
        }
        // Off the tap's wait queue before reading a busy tap.
        lp.watch_tap(pair).map_err(PairError::EventLoop)?;
        pair.run_rx()?;
        pair.run_tx()?;
        if pair.has_work() {
            idle_since = None;
        } else if idle_since.is_none() && !busy_poll.is_zero() {
            idle_since = Some(Instant::now());
        }
        lp.watch_tap(pair).map_err(PairError::EventLoop)?;
    }
}
