//! Base URLs: `s3://BUCKET/KEY`, `https://HOST/PATH` and `http://HOST/PATH`,
//! parsed into [`RemoteUrl`]. Anything else is refused with one line that
//! names the URL.

use super::Error;
use std::fmt;

/// Where a remote base lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteUrl {
    /// An object in an S3 (or S3-compatible) bucket; the endpoint, region
    /// and credentials come from the AWS environment.
    S3 { bucket: String, key: String },
    /// A file on an HTTP(S) server that answers range requests.
    Http {
        /// `true` for `https`.
        tls: bool,
        /// `HOST` or `HOST:PORT`.
        authority: String,
        /// The path after the authority, without its leading `/`.
        path: String,
    },
}

impl RemoteUrl {
    /// Parses a base URL.
    pub fn parse(url: &str) -> Result<RemoteUrl, Error> {
        let bad = |why: &str| Error::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(bad("no scheme"));
        };
        if rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("it contains white space"));
        }
        let (first, tail) = match rest.split_once('/') {
            Some((a, b)) => (a, b),
            None => (rest, ""),
        };
        match scheme {
            "s3" => {
                if first.is_empty() {
                    return Err(bad("the bucket is empty"));
                }
                if !valid_bucket(first) {
                    return Err(bad("the bucket name is not valid"));
                }
                if tail.is_empty() || tail.ends_with('/') {
                    return Err(bad("no object key"));
                }
                Ok(RemoteUrl::S3 {
                    bucket: first.to_string(),
                    key: tail.to_string(),
                })
            }
            "http" | "https" => {
                if first.is_empty() {
                    return Err(bad("the host is empty"));
                }
                if first.contains('@') {
                    return Err(bad("credentials in the URL are not supported"));
                }
                if tail.contains(['?', '#']) {
                    return Err(bad("a query or fragment is not supported"));
                }
                if tail.is_empty() || tail.ends_with('/') {
                    return Err(bad("no file path"));
                }
                Ok(RemoteUrl::Http {
                    tls: scheme == "https",
                    authority: first.to_string(),
                    path: tail.to_string(),
                })
            }
            "" => Err(bad("no scheme")),
            _ => Err(bad(&format!("unknown scheme '{scheme}'"))),
        }
    }

    /// Whether `s` looks like a URL (`SCHEME://`) rather than a file path:
    /// what `--base` uses to tell the two apart.
    pub fn looks_like_url(s: &str) -> bool {
        match s.split_once("://") {
            Some((scheme, _)) => {
                !scheme.is_empty()
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            }
            None => false,
        }
    }
}

/// S3's rules for a bucket name, loosely: 3 to 63 of lower-case letters,
/// digits, dots and hyphens.
fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
}

impl fmt::Display for RemoteUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemoteUrl::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
            RemoteUrl::Http {
                tls,
                authority,
                path,
            } => write!(
                f,
                "{}://{authority}/{path}",
                if *tls { "https" } else { "http" }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_urls() {
        assert_eq!(
            RemoteUrl::parse("s3://my-bucket/images/disk.img").unwrap(),
            RemoteUrl::S3 {
                bucket: "my-bucket".into(),
                key: "images/disk.img".into()
            }
        );
        assert_eq!(
            RemoteUrl::parse("https://example.org:8443/a/b.img").unwrap(),
            RemoteUrl::Http {
                tls: true,
                authority: "example.org:8443".into(),
                path: "a/b.img".into()
            }
        );
        let u = "http://127.0.0.1:80/x.img";
        assert_eq!(RemoteUrl::parse(u).unwrap().to_string(), u);
    }

    #[test]
    fn bad_urls() {
        for (u, why) in [
            ("s3://bucket", "no object key"),
            ("s3://bucket/", "no object key"),
            ("s3:///key", "the bucket is empty"),
            ("s3://B!/key", "bucket name"),
            ("ftp://host/x", "unknown scheme 'ftp'"),
            ("disk.img", "no scheme"),
            ("://x/y", "no scheme"),
            ("https://host", "no file path"),
            ("https:///x", "the host is empty"),
            ("https://u:p@host/x", "credentials"),
            ("https://host/x?y=1", "query"),
        ] {
            let e = RemoteUrl::parse(u).unwrap_err();
            let line = e.to_string();
            assert!(line.contains(why), "{u}: {line}");
            assert!(line.contains(u), "{u}: {line}");
            assert!(!line.contains('\n'));
        }
    }

    #[test]
    fn url_or_path() {
        assert!(RemoteUrl::looks_like_url("s3://b/k"));
        assert!(RemoteUrl::looks_like_url("ftp://h/p"));
        assert!(!RemoteUrl::looks_like_url("/var/disk.img"));
        assert!(!RemoteUrl::looks_like_url("dir/a://b"));
    }
}
