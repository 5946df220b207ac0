//! The daemon: [`build`] checks a [`Config`] and wires the device graph (sockets, disk,
//! replication layers, NBD servers); [`Daemon`] runs the accept/serve loop (one frontend at a
//! time, listening again after each disconnect), answers the control socket, and shuts down
//! cleanly on SIGTERM/SIGINT or QMP `quit` (drain in-flight I/O, flush, exit 0).

mod build;
mod config;
pub mod preflight;
mod sockets;
mod systemd;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::block::{BlockDevice, BlockError};
use crate::qmp::{Command, EventBus, QmpError, QmpHandler, QmpServer};
use crate::replication::ReplicationControl;
use crate::stats::{QueueStats, snapshot};
use crate::vhost::backend::ExitEvents;
use crate::vhost::proxy::{DeviceShape, relay_with_channel};
use crate::vhost::{BlkBackend, DRAIN_TIMEOUT, DeviceConfig, Shared, completion_event_id};

/// The export's id in `query-block-exports` (colo-blk serves exactly one).
pub const EXPORT_ID: &str = "export0";
/// The name of the node the export serves in `query-block-exports`.
pub const NODE_NAME: &str = "disk0";

/// What the serve loop needs, built and validated by [`build`].
pub struct ServeConfig {
    /// The vhost-user socket path (for an inherited socket: the path it is bound to, if any).
    pub socket: PathBuf,
    /// The control socket path.
    pub qmp: Option<PathBuf>,
    /// The device the frontend sees.
    pub device: DeviceConfig,
    /// Bypass the host page cache (reported in query-block).
    pub direct: bool,
    /// Busy-poll window of each queue worker after its last work (zero: never poll).
    pub poll: Duration,
    /// The fault-injection rules, when `--x-fault-injection` wrapped the device.
    pub faults: Option<Arc<crate::block::fault::FaultPlan>>,
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A live server already answers on the socket path.
    #[error("{path} is in use: a running server answers on it (another colo-blk?); stop it or choose another path")]
    InUse {
        /// The socket path.
        path: String,
    },
    /// A socket could not be created.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Setting up a connection's backend failed.
    #[error("cannot set up the device")]
    Block(#[from] BlockError),
    /// The vhost-user layer failed outside a single connection.
    #[error("vhost-user: {0}")]
    Vhost(String),
    /// Signal setup failed.
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    /// Creating per-connection resources (threads, eventfds) failed.
    #[error("cannot set up the connection's resources")]
    Resources(#[source] std::io::Error),
}

/// The state the serve loop, the signal thread and the control socket share.
pub struct Daemon {
    cfg: ServeConfig,
    device: Arc<dyn BlockDevice>,
    replication: Arc<dyn ReplicationControl>,
    stats: Vec<Arc<QueueStats>>,
    quiescing: Arc<AtomicBool>,
    current: Mutex<Option<Arc<BlkBackend>>>,
    events: EventBus,
    shutting_down: AtomicBool,
    connected: AtomicBool,
    owned_sockets: Mutex<Vec<OwnedSocket>>,
    pidfile: Mutex<Option<PidFile>>,
    /// The capacity (sectors) every connection's workers and GET_CONFIG use; `block_resize`
    /// changes it.
    capacity: Arc<AtomicU64>,
    /// Serialises `block_resize`.
    resizing: Mutex<()>,
}

/// The listening sockets a daemon serves on, bound before the disk is opened so that a
/// socket problem is found before anything is created.
#[derive(Debug)]
pub struct BoundSockets {
    /// The vhost-user listener (bound here, or inherited).
    pub vhost: UnixListener,
    /// The control socket listener.
    pub qmp: Option<UnixListener>,
    /// Socket files this process created (removed at exit if still its own).
    pub owned: Vec<OwnedSocket>,
}

impl BoundSockets {
    /// Removes the socket files created so far (a start that failed after binding).
    pub fn remove_files(&self) {
        self.owned.iter().for_each(OwnedSocket::remove);
    }
}

impl Daemon {
    /// A daemon serving `device`.
    pub fn new(cfg: ServeConfig, device: Arc<dyn BlockDevice>, replication: Arc<dyn ReplicationControl>) -> Arc<Self> {
        let stats = (0..cfg.device.num_queues).map(|_| Arc::new(QueueStats::default())).collect();
        Arc::new(Daemon {
            device,
            replication,
            stats,
            quiescing: Arc::new(AtomicBool::new(false)),
            current: Mutex::new(None),
            events: EventBus::default(),
            shutting_down: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            owned_sockets: Mutex::new(Vec::new()),
            pidfile: Mutex::new(None),
            capacity: Arc::new(AtomicU64::new(cfg.device.capacity_sectors)),
            resizing: Mutex::new(()),
            cfg,
        })
    }

    /// The event bus of the control socket (for replication stage events).
    pub fn events(&self) -> EventBus {
        self.events.clone()
    }

    /// Serves frontends on the already bound sockets until shutdown (which exits the
    /// process).
    pub fn run(self: &Arc<Self>, sockets: BoundSockets, pidfile: Option<PidFile>) -> Result<(), DaemonError> {
        *self.owned_sockets.lock().unwrap_or_else(|e| e.into_inner()) = sockets.owned;
        *self.pidfile.lock().unwrap_or_else(|e| e.into_inner()) = pidfile;
        let me = self.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let sig = sockets::wait_termination_signal();
                log::info!("signal {sig} received");
                me.shutdown();
            })
            .map_err(DaemonError::Signals)?;
        if let Some(l) = sockets.qmp {
            QmpServer::spawn(l, self.clone(), self.events.clone()).map_err(|source| DaemonError::Bind {
                path: self.cfg.qmp.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                source,
            })?;
        }
        log::info!(
            "serving {} on {} ({} queues of up to {})",
            self.device.describe(),
            self.cfg.socket.display(),
            self.cfg.device.num_queues,
            self.cfg.device.queue_size
        );
        // Every listener is up (the NBD server and the hook were started before `run`).
        if let Err(e) = systemd::notify_ready() {
            log::warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
        }
        self.serve_loop(sockets.vhost)
    }

