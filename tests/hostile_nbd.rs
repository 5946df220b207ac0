//! The replication link and the secondary's NBD server under hostile or unlucky peers, all as
//! processes: TLS under backpressure and a paused peer, a secondary that goes silent after
//! STARTTLS, idle connections before the primary, clients that stop reading, and the writes
//! of a dead connection racing a newer one.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::hostile::*;
use common::pair::*;
use common::*;
use serde_json::json;

/// A colo-blk secondary listening on 127.0.0.1:`port`, with TLS when `srv` is given, on a
/// disk of `size` bytes in `dir`, replicating (stage running).
fn tcp_secondary(dir: &Path, port: u16, size: u64, srv: Option<&Path>) -> (Server, PathBuf) {
    let p = |n: &str| dir.join(n).display().to_string();
    let (d, a, h) = (p("sec.img"), p("a.img"), p("h.img"));
    if !dir.join("sec.img").exists() {
        make_disk(&dir.join("sec.img"), size, None);
    }
    let listen = format!("127.0.0.1:{port}");
    let size = size.to_string();
    let mut args = vec![
        "--replication",
        "secondary",
        "--disk",
        &d,
        "--size",
        &size,
        "--active",
        &a,
        "--hidden",
        &h,
        "--nbd-listen",
        &listen,
    ];
    let creds = srv.map(|s| s.display().to_string());
    if let Some(c) = &creds {
        args.extend_from_slice(&["--nbd-tls-creds", c]);
    }
    let s = Server::start(tempfile::tempdir().unwrap(), &args);
    qmp(&s, "replication-start", json!({"mode": "secondary"})).unwrap();
    (s, dir.join("sec.img"))
}

/// Item: TLS flow control, server side. A 32 MiB NBD read over TLS is one 32 MiB reply the
/// server's TLS pump must push through rustls' 64 KiB send buffer.
#[test]
fn tls_read_of_32_mib_arrives_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, cli, _) = make_creds(dir.path());
    make_disk(&dir.path().join("sec.img"), 64 * MIB, Some(0x5a));
    let port = free_port();
    let (sec, _) = tcp_secondary(dir.path(), port, 64 * MIB, Some(&srv));
    let (ok, out) = qemu_io_tcp(port, Some(&cli), "read -P 0x5a 0 32M");
    assert!(ok, "{out}");
    let (ok, out) = qemu_io_tcp(port, Some(&cli), "read -P 0x5a 16M 32M");
    assert!(ok, "{out}");
    // A reader that pauses 1.5 s before taking the reply: the server's pump must wait, not
    // give up when rustls' buffer is full.
    let uri: colo_blk::nbd::client::NbdUri = format!("nbd://127.0.0.1:{port}/").parse().unwrap();
    let cfg = colo_blk::nbd::tls::client_config(&cli).unwrap();
    let (mut s, _) = colo_blk::nbd::client::connect(&uri, Duration::from_secs(10), Some(&cfg)).unwrap();
    send_request(&mut s, colo_blk::nbd::wire::CMD_READ, 1, 0, 32 << 20, &[]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(read_reply(&mut s), (0, 1));
    let mut data = vec![0u8; 32 << 20];
    std::io::Read::read_exact(&mut s, &mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0x5a), "the 32 MiB reply is not the disk's content");
    assert!(!sec.log().iter().any(|l| l.contains("TLS session ended")), "{:?}", sec.log());
}

/// Item: TLS flow control, client side and a paused peer. A full sync of 256 MiB from a
/// colo-blk primary to a colo-blk secondary over TLS, with the secondary stopped (SIGSTOP)
/// for 1.5 s in the middle: no link failure, identical disks.
#[test]
fn tls_full_sync_of_256_mib_with_a_paused_secondary_has_no_link_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, cli, _) = make_creds(dir.path());
    let size = 256 * MIB;
    let port = free_port();
    let (sec, sdisk) = tcp_secondary(dir.path(), port, size, Some(&srv));
    let pdisk = dir.path().join("pri.img");
    {
        let f = std::fs::File::create(&pdisk).unwrap();
        for i in 0..(size / (8 * MIB)) {
            std::os::unix::fs::FileExt::write_all_at(&f, &pattern(i * 8 * MIB, 8 << 20, 7), i * 8 * MIB).unwrap();
        }
    }
    let uri = format!("nbd://127.0.0.1:{port}/");
    let creds = cli.display().to_string();
    let pri = start_primary(
        tempfile::tempdir().unwrap(),
        &pdisk,
        size,
        &["--secondary", &uri, "--secondary-tls-creds", &creds],
    );
    qmp(&pri, "replication-start", json!({"mode": "primary", "sync": "full"})).unwrap();
    // Pause the secondary once the copy is under way (1.5 s, well under the 5 s timeout).
    wait_until("the resync to start", || {
        qmp(&pri, "query-replication", json!({})).unwrap()["resync"]["copied-bytes"].as_u64().unwrap() > 0
    });
    freeze(&sec.child);
    std::thread::sleep(Duration::from_millis(1500));
    thaw(&sec.child);
    wait_until("the full sync", || synced(&pri));
    let q = qmp(&pri, "query-replication", json!({})).unwrap();
    assert_eq!(q["link"]["failures"], 0, "{q}");
    assert_eq!(q["link"]["connects"], 1, "{q}");
    assert_eq!(q["error"], serde_json::Value::Null, "{q}");
    assert_eq!(q["resync"]["copied-bytes"], size, "{q}");
    same(&pdisk, &sdisk);
}

