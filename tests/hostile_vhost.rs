//! A hostile guest and a hostile vhost-user frontend against the daemon process: raw ring
//! indices and descriptors written by hand, raw vhost-user messages, frontends that never
//! read their answers. Each test checks the daemon stays bounded (CPU, log, memory) and keeps
//! answering the frontend, the next frontend and the control socket.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::frontend::{BlkFrontend, EVENT_IDX, QSIZE, T_IN, T_OUT};
use common::hostile::{RawFrontend, VERSION, req};
use common::*;
use vhost::VhostBackend;
use vhost::vhost_user::VhostUserFrontend;

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
