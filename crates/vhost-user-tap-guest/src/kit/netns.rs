//! Network namespaces of our own and what tests do in them: taps, sockets, pings, kernel
//! counters.

use std::ffi::OsStr;
use std::fs::File;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, Once};

use super::{mac_string, run, unique_name, GUEST_IP, GUEST_MAC, HOST_IP};

/// A network namespace of our own, deleted on drop (after the persistent taps made with
/// [`Netns::add_tap`]).
pub struct Netns {
    pub name: String,
    /// Persistent taps to delete before the namespace goes: a persistent tap would otherwise
    /// keep its name until the kernel has finished tearing the namespace down.
    taps: Mutex<Vec<String>>,
}

impl Netns {
    /// A fresh namespace `vut-<tag>-<pid>-<n>` with `lo` up and IPv6 off. The first one of a
    /// test process also deletes namespaces left by earlier test processes that were killed
    /// before they could clean up.
    pub fn new(tag: &str) -> Netns {
        static STALE: Once = Once::new();
        STALE.call_once(remove_stale);
        let name = unique_name(tag);
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns {
            name,
            taps: Mutex::new(Vec::new()),
        };
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

    /// `ip netns exec <name> <program>`, to add arguments to and run.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// `program` as user nobody (group nogroup, no other groups, no capabilities) in this
    /// namespace, with a private /dev/net/tun anyone may open (as distributions ship it; this
    /// machine's is 0600) in a mount namespace of its own, so the host's /dev is untouched.
    /// `prelude` is shell run first (e.g. `export VAR=...`); `$$` is the program's pid.
    pub fn unprivileged(&self, prelude: &str, program: impl AsRef<OsStr>) -> Command {
        let mut c = self.command("unshare");
        c.args(["-m", "sh", "-c"]).arg(format!(
            "mount -t tmpfs tmpfs /dev/net && mknod -m 666 /dev/net/tun c 10 200 && {prelude} \
             exec setpriv --reuid=nobody --regid=nogroup --clear-groups \"$0\" \"$@\""
        ));
        c.arg(program);
        c
    }

    /// Run `args` in the namespace; its stdout (a failure fails the test).
    pub fn exec(&self, args: &[&str]) -> String {
        let (program, rest) = args.split_first().expect("a program");
        run(self.command(program).args(rest))
    }

    /// `ip -n <name> <args>`; its stdout (a failure fails the test).
    pub fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Like `ip`, for diagnostics that must not fail: the output, or the error.
    pub fn try_ip(&self, args: &[&str]) -> String {
        match Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
        {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("ip -n {} {args:?}: {e}", self.name),
        }
    }

    /// A persistent tap `name` (`ip tuntap add <name> mode tap <extra>`), deleted before the
    /// namespace.
    pub fn add_tap(&self, name: &str, extra: &[&str]) {
        let mut args = vec!["tuntap", "add", "dev", name, "mode", "tap"];
        args.extend_from_slice(extra);
        self.ip(&args);
        self.taps.lock().unwrap().push(name.to_string());
    }

    /// Whether a link `dev` exists in the namespace.
    pub fn has_link(&self, dev: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", dev])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The MAC address of `dev` ("aa:bb:cc:dd:ee:ff").
    pub fn mac(&self, dev: &str) -> String {
        let out = self.ip(&["-j", "link", "show", dev]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
        v[0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("no address in `ip -j link show {dev}`: {out}"))
            .to_string()
    }

    /// `ping -c <count> -i 0.2 -w <wait_secs> <ip>` from the namespace: how many were sent and
    /// answered.
    pub fn ping(&self, ip: &str, count: u32, wait_secs: u32) -> Ping {
        let out = self
            .command("ping")
            .args(["-q", "-n", "-c", &count.to_string(), "-i", "0.2"])
            .args(["-w", &wait_secs.to_string(), ip])
            .stdin(Stdio::null())
            .output()
            .expect("running ping (Debian package iputils-ping)");
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ping::from_output(output)
    }

    /// Bring the daemon's tap up with the host address and a permanent neighbour entry for the
    /// guest, so the host stack sends without ARP.
    pub fn configure_tap(&self, tap: &str) {
        self.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", tap]);
        self.ip(&["link", "set", tap, "up"]);
        let mac = mac_string(&GUEST_MAC);
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
        for tap in self.taps.lock().unwrap().iter() {
            let _ = Command::new("ip")
                .args(["-n", &self.name, "link", "del", tap])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// Deletes namespaces named as the kit names them (`vut-<tag>-<pid>-<n>`) whose test process is
/// gone and in which no process runs: left by a test run that was killed.
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parts = name.rsplitn(3, '-');
        let (Some(n), Some(pid), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if !rest.starts_with("vut-")
            || n.parse::<u64>().is_err()
            || pid.parse::<u32>().is_err()
            || Path::new("/proc").join(pid).exists()
        {
            continue;
        }
        let in_use = Command::new("ip")
            .args(["netns", "pids", &name])
            .output()
            .map_or(true, |o| !o.status.success() || !o.stdout.is_empty());
        if !in_use {
            let _ = Command::new("ip").args(["netns", "delete", &name]).status();
        }
    }
}

/// What `ping` reported.
#[derive(Debug, Clone)]
pub struct Ping {
    pub transmitted: u32,
    pub received: u32,
    /// ping's summary line ("3 packets transmitted, 3 received, ...").
    pub summary: String,
    /// Everything it printed.
    pub output: String,
}

impl Ping {
    /// Read ping's summary: "3 packets transmitted, 3 received, 0% packet loss, time 402ms"
    /// (iputils; busybox says "3 packets received"). Counts it does not show are 0.
    fn from_output(output: String) -> Ping {
        let summary = output
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_default()
            .to_string();
        // The number in the comma-separated part that names `word`.
        let count = |word: &str| -> u32 {
            summary
                .split(',')
                .find(|part| part.split_whitespace().any(|w| w == word))
                .and_then(|part| part.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        Ping {
            transmitted: count("transmitted"),
            received: count("received"),
            summary,
            output,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Ping;

    #[test]
    fn ping_summaries_of_iputils_and_busybox_are_read() {
        let p = Ping::from_output(
            "PING x\n\n--- 10.77.0.2 ping statistics ---\n\
             4 packets transmitted, 3 received, 25% packet loss, time 402ms\n"
                .into(),
        );
        assert_eq!((p.transmitted, p.received), (4, 3));
        let p = Ping::from_output("3 packets transmitted, 3 packets received, 0% loss".into());
        assert_eq!((p.transmitted, p.received), (3, 3));
        let p = Ping::from_output("ping: connect: Network is unreachable".into());
        assert_eq!((p.transmitted, p.received), (0, 0));
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
