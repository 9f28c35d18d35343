//! A small reader of the Prometheus text format, enough for the daemon's `--metrics` scrape: one
//! sample a line, `name{label="value",...} value [timestamp]`; `#` lines (HELP, TYPE, EOF) and
//! blank lines are skipped. A sample asked for and not in the scrape is an error, never 0.

use std::collections::BTreeMap;

use vhost_user_tap::stats::COUNTERS;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Does the sample carry every label of `want` (and perhaps others)?
    fn has(&self, want: &[(&str, &str)]) -> bool {
        want.iter().all(|(k, v)| self.label(k) == Some(v))
    }
}

/// A parsed scrape.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    samples: Vec<Sample>,
}

impl Scrape {
    /// Parses a whole scrape; a line that is not a sample, a comment or blank is an error.
    pub fn parse(text: &str) -> Result<Scrape, String> {
        let mut samples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            samples.push(parse_line(line).map_err(|e| format!("metrics line {}: {e}", i + 1))?);
        }
        Ok(Scrape { samples })
    }

    /// The samples of metric `name` that carry every label of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.name == name && s.has(labels))
    }

    /// The sum of the matching samples; an error when there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64, String> {
        let mut found = false;
        let mut total = 0.0;
        for s in self.matching(name, labels) {
            found = true;
            total += s.value;
        }
        if found {
            Ok(total)
        } else {
            Err(format!(
                "{} missing from the metrics",
                describe(name, labels)
            ))
        }
    }

    /// `sum` of a count: it must be a whole number, not negative.
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> Result<u64, String> {
        let v = self.sum(name, labels)?;
        if v < 0.0 || v.fract() != 0.0 || !v.is_finite() || v > 2f64.powi(53) {
            return Err(format!("{}: {v} is not a count", describe(name, labels)));
        }
        Ok(v as u64)
    }

    /// The queue pairs the daemon reports (`queue` labels of its `rx_frames` counter), sorted.
    pub fn queues(&self) -> Vec<u32> {
        let mut q: Vec<u32> = self
            .matching("vhost_user_tap_rx_frames_total", &[])
            .filter_map(|s| s.label("queue")?.parse().ok())
            .collect();
        q.sort_unstable();
        q.dedup();
        q
    }

    /// The daemon's counters (`vhost_user_tap::stats::COUNTERS`, by field name) summed over its
    /// queue pairs. Every counter of every pair must be in the scrape.
    pub fn daemon_counters(&self) -> Result<DaemonCounters, String> {
        let queues = self.queues();
        if queues.is_empty() {
            return Err(
                "vhost_user_tap_rx_frames_total{queue=...} missing from the metrics".into(),
            );
        }
        let mut values = BTreeMap::new();
        for c in COUNTERS {
            let name = format!("vhost_user_tap_{}_total", c.metric);
            let mut total = 0;
            for q in &queues {
                let q = q.to_string();
                let mut labels = vec![("queue", q.as_str())];
                labels.extend(c.labels.iter().copied());
                total += self.exact(&name, &labels)?;
            }
            values.insert(c.field, total);
        }
        Ok(DaemonCounters { values })
    }

    /// The one sample with exactly these labels, as a count.
    fn exact(&self, name: &str, labels: &[(&str, &str)]) -> Result<u64, String> {
        let mut it = self
            .matching(name, labels)
            .filter(|s| s.labels.len() == labels.len());
        match (it.next(), it.next()) {
            (Some(s), None) if s.value >= 0.0 && s.value.fract() == 0.0 => Ok(s.value as u64),
            (Some(s), None) => Err(format!(
                "{}: {} is not a count",
                describe(name, labels),
                s.value
            )),
            (Some(_), Some(_)) => Err(format!("{} appears twice", describe(name, labels))),
            (None, _) => Err(format!(
                "{} missing from the metrics",
                describe(name, labels)
            )),
        }
    }
}

/// The daemon's per-pair counters, summed over its pairs.
#[derive(Clone, Debug)]
pub struct DaemonCounters {
    values: BTreeMap<&'static str, u64>,
}

impl DaemonCounters {
    /// A counter by its field name (`rx_frames`, ...). The name must be one the daemon declares.
    pub fn get(&self, field: &str) -> u64 {
        *self
            .values
            .get(field)
            .unwrap_or_else(|| panic!("the daemon declares no counter {field:?}"))
    }

    /// Frames the daemon dropped on RX (tap → guest), every reason it counts: the counters of
    /// family `daemon_dropped_frames` with `direction="rx"`.
    pub fn rx_drops(&self) -> u64 {
        COUNTERS
            .iter()
            .filter(|c| {
                c.metric == "daemon_dropped_frames" && c.labels.contains(&("direction", "rx"))
            })
            .map(|c| self.get(c.field))
            .sum()
    }
}

