//! Device lifetime: `add` checks everything it can before touching anything,
//! then (unless `--foreground`) forks a daemon that creates the ublk device,
//! opens or creates the overlay, serves I/O, and on SIGTERM or `del` stops
//! the device, flushes and closes the overlay clean, and removes its files.
//!
//! A device holds an exclusive `flock` on its overlay and a shared one on
//! its base for its whole life (a `recover`ing daemon takes them again), so
//! that no second device writes the overlay's map and no writer of the base
//! can run beside it. A device whose overlay could not be closed keeps its
//! state and live map under the run directory: `del` then writes the live
//! map into the overlay, as it does for a device whose daemon died.

pub(crate) mod control;
mod fetch_all;
pub(crate) mod service;
pub(crate) mod snapshot;
pub(crate) mod state;

use crate::engine::base::{BaseIo, DirectBase};
use crate::engine::cache::{CacheMode, CachePolicy};
use crate::engine::chain::{Backed, Lower, open_lower};
use crate::engine::device::{CowDevice, MapSource};
use crate::engine::geometry::{DEFAULT_BLOCK_SIZE, Geometry, check_block_size};
use crate::engine::map::{MapMemory, map_bytes};
use crate::engine::overlay::{OpenCheck, Overlay};
use crate::remote::{AwsEnv, Params as RemoteParams, RemoteBase, RemoteUrl};
use crate::sys::{Forked, MappedFile};
use crate::ublk::params::{IoMode, ZeroCopy};
use crate::ublk::{self, TargetConfig};
use crate::ublk::{Current, ServedDevice};
use anyhow::{Context, Result, anyhow, bail};
use state::DeviceState;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the daemon's threads share about the device it serves.
pub(crate) struct Live {
    /// The device served now (a live snapshot swaps it).
    pub(crate) current: Arc<Current>,
    /// The device's state file as the daemon last wrote it. The lock makes
    /// its changes one at a time (`ready`, a failed flush, a snapshot).
    state: Mutex<DeviceState>,
}

impl Live {
    /// The state file as last written.
    pub(crate) fn state(&self) -> DeviceState {
        self.lock_state().clone()
    }

    /// Changes the state with `change`, and writes it.
    pub(crate) fn save(&self, change: impl FnOnce(&mut DeviceState)) -> Result<()> {
        let mut st = self.lock_state();
        change(&mut st);
        st.save()
    }

    /// The state, held for a change that takes several steps (a snapshot).
    pub(crate) fn lock_state(&self) -> std::sync::MutexGuard<'_, DeviceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What `add` was asked for.
#[derive(Clone, Debug)]
pub(crate) struct AddRequest {
    pub(crate) base: PathBuf,
    pub(crate) overlay: Option<PathBuf>,
    pub(crate) block_size: Option<u32>,
    pub(crate) target: TargetConfig,
    pub(crate) read_only: bool,
    /// Allocate the overlay's data area before serving.
    pub(crate) preallocate: bool,
    pub(crate) foreground: bool,
    pub(crate) force: bool,
    pub(crate) policy: CachePolicy,
    /// How base blocks that the page cache lacks are read.
    pub(crate) base_io: BaseIo,
    /// For a base that is a URL: the AWS settings and the fetcher's
    /// parameters.
    pub(crate) remote: RemoteSettings,
}

/// What a remote base (`--base URL`) is opened with; kept in the state
/// file so that `recover` opens it the same way.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct RemoteSettings {
    /// The `AWS_*` variables as `add` saw them.
    pub(crate) env: AwsEnv,
    /// `--fetch-size` in bytes; 0 for the default.
    pub(crate) fetch_size: u64,
    /// `--fetch-timeout` in milliseconds; 0 for the default.
    pub(crate) fetch_timeout_ms: u64,
}

impl RemoteSettings {
    /// The fetcher's parameters: the defaults, with what the user set.
    pub(crate) fn params(&self) -> RemoteParams {
        let mut p = RemoteParams::default();
        if self.fetch_size != 0 {
            p.fetch_size = self.fetch_size;
        }
        if self.fetch_timeout_ms != 0 {
            p.fetch_timeout = Duration::from_millis(self.fetch_timeout_ms);
        }
        p
    }
}

/// The URL `base` names, if it names one (`s3://`, `http://`, `https://`).
pub(crate) fn base_url(base: &Path) -> Result<Option<RemoteUrl>> {
    let Some(s) = base.to_str().filter(|s| RemoteUrl::looks_like_url(s)) else {
        return Ok(None);
    };
    Ok(Some(RemoteUrl::parse(s)?))
}

/// Opens the remote base at `url`: one HEAD, with `req`'s settings. The
/// fetcher's threads are stopped again until the daemon serves it.
fn open_remote(req: &AddRequest, url: RemoteUrl) -> Result<Lower> {
    if req.base_io == BaseIo::Direct {
        bail!("--base-io direct: a remote base has no file to read directly");
    }
    let bs = req.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    let base = RemoteBase::open(url, req.remote.env.clone(), req.remote.params(), bs)?;
    Ok(Lower::remote(base)?)
}

/// Where the overlay comes from.
enum OverlaySource {
    /// `--overlay` names an existing overlay, already checked.
    Existing(PathBuf),
    /// `--overlay` names a file to create.
    New(PathBuf),
    /// No `--overlay`: a temporary file, removed at `del`. `None` makes a
    /// new one; a recovering daemon names the one made before.
    Temporary(Option<PathBuf>),
}

/// An `add` or `recover` whose inputs have all been checked; nothing was
/// written yet.
struct Prepared {
    req: AddRequest,
    /// The base: a raw image or block device, or a frozen overlay (a layer)
    /// and the chain below it.
    base: Lower,
    /// The base opened for direct reads (`--base-io direct`).
    direct: Option<DirectBase>,
    overlay: OverlaySource,
    block_size: u32,
    /// Take over this device (whose daemon died) instead of adding one.
    recover: Option<u32>,
    /// The user that added the device (see `DeviceState::owner`).
    owner: u32,
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("{}", p.display()))
}

