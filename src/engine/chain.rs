//! Chains of overlays: an overlay over frozen overlays (layers) over a raw
//! base, opened by following the backing each header records, and the
//! lookup that says which layer holds a block.
//!
//! Depth 0 is the overlay named (the top), depth 1 its backing, and so on;
//! the raw base (a file or block device) is below the deepest layer. Every
//! overlay below the top must be frozen, and each layer's recorded identity
//! of its backing must match what is there now (for a raw base its identity
//! from `engine::base`; for a layer, [`Chain::identity`]). A file met twice
//! (same device and inode) is a cycle. A chain holds at most [`MAX_LAYERS`]
//! overlays, the top included, and one block size throughout.
//!
//! # The lookup and its memory
//!
//! A read must not cost per layer. The top's block-state map (2 bits per
//! block, the only one that changes while the chain is in use) is looked at
//! first: one atomic load. Below it the layers are frozen, so their answer
//! never changes: at open it is folded into one immutable **index** of one
//! byte per block, the topmost frozen holder of the block: its depth (1 to
//! 63, in the low 6 bits) and its state (`Allocated`, `Zero` or `Copied`, in
//! the high 2 bits); 0 means no layer holds it and the base does. So a
//! lookup is at most two loads whatever the depth, and a write to the top
//! changes only the top's map: the index needs no update (nor lock).
//!
//! The index is built bottom-up, one layer's map in memory at a time, and
//! the frozen layers' maps are dropped once folded in: they are never
//! looked at again. Resident memory is then the top's map plus the index,
//! whatever the depth (up to 64). At 4 KiB blocks (2^28 blocks per TiB):
//! 64 MiB + 256 MiB = **320 MiB per TiB for 8 layers** (the same for 2 or
//! 64), where keeping every layer's map (2 bits per block per layer) would
//! take 512 MiB for 8 layers and still leave a walk through them on each
//! read. Both shrink with larger blocks (20 MiB per TiB at 64 KiB). One
//! byte per block is the smallest form that names one of 63 depths and a
//! state with one load; a list of extents would be smaller for a few large
//! runs, but costs a search per lookup and grows with fragmentation
//! without bound.
//!
//! `map` reports a copied block where it came from: it opens the chain
//! with an index that passes over `Copied` holders ([`Purpose::Origins`]).

use crate::engine::base::{Base, BaseIdentity, mtime_ns, open_base};
use crate::engine::device::{CowDevice, MapSource};
use crate::engine::geometry::{DEFAULT_BLOCK_SIZE, Geometry};
use crate::engine::map::{BlockMap, BlockState, MapMemory};
use crate::engine::overlay::{Backing, BackingKind, Header, OpenCheck, Overlay};
use crate::engine::storage::Storage;
use crate::engine::{Error, IoContext};
use crate::remote::RemoteBase;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The most overlays a chain holds, the top included: the index has 6 bits
/// for the depth of a frozen layer (1 to 63).
pub const MAX_LAYERS: usize = 64;
const DEPTH_MASK: u8 = 0x3f;

/// Which layer a block is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Holder {
    /// 0 is the top; the number of layers is the base.
    pub(crate) depth: usize,
    /// The holder's state: `Allocated`, `Copied` or `Zero`; `Unallocated`
    /// for the base.
    pub(crate) state: BlockState,
}

/// The topmost frozen holder of each block: see the module doc.
pub(crate) struct Index(Box<[u8]>);

impl Index {
    pub(crate) fn new(blocks: u64) -> Index {
        Index(vec![0u8; blocks as usize].into_boxed_slice())
    }

    /// Folds in the layer at `depth` (1 to 63), which lies above every
    /// layer folded in so far. With `skip_copied` its copied blocks are
    /// passed over, so the index names where copies came from.
    pub(crate) fn fold(&mut self, depth: usize, map: &BlockMap, skip_copied: bool) {
        assert!((1..MAX_LAYERS).contains(&depth), "depth {depth}");
        map.for_each_held(|b, state| {
            if !(skip_copied && state == BlockState::Copied) {
                self.0[b as usize] = depth as u8 | (state as u8) << 6;
            }
        });
    }

    /// The topmost frozen holder of `block`, or `None` (the base).
    pub(crate) fn get(&self, block: u64) -> Option<(usize, BlockState)> {
        let v = self.0[block as usize];
        (v != 0).then(|| {
            let state = match v >> 6 {
                1 => BlockState::Allocated,
                2 => BlockState::Zero,
                _ => BlockState::Copied,
            };
            ((v & DEPTH_MASK) as usize, state)
        })
    }
}

/// The answer for `block` from the top's map and the index below it, in a
/// chain of `layers` overlays.
pub(crate) fn lookup(
    top: &BlockMap,
    index: &Index,
    layers: usize,
    skip_copied: bool,
    block: u64,
) -> Holder {
    let state = top.get(block);
    if state != BlockState::Unallocated && !(skip_copied && state == BlockState::Copied) {
        return Holder { depth: 0, state };
    }
    match index.get(block) {
        Some((depth, state)) => Holder { depth, state },
        None => Holder {
            depth: layers,
            state: BlockState::Unallocated,
        },
    }
}

/// What a chain is opened for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Reads: a block is served by its topmost holder, a copy included.
    Reads,
    /// `map`: a copied block is reported where it came from.
    Origins,
}

/// One overlay of a chain, opened read-only.
pub(crate) struct Layer {
    pub(crate) path: PathBuf,
    pub(crate) overlay: Overlay<File>,
    pub(crate) meta: std::fs::Metadata,
}

/// The raw base below a chain.
pub(crate) struct RawBase {
    pub(crate) path: PathBuf,
    pub(crate) kind: BackingKind,
    pub(crate) base: Base,
}

/// An opened chain: see the module doc.
pub struct Chain {
    pub(crate) layers: Vec<Layer>,
    /// `None` when the deepest layer records no backing (format version 1):
    /// its base is whatever `add --base` names.
    pub(crate) base: Option<RawBase>,
    top: BlockMap,
    index: Index,
    purpose: Purpose,
    geo: Geometry,
}

/// How an error about the layer at `depth` names it.
fn name(path: &Path, depth: usize) -> String {
    if depth == 0 {
        format!("overlay {}", path.display())
    } else {
        format!("layer {} (depth {depth})", path.display())
    }
}

