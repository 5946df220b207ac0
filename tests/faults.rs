//! Disk faults: a request the disk fails (EIO, ENOSPC — injected by `--x-fault-injection`'s
//! layer under the virtio device) fails for the guest with IOERR, only that request; the
//! daemon keeps serving and counts the error in `query-blockstats`.

mod common;

use common::pair::*;
use common::*;
use serde_json::json;

#[test]
fn an_injected_disk_error_fails_only_that_request_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img").display().to_string();
    let s = Server::start(tempfile::tempdir().unwrap(), &["--disk", &disk, "--size", "16M", "--x-fault-injection"]);
    let mut c = Client::connect(&s.socket, 2, false);
    assert_eq!(c.write(0, MIB, &pattern(MIB, 4096, 1)), 0);
    qmp(&s, "x-inject-fault", json!({"op": "write", "offset": MIB, "length": 4096, "errno": "EIO", "count": 1}))
        .unwrap();
    // Another range is unaffected; the faulty write fails; a retry succeeds.
    assert_eq!(c.write(1, 2 * MIB, &pattern(2 * MIB, 4096, 2)), 0);
    assert_eq!(c.write(0, MIB, &pattern(MIB, 4096, 3)), -libc::EIO);
    assert!(c.read(0, MIB, 4096).1 == pattern(MIB, 4096, 1), "the failed write changed data");
    assert_eq!(c.write(0, MIB, &pattern(MIB, 4096, 4)), 0);
    // ENOSPC on a write, EIO on a read and on a flush: each fails once, then works.
    qmp(&s, "x-inject-fault", json!({"op": "write", "errno": "ENOSPC", "count": 1})).unwrap();
    assert_eq!(c.write(1, 3 * MIB, &[7u8; 8192]), -libc::EIO);
    qmp(&s, "x-inject-fault", json!({"op": "read", "offset": MIB, "length": 1, "count": 1})).unwrap();
    assert_eq!(c.read(0, MIB, 4096).0, -libc::EIO);
    assert!(c.read(0, MIB, 4096).1 == pattern(MIB, 4096, 4));
    qmp(&s, "x-inject-fault", json!({"op": "flush", "count": 1})).unwrap();
    assert_eq!(c.flush(0), -libc::EIO);
    assert_eq!(c.flush(0), 0);
    let st = qmp(&s, "query-blockstats", json!({})).unwrap();
    assert_eq!(st["write"]["errors"], 2, "{st}");
    assert_eq!(st["read"]["errors"], 1, "{st}");
    assert_eq!(st["flush"]["errors"], 1, "{st}");
    // A standing rule until cleared; clearing reports how many requests were failed.
    qmp(&s, "x-inject-fault", json!({"op": "any", "offset": 0, "length": 512})).unwrap();
    assert_eq!(c.read(0, 0, 512).0, -libc::EIO);
    assert_eq!(c.read(0, 0, 512).0, -libc::EIO);
    assert_eq!(qmp(&s, "x-clear-faults", json!({})).unwrap()["injected"], 6);
    assert_eq!(c.read(0, 0, 512).0, 0);
    // Bad arguments change nothing.
    let e = qmp(&s, "x-inject-fault", json!({"op": "write", "errno": "EPERM"})).unwrap_err();
    assert!(e.starts_with("Parameter 'errno'"), "{e}");
    let e = qmp(&s, "x-inject-fault", json!({"op": "read", "errno": "EIO", "delay-ms": 10})).unwrap_err();
    assert_eq!(e, "Parameters 'delay-ms' and 'errno' are exclusive");
    assert_eq!(qmp(&s, "x-clear-faults", json!({})).unwrap()["injected"], 6, "a refused rule was added");
    assert_eq!(c.write(0, 0, &[1u8; 512]), 0);
}

#[test]
fn fault_injection_is_off_unless_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img").display().to_string();
    let s = Server::start(tempfile::tempdir().unwrap(), &["--disk", &disk, "--size", "16M"]);
    let e = qmp(&s, "x-inject-fault", json!({"op": "write"})).unwrap_err();
    assert_eq!(e, "fault injection is off (start with --x-fault-injection)");
}
