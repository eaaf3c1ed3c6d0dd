//! `ublk-cow push` against `moto_server` on 127.0.0.1: a stack of two
//! layers pushed bottom-up over a raw image in the bucket reads, through
//! the fetcher, exactly as the local stack does, and its objects hold only
//! the layers' blocks; a backing replaced after the push is refused; and
//! bad pushes are one line, a non-zero exit, and no object.

mod common;
#[path = "common/scratch.rs"]
mod scratch;
#[path = "remote/servers.rs"]
mod servers;

use object_store::ObjectStoreExt;
use object_store::path::Path as StorePath;
use scratch::{Scratch, s};
use servers::{Moto, moto};
use std::path::Path;
use std::process::Output;
use ublk_cow::engine::cache::CacheMode;
use ublk_cow::engine::chain::{create_overlay, freeze, open_device};
use ublk_cow::remote::{AwsEnv, Error, Fetcher, Params, RemoteUrl};

const BS: u64 = 4096;
const MIB: u64 = 1 << 20;
/// The virtual disk: 16 MiB.
const SIZE: u64 = 16 * MIB;
const UNIT: u64 = 256 << 10;

fn put(m: &Moto, key: &str, data: Vec<u8>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(m.store().put(&StorePath::from(key), data.into()))
        .unwrap();
}

/// The object's length, or `None` if there is none.
fn length(m: &Moto, key: &str) -> Option<u64> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(m.store().head(&StorePath::from(key)))
        .ok()
        .map(|meta| meta.size)
}

