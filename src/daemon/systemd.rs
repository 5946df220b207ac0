//! Service-manager conventions: readiness notification (`NOTIFY_SOCKET`, sd_notify's
//! datagram protocol), socket activation (`LISTEN_FDS`/`LISTEN_PID`) or an inherited
//! listening descriptor (`--socket-fd`), and a locked pid file.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Tells the service manager that every socket listens (`READY=1`), when `NOTIFY_SOCKET`
/// names one; otherwise does nothing. A leading `@` names an abstract socket.
pub fn notify_ready() -> io::Result<()> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let msg = format!("READY=1\nMAINPID={}\nSTATUS=serving\n", std::process::id());
    let sock = UnixDatagram::unbound()?;
    let bytes = target.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(msg.as_bytes(), &addr)?;
    } else {
        sock.send_to(msg.as_bytes(), Path::new(&target))?;
    }
    Ok(())
}

/// The listening socket systemd passed (`LISTEN_FDS` ≥ 1 for this process), if any. Only the
/// first descriptor is used: it is the vhost-user socket.
pub fn activated_fd() -> Option<RawFd> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let count: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    (pid == std::process::id() && count >= 1).then_some(LISTEN_FDS_START)
}

/// Takes ownership of an inherited listening UNIX stream socket after checking that `fd` is
/// one. Returns the listener and its path (when it is bound to one).
pub fn inherited_listener(fd: RawFd) -> io::Result<(UnixListener, Option<PathBuf>)> {
    let int_opt = |opt: libc::c_int| -> io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`, a local int; a descriptor
        // that is not an open socket makes it fail with EBADF/ENOTSOCK, nothing else.
        let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut v as *mut libc::c_int).cast(), &mut len) };
        if rc == 0 { Ok(v) } else { Err(io::Error::last_os_error()) }
    };
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("descriptor {fd} is not {what}"));
    if int_opt(libc::SO_DOMAIN).map_err(|_| bad("an open socket"))? != libc::AF_UNIX {
        return Err(bad("a UNIX socket"));
    }
    if int_opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(bad("a stream socket"));
    }
    if int_opt(libc::SO_ACCEPTCONN)? != 1 {
        return Err(bad("a listening socket"));
    }
    // SAFETY: `fd` is an open listening UNIX stream socket (checked above) that the process
    // inherited; nothing else in this process owns it, and it is taken exactly once.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // SAFETY: as above; FD_CLOEXEC keeps it out of processes colo-blk may start.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let path = listener.local_addr()?.as_pathname().map(Path::to_path_buf);
    Ok((listener, path))
}

/// A pid file holding this process's id, locked so that a second instance pointed at the
/// same file is refused, and removed at exit if it is still ours.
#[derive(Debug)]
pub struct PidFile {
    file: File,
    path: PathBuf,
}

impl PidFile {
    /// Creates or takes over `path` (a stale file of a dead process is fine) and writes the
    /// process id into it. Fails if another live process holds it.
    pub fn create(path: &Path) -> io::Result<PidFile> {
        let mut file = OpenOptions::new().write(true).create(true).truncate(false).mode(0o644).open(path)?;
        // SAFETY: zeroed flock is valid plain data; l_pid must be 0 for OFD locks.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: the descriptor is open; `fl` is valid. Length 0 = the whole file.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } != 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                let other = std::fs::read_to_string(path).unwrap_or_default();
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("held by a running process (pid {})", other.trim()),
                ));
            }
            return Err(e);
        }
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_all()?;
        Ok(PidFile { file, path: path.to_path_buf() })
    }

    /// Removes the file if the path still names the one this process wrote.
    pub fn remove(&self) {
        if let (Ok(ours), Ok(now)) = (self.file.metadata(), std::fs::metadata(&self.path))
            && ours.dev() == now.dev()
            && ours.ino() == now.ino()
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
