//! Issue 15 item 5: `sync=full` copies data, not holes. A sparse 1 GiB primary with a few MiB
//! of data syncs to a colo-blk secondary and to qemu-nbd: only the data travels as payload,
//! the secondary stays sparse and ends byte-identical, also with guest writes racing the
//! sync. The colo-blk secondary's export offers block status (`base:allocation`), so
//! `qemu-img map` / `nbdinfo --map` see its holes; hostile block-status requests get EINVAL.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use colo_blk::nbd::wire::*;
use common::pair::*;
use common::*;
use serde_json::{Value, json};

const GIB: u64 = 1 << 30;
/// Where the primary's data lies: 4 MiB of pattern at 500 MiB.
const DATA_AT: u64 = 500 * MIB;
const DATA_LEN: u64 = 4 * MIB;
/// Allocated zeroes on the primary (detected as zero blocks, not holes).
const ZEROES_AT: u64 = 600 * MIB;

/// A sparse primary disk of `size` bytes: [`DATA_LEN`] bytes of pattern at [`DATA_AT`] and
/// 2 MiB of written zeroes at [`ZEROES_AT`]; the rest is a hole.
fn sparse_primary(path: &Path, size: u64) {
    make_disk(path, size, None);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&pattern(DATA_AT, DATA_LEN as usize, 1), DATA_AT).unwrap();
    f.write_all_at(&vec![0u8; 2 * MIB as usize], ZEROES_AT).unwrap();
    f.sync_all().unwrap();
}

/// A secondary disk that is not empty: 3 MiB of junk at 100 MiB, which the full sync must
/// turn into zeroes, and 1 MiB over the primary's data.
fn dirty_secondary(path: &Path, size: u64) {
    make_disk(path, size, None);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0xa5; 3 * MIB as usize], 100 * MIB).unwrap();
    f.write_all_at(&vec![0x5a; MIB as usize], DATA_AT + MIB).unwrap();
}

/// Compares two files of the same size, every byte, in 8 MiB pieces.
fn same_bytes(a: &Path, b: &Path) {
    let (fa, fb) = (std::fs::File::open(a).unwrap(), std::fs::File::open(b).unwrap());
    let size = fa.metadata().unwrap().len();
    assert_eq!(size, fb.metadata().unwrap().len(), "sizes differ");
    let (mut x, mut y) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(x.len() as u64) as usize;
        fa.read_exact_at(&mut x[..n], off).unwrap();
        fb.read_exact_at(&mut y[..n], off).unwrap();
        if let Some(i) = x[..n].iter().zip(&y[..n]).position(|(p, q)| p != q) {
            panic!("{} and {} differ first at byte {}", a.display(), b.display(), off + i as u64);
        }
        off += n as u64;
    }
}

/// Runs `sync=full` to `uri` and waits until the secondary is in sync; returns
/// `query-replication`.
fn full_sync(pri: &Server, uri: &str) -> Value {
    let mut events = pri.qmp();
    qmp(pri, "replication-start", json!({"mode": "primary", "secondary": uri, "sync": "full"})).unwrap();
    events.wait_event("REPLICATION_IN_SYNC", WAIT).unwrap();
    wait_until("sync", || synced(pri));
    qmp(pri, "query-replication", json!({})).unwrap()
}

/// The resync moved the data as payload and everything else as WRITE_ZEROES.
fn assert_sparse_copy(q: &Value, size: u64) {
    let r = &q["resync"];
    assert_eq!(r["total-bytes"], size, "{q}");
    assert_eq!(r["copied-bytes"], size, "{q}");
    assert_eq!(r["data-bytes"], DATA_LEN, "only the data travels as payload: {q}");
    assert_eq!(r["zero-bytes"], size - DATA_LEN, "{q}");
}

