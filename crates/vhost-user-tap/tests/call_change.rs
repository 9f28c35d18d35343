//! A new call eventfd (SET_VRING_CALL) for a ring that has run gets an interrupt at once.
//!
//! Why: QEMU starts a vhost ring with SET_VRING_KICK and only then sends the guest's real call
//! eventfd (`vhost_virtqueue_start`: kick, then unmask = SET_VRING_CALL), discarding whatever
//! was signalled on the one before (its masked notifier, given at init). The daemon runs a ring
//! from SET_VRING_KICK on, so frames already waiting in the tap (a migration destination on a
//! daemon that served the VM before has some) are delivered in between and their interrupt is
//! lost; the next interrupt decision then looks only at what is published later, against a
//! `used_event` the guest left behind those frames: it never fires, and the guest's RX stalls
//! for good. Seen under QEMU 10.0.2 in 2 of 9 round trips A -> B -> A of
//! `tests/qemu_migration.rs` (daemon A delivered the 31 frames left in its tap that way).
//!
//! Needs root (a namespace and a tap); VUT_SKIP_ROOT=1 skips (prints SKIPPED).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use vhost_user_tap_guest::kit::*;
use vhost_user_tap_guest::vhost_user::req;

fn eventfd() -> File {
    // SAFETY: plain eventfd(2); the fd is checked and then owned by the File.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    unsafe { File::from_raw_fd(fd) }
}

fn signalled_within(fd: &File, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    r > 0
}

#[test]
fn a_new_call_fd_is_signalled_for_frames_delivered_before_it_came() {
    if !root_or_skip("call-change") {
        return;
    }
    let ns = Netns::new("call-change");
    let mut d = Daemon::start(&ns, TAP, &[]);
    ns.configure_tap(TAP);
    let mut g = d.connect_guest();
    let host = ns.udp_socket(&format!("{HOST_IP}:{HOST_PORT}"));
    let to = format!("{GUEST_IP}:{GUEST_PORT}");

    // A frame delivered and announced the ordinary way.
    g.post_rx_buffers(usize::MAX).unwrap();
    host.send_to(b"first", &to).unwrap();
    assert!(
        g.wait_interrupt(0, WAIT).unwrap(),
        "an interrupt for the first frame"
    );
    let mut got = 0;
    g.poll_rx(|_, _| got += 1).unwrap();
    assert_eq!(got, 1);

    // A frame delivered while the frontend is about to replace the call fd: its interrupt goes
    // to the old one, which the frontend drops (read here and forgotten, as QEMU does).
    let before = g.used_index(0).unwrap();
    host.send_to(b"second", &to).unwrap();
    let deadline = Instant::now() + WAIT;
    while g.used_index(0).unwrap() == before {
        assert!(
            Instant::now() < deadline,
            "the second frame was not delivered"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = g.wait_interrupt(0, Duration::from_millis(100)).unwrap();

    let call = eventfd();
    g.send_vring_fd_raw(req::SET_VRING_CALL, 0, &call).unwrap();
    assert!(
        signalled_within(&call, WAIT),
        "the new call fd got no interrupt: the guest never learns of the frame delivered \
         before it came"
    );
}
