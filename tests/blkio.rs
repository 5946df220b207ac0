//! The daemon as a process, driven through libblkio (virtio-blk-vhost-user).

mod common;

use common::*;

const MIB: u64 = 1 << 20;

fn start(size: &str, extra: &[&str]) -> (Server, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let disk_s = disk.to_str().unwrap().to_string();
    let mut args = vec!["--disk", &disk_s, "--size", size, "--num-queues", "4"];
    args.extend_from_slice(extra);
    let s = Server::start(dir, &args);
    (s, disk)
}

#[test]
fn write_read_patterns_across_sizes_and_offsets() {
    let (s, disk) = start("64M", &[]);
    let mut c = Client::connect(&s.socket, 1, false);
    assert_eq!(c.capacity, 64 * MIB);
    let cases: &[(u64, usize)] = &[
        (0, 512),
        (512, 4096),
        (4096 * 3 + 512, 8192 + 1024),
        (MIB, 64 << 10),
        (5 * MIB + 4096, 1 << 20),
        (17 * MIB, 4 << 20),
        (64 * MIB - 512, 512), // last sector
        (64 * MIB - 256 * 1024, 128 * 1024),
    ];
    for (seq, &(off, len)) in cases.iter().enumerate() {
        let data = pattern(off, len, seq as u32 + 1);
        assert_eq!(c.write(0, off, &data), 0, "write {off}+{len}");
        let (r, back) = c.read(0, off, len);
        assert_eq!(r, 0, "read {off}+{len}");
        assert!(back == data, "read-back mismatch at {off}+{len}");
    }
    assert_eq!(c.flush(0), 0);
    // The bytes really reached the image file.
    for (seq, &(off, len)) in cases.iter().enumerate() {
        assert!(file_range(&disk, off, len) == pattern(off, len, seq as u32 + 1), "file at {off}");
    }
    // Overwrite in the middle of an earlier write and check both neighbours.
    let data = pattern(MIB + 4096, 4096, 99);
    assert_eq!(c.write(0, MIB + 4096, &data), 0);
    let (_, back) = c.read(0, MIB, 3 * 4096);
    assert!(back[..4096] == pattern(MIB, 4096, 4)[..]);
    assert!(back[4096..8192] == data[..]);
    assert!(back[8192..] == pattern(MIB + 8192, 4096, 4)[..]);
}

#[test]
fn beyond_end_and_unaligned_rejected_and_counted() {
    let (s, disk) = start("8M", &[]);
    let before = std::fs::read(&disk).unwrap();
    let mut c = Client::connect(&s.socket, 1, false);
    let cap = c.capacity;
    assert!(c.write(0, cap, &[1u8; 512]) < 0, "write past the end must fail");
    assert!(c.write(0, cap - 512, &[1u8; 1024]) < 0, "write crossing the end must fail");
    assert!(c.read(0, cap, 512).0 < 0, "read past the end must fail");
    assert!(c.discard(0, cap - 512, 4096) < 0, "discard crossing the end must fail");
    assert!(c.write_zeroes(0, cap, 512, false) < 0, "write-zeroes past the end must fail");
    let stats = s.qmp_ok("query-blockstats");
    assert_eq!(stats["invalid"], 5, "{stats}");
    // libblkio refuses this one itself (request alignment); it must fail either way.
    assert!(c.write(0, 100, &[1u8; 512]) < 0, "unaligned offset must fail");
    assert!(std::fs::read(&disk).unwrap() == before, "a refused request changed the disk");
    // The device keeps working.
    assert_eq!(c.write(0, cap - 512, &pattern(cap - 512, 512, 7)), 0);
    assert_eq!(c.read(0, cap - 512, 512).1, pattern(cap - 512, 512, 7));
}

