//! `vut-report backpressure-lab`: the backpressure lab's accounting
//! (qemu-scripts/backpressure-lab.sh), from the VM's console log (markers of
//! qemu-scripts/lab/init.sh). Per case the VM reports raw data only:
//! - `VUT-LAB-RESULT <tag> k=v ...`: the sender's counts (`sent`, `errors`, `timeouts`,
//!   `elapsed_ms`), the tap's sysfs counters (`tap_tx_packets`, `tap_tx_dropped`), what the
//!   sampler saw (`read_in_window`, `peak_qdisc_qlen`, `stalls`, `max_sample_gap_ms`) and the
//!   drain (`drained`, `drain_ms`);
//! - `VUT-LAB-QDISC <tag>: <tc -s -j qdisc show dev vut0>`;
//! - `VUT-LAB-GUEST <tag>: <the synthetic guest's JSON report>` (`rx_frames`: delivered);
//! - `VUT-LAB-METRIC <tag>: <line>`: the daemon's `--metrics` scrape, taken after the drain and
//!   after the guest left, right before the daemon was stopped: its counters (`rx_frames`, RX
//!   drops, `rx_stops`, `rx_wakes`) come from here.
//!
//! Every case must add up after the drain: sent = delivered + tun ring drops + qdisc drops +
//! daemon drops + qdisc backlog, with nothing left in the tun ring, the daemon or the guest's
//! ring; the qdisc must be the one asked for; the daemon's scrape must agree with the kernel's
//! own counters. Prints the table, writes table.txt and results.json with `--out`, and fails
//! (exit 1) unless every case ran (or was skipped), drained and added up.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;
use serde_json::Value;

use super::prom::Scrape;
use super::record::{self, Record, RootQdisc};

#[derive(Debug, Args)]
pub struct LabArgs {
    /// The VM's console log (carriage returns removed or not).
    #[arg(long)]
    pub console: PathBuf,
    /// Write table.txt and results.json here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The lab kernel's release (uname -r) and Debian package version.
    #[arg(long)]
    pub kernel: String,
    #[arg(long)]
    pub kernel_version: String,
    /// `qemu --version`'s first line.
    #[arg(long, allow_hyphen_values = true)]
    pub qemu_line: String,
    /// The synthetic guest's harvest rate, frames/s.
    #[arg(long)]
    pub rx_rate: u64,
    /// Sending time per case.
    #[arg(long)]
    pub seconds: u64,
    #[arg(long)]
    pub pfifo_limit: u64,
    /// UDP payload bytes.
    #[arg(long)]
    pub payload: u64,
    /// How many times the VM was started (a kernel crash under TCG is retried).
    #[arg(long)]
    pub vm_attempts: u32,
    /// The matrix, comma-separated, as passed to the VM.
    #[arg(long)]
    pub threads: String,
    #[arg(long)]
    pub modes: String,
    #[arg(long)]
    pub qdiscs: String,
    /// The daemon has no --backpressure option (backpressure cases were skipped).
    #[arg(long)]
    pub no_backpressure_option: bool,
    /// A kernel crash line of a VM attempt that was repeated (repeatable).
    #[arg(long = "crash", allow_hyphen_values = true)]
    pub crashes: Vec<String>,
}

/// One case of results.json.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Case {
    pub qdisc: String,
    pub mode: String,
    pub threads: u32,
    pub send_elapsed_ms: u64,
    pub sent: u64,
    pub send_errors: u64,
    pub send_timeouts: u64,
    pub delivered: u64,
    pub read_in_window: u64,
    pub received_pps: f64,
    pub lost_pps: f64,
    pub aqm_drop_pps: f64,
    pub tun_ring_drops: u64,
    pub qdisc_tail_drops: u64,
    pub qdisc_aqm_drops: u64,
    pub qdisc_drops: u64,
    pub qdisc_requeues: u64,
    pub qdisc_backlog: u64,
    pub peak_qdisc_qlen: u64,
    pub daemon_drops: u64,
    pub stall_episodes: u64,
    pub max_sample_gap_ms: u64,
    pub daemon_rx_frames: u64,
    pub daemon_rx_stops: u64,
    pub daemon_rx_wakes: u64,
    pub left_in_tun_ring: i64,
    pub left_in_daemon: i64,
    pub left_in_guest_ring: i64,
    pub drained: bool,
    pub drain_ms: u64,
    pub balanced: bool,
    pub qdisc_as_asked: bool,
    pub metrics_agree: bool,
}

