//! A sector bitmap for the replication buffers: one bit per 512-byte sector, stored in
//! lazily allocated chunks of atomic words, so a sparse 1 TiB disk costs a few KiB until it
//! is written, and bits can be read without a lock.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Sectors covered by one chunk (2^18 sectors = 128 MiB of disk, 32 KiB of bitmap).
const CHUNK_SECTORS: u64 = 1 << 18;
const WORDS_PER_CHUNK: usize = (CHUNK_SECTORS / 64) as usize;

/// One bit per sector.
pub struct SectorBitmap {
    sectors: u64,
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl std::fmt::Debug for SectorBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorBitmap").field("sectors", &self.sectors).finish()
    }
}

impl SectorBitmap {
    /// A clear bitmap for `sectors` sectors.
    pub fn new(sectors: u64) -> Self {
        let n = sectors.div_ceil(CHUNK_SECTORS) as usize;
        SectorBitmap { sectors, chunks: (0..n).map(|_| OnceLock::new()).collect() }
    }

    /// Number of sectors covered.
    pub fn len(&self) -> u64 {
        self.sectors
    }

    /// True when the bitmap covers no sectors.
    pub fn is_empty(&self) -> bool {
        self.sectors == 0
    }

    fn word(&self, sector: u64, alloc: bool) -> Option<&AtomicU64> {
        let chunk = self.chunks.get((sector / CHUNK_SECTORS) as usize)?;
        let words = if alloc {
            chunk.get_or_init(|| (0..WORDS_PER_CHUNK).map(|_| AtomicU64::new(0)).collect())
        } else {
            chunk.get()?
        };
        words.get(((sector % CHUNK_SECTORS) / 64) as usize)
    }

    /// Whether `sector` is set.
    pub fn get(&self, sector: u64) -> bool {
        self.word(sector, false).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (sector % 64)) != 0)
    }

    /// Applies `f(word, mask)` to every word overlapping [start, end).
    fn for_words(&self, start: u64, end: u64, alloc: bool, mut f: impl FnMut(&AtomicU64, u64)) {
        let end = end.min(self.sectors);
        let mut s = start;
        while s < end {
            let bit = s % 64;
            let n = (64 - bit).min(end - s);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
            if let Some(w) = self.word(s, alloc) {
                f(w, mask);
            } else if !alloc {
                // Unallocated chunk: skip to its end.
                let next = (s / CHUNK_SECTORS + 1) * CHUNK_SECTORS;
                s = next;
                continue;
            }
            s += n;
        }
    }

    /// Sets [start, end).
    pub fn set(&self, start: u64, end: u64) {
        self.for_words(start, end, true, |w, m| {
            w.fetch_or(m, Ordering::AcqRel);
        });
    }

    /// Clears [start, end).
    pub fn clear(&self, start: u64, end: u64) {
        self.for_words(start, end, false, |w, m| {
            w.fetch_and(!m, Ordering::AcqRel);
        });
    }

    /// Clears every bit (keeps the chunks for reuse).
    pub fn clear_all(&self) {
        for c in self.chunks.iter() {
            if let Some(words) = c.get() {
                for w in words.iter() {
                    w.store(0, Ordering::Release);
                }
            }
        }
    }

    /// Number of set sectors in [start, end).
    pub fn count(&self, start: u64, end: u64) -> u64 {
        let mut n = 0;
        self.for_words(start, end, false, |w, m| n += u64::from((w.load(Ordering::Acquire) & m).count_ones()));
        n
    }

    /// Number of set sectors overall.
    pub fn count_all(&self) -> u64 {
        self.count(0, self.sectors)
    }

    /// Splits [start, end) into maximal runs of equal bits: `(run_start, run_end, set)`.
    pub fn runs(&self, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let end = end.min(self.sectors);
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut s = start;
        while s < end {
            let v = self.get(s);
            let mut e = s + 1;
            // Fast path: skip whole words / unallocated chunks with the same value.
            while e < end {
                if e.is_multiple_of(64) && end - e >= 64 {
                    let word = self.word(e, false).map_or(0, |w| w.load(Ordering::Acquire));
                    if (v && word == u64::MAX) || (!v && word == 0) {
                        e += 64;
                        continue;
                    }
                }
                if self.get(e) != v {
                    break;
                }
                e += 1;
            }
            out.push((s, e, v));
            s = e;
        }
        out
    }

    /// The first set run at or after `from`, if any: `(start, end)`.
    pub fn next_set_run(&self, from: u64, limit: u64) -> Option<(u64, u64)> {
        let limit = limit.min(self.sectors);
        let mut s = from;
        while s < limit {
            let chunk = (s / CHUNK_SECTORS) as usize;
            if self.chunks.get(chunk).is_none_or(|c| c.get().is_none()) {
                s = (chunk as u64 + 1) * CHUNK_SECTORS;
                continue;
            }
            let w = self.word(s, false).map_or(0, |w| w.load(Ordering::Acquire)) >> (s % 64);
            if w == 0 {
                s = (s / 64 + 1) * 64;
                continue;
            }
            let start = s + u64::from(w.trailing_zeros());
            if start >= limit {
                return None;
            }
            let mut end = start + 1;
            while end < limit && self.get(end) {
                end += 1;
            }
            return Some((start, end));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compares against a plain Vec<bool> model.
    #[test]
    fn matches_a_plain_model() {
        let n = CHUNK_SECTORS * 2 + 100;
        let b = SectorBitmap::new(n);
        let mut model = vec![false; n as usize];
        let ops: &[(bool, u64, u64)] = &[
            (true, 0, 1),
            (true, 63, 130),
            (true, CHUNK_SECTORS - 5, CHUNK_SECTORS + 70),
            (false, 100, 120),
            (true, n - 10, n + 50),
            (false, 0, 64),
            (true, 500, 1000),
            (false, 700, 701),
        ];
        for &(set, s, e) in ops {
            if set {
                b.set(s, e)
            } else {
                b.clear(s, e)
            }
            for i in s..e.min(n) {
                model[i as usize] = set;
            }
        }
        for i in 0..n {
            assert_eq!(b.get(i), model[i as usize], "sector {i}");
        }
        assert_eq!(b.count_all(), model.iter().filter(|&&v| v).count() as u64);
        let mut pos = 0;
        for (s, e, v) in b.runs(0, n) {
            assert_eq!(s, pos);
            assert!(model[s as usize..e as usize].iter().all(|&m| m == v));
            if e < n {
                assert_ne!(model[e as usize], v);
            }
            pos = e;
        }
        assert_eq!(pos, n);
        let mut from = 0;
        let mut seen = 0;
        while let Some((s, e)) = b.next_set_run(from, n) {
            assert!(model[s as usize..e as usize].iter().all(|&m| m));
            seen += e - s;
            from = e;
        }
        assert_eq!(seen, b.count_all());
        b.clear_all();
        assert_eq!(b.count_all(), 0);
        assert_eq!(b.next_set_run(0, n), None);
    }

    #[test]
    fn sparse_bitmap_allocates_lazily() {
        let b = SectorBitmap::new(1 << 31); // 1 TiB of sectors
        assert!(b.chunks.iter().all(|c| c.get().is_none()));
        b.set(5, 6);
        assert_eq!(b.chunks.iter().filter(|c| c.get().is_some()).count(), 1);
        assert_eq!(b.runs(0, 1 << 31).len(), 3);
    }
}
