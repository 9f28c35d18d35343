//! The metrics endpoint against hostile and careless clients, served by the real daemon (seccomp
//! on) in a throwaway namespace: an endless header line costs no memory, connections beyond the
//! cap are refused at once and a scrape is answered once deadlines free a slot, no thread per
//! connection, metrics clients cannot take the descriptors the vhost-user side needs, accept
//! errors pause the endpoint instead of ending it, and requests other than `GET /metrics` get
//! their status. Needs root; VUT_SKIP_ROOT=1 skips (prints SKIPPED).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use vhost_user_tap::metrics::http::{BACKOFF_MAX, DEADLINE, MAX_CONNECTIONS, MAX_HEAD, OWN_FDS};
use vhost_user_tap_guest::kit::*;

/// Added to the server's own deadlines before a test gives up (2 shared cores).
const SLACK: Duration = Duration::from_secs(3);
const GET: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";

/// Entries of `/proc/<pid>/<dir>` (`fd`, `task`).
fn count(pid: u32, dir: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{dir}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/{dir}: {e}"))
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let v = proc_status_field(pid, "VmRSS:");
    v.trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("VmRSS {v:?}: {e}"))
}

/// Read until the server closes (end of file or reset) or `until` passes: what arrived, and
/// whether it closed.
fn read_until_closed(c: &mut UnixStream, until: Instant) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        c.set_read_timeout(Some(left)).unwrap();
        match c.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break true,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break false
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading from the metrics socket: {e}"),
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Send `req` on a new connection; the reply, which must end with the server's close.
fn request(path: &Path, req: &[u8]) -> String {
    let mut c = UnixStream::connect(path).unwrap();
    if let Err(e) = c.write_all(req) {
        // A connection beyond the cap may be answered and closed before the request is sent.
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "sending the request: {e}"
        );
    }
    let (reply, closed) = read_until_closed(&mut c, Instant::now() + DEADLINE + SLACK);
    assert!(closed, "no close after the reply: {reply:?}");
    reply
}

fn status(reply: &str) -> &str {
    reply.lines().next().unwrap_or("")
}

/// A 200 with the whole OpenMetrics text, its length announced and the close said.
fn assert_full_scrape(reply: &str) {
    assert_eq!(status(reply), "HTTP/1.1 200 OK", "{reply}");
    let (head, body) = reply.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.contains("\r\nConnection: close"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(
        head.contains(&format!("\r\nContent-Length: {}", body.len())),
        "{head}"
    );
    assert!(
        body.contains("vhost_user_tap_rx_frames_total{queue=\"0\"}"),
        "{body}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
}

#[test]
fn an_endless_header_line_is_cut_off_without_growing_the_daemons_memory() {
    if !root_or_skip("metrics_endless_header") {
        return;
    }
    let ns = Netns::new("mhead");
    let mut d = Daemon::start(&ns, TAP, &[]);
    let (pid, path) = (d.pid(), d.metrics_path().to_path_buf());
    scrape(&path); // What a scrape allocates is not what is measured here.
    let rss0 = rss_kib(pid);
    let mut c = UnixStream::connect(&path).unwrap();
    c.set_write_timeout(Some(DEADLINE + SLACK)).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nX-Endless: ")
        .unwrap();
    let chunk = vec![b'a'; 64 << 10];
    let (mut sent, mut peak) = (0usize, rss0);
    let t0 = Instant::now();
    let end = loop {
        match c.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) => break e,
        }
        peak = peak.max(rss_kib(pid));
        if sent >= 10 << 20 {
            break io::Error::other("the daemon took 10 MiB of one header line");
        }
    };
    peak = peak.max(rss_kib(pid));
    assert!(
        matches!(
            end.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ),
        "the connection was not closed after {sent} bytes in {:?}: {end}",
        t0.elapsed()
    );
    assert!(t0.elapsed() < DEADLINE + SLACK, "{:?}", t0.elapsed());
    assert!(
        peak < rss0 + 1024,
        "VmRSS grew from {rss0} kB to {peak} kB while {sent} bytes of a header line went in"
    );
    // What the server read before the close: the head cap and what it lets a client linger.
    assert!(sent < 1 << 20, "{sent} bytes went in before the close");
    assert_full_scrape(&request(&path, GET));
    d.terminate_ok();
}

