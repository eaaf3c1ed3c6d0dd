//! The ublk device parameters, chosen in this one place.

use libublk::sys;

/// Bytes of each per-tag I/O buffer, and so the largest READ/WRITE the kernel
/// sends (`max_sectors`). 1 MiB lets sequential I/O arrive in large requests.
pub const IO_BUF_BYTES: u32 = 1 << 20;
/// Largest DISCARD/WRITE_ZEROES in one request: they carry no data, so they
/// may be much larger than the buffer.
const MAX_DISCARD_BYTES: u32 = 1 << 30;

/// What the device parameters depend on.
pub struct DeviceShape {
    pub size: u64,
    pub block_size: u32,
    pub read_only: bool,
}

/// The parameters sent to ublk_drv:
/// - size = base size; logical block 512 (any sector-aligned I/O is
///   accepted); physical block 4096; `io_opt` = the COW block size, so file
///   systems prefer I/O that needs no read-modify-write;
/// - `VOLATILE_CACHE` so that FLUSH reaches us (the overlay is written
///   through the page cache) and `FUA` so that FUA writes do;
/// - discard and write-zeroes with granularity = the COW block size;
/// - `READ_ONLY` for `--read-only`.
pub fn device_params(shape: &DeviceShape) -> sys::ublk_params {
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
