//! ublk-cow: a copy-on-write block device served from user space through
//! ublk. Reads come from a read-only base image until a block is written;
//! writes land in an overlay file.
//!
//! - [`engine`]: the decisions — block-state map, request planning, locks,
//!   overlay format — and a synchronous executor; no ublk, no io_uring.
//! - [`ublk`]: the ublk target that executes the engine's plans as
//!   io_uring operations on each queue's ring.
//! - [`daemon`]: device lifetime — state files, add/del/list.
//! - [`size`]: parsing sizes such as `4K` or `1G`.
//! - [`sys`]: the few raw system calls, each `unsafe` with its reason.

pub mod cli;
pub mod daemon;
pub mod engine;
pub mod size;
pub mod stats;
pub mod sys;
pub mod ublk;
