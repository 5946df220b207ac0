//! The null engine: every operation succeeds at once and no data moves (like QEMU's `null-co`).

use super::{Completion, Finished, IoEngine, IoEngineError, IoRequest, OpKind, Rejected, result_from_len};

/// Completes every operation immediately without touching memory or disk.
#[derive(Debug, Default)]
pub struct NullEngine {
    finished: Finished,
}

impl IoEngine for NullEngine {
    fn push(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
        let result = match request.kind {
            OpKind::Read { .. } | OpKind::Write { .. } => result_from_len(request.bufs.len()),
            OpKind::Flush | OpKind::Discard { .. } | OpKind::WriteZeroes { .. } => 0,
        };
        self.finished.push(request, result);
        Ok(())
    }

    fn submit(&mut self) -> Result<(), IoEngineError> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.finished.drain_into(out);
    }
}
