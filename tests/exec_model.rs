//! Model-based test of the io_uring executor (`ublk::exec`), the one that
//! serves a device's requests, run here over a plain io_uring
//! (`PlainRing`) and real files: random sequences of read, write (some
//! with FUA), discard/write-zeroes, flush, cache requests, clean reopen,
//! daemon crash followed by recovery from the live map, power cut, an
//! overlay `fdatasync` that fails, and a live snapshot (the ring's files
//! swapped for a new overlay over the frozen one), against the byte-array reference of
//! `tests/common`. Writes of whole pages into fresh blocks take the direct
//! path (the overlay opened with O_DIRECT), whose writes the disk model
//! keeps like any other overlay write.
//!
//! The overlay is a file off tmpfs, so every write to it goes through the
//! ring; a `FaultRing` between the executor and the ring keeps what the
//! disk would hold: the file as of its last completed data sync, plus the
//! overlay writes since (a write with `RWF_DSYNC` is durable at once). A
//! power cut keeps a random subset of those; a writeback that fails (in a
//! data sync, or in the background) loses them, and the error is reported
//! as the kernel's `errseq_t` reports it: once to each open file of the
//! overlay (each of the ring's descriptors of it), at its next sync, a
//! `fdatasync` or a write with `RWF_DSYNC`. A daemon crash changes nothing
//! on the disk: the new executor takes the map the old one left in a shared
//! mapping (`MapSource::Live`), over the same pending and lost writes, with
//! descriptors that are told only of an error no open file was told of;
//! after a failed flush that live map is refused, and the overlay is as of
//! its last good flush.
//!
//! Each test thread keeps one ring for every device it serves (`RING`), as
//! a queue keeps one for its device's life: the ring's files are pointed
//! at each device and let go when it is dropped.

mod common;

use common::{Case, Reference, XorShift, cases, pattern};
use io_uring::types::Fixed;
use proptest::prelude::*;
use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use ublk_cow::engine::base::BaseIdentity;
use ublk_cow::engine::cache::{CacheMode, CachePolicy};
use ublk_cow::engine::chain::{self, Backed};
use ublk_cow::engine::device::{CowDevice, MapSource};
use ublk_cow::engine::map::{MapMemory, map_bytes};
use ublk_cow::engine::overlay::OpenCheck;
use ublk_cow::engine::storage::Storage;
use ublk_cow::sys::MappedFile;
use ublk_cow::ublk::ServedDevice;
use ublk_cow::ublk::copier::Copier;
use ublk_cow::ublk::exec::{
    self, Fua, MayLeave, OVERLAY_DIRECT_FD, OVERLAY_DSYNC_FD, OVERLAY_FD, ReadData, RingFiles,
    SyncsOn, TagScratch, ZeroBlocks,
};
use ublk_cow::ublk::ops::{Op as RingOp, Ring, WriteSource};
use ublk_cow::ublk::plain_ring::{PlainDone, PlainRing};
use ublk_cow::ublk::request_buf::{RequestBuf, UserCopyAt};
use ublk_cow::ublk::write_data::WriteData;

/// An operation of a case: one of the common ones, or one that only this
/// executor has.
#[derive(Clone, Debug)]
enum Step {
    Common(common::Op),
    /// A WRITE with FUA: durable when it completes; the writes before it
    /// need not be (a FUA write's flush syncs the overlay's data only when
    /// a map page it persists may name data not yet durable).
    FuaWrite {
        off: u64,
        len: u64,
        seed: u8,
        /// Its syncs on the calling thread (a request alone on its
        /// queue), else on the ring.
        here: bool,
    },
    /// The daemon dies; a new one recovers the device from the live map.
    Crash,
    /// The overlay's next `fdatasync` fails.
    FailSync,
    /// The kernel's writeback of the overlay's dirty pages fails in the
    /// background: their data never reaches the disk, and the error is
    /// reported once to each open file of the overlay, at its next sync.
    WritebackFails,
    /// A WRITE one of whose overlay writes fails.
    WriteFails {
        off: u64,
        len: u64,
        seed: u8,
    },
    /// A FLUSH whose first overlay write (a map page) fails.
    MapWriteFails,
    /// A live snapshot, as the daemon takes one: the overlay frozen in
    /// place, a new one made over it, and the same ring pointed at the new
    /// chain's files.
    LiveSnapshot,
}

#[derive(Clone, Debug)]
struct ExecCase {
    case: Case,
    steps: Vec<Step>,
    /// Frozen layers between the base and the overlay (0: a raw base),
    /// each written with a few writes and discards made from `layer_seed`.
    layers: usize,
    layer_seed: u64,
}

/// A range of whole 4 KiB pages (whole sectors on a device smaller than
/// one): what a WRITE must cover to take the direct path.
fn page_range(sectors: u64) -> BoxedStrategy<(u64, u64)> {
    let pages = sectors / 8;
    if pages == 0 {
        return common::range(sectors).boxed();
    }
    (0..pages)
        .prop_flat_map(move |p| {
            (
                Just(p * 4096),
                (1..=(pages - p).min(32)).prop_map(|n| n * 4096),
            )
        })
        .boxed()
}

fn step(sectors: u64) -> impl Strategy<Value = Step> {
    prop_oneof![
        12 => common::op(sectors).prop_map(Step::Common),
        2 => (page_range(sectors), any::<u8>())
            .prop_map(|((off, len), seed)| Step::Common(common::Op::Write { off, len, seed })),
        2 => (common::range(sectors), any::<u8>(), any::<bool>())
            .prop_map(|((off, len), seed, here)| Step::FuaWrite { off, len, seed, here }),
        1 => Just(Step::Crash),
        1 => Just(Step::FailSync),
        1 => Just(Step::WritebackFails),
        1 => (common::range(sectors), any::<u8>())
            .prop_map(|((off, len), seed)| Step::WriteFails { off, len, seed }),
        1 => Just(Step::MapWriteFails),
        1 => Just(Step::LiveSnapshot),
    ]
}

