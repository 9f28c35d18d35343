//! `vhost-user-tap`: parse, start logging, run the daemon, set the exit status.
//!
//! Exit status: 0 after SIGTERM/SIGINT, 1 when the daemon cannot start or go on (tap, socket),
//! 2 for a bad command line.

use std::process::ExitCode;

use clap::Parser;
use vhost_user_tap::config::{Args, Config, CAPABILITIES_JSON};
use vhost_user_tap::daemon::Daemon;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
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
    match Daemon::new(config).and_then(Daemon::run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}
