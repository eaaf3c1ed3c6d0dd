//! The overlay file's on-disk format.
//!
//! ```text
//! 0            header, 4 KiB (little endian):
//!                magic "UBLKCOW1", version, flags (bit 0: clean, bit 1:
//!                failed), block size,
//!                virtual size, base size, base mtime, base fingerprint,
//!                map offset, map bytes, data offset, FNV-1a checksum
//! 4 KiB        the block-state map, 2 bits per block, whole 4 KiB pages,
//!              allocated when the overlay is made (a flush never needs space)
//! data offset  the data area: block i at data offset + i * block size,
//!              sparse (only written blocks take space)
//! ```
//!
//! Durability order on flush (see [`crate::engine::device`]): data first,
//! then the map pages, then durable again. The clean flag is cleared (and
//! made durable) before the first write is served and set by a clean close,
//! so an overlay that was not closed cleanly is known on the next open. The
//! failed flag is set when a flush failed (its map is then as of its last
//! good flush, and data written after may be lost); a clean close clears it.

use crate::engine::base::{BaseIdentity, Fnv};
use crate::engine::geometry::Geometry;
use crate::engine::map::{BlockMap, MAP_PAGE, map_bytes};
use crate::engine::storage::Storage;
use crate::engine::{Error, IoContext};
use std::sync::Mutex;

const MAGIC: &[u8; 8] = b"UBLKCOW1";
const VERSION: u32 = 1;
const HEADER_SIZE: u64 = 4096;
const HEADER_USED: usize = 88;
const FLAG_CLEAN: u32 = 1;
const FLAG_FAILED: u32 = 2;
/// The data area starts on a boundary of at least this, so that data I/O is
/// aligned for O_DIRECT and for large blocks.
const DATA_ALIGN: u64 = 1 << 20;

/// The decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) flags: u32,
    pub(crate) geometry: Geometry,
    pub(crate) base: BaseIdentity,
    pub(crate) map_offset: u64,
    pub(crate) map_bytes: u64,
    pub(crate) data_offset: u64,
}

impl Header {
    fn new(geometry: Geometry, base: BaseIdentity) -> Header {
        let base = BaseIdentity {
            legacy_fingerprint: None,
            ..base
        };
        let map_offset = HEADER_SIZE;
        let map_len = map_bytes(geometry.blocks());
        let align = DATA_ALIGN.max(geometry.block_size() as u64);
        Header {
            flags: 0,
            geometry,
            base,
            map_offset,
            map_bytes: map_len,
            data_offset: (map_offset + map_len).div_ceil(align) * align,
        }
    }

    pub(crate) fn clean(&self) -> bool {
        self.flags & FLAG_CLEAN != 0
    }

    /// A flush of a device over this overlay failed (see the module doc).
    pub(crate) fn failed(&self) -> bool {
        self.flags & FLAG_FAILED != 0
    }

    /// Where the data area ends: the length of a whole overlay.
    pub(crate) fn end(&self) -> u64 {
        self.data_offset + self.geometry.size()
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_SIZE as usize);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.geometry.block_size().to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
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
        let mut h = Fnv::default();
        h.write(&b);
        b.extend_from_slice(&h.finish().to_le_bytes());
        debug_assert_eq!(b.len(), HEADER_USED);
        b.resize(HEADER_SIZE as usize, 0);
        b
    }

    fn decode(b: &[u8]) -> Result<Header, Error> {
        if &b[0..8] != MAGIC {
            return Err(Error::corrupt("not a ublk-cow overlay (bad magic)"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let version = u32_at(8);
        if version != VERSION {
            return Err(Error::corrupt(format!(
                "overlay format version {version} is not supported (this build reads {VERSION})"
            )));
        }
        let mut h = Fnv::default();
        h.write(&b[..HEADER_USED - 8]);
        if h.finish() != u64_at(HEADER_USED - 8) {
            return Err(Error::corrupt(
                "overlay header checksum mismatch: the header is corrupt",
            ));
        }
        let geometry = Geometry::new(u64_at(24), u32_at(16))
            .map_err(|e| Error::corrupt(format!("overlay header: {e}")))?;
        let header = Header {
            flags: u32_at(12),
            geometry,
            base: BaseIdentity {
                size: u64_at(32),
                mtime_ns: u64_at(40),
                fingerprint: u64_at(48),
                legacy_fingerprint: None,
            },
            map_offset: u64_at(56),
            map_bytes: u64_at(64),
            data_offset: u64_at(72),
        };
        let expect = Header::new(geometry, header.base);
        if (header.map_offset, header.map_bytes, header.data_offset)
            != (expect.map_offset, expect.map_bytes, expect.data_offset)
        {
            return Err(Error::corrupt("overlay header has an inconsistent layout"));
        }
        Ok(header)
    }
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
    /// (allocated), sized data area (a hole), made durable.
    pub(crate) fn create(
        storage: S,
        geometry: Geometry,
        base: &BaseIdentity,
    ) -> Result<Self, Error> {
        let header = Header::new(geometry, *base);
        storage
            .set_len(header.end())
            .ctx(|| "sizing the new overlay".into())?;
        let overlay = Overlay {
            storage,
            header,
            flags: Mutex::new(header.flags),
        };
        overlay.allocate_map()?;
        overlay
            .storage
            .write_at(&header.encode(), 0)
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

    /// Opens an existing overlay and checks it against the base and options.
    pub(crate) fn open(storage: S, check: OpenCheck<'_>) -> Result<Self, Error> {
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
        check_match(&header, &check)?;
        Ok(Overlay {
            storage,
            header,
            flags: Mutex::new(header.flags),
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
        map.load(&raw)
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

    fn write_flags(&self, set: u32, clear: u32) -> Result<Header, Error> {
        let mut flags = self.flags.lock().unwrap_or_else(|e| e.into_inner());
        let mut h = self.header;
        h.flags = (*flags | set) & !clear;
        self.storage
            .write_at(&h.encode(), 0)
            .ctx(|| "writing the overlay header".into())?;
        *flags = h.flags;
        self.storage
            .sync()
            .ctx(|| "syncing the overlay header".into())?;
        Ok(h)
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
            r => panic!("a truncated overlay opened: {:?}", r.map(|o| *o.header())),
        }
        assert!(Overlay::open(SimDisk::new(whole), check).is_ok());
    }

    #[test]
    fn the_map_region_is_allocated_when_the_overlay_is_made() {
        use std::os::unix::fs::MetadataExt;
        // 1 GiB of 4 KiB blocks: a 64 KiB map.
        let geo = Geometry::new(1 << 30, 4096).unwrap();
        let p = std::env::temp_dir().join(format!("ublk-cow-map-alloc-{}", std::process::id()));
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        let o = Overlay::create(f, geo, &id(1)).unwrap();
        let h = *o.header();
        assert_eq!(h.map_bytes, 64 << 10);
        let allocated = o.storage().metadata().unwrap().blocks() * 512;
        assert!(
            allocated >= HEADER_SIZE + h.map_bytes,
            "{allocated} bytes allocated, the header and map need {}",
            HEADER_SIZE + h.map_bytes
        );
    }
}
