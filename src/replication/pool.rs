//! Threads that run the secondary VM's requests while replicating.
//!
//! The buffer logic (per-sector resolution over three files, range locks, the quiesce gate) is
//! written as plain blocking code; running it on a pool instead of the queue's worker thread
//! keeps many requests in flight per queue without ever holding a lock across an asynchronous
//! boundary. A finished request is posted on its layer's lane of the worker's completions.

use std::sync::{Arc, Mutex, mpsc};

use crate::block::{Completion, IoRequest, Lane};

/// The blocking work of one request: runs it on the request's buffers, returns the result.
pub type Task = Box<dyn FnOnce(&mut IoRequest) -> i32 + Send>;

type Job = (Task, IoRequest, Arc<Lane>);

/// A fixed set of threads taking tasks from one channel.
pub struct Pool {
    tx: Mutex<mpsc::Sender<Job>>,
}

impl Pool {
    /// Starts `threads` threads.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new().name(format!("secondary-io-{i}")).spawn(move || {
                loop {
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((task, mut request, lane)) = job else { return };
                    let result = task(&mut request);
                    lane.post(Completion { request, result });
                }
            })?;
        }
        Ok(Pool { tx: Mutex::new(tx) })
    }

    /// Runs `task` on `request` on a pool thread; the completion is posted on `lane`. A
    /// request the pool cannot take (its threads are gone) comes back.
    pub fn spawn(&self, task: Task, request: IoRequest, lane: &Arc<Lane>) -> Result<(), IoRequest> {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).send((task, request, lane.clone())).map_err(|e| e.0.1)
    }
}
