//! A sector bitmap for the replication buffers and the primary's dirty map: one bit per
//! 512-byte sector, whose memory follows the dirty data rather than the address space
//! touched.
//!
//! The disk is split into groups of 1 GiB, each behind its own mutex. A group holds its set
//! sectors as extents (a `BTreeMap` from start to end) while it has at most
//! [`SPARSE_MAX_EXTENTS`] of them, so scattered 4 KiB writes over a 1 TiB disk cost tens of
//! bytes each, a full-disk range costs one extent per group, and clearing frees the memory.
//! A group fragmented beyond that switches to a dense bitmap (256 KiB per GiB), which bounds
//! the whole structure at one bit per sector whatever a guest or peer writes; it is freed
//! again as soon as it is clear.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Sectors per group (1 GiB of disk); local offsets fit a `u32`.
const GROUP_SECTORS: u64 = 1 << 21;
const GROUP_WORDS: usize = (GROUP_SECTORS / 64) as usize;
/// Extents a group keeps before it switches to a dense bitmap (about half the dense size).
const SPARSE_MAX_EXTENTS: usize = 8192;

/// One group's set sectors, as local offsets in `[0, GROUP_SECTORS)`.
#[derive(Debug)]
enum Group {
    /// Disjoint, non-adjacent extents: start -> end (exclusive), and how many sectors they hold.
    Sparse(BTreeMap<u32, u32>, u64),
    /// One bit per sector, and how many are set.
    Dense { words: Box<[u64]>, set: u64 },
}

impl Default for Group {
    fn default() -> Self {
        Group::Sparse(BTreeMap::new(), 0)
    }
}

