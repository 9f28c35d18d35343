//! The data path wired in-process, without vhost-user and without a real tap: the synthetic
//! guest's queue pair on shared memory, the daemon's [`Rx`]/[`Tx`] on the same rings, and a
//! SOCK_SEQPACKET socketpair standing in for the tap (it keeps frame boundaries as a tap does).
//! Used by the allocation test and the micro-benchmarks; needs no privileges.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::mem::GuestRam;
use crate::queue::{PairConfig, QueuePair, TxLayout};
use vhost_user_tap::dirty_log::DirtyLog;
use vhost_user_tap::pair::{Pair, PairError, PairLog, PairRest, PairSetup, QueueRun, Stopped};
use vhost_user_tap::ring::Notifier;
use vhost_user_tap::rx::{RxCarry, RxState};
use vhost_user_tap::stats::PairStats;
use vhost_user_tap::tap::Tap;
use vhost_user_tap::tx::TxState;
use vhost_user_tap::uring::{Op, TapRing};
use vhost_user_tap::virtio_net::{NetFeatures, HDR_LEN};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

#[derive(Debug, Error)]
pub enum LoopbackError {
    #[error("guest side: {0}")]
    Guest(String),
    #[error("setting up the device queue: {0}")]
    Queue(String),
    #[error("socketpair: {0}")]
    Socket(#[source] io::Error),
}

/// Ring and buffer geometry of the loopback.
#[derive(Clone, Copy, Debug)]
pub struct LoopbackConfig {
    pub queue_size: u16,
    pub mrg_rxbuf: bool,
    pub event_idx: bool,
    pub rx_buf_len: u32,
    /// TX writes and RX reads through io_urings (as the daemon does by default) instead of
    /// writev and readv.
    pub io_uring: bool,
}

impl Default for LoopbackConfig {
    fn default() -> Self {
        LoopbackConfig {
            queue_size: 256,
            mrg_rxbuf: true,
            event_idx: true,
            rx_buf_len: 1536,
            io_uring: false,
        }
    }
}

pub struct Loopback {
    pub guest: QueuePair,
    /// The daemon's side: one queue pair, as a worker runs it (here driven by hand).
    pair: Option<Pair>,
    /// The dirty log the pair marks from its next start, as while a migration runs.
    log: Option<Arc<DirtyLog>>,
    pub stats: Arc<PairStats>,
    /// The daemon's end of the socketpair.
    pub tap: Arc<Tap>,
    /// The kernel's end: write here what "the host sends", read what the daemon wrote.
    pub wire: OwnedFd,
    mem: Arc<GuestMemoryMmap>,
    features: NetFeatures,
    _ram: GuestRam,
}

/// The daemon's view of one of the guest's rings, with dups of its eventfds.
fn queue_run(
    ring: &crate::ring::DriverRing,
    kick: i32,
    call: i32,
) -> Result<QueueRun, LoopbackError> {
    let l = *ring.layout();
    let err = |e: virtio_queue::Error| LoopbackError::Queue(e.to_string());
    let mut q = Queue::new(l.size).map_err(err)?;
    q.try_set_desc_table_address(l.desc_table).map_err(err)?;
    q.try_set_avail_ring_address(l.avail_ring).map_err(err)?;
    q.try_set_used_ring_address(l.used_ring).map_err(err)?;
    q.set_ready(true);
    Ok(QueueRun {
        queue: q,
        kick: dup_file(kick)?,
        call: Some(dup_file(call)?),
        err: None,
        used_log_gpa: l.used_ring.0,
    })
}

fn dup_file(fd: i32) -> Result<Arc<File>, LoopbackError> {
    // SAFETY: dup of a descriptor the guest owns and keeps open; the copy is ours.
    let d = unsafe { libc::dup(fd) };
    if d < 0 {
        return Err(LoopbackError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: `d` is a fresh descriptor nothing else owns.
    Ok(Arc::new(unsafe { File::from_raw_fd(d) }))
}

/// A TX and an RX io_uring on `tap`, or none.
fn rings(tap: &Tap, io_uring: bool) -> io::Result<(Option<TapRing>, Option<TapRing>)> {
    if !io_uring {
        return Ok((None, None));
    }
    Ok((
        Some(TapRing::new(tap, Op::Write)?),
        Some(TapRing::new(tap, Op::Read)?),
    ))
}

impl Loopback {
    pub fn new(cfg: LoopbackConfig) -> Result<Loopback, LoopbackError> {
        let mut ram =
            GuestRam::new(64 << 20, 0).map_err(|e| LoopbackError::Guest(e.to_string()))?;
        let pc = PairConfig {
            queue_size: cfg.queue_size,
            hdr_len: HDR_LEN,
            mrg_rxbuf: cfg.mrg_rxbuf,
            event_idx: cfg.event_idx,
            indirect: true,
            rx_offloads: false,
            rx_buf_len: cfg.rx_buf_len,
            tx_max_frame: 1514,
            tx_layout: TxLayout::Single,
        };
        let guest =
            QueuePair::new(&mut ram, 0, pc).map_err(|e| LoopbackError::Guest(e.to_string()))?;
        let mem = Arc::new(ram.memory().clone());
        let bit = |f: u32| 1u64 << f;
        let mut acked = bit(VIRTIO_F_VERSION_1);
        if cfg.mrg_rxbuf {
            acked |= bit(VIRTIO_NET_F_MRG_RXBUF);
        }
        if cfg.event_idx {
            acked |= bit(VIRTIO_RING_F_EVENT_IDX);
        }
        let features = NetFeatures { acked };

        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into `fds`, which has room for them.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(LoopbackError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: both descriptors are fresh and owned by nothing else.
        let (dev, wire) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let tap = Arc::new(Tap::from_file(dev, "loopback"));
        let (tx_ring, rx_ring) = rings(&tap, cfg.io_uring).map_err(LoopbackError::Socket)?;
        let mut lb = Loopback {
            guest,
            pair: None,
            log: None,
            stats: Arc::new(PairStats::default()),
            tap,
            wire,
            mem,
            features,
            _ram: ram,
        };
        let rx = queue_run(
            lb.guest.rx_ring(),
            lb.guest.rx_kick_fd(),
            lb.guest.rx_call_fd(),
        )?;
        let tx = queue_run(
            lb.guest.tx_ring(),
            lb.guest.tx_kick_fd(),
            lb.guest.tx_call_fd(),
        )?;
        lb.start(
            PairRest {
                carry: RxCarry::default(),
                tx_ring,
                rx_ring,
            },
            rx,
            tx,
        );
        Ok(lb)
    }

    fn start(&mut self, rest: PairRest, rx: QueueRun, tx: QueueRun) {
        self.pair = Some(Pair::start(PairSetup {
            index: 0,
            features: self.features,
            mtu: 1500,
            busy_poll: std::time::Duration::ZERO,
            mem: self.mem.clone(),
            tap: self.tap.clone(),
            stats: self.stats.clone(),
            rest,
            rx: Some(rx),
            tx: Some(tx),
            log: self.log.clone().map(|log| PairLog {
                log,
                signal: Notifier::default(),
            }),
        }));
    }

    /// Log guest-memory writes into `log` (None: stop logging) from the pair's next start, as the
    /// session makes a pair do while a migration runs.
    pub fn set_log(&mut self, log: Option<Arc<DirtyLog>>) {
        self.log = log;
    }

    fn pair(&mut self) -> &mut Pair {
        self.pair.as_mut().expect("the pair runs")
    }

    /// Stop the pair, as the session does before it changes anything: the rings' positions and
    /// what the pair keeps.
    pub fn stop(&mut self) -> Stopped {
        self.pair.take().expect("the pair runs").stop()
    }

    /// Stop the pair and start it again on another tap (through fresh io_urings, not probed, or
    /// readv and writev), the rings where they were and the staged frames kept.
    pub fn restart_with(&mut self, tap: Tap, io_uring: bool) -> Result<(), LoopbackError> {
        let (tx_ring, rx_ring) = rings(&tap, io_uring).map_err(LoopbackError::Socket)?;
        let stopped = self.stop();
        self.tap = Arc::new(tap);
        let run = |q: Option<Queue>, kick, call| -> Result<QueueRun, LoopbackError> {
            let queue = q.expect("the direction ran");
            Ok(QueueRun {
                used_log_gpa: queue.used_ring(),
                queue,
                kick: dup_file(kick)?,
                call: Some(dup_file(call)?),
                err: None,
            })
        };
        let rx = run(stopped.rx, self.guest.rx_kick_fd(), self.guest.rx_call_fd())?;
        let tx = run(stopped.tx, self.guest.tx_kick_fd(), self.guest.tx_call_fd())?;
        let rest = PairRest {
            carry: stopped.rest.carry,
            tx_ring,
            rx_ring,
        };
        self.start(rest, rx, tx);
        Ok(())
    }

    /// What the host stack would hand the tap: a zeroed vnet header, then the frame. False when
    /// the socket's buffer is full.
    pub fn inject(&self, frame: &[u8]) -> io::Result<bool> {
        let hdr = [0u8; HDR_LEN];
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut _,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut _,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs point at live buffers of the stated lengths; writev only reads.
        let n = unsafe { libc::writev(self.wire.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(true)
    }

    /// Frames the daemon wrote toward the host (vnet header included), each passed to `f`.
    pub fn drain_wire(&self, buf: &mut [u8], mut f: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        loop {
            // SAFETY: reads at most buf.len() bytes into `buf`.
            let r =
                unsafe { libc::recv(self.wire.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if r <= 0 {
                return n;
            }
            f(&buf[..r as usize]);
            n += 1;
        }
    }

    pub fn rx_process(&mut self) -> Result<RxState, PairError> {
        self.pair().process_rx()
    }

    pub fn tx_process(&mut self) -> Result<TxState, PairError> {
        self.pair().process_tx()
    }

    /// The guest's kick on RX, as the worker delivers it.
    pub fn rx_kick(&mut self) -> Result<(), PairError> {
        self.pair().rx_kicked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(i: u32, len: usize) -> Vec<u8> {
        let mut f = vec![0xffu8; 12];
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(&i.to_be_bytes());
        f.resize(len, (i % 251) as u8);
        f
    }

    #[test]
    fn frames_cross_the_loopback_both_ways_intact() {
        let mut lb = Loopback::new(LoopbackConfig::default()).unwrap();
        lb.guest.post_rx_buffers(usize::MAX).unwrap();
        for i in 0..100 {
            assert!(lb.inject(&frame(i, 60 + i as usize * 7)).unwrap());
        }
        assert_eq!(lb.rx_process().unwrap(), RxState::TapEmpty);
        let mut got = Vec::new();
        lb.guest.poll_rx(|f, _| got.push(f.to_vec())).unwrap();
        assert_eq!(got.len(), 100);
        for (i, f) in got.iter().enumerate() {
            assert_eq!(*f, frame(i as u32, 60 + i * 7));
        }
        for i in 0..50 {
            assert!(lb.guest.send_frame(&frame(i, 100)).unwrap());
        }
        assert_eq!(lb.tx_process().unwrap(), TxState::Idle);
        let mut buf = vec![0u8; 70_000];
        let mut out = Vec::new();
        lb.drain_wire(&mut buf, |f| out.push(f[HDR_LEN..].to_vec()));
        assert_eq!(out.len(), 50);
        assert!(out
            .iter()
            .enumerate()
            .all(|(i, f)| *f == frame(i as u32, 100)));
    }

    #[test]
    fn one_interrupt_per_batch_and_a_budget_that_yields() {
        let mut lb = Loopback::new(LoopbackConfig::default()).unwrap();
        lb.guest.post_rx_buffers(usize::MAX).unwrap();
        // The guest asks for an interrupt (arms used_event) as a Linux driver does in NAPI.
        lb.guest
            .wait_rx_interrupt(Some(std::time::Duration::ZERO))
            .unwrap();
        for i in 0..100 {
            assert!(lb.inject(&frame(i, 64)).unwrap());
        }
        assert_eq!(lb.rx_process().unwrap(), RxState::TapEmpty);
        let s = lb.stats.snapshot();
        assert_eq!(s.rx_frames, 100);
        assert_eq!(s.rx_interrupts, 1, "100 frames in one batch: one interrupt");

        // More frames than one wake-up may move: RX yields after FRAME_BUDGET so TX gets a turn.
        lb.guest.poll_rx(|_, _| {}).unwrap();
        lb.guest.post_rx_buffers(usize::MAX).unwrap();
        fill_wire_past_a_budget(&lb);
        assert_eq!(lb.rx_process().unwrap(), RxState::Ready);
        assert_eq!(
            lb.stats.snapshot().rx_frames,
            100 + vhost_user_tap::rx::FRAME_BUDGET
        );
    }

    /// Fill the wire with 64-byte frames numbered from `from` until it takes no more; returns
    /// the next number.
    fn fill_wire(lb: &Loopback, from: u32) -> u32 {
        let mut i = from;
        while lb.inject(&frame(i, 64)).unwrap() {
            i += 1;
        }
        i
    }

    /// Fill the wire from frame 0 with more frames than one RX batch may move; returns how many.
    fn fill_wire_past_a_budget(lb: &Loopback) -> u32 {
        let sent = fill_wire(lb, 0);
        assert!(
            sent > vhost_user_tap::rx::FRAME_BUDGET as u32,
            "the wire took only {sent}"
        );
        sent
    }

    /// A 1024-entry loopback under load: the guest armed its interrupt at 0 (it wants one for
    /// the first frame), the wire full, one batch run that ended on its budget, and no interrupt
    /// yet (a quarter ring). Returns it and how many frames went onto the wire.
    fn loaded_past_a_budget() -> (Loopback, u32) {
        let mut lb = Loopback::new(LoopbackConfig {
            queue_size: 1024,
            ..LoopbackConfig::default()
        })
        .unwrap();
        lb.guest.post_rx_buffers(usize::MAX).unwrap();
        lb.guest
            .wait_rx_interrupt(Some(std::time::Duration::ZERO))
            .unwrap();
        let sent = fill_wire_past_a_budget(&lb);
        assert_eq!(lb.rx_process().unwrap(), RxState::Ready);
        assert_eq!(
            lb.stats.snapshot().rx_interrupts,
            0,
            "a quarter ring: no interrupt yet"
        );
        (lb, sent)
    }

    /// Interrupt moderation: under load (each batch ends on its budget) a guest that asked for
    /// an interrupt gets it once half its ring is used, not after every batch; the frames are
    /// published every batch all the same, and a tap that runs dry interrupts at once.
    #[test]
    fn under_load_the_guest_is_interrupted_once_per_half_ring() {
        use vhost_user_tap::rx::FRAME_BUDGET;
        let (mut lb, mut sent) = loaded_past_a_budget();
        let mut seen = Vec::new();
        lb.guest.poll_rx(|f, _| seen.push(f.to_vec())).unwrap();
        assert_eq!(
            seen.len() as u64,
            FRAME_BUDGET,
            "published without an interrupt"
        );

        sent = fill_wire(&lb, sent);
        assert_eq!(lb.rx_process().unwrap(), RxState::Ready);
        assert_eq!(
            lb.stats.snapshot().rx_interrupts,
            1,
            "half the ring: interrupted"
        );
        while lb.rx_process().unwrap() == RxState::Ready {}
        lb.guest.poll_rx(|f, _| seen.push(f.to_vec())).unwrap();
        assert_eq!(seen.len() as u32, sent);
        assert!(seen
            .iter()
            .enumerate()
            .all(|(i, f)| *f == frame(i as u32, 64)));
        // Re-armed at what it took: the last frame, after a batch that emptied the wire, is
        // interrupted at once.
        lb.guest
            .wait_rx_interrupt(Some(std::time::Duration::ZERO))
            .unwrap();
        let before = lb.stats.snapshot().rx_interrupts;
        assert!(lb.inject(&frame(sent, 64)).unwrap());
        assert_eq!(lb.rx_process().unwrap(), RxState::TapEmpty);
        assert_eq!(lb.stats.snapshot().rx_interrupts, before + 1);
    }

    /// An interrupt moderation deferred is sent when the worker stops: the next worker starts
    /// with nothing pending and would never send it.
    #[test]
    fn a_stopping_rx_sends_the_interrupt_it_deferred() {
        let (mut lb, _) = loaded_past_a_budget();
        lb.stop();
        assert_eq!(lb.stats.snapshot().rx_interrupts, 1);
        // The call eventfd was written: the guest consumes and counts it.
        lb.guest
            .wait_rx_interrupt(Some(std::time::Duration::ZERO))
            .unwrap();
        assert_eq!(lb.guest.stats().rx_interrupts, 1);
    }

    #[test]
    fn the_guest_recycles_multi_buffer_frames_without_reading_them() {
        let mut lb = Loopback::new(LoopbackConfig {
            rx_buf_len: 256,
            ..LoopbackConfig::default()
        })
        .unwrap();
        lb.guest.post_rx_buffers(usize::MAX).unwrap();
        for i in 0..20 {
            assert!(lb.inject(&frame(i, 60 + 50 * i as usize)).unwrap());
        }
        assert_eq!(lb.rx_process().unwrap(), RxState::TapEmpty);
        assert_eq!(lb.guest.recycle_rx(usize::MAX).unwrap(), 20);
        assert_eq!(lb.stats.snapshot().rx_frames, 20);
        assert!(
            lb.guest.stats().rx_buffers > 20,
            "some frames spanned several buffers"
        );
    }

    #[test]
    fn a_stopped_rx_hands_unused_buffers_back_exactly_once() {
        use crate::ring::{RawDesc, RawNext};
        use virtio_queue::QueueT;
        // Plain case: the window's unused chains go back to the avail ring.
        let mut lb = Loopback::new(LoopbackConfig::default()).unwrap();
        lb.guest.post_rx_buffers(2).unwrap();
        assert_eq!(lb.rx_process().unwrap(), RxState::TapEmpty);
        let q = lb.stop().rx.expect("RX ran");
        assert_eq!(
            q.next_avail(),
            0,
            "both buffers returned for the next session"
        );

        // A malformed chain between two good ones is completed when popped, so rewinding
        // would hand it out twice: the good ones come back used and empty instead.
        let mut lb = Loopback::new(LoopbackConfig::default()).unwrap();
        lb.guest.post_rx_buffers(1).unwrap();
        lb.guest
            .post_raw_rx_chain(&[RawDesc {
                addr: 0x1000,
                len: 64,
                flags: 0, // read-only: wrong direction for RX
                next: RawNext::Follow,
            }])
            .unwrap();
        lb.guest.post_rx_buffers(1).unwrap();
        assert_eq!(lb.rx_process().unwrap(), RxState::TapEmpty);
        assert_eq!(lb.stats.snapshot().rx_bad_desc, 1);
        let q = lb.stop().rx.expect("RX ran");
        assert_eq!(q.next_avail(), 3, "nothing is handed out twice");
        assert_eq!(lb.guest.poll_rx(|_, _| {}).unwrap(), 0);
        assert_eq!(lb.guest.take_raw_completions().len(), 1);
        assert_eq!(
            lb.guest.stats().rx_bad_frames,
            2,
            "the good buffers came back empty"
        );
    }

    /// Frames of mixed sizes (some larger than one buffer) against a guest posting a few small
    /// buffers at a time, with restarts between: every frame arrives once, whole, in order,
    /// through batched io_uring reads (a frame outgrowing its buffer mid-batch holds back the
    /// frames read after it) as through readv.
    fn mixed_frames_arrive_in_order(io_uring: bool) {
        use std::os::fd::AsFd;
        let mut lb = Loopback::new(LoopbackConfig {
            rx_buf_len: 512,
            io_uring,
            ..LoopbackConfig::default()
        })
        .unwrap();
        let mut seed = 7u32;
        let mut rand = move |m: u32| {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (seed >> 8) % m
        };
        const N: u32 = 3000;
        let (mut sent, mut got) = (0u32, Vec::new());
        let mut rounds = 0;
        while got.len() < N as usize {
            rounds += 1;
            assert!(rounds < 100_000, "no progress: {} of {N} frames", got.len());
            // Mostly small frames, so batches form; every tenth one needs several buffers.
            for _ in 0..rand(40) {
                let len = if rand(10) == 0 {
                    600 + rand(3000)
                } else {
                    60 + rand(400)
                };
                if sent == N || !lb.inject(&frame(sent, len as usize)).unwrap() {
                    break;
                }
                sent += 1;
            }
            lb.guest.post_rx_buffers(1 + rand(24) as usize).unwrap();
            lb.rx_kick().unwrap();
            lb.rx_process().unwrap();
            lb.guest.poll_rx(|f, _| got.push(f.to_vec())).unwrap();
            if rand(50) == 0 {
                let fd = lb.tap.as_fd().try_clone_to_owned().unwrap();
                lb.restart_with(Tap::from_file(File::from(fd), "dup"), io_uring)
                    .unwrap();
            }
        }
        for (i, f) in got.iter().enumerate() {
            let tag = u32::from_be_bytes(f[14..18].try_into().unwrap());
            assert_eq!(tag, i as u32, "frame {i} out of order");
            assert_eq!(*f, frame(tag, f.len()), "frame {i} altered");
        }
        let s = lb.stats.snapshot();
        assert_eq!(s.rx_frames, u64::from(N));
        assert_eq!(s.rx_dropped_oversize + s.rx_dropped_unfit, 0);
        if io_uring {
            assert!(s.rx_staged > 0, "no frame outgrew its buffer in a batch");
        }
    }

    #[test]
    fn mixed_frames_arrive_in_order_through_readv() {
        mixed_frames_arrive_in_order(false);
    }

    #[test]
    fn mixed_frames_arrive_in_order_through_io_uring_batches() {
        mixed_frames_arrive_in_order(true);
    }

    /// A frame read whole into a chain larger than a staging slot, behind one that has to wait:
    /// it cannot wait in order, so it is dropped and counted, not sliced out of bounds. (tun
    /// never hands out such a frame; the socket standing in for it here does.) Only a read into
    /// the guest's chains gets there, so the batch before ends with a large frame: the next
    /// batch reads into chains, not whole into staging.
    #[test]
    fn a_frame_larger_than_a_slot_behind_a_staged_one_is_counted_not_a_panic() {
        use crate::ring::{RawDesc, RawNext, VRING_DESC_F_WRITE};
        let mut lb = Loopback::new(LoopbackConfig {
            rx_buf_len: 512,
            io_uring: true,
            ..LoopbackConfig::default()
        })
        .unwrap();
        // Three frames for three buffers: batches of 1 and 2 that all find a frame, so the next
        // batch asks for more; the last frame is large.
        lb.guest.post_rx_buffers(2).unwrap();
        lb.guest
            .post_raw_rx_chain(&[RawDesc {
                addr: 40 << 20,
                len: 4096,
                flags: VRING_DESC_F_WRITE,
                next: RawNext::Follow,
            }])
            .unwrap();
        for (i, len) in [(0, 100), (1, 100), (2, 3000)] {
            assert!(lb.inject(&frame(i, len)).unwrap());
        }
        assert_eq!(lb.rx_process().unwrap(), RxState::WaitingForBuffers);
        assert_eq!(lb.stats.snapshot().rx_frames, 3);
        lb.guest.post_rx_buffers(1).unwrap();
        lb.guest
            .post_raw_rx_chain(&[RawDesc {
                addr: 48 << 20,
                len: 70_000,
                flags: VRING_DESC_F_WRITE,
                next: RawNext::Follow,
            }])
            .unwrap();
        assert!(
            lb.inject(&frame(3, 600)).unwrap(),
            "outgrows its 512-byte buffer"
        );
        assert!(lb.inject(&frame(4, 68_000)).unwrap(), "larger than a slot");
        lb.rx_kick().unwrap();
        lb.rx_process().unwrap();
        let s = lb.stats.snapshot();
        assert_eq!((s.rx_frames, s.rx_staged, s.rx_dropped_oversize), (4, 1, 1));
    }

    /// Fuzz finding (datapath): a staged frame the restarted RX drops for an offload the guest
    /// did not accept was counted only at RX's next batch, so a second restart before that
    /// batch lost the count.
    #[test]
    fn an_unfit_staged_frame_is_counted_across_restarts_before_any_batch() {
        use std::os::fd::AsFd;
        let mut lb = Loopback::new(LoopbackConfig {
            rx_buf_len: 256,
            ..LoopbackConfig::default()
        })
        .unwrap();
        lb.guest.post_rx_buffers(1).unwrap();
        // Checksum-partial, as the tap hands frames to a guest that accepted checksum offload;
        // this one did not, so the restarted RX cannot deliver it. (The fuzzer got there with
        // a buffer posted twice, which put frame bytes where staging keeps the header.)
        let mut f = vec![0u8; HDR_LEN];
        f[0] = crate::net::VIRTIO_NET_HDR_F_NEEDS_CSUM;
        f.extend_from_slice(&frame(0, 600));
        let wire = std::os::unix::net::UnixDatagram::from(lb.wire.try_clone().unwrap());
        assert_eq!(wire.send(&f).unwrap(), f.len());
        assert_eq!(lb.rx_process().unwrap(), RxState::WaitingForBuffers);
        assert_eq!(lb.stats.snapshot().rx_staged, 1);
        for _ in 0..2 {
            let fd = lb.tap.as_fd().try_clone_to_owned().unwrap();
            lb.restart_with(Tap::from_file(File::from(fd), "dup"), false)
                .unwrap();
        }
        assert_eq!(lb.stats.snapshot().rx_dropped_unfit, 1);
        lb.guest.post_rx_buffers(usize::MAX).unwrap();
        lb.rx_process().unwrap();
        let s = lb.stats.snapshot();
        assert_eq!((s.rx_dropped_unfit, s.rx_frames), (1, 0), "counted once");
    }

    /// Fill the wire until a write would block, through the daemon's TX path; then drain it:
    /// every frame the guest queued arrives, once, in order.
    fn full_wire_keeps_tx_frames_for_later(io_uring: bool) {
        let mut lb = Loopback::new(LoopbackConfig {
            io_uring,
            ..LoopbackConfig::default()
        })
        .unwrap();
        let mut sent = 0;
        loop {
            while lb.guest.send_frame(&frame(sent, 1514)).unwrap() {
                sent += 1;
            }
            match lb.tx_process().unwrap() {
                TxState::TapFull => break,
                _ => lb.guest.reclaim_tx().map(drop).unwrap(),
            }
        }
        assert!(lb.stats.snapshot().tx_blocked >= 1);
        let mut buf = vec![0u8; 70_000];
        let mut received = 0u32;
        let mut check = |f: &[u8]| {
            assert_eq!(f[HDR_LEN..], frame(received, 1514), "frame {received}");
            received += 1;
        };
        lb.drain_wire(&mut buf, &mut check);
        // Room again: everything the guest queued goes out, nothing was dropped.
        loop {
            let out = lb.tx_process().unwrap();
            lb.drain_wire(&mut buf, &mut check);
            if out == TxState::Idle {
                break;
            }
        }
        assert_eq!(received, sent);
        assert_eq!(lb.stats.snapshot().daemon_drops(), 0);
        assert_eq!(lb.stats.snapshot().tx_frames, u64::from(sent));
    }

    #[test]
    fn a_full_wire_keeps_tx_frames_for_later() {
        full_wire_keeps_tx_frames_for_later(false);
    }

    #[test]
    fn a_full_wire_keeps_tx_frames_for_later_through_io_uring() {
        full_wire_keeps_tx_frames_for_later(true);
    }

    #[test]
    fn io_uring_tx_completes_malformed_chains_in_order_with_the_good_ones() {
        use crate::ring::{RawDesc, RawNext};
        let mut lb = Loopback::new(LoopbackConfig {
            io_uring: true,
            ..LoopbackConfig::default()
        })
        .unwrap();
        for i in 0..100u32 {
            if i % 10 == 5 {
                // Shorter than the vnet header: rejected, completed, counted.
                lb.guest
                    .post_raw_tx_chain(&[RawDesc {
                        addr: 0x1000,
                        len: 4,
                        flags: 0,
                        next: RawNext::Follow,
                    }])
                    .unwrap();
            } else {
                assert!(lb.guest.send_frame(&frame(i, 60 + i as usize)).unwrap());
            }
        }
        assert_eq!(lb.tx_process().unwrap(), TxState::Idle);
        let mut buf = vec![0u8; 70_000];
        let mut out = Vec::new();
        lb.drain_wire(&mut buf, |f| out.push(f[HDR_LEN..].to_vec()));
        let want: Vec<Vec<u8>> = (0..100u32)
            .filter(|i| i % 10 != 5)
            .map(|i| frame(i, 60 + i as usize))
            .collect();
        assert_eq!(out, want);
        let s = lb.stats.snapshot();
        assert_eq!((s.tx_frames, s.tx_dropped_bad_desc), (90, 10));
        assert_eq!(lb.guest.reclaim_tx().unwrap(), 100);
        assert_eq!(
            lb.guest.take_raw_completions().len(),
            10,
            "the malformed ones among them"
        );
    }

    /// TX publishes the used entries of each batch before it writes the next, so a guest
    /// waiting for room (Linux asks for the TX interrupt at 3/4 of what it has in flight) hears
    /// of it a batch after that point, not once the whole budget is written: it refills while
    /// the device still has frames, and the ring never runs dry between the two.
    ///
    /// The tap is a blocking socket that holds about ten frames (net.unix.max_dgram_qlen): when
    /// the reader takes frame 65, the first of the second batch, the writer cannot have got
    /// further than ~75 of the 200, so a publish only at the end of the budget would still
    /// show 0.
    #[test]
    fn tx_publishes_each_batch_before_writing_the_next() {
        use std::os::fd::AsFd;
        use std::sync::atomic::{AtomicU16, Ordering};
        use vm_memory::{GuestAddress, GuestMemoryBackend};
        const FRAMES: u32 = 200;
        let mut lb = Loopback::new(LoopbackConfig::default()).unwrap();
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into `fds`, which has room for them.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: fresh descriptors, owned from here on.
        let (dev, wire) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        lb.restart_with(Tap::from_file(dev, "blocking"), false)
            .unwrap();
        for i in 0..FRAMES {
            assert!(lb.guest.send_frame(&frame(i, 60)).unwrap());
        }
        let used = lb.guest.tx_ring().layout().used_ring.0 + 2;
        let used = lb
            .guest
            .memory()
            .get_host_address(GuestAddress(used))
            .unwrap() as usize;
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut seen = None;
            for n in 1..=FRAMES {
                // SAFETY: reads at most buf.len() bytes into `buf`.
                let r = unsafe {
                    libc::recv(
                        wire.as_fd().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                    )
                };
                assert!(r > 0, "frame {n}: {}", io::Error::last_os_error());
                if n == 65 {
                    // SAFETY: the used ring's 2-aligned index word, in guest memory the test
                    // keeps mapped until this thread is joined.
                    let idx = unsafe { AtomicU16::from_ptr(used as *mut u16) };
                    seen = Some(u16::from_le(idx.load(Ordering::Acquire)));
                }
            }
            seen.unwrap()
        });
        assert_eq!(lb.tx_process().unwrap(), TxState::Idle);
        let at_65 = reader.join().unwrap();
        assert!(
            at_65 >= 64,
            "frame 65 was on the wire while the guest saw {at_65} of the 64 before it completed"
        );
        assert_eq!(lb.stats.snapshot().tx_frames, u64::from(FRAMES));
    }

    /// The loopback with TX writing to `dev` instead of the socketpair, through a fresh io_uring
    /// (not probed) or writev.
    fn tx_into(mut lb: Loopback, dev: File, io_uring: bool) -> Loopback {
        let tap = Tap::from_file(dev, "fake");
        lb.restart_with(tap, io_uring).unwrap();
        lb
    }

    /// A FIFO takes writev but, like tun before Linux 6.4, refuses non-blocking writes through
    /// io_uring with EOPNOTSUPP. Returns (write end, read end, the directory holding it).
    fn fifo() -> (File, File, std::path::PathBuf) {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = std::env::temp_dir().join(format!("vut-fifo-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let path = dir.join(format!("f{}", rand_suffix()));
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let rd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let wr = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        (wr, rd, dir)
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn the_probe_finds_a_file_that_refuses_io_urings_writes() {
        let (wr, _rd, _) = fifo();
        let tap = Tap::from_file(wr, "fifo");
        let mut ring = TapRing::new(&tap, Op::Write).unwrap();
        assert!(matches!(
            ring.probe(),
            Err(vhost_user_tap::uring::ProbeError::NoNowait)
        ));
    }

    #[test]
    fn tx_refused_by_io_uring_falls_back_to_writev_and_loses_nothing() {
        use std::io::Read;
        let (wr, mut rd, _) = fifo();
        let mut lb = tx_into(Loopback::new(LoopbackConfig::default()).unwrap(), wr, true);
        let frames: Vec<Vec<u8>> = (0..100u32).map(|i| frame(i, 60 + i as usize)).collect();
        let mut sent = 0;
        while sent < frames.len() {
            while sent < frames.len() && lb.guest.send_frame(&frames[sent]).unwrap() {
                sent += 1;
            }
            assert_eq!(lb.tx_process().unwrap(), TxState::Idle);
            lb.guest.reclaim_tx().unwrap();
        }
        // A FIFO keeps no frame boundaries: the bytes are the frames, each after its header.
        let mut got = Vec::new();
        rd.read_to_end(&mut got).ok();
        let want: Vec<u8> = frames
            .iter()
            .flat_map(|f| [0u8; HDR_LEN].iter().chain(f.iter()).copied())
            .collect();
        assert!(
            got == want,
            "the bytes on the wire differ from the frames sent"
        );
        let s = lb.stats.snapshot();
        assert_eq!(s.tx_frames, 100);
        assert_eq!(s.tx_io_uring_fallbacks, 1, "one switch, then writev");
        assert_eq!(s.daemon_drops(), 0);
    }

    #[test]
    fn a_tap_that_refuses_every_frame_for_a_second_stops_the_pair() {
        let dev = File::open("/dev/null").unwrap(); // read-only: every write fails with EBADF
        let mut lb = tx_into(
            Loopback::new(LoopbackConfig::default()).unwrap(),
            dev,
            false,
        );
        let send = |lb: &mut Loopback, n: u32| {
            for i in 0..n {
                assert!(lb.guest.send_frame(&frame(i, 100)).unwrap());
            }
            let r = lb.tx_process();
            lb.guest.reclaim_tx().unwrap();
            r
        };
        // Refused frames are dropped and counted, but a second has not passed yet.
        assert_eq!(send(&mut lb, 100).unwrap(), TxState::Idle);
        assert_eq!(lb.stats.snapshot().tx_dropped_tap_error, 100);
        // The time is the condition itself here, not a stand-in for an event.
        std::thread::sleep(REFUSING_TIME_FOR_TESTS);
        let e = send(&mut lb, 1).unwrap_err();
        assert!(
            matches!(
                e,
                PairError::Tx(vhost_user_tap::tx::TxError::TapRefusesAll { frames: 101, .. })
            ),
            "{e}"
        );
        let s = lb.stats.snapshot();
        assert_eq!((s.tx_dropped_tap_error, s.tx_stops_tap_refusing), (101, 1));
    }

    const REFUSING_TIME_FOR_TESTS: std::time::Duration = std::time::Duration::from_millis(1050);

    /// A hostile ring, always full: each call does a bounded batch (one pop of at most 64
    /// chains, every one rejected within `MAX_CHAIN_DESCS` descriptors), and after
    /// `GARBAGE_CHAINS` rejected chains in a row the queue stops.
    fn hostile_ring_costs_bounded_batches_then_stops(rx: bool, attack: crate::hostile::Attack) {
        use crate::hostile::HostileRing;
        use vhost_user_tap::ring::{RingError, CHAIN_BUDGET, GARBAGE_CHAINS};
        let expensive = matches!(attack, crate::hostile::Attack::ZeroLengthChains { .. });
        let mut lb = Loopback::new(LoopbackConfig {
            queue_size: 1024,
            ..LoopbackConfig::default()
        })
        .unwrap();
        let ring = if rx {
            lb.guest.rx_ring()
        } else {
            lb.guest.tx_ring()
        };
        let (layout, avail) = (*ring.layout(), ring.avail_idx());
        let mut h = HostileRing::new(lb.guest.memory().clone(), layout, attack, avail);
        if rx {
            assert!(lb.inject(&frame(0, 100)).unwrap());
        }
        let bad = |lb: &Loopback| {
            let s = lb.stats.snapshot();
            if rx {
                s.rx_bad_desc
            } else {
                s.tx_dropped_bad_desc
            }
        };
        let mut calls = 0;
        let err = loop {
            h.refill();
            let before = bad(&lb);
            let r = if rx {
                lb.rx_process().map(|s| s == RxState::Ready)
            } else {
                lb.tx_process().map(|s| s == TxState::Ready)
            };
            // The chain budget, or one pop (64) once the descriptor budget is spent.
            let popped = bad(&lb) - before;
            let bound = if expensive { 64 } else { CHAIN_BUDGET };
            assert!(
                popped <= bound,
                "call {calls}: {popped} chains in one batch"
            );
            match r {
                Ok(ready) => assert!(ready, "call {calls}: a full ring leaves work for later"),
                Err(e) => break e,
            }
            calls += 1;
            assert!(calls <= GARBAGE_CHAINS, "the queue never stopped");
        };
        let garbage = matches!(
            err,
            PairError::Rx(vhost_user_tap::rx::RxError::Ring(RingError::Garbage(_)))
                | PairError::Tx(vhost_user_tap::tx::TxError::Ring(RingError::Garbage(_)))
        );
        assert!(garbage, "{err}");
        assert!(bad(&lb) >= u64::from(GARBAGE_CHAINS), "{}", bad(&lb));
        if rx {
            assert_eq!(lb.stats.snapshot().rx_frames, 0);
        }
    }

    #[test]
    fn a_tx_ring_full_of_long_zero_length_chains_costs_bounded_batches_then_stops() {
        let attack = crate::hostile::Attack::ZeroLengthChains {
            descs: 1024,
            writable: false,
        };
        hostile_ring_costs_bounded_batches_then_stops(false, attack);
    }

    #[test]
    fn an_rx_ring_full_of_long_zero_length_chains_costs_bounded_batches_then_stops() {
        let attack = crate::hostile::Attack::ZeroLengthChains {
            descs: 1024,
            writable: true,
        };
        hostile_ring_costs_bounded_batches_then_stops(true, attack);
    }

    #[test]
    fn a_ring_full_of_out_of_range_heads_costs_bounded_batches_then_stops() {
        let attack = crate::hostile::Attack::OutOfRangeHeads;
        hostile_ring_costs_bounded_batches_then_stops(false, attack);
        hostile_ring_costs_bounded_batches_then_stops(true, attack);
    }

    /// Finding 6 of the hostile-guest review: 255 zero-length descriptors chained into a
    /// 65,535-entry indirect table made 65,790 descriptors, counted in a u16 (a panic in
    /// debug builds, a wrap in release). The walk now stops at MAX_CHAIN_DESCS.
    #[test]
    fn a_chain_into_a_huge_indirect_table_is_rejected_after_a_bounded_walk() {
        use crate::ring::{write_desc_table, RawDesc, RawNext, VRING_DESC_F_INDIRECT};
        use vhost_user_tap::ring::MAX_CHAIN_DESCS;
        let mut lb = Loopback::new(LoopbackConfig {
            queue_size: 512,
            ..LoopbackConfig::default()
        })
        .unwrap();
        let table = vm_memory::GuestAddress(48 << 20);
        let zero = RawDesc {
            addr: 0,
            len: 0,
            flags: crate::ring::VRING_DESC_F_NEXT,
            next: RawNext::Follow,
        };
        let mut entries = vec![zero; 65_535];
        entries.last_mut().unwrap().flags = 0;
        write_desc_table(lb.guest.memory(), table, &entries).unwrap();
        let mut chain = vec![zero; 255];
        chain.push(RawDesc {
            addr: table.0,
            len: 65_535 * 16,
            flags: VRING_DESC_F_INDIRECT,
            next: RawNext::Follow,
        });
        lb.guest.post_raw_tx_chain(&chain).unwrap();
        assert!(lb.guest.send_frame(&frame(1, 100)).unwrap());
        assert_eq!(lb.tx_process().unwrap(), TxState::Idle);
        let s = lb.stats.snapshot();
        assert_eq!((s.tx_dropped_bad_desc, s.tx_frames), (1, 1));
        const { assert!(MAX_CHAIN_DESCS < 65_790) };
    }

    /// Finding 7: RX took the ring for exhausted once the window held as many segments as the
    /// ring has entries, so a frame spread over chains of several segments each (indirect
    /// tables) was dropped as "oversize" while the ring still had room. Only chains count now.
    #[test]
    fn a_large_frame_over_chains_of_many_segments_is_delivered_not_dropped() {
        use crate::ring::{write_desc_table, RawDesc, RawNext, VRING_DESC_F_INDIRECT};
        use crate::ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        use vm_memory::{Bytes, GuestAddress};
        const CHAINS: u64 = 150;
        const SEGS: u64 = 4;
        const SEG: u64 = 128;
        let mut lb = Loopback::new(LoopbackConfig::default()).unwrap(); // 256 entries
        let (tables, bufs) = (40u64 << 20, 44u64 << 20);
        let buf = |c: u64, k: u64| bufs + (c * SEGS + k) * SEG;
        let mut heads = Vec::new();
        let mut post = |lb: &mut Loopback, chains: std::ops::Range<u64>| {
            for c in chains {
                let table: Vec<RawDesc> = (0..SEGS)
                    .map(|k| RawDesc {
                        addr: buf(c, k),
                        len: SEG as u32,
                        flags: VRING_DESC_F_WRITE
                            | if k + 1 < SEGS { VRING_DESC_F_NEXT } else { 0 },
                        next: RawNext::Follow,
                    })
                    .collect();
                let at = GuestAddress(tables + c * SEGS * 16);
                write_desc_table(lb.guest.memory(), at, &table).unwrap();
                heads.push(
                    lb.guest
                        .post_raw_rx_chain(&[RawDesc {
                            addr: at.0,
                            len: (SEGS * 16) as u32,
                            flags: VRING_DESC_F_INDIRECT,
                            next: RawNext::Follow,
                        }])
                        .unwrap(),
                );
            }
        };
        // 80 chains: 320 segments (more than the ring's 256 entries) but 40 KiB, too little for
        // the frame, which is larger than the 1530 bytes gathered before a read: it waits in
        // staging for more buffers. Then 70 more chains: it needs 118.
        post(&mut lb, 0..80);
        let sent = frame(7, 60_000);
        assert!(lb.inject(&sent).unwrap());
        assert_eq!(lb.rx_process().unwrap(), RxState::WaitingForBuffers);
        assert_eq!(
            lb.stats.snapshot().rx_dropped_oversize,
            0,
            "dropped with room left"
        );
        post(&mut lb, 80..CHAINS);
        lb.rx_kick().unwrap();
        lb.rx_process().unwrap();
        let s = lb.stats.snapshot();
        assert_eq!((s.rx_frames, s.rx_dropped_oversize), (1, 0));
        lb.guest.poll_rx(|_, _| {}).unwrap();
        let done = lb.guest.take_raw_completions();
        let mut got = Vec::new();
        for d in &done {
            let c = heads.iter().position(|&h| h == d.head).unwrap() as u64;
            let mut left = d.len as u64;
            for k in 0..SEGS {
                let n = left.min(SEG) as usize;
                let mut b = vec![0u8; n];
                lb.guest
                    .memory()
                    .read_slice(&mut b, GuestAddress(buf(c, k)))
                    .unwrap();
                got.extend_from_slice(&b);
                left -= n as u64;
            }
        }
        assert_eq!(done.len(), 118);
        assert!(got[HDR_LEN..] == sent[..], "the frame arrived altered");
    }
}
