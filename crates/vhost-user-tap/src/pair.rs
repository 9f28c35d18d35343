//! One queue pair's data path: RX and TX on their rings, with everything they touch (the tap
//! queue, the guest memory, the staging buffer, the TX io_uring, the counters) owned in one
//! place.
//!
//! Life of a pair: the session builds one [`PairSetup`] (the negotiated features, not their
//! unpacked fields; the rings it may run; what the previous run left in [`PairRest`]) and starts
//! it; the worker thread drives it; stopping it gives back one [`Stopped`] value, whose `rest`
//! the next start takes. A frame taken from the tap but not yet delivered travels in `rest`,
//! across worker restarts and sessions.
//!
//! What to wait for is derived from the two explicit states ([`RxState`], [`TxState`]), here
//! and nowhere else ([`Pair::tap_interest`]). Every error says whether it ends the daemon or only
//! this pair ([`PairError::ends_daemon`]).
//!
//! The tap and bounded work: the per-batch budgets live in `rx`/`tx`. Writes into guest memory
//! all go through `ring` (used entries) and `rx` (frame data, the header's `num_buffers`), and
//! while the frontend migrates the guest both log them (`PairSetup::log`, `ring::QueueLog`).

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::dirty_log::DirtyLog;
use crate::ring::{DeviceQueue, Notifier, QueueLog};
use crate::rx::{Rx, RxCarry, RxError, RxState};
use crate::stats::{self, PairStats};
use crate::tap::Tap;
use crate::tx::{Tx, TxError, TxState};
use crate::uring::{RxRing, TxRing};
use crate::virtio_net::NetFeatures;

/// RX batches of at least this many frames read the tap off its wait queue (see
/// [`Pair::tap_interest`]).
pub const BUSY_BATCH: u64 = 16;

/// A queue handed to a pair: its ring state, the eventfd the guest kicks, where to interrupt
/// and where to report a broken ring.
pub struct QueueRun {
    pub queue: Queue,
    pub kick: Arc<File>,
    pub call: Option<Arc<File>>,
    pub err: Option<Arc<File>>,
    /// Where the used ring is logged while migrating (`log_guest_addr`, or the ring's own guest
    /// address when the frontend gave none).
    pub used_log_gpa: u64,
}

/// Dirty logging while the frontend migrates the guest: the log and the eventfd to signal
/// after writing it (SET_LOG_FD; none from QEMU).
#[derive(Clone)]
pub struct PairLog {
    pub log: Arc<DirtyLog>,
    pub signal: Notifier,
}

/// What a stopped pair keeps for its next start: frames taken from the tap and not delivered
/// yet, and the io_urings (made before seccomp, so they cannot be made again).
#[derive(Default)]
pub struct PairRest {
    pub carry: RxCarry,
    pub tx_ring: Option<TxRing>,
    pub rx_ring: Option<RxRing>,
}

/// Everything a pair starts from.
pub struct PairSetup {
    pub index: usize,
    pub features: NetFeatures,
    pub mtu: u16,
    pub busy_poll: Duration,
    pub mem: Arc<GuestMemoryMmap>,
    pub tap: Arc<Tap>,
    pub stats: Arc<PairStats>,
    pub rest: PairRest,
    pub rx: Option<QueueRun>,
    pub tx: Option<QueueRun>,
    /// Set while the frontend migrates the guest: every write into guest memory is logged.
    pub log: Option<PairLog>,
}

/// What a stopped pair hands back: where its rings stand and what the next start takes.
pub struct Stopped {
    pub rest: PairRest,
    pub rx: Option<Queue>,
    pub tx: Option<Queue>,
}

