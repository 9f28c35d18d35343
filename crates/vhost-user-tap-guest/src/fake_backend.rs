//! Test-only vhost-user backend: the `vhost` crate's backend request handler plus a loopback
//! "device" (TX frames come back on RX of the same pair, and tests can inject RX frames).

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::message::*;
use vhost::vhost_user::{
    Backend, BackendReqHandler, Error as VuError, GpuBackend, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::net::{bit, vnet_hdr_len, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_RING_F_EVENT_IDX};
use super::ring::RingLayout;
use super::testdev::{device_queue, TestDevice};

type VuResult<T> = std::result::Result<T, VuError>;
/// (frontend userspace address, guest physical address, size).
pub type RegionMap = (u64, u64, u64);

#[derive(Default)]
pub struct Vring {
    pub num: u16,
    pub addrs: Option<(u64, u64, u64)>,
    pub base: u16,
    pub kick: Option<File>,
    pub call: Option<File>,
    pub enabled: bool,
    pub stopped: bool,
}

pub struct Shared {
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    pub queue_num: u64,
    pub acked_features: u64,
    pub acked_protocol: u64,
    pub log: Vec<&'static str>,
    /// Mapped memory and its (userspace address, gpa, size) table.
    pub mem: Option<(GuestMemoryMmap, Vec<RegionMap>)>,
    pub vrings: Vec<Vring>,
    pub devices: Vec<Option<TestDevice>>,
    pub mac: [u8; 6],
    pub loopback: bool,
    pub inject: Vec<VecDeque<Vec<u8>>>,
    pub tx_seen: Vec<Vec<u8>>,
    pub exit: bool,
}

impl Shared {
    fn uva_to_gpa(&self, uva: u64) -> Option<u64> {
        let (_, table) = self.mem.as_ref()?;
        table
            .iter()
            .find(|(u, _, size)| uva >= *u && uva < u + size)
            .map(|(u, g, _)| g + (uva - u))
    }

    /// Build the device of pair `p` once both its vrings are fully configured.
    fn maybe_start(&mut self, p: usize) {
        if self.devices[p].is_some() {
            return;
        }
        let (rx, tx) = (&self.vrings[2 * p], &self.vrings[2 * p + 1]);
        let ready = |v: &Vring| {
            v.addrs.is_some() && v.kick.is_some() && v.call.is_some() && v.num > 0 && !v.stopped
        };
        if !ready(rx) || !ready(tx) || self.mem.is_none() {
            return;
        }
        let event_idx = self.acked_features & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        let mrg = self.acked_features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let layout = |v: &Vring| {
            let (d, u, a) = v.addrs.unwrap();
            RingLayout {
                size: v.num,
                desc_table: GuestAddress(self.uva_to_gpa(d).unwrap()),
                avail_ring: GuestAddress(self.uva_to_gpa(a).unwrap()),
                used_ring: GuestAddress(self.uva_to_gpa(u).unwrap()),
            }
        };
        let (lrx, ltx) = (layout(rx), layout(tx));
        let mut rxq = device_queue(&lrx, event_idx);
        let mut txq = device_queue(&ltx, event_idx);
        use virtio_queue::QueueT;
        rxq.set_next_avail(rx.base);
        rxq.set_next_used(rx.base);
        txq.set_next_avail(tx.base);
        txq.set_next_used(tx.base);
        let rc = rx.call.as_ref().unwrap().try_clone().unwrap();
        let tc = tx.call.as_ref().unwrap().try_clone().unwrap();
        let notify = |f: File| -> super::testdev::Notify {
            Box::new(move || {
                let _ = (&f).write_all(&1u64.to_ne_bytes());
            })
        };
        let mem = self.mem.as_ref().unwrap().0.clone();
        self.devices[p] = Some(TestDevice::new(
            mem,
            rxq,
            txq,
            vnet_hdr_len(self.acked_features),
            mrg,
            notify(rc),
            notify(tc),
        ));
    }

    /// One round of device work.
    fn work(&mut self) {
        for p in 0..self.devices.len() {
            let (rx_on, tx_on) = (self.vrings[2 * p].enabled, self.vrings[2 * p + 1].enabled);
            let Some(dev) = self.devices[p].as_mut() else {
                continue;
            };
            if tx_on {
                for (_hdr, frame) in dev.drain_tx() {
                    if self.loopback {
                        self.inject[p].push_back(frame.clone());
                    }
                    self.tx_seen.push(frame);
                }
            }
            if rx_on {
                while let Some(f) = self.inject[p].front() {
                    if !dev.deliver(f) {
                        break;
                    }
                    self.inject[p].pop_front();
                }
            }
            dev.enable_kicks();
        }
    }
}

pub struct FakeBackend {
    pub shared: Arc<Mutex<Shared>>,
}

impl FakeBackend {
    fn log(&self, name: &'static str) -> std::sync::MutexGuard<'_, Shared> {
        let mut s = self.shared.lock().unwrap();
        s.log.push(name);
        s
    }
}

fn unsupported<T>() -> VuResult<T> {
    Err(VuError::InvalidOperation("unsupported by the fake backend"))
}

impl VhostUserBackendReqHandlerMut for FakeBackend {
    fn set_owner(&mut self) -> VuResult<()> {
        drop(self.log("SET_OWNER"));
        Ok(())
    }
    fn reset_owner(&mut self) -> VuResult<()> {
        unsupported()
    }
    fn reset_device(&mut self) -> VuResult<()> {
        unsupported()
    }
    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.log("GET_FEATURES").features)
    }
    fn set_features(&mut self, features: u64) -> VuResult<()> {
        self.log("SET_FEATURES").acked_features = features;
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let mut s = self.log("SET_MEM_TABLE");
        let mut regions = Vec::new();
        let mut table = Vec::new();
        for (r, f) in ctx.iter().zip(files) {
            let (gpa, size, uva, off) =
                (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset);
            let region = GuestRegionMmap::from_range(
                GuestAddress(gpa),
                size as usize,
                Some(FileOffset::new(f, off)),
            )
            .map_err(|_| VuError::InvalidParam)?;
            regions.push(region);
            table.push((uva, gpa, size));
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|_| VuError::InvalidParam)?;
        s.mem = Some((mem, table));
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let mut s = self.log("SET_VRING_NUM");
        s.vrings
            .get_mut(index as usize)
            .ok_or(VuError::InvalidParam)?
            .num = num as u16;
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let mut s = self.log("SET_VRING_ADDR");
        s.vrings
            .get_mut(index as usize)
            .ok_or(VuError::InvalidParam)?
            .addrs = Some((descriptor, used, available));
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let mut s = self.log("SET_VRING_BASE");
        s.vrings
            .get_mut(index as usize)
            .ok_or(VuError::InvalidParam)?
            .base = base as u16;
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let mut s = self.log("GET_VRING_BASE");
        let i = index as usize;
        if i >= s.vrings.len() {
            return Err(VuError::InvalidParam);
        }
        let p = i / 2;
        // Stopping either ring stops the pair's device; remember both positions.
        if let Some(d) = s.devices[p].take() {
            use virtio_queue::QueueT;
            s.vrings[2 * p].base = d.rxq.next_avail();
            s.vrings[2 * p + 1].base = d.txq.next_avail();
        }
        s.vrings[i].stopped = true;
        let base = s.vrings[i].base;
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let mut s = self.log("SET_VRING_KICK");
        let i = usize::from(index);
        s.vrings.get_mut(i).ok_or(VuError::InvalidParam)?.kick = fd;
        if s.acked_features & bit(30) == 0 {
            s.vrings[i].enabled = true;
        }
        s.maybe_start(i / 2);
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let mut s = self.log("SET_VRING_CALL");
        let i = usize::from(index);
        s.vrings.get_mut(i).ok_or(VuError::InvalidParam)?.call = fd;
        s.maybe_start(i / 2);
        Ok(())
    }
    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VuResult<()> {
        drop(self.log("SET_VRING_ERR"));
        Ok(())
    }
    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(self.log("GET_PROTOCOL_FEATURES").protocol)
    }
    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.log("SET_PROTOCOL_FEATURES").acked_protocol = features;
        Ok(())
    }
    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.log("GET_QUEUE_NUM").queue_num)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let mut s = self.log("SET_VRING_ENABLE");
        s.vrings
            .get_mut(index as usize)
            .ok_or(VuError::InvalidParam)?
            .enabled = enable;
        Ok(())
    }
    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let s = self.log("GET_CONFIG");
        let mut space = [0u8; 24];
        space[0..6].copy_from_slice(&s.mac);
        space[6..8].copy_from_slice(&1u16.to_le_bytes());
        space[8..10].copy_from_slice(&((s.vrings.len() / 2) as u16).to_le_bytes());
        let end = (offset + size) as usize;
        if end > space.len() {
            return Err(VuError::InvalidParam);
        }
        Ok(space[offset as usize..end].to_vec())
    }
    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        unsupported()
    }
    fn set_backend_req_fd(&mut self, _backend: Backend) {}
    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        unsupported()
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        unsupported()
    }
    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        unsupported()
    }
    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        unsupported()
    }
    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        unsupported()
    }
    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        unsupported()
    }
    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        unsupported()
    }
    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        unsupported()
    }
    fn check_device_state(&mut self) -> VuResult<()> {
        unsupported()
    }
    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        unsupported()
    }
    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        unsupported()
    }
}

