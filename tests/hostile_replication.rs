//! The replication link against hostile and broken peers, through real processes: a colo-blk
//! primary mirroring to scripted NBD servers (tests/common/hostile.rs) that complete a real
//! handshake and then never answer, or answer late with errors; link cuts under writes.

mod common;

use std::time::{Duration, Instant};

use colo_blk::nbd::wire::CMD_WRITE;
use common::hostile::{Behaviour, NbdPeer};
use common::pair::*;
use common::*;
use serde_json::{Value, json};

/// Waits for a `REPLICATION_LINK` event saying the link went down; returns it.
fn wait_link_down(ev: &mut colo_blk::qmp::client::QmpClient) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = ev.wait_event("REPLICATION_LINK", left).expect("no link-down event");
        if e["data"]["connected"] == false {
            return e;
        }
    }
}

/// Issue 10 item 3: a secondary that reads requests and never answers, during a full
/// resync. Every forwarded request older than `--secondary-timeout` must cut the link within
/// about the timeout — resync chunks included — and guest writes must not wait longer.
#[test]
fn a_silent_secondary_during_resync_is_cut_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let peer = NbdPeer::start(&dir.path().join("silent.sock"), size, Behaviour::Silent);
    let pdisk = dir.path().join("pri.img");
    let uri = peer.uri();
    let pri =
        start_primary(tempfile::tempdir().unwrap(), &pdisk, size, &["--secondary", &uri, "--secondary-timeout", "1"]);
    let mut c = Client::connect(&pri.socket, 2, false);
    let mut ev = pri.qmp();
    let t0 = Instant::now();
    qmp(&pri, "replication-start", json!({"mode": "primary", "sync": "full"})).unwrap();
    // The resync is under way: its first chunk reached the silent secondary.
    peer.wait_request(CMD_WRITE, WAIT);
    let tw = Instant::now();
    assert_eq!(c.write(0, 40 * MIB, &[0x5a; 4096]), 0, "guest write during the resync");
    let guest = tw.elapsed();
    let down = wait_link_down(&mut ev);
    let cut = t0.elapsed();
    assert!(down["data"]["reason"].as_str().unwrap().contains("did not answer"), "{down}");
    assert!(cut < Duration::from_secs(3), "link cut after {cut:?} (timeout 1 s)");
    assert!(guest < Duration::from_secs(3), "guest write took {guest:?} (timeout 1 s)");
    // The daemon still answers, and the guest write's range is remembered for the resync.
    let q = qmp(&pri, "query-replication", json!({})).unwrap();
    assert!(q["link"]["failures"].as_u64().unwrap() >= 1, "{q}");
    assert!(q["dirty-bytes"].as_u64().unwrap() > 0, "{q}");
}

/// Submits a guest write without waiting for it; [`complete`] reaps it.
fn submit_write(c: &mut Client, offset: u64, data: &[u8]) {
    c.buf(0, data.len()).copy_from_slice(data);
    let ptr = c.region.addr as *const u8;
    c.queues[0].write(offset, ptr, data.len(), 0, blkio::ReqFlags::empty());
    // libblkio submits queued requests in do_io; ask for no completion.
    let mut none: [std::mem::MaybeUninit<blkio::Completion>; 0] = [];
    c.queues[0].do_io(&mut none, 0, None, None).expect("submit");
}

/// Waits (bounded) for the write [`submit_write`] queued; returns its result.
fn complete(c: &mut Client) -> i32 {
    let mut done = [std::mem::MaybeUninit::uninit()];
    let mut t = WAIT;
    let n = c.queues[0].do_io(&mut done, 1, Some(&mut t), None).expect("do_io");
    assert_eq!(n, 1, "the guest write did not complete within {WAIT:?}");
    // SAFETY: do_io initialised one completion.
    unsafe { done[0].assume_init_ref() }.ret
}

/// Issue 10 item B: the barrier's "in sync" check must hold through its wait. A write in
/// flight when the checkpoint starts is answered with an error while the barrier waits for
/// it: its range is dirty again, and the barrier must fail rather than let the secondary
/// take a checkpoint that lacks the write.
#[test]
fn a_write_failing_during_the_barrier_wait_fails_the_barrier() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let behaviour = Behaviour::WriteError { error: 5, delay: Duration::from_millis(500) };
    let peer = NbdPeer::start(&dir.path().join("eio.sock"), size, behaviour);
    let pdisk = dir.path().join("pri.img");
    let uri = peer.uri();
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, size, &["--secondary", &uri]);
    let mut c = Client::connect(&pri.socket, 1, false);
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    assert_eq!(qmp(&pri, "query-replication", json!({})).unwrap()["dirty-bytes"], 0);
    submit_write(&mut c, MIB, &[0x42; 4096]);
    // The write is in flight on the link (the secondary answers it with EIO in 500 ms) when
    // the checkpoint starts: the first in-sync check passes.
    peer.wait_request(CMD_WRITE, WAIT);
    let r = qmp(&pri, "replication-checkpoint", json!({}));
    let err = r.expect_err("a checkpoint succeeded while a write it covers failed on the secondary");
    assert!(err.contains("not in sync"), "{err}");
    assert_eq!(complete(&mut c), 0, "the guest write completes with the local result");
    let q = qmp(&pri, "query-replication", json!({})).unwrap();
    assert!(q["barriers"]["failed"].as_u64().unwrap() >= 1, "{q}");
    assert!(q["failed-ops"].as_u64().unwrap() >= 1, "{q}");
}
