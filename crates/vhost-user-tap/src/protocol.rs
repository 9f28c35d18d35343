//! vhost-user message framing and dispatch (frontend → backend requests).
//!
//! Why not the `vhost` crate's `BackendReqHandler`: it rejects SET_VRING_ENABLE until
//! SET_FEATURES has acked PROTOCOL_FEATURES, returns the error without replying, and QEMU sends
//! SET_VRING_ENABLE first (see the field notes); QEMU ≥ 8.2 also waits for that reply, so the
//! connection hangs or dies. Here every request gets the reply the spec asks for: a payload for
//! GET_* requests, and with REPLY_ACK a status for the rest, including rejected ones. Message
//! bodies use the `vhost` crate's types; fds arrive through `vmm-sys-util`'s `ScmSocket`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use libc::iovec;
use log::{debug, warn};
use thiserror::Error;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserLog, VhostUserU64, VhostUserVringAddr,
    VhostUserVringState, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::ratelog::{suppressed, RateLimited};
use crate::session::{Session, SessionError};

const HDR_SIZE: usize = 12;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// Bit 8 of a vring fd message: no fd attached.
const VRING_NOFD: u64 = 0x100;

#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("malformed message header: {0}")]
    BadHeader(String),
    #[error("request {}: body of {len} bytes, expected {expected}", name(*request))]
    BadBody {
        request: u32,
        len: usize,
        expected: usize,
    },
}

/// One received request.
pub struct Request {
    pub code: Result<FrontendReq, u32>,
    pub flags: u32,
    pub body: Vec<u8>,
    pub files: Vec<File>,
}

/// A request code for the log: its name when known.
fn name(code: u32) -> String {
    FrontendReq::try_from(code).map_or_else(|_| format!("#{code}"), |r| format!("{r:?}"))
}

impl Request {
    pub fn raw(&self) -> u32 {
        self.code.map_or_else(|raw| raw, u32::from)
    }

    fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    fn parse<T: ByteValued + Default>(&self) -> Result<T, ProtocolError> {
        let mut v = T::default();
        if self.body.len() != size_of::<T>() {
            return Err(ProtocolError::BadBody {
                request: self.raw(),
                len: self.body.len(),
                expected: size_of::<T>(),
            });
        }
        v.as_mut_slice().copy_from_slice(&self.body);
        Ok(v)
    }

    fn take_file(&mut self) -> Option<File> {
        self.files.pop()
    }
}

/// How long a frontend may take to finish a message it started sending, and to take the replies
/// we wrote: a frontend that stalls costs its own connection, never the daemon's loop (which
/// also serves signals, the watchdog and the workers' fatal errors).
pub const MESSAGE_DEADLINE: Duration = Duration::from_secs(1);

/// What `Connection::recv` found.
pub enum Recv {
    Request(Request),
    /// Not a whole message yet: wait for the socket.
    Pending,
    /// The frontend closed the connection between messages.
    Closed,
}

/// The frontend's socket, non-blocking: requests are assembled from whatever arrives, replies
/// wait in a buffer until the frontend takes them. Nothing here ever blocks.
pub struct Connection {
    sock: UnixStream,
    /// The message being assembled: its header so far, its body so far, the fds that came
    /// with it, and when its first byte arrived.
    hdr: [u8; HDR_SIZE],
    hdr_len: usize,
    body: Vec<u8>,
    body_len: usize,
    files: Vec<File>,
    started: Option<Instant>,
    /// Replies the frontend has not taken yet, and since when.
    out: Vec<u8>,
    out_pos: usize,
    out_since: Option<Instant>,
    /// Refusals are logged at most once a second: a frontend can send them in a loop.
    reject_log: RateLimited,
}

impl Connection {
    pub fn new(sock: UnixStream) -> io::Result<Self> {
        crate::sys::set_nonblocking(std::os::fd::AsRawFd::as_raw_fd(&sock))?;
        Ok(Connection {
            sock,
            hdr: [0; HDR_SIZE],
            hdr_len: 0,
            body: Vec::new(),
            body_len: 0,
            files: Vec::new(),
            started: None,
            out: Vec::new(),
            out_pos: 0,
            out_since: None,
            reject_log: RateLimited::default(),
        })
    }

    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// When the connection must be given up if nothing changes: a message started and not
    /// finished, or replies not taken, for `MESSAGE_DEADLINE`.
    pub fn deadline(&self) -> Option<Instant> {
        [self.started, self.out_since]
            .into_iter()
            .flatten()
            .min()
            .map(|t| t + MESSAGE_DEADLINE)
    }

