//! The `colo-blk` command line: parse the arguments, turn `serve`'s into a
//! [`colo_blk::daemon::Config`] and hand over to the library (`daemon::build` checks it and
//! wires the device graph); `ctl` and `bench` are clients.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod bench;
mod ctl;

use colo_blk::block::raw::EngineKind;
use colo_blk::daemon::{self, Config, ImageFormat, Role, SocketPerms};
use colo_blk::nbd::NbdAddress;
use colo_blk::nbd::allow::AllowList;
use colo_blk::nbd::client::NbdUri;
use colo_blk::size::parse_size;

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
    /// Testing: the secondary's failover commit pauses this many milliseconds after each
    /// 1 MiB it merges (crash tests kill colo-blk mid-commit).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    x_commit_delay_ms: Option<u64>,
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

/// Payload buffers (NBD writes and reads up to 32 MiB, bounce and mirror copies) are large
/// and short-lived. glibc's dynamic mmap threshold rises after the first such buffer is
/// freed, after which they come from the heap arenas and fragment them: a soak with link
/// hangs grew the secondary's anonymous memory from 4 to 17 MiB in 12 rounds; with a fixed
/// 128 KiB threshold it stayed at 5.5 MiB (large buffers are mapped and unmapped whole).
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve(args) => serve(*args),
        Cmd::Ctl(args) => {
            colo_blk::logging::init(log::LevelFilter::Warn);
            ctl::run(args)
        }
        Cmd::Bench(args) => {
            colo_blk::logging::init(log::LevelFilter::Info);
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

fn serve(a: ServeArgs) -> ExitCode {
    if a.version {
        println!("colo-blk {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    // Before any thread exists, so that only the daemon's signal thread sees SIGTERM/SIGINT.
    if let Err(e) = daemon::block_termination_signals() {
        eprintln!("colo-blk: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    colo_blk::logging::init(match a.log_level {
        LogLevel::Error => log::LevelFilter::Error,
        LogLevel::Warn => log::LevelFilter::Warn,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Debug => log::LevelFilter::Debug,
        LogLevel::Trace => log::LevelFilter::Trace,
    });
    let disk_given = std::env::args_os().any(|s| s == "--disk" || s.to_string_lossy().starts_with("--disk="));
    // Every problem found by the build is a configuration error (exit status 2), and the
    // build leaves nothing behind.
    let built = match daemon::build(config(a, disk_given)) {
        Ok(b) => b,
        Err(e) => return usage_error(e.to_string()),
    };
    match built.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("colo-blk: {}", daemon::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The library's configuration for these arguments (`disk_given`: `--disk` was on the command
/// line, so a missing image is only created when `--size` says how large).
fn config(a: ServeArgs, disk_given: bool) -> Config {
    Config {
        socket: a.socket,
        socket_fd: a.socket_fd,
        socket_activation: true,
        pidfile: a.pidfile,
        format: a.format.map(|f| match f {
            Format::Raw => ImageFormat::Raw,
            Format::Qcow2 => ImageFormat::Qcow2,
        }),
        disk: a.disk,
        size: a.size,
        default_size: (!disk_given).then_some(daemon::DEFAULT_SIZE),
        readonly: a.readonly,
        num_queues: a.num_queues,
        queue_size: a.queue_size,
        logical_block_size: a.logical_block_size,
        direct: a.direct,
        serial: a.serial,
        qmp: a.qmp,
        replication: match a.replication {
            Replication::None => Role::None,
            Replication::Primary => Role::Primary,
            Replication::Secondary => Role::Secondary,
        },
        poll: std::time::Duration::from_micros(a.poll_us),
        io_engine: match a.io_engine {
            Engine::Uring => EngineKind::Uring,
            Engine::Sync => EngineKind::Sync,
        },
        active: a.active,
        hidden: a.hidden,
        nbd_listen: a.nbd_listen,
        nbd_export: a.nbd_export,
        secondary: a.secondary,
        secondary_timeout: a.secondary_timeout,
        colo_hook: a.colo_hook,
        fault_injection: a.x_fault_injection,
        commit_delay: a.x_commit_delay_ms.map(std::time::Duration::from_millis),
        nbd_allow: a.nbd_allow,
        nbd_tls_creds: a.nbd_tls_creds,
        secondary_tls_creds: a.secondary_tls_creds,
        socket_perms: SocketPerms { mode: a.socket_mode, owner: a.socket_owner },
        qmp_perms: SocketPerms { mode: a.qmp_mode, owner: a.qmp_owner },
        nbd_max_clients: a.nbd_max_clients,
    }
}