/// A running fake backend listening on a socket.
pub struct FakeServer {
    pub path: PathBuf,
    pub shared: Arc<Mutex<Shared>>,
    pub handler_errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

/// Default offered features: VERSION_1, PROTOCOL_FEATURES, MRG_RXBUF, EVENT_IDX, INDIRECT, MAC,
/// STATUS, plus offloads the guest must not ack by default.
pub const DEFAULT_FEATURES: u64 = (1 << 32)
    | (1 << 30)
    | (1 << 15)
    | (1 << 29)
    | (1 << 28)
    | (1 << 5)
    | (1 << 16)
    | (1 << 1)
    | (1 << 7);

impl FakeServer {
    /// Start listening at a fresh path under the temp dir; accept one connection.
    pub fn start(pairs: usize, features: u64, protocol: VhostUserProtocolFeatures) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "vutg-fake-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        Self::start_at(&path, pairs, features, protocol, Duration::ZERO)
    }

    /// Like `start` but binds `path` only after `delay` (to test connect retries).
    pub fn start_at(
        path: &Path,
        pairs: usize,
        features: u64,
        protocol: VhostUserProtocolFeatures,
        delay: Duration,
    ) -> Self {
        let shared = Arc::new(Mutex::new(Shared {
            features,
            protocol,
            queue_num: (2 * pairs) as u64,
            acked_features: 0,
            acked_protocol: 0,
            log: Vec::new(),
            mem: None,
            vrings: (0..2 * pairs).map(|_| Vring::default()).collect(),
            devices: (0..pairs).map(|_| None).collect(),
            mac: [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef],
            loopback: true,
            inject: (0..pairs).map(|_| VecDeque::new()).collect(),
            tx_seen: Vec::new(),
            exit: false,
        }));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        {
            let (path, shared, errors) = (path.to_path_buf(), shared.clone(), errors.clone());
            threads.push(std::thread::spawn(move || {
                std::thread::sleep(delay);
                let listener = UnixListener::bind(&path).unwrap();
                let (sock, _) = listener.accept().unwrap();
                let backend = Arc::new(Mutex::new(FakeBackend {
                    shared: shared.clone(),
                }));
                let mut h = BackendReqHandler::from_stream(sock, backend);
                loop {
                    match h.handle_request() {
                        Ok(()) => {}
                        Err(VuError::Disconnected)
                        | Err(VuError::PartialMessage)
                        | Err(VuError::SocketBroken(_)) => break,
                        Err(e) => errors.lock().unwrap().push(e.to_string()),
                    }
                }
                shared.lock().unwrap().exit = true;
            }));
        }
        {
            let shared = shared.clone();
            threads.push(std::thread::spawn(move || loop {
                {
                    let mut s = shared.lock().unwrap();
                    if s.exit {
                        break;
                    }
                    s.work();
                }
                std::thread::sleep(Duration::from_micros(200));
            }));
        }
        FakeServer {
            path: path.to_path_buf(),
            shared,
            handler_errors: errors,
            threads,
        }
    }

