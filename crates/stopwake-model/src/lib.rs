//! A loom model of the RX stop/wake protocol of vhost-user-tap: the daemon's "arm the kick, full
//! fence, re-check the avail index, else sleep" against the guest driver's "publish the avail
//! index, full fence, read the device's event (or flag), kick if asked".
//!
//! The daemon's RX worker stops reading the tap when the guest's RX ring is empty and sleeps on the
//! queue's kick eventfd. Each side stores, then loads across a full barrier (the store-buffering
//! recipe of the tun patch in `shared/seed`): at least one side must see the other's store, so
//! either the device's re-check finds the new buffers or the driver sees the armed event and
//! kicks. This crate checks that claim with [loom], which runs the two sides as threads over
//! loom's atomics and explores every interleaving (up to a preemption bound, where a test sets
//! one) and every value a weak (C11) load may return, and it checks that the claim depends on
//! both fences: with either one removed loom finds a lost wake-up.
//!
//! What is modelled, step by step, and where it is in the real code:
//!
//! Device (the daemon's RX worker, `crates/vhost-user-tap/src/rx.rs` and `ring.rs`):
//! 1. `Rx::fill_window` → `DeviceQueue::pop_batch`: one acquire load of `avail.idx`; every chain
//!    up to it is popped (its avail ring entry read, and checked here to be the head the driver
//!    wrote) and filled with a frame (the tap always has frames in the model), so
//!    `next_avail` moves up to it.
//! 2. No room: `Rx::publish` → `DeviceQueue::publish` (release store of `used.idx`) and
//!    `DeviceQueue::interrupt` → `needs_interrupt` (a full fence, then a relaxed load of
//!    `used_event`; the interrupt itself is not modelled). This fence is *before* the arm: it is
//!    kept in the model to show that it is no substitute for the one in `arm_kick`.
//! 3. `DeviceQueue::arm_kick`: with EVENT_IDX a relaxed store `avail_event = next_avail`,
//!    without it a relaxed store clearing `VRING_USED_F_NO_NOTIFY` in `used.flags`; then
//!    `fence(SeqCst)` ([`Config::device_fence`]); then an acquire load of `avail.idx`. If it
//!    moved past `next_avail`, `Rx::run_batch` counts a notify race and goes on (back to 1).
//! 4. Otherwise `run_batch` returns `RxState::WaitingForBuffers` and the worker
//!    (`worker.rs`, `serve`) sleeps in `epoll_wait` on the kick eventfd. A kick wakes it: it
//!    drains the eventfd (`drain`), `Rx::on_kick` sets `VRING_USED_F_NO_NOTIFY` again
//!    (`DeviceQueue::suppress_kicks`, relaxed; a no-op with EVENT_IDX) and runs a batch (back
//!    to 1).
//!
//! Driver (the guest, `crates/vhost-user-tap-guest/src/ring.rs`, like Linux's
//! `virtqueue_add_split` and `virtqueue_kick_prepare_split`), for each of [`Config::rounds`]
//! rounds of [`Config::batch`] buffers:
//! 1. `DriverRing::publish`: a relaxed store of the head into the avail ring entry, then a
//!    release store of `avail.idx` (Linux: `virtio_wmb` + store), per buffer.
//! 2. `DriverRing::kick_prepare`: `fence(SeqCst)` ([`Config::driver_fence`], Linux's
//!    `virtio_mb`), then a relaxed load of `avail_event` and `vring_need_event(avail_event,
//!    new, old)` over the round's old and new index, or a relaxed load of `used.flags` and
//!    "kick unless NO_NOTIFY".
//! 3. If so, the kick: a write to the kick eventfd.
//!
//! The kick eventfd is a counter behind a lock, as in the kernel (a write and the read that
//! drains it synchronize through the eventfd's spinlock: release/acquire, at the read, not
//! before), with a condition variable standing for the worker's `epoll_wait`: a sleeping device
//! blocks until a kick is written and then goes on, so with several rounds it really is woken
//! in the middle of the driver's work and re-arms against the next round. (Spinning on an
//! atomic instead multiplies the executions loom must run; loom's `park`/`unpark` would hand the
//! driver's view to the device at the `unpark`, even while the device is running, which no
//! eventfd does.)
//!
//! The verdict: once the driver has posted its last round (it then marks the eventfd `done`, a
//! flag only the model has: in the real system the guest simply stops posting), a device that is
//! asleep with no kick pending must have consumed everything the driver posted. A sleeping
//! device, an avail index beyond `next_avail` and an empty eventfd is a **lost wake-up**: the
//! worker would sleep forever with frames waiting in the tap. The device panics with the
//! execution's trace, and loom reports the failing interleaving.
//!
//! The orderings are the real code's: relaxed for the event and flag stores and loads, release
//! and acquire for the avail index, `fence(SeqCst)` between. Loom treats SeqCst *accesses* as
//! AcqRel (so none are used here) but supports `fence(SeqCst)`: each one takes in the view of
//! every SeqCst fence loom ran before it and hands on its own, the fence-to-fence rule the
//! store-buffering argument rests on. A relaxed or acquire load may return any store not older
//! than what its thread has seen, so a store "earlier" in loom's schedule can still be missed:
//! the traces mark such loads "stale".
//!
//! Assumptions (what the model leaves out): the tap always has a frame, and a batch never runs
//! out of budget, so a batch ends only for want of guest buffers (a batch that ends for the
//! budget or an empty tap does not sleep on the kick, so it cannot lose it); one queue, one
//! device thread and one driver thread; indexes start at 1 and do not wrap (wrap-around is
//! covered by the unit tests of `vring_need_event`).

