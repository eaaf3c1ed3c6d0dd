//! Readahead: which ranges to prefetch, decided per queue from the READs it
//! serves. Two inputs:
//!
//! - kernel readahead hints: blk-mq marks readahead bios fail-fast and ublk
//!   forwards the flags, so a READ with all three fail-fast bits is the page
//!   cache above the device reading ahead; the window after it is prefetched.
//! - a detector for readers that bypass the page cache (O_DIRECT): a READ
//!   that continues the previous one prefetches the window after it. The
//!   window starts at 64 KiB (or one block if larger), doubles while the
//!   stream stays sequential, up to the maximum (4 MiB by default), and
//!   resets on a jump. A new request is made only when less than half a
//!   window is left ahead of the reader, and never for bytes already asked.
//!   A READ that completes while the queue serves other READs makes none:
//!   that reader keeps reads of its own ahead of it, and a prefetch would
//!   only race them for the same blocks (measured in docs/benchmarks.md,
//!   "With the base on a slower device").
//!
//! The base is opened with `POSIX_FADV_RANDOM`, so this is the only
//! prefetcher: `--readahead off` means no prefetch at all.

use std::fmt;
use std::str::FromStr;

/// `--readahead off|auto|BYTES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum Readahead {
    Off,
    /// Windows up to 4 MiB.
    Auto,
    /// Windows up to this many bytes.
    Max(u64),
}

pub(crate) const AUTO_MAX: u64 = 4 << 20;
const START: u64 = 64 << 10;

impl FromStr for Readahead {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Readahead::Off),
            "auto" => Ok(Readahead::Auto),
            _ => match crate::size::parse_size(s) {
                Ok(0) => Ok(Readahead::Off),
                Ok(n) => Ok(Readahead::Max(n)),
                Err(_) => Err(format!("'{s}' is not off, auto or a size")),
            },
        }
    }
}

impl fmt::Display for Readahead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Readahead::Off => f.write_str("off"),
            Readahead::Auto => f.write_str("auto"),
            Readahead::Max(n) => write!(f, "{n}"),
        }
    }
}

/// The prefetch state of one queue.
pub(crate) struct Detector {
    max: u64,
    min: u64,
    window: u64,
    /// End of the previous non-hint READ.
    last_end: Option<u64>,
    /// Everything below this (in the current stream) was already requested.
    prefetched_end: u64,
}

impl Detector {
    pub(crate) fn new(cfg: Readahead, block_size: u32) -> Detector {
        let max = match cfg {
            Readahead::Off => 0,
            Readahead::Auto => AUTO_MAX,
            Readahead::Max(n) => n,
        };
        let min = START.max(block_size as u64).min(max);
        Detector {
            max,
            min,
            window: min,
            last_end: None,
            prefetched_end: 0,
        }
    }

    /// The range to request so that `window` bytes past `end` are asked
    /// for, if less than half a window is left.
    fn ahead(&mut self, end: u64, window: u64) -> Option<(u64, u64)> {
        let start = self.prefetched_end.max(end);
        let target = end + window;
        if start >= target || start - end > window / 2 {
            return None;
        }
        self.prefetched_end = target;
        Some((start, target - start))
    }

    /// A READ without readahead flags (an O_DIRECT reader, or a page-cache
    /// miss): the range to prefetch, if it continues a stream.
    pub(crate) fn on_read(&mut self, off: u64, len: u64) -> Option<(u64, u64)> {
        if self.max == 0 {
            return None;
        }
        if !self.follow(off, len) {
            return None;
        }
        let window = self.window;
        self.window = (self.window * 2).min(self.max);
        self.ahead(off + len, window)
    }

    /// Follows the stream to a READ of `[off, off + len)`: whether it
    /// continues the previous one. A jump starts a new stream.
    fn follow(&mut self, off: u64, len: u64) -> bool {
        let end = off + len;
        let sequential = self.last_end == Some(off);
        self.last_end = Some(end);
        if !sequential {
            self.window = self.min;
            self.prefetched_end = end;
        }
        sequential
    }

