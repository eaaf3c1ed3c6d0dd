//! The base image: opened read-only, checked, and identified; and, for
//! `--base-io direct`, opened once more for reads that bypass the page
//! cache (`DirectBase`).
//!
//! An overlay records the identity of the base it was made for, so that it is
//! never laid over another file: the size, the modification time, and a
//! fingerprint of sampled contents that also catches a copy that was changed.
//!
//! What is detected: a base of another size; a regular file written since
//! (its mtime moves, unless the writer set it back); contents that differ in
//! any sampled 4 KiB: 16 samples spread over a regular file, 1024 over a
//! block device, which has no mtime (every 1/1023 of the device). Not
//! detected: a block device (or a file whose mtime was restored) changed
//! only between the samples — a few blocks rewritten in place by a file
//! system mounted from it, say. Never write a base while an overlay of it
//! is in use or kept.

use crate::engine::overlay::{Backing, BackingKind};
use crate::engine::storage::Storage;
use crate::engine::{Error, IoContext};
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::str::FromStr;

/// What identifies a base for an overlay header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseIdentity {
    pub(crate) size: u64,
    /// Modification time in nanoseconds; 0 for a block device.
    pub(crate) mtime_ns: u64,
    /// FNV-1a over the size and samples of 4 KiB spread over the file:
    /// [`FILE_SAMPLES`] for a file, [`DEVICE_SAMPLES`] for a block device.
    pub(crate) fingerprint: u64,
    /// For a block device, the fingerprint of [`FILE_SAMPLES`] samples that
    /// overlays made before block devices were sampled more closely carry;
    /// such an overlay is still accepted. Never stored.
    pub(crate) legacy_fingerprint: Option<u64>,
}

/// Samples of a regular file, whose mtime also tells changes.
pub(crate) const FILE_SAMPLES: u64 = 16;
/// Samples of a block device, which has no mtime: 4 MiB read at `add`.
pub(crate) const DEVICE_SAMPLES: u64 = 1024;
const SAMPLE_LEN: usize = 4096;

impl BaseIdentity {
    /// Reads the samples from `base` (of `size` bytes) to identify it; a
    /// block device (`mtime_ns` 0) gets [`DEVICE_SAMPLES`].
    pub fn compute(base: &dyn Storage, size: u64, mtime_ns: u64) -> Result<BaseIdentity, Error> {
        let (fingerprint, legacy_fingerprint) = if mtime_ns == 0 {
            (
                fingerprint(base, size, DEVICE_SAMPLES)?,
                Some(fingerprint(base, size, FILE_SAMPLES)?),
            )
        } else {
            (fingerprint(base, size, FILE_SAMPLES)?, None)
        };
        Ok(BaseIdentity {
            size,
            mtime_ns,
            fingerprint,
            legacy_fingerprint,
        })
    }

    /// The identity of a remote object (`--base URL`): its size, and a
    /// fingerprint of its URL and version (ETag, else Last-Modified), so
    /// that an overlay is never laid over another object or a replaced one.
    /// No mtime: the version stands for it.
    pub fn remote(url: &str, id: &crate::remote::Identity) -> BaseIdentity {
        let mut h = Fnv::default();
        h.write(b"remote\0");
        h.write(url.as_bytes());
        h.write(b"\0");
        h.write(id.etag.as_deref().unwrap_or("").as_bytes());
        h.write(b"\0");
        h.write(id.last_modified.as_deref().unwrap_or("").as_bytes());
        h.write(&id.size.to_le_bytes());
        BaseIdentity {
            size: id.size,
            mtime_ns: 0,
            fingerprint: h.finish(),
            legacy_fingerprint: None,
        }
    }

    /// Whether an overlay that recorded `fingerprint` was made for a base
    /// with these contents.
    pub(crate) fn fingerprint_matches(&self, fingerprint: u64) -> bool {
        fingerprint == self.fingerprint || self.legacy_fingerprint == Some(fingerprint)
    }
}

/// The page size the page cache is judged in.
const PAGE: u64 = 4096;

/// Whether the page at `page` of `base` is in the page cache (`cachestat`,
/// Linux 6.5); false where that cannot be told, so that a sample's page is
/// then dropped as if it had been brought in.
fn page_cached(base: &dyn Storage, page: u64) -> bool {
    base.as_file()
        .is_some_and(|f| crate::sys::cached_pages(f, page, PAGE).is_ok_and(|n| n == 1))
}

