//! The XDP-drop benchmark, run short inside `cargo test`: `qemu-scripts/xdp-bench.sh` with
//! QEMU 10.0.2 under TCG, 3 s per run, one run, 1 and 2 sender threads, this daemon and QEMU's
//! tap backend (about 60 s here).
//!
//! It checks what the benchmark's numbers rest on, not the numbers themselves (TCG on a shared
//! 2-core machine says little about speed):
//! - the guest counted frames with its XDP program, attached in native (driver) mode;
//! - the table (`table.txt`, with Received / Lost/s and TCG named), the JSON and the PNG chart
//!   were written (by `vut-report xdp-bench` from what the script collected: the daemon's
//!   counters from its `--metrics` scrape);
//! - the daemon's runs add up: `sent = received + qdisc drops + tun ring drops + daemon drops`,
//!   exactly, and the daemon delivered exactly the frames the guest counted.
//!
//! Tolerance for frames in flight: none. The script stops the sender, waits 1 s, then waits until
//! the guest's count is unchanged across one report interval (0.5 s), and only then reads the
//! counters. The frames still queued somewhere at that point (qdisc backlog, tun ring, the
//! daemon's staging buffer, the guest's RX ring) would drain in well under a millisecond at the
//! guest's rate, so after the wait there are none, and the script reports the remainder
//! (`in_flight = sent - received - losses`) per run. A nonzero remainder means frames were stuck
//! (a lost wake-up) or lost without being counted, which is exactly what this test is for.
//!
//! Prerequisites (a missing one fails the test with instructions; with `VUT_SKIP_QEMU=1` it prints
//! `SKIPPED: <reason>` and passes instead): root (namespaces, taps), the test guest
//! (`qemu-scripts/build-guest.sh`), QEMU 10.0.2 (`qemu-scripts/fetch-qemu.sh`), gcc, iproute2.
//! The script installs gnuplot-nox and curl itself if missing. `VUT_XDP_KEEP=1` keeps the output
//! directory (logs of every run); it is also kept when the test fails.
//!
//! Run: `cargo test --test xdp_bench -- --nocapture` (as root).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vhost_user_tap_guest::{kit, labs};

/// The whole script, boots included; it normally takes about 60 s.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(300);
const SECONDS: &str = "3";

fn qemu10() -> PathBuf {
    kit::cache_dir().join("qemu-10/qemu-system-x86_64")
}

/// Why the test cannot run, and how to fix it.
fn check_prerequisites() -> Result<(), String> {
    labs::require_root("network namespaces, taps")?;
    let guest = kit::cache_dir().join("guest");
    for f in ["vmlinuz", "initrd.img"] {
        if !guest.join(f).is_file() {
            return Err(format!(
                "guest image {} missing: run qemu-scripts/build-guest.sh",
                guest.join(f).display()
            ));
        }
    }
    if !qemu10().is_file() {
        return Err(format!(
            "QEMU 10.0.2 {} missing: run qemu-scripts/fetch-qemu.sh",
            qemu10().display()
        ));
    }
    labs::require_programs(&["gcc"], "apt-get install gcc")?;
    labs::require_programs(&["ip", "tc"], "apt-get install iproute2")
}

fn num(run: &Value, key: &str) -> u64 {
    run[key]
        .as_u64()
        .unwrap_or_else(|| panic!("run {run} has no count {key:?}"))
}

/// Everything the test asserts on the script's output; Err says what is wrong.
fn check(out: &Path) -> Result<String, String> {
    let table = fs::read_to_string(out.join("table.txt"))
        .map_err(|e| format!("no table.txt in {}: {e}", out.display()))?;
    for needle in ["Received", "Lost/s", "TCG", "vhost-user-tap", "QEMU tap"] {
        if !table.contains(needle) {
            return Err(format!("table.txt does not mention {needle:?}:\n{table}"));
        }
    }
    let png = fs::read(out.join("chart.png"))
        .map_err(|e| format!("no chart.png in {}: {e}", out.display()))?;
    if png.len() < 1000 || !png.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Err(format!(
            "chart.png is not a PNG image ({} bytes)",
            png.len()
        ));
    }
    let results = labs::read_results(out)?;
    let json = results.to_string();
    if results["accel"] != "tcg" {
        return Err(format!(
            "accel is {}, the test asked for tcg",
            results["accel"]
        ));
    }
    let runs = results["runs"]
        .as_array()
        .ok_or("results.json has no runs")?;
    let mut summary = Vec::new();
    for (backend, threads) in [("vhost-user", 1), ("vhost-user", 2), ("tap", 1), ("tap", 2)] {
        let run = runs
            .iter()
            .find(|r| r["backend"] == backend && r["threads"] == threads)
            .ok_or_else(|| format!("no {backend} run with {threads} thread(s): {json}"))?;
        let (sent, received) = (num(run, "sent"), num(run, "received"));
        let losses = num(run, "qdisc_drops") + num(run, "tun_drops") + num(run, "daemon_drops");
        if received == 0 {
            return Err(format!("the guest's XDP program counted no frames: {run}"));
        }
        if run["xdp_mode"] != "native" {
            return Err(format!(
                "XDP ran in {} mode, not native: {run}",
                run["xdp_mode"]
            ));
        }
        if backend == "vhost-user" {
            if sent != received + losses || num(run, "in_flight") != 0 {
                return Err(format!(
                    "the daemon's numbers do not add up: sent {sent} != received {received} \
                     + losses {losses}: {run}"
                ));
            }
            if num(run, "daemon_rx_frames") != received {
                return Err(format!(
                    "the daemon delivered {} frames, the guest counted {received}: {run}",
                    num(run, "daemon_rx_frames")
                ));
            }
        }
        summary.push(format!(
            "{backend}/{threads}: sent {sent} = received {received} + lost {losses}"
        ));
    }
    Ok(summary.join("; "))
}

#[test]
fn xdp_bench_short_run_adds_up() {
    if !labs::skip_or_fail("xdp_bench", check_prerequisites()) {
        return;
    }
    let out = labs::out_dir("xdp-bench");
    let f = labs::run_script(
        Command::new(labs::script("xdp-bench.sh"))
            .args(["--seconds", SECONDS, "--runs", "1", "--threads", "1,2"])
            .args(["--backends", "vhost-user,tap", "--accel", "tcg"])
            .arg("--qemu")
            .arg(qemu10())
            .arg("--daemon")
            .arg(env!("CARGO_BIN_EXE_vhost-user-tap"))
            .arg("--report")
            .arg(labs::report_bin())
            .arg("--out")
            .arg(&out),
        &out.join("script.log"),
        SCRIPT_DEADLINE,
    );
    println!("{}", f.log);
    let verdict = match f.status {
        Some(s) if s.success() => check(&out),
        Some(s) => Err(format!("xdp-bench.sh exited with {s}")),
        None => Err(format!(
            "xdp-bench.sh still running after {SCRIPT_DEADLINE:?}"
        )),
    };
    match verdict {
        Ok(summary) => {
            println!("PASS in {:.1}s: {summary}", f.took.as_secs_f64());
            if std::env::var_os("VUT_XDP_KEEP").is_none_or(|v| v != "1") {
                let _ = fs::remove_dir_all(&out);
            }
        }
        Err(e) => panic!(
            "FAILED after {:.1}s: {e}\n(output and per-run logs kept in {})",
            f.took.as_secs_f64(),
            out.display()
        ),
    }
}