use std::fmt;
use std::sync::Mutex;

use loom::sync::atomic::{fence, AtomicU16, Ordering};
use loom::sync::{Arc, Condvar, Mutex as LoomMutex};
use loom::thread;

/// `VRING_USED_F_NO_NOTIFY`: device → driver, "don't kick me" (without EVENT_IDX).
pub const NO_NOTIFY: u16 = 1;

/// Ring entries in the model: more than the driver ever posts, so no slot is reused.
const RING: usize = 8;
/// The device starts having popped chain 0 and filled it (`next_avail` = 1).
const START: u16 = 1;
/// `avail_event` at the start: the index the device last armed at (0, the kick for chain 0 woke
/// it), stale now that it has consumed chain 0.
const STALE_EVENT: u16 = 0;
/// What an avail ring entry holds before the driver writes it.
const EMPTY_SLOT: u16 = u16::MAX;

/// Which kick suppression the driver and the device negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notify {
    /// VIRTIO_F_EVENT_IDX: the device arms `avail_event`, the driver applies `vring_need_event`.
    EventIdx,
    /// No EVENT_IDX: the device clears and sets `VRING_USED_F_NO_NOTIFY` in `used.flags`.
    Flag,
}

/// The index the device arms the kick at (EVENT_IDX only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArmAt {
    /// `avail_event = next_avail` and re-check against it: what `DeviceQueue::arm_kick` does.
    NextAvail,
    /// The earlier, wrong design (README, "Popped RX chains are never rolled back"): arm at a
    /// freshly read `avail.idx` and re-check against that. A chain posted after the last pop
    /// and before the arm is covered up: the re-check sees no change, and the driver, which
    /// read the event before the arm or saw it equal to its new index, does not kick.
    FreshAvailIdx,
}

/// One model: the protocol variant and which of its fences are present.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub notify: Notify,
    /// The `fence(SeqCst)` in `DeviceQueue::arm_kick`, between the arm and the re-check.
    pub device_fence: bool,
    /// The `fence(SeqCst)` in the driver's `kick_prepare`, between publishing `avail.idx` and
    /// reading `avail_event` or `used.flags`.
    pub driver_fence: bool,
    pub arm_at: ArmAt,
    /// Rounds of posting the driver does (each: `batch` buffers, then one kick decision).
    pub rounds: u16,
    /// Buffers per round.
    pub batch: u16,
    /// Loom's preemption bound (None: every interleaving).
    pub preemption_bound: Option<usize>,
}