fn describe(name: &str, labels: &[(&str, &str)]) -> String {
    let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", l.join(","))
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or_else(|| format!("no value: {line:?}"))?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err(format!("bad metric name: {line:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (l, tail) = parse_labels(after).map_err(|e| format!("{e}: {line:?}"))?;
        labels = l;
        rest = tail;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or_else(|| format!("no value: {line:?}"))?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse::<f64>()
            .map_err(|e| format!("value {v:?}: {e}: {line:?}"))?,
    };
    // An optional timestamp, then nothing.
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("junk after the value: {line:?}"))?;
    }
    if fields.next().is_some() {
        return Err(format!("junk after the value: {line:?}"));
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

type Labels = Vec<(String, String)>;

/// `key="value",...}` → the labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(tail) = s.strip_prefix('}') {
            return Ok((labels, tail));
        }
        let eq = s.find('=').ok_or("a label without '='")?;
        let key = s[..eq].trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {key:?}"));
        }
        s = s[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or("a label value without quotes")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("an unterminated label value".into()),
                },
                Some((_, c)) => value.push(c),
                None => return Err("an unterminated label value".into()),
            }
        };
        labels.push((key.to_string(), value));
        s = s[end + 1..].trim_start();
        if let Some(tail) = s.strip_prefix(',') {
            s = tail;
        } else if !s.starts_with('}') {
            return Err("labels not separated by ','".into());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A scrape of one queue pair with every counter the daemon declares, `rx_frames` set to
    /// `rx` and `daemon_dropped_frames{direction="rx",reason="oversize"}` to `drops`.
    pub(crate) fn daemon_scrape(rx: u64, drops: u64) -> String {
        let mut s = String::from(
            "# HELP vhost_user_tap_build_info Build information.\n\
             # TYPE vhost_user_tap_build_info gauge\n\
             vhost_user_tap_build_info{version=\"0.1.0\"} 1\n\
             vhost_user_tap_frontend_connected 0\n\
             vhost_user_tap_backpressure{tap=\"vut0\"} 0\n",
        );
        for c in COUNTERS {
            let labels: String = c
                .labels
                .iter()
                .map(|(k, v)| format!(",{k}=\"{v}\""))
                .collect();
            let v = match c.field {
                "rx_frames" => rx,
                "rx_dropped_oversize" => drops,
                _ => 0,
            };
            s += &format!(
                "vhost_user_tap_{}_total{{queue=\"0\"{labels}}} {v}\n",
                c.metric
            );
        }
        s + "# EOF\n"
    }

    #[test]
    fn samples_with_and_without_labels_parse() {
        let m = Scrape::parse(
            "# TYPE x counter\n\
             x_total 3\n\
             y{a=\"1\",b=\"two words\"} 4.5 1700000000\n\
             z{path=\"a\\\"b\\\\c\\n\"} +Inf\n\n",
        )
        .unwrap();
        assert_eq!(m.count("x_total", &[]).unwrap(), 3);
        assert_eq!(m.sum("y", &[("b", "two words")]).unwrap(), 4.5);
        let z: Vec<_> = m.matching("z", &[]).collect();
        assert_eq!(z[0].labels[0].1, "a\"b\\c\n");
        assert!(z[0].value.is_infinite());
        assert!(m.count("y", &[]).is_err(), "4.5 is not a count");
    }

    #[test]
    fn malformed_lines_are_errors() {
        for bad in [
            "x",
            "x{a=\"1\" 3",
            "x{a=1} 3",
            "x{a=\"1\"} three",
            "x 1 2 3",
            "x{a=\"1\"b=\"2\"} 1",
        ] {
            assert!(Scrape::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_missing_sample_is_an_error_not_zero() {
        let m = Scrape::parse("vhost_user_tap_tap_tx_dropped_total{tap=\"vut0\"} 0\n").unwrap();
        assert_eq!(
            m.count("vhost_user_tap_tap_tx_dropped_total", &[]).unwrap(),
            0
        );
        let e = m
            .count("vhost_user_tap_tap_tx_packets_total", &[("tap", "vut0")])
            .unwrap_err();
        assert!(
            e.contains("tap_tx_packets_total{tap=\"vut0\"} missing"),
            "{e}"
        );
    }

    #[test]
    fn daemon_counters_sum_over_pairs_and_need_every_counter() {
        let one = Scrape::parse(&daemon_scrape(7, 2)).unwrap();
        let c = one.daemon_counters().unwrap();
        assert_eq!(
            (c.get("rx_frames"), c.rx_drops(), one.queues()),
            (7, 2, vec![0])
        );

        // A second pair: summed.
        let two = daemon_scrape(7, 2) + &daemon_scrape(5, 1).replace("queue=\"0\"", "queue=\"1\"");
        let two = Scrape::parse(&two).unwrap();
        let c = two.daemon_counters().unwrap();
        assert_eq!(
            (c.get("rx_frames"), c.rx_drops(), two.queues()),
            (12, 3, vec![0, 1])
        );

        // One counter missing from the scrape: an error naming it, never a 0.
        let text: String = daemon_scrape(7, 2)
            .lines()
            .filter(|l| !l.contains("reason=\"oversize\""))
            .map(|l| format!("{l}\n"))
            .collect();
        let e = Scrape::parse(&text).unwrap().daemon_counters().unwrap_err();
        assert!(
            e.contains("daemon_dropped_frames_total") && e.contains("missing"),
            "{e}"
        );

        // No daemon counters at all.
        let e = Scrape::parse("vhost_user_tap_frontend_connected 0\n")
            .unwrap()
            .daemon_counters()
            .unwrap_err();
        assert!(e.contains("rx_frames_total"), "{e}");
    }
}
