//! READ: the plan's runs read from the base, the overlay or zeros, into the
//! request; or, for one run in a mapped file, left where it is for ublk to
//! copy at the commit (`ReadData::Mapped`); or, with user copy, each run
//! in a mapped file left where it is, for the daemon to copy them all into
//! the request in one `pwritev` (`ReadData::Pieces`).

use super::{
    BASE_DIRECT_FD, BASE_FD, OVERLAY_FD, RingRead, TagScratch, ZERO_FD, layer_fd, read_op,
};
use crate::engine::Errno;
use crate::engine::plan::{self, ReadRun, ReadSource};
use crate::stats::Stats;
use crate::sys::Pipe;
use crate::ublk::ServedDevice;
use crate::ublk::copier::{Piece, Work};
use crate::ublk::inline::MemoryPath;
use crate::ublk::ops::{Op, PendingOp, Ring, finish_all};
use crate::ublk::request_buf::{RequestBuf, USER_COPY_MAX};
use std::cell::OnceCell;

/// A READ done: what its commit and the after-read policy need.
pub struct ReadDone {
    pub data: ReadData,
    /// It read at least one whole block's worth from the base
    /// (`after_read::CompletedRead::read_base_block`).
    pub read_base_block: bool,
}

/// Where a READ left its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadData {
    /// In the request buffer.
    Buffer,
    /// All of it is in one mapped file, at this address. ublk copies it into
    /// the request from there when the READ is committed: one copy instead
    /// of two.
    Mapped(*const u8),
    /// Run by run, in the mappings that hold them and in the request
    /// buffer: `TagScratch::pieces`, in order.
    Pieces,
}

/// What of a READ's data may stay where it lies in memory instead of being
/// copied into the request buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MayLeave {
    /// Nothing: all of it goes into the buffer.
    Nothing,
    /// All of it, when one run in a mapped file holds it
    /// (`ReadData::Mapped`): copy mode, whose commit names where ublk
    /// copies from.
    OneMapping,
    /// Each run in a mapped file (`ReadData::Pieces`): user copy, which
    /// gathers the pieces into the request.
    Runs,
}

/// How one run of a READ moves its data into the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transfer {
    /// Zeros written into the daemon's buffer.
    FillZeros,
    /// /dev/zero read into the request's registered pages.
    ZerosFromDevice,
    /// Nothing moved: the run is the whole READ and lies in a mapping, which
    /// the commit names for ublk to copy from (`ReadData::Mapped`).
    CommitMapping,
    /// Nothing moved: the run lies in a mapping, one of the pieces user
    /// copy gathers (`ReadData::Pieces`).
    LeaveMapped,
    /// Into the daemon's buffer: what memory holds now (`read_op`), the
    /// ring the rest.
    ToBuffer,
    /// The mapped pages through the tag's pipe into the registered pages.
    Splice,
    /// User copy from the mapping into the request.
    UserCopy,
    /// A fixed-buffer read from the file into the registered pages.
    RingFixed,
}

/// What the choice of a run's transfer depends on.
#[derive(Clone, Copy, Debug)]
struct RunFacts {
    zero: bool,
    /// The request's data is in its registered pages (zero copy).
    registered: bool,
    /// User copy reaches the request (a small one, `USER_COPY_MAX`).
    user_copy: bool,
    /// The run is the READ's only one.
    single: bool,
    /// What of the READ may stay where it lies.
    leave: MayLeave,
    /// The run's file is mapped (in memory).
    mapped: bool,
    /// The kernel may copy the run from a mapping of its file (in memory,
    /// or on a device with the run in its page cache).
    kernel_mapped: bool,
}

/// The first transfer to try for a run; `fallback` gives the next when
/// one cannot be had (no pipe, a copy that fell short).
fn choose(f: RunFacts) -> Transfer {
    match (f.zero, f.registered) {
        (true, false) => Transfer::FillZeros,
        (true, true) => Transfer::ZerosFromDevice,
        (false, false) if f.leave == MayLeave::Runs && f.kernel_mapped => Transfer::LeaveMapped,
        (false, false) if f.leave == MayLeave::OneMapping && f.single && f.kernel_mapped => {
            Transfer::CommitMapping
        }
        (false, false) => Transfer::ToBuffer,
        (false, true) if f.user_copy && f.mapped && f.single => Transfer::Splice,
        (false, true) if f.user_copy && f.mapped => Transfer::UserCopy,
        (false, true) => Transfer::RingFixed,
    }
}

