//! The metrics endpoint's HTTP server: one resource (`GET /metrics`) served from one thread with
//! bounded resources, whatever clients send or hold open.
//!
//! # Design
//! - **One thread, one epoll set**: the listener, a stop eventfd and every connection are
//!   non-blocking and registered (level-triggered) in one `vmm-sys-util` epoll set. No thread
//!   per connection: the thread count does not move with clients.
//! - **At most [`Limits::max_connections`] connections at once.** A connection accepted beyond
//!   that is answered `503` with one non-blocking write and closed at once, so its descriptor is
//!   held for one step of the loop.
//! - **A deadline per connection** ([`Limits::deadline`], from accept): reading the request head,
//!   writing the reply and waiting for the client to close all fit in it; at the deadline the
//!   connection is closed whatever its state. A client that trickles bytes or never reads gains
//!   nothing.
//! - **A bounded request head** ([`Limits::max_head`] bytes, [`MAX_HEADERS`] header lines): the
//!   head is read into a buffer that never grows past the cap; a head that does not end within
//!   it is answered `431` and the connection closed. A header line without CRLF costs at most
//!   the cap.
//! - **One request per connection**, HTTP/1.0 or HTTP/1.1, always answered with
//!   `Connection: close` and a `Content-Length`. `GET` of the resource's path (a query string is
//!   ignored) is answered `200`; another path `404`; another method on the path `405` with
//!   `Allow: GET`; a malformed head `400`. Parsing is `httparse` (the parser under hyper), run
//!   only on the bounded buffer.
//! - **Closing**: after the reply the write side is shut down and what the client still sends is
//!   read and discarded (at most [`LINGER_BYTES`], within the deadline) until it closes, so a
//!   client that sent more than we read sees the reply, not a reset.
//! - **Accept errors never end the thread.** Running out of descriptors or memory (`EMFILE`,
//!   `ENFILE`, `ENOBUFS`, `ENOMEM`) or any unexpected error takes the listener out of the epoll
//!   set for a back-off (100 ms, doubling to 1 s, reset by the next successful accept): pending
//!   clients wait in the kernel's backlog instead of spinning the thread. Errors that concern one
//!   pending connection only (`ECONNABORTED` and the network errors accept(2) lists) are skipped.
//!   Log lines about clients and accept errors are rate-limited.
//!
//! # Limitations
//! - The reply is made on this thread (a scrape reads counters and asks the kernel over
//!   netlink): while it is made, other connections wait. It takes milliseconds.
//! - No keep-alive, pipelining, TLS, `HEAD` or request bodies (a body is read and discarded
//!   with the rest).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ratelog::{suppressed, RateLimited};

/// Connections served at once unless the open-files limit allows fewer (see `metrics.rs`).
pub const MAX_CONNECTIONS: usize = 8;
/// From accept to the end of the reply and the close.
pub const DEADLINE: Duration = Duration::from_secs(2);
/// The largest request head read (request line and header lines).
pub const MAX_HEAD: usize = 8 * 1024;
/// The most header lines a request head may have.
pub const MAX_HEADERS: usize = 32;
/// What a client may still send after its reply before it is cut off.
pub const LINGER_BYTES: usize = 64 * 1024;
/// Accepts per wake-up of the loop, so that a stream of connections cannot starve the others.
const ACCEPT_BATCH: usize = 16;
/// The first pause after an accept error; it doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_FIRST: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Descriptors the server holds beside its listener and its connections: the epoll set, the
/// stop eventfd, and for one step of the loop a connection accepted beyond the cap.
pub const OWN_FDS: usize = 3;

/// The stock 503 for a connection beyond the cap.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\
    Retry-After: 1\r\nConnection: close\r\n\r\n";

const STOP: u64 = 0;
const LISTENER: u64 = 1;
/// Connection `i` has token `FIRST_CONN + i`.
const FIRST_CONN: u64 = 2;

/// The server's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub deadline: Duration,
    pub max_head: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            deadline: DEADLINE,
            max_head: MAX_HEAD,
        }
    }
}

