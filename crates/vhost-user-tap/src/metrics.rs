//! Prometheus metrics on `--metrics ADDR` (`127.0.0.1:PORT` or `unix:PATH`), GET /metrics.
//!
//! One scrape answers "where were frames lost, and how many": the daemon's own counters per queue
//! pair, the tap's kernel counters (tun's ring tail-drops are the tap's `tx_dropped`) and the root
//! qdisc's drops and backlog, read over netlink at scrape time. Names follow Prometheus
//! conventions: prefix `vhost_user_tap_`, base units, counters ending in `_total`, low-cardinality
//! labels (`queue="0"`, `tap`, `direction`, `reason`).
//!
//! The endpoint is served by [`http`], from one thread with bounded resources: at most 8
//! connections at once, 2 s from accept to close, 8 KiB of request head, accept errors survived
//! (see its Design section). Descriptors are budgeted so that metrics clients cannot take those
//! the vhost-user side needs: at start the server counts the open descriptors against
//! RLIMIT_NOFILE, keeps [`vhost_user_fd_reserve`] of them for the vhost-user side and allows only
//! as many metrics connections as fit in the rest ([`FdBudget`]); if not even one fits, the
//! daemon does not start.

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use log::{info, warn};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::netlink;
use crate::stats::{PairStats, COUNTERS};

pub mod http;

/// Where the metrics endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(MetricsAddr::Unix(p.into()));
        }
        s.parse()
            .map(MetricsAddr::Tcp)
            .map_err(|_| format!("{s:?} is neither IP:PORT nor unix:PATH"))
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsAddr::Tcp(a) => write!(f, "http://{a}/metrics"),
            MetricsAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What a scrape reads.
#[derive(Debug)]
pub struct Source {
    pub tap: String,
    pub pairs: Vec<Arc<PairStats>>,
    pub backpressure: bool,
    pub connected: Arc<AtomicBool>,
    pub kernel: crate::kernel::KernelSupport,
    pub frontend: Arc<crate::stats::FrontendStats>,
}

