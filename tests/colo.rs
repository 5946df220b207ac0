//! COLO checkpoint barriers end to end: a colo-blk primary with its VM-stop hook, a colo-blk
//! secondary, the barrier extension on the replication link, and every commit trigger.
//! The hook is flushed by qemu-io, exactly as QEMU flushes it when it stops the VM.

mod common;

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

/// What the secondary QEMU does at a checkpoint: stop its device, load the primary's RAM and
/// ring state, restart on the primary's index with dirty logging.
fn load_checkpoint(fs: &mut BlkFrontend, fp: &BlkFrontend, base: u16) {
    fs.stop();
    fs.mem.copy_from(&fp.mem);
    fs.adopt_ring_state(fp);
    fs.restart(base, true);
}

/// Checkpoint 1, the normal way: the primary VM writes 4 KiB at 0 and stops, the hook's
/// barrier goes out, the secondary loads and restarts (committing it), the primary resumes.
fn first_checkpoint(fp: &mut BlkFrontend, fs: &mut BlkFrontend, hook: &std::path::Path, sec: &Server) {
    assert_eq!(fp.io(T_OUT, 0, &pattern(0, 4096, 1)).status, 0);
    let base = fp.stop();
    hook_flush(hook);
    load_checkpoint(fs, fp, base);
    assert_eq!(colo_state(sec)["commits"], 1);
    fp.restart(base, true);
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
    // Through the operator's CLI, following the commit to its end.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_colo-blk"))
        .args(["ctl", "--wait", "--qmp"])
        .arg(&p.sec.qmp)
        .args(["replication-stop", "failover=true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("done: stage \"done\""), "{err}");
    let q = qmp(&p.sec, "query-replication", json!({})).unwrap();
    assert_eq!(q["stage"], "done", "{q}");
    assert_eq!(q["commit"]["done-bytes"], q["commit"]["total-bytes"], "{q}");
    assert!(q["commit"]["total-bytes"].as_u64().unwrap() >= 8192, "{q}");
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

// ---- QEMU's checkpoint message sequence, replayed by a vhost-user frontend -------------------

use common::frontend::{BlkFrontend, T_IN, T_OUT};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

#[test]
fn checkpoint_restart_sequence_keeps_the_ring_and_logs_every_page_a_read_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img").display().to_string();
    let s = Server::start(tempfile::tempdir().unwrap(), &["--disk", &disk, "--size", "16M"]);
    let mut fe = BlkFrontend::connect(&s.socket);
    for i in 0..3u64 {
        let d = fe.io(T_OUT, i * 16, &pattern(i * 8192, 8192, 1));
        assert_eq!(d.status, 0);
    }
    // Stop (SET_VRING_ENABLE 0, GET_VRING_BASE): the backend reports the next avail index.
    assert_eq!(fe.stop(), 3);
    // Nothing logged before dirty logging was asked for.
    assert!(!fe.logged(BlkFrontend::used_gpa()));
    // Restart the way QEMU does after a COLO checkpoint, with logging.
    fe.restart(3, true);
    let slot = fe.queue(T_IN, 16, &[0u8; 8192]);
    fe.kick();
    fe.wait_all(T);
    let r = fe.result(slot, 8192);
    assert_eq!(r.status, 0);
    assert!(r.data == pattern(8192, 8192, 1), "read after restart returned wrong data");
    // Every page the read wrote: both data pages, the status byte's page, the used ring.
    let gpa = BlkFrontend::data_gpa(slot);
    for (what, page) in [("data 0", gpa), ("data 1", gpa + 4096), ("status", gpa - 0x1000 + 0xF000)] {
        assert!(fe.logged(page), "{what} page {page:#x} not in the dirty log");
    }
    assert!(fe.logged(BlkFrontend::used_gpa()), "used ring not in the dirty log");
    // A page nobody wrote stays clean (the log is not simply all ones).
    assert!(!fe.logged(0x300000));
    // Another stop/start cycle continues from the same index; a restart without logging
    // (QEMU after a failover) works too.
    assert_eq!(fe.stop(), 4);
    fe.restart(4, false);
    assert_eq!(fe.io(T_OUT, 100, &pattern(100 * 512, 4096, 2)).status, 0);
    assert!(fe.io(T_IN, 100, &[0u8; 4096]).data == pattern(100 * 512, 4096, 2));
    assert_eq!(fe.stop(), 6);
}

