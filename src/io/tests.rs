//! One suite, run on every engine that stores data (sync and io_uring), against real files.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::aligned::AlignedBuf;
use super::sync::SyncEngine;
use super::uring::UringEngine;
use super::{Buffers, Completion, IoEngine, IoRequest, OpKind, WorkerCompletions};

/// Runs one request to completion, waiting on the worker's eventfd as a worker would.
fn run_one(e: &mut dyn IoEngine, done: &WorkerCompletions, request: IoRequest) -> Completion {
    let token = request.token;
    e.push(request).unwrap();
    e.submit().unwrap();
    let mut out = Vec::new();
    e.reap(&mut out);
    while out.is_empty() {
        let mut pfd = libc::pollfd { fd: done.fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(ready, 1, "no completion signalled");
        done.clear();
        e.reap(&mut out);
    }
    assert_eq!(out.len(), 1);
    let c = out.pop().unwrap();
    assert_eq!(c.token(), token);
    c
}

/// Buffers of the given lengths, filled with `fill`.
fn bufs(lens: &[usize], fill: u8) -> Vec<Buffers> {
    lens.iter()
        .map(|&n| {
            let mut b = AlignedBuf::zeroed(n);
            b.fill(fill);
            Buffers::from_aligned(b)
        })
        .collect()
}

/// One request whose data is the concatenation of `parts` (a scatter/gather list).
fn joined(parts: &[Buffers]) -> Buffers {
    let iovecs: Vec<libc::iovec> = parts.iter().flat_map(|p| p.iovecs().to_vec()).collect();
    // SAFETY: every part is kept alive by the caller (the `parts` vector) until the request
    // has completed and been dropped.
    unsafe { Buffers::from_raw(iovecs, None) }
}

fn bytes(b: &Buffers) -> Vec<u8> {
    let mut v = vec![0u8; b.len() as usize];
    b.copy_to(&mut v);
    v
}

/// Makes the engine under test on a file, signalling a worker's completions.
type MakeEngine = dyn Fn(Arc<std::fs::File>, &Arc<WorkerCompletions>) -> Box<dyn IoEngine>;

fn engine_suite(make: &MakeEngine) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.img");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    file.set_len(1 << 20).unwrap();
    let file = Arc::new(file);
    let done = WorkerCompletions::new().unwrap();
    let mut e = make(file.clone(), &done);
    let run = |e: &mut dyn IoEngine, token, kind, b| run_one(e, &done, IoRequest::new(token, kind, b));

    // Gather write of two buffers, then a scatter read at a different split.
    let w = bufs(&[4096, 512], 0);
    let mut wa = w[0].slice(0, 4096);
    wa.copy_from(&[0xAA; 4096]);
    let mut wb = w[1].slice(0, 512);
    wb.copy_from(&[0xBB; 512]);
    let c = run(&mut *e, 7, OpKind::Write { offset: 8192, dsync: false }, joined(&w));
    assert_eq!(c.result, 4608);
    let r = bufs(&[512, 4096], 0);
    assert_eq!(run(&mut *e, 8, OpKind::Read { offset: 8192 }, joined(&r)).result, 4608);
    let (x, y) = (bytes(&r[0]), bytes(&r[1]));
    assert!(x.iter().all(|&v| v == 0xAA));
    assert!(y[..3584].iter().all(|&v| v == 0xAA) && y[3584..].iter().all(|&v| v == 0xBB));

    // Durable write and flush.
    let d = bufs(&[512], 0x11).pop().unwrap();
    assert_eq!(run(&mut *e, 9, OpKind::Write { offset: 0, dsync: true }, d).result, 512);
    assert_eq!(run(&mut *e, 10, OpKind::Flush, Buffers::none()).result, 0);
    let mut check = [0u8; 512];
    file.read_exact_at(&mut check, 0).unwrap();
    assert!(check.iter().all(|&v| v == 0x11));

    // Discard and both write-zeroes modes read back as zeroes.
    assert_eq!(run(&mut *e, 11, OpKind::Discard { offset: 8192, len: 4096 }, Buffers::none()).result, 0);
    let wz = OpKind::WriteZeroes { offset: 12288, len: 512, unmap: false };
    assert_eq!(run(&mut *e, 12, wz, Buffers::none()).result, 0);
    let wz = OpKind::WriteZeroes { offset: 0, len: 512, unmap: true };
    assert_eq!(run(&mut *e, 13, wz, Buffers::none()).result, 0);
    let mut all = vec![0u8; 16384];
    file.read_exact_at(&mut all, 0).unwrap();
    assert!(all.iter().all(|&v| v == 0), "zeroed ranges are not zero");

    // Reading past the end of the file is a short read the engine must report, not hide.
    let tail = bufs(&[8192], 0).pop().unwrap();
    let c = run(&mut *e, 14, OpKind::Read { offset: (1 << 20) - 4096 }, tail);
    assert!(c.result < 0, "short read past EOF reported as {}", c.result);
    assert_eq!(c.request.bufs.len(), 8192, "the request came back with its buffers");
}

#[test]
fn sync_engine() {
    engine_suite(&|f, _| Box::new(SyncEngine::new(f)));
}

#[test]
fn uring_engine() {
    engine_suite(&|f, done| Box::new(UringEngine::new(f, 64, done).unwrap()));
}
