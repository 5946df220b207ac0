//! What `colo-blk serve` is asked to do, as plain data ([`Config`]), and the checks that find
//! a wrong configuration before anything is created ([`Config::check`], [`Config::check_paths`]).
//! The messages name the command-line options, since that is where an operator fixes them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::preflight;
use super::sockets::{SocketPerms, check_free};
use crate::block::lock::ImageLock;
use crate::block::raw::EngineKind;
use crate::nbd::NbdAddress;
use crate::nbd::allow::AllowList;
use crate::nbd::client::NbdUri;

/// Disk path that selects the null device (no storage, for measuring the vhost-user path).
pub const NULL_DISK: &str = "null";

/// The vhost-user socket when neither `socket`, `socket_fd` nor socket activation says.
pub const DEFAULT_SOCKET: &str = "/tmp/colo-blk.sock";

/// The size a missing image is created with when the command line names no `--disk`.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// The replication role (`--replication`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// No replication: serve the disk.
    #[default]
    None,
    /// Mirror every write to a secondary over NBD.
    Primary,
    /// Serve the primary's writes over NBD into the hidden buffer, the VM's into the active one.
    Secondary,
}

/// The image format the operator asserts (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// Serve the bytes as they are, whatever header they start with.
    Raw,
    /// A qcow2 image (with its backing chain), served through `block::qcow2`.
    Qcow2,
}

/// Everything `colo-blk serve` needs, one field per command-line option (the command line
/// converts its arguments into this; the library knows nothing of clap).
#[derive(Debug, Clone)]
pub struct Config {
    /// The vhost-user socket to bind (default [`DEFAULT_SOCKET`] when none is inherited).
    pub socket: Option<PathBuf>,
    /// An inherited listening socket to serve on instead (`--socket-fd`).
    pub socket_fd: Option<i32>,
    /// Whether a socket passed by the service manager (`LISTEN_FDS`) is used when `socket_fd`
    /// is not given (the command line: yes).
    pub socket_activation: bool,
    /// The pid file (locked while the daemon runs, removed at exit).
    pub pidfile: Option<PathBuf>,
    /// The image format the operator asserts; `None` probes.
    pub format: Option<ImageFormat>,
    /// The image or block device; [`NULL_DISK`] serves a null device.
    pub disk: PathBuf,
    /// The size asked for (`--size`): a missing image is created with it, an existing one
    /// must have it.
    pub size: Option<u64>,
    /// The size a missing image (or the null device) gets when `size` is not given; an
    /// existing image is served as it is. `None`: a missing image is an error.
    pub default_size: Option<u64>,
    /// Export read-only.
    pub readonly: bool,
    /// Request queues offered.
    pub num_queues: u16,
    /// Maximum virtqueue size.
    pub queue_size: u16,
    /// Logical block size (512 or 4096).
    pub logical_block_size: u32,
    /// O_DIRECT.
    pub direct: bool,
    /// Serial number (GET_ID, at most 20 bytes).
    pub serial: String,
    /// The control socket.
    pub qmp: Option<PathBuf>,
    /// The replication role.
    pub replication: Role,
    /// Busy-poll window of a queue worker after its last work.
    pub poll: Duration,
    /// The I/O engine.
    pub io_engine: EngineKind,
    /// Secondary: the active buffer.
    pub active: Option<PathBuf>,
    /// Secondary: the hidden buffer.
    pub hidden: Option<PathBuf>,
    /// Secondary: where the NBD server for the primary listens.
    pub nbd_listen: Option<NbdAddress>,
    /// Secondary: the export name the primary asks for.
    pub nbd_export: String,
    /// Primary: the secondary's NBD export.
    pub secondary: Option<NbdUri>,
    /// Primary: seconds a forwarded write may stay unanswered before the link breaks.
    pub secondary_timeout: f64,
    /// The COLO VM-stop hook's address.
    pub colo_hook: Option<NbdAddress>,
    /// Wrap the disk in the fault-injection layer.
    pub fault_injection: bool,
    /// Testing: a pause after each 1 MiB the secondary's failover commit merges.
    pub commit_delay: Option<std::time::Duration>,
    /// TCP peers allowed on the NBD server and the hook.
    pub nbd_allow: Option<AllowList>,
    /// Secondary: TLS credentials directory of the NBD server.
    pub nbd_tls_creds: Option<PathBuf>,
    /// Primary: TLS credentials directory for the link to the secondary.
    pub secondary_tls_creds: Option<PathBuf>,
    /// Mode and owner of the vhost-user, NBD and hook UNIX sockets.
    pub socket_perms: SocketPerms,
    /// Mode and owner of the control socket.
    pub qmp_perms: SocketPerms,
    /// Secondary: most NBD clients connected at once.
    pub nbd_max_clients: usize,
}

