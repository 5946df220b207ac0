//! The secondary VM's view: the block device behind vhost-user, its requests run on the pool.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::overlay::Source;
use super::{SECTOR, Secondary};
use crate::block::{
    BlockDevice, BlockError, BlockQueue, Buffers, Completion, IoEngineError, IoRequest, Lane, Op, OpKind, Rejected,
    WorkerCompletions,
};
use crate::io::slab::Slab;
use crate::replication::Stage;

/// The block device the secondary VM's queues submit to.
pub struct SecondaryDevice(pub Arc<Secondary>);

impl BlockDevice for SecondaryDevice {
    fn size(&self) -> u64 {
        self.0.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn open_queue(&self, depth: u32, completions: &Arc<WorkerCompletions>) -> Result<Box<dyn BlockQueue>, BlockError> {
        let inner = self.0.disk.open_queue(depth, completions)?;
        // Read before the ring registers the buffers' current files: a checkpoint replacing
        // them in between then forces a re-registration at first use.
        let active_swaps = self.0.overlay.active_swaps();
        // One ring per worker for the direct paths: the active buffer (the VM's writes, reads
        // of sectors it wrote) and, when the disk is a raw file on io_uring, the disk too
        // (reads of sectors in neither buffer), signalling the worker's completions like
        // every other ring. Without io_uring those requests take the buffer path.
        let mut files = vec![self.0.overlay.active.file.clone(), self.0.overlay.hidden.file.clone()];
        let disk_file = self.0.disk.ring_file();
        if let Some(f) = &disk_file {
            files.push(f.clone());
        }
        let active_ring = crate::io::uring::UringEngine::with_files(files, depth.saturating_mul(2), completions).ok();
        let disk_in_ring = disk_file.is_some() && active_ring.is_some();
        Ok(Box::new(SecondaryQueue {
            sec: self.0.clone(),
            inner,
            buffered: completions.lane(),
            active_ring,
            active_swaps,
            buffers_in_ring: true,
            disk_in_ring,
            entries: Slab::default(),
            inline: Vec::new(),
            ready: Vec::new(),
            scratch: Vec::new(),
        }))
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush_all()
    }
    fn frontend_starting(&self, dirty_logging: bool) {
        // QEMU restarts the secondary's device with logging on right after loading a COLO
        // checkpoint; at failover it restarts it with logging off, and then nothing commits.
        self.0.colo_frontend_starting(dirty_logging);
    }
    fn frontend_stopped(&self) {
        self.0.colo_device_stopped();
    }
    fn describe(&self) -> String {
        format!(
            "{} (secondary; active {}, hidden {})",
            self.0.disk.describe(),
            self.0.overlay.files.active.display(),
            self.0.overlay.files.hidden.display()
        )
    }
}

/// A worker's queue: while replicating, a VM read none of whose sectors is in a buffer goes
/// to the disk's own (io_uring) queue, one all of whose sectors are in the active buffer to
/// a ring on the active file, and either is checked when it completes; every other request
/// runs synchronously through the buffer logic on the pool. Once the stage is done every
/// request goes to the disk's queue.
struct SecondaryQueue {
    sec: Arc<Secondary>,
    inner: Box<dyn BlockQueue>,
    /// Requests finished on the pool (the buffer path).
    buffered: Arc<Lane>,
    /// The worker's ring for the direct paths: the active buffer (file [`ACTIVE`]) and, if
    /// `disk_in_ring`, the disk (file [`DISK`]); None: buffer path only.
    active_ring: Option<crate::io::uring::UringEngine>,
    /// Whether the ring addresses the disk (else direct disk reads go to `inner`).
    disk_in_ring: bool,
    /// Whether the ring's buffer entries may be used (false once re-registering them after a
    /// checkpoint failed: buffer requests then take the pool, the disk stays on the ring).
    buffers_in_ring: bool,
    /// [`Overlay::active_swaps`] when the ring last registered the active descriptor.
    active_swaps: u64,
    /// Requests pushed to the disk's queue or the active ring, by the token they carry there.
    entries: Slab<Entry>,
    /// Direct buffer requests done inline (`BufferFile::inline`), not reaped yet.
    inline: Vec<Completion>,
    /// Submitters' requests finished inside `push`, handed out at the next reap.
    ready: Vec<Completion>,
    scratch: Vec<Completion>,
}

/// The active buffer's index in the ring's file table.
const ACTIVE: u32 = 0;
/// The hidden buffer's index in the ring's file table.
const HIDDEN: u32 = 1;
/// The disk's index in the ring's file table (when it is there).
const DISK: u32 = 2;

/// Most pieces a VM read is split into on the ring; a more fragmented one takes the pool.
const MAX_PIECES: usize = 16;

/// Where a request pushed down goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The disk's own queue (`inner`).
    DiskQueue,
    /// The disk, on the ring (only when `disk_in_ring`).
    DiskRing,
    /// The active buffer, on the ring.
    Active,
    /// The hidden buffer, on the ring.
    Hidden,
}

