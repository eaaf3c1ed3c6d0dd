//! The overlay file's on-disk format.
//!
//! ```text
//! 0            header, 4 KiB (little endian), format version 2:
//!                0  magic "UBLKCOW1"        8  version (2)
//!               12  flags (bit 0: clean, bit 1: failed, bit 2: frozen,
//!                   bit 3: a commit into the backing is in progress,
//!                   bit 4: a commit from the overlay above into this
//!                   one is in progress)
//!               16  block size             20  backing kind (0 unrecorded,
//!                                              1 file, 2 block device,
//!                                              3 overlay)
//!               24  virtual size
//!               32  backing size, 40 backing mtime, 48 backing fingerprint
//!                   (the backing's identity, `engine::base`)
//!               56  map offset, 64 map bytes, 72 data offset
//!               80  backing path length (u32), 84 zero
//!               88  backing path (absolute, at most 3992 bytes), zeros
//!             4080  the overlay file's mtime before its last commit began
//!                   (0: none), restored when the commit ends
//!             4088  FNV-1a checksum of bytes 0..4088
//! 4 KiB        the block-state map, 2 bits per block, whole 4 KiB pages,
//!              allocated when the overlay is made (a flush never needs space)
//! data offset  the data area: block i at data offset + i * block size,
//!              sparse (only written blocks take space)
//! ```
//!
//! The backing is the file below the overlay: a raw image, a block device,
//! or another overlay (a layer). Its path is recorded as it was given, made
//! absolute; its identity is checked when the overlay is used over it.
//! "Unrecorded" is an overlay made without a path: its backing is what
//! `add --base` names.
//!
//! Format version 1 (the first) has the same fields up to 80, its checksum
//! at 80 over bytes 0..80, no frozen flag and no backing path; its map never
//! holds the `Copied` state. It is read as an overlay with an unrecorded
//! backing, and the first write of its header (opening it for a device)
//! writes version 2.
//!
//! Durability order on flush (see [`crate::engine::device`]): data first,
//! then the map pages, then durable again. The clean flag is cleared (and
//! made durable) before the first write is served and set by a clean close,
//! so an overlay that was not closed cleanly is known on the next open. The
//! failed flag is set when a flush failed (its map is then as of its last
//! good flush, and data written after may be lost); a clean close clears it.
//! The frozen flag makes the overlay a layer: read-only from then on, its
//! header included (nothing clears it). `commit` (`engine::commit`) is the
//! one writer of a frozen overlay: it empties its map into its backing, with
//! the committing flag set for the whole of it, and a layer below that it
//! writes into has the receiving flag while it is written (it then reads
//! neither as before nor as after).

use crate::engine::base::{BaseIdentity, Fnv};
use crate::engine::geometry::Geometry;
use crate::engine::map::{BlockMap, BlockState, MAP_PAGE, map_bytes};
use crate::engine::storage::Storage;
use crate::engine::{Error, IoContext};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub(crate) const MAGIC: &[u8; 8] = b"UBLKCOW1";
/// The format version this build writes.
pub const VERSION: u32 = 2;
pub(crate) const HEADER_SIZE: u64 = 4096;
/// Version 1: the checksum's offset, and the bytes the header used.
const V1_SUM_AT: usize = 80;
/// Version 2: where the backing path starts, where the mtime a commit
/// restores is, and where the checksum is.
const PATH_AT: usize = 88;
const COMMIT_MTIME_AT: usize = V2_SUM_AT - 8;
const V2_SUM_AT: usize = HEADER_SIZE as usize - 8;
/// The longest backing path an overlay header holds, in bytes.
pub const MAX_BACKING_PATH: usize = COMMIT_MTIME_AT - PATH_AT;
const FLAG_CLEAN: u32 = 1;
const FLAG_FAILED: u32 = 2;
const FLAG_FROZEN: u32 = 4;
const FLAG_COMMITTING: u32 = 8;
const FLAG_RECEIVING: u32 = 16;
/// Why a frozen overlay is not written.
const FROZEN: &str =
    "the overlay is frozen (a layer): it is read-only; put a new overlay on top of it";
/// Why an overlay whose commit was stopped is not used.
pub(crate) const STOPPED_COMMIT: &str = "a commit of the overlay into its backing was stopped \
     midway: run `ublk-cow commit` on it again to finish it";
/// Why a layer that a stopped commit was writing into is not used.
pub(crate) const STOPPED_RECEIVING: &str = "a commit of the overlay above it into it was \
     stopped midway, and it holds part of that overlay's blocks: run `ublk-cow commit` on \
     that overlay again to finish it";
/// The data area starts on a boundary of at least this, so that data I/O is
/// aligned for O_DIRECT and for large blocks.
const DATA_ALIGN: u64 = 1 << 20;