    /// A READ served while the queue had other READs in flight: the reader
    /// keeps reads of its own ahead of this one, so nothing is prefetched
    /// (a prefetch would only race those reads for the same blocks); the
    /// stream is followed all the same.
    pub(crate) fn on_deep_read(&mut self, off: u64, len: u64) {
        if self.follow(off, len) {
            self.prefetched_end = self.prefetched_end.max(off + len);
        }
    }

    /// A READ the kernel flagged as readahead: the window after it (as long
    /// as the read itself, within the maximum).
    pub(crate) fn on_hint(&mut self, off: u64, len: u64) -> Option<(u64, u64)> {
        if self.max == 0 {
            return None;
        }
        let end = off + len;
        if self.prefetched_end < off || self.prefetched_end > end + self.max {
            self.prefetched_end = end;
        }
        self.ahead(end, len.min(self.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_with_reads_in_flight_gets_no_prefetch() {
        let mut d = Detector::new(Readahead::Auto, 4096);
        let mb = 1 << 20;
        for i in 0..8 {
            d.on_deep_read(i * mb, mb);
        }
        // Alone again (a QD1 reader): the stream continues from there.
        assert_eq!(d.on_read(8 * mb, mb), Some((9 * mb, 64 << 10)));
        // A jump while deep resets the stream.
        d.on_deep_read(100 * mb, mb);
        assert_eq!(d.on_read(8 * mb, mb), None);
    }

    #[test]
    fn window_grows_while_sequential_and_resets_on_jump() {
        let mut d = Detector::new(Readahead::Auto, 4096);
        assert_eq!(d.on_read(0, 4096), None, "the first read is no stream yet");
        assert_eq!(d.on_read(4096, 4096), Some((8192, 64 << 10)));
        let mut off = 8192;
        let mut asked = vec![(8192, 64 << 10)];
        while off < (16 << 20) {
            if let Some(r) = d.on_read(off, 4096) {
                asked.push(r);
            }
            off += 4096;
        }
        // Requests are contiguous (nothing asked twice) and grow to 4 MiB.
        for w in asked.windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0);
        }
        assert!(asked.iter().any(|r| r.1 >= 2 << 20));
        assert!(asked.iter().all(|r| r.1 <= AUTO_MAX));
        // Far fewer requests than reads: each covers at least half a window.
        assert!(asked.len() < 40, "{} requests", asked.len());
        assert_eq!(d.on_read(100 << 20, 4096), None, "a jump resets");
        assert_eq!(d.on_read((100 << 20) + 4096, 4096).unwrap().1, 64 << 10);
    }

    #[test]
    fn off_means_nothing() {
        let mut d = Detector::new(Readahead::Off, 4096);
        assert_eq!(d.on_read(0, 4096), None);
        assert_eq!(d.on_read(4096, 4096), None);
        assert_eq!(d.on_hint(8192, 65536), None);
    }

    #[test]
    fn hints_prefetch_the_next_window_once() {
        let mut d = Detector::new(Readahead::Max(1 << 20), 4096);
        assert_eq!(d.on_hint(0, 16384), Some((16384, 16384)));
        assert_eq!(d.on_hint(16384, 32768), Some((49152, 32768)));
        assert_eq!(d.on_hint(4 << 20, 8 << 20), Some(((12 << 20), 1 << 20)));
    }

    #[test]
    fn parses() {
        assert_eq!("off".parse::<Readahead>(), Ok(Readahead::Off));
        assert_eq!("auto".parse::<Readahead>(), Ok(Readahead::Auto));
        assert_eq!("1M".parse::<Readahead>(), Ok(Readahead::Max(1 << 20)));
        assert!("fast".parse::<Readahead>().is_err());
    }
}