impl Case {
    fn lost(&self) -> u64 {
        self.tun_ring_drops + self.qdisc_tail_drops + self.qdisc_aqm_drops + self.daemon_drops
    }
}

#[derive(Serialize)]
struct Results<'a> {
    kernel: &'a str,
    kernel_version: &'a str,
    tun: &'a str,
    qemu: &'a str,
    rx_rate: u64,
    seconds: u64,
    pfifo_limit: u64,
    payload: u64,
    vm_attempts: u32,
    daemon_backpressure_option: bool,
    /// Always true now: the daemon's counters come from its scrape (the lab needs --metrics).
    daemon_metrics: bool,
    skipped_cases: usize,
    complete: bool,
    cases: &'a [Case],
}

/// The lab's outcome.
#[derive(Debug)]
pub struct Lab {
    pub cases: Vec<Case>,
    pub notes: Vec<String>,
    pub skipped: usize,
    pub tun: String,
    /// Every case ran (or was skipped), drained, added up, had its qdisc and agreeing metrics.
    pub ok: bool,
}

/// Per second, one decimal (2 drops in 10 s must not print as 0).
fn rate(n: u64, ms: u64) -> f64 {
    if ms == 0 {
        return 0.0;
    }
    format!("{:.1}", n as f64 * 1000.0 / ms as f64)
        .parse()
        .expect("a formatted number")
}

