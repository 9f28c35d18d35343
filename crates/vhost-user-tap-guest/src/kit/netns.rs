//! Network namespaces of our own and what tests do in them: taps, sockets, kernel counters.

use std::fs::File;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::Ordering;

use super::{run, GUEST_IP, GUEST_MAC, HOST_IP, SEQ};

/// A network namespace of our own, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "vut-{}-{}-{}",
            tag,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        // No IPv6 autoconfiguration noise on the tap: tests count frames exactly.
        for key in ["all", "default"] {
            ns.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
            ]);
        }
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn exec(&self, args: &[&str]) -> String {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    pub fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Bring the daemon's tap up with the host address and a permanent neighbour entry for the
    /// guest, so the host stack sends without ARP.
    pub fn configure_tap(&self, tap: &str) {
        self.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", tap]);
        self.ip(&["link", "set", tap, "up"]);
        let mac = GUEST_MAC
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        self.ip(&[
            "neigh",
            "replace",
            GUEST_IP,
            "lladdr",
            &mac,
            "dev",
            tap,
            "nud",
            "permanent",
        ]);
    }

    /// Run `f` on a thread that has entered this namespace; sockets it creates stay in it.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_within(f).join().expect("netns thread")
    }

    /// Like `within`, without waiting for the thread.
    pub fn spawn_within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a valid netns fd only changes this thread's namespace.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    pub fn udp_socket(&self, bind: &str) -> UdpSocket {
        let bind = bind.to_string();
        self.within(move || UdpSocket::bind(&bind).unwrap_or_else(|e| panic!("bind {bind}: {e}")))
    }

    /// The tap's kernel counters (`ip -s -j link`).
    pub fn link_stats(&self, dev: &str) -> LinkStats {
        let out = self.ip(&["-s", "-j", "link", "show", dev]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
        let s = &v[0]["stats64"];
        let get = |dir: &str, k: &str| {
            s[dir][k]
                .as_u64()
                .unwrap_or_else(|| panic!("no {dir} {k} in `ip -s -j link show {dev}`: {out}"))
        };
        LinkStats {
            tx_packets: get("tx", "packets"),
            tx_dropped: get("tx", "dropped"),
            rx_packets: get("rx", "packets"),
            rx_dropped: get("rx", "dropped"),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkStats {
    /// Frames the kernel handed to the tap's reader (our daemon), i.e. consumed from the ring.
    pub tx_packets: u64,
    /// Frames tun dropped (ring full, among others).
    pub tx_dropped: u64,
    pub rx_packets: u64,
    pub rx_dropped: u64,
}