/// Small devices, and now and then one whose map spans several map pages
/// (more than 16,384 blocks of 4 KiB).
fn exec_case() -> impl Strategy<Value = ExecCase> {
    let small = prop_oneof![Just(4096u32), Just(8192), Just(65536)].prop_flat_map(|bs| {
        let per_block = bs as u64 / 512;
        (1..=per_block * 24).prop_map(move |sectors| (bs, sectors))
    });
    let large = (16_385u64..20_000).prop_map(|blocks| (4096u32, blocks * 8));
    let layers = prop_oneof![2 => Just(0usize), 1 => 1usize..=3];
    prop_oneof![300 => small, 1 => large].prop_flat_map(move |(bs, sectors)| {
        (
            proptest::collection::vec(step(sectors), 1..40),
            layers.clone(),
            any::<u64>(),
        )
            .prop_map(move |(steps, layers, layer_seed)| ExecCase {
                case: Case {
                    block_size: bs,
                    sectors,
                    ops: Vec::new(),
                },
                steps,
                layers,
                layer_seed,
            })
    })
}

/// What the disk under the overlay holds, as the `FaultRing` sees it.
#[derive(Default)]
struct Disk {
    /// The overlay file as of its last completed data sync.
    durable: Vec<u8>,
    /// Overlay writes since, in order: (position, bytes).
    pending: Vec<(u64, Vec<u8>)>,
    /// The next data sync fails.
    fail_next_sync: bool,
    /// The next overlay write fails, without writing.
    fail_next_write: bool,
    /// Overlay writes and syncs until the power goes (mid-flush cuts).
    power_left: Option<u32>,
    syncs_failed: u64,
    /// Writeback errors of the overlay file so far, as the kernel's
    /// `errseq_t` of its mapping keeps them, and whether an open file was
    /// told of the latest.
    wb_errors: u64,
    wb_error_seen: bool,
    /// The errors each of the ring's overlay descriptors was told of:
    /// a sync through it (`fdatasync`, or a write with `RWF_DSYNC`)
    /// reports one it was not.
    told: [u64; OVERLAY_FDS.len()],
}

/// The ring's descriptors of the overlay file, each an open file of its
/// own.
const OVERLAY_FDS: [Fixed; 3] = [OVERLAY_FD, OVERLAY_DIRECT_FD, OVERLAY_DSYNC_FD];

fn overlay_fd(fd: Fixed) -> Option<usize> {
    OVERLAY_FDS.iter().position(|f| f.0 == fd.0)
}

impl Disk {
    /// The disk as the file is now, all of it durable.
    fn durable_from(file: &File) -> Disk {
        let mut durable = vec![0u8; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut durable, 0).unwrap();
        Disk {
            durable,
            ..Disk::default()
        }
    }

    /// A data sync that covered the first `n` pending writes completed.
    fn synced(&mut self, n: usize) {
        for (pos, data) in self.pending.drain(..n) {
            apply(&mut self.durable, pos, &data);
        }
    }

    /// A write of `data` at `pos` that was durable when it completed: the
    /// older pending writes keep only their bytes outside its range.
    fn written_durable(&mut self, pos: u64, data: &[u8]) {
        apply(&mut self.durable, pos, data);
        let end = pos + data.len() as u64;
        let mut kept = Vec::new();
        for (p, d) in self.pending.drain(..) {
            let e = p + d.len() as u64;
            if e <= pos || end <= p {
                kept.push((p, d));
                continue;
            }
            if p < pos {
                kept.push((p, d[..(pos - p) as usize].to_vec()));
            }
            if end < e {
                kept.push((end, d[(end - p) as usize..].to_vec()));
            }
        }
        self.pending = kept;
    }

    /// Writeback of the pending writes failed: they never reach the disk.
    fn writeback_failed(&mut self) {
        self.pending.clear();
        self.wb_errors += 1;
        self.wb_error_seen = false;
    }

    /// A sync through descriptor `i` ends: whether it reports an error
    /// (one that descriptor was not told of yet).
    fn sync_reports_error(&mut self, i: usize) -> bool {
        if self.told[i] == self.wb_errors {
            return false;
        }
        self.told[i] = self.wb_errors;
        self.wb_error_seen = true;
        true
    }

    /// The ring's descriptors were opened again (a new daemon): as the
    /// kernel's `errseq_sample`, each is told of every error but the
    /// latest if no open file was told of that one yet.
    fn reopened(&mut self) {
        let unseen = self.wb_errors > 0 && !self.wb_error_seen;
        self.told = [self.wb_errors - unseen as u64; OVERLAY_FDS.len()];
    }

    /// What the file holds after a power cut that kept the pending writes
    /// `keep` chooses.
    fn after_power_cut(&self, mut keep: impl FnMut() -> bool) -> Vec<u8> {
        let mut image = self.durable.clone();
        for (pos, data) in &self.pending {
            if keep() {
                apply(&mut image, *pos, data);
            }
        }
        image
    }
}

fn apply(image: &mut Vec<u8>, pos: u64, data: &[u8]) {
    let end = pos as usize + data.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[pos as usize..end].copy_from_slice(data);
}

/// A `PlainRing` whose overlay writes and data syncs go through `Disk`
/// (the syncs only there). Writes through the overlay opened with O_DIRECT
/// are overlay writes like the others: durable at the next data sync.
struct FaultRing {
    ring: Rc<PlainRing>,
    disk: Rc<RefCell<Disk>>,
}

