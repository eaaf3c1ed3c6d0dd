//! Request planning: what each READ, WRITE and DISCARD/WRITE_ZEROES must do,
//! decided from the block-state map alone. The steps that carry a WRITE's
//! plan out are in `write.rs`; executors (the synchronous one in
//! `device.rs`, the io_uring one in `ublk/exec`) do their I/O.

use crate::engine::chain::Below;
use crate::engine::geometry::Geometry;
use crate::engine::map::{BlockMap, BlockState};
use std::ops::Range;

/// Where one run of a READ comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadSource {
    Base,
    /// A layer of the chain below the overlay (`chain::Below::Layer`).
    Layer(usize),
    Overlay,
    Zero,
}

impl ReadSource {
    /// Read from below the overlay (the base or a layer).
    pub(crate) fn is_below(self) -> bool {
        matches!(self, ReadSource::Base | ReadSource::Layer(_))
    }
}

/// One run of a READ: `len` bytes at device offset `off`, landing at
/// `buf_off` in the request's buffer. Adjacent blocks read from one place
/// are one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReadRun {
    pub(crate) source: ReadSource,
    pub(crate) off: u64,
    pub(crate) len: u64,
    pub(crate) buf_off: usize,
}

/// Splits the READ `[off, off+len)` into runs by where each block is read
/// from: the overlay's map, and for its `Unallocated` blocks `below` (a
/// raw base answers `Base` for all; a chain names the layer).
pub(crate) fn plan_read(
    map: &BlockMap,
    geo: &Geometry,
    off: u64,
    len: u64,
    below: impl Fn(u64) -> Below,
    out: &mut Vec<ReadRun>,
) {
    out.clear();
    let end = off + len;
    let blocks = geo.blocks_touched(off, len);
    let mut push = |source: ReadSource, first: u64, last: u64| {
        let run_start = geo.block_start(first).max(off);
        let run_end = geo.block_end(last).min(end);
        match out.last_mut() {
            Some(prev) if prev.source == source && prev.off + prev.len == run_start => {
                prev.len = run_end - prev.off;
            }
            _ => out.push(ReadRun {
                source,
                off: run_start,
                len: run_end - run_start,
                buf_off: (run_start - off) as usize,
            }),
        }
    };
    let mut block = blocks.start;
    while block < blocks.end {
        let (state, n) = map.run_at(block, blocks.end);
        match state {
            BlockState::Allocated | BlockState::Copied => {
                push(ReadSource::Overlay, block, block + n - 1);
            }
            BlockState::Zero => push(ReadSource::Zero, block, block + n - 1),
            BlockState::Unallocated => {
                let mut b = block;
                while b < block + n {
                    let from = below(b);
                    let mut e = b + 1;
                    while e < block + n && below(e) == from {
                        e += 1;
                    }
                    let source = match from {
                        Below::Base => ReadSource::Base,
                        Below::Layer(d) => ReadSource::Layer(d),
                        Below::Zero => ReadSource::Zero,
                    };
                    push(source, b, e - 1);
                    b = e;
                }
            }
        }
        block += n;
    }
}

/// `plan_read`'s `below` for a raw base.
pub(crate) fn raw_base(_: u64) -> Below {
    Below::Base
}

/// How a WRITE must be carried out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum WritePath {
    /// Every block it touches is `Allocated`: write the overlay, take no lock.
    Unlocked,
    /// Some block must change state: lock these blocks, then
    /// [`plan_locked_write`].
    Locked(Range<u64>),
}

pub(crate) fn write_path(map: &BlockMap, geo: &Geometry, off: u64, len: u64) -> WritePath {
    let blocks = geo.blocks_touched(off, len);
    if map.all_allocated(blocks.clone()) {
        WritePath::Unlocked
    } else {
        WritePath::Locked(blocks)
    }
}

/// Bytes of a block not covered by a WRITE that must be filled in the overlay
/// before the block can become `Allocated` (read-modify-write).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    /// Copy `[off, off+len)` from the base (the block was `Unallocated`).
    FromBase { off: u64, len: u64 },
    /// Write zeros to `[off, off+len)` (the block was `Zero`).
    Zeros { off: u64, len: u64 },
}

/// A WRITE planned under the locks of the blocks it touches: write the fills
/// and the guest data to the overlay (all disjoint, any order), then mark
/// every block of `mark` that is not `Allocated` as `Allocated`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WritePlan {
    pub(crate) head: Option<Fill>,
    pub(crate) tail: Option<Fill>,
    pub(crate) mark: Range<u64>,
}