/// Prefixes an engine error with `who`, keeping its kind.
pub(crate) fn about(who: &str, e: Error) -> Error {
    match e {
        Error::Invalid(m) => Error::Invalid(format!("{who}: {m}")),
        Error::Mismatch(m) => Error::Mismatch(format!("{who}: {m}")),
        Error::Corrupt(m) => Error::Corrupt(format!("{who}: {m}")),
        Error::Io { context, source } => Error::Io {
            context: format!("{who}: {context}"),
            source,
        },
    }
}

/// Whether the file at `path` starts like an overlay.
pub(crate) fn looks_like_overlay(file: &File) -> io::Result<bool> {
    let mut magic = [0u8; 8];
    Storage::read_at(file, &mut magic, 0)?;
    Ok(&magic == b"UBLKCOW1")
}

/// Opens `path` read-only; an error names it as `who`.
fn open_named(path: &Path, who: &str) -> Result<File, Error> {
    File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Error::invalid(format!("{who} does not exist")),
        _ => Error::Io {
            context: who.to_string(),
            source: e,
        },
    })
}

/// Opens `path` as an overlay, read-only: its header and length checked.
pub(crate) fn open_layer(path: &Path, depth: usize) -> Result<Layer, Error> {
    let who = name(path, depth);
    let file = open_named(path, &who)?;
    let meta = file.metadata().ctx(|| who.clone())?;
    if !meta.file_type().is_file() && !meta.file_type().is_block_device() {
        return Err(Error::invalid(format!("{who} is not a regular file")));
    }
    if !looks_like_overlay(&file).ctx(|| who.clone())? {
        return Err(Error::invalid(format!(
            "{} is not a ublk-cow overlay",
            path.display()
        )));
    }
    let overlay = Overlay::open_unchecked(file).map_err(|e| about(&who, e))?;
    Ok(Layer {
        path: path.to_path_buf(),
        overlay,
        meta,
    })
}

/// Whether `a` is the file `b` is.
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Compares what `layer` recorded of its backing with `now`, the backing's
/// identity found; the error names the layer, the backing and what changed.
fn check_identity(layer: &Layer, depth: usize, now: &BaseIdentity) -> Result<(), Error> {
    let h = layer.overlay.header();
    let was = &h.base;
    let backing = h
        .backing
        .path
        .as_deref()
        .map_or("its backing".into(), |p| p.display().to_string());
    let changed = if was.size != now.size || now.size != h.geometry.size() {
        format!(
            "its size differs (recorded {} bytes, now {} bytes)",
            was.size, now.size
        )
    } else if !now.fingerprint_matches(was.fingerprint) {
        "its contents differ".into()
    } else if was.mtime_ns != now.mtime_ns {
        "its modification time differs".into()
    } else {
        return Ok(());
    };
    Err(Error::mismatch(format!(
        "{}: its backing {backing} changed since it was made: {changed}",
        name(&layer.path, depth)
    )))
}

impl Chain {
    /// Opens the chain whose top is the overlay at `path` (any overlay: a
    /// live one, or a layer).
    pub(crate) fn open(path: &Path, purpose: Purpose) -> Result<Chain, Error> {
        Self::open_with(path, purpose, false)
    }

    /// As [`Chain::open`], for the commit that writes into the layer at
    /// `path`: a top that a stopped commit was writing into is taken (that
    /// commit, run again, finishes it).
    pub(crate) fn open_receiving(path: &Path) -> Result<Chain, Error> {
        Self::open_with(path, Purpose::Reads, true)
    }

    fn open_with(path: &Path, purpose: Purpose, receiving_top: bool) -> Result<Chain, Error> {
        // Top-down: every file, for cycles and the depth limit.
        let mut layers: Vec<Layer> = Vec::new();
        let mut next = Some(path.to_path_buf());
        let mut raw: Option<(PathBuf, BackingKind)> = None;
        while let Some(p) = next.take() {
            let depth = layers.len();
            if depth == MAX_LAYERS {
                return Err(Error::invalid(format!(
                    "{}: the chain is deeper than {MAX_LAYERS} layers",
                    name(path, 0)
                )));
            }
            let layer = open_layer(&p, depth)?;
            if let Some((d, l)) = layers
                .iter()
                .enumerate()
                .find(|(_, l)| same_file(&l.meta, &layer.meta))
            {
                return Err(Error::invalid(format!(
                    "the chain has a cycle: {} is {} again",
                    name(&p, depth),
                    name(&l.path, d)
                )));
            }
            let h = layer.overlay.header();
            let taken = receiving_top && depth == 0 && !h.committing();
            if let Some(why) = h.stopped_commit().filter(|_| !taken) {
                return Err(Error::invalid(format!("{}: {why}", name(&p, depth))));
            }
            if depth > 0 && !h.frozen() {
                return Err(Error::invalid(format!(
                    "{} is not frozen: a live overlay cannot be below another",
                    name(&p, depth)
                )));
            }
            if let Some(up) = layers.last() {
                let (a, b) = (up.overlay.geometry(), h.geometry);
                if a.size() != b.size() {
                    return Err(Error::mismatch(format!(
                        "{} has a virtual size of {} bytes, the layer above it {}",
                        name(&p, depth),
                        b.size(),
                        a.size()
                    )));
                }
                if a.block_size() != b.block_size() {
                    return Err(Error::invalid(format!(
                        "{} has block size {}, the layer above it {}: a chain has one block size",
                        name(&p, depth),
                        b.block_size(),
                        a.block_size()
                    )));
                }
            }
            match (&h.backing.kind, &h.backing.path) {
                (BackingKind::Overlay, Some(b)) => next = Some(b.clone()),
                (BackingKind::File | BackingKind::BlockDevice, Some(b)) => {
                    raw = Some((b.clone(), h.backing.kind));
                }
                // The top's own base is remote (a device's overlay): nothing
                // local is below it to open or check.
                (BackingKind::Remote, Some(_)) if depth == 0 => {}
                (BackingKind::Remote, Some(url)) => {
                    return Err(Error::invalid(format!(
                        "{}: its base is remote ({}): a layer over a remote base is not served",
                        name(&p, depth),
                        url.display()
                    )));
                }
                _ => {}
            }
            layers.push(layer);
        }
        let n = layers.len();
        let base = match raw {
            None => None,
            Some((p, kind)) => {
                let who = name(&layers[n - 1].path, n - 1);
                let base = open_base(&p).map_err(|e| about(&who, e))?;
                let meta = base.file.metadata().ctx(|| who.clone())?;
                if let Some((d, l)) = layers
                    .iter()
                    .enumerate()
                    .find(|(_, l)| same_file(&l.meta, &meta))
                {
                    return Err(Error::invalid(format!(
                        "the chain has a cycle: {who} has {} below it as its base",
                        name(&l.path, d)
                    )));
                }
                let found = if base.is_block_device {
                    BackingKind::BlockDevice
                } else {
                    BackingKind::File
                };
                if found != kind {
                    return Err(Error::mismatch(format!(
                        "{who}: its backing {} was a {} and is now a {}",
                        p.display(),
                        kind.name(),
                        found.name()
                    )));
                }
                check_identity(&layers[n - 1], n - 1, &base.identity)?;
                Some(RawBase {
                    path: p,
                    kind,
                    base,
                })
            }
        };
        let geo = layers[0].overlay.geometry();
        let mut chain = Chain {
            top: BlockMap::new(MapMemory::heap(geo.blocks()), geo.blocks()),
            index: Index::new(geo.blocks()),
            layers,
            base,
            purpose,
            geo,
        };
        // Bottom-up: each layer's map folded into the index, after which
        // the index reads as the chain from that layer down, whose identity
        // the layer above recorded.
        let skip = purpose == Purpose::Origins;
        for depth in (1..n).rev() {
            let layer = &chain.layers[depth];
            let blocks = layer.overlay.geometry().blocks();
            let map = BlockMap::new(MapMemory::heap(blocks), blocks);
            layer
                .overlay
                .read_map(&map)
                .map_err(|e| about(&name(&layer.path, depth), e))?;
            chain.index.fold(depth, &map, skip);
            let below = chain.identity_from(depth)?;
            check_identity(&chain.layers[depth - 1], depth - 1, &below)?;
        }
        chain.layers[0]
            .overlay
            .read_map(&chain.top)
            .map_err(|e| about(&name(path, 0), e))?;
        Ok(chain)
    }

