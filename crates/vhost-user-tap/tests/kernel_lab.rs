//! The kernel lab (`qemu-scripts/kernel-lab.sh --quick`) as tests: the integration tests of
//! tests/daemon.rs that carry the datapath's promises, run on other kernels than this host's.
//! Each test boots one Debian kernel under QEMU (TCG, 2 vCPUs) with this build's test binary,
//! daemon and synthetic guest inside, and runs the scenarios there:
//!
//! - TX byte-exact guest → host socket, RX byte-exact tap → guest (also for every feature set);
//! - a full RX ring stops reading the tap and resumes on the guest's kick without loss (300
//!   rounds instead of 1000);
//! - four queue pairs carry 64 flows; TCP through the daemon intact with and without offloads
//!   (4 MiB each way instead of 16);
//! - malformed descriptors rejected with traffic going on; SIGTERM exits 0 and removes the socket;
//! - the daemon's startup report matches what the booted kernel supports.
//!
//! What each test guarantees: the kernel booted is the one named, every scenario ran, and each
//! passed the same assertions as on this host. Scenarios that fail on a kernel fail its test, with
//! their output (the lab's table and each failure's panic and daemon log).
//!
//! Kernels: Debian 11's stock 5.10, Debian 12's 6.1 (the test guest's kernel), Debian 13's 6.12,
//! and trixie-backports' 7.3.4 cloud kernel (IFF_BACKPRESSURE). About a minute each.
//!
//! Prerequisites (missing ones fail the test with instructions; `VUT_SKIP_QEMU=1` prints
//! `SKIPPED: <reason>` and passes instead): root, QEMU (`qemu-system-x86_64`), busybox-static,
//! iproute2, cpio, binutils, and the kernels:
//! `qemu-scripts/kernel-lab.sh --kernel all --fetch-only`. `VUT_KERNEL_LAB_TESTS=label,...` runs
//! only those scenarios (labels from `qemu-scripts/kernel-lab.sh --list`).
//!
//! Run: `cargo test --test kernel_lab -- --nocapture` (as root).

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use vhost_user_tap_guest::{kit, labs};

fn script() -> std::path::PathBuf {
    labs::script("kernel-lab.sh")
}
const FETCH: &str = "run `qemu-scripts/kernel-lab.sh --kernel all --fetch-only` as root";
/// A quick run takes about a minute; a scenario that hangs is killed after 120 s in the VM, and a
/// VM whose kernel crashed while booting is run once more.
const DEADLINE: Duration = Duration::from_secs(30 * 60);

/// One VM at a time: the machine has two cores, and the lab's cached initramfs parts are shared.
static ONE_VM: Mutex<()> = Mutex::new(());

/// Why the lab cannot run here, and how to fix it.
fn check_prerequisites(kernel: &Kernel) -> Result<(), String> {
    labs::require_root("network namespaces in the VM, device nodes in its initramfs, apt-get")?;
    labs::require_programs(&["qemu-system-x86_64", "cpio", "strip", "ss"], FETCH)?;
    labs::require_files(
        &[
            ("/bin/busybox", "busybox-static"),
            ("/usr/sbin/tc", "iproute2"),
        ],
        FETCH,
    )?;
    if !labs::kernel_fetched(kernel.cache, kernel.cache_prefix) {
        return Err(format!(
            "kernel {} ({}) is not in {}: {FETCH}",
            kernel.name,
            kernel.what,
            kit::cache_dir().join(kernel.cache).display()
        ));
    }
    Ok(())
}

struct Kernel {
    /// `--kernel` argument.
    name: &'static str,
    what: &'static str,
    /// Where the lab caches it, and how its directory there begins.
    cache: &'static str,
    cache_prefix: &'static str,
    /// How the release it boots (`uname -r`) begins.
    release_prefix: &'static str,
}

/// The scenario labels and test names the lab runs (`kernel-lab.sh --list`, or the ones
/// `VUT_KERNEL_LAB_TESTS` names).
fn scenarios() -> Vec<(String, String)> {
    let out = Command::new(script())
        .arg("--list")
        .output()
        .unwrap_or_else(|e| panic!("{} --list: {e}", script().display()));
    let all: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(label, test)| (label.to_string(), test.to_string()))
        .collect();
    assert!(
        !all.is_empty(),
        "{} --list printed no scenarios",
        script().display()
    );
    match std::env::var("VUT_KERNEL_LAB_TESTS") {
        Ok(wanted) if !wanted.is_empty() => wanted
            .split(',')
            .map(|w| {
                all.iter()
                    .find(|(label, test)| label == w || test == w)
                    .cloned()
                    .unwrap_or_else(|| (w.to_string(), w.to_string()))
            })
            .collect(),
        _ => all,
    }
}

