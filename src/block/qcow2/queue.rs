//! A worker's queue on a qcow2 image: maps each request through imago and issues the mapped
//! parts on the worker's own io_uring, zero-filling unallocated parts and handing the rest to
//! the metadata thread (see the module documentation of `block::qcow2`).

use std::fs::File;
use std::sync::Arc;
use std::sync::mpsc::Sender;

use imago::Mapping;

use super::Image;
use super::metadata::{Job, JobLane, JobOp, Zeroing};
use crate::block::raw::EngineKind;
use crate::block::{BlockError, BlockQueue};
use crate::io::slab::Slab;
use crate::io::sync::SyncEngine;
use crate::io::uring::UringEngine;
use crate::io::{
    Buffers, Completion, IoEngine, IoEngineError, IoRequest, OpKind, Rejected, WorkerCompletions, result_from_len,
};

/// The engines the mapped parts run on: one ring addressing every file of the chain, or one
/// synchronous engine per file.
enum DataEngine {
    Uring(Box<UringEngine>),
    Sync(Vec<SyncEngine>),
}

/// A guest request split into parts.
struct Request {
    /// The submitter's token and operation, restored on the request before it goes back.
    token: u64,
    kind: OpKind,
    /// The submitter's request while this queue holds it (its buffers are what the parts
    /// point into); None while the data engine holds it whole (the one-part case).
    original: Option<IoRequest>,
    /// Parts still in flight.
    parts: u32,
    /// The first error, or 0.
    error: i32,
    len: u64,
    /// Holds a mapping ([`Image::enter`]) until it completes.
    mapped: bool,
}

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
    /// This queue's lane in the worker's completions, for the metadata threads' results.
    done: Arc<JobLane>,
    requests: Slab<Request>,
    parts: Vec<Part>,
    reaped: Vec<Completion>,
    posted: Vec<(usize, i32)>,
    /// Requests whose last part finished, handed out at the next reap.
    finished: Vec<usize>,
}

impl Qcow2Queue {
    pub(super) fn new(
        completions: &Arc<WorkerCompletions>,
        image: Arc<Image>,
        files: Vec<Arc<File>>,
        jobs: Vec<Sender<Job>>,
        engine: EngineKind,
        depth: u32,
    ) -> Result<Self, BlockError> {
        let sync = |files: &[Arc<File>]| DataEngine::Sync(files.iter().map(|f| SyncEngine::new(f.clone())).collect());
        let engine = match engine {
            // A request may split into several mapped parts: room for more operations than
            // requests, so the completion queue does not overflow.
            EngineKind::Uring => match UringEngine::with_files(files.clone(), depth.saturating_mul(4), completions) {
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
            done: completions.lane(),
            requests: Slab::default(),
            parts: Vec::new(),
            reaped: Vec::new(),
            posted: Vec::new(),
            finished: Vec::new(),
        })
    }

    fn alloc(&mut self, request: IoRequest, len: u64) -> usize {
        self.requests.insert(Request {
            token: request.token,
            kind: request.kind,
            original: Some(request),
            parts: 0,
            error: 0,
            len,
            mapped: false,
        })
    }

    fn record(&mut self, idx: usize) -> Option<&mut Request> {
        self.requests.get_mut(idx)
    }

    /// A slice of the submitter's buffers, for a part.
    fn part_bufs(&self, idx: usize, at: u64, len: u64) -> Buffers {
        match self.requests.get(idx).and_then(|r| r.original.as_ref()) {
            Some(o) => o.bufs.slice(at, len),
            None => Buffers::none(),
        }
    }

