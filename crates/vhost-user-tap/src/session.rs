//! State of one frontend connection: negotiated features, guest memory, vrings, and the queue-pair
//! workers that run on them.
//!
//! Every change to something a worker uses goes through `with_pair`: stop the pair's worker (its
//! queues and staged frame come back), apply the change, start a worker again if the pair has a
//! queue that is started and enabled. Changes are rare control-path events; the data path never
//! shares state with this module.
//!
//! Message order is taken as frontends really send it: QEMU sends SET_VRING_ENABLE before
//! SET_FEATURES, so enable state is recorded whenever it arrives; a ring runs once it is started
//! (kick received) and enabled.

use std::fs::File;
use std::sync::Arc;

use log::{debug, error, info, warn};
use thiserror::Error;
use vhost::vhost_user::message::{VhostUserMemoryRegion, VhostUserProtocolFeatures};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::device::Device;
use crate::dirty_log::DirtyLog;
use crate::memory::GuestMemory;
use crate::pair::{PairLog, PairSetup, QueueRun};
use crate::ring::{DeviceQueue, Notifier};
use crate::virtio_net::{self, NetConfigSpace, NetFeatures, VHOST_USER_F_PROTOCOL_FEATURES};
use crate::worker::Worker;

#[derive(Debug, Error)]
pub enum SessionError {
    #[error("vring index {0} out of range (this backend has {1} queues)")]
    BadIndex(u32, usize),
    #[error("features {0:#x} were not offered")]
    UnofferedFeatures(u64),
    #[error("protocol features {0:#x} were not offered")]
    UnofferedProtocolFeatures(u64),
    #[error(
        "vring {0}: size {1} is not a power of two up to {2} (--queue-size): the ring does not \
         run until the frontend sets a size it can have"
    )]
    BadSize(u32, u32, u16),
    #[error("vring {0}: no guest memory table yet")]
    NoMemory(u32),
    #[error("vring {0}: {1} address {2:#x} is not in any guest memory region")]
    BadRingAddress(u32, &'static str, u64),
    #[error("vring {0}: base {1:#x} is not a split ring's 16-bit index")]
    BadBase(u32, u32),
    #[error("vring {0}: {1} at guest address {2:#x} is misaligned")]
    Misaligned(u32, &'static str, u64),
    #[error(
        "dirty logging (VHOST_F_LOG_ALL) asked for without a usable log (SET_LOG_BASE): \
         guest memory written now would not reach the destination"
    )]
    NoLog,
    #[error("dirty log: {0}")]
    Log(#[from] crate::dirty_log::LogError),
    #[error(
        "dirty log of {len} bytes covers guest addresses up to {covers:#x}, guest memory ends \
         at {end:#x}"
    )]
    LogTooSmall { len: usize, covers: u64, end: u64 },
    #[error("SET_LOG_BASE without the log's fd")]
    NoLogFd,
    #[error("the dirty log's eventfd (SET_LOG_FD) is {0}")]
    LogFd(String),
    #[error("announce: writing the RARP into the tap failed: {0}")]
    Announce(#[source] std::io::Error),
    #[error(
        "announce: more than {} RARPs in a burst (one more per {:?} allowed); not sent",
        crate::announce::BURST,
        crate::announce::REFILL
    )]
    AnnounceRate,
    #[error("vring {0}: polling mode (no kick eventfd) is not supported")]
    NoKickFd(u32),
    #[error("vring {0}: the {1} fd is {2}")]
    NotAnEventfd(u32, &'static str, String),
    #[error("memory table: {0}")]
    Memory(#[from] crate::memory::MemoryError),
    #[error("tap: {0}")]
    Tap(#[from] crate::tap::TapError),
    #[error("config space is read-only")]
    ConfigReadOnly,
    #[error("config read at {0}+{1} is out of range")]
    ConfigRange(u32, u32),
    #[error("starting worker: {0}")]
    Spawn(#[source] std::io::Error),
}

type Result<T> = std::result::Result<T, SessionError>;

/// `VHOST_VRING_F_LOG`: SET_VRING_ADDR asks for the used ring's writes to be logged at
/// `log_guest_addr`.
const VHOST_VRING_F_LOG: u32 = 1;

impl SessionError {
    /// Whether the refusal leaves a ring unable to run (its size, addresses, eventfds or the
    /// memory they live in).
    pub fn ring_setup(&self) -> bool {
        matches!(
            self,
            SessionError::BadSize(..)
                | SessionError::BadRingAddress(..)
                | SessionError::Misaligned(..)
                | SessionError::NotAnEventfd(..)
                | SessionError::Memory(_)
                | SessionError::NoMemory(_)
                | SessionError::NoLog
                | SessionError::NoLogFd
                | SessionError::Log(_)
                | SessionError::LogTooSmall { .. }
        )
    }
}

/// A frontend fd where an eventfd belongs: checked and made non-blocking (`sys::frontend_eventfd`).
fn eventfd(index: u32, what: &'static str, fd: &File) -> Result<()> {
    crate::sys::frontend_eventfd(fd).map_err(|why| SessionError::NotAnEventfd(index, what, why))
}

struct Vring {
    queue: Queue,
    kick: Option<Arc<File>>,
    call: Option<Arc<File>>,
    err: Option<Arc<File>>,
    enabled: bool,
    started: bool,
    /// The setup request that was refused, if any: the ring must not run until it is redone.
    refused: Option<&'static str>,
    /// Where the used ring's writes are logged when not at the ring's own address
    /// (`log_guest_addr`, when the frontend set VHOST_VRING_F_LOG).
    log_gpa: Option<u64>,
    /// SET_VRING_BASE came: at the next start, the used index is taken from guest memory.
    resync: bool,
}

impl Vring {
    fn new(max: u16) -> Vring {
        Vring {
            queue: Queue::new(max).expect("queue size validated by config"),
            kick: None,
            call: None,
            err: None,
            enabled: false,
            started: false,
            refused: None,
            log_gpa: None,
            resync: false,
        }
    }

    /// Where the used ring's writes are logged.
    fn used_log_gpa(&self) -> u64 {
        self.log_gpa.unwrap_or_else(|| self.queue.used_ring())
    }
}

pub struct Session<'d> {
    dev: &'d mut Device,
    features: u64,
    /// When features were acked while no memory table had come (see `memory_overdue`).
    features_acked_at: Option<std::time::Instant>,
    protocol: u64,
    memory: Option<GuestMemory>,
    /// The migration dirty log (SET_LOG_BASE) and the eventfd to signal after writing it
    /// (SET_LOG_FD).
    log: Option<Arc<DirtyLog>>,
    log_signal: Option<Arc<File>>,
    /// SEND_RARP's allowance (`announce::Budget`).
    announces: crate::announce::Budget,
    announce_log: crate::ratelog::RateLimited,
    vrings: Vec<Vring>,
    workers: Vec<Option<Worker>>,
}

impl<'d> Session<'d> {
    pub fn new(dev: &'d mut Device) -> Self {
        let n = dev.num_queues();
        let max = dev.config.queue_size;
        let pairs = dev.pairs.len();
        Session {
            dev,
            features: 0,
            features_acked_at: None,
            protocol: 0,
            memory: None,
            log: None,
            log_signal: None,
            announces: Default::default(),
            announce_log: Default::default(),
            vrings: (0..n).map(|_| Vring::new(max)).collect(),
            workers: (0..pairs).map(|_| None).collect(),
        }
    }

    pub fn device(&self) -> &Device {
        self.dev
    }

    fn check_index(&self, index: u32) -> Result<usize> {
        let i = index as usize;
        if i < self.vrings.len() {
            Ok(i)
        } else {
            Err(SessionError::BadIndex(index, self.vrings.len()))
        }
    }

    /// Count a refused request (see `FrontendStats`).
    pub fn rejected(&self, code: u32) {
        self.dev.frontend.reject(code);
    }

    pub fn reply_ack_enabled(&self) -> bool {
        self.protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    pub fn get_features(&self) -> u64 {
        self.dev.offered
    }

    pub fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !self.dev.offered != 0 {
            return Err(SessionError::UnofferedFeatures(
                features & !self.dev.offered,
            ));
        }
        let nf = NetFeatures { acked: features };
        if nf.log_all() && self.log.is_none() {
            // Refused, so the frontend's migration fails (QEMU waits for this reply when it turns
            // logging on) rather than copying memory we write without telling it.
            return Err(SessionError::NoLog);
        }
        let was_logging = self.logging();
        // The tap's header size and offloads change while no worker reads the tap: frames read
        // afterwards have the new layout, and a staged frame is converted when its pair starts.
        self.with_all_pairs(|s| {
            let tap = &s.dev.pairs[0].tap;
            let set = tap
                .set_vnet_hdr_len(nf.hdr_len())
                .and_then(|_| tap.set_offload(nf.tun_offloads()));
            match set {
                Ok(()) => {
                    s.features = features;
                    Ok(())
                }
                Err(e) => {
                    if e.is_gone() {
                        let _ = s.dev.fatal.write(1);
                    }
                    Err(e)
                }
            }
        })??;
        info!(
            "features acked {features:#x}: header {} bytes, mergeable RX buffers {}, event idx {}, \
             tap offloads {:#x}",
            nf.hdr_len(),
            nf.mrg_rxbuf(),
            nf.event_idx(),
            nf.tun_offloads()
        );
        if self.memory.is_none() {
            self.features_acked_at = Some(std::time::Instant::now());
        }
        if was_logging != self.logging() {
            info!(
                "dirty logging {}",
                if self.logging() {
                    "on: the frontend is migrating the guest"
                } else {
                    "off"
                }
            );
        }
        Ok(())
    }

    /// Whether writes into guest memory are logged: the frontend turned VHOST_F_LOG_ALL on.
    pub fn logging(&self) -> bool {
        NetFeatures {
            acked: self.features,
        }
        .log_all()
    }

    /// SET_LOG_BASE: the log to mark from now on, replacing any earlier one. On failure the old
    /// log is dropped too: pairs do not run while logging is on without a log (`log_blocks`).
    pub fn set_log_base(&mut self, size: u64, offset: u64, file: Option<File>) -> Result<()> {
        let mapped = file
            .ok_or(SessionError::NoLogFd)
            .and_then(|f| Ok(DirtyLog::map(f, size, offset)?))
            .and_then(|log| {
                if let Some(end) = self.memory.as_ref().map(GuestMemory::end) {
                    if !log.covers_range(0, end) {
                        return Err(SessionError::LogTooSmall {
                            len: log.bytes(),
                            covers: log.covers(),
                            end,
                        });
                    }
                }
                Ok(log)
            });
        let (log, result) = match mapped {
            Ok(log) => {
                debug!("dirty log: {size} bytes at offset {offset}");
                (Some(Arc::new(log)), Ok(()))
            }
            Err(e) => (None, Err(e)),
        };
        self.with_all_pairs(|s| s.log = log)?;
        result
    }

    /// SET_LOG_FD: an eventfd to signal after marking the log.
    pub fn set_log_fd(&mut self, fd: Option<File>) -> Result<()> {
        let fd = fd
            .map(|f| crate::sys::frontend_eventfd(&f).map(|()| Arc::new(f)))
            .transpose()
            .map_err(SessionError::LogFd);
        let (fd, result) = match fd {
            Ok(fd) => (fd, Ok(())),
            Err(e) => (None, Err(e)),
        };
        self.with_all_pairs(|s| s.log_signal = fd)?;
        result
    }

    /// SEND_RARP: announce the guest at `mac` through the tap, as if it had sent a RARP itself.
    pub fn send_rarp(&mut self, mac: [u8; 6]) -> Result<()> {
        if !self.announces.take(std::time::Instant::now()) {
            return Err(SessionError::AnnounceRate);
        }
        let frame = crate::announce::rarp_frame(mac);
        // Zeroes, as long as any header tun takes (10, 12, 20 with the hash report).
        let hdr = [0u8; 64];
        // The tap's length, not the acked features' one: QEMU's first SEND_RARP on a
        // migration's destination comes before SET_FEATURES, when a daemon that served another
        // frontend has features 0 (the legacy header) and a tap still on that frontend's header.
        let tap = &self.dev.pairs[0].tap;
        let hdr_len = tap.vnet_hdr_len().min(hdr.len());
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr().cast_mut().cast(),
                iov_len: hdr_len,
            },
            libc::iovec {
                iov_base: frame.as_ptr().cast_mut().cast(),
                iov_len: frame.len(),
            },
        ];
        tap.writev(&iov).map_err(SessionError::Announce)?;
        self.dev.frontend.announced();
        if let Some(n) = self.announce_log.allow() {
            info!(
                "announced {} on the tap (RARP){}",
                mac.map(|b| format!("{b:02x}")).join(":"),
                crate::ratelog::suppressed(n)
            );
        }
        Ok(())
    }

    /// How long the frontend has been overdue with its memory table, if it is: QEMU sends
    /// SET_MEM_TABLE right after SET_FEATURES, in the same millisecond, unless the guest's
    /// memory cannot be shared (no fd to pass), in which case it never does and the NIC is dead
    /// on both sides with nothing but a line in QEMU's log. `None` once the table came.
    pub fn memory_overdue(&self) -> Option<std::time::Duration> {
        self.features_acked_at
            .filter(|_| self.memory.is_none())
            .map(|t| t.elapsed())
    }

    pub fn get_protocol_features(&self) -> u64 {
        self.dev.protocol_features().bits()
    }

    pub fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        let offered = self.dev.protocol_features().bits();
        if features & !offered != 0 {
            return Err(SessionError::UnofferedProtocolFeatures(features & !offered));
        }
        self.protocol = features;
        Ok(())
    }

    /// Queue *pairs*: QEMU compares the answer with `-netdev vhost-user,queues=N` (pairs), as
    /// DPDK's backend answers it, so a frontend asking for too many pairs is refused at start.
    pub fn get_queue_num(&self) -> u64 {
        self.dev.pairs.len() as u64
    }

    pub fn get_config(&self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let space = NetConfigSpace {
            mac: self.dev.config.mac,
            // Exact: at most MAX_QUEUE_PAIRS (64).
            #[allow(clippy::cast_possible_truncation)]
            max_queue_pairs: self.dev.pairs.len() as u16,
            mtu: self.dev.config.mtu,
        }
        .to_bytes();
        // Fields past the ones we serve (RSS, hash report) read as zero, as for a device without
        // those features.
        let end = offset.checked_add(size).filter(|&e| e <= 256);
        let Some(end) = end else {
            return Err(SessionError::ConfigRange(offset, size));
        };
        Ok((offset..end)
            .map(|i| space.get(i as usize).copied().unwrap_or(0))
            .collect())
    }

    pub fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<()> {
        let memory = GuestMemory::map(regions, files)?;
        // With logging on, a log that does not cover the new memory keeps the pairs stopped,
        // and `start_pair` says why (`log_blocks`).
        self.with_all_pairs(|s| s.memory = Some(memory))
    }

    pub fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let i = self.check_index(index)?;
        let max = self.dev.config.queue_size;
        let refused = self.with_pair(i / 2, |s| {
            let v = &mut s.vrings[i];
            let ok = u16::try_from(num)
                .ok()
                .filter(|&n| n <= max && v.queue.try_set_size(n).is_ok());
            // A frontend that does not wait for the reply (DPDK's virtio-user asks for none)
            // goes on to start the ring: it must not run on a size the guest does not use.
            v.refused = ok.is_none().then_some("SET_VRING_NUM");
            if ok.is_none() {
                v.queue.set_ready(false);
                Notifier(v.err.clone()).signal();
            }
            ok.is_none()
        });
        if refused {
            return Err(SessionError::BadSize(index, num, max));
        }
        Ok(())
    }

    pub fn set_vring_addr(
        &mut self,
        index: u32,
        flags: u32,
        desc: u64,
        used: u64,
        avail: u64,
        log_addr: u64,
    ) -> Result<()> {
        let i = self.check_index(index)?;
        let Some(memory) = &self.memory else {
            return Err(SessionError::NoMemory(index));
        };
        let tr = |what, a| {
            memory
                .uva_to_gpa(a)
                .ok_or(SessionError::BadRingAddress(index, what, a))
        };
        let (d, u, a) = (
            tr("descriptor", desc)?,
            tr("used", used)?,
            tr("avail", avail)?,
        );
        self.with_pair(i / 2, |s| {
            let q = &mut s.vrings[i].queue;
            let misaligned = |what, addr| move |_| SessionError::Misaligned(index, what, addr);
            let set = q
                .try_set_desc_table_address(GuestAddress(d))
                .map_err(misaligned("descriptor table", d))
                .and_then(|_| {
                    q.try_set_avail_ring_address(GuestAddress(a))
                        .map_err(misaligned("avail ring", a))
                })
                .and_then(|_| {
                    q.try_set_used_ring_address(GuestAddress(u))
                        .map_err(misaligned("used ring", u))
                });
            // A ring whose addresses were refused must not run on the ones it had.
            q.set_ready(set.is_ok());
            s.vrings[i].log_gpa = (flags & VHOST_VRING_F_LOG != 0).then_some(log_addr);
            set
        })
    }

    pub fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let i = self.check_index(index)?;
        // A split ring's index is 16 bits; more is a packed ring's wrap counter, not offered.
        let base = u16::try_from(base).map_err(|_| SessionError::BadBase(index, base))?;
        self.with_pair(i / 2, |s| {
            let v = &mut s.vrings[i];
            v.queue.set_next_avail(base);
            v.queue.set_next_used(base);
            v.resync = true;
        });
        Ok(())
    }

    /// Stop the ring and report where the guest should resume.
    pub fn get_vring_base(&mut self, index: u32) -> Result<u32> {
        let i = self.check_index(index)?;
        let base = self.with_pair(i / 2, |s| {
            let v = &mut s.vrings[i];
            v.started = false;
            v.kick = None;
            v.queue.next_avail()
        });
        debug!("vring {index} stopped at {base}");
        Ok(u32::from(base))
    }

    pub fn set_vring_kick(&mut self, index: u32, fd: Option<File>) -> Result<()> {
        let i = self.check_index(index)?;
        let fd = fd.ok_or(SessionError::NoKickFd(index))?;
        if let Err(e) = eventfd(index, "kick", &fd) {
            // Never run on a kick we cannot trust, nor on the one it replaces.
            self.with_pair(i / 2, |s| {
                let v = &mut s.vrings[i];
                v.kick = None;
                v.started = false;
            });
            return Err(e);
        }
        let implicit_enable = self.features & virtio_net::bit(VHOST_USER_F_PROTOCOL_FEATURES) == 0;
        self.with_pair(i / 2, |s| {
            let v = &mut s.vrings[i];
            v.kick = Some(Arc::new(fd));
            v.started = true;
            // Without PROTOCOL_FEATURES a ring is enabled as soon as it starts.
            if implicit_enable {
                v.enabled = true;
            }
        });
        Ok(())
    }

    pub fn set_vring_call(&mut self, index: u32, fd: Option<File>) -> Result<()> {
        let i = self.check_index(index)?;
        match fd
            .map(|f| eventfd(index, "call", &f).map(|()| f))
            .transpose()
        {
            Ok(fd) => {
                self.with_pair(i / 2, |s| {
                    let v = &mut s.vrings[i];
                    v.call = fd.map(Arc::new);
                    // A ring that has run may have interrupted the old fd for used entries the
                    // guest has not seen, and QEMU drops what was signalled there (it starts a
                    // ring with SET_VRING_KICK and sends the real call fd after, discarding its
                    // placeholder's events). Later decisions only look at entries published
                    // from now on, against a used_event the guest left behind those entries:
                    // without this one interrupt the guest would wait for them forever.
                    if v.started {
                        Notifier(v.call.clone()).signal();
                    }
                });
                Ok(())
            }
            Err(e) => {
                // No interrupts rather than writes into something that may block.
                self.with_pair(i / 2, |s| s.vrings[i].call = None);
                Err(e)
            }
        }
    }

    pub fn set_vring_err(&mut self, index: u32, fd: Option<File>) -> Result<()> {
        let i = self.check_index(index)?;
        match fd
            .map(|f| eventfd(index, "error", &f).map(|()| f))
            .transpose()
        {
            Ok(fd) => {
                self.with_pair(i / 2, |s| s.vrings[i].err = fd.map(Arc::new));
                Ok(())
            }
            Err(e) => {
                self.with_pair(i / 2, |s| s.vrings[i].err = None);
                Err(e)
            }
        }
    }

    pub fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        let i = self.check_index(index)?;
        self.with_pair(i / 2, |s| s.vrings[i].enabled = enable);
        debug!("vring {index} enable={enable}");
        Ok(())
    }

    /// RESET_DEVICE / RESET_OWNER: back to the state of a fresh connection, protocol features
    /// kept.
    pub fn reset(&mut self) {
        self.stop_all();
        let max = self.dev.config.queue_size;
        for v in &mut self.vrings {
            *v = Vring::new(max);
        }
        self.features = 0;
        self.features_acked_at = None;
        self.memory = None;
        self.log = None;
        self.log_signal = None;
    }

    fn with_all_pairs<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> Result<R> {
        self.stop_all();
        let r = f(self);
        for p in 0..self.workers.len() {
            self.start_pair(p)?;
        }
        Ok(r)
    }

    fn with_pair<R>(&mut self, pair: usize, f: impl FnOnce(&mut Self) -> R) -> R {
        self.stop_pair(pair);
        let r = f(self);
        if let Err(e) = self.start_pair(pair) {
            warn!("queue pair {pair}: {e}");
        }
        r
    }

    fn stop_pair(&mut self, p: usize) {
        if let Some(w) = self.workers[p].take() {
            match w.stop() {
                Ok(stopped) => {
                    if let Some(q) = stopped.rx {
                        self.vrings[2 * p].queue = q;
                    }
                    if let Some(q) = stopped.tx {
                        self.vrings[2 * p + 1].queue = q;
                    }
                    self.dev.pairs[p].rest = Some(stopped.rest);
                }
                Err(stuck) => {
                    // A bug, never a guest's doing (batches are bounded): end the daemon so the
                    // service manager starts it afresh, rather than serve without this pair.
                    error!("{stuck}; the daemon exits");
                    let _ = self.dev.fatal.write(1);
                }
            }
        }
    }

    pub fn stop_all(&mut self) {
        for p in 0..self.workers.len() {
            self.stop_pair(p);
        }
    }

    fn runnable(&self, i: usize, mem: &GuestMemoryMmap) -> bool {
        let v = &self.vrings[i];
        v.started && v.enabled && v.refused.is_none() && v.queue.ready() && v.queue.is_valid(mem)
    }

    /// Resume a ring whose base the frontend set where the guest's used ring says it stands
    /// (vhost-user.rst: the used index is read from guest memory). Our own stops leave
    /// `used.idx` at the base; a difference means chains another backend took and never
    /// completed (a crashed one, or the source of a migration): like DPDK's backend, both
    /// indexes go back to `used.idx`, so those chains are done again (a TX frame sent twice, an
    /// RX buffer filled again) instead of being lost to the guest for good.
    fn resync_used(&mut self, i: usize, mem: &GuestMemoryMmap) {
        let v = &mut self.vrings[i];
        if !std::mem::take(&mut v.resync) {
            return;
        }
        let Ok(used) = v.queue.used_idx(mem, std::sync::atomic::Ordering::Acquire) else {
            return;
        };
        let base = v.queue.next_avail();
        if used.0 != base {
            warn!(
                "vring {i}: base {base} but the guest's used index is {}: resuming from the used \
                 index ({} chains taken before and never completed are done again)",
                used.0,
                base.wrapping_sub(used.0)
            );
            v.queue.set_next_avail(used.0);
        }
        v.queue.set_next_used(used.0);
    }

    /// Why pairs cannot run now with logging on, if they cannot: writing guest memory that is
    /// not logged would corrupt the migration silently, so nothing is written instead.
    fn log_blocks(&self, mem_end: u64) -> Option<String> {
        if !self.logging() {
            return None;
        }
        let Some(log) = &self.log else {
            return Some("no usable dirty log (SET_LOG_BASE failed)".into());
        };
        if !log.covers_range(0, mem_end) {
            return Some(format!(
                "the dirty log covers up to {:#x}, guest memory ends at {mem_end:#x}",
                log.covers()
            ));
        }
        self.vrings.iter().enumerate().find_map(|(i, v)| {
            let len = DeviceQueue::used_ring_len(v.queue.size());
            (v.started && !log.covers_range(v.used_log_gpa(), len)).then(|| {
                format!(
                    "vring {i}: its used ring's log address {:#x} is outside the dirty log",
                    v.used_log_gpa()
                )
            })
        })
    }

    fn start_pair(&mut self, p: usize) -> Result<()> {
        let Some((mem, mem_end)) = self.memory.as_ref().map(|m| (m.mapped().clone(), m.end()))
        else {
            return Ok(());
        };
        if let Some(why) = self.log_blocks(mem_end) {
            error!("queue pair {p} not started while the guest migrates: {why}");
            self.dev.sync_attach(p, false);
            return Ok(());
        }
        for i in [2 * p, 2 * p + 1] {
            if self.runnable(i, &mem) {
                self.resync_used(i, &mem);
            }
        }
        let run = |s: &Self, i: usize| {
            s.runnable(i, &mem).then(|| {
                let v = &s.vrings[i];
                QueueRun {
                    queue: Queue::try_from(v.queue.state()).expect("state of a valid queue"),
                    kick: v.kick.clone().expect("started rings have a kick fd"),
                    call: v.call.clone(),
                    err: v.err.clone(),
                    used_log_gpa: v.used_log_gpa(),
                }
            })
        };
        let (rx, tx) = (run(self, 2 * p), run(self, 2 * p + 1));
        self.dev.sync_attach(p, rx.is_some());
        if rx.is_none() && tx.is_none() {
            for i in [2 * p, 2 * p + 1] {
                let v = &self.vrings[i];
                if v.started && v.enabled && !v.queue.is_valid(mem.as_ref()) {
                    warn!("vring {i}: rings do not fit in guest memory; not started");
                }
            }
            return Ok(());
        }
        let slot = &mut self.dev.pairs[p];
        let setup = PairSetup {
            index: p,
            features: NetFeatures {
                acked: self.features,
            },
            mtu: self.dev.config.mtu,
            busy_poll: std::time::Duration::from_micros(self.dev.config.busy_poll_us),
            mem,
            tap: slot.tap.clone(),
            stats: slot.stats.clone(),
            rest: match slot.rest.take() {
                Some(rest) => rest,
                // Its worker is stuck and the daemon is ending.
                None => return Ok(()),
            },
            rx,
            tx,
            log: match (&self.log, self.logging()) {
                (Some(log), true) => Some(PairLog {
                    log: log.clone(),
                    signal: Notifier(self.log_signal.clone()),
                }),
                _ => None,
            },
        };
        debug!(
            "queue pair {p}: worker starting (rx {}, tx {})",
            setup.rx.is_some(),
            setup.tx.is_some()
        );
        match Worker::spawn(setup, self.dev.fatal.clone()) {
            Ok(w) => self.workers[p] = Some(w),
            Err((e, setup)) => {
                self.dev.pairs[p].rest = Some(setup.rest);
                return Err(SessionError::Spawn(e));
            }
        }
        Ok(())
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.stop_all();
        for p in 0..self.dev.pairs.len() {
            self.dev.sync_attach(p, false);
        }
    }
}
