//! A pushed layer's format: a frozen layer packed for an object store, and
//! the plan that reads a byte range of a stack of them.
//!
//! A layer file is sparse, its blocks at their device offsets; an object
//! cannot be sparse, so `ublk-cow push` writes a layer's held blocks one
//! after another, with an index that says where each run lies:
//!
//! ```text
//! 0       magic "UBLKCOWP", version (u32 LE, 1), header length H (u32 LE)
//! 16      the header: H bytes of JSON (`PackedHeader`): virtual size, block
//!         size, the index's place and checksum, the data's place, the
//!         backing (URL and the identity it had at the push), and the local
//!         layer's own identity (what a layer made over it records)
//! index   at `index_offset` (4 KiB aligned): one extent of 16 bytes per run
//!         of held blocks, sorted: first block (u64), count (u32), kind
//!         (u32: 1 data, 2 zeros)
//! data    at `data_offset` (4 KiB aligned): the blocks of the data extents,
//!         whole blocks, in the index's order; the object is padded to a
//!         multiple of 4 KiB
//! ```
//!
//! A block the index does not name reads as the backing reads it. The
//! layer's copied blocks are not pushed: their bytes equal the backing's,
//! and a push checks that the backing it names is the one the layer was
//! made over (`crate::push`). The header is JSON because it is read once per open and
//! holds strings (URL, ETag); the index is binary because it can be long.

use crate::engine::Error;
use crate::engine::base::Fnv;
use crate::engine::map::{BlockMap, BlockState};
use crate::remote::Identity;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// The first bytes of a pushed layer.
pub const MAGIC: &[u8; 8] = b"UBLKCOWP";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes before the JSON header: magic, version, header length.
pub const PREFIX: u64 = 16;
/// The longest header read (it holds one URL and a few numbers).
pub const MAX_HEADER: u64 = 64 << 10;
/// The index and the data start on this boundary.
const ALIGN: u64 = 4096;
/// Bytes per extent in the index.
const EXTENT_BYTES: usize = 16;

/// What a run of blocks of a pushed layer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// Written data, in the object's data area.
    Data,
    /// Zeros (a discard or write-zeroes in the layer): no bytes stored.
    Zero,
}

/// A run of blocks a pushed layer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub count: u32,
    pub held: Held,
}

/// The backing as the push saw it: its URL, and its identity (the virtual
/// size, for a pushed layer not its object's length, and the version), as
/// `remote::Identity` gives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedBacking {
    pub url: String,
    #[serde(flatten)]
    pub identity: Identity,
}

/// The local layer's identity as an overlay made over it records its
/// backing (`engine::base::BaseIdentity`): a layer pushed over this one
/// must have recorded exactly this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedLayerId {
    pub size: u64,
    pub mtime_ns: u64,
    pub fingerprint: u64,
}

/// The JSON header of a pushed layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedHeader {
    /// The virtual disk's size in bytes.
    pub size: u64,
    pub block_size: u32,
    pub extents: u64,
    pub index_offset: u64,
    /// FNV-1a over the index's bytes.
    pub index_checksum: u64,
    pub data_offset: u64,
    /// Blocks in the data area.
    pub data_blocks: u64,
    pub backing: PackedBacking,
    /// The layer's own identity, when it could be taken (see
    /// [`PackedLayerId`]).
    pub layer: Option<PackedLayerId>,
}

impl PackedHeader {
    /// A header for `extents` of a layer of `size` bytes in blocks of
    /// `block_size`, over `backing`; the layout follows from them.
    pub fn new(
        size: u64,
        block_size: u32,
        extents: &[Extent],
        backing: PackedBacking,
        layer: Option<PackedLayerId>,
    ) -> PackedHeader {
        let mut h = PackedHeader {
            size,
            block_size,
            extents: extents.len() as u64,
            index_offset: 0,
            index_checksum: checksum(&encode_index(extents)),
            data_offset: 0,
            data_blocks: extents
                .iter()
                .filter(|e| e.held == Held::Data)
                .map(|e| e.count as u64)
                .sum(),
            backing,
            layer,
        };
        // The header's length depends on the offsets' digits: lay out with
        // room for the longest, then encode.
        h.index_offset = u64::MAX;
        h.data_offset = u64::MAX;
        let json = serde_json::to_vec(&h).expect("a header encodes");
        h.index_offset = (PREFIX + json.len() as u64).next_multiple_of(ALIGN);
        h.data_offset = (h.index_offset + h.extents * EXTENT_BYTES as u64).next_multiple_of(ALIGN);
        h
    }

