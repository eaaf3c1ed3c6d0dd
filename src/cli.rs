//! The command line: `add`, `del`, `list`. Every option is documented here,
//! with its default and why; `--help` shows it.

use crate::daemon::{self, AddRequest};
use crate::engine::base::BaseIo;
use crate::engine::cache::{CacheMode, CachePolicy};
use crate::engine::readahead::Readahead;
use crate::size::parse_size;
use crate::ublk::TargetConfig;
use crate::ublk::params::ZeroCopy;
use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "ublk-cow",
    version,
    about = "A copy-on-write block device served from user space through ublk",
    long_about = "A copy-on-write block device served from user space through ublk.\n\n\
        `ublk-cow add --base disk.img` creates /dev/ublkbN: reads come from the base \
        until a block is written; writes land in an overlay file. The base is opened \
        read-only and never written."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a device over a base image; prints /dev/ublkbN when it is ready.
    Add(AddArgs),
    /// Stop a device: flush its overlay, mark it clean, remove the device.
    Del(DelArgs),
    /// List ublk-cow devices.
    List(ListArgs),
    /// Cache a range of a device: warm it (fadvise or read) or, with
    /// --cow-on-cache, copy it into the overlay. Returns when done.
    Cache(CacheArgs),
    /// Show a device's counters: reads by source, writes, cache requests by
    /// source and action, blocks in each state.
    Stats(StatsArgs),
    /// Start a new daemon for a device whose daemon died (killed, crashed);
    /// the device kept its requests waiting and loses no completed write.
    Recover(RecoverArgs),
}

#[derive(Args, Debug)]
pub struct RecoverArgs {
    /// The device number N of /dev/ublkbN.
    #[arg(short = 'n', long = "number", value_name = "N")]
    pub number: u32,
    /// Stay in the foreground instead of starting a daemon.
    #[arg(long)]
    pub foreground: bool,
}

fn block_size_arg(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    u32::try_from(n).map_err(|_| format!("block size {s} is too large"))
}

/// Half the CPUs, at least one: a queue's thread shares its CPU with the
/// applications that submit to it, and leaving CPUs to them measured faster
/// (`make bench`, 2 vCPUs: 4K random reads at QD32 gave 65,113 IOPS with one
/// queue and 19,510 with two, in the same boot).
fn default_queues() -> u16 {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, 64) as u16)
}

#[derive(Args, Debug)]
pub struct AddArgs {
    /// The base image: a regular file or block device whose size is a
    /// multiple of 512. Opened read-only; never written.
    #[arg(long, value_name = "PATH")]
    pub base: PathBuf,

    /// Keep the overlay in this file. If it exists it must have been made for
    /// this base; the device continues where it left off. If it does not
    /// exist it is created. Default: a temporary overlay in $TMPDIR (or /tmp),
    /// removed at `del`.
    #[arg(long, value_name = "PATH")]
    pub overlay: Option<PathBuf>,

    /// Copy-on-write block size: a power of two from 4K to 1M. Default 4K (a
    /// page; small first writes copy little). Larger blocks make the map
    /// smaller and sequential first writes cheaper, but a small first write
    /// then copies a whole block from the base. An existing overlay keeps the
    /// block size it was made with.
    #[arg(long, value_name = "SIZE", value_parser = block_size_arg)]
    pub block_size: Option<u32>,

    /// Hardware queues, each served by its own thread and io_uring.
    /// Default: half the CPUs, at least one, so that the queues' threads
    /// leave CPUs to the applications submitting I/O.
    #[arg(long, value_name = "N", default_value_t = default_queues())]
    pub queues: u16,

    /// Requests in flight per queue. Default 128: enough to keep a fast
    /// overlay busy, small enough for the per-request 1 MiB buffers.
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub depth: u16,

    /// How a request's data moves between the kernel and the daemon:
    /// `auto` = zero copy when the kernel's ublk_drv offers it
    /// (UBLK_F_AUTO_BUF_REG, Linux 6.16 and later), else copy mode; `on` =
    /// zero copy or fail; `off` = copy mode. With zero copy, reads and
    /// writes of the base and overlay move the data straight to and from the
    /// request's pages; in copy mode ublk copies each byte once more, between
    /// those pages and the daemon's memory. Default: auto.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = ZeroCopy::Auto)]
    pub zero_copy: ZeroCopy,

    /// Device number N for /dev/ublkbN. Default: the first free one.
    #[arg(long, value_name = "N")]
    pub id: Option<u32>,

    /// Make the device read-only.
    #[arg(long)]
    pub read_only: bool,

    /// Allocate the overlay's whole data area now (fallocate), so that a
    /// first write fills space already there instead of allocating it. On
    /// tmpfs the pages are also initialized and mapped now, so a first
    /// write is one copy by ublk into them, with no page to allocate and
    /// clear; add takes longer, in proportion to the size. In the
    /// benchmark guest (tmpfs) first writes ran 1.7 times (random 4 KiB)
    /// and 10 times (sequential 1 MiB) as fast as on a sparse overlay. The
    /// overlay takes the device's full size at once (in RAM, on tmpfs); a
    /// discard frees its blocks again. Default: off, the overlay grows with
    /// the writes.
    #[arg(long)]
    pub preallocate: bool,

