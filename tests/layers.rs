//! Chains of overlays on the host: layers made and written with the engine's
//! synchronous executor (`engine::chain`: create, write, freeze), read back
//! through the chain, and the binary's `map`, `info` and `check` on them:
//! exact output, and for bad input one line, a non-zero exit and no file
//! changed.

#[path = "common/scratch.rs"]
mod scratch;
use scratch::{Scratch, s};
use std::path::{Path, PathBuf};
use ublk_cow::engine::cache::CacheMode;
use ublk_cow::engine::chain::{MAX_LAYERS, create_overlay, freeze, open_device};

const BS: u64 = 4096;
const BLOCKS: u64 = 16;
/// Where an overlay's data area starts (1 MiB aligned, after a one-page map).
const DATA: u64 = 1 << 20;

/// Block `b` as written by `seed`.
fn block(seed: u8, b: u64) -> Vec<u8> {
    (0..BS)
        .map(|i| seed.wrapping_mul(31).wrapping_add((b * 7 + i / 512) as u8) | 1)
        .collect()
}

/// The chain of every test: base (16 blocks) ← l1 ← l2 (frozen) ← top
/// (live, clean). What each holds, and what each block reads as through the
/// top (`want`):
///
/// | block | l1            | l2                 | top                   |
/// |-------|---------------|--------------------|-----------------------|
/// | 1     | written (a)   |                    | copied (from l1)      |
/// | 2     | zero          | copied (zeros)     |                       |
/// | 3     | copied (base) | copied (base)      |                       |
/// | 4     |               | written (b)        |                       |
/// | 5     |               | half written (b)   |                       |
/// | 6     |               |                    | written (c)           |
/// | 7     |               |                    | zero                  |
/// | 8     |               |                    | copied (base)         |
/// | 9     |               |                    | copied, then half written (c) |
struct Chain {
    base: PathBuf,
    l1: PathBuf,
    l2: PathBuf,
    top: PathBuf,
    want: Vec<u8>,
}

fn build(sc: &Scratch) -> Chain {
    let base = sc.path("base.img");
    let mut want: Vec<u8> = (0..BLOCKS).flat_map(|b| block(0, b)).collect();
    std::fs::write(&base, &want).unwrap();
    let at = |b: u64| b * BS;
    let (l1, l2, top) = (sc.path("l1"), sc.path("l2"), sc.path("top"));

    create_overlay(&l1, &base, Some(BS as u32)).unwrap();
    let dev = open_device(&l1).unwrap();
    dev.write(at(1), &block(0xa, 1)).unwrap();
    want[at(1) as usize..at(2) as usize].copy_from_slice(&block(0xa, 1));
    dev.write_zeroes(at(2), BS).unwrap();
    want[at(2) as usize..at(3) as usize].fill(0);
    dev.cache(at(3), BS, CacheMode::Cow).unwrap();
    dev.close().unwrap();
    freeze(&l1).unwrap();

    create_overlay(&l2, &l1, None).unwrap();
    let dev = open_device(&l2).unwrap();
    dev.cache(at(2), 2 * BS, CacheMode::Cow).unwrap();
    dev.write(at(4), &block(0xb, 4)).unwrap();
    want[at(4) as usize..at(5) as usize].copy_from_slice(&block(0xb, 4));
    dev.write(at(5) + 1024, &block(0xb, 5)[..2048]).unwrap();
    want[at(5) as usize + 1024..at(5) as usize + 3072].copy_from_slice(&block(0xb, 5)[..2048]);
    dev.close().unwrap();
    freeze(&l2).unwrap();

    create_overlay(&top, &l2, None).unwrap();
    let dev = open_device(&top).unwrap();
    dev.write(at(6), &block(0xc, 6)).unwrap();
    want[at(6) as usize..at(7) as usize].copy_from_slice(&block(0xc, 6));
    dev.write_zeroes(at(7), BS).unwrap();
    want[at(7) as usize..at(8) as usize].fill(0);
    let copied = dev.cache(at(8), 2 * BS, CacheMode::Cow).unwrap().copied;
    assert_eq!(copied, 2 * BS);
    dev.cache(at(1), BS, CacheMode::Cow).unwrap();
    dev.write(at(9) + 512, &block(0xc, 9)[..512]).unwrap();
    want[at(9) as usize + 512..at(9) as usize + 1024].copy_from_slice(&block(0xc, 9)[..512]);
    dev.close().unwrap();
    Chain {
        base,
        l1,
        l2,
        top,
        want,
    }
}

