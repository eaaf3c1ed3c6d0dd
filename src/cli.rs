//! The command line: the subcommands `add`, `del`, `list`, `cache`, `stats`,
//! `recover` and `serve`, their options, and the call into the daemon each
//! one makes; `info`, `check` and `map`, which read overlay files
//! (`engine::chain`) and print what they found; `snapshot`, which freezes
//! one into a layer under a new overlay; and `commit`, which merges an
//! overlay into its backing (`engine::commit`). Every option's help is written here: the first paragraph of its
//! doc comment is its line in `-h`, the whole comment its text in `--help`;
//! a default is stated once, by clap where clap fills it in, else in the
//! text. docs/usage.md says the same at more length.

use crate::daemon::{self, AddRequest, RemoteSettings};
use crate::engine::base::BaseIo;
use crate::engine::cache::{CacheMode, CachePolicy};
use crate::engine::chain;
use crate::engine::readahead::Readahead;
use crate::remote::AwsEnv;
use crate::size::parse_size;
use crate::ublk::TargetConfig;
use crate::ublk::params::ZeroCopy;
use anyhow::Result;
use clap::builder::{PossibleValue, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `--version`: the version and the commit it was built from (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("UBLK_COW_COMMIT"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "ublk-cow",
    version = VERSION,
    about = "A copy-on-write block device served from user space through ublk",
    long_about = "A copy-on-write block device served from user space through ublk.\n\n\
        `ublk-cow add --base disk.img` creates /dev/ublkbN: reads come from the base \
        until a block is written; writes land in an overlay file. The base is opened \
        read-only and never written; only `ublk-cow commit`, when asked, merges an \
        overlay into it.\n\n\
        `ublk-cow COMMAND --help` explains a command and each of its options."
)]
pub struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Create a device over a base image; prints /dev/ublkbN
    ///
    /// Reads come from the base until a block is written; writes land in the
    /// overlay, a block (--block-size) at a time. `add` checks everything
    /// before it changes anything: bad input is one error line, a non-zero
    /// exit, and no file created or changed. It then starts a daemon that
    /// serves the device and prints the device's path once it accepts I/O.
    ///
    /// Sizes take plain bytes or K, M, G, T (powers of 1024).
    Add(AddArgs),
    /// Stop a device: flush its overlay, mark it clean, remove the device
    ///
    /// SIGTERM to the daemon does the same. A temporary overlay is removed
    /// with the device. When the daemon is gone, `del` removes the device and
    /// its state files.
    Del(DelArgs),
    /// List ublk-cow devices
    ///
    /// From the state files in /run/ublk-cow (or $UBLK_COW_RUN_DIR). STATE is
    /// `running`; `unclean` when the overlay had not been closed cleanly
    /// before this daemon opened it; `dead` when the daemon died (see
    /// `recover`); or `failed` when a flush failed. Sizes are in binary
    /// units (--bytes: in bytes). --json adds the options each device was
    /// added with, in the schema docs/usage.md gives.
    List(ListArgs),
    /// Cache a range of a device: warm it, or copy it into the overlay
    ///
    /// A cache request through the daemon's control socket, served block by
    /// block: allocated blocks are fadvised in the overlay, zero blocks need
    /// nothing, and blocks still on the base get what the mode says. A copy
    /// never undoes a write that came after it started. Returns when the
    /// range is done, with progress on a terminal.
    Cache(CacheArgs),
    /// Show a device's counters
    ///
    /// Reads by source, writes, read-modify-writes, waits for a block lock,
    /// flushes, cache requests by source and by action, bytes copied, and
    /// blocks in each state.
    Stats(StatsArgs),
    /// Serve a device again after its daemon died
    ///
    /// Devices are made with ublk's user recovery: when the daemon dies
    /// (killed, crashed) the kernel keeps /dev/ublkbN and holds its requests.
    /// `recover` starts a new daemon with the options and the live map the
    /// old one left, and the held requests are served; no write the device
    /// completed is lost. A device whose flush failed is not served again:
    /// its live map may name data that never reached the disk (`del` leaves
    /// the overlay as of its last good flush).
    Recover(RecoverArgs),
    /// Show an overlay: size, block size, backing, blocks held, state
    ///
    /// Like `qemu-img info`: the virtual size, the block size, the backing
    /// (the file below: a raw image, a block device or a frozen overlay),
    /// the blocks the overlay holds (written, copied up from below, zero),
    /// the bytes it takes on disk, whether it was closed cleanly, whether it
    /// is frozen (a layer) or live, its format version, and the device that
    /// uses it, if any. Opens the file read-only and writes nothing.
    Info(InfoArgs),
    /// Check an overlay: header, map, data area and the backing's identity
    ///
    /// Exit status 0 when it is sound; otherwise one line per problem and
    /// status 1. Checks the header's checksum and layout, the map's bits,
    /// that the data area is as long as the map needs, and the chain below:
    /// every lower overlay frozen and sound, no cycle, and each recorded
    /// identity of a backing matching the file there now. Opens the files
    /// read-only and writes nothing.
    Check(CheckArgs),
    /// Show which layer holds each extent of an overlay's virtual disk
    ///
    /// The whole virtual disk as extents, with the fields of `qemu-img map
    /// --output=json`: `start`, `length`, `depth` (0 is the file named, 1
    /// its backing, ...), `present`, `zero`, `data`, and `offset`, where
    /// the data lies in that depth's file. Adjacent extents with the same
    /// answer are merged. A block copied up from below is reported at the
    /// depth it came from, so the extents at depth 0 are the blocks written
    /// or discarded in that overlay. Opens the files read-only.
    ///
    /// With -n N, the top overlay of device N (named by its state file), read
    /// while the device runs: its map is taken from the device's live map
    /// (in the run directory), which holds every write the device has
    /// completed, flushed or not; the layers below are frozen. Without a
    /// live map (the daemon is gone and `del` wrote it back), from the
    /// overlay's own map.
    Map(MapArgs),
    /// Freeze an overlay into a layer and put a new, empty overlay over it
    ///
    /// FILE, an overlay that no device uses, is frozen: it becomes a layer,
    /// read-only from then on (a layer already stays one). NEW is created
    /// over it and takes the writes: `ublk-cow add --base FILE --overlay NEW`
    /// serves the chain, reading each block from the topmost layer that
    /// holds it. With -n N instead of FILE, the overlay of device N, in use:
    /// the device goes on over the chain, its writes landing in NEW. Forks
    /// are more overlays over the same layer, made the same way or by `add
    /// --base FILE --overlay FORK`. NEW must not exist; nothing is changed
    /// when any check fails. Without --overlay, FILE is only frozen (e.g.
    /// to `push` it).
    Snapshot(SnapshotArgs),
    /// Serve the device a configuration file describes (what systemd runs)
    ///
    /// What the unit ublk-cow@NAME.service runs with /etc/ublk-cow/NAME.conf:
    /// `key = value` lines naming `base`, `overlay` and any other option of
    /// `add` by its long name (`number = 3`, `read-only = yes`); `#` starts
    /// a comment. The device is served in the foreground and systemd is told
    /// READY=1 once it accepts I/O. When the overlay's device is there and
    /// its daemon is gone (a crash), it is recovered instead of added: the
    /// same /dev/ublkbN, no write lost. SIGTERM (`systemctl stop`) is `del`.
    Serve(ServeArgs),
    /// Merge an overlay's blocks into its backing: the layer below, or the base
    ///
    /// The only command that writes a base, and only the one named as the
    /// overlay's backing. Written blocks are copied into it, zero blocks made
    /// zero there, and blocks copied up from below skipped (they are there
    /// already). Afterwards the overlay holds no block, reads the same
    /// through its backing, and records the backing's new identity, so that
    /// `add --base BACKING --overlay LAYER` accepts it again; overlays made
    /// over it still read the same. Progress on a terminal.
    ///
    /// Refused (one line, nothing changed) while the overlay or its backing
    /// is in use by a device, while the overlay was not closed cleanly, and
    /// while another overlay has the backing below it (found among the
    /// running devices and in the directories of the overlay and of its
    /// backing), as that one would read other data afterwards; --force skips
    /// this last check. A commit that was stopped (killed, power cut) is
    /// finished by running it again; until then neither the overlay nor a
    /// layer below it that the commit had begun to write into is used.
    Commit(CommitArgs),
    /// Upload a layer to S3, packed, so that `add --base s3://...` serves it
    ///
    /// LAYER, a frozen overlay (see `snapshot`), is uploaded to URL in a
    /// packed form: its header, an index of the blocks it holds, and only
    /// their data (a layer file is sparse; an object cannot be). The pushed
    /// object names its backing by URL: --backing, the push of the file the
    /// layer was made over (a raw image uploaded as it is, or the pushed
    /// layer below). Before the upload, the backing is checked to be the one
    /// the layer was made over: a pushed layer must be the push of that
    /// layer as it is now (the identity the layer recorded of it), a raw
    /// image must have its size and sampled contents. So a stack is pushed
    /// bottom-up, and pushing needs the layer's local chain. `add --base URL`
    /// then serves the stack with a local overlay, fetching each block from
    /// the topmost layer that holds it.
    ///
    /// One multipart upload, aborted on error, with progress on a terminal.
    /// An object already at URL is not replaced without --force. S3
    /// settings come from the AWS_* environment, as for `add`.
    Push(PushArgs),
}

