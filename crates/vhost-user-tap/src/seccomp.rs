//! The seccomp allow-list, applied to every thread once setup is done.
//!
//! A guest drives this daemon's datapath, so after the tap, the listener, the signalfd and the
//! metrics endpoint exist the process is limited to the syscalls that serving needs: the session
//! loop (accept4, recvmsg with SCM_RIGHTS, write), guest memory (mmap/munmap at
//! SET_MEM_TABLE), epoll and eventfds, readv/writev (and `io_uring_enter` on rings made before the
//! filter that can only write the tap, see `uring.rs`) and three tun ioctls on the tap, worker thread
//! creation, the metrics thread (HTTP over an already bound socket, rtnetlink queries) and
//! sd_notify. [`ALLOWED`] lists each syscall with the reason it is there.
//!
//! # Design
//! - **Default action: fail with EPERM** rather than kill. Both deny the syscall; the difference
//!   is what a gap in the list costs. The daemon checks every syscall result, so a refused call
//!   becomes a log line naming the failed step ("... : Operation not permitted") and, at worst,
//!   the end of one frontend session or one metrics scrape, while the VM's network keeps running;
//!   libc itself shrugs off some refusals (glibc ignores a failed rt_sigaction at the first
//!   thread start, the one gap the test suite found). A kill would be a SIGSYS with no line from
//!   the daemon (only `status=31/SYS` in the journal) that takes the VM's NIC down until systemd
//!   restarts it. An attacker gains nothing from EPERM: the call still does not happen. The log
//!   line at start says the filter is on and what it refuses.
//! - **Arguments are checked where that is cheap and meaningful**: `ioctl` only with the tun and
//!   socket requests the daemon issues after setup (no TUNSETIFF: no other tap can be attached);
//!   `socket` only AF_UNIX (sd_notify, glibc's interface lookup) and AF_NETLINK/NETLINK_ROUTE;
//!   `clone` only with the flags glibc uses for a thread; `mmap`/`mprotect` never with PROT_EXEC
//!   (W^X, like the unit's MemoryDenyWriteExecute=); `prctl` only PR_SET_NAME (thread names).
//! - `clone3` passes its flags in memory that a filter cannot read, so a filter of its own,
//!   installed first, answers it with ENOSYS and glibc falls back to `clone`, whose flags are
//!   checked (systemd does the same for RestrictNamespaces=). The allow-list, installed second,
//!   lets clone3 through to that answer: the kernel takes the strictest result of all filters,
//!   and ERRNO beats ALLOW. Installing the allow-list last also means neither `seccomp` nor
//!   `prctl(PR_SET_NO_NEW_PRIVS)` has to stay allowed.
//! - Filters are per thread: the metrics thread exists before the filter, so it is installed with
//!   SECCOMP_FILTER_FLAG_TSYNC on every thread; threads started later inherit it.
//!
//! # Limitations
//! - x86_64 and aarch64 only (the syscall numbers are the build target's); elsewhere the daemon
//!   refuses to start unless `--no-seccomp` is given. The list was traced on x86_64 (Debian 12,
//!   glibc 2.36); the aarch64 variant differs only where that architecture lacks a legacy syscall
//!   and is untested.
//! - A syscall added by a future libc or std for an existing operation is refused until it is
//!   listed here; the test suite runs with the filter on to catch that.

use std::collections::BTreeMap;

use log::{error, info};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("seccomp: this architecture ({0}) has no syscall list; run with --no-seccomp")]
    Arch(&'static str),
    #[error("seccomp: building the filter: {0}")]
    Build(seccompiler::BackendError),
    #[error("seccomp: installing the {0} filter on all threads: {1}")]
    Apply(&'static str, seccompiler::Error),
}

/// What a syscall's arguments must look like to be allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Args {
    /// Any arguments.
    Any,
    /// `ioctl(fd, req, ..)` with `req` one of [`IOCTLS`].
    Ioctl,
    /// `socket(AF_UNIX, ..)` or `socket(AF_NETLINK, .., NETLINK_ROUTE)`.
    Socket,
    /// `clone(flags, ..)` with exactly glibc's pthread_create flags.
    CloneThread,
    /// `mmap`/`mprotect` without PROT_EXEC in the `prot` argument (index 2).
    NoExec,
    /// `prctl(PR_SET_NAME, ..)`.
    PrctlSetName,
    /// `io_uring_register(ring, IORING_UNREGISTER_FILES, ..)`.
    UringUnregisterFiles,
}

