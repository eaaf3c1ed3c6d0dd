//! `ublk-cow snapshot -n N --overlay NEW`: a snapshot of a device in use.
//! Its overlay becomes a frozen layer, and NEW, a new overlay over it,
//! takes the device's writes from then on; no request fails.
//!
//! The pause is ublk's user recovery, the path a daemon crash takes: the
//! daemon is killed, the kernel holds the device's requests (those in
//! flight are requeued), and every write the daemon completed is in the
//! overlay file and the live map, as after any crash. The overlay is then
//! closed from the live map (as `del` of a dead daemon does), frozen, NEW is
//! made over it with an empty live map, the state file names the chain, and
//! a new daemon recovers the device over it; the held requests are served.
//! Whatever crashed mid-way, the state file says how far it got: while its
//! `snapshot_to` names NEW, `recover -n N` finishes the snapshot first, and
//! `del -n N` forgets it (`abandon`). `SnapshotLock` keeps two of these
//! from running at once.

use super::state::{self, DeviceState};
use super::{absolute, close_from_live_map, map_memory};
use crate::engine::chain;
use crate::engine::geometry::Geometry;
use crate::ublk;
use anyhow::{Context, Result, bail};
use std::path::Path;
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

/// Takes a snapshot of device `id`, whose overlay must be a named one
/// (`add --overlay`), into `new`, which must not exist. Everything that
/// could make the snapshot fail once the overlay is frozen is checked
/// before the daemon is stopped.
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
    if st.temporary_overlay {
        bail!(
            "device {id} has a temporary overlay (added without --overlay), which goes at del: it cannot become a layer"
        );
    }
    if st.foreground {
        bail!(
            "device {id} is served in the foreground (add --foreground, or systemd's serve): snapshot -n replaces its daemon; stop it and use `snapshot FILE`"
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
    let new = absolute(new)?;
    chain::check_new_overlay(&new)?;
    // The overlay as a layer: its chain opens strictly, a path that fits
    // NEW's header, a depth a device serves.
    chain::check_can_stack(&st.overlay, crate::ublk::exec::MAX_RING_LAYERS)?;
    let started = Instant::now();
    crate::sys::kill(st.pid, libc::SIGKILL).context("stopping the daemon")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while st.daemon_alive() || !ublk::is_quiesced(id) {
        if Instant::now() > deadline {
            bail!(
                "device {id} did not wait for recovery after its daemon (pid {}) was stopped",
                st.pid
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let stopped = started.elapsed();
    // Read again: the daemon may have marked a failed flush before it died.
    let st = DeviceState::load(id)?.context("the state file went away")?;
    if st.failed {
        bail!(
            "a flush of device {id} failed: its overlay is not frozen; `ublk-cow del -n {id}` removes the device"
        );
    }
    let st = DeviceState {
        snapshot_to: Some(new),
        ..st
    };
    st.save()?;
    finish_locked(st).with_context(|| {
        format!(
            "the snapshot of device {id} is not finished (its I/O waits): `ublk-cow recover -n {id}` tries again, `ublk-cow del -n {id}` gives it up"
        )
    })?;
    drop(lock);
    let made = started.elapsed();
    super::recover(id, false)?;
    let paused = started.elapsed();
    eprintln!(
        "ublk-cow: device {id}: I/O paused for {} ms (daemon stopped in {} ms, chain made in {} ms, new daemon serving in {} ms)",
        paused.as_millis(),
        stopped.as_millis(),
        (made - stopped).as_millis(),
        (paused - made).as_millis()
    );
    Ok(())
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
    match std::fs::remove_file(&new) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", new.display())),
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
/// served nothing, goes with the device.
pub(crate) fn abandon(st: DeviceState) -> Result<DeviceState> {
    let new = st.snapshot_to.clone().expect("a snapshot in progress");
    if chain::is_frozen(&st.overlay)? {
        let _ = std::fs::remove_file(&new);
        let _ = std::fs::remove_file(state::map_path(st.id));
    }
    let st = DeviceState {
        snapshot_to: None,
        ..st
    };
    st.save()?;
    Ok(st)
}
