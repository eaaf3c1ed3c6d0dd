//! Build script: records the commit the binary is built from, for
//! `ublk-cow --version`, in `UBLK_COW_COMMIT`: `git rev-parse --short HEAD`
//! when the source is a git checkout of its own, `unknown` otherwise (a
//! tarball, or no git). A packager may set `UBLK_COW_COMMIT` instead.

use std::path::Path;
use std::process::Command;

/// `git ARGS` run in `dir`, its output trimmed, if it succeeds.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=UBLK_COW_COMMIT");
    let dir = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let commit = std::env::var("UBLK_COW_COMMIT").ok().or_else(|| {
        // Only this project's own checkout: a tarball unpacked inside some
        // other repository must not take that repository's commit.
        let top = git(&dir, &["rev-parse", "--show-toplevel"])?;
        if std::fs::canonicalize(&top).ok()? != std::fs::canonicalize(&dir).ok()? {
            return None;
        }
        // Rebuild when HEAD moves: HEAD itself, the branches (a commit
        // writes one), and packed refs. A path that does not exist is left
        // out: cargo would run this script on every build.
        for path in ["HEAD", "refs/heads", "packed-refs"] {
            if let Some(p) = git(&dir, &["rev-parse", "--git-path", path])
                && dir.join(&p).exists()
            {
                println!("cargo:rerun-if-changed={}", dir.join(p).display());
            }
        }
        git(&dir, &["rev-parse", "--short", "HEAD"])
    });
    println!(
        "cargo:rustc-env=UBLK_COW_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
}
