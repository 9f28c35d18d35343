//! One worker thread per queue pair: an epoll loop over the tap queue, the two kick eventfds and a
//! stop eventfd.
//!
//! The worker owns everything its data path touches (queues, staging buffer, memory mapping), so
//! the per-frame path takes no lock. The session stops the worker (stop eventfd, join) before it
//! changes anything the worker uses, and gets the state back from `join`.
//!
//! The tap fd is level-triggered, and registered only while the worker waits for it: EPOLLIN once
//! an RX read found it empty, EPOLLOUT while TX waits for room. Not while RX is stalled (it would
//! spin on a readable tap), and not while RX reads it: a registration puts our callback on the
//! tap's wait queue, and the kernel runs it, under the queue's lock, for every frame it queues,
//! on the producer's CPU (vhost-net leaves the queue while reading for the same reason; README,
//! "RX: off the tap's wait queue while reading", has the measurement). A level-triggered
//! registration reports a frame that arrived between the empty read and the registration, so no
//! wake-up is lost. Leaving and rejoining costs two `epoll_ctl` (~1 µs), about what a dozen
//! callbacks cost the producer, so the worker leaves only when the last batch was at least
//! `BUSY_BATCH` frames: a trickle (one frame per wake-up) stays registered and pays nothing extra.

use std::fs::File;
use std::io::Read;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use log::{debug, error};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::rx::{Notifier, Rx, RxCarry, RxOutcome};
use crate::stats::{self, PairStats};
use crate::tap::Tap;
use crate::tx::{Tx, TxError, TxOutcome};
use crate::uring::TxRing;

const STOP: u64 = 0;
const TAP: u64 = 1;
const RX_KICK: u64 = 2;
const TX_KICK: u64 = 3;

/// RX batches of at least this many frames read the tap off its wait queue (top of the file).
const BUSY_BATCH: u64 = 16;

/// A queue handed to a worker: its ring state, the eventfd the guest kicks, and where to
/// interrupt.
pub struct QueueRun {
    pub queue: virtio_queue::Queue,
    pub kick: Arc<File>,
    pub call: Option<Arc<File>>,
    pub err: Option<Arc<File>>,
}

/// Everything a worker needs, decided by the session.
pub struct WorkerSetup {
    pub pair: usize,
    pub mem: Arc<GuestMemoryMmap>,
    pub tap: Arc<Tap>,
    pub stats: Arc<PairStats>,
    pub rx: Option<QueueRun>,
    pub tx: Option<QueueRun>,
    pub carry: RxCarry,
    pub tx_ring: Option<TxRing>,
    pub hdr_len: usize,
    pub mrg_rxbuf: bool,
    pub event_idx: bool,
    pub rx_target: usize,
    /// Spin this long polling the tap and the rings before sleeping (0: never).
    pub busy_poll: std::time::Duration,
    /// Written when the worker stops on its own because the tap failed.
    pub fatal: Arc<EventFd>,
}

/// What a stopped worker hands back.
pub struct WorkerExit {
    pub rx: Option<virtio_queue::Queue>,
    pub tx: Option<virtio_queue::Queue>,
    pub carry: RxCarry,
    pub tx_ring: Option<TxRing>,
}

pub struct Worker {
    stop: EventFd,
    handle: JoinHandle<WorkerExit>,
}

impl Worker {
    pub fn spawn(setup: WorkerSetup) -> std::io::Result<Worker> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_clone = stop.try_clone()?;
        let handle = thread::Builder::new()
            .name(format!("vut-pair{}", setup.pair))
            .spawn(move || run(setup, stop_clone))?;
        Ok(Worker { stop, handle })
    }

    /// Stop the worker and take its state back.
    pub fn stop(self) -> WorkerExit {
        let _ = self.stop.write(1);
        match self.handle.join() {
            Ok(exit) => exit,
            // A panic in a worker is a bug; there is no state to recover, so the pair restarts
            // from scratch on the frontend's next configuration.
            Err(_) => panic!("queue-pair worker panicked"),
        }
    }
}

fn drain(f: &File) -> u64 {
    let mut buf = [0u8; 8];
    match (&*f).read(&mut buf) {
        Ok(8) => u64::from_ne_bytes(buf),
        _ => 0,
    }
}

