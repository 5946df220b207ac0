//! The replication link against hostile and broken peers, through real processes: a colo-blk
//! primary mirroring to scripted NBD servers (tests/common/hostile_secondary.rs) that complete a real
//! handshake and then never answer, or answer late with errors; link cuts under writes.

mod common;

use std::time::{Duration, Instant};

use colo_blk::nbd::wire::CMD_WRITE;
use common::hostile_secondary::{Behaviour, NbdPeer};
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
    // Data, so the resync's chunks go as WRITE payload (holes would go as WRITE_ZEROES).
    make_disk(&pdisk, size, Some(0x11));
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

/// A loop device over a file; detached on drop. `None` when this host cannot attach one.
struct LoopDev(String);

impl LoopDev {
    fn attach(file: &std::path::Path) -> Option<LoopDev> {
        let out = std::process::Command::new("losetup").args(["-f", "--show"]).arg(file).output().ok()?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !dev.is_empty()).then_some(LoopDev(dev))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn qemu_io(uri: &str, cmd: &str) {
    let out = std::process::Command::new("qemu-io").args(["-f", "raw", uri, "-c", cmd]).output().expect("qemu-io");
    assert!(out.status.success(), "qemu-io {cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Whether every byte of `v` is `b` (a readable failure instead of a dump of bytes).
fn all(v: &[u8], b: u8) -> bool {
    v.iter().all(|&x| x == b)
}

/// Issue 10 item 5: block devices as `--active`/`--hidden`. Emptying them must not truncate
/// (block devices refuse it), a failed start must not leave the crash marker behind, and
/// stale bytes left in an emptied block-device buffer must never be read.
#[test]
fn block_devices_work_as_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let (afile, hfile) = (dir.path().join("a.raw"), dir.path().join("h.raw"));
    // Stale content in both buffers: none of it may ever reach the VM or the disk.
    make_disk(&afile, size, Some(0xEE));
    make_disk(&hfile, size, Some(0xEE));
    let (Some(active), Some(hidden)) = (LoopDev::attach(&afile), LoopDev::attach(&hfile)) else {
        eprintln!("SKIP block_devices_work_as_buffers: losetup cannot attach a loop device here");
        return;
    };
    let sdisk = dir.path().join("sec.img");
    make_disk(&sdisk, size, Some(0x11));
    let nbd = dir.path().join("nbd.sock");
    let (sd, listen) = (sdisk.display().to_string(), format!("unix:{}", nbd.display()));
    let args = [
        "--replication",
        "secondary",
        "--disk",
        &sd,
        "--size",
        "8M",
        "--active",
        &active.0,
        "--hidden",
        &hidden.0,
        "--nbd-listen",
        &listen,
        "--nbd-export",
        "exp",
    ];
    let sec = Server::start(tempfile::tempdir().unwrap(), &args);
    let marker = format!("{sd}.colo-state");
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).expect("start on block-device buffers");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "replicating");
    let mut c = Client::connect(&sec.socket, 1, false);
    // Nothing written yet: every read resolves to the disk, never to the stale buffers.
    assert!(all(&c.read(0, 0, 8192).1, 0x11));
    assert_eq!(c.write(0, 0, &[0xAA; 4096]), 0);
    assert!(all(&c.read(0, 0, 4096).1, 0xAA));
    let uri = format!("nbd+unix:///exp?socket={}", nbd.display());
    qemu_io(&uri, "write -P 0xbb 65536 4096");
    // The primary's write is on the disk; the VM still sees the epoch's old data, saved
    // into the hidden block device by copy-before-write.
    assert!(all(&file_range(&sdisk, 65536, 4096), 0xBB));
    assert!(all(&c.read(0, 65536, 4096).1, 0x11), "hidden block device not read");
    // A checkpoint empties both buffers: the VM's write is dropped, the disk shows through.
    qmp(&sec, "replication-checkpoint", json!({})).expect("checkpoint on block-device buffers");
    assert!(all(&c.read(0, 0, 4096).1, 0x11), "an emptied active block device was read");
    assert!(all(&c.read(0, 65536, 4096).1, 0xBB), "an emptied hidden block device was read");
    assert_eq!(c.write(0, 8192, &[0xCC; 4096]), 0);
    qmp(&sec, "replication-stop", json!({"failover": true})).unwrap();
    wait_until("failover done", || qmp(&sec, "query-replication", json!({})).unwrap()["stage"] == "done");
    assert!(all(&file_range(&sdisk, 0, 4096), 0x11));
    assert!(all(&file_range(&sdisk, 8192, 4096), 0xCC));
    assert!(all(&file_range(&sdisk, 65536, 4096), 0xBB));
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "clean");
    drop(c);
    drop(sec);
}

