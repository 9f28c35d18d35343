//! A guest's serial console, read line by line on a thread of its own: QEMU's stdout, or a unix
//! socket (libvirt's `<serial type='unix'>`) that can also be written to. Every wait has a
//! deadline; lines are printed (`[tag seconds guest] line`) as the test consumes them and kept in
//! a transcript. A kernel panic or a `VUT-ERROR` line from the guest fails a wait at once instead
//! of running into its deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Instant;

/// What [`Console::next_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Line(String),
    /// The console closed (QEMU exited).
    Closed,
    TimedOut,
}

pub struct Console {
    /// Lines with the time they were read: the test is not always waiting on the console (e.g.
    /// while it pings), so it prints them later.
    lines: Receiver<(Instant, String)>,
    writer: Option<UnixStream>,
    transcript: Vec<String>,
    closed: bool,
    start: Instant,
    tag: String,
}

impl Console {
    /// Read `output` (e.g. QEMU's piped stdout). Times are printed relative to `start`.
    pub fn new(output: impl Read + Send + 'static, tag: &str, start: Instant) -> Console {
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(output);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = strip_escapes(&String::from_utf8_lossy(&buf));
                        if tx.send((Instant::now(), line)).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Console {
            lines,
            writer: None,
            transcript: Vec::new(),
            closed: false,
            start,
            tag: tag.to_string(),
        }
    }

    /// Connect to a console on the unix socket `path`, to read and to [`send`](Console::send).
    pub fn connect(path: &Path, tag: &str, start: Instant) -> Console {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("serial console {}: {e}", path.display()));
        let reader = stream.try_clone().expect("cloning the console socket");
        let mut c = Console::new(reader, tag, start);
        c.writer = Some(stream);
        c
    }

    /// Type `command` and Enter (a console from [`connect`](Console::connect) only).
    pub fn send(&mut self, command: &str) {
        self.writer
            .as_mut()
            .expect("this console cannot be written to")
            .write_all(format!("{command}\n").as_bytes())
            .expect("writing to the serial console");
    }

    /// The next line, or that the console closed, or that `deadline` passed.
    pub fn next_line(&mut self, deadline: Instant) -> Next {
        if self.closed {
            return Next::Closed;
        }
        let timeout = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(timeout) {
            Ok((at, line)) => {
                println!(
                    "[{} {:6.2}s guest] {line}",
                    self.tag,
                    at.saturating_duration_since(self.start).as_secs_f64()
                );
                self.transcript.push(line.clone());
                Next::Line(line)
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.closed = true;
                Next::Closed
            }
            Err(RecvTimeoutError::Timeout) => Next::TimedOut,
        }
    }

    /// The first new line for which `f` returns a value. Fails on a kernel panic or `VUT-ERROR`,
    /// when the console closes, and at `deadline`; `what` names what was awaited.
    pub fn wait_for_line<T>(
        &mut self,
        what: &str,
        deadline: Instant,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> T {
        loop {
            match self.next_line(deadline) {
                Next::Line(line) => {
                    if let Some(v) = f(&line) {
                        return v;
                    }
                    if line.contains("VUT-ERROR") || line.contains("Kernel panic") {
                        panic!(
                            "[{}] guest failed while waiting for {what}: {line}",
                            self.tag
                        );
                    }
                }
                Next::Closed => panic!(
                    "[{}] serial console closed (QEMU exited) while waiting for {what}",
                    self.tag
                ),
                Next::TimedOut => panic!("[{}] timed out waiting for {what}", self.tag),
            }
        }
    }

    /// A line containing one of the guest's `markers`, already received or arriving before
    /// `deadline`: the marker's index and the line. Besides `wait_for_line`'s failures, the guest
    /// finishing (`VUT-DONE`) first fails it.
    pub fn wait_for_any(&mut self, markers: &[&str], deadline: Instant) -> (usize, String) {
        let find = |line: &str| markers.iter().position(|m| line.contains(m));
        if let Some(found) = self
            .transcript
            .iter()
            .find_map(|l| find(l).map(|i| (i, l.clone())))
        {
            return found;
        }
        let what = markers.join(" or ");
        let tag = self.tag.clone();
        self.wait_for_line(&what, deadline, |line| {
            let found = find(line).map(|i| (i, line.to_string()));
            if found.is_none() && line.contains("VUT-DONE") {
                panic!("[{tag}] guest finished before {what}");
            }
            found
        })
    }

    /// `wait_for_any` with one marker: the line.
    pub fn wait_for(&mut self, marker: &str, deadline: Instant) -> String {
        self.wait_for_any(&[marker], deadline).1
    }

    /// Read until the console closes (QEMU exited), failing at `deadline`.
    pub fn wait_closed(&mut self, deadline: Instant, what: &str) {
        loop {
            match self.next_line(deadline) {
                Next::Line(_) => {}
                Next::Closed => return,
                Next::TimedOut => panic!("[{}] timed out waiting for {what}", self.tag),
            }
        }
    }

    /// Every line consumed so far.
    pub fn transcript(&self) -> &[String] {
        &self.transcript
    }

    /// Whether the console has closed (QEMU exited).
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}

/// The line without its end-of-line and terminal control sequences (SeaBIOS and the kernel clear
/// the screen; `ESC [ ... final` and `ESC x`); tabs stay.
fn strip_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.next() == Some('[') {
                    // Parameters and intermediates up to the final byte.
                    for c in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn escapes_and_line_ends_are_stripped() {
        assert_eq!(
            strip_escapes("\x1b[2J\x1bcVUT-READY\tok\r\n"),
            "VUT-READY\tok"
        );
    }

    #[test]
    fn markers_seen_earlier_count_and_a_finished_guest_fails_the_wait() {
        let text = b"boot\nVUT-NET mac=52:54:00:12:34:56\nVUT-READY\nVUT-DONE\n" as &[u8];
        let mut c = Console::new(text, "t", Instant::now());
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(c.wait_for("VUT-READY", deadline).contains("READY"));
        // Consumed while looking for VUT-READY: still found.
        assert_eq!(c.wait_for_any(&["x", "VUT-NET"], deadline).0, 1);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.wait_for("VUT-UDP-RESULT", deadline)
        }));
        assert!(r.is_err(), "VUT-DONE before the marker must fail the wait");
        c.wait_closed(deadline, "the end");
        assert!(c.is_closed());
        assert_eq!(c.transcript().len(), 4);
    }
}
