//! Issue 15 item 2: diverged disks are refused. Data generations (`DISK.colo-gen`) let a
//! primary tell a secondary whose disk is an earlier state of its own (brought up to date
//! incrementally) from one with a history of its own (refused: `split brain:`, the link stays
//! down, `REPLICATION_SPLIT_BRAIN`), and `sync=full` always overwrites. Real processes: two
//! colo-blk, libblkio guests on both sides.

mod common;

use std::path::{Path, PathBuf};

use common::pair::*;
use common::*;
use serde_json::{Value, json};

fn start_pri(dir: &Path, target: &Path) -> (Server, PathBuf) {
    let pdisk = dir.join("pri.img");
    let uri = format!("nbd+unix:///?socket={}", target.display());
    (
        start_primary(
            tempfile::tempdir().unwrap(),
            &pdisk,
            16 * MIB,
            &["--secondary", &uri, "--secondary-timeout", "2"],
        ),
        pdisk,
    )
}

/// A colo-blk secondary, a proxy to it, a primary through the proxy, in sync after one
/// guest write (the guest's client returned).
fn pair_through_proxy(dir: &Path) -> (Server, PathBuf, Proxy, Server, PathBuf, Client) {
    let (sec, sdisk, nbd) = colo_secondary(dir, "16M", None);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let proxy = Proxy::start(&dir.join("proxy.sock"), nbd);
    let (pri, pdisk) = start_pri(dir, &dir.join("proxy.sock"));
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    let mut c = Client::connect(&pri.socket, 1, false);
    write(&mut c, 0, 1);
    wait_until("in sync", || synced(&pri));
    (sec, sdisk, proxy, pri, pdisk, c)
}

fn query(s: &Server) -> Value {
    qmp(s, "query-replication", json!({})).unwrap()
}

fn write(c: &mut Client, off: u64, seq: u32) -> Vec<u8> {
    let data = pattern(off, 65536, seq);
    assert_eq!(c.write(0, off, &data), 0);
    data
}

fn cp(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
}

fn gen_file(disk: &Path) -> PathBuf {
    PathBuf::from(format!("{}.colo-gen", disk.display()))
}

/// The survivor of a failover, started again by mistake as a secondary: the old primary's
/// automatic reconnect is refused (the survivor's VM writes stay), `sync=incremental` and
/// `sync=none` too; `sync=full` overwrites it and the disks end equal.
#[test]
fn a_failed_over_survivor_restarted_as_a_secondary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, sdisk, nbd) = colo_secondary(dir.path(), "16M", None);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let (pri, pdisk) = start_pri(dir.path(), &nbd);
    let mut events = pri.qmp();
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    let mut c = Client::connect(&pri.socket, 1, false);
    write(&mut c, 0, 1);
    wait_until("in sync", || synced(&pri));
    // Both sides name the same generation.
    let (pq, sq) = (query(&pri), query(&sec));
    assert_eq!(pq["generation"]["secondary"], sq["generation"]["current"], "{pq} {sq}");
    assert_ne!(sq["generation"]["current"], "unknown");

    // Failover on the secondary; its VM writes. The primary goes on alone.
    let mut sev = sec.qmp();
    qmp(&sec, "replication-stop", json!({"failover": true})).unwrap();
    sev.wait_event("REPLICATION_FAILOVER_DONE", WAIT).unwrap();
    assert_ne!(query(&sec)["generation"]["current"], sq["generation"]["current"], "failover keeps the generation");
    let mut vm = Client::connect(&sec.socket, 1, false);
    let survivor = write(&mut vm, 0, 2);
    drop(vm);
    write(&mut c, 65536, 3);
    drop(sec);

    // The survivor restarted as a secondary: the primary's reconnect is refused.
    let (sec, _, _) = colo_secondary(dir.path(), "16M", None);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let ev = events.wait_event("REPLICATION_SPLIT_BRAIN", WAIT).unwrap();
    assert!(ev["data"]["error"].as_str().unwrap().starts_with("split brain:"), "{ev}");
    let q = query(&pri);
    let err = q["error"].as_str().unwrap_or_default();
    assert!(err.starts_with("split brain:") && err.contains("history of its own"), "{q}");
    assert_eq!(q["link"]["connected"], false, "{q}");
    // The guest still runs on the primary; the survivor's data is untouched.
    write(&mut c, 131072, 4);
    assert!(file_range(&sdisk, 0, 65536) == survivor, "the refused primary wrote over the survivor");
    assert_eq!(query(&sec)["nbd"]["writes"], 0);

    // Explicit restarts: incremental and none are refused, full is accepted.
    qmp(&pri, "replication-stop", json!({"failover": false})).unwrap();
    for sync in ["incremental", "none"] {
        let e = qmp(&pri, "replication-start", json!({"mode": "primary", "sync": sync})).unwrap_err();
        assert!(e.starts_with("split brain:"), "sync={sync}: {e}");
    }
    qmp(&pri, "replication-start", json!({"mode": "primary", "sync": "full"})).unwrap();
    wait_until("full sync", || synced(&pri));
    assert_eq!(query(&pri)["error"], Value::Null);
    same(&pdisk, &sdisk);
}

