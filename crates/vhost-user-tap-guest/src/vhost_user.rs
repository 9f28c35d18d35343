//! Frontend side of the vhost-user wire protocol: just the requests a virtio-net frontend sends.
//!
//! Written here rather than using `vhost::vhost_user::Frontend` so the guest can do what QEMU
//! does and what tests need: choose the message order (QEMU sends SET_VRING_ENABLE before
//! SET_FEATURES), accept GET_QUEUE_NUM counted in queue *pairs* (QEMU/DPDK) as well as in
//! vrings, set NEED_REPLY per request, and bound every wait for a reply with a timeout so a
//! stuck backend is an error instead of a hang.

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Request codes (vhost-user spec, "Front-end message types").
pub mod req {
    /// GET_FEATURES.
    pub const GET_FEATURES: u32 = 1;
    /// SET_FEATURES.
    pub const SET_FEATURES: u32 = 2;
    /// SET_OWNER.
    pub const SET_OWNER: u32 = 3;
    /// SET_MEM_TABLE.
    pub const SET_MEM_TABLE: u32 = 5;
    /// SET_LOG_BASE.
    pub const SET_LOG_BASE: u32 = 6;
    /// SET_LOG_FD.
    pub const SET_LOG_FD: u32 = 7;
    /// SET_VRING_NUM.
    pub const SET_VRING_NUM: u32 = 8;
    /// SET_VRING_ADDR.
    pub const SET_VRING_ADDR: u32 = 9;
    /// SET_VRING_BASE.
    pub const SET_VRING_BASE: u32 = 10;
    /// GET_VRING_BASE.
    pub const GET_VRING_BASE: u32 = 11;
    /// SET_VRING_KICK.
    pub const SET_VRING_KICK: u32 = 12;
    /// SET_VRING_CALL.
    pub const SET_VRING_CALL: u32 = 13;
    /// SET_VRING_ERR.
    pub const SET_VRING_ERR: u32 = 14;
    /// GET_PROTOCOL_FEATURES.
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    /// SET_PROTOCOL_FEATURES.
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    /// GET_QUEUE_NUM.
    pub const GET_QUEUE_NUM: u32 = 17;
    /// SET_VRING_ENABLE.
    pub const SET_VRING_ENABLE: u32 = 18;
    /// SEND_RARP.
    pub const SEND_RARP: u32 = 19;
    /// GET_CONFIG.
    pub const GET_CONFIG: u32 = 24;

    /// Name of a request code.
    pub fn name(code: u32) -> &'static str {
        match code {
            GET_FEATURES => "GET_FEATURES",
            SET_FEATURES => "SET_FEATURES",
            SET_OWNER => "SET_OWNER",
            SET_MEM_TABLE => "SET_MEM_TABLE",
            SET_LOG_BASE => "SET_LOG_BASE",
            SET_LOG_FD => "SET_LOG_FD",
            SEND_RARP => "SEND_RARP",
            SET_VRING_NUM => "SET_VRING_NUM",
            SET_VRING_ADDR => "SET_VRING_ADDR",
            SET_VRING_BASE => "SET_VRING_BASE",
            GET_VRING_BASE => "GET_VRING_BASE",
            SET_VRING_KICK => "SET_VRING_KICK",
            SET_VRING_CALL => "SET_VRING_CALL",
            SET_VRING_ERR => "SET_VRING_ERR",
            GET_PROTOCOL_FEATURES => "GET_PROTOCOL_FEATURES",
            SET_PROTOCOL_FEATURES => "SET_PROTOCOL_FEATURES",
            GET_QUEUE_NUM => "GET_QUEUE_NUM",
            SET_VRING_ENABLE => "SET_VRING_ENABLE",
            GET_CONFIG => "GET_CONFIG",
            _ => "unknown request",
        }
    }
}

/// vhost-user protocol feature bits the guest cares about.
pub mod proto {
    /// VHOST_USER_PROTOCOL_F_MQ.
    pub const MQ: u64 = 1 << 0;
    /// VHOST_USER_PROTOCOL_F_LOG_SHMFD: the migration dirty log in a shared memfd.
    pub const LOG_SHMFD: u64 = 1 << 1;
    /// VHOST_USER_PROTOCOL_F_RARP: SEND_RARP after a migration.
    pub const RARP: u64 = 1 << 2;
    /// VHOST_USER_PROTOCOL_F_REPLY_ACK.
    pub const REPLY_ACK: u64 = 1 << 3;
    /// VHOST_USER_PROTOCOL_F_CONFIG.
    pub const CONFIG: u64 = 1 << 9;
}

// The frontend's own encoding of the vhost-user header, deliberately independent of the
// daemon's parser (protocol.rs) so each checks the other.
const HDR_LEN: usize = 12;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const MAX_MSG: usize = 4096;
/// Bit 8 of a vring fd message: no fd attached.
pub const VRING_NOFD: u64 = 0x100;

