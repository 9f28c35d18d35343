//! Datagrams between the host side of the daemon's tap (a socket in the namespace, HOST_IP) and
//! the synthetic guest (GUEST_IP), numbered so that each one is checked byte for byte and in
//! order. Every wait has a deadline ([`WAIT`]).

use std::net::{SocketAddrV4, UdpSocket};
use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use super::{Netns, GUEST_IP, GUEST_MAC, GUEST_PORT, HOST_IP, HOST_PORT, TAP, WAIT};
use crate::{FrameSpec, Guest, GuestConfig, UdpFlow};

/// The kit's guest: the defaults (mergeable buffers, EVENT_IDX, one queue pair) for the daemon
/// at `socket`, without reading the device config space.
pub fn guest_config(socket: &Path) -> GuestConfig {
    let mut cfg = GuestConfig::new(socket);
    cfg.read_config = false;
    cfg
}

/// Datagram `i`: `"dgram <i> "` and a pattern, 16 to 1415 bytes (a different length for each
/// neighbour, so a frame cut short or run together shows).
pub fn payload(i: usize) -> Vec<u8> {
    let len = 16 + (i * 37) % 1400;
    let mut p = format!("dgram {i:08} ").into_bytes();
    p.extend((0..len - p.len().min(len)).map(|k| (k as u8).wrapping_mul(31).wrapping_add(i as u8)));
    p
}

/// The number in a [`payload`].
pub fn payload_index(p: &[u8]) -> usize {
    String::from_utf8_lossy(&p[6..14])
        .parse()
        .unwrap_or_else(|e| panic!("not a numbered datagram ({e}): {p:?}"))
}

/// The UDP payload of a frame sent from the host to GUEST_IP:GUEST_PORT, if it is one.
pub fn udp_payload_to_guest(frame: &[u8]) -> Option<Vec<u8>> {
    if frame.len() < 42 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let udp = 14 + ihl;
    let dport = u16::from_be_bytes([frame[udp + 2], frame[udp + 3]]);
    let ulen = usize::from(u16::from_be_bytes([frame[udp + 4], frame[udp + 5]]));
    let guest: std::net::Ipv4Addr = GUEST_IP.parse().unwrap();
    (dport == GUEST_PORT && frame[30..34] == guest.octets())
        .then(|| frame[udp + 8..udp + ulen].to_vec())
}

/// Send datagrams `range` ([`payload`]) from `host` to GUEST_IP:GUEST_PORT.
pub fn send_to_guest(host: &UdpSocket, range: Range<usize>) {
    let dst = SocketAddrV4::new(GUEST_IP.parse().unwrap(), GUEST_PORT);
    for i in range {
        host.send_to(&payload(i), dst).expect("send to guest");
    }
}

/// Receive until `want` datagrams for the guest's port arrived (other frames are counted in the
/// second value), reposting one buffer per harvested frame if `repost`. Fails after [`WAIT`].
pub fn receive(g: &mut Guest, want: usize, repost: bool) -> (Vec<Vec<u8>>, usize) {
    let mut got = Vec::new();
    let mut other = 0;
    let deadline = Instant::now() + WAIT;
    while got.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "only {} of {want} datagrams arrived (a stall?)",
            got.len()
        );
        g.wait_interrupt(0, left).expect("wait");
        let n = g
            .poll_rx(|frame, _| match udp_payload_to_guest(frame) {
                Some(p) => got.push(p),
                None => other += 1,
            })
            .expect("poll rx");
        if repost && n > 0 {
            g.post_rx_buffers(n).expect("repost");
        }
    }
    (got, other)
}

/// `got` are datagrams `first`, `first + 1`, ... exactly as the host sent them.
pub fn assert_in_order(got: &[Vec<u8>], first: usize) {
    for (k, p) in got.iter().enumerate() {
        assert!(
            *p == payload(first + k),
            "datagram {} differs from what the host sent (got {:?}...)",
            first + k,
            String::from_utf8_lossy(&p[..p.len().min(16)])
        );
    }
}

/// Host → guest: fill the guest's RX ring, send datagrams `range` and check that each arrives,
/// byte-exact and in order, and nothing else does.
pub fn host_to_guest(host: &UdpSocket, g: &mut Guest, range: Range<usize>) {
    g.post_rx_buffers(usize::MAX).expect("post RX buffers");
    send_to_guest(host, range.clone());
    let (got, other) = receive(g, range.len(), true);
    assert_eq!(
        other, 0,
        "frames other than the test's datagrams reached the guest"
    );
    assert_in_order(&got, range.start);
}

/// UDP frames from GUEST_IP:GUEST_PORT to HOST_IP:HOST_PORT, addressed to the MAC of the tap in
/// `ns`, as a guest sends them to the host.
pub fn guest_to_host_spec(ns: &Netns) -> FrameSpec {
    let tap_mac = vhost_user_tap::config::parse_mac(&ns.mac(TAP)).unwrap();
    FrameSpec {
        dst_mac: tap_mac,
        src_mac: GUEST_MAC,
        udp: Some(UdpFlow {
            src: format!("{GUEST_IP}:{GUEST_PORT}").parse().unwrap(),
            dst: format!("{HOST_IP}:{HOST_PORT}").parse().unwrap(),
        }),
    }
}

/// Guest → host: send `n` UDP frames, frame `seq` `len(seq)` bytes long, each once the TX ring
/// has room (within [`WAIT`]), and check that `host` (bound to HOST_IP:HOST_PORT) receives each,
/// from GUEST_IP:GUEST_PORT, byte-exact, before the next is sent.
pub fn guest_to_host(
    ns: &Netns,
    host: &UdpSocket,
    g: &mut Guest,
    n: u64,
    len: impl Fn(u64) -> usize,
) {
    let spec = guest_to_host_spec(ns);
    host.set_read_timeout(Some(WAIT)).unwrap();
    let (mut frame, mut buf) = (Vec::new(), [0u8; 2048]);
    for seq in 0..n {
        spec.build(len(seq), 0, seq, &mut frame).unwrap();
        let deadline = Instant::now() + WAIT;
        while !g.send_frame(&frame).unwrap() {
            assert!(Instant::now() < deadline, "TX ring never drained");
            g.wait_interrupt(1, WAIT).unwrap();
        }
        let (got, from) = host
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {seq} from the guest: {e}"));
        assert_eq!(from.to_string(), format!("{GUEST_IP}:{GUEST_PORT}"));
        assert_eq!(&buf[..got], &frame[14 + 20 + 8..], "datagram {seq} differs");
    }
}
