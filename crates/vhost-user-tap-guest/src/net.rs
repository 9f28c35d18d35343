//! virtio-net pieces the synthetic guest needs: feature bits, the vnet header, and building /
//! recognising test frames (Ethernet, optionally IPv4/UDP).

use std::net::SocketAddrV4;

/// `VIRTIO_NET_F_CSUM`.
pub const VIRTIO_NET_F_CSUM: u32 = 0;
/// `VIRTIO_NET_F_GUEST_CSUM`.
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
/// `VIRTIO_NET_F_MTU`.
pub const VIRTIO_NET_F_MTU: u32 = 3;
/// `VIRTIO_NET_F_MAC`.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// `VIRTIO_NET_F_GUEST_TSO4`.
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
/// `VIRTIO_NET_F_MRG_RXBUF`.
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
/// `VIRTIO_NET_F_STATUS`.
pub const VIRTIO_NET_F_STATUS: u32 = 16;
/// `VIRTIO_NET_F_MQ` (needs a control queue; never acked by this guest).
pub const VIRTIO_NET_F_MQ: u32 = 22;
/// VIRTIO_NET_F_GUEST_ANNOUNCE: the guest announces itself after a migration.
pub const VIRTIO_NET_F_GUEST_ANNOUNCE: u32 = 21;
/// VHOST_F_LOG_ALL: the backend logs its guest-memory writes (during a migration).
pub const VHOST_F_LOG_ALL: u32 = 26;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;

/// Size of `virtio_net_config` (mac, status, max_virtqueue_pairs, mtu, speed, duplex, rss…).
pub const VIRTIO_NET_CONFIG_SIZE: usize = 24;

pub use vhost_user_tap::virtio_net::bit;

/// Deliberately independent of the daemon's `NetFeatures::hdr_len`: the guest checks the
/// daemon against its own reading of the spec.
///
/// vnet header length for the negotiated features: 12 bytes with VERSION_1 or MRG_RXBUF
/// (`virtio_net_hdr_v1` / `virtio_net_hdr_mrg_rxbuf`), 10 bytes for a legacy device without.
pub fn vnet_hdr_len(features: u64) -> usize {
    if features & (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)) != 0 {
        12
    } else {
        10
    }
}

/// The virtio-net header (`virtio_net_hdr_v1`; `num_buffers` is 0 for 10-byte headers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VirtioNetHdr {
    /// `flags` (NEEDS_CSUM, DATA_VALID, RSC_INFO).
    pub flags: u8,
    /// `gso_type`.
    pub gso_type: u8,
    /// `hdr_len`.
    pub hdr_len: u16,
    /// `gso_size`.
    pub gso_size: u16,
    /// `csum_start`.
    pub csum_start: u16,
    /// `csum_offset`.
    pub csum_offset: u16,
    /// `num_buffers` (mergeable RX buffers; 12-byte header only).
    pub num_buffers: u16,
}

impl VirtioNetHdr {
    /// Parse a 10- or 12-byte header (little endian). Returns None if `b` is too short.
    pub fn parse(b: &[u8], hdr_len: usize) -> Option<Self> {
        if b.len() < hdr_len || hdr_len < 10 {
            return None;
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: if hdr_len >= 12 { u16_at(10) } else { 0 },
        })
    }

    /// Serialise into `out` (10 or 12 bytes).
    pub fn write(&self, out: &mut [u8]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        if out.len() >= 12 {
            out[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        }
    }
}

/// The parts of `virtio_net_config` the guest reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetConfig {
    /// `mac`.
    pub mac: [u8; 6],
    /// `status` (bit 0: link up).
    pub status: u16,
    /// `max_virtqueue_pairs`.
    pub max_virtqueue_pairs: u16,
    /// `mtu`.
    pub mtu: u16,
}

impl NetConfig {
    /// Parse the little-endian config space (at least 10 bytes used).
    pub fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < 10 {
            return None;
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[0..6]);
        Some(NetConfig {
            mac,
            status: u16::from_le_bytes([b[6], b[7]]),
            max_virtqueue_pairs: u16::from_le_bytes([b[8], b[9]]),
            mtu: if b.len() >= 12 {
                u16::from_le_bytes([b[10], b[11]])
            } else {
                0
            },
        })
    }
}

