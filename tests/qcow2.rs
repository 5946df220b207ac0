//! qcow2 images (`serve --format qcow2`) through the process: what colo-blk writes QEMU's tools
//! read and the other way round, backing chains read through and are never written, discard
//! and write-zeroes leave zero clusters as QEMU does, a `kill -9` under allocating writes
//! leaves an image `qemu-img check` accepts (leaks at most) with every flushed write in it,
//! format mistakes are refused before anything is touched, and the chain is locked the way a
//! QEMU guest device locks it.
//!
//! QEMU's tools (qemu-img, qemu-io) are required: a missing tool fails the test.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::{Client, Server, WAIT, pattern};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
/// qemu-img's default qcow2 cluster size.
const CLUSTER: u64 = 64 * KIB;
const SECTOR: usize = 512;
/// Largest frontend transfer used for whole-disk reads.
const CHUNK: usize = 8 << 20;

// ------------------------------------------------------------------------------ tools ---

/// Fails loudly (not a skip) when QEMU's tools are missing.
fn require_tools() {
    for t in ["qemu-img", "qemu-io"] {
        match Command::new(t).arg("--version").output() {
            Ok(o) if o.status.success() => {}
            other => panic!("{t} is required by the qcow2 tests (install QEMU's tools): {other:?}"),
        }
    }
}

/// Runs a QEMU tool under a deadline; returns its output.
fn tool(name: &str, args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .arg(WAIT.as_secs().to_string())
        .arg(name)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {name}: {e}"));
    assert_ne!(out.status.code(), Some(124), "{name} {args:?} did not finish within {WAIT:?}");
    assert_ne!(out.status.code(), Some(127), "{name} is missing");
    out
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `qemu-img create -f qcow2` with an optional backing file (as given, relative or absolute)
/// and its format, and an optional cluster size.
fn create_qcow2(img: &Path, size: Option<u64>, backing: Option<(&str, &str)>, cluster: Option<u64>) {
    let mut args = vec!["create".to_string(), "-q".into(), "-f".into(), "qcow2".into()];
    if let Some((b, fmt)) = backing {
        args.extend(["-b".into(), b.into(), "-F".into(), fmt.into()]);
    }
    if let Some(c) = cluster {
        args.extend(["-o".into(), format!("cluster_size={c}")]);
    }
    args.push(s(img));
    if let Some(sz) = size {
        args.push(sz.to_string());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tool("qemu-img", &a);
    assert!(out.status.success(), "qemu-img {a:?}: {}", text(&out));
}

/// `qemu-io -f FMT [-r] -c CMD...`: (success, output). A failed pattern check or a lock
/// refusal counts as failure.
fn qemu_io(fmt: &str, img: &Path, read_only: bool, cmds: &[String]) -> (bool, String) {
    let mut args = vec!["-f".to_string(), fmt.to_string()];
    if read_only {
        args.push("-r".into());
    }
    for c in cmds {
        args.extend(["-c".into(), c.clone()]);
    }
    args.push(s(img));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tool("qemu-io", &a);
    let t = text(&out);
    let ok = out.status.success()
        && !t.contains("Pattern verification failed")
        && !t.contains("lock")
        && !t.contains("can't open");
    (ok, t)
}

fn qemu_io_ok(fmt: &str, img: &Path, read_only: bool, cmds: &[String]) {
    let (ok, t) = qemu_io(fmt, img, read_only, cmds);
    assert!(ok, "qemu-io {cmds:?} on {}: {t}", img.display());
}

/// `qemu-img check`: (exit code, output). 0 = clean, 3 = leaked clusters only, 2 = corrupt.
fn check(img: &Path) -> (i32, String) {
    let out = tool("qemu-img", &["check", "-f", "qcow2", &s(img)]);
    (out.status.code().unwrap_or(-1), text(&out))
}

fn check_clean(img: &Path) {
    let (code, t) = check(img);
    assert_eq!(code, 0, "qemu-img check {}: {t}", img.display());
}

/// The guest-visible content of `img` as QEMU reads it (`qemu-img convert -O raw`).
fn qemu_content(img: &Path) -> Vec<u8> {
    let out_path = img.with_extension("converted.raw");
    let out = tool("qemu-img", &["convert", "-U", "-f", "qcow2", "-O", "raw", &s(img), &s(&out_path)]);
    assert!(out.status.success(), "qemu-img convert {}: {}", img.display(), text(&out));
    let v = std::fs::read(&out_path).unwrap();
    std::fs::remove_file(&out_path).unwrap();
    v
}

/// `qemu-img map --output=json` entries.
fn map(img: &Path) -> Vec<serde_json::Value> {
    let out = tool("qemu-img", &["map", "-U", "-f", "qcow2", "--output=json", &s(img)]);
    assert!(out.status.success(), "qemu-img map: {}", text(&out));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("map json").as_array().unwrap().clone()
}

/// The map entries overlapping [start, start+len).
fn map_over(entries: &[serde_json::Value], start: u64, len: u64) -> Vec<serde_json::Value> {
    let covered: Vec<serde_json::Value> = entries
        .iter()
        .filter(|e| {
            let (s0, l0) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            s0 < start + len && start < s0 + l0
        })
        .cloned()
        .collect();
    assert!(!covered.is_empty(), "no map entry covers {start}+{len}");
    covered
}

/// Clusters (of `cluster` bytes) that the top image itself holds data for (depth 0, data).
fn top_data_clusters(entries: &[serde_json::Value], cluster: u64) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for e in entries {
        if e["depth"].as_u64() == Some(0) && e["data"].as_bool() == Some(true) {
            let (s0, l0) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            set.extend(s0 / cluster..(s0 + l0).div_ceil(cluster));
        }
    }
    set
}

/// One `read -P 0xNN off len` per run of sectors that are all one byte value in `model`
/// (sectors holding other data are checked by the whole-content comparison).
fn pattern_reads(model: &[u8]) -> Vec<String> {
    let mut cmds = Vec::new();
    let mut run: Option<(u8, usize, usize)> = None;
    for (i, sec) in model.chunks(SECTOR).enumerate() {
        let uniform = sec.iter().all(|&b| b == sec[0]);
        let off = i * SECTOR;
        match (&mut run, uniform) {
            (Some((b, _, len)), true) if *b == sec[0] => *len += SECTOR,
            _ => {
                if let Some((b, o, l)) = run.take() {
                    cmds.push(format!("read -P 0x{b:02x} {o} {l}"));
                }
                if uniform {
                    run = Some((sec[0], off, SECTOR));
                }
            }
        }
    }
    if let Some((b, o, l)) = run {
        cmds.push(format!("read -P 0x{b:02x} {o} {l}"));
    }
    cmds
}

/// First differing offset of two equally long byte strings, for readable failures.
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = first_diff(got, want) {
        let end = (i + 16).min(got.len());
        panic!(
            "{what}: first difference at byte {i} (sector {}): got {:02x?}, want {:02x?}",
            i / SECTOR,
            &got[i..end],
            &want[i..end]
        );
    }
}

// ----------------------------------------------------------------------------- daemon ---

/// The backend under test: colo-blk, or (`COLO_BLK_QCOW2_REFERENCE=qsd`, to check the tests
/// themselves) qemu-storage-daemon serving the same image, which must pass them too.
enum Backend {
    Colo(Server),
    /// A daemon started here directly (qemu-storage-daemon, or colo-blk by [`try_serve`]).
    Child {
        child: std::process::Child,
        socket: PathBuf,
        _dir: tempfile::TempDir,
        stderr: Option<PathBuf>,
    },
}

impl Backend {
    fn socket(&self) -> &Path {
        match self {
            Backend::Colo(s) => &s.socket,
            Backend::Child { socket, .. } => socket,
        }
    }

    fn pid(&self) -> libc::pid_t {
        match self {
            Backend::Colo(s) => s.child.id() as libc::pid_t,
            Backend::Child { child, .. } => child.id() as libc::pid_t,
        }
    }

