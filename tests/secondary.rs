//! Secondary mode end to end: the secondary VM through libblkio on the vhost-user socket, the
//! primary's writes through qemu-io over NBD, the control side through QMP. Scenarios from
//! replication-spec.md §4.1 (QEMU's test-replication.c, with exact-equality checks) and §4.2.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use serde_json::{Map, Value, json};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const A: u8 = 0x11;
const B: u8 = 0x22;
const C: u8 = 0x33;

struct Pair {
    s: Server,
    disk: PathBuf,
    active: PathBuf,
    hidden: PathBuf,
    nbd: PathBuf,
}

fn start_secondary(size: u64) -> Pair {
    start_secondary_with(size, &[])
}

fn start_secondary_with(size: u64, extra: &[&str]) -> Pair {
    start_secondary_buffers_in(size, None, extra)
}

/// A secondary whose buffers live in `bufdir` (else next to the disk).
fn start_secondary_buffers_in(size: u64, bufdir: Option<&std::path::Path>, extra: &[&str]) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("secondary.img");
    let bufdir = bufdir.unwrap_or(dir.path());
    let active = bufdir.join("active.img");
    let hidden = bufdir.join("hidden.img");
    let nbd = dir.path().join("nbd.sock");
    let args: Vec<String> = vec![
        "--replication".into(),
        "secondary".into(),
        "--disk".into(),
        disk.display().to_string(),
        "--size".into(),
        size.to_string(),
        "--active".into(),
        active.display().to_string(),
        "--hidden".into(),
        hidden.display().to_string(),
        "--nbd-listen".into(),
        format!("unix:{}", nbd.display()),
        "--num-queues".into(),
        "2".into(),
    ];
    let mut argv: Vec<&str> = args.iter().map(String::as_str).collect();
    argv.extend_from_slice(extra);
    let s = Server::start(dir, &argv);
    Pair { s, disk, active, hidden, nbd }
}

impl Pair {
    fn url(&self) -> String {
        format!("nbd+unix:///?socket={}", self.nbd.display())
    }

    /// The primary's side: qemu-io commands over NBD; returns success.
    fn primary(&self, cmds: &[String]) -> bool {
        let mut c = Command::new("qemu-io");
        c.arg("-f").arg("raw");
        for cmd in cmds {
            c.arg("-c").arg(cmd);
        }
        let out = c.arg(self.url()).output().expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        let failed = !out.status.success() || text.contains("failed") || text.contains("error");
        if failed {
            eprintln!("qemu-io {cmds:?}: {text}");
        }
        !failed
    }

    fn primary_write(&self, pattern: u8, offset: u64, len: u64) {
        assert!(self.primary(&[format!("write -P {pattern} {offset} {len}")]), "NBD write failed");
    }

    fn qmp(&self, cmd: &str, args: Value) -> Result<Value, String> {
        let args: Map<String, Value> = args.as_object().cloned().unwrap_or_default();
        self.s.qmp().execute(cmd, args).expect("qmp io")
    }

    fn start(&self) {
        self.qmp("replication-start", json!({"mode": "secondary"})).expect("start");
    }

    fn stage(&self) -> String {
        self.qmp("query-replication", json!({})).unwrap()["stage"].as_str().unwrap().to_string()
    }

    /// Fails over and waits for the merge to finish.
    fn failover(&self) {
        let mut events = self.s.qmp();
        self.qmp("replication-stop", json!({"failover": true})).expect("failover");
        events.wait_event("REPLICATION_FAILOVER_DONE", WAIT).expect("failover done event");
        assert_eq!(self.stage(), "done");
    }
}

/// Initial sync: the secondary disk holds A everywhere (written over NBD in stage none).
fn fill_a(p: &Pair, size: u64) {
    p.primary_write(A, 0, size);
    assert!(file_range(&p.disk, 0, size as usize).iter().all(|&b| b == A));
}

fn read_all(c: &mut Client, offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut o = offset;
    while o < offset + len {
        let n = (offset + len - o).min(8 * MIB);
        let (r, d) = c.read(0, o, n as usize);
        assert_eq!(r, 0, "VM read at {o} failed");
        out.extend_from_slice(&d);
        o += n;
    }
    out
}

fn vm_write(c: &mut Client, pattern: u8, offset: u64, len: u64) {
    let mut o = offset;
    while o < offset + len {
        let n = (offset + len - o).min(8 * MIB);
        assert_eq!(c.write(0, o, &vec![pattern; n as usize]), 0, "VM write at {o} failed");
        o += n;
    }
}

fn all(v: &[u8], b: u8) -> bool {
    v.iter().all(|&x| x == b)
}

// ---- QEMU's test-replication.c, secondary cases (#7-#13) ----------------------------------

