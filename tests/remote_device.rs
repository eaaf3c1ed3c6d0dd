//! A device over a remote base (`add --base URL`), served by the io_uring
//! executor on a plain ring, against the HTTP range server on 127.0.0.1:
//! READs fetch each unit once into the overlay, partial WRITEs fetch the
//! rest of their blocks, a fetch that fails fails its READ with EIO while
//! every fetched block keeps being served, and a replaced object is never
//! mixed in.

mod common;
#[path = "remote/servers.rs"]
mod servers;

use servers::{RangeOpts, Server, free_port, range_server};
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ublk_cow::engine::Errno;
use ublk_cow::engine::cache::CachePolicy;
use ublk_cow::engine::chain::Lower;
use ublk_cow::engine::device::CowDevice;
use ublk_cow::engine::map::{BlockState, MapMemory};
use ublk_cow::remote::{AwsEnv, Params, RemoteBase, RemoteUrl};
use ublk_cow::ublk::ServedDevice;
use ublk_cow::ublk::exec::{self, Fua, MayLeave, TagScratch, ZeroBlocks};
use ublk_cow::ublk::plain_ring::PlainRing;
use ublk_cow::ublk::request_buf::RequestBuf;
use ublk_cow::ublk::write_data::WriteData;

const BLOCK: u32 = 4096;
const UNIT: u64 = 64 << 10;
/// Four whole units and a short one of 8 KiB.
const SIZE: u64 = 4 * UNIT + 8192;
/// GETs of opening a remote base: one of the object's first bytes (a raw
/// image, pushed layers or an overlay?) at open, and one at connect.
const OPEN: usize = 2;