#[derive(Debug, Error)]
pub enum PairError {
    #[error(transparent)]
    Rx(#[from] RxError),
    #[error(transparent)]
    Tx(#[from] TxError),
    #[error("the worker's event loop failed: {0}")]
    EventLoop(#[source] std::io::Error),
    #[error("the {} queue's kick fd misbehaves ({why}): not an eventfd", if *rx { "RX" } else { "TX" })]
    Kick { rx: bool, why: String },
}

impl PairError {
    /// Whether the daemon cannot go on: the tap is gone. Everything else stops only this pair.
    pub fn ends_daemon(&self) -> bool {
        matches!(
            self,
            PairError::Rx(RxError::Tap(..)) | PairError::Tx(TxError::TapGone(..))
        )
    }
}

/// One direction of a pair: running on its ring, or idle holding what it keeps.
enum Side<R, K> {
    Running {
        dir: R,
        kick: Arc<File>,
        err: Notifier,
    },
    Idle(K),
}

pub struct Pair {
    index: usize,
    tap: Arc<Tap>,
    stats: Arc<PairStats>,
    busy_poll: Duration,
    rx: Side<Rx, (RxCarry, Option<RxRing>)>,
    tx: Side<Tx, Option<TxRing>>,
}

impl Pair {
    pub fn start(s: PairSetup) -> Pair {
        let f = s.features;
        let event_idx = f.event_idx();
        let log = s.log;
        let queue = |run: QueueRun| {
            let call = Notifier(run.call);
            let mut q = DeviceQueue::new(run.queue, event_idx, &s.mem, call);
            if let Some(l) = &log {
                q.set_log(QueueLog::new(
                    l.log.clone(),
                    run.used_log_gpa,
                    l.signal.clone(),
                ));
            }
            (q, run.kick, Notifier(run.err))
        };
        let rx = match s.rx {
            Some(run) => {
                let (q, kick, err) = queue(run);
                let rx = Rx::new(q, s.rest.carry, s.rest.rx_ring, f, s.mtu, &s.stats);
                Side::Running { dir: rx, kick, err }
            }
            None => Side::Idle((s.rest.carry, s.rest.rx_ring)),
        };
        let tx = match s.tx {
            Some(run) => {
                let (q, kick, err) = queue(run);
                let tx = Tx::new(q, f.hdr_len(), s.rest.tx_ring);
                Side::Running { dir: tx, kick, err }
            }
            None => Side::Idle(s.rest.tx_ring),
        };
        Pair {
            index: s.index,
            tap: s.tap,
            stats: s.stats,
            busy_poll: s.busy_poll,
            rx,
            tx,
        }
    }

    /// Stop: the RX window's unused chains go back to the avail ring.
    pub fn stop(self) -> Stopped {
        let (rx, (carry, rx_ring)) = match self.rx {
            Side::Running { dir, .. } => {
                let (q, carry, ring) = dir.into_parts(&self.stats);
                (Some(q), (carry, ring))
            }
            Side::Idle(kept) => (None, kept),
        };
        let (tx, tx_ring) = match self.tx {
            Side::Running { dir, .. } => {
                let (q, ring) = dir.into_parts();
                (Some(q), ring)
            }
            Side::Idle(ring) => (None, ring),
        };
        Stopped {
            rest: PairRest {
                carry,
                tx_ring,
                rx_ring,
            },
            rx,
            tx,
        }
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    pub fn stats(&self) -> &PairStats {
        &self.stats
    }

    pub fn busy_poll(&self) -> Duration {
        self.busy_poll
    }

    /// The kick eventfds of the running directions (RX, TX).
    pub fn kicks(&self) -> (Option<Arc<File>>, Option<Arc<File>>) {
        (
            match &self.rx {
                Side::Running { kick, .. } => Some(kick.clone()),
                Side::Idle(_) => None,
            },
            match &self.tx {
                Side::Running { kick, .. } => Some(kick.clone()),
                Side::Idle(_) => None,
            },
        )
    }

    fn rx_state(&self) -> Option<RxState> {
        match &self.rx {
            Side::Running { dir, .. } => Some(dir.state()),
            Side::Idle(_) => None,
        }
    }

    fn tx_state(&self) -> Option<TxState> {
        match &self.tx {
            Side::Running { dir, .. } => Some(dir.state()),
            Side::Idle(_) => None,
        }
    }

    /// Whether either direction can make progress right away.
    pub fn has_work(&self) -> bool {
        self.rx_state() == Some(RxState::Ready) || self.tx_state() == Some(TxState::Ready)
    }

    /// The guest kicked RX: it posted buffers. The avail index is checked here, so a corrupted
    /// one is caught at the kick.
    pub fn rx_kicked(&mut self) -> Result<(), PairError> {
        stats::inc(&self.stats.rx_kicks);
        if let Side::Running { dir, .. } = &mut self.rx {
            dir.on_kick(&self.stats)?;
        }
        Ok(())
    }

    /// The guest kicked TX: it posted frames.
    pub fn tx_kicked(&mut self) {
        stats::inc(&self.stats.tx_kicks);
        if let Side::Running { dir, .. } = &mut self.tx {
            dir.on_kick();
        }
    }

    /// The tap became readable (or reported an error, which the next read tells) and/or
    /// writable.
    pub fn tap_event(&mut self, readable: bool, writable: bool) {
        if let (true, Side::Running { dir, .. }) = (readable, &mut self.rx) {
            dir.tap_ready();
        }
        if let (true, Side::Running { dir, .. }) = (writable, &mut self.tx) {
            dir.tap_writable();
        }
    }

    /// Busy polling: look at the guest's rings for work it posted without kicking.
    pub fn poll_guest(&mut self) -> Result<bool, PairError> {
        let mut work = false;
        if let Side::Running { dir, .. } = &mut self.rx {
            work |= dir.poll_guest(&self.stats)?;
        }
        if let Side::Running { dir, .. } = &mut self.tx {
            work |= dir.poll_guest()?;
        }
        Ok(work)
    }

    /// Whether to be woken when the tap is (readable, writable), given the states: readable
    /// while RX waits for the tap, and while it reads a trickle; writable only while TX waits
    /// for room. The worker applies it before and after every round, so a busy tap is read off
    /// its wait queue.
    ///
    /// Why not always: a registration puts our callback on the tap's wait queue, and the kernel
    /// runs it, under the queue's lock, for every frame it queues, on the producer's CPU
    /// (vhost-net leaves the queue while reading for the same reason; README, "RX: off the tap's
    /// wait queue while reading", has the measurement). Leaving and rejoining costs two
    /// `epoll_ctl` (~1 µs), about what a dozen callbacks cost the producer, so RX leaves only
    /// while its batches are at least `BUSY_BATCH` frames: a trickle stays registered. The
    /// registration is level-triggered, so a frame that arrives between an empty read and the
    /// registration is still reported: no wake-up is lost. And never while RX waits for the
    /// guest: a readable tap would wake the worker for nothing, over and over.
    pub fn tap_interest(&self) -> (bool, bool) {
        let readable = match &self.rx {
            Side::Running { dir, .. } => match dir.state() {
                RxState::TapEmpty => true,
                RxState::Ready => dir.last_batch() < BUSY_BATCH,
                RxState::WaitingForBuffers => false,
            },
            Side::Idle(_) => false,
        };
        (readable, self.tx_state() == Some(TxState::TapFull))
    }

    /// Run one RX batch if RX has work.
    pub fn run_rx(&mut self) -> Result<(), PairError> {
        if let Side::Running { dir, .. } = &mut self.rx {
            if dir.state() == RxState::Ready {
                dir.process(&self.tap, &self.stats)?;
            }
        }
        Ok(())
    }

    /// Run one TX batch if TX has work.
    pub fn run_tx(&mut self) -> Result<(), PairError> {
        if let Side::Running { dir, .. } = &mut self.tx {
            if dir.state() == TxState::Ready {
                dir.process(&self.tap, &self.stats)?;
            }
        }
        Ok(())
    }

    /// One RX batch whatever the state (the in-process loopback drives the pair by hand).
    pub fn process_rx(&mut self) -> Result<RxState, PairError> {
        match &mut self.rx {
            Side::Running { dir, .. } => Ok(dir.process(&self.tap, &self.stats)?),
            Side::Idle(_) => Ok(RxState::WaitingForBuffers),
        }
    }

    /// One TX batch whatever the state (the in-process loopback drives the pair by hand).
    pub fn process_tx(&mut self) -> Result<TxState, PairError> {
        match &mut self.tx {
            Side::Running { dir, .. } => Ok(dir.process(&self.tap, &self.stats)?),
            Side::Idle(_) => Ok(TxState::Idle),
        }
    }

    /// After an error that stops only this pair: tell the frontend through the failing ring's
    /// error eventfd (QEMU logs "vhost vring error"); a broken ring (the guest corrupted an
    /// index) counts in `ring_errors` (a tap that refuses every TX frame was counted by TX, in
    /// `tx_stops_tap_refusing`).
    pub fn report(&self, e: &PairError) {
        let signal = |side_err: Option<&Notifier>| side_err.map(Notifier::signal);
        let rx_err = match &self.rx {
            Side::Running { err, .. } => Some(err),
            Side::Idle(_) => None,
        };
        let tx_err = match &self.tx {
            Side::Running { err, .. } => Some(err),
            Side::Idle(_) => None,
        };
        match e {
            PairError::Rx(RxError::Ring(_) | RxError::GuestMemory) => {
                signal(rx_err);
                stats::inc(&self.stats.ring_errors);
            }
            PairError::Tx(TxError::Ring(_) | TxError::GuestMemory) => {
                signal(tx_err);
                stats::inc(&self.stats.ring_errors);
            }
            PairError::Tx(TxError::TapRefusesAll { .. }) => {
                signal(tx_err);
            }
            PairError::Kick { rx, .. } => {
                signal(if *rx { rx_err } else { tx_err });
                stats::inc(&self.stats.ring_errors);
            }
            // The daemon's business (the tap is gone) or not the guest's doing.
            PairError::Rx(RxError::Tap(..) | RxError::Uring(_))
            | PairError::Tx(TxError::TapGone(..))
            | PairError::EventLoop(_) => {}
        }
    }
}
