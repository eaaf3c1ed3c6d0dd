//! `ublk-cow push LAYER s3://BUCKET/KEY`: a frozen layer packed
//! (`engine::packed`) and uploaded, so that `add --base s3://BUCKET/KEY`
//! serves it over the backing it names.
//!
//! The backing is a URL: `--backing`, or the one the layer records when it
//! was made over a remote base. Before anything is uploaded it must be what
//! the layer was made over, as copied blocks are left out: for a layer over
//! a layer, the push of that layer, whose recorded identity (size, mtime,
//! fingerprint: what a layer over it records, `engine::base`) equals the
//! one this layer recorded; for a layer over a raw image, a raw image of
//! that size whose sampled fingerprint matches; for a layer over a remote
//! base, that URL and version. So a stack is pushed bottom-up, each layer
//! over the push of the one below it, and its own identity is taken through
//! its local chain and recorded for the next. The layer is locked (shared)
//! while it is read. The
//! upload is one multipart upload (parts of [`PART`], a few in flight),
//! aborted on any error, so the object appears whole or not at all. An
//! object already at the URL is not replaced without `--force`: devices
//! may be reading it.

use crate::engine::base::BaseIdentity;
use crate::engine::chain::{Backed, Chain, Purpose, lock, open_layer};
use crate::engine::map::{BlockMap, MapMemory};
use crate::engine::overlay::BackingKind;
use crate::engine::packed::{self, Held, PackedBacking, PackedHeader, PackedLayerId};
use crate::engine::storage::Storage;
use crate::progress::Progress;
use crate::remote::object::store_for;
use crate::remote::{AwsEnv, Params, RemoteBase, RemoteUrl};
use anyhow::{Context, Result, anyhow, bail};
use object_store::{ObjectStoreExt, WriteMultipart};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bytes per part of the upload (S3 wants at least 5 MiB but the last).
pub const PART: usize = 8 << 20;
/// Parts uploading at once.
const PARTS_IN_FLIGHT: usize = 4;
/// Bytes read from the layer at a time.
const READ_CHUNK: u64 = 4 << 20;

/// What `push` was asked for.
pub struct PushRequest<'a> {
    pub layer: &'a Path,
    pub url: RemoteUrl,
    /// The backing's URL; `None`: the remote base the layer records.
    pub backing: Option<RemoteUrl>,
    pub env: AwsEnv,
    pub params: Params,
    /// Replace an object already at `url`.
    pub force: bool,
}

/// What a push did.
#[derive(Debug)]
pub struct Pushed {
    /// The object's length.
    pub bytes: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    pub backing: String,
    /// The new object's ETag, if the store gave one.
    pub etag: Option<String>,
}

