//! Seeded random COLO scenarios on a real colo-blk pair: primary guest writes and reads,
//! secondary guest reads and writes, checkpoint barriers committed by each trigger, cuts of
//! the replication link (through a proxy the test can sever) and a final failover, checked
//! after every read and at the end against a model of what each side must show:
//! - the primary reads what it wrote;
//! - the secondary VM reads its own writes since the last committed checkpoint, else the
//!   primary's disk as of that checkpoint;
//! - after failover the survivor's disk is the last committed checkpoint plus the secondary
//!   VM's own writes (a pending, uncommitted barrier is not applied).
//!
//! COLO's rules are respected: checkpoints are only taken with the secondary in sync, and the
//! secondary VM does no I/O between a barrier and its commit (it is stopped then).

mod common;

use std::collections::HashMap;

use common::pair::*;
use common::*;
use serde_json::json;

const BLOCK: u64 = 4096;
/// Blocks the scenarios touch (small, so operations collide often).
const BLOCKS: u64 = 192;
const DISK: u64 = 8 * MIB;

/// xorshift64*: a small deterministic generator (the seed names the scenario).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What each side must read, per block: a tag (0 = never written = zeroes).
#[derive(Default, Clone)]
struct Model {
    primary: HashMap<u64, u32>,
    checkpoint: HashMap<u64, u32>,
    pending: Option<(u64, HashMap<u64, u32>)>,
    secondary_vm: HashMap<u64, u32>,
}

impl Model {
    fn commit(&mut self) {
        if let Some((_, snap)) = self.pending.take() {
            self.checkpoint = snap;
            self.secondary_vm.clear();
        }
    }
    fn secondary_view(&self, b: u64) -> u32 {
        self.secondary_vm.get(&b).or_else(|| self.checkpoint.get(&b)).copied().unwrap_or(0)
    }
}

fn block_data(b: u64, tag: u32) -> Vec<u8> {
    if tag == 0 { vec![0u8; BLOCK as usize] } else { pattern(b * BLOCK, BLOCK as usize, tag) }
}

fn check_read(c: &mut Client, side: &str, b: u64, n: u64, want: impl Fn(u64) -> u32, seed: u64, step: u32) {
    let (r, data) = c.read(0, b * BLOCK, (n * BLOCK) as usize);
    assert_eq!(r, 0, "seed {seed} step {step}: {side} read failed");
    for i in 0..n {
        let got = &data[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize];
        let tag = want(b + i);
        assert!(got == block_data(b + i, tag), "seed {seed} step {step}: {side} block {} is not tag {tag}", b + i);
    }
}

fn run_scenario(seed: u64, steps: u32) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let dir = tempfile::tempdir().unwrap();
    let (sec, sdisk, nbd) = colo_secondary(dir.path(), "8M", Some("colo"));
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy.sock"), nbd);
    let uri = format!("nbd+unix:///colo?socket={}", proxy.path.display());
    let pdisk = dir.path().join("pri.img");
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, DISK, &["--secondary", &uri]);
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    let mut pc = Client::connect(&pri.socket, 1, false);
    let mut sc = Client::connect(&sec.socket, 1, false);
    let mut m = Model::default();
    let mut tag = 0u32;
    let mut barrier = 0u64;
    let mut link_cut = false;
    for step in 0..steps {
        let op = rng.below(100);
        let (b, n) = {
            let n = 1 + rng.below(4);
            (rng.below(BLOCKS - n), n)
        };
        match op {
            // Primary guest write (commits a pending barrier on arrival at the secondary).
            0..=29 => {
                let mut data = Vec::new();
                for i in 0..n {
                    tag += 1;
                    data.extend(block_data(b + i, tag));
                    m.primary.insert(b + i, tag);
                }
                assert_eq!(pc.write(0, b * BLOCK, &data), 0, "seed {seed} step {step}");
                if !link_cut {
                    m.commit();
                }
            }
            30..=44 => check_read(&mut pc, "primary", b, n, |x| *m.primary.get(&x).unwrap_or(&0), seed, step),
            // Secondary VM write (never while a barrier waits: the VM is stopped then).
            45..=59 if m.pending.is_none() => {
                let mut data = Vec::new();
                for i in 0..n {
                    tag += 1;
                    data.extend(block_data(b + i, tag));
                    m.secondary_vm.insert(b + i, tag);
                }
                assert_eq!(sc.write(0, b * BLOCK, &data), 0, "seed {seed} step {step}");
            }
            45..=74 => check_read(&mut sc, "secondary", b, n, |x| m.secondary_view(x), seed, step),
            // Checkpoint: the secondary must be in sync first (COLO's precondition).
            75..=86 => {
                wait_until("secondary in sync", || synced(&pri));
                link_cut = false;
                qmp(&pri, "replication-checkpoint", json!({})).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                barrier += 1;
                m.commit(); // a new barrier commits the previous one
                m.pending = Some((barrier, m.primary.clone()));
                let c = qmp(&sec, "query-replication", json!({})).unwrap()["colo"].clone();
                assert_eq!(c["pending-barrier"], barrier, "seed {seed} step {step}: {c}");
                // Half the time an orchestrator relays the secondary's RESUME at once.
                if rng.below(2) == 0 {
                    qmp(&sec, "replication-checkpoint", json!({"barrier": barrier})).unwrap();
                    m.commit();
                }
            }
            // Cut the replication link (not while a barrier waits: its commit would then
            // depend on whether the resync has anything to copy).
            87..=93 if m.pending.is_none() => {
                let link = |p: &Server| qmp(p, "query-replication", json!({})).unwrap()["link"].clone();
                let before = link(&pri);
                if proxy.cut() > 0 && before["connected"] == true {
                    // The primary notices on its own time; until then it still reports the old
                    // link as connected and in sync, which a following checkpoint would trust.
                    wait_until("the primary noticed the cut", || link(&pri)["failures"] != before["failures"]);
                }
                link_cut = true;
            }
            _ => check_read(&mut sc, "secondary", b, n, |x| m.secondary_view(x), seed, step),
        }
    }
    // The primary dies; the secondary fails over (a pending barrier is not committed).
    drop(pc);
    drop(pri);
    qmp(&sec, "replication-stop", json!({"failover": true})).unwrap();
    wait_until("failover done", || qmp(&sec, "query-replication", json!({})).unwrap()["stage"] == "done");
    m.pending = None;
    let disk = std::fs::read(&sdisk).unwrap();
    for blk in 0..BLOCKS {
        let want = m.secondary_view(blk);
        let got = &disk[(blk * BLOCK) as usize..((blk + 1) * BLOCK) as usize];
        assert!(got == block_data(blk, want), "seed {seed}: survivor block {blk} is not tag {want}");
    }
    check_read(&mut sc, "survivor", 0, 4, |x| m.secondary_view(x), seed, steps);
    let _ = &pdisk;
}

#[test]
fn seeded_colo_scenarios_match_the_model() {
    let seeds: u64 = std::env::var("COLO_BLK_SCENARIOS").ok().and_then(|s| s.parse().ok()).unwrap_or(24);
    for seed in 1..=seeds {
        run_scenario(seed, 80);
    }
}