/// Runs QMP `cmd` on `qmp` in a thread; `None` if no answer came within `within`.
fn qmp_within(
    qmp: &Path,
    cmd: &str,
    args: serde_json::Value,
    within: Duration,
) -> Option<Result<serde_json::Value, String>> {
    let (path, cmd) = (qmp.to_path_buf(), cmd.to_string());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let args = args.as_object().cloned().unwrap_or_default();
        let _ = tx.send(colo_blk::qmp::client::execute(&path, &cmd, args).expect("qmp io"));
    });
    rx.recv_timeout(within).ok()
}

/// Item: deadlines after STARTTLS. A secondary that completes the TLS handshake and then says
/// nothing: `replication-start` fails within about the link timeout instead of hanging, and
/// the daemon keeps answering.
#[test]
fn a_secondary_silent_after_tls_fails_replication_start_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, cli, _) = make_creds(dir.path());
    let silent = SilentTlsServer::start(&srv);
    let pdisk = dir.path().join("pri.img");
    make_disk(&pdisk, 16 * MIB, None);
    let uri = format!("nbd://127.0.0.1:{}/", silent.port);
    let creds = cli.display().to_string();
    let pri = start_primary(
        tempfile::tempdir().unwrap(),
        &pdisk,
        16 * MIB,
        &["--secondary", &uri, "--secondary-tls-creds", &creds, "--secondary-timeout", "2"],
    );
    let t0 = Instant::now();
    let r = qmp_within(&pri.qmp, "replication-start", json!({"mode": "primary"}), Duration::from_secs(10))
        .expect("replication-start hung on a silent TLS secondary");
    let err = r.expect_err("replication-start succeeded against a silent secondary");
    assert!(err.contains("did not finish within 2s"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    // The ops lock is free again: query and stop answer at once.
    let q = qmp_within(&pri.qmp, "query-replication", json!({}), Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(q["stage"], "none", "{q}");
    drop(silent);
}

/// Item (messages): a secondary that closes in the middle of the greeting is reported as
/// "the peer closed the connection", not as Rust's "failed to fill whole buffer".
#[test]
fn a_secondary_closing_mid_greeting_is_named_in_the_error() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let _ = std::io::Write::write_all(&mut c, &colo_blk::nbd::wire::NBD_MAGIC.to_be_bytes()[..5]);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let pdisk = dir.path().join("pri.img");
    make_disk(&pdisk, 16 * MIB, None);
    let uri = format!("nbd://127.0.0.1:{port}/");
    let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, 16 * MIB, &["--secondary", &uri]);
    let err = qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap_err();
    assert!(err.contains("the peer closed the connection"), "{err}");
    assert!(!err.contains("failed to fill whole buffer"), "{err}");
}

