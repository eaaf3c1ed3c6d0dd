//! A copy-on-write device over a base and an overlay, with the synchronous
//! executor: every plan from [`crate::engine::plan`] carried out with
//! positional reads and writes on the calling thread.
//!
//! The device state — geometry, map, locks, overlay header — is what the
//! io_uring executor in `crate::ublk` shares too; it only replaces the way
//! the I/O of a plan is issued.

use crate::engine::base::BaseIdentity;
use crate::engine::cache::{
    CacheAction, CacheMode, FADVISE_PIECE, cache_blocks, fadvise_pieces, plan_cache,
};
use crate::engine::geometry::Geometry;
use crate::engine::locks::{BlockLocks, MAX_LOCK_BLOCKS, RangeGuard};
use crate::engine::map::{BlockMap, BlockState, MAP_PAGE, MapMemory, map_bytes};
use crate::engine::overlay::{OpenCheck, Overlay};
use crate::engine::plan::{self, Fill, ReadRun, ReadSource};
use crate::engine::storage::Storage;
use crate::engine::write;
use crate::engine::{Error, IoContext};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Where the live map of an opened overlay comes from.
pub enum MapSource {
    /// Fresh memory, filled from the overlay's persisted map.
    Load(MapMemory),
    /// Memory that already holds the live map of a daemon that died (a shared
    /// mapping under /run): it is newer than the overlay's map.
    Live(MapMemory),
}

/// A device: base, overlay, live map and block locks.
pub struct CowDevice<B: Storage, O: Storage> {
    geo: Geometry,
    base: B,
    overlay: Overlay<O>,
    map: BlockMap,
    locks: BlockLocks,
    flush: FlushGate,
    was_clean: bool,
    /// Whether copies from the base may still be tried inside the kernel;
    /// cleared the first time base and overlay turn out unable to.
    kernel_copy: AtomicBool,
}

/// The one flush serializer of a device and its failed state, shared by
/// both executors.
#[derive(Default)]
struct FlushGate {
    /// Held by the flush in progress, so that map snapshots reach the
    /// overlay in the order they were taken.
    turn: Mutex<()>,
    /// Set for good when a step of a flush failed.
    failed: AtomicBool,
    /// Protects the note that `failed` was set, for [`CowDevice::wait_failed`].
    noted: Mutex<bool>,
    wake: Condvar,
    /// The number of the latest flush that began (took its map pages;
    /// numbered from 1).
    begun: AtomicU64,
    /// The number of the latest flush that completed all its steps.
    completed: AtomicU64,
    /// The map's `unsynced_changes` when the latest data sync that
    /// completed began: every change counted up to there has durable data.
    synced_changes: AtomicU64,
}

/// A FLUSH's place in line, taken when it arrives
/// ([`CowDevice::flush_ticket`]). A flush that began after it and completed
/// made durable every write acknowledged before it, which is all this FLUSH
/// owes: it is then answered without I/O of its own ([`CowDevice::covered`]),
/// so that FLUSHes queued behind one in progress share the next one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FlushTicket {
    /// `begun` when the FLUSH arrived.
    arrived: u64,
}

/// The flush turn of a device: while it is held no other flush runs. The
/// steps of a flush, the same for every executor:
///
/// 1. [`FlushTurn::check`]: a device whose earlier flush failed fails at once;
/// 2. [`FlushTurn::take_pages`]: the flush begins (it takes a number), with
///    a snapshot of the dirty map pages, taken *before* the data sync, so
///    that every `Allocated` in it names data written before the sync;
/// 3. sync the overlay's data; 4. write the pages ([`Overlay::map_page_pos`]);
///    5. sync again (skip 4 and 5 when there are no pages; an executor may
///    make 4 and 5 one durable write, `RWF_DSYNC`, for a single page);
///    after a FUA write whose data is durable, step 3 is skipped when no
///    page taken may name data that is not ([`FlushTurn::data_sync_needed`]),
///    and such a flush is not a FLUSH: it skips step 6's `completed`;
/// 6. on any failure, [`FlushTurn::fail`]; on success,
///    [`FlushTurn::completed`], which answers the FLUSHes that arrived before
///    step 2 ([`FlushTicket`]).
///
/// A failed sync may have lost data that the kernel will not report again
/// (a writeback error is reported once): the pages of a failed flush are
/// not retried, and the device fails every later flush, so no map that may
/// name lost data is ever persisted. The overlay keeps its map as of its
/// last good flush.
pub(crate) struct FlushTurn<'a, B: Storage, O: Storage> {
    dev: &'a CowDevice<B, O>,
    _turn: MutexGuard<'a, ()>,
    /// This flush's number, once it began (`take_pages`).
    number: u64,
    /// The map's `unsynced_changes` right after `take_pages`.
    changes: u64,
}

