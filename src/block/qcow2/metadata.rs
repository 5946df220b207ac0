//! The image's metadata threads: everything that changes or needs qcow2 metadata runs here,
//! through imago — allocating writes (with copy-on-write from the backing chain), reads of
//! compressed clusters, discard and write-zeroes, flush and resize. Queues deal their jobs out
//! to the threads in turn; imago's own locks order what touches the same tables.
//!
//! Ordering rules:
//! - Requests in flight at the same time have no order between them (virtio gives none); a
//!   flush covers every write completed before it was submitted, because a write completes
//!   only after its metadata was written back (below) and the flush syncs the image file.
//! - A job that moves or frees clusters (discard, write-zeroes, shrink) first waits until no
//!   worker holds a mapping (`Image::quiesce_mappings`): workers issue their fast-path I/O
//!   against host offsets, which must not be handed to another guest range while in flight.
//! - Allocating writes are acknowledged only after the batch they were in has written its
//!   metadata (L2 and refcount updates) back to the image file: like the data of a raw image
//!   in the page cache, an acknowledged write survives a kill of the daemon; a guest flush
//!   additionally syncs it to stable storage.

use std::io::{IoSlice, IoSliceMut};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imago::io_buffers::{IoVector, IoVectorMut};
use vmm_sys_util::eventfd::EventFd;

use super::Image;

/// What a job does.
#[derive(Debug)]
pub(super) enum JobOp {
    /// Read through imago (compressed clusters, or a request diverted during a discard).
    Read { offset: u64, iovecs: Vec<libc::iovec> },
    /// Write through imago (allocation, copy-on-write, or a durable write).
    Write { offset: u64, iovecs: Vec<libc::iovec>, dsync: bool },
    /// Make data and metadata durable.
    Flush,
    /// Make a range read as zeroes, deallocating it (`unmap`) or not.
    Zero { offset: u64, len: u64, unmap: bool },
    /// Change the virtual size.
    Resize { size: u64, reply: Sender<std::io::Result<()>> },
}

/// A job and where its completion goes.
pub(super) struct Job {
    pub op: JobOp,
    /// The queue's request index the result belongs to.
    pub index: usize,
    pub done: Arc<DoneList>,
}

// SAFETY: the iovecs point into buffers that the `BlockQueue::push` contract keeps alive until
// the queue reaps this job's completion, which the thread posts only after it is done with
// them; nothing else reads the pointers.
unsafe impl Send for Job {}

/// Completions the metadata thread posts back to one queue, and the eventfd that tells it.
#[derive(Debug)]
pub(super) struct DoneList {
    pub list: Mutex<Vec<(usize, i32)>>,
    pub eventfd: EventFd,
}

impl DoneList {
    pub fn post(&self, index: usize, result: i32) {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).push((index, result));
        // A failed write only means the counter is saturated: the queue is signalled anyway.
        let _ = self.eventfd.write(1);
    }
}

/// How long a cluster-moving job waits for the workers' mapped I/O to drain.
const QUIESCE_DEADLINE: Duration = Duration::from_secs(30);

fn errno(e: &std::io::Error) -> i32 {
    -e.raw_os_error().unwrap_or(libc::EIO)
}

