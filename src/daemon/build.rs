//! Builds the device graph of a [`Config`]: checks everything, then binds the sockets, opens
//! the disk and its locks, stacks the replication layers and starts the NBD servers. A start
//! that fails half way removes what it created ([`Undo`]), so nothing is left behind.
//!
//! The order is part of the contract:
//! 1. every check ([`Config::check`], TLS credentials, the inherited socket,
//!    [`Config::check_paths`]) before anything is created;
//! 2. the pid file, then every listening socket (vhost-user, control, COLO hook, NBD server),
//!    before any thread is started: UNIX sockets are bound under a restrictive umask (see
//!    `sockets::bind_private`), which must not apply to files another thread creates;
//! 3. the disk and its image lock, the secondary's buffers (`Secondary::open` starts the
//!    buffer pool and reclaim threads), the mirror, the fault layer, the [`Daemon`];
//! 4. last, the NBD servers' accept threads on the sockets bound in step 2.

use std::path::PathBuf;
use std::sync::Arc;

use super::config::{Config, DEFAULT_SIZE, DEFAULT_SOCKET, ImageFormat, Role};
use super::sockets::{OwnedSocket, SocketPerms, bind_owned};
use super::systemd::{PidFile, activated_fd, inherited_listener};
use super::{BoundSockets, Daemon, DaemonError, ServeConfig};
use crate::block::fault::{FaultPlan, FaultyDevice};
use crate::block::image::ImageData;
use crate::block::lock::{ImageLock, LockError};
use crate::block::qcow2::{Qcow2Disk, Qcow2Options};
use crate::block::raw::{NullDisk, RawDisk, RawOptions};
use crate::block::{BlockDevice, BlockError};
pub use crate::logging::error_chain;
use crate::nbd::tls::{self, TlsError};
use crate::nbd::transport::{NbdAddress, NbdListener};
use crate::nbd::{NbdServer, NbdServerConfig};
use crate::replication::continuous::SecondaryThenPrimary;
use crate::replication::primary::{ColoHook, HOOK_EXPORT, Mirror, MirrorConfig, MirrorControl, MirrorDevice};
use crate::replication::secondary::{Secondary, SecondaryControl, SecondaryDevice, SecondaryExport, SecondaryFiles};
use crate::replication::{NoReplication, ReplicationControl, ReplicationError};
use crate::vhost::DeviceConfig;

