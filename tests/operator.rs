//! Operator safety and daemon conventions, through the process: mistakes that would destroy
//! a disk are refused with exit 2 and touch nothing; image locks that QEMU's tools honour;
//! sockets of a live server are never taken; systemd readiness, socket activation, pid
//! file, log level, version; the QMP questions every client asks first.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Server, WAIT, pattern};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_colo-blk"))
}

/// Runs `colo-blk serve ARGS` expecting a refusal: exit 2 within the deadline, stderr naming
/// `needle`. Returns stderr.
fn refused(args: &[&str], needle: &str) -> String {
    let out: Output =
        Command::new("timeout").arg("30").arg(env!("CARGO_BIN_EXE_colo-blk")).arg("serve").args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: error does not name {needle}: {err}");
    err
}

fn sha(path: &Path) -> Vec<u8> {
    // Content fingerprint without a hashing crate: the bytes themselves for these small images.
    std::fs::read(path).unwrap()
}

fn make_image(path: &Path, size: usize, byte: u8) {
    std::fs::write(path, vec![byte; size]).unwrap();
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn the_same_file_twice_is_refused_and_the_disk_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = d.join("disk.img");
    make_image(&disk, 1 << 20, 0x5a);
    std::os::unix::fs::symlink(&disk, d.join("link.img")).unwrap();
    std::fs::hard_link(&disk, d.join("hard.img")).unwrap();
    let before = sha(&disk);
    let listing = entries(d);
    let s = |n: &str| d.join(n).display().to_string();
    for (active, hidden, needle) in [
        (s("disk.img"), s("h.img"), "--active"),
        (s("link.img"), s("h.img"), "--active"),
        (s("a.img"), s("hard.img"), "--hidden"),
        (s("a.img"), s("./a.img"), "--hidden"),
    ] {
        let err = refused(
            &[
                "--replication",
                "secondary",
                "--disk",
                &s("disk.img"),
                "--active",
                &active,
                "--hidden",
                &hidden,
                "--nbd-listen",
                &format!("unix:{}", s("nbd.sock")),
                "--socket",
                &s("vhost.sock"),
                "--qmp",
                &s("qmp.sock"),
            ],
            needle,
        );
        assert!(err.contains("same file"), "{err}");
        assert_eq!(sha(&disk), before, "the disk changed");
        assert_eq!(entries(d), listing, "files were created or removed");
    }
}

/// A qemu-io process holding `image` open (read-write unless `read_only`) until dropped.
struct QemuIo(std::process::Child);

impl QemuIo {
    fn hold(image: &Path, read_only: bool) -> QemuIo {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        if read_only {
            c.arg("-r");
        }
        let mut child =
            c.arg(image).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        // The image is open once qemu-io answers a command.
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "read 0 512").unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("read 512/512") {
            let n = out.read(&mut buf).unwrap();
            assert!(n > 0, "qemu-io ended: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        std::mem::forget(stdin);
        std::mem::forget(out);
        QemuIo(child)
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_io(image: &Path, read_only: bool, cmd: &str) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if read_only {
        c.arg("-r");
    }
    let out = c.arg(image).args(["-c", cmd]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && !text.contains("lock"), text)
}

#[test]
fn served_images_are_locked_against_qemu_tools_and_a_second_instance() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_image(&disk, 4 << 20, 0);
    let d = disk.display().to_string();
    let server = Server::start(tempfile::tempdir().unwrap(), &["--disk", &d]);

    // QEMU's tools see colo-blk's locks: no writer, readers welcome.
    let (ok, text) = qemu_io(&disk, false, "write -P 0x11 0 4k");
    assert!(!ok && text.contains("lock"), "qemu-io wrote into a served image: {text}");
    let (ok, text) = qemu_io(&disk, true, "read 0 4k");
    assert!(ok, "a reader was refused: {text}");
    let out = Command::new("qemu-img").args(["resize", "-f", "raw", &d, "8M"]).output().unwrap();
    assert!(!out.status.success(), "qemu-img resized a served image");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 4 << 20);

