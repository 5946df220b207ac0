//! Fault injection: a layer on top of the block stack that fails chosen operations with a
//! chosen errno (EIO, ENOSPC, ...), as a failing disk would, or holds them for a while before
//! they reach the disk, as a slow or hanging disk would. Enabled only with
//! `--x-fault-injection`; rules are added over the control socket (`x-inject-fault`), so tests
//! can make exactly one request fail and check that only that request fails, the daemon keeps
//! serving and the error is counted.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{
    BlockDevice, BlockError, BlockQueue, Completion, IoEngineError, IoRequest, Op, Rejected, WorkerCompletions,
};

/// Which operations a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Flushes.
    Flush,
    /// Discards and write-zeroes.
    Discard,
    /// Everything above (not barriers).
    Any,
    /// The secondary's COLO checkpoint barrier, after its flushes.
    Barrier,
}

impl std::str::FromStr for FaultOp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "read" => FaultOp::Read,
            "write" => FaultOp::Write,
            "flush" => FaultOp::Flush,
            "discard" => FaultOp::Discard,
            "any" => FaultOp::Any,
            "barrier" => FaultOp::Barrier,
            _ => return Err(format!("'{s}' is not read, write, flush, discard, any or barrier")),
        })
    }
}

/// One injected fault: operations of `op` overlapping [start, end) fail with `errno` (or,
/// with `delay`, are held that long and then done), for the next `count` matches (None:
/// until cleared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// Matched operation kind.
    pub op: FaultOp,
    /// First byte.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// Positive errno the operation completes with.
    pub errno: i32,
    /// Matches left.
    pub count: Option<u64>,
    /// Hold the operation this long and then do it, instead of failing it.
    pub delay: Option<Duration>,
}

/// What a rule does to an operation or a barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Fail it with this errno.
    Fail(i32),
    /// Hold it this long, then let it proceed.
    Delay(Duration),
}

/// Names of the errnos a rule may use.
pub fn parse_errno(s: &str) -> Result<i32, String> {
    Ok(match s {
        "EIO" => libc::EIO,
        "ENOSPC" => libc::ENOSPC,
        "EDQUOT" => libc::EDQUOT,
        "EROFS" => libc::EROFS,
        "ENOMEM" => libc::ENOMEM,
        _ => return Err(format!("'{s}' is not EIO, ENOSPC, EDQUOT, EROFS or ENOMEM")),
    })
}

/// The rules, shared by every queue.
#[derive(Debug, Default)]
pub struct FaultPlan {
    rules: Mutex<Vec<FaultRule>>,
    armed: AtomicBool,
    injected: AtomicU64,
}

impl FaultPlan {
    /// Adds a rule.
    pub fn add(&self, rule: FaultRule) {
        let mut r = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        r.push(rule);
        self.armed.store(true, Ordering::Release);
    }

    /// Removes every rule.
    pub fn clear(&self) {
        let mut r = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        r.clear();
        self.armed.store(false, Ordering::Release);
    }