    fn wait_exit(&mut self) -> ExitStatus {
        match self {
            Backend::Colo(s) => s.wait_exit(),
            Backend::Child { child, .. } => {
                let deadline = Instant::now() + WAIT;
                loop {
                    if let Some(st) = child.try_wait().unwrap() {
                        return st;
                    }
                    assert!(Instant::now() < deadline, "qemu-storage-daemon did not exit");
                    // As Server::wait_exit: no pollable exit event without pidfd plumbing.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    fn server(&self) -> &Server {
        match self {
            Backend::Colo(s) => s,
            Backend::Child { .. } => panic!("not a colo-blk started through tests/common"),
        }
    }

    fn server_mut(&mut self) -> &mut Server {
        match self {
            Backend::Colo(s) => s,
            Backend::Child { .. } => panic!("not a colo-blk started through tests/common"),
        }
    }

    fn log(&self) -> Vec<String> {
        match self {
            Backend::Colo(s) => s.log(),
            Backend::Child { stderr, .. } => stderr
                .as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .map(|s| s.lines().map(str::to_string).collect())
                .unwrap_or_default(),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Backend::Child { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn reference_qsd() -> bool {
    std::env::var("COLO_BLK_QCOW2_REFERENCE").is_ok_and(|v| v == "qsd")
}

/// colo-blk serving `img` as qcow2 (socket and control socket in a fresh directory).
fn serve(img: &Path, extra: &[&str]) -> Backend {
    if reference_qsd() {
        return serve_qsd(img, extra);
    }
    let i = s(img);
    let mut args = vec!["--disk", i.as_str(), "--format", "qcow2"];
    args.extend_from_slice(extra);
    Backend::Colo(Server::start(tempfile::tempdir().unwrap(), &args))
}

/// qemu-storage-daemon on `img`; of colo-blk's `extra` options it follows `--num-queues` and
/// `--direct`.
fn serve_qsd(img: &Path, extra: &[&str]) -> Backend {
    let queues = extra.iter().position(|a| *a == "--num-queues").map_or("1", |i| extra[i + 1]);
    let direct = if extra.contains(&"--direct") { "on" } else { "off" };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qsd.sock");
    let pidfile = dir.path().join("qsd.pid");
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f,filename={},discard=unmap,cache.direct={direct}", s(img)))
        .args(["--blockdev", "driver=qcow2,node-name=d,file=f,discard=unmap"])
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            s(&socket)
        ))
        .arg("--pidfile")
        .arg(&pidfile)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn qemu-storage-daemon");
    let mut b = Backend::Child { child, socket: socket.clone(), _dir: dir, stderr: None };
    let deadline = Instant::now() + WAIT;
    while !(socket.exists() && std::fs::metadata(&pidfile).is_ok_and(|m| m.len() > 0)) {
        if let Backend::Child { child, .. } = &mut b {
            assert!(child.try_wait().unwrap().is_none(), "qemu-storage-daemon exited");
        }
        assert!(Instant::now() < deadline, "qemu-storage-daemon not ready");
        // Readiness of a foreign daemon: its socket and pid file appear, no event to wait on.
        std::thread::sleep(Duration::from_millis(20));
    }
    b
}

/// Starts colo-blk on `img` as qcow2: Ok once it serves, Err(stderr) when it refused the
/// image (exit 2; any other exit fails the test).
fn try_serve(img: &Path, extra: &[&str]) -> Result<Backend, String> {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let errf = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_colo-blk"))
        .args(["serve", "--format", "qcow2", "--disk"])
        .arg(img)
        .arg("--socket")
        .arg(&socket)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&errf).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let err = std::fs::read_to_string(&errf).unwrap();
            assert_eq!(st.code(), Some(2), "colo-blk on {} ended with {st}: {err}", img.display());
            return Err(err);
        }
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Ok(Backend::Child { child, socket, _dir: dir, stderr: Some(errf) });
        }
        assert!(Instant::now() < deadline, "colo-blk neither served nor refused {}", img.display());
        // Start-up of a process: its socket appearing is the only event to wait for.
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(b: &Backend, sig: libc::c_int) {
    // SAFETY: signalling a child process this test owns and has not reaped.
    assert_eq!(unsafe { libc::kill(b.pid(), sig) }, 0);
}

/// SIGTERM: the daemon drains, flushes and exits 0.
fn stop(mut b: Backend) {
    signal(&b, libc::SIGTERM);
    let st: ExitStatus = b.wait_exit();
    assert!(st.success(), "the daemon exited with {st} on SIGTERM; log: {:?}", b.log());
}

fn write_ok(c: &mut Client, off: u64, data: &[u8]) {
    assert_eq!(c.write(0, off, data), 0, "write {off}+{}", data.len());
}

/// Reads [off, off+len) through the frontend in chunks.
fn read_range(c: &mut Client, off: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = CHUNK.min(len - out.len());
        let at = off + out.len() as u64;
        let (r, d) = c.read(0, at, n);
        assert_eq!(r, 0, "read {at}+{n}");
        out.extend_from_slice(&d);
    }
    out
}

fn apply(model: &mut [u8], off: u64, data: &[u8]) {
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

// ------------------------------------------------------------------------------ tests ---

#[test]
fn qemu_io_reads_what_colo_blk_wrote_and_back() {
    roundtrip(&[]);
}

#[test]
fn qemu_io_reads_what_colo_blk_wrote_and_back_with_o_direct() {
    roundtrip(&["--direct"]);
}

#[test]
fn qemu_io_reads_what_colo_blk_wrote_and_back_with_the_sync_engine() {
    roundtrip(&["--io-engine", "sync"]);
}

/// QEMU writes, colo-blk (started with `extra`) reads and writes, QEMU reads and writes, a
/// new colo-blk reads.
fn roundtrip(extra: &[&str]) {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.qcow2");
    let size = 64 * MIB;
    create_qcow2(&img, Some(size), None, None);
    let mut model = vec![0u8; size as usize];

    // QEMU writes first: whole clusters, a sector-aligned piece of one, a run crossing clusters.
    let pre: &[(u8, u64, u64)] =
        &[(0x71, 40 * MIB, 64 * KIB), (0x72, 41 * MIB + 1536, 6 * KIB), (0x73, 42 * MIB - 8 * KIB, 24 * KIB)];
    let cmds: Vec<String> = pre.iter().map(|(b, o, l)| format!("write -P 0x{b:02x} {o} {l}")).collect();
    qemu_io_ok("qcow2", &img, false, &cmds);
    for &(b, o, l) in pre {
        apply(&mut model, o, &vec![b; l as usize]);
    }

    let srv = serve(&img, extra);
    let mut c = Client::connect(srv.socket(), 1, false);
    assert_eq!(c.capacity, size, "capacity is the qcow2 virtual size");
    for &(_, o, l) in pre {
        let back = read_range(&mut c, o - 4 * KIB, l as usize + 8 * KIB as usize);
        let at = (o - 4 * KIB) as usize;
        assert_same(&format!("qemu-io's write at {o}+{l} read through colo-blk"), &back, &model[at..at + back.len()]);
    }

    // colo-blk writes: a 4 KiB piece of a cluster, a write crossing a cluster boundary, 1 MiB
    // not aligned to clusters, an overwrite inside it (allocated cluster), one sector, the
    // last block, a write over and past QEMU's data, and offset-encoded data (a misplaced
    // block shows).
    let fills: &[(u8, u64, u64)] = &[
        (0x11, 4 * KIB, 4 * KIB),
        (0x12, 5 * CLUSTER - 16 * KIB, 32 * KIB),
        (0x13, 10 * MIB + 4 * KIB, MIB),
        (0x14, 10 * MIB + 256 * KIB, 4 * KIB),
        (0x15, 20 * MIB + 512, 512),
        (0x16, size - 4 * KIB, 4 * KIB),
        (0x17, 40 * MIB + 32 * KIB, 64 * KIB),
    ];
    for &(b, o, l) in fills {
        let data = vec![b; l as usize];
        write_ok(&mut c, o, &data);
        apply(&mut model, o, &data);
    }
    let encoded = pattern(30 * MIB + 12 * KIB, 200 * KIB as usize, 9);
    write_ok(&mut c, 30 * MIB + 12 * KIB, &encoded);
    apply(&mut model, 30 * MIB + 12 * KIB, &encoded);
    for &(_, o, l) in fills {
        let (r, back) = c.read(0, o, l as usize);
        assert_eq!(r, 0);
        assert_same(&format!("read-back of {o}+{l}"), &back, &model[o as usize..(o + l) as usize]);
    }
    let all = read_range(&mut c, 0, size as usize);
    assert_same("whole disk through colo-blk", &all, &model);

    // A clean stop (no guest flush): everything acknowledged is in the image for QEMU.
    stop(srv);
    drop(c);
    let cmds = pattern_reads(&model);
    assert!(cmds.len() >= 2 * fills.len(), "{cmds:?}");
    qemu_io_ok("qcow2", &img, true, &cmds);
    assert_same("qemu-img convert of the image colo-blk wrote", &qemu_content(&img), &model);
    check_clean(&img);

    // And back: QEMU overwrites some of colo-blk's data and adds new clusters; a new colo-blk
    // reads all of it.
    let post: &[(u8, u64, u64)] = &[(0x81, 10 * MIB + 128 * KIB, 8 * KIB), (0x82, 50 * MIB, 192 * KIB)];
    let cmds: Vec<String> = post.iter().map(|(b, o, l)| format!("write -P 0x{b:02x} {o} {l}")).collect();
    qemu_io_ok("qcow2", &img, false, &cmds);
    for &(b, o, l) in post {
        apply(&mut model, o, &vec![b; l as usize]);
    }
    let srv = serve(&img, extra);
    let mut c = Client::connect(srv.socket(), 1, false);
    let all = read_range(&mut c, 0, size as usize);
    assert_same("whole disk through a restarted colo-blk", &all, &model);
    drop(c);
    stop(srv);
    check_clean(&img);
}

/// Serves `top` (whose chain is `lower`, bottom last), checks that it reads `model`, writes
/// partial-cluster, cluster-crossing and large pieces, and checks the merged result through
/// colo-blk and QEMU, the lower files byte for byte unchanged and only the written clusters
/// allocated in the top.
fn exercise_chain(top: &Path, lower: &[&Path], mut model: Vec<u8>, extra: &[&str]) {
    let size = model.len() as u64;
    let before: Vec<Vec<u8>> = lower.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let srv = serve(top, extra);
    let mut c = Client::connect(srv.socket(), 1, false);
    assert_eq!(c.capacity, size);
    let all = read_range(&mut c, 0, size as usize);
    assert_same("the chain read through colo-blk before any write", &all, &model);

    let writes: &[(u64, u64)] = &[
        (10 * CLUSTER + 8 * KIB, 4 * KIB),   // 4 KiB into a cluster whose rest is the base's
        (10 * CLUSTER + 60 * KIB, 8 * KIB),  // the same cluster again, crossing into the next
        (20 * CLUSTER - 16 * KIB, 32 * KIB), // crossing a cluster boundary
        (5 * MIB + 4 * KIB, MIB),            // 1 MiB, unaligned
        (33 * MIB + 1536, 512),              // one sector
        (size - 4 * KIB, 4 * KIB),           // the last block
    ];
    let mut touched = BTreeSet::new();
    for (i, &(o, l)) in writes.iter().enumerate() {
        let data = pattern(o, l as usize, 0x100 + i as u32);
        write_ok(&mut c, o, &data);
        apply(&mut model, o, &data);
        touched.extend(o / CLUSTER..(o + l).div_ceil(CLUSTER));
        // The whole clusters around it: the write merged with what lies below.
        let (cs, ce) = (o / CLUSTER * CLUSTER, (o + l).div_ceil(CLUSTER) * CLUSTER);
        let back = read_range(&mut c, cs, (ce - cs) as usize);
        assert_same(&format!("clusters around the write at {o}+{l}"), &back, &model[cs as usize..ce as usize]);
    }
    let all = read_range(&mut c, 0, size as usize);
    assert_same("the chain after the writes, through colo-blk", &all, &model);
    for (p, b) in lower.iter().zip(&before) {
        assert!(std::fs::read(p).unwrap() == *b, "{} changed while colo-blk served the top", p.display());
    }
    assert_eq!(c.flush(0), 0);
    drop(c);
    stop(srv);

    for (p, b) in lower.iter().zip(&before) {
        assert!(std::fs::read(p).unwrap() == *b, "{} changed", p.display());
    }
    assert_same("qemu-img convert of the top", &qemu_content(top), &model);
    check_clean(top);
    // The top holds exactly the clusters written to (no copy of the base, none missing).
    assert_eq!(top_data_clusters(&map(top), CLUSTER), touched, "clusters allocated in the top");
}

#[test]
fn a_backing_chain_reads_through_and_stays_untouched() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let base = dir.path().join("base.raw");
    let model = pattern(0, size as usize, 0xB);
    std::fs::write(&base, &model).unwrap();
    let top = dir.path().join("top.qcow2");
    // A relative backing name: resolved against the top's directory, not colo-blk's cwd.
    create_qcow2(&top, None, Some(("base.raw", "raw")), None);
    exercise_chain(&top, &[&base], model, &[]);
}

#[test]
fn a_qcow2_backing_file_reads_through_and_stays_untouched() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    // The base has holes (unallocated clusters in the qcow2 base read as zeroes).
    let mut model = pattern(0, size as usize, 0xC);
    model[16 * MIB as usize..24 * MIB as usize].fill(0);
    model[(10 * CLUSTER) as usize..(11 * CLUSTER) as usize].fill(0);
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, &model).unwrap();
    let base = dir.path().join("base.qcow2");
    let out = tool("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", &s(&raw), &s(&base)]);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::remove_file(&raw).unwrap();
    let top = dir.path().join("top.qcow2");
    create_qcow2(&top, None, Some((&s(&base), "qcow2")), None);
    exercise_chain(&top, &[&base], model, &[]);
}

#[test]
fn a_three_level_chain_reads_through_and_stays_untouched() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let base = dir.path().join("base.raw");
    let mut model = pattern(0, size as usize, 0xD);
    std::fs::write(&base, &model).unwrap();
    let mid = dir.path().join("mid.qcow2");
    create_qcow2(&mid, None, Some(("base.raw", "raw")), None);
    // The middle layer overrides parts of the base, some inside clusters the top writes.
    let mids: &[(u8, u64, u64)] = &[(0xC1, 10 * CLUSTER, 16 * KIB), (0xC2, 5 * MIB, 256 * KIB), (0xC3, 48 * MIB, MIB)];
    let cmds: Vec<String> = mids.iter().map(|(b, o, l)| format!("write -P 0x{b:02x} {o} {l}")).collect();
    qemu_io_ok("qcow2", &mid, false, &cmds);
    for &(b, o, l) in mids {
        apply(&mut model, o, &vec![b; l as usize]);
    }
    let top = dir.path().join("top.qcow2");
    create_qcow2(&top, None, Some(("mid.qcow2", "qcow2")), None);
    exercise_chain(&top, &[&mid, &base], model, &[]);
}

/// Zero (1) or the old content (0) of every sector in a range that was discarded without
/// cluster alignment: discard is a hint and QEMU ignores partial clusters; either is right
/// per sector. Returns `got` after checking that each sector is one or the other.
fn zero_or_old(what: &str, got: &[u8], old: &[u8]) {
    for (i, (g, o)) in got.chunks(SECTOR).zip(old.chunks(SECTOR)).enumerate() {
        assert!(g == o || g.iter().all(|&b| b == 0), "{what}: sector {i} is neither the old data nor zero");
    }
}

