//! TLS with client certificates on the replication link, interoperating with QEMU's
//! `tls-creds-x509` (qemu-io as a TLS primary, qemu-nbd as a TLS secondary) and between two
//! colo-blk instances. Only a peer with a certificate from the CA gets in.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::hostile::{make_creds, qemu_io_tcp};
use common::pair::*;
use common::*;
use serde_json::json;

fn tls_secondary(dir: &Path, port: u16, srv: &Path) -> (Server, PathBuf) {
    let p = |n: &str| dir.join(n).display().to_string();
    let (d, a, h) = (p("sec.img"), p("a.img"), p("h.img"));
    let listen = format!("127.0.0.1:{port}");
    let creds = srv.display().to_string();
    let s = Server::start(
        tempfile::tempdir().unwrap(),
        &[
            "--replication",
            "secondary",
            "--disk",
            &d,
            "--size",
            "16M",
            "--active",
            &a,
            "--hidden",
            &h,
            "--nbd-listen",
            &listen,
            "--nbd-tls-creds",
            &creds,
        ],
    );
    qmp(&s, "replication-start", json!({"mode": "secondary"})).unwrap();
    (s, dir.join("sec.img"))
}

#[test]
fn qemu_tls_client_gets_in_only_with_a_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, cli, rogue) = make_creds(dir.path());
    let port = free_port();
    let (sec, sdisk) = tls_secondary(dir.path(), port, &srv);
    let (ok, out) = qemu_io_tcp(port, Some(&cli), "write -P 0x5a 1M 64k");
    assert!(ok, "{out}");
    assert!(file_range(&sdisk, MIB, 65536) == vec![0x5a; 65536]);
    let (ok, out) = qemu_io_tcp(port, None, "write -P 0x66 0 4k");
    assert!(!ok && out.contains("TLS is required"), "{out}");
    let (ok, out) = qemu_io_tcp(port, Some(&rogue), "write -P 0x66 0 4k");
    assert!(!ok, "a certificate from another CA got in: {out}");
    assert!(file_range(&sdisk, 0, 4096) == vec![0u8; 4096], "a refused client wrote");
    let q = qmp(&sec, "query-replication", json!({})).unwrap();
    assert_eq!(q["nbd"]["writes"], 1, "{q}");
}

#[test]
fn colo_blk_primary_mirrors_over_tls_to_colo_blk_and_to_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, cli, _) = make_creds(dir.path());
    // colo-blk -> colo-blk, barrier extension included.
    let port = free_port();
    let (sec, sdisk) = tls_secondary(dir.path(), port, &srv);
    let pdisk = dir.path().join("pri.img");
    let uri = format!("nbd://127.0.0.1:{port}/");
    let creds = cli.display().to_string();
    let pri = start_primary(
        tempfile::tempdir().unwrap(),
        &pdisk,
        16 * MIB,
        &["--secondary", &uri, "--secondary-tls-creds", &creds],
    );
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    let mut c = Client::connect(&pri.socket, 1, false);
    for i in 0..64u64 {
        assert_eq!(c.write(0, i * 200_704 % (15 * MIB), &pattern(i * 200_704 % (15 * MIB), 65536, i as u32 + 1)), 0);
    }
    qmp(&pri, "replication-checkpoint", json!({})).unwrap();
    let q = qmp(&pri, "query-replication", json!({})).unwrap();
    assert_eq!(q["link"]["colo-barriers"], true, "{q}");
    assert_eq!(q["error"], serde_json::Value::Null, "{q}");
    assert_eq!(qmp(&sec, "query-replication", json!({})).unwrap()["colo"]["pending-barrier"], 1);
    same(&pdisk, &sdisk);
    drop(c);
    drop(pri);

    // colo-blk -> qemu-nbd with QEMU's TLS server.
    let ndisk = dir.path().join("nbd.img");
    make_disk(&ndisk, 16 * MIB, None);
    let nport = free_port();
    let mut qn: Child = Command::new("qemu-nbd")
        .arg("--object")
        .arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=server", srv.display()))
        .args(["--tls-creds", "tls0", "-f", "raw", "-x", "exp", "-t", "-b", "127.0.0.1", "-p", &nport.to_string()])
        .arg(&ndisk)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_until("qemu-nbd", || std::net::TcpStream::connect(("127.0.0.1", nport)).is_ok());
    let p2 = dir.path().join("pri2.img");
    let uri = format!("nbd://127.0.0.1:{nport}/exp");
    let pri = start_primary(
        tempfile::tempdir().unwrap(),
        &p2,
        16 * MIB,
        &["--secondary", &uri, "--secondary-tls-creds", &creds],
    );
    qmp(&pri, "replication-start", json!({"mode": "primary"})).unwrap();
    let mut c = Client::connect(&pri.socket, 1, false);
    assert_eq!(c.write(0, 3 * MIB, &pattern(3 * MIB, 131072, 9)), 0);
    qmp(&pri, "replication-checkpoint", json!({})).unwrap();
    let q = qmp(&pri, "query-replication", json!({})).unwrap();
    assert_eq!(
        (q["link"]["connected"].clone(), q["link"]["colo-barriers"].clone()),
        (json!(true), json!(false)),
        "{q}"
    );
    same(&p2, &ndisk);
    let _ = qn.kill();
    let _ = qn.wait();
}

#[test]
fn tls_options_are_checked() {
    expect_usage_error(&["--nbd-tls-creds", "/nonexistent"], "--nbd-tls-creds");
    expect_usage_error(&["--secondary-tls-creds", "/nonexistent"], "--secondary-tls-creds");
}