#[test]
fn connections_beyond_the_cap_are_refused_at_once_and_a_scrape_is_answered_once_deadlines_free_slots(
) {
    if !root_or_skip("metrics_cap") {
        return;
    }
    let ns = Netns::new("mcap");
    let mut d = Daemon::start(&ns, TAP, &[]);
    let (pid, path) = (d.pid(), d.metrics_path().to_path_buf());
    let threads = count(pid, "task");
    let extra = 4;
    let t0 = Instant::now();
    // Idle clients, each reading until the server closes it.
    let idle: Vec<_> = (0..MAX_CONNECTIONS + extra)
        .map(|_| {
            let mut c = UnixStream::connect(&path).unwrap();
            std::thread::spawn(move || {
                let (reply, closed) = read_until_closed(&mut c, t0 + DEADLINE + SLACK);
                (reply, closed, t0.elapsed())
            })
        })
        .collect();
    // While the first MAX_CONNECTIONS hold every slot: a scrape is refused at once, and the
    // daemon has not grown a thread.
    let refused = request(&path, GET);
    if t0.elapsed() < DEADLINE {
        assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
        assert_eq!(
            count(pid, "task"),
            threads,
            "threads while {} clients are open",
            idle.len()
        );
    }
    let (mut held, mut turned_away) = (0, 0);
    for h in idle {
        let (reply, closed, when) = h.join().unwrap();
        assert!(
            closed,
            "an idle client was not closed within {:?}",
            DEADLINE + SLACK
        );
        if reply.is_empty() {
            assert!(when >= DEADLINE, "an idle client was closed after {when:?}");
            held += 1;
        } else {
            assert!(reply.starts_with("HTTP/1.1 503 "), "{reply}");
            assert!(when < DEADLINE, "a refusal took {when:?}");
            turned_away += 1;
        }
    }
    assert_eq!((held, turned_away), (MAX_CONNECTIONS, extra));
    // The deadlines freed the slots: the next scrape is served.
    assert_full_scrape(&request(&path, GET));
    assert!(t0.elapsed() < DEADLINE + SLACK, "{:?}", t0.elapsed());
    assert_eq!(count(pid, "task"), threads);
    d.terminate_ok();
}

/// `ip netns exec <ns> prlimit --nofile=N:N vhost-user-tap --socket-path <socket> --tap TAP
/// <extra>` (prlimit execs the daemon: the kit's pid is the daemon's).
fn limited_command(ns: &Netns, nofile: u64, socket: &Path, extra: &[&str]) -> Command {
    let mut cmd = ns.command("prlimit");
    cmd.arg(format!("--nofile={nofile}:{nofile}"))
        .arg("--")
        .arg(daemon_bin())
        .arg("--socket-path")
        .arg(socket)
        .args(["--tap", TAP])
        .args(extra);
    cmd
}

/// From the daemon's "metrics on" line: descriptors open at that point and those kept for the
/// vhost-user side.
fn fd_budget(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .find(|l| l.contains("metrics on"))
        .unwrap_or_else(|| panic!("no 'metrics on' line in\n{log}"));
    let number_before = |what: &str| -> u64 {
        let head = &line[..line
            .find(what)
            .unwrap_or_else(|| panic!("{what:?} in {line}"))];
        head.trim_end().rsplit(' ').next().unwrap().parse().unwrap()
    };
    (
        number_before(" fds open"),
        number_before(" kept for the vhost-user side"),
    )
}

