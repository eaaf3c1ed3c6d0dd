//! Per-block locks for every change of a block's state.
//!
//! The rule (docs/design.md, concurrency rule): whatever makes a block leave
//! `Unallocated` or `Zero` — a guest write to it, read-modify-write, a copy of
//! base data into the overlay (copy-on-cache, copy-on-read), a discard — holds
//! that block's lock from the moment it re-checks the state until the new
//! state is installed. A copy that read old base data therefore re-checks
//! under the lock and drops itself if a guest write got there first. Reads and
//! writes to `Allocated` blocks take no lock.
//!
//! Locks are striped: block `b` uses stripe `b % STRIPES`. A range of up to
//! [`MAX_LOCK_BLOCKS`] consecutive blocks maps to distinct stripes. Taking a
//! range is all-or-nothing ([`BlockLocks::try_lock`]), so no caller ever
//! holds some stripes while waiting for others: there is no deadlock. How to
//! wait before trying again is the caller's business (a thread yields; a
//! queue's io_uring arms a short timer so its ring keeps running).

use std::sync::atomic::{AtomicBool, Ordering};

const STRIPES: u64 = 4096;
/// The most blocks one lock range may cover. Callers split larger work.
pub(crate) const MAX_LOCK_BLOCKS: u64 = STRIPES;

/// The lock table of one device.
pub(crate) struct BlockLocks {
    stripes: Box<[AtomicBool]>,
}

impl Default for BlockLocks {
    fn default() -> Self {
        BlockLocks {
            stripes: (0..STRIPES).map(|_| AtomicBool::new(false)).collect(),
        }
    }
}

impl BlockLocks {
    /// Locks blocks `first..first+count`, or none of them if any is held.
    pub(crate) fn try_lock(&self, first: u64, count: u64) -> Option<RangeGuard<'_>> {
        assert!(
            count > 0 && count <= MAX_LOCK_BLOCKS,
            "lock range of {count} blocks"
        );
        for i in 0..count {
            let stripe = &self.stripes[((first + i) % STRIPES) as usize];
            if stripe
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                self.release(first, i);
                return None;
            }
        }
        Some(RangeGuard {
            locks: self,
            first,
            count,
        })
    }

    fn release(&self, first: u64, count: u64) {
        for i in 0..count {
            self.stripes[((first + i) % STRIPES) as usize].store(false, Ordering::Release);
        }
    }
}

/// Held locks on a block range; dropping it unlocks.
pub(crate) struct RangeGuard<'a> {
    locks: &'a BlockLocks,
    first: u64,
    count: u64,
}

impl RangeGuard<'_> {
    pub(crate) fn blocks(&self) -> std::ops::Range<u64> {
        self.first..self.first + self.count
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.locks.release(self.first, self.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_ranges_exclude_each_other() {
        let l = BlockLocks::default();
        let g = l.try_lock(10, 5).unwrap();
        assert!(l.try_lock(14, 2).is_none());
        // A failed attempt must not leave stripes held.
        assert!(l.try_lock(15, 3).is_some());
        drop(g);
        assert!(l.try_lock(0, 20).is_some());
    }

    #[test]
    fn aliasing_stripes_exclude_too() {
        let l = BlockLocks::default();
        let _g = l.try_lock(1, 1).unwrap();
        assert!(l.try_lock(1 + STRIPES, 1).is_none());
    }
}
