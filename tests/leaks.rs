//! Nothing grows with reconnects: a frontend connecting again and again, and the replication
//! link being cut and re-established, leave the daemon's descriptors and threads where they
//! were (both leaked before: an exit eventfd per queue per frontend session, and a sender
//! thread plus its socket per link reconnect — found by contrib/soak.sh).

mod common;

use common::pair::*;
use common::*;
use serde_json::json;

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

fn threads(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| name.is_empty() || c.trim() == name)
        .count()
}

fn thread_names(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    v.sort();
    v
}

/// Threads and descriptors once the daemon is idle again: the serve loop has set up the
/// next connection (its queue workers exist) and no control-socket client is around.
fn settled(pid: u32, queues: usize) -> (usize, usize) {
    let mut last = (0, 0);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let now = (fds(pid), threads(pid, ""));
        if threads(pid, "vring_worker") == queues && now == last {
            return now;
        }
        assert!(std::time::Instant::now() < deadline, "never settled: {:?}", thread_names(pid));
        last = now;
        // Idleness has no event: sample until two readings agree.
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn frontend_reconnects_leak_no_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img").display().to_string();
    let mut s = Server::start(tempfile::tempdir().unwrap(), &["--disk", &disk, "--size", "16M", "--num-queues", "2"]);
    let pid = s.child.id();
    let session = |s: &mut Server| {
        let mut c = Client::connect(&s.socket, 2, false);
        assert_eq!(c.write(1, 0, &[3u8; 4096]), 0);
        drop(c);
        s.wait_log("frontend disconnected");
    };
    session(&mut s);
    let (f0, t0) = settled(pid, 2);
    for _ in 0..6 {
        session(&mut s);
    }
    let (f1, t1) = settled(pid, 2);
    assert_eq!(f1, f0, "descriptors grew over 6 frontend sessions");
    assert_eq!(t1, t0, "threads grew over 6 frontend sessions");
}

#[test]
fn frontend_sessions_on_a_replicating_primary_leak_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, _sdisk, nbd) = colo_secondary(dir.path(), "16M", Some("f"));
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let uri = format!("nbd+unix:///f?socket={}", nbd.display());
    let pdisk = dir.path().join("pri.img");
    let mut pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, 16 * MIB, &["--secondary", &uri]);
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    let pid = pri.child.id();
    let session = |s: &mut Server, i: u64| {
        let mut c = Client::connect(&s.socket, 2, false);
        assert_eq!(c.write((i % 2) as usize, i * 4096, &pattern(i * 4096, 4096, i as u32)), 0);
        drop(c);
        s.wait_log("frontend disconnected");
        // Control-socket traffic between sessions, as an orchestrator polls.
        qmp(s, "query-replication", json!({})).unwrap();
    };
    session(&mut pri, 0);
    wait_until("in sync", || synced(&pri));
    let (f0, t0) = settled(pid, 2);
    for i in 1..8 {
        session(&mut pri, i);
    }
    wait_until("in sync", || synced(&pri));
    let (f1, t1) = settled(pid, 2);
    assert_eq!(t1, t0, "threads grew over 7 sessions on a replicating primary: {:?}", thread_names(pid));
    assert_eq!(f1, f0, "descriptors grew over 7 sessions on a replicating primary");
}

#[test]
fn link_reconnects_leak_no_threads_or_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, _sdisk, nbd) = colo_secondary(dir.path(), "16M", Some("l"));
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy.sock"), nbd);
    let uri = format!("nbd+unix:///l?socket={}", proxy.path.display());
    let pdisk = dir.path().join("pri.img");
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, 16 * MIB, &["--secondary", &uri]);
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    let pid = pri.child.id();
    let mut c = Client::connect(&pri.socket, 2, false);
    let connects =
        |pri: &Server| qmp(pri, "query-replication", json!({})).unwrap()["link"]["connects"].as_u64().unwrap();
    let mut cut = |round: u64| {
        let before = connects(&pri);
        proxy.cut();
        assert_eq!(c.write(0, round * 65536, &pattern(round * 65536, 65536, round as u32)), 0);
        wait_until("link back and in sync", || connects(&pri) > before && synced(&pri));
    };
    cut(1);
    let (f0, t0) = settled(pid, 2);
    for round in 2..8 {
        cut(round);
    }
    let (f1, t1) = settled(pid, 2);
    assert_eq!(threads(pid, "nbd-link-send"), 1, "sender threads of dead links are left behind");
    assert_eq!(t1, t0, "threads grew over 6 link reconnects");
    assert_eq!(f1, f0, "descriptors grew over 6 link reconnects");
    // The secondary let every old connection go (it keeps one client: the current link).
    let q = qmp(&sec, "query-replication", json!({})).unwrap();
    assert_eq!(q["nbd"]["clients"], 1, "{q}");
}

/// A frontend that goes away while its request hangs in the disk (a read held 34 s by the
/// fault layer, longer than the daemon's 30 s drain): the drain gives up, the next frontend
/// is served, and the torn-down queue is kept only while the read is in the disk. Once it
/// completes the queue is freed, and the daemon is back to its descriptors and threads (plus
/// the one thread that reaps torn-down queues). Before, such a queue was leaked for good,
/// with whatever its layers held for the request (on a secondary: a gate ticket that made
/// every later checkpoint time out).
#[test]
fn a_queue_torn_down_under_a_hung_request_is_freed_when_the_request_completes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img").display().to_string();
    let mut s = Server::start(
        tempfile::tempdir().unwrap(),
        &["--disk", &disk, "--size", "16M", "--num-queues", "1", "--x-fault-injection"],
    );
    let pid = s.child.id();
    {
        let mut fe = common::frontend::BlkFrontend::connect(&s.socket);
        assert_eq!(fe.io(common::frontend::T_OUT, 0, &[5u8; 4096]).status, 0);
    }
    s.wait_log("frontend disconnected");
    let (f0, t0) = settled(pid, 1);

    qmp(&s, "x-inject-fault", json!({"op": "read", "offset": 0, "length": 4096, "count": 1, "delay-ms": 34000}))
        .unwrap();
    let mut fe = common::frontend::BlkFrontend::connect(&s.socket);
    fe.queue(common::frontend::T_IN, 0, &[0u8; 4096]);
    fe.kick();
    s.wait_log("fault injection: Read");
    drop(fe);
    s.wait_log("in-flight requests did not finish after disconnect");
    s.wait_log("requests still in flight at teardown");
    // The next frontend is served while the old read still hangs.
    {
        let mut fe = common::frontend::BlkFrontend::connect(&s.socket);
        assert_eq!(fe.io(common::frontend::T_OUT, 8, &[6u8; 4096]).status, 0);
    }
    s.wait_log("frontend disconnected");
    s.wait_log("the requests left in flight at teardown completed");
    let mut fe = common::frontend::BlkFrontend::connect(&s.socket);
    let done = fe.io(common::frontend::T_IN, 0, &[0u8; 8192]);
    assert_eq!(done.status, 0);
    assert!(done.data[..4096].iter().all(|&b| b == 5) && done.data[4096..].iter().all(|&b| b == 6));
    drop(fe);
    s.wait_log("frontend disconnected");
    let (f1, t1) = settled(pid, 1);
    assert_eq!(f1, f0, "descriptors of the torn-down queue stayed behind");
    assert_eq!(threads(pid, "colo-orphans"), 1);
    assert_eq!(t1, t0 + 1, "threads other than the reaper stayed behind: {:?}", thread_names(pid));
}