    // A second colo-blk on the same image.
    let other = tempfile::tempdir().unwrap();
    let err = refused(&["--disk", &d, "--socket", &other.path().join("s").display().to_string()], "in use");
    assert!(err.contains(&d), "{err}");
    assert!(entries(other.path()).is_empty(), "the refused instance left {:?}", entries(other.path()));
    drop(server);

    // Once it is gone, qemu-io may write again.
    let (ok, text) = qemu_io(&disk, false, "write -P 0x11 0 4k");
    assert!(ok, "{text}");
}

#[test]
fn an_image_a_qemu_tool_holds_is_refused_and_readonly_instances_share() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_image(&disk, 4 << 20, 0);
    let d = disk.display().to_string();
    let sock = |n: &str| dir.path().join(n).display().to_string();
    {
        let _writer = QemuIo::hold(&disk, false);
        refused(&["--disk", &d, "--socket", &sock("a.sock")], "write");
        refused(&["--disk", &d, "--readonly", "--socket", &sock("a.sock")], "in use");
    }
    // Two read-only instances share the image (and a qemu-io reader too).
    let _reader = QemuIo::hold(&disk, true);
    let ro = |n: &str| {
        let t = tempfile::tempdir().unwrap();
        let qmp = t.path().join("q").display().to_string();
        let mut c = bin()
            .args(["serve", "--readonly", "--disk", &d, "--socket", &sock(n), "--qmp", &qmp])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        while UnixStream::connect(&qmp).is_err() {
            assert!(c.try_wait().unwrap().is_none(), "read-only instance {n} exited");
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
        (c, t)
    };
    let (mut a, _ta) = ro("ro1.sock");
    let (mut b, _tb) = ro("ro2.sock");
    // ... and together they keep writers out.
    let (ok, text) = qemu_io(&disk, false, "write 0 4k");
    assert!(!ok, "{text}");
    for c in [&mut a, &mut b] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn a_live_socket_is_never_taken_and_only_own_sockets_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("a.img").display().to_string();
    let socket = dir.path().join("vhost.sock");
    let mut first = Server::start_at(tempfile::tempdir().unwrap(), &socket, &["--disk", &disk, "--size", "4M"]);

    // Same vhost-user socket: refused, the first one keeps serving on it.
    let other_disk = dir.path().join("b.img").display().to_string();
    refused(&["--disk", &other_disk, "--size", "4M", "--socket", &socket.display().to_string()], "in use");
    assert!(!Path::new(&other_disk).exists(), "the refused start created its disk");
    // Telling that the socket is live did not look like a frontend to the running instance.
    assert!(
        !first.log().iter().any(|l| l.contains("frontend connected")),
        "the liveness probe connected as a frontend: {:?}",
        first.log()
    );
    // Same QMP socket as the live one.
    let qmp = first.qmp.display().to_string();
    refused(
        &[
            "--disk",
            &other_disk,
            "--size",
            "4M",
            "--socket",
            &dir.path().join("x.sock").display().to_string(),
            "--qmp",
            &qmp,
        ],
        "in use",
    );
    assert!(!dir.path().join("x.sock").exists(), "the refused start left its vhost-user socket");
    let mut c = Client::connect(&socket, 1, false);
    assert_eq!(c.write(0, 0, &pattern(0, 4096, 1)), 0);
    drop(c);

    // The first one's socket file is replaced behind its back (an operator removed it and
    // started another instance): stopping the first must leave the second's file alone.
    std::fs::remove_file(&socket).unwrap();
    let second = Server::start_at(tempfile::tempdir().unwrap(), &socket, &["--disk", &other_disk, "--size", "4M"]);
    first.qmp_ok("quit");
    assert!(first.wait_exit().success());
    assert!(socket.exists(), "stopping the first instance removed the second's socket");
    let mut c = Client::connect(&socket, 1, false);
    assert_eq!(c.write(0, 0, &pattern(0, 4096, 2)), 0);
    drop(c);
    drop(second);

    // A stale socket file (its server was killed) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let _third = Server::start_at(tempfile::tempdir().unwrap(), &stale, &["--disk", &disk]);
}

