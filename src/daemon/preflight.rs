//! Start-time checks that protect an operator from a typo: everything here only looks (and
//! reads a header); nothing is created, truncated or unlinked.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::block::probe;

/// What a path names, for telling whether two options point at the same storage.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Identity {
    /// A block device, by device number (two nodes for one device compare equal).
    Device(u64),
    /// An existing file, by filesystem and inode (links of any kind compare equal).
    File(u64, u64),
    /// A path that does not exist yet, made absolute through its existing parent.
    Missing(PathBuf),
}

fn identity(path: &Path) -> io::Result<Identity> {
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => Ok(Identity::Device(m.rdev())),
        Ok(m) => Ok(Identity::File(m.dev(), m.ino())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let parent = parent.canonicalize().unwrap_or(parent);
            Ok(Identity::Missing(parent.join(path.file_name().unwrap_or_default())))
        }
        Err(e) => Err(e),
    }
}

/// Refuses two options that name the same file or device: `(option, path)` pairs, compared
/// after following links (symbolic and hard) and, for block devices, by device number.
pub fn distinct_files(files: &[(&str, &Path)]) -> Result<(), String> {
    let mut seen: Vec<(&str, &Path, Identity)> = Vec::new();
    for (opt, path) in files {
        let id = identity(path).map_err(|e| format!("{opt}: cannot examine {}: {e}", path.display()))?;
        if let Some((other, other_path, _)) = seen.iter().find(|(_, _, i)| *i == id) {
            return Err(format!(
                "{opt} {} and {other} {} are the same file or device; each option needs its own",
                path.display(),
                other_path.display()
            ));
        }
        seen.push((opt, path, id));
    }
    Ok(())
}

/// What an existing image looks like before colo-blk touches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    /// Its size in bytes (of the device, for a block device).
    pub size: u64,
    /// The format its header announces, if not raw.
    pub format: Option<&'static str>,
}

/// Reads the size and the format header of an existing image (read-only), or `None` if it
/// does not exist.
pub fn examine_image(path: &Path) -> io::Result<Option<ImageFacts>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let size = if meta.file_type().is_block_device() {
        let mut f = &file;
        io::Seek::seek(&mut f, io::SeekFrom::End(0))?
    } else {
        meta.len()
    };
    Ok(Some(ImageFacts { size, format: probe::detect(&file)? }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_file_through_links_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        std::fs::write(&a, b"x").unwrap();
        let hard = dir.path().join("hard.img");
        std::fs::hard_link(&a, &hard).unwrap();
        let soft = dir.path().join("soft.img");
        std::os::unix::fs::symlink(&a, &soft).unwrap();
        let b = dir.path().join("b.img");
        assert!(distinct_files(&[("--disk", &a), ("--active", &b), ("--hidden", &dir.path().join("c"))]).is_ok());
        for twin in [&a, &hard, &soft] {
            let e = distinct_files(&[("--disk", &a), ("--active", twin)]).unwrap_err();
            assert!(e.contains("--active") && e.contains("--disk"), "{e}");
        }
        // Two missing paths spelled differently.
        let e = distinct_files(&[("--active", &b), ("--hidden", &dir.path().join(".").join("b.img"))]).unwrap_err();
        assert!(e.contains("same file"), "{e}");
    }
}
