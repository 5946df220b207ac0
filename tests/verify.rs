//! Issue 15 item 4: online verify. `replication-verify` on a running primary compares every
//! block with the secondary while the guest runs — through the checksum extension with a
//! colo-blk secondary, by reading with qemu-nbd — and reports exactly the corrupted blocks;
//! `resync: true` copies them until the disks are byte-identical. Guest writes racing the
//! comparison are never reported; refusals are clear; a link that hangs or is cut ends the
//! verify with an error; a secondary answering checksums with garbage breaks the link
//! cleanly; the secondary refuses malformed checksum requests.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use colo_blk::nbd::checksum::{CHECKSUM_BLOCK, CMD_COLO_CHECKSUM, MAX_CHECKSUM_LEN, OPT_COLO_CHECKSUM, xxh64};
use colo_blk::nbd::wire::*;
use common::pair::*;
use common::*;
use serde_json::{Value, json};

const SIZE: u64 = 64 * MIB;
const BLOCK: u64 = CHECKSUM_BLOCK as u64;

/// Two disks with the same content: pattern data in a few places, holes elsewhere.
fn twin_disks(a: &Path, b: &Path, size: u64) {
    for p in [a, b] {
        make_disk(p, size, None);
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        for (i, at) in [0, 5 * MIB, 9 * MIB, 30 * MIB, size - 2 * MIB].into_iter().enumerate() {
            f.write_all_at(&pattern(at, 2 * MIB as usize, i as u32 + 1), at).unwrap();
        }
    }
}

/// Places the test corrupts on the secondary behind its back: (offset, length).
const CORRUPT: [(u64, u64); 4] = [
    (5 * MIB + 7, 1),      // one byte: one block
    (9 * MIB + 4000, 200), // across a block boundary: two blocks
    (30 * MIB, 4096),      // one whole block
    (SIZE - 10, 10),       // the last block of the disk
];

/// Flips the bits of `len` bytes at `at` of the file `path` (pwrite, behind its server).
fn corrupt(path: &Path, at: u64, len: u64) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = vec![0u8; len as usize];
    f.read_exact_at(&mut b, at).unwrap();
    b.iter_mut().for_each(|x| *x ^= 0xff);
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

/// The corrupted bytes rounded out to whole checksum blocks.
fn corrupted_block_bytes() -> u64 {
    let mut blocks: Vec<u64> = CORRUPT.iter().flat_map(|&(at, len)| at / BLOCK..(at + len).div_ceil(BLOCK)).collect();
    blocks.sort_unstable();
    blocks.dedup();
    blocks.len() as u64 * BLOCK
}

/// Runs one verify to its end: (event data, the `verify` object of query-replication).
fn verify(pri: &Server, resync: bool) -> (Value, Value) {
    let mut ev = pri.qmp();
    qmp(pri, "replication-verify", json!({"resync": resync})).unwrap();
    let e = ev.wait_event("REPLICATION_VERIFY_DONE", WAIT).unwrap();
    let q = qmp(pri, "query-replication", json!({})).unwrap();
    (e["data"].clone(), q["verify"].clone())
}

/// A verify that completed over the whole disk.
fn assert_complete(v: &Value, size: u64, method: &str) {
    assert_eq!(v["active"], false, "{v}");
    assert_eq!(v["error"], Value::Null, "{v}");
    assert_eq!(v["total-bytes"], size, "{v}");
    assert_eq!(v["done-bytes"], size, "progress reaches the total: {v}");
    assert_eq!(v["method"], method, "{v}");
    assert_eq!(v["unverified-bytes"], 0, "{v}");
}

/// Random-ish guest writes over `size` bytes.
fn random_writes(c: &mut Client, size: u64, n: u32, seed: u64) {
    let mut x = seed;
    for i in 0..n {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let len = 4096 * (1 + (x >> 60)) as usize;
        let off = ((x >> 20) % ((size - len as u64) / 4096)) * 4096;
        assert_eq!(c.write((i % 2) as usize, off, &pattern(off, len, i + 100)), 0, "guest write {i}");
    }
}

