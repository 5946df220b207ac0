//! Image format probing: recognises the headers of the image formats QEMU knows, so that a
//! qcow2 (or vmdk, vdi, ...) image is never served to a guest as raw bytes by mistake.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Image formats colo-blk can be told about with `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// The guest sees the file's bytes.
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

impl ImageFormat {
    /// The name used on the command line and by QEMU.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// Magic numbers at the start of an image, and the format they mean (QEMU's driver names).
const MAGICS: &[(&[u8], &str)] = &[
    (b"QFI\xfb", "qcow2"),
    (b"QED\0", "qed"),
    (b"KDMV", "vmdk"),
    (b"# Disk DescriptorFile", "vmdk"),
    (b"conectix", "vpc"),
    (b"vhdxfile", "vhdx"),
    (b"LUKS\xba\xbe", "luks"),
    (b"WithoutFreeSpace", "parallels"),
    (b"WithouFreSpacExt", "parallels"),
    (b"OOOM", "cloop"),
];

/// vdi keeps its signature at byte 64.
const VDI_SIGNATURE: (usize, [u8; 4]) = (64, [0x7f, 0x10, 0xda, 0xbe]);

/// Reads the first bytes of `file` and names the image format its header announces, or
/// `None` for anything else (served as raw, as QEMU's probe does). An image shorter than a
/// header is raw.
pub fn detect(file: &File) -> io::Result<Option<&'static str>> {
    let mut head = [0u8; 512];
    let mut n = 0;
    while n < head.len() {
        match file.read_at(&mut head[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let head = &head[..n];
    if let Some((_, name)) = MAGICS.iter().find(|(m, _)| head.starts_with(m)) {
        return Ok(Some(name));
    }
    let (at, sig) = VDI_SIGNATURE;
    if head.len() >= at + sig.len() && head[at..at + sig.len()] == sig {
        return Ok(Some("vdi"));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn recognises_headers_and_leaves_data_raw() {
        assert_eq!(detect(&file_with(b"QFI\xfb\0\0\0\x03")).unwrap(), Some("qcow2"));
        assert_eq!(detect(&file_with(b"KDMV....")).unwrap(), Some("vmdk"));
        let mut vdi = vec![0u8; 128];
        vdi[64..68].copy_from_slice(&VDI_SIGNATURE.1);
        assert_eq!(detect(&file_with(&vdi)).unwrap(), Some("vdi"));
        assert_eq!(detect(&file_with(&[0u8; 4096])).unwrap(), None);
        assert_eq!(detect(&file_with(b"QF")).unwrap(), None);
        assert_eq!(detect(&file_with(b"")).unwrap(), None);
    }
}