#[test]
fn multi_segment_requests() {
    let (s, disk) = start("16M", &[]);
    let mut c = Client::connect(&s.socket, 1, false);
    let off = 3 * MIB;
    let full = pattern(off, 4096 + 512 + 65536, 5);
    let segs = vec![full[..4096].to_vec(), full[4096..4608].to_vec(), full[4608..].to_vec()];
    assert_eq!(c.writev(0, off, &segs), 0);
    let (r, back) = c.readv(0, off, &[512, 65536, 4096]);
    assert_eq!(r, 0);
    assert!(back.concat() == full);
    assert_eq!(c.flush(0), 0);
    assert!(file_range(&disk, off, full.len()) == full);
}

#[test]
fn flush_discard_and_write_zeroes() {
    let (s, disk) = start("32M", &[]);
    let mut c = Client::connect(&s.socket, 1, false);
    let len = 4 * MIB as usize;
    for (i, off) in [0u64, 8 * MIB, 16 * MIB].into_iter().enumerate() {
        assert_eq!(c.write(0, off, &pattern(off, len, i as u32)), 0);
    }
    assert_eq!(c.flush(0), 0);
    let full = allocated(&disk);
    assert!(full >= 12 * MIB, "writes allocated {full}");

    // Discard punches a hole: the space is released and the range reads as zeroes.
    assert_eq!(c.discard(0, 0, 4 * MIB), 0);
    assert_eq!(c.read(0, 0, 4096).1, vec![0u8; 4096]);
    let after_discard = allocated(&disk);
    assert!(after_discard <= full - 4 * MIB, "discard did not release space");

    // Write-zeroes with unmap allowed also releases space.
    assert_eq!(c.write_zeroes(0, 8 * MIB, 4 * MIB, true), 0);
    assert!(c.read(0, 8 * MIB, len).1.iter().all(|&b| b == 0));
    let after_unmap = allocated(&disk);
    assert!(after_unmap <= after_discard - 4 * MIB, "unmap write-zeroes did not release space");

    // Without unmap the range reads as zeroes but stays allocated.
    assert_eq!(c.write_zeroes(0, 16 * MIB + 4096, 8192, false), 0);
    let back = c.read(0, 16 * MIB, 4 * 4096).1;
    assert!(back[..4096] == pattern(16 * MIB, 4096, 2)[..]);
    assert!(back[4096..12288].iter().all(|&b| b == 0));
    assert!(back[12288..] == pattern(16 * MIB + 12288, 4096, 2)[..]);
    assert!(allocated(&disk) >= after_unmap - 8192, "no-unmap write-zeroes released space");
    assert!(file_range(&disk, 16 * MIB + 4096, 8192).iter().all(|&b| b == 0));

    let stats = s.qmp_ok("query-blockstats");
    assert_eq!(stats["discard"]["ops"], 3, "{stats}");
    assert_eq!(stats["flush"]["ops"], 1, "{stats}");
    assert_eq!(stats["write"]["errors"], 0);
}

