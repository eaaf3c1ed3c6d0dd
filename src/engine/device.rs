//! A copy-on-write device over a base and an overlay, with the synchronous
//! executor: every plan from [`crate::engine::plan`] carried out with
//! positional reads and writes on the calling thread.
//!
//! The device state — geometry, map, locks, overlay header — is what the
//! io_uring executor in `crate::ublk` shares too; it only replaces the way
//! the I/O of a plan is issued.

use crate::engine::base::BaseIdentity;
use crate::engine::cache::{CacheAction, CacheMode, cache_blocks, fadvise_pieces, plan_cache};
use crate::engine::geometry::Geometry;
use crate::engine::locks::{BlockLocks, MAX_LOCK_BLOCKS, RangeGuard};
use crate::engine::map::{BlockMap, BlockState, MapMemory};
use crate::engine::overlay::{OpenCheck, Overlay};
use crate::engine::plan::{self, Fill, ReadRun, ReadSource, WritePath};
use crate::engine::storage::Storage;
use crate::engine::{Error, IoContext};
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

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
    /// Serializes flushes so that map pages are written in order.
    flush: Mutex<()>,
    was_clean: bool,
    /// Whether copies from the base may still be tried inside the kernel;
    /// cleared the first time base and overlay turn out unable to.
    kernel_copy: AtomicBool,
}

/// Base data of consecutive blocks read for copying into the overlay;
/// [`CowDevice::copy_install`] installs only blocks still `Unallocated`.
pub struct CopyJob {
    pub first: u64,
    pub data: Vec<u8>,
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
    /// overlay in use (not clean) before returning.
    pub fn open(base: B, overlay: O, check: OpenCheck<'_>, map: MapSource) -> Result<Self, Error> {
        let mut overlay = Overlay::open(overlay, check)?;
        let blocks = overlay.geometry().blocks();
        let was_clean = overlay.header().clean();
        let map = match map {
            MapSource::Load(mem) => {
                let map = BlockMap::new(mem, blocks);
                overlay.read_map(&map)?;
                map
            }
            MapSource::Live(mem) => {
                let map = BlockMap::new(mem, blocks);
                map.mark_all_dirty();
                map
            }
        };
        overlay.set_clean(false)?;
        Ok(Self::assemble(base, overlay, map, was_clean))
    }

    fn assemble(base: B, overlay: Overlay<O>, map: BlockMap, was_clean: bool) -> Self {
        CowDevice {
            geo: overlay.geometry(),
            base,
            overlay,
            map,
            locks: BlockLocks::default(),
            flush: Mutex::new(()),
            was_clean,
            kernel_copy: AtomicBool::new(true),
        }
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    pub fn map(&self) -> &BlockMap {
        &self.map
    }

    pub fn locks(&self) -> &BlockLocks {
        &self.locks
    }

    pub fn base(&self) -> &B {
        &self.base
    }

    pub fn overlay(&self) -> &Overlay<O> {
        &self.overlay
    }

    /// Whether the overlay had been closed cleanly before this open.
    pub fn was_clean(&self) -> bool {
        self.was_clean
    }

    /// Waits (yielding the thread) until `blocks` are locked.
    fn lock(&self, blocks: Range<u64>) -> RangeGuard<'_> {
        loop {
            if let Some(g) = self.locks.try_lock(blocks.start, blocks.end - blocks.start) {
                return g;
            }
            std::thread::yield_now();
        }
    }

