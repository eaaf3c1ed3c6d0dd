//! Every parameter of a remote base's fetcher, with its default, in one
//! place; and the checks of the two a user sets (`--fetch-size`,
//! `--fetch-timeout`).

use super::Error;
use std::time::Duration;

/// `--fetch-size`'s default: 1 MiB.
pub const DEFAULT_FETCH_SIZE: u64 = 1 << 20;
/// `--fetch-timeout`'s default: 30 s.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// How the fetcher works. [`Params::default`] gives the defaults listed
/// beside each field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// Bytes per unit (`--fetch-size`): unit `i` covers
    /// `[i * fetch_size, min((i + 1) * fetch_size, size))`. A multiple of
    /// the device's block size. Default 1 MiB.
    pub fetch_size: u64,
    /// Overall deadline of one fetch, retries and backoff included
    /// (`--fetch-timeout`); past it the fetch fails with
    /// [`Error::Timeout`]. Default 30 s.
    pub fetch_timeout: Duration,
    /// Deadline to open one TCP (and TLS) connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Retries of one fetch after a transient fault (5xx, 429, a refused
    /// or reset connection, a body cut short). Default 6.
    pub max_retries: u32,
    /// Wait before the first retry; doubles at each further one. Default
    /// 100 ms.
    pub backoff_initial: Duration,
    /// Longest wait between two retries. Default 5 s.
    pub backoff_max: Duration,
    /// Most GETs that prefetch keeps in flight at once. Default 4.
    pub prefetch_depth: usize,
    /// Most bytes one prefetch GET asks for: consecutive units prefetched
    /// together (readahead, `cache`) go in one GET of up to this many
    /// bytes, cut into units when it arrives; one unit per GET when it is
    /// no more than `fetch_size`. Default 8 MiB.
    pub prefetch_get_max: u64,
    /// Threads of the fetcher's own runtime (its GETs are asynchronous:
    /// these threads only drive them). Default 2.
    pub threads: usize,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            fetch_size: DEFAULT_FETCH_SIZE,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            connect_timeout: Duration::from_secs(5),
            max_retries: 6,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            prefetch_depth: 4,
            prefetch_get_max: 8 << 20,
            threads: 2,
        }
    }
}

impl Params {
    /// Most units one prefetch GET covers (at least one).
    pub(crate) fn units_per_prefetch_get(&self) -> u64 {
        (self.prefetch_get_max / self.fetch_size.max(1)).max(1)
    }

    /// Checks the parameters against each other and the device's block size.
    pub fn check(&self, block_size: u32) -> Result<(), Error> {
        check_fetch_size(self.fetch_size, block_size)?;
        if self.fetch_timeout.is_zero() {
            return Err(Error::Param("--fetch-timeout must be more than 0".into()));
        }
        if self.prefetch_depth == 0 || self.threads == 0 {
            return Err(Error::Param(
                "the prefetch depth and the thread count must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Largest `--fetch-size`: one GET's body is held in memory whole.
pub const MAX_FETCH_SIZE: u64 = 64 << 20;

fn check_fetch_size(n: u64, block_size: u32) -> Result<(), Error> {
    let bs = block_size as u64;
    if n == 0 || bs == 0 || !n.is_multiple_of(bs) {
        return Err(Error::Param(format!(
            "--fetch-size {n} must be a non-zero multiple of the block size {bs}"
        )));
    }
    if n > MAX_FETCH_SIZE {
        return Err(Error::Param(format!(
            "--fetch-size {n} is more than the largest, {MAX_FETCH_SIZE} (64M)"
        )));
    }
    Ok(())
}

/// Parses and checks `--fetch-size` (`1M`, `256K`, `4194304`) against the
/// device's block size.
pub fn parse_fetch_size(s: &str, block_size: u32) -> Result<u64, Error> {
    let n = crate::size::parse_size(s).map_err(|e| Error::Param(format!("--fetch-size: {e}")))?;
    check_fetch_size(n, block_size)?;
    Ok(n)
}

/// Parses `--fetch-timeout`: seconds (`30`, `2.5`) or with a unit (`500ms`,
/// `30s`, `2m`); more than zero, at most an hour.
pub fn parse_fetch_timeout(s: &str) -> Result<Duration, Error> {
    let t = s.trim();
    let bad = || {
        Error::Param(format!(
            "--fetch-timeout: '{s}' is not a duration (expected e.g. 30, 2.5s, 500ms, 2m)"
        ))
    };
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    let secs = v * scale;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(Error::Param(format!(
            "--fetch-timeout: '{s}' must be more than 0"
        )));
    }
    if secs > 3600.0 {
        return Err(Error::Param(format!(
            "--fetch-timeout: '{s}' is more than an hour"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_size() {
        assert_eq!(parse_fetch_size("1M", 4096).unwrap(), 1 << 20);
        assert_eq!(parse_fetch_size("64K", 65536).unwrap(), 65536);
        assert!(parse_fetch_size("6K", 4096).is_err());
        assert!(parse_fetch_size("0", 4096).is_err());
        assert!(parse_fetch_size("128M", 4096).is_err());
        assert!(parse_fetch_size("x", 4096).is_err());
        assert_eq!(Params::default().fetch_size, DEFAULT_FETCH_SIZE);
        assert!(Params::default().check(4096).is_ok());
        assert!(Params::default().check(1 << 21).is_err());
    }

    #[test]
    fn fetch_timeout() {
        assert_eq!(parse_fetch_timeout("30").unwrap(), Duration::from_secs(30));
        assert_eq!(
            parse_fetch_timeout("2.5s").unwrap(),
            Duration::from_millis(2500)
        );
        assert_eq!(
            parse_fetch_timeout("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_fetch_timeout("2m").unwrap(), Duration::from_secs(120));
        for bad in ["0", "-1", "abc", "", "2h", "5000s"] {
            assert!(parse_fetch_timeout(bad).is_err(), "{bad}");
        }
    }
}