#[test]
fn t07_t08_vm_io_before_start_fails() {
    let p = start_secondary(SIZE);
    let mut c = Client::connect(&p.s.socket, 1, false);
    assert!(c.read(0, 0, 4096).0 < 0, "read before start must fail");
    assert!(c.write(0, 0, &[0u8; 4096]) < 0, "write before start must fail");
    assert_eq!(p.stage(), "none");
}

#[test]
fn t09_t10_start_isolation_then_failover_commit() {
    let p = start_secondary(SIZE);
    fill_a(&p, SIZE);
    p.start();
    let mut c = Client::connect(&p.s.socket, 1, false);
    assert!(all(&read_all(&mut c, 0, SIZE), A));
    // The primary writes B over [32M, 64M): the VM still sees A; the disk has B.
    p.primary_write(B, 32 * MIB, 32 * MIB);
    assert!(all(&read_all(&mut c, 32 * MIB, 32 * MIB), A));
    assert!(all(&file_range(&p.disk, 32 * MIB, 32 * MIB as usize), B));
    // The VM writes C over [0, 32M).
    vm_write(&mut c, C, 0, 32 * MIB);
    assert!(all(&read_all(&mut c, 0, 32 * MIB), C));
    p.failover();
    // True values (spec #10): [0,32M) = C, [32M,64M) = A (the primary's write since the last
    // checkpoint is undone); QEMU's own test only checks "<= 0x22".
    assert!(all(&read_all(&mut c, 0, 32 * MIB), C));
    assert!(all(&read_all(&mut c, 32 * MIB, 32 * MIB), A));
    let disk = std::fs::read(&p.disk).unwrap();
    assert!(all(&disk[..32 * MIB as usize], C) && all(&disk[32 * MIB as usize..], A));
    // After the merge the VM writes straight to the disk.
    vm_write(&mut c, B, 0, MIB);
    assert!(all(&file_range(&p.disk, 0, MIB as usize), B));
}

#[test]
fn t11_continuous_replication_requests_ignored_after_failover() {
    let p = start_secondary(SIZE);
    fill_a(&p, SIZE);
    p.start();
    let mut c = Client::connect(&p.s.socket, 1, false);
    p.primary_write(B, 32 * MIB, 32 * MIB);
    vm_write(&mut c, C, 0, 32 * MIB);
    p.failover();
    // All three are silently ignored once failed over (L5 too).
    p.qmp("replication-start", json!({"mode": "primary"})).expect("start ignored");
    p.qmp("replication-start", json!({"mode": "secondary"})).expect("start ignored");
    p.qmp("replication-checkpoint", json!({})).expect("checkpoint ignored");
    p.qmp("replication-stop", json!({"failover": true})).expect("stop ignored");
    p.qmp("replication-stop", json!({"failover": false})).expect("stop ignored");
    assert_eq!(p.stage(), "done");
    assert!(all(&read_all(&mut c, 0, 32 * MIB), C));
    assert!(all(&read_all(&mut c, 32 * MIB, 32 * MIB), A));
}

#[test]
fn t12_checkpoint_shows_primary_data() {
    let p = start_secondary(SIZE);
    fill_a(&p, SIZE);
    p.start();
    let mut c = Client::connect(&p.s.socket, 1, false);
    p.primary_write(B, 32 * MIB, 32 * MIB);
    assert!(all(&read_all(&mut c, 32 * MIB, 32 * MIB), A));
    p.qmp("replication-checkpoint", json!({})).expect("checkpoint");
    assert!(all(&read_all(&mut c, 32 * MIB, 32 * MIB), B));
    let q = p.qmp("query-replication", json!({})).unwrap();
    assert_eq!(q["active-dirty-bytes"], 0);
    assert_eq!(q["hidden-dirty-bytes"], 0);
    assert_eq!(q["checkpoints"], 1);
    // The buffers' space was given back.
    assert!(allocated(&p.hidden) < MIB, "hidden still holds {} bytes", allocated(&p.hidden));
    p.failover();
}

#[test]
fn t13_get_error_while_running() {
    let p = start_secondary(SIZE);
    p.start();
    p.qmp("replication-get-error", json!({})).expect("no error");
    p.failover();
}

// ---- §4.2 C1-C9 ----------------------------------------------------------------------------

