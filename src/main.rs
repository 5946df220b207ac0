//! The `colo-blk` command line: parse, validate, hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

mod bench;
mod ctl;
mod logging;

use colo_blk::block::fault::{FaultPlan, FaultyDevice};
use colo_blk::block::lock::ImageLock;
use colo_blk::block::raw::{EngineKind, NullDisk, RawDisk, RawOptions};
use colo_blk::block::{BlockDevice, BlockError};
use colo_blk::daemon::{BoundSockets, Daemon, OwnedSocket, PidFile, ServeConfig, SocketPerms, bind_owned, preflight};
use colo_blk::nbd::allow::AllowList;
use colo_blk::nbd::client::NbdUri;
use colo_blk::nbd::tls;
use colo_blk::nbd::{NbdAddress, NbdServer, NbdServerConfig};
use colo_blk::replication::continuous::SecondaryThenPrimary;
use colo_blk::replication::primary::{ColoHook, HOOK_EXPORT, Mirror, MirrorConfig, MirrorControl, MirrorDevice};
use colo_blk::replication::secondary::{Secondary, SecondaryControl, SecondaryDevice, SecondaryExport, SecondaryFiles};
use colo_blk::replication::{NoReplication, ReplicationControl};
use colo_blk::size::parse_size;
use colo_blk::vhost::DeviceConfig;

/// Disk path that selects the null device (no storage, for measuring the vhost-user path).
const NULL_DISK: &str = "null";