#[test]
fn colo_checkpoint_replay_commits_at_device_start_and_failover_keeps_the_last_checkpoint() {
    let p = colo_pair();
    let mut fp = BlkFrontend::connect(&p.pri.socket);
    let mut fs = BlkFrontend::connect(&p.sec.socket);
    // Epoch 1. The primary VM writes (mirrored); the secondary VM diverges with its own write.
    let w1 = pattern(0, 8192, 11);
    for i in 0..4u64 {
        fp.queue(T_OUT, i * 16, &pattern(i * 8192, 8192, 11));
    }
    fp.kick();
    assert_eq!(fs.io(T_OUT, 1000, &pattern(1000 * 512, 4096, 12)).status, 0);
    // Checkpoint, primary side: the stop drains everything popped, mirrored copies included.
    let base = fp.stop();
    assert_eq!(fp.mem.read_u16(0x3002), base, "GET_VRING_BASE answered with requests in flight");
    for i in 0..u64::from(base) {
        assert!(file_range(&p.sdisk, i * 8192, 8192) == pattern(i * 8192, 8192, 11), "write {i} not mirrored");
    }
    hook_flush(&p.hook);
    assert_eq!(colo_state(&p.sec)["pending-barrier"], 1);
    // Secondary side: stop, load the primary's RAM, restart on the primary's index.
    fs.stop();
    fs.mem.copy_from(&fp.mem);
    fs.adopt_ring_state(&fp);
    let mut ev = p.sec.qmp();
    fs.restart(base, true);
    // SET_FEATURES with LOG_ALL committed the checkpoint before the device ran again.
    let c = colo_state(&p.sec);
    assert_eq!(c["commits"], 1, "{c}");
    assert_eq!(c["last-commit"]["trigger"], "device-start", "{c}");
    ev.wait_event("COLO_CHECKPOINT", WAIT).unwrap();
    fp.restart(base, true);
    // Requests the primary had not popped before the stop are in both rings: both sides run
    // them (the secondary's copies go to its active buffer).
    fp.wait_all(T);
    fs.wait_all(T);
    // The secondary VM sees the primary's disk, not its dropped write.
    assert!(fs.io(T_IN, 0, &[0u8; 8192]).data == w1);
    assert!(fs.io(T_IN, 1000, &[0u8; 4096]).data == vec![0u8; 4096], "dropped write still visible");
    fp.io(T_IN, 0, &[0u8; 512]);

    // Epoch 2: both VMs run; the primary stops for checkpoint 2 and dies before the
    // secondary loads it. The orchestrator fails the secondary over first.
    assert_eq!(fp.io(T_OUT, 64, &pattern(64 * 512, 4096, 21)).status, 0);
    assert_eq!(fs.io(T_OUT, 2000, &pattern(2000 * 512, 4096, 22)).status, 0);
    let _ = fp.stop();
    hook_flush(&p.hook);
    assert_eq!(colo_state(&p.sec)["pending-barrier"], 2);
    drop(fp);
    drop(p.pri);
    qmp(&p.sec, "replication-stop", json!({"failover": true})).unwrap();
    // QEMU's failover restart: no LOG_ALL, the secondary's own ring index.
    let own = fs.stop();
    fs.restart(own, false);
    ev.wait_event("REPLICATION_FAILOVER_DONE", WAIT).unwrap();
    assert_eq!(colo_state(&p.sec)["commits"], 1, "the failover restart committed barrier 2");
    // Survivor = checkpoint 1 + the secondary VM's own epoch-2 write.
    assert!(file_range(&p.sdisk, 0, 8192) == w1);
    assert!(file_range(&p.sdisk, 64 * 512, 4096) == vec![0u8; 4096], "lost checkpoint's write kept");
    assert!(file_range(&p.sdisk, 2000 * 512, 4096) == pattern(2000 * 512, 4096, 22), "VM write lost");
    assert!(fs.io(T_IN, 2000, &[0u8; 4096]).data == pattern(2000 * 512, 4096, 22));
}

