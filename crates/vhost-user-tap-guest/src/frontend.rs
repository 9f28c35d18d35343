//! The synthetic guest: guest memory, queue pairs and the vhost-user handshake QEMU performs
//! for a `virtio-net-pci` device backed by `-netdev vhost-user`.
//!
//! Queue layout: pair `p` is RX vring `2p` and TX vring `2p + 1`.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mem::{GuestRam, MemError};
use super::migration::DirtyLog;
use super::net::{
    bit, vnet_hdr_len, NetConfig, VirtioNetHdr, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1, VIRTIO_NET_CONFIG_SIZE, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use super::queue::{PairConfig, QueueError, QueuePair, QueueStats, RawCompletion, TxLayout};
use super::ring::{write_desc_table, RawDesc, RingError, RingLayout};
use super::vhost_user::{proto, req, ConnectError, Connection, ProtoError};

/// In which order the handshake messages are sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HandshakeOrder {
    /// Features first, then memory, then each ring (NUM, ADDR, BASE, CALL, KICK, ENABLE).
    #[default]
    Spec,
    /// What QEMU 7.2–10 do for vhost-user net: after SET_OWNER/GET_FEATURES, SET_VRING_CALL and
    /// SET_VRING_ERR for every ring and SET_VRING_ENABLE for pair 0 *before* SET_FEATURES; then
    /// SET_FEATURES, SET_MEM_TABLE, per ring NUM, BASE, ADDR, KICK, CALL; then ENABLE for all.
    Qemu,
    /// What QEMU does when the guest's memory cannot be shared (no `share=on`): the `Qemu`
    /// order up to SET_FEATURES, then nothing, as it has no fd to send with SET_MEM_TABLE. The
    /// rings are never set up.
    QemuUnsharedMemory,
}

/// How the guest is set up.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    /// The backend's listening socket.
    pub socket_path: PathBuf,
    /// How long to retry connecting while the socket is missing or refuses (daemon starting).
    pub connect_timeout: Duration,
    /// How long to wait for any reply.
    pub reply_timeout: Duration,
    /// Number of queue pairs.
    pub queue_pairs: u16,
    /// Queue size of every ring (power of two).
    pub queue_size: u16,
    /// Guest memory size in bytes (multiple of 4 KiB).
    pub mem_size: u64,
    /// First guest physical address.
    pub mem_base: u64,
    /// Ack VIRTIO_NET_F_MRG_RXBUF if offered.
    pub mrg_rxbuf: bool,
    /// Ack VIRTIO_RING_F_EVENT_IDX if offered.
    pub event_idx: bool,
    /// Ack VIRTIO_RING_F_INDIRECT_DESC if offered.
    pub indirect_desc: bool,
    /// Further feature bits to ack if offered (e.g. offloads). Default none.
    pub extra_features: u64,
    /// Use REPLY_ACK (NEED_REPLY on every request without its own reply) if offered.
    pub reply_ack: bool,
    /// Read the config space (MAC) with GET_CONFIG if the CONFIG protocol feature is offered.
    pub read_config: bool,
    /// Size of each posted RX buffer (mergeable mode; with MRG_RXBUF off, buffers are at
    /// least header + `rx_max_frame`).
    pub rx_buf_len: u32,
    /// Largest frame a non-mergeable RX buffer must hold (without header).
    pub rx_max_frame: u32,
    /// Largest TX frame (without header).
    pub tx_max_frame: u32,
    /// TX descriptor layout.
    pub tx_layout: TxLayout,
    /// Message order.
    pub order: HandshakeOrder,
    /// Ack VIRTIO_F_VERSION_1 (else a legacy device: a 10-byte header without MRG_RXBUF).
    pub version_1: bool,
    /// A hostile frontend's lie: announce the memory region this many bytes larger than the
    /// memfd behind it. Default 0.
    pub mem_table_overstate: u64,
}

impl GuestConfig {
    /// Defaults for `socket_path`.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        GuestConfig {
            socket_path: socket_path.into(),
            connect_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(5),
            queue_pairs: 1,
            queue_size: 256,
            mem_size: 64 << 20,
            mem_base: 0,
            mrg_rxbuf: true,
            event_idx: true,
            indirect_desc: true,
            extra_features: 0,
            reply_ack: true,
            read_config: true,
            rx_buf_len: 1536,
            rx_max_frame: 1514,
            tx_max_frame: 1514,
            tx_layout: TxLayout::Single,
            order: HandshakeOrder::Spec,
            version_1: true,
            mem_table_overstate: 0,
        }
    }
}

