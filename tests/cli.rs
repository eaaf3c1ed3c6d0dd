//! Bad input to the command line: each gets one clear error line on stderr,
//! a non-zero exit, and no file is created or changed.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use ublk_cow::engine::base::open_base;
use ublk_cow::engine::device::CowDevice;
use ublk_cow::engine::map::MapMemory;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ublk-cow"));
    c.env("UBLK_COW_RUN_DIR", scratch("run"));
    c
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ublk-cow-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// sha256 of every file in the scratch directory, by name.
fn snapshot() -> Vec<(String, String)> {
    let dir = scratch("x").parent().unwrap().to_path_buf();
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            let h = Sha256::digest(std::fs::read(e.path()).unwrap());
            (
                e.file_name().to_string_lossy().into_owned(),
                h.iter().map(|b| format!("{b:02x}")).collect(),
            )
        })
        .collect();
    v.sort();
    v
}

fn write(p: &Path, len: usize, seed: u8) {
    std::fs::write(
        p,
        (0..len)
            .map(|i| (i as u8).wrapping_mul(seed))
            .collect::<Vec<_>>(),
    )
    .unwrap();
}

/// Runs `add ARGS`, expects failure with one line containing `want`, and
/// that no file in the scratch directory changed or appeared.
fn refused(args: &[&str], want: &str) {
    let before = snapshot();
    let out = bin().arg("add").args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "add {args:?} succeeded");
    assert_eq!(err.lines().count(), 1, "add {args:?}: not one line: {err}");
    assert!(
        err.contains(want),
        "add {args:?}: {err:?} does not say {want:?}"
    );
    assert_eq!(snapshot(), before, "add {args:?} changed files");
}

#[test]
fn bad_input_is_refused_without_changes() {
    let base = scratch("base.img");
    write(&base, 1 << 20, 7);
    let other = scratch("other.img");
    write(&other, 1 << 20, 13);
    let odd = scratch("odd.img");
    write(&odd, 1000, 3);
    let empty = scratch("empty.img");
    write(&empty, 0, 1);
    let dir = scratch("adir");
    std::fs::create_dir_all(&dir).unwrap();
    // An overlay made for `base`, with one block written.
    let ov = scratch("base.overlay");
    {
        let b = open_base(&base).unwrap();
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&ov)
            .unwrap();
        let dev = CowDevice::create(b.file, &b.identity, f, 4096, MapMemory::heap(256)).unwrap();
        dev.write(8192, &[9u8; 4096]).unwrap();
        dev.close().unwrap();
    }
    let corrupt = scratch("corrupt.overlay");
    let mut bytes = std::fs::read(&ov).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(&corrupt, &bytes).unwrap();
    let truncated = scratch("truncated.overlay");
    std::fs::write(&truncated, &bytes[..3000]).unwrap();

    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (base_s, ov_s) = (s(&base), s(&ov));
    refused(&["--base", &s(&scratch("missing.img"))], "does not exist");
    refused(&["--base", &s(&dir)], "is a directory");
    refused(&["--base", &s(&odd)], "not a multiple of 512");
    refused(&["--base", &s(&empty)], "is empty");
    refused(&["--base", &base_s, "--block-size", "3000"], "power of two");
    refused(&["--base", &base_s, "--block-size", "2M"], "power of two");
    refused(&["--base", &base_s, "--block-size", "2K"], "power of two");
    refused(&["--base", &base_s, "--block-size", "12Q"], "unknown unit");
    refused(&["--base", &s(&other), "--overlay", &ov_s], "another base");
    refused(
        &["--base", &base_s, "--overlay", &ov_s, "--block-size", "64K"],
        "block size",
    );
    refused(&["--base", &base_s, "--overlay", &s(&corrupt)], "corrupt");
    refused(
        &["--base", &base_s, "--overlay", &s(&truncated)],
        "truncated",
    );
    refused(
        &["--base", &base_s, "--overlay", &s(&dir)],
        "is a directory",
    );
    refused(&["--base", &base_s, "--overlay", &base_s], "base itself");
    refused(
        &["--base", &base_s, "--overlay", "/nonexistent-dir/x.overlay"],
        "directory does not exist",
    );
    refused(&["--base", &base_s, "--queues", "0"], "--queues");
    refused(&["--base", &base_s, "--zero-copy", "maybe"], "--zero-copy");
    refused(
        &["--base", &base_s, "--base-io", "sometimes"],
        "cached, direct",
    );
    if !Path::new("/dev/ublk-control").exists() {
        // Everything else is right: the missing driver is the one error, and
        // the new overlay file must not have been created.
        refused(
            &["--base", &base_s, "--overlay", &s(&scratch("new.overlay"))],
            "ublk_drv",
        );
        // --force accepts an overlay whose base changed (same size): what
        // stops it here is only the missing driver.
        refused(
            &["--base", &s(&other), "--overlay", &ov_s, "--force"],
            "ublk_drv",
        );
    }
    let out = bin().args(["del", "-n", "4000"]).output().unwrap();
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}

#[test]
fn help_explains_every_add_option() {
    let out = bin().args(["add", "--help"]).output().unwrap();
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
    assert!(help.contains("Default"), "add --help gives no defaults");
}
