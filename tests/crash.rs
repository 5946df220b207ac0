//! colo-blk stopping unexpectedly (kill -9) on the secondary: mid copy-before-write while the
//! primary streams writes, and mid failover commit. On restart it never serves mixed data
//! silently: a disk that was replicating is not a checkpoint until resync + checkpoint, and a
//! half-merged disk is refused with instructions.

mod common;

use std::process::Command;

use common::pair::*;
use common::*;
use serde_json::json;

fn secondary_args<'a>(d: &'a str, a: &'a str, h: &'a str, listen: &'a str) -> Vec<&'a str> {
    vec![
        "--replication",
        "secondary",
        "--disk",
        d,
        "--size",
        "32M",
        "--active",
        a,
        "--hidden",
        h,
        "--nbd-listen",
        listen,
        "--nbd-export",
        "colo",
    ]
}

#[test]
fn secondary_killed_mid_cow_resyncs_and_refuses_failover_until_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let (sd, a, h) = (p("sec.img"), p("a.img"), p("h.img"));
    let nbd = dir.path().join("nbd.sock");
    let listen = format!("unix:{}", nbd.display());
    let mut sec = Server::start(tempfile::tempdir().unwrap(), &secondary_args(&sd, &a, &h, &listen));
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let pdisk = dir.path().join("pri.img");
    let uri = format!("nbd+unix:///colo?socket={}", nbd.display());
    let pri = start_primary(
        tempfile::tempdir().unwrap(),
        &pdisk,
        32 * MIB,
        &["--secondary", &uri, "--secondary-timeout", "1"],
    );
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    let mut c = Client::connect(&pri.socket, 2, false);
    // Writes stream in from another thread while the secondary is killed.
    let writer = std::thread::spawn(move || {
        for i in 0..400u64 {
            let off = (i * 69_632) % (30 * MIB);
            assert_eq!(c.write((i % 2) as usize, off, &pattern(off, 65536, i as u32 + 1)), 0, "guest write {i}");
        }
        c
    });
    // Kill it in the middle of the stream (copy-before-write under way).
    wait_until("copy-before-write under way", || {
        qmp(&sec, "query-replication", json!({})).unwrap()["cow-bytes"].as_u64().unwrap() > 2 * MIB
    });
    sec.child.kill().unwrap();
    sec.child.wait().unwrap();
    let mut c = writer.join().unwrap();
    assert_eq!(qmp(&pri, "replication-get-error", json!({})).unwrap_err(), "I/O error occurred");
    // A checkpoint needs a secondary in sync: refused while it is down.
    let e = qmp(&pri, "replication-checkpoint", json!({})).unwrap_err();
    assert!(e.contains("not in sync") || e.contains("link is down"), "{e}");

    // Restart: the marker says it was replicating.
    let sec = Server::start(tempfile::tempdir().unwrap(), &secondary_args(&sd, &a, &h, &listen));
    let q = qmp(&sec, "query-replication", json!({})).unwrap();
    assert_eq!(q["disk-consistent"], false, "{q}");
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let e = qmp(&sec, "replication-stop", json!({"failover": true})).unwrap_err();
    assert!(e.starts_with("The secondary disk is not consistent"), "{e}");
    assert_eq!(qmp(&sec, "query-replication", json!({})).unwrap()["stage"], "running");
    // The primary reconnects and copies what the secondary missed; then no block differs.
    wait_until("resync", || synced(&pri));
    assert_eq!(c.flush(0), 0);
    qmp(&pri, "replication-checkpoint", json!({})).unwrap();
    same(&pdisk, std::path::Path::new(&sd));
    // The checkpoint commits with the next primary write; the disk is a checkpoint again.
    assert_eq!(c.write(0, 0, &pattern(0, 4096, 999)), 0);
    let q = qmp(&sec, "query-replication", json!({})).unwrap();
    assert_eq!(q["disk-consistent"], true, "{q}");
    qmp(&sec, "replication-stop", json!({"failover": true})).unwrap();
    wait_until("failover", || qmp(&sec, "query-replication", json!({})).unwrap()["stage"] == "done");
    // Survivor = the checkpoint (the write after it is rolled back).
    let mut expect = std::fs::read(&pdisk).unwrap();
    expect[..4096].copy_from_slice(&pattern(0, 4096, 1)); // guest write 0, before the checkpoint
    assert!(std::fs::read(&sd).unwrap() == expect, "survivor differs from the checkpoint");
}

#[test]
fn a_half_merged_disk_is_refused_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let (sd, a, h) = (p("sec.img"), p("a.img"), p("h.img"));
    let listen = format!("unix:{}", dir.path().join("nbd.sock").display());
    let mut sec = Server::start(tempfile::tempdir().unwrap(), &secondary_args(&sd, &a, &h, &listen));
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let mut c = Client::connect(&sec.socket, 1, false);
    assert_eq!(c.write(0, 0, &[5u8; 65536]), 0);
    // The commit fails half way (injected), then colo-blk dies.
    qmp(&sec, "replication-stop", json!({"failover": true, "x-inject-commit-error": true})).unwrap();
    wait_until("failover-failed", || qmp(&sec, "query-replication", json!({})).unwrap()["stage"] == "failover-failed");
    drop(c);
    sec.child.kill().unwrap();
    sec.child.wait().unwrap();
    let sock = dir.path().join("again.sock");
    let run = || {
        let mut args = vec!["serve".to_string(), "--socket".into(), sock.display().to_string()];
        args.extend(secondary_args(&sd, &a, &h, &listen).iter().map(|s| s.to_string()));
        Command::new(env!("CARGO_BIN_EXE_colo-blk")).args(&args).output().unwrap()
    };
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("half merged") && err.contains("colo-state"), "{err}");
    assert!(!sock.exists(), "it listened anyway");
    // Once the operator restored the disk and removed the marker, it serves again.
    std::fs::remove_file(format!("{sd}.colo-state")).unwrap();
    let ok = Server::start(tempfile::tempdir().unwrap(), &secondary_args(&sd, &a, &h, &listen));
    assert_eq!(qmp(&ok, "query-replication", json!({})).unwrap()["disk-consistent"], true);
}
