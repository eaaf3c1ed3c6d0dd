//! The errors of a remote base, each one line a user understands, and the
//! translation of `object_store`'s errors into them (which of those are
//! worth a retry, and what to say about the rest).

use std::error::Error as _;
use std::time::Duration;

/// What went wrong with a remote base. Every variant names the URL; none
/// carries a debug dump of the HTTP client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The URL is not one we serve.
    #[error(
        "'{url}' is not a base URL: {why} (expected s3://BUCKET/KEY, https://HOST/PATH or http://HOST/PATH)"
    )]
    BadUrl { url: String, why: String },
    /// The store's settings (environment, URL) are unusable.
    #[error("{url}: {why}")]
    Config { url: String, why: String },
    /// The bucket does not exist.
    #[error("{url}: no such bucket '{bucket}'")]
    NoSuchBucket { url: String, bucket: String },
    /// The object does not exist (in an existing bucket, or on the server).
    #[error("{url}: no such object")]
    NoSuchObject { url: String },
    /// The server refused the credentials, or they lack the permission.
    #[error("{url}: access denied ({why})")]
    Denied { url: String, why: String },
    /// No connection could be made to the server.
    #[error("{url}: cannot reach the server ({why})")]
    Unreachable { url: String, why: String },
    /// The object could not be opened for another reason.
    #[error("{url}: cannot open the object: {why}")]
    Open { url: String, why: String },
    /// The object cannot be a block device's base.
    #[error("{url}: the object's size {size} is not a non-zero multiple of 512 bytes")]
    BadSize { url: String, size: u64 },
    /// The object is no longer the one that was opened (replaced, changed
    /// or deleted): no data of the new one is ever returned.
    #[error("{url}: the object changed since it was opened ({why})")]
    Changed { url: String, why: String },
    /// A fetch did not finish within its deadline.
    #[error("{url}: fetch of bytes {start}..{end} timed out after {}s{}", after.as_secs_f64(),
        if last.is_empty() { String::new() } else { format!(" (last: {last})") })]
    Timeout {
        url: String,
        start: u64,
        end: u64,
        after: Duration,
        /// The last fault seen before the deadline, or "".
        last: String,
    },
    /// A fetch failed for good (a permanent error, or retries exhausted).
    #[error("{url}: fetch of bytes {start}..{end} failed: {why}")]
    Failed {
        url: String,
        start: u64,
        end: u64,
        why: String,
    },
    /// A parameter is out of range.
    #[error("{0}")]
    Param(String),
}

/// How one failed request from `object_store` is to be treated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// 404.
    NotFound,
    /// 412: the pinned identity no longer matches.
    Precondition,
    /// 401 or 403.
    Denied(String),
    /// No connection could be made (refused, no route, connect timeout).
    Connect(String),
    /// Worth another try: a 5xx or 429, a reset connection, a timeout,
    /// a body cut short.
    Transient(String),
    /// Not worth another try: any other answer.
    Permanent(String),
    /// An answer that does not belong to the pinned object (another size
    /// or ETag, a range other than the one asked for).
    Mismatch(String),
}

impl Fault {
    /// The short reason, for an error line.
    pub(crate) fn why(&self) -> String {
        match self {
            Fault::NotFound => "not found".into(),
            Fault::Precondition => "precondition failed".into(),
            Fault::Denied(s)
            | Fault::Connect(s)
            | Fault::Transient(s)
            | Fault::Permanent(s)
            | Fault::Mismatch(s) => s.clone(),
        }
    }

    /// Whether a retry may help.
    pub(crate) fn retryable(&self) -> bool {
        matches!(self, Fault::Transient(_) | Fault::Connect(_))
    }
}

/// Sorts an `object_store` error into a [`Fault`] with a short reason.
pub(crate) fn classify(e: &object_store::Error) -> Fault {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => Fault::NotFound,
        E::Precondition { .. } => Fault::Precondition,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => Fault::Denied(denied_reason(e)),
        E::NotSupported { .. } => Fault::Permanent(
            "the server does not answer range requests (HTTP 206 Partial Content)".into(),
        ),
        _ => {
            if let Some(kind) = http_error_kind(e) {
                use object_store::client::HttpErrorKind as K;
                let cause = root_cause(e);
                return match kind {
                    K::Connect => Fault::Connect(cause),
                    K::Timeout => Fault::Transient(format!("timed out: {cause}")),
                    _ => Fault::Transient(cause),
                };
            }
            let text = e.to_string();
            match status_in(&text) {
                Some(s) if s >= 500 || s == 429 || s == 408 => {
                    Fault::Transient(format!("the server answered HTTP {s}"))
                }
                Some(416) => {
                    Fault::Permanent("the server answered HTTP 416 (range not satisfiable)".into())
                }
                Some(s) => {
                    Fault::Permanent(format!("the server answered HTTP {s}{}", s3_code(&text)))
                }
                // A body cut short, a range the server got wrong: try again.
                None => Fault::Transient(root_cause(e)),
            }
        }
    }
}

/// The transport error's kind, if a transport error is in the chain.
fn http_error_kind(e: &object_store::Error) -> Option<object_store::client::HttpErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(c) = cur {
        if let Some(h) = c.downcast_ref::<object_store::client::HttpError>() {
            return Some(h.kind());
        }
        cur = c.source();
    }
    None
}

/// The innermost cause's message: "Connection refused (os error 111)"
/// rather than the chain of wrappers around it.
fn root_cause(e: &object_store::Error) -> String {
    let mut last: &dyn std::error::Error = e;
    while let Some(s) = last.source() {
        last = s;
    }
    let s = last.to_string();
    // Keep one line, and not too much of it.
    let s = s.lines().next().unwrap_or("").trim().to_string();
    if s.len() > 200 {
        format!("{}...", &s[..200])
    } else {
        s
    }
}

/// The HTTP status `object_store` put in its message, if any.
fn status_in(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text[at..].get(..3)?.parse().ok()
}

/// ": <Code>" from an S3 error body in `text`, or "".
fn s3_code(text: &str) -> String {
    match xml_field(text, "Code") {
        Some(c) => format!(": {c}"),
        None => String::new(),
    }
}

/// The text of `<tag>...</tag>` in `text`.
pub(crate) fn xml_field<'a>(text: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = text.find(&open)? + open.len();
    let end = start + text[start..].find(&close)?;
    Some(&text[start..end])
}

fn denied_reason(e: &object_store::Error) -> String {
    let text = e.to_string();
    let status = status_in(&text)
        .map(|s| format!("HTTP {s}"))
        .unwrap_or_default();
    let code = xml_field(&text, "Code").unwrap_or("");
    let detail = [status.as_str(), code]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    if detail.is_empty() {
        "wrong credentials or no permission".into()
    } else {
        format!("{detail}: wrong credentials or no permission")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_codes() {
        let t = "Error performing GET http://x in 1ms - Server returned non-2xx status code: 503 Service Unavailable: <Error><Code>SlowDown</Code></Error>";
        assert_eq!(status_in(t), Some(503));
        assert_eq!(xml_field(t, "Code"), Some("SlowDown"));
        assert_eq!(status_in("no status here"), None);
    }

    #[test]
    fn retryable_faults() {
        assert!(Fault::Transient("x".into()).retryable());
        assert!(Fault::Connect("x".into()).retryable());
        assert!(!Fault::Precondition.retryable());
        assert!(!Fault::NotFound.retryable());
        assert!(!Fault::Denied("x".into()).retryable());
    }
}
