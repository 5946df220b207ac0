//! Guest level: QEMU boots a small Linux guest whose only disk is `vhost-user-blk-pci` on
//! colo-blk, and fio verify jobs run inside it (contrib/guest). Needs qemu-system-x86_64,
//! which `.ci/run` installs; set COLO_BLK_SKIP_GUEST=1 to skip on a machine without it.

mod common;

use std::path::Path;
use std::process::Command;

use common::Server;

fn guest_available() -> bool {
    if std::env::var_os("COLO_BLK_SKIP_GUEST").is_some() {
        eprintln!("COLO_BLK_SKIP_GUEST set: guest tests skipped");
        return false;
    }
    let found = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(found, "qemu-system-x86_64 missing: run .ci/install-guest-deps.sh (or set COLO_BLK_SKIP_GUEST=1)");
    true
}

/// Boots the guest on `socket` running fio job `job`; returns (passed, console log).
fn run_fio(socket: &Path, job: &str, extra: &[&str]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/guest/run-fio.sh");
    let out = Command::new(script)
        .arg("--socket")
        .arg(socket)
        .arg("--job")
        .arg(job)
        .arg("--quiet")
        // The five guest tests boot TCG guests in parallel on a 2-core CI machine: the script's
        // default of 120 s per guest was exceeded there once (a 64 MiB verify on the
        // secondary). A test that wants another bound passes its own --timeout after this one.
        .args(["--timeout", "300"])
        .args(extra)
        .output()
        .expect("run-fio.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let log_path =
        stdout.lines().chain(stderr.lines()).rev().find_map(|l| {
            l.split_whitespace().find(|w| w.starts_with('/') && Path::new(w).is_file()).map(str::to_string)
        });
    let console = log_path.and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
    let code = out.status.code();
    assert!(code == Some(0) || code == Some(1), "run-fio.sh setup error: {stdout}\n{stderr}");
    let passed = code == Some(0);
    assert_eq!(passed, console.contains("GUEST-RESULT: PASS"), "exit code and console disagree:\n{console}");
    (passed, console)
}

fn start_disk(size: &str) -> (Server, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("guest.img");
    let d = disk.to_str().unwrap().to_string();
    let s = Server::start(dir, &["--disk", &d, "--size", size, "--num-queues", "2"]);
    (s, disk)
}

#[test]
fn guest_fio_verify_mixed_and_trim() {
    if !guest_available() {
        return;
    }
    let (s, _disk) = start_disk("512M");
    for job in ["verify", "mixed", "trim"] {
        let (ok, console) = run_fio(&s.socket, job, &[]);
        assert!(ok, "fio job {job} failed in the guest:\n{console}");
        assert!(!console.contains("I/O error"), "guest logged an I/O error in {job}:\n{console}");
    }
    let stats = s.qmp_ok("query-blockstats");
    assert!(stats["write"]["ops"].as_u64().unwrap() > 1000, "{stats}");
    assert!(stats["read"]["ops"].as_u64().unwrap() > 1000, "{stats}");
    assert!(stats["discard"]["ops"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(stats["write"]["errors"], 0, "{stats}");
    assert_eq!(stats["invalid"], 0, "{stats}");
}

#[test]
fn guest_data_survives_daemon_restart_and_harness_detects_corruption() {
    if !guest_available() {
        return;
    }
    let (mut s, disk) = start_disk("256M");
    let (ok, console) = run_fio(&s.socket, "persist-write", &[]);
    assert!(ok, "persist-write failed:\n{console}");
    // Restart colo-blk on the same image: what the guest wrote must be there.
    s.qmp().execute("quit", Default::default()).unwrap().unwrap();
    assert_eq!(s.wait_exit().code(), Some(0));
    let d = disk.to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let s2 = Server::start(dir, &["--disk", &d, "--num-queues", "2"]);
    let (ok, console) = run_fio(&s2.socket, "persist-check", &[]);
    assert!(ok, "data written before the restart did not verify:\n{console}");
    // Negative control: a job that verifies data it never wrote must fail.
    let (ok, _) = run_fio(&s2.socket, "selftest-fail", &[]);
    assert!(!ok, "the guest harness reported PASS for a job that must fail");
}

/// A QEMU guest runs fio verify on a secondary-mode colo-blk across checkpoints (each fio run
/// lies within one checkpoint epoch, as the secondary VM's writes are dropped at the next
/// checkpoint by design), while the primary writes elsewhere over NBD; then failover, and the
/// guest keeps verifying on the merged disk.
#[test]
fn guest_fio_on_secondary_across_checkpoints_and_failover() {
    if !guest_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let (disk, active, hidden, nbd) = (p("sec.img"), p("active.img"), p("hidden.img"), p("nbd.sock"));
    let nbd_listen = format!("unix:{nbd}");
    let s = Server::start(
        tempfile::tempdir().unwrap(),
        &[
            "--replication",
            "secondary",
            "--disk",
            &disk,
            "--size",
            "512M",
            "--active",
            &active,
            "--hidden",
            &hidden,
            "--nbd-listen",
            &nbd_listen,
            "--num-queues",
            "2",
        ],
    );
    let url = format!("nbd+unix:///?socket={nbd}");
    let qemu_io = |cmd: &str| {
        let ok = Command::new("qemu-io").args(["-f", "raw", "-c", cmd, &url]).status().unwrap().success();
        assert!(ok, "qemu-io {cmd}");
    };
    // Initial sync (stage none), then start.
    qemu_io("write -P 0x5a 400M 16M");
    s.qmp()
        .execute("replication-start", serde_json::json!({"mode": "secondary"}).as_object().unwrap().clone())
        .unwrap()
        .unwrap();
    for epoch in 0..2 {
        let (ok, console) = run_fio(&s.socket, "verify", &[]);
        assert!(ok, "epoch {epoch}: fio verify failed on the secondary:\n{console}");
        qemu_io(&format!("write -P {} 420M 4M", 0x60 + epoch));
        let q = s.qmp_ok("query-replication");
        assert!(q["active-dirty-bytes"].as_u64().unwrap() > 0, "guest writes did not reach active: {q}");
        assert!(q["hidden-dirty-bytes"].as_u64().unwrap() >= 4 << 20, "{q}");
        s.qmp_ok("replication-checkpoint");
        let q = s.qmp_ok("query-replication");
        assert_eq!(q["active-dirty-bytes"], 0, "{q}");
    }
    let mut events = s.qmp();
    s.qmp()
        .execute("replication-stop", serde_json::json!({"failover": true}).as_object().unwrap().clone())
        .unwrap()
        .unwrap();
    events.wait_event("REPLICATION_FAILOVER_DONE", common::WAIT).unwrap();
    let (ok, console) = run_fio(&s.socket, "mixed", &[]);
    assert!(ok, "fio after failover failed:\n{console}");
    assert_eq!(s.qmp_ok("query-replication")["stage"], "done");
    assert_eq!(s.qmp_ok("query-blockstats")["write"]["errors"], 0);
}

/// A QEMU guest runs fio verify on a primary whose secondary is a colo-blk secondary; after
/// fio (and the checkpoint barrier), both disks are identical.
#[test]
fn guest_fio_on_primary_mirrored_to_a_colo_blk_secondary() {
    if !guest_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let (sdisk, active, hidden, nbd, pdisk) = (p("sec.img"), p("a.img"), p("h.img"), p("nbd.sock"), p("pri.img"));
    let nbd_listen = format!("unix:{nbd}");
    let sec = Server::start(
        tempfile::tempdir().unwrap(),
        &[
            "--replication",
            "secondary",
            "--disk",
            &sdisk,
            "--size",
            "256M",
            "--active",
            &active,
            "--hidden",
            &hidden,
            "--nbd-listen",
            &nbd_listen,
            "--nbd-export",
            "parent0",
        ],
    );
    let args = |v: serde_json::Value| v.as_object().unwrap().clone();
    sec.qmp().execute("replication-start", args(serde_json::json!({"mode": "secondary"}))).unwrap().unwrap();
    let uri = format!("nbd+unix:///parent0?socket={nbd}");
    let pri = Server::start(
        tempfile::tempdir().unwrap(),
        &["--replication", "primary", "--disk", &pdisk, "--size", "256M", "--secondary", &uri, "--num-queues", "2"],
    );
    pri.qmp().execute("replication-start", args(serde_json::json!({"mode": "primary"}))).unwrap().unwrap();
    for job in ["verify", "trim"] {
        let (ok, console) = run_fio(&pri.socket, job, &[]);
        assert!(ok, "fio {job} failed on the primary:\n{console}");
    }
    pri.qmp_ok("replication-checkpoint");
    pri.qmp().execute("replication-get-error", Default::default()).unwrap().expect("no replication error");
    let (a, b) = (std::fs::read(&pdisk).unwrap(), std::fs::read(&sdisk).unwrap());
    assert_eq!(a.len(), b.len());
    assert!(a == b, "primary and secondary disks differ after the guest's fio run");
    assert!(pri.qmp_ok("query-replication")["forwarded-ops"].as_u64().unwrap() > 1000);
}

/// colo-blk is killed (-9) while a QEMU guest runs fio verify on it, with guest writes in
/// flight (it is a primary whose secondary was frozen, so mirrored writes wait for their
/// acknowledgement); QEMU reconnects (`reconnect-ms`) to the restarted daemon, which gets
/// the inflight region back and resubmits what was in flight: fio's verify passes and the
/// guest logs no I/O error.
#[test]
fn guest_fio_survives_a_backend_kill_and_reconnect() {
    if !guest_available() {
        return;
    }
    use common::pair::{colo_secondary, qmp};
    use common::{freeze, thaw};
    use serde_json::json;
    let keep = tempfile::tempdir().unwrap();
    let (sec, _sdisk, nbd) = colo_secondary(keep.path(), "512M", Some("g"));
    qmp(&sec, "replication-start", json!({"mode": "secondary"})).unwrap();
    let socket = keep.path().join("vhost.sock");
    let disk = keep.path().join("guest.img").display().to_string();
    let uri = format!("nbd+unix:///g?socket={}", nbd.display());
    let args = [
        "--replication",
        "primary",
        "--secondary",
        &uri,
        "--secondary-timeout",
        "120",
        "--disk",
        disk.as_str(),
        "--size",
        "512M",
        "--num-queues",
        "2",
    ];
    let mut s = Server::start_at(tempfile::tempdir().unwrap(), &socket, &args);
    qmp(&s, "replication-start", json!({"mode": "primary"})).unwrap();
    let sock2 = socket.clone();
    let fio = std::thread::spawn(move || run_fio(&sock2, "verify", &["--reconnect-ms", "300", "--timeout", "240"]));
    let wait = |what: &str, f: &mut dyn FnMut() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            // Polling the counters: the daemon has no event per request.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    wait("guest writes", &mut || s.qmp_ok("query-blockstats")["write"]["ops"].as_u64().unwrap_or(0) >= 300);
    // Freeze the secondary: the guest's next writes stay in flight on the primary.
    freeze(&sec.child);
    // Guest writes are stuck once mirrored writes stay unanswered while no write completes
    // for a while: replies the secondary sent just before it stopped are read within
    // milliseconds, and fio's verify pass (reads only) leaves nothing unanswered.
    let mut last: Option<(u64, std::time::Instant)> = None;
    wait("guest writes stuck in flight", &mut || {
        let link = qmp(&s, "query-replication", json!({})).unwrap()["link"]["inflight"].as_u64().unwrap_or(0);
        let guest = s.qmp_ok("query-block")["inflight"].as_u64().unwrap_or(0);
        let writes = s.qmp_ok("query-blockstats")["write"]["ops"].as_u64().unwrap_or(0);
        if link < 2 || guest < 2 {
            last = None;
            return false;
        }
        match last {
            Some((w, since)) if w == writes => since.elapsed() >= std::time::Duration::from_millis(500),
            _ => {
                last = Some((writes, std::time::Instant::now()));
                false
            }
        }
    });
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    drop(s);
    thaw(&sec.child);
    let again = Server::start_at(tempfile::tempdir().unwrap(), &socket, &args);
    let (ok, console) = fio.join().unwrap();
    assert!(ok, "fio verify failed across the backend restart:\n{console}");
    for bad in ["I/O error", "blk_update_request", "critical", "timed out"] {
        assert!(!console.contains(bad), "guest logged '{bad}':\n{console}");
    }
    let log = again.log();
    assert!(log.iter().any(|l| l.contains("inflight tracking: restored region")), "{log:?}");
    assert!(log.iter().any(|l| l.contains("requests left in flight by the previous process")), "{log:?}");
}

/// `block_resize` reaches a running Linux guest without a reboot: the guest boots on a 64 MiB
/// disk and waits for its capacity to change (contrib/guest/init `waitresize=`); colo-blk
/// grows the image to 128 MiB over QMP, QEMU gets VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, re-reads
/// the configuration space and tells the guest, whose /sys/block/vda/size follows; then fio
/// writes and verifies only in the grown area (jobs/resize.fio), and the data is in the file.
#[test]
fn guest_sees_block_resize_without_reboot() {
    if !guest_available() {
        return;
    }
    use std::io::BufRead;
    let (s, disk) = start_disk("64M");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/guest/run-fio.sh");
    let console = s.dir.path().join("resize-console.log");
    // Not --quiet: the console comes through stdout line by line, so the test acts on the
    // guest's own announcement instead of a guessed boot time.
    let mut child = Command::new(script)
        .arg("--socket")
        .arg(&s.socket)
        .args(["--job", "resize", "--size", "32m", "--append", "waitresize=240", "--timeout", "300"])
        .arg("--log")
        .arg(&console)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run-fio.sh");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line.trim_end_matches('\r').to_string());
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(330);
    let wait_line = |needle: &str| -> String {
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(e) => panic!(
                    "no '{needle}' from the guest ({e}):\n{}",
                    std::fs::read_to_string(&console).unwrap_or_default()
                ),
            }
        }
    };
    let before = wait_line("GUEST-RESIZE-WAIT");
    assert!(before.ends_with("sectors=131072"), "{before}");
    s.qmp()
        .execute("block_resize", serde_json::json!({"size": 128u64 << 20}).as_object().unwrap().clone())
        .unwrap()
        .unwrap();
    let after = wait_line("GUEST-RESIZED");
    assert!(after.ends_with("sectors=262144"), "{after}");
    let result = wait_line("GUEST-RESULT");
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    log.lines().filter(|l| l.starts_with("GUEST-")).for_each(|l| eprintln!("{l}"));
    assert!(result.contains("PASS") && status.success(), "fio in the grown area failed:\n{log}");
    for bad in ["I/O error", "blk_update_request", "critical"] {
        assert!(!log.contains(bad), "guest logged '{bad}':\n{log}");
    }
    assert!(s.log().iter().any(|l| l.contains("configuration change notification sent")), "{:?}", s.log());
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 128 << 20);
    // fio's verify headers landed beyond the old end of the image.
    let grown = common::file_range(&disk, 64 << 20, 32 << 20);
    assert!(grown.iter().any(|&b| b != 0), "nothing reached the grown area of the image");
}