enum FaultDone {
    Ring(PlainDone),
    /// Done by the ring, and then ends with this result instead.
    RingThen(PlainDone, i32),
    /// Done without the ring.
    Now(i32),
}

impl std::future::Future for FaultDone {
    type Output = i32;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<i32> {
        match self.get_mut() {
            FaultDone::Ring(d) => std::pin::Pin::new(d).poll(cx),
            FaultDone::RingThen(d, r) => std::pin::Pin::new(d).poll(cx).map(|done| match done {
                n if n < 0 => n,
                _ => *r,
            }),
            FaultDone::Now(r) => std::task::Poll::Ready(*r),
        }
    }
}

/// What the disk model makes of an operation before the ring sees it.
enum Modeled {
    /// The ring carries it out.
    Run,
    /// The ring carries it out, and it then ends with this result instead.
    RunThen(i32),
    /// It ends now with this result, without the ring.
    Now(i32),
}

impl FaultRing {
    /// Keeps what `op` does to the disk (see `Disk`).
    fn model(&self, op: &RingOp<'_>) -> Modeled {
        let mut disk = self.disk.borrow_mut();
        let overlay = match *op {
            RingOp::Write(w) => {
                if w.fd.0 == OVERLAY_DIRECT_FD.0 {
                    count(|c| &c.direct_writes, 1);
                }
                overlay_fd(w.fd).is_some()
            }
            RingOp::Punch { fd, .. } | RingOp::DataSync { fd } => overlay_fd(fd).is_some(),
            _ => false,
        };
        if overlay && let Some(n) = disk.power_left {
            if n == 0 {
                // The power is gone: nothing more reaches the disk.
                return Modeled::Now(-libc::EIO);
            }
            disk.power_left = Some(n - 1);
        }
        if overlay && matches!(op, RingOp::Write(_)) && std::mem::take(&mut disk.fail_next_write) {
            return Modeled::Now(-libc::EIO);
        }
        match *op {
            RingOp::Write(w) if overlay => {
                let WriteSource::Memory(p) = w.from else {
                    panic!("a fixed buffer in copy mode");
                };
                // SAFETY: the rule of `Ring::push` and `Ring::run_here`: the
                // write's memory is valid until it completes, and it has not
                // been carried out.
                let data = unsafe { std::slice::from_raw_parts(p, w.len as usize) };
                if w.dsync {
                    // Durable when it completes (`RWF_DSYNC`): the sync
                    // writes back the range's pages as they are now, so no
                    // older write of the range can land over it later.
                    disk.written_durable(w.pos, data);
                    // Its sync reports an earlier writeback error of the
                    // file, once to this descriptor: the write then fails,
                    // its data written.
                    if disk.sync_reports_error(overlay_fd(w.fd).unwrap()) {
                        return Modeled::RunThen(-libc::EIO);
                    }
                } else {
                    disk.pending.push((w.pos, data.to_vec()));
                }
            }
            RingOp::Punch { fd, pos, len } if overlay => {
                assert_eq!(fd.0, OVERLAY_FD.0, "a punch through another descriptor");
                disk.pending.push((pos, vec![0u8; len as usize]));
            }
            RingOp::DataSync { fd } if overlay => {
                if std::mem::take(&mut disk.fail_next_sync) {
                    // The writes since the last sync never reach the disk;
                    // the kernel says so once to each open file.
                    disk.writeback_failed();
                    disk.syncs_failed += 1;
                } else {
                    // Every write pushed before it was completed (the
                    // executor awaits them first): the disk model makes
                    // them durable, and the file system's own sync would
                    // add nothing to it.
                    let n = disk.pending.len();
                    disk.synced(n);
                }
                return match disk.sync_reports_error(overlay_fd(fd).unwrap()) {
                    true => Modeled::Now(-libc::EIO),
                    false => Modeled::Now(0),
                };
            }
            _ => {}
        }
        Modeled::Run
    }
}

impl Ring for FaultRing {
    type Done = FaultDone;

    fn push(&self, op: RingOp<'_>) -> FaultDone {
        match self.model(&op) {
            Modeled::Run => FaultDone::Ring(self.ring.push(op)),
            Modeled::RunThen(r) => FaultDone::RingThen(self.ring.push(op), r),
            Modeled::Now(r) => FaultDone::Now(r),
        }
    }

    /// The same on the calling thread: the disk model cannot tell one from
    /// the other.
    fn run_here(&self, op: RingOp<'_>, fd: std::os::fd::RawFd) -> i32 {
        count(|c| &c.run_here, 1);
        match self.model(&op) {
            Modeled::Run => self.ring.run_here(op, fd),
            Modeled::RunThen(r) => match self.ring.run_here(op, fd) {
                n if n < 0 => n,
                _ => r,
            },
            Modeled::Now(r) => r,
        }
    }
}

thread_local! {
    /// The ring of this test thread, for every device it serves, as a
    /// queue keeps one ring for its device's life.
    static RING: RefCell<Option<Rc<PlainRing>>> = const { RefCell::new(None) };
}

/// This thread's ring, its files pointed at `files`.
fn thread_ring(files: &RingFiles) -> Rc<PlainRing> {
    RING.with_borrow_mut(|r| match r {
        Some(ring) => {
            ring.update_files(files).unwrap();
            ring.clone()
        }
        None => r
            .insert(Rc::new(PlainRing::new(files, 64).unwrap()))
            .clone(),
    })
}

impl Drop for Served {
    /// The ring lets go of the device's files, which it would otherwise
    /// keep open until the next device's replace them.
    fn drop(&mut self) {
        let r = self.ring.ring.release_files();
        if !std::thread::panicking() {
            r.expect("releasing the ring's files");
        }
    }
}