impl Config {
    /// The protocol as the daemon and the guest implement it: both fences, one round of one
    /// buffer, every interleaving.
    pub fn correct(notify: Notify) -> Config {
        Config {
            notify,
            device_fence: true,
            driver_fence: true,
            arm_at: ArmAt::NextAvail,
            rounds: 1,
            batch: 1,
            preemption_bound: None,
        }
    }

    pub fn rounds(self, rounds: u16) -> Config {
        Config { rounds, ..self }
    }

    pub fn batch(self, batch: u16) -> Config {
        Config { batch, ..self }
    }

    pub fn without_device_fence(self) -> Config {
        Config {
            device_fence: false,
            ..self
        }
    }

    pub fn without_driver_fence(self) -> Config {
        Config {
            driver_fence: false,
            ..self
        }
    }

    pub fn arm_at(self, arm_at: ArmAt) -> Config {
        Config { arm_at, ..self }
    }

    pub fn preemption_bound(self, bound: Option<usize>) -> Config {
        Config {
            preemption_bound: bound,
            ..self
        }
    }

    fn posted(&self) -> usize {
        usize::from(self.rounds) * usize::from(self.batch)
    }
}

/// The guest memory and the eventfd the two sides share.
struct Shared {
    /// `avail.idx`, written by the driver.
    avail_idx: AtomicU16,
    /// The avail ring entries, written by the driver.
    avail_ring: [AtomicU16; RING],
    /// `used_event` (the driver's interrupt suppression; constant here).
    used_event: AtomicU16,
    /// `used.idx`, written by the device.
    used_idx: AtomicU16,
    /// `used.flags` (`VRING_USED_F_NO_NOTIFY`), written by the device.
    used_flags: AtomicU16,
    /// `avail_event` (the last word of the used ring), written by the device.
    avail_event: AtomicU16,
    /// The RX kick eventfd, and the worker's epoll_wait on it.
    kick: KickFd,
}

/// The kick eventfd: a counter behind a lock (the kernel's eventfd spinlock: a write and the
/// read that sees it synchronize, release/acquire), with a condition variable for the worker's
/// `epoll_wait`, so a sleeping device blocks instead of spinning. `done` is the model's own: the
/// driver has posted its last round.
struct KickFd {
    state: LoomMutex<KickState>,
    readable: Condvar,
}

struct KickState {
    count: u64,
    done: bool,
}

impl KickFd {
    /// The driver's eventfd write.
    fn write(&self) {
        self.state.lock().unwrap().count += 1;
        self.readable.notify_one();
    }

    fn done(&self) {
        self.state.lock().unwrap().done = true;
        self.readable.notify_one();
    }

    /// Block until the eventfd is readable or the driver is done; drain it. Returns the
    /// kicks drained (0: the driver is done and nothing was written since the last drain).
    fn wait(&self) -> u64 {
        let mut s = self.state.lock().unwrap();
        while s.count == 0 && !s.done {
            s = self.readable.wait(s).unwrap();
        }
        std::mem::take(&mut s.count)
    }
}

/// `used.flags` at the start: without EVENT_IDX the device was last woken by a kick, and
/// `Rx::on_kick` suppressed kicks (`DeviceQueue::suppress_kicks`).
fn initial_flags(notify: Notify) -> u16 {
    match notify {
        Notify::EventIdx => 0,
        Notify::Flag => NO_NOTIFY,
    }
}

/// The head the driver puts into avail ring entry `idx` (any value other than [`EMPTY_SLOT`]).
fn head_of(idx: u16) -> u16 {
    idx.wrapping_mul(3) % 64
}

fn slot(idx: u16) -> usize {
    usize::from(idx) % RING
}

