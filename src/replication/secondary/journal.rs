//! The failover commit's journal: `DISK.colo-commit`, next to the disk.
//!
//! The buffers' maps (which sectors the active and hidden buffers hold) live in memory. For a
//! failover commit to survive colo-blk being killed half way, the maps it merges are written
//! down when it starts, and every later change that a restart must know is appended before
//! it takes effect:
//! - the *base*: the saved (hidden) and active runs at the start of the commit, written to a
//!   temporary file, synced and renamed into place, so it exists whole or not at all;
//! - `Clear(a, b)`: sectors [a, b) of the disk hold their final data (merged, or written by
//!   the VM during the commit); appended only after the disk was synced;
//! - `Active(a, b)`: the VM wrote [a, b) into the active buffer (stage failover-failed);
//!   appended after the active buffer was synced.
//!
//! Replaying the records in order gives maps under which merging again is correct: sectors
//! already merged are copied a second time from unchanged buffers (idempotent), sectors the
//! VM rewrote on the disk are left alone. Each append is synced before the request it
//! describes is acknowledged, so only the last record can be torn by a crash, and it then
//! describes a request that was never acknowledged: a torn tail is dropped; a bad record
//! anywhere else means the file is damaged and the commit is not resumed.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const MAGIC: &[u8; 8] = b"COLOCMT1";
const HEADER: usize = 32;
const RECORD: usize = 24;

/// One journal record (sector ranges, end exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Base: the hidden buffer holds the pre-epoch data of these sectors.
    Saved(u64, u64),
    /// Base, or a VM write in stage failover-failed: the active buffer holds these sectors.
    Active(u64, u64),
    /// The disk holds the final data of these sectors: neither buffer applies any more.
    Clear(u64, u64),
}

impl Record {
    fn encode(self) -> [u8; RECORD] {
        let (kind, a, b) = match self {
            Record::Saved(a, b) => (1u8, a, b),
            Record::Active(a, b) => (2, a, b),
            Record::Clear(a, b) => (3, a, b),
        };
        let mut r = [0u8; RECORD];
        r[0] = kind;
        r[8..16].copy_from_slice(&a.to_le_bytes());
        r[16..24].copy_from_slice(&b.to_le_bytes());
        let sum = checksum(&r);
        r[4..8].copy_from_slice(&sum.to_le_bytes());
        r
    }

    /// Decodes a record; None when its checksum, kind or range is wrong.
    fn decode(r: &[u8], sectors: u64) -> Option<Record> {
        let sum = u32::from_le_bytes(r[4..8].try_into().ok()?);
        let mut body = [0u8; RECORD];
        body.copy_from_slice(r);
        body[4..8].fill(0);
        if checksum(&body) != sum || r[1..4] != [0, 0, 0] {
            return None;
        }
        let a = u64::from_le_bytes(r[8..16].try_into().ok()?);
        let b = u64::from_le_bytes(r[16..24].try_into().ok()?);
        if a >= b || b > sectors {
            return None;
        }
        match r[0] {
            1 => Some(Record::Saved(a, b)),
            2 => Some(Record::Active(a, b)),
            3 => Some(Record::Clear(a, b)),
            _ => None,
        }
    }
}

/// FNV-1a folded to 32 bits: catches torn and zero-filled records, not an adversary (the
/// journal sits next to the disk, with the same permissions).
fn checksum(bytes: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h ^ (h >> 32)) as u32
}