fn human(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.3} Mpps", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.2} kpps", r / 1e3)
    } else if r == 0.0 {
        "0 pps".into()
    } else {
        format!("{r:.1} pps")
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The text after `<marker> <tag>: ` on each line that has it.
fn tagged<'a>(lines: &'a [String], marker: &'a str, tag: &str) -> Vec<&'a str> {
    let needle = format!("{marker} {tag}: ");
    lines
        .iter()
        .filter_map(|l| l.find(&needle).map(|i| &l[i + needle.len()..]))
        .collect()
}

/// Reads one case from its RESULT line and the lines tagged with it. Err: a number it needs is
/// missing or unreadable (never read as 0).
fn read_case(
    result: &Record,
    lines: &[String],
    args: &LabArgs,
    notes: &mut Vec<String>,
) -> Result<Case, String> {
    let q = result.str("qdisc")?.to_string();
    let mode = result.str("mode")?.to_string();
    let threads: u32 = result.num("threads")?;
    let tag = format!("qdisc={q} mode={mode} threads={threads}");

    let guest = tagged(lines, "VUT-LAB-GUEST", &tag);
    let guest: Value = serde_json::from_str(
        guest
            .last()
            .ok_or("no VUT-LAB-GUEST line (the synthetic guest's report)")?,
    )
    .map_err(|e| format!("the synthetic guest's report: {e}"))?;
    let delivered = record::json_count(&guest, "rx_frames", "the synthetic guest's report")?;

    let metric_lines = tagged(lines, "VUT-LAB-METRIC", &tag);
    if metric_lines.is_empty() {
        return Err("no VUT-LAB-METRIC lines (the daemon's scrape)".into());
    }
    let scrape = Scrape::parse(&metric_lines.join("\n"))?;
    let daemon = scrape.daemon_counters()?;

    let qline = tagged(lines, "VUT-LAB-QDISC", &tag);
    let qline = qline.last().ok_or("no VUT-LAB-QDISC line")?;
    let qd = RootQdisc::parse(qline, "VUT-LAB-QDISC")?;
    let qdisc_ok = qd.kind == q
        && (q != "pfifo"
            || qd.raw.pointer("/options/limit").and_then(Value::as_u64) == Some(args.pfifo_limit));
    if !qdisc_ok {
        notes.push(format!(
            "{tag}: the qdisc is not the one asked for: {qline}"
        ));
    }
    let (qtail, qaqm) = if q == "fq_codel" {
        // fq_codel counts every drop in "drops"; drop_overlimit (which includes the memory-limit
        // drops) are its capacity drops. The rest are CoDel's drops at dequeue: a policy
        // decision (sojourn above target for an interval), not a full queue.
        let over = record::json_count(&qd.raw, "drop_overlimit", "fq_codel's statistics")?;
        (over, qd.drops.saturating_sub(over))
    } else {
        (qd.drops, 0)
    };

    let n = |k: &str| result.num::<u64>(k);
    let tun = n("tap_tx_dropped")?;
    // tun counts tx_packets when the daemon reads a frame.
    let read_total = n("tap_tx_packets")?;
    let daemon_rx = daemon.get("rx_frames");
    let daemon_drops = daemon.rx_drops();
    let ms = n("elapsed_ms")?;
    let drained = result.str("drained")? == "yes";
    let mut c = Case {
        qdisc: q.clone(),
        mode: mode.clone(),
        threads,
        send_elapsed_ms: ms,
        sent: n("sent")?,
        send_errors: n("errors")?,
        send_timeouts: n("timeouts")?,
        delivered,
        read_in_window: n("read_in_window")?,
        received_pps: rate(n("read_in_window")?, ms),
        lost_pps: 0.0,
        aqm_drop_pps: rate(qaqm, ms),
        tun_ring_drops: tun,
        qdisc_tail_drops: qtail,
        qdisc_aqm_drops: qaqm,
        qdisc_drops: qd.drops,
        qdisc_requeues: qd.requeues,
        qdisc_backlog: qd.qlen,
        peak_qdisc_qlen: n("peak_qdisc_qlen")?,
        daemon_drops,
        stall_episodes: n("stalls")?,
        max_sample_gap_ms: n("max_sample_gap_ms")?,
        daemon_rx_frames: daemon_rx,
        daemon_rx_stops: daemon.get("rx_stops"),
        daemon_rx_wakes: daemon.get("rx_wakes"),
        // Where frames could still be after the drain: the tun ring (qdisc sent - tun drops -
        // frames the daemon read), the daemon (read - put in the used ring - daemon drops) and
        // the guest's used ring (daemon rx_frames - harvested). Each must be 0; a nonzero one
        // names the stage whose numbers do not add up.
        left_in_tun_ring: qd.packets as i64 - tun as i64 - read_total as i64,
        left_in_daemon: read_total as i64 - daemon_rx as i64 - daemon_drops as i64,
        left_in_guest_ring: daemon_rx as i64 - delivered as i64,
        drained,
        drain_ms: n("drain_ms")?,
        balanced: false,
        qdisc_as_asked: qdisc_ok,
        metrics_agree: false,
    };
    c.lost_pps = rate(c.lost(), ms);
    c.balanced = c.delivered + c.lost() + c.qdisc_backlog == c.sent
        && c.left_in_tun_ring == 0
        && c.left_in_daemon == 0
        && c.left_in_guest_ring == 0
        && drained;
    if !c.balanced {
        notes.push(format!(
            "{tag}: does not add up: sent {} vs delivered {} + lost {} + backlog {}; left in tun \
             ring {}, daemon {}, guest ring {}{}",
            c.sent,
            c.delivered,
            c.lost(),
            c.qdisc_backlog,
            c.left_in_tun_ring,
            c.left_in_daemon,
            c.left_in_guest_ring,
            if drained { "" } else { "; not drained" }
        ));
    }

    // The daemon's own scrape must tell the same story as the kernel's counters (one scrape
    // answers "where were frames lost").
    let mut mism = Vec::new();
    let mut check = |name: &str, labels: &[(&str, &str)], expected: u64| match scrape
        .count(&format!("vhost_user_tap_{name}"), labels)
    {
        Ok(v) if v == expected => {}
        Ok(v) => mism.push(format!("{name} = {v}, expected {expected}")),
        Err(_) => mism.push(format!("{name} = missing, expected {expected}")),
    };
    check("tap_tx_dropped_total", &[], tun);
    check("tap_tx_packets_total", &[], read_total);
    check("qdisc_packets_total", &[], qd.packets);
    check("qdisc_dropped_packets_total", &[], qd.drops);
    let l = |reason| [("tap", "vut0"), ("qdisc", q.as_str()), ("reason", reason)];
    check("qdisc_dropped_packets_total", &l("limit"), qtail);
    if q == "fq_codel" {
        check("qdisc_dropped_packets_total", &l("aqm"), qaqm);
    }
    check("qdisc_backlog_packets", &[], qd.qlen);
    check("backpressure", &[], u64::from(mode == "backpressure"));
    c.metrics_agree = mism.is_empty();
    if !c.metrics_agree {
        notes.push(format!("{tag}: metrics disagree: {}", mism.join(";")));
    }
    if mode == "backpressure" && tun > 0 {
        notes.push(format!(
            "{tag}: {tun} tun ring drops despite backpressure (the LLTX race: a producer found \
             the ring full)"
        ));
    }
    if c.stall_episodes > 0 {
        notes.push(format!(
            "{tag}: {} time(s) no frame moved between two samples (VUT-LAB-STALL lines in the \
             console log)",
            c.stall_episodes
        ));
    }
    if qaqm > 0 {
        notes.push(format!(
            "{tag}: {qaqm} fq_codel AQM drops (sojourn above 5 ms for 100 ms: policy, not a full \
             queue)"
        ));
    }
    Ok(c)
}

fn words(s: &str) -> Vec<&str> {
    s.split(',').filter(|w| !w.is_empty()).collect()
}

impl Lab {
    pub fn read(args: &LabArgs, console: &str) -> Lab {
        let lines = record::console_lines(console);
        let mut lab = Lab {
            cases: Vec::new(),
            notes: Vec::new(),
            skipped: lines
                .iter()
                .filter(|l| l.starts_with("VUT-LAB-SKIP "))
                .count(),
            tun: lines
                .iter()
                .find_map(|l| l.strip_prefix("VUT-LAB-TUN "))
                .unwrap_or("")
                .to_string(),
            ok: true,
        };
        for l in &lines {
            let Some(rest) = l.strip_prefix("VUT-LAB-RESULT ") else {
                continue;
            };
            let result = Record::from_words(rest, "VUT-LAB-RESULT");
            let mut notes = Vec::new();
            match read_case(&result, &lines, args, &mut notes) {
                Ok(c) => {
                    lab.ok &= c.balanced && c.qdisc_as_asked && c.metrics_agree;
                    lab.cases.push(c);
                }
                Err(e) => {
                    lab.ok = false;
                    notes.push(format!(
                        "{}: unreadable: {e}",
                        rest.split(" sent=").next().unwrap_or(rest)
                    ));
                }
            }
            lab.notes.extend(notes);
        }
        let expected =
            words(&args.threads).len() * words(&args.modes).len() * words(&args.qdiscs).len();
        if lab.cases.len() + lab.skipped != expected {
            lab.ok = false;
            lab.notes.push(format!(
                "{} of {expected} cases reported a result ({} skipped)",
                lab.cases.len(),
                lab.skipped
            ));
        }
        for l in &lines {
            if let Some(e) = l.strip_prefix("VUT-LAB-") {
                if e.starts_with("ERROR") {
                    lab.ok = false;
                    lab.notes.push(e.to_string());
                }
            }
        }
        for crash in &args.crashes {
            lab.notes.push(format!(
                "a VM attempt was repeated after a kernel crash under TCG: {crash}"
            ));
        }
        lab
    }

    fn find(&self, q: &str, mode: &str, n: &str) -> Option<&Case> {
        self.cases
            .iter()
            .find(|c| c.qdisc == q && c.mode == mode && c.threads.to_string() == n)
    }

    pub fn table(&self, a: &LabArgs) -> String {
        let mut t = vec![
            format!(
                "Linux {} ({}), QEMU TCG, 2 vCPUs; tun {}",
                a.kernel, a.kernel_version, self.tun
            ),
            format!(
                "guest harvests {} frames/s; {} s of sending per case; {}-byte UDP payloads",
                a.rx_rate, a.seconds, a.payload
            ),
            "Received: frames the daemon took from the tap while the senders ran, per second."
                .into(),
            "Lost/s: every drop (tun ring + qdisc + daemon) per second of sending; AQM/s: the part"
                .into(),
            "of it that was fq_codel's CoDel policy drops, not a full queue.".into(),
        ];
        let sep = "+------------+----------+--------------+----------------+";
        for q in words(&a.qdiscs) {
            t.push(String::new());
            t.push(match q {
                "fq_codel" => {
                    "qdisc fq_codel (kernel defaults: limit 10240p, target 5ms, interval 100ms)"
                        .into()
                }
                "pfifo" => format!("qdisc pfifo limit {}", a.pfifo_limit),
                "pfifo_fast" => {
                    "qdisc pfifo_fast (lockless; limit = txqueuelen 1000 per band)".into()
                }
                other => format!("qdisc {other}"),
            });
            t.push(sep.into());
            t.push(format!(
                "| {:<10} | {:<8} | {:>12} | {:>14} |",
                "", "", "Stock", "Backpressure"
            ));
            t.push(sep.into());
            for n in words(&a.threads) {
                let mut label = format!("{n} thread{}", if n == "1" { "" } else { "s" });
                for what in ["Received", "Lost/s", "AQM/s"] {
                    if what == "AQM/s" && q != "fq_codel" {
                        continue;
                    }
                    let cell = |mode| {
                        self.find(q, mode, n).map_or("-".to_string(), |c| {
                            human(match what {
                                "Received" => c.received_pps,
                                "Lost/s" => c.lost_pps,
                                _ => c.aqm_drop_pps,
                            })
                        })
                    };
                    t.push(format!(
                        "| {label:<10} | {what:<8} | {:>12} | {:>14} |",
                        cell("stock"),
                        cell("backpressure")
                    ));
                    label.clear();
                }
                t.push(sep.into());
            }
        }
        t.push(String::new());
        t.extend(
            [
                "Totals (frames): sent = delivered + tun-ring + q-tail + q-aqm + daemon + backlog.",
                "left: frames inferred still in the tun ring, daemon or guest ring after draining (must",
                "be 0); peak-q: largest qdisc queue seen; stall: sends that waited 5 s for buffer room;",
                "gap: longest interval between two rounds of the VM's sampler, in ms (about 1000 when",
                "the VM has CPU to spare; more when its vCPUs or the host's CPUs are saturated).",
            ]
            .map(String::from),
        );
        t.push(format!(
            "{:<8} {:<12} {:>2} {:>9} {:>9} {:>9} {:>7} {:>7} {:>6} {:>7} {:>5} {:>6} {:>5} {:>6} {:>4}",
            "qdisc", "mode", "th", "sent", "delivered", "tun-ring", "q-tail", "q-aqm", "daemon",
            "backlog", "left", "peak-q", "stall", "gap", "ok"
        ));
        if self.cases.is_empty() {
            t.push(String::new());
        }
        for c in &self.cases {
            t.push(format!(
                "{:<8} {:<12} {:>2} {:>9} {:>9} {:>9} {:>7} {:>7} {:>6} {:>7} {:>5} {:>6} {:>5} {:>6} {:>4}",
                c.qdisc,
                c.mode,
                c.threads,
                c.sent,
                c.delivered,
                c.tun_ring_drops,
                c.qdisc_tail_drops,
                c.qdisc_aqm_drops,
                c.daemon_drops,
                c.qdisc_backlog,
                c.left_in_tun_ring + c.left_in_daemon + c.left_in_guest_ring,
                c.peak_qdisc_qlen,
                c.send_timeouts,
                c.max_sample_gap_ms,
                yes_no(c.balanced)
            ));
        }
        if !self.notes.is_empty() {
            t.push(String::new());
            t.extend(self.notes.iter().map(|n| format!("note: {n}")));
        }
        t.join("\n") + "\n"
    }

    pub fn json(&self, a: &LabArgs) -> String {
        let r = Results {
            kernel: &a.kernel,
            kernel_version: &a.kernel_version,
            tun: &self.tun,
            qemu: &a.qemu_line,
            rx_rate: a.rx_rate,
            seconds: a.seconds,
            pfifo_limit: a.pfifo_limit,
            payload: a.payload,
            vm_attempts: a.vm_attempts,
            daemon_backpressure_option: !a.no_backpressure_option,
            daemon_metrics: true,
            skipped_cases: self.skipped,
            complete: self.ok,
            cases: &self.cases,
        };
        serde_json::to_string(&r).expect("serialising the results") + "\n"
    }
}

/// Prints the table; writes table.txt and results.json with --out. Ok(true) when complete.
pub fn report(args: LabArgs) -> Result<bool, String> {
    let console = record::read(&args.console)?;
    let lab = Lab::read(&args, &console);
    let table = lab.table(&args);
    print!("{table}");
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
        record::write(&out.join("table.txt"), &table)?;
        record::write(&out.join("results.json"), &lab.json(&args))?;
    }
    Ok(lab.ok)
}