/// qemu-nbd serving `disk` with `--discard=unmap`, so WRITE_ZEROES without NO_HOLE may punch
/// (its default, `ignore`, allocates zeroed extents instead).
fn qemu_nbd_unmap(disk: &Path, socket: &Path) -> QemuNbd {
    let child = Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", "exp", "-t", "-e", "8", "--cache=writeback", "--discard=unmap", "-k"])
        .arg(socket)
        .arg(disk)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-nbd");
    let deadline = Instant::now() + WAIT;
    while UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    QemuNbd { child, socket: socket.to_path_buf() }
}

/// `qemu-img map --output=json` of an NBD export (block status over NBD).
fn qemu_img_map(uri: &str) -> Vec<Value> {
    let out = Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", uri]).output().expect("qemu-img");
    assert!(out.status.success(), "qemu-img map: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

/// The map entry that covers byte `at`: (data, zero).
fn map_at(map: &[Value], at: u64) -> (bool, bool) {
    let e = map
        .iter()
        .find(|e| {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            s <= at && at < s + l
        })
        .unwrap_or_else(|| panic!("no map entry covers {at}: {map:?}"));
    (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap())
}

#[test]
fn full_sync_of_a_sparse_disk_to_a_colo_blk_secondary_sends_the_data_only() {
    let dir = tempfile::tempdir().unwrap();
    let sdisk = dir.path().join("sec.img");
    dirty_secondary(&sdisk, GIB);
    let (sec, sdisk, nbd) = colo_secondary(dir.path(), "1G", None);
    // The COLO order: the secondary replicates (copy-before-write on) before the sync.
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let pdisk = dir.path().join("pri.img");
    sparse_primary(&pdisk, GIB);
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, GIB, &[]);
    let uri = format!("nbd+unix:///?socket={}", nbd.display());
    let t0 = Instant::now();
    let q = full_sync(&pri, &uri);
    eprintln!("sparse sync=full of 1 GiB to colo-blk: {:?}", t0.elapsed());
    assert_sparse_copy(&q, GIB);
    qmp(&pri, "replication-checkpoint", json!({})).unwrap();
    same_bytes(&pdisk, &sdisk);
    // The secondary disk holds the data, not 1 GiB; hidden holds the junk it replaced (the
    // copy-before-write of the holes punched it there), nothing more.
    let (d, h) = (allocated(&sdisk), allocated(&dir.path().join("h.img")));
    assert!(d <= DATA_LEN + 2 * MIB, "secondary disk allocates {d} bytes");
    assert!(h <= 4 * MIB + 2 * MIB, "hidden buffer allocates {h} bytes");
    // Block status over the secondary's export shows the holes (what a client reads).
    let map = qemu_img_map(&uri);
    assert_eq!(map_at(&map, 0), (false, true), "{map:?}");
    assert_eq!(map_at(&map, 100 * MIB), (false, true), "{map:?}");
    assert!(map_at(&map, DATA_AT).0, "{map:?}");
    assert_eq!(map_at(&map, GIB - 1), (false, true), "{map:?}");
    if let Ok(out) = Command::new("nbdinfo").args(["--map", &uri]).output() {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("hole,zero") && text.contains("data"), "nbdinfo --map: {text}");
    }
}

#[test]
fn full_sync_of_a_sparse_disk_to_qemu_nbd_sends_the_data_only() {
    let dir = tempfile::tempdir().unwrap();
    let (sdisk, sock) = (dir.path().join("sec.img"), dir.path().join("nbd.sock"));
    dirty_secondary(&sdisk, GIB);
    let qn = qemu_nbd_unmap(&sdisk, &sock);
    let pdisk = dir.path().join("pri.img");
    sparse_primary(&pdisk, GIB);
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, GIB, &[]);
    let t0 = Instant::now();
    let q = full_sync(&pri, &qn.uri());
    eprintln!("sparse sync=full of 1 GiB to qemu-nbd: {:?}", t0.elapsed());
    assert_sparse_copy(&q, GIB);
    qmp(&pri, "replication-checkpoint", json!({})).unwrap();
    same_bytes(&pdisk, &sdisk);
    let d = allocated(&sdisk);
    assert!(d <= DATA_LEN + 2 * MIB, "qemu-nbd's disk allocates {d} bytes");
}