#[derive(Args, Debug)]
pub(crate) struct PushArgs {
    /// The layer (a frozen overlay) to upload
    #[arg(value_name = "LAYER")]
    pub(crate) layer: PathBuf,
    /// Where to upload it: s3://BUCKET/KEY
    #[arg(value_name = "URL")]
    pub(crate) url: String,
    /// The URL of the layer's backing in the object store
    ///
    /// A raw image (uploaded as it is, e.g. with `aws s3 cp`) when the layer
    /// was made over a raw image, or the push of the layer it was made over;
    /// s3://, https:// or http://. Required, unless the layer was made over a
    /// remote base, whose URL it records.
    #[arg(long, value_name = "URL")]
    pub(crate) backing: Option<String>,
    /// Replace an object already at URL (devices reading it then fail their
    /// reads of blocks not fetched yet)
    #[arg(long)]
    pub(crate) force: bool,
}

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// The configuration file, e.g. /etc/ublk-cow/NAME.conf
    #[arg(value_name = "CONFIG")]
    pub(crate) config: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct CommitArgs {
    /// The overlay (live or frozen) to merge into its backing
    #[arg(value_name = "LAYER")]
    pub(crate) layer: PathBuf,
    /// Commit even though other overlays have the backing below them
    ///
    /// They then read the merged data where the committed overlay held
    /// blocks. Every other check still applies.
    #[arg(long)]
    pub(crate) force: bool,
}

