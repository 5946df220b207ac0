//! What the resync need not send as data: holes of the local disk (`SEEK_DATA`/`SEEK_HOLE`)
//! and blocks that read as zeroes. Both travel as NBD WRITE_ZEROES without
//! `NBD_CMD_FLAG_NO_HOLE`, so the secondary may keep them unallocated.
//!
//! The extent queries are hints about the disk at the moment they run; the resync asks again
//! once a chunk's dirty bits are cleared (see `Mirror::copy_chunks`), so a guest write that
//! fills a hole in between is never overwritten with zeroes on the secondary.

use crate::block::extents::is_zero;

/// Granularity of zero detection in a chunk read from the disk (bytes).
pub(super) const ZERO_BLOCK: usize = 64 << 10;

/// Splits `buf` into runs of [`ZERO_BLOCK`]-sized blocks (the last may be shorter) that are
/// all zero or not: `(start, end, zero)`, in order, adjacent runs of the same kind merged.
pub(super) fn zero_runs(buf: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, block) in buf.chunks(ZERO_BLOCK).enumerate() {
        let (s, e, z) = (i * ZERO_BLOCK, i * ZERO_BLOCK + block.len(), is_zero(block));
        match runs.last_mut() {
            Some(last) if last.2 == z => last.1 = e,
            _ => runs.push((s, e, z)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_and_runs() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 4097]));
        let mut b = vec![0u8; 4 * ZERO_BLOCK + 100];
        assert_eq!(zero_runs(&b), vec![(0, b.len(), true)]);
        b[ZERO_BLOCK + 63] = 1;
        b[4 * ZERO_BLOCK + 99] = 7;
        assert!(!is_zero(&b[ZERO_BLOCK..2 * ZERO_BLOCK]));
        assert!(!is_zero(&b[4 * ZERO_BLOCK..]));
        assert_eq!(
            zero_runs(&b),
            vec![
                (0, ZERO_BLOCK, true),
                (ZERO_BLOCK, 2 * ZERO_BLOCK, false),
                (2 * ZERO_BLOCK, 4 * ZERO_BLOCK, true),
                (4 * ZERO_BLOCK, b.len(), false),
            ]
        );
    }
}
