//! Prometheus metrics on `--metrics ADDR` (`127.0.0.1:PORT` or `unix:PATH`), GET /metrics.
//!
//! One scrape answers "where were frames lost, and how many": the daemon's own counters per queue
//! pair, the tap's kernel counters (tun's ring tail-drops are the tap's `tx_dropped`) and the root
//! qdisc's drops and backlog, read over netlink at scrape time. Names follow Prometheus
//! conventions: prefix `vhost_user_tap_`, base units, counters ending in `_total`, low-cardinality
//! labels (`queue="0"`, `tap`, `direction`, `reason`).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

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

/// The metrics endpoint's thread; stopped on drop.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    addr: MetricsAddr,
}

impl MetricsServer {
    pub fn start(addr: &MetricsAddr, source: Arc<Source>) -> anyhow::Result<MetricsServer> {
        let server = match addr {
            MetricsAddr::Tcp(a) => tiny_http::Server::http(a),
            MetricsAddr::Unix(p) => {
                let _ = std::fs::remove_file(p);
                tiny_http::Server::http_unix(p)
            }
        }
        .map_err(|e| anyhow::anyhow!("--metrics {addr}: {e}"))?;
        let server = Arc::new(server);
        let mut registry = Registry::with_prefix("vhost_user_tap");
        registry.register_collector(Box::new(Collector(source)));
        let srv = server.clone();
        let thread = std::thread::Builder::new()
            .name("vut-metrics".into())
            .spawn(move || serve(&srv, &registry))?;
        let addr = match server.server_addr() {
            tiny_http::ListenAddr::IP(a) => MetricsAddr::Tcp(a),
            _ => addr.clone(),
        };
        info!("metrics on {addr}");
        Ok(MetricsServer {
            server,
            thread: Some(thread),
            addr,
        })
    }

    pub fn addr(&self) -> &MetricsAddr {
        &self.addr
    }
}

fn serve(server: &tiny_http::Server, registry: &Registry) {
    for req in server.incoming_requests() {
        let resp = if req.method() == &tiny_http::Method::Get && req.url() == "/metrics" {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => tiny_http::Response::from_string(body).with_header(
                    tiny_http::Header::from_bytes(
                        "Content-Type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .expect("static header"),
                ),
                Err(_) => tiny_http::Response::from_string("encoding failed").with_status_code(500),
            }
        } else {
            tiny_http::Response::from_string("GET /metrics\n").with_status_code(404)
        };
        let _ = req.respond(resp);
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let MetricsAddr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
