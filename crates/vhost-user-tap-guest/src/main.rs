//! `vhost-user-tap-guest`: a synthetic virtio-net guest for a vhost-user backend.
//!
//! Connects to the backend's socket like QEMU, keeps the RX ring full (harvesting at an
//! optional rate, like a slow guest), sends N tagged frames, and prints one JSON line with the
//! counters when done (after --duration, when TX is done and traffic went idle, on
//! --rx-frames, or on SIGINT/SIGTERM). With --echo it answers every IPv4/UDP frame instead, as
//! it arrives (the guest of the latency benchmark).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use vhost_user_tap_guest::net::{format_mac, parse_mac};
use vhost_user_tap_guest::{
    run, EchoWait, FrameSpec, Guest, GuestConfig, HandshakeOrder, RunConfig, RunReport, StopReason,
    TxLayout, UdpFlow,
};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Layout {
    /// Header and frame in one descriptor.
    Single,
    /// Header and frame as two chained descriptors.
    Chained,
    /// Header and frame in an indirect table (needs RING_INDIRECT_DESC; else chained).
    Indirect,
}

/// A synthetic virtio-net guest (vhost-user frontend) for testing and benchmarking a backend.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The backend's vhost-user socket.
    #[arg(long)]
    socket_path: std::path::PathBuf,
    /// Ring size of every virtqueue (power of two).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Number of queue pairs.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Harvest at most this many RX frames per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rx_rate: u64,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Recycle RX buffers without reading the frames: the XDP-drop equivalent for benchmarks.
    #[arg(long)]
    rx_drop: bool,
    /// Stop once this many frames were received.
    #[arg(long)]
    rx_frames: Option<u64>,
    /// Send one frame built once per TX buffer instead of writing every frame (pktgen's
    /// clone_skb; frames carry no sequence numbers): the TX benchmark's guest.
    #[arg(long)]
    tx_prefilled: bool,
    /// Frames to send (spread over the queue pairs).
    #[arg(long, default_value_t = 0)]
    tx_frames: u64,
    /// Size of each sent frame in bytes (Ethernet header included, no FCS).
    #[arg(long, default_value_t = 64)]
    tx_size: usize,
    /// Send at most this many frames per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    tx_rate: u64,
    /// Frames per publish/kick decision.
    #[arg(long, default_value_t = 1)]
    tx_batch: usize,
    /// Destination MAC of sent frames.
    #[arg(long, default_value = "ff:ff:ff:ff:ff:ff")]
    tx_dst_mac: String,
    /// Source MAC of sent frames (default: the device MAC from GET_CONFIG, else 52:54:00:12:34:56).
    #[arg(long)]
    mac: Option<String>,
    /// Send IPv4/UDP frames for this flow, e.g. "10.0.0.2:5000->10.0.0.1:6000" (default: raw
    /// frames with ethertype 0x88b5).
    #[arg(long)]
    tx_udp: Option<String>,
    /// TX descriptor layout.
    #[arg(long, value_enum, default_value_t = Layout::Single)]
    tx_layout: Layout,
    /// After TX is done, stop once nothing happened for this many milliseconds.
    #[arg(long, default_value_t = 500)]
    idle_ms: u64,
    /// Size of each RX buffer in mergeable mode.
    #[arg(long, default_value_t = 1536)]
    rx_buf_size: u32,
    /// Largest frame (without vnet header) for RX buffers without MRG_RXBUF and for TX.
    #[arg(long, default_value_t = 1514)]
    max_frame: u32,
    /// Do not ack VIRTIO_NET_F_MRG_RXBUF.
    #[arg(long)]
    no_mrg_rxbuf: bool,
    /// Do not ack VIRTIO_RING_F_EVENT_IDX.
    #[arg(long)]
    no_event_idx: bool,
    /// Do not ack VIRTIO_RING_F_INDIRECT_DESC.
    #[arg(long)]
    no_indirect: bool,
    /// Do not use REPLY_ACK.
    #[arg(long)]
    no_reply_ack: bool,
    /// Send the handshake in QEMU's order (SET_VRING_ENABLE before SET_FEATURES).
    #[arg(long)]
    qemu_order: bool,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    mem_mib: u64,
    /// Seconds to keep retrying while the socket is missing or refuses connections.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Run with a migration's dirty logging on (SET_LOG_BASE, VHOST_F_LOG_ALL), the log read
    /// and cleared every 100 ms as QEMU's migration thread does: the cost of logging.
    #[arg(long)]
    migration_log: bool,
    /// Echo mode: send every IPv4/UDP frame received straight back, Ethernet, IP and UDP
    /// source and destination swapped, one at a time as it arrives (a request/response peer for
    /// latency benchmarks). Other frames are counted (echo_skipped) and dropped. Waits for
    /// frames on the RX interrupt, like a guest's NAPI.
    #[arg(long, conflicts_with_all = ["rx_drop", "rx_rate", "tx_frames", "tx_prefilled"])]
    echo: bool,
    /// With --echo: spin on the used ring with RX interrupts off instead of sleeping, like a
    /// guest with busy polling (a whole CPU).
    #[arg(long, requires = "echo")]
    poll: bool,
    /// Print exactly one JSON line with the results.
    #[arg(long)]
    json: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);
