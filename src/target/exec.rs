//! The io_uring executor: carries out the engine's plans as operations on
//! the queue's ring (`request → plan → io_uring ops → completion`).
//!
//! Every operation is pushed at once and awaited later (`ops`); the runs of
//! one request are all pushed before the first is awaited, so they are in
//! flight together. Fixed file 1 is the base (opened read-only), fixed file
//! 2 the overlay, fixed file 3 /dev/zero, fixed file 4 the base opened with
//! O_DIRECT (`--base-io direct`; else the base once more). With zero copy a
//! request's data is reached with fixed-buffer operations: a small READ of
//! mapped data from the tag's pipe (`pipe_read`), other runs from the
//! files; a small WRITE is taken with ublk's user copy (`request_buf`). The
//! only system calls made on the queue's thread itself are those of
//! `inline`, of the pipe and of user copy: reads of data already in memory
//! and writes to a file in memory, none of which starts a device I/O and
//! waits for it. A READ that lies in one run of a mapped file is not copied
//! here at all (`ReadDone::Mapped`), nor is a WRITE whose overlay pages are
//! mapped and ready (`place`).

use crate::engine::base::{DirectAlign, DirectBase};
use crate::engine::cache::{
    CacheAction, CacheMode, CachePolicy, cache_blocks, fadvise_pieces, plan_cache,
};
use crate::engine::device::CowDevice;
use crate::engine::locks::{MAX_LOCK_BLOCKS, RangeGuard};
use crate::engine::map::BlockState;
use crate::engine::plan::{self, Fill, ReadRun, ReadSource, WritePath};
use crate::stats::Stats;
use crate::sys::Pipe;
use crate::target::inline::InlineFile;
use crate::target::ops::{self, FileWrite, PendingOp, WriteSource, finish, finish_all};
use crate::target::request_buf::RequestBuf;
use crate::target::write_data::{Placement, WriteData};
use io_uring::{opcode, types};
use libublk::io::UblkQueue;
use std::cell::OnceCell;
use std::fs::File;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub const BASE_FD: types::Fixed = types::Fixed(1);
pub const OVERLAY_FD: types::Fixed = types::Fixed(2);
pub const ZERO_FD: types::Fixed = types::Fixed(3);
pub const BASE_DIRECT_FD: types::Fixed = types::Fixed(4);

pub type Device = CowDevice<File, File>;

/// What every queue shares: the device, its cache policy, the counters and
/// the flush serializer.
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
    /// Held while a flush writes map pages, so snapshots land in order.
    flushing: AtomicBool,
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
            flushing: AtomicBool::new(false),
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

/// Where a READ left its data.
pub enum ReadDone {
    /// In the request buffer; or the READ failed (a negative errno).
    Buffer(i32),
    /// All of it is in one mapped file, at this address. ublk copies it into
    /// the request from there when the READ is committed: one copy instead
    /// of two.
    Mapped(*const u8),
}

/// READ of `buf.len()` bytes at `off`. With `may_map`, data in the
/// daemon's memory that lies in one mapped run is left where it is
/// (`ReadDone::Mapped`).
pub async fn read(
    q: &UblkQueue<'_>,
    sh: &Shared,
    s: &mut TagScratch,
    off: u64,
    mut buf: RequestBuf<'_>,
    may_map: bool,
) -> ReadDone {
    let dev = &sh.dev;
    plan::plan_read(
        dev.map(),
        dev.geometry(),
        off,
        buf.len() as u64,
        &mut s.runs,
    );
    let mut pending = Vec::with_capacity(s.runs.len());
    let single = s.runs.len() == 1;
    let mut spliced = false;
    for run in &s.runs {
        let st = &sh.stats;
        let (miss, reader, pos) = match run.source {
            ReadSource::Zero => {
                Stats::add(&st.read_zero_ops, 1);
                Stats::add(&st.read_zero_bytes, run.len);
                match &mut buf {
                    RequestBuf::Memory(b) => b[run.buf_off..][..run.len as usize].fill(0),
                    RequestBuf::Registered { index, .. } => {
                        let len = run.len as u32;
                        let sqe = ops::read_fixed(ZERO_FD, *index, run.buf_off, len, 0);
                        pending.push(PendingOp::push(q, sqe, len));
                    }
                }
                continue;
            }
            ReadSource::Base => {
                Stats::add(&st.read_base_ops, 1);
                Stats::add(&st.read_base_bytes, run.len);
                let miss = match sh.direct_align() {
                    Some(a) => Miss::DirectBase(a, &st.read_base_direct_ops),
                    None => Miss::Ring(BASE_FD),
                };
                (miss, &sh.base_io, run.off)
            }
            ReadSource::Overlay => {
                Stats::add(&st.read_overlay_ops, 1);
                Stats::add(&st.read_overlay_bytes, run.len);
                let pos = dev.overlay().data_pos(run.off);
                (Miss::Ring(OVERLAY_FD), &sh.overlay_io, pos)
            }
        };
        let user_copy = buf.user_copy(run.buf_off);
        let dst = match &mut buf {
            RequestBuf::Memory(b) => &mut b[run.buf_off..][..run.len as usize],
            RequestBuf::Registered { index, .. } => {
                let len = run.len as u32;
                if user_copy.is_some()
                    && single
                    && let Some(op) = pipe_read(q, &s.pipe, reader, pos, *index, run.buf_off, len)
                {
                    Stats::add(&st.reads_from_mapping, 1);
                    Stats::add(&st.reads_spliced, 1);
                    spliced = true;
                    pending.push(op);
                    continue;
                }
                if let Some(to) = user_copy
                    && reader.copy_to_request(pos, len as usize, to) == Some(true)
                {
                    Stats::add(&st.reads_from_mapping, 1);
                    continue;
                }
                // The request's pages are out of `inline`'s reach: a run
                // the page cache holds is read through it.
                let fd = if miss.direct(reader, pos, len as u64, None) {
                    BASE_DIRECT_FD
                } else {
                    miss.cached_fd()
                };
                let sqe = ops::read_fixed(fd, *index, run.buf_off, len, pos);
                pending.push(PendingOp::push(q, sqe, len));
                continue;
            }
        };
        if may_map
            && s.runs.len() == 1
            && let Some(at) = reader.mapped(pos, dst.len())
        {
            Stats::add(&st.reads_from_mapping, 1);
            return ReadDone::Mapped(at);
        }
        pending.extend(read_op(q, miss, reader, pos, dst));
    }
    let r = finish_all(q, pending).await;
    if r != 0
        && spliced
        && let Some(Some(p)) = s.pipe.get()
    {
        // What the failed read left in the pipe would reach the next one.
        p.drain();
    }
    ReadDone::Buffer(match r {
        0 => buf.len() as i32,
        e => e,
    })
}