    /// Whether replies wait for the frontend to read them (then no request is read: it would
    /// only queue more).
    pub fn wants_write(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Read what is there; a whole request when one is complete.
    pub fn recv(&mut self) -> Result<Recv, ProtocolError> {
        loop {
            if self.hdr_len < HDR_SIZE {
                let mut fds = [-1; MAX_ATTACHED_FD_ENTRIES];
                let mut iov = [iovec {
                    iov_base: self.hdr[self.hdr_len..].as_mut_ptr().cast(),
                    iov_len: HDR_SIZE - self.hdr_len,
                }];
                // SAFETY: the iovec points at the rest of `self.hdr`, which outlives the call and
                // may take any bytes.
                let got = unsafe { self.sock.recv_with_fds(&mut iov, &mut fds) };
                let (n, nfds) = match got {
                    Ok(r) => r,
                    Err(e) if e.errno() == libc::EAGAIN => return Ok(Recv::Pending),
                    Err(e) if e.errno() == libc::EINTR => continue,
                    Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
                };
                // SAFETY: recvmsg handed us these descriptors; wrapping them closes them.
                self.files.extend(
                    fds[..nfds]
                        .iter()
                        .map(|&fd| unsafe { File::from_raw_fd(fd) }),
                );
                if n == 0 {
                    return if self.started.is_none() {
                        Ok(Recv::Closed)
                    } else {
                        Err(io::Error::from(io::ErrorKind::UnexpectedEof).into())
                    };
                }
                self.started.get_or_insert_with(Instant::now);
                self.hdr_len += n;
                if self.hdr_len < HDR_SIZE {
                    continue;
                }
                let word = |i: usize| u32::from_le_bytes(self.hdr[i..i + 4].try_into().expect("4"));
                let (request, flags, size) = (word(0), word(4), word(8) as usize);
                if flags & 0x3 != FLAG_VERSION_1 || flags & FLAG_REPLY != 0 {
                    return Err(ProtocolError::BadHeader(format!(
                        "request {request} flags {flags:#x}: not a version-1 request"
                    )));
                }
                if size > MAX_MSG_SIZE {
                    return Err(ProtocolError::BadHeader(format!(
                        "request {request}: body size {size} exceeds {MAX_MSG_SIZE}"
                    )));
                }
                self.body = vec![0u8; size];
                self.body_len = 0;
            }
            if self.body_len < self.body.len() {
                match self.sock.read(&mut self.body[self.body_len..]) {
                    Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                    Ok(n) => self.body_len += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Recv::Pending),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
                continue;
            }
            let word = |i: usize| u32::from_le_bytes(self.hdr[i..i + 4].try_into().expect("4"));
            let (request, flags) = (word(0), word(4));
            self.hdr_len = 0;
            self.started = None;
            return Ok(Recv::Request(Request {
                code: FrontendReq::try_from(request).map_err(|_| request),
                flags,
                body: std::mem::take(&mut self.body),
                files: std::mem::take(&mut self.files),
            }));
        }
    }

    /// Write what the frontend will take of the pending replies.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.out_pos < self.out.len() {
            match self.sock.write(&self.out[self.out_pos..]) {
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        self.out_since = None;
        Ok(())
    }

    fn send_reply(&mut self, code: impl Into<u32>, payload: &[u8]) -> io::Result<()> {
        let len = u32::try_from(payload.len()).map_err(|_| io::Error::other("reply too large"))?;
        self.out.extend_from_slice(&code.into().to_le_bytes());
        self.out
            .extend_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out.extend_from_slice(payload);
        self.out_since.get_or_insert_with(Instant::now);
        self.flush()
    }

    fn reply_u64(&mut self, code: impl Into<u32>, v: u64) -> io::Result<()> {
        self.send_reply(code, VhostUserU64::new(v).as_slice())
    }

    /// Handle one request against the session. Errors returned here end the connection; a
    /// request the session rejects is logged and acked with a failure status instead.
    pub fn dispatch(&mut self, s: &mut Session, mut req: Request) -> Result<(), ProtocolError> {
        use FrontendReq as R;
        let code = match req.code {
            Ok(c) => c,
            Err(raw) => {
                if let Some(n) = self.reject_log.allow() {
                    warn!(
                        "frontend sent unknown request {raw}; rejected{}",
                        suppressed(n)
                    );
                }
                s.rejected(raw);
                return self.ack_raw(s, &req, raw, false);
            }
        };
        debug!(
            "request {code:?} ({} bytes, {} fds)",
            req.body.len(),
            req.files.len()
        );
        let result: Result<(), SessionError> = match code {
            R::GET_FEATURES => return Ok(self.reply_u64(code, s.get_features())?),
            R::GET_PROTOCOL_FEATURES => return Ok(self.reply_u64(code, s.get_protocol_features())?),
            R::GET_QUEUE_NUM => return Ok(self.reply_u64(code, s.get_queue_num())?),
            R::GET_VRING_BASE => {
                let m: VhostUserVringState = req.parse()?;
                let (index, num) = match s.get_vring_base(m.index) {
                    Ok(base) => (m.index, base),
                    Err(e) => {
                        if let Some(n) = self.reject_log.allow() {
                            warn!("GET_VRING_BASE rejected: {e}{}", suppressed(n));
                        }
                        s.rejected(u32::from(code));
                        (m.index, 0)
                    }
                };
                let reply = VhostUserVringState::new(index, num);
                return Ok(self.send_reply(code, reply.as_slice())?);
            }
            R::GET_CONFIG => return self.get_config(s, &req),
            R::SET_LOG_BASE => {
                // QEMU waits for this reply whether or not it asked for one, and reads no status
                // from it: a failure shows in our log, the counter, and queues that stop while
                // logging is on (`Session::log_blocks`).
                let m: VhostUserLog = req.parse()?;
                let result = s.set_log_base(m.mmap_size, m.mmap_offset, req.take_file());
                if let Err(e) = &result {
                    self.refused(s, code, e);
                }
                return Ok(self.reply_u64(code, u64::from(result.is_err()))?);
            }
            R::SET_LOG_FD => s.set_log_fd(req.take_file()),
            R::SEND_RARP => {
                let v = req.parse::<VhostUserU64>()?.value.to_le_bytes();
                s.send_rarp(v[..6].try_into().expect("6 of 8 bytes"))
            }
            R::SET_FEATURES => s.set_features(req.parse::<VhostUserU64>()?.value),
            R::SET_PROTOCOL_FEATURES => s.set_protocol_features(req.parse::<VhostUserU64>()?.value),
            R::SET_OWNER => Ok(()),
            R::RESET_OWNER | R::RESET_DEVICE => {
                s.reset();
                Ok(())
            }
            R::SET_MEM_TABLE => self.set_mem_table(s, &mut req),
            R::SET_VRING_NUM => {
                let m: VhostUserVringState = req.parse()?;
                s.set_vring_num(m.index, m.num)
            }
            R::SET_VRING_ADDR => {
                let m: VhostUserVringAddr = req.parse()?;
                s.set_vring_addr(m.index, m.flags, m.descriptor, m.used, m.available, m.log)
            }
            R::SET_VRING_BASE => {
                let m: VhostUserVringState = req.parse()?;
                s.set_vring_base(m.index, m.num)
            }
            R::SET_VRING_KICK | R::SET_VRING_CALL | R::SET_VRING_ERR => {
                let v = req.parse::<VhostUserU64>()?.value;
                let index = (v & 0xff) as u32;
                let file = if v & VRING_NOFD != 0 {
                    None
                } else {
                    req.take_file()
                };
                match code {
                    R::SET_VRING_KICK => s.set_vring_kick(index, file),
                    R::SET_VRING_CALL => s.set_vring_call(index, file),
                    _ => s.set_vring_err(index, file),
                }
            }
            R::SET_VRING_ENABLE => {
                let m: VhostUserVringState = req.parse()?;
                s.set_vring_enable(m.index, m.num != 0)
            }
            R::SET_CONFIG => Err(SessionError::ConfigReadOnly),
            other => {
                if let Some(n) = self.reject_log.allow() {
                    warn!(
                        "frontend sent unsupported request {other:?}; rejected{}",
                        suppressed(n)
                    );
                }
                s.rejected(u32::from(other));
                return self.ack_raw(s, &req, u32::from(other), false);
            }
        };
        if let Err(e) = &result {
            self.refused(s, code, e);
        }
        self.ack_raw(s, &req, u32::from(code), result.is_ok())
    }

    /// Log (rate-limited) and count a request the session refused.
    fn refused(&mut self, s: &Session, code: FrontendReq, e: &SessionError) {
        if let Some(n) = self.reject_log.allow() {
            // A refused ring setup leaves that ring dead: say it loudly.
            let level = if e.ring_setup() {
                log::Level::Error
            } else {
                log::Level::Warn
            };
            log::log!(level, "{code:?} rejected: {e}{}", suppressed(n));
        }
        s.rejected(u32::from(code));
    }

    fn ack_raw(
        &mut self,
        s: &Session,
        req: &Request,
        raw: u32,
        ok: bool,
    ) -> Result<(), ProtocolError> {
        if s.reply_ack_enabled() && req.need_reply() {
            // The reply echoes the request code, known to us or not.
            self.reply_u64(raw, u64::from(!ok))?;
        }
        Ok(())
    }

    fn set_mem_table(&mut self, s: &mut Session, req: &mut Request) -> Result<(), SessionError> {
        let regions = crate::memory::parse_table(&req.body, req.files.len())?;
        s.set_mem_table(&regions, std::mem::take(&mut req.files))
    }

    fn get_config(&mut self, s: &Session, req: &Request) -> Result<(), ProtocolError> {
        let hdr_len = size_of::<VhostUserConfig>();
        if req.body.len() < hdr_len {
            return Err(ProtocolError::BadBody {
                request: req.raw(),
                len: req.body.len(),
                expected: hdr_len,
            });
        }
        let mut cfg = VhostUserConfig::default();
        cfg.as_mut_slice().copy_from_slice(&req.body[..hdr_len]);
        let (offset, size) = (cfg.offset, cfg.size);
        // On failure the spec has the reply carry an empty payload.
        let payload = match s.get_config(offset, size) {
            Ok(p) => p,
            Err(e) => {
                warn!("GET_CONFIG rejected: {e}");
                cfg.size = 0;
                Vec::new()
            }
        };
        let mut out = cfg.as_slice().to_vec();
        out.extend_from_slice(&payload);
        Ok(self.send_reply(FrontendReq::GET_CONFIG, &out)?)
    }
}
