//! `daemon::build` in-process, through the library API only (no command line, no process):
//! a graph built from a `Config` over real files in a temporary directory, its sockets, its
//! image lock and its NBD server; and a failed build, early or late (after the secondary's
//! threads started), leaves nothing behind.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use colo_blk::block::lock::{ImageLock, LockError};
use colo_blk::daemon::{self, BuildError, Built, Config, Role};
use colo_blk::nbd::NbdAddress;
use colo_blk::qmp::{Command, QmpHandler};

const SIZE: u64 = 1 << 20;

/// The names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Asserts that `path` is a socket file of mode 0600.
fn assert_private_socket(path: &Path) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(m.file_type().is_socket(), "{} is not a socket", path.display());
    assert_eq!(m.permissions().mode() & 0o777, 0o600, "{}", path.display());
}

/// A secondary's configuration with every file in `dir`.
fn secondary_config(dir: &Path) -> Config {
    Config {
        socket: Some(dir.join("vhost.sock")),
        qmp: Some(dir.join("qmp.sock")),
        pidfile: Some(dir.join("colo-blk.pid")),
        disk: dir.join("disk.img"),
        size: Some(SIZE),
        replication: Role::Secondary,
        active: Some(dir.join("active.img")),
        hidden: Some(dir.join("hidden.img")),
        nbd_listen: Some(NbdAddress::Unix(dir.join("nbd.sock"))),
        colo_hook: Some(NbdAddress::Unix(dir.join("hook.sock"))),
        num_queues: 2,
        ..Config::default()
    }
}

fn build_err(cfg: Config) -> BuildError {
    match daemon::build(cfg) {
        Ok(_) => panic!("the build succeeded"),
        Err(e) => e,
    }
}

fn build_ok(cfg: Config) -> Built {
    daemon::build(cfg).unwrap_or_else(|e| panic!("build failed: {e}"))
}

#[test]
fn mode_none_on_a_temp_file_holds_the_image_lock_while_built() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let cfg = Config {
        socket: Some(dir.path().join("vhost.sock")),
        qmp: Some(dir.path().join("qmp.sock")),
        pidfile: Some(dir.path().join("colo-blk.pid")),
        disk: disk.clone(),
        size: Some(SIZE),
        num_queues: 2,
        ..Config::default()
    };
    let built = build_ok(cfg);
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), SIZE);
    assert_private_socket(&dir.path().join("vhost.sock"));
    assert_private_socket(&dir.path().join("qmp.sock"));
    let mut owned: Vec<PathBuf> = built.socket_files().map(Path::to_path_buf).collect();
    owned.sort();
    assert_eq!(owned, [dir.path().join("qmp.sock"), dir.path().join("vhost.sock")]);
    let pid = std::fs::read_to_string(dir.path().join("colo-blk.pid")).unwrap();
    assert_eq!(pid.trim(), std::process::id().to_string());
    let block = built.daemon().execute(&Command::QueryBlock).unwrap();
    assert_eq!(block["size"], SIZE);
    assert_eq!(block["num-queues"], 2);
    assert_eq!(built.daemon().execute(&Command::QueryReplication).unwrap()["mode"], "none");
    // The image lock belongs to the built daemon: another writer is refused while it lives,
    // and gets the image once it is gone.
    assert!(matches!(ImageLock::acquire(&disk, true), Err(LockError::InUse { .. })));
    drop(built);
    ImageLock::acquire(&disk, true).expect("the lock went with the built daemon");
}

#[test]
fn secondary_with_buffers_serves_nbd_on_a_private_socket() {
    let dir = tempfile::tempdir().unwrap();
    let built = build_ok(secondary_config(dir.path()));
    for buffer in ["active.img", "hidden.img"] {
        assert_eq!(std::fs::metadata(dir.path().join(buffer)).unwrap().len(), SIZE, "{buffer}");
    }
    for socket in ["vhost.sock", "qmp.sock", "nbd.sock", "hook.sock"] {
        assert_private_socket(&dir.path().join(socket));
    }
    assert_eq!(built.socket_files().count(), 4);
    let replication = built.daemon().execute(&Command::QueryReplication).unwrap();
    assert_eq!(replication["mode"], "secondary", "{replication}");
    // The NBD server's accept thread answers with the newstyle greeting.
    let mut peer = std::os::unix::net::UnixStream::connect(dir.path().join("nbd.sock")).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 8];
    peer.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"NBDMAGIC");
    assert!(matches!(ImageLock::acquire(&dir.path().join("disk.img"), true), Err(LockError::InUse { .. })));
}

#[test]
fn a_build_failing_at_the_buffers_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    // The hidden buffer's directory is missing: found when the buffers are opened, after the
    // pid file, the four sockets and the disk were created.
    let cfg = Config { hidden: Some(dir.path().join("missing").join("hidden.img")), ..secondary_config(dir.path()) };
    let e = build_err(cfg);
    assert!(matches!(e, BuildError::Buffers(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.starts_with("--active/--hidden: ") && msg.contains("hidden.img"), "{msg}");
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn a_build_failing_after_the_secondary_started_leaves_only_what_was_there() {
    let dir = tempfile::tempdir().unwrap();
    // An existing active buffer of the wrong length is found after Secondary::open started
    // the buffer pool and the reclaim thread; it is the operator's and stays as it was.
    let active = dir.path().join("active.img");
    std::fs::File::create(&active).unwrap().set_len(SIZE / 2).unwrap();
    let e = build_err(secondary_config(dir.path()));
    assert!(matches!(e, BuildError::BufferLengths(_)), "{e:?}");
    assert_eq!(e.to_string(), "--active/--hidden: Active disk, hidden disk, secondary disk's length are not the same");
    assert_eq!(entries(dir.path()), ["active.img"]);
    assert_eq!(std::fs::metadata(&active).unwrap().len(), SIZE / 2);
    // Its lock went with the failed build.
    ImageLock::acquire(&active, true).expect("the buffer is not left locked");
}

#[test]
fn an_invalid_config_is_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config { active: None, ..secondary_config(dir.path()) };
    let e = build_err(cfg);
    assert!(matches!(e, BuildError::Invalid(_)), "{e:?}");
    assert_eq!(e.to_string(), "--active: required with --replication secondary");
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}