/// A mask of bits [lo, hi) of one word (0 <= lo < hi <= 64).
fn mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl Group {
    fn set(&mut self, a: u32, b: u32) {
        match self {
            Group::Sparse(map, set) => {
                let (mut lo, mut hi) = (a, b);
                // Every extent that overlaps or touches [a, b) merges into one.
                let touching: Vec<(u32, u32)> =
                    map.range(..=b).rev().take_while(|&(_, &e)| e >= a).map(|(&s, &e)| (s, e)).collect();
                for (s, e) in touching {
                    map.remove(&s);
                    *set -= u64::from(e - s);
                    lo = lo.min(s);
                    hi = hi.max(e);
                }
                map.insert(lo, hi);
                *set += u64::from(hi - lo);
                if map.len() > SPARSE_MAX_EXTENTS {
                    self.densify();
                }
            }
            Group::Dense { words, set } => {
                Self::dense_update(words, u64::from(a), u64::from(b), |w, m| {
                    *set += u64::from((!*w & m).count_ones());
                    *w |= m;
                });
            }
        }
    }

    fn clear(&mut self, a: u32, b: u32) {
        match self {
            Group::Sparse(map, set) => {
                let overlapping: Vec<(u32, u32)> =
                    map.range(..b).rev().take_while(|&(_, &e)| e > a).map(|(&s, &e)| (s, e)).collect();
                for (s, e) in overlapping {
                    map.remove(&s);
                    *set -= u64::from(e.min(b) - s.max(a));
                    if s < a {
                        map.insert(s, a);
                    }
                    if e > b {
                        map.insert(b, e);
                    }
                }
            }
            Group::Dense { words, set } => {
                Self::dense_update(words, u64::from(a), u64::from(b), |w, m| {
                    *set -= u64::from((*w & m).count_ones());
                    *w &= !m;
                });
                if *set == 0 {
                    // Memory follows the dirty data: a clean dense group is freed.
                    *self = Group::default();
                }
            }
        }
    }

    fn dense_update(words: &mut [u64], a: u64, b: u64, mut f: impl FnMut(&mut u64, u64)) {
        let mut s = a;
        while s < b {
            let bit = s % 64;
            let n = (64 - bit).min(b - s);
            f(&mut words[(s / 64) as usize], mask(bit, bit + n));
            s += n;
        }
    }

    fn densify(&mut self) {
        if let Group::Sparse(map, _) = self {
            let mut words = vec![0u64; GROUP_WORDS].into_boxed_slice();
            let mut set = 0;
            for (&s, &e) in map.iter() {
                Self::dense_update(&mut words, u64::from(s), u64::from(e), |w, m| *w |= m);
                set += u64::from(e - s);
            }
            *self = Group::Dense { words, set };
        }
    }

    fn get(&self, x: u32) -> bool {
        match self {
            Group::Sparse(map, _) => map.range(..=x).next_back().is_some_and(|(_, &e)| x < e),
            Group::Dense { words, .. } => words[(x / 64) as usize] & (1 << (x % 64)) != 0,
        }
    }

    fn count(&self) -> u64 {
        match self {
            Group::Sparse(_, set) | Group::Dense { set, .. } => *set,
        }
    }

    fn is_clear(&self) -> bool {
        match self {
            Group::Sparse(_, set) | Group::Dense { set, .. } => *set == 0,
        }
    }

    /// Whether any sector of [a, b) is set (no allocation: the VM read path asks this).
    fn any(&self, a: u32, b: u32) -> bool {
        match self {
            Group::Sparse(_, 0) | Group::Dense { set: 0, .. } => false,
            Group::Sparse(map, _) => {
                map.range(..a).next_back().is_some_and(|(_, &e)| e > a) || map.range(a..b).next().is_some()
            }
            Group::Dense { words, .. } => {
                let (a, b) = (u64::from(a), u64::from(b));
                let mut s = a;
                while s < b {
                    let w = s / 64;
                    let hi = ((w + 1) * 64).min(b);
                    if words[w as usize] & mask(s % 64, hi - w * 64) != 0 {
                        return true;
                    }
                    s = hi;
                }
                false
            }
        }
    }

    /// Whether every sector of [a, b) is set (no allocation: the VM read path asks this).
    fn all(&self, a: u32, b: u32) -> bool {
        match self {
            _ if a >= b => true,
            Group::Sparse(_, 0) | Group::Dense { set: 0, .. } => false,
            // Extents never touch (`set` merges neighbours): one extent must cover [a, b).
            Group::Sparse(map, _) => map.range(..=a).next_back().is_some_and(|(_, &e)| e >= b),
            Group::Dense { words, .. } => {
                let (a, b) = (u64::from(a), u64::from(b));
                let mut s = a;
                while s < b {
                    let w = s / 64;
                    let hi = ((w + 1) * 64).min(b);
                    let m = mask(s % 64, hi - w * 64);
                    if words[w as usize] & m != m {
                        return false;
                    }
                    s = hi;
                }
                true
            }
        }
    }

    /// The set extents overlapping [a, b), clipped to it, in order.
    fn set_runs(&self, a: u32, b: u32, out: &mut Vec<(u32, u32)>) {
        match self {
            Group::Sparse(map, _) => {
                // The extent that starts before `a` and covers it, then those starting in [a, b).
                if let Some((_, &e)) = map.range(..a).next_back()
                    && e > a
                {
                    out.push((a, e.min(b)));
                }
                out.extend(map.range(a..b).map(|(&s, &e)| (s, e.min(b))));
            }
            Group::Dense { words, .. } => {
                let mut s = u64::from(a);
                let b = u64::from(b);
                while s < b {
                    let w = words[(s / 64) as usize] >> (s % 64);
                    if w == 0 {
                        s = (s / 64 + 1) * 64;
                        continue;
                    }
                    let start = s + u64::from(w.trailing_zeros());
                    if start >= b {
                        break;
                    }
                    let mut end = start;
                    loop {
                        let w = !(words[(end / 64) as usize] >> (end % 64));
                        let ones = if w == 0 { 64 - end % 64 } else { u64::from(w.trailing_zeros()) };
                        end += ones;
                        if end >= b || ones == 0 || !end.is_multiple_of(64) {
                            break;
                        }
                    }
                    let end = end.min(b);
                    out.push((start as u32, end as u32));
                    s = end;
                }
            }
        }
    }
}

/// The memory of bits a [`SectorBitmap::take_all`] cleared; freed when dropped.
#[derive(Debug, Default)]
pub struct ClearedBits {
    _groups: Vec<Group>,
}

/// One bit per sector.
pub struct SectorBitmap {
    sectors: u64,
    groups: Box<[Mutex<Group>]>,
    /// Set sectors overall, kept under the group locks: `any` on an empty map (the secondary
    /// VM's reads while the buffers are empty) answers without taking a lock.
    total: AtomicU64,
}

impl std::fmt::Debug for SectorBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorBitmap").field("sectors", &self.sectors).finish()
    }
}

