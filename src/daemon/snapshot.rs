//! `ublk-cow snapshot -n N --overlay NEW`: a snapshot of a device in use.
//! Its overlay becomes a frozen layer, and NEW, a new overlay over it,
//! takes the device's writes from then on; no request fails.
//!
//! The command checks what it can and asks the device's daemon over the
//! control socket; the daemon takes the snapshot while its requests wait at
//! the device's gate (`in_daemon`). The state file says how far a snapshot
//! got: while its `snapshot_to` names NEW, the snapshot is unfinished, and
//! once its daemon is gone, `recover -n N` finishes it (`finish_locked`)
//! and `del -n N` forgets it (`abandon`). `SnapshotLock` keeps a
//! `snapshot -n`, a `recover` and a `del` from working on one at once.

use super::state::{self, DeviceState};
use super::{Live, absolute, close_from_live_map, control, lock_lower, map_memory};
use crate::engine::chain;
use crate::engine::geometry::Geometry;
use crate::ublk::ServedDevice;
use anyhow::{Context, Result, anyhow, bail};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Held while a snapshot of device `id` is begun or finished, and while a
/// `recover` or `del` looks at one: an exclusive `flock` on `<id>.lock` in
/// the run directory, so that two runs never finish one snapshot at once
/// (a `recover` by hand, or systemd's `serve`, racing `snapshot -n`).
pub(crate) struct SnapshotLock(#[allow(dead_code)] std::fs::File);

impl SnapshotLock {
    pub(crate) fn take(id: u32) -> Result<SnapshotLock> {
        let path = state::run_dir().join(format!("{id}.lock"));
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => state::create_private(&path)
                .with_context(|| format!("creating {}", path.display()))?,
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !crate::sys::try_flock(&f, true)
            .with_context(|| format!("locking {}", path.display()))?
        {
            if Instant::now() > deadline {
                bail!(
                    "device {id}: another snapshot, recover or del holds {} for 120 s",
                    path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(SnapshotLock(f))
    }
}

/// Refuses a snapshot of device `st` that cannot become a chain.
fn refuse(st: &DeviceState) -> Result<()> {
    let id = st.id;
    if st.temporary_overlay {
        bail!(
            "device {id} has a temporary overlay (added without --overlay), which goes at del: it cannot become a layer"
        );
    }
    if st.remote_identity.is_some() {
        bail!(
            "device {id} has a remote base ({}): a layer over a remote base is not served, so it cannot be snapshotted",
            st.base.display()
        );
    }
    if st.forced {
        bail!(
            "device {id} was added with --force: its overlay does not match its base, and a layer must"
        );
    }
    if st.failed {
        bail!("a flush of device {id} failed: its overlay is not whole, and is not frozen");
    }
    Ok(())
}

/// Takes a snapshot of device `id`, whose overlay must be a named one
/// (`add --overlay`), into `new`, which must not exist: checks what it
/// can, then asks the device's daemon (`in_daemon`) and prints the pause.
pub(crate) fn live(id: u32, new: &Path) -> Result<()> {
    super::need_root("snapshot -n")?;
    let lock = SnapshotLock::take(id)?;
    let Some(st) = DeviceState::load(id)? else {
        bail!("there is no ublk-cow device {id}");
    };
    if !st.daemon_alive() {
        bail!(
            "device {id} has no running daemon: `ublk-cow recover -n {id}` serves it again first"
        );
    }
    refuse(&st)?;
    let new = absolute(new)?;
    chain::check_new_overlay(&new)?;
    // The chain is checked by the daemon (`in_daemon`), once.
    let req = control::Request::Snapshot { overlay: new };
    let reply = control::call(id, &req, |_| {}).map_err(|e| {
        // A daemon that ended midway closed the connection as it went.
        let deadline = Instant::now() + Duration::from_secs(2);
        while st.daemon_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if st.daemon_alive() {
            e
        } else {
            e.context(format!(
                "the daemon of device {id} ended during the snapshot (its I/O waits): \
                 `ublk-cow recover -n {id}` finishes it, `ublk-cow del -n {id}` gives it up"
            ))
        }
    })?;
    drop(lock);
    let p = reply
        .snapshot
        .context("the daemon did not answer the snapshot")?;
    let ms = |us: u64| format!("{:.1}", us as f64 / 1000.0);
    eprintln!(
        "ublk-cow: device {id}: I/O paused for {} ms (requests in flight done in {} ms, overlay frozen in {} ms, new overlay serving in {} ms)",
        ms(p.total_us),
        ms(p.drained_us),
        ms(p.frozen_us - p.drained_us),
        ms(p.total_us - p.frozen_us)
    );
    Ok(())
}

/// Where a live snapshot's pause went, in microseconds from its start: all
/// requests in flight done, the old overlay frozen, and (`total`) the new
/// overlay serving.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Pause {
    pub(crate) drained_us: u64,
    pub(crate) frozen_us: u64,
    pub(crate) total_us: u64,
}

/// `snapshot -n`, in the device's daemon: closes the device's gate and
/// waits until no request is in flight (`ublk::Current::pause`), notes the
/// snapshot begun in the state file (`snapshot_to`), freezes the overlay in
/// place, makes NEW over it with an empty live map, opens the device over
/// the new chain, names it in the state file, swaps it in and opens the
/// gate. Requests that came meanwhile waited at the gate; none fails.
///
/// Until the overlay is frozen, a failure leaves the device as it was.
/// After it, the device can only go on over NEW: a failure then ends the
/// daemon, the kernel holds the device's requests, and `recover`, which
/// finds `snapshot_to` in the state file, finishes the snapshot.
pub(crate) fn in_daemon(live: &Live, new: &Path) -> Result<Pause> {
    let mut st = live.lock_state();
    let id = st.id;
    if !new.is_absolute() {
        bail!("{}: the new overlay's path must be absolute", new.display());
    }
    refuse(&st)?;
    chain::check_new_overlay(new)?;
    chain::check_can_stack(&st.overlay, crate::ublk::exec::MAX_RING_LAYERS)?;
    let started = Instant::now();
    let us = || started.elapsed().as_micros() as u64;
    let paused = live
        .current
        .pause(Duration::from_secs(30))
        .map_err(|e| anyhow!("device {id}: {e}; nothing was changed"))?;
    let drained_us = us();
    let old = live.current.device();
    DeviceState {
        snapshot_to: Some(new.to_path_buf()),
        ..st.clone()
    }
    .save()?;
    if let Err(e) = old.dev.freeze() {
        if !old.dev.failed() {
            unfinished(id, anyhow::Error::from(e));
        }
        // A failed flush: not frozen. The device goes on as it was, its
        // overlay marked failed (`watch_failure`).
        st.save()?;
        return Err(
            anyhow::Error::from(e).context(format!("device {id}: the overlay was not frozen"))
        );
    }
    let frozen_us = us();
    let sh = open_new(&st, new, &old).unwrap_or_else(|e| unfinished(id, e));
    *st = DeviceState {
        base: st.overlay.clone(),
        overlay: new.to_path_buf(),
        snapshot_to: None,
        recovered_unclean: false,
        ..st.clone()
    };
    if let Err(e) = st.save() {
        unfinished(id, e);
    }
    paused.swap(Arc::new(sh));
    drop(paused);
    Ok(Pause {
        drained_us,
        frozen_us,
        total_us: us(),
    })
}

/// The device over NEW, the snapshot's new overlay over the frozen
/// `st.overlay`, with a new, empty live map, for the queues.
fn open_new(st: &DeviceState, new: &Path, old: &ServedDevice) -> Result<ServedDevice> {
    let blocks = Geometry::new(st.size, st.block_size)?.blocks();
    // A new file where the old map was: the old device keeps its mapping.
    let map = map_memory(st.id, blocks, true)?;
    let dev = chain::open_over_frozen(&st.overlay, new, map)?;
    lock_lower(&st.overlay, dev.base())?;
    Ok(old.swapped_to(dev)?)
}

/// A snapshot that cannot be finished after its overlay was frozen: ends
/// the daemon, so that `recover` finishes it.
fn unfinished(id: u32, e: anyhow::Error) -> ! {
    log::error!(
        "the snapshot of device {id} cannot be finished here ({}): the daemon ends, the \
         device's I/O waits, and `ublk-cow recover -n {id}` finishes it",
        crate::cli::error_line(&e)
    );
    std::process::abort();
}

/// Finishes the snapshot that `st.snapshot_to` names, under its lock, its
/// daemon dead and its device waiting for recovery: each step is skipped
/// when a run before it did it already. The state file then names the new
/// chain, for `recover`.
pub(crate) fn finish_locked(st: DeviceState) -> Result<()> {
    let id = st.id;
    let new = st.snapshot_to.clone().expect("a snapshot in progress");
    let old = st.overlay.clone();
    let frozen = chain::is_frozen(&old)?;
    if !frozen {
        if !close_from_live_map(&st)? {
            bail!(
                "overlay {} is marked failed: it is not frozen; `ublk-cow del -n {id}` removes the device",
                old.display()
            );
        }
        chain::freeze(&old)?;
    }
    // NEW never served a write while `snapshot_to` names it (the lock keeps
    // a second run out): whatever a run before left of it is made again.
    // Unless the path is another's by now (the snapshot failed as it was
    // taken between its check and the making of NEW): then it is left.
    if !chain::remove_unused_empty(&new, &old)? {
        bail!(
            "{} exists and may not be the snapshot's (in use, holding blocks, or not closed \
             clean and not made over {}): nothing removed; move it away and run `ublk-cow \
             recover -n {id}` again",
            new.display(),
            old.display()
        );
    }
    chain::create_overlay(&new, &old, None)?;
    // An empty live map for NEW, in place of the old overlay's.
    let blocks = Geometry::new(st.size, st.block_size)?.blocks();
    drop(map_memory(id, blocks, true)?);
    let st = DeviceState {
        base: old,
        overlay: new,
        snapshot_to: None,
        recovered_unclean: false,
        ..st
    };
    st.save()
}

/// What `del` does with a device whose snapshot was interrupted (under its
/// lock): if the overlay is not frozen yet, the snapshot is forgotten and
/// the device removed as any other; if it is, the overlay holds every
/// write (it was closed clean before it was frozen), and only NEW, which
/// served nothing, goes with the device (unless the path is another's by
/// now: an overlay in use or holding blocks is left).
pub(crate) fn abandon(st: DeviceState) -> Result<DeviceState> {
    let new = st.snapshot_to.clone().expect("a snapshot in progress");
    if chain::is_frozen(&st.overlay)? {
        // Left if it is another's by now (see `finish_locked`).
        if !chain::remove_unused_empty(&new, &st.overlay).unwrap_or(false) {
            eprintln!(
                "ublk-cow: {} is left: it is in use, not closed clean, or holds blocks",
                new.display()
            );
        }
        let _ = std::fs::remove_file(state::map_path(st.id));
    }
    let st = DeviceState {
        snapshot_to: None,
        ..st
    };
    st.save()?;
    Ok(st)
}