/// What a new overlay over the layer `layer` reads, the whole disk.
fn read_all_frozen(sc: &Scratch, layer: &Path) -> Vec<u8> {
    let top = sc.path("reader");
    create_overlay(&top, layer, None).unwrap();
    let got = read_all(&top);
    std::fs::remove_file(&top).unwrap();
    got
}

/// What the device over `top` reads, the whole disk.
fn read_all(top: &Path) -> Vec<u8> {
    let dev = open_device(top).unwrap();
    let mut got = vec![0u8; (BLOCKS * BS) as usize];
    dev.read(0, &mut got).unwrap();
    dev.close().unwrap();
    got
}

#[test]
fn a_chain_reads_as_its_layers_and_maps_exactly() {
    let sc = Scratch::new("layers", "map");
    let c = build(&sc);
    assert!(read_all(&c.top) == c.want, "the chain reads wrong");
    let ext = |start: u64, len: u64, depth: u32, what: &str| {
        let body = match what {
            "zero" => r#""present":true,"zero":true,"data":false"#.to_string(),
            _ => format!(
                r#""present":true,"zero":false,"data":true,"offset":{}"#,
                what.parse::<u64>().unwrap()
            ),
        };
        format!(
            r#"{{"start":{},"length":{},"depth":{depth},{body}}}"#,
            start * BS,
            len * BS
        )
    };
    let off = |b: u64| (DATA + b * BS).to_string();
    let raw = |b: u64| (b * BS).to_string();
    let lines = [
        ext(0, 1, 3, &raw(0)),
        ext(1, 1, 2, &off(1)),
        ext(2, 1, 2, "zero"),
        ext(3, 1, 3, &raw(3)),
        ext(4, 2, 1, &off(4)),
        ext(6, 1, 0, &off(6)),
        ext(7, 1, 0, "zero"),
        ext(8, 1, 3, &raw(8)),
        ext(9, 1, 0, &off(9)),
        ext(10, 6, 3, &raw(10)),
    ];
    let want = format!("[\n{}\n]\n", lines.join(",\n"));
    assert_eq!(sc.ok_unchanged(&["map", s(&c.top), "--json"]), want);
    // A layer maps from its own depth.
    let l2 = sc.ok_unchanged(&["map", s(&c.l2), "--json"]);
    let want_l2 = [
        ext(0, 1, 2, &raw(0)),
        ext(1, 1, 1, &off(1)),
        ext(2, 1, 1, "zero"),
        ext(3, 1, 2, &raw(3)),
        ext(4, 2, 0, &off(4)),
        ext(6, 10, 2, &raw(6)),
    ];
    assert_eq!(l2, format!("[\n{}\n]\n", want_l2.join(",\n")));
    // The table: a header line and one line per extent, naming the file.
    let table = sc.ok_unchanged(&["map", s(&c.top)]);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 1 + lines.len(), "{table}");
    assert!(rows[0].starts_with("START"), "{table}");
    assert!(
        rows[5].contains("0x4000") && rows[5].contains("0x2000") && rows[5].ends_with(s(&c.l2)),
        "{table}"
    );
    assert!(
        rows[3].contains("zero") && rows[3].ends_with(s(&c.l1)),
        "{table}"
    );
    assert!(rows[10].ends_with(s(&c.base)), "{table}");
}