impl WritePlan {
    /// The head's and the tail's fill.
    pub(crate) fn fills(&self) -> [Option<Fill>; 2] {
        [self.head, self.tail]
    }
}

/// Plans a WRITE whose blocks are locked by the caller.
pub(crate) fn plan_locked_write(map: &BlockMap, geo: &Geometry, off: u64, len: u64) -> WritePlan {
    let end = off + len;
    let blocks = geo.blocks_touched(off, len);
    let fill = |block: u64, from: u64, to: u64| -> Option<Fill> {
        if from >= to {
            return None;
        }
        match map.get(block) {
            BlockState::Allocated | BlockState::Copied => None,
            BlockState::Unallocated => Some(Fill::FromBase {
                off: from,
                len: to - from,
            }),
            BlockState::Zero => Some(Fill::Zeros {
                off: from,
                len: to - from,
            }),
        }
    };
    let first = blocks.start;
    let last = blocks.end - 1;
    WritePlan {
        head: fill(first, geo.block_start(first), off),
        tail: fill(last, end, geo.block_end(last)),
        mark: blocks,
    }
}

/// Whether the overlay's pages behind `blocks` exist and hold initialized
/// data, so that a WRITE's data can be copied straight into them:
/// `Allocated` blocks were written before; `Unallocated` ones exist only when
/// the whole overlay was allocated and initialized up front
/// (`unallocated_ready`); a `Zero` block's pages may have been punched out.
pub(crate) fn overlay_pages_ready(
    map: &BlockMap,
    blocks: Range<u64>,
    unallocated_ready: bool,
) -> bool {
    blocks.into_iter().all(|b| match map.get(b) {
        BlockState::Allocated | BlockState::Copied => true,
        BlockState::Unallocated => unallocated_ready,
        BlockState::Zero => false,
    })
}

/// Whether no block of `blocks` was ever written in the overlay: each is
/// `Unallocated` or `Zero`, so nothing reads its overlay bytes.
pub(crate) fn never_written(map: &BlockMap, blocks: Range<u64>) -> bool {
    blocks
        .into_iter()
        .all(|b| matches!(map.get(b), BlockState::Unallocated | BlockState::Zero))
}

/// A DISCARD or WRITE_ZEROES: whole blocks become `Zero`; the partial head
/// and tail are written with zeros like any WRITE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ZeroPlan {
    pub(crate) head: Option<(u64, u64)>,
    pub(crate) whole: Option<Range<u64>>,
    pub(crate) tail: Option<(u64, u64)>,
}

