//! The stop/wake model under loom: the protocol as implemented passes in every execution, and
//! removing either fence of the store-buffering pair loses a wake-up.
//!
//! Run with `cargo test -p stopwake-model`; add `-- --nocapture` to see the counterexamples loom
//! finds for the broken variants, step by step. `-- --ignored` runs the two-round models
//! without a preemption bound (minutes).
//!
//! Preemption bound: the one-round models are explored exhaustively (no bound). The two-round
//! models are bounded at `TWO_ROUND_BOUND` preemptions (switches away from a thread that could
//! have gone on; blocking in the worker's epoll_wait, finishing and joining are free). Loom
//! explores the values a weak load may return at every schedule whatever the bound (the
//! counterexamples below need no preemption at all: the stale read is the whole bug). A
//! preemption bound only limits how the steps of the two threads interleave, and placing one
//! round of the driver anywhere inside the device's arm → fence → re-check, or putting the two
//! fences in either order, takes at most two preemptions per round: four for two rounds, and
//! one to spare. The executions grow about threefold per extra preemption: at 5, 11k (EVENT_IDX)
//! and 22k (flag), about 2 s together; unbounded, 1.1 and 2.5 million, 1 to 2 minutes each
//! (the ignored test, which passes).

use stopwake_model::{check, counterexample, lost_wakeups, ArmAt, Config, Explored, Notify};

const TWO_ROUND_BOUND: Option<usize> = Some(5);

/// The model passes, and it is not vacuous: in some executions the device's re-check caught
/// the driver's buffers, and in some a kick woke the sleeping device.
fn passes(cfg: Config) -> Explored {
    let explored = check(cfg);
    eprintln!("{cfg:?}: {explored:?}");
    assert!(
        explored.with_race > 0,
        "no execution took the re-check path"
    );
    assert!(explored.with_wake > 0, "no execution was woken by a kick");
    explored
}

/// Loom finds a lost wake-up in the model, and the trace shows the store-buffering outcome: a
/// load that missed a store made before it (in the order loom ran the steps).
fn loses_a_wakeup(cfg: Config) -> String {
    let msg = counterexample(cfg)
        .unwrap_or_else(|| panic!("loom found no lost wake-up in {cfg:?}, which should lose one"));
    eprintln!("counterexample for {cfg:?}:\n{msg}");
    assert!(
        msg.starts_with("lost wake-up"),
        "the model failed for another reason: {msg}"
    );
    msg
}

// The protocol as implemented.

#[test]
fn event_idx_one_round_never_loses_a_wakeup() {
    passes(Config::correct(Notify::EventIdx));
}

#[test]
fn flag_one_round_never_loses_a_wakeup() {
    passes(Config::correct(Notify::Flag));
}

/// Two buffers in one round: `vring_need_event` over an old..new window of two.
#[test]
fn event_idx_batch_of_two_never_loses_a_wakeup() {
    passes(Config::correct(Notify::EventIdx).batch(2));
}

/// Two rounds: the device consumes what the first brought (by its re-check or after a kick,
/// which without EVENT_IDX suppresses kicks again), runs out of room and re-arms while the
/// driver posts the second.
#[test]
fn event_idx_two_rounds_never_lose_a_wakeup() {
    passes(
        Config::correct(Notify::EventIdx)
            .rounds(2)
            .preemption_bound(TWO_ROUND_BOUND),
    );
}

#[test]
fn flag_two_rounds_never_lose_a_wakeup() {
    passes(
        Config::correct(Notify::Flag)
            .rounds(2)
            .preemption_bound(TWO_ROUND_BOUND),
    );
}

#[test]
#[ignore = "exhaustive two-round models: 1.1 and 2.5 million executions, minutes"]
fn two_rounds_unbounded_never_lose_a_wakeup() {
    passes(Config::correct(Notify::EventIdx).rounds(2));
    passes(Config::correct(Notify::Flag).rounds(2));
}

// Without the device's fence (`DeviceQueue::arm_kick`): the arm store may still sit in the
// device's store buffer when the re-check loads avail.idx. The device loads the old avail.idx
// and sleeps; the driver publishes, fences and loads avail_event (or used.flags), and since
// nothing orders the device's store before its load, the driver may still read the old event
// (0, stale: need_event(0, 2, 1) is false) or the old NO_NOTIFY flag, and does not kick. Loom
// finds it on its first schedule, the device's steps all before the driver's, with the
// driver's load stale.

#[test]
fn event_idx_without_device_fence_loses_a_wakeup() {
    let msg = loses_a_wakeup(Config::correct(Notify::EventIdx).without_device_fence());
    assert!(msg.contains("load avail_event (Relaxed) = 0") && msg.contains("stale"));
}