    /// Wait for the connection to end and the worker to exit.
    pub fn join(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.shared.lock().unwrap().exit = true;
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::super::frontend::{Guest, GuestConfig, GuestError, HandshakeOrder};
    use super::super::net::*;
    use super::super::queue::TxLayout;
    use super::super::run::{run, EchoWait, RunConfig, StopReason};
    use super::super::vhost_user::ProtoError;
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn all_proto() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    }

    fn cfg(srv: &FakeServer) -> GuestConfig {
        GuestConfig {
            queue_size: 64,
            mem_size: 16 << 20,
            reply_timeout: Duration::from_secs(2),
            ..GuestConfig::new(&srv.path)
        }
    }

    fn frame(len: usize, seq: u64) -> Vec<u8> {
        let mut f = Vec::new();
        FrameSpec::default().build(len, 0, seq, &mut f).unwrap();
        f
    }

    /// Send frames on pair `p` and collect what comes back on the same pair.
    fn echo(g: &mut Guest, p: usize, frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let pair = g.pair_mut(p).unwrap();
        pair.post_rx_buffers(usize::MAX).unwrap();
        let mut got = Vec::new();
        let mut i = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.len() < frames.len() {
            assert!(std::time::Instant::now() < deadline, "echo timed out");
            while i < frames.len() && pair.send_frame(&frames[i]).unwrap() {
                i += 1;
            }
            pair.wait(true, i < frames.len(), Some(Duration::from_millis(50)))
                .unwrap();
            pair.poll_rx(|f, h| {
                assert_eq!(h.gso_type, VIRTIO_NET_HDR_GSO_NONE);
                got.push(f.to_vec())
            })
            .unwrap();
            pair.post_rx_buffers(usize::MAX).unwrap();
        }
        got
    }

