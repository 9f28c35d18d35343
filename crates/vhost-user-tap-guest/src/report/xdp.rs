//! `vut-report xdp-bench`: the XDP-drop benchmark's accounting (qemu-scripts/xdp-bench.sh).
//!
//! The script leaves one directory per run, `OUT/runs/<backend>-t<threads>-r<run>/`, with what it
//! collected, verbatim:
//! - `run.txt`: `boot_seconds=`, `xdp_before=` and `xdp_after=` (the guest's cumulative XDP count
//!   before sending and once it stopped moving); written last, so a run without it failed before
//!   its counters were collected;
//! - `blast.out`: the sender's line (`sent=N ... seconds=S ...`);
//! - `qdisc.json` (`tc -s -j qdisc show dev TAP`) and `link.json` (`ip -s -j link show dev TAP`),
//!   read after the drain while the backend still held the tap;
//! - `metrics.txt` (vhost-user only): the daemon's `--metrics` scrape, taken after QEMU left and
//!   before the daemon was stopped; `daemon.log` (its start-up lines);
//! - `console.log`: the guest's serial console (`VUT-BOOT`, `VUT-XDP-READY mode=...`).
//!
//! Per run: received = xdp_after - xdp_before; lost = qdisc drops + tun ring drops (the tap's TX
//! dropped) + the daemon's RX drops (`daemon_dropped_frames{direction="rx"}`); in flight = sent -
//! received - lost, which must be 0 after the drain, and the daemon's `rx_frames` must equal
//! received. Writes OUT/table.txt, OUT/results.json, OUT/chart.dat and OUT/chart.gp (the gnuplot
//! program the script runs); fails (exit 1) when a run failed, did not add up, or none completed.

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;

use super::prom::Scrape;
use super::record::{self, LinkTx, Record, RootQdisc};

#[derive(Debug, Args)]
pub struct XdpArgs {
    /// The benchmark's output directory (runs/ inside; the reports are written here).
    #[arg(long)]
    pub out: PathBuf,
    /// Backends in column order, comma-separated (vhost-user, tap, vhost-net).
    #[arg(long)]
    pub backends: String,
    /// Backends not available on this host (shown as n/a), comma-separated.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub unavailable: String,
    /// Sender thread counts, comma-separated.
    #[arg(long)]
    pub threads: String,
    /// Sending time per run.
    #[arg(long)]
    pub seconds: u32,
    /// Runs per backend and thread count.
    #[arg(long)]
    pub runs: u32,
    /// The qdisc asked for (after any fallback).
    #[arg(long)]
    pub qdisc: String,
    /// `qemu --version`'s first line.
    #[arg(long, allow_hyphen_values = true)]
    pub qemu_line: String,
    /// QEMU's version, x.y.z.
    #[arg(long)]
    pub qemu_version: String,
    /// kvm or tcg.
    #[arg(long)]
    pub accel: String,
    /// The -cpu model used under KVM, if any.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub cpu_model: String,
    /// Every backend ran with INTx (QEMU < 8 under TCG).
    #[arg(long)]
    pub intx: bool,
    #[arg(long)]
    pub host_kernel: String,
    #[arg(long, allow_hyphen_values = true)]
    pub host_cpu: String,
    #[arg(long)]
    pub host_cpus: u32,
    /// /proc/loadavg's first three fields before and after.
    #[arg(long, allow_hyphen_values = true)]
    pub load_start: String,
    #[arg(long, allow_hyphen_values = true)]
    pub load_end: String,
    /// Guest vCPUs.
    #[arg(long)]
    pub smp: u32,
    /// Extra daemon options.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub daemon_args: String,
    /// Wall time of the whole benchmark, seconds.
    #[arg(long)]
    pub bench_seconds: String,
}

/// One completed run's numbers (a results.json `runs` entry).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Run {
    pub backend: String,
    pub threads: u32,
    pub run: u32,
    pub seconds: f64,
    pub sent: u64,
    pub received: u64,
    pub qdisc_drops: u64,
    pub tun_drops: u64,
    pub daemon_drops: u64,
    pub in_flight: i64,
    pub qdisc_sent: u64,
    pub qdisc_backlog: u64,
    pub tap_tx_packets: u64,
    pub daemon_rx_frames: Option<u64>,
    pub xdp_mode: String,
    pub boot_seconds: f64,
    pub qdisc: String,
}

impl Run {
    fn lost(&self) -> u64 {
        self.qdisc_drops + self.tun_drops + self.daemon_drops
    }

