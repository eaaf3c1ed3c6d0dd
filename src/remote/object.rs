//! One remote object, opened: the store it lives in (built with
//! `object_store` from the URL and the AWS environment), its identity
//! (size, and ETag or Last-Modified) taken from a HEAD, and one ranged GET
//! pinned to that identity. Retries, deadlines and sharing are the
//! fetcher's; this file makes single requests.

use super::error::{Fault, classify, xml_field};
use super::{Error, Params, RemoteUrl};
use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::http::HttpBuilder;
use object_store::path::Path;
use object_store::{
    ClientConfigKey, GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt, RetryConfig,
};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

/// The AWS settings an S3 base is opened with: every `AWS_*` variable
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, ...). Captured once
/// (at `add`) and kept, so a daemon does not depend on its environment
/// later. `Debug` hides the values of secrets.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwsEnv {
    pub vars: Vec<(String, String)>,
}

impl AwsEnv {
    /// The `AWS_*` variables of this process's environment.
    pub fn from_process() -> AwsEnv {
        AwsEnv::from_pairs(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// The `AWS_*` pairs among `pairs` (others are ignored).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> AwsEnv {
        let mut vars: Vec<(String, String)> = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .filter(|(k, _)| k.starts_with("AWS_"))
            .collect();
        vars.sort();
        AwsEnv { vars }
    }
}

impl fmt::Debug for AwsEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in &self.vars {
            if k.contains("SECRET") || k.contains("TOKEN") {
                m.entry(k, &"(hidden)");
            } else {
                m.entry(k, v);
            }
        }
        m.finish()
    }
}

/// What makes an object the one a device was built on: a change of any of
/// these is a different base.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Bytes.
    pub size: u64,
    /// The ETag as the server gives it (quotes included), if it gives one.
    pub etag: Option<String>,
    /// Last-Modified (RFC 3339), if the server gives it.
    pub last_modified: Option<String>,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.size)?;
        if let Some(e) = &self.etag {
            write!(f, ", ETag {e}")?;
        }
        if let Some(m) = &self.last_modified {
            write!(f, ", modified {m}")?;
        }
        Ok(())
    }
}

/// An opened remote object.
#[derive(Debug)]
pub(crate) struct RemoteObject {
    store: Arc<dyn ObjectStore>,
    path: Path,
    url: String,
    identity: Identity,
    /// The HEAD's answer, for the pins of later GETs.
    meta: ObjectMeta,
}

/// The HTTP client's own retries are off: the fetcher retries, counts
/// and bounds them itself.
fn no_retries(params: &Params) -> RetryConfig {
    RetryConfig {
        max_retries: 0,
        retry_timeout: params.fetch_timeout,
        ..Default::default()
    }
}