fn run_lab(kernel: Kernel) {
    if !labs::skip_or_fail(
        &format!("kernel lab {}", kernel.name),
        check_prerequisites(&kernel),
    ) {
        return;
    }
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let scenarios = scenarios();
    let tests: Vec<&str> = scenarios.iter().map(|(_, t)| t.as_str()).collect();
    let out = labs::out_dir(&format!("kernel-lab-{}", kernel.name));
    let f = labs::run_script(
        Command::new(script())
            .args(["--kernel", kernel.name, "--quick", "--tests"])
            .arg(tests.join(","))
            .arg("--out")
            .arg(&out),
        &out.join("lab.log"),
        DEADLINE,
    );
    let table = std::fs::read_to_string(out.join("table.txt")).unwrap_or_default();
    println!("{table}");
    let log_tail = f.tail(40);
    let status = f.status.unwrap_or_else(|| {
        panic!(
            "the lab did not finish within {DEADLINE:?}; logs under {}:\n{log_tail}",
            out.display()
        )
    });
    let results = labs::read_results(&out).unwrap_or_else(|e| {
        panic!(
            "the lab ({status}) wrote no results.json ({e}); logs under {}:\n{log_tail}",
            out.display()
        )
    });
    let text = results.to_string();
    let k = results["kernels"]
        .as_array()
        .and_then(|ks| ks.iter().find(|k| k["kernel"] == kernel.name))
        .unwrap_or_else(|| panic!("results.json has no kernel {}: {text}", kernel.name));
    println!(
        "kernel lab {} ({}): {} s, {} VM attempt(s), {status}",
        kernel.name,
        k["package"],
        f.took.as_secs(),
        k["vm_attempts"]
    );
    let booted = k["booted_release"].as_str().unwrap_or("(none)");
    assert!(
        booted.starts_with(kernel.release_prefix) && k["release_matches"] == Value::Bool(true),
        "kernel {}: booted {booted:?}, expected {} ({}); console under {}",
        kernel.name,
        k["expected_release"],
        kernel.what,
        out.display()
    );
    let ran = k["scenarios"].as_array().expect("scenarios");
    let mut failed = Vec::new();
    for (label, test) in &scenarios {
        let s = ran
            .iter()
            .find(|s| s["test"] == test.as_str())
            .unwrap_or_else(|| panic!("results.json: scenario {label} ({test}) missing"));
        let result = s["result"].as_str().unwrap_or("?");
        if result != "ok" {
            failed.push(format!("{label} ({test}): {result}"));
        }
    }
    assert!(
        failed.is_empty(),
        "on kernel {} ({booted}), not every scenario ran and passed:\n  {}\n\n{table}\nconsole \
         log: {}",
        kernel.name,
        failed.join("\n  "),
        out.join(kernel.name).join("console.log").display()
    );
    assert_eq!(
        k["finished"],
        Value::Bool(true),
        "the VM did not finish: {table}"
    );
    assert!(
        status.success(),
        "the lab reported a failure ({status}):\n{log_tail}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn datapath_scenarios_pass_on_debian11_kernel_5_10() {
    run_lab(Kernel {
        name: "5.10",
        what: "Debian 11 bullseye's linux-image-amd64",
        cache: "kernel",
        cache_prefix: "linux-image-5.10.",
        release_prefix: "5.10.",
    });
}

#[test]
fn datapath_scenarios_pass_on_debian12_kernel_6_1() {
    run_lab(Kernel {
        name: "6.1",
        what: "Debian 12 bookworm's linux-image-amd64",
        cache: "kernel",
        cache_prefix: "linux-image-6.1.",
        release_prefix: "6.1.",
    });
}

#[test]
fn datapath_scenarios_pass_on_debian13_kernel_6_12() {
    run_lab(Kernel {
        name: "6.12",
        what: "Debian 13 trixie's linux-image-amd64",
        cache: "kernel",
        cache_prefix: "linux-image-6.12.",
        release_prefix: "6.12.",
    });
}

#[test]
fn datapath_scenarios_pass_on_trixie_backports_kernel_7_3() {
    run_lab(Kernel {
        name: "7.3",
        what: "trixie-backports' 7.3.4 cloud kernel, with IFF_BACKPRESSURE",
        cache: "lab-kernel",
        cache_prefix: "7.3.4+deb13-cloud-amd64_",
        release_prefix: "7.3.4+deb13-cloud-amd64",
    });
}