impl Transfer {
    fn fallback(self) -> Transfer {
        match self {
            Transfer::Splice => Transfer::UserCopy,
            Transfer::UserCopy => Transfer::RingFixed,
            Transfer::CommitMapping | Transfer::LeaveMapped => Transfer::ToBuffer,
            other => unreachable!("{other:?} cannot fail before it starts"),
        }
    }
}

/// READ of `buf.len()` bytes at `off`. What `leave` allows of data in the
/// daemon's memory that lies in mapped runs stays where it is
/// (`ReadData::Mapped`, `ReadData::Pieces`).
pub async fn read<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    s: &mut TagScratch,
    off: u64,
    mut buf: RequestBuf<'_>,
    leave: MayLeave,
) -> Result<ReadDone, Errno> {
    let dev = &sh.dev;
    let st = &sh.stats;
    let below = |b| dev.base().below(b);
    let len = buf.len() as u64;
    // A remote base's blocks are fetched into the overlay first.
    let fetched = super::fetch_below(q, sh, off, len).await?;
    plan::plan_read(dev.map(), dev.geometry(), off, len, below, &mut s.runs);
    let bs = dev.geometry().block_size() as u64;
    let read_base_block = fetched > 0 || s.runs.iter().any(|r| r.source.is_below() && r.len >= bs);
    let done = |data| ReadDone {
        data,
        read_base_block,
    };
    let mut pending = Vec::with_capacity(s.runs.len());
    let single = s.runs.len() == 1;
    s.pieces.clear();
    let pieces = matches!(buf, RequestBuf::Memory(_)) && leave == MayLeave::Runs;
    let mut spliced = false;
    // A large READ into the daemon's buffer: its runs in mappings are
    // copied there by the queue's copy helper while this thread goes on.
    let helper = match buf {
        RequestBuf::Memory(_) if leave != MayLeave::Runs => s.helper_for(len),
        _ => None,
    };
    let mut aside = Vec::new();
    if let RequestBuf::Registered { index, .. } = buf
        && (!single || buf.len() > USER_COPY_MAX)
        && let Some(op) = pipe_read_all(q, sh, &s.runs, &s.pipe, index, buf.len() as u32)
    {
        Stats::add(&st.reads_from_mapping, s.runs.len() as u64);
        Stats::add(&st.reads_spliced, 1);
        for run in &s.runs {
            count(st, run);
        }
        return match finish_all(q, vec![op]).await {
            Ok(()) => Ok(done(ReadData::Buffer)),
            Err(e) => {
                drain(&s.pipe);
                Err(e)
            }
        };
    }
    for run in &s.runs {
        count(st, run);
        let (ring_read, file, pos) = source_of(sh, run);
        let len = run.len as usize;
        let user_copy = buf.user_copy(run.buf_off);
        let mut way = choose(RunFacts {
            zero: run.source == ReadSource::Zero,
            registered: matches!(buf, RequestBuf::Registered { .. }),
            user_copy: user_copy.is_some(),
            single,
            leave,
            mapped: file.is_mapped(),
            kernel_mapped: file.is_mapped_for_kernel(),
        });
        loop {
            let index = match &buf {
                RequestBuf::Registered { index, .. } => *index,
                RequestBuf::Memory(_) => 0,
            };
            match way {
                Transfer::FillZeros => {
                    if let RequestBuf::Memory(b) = &mut buf {
                        let dst = &mut b[run.buf_off..][..len];
                        dst.fill(0);
                        if pieces {
                            add_piece(&mut s.pieces, dst.as_ptr() as usize, len);
                        }
                    }
                }
                Transfer::ZerosFromDevice | Transfer::RingFixed => {
                    // The request's pages are out of `inline`'s reach: a
                    // run the page cache holds is read through it.
                    let fd = match (way, ring_read.direct(file, pos, run.len, None)) {
                        (Transfer::ZerosFromDevice, _) => ZERO_FD,
                        (_, true) => BASE_DIRECT_FD,
                        (_, false) => ring_read.cached_fd(),
                    };
                    let op = Op::ReadFixed {
                        fd,
                        index,
                        at: run.buf_off,
                        len: len as u32,
                        pos,
                    };
                    pending.push(PendingOp::push(q, op, len as u32));
                }
                Transfer::CommitMapping => match file.mapped_for_kernel(pos, len) {
                    Some(at) => {
                        Stats::add(&st.reads_from_mapping, 1);
                        return Ok(done(ReadData::Mapped(at)));
                    }
                    None => {
                        way = way.fallback();
                        continue;
                    }
                },
                Transfer::LeaveMapped => match file.mapped_for_kernel(pos, len) {
                    Some(at) => {
                        Stats::add(&st.reads_from_mapping, 1);
                        add_piece(&mut s.pieces, at as usize, len);
                    }
                    None => {
                        way = way.fallback();
                        continue;
                    }
                },
                Transfer::ToBuffer => {
                    if let RequestBuf::Memory(b) = &mut buf {
                        let dst = &mut b[run.buf_off..][..len];
                        if pieces {
                            add_piece(&mut s.pieces, dst.as_ptr() as usize, len);
                        }
                        match helper.as_ref().and_then(|_| file.mapped(pos, len)) {
                            Some(from) => aside.push(Piece {
                                from,
                                to: dst.as_mut_ptr(),
                                len,
                            }),
                            None => pending.extend(read_op(q, ring_read, file, pos, dst)),
                        }
                    }
                }
                Transfer::Splice => {
                    match pipe_read(q, &s.pipe, file, pos, index, run.buf_off, len as u32) {
                        Some(op) => {
                            Stats::add(&st.reads_from_mapping, 1);
                            Stats::add(&st.reads_spliced, 1);
                            spliced = true;
                            pending.push(op);
                        }
                        None => {
                            way = way.fallback();
                            continue;
                        }
                    }
                }
                Transfer::UserCopy => {
                    let to = user_copy.expect("chosen only with user copy");
                    if file.copy_to_request(pos, len, to) == Some(true) {
                        Stats::add(&st.reads_from_mapping, 1);
                    } else {
                        way = way.fallback();
                        continue;
                    }
                }
            }
            break;
        }
    }
    let copying = match &helper {
        Some((copier, done)) if !aside.is_empty() => {
            Stats::add(&st.reads_copied_by_helper, 1);
            // SAFETY: each piece's source lies in a mapping of one of
            // `sh`'s files, its pages made present (`mapped`), which lives
            // while `sh` is borrowed here; each destination is its own run
            // of `buf`, borrowed here too, which nothing else writes. The
            // copy is waited for below (or by its drop) before either
            // borrow ends.
            Some(unsafe { copier.start(Work::Gather(aside), done) })
        }
        _ => None,
    };
    let r = finish_all(q, pending).await;
    if let Some(c) = copying {
        // A gather cannot fail.
        let _ = c.wait(q).await;
    }
    if r.is_err()
        && spliced
        && let Some(Some(p)) = s.pipe.get()
    {
        // What the failed read left in the pipe would reach the next one.
        p.drain();
    }
    let data = if pieces {
        ReadData::Pieces
    } else {
        ReadData::Buffer
    };
    r.map(|()| done(data))
}