    /// Operations failed on purpose so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// Uses one match of rule `i`: drops the rule when its count is spent, disarms the plan
    /// when no rule is left, counts the injection.
    fn consume(&self, rules: &mut Vec<FaultRule>, i: usize) {
        if let Some(c) = rules[i].count.as_mut() {
            *c = c.saturating_sub(1);
            if *c == 0 {
                rules.remove(i);
            }
        }
        if rules.is_empty() {
            self.armed.store(false, Ordering::Release);
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
    }

    /// What a barrier rule does to the secondary's next barrier, if one matches (consuming
    /// one of its matches).
    pub fn check_barrier(&self) -> Option<FaultAction> {
        if !self.armed.load(Ordering::Acquire) {
            return None;
        }
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let i = rules.iter().position(|r| r.op == FaultOp::Barrier)?;
        let action = rules[i].action();
        self.consume(&mut rules, i);
        log::warn!("fault injection: barrier {action:?}");
        Some(action)
    }

    /// What happens to `op`, if a rule matches (consuming one of its matches).
    pub fn check(&self, op: &Op<'_>) -> Option<FaultAction> {
        if !self.armed.load(Ordering::Acquire) {
            return None;
        }
        let (kind, start, len) = match *op {
            Op::Read { offset, iovecs } => (FaultOp::Read, offset, crate::io::iovecs_len(iovecs)),
            Op::Write { offset, iovecs, .. } => (FaultOp::Write, offset, crate::io::iovecs_len(iovecs)),
            Op::Flush => (FaultOp::Flush, 0, u64::MAX),
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => (FaultOp::Discard, offset, len),
        };
        let end = start.saturating_add(len.max(1));
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let i = rules.iter().position(|r| (r.op == kind || r.op == FaultOp::Any) && r.start < end && start < r.end)?;
        let action = rules[i].action();
        self.consume(&mut rules, i);
        log::warn!("fault injection: {kind:?} at {start}+{len}: {action:?}");
        Some(action)
    }
}

impl FaultRule {
    fn action(&self) -> FaultAction {
        match self.delay {
            Some(d) => FaultAction::Delay(d),
            None => FaultAction::Fail(self.errno),
        }
    }
}

/// A device whose operations go through a [`FaultPlan`] first.
pub struct FaultyDevice {
    /// The real stack.
    pub inner: Arc<dyn BlockDevice>,
    /// The rules.
    pub plan: Arc<FaultPlan>,
}

impl BlockDevice for FaultyDevice {
    fn below(&self) -> Option<&dyn BlockDevice> {
        Some(&*self.inner)
    }
    fn open_queue(&self, depth: u32, completions: &Arc<WorkerCompletions>) -> Result<Box<dyn BlockQueue>, BlockError> {
        Ok(Box::new(FaultyQueue {
            inner: self.inner.open_queue(depth, completions)?,
            plan: self.plan.clone(),
            failed: Vec::new(),
            held: Vec::new(),
            worker: completions.clone(),
        }))
    }
    fn describe(&self) -> String {
        format!("{} (fault injection)", self.inner.describe())
    }
}

struct FaultyQueue {
    inner: Box<dyn BlockQueue>,
    plan: Arc<FaultPlan>,
    /// Requests failed by a rule, handed out at the next reap (the worker reaps after every
    /// submit: the `BlockQueue` contract).
    failed: Vec<Completion>,
    /// Requests a delay rule holds, with the time they go on to the disk.
    held: Vec<(Instant, IoRequest)>,
    /// Woken when the earliest held request is due.
    worker: Arc<WorkerCompletions>,
}

impl FaultyQueue {
    /// Sends the held requests that are due on to the disk.
    fn release_due(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut i = 0;
        let (mut pushed, mut released) = (false, false);
        while i < self.held.len() {
            if self.held[i].0 > now {
                i += 1;
                continue;
            }
            let (_, request) = self.held.swap_remove(i);
            released = true;
            match self.inner.push(request) {
                Ok(()) => pushed = true,
                Err(rejected) => {
                    let Rejected { error, request } = *rejected;
                    log::warn!("fault injection: a delayed request could not be queued: {error}");
                    self.failed.push(Completion { request, result: -libc::EIO });
                }
            }
        }
        if pushed && let Err(e) = self.inner.submit() {
            log::warn!("fault injection: submitting delayed requests failed: {e}");
        }
        // The timer that woke this reap was the earliest one's: arm the next.
        if released && let Some(next) = self.held.iter().map(|(due, _)| *due).min() {
            self.wake_at(next);
        }
    }