/// What a token this queue pushed down stands for.
enum Entry {
    /// A request passed to the disk as it is (stage done).
    Passed { token: u64 },
    /// A VM write on the active buffer's ring (stage running); its sectors join the active
    /// map when it succeeds.
    ActiveWrite { token: u64, sectors: (u64, u64), _ticket: HeldTicket },
    /// A VM read sent straight to the disk's queue or the active buffer's ring, checked when
    /// it completes.
    Direct(DirectRead),
    /// A VM read whose sectors lie in several places, read piece by piece on the ring (each
    /// piece's completion carries this entry's token); checked when the last one completes.
    Split(SplitRead),
    /// A VM flush: the active buffer, the hidden buffer and the disk synced on the ring.
    Flush(FlushJoin),
}

/// A VM request's place in the quiesce gate while it is in flight on a ring: a checkpoint or
/// stage change waits for it (and cannot start while it is held, so the stage stays running).
struct HeldTicket(Arc<Secondary>);

impl HeldTicket {
    /// None while the gate is closed: the request then takes the buffer path, whose pool
    /// thread may wait for the gate (a worker must not).
    fn try_new(sec: &Arc<Secondary>) -> Option<Self> {
        sec.gate.try_hold().then(|| HeldTicket(sec.clone()))
    }
}

impl Drop for HeldTicket {
    fn drop(&mut self) {
        self.0.gate.leave();
    }
}

/// A submitter's request done as several parts on the ring, every part carrying the entry's
/// token (split reads, flushes).
struct Parts {
    /// The submitter's request (a split read's pieces point into its buffers).
    request: IoRequest,
    token: u64,
    /// Parts still in flight.
    left: usize,
    /// The request is redone on the buffer path once no part is in flight (a part could not
    /// be queued; for a split read also: a piece failed).
    redo: bool,
}

impl Parts {
    /// The submitter's request with its token back.
    fn into_request(self) -> IoRequest {
        let mut request = self.request;
        request.token = self.token;
        request
    }
}

struct SplitRead {
    parts: Parts,
    pieces: Vec<(u64, u64, Source)>,
    generation: u64,
}

struct FlushJoin {
    parts: Parts,
    /// The first error of a sync, or 0.
    error: i32,
}

impl Entry {
    /// The parts bookkeeping of a request done in several parts.
    fn parts_mut(&mut self) -> Option<&mut Parts> {
        match self {
            Entry::Split(split) => Some(&mut split.parts),
            Entry::Flush(join) => Some(&mut join.parts),
            Entry::Passed { .. } | Entry::ActiveWrite { .. } | Entry::Direct(_) => None,
        }
    }

    fn into_parts(self) -> Option<Parts> {
        match self {
            Entry::Split(split) => Some(split.parts),
            Entry::Flush(join) => Some(join.parts),
            Entry::Passed { .. } | Entry::ActiveWrite { .. } | Entry::Direct(_) => None,
        }
    }
}

struct DirectRead {
    token: u64,
    sectors: (u64, u64),
    generation: u64,
    /// Read from the active buffer (else from the disk).
    active: bool,
}