/// Adds the piece `(at, len)` to `pieces`, into the last one when it
/// continues it in memory.
fn add_piece(pieces: &mut Vec<(usize, usize)>, at: usize, len: usize) {
    match pieces.last_mut() {
        Some((last, n)) if *last + *n == at => *n += len,
        _ => pieces.push((at, len)),
    }
}

/// Counts run `run` of a READ in the device's statistics.
fn count(st: &Stats, run: &ReadRun) {
    let (ops, bytes) = match run.source {
        ReadSource::Zero => (&st.read_zero_ops, &st.read_zero_bytes),
        ReadSource::Base => (&st.read_base_ops, &st.read_base_bytes),
        ReadSource::Layer(_) => (&st.read_layer_ops, &st.read_layer_bytes),
        ReadSource::Overlay => (&st.read_overlay_ops, &st.read_overlay_bytes),
    };
    Stats::add(ops, 1);
    Stats::add(bytes, run.len);
}

/// Where run `run` of a READ is read from: how the ring reads it, the
/// inline I/O of its file, and its position in that file.
fn source_of<'a>(sh: &'a ServedDevice, run: &ReadRun) -> (RingRead<'a>, &'a MemoryPath, u64) {
    match run.source {
        ReadSource::Zero => (RingRead::Cached(ZERO_FD), &sh.base_io, 0),
        ReadSource::Base => {
            let ring_read = match sh.direct_align() {
                Some(a) => RingRead::DirectBase(a, &sh.stats.read_base_direct_ops),
                None => RingRead::Cached(BASE_FD),
            };
            (ring_read, &sh.base_io, run.off)
        }
        ReadSource::Layer(k) => {
            let pos = sh.layer_pos(k, run.off);
            (RingRead::Cached(layer_fd(k)), &sh.layer_io[k], pos)
        }
        ReadSource::Overlay => {
            let pos = sh.dev.overlay().data_pos(run.off);
            (RingRead::Cached(OVERLAY_FD), &sh.overlay_io, pos)
        }
    }
}

