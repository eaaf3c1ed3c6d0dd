//! WRITE, DISCARD and WRITE_ZEROES on the queue's ring: the I/O of each
//! step of `engine::write` (`RingWrite`, `RingZero`), which decides the
//! steps and their order. Writing a WRITE's data takes the fastest way to
//! be had: ublk copies it straight into the overlay's mapped pages
//! (`place`), a fixed-buffer write from the request's registered pages, or
//! a write from the daemon's memory (`data_write_op`). A FUA WRITE to an
//! overlay on a disk's file system is written with `RWF_DSYNC` (`Dsync`),
//! so that its flush need not sync the overlay's data as well; on the
//! queue's thread when the request is alone on its queue (`SyncsOn`).

use super::{
    Dsync, OVERLAY_DIRECT_FD, OVERLAY_FD, RingLockWait, SyncsOn, TagScratch, ZeroBlocks,
    overlay_fd, overlay_write_op, read_below,
};
use crate::engine::Errno;
use crate::engine::plan::Fill;
use crate::engine::write::{self as steps, Behind, LockWait, WriteIo, ZeroIo};
use crate::stats::Stats;
use crate::ublk::ServedDevice;
use crate::ublk::ops::{FileWrite, Op, PendingOp, Ring, WriteSource, finish_all};
use crate::ublk::write_data::{Placement, WriteData};

/// What `place` did with a WRITE's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// All of it is in the overlay's pages.
    Placed,
    /// None of it went there: it must be written from a buffer.
    WriteInstead,
}

/// Has ublk copy a WRITE's data straight into the overlay's pages at
/// overlay offset `pos`, when they are mapped and the data is still with
/// ublk: `Placed` (all of it), or `WriteInstead` when the data must be
/// written from a buffer instead.
///
/// A copy that stopped part way (a page missing on a full tmpfs) fails the
/// request: kernels differ in what they do with the rest of a request
/// committed short (6.12 serves it again; 7.3 completes the whole request,
/// so the rest would be lost without an error).
async fn place(sh: &ServedDevice, data: &mut WriteData<'_>, pos: u64) -> Result<Place, Errno> {
    if let Some(from) = data.user_copy() {
        // Zero copy: the data stays in the request's pages, so a copy that
        // fell short is simply written again, whole, from there.
        return Ok(
            match sh.overlay_io.copy_from_request(pos, data.size(), from) {
                Some(true) => {
                    Stats::add(&sh.stats.writes_to_mapping, 1);
                    Place::Placed
                }
                Some(false) => {
                    Stats::add(&sh.stats.writes_mapping_refused, 1);
                    Place::WriteInstead
                }
                None => Place::WriteInstead,
            },
        );
    }
    if !data.placeable() {
        return Ok(Place::WriteInstead);
    }
    let Some(at) = sh.overlay_io.placeable(pos, data.size()) else {
        return Ok(Place::WriteInstead);
    };
    match data.place(at).await {
        Placement::Done(n) if n == data.size() as u64 => {
            Stats::add(&sh.stats.writes_to_mapping, 1);
            Ok(Place::Placed)
        }
        Placement::Done(_) => {
            Stats::add(&sh.stats.writes_mapping_refused, 1);
            Err(Errno::EIO)
        }
        Placement::Refused => {
            Stats::add(&sh.stats.writes_mapping_refused, 1);
            Ok(Place::WriteInstead)
        }
        Placement::Lost => Err(Errno::EIO),
    }
}

