//! The state files of our devices under the run directory (`/run/ublk-cow`,
//! or `$UBLK_COW_RUN_DIR`): `<id>.json` says what the device serves and
//! which daemon serves it; `<id>.map` is the live block-state map, mapped
//! shared by the daemon so that it outlives a daemon crash; `<id>.log` is the
//! daemon's log; `<id>.sock` is its control socket. Also how the files that
//! hold a device's data are made: private to their owner (mode 0600) and
//! never through a symlink ([`create_private`]).
//!
//! The run directory is trusted (`del` signals the pid a state file names,
//! and removes the temporary overlay it names), so it must be open to its
//! owner only: mode 0700, owned by root or by the user running ublk-cow.
//! Every command checks that before it reads or writes anything in it
//! ([`check_run_dir`]), and refuses a directory that is not.

use crate::engine::cache::CachePolicy;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Everything `list`, `del` and `recover` need to know about a device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct DeviceState {
    pub(crate) id: u32,
    pub(crate) pid: i32,
    pub(crate) device: String,
    pub(crate) base: PathBuf,
    pub(crate) overlay: PathBuf,
    /// The overlay was made by `add` without `--overlay` and goes at `del`.
    pub(crate) temporary_overlay: bool,
    pub(crate) block_size: u32,
    pub(crate) size: u64,
    pub(crate) queues: u16,
    pub(crate) depth: u16,
    pub(crate) read_only: bool,
    /// The overlay had not been closed cleanly when this daemon opened it.
    pub(crate) recovered_unclean: bool,
    /// `--force` was given: the base's identity was not checked strictly.
    #[serde(default)]
    pub(crate) forced: bool,
    /// Cache mode, readahead and copy-on-read.
    #[serde(default)]
    pub(crate) policy: CachePolicy,
    /// The device moves data with zero copy (`add --zero-copy`).
    #[serde(default)]
    pub(crate) zero_copy: bool,
    /// The device moves data with ublk's user copy (`params::IoMode`).
    #[serde(default)]
    pub(crate) user_copy: bool,
    /// How base blocks that the page cache lacks are read (`add --base-io`).
    #[serde(default)]
    pub(crate) base_io: crate::engine::base::BaseIo,
    /// The user id that added the device: besides root, the only user whose
    /// requests the control socket serves. (State files without it were
    /// written by root.)
    #[serde(default)]
    pub(crate) owner: u32,
    /// A flush failed: the overlay stays as of its last good flush, and
    /// the live map is never written into it.
    #[serde(default)]
    pub(crate) failed: bool,
    /// A snapshot of the device into this new overlay was begun and not
    /// finished (see `daemon::snapshot`): `recover` finishes it.
    #[serde(default)]
    pub(crate) snapshot_to: Option<PathBuf>,
    /// Served in the foreground (`add --foreground`, or `serve` under
    /// systemd): the process that serves it belongs to whoever started it.
    #[serde(default)]
    pub(crate) foreground: bool,
    /// For a remote base (`base` is its URL): the settings it is opened
    /// with, AWS credentials included (this file is the owner's only, mode
    /// 0600, in a directory of mode 0700).
    #[serde(default)]
    pub(crate) remote: super::RemoteSettings,
    /// The object's size and version when the device was added: `recover`
    /// refuses another.
    #[serde(default)]
    pub(crate) remote_identity: Option<crate::remote::Identity>,
    /// The boot its daemon ran in ([`boot_id`]): a state file that a run
    /// directory kept across a restart of the machine names a daemon, a
    /// ublk device and a live map that are gone (the pid and the id may be
    /// another's by now). Unknown in files written before it was kept.
    #[serde(default)]
    pub(crate) boot_id: Option<String>,
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), if the kernel has one.
pub(crate) fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

pub(crate) fn run_dir() -> PathBuf {
    std::env::var_os("UBLK_COW_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/ublk-cow"))
}

pub(crate) fn state_path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.json"))
}

pub(crate) fn map_path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.map"))
}

pub(crate) fn socket_path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.sock"))
}

pub(crate) fn log_path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.log"))
}

/// Creates `path` as a new file open for reading and writing, with mode
/// 0600 as it is created (the umask can only narrow it). Fails if anything
/// is at `path`, a symlink too (even one to nowhere): `O_CREAT | O_EXCL`
/// does not follow it. Every file that holds a device's data or state is
/// made here.
pub(crate) fn create_private(path: &Path) -> std::io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// [`create_private`] for a file of ours in the run directory (the live
/// map, the log, a state file): a stale one left by an earlier daemon is
/// removed first.
pub(crate) fn create_in_run_dir(path: &Path) -> Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the stale {}", path.display())),
    }
    create_private(path).with_context(|| format!("creating {}", path.display()))
}