/// One allowed syscall: name (as in syscalls(2) and `systemd-analyze syscall-filter`), number on
/// this architecture, argument constraint, why the daemon needs it after setup.
pub type Allowed = (&'static str, i64, Args, &'static str);

macro_rules! sys {
    ($name:ident, $args:expr, $why:expr) => {
        (stringify!($name), sys_nr::$name, $args, $why)
    };
}

/// Syscall numbers by name, for this architecture.
#[allow(non_upper_case_globals)]
mod sys_nr {
    macro_rules! nrs {
        ($($name:ident => $nr:ident),* $(,)?) => { $(pub const $name: i64 = libc::$nr;)* };
    }
    nrs! {
        accept4 => SYS_accept4, bind => SYS_bind, brk => SYS_brk,
        clock_gettime => SYS_clock_gettime, clone => SYS_clone, clone3 => SYS_clone3,
        close => SYS_close, connect => SYS_connect, epoll_create1 => SYS_epoll_create1,
        epoll_ctl => SYS_epoll_ctl, eventfd2 => SYS_eventfd2, exit => SYS_exit,
        exit_group => SYS_exit_group, fcntl => SYS_fcntl, futex => SYS_futex,
        getrandom => SYS_getrandom,
        getsockname => SYS_getsockname, gettid => SYS_gettid, ioctl => SYS_ioctl,
        madvise => SYS_madvise, mmap => SYS_mmap, mprotect => SYS_mprotect, mremap => SYS_mremap,
        munmap => SYS_munmap, prctl => SYS_prctl, read => SYS_read, readv => SYS_readv,
        recvfrom => SYS_recvfrom, recvmsg => SYS_recvmsg, restart_syscall => SYS_restart_syscall,
        io_uring_enter => SYS_io_uring_enter, io_uring_register => SYS_io_uring_register,
        rseq => SYS_rseq,
        rt_sigaction => SYS_rt_sigaction, rt_sigprocmask => SYS_rt_sigprocmask,
        rt_sigreturn => SYS_rt_sigreturn, sched_getaffinity => SYS_sched_getaffinity,
        sendto => SYS_sendto, set_robust_list => SYS_set_robust_list, shutdown => SYS_shutdown,
        sigaltstack => SYS_sigaltstack, socket => SYS_socket, write => SYS_write,
        writev => SYS_writev,
    }
    #[cfg(target_arch = "x86_64")]
    nrs! { epoll_wait => SYS_epoll_wait, unlink => SYS_unlink }
    nrs! { newfstatat => SYS_newfstatat }
    #[cfg(not(target_arch = "x86_64"))]
    nrs! { epoll_pwait => SYS_epoll_pwait, unlinkat => SYS_unlinkat }
    #[cfg(not(target_arch = "x86_64"))]
    nrs! { newfstatat => SYS_newfstatat }
}

