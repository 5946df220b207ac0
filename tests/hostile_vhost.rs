//! A hostile guest and a hostile vhost-user frontend against the daemon process: raw ring
//! indices and descriptors written by hand, raw vhost-user messages, frontends that never
//! read their answers. Each test checks the daemon stays bounded (CPU, log, memory) and keeps
//! answering the frontend, the next frontend and the control socket.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use std::os::fd::{AsRawFd, FromRawFd};

use common::frontend::{BlkFrontend, EVENT_IDX, QSIZE, SharedMem, T_IN, T_OUT};
use common::hostile_frontend::{RawFrontend, VERSION, req};
use common::*;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo};
use vmm_sys_util::eventfd::EventFd;

/// How long a vhost-user answer may take before the test calls it a hang.
const ANSWER: Duration = Duration::from_secs(10);

/// Runs `f` on its own thread and fails the test if it does not return within [`ANSWER`]
/// (a hung call then stays blocked in its thread; the test has failed anyway).
fn timed<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(ANSWER).unwrap_or_else(|_| panic!("{what}: no answer within {ANSWER:?}"))
}

/// CPU time (user + system, in clock ticks) the process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Share of one CPU the process used over `window` (a measurement, not a wait).
fn cpu_share(pid: u32, window: Duration) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before = cpu_ticks(pid);
    std::thread::sleep(window);
    (cpu_ticks(pid) - before) as f64 / hz / window.as_secs_f64()
}

fn serve(dir: tempfile::TempDir) -> Server {
    let disk = dir.path().join("disk.img").display().to_string();
    Server::start(dir, &["--disk", &disk, "--size", "1M", "--num-queues", "1"])
}

fn count(srv: &Server, needle: &str) -> usize {
    srv.log().iter().filter(|l| l.contains(needle)).count()
}

/// A guest publishes an avail index more than the queue size ahead: the queue is marked
/// broken with one log line, the worker does not spin, GET_VRING_BASE is answered, and a
/// ring restart (device reset) or a new frontend brings the queue back.
#[test]
fn avail_index_far_ahead_breaks_the_queue_and_a_reset_recovers_it() {
    let mut srv = serve(tempfile::tempdir().unwrap());
    let pid = srv.child.id();
    // EVENT_IDX: the notification re-arm path that used to report "more work" forever.
    let mut fe = BlkFrontend::connect_features(&srv.socket, EVENT_IDX);
    assert_eq!(fe.io(T_OUT, 0, &pattern(0, 4096, 1)).status, 0);
    let lines_before = srv.log().len();

    fe.publish_avail_idx(fe.avail_idx().wrapping_add(QSIZE + 3));
    fe.kick();
    srv.wait_log("the queue is broken");
    let share = cpu_share(pid, Duration::from_millis(500));
    assert!(share < 0.2, "daemon busy at {:.0}% of a CPU with a broken queue", share * 100.0);

    let mut ctl = fe.fe.clone();
    let base = timed("GET_VRING_BASE on a broken queue", move || {
        ctl.set_vring_enable(0, false).unwrap();
        ctl.get_vring_base(0).unwrap()
    });
    assert_eq!(base, 1, "the backend's next avail index");
    assert_eq!(count(&srv, "is broken"), 1);
    let new_lines = srv.log().len() - lines_before;
    assert!(new_lines <= 5, "{new_lines} log lines for one broken queue: {:?}", &srv.log()[lines_before..]);
    assert_eq!(srv.qmp_ok("query-block")["frontend-connected"], true);

    // A reset (ring stopped, restarted at the base) makes the queue usable again.
    fe.restart_at(base as u16);
    let r = fe.io(T_IN, 0, &[0u8; 4096]);
    assert_eq!((r.status, r.data == pattern(0, 4096, 1)), (0, true));

    // Broken again, then a new frontend: it is served normally.
    fe.publish_avail_idx(fe.avail_idx().wrapping_add(QSIZE + 1));
    fe.kick();
    srv.wait_log("the queue is broken");
    drop(fe);
    srv.wait_log("frontend disconnected");
    let mut fe = BlkFrontend::connect(&srv.socket);
    let r = fe.io(T_IN, 0, &[0u8; 4096]);
    assert_eq!((r.status, r.data == pattern(0, 4096, 1)), (0, true));
}

/// The daemon logs one of these when a frontend connection ends.
const ENDED: [&str; 2] = ["frontend disconnected", "frontend connection ended"];

