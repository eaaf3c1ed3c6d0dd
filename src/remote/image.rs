//! What a base URL names: a raw image, or a pushed layer
//! (`engine::packed`) whose backing is another URL, and so on down to a raw
//! image. Opening follows the backings and checks each against the
//! identity its layer recorded at the push; a ranged read of the virtual
//! disk becomes one GET per run of bytes that one object holds
//! (`packed::plan_read`), sent together. Retries, deadlines and sharing are
//! the fetcher's, over the whole read.

use super::error::Fault;
use super::object::{RemoteObject, retried};
use super::{AwsEnv, Error, Identity, Params, RemoteUrl};
use crate::engine::chain::MAX_LAYERS;
use crate::engine::overlay::MAGIC as OVERLAY_MAGIC;
use crate::engine::packed::{self, PackedHeader, PackedIndex};
use bytes::{Bytes, BytesMut};
use std::ops::Range;

/// Bytes between two runs of one object that a read fetches rather than
/// send another GET for them: a GET costs a round trip and the store's
/// work per request, which about this many bytes also cost.
const MAX_GAP: u64 = 256 << 10;

/// A remote image, opened.
pub(crate) enum Image {
    /// A raw image: the object's bytes are the disk's.
    Raw(RemoteObject),
    /// Pushed layers over a raw image.
    Layers(Stack),
}

/// Pushed layers, top first, over a raw image.
pub(crate) struct Stack {
    levels: Vec<Level>,
    base: RemoteObject,
    /// The top object's version, with the virtual disk's size.
    identity: Identity,
    block_size: u64,
}

/// One pushed layer of a stack.
pub(crate) struct Level {
    object: RemoteObject,
    header: PackedHeader,
    index: PackedIndex,
}

/// A GET of `range` at open (retried on transient faults, within the
/// fetch deadline), its fault an error about the object.
async fn get_at_open(
    object: &RemoteObject,
    params: &Params,
    range: Range<u64>,
) -> Result<Bytes, Error> {
    let url = || object.url().to_string();
    let get = retried(params, || object.get(range.clone()));
    match tokio::time::timeout(params.fetch_timeout, get).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(f)) => Err(Error::Open {
            url: url(),
            why: f.why(),
        }),
        Err(_) => Err(Error::Unreachable {
            url: url(),
            why: format!("no answer within {}s", params.fetch_timeout.as_secs_f64()),
        }),
    }
}

impl Image {
    /// Opens `url` and, if it is a pushed layer, every backing below it.
    pub(crate) async fn open(
        url: &RemoteUrl,
        env: &AwsEnv,
        params: &Params,
    ) -> Result<Image, Error> {
        let mut seen = Vec::new();
        Image::open_below(url, env, params, &mut seen).await
    }

    async fn open_below(
        url: &RemoteUrl,
        env: &AwsEnv,
        params: &Params,
        seen: &mut Vec<String>,
    ) -> Result<Image, Error> {
        let u = url.to_string();
        if seen.contains(&u) {
            return Err(Error::Config {
                url: seen[0].clone(),
                why: format!("its pushed layers have a cycle: {u} is below itself"),
            });
        }
        if seen.len() >= MAX_LAYERS {
            return Err(Error::Config {
                url: seen[0].clone(),
                why: format!("more than {MAX_LAYERS} pushed layers"),
            });
        }
        seen.push(u.clone());
        let object = RemoteObject::open(url, env, params).await?;
        let size = object.identity().size;
        let prefix = get_at_open(&object, params, 0..packed::PREFIX.min(size)).await?;
        let bad = |e: crate::engine::Error| Error::Config {
            url: u.clone(),
            why: e.to_string(),
        };
        if prefix.starts_with(OVERLAY_MAGIC) {
            return Err(Error::Config {
                url: u,
                why: "the object is a ublk-cow overlay file, not a raw image nor a pushed \
                      layer: upload a layer with `ublk-cow push`, which packs it"
                    .into(),
            });
        }
        let Some(len) = PackedHeader::length(&prefix).map_err(bad)? else {
            return Ok(Image::Raw(object));
        };
        let json_end = packed::PREFIX + len;
        if json_end > size {
            return Err(bad(crate::engine::Error::corrupt(
                "a pushed layer cut short in its header",
            )));
        }
        let json = get_at_open(&object, params, packed::PREFIX..json_end).await?;
        let header = PackedHeader::decode(&json, size).map_err(bad)?;
        let range = header.index_range();
        let bytes = match range.is_empty() {
            true => Bytes::new(),
            false => get_at_open(&object, params, range).await?,
        };
        let index = PackedIndex::decode(&header, &bytes).map_err(bad)?;
        let below_url = RemoteUrl::parse(&header.backing.url).map_err(|e| Error::Config {
            url: u.clone(),
            why: format!("its backing: {e}"),
        })?;
        let below = Box::pin(Image::open_below(&below_url, env, params, seen)).await?;
        let (want, got) = (&header.backing, below.identity());
        if &want.identity != got {
            return Err(Error::Changed {
                url: want.url.clone(),
                why: format!("{u} was pushed over {}, it is now {got}", want.identity),
            });
        }
        if want.identity.size != header.size {
            return Err(Error::Config {
                url: u,
                why: format!(
                    "its virtual size {} differs from its backing's {}",
                    header.size, want.identity.size
                ),
            });
        }
        let identity = Identity {
            size: header.size,
            ..object.identity().clone()
        };
        let block_size = header.block_size as u64;
        let level = Level {
            object,
            header,
            index,
        };
        let (levels, base) = match below {
            Image::Raw(base) => (vec![level], base),
            Image::Layers(s) if s.block_size == block_size => {
                let mut levels = vec![level];
                levels.extend(s.levels);
                (levels, s.base)
            }
            Image::Layers(s) => {
                return Err(Error::Config {
                    url: u,
                    why: format!(
                        "its block size {block_size} differs from its backing's {}",
                        s.block_size
                    ),
                });
            }
        };
        Ok(Image::Layers(Stack {
            levels,
            base,
            identity,
            block_size,
        }))
    }