    fn serve_loop(&self, listener: UnixListener) -> Result<(), DaemonError> {
        // The relay (vhost::proxy) sits between the frontend and the handler; the handler's
        // end is reached through a socket in a fresh private directory (`connect_handler`).
        let exit_events = ExitEvents::new(usize::from(self.cfg.device.num_queues)).map_err(DaemonError::Resources)?;
        loop {
            let shared = Arc::new(
                Shared::new(self.cfg.device.clone(), self.quiescing.clone(), self.cfg.poll)
                    .with_capacity(self.capacity.clone()),
            );
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let backend =
                Arc::new(BlkBackend::new(shared, &self.device, mem.clone(), &self.stats, exit_events.clone())?);
            let mut daemon = VhostUserDaemon::new("colo-blk".into(), backend.clone(), mem)
                .map_err(|e| DaemonError::Vhost(e.to_string()))?;
            let event = u64::from(completion_event_id(usize::from(self.cfg.device.num_queues)));
            for (handler, fd) in daemon.get_epoll_handlers().iter().zip(backend.notifiers()) {
                handler
                    .register_listener(fd, EventSet::IN, event)
                    .map_err(|e| DaemonError::Vhost(format!("cannot watch completions: {e}")))?;
            }
            *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend.clone());
            let frontend = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    static ACCEPT_FAILED: crate::logging::limit::LogLimit = crate::logging::limit::LogLimit::new();
                    if ACCEPT_FAILED.allow() {
                        log::error!("accepting a frontend failed: {e}");
                    }
                    continue;
                }
            };
            let relay = match self.connect_handler(&mut daemon) {
                Ok(handler_side) => {
                    let shape =
                        DeviceShape { num_queues: self.cfg.device.num_queues, queue_size: self.cfg.device.queue_size };
                    let slot = backend.shared().inflight_slot();
                    let channel = backend.shared().channel().clone();
                    std::thread::Builder::new()
                        .name("vhost-relay".into())
                        .spawn(move || {
                            if let Err(e) = relay_with_channel(frontend, handler_side, shape, slot, channel) {
                                log::debug!("vhost-user relay ended: {e}");
                            }
                        })
                        .map_err(DaemonError::Resources)?
                }
                Err(e) => {
                    static HANDLER_FAILED: crate::logging::limit::LogLimit = crate::logging::limit::LogLimit::new();
                    if HANDLER_FAILED.allow() {
                        log::error!("cannot start the request handler: {e}");
                    }
                    continue;
                }
            };
            self.connected.store(true, Ordering::Release);
            log::info!("frontend connected");
            self.events.emit("FRONTEND_CONNECTED", json!({}));
            let ended = daemon.wait();
            self.connected.store(false, Ordering::Release);
            match ended {
                Ok(()) => log::info!("frontend disconnected"),
                // A frontend that simply closes its socket (QEMU, libblkio) ends up here too.
                Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected)) => {
                    log::info!("frontend disconnected")
                }
                Err(e) => log::warn!("frontend connection ended: {e}"),
            }
            // The workers still run: let them finish what the old frontend submitted before
            // the connection's state goes away.
            if !backend.drain_all(DRAIN_TIMEOUT) {
                log::error!("in-flight requests did not finish after disconnect");
            }
            *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
            self.events.emit("FRONTEND_DISCONNECTED", json!({}));
            let _ = relay.join();
            drop(daemon);
        }
    }

    /// Starts the vhost-user-backend handler and returns our end of its connection.
    ///
    /// vhost-user-backend 0.24 only takes a connection from a listener or a path, so a
    /// listener is bound in a new private directory (mode 0700, random name), connected
    /// to, and both names are removed before the handler accepts: no file near the public
    /// socket is involved, and nobody else can reach the handler.
    fn connect_handler(
        &self,
        daemon: &mut VhostUserDaemon<Arc<BlkBackend>>,
    ) -> Result<std::os::unix::net::UnixStream, DaemonError> {
        let dir = private_dir().map_err(DaemonError::Resources)?;
        let path = dir.join("handler.sock");
        let bound = UnixListener::bind(&path).and_then(|l| {
            let ours = std::os::unix::net::UnixStream::connect(&path)?;
            Ok((l, ours))
        });
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&dir);
        let (listener, ours) =
            bound.map_err(|source| DaemonError::Bind { path: path.display().to_string(), source })?;
        let mut listener = vhost::vhost_user::Listener::from(listener);
        daemon
            .start(&mut listener)
            .map_err(|e| DaemonError::Vhost(format!("cannot start the request handler: {e}")))?;
        Ok(ours)
    }

    /// Stops taking requests, drains in-flight I/O, flushes the disk and exits the process.
    pub fn shutdown(&self) {
        if self.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        self.quiescing.store(true, Ordering::Release);
        let backend = self.current.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut code = 0;
        if let Some(b) = backend
            && !b.drain_all(DRAIN_TIMEOUT)
        {
            log::error!("shutdown: in-flight requests did not drain");
            code = 1;
        }
        if let Err(e) = self.device.flush() {
            log::error!("shutdown: flush failed: {e}");
            code = 1;
        }
        for socket in self.owned_sockets.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            socket.remove();
        }
        if let Some(p) = self.pidfile.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            p.remove();
        }
        self.events.emit("SHUTDOWN", json!({}));
        log::info!("shut down cleanly");
        std::process::exit(code);
    }

    fn query_block(&self) -> Value {
        let backend = self.current.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let d = &self.cfg.device;
        let connected = self.connected.load(Ordering::Acquire);
        let (acked, writeback, inflight) = match (&backend, connected) {
            (Some(b), true) => {
                let s = b.shared();
                (s.acked(), s.writeback(), b.inflight())
            }
            _ => (0, true, 0),
        };
        json!({
            "disk": self.device.describe(),
            "size": self.device.size(),
            "read-only": d.read_only,
            "direct": self.cfg.direct,
            "num-queues": d.num_queues,
            "queue-size": d.queue_size,
            "logical-block-size": d.block_size,
            "serial": d.serial,
            "socket": self.cfg.socket.display().to_string(),
            "frontend-connected": connected,
            "features-offered": format!("{:#x}", d.features()),
            "features-acked": format!("{:#x}", acked),
            "writeback": writeback,
            "poll-us": self.cfg.poll.as_micros(),
            "inflight": inflight,
        })
    }
}