#[test]
fn several_queues_concurrently() {
    let (s, disk) = start("64M", &[]);
    let socket = s.socket.clone();
    let mut c = Client::connect(&socket, 4, false);
    assert_eq!(c.queues.len(), 4);
    // One thread per queue, each owning a disjoint 16 MiB stripe, many requests in flight.
    let mut queues = std::mem::take(&mut c.queues);
    let base = c.region.addr;
    std::thread::scope(|sc| {
        for (qi, q) in queues.iter_mut().enumerate() {
            sc.spawn(move || {
                let stripe = qi as u64 * 16 * MIB;
                let bufbase = base + qi * (8 << 20);
                const DEPTH: usize = 32;
                const BS: usize = 64 << 10;
                let total = (16 * MIB as usize) / BS;
                let mut submitted = 0;
                let mut done = 0;
                while done < total {
                    while submitted < total && submitted - done < DEPTH {
                        let off = stripe + (submitted * BS) as u64;
                        let slot = submitted % DEPTH;
                        let ptr = (bufbase + slot * BS) as *mut u8;
                        let data = pattern(off, BS, qi as u32 + 10);
                        // SAFETY: each queue owns its own 8 MiB slice of the mapped region.
                        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, BS) };
                        q.write(off, ptr, BS, submitted, blkio::ReqFlags::empty());
                        submitted += 1;
                    }
                    let mut comps = [const { std::mem::MaybeUninit::uninit() }; DEPTH];
                    let mut t = WAIT;
                    let n = q.do_io(&mut comps, 1, Some(&mut t), None).unwrap();
                    assert!(n > 0);
                    for c in &comps[..n] {
                        // SAFETY: do_io initialised n entries.
                        assert_eq!(unsafe { c.assume_init_ref() }.ret, 0);
                    }
                    done += n;
                }
            });
        }
    });
    c.queues = queues;
    assert_eq!(c.flush(1), 0);
    for qi in 0..4u64 {
        let off = qi * 16 * MIB;
        let want: Vec<u8> = (0..(16 * MIB as usize) / (64 << 10))
            .flat_map(|i| pattern(off + (i * (64 << 10)) as u64, 64 << 10, qi as u32 + 10))
            .collect();
        assert!(file_range(&disk, off, 16 * MIB as usize) == want, "stripe {qi}");
    }
    let stats = s.qmp_ok("query-blockstats");
    assert_eq!(stats["write"]["ops"], 1024, "{stats}");
    assert_eq!(stats["write"]["bytes"], 64 * MIB, "{stats}");
}

#[test]
fn read_only_export() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("ro.img");
    std::fs::write(&disk, pattern(0, 1 << 20, 3)).unwrap();
    let disk_s = disk.to_str().unwrap().to_string();
    let s = Server::start(dir, &["--disk", &disk_s, "--readonly"]);
    let mut c = Client::connect(&s.socket, 1, true);
    assert_eq!(c.read(0, 4096, 4096), (0, pattern(4096, 4096, 3)));
    assert!(c.write(0, 0, &[0u8; 512]) < 0);
    assert!(std::fs::read(&disk).unwrap() == pattern(0, 1 << 20, 3));
    assert_eq!(s.qmp_ok("query-block")["read-only"], true);
}

#[test]
fn serves_the_next_frontend_after_disconnect() {
    let (mut s, _disk) = start("16M", &[]);
    for round in 0..3u32 {
        let mut c = Client::connect(&s.socket, 2, false);
        let off = u64::from(round) * MIB;
        if round > 0 {
            let prev = off - MIB;
            assert_eq!(c.read(1, prev, 4096).1, pattern(prev, 4096, round), "data of the previous frontend");
        }
        assert_eq!(c.write(0, off, &pattern(off, 4096, round + 1)), 0);
        drop(c);
        s.wait_log("frontend disconnected");
    }
    assert_eq!(s.qmp_ok("query-block")["frontend-connected"], false);
}

#[test]
fn quit_drains_flushes_and_exits_zero() {
    let (mut s, disk) = start("16M", &[]);
    let mut c = Client::connect(&s.socket, 1, false);
    assert_eq!(c.write(0, 4096, &pattern(4096, 8192, 1)), 0);
    let block = s.qmp_ok("query-block");
    assert_eq!(block["frontend-connected"], true, "{block}");
    assert_eq!(block["size"], 16 * MIB);
    s.qmp().execute("quit", Default::default()).unwrap().unwrap();
    let st = s.wait_exit();
    assert_eq!(st.code(), Some(0));
    assert!(file_range(&disk, 4096, 8192) == pattern(4096, 8192, 1));
    assert!(!s.socket.exists(), "socket left behind");
    drop(c);
}

#[test]
fn sigterm_exits_zero() {
    let (mut s, _disk) = start("16M", &[]);
    let _c = Client::connect(&s.socket, 1, false);
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    assert_eq!(s.wait_exit().code(), Some(0));
    assert!(s.log().iter().any(|l| l.contains("shut down cleanly")));
}

#[test]
fn sockets_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let (s, _disk) = start("1M", &[]);
    for p in [&s.socket, &s.qmp] {
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }
}

