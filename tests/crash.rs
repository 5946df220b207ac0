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

/// The secondary's files and how to run colo-blk on them, for the commit crash tests.
struct Sec {
    dir: tempfile::TempDir,
    sd: String,
    a: String,
    h: String,
    listen: String,
}

impl Sec {
    fn new() -> Sec {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).display().to_string();
        let (sd, a, h) = (p("sec.img"), p("a.img"), p("h.img"));
        let listen = format!("unix:{}", dir.path().join("nbd.sock").display());
        // Old data on the disk, so the hidden buffer holds real bytes.
        make_disk(std::path::Path::new(&sd), 32 * MIB, Some(0x11));
        Sec { dir, sd, a, h, listen }
    }

    fn start(&self, extra: &[&str]) -> Server {
        let mut args = secondary_args(&self.sd, &self.a, &self.h, &self.listen);
        args.extend_from_slice(extra);
        Server::start(tempfile::tempdir().unwrap(), &args)
    }

    /// The primary's side: a qemu-io write over NBD.
    fn primary_write(&self, pattern: u8, offset: u64, len: u64) {
        let url = format!("nbd+unix:///colo?socket={}", self.dir.path().join("nbd.sock").display());
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", &format!("write -P {pattern} {offset} {len}"), &url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !text.contains("failed"), "qemu-io: {text}");
    }

    fn disk(&self) -> Vec<u8> {
        std::fs::read(&self.sd).unwrap()
    }
}

fn kill(s: &mut Server) {
    s.child.kill().unwrap();
    s.child.wait().unwrap();
}

fn read_all(c: &mut Client) -> Vec<u8> {
    let mut out = Vec::new();
    for o in (0..32 * MIB).step_by(8 << 20) {
        let (r, d) = c.read(0, o, 8 << 20);
        assert_eq!(r, 0, "VM read at {o}");
        out.extend_from_slice(&d);
    }
    out
}

/// VM write of `pattern(off, len, seq)`, applied to `expect` as well.
fn vm_write(c: &mut Client, expect: &mut [u8], off: u64, len: usize, seq: u32) {
    let data = pattern(off, len, seq);
    assert_eq!(c.write(0, off, &data), 0, "VM write at {off}");
    expect[off as usize..off as usize + len].copy_from_slice(&data);
}

/// Waits for the resumed commit of `s` to finish and checks the disk against `expect`.
fn commit_done_with(sec: &Sec, s: &Server, expect: &[u8]) {
    let mut events = s.qmp();
    if commit(s).0 != "done" {
        events.wait_event("REPLICATION_FAILOVER_DONE", WAIT).expect("failover done event");
    }
    assert_eq!(commit(s).0, "done");
    if let Some(i) = sec.disk().iter().zip(expect).position(|(a, b)| a != b) {
        panic!("the merged disk differs from what the VM saw at byte {i}");
    }
}

fn commit(s: &Server) -> (String, u64, u64) {
    let q = qmp(s, "query-replication", json!({})).unwrap();
    let c = &q["commit"];
    (q["stage"].as_str().unwrap().to_string(), c["done-bytes"].as_u64().unwrap(), c["total-bytes"].as_u64().unwrap())
}

/// Replicating with hidden-only data (the primary overwrote [0, 16M)) and VM data in the
/// active buffer; returns what the secondary VM sees.
fn replicate(sec: &Sec, s: &Server) -> Vec<u8> {
    qmp(s, "replication-start", json!({"mode": "secondary"})).unwrap();
    sec.primary_write(0x22, 0, 16 * MIB);
    let mut c = Client::connect(&s.socket, 1, false);
    let mut expect = read_all(&mut c);
    assert!(expect.iter().all(|&b| b == 0x11), "the VM sees the old data before the checkpoint");
    vm_write(&mut c, &mut expect, 4 * MIB, 8 << 20, 1);
    vm_write(&mut c, &mut expect, 20 * MIB, 4 << 20, 2);
    assert_eq!(c.flush(0), 0);
    assert!(read_all(&mut c) == expect);
    expect
}