/// What the server serves: `GET path` answers `body()` as `content_type`.
pub struct Resource {
    pub path: &'static str,
    pub content_type: &'static str,
    /// The body, or why it could not be made (answered `500`).
    pub body: Box<dyn FnMut() -> Result<String, String> + Send>,
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Tcp(l) => Stream::Tcp(l.accept()?.0),
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
        })
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l) => l.set_nonblocking(true),
        }
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }
}

/// An accepted connection.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }

    /// O_NONBLOCK through fcntl: std's `set_nonblocking` uses ioctl(FIONBIO), which the seccomp
    /// filter does not allow.
    fn set_nonblocking(&self) -> io::Result<()> {
        fcntl(self.fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
            .map(drop)
            .map_err(io::Error::from)
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

/// The running server; stopped and joined on drop.
pub struct Server {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serve `resource` on `listener` from a new thread named `name`.
    pub fn spawn(
        name: &str,
        listener: Listener,
        limits: Limits,
        resource: Resource,
    ) -> io::Result<Server> {
        listener.set_nonblocking()?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            listener.raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        let lp = Loop {
            epoll,
            listener,
            stop: stop.clone(),
            limits,
            resource,
            conns: (0..limits.max_connections).map(|_| None).collect(),
            paused_until: None,
            backoff: Backoff::default(),
            accept_log: RateLimited::new(Duration::from_secs(1)),
            client_log: RateLimited::new(Duration::from_secs(10)),
        };
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || lp.run())?;
        Ok(Server {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The pause after accept errors in a row: 100 ms, doubling to 1 s.
#[derive(Debug)]
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(BACKOFF_FIRST)
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (d * 2).min(BACKOFF_MAX);
        d
    }

    fn reset(&mut self) {
        self.0 = BACKOFF_FIRST;
    }
}

/// What an accept error means for the loop.
#[derive(Debug, PartialEq, Eq)]
enum AcceptError {
    /// Nothing pending.
    Drained,
    /// One pending connection failed (accept(2): such errors are to be retried like EAGAIN).
    Skip,
    /// Out of descriptors or memory: stop accepting for a while.
    Exhausted,
    /// Not expected: stop accepting for a while too, so that it cannot spin the thread.
    Unexpected,
}

impl AcceptError {
    fn of(e: &io::Error) -> AcceptError {
        if e.kind() == io::ErrorKind::WouldBlock {
            return AcceptError::Drained;
        }
        match e.raw_os_error() {
            Some(
                libc::EINTR
                | libc::ECONNABORTED
                | libc::EPROTO
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH,
            ) => AcceptError::Skip,
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                AcceptError::Exhausted
            }
            _ => AcceptError::Unexpected,
        }
    }
}

/// Where a connection is.
enum State {
    /// Reading the request head (never more than `max_head` bytes).
    Head(Vec<u8>),
    /// Writing the reply.
    Reply { out: Vec<u8>, sent: usize },
    /// Reply written, write side shut down: discarding input until the client closes.
    Linger { drained: usize },
}

struct Conn {
    stream: Stream,
    deadline: Instant,
    state: State,
    /// What the connection is registered for.
    interest: EventSet,
}

/// What a connection waits for next.
enum Next {
    Wait(EventSet),
    Close,
}

impl Conn {
    /// Go as far as the socket allows.
    fn progress(&mut self, max_head: usize, resource: &mut Resource) -> Next {
        loop {
            match &mut self.state {
                State::Head(head) => match read_head(&self.stream, head, max_head) {
                    HeadRead::Again => return Next::Wait(EventSet::IN),
                    HeadRead::Closed => return Next::Close,
                    HeadRead::Complete(h) => {
                        self.state = State::Reply {
                            out: answer(h, resource),
                            sent: 0,
                        }
                    }
                },
                State::Reply { out, sent } => {
                    while *sent < out.len() {
                        match self.stream.write(&out[*sent..]) {
                            Ok(0) => return Next::Close,
                            Ok(n) => *sent += n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                return Next::Wait(EventSet::OUT)
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => return Next::Close,
                        }
                    }
                    self.stream.shutdown_write();
                    self.state = State::Linger { drained: 0 };
                }
                State::Linger { drained } => {
                    let mut sink = [0u8; 4096];
                    loop {
                        match self.stream.read(&mut sink) {
                            Ok(0) => return Next::Close,
                            Ok(n) => {
                                *drained += n;
                                if *drained > LINGER_BYTES {
                                    return Next::Close;
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                return Next::Wait(EventSet::IN)
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => return Next::Close,
                        }
                    }
                }
            }
        }
    }
}

enum HeadRead {
    /// The head is not complete yet and the socket has nothing more for now.
    Again,
    /// The client closed (or the connection failed) before a complete head.
    Closed,
    /// A complete, malformed or too large head.
    Complete(Head),
}

/// Read what the socket has into `head` (never past `max_head` bytes) and answer once the head
/// is complete. The head is parsed only after a read that brought a line feed.
fn read_head(stream: &Stream, head: &mut Vec<u8>, max_head: usize) -> HeadRead {
    let mut chunk = [0u8; 2048];
    loop {
        let room = max_head.saturating_sub(head.len());
        if room == 0 {
            return HeadRead::Complete(Head::TooLarge);
        }
        let want = room.min(chunk.len());
        match stream.read(&mut chunk[..want]) {
            Ok(0) => return HeadRead::Closed,
            Ok(n) => {
                head.extend_from_slice(&chunk[..n]);
                if chunk[..n].contains(&b'\n') {
                    if let Some(h) = Head::parse(head) {
                        return HeadRead::Complete(h);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return HeadRead::Again,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return HeadRead::Closed,
        }
    }
}

/// A complete request head, as far as the server cares.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// A well-formed HTTP/1.0 or HTTP/1.1 request: its method and its target without the query.
    Request {
        method: String,
        target: String,
    },
    /// Over `max_head` bytes or [`MAX_HEADERS`] header lines.
    TooLarge,
    Malformed(httparse::Error),
}

impl Head {
    /// `None` while the head is incomplete.
    fn parse(buf: &[u8]) -> Option<Head> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Partial) => None,
            Ok(httparse::Status::Complete(_)) => {
                // Complete means method, path and version were all parsed.
                let path = req.path.unwrap_or_default();
                let target = path.split_once('?').map_or(path, |(p, _)| p);
                Some(Head::Request {
                    method: req.method.unwrap_or_default().to_string(),
                    target: target.to_string(),
                })
            }
            Err(httparse::Error::TooManyHeaders) => Some(Head::TooLarge),
            Err(e) => Some(Head::Malformed(e)),
        }
    }
}

/// The reply to a complete head.
fn answer(head: Head, resource: &mut Resource) -> Vec<u8> {
    match head {
        Head::Request { target, .. } if target != resource.path => {
            let body = format!("GET {}\n", resource.path);
            reply(404, "Not Found", "", body.as_bytes())
        }
        Head::Request { method, .. } if method != "GET" => {
            reply(405, "Method Not Allowed", "Allow: GET\r\n", b"")
        }
        Head::Request { .. } => match (resource.body)() {
            Ok(body) => reply_typed(200, "OK", resource.content_type, "", body.as_bytes()),
            Err(e) => {
                warn!("metrics: {e}");
                reply(500, "Internal Server Error", "", b"")
            }
        },
        Head::TooLarge => {
            debug!("metrics: request head too large: 431");
            reply(431, "Request Header Fields Too Large", "", b"")
        }
        Head::Malformed(e) => {
            debug!("metrics: malformed request head ({e}): 400");
            reply(400, "Bad Request", "", b"")
        }
    }
}

/// A plain-text reply; `extra` is header lines, each ending in CRLF.
fn reply(status: u16, reason: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    reply_typed(status, reason, "text/plain; charset=utf-8", extra, body)
}

fn reply_typed(status: u16, reason: &str, content_type: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The server's thread.
struct Loop {
    epoll: Epoll,
    listener: Listener,
    stop: Arc<EventFd>,
    limits: Limits,
    resource: Resource,
    /// One slot per connection allowed; slot `i` has epoll token `FIRST_CONN + i`.
    conns: Vec<Option<Conn>>,
    /// While accepting is paused after an error: when it resumes (the listener is out of the
    /// epoll set until then).
    paused_until: Option<Instant>,
    backoff: Backoff,
    accept_log: RateLimited,
    client_log: RateLimited,
}

impl Loop {
    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); self.conns.len() + 2];
        loop {
            let timeout = self.timeout_ms(Instant::now());
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("metrics: epoll_wait failed: {e}; the metrics endpoint stops");
                    return;
                }
            };
            let mut accept = false;
            for ev in &events[..n] {
                match ev.data() {
                    STOP => {
                        let _ = self.stop.read();
                        return;
                    }
                    LISTENER => accept = true,
                    token => self.ready(token - FIRST_CONN),
                }
            }
            let now = Instant::now();
            self.expire(now);
            if self.paused_until.is_some_and(|t| now >= t) {
                self.resume();
                accept = true;
            }
            if accept && self.paused_until.is_none() {
                self.accept_batch();
            }
        }
    }

    /// Until the earliest connection deadline or the end of a pause; -1 (no timeout) if none.
    fn timeout_ms(&self, now: Instant) -> i32 {
        let earliest = self
            .conns
            .iter()
            .flatten()
            .map(|c| c.deadline)
            .chain(self.paused_until)
            .min();
        match earliest {
            None => -1,
            Some(t) => {
                // Rounded up: waking a little late closes on time, waking early spins.
                let ms = t.saturating_duration_since(now).as_micros().div_ceil(1000);
                i32::try_from(ms).unwrap_or(i32::MAX)
            }
        }
    }

    /// Connection `slot` is readable or writable (or failed: the next read or write says so).
    fn ready(&mut self, slot: u64) {
        let Some(i) = usize::try_from(slot).ok().filter(|&i| i < self.conns.len()) else {
            return;
        };
        let Some(conn) = self.conns[i].as_mut() else {
            return;
        };
        match conn.progress(self.limits.max_head, &mut self.resource) {
            Next::Close => self.close(i),
            Next::Wait(want) if want != conn.interest => {
                let ev = EpollEvent::new(want, FIRST_CONN + slot);
                match self
                    .epoll
                    .ctl(ControlOperation::Modify, conn.stream.fd().as_raw_fd(), ev)
                {
                    Ok(()) => conn.interest = want,
                    Err(e) => {
                        warn!("metrics: epoll_ctl: {e}; closing a connection");
                        self.close(i);
                    }
                }
            }
            Next::Wait(_) => {}
        }
    }

    fn expire(&mut self, now: Instant) {
        for i in 0..self.conns.len() {
            let Some(c) = &self.conns[i] else { continue };
            if c.deadline > now {
                continue;
            }
            let what = match &c.state {
                State::Head(h) if h.is_empty() => "no request",
                State::Head(_) => "an incomplete request head",
                State::Reply { .. } => "a reply not read",
                State::Linger { .. } => "a client that did not close",
            };
            if let Some(n) = self.client_log.allow() {
                warn!(
                    "metrics: closed a connection at its {:?} deadline ({what}){}",
                    self.limits.deadline,
                    suppressed(n)
                );
            }
            self.close(i);
        }
    }

    fn close(&mut self, i: usize) {
        if let Some(c) = self.conns[i].take() {
            // Closing the fd removes it from the set too; deleting first keeps that explicit.
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.fd().as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn accept_batch(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok(stream) => {
                    self.backoff.reset();
                    self.admit(stream);
                }
                Err(e) => match AcceptError::of(&e) {
                    AcceptError::Drained => return,
                    AcceptError::Skip => debug!("metrics: accept: {e} (skipped)"),
                    kind => {
                        let pause = self.backoff.next();
                        self.pause(pause);
                        if let Some(n) = self.accept_log.allow() {
                            let n = suppressed(n);
                            if kind == AcceptError::Exhausted {
                                warn!("metrics: accept: {e}; not accepting for {pause:?}{n}");
                            } else {
                                error!("metrics: accept: {e}; not accepting for {pause:?}{n}");
                            }
                        }
                        return;
                    }
                },
            }
        }
    }

    /// Take a new connection into a free slot, or refuse it at once.
    fn admit(&mut self, stream: Stream) {
        if let Err(e) = stream.set_nonblocking() {
            debug!("metrics: a new connection: {e}; closed");
            return;
        }
        let Some(i) = self.conns.iter().position(Option::is_none) else {
            refuse(&stream);
            if let Some(n) = self.client_log.allow() {
                warn!(
                    "metrics: {} connections open; refused one (503){}",
                    self.conns.len(),
                    suppressed(n)
                );
            }
            return;
        };
        let token = FIRST_CONN + i as u64;
        let fd = stream.fd().as_raw_fd();
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        ) {
            warn!("metrics: epoll_ctl: {e}; a new connection closed");
            return;
        }
        // A scraper's request is often there already: level-triggered, the next wait says so.
        self.conns[i] = Some(Conn {
            stream,
            deadline: Instant::now() + self.limits.deadline,
            state: State::Head(Vec::new()),
            interest: EventSet::IN,
        });
    }

    fn pause(&mut self, pause: Duration) {
        if self.paused_until.is_none() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                self.listener.raw_fd(),
                EpollEvent::default(),
            );
        }
        self.paused_until = Some(Instant::now() + pause);
    }

    fn resume(&mut self) {
        let ev = EpollEvent::new(EventSet::IN, LISTENER);
        match self
            .epoll
            .ctl(ControlOperation::Add, self.listener.raw_fd(), ev)
        {
            Ok(()) => self.paused_until = None,
            Err(e) => {
                let pause = self.backoff.next();
                self.paused_until = Some(Instant::now() + pause);
                if let Some(n) = self.accept_log.allow() {
                    warn!(
                        "metrics: epoll_ctl on the listener: {e}; retrying in {pause:?}{}",
                        suppressed(n)
                    );
                }
            }
        }
    }
}

