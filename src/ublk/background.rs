//! Background cache work of one queue: prefetches and copies that the
//! queue's requests asked for, run by one task on the queue's executor
//! (`queue`), on the queue's ring, after the request that asked has
//! completed. Work queued or in flight is bounded by the policy's budget;
//! what does not fit is dropped, since it is only prefetch, so foreground
//! requests never wait behind more than the budget. A live snapshot drops
//! what was queued for the device it swapped out (`clear`).

use crate::stats::{CacheSource, Stats};
use crate::ublk::ServedDevice;
use crate::ublk::exec;
use crate::ublk::ops::Ring;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// One piece of background work.
pub(crate) enum Job {
    /// A cache request in the device's cache mode.
    Cache { off: u64, len: u64 },
    /// Install base data just read (`data`, at device offset `off`) into the
    /// overlay for the blocks it fully covers that are still unallocated.
    Install { off: u64, data: Vec<u8> },
    /// The same for a READ whose data the daemon never had (zero copy):
    /// the base data at `[off, off+len)` is read again first.
    InstallFromBase { off: u64, len: u64 },
}

impl Job {
    fn bytes(&self) -> u64 {
        match self {
            Job::Cache { len, .. } | Job::InstallFromBase { len, .. } => *len,
            Job::Install { data, .. } => data.len() as u64,
        }
    }
}

/// The queue of background jobs.
#[derive(Default)]
pub(crate) struct Background {
    jobs: RefCell<VecDeque<Job>>,
    bytes: Cell<u64>,
    busy: Cell<bool>,
    waker: RefCell<Option<Waker>>,
    generation: Cell<u64>,
}

impl Background {
    /// Queues `job` if it fits the budget; counts it by source or as dropped.
    pub(crate) fn push(&self, job: Job, source: CacheSource, sh: &ServedDevice) {
        let n = job.bytes();
        if self.bytes.get() + n > sh.policy.budget {
            Stats::add(&sh.stats.cache_dropped_over_budget, 1);
            return;
        }
        sh.stats.cache_request(source);
        if matches!(source, CacheSource::KernelHint | CacheSource::Detector)
            && matches!(job, Job::Cache { .. })
        {
            Stats::add(&sh.stats.prefetch_bytes, n);
        }
        self.bytes.set(self.bytes.get() + n);
        self.jobs.borrow_mut().push_back(job);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Nothing queued and nothing running.
    pub(crate) fn idle(&self) -> bool {
        self.jobs.borrow().is_empty() && !self.busy.get()
    }

    /// Drops every job queued (a live snapshot swapped the device they
    /// were queued for); a job taken and not run yet is dropped by its
    /// runner, who finds another `generation`.
    pub(crate) fn clear(&self) {
        self.jobs.borrow_mut().clear();
        self.bytes.set(0);
        self.generation.set(self.generation.get() + 1);
    }

    /// Counts the `clear`s.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.get()
    }

    /// The next job, and the generation it was queued in; the queue is
    /// busy from then until it is run (`run`) or dropped (`dropped`).
    pub(crate) async fn next(&self) -> (Job, u64) {
        let job = poll_fn(|cx| match self.jobs.borrow_mut().pop_front() {
            Some(j) => Poll::Ready(j),
            None => {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        self.busy.set(true);
        (job, self.generation.get())
    }

    /// A job taken by `next` and dropped unrun (its bytes went at `clear`).
    pub(crate) fn dropped(&self) {
        self.busy.set(false);
    }

    /// Runs a job taken by `next`, on device `sh`.
    pub(crate) async fn run<R: Ring>(&self, q: &R, sh: &ServedDevice, job: Job) {
        let n = job.bytes();
        let r = match job {
            Job::Cache { off, len } => exec::cache_range(q, sh, off, len, sh.policy.mode).await,
            Job::Install { off, data } => exec::install(q, sh, off, &data).await,
            Job::InstallFromBase { off, len } => exec::install_from_base(q, sh, off, len).await,
        };
        if r < 0 {
            log::debug!("background cache work failed: {}", -r);
        }
        self.bytes.set(self.bytes.get().saturating_sub(n));
        self.busy.set(false);
    }
}