#[derive(Args, Debug)]
pub(crate) struct InfoArgs {
    /// The overlay file
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
    /// Print JSON instead of text
    #[arg(long)]
    pub(crate) json: bool,
    /// Also show every layer below and the raw base (the chain is checked)
    #[arg(long)]
    pub(crate) backing_chain: bool,
}

#[derive(Args, Debug)]
pub(crate) struct CheckArgs {
    /// The overlay file
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
}

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["file", "number"]))]
pub(crate) struct MapArgs {
    /// The overlay file
    #[arg(value_name = "FILE")]
    pub(crate) file: Option<PathBuf>,
    /// The top overlay of device N (/dev/ublkbN), as it is now
    #[arg(short = 'n', long = "number", value_name = "N")]
    pub(crate) number: Option<u32>,
    /// Print JSON (as `qemu-img map --output=json`) instead of a table
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct SnapshotArgs {
    /// The overlay to freeze, one no device uses
    #[arg(
        value_name = "FILE",
        required_unless_present = "number",
        conflicts_with = "number"
    )]
    pub(crate) file: Option<PathBuf>,
    /// The device N of /dev/ublkbN, in use: its overlay is frozen
    ///
    /// The device must have been added with --overlay. Its daemon takes
    /// the snapshot: requests in flight complete, new ones wait (none
    /// fails) while the overlay is flushed and frozen and NEW is made over
    /// it; the pause is printed. If the daemon ends midway, `ublk-cow
    /// recover -n N` finishes the snapshot.
    #[arg(short = 'n', long = "number", value_name = "N")]
    pub(crate) number: Option<u32>,
    /// The new overlay to create over it (required with -n)
    ///
    /// Without it, FILE is only frozen: a layer with nothing over it yet,
    /// e.g. to `push` it (an overlay over a remote base, which cannot have
    /// a local overlay over it yet, is frozen this way).
    #[arg(short, long, value_name = "NEW", required_unless_present = "file")]
    pub(crate) overlay: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct RecoverArgs {
    /// The device number N of /dev/ublkbN
    #[arg(short = 'n', long = "number", value_name = "N")]
    pub(crate) number: u32,
    /// Stay in the foreground instead of starting a daemon
    #[arg(long)]
    pub(crate) foreground: bool,
}

fn block_size_arg(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    u32::try_from(n).map_err(|_| format!("block size {s} is too large"))
}

/// Half the CPUs, at least one: a queue's thread shares its CPU with the
/// applications that submit to it, and leaving CPUs to them measured faster
/// (docs/benchmarks.md).
fn default_queues() -> u16 {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, 64) as u16)
}

/// A value out of a fixed list, parsed by `parse` (whose error is the
/// message), listed in `--help` with one line each.
#[derive(Clone)]
struct OneOf<T> {
    values: &'static [(&'static str, &'static str)],
    parse: fn(&str) -> Result<T, String>,
}

