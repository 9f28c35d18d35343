//! The host side of "no tail drop": open the tap with IFF_BACKPRESSURE when asked and available,
//! and make sure a qdisc is there to hold frames while tun's queue is stopped.
//!
//! Without the flag (a stock kernel) tun tail-drops when its ring (txqueuelen frames) is full and
//! local senders are never throttled; the daemon's own stop only moves the loss into the kernel.
//! With it, tun stops the device queue instead, the qdisc queues (and eventually the sender
//! blocks), and our reads wake the queue again. `noqueue` has no queue to stop, so the flag then
//! does nothing.

use anyhow::{bail, Context};
use log::{info, warn};

use crate::config::Backpressure;
use crate::netlink;
use crate::tap::{Tap, TapError, IFF_BACKPRESSURE};

/// How long a busy tap is waited for at start (see `Tap::open_queues_patiently`).
const BUSY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// Open the tap's queues with the backpressure mode decided from `mode` and the kernel's tun
/// `features` (TUNGETFEATURES). Returns the queues and whether IFF_BACKPRESSURE is in force.
pub fn open_tap(
    name: &str,
    queues: usize,
    mode: Backpressure,
    features: u32,
) -> anyhow::Result<(Vec<Tap>, bool)> {
    let kernel_has = features & IFF_BACKPRESSURE as u32 != 0;
    let want = match mode {
        Backpressure::Off => false,
        Backpressure::Auto => kernel_has,
        Backpressure::On if kernel_has => true,
        Backpressure::On => bail!(
            "--backpressure on: this kernel's tun has no IFF_BACKPRESSURE (TUNGETFEATURES = \
             {features:#x}, bit 0x80 absent); it needs a kernel with the tun backpressure series \
             (e.g. Linux 7.3). Use --backpressure auto or off"
        ),
    };
    let taps = match Tap::open_queues_patiently(
        name,
        queues,
        if want { IFF_BACKPRESSURE } else { 0 },
        BUSY_PATIENCE,
    ) {
        Err(TapError::Incompatible(..)) if want => {
            let hint = format!(
                "tap {name} exists and refuses IFF_BACKPRESSURE: delete it (`ip link del {name}`) \
                 so the daemon creates it, or pre-create it the same way the daemon opens it"
            );
            if mode == Backpressure::On {
                bail!("--backpressure on: {hint}");
            }
            warn!("{hint}; continuing in stock mode");
            return Ok((
                Tap::open_queues_patiently(name, queues, 0, BUSY_PATIENCE)?,
                false,
            ));
        }
        r => r?,
    };
    let in_force = want && taps[0].flags()? & IFF_BACKPRESSURE != 0;
    match (mode, kernel_has, in_force) {
        (_, _, true) => info!(
            "backpressure on: tap {name} has IFF_BACKPRESSURE; a full tun ring stops the queue \
             instead of dropping"
        ),
        (Backpressure::Off, _, _) => {
            info!("backpressure off (--backpressure off): tun tail-drops when its ring is full")
        }
        (_, false, _) => info!(
            "backpressure off (stock mode): this kernel's tun lacks IFF_BACKPRESSURE \
             (TUNGETFEATURES = {features:#x}); frames are tail-dropped in tun when the guest is \
             slower than the senders"
        ),
        (_, true, false) => warn!(
            "backpressure off: the kernel offers IFF_BACKPRESSURE but tap {name} did not take it"
        ),
    }
    Ok((taps, in_force))
}

/// `--qdisc KIND`: install the tap's root qdisc.
pub fn install_qdisc(name: &str, kind: &str) -> anyhow::Result<()> {
    let idx = netlink::ifindex(name)?;
    netlink::replace_root_qdisc(idx, kind).with_context(|| {
        format!("--qdisc {kind}: installing it on tap {name} (is the sch_{kind} module available?)")
    })?;
    info!("tap {name}: root qdisc {kind} installed");
    Ok(())
}

/// Warn when backpressure is in force but the tap has no queue to hold frames. Runs at start and
/// whenever a frontend connects (an operator may have changed the qdisc meanwhile).
pub fn check_qdisc(name: &str, backpressure: bool) {
    if !backpressure {
        return;
    }
    let state = netlink::ifindex(name).and_then(|i| {
        let up = netlink::link_counters(i)?.up;
        Ok((up, netlink::root_qdisc(i)?))
    });
    match state {
        // A tap that is down has no qdisc yet; the kernel attaches the default one at link-up,
        // and the check runs again when a frontend connects.
        Ok((false, _)) => {}
        Ok((true, None)) => warn!(
            "tap {name} has no qdisc (noqueue): IFF_BACKPRESSURE has nothing to hold frames in and \
             tun will still drop; fix: `tc qdisc replace dev {name} root fq_codel` (or start with \
             --qdisc fq_codel)"
        ),
        Ok((true, Some(q))) => {
            info!(
                "tap {name}: root qdisc {} holds frames under backpressure",
                q.kind
            )
        }
        Err(e) => warn!("tap {name}: cannot read its qdisc: {e}"),
    }
}
