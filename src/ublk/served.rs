//! The device as the queues serve it: the engine's device, its cache
//! policy, the counters, and what the queues' threads need to reach the
//! base and the overlay without the ring (mappings, the direct base). The
//! daemon makes one per device and hands it to the queues and to the
//! control socket.

use crate::engine::base::{DirectAlign, DirectBase};
use crate::engine::cache::{CachePolicy, FADVISE_PIECE};
use crate::engine::chain::Backed;
use crate::engine::device::CowDevice;
use crate::engine::readahead::Readahead;
use crate::stats::Stats;
use crate::ublk::exec::{MAX_RING_LAYERS, RingFiles};
use crate::ublk::inline::MemoryPath;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

/// The engine's device: the overlay file over a raw base or a chain of
/// layers.
pub(crate) type Device = CowDevice<Backed, File>;
/// A turn at flushing `Device` (see `CowDevice::try_flush_turn`).
pub(crate) type DeviceFlushTurn<'a> = crate::engine::device::FlushTurn<'a, Backed, File>;

/// What every queue shares: the device (with its flush turn), its cache
/// policy and the counters.
pub struct ServedDevice {
    pub dev: Device,
    pub(crate) policy: CachePolicy,
    /// Kept across a live snapshot's swap of the device.
    pub(crate) stats: Arc<Stats>,
    /// I/O of the base and the overlay that can be served on the queue's
    /// thread (see `inline`).
    pub(crate) base_io: MemoryPath,
    pub(crate) overlay_io: MemoryPath,
    /// The same for each layer of a chain below the overlay, by depth.
    pub(crate) layer_io: Vec<MemoryPath>,
    /// The overlay's pages of every `Unallocated` block exist, initialized,
    /// in its mapping: it was preallocated and populated when the device
    /// was added (see `plan::overlay_pages_ready`).
    pub(crate) unallocated_ready: bool,
    /// The base opened with O_DIRECT, for READs of base blocks that the
    /// page cache does not hold (`--base-io direct`).
    pub(crate) direct: Option<DirectBase>,
    /// The overlay opened with O_DIRECT, for the data of large first
    /// writes; `None` for an overlay in memory or on a file system
    /// without O_DIRECT.
    pub(crate) direct_overlay: Option<DirectOverlay>,
    /// The overlay opened once more, for the `RWF_DSYNC` writes of FUA
    /// WRITEs: an open file of its own, because the kernel reports a
    /// writeback error once to each open file, so an error that one of
    /// these writes' syncs takes is still reported to the next flush's sync
    /// of the overlay's own descriptor. `None` for an overlay in memory
    /// (nothing to make durable) or where it could not be opened.
    pub(crate) dsync_overlay: Option<File>,
    /// How much of each file one `fadvise(WILLNEED)` asks for.
    pub(crate) advice: AdvicePieces,
}

/// The largest `fadvise(WILLNEED)` piece of each file a device reads, in
/// bytes: what the block device holding the file reads ahead in one call
/// (`sys::willneed_limit`), at most [`ADVICE_PIECE_MAX`];
/// [`FADVISE_PIECE`] where the device says nothing. Larger pieces become
/// larger reads of the device: the kernel cuts one call's range into I/Os
/// of the device's largest size, where pieces from separate calls (each on
/// an io_uring worker of its own) reach the device one by one.
pub(crate) struct AdvicePieces {
    pub(crate) base: u64,
    pub(crate) overlay: u64,
    /// By depth below the overlay.
    pub(crate) layers: Vec<u64>,
}

/// The largest advice piece: the largest prefetch window
/// (`readahead::AUTO_MAX`).
pub(crate) const ADVICE_PIECE_MAX: u64 = crate::engine::readahead::AUTO_MAX;

impl AdvicePieces {
    /// The piece of `file`.
    pub(crate) fn of(file: &File) -> u64 {
        crate::sys::willneed_limit(file).map_or(FADVISE_PIECE, |n| {
            n.clamp(crate::sys::page_size(), ADVICE_PIECE_MAX)
        })
    }
}

/// The overlay opened once more with O_DIRECT. A WRITE's data of at least
/// `min` bytes into blocks that were never written (`write::data_write_op`)
/// goes through it: on ext4 and xfs a write through the page cache into a
/// hole costs a copy into new pages and their writeback, and a direct write
/// neither (docs/benchmarks.md).
pub(crate) struct DirectOverlay {
    file: File,
    align: DirectAlign,
    /// The smallest WRITE written so; [`DIRECT_WRITE_MIN`] unless a test
    /// set it (`ServedDevice::set_direct_write_min`).
    min: u64,
}

