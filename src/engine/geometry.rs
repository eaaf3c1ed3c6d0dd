//! Device geometry: the virtual size and the copy-on-write block size, and the
//! arithmetic that turns byte offsets into block numbers and back.

use crate::engine::Error;

/// Smallest COW block: one page, so a block never splits a page-cache page.
pub(crate) const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest COW block: past this, read-modify-write of a partial block costs more
/// than it saves in map size.
pub(crate) const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Default COW block size: matches the page size and file-system block size.
pub(crate) const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Every offset and length the device sees is a multiple of a sector.
pub(crate) const SECTOR: u64 = 512;

/// Size and block size of one device. The last block may be shorter than
/// `block_size` when the size is not a multiple of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    size: u64,
    block_shift: u32,
}

impl Geometry {
    /// Checks the block size (power of two within bounds) and the size (a
    /// non-zero multiple of 512).
    pub(crate) fn new(size: u64, block_size: u32) -> Result<Geometry, Error> {
        check_block_size(block_size)?;
        if size == 0 {
            return Err(Error::invalid("the base is empty (size 0)"));
        }
        if !size.is_multiple_of(SECTOR) {
            return Err(Error::invalid(format!(
                "the base size {size} is not a multiple of 512 bytes"
            )));
        }
        Ok(Geometry {
            size,
            block_shift: block_size.trailing_zeros(),
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn block_size(&self) -> u32 {
        1 << self.block_shift
    }

    /// Number of blocks, counting a short last block.
    pub(crate) fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block_size() as u64)
    }

    /// The block that holds byte `off`.
    pub(crate) fn block_of(&self, off: u64) -> u64 {
        off >> self.block_shift
    }

    pub(crate) fn block_start(&self, block: u64) -> u64 {
        block << self.block_shift
    }

    /// One past the last byte of `block`, clipped to the device size.
    pub(crate) fn block_end(&self, block: u64) -> u64 {
        ((block + 1) << self.block_shift).min(self.size)
    }

    /// Blocks touched by `[off, off+len)`, as `first..end`. `len` must be > 0.
    pub(crate) fn blocks_touched(&self, off: u64, len: u64) -> std::ops::Range<u64> {
        self.block_of(off)..self.block_of(off + len - 1) + 1
    }

    /// Checks that `[off, off+len)` is sector aligned and inside the device.
    /// Cuts `[off, end)` (inside the device) into pieces of adjacent blocks
    /// for which `answer` is the same, as `(answer, start, end)` in bytes.
    pub(crate) fn pieces<T: PartialEq>(
        &self,
        off: u64,
        end: u64,
        answer: impl Fn(u64) -> T,
    ) -> Vec<(T, u64, u64)> {
        let mut out = Vec::new();
        let mut at = off;
        while at < end {
            let first = self.block_of(at);
            let a = answer(first);
            let mut next = first + 1;
            while next < self.blocks() && self.block_start(next) < end && answer(next) == a {
                next += 1;
            }
            let to = self.block_end(next - 1).min(end);
            out.push((a, at, to));
            at = to;
        }
        out
    }

    pub(crate) fn check_range(&self, off: u64, len: u64) -> Result<(), Error> {
        if !off.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(Error::invalid(format!(
                "range {off}+{len} is not aligned to 512 bytes"
            )));
        }
        match off.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::invalid(format!(
                "range {off}+{len} is past the end of the device ({} bytes)",
                self.size
            ))),
        }
    }
}

/// The rule for `--block-size`: a power of two from 4 KiB to 1 MiB.
pub(crate) fn check_block_size(block_size: u32) -> Result<(), Error> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(Error::invalid(format!(
            "block size {block_size} must be a power of two from 4K to 1M"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_last_block() {
        let g = Geometry::new(4096 * 3 + 512, 4096).unwrap();
        assert_eq!(g.blocks(), 4);
        assert_eq!(g.block_end(3), 4096 * 3 + 512);
        assert_eq!(g.blocks_touched(4095 - 511, 1024), 0..2);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(Geometry::new(0, 4096).is_err());
        assert!(Geometry::new(1000, 4096).is_err());
        assert!(Geometry::new(4096, 3000).is_err());
        assert!(Geometry::new(4096, 2048).is_err());
        assert!(Geometry::new(4096, 2 << 20).is_err());
        assert!(Geometry::new(4096, 1 << 20).is_ok());
    }
}
