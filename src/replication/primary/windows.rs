//! Data generations on the primary: change windows, and the decision whether a secondary may
//! be resynchronised incrementally (see `replication/generation.rs` for the rules of the
//! generation file).
//!
//! A *change window* starts whenever the primary gives the secondary a new generation (at each
//! connection it accepts, and every [`WINDOW_TIME`] while writes flow): the primary rotates its
//! own generation, opens a window recording every range it sends to the secondary from then
//! on, and sends `CMD_COLO_ADOPT` with the new generation, which the secondary records in order
//! with the connection's writes. So a secondary disk that says generation G holds every write
//! sent before G's window opened; what it may lack is the dirty bitmap plus the windows from
//! G's on. The last [`WINDOWS`] windows are kept.
//!
//! On connect, with the secondary's generation `cs` and whether its process followed it
//! without a restart (`continuous`):
//! - `sync=full`: accepted (everything is copied);
//! - `continuous` and `cs` is the last generation it acknowledged: accepted, the dirty bitmap
//!   is all it lacks;
//! - `cs` opened a kept window: accepted, the windows from it on are added to the bitmap (a
//!   restarted secondary, or one restored from a copy taken within them);
//! - `sync=none` (the operator says the disks are identical) and `cs` is in this disk's
//!   history, or unknown (a fresh disk): accepted;
//! - otherwise refused as a split brain: `cs` in the history but older than the windows (an
//!   old copy), not in it (the secondary served a VM after a failover, or followed another
//!   primary), or unknown on a reconnect or `sync=incremental`.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Mirror, Payload, SECTOR, lock};
use crate::block::bitmap::SectorBitmap;
use crate::nbd::wire::CMD_COLO_ADOPT;
use crate::replication::SyncMode;
use crate::replication::generation::{Generations, show};

/// How long a change window stays open while writes flow.
pub(super) const WINDOW_TIME: Duration = Duration::from_secs(30);
/// Change windows kept.
pub(super) const WINDOWS: usize = 4;
/// Sectors per bit of a window (64 KiB): a window's memory is bounded by one bit per 64 KiB
/// of disk (2 MiB for 1 TiB) whatever the guest writes; a restored secondary gets whole
/// 64 KiB units copied again.
const UNIT: u64 = 128;

/// One change window: the generation the secondary was given when it opened, and every range
/// sent to the secondary since.
#[derive(Debug)]
pub(super) struct Window {
    generation: u64,
    opened: Instant,
    written: SectorBitmap,
}

/// The windows, oldest first, and the last generation the secondary acknowledged.
#[derive(Default)]
pub(super) struct Windows {
    list: VecDeque<Arc<Window>>,
    acked: u64,
}

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The secondary's data is not a state this primary can bring up to date incrementally.
    #[error("{0}")]
    SplitBrain(String),
    /// The NBD handshake failed (the server refused, or does not speak the protocol).
    #[error(transparent)]
    Nbd(crate::nbd::client::ClientError),
    /// Anything else (network, size).
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<crate::nbd::client::ClientError> for ConnectError {
    fn from(e: crate::nbd::client::ClientError) -> Self {
        match e {
            crate::nbd::client::ClientError::Io(e) => ConnectError::Io(e),
            e => ConnectError::Nbd(e),
        }
    }
}

impl ConnectError {
    /// Whether an automatic reconnect can help (a split brain needs the operator).
    pub fn is_split_brain(&self) -> bool {
        matches!(self, ConnectError::SplitBrain(_))
    }
}

impl Mirror {
    /// The disk's generation file (the daemon sets it for a disk that replicates).
    pub fn set_generations(&self, gens: Arc<Generations>) {
        *lock(&self.gens) = Some(gens);
    }

    pub(super) fn generations(&self) -> Option<Arc<Generations>> {
        lock(&self.gens).clone()
    }