impl SecondaryQueue {
    /// Makes the active ring's file entry name the active buffer's current file (a
    /// checkpoint may have swapped it for a fresh one); false if that failed.
    fn active_ring_current(&mut self) -> bool {
        let swaps = self.sec.overlay.active_swaps();
        let Some(ring) = &mut self.active_ring else { return false };
        if !self.buffers_in_ring {
            return false;
        }
        if swaps == self.active_swaps {
            return true;
        }
        match ring
            .replace_file(ACTIVE, self.sec.overlay.active.file.clone())
            .and_then(|()| ring.replace_file(HIDDEN, self.sec.overlay.hidden.file.clone()))
        {
            Ok(()) => {
                self.active_swaps = swaps;
                true
            }
            Err(e) => {
                // The ring keeps serving what is in flight and the disk; the buffers' requests
                // take the pool from now on.
                log::warn!("cannot register the fresh buffers with a worker's ring: {e}");
                self.buffers_in_ring = false;
                false
            }
        }
    }

    /// Runs `request` on the pool (the buffer path); its completion comes through `buffered`.
    fn spawn(&self, request: IoRequest) -> Result<(), Box<Rejected>> {
        let sec = self.sec.clone();
        let task = Box::new(move |r: &mut IoRequest| sec.vm_execute(r));
        self.sec
            .pool
            .spawn(task, request, &self.buffered)
            .map_err(|request| Box::new(Rejected { error: IoEngineError::QueueFull, request }))
    }

    /// Sends `request` (carrying this queue's token) to `target`.
    fn send(&mut self, request: IoRequest, target: Target) -> Result<(), Box<Rejected>> {
        let inline = match target {
            Target::Active => self.sec.overlay.active.inline.then(|| self.sec.overlay.active.file.as_raw_fd()),
            Target::Hidden => self.sec.overlay.hidden.inline.then(|| self.sec.overlay.hidden.file.as_raw_fd()),
            Target::DiskQueue | Target::DiskRing => None,
        };
        if let Some(fd) = inline {
            // A memory copy on this file system (see `BufferFile::inline`); handed out by
            // the reap that follows every submit, through the same checks.
            let result = match request.kind {
                OpKind::Read { offset } => request.bufs.transfer(fd, offset, false, false),
                OpKind::Write { offset, dsync } => request.bufs.transfer(fd, offset, true, dsync),
                // SAFETY: plain system call on a descriptor the secondary keeps open.
                OpKind::Flush => match unsafe { libc::fdatasync(fd) } {
                    0 => 0,
                    _ => -std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO),
                },
                _ => -libc::EINVAL,
            };
            self.inline.push(Completion { request, result });
            return Ok(());
        }
        match (&mut self.active_ring, target) {
            (Some(ring), Target::Active) => ring.push_to(ACTIVE, request),
            (Some(ring), Target::Hidden) => ring.push_to(HIDDEN, request),
            (Some(ring), Target::DiskRing) => ring.push_to(DISK, request),
            _ => self.inner.push(request),
        }
    }

    /// Sends `request` to `target` under this queue's token `idx`; on refusal it comes back
    /// with the submitter's token.
    fn push_inner(&mut self, mut request: IoRequest, idx: usize, target: Target) -> Result<(), Box<Rejected>> {
        let token = request.token;
        request.token = idx as u64;
        self.send(request, target).map_err(|mut rejected| {
            self.entries.remove(idx);
            rejected.request.token = token;
            rejected
        })
    }

    /// Reads `request` piece by piece from where each of its runs of sectors lies (one entry,
    /// every piece carrying its token), on the ring.
    fn push_split(
        &mut self,
        request: IoRequest,
        offset: u64,
        generation: u64,
        pieces: Vec<(u64, u64, Source)>,
    ) -> Result<(), Box<Rejected>> {
        let parts: Vec<(IoRequest, Target)> = pieces
            .iter()
            .map(|&(a, b, source)| {
                let bufs = request.bufs.slice(a * SECTOR - offset, (b - a) * SECTOR);
                let target = match source {
                    Source::Active => Target::Active,
                    Source::Hidden => Target::Hidden,
                    Source::Disk if self.disk_in_ring => Target::DiskRing,
                    Source::Disk => Target::DiskQueue,
                };
                (IoRequest::new(0, OpKind::Read { offset: a * SECTOR }, bufs), target)
            })
            .collect();
        let parts_of = Parts { token: request.token, request, left: parts.len(), redo: false };
        let idx = self.entries.insert(Entry::Split(SplitRead { parts: parts_of, pieces, generation }));
        self.send_parts(idx, parts)
    }

    /// Syncs the active buffer, the hidden buffer and the disk on the ring, as the buffer
    /// path's flush does; answered when all three completed.
    fn push_flush(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
        let disk = if self.disk_in_ring { Target::DiskRing } else { Target::DiskQueue };
        let syncs: Vec<(IoRequest, Target)> = [Target::Active, Target::Hidden, disk]
            .map(|t| (IoRequest::new(0, OpKind::Flush, Buffers::none()), t))
            .into();
        let parts = Parts { token: request.token, request, left: syncs.len(), redo: false };
        let idx = self.entries.insert(Entry::Flush(FlushJoin { parts, error: 0 }));
        self.send_parts(idx, syncs)
    }

    /// Sends the parts of entry `idx` (each tagged with its token); a part that cannot be
    /// queued marks the request for a redo, which happens at once if no part was queued.
    fn send_parts(&mut self, idx: usize, parts: Vec<(IoRequest, Target)>) -> Result<(), Box<Rejected>> {
        for (mut part, target) in parts {
            part.token = idx as u64;
            if self.send(part, target).is_err()
                && let Some(p) = self.entries.get_mut(idx).and_then(Entry::parts_mut)
            {
                // Parts already queued complete later; the request is then redone.
                p.left -= 1;
                p.redo = true;
            }
        }
        if self.entries.get_mut(idx).and_then(Entry::parts_mut).is_some_and(|p| p.left == 0)
            && let Some(p) = self.entries.remove(idx).and_then(Entry::into_parts)
        {
            return self.spawn(p.into_request());
        }
        Ok(())
    }

    /// The last piece of a split read completed: answer it, or redo it on the buffer path.
    fn finish_split(&mut self, split: SplitRead, out: &mut Vec<Completion>) {
        let redo = split.parts.redo;
        let request = split.parts.into_request();
        if !redo && self.sec.split_read_valid(&split.pieces, split.generation) {
            let result = crate::io::result_from_len(request.bufs.len());
            out.push(Completion { request, result });
        } else if let Err(rejected) = self.spawn(request) {
            out.push(Completion { request: rejected.request, result: -libc::EIO });
        }
    }
}

