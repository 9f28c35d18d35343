//! High-level traffic mode used by the `vhost-user-tap-guest` binary: keep the RX ring full and
//! harvest (optionally at a limited rate, like a slow guest), send N tagged frames, stop on a
//! deadline / when TX is done and RX is idle / on a stop flag. One thread per queue pair.
//! Or echo mode: every IPv4/UDP frame received goes straight back to its sender, the guest of a
//! request/response latency benchmark.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::frontend::Guest;
use super::net::{
    parse_tag, udp_echo_reply, FrameError, FrameSpec, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
};
use super::queue::{QueueError, QueuePair, QueueStats};

/// What to do.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Stop after this long (None: no time limit).
    pub duration: Option<Duration>,
    /// Harvest at most this many RX frames per second in total (0: as fast as possible).
    pub rx_rate: u64,
    /// Stop once this many frames were received in total.
    pub rx_frames: Option<u64>,
    /// Recycle RX buffers without reading the frames (the XDP-drop equivalent).
    pub rx_drop: bool,
    /// Send one pre-built frame from buffers written once (pktgen's clone_skb); see
    /// `QueuePair::send_prefilled`.
    pub tx_prefilled: bool,
    /// Once all TX frames are queued, stop after this long without RX frames or TX completions.
    pub idle: Duration,
    /// Frames to send in total (spread over the pairs).
    pub tx_frames: u64,
    /// Frame size (Ethernet header included, vnet header excluded).
    pub tx_size: usize,
    /// Send at most this many frames per second in total (0: as fast as possible).
    pub tx_rate: u64,
    /// Frames per `send_frames` call (one kick decision per batch).
    pub tx_batch: usize,
    /// Frame contents.
    pub frame: FrameSpec,
    /// Echo mode instead of the above (RX rate and TX settings do not apply): each IPv4/UDP
    /// frame is sent back as it arrives, addresses swapped ([`udp_echo_reply`]).
    pub echo: Option<EchoWait>,
}

/// How the echo mode waits for the next frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EchoWait {
    /// Sleep on the RX interrupt (the call eventfd), as a guest's NAPI does.
    Interrupt,
    /// Spin on the used ring with interrupts off, as a guest with busy polling (or DPDK) does:
    /// no wake-up on the way, for a CPU's worth of spinning.
    Poll,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            duration: None,
            rx_rate: 0,
            rx_frames: None,
            rx_drop: false,
            tx_prefilled: false,
            idle: Duration::from_millis(500),
            tx_frames: 0,
            tx_size: 64,
            tx_rate: 0,
            tx_batch: 1,
            frame: FrameSpec::default(),
            echo: None,
        }
    }
}

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad run parameters.
    #[error("invalid run parameters: {0}")]
    Frame(#[from] FrameError),
    /// A queue pair failed.
    #[error("queue pair {pair}: {source}")]
    Queue {
        /// Pair index.
        pair: u16,
        /// Cause.
        #[source]
        source: QueueError,
    },
    /// Invalid configuration.
    #[error("invalid run parameters: {0}")]
    Config(String),
}

/// Why the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// The duration elapsed.
    Duration,
    /// All TX frames were sent and RX/TX went idle.
    TxDone,
    /// The RX frame target was reached.
    RxFrames,
    /// The stop flag was raised (signal).
    Signal,
    /// A pair failed.
    Error,
}

/// Result of a run; serialised as the binary's JSON line.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunReport {
    /// Frames received.
    pub rx_frames: u64,
    /// Bytes received (without vnet header).
    pub rx_bytes: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Bytes sent (without vnet header).
    pub tx_bytes: u64,
    /// Kick eventfd writes.
    pub kicks: u64,
    /// Call eventfd wakeups with a counter > 0.
    pub interrupts: u64,
    /// Wall time of the traffic phase.
    pub elapsed_secs: f64,
    /// Why the run ended.
    pub stop_reason: StopReason,
    /// Received frames that carried a guest tag (e.g. looped back).
    pub rx_tagged: u64,
    /// Echo mode: replies sent.
    pub echoed: u64,
    /// Echo mode: frames received and not answered (not IPv4/UDP, or GSO).
    pub echo_skipped: u64,
    /// TX chains completed by the backend.
    pub tx_completed: u64,
    /// TX chains still owned by the backend at the end.
    pub tx_in_flight: u64,
    /// Detailed counters.
    pub stats: QueueStats,
    /// GET_VRING_BASE answers at disconnect (filled in by the caller).
    pub vring_bases: Option<Vec<u32>>,
    /// Error that ended the run, if any.
    pub error: Option<String>,
}

struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Self {
        Bucket {
            rate,
            burst: burst.max(1.0),
            tokens: 1.0,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    fn available(&self) -> usize {
        self.tokens.max(0.0).floor() as usize
    }

    fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    fn until_next(&self) -> Duration {
        if self.tokens >= 1.0 || self.rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(((1.0 - self.tokens) / self.rate).max(0.0001))
    }
}

struct Shared<'a> {
    stop: &'a AtomicBool,
    local_stop: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    rx_total: AtomicU64,
    echoed: AtomicU64,
    echo_skipped: AtomicU64,
    tx_pending_pairs: AtomicUsize,
    deadline: Option<Instant>,
}

impl Shared<'_> {
    fn finish(&self, r: StopReason) {
        let mut g = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(r);
        }
        self.local_stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        if self.stop.load(Ordering::SeqCst) {
            self.finish(StopReason::Signal);
            return true;
        }
        self.local_stop.load(Ordering::SeqCst)
    }
}

struct PairPlan {
    tx_frames: u64,
    rx_rate: f64,
    tx_rate: f64,
}

/// Run traffic on every pair of `guest` until a stop condition; `stop` is polled at least every
/// 100 ms (set it from a signal handler).
pub fn run(guest: &mut Guest, cfg: &RunConfig, stop: &AtomicBool) -> Result<RunReport, RunError> {
    if cfg.echo.is_some() && (cfg.tx_frames > 0 || cfg.rx_drop || cfg.rx_rate > 0) {
        return Err(RunError::Config(
            "echo mode sends only replies: no TX frames, RX drop or RX rate with it".into(),
        ));
    }
    if cfg.tx_frames > 0 {
        if cfg.tx_size < cfg.frame.min_size() {
            return Err(FrameError::TooSmall {
                size: cfg.tx_size,
                min: cfg.frame.min_size(),
            }
            .into());
        }
        let max = guest.pair(0).map(|p| p.tx_max_frame()).unwrap_or(0);
        if cfg.tx_size > max {
            return Err(RunError::Config(format!(
                "TX frame size {} exceeds the maximum frame size {max}",
                cfg.tx_size
            )));
        }
    }
    let npairs = guest.num_pairs() as u64;
    let start = Instant::now();
    let shared = Shared {
        stop,
        local_stop: AtomicBool::new(false),
        reason: Mutex::new(None),
        rx_total: AtomicU64::new(0),
        echoed: AtomicU64::new(0),
        echo_skipped: AtomicU64::new(0),
        tx_pending_pairs: AtomicUsize::new(npairs as usize),
        deadline: cfg.duration.map(|d| start + d),
    };
    let mut results: Vec<Result<u64, RunError>> = Vec::new();
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for pair in guest.pairs_mut().iter_mut() {
            let p = u64::from(pair.index());
            let plan = PairPlan {
                tx_frames: cfg.tx_frames / npairs + u64::from(p < cfg.tx_frames % npairs),
                rx_rate: cfg.rx_rate as f64 / npairs as f64,
                tx_rate: cfg.tx_rate as f64 / npairs as f64,
            };
            let shared = &shared;
            handles.push(s.spawn(move || {
                let r = match cfg.echo {
                    Some(wait) => echo_pair(pair, cfg, wait, shared).map(|()| 0),
                    None => run_pair(pair, cfg, &plan, shared),
                };
                if r.is_err() {
                    shared.finish(StopReason::Error);
                }
                r
            }));
        }
        for h in handles {
            results.push(
                h.join().unwrap_or_else(|_| {
                    Err(RunError::Config("a queue pair thread panicked".into()))
                }),
            );
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut rx_tagged = 0;
    let mut error = None;
    for r in results {
        match r {
            Ok(t) => rx_tagged += t,
            Err(e) => {
                if error.is_none() {
                    error = Some(e);
                }
            }
        }
    }
    if let Some(e) = error {
        return Err(e);
    }
    let stats = guest.stats();
    let tx_in_flight = guest
        .pairs_mut()
        .iter()
        .map(|p| u64::from(p.tx_in_flight()))
        .sum();
    let reason = shared
        .reason
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or(StopReason::Signal);
    Ok(RunReport {
        rx_frames: stats.rx_frames,
        rx_bytes: stats.rx_bytes,
        tx_frames: stats.tx_frames,
        tx_bytes: stats.tx_bytes,
        kicks: stats.kicks(),
        interrupts: stats.interrupts(),
        elapsed_secs: elapsed,
        stop_reason: reason,
        rx_tagged,
        echoed: shared.echoed.load(Ordering::SeqCst),
        echo_skipped: shared.echo_skipped.load(Ordering::SeqCst),
        tx_completed: stats.tx_completed,
        tx_in_flight,
        stats,
        vring_bases: None,
        error: None,
    })
}

fn run_pair(
    pair: &mut QueuePair,
    cfg: &RunConfig,
    plan: &PairPlan,
    sh: &Shared<'_>,
) -> Result<u64, RunError> {
    let pid = pair.index();
    let qerr = |source| RunError::Queue { pair: pid, source };
    let qsize = f64::from(pair.rx_ring().size());
    let mut rx_bucket =
        (plan.rx_rate > 0.0).then(|| Bucket::new(plan.rx_rate, (plan.rx_rate * 0.05).min(qsize)));
    let mut tx_bucket =
        (plan.tx_rate > 0.0).then(|| Bucket::new(plan.tx_rate, (plan.tx_rate * 0.05).min(qsize)));
    let batch = cfg.tx_batch.max(1);
    let mut frames: Vec<Vec<u8>> = (0..batch)
        .map(|_| Vec::with_capacity(cfg.tx_size))
        .collect();
    let mut tx_seq = 0u64;
    let mut tx_done_signalled = false;
    if plan.tx_frames == 0 {
        sh.tx_pending_pairs.fetch_sub(1, Ordering::SeqCst);
        tx_done_signalled = true;
    }
    let mut rx_tagged = 0u64;
    let mut last_activity = Instant::now();

    pair.post_rx_buffers(usize::MAX).map_err(qerr)?;
    loop {
        if sh.stopped() {
            break;
        }
        let now = Instant::now();
        if sh.deadline.is_some_and(|d| now >= d) {
            sh.finish(StopReason::Duration);
            break;
        }
        let mut progress = false;

        // RX: harvest (within the rate budget) and refill the ring.
        let budget = match rx_bucket.as_mut() {
            None => 256,
            Some(b) => {
                b.refill(now);
                b.available()
            }
        };
        if budget > 0 {
            let n = if cfg.rx_drop {
                pair.recycle_rx(budget).map_err(qerr)?
            } else {
                pair.poll_rx_budget(budget, |f, _| {
                    if parse_tag(f).is_some() {
                        rx_tagged += 1;
                    }
                })
                .map_err(qerr)?
            };
            if n > 0 {
                // NAPI: keep polling only while a poll uses its whole budget; a ring drained
                // below it means re-arming the interrupt and sleeping, as Linux does.
                progress |= n >= budget;
                last_activity = now;
                if let Some(b) = rx_bucket.as_mut() {
                    b.take(n);
                }
                let total = sh.rx_total.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                if cfg.rx_frames.is_some_and(|t| total >= t) {
                    sh.finish(StopReason::RxFrames);
                }
            }
        }
        if pair.rx_free_slots() > 0 {
            pair.post_rx_buffers(usize::MAX).map_err(qerr)?;
        }

        // TX.
        let completed = pair.reclaim_tx().map_err(qerr)?;
        if completed > 0 {
            progress = true;
            last_activity = now;
        }
        let remaining = plan.tx_frames - tx_seq;
        if remaining > 0 {
            let mut n = (batch as u64).min(remaining) as usize;
            if let Some(b) = tx_bucket.as_mut() {
                b.refill(now);
                n = n.min(b.available());
            }
            n = n.min(pair.tx_free_slots());
            if n > 0 {
                let sent = if cfg.tx_prefilled {
                    if frames[0].is_empty() {
                        cfg.frame.build(cfg.tx_size, pid, 0, &mut frames[0])?;
                    }
                    pair.send_prefilled(&frames[0], n).map_err(qerr)?
                } else {
                    for (i, f) in frames.iter_mut().take(n).enumerate() {
                        cfg.frame.build(cfg.tx_size, pid, tx_seq + i as u64, f)?;
                    }
                    let refs: Vec<&[u8]> = frames[..n].iter().map(|f| f.as_slice()).collect();
                    pair.send_frames(&refs).map_err(qerr)?
                };
                if sent > 0 {
                    tx_seq += sent as u64;
                    progress = true;
                    last_activity = now;
                    if let Some(b) = tx_bucket.as_mut() {
                        b.take(sent);
                    }
                }
            }
        }
        if !tx_done_signalled && tx_seq == plan.tx_frames {
            sh.tx_pending_pairs.fetch_sub(1, Ordering::SeqCst);
            tx_done_signalled = true;
        }
        // Done when everyone's TX is queued and nothing happened for `idle`.
        if cfg.tx_frames > 0
            && sh.tx_pending_pairs.load(Ordering::SeqCst) == 0
            && now.duration_since(last_activity) >= cfg.idle
        {
            sh.finish(StopReason::TxDone);
            break;
        }
        if progress {
            continue;
        }

        // Sleep until something can happen.
        let mut timeout = Duration::from_millis(100);
        if let Some(d) = sh.deadline {
            timeout = timeout.min(d.saturating_duration_since(now));
        }
        let want_rx = match rx_bucket.as_ref() {
            None => true,
            Some(b) if b.available() >= 1 => true,
            Some(b) => {
                timeout = timeout.min(b.until_next());
                false
            }
        };
        let tx_left = plan.tx_frames > tx_seq;
        let want_tx = if tx_left {
            match tx_bucket.as_ref() {
                Some(b) if b.available() == 0 => {
                    timeout = timeout.min(b.until_next());
                    pair.tx_free_slots() == 0
                }
                _ => true,
            }
        } else {
            pair.tx_in_flight() > 0
        };
        if cfg.tx_frames > 0 && sh.tx_pending_pairs.load(Ordering::SeqCst) == 0 {
            timeout = timeout.min(cfg.idle.saturating_sub(now.duration_since(last_activity)));
        }
        if want_rx || want_tx {
            pair.wait(want_rx, want_tx, Some(timeout)).map_err(qerr)?;
        } else {
            std::thread::sleep(timeout);
        }
    }
    // Reap what completed so the counters are final.
    pair.reclaim_tx().map_err(qerr)?;
    Ok(rx_tagged)
}

/// Echo mode on one pair: one frame at a time, answered before anything else is done, until a
/// stop condition.
fn echo_pair(
    pair: &mut QueuePair,
    cfg: &RunConfig,
    wait: EchoWait,
    sh: &Shared<'_>,
) -> Result<(), RunError> {
    let pid = pair.index();
    let qerr = |source| RunError::Queue { pair: pid, source };
    // TX interrupts stay off (as the pair starts): completions are reclaimed when the next reply
    // is queued, as Linux's virtio-net does, so none is on the reply's path.
    if wait == EchoWait::Poll {
        let queue = pair.rx_queue();
        pair.rx_ring_mut()
            .disable_cb()
            .map_err(|source| qerr(QueueError::Ring { queue, source }))?;
    }
    let mut frame = Vec::with_capacity(2048);
    let (mut partial_csum, mut gso) = (false, false);
    pair.post_rx_buffers(usize::MAX).map_err(qerr)?;
    while !sh.stopped() {
        let n = pair
            .poll_rx_budget(1, |f, h| {
                frame.clear();
                frame.extend_from_slice(f);
                partial_csum = h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
                gso = h.gso_type != VIRTIO_NET_HDR_GSO_NONE;
            })
            .map_err(qerr)?;
        if n > 0 {
            if !gso && udp_echo_reply(&mut frame, partial_csum) {
                send_reply(pair, &frame, sh).map_err(qerr)?;
                sh.echoed.fetch_add(1, Ordering::Relaxed);
            } else {
                sh.echo_skipped.fetch_add(1, Ordering::Relaxed);
            }
            // Reposted once the reply is out: off the round trip's path.
            pair.post_rx_buffers(usize::MAX).map_err(qerr)?;
            let total = sh.rx_total.fetch_add(1, Ordering::SeqCst) + 1;
            if cfg.rx_frames.is_some_and(|t| total >= t) {
                sh.finish(StopReason::RxFrames);
            }
            continue;
        }
        let now = Instant::now();
        if sh.deadline.is_some_and(|d| now >= d) {
            sh.finish(StopReason::Duration);
            break;
        }
        match wait {
            EchoWait::Poll => std::hint::spin_loop(),
            EchoWait::Interrupt => {
                // The timeout only bounds how late the stop flag and the deadline are seen.
                let mut timeout = Duration::from_millis(100);
                if let Some(d) = sh.deadline {
                    timeout = timeout.min(d.saturating_duration_since(now));
                }
                pair.wait(true, false, Some(timeout)).map_err(qerr)?;
            }
        }
    }
    pair.reclaim_tx().map_err(qerr)?;
    Ok(())
}

/// Queue `frame` on TX, waiting for the device to free a slot if the ring is full (a device
/// that stalls ends the wait at the stop flag).
fn send_reply(pair: &mut QueuePair, frame: &[u8], sh: &Shared<'_>) -> Result<(), QueueError> {
    while !pair.send_frame(frame)? {
        if sh.stopped() {
            return Ok(());
        }
        pair.wait(false, true, Some(Duration::from_millis(100)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_rates() {
        let mut b = Bucket::new(1000.0, 50.0);
        assert_eq!(b.available(), 1);
        b.take(1);
        assert!(b.until_next() > Duration::ZERO);
        let t = b.last + Duration::from_millis(10);
        b.refill(t);
        assert_eq!(b.available(), 10);
        b.refill(t + Duration::from_secs(10));
        assert_eq!(b.available(), 50);
    }
}
