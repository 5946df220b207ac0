//! A worker's queue on a qcow2 image: maps each request through imago and issues the mapped
//! parts on the worker's own io_uring, zero-filling unallocated parts and handing the rest to
//! the metadata thread (see the module documentation of `block::qcow2`).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use imago::Mapping;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::Image;
use super::metadata::{DoneList, Job, JobOp, Zeroing};
use crate::block::raw::EngineKind;
use crate::block::{BlockError, BlockQueue};
use crate::io::sync::SyncEngine;
use crate::io::uring::UringEngine;
use crate::io::{Completion, IoEngine, IoEngineError, Op, iovecs_len, result_from_len, slice_iovecs};

/// The engines the mapped parts run on: one ring addressing every file of the chain, or one
/// synchronous engine per file.
enum DataEngine {
    Uring(Box<UringEngine>),
    Sync(Vec<SyncEngine>),
}

/// A guest request split into parts.
#[derive(Default)]
struct Request {
    token: u64,
    /// Parts still in flight.
    parts: u32,
    /// The first error, or 0.
    error: i32,
    len: u64,
    /// Holds a mapping ([`Image::enter`]) until it completes.
    mapped: bool,
    /// The sliced iovec arrays of parts in flight (their heap buffers stay put until the
    /// request completes, however the request table grows).
    iovs: Vec<Vec<libc::iovec>>,
}

// SAFETY: the iovec pointers refer to guest buffers the `BlockQueue::push` contract keeps
// alive until the request's completion is reaped; only the owning thread uses them.
unsafe impl Send for Request {}

/// One part of a request, decided while the mapping is looked up.
enum Part {
    /// Bytes `[at, at + len)` of the request live at `host` in chain file `file`.
    Mapped { file: u32, host: u64, at: u64, len: u64 },
    /// Bytes `[at, at + len)` read as zeroes.
    Zero { at: u64, len: u64 },
    /// Bytes `[at, at + len)` need imago (compressed cluster, allocation, copy-on-write).
    Metadata { at: u64, len: u64 },
}

/// A per-worker queue on a [`super::Qcow2Disk`].
pub struct Qcow2Queue {
    image: Arc<Image>,
    engine: DataEngine,
    /// The metadata threads' channels; jobs are dealt out in turn.
    jobs: Vec<Sender<Job>>,
    next_job: usize,
    /// Completions of the metadata thread for this queue; its eventfd is also the ring's.
    done: Arc<DoneList>,
    requests: Vec<Option<Request>>,
    free: Vec<usize>,
    parts: Vec<Part>,
    reaped: Vec<Completion>,
    posted: Vec<(usize, i32)>,
    /// Requests finished inside `push` (zero fill, errors): the eventfd is signalled at submit.
    finished_inline: Vec<usize>,
}

/// A completion list not attached to any queue (for jobs whose result travels otherwise).
pub(super) fn detached_done() -> std::io::Result<(Arc<DoneList>, ())> {
    Ok((Arc::new(DoneList { list: Mutex::new(Vec::new()), eventfd: EventFd::new(EFD_NONBLOCK)? }), ()))
}

impl Qcow2Queue {
    pub(super) fn new(
        image: Arc<Image>,
        files: Vec<Arc<File>>,
        jobs: Vec<Sender<Job>>,
        engine: EngineKind,
        depth: u32,
    ) -> Result<Self, BlockError> {
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(|e| BlockError::Engine(IoEngineError::Setup(e)))?;
        let ring_fd = eventfd.try_clone().map_err(|e| BlockError::Engine(IoEngineError::Setup(e)))?;
        let done = Arc::new(DoneList { list: Mutex::new(Vec::new()), eventfd });
        let sync = |files: &[Arc<File>]| DataEngine::Sync(files.iter().map(|f| SyncEngine::new(f.clone())).collect());
        let engine = match engine {
            // A request may split into several mapped parts: room for more operations than
            // requests, so the completion queue does not overflow.
            EngineKind::Uring => match UringEngine::with_files(files.clone(), depth.saturating_mul(4), ring_fd) {
                Ok(e) => DataEngine::Uring(Box::new(e)),
                Err(e) => {
                    log::warn!("io_uring unavailable ({e}), using the sync engine");
                    sync(&files)
                }
            },
            EngineKind::Sync => sync(&files),
        };
        Ok(Qcow2Queue {
            image,
            engine,
            jobs,
            next_job: 0,
            done,
            requests: Vec::new(),
            free: Vec::new(),
            parts: Vec::new(),
            reaped: Vec::new(),
            posted: Vec::new(),
            finished_inline: Vec::new(),
        })
    }