/// Errors building frames or parsing frame options.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The requested frame size cannot hold the headers and the tag.
    #[error("frame size {size} is too small: at least {min} bytes are needed for the headers and the sequence tag")]
    TooSmall {
        /// Requested size.
        size: usize,
        /// Minimum.
        min: usize,
    },
    /// IPv4/UDP frames are limited by the 16-bit IPv4 total length.
    #[error("frame size {size} is too large for IPv4/UDP (max {max})")]
    TooLarge {
        /// Requested size.
        size: usize,
        /// Maximum.
        max: usize,
    },
    /// A MAC address did not parse.
    #[error("invalid MAC address {0:?} (expected aa:bb:cc:dd:ee:ff)")]
    BadMac(String),
    /// A UDP flow spec did not parse.
    #[error("invalid UDP flow {0:?} (expected SRC_IP:PORT->DST_IP:PORT, e.g. 10.0.0.2:5000->10.0.0.1:6000)")]
    BadUdp(String),
}

/// Parse `aa:bb:cc:dd:ee:ff` (or with `-`). Not the daemon's `config::parse_mac`, which takes
/// only a unicast NIC address: frames may be sent to broadcast and multicast ones.
pub fn parse_mac(s: &str) -> Result<[u8; 6], FrameError> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(FrameError::BadMac(s.to_string()));
    }
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return Err(FrameError::BadMac(s.to_string()));
        }
        mac[i] = u8::from_str_radix(p, 16).map_err(|_| FrameError::BadMac(s.to_string()))?;
    }
    Ok(mac)
}

/// Format a MAC address.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An IPv4/UDP flow `SRC_IP:PORT->DST_IP:PORT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpFlow {
    /// Source (the guest).
    pub src: SocketAddrV4,
    /// Destination.
    pub dst: SocketAddrV4,
}

impl std::str::FromStr for UdpFlow {
    type Err = FrameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || FrameError::BadUdp(s.to_string());
        let (a, b) = s.split_once("->").ok_or_else(bad)?;
        Ok(UdpFlow {
            src: a.trim().parse().map_err(|_| bad())?,
            dst: b.trim().parse().map_err(|_| bad())?,
        })
    }
}

/// Ethertype used for raw (non-IP) test frames: IEEE 802 local experimental 1.
pub const ETHERTYPE_EXPERIMENTAL: u16 = 0x88b5;
/// Ethertype IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// Magic at the start of every test payload.
pub const TAG_MAGIC: [u8; 4] = *b"VUTG";
/// Tag length: magic, pair (u16 BE), sequence (u64 BE).
pub const TAG_LEN: usize = 14;
const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

/// What test frames look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameSpec {
    /// Destination MAC (default broadcast).
    pub dst_mac: [u8; 6],
    /// Source MAC (the guest's).
    pub src_mac: [u8; 6],
    /// IPv4/UDP flow; None → raw frames with ethertype 0x88b5.
    pub udp: Option<UdpFlow>,
}

impl Default for FrameSpec {
    fn default() -> Self {
        FrameSpec {
            dst_mac: [0xff; 6],
            src_mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            udp: None,
        }
    }
}

impl FrameSpec {
    /// Offset of the tag inside a frame.
    pub fn payload_offset(&self) -> usize {
        if self.udp.is_some() {
            ETH_HLEN + IPV4_HLEN + UDP_HLEN
        } else {
            ETH_HLEN
        }
    }

    /// Smallest frame that holds headers and tag.
    pub fn min_size(&self) -> usize {
        self.payload_offset() + TAG_LEN
    }

