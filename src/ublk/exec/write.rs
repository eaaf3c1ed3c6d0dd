//! WRITE, DISCARD and WRITE_ZEROES: straight to the overlay where every
//! block is allocated, else under the blocks' locks with the partial
//! blocks filled from the base (or zeros), and the map changed last.

use super::{
    BASE_FD, OVERLAY_FD, RingRead, TagScratch, ZeroBlocks, finish_write, lock, overlay_write_op,
    read_op,
};
use crate::engine::locks::MAX_LOCK_BLOCKS;
use crate::engine::map::BlockState;
use crate::engine::plan::{self, Fill, WritePath};
use crate::stats::Stats;
use crate::ublk::ServedDevice;
use crate::ublk::ops::{FileWrite, Op, PendingOp, Ring, WriteSource, finish_all};
use crate::ublk::write_data::{Placement, WriteData};

/// Has ublk copy a WRITE's data straight into the overlay's pages at
/// overlay offset `pos`, when they are mapped and the data is still with
/// ublk: `Some` with the bytes placed (all of them) or a negative errno,
/// `None` when the data must be written from the buffer instead.
///
/// A copy that stopped part way (a page missing on a full tmpfs) fails the
/// request: kernels differ in what they do with the rest of a request
/// committed short (6.12 serves it again; 7.3 completes the whole request,
/// so the rest would be lost without an error).
async fn place(sh: &ServedDevice, data: &mut WriteData<'_>, pos: u64) -> Option<i32> {
    if let Some(from) = data.user_copy() {
        // Zero copy: the data stays in the request's pages, so a copy that
        // fell short is simply written again, whole, from there.
        return match sh.overlay_io.copy_from_request(pos, data.size(), from)? {
            true => {
                Stats::add(&sh.stats.writes_to_mapping, 1);
                Some(data.size() as i32)
            }
            false => {
                Stats::add(&sh.stats.writes_mapping_refused, 1);
                None
            }
        };
    }
    if !data.placeable() {
        return None;
    }
    let at = sh.overlay_io.placeable(pos, data.size())?;
    match data.place(at).await {
        Placement::Done(n) if n == data.size() as u64 => {
            Stats::add(&sh.stats.writes_to_mapping, 1);
            Some(n as i32)
        }
        Placement::Done(_) => {
            Stats::add(&sh.stats.writes_mapping_refused, 1);
            Some(-libc::EIO)
        }
        Placement::Refused => {
            Stats::add(&sh.stats.writes_mapping_refused, 1);
            None
        }
        Placement::Lost => Some(-libc::EIO),
    }
}

/// Writes a WRITE's data at overlay offset `pos`: from its registered
/// buffer, or from the daemon's memory as `overlay_write_op` does (fetching
/// it from ublk first if need be).
///
/// With zero copy a small WRITE to an overlay in memory takes the second
/// way: user copy into the tag's staging buffer, then `pwrite` on this
/// thread. The ring would hand a tmpfs write to a worker thread (tmpfs
/// cannot promise not to block), which costs more than the extra copy
/// (docs/benchmarks.md).
async fn data_write_op<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    data: &mut WriteData<'_>,
    pos: u64,
) -> Result<Option<PendingOp<R>>, i32> {
    let staged = data.can_buffer() && sh.overlay_io.writes_inline(data.size());
    if let Some(index) = data.registered() {
        if !staged {
            let from = WriteSource::Registered { index, at: 0 };
            let len = data.size() as u32;
            return Ok(Some(
                FileWrite {
                    fd: OVERLAY_FD,
                    from,
                    len,
                    pos,
                }
                .push(q),
            ));
        }
        Stats::add(&sh.stats.writes_staged, 1);
    }
    let d = data.in_buffer().await?;
    overlay_write_op(q, sh, d, pos)
}

