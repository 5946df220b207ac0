//! Model-based tests of the secondary's overlay maps: seeded random sequences of primary
//! (NBD) writes, secondary VM writes and reads, checkpoints (explicit and COLO barriers) and a
//! final failover, run against a real [`Secondary`] on temporary files and checked after
//! every step against a model of three byte arrays:
//! - `disk`: what the secondary disk holds (every primary write lands there);
//! - `ckpt`: the disk at the last committed checkpoint;
//! - `overlay`: the VM's writes since that checkpoint.
//!
//! What the VM must read is `ckpt` under `overlay`: a primary write after a checkpoint is
//! invisible to the VM (it reads the pre-image saved in hidden), its own writes are visible.
//! A checkpoint makes `ckpt` the disk and drops `overlay`. A failover leaves the disk equal
//! to what the VM reads: `ckpt` under `overlay`, primary writes since the checkpoint undone.
use super::tests::secondary;
use super::*;
use crate::nbd::NbdExport;
use crate::replication::ReplicationControl;
use std::sync::mpsc;
use std::time::Instant;

const SIZE: u64 = 64 << 10;
const STEPS: usize = 250;
const SEEDS: u64 = 24;
const EVENT_DEADLINE: Duration = Duration::from_secs(30);

use crate::test_rng::Rng;

struct Model {
    disk: Vec<u8>,
    ckpt: Vec<u8>,
    overlay: Vec<Option<u8>>,
    /// A COLO barrier received and not committed: the disk as it was then.
    pending: Option<Vec<u8>>,
    next_barrier: u64,
}

impl Model {
    fn new() -> Self {
        let disk = vec![0x11u8; SIZE as usize];
        Model { ckpt: disk.clone(), disk, overlay: vec![None; SIZE as usize], pending: None, next_barrier: 1 }
    }

    /// What the secondary VM must read.
    fn vm(&self) -> Vec<u8> {
        self.ckpt.iter().zip(&self.overlay).map(|(&c, o)| o.unwrap_or(c)).collect()
    }

    fn vm_write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            self.overlay[offset as usize + i] = Some(b);
        }
    }

    fn checkpoint(&mut self) {
        self.ckpt = self.disk.clone();
        self.overlay.fill(None);
        self.pending = None;
    }

    /// A pending barrier is committed (by a primary write, the next barrier, a command).
    fn commit_pending(&mut self) {
        if let Some(at_barrier) = self.pending.take() {
            assert_eq!(at_barrier, self.disk, "model: the disk changed under a pending barrier");
            self.checkpoint();
        }
    }
}

/// `data` as one to three iovecs, split at random byte offsets (guest scatter lists need not
/// follow sectors).
fn iovecs_of(rng: &mut Rng, data: &mut [u8]) -> Vec<libc::iovec> {
    let len = data.len();
    let mut cuts = vec![0, len];
    for _ in 0..rng.below(3) {
        cuts.push(rng.below(len as u64) as usize);
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2).map(|w| libc::iovec { iov_base: data[w[0]..].as_mut_ptr().cast(), iov_len: w[1] - w[0] }).collect()
}

fn vm_read(s: &Secondary, rng: &mut Rng, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xEEu8; len];
    let iov = iovecs_of(rng, &mut buf);
    // SAFETY: `buf` outlives the request, dropped at the end of the call.
    let mut req = IoRequest::new(0, OpKind::Read { offset }, unsafe { Buffers::from_raw(iov, None) });
    let r = s.vm_execute(&mut req);
    assert_eq!(r, len as i32, "VM read of {len} bytes at {offset} in stage {}", s.stage().name());
    buf
}

fn vm_write(s: &Secondary, rng: &mut Rng, offset: u64, data: &[u8]) {
    let mut copy = data.to_vec();
    let iov = iovecs_of(rng, &mut copy);
    let kind = OpKind::Write { offset, dsync: rng.below(4) == 0 };
    // SAFETY: `copy` outlives the request, dropped at the end of the call.
    let mut req = IoRequest::new(0, kind, unsafe { Buffers::from_raw(iov, None) });
    let r = s.vm_execute(&mut req);
    assert_eq!(r, data.len() as i32, "VM write at {offset} in stage {}", s.stage().name());
}

