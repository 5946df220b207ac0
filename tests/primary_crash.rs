//! Issue 15 item 1: a primary killed with writes in flight (kill -9) copies, after its
//! restart, only what may differ (`sync=incremental`: the extents of its activity log and the
//! ranges known dirty), not the whole disk, and the disks end byte-identical. Real processes:
//! a colo-blk primary and secondary, a proxy that holds the writes in flight, libblkio.

mod common;

use common::pair::*;
use common::*;
use serde_json::{Value, json};

const SIZE: u64 = 64 * MIB;

fn query(s: &Server) -> Value {
    qmp(s, "query-replication", json!({})).unwrap()
}

#[test]
fn a_killed_primary_resyncs_only_its_active_extents() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, sdisk, nbd) = colo_secondary(dir.path(), "64M", None);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy.sock"), nbd.clone());
    let pdisk = dir.path().join("pri.img");
    make_disk(&pdisk, SIZE, Some(0x5a));
    let uri = format!("nbd+unix:///?socket={}", dir.path().join("proxy.sock").display());
    let args = ["--secondary", uri.as_str(), "--secondary-timeout", "30"];
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, SIZE, &args);
    qmp(&pri, "replication-start", json!({"mode": "primary", "sync": "full"})).unwrap();
    wait_until("full sync", || synced(&pri));
    same(&pdisk, &sdisk);
    let mut c = Client::connect(&pri.socket, 1, false);
    // Mirrored writes, acknowledged by the secondary.
    for (i, off) in [3 * 4 * MIB, 10 * 4 * MIB].into_iter().enumerate() {
        assert_eq!(c.write(0, off, &pattern(off, 65536, 1 + i as u32)), 0);
    }
    wait_until("in sync", || synced(&pri));
    // A write that never reaches the secondary: the link holds it, the primary dies.
    proxy.hang();
    let offs = [5 * 4 * MIB + 4096];
    let mut writer = c;
    let held = std::thread::spawn(move || {
        // It completes locally; the mirrored half never answers.
        let _ = writer.write(0, offs[0], &pattern(offs[0], 65536, 10));
    });
    wait_until("writes held in flight", || {
        let q = query(&pri);
        q["link"]["inflight"].as_u64().unwrap_or(0) >= 1
            && file_range(&pdisk, offs[0], 65536) == pattern(offs[0], 65536, 10)
    });
    let mut pri = pri;
    pri.child.kill().unwrap();
    pri.child.wait().unwrap();
    drop(held);
    // The held data is dropped with the connection, never delivered.
    proxy.cut();
    proxy.heal();
    assert!(file_range(&sdisk, offs[0], 65536) != file_range(&pdisk, offs[0], 65536), "the test needs a difference");

    // Restart: the activity log says which extents may differ.
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, SIZE, &args);
    let q = query(&pri);
    let dirty = q["dirty-bytes"].as_u64().unwrap();
    assert!(dirty > 0 && dirty <= 4 * 4 * MIB, "dirty after the restart: {q}");
    qmp(&pri, "replication-start", json!({"mode": "primary", "sync": "incremental"})).unwrap();
    wait_until("incremental resync", || synced(&pri));
    let q = query(&pri);
    let copied = q["resync"]["copied-bytes"].as_u64().unwrap();
    assert!(copied > 0 && copied <= 4 * 4 * MIB, "copied {copied} of {SIZE}: {q}");
    same(&pdisk, &sdisk);
    assert_eq!(q["activity-log"]["dirty-extents"], 0, "{q}");
}