/// A partition: the secondary failed over and protects itself as a primary; the old primary
/// ran alone. Served as a secondary, the old primary's disk is refused by the new primary.
#[test]
fn two_primaries_after_a_partition_refuse_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, sdisk, proxy, pri, pdisk, mut c) = pair_through_proxy(dir.path());
    // Partition; both sides go on: the old primary writes alone, the secondary fails over.
    proxy.hang();
    proxy.cut();
    write(&mut c, 65536, 2);
    wait_until("link down", || query(&pri)["link"]["connected"] == false);
    let mut sev = sec.qmp();
    qmp(&sec, "replication-stop", json!({"failover": true})).unwrap();
    sev.wait_event("REPLICATION_FAILOVER_DONE", WAIT).unwrap();
    let mut vm = Client::connect(&sec.socket, 1, false);
    write(&mut vm, 65536 * 3, 3);
    // The old primary stops; its disk is served as a secondary for the new primary.
    drop(c);
    drop(pri);
    let odir = dir.path().join("old");
    std::fs::create_dir(&odir).unwrap();
    cp(&pdisk, &odir.join("sec.img"));
    cp(&gen_file(&pdisk), &gen_file(&odir.join("sec.img")));
    let (old, odisk, onbd) = colo_secondary(&odir, "16M", None);
    qmp(&old, "replication-start", json!({"mode": "secondary"})).unwrap();
    let uri = format!("nbd+unix:///?socket={}", onbd.display());
    let e = qmp(&sec, "replication-start", json!({"mode": "primary", "secondary": uri, "sync": "incremental"}))
        .unwrap_err();
    assert!(e.starts_with("split brain:") && e.contains("history of its own"), "{e}");
    assert_eq!(query(&old)["nbd"]["writes"], 0, "the refused primary wrote");
    qmp(&sec, "replication-start", json!({"mode": "primary", "secondary": uri, "sync": "full"})).unwrap();
    wait_until("full sync", || synced(&sec));
    same(&sdisk, &odisk);
}

/// A secondary restored from a copy: a copy within the primary's change windows is brought up
/// to date (the writes after the copy are copied again, so the disks end equal — they would
/// silently differ without the windows); a copy older than the windows is refused.
#[test]
fn a_secondary_restored_from_an_old_copy_is_resynced_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, sdisk, proxy, pri, pdisk, mut c) = pair_through_proxy(dir.path());
    // A copy of the secondary, taken with it stopped.
    let copy = dir.path().join("copy.img");
    freeze(&sec.child);
    cp(&sdisk, &copy);
    cp(&gen_file(&sdisk), &gen_file(&copy));
    thaw(&sec.child);
    // More mirrored writes after the copy.
    for i in 0..8 {
        write(&mut c, (i + 1) * 1024 * 1024, 10 + i as u32);
    }
    wait_until("in sync", || synced(&pri));
    // The secondary dies and is restored from the copy.
    drop(sec);
    cp(&copy, &sdisk);
    cp(&gen_file(&copy), &gen_file(&sdisk));
    let (sec, _, _) = colo_secondary(dir.path(), "16M", None);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    wait_until("resync of the restored copy", || synced(&pri));
    assert_eq!(c.flush(0), 0);
    same(&pdisk, &sdisk);

    // Windows move on with every accepted connection: cut the link a few times.
    for _ in 0..5 {
        let before = query(&pri)["link"]["connects"].as_u64().unwrap_or(0);
        proxy.cut();
        wait_until("a reconnect", || {
            let q = query(&pri);
            q["link"]["connects"].as_u64().unwrap_or(0) > before && q["link"]["connected"] == true
        });
    }
    drop(sec);
    cp(&copy, &sdisk);
    cp(&gen_file(&copy), &gen_file(&sdisk));
    let (sec, _, _) = colo_secondary(dir.path(), "16M", None);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    wait_until("the refusal", || query(&pri)["error"].as_str().unwrap_or_default().starts_with("split brain:"));
    let q = query(&pri);
    assert!(q["error"].as_str().unwrap().contains("older state"), "{q}");
    assert_eq!(query(&sec)["nbd"]["writes"], 0, "the refused primary wrote");
}

/// A secondary re-protected from another primary (that one copied its disk with `sync=full`)
/// is no longer an earlier state of the first primary: its incremental restart is refused.
#[test]
fn a_secondary_re_protected_from_another_primary_is_refused_by_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, sdisk, nbd) = colo_secondary(dir.path(), "16M", None);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let (p1, _p1disk) = start_pri(dir.path(), &nbd);
    qmp(&p1, "replication-start", json!({"mode": "primary"})).unwrap();
    let mut c = Client::connect(&p1.socket, 1, false);
    write(&mut c, 0, 1);
    wait_until("in sync with the first primary", || synced(&p1));
    qmp(&p1, "replication-stop", json!({"failover": false})).unwrap();
    // Another primary, another disk, takes the secondary over with a full copy.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let (p2, p2disk) = start_pri(&other, &nbd);
    let mut c2 = Client::connect(&p2.socket, 1, false);
    write(&mut c2, 65536, 2);
    qmp(&p2, "replication-start", json!({"mode": "primary", "sync": "full"})).unwrap();
    wait_until("in sync with the second primary", || synced(&p2));
    qmp(&p2, "replication-stop", json!({"failover": false})).unwrap();
    same(&p2disk, &sdisk);
    // The first primary comes back incrementally: refused, the secondary keeps p2's data.
    let e = qmp(&p1, "replication-start", json!({"mode": "primary", "sync": "incremental"})).unwrap_err();
    assert!(e.starts_with("split brain:") && e.contains("history of its own"), "{e}");
    same(&p2disk, &sdisk);
}
