//! Hostile control-socket clients against the daemon process: a slow reader, a client that
//! never reads, an endless JSON value, and idle clients taking every slot. The daemon must
//! keep answering everyone else promptly and keep its memory bounded.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::pair::*;
use common::*;
use serde_json::{Value, json};

/// A raw QMP connection: greeting read, capabilities negotiated when asked.
struct Raw {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path, negotiate: bool) -> Raw {
        let w = UnixStream::connect(path).expect("connect");
        w.set_read_timeout(Some(WAIT)).unwrap();
        let mut c = Raw { r: BufReader::new(w.try_clone().unwrap()), w };
        let greeting = c.line().expect("greeting");
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        if negotiate {
            c.send(br#"{"execute":"qmp_capabilities"}"#);
            assert_eq!(c.line().expect("answer")["return"], json!({}));
        }
        c
    }

    fn send(&mut self, b: &[u8]) {
        self.w.write_all(b).unwrap();
    }

    fn line(&mut self) -> std::io::Result<Value> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        serde_json::from_str(&l).map_err(std::io::Error::other)
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    l.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn serve() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img").display().to_string();
    Server::start(dir, &["--disk", &disk, "--size", "1M"])
}

/// A client reading its (large) answers a trickle at a time must not hold up the events
/// another client's command causes, nor that command's answer; it is dropped instead.
#[test]
fn a_slow_reader_does_not_hold_up_events_or_other_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, _disk, _nbd) = colo_secondary(dir.path(), "4M", None);
    let mut slow = Raw::connect(&sec.qmp, true);
    // An answer of ~900 KiB (the id is echoed), far more than the socket holds.
    let id = "x".repeat(900 << 10);
    slow.send(format!(r#"{{"execute":"query-block","id":"{id}"}}"#).as_bytes());
    // Read a trickle: 4 KiB every 200 ms, until the daemon drops us.
    let mut r = slow.r;
    let reader = std::thread::spawn(move || {
        let start = Instant::now();
        let mut b = vec![0u8; 4096];
        loop {
            match r.read(&mut b) {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    });
    // The slow reader's first answer is being written now; replication-start emits a stage
    // event to every client while it runs.
    let t = Instant::now();
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).expect("replication-start");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(2), "replication-start took {took:?} behind a slow QMP reader");
    let t = Instant::now();
    assert_eq!(qmp(&sec, "query-replication", json!({})).expect("query")["mode"], "secondary");
    assert!(t.elapsed() < Duration::from_secs(2), "query-replication took {:?}", t.elapsed());
    let dropped_after = reader.join().unwrap();
    assert!(dropped_after < Duration::from_secs(30), "slow reader kept for {dropped_after:?}");
    assert!(sec.log().iter().any(|l| l.contains("qmp: client") && l.contains("dropped")), "{:?}", sec.log());
}

/// A client that sends commands and never reads the answers is dropped once its outbox is
/// full; the daemon and other clients go on.
#[test]
fn a_client_that_never_reads_is_dropped() {
    let srv = serve();
    let mut greedy = Raw::connect(&srv.qmp, true);
    greedy.w.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let cmd = br#"{"execute":"query-block"}"#;
    let deadline = Instant::now() + WAIT;
    // Until the daemon drops us (EPIPE/reset) or stops reading (our write times out).
    loop {
        assert!(Instant::now() < deadline, "never dropped");
        match greedy.w.write_all(cmd) {
            Ok(()) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => break,
        }
    }
    assert_eq!(srv.qmp_ok("query-block")["frontend-connected"], false);
}

/// One endless JSON string: the daemon answers with an error and closes the connection once
/// the message passes 1 MiB, instead of buffering it all.
#[test]
fn an_endless_json_value_is_cut_off_at_one_mib() {
    let srv = serve();
    let pid = srv.child.id();
    let rss_before = vm_rss_kib(pid);
    let mut c = Raw::connect(&srv.qmp, true);
    c.w.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    c.send(br#"{"execute":"query-block","id":""#);
    let chunk = vec![b'a'; 64 << 10];
    let mut sent = 0usize;
    // 64 MiB at most; the daemon must stop reading long before.
    while sent < 64 << 20 {
        if c.w.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    let answer = c.line().expect("an error answer before the close");
    let desc = answer["error"]["desc"].as_str().unwrap_or_default().to_string();
    assert!(desc.contains("longer than 1048576 bytes"), "{answer}");
    assert!(c.line().is_err(), "connection not closed");
    let grew = vm_rss_kib(pid).saturating_sub(rss_before);
    assert!(grew < 32 << 10, "RSS grew by {grew} KiB");
    assert!(sent < 64 << 20, "the daemon read all {sent} bytes");
    srv.qmp_ok("query-block");
}

/// Sixteen idle clients take every slot: a new client is refused at first, and served once
/// the longest-idle client has been idle long enough to be evicted.
#[test]
fn idle_clients_cannot_lock_out_a_new_one() {
    let srv = serve();
    let idle: Vec<Raw> = (0..16).map(|_| Raw::connect(&srv.qmp, true)).collect();
    // Refused while nobody has been idle long.
    let mut extra = UnixStream::connect(&srv.qmp).unwrap();
    extra.set_read_timeout(Some(WAIT)).unwrap();
    let mut l = String::new();
    BufReader::new(&mut extra).read_line(&mut l).unwrap();
    assert!(l.contains("too many QMP clients"), "{l}");
    // Served after the eviction age (10 s), well within the deadline.
    let deadline = Instant::now() + Duration::from_secs(30);
    let served = loop {
        if let Ok(mut c) = colo_blk::qmp::client::QmpClient::connect(&srv.qmp)
            && let Ok(Ok(v)) = c.execute("query-block", Default::default())
        {
            break v;
        }
        assert!(Instant::now() < deadline, "a new client never got a slot");
        // A refusal is immediate and there is no event to wait for: retry at a slow pace.
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(served["size"], 1 << 20);
    assert!(srv.log().iter().any(|l| l.contains("dropped: idle")), "{:?}", srv.log());
    drop(idle);
}