impl QmpHandler for Daemon {
    fn execute(&self, cmd: &Command) -> Result<Value, QmpError> {
        match cmd {
            Command::QueryBlock => Ok(self.query_block()),
            Command::QueryBlockstats => serde_json::to_value(snapshot(self.stats.iter().map(|s| &**s)))
                .map_err(|e| QmpError::Generic(e.to_string())),
            Command::QmpCapabilities | Command::Quit => Ok(json!({})),
            Command::QueryVersion => Ok(crate::qmp::command::version()),
            Command::QueryCommands => {
                Ok(Value::Array(crate::qmp::command::COMMAND_NAMES.iter().map(|n| json!({"name": n})).collect()))
            }
            Command::QueryBlockExports => Ok(json!([{
                "type": "vhost-user-blk",
                "id": EXPORT_ID,
                "node-name": NODE_NAME,
                "shutting-down": self.shutting_down.load(Ordering::Acquire),
            }])),
            Command::QueryReplication => Ok(self.replication.query()),
            Command::ReplicationStart(args) => self.replication.start(args).map(|()| json!({})).map_err(generic),
            Command::ReplicationCheckpoint { barrier } => {
                self.replication.checkpoint(*barrier).map(|()| json!({})).map_err(generic)
            }
            Command::ReplicationGetError => self.replication.get_error().map(|()| json!({})).map_err(generic),
            Command::ReplicationVerify { resync } => {
                self.replication.verify(*resync).map(|()| json!({})).map_err(generic)
            }
            Command::InjectFault(rule) => match &self.cfg.faults {
                Some(plan) => {
                    plan.add(rule.clone());
                    Ok(json!({}))
                }
                None => Err(QmpError::Generic("fault injection is off (start with --x-fault-injection)".into())),
            },
            Command::ClearFaults => match &self.cfg.faults {
                Some(plan) => {
                    plan.clear();
                    Ok(json!({"injected": plan.injected()}))
                }
                None => Err(QmpError::Generic("fault injection is off (start with --x-fault-injection)".into())),
            },
            Command::ReplicationStop { failover, inject_commit_error } => {
                self.replication.stop(*failover, *inject_commit_error).map(|()| json!({})).map_err(generic)
            }
            Command::BlockResize { size, device, node_name } => {
                self.block_resize(*size, device.as_deref(), node_name.as_deref()).map(|()| json!({}))
            }
        }
    }