impl Shared {
    fn new(notify: Notify) -> Shared {
        Shared {
            avail_idx: AtomicU16::new(START),
            avail_ring: std::array::from_fn(|i| {
                // Chain 0 was posted before the model starts.
                AtomicU16::new(if i == 0 { head_of(0) } else { EMPTY_SLOT })
            }),
            used_event: AtomicU16::new(0),
            used_idx: AtomicU16::new(START - 1),
            used_flags: AtomicU16::new(initial_flags(notify)),
            avail_event: AtomicU16::new(STALE_EVENT),
            kick: KickFd {
                state: LoomMutex::new(KickState {
                    count: 0,
                    done: false,
                }),
                readable: Condvar::new(),
            },
        }
    }
}

/// One step of an execution, in the order loom ran them, with the values the loads returned.
#[derive(Clone, Copy, Debug)]
enum Step {
    DevPop {
        avail: u16,
        from: u16,
    },
    DevPublish {
        used: u16,
    },
    DevInterruptFence,
    DevArmRead {
        avail: u16,
    },
    DevArm {
        notify: Notify,
        at: u16,
    },
    DevFence {
        present: bool,
    },
    DevRecheck {
        avail: u16,
        armed: u16,
    },
    DevSleep,
    DevWake {
        kicks: u64,
    },
    DrvPost {
        idx: u16,
    },
    DrvFence {
        present: bool,
    },
    DrvCheck {
        notify: Notify,
        read: u16,
        old: u16,
        new: u16,
        kick: bool,
    },
    DrvKick,
    DrvDone,
    DevFinal {
        avail: u16,
        next_avail: u16,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Step::DevPop { avail, from } if avail == from => write!(
                f,
                "device: fill_window: load avail.idx (Acquire) = {avail}: nothing to pop"
            ),
            Step::DevPop { avail, from } => write!(
                f,
                "device: fill_window: load avail.idx (Acquire) = {avail}: pop chains {from}..{avail}, fill them"
            ),
            Step::DevPublish { used } => {
                write!(f, "device: publish: store used.idx = {used} (Release)")
            }
            Step::DevInterruptFence => write!(f, "device: needs_interrupt: fence(SeqCst)"),
            Step::DevArmRead { avail } => write!(
                f,
                "device: arm_kick (wrong design): load avail.idx (Acquire) = {avail} to arm at"
            ),
            Step::DevArm {
                notify: Notify::EventIdx,
                at,
            } => write!(f, "device: arm_kick: store avail_event = {at} (Relaxed)"),
            Step::DevArm {
                notify: Notify::Flag,
                ..
            } => write!(f, "device: arm_kick: store used.flags = 0 (Relaxed)"),
            Step::DevFence { present: true } => write!(f, "device: arm_kick: fence(SeqCst)"),
            Step::DevFence { present: false } => {
                write!(f, "device: arm_kick: (fence removed)")
            }
            Step::DevRecheck { avail, armed } => write!(
                f,
                "device: arm_kick: load avail.idx (Acquire) = {avail}{}",
                if avail == armed {
                    format!(" == {armed}: WaitingForBuffers")
                } else {
                    format!(" != {armed}: notify race, go on")
                }
            ),
            Step::DevSleep => write!(f, "device: worker sleeps in epoll_wait on the kick eventfd"),
            Step::DevWake { kicks } => write!(
                f,
                "device: woken: drain the kick eventfd ({kicks}), on_kick: suppress_kicks"
            ),
            Step::DrvPost { idx } => write!(
                f,
                "driver: store avail ring[{}] (Relaxed), store avail.idx = {idx} (Release)",
                idx - 1
            ),
            Step::DrvFence { present: true } => write!(f, "driver: kick_prepare: fence(SeqCst)"),
            Step::DrvFence { present: false } => {
                write!(f, "driver: kick_prepare: (fence removed)")
            }
            Step::DrvCheck {
                notify: Notify::EventIdx,
                read,
                old,
                new,
                kick,
            } => write!(
                f,
                "driver: kick_prepare: load avail_event (Relaxed) = {read}: \
                 vring_need_event({read}, new {new}, old {old}) = {kick}"
            ),
            Step::DrvCheck {
                notify: Notify::Flag,
                read,
                kick,
                ..
            } => write!(
                f,
                "driver: kick_prepare: load used.flags (Relaxed) = {read}: kick = {kick}"
            ),
            Step::DrvKick => write!(f, "driver: write the kick eventfd"),
            Step::DrvDone => write!(f, "driver: done posting"),
            Step::DevFinal { avail, next_avail } => write!(
                f,
                "device: asleep, kick eventfd empty, avail.idx = {avail}, next_avail = {next_avail}"
            ),
        }
    }
}