impl<B: Storage, O: Storage> FlushTurn<'_, B, O> {
    /// Step 1: an error if an earlier flush failed.
    pub(crate) fn check(&self) -> Result<(), Error> {
        if self.dev.failed() {
            return Err(failed_error());
        }
        Ok(())
    }

    /// Step 2: the flush begins; the dirty map pages, as `(page, bytes)`.
    pub(crate) fn take_pages(&mut self) -> Vec<(u64, Vec<u8>)> {
        self.number = self.dev.flush.begun.fetch_add(1, Ordering::SeqCst) + 1;
        let pages = self.dev.map.take_dirty_pages();
        // Read after the snapshot: a change it holds was counted before.
        self.changes = self.dev.map.unsynced_changes();
        pages
    }

    /// Whether the pages taken may name data that is not durable yet: some
    /// change was counted since the latest data sync began (`DataState`).
    /// Without one, every change since was a FUA write's durable data.
    pub(crate) fn data_sync_needed(&self) -> bool {
        self.changes != self.dev.flush.synced_changes.load(Ordering::SeqCst)
    }

    /// Step 3 succeeded: every change counted before `take_pages` returned
    /// has its data durable (it was written before it was counted).
    pub(crate) fn data_synced(&self) {
        self.dev
            .flush
            .synced_changes
            .fetch_max(self.changes, Ordering::SeqCst);
    }

    /// Step 6, on success: every FLUSH that arrived before this flush
    /// began is answered by it.
    pub(crate) fn completed(&self) {
        debug_assert!(self.number > 0, "a flush completed before it began");
        self.dev
            .flush
            .completed
            .fetch_max(self.number, Ordering::SeqCst);
    }

    /// Step 6: marks the device failed (for good) after `what` failed with
    /// `e`; returns the error to report.
    pub(crate) fn fail(&self, what: &str, e: std::io::Error) -> Error {
        let gate = &self.dev.flush;
        if !gate.failed.swap(true, Ordering::AcqRel) {
            log::error!(
                "{what}: {e}; the overlay keeps its map as of its last good flush, \
                 and every later flush fails"
            );
            *gate.noted.lock().unwrap_or_else(|e| e.into_inner()) = true;
            gate.wake.notify_all();
        }
        Error::Io {
            context: what.into(),
            source: e,
        }
    }
}

/// After a stop without a clean close, takes every `Copied` block of the
/// map (the overlay's own, or a dead daemon's live one) as written: a write
/// over a copy changes the block's state only once its data is written
/// (and in the overlay's map only at the next flush), so a copy may now
/// hold a write whose state change was lost, and no longer match what is
/// below it (which `commit`, `push` and `map` rely on). Its pages are
/// dirty: the next flush persists it.
fn forget_copies(map: &BlockMap) {
    let locks = BlockLocks::default();
    let mut copies = Vec::new();
    map.for_each_held(|b, s| {
        if s == BlockState::Copied {
            copies.push(b);
        }
    });
    for b in copies {
        let g = locks.try_lock(b, 1).expect("the map is not shared yet");
        map.set_range(&g, b..b + 1, BlockState::Allocated);
    }
}

/// What a flush of a failed device reports.
fn failed_error() -> Error {
    Error::Io {
        context: "an earlier flush of the overlay failed; nothing more is persisted".into(),
        source: std::io::Error::from_raw_os_error(libc::EIO),
    }
}

/// Base data of consecutive blocks read for copying into the overlay;
/// [`CowDevice::copy_install`] installs only blocks still `Unallocated`.
pub struct CopyJob {
    pub(crate) first: u64,
    pub(crate) data: Vec<u8>,
}

impl<B: Storage, O: Storage> CowDevice<B, O> {
    /// A device with a new overlay written into the empty `overlay`.
    pub fn create(
        base: B,
        id: &BaseIdentity,
        overlay: O,
        block_size: u32,
        map: MapMemory,
    ) -> Result<Self, Error> {
        let geo = Geometry::new(id.size, block_size)?;
        let overlay = Overlay::create(overlay, geo, id)?;
        Ok(Self::assemble(
            base,
            overlay,
            BlockMap::new(map, geo.blocks()),
            false,
        ))
    }

    /// A device over an existing overlay, checked against the base. Marks the
    /// overlay in use (not clean) before returning. A live map is checked
    /// first: every block must have a state, and every block the overlay's
    /// map has written must be written in it too (a live map only moves on
    /// from the overlay's).
    pub fn open(base: B, overlay: O, check: OpenCheck<'_>, map: MapSource) -> Result<Self, Error> {
        let mut overlay = Overlay::open(overlay, check)?;
        let blocks = overlay.geometry().blocks();
        let was_clean = overlay.header().clean();
        let (mem, live) = match map {
            MapSource::Load(mem) => (mem, false),
            // A clean overlay's own map is whole (its daemon persisted it,
            // then marked it clean): a live map left beside it is stale,
            // and its memory takes the overlay's map instead.
            MapSource::Live(mem) if was_clean => (mem, false),
            MapSource::Live(mem) => (mem, true),
        };
        let map = BlockMap::new(mem, blocks);
        if live {
            // The live map of a device whose flush (or whose recovery's
            // first sync) failed may name data that never reached the
            // disk; the overlay stays as of its last good flush.
            if overlay.header().failed() {
                return Err(Error::invalid(
                    "the overlay is marked failed (a sync of it failed): its live map may \
                     name data that was lost, and the overlay stays as of its last good flush",
                ));
            }
            check_live_map(&map, &overlay)?;
            map.mark_all_dirty();
        } else {
            overlay.read_map(&map)?;
        }
        if !was_clean {
            forget_copies(&map);
        }
        // Overlays made before the map was allocated at creation.
        if let Err(e) = overlay.allocate_map() {
            log::warn!("{e}: a flush may fail for lack of space");
        }
        if let Err(e) = overlay.set_clean(false) {
            // The sync may have reported a writeback error of a dead
            // daemon's writes, which the kernel reports only once: the live
            // map may name lost data. Marked failed, it is never taken.
            if live && let Err(m) = overlay.mark_failed() {
                log::error!("marking the overlay failed: {m}");
            }
            return Err(e);
        }
        Ok(Self::assemble(base, overlay, map, was_clean))
    }

