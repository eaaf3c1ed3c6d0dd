//! Bad input to the command line: each refusal gets one clear error line on
//! stderr, a non-zero exit, and no file is created or changed. One test per
//! refusal, each in a scratch directory of its own (tests run in parallel),
//! and the help texts.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use ublk_cow::engine::base::open_base;
use ublk_cow::engine::device::CowDevice;
use ublk_cow::engine::map::MapMemory;

/// Exit status of a usage error (clap's, one line).
const USAGE: i32 = 2;
/// Exit status of a refusal after parsing (`ublk-cow: ...`).
const REFUSED: i32 = 1;

/// A directory of one test, removed at the end; the daemon's run directory
/// (`UBLK_COW_RUN_DIR`) is inside it, so that a run directory made by
/// mistake shows as a change.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("ublk-cow-cli-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A file of `len` bytes made from `seed`.
    fn file(&self, name: &str, len: usize, seed: u8) -> PathBuf {
        let p = self.path(name);
        std::fs::write(
            &p,
            (0..len)
                .map(|i| (i as u8).wrapping_mul(seed))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        p
    }

    /// The base of most tests: 1 MiB.
    fn base(&self) -> PathBuf {
        self.file("base.img", 1 << 20, 7)
    }

    /// An overlay made for `base`, with one block written.
    fn overlay_for(&self, base: &Path) -> PathBuf {
        let ov = self.path("base.overlay");
        let b = open_base(base).unwrap();
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&ov)
            .unwrap();
        let dev = CowDevice::create(b.file, &b.identity, f, 4096, MapMemory::heap(256)).unwrap();
        dev.write(8192, &[9u8; 4096]).unwrap();
        dev.close().unwrap();
        ov
    }

    /// A copy of `overlay` with its header damaged (the checksum fails).
    fn corrupt_copy(&self, overlay: &Path) -> PathBuf {
        let mut bytes = std::fs::read(overlay).unwrap();
        bytes[20] ^= 0xff;
        let p = self.path("corrupt.overlay");
        std::fs::write(&p, &bytes).unwrap();
        p
    }

    /// The first 3000 bytes of `overlay`.
    fn truncated_copy(&self, overlay: &Path) -> PathBuf {
        let bytes = std::fs::read(overlay).unwrap();
        let p = self.path("truncated.overlay");
        std::fs::write(&p, &bytes[..3000]).unwrap();
        p
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ublk-cow"))
            .env("UBLK_COW_RUN_DIR", self.path("run"))
            .args(args)
            .output()
            .unwrap()
    }

    /// Every file and directory under the scratch directory, by path, with
    /// the sha256 of each file's contents.
    fn snapshot(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        let mut dirs = vec![self.dir.clone()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let name = p.strip_prefix(&self.dir).unwrap().display().to_string();
                if p.is_dir() {
                    v.push((name, "directory".to_string()));
                    dirs.push(p);
                } else {
                    let h = Sha256::digest(std::fs::read(&p).unwrap());
                    v.push((name, h.iter().map(|b| format!("{b:02x}")).collect()));
                }
            }
        }
        v.sort();
        v
    }

    /// Runs `ublk-cow ARGS` and expects it refused: exit status `code`, one
    /// line on stderr, `ublk-cow: ...`, that says `want`, and no file under
    /// the scratch directory changed or appeared.
    fn refused(&self, args: &[&str], code: i32, want: &str) {
        let before = self.snapshot();
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(out.status.code(), Some(code), "{args:?}: exit status");
        assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
        assert!(err.starts_with("ublk-cow: "), "{args:?}: {err:?}");
        assert!(
            err.contains(want),
            "{args:?}: {err:?} does not say {want:?}"
        );
        assert_eq!(self.snapshot(), before, "{args:?} changed files");
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_missing_base_is_refused() {
    let sc = Scratch::new("missing-base");
    let missing = sc.path("missing.img");
    sc.refused(&["add", "--base", s(&missing)], REFUSED, "does not exist");
}

#[test]
fn a_base_that_is_a_directory_is_refused() {
    let sc = Scratch::new("base-dir");
    let dir = sc.path("adir");
    std::fs::create_dir_all(&dir).unwrap();
    sc.refused(&["add", "--base", s(&dir)], REFUSED, "is a directory");
}

#[test]
fn a_base_whose_size_is_not_a_multiple_of_512_is_refused() {
    let sc = Scratch::new("odd-base");
    let odd = sc.file("odd.img", 1000, 3);
    sc.refused(
        &["add", "--base", s(&odd)],
        REFUSED,
        "not a multiple of 512",
    );
}

#[test]
fn an_empty_base_is_refused() {
    let sc = Scratch::new("empty-base");
    let empty = sc.file("empty.img", 0, 1);
    sc.refused(&["add", "--base", s(&empty)], REFUSED, "is empty");
}

#[test]
fn a_block_size_that_is_not_a_power_of_two_is_refused() {
    let sc = Scratch::new("bs-3000");
    let base = sc.base();
    let args = ["add", "--base", s(&base), "--block-size", "3000"];
    sc.refused(&args, REFUSED, "power of two");
}

#[test]
fn a_block_size_above_1m_is_refused() {
    let sc = Scratch::new("bs-2m");
    let base = sc.base();
    let args = ["add", "--base", s(&base), "--block-size", "2M"];
    sc.refused(&args, REFUSED, "power of two");
}

#[test]
fn a_block_size_below_4k_is_refused() {
    let sc = Scratch::new("bs-2k");
    let base = sc.base();
    let args = ["add", "--base", s(&base), "--block-size", "2K"];
    sc.refused(&args, REFUSED, "power of two");
}

#[test]
fn a_size_with_an_unknown_unit_is_refused() {
    let sc = Scratch::new("bs-unit");
    let base = sc.base();
    let args = ["add", "--base", s(&base), "--block-size", "12Q"];
    sc.refused(&args, USAGE, "unknown unit");
}

#[test]
fn an_overlay_made_for_another_base_is_refused() {
    let sc = Scratch::new("other-base");
    let ov = sc.overlay_for(&sc.base());
    let other = sc.file("other.img", 1 << 20, 13);
    let args = ["add", "--base", s(&other), "--overlay", s(&ov)];
    sc.refused(&args, REFUSED, "another base");
}

#[test]
fn another_block_size_for_an_existing_overlay_is_refused() {
    let sc = Scratch::new("overlay-bs");
    let base = sc.base();
    let ov = sc.overlay_for(&base);
    let args = [
        "add",
        "--base",
        s(&base),
        "--overlay",
        s(&ov),
        "--block-size",
        "64K",
    ];
    sc.refused(&args, REFUSED, "block size");
}

#[test]
fn a_corrupt_overlay_is_refused() {
    let sc = Scratch::new("corrupt");
    let base = sc.base();
    let corrupt = sc.corrupt_copy(&sc.overlay_for(&base));
    let args = ["add", "--base", s(&base), "--overlay", s(&corrupt)];
    sc.refused(&args, REFUSED, "corrupt");
}

#[test]
fn a_truncated_overlay_is_refused() {
    let sc = Scratch::new("truncated");
    let base = sc.base();
    let truncated = sc.truncated_copy(&sc.overlay_for(&base));
    let args = ["add", "--base", s(&base), "--overlay", s(&truncated)];
    sc.refused(&args, REFUSED, "truncated");
}

#[test]
fn an_overlay_that_is_a_directory_is_refused() {
    let sc = Scratch::new("overlay-dir");
    let base = sc.base();
    let dir = sc.path("adir");
    std::fs::create_dir_all(&dir).unwrap();
    let args = ["add", "--base", s(&base), "--overlay", s(&dir)];
    sc.refused(&args, REFUSED, "is a directory");
}

#[test]
fn the_base_as_its_own_overlay_is_refused() {
    let sc = Scratch::new("overlay-is-base");
    let base = sc.base();
    let args = ["add", "--base", s(&base), "--overlay", s(&base)];
    sc.refused(&args, REFUSED, "base itself");
}

#[test]
fn an_overlay_in_a_missing_directory_is_refused() {
    let sc = Scratch::new("overlay-no-dir");
    let base = sc.base();
    let args = [
        "add",
        "--base",
        s(&base),
        "--overlay",
        "/nonexistent-dir/x.overlay",
    ];
    sc.refused(&args, REFUSED, "directory does not exist");
}

#[test]
fn zero_queues_are_refused() {
    let sc = Scratch::new("queues-0");
    let base = sc.base();
    let args = ["add", "--base", s(&base), "--queues", "0"];
    sc.refused(&args, REFUSED, "--queues");
}

#[test]
fn an_unknown_zero_copy_mode_is_refused() {
    let sc = Scratch::new("zero-copy");
    let base = sc.base();
    let args = ["add", "--base", s(&base), "--zero-copy", "maybe"];
    sc.refused(&args, USAGE, "--zero-copy");
}

#[test]
fn an_unknown_base_io_mode_is_refused() {
    let sc = Scratch::new("base-io");
    let base = sc.base();
    let args = ["add", "--base", s(&base), "--base-io", "sometimes"];
    sc.refused(&args, USAGE, "cached, direct");
}

/// Everything else is right: the missing driver is the one error, and the
/// new overlay file must not have been created. Where the driver is loaded
/// the end-to-end suite covers `add`.
#[test]
fn a_missing_ublk_drv_is_refused_before_an_overlay_is_made() {
    if !Path::new("/dev/ublk-control").exists() {
        let sc = Scratch::new("no-driver");
        let base = sc.base();
        let new = sc.path("new.overlay");
        let args = ["add", "--base", s(&base), "--overlay", s(&new)];
        sc.refused(&args, REFUSED, "ublk_drv");
    }
}

/// --force accepts an overlay whose base changed (same size): what stops it
/// here is only the missing driver.
#[test]
fn force_takes_an_overlay_whose_base_changed() {
    if !Path::new("/dev/ublk-control").exists() {
        let sc = Scratch::new("force");
        let ov = sc.overlay_for(&sc.base());
        let other = sc.file("other.img", 1 << 20, 13);
        let args = ["add", "--base", s(&other), "--overlay", s(&ov), "--force"];
        sc.refused(&args, REFUSED, "ublk_drv");
    }
}

#[test]
fn deleting_a_device_that_does_not_exist_is_refused() {
    let sc = Scratch::new("del");
    sc.refused(&["del", "-n", "4000"], REFUSED, "no ublk-cow device 4000");
}

#[test]
fn help_explains_every_add_option() {
    let sc = Scratch::new("help");
    let out = sc.run(&["add", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--base",
        "--overlay",
        "--block-size",
        "--queues",
        "--depth",
        "--id",
        "--read-only",
        "--foreground",
        "--zero-copy",
        "--base-io",
        "--force",
    ] {
        assert!(help.contains(opt), "add --help lacks {opt}");
    }
    assert!(help.contains("[default: "), "add --help gives no defaults");
}

/// `-h`: one line per option; `--help`: the text, each mode of
/// --cache-mode and --base-io on a line of its own, each default once, and
/// no measured figures (those are in docs/benchmarks.md).
#[test]
fn short_help_is_a_summary_and_long_help_the_whole_text() {
    let help = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ublk-cow"))
            .env("COLUMNS", "200")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let short = help(&["add", "-h"]);
    let long = help(&["add", "--help"]);
    let option_lines = |text: &str| {
        text.lines()
            .map(str::trim_start)
            .filter(|t| {
                (t.starts_with("--") || (t.starts_with('-') && t.get(2..6) == Some(", --")))
                    && !t.starts_with("-h, --help")
            })
            .count()
    };
    // One line per option in `-h`, after the title, usage and heading, and
    // before the line of -h itself.
    let options = option_lines(&long);
    assert!(options >= 16, "{long}");
    assert_eq!(option_lines(&short), options, "{short}");
    assert_eq!(short.lines().count(), options + 6, "{short}");
    assert!(long.len() > 3 * short.len());
    for mode in [
        "ignore:",
        "passthrough:",
        "read:",
        "cow:",
        "cached:",
        "direct:",
        "auto:",
        "on:",
        "off:",
    ] {
        assert!(
            long.lines()
                .any(|l| l.trim_start().starts_with(&format!("- {mode}"))),
            "add --help does not list {mode}"
        );
    }
    for text in [
        &short,
        &long,
        &help(&["--help"]),
        &help(&["cache", "--help"]),
    ] {
        let lower = text.to_lowercase();
        for figure in ["iops", "mib/s", "times as fast", "measured"] {
            assert!(!lower.contains(figure), "help has {figure:?}:\n{text}");
        }
        // Defaults are said one way, `[default: ...]`, once per option.
        assert!(!text.contains("Default:"), "{text}");
        let mut options: Vec<String> = Vec::new();
        for line in text.lines() {
            let t = line.trim_start();
            // An option's first line: `  -n, --number`, `      --offset`.
            if t.starts_with('-') && line.len() - t.len() <= 6 {
                options.push(String::new());
            }
            if let Some(o) = options.last_mut() {
                o.push_str(line);
                o.push('\n');
            }
        }
        assert!(!options.is_empty(), "{text}");
        for option in options {
            let n = option.matches("[default: ").count();
            assert!(n <= 1, "a default stated {n} times:\n{option}");
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// clap's tip (a similar option or subcommand) stays on the one line.
#[test]
fn a_misspelt_option_or_command_keeps_the_tip() {
    let sc = Scratch::new("tip");
    sc.refused(
        &["add", "--read-onl"],
        USAGE,
        "tip: a similar argument exists: '--read-only'",
    );
    sc.refused(&["lst"], USAGE, "tip: a similar subcommand exists: 'list'");
}

#[test]
fn depth_out_of_range_names_the_range() {
    let sc = Scratch::new("depth");
    let base = sc.base();
    for depth in ["0", "4097", "100000"] {
        let args = ["add", "--base", s(&base), "--depth", depth];
        sc.refused(&args, USAGE, "not in 1..=4096");
    }
}

/// An I/O error whose message carries its cause prints that cause once.
#[test]
fn an_io_error_says_its_cause_once() {
    let sc = Scratch::new("io-cause");
    let ov = sc.overlay_for(&sc.base());
    std::fs::set_permissions(&ov, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ublk-cow"));
    cmd.args(["info", s(&ov)]);
    if is_root() {
        use std::os::unix::process::CommandExt;
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(REFUSED), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(err.matches("Permission denied").count(), 1, "{err}");
}

/// `del` and `recover` change devices: a user is told they need root, in
/// one line, and nothing happens.
#[test]
fn commands_that_need_root_say_so() {
    let sc = Scratch::new("root");
    let run = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ublk-cow"));
        cmd.env("UBLK_COW_RUN_DIR", sc.path("run")).args(args);
        if is_root() {
            use std::os::unix::process::CommandExt;
            cmd.uid(65534).gid(65534);
        }
        cmd.output().unwrap()
    };
    for args in [
        &["del", "-n", "0"][..],
        &["del", "--all"],
        &["del", "-a"],
        &["recover", "-n", "0"],
    ] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(REFUSED), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("ublk-cow: "), "{args:?}: {err}");
        assert!(err.contains("needs root"), "{args:?}: {err}");
    }
}

/// `del --all` with no devices succeeds and says there were none; as a
/// user it is refused for want of root.
#[test]
fn del_all_without_devices_says_so() {
    let sc = Scratch::new("del-all");
    let out = sc.run(&["del", "--all"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if is_root() {
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(stdout.trim(), "no ublk-cow devices");
    } else {
        assert_eq!(out.status.code(), Some(REFUSED));
    }
}

/// A state file for device `id` in the scratch run directory (0700), as
/// a running daemon (this test process) writes it.
fn write_state(sc: &Scratch, id: u32, overlay: &str) {
    let d = sc.path("run");
    std::fs::DirBuilder::new().mode(0o700).create(&d).ok();
    let state = serde_json::json!({
        "id": id, "pid": std::process::id(), "device": format!("/dev/ublkb{id}"),
        "base": "/srv/base.img", "overlay": overlay, "temporary_overlay": false,
        "block_size": 65536, "size": 10u64 << 30, "queues": 2, "depth": 128,
        "read_only": false, "recovered_unclean": false,
        "policy": {"mode": "passthrough", "readahead": "Auto", "cow_on_read": false,
                   "budget": 8388608},
        "base_io": "cached", "owner": 0, "failed": false,
    });
    std::fs::write(d.join(format!("{id}.json")), state.to_string()).unwrap();
}

use std::os::unix::fs::DirBuilderExt;

/// `list`: human sizes (raw with --bytes), a STATE column, and columns that
/// stay aligned with a long path; `-n N` for one device.
#[test]
fn list_shows_human_sizes_and_aligned_columns() {
    let sc = Scratch::new("list");
    let long = format!("/{}/disk.overlay", "a-very-long-directory-name".repeat(3));
    write_state(&sc, 3, &long);
    write_state(&sc, 12, "/short.overlay");
    let out = sc.run(&["list"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let col = |l: &str, name: &str| lines[0].find(name).map(|i| l[i..].to_string());
    for l in &lines[1..] {
        assert!(col(l, "STATE").unwrap().starts_with("running"), "{text}");
        assert!(
            col(l, "BASE").unwrap().starts_with("/srv/base.img"),
            "{text}"
        );
        assert!(col(l, "OVERLAY").unwrap().starts_with('/'), "{text}");
    }
    assert!(
        lines[1].contains(" 10G ") && lines[1].contains(" 64K "),
        "{text}"
    );
    assert!(lines[1].contains(&long), "{text}");
    let raw = String::from_utf8(sc.run(&["list", "--bytes"]).stdout).unwrap();
    assert!(
        raw.contains(" 10737418240 ") && raw.contains(" 65536 "),
        "{raw}"
    );
    let one = String::from_utf8(sc.run(&["list", "-n", "12"]).stdout).unwrap();
    assert_eq!(one.lines().count(), 2, "{one}");
    assert!(one.lines().nth(1).unwrap().starts_with("12 "), "{one}");
    sc.refused(&["list", "-n", "7"], REFUSED, "no ublk-cow device 7");
}

/// `list --json`: the documented schema: a `state` as in the table,
/// lowercase values, and no internal fields.
#[test]
fn list_json_is_the_documented_schema() {
    let sc = Scratch::new("list-json");
    write_state(&sc, 0, "/x.overlay");
    let out = sc.run(&["list", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = &v[0];
    let mut keys: Vec<&str> = d.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort();
    let mut want = vec![
        "id",
        "device",
        "state",
        "pid",
        "base",
        "overlay",
        "temporary_overlay",
        "size",
        "block_size",
        "read_only",
        "queues",
        "depth",
        "zero_copy",
        "user_copy",
        "base_io",
        "cache_mode",
        "readahead",
        "cow_on_read",
        "forced",
        "owner",
    ];
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(d["state"], "running");
    assert_eq!(d["cache_mode"], "passthrough");
    assert_eq!(d["readahead"], "auto");
    assert_eq!(d["base_io"], "cached");
    assert_eq!(d["size"], 10u64 << 30);
}

/// The device number is `-n`/`--number` everywhere; `add --id` still works.
#[test]
fn every_command_takes_a_device_number_as_n() {
    let sc = Scratch::new("number");
    for cmd in [
        "del", "cache", "stats", "recover", "list", "snapshot", "map",
    ] {
        let out = sc.run(&[cmd, "--help"]);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("-n, --number <N>"), "{cmd}: {help}");
    }
    let help = String::from_utf8(sc.run(&["add", "--help"]).stdout).unwrap();
    assert!(help.contains("-n, --number <N>"), "{help}");
    assert!(help.contains("[alias: --id]"), "{help}");
    // Every spelling parses: what stops them is the base's size.
    let odd = sc.file("odd.img", 1000, 3);
    for flag in ["--id", "-n", "--number"] {
        let args = ["add", "-b", s(&odd), flag, "4", "-q", "1", "-d", "8"];
        sc.refused(&args, REFUSED, "multiple of 512");
    }
}

/// `--version` names the version and the commit the binary was built from
/// (`unknown` outside a git checkout).
#[test]
fn version_names_the_commit() {
    let out = Command::new(env!("CARGO_BIN_EXE_ublk-cow"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let head = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string());
    let commit = std::env::var("UBLK_COW_COMMIT")
        .ok()
        .or(head)
        .unwrap_or_else(|| "unknown".into());
    assert_eq!(
        text.trim(),
        format!("ublk-cow {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
}

/// `serve CONFIG`: a bad configuration is one line naming the file, and
/// nothing is created.
#[test]
fn a_bad_serve_configuration_is_refused() {
    let sc = Scratch::new("serve");
    let base = sc.base();
    let conf = sc.path("dev.conf");
    let ov = sc.path("dev.overlay");
    for (text, want) in [
        (format!("base = {}\n", s(&base)), "no overlay"),
        (
            format!("base = {}\noverlay = {}\ncolour = red\n", s(&base), s(&ov)),
            "unexpected argument '--colour'",
        ),
        (
            format!("base = {}\noverlay = {}\ndepth = 0\n", s(&base), s(&ov)),
            "not in 1..=4096",
        ),
        (
            format!(
                "base = {}\noverlay = {}\nread-only = perhaps\n",
                s(&base),
                s(&ov)
            ),
            "takes yes or no",
        ),
    ] {
        std::fs::write(&conf, &text).unwrap();
        sc.refused(&["serve", s(&conf)], REFUSED, want);
        let err = String::from_utf8(sc.run(&["serve", s(&conf)]).stderr).unwrap();
        assert!(err.contains(s(&conf)), "{err}");
    }
    sc.refused(
        &["serve", s(&sc.path("none.conf"))],
        REFUSED,
        "No such file",
    );
}

#[test]
fn a_remote_base_with_bad_settings_is_refused_before_any_request() {
    let sc = Scratch::new("remote-settings");
    sc.refused(&["add", "--base", "s3://"], REFUSED, "bucket is empty");
    sc.refused(&["add", "--base", "s3://bucket"], REFUSED, "no object key");
    sc.refused(
        &["add", "--base", "ftp://host/disk.img"],
        REFUSED,
        "not a base URL",
    );
    let base = sc.base();
    sc.refused(
        &["add", "--base", s(&base), "--fetch-size", "1M"],
        REFUSED,
        "apply to a remote base",
    );
    // Checked before the server is asked: nothing listens on port 1.
    let url = "http://127.0.0.1:1/disk.img";
    sc.refused(
        &["add", "--base", url, "--fetch-size", "6K"],
        REFUSED,
        "multiple of the block size",
    );
    sc.refused(
        &["add", "--base", url, "--fetch-timeout", "0"],
        USAGE,
        "must be more than 0",
    );
    sc.refused(&["add", "--base", url], REFUSED, "cannot reach the server");
}
