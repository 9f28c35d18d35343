//! Rate limiting for warnings a guest can trigger at will (malformed descriptors, frames the tap
//! refuses): at most one line per interval per call site, with a count of what was held back.
//! The counters in `stats` still count every event.

use std::time::{Duration, Instant};

pub struct RateLimited {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    pub const fn new(interval: Duration) -> Self {
        RateLimited {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log now; `n` earlier events were not logged. `None`: stay quiet.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.interval)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl Default for RateLimited {
    fn default() -> Self {
        RateLimited::new(Duration::from_secs(1))
    }
}

/// ", N similar messages suppressed" when N > 0.
pub fn suppressed(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} similar messages suppressed)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_rest_counted() {
        let mut r = RateLimited::new(Duration::from_secs(3600));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
        r.last = Some(Instant::now() - Duration::from_secs(3601));
        assert_eq!(r.allow(), Some(2));
        assert_eq!(suppressed(2), " (2 similar messages suppressed)");
        assert_eq!(suppressed(0), "");
    }
}
