//! What the scripts collect, as the report reads it: `key=value` records (one a line in a file,
//! or words on a console marker line), files read whole, and the JSON that `tc -j` and `ip -j`
//! print.

use std::fmt::Display;
use std::path::Path;
use std::str::FromStr;

use serde_json::Value;

/// `key=value` pairs in the order they came; a key may repeat.
#[derive(Clone, Debug, Default)]
pub struct Record {
    entries: Vec<(String, String)>,
    /// Where it came from, for error messages.
    origin: String,
}

impl Record {
    /// One `key=value` a line; the value is the rest of the line (spaces included). Lines
    /// without `=` are ignored.
    pub fn from_lines(text: &str, origin: impl Into<String>) -> Record {
        let entries = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.to_string()))
            .collect();
        Record {
            entries,
            origin: origin.into(),
        }
    }

    /// Whitespace-separated `key=value` words; other words are ignored.
    pub fn from_words(text: &str, origin: impl Into<String>) -> Record {
        let entries = text
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Record {
            entries,
            origin: origin.into(),
        }
    }

    /// The last value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `key`, in order.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn str(&self, key: &str) -> Result<&str, String> {
        self.get(key)
            .ok_or_else(|| format!("{}: no {key}=", self.origin))
    }

    /// The value of `key` parsed; a missing or unparsable value is an error, never 0.
    pub fn num<T: FromStr>(&self, key: &str) -> Result<T, String>
    where
        T::Err: Display,
    {
        let v = self.str(key)?;
        v.parse()
            .map_err(|e| format!("{}: {key}={v:?}: {e}", self.origin))
    }
}

pub fn read(path: &Path) -> Result<String, String> {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .map_err(|e| format!("{}: {e}", path.display()))
}

pub fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// A console log: carriage returns gone, lines as the serial port gave them.
pub fn console_lines(text: &str) -> Vec<String> {
    text.replace('\r', "").lines().map(str::to_string).collect()
}

/// A whole number at `key` of a JSON object.
pub fn json_count(v: &Value, key: &str, what: &str) -> Result<u64, String> {
    v.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("{what}: no count {key:?} in {v}"))
}

/// The root qdisc of `tc -s -j qdisc show dev TAP`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootQdisc {
    pub kind: String,
    /// Packets it sent (to the tap).
    pub packets: u64,
    pub drops: u64,
    pub requeues: u64,
    pub overlimits: u64,
    /// Packets queued (`qlen`; `backlog` is in bytes).
    pub qlen: u64,
    /// The whole entry, for kind-specific statistics (fq_codel's `drop_overlimit`) and options.
    pub raw: Value,
}

impl RootQdisc {
    pub fn parse(json: &str, what: &str) -> Result<RootQdisc, String> {
        let all: Value = serde_json::from_str(json.trim())
            .map_err(|e| format!("{what}: not tc's JSON ({e}): {json:?}"))?;
        let root = all
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|q| q.get("root").and_then(Value::as_bool) == Some(true))
            })
            .ok_or_else(|| format!("{what}: no root qdisc in {json}"))?;
        let n = |k| json_count(root, k, what);
        Ok(RootQdisc {
            kind: root
                .get("kind")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{what}: root qdisc without kind: {root}"))?
                .to_string(),
            packets: n("packets")?,
            drops: n("drops")?,
            requeues: n("requeues")?,
            overlimits: n("overlimits")?,
            qlen: n("qlen")?,
            raw: root.clone(),
        })
    }
}

/// The TX counters of `ip -s -j link show dev TAP` (the tap's TX: frames toward its reader).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkTx {
    pub packets: u64,
    pub dropped: u64,
}

impl LinkTx {
    pub fn parse(json: &str, what: &str) -> Result<LinkTx, String> {
        let all: Value = serde_json::from_str(json.trim())
            .map_err(|e| format!("{what}: not ip's JSON ({e}): {json:?}"))?;
        let tx = all
            .get(0)
            .and_then(|l| l.get("stats64"))
            .and_then(|s| s.get("tx"))
            .ok_or_else(|| format!("{what}: no stats64.tx in {json}"))?;
        Ok(LinkTx {
            packets: json_count(tx, "packets", what)?,
            dropped: json_count(tx, "dropped", what)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_order_and_missing_keys_are_errors() {
        let r = Record::from_lines("a=1\nb=two words\ncrash=x\ncrash=y\n", "run.txt");
        assert_eq!(r.num::<u64>("a").unwrap(), 1);
        assert_eq!(r.str("b").unwrap(), "two words");
        assert_eq!(r.all("crash"), ["x", "y"]);
        assert!(r.num::<u64>("c").unwrap_err().contains("no c="));
        assert!(r.num::<u64>("b").is_err());
        let w = Record::from_words("tag sent=5 x=1 x=2", "RESULT");
        assert_eq!((w.get("sent"), w.get("x")), (Some("5"), Some("2")));
    }

    #[test]
    fn tc_and_ip_json() {
        let q = RootQdisc::parse(
            r#"[{"kind":"pfifo_fast","handle":"0:","root":true,"refcnt":2,"options":{"bands":3},
                "bytes":60,"packets":1,"drops":2,"overlimits":0,"requeues":0,"backlog":0,"qlen":3}]"#,
            "qdisc.json",
        )
        .unwrap();
        assert_eq!(
            (q.kind.as_str(), q.packets, q.drops, q.qlen),
            ("pfifo_fast", 1, 2, 3)
        );
        assert!(RootQdisc::parse("[]", "q").is_err());
        assert!(RootQdisc::parse(r#"[{"kind":"x","root":true}]"#, "q").is_err());
        let l = LinkTx::parse(
            r#"[{"ifname":"vut0","stats64":{"rx":{"packets":1,"dropped":0},
                "tx":{"bytes":9,"packets":11,"errors":0,"dropped":4}}}]"#,
            "link.json",
        )
        .unwrap();
        assert_eq!(
            l,
            LinkTx {
                packets: 11,
                dropped: 4
            }
        );
        assert!(LinkTx::parse("[{}]", "link.json").is_err());
    }
}
