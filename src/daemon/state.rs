//! The state files of our devices under the run directory (`/run/ublk-cow`,
//! or `$UBLK_COW_RUN_DIR`): `<id>.json` says what the device serves and
//! which daemon serves it; `<id>.map` is the live block-state map, mapped
//! shared by the daemon so that it outlives a daemon crash; `<id>.log` is the
//! daemon's log.

use crate::engine::cache::CachePolicy;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything `list`, `del` and `recover` need to know about a device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceState {
    pub id: u32,
    pub pid: i32,
    pub device: String,
    pub base: PathBuf,
    pub overlay: PathBuf,
    /// The overlay was made by `add` without `--overlay` and goes at `del`.
    pub temporary_overlay: bool,
    pub block_size: u32,
    pub size: u64,
    pub queues: u16,
    pub depth: u16,
    pub read_only: bool,
    /// The overlay had not been closed cleanly when this daemon opened it.
    pub recovered_unclean: bool,
    /// `--force` was given: the base's identity was not checked strictly.
    #[serde(default)]
    pub forced: bool,
    /// Cache mode, readahead and copy-on-read.
    #[serde(default)]
    pub policy: CachePolicy,
    /// The device moves data with zero copy (`add --zero-copy`).
    #[serde(default)]
    pub zero_copy: bool,
    /// How base blocks that the page cache lacks are read (`add --base-io`).
    #[serde(default)]
    pub base_io: crate::engine::base::BaseIo,
    /// A flush failed: the overlay stays as of its last good flush, and
    /// the live map is never written into it.
    #[serde(default)]
    pub failed: bool,
}

pub fn run_dir() -> PathBuf {
    std::env::var_os("UBLK_COW_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/ublk-cow"))
}

pub fn state_path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.json"))
}

pub fn map_path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.map"))
}

pub fn socket_path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.sock"))
}

pub fn log_path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.log"))
}

pub fn ensure_run_dir() -> Result<()> {
    let d = run_dir();
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))
}

impl DeviceState {
    /// Writes the state file atomically (write a temporary, then rename).
    pub fn save(&self) -> Result<()> {
        let path = state_path(self.id);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    pub fn load(id: u32) -> Result<Option<DeviceState>> {
        load_file(&state_path(id))
    }

    /// Whether the daemon that wrote this is still running.
    pub fn daemon_alive(&self) -> bool {
        crate::sys::kill(self.pid, 0).unwrap_or(false)
    }

    /// Removes the state, map and (for a temporary overlay) overlay files.
    pub fn remove_files(&self) {
        let _ = std::fs::remove_file(state_path(self.id));
        let _ = std::fs::remove_file(map_path(self.id));
        let _ = std::fs::remove_file(socket_path(self.id));
        if self.temporary_overlay {
            let _ = std::fs::remove_file(&self.overlay);
        }
    }
}

fn load_file(path: &Path) -> Result<Option<DeviceState>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// All our devices, by id.
pub fn all() -> Result<Vec<DeviceState>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(run_dir()) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).context("reading the run directory"),
    };
    for entry in entries.flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|x| x == "json")
            && let Some(s) = load_file(&p)?
        {
            out.push(s);
        }
    }
    out.sort_by_key(|s| s.id);
    Ok(out)
}