struct Loop {
    epoll: Epoll,
    tap_interest: EventSet,
}

impl Loop {
    /// Watch the tap for input only while RX waits for it (see the top of the file), for room
    /// only while TX waits for it.
    fn watch_tap(&mut self, tap: &Tap, rx_waits: bool, tx_blocked: bool) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        let mut want = EventSet::empty();
        if rx_waits {
            want |= EventSet::IN;
        }
        if tx_blocked {
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
            .ctl(op, tap.as_raw_fd(), EpollEvent::new(want, TAP))
            .map_err(|e| format!("epoll on tap: {e}"))?;
        self.tap_interest = want;
        Ok(())
    }
}

/// The one place a worker gives up (but for a tap that refuses every TX frame, which TX counts
/// itself). A failed tap ends the daemon (the session watches `fatal`); a broken ring (the guest
/// corrupted an index) stops only this pair, tells the frontend through the vring's error
/// eventfd (QEMU logs "vhost vring error"), and is counted. The pair runs again when the
/// frontend reconfigures it, e.g. after a guest reset.
fn give_up(
    tap_failed: bool,
    err_fd: &Option<Arc<File>>,
    fatal: &EventFd,
    stats: &PairStats,
    e: impl std::fmt::Display,
) -> String {
    if tap_failed {
        let _ = fatal.write(1);
    } else {
        Notifier(err_fd.clone()).signal();
        stats::inc(&stats.ring_errors);
    }
    e.to_string()
}