/// What kind of file an overlay's backing is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackingKind {
    /// Not recorded (format version 1, or made without a path): the backing
    /// is the base that `add --base` names.
    Unrecorded = 0,
    /// A raw image in a regular file.
    File = 1,
    /// A raw block device.
    BlockDevice = 2,
    /// Another overlay: a layer, frozen.
    Overlay = 3,
    /// A raw image in an object store or on an HTTP server: the path is
    /// its URL (`s3://BUCKET/KEY`, `https://HOST/PATH`).
    Remote = 4,
}

impl BackingKind {
    fn from_u32(v: u32) -> Option<BackingKind> {
        match v {
            0 => Some(BackingKind::Unrecorded),
            1 => Some(BackingKind::File),
            2 => Some(BackingKind::BlockDevice),
            3 => Some(BackingKind::Overlay),
            4 => Some(BackingKind::Remote),
            _ => None,
        }
    }

    /// How `info` and `map` name it.
    pub fn name(self) -> &'static str {
        match self {
            BackingKind::Unrecorded => "unrecorded",
            BackingKind::File => "file",
            BackingKind::BlockDevice => "block-device",
            BackingKind::Overlay => "overlay",
            BackingKind::Remote => "remote",
        }
    }
}

/// The file below an overlay, as its header records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backing {
    pub kind: BackingKind,
    /// Absolute (a URL for `Remote`); `None` exactly when the kind is
    /// `Unrecorded`.
    pub path: Option<PathBuf>,
}

impl Backing {
    /// No backing recorded.
    pub fn unrecorded() -> Backing {
        Backing {
            kind: BackingKind::Unrecorded,
            path: None,
        }
    }

    /// A backing of `kind` at `path`, made absolute; refused if the path
    /// does not fit in the header.
    pub fn new(kind: BackingKind, path: &Path) -> Result<Backing, Error> {
        let path = std::path::absolute(path).ctx(|| format!("{}", path.display()))?;
        let len = path.as_os_str().len();
        if len > MAX_BACKING_PATH {
            return Err(Error::invalid(format!(
                "the backing's path is too long to record ({len} bytes, an overlay \
                 holds at most {MAX_BACKING_PATH})"
            )));
        }
        if len == 0 || kind == BackingKind::Unrecorded {
            return Err(Error::invalid("a recorded backing needs a path and a kind"));
        }
        Ok(Backing {
            kind,
            path: Some(path),
        })
    }

    /// A remote base at `url`, recorded as given.
    pub fn remote(url: &str) -> Result<Backing, Error> {
        if url.len() > MAX_BACKING_PATH {
            return Err(Error::invalid(format!(
                "the base's URL is too long to record ({} bytes, an overlay holds at most \
                 {MAX_BACKING_PATH})",
                url.len()
            )));
        }
        Ok(Backing {
            kind: BackingKind::Remote,
            path: Some(PathBuf::from(url)),
        })
    }
}

/// The decoded header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// The format version it was read in (this build writes [`VERSION`]).
    pub(crate) version: u32,
    pub(crate) flags: u32,
    pub(crate) geometry: Geometry,
    /// The backing's identity when the overlay was made.
    pub(crate) base: BaseIdentity,
    pub(crate) backing: Backing,
    pub(crate) map_offset: u64,
    pub(crate) map_bytes: u64,
    pub(crate) data_offset: u64,
    /// The overlay file's modification time (ns) before its last commit
    /// began, to be restored when it ends; 0 when none was kept.
    pub(crate) commit_mtime_ns: u64,
}

impl Header {
    fn new(geometry: Geometry, base: BaseIdentity, backing: Backing) -> Header {
        let base = BaseIdentity {
            legacy_fingerprint: None,
            ..base
        };
        let (map_offset, map_bytes, data_offset) = layout(geometry);
        Header {
            version: VERSION,
            flags: 0,
            geometry,
            base,
            backing,
            map_offset,
            map_bytes,
            data_offset,
            commit_mtime_ns: 0,
        }
    }

    pub(crate) fn clean(&self) -> bool {
        self.flags & FLAG_CLEAN != 0
    }

    /// A flush of a device over this overlay failed (see the module doc).
    pub(crate) fn failed(&self) -> bool {
        self.flags & FLAG_FAILED != 0
    }

    /// A layer: read-only for good.
    pub(crate) fn frozen(&self) -> bool {
        self.flags & FLAG_FROZEN != 0
    }

    /// A commit of this overlay into its backing began and has not ended
    /// (`engine::commit`).
    pub(crate) fn committing(&self) -> bool {
        self.flags & FLAG_COMMITTING != 0
    }