/// Item: client slots. Twenty idle TCP connections (before STARTTLS, TLS required) cannot
/// keep a real TLS client out; an idle connection is closed after the handshake deadline;
/// established connections have TCP keepalive on.
#[test]
fn idle_connections_cannot_lock_the_primary_out() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, cli, _) = make_creds(dir.path());
    let port = free_port();
    let (sec, sdisk) = tcp_secondary(dir.path(), port, 16 * MIB, Some(&srv));
    let idle: Vec<std::net::TcpStream> =
        (0..20).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    // The real client gets in (and again: the idle ones do not come back).
    for pat in [0x31, 0x32] {
        let (ok, out) = qemu_io_tcp(port, Some(&cli), &format!("write -P {pat} 1M 64k"));
        assert!(ok, "{out}");
    }
    assert_eq!(file_range(&sdisk, MIB, 65536), vec![0x32; 65536]);
    // A connection that stays idle is closed by the server's negotiation deadline.
    // So is a slow-loris one that sends a byte a second (each read makes progress).
    let late = colo_blk::nbd::transport::Stream::Tcp(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
    let loris = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut drip = loris.try_clone().unwrap();
    std::thread::spawn(move || {
        for _ in 0..60 {
            if std::io::Write::write_all(&mut drip, &[0]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1000));
        }
    });
    let loris = colo_blk::nbd::transport::Stream::Tcp(loris);
    let t0 = Instant::now();
    assert!(wait_hung_up(&late, Duration::from_secs(20)), "an idle connection was never closed");
    assert!(t0.elapsed() >= Duration::from_secs(9), "closed after {:?}", t0.elapsed());
    assert!(wait_hung_up(&loris, Duration::from_secs(5)), "a slow-loris connection was never closed");
    assert!(t0.elapsed() < Duration::from_secs(15), "slow loris closed after {:?}", t0.elapsed());
    drop(idle);
    // An established connection has keepalive on (the kernel's timer shows it).
    let uri: colo_blk::nbd::client::NbdUri = format!("nbd://127.0.0.1:{port}/").parse().unwrap();
    let cfg = colo_blk::nbd::tls::client_config(&cli).unwrap();
    let (s, _) = colo_blk::nbd::client::connect(&uri, Duration::from_secs(10), Some(&cfg)).unwrap();
    // ss shows one timer per socket: a retransmission timer while data is unacknowledged,
    // else the keepalive timer. Sample the kernel's view until it settles.
    let ss = || {
        let filter = format!("( sport = :{port} )");
        let out = Command::new("ss").args(["-tnoH", "state", "established", &filter]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut text = ss();
    while !text.contains("timer:(keepalive") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        text = ss();
    }
    assert!(text.contains("timer:(keepalive"), "no keepalive on the server's socket: {text}");
    drop(s);
    let q = qmp(&sec, "query-replication", json!({})).unwrap();
    assert!(q["nbd"]["refused"].as_u64().unwrap() >= 4, "{q}");
}

/// Item: memory per connection. Two clients ask for 32 MiB reads and never read the replies:
/// the daemon's memory stays within the per-connection budget and both are disconnected
/// within the reply timeout; the daemon keeps serving.
#[test]
fn clients_that_stop_reading_cannot_pin_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (sec, _, nbd) = colo_secondary(dir.path(), "64M", None);
    let uri = format!("nbd+unix:///?socket={}", nbd.display());
    let pid = sec.child.id();
    let base = rss(pid);
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (mut s, _) = nbd_connect(&uri);
        for h in 0..12 {
            send_request(&mut s, colo_blk::nbd::wire::CMD_READ, h, 0, 32 << 20, &[]);
        }
        // Writes behind the reads: their payloads must not be buffered either.
        let mut w = s.try_clone().unwrap();
        w.set_timeouts(None, Some(Duration::from_secs(40))).unwrap();
        std::thread::spawn(move || {
            let payload = vec![0x77u8; 32 << 20];
            for h in 100..104 {
                let req = colo_blk::nbd::wire::Request {
                    flags: 0,
                    cmd: colo_blk::nbd::wire::CMD_WRITE,
                    handle: h,
                    offset: 0,
                    length: 32 << 20,
                };
                if std::io::Write::write_all(&mut w, &req.encode()).is_err()
                    || std::io::Write::write_all(&mut w, &payload).is_err()
                {
                    return;
                }
            }
        });
        clients.push(s);
    }
    let t0 = Instant::now();
    let mut peak = 0;
    let deadline = t0 + Duration::from_secs(45);
    while !clients.iter().all(|c| wait_hung_up(c, Duration::ZERO)) {
        assert!(Instant::now() < deadline, "clients that stopped reading were never disconnected");
        peak = peak.max(rss(pid));
        // Sampling the daemon's memory while it holds the clients.
        std::thread::sleep(Duration::from_millis(50));
    }
    // The reply timeout is 15 s; sampling and thread scheduling add a little.
    assert!(t0.elapsed() < Duration::from_secs(25), "disconnected only after {:?}", t0.elapsed());
    let held = peak.saturating_sub(base);
    eprintln!("daemon RSS: base {} MiB, peak {} MiB, disconnected after {:?}", base >> 20, peak >> 20, t0.elapsed());
    assert!(held < 2 * 64 * MIB + 48 * MIB, "two stalled clients held {} MiB", held >> 20);
    // Still serving.
    let out = Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read 0 4k"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Item: writes of a dead connection. Connection 1 sends large writes, a barrier and a 4 KiB