/// Errors of the synthetic guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Connecting failed with a non-retryable error.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Nothing accepted the connection before the deadline.
    #[error("connecting to {path}: no backend accepted within {waited:?} (last error: {last})")]
    ConnectTimeout {
        /// Socket path.
        path: PathBuf,
        /// How long we tried.
        waited: Duration,
        /// Last error.
        last: std::io::Error,
    },
    /// Guest memory setup failed.
    #[error("guest memory: {0}")]
    Memory(#[from] MemError),
    /// A queue operation failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// A handshake (or later control) request failed.
    #[error("vhost-user {step}: {source}")]
    Request {
        /// The step, e.g. "SET_VRING_ADDR for vring 1".
        step: String,
        /// Cause.
        #[source]
        source: ProtoError,
    },
    /// More than one pair requested without the MQ protocol feature.
    #[error(
        "{pairs} queue pairs requested, but the backend does not offer VHOST_USER_PROTOCOL_F_MQ"
    )]
    NoMultiqueue {
        /// Requested pairs.
        pairs: u16,
    },
    /// GET_QUEUE_NUM is smaller than the requested pairs.
    #[error("{pairs} queue pairs requested, but the backend's GET_QUEUE_NUM is {max}")]
    TooManyPairs {
        /// Requested pairs.
        pairs: u16,
        /// GET_QUEUE_NUM answer.
        max: u64,
    },
    /// Invalid configuration.
    #[error("invalid guest configuration: {0}")]
    Config(String),
    /// A vring or pair index out of range.
    #[error("queue index {index} out of range ({count} available)")]
    BadIndex {
        /// Requested index.
        index: usize,
        /// Number available.
        count: usize,
    },
    /// Writing descriptors into guest memory failed.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The connection was already closed.
    #[error("the guest is not connected")]
    NotConnected,
}

type Result<T> = std::result::Result<T, GuestError>;

fn step(s: impl Into<String>) -> impl FnOnce(ProtoError) -> GuestError {
    let s = s.into();
    move |source| GuestError::Request { step: s, source }
}

/// Connect to the backend at `path` with `cfg`'s timeouts.
fn connect(path: &std::path::Path, cfg: &GuestConfig) -> Result<Connection> {
    Connection::connect(path, cfg.connect_timeout, cfg.reply_timeout).map_err(|e| match e {
        ConnectError::Failed(source) => GuestError::Connect {
            path: path.to_path_buf(),
            source,
        },
        ConnectError::TimedOut(last) => GuestError::ConnectTimeout {
            path: path.to_path_buf(),
            waited: cfg.connect_timeout,
            last,
        },
    })
}

/// A connected synthetic guest.
#[derive(Debug)]
pub struct Guest {
    conn: Option<Connection>,
    ram: GuestRam,
    pairs: Vec<QueuePair>,
    err_fds: Vec<EventFd>,
    offered_features: u64,
    features: u64,
    offered_protocol: Option<u64>,
    protocol: u64,
    queue_num: Option<u64>,
    net_config: Option<NetConfig>,
    /// The migration dirty log while logging (SET_LOG_BASE sent, LOG_ALL on).
    log: Option<Arc<DirtyLog>>,
    /// The eventfd sent in SET_LOG_FD, which the backend signals after marking the log.
    log_signal: Option<EventFd>,
    cfg: GuestConfig,
}

impl Guest {
    /// Connect to the backend and perform the full handshake. RX buffers are *not* posted;
    /// call [`Guest::post_rx_buffers`] (or [`QueuePair::post_rx_buffers`]) to fill the ring.
    pub fn connect(cfg: GuestConfig) -> Result<Self> {
        if cfg.queue_pairs == 0 || cfg.queue_pairs > 128 {
            return Err(GuestError::Config(format!(
                "queue pairs {} (must be 1..=128)",
                cfg.queue_pairs
            )));
        }
        if cfg.queue_size == 0 || !cfg.queue_size.is_power_of_two() || cfg.queue_size > 32768 {
            return Err(GuestError::Config(format!(
                "queue size {} (must be a power of two up to 32768)",
                cfg.queue_size
            )));
        }
        let ram = GuestRam::new(cfg.mem_size, cfg.mem_base)?;
        let conn = connect(&cfg.socket_path, &cfg)?;
        let mut g = Guest {
            conn: Some(conn),
            ram,
            pairs: Vec::new(),
            err_fds: Vec::new(),
            offered_features: 0,
            features: 0,
            offered_protocol: None,
            protocol: 0,
            queue_num: None,
            net_config: None,
            log: None,
            log_signal: None,
            cfg,
        };
        g.handshake()?;
        Ok(g)
    }

