//! The fetcher: a remote base read in units of `fetch_size` bytes, unit `i`
//! covering `[i * fetch_size, min((i + 1) * fetch_size, size))`.
//!
//! It owns a small tokio runtime of its own (the daemon's queue threads are
//! not tokio threads) and offers three ways in, all usable from any thread
//! outside that runtime:
//! - [`Fetcher::fetch`]: blocks until the unit is there or has failed;
//! - [`Fetcher::start`]: returns at once, and calls a callback (on one of
//!   the fetcher's threads) when the unit is there or has failed;
//! - [`Fetcher::fetch_async`]: the same as a future.
//!
//! Concurrent requests of one unit share one GET (single flight): the first
//! one starts it, the others wait for its answer. Each fetch retries
//! transient faults with exponential backoff, at most
//! [`Params::max_retries`] times, and fails with [`Error::Timeout`] once
//! [`Params::fetch_timeout`] has passed since it started. Nothing is kept
//! after a fetch finishes: a failed unit is fetched anew at the next
//! request, and where fetched data is kept is the caller's business.
//! [`Fetcher::prefetch`] starts fetches of units ahead, at most
//! [`Params::prefetch_depth`] of its GETs in flight, consecutive units in
//! one GET of up to [`Params::prefetch_get_max`] bytes: a GET costs a round
//! trip and the server's work per request, whatever its length.

use super::error::Fault;
use super::image::Image;
use super::{AwsEnv, Counters, Error, Identity, Params, RemoteUrl};
use bytes::Bytes;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::Semaphore;

/// What a fetch of one unit gives: its bytes, or why not.
pub type Outcome = Result<Bytes, Error>;

/// A callback for one unit's outcome. It runs on one of the fetcher's
/// threads: it must be quick, and must not wait for another fetch.
pub type Done = Box<dyn FnOnce(Outcome) + Send + 'static>;

/// Where every fetched unit is kept (the device's overlay): called with the
/// unit and its bytes once its GET succeeded, before the unit leaves the
/// table of flights and before any callback hears of it, on a thread that
/// may block. An `Err` (one line) fails the fetch.
pub type Sink = Arc<dyn Fn(u64, &Bytes) -> Result<(), String> + Send + Sync>;

/// A remote base, opened, with its fetches.
pub struct Fetcher {
    /// `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
}

/// What the fetcher's tasks share (never the runtime itself, so that no
/// task can hold the last reference to it).
struct Shared {
    /// What the URL names: a raw image or pushed layers over one.
    object: Image,
    params: Params,
    counters: Counters,
    /// The units being fetched, each with the callbacks that wait for it:
    /// protects the single flight (a unit is in the table from the start
    /// of its fetch until its outcome is handed out).
    flights: Mutex<HashMap<u64, Vec<Done>>>,
    /// Permits for prefetch GETs: [`Params::prefetch_depth`] of them.
    prefetch: Arc<Semaphore>,
    /// Set once, by [`Fetcher::set_sink`].
    sink: std::sync::OnceLock<Sink>,
}

impl Fetcher {
    /// Opens `url` (S3 settings from `env`) and checks `params` against
    /// the device's `block_size`. Blocks for the HEAD; call it outside an
    /// async context.
    pub fn open(
        url: &RemoteUrl,
        env: &AwsEnv,
        params: Params,
        block_size: u32,
    ) -> Result<Fetcher, Error> {
        params.check(block_size)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(params.threads)
            .thread_name("ublk-cow-fetch")
            .enable_all()
            .build()
            .map_err(|e| Error::Open {
                url: url.to_string(),
                why: format!("cannot start the fetcher's threads: {e}"),
            })?;
        let object = runtime.block_on(Image::open(url, env, &params))?;
        let shared = Arc::new(Shared {
            object,
            prefetch: Arc::new(Semaphore::new(params.prefetch_depth)),
            params,
            counters: Counters::default(),
            flights: Mutex::new(HashMap::new()),
            sink: std::sync::OnceLock::new(),
        });
        Ok(Fetcher {
            runtime: Some(runtime),
            shared,
        })
    }

    /// The object's identity (size, ETag, Last-Modified) as opened; every
    /// fetch is pinned to it.
    pub fn identity(&self) -> &Identity {
        self.shared.object.identity()
    }

    /// The object's size in bytes.
    pub fn size(&self) -> u64 {
        self.identity().size
    }

    /// The URL, as given.
    pub fn url(&self) -> &str {
        self.shared.object.url()
    }

    /// The top pushed layer's header, if the URL names pushed layers.
    pub(crate) fn top_layer(&self) -> Option<&crate::engine::packed::PackedHeader> {
        self.shared.object.top_layer()
    }

    /// The URL of every object read (pushed layers, then the raw image).
    pub(crate) fn urls(&self) -> Vec<&str> {
        self.shared.object.urls()
    }

    /// The parameters in use.
    pub fn params(&self) -> &Params {
        &self.shared.params
    }

