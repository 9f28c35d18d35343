//! The test kit every integration test and benchmark uses: where the binaries and the project's
//! scripts are, throwaway network namespaces, the real daemon binary inside one, sockets created
//! in a namespace, and the daemon's counters.
//!
//! Every namespace is deleted on drop and every daemon is stopped on drop, also when a test fails.
//!
//! - [`netns`]: [`Netns`], a network namespace of our own, and the tap's kernel counters.
//! - [`tempdir`]: [`TempDir`], a private work directory.
//! - [`daemon`]: [`Daemon`], the daemon binary as a child process, and its [`Counters`].
//! - [`tcp`]: [`tcp_through_daemon`], TCP between two real stacks through the daemon.
//! - [`traffic`]: datagrams between the host and the synthetic guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicUsize;
use std::sync::OnceLock;

pub mod daemon;
pub mod netns;
pub mod tcp;
pub mod tempdir;
pub mod traffic;

pub use daemon::{counters_when_idle, scrape, socket_gone, Counters, Daemon};
pub use netns::{LinkStats, Netns};
pub use tcp::{tcp_through_daemon, TcpRun};
pub use tempdir::TempDir;
pub use traffic::guest_to_host_spec;

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
    if !path.exists() {
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

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// True if the test may run. Without root it fails loudly, unless VUT_SKIP_ROOT=1 asks to skip.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("VUT_SKIP_ROOT").as_deref() == Ok("1") {
        println!("SKIPPED: {test}: needs root (taps, network namespaces)");
        return false;
    }
    panic!(
        "{test}: needs root to create taps and network namespaces (set VUT_SKIP_ROOT=1 to skip)"
    );
}

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
    if missing.is_empty() {
        return true;
    }
    if std::env::var("VUT_SKIP_SYSTEMD").as_deref() == Ok("1") {
        println!("SKIPPED: {test}: {} not installed", missing.join(", "));
        return false;
    }
    panic!(
        "{test}: needs {} (Debian package systemd; qemu-scripts/systemd-tools.sh installs it; set \
         VUT_SKIP_SYSTEMD=1 to skip)",
        missing.join(", ")
    );
}