/// A Linux guest on a qcow2 overlay over a raw base (`--format qcow2`): fio verify (allocating
/// writes with copy-on-write from the base, then overwrites) and trim (discard → zero
/// clusters) pass, the base is never written, and `qemu-img check` finds the overlay clean
/// after colo-blk stops.
#[test]
fn guest_fio_on_a_qcow2_overlay_over_a_raw_base() {
    if !guest_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = (dir.path().join("base.raw"), dir.path().join("top.qcow2"));
    let io = |args: &[&str]| {
        let out = Command::new(args[0]).args(&args[1..]).output().expect(args[0]);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    io(&["qemu-img", "create", "-q", "-f", "raw", b, "512M"]);
    io(&["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 64M", b]);
    io(&["qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "raw", t]);
    let base_before = io(&["sha256sum", b]);
    let mut s = Server::start(tempfile::tempdir().unwrap(), &["--disk", t, "--format", "qcow2", "--num-queues", "2"]);
    for job in ["verify", "trim"] {
        let (ok, console) = run_fio(&s.socket, job, &[]);
        assert!(ok, "fio job {job} failed in the guest on qcow2:\n{console}");
        assert!(!console.contains("I/O error"), "guest logged an I/O error in {job}:\n{console}");
    }
    let stats = s.qmp_ok("query-blockstats");
    assert_eq!(stats["write"]["errors"], 0, "{stats}");
    assert!(stats["discard"]["ops"].as_u64().unwrap() > 0, "{stats}");
    s.qmp().execute("quit", Default::default()).unwrap().unwrap();
    assert_eq!(s.wait_exit().code(), Some(0));
    assert_eq!(io(&["sha256sum", b]), base_before, "the backing file was written");
    let check = Command::new("qemu-img").args(["check", "-f", "qcow2", t]).output().unwrap();
    assert!(check.status.success(), "qemu-img check: {}", String::from_utf8_lossy(&check.stdout));
}