impl BlockQueue for SecondaryQueue {
    fn push(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
        if self.sec.stage() == Stage::Done {
            let idx = self.entries.insert(Entry::Passed { token: request.token });
            return self.push_inner(request, idx, Target::DiskQueue);
        }
        if let OpKind::Write { offset, .. } = request.kind
            && self.active_ring.is_some()
            && let Some(ticket) = HeldTicket::try_new(&self.sec)
        {
            // Under the ticket the stage cannot leave running (every change away from it
            // closes the gate first), nor can a checkpoint swap the active file.
            if self.sec.stage() == Stage::Running && self.active_ring_current() {
                let sectors = Secondary::sectors(offset, request.bufs.len());
                let idx = self.entries.insert(Entry::ActiveWrite { token: request.token, sectors, _ticket: ticket });
                return match self.push_inner(request, idx, Target::Active) {
                    Ok(()) => Ok(()),
                    Err(rejected) => self.spawn(rejected.request),
                };
            }
        }
        if matches!(request.kind, OpKind::Discard { .. } | OpKind::WriteZeroes { .. })
            && let Some((offset, len)) = request.range()
            && let Some(ticket) = HeldTicket::try_new(&self.sec)
            && self.sec.stage() == Stage::Running
        {
            // Zeroes in the active buffer (a discard too: the disk must keep the checkpoint's
            // data), a metadata operation done here like the engines do; under the ticket, so
            // a checkpoint empties these sectors with the rest.
            let (s0, s1) = Secondary::sectors(offset, len);
            let result = self.sec.overlay.active.data.zero(&Op::WriteZeroes { offset, len, unmap: true });
            if result >= 0 {
                self.sec.overlay.active_map.set(s0, s1);
            }
            drop(ticket);
            self.ready.push(Completion { request, result });
            return Ok(());
        }
        if request.kind == OpKind::Flush
            && self.active_ring.is_some()
            && self.sec.stage() == Stage::Running
            && self.active_ring_current()
        {
            return self.push_flush(request);
        }
        if let Some((offset, len)) = request.range().filter(|_| matches!(request.kind, OpKind::Read { .. })) {
            let (s0, s1) = Secondary::sectors(offset, len);
            let route = match self.sec.direct_read_start(s0, s1) {
                Some(g) => Some((g, false)),
                None if self.active_ring.is_some() => self.sec.direct_active_read_start(s0, s1).map(|g| (g, true)),
                None => None,
            };
            if let Some((generation, active)) = route
                && (!active || self.active_ring_current())
            {
                let read = DirectRead { token: request.token, sectors: (s0, s1), generation, active };
                let idx = self.entries.insert(Entry::Direct(read));
                let target = match (active, self.disk_in_ring) {
                    (true, _) => Target::Active,
                    (false, true) => Target::DiskRing,
                    (false, false) => Target::DiskQueue,
                };
                // A full ring hands the read back: the buffer path takes it.
                return match self.push_inner(request, idx, target) {
                    Ok(()) => Ok(()),
                    Err(rejected) => self.spawn(rejected.request),
                };
            }
            if self.active_ring.is_some()
                && self.active_ring_current()
                && let Some((generation, pieces)) = self.sec.split_read_start(s0, s1)
                && pieces.len() <= MAX_PIECES
            {
                return self.push_split(request, offset, generation, pieces);
            }
        }
        self.spawn(request)
    }
    fn submit(&mut self) -> Result<(), IoEngineError> {
        if let Some(ring) = &mut self.active_ring {
            crate::io::IoEngine::submit(ring)?;
        }
        self.inner.submit()
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.buffered.drain_into(out);
        out.append(&mut self.ready);
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.append(&mut self.inline);
        if let Some(ring) = &mut self.active_ring {
            crate::io::IoEngine::reap(ring, &mut scratch);
        }
        self.inner.reap(&mut scratch);
        for mut c in scratch.drain(..) {
            let idx = c.request.token as usize;
            if let Some(entry) = self.entries.get_mut(idx)
                && let Some(p) = entry.parts_mut()
            {
                // One part of a split read or a flush (a piece's buffers are a slice of the
                // held request; a sync has none).
                p.left -= 1;
                let last = p.left == 0;
                match entry {
                    Entry::Split(split) => split.parts.redo |= c.result < 0,
                    Entry::Flush(join) if c.result < 0 && join.error == 0 => join.error = c.result,
                    _ => {}
                }
                if last {
                    match self.entries.remove(idx) {
                        Some(Entry::Split(split)) => self.finish_split(split, out),
                        Some(Entry::Flush(join)) if !join.parts.redo => {
                            out.push(Completion { request: join.parts.into_request(), result: join.error })
                        }
                        Some(Entry::Flush(join)) => {
                            if let Err(rejected) = self.spawn(join.parts.into_request()) {
                                out.push(Completion { request: rejected.request, result: -libc::EIO });
                            }
                        }
                        _ => {}
                    }
                }
                continue;
            }
            match self.entries.remove(idx) {
                Some(Entry::Passed { token }) => {
                    c.request.token = token;
                    out.push(c);
                }
                Some(Entry::ActiveWrite { token, sectors: (s0, s1), _ticket }) => {
                    c.request.token = token;
                    if c.result >= 0 {
                        // In the map before the ticket is released: a checkpoint that follows
                        // empties these sectors with the rest.
                        self.sec.overlay.active_map.set(s0, s1);
                        self.sec.stats.vm_ring_writes.fetch_add(1, Ordering::Relaxed);
                        out.push(c);
                    } else {
                        drop(_ticket);
                        // The buffer path redoes it (same bytes, same place) and answers.
                        if let Err(rejected) = self.spawn(c.request) {
                            out.push(Completion { request: rejected.request, result: -libc::EIO });
                        }
                    }
                }
                Some(Entry::Direct(read)) => {
                    c.request.token = read.token;
                    let (s0, s1) = read.sectors;
                    // A failed direct read is redone too: an O_DIRECT read of a guest buffer
                    // that is not aligned fails where the buffer path (page cache) succeeds; a
                    // real disk error fails again there and is answered then.
                    let valid = if read.active {
                        self.sec.direct_active_read_valid(s0, s1, read.generation)
                    } else {
                        self.sec.direct_read_valid(s0, s1, read.generation)
                    };
                    if c.result >= 0 && valid {
                        out.push(c);
                    } else if let Err(rejected) = self.spawn(c.request) {
                        out.push(Completion { request: rejected.request, result: -libc::EIO });
                    }
                }
                Some(Entry::Split(_) | Entry::Flush(_)) | None => {
                    log::error!("secondary: completion for unknown token {idx}")
                }
            }
        }
        self.scratch = scratch;
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::block::Buffers;
    use crate::nbd::server::NbdExport;
    use crate::replication::ReplicationControl;
    use crate::replication::secondary::{SecondaryControl, SecondaryExport};

    /// A disk queue whose reads happen late: the bytes are read from the file only when the
    /// completion is reaped, as a slow device would, so a test can let a primary write land
    /// in between.
    struct LateReads {
        disk: Arc<dyn crate::block::image::ImageData>,
        held: Vec<IoRequest>,
    }

    impl BlockQueue for LateReads {
        fn push(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
            assert!(matches!(request.kind, OpKind::Read { .. }), "only reads reach the disk here");
            self.held.push(request);
            Ok(())
        }
        fn submit(&mut self) -> Result<(), IoEngineError> {
            Ok(())
        }
        fn reap(&mut self, out: &mut Vec<Completion>) {
            for request in self.held.drain(..) {
                let OpKind::Read { offset } = request.kind else { continue };
                let mut bytes = vec![0u8; request.bufs.len() as usize];
                let result = match self.disk.read_exact_at(&mut bytes, offset) {
                    Ok(()) => bytes.len() as i32,
                    Err(_) => -libc::EIO,
                };
                let mut request = request;
                request.bufs.copy_from(&bytes);
                out.push(Completion { request, result });
            }
        }
    }

    fn setup(dir: &std::path::Path) -> (Arc<Secondary>, SecondaryQueue) {
        let s = super::super::tests::secondary(dir, 1 << 20);
        let inner = Box::new(LateReads { disk: s.file.clone(), held: Vec::new() });
        let completions = WorkerCompletions::new().unwrap();
        let q = SecondaryQueue {
            sec: s.clone(),
            active_ring: None,
            active_swaps: 0,
            buffers_in_ring: true,
            disk_in_ring: false,
            inner,
            buffered: completions.lane(),
            entries: Slab::default(),
            inline: Vec::new(),
            ready: Vec::new(),
            scratch: Vec::new(),
        };
        (s, q)
    }

    /// `setup` with the worker's ring on the buffers (the disk stays on the late queue).
    fn setup_with_ring(dir: &std::path::Path) -> (Arc<Secondary>, SecondaryQueue, Arc<WorkerCompletions>) {
        let (s, mut q) = setup(dir);
        let completions = WorkerCompletions::new().unwrap();
        let files = vec![s.overlay.active.file.clone(), s.overlay.hidden.file.clone()];
        q.active_ring = Some(crate::io::uring::UringEngine::with_files(files, 64, &completions).unwrap());
        q.active_swaps = s.overlay.active_swaps();
        (s, q, completions)
    }

    /// Reaps until `token` completes (the redo runs on a pool thread).
    fn wait_for(q: &mut SecondaryQueue, token: u64) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        loop {
            q.reap(&mut out);
            if let Some(c) = out.iter().find(|c| c.token() == token) {
                return c.result;
            }
            assert!(Instant::now() < deadline, "token {token} never completed");
            std::thread::yield_now();
        }
    }

