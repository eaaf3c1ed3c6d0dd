//! FLUSH with io_uring: the steps of `engine::device::FlushTurn` as
//! operations on the queue's ring. The device owns the one flush turn and
//! the failed state; a turn another flush holds is waited for with short
//! ring timeouts, so the queue's thread never blocks.

use super::OVERLAY_FD;
use crate::stats::Stats;
use crate::ublk::ServedDevice;
use crate::ublk::ops::{FileWrite, Op, PendingOp, Ring, WriteSource, finish, finish_all};
use crate::ublk::served::DeviceFlushTurn;
use io_uring::types;

/// FLUSH: overlay data durable, then the changed map pages, then durable
/// again (see `FlushTurn`, the same steps). Fails with EIO, writing
/// nothing, once a flush of the device has failed.
pub async fn flush<R: Ring>(q: &R, sh: &ServedDevice) -> i32 {
    let dev = &sh.dev;
    let turn = loop {
        if let Some(t) = dev.try_flush_turn() {
            break t;
        }
        let ts = types::Timespec::new().nsec(50_000);
        q.push(Op::Timeout(&ts)).await;
    };
    if let Err(e) = turn.check() {
        return -e.errno();
    }
    Stats::add(&sh.stats.flushes, 1);
    let pages = turn.take_pages();
    let datasync = || Op::DataSync { fd: OVERLAY_FD };
    let r = finish(q, PendingOp::push(q, datasync(), 0)).await;
    if r != 0 {
        return fail(&turn, "syncing overlay data", r);
    }
    if pages.is_empty() {
        return 0;
    }
    let writes = pages
        .iter()
        .map(|(page, bytes)| {
            let w = FileWrite {
                fd: OVERLAY_FD,
                from: WriteSource::Memory(bytes.as_ptr()),
                len: bytes.len() as u32,
                pos: dev.overlay().map_page_pos(*page),
            };
            w.push(q)
        })
        .collect();
    let r = finish_all(q, writes).await;
    if r != 0 {
        return fail(&turn, "writing the overlay map", r);
    }
    let r = finish(q, PendingOp::push(q, datasync(), 0)).await;
    if r != 0 {
        return fail(&turn, "syncing the overlay map", r);
    }
    0
}

/// Step 6: the device fails for good; `r` is the negative errno.
fn fail(turn: &DeviceFlushTurn<'_>, what: &str, r: i32) -> i32 {
    turn.fail(what, std::io::Error::from_raw_os_error(-r));
    r
}