/// Every map entry over [start, start+len) reads as zero from the top itself.
fn assert_map_zero(entries: &[serde_json::Value], start: u64, len: u64) {
    for e in map_over(entries, start, len) {
        assert_eq!(e["zero"], true, "qemu-img map over {start}+{len}: {e}");
        assert_eq!(e["data"], false, "qemu-img map over {start}+{len}: {e}");
        assert_eq!(e["depth"], 0, "qemu-img map over {start}+{len} reaches below the top: {e}");
    }
}

#[test]
fn discard_and_write_zeroes_read_back_zero_like_qemu() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let img = dir.path().join("vm.qcow2");
    create_qcow2(&img, Some(size), None, None);
    let srv = serve(&img, &[]);
    let mut c = Client::connect(srv.socket(), 1, false);
    let mut model = vec![0u8; size as usize];
    for off in [0, 8 * MIB] {
        let data = pattern(off, 8 * MIB as usize, 1);
        write_ok(&mut c, off, &data);
        apply(&mut model, off, &data);
    }
    // Cluster-aligned: discard, write-zeroes with and without unmap.
    assert_eq!(c.discard(0, MIB, MIB), 0, "discard");
    assert_eq!(c.write_zeroes(0, 3 * MIB, MIB, true), 0, "write-zeroes (unmap)");
    assert_eq!(c.write_zeroes(0, 5 * MIB, MIB, false), 0, "write-zeroes (no unmap)");
    // Not aligned: write-zeroes must zero exactly its range, whatever the clusters.
    assert_eq!(c.write_zeroes(0, 7 * MIB + 60 * KIB, 8 * KIB, false), 0);
    assert_eq!(c.write_zeroes(0, 9 * MIB + 4 * KIB, 4 * KIB, true), 0);
    assert_eq!(c.write_zeroes(0, 12 * MIB + 512, 1024, true), 0);
    for (o, l) in [(MIB, MIB), (3 * MIB, MIB), (5 * MIB, MIB), (7 * MIB + 60 * KIB, 8 * KIB)] {
        model[o as usize..(o + l) as usize].fill(0);
    }
    model[(9 * MIB + 4 * KIB) as usize..(9 * MIB + 8 * KIB) as usize].fill(0);
    model[(12 * MIB + 512) as usize..(12 * MIB + 1536) as usize].fill(0);
    // A partial-cluster discard: each sector reads zero or its old data, the rest of the
    // cluster is untouched.
    let (pd, pl) = (11 * MIB + 4 * KIB, 8 * KIB);
    assert_eq!(c.discard(0, pd, pl), 0, "partial discard");
    let got = read_range(&mut c, pd, pl as usize);
    zero_or_old("partial discard", &got, &model[pd as usize..(pd + pl) as usize]);
    apply(&mut model, pd, &got);

    let all = read_range(&mut c, 0, size as usize);
    assert_same("after discard / write-zeroes, through colo-blk", &all, &model);
    assert_eq!(c.flush(0), 0);
    drop(c);
    stop(srv);

    assert_same("after discard / write-zeroes, qemu-img convert", &qemu_content(&img), &model);
    let m = map(&img);
    for (o, l) in [(MIB, MIB), (3 * MIB, MIB), (5 * MIB, MIB)] {
        assert_map_zero(&m, o, l);
    }
    check_clean(&img);
}

#[test]
fn discard_over_a_backing_file_reads_zero_not_the_base() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let base = dir.path().join("base.raw");
    let mut model = pattern(0, size as usize, 0xE);
    std::fs::write(&base, &model).unwrap();
    let before = std::fs::read(&base).unwrap();
    let top = dir.path().join("top.qcow2");
    create_qcow2(&top, None, Some(("base.raw", "raw")), None);
    let srv = serve(&top, &[]);
    let mut c = Client::connect(srv.socket(), 1, false);

    // Discard where the top holds nothing yet, and where it holds data: both read zero
    // afterwards (QEMU leaves zero clusters), never the base's data.
    let data = pattern(3 * MIB, MIB as usize, 2);
    write_ok(&mut c, 3 * MIB, &data);
    apply(&mut model, 3 * MIB, &data);
    assert_eq!(c.discard(0, MIB, MIB), 0);
    assert_eq!(c.discard(0, 3 * MIB, MIB), 0);
    assert_eq!(c.write_zeroes(0, 5 * MIB, MIB, true), 0);
    assert_eq!(c.write_zeroes(0, 6 * MIB, MIB, false), 0);
    // Not aligned: zeroes in the range, the base's data around it in both clusters.
    assert_eq!(c.write_zeroes(0, 7 * MIB + 60 * KIB, 8 * KIB, true), 0);
    for (o, l) in [(MIB, MIB), (3 * MIB, MIB), (5 * MIB, 2 * MIB), (7 * MIB + 60 * KIB, 8 * KIB)] {
        model[o as usize..(o + l) as usize].fill(0);
    }
    // A partial discard over the base: zero or the base's data per sector, the rest of the
    // cluster is the base's.
    let (pd, pl) = (9 * MIB + 4 * KIB, 4 * KIB);
    assert_eq!(c.discard(0, pd, pl), 0);
    let got = read_range(&mut c, pd, pl as usize);
    zero_or_old("partial discard over the base", &got, &model[pd as usize..(pd + pl) as usize]);
    apply(&mut model, pd, &got);

    let all = read_range(&mut c, 0, size as usize);
    assert_same("top after discard / write-zeroes, through colo-blk", &all, &model);
    assert!(std::fs::read(&base).unwrap() == before, "the base changed");
    assert_eq!(c.flush(0), 0);
    drop(c);
    stop(srv);

    assert!(std::fs::read(&base).unwrap() == before, "the base changed");
    assert_same("top after discard / write-zeroes, qemu-img convert", &qemu_content(&top), &model);
    let m = map(&top);
    for (o, l) in [(MIB, MIB), (3 * MIB, MIB), (5 * MIB, 2 * MIB)] {
        assert_map_zero(&m, o, l);
    }
    check_clean(&top);
}

// ------------------------------------------------------------------------- kill -9 ---

enum Progress {
    /// A batch of writes is in flight.
    Submitted,
    /// This many flushes have completed.
    Flushed(usize),
}

/// What the writer did: every write submitted, in order (4 KiB block, sequence number of its
/// content), and how many of them were acknowledged before the last completed flush began.
#[derive(Default)]
struct WriteLog {
    writes: Vec<(u64, u32)>,
    /// Per write: acknowledged (completed successfully).
    acked: Vec<bool>,
    durable: usize,
    flushes: usize,
}