    /// Why this run does not add up, if it does not.
    pub fn imbalance(&self) -> Option<String> {
        if self.in_flight != 0 {
            return Some(format!(
                "{} run does not add up: {} frames neither received nor counted as lost",
                self.backend, self.in_flight
            ));
        }
        match self.daemon_rx_frames {
            Some(rx) if rx != self.received => Some(format!(
                "the daemon delivered {rx} frames, the guest counted {}",
                self.received
            )),
            _ => None,
        }
    }
}

/// What one run directory holds, beyond the numbers.
#[derive(Clone, Debug, Default)]
pub struct RunExtras {
    pub guest_kernel: Option<String>,
    pub daemon_backpressure: Option<String>,
    pub xdp_warning: Option<String>,
}

/// Reads one completed run's directory; Err when something it needs is missing or unreadable.
pub fn read_run(
    dir: &Path,
    backend: &str,
    threads: u32,
    run: u32,
) -> Result<(Run, RunExtras), String> {
    let rec = Record::from_lines(&record::read(&dir.join("run.txt"))?, "run.txt");
    let blast = Record::from_words(
        &record::read(&dir.join("blast.out"))?,
        "the sender's output",
    );
    let sent: u64 = blast.num("sent")?;
    let seconds: f64 = blast.num("seconds")?;
    if seconds.is_nan() || seconds <= 0.0 {
        return Err(format!("the sender ran {seconds} s"));
    }
    let before: u64 = rec.num("xdp_before")?;
    let after: u64 = rec.num("xdp_after")?;
    let received = after
        .checked_sub(before)
        .ok_or_else(|| format!("the guest's XDP count went back from {before} to {after}"))?;
    let qdisc = RootQdisc::parse(&record::read(&dir.join("qdisc.json"))?, "qdisc.json")?;
    let link = LinkTx::parse(&record::read(&dir.join("link.json"))?, "link.json")?;

    let mut extras = RunExtras::default();
    let console = record::console_lines(&record::read(&dir.join("console.log"))?);
    let after_marker = |marker: &str| {
        console
            .iter()
            .find_map(|l| l.find(marker).map(|i| l[i + marker.len()..].to_string()))
    };
    let xdp_mode = after_marker("VUT-XDP-READY mode=")
        .and_then(|m| m.split_whitespace().next().map(str::to_string))
        .ok_or("no XDP mode in the guest's READY line")?;
    extras.guest_kernel = after_marker("VUT-BOOT kernel=")
        .and_then(|k| k.split_whitespace().next().map(str::to_string));
    if xdp_mode != "native" {
        extras.xdp_warning = Some(format!(
            "the guest runs XDP in {xdp_mode} mode (an skb per frame): {}",
            after_marker("VUT-XDP-WARN").unwrap_or_default().trim()
        ));
    }

    let (mut daemon_drops, mut daemon_rx) = (0, None);
    if backend == "vhost-user" {
        let scrape = Scrape::parse(&record::read(&dir.join("metrics.txt"))?)?;
        let c = scrape.daemon_counters()?;
        daemon_drops = c.rx_drops();
        daemon_rx = Some(c.get("rx_frames"));
        // The start-up line on IFF_BACKPRESSURE ("backpressure off (stock mode): ...").
        extras.daemon_backpressure = record::read(&dir.join("daemon.log"))
            .ok()
            .and_then(|log| log.lines().find_map(backpressure_phrase));
    }
    let mut r = Run {
        backend: backend.to_string(),
        threads,
        run,
        seconds,
        sent,
        received,
        qdisc_drops: qdisc.drops,
        tun_drops: link.dropped,
        daemon_drops,
        in_flight: 0,
        qdisc_sent: qdisc.packets,
        qdisc_backlog: qdisc.qlen,
        tap_tx_packets: link.packets,
        daemon_rx_frames: daemon_rx,
        xdp_mode,
        boot_seconds: rec.num("boot_seconds")?,
        qdisc: qdisc.kind,
    };
    r.in_flight = sent as i64 - received as i64 - r.lost() as i64;
    Ok((r, extras))
}

/// "backpressure off (stock mode)" out of the daemon's start-up line.
fn backpressure_phrase(line: &str) -> Option<String> {
    let i = line.find("backpressure o")?;
    let rest = &line[i..];
    let word = rest["backpressure ".len()..]
        .split(|c: char| !c.is_ascii_alphanumeric())
        .next()?;
    if word != "on" && word != "off" {
        return None;
    }
    let end = rest.find([':', ';']).unwrap_or(rest.len());
    Some(rest[..end].trim_end().to_string())
}

