//! The daemon's counters, read from its metrics endpoint (never from its log).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// `Daemon::counters_when_idle` for a daemon serving metrics at `path`.
pub fn counters_when_idle(path: &Path, pair: usize) -> Counters {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(path);
        if m.get("vhost_user_tap_frontend_connected") == Some(&0.0) {
            return Counters::from_scrape(&m, pair);
        }
        assert!(
            Instant::now() < deadline,
            "the frontend never went away: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One queue pair's counters, by the names the daemon declares
/// (`vhost_user_tap::stats::COUNTERS`). Indexing with a name the daemon does not declare panics.
pub struct Counters(std::collections::BTreeMap<&'static str, u64>);

impl Counters {
    pub(super) fn from_scrape(m: &HashMap<String, f64>, pair: usize) -> Counters {
        let values = vhost_user_tap::stats::COUNTERS
            .iter()
            .map(|c| {
                let labels: String = c
                    .labels
                    .iter()
                    .map(|(k, v)| format!(",{k}=\"{v}\""))
                    .collect();
                let key = format!(
                    "vhost_user_tap_{}_total{{queue=\"{pair}\"{labels}}}",
                    c.metric
                );
                let v = m
                    .get(&key)
                    .unwrap_or_else(|| panic!("{key} missing from the daemon's metrics: {m:?}"));
                (c.field, *v as u64)
            })
            .collect();
        Counters(values)
    }

    /// Frames the daemon dropped, all reasons.
    pub fn drops(&self) -> u64 {
        self.0
            .iter()
            .filter(|(k, _)| k.contains("dropped"))
            .map(|(_, v)| v)
            .sum()
    }
}

impl std::ops::Index<&str> for Counters {
    type Output = u64;

    fn index(&self, name: &str) -> &u64 {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("the daemon declares no counter named {name:?}"))
    }
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().filter(|(_, v)| **v != 0))
            .finish()
    }
}

/// Scrape a metrics endpoint on a unix socket; returns `name{labels}` → value.
pub fn scrape(path: &Path) -> HashMap<String, f64> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("metrics socket {}: {e}", path.display()));
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    body.lines()
        .filter(|l| l.starts_with("vhost_user_tap_"))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| {
            let value = v
                .parse()
                .unwrap_or_else(|e| panic!("metric {k}: value {v:?}: {e}"));
            (k.to_string(), value)
        })
        .collect()
}
