//! `vhost-user-tap`: parse, start logging, run the daemon, set the exit status.
//!
//! Exit status: 0 after SIGTERM/SIGINT, 1 when the daemon cannot start or go on (tap, socket),
//! 2 for a bad command line; with VHOST_USER_TAP_SECCOMP_SELFTEST=1 (a test hook) 3 when the
//! seccomp filter refused every forbidden probe, 4 when one went through.

#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use std::process::ExitCode;

use vhost_user_tap::config::{Args, Config, CAPABILITIES_JSON};
use vhost_user_tap::daemon::Daemon;
use vhost_user_tap::{seccomp, systemd};

fn main() -> ExitCode {
    let mut args = match Args::try_parse_with_env() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help / --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments");
            eprintln!("vhost-user-tap: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    if args.print_capabilities {
        println!("{CAPABILITIES_JSON}");
        return ExitCode::SUCCESS;
    }
    let use_seccomp = !args.no_seccomp;
    let activated = match systemd::take_activated_socket(&mut args) {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("vhost-user-tap: {e}");
            return ExitCode::from(1);
        }
    };
    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vhost-user-tap: {e}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    if let Some(fd) = activated {
        log::info!("systemd socket activation: listening socket inherited as fd {fd}");
    }
    let status = format!(
        "serving tap {} ({} queue pair(s))",
        config.tap, config.queue_pairs
    );
    let result = Daemon::new(config).and_then(|daemon| {
        if use_seccomp {
            seccomp::apply()?;
        } else {
            log::warn!("seccomp off (--no-seccomp): every syscall stays available");
        }
        if seccomp::selftest_requested() {
            return Ok(Some(seccomp::selftest()));
        }
        systemd::notify_ready(&status);
        daemon.run().map(|()| None)
    });
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(selftest)) => ExitCode::from(selftest),
        Err(e) => {
            log::error!("{e:#}");
            systemd::notify_status(&format!("failed: {e:#}"));
            ExitCode::from(1)
        }
    }
}