/// FNV-1a over `size` and `samples` samples spread evenly over the base.
fn fingerprint(base: &dyn Storage, size: u64, samples: u64) -> Result<u64, Error> {
    let mut h = Fnv::default();
    h.write(&size.to_le_bytes());
    let mut buf = vec![0u8; SAMPLE_LEN];
    let span = size.saturating_sub(SAMPLE_LEN as u64);
    for i in 0..samples {
        let off = (span / (samples - 1) * i) & !511;
        let n = (SAMPLE_LEN as u64).min(size - off) as usize;
        // The samples are not the device's data to serve: leave the page
        // cache (and what it says the reader will read) as it was. A page
        // the sample brings in is dropped again; one cached before (by
        // another device over this base, or any reader of it) stays.
        // DONTNEED drops only whole pages, so each page the sample touches
        // is judged on its own.
        let pages =
            (off & !(PAGE - 1)..(off + n as u64).next_multiple_of(PAGE)).step_by(PAGE as usize);
        let cached_before: Vec<u64> = pages.clone().filter(|&p| page_cached(base, p)).collect();
        base.read_at(&mut buf[..n], off)
            .ctx(|| format!("reading the base at {off}"))?;
        h.write(&buf[..n]);
        for p in pages.filter(|p| !cached_before.contains(p)) {
            let _ = base.dont_need(p, PAGE);
        }
    }
    Ok(h.finish())
}

/// 64-bit FNV-1a: a stable hash for header checksums and fingerprints.
#[derive(Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }

    pub(crate) fn finish(&self) -> u64 {
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

impl Base {
    /// What an overlay made over this base, opened at `path`, records as
    /// its backing.
    pub fn backing(&self, path: &Path) -> Result<Backing, Error> {
        let kind = if self.is_block_device {
            BackingKind::BlockDevice
        } else {
            BackingKind::File
        };
        Backing::new(kind, path)
    }
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
        (meta.len(), mtime_ns(&meta))
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

/// A file's modification time in nanoseconds, as identities record it.
pub(crate) fn mtime_ns(meta: &std::fs::Metadata) -> u64 {
    (meta.mtime() as u64).wrapping_mul(1_000_000_000) + meta.mtime_nsec() as u64
}

/// How the data path reads base blocks that the page cache does not hold
/// (`add --base-io`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum BaseIo {
    /// Through the page cache, which keeps what was read.
    #[default]
    Cached,
    /// Around it (O_DIRECT), as kernel loop with direct I/O does: a reader
    /// that caches for itself (a guest, a database) does not have every
    /// base block it reads cached twice. What the page cache already holds
    /// (prefetched, or warmed by a cache request) is still read from there.
    Direct,
}

impl FromStr for BaseIo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cached" => Ok(BaseIo::Cached),
            "direct" => Ok(BaseIo::Direct),
            _ => Err(format!("'{s}' is not a base I/O mode (cached, direct)")),
        }
    }
}

/// What O_DIRECT reads of the base must be aligned to, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DirectAlign {
    /// The address of the memory read into.
    pub(crate) mem: u64,
    /// The file offset and the length.
    pub(crate) io: u64,
}

impl DirectAlign {
    /// Whether a read of `len` bytes at `pos` into memory at `addr` can
    /// bypass the page cache. `addr` is `None` for memory this process
    /// cannot see (a request's own pages with zero copy): of those only
    /// 512-byte alignment is sure (the device's logical block size), of
    /// their address and of each piece's length, so a base that asks more
    /// is read through the page cache.
    pub(crate) fn fits(&self, pos: u64, len: u64, addr: Option<usize>) -> bool {
        let mem = match addr {
            Some(a) => (a as u64).is_multiple_of(self.mem),
            None => self.mem <= 512 && self.io <= 512,
        };
        mem && pos.is_multiple_of(self.io) && len.is_multiple_of(self.io) && len > 0
    }
}

/// The base opened once more with O_DIRECT (`--base-io direct`).
pub struct DirectBase {
    pub(crate) file: File,
    pub(crate) align: DirectAlign,
}

impl DirectBase {
    /// Opens the base at `path` for direct reads; an error says why the
    /// base cannot be read so (its file system lacks O_DIRECT).
    pub(crate) fn open(path: &Path) -> Result<DirectBase, Error> {
        use std::os::unix::fs::OpenOptionsExt;
        let shown = path.display();
        let unsupported = || {
            Error::invalid(format!(
                "base {shown}: its file system cannot read it with O_DIRECT \
                 (--base-io direct); use --base-io cached"
            ))
        };
        let file = match File::options()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Err(unsupported()),
            Err(e) => {
                return Err(Error::Io {
                    context: format!("opening base {shown} with O_DIRECT"),
                    source: e,
                });
            }
        };
        // A file system that does not say what it needs gets the common
        // worst case: 4 KiB pages, 4 KiB sectors.
        let align = match crate::sys::direct_io_align(&file) {
            Ok(Some((0, _) | (_, 0))) => return Err(unsupported()),
            Ok(Some((mem, io))) => DirectAlign { mem, io },
            Ok(None) | Err(_) => DirectAlign {
                mem: 4096,
                io: 4096,
            },
        };
        Ok(DirectBase { file, align })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_device_is_sampled_closely() {
        use crate::engine::storage::SimDisk;
        // A change in the 17th of a block device's samples, about 1 MiB in:
        // between the first two of the 16 samples of a file.
        let size = 64u64 << 20;
        let at = ((size - 4096) / (DEVICE_SAMPLES - 1) * 16) & !511;
        let disk = SimDisk::new(vec![0u8; size as usize]);
        let file = BaseIdentity::compute(&disk, size, 5).unwrap();
        let dev = BaseIdentity::compute(&disk, size, 0).unwrap();
        disk.write_at(&[1], at).unwrap();
        let file2 = BaseIdentity::compute(&disk, size, 5).unwrap();
        let dev2 = BaseIdentity::compute(&disk, size, 0).unwrap();
        assert_eq!(file.fingerprint, file2.fingerprint, "files rely on mtime");
        assert_ne!(
            dev.fingerprint, dev2.fingerprint,
            "block device change not seen"
        );
        assert!(!dev2.fingerprint_matches(dev.fingerprint));
        // An overlay made with the 16 samples of before is still accepted.
        assert!(dev.fingerprint_matches(file.fingerprint));
        assert_eq!(file.legacy_fingerprint, None);
    }

