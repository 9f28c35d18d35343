//! SEND_RARP on a daemon that served a frontend before: the RARP must come out of the tap as
//! a well-formed frame whatever the new frontend has negotiated so far.
//!
//! Why: a migration's destination QEMU sends SEND_RARP from its announce rounds, and the first
//! of them comes before it starts the device, so before SET_FEATURES. Migrating a VM back to a
//! host (A -> B -> A), or restoring a saved VM on the daemon it ran on, puts such a QEMU on a
//! daemon whose tap still has the vnet header length of the previous frontend: the header
//! written in front of the RARP must be the tap's length, not the one the (still empty)
//! features imply, or tun takes the frame's first bytes for header and the bridge learns a
//! garbage MAC instead of the VM's.
//!
//! Needs root (a namespace and a tap); VUT_SKIP_ROOT=1 skips (prints SKIPPED).

use vhost_user_tap_guest::kit::*;
use vhost_user_tap_guest::vhost_user::{proto, Connection};

#[test]
fn a_rarp_sent_before_the_features_of_a_second_frontend_is_a_well_formed_frame() {
    if !root_or_skip("rarp-2nd") {
        return;
    }
    let ns = Netns::new("rarp-2nd");
    let mut d = Daemon::start(&ns, TAP, &[]);
    ns.configure_tap(TAP);

    // The first frontend negotiates the 12-byte header (VERSION_1, MRG_RXBUF), as QEMU does,
    // and goes away: the tap keeps that length.
    let mut first = d.connect(guest_config(&d.socket));
    assert_eq!(
        first.hdr_len(),
        12,
        "the first frontend uses the 12-byte header"
    );
    first.disconnect().unwrap();
    d.wait_for_log("frontend disconnected", WAIT);

    // The second one gets as far as QEMU's destination before the device starts, then asks
    // for the announce.
    let sniffer = Sniffer::open(&ns, ETH_P_RARP);
    let mut c = Connection::connect(&d.socket, WAIT, WAIT).expect("connect");
    c.get_features().unwrap();
    let pf = c.get_protocol_features().unwrap();
    assert!(pf & proto::RARP != 0, "RARP offered");
    // REPLY_ACK: SEND_RARP returns once the daemon has written and counted the announce.
    c.set_protocol_features(pf & (proto::RARP | proto::LOG_SHMFD | proto::MQ | proto::REPLY_ACK))
        .unwrap();
    c.set_reply_ack(true);
    c.set_owner().unwrap();
    let mac = [0x52, 0x54, 0x00, 0x11, 0x22, 0x33];
    c.send_rarp(mac).unwrap();

    let frame = sniffer.recv(WAIT).expect("a RARP frame on the tap");
    assert_rarp(&frame, mac);
    let m = scrape(d.metrics_path());
    assert_eq!(m.get("vhost_user_tap_rarp_announces_total"), Some(&1.0));
}