/// The corruption is found exactly, `resync` copies it, and the disks end byte-identical.
fn find_and_repair(pri: &Server, pdisk: &Path, sdisk: &Path, method: &str) {
    for &(at, len) in &CORRUPT {
        corrupt(sdisk, at, len);
    }
    let expect = corrupted_block_bytes();
    assert_eq!(expect, 5 * BLOCK);
    let (e, v) = verify(pri, false);
    assert_complete(&v, SIZE, method);
    assert_eq!(e["differing-bytes"], expect, "{e}");
    assert_eq!(v["differing-bytes"], expect, "{v}");
    // Nothing was copied without resync.
    assert_eq!(qmp(pri, "query-replication", json!({})).unwrap()["dirty-bytes"], 0);
    let (e, v) = verify(pri, true);
    assert_complete(&v, SIZE, method);
    assert_eq!(e["differing-bytes"], expect, "{e}");
    wait_until("the resync of the differing blocks", || synced(pri));
    let (e, v) = verify(pri, false);
    assert_complete(&v, SIZE, method);
    assert_eq!(e["differing-bytes"], 0, "after the resync: {e}");
    qmp(pri, "replication-checkpoint", json!({})).unwrap();
    same(pdisk, sdisk);
}

/// A colo-blk secondary (replicating) with `sdisk` prepared by the caller, and a primary
/// replicating to it with `sync: none`.
fn colo_pair(dir: &Path, extra: &[&str]) -> (Server, Server, std::path::PathBuf, std::path::PathBuf) {
    let pdisk = dir.join("pri.img");
    twin_disks(&pdisk, &dir.join("sec.img"), SIZE);
    let (sec, sdisk, nbd) = colo_secondary(dir, "64M", None);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, SIZE, extra);
    let uri = format!("nbd+unix:///?socket={}", nbd.display());
    qmp(&pri, "replication-start", json!({"mode": "primary", "secondary": uri})).unwrap();
    (sec, pri, pdisk, sdisk)
}

#[test]
fn verify_with_a_colo_blk_secondary_uses_checksums_finds_exactly_the_corruption_and_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_sec, pri, pdisk, sdisk) = colo_pair(dir.path(), &[]);
    let q = qmp(&pri, "query-replication", json!({})).unwrap();
    assert_eq!(q["verify"]["active"], false, "{q}");
    assert_eq!(q["verify"]["done-bytes"], 0, "{q}");
    let mut c = Client::connect(&pri.socket, 2, false);
    random_writes(&mut c, SIZE, 300, 7);
    // (a) In sync: nothing differs, every byte was compared, through checksums.
    let (e, v) = verify(&pri, false);
    assert_complete(&v, SIZE, "checksum");
    assert_eq!(e["differing-bytes"], 0, "{e}");
    assert_eq!(v["differing-bytes"], 0, "{v}");
    assert!(v["progress"].is_null(), "no progress once done: {v}");
    // (b) Blocks corrupted on the secondary's disk behind its back.
    find_and_repair(&pri, &pdisk, &sdisk, "checksum");
    qmp(&pri, "replication-get-error", json!({})).expect("no replication error");
    // The operator's way: `colo-blk ctl --wait` follows the verify to its end.
    corrupt(&sdisk, 40 * MIB, 1);
    for (args, code, says) in [
        (vec!["replication-verify"], 0, "verify: 4096 bytes differ, 0 unverified"),
        (vec!["replication-verify", "resync=true"], 0, "verify: 4096 bytes differ"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_colo-blk"))
            .args(["ctl", "--qmp", pri.qmp.to_str().unwrap(), "--wait"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    wait_until("the resync", || synced(&pri));
    qmp(&pri, "replication-checkpoint", json!({})).unwrap();
    same(&pdisk, &sdisk);
}

#[test]
fn verify_with_qemu_nbd_reads_and_compares_and_repairs() {
    let dir = tempfile::tempdir().unwrap();
    let (pdisk, sdisk) = (dir.path().join("pri.img"), dir.path().join("sec.img"));
    twin_disks(&pdisk, &sdisk, SIZE);
    let qn = QemuNbd::start(&sdisk, &dir.path().join("nbd.sock"));
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, SIZE, &[]);
    qmp(&pri, "replication-start", json!({"mode": "primary", "secondary": qn.uri()})).unwrap();
    let mut c = Client::connect(&pri.socket, 2, false);
    random_writes(&mut c, SIZE, 200, 9);
    let (e, v) = verify(&pri, false);
    assert_complete(&v, SIZE, "read");
    assert_eq!(e["differing-bytes"], 0, "{e}");
    find_and_repair(&pri, &pdisk, &sdisk, "read");
}

#[test]
fn guest_writes_racing_the_verify_are_never_reported_as_differences() {
    let dir = tempfile::tempdir().unwrap();
    let (_sec, pri, pdisk, sdisk) = colo_pair(dir.path(), &[]);
    racing_guest(&pri, &pdisk, &sdisk, "checksum");
}

#[test]
fn guest_writes_racing_a_read_and_compare_verify_are_never_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (pdisk, sdisk) = (dir.path().join("pri.img"), dir.path().join("sec.img"));
    twin_disks(&pdisk, &sdisk, SIZE);
    let qn = QemuNbd::start(&sdisk, &dir.path().join("nbd.sock"));
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, SIZE, &[]);
    qmp(&pri, "replication-start", json!({"mode": "primary", "secondary": qn.uri()})).unwrap();
    racing_guest(&pri, &pdisk, &sdisk, "read");
}