#[cfg(test)]
mod tests {
    use super::super::prom::tests::daemon_scrape;
    use super::*;

    fn args() -> LabArgs {
        LabArgs {
            console: PathBuf::new(),
            out: None,
            kernel: "7.3.4+deb13-cloud-amd64".into(),
            kernel_version: "7.3.4-1~bpo13+1".into(),
            qemu_line: "QEMU emulator version 7.2.22".into(),
            rx_rate: 5000,
            seconds: 2,
            pfifo_limit: 1000,
            payload: 18,
            vm_attempts: 1,
            threads: "1".into(),
            modes: "stock,backpressure".into(),
            qdiscs: "pfifo".into(),
            no_backpressure_option: false,
            crashes: Vec::new(),
        }
    }

    /// One case's console lines as lab/init.sh prints them. `sent` frames: `delivered` reach the
    /// guest, `tun` are tail-dropped in the tun ring; the daemon's scrape says `daemon_rx`.
    fn case(mode: &str, sent: u64, delivered: u64, tun: u64, daemon_rx: u64) -> String {
        let tag = format!("qdisc=pfifo mode={mode} threads=1");
        let bp = u64::from(mode == "backpressure");
        let mut s = format!(
            "VUT-LAB-CASE-START {tag}\n\
             VUT-LAB-SEND threads=1 sent={sent} errors=0 timeouts=0 elapsed_ms=2000\n\
             VUT-LAB-QDISC {tag}: [{{\"kind\":\"pfifo\",\"handle\":\"8001:\",\"root\":true,\"refcnt\":2,\
             \"options\":{{\"limit\":1000}},\"bytes\":1,\"packets\":{sent},\"drops\":0,\"overlimits\":0,\
             \"requeues\":0,\"backlog\":0,\"qlen\":0}}]\n\
             VUT-LAB-GUEST {tag}: {{\"rx_frames\":{delivered},\"rx_bytes\":0,\"stats\":{{\"rx_frames\":1}}}}\n\
             VUT-LAB-RESULT {tag} sent={sent} errors=0 timeouts=0 elapsed_ms=2000 \
             read_in_window={delivered} delivered={delivered} tap_tx_packets={delivered} \
             tap_tx_dropped={tun} tap_tx_errors=0 tap_rx_packets=0 drained=yes drain_ms=1250 \
             peak_qdisc_qlen=238 samples=3 stalls=0 max_sample_gap_ms=700\n"
        );
        for l in daemon_scrape(daemon_rx, 0).lines() {
            let l = l.replace("{tap=\"vut0\"} 0", &format!("{{tap=\"vut0\"}} {bp}"));
            s += &format!("VUT-LAB-METRIC {tag}: {l}\n");
        }
        for (name, v) in [
            ("tap_tx_packets_total{tap=\"vut0\"}", delivered),
            ("tap_tx_dropped_total{tap=\"vut0\"}", tun),
            (
                "qdisc_dropped_packets_total{tap=\"vut0\",qdisc=\"pfifo\",reason=\"limit\"}",
                0,
            ),
            (
                "qdisc_dropped_packets_total{tap=\"vut0\",qdisc=\"pfifo\",reason=\"aqm\"}",
                0,
            ),
            ("qdisc_packets_total{tap=\"vut0\",qdisc=\"pfifo\"}", sent),
            ("qdisc_backlog_packets{tap=\"vut0\",qdisc=\"pfifo\"}", 0),
        ] {
            s += &format!("VUT-LAB-METRIC {tag}: vhost_user_tap_{name} {v}\n");
        }
        s
    }