/// A frontend that sends requests without reading the answers and then closes: the relay
/// and the handler must not stay blocked writing to each other; the connection ends,
/// `frontend-connected` goes false, and the next frontend is served.
#[test]
fn a_frontend_that_never_reads_answers_does_not_wedge_the_next_one() {
    let mut srv = serve(tempfile::tempdir().unwrap());
    let raw = RawFrontend::connect(&srv.socket);
    raw.sock.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    // GET_FEATURES until every buffer on the way is full: our writes then time out.
    let mut sent = 0u32;
    loop {
        match raw.send(req::GET_FEATURES, VERSION, &[], &[]) {
            Ok(()) => sent += 1,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            Err(e) => panic!("send: {e}"),
        }
        assert!(sent < 10_000_000, "the daemon keeps reading without answering?");
    }
    assert!(sent > 100, "only {sent} requests fit");
    drop(raw);
    srv.wait_log_any(&ENDED);
    assert_eq!(srv.qmp_ok("query-block")["frontend-connected"], false);
    let mut fe = BlkFrontend::connect(&srv.socket);
    let w = fe.io(T_OUT, 8, &pattern(4096, 4096, 2));
    assert_eq!(w.status, 0);
    let r = fe.io(T_IN, 8, &[0u8; 4096]);
    assert_eq!((r.status, r.data == pattern(4096, 4096, 2)), (0, true));
}

/// A vhost-user connection after the usual negotiation (no memory, no rings yet).
fn negotiated(socket: &std::path::Path) -> Frontend {
    let mut fe = Frontend::connect(socket, 1).expect("connect");
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    fe.set_features(offered & ((1 << 32) | (1 << 30))).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf & (VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::LOG_SHMFD))
        .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

/// The connection was refused: a later request fails, the log says why, and the daemon
/// serves the next frontend.
fn assert_refused(srv: &mut Server, fe: Frontend, why: &str) {
    srv.wait_log(why);
    assert!(fe.get_features().is_err(), "connection still open after: {why}");
    drop(fe);
    let mut next = BlkFrontend::connect(&srv.socket);
    assert_eq!(next.io(T_IN, 0, &[0u8; 512]).status, 0);
}

/// A memory region larger than its file would be mapped and SIGBUS the daemon at the first
/// touch past the end: the relay refuses it.
#[test]
fn a_memory_region_larger_than_its_file_is_refused() {
    let mut srv = serve(tempfile::tempdir().unwrap());
    let fe = negotiated(&srv.socket);
    let small = SharedMem::new(4096);
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 8 << 20,
        userspace_addr: small.addr(),
        mmap_offset: 0,
        mmap_handle: small.file.as_raw_fd(),
    };
    let _ = fe.set_mem_table(&[region]);
    assert_refused(&mut srv, fe, "memory region 0: 8388608 bytes at offset 0 of a 4096-byte file");
}

/// The same for the dirty log (SET_LOG_BASE with a file smaller than `mmap_size`).
#[test]
fn a_dirty_log_larger_than_its_file_is_refused() {
    let mut srv = serve(tempfile::tempdir().unwrap());
    let fe = negotiated(&srv.socket);
    let small = SharedMem::new(4096);
    let region = VhostUserDirtyLogRegion { mmap_size: 1 << 20, mmap_offset: 0, mmap_handle: small.file.as_raw_fd() };
    let _ = fe.set_log_base(0, Some(region));
    assert_refused(&mut srv, fe, "dirty log: 1048576 bytes at offset 0 of a 4096-byte file");
}

/// A pipe as the kick descriptor would block the vring thread in an 8-byte read while it
/// holds the vring lock: the relay accepts only eventfds.
#[test]
fn a_pipe_as_kick_descriptor_is_refused() {
    let mut srv = serve(tempfile::tempdir().unwrap());
    let fe = negotiated(&srv.socket);
    let mut fds = [0; 2];
    // SAFETY: a valid array for pipe2.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: wraps the pipe's read end, owned from here on (EventFd closes it).
    let pipe = unsafe { EventFd::from_raw_fd(fds[0]) };
    // SAFETY: one byte into the write end, which is then closed.
    unsafe {
        libc::write(fds[1], b"x".as_ptr().cast(), 1);
        libc::close(fds[1]);
    }
    let _ = fe.set_vring_num(0, 16);
    let _ = fe.set_vring_kick(0, &pipe);
    assert_refused(&mut srv, fe, "ring notifier is not an eventfd");
}