/// The run is over: the dirty-log reader stops.
static LOG_DONE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `sa` is fully initialised (zeroed, then handler and an empty mask set); the
        // handler only stores to an atomic, which is async-signal-safe. No SA_RESTART, so a
        // blocking poll returns EINTR and the run loop notices the flag at once.
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn empty_report(error: String) -> RunReport {
    RunReport {
        rx_frames: 0,
        rx_bytes: 0,
        tx_frames: 0,
        tx_bytes: 0,
        kicks: 0,
        interrupts: 0,
        elapsed_secs: 0.0,
        stop_reason: StopReason::Error,
        rx_tagged: 0,
        echoed: 0,
        echo_skipped: 0,
        tx_completed: 0,
        tx_in_flight: 0,
        stats: Default::default(),
        vring_bases: None,
        error: Some(error),
    }
}

fn print(report: &RunReport, json: bool) {
    if json {
        match serde_json::to_string(report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("vhost-user-tap-guest: serialising the report: {e}"),
        }
        return;
    }
    println!(
        "rx: {} frames, {} bytes | tx: {} frames, {} bytes ({} completed) | kicks {} | interrupts {} | {:.3} s, stopped: {:?}",
        report.rx_frames,
        report.rx_bytes,
        report.tx_frames,
        report.tx_bytes,
        report.tx_completed,
        report.kicks,
        report.interrupts,
        report.elapsed_secs,
        report.stop_reason
    );
    if let Some(e) = &report.error {
        println!("error: {e}");
    }
}