    fn assemble(base: B, overlay: Overlay<O>, map: BlockMap, was_clean: bool) -> Self {
        CowDevice {
            geo: overlay.geometry(),
            base,
            overlay,
            map,
            locks: BlockLocks::default(),
            flush: FlushGate::default(),
            was_clean,
            kernel_copy: AtomicBool::new(true),
        }
    }

    pub(crate) fn geometry(&self) -> &Geometry {
        &self.geo
    }

    pub fn map(&self) -> &BlockMap {
        &self.map
    }

    pub(crate) fn locks(&self) -> &BlockLocks {
        &self.locks
    }

    pub(crate) fn base(&self) -> &B {
        &self.base
    }

    pub(crate) fn overlay(&self) -> &Overlay<O> {
        &self.overlay
    }

    /// Whether the overlay had been closed cleanly before this open.
    pub(crate) fn was_clean(&self) -> bool {
        self.was_clean
    }

    /// Waits (yielding the thread) until `blocks` are locked.
    fn lock(&self, blocks: Range<u64>) -> RangeGuard<'_> {
        write::run_ready(write::lock(self, &mut Yield, blocks))
    }

    /// READ `buf.len()` bytes at `off`.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.geo.check_range(off, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut runs = Vec::new();
        // The base reads through a chain itself (`Storage for Backed`).
        let below = plan::raw_base;
        plan::plan_read(
            &self.map,
            &self.geo,
            off,
            buf.len() as u64,
            below,
            &mut runs,
        );
        for ReadRun {
            source,
            off,
            len,
            buf_off,
        } in runs
        {
            let dst = &mut buf[buf_off..buf_off + len as usize];
            match source {
                ReadSource::Base | ReadSource::Layer(_) => self
                    .base
                    .read_at(dst, off)
                    .ctx(|| format!("base read at {off}"))?,
                ReadSource::Overlay => self
                    .overlay
                    .storage()
                    .read_at(dst, self.overlay.data_pos(off))
                    .ctx(|| format!("overlay read at {off}"))?,
                ReadSource::Zero => dst.fill(0),
            }
        }
        Ok(())
    }

    /// WRITE `data` at `off`.
    pub fn write(&self, off: u64, data: &[u8]) -> Result<(), Error> {
        self.geo.check_range(off, data.len() as u64)?;
        let chunk = MAX_LOCK_BLOCKS as usize * self.geo.block_size() as usize;
        for (i, piece) in data.chunks(chunk).enumerate() {
            self.write_piece(off + (i * chunk) as u64, piece)?;
        }
        Ok(())
    }

    fn write_piece(&self, off: u64, data: &[u8]) -> Result<(), Error> {
        let mut io = SyncWrite {
            dev: self,
            data,
            fill: Default::default(),
        };
        write::run_ready(write::write(self, &mut io, off, data.len() as u64))
    }

    fn overlay_write(&self, data: &[u8], off: u64) -> Result<(), Error> {
        self.overlay
            .storage()
            .write_at(data, self.overlay.data_pos(off))
            .ctx(|| format!("overlay write at {off}"))
    }

    /// DISCARD or WRITE_ZEROES of `[off, off+len)`: whole blocks become
    /// `Zero` and their overlay space is punched; partial blocks are written
    /// with zeros (the steps of [`write::write_zeroes`]).
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<(), Error> {
        self.geo.check_range(off, len)?;
        if len == 0 {
            return Ok(());
        }
        write::run_ready(write::write_zeroes(self, &mut SyncZero(self), off, len))
    }

    /// Waits for the device's one flush turn (see [`FlushTurn`]).
    pub(crate) fn flush_turn(&self) -> FlushTurn<'_, B, O> {
        FlushTurn {
            dev: self,
            _turn: self.flush.turn.lock().unwrap_or_else(|e| e.into_inner()),
            number: 0,
            changes: 0,
        }
    }

    /// The flush turn if no other flush holds it: for an executor that
    /// must not block its thread.
    pub(crate) fn try_flush_turn(&self) -> Option<FlushTurn<'_, B, O>> {
        let turn = match self.flush.turn.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(FlushTurn {
            dev: self,
            _turn: turn,
            number: 0,
            changes: 0,
        })
    }

    /// A FLUSH arrives: its place in line (see [`FlushTicket`]).
    pub(crate) fn flush_ticket(&self) -> FlushTicket {
        FlushTicket {
            arrived: self.flush.begun.load(Ordering::SeqCst),
        }
    }

    /// Whether a flush that began after `ticket` was taken has completed:
    /// the FLUSH holding it has nothing left to do.
    pub(crate) fn covered(&self, ticket: FlushTicket) -> bool {
        self.flush.completed.load(Ordering::SeqCst) > ticket.arrived
    }

    /// Whether a flush failed: from then on every flush fails and nothing
    /// more is persisted (see [`FlushTurn::fail`]).
    pub fn failed(&self) -> bool {
        self.flush.failed.load(Ordering::Acquire)
    }

    /// Waits up to `patience` for a flush to fail: whether one did.
    pub(crate) fn wait_failed_for(&self, patience: std::time::Duration) -> bool {
        let noted = self.flush.noted.lock().unwrap_or_else(|e| e.into_inner());
        let (noted, _) = self
            .flush
            .wake
            .wait_timeout_while(noted, patience, |n| !*n)
            .unwrap_or_else(|e| e.into_inner());
        *noted
    }

    /// FLUSH with positional I/O, in the steps of [`FlushTurn`].
    pub fn flush(&self) -> Result<(), Error> {
        let ticket = self.flush_ticket();
        let mut turn = self.flush_turn();
        if self.covered(ticket) {
            return Ok(());
        }
        turn.check()?;
        let pages = turn.take_pages();
        let disk = self.overlay.storage();
        disk.sync()
            .map_err(|e| turn.fail("syncing overlay data", e))?;
        turn.data_synced();
        if !pages.is_empty() {
            self.overlay
                .write_map_pages(&pages)
                .map_err(|e| turn.fail("writing the overlay map", e))?;
            disk.sync()
                .map_err(|e| turn.fail("syncing the overlay map", e))?;
        }
        turn.completed();
        Ok(())
    }

    /// Flushes and marks the overlay clean, for a device no request will
    /// reach any more (others may still hold a reference to it). A device
    /// whose flush failed is not marked clean but failed, and fails.
    pub fn shut_down(&self) -> Result<(), Error> {
        let flushed = self.flush();
        if self.failed() {
            if let Err(e) = self.overlay.mark_failed() {
                log::error!("marking the overlay failed: {e}");
            }
            return Err(flushed.err().unwrap_or_else(failed_error));
        }
        flushed?;
        self.overlay.write_clean_flag(true).map(|_| ())
    }

    /// A live snapshot's freeze: flushes, then marks the overlay clean and
    /// frozen (it becomes a layer), and turns the device's exclusive lock on
    /// its file into the shared one that a layer below a device holds. No
    /// request may reach the device from when this is called on; after it
    /// succeeds, none ever may. A device whose flush failed is not frozen.
    pub fn freeze(&self) -> Result<(), Error> {
        // A flush fails once any has failed: a failed device stops here.
        self.flush()?;
        self.overlay.seal()?;
        match self.overlay.storage().as_file() {
            Some(file) => crate::engine::chain::lock(file, false, "the frozen overlay"),
            None => Ok(()),
        }
    }

    /// Marks the overlay failed (see [`Overlay::mark_failed`]), after a flush
    /// failed.
    pub(crate) fn mark_failed(&self) -> Result<(), Error> {
        self.overlay.mark_failed()
    }

    /// Flushes and marks the overlay clean; gives the storage back.
    pub fn close(self) -> Result<(B, O), Error> {
        self.shut_down()?;
        let CowDevice { base, overlay, .. } = self;
        Ok((base, overlay.into_storage()))
    }

    /// A copy of the `Unallocated` blocks of `blocks` from the base into the
    /// overlay inside the kernel (`copy_file_range`: no pass through user
    /// space; a shared extent on file systems that reflink). The blocks'
    /// locks are held through the copy, so a write to them waits for it;
    /// keep `blocks` short. Returns the blocks installed, or `None` (nothing
    /// written) when base and overlay cannot copy in the kernel: then use
    /// [`CowDevice::copy_read`] and [`CowDevice::copy_install`].
    pub fn copy_in_kernel(&self, blocks: Range<u64>) -> Result<Option<u64>, Error> {
        let (Some(src), Some(dst)) = (self.base.as_file(), self.overlay.storage().as_file()) else {
            return Ok(None);
        };
        if !self.kernel_copy.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let guard = self.lock(blocks.clone());
        let mut installed = 0;
        for run in self.map.unallocated_runs(blocks) {
            let from = self.geo.block_start(run.start);
            let to = self.geo.block_end(run.end - 1);
            let mut at = from;
            while at < to {
                let pos = self.overlay.data_pos(at);
                match crate::sys::copy_file_range(src, at, dst, pos, to - at) {
                    Ok(0) => {
                        return Err(Error::invalid(format!("base ends early, at {at}")));
                    }
                    Ok(n) => at += n,
                    Err(e) if at == from && installed == 0 && cannot_copy(&e) => {
                        self.kernel_copy.store(false, Ordering::Relaxed);
                        return Ok(None);
                    }
                    Err(e) => {
                        return Err(Error::Io {
                            context: format!("copying base data at {at} into the overlay"),
                            source: e,
                        });
                    }
                }
            }
            installed += run.end - run.start;
            self.map.set_range(&guard, run, BlockState::Copied);
        }
        Ok(Some(installed))
    }

    /// First half of a copy of `blocks` from the base into the overlay:
    /// reads the base data, without any lock, if any block is `Unallocated`.
    pub fn copy_read(&self, blocks: Range<u64>) -> Result<Option<CopyJob>, Error> {
        if !blocks
            .clone()
            .any(|b| self.map.get(b) == BlockState::Unallocated)
        {
            return Ok(None);
        }
        let start = self.geo.block_start(blocks.start);
        let mut data = vec![0u8; (self.geo.block_end(blocks.end - 1) - start) as usize];
        self.base
            .read_at(&mut data, start)
            .ctx(|| format!("base read at {start}"))?;
        Ok(Some(CopyJob {
            first: blocks.start,
            data,
        }))
    }

    /// Second half: under the blocks' locks, re-checks which blocks are still
    /// `Unallocated` and writes only those, marking them `Allocated`. A block
    /// that a write or discard reached since [`CowDevice::copy_read`] keeps
    /// what that write or discard left. Returns the blocks installed.
    pub fn copy_install(&self, job: CopyJob) -> Result<u64, Error> {
        self.install_copy(job.first, &job.data)
    }

    /// Installs `data`, the bytes below the overlay of the blocks from
    /// `first` on (the last one may be cut at the device's end), as
    /// [`CowDevice::copy_install`] does: only into blocks still
    /// `Unallocated`, under their locks, at most [`MAX_LOCK_BLOCKS`] at a
    /// time. Returns the blocks installed.
    pub fn install_copy(&self, first: u64, data: &[u8]) -> Result<u64, Error> {
        let bs = self.geo.block_size() as u64;
        let end = first + (data.len() as u64).div_ceil(bs);
        let mut installed = 0;
        let mut at = first;
        while at < end {
            let chunk = at..end.min(at + MAX_LOCK_BLOCKS);
            at = chunk.end;
            if !chunk
                .clone()
                .any(|b| self.map.get(b) == BlockState::Unallocated)
            {
                continue;
            }
            let guard = self.lock(chunk.clone());
            for run in self.map.unallocated_runs(chunk) {
                let from = ((run.start - first) * bs) as usize;
                let to = (((run.end - first) * bs) as usize).min(data.len());
                self.overlay_write(&data[from..to], self.geo.block_start(run.start))?;
                installed += run.end - run.start;
                self.map.set_range(&guard, run, BlockState::Copied);
            }
        }
        Ok(installed)
    }

    /// A cache request (see `cache.rs`), carried out synchronously. Copies
    /// go in pieces of at most 1 MiB so that locks are held briefly.
    pub fn cache(&self, off: u64, len: u64, mode: CacheMode) -> Result<CacheDone, Error> {
        let blocks = cache_blocks(&self.geo, off, len)?;
        let mut steps = Vec::new();
        plan_cache(&self.map, &self.geo, blocks, mode, &mut steps);
        let mut done = CacheDone::default();
        let piece_blocks = ((1u64 << 20) / self.geo.block_size() as u64).max(1);
        for st in steps {
            match st.action {
                CacheAction::FadviseOverlay => {
                    let at = self.overlay.data_pos(st.off);
                    for (off, len) in fadvise_pieces(at, st.len, FADVISE_PIECE) {
                        let _ = self.overlay.storage().will_need(off, len);
                    }
                    done.fadvised_overlay += st.len;
                }
                CacheAction::FadviseBase => {
                    for (off, len) in fadvise_pieces(st.off, st.len, FADVISE_PIECE) {
                        let _ = self.base.will_need(off, len);
                    }
                    done.fadvised_base += st.len;
                }
                CacheAction::ReadBase | CacheAction::CopyToOverlay => {
                    let first = self.geo.block_of(st.off);
                    let end = self.geo.block_of(st.off + st.len - 1) + 1;
                    let mut b = first;
                    while b < end {
                        let e = end.min(b + piece_blocks);
                        if st.action == CacheAction::ReadBase {
                            let start = self.geo.block_start(b);
                            let mut buf = vec![0u8; (self.geo.block_end(e - 1) - start) as usize];
                            self.base
                                .read_at(&mut buf, start)
                                .ctx(|| format!("base read at {start}"))?;
                            done.read += buf.len() as u64;
                        } else {
                            let installed = match self.copy_in_kernel(b..e)? {
                                Some(n) => n,
                                None => match self.copy_read(b..e)? {
                                    Some(job) => self.copy_install(job)?,
                                    None => 0,
                                },
                            };
                            done.copied += installed * self.geo.block_size() as u64;
                        }
                        b = e;
                    }
                }
            }
        }
        Ok(done)
    }
}