#[test]
fn c1_to_c5_isolation_partial_cow_once_and_vm_writes() {
    let p = start_secondary(4 * MIB);
    fill_a(&p, 4 * MIB);
    p.start();
    let mut c = Client::connect(&p.s.socket, 1, false);
    // C2: a 4 KiB primary write in the middle of a 64 KiB region: the VM reads all A, hidden
    // holds exactly the old 4 KiB (sector-granular copy-before-write: no amplification).
    p.primary_write(B, 64 * 1024 + 8192, 4096);
    assert!(all(&read_all(&mut c, 64 * 1024, 64 * 1024), A));
    assert_eq!(p.qmp("query-replication", json!({})).unwrap()["cow-bytes"], 4096);
    assert!(all(&file_range(&p.hidden, 64 * 1024 + 8192, 4096), A));
    // C3: a second primary write to the same place is not copied again; the VM still sees A.
    p.primary_write(C, 64 * 1024 + 8192, 4096);
    assert!(all(&read_all(&mut c, 64 * 1024, 64 * 1024), A));
    assert!(all(&file_range(&p.hidden, 64 * 1024 + 8192, 4096), A));
    assert_eq!(p.qmp("query-replication", json!({})).unwrap()["cow-bytes"], 4096);
    // C4: the VM writes C, then the primary writes B there: the VM keeps reading C;
    // after a checkpoint it reads B.
    vm_write(&mut c, C, MIB, 8192);
    p.primary_write(B, MIB, 8192);
    assert!(all(&read_all(&mut c, MIB, 8192), C));
    // C5: the primary writes B over a region, then the VM writes C over half of it. The read
    // spans the active buffer and the hidden one: it is split into one read per piece on the
    // queue's ring (counted with the direct reads), not sent to the buffer pool.
    p.primary_write(B, 2 * MIB, 8192);
    vm_write(&mut c, C, 2 * MIB, 4096);
    let direct = |p: &Pair| p.qmp("query-replication", json!({})).unwrap()["vm-direct-reads"].as_u64().unwrap();
    let before = direct(&p);
    let v = read_all(&mut c, 2 * MIB, 8192);
    assert!(all(&v[..4096], C) && all(&v[4096..], A));
    assert_eq!(direct(&p), before + 1, "the mixed read did not take the ring");
    // Sub-4K (512-byte) VM writes next to each other keep both.
    assert_eq!(c.write(0, 3 * MIB, &[C; 512]), 0);
    assert_eq!(c.write(0, 3 * MIB + 512, &[B; 512]), 0);
    let v = read_all(&mut c, 3 * MIB, 4096);
    assert!(all(&v[..512], C) && all(&v[512..1024], B) && all(&v[1024..], A));
    // The VM's writes went to the active buffer on its queue's io_uring, not the pool.
    let q = p.qmp("query-replication", json!({})).unwrap();
    assert_eq!(q["vm-ring-writes"], 4, "{q}");
    // C6: checkpoint -> the VM sees exactly the disk; copy-before-write is armed again.
    p.qmp("replication-checkpoint", json!({})).unwrap();
    let disk = std::fs::read(&p.disk).unwrap();
    assert!(read_all(&mut c, 0, 4 * MIB) == disk);
    p.primary_write(A, MIB, 8192);
    assert!(all(&read_all(&mut c, MIB, 8192), B), "copy-before-write not re-armed");
}

#[test]
fn c7_failover_merge_is_checkpoint_plus_vm_writes() {
    let p = start_secondary(8 * MIB);
    fill_a(&p, 8 * MIB);
    p.start();
    let mut c = Client::connect(&p.s.socket, 1, false);
    // Epoch 1: the primary writes B at [1M,2M); checkpoint makes it the new base.
    p.primary_write(B, MIB, MIB);
    p.qmp("replication-checkpoint", json!({})).unwrap();
    // Epoch 2: the primary writes C at [1M,1.5M) and [4M,5M); the VM writes C at [6M,7M) and
    // over [1.25M,1.5M).
    p.primary_write(C, MIB, MIB / 2);
    p.primary_write(C, 4 * MIB, MIB);
    vm_write(&mut c, C, 6 * MIB, MIB);
    vm_write(&mut c, C, MIB + MIB / 4, MIB / 4);
    p.failover();
    let mut want = vec![A; 8 * MIB as usize];
    want[MIB as usize..2 * MIB as usize].fill(B); // checkpoint image
    want[6 * MIB as usize..7 * MIB as usize].fill(C); // VM writes
    want[(MIB + MIB / 4) as usize..(MIB + MIB / 2) as usize].fill(C);
    let disk = std::fs::read(&p.disk).unwrap();
    assert!(disk == want, "merged disk differs from checkpoint + VM writes");
    assert!(read_all(&mut c, 0, 8 * MIB) == want);
}