/// WRITE of `data` at `off`: straight to the overlay when every block is
/// allocated; otherwise under the blocks' locks, with read-modify-write of
/// partial blocks, then the blocks are marked allocated. Returns the bytes
/// written (all of them) or a negative errno.
pub async fn write<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    qb: &ZeroBlocks,
    s: &mut TagScratch,
    off: u64,
    data: &mut WriteData<'_>,
) -> i32 {
    let dev = &sh.dev;
    let len = data.size() as u64;
    let pos = dev.overlay().data_pos(off);
    Stats::add(&sh.stats.write_ops, 1);
    Stats::add(&sh.stats.write_bytes, len);
    let blocks = match plan::write_path(dev.map(), dev.geometry(), off, len) {
        WritePath::Unlocked => {
            if let Some(r) = place(sh, data, pos).await {
                return r;
            }
            let r = finish_write(q, data_write_op(q, sh, data, pos).await).await;
            return if r < 0 { r } else { len as i32 };
        }
        WritePath::Locked(blocks) => blocks,
    };
    let guard = lock(q, sh, blocks.clone()).await;
    let p = plan::plan_locked_write(dev.map(), dev.geometry(), off, len);
    Stats::add(&sh.stats.rmw_blocks, p.fills().count() as u64);

    // Base data for the fills first: head in fill[..bs], tail in fill[bs..].
    let bs = dev.geometry().block_size() as usize;
    if s.fill.len() < 2 * bs {
        s.fill.resize(2 * bs, 0);
    }
    let mut reads = Vec::new();
    for (i, f) in [p.head, p.tail].into_iter().enumerate() {
        if let Some(Fill::FromBase { off, len }) = f {
            let dst = &mut s.fill[i * bs..i * bs + len as usize];
            reads.extend(read_op(q, RingRead::Cached(BASE_FD), &sh.base_io, off, dst));
        }
    }
    let r = finish_all(q, reads).await;
    if r < 0 {
        return r;
    }
    let mut writes = Vec::new();
    let mut failed = 0;
    for (i, f) in [p.head, p.tail].into_iter().enumerate() {
        let (src, off) = match f {
            Some(Fill::FromBase { off, len }) => (&s.fill[i * bs..i * bs + len as usize], off),
            Some(Fill::Zeros { off, len }) => (&qb.zeros[..len as usize], off),
            None => continue,
        };
        match overlay_write_op(q, sh, src, dev.overlay().data_pos(off)) {
            Ok(op) => writes.extend(op),
            Err(e) => failed = e,
        }
    }
    if failed == 0 {
        let ready = plan::overlay_pages_ready(dev.map(), blocks, sh.unallocated_ready);
        let placed = if ready {
            place(sh, data, pos).await
        } else {
            None
        };
        match placed {
            Some(r) if r < 0 => failed = r,
            Some(_) => {}
            None => match data_write_op(q, sh, data, pos).await {
                Ok(op) => writes.extend(op),
                Err(e) => failed = e,
            },
        }
    }
    // Pushed writes use the buffers: wait for them even after a failure.
    let r = finish_all(q, writes).await;
    if failed < 0 {
        return failed;
    }
    if r < 0 {
        return r;
    }
    dev.map().allocate(&guard, p.mark);
    len as i32
}

/// A WRITE request: `write`, then with `fua` (the request must be durable
/// when it completes) a flush.
pub async fn write_request<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    zb: &ZeroBlocks,
    s: &mut TagScratch,
    off: u64,
    data: &mut WriteData<'_>,
    fua: bool,
) -> i32 {
    let r = write(q, sh, zb, s, off, data).await;
    if r < 0 || !fua {
        return r;
    }
    match super::flush(q, sh).await {
        0 => r,
        e => e,
    }
}

/// DISCARD / WRITE_ZEROES of `[off, off+len)`.
pub async fn write_zeroes<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    qb: &ZeroBlocks,
    s: &mut TagScratch,
    off: u64,
    len: u64,
) -> i32 {
    let dev = &sh.dev;
    let geo = *dev.geometry();
    let p = plan::plan_zero(&geo, off, len);
    Stats::add(&sh.stats.zero_ops, 1);
    for (o, l) in p.head.into_iter().chain(p.tail) {
        let zeros = &mut WriteData::bytes(&qb.zeros[..l as usize]);
        let r = write(q, sh, qb, s, o, zeros).await;
        if r < 0 {
            return r;
        }
    }
    if let Some(whole) = p.whole {
        let mut first = whole.start;
        while first < whole.end {
            let end = whole.end.min(first + MAX_LOCK_BLOCKS);
            let guard = lock(q, sh, first..end).await;
            dev.map().set_range(&guard, first..end, BlockState::Zero);
            let start = geo.block_start(first);
            let bytes = geo.block_end(end - 1) - start;
            let punch = Op::Punch {
                fd: OVERLAY_FD,
                pos: dev.overlay().data_pos(start),
                len: bytes,
            };
            // Space is only reclaimed: the map already says Zero, so a file
            // system without hole punching loses nothing.
            let _ = q.push(punch).await;
            first = end;
        }
    }
    0
}
