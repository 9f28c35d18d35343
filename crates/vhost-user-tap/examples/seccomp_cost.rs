//! What the seccomp filter costs per syscall: times a 64-byte writev to /dev/null (the TX path's
//! syscall) before and after installing the daemon's filters, or, with `--trivial`, an
//! allow-everything filter (the cost of the kernel's filtered syscall entry alone).
//!
//! `cargo run --release --example seccomp_cost [-- --trivial]`

use std::os::fd::AsRawFd;
use std::time::Instant;

const CALLS: u32 = 3_000_000;

fn ns_per_writev(fd: i32) -> f64 {
    let buf = [0u8; 64];
    let iov = [libc::iovec {
        iov_base: buf.as_ptr() as *mut _,
        iov_len: buf.len(),
    }];
    let t = Instant::now();
    for _ in 0..CALLS {
        // SAFETY: one iovec over a live buffer of the stated length.
        unsafe { libc::writev(fd, iov.as_ptr(), 1) };
    }
    t.elapsed().as_nanos() as f64 / f64::from(CALLS)
}

fn allow_everything() {
    // No rules: every syscall takes the mismatch action, allow (after the architecture check
    // every seccompiler filter has).
    let arch = seccompiler::TargetArch::try_from(std::env::consts::ARCH).expect("architecture");
    let filter = seccompiler::SeccompFilter::new(
        std::collections::BTreeMap::new(),
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .and_then(seccompiler::BpfProgram::try_from)
    .expect("building the filter");
    seccompiler::apply_filter(&filter).expect("installing the filter");
}

fn main() {
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let fd = null.as_raw_fd();
    let before: Vec<f64> = (0..3).map(|_| ns_per_writev(fd)).collect();
    let what = if std::env::args().any(|a| a == "--trivial") {
        allow_everything();
        "an allow-everything filter"
    } else {
        vhost_user_tap::seccomp::apply().expect("installing the daemon's filters");
        "the daemon's filters"
    };
    let after: Vec<f64> = (0..3).map(|_| ns_per_writev(fd)).collect();
    println!("writev to /dev/null, ns per call (3 rounds of {CALLS}):");
    println!("  no filter:   {before:.1?}");
    println!("  {what}: {after:.1?}");
}
