//! A scratch directory for tests that run the binary on files: its own run
//! directory, and the checks that a command succeeded or was refused in one
//! line without changing any file.

#![allow(dead_code)] // each test uses its own part of it

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    /// An empty directory named after the test (`kind`, `test`) and this
    /// process, removed when dropped.
    pub fn new(kind: &str, test: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("ublk-cow-{kind}-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs the binary with `args`, its run directory inside the scratch.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ublk-cow"))
            .env("UBLK_COW_RUN_DIR", self.path("run"))
            .args(args)
            .output()
            .unwrap()
    }

    /// Every file of the directory with its bytes and modification time.
    pub fn files(&self) -> Vec<(PathBuf, Vec<u8>, std::time::SystemTime)> {
        let mut out: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| {
                let m = std::fs::metadata(&p).unwrap().modified().unwrap();
                (p.clone(), std::fs::read(&p).unwrap(), m)
            })
            .collect();
        out.sort();
        out
    }

    /// Runs `args`, which must fail with one `ublk-cow: ` line containing
    /// `want`, and change no file.
    pub fn refused(&self, args: &[&str], want: &str) {
        let before = self.files();
        let out = self.run(args);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("ublk-cow: ") && err.contains(want),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(self.files() == before, "{args:?} changed a file");
    }

    /// Runs `args`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// As `ok`, for a command that must change no file.
    pub fn ok_unchanged(&self, args: &[&str]) -> String {
        let before = self.files();
        let out = self.ok(args);
        assert!(self.files() == before, "{args:?} changed a file");
        out
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A path as the `&str` of a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
