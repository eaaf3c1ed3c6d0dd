//! Readahead: which ranges to prefetch, decided per queue from the READs it
//! serves. Two inputs:
//!
//! - kernel readahead hints: blk-mq marks readahead bios fail-fast and ublk
//!   forwards the flags, so a READ with all three fail-fast bits is the page
//!   cache above the device reading ahead.
//! - READs without the flags: readers that bypass the page cache (O_DIRECT),
//!   or the page cache's own misses.
//!
//! Both feed the same streams. A queue follows up to [`STREAMS`] of them at
//! once (two readers at different offsets each keep their own); a READ that
//! continues none starts a new one in the place of the one least recently
//! used. A stream goes up (each READ starts where the last ended) or down
//! (each READ ends where the last started: a reader going backwards), and
//! asks for the window of bytes ahead of its reader in its direction:
//!
//! - the window starts at 64 KiB (or one block if larger) and doubles with
//!   each READ that continues the stream exactly, up to the maximum (4 MiB
//!   by default): a stream that keeps hitting looks further ahead than the
//!   kernel's 128 KiB;
//! - a READ that skips forward into bytes already asked for is a miss for
//!   the bytes skipped: the stream goes on from there with half the window
//!   (not below the start);
//! - a new request is made only when less than half a window is left ahead
//!   of the reader, and never for bytes already asked, so a stream's
//!   requests are few and large (each becomes large base reads);
//! - a READ without hint flags that completes while the queue serves other
//!   READs asks for nothing: that reader keeps reads of its own ahead of it,
//!   and a prefetch would only race them for the same blocks (measured in
//!   docs/benchmarks.md, "With the base on a slower device"); it still
//!   moves its stream along.
//!
//! The detector also counts how many bytes of what it asked for were later
//! read (`prefetch_read_bytes` in `stats`).
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
/// Streams followed at once per queue.
pub(crate) const STREAMS: usize = 4;

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

/// How a completed READ reached the detector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadKind {
    /// No readahead flags, and no other READ of the queue in flight.
    Plain,
    /// No readahead flags, while other READs of the queue were in flight.
    Deep,
    /// Flagged as readahead by the kernel.
    Hint,
}

/// Which way a stream's reads go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// One READ seen: either way.
    New,
    Up,
    Down,
}

/// One sequential reader.
#[derive(Clone, Copy, Debug)]
struct Stream {
    dir: Dir,
    /// The last READ of the stream.
    start: u64,
    end: u64,
    window: u64,
    /// Bytes asked for and not yet passed by the reader.
    asked: (u64, u64),
    /// When the stream was last continued (the detector's clock).
    used: u64,
}

/// The prefetch state of one queue.
pub(crate) struct Detector {
    max: u64,
    min: u64,
    streams: Vec<Stream>,
    clock: u64,
    /// Bytes read that had been asked for, since the last `take_read_ahead`.
    read_ahead: u64,
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
            streams: Vec::with_capacity(STREAMS),
            clock: 0,
            read_ahead: 0,
        }
    }

    /// Bytes of READs that had been prefetched, since the last call.
    pub(crate) fn take_read_ahead(&mut self) -> u64 {
        std::mem::take(&mut self.read_ahead)
    }

    /// A READ of `[off, off + len)` completed: the range to prefetch, if any.
    pub(crate) fn on_read(&mut self, off: u64, len: u64, kind: ReadKind) -> Option<(u64, u64)> {
        if self.max == 0 || len == 0 {
            return None;
        }
        let end = off + len;
        self.clock += 1;
        self.count_read_ahead(off, end);
        let Some(i) = self.find(off, end) else {
            let max = self.max;
            let s = self.start_stream(off, end);
            // The kernel says this READ is readahead: the bytes after it are
            // wanted without waiting for a second READ.
            return match kind {
                ReadKind::Hint => ahead_up(s, end, len.min(max)),
                _ => None,
            };
        };
        let (min, max, clock) = (self.min, self.max, self.clock);
        let s = &mut self.streams[i];
        s.used = clock;
        let up = s.end <= off;
        let exact = if up { s.end == off } else { s.start == end };
        if up && !exact {
            // Skipped bytes that were asked for: they were prefetched in
            // vain, so the window shrinks.
            s.window = (s.window / 2).max(min);
        }
        s.dir = if up { Dir::Up } else { Dir::Down };
        s.start = off;
        s.end = end;
        if kind == ReadKind::Deep {
            if up {
                s.asked.0 = s.asked.0.max(end);
                s.asked.1 = s.asked.1.max(end);
            } else {
                s.asked.1 = s.asked.1.min(off);
                s.asked.0 = s.asked.0.min(off);
            }
            return None;
        }
        let window = s.window;
        if exact {
            s.window = (s.window * 2).min(max);
        }
        if kind == ReadKind::Hint {
            // Hints come in the kernel's window sizes: at least that far.
            s.window = s.window.max(len.min(max));
        }
        if up {
            ahead_up(s, end, window)
        } else {
            ahead_down(s, off, window)
        }
    }

    /// The stream `[off, end)` continues: exactly (up: starts at its end;
    /// down: ends at its start), or up by skipping into bytes it asked for.
    fn find(&self, off: u64, end: u64) -> Option<usize> {
        let exact = self.streams.iter().position(|s| {
            (s.end == off && s.dir != Dir::Down) || (s.start == end && s.dir != Dir::Up)
        });
        exact.or_else(|| {
            self.streams
                .iter()
                .position(|s| s.dir != Dir::Down && off > s.end && off < s.asked.1)
        })
    }

    /// A new stream at `[off, end)`, in place of the least recently used
    /// one if all are taken.
    fn start_stream(&mut self, off: u64, end: u64) -> &mut Stream {
        let s = Stream {
            dir: Dir::New,
            start: off,
            end,
            window: self.min,
            asked: (end, end),
            used: self.clock,
        };
        if self.streams.len() < STREAMS {
            self.streams.push(s);
            return self.streams.last_mut().unwrap();
        }
        let lru = (0..self.streams.len())
            .min_by_key(|&i| self.streams[i].used)
            .unwrap_or(0);
        self.streams[lru] = s;
        &mut self.streams[lru]
    }

    /// Counts the bytes of `[off, end)` that a stream asked for, once, and
    /// takes them out of what it has asked and not yet seen read.
    fn count_read_ahead(&mut self, off: u64, end: u64) {
        for s in &mut self.streams {
            let (lo, hi) = s.asked;
            let from = off.max(lo);
            let to = end.min(hi);
            if from < to {
                self.read_ahead += to - from;
                // Keep the part on the reader's way on (it goes up unless
                // it was seen going down).
                if s.dir == Dir::Down {
                    s.asked = (lo, from);
                } else {
                    s.asked = (to, hi.max(to));
                }
                return;
            }
        }
    }
}