/// The steps of one execution. A std mutex, invisible to loom: loom runs one thread at a time
/// and never switches inside `push`, so the order is the order loom scheduled the steps.
#[derive(Default)]
struct Trace(Mutex<Vec<Step>>);

impl Trace {
    fn push(&self, step: Step) {
        self.0.lock().unwrap().push(step);
    }

    /// The steps, numbered, each load marked "stale" when it returned a value older than the
    /// last store to its location in this order: what no sequentially consistent execution can
    /// do, and what a missing fence lets through.
    fn render(&self, notify: Notify) -> String {
        let steps = self.0.lock().unwrap();
        // The last store to avail.idx, avail_event and used.flags, and the step that made it.
        let mut avail_idx = (START, None);
        let mut avail_event = (STALE_EVENT, None);
        let mut used_flags = (initial_flags(notify), None);
        let mut out = String::new();
        for (i, step) in steps.iter().enumerate() {
            let n = i + 1;
            let latest = match *step {
                Step::DevPop { avail, .. }
                | Step::DevArmRead { avail }
                | Step::DevRecheck { avail, .. } => Some((avail, avail_idx)),
                Step::DrvCheck {
                    notify: Notify::EventIdx,
                    read,
                    ..
                } => Some((read, avail_event)),
                Step::DrvCheck {
                    notify: Notify::Flag,
                    read,
                    ..
                } => Some((read, used_flags)),
                _ => None,
            };
            let stale = match latest {
                Some((read, (last, Some(at)))) if read != last => {
                    format!("  <- stale: the store of {last} at step {at} is not visible here")
                }
                _ => String::new(),
            };
            out += &format!("  {n:2}. {step}{stale}\n");
            match *step {
                Step::DrvPost { idx } => avail_idx = (idx, Some(n)),
                Step::DevArm {
                    notify: Notify::EventIdx,
                    at,
                } => avail_event = (at, Some(n)),
                Step::DevArm {
                    notify: Notify::Flag,
                    ..
                } => used_flags = (0, Some(n)),
                Step::DevWake { .. } if notify == Notify::Flag => {
                    used_flags = (NO_NOTIFY, Some(n));
                }
                _ => {}
            }
        }
        out
    }
}

/// Linux's `vring_need_event`: should the other side be notified, given its event index, the
/// new index and the index at the previous decision? (The daemon's `ring::vring_need_event`.)
fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// What one execution's device saw.
#[derive(Default)]
struct DeviceEnd {
    races: u64,
    wakes: u64,
    /// The lost wake-up's report, when the device does not panic on one.
    lost: Option<String>,
}

/// What the device does with a lost wake-up.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnLost {
    /// Fail the model: loom stops and reports the execution.
    Panic,
    /// Record it and let loom go on exploring.
    Record,
}

