//! Primary mode end to end: guest writes through libblkio on a colo-blk primary, mirrored over
//! NBD to a colo-blk secondary or to qemu-nbd; link loss, hangs, resync, full initial sync,
//! continuous replication, and a misbehaving NBD server.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;

use std::time::{Duration, Instant};

use common::pair::*;
use common::*;
use serde_json::json;

/// Random-ish guest writes (offset+sequence patterns) over `size` bytes; returns the count.
fn random_writes(c: &mut Client, size: u64, n: u32, seed: u64) -> u32 {
    let mut x = seed;
    for i in 0..n {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let len = 4096 * (1 + (x >> 60)) as usize; // 4-64 KiB
        let off = ((x >> 20) % ((size - len as u64) / 4096)) * 4096;
        assert_eq!(c.write((i % 2) as usize, off, &pattern(off, len, i + 1)), 0, "guest write {i}");
    }
    n
}

#[test]
fn mirrors_to_a_colo_blk_secondary() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, sdisk, nbd) = colo_secondary(dir.path(), "32M", Some("parent0"));
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let pdisk = dir.path().join("pri.img");
    let uri = format!("nbd+unix:///parent0?socket={}", nbd.display());
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, 32 * MIB, &["--secondary", &uri]);
    // Before start nothing is forwarded.
    let mut c = Client::connect(&pri.socket, 2, false);
    assert_eq!(c.write(0, 0, &[7u8; 4096]), 0);
    assert_eq!(qmp(&pri, "query-replication", json!({})).unwrap()["forwarded-ops"], 0);
    assert_eq!(c.write_zeroes(0, 0, 4096, false), 0);
    assert_eq!(qmp(&pri, "replication-get-error", json!({})).unwrap_err(), "Block replication is not running");
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    random_writes(&mut c, 32 * MIB, 300, 1);
    assert_eq!(c.write_zeroes(1, MIB, 64 * 1024, true), 0);
    assert_eq!(c.discard(0, 2 * MIB, 64 * 1024), 0);
    assert_eq!(c.flush(0), 0);
    qmp(&pri, "replication-checkpoint", json!({})).expect("barrier");
    qmp(&pri, "replication-get-error", json!({})).expect("no error");
    same(&pdisk, &sdisk);
    let q = qmp(&pri, "query-replication", json!({})).unwrap();
    assert!(q["forwarded-ops"].as_u64().unwrap() >= 303, "{q}");
    // The secondary saw them as primary writes (copy-before-write happened).
    assert!(qmp(&sec, "query-replication", json!({})).unwrap()["cow-bytes"].as_u64().unwrap() > 0);
    // Stop: local only from now on.
    qmp(&pri, "replication-stop", json!({"failover": true})).unwrap();
    assert_eq!(c.write(0, 0, &[9u8; 4096]), 0);
    assert!(file_range(&sdisk, 0, 4096) != vec![9u8; 4096]);
}

#[test]
fn mirrors_to_qemu_nbd_and_survives_a_killed_and_hung_secondary() {
    let dir = tempfile::tempdir().unwrap();
    let (sdisk, nbd) = (dir.path().join("sec.img"), dir.path().join("nbd.sock"));
    make_disk(&sdisk, 32 * MIB, None);
    let mut qn = QemuNbd::start(&sdisk, &nbd);
    let pdisk = dir.path().join("pri.img");
    let uri = qn.uri();
    let pri = start_primary(
        tempfile::tempdir().unwrap(),
        &pdisk,
        32 * MIB,
        &["--secondary", &uri, "--secondary-timeout", "1"],
    );
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    let mut c = Client::connect(&pri.socket, 2, false);
    random_writes(&mut c, 32 * MIB, 200, 2);
    qmp(&pri, "replication-checkpoint", json!({})).unwrap();
    same(&pdisk, &sdisk);

    // Kill the secondary: guest writes keep completing, the error is recorded.
    let mut events = pri.qmp();
    drop(qn);
    let t0 = Instant::now();
    random_writes(&mut c, 32 * MIB, 100, 3);
    assert!(t0.elapsed() < Duration::from_secs(10), "guest writes stalled without the secondary");
    events.wait_event("REPLICATION_ERROR", WAIT).unwrap();
    assert_eq!(qmp(&pri, "replication-get-error", json!({})).unwrap_err(), "I/O error occurred");
    let dirty = qmp(&pri, "query-replication", json!({})).unwrap()["dirty-bytes"].as_u64().unwrap();
    assert!(dirty > 0);
    assert!(dirty < 16 * MIB, "dirty {dirty}: more than the writes since the loss");

    // Restart it: reconnect + incremental resync copies exactly the dirty bytes.
    qn = QemuNbd::start(&sdisk, &nbd);
    events.wait_event("REPLICATION_IN_SYNC", WAIT).unwrap();
    wait_until("resync", || synced(&pri));
    let q = qmp(&pri, "query-replication", json!({})).unwrap();
    assert_eq!(q["resync"]["copied-bytes"].as_u64().unwrap(), dirty, "{q}");
    same(&pdisk, &sdisk);

    // Hang it (SIGSTOP): each guest write still completes within the link timeout.
    freeze(&qn.child);
    let t0 = Instant::now();
    random_writes(&mut c, 32 * MIB, 20, 4);
    let stalled = t0.elapsed();
    assert!(stalled < Duration::from_secs(8), "guest stalled {stalled:?} behind a hung secondary");
    thaw(&qn.child);
    wait_until("resync after the hang", || synced(&pri));
    qmp(&pri, "replication-checkpoint", json!({})).unwrap();
    same(&pdisk, &sdisk);
    drop(qn);
}

