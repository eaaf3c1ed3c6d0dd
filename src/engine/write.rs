//! The steps of a WRITE and of a DISCARD/WRITE_ZEROES, written once for
//! both executors: the synchronous one (`device.rs`) and the io_uring one
//! (`crate::ublk::exec`) each implement the I/O of a step ([`WriteIo`],
//! [`ZeroIo`]) and run the procedure here ([`write`], [`write_zeroes`]).
//!
//! A WRITE whose blocks are all `Allocated` writes its data and takes no
//! lock. Otherwise: lock the blocks it touches → plan again under the lock
//! (the map may have changed meanwhile) → read the base bytes of partial
//! blocks that were `Unallocated` → start the writes of those fills and of
//! the data → wait for all of them → mark the blocks `Allocated`. The map
//! is changed only here and only after every write of the request has
//! completed, so no block is ever `Allocated` before its bytes are in the
//! overlay.
//!
//! The I/O methods are `async` so that the io_uring executor can wait on
//! its ring; the synchronous executor's futures are always ready, and it
//! runs the procedure with [`run_ready`].

use crate::engine::device::CowDevice;
use crate::engine::locks::{MAX_LOCK_BLOCKS, RangeGuard};
use crate::engine::map::{BlockState, DataState};
use crate::engine::plan::{self, Fill, WritePath};
use crate::engine::storage::Storage;
use std::future::Future;
use std::ops::Range;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// How an executor waits for a block lock another request holds.
pub(crate) trait LockWait {
    /// Returns when it is worth trying the lock again (a thread yields; a
    /// queue's ring waits a short timer, so that it keeps turning).
    async fn wait_for_lock(&mut self);
}

/// Waits until `blocks` are locked: tries, and waits as the executor does
/// between tries (locks are taken all or nothing, see `locks`).
pub(crate) async fn lock<'d, B: Storage, O: Storage>(
    dev: &'d CowDevice<B, O>,
    io: &mut impl LockWait,
    blocks: Range<u64>,
) -> RangeGuard<'d> {
    loop {
        if let Some(g) = dev
            .locks()
            .try_lock(blocks.start, blocks.end - blocks.start)
        {
            return g;
        }
        io.wait_for_lock().await;
    }
}

/// What the overlay's bytes behind a WRITE's data are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Behind {
    /// The pages exist and are initialized, so the data may be copied
    /// straight into them.
    pub(crate) pages_ready: bool,
    /// No block behind the data was ever written in the overlay (each is
    /// `Unallocated` or `Zero`), and this WRITE holds their locks: nothing
    /// else reads or writes those bytes until it marks the blocks.
    pub(crate) fresh: bool,
}

/// The I/O of one WRITE as an executor does it. A `write_*` method starts
/// a write and may return before it completes; [`WriteIo::complete`] waits
/// for every write started. What a started write reads from (the fill
/// buffers, the request's data) stays in place until then.
pub(crate) trait WriteIo: LockWait {
    type Error;

    /// Whether the overlay's pages of `Unallocated` blocks exist and are
    /// initialized (see `plan::overlay_pages_ready`).
    fn unallocated_ready(&self) -> bool;

    /// Reads the base bytes of the `Fill::FromBase` fills among `fills`
    /// (the head's, then the tail's) into the fill buffer of each, and
    /// waits for them. Called once per locked WRITE, with its fills.
    async fn read_fills(&mut self, fills: [Option<Fill>; 2]) -> Result<(), Self::Error>;

    /// Starts writing fill `fill` (number `slot` of `read_fills`) to the
    /// overlay: the bytes read for it, or zeros.
    fn write_fill(&mut self, slot: usize, fill: Fill) -> Result<(), Self::Error>;

    /// Starts writing the request's data at device offset `off` (or writes
    /// it at once), into overlay bytes that are as `behind` says.
    async fn write_data(&mut self, off: u64, behind: Behind) -> Result<(), Self::Error>;

    /// Waits for every write started: the first failure among them.
    async fn complete(&mut self) -> Result<(), Self::Error>;

    /// Whether every write started was durable when it completed (a FUA
    /// write's, written with `RWF_DSYNC`): the map then counts its change
    /// as needing no data sync (`DataState`).
    fn data_durable(&self) -> bool;
}

