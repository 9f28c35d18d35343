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

macro_rules! counters {
    ($(#[$m:meta])* $name:ident / $snap:ident { $($(#[$fm:meta])* $field:ident,)* }) => {
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

        impl $name {
            pub fn snapshot(&self) -> $snap {
                $snap { $($field: self.$field.load(Ordering::Relaxed),)* }
            }
        }

        impl $snap {
            /// (name, value) pairs, in declaration order.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field),)*]
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
        rx_frames,
        /// Bytes of those frames, vnet header excluded.
        rx_bytes,
        /// Times RX stopped taking frames from the tap because the guest had no (or not enough)
        /// RX buffers.
        rx_stops,
        /// Times RX resumed after a stop because the guest posted buffers and kicked.
        rx_wakes,
        /// Times the re-check after arming the guest notification found new buffers: the race the
        /// store-buffering barrier exists for.
        rx_notify_races,
        /// Frames that could not be read straight into guest buffers and waited in the staging
        /// buffer (still delivered; not a drop).
        rx_staged,
        /// Guest kicks on the RX queue.
        rx_kicks,
        /// Interrupts (call eventfd writes) for the RX queue.
        rx_interrupts,
        /// RX descriptor chains rejected as malformed and returned with length 0.
        rx_bad_desc,
        /// Frames dropped because no guest buffer (non-mergeable) or the whole ring (mergeable) can
        /// hold them: larger than the guest accepts.
        rx_dropped_oversize,
        /// Frames sent to the tap from the guest.
        tx_frames,
        /// Bytes of those frames, vnet header excluded.
        tx_bytes,
        /// Guest kicks on the TX queue.
        tx_kicks,
        /// Interrupts (call eventfd writes) for the TX queue.
        tx_interrupts,
        /// Times TX waited for the tap to become writable (EAGAIN); the frame is kept, not dropped.
        tx_blocked,
        /// TX descriptor chains rejected as malformed, completed with length 0 (frame dropped).
        tx_dropped_bad_desc,
        /// Frames the tap refused (e.g. an invalid GSO header): completed and dropped.
        tx_dropped_tap_error,
        /// Fatal ring errors (corrupted indices) that stopped this pair's worker.
        ring_errors,
        /// Times TX left io_uring for writev because the tap refused io_uring's writes
        /// (EOPNOTSUPP); the refused frames were written again with writev, not dropped.
        tx_io_uring_fallbacks,
        /// Times this pair's worker stopped because the tap refused every TX frame, with the
        /// same error and none accepted, for at least a second: a tap or kernel that cannot take
        /// the frames at all, which must not pass for a trickle of drops.
        tx_stops_tap_refusing,
    }
}

impl PairSnapshot {
    /// Frames the daemon dropped after taking them from a guest or a tap.
    pub fn daemon_drops(&self) -> u64 {
        self.rx_dropped_oversize + self.tx_dropped_bad_desc + self.tx_dropped_tap_error
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
}