/// Issue 10 item 9: a checkpoint loaded without its barrier (the hook's barrier failed or
/// was lost, and QEMU went on) leaves a secondary disk that does not match the loaded
/// checkpoint. The LOG_ALL device start that follows finds nothing pending and nothing
/// committed since the previous start: the secondary must say it is inconsistent and
/// refuse failover until a checkpoint commits again.
#[test]
fn a_checkpoint_loaded_without_its_barrier_marks_the_secondary_inconsistent() {
    let p = colo_pair();
    let mut fp = BlkFrontend::connect(&p.pri.socket);
    let mut fs = BlkFrontend::connect(&p.sec.socket);
    let consistent = |s: &Server| qmp(s, "query-replication", json!({})).unwrap()["disk-consistent"].clone();
    // Checkpoint 1, the normal way: barrier, then the secondary's restart commits it.
    first_checkpoint(&mut fp, &mut fs, &p.hook, &p.sec);
    assert_eq!(consistent(&p.sec), true);
    // Checkpoint 2 without a barrier: the primary writes, stops, its hook is never flushed
    // (the barrier is lost), and the secondary loads the checkpoint anyway.
    assert_eq!(fp.io(T_OUT, 8, &pattern(4096, 4096, 2)).status, 0);
    let base = fp.stop();
    load_checkpoint(&mut fs, &fp, base);
    assert_eq!(colo_state(&p.sec)["commits"], 1);
    assert_eq!(consistent(&p.sec), false, "a checkpoint without barrier left the disk marked consistent");
    let e = qmp(&p.sec, "replication-stop", json!({"failover": true})).unwrap_err();
    assert!(e.contains("not consistent") && e.contains("barrier never arrived"), "{e}");
    // The next checkpoint with its barrier makes it consistent again.
    fp.restart(base, true);
    assert_eq!(fp.io(T_OUT, 16, &pattern(8192, 4096, 3)).status, 0);
    let base = fp.stop();
    hook_flush(&p.hook);
    load_checkpoint(&mut fs, &fp, base);
    assert_eq!(colo_state(&p.sec)["commits"], 2);
    assert_eq!(consistent(&p.sec), true);
    assert_eq!(qmp(&p.sec, "query-replication", json!({})).unwrap()["stage"], "running");
}

/// A checkpoint on the primary while the secondary was never started (stage none) says what
/// is wrong and what to run, not an NBD error number.
#[test]
fn a_barrier_to_a_secondary_in_stage_none_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (_sec, _sdisk, nbd) = colo_secondary(dir.path(), "32M", Some("colo"));
    let pdisk = dir.path().join("pri.img");
    let uri = format!("nbd+unix:///colo?socket={}", nbd.display());
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, SIZE, &["--secondary", &uri]);
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    let e = qmp(&pri, "replication-checkpoint", json!({})).unwrap_err();
    assert!(e.contains("not replicating") && e.contains("replication-start mode=secondary"), "{e}");
    let q = qmp(&pri, "query-replication", json!({})).unwrap();
    let err = q["error"].as_str().unwrap_or_default().to_string();
    assert!(!err.contains("NBD error 108"), "{err}");
    assert!(!pri.log().iter().any(|l| l.contains("NBD error 108")), "{:?}", pri.log());
}

