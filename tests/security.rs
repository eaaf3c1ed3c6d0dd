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

/// A state file for device `id` served by `pid`, as a daemon writes it.
fn write_state(run_dir: &Path, id: u32, pid: i32) {
    let state = format!(
        r#"{{"id": {id}, "pid": {pid}, "device": "/dev/ublkb{id}", "base": "/b.img",
        "overlay": "/b.overlay", "temporary_overlay": false, "block_size": 4096,
        "size": 1048576, "queues": 1, "depth": 128, "read_only": false,
        "recovered_unclean": false}}"#
    );
    std::fs::write(run_dir.join(format!("{id}.json")), state).unwrap();
}

/// A user's `list` shows root's running daemon as running: `kill(pid, 0)`
/// failing with EPERM means the process is there, only not ours to signal.
/// As root the command runs as nobody, over a run directory of nobody's.
#[test]
fn a_daemon_of_another_user_is_alive() {
    let t = scratch("eperm");
    let d = t.join("run");
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    // Init (pid 1) is root's; a reaped child's pid is nobody's.
    write_state(&d, 0, 1);
    let mut child = Command::new("true").spawn().unwrap();
    let gone = child.id() as i32;
    child.wait().unwrap();
    write_state(&d, 1, gone);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ublk-cow"));
    cmd.env("UBLK_COW_RUN_DIR", &d).arg("list");
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::process::CommandExt;
        std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
        for f in ["0.json", "1.json"] {
            std::os::unix::fs::chown(d.join(f), Some(65534), Some(65534)).unwrap();
        }
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state_of = |id: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(4))
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(state_of("0"), "running", "{text}");
    assert_eq!(state_of("1"), "dead", "{text}");
    std::fs::remove_dir_all(&t).unwrap();
}
