//! The remote-base fetcher against real servers on 127.0.0.1: `moto_server`
//! for s3:// and a small HTTP server with Range for http://. Identity from
//! HEAD, every unit's bytes, single flight, a replaced object, an outage
//! and its end, prefetch's depth, and the refusals of bad inputs.

mod common;
#[path = "remote/servers.rs"]
mod servers;

use object_store::ObjectStoreExt;
use object_store::path::Path as StorePath;
use servers::{Moto, RangeOpts, free_port, logged_ranges, moto, range_server};
use std::path::PathBuf;
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};
use ublk_cow::remote::{AwsEnv, Error, Fetcher, Params, RemoteUrl};

const BLOCK: u32 = 4096;
const UNIT: u64 = 64 << 10;
/// GETs of an open: the object's first bytes (a raw image or pushed
/// layers?).
const OPEN_GETS: u32 = 1;
/// Three whole units and a short one of 4608 bytes.
const SIZE: u64 = 3 * UNIT + 4608;

fn pattern(len: u64, seed: u64) -> Vec<u8> {
    common::noise(len, seed)
}

fn params() -> Params {
    Params {
        fetch_size: UNIT,
        ..Params::default()
    }
}

fn env(m: &Moto, secret: &str, endpoint: &str) -> AwsEnv {
    AwsEnv::from_pairs([
        ("AWS_ACCESS_KEY_ID", m.key_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", secret),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ALLOW_HTTP", "true"),
    ])
}

fn good_env(m: &Moto) -> AwsEnv {
    env(m, &m.secret, &m.endpoint)
}

/// Puts `data` at `key` in the moto bucket; returns the new ETag.
fn put(m: &Moto, key: &str, data: Vec<u8>) -> String {
    let store = m.store();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt
        .block_on(store.put(&StorePath::from(key), data.into()))
        .unwrap();
    r.e_tag.expect("moto gives an ETag")
}

fn s3(m: &Moto, key: &str) -> RemoteUrl {
    RemoteUrl::parse(&format!("s3://{}/{key}", m.bucket)).unwrap()
}

fn open_err(url: &RemoteUrl, env: &AwsEnv) -> Error {
    match Fetcher::open(url, env, params(), BLOCK) {
        Ok(_) => panic!("{url} opened"),
        Err(e) => {
            let line = e.to_string();
            eprintln!("ublk-cow: {line}");
            assert!(!line.contains('\n'), "not one line: {line}");
            assert!(line.contains(&url.to_string()), "URL not named: {line}");
            e
        }
    }
}

/// Fetches every unit and checks it against `data`, the last one short.
fn check_units(f: &Fetcher, data: &[u8]) {
    assert_eq!(f.units(), SIZE.div_ceil(UNIT));
    for u in 0..f.units() {
        let r = f.unit_range(u);
        let got = f.fetch(u).unwrap();
        assert_eq!(got.len() as u64, r.end - r.start, "unit {u}");
        assert!(
            got[..] == data[r.start as usize..r.end as usize],
            "unit {u}'s bytes"
        );
    }
    assert_eq!(f.unit_range(3), 3 * UNIT..SIZE);
    assert!(matches!(f.fetch(f.units()), Err(Error::Param(_))));
}

#[test]
fn s3_identity_units_and_a_replaced_object() {
    let m = moto("images");
    let data = pattern(SIZE, 1);
    let etag = put(&m, "base/disk.img", data.clone());
    let f = Fetcher::open(&s3(&m, "base/disk.img"), &good_env(&m), params(), BLOCK).unwrap();
    assert_eq!(f.size(), SIZE);
    assert_eq!(f.identity().etag.as_deref(), Some(etag.as_str()));
    check_units(&f, &data);
    let c = f.counters().snapshot();
    assert_eq!((c.gets, c.bytes, c.failures, c.fetches), (4, SIZE, 0, 4));
    assert!(c.latency_us_max > 0 && c.latency_us_sum >= c.latency_us_max);

    // The async form, driven by another runtime.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let got = rt.block_on(f.fetch_async(1)).unwrap();
    assert!(got[..] == data[UNIT as usize..2 * UNIT as usize]);

    // Replaced under the running fetcher: same size, other bytes.
    put(&m, "base/disk.img", pattern(SIZE, 2));
    for u in [0, 3] {
        match f.fetch(u) {
            Err(e @ Error::Changed { .. }) => eprintln!("ublk-cow: {e}"),
            other => panic!("unit {u} of a replaced object: {other:?}"),
        }
    }
    assert_eq!(f.counters().snapshot().failures, 2);
    // Opened again, it is the new object.
    let g = Fetcher::open(&s3(&m, "base/disk.img"), &good_env(&m), params(), BLOCK).unwrap();
    assert_ne!(g.identity(), f.identity());
    check_units(&g, &pattern(SIZE, 2));
}