/// Verifies again and again while a guest writes continuously: never a difference, and at
/// least one comparison did race a write (so the race was exercised); the disks end equal.
fn racing_guest(pri: &Server, pdisk: &Path, sdisk: &Path, method: &str) {
    // A guest writing continuously: half its writes in a hot 4 MiB region, so comparisons
    // of that region race writes all the time, the rest anywhere.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let (stop2, written2, sock) = (stop.clone(), written.clone(), pri.socket.clone());
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&sock, 2, false);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut i = 0u32;
        while !stop2.load(Ordering::Relaxed) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let len = 4096 * (1 + (x >> 61)) as usize;
            let off = if i.is_multiple_of(2) {
                8 * MIB + ((x >> 20) % (4 * MIB / 4096 - 8)) * 4096
            } else {
                ((x >> 20) % ((SIZE - len as u64) / 4096)) * 4096
            };
            assert_eq!(c.write((i % 2) as usize, off, &pattern(off, len, i + 1000)), 0, "guest write {i}");
            i = i.wrapping_add(1);
            written2.fetch_add(1, Ordering::Relaxed);
        }
    });
    wait_until("the guest writing", || written.load(Ordering::Relaxed) > 100);
    let mut retried = 0;
    let mut rounds = 0;
    while rounds < 40 && (rounds < 3 || retried == 0) {
        let before = written.load(Ordering::Relaxed);
        let (e, v) = verify(pri, false);
        assert_complete(&v, SIZE, method);
        assert_eq!(e["differing-bytes"], 0, "round {rounds}: a racing write was reported: {e} {v}");
        assert!(written.load(Ordering::Relaxed) > before, "the guest did not write during round {rounds}");
        retried += v["retried-bytes"].as_u64().unwrap();
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    eprintln!(
        "{rounds} verifies under {} guest writes; {retried} bytes differed while racing and were compared again",
        written.load(Ordering::Relaxed)
    );
    assert!(retried > 0, "no comparison ever raced a guest write: the test did not test the race");
    let (e, _) = verify(pri, false);
    assert_eq!(e["differing-bytes"], 0, "{e}");
    wait_until("sync", || synced(pri));
    qmp(pri, "replication-checkpoint", json!({})).unwrap();
    same(pdisk, sdisk);
}

