//! Per-device counters: where reads were served from, writes, and cache
//! requests by source and by action. Updated with relaxed atomics by every
//! queue; `ublk-cow stats` reads a snapshot through the control socket.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Where a cache request came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CacheSource {
    /// A READ flagged fail-fast by the kernel: page-cache readahead above us.
    KernelHint,
    /// The per-queue detector of sequential reads (O_DIRECT readers).
    Detector,
    /// `ublk-cow cache`.
    Command,
    /// `--cow-on-read`: base blocks a read fully covered.
    CowOnRead,
}

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// The live counters.
        #[derive(Default)]
        pub(crate) struct Stats { $(pub $name: AtomicU64,)* }

        /// A snapshot of the counters, as `stats --json` prints it. A
        /// counter the daemon does not have (an older one) reads as 0.
        #[derive(Clone, Debug, Default, Serialize, Deserialize)]
        #[serde(default)]
        pub(crate) struct StatsSnapshot { $(pub $name: u64,)* }

        impl Stats {
            pub(crate) fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }

        impl StatsSnapshot {
            /// `(name, value)` pairs in declaration order.
            pub(crate) fn rows(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

counters!(
    read_base_ops,
    read_base_bytes,
    read_base_direct_ops,
    // Reads from the layers of a chain below the overlay.
    read_layer_ops,
    read_layer_bytes,
    read_overlay_ops,
    read_overlay_bytes,
    read_zero_ops,
    read_zero_bytes,
    reads_from_mapping,
    reads_spliced,
    // READs whose data the queue's copy helper copied (into the tag's
    // buffer, or with user copy into the request).
    reads_copied_by_helper,
    readahead_flagged_reads,
    write_ops,
    write_bytes,
    writes_to_mapping,
    writes_mapping_refused,
    writes_staged,
    // WRITE data written to fresh overlay blocks with O_DIRECT.
    writes_direct,
    // ... and refused by the file system (EINVAL), then written through
    // the page cache.
    writes_direct_refused,
    // Durable writes and data syncs made on a queue's thread, for a
    // request alone on its queue (`exec::SyncsOn::Thread`).
    syncs_on_thread,
    rmw_blocks,
    lock_waits,
    flushes,
    // FLUSHes answered by a flush that began after they arrived (no I/O).
    flushes_shared,
    // FUA WRITEs written with RWF_DSYNC whose flush wrote the map pages
    // without syncing the overlay's data.
    flushes_map_only,
    // 1 once a flush failed: every later FLUSH and FUA write fails.
    overlay_failed,
    zero_ops,
    cache_from_kernel_hint,
    cache_from_detector,
    cache_from_command,
    cache_from_cow_on_read,
    cache_dropped_over_budget,
    // Bytes that prefetches (hints and the detector) queued, and bytes of
    // READs within ranges the detector had asked for before them (a
    // request then dropped over the budget included).
    prefetch_bytes,
    prefetch_read_bytes,
    fadvise_overlay_bytes,
    fadvise_base_bytes,
    cache_read_bytes,
    copied_to_overlay_bytes,
    blocks_unallocated,
    blocks_allocated,
    blocks_zero,
    // A remote base: requests that waited for fetches, and those failed
    // because a fetch failed (EIO).
    remote_waits,
    remote_failed_requests,
    // The remote fetcher's own counters (`remote::Counters`), read when
    // the snapshot is taken: GETs (each retry is one), bytes, retries,
    // failed fetches, fetches and their latency in microseconds, most GETs
    // in flight at once.
    remote_gets,
    remote_bytes,
    remote_retries,
    remote_fetch_failures,
    remote_fetches,
    remote_fetch_latency_us_sum,
    remote_fetch_latency_us_max,
    remote_gets_in_flight_max,
);

impl Stats {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub(crate) fn cache_request(&self, source: CacheSource) {
        let c = match source {
            CacheSource::KernelHint => &self.cache_from_kernel_hint,
            CacheSource::Detector => &self.cache_from_detector,
            CacheSource::Command => &self.cache_from_command,
            CacheSource::CowOnRead => &self.cache_from_cow_on_read,
        };
        Stats::add(c, 1);
    }
}