    /// Decides whether a colo-blk secondary whose disk is at generation `cs` may be brought
    /// up to date for `purpose` (module comment); `Ok` carries the windows to add to the
    /// bitmap.
    pub(super) fn judge(
        &self,
        gens: &Generations,
        (cs, continuous): (u64, bool),
        purpose: SyncMode,
    ) -> Result<Vec<Arc<Window>>, String> {
        if purpose == SyncMode::Full {
            return Ok(Vec::new());
        }
        let w = lock(&self.windows);
        if continuous && cs != 0 && cs == w.acked {
            return Ok(Vec::new());
        }
        if let Some(i) = w.list.iter().position(|win| win.generation == cs && cs != 0) {
            return Ok(w.list.iter().skip(i).cloned().collect());
        }
        drop(w);
        let full = "replication-start mode=primary sync=full copies the whole disk over it";
        if cs == 0 {
            return if purpose == SyncMode::None {
                Ok(Vec::new())
            } else {
                Err(format!(
                    "split brain: the secondary's disk has no data generation (a fresh disk, or not the disk \
                     this primary replicated to), so what it lacks is unknown; {full}"
                ))
            };
        }
        if gens.knows(cs) {
            if purpose == SyncMode::None {
                return Ok(Vec::new());
            }
            return Err(format!(
                "split brain: the secondary's disk is an older state of this disk (generation {}) than \
                 this primary's change log reaches back to (a copy restored from earlier, or a primary \
                 restarted since); {full}",
                show(cs)
            ));
        }
        Err(format!(
            "split brain: the secondary's disk has a history of its own (generation {} is not in this \
             disk's history: it served a VM after a failover, or followed another primary); {full}",
            show(cs)
        ))
    }

    /// Opens a change window: a fresh generation, recorded from now on, to be adopted by the
    /// secondary. Returns it, or None without a generation file.
    pub(super) fn open_window(&self) -> io::Result<Option<u64>> {
        let Some(gens) = self.generations() else { return Ok(None) };
        let g = gens.rotate("new change window").map_err(io::Error::other)?;
        let mut w = lock(&self.windows);
        w.list.push_back(Arc::new(Window {
            generation: g,
            opened: Instant::now(),
            written: SectorBitmap::new((self.size / SECTOR).div_ceil(UNIT)),
        }));
        while w.list.len() > WINDOWS {
            w.list.pop_front();
        }
        Ok(Some(g))
    }

    /// The secondary acknowledged generation `g`.
    pub(super) fn window_acked(&self, g: u64) {
        lock(&self.windows).acked = g;
        self.activity_acked(g);
    }

    /// Replication stopped: writes are no longer tracked, so no window or acknowledged
    /// generation vouches for the secondary any more.
    pub(super) fn forget_windows(&self) {
        let mut w = lock(&self.windows);
        w.list.clear();
        w.acked = 0;
        drop(w);
        self.activity_acked(0);
    }

    /// A range sent to the secondary (guest write or resync copy) goes into the open window.
    pub(super) fn note_sent(&self, s0: u64, s1: u64) {
        if let Some(w) = lock(&self.windows).list.back() {
            w.written.set(s0 / UNIT, s1.div_ceil(UNIT));
        }
    }

    /// Whether the open window is older than [`WINDOW_TIME`] and has writes.
    pub(super) fn window_due(&self) -> bool {
        lock(&self.windows).list.back().is_some_and(|w| w.opened.elapsed() >= WINDOW_TIME && !w.written.is_clear())
    }

    /// Adds `windows`' ranges to the dirty bitmap.
    pub(super) fn dirty_from(&self, windows: &[Arc<Window>]) {
        let sectors = self.size / SECTOR;
        for w in windows {
            let mut u = 0;
            while let Some((a, b)) = w.written.next_set_run(u, w.written.len()) {
                self.dirty.set(a * UNIT, (b * UNIT).min(sectors));
                u = b;
            }
        }
    }

    /// The primary runs without its secondary from here (link lost, replication stopped):
    /// its data leaves the secondary's generation.
    pub(super) fn diverge(&self, why: &str) {
        if let Some(gens) = self.generations()
            && let Err(e) = gens.rotate(why)
        {
            log::error!("cannot record a new data generation: {e}");
        }
    }

