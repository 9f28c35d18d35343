//! Command line and the validated daemon configuration.
//!
//! Follows QEMU's vhost-user "backend program conventions": `--socket-path` xor `--fd`,
//! `--print-capabilities`, no self-daemonizing, fail early with a non-zero status.

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::{ArgGroup, Parser};
use thiserror::Error;

use crate::metrics::MetricsAddr;
use crate::tap;

/// Whether to ask tun to stop its queue instead of tail-dropping (IFF_BACKPRESSURE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backpressure {
    /// Use it when the kernel has it.
    Auto,
    /// Require it; fail on a kernel without it.
    On,
    /// Never (stock tail-drop behaviour).
    Off,
}

/// A vhost-user network backend: moves frames between a Linux tap and a guest's virtio-net rings.
///
/// Log levels are set with RUST_LOG (error, warn, info, debug, trace); default info. Every option
/// can also be set in the environment as VHOST_USER_TAP_<OPTION> (e.g. VHOST_USER_TAP_TAP=vut0,
/// VHOST_USER_TAP_NO_SECCOMP=1; empty means unset); the command line wins. Under systemd socket
/// activation (LISTEN_FDS) the inherited socket is used and neither --socket-path nor --fd is
/// needed.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-tap", version)]
#[command(group(ArgGroup::new("listen").args(["socket_path", "fd"])))]
pub struct Args {
    /// Unix socket to listen on for the vhost-user frontend (QEMU). Created at start, removed at
    /// exit.
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,

    /// An already listening unix socket inherited from the parent (e.g. systemd), by fd number.
    #[arg(long, value_name = "FDNUM")]
    pub fd: Option<RawFd>,

    /// Give the socket created by --socket-path this group (name or number) and mode 0660, on
    /// every start, so a frontend running as a member of the group (libvirt's QEMU runs as
    /// libvirt-qemu) can connect. Without it the socket has the daemon's user and group and the
    /// umask's mode. Under systemd the .socket unit's SocketGroup= does this instead.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Tap device to use; created when missing, attached when it exists (a tap pre-created with
    /// `ip tuntap add NAME mode tap user U vnet_hdr` lets the daemon run without privileges).
    #[arg(long, value_name = "NAME")]
    pub tap: Option<String>,

    /// MAC address served in the virtio-net config space (GET_CONFIG) to frontends that read it.
    /// QEMU does not: it takes the MAC from `-device virtio-net-pci,mac=`. Setting this makes the
    /// daemon offer the CONFIG protocol feature.
    #[arg(long, value_name = "MAC")]
    pub mac: Option<String>,

    /// MTU offered to the guest (VIRTIO_NET_F_MTU).
    #[arg(long, value_name = "N", default_value_t = 1500)]
    pub mtu: u16,

    /// Queue pairs (RX+TX virtqueues), each served by its own thread and its own tap queue
    /// (IFF_MULTI_QUEUE when more than one). QEMU: `-netdev vhost-user,queues=N` and
    /// `-device virtio-net-pci,mq=on,vectors=2N+2`.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queues: usize,

    /// Before sleeping, spin up to this many microseconds polling the tap and the guest's rings
    /// (like vhost-net's busyloop_timeout): lower latency for a core's worth of CPU. 0: off.
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub busy_poll_us: u64,

    /// Write TX frames with one writev each instead of batches through io_uring (which is used
    /// when the kernel allows it; see the README on how the rings are locked down).
    #[arg(long)]
    pub no_io_uring: bool,

    /// Largest virtqueue size accepted from the frontend (power of two; a split ring has at
    /// most 32768 entries, which DPDK's virtio-user may ask for). A ring set to a larger size is
    /// refused and does not run.
    #[arg(long, value_name = "N", default_value_t = 32768)]
    pub queue_size: u16,

    /// IFF_BACKPRESSURE: with it (Linux 7.3+) a full tun ring stops the tap's queue and its qdisc
    /// holds the frames instead of tun tail-dropping them. auto: use it when the kernel has it.
    #[arg(long, value_enum, default_value_t = Backpressure::Auto)]
    pub backpressure: Backpressure,

    /// Install this root qdisc on the tap at start (e.g. fq_codel, pfifo), like
    /// `tc qdisc replace dev TAP root KIND`. Backpressure needs a qdisc to hold frames.
    #[arg(long, value_name = "KIND")]
    pub qdisc: Option<String>,

    /// Serve Prometheus metrics at GET /metrics on IP:PORT or unix:PATH.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<MetricsAddr>,

    /// Print the backend's capabilities as JSON (vhost-user convention) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Do not install the seccomp syscall allow-list. By default it is applied once the tap and
    /// the listener are set up; a syscall outside it then fails with EPERM.
    #[arg(long)]
    pub no_seccomp: bool,
}

/// Prefix of the environment variables that stand in for options: `--socket-path` is
/// `VHOST_USER_TAP_SOCKET_PATH`, `--tap` is `VHOST_USER_TAP_TAP`. The command line wins.
pub const ENV_PREFIX: &str = "VHOST_USER_TAP_";

/// The environment variable that stands in for `--long-name`.
pub fn env_name(long: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        long.to_ascii_uppercase().replace('-', "_")
    )
}

