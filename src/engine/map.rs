//! The block-state map: two bits per COW block, shared by every queue thread.
//!
//! Each block is `Unallocated` (reads come from the base), `Allocated` (reads
//! come from the overlay's data area: written there), `Copied` (the same, but
//! the data was copied up from below and equals it) or `Zero` (reads are
//! zeros, the base is hidden). Readers look a block up with one atomic load; writers change a
//! block with an atomic read-modify-write on the word that holds it, so there
//! is no global lock anywhere on the I/O path. Changes mark the 4 KiB map page
//! they fall in as dirty; a flush writes only dirty pages to the overlay.
//!
//! The words live in a [`MapMemory`]: plain heap memory, or a file mapped
//! shared (under `/run`) so that the live map outlives a crashed daemon.

use crate::engine::Error;
use crate::engine::locks::RangeGuard;
use crate::sys::MappedFile;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a read of one block returns, and where a write to it must go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlockState {
    /// Never written: reads come from the base.
    Unallocated = 0,
    /// Written: the overlay's data area holds the block.
    Allocated = 1,
    /// Discarded or zeroed as a whole block: reads return zeros.
    Zero = 2,
    /// Copied up from below (copy-on-read, copy-on-cache, readahead copies):
    /// the overlay's data area holds the same bytes as the backing. Reads
    /// and writes treat it as `Allocated` (a write over it makes it
    /// `Allocated`); `map` reports it where it came from and a commit skips
    /// it. Overlays of format version 1 never hold it.
    Copied = 3,
}

impl BlockState {
    fn from_bits(bits: u64) -> Option<BlockState> {
        match bits {
            0 => Some(BlockState::Unallocated),
            1 => Some(BlockState::Allocated),
            2 => Some(BlockState::Zero),
            3 => Some(BlockState::Copied),
            _ => None,
        }
    }

    /// Whether the overlay's data area holds the block (`Allocated` or
    /// `Copied`): reads are served from there.
    pub fn in_overlay(self) -> bool {
        matches!(self, BlockState::Allocated | BlockState::Copied)
    }
}

const BITS_PER_BLOCK: u64 = 2;
const BLOCKS_PER_WORD: u64 = 64 / BITS_PER_BLOCK;
/// Granularity of map persistence: a flush rewrites whole map pages.
pub(crate) const MAP_PAGE: usize = 4096;
const WORDS_PER_PAGE: usize = MAP_PAGE / 8;

/// Bytes the map of `blocks` blocks takes, rounded up to whole map pages.
pub fn map_bytes(blocks: u64) -> u64 {
    let words = blocks.div_ceil(BLOCKS_PER_WORD);
    (words * 8).div_ceil(MAP_PAGE as u64) * MAP_PAGE as u64
}

/// Where the map's words live.
pub enum MapMemory {
    /// Process memory: lost with the process.
    Heap(Box<[AtomicU64]>),
    /// A file mapped shared: survives the process (not a reboot on tmpfs).
    Mapped(MappedFile),
}

impl MapMemory {
    /// Zeroed heap memory (all blocks `Unallocated`) for `blocks` blocks.
    pub fn heap(blocks: u64) -> MapMemory {
        let words = map_bytes(blocks) as usize / 8;
        MapMemory::Heap((0..words).map(|_| AtomicU64::new(0)).collect())
    }

    fn words(&self) -> &[AtomicU64] {
        match self {
            MapMemory::Heap(w) => w,
            MapMemory::Mapped(m) => m.words(),
        }
    }
}

/// Panics unless `locked` covers `blocks`: a change of state outside the
/// locked range would break the concurrency rule silently.
fn check_locked(locked: &RangeGuard<'_>, blocks: &Range<u64>) {
    let held = locked.blocks();
    assert!(
        blocks.is_empty() || (held.start <= blocks.start && blocks.end <= held.end),
        "map change of blocks {blocks:?} under the locks of {held:?}"
    );
}

/// Whether the data behind a change of the map is durable already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DataState {
    /// Written with `RWF_DSYNC` (or O_DIRECT with it): on stable storage
    /// when the write completed.
    Durable,
    /// Written, and durable only after the overlay's next data sync.
    Unsynced,
}