    fn conn(&mut self) -> Result<&mut Connection> {
        self.conn.as_mut().ok_or(GuestError::NotConnected)
    }

    fn nvrings(&self) -> u32 {
        2 * u32::from(self.cfg.queue_pairs)
    }

    fn handshake(&mut self) -> Result<()> {
        let pairs = self.cfg.queue_pairs;
        let offered = self.conn()?.get_features().map_err(step("GET_FEATURES"))?;
        self.offered_features = offered;
        let has_proto = offered & bit(VHOST_USER_F_PROTOCOL_FEATURES) != 0;
        if has_proto {
            // LOG_SHMFD and RARP as QEMU acks them for a migratable vhost-user NIC.
            let mut want = proto::MQ | proto::CONFIG | proto::LOG_SHMFD | proto::RARP;
            if self.cfg.reply_ack {
                want |= proto::REPLY_ACK;
            }
            if !self.cfg.read_config {
                want &= !proto::CONFIG;
            }
            self.ack_protocol_features(want)?;
        } else {
            log::warn!("backend does not offer VHOST_USER_F_PROTOCOL_FEATURES: rings start enabled, no REPLY_ACK/MQ/CONFIG");
        }
        if self.protocol & proto::MQ != 0 {
            let n = self
                .conn()?
                .get_queue_num()
                .map_err(step("GET_QUEUE_NUM"))?;
            self.queue_num = Some(n);
            // QEMU compares GET_QUEUE_NUM with the number of queue *pairs*; backends differ in
            // whether they count pairs or vrings, so accept either.
            if n < u64::from(pairs) {
                return Err(GuestError::TooManyPairs { pairs, max: n });
            }
        } else if pairs > 1 {
            return Err(GuestError::NoMultiqueue { pairs });
        }

        // What we will ack.
        let mut want = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MTU)
            | self.cfg.extra_features;
        if self.cfg.mrg_rxbuf {
            want |= bit(VIRTIO_NET_F_MRG_RXBUF);
        }
        if !self.cfg.version_1 {
            want &= !bit(VIRTIO_F_VERSION_1);
        }
        if self.cfg.event_idx {
            want |= bit(VIRTIO_RING_F_EVENT_IDX);
        }
        if self.cfg.indirect_desc {
            want |= bit(VIRTIO_RING_F_INDIRECT_DESC);
        }
        let mut features = offered & want;
        if has_proto {
            features |= bit(VHOST_USER_F_PROTOCOL_FEATURES);
        }
        if features & bit(VIRTIO_F_VERSION_1) == 0 {
            log::warn!("backend does not offer VIRTIO_F_VERSION_1: legacy vnet header");
        }
        self.features = features;
        self.create_pairs()?;

