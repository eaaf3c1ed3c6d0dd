//! The io_uring executor: carries out the engine's plans as operations on
//! the queue's ring (`request → plan → io_uring ops → completion`).
//!
//! One file per kind of request: `read`, `write` (with DISCARD and
//! WRITE_ZEROES), `flush`, and `cache` (cache requests and copies of base
//! data into the overlay). This file holds what they share: the ring's
//! fixed files, the state every queue shares (`ServedDevice`), reads and overlay
//! writes that take the queue's thread when the data is in memory, and the
//! wait for a block lock.
//!
//! Every operation is pushed at once and awaited later (`ops`); the runs of
//! one request are all pushed before the first is awaited, so they are in
//! flight together. The ring's fixed files are the base (opened read-only),
//! the overlay, /dev/zero and the base opened with O_DIRECT (`RingFiles`).
//! With zero copy a
//! request's data is reached with fixed-buffer operations: a small READ of
//! mapped data from the tag's pipe (`read::pipe_read`), other runs from the
//! files; a small WRITE is taken with ublk's user copy (`request_buf`). The
//! only system calls made on the queue's thread itself are those of
//! `inline`, of the pipe and of user copy: reads of data already in memory
//! and writes to a file in memory, none of which starts a device I/O and
//! waits for it. A READ that lies in one run of a mapped file is not copied
//! here at all (`ReadDone::Mapped`), nor is a WRITE whose overlay pages are
//! mapped and ready (`write::place`).

mod cache;
mod flush;
mod read;
mod write;

pub use cache::{cache_range, install, install_from_base};
pub use flush::flush;
pub use read::{ReadDone, read};
pub use write::{write, write_request, write_zeroes};

use crate::engine::base::DirectAlign;
use crate::engine::locks::RangeGuard;
use crate::engine::plan::ReadRun;
use crate::stats::Stats;
use crate::sys::Pipe;
use crate::ublk::ServedDevice;
use crate::ublk::inline::MemoryPath;
use crate::ublk::ops::{FileWrite, Op, PendingOp, Ring, WriteSource, finish};
use io_uring::types;
use std::cell::OnceCell;
use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::atomic::AtomicU64;

/// The files of every queue's ring, in the order of their fixed-file
/// indices. Index 0 is ublk's char device, which libublk registers first
/// (`FIRST_FILE`); these follow it, and the `*_FD` constants below are
/// derived from this order.
pub struct RingFiles {
    pub(crate) base: RawFd,
    pub(crate) overlay: RawFd,
    /// /dev/zero, read into a request's pages for zero runs (zero copy).
    pub(crate) zero: RawFd,
    /// The base opened with O_DIRECT (`--base-io direct`), else the base.
    pub(crate) base_direct: RawFd,
}

impl RingFiles {
    /// The descriptors, in fixed-file order from `FIRST_FILE` on.
    pub(crate) fn in_order(&self) -> [RawFd; 4] {
        [self.base, self.overlay, self.zero, self.base_direct]
    }
}

/// The fixed-file index of the first of `RingFiles`.
pub(crate) const FIRST_FILE: u32 = 1;
pub(crate) const BASE_FD: types::Fixed = types::Fixed(FIRST_FILE);
pub const OVERLAY_FD: types::Fixed = types::Fixed(FIRST_FILE + 1);
pub(crate) const ZERO_FD: types::Fixed = types::Fixed(FIRST_FILE + 2);
pub(crate) const BASE_DIRECT_FD: types::Fixed = types::Fixed(FIRST_FILE + 3);

/// Per-queue buffers reused by every request of the queue.
pub struct ZeroBlocks {
    /// Zeros for zero-fill writes: two blocks, the most a partial
    /// WRITE_ZEROES without a whole block can cover.
    zeros: Vec<u8>,
}

impl ZeroBlocks {
    pub fn new(block_size: u32) -> ZeroBlocks {
        ZeroBlocks {
            zeros: vec![0u8; 2 * block_size as usize],
        }
    }
}

/// Per-tag scratch space, reused across requests.
#[derive(Default)]
pub struct TagScratch {
    runs: Vec<ReadRun>,
    fill: Vec<u8>,
    /// The tag's pipe for small READs of mapped data with zero copy (see
    /// `pipe_read`), made on first use; `None` in it if it could not be.
    pipe: OnceCell<Option<Pipe>>,
}

impl TagScratch {
    /// The runs of the last READ.
    pub(crate) fn runs(&self) -> &[ReadRun] {
        &self.runs
    }
}