    fn alloc(&mut self, token: u64, len: u64) -> usize {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.requests.push(None);
                self.requests.len() - 1
            }
        };
        self.requests[idx] = Some(Request { token, len, ..Request::default() });
        idx
    }

    /// Sends a whole operation, or part of one, to the metadata thread.
    fn send_to_metadata(&mut self, idx: usize, op: JobOp) {
        let job = Job { op, index: idx, done: self.done.clone() };
        if let Some(Some(r)) = self.requests.get_mut(idx) {
            r.parts += 1;
        }
        self.next_job = self.next_job.wrapping_add(1);
        let sent = match self.jobs.get(self.next_job % self.jobs.len().max(1)) {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        };
        if !sent {
            self.part_done(idx, -libc::EIO);
        }
    }

    /// Records one finished part; completes the request when it was the last.
    fn part_done(&mut self, idx: usize, result: i32) {
        let Some(Some(r)) = self.requests.get_mut(idx) else {
            return;
        };
        if result < 0 && r.error == 0 {
            r.error = result;
        }
        r.parts = r.parts.saturating_sub(1);
        if r.parts == 0 {
            self.finished_inline.push(idx);
        }
    }

    /// Looks up where the bytes of `[offset, offset + len)` live, into `self.parts`.
    fn map(&mut self, offset: u64, len: u64, write: bool) -> std::io::Result<()> {
        self.parts.clear();
        let parts = &mut self.parts;
        self.image.with(|access| map_parts(access, offset, len, write, parts))
    }

    /// Pushes one mapped part on the data engine.
    ///
    /// # Safety
    /// `iovecs` (array and buffers) must stay valid until the completion for `idx` is reaped.
    unsafe fn push_mapped(&mut self, idx: usize, file: u32, op: &Op<'_>) -> Result<(), IoEngineError> {
        if let Some(Some(r)) = self.requests.get_mut(idx) {
            r.parts += 1;
        }
        // SAFETY: forwarded contract.
        let pushed = unsafe {
            match &mut self.engine {
                DataEngine::Uring(e) => e.push_to(file, op, idx as u64),
                DataEngine::Sync(engines) => match engines.get_mut(file as usize) {
                    Some(e) => IoEngine::push(e, op, idx as u64),
                    None => {
                        self.posted.push((idx, -libc::EBADF));
                        Ok(())
                    }
                },
            }
        };
        if let Err(e) = pushed {
            if let Some(Some(r)) = self.requests.get_mut(idx) {
                r.parts -= 1;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Releases the request `idx` and returns its completion.
    fn finish(&mut self, idx: usize) -> Option<Completion> {
        let r = self.requests.get_mut(idx)?.take()?;
        self.free.push(idx);
        if r.mapped {
            self.image.leave();
        }
        let result = if r.error < 0 { r.error } else { result_from_len(r.len) };
        Some(Completion { token: r.token, result })
    }

    /// Undoes a request that could not be queued at all.
    fn abandon(&mut self, idx: usize) {
        if let Some(r) = self.requests.get_mut(idx).and_then(Option::take) {
            self.free.push(idx);
            if r.mapped {
                self.image.leave();
            }
        }
    }

    unsafe fn push_rw(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        write: bool,
        dsync: bool,
        token: u64,
    ) -> Result<(), IoEngineError> {
        let len = iovecs_len(iovecs);
        let idx = self.alloc(token, len);
        let copy = || iovecs.to_vec();
        // Durable writes go through imago so the metadata that maps them is durable too.
        if dsync || !self.image.enter() {
            let op = if write {
                JobOp::Write { offset, iovecs: copy(), dsync }
            } else {
                JobOp::Read { offset, iovecs: copy() }
            };
            self.send_to_metadata(idx, op);
            return Ok(());
        }
        if let Some(Some(r)) = self.requests.get_mut(idx) {
            r.mapped = true;
        }
        if let Err(e) = self.map(offset, len, write) {
            self.image.log_error(if write { "mapping for a write" } else { "mapping for a read" }, offset, &e);
            if let Some(Some(r)) = self.requests.get_mut(idx) {
                r.error = -e.raw_os_error().unwrap_or(libc::EIO);
            }
            self.finished_inline.push(idx);
            return Ok(());
        }
        // A write with any part that needs metadata goes to imago whole: it allocates (and
        // copies from the backing chain) in one step, and commits the mapping only after the
        // data is written.
        if write && self.parts.iter().any(|p| matches!(p, Part::Metadata { .. })) {
            self.image.leave();
            if let Some(Some(r)) = self.requests.get_mut(idx) {
                r.mapped = false;
            }
            self.send_to_metadata(idx, JobOp::Write { offset, iovecs: copy(), dsync });
            return Ok(());
        }
        // The common case: one mapped part covering the request, issued on the caller's own
        // iovec array.
        if let [Part::Mapped { file, host, .. }] = self.parts[..] {
            let op = if write { Op::Write { offset: host, iovecs, dsync } } else { Op::Read { offset: host, iovecs } };
            // SAFETY: forwarded contract.
            if let Err(e) = unsafe { self.push_mapped(idx, file, &op) } {
                self.abandon(idx);
                return Err(e);
            }
            return Ok(());
        }
        let parts = std::mem::take(&mut self.parts);
        let mut result = Ok(());
        for part in &parts {
            match *part {
                Part::Zero { at, len } => {
                    let mut slice = Vec::new();
                    slice_iovecs(iovecs, at, len, &mut slice);
                    for v in slice {
                        // SAFETY: a live, writable guest buffer (push contract).
                        unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
                    }
                }
                Part::Metadata { at, len } => {
                    let mut slice = Vec::new();
                    slice_iovecs(iovecs, at, len, &mut slice);
                    self.send_to_metadata(idx, JobOp::Read { offset: offset + at, iovecs: slice });
                }
                Part::Mapped { file, host, at, len } => {
                    let mut slice = Vec::new();
                    slice_iovecs(iovecs, at, len, &mut slice);
                    let (ptr, cnt) = (slice.as_ptr(), slice.len());
                    if let Some(Some(r)) = self.requests.get_mut(idx) {
                        r.iovs.push(slice);
                    }
                    // SAFETY: the array lives in the request (its heap buffer does not move)
                    // until the request completes.
                    let view = unsafe { std::slice::from_raw_parts(ptr, cnt) };
                    let op = if write {
                        Op::Write { offset: host, iovecs: view, dsync }
                    } else {
                        Op::Read { offset: host, iovecs: view }
                    };
                    // SAFETY: `view` stays valid as argued above; the buffers by contract.
                    if let Err(e) = unsafe { self.push_mapped(idx, file, &op) } {
                        // Parts already queued complete later; this one fails the request.
                        if let Some(Some(r)) = self.requests.get_mut(idx) {
                            r.error = -libc::EAGAIN;
                        }
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        self.parts = parts;
        let outstanding = self.requests.get(idx).and_then(Option::as_ref).map_or(0, |r| r.parts);
        match result {
            Err(e) if outstanding == 0 => {
                self.abandon(idx);
                Err(e)
            }
            // Queued parts will finish the request (with the error recorded).
            Err(_) => Ok(()),
            Ok(()) => {
                if outstanding == 0 {
                    self.finished_inline.push(idx);
                }
                Ok(())
            }
        }
    }
}

impl BlockQueue for Qcow2Queue {
    unsafe fn push(&mut self, op: &Op<'_>, token: u64) -> Result<(), IoEngineError> {
        match *op {
            // SAFETY: forwarded contract.
            Op::Read { offset, iovecs } => unsafe { self.push_rw(offset, iovecs, false, false, token) },
            // SAFETY: forwarded contract.
            Op::Write { offset, iovecs, dsync } => unsafe { self.push_rw(offset, iovecs, true, dsync, token) },
            Op::Flush => {
                let idx = self.alloc(token, 0);
                self.send_to_metadata(idx, JobOp::Flush);
                Ok(())
            }
            Op::Discard { offset, len } => {
                let idx = self.alloc(token, 0);
                self.send_to_metadata(idx, JobOp::Zero { offset, len, how: Zeroing::Discard });
                Ok(())
            }
            Op::WriteZeroes { offset, len, unmap } => {
                let idx = self.alloc(token, 0);
                let how = if unmap { Zeroing::Unmap } else { Zeroing::Allocated };
                self.send_to_metadata(idx, JobOp::Zero { offset, len, how });
                Ok(())
            }
        }
    }

    fn submit(&mut self) -> Result<(), IoEngineError> {
        let sync_done = matches!(self.engine, DataEngine::Sync(_));
        if !self.finished_inline.is_empty() || !self.posted.is_empty() || sync_done {
            // Completions made inside `push` must wake the worker like any other.
            let _ = self.done.eventfd.write(1);
        }
        match &mut self.engine {
            DataEngine::Uring(e) => IoEngine::submit(e.as_mut()),
            DataEngine::Sync(_) => Ok(()),
        }
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut reaped = std::mem::take(&mut self.reaped);
        match &mut self.engine {
            DataEngine::Uring(e) => IoEngine::reap(e.as_mut(), &mut reaped),
            DataEngine::Sync(engines) => engines.iter_mut().for_each(|e| IoEngine::reap(e, &mut reaped)),
        }
        for c in reaped.drain(..) {
            self.part_done(c.token as usize, c.result);
        }
        self.reaped = reaped;
        let mut posted = std::mem::take(&mut self.posted);
        posted.append(&mut self.done.list.lock().unwrap_or_else(|p| p.into_inner()));
        for (idx, result) in posted.drain(..) {
            self.part_done(idx, result);
        }
        self.posted = posted;
        let finished = std::mem::take(&mut self.finished_inline);
        for &idx in &finished {
            if let Some(c) = self.finish(idx) {
                out.push(c);
            }
        }
        self.finished_inline = finished;
        self.finished_inline.clear();
    }

    fn notifier(&self) -> Option<RawFd> {
        Some(self.done.eventfd.as_raw_fd())
    }

    fn clear_notifier(&self) {
        let _ = self.done.eventfd.read();
    }
}

/// Splits `[offset, offset + len)` into parts by where imago maps them (see [`Part`]),
/// merging neighbours that can be one I/O.
fn map_parts(
    access: &imago::FormatAccess<super::ImageFile>,
    offset: u64,
    len: u64,
    write: bool,
    parts: &mut Vec<Part>,
) -> std::io::Result<()> {
    let mut at = 0;
    while at < len {
        let (mapping, n) = access.get_mapping(offset + at, len - at)?;
        let n = n.min(len - at);
        // Lengths come from the image's metadata: a mapping of no length inside the disk
        // would make this loop spin; only the end of file may be empty.
        if n == 0 && !matches!(mapping, Mapping::Eof { .. }) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "empty mapping inside the disk"));
        }
        let part = match mapping {
            Mapping::Raw { storage, offset: host, writable, .. } if writable || !write => {
                Part::Mapped { file: storage.index(), host, at, len: n }
            }
            Mapping::Zero { .. } | Mapping::Eof { .. } if !write => {
                Part::Zero { at, len: if n == 0 { len - at } else { n } }
            }
            _ => Part::Metadata { at, len: if n == 0 { len - at } else { n } },
        };
        let step = match &part {
            Part::Mapped { len, .. } | Part::Zero { len, .. } | Part::Metadata { len, .. } => *len,
        };
        // Merge with the previous part where possible (fewer, larger I/Os).
        match (parts.last_mut(), &part) {
            (Some(Part::Mapped { file: f0, host: h0, len: l0, .. }), Part::Mapped { file, host, .. })
                if f0 == file && *h0 + *l0 == *host =>
            {
                *l0 += step
            }
            (Some(Part::Zero { len: l0, .. }), Part::Zero { .. })
            | (Some(Part::Metadata { len: l0, .. }), Part::Metadata { .. }) => *l0 += step,
            _ => parts.push(part),
        }
        at += step;
    }
    Ok(())
}