/// Why a daemon could not be built. Every variant is a configuration problem (the command
/// line exits with status 2), and nothing the build created is left behind. The message
/// names the option to fix and includes the whole cause.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// An option, a combination of options or a path is wrong (found before anything was
    /// created).
    #[error("{0}")]
    Invalid(String),
    /// TLS credentials could not be loaded.
    #[error("{option}: {cause}")]
    Tls {
        /// `--nbd-tls-creds` or `--secondary-tls-creds`.
        option: &'static str,
        /// What is wrong with them.
        cause: TlsError,
    },
    /// The inherited vhost-user socket is unusable.
    #[error("--socket-fd: {0}")]
    InheritedSocket(std::io::Error),
    /// The pid file could not be created or locked.
    #[error("--pidfile: {}: {cause}", .path.display())]
    PidFile {
        /// The pid file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// A UNIX socket could not be bound.
    #[error("{option}: {}", error_chain(.cause))]
    Bind {
        /// `--socket` or `--qmp`.
        option: &'static str,
        /// The cause.
        cause: DaemonError,
    },
    /// A socket's mode or owner could not be set.
    #[error("{option}: {}: {cause}", .path.display())]
    Permissions {
        /// `--socket-mode/--socket-owner` or `--qmp-mode/--qmp-owner`.
        option: &'static str,
        /// The socket.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// An NBD listener (server or hook) could not be bound or started.
    #[error("{option}: cannot listen on {addr}: {cause}")]
    Listen {
        /// `--nbd-listen` or `--colo-hook`.
        option: &'static str,
        /// The address.
        addr: NbdAddress,
        /// The cause.
        cause: std::io::Error,
    },
    /// An NBD listener's mode or owner could not be set.
    #[error("{option}: {cause}")]
    ListenPermissions {
        /// `--nbd-listen` or `--colo-hook`.
        option: &'static str,
        /// The cause.
        cause: std::io::Error,
    },
    /// The disk could not be opened.
    #[error("--disk: {}", error_chain(.0))]
    Disk(BlockError),
    /// The disk could not be locked.
    #[error("--disk: {}", error_chain(.0))]
    DiskLock(LockError),
    /// The page-cache descriptor of the disk (for the replication layers) could not be opened.
    #[error("--disk: {0}")]
    DiskFile(std::io::Error),
    /// The secondary's buffers could not be opened (a refusal names its option itself).
    #[error("{}", buffers_message(.0))]
    Buffers(BlockError),
    /// The secondary's buffers do not have the disk's length.
    #[error("--active/--hidden: {0}")]
    BufferLengths(ReplicationError),
    /// The disk's data-generation file cannot be read.
    #[error("--disk: {0}")]
    Generations(crate::replication::generation::GenerationError),
    /// The primary's activity log cannot be opened.
    #[error("--disk: {0}")]
    ActivityLog(crate::replication::primary::ActivityError),
}

fn buffers_message(e: &BlockError) -> String {
    match e {
        BlockError::Refused(_) => e.to_string(),
        _ => format!("--active/--hidden: {}", error_chain(e)),
    }
}

/// A built daemon: the device graph, its bound sockets, its pid file and the image locks,
/// ready to [`run`](Built::run). Dropped without running, it releases the disk's image lock but
/// leaves its socket files and pid file (the daemon's shutdown removes those), and the threads
/// the build started (the secondary's buffer pool and reclaim thread, the NBD accept threads)
/// keep running.
pub struct Built {
    daemon: Arc<Daemon>,
    sockets: BoundSockets,
    pidfile: Option<PidFile>,
    locks: Vec<ImageLock>,
}

impl Built {
    /// The daemon (its control-socket handler, its event bus).
    pub fn daemon(&self) -> &Arc<Daemon> {
        &self.daemon
    }

    /// The socket files this daemon created.
    pub fn socket_files(&self) -> impl Iterator<Item = &std::path::Path> {
        self.sockets.owned.iter().map(OwnedSocket::path)
    }

    /// Serves frontends until shutdown, which exits the process; the image locks are held
    /// until then.
    pub fn run(self) -> Result<(), DaemonError> {
        let Built { daemon, sockets, pidfile, locks } = self;
        let ended = daemon.run(sockets, pidfile);
        drop(locks);
        ended
    }
}

/// What a start that fails half way must undo, so that a refused start leaves nothing
/// behind: images and buffers it created, socket files it bound, its pid file.
#[derive(Default)]
struct Undo {
    files: Vec<PathBuf>,
    sockets: Vec<OwnedSocket>,
    pidfile: Option<PidFile>,
}

impl Undo {
    /// Undoes everything and returns `e`.
    fn fail<T>(self, e: BuildError) -> Result<T, BuildError> {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        self.sockets.iter().for_each(OwnedSocket::remove);
        if let Some(p) = &self.pidfile {
            p.remove();
        }
        Err(e)
    }
}

/// Gives a UNIX listening socket the configured mode and owner (TCP: nothing to do).
fn apply_perms(addr: &NbdAddress, perms: &SocketPerms) -> std::io::Result<()> {
    match addr {
        NbdAddress::Unix(p) => perms.apply(p),
        NbdAddress::Tcp(_) => Ok(()),
    }
}

fn is_loopback(host_port: &str) -> bool {
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Binds an NBD listener (server or hook) before any thread exists: a UNIX one privately
/// (mode 0600 from its creation, recorded for removal), then given `perms`.
fn bind_nbd(
    undo: &mut Undo,
    option: &'static str,
    addr: &NbdAddress,
    perms: &SocketPerms,
) -> Result<NbdListener, BuildError> {
    let listen_err = |cause| BuildError::Listen { option, addr: addr.clone(), cause };
    let listener = match addr {
        NbdAddress::Tcp(_) => NbdListener::bind(addr).map_err(listen_err)?,
        NbdAddress::Unix(p) => {
            let (l, owned) = bind_owned(p).map_err(|e| match e {
                DaemonError::Bind { source, .. } => listen_err(source),
                other => listen_err(std::io::Error::new(std::io::ErrorKind::AddrInUse, other.to_string())),
            })?;
            undo.sockets.push(owned);
            NbdListener::from(l)
        }
    };
    apply_perms(addr, perms).map_err(|cause| BuildError::ListenPermissions { option, cause })?;
    Ok(listener)
}

/// Checks `config`, then builds the daemon it describes (see the module header for the
/// order). On failure nothing it created is left behind.
pub fn build(config: Config) -> Result<Built, BuildError> {
    let a = &config;
    a.check().map_err(BuildError::Invalid)?;
    let create_size = a.create_size();
    let secondary_tls = match &a.secondary_tls_creds {
        None => None,
        Some(dir) => {
            Some(tls::client_config(dir).map_err(|cause| BuildError::Tls { option: "--secondary-tls-creds", cause })?)
        }
    };
    let nbd_tls = match &a.nbd_tls_creds {
        None => None,
        Some(dir) => {
            Some(tls::server_config(dir).map_err(|cause| BuildError::Tls { option: "--nbd-tls-creds", cause })?)
        }
    };
    // Where the vhost-user socket comes from: inherited (--socket-fd, socket activation) or
    // bound here.
    let inherited_fd = a.socket_fd.or_else(|| if a.socket_activation { activated_fd() } else { None });
    let inherited = match inherited_fd {
        None => None,
        Some(fd) => Some(inherited_listener(fd).map_err(BuildError::InheritedSocket)?),
    };
    let socket_path = match (&inherited, &a.socket) {
        (Some((_, bound)), Some(given)) if bound.as_deref() != Some(given.as_path()) => {
            return Err(BuildError::Invalid(format!(
                "--socket: {} is not the inherited socket (fd {})",
                given.display(),
                inherited_fd.unwrap_or_default()
            )));
        }
        (Some((_, bound)), _) => {
            bound.clone().unwrap_or_else(|| PathBuf::from(format!("fd:{}", inherited_fd.unwrap_or_default())))
        }
        (None, given) => given.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
    };
    a.check_paths(&socket_path, inherited.is_some()).map_err(BuildError::Invalid)?;
    if let (Some(NbdAddress::Tcp(addr)), Role::Secondary) = (&a.nbd_listen, a.replication)
        && a.nbd_tls_creds.is_none()
        && a.nbd_allow.is_none()
        && !is_loopback(addr)
    {
        log::warn!(
            "the NBD server listens on {addr} with neither --nbd-tls-creds nor --nbd-allow: any host that \
             reaches this port can write into the secondary disk during replication"
        );
    }

    // From here on things get created; `undo` removes them again if the start fails.
    let mut undo = Undo::default();
    if let Some(path) = &a.pidfile {
        match PidFile::create(path) {
            Ok(p) => undo.pidfile = Some(p),
            Err(cause) => return Err(BuildError::PidFile { path: path.clone(), cause }),
        }
    }
    // Every socket is bound before any thread exists (the restrictive umask used for mode
    // 0600 must not leak into files other threads create) and before the disk is touched.
    let vhost_listener = match inherited {
        Some((l, _)) => l,
        None => match bind_owned(&socket_path) {
            Ok((l, owned)) => {
                undo.sockets.push(owned);
                if let Err(cause) = a.socket_perms.apply(&socket_path) {
                    return undo.fail(BuildError::Permissions {
                        option: "--socket-mode/--socket-owner",
                        path: socket_path,
                        cause,
                    });
                }
                l
            }
            Err(cause) => return undo.fail(BuildError::Bind { option: "--socket", cause }),
        },
    };
    let qmp_listener = match &a.qmp {
        None => None,
        Some(path) => match bind_owned(path) {
            Ok((l, owned)) => {
                undo.sockets.push(owned);
                if let Err(cause) = a.qmp_perms.apply(path) {
                    return undo.fail(BuildError::Permissions {
                        option: "--qmp-mode/--qmp-owner",
                        path: path.clone(),
                        cause,
                    });
                }
                Some(l)
            }
            Err(cause) => return undo.fail(BuildError::Bind { option: "--qmp", cause }),
        },
    };
    // The hook is served only by a role with a mirror; the NBD server only by a secondary
    // (`Config::check` refuses the other combinations).
    let hook_listener = match &a.colo_hook {
        Some(addr) if a.replication != Role::None && !a.is_null() => {
            match bind_nbd(&mut undo, "--colo-hook", addr, &a.socket_perms) {
                Ok(l) => Some((l, addr)),
                Err(e) => return undo.fail(e),
            }
        }
        _ => None,
    };
    let nbd_listener = match &a.nbd_listen {
        Some(addr) if a.replication == Role::Secondary => {
            match bind_nbd(&mut undo, "--nbd-listen", addr, &a.socket_perms) {
                Ok(l) => Some((l, addr)),
                Err(e) => return undo.fail(e),
            }
        }
        _ => None,
    };

    let mirror_cfg = MirrorConfig {
        tls: secondary_tls,
        secondary: a.secondary.clone(),
        timeout: std::time::Duration::from_secs_f64(a.secondary_timeout),
    };
    let mut locks: Vec<ImageLock> = Vec::new();
    let mut secondary: Option<Arc<Secondary>> = None;
    let mut mirror: Option<Arc<Mirror>> = None;
    let device: Arc<dyn BlockDevice> = if a.is_null() {
        Arc::new(NullDisk::new(create_size.unwrap_or(DEFAULT_SIZE), a.readonly))
    } else {
        if !a.disk.exists() {
            undo.files.push(a.disk.clone());
        }
        // The disk as a block device, and (for the replication roles) its bytes by offset.
        let (disk, data): (Arc<dyn BlockDevice>, Option<Arc<dyn ImageData>>) = if a.format == Some(ImageFormat::Qcow2) {
            // The locks are taken before the first I/O: the top image for writing, its
            // backing chain for reading.
            match ImageLock::acquire(&a.disk, !a.readonly) {
                Ok(l) => locks.push(l),
                Err(e) => return undo.fail(BuildError::DiskLock(e)),
            }
            let disk = match Qcow2Disk::open(&Qcow2Options {
                path: a.disk.clone(),
                read_only: a.readonly,
                direct: a.direct,
                block_size: a.logical_block_size,
                engine: a.io_engine,
            }) {
                Ok(d) => d,
                Err(e) => return undo.fail(BuildError::Disk(e)),
            };
            for dep in disk.dependencies() {
                match ImageLock::acquire(&dep, false) {
                    Ok(l) => locks.push(l),
                    Err(e) => return undo.fail(BuildError::DiskLock(e)),
                }
            }
            let data = disk.data();
            (Arc::new(disk), Some(data))
        } else {
            let opts = RawOptions {
                path: a.disk.clone(),
                create_size,
                read_only: a.readonly,
                direct: a.direct,
                block_size: a.logical_block_size,
                engine: a.io_engine,
            };
            let disk = match RawDisk::open(&opts) {
                Ok(d) => d,
                Err(e) => return undo.fail(BuildError::Disk(e)),
            };
            match ImageLock::acquire(&a.disk, !a.readonly) {
                Ok(l) => locks.push(l),
                Err(e) => return undo.fail(BuildError::DiskLock(e)),
            }
            let data: Option<Arc<dyn ImageData>> = if a.replication == Role::None {
                None
            } else {
                match disk.data() {
                    Ok(f) => Some(f),
                    Err(e) => return undo.fail(BuildError::DiskFile(e)),
                }
            };
            (Arc::new(disk), data)
        };
        let size = disk.size();
        match (a.replication, data) {
            (Role::Secondary, Some(data)) => {
                let files = SecondaryFiles {
                    active: a.active.clone().unwrap_or_default(),
                    hidden: a.hidden.clone().unwrap_or_default(),
                    direct: a.direct,
                };
                for path in [&files.active, &files.hidden] {
                    if !path.exists() {
                        undo.files.push(path.clone());
                    }
                }
                // The first threads: the buffer pool and the reclaim thread.
                let sec = match Secondary::open(disk, data.clone(), a.disk.clone(), files) {
                    Ok(s) => s,
                    Err(e) => return undo.fail(BuildError::Buffers(e)),
                };
                // Secondary::open locked the buffers (re-locked whenever a checkpoint replaces them).
                if let Err(e) = sec.check_lengths() {
                    return undo.fail(BuildError::BufferLengths(e));
                }
                secondary = Some(sec.clone());
                // The mirror stays idle unless this secondary fails over and is told to
                // protect itself again (continuous replication).
                let m = Mirror::new(data, size, mirror_cfg);
                m.set_generations(sec.generations());
                mirror = Some(m.clone());
                Arc::new(MirrorDevice { inner: Arc::new(SecondaryDevice(sec)), mirror: m })
            }
            (Role::Primary, Some(data)) => {
                let gens = match crate::replication::generation::Generations::for_disk(&a.disk) {
                    Ok(g) => g,
                    Err(e) => return undo.fail(BuildError::Generations(e)),
                };
                let (al, recovered) = match crate::replication::primary::ActivityLog::open(&a.disk, size) {
                    Ok(x) => x,
                    Err(e) => return undo.fail(BuildError::ActivityLog(e)),
                };
                let m = Mirror::new(data, size, mirror_cfg);
                m.set_generations(Arc::new(gens));
                m.set_activity_log(al, recovered);
                mirror = Some(m.clone());
                Arc::new(MirrorDevice { inner: disk, mirror: m })
            }
            _ => disk,
        }
    };
    let replication: Arc<dyn ReplicationControl> = match (&secondary, &mirror) {
        (Some(sec), Some(m)) => Arc::new(SecondaryThenPrimary {
            secondary: SecondaryControl(sec.clone()),
            primary: MirrorControl(m.clone()),
            mirror: m.clone(),
            state: sec.clone(),
        }),
        (None, Some(m)) => Arc::new(MirrorControl(m.clone())),
        _ => Arc::new(NoReplication),
    };
    let faults = a.fault_injection.then(|| Arc::new(FaultPlan::default()));
    if let (Some(plan), Some(sec)) = (&faults, &secondary) {
        sec.set_fault_plan(plan.clone());
    }
    let device: Arc<dyn BlockDevice> = match &faults {
        Some(plan) => Arc::new(FaultyDevice { inner: device, plan: plan.clone() }),
        None => device,
    };
    let cfg = ServeConfig {
        socket: socket_path,
        qmp: a.qmp.clone(),
        device: DeviceConfig {
            capacity_sectors: device.size() / 512,
            block_size: a.logical_block_size,
            read_only: a.readonly,
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            serial: a.serial.clone(),
        },
        direct: a.direct,
        poll: a.poll,
        faults,
    };
    let daemon = Daemon::new(cfg, device, replication);
    if let Some(m) = &mirror {
        let events = daemon.events();
        m.set_events(Arc::new(move |name: &str, data| events.emit(name, data)));
    }
    if let (Some(m), Some((listener, addr))) = (&mirror, hook_listener) {
        let cfg = NbdServerConfig {
            export_name: HOOK_EXPORT.into(),
            max_clients: 4,
            threads_per_client: 1,
            allow: a.nbd_allow.clone().unwrap_or_default(),
            tls: None,
        };
        if let Err(cause) = NbdServer::serve(listener, cfg, Arc::new(ColoHook(m.clone()))) {
            return undo.fail(BuildError::Listen { option: "--colo-hook", addr: addr.clone(), cause });
        }
        log::info!("COLO VM-stop hook listening on {} (export '{HOOK_EXPORT}')", addr)
    }
    if let (Some(sec), Some((listener, addr))) = (&secondary, nbd_listener) {
        let events = daemon.events();
        sec.set_events(Arc::new(move |name: &str, data| events.emit(name, data)));
        let cfg = NbdServerConfig {
            export_name: a.nbd_export.clone(),
            max_clients: a.nbd_max_clients,
            threads_per_client: 4,
            allow: a.nbd_allow.clone().unwrap_or_default(),
            tls: nbd_tls.clone(),
        };
        match NbdServer::serve(listener, cfg, Arc::new(SecondaryExport(sec.clone()))) {
            Ok(server) => sec.set_nbd_server(server),
            Err(cause) => {
                return undo.fail(BuildError::Listen { option: "--nbd-listen", addr: addr.clone(), cause });
            }
        }
        log::info!("NBD server for the primary listening on {} (export '{}')", addr, a.nbd_export);
    }
    if let Some(sec) = &secondary {
        sec.set_commit_delay(a.commit_delay);
        // A commit that colo-blk was killed in the middle of goes on (its events now reach
        // QMP clients).
        sec.resume_commit();
    }
    let sockets = BoundSockets { vhost: vhost_listener, qmp: qmp_listener, owned: std::mem::take(&mut undo.sockets) };
    Ok(Built { daemon, sockets, pidfile: undo.pidfile.take(), locks })
}
