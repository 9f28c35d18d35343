//! Per-queue-pair counters.
//!
//! Design: one struct of atomics per queue pair, shared through an `Arc` between the pair's worker
//! (the only writer) and readers (the shutdown log, later a metrics endpoint). Workers add their
//! per-batch totals once per batch with `Relaxed` adds, so the per-frame path touches no shared
//! cache line. Counters live as long as the daemon, so they keep counting across reconnects.
//!
//! Limitations: a reader sees each counter individually consistent, not a snapshot of all of them
//! at one instant.

use std::sync::atomic::{AtomicU64, Ordering};

/// Where a counter shows up outside the daemon: its metric family (`vhost_user_tap_<metric>_total`,
/// one series per queue pair, `queue="N"` plus `labels`) and the family's help text. Declared
/// with the counter, in `counters!`, so the struct, the shutdown log, the metrics and the test kit
/// (which reads counters back from a scrape) can never disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    /// The field name; the shutdown log's key.
    pub field: &'static str,
    pub metric: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
    /// Shared by every counter of one family (a unit test checks).
    pub help: &'static str,
}

macro_rules! counters {
    ($(#[$m:meta])* $name:ident / $snap:ident {
        $($(#[$fm:meta])* $field:ident => $metric:literal
            $([$($lk:ident = $lv:literal),*])? $help:literal,)*
    }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[$fm])* pub $field: AtomicU64,)*
        }

        /// A plain copy of every counter.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct $snap {
            $(pub $field: u64,)*
        }

        /// Every counter of a pair, in declaration order.
        pub const COUNTERS: &[Counter] = &[$(Counter {
            field: stringify!($field),
            metric: $metric,
            labels: &[$($((stringify!($lk), $lv)),*)?],
            help: $help,
        },)*];

        impl $name {
            pub fn snapshot(&self) -> $snap {
                $snap { $($field: self.$field.load(Ordering::Relaxed),)* }
            }
        }

        impl $snap {
            /// Every value, in the order of [`COUNTERS`].
            pub fn values(&self) -> Vec<u64> {
                vec![$(self.$field,)*]
            }

            /// (name, value) pairs, in declaration order.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                COUNTERS.iter().map(|c| c.field).zip(self.values()).collect()
            }
        }
    };
}

counters! {
    /// Counters of one queue pair (RX queue 2p, TX queue 2p+1). Cache-line aligned: each pair's
    /// worker writes only its own, and must not share a line with another pair's.
    #[repr(align(64))]
    PairStats / PairSnapshot {
        /// Frames delivered to the guest (taken from the tap and published in the RX used ring).
        rx_frames => "rx_frames" "Frames delivered to the guest.",
        /// Bytes of those frames, vnet header excluded.
        rx_bytes => "rx_bytes" "Bytes delivered to the guest, vnet header excluded.",
        /// Times RX stopped taking frames from the tap because the guest had no (or not enough)
        /// RX buffers.
        rx_stops => "rx_stops" "Times RX stopped reading the tap: the guest had no room.",
        /// Times RX resumed after a stop because the guest posted buffers and kicked.
        rx_wakes => "rx_wakes" "Times RX resumed on the guest's kick after a stop.",
        /// Times the re-check after arming the guest notification found new buffers: the race the
        /// store-buffering barrier exists for.
        rx_notify_races => "rx_notify_races"
            "Re-checks after arming the kick that found new guest buffers.",
        /// Frames that could not be read straight into guest buffers and waited in the staging
        /// buffer (still delivered; not a drop).
        rx_staged => "rx_staged_frames"
            "Frames that waited in the staging buffer for guest room (delivered).",
        /// Guest kicks on the RX queue.
        rx_kicks => "rx_kicks" "Guest notifications on the RX queue.",
        /// Interrupts (call eventfd writes) for the RX queue.
        rx_interrupts => "rx_interrupts" "Interrupts sent for the RX queue.",
        /// RX descriptor chains rejected as malformed and returned with length 0.
        rx_bad_desc => "rx_bad_descriptors"
            "Malformed RX descriptor chains returned to the guest unused.",
        /// Frames dropped because no guest buffer (non-mergeable) or the whole ring (mergeable) can
        /// hold them: larger than the guest accepts.
        rx_dropped_oversize => "daemon_dropped_frames" [direction = "rx", reason = "oversize"]
            "Frames the daemon dropped after taking them from the tap or the guest.",
        /// Staged frames dropped at a feature change: checksum-partial or segmented under
        /// offloads the new guest did not accept, so it could not parse them.
        rx_dropped_unfit => "daemon_dropped_frames" [direction = "rx", reason = "unfit_offload"]
            "Frames the daemon dropped after taking them from the tap or the guest.",
        /// A staged frame the daemon still held when it exited: taken from the tap while the
        /// guest's RX ring was full, and no frontend came back to take it (after a migration, the
        /// source daemon's frame; the destination's guest never had it).
        rx_dropped_at_exit => "daemon_dropped_frames" [direction = "rx", reason = "staged_at_exit"]
            "Frames the daemon dropped after taking them from the tap or the guest.",
        /// Frames sent to the tap from the guest.
        tx_frames => "tx_frames" "Frames sent from the guest to the tap.",
        /// Bytes of those frames, vnet header excluded.
        tx_bytes => "tx_bytes" "Bytes sent to the tap, vnet header excluded.",
        /// Guest kicks on the TX queue.
        tx_kicks => "tx_kicks" "Guest notifications on the TX queue.",
        /// Interrupts (call eventfd writes) for the TX queue.
        tx_interrupts => "tx_interrupts" "Interrupts sent for the TX queue.",
        /// Times TX waited for the tap to become writable (EAGAIN); the frame is kept, not dropped.
        tx_blocked => "tx_blocked" "Times TX waited for the tap to become writable.",
        /// TX descriptor chains rejected as malformed, completed with length 0 (frame dropped).
        tx_dropped_bad_desc => "daemon_dropped_frames"
            [direction = "tx", reason = "bad_descriptor"]
            "Frames the daemon dropped after taking them from the tap or the guest.",
        /// Frames the tap refused (e.g. an invalid GSO header): completed and dropped.
        tx_dropped_tap_error => "daemon_dropped_frames" [direction = "tx", reason = "tap_error"]
            "Frames the daemon dropped after taking them from the tap or the guest.",
        /// Times the guest's side of this pair stopped it: a corrupted ring index, a ring of
        /// nothing but malformed chains (`GARBAGE_CHAINS` in a row), a kick fd that does not read
        /// like an eventfd, buffers outside the guest's memory file.
        ring_errors => "ring_errors"
            "Times the guest's rings or eventfds stopped a queue pair (corrupted index, a ring of \
             malformed chains, a broken kick, a guest memory fault).",
        /// Times TX left io_uring for writev because the tap refused io_uring's writes
        /// (EOPNOTSUPP); the refused frames were written again with writev, not dropped.
        tx_io_uring_fallbacks => "tx_io_uring_fallbacks"
            "Times TX left io_uring for writev because the tap refused its writes (the frames \
             were sent again).",
        /// Times this pair's worker stopped because the tap refused every TX frame, with the
        /// same error and none accepted, for at least a second: a tap or kernel that cannot take
        /// the frames at all, which must not pass for a trickle of drops.
        tx_stops_tap_refusing => "tx_stops_tap_refusing"
            "Times this pair stopped because the tap refused every TX frame for a second.",
        /// Guest pages marked in the migration dirty log by this pair (RX frame data, both used
        /// rings): nonzero only while a frontend migrates the guest.
        dirty_pages_logged => "dirty_log_marks"
            "Guest pages marked dirty in the migration log (RX frame data and used rings).",
    }
}

