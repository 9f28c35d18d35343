//! Child processes a test owns: QEMU, libvirtd, the daemon, short commands with a deadline.
//!
//! A [`Proc`] leads a process group of its own and dies with the thread that started it
//! (`PR_SET_PDEATHSIG`), so an aborted test run leaves nothing behind. Its exit is observed
//! without reaping it: until the handle goes, the pid and the group id stay ours, so signalling
//! them can never hit a recycled pid. Dropping the handle kills the whole group and reaps.

use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{
    Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Output, Stdio,
};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// What a child prints, line by line, from pipes read by threads of their own: kept whole for
/// messages, and handed on as it comes so a test can wait for a line.
pub struct Lines {
    log: Arc<Mutex<Vec<String>>>,
    rx: mpsc::Receiver<String>,
}

/// A line `Lines::wait_for` did not see within its timeout.
#[derive(Debug)]
pub struct NotSeen;

impl Lines {
    /// Follow `pipes` until each closes; with the environment variable `echo` set, every line
    /// also goes to stderr after `prefix`. Returns the readers to join for a complete log.
    pub fn follow(
        pipes: Vec<Box<dyn Read + Send>>,
        echo: &'static str,
        prefix: &'static str,
    ) -> (Lines, Vec<JoinHandle<()>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let readers = pipes
            .into_iter()
            .map(|pipe| {
                let (tx, log) = (tx.clone(), log.clone());
                thread::spawn(move || {
                    for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                        if std::env::var(echo).is_ok() {
                            eprintln!("{prefix}: {line}");
                        }
                        log.lock().unwrap().push(line.clone());
                        let _ = tx.send(line);
                    }
                })
            })
            .collect();
        (Lines { log, rx }, readers)
    }

    /// The next line containing `needle`, within `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String, NotSeen> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return Ok(l),
                Ok(_) => {}
                Err(_) => return Err(NotSeen),
            }
        }
    }

    /// How many lines were printed so far.
    pub fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// The lines printed after the first `start`.
    pub fn since(&self, start: usize) -> Vec<String> {
        self.log.lock().unwrap()[start..].to_vec()
    }

    /// Everything printed so far.
    pub fn text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

/// A child process in a process group of its own, killed with its group on drop.
pub struct Proc {
    name: String,
    child: Child,
    exited: mpsc::Receiver<ExitStatus>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Start `cmd` (stdin from /dev/null; stdout and stderr as the caller set them) as the
    /// leader of a new process group. `name` names it in messages. Panics if it cannot start.
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        Proc::spawn_with_stdin(name, cmd, Stdio::null())
    }

    /// Like `spawn`, with `stdin` (`Stdio::piped()`: a program driven through its command line,
    /// see [`Proc::take_stdin`]).
    pub fn spawn_with_stdin(name: &str, cmd: &mut Command, stdin: Stdio) -> Proc {
        cmd.stdin(stdin).process_group(0);
        // SAFETY: the closure runs between fork and exec and only calls prctl, which is
        // async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        let pid = child.id() as libc::pid_t;
        let (tx, exited) = mpsc::channel();
        thread::spawn(move || {
            if let Some(status) = exit_without_reaping(pid) {
                let _ = tx.send(status);
            }
        });
        Proc {
            name: name.to_string(),
            child,
            exited,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its stdin, if it was started with `Stdio::piped()` there (once).
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// Its stdout, if the command had `Stdio::piped()` there (once).
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Its stderr, if the command had `Stdio::piped()` there (once).
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child.stderr.take()
    }

    /// The exit status if it has exited, without waiting.
    pub fn status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.exited.try_recv().ok();
        }
        self.status
    }

    /// The exit status, waiting at most until `deadline`.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        if self.status.is_none() {
            let timeout = deadline.saturating_duration_since(Instant::now());
            self.status = self.exited.recv_timeout(timeout).ok();
        }
        self.status
    }

    /// Send `sig` to the process (not its group). Safe at any time: the pid stays ours until the
    /// handle is dropped.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// SIGKILL the whole process group (the process and whatever it started in its group).
    pub fn kill_group(&self) {
        // SAFETY: as in `signal`; the group id is the pid of our unreaped child, so it cannot
        // have been recycled.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
    }

    /// How it ended, in words ("exited with status 1", "killed by signal 11 (core dumped)").
    pub fn describe(status: ExitStatus) -> String {
        match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => format!(
                "killed by signal {sig}{}",
                if status.core_dumped() {
                    " (core dumped)"
                } else {
                    ""
                }
            ),
            _ => status.to_string(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_group();
        if self
            .wait_until(Instant::now() + Duration::from_secs(5))
            .is_some()
        {
            let _ = self.child.wait();
        } else {
            eprintln!(
                "warning: {} (pid {}) did not die on SIGKILL",
                self.name,
                self.child.id()
            );
        }
    }
}