#[test]
fn metrics_clients_cannot_take_the_descriptors_the_vhost_user_side_needs() {
    if !root_or_skip("metrics_fd_budget") {
        return;
    }
    let ns = Netns::new("mfd");
    let dir = TempDir::new("mfd");
    let socket = dir.path().join("vhost.sock");
    let reserve = vhost_user_tap::metrics::vhost_user_fd_reserve(1);
    // The server's own descriptors and a scrape's netlink socket.
    let own = OWN_FDS as u64 + 1;
    // A limit that leaves no room for one metrics connection (the daemon has at least its stdio
    // open): it says so and stops.
    let metrics = format!("unix:{}", dir.path().join("metrics.sock").display());
    let mut cmd = limited_command(&ns, reserve + own, &socket, &["--metrics", &metrics]);
    let out = output_within(&mut cmd, WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {stderr}");
    assert!(
        stderr.contains("leaves no descriptor for a metrics connection"),
        "{stderr}"
    );

    // Room for two. What the daemon has open at start varies (a test process's children inherit
    // other tests' descriptors that lack CLOEXEC): the limit follows what the last start said.
    let cap = 2;
    let (mut limit, mut attempts) = (1024, 0);
    let mut d = loop {
        let mut d = Daemon::spawn(
            &mut limited_command(&ns, limit, &socket, &[]),
            socket.clone(),
            "listening on",
        );
        let (open, kept) = fd_budget(&d.log());
        assert_eq!(kept, reserve);
        if d.log()
            .contains(&format!("at most {cap} connections at once"))
        {
            break d;
        }
        d.terminate_ok();
        attempts += 1;
        assert!(attempts < 5, "never {cap} connections:\n{}", d.log());
        limit = open + reserve + own + cap;
    };
    let (pid, path) = (d.pid(), d.metrics_path().to_path_buf());
    ns.configure_tap(TAP);
    let host = ns.udp_socket(&format!("{HOST_IP}:{HOST_PORT}"));
    // A first guest shows what a session holds.
    let mut g = d.connect_guest();
    host_to_guest(&host, &mut g, 0..50);
    let with_guest = count(pid, "fd");
    g.disconnect().expect("clean disconnect");
    d.wait_for_log("frontend disconnected", WAIT);

    // Clients that try to hold more metrics connections than even the default cap, reconnecting
    // whenever one is closed (after 10 ms when refused, as a scraper would retry).
    let stop = Arc::new(AtomicBool::new(false));
    let (refused, held) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (first_refusal, refusal_seen) = mpsc::channel();
    let clients: Vec<_> = (0..MAX_CONNECTIONS + 2)
        .map(|_| {
            let (stop, refused, held) = (stop.clone(), refused.clone(), held.clone());
            let (path, first_refusal) = (path.clone(), first_refusal.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut c = UnixStream::connect(&path).expect("connecting to the metrics");
                    let (reply, closed) =
                        read_until_closed(&mut c, Instant::now() + DEADLINE + SLACK);
                    assert!(closed, "a metrics client was never closed");
                    if reply.is_empty() {
                        held.fetch_add(1, Ordering::Relaxed);
                    } else {
                        assert!(reply.starts_with("HTTP/1.1 503 "), "{reply}");
                        refused.fetch_add(1, Ordering::Relaxed);
                        let _ = first_refusal.send(());
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            })
        })
        .collect();
    refusal_seen
        .recv_timeout(WAIT)
        .expect("no metrics connection was refused");
    // The daemon's descriptors, sampled while the clients press on.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while sampling.load(Ordering::Relaxed) {
                most = most.max(count(pid, "fd"));
                std::thread::sleep(Duration::from_millis(2));
            }
            most
        })
    };
    // Meanwhile a second guest connects and frames flow both ways.
    let refused_before = refused.load(Ordering::Relaxed);
    let mut g = d.connect_guest();
    host_to_guest(&host, &mut g, 50..250);
    guest_to_host(&ns, &host, &mut g, 200, |seq| {
        60 + (seq as usize * 13) % 1400
    });
    sampling.store(false, Ordering::Relaxed);
    let most = sampler.join().unwrap();
    assert!(
        refused.load(Ordering::Relaxed) > refused_before,
        "the metrics clients were not turned away while the guest ran"
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert!(
        held.load(Ordering::Relaxed) > 0,
        "no metrics connection was held"
    );
    // The session's descriptors, at most `cap` held metrics connections and one being refused.
    let bound = with_guest + cap as usize + 1;
    assert!(
        most <= bound,
        "the daemon had {most} fds open (a session alone: {with_guest}; metrics may add {})",
        cap + 1
    );

    // Every frame is counted, and the endpoint answers once the clients are gone.
    drop(g);
    let c = d.counters_when_idle(0);
    let tap = ns.link_stats(TAP);
    assert_eq!((c["rx_frames"], c["tx_frames"]), (250, 200), "{c:?}");
    assert_eq!((tap.tx_packets, tap.rx_packets), (250, 200));
    assert_eq!(c.drops(), 0, "{c:?}");
    let log = d.log();
    assert!(log.contains("refused one (503)"), "{log}");
    assert!(
        !log.contains("accept failed"),
        "the vhost-user side could not accept:\n{log}"
    );
    d.terminate_ok();
}

/// The daemon's metrics thread: its tid.
fn metrics_thread(pid: u32) -> String {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|c| c.trim() == "vut-metrics")
        })
        .expect("a thread named vut-metrics")
}