#[test]
fn flag_without_device_fence_loses_a_wakeup() {
    let msg = loses_a_wakeup(Config::correct(Notify::Flag).without_device_fence());
    assert!(msg.contains("load used.flags (Relaxed) = 1") && msg.contains("stale"));
}

// Without the driver's fence (`kick_prepare`, Linux's virtio_mb): the mirror image. The
// driver's load of avail_event (or used.flags) may pass its own store of avail.idx: it reads
// the old event and does not kick, while the device, fenced, armed and re-read avail.idx before
// the driver's store reached it, and sleeps.

#[test]
fn event_idx_without_driver_fence_loses_a_wakeup() {
    let msg = loses_a_wakeup(Config::correct(Notify::EventIdx).without_driver_fence());
    assert!(msg.contains("load avail_event (Relaxed) = 0") && msg.contains("stale"));
}

#[test]
fn flag_without_driver_fence_loses_a_wakeup() {
    let msg = loses_a_wakeup(Config::correct(Notify::Flag).without_driver_fence());
    assert!(msg.contains("load used.flags (Relaxed) = 1") && msg.contains("stale"));
}

/// Every lost wake-up without a fence is the store-buffering outcome, in both of its shapes:
/// loom, made to go on past the first failure, finds no failing execution without a stale load
/// (so none that a sequentially consistent machine could produce), and finds both the one where
/// the driver's load misses the device's arm and the one where the device's re-check misses the
/// driver's avail.idx.
#[test]
fn every_lost_wakeup_without_a_fence_is_a_stale_load() {
    for notify in [Notify::EventIdx, Notify::Flag] {
        for cfg in [
            Config::correct(notify).without_device_fence(),
            Config::correct(notify).without_driver_fence(),
        ] {
            let (explored, lost) = lost_wakeups(cfg);
            eprintln!(
                "{cfg:?}: {explored:?}, {} distinct failing executions",
                lost.len()
            );
            assert!(explored.lost > 0, "no lost wake-up in {cfg:?}");
            for trace in &lost {
                assert!(
                    trace.contains("stale"),
                    "a lost wake-up without a stale load:\n{trace}"
                );
            }
            let stale_at = |who: &str| {
                lost.iter()
                    .find(|t| t.lines().any(|l| l.contains(who) && l.contains("stale")))
                    .unwrap_or_else(|| panic!("no lost wake-up with a stale {who} in {cfg:?}"))
            };
            eprintln!(
                "the driver's load is stale:\n{}",
                stale_at("driver: kick_prepare: load")
            );
            eprintln!(
                "the device's re-check is stale:\n{}",
                stale_at("device: arm_kick: load")
            );
        }
    }
}

/// The bug needs no interleaving: with no preemption at all (the device runs until it sleeps,
/// then the driver runs) a missing fence already loses the wake-up, through the stale load
/// alone. This is also why the preemption bound of the two-round models cannot hide it.
#[test]
fn without_a_fence_no_preemption_is_needed() {
    for notify in [Notify::EventIdx, Notify::Flag] {
        let sequential = Config::correct(notify).preemption_bound(Some(0));
        loses_a_wakeup(sequential.without_device_fence());
        loses_a_wakeup(sequential.without_driver_fence());
        passes_sequentially(sequential);
    }
}

/// With no preemption, the correct model still passes (the kick path is taken; the re-check
/// path needs the driver to run inside the device's window).
fn passes_sequentially(cfg: Config) {
    let explored = check(cfg);
    assert!(
        explored.executions > 0 && explored.with_wake > 0,
        "{explored:?}"
    );
}

/// More rounds give the driver more chances to kick, but not a way around a missing fence.
#[test]
fn two_rounds_without_either_fence_lose_a_wakeup() {
    for notify in [Notify::EventIdx, Notify::Flag] {
        let two = Config::correct(notify)
            .rounds(2)
            .preemption_bound(TWO_ROUND_BOUND);
        loses_a_wakeup(two.without_device_fence());
        loses_a_wakeup(two.without_driver_fence());
    }
}

/// The design the README warns about: arming at a freshly read avail.idx instead of
/// `next_avail` covers up a chain posted after the last pop, even with both fences (no weak
/// memory needed: the driver reads the event before the device arms it, or finds it equal to
/// its new index, and `vring_need_event` says no).
#[test]
fn arming_at_a_fresh_avail_idx_loses_a_wakeup_even_with_both_fences() {
    loses_a_wakeup(Config::correct(Notify::EventIdx).arm_at(ArmAt::FreshAvailIdx));
}
