//! vhost-user-tap: a vhost-user network backend between a Linux tap and a guest's virtio-net rings.
//!
//! Module map:
//! - [`config`]: command line and validated configuration.
//! - [`backpressure`]: IFF_BACKPRESSURE mode and the tap's qdisc.
//! - [`netlink`]: the tap's kernel and qdisc counters over rtnetlink.
//! - [`metrics`]: the Prometheus endpoint.
//! - [`tap`]: the tap device (the only ioctl code).
//! - [`kernel`]: what the running kernel offers, probed at start; the oldest kernel accepted.
//! - [`virtio_net`]: feature bits, header sizes, config space.
//! - [`memory`]: guest memory from SET_MEM_TABLE: checked, mapped, addresses translated.
//! - [`dirty_log`]: the migration dirty log (SET_LOG_BASE) and page marking.
//! - [`announce`]: the RARP a migrated guest is announced with (SEND_RARP).
//! - [`ring`]: device side of a split virtqueue on top of `virtio_queue::Queue`.
//! - [`pair`]: one queue pair's data path (RX, TX, tap queue, staging, TX ring, counters).
//! - [`rx`]: tap → guest, the stop/wake heart of the daemon.
//! - [`tx`]: guest → tap.
//! - [`worker`]: one thread per queue pair, its event loop.
//! - [`session`]: state of one frontend connection (memory, vrings, workers).
//! - [`protocol`]: vhost-user message framing and dispatch.
//! - [`device`]: what the daemon serves apart from any frontend: tap, offered features, pair slots.
//! - [`daemon`]: the session loop, signals, the watchdog.
//! - [`sys`]: signals as an fd, the listening socket, socket checks.
//! - [`systemd`]: socket activation, sd_notify readiness/stopping, the watchdog.
//! - [`seccomp`]: the syscall allow-list applied after setup.
//! - [`stats`]: per-queue-pair counters.
//! - [`ratelog`]: rate limiting for guest-triggered warnings.
// Lossy casts hide bugs on guest- and frontend-controlled numbers: in the daemon each remaining
// one says why it is exact (tests and benchmarks are exempt).
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

pub mod announce;
pub mod backpressure;
pub mod config;
pub mod daemon;
pub mod device;
pub mod dirty_log;
pub mod kernel;
pub mod memory;
pub mod metrics;
pub mod netlink;
pub mod pair;
pub mod protocol;
pub mod ratelog;
pub mod ring;
pub mod rx;
pub mod seccomp;
pub mod session;
pub mod stats;
pub mod sys;
pub mod systemd;
pub mod tap;
pub mod tx;
pub mod uring;
pub mod virtio_net;
pub mod worker;