#[test]
fn verify_refusals_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    // Mode none.
    let d = dir.path().join("plain.img");
    let ds = d.display().to_string();
    let plain = Server::start(tempfile::tempdir().unwrap(), &["--disk", &ds, "--size", "16M"]);
    let e = qmp(&plain, "replication-verify", json!({})).unwrap_err();
    assert!(e.contains("runs on a primary") && e.contains("mode none"), "{e}");
    assert!(qmp(&plain, "replication-verify", json!({"resync": "yes"})).unwrap_err().contains("'resync'"));
    // A secondary.
    let (sec, sdisk, _nbd) = colo_secondary(dir.path(), "16M", None);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let e = qmp(&sec, "replication-verify", json!({})).unwrap_err();
    assert!(e.contains("runs on a primary") && e.contains("mode secondary"), "{e}");
    drop(sec);
    // A primary not started yet, and one whose link is down.
    let qn = QemuNbd::start(&sdisk, &dir.path().join("q.sock"));
    let pdisk = dir.path().join("pri.img");
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, 16 * MIB, &[]);
    let e = qmp(&pri, "replication-verify", json!({})).unwrap_err();
    assert!(e.contains("needs replication running") && e.contains("stage is none"), "{e}");
    qmp(&pri, "replication-start", json!({"mode": "primary", "secondary": qn.uri(), "sync": "full"})).unwrap();
    wait_until("sync", || synced(&pri));
    drop(qn);
    let mut c = Client::connect(&pri.socket, 1, false);
    assert_eq!(c.write(0, 0, &[1u8; 4096]), 0);
    wait_until("the link down", || qmp(&pri, "query-replication", json!({})).unwrap()["link"]["connected"] == false);
    let e = qmp(&pri, "replication-verify", json!({})).unwrap_err();
    assert!(e.contains("link is down"), "{e}");
    qmp(&pri, "replication-stop", json!({"failover": false})).unwrap();
    let e = qmp(&pri, "replication-verify", json!({})).unwrap_err();
    assert!(e.contains("stage is done"), "{e}");
}

#[test]
fn a_hung_or_cut_link_ends_the_verify_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let pdisk = dir.path().join("pri.img");
    twin_disks(&pdisk, &dir.path().join("sec.img"), SIZE);
    let (sec, sdisk, nbd) = colo_secondary(dir.path(), "64M", None);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy.sock"), nbd);
    let uri = format!("nbd+unix:///?socket={}", proxy.path.display());
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, SIZE, &["--secondary-timeout", "4"]);
    qmp(&pri, "replication-start", json!({"mode": "primary", "secondary": uri})).unwrap();
    let mut c = Client::connect(&pri.socket, 1, false);
    for (round, cut) in [(0u32, false), (1, true)] {
        let mut ev = pri.qmp();
        proxy.hang();
        qmp(&pri, "replication-verify", json!({})).unwrap();
        // The verify's first requests are stuck in the partition.
        wait_until("verify requests in flight", || {
            qmp(&pri, "query-replication", json!({})).unwrap()["link"]["inflight"].as_u64().unwrap() > 0
        });
        let v = qmp(&pri, "query-replication", json!({})).unwrap()["verify"].clone();
        assert_eq!(v["active"], true, "{v}");
        assert!(v["done-bytes"].as_u64().unwrap() < SIZE, "{v}");
        let e = qmp(&pri, "replication-verify", json!({"resync": true})).unwrap_err();
        assert!(e.contains("already running"), "{e}");
        let t0 = Instant::now();
        if cut {
            proxy.cut();
        }
        let done = ev.wait_event("REPLICATION_VERIFY_DONE", Duration::from_secs(20)).unwrap();
        let took = t0.elapsed();
        let err = done["data"]["error"].as_str().unwrap_or_default().to_string();
        assert!(err.contains("link went down during the verify"), "round {round}: {done}");
        if cut {
            // Ended by the cut, not by the watchdog.
            assert!(err.contains("replication link lost"), "{err}");
        } else {
            // The link's watchdog (timeout 4 s) cuts the hung link; the verify does not hang.
            assert!(err.contains("did not answer within 4s"), "{err}");
            assert!(took < Duration::from_secs(12), "{took:?}");
        }
        let q = qmp(&pri, "query-replication", json!({})).unwrap();
        assert_eq!(q["verify"]["active"], false, "{q}");
        assert_eq!(q["verify"]["error"].as_str().unwrap(), err, "{q}");
        // The guest is not affected; the link comes back once the partition heals.
        assert_eq!(c.write(0, MIB, &pattern(MIB, 4096, round + 5)), 0);
        proxy.heal();
        wait_until("reconnect and resync", || synced(&pri));
    }
    let (e, v) = verify(&pri, false);
    assert_complete(&v, SIZE, "checksum");
    assert_eq!(e["differing-bytes"], 0, "{e}");
    qmp(&pri, "replication-checkpoint", json!({})).unwrap();
    same(&pdisk, &sdisk);
}

