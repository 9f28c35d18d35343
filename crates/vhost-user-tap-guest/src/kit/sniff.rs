//! Frames of one ethertype seen on a namespace's links (an AF_PACKET socket), and the check of a
//! RARP announce among them.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Duration;

use super::Netns;

/// EtherType of RARP, what SEND_RARP writes.
pub const ETH_P_RARP: u16 = 0x8035;

/// An AF_PACKET socket in a namespace that receives every frame of one ethertype on its links.
pub struct Sniffer(File);

impl Sniffer {
    pub fn open(ns: &Netns, ethertype: u16) -> Sniffer {
        Sniffer(ns.within(move || {
            // SAFETY: plain socket(2); the fd is checked and then owned by the File.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(ethertype.to_be()),
                )
            };
            assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` is a fresh socket owned by nobody else.
            unsafe { File::from_raw_fd(fd) }
        }))
    }

    /// The next frame, or None after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            return None;
        }
        let mut buf = [0u8; 2048];
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(n).ok().map(|n| buf[..n].to_vec())
    }
}

/// `frame` is the announce SEND_RARP asks for: a minimum-size broadcast RARP "reverse request"
/// from `mac` naming `mac` as sender and target.
pub fn assert_rarp(frame: &[u8], mac: [u8; 6]) {
    assert_eq!(
        frame.len(),
        60,
        "a minimum-size Ethernet frame: {frame:02x?}"
    );
    assert_eq!(&frame[..6], &[0xff; 6], "broadcast: {frame:02x?}");
    assert_eq!(&frame[6..12], &mac, "from the VM's MAC: {frame:02x?}");
    assert_eq!(
        &frame[12..14],
        &ETH_P_RARP.to_be_bytes(),
        "ethertype RARP: {frame:02x?}"
    );
    assert_eq!(&frame[20..22], &[0, 3], "reverse request: {frame:02x?}");
    assert_eq!(
        &frame[22..28],
        &mac,
        "sender hardware address: {frame:02x?}"
    );
    assert_eq!(
        &frame[32..38],
        &mac,
        "target hardware address: {frame:02x?}"
    );
}