impl Default for Config {
    /// The command line's defaults, with no socket path chosen (the command line falls back
    /// to [`DEFAULT_SOCKET`]) and no socket activation.
    fn default() -> Self {
        Config {
            socket: None,
            socket_fd: None,
            socket_activation: false,
            pidfile: None,
            format: None,
            disk: PathBuf::from("colo-blk.img"),
            size: None,
            default_size: None,
            readonly: false,
            num_queues: 16,
            queue_size: 1024,
            logical_block_size: 512,
            direct: false,
            serial: "colo-blk".into(),
            qmp: None,
            replication: Role::None,
            poll: Duration::from_micros(32),
            io_engine: EngineKind::Uring,
            active: None,
            hidden: None,
            nbd_listen: None,
            nbd_export: String::new(),
            secondary: None,
            secondary_timeout: 5.0,
            colo_hook: None,
            fault_injection: false,
            commit_delay: None,
            nbd_allow: None,
            nbd_tls_creds: None,
            secondary_tls_creds: None,
            socket_perms: SocketPerms::default(),
            qmp_perms: SocketPerms::default(),
            nbd_max_clients: 8,
        }
    }
}

impl Config {
    /// Whether the disk is the null device.
    pub fn is_null(&self) -> bool {
        self.disk.as_os_str() == NULL_DISK
    }

    /// The size a missing image is created with, if it may be created.
    pub fn create_size(&self) -> Option<u64> {
        self.size.or(self.default_size)
    }

    /// Option combinations that make no sense, found without touching anything.
    pub fn check(&self) -> Result<(), String> {
        let a = self;
        let secondary_opts = [
            ("--active", a.active.is_some()),
            ("--hidden", a.hidden.is_some()),
            ("--nbd-listen", a.nbd_listen.is_some()),
            ("--nbd-export", !a.nbd_export.is_empty()),
        ];
        if !(a.secondary_timeout > 0.0 && a.secondary_timeout <= 3600.0) {
            return Err("--secondary-timeout: must be in (0, 3600] seconds".into());
        }
        match a.replication {
            Role::Primary => {
                if let Some((name, _)) = secondary_opts.iter().find(|(_, given)| *given) {
                    return Err(format!("{name}: only valid with --replication secondary"));
                }
                if a.is_null() {
                    return Err("--replication primary needs a disk (not null)".into());
                }
            }
            Role::Secondary => {
                for (name, given) in &secondary_opts[..3] {
                    if !given {
                        return Err(format!("{name}: required with --replication secondary"));
                    }
                }
                if a.is_null() || a.readonly {
                    return Err("--replication secondary needs a writable disk (not null, not --readonly)".into());
                }
                if a.secondary.is_some() {
                    return Err("--secondary: only valid with --replication primary (a failed-over secondary \
                                gets its new secondary from replication-start)"
                        .into());
                }
            }
            Role::None => {
                if a.colo_hook.is_some() {
                    return Err("--colo-hook: only valid with --replication primary or secondary".into());
                }
                if let Some((name, _)) = secondary_opts.iter().find(|(_, given)| *given) {
                    return Err(format!("{name}: only valid with --replication secondary"));
                }
                if a.secondary.is_some() {
                    return Err("--secondary: only valid with --replication primary".into());
                }
            }
        }
        if a.nbd_allow.is_some()
            && !matches!(&a.nbd_listen, Some(NbdAddress::Tcp(_)))
            && !matches!(&a.colo_hook, Some(NbdAddress::Tcp(_)))
        {
            return Err("--nbd-allow: only applies to TCP listeners (--nbd-listen / --colo-hook HOST:PORT)".into());
        }
        if matches!(&a.colo_hook, Some(NbdAddress::Tcp(_))) && a.nbd_allow.is_none() {
            return Err("--colo-hook: a TCP hook needs --nbd-allow (any peer's FLUSH would checkpoint the \
                        secondary); prefer unix:PATH"
                .into());
        }
        if a.nbd_tls_creds.is_some() && !matches!(&a.nbd_listen, Some(NbdAddress::Tcp(_))) {
            return Err("--nbd-tls-creds: needs a TCP --nbd-listen HOST:PORT".into());
        }
        if a.secondary_tls_creds.is_some() && a.replication == Role::None {
            return Err("--secondary-tls-creds: only valid with --replication primary or secondary".into());
        }
        if a.queue_size == 0 || !a.queue_size.is_power_of_two() {
            return Err(format!("--queue-size: {} is not a power of two", a.queue_size));
        }
        if a.serial.len() > 20 {
            return Err("--serial: at most 20 bytes".into());
        }
        if a.format == Some(ImageFormat::Qcow2) {
            if a.is_null() {
                return Err("--format qcow2: the null device has no format".into());
            }
            if a.size.is_some() {
                return Err("--size: qcow2 images are not created by colo-blk; create one with \
                            `qemu-img create -f qcow2 IMAGE SIZE` and leave out --size"
                    .into());
            }
        }
        if a.socket_fd.is_some() && a.socket.is_some() {
            return Err("--socket-fd: give either --socket or --socket-fd".into());
        }
        if let Some(s) = a.create_size()
            && (s == 0 || s % u64::from(a.logical_block_size) != 0)
        {
            return Err(format!("--size: {s} is not a positive multiple of {}", a.logical_block_size));
        }
        Ok(())
    }