// ---- hostile peers ------------------------------------------------------------------------

/// How the scripted secondary answers checksum requests.
#[derive(Clone, Copy, Debug)]
enum BadChecksum {
    /// One hash more than asked for.
    WrongCount,
    /// A count of 2^32-1 (must not be allocated).
    HugeCount,
    /// 16 bytes of garbage instead of a reply header.
    Garbage,
    /// The header of the first answer, then nothing more (a secondary that stalls
    /// mid-reply).
    Stall,
}

fn opt_reply(s: &mut UnixStream, opt: u32, rtype: u32, payload: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&rtype.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    s.write_all(&b).unwrap();
}

/// A scripted secondary that negotiates the COLO and checksum extensions like colo-blk
/// (keeping the data generation the primary gives it, so reconnects are accepted), answers
/// writes and barriers with success and checksum requests as `bad` says.
fn bad_checksum_server(path: &Path, size: u64, bad: BadChecksum) {
    let l = UnixListener::bind(path).unwrap();
    let generation = Arc::new(AtomicU64::new(0));
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let generation = generation.clone();
            std::thread::spawn(move || {
                let _ = serve_bad(&mut s, size, bad, &generation);
            });
        }
    });
}

fn serve_bad(s: &mut UnixStream, size: u64, bad: BadChecksum, generation: &AtomicU64) -> std::io::Result<()> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut cflags = [0u8; 4];
    s.read_exact(&mut cflags)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let mut data = vec![0u8; u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize];
        s.read_exact(&mut data)?;
        match opt {
            OPT_COLO => {
                // Last barrier, data generation, flags (continuous: the same process).
                let g = generation.load(Ordering::SeqCst);
                let mut p = 0u64.to_be_bytes().to_vec();
                p.extend_from_slice(&g.to_be_bytes());
                p.push(u8::from(g != 0));
                opt_reply(s, opt, REP_ACK, &p);
            }
            OPT_COLO_CHECKSUM => {
                let mut p = CHECKSUM_BLOCK.to_be_bytes().to_vec();
                p.extend_from_slice(&MAX_CHECKSUM_LEN.to_be_bytes());
                opt_reply(s, opt, REP_ACK, &p);
            }
            OPT_GO => {
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&(TF_HAS_FLAGS | TF_SEND_FLUSH).to_be_bytes());
                opt_reply(s, opt, REP_INFO, &info);
                opt_reply(s, opt, REP_ACK, &[]);
                break;
            }
            _ => opt_reply(s, opt, REP_ERR_UNSUP, &[]),
        }
    }
    let mut stalled = false;
    loop {
        let mut r = [0u8; REQUEST_LEN];
        s.read_exact(&mut r)?;
        if stalled {
            continue;
        }
        let req = Request::decode(&r).unwrap();
        if req.cmd == CMD_WRITE {
            let mut p = vec![0u8; req.length as usize];
            s.read_exact(&mut p)?;
        }
        if req.cmd == CMD_COLO_ADOPT {
            generation.store(req.offset, Ordering::SeqCst);
        }
        let mut out = simple_reply(0, req.handle).to_vec();
        if req.cmd == CMD_COLO_CHECKSUM {
            let count = req.length.div_ceil(CHECKSUM_BLOCK);
            match bad {
                BadChecksum::WrongCount => {
                    out.extend_from_slice(&(count + 1).to_be_bytes());
                    out.extend(std::iter::repeat_n(0u8, 8 * (count as usize + 1)));
                }
                BadChecksum::HugeCount => out.extend_from_slice(&u32::MAX.to_be_bytes()),
                BadChecksum::Garbage => out = vec![0x5a; 16],
                BadChecksum::Stall => stalled = true,
            }
        }
        s.write_all(&out)?;
    }
}