#[test]
fn guest_writes_racing_a_sparse_full_sync_end_identical() {
    let dir = tempfile::tempdir().unwrap();
    let sdisk = dir.path().join("sec.img");
    dirty_secondary(&sdisk, GIB);
    let (sec, sdisk, nbd) = colo_secondary(dir.path(), "1G", None);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    // Data and holes interleaved, so the sync alternates hole and data chunks for a while:
    // 1 MiB of data at the start of every 4 MiB.
    let pdisk = dir.path().join("pri.img");
    sparse_primary(&pdisk, GIB);
    {
        let f = std::fs::OpenOptions::new().write(true).open(&pdisk).unwrap();
        for at in (0..GIB).step_by(4 * MIB as usize) {
            f.write_all_at(&pattern(at, MIB as usize, 5), at).unwrap();
        }
    }
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, GIB, &[]);
    let mut c = Client::connect(&pri.socket, 2, false);
    let mut events = pri.qmp();
    let uri = format!("nbd+unix:///?socket={}", nbd.display());
    qmp(&pri, "replication-start", json!({"mode": "primary", "secondary": uri, "sync": "full"})).unwrap();
    // Guest writes into holes, into data, into the junk the sync zeroes, for as long as the
    // sync runs: each must survive on the secondary (a hole sent as WRITE_ZEROES after a
    // guest write reached the secondary would wipe it).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut racing = 0;
    for i in 0..20_000u32 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let len = 4096 * (1 + (x >> 60)) as usize;
        let off = match i % 4 {
            0 => 100 * MIB + ((x >> 20) % (3 * MIB / 4096)) * 4096,
            1 => ((x >> 20) % (GIB / (4 * MIB))) * 4 * MIB + MIB + ((x >> 40) % 256) * 4096,
            _ => ((x >> 20) % ((GIB - len as u64) / 4096)) * 4096,
        };
        assert_eq!(c.write((i % 2) as usize, off, &pattern(off, len, i + 2)), 0, "guest write {i}");
        let q = qmp(&pri, "query-replication", json!({})).unwrap();
        if q["dirty-bytes"].as_u64().unwrap() > 0 {
            racing += 1;
        } else if i >= 200 {
            break;
        }
    }
    events.wait_event("REPLICATION_IN_SYNC", WAIT).unwrap();
    wait_until("sync", || synced(&pri));
    qmp(&pri, "replication-checkpoint", json!({})).unwrap();
    eprintln!("{racing} guest writes ran while the sync was copying");
    assert!(racing > 0, "no guest write raced the sync");
    same_bytes(&pdisk, &sdisk);
    let q = qmp(&pri, "query-replication", json!({})).unwrap();
    assert!(q["resync"]["zero-bytes"].as_u64().unwrap() >= GIB / 2, "holes were not sent as zeroes: {q}");
}

// ---- block status on the secondary's export, from a raw client ---------------------------

/// Sends one option and reads its replies up to the final one: (reply type, data) each.
fn option(s: &mut UnixStream, opt: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), OPT_REPLY_MAGIC);
        assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), opt);
        let rtype = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut d).unwrap();
        out.push((rtype, d));
        if rtype == REP_ACK || rtype & (1 << 31) != 0 {
            return out;
        }
    }
}

fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Greets, negotiates structured replies and `base:allocation` when asked, then GO "".
fn raw_client(sock: &Path, structured: bool, allocation: bool) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes()).unwrap();
    // Meta contexts before structured replies: refused.
    let r = option(&mut s, OPT_SET_META_CONTEXT, &meta_payload("", &[META_BASE_ALLOCATION]));
    assert_eq!(r.last().unwrap().0, REP_ERR_INVALID);
    if structured {
        assert_eq!(option(&mut s, OPT_STRUCTURED_REPLY, &[])[0].0, REP_ACK);
        // Malformed requests and unknown exports are refused, without harm.
        assert_eq!(option(&mut s, OPT_SET_META_CONTEXT, &[0, 0, 0, 9, 1]).last().unwrap().0, REP_ERR_INVALID);
        let r = option(&mut s, OPT_SET_META_CONTEXT, &meta_payload("nope", &[META_BASE_ALLOCATION]));
        assert_eq!(r.last().unwrap().0, REP_ERR_UNKNOWN);
        let list = option(&mut s, OPT_LIST_META_CONTEXT, &meta_payload("", &[]));
        assert_eq!(list[0].0, REP_META_CONTEXT);
        assert_eq!(&list[0].1[4..], META_BASE_ALLOCATION.as_bytes());
        assert_eq!(list.last().unwrap().0, REP_ACK);
    }
    if allocation {
        let r = option(&mut s, OPT_SET_META_CONTEXT, &meta_payload("", &["qemu:nothing", META_BASE_ALLOCATION]));
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].0, REP_META_CONTEXT);
        assert_eq!(u32::from_be_bytes(r[0].1[0..4].try_into().unwrap()), 1);
        assert_eq!(&r[0].1[4..], META_BASE_ALLOCATION.as_bytes());
    }
    let mut go = Vec::new();
    go.extend_from_slice(&0u32.to_be_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(option(&mut s, OPT_GO, &go).last().unwrap().0, REP_ACK);
    s
}

fn request(s: &mut UnixStream, flags: u16, cmd: u16, handle: u64, offset: u64, length: u32) {
    s.write_all(&Request { flags, cmd, handle, offset, length }.encode()).unwrap();
}

/// Reads one structured chunk: (flags, type, handle, payload).
fn chunk(s: &mut UnixStream) -> (u16, u16, u64, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), STRUCTURED_REPLY_MAGIC, "not a structured reply");
    let mut p = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut p).unwrap();
    (
        u16::from_be_bytes([h[4], h[5]]),
        u16::from_be_bytes([h[6], h[7]]),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
        p,
    )
}

/// A block-status answer's extents: (length, flags).
fn extents(s: &mut UnixStream, handle: u64) -> Vec<(u32, u32)> {
    let (flags, kind, h, p) = chunk(s);
    assert_eq!((flags, kind, h), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle), "{p:?}");
    assert_eq!(u32::from_be_bytes(p[0..4].try_into().unwrap()), 1, "context id");
    p[4..]
        .chunks_exact(8)
        .map(|e| (u32::from_be_bytes(e[0..4].try_into().unwrap()), u32::from_be_bytes(e[4..8].try_into().unwrap())))
        .collect()
}

/// A structured error answer: the NBD error code.
fn error_code(s: &mut UnixStream, handle: u64) -> u32 {
    let (flags, kind, h, p) = chunk(s);
    assert_eq!((flags, kind, h), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle), "{p:?}");
    u32::from_be_bytes(p[0..4].try_into().unwrap())
}