    fn console(cases: &[String]) -> String {
        format!(
            "VUT-LAB-BOOT kernel=7.3.4+deb13-cloud-amd64 cpus=2\r\n\
             VUT-LAB-TUN features=0x71f3 backpressure=yes\n{}VUT-LAB-DONE\n",
            cases.concat()
        )
    }

    #[test]
    fn balanced_cases_make_the_table_and_json() {
        let text = console(&[
            case("stock", 200_000, 10_000, 190_000, 10_000),
            case("backpressure", 11_000, 11_000, 0, 11_000),
        ]);
        let a = args();
        let lab = Lab::read(&a, &text);
        assert!(lab.ok, "{:?}", lab.notes);
        let expected = "\
Linux 7.3.4+deb13-cloud-amd64 (7.3.4-1~bpo13+1), QEMU TCG, 2 vCPUs; tun features=0x71f3 backpressure=yes
guest harvests 5000 frames/s; 2 s of sending per case; 18-byte UDP payloads
Received: frames the daemon took from the tap while the senders ran, per second.
Lost/s: every drop (tun ring + qdisc + daemon) per second of sending; AQM/s: the part
of it that was fq_codel's CoDel policy drops, not a full queue.

qdisc pfifo limit 1000
+------------+----------+--------------+----------------+
|            |          |        Stock |   Backpressure |
+------------+----------+--------------+----------------+
| 1 thread   | Received |    5.00 kpps |      5.50 kpps |
|            | Lost/s   |   95.00 kpps |          0 pps |
+------------+----------+--------------+----------------+

Totals (frames): sent = delivered + tun-ring + q-tail + q-aqm + daemon + backlog.
left: frames inferred still in the tun ring, daemon or guest ring after draining (must
be 0); peak-q: largest qdisc queue seen; stall: sends that waited 5 s for buffer room;
gap: longest interval between two rounds of the VM's sampler, in ms (about 1000 when
the VM has CPU to spare; more when its vCPUs or the host's CPUs are saturated).
qdisc    mode         th      sent delivered  tun-ring  q-tail   q-aqm daemon backlog  left peak-q stall    gap   ok
pfifo    stock         1    200000     10000    190000       0       0      0       0     0    238     0    700  yes
pfifo    backpressure  1     11000     11000         0       0       0      0       0     0    238     0    700  yes
";
        assert_eq!(lab.table(&a), expected);
        let json: Value = serde_json::from_str(&lab.json(&a)).unwrap();
        assert_eq!(json["complete"], true);
        assert_eq!(json["tun"], "features=0x71f3 backpressure=yes");
        let c = &json["cases"][0];
        assert_eq!(c["received_pps"], 5000.0);
        assert_eq!(c["lost_pps"], 95000.0);
        assert_eq!(c["tun_ring_drops"], 190_000);
        assert_eq!(c["daemon_rx_frames"], 10_000);
        assert_eq!(c["metrics_agree"], true);
        assert_eq!(json["cases"][1]["balanced"], true);
    }

