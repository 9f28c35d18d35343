//! QEMU's machine protocol (QMP) on a unix socket: commands with their replies, and events
//! awaited with a deadline (a migration's progress is only visible there).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// One QMP connection in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events that arrived while a command's reply was awaited, oldest first.
    events: Vec<Value>,
    tag: String,
}

impl Qmp {
    /// Connect to the QMP server QEMU creates at `path` (`-qmp unix:PATH,server=on,wait=off`)
    /// and leave capabilities negotiation. QEMU creates the socket during its start and signals
    /// nothing, so the path is tried until `deadline`.
    pub fn connect(path: &Path, tag: &str, deadline: Instant) -> Qmp {
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("[{tag}] QMP socket {}: {e}", path.display()),
            }
        };
        let writer = stream.try_clone().expect("cloning the QMP socket");
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
            tag: tag.to_string(),
        };
        let greeting = q.read(deadline, "the QMP greeting");
        assert!(
            greeting.get("QMP").is_some(),
            "[{tag}] not a QMP greeting: {greeting}"
        );
        q.execute("qmp_capabilities", json!({}))
            .unwrap_or_else(|e| panic!("[{tag}] qmp_capabilities: {e}"));
        q
    }

    /// Run `command` with `arguments`: its `return` value, or QMP's error description.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .unwrap_or_else(|e| panic!("[{}] QMP {command}: {e}", self.tag));
        // QEMU answers every command at once (a migration runs in the background).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.read(deadline, command);
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e["desc"].as_str().unwrap_or("(no description)").to_string());
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// `execute` for commands that must succeed.
    pub fn run(&mut self, command: &str, arguments: Value) -> Value {
        let tag = self.tag.clone();
        self.execute(command, arguments)
            .unwrap_or_else(|e| panic!("[{tag}] QMP {command}: {e}"))
    }

    /// The first event `name` (received earlier or arriving before `deadline`) for which
    /// `matches` holds on its `data`; earlier events of other kinds are consumed.
    pub fn wait_event(
        &mut self,
        name: &str,
        deadline: Instant,
        mut matches: impl FnMut(&Value) -> bool,
    ) -> Value {
        let is = |v: &Value, m: &mut dyn FnMut(&Value) -> bool| {
            v["event"].as_str() == Some(name) && m(&v["data"])
        };
        if let Some(i) = self.events.iter().position(|v| is(v, &mut matches)) {
            return self.events.drain(..=i).next_back().expect("found");
        }
        self.events.clear();
        loop {
            let v = self.read(deadline, &format!("QMP event {name}"));
            if is(&v, &mut matches) {
                return v;
            }
        }
    }

    /// The next JSON line from QEMU, failing at `deadline` or when QEMU closes the socket.
    fn read(&mut self, deadline: Instant, what: &str) -> Value {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "[{}] timed out waiting for {what}",
            self.tag
        );
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .expect("setting a read timeout");
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!("[{}] QEMU closed QMP while waiting for {what}", self.tag),
            Ok(_) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("[{}] QMP sent {line:?}: {e}", self.tag)),
            Err(e) => panic!("[{}] waiting for {what} on QMP: {e}", self.tag),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// A QMP server that answers each command with `{"return": {}}`, sending `events` (raw JSON
    /// lines) right before the answer to the command with that index.
    fn server(path: &Path, events: Vec<(usize, String)>) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            for (i, line) in BufReader::new(s).lines().enumerate() {
                if line.is_err() {
                    break;
                }
                for (_, ev) in events.iter().filter(|(at, _)| *at == i) {
                    w.write_all(format!("{ev}\n").as_bytes()).unwrap();
                }
                w.write_all(b"{\"return\": {}}\n").unwrap();
            }
        })
    }

    #[test]
    fn events_that_came_with_replies_are_kept_in_order_and_consumed_up_to_the_match() {
        let dir = super::super::TempDir::new("qmp");
        let path = dir.path().join("qmp.sock");
        let ev =
            |s: &str| format!("{{\"event\": \"MIGRATION\", \"data\": {{\"status\": \"{s}\"}}}}");
        // Command 0 is qmp_capabilities; command 1 brings a stale "completed", then the setup.
        let _srv = server(
            &path,
            vec![(1, ev("completed")), (1, ev("setup")), (2, ev("completed"))],
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut q = Qmp::connect(&path, "t", deadline);
        q.run("migrate", json!({"uri": "x"}));
        let setup = q.wait_event("MIGRATION", deadline, |d| d["status"] == "setup");
        assert_eq!(setup["data"]["status"], "setup");
        // The stale "completed" went with everything before the match; the next one is new.
        q.run("query-migrate", json!({}));
        let done = q.wait_event("MIGRATION", deadline, |d| d["status"] == "completed");
        assert_eq!(done["data"]["status"], "completed");
        assert!(q.events.is_empty());
    }
}