/// WRITE of `len` bytes at `off` (within one lock range), its data being
/// `io`'s.
pub(crate) async fn write<B: Storage, O: Storage, X: WriteIo>(
    dev: &CowDevice<B, O>,
    io: &mut X,
    off: u64,
    len: u64,
) -> Result<(), X::Error> {
    let (map, geo) = (dev.map(), dev.geometry());
    let blocks = match plan::write_path(map, geo, off, len) {
        WritePath::Unlocked => {
            let behind = Behind {
                pages_ready: true,
                fresh: false,
            };
            let started = io.write_data(off, behind).await;
            let done = io.complete().await;
            return started.and(done);
        }
        WritePath::Locked(blocks) => blocks,
    };
    let guard = lock(dev, io, blocks.clone()).await;
    let p = plan::plan_locked_write(map, geo, off, len);
    let fills = p.fills();
    io.read_fills(fills).await?;
    let behind = Behind {
        pages_ready: plan::overlay_pages_ready(map, blocks.clone(), io.unallocated_ready()),
        fresh: plan::never_written(map, blocks.clone()),
    };
    let started = start_writes(io, fills, off, behind).await;
    // Started writes read from the fill buffers and the request: wait for
    // them even after a failure.
    let done = io.complete().await;
    if let Err(e) = started.and(done) {
        copies_taken_as_written(dev, &guard, blocks);
        return Err(e);
    }
    // Only now is every byte of every block of `mark` in the overlay.
    let data = match io.data_durable() {
        true => DataState::Durable,
        false => DataState::Unsynced,
    };
    dev.map().allocate(&guard, p.mark, data);
    Ok(())
}

/// After a WRITE that failed: some of its data may have reached the
/// overlay, and a `Copied` block it did no longer holds what is below it
/// (which `commit` and `push`, skipping copies, rely on). Such blocks are
/// taken as written; each of their sectors reads old or new.
fn copies_taken_as_written<B: Storage, O: Storage>(
    dev: &CowDevice<B, O>,
    guard: &RangeGuard<'_>,
    blocks: Range<u64>,
) {
    for b in blocks {
        if dev.map().get(b) == BlockState::Copied {
            dev.map().set_range(guard, b..b + 1, BlockState::Allocated);
        }
    }
}

/// Starts the writes of the fills, then of the data; stops at the first
/// that fails.
async fn start_writes<X: WriteIo>(
    io: &mut X,
    fills: [Option<Fill>; 2],
    off: u64,
    behind: Behind,
) -> Result<(), X::Error> {
    for (slot, fill) in fills.into_iter().enumerate() {
        if let Some(f) = fill {
            io.write_fill(slot, f)?;
        }
    }
    io.write_data(off, behind).await
}

/// The I/O of one DISCARD or WRITE_ZEROES as an executor does it.
pub(crate) trait ZeroIo: LockWait {
    type Error;

    /// Writes zeros to `[off, off+len)`, part of one block, as a WRITE
    /// (the procedure [`write`]).
    async fn write_zeros(&mut self, off: u64, len: u64) -> Result<(), Self::Error>;

    /// Punches out the overlay's bytes behind `[off, off+len)` of the
    /// device, whose blocks are `Zero` already. Space is only reclaimed: a
    /// file system without hole punching loses nothing, so a failure is
    /// ignored.
    async fn punch(&mut self, off: u64, len: u64);
}

/// DISCARD or WRITE_ZEROES of `[off, off+len)` (within the device, not
/// empty): whole blocks become `Zero` under their locks, then their overlay
/// space is punched; partial blocks are written with zeros.
pub(crate) async fn write_zeroes<B: Storage, O: Storage, X: ZeroIo>(
    dev: &CowDevice<B, O>,
    io: &mut X,
    off: u64,
    len: u64,
) -> Result<(), X::Error> {
    let geo = *dev.geometry();
    let p = plan::plan_zero(&geo, off, len);
    for (o, l) in p.head.into_iter().chain(p.tail) {
        io.write_zeros(o, l).await?;
    }
    if let Some(whole) = p.whole {
        let mut first = whole.start;
        while first < whole.end {
            let end = whole.end.min(first + MAX_LOCK_BLOCKS);
            let guard = lock(dev, io, first..end).await;
            dev.map().set_range(&guard, first..end, BlockState::Zero);
            let start = geo.block_start(first);
            io.punch(start, geo.block_end(end - 1) - start).await;
            first = end;
        }
    }
    Ok(())
}

/// Runs a future that is ready when first polled: the procedures here over
/// the synchronous executor, whose I/O completes before it returns.
pub(crate) fn run_ready<F: Future>(fut: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(fut).poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("synchronous I/O left a step pending"),
    }
}