/// Packs and uploads the layer (see the module doc).
pub fn push(req: PushRequest<'_>) -> Result<Pushed> {
    let RemoteUrl::S3 { .. } = &req.url else {
        bail!(
            "{}: push uploads to s3:// URLs only (a plain HTTP server takes no multipart \
             upload); copy the pushed object there to serve it over HTTP",
            req.url
        );
    };
    let who = req.layer.display().to_string();
    let held = open_layer(req.layer, 0)?;
    // Held while the layer is read: a commit into it or of it (which locks
    // it exclusively) waits or is refused until the upload is done.
    lock(held.overlay.storage(), false, &who)?;
    // Read again under the lock: a commit that ran while the lock was
    // waited for changed the header and the map read before it.
    let layer = open_layer(req.layer, 0)?;
    if (layer.meta.dev(), layer.meta.ino()) != (held.meta.dev(), held.meta.ino()) {
        bail!("{who} was replaced while it was opened");
    }
    let h = layer.overlay.header().clone();
    if let Some(why) = h.stopped_commit() {
        bail!("{who}: {why}");
    }
    if !h.frozen() {
        bail!(
            "{who} is a live overlay: only a layer (frozen, `ublk-cow snapshot`) is pushed, \
             as a live one changes under the upload"
        );
    }
    let geo = h.geometry;
    let map = BlockMap::new(MapMemory::heap(geo.blocks()), geo.blocks());
    layer.overlay.read_map(&map).with_context(|| who.clone())?;
    // The layer's identity, for a layer pushed over this one to match:
    // read through its local chain, as an overlay over it would take it.
    let own = match Chain::open(req.layer, Purpose::Reads).and_then(|c| c.identity()) {
        Ok(id) => Some(PackedLayerId {
            size: id.size,
            mtime_ns: id.mtime_ns,
            fingerprint: id.fingerprint,
        }),
        // Over a remote base nothing local is below it to read through.
        Err(_) if h.backing.kind == BackingKind::Remote => None,
        Err(e) => return Err(e).with_context(|| format!("{who}: reading it through its chain")),
    };

    // The backing: named, or the remote base the layer records.
    let recorded = h
        .backing
        .path
        .as_deref()
        .map_or("a backing it does not record".into(), |p| {
            p.display().to_string()
        });
    let backing = match (&req.backing, h.backing.kind, &h.backing.path) {
        (Some(u), _, _) => u.clone(),
        (None, BackingKind::Remote, Some(u)) => RemoteUrl::parse(&u.to_string_lossy())?,
        (None, kind, _) => bail!(
            "{who} is over {recorded} ({}): name the push of its backing with --backing URL",
            kind.name()
        ),
    };
    // Samples are 4 KiB: fetch no more than a block for each.
    let probe = Params {
        fetch_size: geo.block_size() as u64,
        ..req.params.clone()
    };
    let remote =
        RemoteBase::open_connected(backing.clone(), req.env.clone(), probe, geo.block_size())?;
    let fetcher = remote.connect()?;
    let id = remote.identity().clone();
    let dest = req.url.to_string();
    if fetcher.urls().contains(&dest.as_str()) {
        bail!("{dest} is read by --backing {backing}: push it to another key");
    }
    if id.size != h.base.size {
        bail!(
            "--backing {backing}: its virtual size is {} bytes; {who} was made over {} bytes",
            id.size,
            h.base.size
        );
    }
    let top = fetcher.top_layer().cloned();
    if let Some(t) = &top
        && t.block_size != geo.block_size()
    {
        bail!(
            "--backing {backing} has block size {}, {who} {}: a stack has one block size",
            t.block_size,
            geo.block_size()
        );
    }
    let not_it = |why: &str| {
        anyhow!("--backing {backing} is not what {who} was made over ({recorded}): {why}")
    };
    match (h.backing.kind, &top) {
        (BackingKind::Overlay, None) => {
            return Err(not_it(
                "a raw image where the layer was made over a layer; push that layer and name \
                 its push",
            ));
        }
        (BackingKind::Overlay, Some(t)) => {
            let want = (h.base.size, h.base.mtime_ns, h.base.fingerprint);
            match t.layer {
                Some(l) if (l.size, l.mtime_ns, l.fingerprint) == want => {}
                _ => {
                    return Err(not_it(
                        "the pushed layer is the push of another layer (or of this one \
                         modified since); push the layer below and name its push",
                    ));
                }
            }
        }
        (BackingKind::File | BackingKind::BlockDevice, Some(_)) => {
            return Err(not_it(
                "pushed layers where the layer was made over a raw image; name the image's copy",
            ));
        }
        (BackingKind::Remote, _) => {
            if BaseIdentity::remote(&backing.to_string(), &id).fingerprint != h.base.fingerprint {
                return Err(not_it(
                    "a remote base is known by its URL and version (ETag or Last-Modified), and \
                     one of them differs",
                ));
            }
        }
        (kind, _) => {
            // A raw image, as a local one is checked: size and samples
            // (more of a block device's).
            let mtime = if kind == BackingKind::BlockDevice {
                0
            } else {
                1
            };
            let sampled = Backed::Remote(Box::new(remote));
            let now = BaseIdentity::compute(&sampled, id.size, mtime)
                .with_context(|| format!("--backing {backing}: reading its samples"))?;
            if !now.fingerprint_matches(h.base.fingerprint) {
                return Err(not_it("its contents differ (sampled)"));
            }
        }
    }

    let extents = packed::extents_of(&map);
    let header = PackedHeader::new(
        geo.size(),
        geo.block_size(),
        &extents,
        PackedBacking {
            url: backing.to_string(),
            identity: id.clone(),
        },
        own,
    );
    let total = header.object_len();
    let count = |held: Held| -> u64 {
        extents
            .iter()
            .filter(|e| e.held == held)
            .map(|e| e.count as u64)
            .sum()
    };

    let (store, path) = store_for(&req.url, &req.env, &req.params)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the upload's threads")?;
    let url = req.url.to_string();
    rt.block_on(async {
        match store.head(&path).await {
            Ok(_) if !req.force => bail!(
                "{url} exists: push does not replace an object that devices may be reading \
                 (--force replaces it)"
            ),
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(anyhow!("{url}: {e}")),
        }
    })?;

    let progress = Progress::bytes(&format!("pushing {who}"), total);
    let file = layer.overlay.storage();
    let bs = geo.block_size() as u64;
    let put = rt.block_on(async {
        let upload = store
            .put_multipart(&path)
            .await
            .map_err(|e| anyhow!("{url}: starting the upload: {e}"))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut done = 0u64;
        let sent: Result<()> = async {
            let mut head = header.encode();
            head.resize(header.index_offset as usize, 0);
            head.extend_from_slice(&packed::encode_index(&extents));
            head.resize(header.data_offset as usize, 0);
            w.write(&head);
            done += head.len() as u64;
            let mut buf = Vec::new();
            for e in extents.iter().filter(|e| e.held == Held::Data) {
                let (mut at, end) = (e.start * bs, (e.start + e.count as u64) * bs);
                while at < end {
                    let n = READ_CHUNK.min(end - at);
                    buf.resize(n as usize, 0);
                    Storage::read_at(file, &mut buf, layer.overlay.data_pos(at))
                        .with_context(|| format!("{who}: reading its data at {at}"))?;
                    w.wait_for_capacity(PARTS_IN_FLIGHT)
                        .await
                        .map_err(|e| anyhow!("{url}: uploading: {e}"))?;
                    w.write(&buf);
                    done += n;
                    at += n;
                    progress.set(done);
                }
            }
            let pad = (total - done) as usize;
            w.write(&vec![0u8; pad]);
            Ok(())
        }
        .await;
        if let Err(e) = sent {
            let _ = w.abort().await;
            return Err(e);
        }
        w.finish()
            .await
            .map_err(|e| anyhow!("{url}: finishing the upload: {e}"))
    })?;
    progress.finish();
    Ok(Pushed {
        bytes: total,
        data_blocks: count(Held::Data),
        zero_blocks: count(Held::Zero),
        backing: backing.to_string(),
        etag: put.e_tag,
    })
}
