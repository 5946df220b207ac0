//! Continuous replication: a secondary that failed over (stage done) can become the primary
//! for a new secondary without a restart (spec §1.2, "Continuous replication"). Until then
//! every operation belongs to the secondary role; once `replication-start {"mode":"primary",
//! "secondary": URI}` succeeded on a done secondary, operations belong to the primary role.
//! Without a URI the start is ignored, as QEMU ignores every start after failover.

use std::sync::Arc;

use serde_json::Value;

use super::primary::{Mirror, MirrorControl};
use super::secondary::{Secondary, SecondaryControl};
use super::{Mode, ReplicationControl, ReplicationError, Stage, StartArgs};

/// The control surface of a `--replication secondary` process.
pub struct SecondaryThenPrimary {
    /// The secondary role.
    pub secondary: SecondaryControl,
    /// The primary role it can take on after failover.
    pub primary: MirrorControl,
    /// The same mirror (to ask its stage).
    pub mirror: Arc<Mirror>,
    /// The same secondary (to ask its stage).
    pub state: Arc<Secondary>,
}

impl SecondaryThenPrimary {
    fn promoted(&self) -> bool {
        self.mirror.stage() != Stage::None
    }
}

impl ReplicationControl for SecondaryThenPrimary {
    fn start(&self, args: &StartArgs) -> Result<(), ReplicationError> {
        // QEMU ignores a start after failover (its test #11, "continuous replication" there
        // means the node must not get in the way). Naming a new secondary is what promotes.
        if args.mode == Mode::Primary && self.state.stage() == Stage::Done && args.secondary.is_some() {
            return self.primary.start(args);
        }
        self.secondary.start(args)
    }
    fn checkpoint(&self, barrier: Option<u64>) -> Result<(), ReplicationError> {
        if self.promoted() { self.primary.checkpoint(barrier) } else { self.secondary.checkpoint(barrier) }
    }
    fn get_error(&self) -> Result<(), ReplicationError> {
        if self.promoted() { self.primary.get_error() } else { self.secondary.get_error() }
    }
    fn stop(&self, failover: bool, inject: bool) -> Result<(), ReplicationError> {
        if self.promoted() { self.primary.stop(failover, inject) } else { self.secondary.stop(failover, inject) }
    }
    fn verify(&self, resync: bool) -> Result<(), ReplicationError> {
        if self.promoted() {
            self.primary.verify(resync)
        } else {
            // The secondary role has no verify of its own: the default refusal.
            Err(ReplicationError::VerifyNeedsPrimary {
                mode: Mode::Secondary.name().to_string(),
                stage: self.state.stage().name().to_string(),
            })
        }
    }
    fn query(&self) -> Value {
        if self.promoted() {
            let mut q = self.primary.query();
            q["previous"] = self.secondary.query();
            q
        } else {
            self.secondary.query()
        }
    }
}