#[test]
fn c8_vm_reads_never_see_racing_primary_writes() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    const DISK: u64 = 8 * MIB;
    const BLK: u64 = 64 * 1024;
    let p = start_secondary(DISK);
    fill_a(&p, DISK);
    p.start();
    let patterns = [B, C, 0x44, 0x55, 0x66, 0x77];
    let mut expect = A;
    let mut c = Client::connect(&p.s.socket, 2, false);
    let base = c.region.addr;
    for (round, &pat) in patterns.iter().enumerate() {
        // The primary rewrites the whole disk with 64 KiB writes, many in flight, while both
        // VM queues read random 64 KiB blocks: every read must return the checkpoint's data
        // (never the new pattern, never a mix).
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let url = p.url();
        let done2 = done.clone();
        let writer = std::thread::spawn(move || {
            let mut cmd = Command::new("qemu-io");
            cmd.arg("-f").arg("raw");
            for i in 0..DISK / BLK {
                cmd.arg("-c").arg(format!("aio_write -P {pat} {} {BLK}", i * BLK));
            }
            cmd.arg("-c").arg("aio_flush");
            let ok = cmd.arg(&url).status().unwrap().success();
            done2.store(true, SeqCst);
            ok
        });
        let queues = std::mem::take(&mut c.queues);
        let readers: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(t, mut q)| {
                let done = done.clone();
                std::thread::spawn(move || {
                    let buf = base + t * BLK as usize;
                    let mut x = (round as u64 + 1) * 7919 + t as u64 * 104729;
                    let mut reads = 0u32;
                    while !done.load(SeqCst) || reads < 50 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let off = (x >> 33) % (DISK / 4096) * 4096;
                        let len = BLK.min(DISK - off) as usize;
                        q.read(off, buf as *mut u8, len, 0, blkio::ReqFlags::empty());
                        let mut comp = [const { std::mem::MaybeUninit::uninit() }];
                        let mut t = WAIT;
                        assert_eq!(q.do_io(&mut comp, 1, Some(&mut t), None).unwrap(), 1);
                        // SAFETY: do_io initialised one completion.
                        assert_eq!(unsafe { comp[0].assume_init_ref() }.ret, 0);
                        // SAFETY: the buffer lies in the client's mapped region, owned by this thread.
                        let d = unsafe { std::slice::from_raw_parts(buf as *const u8, len) };
                        assert!(
                            d.iter().all(|&b| b == expect),
                            "round {round}: VM read at {off} saw data written after the checkpoint"
                        );
                        reads += 1;
                    }
                    q
                })
            })
            .collect();
        assert!(writer.join().unwrap(), "primary writes failed");
        c.queues = readers.into_iter().map(|r| r.join().unwrap()).collect();
        assert!(all(&file_range(&p.disk, 0, DISK as usize), pat));
        p.qmp("replication-checkpoint", json!({})).unwrap();
        expect = pat;
        assert!(all(&read_all(&mut c, 0, DISK), expect));
    }
    // Reads of sectors in neither buffer went straight to the disk's queue (and were checked
    // against the racing writes when they completed).
    let q = p.qmp("query-replication", json!({})).unwrap();
    eprintln!("direct VM reads {}, redone {}", q["vm-direct-reads"], q["vm-direct-retries"]);
    assert!(q["vm-direct-reads"].as_u64().unwrap() > 0, "{q}");
    p.failover();
}

#[test]
fn c9_failover_failed_routes_writes() {
    let p = start_secondary(4 * MIB);
    fill_a(&p, 4 * MIB);
    p.start();
    let mut c = Client::connect(&p.s.socket, 1, false);
    vm_write(&mut c, C, 0, MIB);
    p.primary_write(B, 2 * MIB, MIB);
    let mut events = p.s.qmp();
    p.qmp("replication-stop", json!({"failover": true, "x-inject-commit-error": true})).unwrap();
    events.wait_event("REPLICATION_ERROR", WAIT).expect("error event");
    assert_eq!(p.stage(), "failover-failed");
    assert_eq!(p.qmp("replication-get-error", json!({})).unwrap_err(), "I/O error occurred");
    assert_eq!(p.qmp("replication-stop", json!({"failover": false})).unwrap_err(), "Block replication is not running");
    // A write over sectors allocated in active goes to active; over unallocated sectors
    // (never written this epoch) straight to the disk; over hidden-saved sectors to active.
    vm_write(&mut c, B, 0, 4096);
    vm_write(&mut c, B, 3 * MIB, 4096);
    vm_write(&mut c, C, 2 * MIB, 4096);
    assert!(all(&file_range(&p.active, 0, 4096), B));
    assert!(all(&file_range(&p.disk, 3 * MIB, 4096), B));
    assert!(all(&file_range(&p.active, 2 * MIB, 4096), C));
    assert!(all(&file_range(&p.disk, 2 * MIB, 4096), B), "the disk keeps the primary's data");
    // Reads see the newest data everywhere.
    let v = read_all(&mut c, 0, 4 * MIB);
    assert!(all(&v[..4096], B) && all(&v[4096..MIB as usize], C));
    assert!(all(&v[2 * MIB as usize..2 * MIB as usize + 4096], C));
    assert!(all(&v[2 * MIB as usize + 4096..3 * MIB as usize], A));
    assert!(all(&v[3 * MIB as usize..3 * MIB as usize + 4096], B));
}

// ---- §4.2 L1-L5 -------------------------------------------------------------------------------