    /// The object's length: header, index, data, padded.
    pub fn object_len(&self) -> u64 {
        (self.data_offset + self.data_blocks * self.block_size as u64).next_multiple_of(ALIGN)
    }

    /// Magic, version, length and the JSON; the index follows at
    /// `index_offset`.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("a header encodes");
        let mut b = Vec::with_capacity(PREFIX as usize + json.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(json.len() as u32).to_le_bytes());
        b.extend_from_slice(&json);
        assert!(
            b.len() as u64 <= self.index_offset,
            "the header overlaps its index"
        );
        b
    }

    /// The header's length from the first [`PREFIX`] bytes, or `None` if
    /// they are not a pushed layer's.
    pub fn length(prefix: &[u8]) -> Result<Option<u64>, Error> {
        if prefix.len() < PREFIX as usize || &prefix[..8] != MAGIC {
            return Ok(None);
        }
        let version = u32::from_le_bytes(prefix[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(Error::invalid(format!(
                "a pushed layer of format version {version}; this build reads version {VERSION}"
            )));
        }
        let len = u32::from_le_bytes(prefix[12..16].try_into().unwrap()) as u64;
        if len > MAX_HEADER {
            return Err(Error::corrupt(format!(
                "a pushed layer's header of {len} bytes"
            )));
        }
        Ok(Some(len))
    }

    /// Decodes the JSON header and checks its layout against `object_len`.
    pub fn decode(json: &[u8], object_len: u64) -> Result<PackedHeader, Error> {
        let h: PackedHeader = serde_json::from_slice(json)
            .map_err(|e| Error::corrupt(format!("a pushed layer's header: {e}")))?;
        let bad = |why: &str| Err(Error::corrupt(format!("a pushed layer's header: {why}")));
        if !h.block_size.is_power_of_two() || h.block_size < 512 {
            return bad("the block size is not a power of two");
        }
        if h.size == 0 || !h.size.is_multiple_of(512) {
            return bad("the virtual size is not a multiple of 512");
        }
        let index_end = h
            .extents
            .checked_mul(EXTENT_BYTES as u64)
            .and_then(|n| n.checked_add(h.index_offset));
        let data_end = h
            .data_blocks
            .checked_mul(h.block_size as u64)
            .and_then(|n| n.checked_add(h.data_offset));
        match (index_end, data_end) {
            (Some(i), Some(d))
                if h.index_offset >= PREFIX + json.len() as u64
                    && i <= h.data_offset
                    && d <= object_len => {}
            _ => return bad("its index or data lies outside the object"),
        }
        Ok(h)
    }

    /// The byte range of the index in the object.
    pub fn index_range(&self) -> Range<u64> {
        self.index_offset..self.index_offset + self.extents * EXTENT_BYTES as u64
    }
}

/// FNV-1a of `bytes`.
fn checksum(bytes: &[u8]) -> u64 {
    let mut h = Fnv::default();
    h.write(bytes);
    h.finish()
}

/// The index's bytes.
pub fn encode_index(extents: &[Extent]) -> Vec<u8> {
    let mut b = Vec::with_capacity(extents.len() * EXTENT_BYTES);
    for e in extents {
        b.extend_from_slice(&e.start.to_le_bytes());
        b.extend_from_slice(&e.count.to_le_bytes());
        let kind: u32 = match e.held {
            Held::Data => 1,
            Held::Zero => 2,
        };
        b.extend_from_slice(&kind.to_le_bytes());
    }
    b
}

/// The extents a layer's map holds, in block order: its written blocks as
/// data, its zeroed ones as zeros; copied blocks are left out (they read as
/// the backing does). A run is cut at `u32::MAX` blocks.
pub fn extents_of(map: &BlockMap) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    map.for_each_held(|b, state| {
        let held = match state {
            BlockState::Allocated => Held::Data,
            BlockState::Zero => Held::Zero,
            BlockState::Copied | BlockState::Unallocated => return,
        };
        match out.last_mut() {
            Some(e) if e.held == held && e.start + e.count as u64 == b && e.count < u32::MAX => {
                e.count += 1
            }
            _ => out.push(Extent {
                start: b,
                count: 1,
                held,
            }),
        }
    });
    out
}

