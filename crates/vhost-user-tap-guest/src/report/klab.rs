//! `vut-report kernel-lab`: the kernel lab's results (qemu-scripts/kernel-lab.sh), from each
//! kernel's console log (markers of qemu-scripts/kernel-lab/init.sh) and the record of how its VM
//! ran. Per kernel the script leaves `RESULTS/<kernel>/console.log` and `RESULTS/<kernel>/run.txt`
//! (`package=`, `package_version=`, `release=` the release it must boot, `vm_attempts=`,
//! `vm_seconds=`, `vm_status=`, and one `crash=` per VM attempt repeated after a crash before the
//! tests). Writes RESULTS/results.json and RESULTS/table.txt, prints the table with every
//! failure's output, and fails (exit 1) unless every scenario ran and passed on every kernel,
//! each kernel booted the release asked for and its VM finished.

use std::path::PathBuf;

use clap::Args;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::record::{self, Record};

#[derive(Debug, Args)]
pub struct KlabArgs {
    /// The results directory (one sub-directory per kernel).
    #[arg(long)]
    pub results: PathBuf,
    /// The kernels that ran, comma-separated, in order.
    #[arg(long)]
    pub kernels: String,
    /// A scenario as "LABEL TEST" (repeatable, in running order).
    #[arg(long = "scenario", required = true, allow_hyphen_values = true)]
    pub scenarios: Vec<String>,
    /// Quick mode (fewer rounds).
    #[arg(long)]
    pub quick: bool,
    /// `qemu --version`'s first line.
    #[arg(long, allow_hyphen_values = true)]
    pub qemu_line: String,
    /// The tests' environment (K=V,...).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub env: String,
    /// Extra daemon options every scenario ran with.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub daemon_args: String,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Scenario {
    pub label: String,
    pub test: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScenarioResult {
    pub label: String,
    pub test: String,
    pub result: String,
    pub detail: String,
    pub seconds: Option<f64>,
    pub output: String,
}

/// Module name → "ok" or "failed: ...", in the order the VM loaded them.
#[derive(Clone, Debug, Default)]
pub struct Modules(Vec<(String, String)>);

impl Serialize for Modules {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct KernelResult {
    pub kernel: String,
    pub package: String,
    pub package_version: String,
    pub expected_release: String,
    pub booted_release: Option<String>,
    pub vm_attempts: u32,
    pub vm_seconds: u64,
    pub vm_exit_status: i32,
    pub crashes_before_tests: Vec<String>,
    pub tests_started: bool,
    pub finished: bool,
    pub modules: Modules,
    pub daemon_startup: Vec<String>,
    pub kmsg: Vec<String>,
    pub errors: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sysctl: Option<Vec<String>>,
    pub release_matches: bool,
    pub scenarios: Vec<ScenarioResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crash: Option<Vec<String>>,
    pub passed: bool,
}

#[derive(Serialize)]
struct Results<'a> {
    passed: bool,
    quick: bool,
    qemu: &'a str,
    env: &'a str,
    daemon_args: &'a str,
    scenarios: &'a [Scenario],
    kernels: &'a [KernelResult],
}

/// (marker, rest) for each marker line; a kernel message may precede a marker on its line.
pub fn markers(console: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in record::console_lines(console) {
        for (i, _) in line.match_indices("VUT-KLAB-") {
            let text = &line[i..];
            let name_len = "VUT-KLAB-".len()
                + text["VUT-KLAB-".len()..]
                    .find(|c: char| !(c.is_ascii_uppercase() || c == '-'))
                    .unwrap_or(text.len() - "VUT-KLAB-".len());
            let after = &text[name_len..];
            if name_len == "VUT-KLAB-".len() || !(after.is_empty() || after.starts_with(' ')) {
                continue;
            }
            let rest = after.strip_prefix(' ').unwrap_or(after);
            out.push((text[..name_len].to_string(), rest.to_string()));
            break;
        }
    }
    out
}

/// The first kernel oops or panic in the console and the lines after it.
fn crash_lines(console: &str, limit: usize) -> Vec<String> {
    let lines: Vec<&str> = console.split('\n').collect();
    let lines: Vec<String> = lines.iter().map(|l| l.replace('\r', "")).collect();
    let bad = [
        "Oops",
        "Kernel panic",
        "BUG:",
        "general protection",
        "Call Trace",
    ];
    lines
        .iter()
        .position(|l| bad.iter().any(|b| l.contains(b)))
        .map(|i| lines[i..(i + limit).min(lines.len())].to_vec())
        .unwrap_or_default()
}

fn first_word(s: &str) -> Option<&str> {
    s.split_whitespace().next()
}

/// One kernel's result from its run record and console.
pub fn kernel_result(
    name: &str,
    run: &Record,
    console: &str,
    scenarios: &[Scenario],
) -> Result<KernelResult, String> {
    let mut r = KernelResult {
        kernel: name.to_string(),
        package: run.str("package")?.to_string(),
        package_version: run.str("package_version")?.to_string(),
        expected_release: run.str("release")?.to_string(),
        booted_release: None,
        vm_attempts: run.num("vm_attempts")?,
        vm_seconds: run.num("vm_seconds")?,
        vm_exit_status: run.num("vm_status")?,
        crashes_before_tests: run.all("crash").into_iter().map(String::from).collect(),
        tests_started: false,
        finished: false,
        modules: Modules::default(),
        daemon_startup: Vec::new(),
        kmsg: Vec::new(),
        errors: Vec::new(),
        sysctl: None,
        release_matches: false,
        scenarios: Vec::new(),
        crash: None,
        passed: false,
    };
    let mut results: Vec<(String, (String, String))> = Vec::new();
    let mut outputs: Vec<(String, Vec<String>)> = Vec::new();
    let mut seconds: Vec<(String, f64)> = Vec::new();
    for (marker, rest) in markers(console) {
        match marker.as_str() {
            "VUT-KLAB-BOOT" => {
                r.booted_release = Some(match rest.strip_prefix("kernel=") {
                    Some(k) if !k.is_empty() && !k.starts_with(char::is_whitespace) => {
                        first_word(k).unwrap_or(k).to_string()
                    }
                    _ => rest.clone(),
                });
            }
            "VUT-KLAB-MODULE" => {
                let (module, status) = rest.split_once(' ').unwrap_or((&rest, ""));
                match r.modules.0.iter_mut().find(|(m, _)| m == module) {
                    Some(e) => e.1 = status.to_string(),
                    None => r.modules.0.push((module.to_string(), status.to_string())),
                }
            }
            "VUT-KLAB-DAEMON" => r.daemon_startup.push(rest),
            "VUT-KLAB-SYSCTL" => r.sysctl.get_or_insert_with(Vec::new).push(rest),
            "VUT-KLAB-TESTS-START" => r.tests_started = true,
            "VUT-KLAB-RESULT" => {
                // "test NAME ... STATUS[ detail]"
                if let Some(t) = rest.strip_prefix("test ") {
                    if let Some((test, tail)) = t.split_once(" ... ") {
                        if !test.is_empty() && !test.contains(char::is_whitespace) {
                            let (status, detail) = tail.split_once(' ').unwrap_or((tail, ""));
                            if !status.is_empty() {
                                let v = (status.to_string(), detail.trim().to_string());
                                match results.iter_mut().find(|(n, _)| n == test) {
                                    Some(e) => e.1 = v,
                                    None => results.push((test.to_string(), v)),
                                }
                            }
                        }
                    }
                }
            }
            "VUT-KLAB-OUT" => {
                let (test, line) = rest.split_once("| ").unwrap_or((&rest, ""));
                match outputs.iter_mut().find(|(n, _)| n == test) {
                    Some(e) => e.1.push(line.to_string()),
                    None => outputs.push((test.to_string(), vec![line.to_string()])),
                }
            }
            "VUT-KLAB-TEST-END" => {
                // "NAME rc=RC ms=MS"
                let w: Vec<&str> = rest.split_whitespace().collect();
                if let [test, rc, ms, ..] = w.as_slice() {
                    let rc_ok = rc
                        .strip_prefix("rc=")
                        .is_some_and(|v| v.parse::<i64>().is_ok());
                    if let (true, Some(Ok(ms))) =
                        (rc_ok, ms.strip_prefix("ms=").map(str::parse::<u64>))
                    {
                        seconds.push((test.to_string(), ms as f64 / 1000.0));
                    }
                }
            }
            "VUT-KLAB-KMSG" => r.kmsg.push(rest),
            "VUT-KLAB-ERROR" => r.errors.push(rest),
            "VUT-KLAB-DONE" => r.finished = true,
            _ => {}
        }
    }
    r.release_matches = r.booted_release.as_deref() == Some(r.expected_release.as_str());
    for s in scenarios {
        let (result, detail) = results
            .iter()
            .find(|(n, _)| *n == s.test)
            .map(|(_, v)| v.clone())
            .unwrap_or(("not run".into(), String::new()));
        r.scenarios.push(ScenarioResult {
            label: s.label.clone(),
            test: s.test.clone(),
            result,
            detail,
            seconds: seconds
                .iter()
                .rev()
                .find(|(n, _)| *n == s.test)
                .map(|v| v.1),
            output: outputs
                .iter()
                .find(|(n, _)| *n == s.test)
                .map(|(_, l)| l.join("\n"))
                .unwrap_or_default(),
        });
    }
    if !r.finished {
        r.crash = Some(crash_lines(console, 12));
    }
    r.passed = r.release_matches && r.finished && r.scenarios.iter().all(|s| s.result == "ok");
    Ok(r)
}

/// The interesting part of a failed test's output: from its panic on, else its end.
fn excerpt(output: &str, limit: usize) -> Vec<&str> {
    let lines: Vec<&str> = output.split('\n').collect();
    match lines.iter().position(|l| l.contains("panicked at")) {
        Some(i) => lines[i..(i + limit).min(lines.len())].to_vec(),
        None => lines[lines.len().saturating_sub(limit)..].to_vec(),
    }
}

/// Python's repr of an optional string, as the table has always shown it.
fn repr(s: Option<&str>) -> String {
    s.map_or("None".into(), |s| format!("'{s}'"))
}

/// The scenario × kernel table, then the notes (failures with their output).
pub fn table(kernels: &[KernelResult], scenarios: &[Scenario], daemon_args: &str) -> String {
    let width = scenarios.iter().map(|s| s.label.len()).max().unwrap_or(0) + 2;
    // Each kernel's column is as wide as its release.
    let cols: Vec<usize> = kernels
        .iter()
        .map(|k| 13.max(k.booted_release.as_deref().unwrap_or("").len() + 2))
        .collect();
    let mut t = Vec::new();
    let row = |first: &str, cells: Vec<String>| {
        let mut s = format!("{first:<width$}");
        for (c, w) in cells.iter().zip(&cols) {
            s += &format!("{c:>w$}");
        }
        s
    };
    t.push(row(
        "scenario",
        kernels.iter().map(|k| k.kernel.clone()).collect(),
    ));
    for (i, s) in scenarios.iter().enumerate() {
        t.push(row(
            &s.label,
            kernels
                .iter()
                .map(|k| {
                    let sc = &k.scenarios[i];
                    match sc.seconds {
                        Some(secs) if sc.result != "not run" => format!("{} {secs:.0}s", sc.result),
                        _ => sc.result.clone(),
                    }
                })
                .collect(),
        ));
    }
    t.push(row(
        "booted",
        kernels
            .iter()
            .map(|k| k.booted_release.clone().unwrap_or_else(|| "-".into()))
            .collect(),
    ));
    t.push(row(
        "VM",
        kernels
            .iter()
            .map(|k| {
                format!(
                    "{}s x{}{}",
                    k.vm_seconds,
                    k.vm_attempts,
                    if k.finished { "" } else { " !" }
                )
            })
            .collect(),
    ));
    t.push(String::new());
    for s in scenarios {
        t.push(format!("{}: {}", s.label, s.test));
    }
    if !daemon_args.trim().is_empty() {
        t.push(format!(
            "(every scenario's daemon ran with {})",
            daemon_args.trim()
        ));
    }
    let mut text = t.join("\n");

    let mut notes = Vec::new();
    for k in kernels {
        let name = &k.kernel;
        if !k.release_matches {
            notes.push(format!(
                "{name}: booted {}, expected {}",
                repr(k.booted_release.as_deref()),
                repr(Some(&k.expected_release))
            ));
        }
        if !k.finished {
            notes.push(format!(
                "{name}: the VM did not finish (exit status {}); remaining scenarios did not run",
                k.vm_exit_status
            ));
            for l in k.crash.iter().flatten() {
                notes.push(format!("    {l}"));
            }
        }
        for c in &k.crashes_before_tests {
            notes.push(format!(
                "{name}: crashed before the tests started, VM run again: {c}"
            ));
        }
        for e in &k.errors {
            notes.push(format!("{name}: {e}"));
        }
        for (m, status) in &k.modules.0 {
            if status != "ok" {
                notes.push(format!("{name}: module {m}: {status}"));
            }
        }
        for s in &k.scenarios {
            if s.result == "ok" {
                continue;
            }
            if s.result == "not run" {
                let why = if k.finished && k.tests_started {
                    "not in the test binary"
                } else {
                    "the VM ended first"
                };
                notes.push(format!(
                    "{name}: {} ({}) did not run: {why}",
                    s.label, s.test
                ));
                continue;
            }
            notes.push(format!(
                "{name}: {} ({}) {} {}",
                s.label, s.test, s.result, s.detail
            ));
            for l in excerpt(&s.output, 30) {
                notes.push(format!("    {l}"));
            }
        }
    }
    if !notes.is_empty() {
        text += "\n\n";
        text += &notes.join("\n");
    }
    text
}

/// Reads every kernel's record and console, writes results.json and table.txt, prints the
/// table. Ok(true) when everything passed.
pub fn report(args: KlabArgs) -> Result<bool, String> {
    let scenarios: Vec<Scenario> = args
        .scenarios
        .iter()
        .map(|s| {
            let (label, test) = s
                .split_once(' ')
                .ok_or_else(|| format!("--scenario {s:?}: LABEL TEST"))?;
            Ok(Scenario {
                label: label.to_string(),
                test: test.to_string(),
            })
        })
        .collect::<Result<_, String>>()?;
    let mut kernels = Vec::new();
    for k in args.kernels.split(',').filter(|k| !k.is_empty()) {
        let dir = args.results.join(k);
        let run = Record::from_lines(&record::read(&dir.join("run.txt"))?, format!("{k}/run.txt"));
        // A VM that never wrote a console is a VM that did not run: no markers.
        let console = record::read(&dir.join("console.log")).unwrap_or_default();
        kernels.push(kernel_result(k, &run, &console, &scenarios)?);
    }
    let results = Results {
        passed: !kernels.is_empty() && kernels.iter().all(|k| k.passed),
        quick: args.quick,
        qemu: &args.qemu_line,
        env: &args.env,
        daemon_args: &args.daemon_args,
        scenarios: &scenarios,
        kernels: &kernels,
    };
    let json = serde_json::to_string_pretty(&results).expect("serialising the results") + "\n";
    record::write(&args.results.join("results.json"), &json)?;
    let text = table(&kernels, &scenarios, &args.daemon_args);
    record::write(&args.results.join("table.txt"), &(text.clone() + "\n"))?;
    println!("{text}");
    Ok(results.passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenarios() -> Vec<Scenario> {
        [
            ("tx", "guest_frames_reach_a_host_socket"),
            (
                "startup-report",
                "startup_report_matches_what_this_kernel_supports",
            ),
        ]
        .map(|(label, test)| Scenario {
            label: label.into(),
            test: test.into(),
        })
        .to_vec()
    }

    fn run(release: &str) -> Record {
        Record::from_lines(
            &format!(
                "package=linux-image-6.1.0-57-amd64\npackage_version=6.1.158-1\nrelease={release}\n\
                 vm_attempts=1\nvm_seconds=52\nvm_status=0\n"
            ),
            "run.txt",
        )
    }

    const CONSOLE: &str = "\
[    0.1] Linux version 6.1\r
VUT-KLAB-BOOT kernel=6.1.0-57-amd64 version=Linux_6.1 cpus=2 mem_kb=2000000\r
VUT-KLAB-MODULE tun ok\r
VUT-KLAB-MODULE sch_fq_codel failed: insmod: ENOENT\r
VUT-KLAB-DAEMON [x INFO  vhost_user_tap::daemon] listening on /run/vutprobe.sock\r
VUT-KLAB-SYSCTL kernel.io_uring_disabled=0\r
VUT-KLAB-TESTS-START count=2 test_timeout=120 env=\r
VUT-KLAB-TEST-START guest_frames_reach_a_host_socket\r
[   12.5] tun: something VUT-KLAB-RESULT test guest_frames_reach_a_host_socket ... FAILED\r
VUT-KLAB-OUT guest_frames_reach_a_host_socket| running 1 test\r
VUT-KLAB-OUT guest_frames_reach_a_host_socket| thread 'x' panicked at tests/daemon.rs:341:52:\r
VUT-KLAB-OUT guest_frames_reach_a_host_socket| datagram from the guest: WouldBlock\r
VUT-KLAB-TEST-END guest_frames_reach_a_host_socket rc=101 ms=11234\r
VUT-KLAB-TEST-START startup_report_matches_what_this_kernel_supports\r
VUT-KLAB-RESULT test startup_report_matches_what_this_kernel_supports ... ok\r
VUT-KLAB-TEST-END startup_report_matches_what_this_kernel_supports rc=0 ms=1600\r
VUT-KLAB-DONE\r
";

    #[test]
    fn markers_are_found_after_kernel_messages() {
        let m = markers(
            "junk VUT-KLAB-X\nVUT-KLAB-BAD-\u{e9} no\n[ 1.0] VUT-KLAB-DONE\nVUT-KLAB-lower x\n",
        );
        assert_eq!(
            m,
            [
                ("VUT-KLAB-X".to_string(), String::new()),
                ("VUT-KLAB-DONE".into(), String::new())
            ]
        );
    }

    #[test]
    fn a_failed_scenario_fails_the_kernel_with_its_output() {
        let k = kernel_result("6.1", &run("6.1.0-57-amd64"), CONSOLE, &scenarios()).unwrap();
        assert!(k.release_matches && k.finished && k.tests_started);
        assert!(!k.passed);
        assert_eq!(k.scenarios[0].result, "FAILED");
        assert_eq!(k.scenarios[0].seconds, Some(11.234));
        assert_eq!(k.scenarios[1].result, "ok");
        assert_eq!(
            k.sysctl.as_deref(),
            Some(&["kernel.io_uring_disabled=0".to_string()][..])
        );
        let text = table(&[k], &scenarios(), "--no-io-uring ");
        let expected = "\
scenario                     6.1
tx                    FAILED 11s
startup-report             ok 2s
booted            6.1.0-57-amd64
VM                        52s x1

tx: guest_frames_reach_a_host_socket
startup-report: startup_report_matches_what_this_kernel_supports
(every scenario's daemon ran with --no-io-uring)

6.1: module sch_fq_codel: failed: insmod: ENOENT
6.1: tx (guest_frames_reach_a_host_socket) FAILED 
    thread 'x' panicked at tests/daemon.rs:341:52:
    datagram from the guest: WouldBlock";
        assert_eq!(text, expected);
    }

    #[test]
    fn passing_kernels_and_wrong_releases() {
        let ok = CONSOLE.replace("... FAILED", "... ok");
        let k = kernel_result("6.1", &run("6.1.0-57-amd64"), &ok, &scenarios()).unwrap();
        assert!(k.passed);
        let json = serde_json::to_value(&k).unwrap();
        assert_eq!(json["modules"]["tun"], "ok");
        assert!(json.get("crash").is_none());

        // Booted another release: fails, and says so.
        let k = kernel_result("6.1", &run("6.1.0-58-amd64"), &ok, &scenarios()).unwrap();
        assert!(!k.passed);
        let text = table(&[k], &scenarios(), "");
        assert!(
            text.contains("6.1: booted '6.1.0-57-amd64', expected '6.1.0-58-amd64'"),
            "{text}"
        );

        // The VM died during the first test: a crash excerpt, every scenario "not run".
        let died = "VUT-KLAB-BOOT kernel=6.1.0-57-amd64\nVUT-KLAB-TESTS-START count=2\n\
                    [ 9.0] BUG: kernel NULL pointer dereference\n[ 9.1] Call Trace:\n";
        let k = kernel_result("6.1", &run("6.1.0-57-amd64"), died, &scenarios()).unwrap();
        assert!(!k.passed && !k.finished);
        assert_eq!(k.crash.as_ref().unwrap().len(), 3);
        let text = table(&[k], &scenarios(), "");
        assert!(
            text.contains("tx (guest_frames_reach_a_host_socket) did not run: the VM ended first")
        );
        assert!(text.contains("VM                      52s x1 !"), "{text}");

        // A record without its numbers is an error, not zeros.
        let bad = Record::from_lines("package=x\n", "run.txt");
        assert!(kernel_result("6.1", &bad, &ok, &scenarios()).is_err());
    }
}
