//! virtio-net facts this backend relies on: feature sets, header sizes and the config space.
//!
//! Feature numbers come from `virtio-bindings`; this module only decides which of them we offer and
//! what acked features mean for the tap (vnet header size, offloads) and for the rings.

use virtio_bindings::virtio_config::{VIRTIO_F_ANY_LAYOUT, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// `VHOST_USER_F_PROTOCOL_FEATURES`: a vhost-user bit, not a virtio one.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// `VHOST_F_LOG_ALL`: the backend logs its writes into guest memory (migration); a vhost bit.
pub const VHOST_F_LOG_ALL: u32 = 26;

/// Size of `virtio_net_hdr` without `num_buffers` (legacy, no MRG_RXBUF).
pub const HDR_LEN_LEGACY: usize = 10;
/// Size of `virtio_net_hdr_v1` / `virtio_net_hdr_mrg_rxbuf`.
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the 12-byte header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// Largest frame the tap can hand us with GSO: 64 KiB of IP payload plus an Ethernet and VLAN header.
pub const MAX_GSO_FRAME: usize = 65535 + 14 + 4;

pub const fn bit(n: u32) -> u64 {
    1u64 << n
}

/// Guest offloads: the tap may hand the guest frames with partial checksums or GSO.
/// Each maps to a group of `TUN_F_*` flags the kernel accepts only together (USO4 and USO6), in
/// the order their dependencies need (GSO needs CSUM, ECN needs TSO); offered only when the tap
/// accepts the group.
pub const GUEST_OFFLOADS: [(u32, u32); 7] = [
    (VIRTIO_NET_F_GUEST_CSUM, libc::TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_ECN, libc::TUN_F_TSO_ECN),
    (VIRTIO_NET_F_GUEST_UFO, libc::TUN_F_UFO),
    (VIRTIO_NET_F_GUEST_USO4, libc::TUN_F_USO4 | libc::TUN_F_USO6),
    (VIRTIO_NET_F_GUEST_USO6, libc::TUN_F_USO4 | libc::TUN_F_USO6),
];

/// Host offloads the tap takes only on some kernels: a guest that negotiated one sends frames
/// every write of which a kernel without it refuses (EINVAL). UDP segmentation came to tun's
/// writes (`virtio_net_hdr_to_skb`) in Linux 6.2, in the same series as TUN_F_USO4/6, so the
/// tap accepting those flags is the probe for it; offered only with them.
pub const HOST_OFFLOADS: [(u32, u32); 1] =
    [(VIRTIO_NET_F_HOST_USO, libc::TUN_F_USO4 | libc::TUN_F_USO6)];

/// Features that need nothing from the tap: ring layout, the host offloads every supported
/// kernel's tap accepts from us with IFF_VNET_HDR (checksum-partial, TSO, UFO), and the config
/// fields we serve.
pub fn base_features() -> u64 {
    bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_F_ANY_LAYOUT)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_HOST_TSO4)
        | bit(VIRTIO_NET_F_HOST_TSO6)
        | bit(VIRTIO_NET_F_HOST_ECN)
        | bit(VIRTIO_NET_F_HOST_UFO)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_MTU)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MQ)
        | bit(VIRTIO_NET_F_GUEST_ANNOUNCE)
        | bit(VHOST_F_LOG_ALL)
        | bit(VHOST_USER_F_PROTOCOL_FEATURES)
}

/// The virtio features to offer, given the `TUN_F_*` flags the tap accepts.
pub fn offered_features(tun_offloads: u32, pairs: usize) -> u64 {
    let mut offered = base_features();
    for &(feature, tun) in GUEST_OFFLOADS.iter().chain(HOST_OFFLOADS.iter()) {
        if tun_offloads & tun == tun {
            offered |= bit(feature);
        }
    }
    if pairs == 1 {
        offered &= !bit(virtio_bindings::virtio_net::VIRTIO_NET_F_MQ);
    }
    offered
}

/// What a set of acked features means for the data path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetFeatures {
    pub acked: u64,
}

impl NetFeatures {
    pub fn has(&self, feature: u32) -> bool {
        self.acked & bit(feature) != 0
    }