    /// The top object's URL.
    pub(crate) fn url(&self) -> &str {
        match self {
            Image::Raw(o) => o.url(),
            Image::Layers(s) => s.levels[0].object.url(),
        }
    }

    /// The virtual disk's size, with the top object's version.
    pub(crate) fn identity(&self) -> &Identity {
        match self {
            Image::Raw(o) => o.identity(),
            Image::Layers(s) => &s.identity,
        }
    }

    /// The top pushed layer's header, if the image is pushed layers.
    pub(crate) fn top_layer(&self) -> Option<&PackedHeader> {
        match self {
            Image::Raw(_) => None,
            Image::Layers(s) => Some(&s.levels[0].header),
        }
    }

    /// The URL of every object the image reads, the top's first.
    pub(crate) fn urls(&self) -> Vec<&str> {
        match self {
            Image::Raw(o) => vec![o.url()],
            Image::Layers(s) => s
                .levels
                .iter()
                .map(|l| l.object.url())
                .chain([s.base.url()])
                .collect(),
        }
    }

    /// Bytes `range` of the virtual disk: for pushed layers, the runs each
    /// object holds, those close together in one GET (`packed::plan_gets`),
    /// all in flight at once; zeros need none.
    pub(crate) async fn get(&self, range: Range<u64>) -> Result<Bytes, Fault> {
        let s = match self {
            Image::Raw(o) => return o.get(range).await,
            Image::Layers(s) => s,
        };
        let indexes: Vec<&PackedIndex> = s.levels.iter().map(|l| &l.index).collect();
        let parts = packed::plan_read(&indexes, s.block_size, range.clone());
        let object = |level: usize| match s.levels.get(level) {
            Some(l) => &l.object,
            None => &s.base,
        };
        let (gets, at) = packed::plan_gets(&parts, MAX_GAP);
        if let ([g], [Some(_)]) = (&gets[..], &at[..]) {
            let o = object(g.level);
            return o
                .get(g.range.clone())
                .await
                .map_err(|f| below(o, g.level, f));
        }
        let got = futures_util::future::try_join_all(gets.iter().map(|g| {
            let o = object(g.level);
            async move {
                o.get(g.range.clone())
                    .await
                    .map_err(|f| below(o, g.level, f))
            }
        }))
        .await?;
        let mut out = BytesMut::zeroed((range.end - range.start) as usize);
        let mut pos = 0usize;
        for (p, at) in parts.iter().zip(at) {
            let len = p.len as usize;
            if let Some((g, off)) = at {
                let off = off as usize;
                out[pos..pos + len].copy_from_slice(&got[g][off..off + len]);
            }
            pos += len;
        }
        Ok(out.freeze())
    }
}

/// A fault of an object below the top: a sign that it changed is said
/// with its URL (the fetcher names the top's).
fn below(object: &RemoteObject, level: usize, f: Fault) -> Fault {
    match (level, f) {
        (0, f) => f,
        (_, Fault::NotFound) => Fault::Mismatch(format!("{} is gone", object.url())),
        (_, Fault::Precondition) => Fault::Mismatch(format!("{} changed", object.url())),
        (_, Fault::Mismatch(why)) => Fault::Mismatch(format!("{}: {why}", object.url())),
        (_, f) => f,
    }
}