/// The allow-list. Every entry says why. Found by tracing the whole test suite (`strace -f`,
/// everything after the filter is installed) with the filter on, plus metrics over TCP by hand.
/// Kept although no trace showed them, because std or glibc take those paths under conditions
/// the tests do not create: mremap, rt_sigreturn, restart_syscall, clock_gettime, getrandom.
/// `tests/systemd.rs` checks that the unit's SystemCallFilter= allows all of them.
#[rustfmt::skip]
pub const ALLOWED: &[Allowed] = &[
    // The session loop: frontends, vhost-user messages, replies.
    sys!(accept4,           Args::Any,          "accept a frontend / a metrics client"),
    sys!(recvmsg,           Args::Any,          "vhost-user messages with SCM_RIGHTS fds"),
    sys!(read,              Args::Any,          "message bodies, eventfds, signalfd, HTTP"),
    sys!(write,             Args::Any,          "replies, eventfds, log lines, HTTP, sd_notify"),
    sys!(close,             Args::Any,          "fds from the frontend, sockets, eventfds"),
    sys!(fcntl,             Args::Any,          "eventfd clones, O_NONBLOCK on frontend fds/metrics"),
    sys!(newfstatat,        Args::Any,          "frontend fds: eventfd? memory file size (fstat)"),
    // The tap.
    sys!(readv,             Args::Any,          "frames from the tap into guest buffers"),
    sys!(writev,            Args::Any,          "frames from guest buffers to the tap"),
    sys!(io_uring_enter,    Args::Any,          "TX batches on rings that can only write the tap"),
    sys!(io_uring_register, Args::UringUnregisterFiles, "let go of the tap at exit (only this)"),
    sys!(ioctl,             Args::Ioctl,        "only the requests in IOCTLS"),
    // Event loops and notifications.
    sys!(epoll_create1,     Args::Any,          "one epoll per session and per worker"),
    sys!(epoll_ctl,         Args::Any,          "tap, kick, call, stop fds; metrics sockets"),
    #[cfg(target_arch = "x86_64")]
    sys!(epoll_wait,        Args::Any,          "every event loop"),
    #[cfg(not(target_arch = "x86_64"))]
    sys!(epoll_pwait,       Args::Any,          "every event loop (libc's epoll_wait)"),
    sys!(eventfd2,          Args::Any,          "a stop eventfd per worker"),
    // Netlink (tap/qdisc counters per scrape, qdisc check per connect), sd_notify, metrics HTTP.
    sys!(socket,            Args::Socket,       "netlink; AF_UNIX: sd_notify, if_nametoindex"),
    sys!(bind,              Args::Any,          "netlink socket port"),
    sys!(getsockname,       Args::Any,          "netlink port id"),
    sys!(connect,           Args::Any,          "netlink kernel address, NOTIFY_SOCKET"),
    sys!(sendto,            Args::Any,          "netlink requests, sd_notify, metrics replies"),
    sys!(recvfrom,          Args::Any,          "netlink replies, metrics requests"),
    sys!(shutdown,          Args::Any,          "metrics connections: end of the reply"),
    // Guest memory and the allocator.
    sys!(mmap,              Args::NoExec,       "guest memory (SET_MEM_TABLE), allocator, stacks"),
    sys!(munmap,            Args::Any,          "guest memory, allocator, thread stacks"),
    sys!(mprotect,          Args::NoExec,       "allocator arenas, thread stack guard pages"),
    sys!(madvise,           Args::Any,          "releasing an exited thread's stack (glibc)"),
    sys!(mremap,            Args::Any,          "growing a large allocation (glibc realloc)"),
    sys!(brk,               Args::Any,          "allocator (main arena)"),
    // Threads: per-queue-pair workers (the metrics thread is started before the filter).
    sys!(clone,             Args::CloneThread,  "thread creation (glibc's fallback from clone3)"),
    sys!(clone3,            Args::Any,          "answered ENOSYS by the clone3 filter"),
    sys!(set_robust_list,   Args::Any,          "thread start (glibc)"),
    sys!(rseq,              Args::Any,          "thread start (glibc)"),
    sys!(sched_getaffinity, Args::Any,          "thread start (std: pthread_getattr_np)"),
    sys!(gettid,            Args::Any,          "thread start (std)"),
    sys!(sigaltstack,       Args::Any,          "thread start/exit (std's stack overflow guard)"),
    sys!(rt_sigprocmask,    Args::Any,          "thread start/exit (glibc)"),
    sys!(rt_sigaction,      Args::Any,          "first thread: glibc's SIGSETXID handler"),
    sys!(rt_sigreturn,      Args::Any,          "return from glibc's internal signal handlers"),
    sys!(prctl,             Args::PrctlSetName, "thread names (PR_SET_NAME only)"),
    sys!(futex,             Args::Any,          "locks, channels, thread joins"),
    sys!(exit,              Args::Any,          "thread exit"),
    sys!(exit_group,        Args::Any,          "process exit"),
    sys!(restart_syscall,   Args::Any,          "resuming a futex wait after SIGSTOP/SIGCONT"),
    // Time, randomness, files.
    sys!(clock_gettime,     Args::Any,          "timestamps when the vDSO falls back"),
    sys!(getrandom,         Args::Any,          "HashMap keys in new threads (std needs it)"),
    #[cfg(target_arch = "x86_64")]
    sys!(unlink,            Args::Any,          "our own --socket-path / metrics socket at exit"),
    #[cfg(not(target_arch = "x86_64"))]
    sys!(unlinkat,          Args::Any,          "our own --socket-path / metrics socket at exit"),
];