    /// Wakes the worker at `due` (a short-lived timer thread). One is armed only for the
    /// earliest held request, and again for the next one once it is released, so a rule
    /// that holds every request costs one sleeping thread per queue, not one per request.
    fn wake_at(&self, due: Instant) {
        let worker = self.worker.clone();
        let timer = std::thread::Builder::new().name("colo-fault-wait".into()).spawn(move || {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            worker.wake();
        });
        if let Err(e) = timer {
            log::warn!("fault injection: no timer for a delayed request ({e}); it waits for the next completion");
        }
    }
}

impl BlockQueue for FaultyQueue {
    fn push(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
        match self.plan.check(&request.op()) {
            None => self.inner.push(request),
            Some(FaultAction::Fail(errno)) => {
                self.failed.push(Completion { request, result: -errno });
                Ok(())
            }
            Some(FaultAction::Delay(delay)) => {
                let due = Instant::now() + delay;
                // A timer already armed for an earlier request wakes the worker first; the
                // release then arms the next one.
                let earliest = self.held.iter().all(|(other, _)| *other > due);
                self.held.push((due, request));
                if earliest {
                    self.wake_at(due);
                }
                Ok(())
            }
        }
    }
    fn submit(&mut self) -> Result<(), IoEngineError> {
        self.inner.submit()
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        // The worker reaps when woken, and a due request's timer wakes it.
        self.release_due();
        self.inner.reap(out);
        out.append(&mut self.failed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests a delay rule holds come back no earlier than their delay, every one of them,
    /// woken by the timers alone (one armed for the earliest held request at a time).
    #[test]
    fn delayed_requests_reach_the_disk_after_their_delay() {
        let plan = Arc::new(FaultPlan::default());
        let delay = Duration::from_millis(100);
        plan.add(FaultRule { op: FaultOp::Any, start: 0, end: u64::MAX, errno: 0, count: None, delay: Some(delay) });
        let worker = WorkerCompletions::new().unwrap();
        let mut q = FaultyQueue {
            inner: Box::new(crate::io::null::NullEngine::default()),
            plan,
            failed: Vec::new(),
            held: Vec::new(),
            worker: worker.clone(),
        };
        let start = Instant::now();
        for token in 0..3 {
            q.push(IoRequest::new(token, crate::io::OpKind::Flush, crate::io::Buffers::none())).unwrap();
        }
        let mut out = Vec::new();
        while out.len() < 3 {
            let mut pfd = libc::pollfd { fd: worker.fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1, "no timer woke the worker");
            worker.clear();
            q.reap(&mut out);
        }
        assert!(start.elapsed() >= delay, "a held request came back before its delay");
        let mut tokens: Vec<u64> = out.iter().map(|c| c.request.token).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, vec![0, 1, 2]);
        assert!(out.iter().all(|c| c.result == 0));
    }

    #[test]
    fn rules_match_ranges_kinds_and_counts() {
        let p = FaultPlan::default();
        let buf = [0u8; 4096];
        let iov = [libc::iovec { iov_base: buf.as_ptr() as *mut _, iov_len: 4096 }];
        let w = |offset| Op::Write { offset, iovecs: &iov, dsync: false };
        assert_eq!(p.check(&w(0)), None);
        p.add(FaultRule {
            op: FaultOp::Write,
            start: 8192,
            end: 8192 + 512,
            errno: libc::ENOSPC,
            count: Some(2),
            delay: None,
        });
        assert_eq!(p.check(&w(0)), None);
        assert_eq!(p.check(&Op::Read { offset: 8192, iovecs: &iov }), None);
        assert_eq!(p.check(&w(8192)), Some(FaultAction::Fail(libc::ENOSPC)));
        assert_eq!(p.check(&w(6144)), Some(FaultAction::Fail(libc::ENOSPC))); // overlaps
        assert_eq!(p.check(&w(8192)), None); // count used up
        let slow = Duration::from_millis(1500);
        p.add(FaultRule { op: FaultOp::Read, start: 0, end: 512, errno: libc::EIO, count: Some(1), delay: Some(slow) });
        assert_eq!(p.check(&Op::Read { offset: 0, iovecs: &iov }), Some(FaultAction::Delay(slow)));
        p.add(FaultRule { op: FaultOp::Any, start: 0, end: u64::MAX, errno: libc::EIO, count: None, delay: None });
        assert_eq!(p.check(&Op::Flush), Some(FaultAction::Fail(libc::EIO)));
        assert_eq!(p.check(&Op::Flush), Some(FaultAction::Fail(libc::EIO)));
        p.clear();
        assert_eq!(p.check(&Op::Flush), None);
        assert_eq!(p.injected(), 5);
        assert_eq!("write".parse::<FaultOp>(), Ok(FaultOp::Write));
        assert!(parse_errno("EPERM").is_err());
    }
}
