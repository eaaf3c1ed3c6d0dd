//! FLUSH with io_uring: the steps of `engine::device::FlushTurn` as
//! operations on the queue's ring. The device owns the one flush turn and
//! the failed state; a turn another flush holds is waited for with short
//! ring timeouts, so the queue's thread never blocks.

use super::{OVERLAY_DIRECT_FD, OVERLAY_FD};
use crate::engine::Errno;
use crate::engine::map::MAP_PAGE;
use crate::stats::Stats;
use crate::ublk::ServedDevice;
use crate::ublk::ops::{FileWrite, Op, PendingOp, Ring, WriteSource, finish, finish_all};
use crate::ublk::served::DeviceFlushTurn;
use io_uring::types;

/// FLUSH: overlay data durable, then the changed map pages, then durable
/// again (see `FlushTurn`, the same steps; a single page is written with
/// `RWF_DSYNC`, durable in the same operation). Fails with EIO, writing
/// nothing, once a flush of the device has failed. A FLUSH that a flush
/// beginning after it completed covers (`FlushTicket`) is answered at once.
pub async fn flush<R: Ring>(q: &R, sh: &ServedDevice) -> Result<(), Errno> {
    flush_as(q, sh, Owed::Everything).await
}

/// After a FUA WRITE whose data was written durable: its map change made
/// durable, which needs no sync of the overlay's data unless some map page
/// taken may name data that is not durable yet
/// (`FlushTurn::data_sync_needed`). Other writes are not made durable by
/// it, as FUA does not ask that, so it answers no FLUSH.
pub async fn flush_after_durable_write<R: Ring>(q: &R, sh: &ServedDevice) -> Result<(), Errno> {
    flush_as(q, sh, Owed::DurableWritesMap).await
}

/// What a flush owes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owed {
    /// A FLUSH's: every write completed before it durable.
    Everything,
    /// A durable FUA WRITE's: the map pages that name its blocks durable.
    DurableWritesMap,
}

async fn flush_as<R: Ring>(q: &R, sh: &ServedDevice, owed: Owed) -> Result<(), Errno> {
    let dev = &sh.dev;
    let ticket = dev.flush_ticket();
    let mut turn = loop {
        if dev.covered(ticket) {
            Stats::add(&sh.stats.flushes_shared, 1);
            return Ok(());
        }
        if let Some(t) = dev.try_flush_turn() {
            break t;
        }
        let ts = types::Timespec::new().nsec(50_000);
        q.push(Op::Timeout(&ts)).await;
    };
    if dev.covered(ticket) {
        Stats::add(&sh.stats.flushes_shared, 1);
        return Ok(());
    }
    turn.check().map_err(|e| Errno(e.errno()))?;
    let pages = turn.take_pages();
    let sync_data = owed == Owed::Everything || turn.data_sync_needed();
    let datasync = || Op::DataSync { fd: OVERLAY_FD };
    if sync_data {
        Stats::add(&sh.stats.flushes, 1);
        finish(q, PendingOp::push(q, datasync(), 0))
            .await
            .map_err(|e| fail(&turn, "syncing overlay data", e))?;
        turn.data_synced();
    } else {
        Stats::add(&sh.stats.flushes_map_only, 1);
    }
    if pages.is_empty() {
        if sync_data {
            turn.completed();
        }
        return Ok(());
    }
    // One changed page (a FLUSH after one small write, the common case) is
    // written durable in one operation, which saves the queue a second
    // trip through an io_uring worker (with O_DIRECT, where the page is
    // written already, none at all); several are written, then synced
    // once, rather than each synced on its own.
    if let [(page, bytes)] = pages.as_slice()
        && direct_page(q, sh, *page, bytes)
            .await
            .map_err(|e| fail(&turn, "writing the overlay map", e))?
    {
        if sync_data {
            turn.completed();
        }
        return Ok(());
    }
    let one = pages.len() == 1;
    let writes = pages
        .iter()
        .map(|(page, bytes)| {
            let w = FileWrite {
                fd: OVERLAY_FD,
                from: WriteSource::Memory(bytes.as_ptr()),
                len: bytes.len() as u32,
                pos: dev.overlay().map_page_pos(*page),
                dsync: one,
            };
            w.push(q)
        })
        .collect();
    finish_all(q, writes)
        .await
        .map_err(|e| fail(&turn, "writing the overlay map", e))?;
    if !one {
        finish(q, PendingOp::push(q, datasync(), 0))
            .await
            .map_err(|e| fail(&turn, "syncing the overlay map", e))?;
    }
    // A flush that synced the data made every write before it durable: it
    // answers the FLUSHes in line before it, whoever asked for it.
    if sync_data {
        turn.completed();
    }
    Ok(())
}

/// A map page's bytes where O_DIRECT may take them from.
#[repr(C, align(4096))]
struct AlignedPage([u8; MAP_PAGE]);

/// Writes map page `page` durable through the overlay opened with
/// O_DIRECT, with `RWF_DSYNC`: whether it was so written. `false` where
/// the overlay has no such descriptor or asks an alignment the page does
/// not have, or the file system refused it (EINVAL); the caller then
/// writes it through the page cache. A page already written in the file is
/// overwritten in place, durable when the device completes the write (a
/// FUA write where it has a volatile cache), on the queue's thread without
/// an io_uring worker.
async fn direct_page<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    page: u64,
    bytes: &[u8],
) -> Result<bool, Errno> {
    let Some(d) = &sh.direct_overlay else {
        return Ok(false);
    };
    let pos = sh.dev.overlay().map_page_pos(page);
    let mut buf = Box::new(AlignedPage([0; MAP_PAGE]));
    buf.0.copy_from_slice(bytes);
    if !d.aligned(pos, MAP_PAGE as u64, buf.0.as_ptr() as usize) {
        return Ok(false);
    }
    let w = FileWrite {
        fd: OVERLAY_DIRECT_FD,
        from: WriteSource::Memory(buf.0.as_ptr()),
        len: MAP_PAGE as u32,
        pos,
        dsync: true,
    };
    match finish(q, w.push(q)).await {
        Ok(()) => Ok(true),
        Err(Errno::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Step 6: the device fails for good after `what` failed with `e`.
fn fail(turn: &DeviceFlushTurn<'_>, what: &str, e: Errno) -> Errno {
    turn.fail(what, std::io::Error::from_raw_os_error(e.0));
    e
}
