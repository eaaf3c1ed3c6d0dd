//! A base image that lives in an object store (S3 and S3-compatible
//! stores) or behind a plain HTTP(S) server, read lazily in fixed-size
//! units with ranged GETs.
//!
//! This module owns everything between a `--base URL` and the bytes of one
//! unit: parsing the URL ([`url`]), the parameters and their defaults
//! ([`params`]), opening the object and pinning its identity ([`object`]),
//! a URL that names pushed layers over another URL ([`image`]),
//! the errors a user sees ([`error`]), the fetches themselves — single
//! flight, retries, deadline, prefetch ([`fetcher`]) — and their counters
//! ([`counters`]); and the base a device keeps of it ([`base`]). It knows
//! nothing of ublk, the overlay or the block map: whoever calls it decides
//! where a fetched unit goes.

pub mod base;
pub mod counters;
pub mod error;
pub mod fetcher;
pub(crate) mod image;
pub mod object;
pub mod params;
pub mod url;

pub use base::RemoteBase;
pub use counters::{Counters, CountersSnapshot};
pub use error::Error;
pub use fetcher::Fetcher;
pub use object::{AwsEnv, Identity};
pub use params::{Params, parse_fetch_size, parse_fetch_timeout};
pub use url::RemoteUrl;