/// With zero copy, a READ of one small run (`request_buf::USER_COPY_MAX`)
/// that lies in a mapping: the tag's pipe holds the run's pages
/// (`vmsplice`), and a fixed-buffer read takes them into the request at
/// `at`, pushed and returned. The read finds its bytes in the pipe and
/// completes at once, on this thread. `None` when the file is not mapped or
/// the pipe is not to be had; user copy then does it.
fn pipe_read(
    q: &UblkQueue<'_>,
    pipe: &OnceCell<Option<Pipe>>,
    reader: &InlineFile,
    pos: u64,
    index: u16,
    at: usize,
    len: u32,
) -> Option<PendingOp> {
    reader.mapped(pos, len as usize)?;
    let pipe = pipe.get_or_init(|| Pipe::new().ok()).as_ref()?;
    if !reader.splice_to(pos, len as usize, pipe) {
        return None;
    }
    let sqe = ops::read_fixed_from_pipe(pipe.read_end(), index, at, len);
    Some(PendingOp::push(q, sqe, len))
}

/// Has ublk copy a WRITE's data straight into the overlay's pages at
/// overlay offset `pos`, when they are mapped and the data is still with
/// ublk: `Some` with the bytes placed (all of them) or a negative errno,
/// `None` when the data must be written from the buffer instead.
///
/// A copy that stopped part way (a page missing on a full tmpfs) fails the
/// request: kernels differ in what they do with the rest of a request
/// committed short (6.12 serves it again; 7.3 completes the whole request,
/// so the rest would be lost without an error).
async fn place(sh: &Shared, data: &mut WriteData<'_>, pos: u64) -> Option<i32> {
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
/// (7.3.4, randrw 4K QD32 over a sparse overlay, medians in one boot:
/// 24,889 IOPS against 21,385 through the ring, 4 rounds; 25,616 against
/// 23,828 in another, 6 rounds).
async fn data_write_op(
    q: &UblkQueue<'_>,
    sh: &Shared,
    data: &mut WriteData<'_>,
    pos: u64,
) -> Result<Option<PendingOp>, i32> {
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
pub async fn write(
    q: &UblkQueue<'_>,
    sh: &Shared,
    qb: &QueueBufs,
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
        WritePath::Direct => {
            if let Some(r) = place(sh, data, pos).await {
                return r;
            }
            let r = finish_write(q, data_write_op(q, sh, data, pos).await).await;
            return if r < 0 { r } else { len as i32 };
        }
        WritePath::Locked(blocks) => blocks,
    };
    let _guard = lock(q, sh, blocks.clone()).await;
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
            reads.extend(read_op(q, Miss::Ring(BASE_FD), &sh.base_io, off, dst));
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
    dev.map().allocate(p.mark);
    len as i32
}

/// DISCARD / WRITE_ZEROES of `[off, off+len)`.
pub async fn write_zeroes(
    q: &UblkQueue<'_>,
    sh: &Shared,
    qb: &QueueBufs,
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
            let _guard = lock(q, sh, first..end).await;
            dev.map().set_range(first..end, BlockState::Zero);
            let start = geo.block_start(first);
            let bytes = geo.block_end(end - 1) - start;
            let punch = opcode::Fallocate::new(OVERLAY_FD, bytes)
                .offset(dev.overlay().data_pos(start))
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build();
            // Space is only reclaimed: the map already says Zero, so a file
            // system without hole punching loses nothing.
            let _ = q.ublk_submit_sqe(punch).await;
            first = end;
        }
    }
    0
}

