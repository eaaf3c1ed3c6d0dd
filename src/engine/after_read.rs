//! What the cache policy asks for once a READ has completed: a prefetch of
//! the range after it (for a kernel readahead hint, or from the queue's
//! sequential-read detector), and whether the base data the READ read is
//! copied into the overlay (copy-on-readahead with `--cache-mode cow`,
//! `--cow-on-read` for every read). Pure decisions; the queue carries them
//! out in the background.

use crate::engine::cache::{CacheMode, CachePolicy};
use crate::engine::readahead::{Detector, ReadKind};
use crate::stats::CacheSource;

/// A READ that completed, as the policy sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CompletedRead {
    pub(crate) off: u64,
    pub(crate) len: u64,
    /// The kernel marked it as readahead (all three fail-fast flags).
    pub(crate) hinted: bool,
    /// Other READs of the same queue were in flight: a reader that keeps
    /// several ahead of itself needs no prefetch.
    pub(crate) others_in_flight: bool,
    /// It read at least one whole block from the base.
    pub(crate) read_base_block: bool,
}

/// What to do after a READ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct AfterRead {
    /// A cache request for `(off, len)`, asked for by this source.
    pub(crate) prefetch: Option<(u64, u64, CacheSource)>,
    /// Copy the base blocks the READ read into the overlay, for this
    /// source.
    pub(crate) install: Option<CacheSource>,
    /// Bytes of the READ that an earlier prefetch had asked for.
    pub(crate) read_ahead: u64,
}

/// Whether the policy copies the base data of a READ (`hinted` or not)
/// into the overlay. A READ that may be copied must leave its data in the
/// daemon's memory, not in a mapping that ublk copies from.
pub(crate) fn installs(policy: &CachePolicy, hinted: bool) -> bool {
    policy.cow_on_read || (hinted && policy.mode == CacheMode::Cow)
}

/// The decisions after `read`, on a device of `size` bytes; `detector` is
/// the queue's and follows the READ.
pub(crate) fn after_read(
    policy: &CachePolicy,
    detector: &mut Detector,
    size: u64,
    read: &CompletedRead,
) -> AfterRead {
    let kind = if read.hinted {
        ReadKind::Hint
    } else if read.others_in_flight {
        ReadKind::Deep
    } else {
        ReadKind::Plain
    };
    let ahead = detector.on_read(read.off, read.len, kind);
    let source = if read.hinted {
        CacheSource::KernelHint
    } else {
        CacheSource::Detector
    };
    let prefetch = ahead
        .map(|(off, len)| (off, len.min(size.saturating_sub(off))))
        .filter(|&(_, len)| len > 0)
        .map(|(off, len)| (off, len, source));
    let source = if policy.cow_on_read {
        CacheSource::CowOnRead
    } else {
        CacheSource::KernelHint
    };
    let install = (installs(policy, read.hinted) && read.read_base_block).then_some(source);
    AfterRead {
        prefetch,
        install,
        read_ahead: detector.take_read_ahead(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::readahead::Readahead;

    const MIB: u64 = 1 << 20;

    fn read(off: u64, len: u64) -> CompletedRead {
        CompletedRead {
            off,
            len,
            hinted: false,
            others_in_flight: false,
            read_base_block: true,
        }
    }

    #[test]
    fn a_sequential_reader_gets_prefetch_from_the_detector() {
        let p = CachePolicy::default();
        let mut d = Detector::new(Readahead::Auto, 4096);
        assert_eq!(
            after_read(&p, &mut d, 64 * MIB, &read(0, 4096)).prefetch,
            None
        );
        let a = after_read(&p, &mut d, 64 * MIB, &read(4096, 4096));
        let (off, len, source) = a.prefetch.expect("a continued stream prefetches");
        assert_eq!((off, source), (8192, CacheSource::Detector));
        assert!(len > 0);
        assert_eq!(a.install, None, "passthrough copies nothing");
    }

    #[test]
    fn a_reader_with_reads_in_flight_gets_none() {
        let p = CachePolicy::default();
        let mut d = Detector::new(Readahead::Auto, 4096);
        for i in 0..8 {
            let r = CompletedRead {
                others_in_flight: true,
                ..read(i * 4096, 4096)
            };
            assert_eq!(after_read(&p, &mut d, 64 * MIB, &r).prefetch, None);
        }
    }

    #[test]
    fn a_hint_prefetches_after_it_clipped_at_the_end() {
        let p = CachePolicy::default();
        let mut d = Detector::new(Readahead::Auto, 4096);
        let size = 1 << 20;
        let r = CompletedRead {
            hinted: true,
            ..read(size - 64 * 1024, 16 * 1024)
        };
        let (off, len, source) = after_read(&p, &mut d, size, &r).prefetch.unwrap();
        assert_eq!(source, CacheSource::KernelHint);
        assert!(off >= r.off + r.len && off + len <= size, "{off}+{len}");
        // At the very end there is nothing left to ask for.
        let mut d = Detector::new(Readahead::Auto, 4096);
        let r = CompletedRead {
            hinted: true,
            ..read(size - 4096, 4096)
        };
        assert_eq!(after_read(&p, &mut d, size, &r).prefetch, None);
    }

    #[test]
    fn off_means_no_prefetch() {
        let p = CachePolicy::default();
        let mut d = Detector::new(Readahead::Off, 4096);
        after_read(&p, &mut d, 64 * MIB, &read(0, 4096));
        assert_eq!(
            after_read(&p, &mut d, 64 * MIB, &read(4096, 4096)).prefetch,
            None
        );
    }

    #[test]
    fn copies_follow_the_policy() {
        let cow = CachePolicy {
            mode: CacheMode::Cow,
            ..CachePolicy::default()
        };
        let on_read = CachePolicy {
            cow_on_read: true,
            ..CachePolicy::default()
        };
        let mut d = Detector::new(Readahead::Off, 4096);
        let hinted = CompletedRead {
            hinted: true,
            ..read(0, 8192)
        };
        let plain = read(0, 8192);
        let go = |p: &CachePolicy, d: &mut Detector, r| after_read(p, d, MIB, r).install;
        assert_eq!(go(&cow, &mut d, &hinted), Some(CacheSource::KernelHint));
        assert_eq!(go(&cow, &mut d, &plain), None, "cow copies only readahead");
        assert_eq!(go(&on_read, &mut d, &plain), Some(CacheSource::CowOnRead));
        assert_eq!(go(&on_read, &mut d, &hinted), Some(CacheSource::CowOnRead));
        assert_eq!(go(&CachePolicy::default(), &mut d, &hinted), None);
        // Nothing to copy when no whole base block was read.
        let partial = CompletedRead {
            read_base_block: false,
            ..plain
        };
        assert_eq!(go(&on_read, &mut d, &partial), None);
        assert!(installs(&cow, true) && !installs(&cow, false));
        assert!(installs(&on_read, false));
    }
}
