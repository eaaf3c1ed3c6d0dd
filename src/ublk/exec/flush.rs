//! FLUSH with io_uring: the steps of `engine::device::FlushTurn` as
//! operations on the queue's ring. The device owns the one flush turn and
//! the failed state; a turn another flush holds is waited for with short
//! ring timeouts, so the queue's thread never blocks on another queue. The
//! syncs run on the ring's workers, or on the queue's thread for a request
//! alone on its queue (`SyncsOn`).

use super::OVERLAY_FD;
use super::SyncsOn;
use crate::engine::Errno;
use crate::stats::Stats;
use crate::ublk::ServedDevice;
use crate::ublk::ops::{
    FileWrite, Op, PendingOp, Ring, WriteSource, finish, finish_all, sync_here, write_here,
};
use crate::ublk::served::DeviceFlushTurn;
use io_uring::types;
use std::os::fd::AsRawFd;

/// FLUSH: overlay data durable, then the changed map pages, then durable
/// again (see `FlushTurn`, the same steps; a single page is written with
/// `RWF_DSYNC`, durable in the same operation), the syncs on `syncs`' side.
/// Fails with EIO, writing nothing, once a flush of the device has failed.
/// A FLUSH that a flush beginning after it completed covers (`FlushTicket`)
/// is answered at once.
pub async fn flush<R: Ring>(q: &R, sh: &ServedDevice, syncs: SyncsOn) -> Result<(), Errno> {
    flush_as(q, sh, Owed::Everything, syncs).await
}

/// After a FUA WRITE whose data was written durable: its map change made
/// durable, which needs no sync of the overlay's data unless some map page
/// taken may name data that is not durable yet
/// (`FlushTurn::data_sync_needed`). Other writes are not made durable by
/// it, as FUA does not ask that, so it answers no FLUSH.
pub async fn flush_after_durable_write<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    syncs: SyncsOn,
) -> Result<(), Errno> {
    flush_as(q, sh, Owed::DurableWritesMap, syncs).await
}

/// What a flush owes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owed {
    /// A FLUSH's: every write completed before it durable.
    Everything,
    /// A durable FUA WRITE's: the map pages that name its blocks durable.
    DurableWritesMap,
}

async fn flush_as<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    owed: Owed,
    syncs: SyncsOn,
) -> Result<(), Errno> {
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
    let here = syncs == SyncsOn::Thread;
    let overlay = sh.dev.overlay().storage().as_raw_fd();
    if sync_data {
        Stats::add(&sh.stats.flushes, 1);
        let synced = match here {
            true => {
                Stats::add(&sh.stats.syncs_on_thread, 1);
                sync_here(q, OVERLAY_FD, overlay)
            }
            false => finish(q, PendingOp::push(q, datasync(), 0)).await,
        };
        synced.map_err(|e| fail(&turn, "syncing overlay data", e))?;
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
    // trip through an io_uring worker (on this thread, none); several are
    // written, then synced once, rather than each synced on its own.
    let one = pages.len() == 1;
    if one && here {
        let w = page_write(sh, &pages[0], true);
        Stats::add(&sh.stats.syncs_on_thread, 1);
        write_here(q, w, overlay).map_err(|e| fail(&turn, "writing the overlay map", e))?;
        if sync_data {
            turn.completed();
        }
        return Ok(());
    }
    let writes = pages
        .iter()
        .map(|p| page_write(sh, p, one).push(q))
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

/// The write of map page `page` (`(page, bytes)`, as `take_pages` gives
/// it) to the overlay, durable when it completes if `dsync`.
fn page_write(sh: &ServedDevice, (page, bytes): &(u64, Vec<u8>), dsync: bool) -> FileWrite {
    FileWrite {
        fd: OVERLAY_FD,
        from: WriteSource::Memory(bytes.as_ptr()),
        len: bytes.len() as u32,
        pos: sh.dev.overlay().map_page_pos(*page),
        dsync,
    }
}

/// Step 6: the device fails for good after `what` failed with `e`.
fn fail(turn: &DeviceFlushTurn<'_>, what: &str, e: Errno) -> Errno {
    turn.fail(what, std::io::Error::from_raw_os_error(e.0));
    e
}
