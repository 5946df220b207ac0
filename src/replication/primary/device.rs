//! The guest's view: each write-type request goes to the local disk and to the secondary; it
//! completes when both halves did.
//!
//! A guest may change a buffer while its write is in flight (Linux and Windows both do, e.g.
//! for pages under writeback). A write is therefore copied out of guest memory once, before
//! anything is submitted, and both halves are written from that copy: the local disk and the
//! secondary always get the same bytes, whatever the guest does to its buffer meanwhile.

use std::sync::Arc;

use super::{Mirror, Payload, SECTOR, verify};
use crate::block::{
    BlockDevice, BlockError, BlockQueue, Buffers, Completion, IoEngineError, IoRequest, Lane, OpKind, Rejected,
    WorkerCompletions,
};
use crate::io::slab::Slab;
use crate::nbd::wire::CMD_WRITE;
use crate::replication::Stage;

/// A block device whose writes are mirrored while the mirror runs.
pub struct MirrorDevice {
    /// The local device.
    pub inner: Arc<dyn BlockDevice>,
    /// The mirror.
    pub mirror: Arc<Mirror>,
}

impl BlockDevice for MirrorDevice {
    fn below(&self) -> Option<&dyn BlockDevice> {
        Some(&*self.inner)
    }
    fn check_resize(&self) -> Result<(), crate::block::ResizeError> {
        // The dirty bitmap, the recent-write log, the secondary's buffers and the peer's
        // disk are all sized to this disk once, at start; none of them can follow a resize.
        Err(crate::block::ResizeError::Unsupported(
            "not available with --replication primary or secondary: the replication \
             bitmaps and buffers and the peer's disk keep the size the disk had at start (restart with \
             --replication none to resize)"
                .into(),
        ))
    }
    fn open_queue(&self, depth: u32, completions: &Arc<WorkerCompletions>) -> Result<Box<dyn BlockQueue>, BlockError> {
        Ok(Box::new(MirrorQueue::new(self.inner.open_queue(depth, completions)?, self.mirror.clone(), completions)))
    }
    fn describe(&self) -> String {
        match self.mirror.stage() {
            // A secondary's idle mirror (continuous replication) is not worth mentioning.
            Stage::None => self.inner.describe(),
            s => format!("{} (mirror {})", self.inner.describe(), s.name()),
        }
    }
    fn frontend_starting(&self, dirty_logging: bool) {
        self.mirror.device_started();
        self.inner.frontend_starting(dirty_logging)
    }
}

/// A write-type request in flight on both halves.
struct Join {
    /// The submitter's token and operation, restored before the request goes back.
    token: u64,
    kind: OpKind,
    /// The submitter's request while this queue holds it; None while the local queue holds
    /// it itself (a request submitted without a copy).
    request: Option<IoRequest>,
    remaining: u8,
    result: i32,
    /// A forwarded write's range, to check against the resync when it completes locally.
    range: Option<(u64, u64)>,
    /// Clock when it was forwarded.
    since: u64,
    /// Its entry in the verify's write tracker, released when both halves completed.
    ticket: verify::Ticket,
}

/// What a token this queue pushed down stands for.
enum Entry {
    /// A request passed down as it is (reads, and everything while the mirror is off).
    Passed { token: u64 },
    /// A mirrored request.
    Joined(Join),
}

struct MirrorQueue {
    inner: Box<dyn BlockQueue>,
    mirror: Arc<Mirror>,
    /// Join indexes whose forwarded half finished (posted by the link's threads).
    remote: Arc<Lane<usize>>,
    /// Requests pushed down, by the token they carry there.
    entries: Slab<Entry>,
    scratch: Vec<Completion>,
    forwarded: Vec<usize>,
}

impl MirrorQueue {
    fn new(inner: Box<dyn BlockQueue>, mirror: Arc<Mirror>, completions: &Arc<WorkerCompletions>) -> Self {
        MirrorQueue {
            inner,
            mirror,
            remote: completions.lane(),
            entries: Slab::default(),
            scratch: Vec::new(),
            forwarded: Vec::new(),
        }
    }