/// The benchmark as a whole: every run in the order they ran.
#[derive(Debug)]
pub struct Bench {
    pub args: XdpArgs,
    pub backends: Vec<String>,
    pub unavailable: Vec<String>,
    pub threads: Vec<u32>,
    pub runs: Vec<Run>,
    pub guest_kernel: Option<String>,
    pub daemon_backpressure: Option<String>,
    /// Something failed: a run without counters, or one that does not add up.
    pub failed: bool,
}

#[derive(Serialize)]
struct Summary<'a> {
    backend: &'a str,
    threads: u32,
    runs: usize,
    received_pps: f64,
    lost_pps: f64,
    sent_pps: f64,
}

#[derive(Serialize)]
struct Results<'a> {
    qemu: &'a str,
    accel: &'a str,
    host_kernel: &'a str,
    host_cpu: &'a str,
    host_cpus: u32,
    host_loadavg_start: &'a str,
    host_loadavg_end: &'a str,
    guest_kernel: &'a str,
    guest_vcpus: u32,
    qdisc: String,
    seconds: u32,
    /// Runs per backend and thread count (the old report named this "runs" too, a duplicate key
    /// beside the list of runs).
    runs_per_cell: u32,
    frame_bytes: u32,
    daemon_backpressure: &'a str,
    daemon_args: &'a str,
    failed: bool,
    unavailable: &'a [String],
    summary: Vec<Summary<'a>>,
    runs: &'a [Run],
}

fn list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().map_err(|_| format!("--{what}: bad item {w:?}")))
        .collect()
}

/// Per-second means over a cell's runs: (received, lost, sent).
#[derive(Clone, Copy, Debug)]
struct Means {
    n: usize,
    rx: f64,
    lost: f64,
    sent: f64,
}

impl Bench {
    /// Reads every run the script was asked for; logs (stderr) what each did.
    pub fn read(args: XdpArgs) -> Result<Bench, String> {
        let backends: Vec<String> = list(&args.backends, "backends")?;
        let unavailable: Vec<String> = list(&args.unavailable, "unavailable")?;
        let threads: Vec<u32> = list(&args.threads, "threads")?;
        let mut b = Bench {
            backends,
            unavailable,
            threads,
            runs: Vec::new(),
            guest_kernel: None,
            daemon_backpressure: None,
            failed: false,
            args,
        };
        // The order the script ran them in.
        for &t in &b.threads.clone() {
            for run in 1..=b.args.runs {
                for backend in b.backends.clone() {
                    if b.unavailable.contains(&backend) {
                        continue;
                    }
                    let name = format!("{backend}-t{t}-r{run}");
                    let dir = b.args.out.join("runs").join(&name);
                    if !dir.join("run.txt").is_file() {
                        log(&format!(
                            "run {name}: failed before its counters were collected"
                        ));
                        b.failed = true;
                        continue;
                    }
                    match read_run(&dir, &backend, t, run) {
                        Ok((r, extras)) => b.add(r, extras),
                        Err(e) => {
                            log(&format!("run {name}: unreadable counters: {e}"));
                            b.failed = true;
                        }
                    }
                }
            }
        }
        Ok(b)
    }

    fn add(&mut self, r: Run, extras: RunExtras) {
        if self.guest_kernel.is_none() {
            self.guest_kernel = extras.guest_kernel;
        }
        if self.daemon_backpressure.is_none() {
            self.daemon_backpressure = extras.daemon_backpressure;
        }
        if let Some(w) = extras.xdp_warning {
            log(&format!("warning: {w}"));
        }
        log(&format!(
            "{:<10} {} thr run {}: sent {} = received {} + lost {} (qdisc {}, tun {}, daemon {}) \
             + in flight {}; boot {:.1}s",
            r.backend,
            r.threads,
            r.run,
            r.sent,
            r.received,
            r.lost(),
            r.qdisc_drops,
            r.tun_drops,
            r.daemon_drops,
            r.in_flight,
            r.boot_seconds
        ));
        if let Some(e) = r.imbalance() {
            log(&format!("error: {e}"));
            self.failed = true;
        }
        self.runs.push(r);
    }

    fn means(&self, backend: &str, threads: u32) -> Option<Means> {
        let cell: Vec<&Run> = self
            .runs
            .iter()
            .filter(|r| r.backend == backend && r.threads == threads)
            .collect();
        if cell.is_empty() {
            return None;
        }
        let n = cell.len() as f64;
        let mean = |f: &dyn Fn(&Run) -> f64| cell.iter().map(|r| f(r) / r.seconds).sum::<f64>() / n;
        Some(Means {
            n: cell.len(),
            rx: mean(&|r| r.received as f64),
            lost: mean(&|r| r.lost() as f64),
            sent: mean(&|r| r.sent as f64),
        })
    }