    /// The identity of the chain from `depth` down, as a backing: its
    /// virtual size, the layer file's modification time, and a fingerprint
    /// of its contents read through the index (which must hold the layers
    /// from `depth` down and none above).
    fn identity_from(&self, depth: usize) -> Result<BaseIdentity, Error> {
        let layer = &self.layers[depth];
        let size = layer.overlay.geometry().size();
        let reader = FromDepth { chain: self, depth };
        BaseIdentity::compute(&reader, size, mtime_ns(&layer.meta).max(1))
    }

    /// What an overlay made over this chain records as its backing's
    /// identity: as [`Chain::identity_from`] the top, read through the
    /// whole chain.
    pub(crate) fn identity(&self) -> Result<BaseIdentity, Error> {
        let layer = &self.layers[0];
        let size = self.geo.size();
        BaseIdentity::compute(self, size, mtime_ns(&layer.meta).max(1))
    }

    pub(crate) fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Which layer `block` is read from (see [`Purpose`]).
    pub(crate) fn lookup(&self, block: u64) -> Holder {
        lookup(
            &self.top,
            &self.index,
            self.layers.len(),
            self.purpose == Purpose::Origins,
            block,
        )
    }

    /// Reads `buf` at `off` through the chain, with `holder` answering
    /// for each block.
    fn read_with(
        &self,
        buf: &mut [u8],
        off: u64,
        holder: impl Fn(u64) -> Holder,
    ) -> io::Result<()> {
        let size = self.geo.size();
        let end = off + buf.len() as u64;
        // Bytes past the end read as zeros.
        let inside = end.min(size).max(off);
        buf[(inside - off) as usize..].fill(0);
        for (h, at, to) in self.geo.pieces(off, inside, holder) {
            let dst = &mut buf[(at - off) as usize..(to - off) as usize];
            if h.depth == self.layers.len() {
                match &self.base {
                    Some(b) => b.base.file.read_at(dst, at)?,
                    None => {
                        return Err(io::Error::other(
                            "the chain's base is not recorded (format version 1)",
                        ));
                    }
                }
            } else if h.state == BlockState::Zero {
                dst.fill(0);
            } else {
                let o = &self.layers[h.depth].overlay;
                o.storage().read_at(dst, o.data_pos(at))?;
            }
        }
        Ok(())
    }
}

/// The chain from one depth down, for reading while it is opened.
struct FromDepth<'a> {
    chain: &'a Chain,
    depth: usize,
}

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

/// The write side of a `Storage` that is only read (a chain, the chain
/// from a depth down, what is below an overlay): every write fails with
/// EROFS, and there is nothing to sync.
macro_rules! read_only_writes {
    () => {
        fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
            Err(read_only())
        }
        fn punch(&self, _: u64, _: u64) -> io::Result<()> {
            Err(read_only())
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
        fn sync_all(&self) -> io::Result<()> {
            Ok(())
        }
        fn set_len(&self, _: u64) -> io::Result<()> {
            Err(read_only())
        }
        fn allocate(&self, _: u64, _: u64) -> io::Result<()> {
            Err(read_only())
        }
    };
}

impl Storage for FromDepth<'_> {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let c = self.chain;
        c.read_with(buf, off, |b| match c.index.get(b) {
            Some((depth, state)) => Holder { depth, state },
            None => Holder {
                depth: c.layers.len(),
                state: BlockState::Unallocated,
            },
        })
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.chain.layers[self.depth].overlay.geometry().size())
    }
    read_only_writes!();
}

/// A chain is read-only storage: the virtual disk it reads as. Opened for
/// [`Purpose::Reads`], it is the backing of a device over its top.
impl Storage for Chain {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.read_with(buf, off, |b| self.lookup(b))
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.geo.size())
    }
    read_only_writes!();
}

/// What is below an overlay: a raw base, a chain of layers, or a raw
/// image in an object store (`add --base URL`).
pub enum Backed {
    Raw(File),
    Chain(Box<Chain>),
    Remote(Box<RemoteBase>),
}

/// Where a block below a device's overlay is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Below {
    /// The raw base, at the block's own offset.
    Base,
    /// The layer at this depth of the chain below (0 is the layer the
    /// overlay was made over), at its `data_pos` of the block's offset.
    Layer(usize),
    /// A layer holds the block as zeros.
    Zero,
}

impl Backed {
    /// Where `block` is read from: for a raw backing always the base; for
    /// a chain its topmost holder, two loads whatever the depth.
    #[inline]
    pub(crate) fn below(&self, block: u64) -> Below {
        match self {
            Backed::Raw(_) | Backed::Remote(_) => Below::Base,
            Backed::Chain(c) => {
                let h = c.lookup(block);
                if h.depth == c.layers.len() {
                    Below::Base
                } else if h.state == BlockState::Zero {
                    Below::Zero
                } else {
                    Below::Layer(h.depth)
                }
            }
        }
    }

