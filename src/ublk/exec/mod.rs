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
//! the overlay, /dev/zero, the base opened with O_DIRECT and the overlay
//! opened with O_DIRECT, and the overlay opened for FUA writes
//! (`RingFiles`).
//! With zero copy a
//! request's data is reached with fixed-buffer operations: a small READ of
//! mapped data from the tag's pipe (`read::pipe_read`), other runs from the
//! files; a small WRITE is taken with ublk's user copy (`request_buf`). The
//! only system calls made on the queue's thread itself are those of
//! `inline`, of the pipe and of user copy: reads of data already in memory
//! and writes to a file in memory, none of which starts a device I/O and
//! waits for it; and the syncs of a request alone on its queue
//! (`SyncsOn::Thread`), which do. A READ that lies in one run of a mapped file is not copied
//! here at all (`ReadData::Mapped`), nor is a WRITE whose overlay pages are
//! mapped and ready (`write::place`).

mod cache;
mod flush;
mod read;
mod remote;
mod write;

pub use cache::{cache_range, install, install_from_base};
pub use flush::{flush, flush_after_durable_write};
pub use read::{MayLeave, ReadData, ReadDone, read};
pub use remote::{fetch_below, fetch_edges, prefetch_below};
pub use write::{Fua, write_request, write_zeroes};

use crate::engine::Errno;
use crate::engine::base::DirectAlign;
use crate::engine::chain::Below;
use crate::engine::locks::RangeGuard;
use crate::engine::plan::ReadRun;
use crate::engine::write::LockWait;
use crate::stats::Stats;
use crate::sys::Pipe;
use crate::ublk::ServedDevice;
use crate::ublk::copier::{Copier, Finished, HELPER_MIN};
use crate::ublk::inline::{MemoryPath, Written};
use crate::ublk::ops::{FileWrite, Op, PendingOp, Ring, WriteSource, finish_all, write_here};
use io_uring::types;
use std::cell::OnceCell;
use std::ops::Range;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
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
    /// The overlay opened with O_DIRECT, for large first writes
    /// (`ServedDevice::direct_overlay`), else the overlay.
    pub(crate) overlay_direct: RawFd,
    /// The overlay opened once more, for FUA writes
    /// (`ServedDevice::dsync_overlay`), else the overlay.
    pub(crate) overlay_dsync: RawFd,
    /// The layers of a chain below the overlay, by depth (`layer_fd`).
    pub(crate) layers: Vec<RawFd>,
}

impl RingFiles {
    /// The ring's fixed files from `FIRST_FILE` to the end of its table,
    /// in order; the slots no layer uses are empty (-1), so that a live
    /// snapshot can fill one with a new layer's file later.
    pub(crate) fn table(&self) -> Vec<RawFd> {
        let mut fds = vec![
            self.base,
            self.overlay,
            self.zero,
            self.base_direct,
            self.overlay_direct,
            self.overlay_dsync,
        ];
        fds.extend(&self.layers);
        fds.resize(Self::table_len(), -1);
        fds
    }

    /// The length of `table`.
    pub(crate) fn table_len() -> usize {
        (RING_FILES_MAX - FIRST_FILE) as usize
    }
}

/// The most fixed files a queue's ring has: libublk's table (`UblkTgt::fds`).
const RING_FILES_MAX: u32 = 32;
/// The most layers a device serves below its overlay: one fixed file each,
/// after ublk's char device and the six of `RingFiles`.
pub const MAX_RING_LAYERS: usize = (RING_FILES_MAX - FIRST_FILE - LAYERS_AT) as usize;

/// The first layer's index among `RingFiles`, after the six files of the
/// device itself.
const LAYERS_AT: u32 = 6;

/// The fixed file of the layer at `depth` below the overlay.
pub(crate) fn layer_fd(depth: usize) -> types::Fixed {
    assert!(depth < MAX_RING_LAYERS, "layer depth {depth}");
    types::Fixed(FIRST_FILE + LAYERS_AT + depth as u32)
}