impl<T: Clone + Send + Sync + 'static> TypedValueParser for OneOf<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        self.parse.parse_ref(cmd, arg, value)
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            self.values
                .iter()
                .map(|&(name, help)| PossibleValue::new(name).help(help)),
        ))
    }
}

const CACHE_MODES: &[(&str, &str)] = &[
    ("ignore", "Nothing"),
    (
        "passthrough",
        "fadvise(WILLNEED) on the base: its page cache reads ahead",
    ),
    (
        "read",
        "Read the base and drop the data (warms caches fadvise cannot reach)",
    ),
    ("cow", "Copy into the overlay (copy-on-cache)"),
];

fn cache_modes() -> OneOf<CacheMode> {
    OneOf {
        values: CACHE_MODES,
        parse: cache_mode_arg,
    }
}

const BASE_IO_MODES: &[(&str, &str)] = &[
    (
        "cached",
        "Through the page cache, which keeps them: a second read costs no base I/O",
    ),
    (
        "direct",
        "Around it (O_DIRECT), as kernel loop with direct I/O: no block cached twice",
    ),
];

fn base_io_modes() -> OneOf<BaseIo> {
    OneOf {
        values: BASE_IO_MODES,
        parse: base_io_arg,
    }
}

#[derive(Args, Debug)]
pub(crate) struct AddArgs {
    /// The base: an image file or block device, a layer, or a URL
    ///
    /// An image's size is a multiple of 512. A layer is a frozen overlay
    /// (see `snapshot`). A URL names a raw image in an object store or on a
    /// server: s3://BUCKET/KEY, https://HOST/PATH or http://HOST/PATH.
    /// It is opened read-only and the device never writes it (`commit`
    /// does, when asked, with no device over it). A layer is served with
    /// the chain below it: each block is read from the topmost file holding
    /// it. A URL is read lazily, in units of --fetch-size, with ranged GETs;
    /// each unit fetched lands in the overlay, so no block is fetched twice.
    /// For s3:// the standard AWS variables apply: AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION (default
    /// us-east-1), AWS_ENDPOINT_URL (another store than AWS) and
    /// AWS_ALLOW_HTTP=true (an endpoint without TLS); the daemon keeps them.
    /// The object's size and ETag (or Last-Modified) are its identity: an
    /// overlay made for another version is refused, and if the object
    /// changes while the device runs, reads of blocks not yet fetched fail.
    #[arg(short, long, value_name = "PATH|URL")]
    pub(crate) base: PathBuf,

    /// Keep the overlay in this file [default: a temporary file]
    ///
    /// An existing overlay must have been made for this base: the same size,
    /// and the same sampled contents and modification time unless --force.
    /// The device then continues where it left off. A file that does not
    /// exist is created. The temporary file is made in $TMPDIR (or /tmp) and
    /// removed at `del`.
    #[arg(short, long, value_name = "PATH")]
    pub(crate) overlay: Option<PathBuf>,

    /// Copy-on-write block size: a power of two from 4K to 1M [default: 4K]
    ///
    /// A first write smaller than a block copies the rest of the block from
    /// the base. Larger blocks make the map smaller and sequential first
    /// writes cheaper, but a small first write copies more. An existing
    /// overlay keeps the block size it was made with; asking for another is
    /// refused.
    #[arg(long, value_name = "SIZE", value_parser = block_size_arg)]
    pub(crate) block_size: Option<u32>,

    /// Queues, each served by its own thread and io_uring
    ///
    /// The default is half the CPUs, at least one: a queue's thread shares
    /// its CPU with the applications that submit I/O to it, and leaves them
    /// the others. Without zero copy, while there are more CPUs than
    /// queues, each queue also has a copy helper thread that copies READs
    /// of 256 KiB or more while it is not busy with another.
    #[arg(short, long, value_name = "N", default_value_t = default_queues())]
    pub(crate) queues: u16,

    /// Requests in flight per queue, from 1 to 4096
    ///
    /// Enough to keep a fast overlay busy; in copy mode each has a buffer of
    /// 1 MiB.
    #[arg(short, long, value_name = "N", default_value_t = 128,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub(crate) depth: u16,

    /// How requests' data moves between kernel and daemon
    ///
    /// With zero copy (UBLK_F_AUTO_BUF_REG, Linux 6.16 and later) the reads
    /// and writes of the base and the overlay move the data straight to and
    /// from the request's pages. In copy mode (`off`, and `auto` on older
    /// kernels) ublk copies each byte between the request's pages and the
    /// daemon's memory. A device keeps its mode across `recover`.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = ZeroCopy::Auto)]
    pub(crate) zero_copy: ZeroCopy,