    fn read(buf: &mut [u8], offset: u64, token: u64) -> IoRequest {
        let iov = vec![libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
        // SAFETY: each test keeps `buf` alive until the completion was reaped.
        IoRequest::new(token, OpKind::Read { offset }, unsafe { Buffers::from_raw(iov, None) })
    }

    fn vm_write(buf: &mut [u8], offset: u64, token: u64) -> IoRequest {
        let iov = vec![libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
        // SAFETY: each test keeps `buf` alive until the completion was reaped.
        IoRequest::new(token, OpKind::Write { offset, dsync: false }, unsafe { Buffers::from_raw(iov, None) })
    }

    fn directs(q: &SecondaryQueue) -> usize {
        q.entries.values().filter(|e| matches!(e, Entry::Direct(_))).count()
    }

    /// A direct read overtaken by a primary write to its sectors (copy-before-write, then the
    /// new data on the disk) must not answer with the new data: it is redone on the buffer
    /// path, which reads the saved old data from hidden.
    #[test]
    fn a_direct_read_overtaken_by_a_primary_write_is_redone_from_the_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let (s, mut q) = setup(dir.path());
        let mut buf = vec![0u8; 4096];
        q.push(read(&mut buf, 0, 7)).unwrap();
        assert_eq!(directs(&q), 1, "the read did not go to the disk's queue");
        SecondaryExport(s.clone()).write(0, &[0x22u8; 4096], false).unwrap();
        assert_eq!(wait_for(&mut q, 7), 4096);
        assert!(buf.iter().all(|&b| b == 0x11), "the VM read saw the primary's next-epoch data");
        assert_eq!(s.stats.direct_retries.load(Ordering::Relaxed), 1);

        // A read of untouched sectors completes directly.
        q.push(read(&mut buf, 65536, 8)).unwrap();
        assert_eq!(wait_for(&mut q, 8), 4096);
        assert_eq!(s.stats.direct_reads.load(Ordering::Relaxed), 1);
        // Sectors in a buffer never go direct.
        q.push(read(&mut buf, 0, 9)).unwrap();
        assert_eq!(directs(&q), 0);
        assert_eq!(wait_for(&mut q, 9), 4096);
        assert!(buf.iter().all(|&b| b == 0x11));
    }

    /// A read spanning the active buffer and the disk is split on the ring; a primary write
    /// that lands on its disk piece before it completes (copy-before-write, then the new data)
    /// makes it redo on the buffer path, which reads the saved old data; an untouched split
    /// read is answered from its pieces.
    #[test]
    fn a_split_read_overtaken_by_a_primary_write_is_redone_from_the_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let (s, mut q, _completions) = setup_with_ring(dir.path());
        // The VM wrote 0x33 over the first 4 KiB of the range.
        let mut mine = vec![0x33u8; 4096];
        q.push(vm_write(&mut mine, 0, 1)).unwrap();
        q.submit().unwrap();
        assert_eq!(wait_for(&mut q, 1), 4096);
        let mut buf = vec![0u8; 8192];
        q.push(read(&mut buf, 0, 2)).unwrap();
        assert!(q.entries.values().any(|e| matches!(e, Entry::Split(_))), "the read was not split");
        q.submit().unwrap();
        SecondaryExport(s.clone()).write(4096, &[0x22u8; 4096], false).unwrap();
        assert_eq!(wait_for(&mut q, 2), 8192);
        assert!(buf[..4096].iter().all(|&b| b == 0x33), "the VM's own write is lost");
        assert!(buf[4096..].iter().all(|&b| b == 0x11), "the VM read the primary's next-epoch data");
        assert_eq!(s.stats.direct_retries.load(Ordering::Relaxed), 1);
        // The same read again: active + hidden pieces now, nothing overtakes it.
        let mut again = vec![0u8; 8192];
        q.push(read(&mut again, 0, 3)).unwrap();
        q.submit().unwrap();
        assert_eq!(wait_for(&mut q, 3), 8192);
        assert_eq!(again, buf);
        assert_eq!(s.stats.direct_retries.load(Ordering::Relaxed), 1, "an untouched split read was redone");
    }