/// The thread's main loop: runs until every sender is gone.
pub(super) fn run(image: Arc<Image>, jobs: Receiver<Job>) {
    let mut batch: Vec<Job> = Vec::new();
    let mut finished: Vec<(Arc<DoneList>, usize, i32)> = Vec::new();
    loop {
        match jobs.recv_timeout(Duration::from_secs(1)) {
            Ok(job) => batch.push(job),
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // Everything that queued up meanwhile shares one metadata write-back.
        while batch.len() < 256 {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut wrote = false;
        for job in batch.drain(..) {
            let result = match job.op {
                JobOp::Read { offset, iovecs } => read(&image, offset, &iovecs),
                JobOp::Write { offset, iovecs, dsync } => {
                    wrote = true;
                    write(&image, offset, &iovecs, dsync)
                }
                JobOp::Flush => flush(&image),
                JobOp::Zero { offset, len, unmap } => {
                    wrote = true;
                    zero(&image, offset, len, unmap)
                }
                JobOp::Resize { size, reply } => {
                    let _ = reply.send(resize(&image, size));
                    continue;
                }
            };
            finished.push((job.done, job.index, result));
        }
        if wrote && let Err(e) = image.with(|a| a.flush()) {
            log::error!("{}: cannot write qcow2 metadata back: {e}", image.path.display());
            for f in finished.iter_mut() {
                if f.2 >= 0 {
                    f.2 = errno(&e);
                }
            }
        }
        for (done, index, result) in finished.drain(..) {
            done.post(index, result);
        }
    }
}

pub(super) fn read(image: &Image, offset: u64, iovecs: &[libc::iovec]) -> i32 {
    let slices: Vec<IoSliceMut<'_>> = iovecs
        .iter()
        // SAFETY: each iovec is a live, writable guest buffer (the Job's Send contract).
        .map(|v| IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) }))
        .collect();
    let len = crate::io::iovecs_len(iovecs);
    match image.with(|a| a.readv(IoVectorMut::from(slices), offset)) {
        Ok(()) => crate::io::result_from_len(len),
        Err(e) => {
            image.log_error("read", offset, &e);
            errno(&e)
        }
    }
}

pub(super) fn write(image: &Image, offset: u64, iovecs: &[libc::iovec], dsync: bool) -> i32 {
    let slices: Vec<IoSlice<'_>> = iovecs
        .iter()
        // SAFETY: each iovec is a live guest buffer (the Job's Send contract); only read here.
        .map(|v| IoSlice::new(unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) }))
        .collect();
    let len = crate::io::iovecs_len(iovecs);
    let r = image.with(|a| {
        a.writev(IoVector::from(slices), offset)?;
        if dsync {
            a.flush()?;
            a.sync()?;
        }
        Ok(())
    });
    match r {
        Ok(()) => crate::io::result_from_len(len),
        Err(e) => {
            image.log_error("write", offset, &e);
            errno(&e)
        }
    }
}

pub(super) fn flush(image: &Image) -> i32 {
    match image.with(|a| a.flush().and_then(|()| a.sync())) {
        Ok(()) => 0,
        Err(e) => {
            image.log_error("flush", 0, &e);
            errno(&e)
        }
    }
}

pub(super) fn zero(image: &Image, offset: u64, len: u64, unmap: bool) -> i32 {
    let Some(_quiet) = image.quiesce_mappings(QUIESCE_DEADLINE) else {
        log::error!(
            "{}: in-flight I/O did not drain within {QUIESCE_DEADLINE:?}; zeroing refused",
            image.path.display()
        );
        return -libc::EIO;
    };
    // As QEMU's qcow2 driver: an unmapping request deallocates whole clusters and marks them
    // zero (the backing file does not show through), the rest is written as zeroes.
    let r = image.with_mut(|a| if unmap { a.discard_to_zero(offset, len) } else { a.write_zeroes(offset, len) });
    match r {
        Ok(()) => 0,
        Err(e) => {
            image.log_error(if unmap { "discard" } else { "write-zeroes" }, offset, &e);
            errno(&e)
        }
    }
}

fn resize(image: &Image, size: u64) -> std::io::Result<()> {
    let old = image.size();
    if size > old {
        // New clusters read as zeroes even over a backing file that is longer.
        image.with(|a| {
            a.resize_grow(size, imago::format::PreallocateMode::Zero)?;
            a.flush()?;
            a.sync()
        })?;
    } else if size < old {
        let _quiet = image
            .quiesce_mappings(QUIESCE_DEADLINE)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "in-flight I/O did not drain"))?;
        image.with_mut(|a| {
            a.resize_shrink(size)?;
            a.flush()?;
            a.sync()
        })?;
    }
    image.set_size(size);
    Ok(())
}