/// The live map of one device. See the module documentation.
pub struct BlockMap {
    mem: MapMemory,
    blocks: u64,
    /// One bit per map page: set when a block in that page changed since the
    /// page was last taken by [`BlockMap::take_dirty_pages`].
    dirty: Box<[AtomicU64]>,
    /// How many changes were made whose data may not be durable (every
    /// change but an `allocate` of `DataState::Durable` data); counted
    /// before the change is stored, so that a page snapshot that holds a
    /// change is taken after its count.
    unsynced: AtomicU64,
}

/// How many blocks are in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StateCounts {
    pub unallocated: u64,
    /// Blocks the overlay's data area holds: `Allocated` and `Copied`.
    pub allocated: u64,
    pub zero: u64,
    /// Of `allocated`, those `Copied` from below.
    pub copied: u64,
}

impl BlockMap {
    /// A map over `mem`, which must hold at least [`map_bytes`]`(blocks)`.
    pub(crate) fn new(mem: MapMemory, blocks: u64) -> BlockMap {
        assert!(mem.words().len() as u64 * 8 >= map_bytes(blocks));
        let pages = map_bytes(blocks) as usize / MAP_PAGE;
        BlockMap {
            mem,
            blocks,
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            unsynced: AtomicU64::new(0),
        }
    }

    pub(crate) fn blocks(&self) -> u64 {
        self.blocks
    }

    fn slot(block: u64) -> (usize, u32) {
        (
            (block / BLOCKS_PER_WORD) as usize,
            ((block % BLOCKS_PER_WORD) * BITS_PER_BLOCK) as u32,
        )
    }

    pub fn get(&self, block: u64) -> BlockState {
        debug_assert!(block < self.blocks);
        let (w, shift) = Self::slot(block);
        let bits = (self.mem.words()[w].load(Ordering::Acquire) >> shift) & 3;
        BlockState::from_bits(bits).expect("two bits are always a state")
    }

    fn mark_dirty(&self, word: usize) {
        let page = word / WORDS_PER_PAGE;
        self.dirty[page / 64].fetch_or(1 << (page % 64), Ordering::Release);
    }

    /// How many changes so far may name data that is not durable yet (see
    /// `unsynced`): a flush that reads the same count as the latest data
    /// sync began with takes only pages whose data is durable.
    pub(crate) fn unsynced_changes(&self) -> u64 {
        self.unsynced.load(Ordering::SeqCst)
    }

    /// Sets `block` to `state` unconditionally. Only through the mutators
    /// below, which take the lock guard, or at load time.
    fn set(&self, block: u64, state: BlockState) {
        self.set_with(block, state, DataState::Unsynced);
    }

