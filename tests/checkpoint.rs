//! The secondary's checkpoint under a large dirty set, through the process: memory that
//! follows the dirty data (scattered writes over a 1 TiB disk), given back at a checkpoint.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Server, pattern};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// 4 KiB writes scattered over a 1 TiB secondary (VM writes into the active buffer) for 2 s:
/// the replication maps must not grow with the address space touched.
#[test]
fn scattered_writes_over_a_terabyte_cost_memory_by_the_write() {
    const TIB: u64 = 1 << 40;
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let (disk, active, hidden) = (p("disk.img"), p("active.img"), p("hidden.img"));
    let nbd = format!("unix:{}", p("nbd.sock"));
    let size = TIB.to_string();
    let s = Server::start(
        tempfile::tempdir().unwrap(),
        &[
            "--replication",
            "secondary",
            "--disk",
            &disk,
            "--size",
            &size,
            "--active",
            &active,
            "--hidden",
            &hidden,
            "--nbd-listen",
            &nbd,
            "--num-queues",
            "1",
        ],
    );
    let mut q = s.qmp();
    let start: serde_json::Map<String, serde_json::Value> = serde_json::from_str(r#"{"mode": "secondary"}"#).unwrap();
    q.execute("replication-start", start).unwrap().expect("replication-start");
    let pid = s.child.id();
    let idle = rss_kib(pid);

    let mut c = Client::connect(&s.socket, 1, false);
    let mut rng = Lcg(42);
    let data = pattern(0, 4096, 1);
    let t = Instant::now();
    let mut writes = 0u64;
    while t.elapsed() < Duration::from_secs(2) {
        let off = (rng.next() % (TIB / 4096)) * 4096;
        assert_eq!(c.write(0, off, &data), 0);
        writes += 1;
    }
    let busy = rss_kib(pid);
    let dirty = s.qmp_ok("query-replication");
    eprintln!("{writes} writes: RSS {idle} KiB idle, {busy} KiB after; {dirty}");
    // One bit per sector would be 256 MiB for 1 TiB once every 128 MiB region was touched.
    assert!(busy < idle + 64 * 1024, "RSS grew from {idle} to {busy} KiB for {writes} scattered writes");

    // A checkpoint empties the buffers and gives the maps' memory back.
    q.execute("replication-checkpoint", Default::default()).unwrap().expect("checkpoint");
    let after = rss_kib(pid);
    eprintln!("after the checkpoint: RSS {after} KiB");
    // Back near the idle figure (allocator slack and thread stacks aside).
    assert!(after < idle + 8 * 1024, "RSS after the checkpoint {after} KiB, idle {idle} KiB");
    drop(c);
}