/// Errors on the vhost-user socket.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// sendmsg failed.
    #[error("sending {req} failed: {source}")]
    Send {
        /// Request name.
        req: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// sendmsg wrote only part of the message.
    #[error("sending {req}: only {sent} of {len} bytes were written")]
    ShortSend {
        /// Request name.
        req: &'static str,
        /// Bytes written.
        sent: usize,
        /// Message length.
        len: usize,
    },
    /// No reply within the timeout.
    #[error("no reply to {req} within {timeout:?}")]
    Timeout {
        /// Request name.
        req: &'static str,
        /// The timeout.
        timeout: Duration,
    },
    /// The backend closed the socket.
    #[error("the backend closed the connection while we waited for the reply to {req}")]
    Closed {
        /// Request name.
        req: &'static str,
    },
    /// Reading the reply failed.
    #[error("reading the reply to {req} failed: {source}")]
    Recv {
        /// Request name.
        req: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The reply is malformed.
    #[error("bad reply to {req}: {detail}")]
    BadReply {
        /// Request name.
        req: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// REPLY_ACK returned a non-zero status.
    #[error("the backend rejected {req} (REPLY_ACK status {status:#x})")]
    Nack {
        /// Request name.
        req: &'static str,
        /// Status.
        status: u64,
    },
}

type Result<T> = std::result::Result<T, ProtoError>;

/// A connected vhost-user frontend socket.
#[derive(Debug)]
pub struct Connection {
    sock: UnixStream,
    reply_ack: bool,
    timeout: Duration,
    sent: Vec<u32>,
}

/// Result of [`Connection::connect`] failing.
#[derive(Debug)]
pub enum ConnectError {
    /// A non-retryable error.
    Failed(io::Error),
    /// Retryable errors until the deadline passed; the last one.
    TimedOut(io::Error),
}

impl Connection {
    /// Connect to `path`, retrying while the socket does not exist or refuses connections
    /// (the daemon is still starting) until `wait` has passed.
    pub fn connect(
        path: &Path,
        wait: Duration,
        reply_timeout: Duration,
    ) -> std::result::Result<Self, ConnectError> {
        let deadline = Instant::now() + wait;
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(ConnectError::TimedOut(e));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(ConnectError::Failed(e)),
            }
        };
        Self::from_stream(sock, reply_timeout).map_err(ConnectError::Failed)
    }

    /// Use an already connected stream.
    pub fn from_stream(sock: UnixStream, reply_timeout: Duration) -> io::Result<Self> {
        sock.set_read_timeout(Some(reply_timeout))?;
        sock.set_write_timeout(Some(reply_timeout))?;
        Ok(Connection {
            sock,
            reply_ack: false,
            timeout: reply_timeout,
            sent: Vec::new(),
        })
    }

    /// Ask for (and wait for) a REPLY_ACK status on every request that has no reply of its
    /// own. Only valid once REPLY_ACK was negotiated.
    pub fn set_reply_ack(&mut self, on: bool) {
        self.reply_ack = on;
    }

    /// Request codes sent so far, in order.
    pub fn sent(&self) -> &[u32] {
        &self.sent
    }

    fn send(&mut self, code: u32, flags: u32, body: &[u8], fds: &[RawFd]) -> Result<()> {
        let name = req::name(code);
        let mut msg = Vec::with_capacity(HDR_LEN + body.len());
        msg.extend_from_slice(&code.to_ne_bytes());
        msg.extend_from_slice(&(FLAG_VERSION | flags).to_ne_bytes());
        msg.extend_from_slice(&(body.len() as u32).to_ne_bytes());
        msg.extend_from_slice(body);
        let n = if fds.is_empty() {
            self.sock.write(&msg)
        } else {
            self.sock
                .send_with_fds(&[&msg[..]], fds)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))
        }
        .map_err(|source| ProtoError::Send { req: name, source })?;
        if n != msg.len() {
            // Finish a partial write of the bytes (fds went with the first chunk).
            self.sock
                .write_all(&msg[n..])
                .map_err(|_| ProtoError::ShortSend {
                    req: name,
                    sent: n,
                    len: msg.len(),
                })?;
        }
        self.sent.push(code);
        Ok(())
    }

    fn read_exact(&mut self, buf: &mut [u8], code: u32) -> Result<()> {
        let name = req::name(code);
        self.sock.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ProtoError::Timeout {
                req: name,
                timeout: self.timeout,
            },
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                ProtoError::Closed { req: name }
            }
            _ => ProtoError::Recv {
                req: name,
                source: e,
            },
        })
    }

    fn recv_reply(&mut self, code: u32) -> Result<Vec<u8>> {
        let name = req::name(code);
        let mut hdr = [0u8; HDR_LEN];
        self.read_exact(&mut hdr, code)?;
        let word = |i: usize| u32::from_ne_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let (rcode, flags, size) = (word(0), word(4), word(8) as usize);
        let bad = |detail: String| ProtoError::BadReply { req: name, detail };
        if size > MAX_MSG {
            return Err(bad(format!("payload size {size} exceeds {MAX_MSG}")));
        }
        let mut body = vec![0u8; size];
        self.read_exact(&mut body, code)?;
        if rcode != code {
            return Err(bad(format!(
                "reply is for request {rcode} ({})",
                req::name(rcode)
            )));
        }
        if flags & FLAG_REPLY == 0 || flags & 0x3 != FLAG_VERSION {
            return Err(bad(format!(
                "reply flags {flags:#x} lack REPLY or version 1"
            )));
        }
        Ok(body)
    }

    fn get_u64(&mut self, code: u32) -> Result<u64> {
        self.send(code, 0, &[], &[])?;
        let body = self.recv_reply(code)?;
        let arr: [u8; 8] = body
            .as_slice()
            .try_into()
            .map_err(|_| ProtoError::BadReply {
                req: req::name(code),
                detail: format!("payload of {} bytes, expected 8", body.len()),
            })?;
        Ok(u64::from_ne_bytes(arr))
    }

    /// Send a request that has no reply of its own; with REPLY_ACK wait for the status.
    fn set(&mut self, code: u32, body: &[u8], fds: &[RawFd]) -> Result<()> {
        let flags = if self.reply_ack { FLAG_NEED_REPLY } else { 0 };
        self.send(code, flags, body, fds)?;
        if self.reply_ack {
            let reply = self.recv_reply(code)?;
            let arr: [u8; 8] = reply
                .as_slice()
                .try_into()
                .map_err(|_| ProtoError::BadReply {
                    req: req::name(code),
                    detail: format!("REPLY_ACK payload of {} bytes, expected 8", reply.len()),
                })?;
            let status = u64::from_ne_bytes(arr);
            if status != 0 {
                return Err(ProtoError::Nack {
                    req: req::name(code),
                    status,
                });
            }
        }
        Ok(())
    }

    /// GET_FEATURES.
    pub fn get_features(&mut self) -> Result<u64> {
        self.get_u64(req::GET_FEATURES)
    }

    /// GET_PROTOCOL_FEATURES.
    pub fn get_protocol_features(&mut self) -> Result<u64> {
        self.get_u64(req::GET_PROTOCOL_FEATURES)
    }

    /// GET_QUEUE_NUM.
    pub fn get_queue_num(&mut self) -> Result<u64> {
        self.get_u64(req::GET_QUEUE_NUM)
    }

    /// SET_FEATURES.
    pub fn set_features(&mut self, features: u64) -> Result<()> {
        self.set(req::SET_FEATURES, &features.to_ne_bytes(), &[])
    }

    /// SET_PROTOCOL_FEATURES (never with NEED_REPLY: REPLY_ACK is not in force yet).
    pub fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.send(req::SET_PROTOCOL_FEATURES, 0, &features.to_ne_bytes(), &[])
    }

    /// SET_OWNER.
    pub fn set_owner(&mut self) -> Result<()> {
        self.set(req::SET_OWNER, &[], &[])
    }

    /// SET_MEM_TABLE with regions (gpa, size, userspace address, mmap offset) and their fds.
    pub fn set_mem_table(&mut self, regions: &[(u64, u64, u64, u64)], fds: &[RawFd]) -> Result<()> {
        let mut body = Vec::with_capacity(8 + 32 * regions.len());
        body.extend_from_slice(&(regions.len() as u32).to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        for &(gpa, size, uva, off) in regions {
            for v in [gpa, size, uva, off] {
                body.extend_from_slice(&v.to_ne_bytes());
            }
        }
        self.set(req::SET_MEM_TABLE, &body, fds)
    }

    fn vring_state(index: u32, num: u32) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..4].copy_from_slice(&index.to_ne_bytes());
        b[4..8].copy_from_slice(&num.to_ne_bytes());
        b
    }

    /// SET_VRING_NUM.
    pub fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        self.set(req::SET_VRING_NUM, &Self::vring_state(index, num), &[])
    }

    /// SET_VRING_BASE.
    pub fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.set(req::SET_VRING_BASE, &Self::vring_state(index, base), &[])
    }

    /// SET_VRING_ENABLE.
    pub fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.set(
            req::SET_VRING_ENABLE,
            &Self::vring_state(index, u32::from(enable)),
            &[],
        )
    }

    /// SET_VRING_ADDR with frontend userspace addresses (flags 0, no log).
    pub fn set_vring_addr(&mut self, index: u32, desc: u64, used: u64, avail: u64) -> Result<()> {
        self.set_vring_addr_logged(index, desc, used, avail, None)
    }

    /// SET_VRING_ADDR; with `log` set, VHOST_VRING_F_LOG and the used ring's `log_guest_addr`.
    pub fn set_vring_addr_logged(
        &mut self,
        index: u32,
        desc: u64,
        used: u64,
        avail: u64,
        log: Option<u64>,
    ) -> Result<()> {
        let mut b = Vec::with_capacity(40);
        b.extend_from_slice(&index.to_ne_bytes());
        b.extend_from_slice(&u32::from(log.is_some()).to_ne_bytes());
        for v in [desc, used, avail, log.unwrap_or(0)] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        self.set(req::SET_VRING_ADDR, &b, &[])
    }

    /// SET_LOG_BASE as QEMU sends it: no NEED_REPLY, yet the backend replies. Returns the
    /// reply's u64 (0 from this daemon on success; QEMU does not look at it).
    pub fn set_log_base(&mut self, size: u64, offset: u64, fd: RawFd) -> Result<u64> {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&size.to_ne_bytes());
        b[8..].copy_from_slice(&offset.to_ne_bytes());
        self.send(req::SET_LOG_BASE, 0, &b, &[fd])?;
        let body = self.recv_reply(req::SET_LOG_BASE)?;
        Ok(match body.len() {
            0 => 0,
            8 => u64::from_ne_bytes(body[..8].try_into().expect("8 bytes")),
            n => {
                return Err(ProtoError::BadReply {
                    req: "SET_LOG_BASE",
                    detail: format!("payload of {n} bytes"),
                })
            }
        })
    }

    /// SET_LOG_FD with an eventfd the backend signals after writing the log.
    pub fn set_log_fd(&mut self, fd: RawFd) -> Result<()> {
        self.set(req::SET_LOG_FD, &[], &[fd])
    }

    /// SEND_RARP for `mac` (the MAC in the first 6 bytes of a u64, as QEMU sends it).
    pub fn send_rarp(&mut self, mac: [u8; 6]) -> Result<()> {
        let mut b = [0u8; 8];
        b[..6].copy_from_slice(&mac);
        self.set(req::SEND_RARP, &b, &[])
    }

    /// SET_VRING_KICK / SET_VRING_CALL / SET_VRING_ERR with an fd (or the NOFD flag).
    pub fn set_vring_fd(&mut self, code: u32, index: u32, fd: Option<RawFd>) -> Result<()> {
        let mut v = u64::from(index & 0xff);
        if fd.is_none() {
            v |= VRING_NOFD;
        }
        match fd {
            Some(fd) => self.set(code, &v.to_ne_bytes(), &[fd]),
            None => self.set(code, &v.to_ne_bytes(), &[]),
        }
    }

    /// GET_VRING_BASE: stops the ring and returns the backend's next avail index.
    pub fn get_vring_base(&mut self, index: u32) -> Result<u32> {
        self.send(req::GET_VRING_BASE, 0, &Self::vring_state(index, 0), &[])?;
        let body = self.recv_reply(req::GET_VRING_BASE)?;
        if body.len() != 8 {
            return Err(ProtoError::BadReply {
                req: "GET_VRING_BASE",
                detail: format!("payload of {} bytes, expected 8", body.len()),
            });
        }
        let ri = u32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
        if ri != index {
            return Err(ProtoError::BadReply {
                req: "GET_VRING_BASE",
                detail: format!("reply for vring {ri}, asked for {index}"),
            });
        }
        Ok(u32::from_ne_bytes([body[4], body[5], body[6], body[7]]))
    }

    /// GET_CONFIG of `size` bytes at `offset`. Returns None if the backend signalled failure
    /// (a reply with size 0).
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Option<Vec<u8>>> {
        let mut b = Vec::with_capacity(12 + size as usize);
        b.extend_from_slice(&offset.to_ne_bytes());
        b.extend_from_slice(&size.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.resize(12 + size as usize, 0);
        self.send(req::GET_CONFIG, 0, &b, &[])?;
        let body = self.recv_reply(req::GET_CONFIG)?;
        let bad = |detail: String| ProtoError::BadReply {
            req: "GET_CONFIG",
            detail,
        };
        if body.len() < 12 {
            return Err(bad(format!("payload of {} bytes", body.len())));
        }
        let roff = u32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
        let rsize = u32::from_ne_bytes([body[4], body[5], body[6], body[7]]);
        if rsize == 0 {
            return Ok(None);
        }
        if roff != offset || rsize != size || body.len() != 12 + size as usize {
            return Err(bad(format!(
                "offset {roff} size {rsize} payload {} (asked offset {offset} size {size})",
                body.len() - 12
            )));
        }
        Ok(Some(body[12..].to_vec()))
    }

    /// Close the connection.
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}
