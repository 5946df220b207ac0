//! The null engine: every operation succeeds at once and no data moves (like QEMU's `null-co`).

use std::os::fd::RawFd;

use super::{Completion, Finished, IoEngine, IoEngineError, Op, iovecs_len, result_from_len};

/// Completes every operation immediately without touching memory or disk.
#[derive(Debug, Default)]
pub struct NullEngine {
    finished: Finished,
}

impl IoEngine for NullEngine {
    unsafe fn push(&mut self, op: &Op<'_>, token: u64) -> Result<(), IoEngineError> {
        let result = match *op {
            Op::Read { iovecs, .. } | Op::Write { iovecs, .. } => result_from_len(iovecs_len(iovecs)),
            Op::Flush | Op::Discard { .. } | Op::WriteZeroes { .. } => 0,
        };
        self.finished.push(token, result);
        Ok(())
    }

    fn submit(&mut self) -> Result<(), IoEngineError> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.finished.drain_into(out);
    }

    fn notifier(&self) -> Option<RawFd> {
        None
    }
}
