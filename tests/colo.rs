//! COLO checkpoint barriers end to end: a colo-blk primary with its VM-stop hook, a colo-blk
//! secondary, the barrier extension on the replication link, and every commit trigger.
//! The hook is flushed by qemu-io, exactly as QEMU flushes it when it stops the VM.

mod common;

use std::path::Path;
use std::process::Command;

use common::pair::*;
use common::*;
use serde_json::{Value, json};

const SIZE: u64 = 32 * MIB;

/// A running pair: secondary (started), primary (started, mirroring, with a hook socket).
struct ColoPair {
    sec: Server,
    pri: Server,
    sdisk: std::path::PathBuf,
    pdisk: std::path::PathBuf,
    hook: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn colo_pair() -> ColoPair {
    let dir = tempfile::tempdir().unwrap();
    let (sec, sdisk, nbd) = colo_secondary(dir.path(), "32M", Some("colo"));
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let pdisk = dir.path().join("pri.img");
    let hook = dir.path().join("hook.sock");
    let uri = format!("nbd+unix:///colo?socket={}", nbd.display());
    let hook_arg = format!("unix:{}", hook.display());
    let pri =
        start_primary(tempfile::tempdir().unwrap(), &pdisk, SIZE, &["--secondary", &uri, "--colo-hook", &hook_arg]);
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    ColoPair { sec, pri, sdisk, pdisk, hook, _dir: dir }
}

/// What QEMU does at every VM stop: flush the hook node.
fn hook_flush(hook: &Path) {
    let uri = format!("nbd+unix:///hook?socket={}", hook.display());
    let out = Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "flush"]).output().expect("qemu-io");
    assert!(out.status.success(), "qemu-io flush: {}", String::from_utf8_lossy(&out.stderr));
}

fn colo_state(sec: &Server) -> Value {
    qmp(sec, "query-replication", json!({})).unwrap()["colo"].clone()
}

#[test]
fn barrier_is_pending_until_a_primary_write_commits_it() {
    let p = colo_pair();
    let mut pc = Client::connect(&p.pri.socket, 1, false);
    let mut sc = Client::connect(&p.sec.socket, 1, false);
    assert_eq!(pc.write(0, 0, &pattern(0, 8192, 1)), 0);
    // The secondary VM writes its own data (epoch 1).
    assert_eq!(sc.write(0, MIB, &pattern(MIB, 4096, 2)), 0);

    let mut ev = p.sec.qmp();
    hook_flush(&p.hook);
    let e = ev.wait_event("COLO_BARRIER", WAIT).unwrap();
    assert_eq!(e["data"]["barrier"], 1, "{e}");
    let q = qmp(&p.pri, "query-replication", json!({})).unwrap();
    assert_eq!(q["barriers"]["sent"], 1, "{q}");
    assert!(q["barriers"]["hook-flushes"].as_u64().unwrap() >= 1, "{q}");
    assert_eq!(q["link"]["colo-barriers"], true, "{q}");
    // Pending: nothing was emptied yet, the secondary VM still sees its own write.
    let c = colo_state(&p.sec);
    assert_eq!(c["pending-barrier"], 1, "{c}");
    assert_eq!(c["commits"], 0, "{c}");
    assert!(sc.read(0, MIB, 4096).1 == pattern(MIB, 4096, 2));

    // A primary write after the barrier proves the checkpoint was loaded: commit first, then
    // apply the write (it belongs to the next epoch).
    assert_eq!(pc.write(0, 2 * MIB, &pattern(2 * MIB, 4096, 3)), 0);
    let e = ev.wait_event("COLO_CHECKPOINT", WAIT).unwrap();
    assert_eq!(e["data"]["barrier"], 1, "{e}");
    assert_eq!(e["data"]["trigger"], "primary-write", "{e}");
    let c = colo_state(&p.sec);
    assert_eq!(c["pending-barrier"], Value::Null, "{c}");
    assert_eq!(c["commits"], 1, "{c}");
    // The secondary VM now sees exactly the primary's disk...
    assert!(sc.read(0, MIB, 4096).1 == vec![0u8; 4096], "VM write not dropped");
    assert!(sc.read(0, 0, 8192).1 == pattern(0, 8192, 1));
    // ...and the post-barrier write is in the new epoch: its pre-image is in hidden, so a
    // failover now would roll it back.
    let q = qmp(&p.sec, "query-replication", json!({})).unwrap();
    assert_eq!(q["hidden-dirty-bytes"], 4096, "{q}");
    assert_eq!(q["active-dirty-bytes"], 0, "{q}");
    // Until the next checkpoint the secondary VM keeps seeing the checkpoint's data there.
    assert!(sc.read(0, 2 * MIB, 4096).1 == vec![0u8; 4096], "secondary VM saw a next-epoch write");
    assert!(file_range(&p.sdisk, 2 * MIB, 4096) == pattern(2 * MIB, 4096, 3));
}

