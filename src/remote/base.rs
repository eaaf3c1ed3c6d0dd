//! A remote object as a device's base (`add --base URL`): what the daemon
//! keeps of it (URL, AWS settings, parameters, identity), the fetcher it
//! reads through, and blocking reads of any byte range for the engine's
//! synchronous paths.
//!
//! Opening is in two steps because the daemon forks: [`RemoteBase::open`]
//! opens the image (the HEAD that pins the object's identity, and the GET of
//! its first bytes that tells a raw image from pushed layers,
//! `remote::image`) and stops the
//! fetcher's threads again (a process must not fork with threads running), and
//! [`RemoteBase::connect`], in the daemon, starts the fetcher for good and
//! refuses an object whose identity changed in between.

use super::{AwsEnv, Error, Fetcher, Identity, Params, RemoteUrl};
use std::fs::File;
use std::io;
use std::sync::OnceLock;

/// A remote base: opened (identity known), and connected once the daemon
/// serves it.
pub struct RemoteBase {
    url: RemoteUrl,
    env: AwsEnv,
    params: Params,
    block_size: u32,
    identity: Identity,
    /// The fetcher, set once by [`RemoteBase::connect`].
    fetcher: OnceLock<Fetcher>,
    /// `/dev/null` opened for writing only: it stands where the queues'
    /// rings expect the base's descriptor, so that a read of the base that
    /// did not go through the fetcher fails (EBADF) instead of reading
    /// anything.
    refuser: File,
}

impl RemoteBase {
    /// Opens `url` (S3 settings from `env`): checks `params` against
    /// `block_size`, sends the HEAD, and stops the fetcher's threads again.
    pub fn open(
        url: RemoteUrl,
        env: AwsEnv,
        params: Params,
        block_size: u32,
    ) -> Result<RemoteBase, Error> {
        let probe = Fetcher::open(&url, &env, params.clone(), block_size)?;
        let identity = probe.identity().clone();
        probe.close();
        RemoteBase::known(url, env, params, block_size, identity)
    }

    /// As [`RemoteBase::open`], connected at once: for a process that
    /// does not fork (`push`), which so opens the object (and any pushed
    /// layers below it) once, not twice.
    pub fn open_connected(
        url: RemoteUrl,
        env: AwsEnv,
        params: Params,
        block_size: u32,
    ) -> Result<RemoteBase, Error> {
        let f = Fetcher::open(&url, &env, params.clone(), block_size)?;
        let base = RemoteBase::known(url, env, params, block_size, f.identity().clone())?;
        let _ = base.fetcher.set(f);
        Ok(base)
    }

    /// A remote base whose identity is known already (from a device's
    /// state): no request is sent until [`RemoteBase::connect`].
    pub fn known(
        url: RemoteUrl,
        env: AwsEnv,
        params: Params,
        block_size: u32,
        identity: Identity,
    ) -> Result<RemoteBase, Error> {
        let refuser = File::options()
            .write(true)
            .open("/dev/null")
            .map_err(|e| Error::Open {
                url: url.to_string(),
                why: format!("opening /dev/null: {e}"),
            })?;
        Ok(RemoteBase {
            url,
            env,
            params,
            block_size,
            identity,
            fetcher: OnceLock::new(),
            refuser,
        })
    }

    /// Starts the fetcher (a new HEAD) unless it runs; refuses an object
    /// that is no longer the one [`RemoteBase::open`] saw.
    pub fn connect(&self) -> Result<&Fetcher, Error> {
        if let Some(f) = self.fetcher.get() {
            return Ok(f);
        }
        let f = Fetcher::open(&self.url, &self.env, self.params.clone(), self.block_size)?;
        if f.identity() != &self.identity {
            return Err(Error::Changed {
                url: self.url.to_string(),
                why: format!("it was {}, it is now {}", self.identity, f.identity()),
            });
        }
        Ok(self.fetcher.get_or_init(|| f))
    }

    /// The fetcher, once connected.
    pub fn fetcher(&self) -> Option<&Fetcher> {
        self.fetcher.get()
    }

    pub fn url(&self) -> &RemoteUrl {
        &self.url
    }

    pub fn env(&self) -> &AwsEnv {
        &self.env
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Size, ETag and Last-Modified, as the HEAD at open gave them.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The file that refuses reads (see the field).
    pub fn refuser(&self) -> &File {
        &self.refuser
    }

    /// The units that bytes `[off, off + len)` touch.
    pub fn units_of(&self, off: u64, len: u64) -> std::ops::Range<u64> {
        let unit = self.params.fetch_size;
        if len == 0 {
            return 0..0;
        }
        off / unit..(off + len).div_ceil(unit)
    }

    /// The units holding a byte of `[off, off + len)` (cut at the object's
    /// end) that lies in a block still to be fetched: `unfetched(b)` for
    /// block `b` of the device's `block_size` bytes.
    pub fn units_needed(
        &self,
        off: u64,
        len: u64,
        block_size: u32,
        unfetched: impl Fn(u64) -> bool,
    ) -> Vec<u64> {
        let end = (off + len).min(self.identity.size);
        if off >= end {
            return Vec::new();
        }
        let (unit, bs) = (self.params.fetch_size, block_size as u64);
        self.units_of(off, end - off)
            .filter(|&u| {
                let from = (u * unit).max(off);
                let to = ((u + 1) * unit).min(end);
                (from / bs..=(to - 1) / bs).any(&unfetched)
            })
            .collect()
    }

    /// Reads `buf` at `off`, fetching every unit it touches (blocking: not
    /// for a queue's thread). Bytes past the end read as zeros.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let f = self.connect().map_err(io::Error::other)?;
        let size = self.identity.size;
        let end = (off + buf.len() as u64).min(size);
        buf.fill(0);
        if off >= end {
            return Ok(());
        }
        for unit in self.units_of(off, end - off) {
            let bytes = f.fetch(unit).map_err(io::Error::other)?;
            let r = f.unit_range(unit);
            let from = r.start.max(off);
            let to = r.end.min(end);
            buf[(from - off) as usize..(to - off) as usize]
                .copy_from_slice(&bytes[(from - r.start) as usize..(to - r.start) as usize]);
        }
        Ok(())
    }
}
