//! Cache requests: the cow_on_cache state machine.
//!
//! A cache request for `[offset, offset+len)` is rounded out to whole blocks
//! and each block gets an action from its state and the [`CacheMode`]:
//!
//! | state       | action                                              |
//! |-------------|-----------------------------------------------------|
//! | Allocated,  | `fadvise(WILLNEED)` on the overlay range            |
//! | Copied      |                                                     |
//! | Zero        | nothing                                             |
//! | Unallocated | by mode: `ignore` nothing; `passthrough` fadvise on |
//! |             | the base; `read` read the base and drop the data;   |
//! |             | `cow` read the base and install it in the overlay   |
//!
//! Adjacent blocks with the same action become one step. A cache request
//! never changes what a read returns; `cow` installs copies under the block
//! lock rule (see `locks.rs`), so a copy never lands over a newer write.

use crate::engine::Error;
use crate::engine::geometry::Geometry;
use crate::engine::map::{BlockMap, BlockState};
use crate::engine::readahead::Readahead;
use std::fmt;
use std::str::FromStr;

/// The `fadvise(WILLNEED)` piece where nothing better is known. The kernel
/// reads ahead at most max(the file's readahead size, the device's largest
/// I/O) per call and silently ignores the rest, and the readahead size is
/// 128 KiB unless the administrator changed it; so a longer range is
/// advised in pieces, all in flight together. A served device sizes each
/// file's pieces by what its device takes (`sys::willneed_limit`); this
/// size is for files whose device says nothing, and for cache requests
/// carried out without a ring (`CowDevice::cache`).
pub(crate) const FADVISE_PIECE: u64 = 128 << 10;

/// `[off, off+len)` cut into pieces of at most `piece` bytes.
pub(crate) fn fadvise_pieces(off: u64, len: u64, piece: u64) -> impl Iterator<Item = (u64, u64)> {
    let piece = piece.max(1);
    (off..off + len)
        .step_by(piece as usize)
        .map(move |at| (at, piece.min(off + len - at)))
}

/// What a cache request does with blocks still on the base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Nothing.
    Ignore,
    /// `fadvise(WILLNEED)` on the base: the base's page cache reads ahead.
    Passthrough,
    /// Read the base and drop the data: warms caches that fadvise cannot
    /// reach (a base opened with O_DIRECT, a network file system's cache).
    Read,
    /// Read the base and write the data into the overlay (copy-on-cache).
    Cow,
}

impl CacheMode {
    /// The default for a base: one with a page cache (a regular file or a
    /// block device opened without O_DIRECT) is warmed by fadvise; one
    /// opened with O_DIRECT has no page cache to warm, so it is read.
    pub(crate) fn default_for(base_direct: bool) -> CacheMode {
        if base_direct {
            CacheMode::Read
        } else {
            CacheMode::Passthrough
        }
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CacheMode::Ignore => "ignore",
            CacheMode::Passthrough => "passthrough",
            CacheMode::Read => "read",
            CacheMode::Cow => "cow",
        })
    }
}

impl FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ignore" => Ok(CacheMode::Ignore),
            "passthrough" => Ok(CacheMode::Passthrough),
            "read" => Ok(CacheMode::Read),
            "cow" => Ok(CacheMode::Cow),
            _ => Err(format!(
                "'{s}' is not a cache mode (ignore, passthrough, read, cow)"
            )),
        }
    }
}

/// What one step of a cache request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CacheAction {
    FadviseOverlay,
    FadviseBase,
    ReadBase,
    CopyToOverlay,
}

/// One step: `action` over device bytes `[off, off+len)`, whole blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CacheStep {
    pub(crate) action: CacheAction,
    pub(crate) off: u64,
    pub(crate) len: u64,
}

fn action(state: BlockState, mode: CacheMode) -> Option<CacheAction> {
    match (state, mode) {
        (BlockState::Allocated | BlockState::Copied, _) => Some(CacheAction::FadviseOverlay),
        (BlockState::Zero, _) => None,
        (BlockState::Unallocated, CacheMode::Ignore) => None,
        (BlockState::Unallocated, CacheMode::Passthrough) => Some(CacheAction::FadviseBase),
        (BlockState::Unallocated, CacheMode::Read) => Some(CacheAction::ReadBase),
        (BlockState::Unallocated, CacheMode::Cow) => Some(CacheAction::CopyToOverlay),
    }
}

/// The blocks a cache request of `[off, off+len)` covers, rounded out and
/// clipped to the device; an error if the range starts past the end.
pub(crate) fn cache_blocks(
    geo: &Geometry,
    off: u64,
    len: u64,
) -> Result<std::ops::Range<u64>, Error> {
    if off >= geo.size() || len == 0 {
        return Err(Error::invalid(format!(
            "cache range {off}+{len} is outside the device ({} bytes)",
            geo.size()
        )));
    }
    let end = off.saturating_add(len).min(geo.size());
    Ok(geo.block_of(off)..geo.block_of(end - 1) + 1)
}

