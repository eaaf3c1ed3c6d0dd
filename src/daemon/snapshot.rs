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
//! `snapshot_to` names NEW, `recover -n N` finishes the snapshot first.

use super::state::DeviceState;
use super::{absolute, close_from_live_map, map_memory};
use crate::engine::chain;
use crate::engine::geometry::Geometry;
use crate::ublk;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::time::{Duration, Instant};

/// Takes a snapshot of device `id`, whose overlay must be a named one
/// (`add --overlay`), into `new`, which must not exist.
pub(crate) fn live(id: u32, new: &Path) -> Result<()> {
    super::need_root("snapshot -n")?;
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
    if st.failed {
        bail!("a flush of device {id} failed: its overlay is not whole, and is not frozen");
    }
    let new = absolute(new)?;
    chain::check_new_overlay(&new)?;
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
    let st = DeviceState {
        snapshot_to: Some(new),
        ..st
    };
    st.save()?;
    finish(st, false)?;
    eprintln!(
        "ublk-cow: device {id}: I/O paused for {} ms",
        started.elapsed().as_millis()
    );
    Ok(())
}

/// Finishes the snapshot that `st.snapshot_to` names, its daemon dead and
/// its device waiting for recovery: each step is skipped when a run before
/// it did it already. Ends by recovering the device over the new chain.
pub(crate) fn finish(st: DeviceState, foreground: bool) -> Result<()> {
    let id = st.id;
    let new = st.snapshot_to.clone().expect("a snapshot in progress");
    let old = st.overlay.clone();
    let frozen = chain::is_frozen(&old)?;
    if !frozen {
        if !close_from_live_map(&st)? {
            bail!(
                "overlay {} is marked failed: it is not frozen",
                old.display()
            );
        }
        chain::freeze(&old)?;
    }
    // NEW never served a write while `snapshot_to` names it: whatever a
    // run before left of it is made again.
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
    st.save()?;
    super::recover(id, foreground)
}