    /// Where zero copy is not taken, use ublk's user copy instead of copy mode
    ///
    /// With user copy (UBLK_F_USER_COPY, Linux 6.5 and later) the daemon
    /// copies each request's data itself: a READ whose runs lie in memory
    /// (base and overlay in tmpfs) straight from each run, one copy per byte
    /// where copy mode makes two for a READ of several runs. Every request
    /// costs one system call more, which small requests feel. Refused with
    /// one line where the kernel does not offer it.
    #[arg(long)]
    pub(crate) user_copy: bool,

    /// Device number N for /dev/ublkbN [default: the first free one]
    ///
    /// A number already taken is refused. `--id` is another name for it.
    #[arg(short = 'n', long = "number", visible_alias = "id", value_name = "N")]
    pub(crate) id: Option<u32>,

    /// Make the device read-only
    #[arg(short, long)]
    pub(crate) read_only: bool,

    /// Allocate the overlay's whole data area before serving
    ///
    /// A first write then fills space already there instead of allocating
    /// it. On tmpfs the pages are also initialized and mapped, so ublk
    /// copies a first write straight into them; `add` then takes longer, in
    /// proportion to the size. The overlay takes the device's full size at
    /// once (RAM, on tmpfs); a discard frees its blocks again. Where the
    /// space is not there, `add` fails and leaves nothing behind. Without
    /// it the overlay grows with the writes.
    #[arg(long)]
    pub(crate) preallocate: bool,

    /// Stay in the foreground instead of starting a daemon
    ///
    /// Stop it with Ctrl-C, SIGTERM or `ublk-cow del`.
    #[arg(long)]
    pub(crate) foreground: bool,

    /// Use an existing overlay even if its base's contents or mtime changed
    ///
    /// The base's size must still match. Blocks not written through the
    /// device then read from the changed base.
    #[arg(long)]
    pub(crate) force: bool,

    /// What cache requests do with base blocks
    ///
    /// The mode acts on blocks still on the base; allocated blocks are
    /// fadvised in the overlay whatever the mode, zero blocks need nothing.
    /// Cache requests come from the kernel's readahead, the readahead
    /// detector (--readahead) and `ublk-cow cache`.
    #[arg(long, value_name = "MODE", value_parser = cache_modes(),
          default_value_t = CacheMode::default_for(false))]
    pub(crate) cache_mode: CacheMode,

    /// Same as --cache-mode cow
    ///
    /// Pulls what is cached, and what the kernel reads ahead, into the
    /// overlay: from a slow base, say.
    #[arg(long, conflicts_with = "cache_mode")]
    pub(crate) cow_on_cache: bool,

    /// Copy every base block that a read fully covers into the overlay
    ///
    /// The data is in memory already; the next read of those blocks needs
    /// no base.
    #[arg(long)]
    pub(crate) cow_on_read: bool,

    /// Prefetch for sequential readers; SIZE caps its window
    ///
    /// Each queue follows up to four sequential readers, going up or down;
    /// `auto` asks for windows from 64K doubling up to 4M while a reader
    /// keeps on, halved when it skips what was asked; a SIZE takes that as
    /// the largest window instead. Prefetch serves readers that bypass
    /// the page cache (O_DIRECT), whose reads carry no readahead hint, and
    /// the hints of buffered readers. A READ that completes while others of
    /// its queue are in flight asks for nothing: that reader reads ahead
    /// itself. The kernel's own readahead on the base is switched off
    /// (POSIX_FADV_RANDOM), so `off` means no prefetch at all. A device
    /// whose base, layers and overlay are all files in tmpfs prefetches
    /// nothing (every page is in memory already) unless --cache-mode is
    /// cow. A block device base never counts as a file in tmpfs.
    #[arg(long, value_name = "off|auto|SIZE", default_value = "auto", value_parser = readahead_arg)]
    pub(crate) readahead: Readahead,

    /// How base blocks not in the page cache are read
    ///
    /// With `direct`, a read that the page cache holds in full is still
    /// served from there, so blocks prefetched or warmed by a cache request
    /// (--cache-mode passthrough or read) keep their worth. A read not
    /// aligned for direct I/O, partial-block writes and copies into the
    /// overlay read through the page cache. A base whose file system cannot
    /// do direct I/O is refused. A device keeps it across `recover`.
    #[arg(long, value_name = "MODE", default_value = "cached", value_parser = base_io_modes())]
    pub(crate) base_io: BaseIo,

    /// Bytes per ranged GET of a remote base [default: 1M]
    ///
    /// A multiple of the block size, at most 64M. Each READ of blocks not
    /// yet fetched fetches the units it touches whole and keeps them in the
    /// overlay.
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    pub(crate) fetch_size: Option<u64>,

    /// Deadline of one fetch of a remote base, retries included [default: 30s]
    ///
    /// Seconds, or with a unit (500ms, 30s, 2m). Transient faults (5xx, a
    /// refused or reset connection) are retried with backoff until then;
    /// past it the READ fails with EIO, and the device stays up.
    #[arg(long, value_name = "TIME", value_parser = fetch_timeout_arg)]
    pub(crate) fetch_timeout: Option<std::time::Duration>,
}

