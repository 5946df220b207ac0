//! Block queues whose worker went away while their I/O was still running.
//!
//! A frontend that stops a queue gets its answer only once the queue drained; when the drain
//! times out (a disk or a buffer that hangs), the connection ends and its workers are torn
//! down with requests in flight. Those requests own their guest memory and buffers, but the
//! block queue below still holds them: the kernel may write into that memory, and a layer
//! may hold resources for them (the secondary's gate tickets, which a checkpoint waits for).
//! Freeing the queue would free memory under the kernel; leaking it would keep those
//! resources forever. Instead the queue is handed to one reaper thread that keeps reaping
//! it until the requests it owes came back, then drops it as an idle worker would.
//!
//! One thread serves every orphan (a frontend reconnecting in a loop while its disk hangs
//! cannot make the daemon spawn a thread per connection). It waits on the queues'
//! completion eventfds, so it costs nothing between completions.

use std::os::fd::RawFd;
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::block::{BlockQueue, Completion, WorkerCompletions};

/// How often the reaper reports a queue whose requests still have not come back.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// A torn-down worker's block queue and the completions it still owes.
pub struct Orphan {
    queue: usize,
    io: Box<dyn BlockQueue>,
    done: Arc<WorkerCompletions>,
    /// Block operations pushed and not yet reaped.
    owed: usize,
    since: Instant,
    reported: Instant,
}

impl Orphan {
    /// `io` (queue number `queue`, signalling `done`) owes `owed` completions.
    pub fn new(queue: usize, io: Box<dyn BlockQueue>, done: Arc<WorkerCompletions>, owed: usize) -> Self {
        let now = Instant::now();
        Orphan { queue, io, done, owed, since: now, reported: now }
    }

    /// Reaps what finished; true once nothing is owed any more.
    fn reap(&mut self, scratch: &mut Vec<Completion>) -> bool {
        self.done.clear();
        // Layers may hold work back until the next submit (the contract is "reap after every
        // submit"); their completions are dropped here, releasing what each request held.
        if let Err(e) = self.io.submit() {
            log::warn!("queue {}: submit on the torn-down queue failed: {e}", self.queue);
        }
        self.io.reap(scratch);
        self.owed = self.owed.saturating_sub(scratch.len());
        scratch.clear();
        self.owed == 0
    }
}

/// Hands `orphan` to the reaper thread (started on first use). If that thread cannot be
/// started, the queue is leaked: its memory must outlive the kernel's I/O.
pub fn adopt(orphan: Orphan) {
    static REAPER: OnceLock<Option<Mutex<Sender<Orphan>>>> = OnceLock::new();
    let sender = REAPER.get_or_init(|| {
        let (tx, rx) = channel();
        match std::thread::Builder::new().name("colo-orphans".into()).spawn(move || run(rx)) {
            Ok(_) => Some(Mutex::new(tx)),
            Err(e) => {
                log::error!("cannot start the thread that reaps torn-down queues: {e}");
                None
            }
        }
    });
    let refused = match sender {
        Some(tx) => tx.lock().unwrap_or_else(|e| e.into_inner()).send(orphan).err().map(|e| e.0),
        None => Some(orphan),
    };
    if let Some(orphan) = refused {
        std::mem::forget(orphan);
    }
}

fn run(rx: Receiver<Orphan>) {
    let mut orphans: Vec<Orphan> = Vec::new();
    let mut scratch = Vec::new();
    loop {
        if orphans.is_empty() {
            match rx.recv() {
                Ok(o) => orphans.push(o),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(o) => orphans.push(o),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => break,
            }
        }
        let fds: Vec<RawFd> = orphans.iter().map(|o| o.done.fd()).collect();
        // A bounded wait: new orphans arrive on the channel, not on these descriptors.
        wait_readable(&fds, Duration::from_millis(200));
        orphans.retain_mut(|o| {
            if o.reap(&mut scratch) {
                log::info!(
                    "queue {}: the requests left in flight at teardown completed after {:.1} s; the queue is freed",
                    o.queue,
                    o.since.elapsed().as_secs_f64()
                );
                return false;
            }
            if o.reported.elapsed() >= REPORT_EVERY {
                o.reported = Instant::now();
                log::warn!(
                    "queue {}: {} operations still in flight {:.0} s after teardown; their memory is kept",
                    o.queue,
                    o.owed,
                    o.since.elapsed().as_secs_f64()
                );
            }
            true
        });
    }
}