/// Checks the base, the overlay and the options, and that ublk devices can
/// be created. Opens files read-only (the overlay read-write, to learn early
/// that it is not writable) and writes nothing.
fn prepare(mut req: AddRequest) -> Result<Prepared> {
    if let Some(bs) = req.block_size {
        check_block_size(bs)?;
    }
    if req.target.queues == 0 || req.target.depth == 0 || req.target.depth > 4096 {
        bail!("--queues must be at least 1 and --depth from 1 to 4096");
    }
    let url = base_url(&req.base)?;
    let base = match url {
        Some(url) => open_remote(&req, url)?,
        None => {
            if req.remote.fetch_size != 0 || req.remote.fetch_timeout_ms != 0 {
                bail!(
                    "--fetch-size and --fetch-timeout apply to a remote base (--base s3://, https://, http://) only"
                );
            }
            req.base = absolute(&req.base)?;
            // A new overlay records it (`Lower::backing`): its path must fit.
            open_lower(&req.base)?
        }
    };
    let layers = base.backed.layers().len();
    if layers > crate::ublk::exec::MAX_RING_LAYERS {
        bail!(
            "base {} is a chain of {layers} layers: a device serves at most {} below its overlay",
            req.base.display(),
            crate::ublk::exec::MAX_RING_LAYERS
        );
    }
    if let (Some(want), Some(layer)) = (req.block_size, base.block_size)
        && want != layer
    {
        bail!(
            "--block-size {want}: base {} is a layer of block size {layer}, which an overlay over it keeps",
            req.base.display()
        );
    }
    let direct = open_direct(&req, &base)?;
    let overlay = match req.overlay.clone() {
        None => OverlaySource::Temporary(None),
        Some(p) => {
            let p = absolute(&p)?;
            if p == req.base {
                bail!("the overlay cannot be the base itself");
            }
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => bail!("overlay {} is a directory", p.display()),
                Ok(_) => {
                    let f = File::options()
                        .read(true)
                        .write(true)
                        .open(&p)
                        .with_context(|| format!("opening overlay {}", p.display()))?;
                    let check = OpenCheck {
                        base: &base.identity,
                        block_size: req.block_size,
                        force: req.force,
                    };
                    refuse_if_used(&p, &f)?;
                    let o = Overlay::open(f, check).map_err(|e| match (&e, base.backed.remote()) {
                        (crate::engine::Error::Mismatch(_), Some(r)) => {
                            anyhow!(
                                "overlay {} was made for another object or another version of it: \
                                 {} is now {}; --force uses it anyway",
                                p.display(),
                                r.url(),
                                r.identity()
                            )
                        }
                        _ => anyhow::Error::from(e).context(format!("overlay {}", p.display())),
                    })?;
                    if o.header().failed() {
                        eprintln!(
                            "ublk-cow: warning: overlay {}: a flush of its last device failed; \
                             it is as of that device's last good flush, and data written \
                             after may be lost",
                            p.display()
                        );
                    }
                    OverlaySource::Existing(p)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if std::fs::symlink_metadata(&p).is_ok() {
                        bail!(
                            "overlay {} is a symlink to nothing: a new overlay is not created through a symlink",
                            p.display()
                        );
                    }
                    match p.parent() {
                        Some(d) if d.is_dir() => {}
                        _ => bail!("overlay {}: its directory does not exist", p.display()),
                    }
                    if let Some(st) = state::all()?
                        .into_iter()
                        .find(|st| st.snapshot_to.as_deref() == Some(p.as_path()))
                    {
                        bail!(
                            "overlay {} is the new overlay of an unfinished snapshot of device {}",
                            p.display(),
                            st.id
                        );
                    }
                    OverlaySource::New(p)
                }
                Err(e) => return Err(e).with_context(|| format!("overlay {}", p.display())),
            }
        }
    };
    let block_size = req
        .block_size
        .or(base.block_size)
        .unwrap_or(DEFAULT_BLOCK_SIZE);
    Geometry::new(base.size(), block_size)?;
    state::check_run_dir()?;
    ublk::check_available()?;
    ublk::check_io_mode(req.target.zero_copy, req.target.user_copy)?;
    if let Some(id) = req.target.id
        && ublk::device_exists(id)
    {
        bail!("ublk device {id} already exists");
    }
    Ok(Prepared {
        req,
        base,
        direct,
        overlay,
        block_size,
        recover: None,
        owner: crate::sys::uid(),
    })
}

/// Refuses an overlay that a device uses: one whose state file names it
/// (its daemon running, or dead and waiting for `recover` or `del`), or one
/// locked by another process. Takes no lock that outlives `file`.
fn refuse_if_used(path: &Path, file: &File) -> Result<()> {
    if let Some(st) = device_of(file)? {
        if st.daemon_alive() {
            bail!(
                "overlay {} is in use by device {} (daemon pid {})",
                path.display(),
                st.id,
                st.pid
            );
        }
        bail!(
            "overlay {} belongs to device {}, whose daemon is gone: \
             `ublk-cow recover -n {}` serves it again, `ublk-cow del -n {}` closes it",
            path.display(),
            st.id,
            st.id,
            st.id
        );
    }
    lock_overlay(path, file, Duration::ZERO)
}

/// The device whose state file names the overlay at `path` (its daemon
/// running, or dead and waiting for `recover` or `del`), for `info`.
pub(crate) fn in_use_by(path: &Path) -> Option<u32> {
    let file = File::open(path).ok()?;
    device_of(&file).ok().flatten().map(|st| st.id)
}