    /// Checks every path before anything is created: sockets free and distinct, the three
    /// disk files distinct, an existing image raw and of the requested size, not locked by
    /// another process. `socket` is the vhost-user socket's path (`inherited`: not ours to
    /// bind).
    pub fn check_paths(&self, socket: &Path, inherited: bool) -> Result<(), String> {
        let a = self;
        let mut sockets: Vec<(&str, PathBuf)> = Vec::new();
        if !inherited {
            sockets.push(("--socket", socket.to_path_buf()));
        }
        if let Some(q) = &a.qmp {
            sockets.push(("--qmp", q.clone()));
        }
        if let Some(NbdAddress::Unix(p)) = &a.nbd_listen {
            sockets.push(("--nbd-listen", p.clone()));
        }
        if let Some(NbdAddress::Unix(p)) = &a.colo_hook {
            sockets.push(("--colo-hook", p.clone()));
        }
        let mut files: Vec<(&str, &Path)> = Vec::new();
        if !a.is_null() {
            files.push(("--disk", &a.disk));
        }
        if let Some(p) = &a.active {
            files.push(("--active", p));
        }
        if let Some(p) = &a.hidden {
            files.push(("--hidden", p));
        }
        if let Some(p) = &a.pidfile {
            files.push(("--pidfile", p));
        }
        // A qcow2 disk's backing chain counts too: a buffer or pid file that is a backing
        // file would be emptied or overwritten under the image.
        let qcow2_header =
            || preflight::examine_image(&a.disk).ok().flatten().is_some_and(|f| f.format == Some("qcow2"));
        let chain = if a.format == Some(ImageFormat::Qcow2) && !a.is_null() && qcow2_header() {
            crate::block::qcow2::chain_of(&a.disk).map_err(|e| format!("--disk: {e}"))?
        } else {
            Vec::new()
        };
        let all: Vec<(&str, &Path)> = chain
            .iter()
            .map(|p| ("the backing file of --disk", p.as_path()))
            .chain(files.iter().copied())
            .chain(sockets.iter().map(|(o, p)| (*o, p.as_path())))
            .collect();
        preflight::distinct_files(&all)?;
        for (opt, path) in &sockets {
            check_free(path).map_err(|e| format!("{opt}: {}", crate::logging::error_chain(&e)))?;
        }
        for (opt, path) in &files {
            if *opt == "--pidfile" {
                continue;
            }
            let facts =
                preflight::examine_image(path).map_err(|e| format!("{opt}: cannot read {}: {e}", path.display()))?;
            let qcow2_asked = *opt == "--disk" && a.format == Some(ImageFormat::Qcow2);
            let Some(facts) = facts else {
                if qcow2_asked {
                    return Err(format!(
                        "--disk: {} does not exist; create a qcow2 image with `qemu-img create -f qcow2 {} SIZE`",
                        path.display(),
                        path.display()
                    ));
                }
                continue;
            };
            if qcow2_asked {
                if facts.format != Some("qcow2") {
                    return Err(format!(
                        "--format qcow2: {} is not a qcow2 image (its header says {}); nothing was changed",
                        path.display(),
                        facts.format.unwrap_or("raw")
                    ));
                }
            } else if let Some(format) = facts.format {
                let raw_asked = *opt == "--disk" && a.format == Some(ImageFormat::Raw);
                if !raw_asked {
                    return Err(format!(
                        "{opt}: {} is a {format} image, not a raw one; {}",
                        path.display(),
                        match (*opt, format) {
                            ("--disk", "qcow2") =>
                                "serve it with --format qcow2 (or --format raw to serve its bytes as they are)",
                            ("--disk", _) =>
                                "colo-blk serves raw and qcow2 images (--format raw serves its bytes as they are)",
                            _ => "buffers must be raw files",
                        }
                    ));
                }
            }
            if *opt == "--disk"
                && let Some(wanted) = a.size
                && wanted != facts.size
            {
                return Err(format!(
                    "--size: {} already exists with {} bytes, not the {wanted} bytes asked for; \
                     leave out --size to serve it as it is",
                    path.display(),
                    facts.size
                ));
            }
            // Only a look: the real locks are taken when the image is opened.
            let writable = !(a.readonly && *opt == "--disk");
            ImageLock::acquire(path, writable).map_err(|e| format!("{opt}: {}", crate::logging::error_chain(&e)))?;
        }
        Ok(())
    }
}