fn env(m: &Moto) -> AwsEnv {
    AwsEnv::from_pairs([
        ("AWS_ACCESS_KEY_ID", m.key_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", m.secret.as_str()),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", m.endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ])
}

fn url(m: &Moto, key: &str) -> String {
    format!("s3://{}/{key}", m.bucket)
}

/// Runs the binary with the moto user's AWS settings.
fn run(sc: &Scratch, m: &Moto, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ublk-cow"))
        .env("UBLK_COW_RUN_DIR", sc.path("run"))
        .envs(env(m).vars)
        .args(args)
        .output()
        .unwrap()
}

fn pushed(sc: &Scratch, m: &Moto, layer: &Path, key: &str, backing: &str) -> String {
    let out = run(
        sc,
        m,
        &[
            "push",
            s(layer),
            &url(m, key),
            "--backing",
            &url(m, backing),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "push {key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A refused push: one line naming `want`, a non-zero exit, and (for a
/// `key` the push could make) no object at `key`.
fn refused(sc: &Scratch, m: &Moto, args: &[&str], key: Option<&str>, want: &str) {
    let out = run(sc, m, args);
    let err = String::from_utf8_lossy(&out.stderr);
    eprint!("{err}");
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.contains(want), "{args:?}: {err} (want {want:?})");
    if let Some(key) = key {
        assert_eq!(length(m, key), None, "{args:?} left an object at {key}");
    }
}

/// What a new overlay over `layer` reads, the whole disk.
fn reads_as(sc: &Scratch, layer: &Path) -> Vec<u8> {
    let top = sc.path("reader");
    create_overlay(&top, layer, None).unwrap();
    let dev = open_device(&top).unwrap();
    let mut got = vec![0u8; SIZE as usize];
    dev.read(0, &mut got).unwrap();
    dev.close().unwrap();
    std::fs::remove_file(&top).unwrap();
    got
}

/// The local stack: base ← l1 ← l2, both frozen; returns the paths and
/// the bytes the stack reads.
///
/// l1 holds 10 MiB written at 1 MiB (more than one part of the upload),
/// 256 KiB zeroed at 12 MiB, 64 KiB copied at 14 MiB (not pushed) and half
/// a block written at 15 MiB; l2 writes over part of l1's data, zeroes some
/// of it, and copies some of l1's zeros and data.
fn stack(sc: &Scratch, base_bytes: &[u8]) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let base = sc.path("base.img");
    std::fs::write(&base, base_bytes).unwrap();
    let (l1, l2) = (sc.path("l1"), sc.path("l2"));
    create_overlay(&l1, &base, Some(BS as u32)).unwrap();
    let dev = open_device(&l1).unwrap();
    dev.write(MIB, &common::noise(10 * MIB, 11)).unwrap();
    dev.write_zeroes(12 * MIB, 256 << 10).unwrap();
    dev.cache(14 * MIB, 64 << 10, CacheMode::Cow).unwrap();
    dev.write(15 * MIB + 512, &common::noise(2048, 12)).unwrap();
    dev.close().unwrap();
    freeze(&l1).unwrap();
    create_overlay(&l2, &l1, None).unwrap();
    let dev = open_device(&l2).unwrap();
    dev.write(2 * MIB + 8192, &common::noise(MIB, 21)).unwrap();
    dev.write_zeroes(5 * MIB, 128 << 10).unwrap();
    dev.cache(12 * MIB - 8192, 32 << 10, CacheMode::Cow)
        .unwrap();
    dev.write(13 * MIB + 100 * 512, &common::noise(512, 22))
        .unwrap();
    dev.close().unwrap();
    freeze(&l2).unwrap();
    let want = reads_as(sc, &l2);
    (l1, l2, want)
}

/// The whole virtual disk through a fetcher of `key`.
fn read_remote(m: &Moto, key: &str) -> Vec<u8> {
    let params = Params {
        fetch_size: UNIT,
        ..Params::default()
    };
    let f = Fetcher::open(
        &RemoteUrl::parse(&url(m, key)).unwrap(),
        &env(m),
        params,
        BS as u32,
    )
    .unwrap();
    assert_eq!(f.size(), SIZE);
    (0..f.units())
        .flat_map(|u| f.fetch(u).unwrap().to_vec())
        .collect()
}

#[test]
fn a_pushed_stack_reads_as_the_local_one() {
    let m = moto("push");
    let sc = Scratch::new("push", "stack");
    let base_bytes = common::noise(SIZE, 1);
    put(&m, "base.img", base_bytes.clone());
    let (l1, l2, want) = stack(&sc, &base_bytes);

    let said = pushed(&sc, &m, &l1, "l1.cow", "base.img");
    assert!(
        said.contains("pushed to") && said.contains("base.img"),
        "{said}"
    );
    pushed(&sc, &m, &l2, "l2.cow", "l1.cow");
    // Only held blocks travel: l1 holds 10 MiB and a block of data.
    let l1_len = length(&m, "l1.cow").unwrap();
    assert!(
        (10 * MIB + BS..10 * MIB + BS + 16384).contains(&l1_len),
        "l1.cow is {l1_len} bytes"
    );
    assert!(length(&m, "l2.cow").unwrap() < 2 * MIB);

    let got = read_remote(&m, "l2.cow");
    assert!(
        got == want,
        "the pushed stack reads other bytes than the local one"
    );
    // The lower push alone reads as l1 does.
    assert!(
        read_remote(&m, "l1.cow") == reads_as(&sc, &l1),
        "l1.cow reads wrong"
    );

    // A backing replaced after the push: the stack is refused at open.
    put(&m, "base.img", common::noise(SIZE, 2));
    let e = match Fetcher::open(
        &RemoteUrl::parse(&url(&m, "l2.cow")).unwrap(),
        &env(&m),
        Params::default(),
        BS as u32,
    ) {
        Ok(_) => panic!("a stack over a replaced base opened"),
        Err(e) => e,
    };
    eprintln!("ublk-cow: {e}");
    assert!(matches!(e, Error::Changed { .. }), "{e:?}");
    assert!(e.to_string().contains("base.img"), "{e}");
}

#[test]
fn bad_pushes_are_one_line_and_upload_nothing() {
    let m = moto("pushbad");
    let sc = Scratch::new("push", "bad");
    let base_bytes = common::noise(SIZE, 3);
    put(&m, "base.img", base_bytes.clone());
    // Same size, other bytes.
    put(&m, "other.img", common::noise(SIZE, 4));
    put(&m, "short.img", common::noise(SIZE - MIB, 3));
    let (l1, l2, _) = stack(&sc, &base_bytes);
    let live = sc.path("live");
    create_overlay(&live, &l2, None).unwrap();
    let (l1s, l2s, lives) = (s(&l1), s(&l2), s(&live));
    let u = |k: &str| url(&m, k);

    let x = Some("x");
    refused(
        &sc,
        &m,
        &["push", lives, &u("x"), "--backing", &u("base.img")],
        x,
        "live overlay",
    );
    refused(&sc, &m, &["push", l1s, &u("x")], x, "--backing URL");
    refused(
        &sc,
        &m,
        &[
            "push",
            l1s,
            "http://127.0.0.1:1/x",
            "--backing",
            &u("base.img"),
        ],
        None,
        "s3:// URLs only",
    );
    refused(
        &sc,
        &m,
        &["push", l1s, &u("x"), "--backing", &u("other.img")],
        x,
        "contents differ",
    );
    refused(
        &sc,
        &m,
        &["push", l1s, &u("x"), "--backing", &u("short.img")],
        x,
        "virtual size",
    );
    refused(
        &sc,
        &m,
        &["push", l1s, &u("x"), "--backing", &u("nothing.img")],
        x,
        "no such object",
    );
    refused(
        &sc,
        &m,
        &["push", l1s, "s3://b/", "--backing", &u("base.img")],
        None,
        "s3://b/",
    );
    refused(
        &sc,
        &m,
        &["push", l1s, &u("base.img"), "--backing", &u("base.img")],
        None,
        "is read by",
    );
    // l2 over the raw image, l1 skipped.
    refused(
        &sc,
        &m,
        &["push", l2s, &u("x"), "--backing", &u("base.img")],
        x,
        "raw image where",
    );
    // A sparse layer that no sample of the base lands in, skipped: the
    // kinds tell, where the samples could not.
    let (s1, s2) = (sc.path("sparse1"), sc.path("sparse2"));
    create_overlay(&s1, &sc.path("base.img"), Some(BS as u32)).unwrap();
    let dev = open_device(&s1).unwrap();
    dev.write(3 * MIB + MIB / 2, &common::noise(64 << 10, 31))
        .unwrap();
    dev.close().unwrap();
    freeze(&s1).unwrap();
    create_overlay(&s2, &s1, None).unwrap();
    freeze(&s2).unwrap();
    refused(
        &sc,
        &m,
        &["push", s(&s2), &u("x"), "--backing", &u("base.img")],
        x,
        "raw image where",
    );
    // l2 over the push of another layer than l1, and l1 over pushed layers.
    pushed(&sc, &m, &s1, "sparse1.cow", "base.img");
    refused(
        &sc,
        &m,
        &["push", l2s, &u("x"), "--backing", &u("sparse1.cow")],
        x,
        "another layer",
    );
    refused(
        &sc,
        &m,
        &["push", l1s, &u("x"), "--backing", &u("sparse1.cow")],
        x,
        "pushed layers where",
    );
    let big = sc.path("big-blocks");
    create_overlay(&big, &sc.path("base.img"), Some(64 << 10)).unwrap();
    freeze(&big).unwrap();
    let bigs = s(&big);
    refused(
        &sc,
        &m,
        &["push", bigs, &u("x"), "--backing", &u("sparse1.cow")],
        x,
        "block size",
    );

    // A layer locked as a commit into it or of it locks it (exclusive):
    // the push waits, then gives up without uploading.
    let held = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&l1)
        .unwrap();
    held.lock().unwrap();
    refused(
        &sc,
        &m,
        &["push", l1s, &u("x"), "--backing", &u("base.img")],
        x,
        "in use (locked)",
    );
    held.unlock().unwrap();

    // An object at the URL stays unless --force, which replaces it.
    put(&m, "dest.cow", common::noise(8192, 5));
    let args = ["push", l1s, &u("dest.cow"), "--backing", &u("base.img")];
    refused(&sc, &m, &args, None, "exists");
    assert_eq!(length(&m, "dest.cow"), Some(8192));
    let forced: Vec<&str> = args.iter().copied().chain(["--force"]).collect();
    let out = run(&sc, &m, &forced);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        read_remote(&m, "dest.cow") == reads_as(&sc, &l1),
        "the replaced object reads wrong"
    );
}