#[test]
fn a_secondary_answering_checksums_with_garbage_breaks_the_link_cleanly() {
    for (i, bad) in [BadChecksum::WrongCount, BadChecksum::HugeCount, BadChecksum::Garbage, BadChecksum::Stall]
        .into_iter()
        .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join(format!("bad{i}.sock"));
        bad_checksum_server(&sock, 16 * MIB, bad);
        let pdisk = dir.path().join("pri.img");
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let pri = start_primary(
            tempfile::tempdir().unwrap(),
            &pdisk,
            16 * MIB,
            &["--secondary", &uri, "--secondary-timeout", "2"],
        );
        qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
        let mut ev = pri.qmp();
        qmp(&pri, "replication-verify", json!({})).unwrap();
        let done = ev.wait_event("REPLICATION_VERIFY_DONE", Duration::from_secs(20)).unwrap();
        let err = done["data"]["error"].as_str().unwrap_or_default().to_string();
        assert!(err.contains("link went down during the verify"), "{bad:?}: {done}");
        let want = match bad {
            BadChecksum::WrongCount => "malformed checksum reply: 513 hashes where 512 were asked for",
            BadChecksum::HugeCount => "malformed checksum reply: 4294967295 hashes",
            BadChecksum::Garbage => "bad reply magic",
            BadChecksum::Stall => "did not answer within",
        };
        assert!(err.contains(want), "{bad:?}: {err}");
        // The process is fine and the guest too.
        let q = qmp(&pri, "query-replication", json!({})).unwrap();
        assert_eq!(q["verify"]["active"], false, "{q}");
        assert!(q["error"].as_str().unwrap().contains(want), "{bad:?}: {q}");
        let mut c = Client::connect(&pri.socket, 1, false);
        assert_eq!(c.write(0, 0, &pattern(0, 4096, 1)), 0);
        assert_eq!(file_range(&pdisk, 0, 4096), pattern(0, 4096, 1));
    }
}

/// Greets, negotiates the COLO option and (when `checksums`) the checksum option, then GO.
fn raw_client(sock: &Path, checksums: bool) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes()).unwrap();
    let option = |s: &mut UnixStream, opt: u32, data: &[u8]| -> (u32, Vec<u8>) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        s.write_all(&b).unwrap();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let rtype = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            s.read_exact(&mut d).unwrap();
            if rtype == REP_ACK || rtype & (1 << 31) != 0 {
                return (rtype, d);
            }
        }
    };
    assert_eq!(option(&mut s, OPT_COLO, &[]).0, REP_ACK);
    if checksums {
        // Malformed (a payload): refused; then the real one.
        assert_eq!(option(&mut s, OPT_COLO_CHECKSUM, &[1]).0, REP_ERR_UNSUP);
        let (rtype, ack) = option(&mut s, OPT_COLO_CHECKSUM, &[]);
        assert_eq!(rtype, REP_ACK);
        assert_eq!(ack, [CHECKSUM_BLOCK.to_be_bytes(), MAX_CHECKSUM_LEN.to_be_bytes()].concat());
    }
    assert_eq!(option(&mut s, OPT_GO, &[0, 0, 0, 0, 0, 0]).0, REP_ACK);
    s
}