    /// The raw base at the bottom; `None` for a chain whose deepest layer
    /// records no backing (format version 1), which no device serves. For
    /// a remote base, a file that refuses every read
    /// (`RemoteBase::refuser`): its data comes only through the fetcher.
    pub(crate) fn raw(&self) -> Option<&File> {
        match self {
            Backed::Raw(f) => Some(f),
            Backed::Chain(c) => c.base.as_ref().map(|b| &b.base.file),
            Backed::Remote(r) => Some(r.refuser()),
        }
    }

    /// The remote base, if the base is one.
    pub fn remote(&self) -> Option<&RemoteBase> {
        match self {
            Backed::Remote(r) => Some(r),
            _ => None,
        }
    }

    /// The raw base's path, for a chain (a raw backing is the path the
    /// caller named).
    pub(crate) fn raw_path(&self) -> Option<&Path> {
        match self {
            Backed::Raw(_) | Backed::Remote(_) => None,
            Backed::Chain(c) => c.base.as_ref().map(|b| b.path.as_path()),
        }
    }

    /// The layers below, from the one the overlay was made over down;
    /// none for a raw backing.
    pub(crate) fn layers(&self) -> &[Layer] {
        match self {
            Backed::Raw(_) | Backed::Remote(_) => &[],
            Backed::Chain(c) => &c.layers,
        }
    }
}

impl Storage for Backed {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        match self {
            Backed::Raw(f) => Storage::read_at(f, buf, off),
            Backed::Chain(c) => c.read_at(buf, off),
            Backed::Remote(r) => r.read_at(buf, off),
        }
    }
    fn len(&self) -> io::Result<u64> {
        match self {
            Backed::Raw(f) => Storage::len(f),
            Backed::Chain(c) => c.len(),
            Backed::Remote(r) => Ok(r.identity().size),
        }
    }
    read_only_writes!();
    /// A chain's blocks lie in several files, a remote base has no page
    /// cache: hints go to a raw base only.
    fn will_need(&self, off: u64, len: u64) -> io::Result<()> {
        match self {
            Backed::Raw(f) => f.will_need(off, len),
            Backed::Chain(_) | Backed::Remote(_) => Ok(()),
        }
    }
    fn dont_need(&self, off: u64, len: u64) -> io::Result<()> {
        match self {
            Backed::Raw(f) => f.dont_need(off, len),
            Backed::Chain(_) | Backed::Remote(_) => Ok(()),
        }
    }
    /// Only a raw base copies inside the kernel; a chain is read through.
    fn as_file(&self) -> Option<&File> {
        match self {
            Backed::Raw(f) => Some(f),
            Backed::Chain(_) | Backed::Remote(_) => None,
        }
    }
}

/// A backing opened for an overlay over it (see [`open_lower`]).
pub struct Lower {
    pub backed: Backed,
    /// What an overlay over it records of it, and checks.
    pub identity: BaseIdentity,
    /// How an overlay's header records it.
    pub backing: Backing,
    /// A layer's block size, which an overlay over it must keep.
    pub block_size: Option<u32>,
    /// The raw base is a block device.
    pub is_block_device: bool,
}

impl Lower {
    /// A remote base (`add --base URL`), opened: recorded by its URL,
    /// identified by its size and version.
    pub fn remote(base: RemoteBase) -> Result<Lower, Error> {
        let url = base.url().to_string();
        let identity = BaseIdentity::remote(&url, base.identity());
        Ok(Lower {
            backing: Backing::remote(&url)?,
            backed: Backed::Remote(Box::new(base)),
            identity,
            block_size: None,
            is_block_device: false,
        })
    }

    /// The virtual size.
    pub fn size(&self) -> u64 {
        self.identity.size
    }
}

/// Opens the backing at `path` (a raw image, a block device or a frozen
/// overlay) for an overlay over it: what to read, its identity, and how
/// the header records it. A live overlay is refused: only a frozen one (a
/// layer) may be below another.
pub fn open_lower(path: &Path) -> Result<Lower, Error> {
    // A file that cannot be opened gets `open_base`'s error.
    let layer = File::open(path).is_ok_and(|probe| {
        probe.metadata().is_ok_and(|m| m.is_file()) && looks_like_overlay(&probe).unwrap_or(false)
    });
    if layer {
        let chain = Chain::open(path, Purpose::Reads)?;
        let top = chain.layers[0].overlay.header();
        if let (BackingKind::Remote, Some(url)) = (top.backing.kind, &top.backing.path) {
            return Err(Error::invalid(format!(
                "{} is over a remote base ({}): a layer over a remote base is not served; \
                 add --base {} --overlay {} serves it as the overlay it is",
                path.display(),
                url.display(),
                url.display(),
                path.display()
            )));
        }
        if !chain.layers[0].overlay.header().frozen() {
            return Err(Error::invalid(format!(
                "{} is a live overlay: only a frozen one (a layer) can be below another",
                path.display()
            )));
        }
        if chain.layers.len() >= MAX_LAYERS {
            return Err(Error::invalid(format!(
                "backing {} is a chain of {MAX_LAYERS} layers: no more fit above it",
                path.display()
            )));
        }
        let identity = chain.identity()?;
        let block_size = Some(chain.geometry().block_size());
        let backing = Backing::new(BackingKind::Overlay, path)?;
        let is_block_device = chain.base.as_ref().is_some_and(|b| b.base.is_block_device);
        Ok(Lower {
            backed: Backed::Chain(Box::new(chain)),
            identity,
            backing,
            block_size,
            is_block_device,
        })
    } else {
        let base = open_base(path)?;
        let backing = base.backing(path)?;
        Ok(Lower {
            backed: Backed::Raw(base.file),
            identity: base.identity,
            backing,
            block_size: None,
            is_block_device: base.is_block_device,
        })
    }
}

/// Creates a new, empty overlay at `path` over `backing` (a raw image, a
/// block device or a frozen overlay), recording it. A layer's block size is
/// kept; otherwise `block_size` or the default. `path` must not exist.
pub fn create_overlay(path: &Path, backing: &Path, block_size: Option<u32>) -> Result<(), Error> {
    create_over(path, &open_lower(backing)?, backing, block_size)
}