/// A connection beyond the cap: what it sent already is read (so that closing does not reset
/// the 503 away), the 503 written once, and the socket closed, all without blocking.
fn refuse(stream: &Stream) {
    let mut sink = [0u8; 1024];
    let _ = stream.read(&mut sink);
    let _ = stream.write(REFUSED);
    stream.shutdown_write();
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A server on a unix socket of its own, answering `body` at /metrics.
    struct TestServer {
        server: Option<Server>,
        path: PathBuf,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.server.take();
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn serve_body(limits: Limits, body: String) -> TestServer {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "vut-http-{}-{}.sock",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let listener = Listener::Unix(UnixListener::bind(&path).unwrap());
        let resource = Resource {
            path: "/metrics",
            content_type: "text/x-test",
            body: Box::new(move || Ok(body.clone())),
        };
        let server = Server::spawn("vut-http-test", listener, limits, resource).unwrap();
        TestServer {
            server: Some(server),
            path,
        }
    }

    fn serve(limits: Limits) -> TestServer {
        serve_body(limits, "hello\n".into())
    }

    fn connect(s: &TestServer) -> UnixStream {
        let c = UnixStream::connect(&s.path).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    }

    /// Send `request`, read until the server closes. A refused connection may end in a reset
    /// after its 503 (the request arrived after the server looked): what came before counts.
    fn exchange(s: &TestServer, request: &[u8]) -> String {
        let mut c = connect(s);
        if let Err(e) = c.write_all(request) {
            // Refused and closed before the request went out.
            assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
        }
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("reading the reply: {e}"),
            }
        }
        String::from_utf8(out).unwrap()
    }

    fn status(reply: &str) -> &str {
        reply.lines().next().unwrap_or("")
    }

    #[test]
    fn get_metrics_is_answered_with_length_and_connection_close_in_http_1_0_and_1_1() {
        let s = serve(Limits::default());
        for req in [
            "GET /metrics HTTP/1.0\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
            "GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n",
            "\r\nGET /metrics HTTP/1.1\nHost: x\n\n",
        ] {
            let r = exchange(&s, req.as_bytes());
            assert_eq!(status(&r), "HTTP/1.1 200 OK", "{req:?}: {r}");
            for h in [
                "Content-Type: text/x-test\r\n",
                "Content-Length: 6\r\n",
                "Connection: close\r\n",
            ] {
                assert!(r.contains(h), "{req:?}: {h:?} missing in {r}");
            }
            assert!(r.ends_with("\r\n\r\nhello\n"), "{req:?}: {r}");
        }
    }

    #[test]
    fn other_paths_get_404_other_methods_405_and_malformed_heads_400() {
        let s = serve(Limits::default());
        let many_headers: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        let cases = [
            ("GET / HTTP/1.1\r\n\r\n".to_string(), "404 Not Found"),
            ("GET /metricsx HTTP/1.1\r\n\r\n".into(), "404 Not Found"),
            ("GET /metrics/ HTTP/1.0\r\n\r\n".into(), "404 Not Found"),
            ("POST / HTTP/1.1\r\n\r\n".into(), "404 Not Found"),
            (
                "POST /metrics HTTP/1.1\r\n\r\n".into(),
                "405 Method Not Allowed",
            ),
            (
                "HEAD /metrics HTTP/1.1\r\n\r\n".into(),
                "405 Method Not Allowed",
            ),
            (
                "get /metrics HTTP/1.1\r\n\r\n".into(),
                "405 Method Not Allowed",
            ),
            ("GET /metrics HTTP/2.0\r\n\r\n".into(), "400 Bad Request"),
            ("GET /metrics\r\n\r\n".into(), "400 Bad Request"),
            ("\x16\x03\x01 hello\r\n\r\n".into(), "400 Bad Request"),
            (
                "GET /metrics HTTP/1.1\r\nNo colon\r\n\r\n".into(),
                "400 Bad Request",
            ),
            (
                format!("GET /metrics HTTP/1.1\r\n{many_headers}\r\n"),
                "431 Request Header Fields Too Large",
            ),
        ];
        for (req, want) in cases {
            let r = exchange(&s, req.as_bytes());
            assert_eq!(status(&r), format!("HTTP/1.1 {want}"), "{req:?}: {r}");
            assert!(r.contains("Connection: close\r\n"), "{req:?}: {r}");
            if want.starts_with("405") {
                assert!(r.contains("Allow: GET\r\n"), "{r}");
            }
        }
    }

    #[test]
    fn a_head_over_the_cap_gets_431_and_is_closed() {
        let s = serve(Limits::default());
        let mut req = b"GET /metrics HTTP/1.1\r\nX-Long: ".to_vec();
        req.resize(MAX_HEAD + 1024, b'a');
        let r = exchange(&s, &req);
        assert_eq!(status(&r), "HTTP/1.1 431 Request Header Fields Too Large");
        // A head of exactly the cap is still read.
        let mut req = b"GET /metrics HTTP/1.1\r\nX-Long: ".to_vec();
        req.resize(MAX_HEAD - 4, b'a');
        req.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status(&exchange(&s, &req)), "HTTP/1.1 200 OK");
    }

    #[test]
    fn an_endless_header_line_is_cut_off_after_the_cap_and_what_lingers() {
        let s = serve(Limits::default());
        let mut c = connect(&s);
        let chunk = [b'a'; 64 * 1024];
        c.write_all(b"GET /metrics HTTP/1.1\r\nX-Endless: ")
            .unwrap();
        let mut sent = 0usize;
        let err = loop {
            match c.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) => break e,
            }
            assert!(sent < 10 << 20, "the server took 10 MiB of one header line");
        };
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "{err}"
        );
        // Bounded by the head cap, the lingering and the socket buffers.
        assert!(sent < 1 << 20, "{sent} bytes went in before the close");
    }

    #[test]
    fn an_idle_connection_is_closed_at_its_deadline() {
        let deadline = Duration::from_millis(300);
        let s = serve(Limits {
            deadline,
            ..Limits::default()
        });
        let t0 = Instant::now();
        let mut c = connect(&s);
        c.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
        let took = t0.elapsed();
        assert!(
            took >= deadline && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[test]
    fn connections_beyond_the_cap_get_503_at_once_and_a_freed_slot_serves_again() {
        let deadline = Duration::from_millis(500);
        let s = serve(Limits {
            max_connections: 2,
            deadline,
            ..Limits::default()
        });
        let t0 = Instant::now();
        let held: Vec<UnixStream> = (0..2).map(|_| connect(&s)).collect();
        let r = exchange(&s, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        assert!(t0.elapsed() < deadline, "the refusal waited for a deadline");
        for mut c in held {
            let mut out = Vec::new();
            c.read_to_end(&mut out).unwrap();
            assert!(out.is_empty());
        }
        assert!(t0.elapsed() >= deadline);
        assert_eq!(
            status(&exchange(&s, b"GET /metrics HTTP/1.1\r\n\r\n")),
            "HTTP/1.1 200 OK"
        );
    }

    #[test]
    fn a_large_reply_is_written_in_pieces_to_a_slow_reader() {
        let body: String = (0..200_000).map(|i| format!("line {i}\n")).collect();
        let s = serve_body(Limits::default(), body.clone());
        let mut c = connect(&s);
        c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = c.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{}",
            &out[..200]
        );
        assert!(out.ends_with(&body));
    }

    #[test]
    fn tcp_is_served_the_same() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let resource = Resource {
            path: "/metrics",
            content_type: "text/x-test",
            body: Box::new(|| Ok("tcp\n".into())),
        };
        let _server = Server::spawn(
            "vut-http-test",
            Listener::Tcp(listener),
            Limits::default(),
            resource,
        )
        .unwrap();
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\ntcp\n"), "{out}");
    }

    #[test]
    fn dropping_the_server_stops_it_with_connections_open() {
        let mut s = serve(Limits::default());
        let mut c = connect(&s);
        let t0 = Instant::now();
        s.server.take();
        assert!(t0.elapsed() < Duration::from_secs(1));
        // Closed: an end of file if the server had accepted it, a reset if it was still queued.
        let mut out = Vec::new();
        match c.read_to_end(&mut out) {
            Ok(_) => assert!(out.is_empty()),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        }
    }

    #[test]
    fn the_accept_back_off_doubles_to_one_second_and_resets() {
        let mut b = Backoff::default();
        let seen: Vec<u64> = (0..6)
            .map(|_| u64::try_from(b.next().as_millis()).unwrap())
            .collect();
        assert_eq!(seen, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), BACKOFF_FIRST);
    }

    #[test]
    fn accept_errors_pause_unless_they_concern_one_connection() {
        let of = |errno| AcceptError::of(&io::Error::from_raw_os_error(errno));
        assert_eq!(of(libc::EAGAIN), AcceptError::Drained);
        for e in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(of(e), AcceptError::Exhausted, "errno {e}");
        }
        for e in [
            libc::ECONNABORTED,
            libc::EINTR,
            libc::EPROTO,
            libc::ENETUNREACH,
        ] {
            assert_eq!(of(e), AcceptError::Skip, "errno {e}");
        }
        for e in [libc::EPERM, libc::EBADF, libc::EINVAL] {
            assert_eq!(of(e), AcceptError::Unexpected, "errno {e}");
        }
    }

    #[test]
    fn a_head_is_parsed_only_when_complete() {
        assert_eq!(Head::parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            Head::parse(b"GET /metrics?a=b HTTP/1.1\r\n\r\n"),
            Some(Head::Request {
                method: "GET".into(),
                target: "/metrics".into()
            })
        );
    }
}