fn request(s: &mut UnixStream, flags: u16, cmd: u16, handle: u64, offset: u64, length: u32) {
    s.write_all(&Request { flags, cmd, handle, offset, length }.encode()).unwrap();
}

/// Reads a checksum reply: (error, hashes).
fn checksum_reply(s: &mut UnixStream, handle: u64) -> (u32, Vec<u64>) {
    let (err, h) = common::hostile::read_reply(s);
    assert_eq!(h, handle);
    if err != 0 {
        return (err, Vec::new());
    }
    let mut c = [0u8; 4];
    s.read_exact(&mut c).unwrap();
    let mut p = vec![0u8; 8 * u32::from_be_bytes(c) as usize];
    s.read_exact(&mut p).unwrap();
    (0, p.chunks_exact(8).map(|x| u64::from_be_bytes(x.try_into().unwrap())).collect())
}

#[test]
fn the_secondary_answers_checksums_and_refuses_malformed_requests() {
    let size = 16 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let sdisk = dir.path().join("sec.img");
    make_disk(&sdisk, size, None);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&sdisk)
        .unwrap()
        .write_all_at(&pattern(MIB, 3 * MIB as usize, 4), MIB)
        .unwrap();
    let (_sec, sdisk, nbd) = colo_secondary(dir.path(), "16M", None);
    let mut s = raw_client(&nbd, true);
    // Hashes of what the disk holds, one per 4 KiB; the last block of the disk may be short.
    request(&mut s, 0, CMD_COLO_CHECKSUM, 1, MIB - 8192, 3 * 4096);
    let expect: Vec<u64> = (0..3).map(|i| xxh64(&file_range(&sdisk, MIB - 8192 + i * 4096, 4096), 0)).collect();
    assert_eq!(checksum_reply(&mut s, 1), (0, expect));
    request(&mut s, 0, CMD_COLO_CHECKSUM, 2, size - 6000, 6000);
    let expect =
        vec![xxh64(&file_range(&sdisk, size - 6000, 4096), 0), xxh64(&file_range(&sdisk, size - 1904, 1904), 0)];
    assert_eq!(checksum_reply(&mut s, 2), (0, expect));
    // The whole disk at once.
    request(&mut s, 0, CMD_COLO_CHECKSUM, 3, 0, MAX_CHECKSUM_LEN.min(size as u32));
    assert_eq!(checksum_reply(&mut s, 3).1.len(), (size / 4096) as usize);
    // Malformed: EINVAL, nothing after the header, the connection goes on.
    for (h, flags, offset, len) in [
        (10u64, 0u16, 0u64, 0u32),           // empty
        (11, 0, 0, 4097),                    // a partial block not at the end
        (12, 0, 0, MAX_CHECKSUM_LEN + 4096), // too long
        (13, 0, size - 4096, 8192),          // past the end
        (14, 0, u64::MAX - 100, 4096),       // offset + length overflows
        (15, CMD_FLAG_FUA, 0, 4096),         // a flag
        (16, 0x80, 0, 4096),                 // an unknown flag
    ] {
        request(&mut s, flags, CMD_COLO_CHECKSUM, h, offset, len);
        assert_eq!(checksum_reply(&mut s, h), (EINVAL, Vec::new()), "checksum {flags:#x} {offset}+{len}");
    }
    request(&mut s, 0, CMD_READ, 20, MIB, 4096);
    let (err, h) = common::hostile::read_reply(&mut s);
    assert_eq!((err, h), (0, 20));
    let mut data = vec![0u8; 4096];
    s.read_exact(&mut data).unwrap();
    assert!(data == pattern(MIB, 4096, 4), "the read after the refusals");
    // Without negotiating the extension: refused.
    let mut plain = raw_client(&nbd, false);
    request(&mut plain, 0, CMD_COLO_CHECKSUM, 30, 0, 4096);
    assert_eq!(checksum_reply(&mut plain, 30), (EINVAL, Vec::new()));
}