fn fetch_timeout_arg(s: &str) -> Result<std::time::Duration, String> {
    crate::remote::parse_fetch_timeout(s).map_err(|e| e.to_string())
}

fn base_io_arg(s: &str) -> Result<BaseIo, String> {
    s.parse()
}

fn cache_mode_arg(s: &str) -> Result<CacheMode, String> {
    s.parse()
}

fn readahead_arg(s: &str) -> Result<Readahead, String> {
    s.parse()
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

#[derive(Args, Debug)]
pub(crate) struct CacheArgs {
    /// The device number N of /dev/ublkbN
    #[arg(short = 'n', long = "number", value_name = "N")]
    pub(crate) number: u32,
    /// Start of the range
    #[arg(short, long, value_name = "SIZE", default_value = "0", value_parser = size_arg)]
    pub(crate) offset: u64,
    /// Length of the range [default: to the end of the device]
    #[arg(short, long, value_name = "SIZE", value_parser = size_arg)]
    pub(crate) length: Option<u64>,
    /// Cache mode for this request [default: the device's --cache-mode]
    #[arg(long, value_name = "MODE", value_parser = cache_modes())]
    pub(crate) mode: Option<CacheMode>,
    /// Same as --mode cow: copy the range's base blocks into the overlay
    #[arg(long, conflicts_with = "mode")]
    pub(crate) cow_on_cache: bool,
}

#[derive(Args, Debug)]
pub(crate) struct StatsArgs {
    /// The device number N of /dev/ublkbN
    #[arg(short = 'n', long = "number", value_name = "N")]
    pub(crate) number: u32,
    /// Print JSON instead of a table
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["number", "all"]))]
pub(crate) struct DelArgs {
    /// The device number N of /dev/ublkbN
    #[arg(short = 'n', long = "number", value_name = "N")]
    pub(crate) number: Option<u32>,
    /// Every ublk-cow device (none is not an error)
    #[arg(short, long)]
    pub(crate) all: bool,
}

#[derive(Args, Debug)]
pub(crate) struct ListArgs {
    /// Only device N of /dev/ublkbN
    #[arg(short = 'n', long = "number", value_name = "N")]
    pub(crate) number: Option<u32>,
    /// Print JSON instead of a table (the schema is in docs/usage.md)
    #[arg(long)]
    pub(crate) json: bool,
    /// Sizes in bytes instead of binary units (K, M, G, T)
    #[arg(long)]
    pub(crate) bytes: bool,
}

/// An error and its causes on one line, `: ` between them, leaving out a
/// cause whose text the message before it already ends with (an error that
/// prints its source, as many do, would otherwise say it twice).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Add(a) => daemon::add(add_request(a)),
        Command::Serve(s) => serve(&s.config),
        Command::Del(d) => match d.number {
            Some(n) => daemon::del(n),
            None => daemon::del_all(),
        },
        Command::List(l) => daemon::list(l.number, l.json, l.bytes),
        Command::Recover(r) => daemon::recover(r.number, r.foreground),
        Command::Cache(c) => {
            let mode = if c.cow_on_cache {
                Some(CacheMode::Cow)
            } else {
                c.mode
            };
            daemon::cache(c.number, c.offset, c.length, mode)
        }
        Command::Stats(s) => daemon::stats(s.number, s.json),
        Command::Info(i) => info(&i.file, i.json, i.backing_chain),
        Command::Check(c) => check(&c.file),
        Command::Map(m) => match (m.file, m.number) {
            (Some(f), _) => map(&f, None, m.json),
            (None, Some(n)) => map_device(n, m.json),
            (None, None) => unreachable!("clap requires one"),
        },
        Command::Commit(c) => commit(&c.layer, c.force),
        Command::Push(p) => push(p),
        Command::Snapshot(s) => match (s.number, &s.file) {
            (Some(n), _) => match &s.overlay {
                Some(new) => daemon::snapshot::live(n, new),
                None => unreachable!("clap requires --overlay with -n"),
            },
            (None, Some(file)) => {
                if let Some(n) = daemon::in_use_by(file) {
                    anyhow::bail!(
                        "{} is in use by device {n}: `snapshot -n {n}` snapshots a device in use",
                        file.display()
                    );
                }
                match &s.overlay {
                    Some(new) => chain::snapshot(file, new)?,
                    None => {
                        chain::freeze_only(file)?;
                        println!("{}: frozen", file.display());
                    }
                }
                Ok(())
            }
            (None, None) => unreachable!("clap requires FILE or -n"),
        },
    }
}