#[test]
fn formats_and_sizes_are_checked_before_serving() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("vm.qcow2");
    let st = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&q).arg("64M").status().unwrap();
    assert!(st.success());
    let before = sha(&q);
    let qs = q.display().to_string();
    let sock = dir.path().join("s.sock").display().to_string();
    let err = refused(&["--disk", &qs, "--socket", &sock], "qcow2");
    assert!(err.contains("--disk"), "{err}");
    // qcow2 images are not created or resized at start: --size is refused with --format qcow2.
    refused(&["--disk", &qs, "--socket", &sock, "--format", "qcow2", "--size", "64M"], "--size");
    assert_eq!(sha(&q), before);
    // --format qcow2 on a file that is not one, or a missing image: refused, nothing created.
    let plain = dir.path().join("plain.img");
    make_image(&plain, 1 << 20, 7);
    let plain_sha = sha(&plain);
    let err = refused(&["--disk", &plain.display().to_string(), "--socket", &sock, "--format", "qcow2"], "qcow2");
    assert!(err.contains("not a qcow2 image"), "{err}");
    assert_eq!(sha(&plain), plain_sha);
    let missing = dir.path().join("missing.qcow2");
    let err =
        refused(&["--disk", &missing.display().to_string(), "--socket", &sock, "--format", "qcow2"], "qemu-img create");
    assert!(!missing.exists(), "{err}");

    // --format raw serves the bytes as they are: the guest sees the header (a file with a
    // qcow2 magic and a raw-friendly size).
    let fake = dir.path().join("fake.img");
    let mut bytes = vec![0u8; 1 << 20];
    bytes[..4].copy_from_slice(b"QFI\xfb");
    std::fs::write(&fake, &bytes).unwrap();
    let fs = fake.display().to_string();
    refused(&["--disk", &fs, "--socket", &sock], "qcow2");
    // A qcow2 magic without a valid header: imago refuses it, nothing is written.
    let fake_sha = sha(&fake);
    refused(&["--disk", &fs, "--socket", &sock, "--format", "qcow2"], "cannot be opened as qcow2");
    assert_eq!(sha(&fake), fake_sha);
    let server = Server::start(tempfile::tempdir().unwrap(), &["--disk", &fs, "--format", "raw"]);
    let mut c = Client::connect(&server.socket, 1, true);
    let (st, data) = c.read(0, 0, 4096);
    assert_eq!(st, 0);
    assert_eq!(&data[..4], b"QFI\xfb");
    drop(c);
    drop(server);

    // --size that disagrees with an existing image names both sizes.
    let raw = dir.path().join("raw.img");
    make_image(&raw, 64 << 20, 0);
    let err = refused(&["--disk", &raw.display().to_string(), "--size", "2G", "--socket", &sock], "--size");
    assert!(err.contains(&(64u64 << 20).to_string()) && err.contains(&(2u64 << 30).to_string()), "{err}");
    // A qcow2 file given as a buffer is not emptied.
    let disk = dir.path().join("d.img").display().to_string();
    refused(
        &[
            "--replication",
            "secondary",
            "--disk",
            &disk,
            "--size",
            "64M",
            "--active",
            &qs,
            "--hidden",
            &dir.path().join("h.img").display().to_string(),
            "--nbd-listen",
            &format!("unix:{}", dir.path().join("n.sock").display()),
            "--socket",
            &sock,
        ],
        "--active",
    );
    assert_eq!(sha(&q), before);
    assert!(!Path::new(&disk).exists());
}

#[test]
fn path_errors_are_found_before_anything_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = d.join("new.img").display().to_string();
    let sock = d.join("v.sock").display().to_string();
    refused(&["--disk", &disk, "--size", "8M", "--socket", &sock, "--qmp", "/nonexistent/dir/q.sock"], "--qmp");
    refused(&["--disk", &disk, "--size", "8M", "--socket", "/nonexistent/dir/v.sock"], "--socket");
    refused(&["--disk", &disk, "--size", "8M", "--socket", &sock, "--qmp", &sock], "same file");
    // A regular file where the socket should go is never unlinked.
    std::fs::write(d.join("file"), b"keep").unwrap();
    refused(&["--disk", &disk, "--size", "8M", "--socket", &d.join("file").display().to_string()], "not a socket");
    assert_eq!(std::fs::read(d.join("file")).unwrap(), b"keep");
    assert_eq!(entries(d), vec!["file".to_string()]);
    // A TCP COLO hook without an allow-list.
    refused(
        &["--replication", "primary", "--disk", &disk, "--size", "8M", "--socket", &sock, "--colo-hook", "127.0.0.1:1"],
        "--nbd-allow",
    );
    assert_eq!(entries(d), vec!["file".to_string()]);
}