/// write of A at X, then goes away; connection 2 writes B at X and gets its ack. Once the
/// server let connection 1 go, X holds B, and connection 1's barrier never ran.
#[test]
fn a_dead_connections_writes_never_land_after_a_newer_connection() {
    use colo_blk::nbd::wire::{CMD_COLO_BARRIER, CMD_WRITE};
    let dir = tempfile::tempdir().unwrap();
    let (sec, sdisk, nbd) = colo_secondary(dir.path(), "64M", None);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let uri = format!("nbd+unix:///?socket={}", nbd.display());
    let x = 48 * MIB;
    let (mut c1, info) = nbd_connect(&uri);
    assert!(info.colo);
    let big = vec![0x11u8; 32 << 20];
    for h in 0..8 {
        send_request(&mut c1, CMD_WRITE, h, 0, 32 << 20, &big);
    }
    send_request(&mut c1, CMD_COLO_BARRIER, 50, 1, 0, &[]);
    send_request(&mut c1, CMD_WRITE, 51, x, 4096, &[0xAA; 4096]);
    // Gone for the server (end of file after A), though this end could still read replies.
    match &c1 {
        colo_blk::nbd::transport::Stream::Unix(u) => u.shutdown(std::net::Shutdown::Write).unwrap(),
        colo_blk::nbd::transport::Stream::Tcp(t) => t.shutdown(std::net::Shutdown::Write).unwrap(),
    }
    let (mut c2, _) = nbd_connect(&uri);
    send_request(&mut c2, CMD_WRITE, 1, x, 4096, &[0xBB; 4096]);
    assert_eq!(read_reply(&mut c2), (0, 1));
    wait_until("connection 1 to be let go", || {
        qmp(&sec, "query-replication", json!({})).unwrap()["nbd"]["clients"] == 1
    });
    assert_eq!(file_range(&sdisk, x, 4096), vec![0xBB; 4096], "a dead connection's write landed after a newer ack");
    let q = qmp(&sec, "query-replication", json!({})).unwrap();
    assert_eq!(q["colo"]["barriers"], 0, "a dead connection's barrier ran: {q}");
    assert_eq!(q["colo"]["commits"], 0, "{q}");
    // Connection 2 is served normally afterwards.
    send_request(&mut c2, CMD_WRITE, 2, x + 4096, 4096, &[0xCC; 4096]);
    assert_eq!(read_reply(&mut c2), (0, 2));
}

/// Issue 10 item 12: barrier numbers only grow. The secondary tells a connecting client the
/// highest number it received; a replayed or older number is refused (EINVAL) and never
/// becomes pending; a colo-blk primary restarted against the same secondary numbers its
/// barriers above the old ones instead of starting again at 1.
#[test]
fn barrier_numbers_only_grow_across_connections_and_primary_restarts() {
    use colo_blk::nbd::wire::CMD_COLO_BARRIER;
    let dir = tempfile::tempdir().unwrap();
    let (sec, _sdisk, nbd) = colo_secondary(dir.path(), "32M", None);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let uri = format!("nbd+unix:///?socket={}", nbd.display());
    let (mut c, info) = nbd_connect(&uri);
    assert!(info.colo);
    assert_eq!(info.colo_last_barrier, 0);
    send_request(&mut c, CMD_COLO_BARRIER, 1, 5, 0, &[]);
    assert_eq!(read_reply(&mut c), (0, 1));
    drop(c);
    let (mut c, info) = nbd_connect(&uri);
    assert_eq!(info.colo_last_barrier, 5, "the acknowledgement does not carry the last barrier");
    for (handle, number) in [(2, 3), (3, 5)] {
        send_request(&mut c, CMD_COLO_BARRIER, handle, number, 0, &[]);
        assert_eq!(read_reply(&mut c), (libc::EINVAL as u32, handle), "barrier {number} after 5 was accepted");
    }
    let q = qmp(&sec, "query-replication", json!({})).unwrap();
    assert_eq!(q["colo"]["pending-barrier"], 5, "{q}");
    assert_eq!(q["colo"]["barriers"], 1, "{q}");
    assert_eq!(q["colo"]["last-barrier-number"], 5, "{q}");
    send_request(&mut c, CMD_COLO_BARRIER, 4, 6, 0, &[]);
    assert_eq!(read_reply(&mut c), (0, 4));
    drop(c);

    // A colo-blk primary connecting now numbers its first barrier 7, and a restarted one
    // continues above that.
    let pdisk = dir.path().join("pri.img");
    for want in [7, 8] {
        let pri = start_primary(tempfile::tempdir().unwrap(), &pdisk, 32 * MIB, &["--secondary", &uri]);
        qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
        wait_until("the primary in sync", || {
            let q = qmp(&pri, "query-replication", json!({})).unwrap();
            q["link"]["connected"] == true && q["dirty-bytes"] == 0 && q["resync"]["active"] != true
        });
        qmp(&pri, "replication-checkpoint", json!({})).unwrap();
        let q = qmp(&sec, "query-replication", json!({})).unwrap();
        assert_eq!(q["colo"]["last-barrier-number"], want, "{q}");
        drop(pri);
    }
}

