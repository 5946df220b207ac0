//! The primary's view: the NBD export of the secondary disk, with copy-before-write.

use std::io;
use std::sync::Arc;

use super::{Secondary, result};
use crate::block::Op;
use crate::nbd::NbdExport;
use crate::replication::Stage;

/// The NBD export (wraps the shared state).
pub struct SecondaryExport(pub Arc<Secondary>);

impl NbdExport for SecondaryExport {
    fn size(&self) -> u64 {
        self.0.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let _t = self.0.gate.enter();
        self.0.file.read_exact_at(buf, offset)
    }

    /// What `read` serves: the disk file's holes and data (a block device is all data).
    fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<(u64, bool)>> {
        let _t = self.0.gate.enter();
        Ok(crate::block::image::extents(&*self.0.file, offset, len, max))
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.0.nbd_modify(offset, data.len() as u64, |f| {
            f.write_all_at(data, offset)?;
            if fua { f.sync_data() } else { Ok(()) }
        })
    }

    fn flush(&self) -> io::Result<()> {
        let _t = self.0.gate.enter();
        self.0.overlay.hidden.file.sync_data()?;
        self.0.file.sync_data()
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.nbd_modify(offset, len, |f| result(f.zero(&Op::Discard { offset, len })))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.0.nbd_modify(offset, len, |f| result(f.zero(&Op::WriteZeroes { offset, len, unmap: may_trim })))
    }

    fn colo_barriers(&self) -> bool {
        true
    }

    fn barrier(&self, seq: u64) -> io::Result<()> {
        self.0.colo_barrier(seq)
    }

    /// `replication-verify` on the primary hashes what `read` serves (the secondary disk).
    fn offers_checksums(&self) -> bool {
        true
    }

    fn last_barrier(&self) -> u64 {
        self.0.colo.last_barrier()
    }

    fn generation(&self) -> (u64, bool) {
        self.0.consistency.generation()
    }

    fn adopt_generation(&self, g: u64) -> io::Result<()> {
        self.0.adopt_generation(g)
    }

    fn admit(&self) -> Result<(), String> {
        match self.0.stage() {
            Stage::None | Stage::Running => Ok(()),
            s => Err(format!("replication stage is {}", s.name())),
        }
    }
}