/// An ioctl request number as the filter compares it (`libc::Ioctl` is `c_ulong` on glibc and
/// `c_int` on musl; the kernel reads it as an unsigned int, so the low 32 bits decide).
#[allow(clippy::unnecessary_cast)]
const fn req(r: libc::Ioctl) -> u64 {
    r as u64
}

/// The ioctl requests allowed after setup: the tun ones the session issues (SET_FEATURES sets
/// the vnet header size and offloads; vring enable/disable attaches/detaches multiqueue queues)
/// and SIOCGIFINDEX, which glibc's if_nametoindex uses for the qdisc check and metrics.
pub const IOCTLS: &[(&str, u64)] = &[
    ("TUNSETVNETHDRSZ", req(libc::TUNSETVNETHDRSZ)),
    ("TUNSETOFFLOAD", req(libc::TUNSETOFFLOAD)),
    ("TUNSETQUEUE", req(libc::TUNSETQUEUE)),
    ("SIOCGIFINDEX", req(libc::SIOCGIFINDEX)),
];

/// glibc's pthread_create clone flags (sysdeps/unix/sysv/linux/createthread.c).
const CLONE_THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

/// What a forbidden syscall returns.
pub const REFUSED_ERRNO: i32 = libc::EPERM;

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(SeccompError::Build)
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conds).map_err(SeccompError::Build)
}

fn rules(args: Args) -> Result<Vec<SeccompRule>, SeccompError> {
    use SeccompCmpOp::{Eq, MaskedEq};
    Ok(match args {
        Args::Any => vec![],
        Args::Ioctl => IOCTLS
            .iter()
            .map(|&(_, req)| rule(vec![cond(1, Eq, req)?]))
            .collect::<Result<_, _>>()?,
        Args::Socket => vec![
            rule(vec![cond(0, Eq, libc::AF_UNIX as u64)?])?,
            rule(vec![
                cond(0, Eq, libc::AF_NETLINK as u64)?,
                cond(2, Eq, libc::NETLINK_ROUTE as u64)?,
            ])?,
        ],
        Args::CloneThread => vec![rule(vec![cond(0, Eq, CLONE_THREAD_FLAGS)?])?],
        Args::NoExec => vec![rule(vec![cond(2, MaskedEq(libc::PROT_EXEC as u64), 0)?])?],
        Args::PrctlSetName => vec![rule(vec![cond(0, Eq, libc::PR_SET_NAME as u64)?])?],
        Args::UringUnregisterFiles => vec![rule(vec![cond(
            1,
            Eq,
            u64::from(crate::uring::IORING_UNREGISTER_FILES),
        )?])?],
    })
}

fn arch() -> Result<TargetArch, SeccompError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(TargetArch::x86_64),
        "aarch64" => Ok(TargetArch::aarch64),
        other => Err(SeccompError::Arch(other)),
    }
}

/// The two BPF programs in installation order: clone3 → ENOSYS, then the allow-list (anything
/// else: EPERM).
pub fn programs() -> Result<[BpfProgram; 2], SeccompError> {
    let arch = arch()?;
    let mut map = BTreeMap::new();
    for &(_, nr, args, _) in ALLOWED {
        map.insert(nr, rules(args)?);
    }
    let allow = SeccompFilter::new(
        map,
        SeccompAction::Errno(REFUSED_ERRNO as u32),
        SeccompAction::Allow,
        arch,
    )
    .and_then(BpfProgram::try_from)
    .map_err(SeccompError::Build)?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .and_then(BpfProgram::try_from)
    .map_err(SeccompError::Build)?;
    Ok([clone3, allow])
}

