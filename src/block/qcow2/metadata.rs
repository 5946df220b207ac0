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

use std::io::IoSlice;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use crate::io::{Buffers, Lane};
use imago::io_buffers::{IoVector, IoVectorMut};

use super::Image;

/// What a job does.
#[derive(Debug)]
pub(super) enum JobOp {
    /// Read through imago (compressed clusters, or a request diverted during a discard).
    Read { offset: u64, bufs: Buffers },
    /// Write through imago (allocation, copy-on-write, or a durable write).
    Write { offset: u64, bufs: Buffers, dsync: bool },
    /// Make data and metadata durable.
    Flush,
    /// Make a range read as zeroes (or discard it), as `how` says.
    Zero { offset: u64, len: u64, how: Zeroing },
    /// Change the virtual size.
    Resize { size: u64, reply: Sender<std::io::Result<()>> },
}

/// The three ways a guest asks for zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Zeroing {
    /// Discard (a hint): deallocate what can be, reading back zeroes.
    Discard,
    /// Write-zeroes that may unmap: zero clusters, deallocated.
    Unmap,
    /// Write-zeroes that keeps the allocation.
    Allocated,
}

/// A job and where its completion goes.
pub(super) struct Job {
    pub op: JobOp,
    /// The queue's request index the result belongs to.
    pub index: usize,
    /// The queue's lane in its worker's completions (None: the result travels otherwise).
    pub done: Option<Arc<JobLane>>,
}

/// A queue's lane for its jobs' results: (request index, result).
pub(super) type JobLane = Lane<(usize, i32)>;

/// How long a cluster-moving job waits for the workers' mapped I/O to drain.
const QUIESCE_DEADLINE: Duration = Duration::from_secs(30);

fn errno(e: &std::io::Error) -> i32 {
    -e.raw_os_error().unwrap_or(libc::EIO)
}

/// The thread's main loop: runs until every sender is gone.
pub(super) fn run(image: Arc<Image>, jobs: Receiver<Job>) {
    let mut batch: Vec<Job> = Vec::new();
    // Each finished job: where its result goes, its request index, the result.
    let mut finished: Vec<(Option<Arc<JobLane>>, usize, i32)> = Vec::new();
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
                JobOp::Read { offset, mut bufs } => read(&image, offset, &mut bufs),
                JobOp::Write { offset, bufs, dsync } => {
                    wrote = true;
                    write(&image, offset, &bufs, dsync)
                }
                JobOp::Flush => flush(&image),
                JobOp::Zero { offset, len, how } => {
                    wrote = true;
                    zero(&image, offset, len, how)
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
            if let Some(lane) = done {
                lane.post((index, result));
            }
        }
    }
}

pub(super) fn read(image: &Image, offset: u64, bufs: &mut Buffers) -> i32 {
    let len = bufs.len();
    let slices = bufs.io_slices_mut();
    match image.with(|a| a.readv(IoVectorMut::from(slices), offset)) {
        Ok(()) => crate::io::result_from_len(len),
        Err(e) => {
            image.log_error("read", offset, &e);
            errno(&e)
        }
    }
}

pub(super) fn write(image: &Image, offset: u64, bufs: &Buffers, dsync: bool) -> i32 {
    let len = bufs.len();
    let slices = bufs.io_slices();
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

pub(super) fn zero(image: &Image, offset: u64, len: u64, how: Zeroing) -> i32 {
    if image.version < 3 {
        // Version 2 has no zero clusters. As QEMU: write-zeroes writes zeroes; a discard
        // (a hint) is dropped, since deallocating would let a backing file show through.
        return match how {
            Zeroing::Discard => 0,
            Zeroing::Unmap | Zeroing::Allocated => write_zeroes_by_hand(image, offset, len),
        };
    }
    let Some(_quiet) = image.quiesce_mappings(QUIESCE_DEADLINE) else {
        log::error!(
            "{}: in-flight I/O did not drain within {QUIESCE_DEADLINE:?}; zeroing refused",
            image.path.display()
        );
        return -libc::EIO;
    };
    // As QEMU's qcow2 driver: a discard or an unmapping write-zeroes deallocates whole
    // clusters and marks them zero (the backing file does not show through), the rest is
    // written as zeroes; a write-zeroes without unmap keeps the clusters allocated.
    let r = image.with_mut(|a| match how {
        Zeroing::Discard | Zeroing::Unmap => a.discard_to_zero(offset, len),
        Zeroing::Allocated => a.write_zeroes(offset, len),
    });
    match r {
        Ok(()) => 0,
        Err(e) => {
            let what = match how {
                Zeroing::Discard => "discard",
                Zeroing::Unmap | Zeroing::Allocated => "write-zeroes",
            };
            image.log_error(what, offset, &e);
            errno(&e)
        }
    }
}

/// Writes zeroes over `[offset, offset + len)` as data (version 2 images).
fn write_zeroes_by_hand(image: &Image, offset: u64, len: u64) -> i32 {
    const CHUNK: u64 = 1 << 20;
    let zeroes = crate::io::aligned::AlignedBuf::zeroed(CHUNK.min(len) as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let r = image.with(|a| a.writev(IoVector::from(vec![IoSlice::new(&zeroes[..n as usize])]), offset + done));
        if let Err(e) = r {
            image.log_error("write-zeroes", offset + done, &e);
            return errno(&e);
        }
        done += n;
    }
    0
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