/// Whether user `uid` may use and stop a device that user `owner` added:
/// root and the owner may, nobody else.
pub(crate) fn may_use(uid: u32, owner: u32) -> bool {
    uid == 0 || uid == owner
}

/// Why `dir` may not serve as the run directory, if it may not: it must be a
/// directory (not a symlink), owned by root or by `me`, with no permission
/// for group or others.
fn judge_run_dir(dir: &Path, meta: &std::fs::Metadata, me: u32) -> Result<()> {
    if meta.file_type().is_symlink() || !meta.is_dir() {
        bail!(
            "the run directory {} is not a directory (a symlink or a file): refusing to use it",
            dir.display()
        );
    }
    if meta.uid() != 0 && meta.uid() != me {
        bail!(
            "the run directory {} belongs to uid {}, neither root nor uid {me}: refusing to use it",
            dir.display(),
            meta.uid()
        );
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        bail!(
            "the run directory {} has mode {mode:04o}; it must be open to its owner only (0700): refusing to use it",
            dir.display()
        );
    }
    Ok(())
}

/// Checks the run directory, if there is one (see the module's doc);
/// returns whether there is.
pub(crate) fn check_run_dir() -> Result<bool> {
    check_dir(&run_dir())
}

fn check_dir(d: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(d) {
        Ok(m) => judge_run_dir(d, &m, crate::sys::euid()).map(|()| true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("the run directory {}", d.display())),
    }
}

/// Creates the run directory (mode 0700) if there is none, and checks it.
pub(crate) fn ensure_run_dir() -> Result<()> {
    ensure_dir(&run_dir())
}

fn ensure_dir(d: &Path) -> Result<()> {
    if !check_dir(d)? {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
            .with_context(|| format!("creating {}", d.display()))?;
        check_dir(d)?;
    }
    Ok(())
}

/// The context of a failure to read `path` in the run directory.
fn reading(path: &Path, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        anyhow::anyhow!(
            "reading {}: permission denied (the run directory is open to its owner only, normally root)",
            path.display()
        )
    } else {
        anyhow::Error::from(e).context(format!("reading {}", path.display()))
    }
}

impl DeviceState {
    /// Writes the state file atomically (write a temporary, then rename).
    pub(crate) fn save(&self) -> Result<()> {
        let path = state_path(self.id);
        let tmp = path.with_extension("json.tmp");
        std::io::Write::write_all(
            &mut create_in_run_dir(&tmp)?,
            &serde_json::to_vec_pretty(self)?,
        )
        .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    pub(crate) fn load(id: u32) -> Result<Option<DeviceState>> {
        if !check_run_dir()? {
            return Ok(None);
        }
        load_file(&state_path(id))
    }

    /// Whether the device's daemon ran in this boot of the machine (taken
    /// so when either boot id is unknown).
    pub(crate) fn this_boot(&self) -> bool {
        match (&self.boot_id, boot_id()) {
            (Some(then), Some(now)) => *then == now,
            _ => true,
        }
    }

    /// Whether the daemon that wrote this is still running: never one of an
    /// earlier boot, whose pid may be another process's now. A process
    /// that we may not signal (`EPERM`: another user's, root's to a user)
    /// is alive all the same.
    pub(crate) fn daemon_alive(&self) -> bool {
        if !self.this_boot() {
            return false;
        }
        match crate::sys::kill(self.pid, 0) {
            Ok(alive) => alive,
            Err(e) => e.raw_os_error() == Some(libc::EPERM),
        }
    }

    /// What `list` says of the device: `failed` (a flush failed), `dead`
    /// (its daemon is gone), `unclean` (running, over an overlay that had
    /// not been closed cleanly) or `running`.
    pub(crate) fn state_name(&self) -> &'static str {
        match (self.failed, self.daemon_alive(), self.recovered_unclean) {
            (true, _, _) => "failed",
            (false, false, _) => "dead",
            (false, true, true) => "unclean",
            (false, true, false) => "running",
        }
    }

