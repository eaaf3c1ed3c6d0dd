//! The fetcher's counters: GETs, bytes, retries, failures and fetch
//! latency. Plain relaxed atomics, updated by the fetcher's tasks and read
//! whole by [`Counters::snapshot`] (for `stats`).

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The live counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// GET requests sent (each retry is one more).
    pub gets: AtomicU64,
    /// Body bytes received by GETs that succeeded.
    pub bytes: AtomicU64,
    /// Retries after a transient fault.
    pub retries: AtomicU64,
    /// Fetches that failed (after their retries, or at their deadline).
    pub failures: AtomicU64,
    /// Fetches that finished (succeeded or failed): the latency count.
    pub fetches: AtomicU64,
    /// Sum of the fetches' latencies, in microseconds.
    pub latency_us_sum: AtomicU64,
    /// Longest fetch, in microseconds.
    pub latency_us_max: AtomicU64,
    /// GETs in flight now.
    pub in_flight: AtomicU64,
    /// Most GETs that were in flight at once.
    pub in_flight_max: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CountersSnapshot {
    pub gets: u64,
    pub bytes: u64,
    pub retries: u64,
    pub failures: u64,
    pub fetches: u64,
    pub latency_us_sum: u64,
    pub latency_us_max: u64,
    pub in_flight_max: u64,
}

impl Counters {
    /// Reads every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            gets: self.gets.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            retries: self.retries.load(Relaxed),
            failures: self.failures.load(Relaxed),
            fetches: self.fetches.load(Relaxed),
            latency_us_sum: self.latency_us_sum.load(Relaxed),
            latency_us_max: self.latency_us_max.load(Relaxed),
            in_flight_max: self.in_flight_max.load(Relaxed),
        }
    }

    /// One fetch finished after `took`.
    pub(crate) fn fetch_done(&self, took: Duration, ok: bool) {
        let us = took.as_micros().min(u64::MAX as u128) as u64;
        self.fetches.fetch_add(1, Relaxed);
        self.latency_us_sum.fetch_add(us, Relaxed);
        self.latency_us_max.fetch_max(us, Relaxed);
        if !ok {
            self.failures.fetch_add(1, Relaxed);
        }
    }

    /// A GET starts; the guard counts it out when dropped.
    pub(crate) fn get_started(&self) -> InFlight<'_> {
        self.gets.fetch_add(1, Relaxed);
        let now = self.in_flight.fetch_add(1, Relaxed) + 1;
        self.in_flight_max.fetch_max(now, Relaxed);
        InFlight(self)
    }
}

/// One GET in flight, for [`Counters::in_flight`].
pub(crate) struct InFlight<'a>(&'a Counters);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

impl CountersSnapshot {
    /// Mean fetch latency, or zero before the first fetch.
    pub fn latency_mean(&self) -> Duration {
        match self.fetches {
            0 => Duration::ZERO,
            n => Duration::from_micros(self.latency_us_sum / n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_and_in_flight() {
        let c = Counters::default();
        {
            let _a = c.get_started();
            let _b = c.get_started();
        }
        let _c = c.get_started();
        c.fetch_done(Duration::from_micros(100), true);
        c.fetch_done(Duration::from_micros(300), false);
        let s = c.snapshot();
        assert_eq!(
            (s.gets, s.in_flight_max, s.fetches, s.failures),
            (3, 2, 2, 1)
        );
        assert_eq!((s.latency_us_sum, s.latency_us_max), (400, 300));
        assert_eq!(s.latency_mean(), Duration::from_micros(200));
        assert_eq!(c.in_flight.load(Relaxed), 1);
    }
}