#[derive(Debug)]
struct Collector(Arc<Source>);

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Vec<(&str, String)>, u64)],
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Vec<(&str, String)>, i64)],
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let src = &self.0;
        let snaps: Vec<_> = src.pairs.iter().map(|p| p.snapshot()).collect();
        let q = |i: usize| vec![("queue", i.to_string())];
        let tap = || vec![("tap", src.tap.clone())];

        gauge(
            &mut enc,
            "build_info",
            "Build information.",
            &[(vec![("version", env!("CARGO_PKG_VERSION").to_string())], 1)],
        )?;
        gauge(
            &mut enc,
            "frontend_connected",
            "1 while a vhost-user frontend (QEMU) is connected.",
            &[(vec![], i64::from(src.connected.load(Ordering::Relaxed)))],
        )?;
        gauge(
            &mut enc,
            "backpressure",
            "1 when the tap has IFF_BACKPRESSURE: a full tun ring stops the queue instead of \
             tail-dropping.",
            &[(tap(), i64::from(src.backpressure))],
        )?;

        gauge(
            &mut enc,
            "kernel_support",
            "1 when the running kernel has this feature the daemon uses (probed at start; README, \
             Supported kernels).",
            &src.kernel
                .features()
                .into_iter()
                .map(|(f, present)| (vec![("feature", f.to_string())], i64::from(present)))
                .collect::<Vec<_>>(),
        )?;
        let uring = src.kernel.tx == crate::kernel::TxPath::IoUring;
        gauge(
            &mut enc,
            "tx_io_uring",
            "1 while this queue pair writes TX frames through io_uring, 0 while it uses writev.",
            &snaps
                .iter()
                .enumerate()
                .map(|(i, s)| (q(i), i64::from(uring && s.tx_io_uring_fallbacks == 0)))
                .collect::<Vec<_>>(),
        )?;

        // Every request the protocol knows, and the rest together as "other".
        let mut rejected: Vec<(Vec<(&str, String)>, u64)> = Vec::new();
        let mut other = 0;
        for (code, n) in src.frontend.rejected() {
            let known = u32::try_from(code)
                .ok()
                .and_then(|c| vhost::vhost_user::message::FrontendReq::try_from(c).ok());
            match known {
                Some(req) if code < crate::stats::REQUEST_SLOTS - 1 => {
                    rejected.push((vec![("request", format!("{req:?}"))], n))
                }
                _ => other += n,
            }
        }
        rejected.push((vec![("request", "other".to_string())], other));
        counter(
            &mut enc,
            "frontend_rejected_requests",
            "Requests from the frontend the daemon refused (failure reply, or the connection \
             closed over a malformed one), by request.",
            &rejected,
        )?;

        counter(
            &mut enc,
            "rarp_announces",
            "RARP broadcasts written into the tap to announce a migrated guest (SEND_RARP).",
            &[(vec![], src.frontend.announces())],
        )?;

        // One family per metric name, in declaration order; a series per pair and labels.
        let values: Vec<Vec<u64>> = snaps.iter().map(|s| s.values()).collect();
        let mut done: Vec<&str> = Vec::new();
        for c in COUNTERS {
            if done.contains(&c.metric) {
                continue;
            }
            done.push(c.metric);
            let mut series = Vec::new();
            for (pair, vals) in values.iter().enumerate() {
                for (k, member) in COUNTERS.iter().enumerate() {
                    if member.metric != c.metric {
                        continue;
                    }
                    let mut labels = q(pair);
                    labels.extend(member.labels.iter().map(|&(k, v)| (k, v.to_string())));
                    series.push((labels, vals[k]));
                }
            }
            counter(&mut enc, c.metric, c.help, &series)?;
        }

        let ifindex = match netlink::ifindex(&src.tap) {
            Ok(i) => i,
            Err(e) => {
                warn!("metrics: {e}");
                return Ok(());
            }
        };
        match netlink::link_counters(ifindex) {
            Ok(l) => {
                for (name, help, v) in [
                    (
                        "tap_tx_packets",
                        "Frames the kernel handed to the daemon through the tap.",
                        l.tx_packets,
                    ),
                    (
                        "tap_tx_dropped",
                        "Frames tun dropped before the daemon could read them (ring full: tail \
                         drop).",
                        l.tx_dropped,
                    ),
                    (
                        "tap_rx_packets",
                        "Frames the daemon wrote into the tap.",
                        l.rx_packets,
                    ),
                    (
                        "tap_rx_dropped",
                        "Frames the kernel dropped after the daemon wrote them.",
                        l.rx_dropped,
                    ),
                ] {
                    counter(&mut enc, name, help, &[(tap(), v)])?;
                }
            }
            Err(e) => warn!("metrics: tap counters: {e}"),
        }
        match netlink::root_qdisc(ifindex) {
            Ok(Some(qd)) => {
                let l = || vec![("tap", src.tap.clone()), ("qdisc", qd.kind.clone())];
                let with = |reason: &str| {
                    let mut v = l();
                    v.push(("reason", reason.to_string()));
                    v
                };
                counter(
                    &mut enc,
                    "qdisc_dropped_packets",
                    "Packets the tap's root qdisc dropped: reason=limit (queue full) or aqm \
                     (fq_codel's CoDel policy).",
                    &[
                        (with("limit"), qd.limit_drops),
                        (with("aqm"), qd.aqm_drops()),
                    ],
                )?;
                counter(
                    &mut enc,
                    "qdisc_packets",
                    "Packets the root qdisc sent.",
                    &[(l(), qd.packets)],
                )?;
                counter(
                    &mut enc,
                    "qdisc_requeues",
                    "Packets the root qdisc requeued.",
                    &[(l(), qd.requeues)],
                )?;
                counter(
                    &mut enc,
                    "qdisc_overlimits",
                    "Root qdisc overlimit events.",
                    &[(l(), qd.overlimits)],
                )?;
                gauge(
                    &mut enc,
                    "qdisc_backlog_bytes",
                    "Bytes queued in the root qdisc.",
                    &[(l(), i64::try_from(qd.backlog_bytes).unwrap_or(i64::MAX))],
                )?;
                gauge(
                    &mut enc,
                    "qdisc_backlog_packets",
                    "Packets queued in the root qdisc.",
                    &[(l(), i64::try_from(qd.backlog_packets).unwrap_or(i64::MAX))],
                )?;
            }
            Ok(None) => {}
            Err(e) => warn!("metrics: qdisc counters: {e}"),
        }
        Ok(())
    }
}