    /// The qdisc kinds the runs really had, in order of appearance ("pfifo_fast", or
    /// "fq_codel/pfifo_fast" if they differed); the one asked for when no run completed.
    fn kinds(&self) -> String {
        let mut kinds: Vec<&str> = Vec::new();
        for r in &self.runs {
            if !kinds.contains(&r.qdisc.as_str()) {
                kinds.push(&r.qdisc);
            }
        }
        if kinds.is_empty() {
            self.args.qdisc.clone()
        } else {
            kinds.join("/")
        }
    }

    fn accel_label(&self) -> String {
        if self.args.accel == "tcg" {
            "TCG (no KVM: emulated guest, absolute numbers are far below a KVM host's)".into()
        } else if self.args.cpu_model.is_empty() {
            "KVM".into()
        } else {
            format!("KVM (-cpu {})", self.args.cpu_model)
        }
    }

    pub fn table(&self) -> String {
        let a = &self.args;
        let mut t = String::new();
        let intx = if a.intx {
            "; INTx for every backend (QEMU < 8 + TCG + vhost-user needs vectors=0)"
        } else {
            ""
        };
        t += &format!(
            "XDP-drop guest benchmark: 64-byte frames (60 B + FCS) into the tap through qdisc {}, \
             {} s x {} run(s) per cell\n",
            self.kinds(),
            a.seconds,
            a.runs
        );
        t += &format!(
            "QEMU: {}, accel: {}{intx}\n",
            a.qemu_line,
            self.accel_label()
        );
        t += &format!(
            "host: Linux {}, {} ({} CPUs), load average {} at start, {} at end; guest: Linux {}, \
             {} vCPU, XDP_DROP in virtio_net\n",
            a.host_kernel,
            a.host_cpu,
            a.host_cpus,
            a.load_start,
            a.load_end,
            self.guest_kernel.as_deref().unwrap_or("?"),
            a.smp
        );
        let bp = self.daemon_backpressure.as_deref().unwrap_or("");
        if !bp.is_empty() || !a.daemon_args.is_empty() {
            let opts = if a.daemon_args.is_empty() {
                String::new()
            } else {
                format!("; options: {}", a.daemon_args)
            };
            t += &format!("daemon: {bp}{opts}\n");
        }
        let mut sep = String::from("+------------+-------------+");
        for i in 0..self.backends.len() {
            sep += "----------------+";
            if i > 0 {
                sep += "----------+";
            }
        }
        for &th in &self.threads {
            t += &format!("{sep}\n");
            let mut s1 = format!("| {:<10}  {:<13}|", threads_label(th), "");
            let mut s2 = format!("| {:<10}  {:<13}|", "sending", "");
            for (i, b) in self.backends.iter().enumerate() {
                s1 += &format!(" {:<14} |", label(b));
                s2 += &format!(" {:<14} |", sublabel(b));
                if i > 0 {
                    s1 += &format!(" {:<8} |", "diff");
                    s2 += &format!(" {:<8} |", "");
                }
            }
            t += &format!("{s1}\n{s2}\n{sep}\n");
            let mut r1 = format!("| {:<10} | {:<11} |", "XDP drop", "Received");
            let mut r2 = format!("| {:<10} | {:<11} |", "in guest", "Lost/s");
            let mut r3 = format!("| {:<10} | {:<11} |", "", "Sent/s");
            let base = self.backends.first().and_then(|b| self.means(b, th));
            for (i, b) in self.backends.iter().enumerate() {
                let m = self.means(b, th);
                r1 += &format!(" {:<14} |", rate(m.map(|m| m.rx)));
                r2 += &format!(" {:<14} |", rate(m.map(|m| m.lost)));
                r3 += &format!(" {:<14} |", rate(m.map(|m| m.sent)));
                if i > 0 {
                    let d = match (m, base) {
                        (Some(m), Some(base)) if base.rx > 0.0 => {
                            format!("{:+.1}%", (m.rx / base.rx - 1.0) * 100.0)
                        }
                        _ => String::new(),
                    };
                    r1 += &format!(" {d:<8} |");
                    r2 += &format!(" {:<8} |", "");
                    r3 += &format!(" {:<8} |", "");
                }
            }
            t += &format!("{r1}\n{r2}\n{r3}\n");
        }
        t += &format!("{sep}\n");
        t += "Received = frames counted by the guest's XDP program / T; Lost/s = (qdisc drops + \
              tun ring drops\n";
        t += "(tap tx_dropped) + daemon RX drops) / T; Sent/s = frames handed to the kernel / T. \
              Means over runs.\n";
        t += "diff: Received vs the first column. n/a: backend not available on this host.\n\n";
        t += "Per run (frames): sent = received + qdisc + tun + daemon (+ in flight, 0 after the \
              drain)\n";
        t += &format!(
            "{:<10} {:>3} {:>3} {:>7} {:>11} {:>11} {:>10} {:>11} {:>7} {:>6} {:>7} {:>6}\n",
            "backend",
            "thr",
            "run",
            "seconds",
            "sent",
            "received",
            "qdisc",
            "tun",
            "daemon",
            "flight",
            "xdp",
            "boot_s"
        );
        for r in &self.runs {
            t += &format!(
                "{:<10} {:>3} {:>3} {:>7.3} {:>11} {:>11} {:>10} {:>11} {:>7} {:>6} {:>7} {:>6.1}\n",
                r.backend,
                r.threads,
                r.run,
                r.seconds,
                r.sent,
                r.received,
                r.qdisc_drops,
                r.tun_drops,
                r.daemon_drops,
                r.in_flight,
                r.xdp_mode,
                r.boot_seconds
            );
        }
        t += &format!(
            "\nTotal benchmark time: {} s{}\n",
            a.bench_seconds,
            if self.failed {
                " (SOME RUNS FAILED: see runs/*/)"
            } else {
                ""
            }
        );
        t
    }