/// Plans the blocks `blocks` in `mode`, merging adjacent equal actions.
pub(crate) fn plan_cache(
    map: &BlockMap,
    geo: &Geometry,
    blocks: std::ops::Range<u64>,
    mode: CacheMode,
    out: &mut Vec<CacheStep>,
) {
    out.clear();
    let mut b = blocks.start;
    while b < blocks.end {
        let (state, n) = map.run_at(b, blocks.end);
        if let Some(action) = action(state, mode) {
            let off = geo.block_start(b);
            let len = geo.block_end(b + n - 1) - off;
            match out.last_mut() {
                Some(last) if last.action == action && last.off + last.len == off => {
                    last.len += len
                }
                _ => out.push(CacheStep { action, off, len }),
            }
        }
        b += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BlockState::*;

    use crate::engine::map::test_map as setup;

    #[test]
    fn every_mode_over_every_state() {
        let (map, geo) = setup(&[Allocated, Zero, Unallocated, Unallocated, Copied]);
        let mut out = Vec::new();
        let step = |a, b: u64, n: u64| CacheStep {
            action: a,
            off: b * 4096,
            len: n * 4096,
        };
        plan_cache(&map, &geo, 0..5, CacheMode::Ignore, &mut out);
        assert_eq!(
            out,
            vec![
                step(CacheAction::FadviseOverlay, 0, 1),
                step(CacheAction::FadviseOverlay, 4, 1)
            ]
        );
        plan_cache(&map, &geo, 0..5, CacheMode::Passthrough, &mut out);
        assert_eq!(out[1], step(CacheAction::FadviseBase, 2, 2));
        plan_cache(&map, &geo, 0..5, CacheMode::Read, &mut out);
        assert_eq!(out[1], step(CacheAction::ReadBase, 2, 2));
        plan_cache(&map, &geo, 0..5, CacheMode::Cow, &mut out);
        assert_eq!(out[1], step(CacheAction::CopyToOverlay, 2, 2));
        assert_eq!(out.len(), 3, "Zero blocks get no step");
    }

    #[test]
    fn ranges_round_out_and_clip() {
        let geo = Geometry::new(10 * 4096, 4096).unwrap();
        assert_eq!(cache_blocks(&geo, 4095, 2).unwrap(), 0..2);
        assert_eq!(cache_blocks(&geo, 4096, u64::MAX).unwrap(), 1..10);
        assert!(cache_blocks(&geo, 10 * 4096, 1).is_err());
        assert!(cache_blocks(&geo, 0, 0).is_err());
    }

    #[test]
    fn files_in_memory_are_not_prefetched_unless_copied() {
        let mut p = CachePolicy::default();
        assert_eq!(p.readahead_for(false), Readahead::Auto);
        for m in [CacheMode::Ignore, CacheMode::Passthrough, CacheMode::Read] {
            p.mode = m;
            assert_eq!(p.readahead_for(true), Readahead::Off, "{m}");
            assert_eq!(p.readahead_for(false), Readahead::Auto, "{m}");
        }
        p.mode = CacheMode::Cow;
        p.readahead = Readahead::Max(1 << 20);
        assert_eq!(p.readahead_for(true), Readahead::Max(1 << 20));
    }

    #[test]
    fn modes_parse() {
        for m in ["ignore", "passthrough", "read", "cow"] {
            assert_eq!(m.parse::<CacheMode>().unwrap().to_string(), m);
        }
        assert!("copy".parse::<CacheMode>().is_err());
    }
}

/// How a device serves cache requests and prefetches; fixed at `add`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CachePolicy {
    /// What cache requests do with blocks still on the base.
    pub(crate) mode: CacheMode,
    /// Prefetch windows (kernel hints and the O_DIRECT detector).
    pub(crate) readahead: Readahead,
    /// Copy base blocks that a read fully covers into the overlay.
    pub(crate) cow_on_read: bool,
    /// Bytes of background cache work queued or in flight per queue;
    /// requests beyond it are dropped (they are only prefetch).
    pub(crate) budget: u64,
}

impl CachePolicy {
    /// The prefetch window a device's queues follow: none when every file
    /// the device reads lives in memory (`in_memory`: tmpfs) and prefetch
    /// would only warm page caches, which hold every page of such files
    /// already: there it only costs (docs/benchmarks.md, "The most any
    /// prefetch can give"). With `Cow` a prefetch copies into the overlay,
    /// which is asked for whatever the files.
    pub(crate) fn readahead_for(&self, in_memory: bool) -> Readahead {
        match (in_memory, self.mode) {
            (true, CacheMode::Ignore | CacheMode::Passthrough | CacheMode::Read) => Readahead::Off,
            _ => self.readahead,
        }
    }
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            mode: CacheMode::Passthrough,
            readahead: Readahead::Auto,
            cow_on_read: false,
            budget: 8 << 20,
        }
    }
}