#[test]
fn l2_l3_lifecycle_errors() {
    let p = start_secondary(4 * MIB);
    let err = |cmd: &str, args: Value| p.qmp(cmd, args).unwrap_err();
    assert_eq!(err("replication-stop", json!({"failover": true})), "Block replication is not running");
    assert_eq!(err("replication-get-error", json!({})), "Block replication is not running");
    assert_eq!(err("replication-checkpoint", json!({})), "Backup job was cancelled unexpectedly");
    assert_eq!(
        err("replication-start", json!({"mode": "primary"})),
        "The parameter mode's value is invalid, needs 1, but got 0"
    );
    assert_eq!(err("replication-start", json!({})), "Parameter 'mode' is missing");
    assert_eq!(err("replication-stop", json!({})), "Parameter 'failover' is missing");
    assert_eq!(p.stage(), "none");
    p.start();
    assert_eq!(err("replication-start", json!({"mode": "secondary"})), "Block replication is running or done");
    p.qmp("replication-stop", json!({"failover": false})).unwrap();
    assert_eq!(p.stage(), "done");
}

#[test]
fn l4_length_mismatch_refused_then_start_succeeds() {
    let p = start_secondary(4 * MIB);
    let f = std::fs::OpenOptions::new().write(true).open(&p.hidden).unwrap();
    f.set_len(4 * MIB - 512).unwrap();
    assert_eq!(
        p.qmp("replication-start", json!({"mode": "secondary"})).unwrap_err(),
        "Active disk, hidden disk, secondary disk's length are not the same"
    );
    assert_eq!(p.stage(), "none");
    f.set_len(4 * MIB).unwrap();
    p.start();
    assert_eq!(p.stage(), "running");
}

