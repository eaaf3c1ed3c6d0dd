//! The daemon's control socket, `<run dir>/<id>.sock` (mode 0600): one JSON
//! request per connection, answered with JSON lines.
//!
//! Only root and the user that added the device are served: the socket is
//! bound inside the run directory, which only its owner can enter (so it is
//! never reachable by others, not even before its mode is set), and each
//! connection's peer is checked by the uid the kernel recorded for it
//! (`SO_PEERCRED`). Anyone else gets one error line, and the daemon goes on.
//!
//! - `{"op":"stats"}` → `{"stats":{...}}`
//! - `{"op":"cache","offset":O,"length":L,"mode":M|null}` → progress lines
//!   `{"progress":done,"total":L}`, then `{"done":{...}}` or `{"error":"..."}`.
//! - `{"op":"snapshot","overlay":PATH}` (root only) → `{"snapshot":{...}}`,
//!   where the pause went (`snapshot::in_daemon`), or `{"error":"..."}`.
//!
//! Each connection is served on a thread of its own. Cache commands run
//! there with the synchronous executor, in pieces, so that a whole-device
//! request neither blocks a queue nor holds any block lock for long; each
//! piece holds a pass of the device's gate (`ublk::current`), so a live
//! snapshot waits for at most one piece. Over a remote base they run as
//! `fetch_all` does them.

use crate::daemon::snapshot::{Pause, in_daemon};
use crate::daemon::{Live, state};
use crate::engine::cache::CacheMode;
use crate::engine::device::CacheDone;
use crate::stats::{CacheSource, Stats, StatsSnapshot};
use crate::ublk::ServedDevice;
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum Request {
    Stats,
    Cache {
        offset: u64,
        length: u64,
        mode: Option<CacheMode>,
    },
    /// A live snapshot into the new overlay `overlay` (an absolute path);
    /// root only.
    Snapshot {
        overlay: PathBuf,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Reply {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) stats: Option<StatsSnapshot>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) progress: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) done: Option<CacheDone>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) snapshot: Option<Pause>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

impl Reply {
    fn error(msg: String) -> Reply {
        Reply {
            error: Some(msg),
            ..Reply::default()
        }
    }
}

/// A cache command is carried out in pieces of this many bytes, with a
/// progress line after each.
const PIECE: u64 = 16 << 20;

/// Binds the socket of device `id` (in the run directory, which the caller
/// has checked) and serves it on a thread of its own, to root and `owner`.
pub(crate) fn serve(id: u32, live: Arc<Live>, owner: u32) -> Result<()> {
    let path = state::socket_path(id);
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let uid = match admit(&conn, id, owner) {
                    Ok(uid) => uid,
                    Err(refusal) => {
                        log::warn!("control: {refusal}");
                        refuse(conn, refusal);
                        continue;
                    }
                };
                // A thread each: a long `cache` does not hold up a snapshot.
                let live = live.clone();
                let spawned = std::thread::Builder::new()
                    .name("control-request".into())
                    .spawn(move || {
                        if let Err(e) = handle(conn, &live, uid) {
                            log::warn!("control request: {}", crate::cli::error_line(&e));
                        }
                    });
                if let Err(e) = spawned {
                    log::warn!("control request: no thread for it: {e}");
                }
            }
        })?;
    Ok(())
}

/// Answers a refused connection with one error line. Its request is read
/// first (a little of it, briefly): a socket closed with unread data is
/// reset, and the peer could lose the answer, or fail to send.
fn refuse(mut conn: UnixStream, refusal: String) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let mut request = Vec::new();
    let _ = BufReader::new(Read::take(&conn, 4096)).read_until(b'\n', &mut request);
    let _ = send(&mut conn, &Reply::error(refusal));
}

/// Whether the peer of `conn` may use device `id`: root and `owner` may.
/// Gives the peer's uid.
fn admit(conn: &UnixStream, id: u32, owner: u32) -> std::result::Result<u32, String> {
    let uid = crate::sys::peer_uid(conn)
        .map_err(|e| format!("device {id}: cannot tell who is asking ({e}): refused"))?;
    if state::may_use(uid, owner) {
        Ok(uid)
    } else {
        Err(format!(
            "device {id}: permission denied to uid {uid}: only root and its owner (uid {owner}) may use it"
        ))
    }
}

fn send(conn: &mut UnixStream, r: &Reply) -> Result<()> {
    let mut line = serde_json::to_vec(r)?;
    line.push(b'\n');
    conn.write_all(&line)?;
    Ok(())
}

pub(crate) fn snapshot(sh: &ServedDevice) -> StatsSnapshot {
    let mut s = sh.stats.snapshot();
    let c = sh.dev.map().counts();
    s.blocks_unallocated = c.unallocated;
    s.blocks_allocated = c.allocated;
    s.blocks_zero = c.zero;
    if let Some(f) = sh.dev.base().remote().and_then(|r| r.fetcher()) {
        let r = f.counters().snapshot();
        s.remote_gets = r.gets;
        s.remote_bytes = r.bytes;
        s.remote_retries = r.retries;
        s.remote_fetch_failures = r.failures;
        s.remote_fetches = r.fetches;
        s.remote_fetch_latency_us_sum = r.latency_us_sum;
        s.remote_fetch_latency_us_max = r.latency_us_max;
        s.remote_gets_in_flight_max = r.in_flight_max;
    }
    s
}