#[test]
fn secondary_export_block_status_and_structured_reads_hold_against_hostile_requests() {
    const SIZE: u64 = 64 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let sdisk = dir.path().join("sec.img");
    make_disk(&sdisk, SIZE, None);
    {
        // 4 KiB of data every 16 KiB over [32 MiB, 48 MiB): 2,048 extents there.
        let f = std::fs::OpenOptions::new().write(true).open(&sdisk).unwrap();
        f.write_all_at(&pattern(MIB, 64 << 10, 3), MIB).unwrap();
        for i in 0..1024u64 {
            let at = 32 * MIB + i * 16384;
            f.write_all_at(&pattern(at, 4096, 4), at).unwrap();
        }
    }
    let (sec, _sdisk, nbd) = colo_secondary(dir.path(), "64M", None);
    let mut s = raw_client(&nbd, true, true);
    // Holes and data, clipped to the request.
    assert_eq!(
        extents_of(&mut s, 1, 0, 8 * MIB as u32),
        vec![(MIB as u32, 3), (64 << 10, 0), (7 * MIB as u32 - (64 << 10), 3)]
    );
    assert_eq!(extents_of(&mut s, 2, MIB + 4096, 8192), vec![(8192, 0)]);
    // REQ_ONE: one extent.
    request(&mut s, CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 3, 0, SIZE as u32);
    assert_eq!(extents(&mut s, 3), vec![(MIB as u32, 3)]);
    // Many extents: at most 1,024 per answer, never past the request.
    let e = extents_of(&mut s, 4, 32 * MIB, 16 * MIB as u32);
    assert_eq!(e.len(), 1024);
    assert!(e.iter().map(|x| u64::from(x.0)).sum::<u64>() < 16 * MIB);
    assert_eq!((e[0], e[1]), ((4096, 0), (12288, 3)));
    // Bad requests: EINVAL as a structured error, the connection goes on.
    for (h, flags, offset, len) in [
        (10u64, 0u16, 0u64, 0u32),     // empty
        (11, 0, SIZE, 1),              // past the end
        (12, 0, SIZE - 512, 1024),     // crosses the end
        (13, 0, u64::MAX - 100, 4096), // offset + length overflows
        (14, 0x40, 0, 4096),           // unknown flag
    ] {
        request(&mut s, flags, CMD_BLOCK_STATUS, h, offset, len);
        assert_eq!(error_code(&mut s, h), EINVAL, "block status {flags:#x} {offset}+{len}");
    }
    // Reads are structured now: one OFFSET_DATA chunk, or an error chunk.
    request(&mut s, 0, CMD_READ, 20, MIB, 4096);
    let (flags, kind, h, p) = chunk(&mut s);
    assert_eq!((flags, kind, h), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 20));
    assert_eq!(u64::from_be_bytes(p[0..8].try_into().unwrap()), MIB);
    assert_eq!(&p[8..], &pattern(MIB, 4096, 3)[..]);
    request(&mut s, CMD_FLAG_DF, CMD_READ, 21, 0, 512);
    let (_, kind, _, p) = chunk(&mut s);
    assert_eq!((kind, &p[8..]), (REPLY_TYPE_OFFSET_DATA, &[0u8; 512][..]));
    request(&mut s, 0, CMD_READ, 22, SIZE, 512);
    assert_eq!(error_code(&mut s, 22), EINVAL);
    request(&mut s, 0, CMD_READ, 23, 0, 0);
    let (flags, kind, h, p) = chunk(&mut s);
    assert_eq!((flags, kind, h, p.len()), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 23, 0));
    // Other commands keep simple replies.
    request(&mut s, 0, CMD_FLUSH, 24, 0, 0);
    assert_eq!(common::hostile::read_reply(&mut s), (0, 24));
    drop(s);
    // Without structured replies: no block status (simple EINVAL), reads stay simple.
    let mut plain = raw_client(&nbd, false, false);
    request(&mut plain, 0, CMD_BLOCK_STATUS, 30, 0, 4096);
    assert_eq!(common::hostile::read_reply(&mut plain), (EINVAL, 30));
    drop(plain);
    // Structured replies but no context selected: block status refused.
    let mut s2 = raw_client(&nbd, true, false);
    request(&mut s2, 0, CMD_BLOCK_STATUS, 31, 0, 4096);
    assert_eq!(error_code(&mut s2, 31), EINVAL);
    drop(s2);
    // The server still answers real clients.
    let uri = format!("nbd+unix:///?socket={}", nbd.display());
    let map = qemu_img_map(&uri);
    assert_eq!(map_at(&map, 0), (false, true));
    assert!(map_at(&map, MIB).0);
    let out = Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0 2M 1M"]).output().expect("qemu-io");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(sec.qmp_ok("query-replication").is_object());
}

/// Block status of [offset, offset + len) without flags.
fn extents_of(s: &mut UnixStream, handle: u64, offset: u64, len: u32) -> Vec<(u32, u32)> {
    request(s, 0, CMD_BLOCK_STATUS, handle, offset, len);
    extents(s, handle)
}