/// [`create_overlay`] over `lower`, opened from `backing` already.
fn create_over(
    path: &Path,
    lower: &Lower,
    backing: &Path,
    block_size: Option<u32>,
) -> Result<(), Error> {
    let (id, recorded, layer_bs) = (&lower.identity, lower.backing.clone(), lower.block_size);
    let bs = match (layer_bs, block_size) {
        (Some(l), Some(b)) if l != b => {
            return Err(Error::invalid(format!(
                "backing {} has block size {l}: a chain has one block size",
                backing.display()
            )));
        }
        (Some(l), _) => l,
        (None, b) => b.unwrap_or(DEFAULT_BLOCK_SIZE),
    };
    let geo = Geometry::new(id.size, bs)?;
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .ctx(|| format!("creating overlay {}", path.display()))?;
    // Whole and durable once made, its name too, and never used: clean.
    let made = Overlay::create_backed(file, geo, id, recorded)
        .and_then(|mut o| o.set_clean(true))
        .and_then(|_| {
            crate::engine::storage::sync_name(path)
                .ctx(|| format!("syncing the directory of {}", path.display()))
        });
    match made {
        Ok(_) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

/// Takes the lock on an overlay that a device takes (`exclusive`), or
/// that a layer below one holds (shared), so that one in use is refused.
/// Waits up to a second: a process that forks (to run a program) while it
/// holds the lock holds it in the child too, until that child runs the
/// program, and a ring's files are let go of a little after it is closed.
pub(crate) fn lock(file: &File, exclusive: bool, who: &str) -> Result<(), Error> {
    for _ in 0..100 {
        if crate::sys::try_flock(file, exclusive).ctx(|| format!("locking {who}"))? {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(Error::invalid(format!("{who} is in use (locked)")))
}

/// Opens the overlay at `path` for writing under the exclusive lock a
/// device takes (`lock`); errors name it as `who`.
fn open_locked(path: &Path, who: &str) -> Result<File, Error> {
    let file = File::options()
        .read(true)
        .write(true)
        .open(path)
        .ctx(|| who.to_string())?;
    lock(&file, true, who)?;
    Ok(file)
}

/// Marks the overlay at `path`, which no device uses, failed (durably):
/// a flush of its last device failed, and that device's daemon may have
/// died before it could mark it (the disk still failing then).
pub fn mark_failed(path: &Path) -> Result<(), Error> {
    let who = name(path, 0);
    let file = open_locked(path, &who)?;
    let overlay = Overlay::open_unchecked(file).map_err(|e| about(&who, e))?;
    // Written even if the header reads as failed: that may be the page
    // cache's copy of a mark whose writeback failed.
    overlay.mark_failed().map_err(|e| about(&who, e))
}

/// Freezes the clean overlay at `path`: it becomes a layer, read-only for
/// good, that new overlays can be made over.
pub fn freeze(path: &Path) -> Result<(), Error> {
    let who = name(path, 0);
    let file = open_locked(path, &who)?;
    let mut overlay = Overlay::open_unchecked(file).map_err(|e| about(&who, e))?;
    overlay.freeze().map_err(|e| about(&who, e))
}

/// Snapshot of an overlay no device uses: freezes the overlay at `path`
/// (it becomes a layer; already one, it stays so) and creates `new`, an
/// empty overlay over it that takes the writes from then on. `new` must not
/// exist; it is checked, with the overlay, before anything is written.
/// Freezes the overlay at `path` into a layer and makes nothing over it
/// (`snapshot FILE` without `--overlay`, e.g. before `push`): its chain
/// must open, each recorded identity checked. A layer stays one.
pub fn freeze_only(path: &Path) -> Result<(), Error> {
    Chain::open(path, Purpose::Reads)?;
    if !is_frozen(path)? {
        freeze(path)?;
    }
    Ok(())
}

pub fn snapshot(path: &Path, new: &Path) -> Result<(), Error> {
    check_new_overlay(new)?;
    check_can_stack(path, MAX_LAYERS - 1)?;
    if !is_frozen(path)? {
        freeze(path)?;
    }
    create_overlay(new, path, None)
}

/// The second half of a live snapshot, once the device whose overlay is at
/// `frozen` froze it in place (`CowDevice::freeze`): makes `new`, an empty
/// overlay over it, and opens the device that takes the writes from then
/// on, `new` under the exclusive lock a device holds, with `map` (empty) as
/// its map. `new` is checked (`check_new_overlay`) by the caller first.
pub fn open_over_frozen(
    frozen: &Path,
    new: &Path,
    map: MapMemory,
) -> Result<CowDevice<Backed, File>, Error> {
    let lower = open_lower(frozen)?;
    create_over(new, &lower, frozen, None)?;
    let who = name(new, 0);
    let opened = (|| {
        let file = open_locked(new, &who)?;
        let id = lower.identity;
        let check = OpenCheck {
            base: &id,
            block_size: None,
            force: false,
        };
        CowDevice::open(lower.backed, file, check, MapSource::Load(map))
    })();
    opened.map_err(|e| about(&who, e))
}

/// Refuses to freeze the overlay at `path` into a layer for a new overlay
/// over it unless that can then be made: its chain opens (each recorded
/// identity checked), it has at most `max_layers` overlays (the new one's
/// layers below), and its path fits the new overlay's header.
pub fn check_can_stack(path: &Path, max_layers: usize) -> Result<(), Error> {
    let chain = Chain::open(path, Purpose::Reads)?;
    let deepest = chain.layers[chain.layers.len() - 1].overlay.header();
    if let (BackingKind::Remote, Some(url)) = (deepest.backing.kind, &deepest.backing.path) {
        return Err(Error::invalid(format!(
            "{} is over a remote base ({}): an overlay over it would not be served (a layer \
             over a remote base is not served yet); `ublk-cow snapshot {}` without --overlay \
             freezes it, for `ublk-cow push`",
            path.display(),
            url.display(),
            path.display()
        )));
    }
    if chain.layers.len() > max_layers {
        return Err(Error::invalid(format!(
            "{} is a chain of {} overlays: an overlay over it would have more than {max_layers} layers below it",
            path.display(),
            chain.layers.len()
        )));
    }
    Backing::new(BackingKind::Overlay, path)?;
    Ok(())
}

/// Refuses `new` as the new overlay of a snapshot unless it is a path
/// where a file can be made: nothing there, its directory there.
pub fn check_new_overlay(new: &Path) -> Result<(), Error> {
    if std::fs::symlink_metadata(new).is_ok() {
        return Err(Error::invalid(format!(
            "{} exists: a snapshot's new overlay is a new file",
            new.display()
        )));
    }
    match new.parent() {
        Some(d) if d.as_os_str().is_empty() || d.is_dir() => {}
        _ => {
            return Err(Error::invalid(format!(
                "{}: its directory does not exist",
                new.display()
            )));
        }
    }
    Ok(())
}

/// Whether the overlay at `path` is frozen (a layer).
pub fn is_frozen(path: &Path) -> Result<bool, Error> {
    let layer = open_layer(path, 0)?;
    Ok(layer.overlay.header().frozen())
}

/// Removes the overlay at `path` if nothing can be lost with it: one that
/// no process holds locked (a device holds its overlay so), that was
/// closed clean (a device whose daemon died keeps its writes in its live
/// map, not in the overlay's) or was made over `made_over` (the undone
/// step's own, opened once and never written), and whose map holds no
/// written or zeroed block (copies hold what is below). True when it is
/// removed or was not there; false when it is left: not an overlay, in
/// use, not clean, or holding blocks. For a file made by a step that may
/// have to be undone, whose path another command may have taken meanwhile.
pub(crate) fn remove_unused_empty(path: &Path, made_over: &Path) -> Result<bool, Error> {
    let who = name(path, 0);
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e).ctx(|| who.clone()),
    };
    if !file.metadata().ctx(|| who.clone())?.is_file()
        || !looks_like_overlay(&file).ctx(|| who.clone())?
        || !crate::sys::try_flock(&file, true).ctx(|| format!("locking {who}"))?
    {
        return Ok(false);
    }
    let over_it = |o: &Overlay<File>| {
        let b = &o.header().backing;
        b.kind == BackingKind::Overlay
            && b.path.as_deref().is_some_and(|p| {
                match (std::fs::metadata(p), std::fs::metadata(made_over)) {
                    (Ok(a), Ok(m)) => same_file(&a, &m),
                    _ => false,
                }
            })
    };
    let overlay = match Overlay::open_unchecked(file) {
        Ok(o) if o.header().clean() || over_it(&o) => o,
        _ => return Ok(false),
    };
    let blocks = overlay.geometry().blocks();
    let map = BlockMap::new(MapMemory::heap(blocks), blocks);
    if overlay.read_map(&map).is_err() {
        return Ok(false);
    }
    let c = map.counts();
    if c.allocated > c.copied || c.zero > 0 {
        return Ok(false);
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).ctx(|| format!("removing {who}")),
    }
}

/// Opens the live overlay at `path` for reading and writing with the
/// synchronous executor, over the backing its header records (checked):
/// the engine's device on the host, with no ublk.
pub fn open_device(path: &Path) -> Result<CowDevice<Backed, File>, Error> {
    let who = name(path, 0);
    let file = open_locked(path, &who)?;
    let probe = Overlay::open_unchecked(file.try_clone().ctx(|| who.clone())?)
        .map_err(|e| about(&who, e))?;
    let h: Header = probe.header().clone();
    let Some(backing) = h.backing.path.as_deref() else {
        return Err(Error::invalid(format!(
            "{who} records no backing: it is used with `add --base`"
        )));
    };
    let lower = open_lower(backing).map_err(|e| about(&who, e))?;
    let (below, id) = (lower.backed, lower.identity);
    let check = OpenCheck {
        base: &id,
        block_size: None,
        force: false,
    };
    let blocks = h.geometry.blocks();
    CowDevice::open(below, file, check, MapSource::Load(MapMemory::heap(blocks)))
        .map_err(|e| about(&who, e))
}

/// One entry of `info`: an overlay, or the raw base at the bottom of a
/// chain (`--backing-chain`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Info {
    pub(crate) filename: String,
    /// `overlay` or `raw`.
    pub(crate) format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) format_version: Option<u32>,
    pub(crate) virtual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) block_size: Option<u32>,
    /// For the raw base: `file` or `block-device`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) backing: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) backing_kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) blocks_written: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) blocks_copied: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) blocks_zero: Option<u64>,
    /// Bytes the file takes on disk.
    pub(crate) allocated_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) clean: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) failed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) frozen: Option<bool>,
    /// The device number whose state file names the overlay, if any (set
    /// by the command line, which knows the daemon's state files).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) in_use_by: Option<u32>,
}

