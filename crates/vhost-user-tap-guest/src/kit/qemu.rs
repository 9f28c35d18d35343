//! QEMU and the test guest: where the binaries and the guest image are (with how to get each
//! one that is missing), QEMU's version, and one VM at a time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use super::cache_dir;

/// Debian 12's QEMU 7.2 (`apt-get install qemu-system-x86`).
pub const SYSTEM_QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// QEMU 10.0.2 from bookworm-backports, unpacked by `qemu-scripts/fetch-qemu.sh` (a wrapper
/// script that runs it with its own firmware and no modules).
pub fn qemu_10() -> PathBuf {
    cache_dir().join("qemu-10/qemu-system-x86_64")
}

/// `qemu` itself, or what is missing and how to get it.
pub fn qemu_present(qemu: &Path) -> Result<(), String> {
    if qemu.is_file() {
        return Ok(());
    }
    let how = if qemu == Path::new(SYSTEM_QEMU) {
        "apt-get install qemu-system-x86 (qemu-scripts/build-guest.sh does it)"
    } else {
        "run qemu-scripts/fetch-qemu.sh"
    };
    Err(format!("QEMU {} missing: {how}", qemu.display()))
}

/// The test guest's kernel and initramfs (`qemu-scripts/build-guest.sh`).
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The test guest, or which file is missing and how to build it.
pub fn guest_image() -> Result<GuestImage, String> {
    let dir = cache_dir().join("guest");
    let image = GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
    };
    for f in [&image.kernel, &image.initrd] {
        if !f.is_file() {
            return Err(format!(
                "guest image {} missing: run qemu-scripts/build-guest.sh",
                f.display()
            ));
        }
    }
    Ok(image)
}

/// QEMU's version, from `--version` ("QEMU emulator version 7.2.22 (Debian ...)").
pub fn qemu_version(qemu: &Path) -> (u32, u32, u32) {
    let out = super::run(Command::new(qemu).arg("--version"));
    let version = out
        .split_once("version ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected `{} --version` output: {out}", qemu.display()));
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// Held while a test runs a VM: the tests of one binary boot their VMs one after another (this
/// machine has 2 cores; a guest under TCG takes one).
pub fn one_vm_at_a_time() -> MutexGuard<'static, ()> {
    static VM: Mutex<()> = Mutex::new(());
    // A test that failed while holding it leaves it poisoned; the next may still run.
    VM.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