    /// The header size the guest and the tap must agree on.
    pub fn hdr_len(&self) -> usize {
        if self.has(VIRTIO_F_VERSION_1) || self.has(VIRTIO_NET_F_MRG_RXBUF) {
            HDR_LEN
        } else {
            HDR_LEN_LEGACY
        }
    }

    pub fn mrg_rxbuf(&self) -> bool {
        self.has(VIRTIO_NET_F_MRG_RXBUF)
    }

    pub fn event_idx(&self) -> bool {
        self.has(VIRTIO_RING_F_EVENT_IDX)
    }

    /// The frontend is migrating the guest: log every write into its memory.
    pub fn log_all(&self) -> bool {
        self.has(VHOST_F_LOG_ALL)
    }

    /// `TUN_F_*` flags matching the guest offloads the guest acked. The kernel takes USO only
    /// for both IP versions and ECN only with TSO, so a lone half is left out rather than failing.
    pub fn tun_offloads(&self) -> u32 {
        let mut flags = 0;
        for (f, t) in GUEST_OFFLOADS.iter() {
            if self.has(*f) {
                flags |= t;
            }
        }
        let uso = libc::TUN_F_USO4 | libc::TUN_F_USO6;
        if !(self.has(VIRTIO_NET_F_GUEST_USO4) && self.has(VIRTIO_NET_F_GUEST_USO6)) {
            flags &= !uso;
        }
        if flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) == 0 {
            flags &= !libc::TUN_F_TSO_ECN;
        }
        if flags & libc::TUN_F_CSUM == 0 {
            // Every GSO type needs checksum offload.
            flags = 0;
        }
        flags
    }

    /// The largest frame (header included) the tap may give us with these features; decides how
    /// many RX buffers are gathered before a read.
    pub fn max_rx_frame(&self, mtu: u16) -> usize {
        let gso = self.tun_offloads() & !libc::TUN_F_CSUM != 0;
        let payload = if gso {
            MAX_GSO_FRAME
        } else {
            usize::from(mtu) + 14 + 4
        };
        self.hdr_len() + payload
    }
}

/// The readable part of `struct virtio_net_config` we serve through GET_CONFIG.
#[derive(Clone, Copy, Debug)]
pub struct NetConfigSpace {
    pub mac: [u8; 6],
    pub max_queue_pairs: u16,
    pub mtu: u16,
}

impl NetConfigSpace {
    /// Serialise in the spec's layout (the bindings struct is packed and not `ByteValued`).
    /// Fields: mac[6], status, max_virtqueue_pairs, mtu, speed (unknown), duplex (unknown).
    pub fn to_bytes(self) -> [u8; 17] {
        let mut b = [0u8; 17];
        b[0..6].copy_from_slice(&self.mac);
        // A single low bit: exact.
        #[allow(clippy::cast_possible_truncation)]
        b[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        b[8..10].copy_from_slice(&self.max_queue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        b[16] = 0xff;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_length_follows_version_and_mrg_rxbuf() {
        assert_eq!(NetFeatures { acked: 0 }.hdr_len(), 10);
        let mrg = NetFeatures {
            acked: bit(VIRTIO_NET_F_MRG_RXBUF),
        };
        assert_eq!(mrg.hdr_len(), 12);
        let v1 = NetFeatures {
            acked: bit(VIRTIO_F_VERSION_1),
        };
        assert_eq!(v1.hdr_len(), 12);
    }

    #[test]
    fn gso_offloads_raise_the_rx_frame_bound() {
        let plain = NetFeatures {
            acked: bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_GUEST_CSUM),
        };
        assert_eq!(plain.max_rx_frame(1500), 12 + 1518);
        let tso = NetFeatures {
            acked: plain.acked | bit(VIRTIO_NET_F_GUEST_TSO4),
        };
        assert_eq!(tso.max_rx_frame(1500), 12 + MAX_GSO_FRAME);
        assert_eq!(tso.tun_offloads(), libc::TUN_F_CSUM | libc::TUN_F_TSO4);
    }

    #[test]
    fn config_space_layout() {
        let c = NetConfigSpace {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            max_queue_pairs: 2,
            mtu: 9000,
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..6], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), 1);
        assert_eq!(u16::from_le_bytes([b[8], b[9]]), 2);
        assert_eq!(u16::from_le_bytes([b[10], b[11]]), 9000);
    }
}