#[test]
fn l1_bad_secondary_options_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_colo-blk")).args(args).current_dir(d).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let base = ["serve", "--socket", "s", "--disk", "x.img", "--size", "1M"];
    let (code, err) =
        run(&[&base[..], &["--replication", "secondary", "--hidden", "h", "--nbd-listen", "unix:n"]].concat());
    assert_eq!(code, Some(2));
    assert!(err.contains("--active"), "{err}");
    let (code, err) = run(&[&base[..], &["--active", "a"]].concat());
    assert_eq!(code, Some(2));
    assert!(err.contains("--active"), "{err}");
    let (code, err) =
        run(&[&base[..], &["--replication", "secondary", "--active", "a", "--hidden", "h", "--nbd-listen", "nohost"]]
            .concat());
    assert_eq!(code, Some(2));
    assert!(err.contains("--nbd-listen"), "{err}");
    // An existing buffer of the wrong size is refused at start-up with QEMU's message.
    std::fs::write(d.join("disk.img"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(d.join("a.img"), vec![0u8; 4096]).unwrap();
    let (code, err) = run(&[
        "serve",
        "--socket",
        "s",
        "--disk",
        "disk.img",
        "--replication",
        "secondary",
        "--active",
        "a.img",
        "--hidden",
        "h.img",
        "--nbd-listen",
        "unix:n",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("Active disk, hidden disk, secondary disk's length are not the same"), "{err}");
}

#[test]
fn stop_without_failover_drops_buffers() {
    let p = start_secondary(4 * MIB);
    fill_a(&p, 4 * MIB);
    p.start();
    let mut c = Client::connect(&p.s.socket, 1, false);
    vm_write(&mut c, C, 0, MIB);
    p.primary_write(B, 2 * MIB, MIB);
    p.qmp("replication-stop", json!({"failover": false})).unwrap();
    assert_eq!(p.stage(), "done");
    // The VM now sees the disk: its own writes since the last checkpoint are dropped.
    let disk = std::fs::read(&p.disk).unwrap();
    assert!(read_all(&mut c, 0, 4 * MIB) == disk);
    assert!(all(&disk[..MIB as usize], A) && all(&disk[2 * MIB as usize..3 * MIB as usize], B));
    // The NBD server no longer accepts the primary.
    assert!(!p.primary(&["read 0 512".to_string()]));
}

#[test]
fn nbd_interop_reads_writes_zeroes_and_bad_requests() {
    let p = start_secondary(4 * MIB);
    // Stage none: straight to the disk (initial sync), and qemu-io reads it back.
    assert!(p.primary(&["write -P 0x5a 4096 8192".into(), "read -P 0x5a 4096 8192".into()]));
    assert!(p.primary(&["write -z 4096 4096".into(), "read -P 0 4096 4096".into(), "read -P 0x5a 8192 4096".into()]));
    assert!(p.primary(&["discard 0 65536".into(), "flush".into()]));
    // Unaligned writes work too.
    assert!(p.primary(&["write -P 0x44 100 10".into(), "read -P 0x44 100 10".into()]));
    // Beyond the end: refused, the server keeps serving.
    assert!(!p.primary(&[format!("write -P 1 {} 512", 4 * MIB)]));
    assert!(p.primary(&["read 0 512".into()]));
    // The server notices each qemu-io leaving (no event exists for that: poll the counter).
    let deadline = std::time::Instant::now() + WAIT;
    while p.qmp("query-replication", json!({})).unwrap()["nbd"]["clients"] != 0 {
        assert!(std::time::Instant::now() < deadline, "NBD clients not released");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn failover_while_vm_io_runs_and_checkpoint_during_io() {
    use std::sync::atomic::{AtomicU8, Ordering::SeqCst};
    let p = start_secondary(16 * MIB);
    fill_a(&p, 16 * MIB);
    p.start();
    let socket = p.s.socket.clone();
    // 0: checkpoints running (the VM's writes may be dropped by them, by design);
    // 1: no more checkpoints (every write acknowledged from now on must survive failover);
    // 2: stop.
    let phase = std::sync::Arc::new(AtomicU8::new(0));
    let phase2 = phase.clone();
    let vm = std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 1, false);
        let mut seq = 1u32;
        let mut kept: Vec<(u64, u32)> = Vec::new();
        let mut after = 0;
        loop {
            let ph = phase2.load(SeqCst);
            if ph == 2 && after > 20 {
                break;
            }
            let off = u64::from(seq % 64) * 65536;
            assert_eq!(c.write(0, off, &pattern(off, 65536, seq)), 0);
            if ph >= 1 {
                kept.retain(|&(o, _)| o != off);
                kept.push((off, seq));
                after += 1;
                let (r, d) = c.read(0, off, 65536);
                assert_eq!(r, 0);
                assert!(d == pattern(off, 65536, seq), "VM lost its own write at {off}");
            }
            seq += 1;
        }
        (c, kept)
    });
    for _ in 0..3 {
        p.primary_write(B, 8 * MIB, MIB);
        p.qmp("replication-checkpoint", json!({})).unwrap();
    }
    phase.store(1, SeqCst);
    p.primary_write(C, 12 * MIB, MIB);
    p.failover();
    phase.store(2, SeqCst);
    let (mut c, kept) = vm.join().unwrap();
    assert!(kept.len() > 20);
    // Every write acknowledged since the last checkpoint is on the merged disk, and the
    // primary's write since that checkpoint was undone.
    for (off, s) in &kept {
        assert!(c.read(0, *off, 65536).1 == pattern(*off, 65536, *s), "acknowledged write at {off} lost");
        assert!(file_range(&p.disk, *off, 65536) == pattern(*off, 65536, *s), "write at {off} not on the disk");
    }
    assert!(all(&file_range(&p.disk, 12 * MIB, MIB as usize), A));
    assert!(all(&file_range(&p.disk, 8 * MIB, MIB as usize), B));
    // The writes raced the checkpoints on the queue's io_uring (a write in flight holds the
    // gate, so a checkpoint waits for it; one that meets a closed gate takes the pool).
    let q = p.qmp("query-replication", json!({})).unwrap();
    assert!(q["vm-ring-writes"].as_u64().unwrap() > 20, "{q}");
}

#[test]
fn query_reports_progress_fields() {
    let p = start_secondary(4 * MIB);
    let q = p.qmp("query-replication", json!({})).unwrap();
    for k in ["mode", "stage", "error", "active-dirty-bytes", "hidden-dirty-bytes", "cow-bytes", "commit", "nbd"] {
        assert!(q.get(k).is_some(), "missing {k} in {q}");
    }
    assert_eq!(q["mode"], "secondary");
}

#[test]
fn direct_io_secondary_serves_unaligned_nbd_and_fails_over() {
    let p = start_secondary_with(4 * MIB, &["--direct"]);
    fill_a(&p, 4 * MIB);
    assert!(p.primary(&["write -P 0x44 100 10".into(), "read -P 0x44 100 10".into()]));
    p.primary_write(A, 0, 4096);
    p.start();
    let mut c = Client::connect(&p.s.socket, 1, false);
    p.primary_write(B, MIB, MIB);
    assert!(p.primary(&["write -P 0x22 3000 1000".into()]));
    vm_write(&mut c, C, 2 * MIB, MIB);
    assert!(all(&read_all(&mut c, 0, 2 * MIB), A));
    let q = p.qmp("query-replication", json!({})).unwrap();
    assert_eq!(q["error"], Value::Null, "{q}");
    p.failover();
    let mut want = vec![A; 4 * MIB as usize];
    want[2 * MIB as usize..3 * MIB as usize].fill(C);
    assert!(std::fs::read(&p.disk).unwrap() == want, "merged disk differs under --direct");
    let q = p.qmp("query-replication", json!({})).unwrap();
    assert_eq!(q["commit"]["done-bytes"], q["commit"]["total-bytes"], "{q}");
    // After the merge the VM runs on the O_DIRECT disk queue.
    vm_write(&mut c, B, 0, 4096);
    assert!(all(&read_all(&mut c, 0, 4096), B));
}

/// VM reads of sectors the VM wrote go straight to the active buffer on the worker's
/// io_uring; a checkpoint replaces the active buffer by a fresh file, and the rings follow:
/// afterwards the VM reads the disk again, and its new writes (in the new file) read back —
/// never the old file's data.
#[test]
fn direct_reads_of_the_active_buffer_follow_each_checkpoint() {
    let p = start_secondary(SIZE);
    fill_a(&p, SIZE);
    p.start();
    let mut c = Client::connect(&p.s.socket, 1, false);
    let direct = || p.qmp("query-replication", json!({})).unwrap()["vm-direct-reads"].as_u64().unwrap();
    for round in 0..3u8 {
        let byte = C.wrapping_add(round);
        vm_write(&mut c, byte, 0, MIB);
        let before = direct();
        for i in 0..64 {
            let (r, data) = c.read(0, i * 4096, 4096);
            assert_eq!(r, 0);
            assert!(all(&data, byte), "round {round}: read {i} of the VM's own write returned other data");
        }
        assert!(direct() >= before + 64, "round {round}: the reads did not take the direct path");
        p.qmp("replication-checkpoint", json!({})).expect("checkpoint");
        // The active buffer is a fresh file now: the VM sees the disk (A) again.
        assert!(all(&read_all(&mut c, 0, MIB), A), "round {round}: stale active data after a checkpoint");
    }
}

/// `--direct` holds on the replication paths too: every descriptor the secondary keeps on its
/// disk uses O_DIRECT, and NBD writes at byte offsets no block boundary aligns (stage none
/// and running, with copy-before-write) land exactly, as do VM reads and the failover merge.
/// The VM's write-zeroes, discards and flushes while replicating (done on its queue's thread
/// and ring, not the pool) change only the active buffer: the VM reads zeroes, the disk keeps
/// the checkpoint's data, a checkpoint drops them, failover commits them.
#[test]
fn vm_zeroes_discards_and_flushes_while_replicating_stay_in_the_active_buffer() {
    let p = start_secondary(4 * MIB);
    fill_a(&p, 4 * MIB);
    p.start();
    let mut c = Client::connect(&p.s.socket, 1, false);
    vm_write(&mut c, C, MIB, 64 * 1024);
    assert_eq!(c.write_zeroes(0, MIB, 16 * 1024, false), 0);
    assert_eq!(c.discard(0, MIB + 32 * 1024, 16 * 1024), 0);
    assert_eq!(c.flush(0), 0);
    let v = read_all(&mut c, MIB, 64 * 1024);
    assert!(all(&v[..16384], 0), "write-zeroes not seen by the VM");
    assert!(all(&v[16384..32768], C));
    assert!(all(&v[32768..49152], 0), "discard not seen by the VM");
    assert!(all(&v[49152..], C));
    assert!(all(&file_range(&p.disk, MIB, 64 * 1024), A), "the VM's zeroes reached the disk");
    // A checkpoint drops them with the VM's writes.
    p.qmp("replication-checkpoint", json!({})).unwrap();
    assert!(all(&read_all(&mut c, MIB, 64 * 1024), A));
    // Zeroes after the checkpoint survive failover.
    assert_eq!(c.write_zeroes(0, 2 * MIB, 8192, true), 0);
    assert_eq!(c.flush(0), 0);
    p.failover();
    assert!(all(&file_range(&p.disk, 2 * MIB, 8192), 0));
    assert!(all(&file_range(&p.disk, MIB, 64 * 1024), A));
}

/// On a file system without non-blocking buffered I/O (tmpfs) the VM's direct reads and writes
/// of the active buffer run inline on the worker instead of through io_uring's worker threads;
/// checkpoint, primary-write and failover semantics are the same.
#[test]
fn a_tmpfs_active_buffer_serves_the_vm_inline_with_the_same_semantics() {
    if !std::path::Path::new("/dev/shm").is_dir() {
        eprintln!("skipped: no /dev/shm");
        return;
    }
    let bufs = tempfile::tempdir_in("/dev/shm").unwrap();
    let p = start_secondary_buffers_in(4 * MIB, Some(bufs.path()), &[]);
    assert!(
        p.s.log().iter().any(|l| l.contains("runs inline on its queue's thread")),
        "the tmpfs buffer was not recognised: {:?}",
        p.s.log()
    );
    fill_a(&p, 4 * MIB);
    p.start();
    let mut c = Client::connect(&p.s.socket, 1, false);
    // The VM writes C, the primary writes B there: the VM keeps reading its C (an all-active
    // read), the disk has B.
    vm_write(&mut c, C, MIB, 8192);
    p.primary_write(B, MIB, 8192);
    assert!(all(&read_all(&mut c, MIB, 8192), C));
    assert!(all(&file_range(&p.disk, MIB, 8192), B));
    let q = p.qmp("query-replication", json!({})).unwrap();
    assert!(q["vm-ring-writes"].as_u64().unwrap() >= 1, "{q}");
    assert!(q["vm-direct-reads"].as_u64().unwrap() >= 1, "{q}");
    assert!(all(&file_range(&p.active, MIB, 8192), C), "the write is not in the active buffer");
    // A checkpoint drops the VM's write; the VM sees the primary's B.
    p.qmp("replication-checkpoint", json!({})).unwrap();
    assert!(all(&read_all(&mut c, MIB, 8192), B));
    // After the checkpoint's fresh active file, inline writes and reads still land and
    // failover commits them.
    vm_write(&mut c, C, 2 * MIB, 4096);
    assert!(all(&read_all(&mut c, 2 * MIB, 4096), C));
    p.failover();
    assert!(all(&file_range(&p.disk, 2 * MIB, 4096), C));
    assert!(all(&file_range(&p.disk, MIB, 8192), B));
}

/// Counts the daemon's descriptors on `path` (not its image-lock descriptor) and asserts that
/// every one of them is `O_DIRECT`.
fn direct_descriptors(pid: u32, path: &std::path::Path) -> usize {
    let canonical = std::fs::canonicalize(path).unwrap();
    let mut n = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let fd = fd.unwrap();
        if std::fs::read_link(fd.path()).ok().as_deref() != Some(canonical.as_path()) {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy())).unwrap();
        if info.contains("OFDLCK") {
            // An image lock's own descriptor: it holds QEMU-style locks and does no I/O.
            continue;
        }
        n += 1;
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
        let flags = u32::from_str_radix(flags, 8).unwrap();
        assert_ne!(
            flags & libc::O_DIRECT as u32,
            0,
            "descriptor {:?} on {} is not O_DIRECT",
            fd.file_name(),
            path.display()
        );
    }
    n
}