/// The inflight region colo-blk creates is sealed: the frontend cannot shrink it under the
/// daemon's mapping (the next pop would SIGBUS the whole daemon).
#[test]
fn the_inflight_region_cannot_be_shrunk() {
    let srv = serve(tempfile::tempdir().unwrap());
    let mut fe = BlkFrontend::connect_inflight(&srv.socket);
    let file = fe.inflight_file().expect("inflight region").try_clone().unwrap();
    let len = file.metadata().unwrap().len();
    let e = file.set_len(0).expect_err("the inflight memfd could be truncated");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    assert!(file.set_len(len + 4096).is_err(), "the inflight memfd could be grown");
    let r = fe.io(T_IN, 0, &[0u8; 512]);
    assert_eq!(r.status, 0);
    assert!(srv.child.id() > 0 && srv.qmp_ok("query-block")["frontend-connected"] == true);
}

/// An indirect head whose table is refused goes back to the driver (used length 0) and so
/// leaves the inflight region: after a daemon restart it is not resubmitted (the old code
/// kept it in flight and walked a table of up to 2^28 entries at the reconnect).
#[test]
fn a_refused_indirect_head_is_answered_and_not_resubmitted_after_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let socket = state.path().join("vhost.sock");
    let disk = state.path().join("disk.img").display().to_string();
    let args = ["--disk", disk.as_str(), "--size", "1M", "--num-queues", "1"];
    let mut srv = Server::start_at(tempfile::tempdir().unwrap(), &socket, &args);
    let mut fe = BlkFrontend::connect_inflight(&socket);
    assert_eq!(fe.io(T_OUT, 0, &pattern(0, 4096, 7)).status, 0);
    // Head 15: an indirect table of 2^28 - 1 entries whose first entry loops on itself.
    let mut loop_desc = Vec::new();
    loop_desc.extend_from_slice(&0x8000u64.to_le_bytes());
    loop_desc.extend_from_slice(&16u32.to_le_bytes());
    loop_desc.extend_from_slice(&1u16.to_le_bytes());
    loop_desc.extend_from_slice(&0u16.to_le_bytes());
    fe.poke(0x9000, &loop_desc);
    fe.write_desc(15, 0x9000, 0xFFFF_FFF0, 4, 0);
    let used = fe.used_idx();
    fe.push_head(15);
    fe.kick();
    assert!(fe.wait_used(used.wrapping_add(1), ANSWER), "the refused head never came back");
    assert_eq!(fe.used_entry(used), (15, 0));
    // Crash and restart: nothing is left in flight.
    srv.child.kill().unwrap();
    srv.wait_exit();
    let mut srv = Server::start_at(tempfile::tempdir().unwrap(), &socket, &args);
    let mut fe = fe.reconnect(&socket);
    let r = fe.io(T_IN, 0, &[0u8; 4096]);
    assert_eq!((r.status, r.data == pattern(0, 4096, 7)), (0, true));
    srv.wait_log("inflight tracking: restored region");
    assert_eq!(count(&srv, "resubmitting"), 0, "{:?}", srv.log());
}

/// GET_INFLIGHT_FD is answered by the relay itself; its answer must not overtake the
/// answers to requests pipelined before it.
#[test]
fn inflight_answers_keep_the_order_of_pipelined_requests() {
    let srv = serve(tempfile::tempdir().unwrap());
    let raw = RawFrontend::connect(&srv.socket);
    raw.send(req::SET_OWNER, VERSION, &[], &[]).unwrap();
    let pf = raw.get_u64(req::GET_PROTOCOL_FEATURES);
    raw.set_u64(req::SET_PROTOCOL_FEATURES, VERSION, pf & (1 << 12)).unwrap();
    let mut inflight = Vec::new();
    inflight.extend_from_slice(&[0u8; 16]);
    inflight.extend_from_slice(&1u16.to_le_bytes());
    inflight.extend_from_slice(&16u16.to_le_bytes());
    inflight.extend_from_slice(&[0u8; 4]);
    for _ in 0..3 {
        // Pipelined: the handler's answers and the relay's own, in request order.
        raw.send(req::GET_FEATURES, VERSION, &[], &[]).unwrap();
        raw.send(req::GET_PROTOCOL_FEATURES, VERSION, &[], &[]).unwrap();
        raw.send(req::GET_INFLIGHT_FD, VERSION, &inflight, &[]).unwrap();
        raw.send(req::GET_FEATURES, VERSION, &[], &[]).unwrap();
        let got: Vec<u32> = (0..4).map(|_| raw.recv(ANSWER).expect("answer").0).collect();
        assert_eq!(got, [req::GET_FEATURES, req::GET_PROTOCOL_FEATURES, req::GET_INFLIGHT_FD, req::GET_FEATURES]);
    }
    drop(srv);
}