#[test]
fn info_shows_each_layer_and_the_chain() {
    let sc = Scratch::new("layers", "info");
    let c = build(&sc);
    let v: serde_json::Value =
        serde_json::from_str(&sc.ok_unchanged(&["info", s(&c.top), "--json"])).unwrap();
    assert_eq!(v["filename"], s(&c.top));
    assert_eq!(v["format"], "overlay");
    assert_eq!(v["format_version"], 2);
    assert_eq!(v["virtual_size"], BLOCKS * BS);
    assert_eq!(v["block_size"], BS);
    assert_eq!(v["backing"], s(&c.l2));
    assert_eq!(v["backing_kind"], "overlay");
    assert_eq!(v["blocks_written"], 2);
    assert_eq!(v["blocks_copied"], 2);
    assert_eq!(v["blocks_zero"], 1);
    assert_eq!(v["clean"], true);
    assert_eq!(v["frozen"], false);
    assert_eq!(v["failed"], false);
    assert!(v["allocated_bytes"].as_u64().unwrap() >= 4 * BS);
    let v: serde_json::Value =
        serde_json::from_str(&sc.ok_unchanged(&["info", s(&c.top), "--json", "--backing-chain"]))
            .unwrap();
    let chain = v.as_array().unwrap();
    let names: Vec<_> = chain.iter().map(|e| e["filename"].clone()).collect();
    assert_eq!(names, [s(&c.top), s(&c.l2), s(&c.l1), s(&c.base)]);
    let frozen: Vec<_> = chain.iter().map(|e| e["frozen"].clone()).collect();
    assert_eq!(
        frozen,
        [
            false.into(),
            true.into(),
            true.into(),
            serde_json::Value::Null
        ]
    );
    assert_eq!(chain[2]["backing_kind"], "file");
    assert_eq!(chain[2]["blocks_written"], 1);
    assert_eq!(chain[2]["blocks_copied"], 1);
    assert_eq!(chain[1]["blocks_written"], 2);
    assert_eq!(chain[1]["blocks_copied"], 2);
    assert_eq!(chain[3]["format"], "raw");
    assert_eq!(chain[3]["kind"], "file");
    let text = sc.ok_unchanged(&["info", s(&c.l1)]);
    for want in [
        "format:        overlay, version 2",
        &format!("backing:       {} (file)", s(&c.base)),
        "blocks held:   1 written, 1 copied, 1 zero",
        "state:         frozen (a layer), clean: yes",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    let text = sc.ok_unchanged(&["info", s(&c.top), "--backing-chain"]);
    assert_eq!(text.matches("file:").count(), 4, "{text}");
    assert!(text.contains("format:        raw (file)"), "{text}");
    assert!(!text.contains("in use by"), "{text}");
    // A device's state file names the top: info says so.
    let run = sc.path("run");
    std::fs::create_dir(&run).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    let state = serde_json::json!({
        "id": 7, "pid": 1, "device": "/dev/ublkb7", "base": s(&c.l2),
        "overlay": s(&c.top), "temporary_overlay": false, "block_size": BS,
        "size": BLOCKS * BS, "queues": 1, "depth": 1, "read_only": false,
        "recovered_unclean": false,
    });
    std::fs::write(run.join("7.json"), state.to_string()).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&sc.ok_unchanged(&["info", s(&c.top), "--json"])).unwrap();
    assert_eq!(v["in_use_by"], 7);
    assert!(
        sc.ok_unchanged(&["info", s(&c.top)])
            .contains("in use by:     /dev/ublkb7")
    );
    let v: serde_json::Value =
        serde_json::from_str(&sc.ok_unchanged(&["info", s(&c.l1), "--json"])).unwrap();
    assert_eq!(v["in_use_by"], serde_json::Value::Null);
}

#[test]
fn check_passes_a_sound_chain_and_names_each_problem() {
    let sc = Scratch::new("layers", "check");
    let c = build(&sc);
    for f in [&c.top, &c.l2, &c.l1] {
        assert_eq!(
            sc.ok_unchanged(&["check", s(f)]),
            format!("{}: no problems found\n", s(f))
        );
    }
    let problems = |f: &Path, want: &[&str]| {
        let before = sc.files();
        let out = sc.run(&["check", s(f)]);
        assert_eq!(out.status.code(), Some(1));
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text.lines().count(), want.len(), "{text}");
        for (line, w) in text.lines().zip(want) {
            assert!(
                line.starts_with(&format!("{}: ", s(f))) && line.contains(w),
                "{text}"
            );
        }
        assert!(sc.files() == before, "check changed a file");
    };
    // A damaged header.
    let bytes = std::fs::read(&c.top).unwrap();
    let bad = sc.path("bad-header");
    let mut b = bytes.clone();
    b[100] ^= 0x40;
    std::fs::write(&bad, &b).unwrap();
    problems(&bad, &["header: overlay header checksum mismatch"]);
    sc.refused(&["map", s(&bad)], "checksum mismatch");
    // A data area cut short: 3 of the blocks the top holds (6, 8, 9) lie
    // past the end, block 1 does not.
    let cut = sc.path("cut");
    std::fs::write(&cut, &bytes[..(DATA + 2 * BS) as usize]).unwrap();
    problems(
        &cut,
        &[
            "data area: the file is truncated (1056768 bytes, its data area ends at \
           1114112); 3 of the blocks its map holds lie past the end",
        ],
    );
    // Bits past the map's last block, under a valid checksum.
    let bits = sc.path("bits");
    let mut b = bytes.clone();
    b[4096 + 100] = 1;
    std::fs::write(&bits, &b).unwrap();
    problems(
        &bits,
        &["map: bits are set past its last block (map byte 100)"],
    );
    // A changed lower layer: its data rewritten (mtime moves) under l2.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&c.l1).unwrap();
        f.write_all_at(&[0x55; 512], DATA + BS).unwrap();
    }
    let want = format!(
        "layer {} (depth 1): its backing {} changed since it was made: its contents differ",
        s(&c.l2),
        s(&c.l1)
    );
    problems(&c.top, &[&format!("backing: {want}")]);
    sc.refused(&["map", s(&c.top), "--json"], &want);
    sc.refused(&["info", s(&c.top), "--backing-chain"], &want);
    // l1 itself is sound as a file: its base did not change.
    sc.ok_unchanged(&["check", s(&c.l1)]);
}