    /// Stay in the foreground instead of starting a daemon; stop with Ctrl-C
    /// or `ublk-cow del`.
    #[arg(long)]
    pub foreground: bool,

    /// Use an existing overlay even if the base's contents or modification
    /// time differ from when the overlay was made (the size must match).
    #[arg(long)]
    pub force: bool,

    /// What cache requests (kernel readahead, the readahead detector,
    /// `ublk-cow cache`) do with blocks still on the base: `ignore`;
    /// `passthrough` = fadvise(WILLNEED) on the base; `read` = read the base
    /// and drop the data (warms caches fadvise cannot reach); `cow` = copy
    /// into the overlay. Allocated blocks are always fadvised in the overlay.
    /// Default: passthrough, as the base is read through the page cache.
    #[arg(long, value_name = "MODE", value_parser = cache_mode_arg)]
    pub cache_mode: Option<CacheMode>,

    /// Same as --cache-mode cow: pull what is cached (and what the kernel
    /// reads ahead) into the overlay, e.g. from a slow base.
    #[arg(long, conflicts_with = "cache_mode")]
    pub cow_on_cache: bool,

    /// Copy every base block that a read fully covers into the overlay (the
    /// data is already in memory), so the next read of it needs no base.
    #[arg(long)]
    pub cow_on_read: bool,

    /// Prefetch for sequential readers: `auto` (windows from 64K doubling up
    /// to 4M), a maximum window size, or `off`. Serves readers that bypass
    /// the page cache (O_DIRECT), whose reads carry no readahead hint, and
    /// the hints of buffered readers. A READ that completes while others of
    /// its queue are in flight asks for nothing: that reader reads ahead
    /// itself. The kernel's own readahead on the base is switched off
    /// (POSIX_FADV_RANDOM), so `off` means no prefetch at all.
    #[arg(long, value_name = "off|auto|SIZE", default_value = "auto", value_parser = readahead_arg)]
    pub readahead: Readahead,

    /// How the device reads base blocks that the page cache does not hold:
    /// `cached` = through the page cache, which keeps them (a second read
    /// costs no base I/O); `direct` = around it (O_DIRECT), as kernel loop
    /// with direct I/O does, so that a reader that caches for itself (a VM,
    /// a database) does not have each base block cached twice, and a read
    /// costs no page to allocate and fill: random reads of a base on a
    /// device measured 1.6 times as fast. With `direct`, a read that the
    /// page cache holds in full is still served from there: blocks
    /// prefetched by the readahead detector or warmed by a cache request
    /// (`--cache-mode passthrough` or `read`) keep their worth.
    /// Partial-block writes and copies into the overlay always read
    /// through the page cache. Default: cached.
    #[arg(long, value_name = "cached|direct", default_value = "cached", value_parser = base_io_arg)]
    pub base_io: BaseIo,
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
pub struct CacheArgs {
    /// The device number N of /dev/ublkbN.
    #[arg(short = 'n', long = "number", value_name = "N")]
    pub number: u32,
    /// Start of the range. Default 0.
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = size_arg)]
    pub offset: u64,
    /// Length of the range. Default: to the end of the device.
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    pub length: Option<u64>,
    /// Cache mode for this request (see `add --cache-mode`). Default: the
    /// device's.
    #[arg(long, value_name = "MODE", value_parser = cache_mode_arg)]
    pub mode: Option<CacheMode>,
    /// Same as --mode cow: copy the range's base blocks into the overlay.
    #[arg(long, conflicts_with = "mode")]
    pub cow_on_cache: bool,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// The device number N of /dev/ublkbN.
    #[arg(short = 'n', long = "number", value_name = "N")]
    pub number: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["number", "all"]))]
pub struct DelArgs {
    /// The device number N of /dev/ublkbN.
    #[arg(short = 'n', long = "number", value_name = "N")]
    pub number: Option<u32>,
    /// Every ublk-cow device.
    #[arg(long)]
    pub all: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Add(a) => daemon::add(AddRequest {
            base: a.base,
            overlay: a.overlay,
            block_size: a.block_size,
            target: TargetConfig {
                id: a.id,
                queues: a.queues,
                depth: a.depth,
                zero_copy: a.zero_copy,
            },
            read_only: a.read_only,
            preallocate: a.preallocate,
            foreground: a.foreground,
            force: a.force,
            policy: CachePolicy {
                mode: if a.cow_on_cache {
                    CacheMode::Cow
                } else {
                    a.cache_mode.unwrap_or(CacheMode::default_for(false))
                },
                readahead: a.readahead,
                cow_on_read: a.cow_on_read,
                ..CachePolicy::default()
            },
            base_io: a.base_io,
        }),
        Command::Del(d) => match d.number {
            Some(n) => daemon::del(n),
            None => daemon::del_all(),
        },
        Command::List(l) => daemon::list(l.json),
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
    }
}