/// Where a read goes for what the inline reader cannot serve.
#[derive(Clone, Copy)]
enum RingRead<'a> {
    /// This file of the ring, through the page cache.
    Cached(types::Fixed),
    /// The base with O_DIRECT (counted in the counter) when the page cache
    /// does not hold all of the read and the read is aligned for it; else
    /// as `Cached(BASE_FD)`.
    DirectBase(DirectAlign, &'a AtomicU64),
}

impl RingRead<'_> {
    /// Whether a read of `len` bytes at `pos` into memory at `addr` (`None`:
    /// a request's own pages) goes around the page cache; counts it if so.
    /// Only the page cache is asked whether it holds the data: an inline
    /// read of a miss would start a buffered read of the device (RWF_NOWAIT
    /// still starts readahead), which the direct read would do again.
    fn direct(&self, reader: &MemoryPath, pos: u64, len: u64, addr: Option<usize>) -> bool {
        let RingRead::DirectBase(a, n) = *self else {
            return false;
        };
        let direct = a.fits(pos, len, addr) && !reader.is_cached(pos, len);
        if direct {
            Stats::add(n, 1);
        }
        direct
    }

    /// The ring's file for a read through the page cache.
    fn cached_fd(&self) -> types::Fixed {
        match *self {
            RingRead::Cached(fd) => fd,
            RingRead::DirectBase(..) => BASE_FD,
        }
    }
}

/// Reads `dst` from file offset `pos`: what the inline reader can serve now,
/// and a ring read, pushed and returned, for the rest.
fn read_op<R: Ring>(
    q: &R,
    miss: RingRead<'_>,
    reader: &MemoryPath,
    pos: u64,
    dst: &mut [u8],
) -> Option<PendingOp<R>> {
    let len = dst.len() as u32;
    if miss.direct(reader, pos, len as u64, Some(dst.as_ptr() as usize)) {
        let op = Op::Read {
            fd: BASE_DIRECT_FD,
            to: dst.as_mut_ptr(),
            len,
            pos,
        };
        return Some(PendingOp::push(q, op, len));
    }
    let fd = miss.cached_fd();
    let done = reader.read(pos, dst);
    let rest = &mut dst[done..];
    if rest.is_empty() {
        return None;
    }
    let (at, len) = (pos + done as u64, rest.len() as u32);
    let op = Op::Read {
        fd,
        to: rest.as_mut_ptr(),
        len,
        pos: at,
    };
    Some(PendingOp::push(q, op, len))
}

/// Writes `data` at overlay file offset `pos`: on the queue's thread when the
/// overlay lives in memory (`Err` is its failure), else a ring write, pushed
/// and returned.
fn overlay_write_op<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    data: &[u8],
    pos: u64,
) -> Result<Option<PendingOp<R>>, i32> {
    match sh.overlay_io.write(pos, data) {
        Some(0) => Ok(None),
        Some(e) => Err(e),
        None => Ok(Some(
            FileWrite {
                fd: OVERLAY_FD,
                from: WriteSource::Memory(data.as_ptr()),
                len: data.len() as u32,
                pos,
            }
            .push(q),
        )),
    }
}

/// Writes `data` at overlay file offset `pos` and waits: 0 or a negative
/// errno.
async fn overlay_write<R: Ring>(q: &R, sh: &ServedDevice, data: &[u8], pos: u64) -> i32 {
    finish_write(q, overlay_write_op(q, sh, data, pos)).await
}

/// Completes a write that was done inline (`Ok(None)`), pushed, or failed
/// before it started: 0 or a negative errno.
async fn finish_write<R: Ring>(q: &R, write: Result<Option<PendingOp<R>>, i32>) -> i32 {
    match write {
        Ok(None) => 0,
        Ok(Some(op)) => finish(q, op).await,
        Err(e) => e,
    }
}

/// Waits until `blocks` are locked. Another queue's thread (or a request of
/// this queue) may hold them, and this thread must keep its ring turning
/// meanwhile, so the wait is a short io_uring timeout between tries; each
/// counts in `lock_waits`.
async fn lock<'a, R: Ring>(q: &R, sh: &'a ServedDevice, blocks: Range<u64>) -> RangeGuard<'a> {
    loop {
        if let Some(g) = sh
            .dev
            .locks()
            .try_lock(blocks.start, blocks.end - blocks.start)
        {
            return g;
        }
        Stats::add(&sh.stats.lock_waits, 1);
        let ts = types::Timespec::new().nsec(20_000);
        q.push(Op::Timeout(&ts)).await;
    }
}