fn ms(d: std::time::Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// The innermost message of a builder's error.
fn innermost(e: &dyn std::error::Error) -> String {
    let mut last = e;
    while let Some(s) = last.source() {
        last = s;
    }
    last.to_string()
}

/// The object's path in its store: an S3 key as it is, an HTTP path
/// percent-decoded. Empty, `.` and `..` segments are refused: the store
/// would quietly name another object.
fn object_path(url: &RemoteUrl) -> Result<Path, Error> {
    let bad = |why: String| Error::BadUrl {
        url: url.to_string(),
        why,
    };
    let path = match url {
        RemoteUrl::S3 { key, .. } => {
            if key.starts_with('/') {
                return Err(bad("the key has an empty path segment".into()));
            }
            Path::parse(key)
        }
        RemoteUrl::Http { path, .. } => Path::from_url_path(path),
    };
    path.map_err(|e| bad(innermost(&e)))
}

/// The store for `url` and the object's path in it, for an upload.
pub(crate) fn store_for(
    url: &RemoteUrl,
    env: &AwsEnv,
    params: &Params,
) -> Result<(Arc<dyn ObjectStore>, Path), Error> {
    build(url, env, params)
}

/// Builds the store for `url` and the object's path in it.
fn build(
    url: &RemoteUrl,
    env: &AwsEnv,
    params: &Params,
) -> Result<(Arc<dyn ObjectStore>, Path), Error> {
    let config = |e: object_store::Error| Error::Config {
        url: url.to_string(),
        why: innermost(&e),
    };
    match url {
        RemoteUrl::S3 { bucket, .. } => {
            let path = object_path(url)?;
            let mut b = AmazonS3Builder::new();
            for (k, v) in &env.vars {
                if let Ok(key) = k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
            let store = b
                .with_bucket_name(bucket)
                .with_retry(no_retries(params))
                .with_config(
                    AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                    ms(params.connect_timeout),
                )
                .with_config(
                    AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                    ms(params.fetch_timeout),
                )
                .build()
                .map_err(config)?;
            Ok((Arc::new(store), path))
        }
        RemoteUrl::Http { tls, authority, .. } => {
            let path = object_path(url)?;
            let scheme = if *tls { "https" } else { "http" };
            let store = HttpBuilder::new()
                .with_url(format!("{scheme}://{authority}"))
                .with_retry(no_retries(params))
                .with_config(ClientConfigKey::AllowHttp, (!tls).to_string())
                .with_config(ClientConfigKey::ConnectTimeout, ms(params.connect_timeout))
                .with_config(ClientConfigKey::Timeout, ms(params.fetch_timeout))
                .build()
                .map_err(config)?;
            Ok((Arc::new(store), path))
        }
    }
}

/// `op` again after a transient fault, with backoff, at most
/// `params.max_retries` times; any other fault at once. For the requests
/// of an open (the fetcher retries its GETs itself, and counts them).
pub(crate) async fn retried<T, F, Fut>(params: &Params, mut op: F) -> Result<T, Fault>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Fault>>,
{
    let mut backoff = params.backoff_initial;
    let mut tries = 0;
    loop {
        match op().await {
            Err(Fault::Transient(_)) if tries < params.max_retries => {
                tries += 1;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(params.backoff_max);
            }
            r => return r,
        }
    }
}

impl RemoteObject {
    /// Opens `url`: builds the store and takes the object's identity with a
    /// HEAD (retried on transient faults, within `params.fetch_timeout`).
    /// Refuses an unknown bucket or object, wrong credentials, a server
    /// that cannot be reached, and a size that is not a non-zero multiple
    /// of 512.
    pub(crate) async fn open(
        url: &RemoteUrl,
        env: &AwsEnv,
        params: &Params,
    ) -> Result<RemoteObject, Error> {
        let (store, path) = build(url, env, params)?;
        let u = url.to_string();
        let head = retried(params, || async {
            store.head(&path).await.map_err(|e| classify(&e))
        });
        let meta = match tokio::time::timeout(params.fetch_timeout, head).await {
            Err(_) => {
                return Err(Error::Unreachable {
                    url: u,
                    why: format!("no answer within {}s", params.fetch_timeout.as_secs_f64()),
                });
            }
            Ok(Ok(m)) => m,
            Ok(Err(Fault::NotFound)) => return Err(not_found(url, &store, &path).await),
            Ok(Err(Fault::Denied(why))) => return Err(Error::Denied { url: u, why }),
            Ok(Err(Fault::Connect(why))) => return Err(Error::Unreachable { url: u, why }),
            Ok(Err(f)) => {
                return Err(Error::Open {
                    url: u,
                    why: f.why(),
                });
            }
        };
        if meta.size == 0 || !meta.size.is_multiple_of(512) {
            return Err(Error::BadSize {
                url: u,
                size: meta.size,
            });
        }
        let last_modified =
            (meta.last_modified.timestamp() != 0).then(|| meta.last_modified.to_rfc3339());
        if meta.e_tag.is_none() && last_modified.is_none() {
            return Err(Error::Open {
                url: u,
                why: "the server gives neither an ETag nor a Last-Modified, so a change of the \
                      object could not be told"
                    .into(),
            });
        }
        let identity = Identity {
            size: meta.size,
            etag: meta.e_tag.clone(),
            last_modified,
        };
        Ok(RemoteObject {
            store,
            path,
            url: u,
            identity,
            meta,
        })
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn identity(&self) -> &Identity {
        &self.identity
    }

    /// One GET of `range`, pinned: the server must still hold the object
    /// that was opened (If-Match on a strong ETag, else
    /// If-Unmodified-Since), and its answer must say the same size and
    /// ETag and carry exactly `range`.
    pub(crate) async fn get(&self, range: Range<u64>) -> Result<Bytes, Fault> {
        let strong = self.meta.e_tag.clone().filter(|e| !e.starts_with("W/"));
        let options = GetOptions {
            if_unmodified_since: match strong {
                None => Some(self.meta.last_modified),
                Some(_) => None,
            },
            if_match: strong,
            range: Some(GetRange::Bounded(range.clone())),
            ..Default::default()
        };
        let r = self
            .store
            .get_opts(&self.path, options)
            .await
            .map_err(|e| classify(&e))?;
        if r.meta.size != self.meta.size {
            return Err(Fault::Mismatch(format!(
                "its size is now {}, was {}",
                r.meta.size, self.meta.size
            )));
        }
        if r.meta.e_tag != self.meta.e_tag {
            return Err(Fault::Mismatch(format!(
                "its ETag is now {}, was {}",
                r.meta.e_tag.as_deref().unwrap_or("(none)"),
                self.meta.e_tag.as_deref().unwrap_or("(none)")
            )));
        }
        if r.range != range {
            return Err(Fault::Mismatch(format!(
                "the server sent bytes {:?} for {:?}",
                r.range, range
            )));
        }
        let bytes = r.bytes().await.map_err(|e| classify(&e))?;
        if bytes.len() as u64 != range.end - range.start {
            return Err(Fault::Transient(format!(
                "{} bytes received of {}",
                bytes.len(),
                range.end - range.start
            )));
        }
        Ok(bytes)
    }
}

/// After a 404 on HEAD, tells an unknown bucket from an unknown object: a
/// HEAD has no body, a GET's error body names the S3 error code.
async fn not_found(url: &RemoteUrl, store: &Arc<dyn ObjectStore>, path: &Path) -> Error {
    if let RemoteUrl::S3 { bucket, .. } = url {
        let probe = GetOptions {
            range: Some(GetRange::Bounded(0..1)),
            ..Default::default()
        };
        if let Err(e) = store.get_opts(path, probe).await
            && xml_field(&e.to_string(), "Code") == Some("NoSuchBucket")
        {
            return Error::NoSuchBucket {
                url: url.to_string(),
                bucket: bucket.clone(),
            };
        }
    }
    Error::NoSuchObject {
        url: url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_paths() {
        let p = |u: &str| object_path(&RemoteUrl::parse(u).unwrap());
        assert_eq!(
            p("s3://bucket/a/b-c_1.img").unwrap().as_ref(),
            "a/b-c_1.img"
        );
        assert_eq!(p("http://h/a/b%20c.img").unwrap().as_ref(), "a/b c.img");
        for bad in [
            "s3://bucket//a.img",
            "s3://bucket/a//b.img",
            "s3://bucket/a/../b.img",
            "http://h/a//b.img",
            "http://h/./b.img",
        ] {
            let e = p(bad).unwrap_err();
            assert!(matches!(e, Error::BadUrl { .. }), "{bad}: {e:?}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let env = AwsEnv::from_pairs([
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t"),
            ("AWS_SESSION_TOKEN", "t0k3n"),
            ("HOME", "/root"),
        ]);
        assert_eq!(env.vars.len(), 3);
        let d = format!("{env:?}");
        assert!(
            d.contains("AKID") && !d.contains("s3cr3t") && !d.contains("t0k3n"),
            "{d}"
        );
    }
}