    /// One half of join `idx` finished (`result`: the local half's result; None: the remote
    /// half); completes the guest request into `out` when both did.
    fn finish_part(&mut self, idx: usize, result: Option<i32>, out: &mut Vec<Completion>) {
        let Some(Entry::Joined(j)) = self.entries.get_mut(idx) else { return };
        if let Some(r) = result {
            j.result = r;
            if let Some((off, len)) = j.range {
                self.mirror.local_write_done(off, len, j.since, r < 0);
            }
        }
        j.remaining -= 1;
        if j.remaining > 0 {
            return;
        }
        let Some(Entry::Joined(j)) = self.entries.remove(idx) else { return };
        if let Some((off, len)) = j.range {
            self.mirror.activity_end(off / SECTOR, (off + len).div_ceil(SECTOR));
        }
        self.mirror.verify.tracker.finished(j.ticket);
        if let Some(mut request) = j.request {
            request.token = j.token;
            request.kind = j.kind;
            out.push(Completion { request, result: j.result });
        }
    }

    /// Passes `request` down unchanged but for its token.
    fn pass(&mut self, mut request: IoRequest) -> Result<(), Box<Rejected>> {
        let token = request.token;
        let idx = self.entries.insert(Entry::Passed { token });
        request.token = idx as u64;
        self.inner.push(request).map_err(|mut rejected| {
            self.entries.remove(idx);
            rejected.request.token = token;
            rejected
        })
    }
}

impl Drop for MirrorQueue {
    /// A queue closed with writes still joined (a frontend that vanished) releases their
    /// tracker entries, so a later verify neither waits for them nor treats their sectors
    /// as written forever.
    fn drop(&mut self) {
        for e in self.entries.values_mut() {
            if let Entry::Joined(j) = e {
                self.mirror.verify.tracker.finished(std::mem::replace(&mut j.ticket, verify::Ticket::None));
            }
        }
    }
}