/// Checks the live map a dead daemon left against `overlay` (see
/// [`CowDevice::open`]); the map is marked all dirty afterwards anyway.
fn check_live_map<O: Storage>(live: &BlockMap, overlay: &Overlay<O>) -> Result<(), Error> {
    let blocks = live.blocks();
    live.mark_all_dirty();
    let mut bytes = vec![0u8; map_bytes(blocks) as usize];
    for (page, data) in live.take_dirty_pages() {
        let at = page as usize * MAP_PAGE;
        bytes[at..at + MAP_PAGE].copy_from_slice(&data);
    }
    // Bits past the last block are never set.
    let used_bits = blocks * 2;
    let tail = (used_bits / 8) as usize;
    let partial = used_bits % 8;
    if (partial != 0 && bytes[tail] >> partial != 0)
        || bytes[tail + usize::from(partial != 0)..]
            .iter()
            .any(|&b| b != 0)
    {
        return Err(Error::corrupt(
            "the live map has bits set past its last block: it is not this device's",
        ));
    }
    let copy = BlockMap::new(MapMemory::heap(blocks), blocks);
    copy.load(&bytes)
        .map_err(|e| Error::corrupt(format!("the live map is damaged: {e}")))?;
    let persisted = BlockMap::new(MapMemory::heap(blocks), blocks);
    overlay.read_map(&persisted)?;
    if let Some(b) = (0..blocks).find(|&b| {
        persisted.get(b) != BlockState::Unallocated && copy.get(b) == BlockState::Unallocated
    }) {
        return Err(Error::corrupt(format!(
            "the live map is older than the overlay's map (block {b} is written in the \
             overlay, not in the live map): it is not this overlay's"
        )));
    }
    Ok(())
}