    /// Sends a whole operation, or part of one, to the metadata thread.
    fn send_to_metadata(&mut self, idx: usize, op: JobOp) {
        let job = Job { op, index: idx, done: Some(self.done.clone()) };
        if let Some(r) = self.record(idx) {
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
        let Some(r) = self.record(idx) else {
            return;
        };
        if result < 0 && r.error == 0 {
            r.error = result;
        }
        r.parts = r.parts.saturating_sub(1);
        if r.parts == 0 {
            self.finished.push(idx);
        }
    }

    /// Looks up where the bytes of `[offset, offset + len)` live, into `self.parts`.
    fn map(&mut self, offset: u64, len: u64, write: bool) -> std::io::Result<()> {
        self.parts.clear();
        let parts = &mut self.parts;
        self.image.with(|access| map_parts(access, offset, len, write, parts))
    }

    /// Pushes one mapped part (tagged with the request index) on the data engine.
    fn push_mapped(&mut self, idx: usize, file: u32, part: IoRequest) -> Result<(), Box<Rejected>> {
        if let Some(r) = self.record(idx) {
            r.parts += 1;
        }
        let pushed = match &mut self.engine {
            DataEngine::Uring(e) => e.push_to(file, part),
            DataEngine::Sync(engines) => match engines.get_mut(file as usize) {
                Some(e) => IoEngine::push(e, part),
                None => {
                    // The one-part case hands over the submitter's request itself: keep it.
                    if let Some(r) = self.requests.get_mut(idx)
                        && r.original.is_none()
                    {
                        r.original = Some(part);
                    }
                    self.posted.push((idx, -libc::EBADF));
                    Ok(())
                }
            },
        };
        if pushed.is_err()
            && let Some(r) = self.record(idx)
        {
            r.parts -= 1;
        }
        pushed
    }

    /// Releases the request `idx` and returns its completion.
    fn finish(&mut self, idx: usize) -> Option<Completion> {
        let r = self.requests.remove(idx)?;
        if r.mapped {
            self.image.leave();
        }
        let result = if r.error < 0 { r.error } else { result_from_len(r.len) };
        let mut request = r.original?;
        request.token = r.token;
        request.kind = r.kind;
        Some(Completion { request, result })
    }

    /// Undoes a request that could not be queued at all and gives it back.
    fn abandon(&mut self, idx: usize, error: IoEngineError) -> Box<Rejected> {
        let r = self.requests.remove(idx);
        let request = match r {
            Some(r) => {
                if r.mapped {
                    self.image.leave();
                }
                let mut request = r.original.unwrap_or_else(|| IoRequest::new(0, r.kind, Buffers::none()));
                request.token = r.token;
                request.kind = r.kind;
                request
            }
            None => IoRequest::new(0, OpKind::Flush, Buffers::none()),
        };
        Box::new(Rejected { error, request })
    }

    fn push_rw(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
        let (offset, write, dsync) = match request.kind {
            OpKind::Read { offset } => (offset, false, false),
            OpKind::Write { offset, dsync } => (offset, true, dsync),
            _ => return Ok(()),
        };
        let len = request.bufs.len();
        let idx = self.alloc(request, len);
        // Durable writes go through imago so the metadata that maps them is durable too.
        if dsync || !self.image.enter() {
            let bufs = self.part_bufs(idx, 0, len);
            let op = if write { JobOp::Write { offset, bufs, dsync } } else { JobOp::Read { offset, bufs } };
            self.send_to_metadata(idx, op);
            return Ok(());
        }
        if let Some(r) = self.record(idx) {
            r.mapped = true;
        }
        if let Err(e) = self.map(offset, len, write) {
            self.image.log_error(if write { "mapping for a write" } else { "mapping for a read" }, offset, &e);
            if let Some(r) = self.record(idx) {
                r.error = -e.raw_os_error().unwrap_or(libc::EIO);
            }
            self.finished.push(idx);
            return Ok(());
        }
        // A write with any part that needs metadata goes to imago whole: it allocates (and
        // copies from the backing chain) in one step, and commits the mapping only after the
        // data is written.
        if write && self.parts.iter().any(|p| matches!(p, Part::Metadata { .. })) {
            self.image.leave();
            if let Some(r) = self.record(idx) {
                r.mapped = false;
            }
            let bufs = self.part_bufs(idx, 0, len);
            self.send_to_metadata(idx, JobOp::Write { offset, bufs, dsync });
            return Ok(());
        }
        // The common case: one mapped part covering the request; the request itself goes to
        // the engine (at the host offset, tagged with its index) and comes back whole.
        if let [Part::Mapped { file, host, .. }] = self.parts[..] {
            let Some(mut whole) = self.record(idx).and_then(|r| r.original.take()) else {
                return Err(self.abandon(idx, IoEngineError::QueueFull));
            };
            whole.token = idx as u64;
            whole.kind = if write { OpKind::Write { offset: host, dsync } } else { OpKind::Read { offset: host } };
            if let Err(rejected) = self.push_mapped(idx, file, whole) {
                if let Some(r) = self.record(idx) {
                    r.original = Some(rejected.request);
                }
                return Err(self.abandon(idx, rejected.error));
            }
            return Ok(());
        }
        let parts = std::mem::take(&mut self.parts);
        let mut failure = None;
        for part in &parts {
            match *part {
                Part::Zero { at, len } => {
                    if let Some(o) = self.record(idx).and_then(|r| r.original.as_mut()) {
                        o.bufs.zero(at, len);
                    }
                }
                Part::Metadata { at, len } => {
                    let bufs = self.part_bufs(idx, at, len);
                    self.send_to_metadata(idx, JobOp::Read { offset: offset + at, bufs });
                }
                Part::Mapped { file, host, at, len } => {
                    let kind =
                        if write { OpKind::Write { offset: host, dsync } } else { OpKind::Read { offset: host } };
                    let piece = IoRequest::new(idx as u64, kind, self.part_bufs(idx, at, len));
                    if let Err(rejected) = self.push_mapped(idx, file, piece) {
                        // Parts already queued complete later; this one fails the request.
                        if let Some(r) = self.record(idx) {
                            r.error = -libc::EAGAIN;
                        }
                        failure = Some(rejected.error);
                        break;
                    }
                }
            }
        }
        self.parts = parts;
        let outstanding = self.requests.get(idx).map_or(0, |r| r.parts);
        match failure {
            Some(error) if outstanding == 0 => Err(self.abandon(idx, error)),
            // Queued parts will finish the request (with the error recorded).
            Some(_) => Ok(()),
            None => {
                if outstanding == 0 {
                    self.finished.push(idx);
                }
                Ok(())
            }
        }
    }
}

impl BlockQueue for Qcow2Queue {
    fn push(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
        let job = match request.kind {
            OpKind::Read { .. } | OpKind::Write { .. } => return self.push_rw(request),
            OpKind::Flush => JobOp::Flush,
            OpKind::Discard { offset, len } => JobOp::Zero { offset, len, how: Zeroing::Discard },
            OpKind::WriteZeroes { offset, len, unmap } => {
                JobOp::Zero { offset, len, how: if unmap { Zeroing::Unmap } else { Zeroing::Allocated } }
            }
        };
        let idx = self.alloc(request, 0);
        self.send_to_metadata(idx, job);
        Ok(())
    }

    fn submit(&mut self) -> Result<(), IoEngineError> {
        // Requests finished inside `push` (zero fill, errors, the sync engine) are handed out
        // by the reap that follows every submit: no wake-up needed.
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
            let idx = c.request.token as usize;
            // The one-part case: the engine held the request itself; it comes home here.
            if let Some(r) = self.record(idx)
                && r.original.is_none()
            {
                r.original = Some(c.request);
            }
            self.part_done(idx, c.result);
        }
        self.reaped = reaped;
        let mut posted = std::mem::take(&mut self.posted);
        self.done.drain_into(&mut posted);
        for (idx, result) in posted.drain(..) {
            self.part_done(idx, result);
        }
        self.posted = posted;
        let finished = std::mem::take(&mut self.finished);
        for &idx in &finished {
            if let Some(c) = self.finish(idx) {
                out.push(c);
            }
        }
        self.finished = finished;
        self.finished.clear();
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
