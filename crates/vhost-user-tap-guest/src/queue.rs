//! One virtio-net queue pair driven like Linux's virtio-net: the RX ring is filled with
//! single-descriptor device-writable buffers and frames are reassembled from used entries
//! (`num_buffers` with MRG_RXBUF); TX frames are copied behind a zeroed vnet header into a
//! buffer and published as one descriptor, a two-descriptor chain, or an indirect table.
//!
//! Each pair owns its rings, eventfds and buffer pools and is `Send`, so a caller can drive
//! pairs from separate threads.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mem::{GuestRam, MemError};
use super::net::VirtioNetHdr;
use super::ring::{Desc, DriverRing, RawDesc, RingError, RingLayout, UsedElem, DESC_SIZE};

/// Errors of a queue pair.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Allocating rings or buffers in guest memory failed.
    #[error("allocating guest memory for queue pair {pair}: {source}")]
    Alloc {
        /// Pair index.
        pair: u16,
        /// Cause.
        #[source]
        source: MemError,
    },
    /// A ring operation failed (including a misbehaving device).
    #[error("virtqueue {queue}: {source}")]
    Ring {
        /// vring index (2 × pair for RX, 2 × pair + 1 for TX).
        queue: u16,
        /// Cause.
        #[source]
        source: RingError,
    },
    /// Creating an eventfd failed.
    #[error("creating the {what} eventfd of queue pair {pair} failed: {source}")]
    EventFd {
        /// kick / call.
        what: &'static str,
        /// Pair index.
        pair: u16,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing the kick eventfd failed.
    #[error("kicking virtqueue {queue} (eventfd write) failed: {source}")]
    Kick {
        /// vring index.
        queue: u16,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading the call eventfd failed.
    #[error("reading the call eventfd of virtqueue {queue} failed: {source}")]
    Call {
        /// vring index.
        queue: u16,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// poll(2) on the call eventfds failed.
    #[error("waiting for interrupts (poll) failed: {0}")]
    Poll(#[source] io::Error),
    /// A frame does not fit into a TX buffer.
    #[error("TX frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Frame length.
        len: usize,
        /// Maximum frame length.
        max: usize,
    },
    /// Copying to or from a buffer in guest memory failed.
    #[error("virtqueue {queue}: {what} at {addr:#x} failed: {source}")]
    Copy {
        /// vring index.
        queue: u16,
        /// What was copied.
        what: &'static str,
        /// Guest physical address.
        addr: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The device assembled a frame larger than any virtio-net frame can be.
    #[error("virtqueue {queue}: the device delivered a frame of more than {max} bytes (num_buffers {num_buffers})")]
    OversizedFrame {
        /// vring index.
        queue: u16,
        /// Limit.
        max: usize,
        /// The frame's num_buffers.
        num_buffers: u16,
    },
    /// Invalid pair configuration.
    #[error("invalid queue configuration: {0}")]
    Config(String),
}

type Result<T> = std::result::Result<T, QueueError>;

/// How TX frames are laid out in descriptors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum TxLayout {
    /// Header and frame in one descriptor (Linux with VERSION_1/ANY_LAYOUT for linear skbs).
    #[default]
    Single,
    /// Header and frame as two chained descriptors.
    Chained,
    /// Header and frame as two descriptors in an indirect table (Linux's choice for multi-sg
    /// packets when INDIRECT_DESC is negotiated). Falls back to `Chained` without INDIRECT_DESC.
    Indirect,
}

/// Per-pair settings derived from the negotiated features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairConfig {
    /// Queue size of both rings.
    pub queue_size: u16,
    /// vnet header length (10 or 12).
    pub hdr_len: usize,
    /// MRG_RXBUF negotiated.
    pub mrg_rxbuf: bool,
    /// EVENT_IDX negotiated.
    pub event_idx: bool,
    /// RING_INDIRECT_DESC negotiated.
    pub indirect: bool,
    /// Any RX offload (GUEST_CSUM/GUEST_TSO/UFO) negotiated: header flags/gso are then legal.
    pub rx_offloads: bool,
    /// Length of each posted RX buffer (header room included).
    pub rx_buf_len: u32,
    /// Largest TX frame (without header).
    pub tx_max_frame: u32,
    /// TX descriptor layout.
    pub tx_layout: TxLayout,
}

/// Per-pair counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    /// Frames delivered to the caller.
    pub rx_frames: u64,
    /// Bytes of those frames (without vnet header).
    pub rx_bytes: u64,
    /// RX used entries consumed (buffers).
    pub rx_buffers: u64,
    /// RX buffers dropped as malformed (shorter than the header, num_buffers 0).
    pub rx_bad_frames: u64,
    /// Frames whose header had flags/gso_type set although no RX offload was negotiated.
    pub rx_hdr_anomalies: u64,
    /// Times the used ring ran dry in the middle of a multi-buffer frame (the device published
    /// a frame's head before its tail; a Linux guest drops such frames).
    pub rx_mrg_incomplete: u64,
    /// Frames queued for TX.
    pub tx_frames: u64,
    /// Bytes of those frames (without vnet header).
    pub tx_bytes: u64,
    /// TX chains completed by the device.
    pub tx_completed: u64,
    /// send attempts that found the TX ring full.
    pub tx_ring_full: u64,
    /// RX kicks (eventfd writes).
    pub rx_kicks: u64,
    /// TX kicks (eventfd writes).
    pub tx_kicks: u64,
    /// RX call eventfd wakeups that found the counter > 0.
    pub rx_interrupts: u64,
    /// TX call eventfd wakeups that found the counter > 0.
    pub tx_interrupts: u64,
    /// Raw (test) chains completed by the device.
    pub raw_completed: u64,
}

impl QueueStats {
    /// All kicks.
    pub fn kicks(&self) -> u64 {
        self.rx_kicks + self.tx_kicks
    }

    /// All interrupts.
    pub fn interrupts(&self) -> u64 {
        self.rx_interrupts + self.tx_interrupts
    }

    /// Add another pair's counters.
    pub fn add(&mut self, o: &QueueStats) {
        self.rx_frames += o.rx_frames;
        self.rx_bytes += o.rx_bytes;
        self.rx_buffers += o.rx_buffers;
        self.rx_bad_frames += o.rx_bad_frames;
        self.rx_hdr_anomalies += o.rx_hdr_anomalies;
        self.rx_mrg_incomplete += o.rx_mrg_incomplete;
        self.tx_frames += o.tx_frames;
        self.tx_bytes += o.tx_bytes;
        self.tx_completed += o.tx_completed;
        self.tx_ring_full += o.tx_ring_full;
        self.rx_kicks += o.rx_kicks;
        self.tx_kicks += o.tx_kicks;
        self.rx_interrupts += o.rx_interrupts;
        self.tx_interrupts += o.tx_interrupts;
        self.raw_completed += o.raw_completed;
    }
}