fn header(sectors: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&sectors.to_le_bytes());
    let sum = checksum(&h[..16]);
    h[16..20].copy_from_slice(&sum.to_le_bytes());
    h
}

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// I/O on the journal failed.
    #[error("{path}: {source}")]
    Io {
        /// The journal.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not a journal of this disk, or a record before the last one is damaged.
    #[error("{path}: {why}")]
    Damaged {
        /// The journal.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// An append was attempted with no journal open.
    #[error("{path}: no commit in progress")]
    NotOpen {
        /// The journal.
        path: String,
    },
}

/// The open journal: where the next record goes.
#[derive(Debug)]
struct Appender {
    file: File,
    len: u64,
}

/// The commit journal of one disk.
#[derive(Debug)]
pub struct CommitJournal {
    path: PathBuf,
    open: Mutex<Option<Appender>>,
}

impl CommitJournal {
    /// The journal of `disk`: `DISK.colo-commit`.
    pub fn for_disk(disk: &Path) -> CommitJournal {
        let mut p = disk.as_os_str().to_owned();
        p.push(".colo-commit");
        CommitJournal { path: PathBuf::from(p), open: Mutex::new(None) }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file exists.
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Whether a commit is being journaled (appends are accepted).
    pub fn is_open(&self) -> bool {
        self.appender().is_some()
    }

    fn appender(&self) -> std::sync::MutexGuard<'_, Option<Appender>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn io_err(&self) -> impl Fn(io::Error) -> JournalError + '_ {
        move |source| JournalError::Io { path: self.path.display().to_string(), source }
    }

    /// Writes a new journal whose base is `base` (durably: temporary file, fsync, rename,
    /// fsync of the folder) and opens it for appends.
    pub fn create(&self, sectors: u64, base: impl IntoIterator<Item = Record>) -> Result<(), JournalError> {
        let err = self.io_err();
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut bytes = header(sectors).to_vec();
        for r in base {
            bytes.extend_from_slice(&r.encode());
        }
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp).map_err(&err)?;
        file.write_all_at(&bytes, 0).map_err(&err)?;
        file.sync_all().map_err(&err)?;
        std::fs::rename(&tmp, &self.path).map_err(&err)?;
        sync_parent(&self.path).map_err(&err)?;
        *self.appender() = Some(Appender { file, len: bytes.len() as u64 });
        Ok(())
    }

    /// Reads the journal of a disk of `sectors` sectors: its records in order, a torn last
    /// record dropped (and cut off the file), and opens it for appends.
    pub fn load(&self, sectors: u64) -> Result<Vec<Record>, JournalError> {
        let err = self.io_err();
        let damaged = |why: String| JournalError::Damaged { path: self.path.display().to_string(), why };
        let mut file = OpenOptions::new().read(true).write(true).open(&self.path).map_err(&err)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(&err)?;
        if bytes.len() < HEADER || bytes[..HEADER] != header(sectors) {
            return Err(damaged(format!(
                "not a commit journal of this disk ({} sectors): the header does not match",
                sectors
            )));
        }
        let body = &bytes[HEADER..];
        let whole = body.len() / RECORD;
        let mut records = Vec::with_capacity(whole);
        for (i, r) in body.chunks_exact(RECORD).enumerate() {
            match Record::decode(r, sectors) {
                Some(rec) => records.push(rec),
                None if i + 1 == whole => {
                    log::warn!(
                        "{}: the last record is torn (a request that was never acknowledged): dropped",
                        self.path.display()
                    );
                }
                None => return Err(damaged(format!("record {i} of {whole} is damaged"))),
            }
        }
        let len = (HEADER + records.len() * RECORD) as u64;
        if len != bytes.len() as u64 {
            file.set_len(len).map_err(&err)?;
            file.sync_all().map_err(&err)?;
        }
        *self.appender() = Some(Appender { file, len });
        Ok(records)
    }

    /// Appends `record` and syncs it.
    pub fn append(&self, record: Record) -> Result<(), JournalError> {
        self.append_all(&[record])
    }

    /// Appends `records` with one sync. A crash may keep any prefix of them (each record
    /// stands alone; only the last one written can be torn).
    pub fn append_all(&self, records: &[Record]) -> Result<(), JournalError> {
        let err = self.io_err();
        let mut open = self.appender();
        let a = open.as_mut().ok_or_else(|| JournalError::NotOpen { path: self.path.display().to_string() })?;
        let bytes: Vec<u8> = records.iter().flat_map(|r| r.encode()).collect();
        a.file.write_all_at(&bytes, a.len).map_err(&err)?;
        a.file.sync_data().map_err(&err)?;
        a.len += bytes.len() as u64;
        Ok(())
    }

    /// Closes and deletes the journal (the commit finished).
    pub fn remove(&self) -> Result<(), JournalError> {
        let err = self.io_err();
        *self.appender() = None;
        match std::fs::remove_file(&self.path) {
            Ok(()) => sync_parent(&self.path).map_err(&err),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(e)),
        }
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal() -> (tempfile::TempDir, CommitJournal) {
        let dir = tempfile::tempdir().unwrap();
        let j = CommitJournal::for_disk(&dir.path().join("disk.img"));
        (dir, j)
    }

    #[test]
    fn base_and_appends_round_trip() {
        let (_d, j) = journal();
        assert!(j.path().ends_with("disk.img.colo-commit"));
        assert!(!j.exists() && !j.is_open());
        assert!(matches!(j.append(Record::Clear(0, 1)), Err(JournalError::NotOpen { .. })));
        j.create(1000, [Record::Saved(0, 8), Record::Active(16, 24)]).unwrap();
        j.append(Record::Clear(0, 4)).unwrap();
        j.append(Record::Active(100, 200)).unwrap();
        let again = CommitJournal::for_disk(&j.path().with_file_name("disk.img"));
        let recs = again.load(1000).unwrap();
        assert_eq!(
            recs,
            vec![Record::Saved(0, 8), Record::Active(16, 24), Record::Clear(0, 4), Record::Active(100, 200)]
        );
        // Appends after a load go after the loaded records.
        again.append(Record::Clear(16, 24)).unwrap();
        assert_eq!(CommitJournal::for_disk(&j.path().with_file_name("disk.img")).load(1000).unwrap().len(), 5);
        again.remove().unwrap();
        assert!(!again.exists());
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_cut_off() {
        let (_d, j) = journal();
        j.create(64, [Record::Saved(0, 8)]).unwrap();
        j.append(Record::Clear(0, 8)).unwrap();
        // A crash mid-append: half a record, or a whole one zero-filled.
        for tail in [vec![0xAAu8; 10], vec![0u8; RECORD]] {
            let len = std::fs::metadata(j.path()).unwrap().len();
            let f = OpenOptions::new().write(true).open(j.path()).unwrap();
            f.write_all_at(&tail, len).unwrap();
            let recs = CommitJournal::for_disk(&j.path().with_file_name("disk.img")).load(64).unwrap();
            assert_eq!(recs, vec![Record::Saved(0, 8), Record::Clear(0, 8)]);
            assert_eq!(std::fs::metadata(j.path()).unwrap().len(), (HEADER + 2 * RECORD) as u64);
        }
    }

    #[test]
    fn damage_before_the_last_record_or_another_disk_is_refused() {
        let (_d, j) = journal();
        j.create(64, [Record::Saved(0, 8), Record::Active(8, 16)]).unwrap();
        j.append(Record::Clear(0, 8)).unwrap();
        let other = CommitJournal::for_disk(&j.path().with_file_name("disk.img"));
        assert!(matches!(other.load(65), Err(JournalError::Damaged { .. })), "another disk size");
        let f = OpenOptions::new().write(true).open(j.path()).unwrap();
        f.write_all_at(&[0xFF], (HEADER + RECORD + 9) as u64).unwrap();
        let e = other.load(64).unwrap_err();
        assert!(e.to_string().contains("record 1 of 3 is damaged"), "{e}");
    }

    #[test]
    fn records_outside_the_disk_or_empty_are_damage() {
        assert_eq!(Record::decode(&Record::Clear(0, 65).encode(), 64), None);
        assert_eq!(Record::decode(&Record::Clear(5, 5).encode(), 64), None);
        assert_eq!(Record::decode(&Record::Saved(1, 64).encode(), 64), Some(Record::Saved(1, 64)));
    }
}