#[test]
fn direct_holds_on_every_path_to_the_disk_and_unaligned_nbd_writes_land() {
    let p = start_secondary_with(SIZE, &["--direct"]);
    fill_a(&p, SIZE);
    // Stage none: unaligned writes straight to the disk.
    assert!(p.primary(&["write -P 0x5a 1000 3000".into(), "write -P 0x5b 8191 2".into()]));
    let mut model = vec![A; 16384];
    model[1000..4000].fill(0x5a);
    model[8191..8193].fill(0x5b);
    assert_eq!(file_range(&p.disk, 0, 16384), model);
    p.start();
    // Running: copy-before-write of unaligned ranges, then the write; the VM keeps seeing A.
    assert!(p.primary(&["write -P 0x6c 20000 777".into()]));
    model.resize(32768, A);
    model[20000..20777].fill(0x6c);
    assert_eq!(file_range(&p.disk, 0, 32768), model);
    let mut c = Client::connect(&p.s.socket, 1, false);
    let (r, data) = c.read(0, 16384, 8192);
    assert_eq!(r, 0);
    assert!(all(&data, A), "the VM sees the primary's write before a checkpoint");
    // Every descriptor on the disk and on both buffers is O_DIRECT.
    let pid = p.s.child.id();
    assert!(direct_descriptors(pid, &p.disk) >= 2, "expected the workers' and the replication descriptors");
    assert!(direct_descriptors(pid, &p.active) >= 1);
    assert!(direct_descriptors(pid, &p.hidden) >= 1);
    // Sub-block VM writes into the O_DIRECT active buffer (bounced where the ring refuses
    // them), next to each other, read back whole.
    assert_eq!(c.write(0, 3 * MIB + 512, &[B; 512]), 0);
    assert_eq!(c.write(0, 3 * MIB + 1024, &[C; 1536]), 0);
    let v = read_all(&mut c, 3 * MIB, 4096);
    assert!(all(&v[..512], A) && all(&v[512..1024], B) && all(&v[1024..2560], C) && all(&v[2560..], A));
    // A checkpoint replaces the buffers by fresh files on the same descriptors: still O_DIRECT.
    p.qmp("replication-checkpoint", json!({})).unwrap();
    assert!(direct_descriptors(pid, &p.active) >= 1, "the fresh active buffer lost O_DIRECT");
    assert!(direct_descriptors(pid, &p.hidden) >= 1, "the fresh hidden buffer lost O_DIRECT");
    assert_eq!(c.write(0, 3 * MIB + 512, &[B; 512]), 0);
    let v = read_all(&mut c, 3 * MIB, 4096);
    assert!(all(&v[..512], A) && all(&v[512..1024], B) && all(&v[1024..], A));
    // Failover: the VM's unaligned-in-memory write goes through the merge into the disk.
    vm_write(&mut c, C, 4 * MIB, MIB);
    p.failover();
    assert!(all(&file_range(&p.disk, 4 * MIB, MIB as usize), C));
    assert_eq!(file_range(&p.disk, 0, 32768)[..16384], model[..16384]);
}