/// A raw (test) chain the device completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawCompletion {
    /// vring index.
    pub queue: u16,
    /// Head descriptor index returned by `post_raw_*_chain`.
    pub head: u16,
    /// Used length the device reported.
    pub len: u32,
}

/// What woke [`QueuePair::wait`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wake {
    /// RX has (or may have) used entries.
    pub rx: bool,
    /// TX has (or may have) used entries.
    pub tx: bool,
    /// The extra descriptor given to [`QueuePair::wait_with`] is readable.
    pub fd: bool,
}

const RAW_TOKEN: u64 = 1 << 63;
/// Largest frame accepted on RX: 64 KiB GSO packet plus headers.
pub const MAX_RX_FRAME: usize = 65536 + 256;

#[derive(Debug)]
struct BufPool {
    base: GuestAddress,
    stride: u64,
    free: Vec<u32>,
    /// The pool's bytes as mapped in this process (set once the memory is mapped; null before),
    /// so frames are read as a driver reads them, without vm-memory's per-access lookups.
    host: *const u8,
    bytes: u64,
}

// SAFETY: `host` points into the guest memory mappings the owning `QueuePair` keeps alive
// (through its `mem`), and is only read from.
unsafe impl Send for BufPool {}

impl BufPool {
    fn new(
        ram: &mut GuestRam,
        count: u16,
        len: u64,
        what: &'static str,
    ) -> std::result::Result<Self, MemError> {
        let stride = len.div_ceil(64) * 64;
        let bytes = stride * u64::from(count);
        let base = ram.alloc(bytes, 4096, what)?;
        Ok(BufPool {
            base,
            stride,
            free: (0..u32::from(count)).rev().collect(),
            host: std::ptr::null(),
            bytes,
        })
    }

    /// Find the pool's mapping in `mem` (one region holds it, as `GuestRam::alloc` places it).
    fn map(&mut self, mem: &GuestMemoryMmap) {
        if let Ok(slice) =
            vm_memory::GuestMemoryBackend::get_slice(mem, self.base, self.bytes as usize)
        {
            self.host = slice.ptr_guard().as_ptr();
        }
    }

    /// Copy the pool's bytes at `addr` into `out`; false if they are not all in the pool.
    fn read(&self, addr: GuestAddress, out: &mut [u8]) -> bool {
        let Some(off) = addr.0.checked_sub(self.base.0) else {
            return false;
        };
        if self.host.is_null() || off + out.len() as u64 > self.bytes {
            return false;
        }
        // SAFETY: the range lies in the pool, mapped at `host` while the owning `QueuePair`
        // lives; the device wrote these bytes before publishing the used entry we read them for,
        // and does not write them again until the buffer is posted again.
        unsafe {
            std::ptr::copy_nonoverlapping(self.host.add(off as usize), out.as_mut_ptr(), out.len())
        };
        true
    }

    fn addr(&self, slot: u32) -> GuestAddress {
        self.base.unchecked_add(u64::from(slot) * self.stride)
    }
}

#[derive(Debug)]
struct Partial {
    hdr: VirtioNetHdr,
    remaining: u16,
    reported_incomplete: bool,
}

/// One RX/TX queue pair.
#[derive(Debug)]
pub struct QueuePair {
    index: u16,
    mem: GuestMemoryMmap,
    cfg: PairConfig,
    rx: DriverRing,
    tx: DriverRing,
    rx_kick: EventFd,
    rx_call: EventFd,
    tx_kick: EventFd,
    tx_call: EventFd,
    rx_pool: BufPool,
    tx_pool: BufPool,
    /// Per TX slot: whether it still holds the frame `send_prefilled` wrote into it.
    tx_prefilled: Vec<bool>,
    tx_tables: GuestAddress,
    partial: Option<Partial>,
    /// Buffers still to come of the frame `recycle_rx` is counting (mergeable).
    drop_remaining: u16,
    frame: Vec<u8>,
    hdr_buf: [u8; 12],
    raw_seq: u64,
    raw_completions: Vec<RawCompletion>,
    stats: QueueStats,
}

