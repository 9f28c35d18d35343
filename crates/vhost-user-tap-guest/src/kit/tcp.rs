//! TCP through the daemon between two real network stacks.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{run, Daemon, Netns, TAP};

/// Throughput of one TCP transfer through the daemon, and whether the bytes arrived intact.
#[derive(Clone, Copy, Debug)]
pub struct TcpRun {
    pub host_to_guest_gbps: f64,
    pub guest_to_host_gbps: f64,
}

/// A real TCP stack on both sides of the daemon: host namespace A holds the daemon's tap
/// (10.97.0.1); the synthetic guest bridges its rings to a second tap in namespace B (10.97.0.2).
/// Sends `bytes` each way over one connection and checks every byte. With `offloads` the guest
/// negotiates checksum and TSO offloads both ways and the frames cross as GSO super-frames.
pub fn tcp_through_daemon(tag: &str, offloads: bool, bytes: usize) -> TcpRun {
    use crate::{bridge::bridge, Guest, GuestConfig};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::AtomicBool;
    use vhost_user_tap::tap::Tap;
    use virtio_bindings::virtio_net::*;

    const A_IP: &str = "10.97.0.1";
    const B_IP: &str = "10.97.0.2";
    const BR: &str = "vutbr0";
    let a = Netns::new(&format!("{tag}a"));
    let b = Netns::new(&format!("{tag}b"));
    let mut daemon = Daemon::start(&a, TAP, &[]);
    a.ip(&["addr", "add", &format!("{A_IP}/24"), "dev", TAP]);
    a.ip(&["link", "set", TAP, "up"]);
    let tap2 = b.within(move || {
        let t = Tap::open_queues(BR, 1, 0)
            .expect("second tap")
            .pop()
            .unwrap();
        t.set_vnet_hdr_len(12).unwrap();
        if offloads {
            t.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
                .unwrap();
        }
        t
    });
    b.ip(&["addr", "add", &format!("{B_IP}/24"), "dev", BR]);
    b.ip(&["link", "set", BR, "up"]);

    let mut cfg = GuestConfig::new(&daemon.socket);
    cfg.read_config = false;
    cfg.mem_size = 128 << 20;
    cfg.tx_max_frame = 65_550;
    // Linux grows its mergeable RX buffers toward a page under bulk traffic (an EWMA of packet
    // sizes); 1536 is only its floor.
    cfg.rx_buf_len = 4096;
    if offloads {
        cfg.extra_features = [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
        ]
        .iter()
        .fold(0u64, |acc, f| acc | (1u64 << f));
    }
    let mut guest = Guest::connect(cfg).expect("guest connects");
    daemon.wait_for_log("features acked", Duration::from_secs(10));
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let hdr_len = guest.hdr_len();
    let bridge_thread = std::thread::spawn(move || {
        let r = bridge(guest.pair_mut(0).unwrap(), &tap2, hdr_len, &stop2);
        if let Err(e) = &r {
            eprintln!("bridge stopped: {e}");
        }
        (guest, r)
    });

    // Deterministic bytes both ends can regenerate: byte i is table[i % PERIOD]. Sending and
    // checking are slices of a precomputed table (a memcpy and a memcmp per read), so the
    // check does not take the CPU the network path is being measured with. PERIOD is prime,
    // so no loss, duplication or reordering of whole segments lines the pattern up again.
    const PERIOD: usize = 65_521;
    const CHUNK: usize = 1 << 16;
    let table: Arc<Vec<u8>> = Arc::new(
        (0..PERIOD + CHUNK)
            .map(|i| ((i % PERIOD).wrapping_mul(2654435761) >> 13) as u8)
            .collect(),
    );
    let transfer = |server_ns: &Netns, server_ip: &'static str, client_ns: &Netns, port: u16| {
        let listener =
            server_ns.within(move || TcpListener::bind((server_ip, port)).expect("listen"));
        let expect = table.clone();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut buf = vec![0u8; CHUNK];
            let mut off = 0usize;
            loop {
                let n = s.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                let at = off % PERIOD;
                if buf[..n] != expect[at..at + n] {
                    let k = (0..n).find(|&k| buf[k] != expect[at + k]).unwrap_or(0);
                    panic!("byte {} corrupted", off + k);
                }
                off += n;
            }
            off
        });
        let table = table.clone();
        let start = Instant::now();
        let sent = client_ns.within(move || {
            let mut s = TcpStream::connect((server_ip, port)).expect("connect");
            s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut off = 0;
            while off < bytes {
                let n = CHUNK.min(bytes - off);
                let at = off % PERIOD;
                if let Err(e) = s.write_all(&table[at..at + n]) {
                    return Err(format!("write at byte {off}: {e}"));
                }
                off += n;
            }
            Ok(off)
        });
        let sent = match sent {
            Ok(n) => n,
            Err(e) => {
                eprintln!("server side:\n{}", server_ns.ip(&["-s", "link"]));
                eprintln!("client side:\n{}", client_ns.ip(&["-s", "link"]));
                eprintln!("ss client: {}", client_ns.exec(&["ss", "-tin"]));
                eprintln!("ss server: {}", server_ns.exec(&["ss", "-tin"]));
                panic!("TCP client failed: {e}");
            }
        };
        let received = match server.join() {
            Ok(r) => r,
            Err(_) => {
                eprintln!("server side:\n{}", server_ns.ip(&["-s", "link"]));
                eprintln!("client side:\n{}", client_ns.ip(&["-s", "link"]));
                eprintln!(
                    "tc client: {}",
                    run(Command::new("tc").args(["-n", &client_ns.name, "-s", "qdisc"]))
                );
                panic!("TCP server failed");
            }
        };
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(received, sent, "bytes lost on the way");
        received as f64 * 8.0 / secs / 1e9
    };
    let host_to_guest_gbps = transfer(&b, B_IP, &a, 5001);
    let guest_to_host_gbps = transfer(&a, A_IP, &b, 5002);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (guest, r) = bridge_thread.join().expect("bridge");
    r.expect("bridge ran without errors");
    drop(guest);
    let c = daemon.counters_when_idle(0);
    assert!(daemon.terminate().success(), "{}", daemon.log());
    assert_eq!(
        c["rx_dropped_oversize"] + c["tx_dropped_bad_desc"] + c["tx_dropped_tap_error"],
        0,
        "{c:?}"
    );
    TcpRun {
        host_to_guest_gbps,
        guest_to_host_gbps,
    }
}