/// The most bytes a tag's pipe is asked to hold: the largest request
/// (`params`: 1 MiB) in pieces that may each start and end inside a page.
const PIPE_BYTES: usize = 2 << 20;

/// The tag's pipe, made (as large as `PIPE_BYTES`, if the system allows)
/// on first use; `None` if it could not be.
fn tag_pipe(pipe: &OnceCell<Option<Pipe>>) -> Option<&Pipe> {
    pipe.get_or_init(|| Pipe::with_capacity(PIPE_BYTES).ok())
        .as_ref()
}

/// Empties the tag's pipe after a failed read from it: what it left there
/// would reach the next one.
fn drain(pipe: &OnceCell<Option<Pipe>>) {
    if let Some(Some(p)) = pipe.get() {
        p.drain();
    }
}

/// The pages a pipe takes to hold `pieces` (`(address, length)`).
fn pages_held(pieces: &[(usize, usize)]) -> usize {
    const PAGE: usize = 4096;
    pieces
        .iter()
        .map(|&(at, len)| (at + len).div_ceil(PAGE) - at / PAGE)
        .sum()
}

/// With zero copy, a READ of several runs, or of one run larger than
/// `USER_COPY_MAX`, whose runs all lie in mappings (no zeros, every file
/// in memory): the tag's pipe holds every run, in order, from one
/// `vmsplice`, and one fixed-buffer read takes them all into the request,
/// pushed and returned. One copy per byte, the kernel's `memcpy` from the
/// pipe's pages, on this thread, where each run's own fixed-buffer read
/// from its file would go to an io_uring worker. `None` when a run is not
/// mapped or the pipe cannot hold them all; each run then takes its own
/// way.
fn pipe_read_all<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    runs: &[ReadRun],
    pipe: &OnceCell<Option<Pipe>>,
    index: u16,
    len: u32,
) -> Option<PendingOp<R>> {
    let mut pieces = Vec::with_capacity(runs.len());
    for run in runs {
        if run.source == ReadSource::Zero {
            return None;
        }
        let (_, file, pos) = source_of(sh, run);
        pieces.push((file.mapped_at(pos, run.len as usize)?, run.len as usize));
    }
    let pipe = tag_pipe(pipe)?;
    if pages_held(&pieces) * 4096 > pipe.capacity() || pipe.hold(&pieces).is_err() {
        return None;
    }
    let op = Op::ReadFixedFromPipe {
        fd: pipe.read_end(),
        index,
        at: 0,
        len,
    };
    Some(PendingOp::push(q, op, len))
}