impl Args {
    /// The command line parser with every option also read from the environment ([`env_name`]),
    /// so a systemd unit can take its settings from an `EnvironmentFile=`. A variable set to the
    /// empty string counts as unset (`VHOST_USER_TAP_MAC=` in a config file); flags take
    /// 1/0, true/false, yes/no, on/off.
    pub fn command_with_env() -> clap::Command {
        use clap::builder::BoolishValueParser;
        use clap::{ArgAction, CommandFactory};
        Args::command().mut_args(|a| {
            let Some(var) = a.get_long().map(env_name) else {
                return a;
            };
            if std::env::var_os(&var).is_some_and(|v| v.is_empty()) {
                return a;
            }
            let a = a.env(var);
            match a.get_action() {
                ArgAction::SetTrue => a.value_parser(BoolishValueParser::new()),
                _ => a,
            }
        })
    }

    /// Parse the process's command line and environment.
    pub fn try_parse_with_env() -> Result<Args, clap::Error> {
        use clap::FromArgMatches;
        Args::from_arg_matches(&Args::command_with_env().try_get_matches()?)
    }
}

/// Where the frontend connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Path(PathBuf),
    Fd(RawFd),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    /// Group id for the socket file (`--socket-group`; only with `Listen::Path`).
    pub socket_group: Option<u32>,
    pub tap: String,
    pub mac: [u8; 6],
    /// Offer the CONFIG protocol feature (only when --mac was given).
    pub serve_config: bool,
    pub mtu: u16,
    pub queue_size: u16,
    pub queue_pairs: usize,
    pub busy_poll_us: u64,
    pub io_uring: bool,
    pub backpressure: Backpressure,
    pub qdisc: Option<String>,
    pub metrics: Option<MetricsAddr>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("one of --socket-path or --fd is required")]
    NoListener,
    #[error("--tap is required")]
    NoTap,
    #[error("--tap: {0}")]
    BadTap(String),
    #[error("--mac {0:?}: expected six hex bytes like 52:54:00:12:34:56, unicast")]
    BadMac(String),
    #[error("--mtu {0}: must be between 68 and 65535")]
    BadMtu(u16),
    #[error("--queue-size {0}: must be a power of two between 2 and 32768")]
    BadQueueSize(u16),
    #[error("--fd {0}: must be an inherited descriptor number of 3 or more")]
    BadFd(RawFd),
    #[error("--queues {0}: must be between 1 and {MAX_QUEUE_PAIRS}")]
    BadQueues(usize),
    #[error("--busy-poll-us {0}: at most 1000000")]
    BadBusyPoll(u64),
    #[error("--qdisc {0:?}: expected a qdisc kind such as fq_codel or pfifo")]
    BadQdisc(String),
    #[error("--socket-group {0:?}: no such group")]
    NoSuchGroup(String),
    #[error("--socket-group {0:?}: looking up the group failed: {1}")]
    GroupLookup(String, String),
    #[error(
        "--socket-group applies to the socket the daemon creates (--socket-path); an inherited \
         socket keeps the group it was given (systemd: SocketGroup= in the .socket unit)"
    )]
    SocketGroupNeedsPath,
}

/// The gid of `group`, a group name or a number.
fn resolve_group(group: &str) -> Result<u32, ConfigError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(ConfigError::NoSuchGroup(group.to_string())),
        Err(e) => Err(ConfigError::GroupLookup(group.to_string(), e.to_string())),
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return None;
    }
    Some(mac)
}

/// A stable, locally administered MAC for a tap name, so a restarted daemon offers the same one.
pub fn mac_for_tap(name: &str) -> [u8; 6] {
    // FNV-1a: tiny, deterministic across builds (unlike std's randomly keyed hasher).
    let h = name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    let b = h.to_le_bytes();
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, ConfigError> {
        let listen = match (a.socket_path, a.fd) {
            (Some(p), None) => Listen::Path(p),
            (None, Some(fd)) if fd >= 3 => Listen::Fd(fd),
            (None, Some(fd)) => return Err(ConfigError::BadFd(fd)),
            _ => return Err(ConfigError::NoListener),
        };
        let socket_group = match (&a.socket_group, &listen) {
            (None, _) => None,
            (Some(g), Listen::Path(_)) => Some(resolve_group(g)?),
            (Some(_), Listen::Fd(_)) => return Err(ConfigError::SocketGroupNeedsPath),
        };
        let tap = a.tap.ok_or(ConfigError::NoTap)?;
        tap::validate_name(&tap).map_err(|e| ConfigError::BadTap(e.to_string()))?;
        let serve_config = a.mac.is_some();
        let mac = match a.mac {
            Some(m) => parse_mac(&m).ok_or(ConfigError::BadMac(m))?,
            None => mac_for_tap(&tap),
        };
        if a.mtu < 68 {
            return Err(ConfigError::BadMtu(a.mtu));
        }
        if !a.queue_size.is_power_of_two() || a.queue_size < 2 || a.queue_size > 32768 {
            return Err(ConfigError::BadQueueSize(a.queue_size));
        }
        if a.queues == 0 || a.queues > MAX_QUEUE_PAIRS {
            return Err(ConfigError::BadQueues(a.queues));
        }
        if a.busy_poll_us > 1_000_000 {
            return Err(ConfigError::BadBusyPoll(a.busy_poll_us));
        }
        if let Some(q) = &a.qdisc {
            let ok = !q.is_empty()
                && q.len() < 16
                && q.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return Err(ConfigError::BadQdisc(q.clone()));
            }
        }
        Ok(Config {
            listen,
            socket_group,
            tap,
            mac,
            serve_config,
            mtu: a.mtu,
            queue_size: a.queue_size,
            queue_pairs: a.queues,
            busy_poll_us: a.busy_poll_us,
            io_uring: !a.no_io_uring,
            backpressure: a.backpressure,
            qdisc: a.qdisc,
            metrics: a.metrics,
        })
    }
}

