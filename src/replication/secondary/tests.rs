//! Unit tests of the secondary's locking and checkpoint.
use super::*;
use crate::block::raw::{EngineKind, RawDisk, RawOptions};
use crate::nbd::NbdExport;
use crate::replication::{Mode, ReplicationControl, StartArgs};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// A started secondary on a disk of `size` bytes of 0x11 in `dir`.
pub(super) fn secondary(dir: &Path, size: u64) -> Arc<Secondary> {
    let disk = RawDisk::open(&RawOptions {
        path: dir.join("d.img"),
        create_size: Some(size),
        read_only: false,
        direct: false,
        block_size: 512,
        engine: EngineKind::Sync,
    })
    .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&**disk.file(), &vec![0x11u8; size as usize], 0).unwrap();
    let files = SecondaryFiles { active: dir.join("a.img"), hidden: dir.join("h.img"), direct: false };
    let data = disk.data().unwrap();
    let path = disk.path().to_path_buf();
    let s = Secondary::open(Arc::new(disk), data, path, files).unwrap();
    SecondaryControl(s.clone()).start(&StartArgs::mode(Mode::Secondary)).unwrap();
    s
}

/// A VM read that falls through to the disk waits while a primary write holds its range:
/// the deterministic version of the race the integration stress test provokes.
#[test]
fn vm_read_waits_for_a_primary_write_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let s = secondary(dir.path(), 1 << 20);
    // Play the NBD writer by hand, stopping halfway: range held, old data saved, new data
    // already on the disk.
    let guard = s.locks.exclusive(0, 8);
    s.copy_before_write(0, 8).unwrap();
    s.file.write_all_at(&[0x22u8; 4096], 0).unwrap();
    let (tx, rx) = mpsc::channel();
    let s2 = s.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        let iov = vec![libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: 4096 }];
        // SAFETY: `buf` outlives the request, dropped at the end of the statement.
        let r =
            s2.vm_execute(&mut IoRequest::new(0, OpKind::Read { offset: 0 }, unsafe { Buffers::from_raw(iov, None) }));
        tx.send(()).unwrap();
        (r, buf)
    });
    // The reader must not finish while the range is held.
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "VM read did not wait for the range lock");
    drop(guard);
    let (r, buf) = reader.join().unwrap();
    assert_eq!(r, 4096);
    assert!(buf.iter().all(|&b| b == 0x11), "VM read saw the primary's new data");
}

#[test]
fn checkpoint_reports_and_empties() {
    let dir = tempfile::tempdir().unwrap();
    let s = secondary(dir.path(), 1 << 20);
    let mut data = vec![0x33u8; 8192];
    let iov = vec![libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: 8192 }];
    let write = OpKind::Write { offset: 4096, dsync: false };
    // SAFETY: `data` outlives the request, dropped at the end of the statement.
    assert_eq!(s.vm_execute(&mut IoRequest::new(0, write, unsafe { Buffers::from_raw(iov, None) })), 8192);
    SecondaryExport(s.clone()).write(65536, &[0x22u8; 512], false).unwrap();
    assert_eq!(s.overlay.active_map.count_all(), 16);
    assert_eq!(s.overlay.saved_map.count_all(), 1);
    SecondaryControl(s.clone()).checkpoint(None).unwrap();
    assert_eq!(s.overlay.active_map.count_all() + s.overlay.saved_map.count_all(), 0);
    let q = SecondaryControl(s.clone()).query();
    assert_eq!(q["checkpoints"], 1);
}