/// Epoch 2 of a replayed COLO pair, up to the primary's death: checkpoint 1 committed, then
/// the primary VM writes at sector 64, the secondary VM at sector 2000, the primary stops
/// (barrier 2 pending) and dies; the secondary QEMU has stopped its device to load
/// checkpoint 2 when the failover comes. Returns the secondary's frontend and the primary's
/// ring index (the loaded checkpoint's), and the directory the secondary's files live in.
type LoadWindow = (Server, std::path::PathBuf, BlkFrontend, BlkFrontend, u16, tempfile::TempDir);
fn failover_in_the_load_window(p: ColoPair) -> LoadWindow {
    let mut fp = BlkFrontend::connect(&p.pri.socket);
    let mut fs = BlkFrontend::connect(&p.sec.socket);
    first_checkpoint(&mut fp, &mut fs, &p.hook, &p.sec);
    assert_eq!(fp.io(T_OUT, 64, &pattern(64 * 512, 4096, 21)).status, 0);
    assert_eq!(fs.io(T_OUT, 2000, &pattern(2000 * 512, 4096, 22)).status, 0);
    let base = fp.stop();
    hook_flush(&p.hook);
    assert_eq!(colo_state(&p.sec)["pending-barrier"], 2);
    // The secondary QEMU stops its VM for the load, then the primary dies.
    fs.stop();
    drop(p.pri);
    qmp(&p.sec, "replication-stop", json!({"failover": true})).unwrap();
    let q = qmp(&p.sec, "query-replication", json!({})).unwrap();
    assert_eq!(q["stage"], "failover", "{q}");
    assert_eq!(q["colo"]["failover-awaits-load"], true, "{q}");
    assert_eq!(q["colo"]["pending-barrier"], 2, "{q}");
    (p.sec, p.sdisk, fs, fp, base, p._dir)
}

/// Issue 10 item 11, first order: the failover arrives in the load window and QEMU then
/// completes the load (its device restarts with dirty logging on the primary's index). The
/// VM's RAM is checkpoint 2, so the disk must be checkpoint 2: the primary's epoch-2 write
/// stays, the secondary VM's dropped write is gone.
#[test]
fn a_failover_in_the_load_window_commits_the_checkpoint_the_vm_then_loads() {
    let p = colo_pair();
    let mut ev = p.sec.qmp();
    let (sec, sdisk, mut fs, fp, base, _dir) = failover_in_the_load_window(p);
    fs.mem.copy_from(&fp.mem);
    fs.adopt_ring_state(&fp);
    fs.restart(base, true);
    let e = ev.wait_event("COLO_CHECKPOINT", WAIT).unwrap();
    assert_eq!(e["data"]["barrier"], 1, "{e}");
    let e = ev.wait_event("COLO_CHECKPOINT", WAIT).unwrap();
    assert_eq!(e["data"]["barrier"], 2, "{e}");
    assert_eq!(e["data"]["trigger"], "device-start", "{e}");
    ev.wait_event("REPLICATION_FAILOVER_DONE", WAIT).unwrap();
    let q = qmp(&sec, "query-replication", json!({})).unwrap();
    assert_eq!(q["stage"], "done", "{q}");
    assert_eq!(q["colo"]["commits"], 2, "{q}");
    assert_eq!(q["colo"]["failover-awaits-load"], false, "{q}");
    assert!(file_range(&sdisk, 0, 4096) == pattern(0, 4096, 1), "checkpoint 1 data lost");
    assert!(file_range(&sdisk, 64 * 512, 4096) == pattern(64 * 512, 4096, 21), "checkpoint 2's write rolled back");
    assert!(file_range(&sdisk, 2000 * 512, 4096) == vec![0u8; 4096], "a write the loaded RAM never made survived");
    assert!(fs.io(T_IN, 64, &[0u8; 4096]).data == pattern(64 * 512, 4096, 21));
}

/// Issue 10 item 11, second order: the failover arrives in the load window and the load
/// does not happen (QEMU resumes the VM from checkpoint 1: its device restarts without
/// dirty logging on its own index). The barrier is discarded and the merge keeps the VM's
/// own write; the primary's epoch-2 write is rolled back.
#[test]
fn a_failover_in_the_load_window_discards_the_checkpoint_the_vm_never_loaded() {
    let p = colo_pair();
    let mut ev = p.sec.qmp();
    let (sec, sdisk, mut fs, _fp, _base, _dir) = failover_in_the_load_window(p);
    let own = fs.mem.read_u16(0x3002);
    fs.restart(own, false);
    let e = ev.wait_event("COLO_BARRIER_DISCARDED", WAIT).unwrap();
    assert_eq!(e["data"]["barrier"], 2, "{e}");
    ev.wait_event("REPLICATION_FAILOVER_DONE", WAIT).unwrap();
    let q = qmp(&sec, "query-replication", json!({})).unwrap();
    assert_eq!(q["stage"], "done", "{q}");
    assert_eq!(q["colo"]["commits"], 1, "{q}");
    assert!(file_range(&sdisk, 0, 4096) == pattern(0, 4096, 1), "checkpoint 1 data lost");
    assert!(file_range(&sdisk, 64 * 512, 4096) == vec![0u8; 4096], "the unloaded checkpoint's write kept");
    assert!(file_range(&sdisk, 2000 * 512, 4096) == pattern(2000 * 512, 4096, 22), "VM write lost");
    assert!(fs.io(T_IN, 2000, &[0u8; 4096]).data == pattern(2000 * 512, 4096, 22));
}

