//! I/O statistics, kept per queue (no shared cache line between workers) and summed on query.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// Log2 latency buckets in microseconds: bucket i holds latencies in [2^(i-1), 2^i) µs.
const BUCKETS: usize = 32;

/// Which counter family a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Flushes.
    Flush,
    /// Discards and write-zeroes.
    Discard,
    /// GET_ID and other bookkeeping requests.
    Other,
}

/// Counters of one queue.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct QueueStats {
    ops: [AtomicU64; 5],
    bytes: [AtomicU64; 5],
    errors: [AtomicU64; 5],
    invalid: AtomicU64,
    dropped: AtomicU64,
    lat_us: [AtomicU64; BUCKETS],
    lat_total_ns: AtomicU64,
    lat_max_ns: AtomicU64,
}

fn idx(c: OpClass) -> usize {
    match c {
        OpClass::Read => 0,
        OpClass::Write => 1,
        OpClass::Flush => 2,
        OpClass::Discard => 3,
        OpClass::Other => 4,
    }
}

impl QueueStats {
    /// Records one finished request.
    pub fn record(&self, class: OpClass, bytes: u64, ok: bool, latency: Duration) {
        let i = idx(class);
        self.ops[i].fetch_add(1, Relaxed);
        if ok {
            self.bytes[i].fetch_add(bytes, Relaxed);
        } else {
            self.errors[i].fetch_add(1, Relaxed);
        }
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let us = ns / 1000;
        let bucket = (64 - us.leading_zeros() as usize).min(BUCKETS - 1);
        self.lat_us[bucket].fetch_add(1, Relaxed);
        self.lat_total_ns.fetch_add(ns, Relaxed);
        self.lat_max_ns.fetch_max(ns, Relaxed);
    }

    /// Counts a request refused by validation (answered with IOERR/UNSUPP).
    pub fn record_invalid(&self) {
        self.invalid.fetch_add(1, Relaxed);
    }

    /// Counts a chain dropped because it had no usable status byte.
    pub fn record_dropped(&self) {
        self.dropped.fetch_add(1, Relaxed);
    }
}

/// Per-direction figures in `query-blockstats`.
#[derive(Debug, Default, Serialize, PartialEq, Eq, Clone, Copy)]
pub struct DirStats {
    /// Requests completed.
    pub ops: u64,
    /// Bytes moved by successful requests.
    pub bytes: u64,
    /// Requests that failed in the I/O layer.
    pub errors: u64,
}

/// The `query-blockstats` answer.
#[derive(Debug, Default, Serialize, Clone)]
pub struct StatsSnapshot {
    /// Reads.
    pub read: DirStats,
    /// Writes.
    pub write: DirStats,
    /// Flushes.
    pub flush: DirStats,
    /// Discards and write-zeroes.
    pub discard: DirStats,
    /// GET_ID and similar.
    pub other: DirStats,
    /// Requests refused by validation (bad descriptors, out of range, unsupported).
    pub invalid: u64,
    /// Chains dropped because they had no valid status byte.
    pub dropped: u64,
    /// Mean latency over all requests, in microseconds.
    pub latency_mean_us: u64,
    /// Approximate median latency (upper bound of its log2 bucket), µs.
    pub latency_p50_us: u64,
    /// Approximate 99th percentile latency (upper bound of its log2 bucket), µs.
    pub latency_p99_us: u64,
    /// Largest latency seen, µs.
    pub latency_max_us: u64,
}

/// Sums the queues' counters.
pub fn snapshot<'a>(queues: impl IntoIterator<Item = &'a QueueStats>) -> StatsSnapshot {
    let mut s = StatsSnapshot::default();
    let mut hist = [0u64; BUCKETS];
    let (mut total_ns, mut max_ns) = (0u64, 0u64);
    for q in queues {
        for (i, d) in [&mut s.read, &mut s.write, &mut s.flush, &mut s.discard, &mut s.other].into_iter().enumerate() {
            d.ops += q.ops[i].load(Relaxed);
            d.bytes += q.bytes[i].load(Relaxed);
            d.errors += q.errors[i].load(Relaxed);
        }
        s.invalid += q.invalid.load(Relaxed);
        s.dropped += q.dropped.load(Relaxed);
        for (h, b) in hist.iter_mut().zip(q.lat_us.iter()) {
            *h += b.load(Relaxed);
        }
        total_ns += q.lat_total_ns.load(Relaxed);
        max_ns = max_ns.max(q.lat_max_ns.load(Relaxed));
    }
    let count: u64 = hist.iter().sum();
    if let Some(mean_ns) = total_ns.checked_div(count) {
        s.latency_mean_us = mean_ns / 1000;
        s.latency_p50_us = percentile(&hist, count, 50);
        s.latency_p99_us = percentile(&hist, count, 99);
        s.latency_max_us = max_ns / 1000;
    }
    s
}

fn percentile(hist: &[u64; BUCKETS], count: u64, pct: u64) -> u64 {
    let target = (count * pct).div_ceil(100);
    let mut seen = 0;
    for (i, &n) in hist.iter().enumerate() {
        seen += n;
        if seen >= target {
            return 1u64 << i;
        }
    }
    1u64 << (BUCKETS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_queues_and_percentiles() {
        let a = QueueStats::default();
        let b = QueueStats::default();
        for _ in 0..98 {
            a.record(OpClass::Read, 4096, true, Duration::from_micros(3));
        }
        b.record(OpClass::Write, 512, true, Duration::from_micros(100));
        b.record(OpClass::Write, 512, false, Duration::from_micros(1000));
        b.record_invalid();
        let s = snapshot([&a, &b]);
        assert_eq!(s.read, DirStats { ops: 98, bytes: 98 * 4096, errors: 0 });
        assert_eq!(s.write, DirStats { ops: 2, bytes: 512, errors: 1 });
        assert_eq!(s.invalid, 1);
        assert_eq!(s.latency_p50_us, 4);
        assert_eq!(s.latency_p99_us, 128);
        assert_eq!(s.latency_max_us, 1000);
    }
}