/// The daemon's RX side; see the crate docs for the steps. Panics with a lost wake-up.
fn device(sh: &Shared, cfg: &Config, trace: &Trace, on_lost: OnLost) -> DeviceEnd {
    let mut end = DeviceEnd::default();
    let mut next_avail = START;
    // Chain 0 holds a frame not yet published; the last interrupt decision was before it.
    let mut next_used = START;
    let mut signalled_used = START - 1;
    loop {
        // Rx::fill_window → DeviceQueue::pop_batch (virtio_queue's iterator): one acquire load
        // of avail.idx, then the avail ring entries up to it.
        let avail = sh.avail_idx.load(Ordering::Acquire);
        trace.push(Step::DevPop {
            avail,
            from: next_avail,
        });
        if avail != next_avail {
            for idx in next_avail..avail {
                let head = sh.avail_ring[slot(idx)].load(Ordering::Relaxed);
                assert_eq!(
                    head,
                    head_of(idx),
                    "avail ring entry {idx} read before the driver's write reached it: \
                     the release/acquire pair on avail.idx is broken"
                );
                // Rx::read_frame → complete_frame: a frame in it, DeviceQueue::add_used.
                next_used += 1;
            }
            next_avail = avail;
            // The tap has more frames: fill_window again, until the guest is out of room.
            continue;
        }

        // No room. Rx::publish: DeviceQueue::publish, then interrupt → needs_interrupt.
        sh.used_idx.store(next_used, Ordering::Release);
        trace.push(Step::DevPublish { used: next_used });
        if next_used != signalled_used {
            signalled_used = next_used;
            fence(Ordering::SeqCst);
            trace.push(Step::DevInterruptFence);
            // The interrupt decision; whether it fires does not matter to the kick.
            let _ = sh.used_event.load(Ordering::Relaxed);
        }

        // DeviceQueue::arm_kick.
        let armed = match cfg.arm_at {
            ArmAt::NextAvail => next_avail,
            ArmAt::FreshAvailIdx => {
                let avail = sh.avail_idx.load(Ordering::Acquire);
                trace.push(Step::DevArmRead { avail });
                avail
            }
        };
        match cfg.notify {
            Notify::EventIdx => sh.avail_event.store(armed, Ordering::Relaxed),
            Notify::Flag => sh.used_flags.store(0, Ordering::Relaxed),
        }
        trace.push(Step::DevArm {
            notify: cfg.notify,
            at: armed,
        });
        if cfg.device_fence {
            fence(Ordering::SeqCst);
        }
        trace.push(Step::DevFence {
            present: cfg.device_fence,
        });
        let avail = sh.avail_idx.load(Ordering::Acquire);
        trace.push(Step::DevRecheck { avail, armed });
        if avail != armed {
            // Rx::run_batch: t.races += 1; continue.
            end.races += 1;
            continue;
        }

        // RxState::WaitingForBuffers: worker.rs `serve` blocks in epoll_wait on the kick
        // eventfd (the tap is not watched for RX meanwhile).
        trace.push(Step::DevSleep);
        let kicks = sh.kick.wait();
        if kicks > 0 {
            // The kick eventfd was readable: drain(k), Pair::rx_kicked → Rx::on_kick.
            end.wakes += 1;
            trace.push(Step::DevWake { kicks });
            if cfg.notify == Notify::Flag {
                // DeviceQueue::suppress_kicks.
                sh.used_flags.store(NO_NOTIFY, Ordering::Relaxed);
            }
            continue;
        }
        // The driver is done and nothing will wake the worker any more. The eventfd's lock
        // ordered the driver's last store before this load, so it is exact.
        let avail = sh.avail_idx.load(Ordering::Acquire);
        trace.push(Step::DevFinal { avail, next_avail });
        if avail != next_avail {
            let report = format!(
                "lost wake-up: the device sleeps at next_avail {next_avail} with \
                 avail.idx at {avail} and no kick ({cfg:?}); the execution:\n{}",
                trace.render(cfg.notify)
            );
            assert!(on_lost == OnLost::Record, "{report}");
            end.lost = Some(report);
        }
        return end;
    }
}