    /// Build a `size`-byte frame carrying (`pair`, `seq`) into `out` (cleared first).
    /// IPv4 frames get a correct header checksum and UDP checksum 0.
    pub fn build(
        &self,
        size: usize,
        pair: u16,
        seq: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        let min = self.min_size();
        if size < min {
            return Err(FrameError::TooSmall { size, min });
        }
        if self.udp.is_some() && size - ETH_HLEN > usize::from(u16::MAX) {
            return Err(FrameError::TooLarge {
                size,
                max: usize::from(u16::MAX) + ETH_HLEN,
            });
        }
        out.clear();
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        match self.udp {
            None => out.extend_from_slice(&ETHERTYPE_EXPERIMENTAL.to_be_bytes()),
            Some(flow) => {
                out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
                let total = (size - ETH_HLEN) as u16;
                let mut ip = [0u8; IPV4_HLEN];
                ip[0] = 0x45;
                ip[2..4].copy_from_slice(&total.to_be_bytes());
                ip[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
                ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
                ip[8] = 64;
                ip[9] = 17;
                ip[12..16].copy_from_slice(&flow.src.ip().octets());
                ip[16..20].copy_from_slice(&flow.dst.ip().octets());
                let csum = ipv4_checksum(&ip);
                ip[10..12].copy_from_slice(&csum.to_be_bytes());
                out.extend_from_slice(&ip);
                let udp_len = total - IPV4_HLEN as u16;
                out.extend_from_slice(&flow.src.port().to_be_bytes());
                out.extend_from_slice(&flow.dst.port().to_be_bytes());
                out.extend_from_slice(&udp_len.to_be_bytes());
                out.extend_from_slice(&0u16.to_be_bytes());
            }
        }
        out.extend_from_slice(&TAG_MAGIC);
        out.extend_from_slice(&pair.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        let fill = seq as u8;
        let mut i = 0u8;
        while out.len() < size {
            out.push(fill.wrapping_add(i));
            i = i.wrapping_add(1);
        }
        Ok(())
    }
}

/// Find a test tag (pair, sequence) in a raw or IPv4/UDP frame.
pub fn parse_tag(frame: &[u8]) -> Option<(u16, u64)> {
    if frame.len() < ETH_HLEN {
        return None;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let off = match ethertype {
        ETHERTYPE_EXPERIMENTAL => ETH_HLEN,
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(*frame.get(ETH_HLEN)? & 0x0f) * 4;
            if *frame.get(ETH_HLEN + 9)? != 17 {
                return None;
            }
            ETH_HLEN + ihl + UDP_HLEN
        }
        _ => return None,
    };
    let tag = frame.get(off..off + TAG_LEN)?;
    if tag[0..4] != TAG_MAGIC {
        return None;
    }
    let pair = u16::from_be_bytes([tag[4], tag[5]]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&tag[6..14]);
    Some((pair, u64::from_be_bytes(seq)))
}

/// Turn an IPv4/UDP request into its reply in place: Ethernet, IPv4 and UDP source and
/// destination swapped, so the sender's socket accepts it. The IPv4 and UDP checksums stay valid
/// without recomputing them: both are one's-complement sums, which do not depend on the order of
/// the words swapped. `partial_csum` (the frame came with VIRTIO_NET_HDR_F_NEEDS_CSUM: the UDP
/// checksum field holds only the pseudo-header's sum) zeroes the UDP checksum ("none" in IPv4),
/// so the reply can go out with a plain header whatever offloads were negotiated. Returns false,
/// leaving the frame as it was, if it is not an IPv4/UDP frame.
pub fn udp_echo_reply(frame: &mut [u8], partial_csum: bool) -> bool {
    if frame.len() < ETH_HLEN + IPV4_HLEN + UDP_HLEN
        || frame[12..14] != ETHERTYPE_IPV4.to_be_bytes()
        || frame[ETH_HLEN + 9] != 17
    {
        return false;
    }
    let udp = ETH_HLEN + usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    if udp < ETH_HLEN + IPV4_HLEN || frame.len() < udp + UDP_HLEN {
        return false;
    }
    let (dst, src) = frame[..12].split_at_mut(6);
    dst.swap_with_slice(src);
    let (src_ip, dst_ip) = frame[ETH_HLEN + 12..ETH_HLEN + 20].split_at_mut(4);
    src_ip.swap_with_slice(dst_ip);
    let (sport, dport) = frame[udp..udp + 4].split_at_mut(2);
    sport.swap_with_slice(dport);
    if partial_csum {
        frame[udp + 6..udp + 8].fill(0);
    }
    true
}

/// RFC 1071 checksum of an IPv4 header (checksum field must be zero or is included).
pub fn ipv4_checksum(hdr: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in hdr.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: 0,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 6,
            num_buffers: 3,
        };
        let mut b = [0u8; 12];
        h.write(&mut b);
        assert_eq!(VirtioNetHdr::parse(&b, 12), Some(h));
        let mut b10 = [0u8; 10];
        h.write(&mut b10);
        assert_eq!(
            VirtioNetHdr::parse(&b10, 10),
            Some(VirtioNetHdr {
                num_buffers: 0,
                ..h
            })
        );
        assert_eq!(VirtioNetHdr::parse(&b[..9], 10), None);
        assert_eq!(vnet_hdr_len(bit(VIRTIO_F_VERSION_1)), 12);
        assert_eq!(vnet_hdr_len(bit(VIRTIO_NET_F_MRG_RXBUF)), 12);
        assert_eq!(vnet_hdr_len(0), 10);
    }