impl QueuePair {
    /// Allocate rings, buffers and eventfds for pair `index` in `ram`.
    pub fn new(ram: &mut GuestRam, index: u16, cfg: PairConfig) -> Result<Self> {
        let hdr = cfg.hdr_len as u32;
        if cfg.hdr_len != 10 && cfg.hdr_len != 12 {
            return Err(QueueError::Config(format!(
                "vnet header length {} (must be 10 or 12)",
                cfg.hdr_len
            )));
        }
        if cfg.rx_buf_len < hdr + 1 {
            return Err(QueueError::Config(format!(
                "RX buffer length {} must exceed the {}-byte vnet header",
                cfg.rx_buf_len, cfg.hdr_len
            )));
        }
        let alloc = |source| QueueError::Alloc {
            pair: index,
            source,
        };
        let rx_layout = RingLayout::allocate(ram, cfg.queue_size).map_err(alloc)?;
        let tx_layout = RingLayout::allocate(ram, cfg.queue_size).map_err(alloc)?;
        let mut rx_pool =
            BufPool::new(ram, cfg.queue_size, u64::from(cfg.rx_buf_len), "RX buffers")
                .map_err(alloc)?;
        let tx_pool = BufPool::new(
            ram,
            cfg.queue_size,
            u64::from(hdr + cfg.tx_max_frame),
            "TX buffers",
        )
        .map_err(alloc)?;
        let tx_tables = ram
            .alloc(
                2 * DESC_SIZE * u64::from(cfg.queue_size),
                16,
                "TX indirect tables",
            )
            .map_err(alloc)?;
        let mem = ram.memory().clone();
        rx_pool.map(&mem);
        let rx_q = 2 * index;
        let ring = |layout, q: u16| {
            DriverRing::new(mem.clone(), layout, cfg.event_idx)
                .map_err(|source| QueueError::Ring { queue: q, source })
        };
        let rx = ring(rx_layout, rx_q)?;
        let mut tx = ring(tx_layout, rx_q + 1)?;
        // Like Linux (TX completions are reaped when sending), TX interrupts start disabled.
        tx.disable_cb().map_err(|source| QueueError::Ring {
            queue: rx_q + 1,
            source,
        })?;
        let efd = |what| {
            EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| QueueError::EventFd {
                what,
                pair: index,
                source,
            })
        };
        let mut cfg = cfg;
        if cfg.tx_layout == TxLayout::Indirect && !cfg.indirect {
            cfg.tx_layout = TxLayout::Chained;
        }
        Ok(QueuePair {
            index,
            mem,
            cfg,
            rx,
            tx,
            rx_kick: efd("RX kick")?,
            rx_call: efd("RX call")?,
            tx_kick: efd("TX kick")?,
            tx_call: efd("TX call")?,
            rx_pool,
            tx_pool,
            tx_prefilled: vec![false; usize::from(cfg.queue_size)],
            tx_tables,
            partial: None,
            drop_remaining: 0,
            frame: Vec::with_capacity(65536),
            hdr_buf: [0; 12],
            raw_seq: 0,
            raw_completions: Vec::new(),
            stats: QueueStats::default(),
        })
    }

    /// Pair index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// vring index of the RX queue (2 × pair).
    pub fn rx_queue(&self) -> u16 {
        2 * self.index
    }

    /// vring index of the TX queue (2 × pair + 1).
    pub fn tx_queue(&self) -> u16 {
        2 * self.index + 1
    }

    /// Effective configuration (TX layout after fallback).
    pub fn config(&self) -> &PairConfig {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// The RX ring (read-only inspection).
    pub fn rx_ring(&self) -> &DriverRing {
        &self.rx
    }

    /// The TX ring (read-only inspection).
    pub fn tx_ring(&self) -> &DriverRing {
        &self.tx
    }

    /// The RX ring, for low-level tests (e.g. toggling callbacks by hand).
    pub fn rx_ring_mut(&mut self) -> &mut DriverRing {
        &mut self.rx
    }

    /// The TX ring, for low-level tests.
    pub fn tx_ring_mut(&mut self) -> &mut DriverRing {
        &mut self.tx
    }

    /// Eventfd the guest writes to kick RX (sent with SET_VRING_KICK).
    pub fn rx_kick_fd(&self) -> RawFd {
        self.rx_kick.as_raw_fd()
    }

    /// Eventfd the device signals for RX (sent with SET_VRING_CALL).
    pub fn rx_call_fd(&self) -> RawFd {
        self.rx_call.as_raw_fd()
    }

    /// Eventfd the guest writes to kick TX.
    pub fn tx_kick_fd(&self) -> RawFd {
        self.tx_kick.as_raw_fd()
    }

    /// Eventfd the device signals for TX.
    pub fn tx_call_fd(&self) -> RawFd {
        self.tx_call.as_raw_fd()
    }

    fn ring_err(queue: u16) -> impl Fn(RingError) -> QueueError {
        move |source| QueueError::Ring { queue, source }
    }

    fn kick(&mut self, rx: bool) -> Result<()> {
        let (fd, queue) = if rx {
            (&self.rx_kick, self.rx_queue())
        } else {
            (&self.tx_kick, self.tx_queue())
        };
        fd.write(1)
            .map_err(|source| QueueError::Kick { queue, source })?;
        if rx {
            self.stats.rx_kicks += 1;
        } else {
            self.stats.tx_kicks += 1;
        }
        Ok(())
    }

    fn kick_if_needed(&mut self, rx: bool) -> Result<bool> {
        let (ring, q) = if rx {
            (&mut self.rx, 2 * self.index)
        } else {
            (&mut self.tx, 2 * self.index + 1)
        };
        if ring.kick_prepare().map_err(Self::ring_err(q))? {
            self.kick(rx)?;
            return Ok(true);
        }
        Ok(false)
    }

    // ---------------------------------------------------------------- RX

    /// RX buffers that could be posted now.
    pub fn rx_free_slots(&self) -> usize {
        self.rx_pool.free.len().min(self.rx.num_free())
    }

    /// RX buffers currently owned by the device.
    pub fn rx_posted(&self) -> u16 {
        self.rx.in_flight()
    }

    /// Post up to `n` RX buffers, then kick if the device asked for it. Returns how many.
    pub fn post_rx_buffers(&mut self, n: usize) -> Result<usize> {
        let count = n.min(self.rx_free_slots());
        let q = self.rx_queue();
        for _ in 0..count {
            let Some(slot) = self.rx_pool.free.pop() else {
                break;
            };
            let addr = self.rx_pool.addr(slot);
            if let Err(source) = self.rx.add(
                &[Desc::writable(addr, self.cfg.rx_buf_len)],
                u64::from(slot),
            ) {
                self.rx_pool.free.push(slot);
                return Err(QueueError::Ring { queue: q, source });
            }
        }
        if count > 0 {
            self.kick_if_needed(true)?;
        }
        Ok(count)
    }

    /// Post a raw RX chain (descriptors written verbatim). Returns its head index; its
    /// completion shows up in [`QueuePair::take_raw_completions`].
    pub fn post_raw_rx_chain(&mut self, descs: &[RawDesc]) -> Result<u16> {
        self.post_raw(true, descs)
    }

    fn post_raw(&mut self, rx: bool, descs: &[RawDesc]) -> Result<u16> {
        let token = RAW_TOKEN | self.raw_seq;
        self.raw_seq += 1;
        let (ring, q) = if rx {
            (&mut self.rx, 2 * self.index)
        } else {
            (&mut self.tx, 2 * self.index + 1)
        };
        let head = ring.add_raw(descs, token).map_err(Self::ring_err(q))?;
        self.kick_if_needed(rx)?;
        Ok(head)
    }

    /// Harvest all completed RX buffers, delivering whole frames (without vnet header) to `f`.
    /// Buffers are not reposted. Returns the number of frames delivered.
    pub fn poll_rx<F: FnMut(&[u8], &VirtioNetHdr)>(&mut self, f: F) -> Result<usize> {
        self.poll_rx_budget(usize::MAX, f)
    }

    /// Like [`QueuePair::poll_rx`] but stops after `budget` frames (a frame in progress is
    /// always finished if its buffers are there).
    pub fn poll_rx_budget<F: FnMut(&[u8], &VirtioNetHdr)>(
        &mut self,
        budget: usize,
        mut f: F,
    ) -> Result<usize> {
        let q = self.rx_queue();
        let hdr_len = self.cfg.hdr_len;
        let mut frames = 0usize;
        while frames < budget || self.partial.is_some() {
            let Some(u) = self.rx.pop_used().map_err(Self::ring_err(q))? else {
                if let Some(p) = self.partial.as_mut() {
                    if !p.reported_incomplete {
                        p.reported_incomplete = true;
                        self.stats.rx_mrg_incomplete += 1;
                    }
                }
                break;
            };
            if self.take_raw(q, &u) {
                continue;
            }
            self.stats.rx_buffers += 1;
            let slot = u.token as u32;
            let addr = self.rx_pool.addr(slot);
            let len = u.len as usize;
            let copied = match self.partial.take() {
                None => {
                    if len < hdr_len {
                        log::warn!("virtqueue {q}: RX buffer of {len} bytes is shorter than the {hdr_len}-byte vnet header; dropped");
                        self.stats.rx_bad_frames += 1;
                        self.rx_pool.free.push(slot);
                        continue;
                    }
                    let mut hb = [0u8; 12];
                    let r = if self.rx_pool.read(addr, &mut hb[..hdr_len]) {
                        Ok(())
                    } else {
                        self.mem.read_slice(&mut hb[..hdr_len], addr)
                    };
                    let hdr = match r {
                        Ok(()) => VirtioNetHdr::parse(&hb[..hdr_len], hdr_len).unwrap_or_default(),
                        Err(source) => {
                            self.rx_pool.free.push(slot);
                            return Err(QueueError::Copy {
                                queue: q,
                                what: "reading an RX vnet header",
                                addr: addr.0,
                                source,
                            });
                        }
                    };
                    let nbufs = if self.cfg.mrg_rxbuf {
                        hdr.num_buffers
                    } else {
                        1
                    };
                    if nbufs == 0 {
                        log::warn!("virtqueue {q}: RX header with num_buffers 0; buffer dropped");
                        self.stats.rx_bad_frames += 1;
                        self.rx_pool.free.push(slot);
                        continue;
                    }
                    if !self.cfg.rx_offloads && (hdr.flags != 0 || hdr.gso_type != 0) {
                        self.stats.rx_hdr_anomalies += 1;
                    }
                    self.frame.clear();
                    let r = self.copy_in(addr.unchecked_add(hdr_len as u64), len - hdr_len);
                    self.partial = Some(Partial {
                        hdr,
                        remaining: nbufs - 1,
                        reported_incomplete: false,
                    });
                    r
                }
                Some(mut p) => {
                    let r = self.copy_in(addr, len);
                    p.remaining -= 1;
                    self.partial = Some(p);
                    r
                }
            };
            self.rx_pool.free.push(slot);
            copied?;
            if self.frame.len() > MAX_RX_FRAME {
                let num_buffers = self.partial.take().map(|p| p.hdr.num_buffers).unwrap_or(1);
                return Err(QueueError::OversizedFrame {
                    queue: q,
                    max: MAX_RX_FRAME,
                    num_buffers,
                });
            }
            if let Some(p) = self.partial.take_if(|p| p.remaining == 0) {
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += self.frame.len() as u64;
                frames += 1;
                f(&self.frame, &p.hdr);
            }
        }
        Ok(frames)
    }

    /// The XDP-drop equivalent: count completed frames and give their buffers back without
    /// copying them out (only `num_buffers` is read, to find frame boundaries). Does not repost;
    /// call [`QueuePair::post_rx_buffers`]. Do not mix with `poll_rx` on the same pair.
    pub fn recycle_rx(&mut self, budget: usize) -> Result<usize> {
        let q = self.rx_queue();
        let mut frames = 0;
        while frames < budget || self.drop_remaining > 0 {
            let Some(u) = self.rx.pop_used().map_err(Self::ring_err(q))? else {
                break;
            };
            if self.take_raw(q, &u) {
                continue;
            }
            let slot = u.token as u32;
            self.rx_pool.free.push(slot);
            self.stats.rx_buffers += 1;
            if self.drop_remaining == 0 {
                let nb = if self.cfg.mrg_rxbuf && self.cfg.hdr_len == 12 {
                    let at = self.rx_pool.addr(slot).unchecked_add(10);
                    let mut b = [0u8; 2];
                    if self.rx_pool.read(at, &mut b) {
                        u16::from_le_bytes(b)
                    } else {
                        self.mem
                            .read_obj::<u16>(at)
                            .map(u16::from_le)
                            .map_err(|source| QueueError::Copy {
                                queue: q,
                                what: "reading num_buffers",
                                addr: at.0,
                                source,
                            })?
                    }
                } else {
                    1
                };
                self.drop_remaining = nb.max(1);
            }
            self.drop_remaining -= 1;
            if self.drop_remaining == 0 {
                frames += 1;
                self.stats.rx_frames += 1;
            }
        }
        Ok(frames)
    }

    fn copy_in(&mut self, addr: GuestAddress, len: usize) -> Result<()> {
        let start = self.frame.len();
        self.frame.resize(start + len, 0);
        if self.rx_pool.read(addr, &mut self.frame[start..]) {
            return Ok(());
        }
        self.mem
            .read_slice(&mut self.frame[start..], addr)
            .map_err(|source| QueueError::Copy {
                queue: 2 * self.index,
                what: "reading RX frame data",
                addr: addr.0,
                source,
            })
    }

    /// Record `u` if it completes a raw chain (malformed-descriptor tests); false otherwise.
    fn take_raw(&mut self, queue: u16, u: &UsedElem) -> bool {
        if u.token & RAW_TOKEN == 0 {
            return false;
        }
        self.raw_completions.push(RawCompletion {
            queue,
            head: u.head,
            len: u.len,
        });
        self.stats.raw_completed += 1;
        true
    }

    /// Completed raw chains since the last call.
    pub fn take_raw_completions(&mut self) -> Vec<RawCompletion> {
        std::mem::take(&mut self.raw_completions)
    }

    // ---------------------------------------------------------------- TX

    /// Largest frame `send_frame` accepts.
    pub fn tx_max_frame(&self) -> usize {
        self.cfg.tx_max_frame as usize
    }

    /// TX chains the device has not completed yet.
    pub fn tx_in_flight(&self) -> u16 {
        self.tx.in_flight()
    }

    /// Frames that could be queued right now (after reclaiming).
    pub fn tx_free_slots(&self) -> usize {
        let per = if self.cfg.tx_layout == TxLayout::Chained {
            2
        } else {
            1
        };
        self.tx_pool.free.len().min(self.tx.num_free() / per)
    }

    /// Reclaim completed TX chains. Returns how many.
    pub fn reclaim_tx(&mut self) -> Result<usize> {
        let q = self.tx_queue();
        let mut n = 0;
        while let Some(u) = self.tx.pop_used().map_err(Self::ring_err(q))? {
            if !self.take_raw(q, &u) {
                self.tx_pool.free.push(u.token as u32);
                self.stats.tx_completed += 1;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Queue one frame (vnet header added) and kick per the notification rules.
    /// Returns false when the TX ring is full.
    pub fn send_frame(&mut self, frame: &[u8]) -> Result<bool> {
        Ok(self.send_frames(&[frame])? == 1)
    }

    /// Queue one frame with the given vnet header (checksum/GSO metadata, e.g. as read from a
    /// tap) instead of a zeroed one. Returns false when the TX ring is full.
    pub fn send_frame_with_hdr(&mut self, hdr: &[u8], frame: &[u8]) -> Result<bool> {
        let n = hdr.len().min(self.hdr_buf.len());
        self.hdr_buf[..n].copy_from_slice(&hdr[..n]);
        let r = self.send_frames(&[frame]);
        self.hdr_buf = [0; 12];
        Ok(r? == 1)
    }

    /// Queue several frames with one kick decision at the end. Returns how many were queued
    /// (fewer than `frames.len()` when the ring fills up).
    pub fn send_frames(&mut self, frames: &[&[u8]]) -> Result<usize> {
        self.send(frames.iter().copied(), false)
    }

    /// Send `frame` up to `n` times, like pktgen's clone_skb: a TX buffer is written once and
    /// then posted again as it is, so the guest does not rewrite frame data on every send (the
    /// benchmark's equivalent of a guest transmitting from pre-built buffers). `frame` must be
    /// the same on every call. Returns how many were queued.
    pub fn send_prefilled(&mut self, frame: &[u8], n: usize) -> Result<usize> {
        self.send(std::iter::repeat_n(frame, n), true)
    }

    fn send<'f>(
        &mut self,
        frames: impl Iterator<Item = &'f [u8]> + Clone,
        prefilled: bool,
    ) -> Result<usize> {
        let max = self.tx_max_frame();
        if let Some(f) = frames.clone().find(|f| f.len() > max) {
            return Err(QueueError::FrameTooLarge { len: f.len(), max });
        }
        self.reclaim_tx()?;
        let mut sent = 0;
        for f in frames {
            if !self.queue_tx(f, prefilled)? {
                self.stats.tx_ring_full += 1;
                break;
            }
            sent += 1;
        }
        if sent > 0 {
            self.kick_if_needed(false)?;
        }
        Ok(sent)
    }

    fn queue_tx(&mut self, frame: &[u8], prefilled: bool) -> Result<bool> {
        if self.tx_free_slots() == 0 {
            return Ok(false);
        }
        let q = self.tx_queue();
        let Some(slot) = self.tx_pool.free.pop() else {
            return Ok(false);
        };
        let addr = self.tx_pool.addr(slot);
        let hdr_len = self.cfg.hdr_len;
        let copy_err = |what, addr: GuestAddress| {
            move |source| QueueError::Copy {
                queue: q,
                what,
                addr: addr.0,
                source,
            }
        };
        let data = addr.unchecked_add(hdr_len as u64);
        let reuse = prefilled && self.tx_prefilled[slot as usize];
        self.tx_prefilled[slot as usize] = false;
        let r = if reuse {
            Ok(())
        } else {
            self.mem
                .write_slice(&self.hdr_buf[..hdr_len], addr)
                .map_err(copy_err("writing a TX vnet header", addr))
                .and_then(|()| {
                    self.mem
                        .write_slice(frame, data)
                        .map_err(copy_err("writing a TX frame", data))
                })
        };
        if let Err(e) = r {
            self.tx_pool.free.push(slot);
            return Err(e);
        }
        self.tx_prefilled[slot as usize] = prefilled;
        let token = u64::from(slot);
        let flen = frame.len() as u32;
        let hlen = hdr_len as u32;
        let r = match self.cfg.tx_layout {
            TxLayout::Single => self.tx.add(&[Desc::readable(addr, hlen + flen)], token),
            TxLayout::Chained => self.tx.add(
                &[Desc::readable(addr, hlen), Desc::readable(data, flen)],
                token,
            ),
            TxLayout::Indirect => {
                let table = self
                    .tx_tables
                    .unchecked_add(u64::from(slot) * 2 * DESC_SIZE);
                self.tx.add_indirect(
                    table,
                    &[Desc::readable(addr, hlen), Desc::readable(data, flen)],
                    token,
                )
            }
        };
        if let Err(source) = r {
            self.tx_pool.free.push(slot);
            return Err(QueueError::Ring { queue: q, source });
        }
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += frame.len() as u64;
        Ok(true)
    }

    /// Post a raw TX chain (descriptors written verbatim). Returns its head index.
    pub fn post_raw_tx_chain(&mut self, descs: &[RawDesc]) -> Result<u16> {
        self.post_raw(false, descs)
    }

    // ---------------------------------------------------------------- interrupts

    /// Wait for the RX interrupt (see [`QueuePair::wait`]).
    pub fn wait_rx_interrupt(&mut self, timeout: Option<Duration>) -> Result<bool> {
        Ok(self.wait(true, false, timeout)?.rx)
    }

    /// Wait for the TX interrupt (see [`QueuePair::wait`]).
    pub fn wait_tx_interrupt(&mut self, timeout: Option<Duration>) -> Result<bool> {
        Ok(self.wait(false, true, timeout)?.tx)
    }

    /// Sleep until the device interrupts on RX and/or TX, without losing wakeups:
    /// arm (RX: `used_event = last_used` / clear NO_INTERRUPT; TX: Linux's delayed variant),
    /// full fence, re-check `used.idx`, and only then poll the call eventfds. A queue whose
    /// interrupt fired gets its callbacks disabled again (NAPI style) until the next wait.
    /// An interrupt that is already pending is consumed and counted first. Returns which
    /// queues are ready; both false on timeout or EINTR.
    pub fn wait(&mut self, rx: bool, tx: bool, timeout: Option<Duration>) -> Result<Wake> {
        self.wait_with(rx, tx, None, timeout)
    }

    /// [`QueuePair::wait`], also woken when `fd` becomes readable (a bridge's tap): one sleep
    /// covers the device and the other side.
    pub fn wait_with(
        &mut self,
        rx: bool,
        tx: bool,
        fd: Option<BorrowedFd<'_>>,
        timeout: Option<Duration>,
    ) -> Result<Wake> {
        let (rxq, txq) = (self.rx_queue(), self.tx_queue());
        let mut ready = Wake::default();
        // An interrupt that already fired is delivered (and counted) first, like an IRQ that
        // was raised while the driver was busy.
        if rx && self.consume_call(true)? {
            ready.rx = true;
        }
        if tx && self.consume_call(false)? {
            ready.tx = true;
        }
        if ready.rx || ready.tx {
            return Ok(ready);
        }
        if rx {
            let last = self.rx.enable_cb_prepare().map_err(Self::ring_err(rxq))?;
            ready.rx = self.rx.poll(last).map_err(Self::ring_err(rxq))?;
        }
        if tx {
            ready.tx = !self.tx.enable_cb_delayed().map_err(Self::ring_err(txq))?;
        }
        if ready.rx || ready.tx || (!rx && !tx && fd.is_none()) {
            return Ok(ready);
        }
        let mut fds = Vec::with_capacity(3);
        if let Some(fd) = fd {
            fds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if rx {
            fds.push(libc::pollfd {
                fd: self.rx_call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if tx {
            fds.push(libc::pollfd {
                fd: self.tx_call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // ppoll, not poll: a timeout below a millisecond must sleep, not round to a busy spin.
        let ts = timeout.map(|d| libc::timespec {
            tv_sec: d.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        });
        let tsp = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfd structs
        // and `tsp` is null or points at `ts`; both outlive the call. A null sigmask keeps the
        // thread's mask.
        let r = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                tsp,
                std::ptr::null(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(ready);
            }
            return Err(QueueError::Poll(e));
        }
        for p in &fds {
            if p.revents == 0 {
                continue;
            }
            if fd.is_some_and(|f| f.as_raw_fd() == p.fd) {
                ready.fd = true;
                continue;
            }
            let is_rx = p.fd == self.rx_call.as_raw_fd();
            if self.consume_call(is_rx)? {
                if is_rx {
                    ready.rx = true;
                } else {
                    ready.tx = true;
                }
            }
        }
        Ok(ready)
    }

    /// Read a call eventfd; on a real interrupt count it and disable callbacks (NAPI).
    fn consume_call(&mut self, rx: bool) -> Result<bool> {
        let (fd, queue) = if rx {
            (&self.rx_call, self.rx_queue())
        } else {
            (&self.tx_call, self.tx_queue())
        };
        match fd.read() {
            Ok(v) if v > 0 => {
                let ring = if rx {
                    self.stats.rx_interrupts += 1;
                    &mut self.rx
                } else {
                    self.stats.tx_interrupts += 1;
                    &mut self.tx
                };
                ring.interrupt_received();
                ring.disable_cb().map_err(Self::ring_err(queue))?;
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(source) => Err(QueueError::Call { queue, source }),
        }
    }

    /// Non-blocking: consume pending interrupts on both call eventfds (counted as usual).
    pub fn drain_interrupts(&mut self) -> Result<Wake> {
        Ok(Wake {
            rx: self.consume_call(true)?,
            tx: self.consume_call(false)?,
            fd: false,
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    #[cfg(test)]
    pub(crate) fn eventfds(&self) -> [&EventFd; 4] {
        [&self.rx_kick, &self.rx_call, &self.tx_kick, &self.tx_call]
    }
}

#[cfg(test)]
mod tests {
    use super::super::net::{FrameSpec, VIRTIO_NET_HDR_F_DATA_VALID};
    use super::super::ring::{RawNext, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use super::super::testdev::{device_queue, TestDevice};
    use super::*;
    use virtio_queue::QueueT;

    fn cfg(mrg: bool, event_idx: bool) -> PairConfig {
        PairConfig {
            queue_size: 16,
            hdr_len: 12,
            mrg_rxbuf: mrg,
            event_idx,
            indirect: true,
            rx_offloads: false,
            rx_buf_len: if mrg { 512 } else { 12 + 1514 },
            tx_max_frame: 1514,
            tx_layout: TxLayout::Single,
        }
    }

    fn setup(c: PairConfig) -> (GuestRam, QueuePair, TestDevice) {
        let mut ram = GuestRam::new(8 << 20, 0).unwrap();
        let pair = QueuePair::new(&mut ram, 0, c).unwrap();
        let [_, rx_call, _, tx_call] = pair.eventfds();
        let rx_call = rx_call.try_clone().unwrap();
        let tx_call = tx_call.try_clone().unwrap();
        let dev = TestDevice::new(
            ram.memory().clone(),
            device_queue(pair.rx_ring().layout(), c.event_idx),
            device_queue(pair.tx_ring().layout(), c.event_idx),
            c.hdr_len,
            c.mrg_rxbuf,
            Box::new(move || rx_call.write(1).unwrap()),
            Box::new(move || tx_call.write(1).unwrap()),
        );
        (ram, pair, dev)
    }

    fn frame(len: usize, seq: u64) -> Vec<u8> {
        let mut f = Vec::new();
        FrameSpec::default().build(len, 0, seq, &mut f).unwrap();
        f
    }

    fn collect(pair: &mut QueuePair) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        pair.poll_rx(|f, h| {
            assert_eq!(h.gso_type, 0);
            got.push(f.to_vec())
        })
        .unwrap();
        got
    }

    #[test]
    fn mergeable_rx_reassembles_frames() {
        let (_ram, mut pair, mut dev) = setup(cfg(true, true));
        assert_eq!(pair.post_rx_buffers(usize::MAX).unwrap(), 16);
        assert_eq!(pair.rx_free_slots(), 0);
        assert_eq!(pair.stats().rx_kicks, 1);
        let sizes = [60usize, 500, 501, 1400, 1514];
        let frames: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| frame(s, i as u64))
            .collect();
        for f in &frames {
            assert!(dev.deliver(f));
        }
        let got = collect(&mut pair);
        assert_eq!(got, frames);
        let st = pair.stats();
        assert_eq!(st.rx_frames, 5);
        assert_eq!(st.rx_bytes, sizes.iter().sum::<usize>() as u64);
        // 1 + 1 + 2 (501+12 > 512) + 3 + 3 buffers.
        assert_eq!(st.rx_buffers, 10);
        assert_eq!(st.rx_mrg_incomplete, 0);
        assert_eq!(pair.rx_free_slots(), 10);
        assert_eq!(pair.post_rx_buffers(4).unwrap(), 4);
        assert_eq!(pair.rx_posted(), 10);
    }

    #[test]
    fn mergeable_rx_budget_and_incomplete_frames() {
        let (_ram, mut pair, mut dev) = setup(cfg(true, true));
        pair.post_rx_buffers(16).unwrap();
        for i in 0..4 {
            assert!(dev.deliver(&frame(100, i)));
        }
        let mut n = 0;
        assert_eq!(pair.poll_rx_budget(3, |_, _| n += 1).unwrap(), 3);
        assert_eq!(pair.poll_rx_budget(3, |_, _| n += 1).unwrap(), 1);
        assert_eq!(n, 4);
        // Head published before the tail: the guest waits for the rest.
        dev.hold_back = 2;
        let big = frame(1400, 9);
        assert!(dev.deliver(&big));
        assert!(collect(&mut pair).is_empty());
        assert_eq!(pair.stats().rx_mrg_incomplete, 1);
        dev.flush_rx();
        assert_eq!(collect(&mut pair), vec![big]);
        // Per-element publishing of a whole frame is fine when all of it is there.
        dev.hold_back = 0;
        dev.split_publish = true;
        let f = frame(1000, 10);
        assert!(dev.deliver(&f));
        assert_eq!(collect(&mut pair), vec![f]);
        // Not enough buffers: the device cannot deliver.
        assert!(!dev.deliver(&frame(1514, 11)) || pair.rx_posted() > 0);
    }

    #[test]
    fn big_buffer_rx_without_mrg() {
        let (_ram, mut pair, mut dev) = setup(cfg(false, false));
        pair.post_rx_buffers(16).unwrap();
        let frames: Vec<_> = (0..16).map(|i| frame(60 + i * 90, i as u64)).collect();
        for f in &frames {
            assert!(dev.deliver(f));
        }
        assert!(!dev.deliver(&frames[0]));
        assert_eq!(collect(&mut pair), frames);
        assert_eq!(pair.stats().rx_buffers, 16);
    }

    #[test]
    fn tx_layouts_reach_the_device() {
        for layout in [TxLayout::Single, TxLayout::Chained, TxLayout::Indirect] {
            for event_idx in [false, true] {
                let c = PairConfig {
                    tx_layout: layout,
                    ..cfg(true, event_idx)
                };
                let (_ram, mut pair, mut dev) = setup(c);
                let frames: Vec<_> = (0..40).map(|i| frame(60 + i * 30, i as u64)).collect();
                let mut got = Vec::new();
                let mut i = 0;
                while i < frames.len() {
                    if pair.send_frame(&frames[i]).unwrap() {
                        i += 1;
                    } else {
                        got.extend(dev.drain_tx());
                    }
                }
                got.extend(dev.drain_tx());
                assert_eq!(got.len(), 40, "{layout:?}");
                for (k, (h, f)) in got.iter().enumerate() {
                    assert_eq!(h, &vec![0u8; 12]);
                    assert_eq!(f, &frames[k]);
                }
                pair.reclaim_tx().unwrap();
                assert_eq!(pair.tx_in_flight(), 0);
                let st = pair.stats();
                assert_eq!(st.tx_frames, 40);
                assert_eq!(st.tx_completed, 40);
                assert!(st.tx_ring_full > 0);
                assert!(st.tx_kicks >= 1);
                let big = vec![0u8; 1515];
                assert!(matches!(
                    pair.send_frame(&big),
                    Err(QueueError::FrameTooLarge {
                        len: 1515,
                        max: 1514
                    })
                ));
            }
        }
    }

    #[test]
    fn tx_batch_kicks_once_and_event_idx_suppresses() {
        let (_ram, mut pair, mut dev) = setup(cfg(true, true));
        let f = frame(100, 0);
        let batch: Vec<&[u8]> = vec![&f; 8];
        assert_eq!(pair.send_frames(&batch).unwrap(), 8);
        assert_eq!(pair.stats().tx_kicks, 1);
        // Device has not re-armed avail_event: more frames do not kick.
        assert!(pair.send_frame(&f).unwrap());
        assert_eq!(pair.stats().tx_kicks, 1);
        assert_eq!(dev.drain_tx().len(), 9);
        dev.enable_kicks();
        assert!(pair.send_frame(&f).unwrap());
        assert_eq!(pair.stats().tx_kicks, 2);
        // TX interrupts are off by default (reaped on send).
        assert_eq!(dev.tx_signals, 0);
    }

    #[test]
    fn interrupts_and_wakeups() {
        for event_idx in [true, false] {
            let (_ram, mut pair, mut dev) = setup(cfg(true, event_idx));
            pair.post_rx_buffers(16).unwrap();
            let t = Some(Duration::from_millis(10));
            assert!(!pair.wait_rx_interrupt(t).unwrap());
            assert!(dev.deliver(&frame(60, 0)));
            assert_eq!(dev.rx_signals, 1);
            assert!(pair.wait_rx_interrupt(t).unwrap());
            assert_eq!(pair.stats().rx_interrupts, 1);
            // NAPI: after the interrupt callbacks are off until the next wait.
            assert!(dev.deliver(&frame(60, 1)));
            assert_eq!(dev.rx_signals, 1, "event_idx={event_idx}");
            assert_eq!(collect(&mut pair).len(), 2);
            // Pending used entries make wait return at once without an interrupt.
            assert!(dev.deliver(&frame(60, 2)));
            assert!(pair.wait_rx_interrupt(t).unwrap());
            assert_eq!(pair.stats().rx_interrupts, 1);
            assert_eq!(collect(&mut pair).len(), 1);
            // Armed again: the next frame interrupts.
            assert!(!pair.wait_rx_interrupt(t).unwrap());
            assert!(dev.deliver(&frame(60, 3)));
            assert_eq!(dev.rx_signals, 2);
            assert!(pair.wait_rx_interrupt(t).unwrap());
            assert_eq!(pair.stats().rx_interrupts, 2);

            // TX: wait arms a delayed interrupt.
            let f = frame(60, 0);
            for _ in 0..4 {
                assert!(pair.send_frame(&f).unwrap());
            }
            assert!(!pair.wait_tx_interrupt(t).unwrap());
            dev.drain_tx();
            assert_eq!(dev.tx_signals, 1);
            assert!(pair.wait_tx_interrupt(t).unwrap());
            assert_eq!(pair.stats().tx_interrupts, 1);
            assert_eq!(pair.reclaim_tx().unwrap(), 4);
        }
    }

    #[test]
    fn an_extra_fd_wakes_the_wait_and_short_timeouts_sleep() {
        use std::os::fd::AsFd;
        let (_ram, mut pair, _dev) = setup(cfg(true, true));
        pair.post_rx_buffers(16).unwrap();
        let (other, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
        // Nothing ready: a 300 µs timeout is slept, not rounded down to a busy return.
        let t = Some(Duration::from_micros(300));
        let start = std::time::Instant::now();
        let w = pair.wait_with(true, false, Some(other.as_fd()), t).unwrap();
        assert_eq!(w, Wake::default());
        assert!(start.elapsed() >= Duration::from_micros(300));
        // The other side has something: the wait says so, and no interrupt is counted.
        std::io::Write::write_all(&mut peer, b"x").unwrap();
        let w = pair
            .wait_with(
                true,
                false,
                Some(other.as_fd()),
                Some(Duration::from_secs(5)),
            )
            .unwrap();
        assert_eq!(
            w,
            Wake {
                rx: false,
                tx: false,
                fd: true
            }
        );
        assert_eq!(pair.stats().rx_interrupts, 0);
    }

    #[test]
    fn wakeup_from_another_thread() {
        let (_ram, mut pair, mut dev) = setup(cfg(true, true));
        pair.post_rx_buffers(16).unwrap();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            assert!(dev.deliver(&frame(200, 7)));
            dev
        });
        assert!(pair
            .wait_rx_interrupt(Some(Duration::from_secs(5)))
            .unwrap());
        let _dev = h.join().unwrap();
        assert_eq!(collect(&mut pair).len(), 1);
    }

    #[test]
    fn raw_chains_then_normal_operation() {
        let (mut ram, mut pair, mut dev) = setup(cfg(true, true));
        let scratch = ram.alloc(4096, 16, "scratch").unwrap();
        // A read-only RX buffer.
        let h1 = pair
            .post_raw_rx_chain(&[RawDesc {
                addr: scratch.0,
                len: 1024,
                flags: 0,
                next: RawNext::Follow,
            }])
            .unwrap();
        // A loop.
        let h2 = pair
            .post_raw_rx_chain(&[
                RawDesc {
                    addr: scratch.0,
                    len: 64,
                    flags: VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                    next: RawNext::Follow,
                },
                RawDesc {
                    addr: scratch.0 + 64,
                    len: 64,
                    flags: VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                    next: RawNext::Chain(0),
                },
            ])
            .unwrap();
        // The device refuses both (used len 0), as a careful backend would.
        let mem = ram.memory().clone();
        for _ in 0..2 {
            let c = dev.rxq.pop_descriptor_chain(&mem).unwrap();
            dev.rxq.add_used(&mem, c.head_index(), 0).unwrap();
        }
        assert_eq!(collect(&mut pair).len(), 0);
        let raw = pair.take_raw_completions();
        assert_eq!(raw.len(), 2);
        assert_eq!((raw[0].head, raw[0].len), (h1, 0));
        assert_eq!((raw[1].head, raw[1].len), (h2, 0));
        // Normal operation afterwards.
        assert_eq!(pair.post_rx_buffers(16).unwrap(), 16);
        let f = frame(300, 1);
        assert!(dev.deliver(&f));
        assert_eq!(collect(&mut pair), vec![f]);
        // Raw TX chain with an address outside guest memory.
        let h = pair
            .post_raw_tx_chain(&[RawDesc {
                addr: 1 << 40,
                len: 100,
                flags: 0,
                next: RawNext::Follow,
            }])
            .unwrap();
        let c = dev.txq.pop_descriptor_chain(&mem).unwrap();
        dev.txq.add_used(&mem, c.head_index(), 0).unwrap();
        assert_eq!(pair.reclaim_tx().unwrap(), 1);
        assert_eq!(pair.take_raw_completions()[0].head, h);
        assert!(pair.send_frame(&frame(60, 2)).unwrap());
        assert_eq!(dev.drain_tx().len(), 1);
    }

    #[test]
    fn misbehaving_device_is_an_error_not_a_panic() {
        let (ram, mut pair, mut dev) = setup(cfg(true, true));
        pair.post_rx_buffers(16).unwrap();
        let mem = ram.memory().clone();
        let c = dev.rxq.pop_descriptor_chain(&mem).unwrap();
        dev.rxq.add_used(&mem, c.head_index(), 513).unwrap();
        let e = pair.poll_rx(|_, _| ()).unwrap_err();
        assert!(matches!(
            e,
            QueueError::Ring {
                queue: 0,
                source: RingError::UsedLenTooLarge { .. }
            }
        ));
        assert!(e.to_string().contains("used len 513"));
    }

    #[test]
    fn endless_mergeable_frame_is_an_error() {
        let (ram, mut pair, mut dev) = setup(cfg(true, true));
        let mem = ram.memory().clone();
        let mut first = true;
        for _ in 0..20 {
            pair.post_rx_buffers(16).unwrap();
            while let Some(c) = dev.rxq.pop_descriptor_chain(&mem) {
                if first {
                    let addr = c.clone().next().unwrap().addr();
                    let mut hb = [0u8; 12];
                    VirtioNetHdr {
                        num_buffers: 200,
                        ..Default::default()
                    }
                    .write(&mut hb);
                    mem.write_slice(&hb, addr).unwrap();
                    first = false;
                }
                dev.rxq.add_used(&mem, c.head_index(), 512).unwrap();
            }
            match pair.poll_rx(|_, _| panic!("no frame expected")) {
                Ok(0) => continue,
                Err(QueueError::OversizedFrame {
                    num_buffers: 200, ..
                }) => return,
                other => panic!("{other:?}"),
            }
        }
        panic!("oversized frame not detected");
    }

    #[test]
    fn header_anomalies_and_short_buffers_are_counted() {
        let (ram, mut pair, mut dev) = setup(cfg(true, true));
        pair.post_rx_buffers(4).unwrap();
        let mem = ram.memory().clone();
        // A buffer shorter than the header.
        let c = dev.rxq.pop_descriptor_chain(&mem).unwrap();
        dev.rxq.add_used(&mem, c.head_index(), 5).unwrap();
        // A header with offload flags although none were negotiated.
        let c = dev.rxq.pop_descriptor_chain(&mem).unwrap();
        let addr = c.clone().next().unwrap().addr();
        let mut hb = [0u8; 12];
        VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_DATA_VALID,
            num_buffers: 1,
            ..Default::default()
        }
        .write(&mut hb);
        mem.write_slice(&hb, addr).unwrap();
        mem.write_slice(&[0xaa; 60], addr.unchecked_add(12))
            .unwrap();
        dev.rxq.add_used(&mem, c.head_index(), 72).unwrap();
        let mut n = 0;
        pair.poll_rx(|f, h| {
            assert_eq!(f, &[0xaa; 60][..]);
            assert_eq!(h.flags, VIRTIO_NET_HDR_F_DATA_VALID);
            n += 1;
        })
        .unwrap();
        assert_eq!(n, 1);
        let st = pair.stats();
        assert_eq!(
            (st.rx_bad_frames, st.rx_hdr_anomalies, st.rx_frames),
            (1, 1, 1)
        );
    }
}