const BATCH: usize = 16;
const BLOCK: u64 = 4096;

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Waits for `n` completions on queue 0. Returns false when the daemon was killed (nothing
/// more will complete); fails on an error or a stall before that.
fn complete(c: &mut Client, n: usize, killing: &AtomicBool, mut done_one: impl FnMut(usize)) -> bool {
    let deadline = Instant::now() + WAIT;
    let mut done = 0;
    let mut comps: Vec<MaybeUninit<blkio::Completion>> = (0..BATCH).map(|_| MaybeUninit::uninit()).collect();
    while done < n {
        let mut t = Duration::from_millis(100);
        match c.queues[0].do_io(&mut comps, 1, Some(&mut t), None) {
            Ok(k) => {
                for comp in &comps[..k] {
                    // SAFETY: do_io initialised the first k completions.
                    let comp = unsafe { comp.assume_init_ref() };
                    if comp.ret != 0 {
                        assert!(killing.load(Ordering::SeqCst), "request {} failed: {}", comp.user_data, comp.ret);
                        return false;
                    }
                    done_one(comp.user_data);
                }
                done += k;
                if k == 0 && killing.load(Ordering::SeqCst) {
                    return false;
                }
            }
            // Nothing completed within the 100 ms.
            Err(e) if e.errno().raw_os_error() == libc::ETIME => {
                if killing.load(Ordering::SeqCst) {
                    return false;
                }
            }
            Err(e) => {
                assert!(killing.load(Ordering::SeqCst), "do_io failed before the kill: {e:?}");
                return false;
            }
        }
        assert!(Instant::now() < deadline, "writes stalled for {WAIT:?}");
    }
    true
}

/// Random 4 KiB writes, BATCH at a time, mostly into clusters not written before (allocating
/// writes), some over earlier writes; a flush after every 4th batch.
fn writer(socket: PathBuf, size: u64, cluster: u64, killing: Arc<AtomicBool>, tx: mpsc::Sender<Progress>) -> WriteLog {
    let mut c = Client::connect(&socket, 1, false);
    let mut log = WriteLog::default();
    let mut seed = 0x2545_F491_4F6C_DD1Du64 ^ cluster;
    let clusters = size / cluster;
    let per_cluster = (cluster / BLOCK).max(1);
    // The clusters in a random order: each batch takes fresh ones while they last.
    let mut fresh: Vec<u64> = (0..clusters).collect();
    for i in (1..fresh.len()).rev() {
        let j = (xorshift(&mut seed) % (i as u64 + 1)) as usize;
        fresh.swap(i, j);
    }
    let mut batches = 0usize;
    loop {
        let mut blocks: Vec<u64> = Vec::with_capacity(BATCH);
        while blocks.len() < BATCH {
            let b = if blocks.len() % 4 != 3 && !fresh.is_empty() {
                let cl = fresh.pop().unwrap();
                cl * (cluster / BLOCK).max(1) + xorshift(&mut seed) % per_cluster
            } else if !log.writes.is_empty() {
                log.writes[(xorshift(&mut seed) % log.writes.len() as u64) as usize].0
            } else {
                xorshift(&mut seed) % (size / BLOCK)
            };
            if !blocks.contains(&b) {
                blocks.push(b);
            }
        }
        for (i, &b) in blocks.iter().enumerate() {
            let seq = log.writes.len() as u32 + 1;
            let data = pattern(b * BLOCK, BLOCK as usize, seq);
            c.buf(i * BLOCK as usize, BLOCK as usize).copy_from_slice(&data);
            log.writes.push((b, seq));
            log.acked.push(false);
            let ptr = (c.region.addr + i * BLOCK as usize) as *const u8;
            c.queues[0].write(b * BLOCK, ptr, BLOCK as usize, i, ReqFlags::empty());
        }
        let _ = tx.send(Progress::Submitted);
        let first = log.writes.len() - BATCH;
        if !complete(&mut c, BATCH, &killing, |i| log.acked[first + i] = true) {
            return log;
        }
        batches += 1;
        if batches.is_multiple_of(4) {
            let upto = log.writes.len();
            c.queues[0].flush(BATCH, ReqFlags::empty());
            if !complete(&mut c, 1, &killing, |_| {}) {
                return log;
            }
            log.durable = upto;
            log.flushes += 1;
            let _ = tx.send(Progress::Flushed(log.flushes));
        }
    }
}

/// Offsets of the data extents of a (sparse) file, as SEEK_DATA / SEEK_HOLE report them.
fn data_extents(f: &std::fs::File) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    let mut off: libc::off_t = 0;
    loop {
        // SAFETY: lseek on a file descriptor `f` owns.
        let d = unsafe { libc::lseek(f.as_raw_fd(), off, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(f.as_raw_fd(), d, libc::SEEK_HOLE) };
        assert!(h > d, "SEEK_HOLE after {d}: {h}");
        out.push((d as u64, h as u64));
        off = h;
    }
    out
}

/// Kills colo-blk under allocating writes and checks the image. `strict`: also every
/// acknowledged write (not only the flushed ones) must be there, as block::qcow2::metadata
/// promises ("an acknowledged write survives a kill of the daemon").
fn crash_under_writes(cluster: u64, size: u64, strict: bool) {
    stop_under_writes(cluster, size, strict, libc::SIGKILL)
}

/// Stops colo-blk with `sig` under allocating writes and checks the image: SIGKILL may leave
/// leaked clusters (`qemu-img check` exit 3), SIGTERM (drain, flush, exit 0) nothing.
fn stop_under_writes(cluster: u64, size: u64, strict: bool, sig: libc::c_int) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("crash.qcow2");
    create_qcow2(&img, Some(size), None, Some(cluster));
    let mut srv = serve(&img, &[]);
    let killing = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let (socket, k2) = (srv.socket().to_path_buf(), killing.clone());
    let w = std::thread::spawn(move || writer(socket, size, cluster, k2, tx));

    // Let it write for ~2 s and flush a few times, then kill it right after a batch went
    // out (writes in flight, clusters being allocated).
    let start = Instant::now();
    let mut flushes = 0;
    loop {
        match rx.recv_timeout(WAIT) {
            Ok(Progress::Flushed(n)) => flushes = n,
            Ok(Progress::Submitted) if flushes >= 3 && start.elapsed() >= Duration::from_secs(2) => break,
            Ok(Progress::Submitted) => {}
            Err(e) => panic!("the writer stopped ({e}); log: {:?}", srv.log()),
        }
    }
    killing.store(true, Ordering::SeqCst);
    signal(&srv, sig);
    let st = srv.wait_exit();
    if sig == libc::SIGKILL {
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(libc::SIGKILL), "{st}");
    } else {
        assert!(st.success(), "colo-blk exited with {st} on signal {sig} under writes; log: {:?}", srv.log());
    }
    let log = w.join().expect("writer thread");
    assert!(log.flushes >= 3 && log.durable > 0, "{} flushes", log.flushes);
    drop(srv);

    let (code, t) = check(&img);
    let leaks_ok = sig == libc::SIGKILL && code == 3;
    assert!(code == 0 || leaks_ok, "qemu-img check after signal {sig} (cluster {cluster}): exit {code}\n{t}");
    eprintln!(
        "cluster {cluster}: {} writes, {} before the last flush; qemu-img check exit {code}",
        log.writes.len(),
        log.durable
    );

    // What QEMU reads, as a sparse raw file (zero blocks become holes).
    let raw = dir.path().join("crash.raw");
    let out = tool("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", &s(&img), &s(&raw)]);
    assert!(out.status.success(), "qemu-img convert: {}", text(&out));
    let f = std::fs::File::open(&raw).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    let block_at = |b: u64| {
        use std::os::unix::fs::FileExt;
        let mut v = vec![0u8; BLOCK as usize];
        f.read_exact_at(&mut v, b * BLOCK).unwrap();
        v
    };

    // Every written block: its last write before the last flush (or zeroes), or any write
    // after it.
    let mut allowed: HashMap<u64, (Option<u32>, Vec<u32>)> = HashMap::new();
    for (i, &(b, seq)) in log.writes.iter().enumerate() {
        let e = allowed.entry(b).or_default();
        if i < log.durable {
            e.0 = Some(seq);
        } else {
            e.1.push(seq);
        }
    }
    let zero = vec![0u8; BLOCK as usize];
    let want = |b: u64, seq: Option<u32>| seq.map_or_else(|| zero.clone(), |q| pattern(b * BLOCK, BLOCK as usize, q));
    for (&b, (durable, later)) in &allowed {
        let got = block_at(b);
        let ok = got == want(b, *durable) || later.iter().any(|&q| got == want(b, Some(q)));
        assert!(
            ok,
            "cluster size {cluster}: block {b} holds neither its flushed write ({durable:?}) nor a later one \
             ({later:?}); its first bytes: {:02x?}",
            &got[..16]
        );
    }
    // Stricter: the last acknowledged write of every block, or a later unacknowledged one.
    if strict {
        let mut last: HashMap<u64, (Option<u32>, Vec<u32>)> = HashMap::new();
        for (i, &(b, seq)) in log.writes.iter().enumerate() {
            let e = last.entry(b).or_default();
            if log.acked[i] {
                e.0 = Some(seq);
                e.1.clear();
            } else {
                e.1.push(seq);
            }
        }
        let unacked = log.acked.iter().filter(|a| !**a).count();
        let mut lost = Vec::new();
        for (&b, (acked, later)) in &last {
            let got = block_at(b);
            if !(got == want(b, *acked) || later.iter().any(|&q| got == want(b, Some(q)))) {
                lost.push(b);
            }
        }
        lost.sort();
        assert!(
            lost.is_empty(),
            "cluster size {cluster}: {} acknowledged writes lost by kill -9 ({unacked} writes were unacknowledged), \
             blocks {:?}...",
            lost.len(),
            &lost[..lost.len().min(8)]
        );
    }
    // Every other block reads zero.
    for (d, h) in data_extents(&f) {
        for b in d / BLOCK..h.div_ceil(BLOCK) {
            if !allowed.contains_key(&b) {
                assert!(block_at(b) == zero, "block {b} was never written but is not zero");
            }
        }
    }

    // colo-blk serves the crashed image again and reads what QEMU reads.
    let srv = serve(&img, &[]);
    let mut c = Client::connect(srv.socket(), 1, false);
    let blocks: BTreeSet<u64> = allowed.keys().copied().collect();
    for b in blocks {
        let (r, back) = c.read(0, b * BLOCK, BLOCK as usize);
        assert_eq!(r, 0);
        assert_same(&format!("block {b} after the restart"), &back, &block_at(b));
    }
    drop(c);
    stop(srv);
    let (code, t) = check(&img);
    assert!(code == 0 || code == 3, "qemu-img check after the restart: exit {code}\n{t}");
}

#[test]
fn kill_9_under_writes_leaves_a_clean_or_only_leaking_image() {
    require_tools();
    // The default cluster size, and 4 KiB clusters: every write then allocates, and L2
    // tables and refcount blocks are allocated all the time.
    // 65536 clusters each, so that writes still allocate when the daemon is killed.
    crash_under_writes(CLUSTER, 4 << 30, false);
    crash_under_writes(4 * KIB, 256 * MIB, false);
}

#[test]
fn sigterm_under_writes_leaves_a_clean_image_with_every_acknowledged_write() {
    require_tools();
    stop_under_writes(CLUSTER, 4 << 30, true, libc::SIGTERM);
    stop_under_writes(4 * KIB, 256 * MIB, true, libc::SIGTERM);
}

#[test]
fn kill_9_loses_no_acknowledged_write() {
    require_tools();
    crash_under_writes(CLUSTER, 4 << 30, true);
    crash_under_writes(4 * KIB, 256 * MIB, true);
}

// -------------------------------------------------------------- operator mistakes ---

/// Runs `colo-blk serve ARGS` expecting exit 2 within the deadline; returns stderr.
fn refused(args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("30")
        .arg(env!("CARGO_BIN_EXE_colo-blk"))
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?} not refused with exit 2: {err}");
    err
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// A qemu-io process holding `image` open until dropped.
struct Holder(std::process::Child);

impl Holder {
    fn new(fmt: &str, image: &Path, read_only: bool) -> Holder {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", fmt]);
        if read_only {
            cmd.arg("-r");
        }
        let mut child =
            cmd.arg(image).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "read 0 512").unwrap();
        // The image is open once qemu-io answers (a reader thread bounds the wait).
        let mut out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 256];
            while !String::from_utf8_lossy(&seen).contains("read 512/512") {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
            // Keep the pipe open while qemu-io runs.
            let _ = out.read_to_end(&mut Vec::new());
        });
        let seen = rx.recv_timeout(WAIT).expect("qemu-io did not answer");
        assert!(seen.contains("read 512/512"), "qemu-io could not open {}: {seen}", image.display());
        std::mem::forget(stdin);
        Holder(child)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn format_flag_mistakes_are_refused_and_change_nothing() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = s(&d.join("s.sock"));
    let q = d.join("vm.qcow2");
    create_qcow2(&q, Some(64 * MIB), None, None);
    qemu_io_ok("qcow2", &q, false, &["write -P 0x5a 0 64k".to_string()]);
    let qs = s(&q);
    let q_before = std::fs::read(&q).unwrap();
    let raw = d.join("raw.img");
    std::fs::write(&raw, vec![0x5au8; 8 * MIB as usize]).unwrap();
    let raw_before = std::fs::read(&raw).unwrap();
    let listing = entries(d);
    let unchanged = |what: &str| {
        assert!(std::fs::read(&q).unwrap() == q_before, "{what}: the qcow2 image changed");
        assert!(std::fs::read(&raw).unwrap() == raw_before, "{what}: the raw image changed");
        assert_eq!(entries(d), listing, "{what}: files were created or removed");
    };

    // A qcow2 image without --format names the format.
    let err = refused(&["--disk", &qs, "--socket", &sock]);
    assert!(err.contains("qcow2"), "{err}");
    unchanged("no --format");

    // --format qcow2 on a raw file.
    let err = refused(&["--disk", &s(&raw), "--format", "qcow2", "--socket", &sock]);
    assert!(err.contains(&s(&raw)) || err.contains("qcow2"), "{err}");
    unchanged("--format qcow2 on raw");

    // A missing image is not created, with or without --size.
    let missing = d.join("missing.qcow2");
    for extra in [&[][..], &["--size", "64M"][..]] {
        let mut args = vec!["--disk", missing.to_str().unwrap(), "--format", "qcow2", "--socket", &sock];
        args.extend_from_slice(extra);
        let err = refused(&args);
        assert!(["missing.qcow2", "--disk", "--size", "qcow2"].iter().any(|n| err.contains(n)), "{err}");
        assert!(!missing.exists(), "{extra:?}: the image was created");
        unchanged("missing image");
    }

    // --size other than the virtual size.
    let err = refused(&["--disk", &qs, "--format", "qcow2", "--size", "2G", "--socket", &sock]);
    assert!(err.contains("--size"), "{err}");
    unchanged("--size mismatch");

    // A backing file that is missing is named.
    let sub = tempfile::tempdir().unwrap();
    let base = sub.path().join("gone-base.raw");
    std::fs::write(&base, vec![0u8; 8 * MIB as usize]).unwrap();
    let top = sub.path().join("top.qcow2");
    create_qcow2(&top, None, Some(("gone-base.raw", "raw")), None);
    std::fs::remove_file(&base).unwrap();
    let top_before = std::fs::read(&top).unwrap();
    let err = refused(&["--disk", &s(&top), "--format", "qcow2", "--socket", &sock]);
    assert!(err.contains("gone-base.raw"), "the missing backing file is not named: {err}");
    assert!(!base.exists(), "the backing file was created");
    assert!(std::fs::read(&top).unwrap() == top_before, "the top changed");
    unchanged("missing backing file");

    // An image a QEMU tool holds: a writer, and a qcow2 reader (which shares no writes).
    for ro in [false, true] {
        let holder = Holder::new("qcow2", &q, ro);
        let err = refused(&["--disk", &qs, "--format", "qcow2", "--socket", &sock]);
        assert!(err.contains(&qs) || err.contains("lock"), "{err}");
        drop(holder);
        unchanged("held by qemu-io");
    }
    // Once free, it is served (the refusals were about the lock).
    let srv = serve(&q, &[]);
    let mut c = Client::connect(srv.socket(), 1, true);
    assert!(c.read(0, 0, 65536).1.iter().all(|&b| b == 0x5a));
    drop(c);
    stop(srv);
}