/// The OpenMetrics text format's content type.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Descriptors the vhost-user side may need at once beyond those open when the metrics server
/// starts (the tap's queues, the listener, io_uring rings and the signalfd are open by then):
/// the frontend connection, the session's and the daemon's epoll sets, one message's worth of
/// passed fds (vhost-user allows 32) on top of a memory table's 8 region fds kept while a new
/// table arrives, netlink and sd_notify sockets for a moment (45 in all, rounded up to 48), and
/// per queue pair the kick, call and error eventfds of both rings and the worker's epoll set,
/// stop eventfd and its clone (9, rounded up to 12). Generous on purpose: a metrics connection
/// refused is a retried scrape, a vhost-user fd refused is a dead NIC.
pub fn vhost_user_fd_reserve(pairs: usize) -> u64 {
    48 + 12 * u64::try_from(pairs).unwrap_or(u64::MAX / 24)
}

/// Descriptors a scrape opens for a moment (the netlink socket the kernel counters come from).
const SCRAPE_FDS: u64 = 1;

/// How many metrics connections fit beside everything else under the open-files limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdBudget {
    /// RLIMIT_NOFILE (soft).
    pub limit: u64,
    /// Descriptors open when the metrics server starts, its listener included.
    pub open: u64,
    /// Kept free for the vhost-user side ([`vhost_user_fd_reserve`]).
    pub reserve: u64,
}

impl FdBudget {
    /// The process's limit and open descriptors now.
    fn measure(pairs: usize) -> anyhow::Result<FdBudget> {
        let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .context("getrlimit(RLIMIT_NOFILE)")?;
        // The directory's own descriptor is listed too.
        let open = std::fs::read_dir("/proc/self/fd")
            .context("counting open descriptors in /proc/self/fd")?
            .count()
            .saturating_sub(1);
        Ok(FdBudget {
            limit: soft,
            open: u64::try_from(open).unwrap_or(u64::MAX),
            reserve: vhost_user_fd_reserve(pairs),
        })
    }

    /// Metrics connections allowed at once: what is left under the limit after the open
    /// descriptors, the server's own ([`http::OWN_FDS`]), a scrape's and the reserve, at most
    /// [`http::MAX_CONNECTIONS`].
    pub fn connections(&self) -> usize {
        let own = u64::try_from(http::OWN_FDS).unwrap_or(u64::MAX);
        let left = self
            .limit
            .saturating_sub(self.open)
            .saturating_sub(own + SCRAPE_FDS)
            .saturating_sub(self.reserve);
        usize::try_from(left).map_or(http::MAX_CONNECTIONS, |l| l.min(http::MAX_CONNECTIONS))
    }
}

/// The metrics endpoint: its server thread, stopped and joined on drop (the unix socket file
/// is removed after).
pub struct MetricsServer {
    server: Option<http::Server>,
    addr: MetricsAddr,
}