/// FLUSH: overlay data durable, then the changed map pages, then durable
/// again (see `CowDevice::flush`, the same order). One flush at a time.
pub async fn flush(q: &UblkQueue<'_>, sh: &Shared) -> i32 {
    while sh
        .flushing
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        let ts = types::Timespec::new().nsec(50_000);
        q.ublk_submit_sqe(opcode::Timeout::new(&ts).build()).await;
    }
    let dev = &sh.dev;
    Stats::add(&sh.stats.flushes, 1);
    let pages = dev.map().take_dirty_pages();
    let datasync = || {
        opcode::Fsync::new(OVERLAY_FD)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
    };
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

/// Largest piece of base data a cache request reads or copies at once.
const CACHE_PIECE: u64 = 1 << 20;

/// A cache request on the queue's ring (see `engine::cache`): fadvise steps
/// as io_uring `Fadvise` in pieces of `FADVISE_PIECE`, all in flight; reads and copies in pieces of at most 1 MiB.
pub async fn cache_range(
    q: &UblkQueue<'_>,
    sh: &Shared,
    off: u64,
    len: u64,
    mode: CacheMode,
) -> i32 {
    let dev = &sh.dev;
    let geo = *dev.geometry();
    let Ok(blocks) = cache_blocks(&geo, off, len) else {
        return -libc::EINVAL;
    };
    let mut steps = Vec::new();
    plan_cache(dev.map(), &geo, blocks, mode, &mut steps);
    let st = &sh.stats;
    for step in steps {
        let (fd, pos, counter) = match step.action {
            CacheAction::FadviseOverlay => (
                OVERLAY_FD,
                dev.overlay().data_pos(step.off),
                &st.fadvise_overlay_bytes,
            ),
            CacheAction::FadviseBase => (BASE_FD, step.off, &st.fadvise_base_bytes),
            CacheAction::ReadBase | CacheAction::CopyToOverlay => {
                let mut at = step.off;
                while at < step.off + step.len {
                    let n = CACHE_PIECE.min(step.off + step.len - at);
                    let buf = match read_base(q, sh, at, n).await {
                        Ok(b) => b,
                        Err(e) => return e,
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
        let advice: Vec<_> = fadvise_pieces(pos, step.len)
            .map(|(at, n)| {
                let sqe = opcode::Fadvise::new(fd, n as libc::off_t, libc::POSIX_FADV_WILLNEED)
                    .offset(at)
                    .build();
                q.ublk_submit_sqe(sqe)
            })
            .collect();
        // Advice only: its failure changes nothing.
        for f in advice {
            let _ = f.await;
        }
    }
    0
}

/// Installs the base data at device offset `off`, `len` bytes, as `install`
/// does, reading it from the base first: with zero copy a READ's data never
/// passes through the daemon's memory.
pub async fn install_from_base(q: &UblkQueue<'_>, sh: &Shared, off: u64, len: u64) -> i32 {
    match read_base(q, sh, off, len).await {
        Ok(data) => install(q, sh, off, &data).await,
        Err(e) => e,
    }
}

/// Reads `len` bytes of the base at `off` into a new buffer and waits.
async fn read_base(q: &UblkQueue<'_>, sh: &Shared, off: u64, len: u64) -> Result<Vec<u8>, i32> {
    let mut data = vec![0u8; len as usize];
    if let Some(op) = read_op(q, Miss::Ring(BASE_FD), &sh.base_io, off, &mut data) {
        let r = finish(q, op).await;
        if r < 0 {
            return Err(r);
        }
    }
    Ok(data)
}

/// Installs base data `data`, read at device offset `off`, into the overlay
/// for every block it fully covers that is still `Unallocated` — under the
/// blocks' locks, re-checking the state, so a copy never lands over a write
/// or discard that came after the read. Returns 0 or a negative errno.
pub async fn install(q: &UblkQueue<'_>, sh: &Shared, off: u64, data: &[u8]) -> i32 {
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
        let _guard = lock(q, sh, first..chunk_end).await;
        for run in dev.map().unallocated_runs(first..chunk_end) {
            let from = geo.block_start(run.start);
            let to = geo.block_end(run.end - 1);
            let src = &data[(from - off) as usize..(to - off) as usize];
            let r = overlay_write(q, sh, src, dev.overlay().data_pos(from)).await;
            if r < 0 {
                return r;
            }
            dev.map().set_range(run, BlockState::Allocated);
            Stats::add(&sh.stats.copied_to_overlay_bytes, to - from);
        }
        first = chunk_end;
    }
    0
}
