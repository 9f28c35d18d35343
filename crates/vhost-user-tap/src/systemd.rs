//! systemd integration: socket activation, readiness and stopping notifications, the watchdog.
//!
//! Everything goes through the `sd-notify` crate (sd_listen_fds(3), sd_notify(3)) and does nothing
//! when the daemon was not started by systemd (no `LISTEN_FDS`, `NOTIFY_SOCKET`, `WATCHDOG_USEC`
//! for this pid), so the same binary runs by hand, under QEMU's backend conventions and as the
//! `vhost-user-tap@.service` unit.
//!
//! # Design
//! - Socket activation hands over one *listening* unix stream socket (like `--fd`); the
//!   `.socket` unit owns the path, so QEMU can connect while the daemon (re)starts.
//! - `READY=1` is sent once the tap is open, the listener is ready and the seccomp filter is in
//!   place; `STOPPING=1` when a signal starts the shutdown.
//! - The watchdog is pinged from the main thread's event loop, which is what must stay alive:
//!   its epoll waits time out at half the interval ([`Watchdog::epoll_timeout_ms`]).
//!
//! # Limitations
//! - A notification that cannot be sent is logged and otherwise ignored: the daemon keeps
//!   serving; systemd then acts on its own timeouts.

use std::cell::Cell;
use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use log::{info, warn};
use sd_notify::NotifyState;
use thiserror::Error;

use crate::config::Args;

#[derive(Debug, Error)]
pub enum SystemdError {
    #[error("socket activation: cannot read LISTEN_FDS: {0}")]
    ListenFds(io::Error),
    #[error(
        "socket activation: systemd passed {0} sockets (LISTEN_FDS={0}) but vhost-user-tap serves \
         exactly one: give the .socket unit a single ListenStream="
    )]
    SocketCount(usize),
    #[error(
        "socket activation: fd {fd} is {what}; the .socket unit must have \
         ListenStream=/path/to/socket and Accept=no"
    )]
    NotListeningUnixStream { fd: RawFd, what: String },
    #[error(
        "socket activation: systemd passed a listening socket (fd {fd}) and {option} was given \
         too; remove {option} (from the command line or VHOST_USER_TAP_* in the unit's \
         environment file)"
    )]
    Conflict { fd: RawFd, option: String },
}

/// If systemd passed a listening socket (LISTEN_FDS/LISTEN_PID for this process), check it and
/// make it the daemon's listener (`args.fd`). Returns its fd; `None` when not socket-activated,
/// in which case `--socket-path`/`--fd` apply as given.
pub fn take_activated_socket(args: &mut Args) -> Result<Option<RawFd>, SystemdError> {
    let fds: Vec<RawFd> = sd_notify::listen_fds()
        .map_err(SystemdError::ListenFds)?
        .collect();
    let fd = match fds[..] {
        [] => return Ok(None),
        [fd] => fd,
        _ => return Err(SystemdError::SocketCount(fds.len())),
    };
    crate::sys::check_listening_unix_stream(fd)
        .map_err(|what| SystemdError::NotListeningUnixStream { fd, what })?;
    if let Some(p) = &args.socket_path {
        return Err(SystemdError::Conflict {
            fd,
            option: format!("--socket-path {}", p.display()),
        });
    }
    match args.fd {
        Some(other) if other != fd => Err(SystemdError::Conflict {
            fd,
            option: format!("--fd {other}"),
        }),
        _ => {
            args.fd = Some(fd);
            Ok(Some(fd))
        }
    }
}

fn notify(states: &[NotifyState], what: &str) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("sd_notify {what}: {e}");
    }
}

/// `READY=1` plus a one-line `STATUS=` for `systemctl status`.
pub fn notify_ready(status: &str) {
    notify(
        &[NotifyState::Ready, NotifyState::Status(status)],
        "READY=1",
    );
}

/// `STOPPING=1`: the shutdown has begun.
pub fn notify_stopping() {
    notify(
        &[NotifyState::Stopping, NotifyState::Status("shutting down")],
        "STOPPING=1",
    );
}

/// A `STATUS=` line (e.g. why the daemon is about to fail).
pub fn notify_status(status: &str) {
    notify(&[NotifyState::Status(status)], "STATUS");
}

/// The systemd watchdog (`WatchdogSec=`), pinged from the main thread's event loop.
#[derive(Debug)]
pub struct Watchdog {
    interval: Option<Duration>,
    last: Cell<Instant>,
    warned: Cell<bool>,
}

impl Watchdog {
    /// Enabled when systemd set WATCHDOG_USEC (and WATCHDOG_PID, if set, is this process).
    pub fn from_env() -> Watchdog {
        let interval = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
        if let Some(i) = interval {
            info!(
                "systemd watchdog every {} ms: the main loop pings at least every {} ms",
                i.as_millis(),
                (i * 3 / 4).as_millis()
            );
        }
        Watchdog::with_interval(interval)
    }

    pub fn with_interval(interval: Option<Duration>) -> Watchdog {
        Watchdog {
            interval,
            last: Cell::new(Instant::now()),
            warned: Cell::new(false),
        }
    }

    /// Timeout for the main loop's `epoll_wait`: half the watchdog interval (at least 1 ms), or
    /// -1 (wait forever) without a watchdog.
    pub fn epoll_timeout_ms(&self) -> i32 {
        match self.interval {
            None => -1,
            Some(i) => i32::try_from((i / 2).as_millis())
                .unwrap_or(i32::MAX)
                .max(1),
        }
    }

    /// Call after every wake-up of the main loop: sends `WATCHDOG=1` when a quarter of the
    /// interval has passed since the last ping. With waits of at most half the interval, pings
    /// are then never more than three quarters of the interval apart while the loop runs.
    pub fn tick(&self) {
        let Some(i) = self.interval else { return };
        if self.last.get().elapsed() < i / 4 {
            return;
        }
        self.last.set(Instant::now());
        if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
            if !self.warned.replace(true) {
                warn!("sd_notify WATCHDOG=1: {e} (not repeated)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_waits_half_the_watchdog_interval() {
        assert_eq!(Watchdog::with_interval(None).epoll_timeout_ms(), -1);
        let w = Watchdog::with_interval(Some(Duration::from_secs(10)));
        assert_eq!(w.epoll_timeout_ms(), 5000);
        let tiny = Watchdog::with_interval(Some(Duration::from_micros(500)));
        assert_eq!(tiny.epoll_timeout_ms(), 1);
    }
}
