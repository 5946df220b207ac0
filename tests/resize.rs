//! `block_resize` over QMP (design.md §7): the image grows and shrinks online, the connected
//! frontend gets VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on its backend request channel and reads
//! the new capacity with GET_CONFIG, requests follow the new end, bad input changes nothing,
//! and the command is refused while replication runs.

mod common;

use std::path::Path;
use std::time::Duration;

use common::frontend::{BACKEND_CONFIG_CHANGE_MSG, BlkFrontend, T_IN, T_OUT};
use common::pair::{MIB, colo_secondary, qmp};
use common::{Client, Server, WAIT, file_range, pattern};
use serde_json::json;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
/// vhost-user header flag NEED_REPLY.
const NEED_REPLY: u32 = 0x8;

fn serve(size: u64, extra: &[&str]) -> (Server, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let (d, sz) = (disk.display().to_string(), size.to_string());
    let mut args = vec!["--disk", d.as_str(), "--size", sz.as_str()];
    args.extend_from_slice(extra);
    (Server::start(dir, &args), disk)
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn resize(s: &Server, size: u64) -> Result<serde_json::Value, String> {
    qmp(s, "block_resize", json!({ "size": size }))
}

#[test]
fn grow_and_shrink_notify_the_frontend_and_move_the_end_of_the_disk() {
    // No ring polling: the request queued below without a kick must stay unseen until the
    // test kicks it (a polling worker picks it up at once, before the shrink).
    let (s, disk) = serve(8 * MIB, &["--poll-us", "0"]);
    let (mut fe, mut chan) = BlkFrontend::connect_backend_req(&s.socket);
    assert_eq!(fe.config_capacity(), 8 * MIB / 512);
    // Beyond the end before the resize: refused.
    let tail = pattern(12 * MIB, 4096, 1);
    assert_eq!(fe.io(T_OUT, 12 * MIB / 512, &tail).status, S_IOERR);

    // Grow: the notification arrives (no NEED_REPLY, no payload), GET_CONFIG shows the new
    // capacity, the file grew, and the grown area takes writes that reach the file.
    assert_eq!(resize(&s, 16 * MIB), Ok(json!({})));
    let msg = chan.next(WAIT).expect("no CONFIG_CHANGE_MSG after growing");
    assert_eq!(msg.request, BACKEND_CONFIG_CHANGE_MSG);
    assert_eq!(msg.flags & NEED_REPLY, 0, "{msg:?}");
    assert!(msg.payload.is_empty(), "{msg:?}");
    assert_eq!(fe.config_capacity(), 16 * MIB / 512);
    assert_eq!(file_len(&disk), 16 * MIB);
    assert_eq!(s.qmp_ok("query-block")["size"], 16 * MIB);
    assert_eq!(fe.io(T_OUT, 12 * MIB / 512, &tail).status, S_OK);
    let back = fe.io(T_IN, 12 * MIB / 512, &[0u8; 4096]);
    assert_eq!((back.status, back.data == tail), (S_OK, true));
    let last = pattern(16 * MIB - 4096, 4096, 2);
    assert_eq!(fe.io(T_OUT, (16 * MIB - 4096) / 512, &last).status, S_OK);
    assert_eq!(fe.io(T_IN, 16 * MIB / 512, &[0u8; 512]).status, S_IOERR);
    assert_eq!(file_range(&disk, 12 * MIB, 4096), tail);
    assert_eq!(file_range(&disk, 16 * MIB - 4096, 4096), last);

    // A request already in the ring (not yet kicked) beyond the coming end: after the
    // shrink it is validated against the new capacity and never re-extends the file.
    let pending = fe.queue(T_OUT, 12 * MIB / 512, &tail);

    // Shrink: notified, GET_CONFIG shows it, the file is cut, the end moved.
    assert_eq!(resize(&s, 4 * MIB), Ok(json!({})));
    let msg = chan.next(WAIT).expect("no CONFIG_CHANGE_MSG after shrinking");
    assert_eq!(msg.request, BACKEND_CONFIG_CHANGE_MSG);
    assert_eq!(fe.config_capacity(), 4 * MIB / 512);
    assert_eq!(file_len(&disk), 4 * MIB);
    fe.kick();
    fe.wait_all(WAIT);
    assert_eq!(fe.result(pending, 0).status, S_IOERR, "a write past the new end was not refused");
    assert_eq!(fe.io(T_IN, 4 * MIB / 512, &[0u8; 4096]).status, S_IOERR);
    assert_eq!(fe.io(T_IN, (4 * MIB - 512) / 512, &[0u8; 1024]).status, S_IOERR, "straddles the end");
    assert_eq!(fe.io(T_OUT, (16 * MIB - 4096) / 512, &last).status, S_IOERR);
    assert_eq!(file_len(&disk), 4 * MIB, "a refused request touched the file");
    let inside = pattern(4 * MIB - 4096, 4096, 3);
    assert_eq!(fe.io(T_OUT, (4 * MIB - 4096) / 512, &inside).status, S_OK);
    assert_eq!(file_range(&disk, 4 * MIB - 4096, 4096), inside);
    assert_eq!(s.qmp_ok("query-block")["size"], 4 * MIB);

    // Growing again reads zeroes where the cut data was (QEMU's raw shrink-then-grow).
    assert_eq!(resize(&s, 16 * MIB), Ok(json!({})));
    assert!(chan.next(WAIT).is_some());
    let back = fe.io(T_IN, 12 * MIB / 512, &[0xAAu8; 4096]);
    assert_eq!((back.status, back.data == vec![0u8; 4096]), (S_OK, true));

    // The same size again: nothing to do, nothing sent.
    assert_eq!(resize(&s, 16 * MIB), Ok(json!({})));
    assert!(chan.next(Duration::ZERO).is_none(), "a no-op resize notified the frontend");
    let stats = s.qmp_ok("query-blockstats");
    assert_eq!(stats["write"]["errors"], 0, "{stats}");
}

#[test]
fn bad_arguments_change_nothing() {
    let (s, disk) = serve(8 * MIB, &["--logical-block-size", "4096"]);
    let (mut fe, mut chan) = BlkFrontend::connect_backend_req(&s.socket);
    let cases = [
        (json!({}), "Parameter 'size' is missing"),
        (json!({"size": 0}), "expects a positive size"),
        (json!({"size": -4096}), "expects a positive size"),
        (json!({"size": "16777216"}), "expected: integer"),
        (json!({"size": 1.5e7}), "expected: integer"),
        (json!({"size": 16 * MIB + 100}), "multiple of 512"),
        (json!({"size": 16 * MIB + 512}), "multiple of the logical block size 4096"),
        (json!({"size": 1u64 << 61}), "at most"),
        (json!({"size": 16 * MIB, "node-name": "nope"}), "Cannot find node-name 'nope'"),
        (json!({"size": 16 * MIB, "device": "nope"}), "Cannot find device 'nope'"),
        (json!({"size": 16 * MIB, "grow": true}), "Parameter 'grow' is unexpected"),
    ];
    for (args, needle) in cases {
        let e = qmp(&s, "block_resize", args.clone()).expect_err(&format!("{args} accepted"));
        assert!(e.contains(needle), "{args}: {e}");
    }
    // Nothing changed, and nothing was sent: a notification goes out before the answer, so
    // it would already be waiting.
    assert!(chan.next(Duration::ZERO).is_none());
    assert_eq!(file_len(&disk), 8 * MIB);
    assert_eq!(fe.config_capacity(), 8 * MIB / 512);
    assert_eq!(s.qmp_ok("query-block")["size"], 8 * MIB);
    // QEMU's names for the one node are accepted.
    assert_eq!(qmp(&s, "block_resize", json!({"size": 16 * MIB, "node-name": "disk0"})), Ok(json!({})));
    assert_eq!(qmp(&s, "block_resize", json!({"size": 20 * MIB, "device": "disk0"})), Ok(json!({})));
    assert_eq!(file_len(&disk), 20 * MIB);
    assert!(chan.next(WAIT).is_some() && chan.next(WAIT).is_some());
    let cmds = s.qmp_ok("query-commands");
    assert!(cmds.as_array().unwrap().iter().any(|c| c["name"] == "block_resize"), "{cmds}");
}

#[test]
fn a_frontend_without_the_channel_reads_the_new_capacity_and_data_persists() {
    let (mut s, disk) = serve(8 * MIB, &["--num-queues", "2"]);
    // A frontend that did not negotiate BACKEND_REQ (libblkio does not): the resize
    // still succeeds and its next GET_CONFIG shows the new capacity.
    let mut fe = BlkFrontend::connect(&s.socket);
    assert_eq!(resize(&s, 24 * MIB), Ok(json!({})));
    assert_eq!(fe.config_capacity(), 24 * MIB / 512);
    drop(fe);
    s.wait_log("frontend disconnected");
    // libblkio connecting afterwards sees the new capacity and uses the grown area.
    let mut c = Client::connect(&s.socket, 2, false);
    assert_eq!(c.capacity, 24 * MIB);
    let data = pattern(20 * MIB, 64 << 10, 7);
    assert_eq!(c.write(1, 20 * MIB, &data), 0);
    assert_eq!(c.flush(1), 0);
    assert_eq!(c.read(0, 20 * MIB, data.len()), (0, data.clone()));
    drop(c);
    assert_eq!(file_range(&disk, 20 * MIB, data.len()), data);
    // After a restart on the same image (no --size), the daemon serves the new size.
    s.qmp().execute("quit", Default::default()).unwrap().unwrap();
    assert_eq!(s.wait_exit().code(), Some(0));
    let d = disk.display().to_string();
    let s2 = Server::start(tempfile::tempdir().unwrap(), &["--disk", &d]);
    assert_eq!(s2.qmp_ok("query-block")["size"], 24 * MIB);
    let mut c = Client::connect(&s2.socket, 1, false);
    assert_eq!(c.read(0, 20 * MIB, data.len()), (0, data));
}

#[test]
fn refused_while_replication_runs_in_replication_roles_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, sdisk, _nbd) = colo_secondary(dir.path(), "8M", None);
    let (mut fe, mut chan) = BlkFrontend::connect_backend_req(&sec.socket);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let e = resize(&sec, 16 * MIB).unwrap_err();
    assert!(e.contains("refused while replication is running (stage running)"), "{e}");
    // Failover: stage failover while it commits, done after; resizing then is refused by the
    // role (the replication maps keep the start size), never half done.
    qmp(&sec, "replication-stop", json!({"failover": true})).unwrap();
    common::pair::wait_until("failover done", || qmp(&sec, "query-replication", json!({})).unwrap()["stage"] == "done");
    let e = resize(&sec, 16 * MIB).unwrap_err();
    assert!(e.contains("not available with --replication primary or secondary"), "{e}");
    assert_eq!(file_len(&sdisk), 8 * MIB);
    assert_eq!(fe.config_capacity(), 8 * MIB / 512);
    assert!(chan.next(Duration::ZERO).is_none());
    // The device still serves.
    assert_eq!(fe.io(T_IN, 0, &[0u8; 4096]).status, S_OK);

    // A primary (stage none): refused by the role as well.
    let pdir = tempfile::tempdir().unwrap();
    let pdisk = pdir.path().join("p.img");
    let pri = common::pair::start_primary(pdir, &pdisk, 8 * MIB, &[]);
    let e = resize(&pri, 16 * MIB).unwrap_err();
    assert!(e.contains("not available with --replication"), "{e}");
    assert_eq!(file_len(&pdisk), 8 * MIB);

    // --readonly.
    let rdir = tempfile::tempdir().unwrap();
    let rdisk = rdir.path().join("ro.img");
    common::pair::make_disk(&rdisk, 8 * MIB, None);
    let d = rdisk.display().to_string();
    let ro = Server::start(tempfile::tempdir().unwrap(), &["--disk", &d, "--readonly"]);
    let e = resize(&ro, 16 * MIB).unwrap_err();
    assert!(e.contains("read-only"), "{e}");
    assert_eq!(file_len(&rdisk), 8 * MIB);
}

