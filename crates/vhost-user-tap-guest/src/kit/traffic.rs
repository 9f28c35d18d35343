//! Traffic between the host side of the daemon's tap and the synthetic guest.

use super::{Netns, GUEST_IP, GUEST_MAC, GUEST_PORT, HOST_IP, HOST_PORT, TAP};

/// UDP frames from GUEST_IP:GUEST_PORT to HOST_IP:HOST_PORT, addressed to the MAC of the tap in
/// `ns`, as a guest sends them to the host.
pub fn guest_to_host_spec(ns: &Netns) -> crate::FrameSpec {
    let out = ns.ip(&["-j", "link", "show", TAP]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tap_mac = vhost_user_tap::config::parse_mac(v[0]["address"].as_str().unwrap()).unwrap();
    crate::FrameSpec {
        dst_mac: tap_mac,
        src_mac: GUEST_MAC,
        udp: Some(crate::UdpFlow {
            src: format!("{GUEST_IP}:{GUEST_PORT}").parse().unwrap(),
            dst: format!("{HOST_IP}:{HOST_PORT}").parse().unwrap(),
        }),
    }
}