    /// `set`, counting the change unless its data is `Durable`.
    fn set_with(&self, block: u64, state: BlockState, data: DataState) {
        if data == DataState::Unsynced {
            self.unsynced.fetch_add(1, Ordering::SeqCst);
        }
        let (w, shift) = Self::slot(block);
        let mask = 3u64 << shift;
        let word = &self.mem.words()[w];
        let _ = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            Some((v & !mask) | ((state as u64) << shift))
        });
        self.mark_dirty(w);
    }

    /// Sets every block of `blocks` to `state`. `locked` holds their locks
    /// (the concurrency rule in `locks`): a state change without them does
    /// not compile.
    pub(crate) fn set_range(&self, locked: &RangeGuard<'_>, blocks: Range<u64>, state: BlockState) {
        check_locked(locked, &blocks);
        for b in blocks {
            self.set(b, state);
        }
    }

    /// Marks the blocks of `blocks` that are not `Allocated` as `Allocated`
    /// (their data is in the overlay, written there; `locked` holds their
    /// locks): a `Copied` block written over becomes `Allocated`. Blocks
    /// already allocated are left alone, so their map pages stay clean.
    /// `data` says whether the written data is durable already.
    pub(crate) fn allocate(&self, locked: &RangeGuard<'_>, blocks: Range<u64>, data: DataState) {
        check_locked(locked, &blocks);
        for b in blocks {
            if self.get(b) != BlockState::Allocated {
                self.set_with(b, BlockState::Allocated, data);
            }
        }
    }

    /// The state of `block` and how many blocks from it, up to `end`, share it.
    pub(crate) fn run_at(&self, block: u64, end: u64) -> (BlockState, u64) {
        let state = self.get(block);
        let mut next = block + 1;
        while next < end && self.get(next) == state {
            next += 1;
        }
        (state, next - block)
    }

    /// The runs of `Unallocated` blocks in `blocks`, in order. Each run is
    /// looked up when the one before it has been taken, so a caller holding
    /// the blocks' locks may change a run's state before asking for the next.
    pub(crate) fn unallocated_runs(
        &self,
        blocks: std::ops::Range<u64>,
    ) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        let mut b = blocks.start;
        std::iter::from_fn(move || {
            while b < blocks.end {
                let (state, n) = self.run_at(b, blocks.end);
                let run = b..b + n;
                b += n;
                if state == BlockState::Unallocated {
                    return Some(run);
                }
            }
            None
        })
    }

    /// Whether every block in `blocks` is `Allocated` (not `Copied`: a write
    /// over a copied block changes its state, under its lock).
    pub(crate) fn all_allocated(&self, blocks: std::ops::Range<u64>) -> bool {
        blocks
            .into_iter()
            .all(|b| self.get(b) == BlockState::Allocated)
    }

    /// How many blocks are in each state: a word at a time, so that the
    /// map of a TiB device (2^28 blocks) is counted quickly.
    pub fn counts(&self) -> StateCounts {
        const LOW: u64 = 0x5555_5555_5555_5555;
        let mut c = StateCounts::default();
        let words = self.mem.words();
        let full = (self.blocks / BLOCKS_PER_WORD) as usize;
        for w in &words[..full] {
            let v = w.load(Ordering::Relaxed);
            // Per pair: low bit alone Allocated (01), high bit alone Zero
            // (10), both Copied (11).
            let (lo, hi) = (v & LOW, (v >> 1) & LOW);
            c.allocated += lo.count_ones() as u64;
            c.copied += (lo & hi).count_ones() as u64;
            c.zero += (hi & !lo).count_ones() as u64;
        }
        for b in full as u64 * BLOCKS_PER_WORD..self.blocks {
            match self.get(b) {
                BlockState::Allocated => c.allocated += 1,
                BlockState::Copied => {
                    c.allocated += 1;
                    c.copied += 1;
                }
                BlockState::Zero => c.zero += 1,
                BlockState::Unallocated => {}
            }
        }
        c.unallocated = self.blocks - c.allocated - c.zero;
        c
    }

    /// Replaces the whole map with its on-disk form (little-endian words).
    /// Every two bits are a state; bits past the last block must be clear.
    /// Marks nothing dirty.
    pub(crate) fn load(&self, bytes: &[u8]) -> Result<(), Error> {
        let words = self.mem.words();
        for (i, chunk) in bytes.chunks_exact(8).enumerate().take(words.len()) {
            let v = u64::from_le_bytes(chunk.try_into().unwrap());
            words[i].store(v, Ordering::Release);
        }
        match trailing_bits(bytes, self.blocks) {
            Some(at) => Err(Error::corrupt(format!(
                "the map has bits set past its last block (byte {at})"
            ))),
            None => Ok(()),
        }
    }

    /// Calls `f` with every block that is not `Unallocated` and its state,
    /// in order; words with none are passed over in one load.
    pub(crate) fn for_each_held(&self, mut f: impl FnMut(u64, BlockState)) {
        for (i, w) in self.mem.words().iter().enumerate() {
            let mut v = w.load(Ordering::Acquire);
            while v != 0 {
                let pair = v.trailing_zeros() as u64 / BITS_PER_BLOCK;
                let block = i as u64 * BLOCKS_PER_WORD + pair;
                if block >= self.blocks {
                    return;
                }
                let shift = pair * BITS_PER_BLOCK;
                f(block, BlockState::from_bits((v >> shift) & 3).unwrap());
                v &= !(3 << shift);
            }
        }
    }

    /// The first block in `state`, if any.
    pub(crate) fn find(&self, state: BlockState) -> Option<u64> {
        (0..self.blocks).find(|&b| self.get(b) == state)
    }

    /// Marks every page dirty, so that the next flush writes the whole map;
    /// counted as a change whose data may not be durable.
    pub(crate) fn mark_all_dirty(&self) {
        self.unsynced.fetch_add(1, Ordering::SeqCst);
        for w in (0..self.mem.words().len()).step_by(WORDS_PER_PAGE) {
            self.mark_dirty(w);
        }
    }

    /// Takes a snapshot of every dirty page and clears its dirty bit, as
    /// `(page index, page bytes)`. A change racing with this either lands in
    /// the snapshot or marks the page dirty again, never neither.
    pub(crate) fn take_dirty_pages(&self) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        for (i, d) in self.dirty.iter().enumerate() {
            let mut bits = d.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let page = i * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                out.push((page as u64, self.page_bytes(page)));
            }
        }
        out
    }

    fn page_bytes(&self, page: usize) -> Vec<u8> {
        let words = &self.mem.words()[page * WORDS_PER_PAGE..(page + 1) * WORDS_PER_PAGE];
        words
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect()
    }
}

