//! A qcow2 image's bytes for the replication paths (`block::image::ImageData`): the calling
//! thread goes through imago itself, under the same rules as the metadata thread (imago's
//! locks for allocation, [`Image::quiesce_mappings`] before clusters move).

use std::io;
use std::sync::Arc;

use imago::Mapping;

use super::Image;
use super::metadata::{self, Zeroing};
use crate::block::image::ImageData;
use crate::io::Op;

/// See the module documentation.
pub(super) struct Qcow2Data(pub Arc<Image>);

impl Qcow2Data {
    /// Walks the mappings from `from` while `zero(mapping)` holds; returns where it stopped.
    fn walk(&self, from: u64, limit: u64, zero: bool) -> u64 {
        let limit = limit.min(self.0.size());
        let walked = self.0.with(|access| {
            let mut pos = from;
            while pos < limit {
                let (mapping, n) = access.get_mapping(pos, limit - pos)?;
                let is_zero = matches!(mapping, Mapping::Zero { .. } | Mapping::Eof { .. });
                if is_zero != zero || n == 0 {
                    break;
                }
                pos += n;
            }
            Ok(pos)
        });
        match walked {
            Ok(pos) => pos.min(limit).max(from),
            // Cannot tell: data.
            Err(_) => {
                if zero {
                    from
                } else {
                    limit
                }
            }
        }
    }

    /// Writes the metadata a write or zeroing changed back to the image file, so that it
    /// survives a kill of the daemon as the data does.
    fn write_back(&self, r: i32) -> i32 {
        if r < 0 {
            return r;
        }
        match self.0.with(|a| a.flush()) {
            Ok(()) => r,
            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

impl ImageData for Qcow2Data {
    fn transfer(&self, offset: u64, bufs: &mut crate::io::Buffers, write: bool, dsync: bool) -> i32 {
        if offset.checked_add(bufs.len()).is_none_or(|end| end > self.0.size()) {
            return -libc::EINVAL;
        }
        if write {
            self.write_back(metadata::write(&self.0, offset, bufs, dsync))
        } else {
            metadata::read(&self.0, offset, bufs)
        }
    }

    fn zero(&self, op: &Op<'_>) -> i32 {
        let r = match *op {
            Op::Discard { offset, len } => metadata::zero(&self.0, offset, len, Zeroing::Discard),
            Op::WriteZeroes { offset, len, unmap: true } => metadata::zero(&self.0, offset, len, Zeroing::Unmap),
            Op::WriteZeroes { offset, len, unmap: false } => metadata::zero(&self.0, offset, len, Zeroing::Allocated),
            Op::Read { .. } | Op::Write { .. } | Op::Flush => -libc::EINVAL,
        };
        self.write_back(r)
    }

    fn sync_data(&self) -> io::Result<()> {
        match metadata::flush(&self.0) {
            r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
            _ => Ok(()),
        }
    }

    fn hole_end(&self, from: u64, limit: u64) -> u64 {
        self.walk(from, limit, true)
    }

    fn data_end(&self, from: u64, limit: u64) -> u64 {
        self.walk(from, limit, false)
    }
}
