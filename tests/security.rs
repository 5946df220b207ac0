//! Who may talk to colo-blk: socket modes and owners, the NBD allow-list, limits.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::pair::*;
use common::*;
use serde_json::json;

fn secondary_tcp(dir: &std::path::Path, port: u16, allow: &str) -> Server {
    let p = |n: &str| dir.join(n).display().to_string();
    let listen = format!("127.0.0.1:{port}");
    let (d, a, h) = (p("s.img"), p("a.img"), p("h.img"));
    let args = vec![
        "--replication",
        "secondary",
        "--disk",
        &d,
        "--size",
        "8M",
        "--active",
        &a,
        "--hidden",
        &h,
        "--nbd-listen",
        &listen,
        "--nbd-allow",
        allow,
    ];
    Server::start(tempfile::tempdir().unwrap(), &args)
}

fn qemu_io_read(port: u16) -> bool {
    let uri = format!("nbd://127.0.0.1:{port}/");
    Command::new("qemu-io").args(["-f", "raw", "-r", &uri, "-c", "read 0 4k"]).output().unwrap().status.success()
}

#[test]
fn nbd_allow_list_refuses_other_peers() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let s = secondary_tcp(dir.path(), port, "10.9.9.9,192.168.0.0/16");
    assert!(!qemu_io_read(port), "a peer outside the allow-list got in");
    let q = qmp(&s, "query-replication", json!({})).unwrap();
    assert!(q["nbd"]["refused"].as_u64().unwrap() >= 1, "{q}");
    assert_eq!(q["nbd"]["writes"], 0, "{q}");
    drop(s);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _s = secondary_tcp(dir.path(), port, "127.0.0.0/8");
    assert!(qemu_io_read(port), "an allowed peer was refused");
}

#[test]
fn socket_mode_and_owner_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img").display().to_string();
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let owner = format!("{uid}:{gid}");
    let s = Server::start(
        tempfile::tempdir().unwrap(),
        &["--disk", &disk, "--size", "8M", "--socket-mode", "660", "--socket-owner", &owner, "--qmp-owner", &owner],
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&s.socket), 0o660);
    // The VMM's group gets the vhost-user socket, not the control socket (quit, failover).
    assert_eq!(mode(&s.qmp), 0o600);
    let _c = Client::connect(&s.socket, 1, false);
    // The default stays private.
    let d2 = dir.path().join("e.img").display().to_string();
    let s2 = Server::start(tempfile::tempdir().unwrap(), &["--disk", &d2, "--size", "8M"]);
    assert_eq!(std::fs::metadata(&s2.socket).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn bad_security_options_exit_2_and_create_nothing() {
    expect_usage_error(&["--socket-mode", "644x"], "--socket-mode");
    expect_usage_error(&["--socket-mode", "044"], "--socket-mode");
    expect_usage_error(&["--socket-owner", "root"], "--socket-owner");
    expect_usage_error(&["--nbd-allow", "10.0.0.1"], "--nbd-allow");
}