#[test]
fn s3_bad_inputs_are_refused_in_one_line() {
    let m = moto("fleet");
    put(&m, "ok.img", pattern(SIZE, 3));
    put(&m, "odd.img", pattern(1000, 4));
    put(&m, "empty.img", Vec::new());
    let good = good_env(&m);

    for bad in [
        "s3://fleet",
        "s3:///x.img",
        "s3://fleet/",
        "gs://fleet/x.img",
        "fleet/x.img",
    ] {
        let e = RemoteUrl::parse(bad).unwrap_err();
        assert!(matches!(e, Error::BadUrl { .. }), "{bad}: {e:?}");
        assert!(e.to_string().contains(bad) && !e.to_string().contains('\n'));
    }
    let e = open_err(
        &RemoteUrl::parse("s3://no-such-bucket/ok.img").unwrap(),
        &good,
    );
    assert!(matches!(e, Error::NoSuchBucket { .. }), "{e:?}");
    let e = open_err(&s3(&m, "missing.img"), &good);
    assert!(matches!(e, Error::NoSuchObject { .. }), "{e:?}");
    let e = open_err(&s3(&m, "ok.img"), &env(&m, "wrong-secret", &m.endpoint));
    assert!(matches!(e, Error::Denied { .. }), "{e:?}");
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let t = Instant::now();
    let e = open_err(&s3(&m, "ok.img"), &env(&m, &m.secret, &nowhere));
    assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(10));
    for key in ["odd.img", "empty.img"] {
        let e = open_err(&s3(&m, key), &good);
        assert!(matches!(e, Error::BadSize { .. }), "{key}: {e:?}");
    }
    // A fetch size that is not a multiple of the block size.
    let p = Params {
        fetch_size: 6 << 10,
        ..params()
    };
    assert!(matches!(
        Fetcher::open(&s3(&m, "ok.img"), &good, p, BLOCK),
        Err(Error::Param(_))
    ));
    // And the good one opens.
    assert_eq!(
        Fetcher::open(&s3(&m, "ok.img"), &good, params(), BLOCK)
            .unwrap()
            .size(),
        SIZE
    );
}