#[test]
fn full_initial_sync_under_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (sdisk, nbd) = (dir.path().join("sec.img"), dir.path().join("nbd.sock"));
    make_disk(&sdisk, 32 * MIB, None);
    let pdisk = dir.path().join("pri.img");
    make_disk(&pdisk, 32 * MIB, Some(0x5a));
    let qn = QemuNbd::start(&sdisk, &nbd);
    let uri = qn.uri();
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, 32 * MIB, &[]);
    let mut c = Client::connect(&pri.socket, 2, false);
    let mut events = pri.qmp();
    qmp(&pri, "replication-start", json!({"mode": "primary", "secondary": uri, "sync": "full"})).unwrap();
    random_writes(&mut c, 32 * MIB, 400, 5);
    events.wait_event("REPLICATION_IN_SYNC", WAIT).unwrap();
    wait_until("sync", || synced(&pri));
    qmp(&pri, "replication-checkpoint", json!({})).unwrap();
    same(&pdisk, &sdisk);
    let q = qmp(&pri, "query-replication", json!({})).unwrap();
    assert!(q["resync"]["copied-bytes"].as_u64().unwrap() >= 32 * MIB, "{q}");
}

#[test]
fn failed_over_secondary_becomes_primary_for_a_new_secondary() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, sdisk, _nbd) = colo_secondary(dir.path(), "16M", None);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let mut c = Client::connect(&sec.socket, 2, false);
    random_writes(&mut c, 16 * MIB, 50, 6);
    let mut events = sec.qmp();
    qmp(&sec, "replication-stop", json!({"failover": true})).unwrap();
    events.wait_event("REPLICATION_FAILOVER_DONE", WAIT).unwrap();
    // A fresh secondary (qemu-nbd on an empty disk); the old secondary protects itself again.
    let (ndisk, nnbd) = (dir.path().join("new.img"), dir.path().join("new.sock"));
    make_disk(&ndisk, 16 * MIB, None);
    let qn = QemuNbd::start(&ndisk, &nnbd);
    qmp(&sec, "replication-start", json!({"mode": "primary", "secondary": qn.uri(), "sync": "full"})).unwrap();
    let q = qmp(&sec, "query-replication", json!({})).unwrap();
    assert_eq!(q["mode"], "primary");
    assert_eq!(q["previous"]["stage"], "done");
    random_writes(&mut c, 16 * MIB, 100, 7);
    events.wait_event("REPLICATION_IN_SYNC", WAIT).unwrap();
    wait_until("sync", || synced(&sec));
    qmp(&sec, "replication-checkpoint", json!({})).unwrap();
    same(&sdisk, &ndisk);
}

/// A fake NBD server that negotiates properly, then answers every request with a wrong
/// handle.
fn bad_server(socket: &Path, size: u64) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        let mut hello = Vec::new();
        hello.extend_from_slice(&0x4e42444d41474943u64.to_be_bytes());
        hello.extend_from_slice(&0x49484156454f5054u64.to_be_bytes());
        hello.extend_from_slice(&3u16.to_be_bytes());
        s.write_all(&hello).unwrap();
        let mut b4 = [0u8; 4];
        s.read_exact(&mut b4).unwrap();
        let reply = |opt: u32, t: u32, d: &[u8]| {
            let mut r = Vec::new();
            r.extend_from_slice(&0x3e889045565a9u64.to_be_bytes());
            r.extend_from_slice(&opt.to_be_bytes());
            r.extend_from_slice(&t.to_be_bytes());
            r.extend_from_slice(&(d.len() as u32).to_be_bytes());
            r.extend_from_slice(d);
            r
        };
        // Options until GO; anything else (the colo-blk extension) is unsupported here.
        loop {
            let mut hdr = [0u8; 16];
            s.read_exact(&mut hdr).unwrap();
            let opt = u32::from_be_bytes(hdr[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(hdr[12..16].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data).unwrap();
            if opt != 7 {
                s.write_all(&reply(opt, 0x8000_0001, &[])).unwrap();
                continue;
            }
            let mut info = vec![0u8, 0];
            info.extend_from_slice(&size.to_be_bytes());
            info.extend_from_slice(&1u16.to_be_bytes());
            s.write_all(&reply(7, 3, &info)).unwrap();
            s.write_all(&reply(7, 1, &[])).unwrap();
            break;
        }
        loop {
            let mut req = [0u8; 28];
            if s.read_exact(&mut req).is_err() {
                return;
            }
            let handle = u64::from_be_bytes(req[8..16].try_into().unwrap());
            let len = u32::from_be_bytes(req[24..28].try_into().unwrap()) as usize;
            if u16::from_be_bytes([req[6], req[7]]) == 1 {
                let mut payload = vec![0u8; len];
                if s.read_exact(&mut payload).is_err() {
                    return;
                }
            }
            let mut r = Vec::new();
            r.extend_from_slice(&0x67446698u32.to_be_bytes());
            r.extend_from_slice(&0u32.to_be_bytes());
            r.extend_from_slice(&(handle ^ 0xdead).to_be_bytes());
            if s.write_all(&r).is_err() {
                return;
            }
        }
    })
}