/// With zero copy, a READ of one small run (`request_buf::USER_COPY_MAX`)
/// that lies in a mapping: the tag's pipe holds the run's pages
/// (`vmsplice`), and a fixed-buffer read takes them into the request at
/// `at`, pushed and returned. The read finds its bytes in the pipe and
/// completes at once, on this thread. `None` when the file is not mapped or
/// the pipe is not to be had; user copy then does it.
fn pipe_read<R: Ring>(
    q: &R,
    pipe: &OnceCell<Option<Pipe>>,
    reader: &MemoryPath,
    pos: u64,
    index: u16,
    at: usize,
    len: u32,
) -> Option<PendingOp<R>> {
    let pipe = tag_pipe(pipe)?;
    if !reader.splice_to(pos, len as usize, pipe) {
        return None;
    }
    let op = Op::ReadFixedFromPipe {
        fd: pipe.read_end(),
        index,
        at,
        len,
    };
    Some(PendingOp::push(q, op, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> RunFacts {
        RunFacts {
            zero: false,
            registered: false,
            user_copy: false,
            single: true,
            leave: MayLeave::OneMapping,
            mapped: true,
            kernel_mapped: true,
        }
    }

    #[test]
    fn copy_mode_commits_a_lone_mapped_run_and_buffers_the_rest() {
        assert_eq!(choose(facts()), Transfer::CommitMapping);
        let f = RunFacts {
            single: false,
            ..facts()
        };
        assert_eq!(choose(f), Transfer::ToBuffer);
        let f = RunFacts {
            leave: MayLeave::Nothing,
            ..facts()
        };
        assert_eq!(choose(f), Transfer::ToBuffer, "a READ to be copied in");
        let f = RunFacts {
            mapped: false,
            kernel_mapped: false,
            ..facts()
        };
        assert_eq!(choose(f), Transfer::ToBuffer);
        let f = RunFacts {
            zero: true,
            ..facts()
        };
        assert_eq!(choose(f), Transfer::FillZeros);
        assert_eq!(Transfer::CommitMapping.fallback(), Transfer::ToBuffer);
    }

    #[test]
    fn user_copy_leaves_every_mapped_run_where_it_is() {
        let runs = |f| RunFacts {
            leave: MayLeave::Runs,
            ..f
        };
        assert_eq!(choose(runs(facts())), Transfer::LeaveMapped);
        let f = RunFacts {
            single: false,
            ..facts()
        };
        assert_eq!(choose(runs(f)), Transfer::LeaveMapped, "one of several");
        let f = RunFacts {
            mapped: false,
            kernel_mapped: false,
            ..facts()
        };
        assert_eq!(choose(runs(f)), Transfer::ToBuffer);
        let f = RunFacts {
            zero: true,
            ..facts()
        };
        assert_eq!(choose(runs(f)), Transfer::FillZeros);
        assert_eq!(Transfer::LeaveMapped.fallback(), Transfer::ToBuffer);
    }

    /// A file on a device is named to the kernel (ublk's commit, user
    /// copy's `pwritev`) for ranges its page cache holds, and never read
    /// through its mapping by this process (a splice or a copy here).
    #[test]
    fn a_file_on_a_device_is_left_only_to_the_kernels_copies() {
        let on_device = RunFacts {
            mapped: false,
            ..facts()
        };
        assert_eq!(choose(on_device), Transfer::CommitMapping);
        let f = RunFacts {
            leave: MayLeave::Runs,
            single: false,
            ..on_device
        };
        assert_eq!(choose(f), Transfer::LeaveMapped);
        let f = RunFacts {
            single: false,
            ..on_device
        };
        assert_eq!(choose(f), Transfer::ToBuffer, "the helper copies here");
        let f = RunFacts {
            registered: true,
            user_copy: true,
            ..on_device
        };
        assert_eq!(choose(f), Transfer::RingFixed);
    }

    #[test]
    fn pieces_that_continue_one_another_are_one() {
        let mut p = Vec::new();
        add_piece(&mut p, 4096, 4096);
        add_piece(&mut p, 8192, 512);
        add_piece(&mut p, 65536, 4096);
        add_piece(&mut p, 4096, 4096);
        assert_eq!(p, [(4096, 4608), (65536, 4096), (4096, 4096)]);
    }

    #[test]
    fn a_pipe_takes_a_page_for_each_page_a_piece_touches() {
        assert_eq!(pages_held(&[]), 0);
        assert_eq!(pages_held(&[(4096, 4096), (8192, 8192)]), 3);
        assert_eq!(pages_held(&[(4096 + 512, 4096)]), 2);
        assert_eq!(pages_held(&[(100, 10), (4000, 200)]), 3);
        // The largest request, each of its runs starting inside a page.
        let worst: Vec<_> = (0..256).map(|i| (i * 8192 + 512, 4096)).collect();
        assert!(pages_held(&worst) * 4096 <= PIPE_BYTES);
    }

    #[test]
    fn zero_copy_splices_small_mapped_runs_and_reads_the_rest_by_the_ring() {
        let zc = RunFacts {
            registered: true,
            user_copy: true,
            ..facts()
        };
        assert_eq!(choose(zc), Transfer::Splice);
        assert_eq!(Transfer::Splice.fallback(), Transfer::UserCopy);
        assert_eq!(Transfer::UserCopy.fallback(), Transfer::RingFixed);
        let f = RunFacts {
            single: false,
            ..zc
        };
        assert_eq!(choose(f), Transfer::UserCopy, "one pipe holds one run");
        let f = RunFacts {
            user_copy: false,
            ..zc
        };
        assert_eq!(choose(f), Transfer::RingFixed, "a large request");
        let f = RunFacts {
            mapped: false,
            kernel_mapped: false,
            ..zc
        };
        assert_eq!(choose(f), Transfer::RingFixed);
        let f = RunFacts { zero: true, ..zc };
        assert_eq!(choose(f), Transfer::ZerosFromDevice);
    }
}
