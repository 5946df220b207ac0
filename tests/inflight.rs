//! Crash-safe reconnect (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): colo-blk is killed with
//! requests in flight, completed out of order; restarted, it gets the frontend's inflight
//! region back and completes every request that was in flight exactly once — the ones that
//! completed before the crash are not repeated and none is lost.

mod common;

use std::time::{Duration, Instant};

use common::frontend::{BlkFrontend, T_IN, T_OUT};
use common::pair::*;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[test]
fn requests_in_flight_at_a_crash_complete_exactly_once_after_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    // A primary whose secondary we can freeze: mirrored writes then stay in flight.
    let (sec, _sdisk, nbd) = colo_secondary(dir.path(), "16M", Some("x"));
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let pdisk = dir.path().join("pri.img");
    let uri = format!("nbd+unix:///x?socket={}", nbd.display());
    let d = pdisk.display().to_string();
    let args = [
        "--replication",
        "primary",
        "--disk",
        &d,
        "--size",
        "16M",
        "--num-queues",
        "1",
        "--secondary",
        &uri,
        "--secondary-timeout",
        "60",
    ];
    let state = tempfile::tempdir().unwrap();
    let socket = state.path().join("vhost.sock");
    let mut pri = Server::start_at(tempfile::tempdir().unwrap(), &socket, &args);
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    let mut fe = BlkFrontend::connect_inflight(&socket);
    assert_eq!(fe.io(T_OUT, 0, &pattern(0, 4096, 1)).status, 0);

    // Freeze the secondary; two writes go in flight (local half done, mirror unanswered), and
    // a read queued behind them completes first: out of order.
    freeze(&sec.child);
    let w2 = fe.queue(T_OUT, 8, &pattern(4096, 4096, 2));
    let w3 = fe.queue(T_OUT, 16, &pattern(8192, 4096, 3));
    let r = fe.queue(T_IN, 0, &[0u8; 4096]);
    fe.kick();
    let deadline = Instant::now() + T;
    while fe.mem.read_u16(0x3002) < 2 {
        assert!(Instant::now() < deadline, "the read did not complete");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(fe.result(r, 4096).data == pattern(0, 4096, 1));
    assert_eq!(
        fe.mem.read_u16(0x3002),
        2,
        "a mirrored write completed with the secondary frozen (statuses {} {}); log {:?}",
        fe.result(w2, 0).status,
        fe.result(w3, 0).status,
        pri.log()
    );

    // colo-blk dies with w2 and w3 in flight.
    pri.child.kill().unwrap();
    pri.child.wait().unwrap();
    drop(pri);
    thaw(&sec.child);
    let _keep = state;
    // The guest has nothing more to submit: no kick is pending for the restarted daemon.
    fe.clear_kick();

    // Restart (same disk, same socket) and reconnect as QEMU does.
    let again = Server::start_at(tempfile::tempdir().unwrap(), &socket, &args);
    let mut fe = fe.reconnect(&socket);
    let done = fe.wait_all(T);
    let mut heads: Vec<u16> = done.iter().map(|&(h, _)| h).collect();
    heads.sort_unstable();
    let mut want = vec![(w2 * 3) as u16, (w3 * 3) as u16];
    want.sort_unstable();
    assert_eq!(heads, want, "resubmitted completions (by head)");
    assert_eq!(fe.result(w2, 0).status, 0);
    assert_eq!(fe.result(w3, 0).status, 0);
    assert_eq!(fe.mem.read_u16(0x3002), 4, "a request completed twice or not at all");
    // The ring continues after the requests the old process had popped.
    let r2 = fe.io(T_IN, 8, &[0u8; 8192]);
    assert_eq!(r2.status, 0);
    assert!(r2.data[..4096] == pattern(4096, 4096, 2)[..] && r2.data[4096..] == pattern(8192, 4096, 3)[..]);
    assert_eq!(fe.mem.read_u16(0x3002), 5);
    assert!(again.log().iter().any(|l| l.contains("resubmitting 2 requests")), "{:?}", again.log());
}