    /// A checkpoint overlapping a direct read makes it redo (the generation changed).
    #[test]
    fn a_direct_read_overlapping_a_checkpoint_is_redone() {
        let dir = tempfile::tempdir().unwrap();
        let (s, mut q) = setup(dir.path());
        let mut buf = vec![0u8; 4096];
        q.push(read(&mut buf, 8192, 1)).unwrap();
        SecondaryControl(s.clone()).checkpoint(None).unwrap();
        assert_eq!(wait_for(&mut q, 1), 4096);
        assert_eq!(s.stats.direct_retries.load(Ordering::Relaxed), 1);
        assert!(buf.iter().all(|&b| b == 0x11));
    }

    /// A disk queue that cannot take anything (a full queue).
    struct Refusing;

    impl BlockQueue for Refusing {
        fn push(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
            Err(Box::new(Rejected { error: IoEngineError::QueueFull, request }))
        }
        fn submit(&mut self) -> Result<(), IoEngineError> {
            Ok(())
        }
        fn reap(&mut self, _out: &mut Vec<Completion>) {}
    }

    /// Whatever part of a request the disk's queue refuses, the request is answered right, by
    /// the buffer path: a direct read (refused at once), a split read whose active piece is on
    /// the ring and whose disk piece is refused (redone once the queued piece is back), and a
    /// flush whose disk sync is refused.
    #[test]
    fn parts_the_disk_queue_refuses_are_redone_on_the_buffer_path() {
        let dir = tempfile::tempdir().unwrap();
        let (s, mut q, _completions) = setup_with_ring(dir.path());
        q.inner = Box::new(Refusing);

        let mut buf = vec![0u8; 4096];
        q.push(read(&mut buf, 65536, 1)).unwrap();
        assert_eq!(directs(&q), 0, "a refused direct read stayed in the table");
        assert_eq!(wait_for(&mut q, 1), 4096);
        assert!(buf.iter().all(|&b| b == 0x11));

        let mut mine = vec![0x33u8; 4096];
        q.push(vm_write(&mut mine, 0, 2)).unwrap();
        q.submit().unwrap();
        assert_eq!(wait_for(&mut q, 2), 4096);
        let mut split = vec![0u8; 8192];
        q.push(read(&mut split, 0, 3)).unwrap();
        assert!(q.entries.values().any(|e| matches!(e, Entry::Split(_))), "the read was not split");
        q.submit().unwrap();
        assert_eq!(wait_for(&mut q, 3), 8192);
        assert!(split[..4096].iter().all(|&b| b == 0x33) && split[4096..].iter().all(|&b| b == 0x11));

        q.push(IoRequest::new(4, OpKind::Flush, Buffers::none())).unwrap();
        q.submit().unwrap();
        assert_eq!(wait_for(&mut q, 4), 0);
        assert!(q.entries.is_empty(), "entries left behind: {}", q.entries.len());
        // Nothing holds the gate: a checkpoint goes through.
        SecondaryControl(s.clone()).checkpoint(None).unwrap();
    }

