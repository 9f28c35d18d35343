//! Target (c): vhost-user message sequences over a socketpair into a real `Session` and
//! `Connection`, driven as the daemon's loop drives them (flush; read and dispatch requests
//! while no reply waits; a protocol error, EOF or a passed deadline ends the connection and the
//! next one gets a fresh session on the same device). The device's tap is a SOCK_SEQPACKET
//! socketpair (so SET_FEATURES is always refused: the tap ioctls fail on a socket).
//!
//! The input is a frontend: requests known and unknown, typed bodies (features, vring state,
//! vring addresses in or out of the memory it shared, memory tables honest or lying) and raw
//! ones, REPLY_ACK asked or not, messages sent whole or in pieces or left half-sent, fds passed
//! with SCM_RIGHTS of every kind (memfds of the right size, short ones and unsealed ones,
//! eventfds blocking and not, one at its counter's limit, pipes, sockets, files, an epoll fd, a
//! directory), replies read or left unread, the guest writing its rings (in the memfd it
//! shared) and kicking them while the workers run, frames arriving on the tap; a migration's
//! messages (dirty logs honest, short, unsealable or of any fd, at any size and offset; the
//! log's eventfd; rings with log addresses; announces in bursts).
//!
//! Checked: every call into the connection and the session (`recv`, `dispatch`, `flush`,
//! `deadline`, the session's drop) returns within `CALL_DEADLINE`; a watchdog thread aborts the
//! process if one has not returned after `WATCHDOG` (a hang); no worker is stuck and the tap is
//! never taken for failed (`Device::fatal` stays unwritten); no descriptor is left open once
//! the device is dropped.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::Parser;
use vhost_user_tap::config::{Args, Config};
use vhost_user_tap::device::{Device, PairSlot};
use vhost_user_tap::pair::PairRest;
use vhost_user_tap::protocol::{Connection, Recv};
use vhost_user_tap::session::Session;
use vhost_user_tap::stats::PairStats;
use vhost_user_tap::tap::Tap;
use vhost_user_tap::virtio_net;
use vhost_user_tap_guest::mem::GuestRam;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::Input;

/// What one call may take: a worker stops within `worker::STOP_DEADLINE` (1 s) or the daemon
/// ends, and nothing else in a call may wait at all.
pub const CALL_DEADLINE: Duration = Duration::from_secs(1);
/// A call still running this long is a hang: the watchdog aborts the process.
pub const WATCHDOG: Duration = Duration::from_secs(5);

const MAX_OPS: usize = 96;
/// The frontend's guest memory: one memfd, rings in its first half, buffers in the second.
const RAM: u64 = 1 << 20;
/// Each vring's canonical place in the shared memory (descriptors, avail at +16 KiB, used at
/// +24 KiB; sizes up to 1024 fit).
const VRING_SPAN: u64 = 0x8000;
const BUFS: u64 = RAM / 2;

pub fn session(data: &[u8]) {
    crate::exclusive(|| {
        let fds = crate::open_fds();
        run(data);
        assert_eq!(crate::open_fds(), fds, "descriptors leaked");
    })
}

// ------------------------------------------------------------------------------- the watchdog

static ARMED: Mutex<Option<(Instant, &'static str)>> = Mutex::new(None);

fn watchdog() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        std::thread::Builder::new()
            .name("fuzz-watchdog".into())
            .spawn(|| loop {
                std::thread::sleep(Duration::from_millis(100));
                let armed = *ARMED.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((since, what)) = armed {
                    if since.elapsed() > WATCHDOG {
                        eprintln!("session target: {what} has not returned after {WATCHDOG:?}");
                        std::process::abort();
                    }
                }
            })
            .expect("the watchdog thread");
    });
}

/// Run one call under the watchdog and check it returned within `CALL_DEADLINE`.
fn timed<R>(what: &'static str, f: impl FnOnce() -> R) -> R {
    *ARMED.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), what));
    let t = Instant::now();
    let r = f();
    let took = t.elapsed();
    *ARMED.lock().unwrap_or_else(|e| e.into_inner()) = None;
    assert!(took < CALL_DEADLINE, "{what} took {took:?}");
    r
}

// ------------------------------------------------------------------------------- the device