/// Writes a WRITE's data at overlay offset `pos`, pushing the ring's write
/// onto `pending`: from its registered buffer, or from the daemon's memory
/// as `overlay_write_op` does (fetching it from ublk first if need be).
/// Into `fresh` blocks (`Behind::fresh`) a large write goes through the
/// overlay opened with O_DIRECT where the overlay has one (`DirectOverlay`):
/// no other request touches those pages meanwhile, so the page cache and
/// the file cannot disagree.
///
/// With zero copy a small WRITE to an overlay in memory takes the second
/// way: user copy into the tag's staging buffer, then `pwrite` on this
/// thread. The ring would hand a tmpfs write to a worker thread (tmpfs
/// cannot promise not to block), which costs more than the extra copy
/// (docs/benchmarks.md). So does a durable write on this thread
/// (`Dsync::Here`) that fits the staging buffer and takes no direct write.
///
/// Writes are durable (`RWF_DSYNC`) as `dsync` says, a fixed-buffer write
/// on the ring even if `dsync` would have it here; whether the data is
/// durable when the write completes.
async fn data_write_op<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    data: &mut WriteData<'_>,
    pos: u64,
    fresh: bool,
    dsync: Dsync,
    pending: &mut Vec<PendingOp<R>>,
) -> Result<bool, Errno> {
    let len = data.size() as u64;
    let direct = sh.direct_overlay.as_ref().filter(|_| fresh);
    let durable = dsync.durable();
    let here = dsync == Dsync::Here && !direct.is_some_and(|d| d.fits(pos, len, None));
    let staged = data.can_buffer() && (sh.overlay_io.writes_inline(data.size()) || here);
    if let Some(index) = data.registered() {
        if !staged {
            let from = WriteSource::Registered { index, at: 0 };
            if let Some(d) = direct
                && d.fits(pos, len, None)
                && direct_write(q, sh, from, len, pos, durable).await?
            {
                return Ok(durable);
            }
            let w = FileWrite {
                fd: overlay_fd(durable),
                from,
                len: len as u32,
                pos,
                dsync: durable,
            };
            pending.push(w.push(q));
            return Ok(durable);
        }
        Stats::add(&sh.stats.writes_staged, 1);
    }
    let d = data.in_buffer().await?;
    if let Some(dir) = direct
        && dir.fits(pos, len, Some(d.as_ptr() as usize))
        && direct_write(q, sh, WriteSource::Memory(d.as_ptr()), len, pos, durable).await?
    {
        return Ok(durable);
    }
    overlay_write_op(q, sh, d, pos, dsync, pending)
}