    /// A commit from the overlay above into this layer was writing into it
    /// and has not ended: it holds part of that overlay's blocks.
    pub(crate) fn receiving(&self) -> bool {
        self.flags & FLAG_RECEIVING != 0
    }

    /// Why this overlay is not used (read, served, frozen, pushed, or made
    /// a backing) until a stopped commit is run again: a commit of it, or
    /// one into it, stopped midway.
    pub(crate) fn stopped_commit(&self) -> Option<&'static str> {
        if self.committing() {
            Some(STOPPED_COMMIT)
        } else if self.receiving() {
            Some(STOPPED_RECEIVING)
        } else {
            None
        }
    }

    /// Where the data area ends: the length of a whole overlay.
    pub(crate) fn end(&self) -> u64 {
        self.data_offset + self.geometry.size()
    }

    /// The header in format version 2.
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_SIZE as usize);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.geometry.block_size().to_le_bytes());
        b.extend_from_slice(&(self.backing.kind as u32).to_le_bytes());
        for v in [
            self.geometry.size(),
            self.base.size,
            self.base.mtime_ns,
            self.base.fingerprint,
            self.map_offset,
            self.map_bytes,
            self.data_offset,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let path = self
            .backing
            .path
            .as_deref()
            .map_or(&[][..], |p| p.as_os_str().as_bytes());
        debug_assert!(path.len() <= MAX_BACKING_PATH);
        b.extend_from_slice(&(path.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        debug_assert_eq!(b.len(), PATH_AT);
        b.extend_from_slice(path);
        b.resize(COMMIT_MTIME_AT, 0);
        b.extend_from_slice(&self.commit_mtime_ns.to_le_bytes());
        let mut h = Fnv::default();
        h.write(&b);
        b.extend_from_slice(&h.finish().to_le_bytes());
        debug_assert_eq!(b.len(), HEADER_SIZE as usize);
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Header, Error> {
        if b.len() < HEADER_SIZE as usize || &b[0..8] != MAGIC {
            return Err(Error::corrupt("not a ublk-cow overlay (bad magic)"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let version = u32_at(8);
        let sum_at = match version {
            1 => V1_SUM_AT,
            VERSION => V2_SUM_AT,
            _ => {
                return Err(Error::corrupt(format!(
                    "overlay format version {version} is not supported (this build reads 1 \
                     and {VERSION})"
                )));
            }
        };
        let mut h = Fnv::default();
        h.write(&b[..sum_at]);
        if h.finish() != u64_at(sum_at) {
            return Err(Error::corrupt(
                "overlay header checksum mismatch: the header is corrupt",
            ));
        }
        let geometry = Geometry::new(u64_at(24), u32_at(16))
            .map_err(|e| Error::corrupt(format!("overlay header: {e}")))?;
        let backing = if version == 1 {
            Backing::unrecorded()
        } else {
            let kind = BackingKind::from_u32(u32_at(20)).ok_or_else(|| {
                Error::corrupt(format!(
                    "overlay header: unknown backing kind {}",
                    u32_at(20)
                ))
            })?;
            let len = u32_at(80) as usize;
            if len > MAX_BACKING_PATH || (len == 0) != (kind == BackingKind::Unrecorded) {
                return Err(Error::corrupt(
                    "overlay header: its backing's path and kind disagree",
                ));
            }
            Backing {
                kind,
                path: (len > 0)
                    .then(|| PathBuf::from(OsStr::from_bytes(&b[PATH_AT..PATH_AT + len]))),
            }
        };
        let flags = match version {
            1 => u32_at(12) & (FLAG_CLEAN | FLAG_FAILED),
            _ => u32_at(12),
        };
        let header = Header {
            version,
            flags,
            geometry,
            base: BaseIdentity {
                size: u64_at(32),
                mtime_ns: u64_at(40),
                fingerprint: u64_at(48),
                legacy_fingerprint: None,
            },
            backing,
            map_offset: u64_at(56),
            map_bytes: u64_at(64),
            data_offset: u64_at(72),
            commit_mtime_ns: if version == 1 {
                0
            } else {
                u64_at(COMMIT_MTIME_AT)
            },
        };
        if (header.map_offset, header.map_bytes, header.data_offset) != layout(geometry) {
            return Err(Error::corrupt("overlay header has an inconsistent layout"));
        }
        Ok(header)
    }
}

/// Map offset, map bytes and data offset of an overlay of `geometry`.
fn layout(geometry: Geometry) -> (u64, u64, u64) {
    let map_offset = HEADER_SIZE;
    let map_len = map_bytes(geometry.blocks());
    let align = DATA_ALIGN.max(geometry.block_size() as u64);
    (
        map_offset,
        map_len,
        (map_offset + map_len).div_ceil(align) * align,
    )
}

/// How an existing overlay must match before it is used.
#[derive(Clone, Copy, Debug)]
pub struct OpenCheck<'a> {
    pub base: &'a BaseIdentity,
    /// The block size asked for on the command line, if any.
    pub block_size: Option<u32>,
    /// Accept a base whose mtime or fingerprint changed (size must match).
    pub force: bool,
}

/// An overlay file: the header and the storage behind it.
pub(crate) struct Overlay<S: Storage> {
    storage: S,
    /// The header as it was found at open (or made).
    header: Header,
    /// The flags the header on disk has now; held while the header is
    /// written, so that two writers of flags do not undo each other.
    flags: Mutex<u32>,
}

impl<S: Storage> Overlay<S> {
    /// Writes a fresh overlay into empty `storage`: header, zeroed map
    /// (allocated), sized data area (a hole), made durable. No backing path
    /// is recorded: see [`Overlay::create_backed`].
    pub(crate) fn create(
        storage: S,
        geometry: Geometry,
        base: &BaseIdentity,
    ) -> Result<Self, Error> {
        Self::create_backed(storage, geometry, base, Backing::unrecorded())
    }

    /// [`Overlay::create`], recording `backing` (whose identity is `base`).
    pub(crate) fn create_backed(
        storage: S,
        geometry: Geometry,
        base: &BaseIdentity,
        backing: Backing,
    ) -> Result<Self, Error> {
        let header = Header::new(geometry, *base, backing);
        storage
            .set_len(header.end())
            .ctx(|| "sizing the new overlay".into())?;
        let overlay = Overlay {
            storage,
            flags: Mutex::new(header.flags),
            header,
        };
        overlay.allocate_map()?;
        overlay
            .storage
            .write_at(&overlay.header.encode(), 0)
            .ctx(|| "writing the overlay header".into())?;
        overlay
            .storage
            .sync()
            .ctx(|| "syncing the new overlay".into())?;
        Ok(overlay)
    }

    /// Allocates the map's space, so that writing a map page at a flush
    /// cannot fail for lack of space (on a file system that writes in
    /// place; one that copies on write needs new space for any write).
    pub(crate) fn allocate_map(&self) -> Result<(), Error> {
        self.storage
            .allocate(self.header.map_offset, self.header.map_bytes)
            .ctx(|| {
                format!(
                    "allocating the overlay map ({} bytes)",
                    self.header.map_bytes
                )
            })
    }

    /// Opens an existing overlay to serve a device: checks it against the
    /// base and options, and refuses a frozen one (a layer is read-only;
    /// nothing of its file, not even the allocation of its map, may change).
    pub(crate) fn open(storage: S, check: OpenCheck<'_>) -> Result<Self, Error> {
        let overlay = Self::open_unchecked(storage)?;
        if overlay.header.frozen() {
            return Err(Error::invalid(FROZEN));
        }
        if let Some(why) = overlay.header.stopped_commit() {
            return Err(Error::invalid(why));
        }
        check_match(&overlay.header, &check)?;
        Ok(overlay)
    }

    /// Opens an existing overlay, checking its header and length but not
    /// its backing (the caller checks that, or only reads the overlay).
    pub(crate) fn open_unchecked(storage: S) -> Result<Self, Error> {
        let len = storage.len().ctx(|| "size of the overlay".into())?;
        if len < HEADER_SIZE {
            return Err(Error::corrupt(format!(
                "overlay is truncated ({len} bytes, less than its header)"
            )));
        }
        let mut raw = vec![0u8; HEADER_SIZE as usize];
        storage
            .read_at(&mut raw, 0)
            .ctx(|| "reading the overlay header".into())?;
        let header = Header::decode(&raw)?;
        if len < header.map_offset + header.map_bytes {
            return Err(Error::corrupt(format!(
                "overlay is truncated ({len} bytes, its map ends at {})",
                header.map_offset + header.map_bytes
            )));
        }
        if len < header.end() {
            return Err(Error::corrupt(format!(
                "overlay is truncated ({len} bytes, its data area ends at {}): \
                 an incomplete copy?",
                header.end()
            )));
        }
        Ok(Overlay {
            storage,
            flags: Mutex::new(header.flags),
            header,
        })
    }

    pub(crate) fn header(&self) -> &Header {
        &self.header
    }

    pub(crate) fn geometry(&self) -> Geometry {
        self.header.geometry
    }

    pub(crate) fn storage(&self) -> &S {
        &self.storage
    }

    pub(crate) fn into_storage(self) -> S {
        self.storage
    }

    /// Where device offset `off` lives in the data area.
    pub(crate) fn data_pos(&self, off: u64) -> u64 {
        self.header.data_offset + off
    }

    /// Loads the persisted map into `map`.
    pub(crate) fn read_map(&self, map: &BlockMap) -> Result<(), Error> {
        let mut raw = vec![0u8; self.header.map_bytes as usize];
        self.storage
            .read_at(&mut raw, self.header.map_offset)
            .ctx(|| "reading the overlay map".into())?;
        map.load(&raw)?;
        if self.header.version == 1
            && let Some(b) = map.find(BlockState::Copied)
        {
            return Err(Error::corrupt(format!(
                "the map has an invalid state for block {b} (format version 1 has no \
                 copied blocks)"
            )));
        }
        Ok(())
    }

    /// Writes map pages taken from [`BlockMap::take_dirty_pages`].
    pub(crate) fn write_map_pages(&self, pages: &[(u64, Vec<u8>)]) -> std::io::Result<()> {
        for (page, bytes) in pages {
            self.storage
                .write_at(bytes, self.header.map_offset + page * MAP_PAGE as u64)?;
        }
        Ok(())
    }

    /// File offset of map page `page`.
    pub(crate) fn map_page_pos(&self, page: u64) -> u64 {
        self.header.map_offset + page * MAP_PAGE as u64
    }

    /// Sets or clears the clean flag and makes the header durable.
    pub(crate) fn set_clean(&mut self, clean: bool) -> Result<(), Error> {
        self.header = self.write_clean_flag(clean)?;
        Ok(())
    }

    /// Freezes a clean overlay: it becomes a layer, read-only for good.
    pub(crate) fn freeze(&mut self) -> Result<(), Error> {
        if let Some(why) = self.header.stopped_commit() {
            return Err(Error::invalid(why));
        }
        if !self.header.clean() || self.header.failed() {
            return Err(Error::invalid(
                "the overlay was not closed cleanly: it is in use, or its device \
                 stopped without a clean close; only a clean overlay is frozen",
            ));
        }
        self.header = self.write_flags(FLAG_FROZEN, 0)?;
        Ok(())
    }

    /// Marks this overlay, whose device flushed it just now and writes it no
    /// more, clean and frozen in one durable header write: a live snapshot
    /// makes it a layer in place. From then on its header takes no write.
    pub(crate) fn seal(&self) -> Result<(), Error> {
        self.write_flags(FLAG_CLEAN | FLAG_FROZEN, FLAG_FAILED)
            .map(|_| ())
    }

    /// Writes the header with the clean flag set or cleared and makes it
    /// durable; returns the header written. Setting it (a clean close) also
    /// clears the failed flag. The header kept here still says how the
    /// overlay was found at open.
    pub(crate) fn write_clean_flag(&self, clean: bool) -> Result<Header, Error> {
        if clean {
            self.write_flags(FLAG_CLEAN, FLAG_FAILED)
        } else {
            self.write_flags(0, FLAG_CLEAN)
        }
    }

    /// Sets the failed flag (and clears the clean one), durably.
    pub(crate) fn mark_failed(&self) -> Result<(), Error> {
        self.write_flags(FLAG_FAILED, FLAG_CLEAN).map(|_| ())
    }

    /// Writes the header (in the current format version) with `set` set
    /// and `clear` cleared; refused for a frozen overlay.
    fn write_flags(&self, set: u32, clear: u32) -> Result<Header, Error> {
        let mut flags = self.flags.lock().unwrap_or_else(|e| e.into_inner());
        if *flags & FLAG_FROZEN != 0 {
            return Err(Error::invalid(FROZEN));
        }
        let mut h = self.header.clone();
        h.flags = (*flags | set) & !clear;
        self.write_header(&mut flags, h)
    }

    /// Writes `h` as the header (in the current format version) and makes
    /// it durable, with the file's modification time: an overlay made over
    /// a frozen one records that time; `flags` is the held lock on the
    /// flags on disk.
    fn write_header(&self, flags: &mut u32, mut h: Header) -> Result<Header, Error> {
        h.version = VERSION;
        self.storage
            .write_at(&h.encode(), 0)
            .ctx(|| "writing the overlay header".into())?;
        *flags = h.flags;
        self.storage
            .sync_all()
            .ctx(|| "syncing the overlay header".into())?;
        Ok(h)
    }

    /// Marks a commit into the backing as begun, durably, keeping `mtime_ns`
    /// (the file's modification time before it) to restore at its end. The
    /// one header write a frozen overlay takes, with [`Overlay::end_commit`].
    pub(crate) fn begin_commit(&mut self, mtime_ns: u64) -> Result<(), Error> {
        let mut flags = self.flags.lock().unwrap_or_else(|e| e.into_inner());
        let mut h = self.header.clone();
        h.flags = *flags | FLAG_COMMITTING;
        h.commit_mtime_ns = mtime_ns;
        self.header = self.write_header(&mut flags, h)?;
        Ok(())
    }

    /// Marks this layer, which a commit from the overlay above is about to
    /// write into, as receiving it (`on`), or as done with it, durably.
    /// Like [`Overlay::begin_commit`], a header write a frozen overlay
    /// takes; the header kept here is not changed. The modification time
    /// an earlier commit of this layer kept is dropped: the layer's
    /// contents change, and that commit, run again with nothing to merge,
    /// must not set its time back under the overlay above, which records
    /// the new one.
    pub(crate) fn set_receiving(&self, on: bool) -> Result<(), Error> {
        let mut flags = self.flags.lock().unwrap_or_else(|e| e.into_inner());
        let mut h = self.header.clone();
        h.commit_mtime_ns = 0;
        h.flags = if on {
            *flags | FLAG_RECEIVING
        } else {
            *flags & !FLAG_RECEIVING
        };
        self.write_header(&mut flags, h).map(|_| ())
    }

    /// Ends a commit: records `backing` as the backing's identity and clears
    /// the committing flag, durably (the mtime to restore is kept).
    pub(crate) fn end_commit(&mut self, backing: BaseIdentity) -> Result<(), Error> {
        let mut flags = self.flags.lock().unwrap_or_else(|e| e.into_inner());
        let mut h = self.header.clone();
        h.flags = *flags & !FLAG_COMMITTING;
        h.base = BaseIdentity {
            legacy_fingerprint: None,
            ..backing
        };
        self.header = self.write_header(&mut flags, h)?;
        Ok(())
    }
}

fn check_match(h: &Header, check: &OpenCheck<'_>) -> Result<(), Error> {
    if let Some(bs) = check.block_size
        && bs != h.geometry.block_size()
    {
        return Err(Error::mismatch(format!(
            "overlay has block size {} but --block-size {bs} was given",
            h.geometry.block_size()
        )));
    }
    let base = check.base;
    if base.size != h.base.size || base.size != h.geometry.size() {
        return Err(Error::mismatch(format!(
            "overlay was made for a base of {} bytes, this base has {} bytes",
            h.base.size, base.size
        )));
    }
    if check.force {
        return Ok(());
    }
    if !base.fingerprint_matches(h.base.fingerprint) {
        return Err(Error::mismatch(
            "overlay was made for another base (contents differ); --force uses it anyway",
        ));
    }
    if base.mtime_ns != h.base.mtime_ns {
        return Err(Error::mismatch(
            "base was modified after the overlay was made (mtime differs); --force uses it anyway",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::storage::SimDisk;

    fn id(fp: u64) -> BaseIdentity {
        BaseIdentity {
            size: 1 << 20,
            mtime_ns: 7,
            fingerprint: fp,
            legacy_fingerprint: None,
        }
    }

    #[test]
    fn header_round_trips_and_checks() {
        let geo = Geometry::new(1 << 20, 8192).unwrap();
        let o = Overlay::create(SimDisk::new(Vec::new()), geo, &id(1)).unwrap();
        let disk = SimDisk::new(o.storage().contents());
        let check = OpenCheck {
            base: &id(1),
            block_size: None,
            force: false,
        };
        let o2 = Overlay::open(disk, check).unwrap();
        assert_eq!(o2.header(), o.header());
        assert!(!o2.header().clean());
        let other = OpenCheck {
            base: &id(2),
            ..check
        };
        let disk = SimDisk::new(o.storage().contents());
        assert!(matches!(
            Overlay::open(disk, other),
            Err(Error::Mismatch(_))
        ));
        let bs = OpenCheck {
            block_size: Some(4096),
            ..check
        };
        let disk = SimDisk::new(o.storage().contents());
        assert!(matches!(Overlay::open(disk, bs), Err(Error::Mismatch(_))));
    }

    /// An overlay made over a layer records the layer's modification
    /// time: the header write that froze it must keep that time over a
    /// power cut, as every header write does.
    #[test]
    fn a_header_write_keeps_the_modification_time() {
        let geo = Geometry::new(1 << 20, 4096).unwrap();
        let mut o = Overlay::create(SimDisk::new(Vec::new()), geo, &id(1)).unwrap();
        o.set_clean(true).unwrap();
        o.freeze().unwrap();
        let frozen_at = o.storage().mtime();
        assert_eq!(o.storage().after_power_cut(|_| false).mtime(), frozen_at);
    }

    #[test]
    fn corrupt_and_truncated_headers_are_refused() {
        let geo = Geometry::new(1 << 20, 4096).unwrap();
        let o = Overlay::create(SimDisk::new(Vec::new()), geo, &id(1)).unwrap();
        let check = OpenCheck {
            base: &id(1),
            block_size: None,
            force: false,
        };
        let mut bytes = o.storage().contents();
        bytes[30] ^= 1;
        assert!(matches!(
            Overlay::open(SimDisk::new(bytes), check),
            Err(Error::Corrupt(_))
        ));
        let bytes = o.storage().contents()[..100].to_vec();
        assert!(matches!(
            Overlay::open(SimDisk::new(bytes), check),
            Err(Error::Corrupt(_))
        ));
        let bytes = o.storage().contents()[..5000].to_vec();
        assert!(matches!(
            Overlay::open(SimDisk::new(bytes), check),
            Err(Error::Corrupt(_))
        ));
    }

    #[test]
    fn an_overlay_shorter_than_its_data_area_is_refused() {
        // A copy cut short: header and map whole, half the data area.
        let geo = Geometry::new(1 << 20, 4096).unwrap();
        let o = Overlay::create(SimDisk::new(Vec::new()), geo, &id(1)).unwrap();
        let check = OpenCheck {
            base: &id(1),
            block_size: None,
            force: false,
        };
        let whole = o.storage().contents();
        assert_eq!(whole.len() as u64, o.header().end());
        let cut = whole[..(o.header().data_offset + (1 << 19)) as usize].to_vec();
        match Overlay::open(SimDisk::new(cut), check) {
            Err(Error::Corrupt(m)) => assert!(m.contains("truncated"), "{m}"),
            r => panic!(
                "a truncated overlay opened: {:?}",
                r.map(|o| o.header().clone())
            ),
        }
        assert!(Overlay::open(SimDisk::new(whole), check).is_ok());
    }

    /// An overlay as format version 1 wrote it: its header's fields up to
    /// byte 80, the checksum of those, block 0 written (its data 0x5a),
    /// block 1 zero.
    fn v1_overlay(flags: u32) -> Vec<u8> {
        let (size, bs) = (1u64 << 20, 4096u32);
        let map_bytes = 4096u64;
        let data_offset = 1u64 << 20;
        let mut b = Vec::new();
        b.extend_from_slice(b"UBLKCOW1");
        for v in [1u32, flags, bs, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let id = id(1);
        for v in [
            size,
            id.size,
            id.mtime_ns,
            id.fingerprint,
            4096,
            map_bytes,
            data_offset,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(b.len(), 80);
        let mut h = Fnv::default();
        h.write(&b);
        b.extend_from_slice(&h.finish().to_le_bytes());
        b.resize(4096, 0);
        b.resize((data_offset + size) as usize, 0);
        b[4096] = 0b10_01;
        b[data_offset as usize..data_offset as usize + 4096].fill(0x5a);
        b
    }

    #[test]
    fn a_version_1_overlay_is_read_and_its_next_header_is_version_2() {
        let check = OpenCheck {
            base: &id(1),
            block_size: None,
            force: false,
        };
        let o = Overlay::open(SimDisk::new(v1_overlay(FLAG_CLEAN)), check).unwrap();
        let h = o.header().clone();
        assert_eq!(h.version, 1);
        assert!(h.clean() && !h.frozen() && !h.failed());
        assert_eq!(h.backing, Backing::unrecorded());
        assert_eq!(h.geometry, Geometry::new(1 << 20, 4096).unwrap());
        assert_eq!(h.data_offset, 1 << 20);
        let map = BlockMap::new(crate::engine::map::MapMemory::heap(256), 256);
        o.read_map(&map).unwrap();
        assert_eq!(map.get(0), BlockState::Allocated);
        assert_eq!(map.get(1), BlockState::Zero);
        assert_eq!(map.get(2), BlockState::Unallocated);
        let mut data = [0u8; 4096];
        o.storage().read_at(&mut data, o.data_pos(0)).unwrap();
        assert!(data.iter().all(|&x| x == 0x5a));
        // Opened for a device, its header is written in version 2, the
        // same fields kept.
        o.write_clean_flag(false).unwrap();
        let again = Overlay::open(SimDisk::new(o.storage().contents()), check).unwrap();
        assert_eq!(again.header().version, VERSION);
        assert_eq!(
            Header {
                version: 1,
                flags: FLAG_CLEAN,
                ..again.header().clone()
            },
            h
        );
        // A version 1 map never holds the copied state; its header no
        // frozen flag.
        let mut bad = v1_overlay(0);
        bad[4096] = 0b11_00;
        let o = Overlay::open(SimDisk::new(bad), check).unwrap();
        let e = o.read_map(&map).unwrap_err();
        assert!(e.to_string().contains("invalid state for block 1"), "{e}");
        let o = Overlay::open(SimDisk::new(v1_overlay(FLAG_FROZEN | FLAG_CLEAN)), check).unwrap();
        assert!(!o.header().frozen());
        // A corrupt version 1 header is refused.
        let mut bad = v1_overlay(0);
        bad[40] ^= 1;
        assert!(matches!(
            Overlay::open(SimDisk::new(bad), check),
            Err(Error::Corrupt(_))
        ));
    }

    #[test]
    fn the_backing_is_recorded_and_a_long_path_refused() {
        let geo = Geometry::new(1 << 20, 4096).unwrap();
        let backing =
            Backing::new(BackingKind::Overlay, Path::new("/srv/images/golden.layer")).unwrap();
        let o =
            Overlay::create_backed(SimDisk::new(Vec::new()), geo, &id(3), backing.clone()).unwrap();
        let again = Overlay::open_unchecked(SimDisk::new(o.storage().contents())).unwrap();
        assert_eq!(again.header().backing, backing);
        assert_eq!(again.header().version, VERSION);
        assert_eq!(again.header().base, id(3));
        // Relative paths are made absolute.
        let rel = Backing::new(BackingKind::File, Path::new("base.img")).unwrap();
        let p = rel.path.unwrap();
        assert!(p.is_absolute() && p.ends_with("base.img"), "{p:?}");
        // The longest path fits; one byte more is refused with one line.
        let long = format!("/{}", "a".repeat(MAX_BACKING_PATH - 1));
        let b = Backing::new(BackingKind::File, Path::new(&long)).unwrap();
        let o = Overlay::create_backed(SimDisk::new(Vec::new()), geo, &id(3), b.clone()).unwrap();
        let again = Overlay::open_unchecked(SimDisk::new(o.storage().contents())).unwrap();
        assert_eq!(again.header().backing, b);
        let e = Backing::new(BackingKind::File, Path::new(&format!("{long}b"))).unwrap_err();
        assert!(e.to_string().contains("too long"), "{e}");
        // Path and kind must agree, under a valid checksum too.
        let mut bytes = o.storage().contents();
        bytes[20] = 0;
        let mut h = Fnv::default();
        h.write(&bytes[..V2_SUM_AT]);
        bytes[V2_SUM_AT..HEADER_SIZE as usize].copy_from_slice(&h.finish().to_le_bytes());
        let e = Overlay::open_unchecked(SimDisk::new(bytes)).err().unwrap();
        assert!(e.to_string().contains("disagree"), "{e}");
        // The checksum covers the path.
        let mut bytes = o.storage().contents();
        bytes[PATH_AT + 100] ^= 1;
        let e = Overlay::open_unchecked(SimDisk::new(bytes)).err().unwrap();
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn a_frozen_overlay_refuses_every_header_write() {
        let geo = Geometry::new(1 << 20, 4096).unwrap();
        let mut o = Overlay::create(SimDisk::new(Vec::new()), geo, &id(1)).unwrap();
        let e = o.freeze().unwrap_err();
        assert!(e.to_string().contains("not closed cleanly"), "{e}");
        o.set_clean(true).unwrap();
        o.freeze().unwrap();
        assert!(o.header().frozen() && o.header().clean());
        let disk = SimDisk::new(o.storage().contents());
        let mut again = Overlay::open_unchecked(disk).unwrap();
        assert!(again.header().frozen());
        let before = again.storage().contents();
        for e in [
            again.set_clean(false).unwrap_err(),
            again.mark_failed().unwrap_err(),
            again.freeze().unwrap_err(),
        ] {
            assert!(e.to_string().contains("frozen"), "{e}");
        }
        assert_eq!(
            again.storage().contents(),
            before,
            "a frozen overlay changed"
        );
        // Nor is it opened for a device.
        let check = OpenCheck {
            base: &id(1),
            block_size: None,
            force: false,
        };
        let e = Overlay::open(SimDisk::new(before), check).err().unwrap();
        assert!(e.to_string().contains("frozen"), "{e}");
    }

    #[test]
    fn the_map_region_is_allocated_when_the_overlay_is_made() {
        use std::os::unix::fs::MetadataExt;
        // 1 GiB of 4 KiB blocks: a 64 KiB map.
        let geo = Geometry::new(1 << 30, 4096).unwrap();
        let f = crate::test_files::unlinked(&std::env::temp_dir(), "map-alloc");
        let o = Overlay::create(f, geo, &id(1)).unwrap();
        let h = o.header().clone();
        assert_eq!(h.map_bytes, 64 << 10);
        let allocated = o.storage().metadata().unwrap().blocks() * 512;
        assert!(
            allocated >= HEADER_SIZE + h.map_bytes,
            "{allocated} bytes allocated, the header and map need {}",
            HEADER_SIZE + h.map_bytes
        );
    }
}
