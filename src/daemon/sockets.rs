//! Private sockets and termination signals.

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use super::DaemonError;

/// Serialises the umask changes of [`bind_private`].
static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Binds a UNIX socket that only the owner can use (mode 0600), replacing a stale one.
pub fn bind_private(path: &Path) -> Result<UnixListener, DaemonError> {
    let err = |source| DaemonError::Bind { path: path.display().to_string(), source };
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "path exists and is not a socket")));
        }
        Err(_) => {}
    }
    // The set/bind/restore sequence is serialised: two binds overlapping would restore each
    // other's 0177 as the "previous" mask and leave it for good.
    let _one_at_a_time = UMASK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: umask(2) cannot fail and touches no memory; its only effect is on the
    // process-wide file-creation mask, which is why the mask is changed only for this bind and
    // only while no other thread can create a file: `daemon::build` binds every socket (this
    // function, through `bind_owned`) after its checks and before anything it builds starts a
    // thread (the secondary's buffer pool and reclaim thread, the NBD accept threads, the
    // daemon's signal, control-socket and relay threads all come later), and `main` has
    // started none before the build. A library user that calls this while threads of its own
    // create files would see those files created with at most mode 0600, nothing worse.
    let old = unsafe { libc::umask(0o177) };
    let res = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    res.map_err(err)
}

/// Checks that `path` can become a listening socket of ours without taking anything from
/// anyone: missing, or a stale socket file that no server answers on. A live server there
/// (a second colo-blk started by mistake, the VMM's own socket) is refused.
pub fn check_free(path: &Path) -> Result<(), DaemonError> {
    let err = |source| DaemonError::Bind { path: path.display().to_string(), source };
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            // Asking the kernel first avoids connecting to a live colo-blk, which would take
            // the probe for a frontend (and, with a VMM attached, queue it as the next one).
            if listening_on(path) {
                return Err(DaemonError::InUse { path: path.display().to_string() });
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => Err(DaemonError::InUse { path: path.display().to_string() }),
                // Nobody listens: a leftover of a process that died.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
                Err(e) => Err(err(e)),
            }
        }
        Ok(_) => Err(err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "path exists and is not a socket"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
                Err(err(std::io::Error::new(std::io::ErrorKind::NotFound, "its directory does not exist")))
            }
            _ => Ok(()),
        },
        Err(e) => Err(err(e)),
    }
}

/// Whether a socket of this network namespace listens on `path` (`/proc/net/unix`; the
/// listening flag is `__SO_ACCEPTCON`, 0x10000). A server in another namespace is not seen
/// here; the caller's connect test covers that case.
fn listening_on(path: &Path) -> bool {
    const ACCEPTCON: u32 = 0x10000;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let absolute = std::path::absolute(path).ok();
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(flags), Some(bound)) = (cols.get(3), cols.get(7)) else {
            return false;
        };
        let listening = u32::from_str_radix(flags, 16).is_ok_and(|f| f & ACCEPTCON != 0);
        let bound = Path::new(bound);
        listening && (bound == path || absolute.as_deref() == Some(bound))
    })
}

/// A socket file this process created. At exit it is removed only if the path still names
/// that very file: a second instance that replaced it keeps its own.
#[derive(Debug)]
pub struct OwnedSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl OwnedSocket {
    /// Records the socket file now at `path`.
    pub fn new(path: &Path) -> std::io::Result<OwnedSocket> {
        let m = std::fs::symlink_metadata(path)?;
        Ok(OwnedSocket { path: path.to_path_buf(), dev: m.dev(), ino: m.ino() })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file if it is still the one this process created.
    pub fn remove(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && m.dev() == self.dev
            && m.ino() == self.ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds `path` as a private (0600) listening socket after [`check_free`], and returns the
/// record that lets the process remove exactly this file later.
pub fn bind_owned(path: &Path) -> Result<(UnixListener, OwnedSocket), DaemonError> {
    check_free(path)?;
    let listener = bind_private(path)?;
    let owned =
        OwnedSocket::new(path).map_err(|source| DaemonError::Bind { path: path.display().to_string(), source })?;
    Ok((listener, owned))
}

/// Who may use the UNIX sockets colo-blk creates. They are created 0600 (no window where
/// another user could connect), then given this mode and owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPerms {
    /// Permission bits (the owner always has read and write).
    pub mode: u32,
    /// New owner uid and optional gid.
    pub owner: Option<(u32, Option<u32>)>,
}

impl Default for SocketPerms {
    fn default() -> Self {
        SocketPerms { mode: 0o600, owner: None }
    }
}

impl SocketPerms {
    /// Applies the owner, then the mode, to the socket at `path`.
    pub fn apply(&self, path: &Path) -> std::io::Result<()> {
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(path, Some(uid), gid)?;
        }
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(self.mode))
    }
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    set
}

/// Blocks SIGTERM/SIGINT in this thread and every thread it creates later, so that only the
/// signal thread (via `sigwait`) handles them. Call it first thing in `main`, before any
/// thread exists.
pub fn block_termination_signals() -> std::io::Result<()> {
    let set = termination_set();
    // SAFETY: valid set pointer; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::from_raw_os_error(rc)) }
}

/// Waits for SIGTERM or SIGINT and returns its number.
pub fn wait_termination_signal() -> i32 {
    let set = termination_set();
    let mut sig: libc::c_int = 0;
    loop {
        // SAFETY: valid pointers to a local set and a local int.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            return sig;
        }
    }
}