#[test]
fn a_cycle_and_a_missing_layer_are_one_line_each() {
    let sc = Scratch::new("layers", "cycle");
    let c = build(&sc);
    // z over l2, frozen, then put in l1's place: l1 (z) has l2 below it,
    // whose backing is l1.
    let z = sc.path("z");
    create_overlay(&z, &c.l2, None).unwrap();
    freeze(&z).unwrap();
    std::fs::rename(&z, &c.l1).unwrap();
    let want = format!(
        "the chain has a cycle: layer {} (depth 3) is layer {} (depth 1) again",
        s(&c.l2),
        s(&c.l2)
    );
    sc.refused(&["map", s(&c.top)], &want);
    let out = sc.run(&["check", s(&c.top)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}: backing: {want}\n", s(&c.top))
    );
    // A lower layer gone.
    std::fs::remove_file(&c.l1).unwrap();
    sc.refused(
        &["map", s(&c.top)],
        &format!("layer {} (depth 2) does not exist", s(&c.l1)),
    );
    // Not an overlay, or nothing at all: map, info and check refuse.
    for cmd in ["map", "info", "check"] {
        sc.refused(&[cmd, s(&c.base)], "is not a ublk-cow overlay");
        sc.refused(&[cmd, s(&sc.path("nothing"))], "does not exist");
    }
    // Neither a live overlay below another nor a frozen one on top.
    let live = sc.path("live");
    create_overlay(&live, &c.base, None).unwrap();
    let e = create_overlay(&sc.path("above"), &live, None).unwrap_err();
    assert!(e.to_string().contains("is a live overlay"), "{e}");
    assert!(!sc.path("above").exists());
    freeze(&live).unwrap();
    let e = open_device(&live).err().unwrap();
    assert!(e.to_string().contains("frozen"), "{e}");
    let e = create_overlay(&live, &c.base, None).unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");
}

#[test]
fn twenty_layers_deep_read_and_map_and_the_depth_is_capped() {
    let sc = Scratch::new("layers", "deep");
    let base = sc.path("base.img");
    let mut want: Vec<u8> = (0..BLOCKS).flat_map(|b| block(0, b)).collect();
    std::fs::write(&base, &want).unwrap();
    let mut below = base.clone();
    let mut last_writer = vec![None; BLOCKS as usize];
    let layers = 20;
    for i in 0..layers {
        let p = sc.path(&format!("layer{i:02}"));
        create_overlay(&p, &below, Some(BS as u32)).unwrap();
        let dev = open_device(&p).unwrap();
        let b = (i * 5 % BLOCKS as usize) as u64;
        let data = block(i as u8 + 1, b);
        dev.write(b * BS, &data).unwrap();
        want[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&data);
        last_writer[b as usize] = Some(i);
        dev.close().unwrap();
        if i + 1 < layers {
            freeze(&p).unwrap();
        }
        below = p;
    }
    assert!(read_all(&below) == want, "20 layers read wrong");
    let map: serde_json::Value =
        serde_json::from_str(&sc.ok_unchanged(&["map", s(&below), "--json"])).unwrap();
    for e in map.as_array().unwrap() {
        let first = e["start"].as_u64().unwrap() / BS;
        let depth = e["depth"].as_u64().unwrap() as usize;
        let expect = match last_writer[first as usize] {
            Some(i) => layers - 1 - i,
            None => layers,
        };
        assert_eq!(depth, expect, "{e}");
    }
    // Up to 64 overlays in a chain: 44 more fit, the 65th is refused.
    freeze(&below).unwrap();
    for i in layers..MAX_LAYERS {
        let p = sc.path(&format!("layer{i:02}"));
        create_overlay(&p, &below, None).unwrap();
        if i + 1 < MAX_LAYERS {
            freeze(&p).unwrap();
        }
        below = p;
    }
    assert!(read_all(&below) == want, "64 layers read wrong");
    freeze(&below).unwrap();
    let e = create_overlay(&sc.path("one-too-many"), &below, None).unwrap_err();
    assert!(e.to_string().contains("no more fit"), "{e}");
}

