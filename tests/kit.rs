//! What ships beside the binary: the man pages and shell completions
//! generated from the command line, and `make install`.

use std::path::PathBuf;
use std::process::Command;

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ublk-cow-kit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const COMMANDS: [&str; 13] = [
    "add", "del", "list", "cache", "stats", "recover", "info", "check", "map", "snapshot", "serve",
    "commit", "push",
];

/// Every page renders with no warning from `man --warnings` (groff), and
/// names every option of its command; `ublk-cow(1)` documents the exit
/// status, RUST_LOG and the daemon's log.
#[test]
fn man_pages_are_clean_and_complete() {
    let d = scratch("man");
    ublk_cow::generate::man_pages(&d).unwrap();
    let mut pages = vec!["ublk-cow.1".to_string()];
    pages.extend(COMMANDS.iter().map(|c| format!("ublk-cow-{c}.1")));
    for page in &pages {
        let path = d.join(page);
        let out = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&path)
            .env("MANWIDTH", "80")
            .output()
            .expect("man (man-db) is installed: ci/setup.sh installs it");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{page}: {err}");
        assert!(err.trim().is_empty(), "{page}: warnings: {err}");
        let name = page.trim_end_matches(".1");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(name),
            "{page}"
        );
    }
    // Every option of `add` is in its page, with its default.
    let add = String::from_utf8(std::fs::read(d.join("ublk-cow-add.1")).unwrap()).unwrap();
    for opt in [
        "base",
        "overlay",
        "block\\-size",
        "queues",
        "depth",
        "number",
        "read\\-only",
        "preallocate",
        "foreground",
        "force",
        "cache\\-mode",
        "readahead",
        "base\\-io",
        "zero\\-copy",
    ] {
        assert!(
            add.contains(&format!("\\-\\-{opt}")),
            "ublk-cow-add.1 lacks --{opt}"
        );
    }
    assert!(add.contains("[default: 128]"), "{add}");
    let top = String::from_utf8(std::fs::read(d.join("ublk-cow.1")).unwrap()).unwrap();
    for section in [
        "EXIT STATUS",
        "ENVIRONMENT",
        "RUST_LOG",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "N.log",
        "FILES",
    ] {
        assert!(top.contains(section), "ublk-cow.1 lacks {section}");
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// The completions name every command; bash's parses.
#[test]
fn completions_cover_every_command() {
    let d = scratch("completions");
    ublk_cow::generate::completions(&d).unwrap();
    for (_, name) in ublk_cow::generate::SHELLS {
        let text = std::fs::read_to_string(d.join(name)).unwrap();
        for c in COMMANDS {
            assert!(text.contains(c), "{name} lacks {c}");
        }
        assert!(text.contains("number"), "{name} lacks --number");
    }
    let bash = Command::new("bash")
        .arg("-n")
        .arg(d.join("ublk-cow.bash"))
        .status()
        .unwrap();
    assert!(bash.success());
    std::fs::remove_dir_all(&d).unwrap();
}

/// The unit names `ublk-cow-serve(1)` and `ublk-cow(1)`: they must exist.
#[test]
fn the_unit_documents_pages_that_exist() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dist/systemd/ublk-cow@.service"
    ))
    .unwrap();
    let d = scratch("unit-pages");
    ublk_cow::generate::man_pages(&d).unwrap();
    let docs = unit
        .lines()
        .find_map(|l| l.strip_prefix("Documentation="))
        .unwrap();
    for page in docs.split_whitespace() {
        let name = page.trim_start_matches("man:").replace("(1)", ".1");
        assert!(d.join(&name).exists(), "{page} is not generated");
    }
    assert!(unit.contains("Type=notify") && unit.contains(" serve /etc/ublk-cow/%i.conf"));
    std::fs::remove_dir_all(&d).unwrap();
}