/// A frontend that negotiated the backend channel but never reads it cannot stall
/// `block_resize`: once its socket buffer is full the notification gives up after its send
/// deadline, the resize still succeeds, the channel is dropped (later resizes do not wait
/// again), and the device keeps serving.
#[test]
fn a_frontend_that_never_reads_its_channel_cannot_stall_block_resize() {
    let (mut s, disk) = serve(8 * MIB, &[]);
    let (mut fe, _unread) = BlkFrontend::connect_backend_req_with(&s.socket, Some(1));
    let mut stalled = None;
    for i in 1..=2000u64 {
        let t = std::time::Instant::now();
        assert_eq!(resize(&s, 8 * MIB + i * 4096), Ok(json!({})), "resize {i}");
        if t.elapsed() >= Duration::from_secs(1) {
            stalled = Some((i, t.elapsed()));
            break;
        }
    }
    let (i, took) = stalled.expect("the channel never filled up");
    assert!(took < Duration::from_secs(10), "resize {i} took {took:?}");
    s.wait_log("cannot notify the frontend of the new capacity");
    let t = std::time::Instant::now();
    assert_eq!(resize(&s, 32 * MIB), Ok(json!({})));
    assert!(t.elapsed() < Duration::from_secs(1), "a dropped channel was waited on again");
    s.wait_log("no backend request channel");
    assert_eq!(file_len(&disk), 32 * MIB);
    assert_eq!(fe.config_capacity(), 32 * MIB / 512);
    assert_eq!(fe.io(T_IN, (32 * MIB - 4096) / 512, &[0u8; 4096]).status, S_OK);
}