/// A pushed layer's index, decoded and checked: its extents and where the
/// data of each lies in the object.
#[derive(Clone, Debug)]
pub struct PackedIndex {
    extents: Vec<Extent>,
    /// For each extent, the object offset of its first block's data (for
    /// zeros, where the next data would be).
    data_at: Vec<u64>,
    block_size: u64,
}

impl PackedIndex {
    /// Decodes `bytes` (the index's range of the object) for `header`:
    /// checksum, order, bounds and the data's length are checked.
    pub fn decode(header: &PackedHeader, bytes: &[u8]) -> Result<PackedIndex, Error> {
        let bad = |why: String| Err(Error::corrupt(format!("a pushed layer's index: {why}")));
        if bytes.len() as u64 != header.extents * EXTENT_BYTES as u64 {
            return bad(format!(
                "{} bytes for {} extents",
                bytes.len(),
                header.extents
            ));
        }
        if checksum(bytes) != header.index_checksum {
            return bad("its checksum does not match".into());
        }
        let blocks = header.size.div_ceil(header.block_size as u64);
        let bs = header.block_size as u64;
        let mut extents = Vec::with_capacity(header.extents as usize);
        let mut data_at = Vec::with_capacity(header.extents as usize);
        let mut next_data = header.data_offset;
        let mut next_block = 0u64;
        for e in bytes.chunks_exact(EXTENT_BYTES) {
            let start = u64::from_le_bytes(e[..8].try_into().unwrap());
            let count = u32::from_le_bytes(e[8..12].try_into().unwrap());
            let held = match u32::from_le_bytes(e[12..16].try_into().unwrap()) {
                1 => Held::Data,
                2 => Held::Zero,
                k => return bad(format!("extent kind {k}")),
            };
            if count == 0 || start < next_block || start.saturating_add(count as u64) > blocks {
                return bad(format!(
                    "extent {start}+{count} is out of order or past the end"
                ));
            }
            next_block = start + count as u64;
            extents.push(Extent { start, count, held });
            data_at.push(next_data);
            if held == Held::Data {
                next_data += count as u64 * bs;
            }
        }
        if next_data != header.data_offset + header.data_blocks * bs {
            return bad("its data extents do not add up to the data area".into());
        }
        Ok(PackedIndex {
            extents,
            data_at,
            block_size: bs,
        })
    }

    /// The extents, in block order.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// What this layer holds of block `b`: the object offset of its data,
    /// zeros, or nothing.
    pub fn holds(&self, b: u64) -> Option<Piece> {
        let i = self
            .extents
            .partition_point(|e| e.start + e.count as u64 <= b);
        let e = self.extents.get(i).filter(|e| e.start <= b)?;
        Some(match e.held {
            Held::Data => Piece::Object(self.data_at[i] + (b - e.start) * self.block_size),
            Held::Zero => Piece::Zero,
        })
    }
}

/// Where a piece of a stack's virtual disk is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Zeros.
    Zero,
    /// The level's object at this byte offset.
    Object(u64),
}

/// One piece of a read: `len` bytes from `level` (0 is the top; the number
/// of levels is the raw base, read at the virtual offset) at `from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub len: u64,
    pub level: usize,
    pub from: Piece,
}

/// The parts that bytes `range` of a stack of pushed layers (`levels`, top
/// first, all with `block_size`) over a raw base read from, in order:
/// each block from its topmost holder, adjacent bytes of one object merged.
pub fn plan_read(levels: &[&PackedIndex], block_size: u64, range: Range<u64>) -> Vec<Part> {
    let mut parts: Vec<Part> = Vec::new();
    let mut off = range.start;
    while off < range.end {
        let b = off / block_size;
        let end = ((b + 1) * block_size).min(range.end);
        let within = off - b * block_size;
        let (level, from) = levels
            .iter()
            .enumerate()
            .find_map(|(l, idx)| idx.holds(b).map(|p| (l, p)))
            .map(|(l, p)| match p {
                Piece::Object(at) => (l, Piece::Object(at + within)),
                Piece::Zero => (l, Piece::Zero),
            })
            .unwrap_or((levels.len(), Piece::Object(off)));
        let len = end - off;
        match parts.last_mut() {
            Some(p) if p.level == level && p.from == Piece::Zero && from == Piece::Zero => {
                p.len += len
            }
            Some(Part {
                len: plen,
                level: pl,
                from: Piece::Object(at),
            }) if *pl == level && from == Piece::Object(*at + *plen) => *plen += len,
            _ => parts.push(Part { len, level, from }),
        }
        off = end;
    }
    parts
}