    #[test]
    fn a_case_that_does_not_add_up_is_reported_and_fails() {
        // The daemon says it delivered one frame more than the guest harvested.
        let text = console(&[
            case("stock", 200_000, 10_000, 190_000, 10_001),
            case("backpressure", 11_000, 11_000, 0, 11_000),
        ]);
        let lab = Lab::read(&args(), &text);
        assert!(!lab.ok);
        let c = &lab.cases[0];
        assert!(!c.balanced);
        assert_eq!((c.left_in_daemon, c.left_in_guest_ring), (-1, 1));
        let table = lab.table(&args());
        assert!(table.contains("does not add up"), "{table}");
        assert!(table
            .lines()
            .any(|l| l.starts_with("pfifo    stock") && l.ends_with("  no")));

        // 5 frames lost without a trace.
        let text = console(&[
            case("stock", 200_005, 10_000, 190_000, 10_000),
            case("backpressure", 11_000, 11_000, 0, 11_000),
        ]);
        assert!(!Lab::read(&args(), &text).ok);
    }

    #[test]
    fn a_missing_counter_or_case_fails() {
        // The scrape lacks the daemon's RX drop counter: the case is unreadable, not 0 drops.
        let stock: String = case("stock", 200_000, 10_000, 190_000, 10_000)
            .lines()
            .filter(|l| !l.contains("direction=\"rx\""))
            .map(|l| format!("{l}\n"))
            .collect();
        let lab = Lab::read(
            &args(),
            &console(&[stock, case("backpressure", 11_000, 11_000, 0, 11_000)]),
        );
        assert!(!lab.ok);
        assert_eq!(lab.cases.len(), 1);
        assert!(
            lab.notes
                .iter()
                .any(|n| n.contains("unreadable") && n.contains("missing")),
            "{:?}",
            lab.notes
        );

        // A case that reported nothing (the VM logged an error instead).
        let text = console(&[
            case("stock", 200_000, 10_000, 190_000, 10_000),
            "VUT-LAB-ERROR qdisc=pfifo mode=backpressure threads=1: daemon did not start\n".into(),
        ]);
        let lab = Lab::read(&args(), &text);
        assert!(!lab.ok);
        assert!(
            lab.notes.iter().any(|n| n.starts_with("ERROR qdisc=pfifo")),
            "{:?}",
            lab.notes
        );

        // A skipped case is fine.
        let text = console(&[
            case("stock", 200_000, 10_000, 190_000, 10_000),
            "VUT-LAB-SKIP qdisc=pfifo mode=backpressure threads=1: no --backpressure\n".into(),
        ]);
        let lab = Lab::read(&args(), &text);
        assert!(lab.ok, "{:?}", lab.notes);
        assert_eq!(lab.skipped, 1);
    }

    #[test]
    fn metrics_that_disagree_with_the_kernel_fail() {
        let stock = case("stock", 200_000, 10_000, 190_000, 10_000).replace(
            "vhost_user_tap_tap_tx_dropped_total{tap=\"vut0\"} 190000",
            "vhost_user_tap_tap_tx_dropped_total{tap=\"vut0\"} 189999",
        );
        let lab = Lab::read(
            &args(),
            &console(&[stock, case("backpressure", 11_000, 11_000, 0, 11_000)]),
        );
        assert!(!lab.ok);
        assert!(!lab.cases[0].metrics_agree);
        assert!(
            lab.notes
                .iter()
                .any(|n| n.contains("tap_tx_dropped_total = 189999, expected 190000")),
            "{:?}",
            lab.notes
        );
    }
}
