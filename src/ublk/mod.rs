//! The ublk target: creates the ublk device, hands the base and overlay to
//! each queue as fixed files, and runs one thread with its own io_uring per
//! queue. Set-up lives here and in `params`; I/O handling in `queue` (the
//! request loop), `request_buf` (where a request's data is), `exec` (plans
//! carried out as io_uring operations, pushed and completed by `ops`) and
//! `write_data` (a WRITE's data).

pub(crate) mod background;
pub mod copier;
pub mod current;
pub mod exec;
pub(crate) mod inline;
pub mod ops;
pub(crate) mod params;
pub mod plain_ring;
pub(crate) mod queue;
pub mod request_buf;
pub(crate) mod served;
pub mod write_data;

use crate::engine::Error;
pub use current::Current;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{UblkError, UblkFlags, sys};
use params::{IoMode, ZeroCopy};
pub use served::ServedDevice;
use std::path::Path;
use std::sync::Arc;

/// The ublk control device; without it there is no ublk_drv.
pub(crate) const CONTROL: &str = "/dev/ublk-control";

/// How the device is to be created.
#[derive(Clone, Debug)]
pub(crate) struct TargetConfig {
    /// Device id, or None for the first free one.
    pub(crate) id: Option<u32>,
    pub(crate) queues: u16,
    pub(crate) depth: u16,
    pub(crate) zero_copy: ZeroCopy,
    /// User copy instead of copy mode where zero copy is not taken.
    pub(crate) user_copy: bool,
}

/// Checks that ublk devices can be created here at all.
pub(crate) fn check_available() -> Result<(), Error> {
    if !Path::new(CONTROL).exists() {
        return Err(Error::invalid(
            "ublk_drv is not available: /dev/ublk-control is missing (try: modprobe ublk_drv)",
        ));
    }
    if !crate::sys::is_root() {
        return Err(Error::invalid("creating a ublk device needs root"));
    }
    Ok(())
}

/// Checks that the kernel offers the I/O mode asked for (`--zero-copy=on`,
/// `--user-copy`).
pub(crate) fn check_io_mode(want: ZeroCopy, user_copy: bool) -> Result<(), Error> {
    params::choose_io_mode(want, user_copy, UblkCtrl::get_features()).map(|_| ())
}

/// Whether ublk device `id` exists.
pub(crate) fn device_exists(id: u32) -> bool {
    Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}

/// Adds a ublk device (not started yet) and returns its control handle.
/// Dropping the handle deletes the device.
pub(crate) fn create(cfg: &TargetConfig) -> Result<UblkCtrl, Error> {
    if let Some(id) = cfg.id
        && device_exists(id)
    {
        return Err(Error::invalid(format!("ublk device {id} already exists")));
    }
    let features = UblkCtrl::get_features();
    let mode = params::choose_io_mode(cfg.zero_copy, cfg.user_copy, features)?;
    let add = |flags| {
        UblkCtrlBuilder::default()
            .name("ublk-cow")
            .id(cfg.id.map_or(-1, |i| i as i32))
            .nr_queues(cfg.queues)
            .depth(cfg.depth)
            .io_buf_bytes(params::IO_BUF_BYTES)
            .ctrl_flags(flags)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
    };
    let user_copy = params::has_user_copy(features);
    add(params::ctrl_flags(mode, user_copy))
        .or_else(|e| match (mode, user_copy) {
            // A driver that has both but not together: zero copy alone.
            (IoMode::ZeroCopy, true) => add(params::ctrl_flags(mode, false)),
            // One that offers user copy and refuses it: copy mode.
            (IoMode::UserCopy, _) => add(params::ctrl_flags(IoMode::Copy, false)),
            _ => Err(e),
        })
        .map_err(|e| Error::invalid(format!("creating the ublk device failed: {e}")))
}