fn run(setup: WorkerSetup, stop: EventFd) -> WorkerExit {
    use std::os::fd::AsRawFd;
    let WorkerSetup {
        pair,
        mem,
        tap,
        stats,
        rx,
        tx,
        carry,
        tx_ring,
        hdr_len,
        mrg_rxbuf,
        event_idx,
        rx_target,
        busy_poll,
        fatal,
    } = setup;
    let rx_kick = rx.as_ref().map(|q| q.kick.clone());
    let tx_kick = tx.as_ref().map(|q| q.kick.clone());
    let rx_err = rx.as_ref().and_then(|q| q.err.clone());
    let tx_err = tx.as_ref().and_then(|q| q.err.clone());
    // The carry (a staged frame) must come back even when RX is not running.
    let (mut rx, idle_carry) = match rx {
        Some(q) => {
            let dq = crate::ring::DeviceQueue::new(q.queue, event_idx, &mem);
            let call = Notifier(q.call);
            let rx = Rx::new(dq, carry, hdr_len, mrg_rxbuf, rx_target, call);
            (Some(rx), None)
        }
        None => (None, Some(carry)),
    };
    // Like the carry, the ring comes back even when TX is not running.
    let mut idle_ring = None;
    let mut tx = match tx {
        Some(q) => {
            let dq = crate::ring::DeviceQueue::new(q.queue, event_idx, &mem);
            Some(Tx::new(dq, hdr_len, Notifier(q.call), tx_ring))
        }
        None => {
            idle_ring = tx_ring;
            None
        }
    };

    let result = (|| -> Result<(), String> {
        let epoll = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
        let mut lp = Loop {
            epoll,
            tap_interest: EventSet::empty(),
        };
        let add = |lp: &Loop, fd: i32, token: u64| {
            lp.epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|e| format!("epoll add: {e}"))
        };
        add(&lp, stop.as_raw_fd(), STOP)?;
        if let Some(k) = &rx_kick {
            add(&lp, k.as_raw_fd(), RX_KICK)?;
        }
        if let Some(k) = &tx_kick {
            add(&lp, k.as_raw_fd(), TX_KICK)?;
        }
        let mut rx_ready = rx.is_some();
        let mut tx_ready = tx.is_some();
        let mut tx_blocked = false;
        let mut idle_since: Option<Instant> = None;
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let idle = !rx_ready && !tx_ready;
            // Busy polling: instead of sleeping right away, keep looking (epoll without
            // blocking, plus the guest's avail rings, which a guest under EVENT_IDX may fill
            // without kicking) for up to `busy_poll`.
            let spinning = idle && idle_since.is_some_and(|t| t.elapsed() < busy_poll);
            let timeout = if !idle || spinning { 0 } else { -1 };
            let n = match lp.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("epoll wait: {e}")),
            };
            if spinning && n == 0 {
                if let Some(r) = rx.as_mut() {
                    match r.poll_guest(&stats) {
                        Ok(work) => rx_ready |= work,
                        Err(e) => return Err(give_up(false, &rx_err, &fatal, &stats, e)),
                    }
                }
                if let Some(t) = tx.as_ref() {
                    match t.poll_guest() {
                        Ok(work) => tx_ready |= work && !tx_blocked,
                        Err(e) => return Err(give_up(false, &tx_err, &fatal, &stats, e)),
                    }
                }
                std::hint::spin_loop();
            }
            for ev in &events[..n] {
                match ev.data() {
                    STOP => return Ok(()),
                    RX_KICK => {
                        if let (Some(k), Some(rx)) = (&rx_kick, rx.as_mut()) {
                            drain(k);
                            stats::inc(&stats.rx_kicks);
                            if let Err(e) = rx.on_kick(&stats) {
                                return Err(give_up(false, &rx_err, &fatal, &stats, e));
                            }
                            rx_ready = true;
                        }
                    }
                    TX_KICK => {
                        if let Some(k) = &tx_kick {
                            drain(k);
                            stats::inc(&stats.tx_kicks);
                            tx_ready = !tx_blocked;
                        }
                    }
                    TAP => {
                        let set = ev.event_set();
                        // ERR/HUP: the tap was deleted; the next read reports it (EBADFD).
                        if set.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
                            rx_ready = rx.is_some();
                        }
                        if set.contains(EventSet::OUT) && tx_blocked {
                            tx_blocked = false;
                            tx_ready = true;
                        }
                    }
                    _ => {}
                }
            }
            if let (true, Some(r)) = (rx_ready, rx.as_mut()) {
                if r.last_batch() >= BUSY_BATCH {
                    lp.watch_tap(&tap, false, tx_blocked)?;
                }
                match r.process(&mem, &tap, &stats) {
                    Ok(RxOutcome::Budget) => {}
                    Ok(RxOutcome::TapEmpty) | Ok(RxOutcome::Stalled) => rx_ready = false,
                    Err(e) => {
                        let tap_failed = matches!(e, crate::rx::RxError::Tap(..));
                        return Err(give_up(tap_failed, &rx_err, &fatal, &stats, e));
                    }
                }
            }
            if let (true, Some(t)) = (tx_ready, tx.as_mut()) {
                match t.process(&mem, &tap, &stats) {
                    Ok(TxOutcome::Budget) => {}
                    Ok(TxOutcome::Empty) => tx_ready = false,
                    Ok(TxOutcome::TapFull) => {
                        tx_ready = false;
                        tx_blocked = true;
                    }
                    Err(e @ TxError::TapRefusesAll { .. }) => {
                        // Counted by TX itself (tx_stops_tap_refusing).
                        Notifier(tx_err.clone()).signal();
                        return Err(e.to_string());
                    }
                    Err(e) => {
                        let tap_failed = matches!(e, TxError::TapGone(..));
                        return Err(give_up(tap_failed, &tx_err, &fatal, &stats, e));
                    }
                }
            }
            if rx_ready || tx_ready {
                idle_since = None;
            } else if idle_since.is_none() && !busy_poll.is_zero() {
                idle_since = Some(Instant::now());
            }
            let rx_waits = rx
                .as_ref()
                .is_some_and(|r| r.wants_tap() && (!rx_ready || r.last_batch() < BUSY_BATCH));
            lp.watch_tap(&tap, rx_waits, tx_blocked)?;
        }
    })();
    if let Err(e) = result {
        // The session collects this state on its next reconfiguration or at teardown.
        error!("queue pair {pair}: worker stopped: {e}");
    }
    debug!("queue pair {pair}: worker exiting");
    let (rx_q, carry) = match rx {
        Some(r) => {
            let (q, c) = r.into_parts();
            (Some(q), c)
        }
        None => (None, idle_carry.expect("held when RX is not running")),
    };
    let (tx_q, tx_ring) = match tx {
        Some(t) => {
            let (q, ring) = t.into_parts();
            (Some(q), ring)
        }
        None => (None, idle_ring),
    };
    WorkerExit {
        rx: rx_q,
        tx: tx_q,
        carry,
        tx_ring,
    }
}