/// A directory with `disk.img` of [`SIZE`] bytes, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(test: &str) -> (Dir, Vec<u8>) {
        let dir =
            std::env::temp_dir().join(format!("ublk-cow-remote-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let data = pattern(SIZE, 7);
        std::fs::write(dir.join("disk.img"), &data).unwrap();
        (Dir(dir), data)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn http(port: u16, path: &str) -> RemoteUrl {
    RemoteUrl::parse(&format!("http://127.0.0.1:{port}/{path}")).unwrap()
}

/// `disk.img` of the range server on `port`, opened with `p`.
fn open_http(port: u16, p: Params) -> Fetcher {
    Fetcher::open(&http(port, "disk.img"), &AwsEnv::default(), p, BLOCK).unwrap()
}

#[test]
fn http_units_a_replaced_file_and_bad_inputs() {
    let (dir, data) = Dir::new("units");
    std::fs::write(dir.0.join("odd.img"), pattern(1000, 8)).unwrap();
    let srv = range_server(&dir.0, free_port(), &RangeOpts::default());
    let none = AwsEnv::default();
    let f = Fetcher::open(&http(srv.port, "disk.img"), &none, params(), BLOCK).unwrap();
    assert_eq!(f.size(), SIZE);
    assert!(f.identity().etag.is_some() && f.identity().last_modified.is_some());
    check_units(&f, &data);

    // Replaced: written anew beside it and renamed over it.
    let new = dir.0.join("new.img");
    std::fs::write(&new, pattern(SIZE, 9)).unwrap();
    std::fs::rename(&new, dir.0.join("disk.img")).unwrap();
    assert!(matches!(f.fetch(2), Err(Error::Changed { .. })));

    let e = open_err(&http(srv.port, "missing.img"), &none);
    assert!(matches!(e, Error::NoSuchObject { .. }), "{e:?}");
    let e = open_err(&http(srv.port, "odd.img"), &none);
    assert!(matches!(e, Error::BadSize { size: 1000, .. }), "{e:?}");
    let e = open_err(&http(free_port(), "disk.img"), &none);
    assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
}

#[test]
fn http_concurrent_fetches_of_one_unit_share_one_get() {
    let (dir, data) = Dir::new("flight");
    let log = dir.0.join("gets.log");
    let opts = RangeOpts {
        delay: Some(0.5),
        log: Some(log.clone()),
        ..RangeOpts::default()
    };
    let srv = range_server(&dir.0, free_port(), &opts);
    let f = Arc::new(open_http(srv.port, params()));
    let want = data[UNIT as usize..2 * UNIT as usize].to_vec();
    // Callbacks first: they return at once and wait together.
    let (tx, rx) = mpsc::channel();
    for _ in 0..3 {
        let tx = tx.clone();
        f.start(1, move |r| tx.send(r).unwrap());
    }
    // Then blocking fetches from eight threads.
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (f, b) = (f.clone(), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                f.fetch(1)
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap().unwrap()[..] == want[..]);
    }
    for _ in 0..3 {
        assert!(rx.recv().unwrap().unwrap()[..] == want[..]);
    }
    assert_eq!(f.counters().snapshot().gets, 1);
    let gets = std::fs::read_to_string(&log).unwrap();
    let gets = gets
        .lines()
        .skip(OPEN_GETS as usize)
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(gets.lines().count(), 1, "{gets}");
    // Pinned to the object that was opened.
    let etag = f.identity().etag.clone().unwrap();
    assert!(
        gets.trim_end().ends_with(&format!("If-Match: {etag}")),
        "{gets}"
    );
    // After it finished, a new request is a new GET.
    f.fetch(1).unwrap();
    assert_eq!(f.counters().snapshot().gets, 2);
}

#[test]
fn http_outage_fails_within_the_timeout_then_the_same_fetch_works() {
    let (dir, data) = Dir::new("outage");
    let port = free_port();
    let srv = range_server(&dir.0, port, &RangeOpts::default());
    let timeout = Duration::from_secs(2);
    let p = Params {
        fetch_timeout: timeout,
        ..params()
    };
    let f = open_http(port, p);
    f.fetch(0).unwrap();
    srv.stop();

    let t = Instant::now();
    let e = f.fetch(2).unwrap_err();
    let took = t.elapsed();
    eprintln!("ublk-cow: {e}");
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(e.to_string().contains("timed out after 2s (last: "), "{e}");
    assert!(
        took >= timeout - Duration::from_millis(100) && took < timeout + Duration::from_secs(1),
        "failed after {took:?}"
    );
    let c = f.counters().snapshot();
    assert!(c.retries >= 3, "{c:?}");
    assert_eq!(c.failures, 1);

    let _srv = range_server(&dir.0, port, &RangeOpts::default());
    let got = f.fetch(2).unwrap();
    assert!(got[..] == data[2 * UNIT as usize..3 * UNIT as usize]);
}

#[test]
fn http_prefetch_keeps_at_most_its_depth_in_flight() {
    let (dir, data) = Dir::new("prefetch");
    let opts = RangeOpts {
        delay: Some(0.2),
        ..RangeOpts::default()
    };
    let srv = range_server(&dir.0, free_port(), &opts);
    // One unit per GET, to count GETs in flight.
    let p = Params {
        fetch_size: 16 << 10,
        prefetch_depth: 2,
        prefetch_get_max: 16 << 10,
        ..params()
    };
    let f = open_http(srv.port, p);
    let units = f.units();
    assert_eq!(units, SIZE.div_ceil(16 << 10));
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let t = Instant::now();
    f.prefetch(
        0..units,
        Arc::new(move |u, r| tx.lock().unwrap().send((u, r)).unwrap()),
    );
    // prefetch returned at once.
    assert!(t.elapsed() < Duration::from_millis(150));
    let mut seen = vec![false; units as usize];
    for _ in 0..units {
        let (u, r) = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        let range = f.unit_range(u);
        assert!(r.unwrap()[..] == data[range.start as usize..range.end as usize]);
        seen[u as usize] = true;
    }
    assert!(seen.iter().all(|s| *s));
    let c = f.counters().snapshot();
    assert_eq!(c.gets, units);
    assert_eq!(c.in_flight_max, 2, "{c:?}");
}

#[test]
fn http_prefetch_fetches_consecutive_units_in_one_get_and_joins_those_in_flight() {
    let (dir, data) = Dir::new("coalesce");
    let log = dir.0.join("gets.log");
    let opts = RangeOpts {
        delay: Some(0.3),
        log: Some(log.clone()),
        ..RangeOpts::default()
    };
    let srv = range_server(&dir.0, free_port(), &opts);
    // Units of 16 KiB, at most 3 of them in one GET; a GET for each of the
    // 5 runs at once. With fewer, a run waits for another's GET to end
    // (0.3 s), and the run of unit 4, if it is the one that waits (the runs
    // take their turns in no set order), finds unit 4 no longer in flight.
    let p = Params {
        fetch_size: 16 << 10,
        prefetch_get_max: 3 * (16 << 10),
        prefetch_depth: 5,
        ..params()
    };
    let f = open_http(srv.port, p);
    let units = f.units();
    assert_eq!(units, 13);
    let before = logged_ranges(&log).len();
    // Unit 4 is in flight first: the prefetch joins it.
    let (tx1, rx1) = mpsc::channel();
    f.start(4, move |r| tx1.send(r).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    f.prefetch(
        0..units,
        Arc::new(move |u, r| tx.lock().unwrap().send((u, r)).unwrap()),
    );
    let mut seen = vec![0; units as usize];
    for _ in 0..units {
        let (u, r) = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        let range = f.unit_range(u);
        assert!(r.unwrap()[..] == data[range.start as usize..range.end as usize]);
        seen[u as usize] += 1;
    }
    assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
    let unit4 = rx1.recv_timeout(Duration::from_secs(20)).unwrap().unwrap();
    assert!(unit4[..] == data[4 * (16 << 10)..5 * (16 << 10)]);
    // Runs of 3 units: 0-2, then 3 (4 is in flight), 5 (its run was 3-5),
    // 6-8, 9-11, 12 (the last, short): every byte asked for once.
    let u = |a: u64, b: u64| a * (16 << 10)..(b * (16 << 10)).min(SIZE);
    let mut got = logged_ranges(&log)[before..].to_vec();
    got.sort_by_key(|r| r.start);
    assert_eq!(
        got,
        vec![
            u(0, 3),
            u(3, 4),
            u(4, 5),
            u(5, 6),
            u(6, 9),
            u(9, 12),
            u(12, 13)
        ]
    );
}

#[test]
fn http_server_errors_are_retried_a_bounded_number_of_times() {
    let (dir, data) = Dir::new("retries");
    let p = Params {
        max_retries: 3,
        ..params()
    };
    // Two 503s, then the data: the fetch works after two retries.
    let opts = RangeOpts {
        fail: Some((2, 503)),
        pass: OPEN_GETS,
        ..RangeOpts::default()
    };
    let srv = range_server(&dir.0, free_port(), &opts);
    let f = open_http(srv.port, p.clone());
    assert!(f.fetch(0).unwrap()[..] == data[..UNIT as usize]);
    let c = f.counters().snapshot();
    assert_eq!((c.gets, c.retries, c.failures), (3, 2, 0), "{c:?}");
    drop(srv);

    // Always 503: the fourth failure ends the fetch, long before its deadline.
    let opts = RangeOpts {
        fail: Some((1000, 503)),
        pass: OPEN_GETS,
        ..RangeOpts::default()
    };
    let srv = range_server(&dir.0, free_port(), &opts);
    let f = open_http(srv.port, p.clone());
    let t = Instant::now();
    let e = f.fetch(1).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(matches!(e, Error::Failed { .. }), "{e:?}");
    assert!(e.to_string().contains("HTTP 503 (after 3 retries)"), "{e}");
    let c = f.counters().snapshot();
    assert_eq!((c.gets, c.retries, c.failures), (4, 3, 1), "{c:?}");
    drop(srv);

    // A 403 is not retried.
    let opts = RangeOpts {
        fail: Some((1000, 403)),
        pass: OPEN_GETS,
        ..RangeOpts::default()
    };
    let srv = range_server(&dir.0, free_port(), &opts);
    let f = open_http(srv.port, p);
    assert!(matches!(f.fetch(1), Err(Error::Denied { .. })));
    assert_eq!(f.counters().snapshot().gets, 1);
}