/// Issue 15 item 3: colo-blk killed twice during the failover commit (once in the first
/// merge, once in the resumed one while the VM writes) finishes the commit when started
/// again, and the disk is exactly what the VM saw: the checkpoint, its writes before the
/// failover and its writes during the commit.
#[test]
fn a_failover_commit_killed_twice_resumes_and_keeps_every_vm_write() {
    let sec = Sec::new();
    let slow = ["--x-commit-delay-ms", "100"];
    let mut s = sec.start(&slow);
    let mut expect = replicate(&sec, &s);
    qmp(&s, "replication-stop", json!({"failover": true})).unwrap();
    wait_until("the first merge under way", || commit(&s).1 >= 3 * MIB);
    let (stage, done, total) = commit(&s);
    assert!(stage == "failover" && done < total, "{stage} {done}/{total}");
    kill(&mut s);
    assert_eq!(std::fs::read_to_string(format!("{}.colo-state", sec.sd)).unwrap(), "merging");
    assert!(std::path::Path::new(&format!("{}.colo-commit", sec.sd)).exists());

    // First restart: the commit resumes by itself; the VM sees the same disk, and writes.
    let mut s = sec.start(&slow);
    wait_until("the resumed merge under way", || commit(&s).1 > 0);
    assert_eq!(commit(&s).0, "failover");
    let mut c = Client::connect(&s.socket, 1, false);
    assert!(read_all(&mut c) == expect, "the resumed commit shows the VM other data");
    // Into hidden-only, active and clean sectors, merged or not yet.
    for (i, off) in [MIB, 6 * MIB, 14 * MIB + 4096, 15 * MIB, 21 * MIB, 30 * MIB].into_iter().enumerate() {
        vm_write(&mut c, &mut expect, off, 64 << 10, 10 + i as u32);
    }
    let (stage, done, total) = commit(&s);
    assert!(stage == "failover" && done < total, "the resumed merge ended too early: {stage} {done}/{total}");
    drop(c);
    kill(&mut s);

    // Second restart, full speed: the commit completes and the disk is what the VM saw.
    let s = sec.start(&[]);
    commit_done_with(&sec, &s, &expect);
    let mut c = Client::connect(&s.socket, 1, false);
    assert!(read_all(&mut c) == expect);
    assert_eq!(std::fs::read_to_string(format!("{}.colo-state", sec.sd)).unwrap(), "clean");
    assert!(!std::path::Path::new(&format!("{}.colo-commit", sec.sd)).exists(), "the journal stays");
}

/// A commit that failed (stage failover-failed) keeps VM writes to buffered sectors in the
/// active buffer; killed then, the restarted colo-blk finishes the commit with them.
#[test]
fn writes_after_a_failed_commit_survive_a_kill_and_the_resumed_commit() {
    let sec = Sec::new();
    let mut s = sec.start(&[]);
    let mut expect = replicate(&sec, &s);
    qmp(&s, "replication-stop", json!({"failover": true, "x-inject-commit-error": true})).unwrap();
    wait_until("failover-failed", || commit(&s).0 == "failover-failed");
    let mut c = Client::connect(&s.socket, 1, false);
    // Hidden-only (goes to active), active, and clean sectors (go to the disk).
    for (i, off) in [2 * MIB, 8 * MIB, 28 * MIB].into_iter().enumerate() {
        vm_write(&mut c, &mut expect, off, 128 << 10, 20 + i as u32);
    }
    assert_eq!(c.discard(0, 13 * MIB, 64 << 10), 0);
    expect[13 << 20..(13 << 20) + (64 << 10)].fill(0);
    assert!(read_all(&mut c) == expect);
    drop(c);
    kill(&mut s);

    let s = sec.start(&[]);
    commit_done_with(&sec, &s, &expect);
}

/// A commit whose journal is missing or damaged is not resumed: colo-blk refuses the disk
/// (exit 2, naming the files) until the operator restored it.
#[test]
fn a_commit_without_a_readable_journal_is_refused() {
    let sec = Sec::new();
    let mut s = sec.start(&[]);
    replicate(&sec, &s);
    qmp(&s, "replication-stop", json!({"failover": true, "x-inject-commit-error": true})).unwrap();
    wait_until("failover-failed", || commit(&s).0 == "failover-failed");
    kill(&mut s);
    let sock = sec.dir.path().join("again.sock");
    let run = || {
        let mut args = vec!["serve".to_string(), "--socket".into(), sock.display().to_string()];
        args.extend(secondary_args(&sec.sd, &sec.a, &sec.h, &sec.listen).iter().map(|s| s.to_string()));
        Command::new(env!("CARGO_BIN_EXE_colo-blk")).args(&args).output().unwrap()
    };
    let journal = format!("{}.colo-commit", sec.sd);
    // A damaged record before the last one.
    let mut bytes = std::fs::read(&journal).unwrap();
    assert!(bytes.len() >= 32 + 3 * 24, "the journal holds the base: {} bytes", bytes.len());
    bytes[32 + 24 + 10] ^= 0xff;
    std::fs::write(&journal, &bytes).unwrap();
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("half merged") && err.contains("damaged") && err.contains("colo-commit"), "{err}");
    assert!(!sock.exists(), "it listened anyway");
    // No journal at all.
    std::fs::remove_file(&journal).unwrap();
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("half merged") && err.contains("missing"), "{err}");
    // Once the operator restored the disk and removed the marker, it serves again.
    std::fs::remove_file(format!("{}.colo-state", sec.sd)).unwrap();
    let ok = sec.start(&[]);
    assert_eq!(qmp(&ok, "query-replication", json!({})).unwrap()["disk-consistent"], true);
}
