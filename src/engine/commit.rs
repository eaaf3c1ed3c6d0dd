//! `commit`: merges the blocks an overlay (a live overlay or a frozen layer)
//! holds into its backing — the layer below it, or the raw base image, the
//! one operation that ever writes a base — after which the overlay holds no
//! block, reads the same through its backing, and records the backing's new
//! identity. Owns the merge, its crash ordering, and the checks that refuse
//! a commit that would change what a device or another overlay reads.
//!
//! # What is merged
//!
//! A written block (`Allocated`) is copied into the backing (at its offset
//! in a raw base; into the data area of a layer below, marked `Allocated`
//! in its map). A `Zero` block makes the backing read zeros there (a raw
//! base: a hole punched, or zeros written where the file cannot; a layer:
//! marked `Zero`, its data freed). A `Copied` block holds the bytes below
//! already and is skipped. Copies go in runs, inside the kernel
//! (`copy_file_range`) when both sides are files, else in large reads and
//! writes.
//!
//! # Crash ordering
//!
//! Each step is durable before the next starts, so that a commit stopped
//! anywhere (`kill -9`, power cut) and run again ends as one that was not:
//!
//! 1. The overlay's header gets the *committing* flag (and the file's
//!    modification time, see below). From here a rerun accepts a backing
//!    whose identity no longer matches the one recorded: it is this
//!    commit's own doing.
//! 2. Every held block is written into the backing; the backing is synced
//!    (a layer below: data first, synced, then its map pages, synced),
//!    its modification time too, which the identity of step 5 holds (a
//!    data sync leaves it to the file system's next journal commit). A
//!    rerun writes the same bytes again: they are still in the overlay.
//!    A layer below has the *receiving* flag from before the first write
//!    until it is synced: meanwhile it reads neither as before nor as
//!    after, and nothing but this commit's rerun uses it.
//! 3. The overlay's map is cleared and synced. A page cleared means the
//!    blocks it held are durable below; a page not yet cleared is copied
//!    again by a rerun.
//! 4. The overlay's data area is freed (its map holds nothing now).
//! 5. The header records the backing's new identity and clears the flag.
//! 6. A frozen overlay gets its modification time back, so that overlays
//!    made over it, which record it as part of its identity, still accept
//!    it: it reads the same as before. Every run over a frozen overlay
//!    restores it (it is never modified otherwise), so a stop between 5
//!    and 6 is mended by running the commit again.
//!
//! # What is refused
//!
//! A commit changes the backing, so it is refused (one line, nothing
//! changed) while the overlay or its backing is in use by a device: either
//! holds a lock we cannot take (devices hold an exclusive `flock` on their
//! top overlay and a shared one on what is below it), or a running
//! device's chain, from its state file, has it. Refused too while another
//! overlay has the backing below it other than through this overlay (what
//! it reads would change under it): we find those among the running
//! devices' chains and the overlays in the directories of the overlay and
//! of its backing, whose recorded backings are followed down. An overlay
//! elsewhere is not found: that is the limit of the check, which `--force`
//! skips (it skips only that one). Overlays above the one committed are
//! not harmed: it reads the same afterwards.

use crate::engine::base::{BaseIdentity, mtime_ns, open_base};
use crate::engine::chain::{Chain, MAX_LAYERS, Purpose, looks_like_overlay};
use crate::engine::locks::{BlockLocks, MAX_LOCK_BLOCKS};
use crate::engine::map::{BlockMap, BlockState, MapMemory};
use crate::engine::overlay::{BackingKind, Overlay};
use crate::engine::storage::Storage;
use crate::engine::{Error, IoContext};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The largest piece copied with one call (and the buffer of a copy by
/// reads and writes).
const CHUNK: u64 = 8 << 20;

/// What a commit writes into.
pub(crate) enum Target<B: Storage> {
    /// A raw image or block device: block `i` at `i * block size`.
    Raw(B),
    /// A layer below: its data area and its map.
    Layer(Overlay<B>),
}

/// What a commit did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Blocks copied into the backing.
    pub written: u64,
    /// Blocks made zero in the backing.
    pub zeroed: u64,
    /// Blocks copied up from below, passed over.
    pub skipped: u64,
    /// A commit stopped before was finished.
    pub resumed: bool,
}

