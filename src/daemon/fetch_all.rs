//! `cache` of a device over a remote base: every unit of the range that
//! holds a block still on the base is fetched, at most the fetcher's
//! prefetch depth of GETs in flight; the fetcher keeps each in the overlay
//! as `Copied` blocks (`ServedDevice::keep_fetched_units`). Whatever the
//! cache mode: a remote base has no page cache to warm.

use crate::engine::device::CacheDone;
use crate::engine::map::BlockState;
use crate::remote::RemoteBase;
use crate::ublk::ServedDevice;
use anyhow::{Result, anyhow};
use std::sync::{Arc, mpsc};

/// Fetches and installs the units of `[offset, offset + length)`;
/// `progress` gets the bytes of the range done so far after each unit.
pub(crate) fn cache_range(
    sh: &ServedDevice,
    remote: &RemoteBase,
    offset: u64,
    length: u64,
    mut progress: impl FnMut(u64) -> Result<()>,
) -> Result<CacheDone> {
    let fetcher = remote
        .fetcher()
        .ok_or_else(|| anyhow!("the remote base is not connected"))?;
    let geo = *sh.dev.geometry();
    let map = sh.dev.map();
    let end = offset + length;
    let needed = remote.units_needed(offset, length, geo.block_size(), |b| {
        map.get(b) == BlockState::Unallocated
    });
    // The part of the range in unit `u`.
    let span = |u: u64| {
        let r = fetcher.unit_range(u);
        r.end.min(end) - r.start.max(offset)
    };
    // Units with nothing to fetch count as done at once.
    let mut done_bytes = length - needed.iter().map(|&u| span(u)).sum::<u64>();
    let (tx, rx) = mpsc::channel();
    fetcher.prefetch(
        needed.clone(),
        Arc::new(move |u, outcome| {
            let _ = tx.send((u, outcome));
        }),
    );
    let mut report = CacheDone::default();
    for _ in 0..needed.len() {
        let (u, outcome) = rx.recv().map_err(|_| anyhow!("the fetcher stopped"))?;
        let bytes = outcome?;
        report.copied += bytes.len() as u64;
        done_bytes += span(u);
        progress(done_bytes)?;
    }
    Ok(report)
}