#[test]
fn null_device_serves_io() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir, &["--disk", "null", "--size", "1G"]);
    let mut c = Client::connect(&s.socket, 1, false);
    assert_eq!(c.capacity, 1 << 30);
    assert_eq!(c.write(0, 0, &[7u8; 4096]), 0);
    assert_eq!(c.read(0, 0, 4096).0, 0);
    assert_eq!(c.flush(0), 0);
}

/// CPU time (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Adaptive polling: a driver that sends a request every 10 ms (longer than the 2 ms poll
/// window) must not make the worker spin the whole window after each request; a busy
/// driver still gets polled. With a fixed window the daemon burnt ~20% of a CPU here.
#[test]
fn polling_adapts_to_a_slow_driver() {
    let s = Server::start(
        tempfile::tempdir().unwrap(),
        &["--disk", "null", "--size", "16M", "--num-queues", "1", "--poll-us", "2000"],
    );
    let mut c = Client::connect(&s.socket, 1, false);
    let pid = s.child.id();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before = cpu_ticks(pid);
    let t0 = std::time::Instant::now();
    for i in 0..150u64 {
        assert_eq!(c.read(0, (i % 64) * 4096, 4096).0, 0);
        // Pacing the load (a slow driver), not synchronisation.
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let share = (cpu_ticks(pid) - before) as f64 / hz / t0.elapsed().as_secs_f64();
    eprintln!("daemon CPU with a request every 10 ms: {:.1}% of one CPU", share * 100.0);
    assert!(share < 0.08, "the worker spun after every request: {:.1}% of a CPU", share * 100.0);
}

/// One request on queue 0 with the data at `ptr` (inside the client's memory region).
fn raw_io(c: &mut Client, write: bool, offset: u64, ptr: *mut u8, len: usize) -> i32 {
    let q = &mut c.queues[0];
    if write {
        q.write(offset, ptr as *const u8, len, 0, blkio::ReqFlags::empty());
    } else {
        q.read(offset, ptr, len, 0, blkio::ReqFlags::empty());
    }
    let mut comp = [const { std::mem::MaybeUninit::uninit() }];
    let mut t = std::time::Duration::from_secs(10);
    assert_eq!(q.do_io(&mut comp, 1, Some(&mut t), None).unwrap(), 1);
    // SAFETY: do_io initialised one completion.
    unsafe { comp[0].assume_init_ref() }.ret
}

/// `--direct`: a guest may put a request's data at any address (the virtio-blk driver
/// passes whatever the guest kernel gives it); O_DIRECT wants aligned buffers. Requests at
/// odd addresses are bounced through aligned memory instead of failing with an I/O error.
#[test]
fn direct_io_serves_buffers_at_any_address() {
    let (s, disk) = start("16M", &["--direct"]);
    let mut c = Client::connect(&s.socket, 1, false);
    let base = c.region.addr as *mut u8;
    for (k, &(skew, len)) in [(1usize, 4096usize), (7, 512), (512, 8192), (2048, 65536), (0, 4096)].iter().enumerate() {
        let offset = (k as u64 + 1) * MIB;
        let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ (k as u8 + 1)).collect();
        // SAFETY: [skew, skew + len) lies inside the client's mapped region (≥ 1 MiB).
        let buf = unsafe { std::slice::from_raw_parts_mut(base.add(skew), len) };
        buf.copy_from_slice(&data);
        assert_eq!(raw_io(&mut c, true, offset, buf.as_mut_ptr(), len), 0, "write at buffer offset {skew}");
        buf.fill(0);
        assert_eq!(raw_io(&mut c, false, offset, buf.as_mut_ptr(), len), 0, "read at buffer offset {skew}");
        assert!(buf == &data[..], "data read back at buffer offset {skew} differs");
        assert!(file_range(&disk, offset, len) == data, "disk content at {offset} differs");
    }
    let st = s.qmp_ok("query-blockstats");
    assert_eq!(st["read"]["errors"].as_u64().unwrap() + st["write"]["errors"].as_u64().unwrap(), 0, "{st}");
}