/// The smallest WRITE whose data goes to fresh overlay blocks with
/// O_DIRECT. Smaller ones are left to the page cache, which gathers them
/// into the writeback of a flush, where a direct write into a hole would
/// allocate each one by itself.
pub const DIRECT_WRITE_MIN: u64 = 128 << 10;

impl DirectOverlay {
    /// Opens `overlay` once more with O_DIRECT (through /proc/self/fd, so
    /// it is the same file whatever its path became); `None` where that
    /// would not pay or cannot be done.
    fn open(overlay: &File) -> Option<DirectOverlay> {
        let file = open_again(overlay, libc::O_DIRECT, "overlay without direct writes")?;
        let (mem, io) = crate::sys::direct_io_align(&file).ok().flatten()?;
        if mem == 0 || io == 0 {
            return None;
        }
        Some(DirectOverlay {
            file,
            align: DirectAlign { mem, io },
            min: DIRECT_WRITE_MIN,
        })
    }

    /// Whether the data of a WRITE of `len` bytes at overlay offset `pos`,
    /// in memory at `addr` (`None`: a request's own pages), can be written
    /// with O_DIRECT: large enough, and whole pages, so that no write
    /// through the page cache (a fill of the same WRITE) shares a page
    /// with it, and aligned as the file system asks.
    pub(crate) fn fits(&self, pos: u64, len: u64, addr: Option<usize>) -> bool {
        let page = crate::sys::page_size();
        len >= self.min
            && pos.is_multiple_of(page)
            && len.is_multiple_of(page)
            && self.align.fits(pos, len, addr)
    }
}

/// `overlay` opened once more for reading and writing, with `flags` (through
/// /proc/self/fd, so it is the same file whatever its path became), for
/// `DirectOverlay` and `ServedDevice::dsync_overlay`; `None` for a file in
/// memory, which neither pays for, or when it cannot be opened (logged
/// after `what`).
fn open_again(overlay: &File, flags: i32, what: &str) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if crate::sys::is_tmpfs(overlay) {
        return None;
    }
    let path = format!("/proc/self/fd/{}", overlay.as_raw_fd());
    File::options()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| log::info!("{what}: {e}"))
        .ok()
}

