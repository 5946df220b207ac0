//! What both replication roles keep about themselves, in one place: the stage (changed only
//! here, along the stage graph, and readable without a lock by the I/O paths), the last error
//! and when it happened, and where events go. The primary's mirror and the secondary each own
//! one [`RoleState`]; stage and error events, logs and `query-replication`'s fields come from
//! it, so both roles report the same way.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

use serde_json::{Value, json};

use super::progress::ErrorTime;
use super::{EventSink, Stage};

/// Whether a stage change is one the roles make (spec §2.1, and colo-blk's own additions):
/// start (none → running; a primary also done → running), stop without failover (running →
/// done), failover (running → failover → done, or → failover-failed, retried → failover, or
/// given up → done). A
/// secondary that resumes an interrupted failover commit at start is set to `failover`
/// directly ([`RoleState::resume_at`]), not through a transition.
pub fn legal(from: Stage, to: Stage) -> bool {
    use Stage::*;
    from == to
        || matches!(
            (from, to),
            (None, Running)
                | (Running, Done)
                | (Running, Failover)
                | (Failover, Done)
                | (Failover, FailoverFailed)
                | (FailoverFailed, Failover)
                | (FailoverFailed, Done)
                | (Done, Running)
        )
}

/// How a recorded error is announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    /// Log and emit `REPLICATION_ERROR` for every error.
    Every,
    /// Log and emit only when no error was recorded yet (a link that keeps failing reports
    /// once until the operator clears it).
    First,
    /// Record only (the caller reports it its own way).
    Quiet,
}

fn stage_from(v: u8) -> Stage {
    match v {
        1 => Stage::Running,
        2 => Stage::Failover,
        3 => Stage::FailoverFailed,
        4 => Stage::Done,
        _ => Stage::None,
    }
}

/// See the module documentation.
pub struct RoleState {
    /// `"primary"` or `"secondary"`, as events name the role.
    mode: &'static str,
    /// Serialises stage changes; mirrored into `now`.
    stage: Mutex<Stage>,
    /// The stage as an atomic: every VM request asks.
    now: AtomicU8,
    error: Mutex<Option<String>>,
    error_at: ErrorTime,
    events: Mutex<Option<EventSink>>,
}