    /// READ `buf.len()` bytes at `off`.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.geo.check_range(off, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut runs = Vec::new();
        plan::plan_read(&self.map, &self.geo, off, buf.len() as u64, &mut runs);
        for ReadRun {
            source,
            off,
            len,
            buf_off,
        } in runs
        {
            let dst = &mut buf[buf_off..buf_off + len as usize];
            match source {
                ReadSource::Base => self
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
        let len = data.len() as u64;
        let blocks = match plan::write_path(&self.map, &self.geo, off, len) {
            WritePath::Unlocked => return self.overlay_write(data, off),
            WritePath::Locked(blocks) => blocks,
        };
        let guard = self.lock(blocks);
        let plan = plan::plan_locked_write(&self.map, &self.geo, off, len);
        for fill in plan.fills() {
            self.fill(fill)?;
        }
        self.overlay_write(data, off)?;
        self.map.allocate(&guard, plan.mark);
        Ok(())
    }

    fn fill(&self, fill: Fill) -> Result<(), Error> {
        match fill {
            Fill::FromBase { off, len } => {
                let mut buf = vec![0u8; len as usize];
                self.base
                    .read_at(&mut buf, off)
                    .ctx(|| format!("base read at {off}"))?;
                self.overlay_write(&buf, off)
            }
            Fill::Zeros { off, len } => self.overlay_write(&vec![0u8; len as usize], off),
        }
    }

    fn overlay_write(&self, data: &[u8], off: u64) -> Result<(), Error> {
        self.overlay
            .storage()
            .write_at(data, self.overlay.data_pos(off))
            .ctx(|| format!("overlay write at {off}"))
    }

    /// DISCARD or WRITE_ZEROES of `[off, off+len)`: whole blocks become
    /// `Zero` and their overlay space is punched; partial blocks are written
    /// with zeros.
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<(), Error> {
        self.geo.check_range(off, len)?;
        if len == 0 {
            return Ok(());
        }
        let plan = plan::plan_zero(&self.geo, off, len);
        for (o, l) in plan.head.into_iter().chain(plan.tail) {
            self.write(o, &vec![0u8; l as usize])?;
        }
        if let Some(whole) = plan.whole {
            let mut first = whole.start;
            while first < whole.end {
                let end = whole.end.min(first + MAX_LOCK_BLOCKS);
                let guard = self.lock(first..end);
                self.map.set_range(&guard, first..end, BlockState::Zero);
                let start = self.geo.block_start(first);
                // Space is only reclaimed: the map already says Zero, so a
                // file system without hole punching loses nothing.
                let _ = self.overlay.storage().punch(
                    self.overlay.data_pos(start),
                    self.geo.block_end(end - 1) - start,
                );
                first = end;
            }
        }
        Ok(())
    }

    /// FLUSH: overlay data durable, then the map pages that changed, then
    /// durable again. Only map states whose data was written before the
    /// snapshot are persisted, so a persisted `Allocated` always has its data.
    pub fn flush(&self) -> Result<(), Error> {
        let _one_at_a_time = self.flush.lock().unwrap();
        let pages = self.map.take_dirty_pages();
        let disk = self.overlay.storage();
        let res = disk
            .sync()
            .ctx(|| "syncing overlay data".into())
            .and_then(|_| {
                self.overlay
                    .write_map_pages(&pages)
                    .ctx(|| "writing the overlay map".into())
            })
            .and_then(|_| disk.sync().ctx(|| "syncing the overlay map".into()));
        if res.is_err() {
            self.map.redirty(&pages);
        }
        res
    }

    /// Flushes and marks the overlay clean, for a device no request will
    /// reach any more (others may still hold a reference to it).
    pub fn shut_down(&self) -> Result<(), Error> {
        self.flush()?;
        self.overlay.write_clean_flag(true).map(|_| ())
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
            self.map.set_range(&guard, run, BlockState::Allocated);
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
        let bs = self.geo.block_size() as u64;
        let n = (job.data.len() as u64).div_ceil(bs);
        let blocks = job.first..job.first + n;
        let guard = self.lock(blocks.clone());
        let mut installed = 0;
        for run in self.map.unallocated_runs(blocks) {
            let from = ((run.start - job.first) * bs) as usize;
            let to = (((run.end - job.first) * bs) as usize).min(job.data.len());
            self.overlay_write(&job.data[from..to], self.geo.block_start(run.start))?;
            installed += run.end - run.start;
            self.map.set_range(&guard, run, BlockState::Allocated);
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
                    for (off, len) in fadvise_pieces(at, st.len) {
                        let _ = self.overlay.storage().will_need(off, len);
                    }
                    done.fadvised_overlay += st.len;
                }
                CacheAction::FadviseBase => {
                    for (off, len) in fadvise_pieces(st.off, st.len) {
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
