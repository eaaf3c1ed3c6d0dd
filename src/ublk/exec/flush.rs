//! FLUSH: the overlay's data made durable, then the map pages that changed
//! written and made durable, one flush at a time.

use super::OVERLAY_FD;
use crate::stats::Stats;
use crate::ublk::ServedDevice;
use crate::ublk::ops::{FileWrite, Op, PendingOp, Ring, WriteSource, finish, finish_all};
use io_uring::types;
use std::sync::atomic::Ordering;

/// FLUSH: overlay data durable, then the changed map pages, then durable
/// again (see `CowDevice::flush`, the same order). One flush at a time.
pub async fn flush<R: Ring>(q: &R, sh: &ServedDevice) -> i32 {
    while sh
        .flushing
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        let ts = types::Timespec::new().nsec(50_000);
        q.push(Op::Timeout(&ts)).await;
    }
    let dev = &sh.dev;
    Stats::add(&sh.stats.flushes, 1);
    let pages = dev.map().take_dirty_pages();
    let datasync = || Op::DataSync { fd: OVERLAY_FD };
    let mut r = finish(q, PendingOp::push(q, datasync(), 0)).await;
    if r == 0 && !pages.is_empty() {
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
        r = finish_all(q, writes).await;
        if r == 0 {
            r = finish(q, PendingOp::push(q, datasync(), 0)).await;
        }
    }
    if r != 0 {
        dev.map().redirty(&pages);
    }
    sh.flushing.store(false, Ordering::Release);
    r
}