/// Wait for `pid` to exit and return its status, leaving it a zombie (WNOWAIT): its owner reaps.
fn exit_without_reaping(pid: libc::pid_t) -> Option<ExitStatus> {
    loop {
        // SAFETY: siginfo_t is plain data, for which all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`, a valid siginfo_t.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            // SAFETY: waitid succeeded for WEXITED, so `info` describes a SIGCHLD, for which
            // si_status is set.
            let status = unsafe { info.si_status() };
            // Back to the wait(2) status encoding ExitStatus is made of.
            let raw = match info.si_code {
                libc::CLD_EXITED => (status & 0xff) << 8,
                libc::CLD_DUMPED => status | 0x80,
                _ => status,
            };
            return Some(ExitStatus::from_raw(raw));
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return None;
        }
    }
}

/// Run `cmd` to completion within `timeout` (stdin from /dev/null, stdout and stderr
/// captured), as [`Command::output`] does; a command still running at the deadline is killed
/// with its group and fails the test.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Output {
    output_or_timeout(cmd, timeout)
        .unwrap_or_else(|| panic!("{cmd:?} still running after {timeout:?}"))
}

/// Run `cmd` to completion within `timeout`: its stdout and stderr together, or why it failed
/// (its status and output, or that it was still running at the deadline; then it is killed).
pub fn run_within(cmd: &mut Command, timeout: Duration) -> Result<String, String> {
    let what = format!("{cmd:?}");
    let out = output_or_timeout(cmd, timeout)
        .ok_or_else(|| format!("{what} still running after {timeout:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "{what} failed ({}): {}",
            out.status,
            text.trim_end()
        ))
    }
}

/// `cmd`'s output, or None if it was still running at the deadline (then it is killed).
fn output_or_timeout(cmd: &mut Command, timeout: Duration) -> Option<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut p = Proc::spawn(&format!("{cmd:?}"), cmd);
    // Read both pipes while it runs: a full pipe would block it.
    fn collect(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    }
    let stdout = collect(p.take_stdout());
    let stderr = collect(p.take_stderr());
    let status = p.wait_until(Instant::now() + timeout)?;
    Some(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// A field of `/proc/<pid>/status` ("Uid:", "CapEff:", ...), its value trimmed.
pub fn proc_status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// CPU time (user + system) process `pid` has used so far, in clock ticks (`/proc/<pid>/stat`;
/// 100 per second on Linux).
/// The machine's load, as /proc/loadavg says it (empty if unreadable): benchmarks report it
/// with their results.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // The fields after the command name, which may itself hold spaces and parentheses.
    let after = &stat[stat.rfind(')').expect("a /proc stat line") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Restrict thread or process `tid` (0: the calling thread) to `cpu`.
pub fn pin(tid: u32, cpu: usize) {
    // SAFETY: cpu_set_t is plain data; zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu is below CPU_SETSIZE (1024) on any machine the kit runs on.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: a valid cpu_set_t of the stated size.
    let r = unsafe {
        libc::sched_setaffinity(tid as i32, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        r,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
}