/// A device served by the io_uring executor over a `FaultRing`.
struct Served {
    ring: FaultRing,
    sh: ServedDevice,
    zeros: ZeroBlocks,
    scratch: TagScratch,
    _zero: File,
}

struct Model {
    dir: PathBuf,
    base_path: PathBuf,
    /// What the device is made over: the base, or the top layer of a chain.
    lower_path: PathBuf,
    overlay_path: PathBuf,
    map_path: PathBuf,
    id: BaseIdentity,
    block_size: u32,
    blocks: u64,
    disk: Rc<RefCell<Disk>>,
    served: Option<Served>,
    reference: Reference,
    /// Layers below the overlay now.
    layers: usize,
    /// Live snapshots taken.
    snapshots: usize,
    /// FLUSHes sent: every other one makes its syncs on the calling thread.
    flushes: u32,
}

fn unique_dir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "exec-model-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rw(path: &Path) -> File {
    File::options().read(true).write(true).open(path).unwrap()
}

/// Makes `n` frozen layers over the raw base at `base_path` in `dir`, each
/// written through the synchronous executor with a few writes and
/// discards from `seed`, applied to `image` as well; returns the top
/// layer's path (the base's with none).
fn make_layers(
    dir: &Path,
    base_path: &Path,
    bs: u32,
    n: usize,
    seed: u64,
    image: &mut [u8],
) -> PathBuf {
    let mut below = base_path.to_path_buf();
    let mut rng = seed | 1;
    let mut next = |max: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % max
    };
    let sectors = image.len() as u64 / 512;
    for i in 0..n {
        let path = dir.join(format!("layer{i}"));
        chain::create_overlay(&path, &below, Some(bs)).unwrap();
        let dev = chain::open_device(&path).unwrap();
        for _ in 0..1 + next(6) {
            let off = next(sectors) * 512;
            let len = (1 + next((sectors - off / 512).min(64))) * 512;
            let r = off as usize..(off + len) as usize;
            if next(4) == 0 {
                dev.write_zeroes(off, len).unwrap();
                image[r].fill(0);
            } else {
                let data = pattern(len as usize, next(256) as u8, off);
                dev.write(off, &data).unwrap();
                image[r].copy_from_slice(&data);
            }
        }
        dev.close().unwrap();
        chain::freeze(&path).unwrap();
        below = path;
    }
    below
}

impl Model {
    fn new(c: &ExecCase) -> Model {
        let (layers, layer_seed, c) = (c.layers, c.layer_seed, &c.case);
        let dir = unique_dir();
        let size = c.sectors * 512;
        let mut base_image = pattern(size as usize, 0xb5, 0);
        let base_path = dir.join("base");
        std::fs::write(&base_path, &base_image).unwrap();
        let lower_path = make_layers(
            &dir,
            &base_path,
            c.block_size,
            layers,
            layer_seed,
            &mut base_image,
        );
        let lower = chain::open_lower(&lower_path).unwrap();
        let id = lower.identity;
        // The chain reads as the writes made it (the synchronous reader).
        let mut through = vec![0u8; size as usize];
        lower.backed.read_at(&mut through, 0).unwrap();
        assert!(through == base_image, "the chain below reads wrong");
        // Made as `add` makes it, its backing recorded: a live snapshot
        // makes it a layer.
        let overlay_path = dir.join("overlay");
        chain::create_overlay(&overlay_path, &lower_path, Some(c.block_size)).unwrap();
        let blocks = size.div_ceil(c.block_size as u64);
        let map_path = dir.join("live.map");
        let check = OpenCheck {
            base: &id,
            block_size: None,
            force: false,
        };
        let dev = CowDevice::open(
            lower.backed,
            rw(&overlay_path),
            check,
            MapSource::Load(live_map(&map_path, blocks, true)),
        )
        .unwrap();
        let mut m = Model {
            dir,
            base_path,
            lower_path,
            overlay_path,
            map_path,
            id,
            block_size: c.block_size,
            blocks,
            disk: Rc::default(),
            served: None,
            reference: Reference::new(base_image),
            layers,
            snapshots: 0,
            flushes: 0,
        };
        m.serve(dev);
        m
    }

    /// Serves `dev` with a new executor; the disk holds the file as it is.
    fn serve(&mut self, dev: CowDevice<Backed, File>) {
        *self.disk.borrow_mut() = Disk::durable_from(&rw(&self.overlay_path));
        self.serve_on_disk(dev);
    }

    /// Serves `dev` with a new executor over the disk as the model has it.
    fn serve_on_disk(&mut self, dev: CowDevice<Backed, File>) {
        let mut sh = ServedDevice::new(dev, CachePolicy::default(), false, None).unwrap();
        assert!(
            sh.has_direct_overlay(),
            "{}: the overlay cannot be opened with O_DIRECT here, and the direct write path would go untested",
            self.overlay_path.display()
        );
        assert!(
            sh.prefetches(),
            "files on a disk's file system are prefetched"
        );
        // The cases' devices are small: page-sized writes go direct too.
        sh.set_direct_write_min(4096);
        let zero = File::open("/dev/zero").unwrap();
        let ring = thread_ring(&sh.ring_files(&zero));
        self.served = Some(Served {
            ring: FaultRing {
                ring,
                disk: self.disk.clone(),
            },
            zeros: ZeroBlocks::new(self.block_size),
            scratch: TagScratch::default(),
            sh,
            _zero: zero,
        });
    }

    /// Opens the overlay again, with the map it persisted (`Load`) and the
    /// disk as the file is now.
    fn reopen(&mut self) {
        self.served = None;
        let dev = self
            .open(false)
            .expect("reopen after a clean stop or a power cut");
        self.serve(dev);
    }