fn overlay_info(layer: &Layer, map: &BlockMap) -> Info {
    let h = layer.overlay.header();
    let c = map.counts();
    Info {
        filename: layer.path.display().to_string(),
        format: "overlay",
        format_version: Some(h.version),
        virtual_size: h.geometry.size(),
        block_size: Some(h.geometry.block_size()),
        kind: None,
        backing: h.backing.path.as_ref().map(|p| p.display().to_string()),
        backing_kind: Some(h.backing.kind.name()),
        blocks_written: Some(c.allocated - c.copied),
        blocks_copied: Some(c.copied),
        blocks_zero: Some(c.zero),
        allocated_bytes: layer.meta.blocks() * 512,
        clean: Some(h.clean()),
        failed: Some(h.failed()),
        frozen: Some(h.frozen()),
        in_use_by: None,
    }
}

/// `info`: the overlay at `path`; with `chain`, every layer below it and
/// the raw base too (the chain opened and checked).
pub(crate) fn info(path: &Path, chain: bool) -> Result<Vec<Info>, Error> {
    let load = |layer: &Layer, depth: usize| -> Result<BlockMap, Error> {
        let blocks = layer.overlay.geometry().blocks();
        let map = BlockMap::new(MapMemory::heap(blocks), blocks);
        layer
            .overlay
            .read_map(&map)
            .map_err(|e| about(&name(&layer.path, depth), e))?;
        Ok(map)
    };
    if !chain {
        let layer = open_layer(path, 0)?;
        let map = load(&layer, 0)?;
        return Ok(vec![overlay_info(&layer, &map)]);
    }
    let c = Chain::open(path, Purpose::Reads)?;
    let mut out = Vec::new();
    for (depth, layer) in c.layers.iter().enumerate() {
        out.push(overlay_info(layer, &load(layer, depth)?));
    }
    if let Some(b) = &c.base {
        out.push(Info {
            filename: b.path.display().to_string(),
            format: "raw",
            format_version: None,
            virtual_size: b.base.size,
            block_size: None,
            kind: Some(b.kind.name()),
            backing: None,
            backing_kind: None,
            blocks_written: None,
            blocks_copied: None,
            blocks_zero: None,
            allocated_bytes: b.base.file.metadata().map_or(0, |m| m.blocks() * 512),
            clean: None,
            failed: None,
            frozen: None,
            in_use_by: None,
        });
    }
    Ok(out)
}

