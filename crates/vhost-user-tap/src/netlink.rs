//! The kernel's view of the tap, over rtnetlink: link counters (tun's ring tail-drops show up as
//! the tap's `tx_dropped`), the root qdisc's counters, and installing a root qdisc.
//!
//! Only the control path and the metrics scrape use this; one short-lived socket per call keeps it
//! free of shared state.

use std::io;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::tc::{
    TcAttribute, TcFqCodelXstats, TcHandle, TcMessage, TcStats2, TcXstats,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(io::Error),
    #[error("no interface named {0}")]
    NoSuchLink(String),
    #[error("kernel refused {what}: {err}")]
    Refused { what: &'static str, err: io::Error },
    #[error("malformed netlink reply: {0}")]
    Decode(String),
}

/// Kernel counters of a network interface (IFLA_STATS64).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Frames the kernel handed to the tap's reader (consumed by us).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames tun dropped on their way to us: ring full (tail drop) among others.
    pub tx_dropped: u64,
    /// Frames we wrote into the tap.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    /// IFF_UP: a down device has no qdisc yet (the kernel attaches the default one at link-up).
    pub up: bool,
}

/// Counters of the tap's root qdisc.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QdiscCounters {
    pub kind: String,
    pub packets: u64,
    pub drops: u64,
    /// Drops because the queue was over its limit (fq_codel: drop_overlimit + drop_overmemory;
    /// other qdiscs: every drop). The rest of `drops` are AQM policy drops.
    pub limit_drops: u64,
    /// The qdisc does active queue management (fq_codel): some drops are its policy.
    pub aqm: bool,
    pub requeues: u64,
    pub overlimits: u64,
    pub backlog_bytes: u64,
    pub backlog_packets: u64,
}

impl QdiscCounters {
    /// Drops the qdisc's active queue management chose (fq_codel's CoDel), not forced by a full
    /// queue.
    pub fn aqm_drops(&self) -> u64 {
        self.drops.saturating_sub(self.limit_drops)
    }
}

pub fn ifindex(name: &str) -> Result<u32, NetlinkError> {
    let c = std::ffi::CString::new(name).map_err(|_| NetlinkError::NoSuchLink(name.into()))?;
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(NetlinkError::NoSuchLink(name.into())),
        i => Ok(i),
    }
}

/// Send one request and collect every reply message until DONE (dumps) or the ACK.
fn request(
    msg: RouteNetlinkMessage,
    flags: u16,
    what: &'static str,
) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
    sock.bind_auto().map_err(NetlinkError::Socket)?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(NetlinkError::Socket)?;
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = 1;
    let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    sock.send(&buf, 0).map_err(NetlinkError::Socket)?;

    let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
    let mut out = Vec::new();
    let mut rbuf = vec![0u8; 64 * 1024];
    loop {
        let n = sock
            .recv(&mut &mut rbuf[..], 0)
            .map_err(NetlinkError::Socket)?;
        let mut off = 0;
        while off < n {
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rbuf[off..n])
                .map_err(|e| NetlinkError::Decode(e.to_string()))?;
            let len = m.header.length as usize;
            match m.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(out),
                        Some(code) => Err(NetlinkError::Refused {
                            what,
                            err: io::Error::from_raw_os_error(-code.get()),
                        }),
                    };
                }
                NetlinkPayload::InnerMessage(inner) => {
                    out.push(inner);
                    if !dump && flags & NLM_F_ACK == 0 {
                        return Ok(out);
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += len;
        }
    }
}

pub fn link_counters(ifindex: u32) -> Result<LinkCounters, NetlinkError> {
    let mut lm = LinkMessage::default();
    lm.header.index = ifindex;
    let replies = request(
        RouteNetlinkMessage::GetLink(lm),
        NLM_F_REQUEST,
        "RTM_GETLINK",
    )?;
    for r in replies {
        if let RouteNetlinkMessage::NewLink(l) = r {
            let up = l
                .header
                .flags
                .contains(netlink_packet_route::link::LinkFlags::Up);
            for a in l.attributes {
                if let LinkAttribute::Stats64(s) = a {
                    return Ok(LinkCounters {
                        tx_packets: s.tx_packets,
                        tx_bytes: s.tx_bytes,
                        tx_dropped: s.tx_dropped,
                        rx_packets: s.rx_packets,
                        rx_bytes: s.rx_bytes,
                        rx_dropped: s.rx_dropped,
                        up,
                    });
                }
            }
        }
    }
    Err(NetlinkError::Decode(
        "RTM_NEWLINK without IFLA_STATS64".into(),
    ))
}

/// The root qdisc of `ifindex`; `None` when it has none of its own (noqueue).
pub fn root_qdisc(ifindex: u32) -> Result<Option<QdiscCounters>, NetlinkError> {
    let replies = request(
        RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
        NLM_F_REQUEST | NLM_F_DUMP,
        "RTM_GETQDISC",
    )?;
    for r in replies {
        let RouteNetlinkMessage::NewQueueDiscipline(m) = r else {
            continue;
        };
        if i32::try_from(ifindex) != Ok(m.header.index) || m.header.parent != TcHandle::ROOT {
            continue;
        }
        let mut q = QdiscCounters::default();
        let mut fq_codel_limit = None;
        for a in m.attributes {
            match a {
                TcAttribute::Kind(k) => q.kind = k,
                TcAttribute::Stats2(stats) => {
                    for s in stats {
                        match s {
                            TcStats2::Basic(b) => q.packets = u64::from(b.packets),
                            TcStats2::Queue(s) => {
                                q.drops = u64::from(s.drops);
                                q.requeues = u64::from(s.requeues);
                                q.overlimits = u64::from(s.overlimits);
                                q.backlog_bytes = u64::from(s.backlog);
                                q.backlog_packets = u64::from(s.qlen);
                            }
                            _ => {}
                        }
                    }
                }
                TcAttribute::Xstats(TcXstats::FqCodel(TcFqCodelXstats::Qdisc(x))) => {
                    fq_codel_limit =
                        Some(u64::from(x.drop_overlimit) + u64::from(x.drop_overmemory));
                }
                _ => {}
            }
        }
        if q.kind == "noqueue" {
            return Ok(None);
        }
        q.aqm = fq_codel_limit.is_some();
        q.limit_drops = fq_codel_limit.unwrap_or(q.drops);
        return Ok(Some(q));
    }
    Ok(None)
}

/// `tc qdisc replace dev <ifindex> root <kind>` with the kind's defaults.
pub fn replace_root_qdisc(ifindex: u32, kind: &str) -> Result<(), NetlinkError> {
    let mut m = TcMessage::default();
    m.header.index = i32::try_from(ifindex)
        .map_err(|_| NetlinkError::NoSuchLink(format!("ifindex {ifindex}")))?;
    m.header.parent = TcHandle::ROOT;
    m.attributes.push(TcAttribute::Kind(kind.to_string()));
    request(
        RouteNetlinkMessage::NewQueueDiscipline(m),
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        "RTM_NEWQDISC",
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_counters_are_readable() {
        // Every network namespace has lo; reading it needs no privileges.
        let idx = ifindex("lo").expect("lo exists");
        link_counters(idx).expect("RTM_GETLINK on lo");
        assert!(matches!(
            ifindex("no-such-if0"),
            Err(NetlinkError::NoSuchLink(_))
        ));
    }

    #[test]
    fn aqm_drops_are_what_the_limit_did_not_force() {
        let q = QdiscCounters {
            drops: 10,
            limit_drops: 3,
            ..Default::default()
        };
        assert_eq!(q.aqm_drops(), 7);
    }
}