/// The first byte of the on-disk map `bytes` of `blocks` blocks that has a
/// bit set past the last block's two bits, if any.
pub(crate) fn trailing_bits(bytes: &[u8], blocks: u64) -> Option<usize> {
    let used_bits = blocks * BITS_PER_BLOCK;
    let tail = (used_bits / 8) as usize;
    let partial = (used_bits % 8) as u32;
    if partial != 0 && tail < bytes.len() && bytes[tail] >> partial != 0 {
        return Some(tail);
    }
    let from = tail + usize::from(partial != 0);
    bytes
        .get(from..)
        .and_then(|rest| rest.iter().position(|&b| b != 0))
        .map(|i| from + i)
}

/// A map of 4 KiB blocks in the given states, with its geometry (tests).
#[cfg(test)]
pub(crate) fn test_map(states: &[BlockState]) -> (BlockMap, crate::engine::geometry::Geometry) {
    let n = states.len() as u64;
    let map = BlockMap::new(MapMemory::heap(n), n);
    for (i, s) in states.iter().enumerate() {
        map.set(i as u64, *s);
    }
    (
        map,
        crate::engine::geometry::Geometry::new(n * 4096, 4096).unwrap(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::locks::BlockLocks;

    #[test]
    fn states_round_trip_and_runs_merge() {
        let m = BlockMap::new(MapMemory::heap(100), 100);
        assert_eq!(m.get(99), BlockState::Unallocated);
        m.set(5, BlockState::Allocated);
        m.set(6, BlockState::Allocated);
        m.set(7, BlockState::Zero);
        assert_eq!(m.run_at(0, 100), (BlockState::Unallocated, 5));
        assert_eq!(m.run_at(5, 100), (BlockState::Allocated, 2));
        assert_eq!(m.run_at(7, 100), (BlockState::Zero, 1));
        let locks = BlockLocks::default();
        m.allocate(&locks.try_lock(6, 2).unwrap(), 6..8, DataState::Unsynced);
        assert_eq!(m.get(7), BlockState::Allocated);
        assert_eq!(m.counts().allocated, 3);
        m.set(40, BlockState::Zero);
        m.set(99, BlockState::Zero);
        let c = m.counts();
        assert_eq!((c.unallocated, c.allocated, c.zero), (95, 3, 2));
    }

    #[test]
    fn changes_are_counted_unless_their_data_is_durable() {
        let m = BlockMap::new(MapMemory::heap(100), 100);
        let locks = BlockLocks::default();
        m.allocate(&locks.try_lock(0, 4).unwrap(), 0..4, DataState::Durable);
        assert_eq!(m.unsynced_changes(), 0);
        assert_eq!(
            m.take_dirty_pages().len(),
            1,
            "a durable change is persisted too"
        );
        m.allocate(&locks.try_lock(4, 2).unwrap(), 4..6, DataState::Unsynced);
        assert_eq!(m.unsynced_changes(), 2);
        // Blocks already allocated change nothing and count nothing.
        m.allocate(&locks.try_lock(4, 2).unwrap(), 4..6, DataState::Unsynced);
        assert_eq!(m.unsynced_changes(), 2);
        m.set_range(&locks.try_lock(10, 1).unwrap(), 10..11, BlockState::Zero);
        assert_eq!(m.unsynced_changes(), 3);
        m.mark_all_dirty();
        assert_eq!(m.unsynced_changes(), 4);
    }

    #[test]
    fn unallocated_runs_are_found_in_order() {
        use BlockState::*;
        let (m, _) = test_map(&[
            Allocated,
            Unallocated,
            Unallocated,
            Zero,
            Unallocated,
            Allocated,
            Unallocated,
        ]);
        let runs: Vec<_> = m.unallocated_runs(0..7).collect();
        assert_eq!(runs, vec![1..3, 4..5, 6..7]);
        assert_eq!(
            m.unallocated_runs(2..6).collect::<Vec<_>>(),
            vec![2..3, 4..5]
        );
        // A run taken while iterating does not change the runs after it.
        let locks = BlockLocks::default();
        let held = locks.try_lock(0, 7).unwrap();
        let mut it = m.unallocated_runs(0..7);
        m.set_range(&held, it.next().unwrap(), Allocated);
        assert_eq!(it.collect::<Vec<_>>(), vec![4..5, 6..7]);
        assert!(m.unallocated_runs(0..1).next().is_none());
    }

    #[test]
    fn dirty_pages_are_taken_once() {
        let blocks = 3 * 16384;
        let m = BlockMap::new(MapMemory::heap(blocks), blocks);
        m.set(16384 * 2 + 1, BlockState::Zero);
        let pages = m.take_dirty_pages();
        assert_eq!(pages.len(), 1);
        assert_eq!(pages[0].0, 2);
        assert!(m.take_dirty_pages().is_empty());
        let copy = BlockMap::new(MapMemory::heap(blocks), blocks);
        let mut image = vec![0u8; map_bytes(blocks) as usize];
        image[2 * MAP_PAGE..3 * MAP_PAGE].copy_from_slice(&pages[0].1);
        copy.load(&image).unwrap();
        assert_eq!(copy.get(16384 * 2 + 1), BlockState::Zero);
    }

    #[test]
    #[should_panic(expected = "under the locks of")]
    fn a_change_outside_the_held_locks_panics() {
        let m = BlockMap::new(MapMemory::heap(10), 10);
        let locks = BlockLocks::default();
        m.allocate(&locks.try_lock(2, 2).unwrap(), 3..5, DataState::Unsynced);
    }

    #[test]
    fn load_takes_every_state_and_rejects_bits_past_the_end() {
        let m = BlockMap::new(MapMemory::heap(10), 10);
        let mut image = vec![0u8; map_bytes(10) as usize];
        image[0] = 0b11 << 2;
        m.load(&image).unwrap();
        assert_eq!(m.get(1), BlockState::Copied);
        assert_eq!(m.find(BlockState::Copied), Some(1));
        // Block 9 is bits 18-19, in byte 2; bit 20 is past the end.
        image[2] = 0b1_0000;
        assert!(m.load(&image).is_err());
        image[2] = 0;
        image[100] = 1;
        assert!(m.load(&image).is_err());
    }

    #[test]
    fn copied_blocks_count_as_held_and_a_write_makes_them_allocated() {
        use BlockState::*;
        let states: Vec<_> = (0..100)
            .map(|i| [Unallocated, Allocated, Zero, Copied][(i * 7 % 11) % 4])
            .collect();
        let (m, _) = test_map(&states);
        let c = m.counts();
        let n = |s| states.iter().filter(|&&x| x == s).count() as u64;
        assert_eq!(c.copied, n(Copied));
        assert_eq!(c.allocated, n(Allocated) + n(Copied));
        assert_eq!(c.zero, n(Zero));
        assert_eq!(c.unallocated, n(Unallocated));
        let b = states.iter().position(|&s| s == Copied).unwrap() as u64;
        assert!(
            !m.all_allocated(b..b + 1),
            "a write over a copy takes the lock"
        );
        let locks = BlockLocks::default();
        m.allocate(
            &locks.try_lock(b, 1).unwrap(),
            b..b + 1,
            DataState::Unsynced,
        );
        assert_eq!(m.get(b), Allocated);
    }
}