fn disk_bytes(s: &Secondary) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    s.file.read_exact_at(&mut buf, 0).unwrap();
    buf
}

/// The first byte where `got` and `want` differ, for a readable failure.
fn first_diff(got: &[u8], want: &[u8]) -> Option<(usize, u8, u8)> {
    got.iter().zip(want).enumerate().find(|(_, (g, w))| g != w).map(|(i, (&g, &w))| (i, g, w))
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some((i, g, w)) = first_diff(got, want) {
        panic!("{what}: byte {i} (sector {}) is {g:#04x}, the model says {w:#04x}", i as u64 / SECTOR);
    }
}

/// A sector-aligned VM request: (offset, len) of 1 to 16 sectors.
fn vm_range(rng: &mut Rng) -> (u64, usize) {
    let sectors = SIZE / SECTOR;
    let s0 = rng.below(sectors);
    let n = 1 + rng.below(16).min(sectors - s0 - 1);
    (s0 * SECTOR, (n * SECTOR) as usize)
}

/// A byte-granular NBD request: (offset, len) of 1 byte to 3 KiB.
fn nbd_range(rng: &mut Rng) -> (u64, usize) {
    let offset = rng.below(SIZE);
    let len = 1 + rng.below(3072).min(SIZE - offset - 1);
    (offset, len as usize)
}

/// Random VM-side steps (writes, zeroes, reads) against the model, in whatever stage `s`
/// is in; used during the failover commit and after a failed one.
fn vm_steps(s: &Secondary, rng: &mut Rng, m: &mut Model, n: usize, what: &str) {
    for step in 0..n {
        let (offset, len) = vm_range(rng);
        match rng.below(3) {
            0 => {
                let data = rng.bytes(len);
                vm_write(s, rng, offset, &data);
                m.vm_write(offset, &data);
            }
            1 => {
                let r = s.vm_execute(&mut IoRequest::new(
                    0,
                    OpKind::WriteZeroes { offset, len: len as u64, unmap: rng.below(2) == 0 },
                    Buffers::none(),
                ));
                assert_eq!(r, 0, "VM write-zeroes {what}");
                m.vm_write(offset, &vec![0; len]);
            }
            _ => {
                let got = vm_read(s, rng, offset, len);
                assert_same(&got, &m.vm()[offset as usize..][..len], &format!("{what} step {step}: VM read"));
            }
        }
    }
}

/// Events of `s` on a channel, to await stage changes with a deadline.
fn events(s: &Secondary) -> mpsc::Receiver<(String, Value)> {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    s.set_events(Arc::new(move |name: &str, data: Value| {
        let _ = lock(&tx).send((name.to_string(), data));
    }));
    rx
}

fn await_event(rx: &mpsc::Receiver<(String, Value)>, what: impl Fn(&str, &Value) -> bool, label: &str) {
    let deadline = Instant::now() + EVENT_DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((name, data)) if what(&name, &data) => return,
            Ok(_) => {}
            Err(e) => panic!("no {label} event within {EVENT_DEADLINE:?}: {e}"),
        }
    }
}

