//! `colo-blk bench`: a load generator on libblkio (virtio-blk-vhost-user) that prints IOPS,
//! bandwidth and latency percentiles. It drives any vhost-user-blk backend, so the same
//! command measures colo-blk and qemu-storage-daemon side by side.

use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, ReqFlags};

/// Access pattern.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Pattern {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
}

/// Arguments of `colo-blk bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// vhost-user socket of the backend to measure.
    #[arg(long)]
    pub socket: PathBuf,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Pattern::Randread)]
    pub rw: Pattern,
    /// Block size (K/M suffixes).
    #[arg(long, default_value = "4K", value_parser = colo_blk::size::parse_size)]
    pub bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32)]
    pub iodepth: usize,
    /// Queues (one thread each).
    #[arg(long, default_value_t = 1)]
    pub queues: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    pub runtime: u64,
    /// Limit offsets to the first SPAN bytes of the disk (default: whole disk).
    #[arg(long, value_parser = colo_blk::size::parse_size)]
    pub span: Option<u64>,
    /// Label printed with the result.
    #[arg(long, default_value = "")]
    pub label: String,
    /// Print one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
}

struct QueueResult {
    ops: u64,
    errors: u64,
    lat_ns: Vec<u64>,
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn run_queue(q: &mut Blkioq, base: usize, a: &BenchArgs, span: u64, qi: usize, deadline: Instant) -> QueueResult {
    let bs = a.bs as usize;
    let blocks = span / a.bs;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (qi as u64 + 1);
    let mut next_seq = (blocks / a.queues as u64) * qi as u64;
    let mut started = vec![Instant::now(); a.iodepth];
    let mut res = QueueResult { ops: 0, errors: 0, lat_ns: Vec::with_capacity(1 << 20) };
    let mut comps: Vec<MaybeUninit<blkio::Completion>> = (0..a.iodepth).map(|_| MaybeUninit::uninit()).collect();
    let mut submit = |q: &mut Blkioq, slot: usize, started: &mut Vec<Instant>| {
        let block = match a.rw {
            Pattern::Randread | Pattern::Randwrite => xorshift(&mut seed) % blocks,
            Pattern::Read | Pattern::Write => {
                next_seq = (next_seq + 1) % blocks;
                next_seq
            }
        };
        let buf = base + slot * bs;
        started[slot] = Instant::now();
        match a.rw {
            Pattern::Randread | Pattern::Read => q.read(block * a.bs, buf as *mut u8, bs, slot, ReqFlags::empty()),
            Pattern::Randwrite | Pattern::Write => q.write(block * a.bs, buf as *const u8, bs, slot, ReqFlags::empty()),
        }
    };
    for slot in 0..a.iodepth {
        submit(q, slot, &mut started);
    }
    let mut inflight = a.iodepth;
    while inflight > 0 {
        let mut t = Duration::from_secs(30);
        let n = match q.do_io(&mut comps, 1, Some(&mut t), None) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("bench: do_io failed: {e}");
                break;
            }
        };
        let now = Instant::now();
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            res.ops += 1;
            if c.ret < 0 {
                res.errors += 1;
            }
            res.lat_ns.push(u64::try_from((now - started[slot]).as_nanos()).unwrap_or(u64::MAX));
            if now < deadline {
                submit(q, slot, &mut started);
            } else {
                inflight -= 1;
            }
        }
    }
    res
}

/// Runs the benchmark and prints the figures.
pub fn run(a: BenchArgs) -> Result<(), String> {
    if a.bs == 0 || !a.bs.is_multiple_of(512) || a.iodepth == 0 || a.queues == 0 {
        return Err("--bs must be a multiple of 512; --iodepth and --queues at least 1".into());
    }
    let err = |what: &str, e: blkio::Error| format!("{what}: {e}");
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| err("blkio", e))?;
    b.set_str("path", &a.socket.to_string_lossy()).map_err(|e| err("path", e))?;
    b.connect().map_err(|e| err("connect", e))?;
    b.set_i32("num-queues", a.queues as i32).map_err(|e| err("num-queues", e))?;
    let out = b.start().map_err(|e| err("start", e))?;
    let capacity = b.get_u64("capacity").map_err(|e| err("capacity", e))?;
    let span = a.span.unwrap_or(capacity).min(capacity);
    if span < a.bs {
        return Err("disk smaller than one block".into());
    }
    let per_queue = a.iodepth * a.bs as usize;
    let region = b.alloc_mem_region(per_queue * a.queues).map_err(|e| err("alloc", e))?;
    b.map_mem_region(&region).map_err(|e| err("map", e))?;
    let deadline = Instant::now() + Duration::from_secs(a.runtime);
    let t0 = Instant::now();
    let mut queues = out.queues;
    let results: Vec<QueueResult> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .iter_mut()
            .enumerate()
            .map(|(qi, q)| {
                let base = region.addr + qi * per_queue;
                let a = &a;
                s.spawn(move || run_queue(q, base, a, span, qi, deadline))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("bench thread")).collect()
    });
    let elapsed = t0.elapsed().as_secs_f64();
    let ops: u64 = results.iter().map(|r| r.ops).sum();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    let mut lat: Vec<u64> = results.into_iter().flat_map(|r| r.lat_ns).collect();
    lat.sort_unstable();
    let pct =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0);
    let iops = ops as f64 / elapsed;
    let mibs = iops * a.bs as f64 / (1 << 20) as f64;
    let (p50, p99) = (pct(0.50) as f64 / 1000.0, pct(0.99) as f64 / 1000.0);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"label": a.label, "rw": format!("{:?}", a.rw).to_lowercase(), "bs": a.bs,
                "iodepth": a.iodepth, "queues": a.queues, "iops": iops.round(), "mib_s": (mibs * 10.0).round() / 10.0,
                "p50_us": (p50 * 10.0).round() / 10.0, "p99_us": (p99 * 10.0).round() / 10.0, "errors": errors})
        );
    } else {
        println!(
            "{:<12} {:?} bs={} qd={} queues={}: {:.0} IOPS, {:.1} MiB/s, p50 {:.1} us, p99 {:.1} us, errors {}",
            a.label, a.rw, a.bs, a.iodepth, a.queues, iops, mibs, p50, p99, errors
        );
    }
    if errors > 0 {
        return Err(format!("{errors} requests failed"));
    }
    Ok(())
}
