//! ublk-cow: a copy-on-write block device served from user space through
//! ublk. Reads come from a read-only base image until a block is written;
//! writes land in an overlay file. docs/design.md describes the whole.
//!
//! - [`engine`]: the decisions — block-state map, per-block locks, request
//!   and cache plans, readahead, the overlay format — and a synchronous
//!   executor; no ublk, no io_uring.
//! - [`ublk`]: the ublk target: device set-up and parameters, a thread and
//!   an io_uring per queue, the engine's plans carried out as io_uring
//!   operations.
//! - [`daemon`]: device lifetime — `add`, `del`, `list`, `recover`, the
//!   state files, and the control socket behind `cache` and `stats`.
//! - [`cli`]: the command line and its help texts.
//! - [`generate`]: the man pages and shell completions, from [`cli`].
//! - [`progress`]: progress bars for long commands, on a terminal only.
//! - [`push`]: `push`, a frozen layer packed and uploaded to an object
//!   store.
//! - [`remote`]: a base in an object store or on an HTTP server, fetched
//!   in units with ranged GETs.
//! - [`stats`]: the per-device counters that `stats` shows.
//! - [`size`]: parsing sizes such as `4K` or `1G`.
//! - [`sys`]: the system calls the standard library does not wrap, each
//!   `unsafe` block with its reason.

pub mod cli;
pub mod daemon;
pub mod engine;
pub mod generate;
pub mod progress;
pub mod push;
pub mod remote;
pub mod size;
pub mod stats;
pub mod sys;
#[cfg(test)]
mod test_files;
pub mod ublk;
