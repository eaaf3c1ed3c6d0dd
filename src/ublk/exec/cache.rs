//! Cache requests on the queue's ring (the steps `engine::cache` plans:
//! fadvise, read, copy into the overlay), and the installing of base data
//! into the overlay under the blocks' locks.

use super::{BASE_FD, OVERLAY_FD, below_pieces, layer_fd, lock, overlay_write, read_below};
use crate::engine::Errno;
use crate::engine::cache::{CacheAction, CacheMode, cache_blocks, fadvise_pieces, plan_cache};
use crate::engine::chain::Below;
use crate::engine::locks::MAX_LOCK_BLOCKS;
use crate::engine::map::BlockState;
use crate::stats::Stats;
use crate::ublk::ServedDevice;
use crate::ublk::ops::{Op, Ring, finish_all};
use std::collections::VecDeque;

/// Largest piece of base data a cache request reads or copies at once.
const CACHE_PIECE: u64 = 1 << 20;

/// `fadvise(WILLNEED)` pieces of one cache request in flight at once: a
/// whole 4 MiB window of 128 KiB pieces (`ServedDevice::advice`: larger
/// where the file's device reads more per call). io_uring runs each on a
/// worker thread (the advice may block), and each starts its reads and
/// returns; one at a time left the base idle whenever the queue's thread
/// waited for a page still being read, and measured slower over a slow
/// base (docs/benchmarks.md, "Readahead over a slow base").
const WILLNEED_IN_FLIGHT: usize = 32;

/// A cache request on the queue's ring (see `engine::cache`): fadvise steps
/// as io_uring `Fadvise` in each file's pieces (`ServedDevice::advice`),
/// `WILLNEED_IN_FLIGHT` at a time; reads and copies in pieces of at most
/// `CACHE_PIECE`.
pub async fn cache_range<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    off: u64,
    len: u64,
    mode: CacheMode,
) -> i32 {
    let dev = &sh.dev;
    let geo = *dev.geometry();
    let Ok(blocks) = cache_blocks(&geo, off, len) else {
        return -libc::EINVAL;
    };
    if dev.base().remote().is_some() {
        // A remote base has no page cache: whatever the mode, its blocks
        // are fetched into the overlay, in the background.
        super::prefetch_below(sh, off, len);
        return 0;
    }
    let mut steps = Vec::new();
    plan_cache(dev.map(), &geo, blocks, mode, &mut steps);
    let st = &sh.stats;
    for step in steps {
        // What to advise: the overlay's data, or each piece below it where
        // it lies (a chain's pieces in their layers; zeros need nothing).
        let (advise, counter) = match step.action {
            CacheAction::FadviseOverlay => (
                vec![(
                    OVERLAY_FD,
                    dev.overlay().data_pos(step.off),
                    step.len,
                    sh.advice.overlay,
                )],
                &st.fadvise_overlay_bytes,
            ),
            CacheAction::FadviseBase => {
                let pieces = below_pieces(sh, step.off, step.len);
                let advise = pieces
                    .into_iter()
                    .filter_map(|(from, at, to)| match from {
                        Below::Base => Some((BASE_FD, at, to - at, sh.advice.base)),
                        Below::Layer(k) => Some((
                            layer_fd(k),
                            sh.layer_pos(k, at),
                            to - at,
                            sh.advice.layers[k],
                        )),
                        Below::Zero => None,
                    })
                    .collect();
                (advise, &st.fadvise_base_bytes)
            }
            CacheAction::ReadBase | CacheAction::CopyToOverlay => {
                let mut at = step.off;
                while at < step.off + step.len {
                    let n = CACHE_PIECE.min(step.off + step.len - at);
                    let buf = match read_base(q, sh, at, n).await {
                        Ok(b) => b,
                        Err(e) => return e.negative(),
                    };
                    if step.action == CacheAction::ReadBase {
                        Stats::add(&st.cache_read_bytes, n);
                    } else {
                        let r = install(q, sh, at, &buf).await;
                        if r < 0 {
                            return r;
                        }
                    }
                    at += n;
                }
                continue;
            }
        };
        Stats::add(counter, step.len);
        let mut in_flight = VecDeque::new();
        for (fd, (at, n)) in advise
            .into_iter()
            .flat_map(|(fd, pos, len, piece)| fadvise_pieces(pos, len, piece).map(move |p| (fd, p)))
        {
            if in_flight.len() == WILLNEED_IN_FLIGHT
                && let Some(f) = in_flight.pop_front()
            {
                // Advice only: its failure changes nothing.
                let _ = f.await;
            }
            in_flight.push_back(q.push(Op::WillNeed {
                fd,
                pos: at,
                len: n,
            }));
        }
        for f in in_flight {
            let _ = f.await;
        }
    }
    0
}

/// Installs the base data at device offset `off`, `len` bytes, as `install`
/// does, reading it from the base first: with zero copy a READ's data never
/// passes through the daemon's memory.
pub async fn install_from_base<R: Ring>(q: &R, sh: &ServedDevice, off: u64, len: u64) -> i32 {
    if sh.dev.base().remote().is_some() {
        // A READ fetched its units into the overlay already.
        return 0;
    }
    match read_base(q, sh, off, len).await {
        Ok(data) => install(q, sh, off, &data).await,
        Err(e) => e.negative(),
    }
}

/// Reads `len` bytes below the overlay at `off` (the base, or a chain's
/// layers) into a new buffer and waits.
async fn read_base<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    off: u64,
    len: u64,
) -> Result<Vec<u8>, Errno> {
    let mut data = vec![0u8; len as usize];
    let mut pending = Vec::new();
    read_below(q, sh, off, &mut data, &mut pending);
    finish_all(q, pending).await?;
    Ok(data)
}

/// Installs base data `data`, read at device offset `off`, into the overlay
/// for every block it fully covers that is still `Unallocated` — under the
/// blocks' locks, re-checking the state, so a copy never lands over a write
/// or discard that came after the read. Returns 0 or a negative errno.
pub async fn install<R: Ring>(q: &R, sh: &ServedDevice, off: u64, data: &[u8]) -> i32 {
    let dev = &sh.dev;
    let geo = *dev.geometry();
    let end = off + data.len() as u64;
    let mut first = geo.block_of(off + geo.block_size() as u64 - 1);
    let mut last = geo.block_of(end);
    if end == geo.size() {
        last = geo.blocks();
    }
    while first < last {
        let chunk_end = last.min(first + MAX_LOCK_BLOCKS);
        if !(first..chunk_end).any(|b| dev.map().get(b) == BlockState::Unallocated) {
            first = chunk_end;
            continue;
        }
        let guard = lock(q, sh, first..chunk_end).await;
        for run in dev.map().unallocated_runs(first..chunk_end) {
            let from = geo.block_start(run.start);
            let to = geo.block_end(run.end - 1);
            let src = &data[(from - off) as usize..(to - off) as usize];
            let r = overlay_write(q, sh, src, dev.overlay().data_pos(from)).await;
            if let Err(e) = r {
                return e.negative();
            }
            dev.map().set_range(&guard, run, BlockState::Copied);
            Stats::add(&sh.stats.copied_to_overlay_bytes, to - from);
        }
        first = chunk_end;
    }
    0
}