/// The device whose state file names the overlay open as `file`.
fn device_of(file: &File) -> Result<Option<DeviceState>> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().context("overlay")?;
    let same =
        |p: &Path| std::fs::metadata(p).is_ok_and(|o| o.dev() == m.dev() && o.ino() == m.ino());
    // A snapshot in progress holds its new overlay too.
    Ok(state::all()?
        .into_iter()
        .find(|st| same(&st.overlay) || st.snapshot_to.as_deref().is_some_and(same)))
}

/// Takes the exclusive lock on the overlay open as `file`, held as long as
/// the file is open. Refused, naming the device and daemon when a live one
/// holds it, if another open file holds it (in any process, this one too)
/// for longer than `patience` (the files of a daemon that was just killed
/// may take a moment to be closed).
fn lock_overlay(path: &Path, file: &File, patience: Duration) -> Result<()> {
    let shown = path.display();
    let deadline = Instant::now() + patience;
    loop {
        if crate::sys::try_flock(file, true).with_context(|| format!("locking overlay {shown}"))? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match device_of(file).ok().flatten() {
        Some(st) if st.daemon_alive() => bail!(
            "overlay {shown} is in use by device {} (daemon pid {})",
            st.id,
            st.pid
        ),
        _ => bail!("overlay {shown} is in use by another process (locked)"),
    }
}

/// Takes a shared lock on the base open as `file`: many devices may read a
/// base, and a writer of it that takes the exclusive lock is kept out.
fn lock_base(path: &Path, file: &File) -> Result<()> {
    let shown = path.display();
    if crate::sys::try_flock(file, false).with_context(|| format!("locking base {shown}"))? {
        return Ok(());
    }
    bail!("base {shown} is locked for writing by another process")
}

/// Takes the shared lock of `lock_base` on every file below a device: the
/// raw base (`path`), or each layer of a chain and the raw base under it.
fn lock_lower(path: &Path, below: &Backed) -> Result<()> {
    match below {
        // Nothing local to lock: the object's version is pinned instead.
        Backed::Remote(_) => Ok(()),
        Backed::Raw(f) => lock_base(path, f),
        Backed::Chain(_) => {
            for l in below.layers() {
                lock_base(&l.path, l.overlay.storage())?;
            }
            match (below.raw_path(), below.raw()) {
                (Some(p), Some(f)) => lock_base(p, f),
                _ => Ok(()),
            }
        }
    }
}

/// The base opened for direct reads, if `req` asks for them.
fn open_direct(req: &AddRequest, base: &Lower) -> Result<Option<DirectBase>> {
    Ok(match req.base_io {
        BaseIo::Cached => None,
        // Of a chain, the raw base at its bottom.
        BaseIo::Direct => Some(DirectBase::open(
            base.backed.raw_path().unwrap_or(&req.base),
        )?),
    })
}

/// `ublk-cow add`: prints the device path once it is ready for I/O.
pub(crate) fn add(req: AddRequest) -> Result<()> {
    start(prepare(req)?)
}

/// `ublk-cow recover -n N`: starts a new daemon for device N, whose daemon
/// died, with the options and the live map the old one left.
pub(crate) fn recover(id: u32, foreground: bool) -> Result<()> {
    need_root("recover")?;
    let Some(st) = DeviceState::load(id)? else {
        bail!("there is no ublk-cow device {id}");
    };
    // Before anything acts on it: a state file from before a restart names
    // a live map that holds whatever of it reached the disk.
    if !st.this_boot() {
        bail!(
            "device {id} was added before the machine restarted: nothing to recover; \
             `ublk-cow del -n {id}` removes what is left (overlay {} is as of its last flush)",
            st.overlay.display()
        );
    }
    // Under the snapshot lock (which waits for a `snapshot -n` in
    // progress), the state read again; an interrupted snapshot is finished
    // first, and the device then recovered over the new chain. The lock is
    // let go before the daemon is forked, which would inherit it.
    let st = {
        let _lock = snapshot::SnapshotLock::take(id)?;
        drop(st);
        match DeviceState::load(id)? {
            Some(st) if st.snapshot_to.is_some() && !st.daemon_alive() => {
                snapshot::finish_locked(st)?;
                DeviceState::load(id)?.context("the state file went away")?
            }
            Some(st) => st,
            None => bail!("there is no ublk-cow device {id}"),
        }
    };
    if st.daemon_alive() {
        bail!(
            "device {id} is alive (daemon pid {}): nothing to recover",
            st.pid
        );
    }
    // Its live map may name data that never reached the disk: a new daemon
    // would persist it at its first flush.
    if st.failed {
        bail!("{}", kept_note(&st));
    }
    if !ublk::device_exists(id) {
        bail!("ublk device {id} is gone; `ublk-cow del -n {id}` cleans up, `add` starts anew");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ublk::is_quiesced(id) {
        if Instant::now() > deadline {
            bail!("ublk device {id} is not waiting for recovery");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !state::map_path(id).exists() {
        bail!("the live map {} is missing", state::map_path(id).display());
    }
    let req = AddRequest {
        base: st.base.clone(),
        overlay: Some(st.overlay.clone()),
        block_size: Some(st.block_size),
        target: TargetConfig {
            id: Some(id),
            queues: st.queues,
            depth: st.depth,
            // The device keeps the mode it was added with.
            zero_copy: ZeroCopy::Auto,
            user_copy: false,
        },
        read_only: st.read_only,
        // Whatever `add` allocated is still allocated.
        preallocate: false,
        foreground,
        force: st.forced,
        policy: st.policy,
        base_io: st.base_io,
        remote: st.remote.clone(),
    };
    let base = match base_url(&req.base)? {
        Some(url) => open_remote(&req, url)?,
        None => open_lower(&req.base)?,
    };
    if let (Some(r), Some(was)) = (base.backed.remote(), &st.remote_identity)
        && r.identity() != was
    {
        bail!(
            "{}: the object changed since the device was added (it was {was}, it is now {})",
            r.url(),
            r.identity()
        );
    }
    let direct = open_direct(&req, &base)?;
    if base.size() != st.size {
        bail!(
            "base {} changed size since the device was added",
            req.base.display()
        );
    }
    let overlay = if st.temporary_overlay {
        OverlaySource::Temporary(Some(st.overlay.clone()))
    } else {
        OverlaySource::Existing(st.overlay.clone())
    };
    start(Prepared {
        req,
        base,
        direct,
        overlay,
        block_size: st.block_size,
        recover: Some(id),
        owner: st.owner,
    })
}

/// Set once the daemon's stderr is its log (`<id>.log`): an error before
/// that goes to `add` alone, which prints it as its one line.
static DETACHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Refuses, in one line, a command that changes devices when not run as
/// root (removing or serving a ublk device needs root).
fn need_root(command: &str) -> Result<()> {
    if !crate::sys::is_root() {
        bail!(
            "{command} needs root (uid {} is not): run it with sudo",
            crate::sys::euid()
        );
    }
    Ok(())
}

/// Serves a prepared device: in the foreground, or in a daemon while this
/// process waits to print the device path.
fn start(p: Prepared) -> Result<()> {
    if p.req.foreground {
        return serve(
            p,
            Box::new(|path| {
                println!("{path}");
                // Under systemd (Type=notify): the device accepts I/O now.
                service::notify(&format!("READY=1\nSTATUS=serving {path}"));
            }),
        );
    }
    let (mut parent_end, child_end) = UnixStream::pair().context("creating a pipe")?;
    // SAFETY: `add` and `recover` have started no thread yet: the ublk
    // device, its queues and the control socket are made in the child.
    match unsafe { crate::sys::fork() }.context("fork")? {
        Forked::Child => {
            drop(parent_end);
            let report = child_end.try_clone().context("pipe")?;
            let ready = Box::new(move |path: &str| {
                let _ = writeln!(&report, "ready {path}");
            });
            let code = match serve(p, ready) {
                Ok(()) => 0,
                Err(e) => {
                    let line = crate::cli::error_line(&e);
                    let _ = writeln!(&child_end, "error {line}");
                    // Once detached, the log keeps it; before, the error
                    // line that `add` prints is the only one.
                    if DETACHED.load(std::sync::atomic::Ordering::Relaxed) {
                        log::error!("{line}");
                    }
                    1
                }
            };
            std::process::exit(code);
        }
        Forked::Parent => {
            drop(child_end);
            // Allocating (and on tmpfs initializing) the whole overlay takes
            // time in proportion to the size.
            let waiting = p
                .req
                .preallocate
                .then(|| crate::progress::Progress::spinner("preallocating the overlay"));
            let mut line = String::new();
            let read = BufReader::new(&mut parent_end).read_line(&mut line);
            drop(waiting);
            read.context("waiting for the daemon")?;
            match line.trim_end().split_once(' ') {
                Some(("ready", path)) => {
                    println!("{path}");
                    Ok(())
                }
                Some(("error", msg)) => Err(anyhow!("{msg}")),
                _ => Err(anyhow!("the daemon exited before the device was ready")),
            }
        }
    }
}

/// Opens the overlay, creating it if needed (mode 0600, never through a
/// symlink); returns it and whether it is new.
fn open_overlay(src: &OverlaySource, id: u32) -> Result<(PathBuf, File, bool)> {
    let (path, create) = match src {
        OverlaySource::Existing(p) => (p.clone(), false),
        OverlaySource::New(p) => (p.clone(), true),
        OverlaySource::Temporary(Some(p)) => (p.clone(), false),
        OverlaySource::Temporary(None) => (
            std::env::temp_dir().join(format!("ublk-cow-{id}-{}.overlay", std::process::id())),
            true,
        ),
    };
    let file = if create {
        let f = state::create_private(&path)
            .with_context(|| format!("creating overlay {}", path.display()))?;
        // Its name durable before it takes a write (`sync_name`); made
        // for nothing when that fails.
        if let Err(e) = crate::engine::storage::sync_name(&path) {
            let _ = std::fs::remove_file(&path);
            return Err(e).with_context(|| format!("syncing the directory of {}", path.display()));
        }
        f
    } else {
        File::options()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening overlay {}", path.display()))?
    };
    Ok((path, file, create))
}

/// The live map: a file under the run directory, mapped shared. `fresh`
/// starts it empty; otherwise it is the map a dead daemon left.
fn map_memory(id: u32, blocks: u64, fresh: bool) -> Result<MapMemory> {
    let path = state::map_path(id);
    let f = if fresh {
        state::create_in_run_dir(&path)?
    } else {
        File::options()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?
    };
    let len = map_bytes(blocks);
    if fresh {
        f.set_len(len)
            .with_context(|| format!("sizing {}", path.display()))?;
    } else if f.metadata()?.len() != len {
        bail!("the live map {} has the wrong size", path.display());
    }
    let m =
        MappedFile::map(&f, len as usize).with_context(|| format!("mapping {}", path.display()))?;
    Ok(MapMemory::Mapped(m))
}

/// Creates the device and serves it until it is stopped. Runs in the daemon
/// (or in the foreground). On failure before `ready`, removes what it made.
fn serve(p: Prepared, ready: Box<dyn FnOnce(&str) + Send + Sync>) -> Result<()> {
    // A panic in any thread ends the whole daemon at once: the kernel then
    // quiesces the device and keeps its requests for `recover`, instead of a
    // queue dying alone and leaving the device hung.
    std::panic::set_hook(Box::new(|info| {
        log::error!("panic: {info}; the device waits for `ublk-cow recover`");
        std::process::abort();
    }));
    crate::sys::block_termination_signals();
    crate::sys::raise_open_files_limit();
    let Prepared {
        req,
        base,
        direct,
        overlay,
        block_size,
        recover,
        owner,
    } = p;
    let ctrl = match recover {
        None => ublk::create(&req.target)?,
        Some(id) => ublk::attach_for_recovery(id)?,
    };
    let id = ctrl.dev_info().dev_id;
    state::ensure_run_dir()?;
    if !req.foreground {
        let log =
            state::create_in_run_dir(&state::log_path(id)).context("creating the daemon log")?;
        crate::sys::detach(&log).context("detaching the daemon")?;
        DETACHED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let (dev, made) = open_device(&req, base, &overlay, block_size, recover, id)?;
    let unclean = !made.created && !dev.was_clean();
    if unclean {
        log::warn!(
            "overlay {} was not closed cleanly; using it as of its last flush",
            made.overlay.display()
        );
    }
    let st = DeviceState {
        id,
        pid: std::process::id() as i32,
        device: ctrl.get_bdev_path(),
        base: req.base.clone(),
        overlay: made.overlay.clone(),
        temporary_overlay: matches!(overlay, OverlaySource::Temporary(_)),
        block_size,
        size: dev.geometry().size(),
        queues: req.target.queues,
        depth: req.target.depth,
        read_only: req.read_only,
        recovered_unclean: unclean,
        forced: req.force,
        policy: req.policy,
        zero_copy: ublk::io_mode(&ctrl) == IoMode::ZeroCopy,
        user_copy: ublk::io_mode(&ctrl) == IoMode::UserCopy,
        base_io: req.base_io,
        owner,
        failed: false,
        snapshot_to: None,
        foreground: req.foreground,
        remote: req.remote.clone(),
        remote_identity: remote_identity_of(&dev),
        boot_id: state::boot_id(),
    };
    let queues = ctrl.dev_info().nr_hw_queues;
    let served = ServedDevice::new(dev, req.policy, req.preallocate, direct).and_then(|sh| {
        let sh = Arc::new(sh);
        ServedDevice::keep_fetched_units(&sh);
        Current::new(sh, queues)
    });
    let live = match served {
        Ok(current) => Arc::new(Live {
            current: Arc::new(current),
            state: Mutex::new(st.clone()),
        }),
        Err(e) => {
            made.remove();
            return Err(anyhow::Error::from(e).context("opening base and overlay for the queues"));
        }
    };
    if let Err(e) = control::serve(id, live.clone(), owner) {
        made.remove();
        return Err(e);
    }
    watch_failure(live.clone());
    std::thread::spawn(move || {
        let sig = crate::sys::wait_termination();
        log::info!("signal {sig}: stopping device {id}");
        let _ = ublk::stop(id);
    });
    let live_ready = live.clone();
    let served = ublk::serve(&ctrl, live.current.clone(), req.read_only, move |c| {
        let path = c.get_bdev_path();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Path::new(&path).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let saved = live_ready.save(|st| st.failed = live_ready.current.device().dev.failed());
        match saved {
            Ok(()) => ready(&path),
            Err(e) => {
                log::error!("{}", crate::cli::error_line(&e));
                let _ = ublk::stop(id);
            }
        }
    });
    // The device is stopped: no request is in flight any more. (The
    // control socket's threads may still hold a device, idle.)
    let shared = live.current.device();
    let st = live.state();
    let closed = shared.dev.shut_down().map_err(anyhow::Error::from);
    let kept = closed.is_err() && !st.temporary_overlay;
    if let Err(e) = &closed {
        log::error!("closing the overlay: {}", crate::cli::error_line(e));
    }
    if kept {
        // The live map (or, after a failed flush, the failed state) stays
        // for `del`; so does the ublk device, which keeps the id ours.
        let st = DeviceState {
            failed: shared.dev.failed(),
            ..st.clone()
        };
        if let Err(e) = st.save() {
            log::error!("{}", crate::cli::error_line(&e));
        }
        ctrl.disown();
        log::error!("{}", kept_note(&st));
    } else {
        st.remove_files();
    }
    drop(ctrl);
    if recover.is_some() && !kept {
        // A control handle made for recovery does not delete the device.
        let _ = ublk::delete(id);
    }
    served.map_err(|e| anyhow!("serving ublk device {id}: {e}"))?;
    closed?;
    // A clean stop leaves nothing behind; a failed one keeps its log.
    let _ = std::fs::remove_file(state::log_path(id));
    Ok(())
}

/// The identity of `dev`'s base if it is remote, for the state file.
fn remote_identity_of(dev: &CowDevice<Backed, File>) -> Option<crate::remote::Identity> {
    dev.base().remote().map(|r| r.identity().clone())
}

/// What stays of device `st` whose overlay could not be closed, and what
/// `del` does with it.
fn kept_note(st: &DeviceState) -> String {
    let id = st.id;
    if st.failed {
        format!(
            "a flush of device {id} failed: overlay {} stays as of its last good flush, \
             marked failed; `ublk-cow del -n {id}` removes the device",
            st.overlay.display()
        )
    } else {
        format!(
            "the live map of device {id} stays in {}; `ublk-cow del -n {id}` writes it \
             into overlay {}",
            state::map_path(id).display(),
            st.overlay.display()
        )
    }
}

/// Once a flush of the device fails: counts it in the stats, marks the
/// overlay failed, and says so in the state file (`list`). Watches the
/// device served now: after a live snapshot, the new one.
fn watch_failure(live: Arc<Live>) {
    std::thread::spawn(move || {
        let sh = loop {
            let sh = live.current.device();
            if sh.dev.wait_failed_for(Duration::from_secs(1)) {
                break sh;
            }
        };
        sh.stats
            .overlay_failed
            .store(1, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = sh.dev.mark_failed() {
            log::error!("marking the overlay failed: {e}");
        }
        // Before `ready` there is no state file to update.
        if state::state_path(live.state().id).exists()
            && let Err(e) = live.save(|st| st.failed = true)
        {
            log::error!("{}", crate::cli::error_line(&e));
        }
    });
}

/// The files `open_device` made, for `serve` to remove if it fails before
/// the device is served.
struct CreatedFiles {
    overlay: PathBuf,
    /// The overlay is new (not one that existed before).
    created: bool,
    /// The live map, when it is new (not the one a recovery takes over).
    map: Option<PathBuf>,
}

impl CreatedFiles {
    fn remove(&self) {
        if self.created {
            let _ = std::fs::remove_file(&self.overlay);
        }
        if let Some(m) = &self.map {
            let _ = std::fs::remove_file(m);
        }
    }
}

/// Opens or creates the overlay and the live map of device `id`, and the
/// device over them and `base`; with `--preallocate`, allocates the
/// overlay's data area. On failure removes what it made, and an existing
/// overlay that was clean is left clean.
fn open_device(
    req: &AddRequest,
    base: Lower,
    overlay: &OverlaySource,
    block_size: u32,
    recover: Option<u32>,
    id: u32,
) -> Result<(CowDevice<Backed, File>, CreatedFiles)> {
    lock_lower(&req.base, &base.backed)?;
    let (overlay_path, overlay_file, created) = open_overlay(overlay, id)?;
    // Another opener: nothing made here is removed, the overlay is theirs.
    let patience = Duration::from_secs(if recover.is_some() { 10 } else { 0 });
    lock_overlay(&overlay_path, &overlay_file, patience)?;
    let made = CreatedFiles {
        overlay: overlay_path,
        created,
        map: recover.is_none().then(|| state::map_path(id)),
    };
    let opened = (|| -> Result<CowDevice<Backed, File>> {
        if let Some(r) = base.backed.remote() {
            // In the daemon: the fetcher's threads start here, after the fork.
            r.connect()?;
        }
        let geo = Geometry::new(base.size(), block_size)?;
        let mem = map_memory(id, geo.blocks(), recover.is_none())?;
        let dev = if created {
            // Made with its backing recorded, then opened like any other.
            let made = overlay_file.try_clone().context("the new overlay")?;
            Overlay::create_backed(made, geo, &base.identity, base.backing.clone())?;
            let check = OpenCheck {
                base: &base.identity,
                block_size: None,
                force: false,
            };
            CowDevice::open(base.backed, overlay_file, check, MapSource::Load(mem))?
        } else {
            let check = OpenCheck {
                base: &base.identity,
                block_size: req.block_size,
                force: req.force,
            };
            let source = match recover {
                None => MapSource::Load(mem),
                Some(_) => MapSource::Live(mem),
            };
            CowDevice::open(base.backed, overlay_file, check, source)?
        };
        // An existing overlay may have another block size than `add`
        // checked a remote base's fetch size against.
        let fits = match dev.base().remote() {
            Some(r) => r
                .params()
                .check(dev.geometry().block_size())
                .map_err(anyhow::Error::from),
            None => Ok(()),
        };
        let ready = fits.and_then(|()| match req.preallocate {
            true => preallocate(&dev),
            false => Ok(()),
        });
        if let Err(e) = ready {
            // Opening marked the overlay in use; nothing was served, so an
            // overlay that was clean is clean again.
            if !created && dev.was_clean() {
                let _ = dev.shut_down();
            }
            return Err(e);
        }
        Ok(dev)
    })();
    match opened {
        Ok(dev) => Ok((dev, made)),
        Err(e) => {
            made.remove();
            Err(e)
        }
    }
}

/// `--preallocate`: allocates the overlay's data area, so that first writes
/// find their space already there.
/// One call, not pieces: where the space is not there, a file system such
/// as tmpfs then leaves the file as it was.
fn preallocate(dev: &CowDevice<Backed, File>) -> Result<()> {
    let size = dev.geometry().size();
    let overlay = dev.overlay();
    // Shown in the foreground on a terminal; `add` shows its own while a
    // daemon does this.
    let _waiting = crate::progress::Progress::spinner("preallocating the overlay");
    crate::sys::allocate(overlay.storage(), overlay.data_pos(0), size)
        .with_context(|| format!("preallocating {size} bytes of the overlay"))
}

/// `ublk-cow del -n N`: asks the daemon to stop (it flushes and closes the
/// overlay) and waits for it. For a device whose daemon is gone (dead, or
/// stopped without closing its overlay), first writes the live map into the
/// overlay and closes it clean, then removes the device and its files; if
/// the live map cannot be written, nothing is removed. A device whose flush
/// had failed is removed with its overlay as of its last good flush, and
/// `del` fails to say so.
pub(crate) fn del(id: u32) -> Result<()> {
    need_root("del")?;
    let Some(mut st) = DeviceState::load(id)? else {
        if ublk::device_exists(id) {
            bail!("ublk device {id} is not a ublk-cow device");
        }
        bail!("there is no ublk-cow device {id}");
    };
    let me = crate::sys::uid();
    if !state::may_use(me, st.owner) {
        bail!(
            "device {id}: permission denied to uid {me}: only root and its owner (uid {}) may remove it",
            st.owner
        );
    }
    if st.daemon_alive() {
        crate::sys::kill(st.pid, libc::SIGTERM).context("signalling the daemon")?;
        let _waiting = crate::progress::Progress::spinner(&format!(
            "device {id}: flushing the overlay and stopping"
        ));
        let deadline = Instant::now() + Duration::from_secs(120);
        while st.daemon_alive() {
            if Instant::now() > deadline {
                bail!(
                    "the daemon of device {id} (pid {}) did not stop in 120 s",
                    st.pid
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // A daemon that could not close its overlay keeps its state, for
        // what follows.
        match DeviceState::load(id)? {
            Some(kept) if kept.pid == st.pid => st = kept,
            _ => return Ok(()),
        }
    }
    // A state file from before a restart of the machine: its live map
    // holds whatever of it had reached the disk, and the ublk device with
    // its id is gone (another may have the id by now). The overlay is as
    // of its last flush, as after a power cut. A live snapshot it names is
    // left as it is: the new overlay may hold flushed writes (the state
    // file's own rename may not have reached the disk), and the old one
    // is as the snapshot left it.
    if !st.this_boot() {
        st.remove_files();
        let overlay = match st.temporary_overlay {
            true => "its temporary overlay removed".to_string(),
            false => format!("overlay {} is as of its last flush", st.overlay.display()),
        };
        let snapshot = match &st.snapshot_to {
            Some(new) => format!(
                "; a snapshot into {} was under way and is left as it was",
                new.display()
            ),
            None => String::new(),
        };
        eprintln!(
            "ublk-cow: device {id} was added before the machine restarted: {overlay}{snapshot}"
        );
        return Ok(());
    }
    if st.snapshot_to.is_some() {
        let _lock = snapshot::SnapshotLock::take(id)?;
        st = DeviceState::load(id)?.context("the state file went away")?;
        if st.snapshot_to.is_some() {
            st = snapshot::abandon(st)?;
        }
    }
    let mut failed = st.failed;
    if !st.temporary_overlay && !failed && state::map_path(id).exists() {
        failed = !close_from_live_map(&st).with_context(|| {
            let how = if ublk::is_quiesced(id) {
                format!("; `ublk-cow recover -n {id}` serves it again")
            } else {
                String::new()
            };
            format!(
                "writing the live map {} into overlay {} (nothing removed{how})",
                state::map_path(id).display(),
                st.overlay.display()
            )
        })?;
    }
    if ublk::device_exists(id) {
        ublk::delete(id)?;
    }
    st.remove_files();
    if failed && !st.temporary_overlay {
        // Its daemon marks the overlay failed once a flush fails, but may
        // have died before it could (its disk still failing then): marked
        // again here, so that the next `add` of it warns.
        let marked = match crate::engine::chain::mark_failed(&st.overlay) {
            Ok(()) => String::new(),
            Err(e) => format!("; marking it failed: {e}"),
        };
        bail!(
            "device {id} removed, but a flush of it had failed: overlay {} is as of its last \
             good flush, and writes after it may be lost (see {}){marked}",
            st.overlay.display(),
            state::log_path(id).display()
        );
    }
    Ok(())
}

/// Writes the live map that the gone daemon of device `st` left into its
/// overlay, made durable, and marks the overlay clean: what the daemon's
/// stop would have done. Holds the overlay's lock meanwhile. `Ok(false)`,
/// writing nothing, if the overlay is marked failed (a flush failed).
fn close_from_live_map(st: &DeviceState) -> Result<bool> {
    // A remote base is not asked: its identity is in the state file, and
    // closing reads no base data.
    let base = match (base_url(&st.base)?, &st.remote_identity) {
        (Some(url), Some(id)) => Lower::remote(RemoteBase::known(
            url,
            st.remote.env.clone(),
            st.remote.params(),
            st.block_size,
            id.clone(),
        )?)?,
        _ => open_lower(&st.base)?,
    };
    lock_lower(&st.base, &base.backed)?;
    let file = File::options()
        .read(true)
        .write(true)
        .open(&st.overlay)
        .with_context(|| format!("opening overlay {}", st.overlay.display()))?;
    lock_overlay(&st.overlay, &file, Duration::from_secs(10))?;
    let check = OpenCheck {
        base: &base.identity,
        block_size: Some(st.block_size),
        force: st.forced,
    };
    // Marked by the daemon after a failed flush that it could not note in
    // the state file: its live map may name lost data.
    let checked = Overlay::open(file, check)?;
    if checked.header().failed() {
        return Ok(false);
    }
    let file = checked.into_storage();
    let geo = Geometry::new(base.size(), st.block_size)?;
    let mem = map_memory(st.id, geo.blocks(), false)?;
    let dev = CowDevice::open(base.backed, file, check, MapSource::Live(mem))?;
    dev.close()?;
    Ok(true)
}

/// `ublk-cow del --all`: every device, each as `del -n N`. With none, says
/// so and succeeds.
pub(crate) fn del_all() -> Result<()> {
    need_root("del")?;
    let all = state::all()?;
    if all.is_empty() {
        println!("no ublk-cow devices");
        return Ok(());
    }
    let mut failed = 0;
    for st in &all {
        if let Err(e) = del(st.id) {
            eprintln!("ublk-cow: device {}: {}", st.id, crate::cli::error_line(&e));
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} of {} devices could not be removed", all.len());
    }
    Ok(())
}

/// A device as `list --json` prints it: the schema docs/usage.md documents
/// (not the state file, whose fields are internal and may change).
#[derive(serde::Serialize)]
struct ListEntry<'a> {
    id: u32,
    device: &'a str,
    /// As the table's STATE: running, unclean, dead or failed.
    state: &'static str,
    pid: i32,
    base: &'a Path,
    overlay: &'a Path,
    temporary_overlay: bool,
    size: u64,
    block_size: u32,
    read_only: bool,
    queues: u16,
    depth: u16,
    zero_copy: bool,
    user_copy: bool,
    base_io: BaseIo,
    cache_mode: CacheMode,
    /// The `--readahead` value: `off`, `auto`, or a window in bytes.
    readahead: String,
    cow_on_read: bool,
    forced: bool,
    owner: u32,
}

impl<'a> ListEntry<'a> {
    fn of(s: &'a DeviceState) -> ListEntry<'a> {
        ListEntry {
            id: s.id,
            device: &s.device,
            state: s.state_name(),
            pid: s.pid,
            base: &s.base,
            overlay: &s.overlay,
            temporary_overlay: s.temporary_overlay,
            size: s.size,
            block_size: s.block_size,
            read_only: s.read_only,
            queues: s.queues,
            depth: s.depth,
            zero_copy: s.zero_copy,
            user_copy: s.user_copy,
            base_io: s.base_io,
            cache_mode: s.policy.mode,
            readahead: s.policy.readahead.to_string(),
            cow_on_read: s.policy.cow_on_read,
            forced: s.forced,
            owner: s.owner,
        }
    }
}

/// `bytes` in binary units, as `ls -h` does: `512`, `4K`, `1.5G`.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["", "K", "M", "G", "T", "P"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    let scale = 1u64 << (10 * unit);
    if bytes.is_multiple_of(scale) {
        format!("{}{}", bytes / scale, UNITS[unit])
    } else {
        format!("{:.1}{}", bytes as f64 / scale as f64, UNITS[unit])
    }
}

/// `ublk-cow list [-n N] [--json] [--bytes]`.
pub(crate) fn list(number: Option<u32>, json: bool, bytes: bool) -> Result<()> {
    let mut all = state::all()?;
    if let Some(n) = number {
        all.retain(|s| s.id == n);
        if all.is_empty() {
            bail!("there is no ublk-cow device {n}");
        }
    }
    if json {
        let rows: Vec<_> = all.iter().map(ListEntry::of).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let size = |n: u64| if bytes { n.to_string() } else { human(n) };
    let mut rows = vec![[
        "ID".to_string(),
        "DEVICE".into(),
        "SIZE".into(),
        "BLOCK".into(),
        "STATE".into(),
        "BASE".into(),
        "OVERLAY".into(),
    ]];
    for s in &all {
        rows.push([
            s.id.to_string(),
            s.device.clone(),
            size(s.size),
            size(u64::from(s.block_size)),
            s.state_name().into(),
            s.base.display().to_string(),
            format!(
                "{}{}",
                s.overlay.display(),
                if s.temporary_overlay {
                    " (temporary)"
                } else {
                    ""
                }
            ),
        ]);
    }
    // Each column as wide as its widest cell, so a long path shifts the
    // columns after it instead of running into them; sizes to the right.
    let width: Vec<usize> = (0..7)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = std::io::stdout().lock();
    for r in &rows {
        let line = format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {:<w4$}  {:<w5$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            r[6],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3],
            w4 = width[4],
            w5 = width[5],
        );
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// `ublk-cow cache -n N`: a cache request through the daemon's socket;
/// returns when the range is done, with progress on a terminal.
pub(crate) fn cache(
    id: u32,
    offset: u64,
    length: Option<u64>,
    mode: Option<CacheMode>,
) -> Result<()> {
    let st = live_device(id)?;
    if offset >= st.size {
        bail!(
            "offset {offset} is past the end of device {id} ({} bytes)",
            st.size
        );
    }
    let length = length.unwrap_or(st.size - offset);
    if length == 0 || length > st.size - offset {
        bail!(
            "range {offset}+{length} is past the end of device {id} ({} bytes)",
            st.size
        );
    }
    let bar = crate::progress::Progress::bytes(&format!("cache of device {id}"), length);
    let start = Instant::now();
    let req = control::Request::Cache {
        offset,
        length,
        mode,
    };
    let last = control::call(id, &req, |r| {
        if let Some(p) = r.progress {
            bar.set(p);
        }
    });
    bar.finish();
    let done = last?
        .done
        .ok_or_else(|| anyhow!("the daemon did not finish the request"))?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "cached {} MiB in {secs:.1} s: {} MiB copied to the overlay, {} MiB read, {} MiB advised (base), {} MiB advised (overlay)",
        length >> 20,
        done.copied >> 20,
        done.read >> 20,
        done.fadvised_base >> 20,
        done.fadvised_overlay >> 20
    );
    Ok(())
}

/// `ublk-cow stats -n N [--json]`.
pub(crate) fn stats(id: u32, json: bool) -> Result<()> {
    live_device(id)?;
    let reply = control::call(id, &control::Request::Stats, |_| {})?;
    let s = reply
        .stats
        .ok_or_else(|| anyhow!("the daemon sent no stats"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        for (name, v) in s.rows() {
            println!("{name:<28} {v}");
        }
    }
    Ok(())
}

/// The state of device `id`, which must be ours and running.
fn live_device(id: u32) -> Result<DeviceState> {
    let Some(st) = DeviceState::load(id)? else {
        bail!("there is no ublk-cow device {id}");
    };
    if !st.daemon_alive() {
        bail!("the daemon of device {id} is not running (try: ublk-cow recover -n {id})");
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_opener_of_an_overlay_is_refused() {
        let p = std::env::temp_dir().join(format!("ublk-cow-lock-{}", std::process::id()));
        std::fs::write(&p, b"overlay").unwrap();
        let open = || File::options().read(true).write(true).open(&p).unwrap();
        let first = open();
        lock_overlay(&p, &first, Duration::ZERO).unwrap();
        // Another open of the same file, in the same process, as a second
        // `add --overlay` in another process would be.
        let second = open();
        let e = lock_overlay(&p, &second, Duration::from_millis(100)).unwrap_err();
        assert!(e.to_string().contains("is in use"), "{e}");
        // Readers of a base share it; a writer is kept out while one reads.
        lock_base(&p, &open()).unwrap_err();
        drop(first);
        lock_overlay(&p, &second, Duration::ZERO).unwrap();
        drop(second);
        let reader = open();
        lock_base(&p, &reader).unwrap();
        lock_base(&p, &open()).unwrap();
        assert!(!crate::sys::try_flock(&open(), true).unwrap());
        std::fs::remove_file(&p).unwrap();
    }
}