/// Waits until one of `fds` is readable or `timeout` passed.
fn wait_readable(fds: &[RawFd], timeout: Duration) {
    let mut polls: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `polls` is a valid array of `polls.len()` pollfd structures for the call.
    unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, ms) };
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::block::{Buffers, IoEngineError, IoRequest, OpKind, Rejected};

    /// Holds its requests until the test lets them complete; reports its drop on a channel.
    struct Slow {
        held: Arc<Mutex<Vec<IoRequest>>>,
        release: Arc<AtomicBool>,
        dropped: Sender<()>,
    }

    impl Drop for Slow {
        fn drop(&mut self) {
            let _ = self.dropped.send(());
        }
    }

    impl BlockQueue for Slow {
        fn push(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
            self.held.lock().unwrap().push(request);
            Ok(())
        }
        fn submit(&mut self) -> Result<(), IoEngineError> {
            Ok(())
        }
        fn reap(&mut self, out: &mut Vec<Completion>) {
            if self.release.load(Ordering::SeqCst) {
                out.extend(self.held.lock().unwrap().drain(..).map(|request| Completion { request, result: 0 }));
            }
        }
    }

    #[test]
    fn an_orphaned_queue_is_freed_once_its_requests_complete() {
        let (tx, dropped) = channel();
        let release = Arc::new(AtomicBool::new(false));
        let mut slow = Slow { held: Arc::default(), release: release.clone(), dropped: tx };
        let done = WorkerCompletions::new().unwrap();
        for token in 0..2 {
            slow.push(IoRequest::new(token, OpKind::Flush, Buffers::none())).unwrap();
        }
        adopt(Orphan::new(7, Box::new(slow), done.clone(), 2));

        // Woken with nothing finished: the queue is kept.
        done.wake();
        assert!(dropped.recv_timeout(Duration::from_millis(500)).is_err(), "freed with I/O in flight");

        release.store(true, Ordering::SeqCst);
        done.wake();
        dropped.recv_timeout(Duration::from_secs(10)).expect("the queue was not freed after its I/O completed");
    }

    /// Several orphans at once (a frontend reconnecting while its disk hangs): each is freed
    /// when its own requests complete, in whatever order that happens, and one that never
    /// completes holds on to nobody else.
    #[test]
    fn orphans_are_freed_each_when_their_own_requests_complete() {
        let (tx, dropped) = channel();
        let mut releases = Vec::new();
        let mut wakes = Vec::new();
        for queue in 0..4u64 {
            let release = Arc::new(AtomicBool::new(false));
            let (qtx, qrx) = channel::<()>();
            let mut slow = Slow { held: Arc::default(), release: release.clone(), dropped: qtx };
            slow.push(IoRequest::new(queue, OpKind::Flush, Buffers::none())).unwrap();
            let done = WorkerCompletions::new().unwrap();
            adopt(Orphan::new(queue as usize, Box::new(slow), done.clone(), 1));
            let tx = tx.clone();
            std::thread::spawn(move || {
                if qrx.recv().is_ok() {
                    let _ = tx.send(queue);
                }
            });
            releases.push(release);
            wakes.push(done);
        }
        // Queue 3 never completes; the others complete in reverse order.
        for queue in [2usize, 1, 0] {
            releases[queue].store(true, Ordering::SeqCst);
            wakes[queue].wake();
            let freed = dropped.recv_timeout(Duration::from_secs(10)).expect("an orphan was not freed");
            assert_eq!(freed, queue as u64, "a queue was freed before its request completed");
        }
        assert!(dropped.recv_timeout(Duration::from_millis(300)).is_err(), "the hung queue was freed");
    }
}
