//! Replication with qcow2 disks (issue: "a node of the same block graph"): a qcow2 primary
//! mirrors to a qcow2 secondary (initial sync, live writes, zeroing, checkpoint) and the
//! secondary's failover commits its buffers into its qcow2 image. The images are compared
//! through QEMU's own tools afterwards.

mod common;

use std::path::Path;
use std::process::Command;

use common::pair::{MIB, qmp, synced, wait_until};
use common::{Client, Server, WAIT, pattern};
use serde_json::json;

fn qcow2(path: &Path, size: u64) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
}

/// `qemu-img compare` of two images' guest-visible content (`-U`: they may still be open).
fn compare(a: &Path, b: &Path) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2"])
        .arg(a)
        .arg(b)
        .output()
        .expect("qemu-img compare");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn check(img: &Path) {
    let out = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(img).output().expect("qemu-img check");
    assert!(out.status.success(), "qemu-img check {}: {}", img.display(), String::from_utf8_lossy(&out.stdout));
}

fn qemu_io_reads(img: &Path, offset: u64, len: u64, byte: u8) -> bool {
    let cmd = format!("read -P {byte} {offset} {len}");
    let out = Command::new("qemu-io").args(["-r", "-f", "qcow2", "-c", &cmd]).arg(img).output().expect("qemu-io");
    out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed")
}

fn stop(mut s: Server) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    let status = s.child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_qcow2_primary_mirrors_to_a_qcow2_secondary_which_fails_over_into_its_image() {
    const SIZE: u64 = 32 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let (pdisk, sdisk) = (dir.path().join("pri.qcow2"), dir.path().join("sec.qcow2"));
    qcow2(&pdisk, SIZE);
    qcow2(&sdisk, SIZE);
    let (a, h, nbd) = (dir.path().join("a.img"), dir.path().join("h.img"), dir.path().join("nbd.sock"));
    let listen = format!("unix:{}", nbd.display());
    let sd = sdisk.display().to_string();
    let (ad, hd) = (a.display().to_string(), h.display().to_string());
    let sec = Server::start(
        tempfile::tempdir().unwrap(),
        &[
            "--replication",
            "secondary",
            "--format",
            "qcow2",
            "--disk",
            &sd,
            "--active",
            &ad,
            "--hidden",
            &hd,
            "--nbd-listen",
            &listen,
            "--nbd-export",
            "parent0",
        ],
    );
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();

    let pd = pdisk.display().to_string();
    let uri = format!("nbd+unix:///parent0?socket={}", nbd.display());
    let pri = Server::start(
        tempfile::tempdir().unwrap(),
        &["--replication", "primary", "--format", "qcow2", "--disk", &pd, "--secondary", &uri, "--num-queues", "2"],
    );
    let mut c = Client::connect(&pri.socket, 2, false);
    // Data before replication starts: the initial full sync must carry it over.
    let early = pattern(3 * MIB + 4096, 2 * 65536, 1);
    assert_eq!(c.write(0, 3 * MIB + 4096, &early), 0);
    assert_eq!(c.flush(0), 0);
    qmp(&pri, "replication-start", json!({"mode": "primary", "sync": "full"})).unwrap();
    wait_until("the initial sync", || synced(&pri));

    // Live writes: allocating and overwriting, crossing cluster boundaries, zeroing.
    let mut rng = 7u64;
    for i in 0..200u32 {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let off = (rng >> 33) % (SIZE / 4096 - 16) * 4096;
        let len = 4096 * (1 + (rng >> 20) as usize % 16);
        assert_eq!(c.write((i % 2) as usize, off, &pattern(off, len, i)), 0);
    }
    assert_eq!(c.write_zeroes(1, 8 * MIB, 192 * 1024, true), 0);
    assert_eq!(c.write_zeroes(0, 9 * MIB + 4096, 8192, false), 0);
    assert_eq!(c.discard(0, 12 * MIB, 256 * 1024), 0);
    assert_eq!(c.flush(0), 0);
    qmp(&pri, "replication-checkpoint", json!({})).expect("barrier");
    wait_until("the link to drain", || synced(&pri));
    qmp(&pri, "replication-get-error", json!({})).expect("no replication error");
    let (same, why) = compare(&pdisk, &sdisk);
    assert!(same, "the qcow2 images differ after mirroring: {why}");
    // The secondary checkpoints (as COLO does once its VM loaded the primary's state): its
    // disk is now what a failover keeps.
    qmp(&sec, "replication-checkpoint", json!({})).expect("secondary checkpoint");

    // The primary goes away; the secondary VM writes into its active buffer, then fails
    // over: the buffers are committed into the qcow2 image.
    drop(c);
    stop(pri);
    let mut vm = Client::connect(&sec.socket, 1, false);
    assert_eq!(vm.write(0, 20 * MIB, &vec![0x5a; 256 * 1024]), 0);
    assert_eq!(vm.flush(0), 0);
    let mut events = sec.qmp();
    qmp(&sec, "replication-stop", json!({"failover": true})).expect("failover");
    events.wait_event("REPLICATION_FAILOVER_DONE", WAIT).expect("failover done");
    assert_eq!(qmp(&sec, "query-replication", json!({})).unwrap()["stage"], "done");
    let (r, back) = vm.read(0, 20 * MIB, 256 * 1024);
    assert_eq!((r, back.iter().all(|&b| b == 0x5a)), (0, true));
    drop(vm);
    stop(sec);

    check(&pdisk);
    check(&sdisk);
    assert!(qemu_io_reads(&sdisk, 20 * MIB, 256 * 1024, 0x5a), "the failover did not commit the VM's write");
    // Outside what the secondary VM wrote, the secondary image is the primary's: give the
    // primary the same write and the images compare equal.
    assert!(!qemu_io_reads(&pdisk, 20 * MIB, 256 * 1024, 0x5a));
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &format!("write -P 0x5a {} {}", 20 * MIB, 256 * 1024)])
        .arg(&pdisk)
        .output()
        .expect("qemu-io");
    assert!(out.status.success());
    let (same, why) = compare(&pdisk, &sdisk);
    assert!(same, "after the failover the images differ beyond the VM's write: {why}");
}
