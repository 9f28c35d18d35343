//! What the running kernel offers the daemon: probed at start (never guessed from the version),
//! said once in the log and kept for the metrics (`vhost_user_tap_kernel_support{feature}`).
//!
//! The one use of the version number is the floor: kernels older than [`MIN_KERNEL`] are refused,
//! because the kernel lab (`qemu-scripts/kernel-lab.sh`) runs nothing older. README, "Supported
//! kernels", lists every kernel interface the daemon uses, the first kernel that has it and what
//! the daemon does without it.

use thiserror::Error;

use crate::tap::IFF_BACKPRESSURE;

/// The oldest kernel the daemon starts on: Debian 11's 5.10, the oldest the kernel lab runs.
pub const MIN_KERNEL: (u32, u32) = (5, 10);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KernelError {
    #[error(
        "Linux {0} is older than {major}.{minor}, the oldest kernel this daemon is tested on \
         (README, \"Supported kernels\")",
        major = MIN_KERNEL.0,
        minor = MIN_KERNEL.1
    )]
    TooOld(String),
    #[error("cannot read the kernel version from uname release {0:?}")]
    Unparsable(String),
}

/// The running kernel's release string (`uname -r`).
pub fn release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// (major, minor) of a release string such as `6.1.0-28-amd64`.
pub fn version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Refuse a kernel older than [`MIN_KERNEL`].
pub fn check_minimum(release: &str) -> Result<(), KernelError> {
    match version(release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        Some(_) => Err(KernelError::TooOld(release.to_string())),
        None => Err(KernelError::Unparsable(release.to_string())),
    }
}

/// How TX writes to the tap, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxPath {
    /// Batches through io_uring: a ring could be made and the tap takes its writes.
    IoUring,
    /// `--no-io-uring`: writev, io_uring not probed.
    Disabled,
    /// writev: no io_uring ring could be made (disabled by sysctl or a filter, or too old).
    NoRing(String),
    /// writev: a ring was made but the tap refuses its writes (tun before Linux 6.4).
    TapRefuses(String),
}

/// What the daemon found at start.
#[derive(Clone, Debug)]
pub struct KernelSupport {
    pub release: String,
    /// TUNGETFEATURES: the IFF_* flags tun understands.
    pub tun_features: u32,
    /// The `TUN_F_*` flags TUNSETOFFLOAD accepted.
    pub tun_offloads: u32,
    pub tx: TxPath,
}

impl KernelSupport {
    /// (feature, present) for the metrics. A feature that was not probed is left out.
    pub fn features(&self) -> Vec<(&'static str, bool)> {
        let off = |f: u32| self.tun_offloads & f == f;
        let mut v = vec![
            (
                "tun_multi_queue",
                self.tun_features & libc::IFF_MULTI_QUEUE as u32 != 0,
            ),
            (
                "tun_backpressure",
                self.tun_features & IFF_BACKPRESSURE as u32 != 0,
            ),
            ("tun_offload_csum", off(libc::TUN_F_CSUM)),
            ("tun_offload_tso", off(libc::TUN_F_TSO4 | libc::TUN_F_TSO6)),
            ("tun_offload_ecn", off(libc::TUN_F_TSO_ECN)),
            ("tun_offload_ufo", off(libc::TUN_F_UFO)),
            ("tun_offload_uso", off(libc::TUN_F_USO4 | libc::TUN_F_USO6)),
        ];
        match &self.tx {
            TxPath::IoUring => v.extend([("io_uring", true), ("io_uring_tap_writes", true)]),
            TxPath::TapRefuses(_) => v.extend([("io_uring", true), ("io_uring_tap_writes", false)]),
            TxPath::NoRing(_) => v.push(("io_uring", false)),
            TxPath::Disabled => {}
        }
        v
    }

    /// One line for the log: the kernel and what it lacks that the daemon would use.
    pub fn summary(&self) -> String {
        let missing: Vec<&str> = self
            .features()
            .into_iter()
            .filter(|&(_, present)| !present)
            .map(|(f, _)| f)
            .collect();
        format!(
            "kernel {}: {}",
            self.release,
            if missing.is_empty() {
                "has every feature the daemon uses".to_string()
            } else {
                format!(
                    "lacks {} (see README, \"Supported kernels\")",
                    missing.join(", ")
                )
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_distribution_release_strings() {
        assert_eq!(version("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(version("5.10.0-33-cloud-amd64"), Some((5, 10)));
        assert_eq!(version("7.3.4+deb13-cloud-amd64"), Some((7, 3)));
        assert_eq!(version("6.18.44-fc-v1272"), Some((6, 18)));
        assert_eq!(version("4.18.0-553.el8_10.x86_64"), Some((4, 18)));
        assert_eq!(version("garbage"), None);
    }

    #[test]
    fn kernels_older_than_the_floor_are_refused_by_name() {
        assert_eq!(check_minimum("5.10.0-33-amd64"), Ok(()));
        assert_eq!(check_minimum("6.1.0-28-amd64"), Ok(()));
        let e = check_minimum("5.4.0-150-generic").unwrap_err();
        assert_eq!(e, KernelError::TooOld("5.4.0-150-generic".into()));
        assert!(e.to_string().contains("older than 5.10"), "{e}");
        assert!(check_minimum("x").is_err());
    }

    #[test]
    fn unprobed_features_are_left_out_and_missing_ones_named() {
        let k = KernelSupport {
            release: "6.1.0".into(),
            tun_features: libc::IFF_MULTI_QUEUE as u32,
            tun_offloads: libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6,
            tx: TxPath::Disabled,
        };
        assert!(!k.features().iter().any(|(f, _)| f.starts_with("io_uring")));
        let s = k.summary();
        assert!(
            s.contains("tun_offload_uso") && s.contains("tun_backpressure"),
            "{s}"
        );
        let k = KernelSupport {
            tx: TxPath::TapRefuses("x".into()),
            ..k
        };
        assert!(k.features().contains(&("io_uring_tap_writes", false)));
    }
}