#[test]
fn the_backing_file_is_locked_shared_and_the_top_exclusively() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let model = pattern(0, 16 * MIB as usize, 0xF);
    std::fs::write(&base, &model).unwrap();
    let top = dir.path().join("top.qcow2");
    create_qcow2(&top, None, Some(("base.raw", "raw")), None);
    let srv = serve(&top, &[]);
    let mut c = Client::connect(srv.socket(), 1, false);
    write_ok(&mut c, 0, &[0x42u8; 4096]);

    // Inspection with -U (force share) works; without it QEMU's qcow2 opener is refused.
    let out = tool("qemu-img", &["info", "-U", &s(&top)]);
    assert!(out.status.success(), "qemu-img info -U: {}", text(&out));
    assert!(text(&out).contains("qcow2") && text(&out).contains("base.raw"), "{}", text(&out));
    let out = tool("qemu-img", &["info", &s(&top)]);
    assert!(!out.status.success(), "qemu-img info opened the served top without -U: {}", text(&out));

    // The top: no other writer.
    let (ok, t) = qemu_io("qcow2", &top, false, &["write -P 0x99 0 4k".to_string()]);
    assert!(!ok && t.contains("lock"), "qemu-io wrote into the served top: {t}");

    // The backing file: readers welcome, writers refused.
    let (ok, t) = qemu_io("raw", &base, true, &["read 0 4k".to_string()]);
    assert!(ok, "a reader of the backing file was refused: {t}");
    let (ok, t) = qemu_io("raw", &base, false, &["write -P 0x99 0 4k".to_string()]);
    assert!(!ok && t.contains("lock"), "qemu-io wrote into the backing file of a served image: {t}");
    assert!(std::fs::read(&base).unwrap() == model, "the base changed");

    // Nor does a second colo-blk open either for writing.
    let other = tempfile::tempdir().unwrap();
    let sock = s(&other.path().join("x.sock"));
    refused(&["--disk", &s(&base), "--format", "raw", "--socket", &sock]);
    refused(&["--disk", &s(&top), "--format", "qcow2", "--socket", &sock]);
    assert!(entries(other.path()).is_empty(), "a refused instance left {:?}", entries(other.path()));

    let (r, back) = c.read(0, 0, 8192);
    assert_eq!(r, 0);
    assert!(back[..4096].iter().all(|&b| b == 0x42) && back[4096..] == model[4096..8192]);
    drop(c);
    stop(srv);

    // Released at exit.
    qemu_io_ok("raw", &base, false, &["write -P 0x99 0 4k".to_string()]);
    qemu_io_ok("qcow2", &top, false, &["read -P 0x42 0 4k".to_string()]);
}

// ------------------------------------------------------------- more of the format ---

/// Submits queued requests on queue `qi` without waiting.
fn kick(c: &mut Client, qi: usize) {
    let mut none: [MaybeUninit<blkio::Completion>; 0] = [];
    c.queues[qi].do_io(&mut none, 0, None, None).expect("submit");
}

/// Waits for `n` completions on queue `qi`; returns (user_data, ret) of each.
fn wait_queue(c: &mut Client, qi: usize, n: usize) -> Vec<(usize, i32)> {
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::with_capacity(n);
    let mut comps: Vec<MaybeUninit<blkio::Completion>> = (0..64).map(|_| MaybeUninit::uninit()).collect();
    while out.len() < n {
        let mut left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "queue {qi}: {} of {n} requests completed within {WAIT:?}", out.len());
        let k = c.queues[qi].do_io(&mut comps, 1, Some(&mut left), None).expect("do_io");
        for comp in &comps[..k] {
            // SAFETY: do_io initialised the first k completions.
            let comp = unsafe { comp.assume_init_ref() };
            out.push((comp.user_data, comp.ret));
        }
    }
    out
}

/// One request of a round: its queue, offset, and for a read the old and the new data.
type Slot = (usize, u64, Option<(Vec<u8>, Vec<u8>)>);

/// Four queues write different 4 KiB blocks of the same unallocated clusters at the same
/// time (each cluster's last block stays the base's), while reads of those blocks race with
/// the allocations.
fn race_allocations(engine: &str, with_backing: bool) {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let top = dir.path().join("top.qcow2");
    let mut model = if with_backing {
        let base = dir.path().join("base.raw");
        let m = pattern(0, size as usize, 0x2A);
        std::fs::write(&base, &m).unwrap();
        create_qcow2(&top, None, Some(("base.raw", "raw")), None);
        m
    } else {
        create_qcow2(&top, Some(size), None, None);
        vec![0u8; size as usize]
    };
    let srv = serve(&top, &["--num-queues", "4", "--io-engine", engine]);
    let mut c = Client::connect(srv.socket(), 4, false);
    assert_eq!(c.queues.len(), 4);
    let mut touched = BTreeSet::new();
    let mut seq = 0u32;
    for round in 0..24u64 {
        let clusters: Vec<u64> = (0..8).map(|i| 16 + round * 8 + i).collect();
        touched.extend(clusters.iter().copied());
        let mut slots: Vec<Slot> = Vec::new();
        let mut new_data: HashMap<u64, Vec<u8>> = HashMap::new();
        for &cl in &clusters {
            for k in 0..15u64 {
                let off = cl * CLUSTER + k * BLOCK;
                seq += 1;
                new_data.insert(off, pattern(off, BLOCK as usize, 1000 + seq));
            }
        }
        for q in 0..4usize {
            for &cl in &clusters {
                for k in [q as u64, q as u64 + 4, q as u64 + 8, q as u64 + 12] {
                    if k == 15 {
                        continue;
                    }
                    let off = cl * CLUSTER + k * BLOCK;
                    let slot = slots.len();
                    let data = &new_data[&off];
                    c.buf(slot * BLOCK as usize, BLOCK as usize).copy_from_slice(data);
                    let ptr = (c.region.addr + slot * BLOCK as usize) as *const u8;
                    c.queues[q].write(off, ptr, BLOCK as usize, slot, ReqFlags::empty());
                    slots.push((q, off, None));
                }
                // A block another queue is writing right now.
                let off = cl * CLUSTER + ((q as u64 + 1) % 4) * BLOCK;
                let slot = slots.len();
                let ptr = (c.region.addr + slot * BLOCK as usize) as *mut u8;
                c.queues[q].read(off, ptr, BLOCK as usize, slot, ReqFlags::empty());
                let old = model[off as usize..(off + BLOCK) as usize].to_vec();
                slots.push((q, off, Some((old, new_data[&off].clone()))));
            }
        }
        for q in 0..4 {
            kick(&mut c, q);
        }
        for q in 0..4 {
            let n = slots.iter().filter(|s| s.0 == q).count();
            for (slot, ret) in wait_queue(&mut c, q, n) {
                let (_, off, read) = &slots[slot];
                assert_eq!(ret, 0, "{engine}: request at {off} failed");
                if let Some((old, new)) = read {
                    let got = c.buf(slot * BLOCK as usize, BLOCK as usize).to_vec();
                    for (i, sec) in got.chunks(SECTOR).enumerate() {
                        let r = i * SECTOR..(i + 1) * SECTOR;
                        assert!(
                            sec == &old[r.clone()] || sec == &new[r],
                            "{engine}: a read racing the allocation of {off} returned neither the old nor the new data \
                             (sector {i})"
                        );
                    }
                }
            }
        }
        for (off, data) in new_data {
            apply(&mut model, off, &data);
        }
    }
    let all = read_range(&mut c, 0, size as usize);
    assert_same(&format!("{engine}: after racing allocations, through colo-blk"), &all, &model);
    assert_eq!(c.flush(0), 0);
    drop(c);
    stop(srv);
    assert_same(&format!("{engine}: after racing allocations, qemu-img convert"), &qemu_content(&top), &model);
    check_clean(&top);
    assert_eq!(top_data_clusters(&map(&top), CLUSTER), touched, "{engine}: clusters allocated in the top");
}

#[test]
fn concurrent_writes_into_the_same_new_clusters_all_land() {
    require_tools();
    race_allocations("uring", true);
    race_allocations("sync", true);
    race_allocations("uring", false);
}

/// Compressible content, distinct per 4 KiB block.
fn compressible(size: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    for (b, blk) in v.chunks_mut(BLOCK as usize).enumerate() {
        blk.fill((b % 251) as u8 ^ 0x5A);
        blk[..8].copy_from_slice(&(b as u64).to_le_bytes());
    }
    v
}

#[test]
fn compressed_clusters_read_and_are_rewritten_correctly() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let mut model = compressible(size);
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, &model).unwrap();
    let img = dir.path().join("comp.qcow2");
    let out = tool("qemu-img", &["convert", "-c", "-f", "raw", "-O", "qcow2", &s(&raw), &s(&img)]);
    assert!(out.status.success(), "{}", text(&out));
    let m = map(&img);
    let compressed: u64 = m.iter().filter(|e| e["compressed"] == true).map(|e| e["length"].as_u64().unwrap()).sum();
    assert!(compressed >= size / 2, "the test image is not compressed: {m:?}");

    let srv = serve(&img, &[]);
    let mut c = Client::connect(srv.socket(), 1, false);
    let all = read_range(&mut c, 0, size as usize);
    assert_same("compressed image through colo-blk", &all, &model);
    let writes: &[(u64, u64)] = &[
        (3 * CLUSTER + 20 * KIB, 4 * KIB), // inside a compressed cluster
        (5 * CLUSTER, CLUSTER),            // a whole compressed cluster
        (8 * CLUSTER - 8 * KIB, 16 * KIB), // across two
        (9 * CLUSTER + 1536, 512),         // one sector
        (3 * CLUSTER + 40 * KIB, 4 * KIB), // the first cluster again (now plain)
    ];
    for (i, &(o, l)) in writes.iter().enumerate() {
        let data = pattern(o, l as usize, 0x300 + i as u32);
        write_ok(&mut c, o, &data);
        apply(&mut model, o, &data);
    }
    assert_eq!(c.write_zeroes(0, 11 * CLUSTER, 2 * CLUSTER, true), 0);
    model[(11 * CLUSTER) as usize..(13 * CLUSTER) as usize].fill(0);
    assert_eq!(c.discard(0, 14 * CLUSTER, CLUSTER), 0);
    model[(14 * CLUSTER) as usize..(15 * CLUSTER) as usize].fill(0);
    let all = read_range(&mut c, 0, size as usize);
    assert_same("compressed image after writes, through colo-blk", &all, &model);
    assert_eq!(c.flush(0), 0);
    drop(c);
    stop(srv);
    assert_same("compressed image after writes, qemu-img convert", &qemu_content(&img), &model);
    check_clean(&img);
}

#[test]
fn readonly_serves_without_writing_and_shares_the_image() {
    use common::frontend::{BlkFrontend, T_IN, T_OUT};
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.qcow2");
    create_qcow2(&img, Some(16 * MIB), None, None);
    qemu_io_ok("qcow2", &img, false, &["write -P 0x3c 64k 128k".to_string()]);
    let before = std::fs::read(&img).unwrap();
    let srv = serve(&img, &["--readonly"]);
    let mut fe = BlkFrontend::connect(srv.socket());
    let r = fe.io(T_IN, 64 * KIB / 512, &[0u8; 8192]);
    assert_eq!(r.status, 0);
    assert!(r.data.iter().all(|&b| b == 0x3c));
    assert_ne!(fe.io(T_OUT, 0, &[0x77u8; 4096]).status, 0, "a write to a read-only export succeeded");
    assert_ne!(fe.io(T_OUT, 64 * KIB / 512, &[0x77u8; 4096]).status, 0, "a write to a read-only export succeeded");
    // QEMU's qcow2 readers may share a read-only image; writers stay out.
    qemu_io_ok("qcow2", &img, true, &["read -P 0x3c 64k 4k".to_string()]);
    let (ok, t) = qemu_io("qcow2", &img, false, &["write -P 0x99 0 4k".to_string()]);
    assert!(!ok && t.contains("lock"), "qemu-io wrote into an image served read-only: {t}");
    drop(fe);
    stop(srv);
    assert!(std::fs::read(&img).unwrap() == before, "serving read-only changed the image file");
}

