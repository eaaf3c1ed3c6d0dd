//! `ublk-cow commit` on the host: an overlay merged into a raw base and a
//! frozen layer merged into the one below it, read back through the chain;
//! and each refusal: one line, a non-zero exit, no file changed.

#[path = "common/scratch.rs"]
mod scratch;
use scratch::{Scratch, s};
use std::path::{Path, PathBuf};
use std::process::Command;
use ublk_cow::engine::cache::CacheMode;
use ublk_cow::engine::chain::{create_overlay, freeze, open_device};

const BS: u64 = 4096;
const BLOCKS: u64 = 64;

fn block(seed: u8, b: u64) -> Vec<u8> {
    (0..BS)
        .map(|i| seed.wrapping_mul(29).wrapping_add((b * 13 + i / 256) as u8) | 1)
        .collect()
}

/// Writes into the live overlay `top`: blocks written (a run of them, and
/// single ones, one half written), zeroed and copied up from below.
fn write(top: &Path, seed: u8) {
    let dev = open_device(top).unwrap();
    dev.write(0, &(0..4).flat_map(|b| block(seed, b)).collect::<Vec<_>>())
        .unwrap();
    dev.write(9 * BS + 512, &block(seed, 9)[..1024]).unwrap();
    dev.write(20 * BS, &block(seed, 20)).unwrap();
    dev.write_zeroes(30 * BS, 3 * BS).unwrap();
    dev.cache(40 * BS, 4 * BS, CacheMode::Cow).unwrap();
    dev.write(63 * BS, &block(seed, 63)).unwrap();
    dev.close().unwrap();
}

fn read_all(top: &Path) -> Vec<u8> {
    let dev = open_device(top).unwrap();
    let mut got = vec![0u8; (BLOCKS * BS) as usize];
    dev.read(0, &mut got).unwrap();
    dev.close().unwrap();
    got
}

fn base(sc: &Scratch) -> PathBuf {
    let p = sc.path("base.img");
    std::fs::write(
        &p,
        (0..BLOCKS).flat_map(|b| block(0, b)).collect::<Vec<_>>(),
    )
    .unwrap();
    p
}

#[test]
fn an_overlay_is_merged_into_its_raw_base_and_can_be_used_again() {
    let sc = Scratch::new("commit", "raw");
    let base = base(&sc);
    let top = sc.path("top");
    create_overlay(&top, &base, Some(BS as u32)).unwrap();
    write(&top, 7);
    let want = read_all(&top);
    let out = sc.ok(&["commit", s(&top)]);
    assert_eq!(
        out,
        format!(
            "{}: 7 blocks written and 3 made zero in its backing, 4 copied from below skipped\n",
            s(&top)
        )
    );
    assert!(
        std::fs::read(&base).unwrap() == want,
        "the base reads wrong"
    );
    // The overlay holds nothing, its record of the base matches, and it
    // reads the same.
    let info = sc.ok(&["info", "--json", s(&top)]);
    assert!(info.contains("\"blocks_written\": 0"), "{info}");
    assert!(info.contains("\"blocks_copied\": 0"), "{info}");
    assert!(info.contains("\"blocks_zero\": 0"), "{info}");
    assert_eq!(
        sc.ok(&["check", s(&top)]),
        format!("{}: no problems found\n", s(&top))
    );
    assert!(read_all(&top) == want);
    // Again: nothing to do.
    let out = sc.ok(&["commit", s(&top)]);
    assert!(out.contains("0 blocks written and 0 made zero"), "{out}");
    assert!(std::fs::read(&base).unwrap() == want);
}