    #[test]
    fn guest_and_pairs_are_send() {
        fn send<T: Send>() {}
        send::<Guest>();
        send::<super::super::queue::QueuePair>();
    }

    #[test]
    fn handshake_in_spec_order() {
        let srv = FakeServer::start(1, DEFAULT_FEATURES, all_proto());
        let g = Guest::connect(cfg(&srv)).unwrap();
        let want = bit(VIRTIO_F_VERSION_1)
            | bit(VHOST_USER_F_PROTOCOL_FEATURES)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS);
        assert_eq!(g.features(), want);
        assert!(!g.has_feature(VIRTIO_NET_F_GUEST_CSUM));
        assert_eq!(g.hdr_len(), 12);
        assert_eq!(g.mac(), Some([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]));
        assert_eq!(g.queue_num(), Some(2));
        let s = srv.shared.lock().unwrap();
        assert_eq!(s.acked_features, want);
        // The vhost crate's handler always adds REPLY_ACK to the offer.
        assert_eq!(
            s.acked_protocol,
            (all_proto() | VhostUserProtocolFeatures::REPLY_ACK).bits()
        );
        let mut expect = vec![
            "GET_FEATURES",
            "GET_PROTOCOL_FEATURES",
            "SET_PROTOCOL_FEATURES",
            "GET_QUEUE_NUM",
            "SET_OWNER",
            "SET_FEATURES",
            "GET_CONFIG",
            "SET_MEM_TABLE",
        ];
        for _ in 0..2 {
            expect.extend([
                "SET_VRING_NUM",
                "SET_VRING_ADDR",
                "SET_VRING_BASE",
                "SET_VRING_CALL",
                "SET_VRING_KICK",
                "SET_VRING_ENABLE",
            ]);
        }
        assert_eq!(s.log, expect);
        assert!(s.vrings.iter().all(|v| v.enabled));
        drop(s);
        assert!(srv.handler_errors.lock().unwrap().is_empty());
    }

    #[test]
    fn loopback_two_pairs_then_disconnect() {
        let srv = FakeServer::start(2, DEFAULT_FEATURES, all_proto());
        let mut g = Guest::connect(GuestConfig {
            queue_pairs: 2,
            tx_layout: TxLayout::Indirect,
            ..cfg(&srv)
        })
        .unwrap();
        assert_eq!(g.num_pairs(), 2);
        for p in 0..2 {
            let frames: Vec<_> = (0..200)
                .map(|i| frame(60 + (i * 37) % 1450, i as u64))
                .collect();
            let got = echo(&mut g, p, &frames);
            assert_eq!(got, frames);
        }
        let st = g.stats();
        assert_eq!(st.rx_frames, 400);
        assert_eq!(st.tx_frames, 400);
        assert_eq!(st.rx_mrg_incomplete, 0);
        assert!(st.kicks() > 0 && st.interrupts() > 0);
        // Reap the last TX completions, then stop like QEMU.
        for p in 0..2 {
            let pair = g.pair_mut(p).unwrap();
            let t0 = std::time::Instant::now();
            while pair.tx_in_flight() > 0 && t0.elapsed() < Duration::from_secs(5) {
                pair.reclaim_tx().unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let bases = g.disconnect().unwrap();
        assert_eq!(bases.len(), 4);
        // TX bases: every frame consumed. RX: 200 frames, each one buffer (≤1526 bytes).
        assert_eq!(bases[1], 200);
        assert_eq!(bases[3], 200);
        assert_eq!(bases[0], 200);
        assert!(matches!(g.disconnect(), Err(GuestError::NotConnected)));
        srv.join();
    }

    #[test]
    fn loopback_without_mrg_event_idx_indirect() {
        let srv = FakeServer::start(1, DEFAULT_FEATURES, all_proto());
        let mut g = Guest::connect(GuestConfig {
            mrg_rxbuf: false,
            event_idx: false,
            indirect_desc: false,
            reply_ack: false,
            tx_layout: TxLayout::Indirect, // falls back to chained
            ..cfg(&srv)
        })
        .unwrap();
        assert!(!g.has_feature(VIRTIO_NET_F_MRG_RXBUF));
        assert!(!g.has_feature(VIRTIO_RING_F_EVENT_IDX));
        assert_eq!(g.pair(0).unwrap().config().tx_layout, TxLayout::Chained);
        let frames: Vec<_> = (0..150).map(|i| frame(60 + i * 9, i as u64)).collect();
        assert_eq!(echo(&mut g, 0, &frames), frames);
    }

    #[test]
    fn small_mergeable_buffers() {
        let srv = FakeServer::start(1, DEFAULT_FEATURES, all_proto());
        let mut g = Guest::connect(GuestConfig {
            rx_buf_len: 256,
            ..cfg(&srv)
        })
        .unwrap();
        let frames: Vec<_> = (0..50).map(|i| frame(1514 - i, i as u64)).collect();
        assert_eq!(echo(&mut g, 0, &frames), frames);
        assert!(g.stats().rx_buffers >= 50 * 6);
    }

    #[test]
    fn qemu_order_is_sent() {
        // The vhost crate's handler rejects SET_VRING_ENABLE before SET_FEATURES without
        // replying; without REPLY_ACK the handshake still completes.
        let srv = FakeServer::start(1, DEFAULT_FEATURES, all_proto());
        let g = Guest::connect(GuestConfig {
            order: HandshakeOrder::Qemu,
            reply_ack: false,
            ..cfg(&srv)
        })
        .unwrap();
        let names: Vec<_> = g
            .sent_requests()
            .iter()
            .map(|&c| super::super::vhost_user::req::name(c))
            .collect();
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
        assert!(pos("SET_VRING_ENABLE") < pos("SET_FEATURES"));
        assert!(pos("SET_VRING_ERR") < pos("SET_MEM_TABLE"));
        assert_eq!(names.iter().filter(|n| **n == "GET_FEATURES").count(), 2);
        drop(g);
        assert_eq!(srv.handler_errors.lock().unwrap().len(), 2);

        // With REPLY_ACK the guest waits for an ack that never comes: a timeout, not a hang.
        let srv = FakeServer::start(1, DEFAULT_FEATURES, all_proto());
        let e = Guest::connect(GuestConfig {
            order: HandshakeOrder::Qemu,
            reply_timeout: Duration::from_millis(300),
            ..cfg(&srv)
        })
        .unwrap_err();
        assert!(
            matches!(
                &e,
                GuestError::Request {
                    source: ProtoError::Timeout {
                        req: "SET_VRING_ENABLE",
                        ..
                    },
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn connect_waits_for_the_socket_and_times_out() {
        let path = std::env::temp_dir().join(format!("vutg-late-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let srv = FakeServer::start_at(
            &path,
            1,
            DEFAULT_FEATURES,
            all_proto(),
            Duration::from_millis(300),
        );
        let g = Guest::connect(cfg(&srv)).unwrap();
        drop(g);
        srv.join();

        let missing = std::env::temp_dir().join("vutg-definitely-missing.sock");
        let e = Guest::connect(GuestConfig {
            connect_timeout: Duration::from_millis(100),
            ..GuestConfig::new(&missing)
        })
        .unwrap_err();
        assert!(matches!(e, GuestError::ConnectTimeout { .. }), "{e}");
    }

    #[test]
    fn multiqueue_needs_mq() {
        let srv = FakeServer::start(2, DEFAULT_FEATURES, VhostUserProtocolFeatures::CONFIG);
        let e = Guest::connect(GuestConfig {
            queue_pairs: 2,
            ..cfg(&srv)
        })
        .unwrap_err();
        assert!(matches!(e, GuestError::NoMultiqueue { pairs: 2 }), "{e}");
        let srv = FakeServer::start(1, DEFAULT_FEATURES, all_proto());
        srv.shared.lock().unwrap().queue_num = 1;
        let e = Guest::connect(GuestConfig {
            queue_pairs: 2,
            ..cfg(&srv)
        })
        .unwrap_err();
        assert!(
            matches!(e, GuestError::TooManyPairs { pairs: 2, max: 1 }),
            "{e}"
        );
    }

    #[test]
    fn raw_indirect_rx_chain_is_filled() {
        use super::super::ring::{RawDesc, RawNext, VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
        let srv = FakeServer::start(1, DEFAULT_FEATURES, all_proto());
        srv.shared.lock().unwrap().loopback = false;
        let mut g = Guest::connect(cfg(&srv)).unwrap();
        let table = g.alloc_scratch(32, 16).unwrap();
        let buf = g.alloc_scratch(4096, 64).unwrap();
        let entry = |addr: u64, len: u32, flags: u16| RawDesc {
            addr,
            len,
            flags,
            next: RawNext::Follow,
        };
        g.write_desc_table(
            table,
            &[
                entry(buf.0, 12, VRING_DESC_F_WRITE | 1),
                entry(buf.0 + 64, 2000, VRING_DESC_F_WRITE),
            ],
        )
        .unwrap();
        let head = g
            .post_raw_rx_chain(&[entry(table.0, 32, VRING_DESC_F_INDIRECT)])
            .unwrap();
        srv.shared.lock().unwrap().inject[0].push_back(frame(500, 1));
        assert!(g.wait_interrupt(0, Duration::from_secs(5)).unwrap());
        assert_eq!(g.poll_rx(|_, _| ()).unwrap(), 0);
        let done = g.take_raw_completions();
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].queue, done[0].head, done[0].len), (0, head, 512));
        let mut got = vec![0u8; 500];
        use vm_memory::Bytes;
        g.memory()
            .read_slice(&mut got, vm_memory::GuestAddress(buf.0 + 64))
            .unwrap();
        assert_eq!(got, frame(500, 1));
        // Normal buffers afterwards.
        srv.shared.lock().unwrap().loopback = true;
        let frames: Vec<_> = (0..10).map(|i| frame(80, i)).collect();
        assert_eq!(echo(&mut g, 0, &frames), frames);
    }

    #[test]
    fn legacy_backend_without_protocol_features() {
        let feats = DEFAULT_FEATURES & !(1 << 30) & !(1 << 32) & !(1 << 15);
        let srv = FakeServer::start(1, feats, VhostUserProtocolFeatures::empty());
        let mut g = Guest::connect(cfg(&srv)).unwrap();
        assert_eq!(g.hdr_len(), 10);
        assert_eq!(g.mac(), None);
        let frames: Vec<_> = (0..20).map(|i| frame(100, i)).collect();
        assert_eq!(echo(&mut g, 0, &frames), frames);
    }

    #[test]
    fn run_mode_sends_and_receives() {
        let srv = FakeServer::start(2, DEFAULT_FEATURES, all_proto());
        let mut g = Guest::connect(GuestConfig {
            queue_pairs: 2,
            ..cfg(&srv)
        })
        .unwrap();
        let stop = AtomicBool::new(false);
        let rc = RunConfig {
            tx_frames: 1001,
            tx_size: 128,
            tx_batch: 8,
            idle: Duration::from_millis(200),
            duration: Some(Duration::from_secs(20)),
            frame: FrameSpec {
                udp: Some("10.0.0.2:1000->10.0.0.1:2000".parse().unwrap()),
                ..FrameSpec::default()
            },
            ..RunConfig::default()
        };
        let r = run(&mut g, &rc, &stop).unwrap();
        assert_eq!(r.stop_reason, StopReason::TxDone);
        assert_eq!(r.tx_frames, 1001);
        assert_eq!(r.rx_frames, 1001);
        assert_eq!(r.rx_tagged, 1001);
        assert_eq!(r.tx_completed, 1001);
        assert_eq!(r.tx_bytes, 1001 * 128);
        let seen = srv.shared.lock().unwrap().tx_seen.len();
        assert_eq!(seen, 1001);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.starts_with("{\"rx_frames\":1001,\"rx_bytes\":128128,\"tx_frames\":1001"));
    }

    #[test]
    fn echo_mode_answers_udp_and_skips_the_rest() {
        for wait in [EchoWait::Interrupt, EchoWait::Poll] {
            let srv = FakeServer::start(1, DEFAULT_FEATURES, all_proto());
            srv.shared.lock().unwrap().loopback = false;
            let mut g = Guest::connect(cfg(&srv)).unwrap();
            let spec = FrameSpec {
                udp: Some("10.0.0.1:7000->10.0.0.2:5000".parse().unwrap()),
                dst_mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                src_mac: [2, 0, 0, 0, 0, 1],
            };
            let requests: Vec<Vec<u8>> = (0..100)
                .map(|i| {
                    let mut f = Vec::new();
                    spec.build(80, 0, i, &mut f).unwrap();
                    f
                })
                .collect();
            {
                let mut s = srv.shared.lock().unwrap();
                for (i, f) in requests.iter().enumerate() {
                    s.inject[0].push_back(f.clone());
                    if i % 50 == 0 {
                        s.inject[0].push_back(frame(60, i as u64));
                    }
                }
            }
            let rc = RunConfig {
                rx_frames: Some(102),
                duration: Some(Duration::from_secs(20)),
                echo: Some(wait),
                ..RunConfig::default()
            };
            let r = run(&mut g, &rc, &AtomicBool::new(false)).unwrap();
            assert_eq!(r.stop_reason, StopReason::RxFrames, "{wait:?}");
            assert_eq!((r.echoed, r.echo_skipped), (100, 2), "{wait:?}");
            // The device reports the replies it has taken by completing them.
            let pair = g.pair_mut(0).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while pair.tx_in_flight() > 0 {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                assert!(!left.is_zero(), "{wait:?}: replies not completed");
                pair.wait_tx_interrupt(Some(left)).unwrap();
                pair.reclaim_tx().unwrap();
            }
            let seen = srv.shared.lock().unwrap().tx_seen.clone();
            assert_eq!(seen.len(), 100, "{wait:?}");
            for (reply, req) in seen.iter().zip(&requests) {
                let mut want = req.clone();
                assert!(udp_echo_reply(&mut want, false));
                assert_eq!(reply, &want, "{wait:?}");
            }
            let bad = RunConfig { tx_frames: 1, ..rc };
            assert!(run(&mut g, &bad, &AtomicBool::new(false)).is_err());
        }
    }

    #[test]
    fn run_mode_rate_limited_rx() {
        let srv = FakeServer::start(1, DEFAULT_FEATURES, all_proto());
        srv.shared.lock().unwrap().loopback = false;
        let mut g = Guest::connect(cfg(&srv)).unwrap();
        {
            let mut s = srv.shared.lock().unwrap();
            for i in 0..2000 {
                s.inject[0].push_back(frame(100, i));
            }
        }
        let stop = AtomicBool::new(false);
        let rc = RunConfig {
            rx_rate: 500,
            duration: Some(Duration::from_millis(1000)),
            ..RunConfig::default()
        };
        let r = run(&mut g, &rc, &stop).unwrap();
        assert_eq!(r.stop_reason, StopReason::Duration);
        // 500/s for 1 s plus the initial token.
        assert!(
            (400..=560).contains(&r.rx_frames),
            "rx_frames {}",
            r.rx_frames
        );
        // The backend saw a slow guest: frames are still queued.
        assert!(srv.shared.lock().unwrap().inject[0].len() > 1000);

        // The stop flag ends a run without limits.
        let stop = AtomicBool::new(true);
        let r = run(&mut g, &RunConfig::default(), &stop).unwrap();
        assert_eq!(r.stop_reason, StopReason::Signal);
    }
}