impl SectorBitmap {
    /// A clear bitmap for `sectors` sectors.
    pub fn new(sectors: u64) -> Self {
        let n = sectors.div_ceil(GROUP_SECTORS) as usize;
        SectorBitmap {
            sectors,
            groups: (0..n).map(|_| Mutex::new(Group::default())).collect(),
            total: AtomicU64::new(0),
        }
    }

    /// Number of sectors covered.
    pub fn len(&self) -> u64 {
        self.sectors
    }

    /// True when the bitmap covers no sectors.
    pub fn is_empty(&self) -> bool {
        self.sectors == 0
    }

    fn group(&self, index: usize) -> MutexGuard<'_, Group> {
        // A panic while holding a group lock cannot leave it half-updated in a way that
        // matters more than losing the whole map would.
        self.groups[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls `f(group, local_start, local_end)` for every group overlapping [start, end),
    /// clipped to the bitmap.
    fn each_group(&self, start: u64, end: u64, mut f: impl FnMut(usize, u32, u32)) {
        let end = end.min(self.sectors);
        let mut s = start;
        while s < end {
            let g = s / GROUP_SECTORS;
            let group_end = ((g + 1) * GROUP_SECTORS).min(end);
            // Local offsets are below GROUP_SECTORS = 2^21: they fit a u32.
            f(g as usize, (s % GROUP_SECTORS) as u32, (group_end - g * GROUP_SECTORS) as u32);
            s = group_end;
        }
    }

    /// Whether `sector` is set.
    pub fn get(&self, sector: u64) -> bool {
        sector < self.sectors && self.group((sector / GROUP_SECTORS) as usize).get((sector % GROUP_SECTORS) as u32)
    }

    /// Sets [start, end).
    pub fn set(&self, start: u64, end: u64) {
        self.each_group(start, end, |g, a, b| {
            let mut group = self.group(g);
            let before = group.count();
            group.set(a, b);
            self.total.fetch_add(group.count() - before, Ordering::SeqCst);
        });
    }

    /// Clears [start, end); memory of what became clear is freed.
    pub fn clear(&self, start: u64, end: u64) {
        self.each_group(start, end, |g, a, b| {
            let mut group = self.group(g);
            let before = group.count();
            group.clear(a, b);
            self.total.fetch_sub(before - group.count(), Ordering::SeqCst);
        });
    }

    /// Clears every bit and frees the memory that held them.
    pub fn clear_all(&self) {
        drop(self.take_all());
    }

    /// Clears every bit and returns what held them, for the caller to free where the time it
    /// takes does not matter (freeing 100k extents takes about a millisecond).
    pub fn take_all(&self) -> ClearedBits {
        let mut groups = Vec::new();
        for g in 0..self.groups.len() {
            let mut group = self.group(g);
            if !group.is_clear() {
                self.total.fetch_sub(group.count(), Ordering::SeqCst);
                groups.push(std::mem::take(&mut *group));
            }
        }
        ClearedBits { _groups: groups }
    }

    /// Whether any sector of [start, end) is set.
    pub fn any(&self, start: u64, end: u64) -> bool {
        // SeqCst, as the updates: a reader that finds 0 here ran before any set that could
        // matter to it (see `Secondary::direct_read_valid`).
        if self.total.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let mut found = false;
        self.each_group(start, end, |g, a, b| found = found || self.group(g).any(a, b));
        found
    }

    /// Whether every sector of [start, end) is set (true for an empty range).
    pub fn all(&self, start: u64, end: u64) -> bool {
        if end > self.sectors {
            return false;
        }
        if start < end && self.total.load(Ordering::SeqCst) < end - start {
            return false;
        }
        let mut all = true;
        self.each_group(start, end, |g, a, b| all = all && self.group(g).all(a, b));
        all
    }

    /// Number of set sectors in [start, end).
    pub fn count(&self, start: u64, end: u64) -> u64 {
        let mut n = 0;
        let mut runs = Vec::new();
        self.each_group(start, end, |g, a, b| {
            let group = self.group(g);
            if a == 0 && u64::from(b) == GROUP_SECTORS {
                n += group.count();
                return;
            }
            runs.clear();
            group.set_runs(a, b, &mut runs);
            n += runs.iter().map(|&(s, e)| u64::from(e - s)).sum::<u64>();
        });
        n
    }

    /// Number of set sectors overall: one counter per group, no walk over the extents.
    pub fn count_all(&self) -> u64 {
        self.total.load(Ordering::SeqCst)
    }

    /// Whether no sector is set.
    pub fn is_clear(&self) -> bool {
        (0..self.groups.len()).all(|g| self.group(g).is_clear())
    }

    /// Bytes of memory the set sectors take (an estimate: extents and dense words, not the
    /// allocator's overhead).
    pub fn memory_bytes(&self) -> u64 {
        (0..self.groups.len())
            .map(|g| match &*self.group(g) {
                // A BTreeMap node holds up to 11 (u32, u32) pairs plus edges: ~16 bytes a pair.
                Group::Sparse(map, _) => map.len() as u64 * 16,
                Group::Dense { words, .. } => words.len() as u64 * 8,
            })
            .sum()
    }

    /// Splits [start, end) into maximal runs of equal bits: `(run_start, run_end, set)`.
    pub fn runs(&self, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let end = end.min(self.sectors);
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut push = |s: u64, e: u64, v: bool| {
            if s >= e {
                return;
            }
            match out.last_mut() {
                Some(last) if last.2 == v && last.1 == s => last.1 = e,
                _ => out.push((s, e, v)),
            }
        };
        let mut local = Vec::new();
        let mut pos = start;
        self.each_group(start, end, |g, a, b| {
            let base = g as u64 * GROUP_SECTORS;
            local.clear();
            self.group(g).set_runs(a, b, &mut local);
            for &(s, e) in &local {
                push(pos, base + u64::from(s), false);
                push(base + u64::from(s), base + u64::from(e), true);
                pos = base + u64::from(e);
            }
        });
        push(pos, end, false);
        out
    }

    /// The first set run at or after `from` and before `limit`, if any: `(start, end)`.
    pub fn next_set_run(&self, from: u64, limit: u64) -> Option<(u64, u64)> {
        let limit = limit.min(self.sectors);
        let mut found: Option<(u64, u64)> = None;
        let mut local = Vec::new();
        let mut g = (from / GROUP_SECTORS) as usize;
        let mut s = from;
        while s < limit {
            let base = g as u64 * GROUP_SECTORS;
            let b = ((g as u64 + 1) * GROUP_SECTORS).min(limit);
            local.clear();
            self.group(g).set_runs((s - base) as u32, (b - base) as u32, &mut local);
            match (found, local.first()) {
                (None, Some(&(rs, re))) => {
                    found = Some((base + u64::from(rs), base + u64::from(re)));
                    if base + u64::from(re) < b {
                        break;
                    }
                }
                // A run that reached the previous group's end goes on here only if this
                // group's first run starts at its very beginning.
                (Some((fs, _)), Some(&(0, re))) if s == base => {
                    found = Some((fs, base + u64::from(re)));
                    if base + u64::from(re) < b {
                        break;
                    }
                }
                (Some(_), _) => break,
                (None, None) => {}
            }
            s = b;
            g += 1;
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic generator (no extra crate for property tests).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    fn check_against_model(b: &SectorBitmap, model: &[bool]) {
        let n = model.len() as u64;
        for (i, &m) in model.iter().enumerate() {
            assert_eq!(b.get(i as u64), m, "sector {i}");
        }
        assert_eq!(b.count_all(), model.iter().filter(|&&v| v).count() as u64);
        let mut pos = 0;
        for (s, e, v) in b.runs(0, n) {
            assert_eq!(s, pos);
            assert!(e > s);
            assert!(model[s as usize..e as usize].iter().all(|&m| m == v), "run {s}..{e} {v}");
            if e < n {
                assert_ne!(model[e as usize], v, "run {s}..{e} not maximal");
            }
            pos = e;
        }
        assert_eq!(pos, n);
        let mut from = 0;
        let mut seen = 0;
        while let Some((s, e)) = b.next_set_run(from, n) {
            assert!(s >= from);
            assert!(model[from as usize..s as usize].iter().all(|&m| !m));
            assert!(model[s as usize..e as usize].iter().all(|&m| m));
            assert!(e == n || !model[e as usize], "run {s}..{e} not maximal");
            seen += e - s;
            from = e;
        }
        assert_eq!(seen, b.count_all());
        // `any` over windows of every size class, across group ends.
        let mut rng = Lcg(n);
        for _ in 0..400 {
            let s = rng.next() % n;
            let e = (s + 1 + rng.next() % 5000).min(n);
            assert_eq!(b.any(s, e), model[s as usize..e as usize].iter().any(|&m| m), "any {s}..{e}");
            assert_eq!(b.all(s, e), model[s as usize..e as usize].iter().all(|&m| m), "all {s}..{e}");
            // Small windows (a VM read) starting at a set sector, where `all` is often true.
            if let Some(f) = (s..n).find(|&i| model[i as usize]) {
                let e = (f + 1 + rng.next() % 16).min(n);
                assert_eq!(b.all(f, e), model[f as usize..e as usize].iter().all(|&m| m), "all {f}..{e}");
            }
        }
    }

    /// Random sets and clears, across group boundaries, in both representations, against a
    /// plain `Vec<bool>`.
    #[test]
    fn matches_a_plain_model() {
        for seed in 0..6u64 {
            let n = GROUP_SECTORS * 2 + 1000;
            let b = SectorBitmap::new(n);
            let mut model = vec![false; n as usize];
            let mut rng = Lcg(seed);
            if seed >= 3 {
                // Fragment group 0 beyond the extent limit: it must turn dense.
                for k in 0..(SPARSE_MAX_EXTENTS as u64 + 500) {
                    b.set(2 * k, 2 * k + 1);
                    model[2 * k as usize] = true;
                }
            }
            for step in 0..600 {
                let s = if step % 7 == 0 { GROUP_SECTORS - 50 + rng.next() % 100 } else { rng.next() % n };
                let e = (s + 1 + rng.next() % 3000).min(n);
                let set = !rng.next().is_multiple_of(3);
                if set {
                    b.set(s, e)
                } else {
                    b.clear(s, e)
                }
                for i in s..e {
                    model[i as usize] = set;
                }
            }
            if seed >= 3 {
                assert!(matches!(&*b.group(0), Group::Dense { .. }), "group 0 never became dense");
            }
            check_against_model(&b, &model);
            assert_eq!(b.count(100, 5000), model[100..5000].iter().filter(|&&v| v).count() as u64);
            b.clear_all();
            assert_eq!(b.count_all(), 0);
            assert!(b.is_clear());
            assert_eq!(b.next_set_run(0, n), None);
            assert_eq!(b.memory_bytes(), 0);
        }
    }

    #[test]
    fn runs_continue_across_groups() {
        let b = SectorBitmap::new(GROUP_SECTORS * 3);
        b.set(GROUP_SECTORS - 10, 2 * GROUP_SECTORS + 5);
        assert_eq!(b.next_set_run(0, u64::MAX), Some((GROUP_SECTORS - 10, 2 * GROUP_SECTORS + 5)));
        assert_eq!(
            b.runs(0, 3 * GROUP_SECTORS),
            vec![
                (0, GROUP_SECTORS - 10, false),
                (GROUP_SECTORS - 10, 2 * GROUP_SECTORS + 5, true),
                (2 * GROUP_SECTORS + 5, 3 * GROUP_SECTORS, false)
            ]
        );
        assert_eq!(b.next_set_run(GROUP_SECTORS + 7, GROUP_SECTORS + 9), Some((GROUP_SECTORS + 7, GROUP_SECTORS + 9)));
    }

    /// The figure issue-level goal asks for: scattered 4 KiB writes over 1 TiB cost memory in
    /// proportion to the writes, and a clear gives it all back.
    #[test]
    fn memory_follows_the_dirty_data() {
        let b = SectorBitmap::new(1 << 31); // 1 TiB of sectors
        assert_eq!(b.memory_bytes(), 0);
        let mut rng = Lcg(7);
        for _ in 0..100_000 {
            let s = (rng.next() % (1 << 31)) & !7;
            b.set(s, s + 8);
        }
        // 100k extents: ~1.6 MB, where one bit per sector would be 256 MiB.
        assert!(b.memory_bytes() < 4 << 20, "{}", b.memory_bytes());
        b.set(0, 1 << 31);
        assert!(b.memory_bytes() < 64 << 10, "a full range is one extent per group");
        b.clear(0, 1 << 31);
        assert_eq!(b.memory_bytes(), 0);
        assert!(b.is_clear());
    }
}
