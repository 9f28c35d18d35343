//! The announce after a migration (SEND_RARP): a RARP broadcast from the guest's MAC, written
//! into the tap as if the guest had sent it, so a bridge or switch learns the VM's new port at
//! once. QEMU asks for it only for guests that did not negotiate VIRTIO_NET_F_GUEST_ANNOUNCE
//! (those announce themselves), and builds the same frame for its own tap backend.

use std::time::{Duration, Instant};

/// EtherType of RARP.
const ETH_P_RARP: u16 = 0x8035;
/// ARP opcode "reverse request".
const RARP_REQUEST: u16 = 3;
/// Shortest Ethernet frame without its FCS: the RARP is padded to it.
pub const FRAME_LEN: usize = 60;

/// Announces a frontend may ask for in a burst, and how fast the allowance comes back. QEMU
/// asks once per announce round (5 rounds over about 1.5 s by default, more with
/// `announce-self`); a frontend asking faster would only flood the host's bridge with
/// broadcasts.
pub const BURST: u32 = 10;
pub const REFILL: Duration = Duration::from_millis(100);

/// A token bucket for SEND_RARP.
pub struct Budget {
    tokens: u32,
    since: Instant,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            tokens: BURST,
            since: Instant::now(),
        }
    }
}

impl Budget {
    /// Take one announce if the budget allows it now.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.since);
        let refills =
            u32::try_from(elapsed.as_nanos() / REFILL.as_nanos()).map_or(BURST, |r| r.min(BURST));
        if refills > 0 {
            self.tokens = (self.tokens + refills).min(BURST);
            self.since = if self.tokens == BURST {
                now
            } else {
                self.since + REFILL * refills
            };
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// A RARP request "who is `mac`" from `mac` to everyone.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    // Ethernet hardware, IPv4 protocol, address lengths 6 and 4.
    f[14..16].copy_from_slice(&1u16.to_be_bytes());
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&RARP_REQUEST.to_be_bytes());
    // Sender and target hardware addresses are the guest's; both protocol addresses unknown (0).
    f[22..28].copy_from_slice(&mac);
    f[32..38].copy_from_slice(&mac);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announces_come_in_bursts_of_ten_then_one_per_refill() {
        let mut b = Budget::default();
        let t0 = Instant::now();
        assert!((0..BURST).all(|_| b.take(t0)));
        assert!(!b.take(t0), "the burst is spent");
        assert!(!b.take(t0 + REFILL / 2));
        assert!(b.take(t0 + REFILL), "one back per refill");
        assert!(!b.take(t0 + REFILL));
        let later = t0 + REFILL * 100;
        assert!(
            (0..BURST).all(|_| b.take(later)),
            "a full burst after a pause"
        );
        assert!(!b.take(later));
    }

    #[test]
    fn the_rarp_names_the_mac_as_sender_and_target_and_goes_to_everyone() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let f = rarp_frame(mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &mac);
        assert!(f[38..].iter().all(|&b| b == 0));
    }
}