/// One GET of a read: `range` of `level`'s object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Get {
    pub level: usize,
    pub range: Range<u64>,
}

/// The GETs that fetch `parts` (from [`plan_read`]): per object, parts
/// whose bytes lie at most `max_gap` apart share one GET that spans them
/// (the bytes between are fetched and dropped), so a read of a fragmented
/// stack costs a few GETs per object, not one per run. Returns the GETs
/// and, for each part, its GET and the offset in it (`None` for zeros).
pub fn plan_gets(parts: &[Part], max_gap: u64) -> (Vec<Get>, Vec<Option<(usize, u64)>>) {
    let mut gets: Vec<Get> = Vec::new();
    let mut at: Vec<Option<(usize, u64)>> = vec![None; parts.len()];
    // Each object's parts by offset: a level's parts come in block order,
    // which is offset order in its object too, but not for the raw base
    // below zeros or other levels; sort to be sure.
    let mut order: Vec<usize> = (0..parts.len())
        .filter(|&i| matches!(parts[i].from, Piece::Object(_)))
        .collect();
    let start = |i: usize| match parts[i].from {
        Piece::Object(o) => o,
        Piece::Zero => unreachable!("zeros are filtered out"),
    };
    order.sort_by_key(|&i| (parts[i].level, start(i)));
    for i in order {
        let (level, from) = (parts[i].level, start(i));
        let to = from + parts[i].len;
        match gets.last_mut() {
            Some(g) if g.level == level && from <= g.range.end.saturating_add(max_gap) => {
                g.range.end = g.range.end.max(to);
            }
            _ => gets.push(Get {
                level,
                range: from..to,
            }),
        }
        let g = gets.len() - 1;
        at[i] = Some((g, from - gets[g].range.start));
    }
    (gets, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backing() -> PackedBacking {
        PackedBacking {
            url: "s3://b/base.img".into(),
            identity: Identity {
                size: 64 * 4096,
                etag: Some("\"e\"".into()),
                last_modified: None,
            },
        }
    }

    fn index_of(extents: &[Extent]) -> (PackedHeader, PackedIndex) {
        let h = PackedHeader::new(64 * 4096, 4096, extents, backing(), None);
        let idx = PackedIndex::decode(&h, &encode_index(extents)).unwrap();
        (h, idx)
    }

    #[test]
    fn a_header_round_trips_and_lays_out_in_order() {
        let ext = [
            Extent {
                start: 1,
                count: 2,
                held: Held::Data,
            },
            Extent {
                start: 5,
                count: 1,
                held: Held::Zero,
            },
            Extent {
                start: 9,
                count: 3,
                held: Held::Data,
            },
        ];
        let (h, idx) = index_of(&ext);
        let enc = h.encode();
        assert_eq!(
            PackedHeader::length(&enc[..16]).unwrap(),
            Some(enc.len() as u64 - 16)
        );
        let back = PackedHeader::decode(&enc[16..], h.object_len()).unwrap();
        assert_eq!(back, h);
        assert_eq!(h.data_blocks, 5);
        assert!(h.index_offset >= enc.len() as u64 && h.data_offset >= h.index_range().end);
        assert_eq!(idx.holds(0), None);
        assert_eq!(idx.holds(2), Some(Piece::Object(h.data_offset + 4096)));
        assert_eq!(idx.holds(5), Some(Piece::Zero));
        assert_eq!(idx.holds(10), Some(Piece::Object(h.data_offset + 3 * 4096)));
        assert_eq!(idx.holds(12), None);
        // A short object, a flipped index byte, a raw image: refused or
        // not a pushed layer.
        assert!(PackedHeader::decode(&enc[16..], h.object_len() - 4096).is_err());
        let mut bytes = encode_index(&ext);
        bytes[3] ^= 1;
        assert!(PackedIndex::decode(&h, &bytes).is_err());
        assert_eq!(PackedHeader::length(&[0u8; 16]).unwrap(), None);
    }

    #[test]
    fn overlapping_extents_are_refused() {
        let ext = [
            Extent {
                start: 4,
                count: 4,
                held: Held::Data,
            },
            Extent {
                start: 6,
                count: 1,
                held: Held::Zero,
            },
        ];
        let h = PackedHeader::new(64 * 4096, 4096, &ext, backing(), None);
        assert!(PackedIndex::decode(&h, &encode_index(&ext)).is_err());
    }

    /// A plan reads what a block-by-block walk of the levels reads.
    #[test]
    fn a_plan_reads_each_byte_from_its_topmost_holder() {
        let bs = 4096u64;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let levels: Vec<PackedIndex> = (0..1 + next() % 3)
                .map(|_| {
                    let mut ext = Vec::new();
                    let mut b = next() % 4;
                    while b < 64 {
                        let count = 1 + (next() % 5) as u32;
                        let count = count.min((64 - b) as u32);
                        let held = if next() % 3 == 0 {
                            Held::Zero
                        } else {
                            Held::Data
                        };
                        ext.push(Extent {
                            start: b,
                            count,
                            held,
                        });
                        b += count as u64 + next() % 4;
                    }
                    index_of(&ext).1
                })
                .collect();
            let start = next() % (64 * bs);
            let end = (start + 1 + next() % (20 * bs)).min(64 * bs);
            let refs: Vec<&PackedIndex> = levels.iter().collect();
            let parts = plan_read(&refs, bs, start..end);
            assert_eq!(parts.iter().map(|p| p.len).sum::<u64>(), end - start);
            let mut off = start;
            for p in parts {
                for i in 0..p.len {
                    let at = off + i;
                    let want = levels
                        .iter()
                        .enumerate()
                        .find_map(|(l, x)| x.holds(at / bs).map(|h| (l, h)))
                        .map(|(l, h)| match h {
                            Piece::Object(o) => (l, Piece::Object(o + at % bs)),
                            Piece::Zero => (l, Piece::Zero),
                        })
                        .unwrap_or((levels.len(), Piece::Object(at)));
                    let got = match p.from {
                        Piece::Object(o) => (p.level, Piece::Object(o + i)),
                        Piece::Zero => (p.level, Piece::Zero),
                    };
                    assert_eq!(got, want, "byte {at}");
                }
                off += p.len;
            }
        }
    }

    /// Every part's bytes lie in its GET at its offset; GETs of one object
    /// do not overlap, and runs of one object share a GET across gaps up to
    /// the one allowed.
    #[test]
    fn gets_cover_their_parts_and_share_across_small_gaps() {
        let ext = |v: &[(u64, u32, Held)]| {
            v.iter()
                .map(|&(start, count, held)| Extent { start, count, held })
                .collect::<Vec<_>>()
        };
        // The top holds every other block; the middle a run under it.
        let top: Vec<(u64, u32, Held)> = (0..32).map(|i| (i * 2, 1, Held::Data)).collect();
        let (_, a) = index_of(&ext(&top));
        let (_, b) = index_of(&ext(&[(10, 20, Held::Data), (40, 4, Held::Zero)]));
        let parts = plan_read(&[&a, &b], 4096, 0..64 * 4096);
        for gap in [0, 4096, 1 << 20] {
            let (gets, at) = plan_gets(&parts, gap);
            for (p, at) in parts.iter().zip(&at) {
                match (p.from, at) {
                    (Piece::Zero, None) => {}
                    (Piece::Object(o), Some((g, off))) => {
                        let g = &gets[*g];
                        assert_eq!(g.level, p.level);
                        assert_eq!(g.range.start + off, o);
                        assert!(o + p.len <= g.range.end);
                    }
                    other => panic!("{other:?}"),
                }
            }
            for w in gets.windows(2) {
                if w[0].level == w[1].level {
                    assert!(w[0].range.end + gap < w[1].range.start, "{gets:?}");
                }
            }
            // The top's blocks lie end to end in its object (one GET at
            // any gap); the middle's 10 runs 4 KiB apart; the base's 20
            // runs 4 KiB apart in three groups far from each other.
            let want = match gap {
                0 => 1 + 10 + 20,
                4096 => 1 + 1 + 3,
                _ => 3,
            };
            assert_eq!(gets.len(), want, "gap {gap}: {gets:?}");
        }
    }
}