/// An overlay as format version 1 wrote it (no backing recorded) of 16
/// blocks: block 0 written, block 1 zero.
fn v1_overlay() -> Vec<u8> {
    let fnv = |bytes: &[u8]| {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
        })
    };
    let mut b = Vec::new();
    b.extend_from_slice(b"UBLKCOW1");
    for v in [1u32, 1 /* clean */, BS as u32, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for v in [BLOCKS * BS, BLOCKS * BS, 5, 6, 4096, 4096, DATA] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    let sum = fnv(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    b.resize((DATA + BLOCKS * BS) as usize, 0);
    b[4096] = 0b10_01;
    b
}

#[test]
fn a_version_1_overlay_is_shown_mapped_and_checked() {
    let sc = Scratch::new("layers", "v1");
    let p = sc.path("old.overlay");
    std::fs::write(&p, v1_overlay()).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&sc.ok_unchanged(&["info", s(&p), "--json"])).unwrap();
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["backing_kind"], "unrecorded");
    assert_eq!(v["backing"], serde_json::Value::Null);
    assert_eq!(v["blocks_written"], 1);
    assert_eq!(v["blocks_zero"], 1);
    assert_eq!(v["clean"], true);
    assert!(
        sc.ok_unchanged(&["info", s(&p)])
            .contains("backing:       not recorded")
    );
    let want = format!(
        "[\n{},\n{},\n{}\n]\n",
        format_args!(
            r#"{{"start":0,"length":4096,"depth":0,"present":true,"zero":false,"data":true,"offset":{DATA}}}"#
        ),
        r#"{"start":4096,"length":4096,"depth":0,"present":true,"zero":true,"data":false}"#,
        format_args!(
            r#"{{"start":8192,"length":{},"depth":1,"present":true,"zero":false,"data":true,"offset":8192}}"#,
            (BLOCKS - 2) * BS
        )
    );
    assert_eq!(sc.ok_unchanged(&["map", s(&p), "--json"]), want);
    assert_eq!(
        sc.ok_unchanged(&["check", s(&p)]),
        format!("{}: no problems found\n", s(&p))
    );
    // A copied state in a version 1 map is a problem.
    let mut bad = v1_overlay();
    bad[4096] = 0b11_01;
    std::fs::write(&p, bad).unwrap();
    let out = sc.run(&["check", s(&p)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!(
            "{}: map: 1 blocks have a state format version 1 does not have\n",
            s(&p)
        )
    );
}

#[test]
fn snapshot_freezes_and_stacks_a_new_overlay_and_refuses_bad_input() {
    let sc = Scratch::new("layers", "snapshot");
    let c = build(&sc);
    let new = sc.path("new");
    sc.refused(
        &["snapshot", s(&c.top), "--overlay", s(&c.l2)],
        "exists: a snapshot's new overlay is a new file",
    );
    sc.refused(
        &["snapshot", s(&c.base), "--overlay", s(&new)],
        "is not a ublk-cow overlay",
    );
    sc.refused(
        &["snapshot", s(&c.top), "--overlay", "/nonexistent/dir/new"],
        "its directory does not exist",
    );
    // An overlay not closed cleanly (its device still open) is not frozen.
    let dev = open_device(&c.top).unwrap();
    drop(dev);
    sc.refused(
        &["snapshot", s(&c.top), "--overlay", s(&new)],
        "not closed cleanly",
    );
    // Clean again, then snapshot: the top is a layer, the new overlay
    // reads as it did and takes the writes.
    open_device(&c.top).unwrap().close().unwrap();
    let out = sc.run(&["snapshot", s(&c.top), "--overlay", s(&new)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = create_overlay(&sc.path("x"), &c.top, None);
    assert!(err.is_ok(), "the snapshot did not freeze the top: {err:?}");
    assert_eq!(read_all(&new), c.want);
    let dev = open_device(&new).unwrap();
    dev.write(0, &block(0xd, 0)).unwrap();
    dev.close().unwrap();
    let mut want = c.want.clone();
    want[..BS as usize].copy_from_slice(&block(0xd, 0));
    assert_eq!(read_all(&new), want);
    // The frozen top is no device's overlay any more.
    assert!(open_device(&c.top).is_err(), "a layer opened for writing");
    // Without --overlay: only frozen, nothing made beside it; a layer stays
    // one, and the command says so again.
    let only = sc.path("only");
    create_overlay(&only, &c.top, None).unwrap();
    let said = sc.ok(&["snapshot", s(&only)]);
    assert_eq!(said.trim(), format!("{}: frozen", s(&only)));
    assert!(
        open_device(&only).is_err(),
        "snapshot without --overlay did not freeze"
    );
    assert_eq!(read_all_frozen(&sc, &only), c.want);
    sc.ok(&["snapshot", s(&only)]);
}
