//! What the command line refuses for the sake of the device's data, checked
//! on the host (no ublk needed: these are refused before a device is made):
//! a run directory open to others, and a new overlay through a symlink.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ublk-cow-security-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(run_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ublk-cow"))
        .env("UBLK_COW_RUN_DIR", run_dir)
        .args(args)
        .output()
        .unwrap()
}

/// `args` fails with one error line containing `want`.
fn refused(run_dir: &Path, args: &[&str], want: &str) {
    let out = run(run_dir, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
    assert!(err.starts_with("ublk-cow: "), "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: {err:?} lacks {want:?}");
}

fn names(d: &Path) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_run_dir_open_to_others_is_refused_by_every_command() {
    let t = scratch("loose");
    let run_dir = t.join("run");
    std::fs::create_dir(&run_dir).unwrap();
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let base = t.join("base.img");
    std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
    // A state file someone else could have planted there is not read.
    std::fs::write(run_dir.join("0.json"), b"{}").unwrap();
    let base_s = base.to_str().unwrap();
    let want = "must be open to its owner only";
    refused(&run_dir, &["add", "--base", base_s], want);
    refused(&run_dir, &["list"], want);
    refused(&run_dir, &["del", "-n", "0"], want);
    refused(&run_dir, &["stats", "-n", "0"], want);
    refused(&run_dir, &["recover", "-n", "0"], want);
    // Refusing changed nothing.
    let mode = std::fs::metadata(&run_dir).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o777);
    assert_eq!(names(&run_dir), ["0.json"]);
    assert_eq!(names(&t), ["base.img", "run"]);
    std::fs::remove_dir_all(&t).unwrap();
}

#[test]
fn a_run_dir_that_is_a_symlink_is_refused() {
    let t = scratch("link");
    let real = t.join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = t.join("run");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    refused(&link, &["list"], "not a directory");
    std::fs::remove_dir_all(&t).unwrap();
}

#[test]
fn a_new_overlay_is_not_created_through_a_dangling_symlink() {
    let t = scratch("overlay");
    let run_dir = t.join("run");
    let base = t.join("base.img");
    std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
    let target = t.join("elsewhere.overlay");
    let link = t.join("new.overlay");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    refused(
        &run_dir,
        &[
            "add",
            "--base",
            base.to_str().unwrap(),
            "--overlay",
            link.to_str().unwrap(),
        ],
        "symlink",
    );
    // Nothing created: not the target, not the run directory.
    assert_eq!(names(&t), ["base.img", "new.overlay"]);
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    std::fs::remove_dir_all(&t).unwrap();
}