impl ServedDevice {
    /// The queues' view of `dev`. `preallocated`: the overlay's data area
    /// was just allocated in full (`add --preallocate`); if it lives in
    /// memory its pages are then made ready for WRITE data (`populate`).
    pub fn new(
        dev: Device,
        policy: CachePolicy,
        preallocated: bool,
        direct: Option<DirectBase>,
    ) -> std::io::Result<ServedDevice> {
        let size = dev.geometry().size();
        let layers = dev.base().layers();
        if layers.len() > MAX_RING_LAYERS {
            return Err(std::io::Error::other(format!(
                "a device serves at most {MAX_RING_LAYERS} layers below its overlay, this chain has {}",
                layers.len()
            )));
        }
        let raw = dev.base().raw().ok_or_else(|| {
            std::io::Error::other("the chain's deepest layer records no base (format version 1)")
        })?;
        let base_io = MemoryPath::new(raw, size)?;
        let layer_io = layers
            .iter()
            .map(|l| {
                let o = &l.overlay;
                MemoryPath::new(o.storage(), o.data_pos(size))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let overlay = dev.overlay();
        let overlay_io = MemoryPath::new_overlay(overlay.storage(), overlay.data_pos(size))?;
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
        let direct_overlay = DirectOverlay::open(overlay.storage());
        let dsync_overlay = open_again(
            overlay.storage(),
            0,
            "FUA writes without a descriptor of their own",
        );
        let advice = AdvicePieces {
            base: AdvicePieces::of(raw),
            overlay: AdvicePieces::of(overlay.storage()),
            layers: layers
                .iter()
                .map(|l| AdvicePieces::of(l.overlay.storage()))
                .collect(),
        };
        Ok(ServedDevice {
            dev,
            policy,
            stats: Arc::default(),
            base_io,
            overlay_io,
            layer_io,
            unallocated_ready,
            direct,
            direct_overlay,
            dsync_overlay,
            advice,
        })
    }

    /// Writes of at least `min` bytes into fresh overlay blocks go through
    /// the overlay opened with O_DIRECT, where it has one: for tests, whose
    /// devices are small (the default is [`DIRECT_WRITE_MIN`]).
    pub fn set_direct_write_min(&mut self, min: u64) {
        if let Some(d) = &mut self.direct_overlay {
            d.min = min;
        }
    }

    /// Whether the overlay has a descriptor opened with O_DIRECT.
    pub fn has_direct_overlay(&self) -> bool {
        self.direct_overlay.is_some()
    }

    /// The prefetch window of the device's queues: the policy's, unless
    /// every file the device reads (base, layers, overlay) lives in memory
    /// (`CachePolicy::readahead_for`).
    pub(crate) fn readahead(&self) -> Readahead {
        let in_memory = self.dev.base().remote().is_none()
            && self.base_io.in_memory()
            && self.layer_io.iter().all(MemoryPath::in_memory)
            && self.overlay_io.in_memory();
        self.policy.readahead_for(in_memory)
    }

    /// The device's counter `name` (as `stats` shows it), if there is one.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let rows = self.stats.snapshot().rows();
        rows.into_iter().find(|&(n, _)| n == name).map(|(_, v)| v)
    }

    /// Whether the device's queues prefetch at all.
    pub fn prefetches(&self) -> bool {
        self.readahead() != Readahead::Off
    }

    /// The queues' view of `dev`, the device a live snapshot of this one
    /// serves from then on: the same policy, counters and direct base.
    pub fn swapped_to(&self, dev: Device) -> std::io::Result<ServedDevice> {
        let direct = match &self.direct {
            Some(d) => Some(DirectBase {
                file: d.file.try_clone()?,
                align: d.align,
            }),
            None => None,
        };
        let mut new = ServedDevice {
            stats: self.stats.clone(),
            ..ServedDevice::new(dev, self.policy, false, direct)?
        };
        if let Some(d) = &self.direct_overlay {
            new.set_direct_write_min(d.min);
        }
        Ok(new)
    }

    /// For a remote base: has its fetcher keep every unit it fetches in the
    /// overlay, as `Copied` blocks (only into blocks still `Unallocated`),
    /// before the unit leaves its flight (`Fetcher::set_sink`). So a
    /// request of a unit joins its fetch until the unit is in the overlay,
    /// and finds it there after: no unit is fetched twice, and a READ or
    /// a prefetch has nothing to install itself.
    pub fn keep_fetched_units(sh: &Arc<ServedDevice>) {
        let Some(remote) = sh.dev.base().remote() else {
            return;
        };
        let Some(fetcher) = remote.fetcher() else {
            return;
        };
        let unit_bytes = remote.params().fetch_size;
        let weak = Arc::downgrade(sh);
        fetcher.set_sink(Arc::new(move |unit, bytes| {
            let Some(sh) = weak.upgrade() else {
                return Err("the device is gone".into());
            };
            let geo = sh.dev.geometry();
            let first = geo.block_of(unit * unit_bytes);
            let blocks = sh
                .dev
                .install_copy(first, bytes)
                .map_err(|e| e.to_string())?;
            let bytes = (blocks * geo.block_size() as u64).min(bytes.len() as u64);
            Stats::add(&sh.stats.copied_to_overlay_bytes, bytes);
            Ok(())
        }));
    }

    /// The files of a ring that serves this device; `zero` is /dev/zero,
    /// open as long as the ring.
    pub fn ring_files(&self, zero: &File) -> RingFiles {
        let below = self.dev.base();
        let base = below.raw().expect("checked in new").as_raw_fd();
        let overlay = self.dev.overlay().storage().as_raw_fd();
        RingFiles {
            base,
            overlay,
            zero: zero.as_raw_fd(),
            base_direct: self.direct_base().map_or(base, |f| f.as_raw_fd()),
            overlay_direct: self
                .direct_overlay
                .as_ref()
                .map_or(overlay, |d| d.file.as_raw_fd()),
            overlay_dsync: self.overlay_dsync_fd(),
            layers: below
                .layers()
                .iter()
                .map(|l| l.overlay.storage().as_raw_fd())
                .collect(),
        }
    }

    /// The overlay's descriptor for FUA writes: `dsync_overlay`'s, else the
    /// overlay's own (the ring's `OVERLAY_DSYNC_FD`).
    pub(crate) fn overlay_dsync_fd(&self) -> RawFd {
        match &self.dsync_overlay {
            Some(f) => f.as_raw_fd(),
            None => self.dev.overlay().storage().as_raw_fd(),
        }
    }

    /// Where device offset `off` lies in the file of the layer at `depth`.
    pub(crate) fn layer_pos(&self, depth: usize, off: u64) -> u64 {
        self.dev.base().layers()[depth].overlay.data_pos(off)
    }

    /// The base's descriptor for direct reads, if there is one.
    pub(crate) fn direct_base(&self) -> Option<&File> {
        self.direct.as_ref().map(|d| &d.file)
    }

    /// How READs reach base blocks the page cache lacks: `Some` with the
    /// alignment direct reads need, `None` through the page cache.
    pub(crate) fn direct_align(&self) -> Option<DirectAlign> {
        self.direct.as_ref().map(|d| d.align)
    }
}