/// Whether a `copy_file_range` error means these two files cannot copy in
/// the kernel at all, rather than a failed copy.
fn cannot_copy(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

/// What a cache request did, in bytes per action (also the control
/// socket's report of a finished `cache` command).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheDone {
    pub fadvised_overlay: u64,
    pub fadvised_base: u64,
    pub read: u64,
    pub copied: u64,
}

impl std::ops::AddAssign for CacheDone {
    fn add_assign(&mut self, d: CacheDone) {
        self.fadvised_overlay += d.fadvised_overlay;
        self.fadvised_base += d.fadvised_base;
        self.read += d.read;
        self.copied += d.copied;
    }
}

/// How the synchronous executor waits for a lock: it yields its thread.
struct Yield;

impl write::LockWait for Yield {
    async fn wait_for_lock(&mut self) {
        std::thread::yield_now();
    }
}

/// The synchronous executor's I/O for the steps of a WRITE
/// ([`write::WriteIo`]): each write is done when its method returns.
struct SyncWrite<'a, B: Storage, O: Storage> {
    dev: &'a CowDevice<B, O>,
    data: &'a [u8],
    /// The base bytes of the head's and the tail's fill.
    fill: [Vec<u8>; 2],
}

impl<B: Storage, O: Storage> write::LockWait for SyncWrite<'_, B, O> {
    async fn wait_for_lock(&mut self) {
        Yield.wait_for_lock().await
    }
}