    #[test]
    fn udp_frame_is_valid_ipv4() {
        let spec = FrameSpec {
            udp: Some("10.0.0.2:5000->10.0.0.1:6000".parse().unwrap()),
            ..FrameSpec::default()
        };
        let mut f = Vec::new();
        spec.build(100, 3, 0x1_0000_0007, &mut f).unwrap();
        assert_eq!(f.len(), 100);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        // Header checksum verifies to zero.
        assert_eq!(ipv4_checksum(&f[14..34]), 0);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 86);
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 5000);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 6000);
        assert_eq!(u16::from_be_bytes([f[38], f[39]]), 66);
        assert_eq!(parse_tag(&f), Some((3, 0x1_0000_0007)));
        assert!(matches!(
            spec.build(50, 0, 0, &mut f),
            Err(FrameError::TooSmall { min: 56, .. })
        ));
    }

    #[test]
    fn udp_echo_reply_swaps_and_keeps_checksums() {
        let spec = FrameSpec {
            udp: Some("10.0.0.2:5000->10.0.0.1:6000".parse().unwrap()),
            ..FrameSpec::default()
        };
        let mut f = Vec::new();
        spec.build(80, 0, 9, &mut f).unwrap();
        // A UDP checksum over the pseudo-header, header and payload, as a sender computes it.
        let udp_sum = |f: &[u8]| {
            let mut words = Vec::new();
            words.extend_from_slice(&f[26..34]);
            words.extend_from_slice(&[0, 17]);
            words.extend_from_slice(&f[38..40]);
            words.extend_from_slice(&f[34..]);
            ipv4_checksum(&words)
        };
        let sum = udp_sum(&f);
        f[40..42].copy_from_slice(&sum.to_be_bytes());
        let req = f.clone();
        assert!(udp_echo_reply(&mut f, false));
        assert_eq!(&f[0..6], &req[6..12]);
        assert_eq!(&f[6..12], &req[0..6]);
        assert_eq!(&f[26..30], &req[30..34]);
        assert_eq!(&f[30..34], &req[26..30]);
        assert_eq!(&f[34..36], &req[36..38]);
        assert_eq!(&f[36..38], &req[34..36]);
        assert_eq!(ipv4_checksum(&f[14..34]), 0);
        assert_eq!(udp_sum(&f), 0, "the checksum verifies after the swap");
        assert_eq!(parse_tag(&f), Some((0, 9)));
        assert!(udp_echo_reply(&mut f, true));
        assert_eq!(&f[..40], &req[..40]);
        assert_eq!(&f[40..42], &[0, 0]);
        let mut raw = Vec::new();
        FrameSpec::default().build(60, 0, 1, &mut raw).unwrap();
        let before = raw.clone();
        assert!(!udp_echo_reply(&mut raw, false));
        assert_eq!(raw, before);
        assert!(!udp_echo_reply(&mut f[..30], false));
    }

    #[test]
    fn raw_frame_and_parsers() {
        let spec = FrameSpec::default();
        let mut f = Vec::new();
        spec.build(60, 1, 42, &mut f).unwrap();
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(parse_tag(&f), Some((1, 42)));
        assert_eq!(parse_tag(&f[..20]), None);
        assert_eq!(
            parse_mac("52:54:00:AA:bb:0c").unwrap(),
            [0x52, 0x54, 0, 0xaa, 0xbb, 0x0c]
        );
        assert!(parse_mac("52:54:00:aa:bb").is_err());
        assert_eq!(format_mac(&[0x52, 0x54, 0, 1, 2, 3]), "52:54:00:01:02:03");
        assert!("1.2.3.4:5->x".parse::<UdpFlow>().is_err());
        let cfg = NetConfig::parse(&[1, 2, 3, 4, 5, 6, 1, 0, 2, 0, 0xdc, 0x05]).unwrap();
        assert_eq!(cfg.mac, [1, 2, 3, 4, 5, 6]);
        assert_eq!((cfg.status, cfg.max_virtqueue_pairs, cfg.mtu), (1, 2, 1500));
    }
}