#[test]
fn block_resize_grows_and_shrinks_a_qcow2_image() {
    use common::pair::qmp;
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("rs.qcow2");
    create_qcow2(&img, Some(32 * MIB), None, None);
    let mut srv = serve(&img, &[]);
    let mut model = vec![0u8; 32 * MIB as usize];
    {
        let mut c = Client::connect(srv.socket(), 1, false);
        let d = pattern(32 * MIB - 64 * KIB, 64 * KIB as usize, 1);
        write_ok(&mut c, 32 * MIB - 64 * KIB, &d);
        apply(&mut model, 32 * MIB - 64 * KIB, &d);
    }
    srv.server_mut().wait_log("frontend disconnected");
    assert_eq!(qmp(srv.server(), "block_resize", serde_json::json!({"size": 64 * MIB})), Ok(serde_json::json!({})));
    model.resize(64 * MIB as usize, 0);
    let mut c = Client::connect(srv.socket(), 1, false);
    assert_eq!(c.capacity, 64 * MIB);
    let d = pattern(60 * MIB, 128 * KIB as usize, 2);
    write_ok(&mut c, 60 * MIB, &d);
    apply(&mut model, 60 * MIB, &d);
    let all = read_range(&mut c, 0, 64 * MIB as usize);
    assert_same("after growing", &all, &model);
    drop(c);
    srv.server_mut().wait_log("frontend disconnected");
    // Shrinking: done (then the data below the new end stays) or refused (then nothing
    // changed).
    let shrunk = qmp(srv.server(), "block_resize", serde_json::json!({"size": 48 * MIB}));
    if shrunk.is_ok() {
        model.truncate(48 * MIB as usize);
    }
    let mut c = Client::connect(srv.socket(), 1, false);
    assert_eq!(c.capacity, model.len() as u64, "shrink answered {shrunk:?}");
    let all = read_range(&mut c, 0, model.len());
    assert_same("after the shrink request", &all, &model);
    drop(c);
    stop(srv);
    let out = tool("qemu-img", &["info", "--output=json", &s(&img)]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], model.len() as u64, "{info}");
    assert_same("after resizing, qemu-img convert", &qemu_content(&img), &model);
    check_clean(&img);
}

#[test]
fn a_backing_file_shorter_than_the_top_reads_zero_past_its_end() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    // The base ends inside a cluster.
    let base_len = 8 * MIB + 12 * KIB;
    let size = 32 * MIB;
    let base = dir.path().join("short.raw");
    let b = pattern(0, base_len as usize, 0x5B);
    std::fs::write(&base, &b).unwrap();
    let top = dir.path().join("top.qcow2");
    create_qcow2(&top, Some(size), Some(("short.raw", "raw")), None);
    let mut model = vec![0u8; size as usize];
    model[..b.len()].copy_from_slice(&b);
    let srv = serve(&top, &[]);
    let mut c = Client::connect(srv.socket(), 1, false);
    assert_eq!(c.capacity, size);
    let all = read_range(&mut c, 0, size as usize);
    assert_same("short base through colo-blk", &all, &model);
    for (i, (o, l)) in [(8 * MIB + 4 * KIB, 4 * KIB), (8 * MIB + 10 * KIB, 4 * KIB), (20 * MIB + 4 * KIB, 4 * KIB)]
        .into_iter()
        .enumerate()
    {
        let d = pattern(o, l as usize, 0x400 + i as u32);
        write_ok(&mut c, o, &d);
        apply(&mut model, o, &d);
    }
    let all = read_range(&mut c, 0, size as usize);
    assert_same("short base after writes, through colo-blk", &all, &model);
    drop(c);
    stop(srv);
    assert!(std::fs::read(&base).unwrap() == b, "the base changed");
    assert_same("short base after writes, qemu-img convert", &qemu_content(&top), &model);
    check_clean(&top);
}

/// An image made by `make` (content `model`): colo-blk either refuses it at start (exit 2,
/// image unchanged) or serves it correctly (reads, partial-cluster writes, write-zeroes,
/// read back by QEMU, `qemu-img check` clean). Returns whether it was served.
fn served_correctly_or_refused(what: &str, img: &Path, mut model: Vec<u8>) -> bool {
    let before = std::fs::read(img).unwrap();
    let srv = match try_serve(img, &[]) {
        Err(err) => {
            eprintln!("{what}: refused: {}", err.trim());
            assert!(std::fs::read(img).unwrap() == before, "{what}: refused, but the image changed");
            return false;
        }
        Ok(b) => b,
    };
    let size = model.len() as u64;
    let mut c = Client::connect(srv.socket(), 1, false);
    assert_eq!(c.capacity, size, "{what}");
    let all = read_range(&mut c, 0, size as usize);
    assert_same(&format!("{what}: read through colo-blk"), &all, &model);
    for (i, (o, l)) in [(4 * KIB, 4 * KIB), (3 * MIB - 2 * KIB, 4 * KIB), (5 * MIB + 512, 512)].into_iter().enumerate()
    {
        let d = pattern(o, l as usize, 0x500 + i as u32);
        write_ok(&mut c, o, &d);
        apply(&mut model, o, &d);
    }
    assert_eq!(c.write_zeroes(0, 2 * MIB, MIB, true), 0, "{what}: write-zeroes (unmap); log: {:?}", srv.log());
    // Over part of the write that crosses 3 MiB: its tail stays.
    model[2 * MIB as usize..3 * MIB as usize].fill(0);
    assert_eq!(c.write_zeroes(0, 6 * MIB + 4 * KIB, 8 * KIB, false), 0, "{what}: write-zeroes; log: {:?}", srv.log());
    model[(6 * MIB + 4 * KIB) as usize..(6 * MIB + 12 * KIB) as usize].fill(0);
    let all = read_range(&mut c, 0, size as usize);
    assert_same(&format!("{what}: after writes, through colo-blk"), &all, &model);
    assert_eq!(c.flush(0), 0);
    drop(c);
    stop(srv);
    assert_same(&format!("{what}: after writes, qemu-img convert"), &qemu_content(img), &model);
    let (code, t) = check(img);
    assert_eq!(code, 0, "{what}: qemu-img check: {t}");
    eprintln!("{what}: served correctly");
    true
}

#[test]
fn images_with_other_qcow2_features_are_served_correctly_or_refused() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let d = |n: &str| dir.path().join(n);
    // Content every variant starts with (written by QEMU).
    let cmds: Vec<String> =
        ["write -P 0x61 0 1M", "write -P 0x62 2M 2M", "write -P 0x63 6M 64k"].iter().map(|c| c.to_string()).collect();
    let mut model = vec![0u8; size as usize];
    model[..MIB as usize].fill(0x61);
    model[2 * MIB as usize..4 * MIB as usize].fill(0x62);
    model[6 * MIB as usize..(6 * MIB + 64 * KIB) as usize].fill(0x63);
    let make = |name: &str, opts: &str| {
        let p = d(name);
        let out = tool("qemu-img", &["create", "-q", "-f", "qcow2", "-o", opts, &s(&p), &size.to_string()]);
        assert!(out.status.success(), "{opts}: {}", text(&out));
        qemu_io_ok("qcow2", &p, false, &cmds);
        p
    };
    let mut served = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    // (An external data file is named by an absolute path: qemu-img creates it relative to
    // its working directory.)
    let data_file = format!("data_file={}", s(&d("datafile.data")));
    for (name, opts) in [
        ("v2.qcow2", "compat=0.10"),
        ("lazy.qcow2", "lazy_refcounts=on"),
        ("subclusters.qcow2", "extended_l2=on"),
        ("refcount1.qcow2", "refcount_bits=1"),
        ("refcount64.qcow2", "refcount_bits=64"),
        ("small-clusters.qcow2", "cluster_size=512"),
        ("big-clusters.qcow2", "cluster_size=2M"),
        ("datafile.qcow2", data_file.as_str()),
    ] {
        let p = make(name, opts);
        // Every variant runs; the failures are reported together.
        match std::panic::catch_unwind(|| served_correctly_or_refused(opts, &p, model.clone())) {
            Ok(true) => served.push(opts.to_string()),
            Ok(false) => {}
            Err(e) => failed.push(format!(
                "{opts}: {}",
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        }
    }
    // zstd-compressed clusters.
    let raw = d("zsrc.raw");
    let src = compressible(size);
    std::fs::write(&raw, &src).unwrap();
    let z = d("zstd.qcow2");
    let out = tool(
        "qemu-img",
        &["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", &s(&raw), &s(&z)],
    );
    assert!(out.status.success(), "{}", text(&out));
    match std::panic::catch_unwind(|| served_correctly_or_refused("compression_type=zstd", &z, src)) {
        Ok(true) => served.push("compression_type=zstd".into()),
        Ok(false) => {}
        Err(_) => failed.push("compression_type=zstd: see the panic above".into()),
    }
    eprintln!("served: {served:?}");

    // An encrypted image is never served (its clusters are ciphertext).
    let enc = d("enc.qcow2");
    let out = tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=colo",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            &s(&enc),
            "16M",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = tool(
        "qemu-io",
        &[
            "--object",
            "secret,id=sec0,data=colo",
            "--image-opts",
            &format!("driver=qcow2,file.filename={},encrypt.key-secret=sec0", s(&enc)),
            "-c",
            "write -P 0x61 0 64k",
        ],
    );
    assert!(out.status.success() && !text(&out).contains("failed"), "{}", text(&out));
    let before = std::fs::read(&enc).unwrap();
    let err = match try_serve(&enc, &[]) {
        Err(err) => err,
        Ok(b) => {
            let mut c = Client::connect(b.socket(), 1, true);
            let (r, data) = c.read(0, 0, 4096);
            let plain = data.iter().all(|&x| x == 0x61);
            drop(c);
            stop(b);
            panic!(
                "an encrypted (LUKS) qcow2 image was served; the guest reads {} at offset 0 (QEMU wrote 0x61 \
                 there), read result {r}",
                if plain { "the plaintext" } else { "ciphertext" }
            );
        }
    };
    assert!(err.contains(&s(&enc)) || err.contains("encrypt"), "{err}");
    assert!(std::fs::read(&enc).unwrap() == before, "the encrypted image changed");
    assert!(failed.is_empty(), "served, but wrongly:\n{}", failed.join("\n"));
}

#[test]
fn a_v2_image_over_a_backing_file_reads_zero_after_write_zeroes() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let base = dir.path().join("base.raw");
    let mut model = pattern(0, size as usize, 0x6C);
    std::fs::write(&base, &model).unwrap();
    let top = dir.path().join("v2.qcow2");
    let out = tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.raw", "-F", "raw", &s(&top)],
    );
    assert!(out.status.success(), "{}", text(&out));
    // qcow2 v2 has no zero clusters: zeroes over a backing file must be written as data.
    let srv = match try_serve(&top, &[]) {
        Err(err) => {
            eprintln!("v2 over a backing file refused: {err}");
            return;
        }
        Ok(b) => b,
    };
    let mut c = Client::connect(srv.socket(), 1, false);
    let results = [
        ("write-zeroes (unmap)", c.write_zeroes(0, MIB, MIB, true)),
        ("discard", c.discard(0, 4 * MIB, MIB)),
        ("write-zeroes (no unmap)", c.write_zeroes(0, 6 * MIB + 4 * KIB, 4 * KIB, false)),
    ];
    assert!(results.iter().all(|r| r.1 == 0), "v2 image: {results:?}; log: {:?}", srv.log());
    model[MIB as usize..2 * MIB as usize].fill(0);
    model[(6 * MIB + 4 * KIB) as usize..(6 * MIB + 8 * KIB) as usize].fill(0);
    // The discarded range: zero or the base's data, per sector (v2 cannot mark zero).
    let got = read_range(&mut c, 4 * MIB, MIB as usize);
    zero_or_old("v2 discard over the base", &got, &model[4 * MIB as usize..5 * MIB as usize]);
    apply(&mut model, 4 * MIB, &got);
    let all = read_range(&mut c, 0, size as usize);
    assert_same("v2 top after zeroing, through colo-blk", &all, &model);
    assert_eq!(c.flush(0), 0);
    drop(c);
    stop(srv);
    assert_same("v2 top after zeroing, qemu-img convert", &qemu_content(&top), &model);
    check_clean(&top);
}

