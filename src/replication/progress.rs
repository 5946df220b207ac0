//! Rate and time-to-go of long replication jobs (resync, failover commit), and the time of
//! the last error, as `query-replication` reports them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// Measures one job: bytes done since it started, over the time since.
#[derive(Debug, Default)]
pub struct JobClock {
    /// Start time and the job's done-bytes counter at that time.
    started: Mutex<Option<(Instant, u64)>>,
}

impl JobClock {
    /// The job (re)starts now; `done_now` is its done-bytes counter at this moment.
    pub fn start(&self, done_now: u64) {
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), done_now));
    }

    /// Whether a job is being measured.
    pub fn running(&self) -> bool {
        self.started.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// The job ended.
    pub fn stop(&self) {
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// `{"elapsed-s", "rate-bytes-per-s", "eta-s"}` while running (ETA null until a rate is
    /// known), null otherwise.
    pub fn json(&self, done: u64, remaining: u64) -> Value {
        let Some((t0, done0)) = *self.started.lock().unwrap_or_else(|e| e.into_inner()) else {
            return Value::Null;
        };
        let elapsed = t0.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 { done.saturating_sub(done0) as f64 / elapsed } else { 0.0 };
        let eta = (rate > 0.0).then(|| (remaining as f64 / rate * 10.0).round() / 10.0);
        json!({
            "elapsed-s": (elapsed * 10.0).round() / 10.0,
            "rate-bytes-per-s": rate.round() as u64,
            "eta-s": eta,
        })
    }
}

/// When the last error was recorded (seconds since the Unix epoch; 0 = never).
#[derive(Debug, Default)]
pub struct ErrorTime(AtomicU64);

impl ErrorTime {
    /// Records "now".
    pub fn mark(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.0.store(now, Ordering::Relaxed);
    }

    /// Forgets it (the error was cleared).
    pub fn clear(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    /// The time as JSON (null when none).
    pub fn json(&self) -> Value {
        match self.0.load(Ordering::Relaxed) {
            0 => Value::Null,
            t => json!(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_reports_rate_and_eta_only_while_running() {
        let c = JobClock::default();
        assert_eq!(c.json(10, 10), Value::Null);
        c.start(100);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let j = c.json(100 + 1_000_000, 200_000_000);
        let rate = j["rate-bytes-per-s"].as_u64().unwrap();
        assert!(rate > 0 && rate <= 1_000_000 * 50, "{j}");
        let eta = j["eta-s"].as_f64().unwrap();
        assert!(eta > 0.0, "{j}");
        c.stop();
        assert_eq!(c.json(0, 0), Value::Null);
        let e = ErrorTime::default();
        assert_eq!(e.json(), Value::Null);
        e.mark();
        assert!(e.json().as_u64().unwrap() > 1_700_000_000);
    }
}
