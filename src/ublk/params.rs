//! The ublk device parameters, chosen in this one place.

use crate::engine::Error;
use crate::engine::geometry::MIN_BLOCK_SIZE;
use crate::engine::locks::MAX_LOCK_BLOCKS;
use libublk::sys;

/// Bytes of each per-tag I/O buffer, and so the largest READ/WRITE the kernel
/// sends (`max_sectors`). 1 MiB lets sequential I/O arrive in large requests.
pub(crate) const IO_BUF_BYTES: u32 = 1 << 20;
// A READ or WRITE is served under one lock range (`exec::write` does not
// split it): its blocks, one more when it starts mid-block, must fit one.
const _: () = assert!(
    ((IO_BUF_BYTES / MIN_BLOCK_SIZE) as u64) < MAX_LOCK_BLOCKS,
    "the largest request needs more block locks than one range may take"
);
/// Largest DISCARD/WRITE_ZEROES in one request: they carry no data, so they
/// may be much larger than the buffer.
const MAX_DISCARD_BYTES: u32 = 1 << 30;

/// What the device parameters depend on.
pub(crate) struct DeviceShape {
    pub(crate) size: u64,
    pub(crate) block_size: u32,
    pub(crate) read_only: bool,
}

/// The parameters sent to ublk_drv:
/// - size = base size; logical block 512 (any sector-aligned I/O is
///   accepted); physical block 4096; `io_opt` = the COW block size, so file
///   systems prefer I/O that needs no read-modify-write;
/// - `VOLATILE_CACHE` so that FLUSH reaches us (the overlay is written
///   through the page cache) and `FUA` so that FUA writes do;
/// - discard and write-zeroes with granularity = the COW block size;
/// - `READ_ONLY` for `--read-only`.
pub(crate) fn device_params(shape: &DeviceShape) -> sys::ublk_params {
    let mut attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    if shape.read_only {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: shape.block_size.trailing_zeros() as u8,
            io_min_shift: 9,
            max_sectors: IO_BUF_BYTES >> 9,
            dev_sectors: shape.size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_granularity: shape.block_size,
            max_discard_sectors: MAX_DISCARD_BYTES >> 9,
            max_write_zeroes_sectors: MAX_DISCARD_BYTES >> 9,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// What `add --zero-copy` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ZeroCopy {
    /// Zero copy when the kernel offers it, else copy mode (or user copy,
    /// with `--user-copy`).
    #[default]
    Auto,
    /// Zero copy, or fail when the kernel does not offer it.
    On,
    /// Copy mode always (or user copy, with `--user-copy`).
    Off,
}

/// How a request's data moves between ublk and the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IoMode {
    /// ublk copies a READ's data out of, and a WRITE's data into, memory of
    /// the daemon (the tag's buffer, or a mapping of the overlay). A WRITE's
    /// data is fetched only when asked for (`NEED_GET_DATA`; see
    /// `write_data`).
    Copy,
    /// ublk registers each request's own pages as a fixed buffer in the
    /// queue's ring (`AUTO_BUF_REG`, index = tag), and the daemon's reads
    /// and writes of base and overlay move the data straight to and from
    /// them: no copy by ublk at all. Kernels from 6.16 on offer it.
    ZeroCopy,
    /// ublk copies nothing by itself: the daemon moves each request's data
    /// with `pread` and `pwrite` on the char device (`UBLK_F_USER_COPY`),
    /// a READ's runs that lie in mappings straight from there, all of them
    /// in one `pwritev`. Kernels from 6.5 on offer it.
    UserCopy,
}

/// Chooses the I/O mode from what was asked (`--zero-copy`, `--user-copy`)
/// and the driver's feature bits (`None`: the driver does not say, as
/// before 6.5). Zero copy wins where it is taken; otherwise user copy only
/// when asked for: it makes a READ of several runs in memory cost one copy
/// per byte instead of two, but every request one system call more, which
/// small requests feel (docs/benchmarks.md, "Reads of a written disk").
pub(crate) fn choose_io_mode(
    want: ZeroCopy,
    user_copy: bool,
    features: Option<u64>,
) -> Result<IoMode, Error> {
    let offered = features.is_some_and(|f| f & sys::UBLK_F_AUTO_BUF_REG as u64 != 0);
    match (want, offered) {
        (ZeroCopy::Auto | ZeroCopy::On, true) => Ok(IoMode::ZeroCopy),
        (ZeroCopy::On, false) => Err(Error::invalid(
            "--zero-copy=on: this kernel's ublk_drv does not offer UBLK_F_AUTO_BUF_REG (needs Linux 6.16 or later)",
        )),
        (ZeroCopy::Off | ZeroCopy::Auto, _) if !user_copy => Ok(IoMode::Copy),
        _ if has_user_copy(features) => Ok(IoMode::UserCopy),
        _ => Err(Error::invalid(
            "--user-copy: this kernel's ublk_drv does not offer UBLK_F_USER_COPY (needs Linux 6.5 or later)",
        )),
    }
}

/// The mode of a device created with `flags` (for `recover`).
pub(crate) fn io_mode_of(flags: u64) -> IoMode {
    if flags & sys::UBLK_F_AUTO_BUF_REG as u64 != 0 {
        IoMode::ZeroCopy
    } else if flags & sys::UBLK_F_USER_COPY as u64 != 0 {
        IoMode::UserCopy
    } else {
        IoMode::Copy
    }
}