fn device(r: &mut Input) -> (Device, Vec<OwnedFd>) {
    let pairs = 1 + usize::from(r.u8() % 2);
    let queue_size = [256u16, 1024, 32768][usize::from(r.u8() % 3)];
    let mut args = vec![
        "vhost-user-tap".to_string(),
        "--socket-path=/nonexistent/fuzz.sock".into(),
        "--tap=fuzz0".into(),
        format!("--queues={pairs}"),
        format!("--queue-size={queue_size}"),
        "--no-io-uring".into(),
    ];
    if r.bool() {
        args.push("--mac=52:54:00:12:34:56".into());
    }
    let config = Config::try_from(Args::try_parse_from(args).expect("arguments")).expect("config");
    let mut wires = Vec::new();
    let slots = (0..pairs)
        .map(|_| {
            let (dev, wire) = seqpacket();
            wires.push(wire);
            PairSlot {
                tap: Arc::new(Tap::from_file(File::from(dev), "fuzz0")),
                stats: Arc::new(PairStats::default()),
                rest: Some(PairRest::default()),
                attached: true,
            }
        })
        .collect();
    let dev = Device {
        config,
        pairs: slots,
        offered: virtio_net::offered_features(0, pairs),
        fatal: Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")),
        frontend: Arc::default(),
    };
    (dev, wires)
}