/// `check`: the problems found in the overlay at `path`, one line each
/// (none: it is sound). An error when it is no overlay at all or cannot
/// be read. Reads only.
pub(crate) fn check(path: &Path) -> Result<Vec<String>, Error> {
    use crate::engine::overlay::HEADER_SIZE;
    let who = name(path, 0);
    let file = open_named(path, &who)?;
    let meta = file.metadata().ctx(|| who.clone())?;
    if !meta.is_file() {
        return Err(Error::invalid(format!("{who} is not a regular file")));
    }
    let len = meta.len();
    if len < 8 || !looks_like_overlay(&file).ctx(|| who.clone())? {
        return Err(Error::invalid(format!(
            "{} is not a ublk-cow overlay",
            path.display()
        )));
    }
    let mut problems = Vec::new();
    if len < HEADER_SIZE {
        problems.push(format!(
            "header: the file is truncated ({len} bytes, less than its header)"
        ));
        return Ok(problems);
    }
    let mut raw = vec![0u8; HEADER_SIZE as usize];
    Storage::read_at(&file, &mut raw, 0).ctx(|| who.clone())?;
    let h = match Header::decode(&raw) {
        Ok(h) => h,
        Err(e) => {
            problems.push(format!("header: {e}"));
            return Ok(problems);
        }
    };
    if let Some(why) = h.stopped_commit() {
        problems.push(why.into());
    }
    if h.failed() {
        problems.push(
            "a flush of its last device failed: data written after its last good flush \
             may be lost"
                .into(),
        );
    }
    let map_end = h.map_offset + h.map_bytes;
    if len < map_end {
        problems.push(format!(
            "map: the file is truncated ({len} bytes, its map ends at {map_end})"
        ));
        return Ok(problems);
    }
    let mut bytes = vec![0u8; h.map_bytes as usize];
    Storage::read_at(&file, &mut bytes, h.map_offset).ctx(|| who.clone())?;
    let blocks = h.geometry.blocks();
    if let Some(at) = crate::engine::map::trailing_bits(&bytes, blocks) {
        problems.push(format!(
            "map: bits are set past its last block (map byte {at})"
        ));
    }
    let map = BlockMap::new(MapMemory::heap(blocks), blocks);
    let _ = map.load(&bytes);
    if h.version == 1 {
        let copied = map.counts().copied;
        if copied > 0 {
            problems.push(format!(
                "map: {copied} blocks have a state format version 1 does not have"
            ));
        }
    }
    if len < h.end() {
        let mut past = 0u64;
        map.for_each_held(|b, s| {
            if s.in_overlay() && h.data_offset + h.geometry.block_end(b) > len {
                past += 1;
            }
        });
        problems.push(format!(
            "data area: the file is truncated ({len} bytes, its data area ends at {}); \
             {past} of the blocks its map holds lie past the end",
            h.end()
        ));
    }
    if problems.is_empty() && h.backing.kind != BackingKind::Unrecorded {
        // The whole chain below: frozen layers, their headers and maps,
        // cycles, and every recorded identity.
        if let Err(e) = Chain::open(path, Purpose::Reads) {
            problems.push(format!("backing: {e}"));
        }
    }
    Ok(problems)
}

/// One extent of `map`, in the fields of `qemu-img map --output=json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Extent {
    pub(crate) start: u64,
    pub(crate) length: u64,
    /// 0 is the overlay named, 1 its backing, and so on.
    pub(crate) depth: usize,
    pub(crate) present: bool,
    pub(crate) zero: bool,
    pub(crate) data: bool,
    /// Where the data lies in that depth's file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) offset: Option<u64>,
}