    /// Opening a base leaves its page cache as it found it: the pages of
    /// the identity samples that were cached (by another device over the
    /// same base, say) stay, and those the samples brought in go again.
    #[test]
    fn the_identity_samples_leave_the_page_cache_as_it_was() {
        use crate::sys::{cached_pages, fadvise};
        use std::io::Write;
        let dir = [std::env::temp_dir(), std::env::current_dir().unwrap()]
            .into_iter()
            .find(|d| !crate::sys::is_tmpfs(&crate::test_files::unlinked(d, "samples-probe")))
            .expect("no directory off tmpfs: the page cache cannot be tested");
        let mut f = crate::test_files::unlinked(&dir, "samples");
        // 16 MiB: the device samples, about 16 KiB apart, each touch two
        // pages.
        let size = 16u64 << 20;
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        let pages = size / PAGE;
        // As `open` leaves a base: no readahead of the kernel's own.
        fadvise(&f, 0, 0, libc::POSIX_FADV_RANDOM).unwrap();
        fadvise(&f, 0, size, libc::POSIX_FADV_DONTNEED).unwrap();
        let cold = cached_pages(&f, 0, size).expect("cachestat (Linux 6.5)");
        assert_eq!(cold, 0, "the file stayed cached: the case cannot be made");
        let id = BaseIdentity::compute(&f, size, 0).unwrap();
        assert_eq!(
            cached_pages(&f, 0, size).unwrap(),
            0,
            "the samples stayed cached"
        );
        let mut all = vec![0u8; size as usize];
        f.read_at(&mut all, 0).unwrap();
        assert_eq!(cached_pages(&f, 0, size).unwrap(), pages);
        let again = BaseIdentity::compute(&f, size, 0).unwrap();
        assert_eq!(
            cached_pages(&f, 0, size).unwrap(),
            pages,
            "the samples dropped pages cached before them"
        );
        assert_eq!(id, again);
    }

    #[test]
    fn base_io_parses_its_two_modes_only() {
        assert_eq!("cached".parse::<BaseIo>(), Ok(BaseIo::Cached));
        assert_eq!("direct".parse::<BaseIo>(), Ok(BaseIo::Direct));
        let e = "sometimes".parse::<BaseIo>().unwrap_err();
        assert!(e.contains("cached, direct"), "{e}");
    }

    #[test]
    fn direct_reads_need_aligned_offset_length_and_memory() {
        let a = DirectAlign { mem: 512, io: 4096 };
        assert!(a.fits(8192, 4096, Some(0x1000)));
        assert!(a.fits(8192, 4096, Some(0x1200)));
        assert!(!a.fits(8192, 4096, Some(0x1100)), "memory off 512");
        assert!(!a.fits(8192 + 512, 4096, Some(0x1000)), "offset off 4K");
        assert!(!a.fits(8192, 4096 + 512, Some(0x1000)), "length off 4K");
        assert!(!a.fits(8192, 0, Some(0x1000)), "nothing to read");
        // A request's own pages (zero copy) are only sure to be 512-byte
        // aligned, in address and in the length of each piece.
        let sector = DirectAlign { mem: 512, io: 512 };
        assert!(sector.fits(0, 4096, None));
        assert!(!a.fits(0, 4096, None));
        assert!(!DirectAlign { mem: 4096, io: 512 }.fits(0, 4096, None));
    }

    #[test]
    fn a_file_opens_for_direct_reads_or_names_the_way_out() {
        // On a file system with direct I/O the open works and the
        // alignment is a power of two; on one without (tmpfs before 6.6)
        // the error names the option to use instead.
        let dir = std::env::temp_dir();
        let p = dir.join(format!("ublk-cow-direct-{}", std::process::id()));
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        match DirectBase::open(&p) {
            Ok(d) => {
                assert!(d.align.mem.is_power_of_two() && d.align.io.is_power_of_two());
                assert!(d.align.io >= 512 && d.align.io <= 65536, "{:?}", d.align);
            }
            Err(e) => assert!(e.to_string().contains("--base-io cached"), "{e}"),
        }
        std::fs::remove_file(&p).unwrap();
    }
}