#[derive(Parser)]
#[command(name = "colo-blk", version, about = "vhost-user-blk backend with COLO block replication")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a disk to a vhost-user-blk frontend (QEMU, cloud-hypervisor, libblkio).
    Serve(Box<ServeArgs>),
    /// Send one QMP command to a running colo-blk and print the answer.
    Ctl(ctl::CtlArgs),
    /// Measure a vhost-user-blk backend (any: colo-blk, qemu-storage-daemon) through libblkio.
    Bench(bench::BenchArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Replication {
    None,
    Primary,
    Secondary,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Engine {
    Uring,
    Sync,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Raw,
    Qcow2,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// The vhost-user socket when neither --socket, --socket-fd nor socket activation says.
const DEFAULT_SOCKET: &str = "/tmp/colo-blk.sock";

#[derive(clap::Args)]
#[command(disable_version_flag = true)]
struct ServeArgs {
    /// Print the version and exit.
    #[arg(long, short = 'V')]
    version: bool,
    /// vhost-user socket to listen on (created mode 0600; default /tmp/colo-blk.sock unless
    /// a listening socket is inherited through --socket-fd or systemd socket activation).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Serve on this inherited listening UNIX socket instead of binding --socket
    /// (qemu-storage-daemon's addr.type=fd).
    #[arg(long)]
    socket_fd: Option<i32>,
    /// Write the process id to this file (locked while colo-blk runs, removed at exit).
    #[arg(long)]
    pidfile: Option<PathBuf>,
    /// Log level (RUST_LOG, when set and valid, overrides it).
    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    log_level: LogLevel,
    /// Image format of --disk. Without it the image is probed: a raw image is served, an
    /// image with another format's header is refused.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Raw image file or block device; `null` serves a null device of --size bytes.
    #[arg(long, default_value = "colo-blk.img")]
    disk: PathBuf,
    /// Create a sparse image of this size if --disk is missing (K/M/G/T). Default 1G when
    /// --disk is not given.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Export the disk read-only.
    #[arg(long)]
    readonly: bool,
    /// Number of request queues offered (the frontend may use fewer).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=64))]
    num_queues: u16,
    /// Maximum virtqueue size.
    #[arg(long, default_value_t = 1024)]
    queue_size: u16,
    /// Logical block size in bytes.
    #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
    logical_block_size: u32,
    /// Open the disk with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    direct: bool,
    /// Serial number reported to the guest (GET_ID, at most 20 bytes).
    #[arg(long, default_value = "colo-blk")]
    serial: String,
    /// Control socket (QMP dialect).
    #[arg(long)]
    qmp: Option<PathBuf>,
    /// Replication mode.
    #[arg(long, value_enum, default_value_t = Replication::None)]
    replication: Replication,
    /// After handling work, a queue worker keeps polling its ring for up to this many
    /// microseconds before sleeping (saves kicks and wake-ups under load; the window adapts
    /// to the driver's pace; 0 disables polling).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    poll_us: u64,
    /// I/O engine (io_uring falls back to sync if the kernel refuses it).
    #[arg(long, value_enum, default_value_t = Engine::Uring)]
    io_engine: Engine,
    /// Secondary: the active buffer file (created sparse with the disk's size if missing).
    #[arg(long)]
    active: Option<PathBuf>,
    /// Secondary: the hidden buffer file (created sparse with the disk's size if missing).
    #[arg(long)]
    hidden: Option<PathBuf>,
    /// Secondary: where the NBD server for the primary listens (HOST:PORT or unix:PATH).
    #[arg(long)]
    nbd_listen: Option<NbdAddress>,
    /// Secondary: the NBD export name the primary asks for (default: the empty name).
    #[arg(long, default_value = "")]
    nbd_export: String,
    /// Primary: the secondary's NBD export (nbd://HOST:PORT/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH).
    #[arg(long)]
    secondary: Option<NbdUri>,
    /// Primary: a forwarded write unanswered for this many seconds breaks the link (the guest
    /// write completes, the range is resynced later).
    #[arg(long, default_value_t = 5.0)]
    secondary_timeout: f64,
    /// Primary (or a secondary that may become one): serve the COLO VM-stop hook, an NBD
    /// export named "hook" whose FLUSH sends a checkpoint barrier to the secondary
    /// (HOST:PORT or unix:PATH; see docs/colo.md).
    #[arg(long)]
    colo_hook: Option<NbdAddress>,
    /// Testing: wrap the disk in a fault-injection layer driven by the control socket's
    /// `x-inject-fault` / `x-clear-faults` (failing chosen requests with EIO, ENOSPC, ...).
    #[arg(long)]
    x_fault_injection: bool,
    /// TCP peers allowed to connect to the NBD server (--nbd-listen) and the COLO hook:
    /// `ADDR[/BITS],...` (default: any). UNIX sockets are protected by their mode instead.
    #[arg(long)]
    nbd_allow: Option<AllowList>,
    /// Secondary: require TLS with a client certificate on the NBD server. DIR holds
    /// ca-cert.pem, server-cert.pem and server-key.pem (QEMU's tls-creds-x509 layout).
    #[arg(long)]
    nbd_tls_creds: Option<PathBuf>,
    /// Primary: connect to the secondary with TLS. DIR holds ca-cert.pem, client-cert.pem and
    /// client-key.pem (QEMU's tls-creds-x509 layout).
    #[arg(long)]
    secondary_tls_creds: Option<PathBuf>,
    /// Mode of the UNIX sockets the VMM or the peer connects to (vhost-user, NBD, hook),
    /// octal. The control socket has its own (--qmp-mode).
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
    /// Owner of those sockets: `UID[:GID]` (numeric), e.g. to let a QEMU running as another
    /// user connect with --socket-mode 660.
    #[arg(long, value_parser = parse_owner)]
    socket_owner: Option<(u32, Option<u32>)>,
    /// Mode of the control socket (octal; default 0600: only colo-blk's user may send
    /// `quit` or a failover).
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    qmp_mode: u32,
    /// Owner of the control socket: `UID[:GID]` (numeric).
    #[arg(long, value_parser = parse_owner)]
    qmp_owner: Option<(u32, Option<u32>)>,
    /// Secondary: most NBD clients connected at once.
    #[arg(long, default_value_t = 8)]
    nbd_max_clients: usize,
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("must be 512 or 4096".into()),
    }
}

/// Gives a UNIX listening socket the configured mode and owner (TCP: nothing to do).
fn apply_perms(addr: &NbdAddress, perms: &SocketPerms) -> std::io::Result<()> {
    match addr {
        NbdAddress::Unix(p) => perms.apply(p),
        NbdAddress::Tcp(_) => Ok(()),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o777 && m & 0o600 == 0o600 => Ok(m),
        Ok(_) => Err("must be an octal mode up to 777 that the owner can read and write".into()),
        Err(_) => Err(format!("'{s}' is not an octal mode")),
    }
}

fn parse_owner(s: &str) -> Result<(u32, Option<u32>), String> {
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let num = |v: &str| v.parse::<u32>().map_err(|_| format!("'{v}' is not a numeric id"));
    Ok((num(u)?, g.map(num).transpose()?))
}

fn usage_error(msg: String) -> ExitCode {
    eprintln!("colo-blk: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve(args) => serve(*args),
        Cmd::Ctl(args) => {
            logging::init(log::LevelFilter::Warn);
            ctl::run(args)
        }
        Cmd::Bench(args) => {
            logging::init(log::LevelFilter::Info);
            match bench::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("colo-blk bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
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
    /// Undoes everything and returns the configuration-error exit (2) with `msg`.
    fn fail(self, msg: String) -> ExitCode {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        self.sockets.iter().for_each(OwnedSocket::remove);
        if let Some(p) = &self.pidfile {
            p.remove();
        }
        usage_error(msg)
    }
}

fn serve(a: ServeArgs) -> ExitCode {
    if a.version {
        println!("colo-blk {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    // Before any thread exists, so that only the daemon's signal thread sees SIGTERM/SIGINT.
    if let Err(e) = colo_blk::daemon::block_termination_signals() {
        eprintln!("colo-blk: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    logging::init(match a.log_level {
        LogLevel::Error => log::LevelFilter::Error,
        LogLevel::Warn => log::LevelFilter::Warn,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Debug => log::LevelFilter::Debug,
        LogLevel::Trace => log::LevelFilter::Trace,
    });
    if let Err(msg) = check_options(&a) {
        return usage_error(msg);
    }
    let disk_given = std::env::args_os().any(|s| s == "--disk" || s.to_string_lossy().starts_with("--disk="));
    let create_size = a.size.or(if disk_given { None } else { Some(1 << 30) });
    if let Some(s) = create_size
        && (s == 0 || s % u64::from(a.logical_block_size) != 0)
    {
        return usage_error(format!("--size: {s} is not a positive multiple of {}", a.logical_block_size));
    }
    let secondary_tls = match &a.secondary_tls_creds {
        None => None,
        Some(dir) => match tls::client_config(dir) {
            Ok(c) => Some(c),
            Err(e) => return usage_error(format!("--secondary-tls-creds: {e}")),
        },
    };
    let nbd_tls = match &a.nbd_tls_creds {
        None => None,
        Some(dir) => match tls::server_config(dir) {
            Ok(c) => Some(c),
            Err(e) => return usage_error(format!("--nbd-tls-creds: {e}")),
        },
    };
    // Where the vhost-user socket comes from: inherited (--socket-fd, socket activation) or
    // bound here.
    let inherited_fd = a.socket_fd.or_else(colo_blk::daemon::activated_fd);
    let inherited = match inherited_fd {
        None => None,
        Some(fd) => match colo_blk::daemon::inherited_listener(fd) {
            Ok(l) => Some(l),
            Err(e) => return usage_error(format!("--socket-fd: {e}")),
        },
    };
    let socket_path = match (&inherited, &a.socket) {
        (Some((_, bound)), Some(given)) if bound.as_deref() != Some(given.as_path()) => {
            return usage_error(format!(
                "--socket: {} is not the inherited socket (fd {})",
                given.display(),
                inherited_fd.unwrap_or_default()
            ));
        }
        (Some((_, bound)), _) => {
            bound.clone().unwrap_or_else(|| PathBuf::from(format!("fd:{}", inherited_fd.unwrap_or_default())))
        }
        (None, given) => given.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
    };
    if let Err(msg) = check_paths(&a, &socket_path, inherited.is_some(), create_size) {
        return usage_error(msg);
    }
    if let (Some(NbdAddress::Tcp(addr)), Replication::Secondary) = (&a.nbd_listen, a.replication)
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
            Err(e) => return usage_error(format!("--pidfile: {}: {e}", path.display())),
        }
    }
    // The sockets are bound before any thread exists (the restrictive umask used for mode
    // 0600 must not leak into files other threads create) and before the disk is touched.
    let socket_perms = SocketPerms { mode: a.socket_mode, owner: a.socket_owner };
    let qmp_perms = SocketPerms { mode: a.qmp_mode, owner: a.qmp_owner };
    let vhost_listener = match inherited {
        Some((l, _)) => l,
        None => match bind_owned(&socket_path) {
            Ok((l, owned)) => {
                undo.sockets.push(owned);
                if let Err(e) = socket_perms.apply(&socket_path) {
                    return undo.fail(format!("--socket-mode/--socket-owner: {}: {e}", socket_path.display()));
                }
                l
            }
            Err(e) => return undo.fail(format!("--socket: {}", error_chain(&e))),
        },
    };
    let qmp_listener = match &a.qmp {
        None => None,
        Some(path) => match bind_owned(path) {
            Ok((l, owned)) => {
                undo.sockets.push(owned);
                if let Err(e) = qmp_perms.apply(path) {
                    return undo.fail(format!("--qmp-mode/--qmp-owner: {}: {e}", path.display()));
                }
                Some(l)
            }
            Err(e) => return undo.fail(format!("--qmp: {}", error_chain(&e))),
        },
    };

    let mirror_cfg = MirrorConfig {
        tls: secondary_tls,
        secondary: a.secondary.clone(),
        timeout: std::time::Duration::from_secs_f64(a.secondary_timeout),
    };
    let mut locks: Vec<ImageLock> = Vec::new();
    let mut secondary: Option<Arc<Secondary>> = None;
    let mut mirror: Option<Arc<Mirror>> = None;
    let device: Arc<dyn BlockDevice> = if a.disk.as_os_str() == NULL_DISK {
        Arc::new(NullDisk::new(create_size.unwrap_or(1 << 30), a.readonly))
    } else {
        let opts = RawOptions {
            path: a.disk.clone(),
            create_size,
            read_only: a.readonly,
            direct: a.direct,
            block_size: a.logical_block_size,
            engine: match a.io_engine {
                Engine::Uring => EngineKind::Uring,
                Engine::Sync => EngineKind::Sync,
            },
        };
        if !a.disk.exists() {
            undo.files.push(a.disk.clone());
        }
        let disk = match RawDisk::open(&opts) {
            Ok(d) => d,
            Err(e) => return undo.fail(format!("--disk: {}", error_chain(&e))),
        };
        match ImageLock::acquire(&a.disk, !a.readonly) {
            Ok(l) => locks.push(l),
            Err(e) => return undo.fail(format!("--disk: {}", error_chain(&e))),
        }
        match a.replication {
            Replication::Secondary => {
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
                let file = match disk.buffered_file() {
                    Ok(f) => f,
                    Err(e) => return undo.fail(format!("--disk: {e}")),
                };
                let size = disk.size();
                let sec = match Secondary::open(disk, files.clone()) {
                    Ok(s) => s,
                    Err(e @ BlockError::Refused(_)) => return undo.fail(e.to_string()),
                    Err(e) => return undo.fail(format!("--active/--hidden: {}", error_chain(&e))),
                };
                // Secondary::open locked the buffers (re-locked whenever a checkpoint replaces them).
                if let Err(e) = sec.check_lengths() {
                    return undo.fail(format!("--active/--hidden: {e}"));
                }
                secondary = Some(sec.clone());
                // The mirror stays idle unless this secondary fails over and is told to
                // protect itself again (continuous replication).
                let m = Mirror::new(file, size, mirror_cfg);
                mirror = Some(m.clone());
                Arc::new(MirrorDevice { inner: Arc::new(SecondaryDevice(sec)), mirror: m })
            }
            Replication::Primary => {
                let file = match disk.buffered_file() {
                    Ok(f) => f,
                    Err(e) => return undo.fail(format!("--disk: {e}")),
                };
                let m = Mirror::new(file, disk.size(), mirror_cfg);
                mirror = Some(m.clone());
                Arc::new(MirrorDevice { inner: Arc::new(disk), mirror: m })
            }
            Replication::None => Arc::new(disk),
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
    let faults = a.x_fault_injection.then(|| Arc::new(FaultPlan::default()));
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
        poll: std::time::Duration::from_micros(a.poll_us),
        faults,
    };
    let daemon = Daemon::new(cfg, device, replication);
    if let Some(m) = &mirror {
        let events = daemon.events();
        m.set_events(Arc::new(move |name: &str, data| events.emit(name, data)));
    }
    if let (Some(m), Some(addr)) = (&mirror, &a.colo_hook) {
        let cfg = NbdServerConfig {
            export_name: HOOK_EXPORT.into(),
            max_clients: 4,
            threads_per_client: 1,
            allow: a.nbd_allow.clone().unwrap_or_default(),
            tls: None,
        };
        match NbdServer::start(addr, cfg, Arc::new(ColoHook(m.clone()))) {
            Ok(_) => {
                if let NbdAddress::Unix(p) = addr
                    && let Ok(owned) = OwnedSocket::new(p)
                {
                    undo.sockets.push(owned);
                }
                if let Err(e) = apply_perms(addr, &socket_perms) {
                    return undo.fail(format!("--colo-hook: {e}"));
                }
                log::info!("COLO VM-stop hook listening on {} (export '{HOOK_EXPORT}')", addr)
            }
            Err(e) => {
                return undo.fail(format!("--colo-hook: cannot listen on {}: {e}", addr));
            }
        }
    }
    if let (Some(sec), Some(addr)) = (&secondary, &a.nbd_listen) {
        let events = daemon.events();
        sec.set_events(Arc::new(move |name: &str, data| events.emit(name, data)));
        let cfg = NbdServerConfig {
            export_name: a.nbd_export.clone(),
            max_clients: a.nbd_max_clients,
            threads_per_client: 4,
            allow: a.nbd_allow.clone().unwrap_or_default(),
            tls: nbd_tls.clone(),
        };
        match NbdServer::start(addr, cfg, Arc::new(SecondaryExport(sec.clone()))) {
            Ok(server) => {
                if let NbdAddress::Unix(p) = addr
                    && let Ok(owned) = OwnedSocket::new(p)
                {
                    undo.sockets.push(owned);
                }
                if let Err(e) = apply_perms(addr, &socket_perms) {
                    return undo.fail(format!("--nbd-listen: {e}"));
                }
                sec.set_nbd_server(server)
            }
            Err(e) => {
                return undo.fail(format!("--nbd-listen: cannot listen on {}: {e}", addr));
            }
        }
        log::info!("NBD server for the primary listening on {} (export '{}')", addr, a.nbd_export);
    }
    let bound = BoundSockets { vhost: vhost_listener, qmp: qmp_listener, owned: std::mem::take(&mut undo.sockets) };
    // The image locks live as long as the process; the daemon's shutdown exits the process.
    std::mem::forget(locks);
    match daemon.run(bound, undo.pidfile.take()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("colo-blk: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn is_loopback(host_port: &str) -> bool {
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Option combinations that make no sense, found without touching anything.
fn check_options(a: &ServeArgs) -> Result<(), String> {
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
        Replication::Primary => {
            if let Some((name, _)) = secondary_opts.iter().find(|(_, given)| *given) {
                return Err(format!("{name}: only valid with --replication secondary"));
            }
            if a.disk.as_os_str() == NULL_DISK {
                return Err("--replication primary needs a disk (not null)".into());
            }
        }
        Replication::Secondary => {
            for (name, given) in &secondary_opts[..3] {
                if !given {
                    return Err(format!("{name}: required with --replication secondary"));
                }
            }
            if a.disk.as_os_str() == NULL_DISK || a.readonly {
                return Err("--replication secondary needs a writable disk (not null, not --readonly)".into());
            }
            if a.secondary.is_some() {
                return Err("--secondary: only valid with --replication primary (a failed-over secondary \
                            gets its new secondary from replication-start)"
                    .into());
            }
        }
        Replication::None => {
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
    if a.secondary_tls_creds.is_some() && a.replication == Replication::None {
        return Err("--secondary-tls-creds: only valid with --replication primary or secondary".into());
    }
    if a.queue_size == 0 || !a.queue_size.is_power_of_two() {
        return Err(format!("--queue-size: {} is not a power of two", a.queue_size));
    }
    if a.serial.len() > 20 {
        return Err("--serial: at most 20 bytes".into());
    }
    if a.format == Some(Format::Qcow2) {
        return Err("--format qcow2: qcow2 images are not supported yet; convert the image with \
                    `qemu-img convert -O raw` or serve it with qemu-storage-daemon"
            .into());
    }
    if a.socket_fd.is_some() && a.socket.is_some() {
        return Err("--socket-fd: give either --socket or --socket-fd".into());
    }
    Ok(())
}

/// Checks every path before anything is created: sockets free and distinct, the three disk
/// files distinct, an existing image raw and of the requested size, not locked by another
/// process.
fn check_paths(
    a: &ServeArgs,
    socket: &std::path::Path,
    inherited: bool,
    create_size: Option<u64>,
) -> Result<(), String> {
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
    let mut files: Vec<(&str, &std::path::Path)> = Vec::new();
    if a.disk.as_os_str() != NULL_DISK {
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
    let all: Vec<(&str, &std::path::Path)> =
        files.iter().copied().chain(sockets.iter().map(|(o, p)| (*o, p.as_path()))).collect();
    preflight::distinct_files(&all)?;
    for (opt, path) in &sockets {
        colo_blk::daemon::check_free(path).map_err(|e| format!("{opt}: {}", error_chain(&e)))?;
    }
    for (opt, path) in &files {
        if *opt == "--pidfile" {
            continue;
        }
        let facts =
            preflight::examine_image(path).map_err(|e| format!("{opt}: cannot read {}: {e}", path.display()))?;
        let Some(facts) = facts else { continue };
        if let Some(format) = facts.format {
            let raw_asked = *opt == "--disk" && a.format == Some(Format::Raw);
            if !raw_asked {
                return Err(format!(
                    "{opt}: {} is a {format} image, not a raw one; colo-blk serves raw images{}",
                    path.display(),
                    if *opt == "--disk" { " (--format raw serves its bytes as they are)" } else { "" }
                ));
            }
        }
        if *opt == "--disk"
            && let Some(wanted) = a.size.filter(|_| create_size.is_some())
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
        ImageLock::acquire(path, writable).map_err(|e| format!("{opt}: {}", error_chain(&e)))?;
    }
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