fn socketpair(kind: i32) -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`, which has room for them.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn seqpacket() -> (OwnedFd, OwnedFd) {
    socketpair(libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK)
}

// ------------------------------------------------------------------------------- the frontend

/// The frontend's state: its socket end, what it shared, the fds it kept.
struct Frontend {
    sock: Option<UnixStream>,
    ram: Option<GuestRam>,
    /// Our ends of eventfds we passed (kicks and calls), to kick with.
    kicks: Vec<File>,
    /// Vring sizes last sent, per index (for the canonical ring layout).
    sizes: [u16; 4],
}

fn run(data: &[u8]) {
    watchdog();
    let mut r = Input::new(data);
    let (mut dev, wires) = device(&mut r);
    let mut fe = Frontend {
        sock: None,
        ram: None,
        kicks: Vec::new(),
        sizes: [256; 4],
    };
    let mut ops = 0;
    // One connection after another on the same device, as the daemon's accept loop serves them.
    while ops < MAX_OPS && !r.is_empty() {
        let (ours, theirs) = socketpair(libc::SOCK_STREAM | libc::SOCK_NONBLOCK);
        let mut conn = Connection::new(UnixStream::from(theirs)).expect("a connection");
        fe.sock = Some(UnixStream::from(ours));
        let mut s = Session::new(&mut dev);
        while ops < MAX_OPS && !r.is_empty() {
            ops += 1;
            if !frontend_op(&mut r, &mut fe, &wires, s.device().pairs.len()) {
                break;
            }
            if !pump(&mut conn, &mut s) {
                break;
            }
            check_fatal(s.device());
        }
        fe.sock = None;
        timed("dropping the session", || drop(s));
        drop(conn);
        check_fatal(&dev);
    }
    drop(fe);
    drop(wires);
}

fn check_fatal(dev: &Device) {
    let mut v = [0u8; 8];
    let n = (&*dev.fatal.as_raw_fd_file()).read(&mut v);
    assert!(
        n.is_err(),
        "a worker got stuck or the tap was taken for gone (fatal written)"
    );
}

trait AsFile {
    fn as_raw_fd_file(&self) -> std::mem::ManuallyDrop<File>;
}

impl AsFile for EventFd {
    fn as_raw_fd_file(&self) -> std::mem::ManuallyDrop<File> {
        // SAFETY: a borrowed view of the eventfd's descriptor, never closed (ManuallyDrop).
        std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(self.as_raw_fd()) })
    }
}

/// The daemon's loop, once: flush replies, then read and dispatch requests while none waits.
/// False when the connection ended.
fn pump(conn: &mut Connection, s: &mut Session) -> bool {
    if timed("flush", || conn.flush()).is_err() {
        return false;
    }
    let mut n = 0;
    while !conn.wants_write() {
        n += 1;
        assert!(n < 10_000, "recv never ran dry");
        match timed("recv", || conn.recv()) {
            Ok(Recv::Request(req)) => {
                let code = req.raw();
                if timed("dispatch", || conn.dispatch(s, req)).is_err() {
                    s.rejected(code);
                    return false;
                }
            }
            Ok(Recv::Pending) => break,
            Ok(Recv::Closed) | Err(_) => return false,
        }
    }
    let _ = timed("deadline", || conn.deadline());
    true
}

// Request codes (vhost-user).
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const RESET_OWNER: u32 = 4;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const SET_LOG_FD: u32 = 7;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const SEND_RARP: u32 = 19;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
const RESET_DEVICE: u32 = 34;

/// One thing the frontend does. False when it hangs up.
fn frontend_op(r: &mut Input, fe: &mut Frontend, wires: &[OwnedFd], pairs: usize) -> bool {
    let nq = 2 * pairs as u32;
    let vring = |r: &mut Input| {
        let v = r.u8();
        if v >= 250 {
            u32::from(v)
        } else {
            u32::from(v) % nq
        }
    };
    match r.u8() % 27 {
        // A whole setup of one vring the honest way: memory, size, addresses, base, fds, enable.
        0 | 1 => {
            let i = vring(r);
            send_mem_table(r, fe, true);
            let size = 1u16 << (r.u8() % 11);
            send(r, fe, SET_VRING_NUM, &state(i, u32::from(size)), &[]);
            fe.sizes[i as usize % 4] = size;
            let body = vring_addr(fe, i, false, r);
            send(r, fe, SET_VRING_ADDR, &body, &[]);
            send(r, fe, SET_VRING_BASE, &state(i, 0), &[]);
            let call = eventfd(fe, true);
            send(
                r,
                fe,
                SET_VRING_CALL,
                &u64b(u64::from(i)),
                &[call.as_raw_fd()],
            );
            let kick = eventfd(fe, true);
            send(
                r,
                fe,
                SET_VRING_KICK,
                &u64b(u64::from(i)),
                &[kick.as_raw_fd()],
            );
            send(r, fe, SET_VRING_ENABLE, &state(i, 1), &[]);
        }
        2 => send_mem_table(r, fe, false),
        3 => {
            let i = vring(r);
            let num = match r.u8() % 4 {
                0 => r.u32(),
                _ => 1 << (r.u8() % 16),
            };
            fe.sizes[i as usize % 4] = u16::try_from(num).unwrap_or(0).max(1);
            send(r, fe, SET_VRING_NUM, &state(i, num), &[]);
        }
        4 => {
            let i = vring(r);
            let body = vring_addr(fe, i, r.u8() % 4 == 0, r);
            send(r, fe, SET_VRING_ADDR, &body, &[]);
        }
        5 => {
            let i = vring(r);
            let base = if r.bool() {
                u32::from(r.u16())
            } else {
                r.u32()
            };
            send(r, fe, SET_VRING_BASE, &state(i, base), &[]);
        }
        6 => {
            let i = vring(r);
            send(r, fe, GET_VRING_BASE, &state(i, 0), &[]);
        }
        7..=9 => {
            let code = [SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR][usize::from(r.u8() % 3)];
            let i = vring(r);
            let nofd = r.u8() % 8 == 0;
            let v = u64::from(i) | if nofd { 0x100 } else { 0 };
            let f = some_fd(r, fe);
            let fds: Vec<RawFd> = f.iter().map(|f| f.as_raw_fd()).collect();
            send(r, fe, code, &u64b(v), &fds);
        }
        10 => {
            let i = vring(r);
            let on = u32::from(r.u8() % 2);
            send(r, fe, SET_VRING_ENABLE, &state(i, on), &[]);
        }
        11 => {
            let v = match r.u8() % 4 {
                0 => r.u64(),
                1 => 0,
                _ => virtio_net::offered_features(0, pairs) & r.u64(),
            };
            send(r, fe, SET_FEATURES, &u64b(v), &[]);
        }
        12 => {
            let v = if r.bool() {
                r.u64()
            } else {
                0x1 | 0x2 | 0x8 | 0x200
            };
            send(r, fe, SET_PROTOCOL_FEATURES, &u64b(v), &[]);
        }
        13 => {
            let code = [
                GET_FEATURES,
                GET_PROTOCOL_FEATURES,
                GET_QUEUE_NUM,
                SET_OWNER,
            ][usize::from(r.u8() % 4)];
            send(r, fe, code, &[], &[]);
        }
        14 => {
            let code = [RESET_OWNER, RESET_DEVICE][usize::from(r.u8() % 2)];
            send(r, fe, code, &[], &[]);
        }
        15 => {
            let mut body = Vec::new();
            body.extend_from_slice(&u32::from(r.u8()).to_le_bytes());
            body.extend_from_slice(&u32::from(r.u16()).to_le_bytes());
            body.extend_from_slice(&r.u32().to_le_bytes());
            let extra = usize::from(r.u8() % 64);
            body.resize(body.len() + extra, 0);
            let code = if r.u8() % 4 == 0 {
                SET_CONFIG
            } else {
                GET_CONFIG
            };
            send(r, fe, code, &body, &[]);
        }
        // Anything: any code, flags, body; the header may lie about the size.
        16 => {
            let code = if r.bool() { u32::from(r.u8()) } else { r.u32() };
            let flags = if r.bool() { 1 | 8 } else { r.u32() };
            let n = usize::from(r.u8());
            let body = r.bytes(n).to_vec();
            let size = if r.u8() % 8 == 0 {
                r.u32()
            } else {
                body.len() as u32
            };
            let mut msg = header(code, flags, size);
            msg.extend_from_slice(&body);
            let f = some_fd(r, fe);
            let fds: Vec<RawFd> = f.iter().map(|f| f.as_raw_fd()).collect();
            send_raw(fe, &msg, &fds);
        }
        17 => read_replies(fe),
        // The guest writes its rings and kicks.
        18 | 19 => guest_write(r, fe),
        20 => {
            if !fe.kicks.is_empty() {
                let k = usize::from(r.u8()) % fe.kicks.len();
                let _ = (&fe.kicks[k]).write(&1u64.to_ne_bytes());
            }
        }
        // Frames from the host.
        21 => {
            let w = &wires[usize::from(r.u8()) % wires.len()];
            let len = 10 + usize::from(r.u16()) % 2048;
            let f = vec![0x5au8; len];
            // SAFETY: sends `len` bytes from a live buffer.
            unsafe {
                libc::send(w.as_raw_fd(), f.as_ptr().cast(), len, libc::MSG_DONTWAIT);
            }
        }
        // Migration: a dirty log (honest, short, unsealable, or any fd) at any size and offset,
        // its eventfd, or an announce.
        24 => {
            let size = match r.u8() % 4 {
                0 => r.u64(),
                _ => (RAM / 4096 / 8).max(8) << (r.u8() % 3),
            };
            let offset = if r.u8() % 4 == 0 { r.u64() } else { 0 };
            let f = if r.bool() {
                Some(log_memfd(r, size))
            } else {
                some_fd(r, fe)
            };
            let fds: Vec<RawFd> = f.iter().map(|f| f.as_raw_fd()).collect();
            let mut body = u64b(size);
            body.extend_from_slice(&offset.to_le_bytes());
            send(r, fe, SET_LOG_BASE, &body, &fds);
        }
        25 => {
            let f = some_fd(r, fe);
            let fds: Vec<RawFd> = f.iter().map(|f| f.as_raw_fd()).collect();
            send(r, fe, SET_LOG_FD, &[], &fds);
        }
        26 => {
            let n = usize::from(r.u8() % 4);
            for _ in 0..=n {
                let mac = u64b(r.u64());
                send(r, fe, SEND_RARP, &mac, &[]);
            }
        }
        // Time passes: a connection with a deadline is closed, as the daemon does.
        22 => return false,
        // The frontend hangs up.
        _ => {
            if r.bool() {
                return false;
            }
            fe.sock = None;
        }
    }
    fe.sock.is_some()
}

fn header(code: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(12);
    h.extend_from_slice(&code.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h
}

fn u64b(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn state(index: u32, num: u32) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&num.to_le_bytes());
    b
}

/// A request: version 1, REPLY_ACK asked or not, sent whole or in two pieces.
fn send(r: &mut Input, fe: &mut Frontend, code: u32, body: &[u8], fds: &[RawFd]) {
    let flags = 1 | if r.u8() % 4 != 0 { 0x8 } else { 0 };
    let mut msg = header(code, flags, body.len() as u32);
    msg.extend_from_slice(body);
    send_raw(fe, &msg, fds);
}

/// sendmsg with the fds as SCM_RIGHTS; a socket that takes less keeps a message half-sent.
fn send_raw(fe: &mut Frontend, msg: &[u8], fds: &[RawFd]) {
    let Some(sock) = &fe.sock else {
        return;
    };
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut _,
        iov_len: msg.len(),
    };
    let space = 64 * std::mem::size_of::<RawFd>();
    let mut cbuf = vec![0u64; space / 8 + 4];
    // SAFETY: msghdr is plain old data; all-zero is valid and filled in below.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE only computes a size.
        mh.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as usize;
        mh.msg_control = cbuf.as_mut_ptr().cast();
        // SAFETY: the control buffer is large enough for one header and `fds` (checked by the
        // size computed above, at most 64 fds), and aligned for cmsghdr (u64 storage).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
    }
    // SAFETY: `mh` points at live buffers built above.
    unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &mh,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

fn read_replies(fe: &mut Frontend) {
    if let Some(sock) = &fe.sock {
        let mut buf = [0u8; 4096];
        while matches!((&*sock).read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// An eventfd whose other end the frontend keeps (for kicks and to read interrupts).
fn eventfd(fe: &mut Frontend, nonblocking: bool) -> File {
    let flags = libc::EFD_CLOEXEC | if nonblocking { libc::EFD_NONBLOCK } else { 0 };
    // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
    let fd = unsafe { libc::eventfd(0, flags) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor owned by nothing else.
    let f = unsafe { File::from_raw_fd(fd) };
    fe.kicks.push(f.try_clone().expect("dup"));
    if fe.kicks.len() > 16 {
        fe.kicks.remove(0);
    }
    f
}

/// An fd of some kind (or none): what a frontend may pass where an eventfd belongs.
fn some_fd(r: &mut Input, fe: &mut Frontend) -> Option<File> {
    Some(match r.u8() % 12 {
        0..=3 => eventfd(fe, true),
        4 => eventfd(fe, false),
        5 => {
            // At its counter's limit: a write would block (or fail, non-blocking).
            let f = eventfd(fe, r.bool());
            let _ = (&f).write(&(u64::MAX - 1).to_ne_bytes());
            // Not ours to kick with: our own write would block.
            fe.kicks.pop();
            f
        }
        6 => {
            let mut p = [0; 2];
            // SAFETY: pipe2 writes two descriptors into `p`.
            assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: both are fresh; one is returned, the other closed.
            unsafe {
                let keep = if r.bool() { 0 } else { 1 };
                drop(File::from_raw_fd(p[1 - keep]));
                File::from_raw_fd(p[keep])
            }
        }
        7 => File::from(socketpair(libc::SOCK_STREAM).0),
        8 => File::open("/dev/null").expect("/dev/null"),
        9 => {
            // SAFETY: epoll_create1 has no preconditions; checked.
            let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: fresh descriptor.
            unsafe { File::from_raw_fd(fd) }
        }
        10 => File::open("/").expect("a directory"),
        _ => return memfd(fe, r, true),
    })
}

/// A log memfd of about `size` bytes (capped): sealable or not, maybe shorter than claimed.
fn log_memfd(r: &mut Input, size: u64) -> File {
    let flags = if r.u8() % 4 == 0 {
        libc::MFD_CLOEXEC
    } else {
        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING
    };
    // SAFETY: a valid NUL-terminated name; checked.
    let fd = unsafe { libc::memfd_create(c"fuzz-log".as_ptr(), flags) };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor.
    let f = unsafe { File::from_raw_fd(fd) };
    let len = if r.u8() % 4 == 0 { size / 2 } else { size };
    let _ = f.set_len(len.min(1 << 20));
    f
}

/// A memfd: the shared guest memory, or one shorter than the region will claim.
fn memfd(fe: &mut Frontend, r: &mut Input, honest: bool) -> Option<File> {
    if honest && r.u8() % 4 != 0 {
        let ram = fe
            .ram
            .get_or_insert_with(|| GuestRam::new(RAM, 0).expect("guest memory"));
        // SAFETY: dup of the memfd the GuestRam owns; the copy is ours.
        let fd = unsafe { libc::dup(ram.memfd()) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor.
        return Some(unsafe { File::from_raw_fd(fd) });
    }
    // SAFETY: a valid NUL-terminated name; checked.
    let fd = unsafe { libc::memfd_create(c"fuzz-short".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(u64::from(r.u16()) * 16).expect("ftruncate");
    Some(f)
}

/// SET_MEM_TABLE: the shared memory as it is (`honest`), or with regions that lie (sizes past
/// the file, offsets, overlapping or overflowing addresses, fds that are not memfds, counts
/// that do not match).
fn send_mem_table(r: &mut Input, fe: &mut Frontend, honest: bool) {
    let ram = fe
        .ram
        .get_or_insert_with(|| GuestRam::new(RAM, 0).expect("guest memory"));
    let uva = ram.host_addr();
    let n = if honest { 1 } else { usize::from(r.u8() % 4) };
    let mut body = Vec::new();
    let claimed = if !honest && r.u8() % 8 == 0 {
        u32::from(r.u8())
    } else {
        n as u32
    };
    body.extend_from_slice(&claimed.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    let mut files = Vec::new();
    for k in 0..n {
        let (gpa, size, uv, off) = if honest || r.u8() % 4 == 0 {
            (0, RAM, uva, 0)
        } else {
            let gpa = match r.u8() % 4 {
                0 => r.u64(),
                _ => (k as u64) * RAM,
            };
            let size = match r.u8() % 4 {
                0 => r.u64(),
                1 => RAM + 4096,
                _ => 4096 * (1 + u64::from(r.u8())),
            };
            let off = if r.u8() % 4 == 0 {
                4096 * u64::from(r.u8())
            } else {
                0
            };
            (gpa, size, uva.wrapping_add(gpa), off)
        };
        for v in [gpa, size, uv, off] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let f = if honest || r.u8() % 4 != 0 {
            memfd(fe, r, true)
        } else if r.bool() {
            memfd(fe, r, false)
        } else {
            some_fd(r, fe)
        };
        files.extend(f);
    }
    if !honest && r.u8() % 8 == 0 {
        files.extend(some_fd(r, fe));
    }
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    send(r, fe, SET_MEM_TABLE, &body, &fds);
}

/// SET_VRING_ADDR: the canonical place of vring `i` in the shared memory (as frontend virtual
/// addresses), or anywhere (`wild`).
fn vring_addr(fe: &Frontend, i: u32, wild: bool, r: &mut Input) -> Vec<u8> {
    let uva = fe.ram.as_ref().map_or(0x7f00_0000_0000, |m| m.host_addr());
    let base = uva + VRING_SPAN * u64::from(i % 4);
    let (flags, desc, used, avail) = if wild {
        let mut a = || match r.u8() % 4 {
            0 => r.u64(),
            _ => uva + u64::from(r.u32()) % (RAM + 4096),
        };
        let (d, u, av) = (a(), a(), a());
        (if r.u8() % 8 == 0 { 1u32 } else { 0 }, d, u, av)
    } else {
        (0u32, base, base + 0x6000, base + 0x4000)
    };
    // VHOST_VRING_F_LOG with the used ring's guest address, honest or wild.
    let log = if flags & 1 != 0 || r.u8() % 4 == 0 {
        if r.bool() {
            used.wrapping_sub(uva)
        } else {
            r.u64()
        }
    } else {
        0
    };
    let flags = flags | u32::from(log != 0);
    let mut b = i.to_le_bytes().to_vec();
    b.extend_from_slice(&flags.to_le_bytes());
    for v in [desc, used, avail, log] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// The guest, in the memory it shared: descriptors and avail entries of a vring at its
/// canonical place (honest buffers or not), then maybe a kick.
fn guest_write(r: &mut Input, fe: &mut Frontend) {
    let Some(ram) = &fe.ram else {
        return;
    };
    let mem = ram.memory();
    let v = u64::from(r.u8() % 4);
    let size = fe.sizes[v as usize].clamp(1, 1024);
    let base = VRING_SPAN * v;
    let (desc, avail) = (base, base + 0x4000);
    let n = 1 + u16::from(r.u8() % 8);
    let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
    for k in 0..n {
        let d = r.index(size);
        let addr = if r.u8() % 8 == 0 {
            r.addr(RAM)
        } else {
            BUFS + 2048 * u64::from(d % 256)
        };
        let len = if r.u8() % 8 == 0 { r.u32() } else { 2048 };
        let flags = u16::from(r.u8() % 8);
        let next = r.index(size);
        let e = vhost_user_tap_guest::ring::encode_desc(addr, len, flags, next);
        let _ = mem.write_slice(&e, GuestAddress(desc + 16 * u64::from(d)));
        let slot = idx.wrapping_add(k) % size;
        let _ = mem.write_obj(d, GuestAddress(avail + 4 + 2 * u64::from(slot)));
    }
    let new = if r.u8() % 16 == 0 {
        r.u16()
    } else {
        idx.wrapping_add(n)
    };
    let _ = mem.write_obj(new, GuestAddress(avail + 2));
    if r.bool() && !fe.kicks.is_empty() {
        let k = usize::from(r.u8()) % fe.kicks.len();
        let _ = (&fe.kicks[k]).write(&1u64.to_ne_bytes());
    }
}