/// Whether `now`, the backing's identity, is the one `layer` recorded.
fn matches(layer: &Overlay<impl Storage>, now: &BaseIdentity) -> Result<(), String> {
    let was = &layer.header().base;
    if was.size != now.size || now.size != layer.geometry().size() {
        Err(format!(
            "its size differs (recorded {} bytes, now {} bytes)",
            was.size, now.size
        ))
    } else if !now.fingerprint_matches(was.fingerprint) {
        Err("its contents differ".into())
    } else if was.mtime_ns != now.mtime_ns {
        Err("its modification time differs".into())
    } else {
        Ok(())
    }
}

/// Copies `len` bytes from `src` at `from` to `dst` at `to`: inside the
/// kernel when both are files and it can, else through `buf`.
fn copy(
    src: &impl Storage,
    from: u64,
    dst: &impl Storage,
    to: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let mut done = 0;
    if let (Some(s), Some(d)) = (src.as_file(), dst.as_file()) {
        while done < len {
            match crate::sys::copy_file_range(s, from + done, d, to + done, (len - done).min(CHUNK))
            {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(e),
            }
        }
    }
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        buf.resize(n, 0);
        src.read_at(&mut buf[..n], from + done)?;
        dst.write_at(&buf[..n], to + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Makes `[off, off+len)` of a raw base read as zeros: a hole, or zeros
/// written where it cannot punch one.
fn zero_raw(dst: &impl Storage, off: u64, len: u64) -> io::Result<()> {
    match dst.punch(off, len) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
            ) =>
        {
            let zeros = vec![0u8; len.min(CHUNK) as usize];
            let mut at = off;
            while at < off + len {
                let n = zeros.len().min((off + len - at) as usize);
                dst.write_at(&zeros[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
        r => r,
    }
}

/// Frees `[off, off+len)` of an overlay whose map no longer holds it: its
/// space only, so a file system that cannot punch holes keeps it.
fn free(s: &impl Storage, off: u64, len: u64) -> io::Result<()> {
    match s.punch(off, len) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
            ) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// The merge itself (the module doc's steps 1 to 5), over any storage.
/// `now` is the backing's identity as found; `mtime_ns` the overlay file's
/// modification time now, kept for step 6 (done by the caller, who has the
/// file); `identity` computes the backing's identity after the writes;
/// `progress` is told the bytes done and the total.
pub(crate) fn merge<L: Storage, B: Storage>(
    layer: &mut Overlay<L>,
    target: &Target<B>,
    now: &BaseIdentity,
    mtime_ns: u64,
    identity: impl FnOnce() -> Result<BaseIdentity, Error>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Merged, Error> {
    let h = layer.header().clone();
    if h.receiving() {
        // Half merged from the overlay above: what it would write below
        // was never its own. That commit's rerun comes first.
        return Err(Error::invalid(crate::engine::overlay::STOPPED_RECEIVING));
    }
    let resumed = h.committing();
    if !resumed {
        if let Err(why) = matches(layer, now) {
            return Err(Error::mismatch(format!(
                "its backing changed since it was made: {why}"
            )));
        }
        if !h.clean() || h.failed() {
            return Err(Error::invalid(
                "it was not closed cleanly: `ublk-cow del` (or `recover`) its device first",
            ));
        }
    } else if now.size != h.geometry.size() {
        return Err(Error::mismatch(format!(
            "its backing has {} bytes, the overlay {}",
            now.size,
            h.geometry.size()
        )));
    }
    let geo = h.geometry;
    let blocks = geo.blocks();
    let map = BlockMap::new(MapMemory::heap(blocks), blocks);
    layer.read_map(&map)?;
    let c = map.counts();
    let out = Merged {
        written: c.allocated - c.copied,
        zeroed: c.zero,
        skipped: c.copied,
        resumed,
    };
    if c.allocated + c.zero == 0 && !resumed {
        return Ok(out);
    }
    let below = match target {
        Target::Layer(o) => {
            if o.geometry() != geo {
                return Err(Error::mismatch(format!(
                    "the layer below has another geometry ({} bytes in blocks of {}, the \
                     overlay {} in blocks of {})",
                    o.geometry().size(),
                    o.geometry().block_size(),
                    geo.size(),
                    geo.block_size()
                )));
            }
            let m = BlockMap::new(MapMemory::heap(blocks), blocks);
            o.read_map(&m).map_err(|e| below_err("its map", e))?;
            Some(m)
        }
        Target::Raw(_) => None,
    };
    if !resumed {
        // Only a frozen overlay has overlays over it that record its
        // mtime; a live one's is not kept (it may be frozen later, and
        // then its mtime then is the one recorded above it).
        layer.begin_commit(if h.frozen() { mtime_ns } else { 0 })?;
    }
    // A layer below that takes no write (the overlay holds only copies)
    // is left as it is, its modification time included.
    let receives = out.written + out.zeroed > 0;
    if let (Target::Layer(o), true) = (target, receives) {
        o.set_receiving(true)
            .map_err(|e| below_err("marking it as receiving the commit", e))?;
    }

    // Step 2: every held block into the backing.
    let total = (out.written + out.zeroed) * geo.block_size() as u64;
    let mut done = 0u64;
    progress(0, total);
    let mut buf = Vec::new();
    let locks = BlockLocks::default();
    let mut zeroed_runs = Vec::new();
    let mut b = 0;
    while b < blocks {
        let (state, n) = map.run_at(b, blocks);
        let (start, end) = (geo.block_start(b), geo.block_end(b + n - 1));
        match state {
            BlockState::Allocated => {
                let dst_off = match target {
                    Target::Raw(_) => start,
                    Target::Layer(o) => o.data_pos(start),
                };
                let io = match target {
                    Target::Raw(d) => copy(
                        layer.storage(),
                        layer.data_pos(start),
                        d,
                        dst_off,
                        end - start,
                        &mut buf,
                    ),
                    Target::Layer(o) => copy(
                        layer.storage(),
                        layer.data_pos(start),
                        o.storage(),
                        dst_off,
                        end - start,
                        &mut buf,
                    ),
                };
                io.ctx(|| format!("copying {} bytes at {start} into the backing", end - start))?;
            }
            BlockState::Zero => match target {
                Target::Raw(d) => zero_raw(d, start, end - start)
                    .ctx(|| format!("zeroing {} bytes at {start} in the backing", end - start))?,
                Target::Layer(_) => zeroed_runs.push((start, end)),
            },
            BlockState::Copied | BlockState::Unallocated => {}
        }
        if let (Some(m), BlockState::Allocated | BlockState::Zero) = (&below, state) {
            let mut at = b;
            while at < b + n {
                let k = (b + n - at).min(MAX_LOCK_BLOCKS);
                let g = locks
                    .try_lock(at, k)
                    .expect("no one else holds these locks");
                m.set_range(&g, at..at + k, state);
                at += k;
            }
        }
        if matches!(state, BlockState::Allocated | BlockState::Zero) {
            done += end - start;
            progress(done, total);
        }
        b += n;
    }
    match (target, &below) {
        // The backing's modification time is part of the identity step 5
        // records: it is made durable with the data (`sync_all`), or a power
        // cut could take it back and leave the overlay refusing its backing.
        (Target::Raw(d), _) => d.sync_all().ctx(|| "syncing the backing".into())?,
        (Target::Layer(o), Some(m)) => {
            o.storage()
                .sync()
                .ctx(|| "syncing the data of the layer below".into())?;
            o.write_map_pages(&m.take_dirty_pages())
                .ctx(|| "writing the map of the layer below".into())?;
            o.storage()
                .sync()
                .ctx(|| "syncing the map of the layer below".into())?;
            // Its zero blocks' data is no longer read: free it.
            for (start, end) in zeroed_runs {
                free(o.storage(), o.data_pos(start), end - start)
                    .ctx(|| "freeing zeroed blocks of the layer below".into())?;
            }
            // Whole again: its flag cleared, with the file's modification
            // time durable (a header write syncs all).
            if receives {
                o.set_receiving(false)
                    .map_err(|e| below_err("ending its receiving of the commit", e))?;
            }
        }
        (Target::Layer(_), None) => unreachable!("a layer's map is loaded"),
    }

    // Step 3: the overlay's map cleared.
    let h = layer.header().clone();
    let zeros = vec![0u8; h.map_bytes.min(CHUNK) as usize];
    let mut at = 0;
    while at < h.map_bytes {
        let n = zeros.len().min((h.map_bytes - at) as usize);
        layer
            .storage()
            .write_at(&zeros[..n], h.map_offset + at)
            .ctx(|| "clearing the overlay's map".into())?;
        at += n as u64;
    }
    layer
        .storage()
        .sync()
        .ctx(|| "syncing the overlay's map".into())?;
    // Step 4: its data freed.
    free(layer.storage(), h.data_offset, geo.size())
        .ctx(|| "freeing the overlay's data area".into())?;
    layer
        .storage()
        .sync()
        .ctx(|| "syncing the overlay".into())?;
    // Step 5: the backing's identity recorded, the flag cleared.
    let id = identity()?;
    layer.end_commit(id)?;
    Ok(out)
}

fn below_err(what: &str, e: Error) -> Error {
    match e {
        Error::Io { context, source } => Error::Io {
            context: format!("the layer below: {what}: {context}"),
            source,
        },
        e => Error::corrupt(format!("the layer below: {what}: {e}")),
    }
}

/// A running device's number and its top overlay, from its state file.
#[derive(Clone, Debug)]
pub struct DeviceUse {
    pub id: u32,
    pub overlay: PathBuf,
}

/// What `commit` is told besides the overlay.
pub struct CommitOptions {
    /// Commit even when other overlays have the backing below them.
    pub force: bool,
    /// The running devices.
    pub devices: Vec<DeviceUse>,
}

fn same(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// The overlay at `path`'s header, if it is an overlay (read-only, no lock).
fn header_of(path: &Path) -> Option<crate::engine::overlay::Header> {
    // Only regular files are opened: opening a FIFO or a device node (a
    // block device's directory is /dev) could block or act.
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let f = File::open(path).ok()?;
    if !f.metadata().ok()?.is_file() || !looks_like_overlay(&f).ok()? {
        return None;
    }
    Overlay::open_unchecked(f).ok().map(|o| o.header().clone())
}

/// The files of the chain whose top is `path`, top first, as far as their
/// headers can be read (headers only: nothing is checked).
fn chain_files(path: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut next = Some(path.to_path_buf());
    while let Some(p) = next.take() {
        let Ok(m) = std::fs::metadata(&p) else { break };
        if out.len() > MAX_LAYERS || out.iter().any(|(_, o)| same(o, &m)) {
            break;
        }
        let h = header_of(&p);
        out.push((p, m));
        if let Some(h) = h
            && let Some(b) = h.backing.path
        {
            next = Some(b);
        }
    }
    out
}

/// Takes an exclusive `flock` on `file`, waiting up to a second (a process
/// that forked while holding it holds it until its child runs a program).
fn lock_exclusive(file: &File, who: &str) -> Result<bool, Error> {
    for _ in 0..100 {
        if crate::sys::try_flock(file, true).ctx(|| format!("locking {who}"))? {
            return Ok(true);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(false)
}

/// `ublk-cow commit`: merges the overlay at `path` into its backing (see
/// the module doc); `progress` is told the bytes done and the total.
pub fn commit(
    path: &Path,
    opts: &CommitOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Merged, Error> {
    let who = format!("overlay {}", path.display());
    let about = |e: Error| crate::engine::chain::about(&who, e);
    let Some(h) = header_of(path) else {
        return Err(match std::fs::metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Error::invalid(format!("{who} does not exist"))
            }
            _ => Error::invalid(format!("{} is not a ublk-cow overlay", path.display())),
        });
    };
    let Some(backing) = h.backing.path.clone() else {
        return Err(Error::invalid(format!(
            "{who} records no backing (made by an older version): there is nothing to \
             commit it into"
        )));
    };
    if h.backing.kind == BackingKind::Remote {
        return Err(Error::invalid(format!(
            "{who}: its base is remote ({}): commit writes only a local file",
            backing.display()
        )));
    }
    let lmeta = std::fs::metadata(path).ctx(|| who.clone())?;
    let bmeta = std::fs::metadata(&backing).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Error::invalid(format!(
            "{who}: its backing {} does not exist",
            backing.display()
        )),
        _ => Error::Io {
            context: format!("{who}: its backing {}", backing.display()),
            source: e,
        },
    })?;
    if same(&lmeta, &bmeta) {
        return Err(Error::invalid(format!("{who} is its own backing")));
    }

    // In use by a running device, by its state file?
    for d in &opts.devices {
        for (p, m) in chain_files(&d.overlay) {
            let what = if same(&m, &lmeta) {
                who.clone()
            } else if same(&m, &bmeta) {
                format!("{who}: its backing {}", backing.display())
            } else {
                continue;
            };
            let how = if p == d.overlay {
                ""
            } else {
                ", below its overlay"
            };
            return Err(Error::invalid(format!(
                "{what} is in use by device {} (/dev/ublkb{}){how}: `ublk-cow del -n {}` first",
                d.id, d.id, d.id
            )));
        }
    }

    // Others stacked on the backing, not through this overlay.
    if !opts.force {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for p in [path, backing.as_path()] {
            let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            if let Some(d) = abs.parent()
                && !dirs.iter().any(|x| x == d)
            {
                dirs.push(d.to_path_buf());
            }
        }
        let mut candidates: Vec<PathBuf> = opts.devices.iter().map(|d| d.overlay.clone()).collect();
        for d in &dirs {
            if let Ok(rd) = std::fs::read_dir(d) {
                candidates.extend(rd.flatten().map(|e| e.path()));
            }
        }
        for c in candidates {
            let files = chain_files(&c);
            for pair in files.windows(2) {
                let (upper, lower) = (&pair[0], &pair[1]);
                if same(&upper.1, &lmeta) {
                    break;
                }
                if same(&lower.1, &bmeta) {
                    return Err(Error::invalid(format!(
                        "{who}: overlay {} also has its backing {} below it, and would read \
                         other data after the commit; --force commits anyway",
                        upper.0.display(),
                        backing.display()
                    )));
                }
            }
        }
    }

    // The overlay, locked: no device may open it meanwhile.
    let lfile = File::options()
        .read(true)
        .write(true)
        .open(path)
        .ctx(|| who.clone())?;
    if !lock_exclusive(&lfile, &who)? {
        return Err(Error::invalid(format!(
            "{who} is in use by another process (locked)"
        )));
    }
    let mtime = mtime_ns(&lfile.metadata().ctx(|| who.clone())?);
    let mut layer = Overlay::open_unchecked(lfile).map_err(&about)?;
    let h = layer.header().clone();

    // The backing, locked: a device over it holds a shared lock.
    let bwho = format!("its backing {}", backing.display());
    let bfile = File::options()
        .read(true)
        .write(true)
        .open(&backing)
        .map_err(|e| {
            about(Error::Io {
                context: format!("opening {bwho} for writing"),
                source: e,
            })
        })?;
    if !lock_exclusive(&bfile, &bwho)? {
        return Err(about(Error::invalid(format!(
            "{bwho} is in use by a device or another process (locked)"
        ))));
    }
    let is_overlay =
        bfile.metadata().is_ok_and(|m| m.is_file()) && looks_like_overlay(&bfile).unwrap_or(false);
    let found = if is_overlay {
        BackingKind::Overlay
    } else if bmeta.file_type().is_block_device() {
        BackingKind::BlockDevice
    } else {
        BackingKind::File
    };
    if found != h.backing.kind {
        return Err(about(Error::mismatch(format!(
            "{bwho} was a {} and is now a {}",
            h.backing.kind.name(),
            found.name()
        ))));
    }
    let merged = if is_overlay {
        let chain_id = |b: &Path| -> Result<BaseIdentity, Error> {
            let c = Chain::open(b, Purpose::Reads)?;
            c.identity()
        };
        // A rerun takes the layer below as its stopped run left it.
        let now = if h.committing() {
            Chain::open_receiving(&backing).and_then(|c| c.identity())
        } else {
            chain_id(&backing)
        }
        .map_err(&about)?;
        let below = Overlay::open_unchecked(bfile).map_err(|e| about(below_err("", e)))?;
        if !below.header().frozen() {
            return Err(about(Error::invalid(format!(
                "{bwho} is a live overlay, not a layer"
            ))));
        }
        let target = Target::Layer(below);
        merge(
            &mut layer,
            &target,
            &now,
            mtime,
            || chain_id(&backing),
            progress,
        )
    } else {
        let now = open_base(&backing).map_err(&about)?.identity;
        let target = Target::Raw(bfile);
        merge(
            &mut layer,
            &target,
            &now,
            mtime,
            || open_base(&backing).map(|b| b.identity),
            progress,
        )
    }
    .map_err(&about)?;

    // Step 6: a frozen overlay's modification time back.
    let h = layer.header().clone();
    let f = layer.storage();
    let now = mtime_ns(&f.metadata().ctx(|| who.clone())?);
    if h.frozen() && h.commit_mtime_ns != 0 && now != h.commit_mtime_ns {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(h.commit_mtime_ns);
        f.set_times(std::fs::FileTimes::new().set_modified(t))
            .and_then(|_| f.sync_all())
            .ctx(|| format!("{who}: restoring its modification time"))?;
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::geometry::Geometry;
    use crate::engine::overlay::{Backing, OpenCheck};
    use crate::engine::storage::SimDisk;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    const BS: u64 = 4096;
    const BLOCKS: u64 = 48;

    /// A disk whose writes, punches and syncs fail (EIO) once a budget
    /// shared with other such disks is spent: the commit stopped there.
    struct Cut {
        disk: Arc<SimDisk>,
        left: Arc<AtomicI64>,
    }

    impl Cut {
        fn spend(&self) -> io::Result<()> {
            if self.left.fetch_sub(1, Ordering::SeqCst) <= 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            Ok(())
        }
    }

    impl Storage for Cut {
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            self.disk.read_at(buf, off)
        }
        fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            self.spend()?;
            self.disk.write_at(buf, off)
        }
        fn punch(&self, off: u64, len: u64) -> io::Result<()> {
            self.spend()?;
            self.disk.punch(off, len)
        }
        fn sync(&self) -> io::Result<()> {
            self.spend()?;
            self.disk.sync()
        }
        fn sync_all(&self) -> io::Result<()> {
            self.spend()?;
            self.disk.sync_all()
        }
        fn len(&self) -> io::Result<u64> {
            self.disk.len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.spend()?;
            self.disk.set_len(len)
        }
        fn allocate(&self, off: u64, len: u64) -> io::Result<()> {
            self.spend()?;
            self.disk.allocate(off, len)
        }
    }

    fn geo() -> Geometry {
        Geometry::new(BLOCKS * BS, BS as u32).unwrap()
    }

    fn pattern(seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..BLOCKS * BS)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// The identity of a backing that reads as `image`, modified at `mtime`.
    fn identity(image: &[u8], mtime: u64) -> BaseIdentity {
        BaseIdentity::compute(&SimDisk::new(image.to_vec()), image.len() as u64, mtime).unwrap()
    }

    /// An overlay over a backing reading as `below`: block `b` in state
    /// `states[b % len]`, its data from `data` (a copied block's from
    /// `below`); clean, and frozen if asked.
    fn overlay(
        below: &[u8],
        states: &[BlockState],
        data: &[u8],
        frozen: bool,
    ) -> (Vec<u8>, Vec<u8>) {
        let g = geo();
        let backing = Backing::new(BackingKind::File, Path::new("/below")).unwrap();
        let mut o =
            Overlay::create_backed(SimDisk::new(Vec::new()), g, &identity(below, 1), backing)
                .unwrap();
        let map = BlockMap::new(MapMemory::heap(BLOCKS), BLOCKS);
        let locks = BlockLocks::default();
        let mut reads = below.to_vec();
        for b in 0..BLOCKS {
            let s = states[b as usize % states.len()];
            let r = (b * BS) as usize..((b + 1) * BS) as usize;
            match s {
                BlockState::Allocated => {
                    o.storage()
                        .write_at(&data[r.clone()], o.data_pos(b * BS))
                        .unwrap();
                    reads[r].copy_from_slice(&data[(b * BS) as usize..((b + 1) * BS) as usize]);
                }
                BlockState::Copied => {
                    o.storage().write_at(&below[r], o.data_pos(b * BS)).unwrap();
                }
                BlockState::Zero => reads[r].fill(0),
                BlockState::Unallocated => {}
            }
            let guard = locks.try_lock(b, 1).unwrap();
            map.set_range(&guard, b..b + 1, s);
        }
        o.write_map_pages(&map.take_dirty_pages()).unwrap();
        o.set_clean(true).unwrap();
        if frozen {
            o.freeze().unwrap();
        }
        (o.storage().contents(), reads)
    }

    /// What the overlay in `bytes` reads as over `below`.
    fn reads_as(bytes: &[u8], below: &[u8]) -> Vec<u8> {
        let o = Overlay::open_unchecked(SimDisk::new(bytes.to_vec())).unwrap();
        let map = BlockMap::new(MapMemory::heap(BLOCKS), BLOCKS);
        o.read_map(&map).unwrap();
        let mut out = below.to_vec();
        for b in 0..BLOCKS {
            let r = (b * BS) as usize..((b + 1) * BS) as usize;
            match map.get(b) {
                BlockState::Allocated | BlockState::Copied => o
                    .storage()
                    .read_at(&mut out[r], o.data_pos(b * BS))
                    .unwrap(),
                BlockState::Zero => out[r].fill(0),
                BlockState::Unallocated => {}
            }
        }
        out
    }

    use BlockState::{Allocated as A, Copied as C, Unallocated as U, Zero as Z};
    const TOP: &[BlockState] = &[A, A, U, Z, C, A, Z, Z, U, A, C, U, A];
    const LOW: &[BlockState] = &[U, A, Z, C, A, U, U, Z, A];

    /// The case: the overlay's bytes and the backing's (a raw image, or a
    /// frozen layer over the raw image `raw`), and what the top reads as.
    struct Case {
        top: Vec<u8>,
        below: Vec<u8>,
        raw: Option<Vec<u8>>,
        want: Vec<u8>,
        frozen: bool,
    }

    fn case(layer_below: bool, frozen: bool) -> Case {
        let raw = pattern(1);
        if layer_below {
            let (low, low_reads) = overlay(&raw, LOW, &pattern(2), true);
            let (top, want) = overlay(&low_reads, TOP, &pattern(3), frozen);
            Case {
                top,
                below: low,
                raw: Some(raw),
                want,
                frozen,
            }
        } else {
            let (top, want) = overlay(&raw, TOP, &pattern(3), frozen);
            Case {
                top,
                below: raw,
                raw: None,
                want,
                frozen,
            }
        }
    }

    /// What the backing in `below` reads as.
    fn below_reads(c: &Case, below: &[u8]) -> Vec<u8> {
        match &c.raw {
            Some(raw) => reads_as(below, raw),
            None => below.to_vec(),
        }
    }

    /// Runs one commit over `top` and `below` with `budget` writes allowed.
    fn run(
        c: &Case,
        top: &Arc<SimDisk>,
        below: &Arc<SimDisk>,
        budget: i64,
    ) -> Result<Merged, Error> {
        let left = Arc::new(AtomicI64::new(budget));
        let cut = |d: &Arc<SimDisk>| Cut {
            disk: d.clone(),
            left: left.clone(),
        };
        let mut layer = Overlay::open_unchecked(cut(top))?;
        let now = identity(&below_reads(c, &below.contents()), below.mtime());
        let after = || Ok(identity(&below_reads(c, &below.contents()), below.mtime()));
        let target = match c.raw {
            Some(_) => Target::Layer(Overlay::open_unchecked(cut(below))?),
            None => Target::Raw(cut(below)),
        };
        merge(&mut layer, &target, &now, 77, after, &mut |_, _| {})
    }

    /// The end of a commit: the backing reads as the top did, the top
    /// holds nothing, records the backing's identity and is no longer
    /// committing.
    fn check_done(c: &Case, top: &SimDisk, below: &SimDisk, what: &str) {
        let reads = below_reads(c, &below.contents());
        assert!(reads == c.want, "{what}: the backing reads wrong");
        let o = Overlay::open_unchecked(SimDisk::new(top.contents())).unwrap();
        let map = BlockMap::new(MapMemory::heap(BLOCKS), BLOCKS);
        o.read_map(&map).unwrap();
        assert_eq!(
            map.counts().unallocated,
            BLOCKS,
            "{what}: the top holds blocks"
        );
        let h = o.header();
        assert!(!h.committing(), "{what}: still committing");
        assert_eq!(
            h.base,
            identity(&reads, below.mtime()),
            "{what}: identity not recorded"
        );
        assert_eq!(h.frozen(), c.frozen, "{what}: frozen flag");
        assert!(h.clean(), "{what}: clean flag");
        if c.raw.is_some() {
            let low = Overlay::open_unchecked(SimDisk::new(below.contents())).unwrap();
            assert!(
                !low.header().receiving(),
                "{what}: the layer below still receiving"
            );
        }
        assert_eq!(
            reads_as(&top.contents(), &reads),
            c.want,
            "{what}: the top reads wrong"
        );
    }

    #[test]
    fn a_commit_merges_written_and_zero_blocks_and_skips_copies() {
        for layer_below in [false, true] {
            let c = case(layer_below, false);
            let (top, below) = (
                Arc::new(SimDisk::new(c.top.clone())),
                Arc::new(SimDisk::new(c.below.clone())),
            );
            let m = run(&c, &top, &below, i64::MAX).unwrap();
            let held = |s| {
                (0..BLOCKS)
                    .filter(|b| TOP[*b as usize % TOP.len()] == s)
                    .count() as u64
            };
            assert_eq!(
                m,
                Merged {
                    written: held(A),
                    zeroed: held(Z),
                    skipped: held(C),
                    resumed: false
                }
            );
            check_done(&c, &top, &below, "whole run");
            // Run again: nothing to do, nothing changed.
            let (t, b) = (top.contents(), below.contents());
            let m = run(&c, &top, &below, 0).unwrap();
            assert_eq!((m.written, m.zeroed, m.resumed), (0, 0, false));
            assert!(top.contents() == t && below.contents() == b);
        }
    }

    #[test]
    fn a_backing_changed_since_is_refused_and_nothing_written() {
        let mut c = case(false, false);
        c.below[5] ^= 1;
        let (top, below) = (
            Arc::new(SimDisk::new(c.top.clone())),
            Arc::new(SimDisk::new(c.below.clone())),
        );
        // Block 0 (sampled by the fingerprint) differs.
        let e = run(&c, &top, &below, 0).unwrap_err();
        assert!(e.to_string().contains("contents differ"), "{e}");
    }

    /// A layer that a commit writes into forgets the modification time an
    /// earlier commit of its own kept: its contents changed since, and a
    /// later run of that commit (with nothing left to merge) would set
    /// its time back under the overlay that recorded the new one.
    #[test]
    fn a_layer_written_into_forgets_the_time_its_own_commit_kept() {
        let mut c = case(true, true);
        let mut low = Overlay::open_unchecked(SimDisk::new(c.below.clone())).unwrap();
        low.begin_commit(55).unwrap();
        low.end_commit(low.header().base).unwrap();
        c.below = low.storage().contents();
        let (top, below) = (
            Arc::new(SimDisk::new(c.top.clone())),
            Arc::new(SimDisk::new(c.below.clone())),
        );
        run(&c, &top, &below, i64::MAX).unwrap();
        check_done(&c, &top, &below, "a whole run");
        let low = Overlay::open_unchecked(SimDisk::new(below.contents())).unwrap();
        assert_eq!(low.header().commit_mtime_ns, 0, "the old time is kept");
    }

    /// The commit stopped after k writes, for every k up to a whole run,
    /// then a power cut keeping none, all, or a random subset of the
    /// writes not synced, then run again: the same end as a whole run.
    #[test]
    fn a_commit_stopped_anywhere_and_run_again_ends_the_same() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for (layer_below, frozen) in [(false, false), (false, true), (true, true), (true, false)] {
            let c = case(layer_below, frozen);
            let (mut stopped, mut midway, mut mixed) = (0, 0, 0);
            for k in 0.. {
                let (top, below) = (
                    Arc::new(SimDisk::new(c.top.clone())),
                    Arc::new(SimDisk::new(c.below.clone())),
                );
                if run(&c, &top, &below, k).is_ok() {
                    check_done(&c, &top, &below, &format!("budget {k}"));
                    // A power cut after the end keeps the end, the
                    // backing's modification time (the identity the
                    // overlay records) included.
                    let what = format!("layer below {layer_below}, power cut after the end");
                    let (top2, below2) = (
                        top.after_power_cut(|_| false),
                        below.after_power_cut(|_| false),
                    );
                    check_done(&c, &top2, &below2, &what);
                    break;
                }
                stopped += 1;
                for keep in 0..3 {
                    let seed = next();
                    let pick = |i: usize| match keep {
                        0 => false,
                        1 => true,
                        _ => (seed >> (i % 64)) & 1 == 1,
                    };
                    let top2 = Arc::new(top.after_power_cut(pick));
                    let below2 = Arc::new(below.after_power_cut(pick));
                    let what = format!("layer below {layer_below}, stopped after {k}, keep {keep}");
                    // A layer below that reads neither as before nor as
                    // after is marked so: nothing else may use it.
                    let reads = below_reads(&c, &below2.contents());
                    if layer_below && reads != below_reads(&c, &c.below) && reads != c.want {
                        mixed += 1;
                        let low = Overlay::open_unchecked(SimDisk::new(below2.contents())).unwrap();
                        assert!(
                            low.header().stopped_commit().is_some(),
                            "{what}: the layer below reads half merged and is not marked"
                        );
                    }
                    // Stopped midway, the overlay serves no device and is
                    // not frozen until the commit is run again.
                    let mut o = Overlay::open_unchecked(SimDisk::new(top2.contents())).unwrap();
                    if o.header().committing() {
                        midway += 1;
                    }
                    if o.header().committing() && !frozen {
                        let check = OpenCheck {
                            base: &o.header().base.clone(),
                            block_size: None,
                            force: true,
                        };
                        let e = Overlay::open(SimDisk::new(top2.contents()), check)
                            .err()
                            .unwrap_or_else(|| panic!("{what}: a stopped commit's overlay opened"));
                        assert!(e.to_string().contains("stopped midway"), "{what}: {e}");
                        let e = o.freeze().unwrap_err();
                        assert!(e.to_string().contains("stopped midway"), "{what}: {e}");
                    }
                    let m = run(&c, &top2, &below2, i64::MAX)
                        .unwrap_or_else(|e| panic!("{what}: the rerun failed: {e}"));
                    check_done(&c, &top2, &below2, &what);
                    let _ = m;
                }
            }
            assert!(stopped > 8, "only {stopped} stops");
            assert!(midway > 8, "only {midway} stops with the commit midway");
            assert!(
                !layer_below || mixed > 8,
                "only {mixed} stops with the layer below half merged"
            );
        }
    }
}
