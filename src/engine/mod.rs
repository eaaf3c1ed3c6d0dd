//! The copy-on-write engine, free of ublk and io_uring so that it runs and is
//! tested on any host: the block-state map, per-block locks, request
//! planning, the overlay's on-disk format, chains of overlays, the pause
//! gate of a live snapshot, and a synchronous executor.
//!
//! Data flow: a request is turned into a plan by [`plan`] from the [`map`];
//! an executor carries the plan out over [`storage`] — [`device::CowDevice`]
//! with plain positional I/O here, `crate::ublk` with io_uring. The steps of
//! a WRITE and of a DISCARD/WRITE_ZEROES are written once, in [`write`],
//! and both executors follow them.

pub(crate) mod after_read;
pub mod base;
pub mod cache;
pub mod chain;
pub mod commit;
pub mod device;
pub mod gate;
pub(crate) mod geometry;
pub(crate) mod locks;
pub mod map;
pub mod overlay;
pub mod packed;
pub(crate) mod plan;
pub(crate) mod readahead;
pub mod storage;
pub(crate) mod write;

use std::io;

/// An engine error. Every variant reads as one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request or the arguments are not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The overlay does not belong to this base or these options.
    #[error("{0}")]
    Mismatch(String),
    /// A file is not what its header says.
    #[error("{0}")]
    Corrupt(String),
    /// A system call failed; `context` says on what.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn invalid(msg: impl Into<String>) -> Error {
        Error::Invalid(msg.into())
    }

    pub(crate) fn mismatch(msg: impl Into<String>) -> Error {
        Error::Mismatch(msg.into())
    }

    pub(crate) fn corrupt(msg: impl Into<String>) -> Error {
        Error::Corrupt(msg.into())
    }

    /// The errno to complete a block request with.
    pub(crate) fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Invalid(_) => libc::EINVAL,
            _ => libc::EIO,
        }
    }
}

/// Why a block request failed, as the kernel names it: a positive errno
/// value. Executors carry it in `Result`s; it becomes the negative number
/// io_uring and ublk use only where a request is completed
/// ([`Errno::negative`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EINVAL: Errno = Errno(libc::EINVAL);

    /// The failure of an io_uring operation or of ublk, given as a negative
    /// errno.
    pub fn from_negative(r: i32) -> Errno {
        debug_assert!(r < 0, "{r} is no failure");
        Errno(-r)
    }

    /// The errno of a failed system call (EIO when it has none).
    pub fn of(e: &io::Error) -> Errno {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }

    /// The negative number a completion carries.
    pub fn negative(self) -> i32 {
        -self.0
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        io::Error::from_raw_os_error(self.0).fmt(f)
    }
}

/// Adds what was being done to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|source| Error::Io {
            context: what(),
            source,
        })
    }
}