#[test]
fn ctl_gives_up_on_a_socket_that_is_not_qmp_and_honours_signals() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img").display().to_string();
    let server = Server::start(tempfile::tempdir().unwrap(), &["--disk", &disk, "--size", "4M"]);
    let t = Instant::now();
    let out = bin().arg("ctl").arg("--qmp").arg(&server.socket).arg("query-block").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(t.elapsed() < Duration::from_secs(15), "ctl took {:?}", t.elapsed());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a QMP"), "{}", String::from_utf8_lossy(&out.stderr));
    // The frontend slot it held is free again.
    let mut c = Client::connect(&server.socket, 1, false);
    assert_eq!(c.write(0, 0, &pattern(0, 512, 3)), 0);
    drop(c);

    // SIGINT and SIGTERM stop ctl (a silent peer that never greets).
    let silent = dir.path().join("silent.sock");
    let _l = UnixListener::bind(&silent).unwrap();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut child =
            bin().arg("ctl").arg("--qmp").arg(&silent).arg("query-block").stderr(Stdio::null()).spawn().unwrap();
        // Let it connect and block in its read (an event would need ctl's cooperation).
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "ctl ignored signal {sig}");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(!status.success());
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_control_socket_keeps_its_own_mode() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img").display().to_string();
    let s = Server::start(tempfile::tempdir().unwrap(), &["--disk", &disk, "--size", "4M", "--socket-mode", "660"]);
    assert_eq!(mode(&s.socket), 0o660);
    assert_eq!(mode(&s.qmp), 0o600, "--socket-mode opened the control socket");
    drop(s);
    let disk2 = dir.path().join("e.img").display().to_string();
    let s = Server::start(tempfile::tempdir().unwrap(), &["--disk", &disk2, "--size", "4M", "--qmp-mode", "640"]);
    assert_eq!(mode(&s.socket), 0o600);
    assert_eq!(mode(&s.qmp), 0o640);
}

#[test]
fn an_open_nbd_listener_without_tls_or_allow_list_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let port = common::free_port();
    let mut s = Server::start(
        tempfile::tempdir().unwrap(),
        &[
            "--replication",
            "secondary",
            "--disk",
            &p("d.img"),
            "--size",
            "4M",
            "--active",
            &p("a.img"),
            "--hidden",
            &p("h.img"),
            "--nbd-listen",
            &format!("0.0.0.0:{port}"),
        ],
    );
    assert!(s.log().iter().any(|l| l.contains("WARN") && l.contains("--nbd-allow")), "{:?}", s.log());
    // Loopback is not warned about.
    drop(s);
    let port = common::free_port();
    s = Server::start(
        tempfile::tempdir().unwrap(),
        &[
            "--replication",
            "secondary",
            "--disk",
            &p("d2.img"),
            "--size",
            "4M",
            "--active",
            &p("a2.img"),
            "--hidden",
            &p("h2.img"),
            "--nbd-listen",
            &format!("127.0.0.1:{port}"),
        ],
    );
    assert!(!s.log().iter().any(|l| l.contains("--nbd-allow")), "{:?}", s.log());
}

#[test]
fn readiness_is_notified_once_every_socket_listens() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify");
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(WAIT)).unwrap();
    let qmp = dir.path().join("q.sock");
    let mut child = bin()
        .args(["serve", "--size", "4M", "--disk"])
        .arg(dir.path().join("d.img"))
        .arg("--socket")
        .arg(dir.path().join("v.sock"))
        .arg("--qmp")
        .arg(&qmp)
        .env("NOTIFY_SOCKET", &notify)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = rx.recv(&mut buf).expect("no READY=1 within the deadline");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(msg.contains(&format!("MAINPID={}", child.id())), "{msg}");
    // At that moment both sockets answer.
    colo_blk::qmp::client::QmpClient::connect(&qmp).expect("QMP not ready at READY=1");
    UnixStream::connect(dir.path().join("v.sock")).expect("vhost-user socket not ready at READY=1");
    let _ = child.kill();
    let _ = child.wait();
}