#[test]
fn a_layer_is_merged_into_the_layer_below_and_the_overlays_above_still_read_the_same() {
    let sc = Scratch::new("commit", "layers");
    let base = base(&sc);
    let (l1, l2, top) = (sc.path("l1"), sc.path("l2"), sc.path("top"));
    create_overlay(&l1, &base, Some(BS as u32)).unwrap();
    write(&l1, 1);
    freeze(&l1).unwrap();
    create_overlay(&l2, &l1, None).unwrap();
    write(&l2, 2);
    let dev = open_device(&l2).unwrap();
    dev.write_zeroes(0, BS).unwrap();
    dev.close().unwrap();
    freeze(&l2).unwrap();
    create_overlay(&top, &l2, None).unwrap();
    let dev = open_device(&top).unwrap();
    dev.write(50 * BS, &block(3, 50)).unwrap();
    dev.close().unwrap();
    let want = read_all(&top);
    let l1_before = read_all_layer(&l1);
    let base_before = std::fs::read(&base).unwrap();
    let l2_mtime = std::fs::metadata(&l2).unwrap().modified().unwrap();

    sc.ok(&["commit", s(&l2)]);
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_before,
        "the base changed"
    );
    assert_eq!(
        std::fs::metadata(&l2).unwrap().modified().unwrap(),
        l2_mtime,
        "the committed layer's mtime is not restored"
    );
    assert!(
        read_all(&top) == want,
        "the top reads wrong after the commit"
    );
    assert_eq!(
        sc.ok(&["check", s(&top)]),
        format!("{}: no problems found\n", s(&top))
    );
    let map = sc.ok(&["map", "--json", s(&top)]);
    assert!(!map.contains("\"depth\":1"), "l2 still holds blocks: {map}");
    assert!(read_all_layer(&l1) != l1_before, "l1 did not change");

    // And l1 into the base: the whole chain now reads from the base.
    sc.ok(&["commit", s(&l1)]);
    assert!(read_all(&top) == want);
    let mut via_base = std::fs::read(&base).unwrap();
    via_base[50 * BS as usize..51 * BS as usize].copy_from_slice(&block(3, 50));
    assert!(via_base == want, "the base reads wrong");
    assert_eq!(
        sc.ok(&["check", s(&top)]),
        format!("{}: no problems found\n", s(&top))
    );
}

/// What a frozen layer reads as: an overlay made over it, read.
fn read_all_layer(layer: &Path) -> Vec<u8> {
    let p = layer.with_extension("probe");
    create_overlay(&p, layer, None).unwrap();
    let got = read_all(&p);
    std::fs::remove_file(&p).unwrap();
    got
}

#[test]
fn bad_input_is_refused_with_one_line_and_nothing_changed() {
    let sc = Scratch::new("commit", "refused");
    let base = base(&sc);
    let top = sc.path("top");
    create_overlay(&top, &base, Some(BS as u32)).unwrap();
    write(&top, 5);
    sc.refused(&["commit", s(&base)], "is not a ublk-cow overlay");
    sc.refused(&["commit", s(&sc.path("none"))], "does not exist");

    // In use: a device holds its overlay locked.
    let held = std::fs::File::open(&top).unwrap();
    held.lock().unwrap();
    sc.refused(&["commit", s(&top)], "in use");
    drop(held);
    // ... or its base, with a shared lock.
    let held = std::fs::File::open(&base).unwrap();
    held.lock_shared().unwrap();
    sc.refused(&["commit", s(&top)], "in use");
    drop(held);

    // Another overlay over the same base would read other data.
    let other = sc.path("other");
    create_overlay(&other, &base, Some(BS as u32)).unwrap();
    sc.refused(&["commit", s(&top)], "also has its backing");
    // A layer and an overlay over it: the base is below it too.
    std::fs::remove_file(&other).unwrap();
    let (l, over) = (sc.path("l"), sc.path("over"));
    create_overlay(&l, &base, Some(BS as u32)).unwrap();
    freeze(&l).unwrap();
    create_overlay(&over, &l, None).unwrap();
    sc.refused(&["commit", s(&top)], "also has its backing");
    std::fs::remove_file(&over).unwrap();
    std::fs::remove_file(&l).unwrap();

    // The base changed since the overlay was made.
    let mut b = std::fs::read(&base).unwrap();
    b[0] ^= 1;
    std::fs::write(&base, &b).unwrap();
    sc.refused(&["commit", s(&top)], "changed since it was made");
    b[0] ^= 1;
    std::fs::write(&base, &b).unwrap();
    sc.refused(&["commit", s(&top)], "modification time differs");
}

#[test]
fn force_commits_under_other_overlays() {
    let sc = Scratch::new("commit", "force");
    let base = base(&sc);
    let (top, other) = (sc.path("top"), sc.path("other"));
    create_overlay(&top, &base, Some(BS as u32)).unwrap();
    write(&top, 9);
    create_overlay(&other, &base, Some(BS as u32)).unwrap();
    let want = read_all(&top);
    sc.refused(&["commit", s(&top)], "--force commits anyway");
    sc.ok(&["commit", "--force", s(&top)]);
    assert!(std::fs::read(&base).unwrap() == want);
}

