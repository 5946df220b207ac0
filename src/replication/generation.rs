//! Data generations: which history a replicated disk's data belongs to, so that two disks
//! that diverged are never "resynchronised" incrementally (which would silently keep the
//! secondary's own writes). The idea is DRBD's data-generation identifiers.
//!
//! Each disk served as a primary or a secondary keeps `DISK.colo-gen`: its current generation
//! (a random 64-bit number; 0 = unknown, a disk that never replicated with this feature) and
//! the generations it had before (newest first, at most [`HISTORY`]). The rules:
//! - a secondary *adopts* the generation its primary gives it when the primary accepted it,
//!   and again whenever the primary opens a new change window (the adopt runs in order with
//!   the connection's writes, like a checkpoint barrier);
//! - a secondary that fails over gets a fresh generation before its VM writes to the disk;
//! - a primary gets a fresh one whenever it runs without its secondary (link lost, stopped)
//!   and for every change window it opens.
//!
//! On connect a primary compares the secondary's generation with its own history
//! (`primary/windows.rs` decides).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Generations remembered besides the current one.
pub const HISTORY: usize = 64;

/// Errors reading or writing the generation file.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    /// I/O on the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file does not parse.
    #[error("{path}: not a colo-blk generation file ({why})")]
    Malformed {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct State {
    current: u64,
    history: Vec<u64>,
}

/// The generation file of one disk.
#[derive(Debug)]
pub struct Generations {
    path: PathBuf,
    state: Mutex<State>,
}

/// A fresh random generation (never 0).
pub fn fresh() -> u64 {
    loop {
        let mut b = [0u8; 8];
        // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        let g = if n == 8 {
            u64::from_ne_bytes(b)
        } else {
            // No entropy source: time and address bits still make two disks differ.
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            (t.as_nanos() as u64) ^ ((&b as *const _ as u64) << 17) ^ u64::from(std::process::id())
        };
        if g != 0 {
            return g;
        }
    }
}

/// A generation as people read it.
pub fn show(g: u64) -> String {
    if g == 0 { "unknown".into() } else { format!("{g:016x}") }
}

impl Generations {
    /// Reads `DISK.colo-gen` of `disk` (missing: unknown generation, no history).
    pub fn for_disk(disk: &Path) -> Result<Generations, GenerationError> {
        let mut p = disk.as_os_str().to_owned();
        p.push(".colo-gen");
        let path = PathBuf::from(p);
        let state = match std::fs::read_to_string(&path) {
            Ok(s) => parse(&s).map_err(|why| GenerationError::Malformed { path: path.display().to_string(), why })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(source) => return Err(GenerationError::Io { path: path.display().to_string(), source }),
        };
        Ok(Generations { path, state: Mutex::new(state) })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current generation (0: unknown).
    pub fn current(&self) -> u64 {
        self.state().current
    }

    /// Whether `g` is the current generation or one of the remembered earlier ones.
    pub fn knows(&self, g: u64) -> bool {
        let s = self.state();
        g != 0 && (s.current == g || s.history.contains(&g))
    }

    /// The current generation and the history, for `query-replication`.
    pub fn json(&self) -> serde_json::Value {
        let s = self.state();
        serde_json::json!({
            "current": show(s.current),
            "history": s.history.iter().take(4).map(|&g| show(g)).collect::<Vec<_>>(),
        })
    }

    /// Makes `g` the current generation (durably), the old one going into the history.
    pub fn adopt(&self, g: u64) -> Result<(), GenerationError> {
        let mut s = self.state();
        if s.current == g {
            return Ok(());
        }
        let mut next = s.clone();
        if next.current != 0 {
            next.history.insert(0, next.current);
            next.history.truncate(HISTORY);
        }
        next.history.retain(|&h| h != g);
        next.current = g;
        self.write(&next)?;
        *s = next;
        Ok(())
    }

    /// Starts a fresh generation (durably) and returns it.
    pub fn rotate(&self, why: &str) -> Result<u64, GenerationError> {
        let g = fresh();
        let old = self.current();
        self.adopt(g)?;
        log::info!("data generation {} -> {} ({why})", show(old), show(g));
        Ok(g)
    }

    fn write(&self, s: &State) -> Result<(), GenerationError> {
        let err = |source| GenerationError::Io { path: self.path.display().to_string(), source };
        let mut text = format!("colo-blk generations 1\ncurrent {:016x}\nhistory", s.current);
        for h in &s.history {
            text.push_str(&format!(" {h:016x}"));
        }
        text.push('\n');
        super::write_durably(&self.path, text.as_bytes()).map_err(err)
    }
}

fn parse(text: &str) -> Result<State, String> {
    let mut lines = text.lines();
    if lines.next() != Some("colo-blk generations 1") {
        return Err("first line".into());
    }
    let hex = |w: &str| u64::from_str_radix(w, 16).map_err(|_| format!("'{w}' is not a generation"));
    let current = match lines.next().and_then(|l| l.strip_prefix("current ")) {
        Some(w) => hex(w.trim())?,
        None => return Err("no current generation".into()),
    };
    let history = match lines.next().and_then(|l| l.strip_prefix("history")) {
        Some(ws) => ws.split_whitespace().map(hex).collect::<Result<Vec<_>, _>>()?,
        None => return Err("no history".into()),
    };
    Ok(State { current, history })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adopt_rotate_persist_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        let g = Generations::for_disk(&disk).unwrap();
        assert_eq!(g.current(), 0);
        assert!(!g.knows(0));
        g.adopt(7).unwrap();
        let r = g.rotate("test").unwrap();
        assert!(r != 0 && r != 7);
        let again = Generations::for_disk(&disk).unwrap();
        assert_eq!(again.current(), r);
        assert!(again.knows(7) && again.knows(r) && !again.knows(8));
        for i in 100..100 + HISTORY as u64 + 5 {
            again.adopt(i).unwrap();
        }
        assert!(!again.knows(7), "the history is bounded");
        assert!(again.knows(100 + HISTORY as u64 + 4));
    }

    #[test]
    fn a_malformed_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        std::fs::write(dir.path().join("d.img.colo-gen"), "something else").unwrap();
        assert!(matches!(Generations::for_disk(&disk), Err(GenerationError::Malformed { .. })));
        std::fs::write(dir.path().join("d.img.colo-gen"), "colo-blk generations 1\ncurrent zz\nhistory\n").unwrap();
        assert!(Generations::for_disk(&disk).is_err());
    }
}
