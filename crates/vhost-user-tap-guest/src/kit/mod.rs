//! The test kit every integration test and benchmark uses: where the binaries and the project's
//! scripts are, prerequisites, child processes, throwaway network namespaces, the real daemon
//! binary inside one, traffic between the host and the synthetic guest, the daemon's counters,
//! QEMU and its serial console.
//!
//! Everything the kit starts or creates is stopped or removed on drop, also when a test fails.
//!
//! - [`process`]: [`Proc`], a child process in a process group of its own, killed with the group
//!   on drop; [`output_within`] and [`run_within`], commands with a deadline.
//! - [`netns`]: [`Netns`], a network namespace of our own: taps, sockets, pings, counters.
//! - [`tempdir`]: [`TempDir`], a private work directory.
//! - [`daemon`]: [`Daemon`], the daemon binary as a child process.
//! - [`dpdk`]: [`Testpmd`], DPDK's testpmd as the daemon's peer in benchmarks.
//! - [`metrics`]: the daemon's [`Counters`], read from its metrics endpoint.
//! - [`traffic`]: datagrams between the host and the synthetic guest, checked byte for byte.
//! - [`tcp`]: [`tcp_through_daemon`], TCP between two real stacks through the daemon.
//! - [`qemu`]: QEMU's binaries, the test guest's image, one VM at a time.
//! - [`console`]: [`Console`], a guest's serial console: lines and markers with deadlines.
//! - [`qmp`]: [`Qmp`], QEMU's machine protocol: commands and events (migration).
//! - [`sniff`]: [`Sniffer`], frames of one ethertype on a namespace's links; RARP announces.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

pub mod console;
pub mod daemon;
pub mod dpdk;
pub mod metrics;
pub mod netns;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod sniff;
pub mod tcp;
pub mod tempdir;
pub mod traffic;

pub use console::{Console, Next};
pub use daemon::Daemon;
pub use dpdk::{FwdStats, Testpmd};
pub use metrics::{counters_when_idle, scrape, Counters};
pub use netns::{LinkStats, Netns, Ping};
pub use process::{
    cpu_ticks, loadavg, output_within, pin, proc_status_field, run_within, Lines, Proc,
};
pub use qemu::{
    guest_image, one_vm_at_a_time, qemu_10, qemu_present, qemu_version, GuestImage, SYSTEM_QEMU,
};
pub use qmp::Qmp;
pub use sniff::{assert_rarp, Sniffer, ETH_P_RARP};
pub use tcp::{tcp_through_daemon, TcpRun};
pub use tempdir::TempDir;
pub use traffic::*;

/// The top of the repository (qemu-scripts/, target/).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository")
}

/// `target/<profile>` of the running test or benchmark: the binaries cargo built for it sit
/// beside its `deps/` directory.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable");
    let deps = exe.parent().expect("deps/");
    if deps.ends_with("deps") {
        deps.parent().expect("target/<profile>").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// A workspace binary of this build: `$env` when set, else the one beside the running test,
/// built first (`cargo build -p package`) when a test of another package runs alone.
fn workspace_bin(env: &str, package: &str, name: &str) -> String {
    if let Ok(bin) = std::env::var(env) {
        if !bin.is_empty() {
            return bin;
        }
    }
    let dir = profile_dir();
    let path = dir.join(name);
    // Under cargo (tests, benches), always: cargo builds only the package under test, and a
    // binary left from an older build would be run silently. Without cargo (the kernel lab's
    // VM), only when it is missing.
    if !path.exists() || std::env::var_os("CARGO").is_some() {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(repo_root())
            .args(["build", "--quiet", "-p", package, "--bin", name]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        run(&mut cmd);
    }
    path.to_string_lossy().into_owned()
}

/// The daemon binary under test: the one this build made, or `VUT_DAEMON_BIN` when set. The
/// kernel lab (qemu-scripts/kernel-lab.sh) runs these test binaries inside a VM, where the host's
/// target directory does not exist.
pub fn daemon_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("VUT_DAEMON_BIN", "vhost-user-tap", "vhost-user-tap"))
}

/// The synthetic guest's binary of this build, or `VUT_GUEST_BIN` when set.
pub fn guest_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        workspace_bin(
            "VUT_GUEST_BIN",
            "vhost-user-tap-guest",
            "vhost-user-tap-guest",
        )
    })
}

/// Where downloads and built images live: `$VUT_CACHE` or `~/.cache/vhost-user-tap` (the
/// scripts' lib-vm.sh uses the same).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VUT_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/vhost-user-tap")
}

pub const HOST_IP: &str = "10.99.0.1";
pub const GUEST_IP: &str = "10.99.0.2";
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x01];
pub const TAP: &str = "vut0";
pub const GUEST_PORT: u16 = 5000;
pub const HOST_PORT: u16 = 7000;

/// How long the kit waits for the daemon or the guest to do something it should do at once.
pub const WAIT: Duration = Duration::from_secs(10);

/// `vut-<tag>-<pid>-<n>`: unique among the namespaces and directories of all test processes.
fn unique_name(tag: &str) -> String {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    format!(
        "vut-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// "aa:bb:cc:dd:ee:ff".
pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What a test does about a prerequisite: `Ok(v)` → `Some(v)`, the test runs. `Err(why)` fails
/// the test loudly with `why` and the variable that skips it, unless one of `skip_vars` is `1`:
/// then it prints `SKIPPED: <test>: <why>` and returns None.
pub fn prerequisite<T>(test: &str, skip_vars: &[&str], check: Result<T, String>) -> Option<T> {
    let why = match check {
        Ok(v) => return Some(v),
        Err(why) => why,
    };
    if skip_vars
        .iter()
        .any(|v| std::env::var(v).as_deref() == Ok("1"))
    {
        println!("SKIPPED: {test}: {why}");
        return None;
    }
    panic!("{test}: {why} (set {}=1 to skip)", skip_vars.join("=1 or "));
}

/// Whether this process runs as root, or why it must.
pub fn is_root() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        Err("needs root (taps, network namespaces): run the tests as root".into())
    }
}

/// True if the test may run. Without root it fails loudly, unless VUT_SKIP_ROOT=1 asks to skip.
pub fn root_or_skip(test: &str) -> bool {
    prerequisite(test, &["VUT_SKIP_ROOT"], is_root()).is_some()
}

/// Run `cmd` to completion; its stdout (a failure fails the test with its stderr).
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Is `tool` on PATH?
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .any(|dir| std::fs::metadata(dir.join(tool)).is_ok_and(|m| m.is_file()))
    })
}

/// True if the systemd tools the test needs are installed. A missing one fails the test loudly,
/// unless VUT_SKIP_SYSTEMD=1 asks to skip (prints SKIPPED).
pub fn systemd_tools_or_skip(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    let check = if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "needs {} (Debian package systemd; qemu-scripts/systemd-tools.sh installs it)",
            missing.join(", ")
        ))
    };
    prerequisite(test, &["VUT_SKIP_SYSTEMD"], check).is_some()
}