        self.conn()?.set_owner().map_err(step("SET_OWNER"))?;
        match self.cfg.order {
            HandshakeOrder::Spec => {
                self.conn()?
                    .set_features(features)
                    .map_err(step("SET_FEATURES"))?;
                self.read_config()?;
                self.set_mem_table()?;
                for q in 0..self.nvrings() {
                    self.setup_vring(q, false, 0)?;
                    self.send_vring_fd(req::SET_VRING_CALL, q)?;
                    self.send_vring_fd(req::SET_VRING_KICK, q)?;
                    if has_proto {
                        self.enable_vring(q, true)?;
                    }
                }
            }
            HandshakeOrder::Qemu | HandshakeOrder::QemuUnsharedMemory => {
                // vhost_dev_init: GET_FEATURES again, then per-vq call (masked) and err fds.
                self.conn()?
                    .get_features()
                    .map_err(step("GET_FEATURES (second)"))?;
                for q in 0..self.nvrings() {
                    self.send_vring_fd(req::SET_VRING_CALL, q)?;
                    let efd = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| {
                        GuestError::Config(format!("creating an error eventfd: {e}"))
                    })?;
                    let fd = efd.as_raw_fd();
                    self.err_fds.push(efd);
                    self.conn()?
                        .set_vring_fd(req::SET_VRING_ERR, q, Some(fd))
                        .map_err(step(format!("SET_VRING_ERR for vring {q}")))?;
                }
                self.read_config()?;
                // virtio-net attaches pair 0 at realize/reset.
                if has_proto {
                    self.enable_vring(0, true)?;
                    self.enable_vring(1, true)?;
                }
                self.conn()?
                    .set_features(features)
                    .map_err(step("SET_FEATURES"))?;
                if self.cfg.order == HandshakeOrder::QemuUnsharedMemory {
                    return Ok(());
                }
                self.set_mem_table()?;
                for q in 0..self.nvrings() {
                    self.setup_vring(q, true, 0)?;
                    self.send_vring_fd(req::SET_VRING_KICK, q)?;
                    self.send_vring_fd(req::SET_VRING_CALL, q)?;
                }
                if has_proto {
                    for q in 0..self.nvrings() {
                        self.enable_vring(q, true)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn create_pairs(&mut self) -> Result<()> {
        let f = self.features;
        let hdr_len = vnet_hdr_len(f);
        let mrg = f & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let rx_buf_len = if mrg {
            self.cfg.rx_buf_len
        } else {
            self.cfg
                .rx_buf_len
                .max(hdr_len as u32 + self.cfg.rx_max_frame)
        };
        let rx_offloads = f
            & (bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(8)
                | bit(9)
                | bit(10)
                | bit(54)
                | bit(55))
            != 0;
        let pc = PairConfig {
            queue_size: self.cfg.queue_size,
            hdr_len,
            mrg_rxbuf: mrg,
            event_idx: f & bit(VIRTIO_RING_F_EVENT_IDX) != 0,
            indirect: f & bit(VIRTIO_RING_F_INDIRECT_DESC) != 0,
            rx_offloads,
            rx_buf_len,
            tx_max_frame: self.cfg.tx_max_frame,
            tx_layout: self.cfg.tx_layout,
        };
        for p in 0..self.cfg.queue_pairs {
            let pair = QueuePair::new(&mut self.ram, p, pc)?;
            self.pairs.push(pair);
        }
        Ok(())
    }

    fn read_config(&mut self) -> Result<()> {
        if self.protocol & proto::CONFIG == 0 {
            return Ok(());
        }
        let r = self
            .conn()?
            .get_config(0, VIRTIO_NET_CONFIG_SIZE as u32)
            .map_err(step("GET_CONFIG"))?;
        match r {
            Some(b) => self.net_config = NetConfig::parse(&b),
            None => {
                log::warn!("backend failed GET_CONFIG (reply size 0); no MAC from config space")
            }
        }
        Ok(())
    }

    fn set_mem_table(&mut self) -> Result<()> {
        let region = (
            self.ram.base().0,
            self.ram.size() + self.cfg.mem_table_overstate,
            self.ram.host_addr(),
            self.ram.mmap_offset(),
        );
        let fd = self.ram.memfd();
        self.conn()?
            .set_mem_table(&[region], &[fd])
            .map_err(step("SET_MEM_TABLE"))
    }

    /// SET_VRING_NUM, then BASE and ADDR in QEMU's order or ADDR and BASE in the spec's.
    fn setup_vring(&mut self, q: u32, qemu_order: bool, base: u32) -> Result<()> {
        let layout = self.vring_layout(q);
        let (desc, used, avail) = self.vring_uvas(&layout)?;
        let c = self.conn()?;
        c.set_vring_num(q, u32::from(layout.size))
            .map_err(step(format!("SET_VRING_NUM for vring {q}")))?;
        let set_base = |c: &mut Connection| {
            c.set_vring_base(q, base)
                .map_err(step(format!("SET_VRING_BASE for vring {q}")))
        };
        if qemu_order {
            set_base(c)?;
        }
        c.set_vring_addr(q, desc, used, avail)
            .map_err(step(format!("SET_VRING_ADDR for vring {q}")))?;
        if !qemu_order {
            set_base(c)?;
        }
        Ok(())
    }

    /// GET_PROTOCOL_FEATURES, then SET_PROTOCOL_FEATURES with the offered ones of `want`.
    fn ack_protocol_features(&mut self, want: u64) -> Result<()> {
        let c = self.conn()?;
        let pofs = c
            .get_protocol_features()
            .map_err(step("GET_PROTOCOL_FEATURES"))?;
        let ack = pofs & want;
        c.set_protocol_features(ack)
            .map_err(step("SET_PROTOCOL_FEATURES"))?;
        c.set_reply_ack(ack & proto::REPLY_ACK != 0);
        self.offered_protocol = Some(pofs);
        self.protocol = ack;
        Ok(())
    }

    fn vring_layout(&self, q: u32) -> RingLayout {
        let pair = &self.pairs[(q / 2) as usize];
        if q % 2 == 0 {
            *pair.rx_ring().layout()
        } else {
            *pair.tx_ring().layout()
        }
    }

    /// The frontend addresses (desc, used, avail) of a ring, as SET_VRING_ADDR carries them.
    fn vring_uvas(&self, layout: &RingLayout) -> Result<(u64, u64, u64)> {
        let uva = |gpa: GuestAddress| {
            self.ram.gpa_to_uva(gpa).ok_or_else(|| {
                GuestError::Config(format!("ring address {:#x} outside guest memory", gpa.0))
            })
        };
        Ok((
            uva(layout.desc_table)?,
            uva(layout.used_ring)?,
            uva(layout.avail_ring)?,
        ))
    }

    fn vring_fd(&self, code: u32, q: u32) -> RawFd {
        let pair = &self.pairs[(q / 2) as usize];
        match (code, q % 2) {
            (req::SET_VRING_KICK, 0) => pair.rx_kick_fd(),
            (req::SET_VRING_KICK, _) => pair.tx_kick_fd(),
            (_, 0) => pair.rx_call_fd(),
            _ => pair.tx_call_fd(),
        }
    }

    fn send_vring_fd(&mut self, code: u32, q: u32) -> Result<()> {
        let fd = self.vring_fd(code, q);
        self.conn()?
            .set_vring_fd(code, q, Some(fd))
            .map_err(step(format!("{} for vring {q}", req::name(code))))
    }

    fn enable_vring(&mut self, q: u32, enable: bool) -> Result<()> {
        self.conn()?
            .set_vring_enable(q, enable)
            .map_err(step(format!(
                "SET_VRING_ENABLE {} for vring {q}",
                u8::from(enable)
            )))
    }

    // ------------------------------------------------------------ accessors

    /// Feature bits the backend offered.
    pub fn offered_features(&self) -> u64 {
        self.offered_features
    }

    /// Feature bits acked with SET_FEATURES.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// True if virtio feature bit `n` was negotiated.
    pub fn has_feature(&self, n: u32) -> bool {
        self.features & bit(n) != 0
    }

    /// Protocol features offered (None without VHOST_USER_F_PROTOCOL_FEATURES).
    pub fn offered_protocol_features(&self) -> Option<u64> {
        self.offered_protocol
    }

    /// Protocol features acked.
    pub fn protocol_features(&self) -> u64 {
        self.protocol
    }

    /// The backend's GET_QUEUE_NUM answer, if asked.
    pub fn queue_num(&self) -> Option<u64> {
        self.queue_num
    }

    /// Config space read with GET_CONFIG.
    pub fn net_config(&self) -> Option<&NetConfig> {
        self.net_config.as_ref()
    }

    /// The device MAC (config space, if VIRTIO_NET_F_MAC was negotiated).
    pub fn mac(&self) -> Option<[u8; 6]> {
        if self.has_feature(VIRTIO_NET_F_MAC) {
            self.net_config.map(|c| c.mac)
        } else {
            None
        }
    }

    /// vnet header length in use.
    pub fn hdr_len(&self) -> usize {
        vnet_hdr_len(self.features)
    }

    /// Request codes sent on the socket so far (for order checks).
    pub fn sent_requests(&self) -> Vec<u32> {
        self.conn
            .as_ref()
            .map(|c| c.sent().to_vec())
            .unwrap_or_default()
    }

    /// Number of queue pairs.
    pub fn num_pairs(&self) -> usize {
        self.pairs.len()
    }

    /// Queue pair `p`.
    pub fn pair(&self, p: usize) -> Result<&QueuePair> {
        let count = self.pairs.len();
        self.pairs
            .get(p)
            .ok_or(GuestError::BadIndex { index: p, count })
    }

    /// Queue pair `p`, mutable.
    pub fn pair_mut(&mut self, p: usize) -> Result<&mut QueuePair> {
        let count = self.pairs.len();
        self.pairs
            .get_mut(p)
            .ok_or(GuestError::BadIndex { index: p, count })
    }

    /// All pairs (e.g. to drive each from its own thread with `std::thread::scope`).
    pub fn pairs_mut(&mut self) -> &mut [QueuePair] {
        &mut self.pairs
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.ram.memory()
    }

    /// Guest memory layout and allocator.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Allocate scratch guest memory (for raw chains, indirect tables, …).
    pub fn alloc_scratch(&mut self, size: u64, align: u64) -> Result<GuestAddress> {
        Ok(self.ram.alloc(size, align, "scratch")?)
    }

    /// Write a descriptor table (e.g. an indirect table for a raw chain) at `table`, which
    /// must be memory from [`Guest::alloc_scratch`]. `RawNext::Follow`/`Chain(k)` are indices
    /// inside the table.
    pub fn write_desc_table(&self, table: GuestAddress, descs: &[RawDesc]) -> Result<()> {
        Ok(write_desc_table(self.ram.memory(), table, descs)?)
    }

    /// Counters summed over all pairs.
    pub fn stats(&self) -> QueueStats {
        let mut s = QueueStats::default();
        for p in &self.pairs {
            s.add(&p.stats());
        }
        s
    }

    // ------------------------------------------------------------ pair-0 conveniences

    fn p0(&mut self) -> &mut QueuePair {
        // Pair 0 always exists after a successful handshake.
        &mut self.pairs[0]
    }

    /// Post up to `n` RX buffers on pair 0. Returns how many.
    pub fn post_rx_buffers(&mut self, n: usize) -> Result<usize> {
        Ok(self.p0().post_rx_buffers(n)?)
    }

    /// RX buffers that could be posted on pair 0.
    pub fn rx_free_slots(&self) -> usize {
        self.pairs[0].rx_free_slots()
    }

    /// Harvest pair 0's RX frames (without vnet header). Does not repost.
    pub fn poll_rx<F: FnMut(&[u8], &VirtioNetHdr)>(&mut self, f: F) -> Result<usize> {
        Ok(self.p0().poll_rx(f)?)
    }

    /// Send one frame on pair 0. False when the TX ring is full.
    pub fn send_frame(&mut self, frame: &[u8]) -> Result<bool> {
        Ok(self.p0().send_frame(frame)?)
    }

    /// Send frames on pair 0 with one kick decision. Returns how many were queued.
    pub fn send_frames(&mut self, frames: &[&[u8]]) -> Result<usize> {
        Ok(self.p0().send_frames(frames)?)
    }

    /// Post a raw RX chain on pair 0. Returns its head index.
    pub fn post_raw_rx_chain(&mut self, descs: &[RawDesc]) -> Result<u16> {
        Ok(self.p0().post_raw_rx_chain(descs)?)
    }

    /// Post a raw TX chain on pair 0. Returns its head index.
    pub fn post_raw_tx_chain(&mut self, descs: &[RawDesc]) -> Result<u16> {
        Ok(self.p0().post_raw_tx_chain(descs)?)
    }

    /// Completed raw chains of all pairs since the last call.
    pub fn take_raw_completions(&mut self) -> Vec<RawCompletion> {
        self.pairs
            .iter_mut()
            .flat_map(|p| p.take_raw_completions())
            .collect()
    }

    /// Wait for vring `queue`'s interrupt (see [`QueuePair::wait`]); returns true early if its
    /// used ring already has entries, false on timeout.
    pub fn wait_interrupt(&mut self, queue: usize, timeout: Duration) -> Result<bool> {
        let count = 2 * self.pairs.len();
        let pair = self.pairs.get_mut(queue / 2).ok_or(GuestError::BadIndex {
            index: queue,
            count,
        })?;
        Ok(if queue % 2 == 0 {
            pair.wait_rx_interrupt(Some(timeout))?
        } else {
            pair.wait_tx_interrupt(Some(timeout))?
        })
    }

    // ------------------------------------------------------------ control

    /// SET_VRING_ENABLE for one vring (e.g. to test a disabled ring).
    pub fn set_vring_enable(&mut self, queue: u32, enable: bool) -> Result<()> {
        if queue >= self.nvrings() {
            return Err(GuestError::BadIndex {
                index: queue as usize,
                count: self.nvrings() as usize,
            });
        }
        self.enable_vring(queue, enable)
    }

    /// Send `fd` as vring `queue`'s kick, call or error fd (`req::SET_VRING_KICK`, ...): a
    /// frontend may send anything there. With REPLY_ACK, a refusal is an error.
    pub fn send_vring_fd_raw(&mut self, code: u32, queue: u32, fd: &impl AsRawFd) -> Result<()> {
        self.conn()?
            .set_vring_fd(code, queue, Some(fd.as_raw_fd()))
            .map_err(step(format!("{} for vring {queue}", req::name(code))))
    }

    /// GET_VRING_BASE for one vring (stops it in the backend).
    pub fn get_vring_base(&mut self, queue: u32) -> Result<u32> {
        self.conn()?
            .get_vring_base(queue)
            .map_err(step(format!("GET_VRING_BASE for vring {queue}")))
    }

    /// Stop like QEMU: GET_VRING_BASE for every vring, then close the socket. Returns the
    /// bases (the backend's next avail index per vring). Guest memory stays mapped.
    pub fn disconnect(&mut self) -> Result<Vec<u32>> {
        let mut conn = self.conn.take().ok_or(GuestError::NotConnected)?;
        let mut bases = Vec::new();
        let mut first_err = None;
        for q in 0..self.nvrings() {
            match conn.get_vring_base(q) {
                Ok(b) => bases.push(b),
                Err(e) => {
                    first_err = Some(GuestError::Request {
                        step: format!("GET_VRING_BASE for vring {q}"),
                        source: e,
                    });
                    break;
                }
            }
        }
        conn.shutdown();
        match first_err {
            Some(e) => Err(e),
            None => Ok(bases),
        }
    }

    // ------------------------------------------------------------ migration

    /// Start a migration's dirty logging as QEMU does: SET_LOG_BASE with a log covering guest
    /// memory (the backend must answer; a non-zero answer is an error), SET_LOG_FD, SET_FEATURES
    /// with VHOST_F_LOG_ALL added, then SET_VRING_ADDR with VHOST_VRING_F_LOG and the used
    /// ring's guest address for every ring, all while the rings run. Calling it again replaces
    /// the log (QEMU resizes it so when memory grows).
    pub fn start_migration_log(&mut self) -> Result<()> {
        let end = self.ram.base().0 + self.ram.size();
        let log = DirtyLog::new(end).map_err(|e| GuestError::Config(e.to_string()))?;
        let reply = self
            .conn()?
            .set_log_base(log.size(), 0, log.fd())
            .map_err(step("SET_LOG_BASE"))?;
        if reply != 0 {
            return Err(GuestError::Config(format!(
                "the backend refused the log (SET_LOG_BASE answered {reply})"
            )));
        }
        let signal = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| GuestError::Config(format!("creating the log eventfd: {e}")))?;
        self.conn()?
            .set_log_fd(signal.as_raw_fd())
            .map_err(step("SET_LOG_FD"))?;
        self.log = Some(Arc::new(log));
        self.log_signal = Some(signal);
        self.set_logging(true)
    }

    /// End dirty logging: SET_FEATURES without VHOST_F_LOG_ALL, the rings' addresses without
    /// VHOST_VRING_F_LOG. The log stays readable.
    pub fn stop_migration_log(&mut self) -> Result<()> {
        self.set_logging(false)
    }

    fn set_logging(&mut self, on: bool) -> Result<()> {
        let log_all = if on { bit(VHOST_F_LOG_ALL) } else { 0 };
        let features = self.features | log_all;
        self.conn()?
            .set_features(features)
            .map_err(step("SET_FEATURES (LOG_ALL)"))?;
        for q in 0..self.nvrings() {
            let layout = self.vring_layout(q);
            let (desc, used, avail) = self.vring_uvas(&layout)?;
            let log = on.then_some(layout.used_ring.0);
            self.conn()?
                .set_vring_addr_logged(q, desc, used, avail, log)
                .map_err(step(format!("SET_VRING_ADDR (log) for vring {q}")))?;
        }
        Ok(())
    }

    /// The guest pages the backend marked dirty since the last call (cleared as read), by
    /// guest-physical page number. Empty before [`Guest::start_migration_log`].
    pub fn take_dirty_pages(&self) -> BTreeSet<u64> {
        self.log
            .as_ref()
            .map(|l| l.take_dirty())
            .unwrap_or_default()
    }

    /// The dirty log, to read from another thread while the rings run (as QEMU's migration
    /// thread does). None before [`Guest::start_migration_log`].
    pub fn dirty_log(&self) -> Option<Arc<DirtyLog>> {
        self.log.clone()
    }

    /// How often the backend signalled the log eventfd since the last call (0 if it did not).
    pub fn take_log_signals(&self) -> u64 {
        self.log_signal
            .as_ref()
            .and_then(|e| e.read().ok())
            .unwrap_or(0)
    }

    /// SET_FEATURES with exactly `features` (e.g. VHOST_F_LOG_ALL without a log, which a
    /// backend must refuse). With REPLY_ACK, a refusal is an error.
    pub fn set_features_raw(&mut self, features: u64) -> Result<()> {
        self.conn()?
            .set_features(features)
            .map_err(step("SET_FEATURES (raw)"))
    }

    /// SET_LOG_BASE with any size, offset and fd; returns the backend's answer (0: accepted).
    pub fn set_log_base_raw(&mut self, size: u64, offset: u64, fd: &impl AsRawFd) -> Result<u64> {
        self.conn()?
            .set_log_base(size, offset, fd.as_raw_fd())
            .map_err(step("SET_LOG_BASE (raw)"))
    }

    /// Move this guest to the backend at `socket` the way a migration moves a VM's NIC: stop
    /// every ring on the current backend (GET_VRING_BASE) and close it, then set the rings up on
    /// the new backend at the same guest addresses with SET_VRING_BASE = the bases the old one
    /// returned, and the same features and memory. Posted buffers and in-flight TX stay where
    /// they are in guest memory: the new backend must continue from the indices alone (the
    /// used index it finds in memory). Returns the bases. A migration's dirty log ends with the
    /// old backend.
    pub fn migrate_to(&mut self, socket: &std::path::Path) -> Result<Vec<u32>> {
        let bases = self.disconnect()?;
        self.resume_on(socket, &bases)?;
        Ok(bases)
    }

    /// The second half of [`Guest::migrate_to`], after [`Guest::disconnect`]: connect to the
    /// backend at `socket` and resume the rings at `bases`.
    pub fn resume_on(&mut self, socket: &std::path::Path, bases: &[u32]) -> Result<()> {
        if self.conn.is_some() {
            return Err(GuestError::Config("resume_on while still connected".into()));
        }
        if bases.len() != self.nvrings() as usize {
            return Err(GuestError::Config(format!(
                "{} bases for {} vrings",
                bases.len(),
                self.nvrings()
            )));
        }
        self.log = None;
        self.log_signal = None;
        let conn = connect(socket, &self.cfg)?;
        self.conn = Some(conn);
        self.resume(bases)
    }

    /// The destination's handshake: what was negotiated before, rings resumed at `bases`.
    fn resume(&mut self, bases: &[u32]) -> Result<()> {
        let offered = self.conn()?.get_features().map_err(step("GET_FEATURES"))?;
        if offered & self.features != self.features {
            return Err(GuestError::Config(format!(
                "the destination offers {offered:#x}, the guest runs with {:#x}",
                self.features
            )));
        }
        if self.features & bit(VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
            self.ack_protocol_features(self.protocol)?;
            if self.protocol & proto::MQ != 0 {
                self.conn()?
                    .get_queue_num()
                    .map_err(step("GET_QUEUE_NUM"))?;
            }
        }
        let features = self.features;
        let c = self.conn()?;
        c.set_owner().map_err(step("SET_OWNER"))?;
        c.set_features(features).map_err(step("SET_FEATURES"))?;
        self.set_mem_table()?;
        for q in 0..self.nvrings() {
            self.setup_vring(q, true, bases[q as usize])?;
            self.send_vring_fd(req::SET_VRING_KICK, q)?;
            self.send_vring_fd(req::SET_VRING_CALL, q)?;
            if features & bit(VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
                self.enable_vring(q, true)?;
            }
        }
        Ok(())
    }

    /// The used index the backend last published on vring `queue`, read from guest memory.
    pub fn used_index(&self, queue: u32) -> Result<u16> {
        if queue >= self.nvrings() {
            return Err(GuestError::BadIndex {
                index: queue as usize,
                count: self.nvrings() as usize,
            });
        }
        let layout = self.vring_layout(queue);
        self.ram
            .memory()
            .read_obj(layout.used_ring.unchecked_add(2))
            .map_err(|e| GuestError::Config(format!("reading vring {queue}'s used index: {e}")))
    }

    /// SEND_RARP for `mac`, as QEMU sends it after a migration when the guest cannot announce
    /// itself.
    pub fn send_rarp(&mut self, mac: [u8; 6]) -> Result<()> {
        self.conn()?.send_rarp(mac).map_err(step("SEND_RARP"))
    }

    /// True until [`Guest::disconnect`].
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.conn.is_some() {
            if let Err(e) = self.disconnect() {
                log::debug!("disconnect on drop: {e}");
            }
        }
    }
}