/// Writes the state file of device `id` naming `overlay` over `base`.
fn device_state(sc: &Scratch, id: u32, base: &Path, overlay: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let run = sc.path("run");
    let _ = std::fs::create_dir(&run);
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    let state = serde_json::json!({
        "id": id, "pid": std::process::id(), "device": format!("/dev/ublkb{id}"),
        "base": s(base), "overlay": s(overlay), "temporary_overlay": false,
        "block_size": BS, "size": BLOCKS * BS, "queues": 1, "depth": 1,
        "read_only": false, "recovered_unclean": false,
    });
    let p = run.join(format!("{id}.json"));
    std::fs::write(&p, state.to_string()).unwrap();
    p
}

#[test]
fn a_device_named_by_a_state_file_keeps_its_overlay_and_base_from_commit() {
    let sc = Scratch::new("commit", "state");
    let base = base(&sc);
    let (top, l, over) = (sc.path("top"), sc.path("l"), sc.path("over"));
    create_overlay(&top, &base, Some(BS as u32)).unwrap();
    write(&top, 4);
    let st = device_state(&sc, 7, &base, &top);
    sc.refused(&["commit", s(&top)], "in use by device 7");
    sc.refused(&["commit", "--force", s(&top)], "in use by device 7");
    std::fs::remove_file(&st).unwrap();
    // A device over a layer whose backing is the base: the base is in use.
    create_overlay(&l, &base, Some(BS as u32)).unwrap();
    freeze(&l).unwrap();
    create_overlay(&over, &l, None).unwrap();
    device_state(&sc, 3, &l, &over);
    sc.refused(&["commit", "--force", s(&top)], "is in use by device 3");
    sc.refused(&["commit", s(&l)], "is in use by device 3");
}