/// A client that sends a write's header and then trickles its payload (a byte a second) is
/// disconnected once the payload's deadline passes (15 s for a small write), nothing of it
/// lands, and other clients are served meanwhile.
#[test]
fn a_trickled_write_payload_is_cut_off_at_its_deadline() {
    use colo_blk::nbd::wire::CMD_WRITE;
    let dir = tempfile::tempdir().unwrap();
    let (sec, sdisk, nbd) = colo_secondary(dir.path(), "16M", None);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let uri = format!("nbd+unix:///?socket={}", nbd.display());
    let (mut c, _) = nbd_connect(&uri);
    // Header and the first 100 bytes of a 64 KiB write, then one byte a second.
    send_request(&mut c, CMD_WRITE, 1, MIB, 65536, &[0x77; 100]);
    let mut drip = c.try_clone().unwrap();
    std::thread::spawn(move || {
        for _ in 0..60 {
            if std::io::Write::write_all(&mut drip, &[0x77]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let t0 = Instant::now();
    // Another client is served while the trickle goes on.
    let out = Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 0x42 0 4k"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(wait_hung_up(&c, Duration::from_secs(25)), "a trickling client was never disconnected");
    let after = t0.elapsed();
    assert!(after >= Duration::from_secs(12) && after < Duration::from_secs(20), "disconnected after {after:?}");
    assert_eq!(file_range(&sdisk, MIB, 65536), vec![0u8; 65536], "part of a never-completed write landed");
    assert_eq!(file_range(&sdisk, 0, 4096), vec![0x42; 4096]);
}

/// Issue 10 item C: a failover whose quiesce times out (a request held in the secondary for
/// longer than 30 s: here a barrier on an injected slow disk) changes nothing — stage still
/// running, the NBD server still serving the primary — and can simply be retried.
#[test]
fn a_failover_whose_quiesce_times_out_changes_nothing_and_can_be_retried() {
    use colo_blk::nbd::wire::{CMD_COLO_BARRIER, CMD_WRITE};
    let dir = tempfile::tempdir().unwrap();
    let (sec, sdisk, nbd) = colo_secondary_with(dir.path(), "16M", None, &["--x-fault-injection"]);
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    qmp(&sec, "x-inject-fault", json!({"op": "barrier", "delay-ms": 34000, "count": 1})).unwrap();
    let uri = format!("nbd+unix:///?socket={}", nbd.display());
    let (mut c, info) = nbd_connect(&uri);
    assert!(info.colo);
    send_request(&mut c, CMD_COLO_BARRIER, 1, 1, 0, &[]);
    wait_until("the barrier to hold the secondary", || {
        sec.log().iter().any(|l| l.contains("fault injection: barrier"))
    });
    let t0 = Instant::now();
    let e = qmp(&sec, "replication-stop", json!({"failover": true})).unwrap_err();
    assert!(e.contains("timed out"), "{e}");
    assert!(t0.elapsed() >= Duration::from_secs(25), "gave up after {:?}", t0.elapsed());
    let q = qmp(&sec, "query-replication", json!({})).unwrap();
    assert_eq!(q["stage"], "running", "{q}");
    // The barrier completes and is answered; the primary's connection still works.
    assert_eq!(read_reply(&mut c), (0, 1));
    send_request(&mut c, CMD_WRITE, 2, 0, 4096, &[0x5e; 4096]);
    assert_eq!(read_reply(&mut c), (0, 2));
    drop(c);
    // The retry succeeds.
    let out = Command::new(env!("CARGO_BIN_EXE_colo-blk"))
        .args(["ctl", "--wait", "--qmp"])
        .arg(&sec.qmp)
        .args(["replication-stop", "failover=true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(qmp(&sec, "query-replication", json!({})).unwrap()["stage"], "done");
    // The primary's write after the last checkpoint is rolled back by the merge (hidden
    // held its old data): failover restores the checkpoint.
    assert!(file_range(&sdisk, 0, 4096) == vec![0u8; 4096], "the failover did not restore the checkpoint");
}