    /// Sends the generation of a newly opened window and waits for the secondary to record it.
    pub(super) fn send_adopt(&self, g: u64) -> bool {
        let ok = self.send_and_wait(CMD_COLO_ADOPT, g, 0, Payload::default());
        if ok {
            self.window_acked(g);
        }
        ok
    }

    /// Opens a new window if the open one is due (called by the link manager).
    pub(super) fn maybe_rotate_window(&self) {
        if !self.current_link().is_some_and(|l| l.colo) || !self.window_due() {
            return;
        }
        match self.open_window() {
            Ok(Some(g)) => {
                if !self.send_adopt(g) {
                    log::warn!("the secondary did not record data generation {}", show(g));
                }
            }
            Ok(None) => {}
            Err(e) => log::error!("cannot open a change window: {e}"),
        }
    }

    /// `query-replication`'s `generation` object.
    pub(super) fn generation_json(&self) -> Value {
        let w = lock(&self.windows);
        match self.generations() {
            Some(g) => {
                let mut v = g.json();
                v["windows"] = json!(w.list.len());
                v["secondary"] = json!(show(w.acked));
                v
            }
            None => Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::primary::MirrorConfig;

    fn mirror(dir: &std::path::Path) -> (Arc<Mirror>, Arc<Generations>) {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let cfg = MirrorConfig { secondary: None, timeout: Duration::from_secs(1), tls: None };
        let m = Mirror::new(Arc::new(f), 1 << 20, cfg);
        let gens = Arc::new(Generations::for_disk(&dir.join("d.img")).unwrap());
        m.set_generations(gens.clone());
        (m, gens)
    }

    /// The decision table of the module comment.
    #[test]
    fn judge_accepts_earlier_states_and_refuses_diverged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (m, gens) = mirror(dir.path());
        let old = gens.rotate("test").unwrap();
        let w1 = m.open_window().unwrap().unwrap();
        m.note_sent(0, 8);
        m.window_acked(w1);
        let w2 = m.open_window().unwrap().unwrap();
        m.note_sent(100, 108);
        use SyncMode::*;
        let ok = |r: Result<Vec<Arc<Window>>, String>| r.map(|w| w.len()).map_err(|e| e[..12].to_string());
        // Full: always.
        assert_eq!(ok(m.judge(&gens, (12345, false), Full)), Ok(0));
        // The live secondary at the acknowledged generation: the bitmap is enough.
        assert_eq!(ok(m.judge(&gens, (w1, true), Incremental)), Ok(0));
        // Restarted at w1 or w2: the windows from there on.
        assert_eq!(ok(m.judge(&gens, (w1, false), Incremental)), Ok(2));
        assert_eq!(ok(m.judge(&gens, (w2, true), Incremental)), Ok(1));
        // Older than the windows: refused, unless the operator says the disks are identical.
        let older = m.judge(&gens, (old, false), Incremental).unwrap_err();
        assert!(older.starts_with("split brain:") && older.contains("older state"), "{older}");
        assert_eq!(ok(m.judge(&gens, (old, false), None)), Ok(0));
        // Another history: refused for none and incremental.
        for p in [None, Incremental] {
            let e = m.judge(&gens, (0xdead, false), p).unwrap_err();
            assert!(e.contains("history of its own"), "{e}");
        }
        // Unknown: only a start that says the disks are identical.
        assert_eq!(ok(m.judge(&gens, (0, false), None)), Ok(0));
        assert!(m.judge(&gens, (0, false), Incremental).unwrap_err().contains("no data generation"));
        // Windows hold what was sent; the oldest ones fall out.
        m.dirty_from(&m.judge(&gens, (w1, false), Incremental).unwrap());
        assert!(m.dirty.any(0, 8) && m.dirty.any(100, 108));
        for _ in 0..WINDOWS {
            m.open_window().unwrap();
        }
        assert!(m.judge(&gens, (w1, false), Incremental).unwrap_err().contains("older state"));
        // Stopping forgets the acknowledged generation.
        m.forget_windows();
        assert!(m.judge(&gens, (w1, true), Incremental).is_err());
    }
}