impl<B: Storage, O: Storage> write::WriteIo for SyncWrite<'_, B, O> {
    type Error = Error;

    fn unallocated_ready(&self) -> bool {
        false
    }

    async fn read_fills(&mut self, fills: [Option<Fill>; 2]) -> Result<(), Error> {
        for (buf, fill) in self.fill.iter_mut().zip(fills) {
            if let Some(Fill::FromBase { off, len }) = fill {
                buf.resize(len as usize, 0);
                self.dev
                    .base
                    .read_at(buf, off)
                    .ctx(|| format!("base read at {off}"))?;
            }
        }
        Ok(())
    }

    fn write_fill(&mut self, slot: usize, fill: Fill) -> Result<(), Error> {
        match fill {
            Fill::FromBase { off, .. } => self.dev.overlay_write(&self.fill[slot], off),
            Fill::Zeros { off, len } => self.dev.overlay_write(&vec![0u8; len as usize], off),
        }
    }

    async fn write_data(&mut self, off: u64, _: crate::engine::write::Behind) -> Result<(), Error> {
        self.dev.overlay_write(self.data, off)
    }

    async fn complete(&mut self) -> Result<(), Error> {
        Ok(())
    }

    /// Positional writes through the page cache: durable at a flush.
    fn data_durable(&self) -> bool {
        false
    }
}

/// The synchronous executor's I/O for the steps of a DISCARD or
/// WRITE_ZEROES ([`write::ZeroIo`]).
struct SyncZero<'a, B: Storage, O: Storage>(&'a CowDevice<B, O>);

impl<B: Storage, O: Storage> write::LockWait for SyncZero<'_, B, O> {
    async fn wait_for_lock(&mut self) {
        Yield.wait_for_lock().await
    }
}

