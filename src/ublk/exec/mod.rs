//! The io_uring executor: carries out the engine's plans as operations on
//! the queue's ring (`request → plan → io_uring ops → completion`).
//!
//! One file per kind of request: `read`, `write` (with DISCARD and
//! WRITE_ZEROES), `flush`, and `cache` (cache requests and copies of base
//! data into the overlay). This file holds what they share: the ring's
//! fixed files, the state every queue shares (`Shared`), reads and overlay
//! writes that take the queue's thread when the data is in memory, and the
//! wait for a block lock.
//!
//! Every operation is pushed at once and awaited later (`ops`); the runs of
//! one request are all pushed before the first is awaited, so they are in
//! flight together. Fixed file 1 is the base (opened read-only), fixed file
//! 2 the overlay, fixed file 3 /dev/zero, fixed file 4 the base opened with
//! O_DIRECT (`--base-io direct`; else the base once more). With zero copy a
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
pub use write::{write, write_zeroes};

use crate::engine::base::{DirectAlign, DirectBase};
use crate::engine::cache::CachePolicy;
use crate::engine::device::CowDevice;
use crate::engine::locks::RangeGuard;
use crate::engine::plan::ReadRun;
use crate::stats::Stats;
use crate::sys::Pipe;
use crate::ublk::inline::InlineFile;
use crate::ublk::ops::{self, FileWrite, PendingOp, WriteSource, finish};
use io_uring::{opcode, types};
use libublk::io::UblkQueue;
use std::cell::OnceCell;
use std::fs::File;
use std::ops::Range;
use std::sync::atomic::AtomicU64;

pub const BASE_FD: types::Fixed = types::Fixed(1);
pub const OVERLAY_FD: types::Fixed = types::Fixed(2);
pub const ZERO_FD: types::Fixed = types::Fixed(3);
pub const BASE_DIRECT_FD: types::Fixed = types::Fixed(4);

pub type Device = CowDevice<File, File>;
type DeviceFlushTurn<'a> = crate::engine::device::FlushTurn<'a, File, File>;

/// What every queue shares: the device (with its flush turn), its cache
/// policy and the counters.
pub struct Shared {
    pub dev: Device,
    pub policy: CachePolicy,
    pub stats: Stats,
    /// I/O of the base and the overlay that can be served on the queue's
    /// thread (see `inline`).
    base_io: InlineFile,
    overlay_io: InlineFile,
    /// The overlay's pages of every `Unallocated` block exist, initialized,
    /// in its mapping: it was preallocated and populated when the device
    /// was added (see `plan::overlay_pages_ready`).
    unallocated_ready: bool,
    /// The base opened with O_DIRECT, for READs of base blocks that the
    /// page cache does not hold (`--base-io direct`).
    direct: Option<DirectBase>,
}

impl Shared {
    /// The queues' view of `dev`. `preallocated`: the overlay's data area
    /// was just allocated in full (`add --preallocate`); if it lives in
    /// memory its pages are then made ready for WRITE data (`populate`).
    pub fn new(
        dev: Device,
        policy: CachePolicy,
        preallocated: bool,
        direct: Option<DirectBase>,
    ) -> std::io::Result<Shared> {
        let size = dev.geometry().size();
        let base_io = InlineFile::new(dev.base(), size, false)?;
        let overlay = dev.overlay();
        let overlay_io = InlineFile::new(overlay.storage(), overlay.data_pos(size), true)?;
        let data = overlay.data_pos(0)..overlay.data_pos(size);
        let unallocated_ready = preallocated
            && overlay_io.placeable(data.start, 0).is_some()
            && match overlay_io.populate(data.start, data.end - data.start) {
                Ok(()) => true,
                Err(e) => {
                    log::warn!("overlay pages not made ready for writes: {e}");
                    false
                }
            };
        Ok(Shared {
            dev,
            policy,
            stats: Stats::default(),
            base_io,
            overlay_io,
            unallocated_ready,
            direct,
        })
    }

