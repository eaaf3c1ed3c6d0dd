//! Files for the host tests (the crate's, and `tests/race.rs`, which
//! includes this file): made new in a directory and unlinked at once, so
//! nothing is left behind however a test ends.

use std::fs::File;
use std::path::Path;

/// A new, empty, read-write file in `dir`, already unlinked; `name` keeps
/// the files of one test process apart.
pub(crate) fn unlinked(dir: &Path, name: &str) -> File {
    let path = dir.join(format!("ublk-cow-test-{}-{name}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}