/// The device flags for `mode`. Devices survive their daemon: when it dies
/// the kernel quiesces the device and requeues the requests it had taken,
/// and `recover` serves them again (re-issuing a write is harmless: it
/// writes the same data again).
///
/// In copy mode a WRITE's data is fetched only when the daemon asks for it
/// (`NEED_GET_DATA`): a READ's commit can then name any mapping to copy its
/// data from, since no next request is ever copied there (see `queue`).
///
/// Zero copy adds ublk's user copy when the driver has it (`with_user_copy`):
/// small requests whose data is in a mapping are copied with one system call
/// instead (see `request_buf::USER_COPY_MAX`). User copy mode has nothing
/// to ask for (`NEED_GET_DATA`): the daemon copies a WRITE's data out of
/// the request when it needs it.
pub(crate) fn ctrl_flags(mode: IoMode, with_user_copy: bool) -> u64 {
    let recovery = sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE;
    let data = match mode {
        IoMode::Copy => sys::UBLK_F_NEED_GET_DATA,
        IoMode::ZeroCopy if with_user_copy => sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_USER_COPY,
        IoMode::ZeroCopy => sys::UBLK_F_AUTO_BUF_REG,
        IoMode::UserCopy => sys::UBLK_F_USER_COPY,
    };
    (recovery | data) as u64
}

/// Whether the driver's features include user copy.
pub(crate) fn has_user_copy(features: Option<u64>) -> bool {
    features.is_some_and(|f| f & sys::UBLK_F_USER_COPY as u64 != 0)
}

/// The flags to recover a device created with `flags` with: the same ones
/// of ours.
pub(crate) fn recovery_flags(flags: u64) -> u64 {
    let ours = sys::UBLK_F_USER_RECOVERY
        | sys::UBLK_F_USER_RECOVERY_REISSUE
        | sys::UBLK_F_NEED_GET_DATA
        | sys::UBLK_F_AUTO_BUF_REG
        | sys::UBLK_F_USER_COPY;
    flags & ours as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZC: u64 = sys::UBLK_F_AUTO_BUF_REG as u64;

    #[test]
    fn io_mode_follows_the_kernel_unless_told() {
        let old = Some(sys::UBLK_F_NEED_GET_DATA as u64);
        let uc = Some((sys::UBLK_F_NEED_GET_DATA | sys::UBLK_F_USER_COPY) as u64);
        let both = Some(ZC | sys::UBLK_F_USER_COPY as u64);
        let mode = |want, user_copy, features| choose_io_mode(want, user_copy, features);
        assert_eq!(
            mode(ZeroCopy::Auto, false, Some(ZC)).unwrap(),
            IoMode::ZeroCopy
        );
        assert_eq!(mode(ZeroCopy::Auto, false, old).unwrap(), IoMode::Copy);
        assert_eq!(mode(ZeroCopy::Auto, false, None).unwrap(), IoMode::Copy);
        assert_eq!(mode(ZeroCopy::Off, false, Some(ZC)).unwrap(), IoMode::Copy);
        assert_eq!(
            mode(ZeroCopy::On, false, Some(ZC)).unwrap(),
            IoMode::ZeroCopy
        );
        let e = mode(ZeroCopy::On, false, old).unwrap_err();
        assert!(e.to_string().contains("UBLK_F_AUTO_BUF_REG"), "{e}");
        // User copy only when asked for, and zero copy goes first.
        assert_eq!(mode(ZeroCopy::Auto, false, uc).unwrap(), IoMode::Copy);
        assert_eq!(mode(ZeroCopy::Auto, true, uc).unwrap(), IoMode::UserCopy);
        assert_eq!(mode(ZeroCopy::Off, true, uc).unwrap(), IoMode::UserCopy);
        assert!(mode(ZeroCopy::On, true, uc).is_err());
        assert_eq!(mode(ZeroCopy::Auto, true, both).unwrap(), IoMode::ZeroCopy);
        assert_eq!(mode(ZeroCopy::Off, true, both).unwrap(), IoMode::UserCopy);
        let e = mode(ZeroCopy::Auto, true, old).unwrap_err();
        assert!(e.to_string().starts_with("--user-copy:"), "{e}");
    }

    #[test]
    fn a_device_keeps_its_mode() {
        for (mode, uc) in [
            (IoMode::Copy, false),
            (IoMode::ZeroCopy, false),
            (IoMode::ZeroCopy, true),
            (IoMode::UserCopy, true),
        ] {
            let flags = ctrl_flags(mode, uc);
            assert_eq!(io_mode_of(flags), mode);
            // What the driver adds of its own is not asked for again.
            let reported = flags | sys::UBLK_F_CMD_IOCTL_ENCODE as u64;
            assert_eq!(recovery_flags(reported), flags);
        }
        assert_eq!(
            ctrl_flags(IoMode::Copy, true) & ctrl_flags(IoMode::ZeroCopy, true),
            (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64
        );
        assert_eq!(
            ctrl_flags(IoMode::Copy, true),
            ctrl_flags(IoMode::Copy, false)
        );
        assert!(has_user_copy(Some(sys::UBLK_F_USER_COPY as u64 | ZC)));
        assert!(!has_user_copy(Some(ZC)) && !has_user_copy(None));
    }
}