    fn quit(&self) {
        self.shutdown();
    }
}

impl Daemon {
    /// `block_resize`: checks everything that could refuse it before the guest's view
    /// changes, then changes the image and the capacity in the order that keeps every
    /// request inside the file (grow: file first; shrink: capacity first, then wait for the
    /// requests validated against the old capacity, then the file), and tells the frontend.
    fn block_resize(&self, size: u64, device: Option<&str>, node_name: Option<&str>) -> Result<(), QmpError> {
        for (arg, name) in [("device", device), ("node-name", node_name)] {
            if let Some(n) = name
                && n != NODE_NAME
            {
                return Err(QmpError::Generic(format!("Cannot find {arg} '{n}': the only node is '{NODE_NAME}'")));
            }
        }
        let block = u64::from(self.cfg.device.block_size);
        if !size.is_multiple_of(block) {
            return Err(QmpError::Generic(format!(
                "Parameter 'size' must be a multiple of the logical block size {block}, not {size}"
            )));
        }
        let _one_at_a_time = self.resizing.lock().unwrap_or_else(|e| e.into_inner());
        let query = self.replication.query();
        let stage = query["stage"].as_str().unwrap_or("none");
        if matches!(stage, "running" | "failover" | "failover-failed") {
            return Err(QmpError::Generic(format!(
                "block_resize is refused while replication is running (stage {stage}); stop replication first"
            )));
        }
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(QmpError::Generic("the daemon is shutting down".into()));
        }
        self.device.check_resize().map_err(|e| QmpError::Generic(format!("block_resize: {}", error_chain(&e))))?;
        let old = self.device.size();
        if size == old {
            return Ok(());
        }
        let failed = |e: crate::block::ResizeError| QmpError::Generic(format!("block_resize: {}", error_chain(&e)));
        let backend = self.current.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if size > old {
            self.device.resize(size).map_err(failed)?;
            self.capacity.store(size / 512, Ordering::Release);
        } else {
            self.capacity.store(size / 512, Ordering::Release);
            if let Some(b) = &backend
                && !b.wait_started_before(DRAIN_TIMEOUT)
            {
                self.capacity.store(old / 512, Ordering::Release);
                return Err(QmpError::Generic(format!(
                    "block_resize: requests in flight did not finish within {} s; the size is unchanged",
                    DRAIN_TIMEOUT.as_secs()
                )));
            }
            if let Err(e) = self.device.resize(size) {
                self.capacity.store(old / 512, Ordering::Release);
                return Err(failed(e));
            }
        }
        log::info!("disk resized from {old} to {size} bytes");
        static NOTIFY_FAILED: crate::logging::limit::LogLimit = crate::logging::limit::LogLimit::new();
        match backend.map(|b| b.shared().channel().config_changed()) {
            Some(Ok(true)) => log::info!("configuration change notification sent to the frontend"),
            Some(Ok(false)) | None => {
                log::info!("no backend request channel: the frontend sees the new capacity at its next GET_CONFIG")
            }
            Some(Err(e)) => {
                if NOTIFY_FAILED.allow() {
                    log::warn!("cannot notify the frontend of the new capacity: {e}");
                }
            }
        }
        Ok(())
    }
}

fn generic(e: crate::replication::ReplicationError) -> QmpError {
    QmpError::Generic(e.to_string())
}

/// A new directory only this user can enter (mkdtemp: mode 0700, unpredictable name).
fn private_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let mut template = std::env::temp_dir().join("colo-blk-XXXXXX").into_os_string().into_vec();
    template.push(0);
    // SAFETY: `template` is a NUL-terminated buffer mkdtemp fills in place.
    let p = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    template.pop();
    Ok(PathBuf::from(std::ffi::OsString::from_vec(template)))
}

pub use build::{BuildError, Built, build, error_chain};
pub use config::{Config, DEFAULT_SIZE, DEFAULT_SOCKET, ImageFormat, NULL_DISK, Role};
pub use sockets::{OwnedSocket, SocketPerms, bind_owned, block_termination_signals, check_free};
pub use systemd::{PidFile, activated_fd, inherited_listener};