/// The guest's RX refill; see the crate docs for the steps.
fn driver(sh: &Shared, cfg: &Config, trace: &Trace) {
    // The driver's shadow of avail.idx.
    let mut avail = START;
    for _ in 0..cfg.rounds {
        let old = avail;
        for _ in 0..cfg.batch {
            // DriverRing::publish: the entry, then the index (release).
            sh.avail_ring[slot(avail)].store(head_of(avail), Ordering::Relaxed);
            avail += 1;
            sh.avail_idx.store(avail, Ordering::Release);
            trace.push(Step::DrvPost { idx: avail });
        }
        // DriverRing::kick_prepare.
        if cfg.driver_fence {
            fence(Ordering::SeqCst);
        }
        trace.push(Step::DrvFence {
            present: cfg.driver_fence,
        });
        let (read, kick) = match cfg.notify {
            Notify::EventIdx => {
                let ev = sh.avail_event.load(Ordering::Relaxed);
                (ev, vring_need_event(ev, avail, old))
            }
            Notify::Flag => {
                let flags = sh.used_flags.load(Ordering::Relaxed);
                (flags, flags & NO_NOTIFY == 0)
            }
        };
        trace.push(Step::DrvCheck {
            notify: cfg.notify,
            read,
            old,
            new: avail,
            kick,
        });
        if kick {
            sh.kick.write();
            trace.push(Step::DrvKick);
        }
    }
    trace.push(Step::DrvDone);
    sh.kick.done();
}

/// What loom explored for one model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Explored {
    /// Executions (interleavings and load results) loom ran.
    pub executions: u64,
    /// Of them, those in which the device's re-check found new buffers (a notify race).
    pub with_race: u64,
    /// Those in which a kick woke the sleeping device.
    pub with_wake: u64,
    /// Those that lost a wake-up (only counted by [`lost_wakeups`]: [`check`] stops at the
    /// first).
    pub lost: u64,
}

/// Run the model under loom, exploring every execution (up to the preemption bound). Panics,
/// with the failing execution's trace, if one loses a wake-up.
pub fn check(cfg: Config) -> Explored {
    explore(cfg, OnLost::Panic).0
}

/// Run the model under loom through every execution, failing or not, and return the distinct
/// traces of those that lose a wake-up (in the order loom found them).
pub fn lost_wakeups(cfg: Config) -> (Explored, Vec<String>) {
    explore(cfg, OnLost::Record)
}

fn explore(cfg: Config, on_lost: OnLost) -> (Explored, Vec<String>) {
    assert!(
        usize::from(START) + cfg.posted() <= RING,
        "the model's ring has {RING} entries"
    );
    let found = std::sync::Arc::new(Mutex::new((Explored::default(), Vec::<String>::new())));
    let tally = found.clone();
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = cfg.preemption_bound;
    builder.check(move || {
        let sh = Arc::new(Shared::new(cfg.notify));
        let trace = std::sync::Arc::new(Trace::default());
        let (sh2, trace2) = (sh.clone(), trace.clone());
        let guest = thread::spawn(move || driver(&sh2, &cfg, &trace2));
        let end = device(&sh, &cfg, &trace, on_lost);
        guest.join().unwrap();
        let mut t = tally.lock().unwrap();
        let (explored, lost) = &mut *t;
        explored.executions += 1;
        explored.with_race += u64::from(end.races > 0);
        explored.with_wake += u64::from(end.wakes > 0);
        if let Some(report) = end.lost {
            explored.lost += 1;
            if !lost.contains(&report) {
                lost.push(report);
            }
        }
    });
    let found = std::mem::take(&mut *found.lock().unwrap());
    found
}

/// Run the model and return loom's counterexample (the panic message, with the failing
/// execution's trace), or None if every execution passed.
pub fn counterexample(cfg: Config) -> Option<String> {
    let res = std::panic::catch_unwind(|| check(cfg));
    match res {
        Ok(_) => None,
        Err(payload) => Some(
            payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "(a panic without a message)".to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::vring_need_event;

    #[test]
    fn need_event_is_linux_s() {
        assert!(vring_need_event(1, 2, 1));
        assert!(!vring_need_event(0, 2, 1));
        assert!(!vring_need_event(2, 2, 1));
        assert!(vring_need_event(1, 3, 1));
        assert!(vring_need_event(2, 3, 1));
    }
}