/// Issue 10 item C: a failover whose commit failed must be retryable, so the only surviving
/// replica never stays half merged (its crash marker would refuse it at the next start).
#[test]
fn a_failed_failover_commit_can_be_retried() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, sdisk, nbd) = colo_secondary(dir.path(), "32M", Some("exp"));
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let mut c = Client::connect(&sec.socket, 1, false);
    assert_eq!(c.write(0, 0, &[0x5A; 65536]), 0);
    qemu_io(&format!("nbd+unix:///exp?socket={}", nbd.display()), "write -P 0xbb 1M 64k");
    let marker = format!("{}.colo-state", sdisk.display());
    let mut ev = sec.qmp();
    qmp(&sec, "replication-stop", json!({"failover": true, "x-inject-commit-error": true})).unwrap();
    ev.wait_event("REPLICATION_ERROR", WAIT).expect("error event");
    assert_eq!(qmp(&sec, "query-replication", json!({})).unwrap()["stage"], "failover-failed");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "merging");
    // Writes in failover-failed are kept (sectors in a buffer go to active).
    assert_eq!(c.write(0, 4096, &[0x77; 4096]), 0);
    // The retry merges and ends in done; the disk is the VM's view, the marker clean.
    qmp(&sec, "replication-stop", json!({"failover": true})).expect("retry the failover commit");
    ev.wait_event("REPLICATION_FAILOVER_DONE", WAIT).expect("failover done after the retry");
    let q = qmp(&sec, "query-replication", json!({})).unwrap();
    assert_eq!(q["stage"], "done", "{q}");
    assert_eq!(q["error"], Value::Null, "{q}");
    assert!(all(&file_range(&sdisk, 0, 4096), 0x5A));
    assert!(all(&file_range(&sdisk, 4096, 4096), 0x77));
    assert!(all(&file_range(&sdisk, 8192, 65536 - 8192), 0x5A));
    // The primary's write of the uncommitted epoch is rolled back from the hidden buffer.
    assert!(all(&file_range(&sdisk, MIB, 65536), 0));
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "clean");
    assert!(all(&c.read(0, 0, 4096).1, 0x5A));
}

/// A link that hangs without FIN or RST (a network partition, through a proxy that stops
/// forwarding and closes nothing): a guest write waits at most about the timeout, the link
/// is cut, the write's range is remembered; once the network heals, the primary reconnects
/// on its own, resyncs, and a checkpoint finds both disks equal.
#[test]
fn a_link_that_hangs_without_fin_is_cut_in_time_and_resynced_after_it_heals() {
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let (sec, sdisk, nbd) = colo_secondary(dir.path(), "32M", None);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy.sock"), nbd);
    let uri = format!("nbd+unix:///?socket={}", proxy.path.display());
    let pdisk = dir.path().join("pri.img");
    let pri =
        start_primary(tempfile::tempdir().unwrap(), &pdisk, size, &["--secondary", &uri, "--secondary-timeout", "2"]);
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    let mut c = Client::connect(&pri.socket, 1, false);
    assert_eq!(c.write(0, 0, &pattern(0, 65536, 1)), 0);
    let mut ev = pri.qmp();

    proxy.hang();
    let t0 = Instant::now();
    assert_eq!(c.write(0, MIB, &pattern(MIB, 65536, 2)), 0, "guest write across the partition");
    let waited = t0.elapsed();
    let down = wait_link_down(&mut ev);
    assert!(waited < Duration::from_secs(5), "guest write waited {waited:?} (timeout 2 s)");
    assert!(down["data"]["reason"].as_str().unwrap_or_default().contains("did not answer"), "{down}");
    // Writes while partitioned complete at local speed and are remembered.
    assert_eq!(c.write(0, 2 * MIB, &pattern(2 * MIB, 65536, 3)), 0);
    let q = qmp(&pri, "query-replication", json!({})).unwrap();
    assert!(q["dirty-bytes"].as_u64().unwrap() >= 2 * 65536, "{q}");

    proxy.heal();
    wait_until("the primary back in sync", || {
        let q = qmp(&pri, "query-replication", json!({})).unwrap();
        q["link"]["connected"] == true && q["dirty-bytes"] == 0
    });
    qmp(&pri, "replication-checkpoint", json!({})).unwrap();
    assert!(std::fs::read(&pdisk).unwrap() == std::fs::read(&sdisk).unwrap(), "disks differ after the partition");
}