/// `map`: the virtual disk of the overlay at `path` as extents, each at
/// the depth that holds its blocks (a copy where it came from), adjacent
/// equal answers merged; and the file at each depth. `live_top`, when
/// given, is the top's map to use instead of the one in its file (a
/// running device's live map, in the map's on-disk form).
pub(crate) fn map(
    path: &Path,
    live_top: Option<&[u8]>,
) -> Result<(Vec<Extent>, Vec<String>), Error> {
    let c = Chain::open(path, Purpose::Origins)?;
    if let Some(bytes) = live_top {
        let want = crate::engine::map::map_bytes(c.geo.blocks());
        if bytes.len() as u64 != want {
            return Err(Error::corrupt(format!(
                "the live map of {} has {} bytes, not {want}",
                name(path, 0),
                bytes.len()
            )));
        }
        c.top
            .load(bytes)
            .map_err(|e| about(&format!("the live map of {}", name(path, 0)), e))?;
    }
    let n = c.layers.len();
    let mut files: Vec<String> = c
        .layers
        .iter()
        .map(|l| l.path.display().to_string())
        .collect();
    files.push(match &c.base {
        Some(b) => b.path.display().to_string(),
        None => "(the base given to add --base)".into(),
    });
    let geo = c.geometry();
    let mut out: Vec<Extent> = Vec::new();
    for b in 0..geo.blocks() {
        let start = geo.block_start(b);
        let length = geo.block_end(b) - start;
        let h = c.lookup(b);
        let e = if h.depth == n {
            Extent {
                start,
                length,
                depth: n,
                present: true,
                zero: false,
                data: true,
                offset: Some(start),
            }
        } else if h.state == BlockState::Zero {
            Extent {
                start,
                length,
                depth: h.depth,
                present: true,
                zero: true,
                data: false,
                offset: None,
            }
        } else {
            Extent {
                start,
                length,
                depth: h.depth,
                present: true,
                zero: false,
                data: true,
                offset: Some(c.layers[h.depth].overlay.data_pos(start)),
            }
        };
        match out.last_mut() {
            Some(last)
                if (last.depth, last.present, last.zero, last.data)
                    == (e.depth, e.present, e.zero, e.data)
                    && last.offset.map(|o| o + last.length) == e.offset =>
            {
                last.length += e.length;
            }
            _ => out.push(e),
        }
    }
    Ok((out, files))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An overlay of a device over a remote base: `check` and `info` find
    /// nothing wrong with it (nothing local is below it), and it is no
    /// layer for another overlay.
    #[test]
    fn an_overlay_over_a_remote_base_checks_clean_and_is_no_layer() {
        let dir =
            std::env::temp_dir().join(format!("ublk-cow-chain-remote-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("top.cow");
        let id = BaseIdentity {
            size: 1 << 20,
            mtime_ns: 0,
            fingerprint: 7,
            legacy_fingerprint: None,
        };
        let url = "s3://images/golden.img";
        let geo = Geometry::new(1 << 20, 4096).unwrap();
        let file = File::create_new(&path).unwrap();
        Overlay::create_backed(file, geo, &id, Backing::remote(url).unwrap()).unwrap();
        assert_eq!(check(&path).unwrap(), Vec::<String>::new());
        let infos = info(&path, true).unwrap();
        assert_eq!(infos.len(), 1);
        let e = open_lower(&path).err().expect("no layer").to_string();
        assert!(
            e.contains("over a remote base (s3://images/golden.img)"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Only an overlay that no one uses and that holds no block is
    /// removed; anything else is left as it is.
    #[test]
    fn only_an_unused_empty_overlay_is_removed() {
        let dir = std::env::temp_dir().join(format!("ublk-cow-chain-rm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.img");
        std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
        let over = |n: &str| {
            let p = dir.join(n);
            create_overlay(&p, &base, Some(4096)).unwrap();
            p
        };
        let (empty, copied, written, zeroed, used, unclean) = (
            over("empty"),
            over("copied"),
            over("written"),
            over("zeroed"),
            over("used"),
            over("unclean"),
        );
        // As a device whose daemon died leaves it: its writes are in the
        // live map only.
        let unclean_now = |p: &Path| {
            let f = File::options().read(true).write(true).open(p).unwrap();
            Overlay::open_unchecked(f)
                .unwrap()
                .set_clean(false)
                .unwrap();
        };
        unclean_now(&unclean);
        // The same over a layer: as the step that made it over the layer
        // leaves it (opened once, never written).
        let layer = over("layer");
        freeze(&layer).unwrap();
        let (ours, theirs) = (dir.join("ours"), dir.join("theirs"));
        for p in [&ours, &theirs] {
            create_overlay(p, &layer, None).unwrap();
            unclean_now(p);
        }
        let dev = open_device(&copied).unwrap();
        dev.cache(0, 8192, crate::engine::cache::CacheMode::Cow)
            .unwrap();
        dev.close().unwrap();
        let dev = open_device(&written).unwrap();
        dev.write(4096, &[1u8; 512]).unwrap();
        dev.close().unwrap();
        let dev = open_device(&zeroed).unwrap();
        dev.write_zeroes(0, 4096).unwrap();
        dev.close().unwrap();
        let held = open_device(&used).unwrap();
        let other = dir.join("other");
        std::fs::write(&other, b"not an overlay").unwrap();

        let gone = |p: &Path, over: &Path| remove_unused_empty(p, over).unwrap();
        assert!(gone(&empty, &layer));
        assert!(gone(&copied, &layer));
        assert!(gone(&dir.join("missing"), &layer));
        assert!(gone(&ours, &layer));
        for kept in [&written, &zeroed, &used, &unclean, &other] {
            assert!(!gone(kept, &layer), "{}", kept.display());
            assert!(kept.exists(), "{} removed", kept.display());
        }
        assert!(!gone(&theirs, &base), "an unclean overlay over another");
        assert!(theirs.exists());
        assert!(!empty.exists() && !copied.exists() && !ours.exists());
        held.close().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn state(v: u8) -> BlockState {
        [
            BlockState::Unallocated,
            BlockState::Allocated,
            BlockState::Zero,
            BlockState::Copied,
        ][v as usize % 4]
    }

    /// The answer walked layer by layer, top first.
    fn naive(maps: &[BlockMap], skip_copied: bool, block: u64) -> Holder {
        for (depth, m) in maps.iter().enumerate() {
            let s = m.get(block);
            if s != BlockState::Unallocated && !(skip_copied && s == BlockState::Copied) {
                return Holder { depth, state: s };
            }
        }
        Holder {
            depth: maps.len(),
            state: BlockState::Unallocated,
        }
    }

    fn maps(stack: &[Vec<u8>], blocks: u64) -> Vec<BlockMap> {
        let locks = crate::engine::locks::BlockLocks::default();
        stack
            .iter()
            .map(|states| {
                let m = BlockMap::new(MapMemory::heap(blocks), blocks);
                let g = locks.try_lock(0, blocks).unwrap();
                for (b, v) in states.iter().enumerate() {
                    m.set_range(&g, b as u64..b as u64 + 1, state(*v));
                }
                m
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Random stacks: the index answers as the walk through every
        /// layer, before and after writes to the top.
        #[test]
        fn the_index_answers_as_a_walk_through_every_layer(
            layers in 1usize..=MAX_LAYERS,
            blocks in 1u64..300,
            density in 0u8..=100,
            seed in any::<u64>(),
            skip_copied in any::<bool>(),
            writes in proptest::collection::vec((any::<u16>(), 0u8..4), 0..40),
        ) {
            let mut rng = seed;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let stack: Vec<Vec<u8>> = (0..layers)
                .map(|_| {
                    (0..blocks)
                        .map(|_| {
                            let r = next();
                            if (r % 100) as u8 >= density { 0 } else { (r >> 8) as u8 % 4 }
                        })
                        .collect()
                })
                .collect();
            let maps = maps(&stack, blocks);
            let mut index = Index::new(blocks);
            for depth in (1..layers).rev() {
                index.fold(depth, &maps[depth], skip_copied);
            }
            for b in 0..blocks {
                prop_assert_eq!(
                    lookup(&maps[0], &index, layers, skip_copied, b),
                    naive(&maps, skip_copied, b),
                    "block {}", b
                );
            }
            // Writes to the top need no change of the index.
            let locks = crate::engine::locks::BlockLocks::default();
            for (b, v) in writes {
                let b = b as u64 % blocks;
                let g = locks.try_lock(b, 1).unwrap();
                maps[0].set_range(&g, b..b + 1, state(v));
                prop_assert_eq!(
                    lookup(&maps[0], &index, layers, skip_copied, b),
                    naive(&maps, skip_copied, b)
                );
            }
        }
    }

    #[test]
    fn the_index_holds_every_depth_and_state() {
        let mut index = Index::new(4);
        let m = BlockMap::new(MapMemory::heap(4), 4);
        let locks = crate::engine::locks::BlockLocks::default();
        let g = locks.try_lock(0, 4).unwrap();
        m.set_range(&g, 0..1, BlockState::Allocated);
        m.set_range(&g, 1..2, BlockState::Zero);
        m.set_range(&g, 2..3, BlockState::Copied);
        index.fold(MAX_LAYERS - 1, &m, false);
        assert_eq!(index.get(0), Some((63, BlockState::Allocated)));
        assert_eq!(index.get(1), Some((63, BlockState::Zero)));
        assert_eq!(index.get(2), Some((63, BlockState::Copied)));
        assert_eq!(index.get(3), None);
        index.fold(1, &m, true);
        assert_eq!(index.get(0), Some((1, BlockState::Allocated)));
        assert_eq!(index.get(2), Some((63, BlockState::Copied)));
    }
}