fn run_seed(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let s = secondary(dir.path(), SIZE);
    let rx = events(&s);
    let export = SecondaryExport(s.clone());
    let control = SecondaryControl(s.clone());
    let mut rng = Rng(seed);
    let mut m = Model::new();
    for step in 0..STEPS {
        let ctx = format!("seed {seed} step {step}");
        match rng.below(100) {
            // Primary writes, byte-granular, through the export as the NBD server calls it.
            0..=29 => {
                let (offset, len) = nbd_range(&mut rng);
                let data = rng.bytes(len);
                export.write(offset, &data, rng.below(4) == 0).unwrap();
                m.commit_pending();
                m.disk[offset as usize..][..len].copy_from_slice(&data);
            }
            30..=34 => {
                let (offset, len) = nbd_range(&mut rng);
                export.write_zeroes(offset, len as u64, rng.below(2) == 0).unwrap();
                m.commit_pending();
                m.disk[offset as usize..][..len].fill(0);
            }
            35..=59 => {
                let (offset, len) = vm_range(&mut rng);
                let data = rng.bytes(len);
                vm_write(&s, &mut rng, offset, &data);
                m.vm_write(offset, &data);
            }
            60..=64 => {
                let (offset, len) = vm_range(&mut rng);
                let r = s.vm_execute(&mut IoRequest::new(
                    0,
                    OpKind::WriteZeroes { offset, len: len as u64, unmap: rng.below(2) == 0 },
                    Buffers::none(),
                ));
                assert_eq!(r, 0, "{ctx}: VM write-zeroes");
                m.vm_write(offset, &vec![0; len]);
            }
            65..=84 => {
                let (offset, len) = vm_range(&mut rng);
                let got = vm_read(&s, &mut rng, offset, len);
                assert_same(&got, &m.vm()[offset as usize..][..len], &format!("{ctx}: VM read at {offset}"));
            }
            85..=90 => {
                control.checkpoint(None).unwrap();
                m.checkpoint();
            }
            91..=95 => {
                // A COLO barrier: the checkpoint is pending until a primary write, the next
                // barrier or the command commits it.
                let seq = m.next_barrier;
                m.next_barrier += 1;
                export.barrier(seq).unwrap();
                m.commit_pending();
                m.pending = Some(m.disk.clone());
            }
            _ => {
                // `replication-checkpoint {"barrier": N}` for the pending one, if any.
                if m.pending.is_some() {
                    control.checkpoint(Some(m.next_barrier - 1)).unwrap();
                    m.commit_pending();
                }
            }
        }
        // After every step: the whole disk as the VM reads it, and as it holds it.
        assert_same(&vm_read(&s, &mut rng, 0, SIZE as usize), &m.vm(), &format!("{ctx}: VM view"));
        assert_same(&disk_bytes(&s), &m.disk, &format!("{ctx}: secondary disk"));
    }

    // Failover. A barrier still pending is discarded (the VM runs on the checkpoint before
    // it): the merge yields the committed checkpoint under the VM's writes since.
    m.pending = None;
    let ctx = format!("seed {seed} failover");
    if seed % 2 == 1 {
        // A commit that fails first; the VM keeps writing (stage failover-failed), then the
        // retried commit finishes.
        control.stop(true, true).unwrap();
        await_event(&rx, |n, d| n == "REPLICATION_STAGE" && d["stage"] == "failover-failed", "stage failover-failed");
        assert_eq!(s.stage(), Stage::FailoverFailed);
        vm_steps(&s, &mut rng, &mut m, 40, &format!("{ctx} (failed commit)"));
        assert_same(
            &vm_read(&s, &mut rng, 0, SIZE as usize),
            &m.vm(),
            &format!("{ctx}: VM view after a failed commit"),
        );
        control.stop(true, false).unwrap();
    } else {
        control.stop(true, false).unwrap();
    }
    // The VM keeps running during the commit (or after it, if it was quick).
    vm_steps(&s, &mut rng, &mut m, 40, &format!("{ctx} (commit)"));
    await_event(&rx, |n, _| n == "REPLICATION_FAILOVER_DONE", "failover done");
    assert_eq!(s.stage(), Stage::Done);
    let want = m.vm();
    assert_same(&disk_bytes(&s), &want, &format!("{ctx}: disk after failover (checkpoint + VM writes since)"));
    assert_same(&vm_read(&s, &mut rng, 0, SIZE as usize), &want, &format!("{ctx}: VM view after failover"));
    // The primary is shut out now; the disk is the VM's.
    assert!(export.write(0, &[0x99u8; 512], false).is_err(), "{ctx}: a primary write after failover was taken");
    assert_same(&disk_bytes(&s), &want, &format!("{ctx}: disk after a refused primary write"));
}

/// The overlay maps against the model, over many seeded operation sequences, each ending in
/// a failover (odd seeds: a failed commit first, retried).
#[test]
fn overlay_maps_follow_the_model() {
    for seed in 0..SEEDS {
        run_seed(seed);
    }
}