    pub fn json(&self) -> String {
        let a = &self.args;
        let mut summary = Vec::new();
        for &th in &self.threads {
            for b in &self.backends {
                if let Some(m) = self.means(b, th) {
                    summary.push(Summary {
                        backend: b,
                        threads: th,
                        runs: m.n,
                        received_pps: m.rx.round(),
                        lost_pps: m.lost.round(),
                        sent_pps: m.sent.round(),
                    });
                }
            }
        }
        let results = Results {
            qemu: &a.qemu_line,
            accel: &a.accel,
            host_kernel: &a.host_kernel,
            host_cpu: &a.host_cpu,
            host_cpus: a.host_cpus,
            host_loadavg_start: &a.load_start,
            host_loadavg_end: &a.load_end,
            guest_kernel: self.guest_kernel.as_deref().unwrap_or("?"),
            guest_vcpus: a.smp,
            qdisc: self.kinds(),
            seconds: a.seconds,
            runs_per_cell: a.runs,
            frame_bytes: 60,
            daemon_backpressure: self.daemon_backpressure.as_deref().unwrap_or(""),
            daemon_args: &a.daemon_args,
            failed: self.failed,
            unavailable: &self.unavailable,
            summary,
            runs: &self.runs,
        };
        serde_json::to_string_pretty(&results).expect("serialising the results") + "\n"
    }

    /// chart.dat: per thread count, each backend's Received and Lost/s in Mpps (NaN: none).
    pub fn chart_data(&self) -> String {
        let mut d = String::from("# threads");
        for b in &self.backends {
            d += &format!("\t{b}_rx_mpps");
        }
        for b in &self.backends {
            d += &format!("\t{b}_lost_mpps");
        }
        d += "\n";
        for &th in &self.threads {
            d += &format!("\"{}\"", threads_label(th));
            let cells: Vec<Option<Means>> =
                self.backends.iter().map(|b| self.means(b, th)).collect();
            for m in &cells {
                d += &mpps(m.map(|m| m.rx));
            }
            for m in &cells {
                d += &mpps(m.map(|m| m.lost));
            }
            d += "\n";
        }
        d
    }