    /// The device over the overlay, with the map it persisted (`Load`) or
    /// the live map a dead daemon left (`Live`).
    fn open(&self, live: bool) -> Result<CowDevice<Backed, File>, ublk_cow::engine::Error> {
        let check = OpenCheck {
            base: &self.id,
            block_size: None,
            force: false,
        };
        let mem = live_map(&self.map_path, self.blocks, !live);
        let source = if live {
            MapSource::Live(mem)
        } else {
            MapSource::Load(mem)
        };
        let lower = chain::open_lower(&self.lower_path).unwrap().backed;
        CowDevice::open(lower, rw(&self.overlay_path), check, source)
    }

    /// The daemon dies. A new one serves the device again from the live map
    /// it left, over the disk as it was, pending writes and lost ones alike
    /// (with what the open wrote, durable: it syncs what it writes); unless
    /// a flush of the device had failed.
    fn crash(&mut self) -> Result<(), TestCaseError> {
        if self.s().sh.dev.failed() {
            return self.crash_after_failure();
        }
        self.served = None;
        let before = std::fs::read(&self.overlay_path).unwrap();
        let dev = self.open(true).expect("recovery after a crash");
        let after = std::fs::read(&self.overlay_path).unwrap();
        {
            let mut disk = self.disk.borrow_mut();
            if after.len() > before.len() {
                apply(
                    &mut disk.durable,
                    before.len() as u64,
                    &after[before.len()..],
                );
            }
            for (i, (a, b)) in after.iter().zip(&before).enumerate() {
                if a != b {
                    apply(&mut disk.durable, i as u64, &[*a]);
                }
            }
            disk.reopened();
        }
        self.serve_on_disk(dev);
        self.check_all()
    }

    /// A crash after a failed flush: the overlay marked failed, as the
    /// daemon's watcher marks it (a stop does the same), and its live map,
    /// which may name lost data, refused. `del` leaves the overlay as of its
    /// last good flush and the disk as it is: what a power cut leaves.
    fn crash_after_failure(&mut self) -> Result<(), TestCaseError> {
        prop_assert!(
            self.s().sh.dev.shut_down().is_err(),
            "a device whose flush failed shut down"
        );
        self.served = None;
        prop_assert!(
            self.open(true).is_err(),
            "the live map of a device whose flush failed was taken"
        );
        count(|c| &c.refused_recoveries, 1);
        self.power_cut(0x2545_f491, None)
    }

    /// A live snapshot (`daemon::snapshot::in_daemon`, without the gate:
    /// nothing else is in flight here). A device whose flush failed is not
    /// frozen, and serves on as it was.
    fn live_snapshot(&mut self) -> Result<(), TestCaseError> {
        if self.layers + 1 > exec::MAX_RING_LAYERS {
            return Ok(());
        }
        let s = self.s();
        if let Err(e) = s.sh.dev.freeze() {
            prop_assert!(s.sh.dev.failed(), "freeze failed: {}", e);
            return Ok(());
        }
        // The freeze flushed: everything written is durable.
        self.reference.flushed();
        let new = self.dir.join(format!("top{}", self.snapshots));
        let old = std::mem::replace(&mut self.overlay_path, new.clone());
        self.snapshots += 1;
        self.layers += 1;
        self.lower_path = old.clone();
        self.id = chain::open_lower(&old).unwrap().identity;
        // A new live map file; the old device keeps its mapping.
        std::fs::remove_file(&self.map_path).unwrap();
        let map = live_map(&self.map_path, self.blocks, true);
        let dev = chain::open_over_frozen(&old, &new, map).unwrap();
        let s = self.served.as_mut().unwrap();
        let sh = s.sh.swapped_to(dev).unwrap();
        s.ring.ring.update_files(&sh.ring_files(&s._zero)).unwrap();
        s.sh = sh;
        *self.disk.borrow_mut() = Disk::durable_from(&rw(&new));
        count(|c| &c.snapshots, 1);
        self.check_all()
    }

    fn s(&mut self) -> &mut Served {
        self.served.as_mut().unwrap()
    }

    fn read(&mut self, off: u64, len: u64) -> Vec<u8> {
        let s = self.s();
        let mut buf = vec![0u8; len as usize];
        let done = s.ring.ring.block_on(exec::read(
            &s.ring,
            &s.sh,
            &mut s.scratch,
            off,
            RequestBuf::Memory(&mut buf),
            MayLeave::Nothing,
        ));
        match done.map(|d| d.data) {
            Ok(ReadData::Buffer) => {}
            Ok(ReadData::Mapped(_) | ReadData::Pieces) => {
                panic!("a read left in a mapping it was not allowed")
            }
            Err(e) => panic!("read {off}+{len}: {e}"),
        }
        buf
    }

    /// A WRITE of `data` from page-aligned memory, as a queue's buffers
    /// are, so that the direct write path can take it.
    fn write(&mut self, off: u64, data: &[u8], fua: Fua) -> i32 {
        let mut buf = vec![0u8; data.len() + 4096];
        let at = buf.as_ptr().align_offset(4096);
        let aligned = &mut buf[at..at + data.len()];
        aligned.copy_from_slice(data);
        let s = self.s();
        let mut d = WriteData::bytes(aligned);
        let r = s.ring.ring.block_on(exec::write_request(
            &s.ring,
            &s.sh,
            &s.zeros,
            &mut s.scratch,
            off,
            &mut d,
            fua,
        ));
        r.map_or_else(|e| e.negative(), |()| data.len() as i32)
    }

    fn flush(&mut self) -> i32 {
        self.flushes += 1;
        let syncs = match self.flushes % 2 {
            0 => SyncsOn::Thread,
            _ => SyncsOn::Ring,
        };
        let s = self.s();
        let r = s.ring.ring.block_on(exec::flush(&s.ring, &s.sh, syncs));
        r.map_or_else(|e| e.negative(), |()| 0)
    }

