//! Fuzz targets of vhost-user-tap, as plain functions of a byte string that panic when an
//! invariant breaks. `fuzz/` (cargo-fuzz, nightly) wraps each in a libFuzzer target; the
//! replay test (`tests/replay.rs`, stable) runs them over the committed corpus and a few
//! thousand seeded inputs, so CI keeps them.
//!
//! - [`ring`]: one device queue on an arbitrary memory image: batch pops in both directions.
//! - [`datapath`]: RX and TX of one pair over the in-process loopback, with hostile rings,
//!   frames injected and worker restarts.
//! - [`session`]: vhost-user message sequences over a socketpair into a real session.
//!
//! Every target runs under one process-wide lock ([`exclusive`]), so targets run one at a time
//! even under the parallel test harness: they count the process's open descriptors.

mod datapath;
mod input;
mod reference;
mod ring;
mod session;

pub use datapath::datapath;
pub use input::{Input, Rng};
pub use ring::ring;
pub use session::session;

use std::cell::Cell;
use std::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::new(());

thread_local! {
    static HELD: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` while no other target runs (nor anything else that runs through here, such as the
/// replay test reading its corpus: the targets count open descriptors). Re-entrant on one
/// thread; a panic in `f` poisons nothing (the panic is the finding).
pub fn exclusive<R>(f: impl FnOnce() -> R) -> R {
    ignore_sigpipe();
    if HELD.with(Cell::get) {
        return f();
    }
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    struct Release;
    impl Drop for Release {
        fn drop(&mut self) {
            HELD.with(|h| h.set(false));
        }
    }
    HELD.with(|h| h.set(true));
    let _release = Release;
    f()
}

/// As in the daemon (a Rust `main` ignores SIGPIPE): a write to a socket whose peer left fails
/// with EPIPE instead of killing the process. libFuzzer's `main` is not Rust's.
fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
}

/// The descriptors this process has open.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}