fn fail(msg: String, json: bool) -> ExitCode {
    eprintln!("vhost-user-tap-guest: {msg}");
    if json {
        print(&empty_report(msg), true);
    }
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .target(env_logger::Target::Stderr)
        .init();
    let a = Args::parse();
    if let Err(e) = install_signal_handlers() {
        return fail(format!("installing signal handlers: {e}"), a.json);
    }
    type Macs = (Option<[u8; 6]>, [u8; 6]);
    let parse = || -> Result<(Macs, Option<UdpFlow>), String> {
        let src = a
            .mac
            .as_deref()
            .map(parse_mac)
            .transpose()
            .map_err(|e| e.to_string())?;
        let dst = parse_mac(&a.tx_dst_mac).map_err(|e| e.to_string())?;
        let udp = a
            .tx_udp
            .as_deref()
            .map(str::parse::<UdpFlow>)
            .transpose()
            .map_err(|e| e.to_string())?;
        Ok(((src, dst), udp))
    };
    let ((src_mac, dst_mac), udp) = match parse() {
        Ok(v) => v,
        Err(e) => return fail(e, a.json),
    };
    let secs = |s: f64, what: &str| -> Result<Duration, String> {
        Duration::try_from_secs_f64(s).map_err(|_| format!("invalid {what} {s}"))
    };
    let (duration, connect_timeout) = match (
        a.duration.map(|d| secs(d, "--duration")).transpose(),
        secs(a.connect_timeout, "--connect-timeout"),
    ) {
        (Ok(d), Ok(c)) => (d, c),
        (Err(e), _) | (_, Err(e)) => return fail(e, a.json),
    };
    let gcfg = GuestConfig {
        connect_timeout,
        queue_pairs: a.queues,
        queue_size: a.queue_size,
        mem_size: a.mem_mib << 20,
        mrg_rxbuf: !a.no_mrg_rxbuf,
        event_idx: !a.no_event_idx,
        indirect_desc: !a.no_indirect,
        reply_ack: !a.no_reply_ack,
        rx_buf_len: a.rx_buf_size,
        rx_max_frame: a.max_frame,
        tx_max_frame: a.max_frame,
        tx_layout: match a.tx_layout {
            Layout::Single => TxLayout::Single,
            Layout::Chained => TxLayout::Chained,
            Layout::Indirect => TxLayout::Indirect,
        },
        order: if a.qemu_order {
            HandshakeOrder::Qemu
        } else {
            HandshakeOrder::Spec
        },
        ..GuestConfig::new(&a.socket_path)
    };
    let mut guest = match Guest::connect(gcfg) {
        Ok(g) => g,
        Err(e) => return fail(e.to_string(), a.json),
    };
    let log_reader = if a.migration_log {
        if let Err(e) = guest.start_migration_log() {
            return fail(e.to_string(), a.json);
        }
        guest.dirty_log().map(|log| {
            std::thread::spawn(move || {
                let mut pages = 0;
                while !LOG_DONE.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    pages += log.take_dirty().len();
                }
                pages
            })
        })
    } else {
        None
    };
    let src_mac = src_mac
        .or_else(|| guest.mac())
        .unwrap_or([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    log::info!(
        "connected: features {:#x}, protocol features {:#x}, mac {}",
        guest.features(),
        guest.protocol_features(),
        format_mac(&src_mac)
    );
    let rcfg = RunConfig {
        duration,
        rx_rate: a.rx_rate,
        rx_frames: a.rx_frames,
        rx_drop: a.rx_drop,
        tx_prefilled: a.tx_prefilled,
        idle: Duration::from_millis(a.idle_ms),
        tx_frames: a.tx_frames,
        tx_size: a.tx_size,
        tx_rate: a.tx_rate,
        tx_batch: a.tx_batch,
        frame: FrameSpec {
            dst_mac,
            src_mac,
            udp,
        },
        echo: a.echo.then_some(if a.poll {
            EchoWait::Poll
        } else {
            EchoWait::Interrupt
        }),
    };
    let (mut report, ok) = match run(&mut guest, &rcfg, &STOP) {
        Ok(r) => (r, true),
        Err(e) => {
            eprintln!("vhost-user-tap-guest: {e}");
            let mut r = empty_report(e.to_string());
            let s = guest.stats();
            r.rx_frames = s.rx_frames;
            r.rx_bytes = s.rx_bytes;
            r.tx_frames = s.tx_frames;
            r.tx_bytes = s.tx_bytes;
            r.kicks = s.kicks();
            r.interrupts = s.interrupts();
            r.stats = s;
            (r, false)
        }
    };
    LOG_DONE.store(true, Ordering::Relaxed);
    if let Some(reader) = log_reader {
        match reader.join() {
            Ok(pages) => eprintln!("vhost-user-tap-guest: migration log: {pages} dirty pages read"),
            Err(_) => eprintln!("vhost-user-tap-guest: the dirty-log reader panicked"),
        }
    }
    match guest.disconnect() {
        Ok(bases) => report.vring_bases = Some(bases),
        Err(e) => log::warn!("disconnect: {e}"),
    }
    print(&report, a.json);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
