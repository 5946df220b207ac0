//! A small seeded generator (SplitMix64) for the model-based unit tests: a failing seed can
//! be replayed exactly.

/// SplitMix64.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in [0, n).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// In [lo, hi_inclusive].
    pub(crate) fn range(&mut self, lo: u64, hi_inclusive: u64) -> u64 {
        lo + self.below(hi_inclusive - lo + 1)
    }

    /// True with probability `p` percent.
    pub(crate) fn pct(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    /// `n` random bytes.
    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// A random index of `v` (not empty).
    pub(crate) fn pick<T>(&mut self, v: &[T]) -> usize {
        assert!(!v.is_empty());
        self.below(v.len() as u64) as usize
    }
}
