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