/// The range to ask so that `window` bytes past `end` are asked for, if
/// less than half a window is left.
fn ahead_up(s: &mut Stream, end: u64, window: u64) -> Option<(u64, u64)> {
    let start = s.asked.1.max(end);
    let target = end + window;
    if start >= target || start - end > window / 2 {
        return None;
    }
    if s.asked.1 < end {
        s.asked.0 = start;
    }
    s.asked.1 = target;
    Some((start, target - start))
}

/// The same going down: `window` bytes below `off`.
fn ahead_down(s: &mut Stream, off: u64, window: u64) -> Option<(u64, u64)> {
    let start = s.asked.0.min(off);
    let target = off.saturating_sub(window);
    if target >= start || off - start > window / 2 {
        return None;
    }
    if s.asked.0 > off || s.asked.1 > off {
        s.asked.1 = start;
    }
    s.asked.0 = target;
    Some((target, start - target))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReadKind::*;

    const K: u64 = 1 << 10;
    const MB: u64 = 1 << 20;

    /// Reads `n` blocks of `bs` from `off` going up (or down), returning
    /// every request made.
    fn run(d: &mut Detector, off: u64, bs: u64, n: u64, up: bool) -> Vec<(u64, u64)> {
        (0..n)
            .filter_map(|i| {
                let at = if up { off + i * bs } else { off - (i + 1) * bs };
                d.on_read(at, bs, Plain)
            })
            .collect()
    }

    #[test]
    fn a_reader_with_reads_in_flight_gets_no_prefetch() {
        let mut d = Detector::new(Readahead::Auto, 4096);
        for i in 0..8 {
            assert_eq!(d.on_read(i * MB, MB, Deep), None);
        }
        // Alone again (a QD1 reader): the stream continues from there.
        assert_eq!(d.on_read(8 * MB, MB, Plain), Some((9 * MB, 64 * K)));
    }

    #[test]
    fn window_grows_while_sequential_and_restarts_on_jump() {
        let mut d = Detector::new(Readahead::Auto, 4096);
        assert_eq!(
            d.on_read(0, 4096, Plain),
            None,
            "the first read is no stream yet"
        );
        assert_eq!(d.on_read(4096, 4096, Plain), Some((8192, 64 * K)));
        let asked = run(&mut d, 8192, 4096, 4096 - 2, true);
        // Requests are contiguous (nothing asked twice) and grow to 4 MiB.
        assert_eq!(asked[0].0, 8192 + 64 * K);
        for w in asked.windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0);
        }
        assert!(asked.iter().any(|r| r.1 >= 2 * MB), "{asked:?}");
        assert!(asked.iter().all(|r| r.1 <= AUTO_MAX));
        // Far fewer requests than reads: each covers at least half a window.
        assert!(asked.len() < 40, "{} requests", asked.len());
        // All that was asked below the reader was read.
        assert_eq!(d.take_read_ahead(), 16 * MB - 8192);
        assert_eq!(d.on_read(100 * MB, 4096, Plain), None, "a jump starts anew");
        assert_eq!(d.on_read(100 * MB + 4096, 4096, Plain).unwrap().1, 64 * K);
    }

    #[test]
    fn a_capped_window_stops_growing() {
        let mut d = Detector::new(Readahead::Max(256 * K), 4096);
        let asked = run(&mut d, 0, 4096, 1024, true);
        assert!(asked.iter().all(|r| r.1 <= 256 * K), "{asked:?}");
        assert!(asked.iter().any(|r| r.1 > 64 * K), "{asked:?}");
    }

    #[test]
    fn skipping_asked_bytes_shrinks_the_window() {
        let mut d = Detector::new(Readahead::Auto, 4096);
        run(&mut d, 0, 4096, 64, true);
        let grown = d.streams[0].window;
        assert!(grown >= MB, "{grown}");
        let asked_end = d.streams[0].asked.1;
        // Skip 64 KiB of what was asked: a miss.
        let at = 64 * 4096 + 64 * K;
        assert!(at < asked_end);
        d.on_read(at, 4096, Plain);
        assert_eq!(d.streams.len(), 1, "still the same stream");
        assert_eq!(d.streams[0].window, grown / 2);
        // And it keeps shrinking while the reader keeps skipping.
        d.on_read(at + 4096 + 64 * K, 4096, Plain);
        assert_eq!(d.streams[0].window, grown / 4);
    }

    #[test]
    fn two_readers_keep_their_own_streams() {
        let mut d = Detector::new(Readahead::Auto, 4096);
        let (a, b) = (0, 128 * MB);
        let mut asked = Vec::new();
        for i in 0..2048 {
            asked.extend(d.on_read(a + i * 4096, 4096, Plain));
            asked.extend(d.on_read(b + i * 4096, 4096, Plain));
        }
        let near = |base: u64| {
            asked
                .iter()
                .filter(move |r| r.0 >= base && r.0 < base + 64 * MB)
        };
        // Each reader's requests are contiguous and reach large windows.
        for base in [a, b] {
            let mine: Vec<_> = near(base).collect();
            assert!(!mine.is_empty());
            for w in mine.windows(2) {
                assert_eq!(w[0].0 + w[0].1, w[1].0, "{base}: {mine:?}");
            }
            assert!(mine.iter().any(|r| r.1 >= MB), "{base}: {mine:?}");
        }
        assert!(asked.len() < 60, "{} requests", asked.len());
    }

    #[test]
    fn a_random_reader_starts_streams_and_asks_for_nothing() {
        let mut d = Detector::new(Readahead::Auto, 4096);
        let mut x: u64 = 12345;
        for _ in 0..10_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 20) % (1 << 24) * 4096;
            assert_eq!(d.on_read(off, 4096, Plain), None);
        }
        assert!(d.streams.len() <= STREAMS);
    }

    #[test]
    fn a_backwards_reader_gets_the_window_below_it() {
        let mut d = Detector::new(Readahead::Auto, 4096);
        let top = 64 * MB;
        let asked = run(&mut d, top, 4096, 4096, false);
        assert!(!asked.is_empty());
        // Each request lies below the one before, adjacent, and the
        // reader always finds its next block already asked for.
        assert!(asked[0].0 + asked[0].1 <= top - 2 * 4096);
        for w in asked.windows(2) {
            assert_eq!(w[1].0 + w[1].1, w[0].0, "{asked:?}");
        }
        assert!(asked.iter().any(|r| r.1 >= MB), "{asked:?}");
        let asked_bytes: u64 = asked.iter().map(|r| r.1).sum();
        let read = d.take_read_ahead();
        assert!(
            read > 15 * MB && read <= asked_bytes,
            "{read} of {asked_bytes}"
        );
    }

    #[test]
    fn off_means_nothing() {
        let mut d = Detector::new(Readahead::Off, 4096);
        assert_eq!(d.on_read(0, 4096, Plain), None);
        assert_eq!(d.on_read(4096, 4096, Plain), None);
        assert_eq!(d.on_read(8192, 65536, Hint), None);
    }

    #[test]
    fn hints_prefetch_after_them_and_grow() {
        let mut d = Detector::new(Readahead::Auto, 4096);
        assert_eq!(d.on_read(0, 16 * K, Hint), Some((16 * K, 16 * K)));
        let mut asked = vec![];
        let mut off = 16 * K;
        // The kernel reading ahead 128 KiB at a time.
        while off < 32 * MB {
            asked.extend(d.on_read(off, 128 * K, Hint));
            off += 128 * K;
        }
        // Nothing asked twice, and past the kernel's window the requests
        // follow each other.
        for w in asked.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{asked:?}");
        }
        for w in asked[4..].windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0, "{asked:?}");
        }
        assert!(asked.iter().any(|r| r.1 >= 2 * MB), "{asked:?}");
        // A hint far away prefetches its own length after it at once.
        assert_eq!(d.on_read(200 * MB, 8 * MB, Hint), Some((208 * MB, 4 * MB)));
    }

    #[test]
    fn parses() {
        assert_eq!("off".parse::<Readahead>(), Ok(Readahead::Off));
        assert_eq!("auto".parse::<Readahead>(), Ok(Readahead::Auto));
        assert_eq!("1M".parse::<Readahead>(), Ok(Readahead::Max(1 << 20)));
        assert!("fast".parse::<Readahead>().is_err());
    }
}