impl MetricsServer {
    pub fn start(addr: &MetricsAddr, source: Arc<Source>) -> anyhow::Result<MetricsServer> {
        let (listener, bound) = match addr {
            MetricsAddr::Tcp(a) => {
                let l = TcpListener::bind(a).with_context(|| format!("--metrics {addr}"))?;
                let bound = MetricsAddr::Tcp(l.local_addr()?);
                (http::Listener::Tcp(l), bound)
            }
            MetricsAddr::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p).with_context(|| format!("--metrics {addr}"))?;
                (http::Listener::Unix(l), addr.clone())
            }
        };
        let budget = FdBudget::measure(source.pairs.len())?;
        let max_connections = budget.connections();
        if max_connections == 0 {
            if let MetricsAddr::Unix(p) = addr {
                let _ = std::fs::remove_file(p);
            }
            anyhow::bail!(
                "--metrics: the open-files limit (RLIMIT_NOFILE {}) leaves no descriptor for a \
                 metrics connection: {} are open, {} are kept for the vhost-user side and {} \
                 for the metrics server itself; raise it (systemd: LimitNOFILE=, shell: \
                 ulimit -n) to at least {}",
                budget.limit,
                budget.open,
                budget.reserve,
                http::OWN_FDS as u64 + SCRAPE_FDS,
                budget.open + budget.reserve + http::OWN_FDS as u64 + SCRAPE_FDS + 1
            );
        }
        let limits = http::Limits {
            max_connections,
            ..http::Limits::default()
        };
        let mut registry = Registry::with_prefix("vhost_user_tap");
        registry.register_collector(Box::new(Collector(source)));
        let resource = http::Resource {
            path: "/metrics",
            content_type: OPENMETRICS,
            body: Box::new(move || {
                let mut body = String::new();
                prometheus_client::encoding::text::encode(&mut body, &registry)
                    .map_err(|e| format!("encoding the metrics failed: {e}"))?;
                Ok(body)
            }),
        };
        let server = http::Server::spawn("vut-metrics", listener, limits, resource)
            .with_context(|| format!("--metrics {addr}: starting the server"))?;
        info!(
            "metrics on {bound}: at most {max_connections} connections at once, {:?} each, \
             request heads up to {} bytes (RLIMIT_NOFILE {}: {} fds open, {} kept for the \
             vhost-user side)",
            limits.deadline, limits.max_head, budget.limit, budget.open, budget.reserve
        );
        Ok(MetricsServer {
            server: Some(server),
            addr: bound,
        })
    }

    pub fn addr(&self) -> &MetricsAddr {
        &self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.take();
        if let MetricsAddr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_connections_fit_under_the_open_files_limit_beside_the_reserve() {
        let b = |limit, open| FdBudget {
            limit,
            open,
            reserve: vhost_user_fd_reserve(1),
        };
        assert_eq!(vhost_user_fd_reserve(1), 60);
        assert_eq!(vhost_user_fd_reserve(4), 96);
        assert_eq!(b(1024, 20).connections(), http::MAX_CONNECTIONS);
        assert_eq!(b(u64::MAX, 20).connections(), http::MAX_CONNECTIONS);
        // 20 open + 60 reserve + 3 own + 1 scrape = 84.
        assert_eq!(b(86, 20).connections(), 2);
        assert_eq!(b(85, 20).connections(), 1);
        assert_eq!(b(84, 20).connections(), 0);
        assert_eq!(b(10, 20).connections(), 0);
    }

    #[test]
    fn metrics_addresses_parse() {
        assert_eq!(
            "127.0.0.1:9100".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Tcp("127.0.0.1:9100".parse().unwrap())
        );
        assert_eq!(
            "unix:/run/x.sock".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Unix("/run/x.sock".into())
        );
        assert!("unix:".parse::<MetricsAddr>().is_err());
        assert!("localhost".parse::<MetricsAddr>().is_err());
    }

    #[test]
    fn daemon_counters_are_exposed_with_prefix_and_queue_label() {
        let stats = Arc::new(PairStats::default());
        crate::stats::add(&stats.rx_frames, 5);
        crate::stats::add(&stats.tx_dropped_tap_error, 2);
        let mut registry = Registry::with_prefix("vhost_user_tap");
        registry.register_collector(Box::new(Collector(Arc::new(Source {
            tap: "no-such-tap0".into(),
            pairs: vec![stats],
            backpressure: false,
            connected: Arc::new(AtomicBool::new(true)),
            kernel: crate::kernel::KernelSupport {
                release: "6.1.0".into(),
                tun_features: 0,
                tun_offloads: libc::TUN_F_CSUM,
                tx: crate::kernel::TxPath::TapRefuses("EOPNOTSUPP".into()),
            },
            frontend: Arc::default(),
        }))));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains("vhost_user_tap_rx_frames_total{queue=\"0\"} 5"),
            "{out}"
        );
        assert!(
            out.contains(
                "vhost_user_tap_daemon_dropped_frames_total{queue=\"0\",direction=\"tx\",reason=\"tap_error\"} 2"
            ),
            "{out}"
        );
        assert!(out.contains("vhost_user_tap_frontend_connected 1"), "{out}");
        for line in [
            "vhost_user_tap_kernel_support{feature=\"tun_offload_csum\"} 1",
            "vhost_user_tap_kernel_support{feature=\"tun_offload_uso\"} 0",
            "vhost_user_tap_kernel_support{feature=\"io_uring_tap_writes\"} 0",
            "vhost_user_tap_tx_io_uring{queue=\"0\"} 0",
        ] {
            assert!(out.contains(line), "{line} missing in {out}");
        }
        assert!(out.contains("vhost_user_tap_build_info{version="), "{out}");
    }
}