/// CPU time of thread `tid` (user + system), in clock ticks.
fn cpu_ticks(pid: u32, tid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    // After the ")" that ends the name: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn prlimit_pid(pid: u32, nofile: &str) {
    let out = output_within(
        Command::new("prlimit").args(["--pid", &pid.to_string(), &format!("--nofile={nofile}")]),
        WAIT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn accept_errors_pause_the_endpoint_which_answers_again_while_frames_flow() {
    if !root_or_skip("metrics_emfile") {
        return;
    }
    let ns = Netns::new("memfile");
    let mut d = Daemon::start(&ns, TAP, &[]);
    let (pid, path) = (d.pid(), d.metrics_path().to_path_buf());
    ns.configure_tap(TAP);
    let host = ns.udp_socket(&format!("{HOST_IP}:{HOST_PORT}"));
    let mut g = d.connect_guest();
    host_to_guest(&host, &mut g, 0..50);
    let threads = count(pid, "task");
    let tid = metrics_thread(pid);
    let soft = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .expect("Max open files in /proc/<pid>/limits");

    // No descriptor can be made any more: every accept fails with EMFILE.
    prlimit_pid(pid, "0:");
    let cpu0 = cpu_ticks(pid, &tid);
    let t0 = Instant::now();
    let mut pending = UnixStream::connect(&path).expect("the backlog takes the connection");
    pending.write_all(GET).unwrap();
    d.wait_for_log("metrics: accept: Too many open files", WAIT);
    // The data path needs no new descriptor: frames flow both ways.
    host_to_guest(&host, &mut g, 50..150);
    guest_to_host(&ns, &host, &mut g, 100, |seq| {
        60 + (seq as usize * 13) % 1400
    });
    // Accept errors go on (rate-limited: the next line counts those held back) and the thread
    // backs off instead of spinning.
    d.wait_for_log("similar messages suppressed", WAIT);
    let (cpu, wall) = (cpu_ticks(pid, &tid) - cpu0, t0.elapsed());
    assert!(
        cpu < 20,
        "the metrics thread used {cpu} ticks of CPU in {wall:?} of accept errors"
    );

    // Descriptors again: the waiting client is answered within one back-off.
    prlimit_pid(pid, &format!("{soft}:"));
    let (reply, closed) = read_until_closed(&mut pending, Instant::now() + BACKOFF_MAX + SLACK);
    assert!(closed, "{reply:?}");
    assert_full_scrape(&reply);
    assert_eq!(count(pid, "task"), threads);
    assert_eq!(
        metrics_thread(pid),
        tid,
        "the metrics thread is the one from the start"
    );

    drop(g);
    let c = d.counters_when_idle(0);
    let tap = ns.link_stats(TAP);
    assert_eq!((c["rx_frames"], c["tx_frames"]), (150, 100), "{c:?}");
    assert_eq!((tap.tx_packets, tap.rx_packets), (150, 100));
    assert_eq!(c.drops(), 0, "{c:?}");
    d.terminate_ok();
}

/// The replies to `GET /metrics` and to what is not, through `send` (one connection each).
fn check_statuses(send: &dyn Fn(&[u8]) -> String) {
    assert_full_scrape(&send(b"GET /metrics HTTP/1.0\r\n\r\n"));
    assert_full_scrape(&send(GET));
    for (req, want) in [
        (
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            "HTTP/1.1 404 Not Found",
        ),
        (b"GET /metrics/x HTTP/1.0\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (
            b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (
            b"DELETE /metrics HTTP/1.1\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (b"GET /metrics HTTP/3\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"\x00\x01\x02\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    ] {
        let reply = send(req);
        assert_eq!(
            status(&reply),
            want,
            "{:?}: {reply}",
            String::from_utf8_lossy(req)
        );
        assert!(reply.contains("\r\nConnection: close\r\n"), "{reply}");
        if want.contains("405") {
            assert!(reply.contains("\r\nAllow: GET\r\n"), "{reply}");
        }
    }
    // A head over the cap, then the client waits: 431, and the close.
    let mut long = b"GET /metrics HTTP/1.1\r\nX-Long: ".to_vec();
    long.resize(MAX_HEAD + 1024, b'a');
    let reply = send(&long);
    assert_eq!(
        status(&reply),
        "HTTP/1.1 431 Request Header Fields Too Large",
        "{reply}"
    );
}

#[test]
fn other_paths_get_404_other_methods_405_and_oversized_heads_431_over_unix_and_tcp() {
    if !root_or_skip("metrics_statuses") {
        return;
    }
    let ns = Netns::new("mstatus");
    let mut d = Daemon::start(&ns, TAP, &[]);
    let path = d.metrics_path().to_path_buf();
    check_statuses(&|req: &[u8]| request(&path, req));
    d.terminate_ok();

    let mut d = Daemon::start(&ns, TAP, &["--metrics", "127.0.0.1:0"]);
    let line = d
        .log()
        .lines()
        .find(|l| l.contains("metrics on http://"))
        .unwrap()
        .to_string();
    let addr: std::net::SocketAddr = line
        .split("metrics on http://")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line}"));
    // The daemon listens in the namespace: connect from a thread inside it.
    let send = |req: &[u8]| {
        let req = req.to_vec();
        ns.within(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(DEADLINE + SLACK)).unwrap();
            c.write_all(&req).unwrap();
            let mut reply = Vec::new();
            c.read_to_end(&mut reply).expect("the reply and the close");
            String::from_utf8_lossy(&reply).into_owned()
        })
    };
    check_statuses(&send);
    d.terminate_ok();
}
