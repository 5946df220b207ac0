//! A real QEMU COLO pair (QEMU 7.2 from Debian bookworm, under KVM) with one vhost-user-blk
//! disk on each side served by a colo-blk primary and secondary, the VM-stop hook, periodic
//! checkpoints, `kill -9` of the primary and failover. The guest is a boot-sector program
//! doing disk I/O through the BIOS (contrib/colo-qemu); after failover the survivor's disk
//! must match the VM state the secondary resumed with, record for record. A control run
//! without the hook (no checkpoints committed) must fail the same check.
//!
//! Needs /dev/kvm and the unpacked QEMU 7.2 (`contrib/colo-qemu/fetch-qemu72.sh`, run by
//! `.ci/run`); set COLO_BLK_SKIP_QEMU_COLO=1 to skip on a machine without them.

use std::path::Path;
use std::process::Command;

fn available() -> bool {
    if std::env::var_os("COLO_BLK_SKIP_QEMU_COLO").is_some() {
        eprintln!("COLO_BLK_SKIP_QEMU_COLO set: QEMU COLO pair skipped");
        return false;
    }
    assert!(Path::new("/dev/kvm").exists(), "no /dev/kvm (set COLO_BLK_SKIP_QEMU_COLO=1 to skip)");
    true
}

/// Runs colo-pair.sh against this build; returns (exit ok, combined output).
fn colo_pair(extra: &[&str], port: u16) -> (bool, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(root.join("contrib/colo-qemu/colo-pair.sh"))
        .arg("--colo-blk")
        .arg(env!("CARGO_BIN_EXE_colo-blk"))
        .arg("--workdir")
        .arg(work.path())
        .args(["--checkpoints", "4", "--delay", "600", "--after", "1", "--port", &port.to_string()])
        .args(extra)
        .output()
        .expect("colo-pair.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn qemu_colo_pair_survivor_disk_matches_the_resumed_vm() {
    if !available() {
        return;
    }
    let (ok, log) = colo_pair(&[], 9771);
    assert!(ok && log.contains("PASS: the survivor's disk matches"), "COLO pair failed:\n{log}");
    // Every checkpoint was committed at the secondary's device restart (none left pending).
    let line = log.lines().find(|l| l.contains("secondary colo-blk after failover")).expect("summary line");
    assert!(line.contains("\"pending-barrier\": null") && line.contains("device-start"), "{line}");
    assert!(log.contains("\"final_errors\": 0"), "the guest saw I/O errors:\n{log}");

    // Control: without the hook no checkpoint is committed, and the same check catches it.
    let (ok, log) = colo_pair(&["--no-hook"], 9772);
    assert!(!ok && log.contains("FAIL: the survivor's disk does not match"), "control run passed:\n{log}");
}