    /// Has every unit fetched from now on kept by `sink` (see [`Sink`]):
    /// while it keeps a unit, the unit is still in flight, so a request
    /// of it joins that fetch instead of starting another. Set once; a
    /// second sink is ignored.
    pub fn set_sink(&self, sink: Sink) {
        let _ = self.shared.sink.set(sink);
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Units the object is cut into (the last one may be short).
    pub fn units(&self) -> u64 {
        self.shared.units()
    }

    /// The bytes unit `unit` covers.
    pub fn unit_range(&self, unit: u64) -> Range<u64> {
        self.shared.unit_range(unit)
    }

    /// Starts a fetch of `unit` (or joins the one in flight) and returns at
    /// once; `done` gets the outcome on one of the fetcher's threads. A
    /// unit past the end gets an error at once, on this thread.
    pub fn start(&self, unit: u64, done: impl FnOnce(Outcome) + Send + 'static) {
        if unit >= self.units() {
            done(Err(self.shared.past_end(unit)));
            return;
        }
        let mut flights = self.shared.flights.lock().unwrap();
        if let Some(waiting) = flights.get_mut(&unit) {
            waiting.push(Box::new(done));
            return;
        }
        flights.insert(unit, vec![Box::new(done)]);
        drop(flights);
        let shared = self.shared.clone();
        self.handle()
            .spawn(async move { shared.fly(unit..unit + 1).await });
    }

    /// Fetches `unit`, blocking until it is there or has failed (within
    /// about [`Params::fetch_timeout`]). Not for the fetcher's own threads
    /// nor another async context: use [`Fetcher::fetch_async`] there.
    pub fn fetch(&self, unit: u64) -> Outcome {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.start(unit, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or_else(|_| Err(self.shared.stopped(unit)))
    }

    /// Fetches `unit` without blocking a thread.
    pub async fn fetch_async(&self, unit: u64) -> Outcome {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.start(unit, move |r| {
            let _ = tx.send(r);
        });
        rx.await.unwrap_or_else(|_| Err(self.shared.stopped(unit)))
    }

    /// Starts fetches of `units` in the background, at most
    /// [`Params::prefetch_depth`] GETs of them in flight at once (a unit
    /// already in flight is joined, not fetched again), roughly in the
    /// order given; consecutive units go in one GET of at most
    /// [`Params::prefetch_get_max`] bytes. `done` gets each unit's outcome
    /// on one of the fetcher's threads. Returns at once.
    pub fn prefetch(
        &self,
        units: impl IntoIterator<Item = u64>,
        done: Arc<dyn Fn(u64, Outcome) + Send + Sync>,
    ) {
        let per_get = self.shared.params.units_per_prefetch_get();
        let mut runs: Vec<Range<u64>> = Vec::new();
        for unit in units {
            if unit >= self.units() {
                done(unit, Err(self.shared.past_end(unit)));
                continue;
            }
            add_to_runs(&mut runs, unit, per_get);
        }
        for run in runs {
            let shared = self.shared.clone();
            let done = done.clone();
            let permit = shared.prefetch.clone().acquire_owned();
            self.handle().spawn(async move {
                let Ok(_permit) = permit.await else { return };
                // The units of the run not in flight yet, in runs of their
                // own; those in flight are joined.
                let mut mine: Vec<Range<u64>> = Vec::new();
                {
                    let mut flights = shared.flights.lock().unwrap();
                    for unit in run {
                        let done = done.clone();
                        let callback: Done = Box::new(move |r| done(unit, r));
                        if let Some(waiting) = flights.get_mut(&unit) {
                            waiting.push(callback);
                            continue;
                        }
                        flights.insert(unit, vec![callback]);
                        add_to_runs(&mut mine, unit, u64::MAX);
                    }
                }
                for units in mine {
                    shared.fly(units).await;
                }
            });
        }
    }

    /// Stops the fetcher and waits (at most a few seconds) until its
    /// threads have ended: after it the process may fork.
    pub fn close(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        }
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime.as_ref().expect("runtime").handle()
    }
}

/// Adds `unit` to `runs` of consecutive units: to the last run if it
/// follows it and that run has fewer than `max` units, else as a new run.
fn add_to_runs(runs: &mut Vec<Range<u64>>, unit: u64, max: u64) {
    match runs.last_mut() {
        Some(r) if r.end == unit && r.end - r.start < max => r.end += 1,
        _ => runs.push(unit..unit + 1),
    }
}

impl Drop for Fetcher {
    /// Stops the fetcher's threads without waiting for GETs in flight;
    /// their callbacks are dropped uncalled (a blocked [`Fetcher::fetch`]
    /// cannot be waiting: it borrows the fetcher).
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Shared {
    fn units(&self) -> u64 {
        self.object.identity().size.div_ceil(self.params.fetch_size)
    }

    fn unit_range(&self, unit: u64) -> Range<u64> {
        let size = self.object.identity().size;
        let start = unit.saturating_mul(self.params.fetch_size).min(size);
        start..start.saturating_add(self.params.fetch_size).min(size)
    }

    fn past_end(&self, unit: u64) -> Error {
        Error::Param(format!(
            "{}: unit {unit} is past the end ({} units of {} bytes)",
            self.object.url(),
            self.units(),
            self.params.fetch_size
        ))
    }

    fn stopped(&self, unit: u64) -> Error {
        let r = self.unit_range(unit);
        Error::Failed {
            url: self.object.url().to_string(),
            start: r.start,
            end: r.end,
            why: "the fetcher stopped".into(),
        }
    }

    /// Fetches `units` (consecutive, each already in the table) in one GET
    /// and hands each unit's outcome to every callback waiting for it.
    async fn fly(&self, units: Range<u64>) {
        let first = self.unit_range(units.start).start;
        let range = first..self.unit_range(units.end - 1).end;
        let started = Instant::now();
        let fetched = self.within_deadline(range.clone()).await;
        self.counters.fetch_done(started.elapsed(), fetched.is_ok());
        // Each unit's part of the body, or the GET's error for each.
        let mut outcomes: Vec<(u64, Outcome)> = units
            .clone()
            .map(|u| {
                let r = self.unit_range(u);
                let part = fetched
                    .as_ref()
                    .map(|b| b.slice((r.start - first) as usize..(r.end - first) as usize))
                    .map_err(Clone::clone);
                (u, part)
            })
            .collect();
        if let (Ok(_), Some(sink)) = (&fetched, self.sink.get()) {
            let sink = sink.clone();
            let parts: Vec<(u64, Bytes)> = outcomes
                .iter()
                .filter_map(|(u, o)| o.as_ref().ok().map(|b| (*u, b.clone())))
                .collect();
            let kept = tokio::task::spawn_blocking(move || {
                parts
                    .iter()
                    .map(|(u, b)| sink(*u, b))
                    .collect::<Vec<Result<(), String>>>()
            })
            .await
            .unwrap_or_else(|e| vec![Err(e.to_string()); units.clone().count()]);
            for ((u, outcome), k) in outcomes.iter_mut().zip(kept) {
                if let Err(why) = k {
                    let r = self.unit_range(*u);
                    *outcome = Err(Error::Failed {
                        url: self.object.url().to_string(),
                        start: r.start,
                        end: r.end,
                        why: format!("keeping the fetched bytes: {why}"),
                    });
                }
            }
        }
        for (u, outcome) in outcomes {
            let waiting = self.flights.lock().unwrap().remove(&u).unwrap_or_default();
            for done in waiting {
                done(outcome.clone());
            }
        }
    }

    /// [`Shared::attempts`] of `range`, within [`Params::fetch_timeout`].
    async fn within_deadline(&self, range: Range<u64>) -> Outcome {
        // The last fault, for the message of a timeout.
        let last = Mutex::new(String::new());
        let attempts = self.attempts(range.clone(), &last);
        match tokio::time::timeout(self.params.fetch_timeout, attempts).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                url: self.object.url().to_string(),
                start: range.start,
                end: range.end,
                after: self.params.fetch_timeout,
                last: std::mem::take(&mut *last.lock().unwrap()),
            }),
        }
    }

    /// GETs of `range` until one succeeds, a fault is permanent, or the
    /// retries are spent.
    async fn attempts(&self, range: Range<u64>, last: &Mutex<String>) -> Outcome {
        let mut backoff = self.params.backoff_initial;
        let mut retries = 0;
        loop {
            let got = {
                let _in_flight = self.counters.get_started();
                self.object.get(range.clone()).await
            };
            match got {
                Ok(bytes) => {
                    self.counters.bytes.fetch_add(bytes.len() as u64, Relaxed);
                    return Ok(bytes);
                }
                Err(f) if f.retryable() && retries < self.params.max_retries => {
                    log::debug!(
                        "{}: bytes {range:?}: {}; retry in {backoff:?}",
                        self.object.url(),
                        f.why()
                    );
                    *last.lock().unwrap() = f.why();
                    retries += 1;
                    self.counters.retries.fetch_add(1, Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.params.backoff_max);
                }
                Err(f) => return Err(self.error(f, range, retries)),
            }
        }
    }

    fn error(&self, f: Fault, range: Range<u64>, retries: u32) -> Error {
        let url = self.object.url().to_string();
        match f {
            Fault::NotFound => Error::Changed {
                url,
                why: "it is gone".into(),
            },
            Fault::Precondition => Error::Changed {
                url,
                why: "its ETag or modification time no longer matches".into(),
            },
            Fault::Mismatch(why) => Error::Changed { url, why },
            Fault::Denied(why) => Error::Denied { url, why },
            Fault::Connect(why) | Fault::Transient(why) | Fault::Permanent(why) => {
                let why = match retries {
                    0 => why,
                    n => format!("{why} (after {n} retries)"),
                };
                Error::Failed {
                    url,
                    start: range.start,
                    end: range.end,
                    why,
                }
            }
        }
    }
}