/// Requests a frontend sent that the daemon refused (a failure reply, or the connection closed
/// over a malformed one), by request code: what a broken or hostile frontend tried.
#[derive(Debug)]
pub struct FrontendStats {
    /// Indexed by request code; codes from `REQUEST_SLOTS - 1` on share the last slot.
    rejected: [AtomicU64; REQUEST_SLOTS],
    /// RARP announces written into the tap (SEND_RARP, after a migration).
    announces: AtomicU64,
}

/// vhost-user request codes end well below this (QEMU 10 knows about 45).
pub const REQUEST_SLOTS: usize = 64;

impl Default for FrontendStats {
    fn default() -> Self {
        FrontendStats {
            rejected: std::array::from_fn(|_| AtomicU64::new(0)),
            announces: AtomicU64::new(0),
        }
    }
}

impl FrontendStats {
    pub fn reject(&self, code: u32) {
        let slot = usize::try_from(code).map_or(REQUEST_SLOTS - 1, |c| c.min(REQUEST_SLOTS - 1));
        inc(&self.rejected[slot]);
    }

    pub fn announced(&self) {
        inc(&self.announces);
    }

    pub fn announces(&self) -> u64 {
        self.announces.load(Ordering::Relaxed)
    }

    /// (request code, refusals), every slot.
    pub fn rejected(&self) -> Vec<(usize, u64)> {
        self.rejected
            .iter()
            .enumerate()
            .map(|(code, n)| (code, n.load(Ordering::Relaxed)))
            .collect()
    }
}

impl PairSnapshot {
    /// Frames the daemon dropped after taking them from a guest or a tap.
    pub fn daemon_drops(&self) -> u64 {
        self.rx_dropped_oversize
            + self.rx_dropped_unfit
            + self.rx_dropped_at_exit
            + self.tx_dropped_bad_desc
            + self.tx_dropped_tap_error
    }
}

pub fn add(counter: &AtomicU64, n: u64) {
    if n != 0 {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_copies_every_counter_and_sums_drops() {
        let s = PairStats::default();
        inc(&s.rx_frames);
        add(&s.rx_dropped_oversize, 2);
        add(&s.tx_dropped_bad_desc, 3);
        add(&s.tx_dropped_tap_error, 4);
        let snap = s.snapshot();
        assert_eq!(snap.rx_frames, 1);
        assert_eq!(snap.daemon_drops(), 9);
        let fields = snap.fields();
        assert_eq!(fields[0], ("rx_frames", 1));
        assert!(fields.iter().any(|&(n, v)| n == "ring_errors" && v == 0));
    }

    #[test]
    fn every_counter_has_a_metric_and_families_share_their_help() {
        assert_eq!(COUNTERS.len(), PairSnapshot::default().values().len());
        for c in COUNTERS {
            let family: Vec<_> = COUNTERS.iter().filter(|o| o.metric == c.metric).collect();
            assert!(family.iter().all(|o| o.help == c.help), "{}", c.metric);
            // Within a family the labels tell the counters apart.
            assert!(
                family.len() == 1 || family.iter().filter(|o| o.labels == c.labels).count() == 1,
                "{}",
                c.field
            );
        }
    }
}
