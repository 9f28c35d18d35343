//! What the daemon serves, apart from any one frontend: the tap's queues, what the kernel offers,
//! the virtio features on offer, and every queue pair's slot (its tap queue, counters, and what a
//! stopped pair keeps). Built once at start; sessions borrow it.

use std::io;
use std::sync::Arc;

use anyhow::Context;
use log::{debug, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backpressure;
use crate::config::Config;
use crate::kernel::{KernelSupport, TxPath};
use crate::pair::PairRest;
use crate::stats::{FrontendStats, PairStats};
use crate::tap::Tap;
use crate::uring::{Op, RxRing, TapRing, TxRing};
use crate::virtio_net::{self, GUEST_OFFLOADS};

/// What `Device::open` found besides the device.
pub struct Opened {
    pub device: Device,
    /// Whether IFF_BACKPRESSURE is in force on the tap.
    pub backpressure: bool,
    pub kernel: KernelSupport,
}

/// Daemon-level state of one queue pair: outlives sessions.
pub struct PairSlot {
    pub tap: Arc<Tap>,
    pub stats: Arc<PairStats>,
    /// What the pair keeps between runs (a staged frame, the TX io_uring); `None` while a worker
    /// runs the pair.
    pub rest: Option<PairRest>,
    /// Whether the tap queue is attached (multiqueue): the kernel steers flows only to attached
    /// queues, so only pairs whose RX ring runs are attached. Queue 0 always is, so a tap with
    /// no reader behaves like a single-queue tap.
    pub attached: bool,
}

/// What the daemon knows before any frontend connects.
pub struct Device {
    pub config: Config,
    pub pairs: Vec<PairSlot>,
    /// Virtio features offered (depends on what the tap supports).
    pub offered: u64,
    /// Written by a worker whose tap failed: the daemon cannot go on.
    pub fatal: Arc<EventFd>,
    /// What frontends sent that was refused.
    pub frontend: Arc<FrontendStats>,
}

impl Device {
    /// Open the tap (backpressure mode, qdisc), find out what the kernel offers (offloads, TX
    /// through io_uring) and set up every pair's slot: what the daemon knows before any frontend
    /// connects. Must run before seccomp (io_uring rings, TUNSETIFF).
    pub fn open(config: Config, release: String) -> anyhow::Result<Opened> {
        let tun_features = crate::tap::tun_features()?;
        let (taps, backpressure) = backpressure::open_tap(
            &config.tap,
            config.queue_pairs,
            config.backpressure,
            tun_features,
        )?;
        if let Some(kind) = &config.qdisc {
            backpressure::install_qdisc(&config.tap, kind)?;
        }
        backpressure::check_qdisc(&config.tap, backpressure);
        let groups: Vec<u32> = GUEST_OFFLOADS.iter().map(|&(_, t)| t).collect();
        let tun_offloads = taps[0].probe_offloads(&groups);
        let offered = virtio_net::offered_features(tun_offloads, taps.len());
        let (rings, tx_path) = tap_rings(&config, &taps);
        let kernel = KernelSupport {
            release,
            tun_features,
            tun_offloads,
            tx: tx_path,
        };
        info!("{}", kernel.summary());
        let mut pairs: Vec<PairSlot> = taps
            .into_iter()
            .zip(rings)
            .map(|(t, (tx_ring, rx_ring))| PairSlot {
                tap: Arc::new(t),
                stats: Arc::new(PairStats::default()),
                rest: Some(PairRest {
                    carry: Default::default(),
                    tx_ring,
                    rx_ring,
                }),
                attached: true,
            })
            .collect();
        // A fresh multiqueue tap has every queue attached; until the guest enables a pair only
        // queue 0 may receive flows.
        for slot in pairs.iter_mut().skip(1) {
            slot.tap.set_attached(false)?;
            slot.attached = false;
        }
        let fatal = Arc::new(EventFd::new(EFD_NONBLOCK).context("creating eventfd")?);
        Ok(Opened {
            device: Device {
                config,
                pairs,
                offered,
                fatal,
                frontend: Arc::default(),
            },
            backpressure,
            kernel,
        })
    }

    /// Attach pair `p`'s tap queue while its RX ring runs, detach it otherwise (never pair 0).
    pub fn sync_attach(&mut self, p: usize, reading: bool) {
        let want = reading || p == 0;
        let multi = self.pairs.len() > 1;
        let slot = &mut self.pairs[p];
        if multi && slot.attached != want {
            match slot.tap.set_attached(want) {
                Ok(()) => {
                    slot.attached = want;
                    debug!(
                        "queue pair {p}: tap queue {}",
                        if want { "attached" } else { "detached" }
                    );
                }
                Err(e) => warn!("queue pair {p}: {e}"),
            }
        }
    }

    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // LOG_SHMFD and RARP: live migration (the dirty log in a shared memfd, the announce of
        // the guest's new port).
        let base = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::RARP;
        // QEMU keeps virtio-net's config space itself (MAC from `-device mac=`) and warns at every
        // start when a net backend offers CONFIG, so it is offered only to serve an explicit
        // --mac to frontends that read it.
        if self.config.serve_config {
            base | VhostUserProtocolFeatures::CONFIG
        } else {
            base
        }
    }

    pub fn num_queues(&self) -> usize {
        self.pairs.len() * 2
    }
}

/// Two io_urings per pair, one that can only write its tap queue (TX) and one that can only
/// read it (RX), made now because seccomp will forbid it later, and tried with a write that sends
/// nothing (a kernel may make rings its tap refuses to use). All or none: a failure means the
/// kernel (or a filter around us) does not allow it, and the pairs use readv and writev. The log
/// says which path was chosen and why.
#[allow(clippy::type_complexity)]
fn tap_rings(config: &Config, taps: &[Tap]) -> (Vec<(Option<TxRing>, Option<RxRing>)>, TxPath) {
    let none = || taps.iter().map(|_| (None, None)).collect();
    if !config.io_uring {
        info!("TX: one writev per frame, RX: one readv per frame (--no-io-uring)");
        return (none(), TxPath::Disabled);
    }
    let made = taps
        .iter()
        .map(|t| Ok((TapRing::new(t, Op::Write)?, TapRing::new(t, Op::Read)?)))
        .collect::<io::Result<Vec<_>>>();
    let mut rings = match made {
        Ok(rings) => rings,
        Err(e) => {
            info!("TX: one writev per frame, RX: one readv per frame: io_uring unavailable ({e})");
            return (none(), TxPath::NoRing(e.to_string()));
        }
    };
    if let Some(e) = rings.iter_mut().find_map(|(w, _)| w.probe().err()) {
        info!("TX: one writev per frame, RX: one readv per frame: {e}");
        return (none(), TxPath::TapRefuses(e.to_string()));
    }
    info!(
        "TX: frames written in batches of up to {}, RX: frames read in batches of up to {}, through \
         io_uring ({} ring(s) each way, each limited to writing or reading its tap queue)",
        crate::uring::BATCH,
        crate::uring::RX_BATCH,
        rings.len()
    );
    (
        rings.into_iter().map(|(w, r)| (Some(w), Some(r))).collect(),
        TxPath::IoUring,
    )
}