/// Serves through systemd's own socket-activation tool: the vhost-user socket is created by
/// it and passed as fd 3 (LISTEN_FDS), no --socket given.
#[test]
fn socket_activation_and_an_inherited_fd() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let qmp = dir.path().join("q.sock");
    let disk = dir.path().join("d.img");
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg(env!("CARGO_BIN_EXE_colo-blk"))
        .args(["serve", "--size", "4M", "--disk"])
        .arg(&disk)
        .arg("--qmp")
        .arg(&qmp)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // systemd-socket-activate starts colo-blk at the first connection.
    let deadline = Instant::now() + WAIT;
    while !socket.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = Client::connect(&socket, 1, false);
    assert_eq!(c.write(0, 4096, &pattern(4096, 4096, 9)), 0);
    let (st, back) = c.read(0, 4096, 4096);
    assert_eq!((st, back), (0, pattern(4096, 4096, 9)));
    drop(c);
    let q = colo_blk::qmp::client::QmpClient::connect(&qmp).unwrap().execute("query-block", Default::default());
    let block = q.unwrap().unwrap();
    assert_eq!(block["socket"], socket.display().to_string());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(common::file_range(&disk, 4096, 4096), pattern(4096, 4096, 9));

    // --socket-fd with a listener this test created and left open in the child.
    let socket2 = dir.path().join("inherited.sock");
    let listener = UnixListener::bind(&socket2).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    // SAFETY: clearing FD_CLOEXEC on our own open descriptor so the child inherits it.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let disk2 = dir.path().join("d2.img");
    let mut child = bin()
        .args(["serve", "--size", "4M", "--disk"])
        .arg(&disk2)
        .arg("--socket-fd")
        .arg(fd.to_string())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(listener);
    let mut c = Client::connect(&socket2, 1, false);
    assert_eq!(c.write(0, 0, &pattern(0, 4096, 4)), 0);
    drop(c);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(common::file_range(&disk2, 0, 4096), pattern(0, 4096, 4));
    // A descriptor that is not a listening socket is refused.
    refused(
        &["--disk", &dir.path().join("d3.img").display().to_string(), "--size", "4M", "--socket-fd", "0"],
        "--socket-fd",
    );
}

#[test]
fn pidfile_is_written_locked_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("colo-blk.pid");
    let disk = dir.path().join("d.img").display().to_string();
    let pf = pidfile.display().to_string();
    let mut s = Server::start(tempfile::tempdir().unwrap(), &["--disk", &disk, "--size", "4M", "--pidfile", &pf]);
    let text = std::fs::read_to_string(&pidfile).unwrap();
    assert_eq!(text.trim(), s.child.id().to_string());
    let other = dir.path().join("o.img").display().to_string();
    let sock = dir.path().join("o.sock").display().to_string();
    refused(&["--disk", &other, "--size", "4M", "--socket", &sock, "--pidfile", &pf], "--pidfile");
    assert!(!Path::new(&other).exists());
    assert_eq!(std::fs::read_to_string(&pidfile).unwrap(), text, "the refused instance changed the pid file");
    s.qmp_ok("quit");
    assert!(s.wait_exit().success());
    assert!(!pidfile.exists(), "pid file left behind");
}