    /// The gnuplot program for chart.png: grouped bars, Received and Lost/s per thread count,
    /// one bar per backend that ran (n/a ones are named in the subtitle). None without data.
    pub fn chart_program(&self) -> Option<String> {
        let a = &self.args;
        let out = a.out.display().to_string();
        let mut title = format!(
            "XDP-drop guest, 64-byte frames, qdisc {}, {}s x {} run(s): QEMU {}, {}",
            a.qdisc,
            a.seconds,
            a.runs,
            a.qemu_version,
            a.accel.to_uppercase()
        );
        if a.accel == "tcg" {
            title += " (emulated guest: not KVM numbers)";
        }
        let mut subtitle = format!(
            "host Linux {}, {} ({} CPUs); guest Linux {}, {} vCPU",
            a.host_kernel,
            a.host_cpu,
            a.host_cpus,
            self.guest_kernel.as_deref().unwrap_or("?"),
            a.smp
        );
        let nb = self.backends.len();
        let dat = gp_single(&format!("{out}/chart.dat"));
        let (mut rx, mut lost) = (Vec::new(), Vec::new());
        for (i, b) in self.backends.iter().enumerate() {
            let name = match b.as_str() {
                "vhost-user" => "vhost-user-tap",
                "tap" => "QEMU tap (vhost=off)",
                _ => "vhost-net (vhost=on)",
            };
            if self.unavailable.contains(b) {
                subtitle += &format!("; {name}: n/a");
                continue;
            }
            rx.push(format!(
                "{dat} using {}:xtic(1) title {}",
                i + 2,
                gp_single(name)
            ));
            lost.push(format!(
                "{dat} using {}:xtic(1) title {}",
                nb + i + 2,
                gp_single(name)
            ));
        }
        if rx.is_empty() || self.runs.is_empty() {
            return None;
        }
        Some(format!(
            "set terminal png size 1200,540 font \",10\"\n\
             set output {}\n\
             set termoption noenhanced\n\
             set multiplot layout 1,2 title \"{}\\n{}\"\n\
             set style data histograms\n\
             set style histogram clustered gap 1\n\
             set style fill solid 0.8 border -1\n\
             set boxwidth 0.9\n\
             set grid ytics\n\
             set yrange [0:*]\n\
             set offsets 0, 0, graph 0.15, 0\n\
             set key top center horizontal\n\
             set datafile missing 'NaN'\n\
             set title 'Received (Mpps, higher is better)'\n\
             set ylabel 'Mpps'\n\
             plot {}\n\
             set title 'Lost/s (Mpps: qdisc + tun ring + daemon drops)'\n\
             plot {}\n\
             unset multiplot\n",
            gp_single(&format!("{out}/chart.png")),
            gp_double(&title),
            gp_double(&subtitle),
            rx.join(", "),
            lost.join(", ")
        ))
    }
}

/// Writes table.txt, results.json, chart.dat and (with data) chart.gp; Ok(true) when every run
/// completed and added up.
pub fn report(args: XdpArgs) -> Result<bool, String> {
    let out = args.out.clone();
    let bench = Bench::read(args)?;
    record::write(&out.join("table.txt"), &bench.table())?;
    record::write(&out.join("results.json"), &bench.json())?;
    record::write(&out.join("chart.dat"), &bench.chart_data())?;
    let gp = out.join("chart.gp");
    match bench.chart_program() {
        Some(p) => record::write(&gp, &p)?,
        None => {
            log("no run completed: no chart");
            let _ = std::fs::remove_file(&gp);
            return Ok(false);
        }
    }
    Ok(!bench.failed)
}

fn log(msg: &str) {
    eprintln!("xdp-bench: {msg}");
}

fn threads_label(t: u32) -> String {
    format!("{t} thread{}", if t == 1 { "" } else { "s" })
}

fn label(b: &str) -> &'static str {
    match b {
        "vhost-user" => "vhost-user-tap",
        "tap" => "QEMU tap",
        _ => "vhost-net",
    }
}

fn sublabel(b: &str) -> &'static str {
    match b {
        "vhost-user" => "(this daemon)",
        "tap" => "(vhost=off)",
        _ => "(vhost=on)",
    }
}

/// A rate as the table shows it: Mpps from 10 000 frames/s, whole frames/s below.
fn rate(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(v) if v >= 10_000.0 => format!("{:.3} Mpps", v / 1e6),
        Some(v) => format!("{} pps", (v + 0.5) as i64),
    }
}

fn mpps(v: Option<f64>) -> String {
    match v {
        Some(v) => format!("\t{:.6}", v / 1e6),
        None => "\tNaN".into(),
    }
}

