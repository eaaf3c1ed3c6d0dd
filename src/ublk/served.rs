//! The device as the queues serve it: the engine's device, its cache
//! policy, the counters, and what the queues' threads need to reach the
//! base and the overlay without the ring (mappings, the direct base). The
//! daemon makes one per device and hands it to the queues and to the
//! control socket.

use crate::engine::base::{DirectAlign, DirectBase};
use crate::engine::cache::CachePolicy;
use crate::engine::chain::Backed;
use crate::engine::device::CowDevice;
use crate::stats::Stats;
use crate::ublk::exec::{MAX_RING_LAYERS, RingFiles};
use crate::ublk::inline::MemoryPath;
use std::fs::File;
use std::os::fd::AsRawFd;
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
        let base_io = MemoryPath::new(raw, size, false)?;
        let layer_io = layers
            .iter()
            .map(|l| {
                let o = &l.overlay;
                MemoryPath::new(o.storage(), o.data_pos(size), false)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let overlay = dev.overlay();
        let overlay_io = MemoryPath::new(overlay.storage(), overlay.data_pos(size), true)?;
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
        Ok(ServedDevice {
            dev,
            policy,
            stats: Arc::default(),
            base_io,
            overlay_io,
            layer_io,
            unallocated_ready,
            direct,
        })
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
        Ok(ServedDevice {
            stats: self.stats.clone(),
            ..ServedDevice::new(dev, self.policy, false, direct)?
        })
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
        RingFiles {
            base,
            overlay: self.dev.overlay().storage().as_raw_fd(),
            zero: zero.as_raw_fd(),
            base_direct: self.direct_base().map_or(base, |f| f.as_raw_fd()),
            layers: below
                .layers()
                .iter()
                .map(|l| l.overlay.storage().as_raw_fd())
                .collect(),
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