#[test]
fn failover_with_a_pending_barrier_merges_instead_of_emptying() {
    let p = colo_pair();
    let mut pc = Client::connect(&p.pri.socket, 1, false);
    let mut sc = Client::connect(&p.sec.socket, 1, false);
    // Epoch 1: primary write A, barrier 1 committed by a later write.
    assert_eq!(pc.write(0, 0, &pattern(0, 4096, 1)), 0);
    hook_flush(&p.hook);
    assert_eq!(pc.write(0, 4096, &pattern(4096, 4096, 2)), 0);
    assert_eq!(colo_state(&p.sec)["commits"], 1);
    // Epoch 2: the secondary VM writes; the primary stops (barrier 2) and dies before the
    // secondary could load that checkpoint.
    assert_eq!(sc.write(0, MIB, &pattern(MIB, 4096, 3)), 0);
    hook_flush(&p.hook);
    assert_eq!(colo_state(&p.sec)["pending-barrier"], 2);
    drop(pc);
    drop(p.pri);
    // Failover: the secondary VM carries on from its own (pre-barrier-2) state, so its write
    // must survive and nothing may be emptied.
    let mut ev = p.sec.qmp();
    qmp(&p.sec, "replication-stop", json!({"failover": true})).unwrap();
    let e = ev.wait_event("COLO_BARRIER_DISCARDED", WAIT).unwrap();
    assert_eq!(e["data"]["barrier"], 2, "{e}");
    ev.wait_event("REPLICATION_FAILOVER_DONE", WAIT).unwrap();
    assert_eq!(colo_state(&p.sec)["commits"], 1);
    // The survivor is checkpoint 1 plus the secondary VM's own write; the primary's write
    // after barrier 1 belongs to the lost checkpoint 2 and is rolled back.
    assert!(file_range(&p.sdisk, MIB, 4096) == pattern(MIB, 4096, 3), "VM write lost");
    assert!(file_range(&p.sdisk, 0, 4096) == pattern(0, 4096, 1), "checkpoint 1 data lost");
    assert!(file_range(&p.sdisk, 4096, 4096) == vec![0u8; 4096], "epoch-2 primary write not rolled back");
    assert!(sc.read(0, MIB, 4096).1 == pattern(MIB, 4096, 3));
    let _ = &p.pdisk;
}

#[test]
fn relayed_resume_commits_only_the_named_barrier() {
    let p = colo_pair();
    let mut sc = Client::connect(&p.sec.socket, 1, false);
    assert_eq!(sc.write(0, 0, &pattern(0, 4096, 7)), 0);
    hook_flush(&p.hook);
    // A stale relay (barrier 5 never happened) changes nothing.
    qmp(&p.sec, "replication-checkpoint", json!({"barrier": 5})).unwrap();
    assert_eq!(colo_state(&p.sec)["pending-barrier"], 1);
    assert!(sc.read(0, 0, 4096).1 == pattern(0, 4096, 7));
    qmp(&p.sec, "replication-checkpoint", json!({"barrier": 1})).unwrap();
    let c = colo_state(&p.sec);
    assert_eq!(c["commits"], 1, "{c}");
    assert_eq!(c["last-commit"]["trigger"], "command", "{c}");
    assert!(sc.read(0, 0, 4096).1 == vec![0u8; 4096]);
    // Committing again is a no-op, and a bad argument is refused.
    qmp(&p.sec, "replication-checkpoint", json!({"barrier": 1})).unwrap();
    assert_eq!(colo_state(&p.sec)["commits"], 1);
    let e = qmp(&p.sec, "replication-checkpoint", json!({"barrier": "x"})).unwrap_err();
    assert_eq!(e, "Invalid parameter type for 'barrier', expected: integer");
    let e = qmp(&p.pri, "replication-checkpoint", json!({"barrier": 1})).unwrap_err();
    assert_eq!(e, "Parameter 'barrier' is only for mode secondary");
    // A flush while the VM did not run (QEMU flushes again when it closes a node) is no new
    // checkpoint; once the primary's device restarted (the VM resumed), the next one is, and
    // it commits the previous one if nothing else did.
    hook_flush(&p.hook);
    assert_eq!(colo_state(&p.sec)["barriers"], 1);
    let mut pc = Client::connect(&p.pri.socket, 1, false);
    assert_eq!(pc.write(0, 2 * MIB, &pattern(2 * MIB, 4096, 8)), 0);
    hook_flush(&p.hook);
    hook_flush(&p.hook);
    let c = colo_state(&p.sec);
    assert_eq!((c["pending-barrier"].clone(), c["barriers"].clone()), (json!(2), json!(2)), "{c}");
    drop(pc);
    let pc = Client::connect(&p.pri.socket, 1, false);
    drop(pc);
    hook_flush(&p.hook);
    let c = colo_state(&p.sec);
    assert_eq!((c["pending-barrier"].clone(), c["commits"].clone()), (json!(3), json!(2)), "{c}");
    assert_eq!(c["last-commit"]["trigger"], "next-barrier", "{c}");
}

#[test]
fn plain_nbd_secondary_gets_a_flush_and_hook_without_replication_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let (sdisk, nbd) = (dir.path().join("sec.img"), dir.path().join("nbd.sock"));
    make_disk(&sdisk, SIZE, None);
    let qn = QemuNbd::start(&sdisk, &nbd);
    let pdisk = dir.path().join("pri.img");
    let hook = dir.path().join("hook.sock");
    let uri = qn.uri();
    let hook_arg = format!("unix:{}", hook.display());
    let pri =
        start_primary(tempfile::tempdir().unwrap(), &pdisk, SIZE, &["--secondary", &uri, "--colo-hook", &hook_arg]);
    // Not replicating yet: the hook answers, no barrier is sent.
    hook_flush(&hook);
    let q = qmp(&pri, "query-replication", json!({})).unwrap();
    assert_eq!(q["barriers"]["sent"], 0, "{q}");
    assert!(q["barriers"]["hook-flushes"].as_u64().unwrap() >= 1, "{q}");
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    let mut pc = Client::connect(&pri.socket, 1, false);
    assert_eq!(pc.write(0, 0, &pattern(0, 65536, 1)), 0);
    hook_flush(&hook);
    let q = qmp(&pri, "query-replication", json!({})).unwrap();
    assert_eq!(q["link"]["colo-barriers"], false, "{q}");
    assert_eq!(q["barriers"]["sent"], 1, "{q}");
    assert_eq!(q["error"], Value::Null, "{q}");
    same(&pdisk, &sdisk);
}