/// Whether device `id` is waiting for a new daemon (its daemon died).
pub(crate) fn is_quiesced(id: u32) -> bool {
    UblkCtrl::new_simple(id as i32)
        .map(|c| c.dev_info().state == sys::UBLK_S_DEV_QUIESCED as u16)
        .unwrap_or(false)
}

/// Takes over device `id`, whose daemon died, for a new daemon. Dropping
/// the handle leaves the device; [`delete`] removes it.
pub(crate) fn attach_for_recovery(id: u32) -> Result<UblkCtrl, Error> {
    let old = UblkCtrl::new_simple(id as i32)
        .map_err(|e| Error::invalid(format!("ublk device {id}: {e}")))?;
    let info = old.dev_info();
    old.start_user_recover()
        .map_err(|e| Error::invalid(format!("starting recovery of ublk device {id}: {e}")))?;
    UblkCtrlBuilder::default()
        .name("ublk-cow")
        .id(id as i32)
        .nr_queues(info.nr_hw_queues)
        .depth(info.queue_depth)
        .io_buf_bytes(params::IO_BUF_BYTES)
        .ctrl_flags(params::recovery_flags(info.flags))
        .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        .build()
        .map_err(|e| Error::invalid(format!("recovering ublk device {id}: {e}")))
}

/// The I/O mode device `ctrl` was created with.
pub(crate) fn io_mode(ctrl: &UblkCtrl) -> IoMode {
    params::io_mode_of(ctrl.dev_info().flags)
}

/// Starts the device and serves it until it is stopped. `ready` runs once
/// `/dev/ublkbN` accepts I/O.
pub(crate) fn serve(
    ctrl: &UblkCtrl,
    current: Arc<Current>,
    read_only: bool,
    ready: impl FnOnce(&UblkCtrl) + Send + Sync + 'static,
) -> Result<(), UblkError> {
    let shared = current.device();
    let geo = *shared.dev.geometry();
    let depth = ctrl.dev_info().queue_depth;
    let files = shared.ring_files(current.zero()).table();
    drop(shared);
    let init = move |dev: &mut UblkDev| {
        let tgt = &mut dev.tgt;
        // The `*_FD` constants of `exec` count on these following the char
        // device directly.
        assert_eq!(tgt.nr_fds, exec::FIRST_FILE as i32, "fixed files");
        for (i, &fd) in files.iter().enumerate() {
            tgt.fds[exec::FIRST_FILE as usize + i] = fd;
        }
        tgt.nr_fds += files.len() as i32;
        // A request may need several operations on the ring at once.
        tgt.sq_depth = depth.saturating_mul(4);
        tgt.cq_depth = depth.saturating_mul(4);
        tgt.dev_size = geo.size();
        tgt.params = params::device_params(&params::DeviceShape {
            size: geo.size(),
            block_size: geo.block_size(),
            read_only,
        });
        Ok(())
    };
    let q_fn = move |qid: u16, dev: &UblkDev| queue::run_queue(qid, dev, current.clone());
    ctrl.run_target(init, q_fn, ready).map(|_| ())
}

/// Stops device `id` (its queues go down and its daemon's `serve` returns).
pub(crate) fn stop(id: u32) -> Result<(), Error> {
    let ctrl = UblkCtrl::new_simple(id as i32)
        .map_err(|e| Error::invalid(format!("ublk device {id}: {e}")))?;
    ctrl.kill_dev()
        .map(|_| ())
        .map_err(|e| Error::invalid(format!("stopping ublk device {id}: {e}")))
}

/// Deletes device `id` outright (for a device whose daemon is gone).
pub(crate) fn delete(id: u32) -> Result<(), Error> {
    let ctrl = UblkCtrl::new_simple(id as i32)
        .map_err(|e| Error::invalid(format!("ublk device {id}: {e}")))?;
    ctrl.del_dev()
        .map(|_| ())
        .map_err(|e| Error::invalid(format!("deleting ublk device {id}: {e}")))
}