fn handle(mut conn: UnixStream, live: &Live, uid: u32) -> Result<()> {
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let req: Request = serde_json::from_str(&line).context("bad request")?;
    let current = &live.current;
    let sh = &*current.device();
    match req {
        Request::Stats => send(
            &mut conn,
            &Reply {
                stats: Some(snapshot(sh)),
                ..Reply::default()
            },
        ),
        Request::Snapshot { overlay } => {
            let reply = if uid != 0 {
                Reply::error("snapshot -n needs root".into())
            } else {
                match in_daemon(live, &overlay) {
                    Ok(pause) => Reply {
                        snapshot: Some(pause),
                        ..Reply::default()
                    },
                    Err(e) => Reply::error(crate::cli::error_line(&e)),
                }
            };
            send(&mut conn, &reply)
        }
        Request::Cache {
            offset,
            length,
            mode,
        } => {
            let mode = mode.unwrap_or(sh.policy.mode);
            let size = sh.dev.geometry().size();
            if offset >= size || length == 0 || length > size - offset {
                let error = format!("range {offset}+{length} is outside the device ({size} bytes)");
                return send(&mut conn, &Reply::error(error));
            }
            sh.stats.cache_request(CacheSource::Command);
            // A device over a remote base takes no snapshot, so its device
            // is never swapped: no pass is needed.
            if let Some(remote) = sh.dev.base().remote() {
                let total = Some(length);
                let done = super::fetch_all::cache_range(sh, remote, offset, length, |at| {
                    let progress = Reply {
                        progress: Some(at),
                        total,
                        ..Reply::default()
                    };
                    // A client that went away stops the work.
                    send(&mut conn, &progress)
                });
                let reply = match done {
                    Ok(d) => Reply {
                        done: Some(d),
                        ..Reply::default()
                    },
                    Err(e) => Reply::error(crate::cli::error_line(&e)),
                };
                return send(&mut conn, &reply);
            }
            let mut report = CacheDone::default();
            let mut at = offset;
            while at < offset + length {
                let n = PIECE.min(offset + length - at);
                // Each piece on the device served then (a live snapshot
                // may swap it between pieces), with a pass.
                let pass = current.pass_blocking();
                let sh = current.device();
                let done = sh.dev.cache(at, n, mode);
                drop(pass);
                match done {
                    Ok(d) => {
                        report += d;
                        let st = &sh.stats;
                        Stats::add(&st.fadvise_overlay_bytes, d.fadvised_overlay);
                        Stats::add(&st.fadvise_base_bytes, d.fadvised_base);
                        Stats::add(&st.cache_read_bytes, d.read);
                        Stats::add(&st.copied_to_overlay_bytes, d.copied);
                    }
                    Err(e) => {
                        return send(&mut conn, &Reply::error(format!("cache at {at}: {e}")));
                    }
                }
                at += n;
                let progress = Reply {
                    progress: Some(at - offset),
                    total: Some(length),
                    ..Reply::default()
                };
                // A client that went away stops the work.
                send(&mut conn, &progress)?;
            }
            send(
                &mut conn,
                &Reply {
                    done: Some(report),
                    ..Reply::default()
                },
            )
        }
    }
}

/// Client side: sends `req` to device `id`, calling `each` on every reply
/// line; returns the last one. An `error` reply becomes an error.
pub(crate) fn call(id: u32, req: &Request, mut each: impl FnMut(&Reply)) -> Result<Reply> {
    let path = state::socket_path(id);
    let mut conn = UnixStream::connect(&path)
        .with_context(|| format!("device {id}: the daemon's control socket does not answer"))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    conn.write_all(&line)?;
    let mut last = None;
    for l in BufReader::new(conn).lines() {
        let r: Reply = serde_json::from_str(&l?).context("bad reply from the daemon")?;
        if let Some(e) = r.error {
            bail!("{e}");
        }
        each(&r);
        last = Some(r);
    }
    last.ok_or_else(|| anyhow!("device {id}: the daemon closed the connection without answering"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused peer gets its one error line even when it sends its
    /// request after the daemon has decided: the daemon reads it first.
    #[test]
    fn a_refused_peer_gets_one_error_line() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let daemon = std::thread::spawn(move || refuse(server, "denied".into()));
        std::thread::sleep(Duration::from_millis(100));
        client.write_all(b"{\"op\":\"stats\"}\n").unwrap();
        let lines: Vec<String> = BufReader::new(client).lines().map(|l| l.unwrap()).collect();
        daemon.join().unwrap();
        assert_eq!(lines, [r#"{"error":"denied"}"#]);
    }

    /// The peer's uid is the kernel's record of who connected: here, us.
    #[test]
    fn admit_checks_the_peer_uid() {
        let (a, _b) = UnixStream::pair().unwrap();
        let me = crate::sys::euid();
        assert_eq!(crate::sys::peer_uid(&a).unwrap(), me);
        assert!(admit(&a, 3, me).is_ok());
        if me != 0 {
            // Not root: an owner other than us is refused.
            let err = admit(&a, 3, me + 1).unwrap_err();
            assert!(err.contains("permission denied"), "{err}");
        } else {
            // Root is let in whoever owns the device.
            assert!(admit(&a, 3, 12345).is_ok());
        }
    }
}