/// What `add` was asked for, from its options.
fn add_request(a: AddArgs) -> AddRequest {
    let remote = RemoteSettings {
        env: if is_url(&a.base) {
            AwsEnv::from_process()
        } else {
            AwsEnv::default()
        },
        fetch_size: a.fetch_size.unwrap_or(0),
        fetch_timeout_ms: a.fetch_timeout.map_or(0, |t| (t.as_millis() as u64).max(1)),
    };
    AddRequest {
        base: a.base,
        overlay: a.overlay,
        block_size: a.block_size,
        target: TargetConfig {
            id: a.id,
            queues: a.queues,
            depth: a.depth,
            zero_copy: a.zero_copy,
            user_copy: a.user_copy,
        },
        read_only: a.read_only,
        preallocate: a.preallocate,
        foreground: a.foreground,
        force: a.force,
        policy: CachePolicy {
            mode: if a.cow_on_cache {
                CacheMode::Cow
            } else {
                a.cache_mode
            },
            readahead: a.readahead,
            cow_on_read: a.cow_on_read,
            ..CachePolicy::default()
        },
        base_io: a.base_io,
        remote,
    }
}

fn is_url(base: &Path) -> bool {
    base.to_str()
        .is_some_and(crate::remote::RemoteUrl::looks_like_url)
}

/// `ublk-cow serve CONFIG`: the configuration read as `add --foreground`
/// options, then served (or recovered) by `daemon::service`.
fn serve(config: &Path) -> Result<()> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let add = cmd
        .find_subcommand("add")
        .expect("the add command is defined");
    let flags: Vec<String> = add
        .get_arguments()
        .filter(|a| !a.get_action().takes_values())
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    let argv = daemon::service::add_argv(config, &flags)?;
    let cli = Cli::try_parse_from(&argv).map_err(|e| {
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or_default();
        anyhow::anyhow!(
            "{}: {}",
            config.display(),
            first.trim_start_matches("error: ")
        )
    })?;
    match cli.command {
        Command::Add(a) => daemon::service::serve(add_request(a)),
        _ => unreachable!("add_argv makes an add command line"),
    }
}

/// `ublk-cow push`: see `crate::push`.
fn push(p: PushArgs) -> Result<()> {
    use crate::remote::{Params, RemoteUrl};
    let backing = p.backing.as_deref().map(RemoteUrl::parse).transpose()?;
    let done = crate::push::push(crate::push::PushRequest {
        layer: &p.layer,
        url: RemoteUrl::parse(&p.url)?,
        backing,
        env: AwsEnv::from_process(),
        params: Params::default(),
        force: p.force,
    })?;
    println!(
        "{}: pushed to {} over {}: {} bytes ({} blocks of data, {} of zeros){}",
        p.layer.display(),
        p.url,
        done.backing,
        done.bytes,
        done.data_blocks,
        done.zero_blocks,
        done.etag.map_or(String::new(), |e| format!(", ETag {e}"))
    );
    Ok(())
}

fn commit(layer: &Path, force: bool) -> Result<()> {
    use crate::engine::commit::{self, CommitOptions, DeviceUse};
    // Unreadable state files leave the check to the locks devices hold.
    let devices = daemon::state::all()
        .unwrap_or_default()
        .into_iter()
        .map(|st| DeviceUse {
            id: st.id,
            overlay: st.overlay,
        })
        .collect();
    // The total is known once the commit has read the overlay's map.
    let mut bar: Option<crate::progress::Progress> = None;
    let done = commit::commit(
        layer,
        &CommitOptions { force, devices },
        &mut |done, total| {
            bar.get_or_insert_with(|| crate::progress::Progress::bytes("commit", total))
                .set(done)
        },
    );
    if let Some(b) = bar {
        b.finish();
    }
    let m = done?;
    println!(
        "{}: {} blocks written and {} made zero in its backing{}{}",
        layer.display(),
        m.written,
        m.zeroed,
        if m.skipped > 0 {
            format!(", {} copied from below skipped", m.skipped)
        } else {
            String::new()
        },
        if m.resumed {
            " (an earlier commit stopped midway is finished)"
        } else {
            ""
        }
    );
    Ok(())
}

