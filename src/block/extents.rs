//! Where a file's data is: holes and data extents (`SEEK_DATA`/`SEEK_HOLE`), and a cheap
//! all-zero check. `block::image` builds on it (the extents of any image, for the primary's
//! sparse resync and the NBD server's block status). A block device, or a file system that
//! cannot tell, is all data.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Result of one `lseek(SEEK_DATA | SEEK_HOLE)`: `Ok(offset)`, or the errno.
fn seek(file: &File, from: u64, whence: i32) -> Result<u64, i32> {
    let Ok(off) = libc::off_t::try_from(from) else { return Err(libc::EINVAL) };
    // SAFETY: lseek on a descriptor `file` keeps open for the call; no memory is passed. The
    // file position it moves is not used by anyone (all I/O on the disk is positional).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 { Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)) } else { Ok(r as u64) }
}

/// End of the hole that starts at `from`, at most `limit`: `from` when `from` holds data (or
/// the file system cannot tell), `limit` when nothing but holes follows up to it. A block
/// device has no holes: it is all data.
pub fn hole_end(file: &File, from: u64, limit: u64) -> u64 {
    match seek(file, from, libc::SEEK_DATA) {
        Ok(d) => d.clamp(from, limit),
        // No data at or after `from` (a hole up to the end of the file).
        Err(libc::ENXIO) => limit,
        Err(_) => from,
    }
}

/// End of the data that starts at `from`, at most `limit` (and at least `from`; `limit` when
/// the file system cannot tell).
pub fn data_end(file: &File, from: u64, limit: u64) -> u64 {
    match seek(file, from, libc::SEEK_HOLE) {
        Ok(h) => h.clamp(from, limit),
        Err(_) => limit,
    }
}

/// Whether every byte of `b` is zero. ORs 64-byte blocks (which the compiler vectorises) and
/// stops at the first block that is not zero.
pub fn is_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(64);
    for c in &mut blocks {
        if c.iter().fold(0u8, |acc, &x| acc | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn extents_of_a_sparse_file() {
        const M: u64 = 1 << 20;
        let f = tempfile::tempfile().unwrap();
        f.set_len(64 * M).unwrap();
        f.write_all_at(&[1u8; 4096], 8 * M).unwrap();
        // A file system without SEEK_DATA reports all data; every one used here has it.
        if hole_end(&f, 0, 64 * M) == 0 {
            return;
        }
        assert_eq!(hole_end(&f, 0, 64 * M), 8 * M);
        assert_eq!(hole_end(&f, 0, 4 * M), 4 * M);
        assert_eq!(hole_end(&f, 8 * M, 64 * M), 8 * M);
        assert!(data_end(&f, 8 * M, 64 * M) >= 8 * M + 4096);
        assert!(data_end(&f, 8 * M, 64 * M) < 64 * M);
        assert_eq!(hole_end(&f, 9 * M, 64 * M), 64 * M);
        assert_eq!(hole_end(&f, 70 * M, 80 * M), 80 * M);
        // The extents of the file as an image (`block::image` builds them on the two above).
        let extents = |o, l, max| super::super::image::extents(&f, o, l, max);
        let e = extents(0, 64 * M, 100);
        assert_eq!(e.len(), 3, "{e:?}");
        assert_eq!((e[0], e[1].1, e[2].1), ((8 * M, true), false, true));
        assert_eq!(e.iter().map(|x| x.0).sum::<u64>(), 64 * M);
        assert_eq!(extents(0, 64 * M, 1), vec![(8 * M, true)]);
        assert_eq!(extents(8 * M + 512, 1024, 10), vec![(1024, false)]);
        assert_eq!(extents(60 * M, 4 * M, 10), vec![(4 * M, true)]);
    }
}