/// A scratch directory holding the served `disk.img`, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(test: &str, data: &[u8]) -> Dir {
        let dir = std::env::temp_dir().join(format!("ublk-cow-rdev-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("srv")).unwrap();
        std::fs::write(dir.join("srv/disk.img"), data).unwrap();
        Dir(dir)
    }

    fn srv(&self) -> PathBuf {
        self.0.join("srv")
    }

    fn gets(&self) -> usize {
        std::fs::read_to_string(self.0.join("gets.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// The byte ranges of the GETs after the first `skip`, sorted.
    fn ranges(&self, skip: usize) -> Vec<std::ops::Range<u64>> {
        let mut r = servers::logged_ranges(&self.0.join("gets.log")).split_off(skip);
        r.sort_by_key(|r| r.start);
        r
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn serve(dir: &Dir, port: u16) -> Server {
    serve_slowly(dir, port, None)
}

/// With `delay`, every GET waits that many seconds before it answers.
fn serve_slowly(dir: &Dir, port: u16, delay: Option<f64>) -> Server {
    let opts = RangeOpts {
        log: Some(dir.0.join("gets.log")),
        delay,
        ..RangeOpts::default()
    };
    range_server(&dir.srv(), port, &opts)
}

/// A device over `http://127.0.0.1:port/disk.img` with a new overlay in
/// `dir`, its fetcher connected, and a plain ring to serve it.
struct Served {
    sh: Arc<ServedDevice>,
    ring: PlainRing,
    zeros: ZeroBlocks,
    scratch: TagScratch,
    _zero: File,
}

impl Served {
    fn new(dir: &Dir, port: u16, fetch_timeout: Duration) -> Served {
        let url = RemoteUrl::parse(&format!("http://127.0.0.1:{port}/disk.img")).unwrap();
        let params = Params {
            fetch_size: UNIT,
            fetch_timeout,
            ..Params::default()
        };
        let base = RemoteBase::open(url, AwsEnv::default(), params, BLOCK).unwrap();
        base.connect().unwrap();
        let lower = Lower::remote(base).unwrap();
        let overlay = File::create_new(dir.0.join("overlay")).unwrap();
        let blocks = SIZE.div_ceil(BLOCK as u64);
        let map = MapMemory::heap(blocks);
        let id = lower.identity;
        let dev = CowDevice::create(lower.backed, &id, overlay, BLOCK, map).unwrap();
        let sh = Arc::new(ServedDevice::new(dev, CachePolicy::default(), false, None).unwrap());
        ServedDevice::keep_fetched_units(&sh);
        let zero = File::open("/dev/zero").unwrap();
        let ring = PlainRing::new(&sh.ring_files(&zero), 64).unwrap();
        Served {
            sh,
            ring,
            zeros: ZeroBlocks::new(BLOCK),
            scratch: TagScratch::default(),
            _zero: zero,
        }
    }

    fn read(&mut self, off: u64, len: u64) -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0u8; len as usize];
        let done = self.ring.block_on(exec::read(
            &self.ring,
            &self.sh,
            &mut self.scratch,
            off,
            RequestBuf::Memory(&mut buf),
            MayLeave::Nothing,
        ));
        done.map(|_| buf)
    }

    fn write(&mut self, off: u64, data: &[u8]) -> Result<(), Errno> {
        let mut d = WriteData::bytes(data);
        self.ring.block_on(exec::write_request(
            &self.ring,
            &self.sh,
            &self.zeros,
            &mut self.scratch,
            off,
            &mut d,
            Fua::No,
        ))
    }

    fn state(&self, off: u64) -> BlockState {
        self.sh.dev.map().get(off / BLOCK as u64)
    }
}

#[test]
fn reads_fetch_each_unit_once_and_partial_writes_fetch_their_blocks() {
    let mut image = common::noise(SIZE, 11);
    let dir = Dir::new("once", &image);
    let _srv = serve(&dir, free_port());
    let mut s = Served::new(&dir, _srv.port, Duration::from_secs(30));
    // Open's look at the object's first bytes is one GET; its HEADs are none.
    assert_eq!(dir.gets(), OPEN);

    // 512 bytes in the middle of a block of unit 1: its unit is fetched,
    // and the block keeps the base's bytes around the write.
    let at = UNIT + 3 * 4096 + 1024;
    let data = common::noise(512, 12);
    s.write(at, &data).unwrap();
    image[at as usize..][..512].copy_from_slice(&data);
    assert_eq!(dir.gets(), OPEN + 1);
    assert_eq!(s.state(at), BlockState::Allocated);
    assert_eq!(s.state(UNIT), BlockState::Copied);
    // A whole-block write needs nothing from below.
    let whole = common::noise(4096, 13);
    s.write(3 * UNIT, &whole).unwrap();
    image[3 * UNIT as usize..][..4096].copy_from_slice(&whole);
    assert_eq!(dir.gets(), OPEN + 1);
    assert_eq!(s.state(3 * UNIT + 4096), BlockState::Unallocated);

    // The whole device, in reads that straddle units: every byte right,
    // each unit not yet fetched fetched once.
    let mut off = 0;
    while off < SIZE {
        let len = (20 << 10).min(SIZE - off);
        let got = s.read(off, len).unwrap();
        assert!(
            got == image[off as usize..][..len as usize],
            "read {off}+{len}"
        );
        off += len;
    }
    assert_eq!(dir.gets(), OPEN + 5, "five units, each fetched once");
    assert_eq!(s.state(3 * UNIT), BlockState::Allocated);
    assert_eq!(s.state(3 * UNIT + 4096), BlockState::Copied);
    assert_eq!(s.state(SIZE - 1), BlockState::Copied);
    // Read again: all from the overlay.
    assert!(s.read(0, SIZE).unwrap() == image);
    assert_eq!(dir.gets(), OPEN + 5);
}

#[test]
fn a_failed_fetch_fails_its_read_and_fetched_blocks_still_serve() {
    let image = common::noise(SIZE, 21);
    let dir = Dir::new("outage", &image);
    let port = free_port();
    let srv = serve(&dir, port);
    let timeout = Duration::from_secs(2);
    let mut s = Served::new(&dir, port, timeout);
    assert!(s.read(0, 8192).unwrap() == image[..8192]);
    srv.stop();

    // Unit 0 is in the overlay: served with the server down.
    assert!(s.read(4096, UNIT - 4096).unwrap() == image[4096..UNIT as usize]);
    // Unit 2 is not: EIO, within the deadline.
    let t = Instant::now();
    assert_eq!(s.read(2 * UNIT, 4096), Err(Errno::EIO));
    let took = t.elapsed();
    assert!(
        took >= timeout - Duration::from_millis(100) && took < timeout + Duration::from_secs(2),
        "failed after {took:?}"
    );
    assert_eq!(s.state(2 * UNIT), BlockState::Unallocated);
    // A write of part of a block there fails too, and changes nothing.
    assert_eq!(s.write(2 * UNIT + 512, &[7u8; 512]), Err(Errno::EIO));
    assert_eq!(s.state(2 * UNIT), BlockState::Unallocated);

    // The server is back: the same read works.
    let _srv = serve(&dir, port);
    assert!(s.read(2 * UNIT, 4096).unwrap() == image[2 * UNIT as usize..][..4096]);
}

#[test]
fn a_replaced_object_is_never_mixed_in() {
    let image = common::noise(SIZE, 31);
    let dir = Dir::new("replaced", &image);
    let _srv = serve(&dir, free_port());
    let mut s = Served::new(&dir, _srv.port, Duration::from_secs(30));
    assert!(s.read(0, 4096).unwrap() == image[..4096]);

    // Replaced: written anew beside it and renamed over it.
    let new = dir.srv().join("new.img");
    std::fs::write(&new, common::noise(SIZE, 32)).unwrap();
    std::fs::rename(&new, dir.srv().join("disk.img")).unwrap();

    assert_eq!(s.read(UNIT, 4096), Err(Errno::EIO));
    assert_eq!(s.state(UNIT), BlockState::Unallocated);
    // What was fetched before is still the old object's.
    assert!(s.read(0, UNIT).unwrap() == image[..UNIT as usize]);
}

#[test]
fn prefetched_units_are_kept_and_reads_join_fetches_in_flight() {
    let image = common::noise(SIZE, 41);
    let dir = Dir::new("prefetch", &image);
    let srv = serve_slowly(&dir, free_port(), Some(0.3));
    let mut s = Served::new(&dir, srv.port, Duration::from_secs(30));
    // The whole device prefetched, and read at once while the GETs fly.
    exec::prefetch_below(&s.sh, 0, SIZE);
    assert!(s.read(0, SIZE).unwrap() == image);
    // Prefetch asks for consecutive units in one GET, the READ for each
    // unit not in flight yet by itself: which GETs depends on who came
    // first, but they cover the object once, end to end.
    let got = dir.ranges(OPEN);
    assert!(
        got.len() <= 5 && got.first().map(|r| r.start) == Some(0),
        "{got:?}"
    );
    assert!(
        got.windows(2).all(|w| w[0].end == w[1].start) && got.last().unwrap().end == SIZE,
        "each byte fetched once: {got:?}"
    );
    let gets = dir.gets();
    // Every unit is kept in the overlay by the fetch itself: reading
    // again, or prefetching again, asks nothing more.
    for off in (0..SIZE).step_by(BLOCK as usize) {
        assert_eq!(s.state(off), BlockState::Copied, "block at {off}");
    }
    exec::prefetch_below(&s.sh, 0, SIZE);
    assert!(s.read(0, SIZE).unwrap() == image);
    assert_eq!(dir.gets(), gets);
}

#[test]
fn an_object_that_is_an_overlay_is_refused() {
    let mut layer = common::noise(SIZE, 51);
    layer[..8].copy_from_slice(b"UBLKCOW1");
    let dir = Dir::new("layer", &layer);
    let srv = serve(&dir, free_port());
    let url = RemoteUrl::parse(&format!("http://127.0.0.1:{}/disk.img", srv.port)).unwrap();
    let e = RemoteBase::open(url, AwsEnv::default(), Params::default(), BLOCK)
        .err()
        .expect("an overlay in an object store is refused");
    assert!(e.to_string().contains("not a raw image"), "{e}");
}
