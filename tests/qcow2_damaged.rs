//! A damaged qcow2 image (L2 entries pointing past the end of the file or into the middle of a
//! cluster, as `qemu-img check` reports them) fails the requests that touch the damaged L2
//! table with VIRTIO_BLK_S_IOERR — never data from the wrong place — while the daemon stays up
//! and keeps serving the rest of the disk.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use common::frontend::{BlkFrontend, T_IN};
use common::{Server, pattern};

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const CLUSTER: u64 = 65536;

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap())
}

/// Overwrites the L2 entry of guest cluster `index` (within the first L2 table).
fn damage_l2_entry(img: &Path, index: u64, entry: u64) {
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut header = [0u8; 104];
    f.read_exact(&mut header).unwrap();
    let l1 = be64(&header[40..48]);
    let mut e = [0u8; 8];
    f.seek(SeekFrom::Start(l1)).unwrap();
    f.read_exact(&mut e).unwrap();
    let l2 = be64(&e) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "no L2 table");
    f.seek(SeekFrom::Start(l2 + 8 * index)).unwrap();
    f.write_all(&entry.to_be_bytes()).unwrap();
}

#[test]
fn damaged_l2_entries_fail_their_requests_not_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let i = img.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["qemu-img", "create", "-q", "-f", "qcow2", i, "1G"]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 192k", "-c", "write -P 0x22 600M 64k", i]);
    // Cluster 1 past the end of the file (1 TiB), cluster 2 at an offset inside a cluster.
    damage_l2_entry(&img, 1, (1 << 63) | (1 << 40));
    damage_l2_entry(&img, 2, (1 << 63) | (3 * CLUSTER + 512));
    let size_before = std::fs::metadata(&img).unwrap().len();

    let s = Server::start(tempfile::tempdir().unwrap(), &["--disk", i, "--format", "qcow2"]);
    let mut fe = BlkFrontend::connect(&s.socket);
    // The damaged table's clusters: I/O errors, never the bytes of another place.
    for cluster in 0..3 {
        let r = fe.io(T_IN, cluster * CLUSTER / 512, &[0u8; 4096]);
        assert_eq!(r.status, S_IOERR, "cluster {cluster} of the damaged L2 table was served");
    }
    let w = pattern(CLUSTER, 4096, 9);
    assert_eq!(fe.io(common::frontend::T_OUT, CLUSTER / 512, &w).status, S_IOERR);
    // Unaffected clusters keep working, reads and writes, and the daemon is alive.
    // (Another L2 table: 600 MiB is in the second 512 MiB.)
    let far = 600 << 20;
    let r = fe.io(T_IN, far / 512, &[0u8; 4096]);
    assert_eq!((r.status, r.data == vec![0x22u8; 4096]), (S_OK, true));
    let w = pattern(far + CLUSTER, 4096, 3);
    assert_eq!(fe.io(common::frontend::T_OUT, (far + CLUSTER) / 512, &w).status, S_OK);
    let back = fe.io(T_IN, (far + CLUSTER) / 512, &[0u8; 4096]);
    assert_eq!((back.status, back.data == w), (S_OK, true));
    assert_eq!(s.qmp_ok("query-block")["size"], 1u64 << 30);
    // Nothing was written at the damaged offsets (the file did not grow towards 1 TiB).
    assert!(std::fs::metadata(&img).unwrap().len() < size_before + (1 << 30));
}