impl<B: Storage, O: Storage> write::ZeroIo for SyncZero<'_, B, O> {
    type Error = Error;

    async fn write_zeros(&mut self, off: u64, len: u64) -> Result<(), Error> {
        self.0.write(off, &vec![0u8; len as usize])
    }

    async fn punch(&mut self, off: u64, len: u64) {
        let overlay = &self.0.overlay;
        let _ = overlay.storage().punch(overlay.data_pos(off), len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::storage::SimDisk;
    use std::sync::Arc;

    const BS: u32 = 4096;
    const SIZE: u64 = 64 * BS as u64;

    fn base() -> (SimDisk, BaseIdentity) {
        let disk = SimDisk::new(vec![0xab; SIZE as usize]);
        let id = BaseIdentity::compute(&disk, SIZE, 1).unwrap();
        (disk, id)
    }

    fn reopen<O: Storage>(overlay: O, map: MapSource) -> Result<CowDevice<SimDisk, O>, Error> {
        let (b, id) = base();
        let check = OpenCheck {
            base: &id,
            block_size: None,
            force: false,
        };
        CowDevice::open(b, overlay, check, map)
    }

    /// Live map memory whose first word is `w0` (two bits a block), the
    /// rest zero.
    fn live_words(w0: u64) -> MapMemory {
        let mem = MapMemory::heap(SIZE / BS as u64);
        if let MapMemory::Heap(w) = &mem {
            w[0].store(w0, Ordering::Relaxed);
        }
        mem
    }

    type Dev = CowDevice<SimDisk, Arc<SimDisk>>;

    fn new_device() -> (Dev, Arc<SimDisk>) {
        let (b, id) = base();
        let overlay = Arc::new(SimDisk::new(Vec::new()));
        let blocks = SIZE / BS as u64;
        let dev = CowDevice::create(b, &id, overlay.clone(), BS, MapMemory::heap(blocks)).unwrap();
        (dev, overlay)
    }

    /// A block is marked written only once all its bytes are in the
    /// overlay: a WRITE one of whose overlay writes fails (after `ok` that
    /// succeed: fills first, then the data) leaves its blocks as they were.
    #[test]
    fn a_write_that_failed_marks_no_block() {
        let bs = BS as u64;
        for (ok, off, len) in [
            (0, 0, bs),
            (0, 512, 1024),
            (1, 512, 1024),
            (1, bs - 512, 1024),
            (2, bs - 512, 1024),
        ] {
            let (dev, overlay) = new_device();
            overlay.cut_power_after(ok);
            let r = dev.write(off, &vec![7u8; len as usize]);
            assert!(r.is_err(), "write {off}+{len} with {ok} overlay writes");
            for b in 0..2 {
                assert_eq!(
                    dev.map().get(b),
                    BlockState::Unallocated,
                    "block {b} after write {off}+{len} failed after {ok} writes"
                );
            }
            let mut buf = vec![0u8; 2 * BS as usize];
            dev.read(0, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 0xab), "base data hidden");
        }
    }

    /// A writeback error of a dead daemon's writes is reported once, maybe
    /// to the sync of the open that would recover its device: that open
    /// fails, and marks the overlay failed, so that a second attempt does
    /// not take the live map, which may name the lost data.
    #[test]
    fn a_failed_sync_in_a_recovery_refuses_the_live_map_for_good() {
        let (dev, overlay) = new_device();
        dev.write(0, &[7u8; BS as usize]).unwrap();
        // The daemon dies: its live map has block 0 written.
        drop(dev);
        let open = || reopen(overlay.clone(), MapSource::Live(live_words(0b01)));
        overlay.fail_next_sync();
        assert!(open().is_err(), "the open's sync failed");
        let again = open().err().expect("a second recovery took the live map");
        assert!(again.to_string().contains("live map may name"), "{again}");
    }

    /// A copy in a dead daemon's live map may hold a write that was in
    /// flight: it is taken as written. A live map left beside an overlay
    /// closed clean is stale: the overlay's own map is taken.
    #[test]
    fn a_live_map_takes_copies_as_written_and_a_clean_overlay_its_own() {
        let (dev, overlay) = new_device();
        assert_eq!(dev.install_copy(1, &[0xab; BS as usize]).unwrap(), 1);
        drop(dev);
        let dev = reopen(
            SimDisk::new(overlay.contents()),
            MapSource::Live(live_words(0b11_00)),
        )
        .unwrap();
        assert_eq!(dev.map().get(1), BlockState::Allocated);
        // Closed clean with block 0 written; a live map that says nothing
        // of it, left since, is not taken.
        dev.write(0, &[7u8; BS as usize]).unwrap();
        let overlay = dev.close().unwrap().1;
        let dev = reopen(overlay, MapSource::Live(live_words(0))).unwrap();
        assert_eq!(dev.map().get(0), BlockState::Allocated);
        assert_eq!(dev.map().get(1), BlockState::Allocated);
    }

    /// A failed WRITE over a `Copied` block may have changed some of its
    /// bytes: the block is no longer a copy of what is below.
    #[test]
    fn a_write_that_failed_over_a_copy_takes_it_as_written() {
        let (dev, overlay) = new_device();
        assert_eq!(dev.install_copy(0, &[0xab; BS as usize]).unwrap(), 1);
        assert_eq!(dev.map().get(0), BlockState::Copied);
        overlay.cut_power_after(0);
        assert!(dev.write(512, &[7u8; 1024]).is_err());
        assert_eq!(dev.map().get(0), BlockState::Allocated);
        assert_eq!(dev.map().get(1), BlockState::Unallocated);
    }

    #[test]
    fn a_failed_sync_fails_every_later_flush_and_persists_nothing() {
        let (dev, overlay) = new_device();
        dev.flush().unwrap();
        dev.write(0, &[7u8; BS as usize]).unwrap();
        // The data's writeback fails; the kernel would report it once, and
        // the next sync would succeed without the data.
        overlay.fail_next_sync();
        assert!(dev.flush().is_err());
        assert!(dev.failed());
        let again = dev.flush();
        assert!(
            matches!(&again, Err(e) if e.errno() == libc::EIO),
            "a flush after a failed sync: {again:?}"
        );
        dev.write(BS as u64, &[8u8; BS as usize]).unwrap();
        assert!(dev.flush().is_err(), "a later flush persisted a map");
        assert!(dev.shut_down().is_err(), "a failed device closed clean");
        // After a power cut block 0 is as the base had it: the map that
        // names the lost data was never persisted.
        let cut = overlay.after_power_cut(|_| true);
        let blocks = SIZE / BS as u64;
        let dev = reopen(cut, MapSource::Load(MapMemory::heap(blocks))).unwrap();
        assert!(dev.overlay().header().failed(), "overlay not marked failed");
        assert!(!dev.was_clean());
        let mut buf = vec![0u8; 2 * BS as usize];
        dev.read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0xab), "map points at lost data");
        // A clean close clears the mark.
        dev.close().unwrap();
    }

    /// A FLUSH is answered by a flush that began after it arrived and
    /// completed, never by one that had begun before.
    #[test]
    fn a_flush_is_covered_only_by_one_that_began_after_it() {
        let (dev, _) = new_device();
        let early = dev.flush_ticket();
        assert!(!dev.covered(early));
        dev.flush().unwrap();
        assert!(dev.covered(early), "a whole flush after it");
        let late = dev.flush_ticket();
        assert!(!dev.covered(late), "the flush that came before it");
        // A flush in progress when the FLUSH arrives: its map pages were
        // taken already, so it may miss writes acknowledged since.
        let mut turn = dev.flush_turn();
        turn.check().unwrap();
        let _ = turn.take_pages();
        let during = dev.flush_ticket();
        turn.completed();
        drop(turn);
        assert!(dev.covered(late), "began after it");
        assert!(!dev.covered(during), "began before it");
        // Answered without I/O: a flush that would fail returns at once.
        let (dev, overlay) = new_device();
        dev.write(0, &[7u8; BS as usize]).unwrap();
        let t = dev.flush_ticket();
        dev.flush().unwrap();
        overlay.fail_next_sync();
        let mut turn = dev.flush_turn();
        assert!(dev.covered(t));
        turn.check().unwrap();
        let _ = turn.take_pages();
        drop(turn);
        assert!(dev.flush().is_err(), "the next flush syncs");
    }

    /// Threads that each write and flush at once: after a power cut that
    /// keeps nothing unsynced, every write whose flush returned is there,
    /// whichever flush made it durable.
    #[test]
    fn concurrent_flushes_that_share_lose_no_acknowledged_write() {
        for round in 0..20u8 {
            let (dev, overlay) = new_device();
            let threads = 4u64;
            let per = SIZE / BS as u64 / threads;
            let acked: Vec<Vec<(u64, u8)>> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..threads)
                    .map(|t| {
                        let dev = &dev;
                        s.spawn(move || {
                            let mut acked = Vec::new();
                            for i in 0..3 * per {
                                let block = t * per + i % per;
                                let v = round.wrapping_mul(31).wrapping_add(i as u8) | 1;
                                dev.write(block * BS as u64, &vec![v; BS as usize]).unwrap();
                                dev.flush().unwrap();
                                acked.push((block, v));
                            }
                            acked
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let cut = overlay.after_power_cut(|_| false);
            let blocks = SIZE / BS as u64;
            let dev = reopen(cut, MapSource::Load(MapMemory::heap(blocks))).unwrap();
            let mut last = std::collections::HashMap::new();
            for (block, v) in acked.into_iter().flatten() {
                last.insert(block, v);
            }
            for (block, v) in last {
                let mut buf = vec![0u8; BS as usize];
                dev.read(block * BS as u64, &mut buf).unwrap();
                assert!(
                    buf.iter().all(|&b| b == v),
                    "round {round}: block {block} lost its acknowledged write"
                );
            }
        }
    }

    #[test]
    fn the_flush_turn_is_one_at_a_time() {
        let (dev, _) = new_device();
        let turn = dev.flush_turn();
        assert!(dev.try_flush_turn().is_none());
        drop(turn);
        assert!(dev.try_flush_turn().is_some());
    }

    #[test]
    fn a_live_map_is_checked_before_use() {
        let (dev, overlay) = new_device();
        dev.write(0, &[7u8; BS as usize]).unwrap();
        // Flushed, and the daemon dies: a live map is taken only over an
        // overlay not closed clean.
        dev.flush().unwrap();
        drop(dev);
        let disk = || SimDisk::new(overlay.contents());
        // Block 0 written and block 1 copied: every two bits are a state
        // (a copy is taken as written: a write may have been in flight).
        let dev = reopen(disk(), MapSource::Live(live_words(0b1101))).unwrap();
        assert_eq!(dev.map().get(1), BlockState::Allocated);
        // A bit past the last block (64 blocks: word 2 onward is unused).
        let mem = live_words(1);
        if let MapMemory::Heap(w) = &mem {
            w[2].store(1, Ordering::Relaxed);
        }
        let e = reopen(disk(), MapSource::Live(mem)).err().unwrap();
        assert!(e.to_string().contains("past its last block"), "{e}");
        // Empty while the overlay has block 0: not this overlay's.
        let e = reopen(disk(), MapSource::Live(live_words(0)))
            .err()
            .unwrap();
        assert!(e.to_string().contains("older than"), "{e}");
        // Block 0 as in the overlay, block 2 discarded since: used.
        let dev = reopen(disk(), MapSource::Live(live_words(0b10_00_01))).unwrap();
        assert_eq!(dev.map().get(2), BlockState::Zero);
    }
}