    /// Removes the state, map and (for a temporary overlay) overlay files.
    pub(crate) fn remove_files(&self) {
        let _ = std::fs::remove_file(state_path(self.id));
        let _ = std::fs::remove_file(map_path(self.id));
        let _ = std::fs::remove_file(socket_path(self.id));
        let _ = std::fs::remove_file(run_dir().join(format!("{}.lock", self.id)));
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
        Err(e) => Err(reading(path, e)),
    }
}

/// All our devices, by id.
pub(crate) fn all() -> Result<Vec<DeviceState>> {
    let mut out = Vec::new();
    if !check_run_dir()? {
        return Ok(out);
    }
    let entries = match std::fs::read_dir(run_dir()) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(reading(&run_dir(), e)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fresh, empty directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ublk-cow-state-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn set_mode(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    #[test]
    fn only_root_and_the_owner_may_use_a_device() {
        assert!(may_use(0, 1000));
        assert!(may_use(1000, 1000));
        assert!(may_use(0, 0));
        assert!(!may_use(1001, 1000));
        assert!(!may_use(65534, 0));
    }

    #[test]
    fn a_missing_run_dir_is_made_0700() {
        let t = scratch("make");
        let d = t.join("a/run");
        assert!(!check_dir(&d).unwrap());
        ensure_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        assert!(check_dir(&d).unwrap());
        // A second start finds it and is content.
        ensure_dir(&d).unwrap();
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn a_run_dir_open_to_others_is_refused() {
        let t = scratch("loose");
        let d = t.join("run");
        std::fs::create_dir(&d).unwrap();
        for m in [0o777, 0o755, 0o750, 0o701, 0o1777] {
            set_mode(&d, m);
            let err = format!("{:#}", ensure_dir(&d).unwrap_err());
            assert!(
                err.contains("must be open to its owner only"),
                "{m:o}: {err}"
            );
            assert_eq!(err.lines().count(), 1, "{err}");
            // Refusing changes nothing.
            assert_eq!(mode(&d), m);
        }
        set_mode(&d, 0o700);
        assert!(check_dir(&d).unwrap());
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn a_run_dir_that_is_a_symlink_or_a_file_is_refused() {
        let t = scratch("link");
        let real = t.join("real");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&real)
            .unwrap();
        let link = t.join("run");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = format!("{:#}", ensure_dir(&link).unwrap_err());
        assert!(err.contains("not a directory"), "{err}");
        let file = t.join("file");
        create_private(&file).unwrap();
        let err = format!("{:#}", check_dir(&file).unwrap_err());
        assert!(err.contains("not a directory"), "{err}");
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn a_run_dir_of_another_user_is_refused() {
        let t = scratch("owner");
        let d = t.join("run");
        std::fs::DirBuilder::new().mode(0o700).create(&d).unwrap();
        let meta = |d: &Path| std::fs::symlink_metadata(d).unwrap();
        let me = crate::sys::euid();
        // Our own directory will do.
        judge_run_dir(&d, &meta(&d), me).unwrap();
        // Another user's directory: as root, hand it to nobody; otherwise
        // ours is another user's to uid me + 1.
        let (dir_meta, judge_as) = if me == 0 {
            std::os::unix::fs::chown(&d, Some(65534), None).unwrap();
            (meta(&d), 0)
        } else {
            (meta(&d), me + 1)
        };
        let err = format!("{:#}", judge_run_dir(&d, &dir_meta, judge_as).unwrap_err());
        assert!(err.contains("neither root nor"), "{err}");
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn private_files_are_created_0600() {
        let t = scratch("private");
        let p = t.join("new.overlay");
        create_private(&p).unwrap();
        assert_eq!(mode(&p), 0o600);
        // A second creation at the same path is refused: nothing is reused.
        let e = create_private(&p).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        // A stale run-directory file with a loose mode is replaced by a
        // private one.
        let stale = t.join("0.log");
        std::fs::write(&stale, b"old").unwrap();
        set_mode(&stale, 0o666);
        create_in_run_dir(&stale).unwrap();
        assert_eq!(mode(&stale), 0o600);
        assert_eq!(std::fs::metadata(&stale).unwrap().len(), 0);
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn private_files_are_never_created_through_a_symlink() {
        let t = scratch("symlink");
        // A symlink to nowhere: refused, and nothing is created there.
        let target = t.join("elsewhere");
        let link = t.join("new.overlay");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = create_private(&link).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert!(!target.exists());
        // A symlink to a file: refused, and the file is untouched.
        std::fs::write(&target, b"precious").unwrap();
        let e = create_private(&link).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        std::fs::remove_dir_all(&t).unwrap();
    }
}