    /// After a checkpoint replaced the buffer files, a ring that cannot register the fresh
    /// ones (here: its table has no hidden entry) keeps serving, with the buffers' requests on
    /// the pool: VM writes land in the new active buffer, reads see them, and the gate is free
    /// for the next checkpoint.
    #[test]
    fn a_ring_that_cannot_register_the_fresh_buffers_sends_them_to_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let (s, mut q) = setup(dir.path());
        let completions = WorkerCompletions::new().unwrap();
        let files = vec![s.overlay.active.file.clone()];
        q.active_ring = Some(crate::io::uring::UringEngine::with_files(files, 64, &completions).unwrap());
        q.active_swaps = s.overlay.active_swaps();

        let mut first = vec![0x44u8; 4096];
        q.push(vm_write(&mut first, 0, 1)).unwrap();
        q.submit().unwrap();
        assert_eq!(wait_for(&mut q, 1), 4096);
        assert_eq!(s.stats.vm_ring_writes.load(Ordering::Relaxed), 1, "the write did not take the ring");

        SecondaryControl(s.clone()).checkpoint(None).unwrap();
        let mut second = vec![0x55u8; 4096];
        q.push(vm_write(&mut second, 8192, 2)).unwrap();
        q.submit().unwrap();
        assert_eq!(wait_for(&mut q, 2), 4096);
        assert!(!q.buffers_in_ring, "the failed registration was not noticed");
        assert_eq!(s.stats.vm_ring_writes.load(Ordering::Relaxed), 1, "a write went to a stale ring file");
        let mut back = vec![0u8; 12288];
        q.push(read(&mut back, 0, 3)).unwrap();
        q.submit().unwrap();
        assert_eq!(wait_for(&mut q, 3), 12288);
        assert!(back[..8192].iter().all(|&b| b == 0x11), "the checkpoint did not empty the buffer");
        assert!(back[8192..].iter().all(|&b| b == 0x55), "the VM's write after the checkpoint is lost");
        SecondaryControl(s.clone()).checkpoint(None).unwrap();
    }
}