/// Most queue pairs: tun allows 256 queues; a worker thread each makes more pointless here.
pub const MAX_QUEUE_PAIRS: usize = 64;

/// What `--print-capabilities` prints: the vhost-user schema defines no features for `net`.
pub const CAPABILITIES_JSON: &str = "{\"type\": \"net\"}";

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["vhost-user-tap"];
        v.extend_from_slice(args);
        Config::try_from(Args::try_parse_from(v).expect("clap accepts"))
    }

    #[test]
    fn minimal_command_line_is_accepted_with_defaults() {
        let c = parse(&["--socket-path", "/tmp/s", "--tap", "vut0"]).unwrap();
        assert_eq!(c.listen, Listen::Path("/tmp/s".into()));
        assert_eq!(c.mtu, 1500);
        assert_eq!(c.queue_size, 32768);
        assert_eq!(c.mac, mac_for_tap("vut0"));
        assert_eq!(c.backpressure, Backpressure::Auto);
        assert_eq!(c.metrics, None);
        assert_eq!(c.mac[0] & 0x03, 0x02, "locally administered unicast");
    }

    #[test]
    fn socket_path_and_fd_are_mutually_exclusive() {
        let v = ["x", "--socket-path", "/s", "--fd", "3", "--tap", "t"];
        assert!(Args::try_parse_from(v).is_err());
        assert_eq!(parse(&["--tap", "t"]).unwrap_err(), ConfigError::NoListener);
        assert_eq!(
            parse(&["--fd", "1", "--tap", "t"]).unwrap_err(),
            ConfigError::BadFd(1)
        );
        assert_eq!(
            parse(&["--fd", "3", "--tap", "t"]).unwrap().listen,
            Listen::Fd(3)
        );
    }

    #[test]
    fn each_bad_value_is_rejected_with_its_own_error() {
        let base = ["--socket-path", "/s", "--tap", "t"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            parse(&v).unwrap_err()
        };
        assert_eq!(
            with(&["--mac", "01:00:00:00:00:01"]),
            ConfigError::BadMac("01:00:00:00:00:01".into())
        );
        assert_eq!(
            with(&["--mac", "52:54:00:00:00"]),
            ConfigError::BadMac("52:54:00:00:00".into())
        );
        assert_eq!(with(&["--mtu", "10"]), ConfigError::BadMtu(10));
        assert_eq!(
            with(&["--queue-size", "100"]),
            ConfigError::BadQueueSize(100)
        );
        assert!(matches!(
            parse(&["--socket-path", "/s", "--tap", "a/b"]).unwrap_err(),
            ConfigError::BadTap(_)
        ));
        assert_eq!(
            parse(&["--socket-path", "/s"]).unwrap_err(),
            ConfigError::NoTap
        );
        assert_eq!(with(&["--queues", "0"]), ConfigError::BadQueues(0));
        assert_eq!(with(&["--queues", "65"]), ConfigError::BadQueues(65));
        assert_eq!(
            with(&["--busy-poll-us", "2000000"]),
            ConfigError::BadBusyPoll(2_000_000)
        );
        assert_eq!(
            with(&["--qdisc", "fq codel"]),
            ConfigError::BadQdisc("fq codel".into())
        );
        assert_eq!(
            with(&["--socket-group", "no-such-group-vut"]),
            ConfigError::NoSuchGroup("no-such-group-vut".into())
        );
        assert_eq!(
            parse(&["--fd", "3", "--tap", "t", "--socket-group", "0"]).unwrap_err(),
            ConfigError::SocketGroupNeedsPath
        );
    }

    #[test]
    fn socket_group_takes_a_name_or_a_number() {
        let with = |g: &str| parse(&["--socket-path", "/s", "--tap", "t", "--socket-group", g]);
        assert_eq!(with("root").unwrap().socket_group, Some(0));
        assert_eq!(with("4242").unwrap().socket_group, Some(4242));
        assert_eq!(
            parse(&["--socket-path", "/s", "--tap", "t"])
                .unwrap()
                .socket_group,
            None
        );
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:aB:cd:EF"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
        );
        assert_eq!(parse_mac("52:54:00:ab:cd:ef:01"), None);
        assert_eq!(parse_mac("52-54-00-ab-cd-ef"), None);
    }
}