/// Discards and write-zeroes (freeing clusters that new allocations may reuse) on one queue
/// while three other queues write (allocating and overwriting) elsewhere: nothing written
/// is lost or misplaced, nothing freed shows old data.
#[test]
fn discards_racing_with_writes_on_other_queues_corrupt_nothing() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let img = dir.path().join("churn.qcow2");
    create_qcow2(&img, Some(size), None, None);
    let srv = serve(&img, &["--num-queues", "4"]);
    let mut c = Client::connect(srv.socket(), 4, false);
    let mut model = vec![0u8; size as usize];
    let clusters = size / CLUSTER;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut seq = 0u32;
    for round in 0..40u32 {
        // This round's discards: up to 4 runs of 1..4 clusters; the writes avoid them.
        let mut zeroed: Vec<(u64, u64, bool)> = Vec::new();
        let mut busy = BTreeSet::new();
        for _ in 0..4 {
            let start = xorshift(&mut seed) % (clusters - 4);
            let n = 1 + xorshift(&mut seed) % 4;
            if (start..start + n).any(|x| busy.contains(&x)) {
                continue;
            }
            busy.extend(start..start + n);
            zeroed.push((start * CLUSTER, n * CLUSTER, xorshift(&mut seed).is_multiple_of(2)));
        }
        let mut writes: Vec<(usize, u64, Vec<u8>)> = Vec::new();
        let mut written = BTreeSet::new();
        while writes.len() < 48 {
            let b = xorshift(&mut seed) % (size / BLOCK);
            if busy.contains(&(b * BLOCK / CLUSTER)) || !written.insert(b) {
                continue;
            }
            seq += 1;
            writes.push((writes.len() % 3, b * BLOCK, pattern(b * BLOCK, BLOCK as usize, 2000 + seq)));
        }
        for (slot, (q, off, data)) in writes.iter().enumerate() {
            c.buf(slot * BLOCK as usize, BLOCK as usize).copy_from_slice(data);
            let ptr = (c.region.addr + slot * BLOCK as usize) as *const u8;
            c.queues[*q].write(*off, ptr, BLOCK as usize, slot, ReqFlags::empty());
        }
        for (i, &(off, len, discard)) in zeroed.iter().enumerate() {
            if discard {
                c.queues[3].discard(off, len, i, ReqFlags::empty());
            } else {
                c.queues[3].write_zeroes(off, len, i, ReqFlags::empty());
            }
        }
        for q in 0..4 {
            kick(&mut c, q);
        }
        for q in 0..3 {
            let n = writes.iter().filter(|w| w.0 == q).count();
            for (slot, ret) in wait_queue(&mut c, q, n) {
                assert_eq!(ret, 0, "round {round}: write at {} failed", writes[slot].1);
            }
        }
        for (i, ret) in wait_queue(&mut c, 3, zeroed.len()) {
            assert_eq!(ret, 0, "round {round}: zeroing {:?} failed; log: {:?}", zeroed[i], srv.log());
        }
        for (_, off, data) in &writes {
            apply(&mut model, *off, data);
        }
        for &(off, len, _) in &zeroed {
            model[off as usize..(off + len) as usize].fill(0);
        }
        if round % 10 == 9 {
            let all = read_range(&mut c, 0, size as usize);
            assert_same(&format!("after round {round}, through colo-blk"), &all, &model);
        }
    }
    assert_eq!(c.flush(0), 0);
    drop(c);
    stop(srv);
    assert_same("after racing discards, qemu-img convert", &qemu_content(&img), &model);
    check_clean(&img);
}

/// Vectored requests with odd segment sizes over clusters whose host offsets run backwards
/// (each cluster boundary splits the request and its segments), over allocated and
/// unallocated clusters.
fn vectored(extra: &[&str]) {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let img = dir.path().join("vec.qcow2");
    create_qcow2(&img, Some(size), None, None);
    // (A cluster written first makes the file's length a multiple of the cluster size, so
    // that this test does not depend on o_direct_serves_a_freshly_created_image.)
    qemu_io_ok("qcow2", &img, false, &["write -P 0x7e 15M 64k".to_string()]);
    let mut model = vec![0u8; size as usize];
    model[15 * MIB as usize..(15 * MIB + CLUSTER) as usize].fill(0x7e);
    let srv = serve(&img, extra);
    let mut c = Client::connect(srv.socket(), 1, false);
    // Clusters 9, 8, ..., 1 allocated in that order: guest-adjacent clusters are host-apart.
    for cl in (1..10u64).rev() {
        let d = pattern(cl * CLUSTER, CLUSTER as usize, 1);
        write_ok(&mut c, cl * CLUSTER, &d);
        apply(&mut model, cl * CLUSTER, &d);
    }
    let lens: Vec<usize> = vec![512, 1536, 4608, 60928, 512, 65536, 1024, 3072, 512];
    let total: usize = lens.iter().sum();
    for off in [2 * CLUSTER - 1536, 8 * CLUSTER + 512] {
        let (r, segs) = c.readv(0, off, &lens);
        assert_eq!(r, 0, "readv at {off}");
        assert_same(&format!("readv at {off}"), &segs.concat(), &model[off as usize..off as usize + total]);
    }
    // Writes: across allocated clusters (split), and from allocated into unallocated ones.
    for (i, off) in [4 * CLUSTER - 3072, 9 * CLUSTER - 2560, 12 * CLUSTER + 1024].into_iter().enumerate() {
        let data = pattern(off, total, 0x600 + i as u32);
        let mut segs = Vec::new();
        let mut at = 0;
        for &l in &lens {
            segs.push(data[at..at + l].to_vec());
            at += l;
        }
        assert_eq!(c.writev(0, off, &segs), 0, "writev at {off}");
        apply(&mut model, off, &data);
        let (r, back) = c.readv(0, off - 512, &[512, total, 512]);
        assert_eq!(r, 0);
        let lo = (off - 512) as usize;
        assert_same(&format!("after writev at {off}"), &back.concat(), &model[lo..lo + total + 1024]);
    }
    let all = read_range(&mut c, 0, size as usize);
    assert_same("after vectored writes, through colo-blk", &all, &model);
    drop(c);
    stop(srv);
    assert_same("after vectored writes, qemu-img convert", &qemu_content(&img), &model);
    check_clean(&img);
}

#[test]
fn vectored_requests_split_across_discontiguous_clusters() {
    vectored(&[]);
}

#[test]
fn vectored_requests_split_across_discontiguous_clusters_with_o_direct() {
    vectored(&["--direct"]);
}

/// `qemu-img create` leaves a qcow2 file whose length is not a multiple of 512 (196616 bytes
/// with the defaults); O_DIRECT must still open and serve it, as QEMU's cache.direct=on does.
#[test]
fn o_direct_serves_a_freshly_created_image() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fresh.qcow2");
    create_qcow2(&img, Some(16 * MIB), None, None);
    let len = std::fs::metadata(&img).unwrap().len();
    eprintln!("fresh image: {len} bytes");
    let srv = match try_serve(&img, &["--direct"]) {
        Ok(b) => b,
        Err(e) => panic!("--direct refused a fresh qcow2 image of {len} bytes: {e}"),
    };
    let mut c = Client::connect(srv.socket(), 1, false);
    let d = pattern(MIB + 4 * KIB, 8 * KIB as usize, 7);
    write_ok(&mut c, MIB + 4 * KIB, &d);
    let (r, back) = c.read(0, MIB, 16 * KIB as usize);
    assert_eq!(r, 0);
    assert_same("fresh image with O_DIRECT", &back[4 * KIB as usize..12 * KIB as usize], &d);
    assert!(back[..4 * KIB as usize].iter().chain(&back[12 * KIB as usize..]).all(|&b| b == 0));
    drop(c);
    stop(srv);
    qemu_io_ok("qcow2", &img, true, &[format!("read -P 0 {} 4k", MIB)]);
    check_clean(&img);
}

#[test]
fn a_three_level_chain_with_o_direct() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let base = dir.path().join("base.raw");
    let mut model = pattern(0, size as usize, 0x1D);
    std::fs::write(&base, &model).unwrap();
    let mid = dir.path().join("mid.qcow2");
    create_qcow2(&mid, None, Some(("base.raw", "raw")), None);
    qemu_io_ok("qcow2", &mid, false, &["write -P 0xc4 640k 16k".to_string()]);
    model[640 * KIB as usize..656 * KIB as usize].fill(0xc4);
    let top = dir.path().join("top.qcow2");
    create_qcow2(&top, None, Some(("mid.qcow2", "qcow2")), None);
    // Cluster 10 of the top (written by exercise_chain too), so that the top's length is a
    // multiple of the cluster size (see o_direct_serves_a_freshly_created_image).
    qemu_io_ok("qcow2", &top, false, &["write -P 0xc5 640k 4k".to_string()]);
    model[640 * KIB as usize..644 * KIB as usize].fill(0xc5);
    exercise_chain(&top, &[&mid, &base], model, &["--direct"]);
}

/// Shrinking the top of a chain and growing it again: the grown part reads zeroes, not the
/// longer backing file's data (as `qemu-img resize` does).
#[test]
fn resize_over_a_longer_backing_file_reads_zeroes_in_the_grown_part() {
    use common::pair::qmp;
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let base = dir.path().join("base.raw");
    let b = pattern(0, size as usize, 0x7B);
    std::fs::write(&base, &b).unwrap();
    let top = dir.path().join("top.qcow2");
    create_qcow2(&top, None, Some(("base.raw", "raw")), None);
    let mut srv = serve(&top, &[]);
    let mut model = b.clone();
    {
        let mut c = Client::connect(srv.socket(), 1, false);
        let d = pattern(40 * MIB, 64 * KIB as usize, 3);
        write_ok(&mut c, 40 * MIB, &d);
        apply(&mut model, 40 * MIB, &d);
    }
    srv.server_mut().wait_log("frontend disconnected");
    for sz in [32 * MIB, 64 * MIB] {
        let r = qmp(srv.server(), "block_resize", serde_json::json!({ "size": sz }));
        assert_eq!(r, Ok(serde_json::json!({})), "block_resize to {sz}");
    }
    model[32 * MIB as usize..].fill(0);
    let mut c = Client::connect(srv.socket(), 1, false);
    assert_eq!(c.capacity, size);
    let all = read_range(&mut c, 0, size as usize);
    assert_same("after shrinking and growing the top, through colo-blk", &all, &model);
    drop(c);
    stop(srv);
    assert!(std::fs::read(&base).unwrap() == b, "the base changed");
    assert_same("after shrinking and growing the top, qemu-img convert", &qemu_content(&top), &model);
    check_clean(&top);
}

