//! What the tests that run the project's benchmark and labs share (tests/xdp_bench.rs,
//! tests/backpressure_lab.rs, tests/kernel_lab.rs): prerequisite checks that say how to fix what
//! is missing, skipping with `VUT_SKIP_QEMU=1`, the `vut-report` binary of this build, and running
//! a script in a process group of its own with a deadline, its output in a log file.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::kit::{cache_dir, on_path, repo_root};

/// A script of qemu-scripts/.
pub fn script(name: &str) -> PathBuf {
    repo_root().join("qemu-scripts").join(name)
}

/// Err unless this process runs as root; `why` says what for.
pub fn require_root(why: &str) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        Err(format!("must run as root ({why})"))
    }
}

/// Err naming the first program not on PATH; `fix` says how to get it.
pub fn require_programs(programs: &[&str], fix: &str) -> Result<(), String> {
    match programs.iter().find(|p| !on_path(p)) {
        Some(p) => Err(format!("{p} not found: {fix}")),
        None => Ok(()),
    }
}

/// Err naming the first missing file of `(path, Debian package)`; `fix` says how to get it.
pub fn require_files(files: &[(&str, &str)], fix: &str) -> Result<(), String> {
    match files.iter().find(|(f, _)| !Path::new(f).exists()) {
        Some((f, package)) => Err(format!("{f} missing (package {package}): {fix}")),
        None => Ok(()),
    }
}

/// Is a kernel whose cache directory starts with `prefix` extracted under `VUT_CACHE/sub`
/// (qemu-scripts/lib-kernel.sh's layout)?
pub fn kernel_fetched(sub: &str, prefix: &str) -> bool {
    fs::read_dir(cache_dir().join(sub))
        .ok()
        .is_some_and(|dirs| {
            dirs.flatten().any(|d| {
                d.file_name().to_string_lossy().starts_with(prefix)
                    && d.path().join("extracted").is_file()
            })
        })
}

/// True if the test may run. A missing prerequisite fails the test with its reason, unless
/// `VUT_SKIP_QEMU=1` asks to skip (then it prints `SKIPPED: <what>: <reason>`).
pub fn skip_or_fail(what: &str, prerequisites: Result<(), String>) -> bool {
    let Err(reason) = prerequisites else {
        return true;
    };
    if std::env::var_os("VUT_SKIP_QEMU").is_some_and(|v| v == "1") {
        println!("SKIPPED: {what}: {reason}");
        return false;
    }
    panic!("{what}: {reason} (set VUT_SKIP_QEMU=1 to skip)");
}

/// `vut-report` of this build: `VUT_REPORT_BIN` when set, else built (`cargo build -p
/// vhost-user-tap-guest --bin vut-report`, a no-op when it is up to date) beside the running
/// test, in the same profile.
pub fn report_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("VUT_REPORT_BIN").filter(|b| !b.is_empty()) {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("the test executable");
        let mut dir = exe.parent().expect("deps/").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.current_dir(repo_root()).args([
            "build",
            "--quiet",
            "-p",
            "vhost-user-tap-guest",
            "--bin",
            "vut-report",
        ]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
        assert!(status.success(), "{cmd:?} failed ({status})");
        let bin = dir.join("vut-report");
        assert!(bin.is_file(), "{cmd:?} built no {}", bin.display());
        bin
    })
}

/// How a script run ended.
#[derive(Debug)]
pub struct Finished {
    /// None: it was still running at the deadline and was stopped.
    pub status: Option<ExitStatus>,
    pub took: Duration,
    /// Its stdout and stderr.
    pub log: String,
    pub log_path: PathBuf,
}

impl Finished {
    /// The last `n` lines of its output.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// A script running in its own process group; the whole group (QEMU, daemons, senders) is
/// killed if the test ends first.
struct Group(Child);

impl Group {
    fn signal(&self, sig: libc::c_int) {
        let pgid = self.0.id() as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; the group is the one we created, and
        // its leader is not reaped yet (only `Group` waits for it), so the id is still ours.
        unsafe { libc::kill(-pgid, sig) };
    }

    fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.0.try_wait().expect("waiting for the script") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.signal(libc::SIGKILL);
            let _ = self.0.wait();
        }
    }
}

/// How long a script stopped at its deadline gets to clean up (namespaces, VMs) after SIGTERM
/// before its group is killed.
const GRACE: Duration = Duration::from_secs(30);

/// Runs `cmd` (a script) to completion or until `deadline` from now, in a process group of its
/// own, stdin closed, stdout and stderr into `log` (a child's output would bypass the test
/// harness's capture). At the deadline the group gets SIGTERM (the scripts' traps stop their VMs
/// and delete their namespaces), then SIGKILL after a grace period. If this test process dies,
/// the script gets SIGTERM.
pub fn run_script(cmd: &mut Command, log: &Path, deadline: Duration) -> Finished {
    let file = fs::File::create(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().expect("the log file"))
        .stderr(file)
        .process_group(0);
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut group = Group(
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}")),
    );
    let status = group.wait_until(start + deadline);
    if status.is_none() {
        group.signal(libc::SIGTERM);
        // Whatever it exits with after the deadline, it did not finish in time.
        let _ = group.wait_until(Instant::now() + GRACE);
    }
    drop(group);
    let took = start.elapsed();
    let text = fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    Finished {
        status,
        took,
        log: text,
        log_path: log.to_path_buf(),
    }
}

/// A fresh directory under the system's temporary directory for one lab run's output.
pub fn out_dir(tag: &str) -> PathBuf {
    let out = std::env::temp_dir().join(format!("vut-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    out
}

/// results.json of a lab's output directory, parsed; Err says why not.
pub fn read_results(out: &Path) -> Result<serde_json::Value, String> {
    let path = out.join("results.json");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}\n{text}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_past_its_deadline_is_stopped_with_its_group() {
        let dir = out_dir("labs-test");
        let log = dir.join("log");
        // The script's child would outlive a kill of the script alone.
        let f = run_script(
            Command::new("sh").args(["-c", "echo started; sleep 30 & wait"]),
            &log,
            Duration::from_millis(300),
        );
        assert!(f.status.is_none(), "{f:?}");
        assert!(f.took < Duration::from_secs(10), "{f:?}");
        assert_eq!(f.tail(5), "started");

        let f = run_script(
            Command::new("sh").args(["-c", "echo a; echo b >&2; exit 3"]),
            &log,
            Duration::from_secs(30),
        );
        assert_eq!(f.status.and_then(|s| s.code()), Some(3));
        assert!(!f.success());
        assert_eq!(f.tail(1), "b");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn prerequisites_name_what_is_missing() {
        assert!(require_programs(&["sh"], "x").is_ok());
        let e = require_programs(&["sh", "no-such-program-vut"], "install it").unwrap_err();
        assert_eq!(e, "no-such-program-vut not found: install it");
        let e = require_files(&[("/no/such/file", "pkg")], "fetch").unwrap_err();
        assert_eq!(e, "/no/such/file missing (package pkg): fetch");
        assert!(skip_or_fail("x", Ok(())));
    }
}
