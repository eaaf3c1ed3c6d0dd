//! The base image: opened read-only, checked, and identified.
//!
//! An overlay records the identity of the base it was made for, so that it is
//! never laid over another file: the size, the modification time, and a
//! fingerprint of sampled contents that also catches a copy that was changed.

use crate::engine::storage::Storage;
use crate::engine::{Error, IoContext};
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// What identifies a base for an overlay header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseIdentity {
    pub size: u64,
    /// Modification time in nanoseconds; 0 for a block device.
    pub mtime_ns: u64,
    /// FNV-1a over the size and 16 samples of 4 KiB spread over the file.
    pub fingerprint: u64,
}

const SAMPLES: u64 = 16;
const SAMPLE_LEN: usize = 4096;

impl BaseIdentity {
    /// Reads the samples from `base` (of `size` bytes) to identify it.
    pub fn compute(base: &dyn Storage, size: u64, mtime_ns: u64) -> Result<BaseIdentity, Error> {
        let mut h = Fnv::default();
        h.write(&size.to_le_bytes());
        let mut buf = vec![0u8; SAMPLE_LEN];
        let span = size.saturating_sub(SAMPLE_LEN as u64);
        for i in 0..SAMPLES {
            let off = (span / (SAMPLES - 1) * i) & !511;
            let n = (SAMPLE_LEN as u64).min(size - off) as usize;
            base.read_at(&mut buf[..n], off)
                .ctx(|| format!("reading the base at {off}"))?;
            h.write(&buf[..n]);
        }
        Ok(BaseIdentity {
            size,
            mtime_ns,
            fingerprint: h.finish(),
        })
    }
}

/// 64-bit FNV-1a: a stable hash for header checksums and fingerprints.
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// An opened base: the file (read-only), its size and identity.
pub struct Base {
    pub file: File,
    pub size: u64,
    pub identity: BaseIdentity,
    pub is_block_device: bool,
}

/// Opens `path` read-only (with `POSIX_FADV_RANDOM`) and checks that it can be a base: a regular file or
/// block device, non-empty, its size a multiple of 512.
pub fn open_base(path: &Path) -> Result<Base, Error> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::invalid(format!("base {shown} does not exist")),
        _ => Error::Io {
            context: format!("base {shown}"),
            source: e,
        },
    })?;
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(Error::invalid(format!("base {shown} is a directory")));
    }
    if !ft.is_file() && !ft.is_block_device() {
        return Err(Error::invalid(format!(
            "base {shown} is neither a regular file nor a block device"
        )));
    }
    let file = File::open(path).ctx(|| format!("opening base {shown}"))?;
    // No kernel readahead on the base (see `engine::readahead`), from the
    // first read on: even the identity samples below would otherwise leave
    // readahead marks in the page cache, and a later read that reaches a
    // mark starts the kernel's asynchronous readahead regardless.
    let _ = crate::sys::fadvise(&file, 0, 0, libc::POSIX_FADV_RANDOM);
    let (size, mtime_ns) = if ft.is_block_device() {
        (
            crate::sys::block_device_size(&file).ctx(|| format!("size of {shown}"))?,
            0,
        )
    } else {
        (
            meta.len(),
            (meta.mtime() as u64).wrapping_mul(1_000_000_000) + meta.mtime_nsec() as u64,
        )
    };
    if size == 0 {
        return Err(Error::invalid(format!("base {shown} is empty (size 0)")));
    }
    if size % 512 != 0 {
        return Err(Error::invalid(format!(
            "base {shown} size {size} is not a multiple of 512 bytes"
        )));
    }
    let identity = BaseIdentity::compute(&file, size, mtime_ns)?;
    Ok(Base {
        file,
        size,
        identity,
        is_block_device: ft.is_block_device(),
    })
}