/// Writes `len` bytes from `from` at overlay offset `pos` through the
/// overlay opened with O_DIRECT (with `RWF_DSYNC` if `dsync`), and waits
/// for it: whether it was written.
/// `false` when the file system refused it (EINVAL: an alignment it did not
/// report); the caller then writes all of it through the page cache.
async fn direct_write<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    from: WriteSource,
    len: u64,
    pos: u64,
    dsync: bool,
) -> Result<bool, Errno> {
    let w = FileWrite {
        fd: OVERLAY_DIRECT_FD,
        from,
        len: len as u32,
        pos,
        dsync,
    };
    match finish_all(q, vec![w.push(q)]).await {
        Ok(()) => {
            Stats::add(&sh.stats.writes_direct, 1);
            Ok(true)
        }
        Err(Errno::EINVAL) => {
            Stats::add(&sh.stats.writes_direct_refused, 1);
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The I/O of the steps of one WRITE on the queue's ring.
struct RingWrite<'a, 'd, R: Ring> {
    q: &'a R,
    sh: &'a ServedDevice,
    /// Zeros for `Fill::Zeros`.
    zeros: &'a [u8],
    /// The base bytes of the head's fill in `fill[..bs]`, the tail's in
    /// `fill[bs..]`.
    fill: &'a mut Vec<u8>,
    data: &'a mut WriteData<'d>,
    /// The writes pushed and not yet completed: what they point to (`fill`,
    /// `zeros`, `data`) is borrowed as long as this lives.
    writes: Vec<PendingOp<R>>,
    /// Whether to write with `RWF_DSYNC`.
    dsync: Dsync,
    /// Whether every write so far was durable when it completed: `dsync`,
    /// and none took a way without it (a write on this thread, a copy into
    /// mapped pages).
    durable: bool,
}

/// Whether a WRITE's data is written durable (`RWF_DSYNC`): a FUA WRITE's,
/// when the overlay lives on a disk's file system (it then has
/// `ServedDevice::dsync_overlay`), on the side its syncs run. There one
/// durable write saves the overlay's data sync that its flush would
/// otherwise make; an overlay in memory has nothing to make durable and
/// its faster ways stay.
fn request_dsync(sh: &ServedDevice, fua: Fua) -> Dsync {
    match fua {
        Fua::Yes(syncs) if sh.dsync_overlay.is_some() => Dsync::on(syncs),
        _ => Dsync::No,
    }
}

impl<R: Ring> RingWrite<'_, '_, R> {
    fn block_size(&self) -> usize {
        self.sh.dev.geometry().block_size() as usize
    }
}

impl<R: Ring> LockWait for RingWrite<'_, '_, R> {
    async fn wait_for_lock(&mut self) {
        let (q, sh) = (self.q, self.sh);
        RingLockWait { q, sh }.wait_for_lock().await
    }
}

impl<R: Ring> WriteIo for RingWrite<'_, '_, R> {
    type Error = Errno;

    fn unallocated_ready(&self) -> bool {
        self.sh.unallocated_ready
    }

    /// Both reads in flight together, through the page cache.
    async fn read_fills(&mut self, fills: [Option<Fill>; 2]) -> Result<(), Errno> {
        Stats::add(
            &self.sh.stats.rmw_blocks,
            fills.iter().flatten().count() as u64,
        );
        let bs = self.block_size();
        if self.fill.len() < 2 * bs {
            self.fill.resize(2 * bs, 0);
        }
        let mut reads = Vec::new();
        let (q, sh) = (self.q, self.sh);
        for (buf, fill) in self.fill.chunks_mut(bs).zip(fills) {
            if let Some(Fill::FromBase { off, len }) = fill {
                let dst = &mut buf[..len as usize];
                read_below(q, sh, off, dst, &mut reads);
            }
        }
        finish_all(q, reads).await
    }

    fn write_fill(&mut self, slot: usize, fill: Fill) -> Result<(), Errno> {
        let bs = self.block_size();
        let (src, off) = match fill {
            Fill::FromBase { off, len } => (&self.fill[slot * bs..][..len as usize], off),
            Fill::Zeros { off, len } => (&self.zeros[..len as usize], off),
        };
        let pos = self.sh.dev.overlay().data_pos(off);
        let durable = overlay_write_op(self.q, self.sh, src, pos, self.dsync, &mut self.writes)?;
        self.durable &= durable;
        Ok(())
    }

    /// Into the overlay's pages if they are ready and ublk can put it
    /// there (`place`), else a write (`data_write_op`).
    async fn write_data(&mut self, off: u64, behind: Behind) -> Result<(), Errno> {
        let pos = self.sh.dev.overlay().data_pos(off);
        if behind.pages_ready && place(self.sh, self.data, pos).await? == Place::Placed {
            self.durable = false;
            return Ok(());
        }
        let (q, sh, dsync) = (self.q, self.sh, self.dsync);
        let durable =
            data_write_op(q, sh, self.data, pos, behind.fresh, dsync, &mut self.writes).await?;
        self.durable &= durable;
        Ok(())
    }

    async fn complete(&mut self) -> Result<(), Errno> {
        finish_all(self.q, std::mem::take(&mut self.writes)).await
    }

    fn data_durable(&self) -> bool {
        self.durable
    }
}

impl<R: Ring> Drop for RingWrite<'_, '_, R> {
    fn drop(&mut self) {
        // The memory they point to is free again once this is gone.
        if !self.writes.is_empty() && !std::thread::panicking() {
            panic!("a WRITE's steps ended with writes in flight");
        }
    }
}

/// WRITE of `data` at `off`, in the steps of `engine::write::write`: all
/// of it written, and its blocks `Allocated`, when it returns `Ok`, with
/// `RWF_DSYNC` or not (`Dsync`); whether all of its data was durable when
/// it returned.
async fn write<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    zb: &ZeroBlocks,
    s: &mut TagScratch,
    off: u64,
    data: &mut WriteData<'_>,
    dsync: Dsync,
) -> Result<bool, Errno> {
    let len = data.size() as u64;
    Stats::add(&sh.stats.write_ops, 1);
    Stats::add(&sh.stats.write_bytes, len);
    // A remote base's part of the blocks written in part is fetched first.
    super::fetch_edges(q, sh, off, len).await?;
    let mut io = RingWrite {
        q,
        sh,
        zeros: &zb.zeros,
        fill: &mut s.fill,
        data,
        writes: Vec::new(),
        dsync,
        durable: dsync.durable(),
    };
    steps::write(&sh.dev, &mut io, off, len).await?;
    Ok(io.durable)
}

/// Whether a WRITE must be durable when it completes (`UBLK_IO_F_FUA`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fua {
    /// Durable at the next FLUSH.
    No,
    /// Durable when it completes; its syncs run on this side.
    Yes(SyncsOn),
}

/// A WRITE request: `write`, then with `Fua::Yes` a flush: of the map
/// pages alone when the data was written durable (`Dsync`), else a whole
/// flush.
pub async fn write_request<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    zb: &ZeroBlocks,
    s: &mut TagScratch,
    off: u64,
    data: &mut WriteData<'_>,
    fua: Fua,
) -> Result<(), Errno> {
    let dsync = request_dsync(sh, fua);
    let durable = match write(q, sh, zb, s, off, data, dsync).await {
        Ok(durable) => durable,
        Err(e) if dsync.durable() => {
            // The sync inside a durable write reports a writeback error of
            // any earlier write, once to each open file: here to the FUA
            // writes' descriptor. A whole flush has the overlay's own
            // descriptor report it too, and so fails the device (and has
            // the overlay marked failed) as any failed flush does; else a
            // daemon that died before the next FLUSH would leave a
            // successor whose descriptors never see the error.
            if let Fua::Yes(syncs) = fua {
                let _ = super::flush(q, sh, syncs).await;
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    match (fua, durable) {
        (Fua::No, _) => Ok(()),
        (Fua::Yes(syncs), true) => super::flush_after_durable_write(q, sh, syncs).await,
        (Fua::Yes(syncs), false) => super::flush(q, sh, syncs).await,
    }
}

/// The I/O of the steps of one DISCARD or WRITE_ZEROES on the queue's ring.
struct RingZero<'a, R: Ring> {
    q: &'a R,
    sh: &'a ServedDevice,
    zb: &'a ZeroBlocks,
    s: &'a mut TagScratch,
}

impl<R: Ring> LockWait for RingZero<'_, R> {
    async fn wait_for_lock(&mut self) {
        let (q, sh) = (self.q, self.sh);
        RingLockWait { q, sh }.wait_for_lock().await
    }
}

impl<R: Ring> ZeroIo for RingZero<'_, R> {
    type Error = Errno;

    async fn write_zeros(&mut self, off: u64, len: u64) -> Result<(), Errno> {
        let zb = self.zb;
        let zeros = &mut WriteData::bytes(&zb.zeros[..len as usize]);
        write(self.q, self.sh, zb, self.s, off, zeros, Dsync::No).await?;
        Ok(())
    }

    async fn punch(&mut self, off: u64, len: u64) {
        let punch = Op::Punch {
            fd: OVERLAY_FD,
            pos: self.sh.dev.overlay().data_pos(off),
            len,
        };
        let _ = self.q.push(punch).await;
    }
}

/// DISCARD / WRITE_ZEROES of `[off, off+len)`, in the steps of
/// `engine::write::write_zeroes`.
pub async fn write_zeroes<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    zb: &ZeroBlocks,
    s: &mut TagScratch,
    off: u64,
    len: u64,
) -> Result<(), Errno> {
    Stats::add(&sh.stats.zero_ops, 1);
    super::fetch_edges(q, sh, off, len).await?;
    let mut io = RingZero { q, sh, zb, s };
    steps::write_zeroes(&sh.dev, &mut io, off, len).await
}