#[test]
fn map_of_a_device_reads_its_live_map_else_the_overlays() {
    let sc = Scratch::new("commit", "map-n");
    let base = base(&sc);
    let top = sc.path("top");
    create_overlay(&top, &base, Some(BS as u32)).unwrap();
    let dev = open_device(&top).unwrap();
    dev.write(2 * BS, &block(1, 2)).unwrap();
    dev.close().unwrap();
    device_state(&sc, 5, &base, &top);
    let data = 1u64 << 20;
    let ext = |start: u64, len: u64, depth: u32, off: u64| {
        format!(
            r#"{{"start":{},"length":{},"depth":{depth},"present":true,"zero":false,"data":true,"offset":{off}}}"#,
            start * BS,
            len * BS
        )
    };
    let on_disk = format!(
        "[\n{},\n{},\n{}\n]\n",
        ext(0, 2, 1, 0),
        ext(2, 1, 0, data + 2 * BS),
        ext(3, BLOCKS - 3, 1, 3 * BS)
    );
    assert_eq!(sc.ok(&["map", "-n", "5", "--json"]), on_disk);
    assert_eq!(sc.ok(&["map", "--number", "5", "--json"]), on_disk);
    assert_eq!(sc.ok(&["map", s(&top), "--json"]), on_disk);
    // The live map: block 5 written too, not yet in the overlay's map.
    let mut live = vec![0u8; 4096];
    live[0] = 0b01 << 4; // block 2
    live[1] = 0b01 << 2; // block 5
    std::fs::write(sc.path("run").join("5.map"), &live).unwrap();
    let want = format!(
        "[\n{},\n{},\n{},\n{},\n{}\n]\n",
        ext(0, 2, 1, 0),
        ext(2, 1, 0, data + 2 * BS),
        ext(3, 2, 1, 3 * BS),
        ext(5, 1, 0, data + 5 * BS),
        ext(6, BLOCKS - 6, 1, 6 * BS)
    );
    assert_eq!(sc.ok(&["map", "-n", "5", "--json"]), want);
    let table = sc.ok(&["map", "-n", "5"]);
    assert_eq!(table.lines().count(), 6, "{table}");
    // Bad input: no such device, a live map of the wrong size, both a
    // file and a device.
    sc.refused(&["map", "-n", "9"], "there is no ublk-cow device 9");
    std::fs::write(sc.path("run").join("5.map"), &live[..100]).unwrap();
    sc.refused(&["map", "-n", "5"], "the live map");
    // A usage error (status 2, as for every usage error).
    let out = sc.run(&["map", "-n", "5", s(&top)]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
}

/// The header flags a stopped commit leaves: on the overlay committed, and
/// on a layer below that it was writing into.
const COMMITTING: u32 = 8;
const RECEIVING: u32 = 16;

/// Sets the committing flag in the header of the overlay at `path`, as a
/// commit stopped after its first step leaves it.
fn mark_committing(path: &Path) {
    mark(path, COMMITTING);
}

/// Sets `flag` in the header of the overlay at `path`.
fn mark(path: &Path, flag: u32) {
    let mut bytes = std::fs::read(path).unwrap();
    let flags = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) | flag;
    bytes[12..16].copy_from_slice(&flags.to_le_bytes());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in &bytes[..4088] {
        h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
    }
    bytes[4088..4096].copy_from_slice(&h.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_stopped_commit_is_reported_refused_for_use_and_finished_by_running_it_again() {
    let sc = Scratch::new("commit", "stopped");
    let base = base(&sc);
    let top = sc.path("top");
    create_overlay(&top, &base, Some(BS as u32)).unwrap();
    write(&top, 6);
    let want = read_all(&top);
    // Stopped midway: the flag set, one block already copied below (the
    // base changed since the overlay recorded it).
    mark_committing(&top);
    let mut b = std::fs::read(&base).unwrap();
    b[20 * BS as usize..21 * BS as usize]
        .copy_from_slice(&want[20 * BS as usize..21 * BS as usize]);
    std::fs::write(&base, &b).unwrap();

    let out = sc.run(&["check", s(&top)]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("stopped midway"), "{text}");
    assert!(
        open_device(&top).is_err(),
        "a stopped commit's overlay opened"
    );
    sc.refused(&["map", s(&top)], "stopped midway");

    let out = sc.ok(&["commit", s(&top)]);
    assert!(
        out.contains("an earlier commit stopped midway is finished"),
        "{out}"
    );
    assert!(
        std::fs::read(&base).unwrap() == want,
        "the base reads wrong"
    );
    assert_eq!(
        sc.ok(&["check", s(&top)]),
        format!("{}: no problems found\n", s(&top))
    );
    assert!(read_all(&top) == want);
}

/// A commit of a layer stopped while it wrote into the layer below: that
/// layer (part old, part merged) is refused by every use until the commit
/// is run again, which takes it and finishes.
#[test]
fn a_layer_a_stopped_commit_was_writing_into_is_refused_until_it_is_run_again() {
    let sc = Scratch::new("commit", "receiving");
    let base = base(&sc);
    let (l1, l2) = (sc.path("l1"), sc.path("l2"));
    create_overlay(&l1, &base, Some(BS as u32)).unwrap();
    write(&l1, 1);
    freeze(&l1).unwrap();
    create_overlay(&l2, &l1, None).unwrap();
    write(&l2, 2);
    freeze(&l2).unwrap();
    let want = read_all_layer(&l2);
    mark(&l2, COMMITTING);
    mark(&l1, RECEIVING);

    let out = sc.run(&["check", s(&l1)]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("a commit of the overlay above it"), "{text}");
    sc.refused(&["map", s(&l1)], "stopped midway");
    sc.refused(&["commit", s(&l1)], "stopped midway");
    sc.refused(
        &["snapshot", s(&l1), "-o", s(&sc.path("fork"))],
        "stopped midway",
    );
    let e = create_overlay(&sc.path("fork"), &l1, None).unwrap_err();
    assert!(e.to_string().contains("stopped midway"), "{e}");
    assert!(!sc.path("fork").exists(), "an overlay was made over it");

    let out = sc.ok(&["commit", s(&l2)]);
    assert!(
        out.contains("an earlier commit stopped midway is finished"),
        "{out}"
    );
    assert_eq!(
        sc.ok(&["check", s(&l1)]),
        format!("{}: no problems found\n", s(&l1))
    );
    assert!(read_all_layer(&l1) == want, "the layer below reads wrong");
}

#[test]
fn a_fifo_beside_the_overlay_is_passed_over() {
    let sc = Scratch::new("commit", "fifo");
    let base = base(&sc);
    let top = sc.path("top");
    create_overlay(&top, &base, Some(BS as u32)).unwrap();
    write(&top, 3);
    let want = read_all(&top);
    let made = Command::new("mkfifo")
        .arg(sc.path("pipe"))
        .status()
        .unwrap();
    assert!(made.success());
    // Opening the FIFO would block: give the command a deadline.
    let mut child = Command::new(env!("CARGO_BIN_EXE_ublk-cow"))
        .env("UBLK_COW_RUN_DIR", sc.path("run"))
        .args(["commit", s(&top)])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("commit hangs on the FIFO beside the overlay");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(std::fs::read(&base).unwrap() == want);
}