/// The fixed-file index of the first of `RingFiles`.
pub(crate) const FIRST_FILE: u32 = 1;
pub(crate) const BASE_FD: types::Fixed = types::Fixed(FIRST_FILE);
pub const OVERLAY_FD: types::Fixed = types::Fixed(FIRST_FILE + 1);
pub(crate) const ZERO_FD: types::Fixed = types::Fixed(FIRST_FILE + 2);
pub(crate) const BASE_DIRECT_FD: types::Fixed = types::Fixed(FIRST_FILE + 3);
pub const OVERLAY_DIRECT_FD: types::Fixed = types::Fixed(FIRST_FILE + 4);
pub const OVERLAY_DSYNC_FD: types::Fixed = types::Fixed(FIRST_FILE + 5);

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
    /// The queue's copy helper, if it has one: large READs are copied
    /// there (`read`, `queue::copy_read_out`).
    copier: Option<Rc<Copier>>,
    /// The tag's signal from the copy helper, made on first use; `None` in
    /// it if it could not be (the tag then copies on its own thread).
    copied: OnceCell<Option<Arc<Finished>>>,
    /// The plan of the tag's READ being served.
    runs: Vec<ReadRun>,
    /// The base bytes of a WRITE's fills (`write::RingWrite`).
    fill: Vec<u8>,
    /// The tag's pipe for small READs of mapped data with zero copy (see
    /// `pipe_read`), made on first use; `None` in it if it could not be.
    pipe: OnceCell<Option<Pipe>>,
    /// Where the READ being served left its data (`ReadData::Pieces`):
    /// `(address, length)` of each piece, in order.
    pieces: Vec<(usize, usize)>,
}

impl TagScratch {
    /// Scratch space of a tag whose queue has copy helper `copier`.
    pub fn with_copier(copier: Rc<Copier>) -> TagScratch {
        TagScratch {
            copier: Some(copier),
            ..TagScratch::default()
        }
    }

    /// For a READ of `len` bytes: the copy helper and the tag's signal from
    /// it, if the READ is large enough to hand over (`HELPER_MIN`), the
    /// helper has room for it (`Copier::has_room`), and both are to be had.
    pub(crate) fn helper_for(&self, len: u64) -> Option<(Rc<Copier>, Arc<Finished>)> {
        if len < HELPER_MIN {
            return None;
        }
        let copier = self.copier.clone().filter(|c| c.has_room())?;
        let done = self
            .copied
            .get_or_init(|| Finished::new().ok().map(Arc::new));
        Some((copier, done.clone()?))
    }

    /// The pieces of the last READ that returned `ReadData::Pieces`: they
    /// stay valid while the device it was served from does.
    pub fn pieces(&self) -> &[(usize, usize)] {
        &self.pieces
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

/// The pieces of device bytes `[off, off + len)` below the overlay, each
/// read from one place (`chain::Below`), as `(from, start, end)`: for a raw
/// base one piece.
fn below_pieces(sh: &ServedDevice, off: u64, len: u64) -> Vec<(Below, u64, u64)> {
    let dev = &sh.dev;
    let end = off + len;
    if dev.base().layers().is_empty() {
        return vec![(Below::Base, off, end)];
    }
    dev.geometry().pieces(off, end, |b| dev.base().below(b))
}

/// Reads `dst`, device bytes at `off` below the overlay (the base, or the
/// layers of a chain), as `read_op` does each piece; the ring reads are
/// pushed onto `pending`.
fn read_below<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    off: u64,
    dst: &mut [u8],
    pending: &mut Vec<PendingOp<R>>,
) {
    for (from, at, to) in below_pieces(sh, off, dst.len() as u64) {
        let d = &mut dst[(at - off) as usize..(to - off) as usize];
        match from {
            Below::Base => {
                pending.extend(read_op(q, RingRead::Cached(BASE_FD), &sh.base_io, at, d))
            }
            Below::Layer(k) => {
                let (io, pos) = (&sh.layer_io[k], sh.layer_pos(k, at));
                pending.extend(read_op(q, RingRead::Cached(layer_fd(k)), io, pos, d));
            }
            Below::Zero => d.fill(0),
        }
    }
}

/// Where a request's syncs run: chosen by the queue for each request.
/// A sync (a write with `RWF_DSYNC`, an `fdatasync`) on the ring goes to
/// an io_uring worker, since it blocks; on a fast disk the hand-off there
/// and back can cost more than the sync itself. A request that is the only
/// one its queue serves makes its syncs on the queue's thread instead,
/// which then waits for the disk: a request that arrives meanwhile waits
/// at most that long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncsOn {
    /// The queue's thread (`Ring::run_here`): the request is alone.
    Thread,
    /// The ring's workers.
    Ring,
}

/// Whether a write to the overlay is durable when it completes
/// (`RWF_DSYNC`), and where it runs then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dsync {
    /// Through the page cache, durable at the next flush.
    No,
    /// `RWF_DSYNC`, on the ring.
    Ring,
    /// `RWF_DSYNC`, on the queue's thread (`SyncsOn::Thread`).
    Here,
}