/// Install the filters on every thread of the process. Irreversible.
pub fn apply() -> Result<(), SeccompError> {
    let [clone3, allow] = programs()?;
    // Each installation first sets PR_SET_NO_NEW_PRIVS, which the allow-list forbids: it goes
    // last (see the module docs for why clone3 still gets ENOSYS).
    seccompiler::apply_filter_all_threads(&clone3).map_err(|e| SeccompError::Apply("clone3", e))?;
    seccompiler::apply_filter_all_threads(&allow)
        .map_err(|e| SeccompError::Apply("allow-list", e))?;
    info!(
        "seccomp: {} syscalls allowed (ioctl only {}); any other fails with EPERM \
         (--no-seccomp turns this off)",
        ALLOWED.len(),
        IOCTLS
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// Hidden test hook: with this set to 1 the daemon runs [`selftest`] right after installing the
/// filter and exits with its status.
pub const SELFTEST_ENV: &str = "VHOST_USER_TAP_SECCOMP_SELFTEST";
/// Self-test exit status: every forbidden probe was refused with EPERM.
pub const SELFTEST_REFUSED: u8 = 3;
/// Self-test exit status: at least one forbidden probe went through (no filter?).
pub const SELFTEST_ALLOWED: u8 = 4;

pub fn selftest_requested() -> bool {
    std::env::var(SELFTEST_ENV).as_deref() == Ok("1")
}

/// Attempt three syscalls the filter forbids, each harmless if it went through: `ptrace` (not
/// on the list; without a filter the kernel answers ESRCH for a process we do not trace),
/// `socket(AF_INET6)` (address family not allowed; without a filter it succeeds) and
/// `ioctl(-1, TUNSETIFF)` (request not allowed: no attaching another tap; without a filter
/// EBADF). Logs each outcome; returns [`SELFTEST_REFUSED`] when all three got EPERM.
pub fn selftest() -> u8 {
    let errno = |r: i64| {
        if r < 0 {
            std::io::Error::last_os_error()
        } else {
            std::io::Error::from_raw_os_error(0)
        }
    };
    let mut probes = Vec::new();
    // SAFETY: PTRACE_PEEKDATA on pid 1 with null address and data: the kernel refuses it (not our
    // tracee) before touching memory; nothing of ours is read or written.
    let r = unsafe {
        libc::syscall(
            libc::SYS_ptrace,
            libc::PTRACE_PEEKDATA,
            1,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    probes.push(("ptrace(PTRACE_PEEKDATA, 1)", r, errno(r)));
    // SAFETY: plain socket creation; a descriptor we get back is closed right away.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    let e = errno(i64::from(fd));
    if fd >= 0 {
        // SAFETY: `fd` is the socket just created and owned by nobody else.
        unsafe { libc::close(fd) };
    }
    probes.push(("socket(AF_INET6, SOCK_DGRAM)", i64::from(fd), e));
    // SAFETY: fd -1 is never valid, so the kernel cannot act on any device; `ifr` is a zeroed
    // ifreq that outlives the call.
    let r = unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        libc::ioctl(-1, libc::TUNSETIFF, &mut ifr)
    };
    probes.push(("ioctl(-1, TUNSETIFF)", i64::from(r), errno(i64::from(r))));
    let mut all_refused = true;
    for (what, r, e) in probes {
        if r < 0 && e.raw_os_error() == Some(REFUSED_ERRNO) {
            info!("seccomp self-test: {what} refused: {e}");
        } else {
            all_refused = false;
            let outcome = if r < 0 {
                format!("failed otherwise: {e}")
            } else {
                format!("succeeded, returned {r}")
            };
            error!("seccomp self-test: {what} was not refused by a filter ({outcome})");
        }
    }
    if all_refused {
        SELFTEST_REFUSED
    } else {
        SELFTEST_ALLOWED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_and_every_entry_is_listed_once() {
        let [clone3, allow] = programs().unwrap();
        assert!(!allow.is_empty() && !clone3.is_empty());
        let mut names: Vec<_> = ALLOWED.iter().map(|a| a.0).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a syscall is listed twice");
        let mut nrs: Vec<_> = ALLOWED.iter().map(|a| a.1).collect();
        nrs.sort_unstable();
        nrs.dedup();
        assert_eq!(before, nrs.len(), "two names map to one number");
    }

    #[test]
    fn dangerous_syscalls_are_not_listed() {
        for nr in [
            libc::SYS_ptrace,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_openat,
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_bpf,
            libc::SYS_seccomp,
            // A new or widened ring would do I/O the filter never sees (see uring.rs).
            libc::SYS_io_uring_setup,
            libc::SYS_process_vm_writev,
            libc::SYS_init_module,
        ] {
            assert!(
                ALLOWED.iter().all(|a| a.1 != nr),
                "syscall {nr} must not be allowed"
            );
        }
        assert!(IOCTLS.iter().all(|i| i.1 != req(libc::TUNSETIFF)));
    }
}