/// A gnuplot single-quoted string (no escapes inside; a quote is doubled).
fn gp_single(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A gnuplot double-quoted string.
fn gp_double(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::super::prom::tests::daemon_scrape;
    use super::*;

    fn args(out: &Path) -> XdpArgs {
        XdpArgs {
            out: out.to_path_buf(),
            backends: "vhost-user,tap,vhost-net".into(),
            unavailable: "vhost-net".into(),
            threads: "1".into(),
            seconds: 2,
            runs: 1,
            qdisc: "fq_codel".into(),
            qemu_line: "QEMU emulator version 10.0.2".into(),
            qemu_version: "10.0.2".into(),
            accel: "tcg".into(),
            cpu_model: String::new(),
            intx: false,
            host_kernel: "6.18.0".into(),
            host_cpu: "AMD EPYC".into(),
            host_cpus: 2,
            load_start: "0.10 0.20 0.30".into(),
            load_end: "1.00 0.50 0.40".into(),
            smp: 1,
            daemon_args: String::new(),
            bench_seconds: "42.0".into(),
        }
    }

    /// A run directory as xdp-bench.sh leaves it.
    fn write_run(out: &Path, backend: &str, sent: u64, xdp: (u64, u64), tun: u64, rx: u64) {
        let dir = out.join("runs").join(format!("{backend}-t1-r1"));
        std::fs::create_dir_all(&dir).unwrap();
        let w = |f: &str, s: &str| std::fs::write(dir.join(f), s).unwrap();
        w(
            "blast.out",
            &format!(
                "sent={sent} accepted={sent} enobufs=0 seconds=2.000 threads=1 frame_bytes=60\n"
            ),
        );
        w(
            "qdisc.json",
            r#"[{"kind":"pfifo_fast","handle":"0:","root":true,"refcnt":2,"options":{},"bytes":0,"packets":100,"drops":0,"overlimits":0,"requeues":0,"backlog":0,"qlen":0}]"#,
        );
        w(
            "link.json",
            &format!(
                r#"[{{"ifname":"vut0","stats64":{{"rx":{{"packets":0,"dropped":0}},"tx":{{"bytes":0,"packets":{},"errors":0,"dropped":{tun}}}}}}}]"#,
                xdp.1 - xdp.0
            ),
        );
        w(
            "console.log",
            "VUT-BOOT kernel=6.1.0-57-amd64 x\r\nVUT-XDP-READY mode=native prog_id=7\r\nVUT-XDP 0.5 0 0\r\n",
        );
        if backend == "vhost-user" {
            w("metrics.txt", &daemon_scrape(rx, 0));
            w(
                "daemon.log",
                "[x INFO  vhost_user_tap::backpressure] backpressure off (stock mode): this kernel's tun lacks it\n",
            );
        }
        w(
            "run.txt",
            &format!(
                "boot_seconds=9.5\nxdp_before={}\nxdp_after={}\n",
                xdp.0, xdp.1
            ),
        );
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vut-report-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn balanced_runs_make_the_table_json_and_chart() {
        let out = tempdir("xdp-ok");
        // 30 000 sent: 10 000 received (after 5 already counted), 20 000 tun drops.
        write_run(&out, "vhost-user", 30_000, (5, 10_005), 20_000, 10_000);
        write_run(&out, "tap", 30_000, (0, 8_000), 22_000, 0);
        assert!(report(args(&out)).unwrap());
        let table = std::fs::read_to_string(out.join("table.txt")).unwrap();
        let expected = "\
XDP-drop guest benchmark: 64-byte frames (60 B + FCS) into the tap through qdisc pfifo_fast, 2 s x 1 run(s) per cell
QEMU: QEMU emulator version 10.0.2, accel: TCG (no KVM: emulated guest, absolute numbers are far below a KVM host's)
host: Linux 6.18.0, AMD EPYC (2 CPUs), load average 0.10 0.20 0.30 at start, 1.00 0.50 0.40 at end; guest: Linux 6.1.0-57-amd64, 1 vCPU, XDP_DROP in virtio_net
daemon: backpressure off (stock mode)
+------------+-------------+----------------+----------------+----------+----------------+----------+
| 1 thread                 | vhost-user-tap | QEMU tap       | diff     | vhost-net      | diff     |
| sending                  | (this daemon)  | (vhost=off)    |          | (vhost=on)     |          |
+------------+-------------+----------------+----------------+----------+----------------+----------+
| XDP drop   | Received    | 5000 pps       | 4000 pps       | -20.0%   | n/a            |          |
| in guest   | Lost/s      | 0.010 Mpps     | 0.011 Mpps     |          | n/a            |          |
|            | Sent/s      | 0.015 Mpps     | 0.015 Mpps     |          | n/a            |          |
+------------+-------------+----------------+----------------+----------+----------------+----------+
Received = frames counted by the guest's XDP program / T; Lost/s = (qdisc drops + tun ring drops
(tap tx_dropped) + daemon RX drops) / T; Sent/s = frames handed to the kernel / T. Means over runs.
diff: Received vs the first column. n/a: backend not available on this host.

Per run (frames): sent = received + qdisc + tun + daemon (+ in flight, 0 after the drain)
backend    thr run seconds        sent    received      qdisc         tun  daemon flight     xdp boot_s
vhost-user   1   1   2.000       30000       10000          0       20000       0      0  native    9.5
tap          1   1   2.000       30000        8000          0       22000       0      0  native    9.5

Total benchmark time: 42.0 s
";
        assert_eq!(table, expected);

        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap())
                .unwrap();
        assert_eq!(json["failed"], false);
        assert_eq!(json["runs_per_cell"], 1);
        assert_eq!(json["unavailable"][0], "vhost-net");
        assert_eq!(json["summary"][0]["received_pps"], 5000.0);
        let r = &json["runs"][0];
        assert_eq!(
            (
                r["sent"].as_u64(),
                r["received"].as_u64(),
                r["tun_drops"].as_u64()
            ),
            (Some(30_000), Some(10_000), Some(20_000))
        );
        assert_eq!(r["daemon_rx_frames"], 10_000);
        assert_eq!(json["runs"][1]["daemon_rx_frames"], serde_json::Value::Null);

        let dat = std::fs::read_to_string(out.join("chart.dat")).unwrap();
        assert_eq!(
            dat,
            "# threads\tvhost-user_rx_mpps\ttap_rx_mpps\tvhost-net_rx_mpps\tvhost-user_lost_mpps\
             \ttap_lost_mpps\tvhost-net_lost_mpps\n\
             \"1 thread\"\t0.005000\t0.004000\tNaN\t0.010000\t0.011000\tNaN\n"
        );
        let gp = std::fs::read_to_string(out.join("chart.gp")).unwrap();
        assert!(
            gp.contains("using 2:xtic(1) title 'vhost-user-tap'"),
            "{gp}"
        );
        assert!(
            gp.contains("using 6:xtic(1) title 'QEMU tap (vhost=off)'"),
            "{gp}"
        );
        assert!(gp.contains("vhost-net (vhost=on): n/a"), "{gp}");
        let _ = std::fs::remove_dir_all(&out);
    }

    #[test]
    fn a_run_that_does_not_add_up_is_reported_and_fails() {
        let out = tempdir("xdp-bad");
        // 3 frames vanished: neither received nor dropped anywhere.
        write_run(&out, "vhost-user", 30_003, (0, 10_000), 20_000, 10_000);
        write_run(&out, "tap", 30_000, (0, 8_000), 22_000, 0);
        assert!(!report(args(&out)).unwrap());
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap())
                .unwrap();
        assert_eq!(json["failed"], true);
        assert_eq!(json["runs"][0]["in_flight"], 3);
        let table = std::fs::read_to_string(out.join("table.txt")).unwrap();
        assert!(table.contains("SOME RUNS FAILED"), "{table}");

        // The daemon delivered a frame the guest did not count.
        write_run(&out, "vhost-user", 30_000, (0, 10_000), 20_000, 10_001);
        assert!(!report(args(&out)).unwrap());
        let _ = std::fs::remove_dir_all(&out);
    }

    #[test]
    fn a_missing_counter_fails_the_run_instead_of_reading_zero() {
        let out = tempdir("xdp-missing");
        write_run(&out, "vhost-user", 30_000, (0, 10_000), 20_000, 10_000);
        write_run(&out, "tap", 30_000, (0, 8_000), 22_000, 0);
        let metrics = out.join("runs/vhost-user-t1-r1/metrics.txt");
        let text: String = std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .filter(|l| !l.contains("direction=\"rx\""))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&metrics, text).unwrap();
        assert!(!report(args(&out)).unwrap());
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap())
                .unwrap();
        assert_eq!(json["failed"], true);
        assert_eq!(
            json["runs"].as_array().unwrap().len(),
            1,
            "only the tap run"
        );

        // A run whose counters were never collected (no run.txt) fails too.
        std::fs::remove_file(out.join("runs/tap-t1-r1/run.txt")).unwrap();
        std::fs::write(&metrics, daemon_scrape(10_000, 0)).unwrap();
        assert!(!report(args(&out)).unwrap());
        let _ = std::fs::remove_dir_all(&out);
    }

    #[test]
    fn no_completed_run_writes_no_chart_program() {
        let out = tempdir("xdp-none");
        assert!(!report(args(&out)).unwrap());
        assert!(!out.join("chart.gp").exists());
        assert!(out.join("table.txt").exists());
        let _ = std::fs::remove_dir_all(&out);
    }

    #[test]
    fn backpressure_phrase_from_the_startup_line() {
        assert_eq!(
            backpressure_phrase("[t INFO  x] backpressure off (stock mode): lacks it").as_deref(),
            Some("backpressure off (stock mode)")
        );
        assert_eq!(
            backpressure_phrase("[t INFO  x] backpressure on; tap vut0").as_deref(),
            Some("backpressure on")
        );
        assert_eq!(backpressure_phrase("--backpressure only"), None);
    }
}