impl Dsync {
    /// Durable writes, on `syncs`' side.
    fn on(syncs: SyncsOn) -> Dsync {
        match syncs {
            SyncsOn::Thread => Dsync::Here,
            SyncsOn::Ring => Dsync::Ring,
        }
    }

    fn durable(self) -> bool {
        self != Dsync::No
    }
}

/// Writes `data` at overlay file offset `pos`: on the queue's thread when the
/// overlay lives in memory, else with `dsync` as it says (a ring write
/// pushed onto `pending`, or a durable write on this thread), with
/// `RWF_DSYNC` through `OVERLAY_DSYNC_FD`. Whether the write is durable
/// when it completes.
fn overlay_write_op<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    data: &[u8],
    pos: u64,
    dsync: Dsync,
    pending: &mut Vec<PendingOp<R>>,
) -> Result<bool, Errno> {
    if sh.overlay_io.write(pos, data)? == Written::Here {
        return Ok(false);
    }
    let w = FileWrite {
        fd: overlay_fd(dsync.durable()),
        from: WriteSource::Memory(data.as_ptr()),
        len: data.len() as u32,
        pos,
        dsync: dsync.durable(),
    };
    if dsync == Dsync::Here {
        Stats::add(&sh.stats.syncs_on_thread, 1);
        write_here(q, w, sh.overlay_dsync_fd())?;
        return Ok(true);
    }
    pending.push(w.push(q));
    Ok(dsync.durable())
}

/// The overlay's descriptor for a write through the page cache: with
/// `RWF_DSYNC` (`dsync`) an open file of its own (`ServedDevice::dsync_overlay`:
/// a writeback error its sync reports stays for the next flush to see).
fn overlay_fd(dsync: bool) -> types::Fixed {
    match dsync {
        true => OVERLAY_DSYNC_FD,
        false => OVERLAY_FD,
    }
}

/// Writes `data` at overlay file offset `pos` and waits.
async fn overlay_write<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    data: &[u8],
    pos: u64,
) -> Result<(), Errno> {
    let mut pending = Vec::new();
    let started = overlay_write_op(q, sh, data, pos, Dsync::No, &mut pending);
    let done = finish_all(q, pending).await;
    started.and(done)
}

/// How a queue's thread waits for a block lock another queue's thread (or
/// a request of this queue) holds: it must keep its ring turning meanwhile,
/// so the wait is a short io_uring timeout; each counts in `lock_waits`.
struct RingLockWait<'a, R: Ring> {
    q: &'a R,
    sh: &'a ServedDevice,
}

impl<R: Ring> LockWait for RingLockWait<'_, R> {
    async fn wait_for_lock(&mut self) {
        Stats::add(&self.sh.stats.lock_waits, 1);
        let ts = types::Timespec::new().nsec(20_000);
        self.q.push(Op::Timeout(&ts)).await;
    }
}

/// Waits until `blocks` are locked (see `RingLockWait`).
async fn lock<'a, R: Ring>(q: &R, sh: &'a ServedDevice, blocks: Range<u64>) -> RangeGuard<'a> {
    crate::engine::write::lock(&sh.dev, &mut RingLockWait { q, sh }, blocks).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ublk::copier::{Piece, Work};

    /// A READ is handed to the helper only from `HELPER_MIN` on, and only
    /// while the helper holds no other batch.
    #[test]
    fn a_read_goes_to_the_helper_only_when_large_and_the_helper_has_room() {
        let copier = Rc::new(Copier::new("helper-for-test".into()).unwrap());
        let s = TagScratch::with_copier(copier.clone());
        assert!(s.helper_for(HELPER_MIN - 1).is_none(), "a small READ");
        let (_, done) = s.helper_for(HELPER_MIN).expect("a large READ");
        // Long enough to copy that the helper cannot be done by the time
        // `start` returns.
        let src = vec![0x5au8; 64 << 20];
        let mut dst = vec![0u8; src.len()];
        let work = Work::Gather(vec![Piece {
            from: src.as_ptr(),
            to: dst.as_mut_ptr(),
            len: src.len(),
        }]);
        // SAFETY: `src` and `dst` outlive the drop below, which waits.
        let copying = unsafe { copier.start(work, &done) };
        let other = TagScratch::with_copier(copier.clone());
        assert!(
            other.helper_for(1 << 20).is_none(),
            "handed to a helper busy with another READ"
        );
        drop(copying);
        assert!(other.helper_for(1 << 20).is_some());
        assert!(dst == src);
    }
}