    fn check_all(&mut self) -> Result<(), TestCaseError> {
        let len = self.reference.current.len() as u64;
        let got = self.read(0, len);
        prop_assert!(
            got == self.reference.current,
            "device differs from the reference"
        );
        Ok(())
    }

    /// A power cut; with `during_flush`, in the middle of a flush, after
    /// that many of its overlay writes and syncs.
    fn power_cut(&mut self, seed: u64, during_flush: Option<u8>) -> Result<(), TestCaseError> {
        if let Some(n) = during_flush {
            self.disk.borrow_mut().power_left = Some(n as u32);
            if self.flush() == 0 {
                self.reference.flushed();
            }
            self.disk.borrow_mut().power_left = None;
        }
        self.served = None;
        let mut rng = XorShift(seed);
        let image = self.disk.borrow().after_power_cut(|| rng.bit());
        let f = rw(&self.overlay_path);
        f.set_len(image.len() as u64).unwrap();
        f.write_all_at(&image, 0).unwrap();
        self.reopen();
        let len = self.reference.current.len() as u64;
        let got = self.read(0, len);
        self.reference.after_power_cut(got)
    }

    fn run(&mut self, step: &Step) -> Result<(), TestCaseError> {
        use common::Op;
        match step {
            &Step::Common(Op::Read { off, len }) => {
                let got = self.read(off, len);
                prop_assert!(
                    got == self.reference.current[off as usize..(off + len) as usize],
                    "read {}+{} differs",
                    off,
                    len
                );
            }
            &Step::Common(Op::Write { off, len, seed }) => {
                let data = pattern(len as usize, seed, off);
                prop_assert_eq!(self.write(off, &data, Fua::No), len as i32);
                self.reference.record(off, &data);
            }
            &Step::FuaWrite {
                off,
                len,
                seed,
                here,
            } => {
                let data = pattern(len as usize, seed, off);
                let map_only = |m: &mut Model| m.s().sh.stat("flushes_map_only").unwrap();
                let before = map_only(self);
                let syncs = match here {
                    true => SyncsOn::Thread,
                    false => SyncsOn::Ring,
                };
                let r = self.write(off, &data, Fua::Yes(syncs));
                count(|c| &c.map_only_flushes, map_only(self) - before);
                // A FUA write fails after a failed sync: its own (the
                // data's, which reports a writeback error of the file) or
                // its flush's. Each sector then reads old or new, and
                // nothing is promised durable.
                if r == len as i32 {
                    self.reference.record_durable(off, &data);
                } else {
                    prop_assert_eq!(r, -libc::EIO, "a FUA write failed otherwise");
                    let got = self.read(off, len);
                    self.reference.record_uncertain(off, &got, &data)?;
                }
            }
            &Step::Common(Op::Zero { off, len }) => {
                let s = self.s();
                let r = s.ring.ring.block_on(exec::write_zeroes(
                    &s.ring,
                    &s.sh,
                    &s.zeros,
                    &mut s.scratch,
                    off,
                    len,
                ));
                prop_assert_eq!(r, Ok(()));
                self.reference.record(off, &vec![0u8; len as usize]);
            }
            Step::Common(Op::Flush) => match self.flush() {
                0 => self.reference.flushed(),
                r => prop_assert_eq!(r, -libc::EIO, "a flush failed otherwise"),
            },
            &Step::Common(Op::Cache { off, len, mode }) => {
                let s = self.s();
                let before = s.sh.dev.map().counts();
                let r = s
                    .ring
                    .ring
                    .block_on(exec::cache_range(&s.ring, &s.sh, off, len, mode));
                prop_assert_eq!(r, 0);
                let after = s.sh.dev.map().counts();
                prop_assert!(
                    mode == CacheMode::Cow || before == after,
                    "{} cache changed the map",
                    mode
                );
                // A copy is marked copied, never written.
                prop_assert_eq!(
                    after.copied - before.copied,
                    before.unallocated - after.unallocated,
                    "a copy was not marked copied"
                );
            }
            Step::Common(Op::Reopen) => {
                // A clean stop: the final flush, then the overlay marked
                // clean. After a failed sync it fails, and the stop is as
                // good as a power cut.
                if self.s().sh.dev.shut_down().is_ok() {
                    self.reference.flushed();
                    self.reopen();
                    self.check_all()?;
                } else {
                    self.power_cut(0x9e37_79b9, None)?;
                }
            }
            &Step::Common(Op::PowerCut {
                keep_seed,
                cut_flush_after,
            }) => self.power_cut(keep_seed, cut_flush_after)?,
            Step::Crash => self.crash()?,
            Step::FailSync => self.disk.borrow_mut().fail_next_sync = true,
            Step::WritebackFails => {
                self.disk.borrow_mut().writeback_failed();
                count(|c| &c.writeback_errors, 1);
            }
            Step::Common(Op::SyncFails) => {
                self.disk.borrow_mut().fail_next_sync = true;
                prop_assert_eq!(self.flush(), -libc::EIO, "a flush whose sync failed");
            }
            &Step::WriteFails { off, len, seed } => {
                let data = pattern(len as usize, seed, off);
                self.disk.borrow_mut().fail_next_write = true;
                let r = self.write(off, &data, Fua::No);
                self.disk.borrow_mut().fail_next_write = false;
                prop_assert_eq!(r, -libc::EIO, "a WRITE whose overlay write failed");
                // Each sector holds its old or its new contents: never
                // what a block marked written without its data would read.
                let got = self.read(off, len);
                self.reference.record_uncertain(off, &got, &data)?;
            }
            Step::LiveSnapshot => self.live_snapshot()?,
            Step::MapWriteFails => {
                self.disk.borrow_mut().fail_next_write = true;
                let r = self.flush();
                self.disk.borrow_mut().fail_next_write = false;
                match r {
                    0 => self.reference.flushed(),
                    r => prop_assert_eq!(r, -libc::EIO, "a flush failed otherwise"),
                }
            }
        }
        Ok(())
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        self.served = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The live map of a device: a file mapped shared, as the daemon keeps it
/// under its run directory. `fresh` starts it empty.
fn live_map(path: &Path, blocks: u64, fresh: bool) -> MapMemory {
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(fresh)
        .open(path)
        .unwrap();
    let len = map_bytes(blocks);
    f.set_len(len).unwrap();
    MapMemory::Mapped(MappedFile::map(&f, len as usize).unwrap())
}

/// What the cases of one test thread reached: the summary line prints it,
/// and the test fails if a kind of case never came up. Per thread, since
/// the two halves of the cases run at once.
#[derive(Default)]
struct Counts {
    cases: Cell<u64>,
    steps: Cell<u64>,
    failed_syncs: Cell<u64>,
    large: Cell<u64>,
    chains: Cell<u64>,
    snapshots: Cell<u64>,
    direct_writes: Cell<u64>,
    /// FUA writes whose flush did not sync the overlay's data.
    map_only_flushes: Cell<u64>,
    /// Writes and syncs carried out on the calling thread.
    run_here: Cell<u64>,
    /// Writebacks that failed in the background.
    writeback_errors: Cell<u64>,
    /// Crashes of a device whose flush had failed: its live map refused.
    refused_recoveries: Cell<u64>,
}

thread_local! {
    static COUNTS: Counts = Counts::default();
}

/// Adds `n` to the counter `which` picks out of this thread's counts.
fn count(which: fn(&Counts) -> &Cell<u64>, n: u64) {
    COUNTS.with(|c| {
        let x = which(c);
        x.set(x.get() + n);
    });
}

fn run_case(c: ExecCase) -> Result<(), TestCaseError> {
    let mut m = Model::new(&c);
    for s in &c.steps {
        m.run(s)?;
    }
    m.check_all()?;
    let base = std::fs::read(&m.base_path).unwrap();
    prop_assert!(
        base == pattern(base.len(), 0xb5, 0),
        "the base was modified"
    );
    count(|c| &c.cases, 1);
    if c.layers > 0 {
        count(|c| &c.chains, 1);
    }
    count(|c| &c.steps, c.steps.len() as u64);
    count(|c| &c.failed_syncs, m.disk.borrow().syncs_failed);
    if m.blocks > 16_384 {
        count(|c| &c.large, 1);
    }
    Ok(())
}

/// Runs `want` cases on this thread and checks that they reached every
/// kind of case.
fn run_model(name: &str, want: u32) {
    let cfg = ProptestConfig {
        cases: want,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(cfg, |(c in exec_case())| run_case(c)?);
    let kicks = RING.with_borrow(|r| r.as_ref().map_or(0, |r| r.kicks()));
    COUNTS.with(|c| {
        let n = c.cases.get();
        println!(
            "{name}: {n} cases ({} with maps of several pages, {} over chains of layers), {} operations, {} live snapshots, {} failed syncs, {} failed writebacks, {} recoveries refused after a failed flush, {} direct writes, {} FUA flushes without a data sync, {} writes and syncs on the calling thread, {kicks} io-wq kicks, 0 divergences",
            c.large.get(),
            c.chains.get(),
            c.steps.get(),
            c.snapshots.get(),
            c.failed_syncs.get(),
            c.writeback_errors.get(),
            c.refused_recoveries.get(),
            c.direct_writes.get(),
            c.map_only_flushes.get(),
            c.run_here.get(),
        );
        assert!(n >= want as u64, "only {n} model cases ran");
        assert!(
            c.large.get() > 0
                && c.failed_syncs.get() > 0
                && c.writeback_errors.get() > 0
                && c.refused_recoveries.get() > 0
                && c.chains.get() > 0
                && c.snapshots.get() > 0
                && c.direct_writes.get() > 0
                && c.map_only_flushes.get() > 0
                && c.run_here.get() > 0,
            "the cases did not reach maps of several pages, failed syncs and writebacks, recoveries refused after a failed flush, chains, live snapshots, direct writes, FUA flushes without a data sync and syncs on the calling thread"
        );
    });
}

/// Half of the cases (10,000 in all, `MODEL_CASES` to change); the other
/// half runs at the same time in
/// [`io_uring_executor_matches_reference_model_second_half`].
#[test]
fn io_uring_executor_matches_reference_model() {
    run_model("exec model, first half", cases(10_000).div_ceil(2));
}

#[test]
fn io_uring_executor_matches_reference_model_second_half() {
    run_model("exec model, second half", cases(10_000).div_ceil(2));
}

/// A writeback error that a FUA write's own sync takes (through its
/// descriptor of the overlay) must still fail the device: else a daemon
/// that dies before the next FLUSH leaves a new one whose descriptors
/// never see the error, and its FLUSH succeeds over the lost write.
#[test]
fn a_writeback_error_a_fua_write_takes_fails_the_device() {
    use common::Op;
    // With its syncs on the ring's workers and on the calling thread.
    for here in [false, true] {
        let steps = vec![
            Step::Common(Op::Write {
                off: 0,
                len: 512,
                seed: 1,
            }),
            Step::WritebackFails,
            Step::FuaWrite {
                off: 8192,
                len: 512,
                seed: 2,
                here,
            },
            Step::Crash,
            Step::Common(Op::Flush),
            Step::Common(Op::PowerCut {
                keep_seed: 0,
                cut_flush_after: None,
            }),
        ];
        let c = ExecCase {
            case: Case {
                block_size: 4096,
                sectors: 24,
                ops: Vec::new(),
            },
            steps,
            layers: 0,
            layer_seed: 0,
        };
        if let Err(e) = run_case(c) {
            panic!("syncs here {here}: {e}");
        }
    }
}

/// READs of many runs whose files are all in memory (base, a layer and the
/// overlay in tmpfs, so mapped): half the blocks, at random, written
/// first, then reads of 4 KiB to 1 MiB, aligned and not, each checked
/// against the bytes written: every run copied from its file's mapping into
/// the request's buffer at its offset. Each READ is served again as user
/// copy serves it: the runs left in their mappings, the pieces then written
/// in one `pwritev` to a file that stands in for the char device.
#[test]
fn reads_spanning_many_runs_of_mapped_files() {
    let shm = Path::new("/dev/shm");
    assert!(
        shm.is_dir(),
        "/dev/shm is missing: the tmpfs case cannot run"
    );
    let dir = shm.join(format!("ublk-cow-exec-reads-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let size = 4u64 << 20;
    let bs = 4096u32;
    let mut image = pattern(size as usize, 0xb5, 0);
    let base_path = dir.join("base");
    std::fs::write(&base_path, &image).unwrap();
    let lower_path = make_layers(&dir, &base_path, bs, 1, 7, &mut image);
    let lower = chain::open_lower(&lower_path).unwrap();
    let id = lower.identity;
    let overlay = File::create_new(dir.join("overlay")).unwrap();
    let blocks = size / bs as u64;
    let map = live_map(&dir.join("live.map"), blocks, true);
    let dev = CowDevice::create(lower.backed, &id, overlay, bs, map).unwrap();
    let sh = ServedDevice::new(dev, CachePolicy::default(), false, None).unwrap();
    // Every page of these files is in memory: prefetch has nothing to do.
    assert!(!sh.prefetches());
    let zero = File::open("/dev/zero").unwrap();
    let ring = PlainRing::new(&sh.ring_files(&zero), 64).unwrap();
    let zeros = ZeroBlocks::new(bs);
    let mut scratch = TagScratch::default();
    let copier = Copier::new("exec-model-copier".into()).unwrap();
    let mut helped = TagScratch::with_copier(Rc::new(copier));
    let mut x = 25u64;
    let mut below = |max: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % max
    };
    for b in 0..blocks {
        if below(2) == 0 {
            let off = b * bs as u64;
            let data = pattern(bs as usize, below(256) as u8, off);
            let mut d = WriteData::bytes(&data);
            ring.block_on(exec::write_request(
                &ring,
                &sh,
                &zeros,
                &mut scratch,
                off,
                &mut d,
                Fua::No,
            ))
            .unwrap();
            image[off as usize..][..data.len()].copy_from_slice(&data);
        }
    }
    let char_dev = File::create_new(dir.join("char-device")).unwrap();
    let (mut reads, mut left_in_mappings) = (0, 0);
    for len in [4096u64, 65536, 262144, 1 << 20, 100 * 1024 + 512] {
        for _ in 0..8 {
            let off = below((size - len) / 512) * 512;
            let mut buf = vec![0u8; len as usize];
            let mut read = |buf: &mut Vec<u8>, leave| {
                let done = ring.block_on(exec::read(
                    &ring,
                    &sh,
                    &mut scratch,
                    off,
                    RequestBuf::Memory(buf),
                    leave,
                ));
                done.map(|d| d.data)
            };
            let done = read(&mut buf, MayLeave::Nothing);
            assert!(matches!(done, Ok(ReadData::Buffer)), "read {off}+{len}");
            assert!(
                buf == image[off as usize..][..len as usize],
                "read {off}+{len} differs"
            );
            // As copy mode with a copy helper: the runs in mappings of a
            // large READ are copied into the buffer by its thread.
            buf.fill(0xdd);
            let done = ring.block_on(exec::read(
                &ring,
                &sh,
                &mut helped,
                off,
                RequestBuf::Memory(&mut buf),
                MayLeave::Nothing,
            ));
            assert!(
                matches!(done.map(|d| d.data), Ok(ReadData::Buffer)),
                "read {off}+{len} with the copy helper"
            );
            assert!(
                buf == image[off as usize..][..len as usize],
                "read {off}+{len} differs with the copy helper"
            );
            // As user copy: what is not in a mapping is read into the
            // buffer (filled with other bytes first), and the pieces hold
            // the whole READ in order.
            buf.fill(0xee);
            let done = read(&mut buf, MayLeave::Runs);
            assert!(
                matches!(done, Ok(ReadData::Pieces)),
                "read {off}+{len} as pieces"
            );
            let in_buf = |&(at, n): &(usize, usize)| {
                let b = buf.as_ptr() as usize;
                at >= b && at + n <= b + buf.len()
            };
            left_in_mappings += scratch.pieces().iter().filter(|p| !in_buf(p)).count();
            let at = 4096 * (reads as u64 + 1);
            UserCopyAt::in_file(char_dev.as_raw_fd(), at)
                .write_pieces(scratch.pieces())
                .unwrap();
            let mut sent = vec![0u8; len as usize];
            char_dev.read_exact_at(&mut sent, at).unwrap();
            assert!(
                sent == image[off as usize..][..len as usize],
                "read {off}+{len} differs as pieces"
            );
            reads += 1;
        }
    }
    assert_eq!(reads, 40);
    assert!(
        left_in_mappings >= 40,
        "only {left_in_mappings} pieces were left in mappings"
    );
    // Every READ of 256 KiB or more (16 of the 40) spans runs in mappings.
    let helped = sh.stat("reads_copied_by_helper").unwrap();
    assert_eq!(helped, 16, "READs copied by the helper");
    drop((sh, ring));
    std::fs::remove_dir_all(&dir).unwrap();
}