/// Allocating writes spread over many L2 tables (a 4 GiB image: one L2 table per 512 MiB),
/// 16 in flight: every one reads back through colo-blk while it runs, and through QEMU after
/// a clean stop.
#[test]
fn allocations_spread_over_many_l2_tables_all_land() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 30;
    let img = dir.path().join("wide.qcow2");
    create_qcow2(&img, Some(size), None, None);
    let srv = serve(&img, &[]);
    let mut c = Client::connect(srv.socket(), 1, false);
    let mut seed = 0x1234_5678_9ABC_DEF1u64;
    let mut last: HashMap<u64, u32> = HashMap::new();
    let mut seq = 0u32;
    for _ in 0..300 {
        let mut blocks = Vec::new();
        while blocks.len() < BATCH {
            let b = xorshift(&mut seed) % (size / BLOCK);
            if !blocks.contains(&b) {
                blocks.push(b);
            }
        }
        for (i, &b) in blocks.iter().enumerate() {
            seq += 1;
            c.buf(i * BLOCK as usize, BLOCK as usize).copy_from_slice(&pattern(b * BLOCK, BLOCK as usize, seq));
            let ptr = (c.region.addr + i * BLOCK as usize) as *const u8;
            c.queues[0].write(b * BLOCK, ptr, BLOCK as usize, i, ReqFlags::empty());
            last.insert(b, seq);
        }
        kick(&mut c, 0);
        for (i, ret) in wait_queue(&mut c, 0, BATCH) {
            assert_eq!(ret, 0, "write of block {} failed", blocks[i]);
        }
    }
    let mut lost = Vec::new();
    for (&b, &q) in &last {
        let (r, got) = c.read(0, b * BLOCK, BLOCK as usize);
        assert_eq!(r, 0);
        if got != pattern(b * BLOCK, BLOCK as usize, q) {
            lost.push(b);
        }
    }
    lost.sort();
    assert!(
        lost.is_empty(),
        "{} of {} written blocks read back wrong through the running colo-blk, e.g. {:?}",
        lost.len(),
        last.len(),
        &lost[..lost.len().min(8)]
    );
    assert_eq!(c.flush(0), 0);
    drop(c);
    stop(srv);
    let (code, t) = check(&img);
    assert_eq!(code, 0, "qemu-img check: {t}");
    let raw = dir.path().join("wide.raw");
    let out = tool("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", &s(&img), &s(&raw)]);
    assert!(out.status.success(), "{}", text(&out));
    let f = std::fs::File::open(&raw).unwrap();
    let mut lost = Vec::new();
    for (&b, &q) in &last {
        use std::os::unix::fs::FileExt;
        let mut v = vec![0u8; BLOCK as usize];
        f.read_exact_at(&mut v, b * BLOCK).unwrap();
        if v != pattern(b * BLOCK, BLOCK as usize, q) {
            lost.push(b);
        }
    }
    lost.sort();
    assert!(
        lost.is_empty(),
        "{} of {} written blocks read back wrong by QEMU after a clean stop, e.g. {:?}",
        lost.len(),
        last.len(),
        &lost[..lost.len().min(8)]
    );
}

/// An external data file holds the guest's data: while colo-blk serves the image, no other
/// process may write it (QEMU holds it like the image itself), and colo-blk's writes reach it.
#[test]
fn an_external_data_file_is_written_and_locked_against_other_writers() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("meta.qcow2");
    let data = dir.path().join("meta.data");
    let out = tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", &format!("data_file={},data_file_raw=on", s(&data)), &s(&img), "16M"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let srv = match try_serve(&img, &[]) {
        Ok(b) => b,
        Err(e) => {
            // Refusing external data files is allowed; then there is nothing to lock.
            eprintln!("external data file refused: {e}");
            return;
        }
    };
    let mut c = Client::connect(srv.socket(), 1, false);
    write_ok(&mut c, MIB, &[0x4d; 4096]);
    assert_eq!(c.flush(0), 0);
    // data_file_raw=on: the data file is a raw image of the guest disk.
    assert!(common::file_range(&data, MIB, 4096).iter().all(|&b| b == 0x4d), "the write did not reach the data file");
    let (ok, t) = qemu_io("raw", &data, false, &["write -P 0x99 1M 4k".to_string()]);
    assert!(!ok && t.contains("lock"), "qemu-io wrote into the data file of a served image: {t}");
    let (ok, t) = qemu_io("qcow2", &img, false, &["write -P 0x99 1M 4k".to_string()]);
    assert!(!ok, "qemu-io wrote into the served image: {t}");
    let (r, back) = c.read(0, MIB, 4096);
    assert_eq!(r, 0);
    assert!(back.iter().all(|&b| b == 0x4d));
    drop(c);
    stop(srv);
    qemu_io_ok("qcow2", &img, true, &["read -P 0x4d 1M 4k".to_string()]);
    check_clean(&img);
}

/// lazy_refcounts=on: after a kill -9 the image is dirty and its refcounts are stale. Serving
/// it again must not hand out clusters still in use (QEMU repairs the refcounts when it
/// opens a dirty image); refusing the image is acceptable, corrupting it is not. Writes are
/// one at a time here.
#[test]
fn a_dirty_lazy_refcounts_image_is_repaired_or_refused_never_corrupted() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let img = dir.path().join("lazy.qcow2");
    let out = tool("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", &s(&img), "64M"]);
    assert!(out.status.success(), "{}", text(&out));
    let srv = serve(&img, &[]);
    let mut c = Client::connect(srv.socket(), 1, false);
    let mut seed = 0xDEAD_BEEF_0BAD_F00Du64;
    let mut flushed: HashMap<u64, u32> = HashMap::new();
    let mut seq = 0u32;
    let pick = |seed: &mut u64| xorshift(seed) % (size / CLUSTER) * CLUSTER + (xorshift(seed) % 16) * BLOCK;
    for _ in 0..200 {
        let off = pick(&mut seed);
        seq += 1;
        write_ok(&mut c, off, &pattern(off, BLOCK as usize, seq));
        flushed.insert(off, seq);
    }
    assert_eq!(c.flush(0), 0);
    let mut unflushed = Vec::new();
    for _ in 0..100 {
        let off = pick(&mut seed);
        seq += 1;
        write_ok(&mut c, off, &pattern(off, BLOCK as usize, seq));
        unflushed.push((off, seq));
    }
    let mut srv = srv;
    signal(&srv, libc::SIGKILL);
    srv.wait_exit();
    drop(c);
    drop(srv);
    let before = std::fs::read(&img).unwrap();

    let srv = match try_serve(&img, &[]) {
        Err(e) => {
            eprintln!("the dirty lazy-refcounts image was refused: {e}");
            assert!(std::fs::read(&img).unwrap() == before, "refused, but the image changed");
            return;
        }
        Ok(b) => b,
    };
    let mut c = Client::connect(srv.socket(), 1, false);
    // Every flushed write is there (unless a later unflushed one to the same block landed).
    for (&off, &q) in &flushed {
        let (r, got) = c.read(0, off, BLOCK as usize);
        assert_eq!(r, 0);
        let later: Vec<u32> = unflushed.iter().filter(|u| u.0 == off).map(|u| u.1).collect();
        assert!(
            got == pattern(off, BLOCK as usize, q) || later.iter().any(|&l| got == pattern(off, BLOCK as usize, l)),
            "flushed block at {off} lost after kill -9 and restart"
        );
    }
    // What is on the disk now (model), then many new allocations.
    let mut model: HashMap<u64, Vec<u8>> = HashMap::new();
    for &off in flushed.keys().chain(unflushed.iter().map(|u| &u.0)) {
        model.insert(off, c.read(0, off, BLOCK as usize).1);
    }
    for _ in 0..400 {
        let off = pick(&mut seed);
        seq += 1;
        let d = pattern(off, BLOCK as usize, seq);
        write_ok(&mut c, off, &d);
        model.insert(off, d);
    }
    assert_eq!(c.flush(0), 0);
    for (&off, d) in &model {
        let (r, got) = c.read(0, off, BLOCK as usize);
        assert_eq!(r, 0);
        assert!(got == *d, "block at {off} wrong after new allocations on the restarted image");
    }
    drop(c);
    stop(srv);
    let (code, t) = check(&img);
    assert_eq!(code, 0, "qemu-img check after serving a dirty lazy-refcounts image: {t}");
    let content = qemu_content(&img);
    for (&off, d) in &model {
        assert!(content[off as usize..(off + BLOCK) as usize] == d[..], "QEMU reads the block at {off} wrong");
    }
}

/// Reads of a range racing its discard while other queues allocate (and so may reuse the
/// freed host clusters): a read returns the old data or zeroes, never another range's data.
#[test]
fn reads_racing_a_discard_never_see_reallocated_clusters() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let img = dir.path().join("reuse.qcow2");
    create_qcow2(&img, Some(size), None, None);
    let srv = serve(&img, &["--num-queues", "3"]);
    let mut c = Client::connect(srv.socket(), 3, false);
    let a = 8 * CLUSTER; // 4 clusters read and discarded every round
    let alen = 4 * CLUSTER;
    let mut prev_b: Option<u64> = None;
    for round in 0..100u32 {
        let old = pattern(a, alen as usize, 3000 + round);
        write_ok(&mut c, a, &old);
        let b = 64 * CLUSTER + u64::from(round % 2) * 64 * CLUSTER; // 16 clusters, two areas
        // Queue 0: reads of the range; queue 1: its discard (and the previous round's area);
        // queue 2: allocating writes.
        let rbase = 8usize << 20; // region offset for the reads
        for i in 0..8usize {
            let ptr = (c.region.addr + rbase + i * alen as usize) as *mut u8;
            c.queues[0].read(a, ptr, alen as usize, i, ReqFlags::empty());
        }
        c.queues[1].discard(a, alen, 0, ReqFlags::empty());
        let mut n1 = 1;
        if let Some(p) = prev_b {
            c.queues[1].discard(p, 16 * CLUSTER, 1, ReqFlags::empty());
            n1 += 1;
        }
        let wdata: Vec<Vec<u8>> =
            (0..16u64).map(|i| pattern(b + i * CLUSTER, CLUSTER as usize, 5000 + round)).collect();
        for (i, d) in wdata.iter().enumerate() {
            c.buf(i * CLUSTER as usize, CLUSTER as usize).copy_from_slice(d);
            let ptr = (c.region.addr + i * CLUSTER as usize) as *const u8;
            c.queues[2].write(b + i as u64 * CLUSTER, ptr, CLUSTER as usize, i, ReqFlags::empty());
        }
        for q in 0..3 {
            kick(&mut c, q);
        }
        for (_, ret) in wait_queue(&mut c, 2, 16).into_iter().chain(wait_queue(&mut c, 1, n1)) {
            assert_eq!(ret, 0, "round {round}");
        }
        for (i, ret) in wait_queue(&mut c, 0, 8) {
            assert_eq!(ret, 0, "round {round}: read");
            let got = c.buf(rbase + i * alen as usize, alen as usize).to_vec();
            for (k, sec) in got.chunks(SECTOR).enumerate() {
                let r = k * SECTOR..(k + 1) * SECTOR;
                assert!(
                    sec == &old[r] || sec.iter().all(|&x| x == 0),
                    "round {round}: a read racing the discard returned other data at sector {k} of the range \
                     (first word {:#x})",
                    u64::from_le_bytes(sec[..8].try_into().unwrap())
                );
            }
        }
        let (r, now) = c.read(0, a, alen as usize);
        assert_eq!(r, 0);
        assert!(now.iter().all(|&x| x == 0), "round {round}: the discarded range is not zero");
        let (r, nb) = c.read(0, b, 16 * CLUSTER as usize);
        assert_eq!(r, 0);
        assert_same(&format!("round {round}: the written area"), &nb, &wdata.concat());
        prev_b = Some(b);
    }
    drop(c);
    stop(srv);
    check_clean(&img);
}