impl BlockQueue for MirrorQueue {
    fn push(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
        let mirrored = self.mirror.running() && !matches!(request.kind, OpKind::Read { .. });
        if !mirrored {
            return self.pass(request);
        }
        let range = match request.kind {
            OpKind::Flush | OpKind::Read { .. } => None,
            _ => request.range(),
        };
        // A forwarded write is copied out of guest memory now, once; the local write below
        // and the forwarded one are both written from this copy.
        let copy = match request.kind {
            OpKind::Write { .. } if Mirror::forwardable(CMD_WRITE, request.bufs.len()) => {
                Some(Payload::new(request.bufs.to_aligned()))
            }
            _ => None,
        };
        // The extents are in the activity log before anything is written (a restart after a
        // crash copies them).
        if let Some((off, len)) = range {
            self.mirror.activity_begin(off / SECTOR, (off + len).div_ceil(SECTOR));
        }
        // Tracked before the local write is submitted and the write forwarded (the verify's
        // ordering rule, see `verify`).
        let ticket = match range {
            Some((off, len)) => self.mirror.verify.tracker.started(off / SECTOR, (off + len).div_ceil(SECTOR)),
            None => verify::Ticket::None,
        };
        let (token, kind, len) = (request.token, request.kind, request.bufs.len());
        let since = self.mirror.now();
        let idx = self.entries.insert(Entry::Joined(Join {
            token,
            kind,
            request: None,
            remaining: 2,
            result: 0,
            range,
            since,
            ticket,
        }));
        // The local half: the copy when there is one (the submitter's request waits here),
        // else the request itself.
        let local = match &copy {
            Some(data) => {
                if let Some(Entry::Joined(j)) = self.entries.get_mut(idx) {
                    j.request = Some(request);
                }
                IoRequest::new(idx as u64, kind, Buffers::shared(data.clone()))
            }
            None => {
                let mut r = request;
                r.token = idx as u64;
                r
            }
        };
        if let Err(mut rejected) = self.inner.push(local) {
            let Some(Entry::Joined(mut j)) = self.entries.remove(idx) else { return Err(rejected) };
            self.mirror.verify.tracker.finished(std::mem::replace(&mut j.ticket, verify::Ticket::None));
            if let Some((off, len)) = range {
                self.mirror.activity_end(off / SECTOR, (off + len).div_ceil(SECTOR));
            }
            if let Some(original) = j.request.take() {
                rejected.request = original;
            }
            rejected.request.token = token;
            rejected.request.kind = kind;
            return Err(rejected);
        }
        self.mirror.forward(kind, len, copy, idx, &self.remote);
        Ok(())
    }
    fn submit(&mut self) -> Result<(), IoEngineError> {
        self.inner.submit()
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut local = std::mem::take(&mut self.scratch);
        self.inner.reap(&mut local);
        for mut c in local.drain(..) {
            let idx = c.request.token as usize;
            match self.entries.get_mut(idx) {
                Some(Entry::Passed { token }) => {
                    c.request.token = *token;
                    self.entries.remove(idx);
                    out.push(c);
                }
                Some(Entry::Joined(j)) => {
                    if j.request.is_none() {
                        // The submitter's own request came back from the local queue.
                        j.request = Some(c.request);
                    }
                    self.finish_part(idx, Some(c.result), out);
                }
                _ => log::error!("mirror: completion for unknown token {idx}"),
            }
        }
        self.scratch = local;
        let mut forwarded = std::mem::take(&mut self.forwarded);
        self.remote.drain_into(&mut forwarded);
        for idx in forwarded.drain(..) {
            self.finish_part(idx, None, out);
        }
        self.forwarded = forwarded;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    use crate::replication::primary::{MirrorConfig, lock};

    /// A local queue that, like the kernel, reads a write's buffers only when it performs
    /// it — here at reap time, after the guest changed its buffer.
    #[derive(Default)]
    struct LateQueue {
        queued: Vec<IoRequest>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl BlockQueue for LateQueue {
        fn push(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
            self.queued.push(request);
            Ok(())
        }
        fn submit(&mut self) -> Result<(), IoEngineError> {
            Ok(())
        }
        fn reap(&mut self, out: &mut Vec<Completion>) {
            for request in self.queued.drain(..) {
                let mut bytes = vec![0u8; request.bufs.len() as usize];
                request.bufs.copy_to(&mut bytes);
                lock(&self.written).extend_from_slice(&bytes);
                out.push(Completion { request, result: 0 });
            }
        }
    }

    /// Issue 10 item 8: the local half of a mirrored write is written from the copy taken
    /// at submission, not from guest memory the guest may change while the write is in flight.
    #[test]
    fn local_write_uses_the_copy_taken_at_submission() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let cfg = MirrorConfig { secondary: None, timeout: Duration::from_secs(1), tls: None };
        let mirror = Mirror::new(Arc::new(f), 1 << 20, cfg);
        mirror.set_stage(Stage::Running);
        let written = Arc::new(Mutex::new(Vec::new()));
        let inner = LateQueue { queued: Vec::new(), written: written.clone() };
        let completions = WorkerCompletions::new().unwrap();
        let mut q = MirrorQueue::new(Box::new(inner), mirror.clone(), &completions);
        let mut guest = vec![0xAAu8; 8192];
        let iov = vec![
            libc::iovec { iov_base: guest.as_mut_ptr().cast(), iov_len: 4096 },
            libc::iovec { iov_base: guest[4096..].as_mut_ptr().cast(), iov_len: 4096 },
        ];
        // SAFETY: `guest` outlives the reap below, which hands the request back.
        let bufs = unsafe { Buffers::from_raw(iov, None) };
        q.push(IoRequest::new(7, OpKind::Write { offset: 0, dsync: false }, bufs)).unwrap();
        // The guest rewrites its buffer while the write is in flight.
        guest.fill(0x55);
        let mut out = Vec::new();
        q.reap(&mut out);
        assert_eq!(out.len(), 1, "both halves completed (no link: the range went dirty)");
        assert_eq!(out[0].token(), 7);
        assert_eq!(out[0].request.bufs.len(), 8192, "the guest's own request came back");
        let w = lock(&written);
        assert_eq!(w.len(), 8192);
        assert!(
            w.iter().all(|&b| b == 0xAA),
            "the local write used guest memory changed after submission, not the copy"
        );
        drop(w);
        // No link: the range is remembered for the resync, which reads the local disk.
        assert_eq!(mirror.dirty.count_all(), 16);
    }
}
