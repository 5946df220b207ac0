//! One suite, run on every engine that stores data (sync and io_uring), against real files.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::sync::SyncEngine;
use super::uring::UringEngine;
use super::{Completion, IoEngine, Op};

fn run_one(e: &mut dyn IoEngine, op: &Op<'_>, token: u64) -> Completion {
    // SAFETY: every buffer referenced by `op` lives in the caller's frame until we return,
    // and we wait for the completion before returning.
    unsafe { e.push(op, token) }.unwrap();
    e.submit().unwrap();
    let mut out = Vec::new();
    e.reap(&mut out);
    while out.is_empty() {
        let fd = e.notifier().expect("an engine with pending work has a notifier");
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(ready, 1, "no completion signalled");
        e.clear_notifier();
        e.reap(&mut out);
    }
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].token, token);
    out[0]
}

fn iov(b: &mut [u8]) -> libc::iovec {
    libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }
}

fn engine_suite(make: &dyn Fn(Arc<std::fs::File>) -> Box<dyn IoEngine>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.img");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    file.set_len(1 << 20).unwrap();
    let file = Arc::new(file);
    let mut e = make(file.clone());

    // Gather write of two buffers, then a scatter read at a different split.
    let mut a = vec![0xAAu8; 4096];
    let mut b = vec![0xBBu8; 512];
    let w = [iov(&mut a), iov(&mut b)];
    let c = run_one(&mut *e, &Op::Write { offset: 8192, iovecs: &w, dsync: false }, 7);
    assert_eq!(c.result, 4608);
    let mut x = vec![0u8; 512];
    let mut y = vec![0u8; 4096];
    let r = [iov(&mut x), iov(&mut y)];
    assert_eq!(run_one(&mut *e, &Op::Read { offset: 8192, iovecs: &r }, 8).result, 4608);
    assert!(x.iter().all(|&v| v == 0xAA));
    assert!(y[..3584].iter().all(|&v| v == 0xAA) && y[3584..].iter().all(|&v| v == 0xBB));

    // Durable write and flush.
    let mut d = vec![0x11u8; 512];
    let w = [iov(&mut d)];
    assert_eq!(run_one(&mut *e, &Op::Write { offset: 0, iovecs: &w, dsync: true }, 9).result, 512);
    assert_eq!(run_one(&mut *e, &Op::Flush, 10).result, 0);
    let mut check = [0u8; 512];
    file.read_exact_at(&mut check, 0).unwrap();
    assert!(check.iter().all(|&v| v == 0x11));

    // Discard and both write-zeroes modes read back as zeroes.
    assert_eq!(run_one(&mut *e, &Op::Discard { offset: 8192, len: 4096 }, 11).result, 0);
    assert_eq!(run_one(&mut *e, &Op::WriteZeroes { offset: 12288, len: 512, unmap: false }, 12).result, 0);
    assert_eq!(run_one(&mut *e, &Op::WriteZeroes { offset: 0, len: 512, unmap: true }, 13).result, 0);
    let mut all = vec![0u8; 16384];
    file.read_exact_at(&mut all, 0).unwrap();
    assert!(all.iter().all(|&v| v == 0), "zeroed ranges are not zero");

    // Reading past the end of the file is a short read the engine must report, not hide.
    let mut tail = vec![0u8; 8192];
    let r = [iov(&mut tail)];
    let c = run_one(&mut *e, &Op::Read { offset: (1 << 20) - 4096, iovecs: &r }, 14);
    assert!(c.result < 0, "short read past EOF reported as {}", c.result);
}

#[test]
fn sync_engine() {
    engine_suite(&|f| Box::new(SyncEngine::new(f)));
}

#[test]
fn uring_engine() {
    engine_suite(&|f| Box::new(UringEngine::new(f, 64).unwrap()));
}