/// Any file where the handler socket used to be bound (`SOCKET.handler`, creatable by anyone
/// in a shared directory) must not matter: the handler is reached privately.
#[test]
fn a_stray_file_next_to_the_socket_blocks_nothing() {
    let srv = serve(tempfile::tempdir().unwrap());
    let mut stray = srv.socket.clone().into_os_string();
    stray.push(".handler");
    std::fs::write(&stray, b"stray").unwrap();
    for i in 0..2u32 {
        let mut fe = BlkFrontend::connect(&srv.socket);
        let w = fe.io(T_OUT, 0, &pattern(0, 4096, i));
        assert_eq!(w.status, 0);
        let r = fe.io(T_IN, 0, &[0u8; 4096]);
        assert_eq!((r.status, r.data == pattern(0, 4096, i)), (0, true));
    }
    assert_eq!(std::fs::read(&stray).unwrap(), b"stray");
    let mut names: Vec<String> =
        std::fs::read_dir(srv.dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    names.sort();
    assert_eq!(names, ["disk.img", "qmp.sock", "vhost.sock", "vhost.sock.handler"]);
}

/// A descriptor loop (head 0 -> 1 -> 0 ...) is cut by the parser; the head comes back to the
/// driver and the queue keeps working.
#[test]
fn a_descriptor_loop_is_cut_and_the_queue_goes_on() {
    let srv = serve(tempfile::tempdir().unwrap());
    let mut fe = BlkFrontend::connect(&srv.socket);
    fe.poke(0x9000, &[0u8; 16]);
    fe.write_desc(14, 0x9000, 16, 1, 15);
    fe.write_desc(15, 0xa000, 512, 1, 14);
    let used = fe.used_idx();
    fe.push_head(14);
    fe.kick();
    assert!(fe.wait_used(used.wrapping_add(1), ANSWER), "the looping head never came back");
    assert_eq!(fe.used_entry(used).0, 14);
    let w = fe.io(T_OUT, 16, &pattern(8192, 4096, 3));
    assert_eq!(w.status, 0);
    let r = fe.io(T_IN, 16, &[0u8; 4096]);
    assert_eq!((r.status, r.data == pattern(8192, 4096, 3)), (0, true));
    assert!(count(&srv, "bad request") >= 1, "{:?}", srv.log());
}

/// GET_VRING_BASE while requests are in flight: answered once they completed, with every
/// completion already in the used ring and the data on disk.
#[test]
fn get_vring_base_under_load_answers_after_the_completions() {
    let srv = serve(tempfile::tempdir().unwrap());
    let mut fe = BlkFrontend::connect(&srv.socket);
    let slots: Vec<u64> =
        (0..5u32).map(|i| fe.queue(T_OUT, u64::from(i) * 8, &pattern(u64::from(i) * 4096, 4096, i))).collect();
    fe.kick();
    let mut ctl = fe.fe.clone();
    let base = timed("GET_VRING_BASE under load", move || {
        ctl.set_vring_enable(0, false).unwrap();
        ctl.get_vring_base(0).unwrap()
    });
    assert_eq!(base, 5);
    assert_eq!(fe.used_idx(), 5, "answered before every completion was published");
    for s in slots {
        assert_eq!(fe.result(s, 0).status, 0);
    }
    fe.restart_at(5);
    for i in 0..5u32 {
        let r = fe.io(T_IN, u64::from(i) * 8, &[0u8; 4096]);
        assert_eq!((r.status, r.data == pattern(u64::from(i) * 4096, 4096, i)), (0, true), "sector {}", i * 8);
    }
}

/// A memory table re-sent while requests are in flight: each request keeps the memory it
/// started with, every request completes and the data is right.
#[test]
fn a_memory_table_change_under_io_is_safe() {
    let srv = serve(tempfile::tempdir().unwrap());
    let mut fe = BlkFrontend::connect(&srv.socket);
    for round in 0..10u32 {
        for i in 0..4u32 {
            fe.queue(T_OUT, u64::from(i) * 8, &pattern(u64::from(i) * 4096, 4096, round));
        }
        fe.kick();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: common::frontend::MEM,
            userspace_addr: fe.mem.addr(),
            mmap_offset: 0,
            mmap_handle: fe.mem.file.as_raw_fd(),
        };
        fe.fe.set_mem_table(&[region]).unwrap();
        let done = fe.wait_all(ANSWER);
        assert_eq!(done.len(), 4);
    }
    for i in 0..4u32 {
        let r = fe.io(T_IN, u64::from(i) * 8, &[0u8; 4096]);
        assert_eq!((r.status, r.data == pattern(u64::from(i) * 4096, 4096, 9)), (0, true));
    }
    assert_eq!(srv.qmp_ok("query-block")["frontend-connected"], true);
}