    /// The base's descriptor for direct reads, if there is one.
    pub fn direct_base(&self) -> Option<&File> {
        self.direct.as_ref().map(|d| &d.file)
    }

    /// How READs reach base blocks the page cache lacks: `Some` with the
    /// alignment direct reads need, `None` through the page cache.
    fn direct_align(&self) -> Option<DirectAlign> {
        self.direct.as_ref().map(|d| d.align)
    }
}

/// Per-queue buffers reused by every request of the queue.
pub struct QueueBufs {
    /// Zeros for zero-fill writes: two blocks, the most a partial
    /// WRITE_ZEROES without a whole block can cover.
    zeros: Vec<u8>,
}

impl QueueBufs {
    pub fn new(block_size: u32) -> QueueBufs {
        QueueBufs {
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
    pub fn runs(&self) -> &[ReadRun] {
        &self.runs
    }
}

/// Where a read goes for what the inline reader cannot serve.
#[derive(Clone, Copy)]
enum Miss<'a> {
    /// This file of the ring, through the page cache.
    Ring(types::Fixed),
    /// The base with O_DIRECT (counted in the counter) when the page cache
    /// does not hold all of the read and the read is aligned for it; else
    /// as `Ring(BASE_FD)`.
    DirectBase(DirectAlign, &'a AtomicU64),
}

impl Miss<'_> {
    /// Whether a read of `len` bytes at `pos` into memory at `addr` (`None`:
    /// a request's own pages) goes around the page cache; counts it if so.
    /// Only the page cache is asked whether it holds the data: an inline
    /// read of a miss would start a buffered read of the device (RWF_NOWAIT
    /// still starts readahead), which the direct read would do again.
    fn direct(&self, reader: &InlineFile, pos: u64, len: u64, addr: Option<usize>) -> bool {
        let Miss::DirectBase(a, n) = *self else {
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
            Miss::Ring(fd) => fd,
            Miss::DirectBase(..) => BASE_FD,
        }
    }
}

/// Reads `dst` from file offset `pos`: what the inline reader can serve now,
/// and a ring read, pushed and returned, for the rest.
fn read_op(
    q: &UblkQueue<'_>,
    miss: Miss<'_>,
    reader: &InlineFile,
    pos: u64,
    dst: &mut [u8],
) -> Option<PendingOp> {
    let len = dst.len() as u32;
    if miss.direct(reader, pos, len as u64, Some(dst.as_ptr() as usize)) {
        let sqe = ops::read(BASE_DIRECT_FD, dst.as_mut_ptr(), len, pos);
        return Some(PendingOp::push(q, sqe, len));
    }
    let fd = miss.cached_fd();
    let done = reader.read(pos, dst);
    let rest = &mut dst[done..];
    if rest.is_empty() {
        return None;
    }
    let (at, len) = (pos + done as u64, rest.len() as u32);
    Some(PendingOp::push(
        q,
        ops::read(fd, rest.as_mut_ptr(), len, at),
        len,
    ))
}

/// Writes `data` at overlay file offset `pos`: on the queue's thread when the
/// overlay lives in memory (`Err` is its failure), else a ring write, pushed
/// and returned.
fn overlay_write_op(
    q: &UblkQueue<'_>,
    sh: &Shared,
    data: &[u8],
    pos: u64,
) -> Result<Option<PendingOp>, i32> {
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
async fn overlay_write(q: &UblkQueue<'_>, sh: &Shared, data: &[u8], pos: u64) -> i32 {
    finish_write(q, overlay_write_op(q, sh, data, pos)).await
}

/// Completes a write that was done inline (`Ok(None)`), pushed, or failed
/// before it started: 0 or a negative errno.
async fn finish_write(q: &UblkQueue<'_>, write: Result<Option<PendingOp>, i32>) -> i32 {
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
async fn lock<'a>(q: &UblkQueue<'_>, sh: &'a Shared, blocks: Range<u64>) -> RangeGuard<'a> {
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
        q.ublk_submit_sqe(opcode::Timeout::new(&ts).build()).await;
    }
}