/// Issue 10 item 10: a barrier whose flushes outlast the primary's timeout (a slow disk,
/// injected) completes only after the secondary VM loaded the checkpoint and restarted. It
/// must be refused then, not become pending: the next primary write would commit it and drop
/// the running VM's writes.
#[test]
fn a_late_barrier_never_commits_over_the_restarted_vms_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, _sdisk, nbd) = colo_secondary_with(dir.path(), "32M", Some("colo"), &["--x-fault-injection"]);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let pdisk = dir.path().join("pri.img");
    let hook = dir.path().join("hook.sock");
    let uri = format!("nbd+unix:///colo?socket={}", nbd.display());
    let hook_arg = format!("unix:{}", hook.display());
    let pri = start_primary(
        tempfile::tempdir().unwrap(),
        &pdisk,
        SIZE,
        &["--secondary", &uri, "--colo-hook", &hook_arg, "--secondary-timeout", "1"],
    );
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    let mut fp = BlkFrontend::connect(&pri.socket);
    let mut fs = BlkFrontend::connect(&sec.socket);
    let mut ev = sec.qmp();
    // Checkpoint 1, the normal way.
    first_checkpoint(&mut fp, &mut fs, &hook, &sec);

    // Checkpoint 2: the secondary's disk is slow, its barrier takes 4 s; the primary gives up
    // after 1 s (the hook never fails QEMU's flush) and QEMU's COLO goes on.
    qmp(&sec, "x-inject-fault", json!({"op": "barrier", "delay-ms": 4000, "count": 1})).unwrap();
    assert_eq!(fp.io(T_OUT, 8, &pattern(4096, 4096, 2)).status, 0);
    let base = fp.stop();
    hook_flush(&hook);
    let q = qmp(&pri, "query-replication", json!({})).unwrap();
    assert!(q["barriers"]["failed"].as_u64().unwrap() >= 1, "the primary's barrier did not time out: {q}");
    // The secondary loads checkpoint 2 while its barrier is still flushing, restarts, and
    // its VM writes and reads back its own data.
    load_checkpoint(&mut fs, &fp, base);
    assert_eq!(fs.io(T_OUT, 100, &pattern(100 * 512, 4096, 0xcc)).status, 0);
    assert!(fs.io(T_IN, 100, &[0u8; 4096]).data == pattern(100 * 512, 4096, 0xcc));
    // The late barrier completes: refused.
    let e = ev.wait_event("COLO_BARRIER_DISCARDED", WAIT).unwrap();
    assert!(e["data"]["barrier"].as_u64().unwrap() >= 2, "{e}");
    let c = colo_state(&sec);
    assert_eq!(c["pending-barrier"], Value::Null, "a late barrier became pending: {c}");
    // The primary reconnects and writes again: nothing commits, the VM's write stays.
    fp.restart(base, true);
    wait_until("the primary back in sync", || {
        let q = qmp(&pri, "query-replication", json!({})).unwrap();
        q["link"]["connected"] == true && q["dirty-bytes"] == 0
    });
    assert_eq!(fp.io(T_OUT, 4000, &pattern(4000 * 512, 4096, 3)).status, 0);
    assert!(fs.io(T_IN, 100, &[0u8; 4096]).data == pattern(100 * 512, 4096, 0xcc), "the VM's write was dropped");
    assert_eq!(colo_state(&sec)["commits"], 1, "a late barrier was committed");
}