#[test]
fn a_misbehaving_nbd_server_breaks_the_link_not_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let nbd = dir.path().join("bad.sock");
    let server = bad_server(&nbd, 16 * MIB);
    let pdisk = dir.path().join("pri.img");
    let uri = format!("nbd+unix:///?socket={}", nbd.display());
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, 16 * MIB, &["--secondary", &uri]);
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    let mut c = Client::connect(&pri.socket, 1, false);
    for i in 0..10u64 {
        assert_eq!(c.write(0, i * 4096, &pattern(i * 4096, 4096, 1)), 0);
    }
    assert!(file_range(&pdisk, 0, 40960) == (0..10u64).flat_map(|i| pattern(i * 4096, 4096, 1)).collect::<Vec<_>>());
    assert_eq!(qmp(&pri, "replication-get-error", json!({})).unwrap_err(), "I/O error occurred");
    let q = qmp(&pri, "query-replication", json!({})).unwrap();
    assert!(q["error"].as_str().unwrap().contains("unknown handle"), "{q}");
    assert!(q["dirty-bytes"].as_u64().unwrap() >= 40960, "{q}");
    drop(server);
}

#[test]
fn start_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pdisk = dir.path().join("pri.img");
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, 16 * MIB, &[]);
    assert_eq!(
        qmp(&pri, "replication-start", json!({"mode": "secondary"})).unwrap_err(),
        "The parameter mode's value is invalid, needs 0, but got 1"
    );
    assert!(qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap_err().contains("no secondary"));
    let missing = format!("nbd+unix:///x?socket={}", dir.path().join("none.sock").display());
    let e = qmp(&pri, "replication-start", json!({"mode": "primary", "secondary": missing})).unwrap_err();
    assert!(e.contains("cannot connect"), "{e}");
    // Size mismatch is refused clearly.
    let (sdisk, nbd) = (dir.path().join("small.img"), dir.path().join("nbd.sock"));
    make_disk(&sdisk, 8 * MIB, None);
    let qn = QemuNbd::start(&sdisk, &nbd);
    let e = qmp(&pri, "replication-start", json!({"mode": "primary", "secondary": qn.uri()})).unwrap_err();
    assert!(e.contains("differs from the local disk size"), "{e}");
    assert_eq!(qmp(&pri, "query-replication", json!({})).unwrap()["stage"], "none");
    assert_eq!(
        qmp(&pri, "replication-stop", json!({"failover": false})).unwrap_err(),
        "Block replication is not running"
    );
    assert!(
        qmp(&pri, "replication-start", json!({"mode": "primary", "sync": "sometimes"})).unwrap_err().contains("sync")
    );
}

#[test]
fn direct_io_primary_full_sync_and_mirroring() {
    let dir = tempfile::tempdir().unwrap();
    let (sdisk, nbd) = (dir.path().join("sec.img"), dir.path().join("nbd.sock"));
    make_disk(&sdisk, 16 * MIB, None);
    let pdisk = dir.path().join("pri.img");
    make_disk(&pdisk, 16 * MIB, Some(0x3c));
    let qn = QemuNbd::start(&sdisk, &nbd);
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, 16 * MIB, &["--direct"]);
    let mut c = Client::connect(&pri.socket, 2, false);
    let mut events = pri.qmp();
    qmp(&pri, "replication-start", json!({"mode": "primary", "secondary": qn.uri(), "sync": "full"})).unwrap();
    random_writes(&mut c, 16 * MIB, 100, 9);
    events.wait_event("REPLICATION_IN_SYNC", WAIT).unwrap();
    wait_until("sync", || synced(&pri));
    qmp(&pri, "replication-checkpoint", json!({})).unwrap();
    qmp(&pri, "replication-get-error", json!({})).expect("no error under --direct");
    same(&pdisk, &sdisk);
}