pub(crate) fn plan_zero(geo: &Geometry, off: u64, len: u64) -> ZeroPlan {
    let end = off + len;
    let touched = geo.blocks_touched(off, len);
    let full_first = if off == geo.block_start(touched.start) {
        touched.start
    } else {
        touched.start + 1
    };
    let full_end = if end == geo.block_end(touched.end - 1) {
        touched.end
    } else {
        touched.end - 1
    };
    if full_first >= full_end {
        return ZeroPlan {
            head: Some((off, len)),
            whole: None,
            tail: None,
        };
    }
    let whole_start = geo.block_start(full_first);
    let whole_end = geo.block_end(full_end - 1);
    ZeroPlan {
        head: (off < whole_start).then(|| (off, whole_start - off)),
        whole: Some(full_first..full_end),
        tail: (end > whole_end).then(|| (whole_end, end - whole_end)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::engine::map::test_map as setup;

    /// The runs `plan_read` makes of `[off, off+len)`, as
    /// `(source, off, len, buf_off)`.
    fn planned(
        map: &BlockMap,
        geo: &Geometry,
        off: u64,
        len: u64,
        below: impl Fn(u64) -> Below,
    ) -> Vec<(ReadSource, u64, u64, usize)> {
        let mut runs = Vec::new();
        plan_read(map, geo, off, len, below, &mut runs);
        runs.iter()
            .map(|r| (r.source, r.off, r.len, r.buf_off))
            .collect()
    }

    #[test]
    fn read_merges_equal_blocks() {
        use BlockState::*;
        let (map, geo) = setup(&[
            Unallocated,
            Unallocated,
            Allocated,
            Allocated,
            Zero,
            Unallocated,
        ]);
        let got = planned(&map, &geo, 512, 6 * 4096 - 1024, raw_base);
        assert_eq!(
            got,
            vec![
                (ReadSource::Base, 512, 8192 - 512, 0),
                (ReadSource::Overlay, 8192, 8192, 8192 - 512),
                (ReadSource::Zero, 16384, 4096, 16384 - 512),
                (ReadSource::Base, 20480, 4096 - 512, 20480 - 512),
            ]
        );
    }

    #[test]
    fn read_below_the_overlay_splits_by_layer_and_merges_the_overlay() {
        use BlockState::*;
        let (map, geo) = setup(&[
            Unallocated,
            Unallocated,
            Unallocated,
            Allocated,
            Copied,
            Unallocated,
            Unallocated,
        ]);
        let below = |b: u64| match b {
            0 | 1 => Below::Layer(2),
            2 => Below::Zero,
            5 => Below::Layer(0),
            _ => Below::Base,
        };
        let mut runs = Vec::new();
        plan_read(&map, &geo, 0, 7 * 4096, below, &mut runs);
        let got: Vec<_> = runs.iter().map(|r| (r.source, r.off, r.len)).collect();
        assert_eq!(
            got,
            vec![
                (ReadSource::Layer(2), 0, 8192),
                (ReadSource::Zero, 8192, 4096),
                (ReadSource::Overlay, 12288, 8192),
                (ReadSource::Layer(0), 20480, 4096),
                (ReadSource::Base, 24576, 4096),
            ]
        );
        assert!(runs.iter().all(|r| r.buf_off as u64 == r.off));
    }

    /// Adjacent blocks read from one file are one run whatever their
    /// states: `Copied` beside `Allocated` (both the overlay's), a `Zero`
    /// block beside one that reads as zeros below the overlay.
    #[test]
    fn read_merges_runs_of_one_file_across_states() {
        use BlockState::*;
        let (map, geo) = setup(&[
            Copied,
            Allocated,
            Copied,
            Copied,
            Allocated,
            Zero,
            Unallocated,
            Zero,
            Unallocated,
        ]);
        let below = |b: u64| if b == 6 { Below::Zero } else { Below::Base };
        let got = planned(&map, &geo, 100, 9 * 4096 - 200, below);
        assert_eq!(
            got,
            vec![
                (ReadSource::Overlay, 100, 5 * 4096 - 100, 0),
                (ReadSource::Zero, 5 * 4096, 3 * 4096, 5 * 4096 - 100),
                (ReadSource::Base, 8 * 4096, 4096 - 100, 8 * 4096 - 100),
            ]
        );
    }

    #[test]
    fn unaligned_write_fills_head_and_tail() {
        use BlockState::*;
        let (map, geo) = setup(&[Unallocated, Allocated, Zero]);
        assert_eq!(write_path(&map, &geo, 4096, 4096), WritePath::Unlocked);
        assert_eq!(write_path(&map, &geo, 1024, 4096), WritePath::Locked(0..2));
        let p = plan_locked_write(&map, &geo, 1024, 2 * 4096);
        assert_eq!(p.head, Some(Fill::FromBase { off: 0, len: 1024 }));
        assert_eq!(
            p.tail,
            Some(Fill::Zeros {
                off: 9216,
                len: 3072
            })
        );
        assert_eq!(p.mark, 0..3);
        let p = plan_locked_write(&map, &geo, 4096 + 512, 512);
        assert_eq!(p.fills(), [None, None]);
    }

    #[test]
    fn overlay_pages_are_ready_only_where_known_to_exist() {
        use BlockState::*;
        let (map, _) = setup(&[Allocated, Unallocated, Zero, Allocated]);
        assert!(overlay_pages_ready(&map, 0..1, false));
        assert!(!overlay_pages_ready(&map, 0..2, false));
        assert!(overlay_pages_ready(&map, 0..2, true));
        // A discarded block may have lost its pages, preallocated or not.
        assert!(!overlay_pages_ready(&map, 1..4, true));
        assert!(overlay_pages_ready(&map, 3..4, false));
    }

    #[test]
    fn zero_plan_splits_partial_blocks() {
        let geo = Geometry::new(4 * 4096, 4096).unwrap();
        let p = plan_zero(&geo, 1024, 3 * 4096);
        assert_eq!(p.head, Some((1024, 3072)));
        assert_eq!(p.whole, Some(1..3));
        assert_eq!(p.tail, Some((3 * 4096, 1024)));
        let p = plan_zero(&geo, 1024, 1024);
        assert_eq!((p.head, p.whole, p.tail), (Some((1024, 1024)), None, None));
        // A short last block counts as whole when covered to the end.
        let geo = Geometry::new(4096 + 512, 4096).unwrap();
        assert_eq!(plan_zero(&geo, 4096, 512).whole, Some(1..2));
    }
}