impl std::fmt::Debug for RoleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoleState").field("mode", &self.mode).field("stage", &self.stage()).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RoleState {
    /// Stage none, no error, no event sink, for the role `mode` names.
    pub fn new(mode: &'static str) -> Self {
        RoleState {
            mode,
            stage: Mutex::new(Stage::None),
            now: AtomicU8::new(Stage::None as u8),
            error: Mutex::new(None),
            error_at: ErrorTime::default(),
            events: Mutex::new(None),
        }
    }

    /// The current stage (one atomic read).
    pub fn stage(&self) -> Stage {
        stage_from(self.now.load(Ordering::Acquire))
    }

    /// Moves to `to`: logs the change and emits `REPLICATION_STAGE`. A change the stage graph
    /// does not have ([`legal`]) is logged as an error and made anyway: the caller checked
    /// its own preconditions, and refusing here would leave I/O routed for the wrong stage.
    /// Returns the previous stage.
    pub fn set_stage(&self, to: Stage) -> Stage {
        let mut g = lock(&self.stage);
        let from = std::mem::replace(&mut *g, to);
        self.now.store(to as u8, Ordering::Release);
        drop(g);
        if from != to {
            if !legal(from, to) {
                log::error!("replication stage {} -> {} is not in the stage graph", from.name(), to.name());
            }
            log::info!("replication stage {} -> {}", from.name(), to.name());
            self.emit("REPLICATION_STAGE", json!({"mode": self.mode, "stage": to.name()}));
        }
        from
    }

    /// Sets the stage a restarted process resumes in (a secondary's interrupted failover
    /// commit), without an event: nothing changed from the outside's point of view.
    pub fn resume_at(&self, stage: Stage) {
        *lock(&self.stage) = stage;
        self.now.store(stage as u8, Ordering::Release);
    }

    /// The last error recorded since it was last cleared.
    pub fn error(&self) -> Option<String> {
        lock(&self.error).clone()
    }

    /// Whether an error is recorded.
    pub fn has_error(&self) -> bool {
        lock(&self.error).is_some()
    }

    /// Forgets the recorded error (a new start, a successful retry).
    pub fn clear_error(&self) {
        *lock(&self.error) = None;
        self.error_at.clear();
    }

    /// Records `msg` as the last error, now, announced as `announce` says.
    pub fn record_error(&self, msg: String, announce: Announce) {
        let first = {
            let mut g = lock(&self.error);
            let first = g.is_none();
            *g = Some(msg.clone());
            first
        };
        self.error_at.mark();
        if announce == Announce::Every || (announce == Announce::First && first) {
            log::error!("replication error: {msg}");
            self.emit("REPLICATION_ERROR", json!({"mode": self.mode, "error": msg}));
        }
    }

    /// `query-replication`'s `error-time` field (null while no error is recorded).
    pub fn error_time(&self) -> Value {
        self.error_at.json()
    }

    /// Where stage, error and the role's other events go.
    pub fn set_events(&self, sink: EventSink) {
        *lock(&self.events) = Some(sink);
    }

    /// Emits an event, if a sink is set (the sink queues it: it never blocks on a client).
    pub fn emit(&self, name: &str, data: Value) {
        let sink = lock(&self.events).clone();
        if let Some(sink) = sink {
            sink(name, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn recorder(role: &RoleState) -> Arc<Mutex<Vec<(String, Value)>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        role.set_events(Arc::new(move |name: &str, data: Value| lock(&s).push((name.to_string(), data))));
        seen
    }

    #[test]
    fn stage_changes_emit_once_and_are_read_without_the_lock() {
        let role = RoleState::new("secondary");
        let seen = recorder(&role);
        assert_eq!(role.set_stage(Stage::Running), Stage::None);
        assert_eq!(role.stage(), Stage::Running);
        role.set_stage(Stage::Running);
        role.set_stage(Stage::Failover);
        role.resume_at(Stage::FailoverFailed);
        assert_eq!(role.stage(), Stage::FailoverFailed);
        let events = lock(&seen).clone();
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].1, json!({"mode": "secondary", "stage": "running"}));
        assert_eq!(events[1].1, json!({"mode": "secondary", "stage": "failover"}));
    }

    #[test]
    fn errors_are_announced_as_asked_and_cleared() {
        let role = RoleState::new("primary");
        let seen = recorder(&role);
        role.record_error("link lost".into(), Announce::First);
        role.record_error("link lost again".into(), Announce::First);
        role.record_error("quiet".into(), Announce::Quiet);
        assert_eq!(role.error().as_deref(), Some("quiet"));
        assert!(role.error_time().as_u64().is_some_and(|t| t > 0));
        role.record_error("every".into(), Announce::Every);
        assert_eq!(lock(&seen).len(), 2);
        role.clear_error();
        assert!(!role.has_error());
        assert_eq!((role.error(), role.error_time()), (None, Value::Null));
        role.record_error("after clear".into(), Announce::First);
        assert_eq!(lock(&seen).len(), 3);
    }

    #[test]
    fn the_stage_graph_has_exactly_the_roles_transitions() {
        use Stage::*;
        let all = [None, Running, Failover, FailoverFailed, Done];
        let allowed: Vec<(Stage, Stage)> = all
            .iter()
            .flat_map(|&a| all.iter().map(move |&b| (a, b)))
            .filter(|&(a, b)| a != b && legal(a, b))
            .collect();
        assert_eq!(
            allowed,
            vec![
                (None, Running),
                (Running, Failover),
                (Running, Done),
                (Failover, FailoverFailed),
                (Failover, Done),
                (FailoverFailed, Failover),
                (FailoverFailed, Done),
                (Done, Running),
            ]
        );
        for s in all {
            assert_eq!(stage_from(s as u8), s);
        }
    }
}
