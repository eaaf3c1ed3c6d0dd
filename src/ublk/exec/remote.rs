//! Requests over a remote base (`add --base URL`): before a request is
//! planned, the units of the base it needs are fetched into the overlay as
//! `Copied` blocks, so that its plan finds them there and never reads the
//! base itself (whose ring file refuses reads: see `RemoteBase::refuser`).
//! The fetcher keeps each unit in the overlay itself before it reports it
//! (`ServedDevice::keep_fetched_units`), only into blocks still
//! `Unallocated`, so a write that came meanwhile wins; and a request of a
//! unit in flight joins that fetch (single flight), so none is fetched
//! twice.
//!
//! A queue's thread never blocks on a fetch. Each wait has its own
//! [`Arrivals`]: the fetcher's callback (on one of the fetcher's threads)
//! leaves the unit's outcome there and signals its eventfd, which the
//! waiting task reads on its ring; the other tags go on meanwhile.
//! Prefetch ([`prefetch_below`]) does not wait at all.

use crate::engine::Errno;
use crate::engine::map::BlockState;
use crate::remote::RemoteBase;
use crate::remote::fetcher::Outcome;
use crate::stats::Stats;
use crate::sys::EventFd;
use crate::ublk::ServedDevice;
use crate::ublk::ops::{Op, Ring};
use std::sync::{Arc, Mutex};

/// Where the outcomes of one wait's fetches arrive.
struct Arrivals {
    event: EventFd,
    /// Units whose fetch ended, not yet taken by the waiting task: filled
    /// by the fetcher's callbacks, emptied by the task.
    done: Mutex<Vec<(u64, Outcome)>>,
}

impl Arrivals {
    fn arrive(&self, unit: u64, outcome: Outcome) {
        self.done.lock().unwrap().push((unit, outcome));
        self.event.signal();
    }

    fn take(&self) -> Vec<(u64, Outcome)> {
        std::mem::take(&mut *self.done.lock().unwrap())
    }
}

/// The units of `[off, off + len)` that hold a block still on the base.
fn needed(sh: &ServedDevice, remote: &RemoteBase, off: u64, len: u64) -> Vec<u64> {
    let map = sh.dev.map();
    let bs = sh.dev.geometry().block_size();
    remote.units_needed(off, len, bs, |b| map.get(b) == BlockState::Unallocated)
}

/// Brings into the overlay every unit of a remote base that holds a block
/// of `[off, off + len)` still on the base. Returns the units fetched: 0
/// when none was needed, or the base is not remote. A failed fetch fails
/// the request with EIO (after every fetch it started has ended); the
/// units that did arrive are kept.
pub async fn fetch_below<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    off: u64,
    len: u64,
) -> Result<u64, Errno> {
    let Some(remote) = sh.dev.base().remote() else {
        return Ok(0);
    };
    let Some(fetcher) = remote.fetcher() else {
        return Err(Errno::EIO);
    };
    let units = needed(sh, remote, off, len);
    if units.is_empty() {
        return Ok(0);
    }
    let arrivals = Arc::new(Arrivals {
        event: EventFd::new().map_err(|e| Errno::of(&e))?,
        done: Mutex::new(Vec::new()),
    });
    for &u in &units {
        let a = arrivals.clone();
        fetcher.start(u, move |outcome| a.arrive(u, outcome));
    }
    Stats::add(&sh.stats.remote_waits, 1);
    let mut left = units.len();
    let mut result = Ok(units.len() as u64);
    let mut counter = Box::new(0u64);
    while left > 0 {
        let arrived = arrivals.take();
        if arrived.is_empty() {
            let wait = Op::ReadEvent {
                fd: arrivals.event.raw(),
                to: &mut *counter,
            };
            // `counter` stays in place until the read completes: awaited here.
            let r = q.push(wait).await;
            if r < 0 && r != -libc::EINTR && r != -libc::EAGAIN {
                // The ring cannot wait for the fetches: their callbacks
                // still come (into `arrivals`, kept alive by them).
                return Err(Errno::from_negative(r));
            }
            continue;
        }
        for (_, outcome) in arrived {
            left -= 1;
            if let Err(e) = outcome {
                log::warn!("{e}");
                Stats::add(&sh.stats.remote_failed_requests, 1);
                result = Err(Errno::EIO);
            }
        }
    }
    result
}

/// Starts fetches of the units of `[off, off + len)` not in the overlay
/// yet, at most the fetcher's prefetch depth of GETs in flight, and returns
/// at once: the fetcher keeps them in the overlay. For readahead.
pub fn prefetch_below(sh: &ServedDevice, off: u64, len: u64) {
    let Some(remote) = sh.dev.base().remote() else {
        return;
    };
    let Some(fetcher) = remote.fetcher() else {
        return;
    };
    let units = needed(sh, remote, off, len);
    if !units.is_empty() {
        fetcher.prefetch(units, Arc::new(|_, _| {}));
    }
}

/// [`fetch_below`] for the blocks a WRITE or a WRITE_ZEROES of `[off, off +
/// len)` covers only in part: the rest of each comes from below.
pub async fn fetch_edges<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    off: u64,
    len: u64,
) -> Result<(), Errno> {
    if sh.dev.base().remote().is_none() || len == 0 {
        return Ok(());
    }
    let geo = sh.dev.geometry();
    let bs = geo.block_size() as u64;
    let end = off + len;
    let head = geo.block_start(geo.block_of(off));
    if off != head {
        fetch_below(q, sh, head, bs).await?;
    }
    let tail = geo.block_start(geo.block_of(end - 1));
    if !end.is_multiple_of(bs) && end < geo.size() && (tail != head || off == head) {
        fetch_below(q, sh, tail, bs).await?;
    }
    Ok(())
}