fn info(file: &Path, json: bool, backing_chain: bool) -> Result<()> {
    let mut entries = chain::info(file, backing_chain)?;
    for e in entries.iter_mut().filter(|e| e.format_version.is_some()) {
        e.in_use_by = daemon::in_use_by(Path::new(&e.filename));
    }
    if json {
        let text = if backing_chain {
            serde_json::to_string_pretty(&entries)?
        } else {
            serde_json::to_string_pretty(&entries[0])?
        };
        println!("{text}");
        return Ok(());
    }
    let yes_no = |b: Option<bool>| if b == Some(true) { "yes" } else { "no" };
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!("file:          {}", e.filename);
        match (e.format_version, e.kind) {
            (Some(v), _) => println!("format:        overlay, version {v}"),
            (None, kind) => println!("format:        raw ({})", kind.unwrap_or("file")),
        }
        println!("virtual size:  {} bytes", e.virtual_size);
        if let Some(bs) = e.block_size {
            println!("block size:    {bs}");
        }
        if let Some(kind) = e.backing_kind {
            match &e.backing {
                Some(b) => println!("backing:       {b} ({kind})"),
                None => println!("backing:       not recorded (the base given to add --base)"),
            }
        }
        if let (Some(w), Some(c), Some(z)) = (e.blocks_written, e.blocks_copied, e.blocks_zero) {
            println!("blocks held:   {w} written, {c} copied, {z} zero");
        }
        println!("on disk:       {} bytes", e.allocated_bytes);
        if e.format_version.is_some() {
            println!(
                "state:         {}, clean: {}{}",
                if e.frozen == Some(true) {
                    "frozen (a layer)"
                } else {
                    "live"
                },
                yes_no(e.clean),
                if e.failed == Some(true) {
                    ", its last flush failed"
                } else {
                    ""
                }
            );
            if let Some(n) = e.in_use_by {
                println!("in use by:     /dev/ublkb{n}");
            }
        }
    }
    Ok(())
}

fn check(file: &Path) -> Result<()> {
    let problems = chain::check(file)?;
    let shown = file.display();
    if problems.is_empty() {
        println!("{shown}: no problems found");
        return Ok(());
    }
    for p in &problems {
        println!("{shown}: {p}");
    }
    std::io::stdout().flush()?;
    std::process::exit(1);
}

/// `map -n N`: the top overlay of device N, with its live map if the
/// device has one.
fn map_device(id: u32, json: bool) -> Result<()> {
    let Some(st) = daemon::state::DeviceState::load(id)? else {
        anyhow::bail!("there is no ublk-cow device {id}");
    };
    let live = match std::fs::read(daemon::state::map_path(id)) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "reading the live map {}",
                daemon::state::map_path(id).display()
            )));
        }
    };
    map(&st.overlay, live.as_deref(), json)
}

fn map(file: &Path, live_top: Option<&[u8]>, json: bool) -> Result<()> {
    let (extents, files) = chain::map(file, live_top)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "[")?;
        for (i, e) in extents.iter().enumerate() {
            let sep = if i + 1 < extents.len() { "," } else { "" };
            writeln!(out, "{}{sep}", serde_json::to_string(e)?)?;
        }
        writeln!(out, "]")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<18} {:<18} {:>5}  {:<4}  {:<18} FILE",
        "START", "LENGTH", "DEPTH", "WHAT", "OFFSET"
    )?;
    for e in &extents {
        writeln!(
            out,
            "{:<18} {:<18} {:>5}  {:<4}  {:<18} {}",
            format!("{:#x}", e.start),
            format!("{:#x}", e.length),
            e.depth,
            if e.zero { "zero" } else { "data" },
            e.offset.map_or("-".into(), |o| format!("{o:#x}")),
            files[e.depth]
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_listed_value_parses_and_every_mode_is_listed() {
        for (name, _) in CACHE_MODES {
            assert_eq!(cache_mode_arg(name).unwrap().to_string(), *name);
        }
        use CacheMode::*;
        for mode in [Ignore, Passthrough, Read, Cow] {
            // A new mode stops this match compiling until it is listed.
            match mode {
                Ignore | Passthrough | Read | Cow => {}
            }
            let name = mode.to_string();
            assert!(CACHE_MODES.iter().any(|(n, _)| *n == name), "{name}");
        }
        let listed: Vec<_> = BASE_IO_MODES
            .iter()
            .map(|(n, _)| base_io_arg(n).unwrap())
            .collect();
        assert_eq!(listed, [BaseIo::Cached, BaseIo::Direct]);
    }
}