#[test]
fn version_log_level_and_rust_log() {
    let want = format!("colo-blk {}", env!("CARGO_PKG_VERSION"));
    for args in [&["--version"][..], &["serve", "--version"][..]] {
        let out = bin().args(args).output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want, "{args:?}");
    }
    // An invalid RUST_LOG is reported, not a reason for silence.
    let dir = tempfile::tempdir().unwrap();
    let mut child = bin()
        .args(["serve", "--size", "4M", "--disk"])
        .arg(dir.path().join("d.img"))
        .arg("--socket")
        .arg(dir.path().join("v.sock"))
        .env("RUST_LOG", "verbose")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = read_lines_until(&mut child, "serving");
    assert!(lines.iter().any(|l| l.contains("RUST_LOG=verbose ignored")), "{lines:?}");
    // --log-level warn hides info lines.
    let mut child = bin()
        .args(["serve", "--log-level", "warn", "--size", "4M", "--disk"])
        .arg(dir.path().join("e.img"))
        .arg("--socket")
        .arg(dir.path().join("w.sock"))
        .arg("--qmp")
        .arg(dir.path().join("q.sock"))
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while colo_blk::qmp::client::QmpClient::connect(&dir.path().join("q.sock")).is_err() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let _ = child.wait();
    assert!(!err.contains("INFO"), "{err}");
}

fn read_lines_until(child: &mut std::process::Child, needle: &str) -> Vec<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let l = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("log line");
        let done = l.contains(needle);
        lines.push(l);
        if done {
            let _ = child.kill();
            let _ = child.wait();
            return lines;
        }
    }
}

#[test]
fn qmp_answers_the_questions_clients_ask_first() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img").display().to_string();
    let s = Server::start(tempfile::tempdir().unwrap(), &["--disk", &disk, "--size", "4M"]);
    let v = s.qmp_ok("query-version");
    assert_eq!(v["package"], format!("colo-blk {}", env!("CARGO_PKG_VERSION")));
    assert_eq!(v["qemu"]["minor"], env!("CARGO_PKG_VERSION_MINOR").parse::<u64>().unwrap());
    let cmds = s.qmp_ok("query-commands");
    let names: Vec<&str> = cmds.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    for n in ["query-version", "query-commands", "query-block-exports", "query-replication", "quit"] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    // Every listed command is known to the server (none answers CommandNotFound).
    let mut q = s.qmp();
    for n in &names {
        if *n == "quit" {
            continue;
        }
        let r = q.execute(n, Default::default()).unwrap();
        if let Err(e) = r {
            assert!(!e.contains("has not been found"), "{n}: {e}");
        }
    }
    let e = s.qmp_ok("query-block-exports");
    assert_eq!(e[0]["type"], "vhost-user-blk");
    assert_eq!(e[0]["shutting-down"], false);
    assert!(e[0]["id"].is_string() && e[0]["node-name"].is_string());
    // The greeting carries the same version object.
    let mut raw = UnixStream::connect(&s.qmp).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = raw.read(&mut buf).unwrap();
    let greeting: serde_json::Value = serde_json::from_slice(&buf[..n]).unwrap();
    assert_eq!(greeting["QMP"]["version"], v);
}

/// A qcow2 disk's backing file named as a buffer (or the pid file) is refused before anything
/// is created: emptying the active buffer at a checkpoint would wipe the base image.
#[test]
fn a_backing_file_given_as_a_buffer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = (dir.path().join("base.raw"), dir.path().join("top.qcow2"));
    make_image(&base, 4 << 20, 0x33);
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(&base)
        .args(["-F", "raw"])
        .arg(&top)
        .status()
        .unwrap();
    assert!(st.success());
    let (b, t) = (base.display().to_string(), top.display().to_string());
    let hidden = dir.path().join("h.img").display().to_string();
    let nbd = format!("unix:{}", dir.path().join("n.sock").display());
    let sock = dir.path().join("s.sock").display().to_string();
    let before = sha(&base);
    let err = refused(
        &[
            "--replication",
            "secondary",
            "--format",
            "qcow2",
            "--disk",
            &t,
            "--active",
            &b,
            "--hidden",
            &hidden,
            "--nbd-listen",
            &nbd,
            "--socket",
            &sock,
        ],
        "backing file of --disk",
    );
    assert!(err.contains("--active"), "{err}");
    assert_eq!(sha(&base), before);
    assert!(!dir.path().join("h.img").exists(), "the hidden buffer was created before the refusal");
    refused(&["--format", "qcow2", "--disk", &t, "--pidfile", &b, "--socket", &sock], "backing file of --disk");
    assert_eq!(sha(&base), before);
}