/// A loop device over a file; detached on drop. `None` when this host cannot attach one.
struct LoopDev(String);

impl LoopDev {
    fn attach(file: &Path) -> Option<LoopDev> {
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

/// A block device's size is the device's own: block_resize refuses it and changes nothing.
#[test]
fn a_block_device_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backing.raw");
    common::pair::make_disk(&file, 8 * MIB, None);
    let Some(dev) = LoopDev::attach(&file) else {
        eprintln!("SKIP a_block_device_is_refused: losetup cannot attach a loop device here");
        return;
    };
    let s = Server::start(tempfile::tempdir().unwrap(), &["--disk", &dev.0]);
    let (mut fe, mut chan) = BlkFrontend::connect_backend_req(&s.socket);
    let e = resize(&s, 16 * MIB).unwrap_err();
    assert!(e.contains(&format!("{} is a block device", dev.0)), "{e}");
    assert_eq!(fe.config_capacity(), 8 * MIB / 512);
    assert!(chan.next(Duration::ZERO).is_none());
    assert_eq!(s.qmp_ok("query-block")["size"], 8 * MIB);
    assert_eq!(file_len(&file), 8 * MIB);
    assert_eq!(fe.io(T_IN, 0, &[0u8; 4096]).status, S_OK);
}

/// Resizes while a frontend writes all over the old and new ends: once a shrink has been
/// answered, no write beyond the new end succeeds until the next grow starts, and after the
/// last shrink the file has exactly the new size (no write validated against the old
/// capacity landed after the cut and extended it again).
#[test]
fn writes_racing_with_resizes_never_pass_the_end() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let (big, small) = (16 * MIB, 4 * MIB);
    let (s, disk) = serve(big, &["--num-queues", "2"]);
    // Phases: odd while the disk may be big (from just before a grow is sent), even from a
    // shrink's answer on. A write submitted and completed within one even phase must not
    // succeed past `small`.
    let phase = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (p2, stop2, sock) = (phase.clone(), stop.clone(), s.socket.clone());
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&sock, 2, false);
        ready_tx.send(()).unwrap();
        let (mut ok_beyond, mut refused, mut n) = (0u64, 0u64, 0u64);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        while !stop2.load(Ordering::Acquire) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (big / 4096)) * 4096;
            let before = p2.load(Ordering::Acquire);
            let r = c.write((n % 2) as usize, off, &pattern(off, 4096, n as u32));
            let after = p2.load(Ordering::Acquire);
            n += 1;
            match r {
                0 if off >= small => {
                    assert!(before % 2 == 1 || after != before, "write at {off} succeeded past the end {small}");
                    ok_beyond += 1;
                }
                0 => {}
                e => {
                    assert!(off >= small, "write at {off} inside the disk failed: {e}");
                    refused += 1;
                }
            }
        }
        (ok_beyond, refused, n)
    });
    ready_rx.recv_timeout(WAIT).expect("writer did not connect");
    for round in 0..300 {
        assert_eq!(resize(&s, small), Ok(json!({})), "shrink {round}");
        phase.fetch_add(1, Ordering::AcqRel);
        assert_eq!(file_len(&disk), small, "round {round}: a write validated before the shrink landed after the cut");
        phase.fetch_add(1, Ordering::AcqRel);
        assert_eq!(resize(&s, big), Ok(json!({})), "grow {round}");
    }
    assert_eq!(resize(&s, small), Ok(json!({})));
    stop.store(true, Ordering::Release);
    let (ok_beyond, refused, n) = writer.join().unwrap();
    eprintln!("{n} writes: {ok_beyond} succeeded beyond {small}, {refused} refused");
    assert!(ok_beyond > 0 && refused > 0, "the writes did not straddle the resizes");
    assert_eq!(file_len(&disk), small, "a write extended the file after the last shrink");
    let stats = s.qmp_ok("query-blockstats");
    assert_eq!(stats["write"]["errors"], 0, "{stats}");
}
