//! READ: the plan's runs read from the base, the overlay or zeros, into the
//! request; or, for one run in a mapped file, left where it is for ublk to
//! copy at the commit (`ReadDone::Mapped`).

use super::{BASE_DIRECT_FD, BASE_FD, OVERLAY_FD, RingRead, TagScratch, ZERO_FD, read_op};
use crate::engine::plan::{self, ReadSource};
use crate::stats::Stats;
use crate::sys::Pipe;
use crate::ublk::ServedDevice;
use crate::ublk::inline::MemoryPath;
use crate::ublk::ops::{Op, PendingOp, Ring, finish_all};
use crate::ublk::request_buf::RequestBuf;
use std::cell::OnceCell;

/// Where a READ left its data.
pub enum ReadDone {
    /// In the request buffer; or the READ failed (a negative errno).
    Buffer(i32),
    /// All of it is in one mapped file, at this address. ublk copies it into
    /// the request from there when the READ is committed: one copy instead
    /// of two.
    Mapped(*const u8),
}

/// READ of `buf.len()` bytes at `off`. With `may_map`, data in the
/// daemon's memory that lies in one mapped run is left where it is
/// (`ReadDone::Mapped`).
pub async fn read<R: Ring>(
    q: &R,
    sh: &ServedDevice,
    s: &mut TagScratch,
    off: u64,
    mut buf: RequestBuf<'_>,
    may_map: bool,
) -> ReadDone {
    let dev = &sh.dev;
    plan::plan_read(
        dev.map(),
        dev.geometry(),
        off,
        buf.len() as u64,
        &mut s.runs,
    );
    let mut pending = Vec::with_capacity(s.runs.len());
    let single = s.runs.len() == 1;
    let mut spliced = false;
    for run in &s.runs {
        let st = &sh.stats;
        let (miss, reader, pos) = match run.source {
            ReadSource::Zero => {
                Stats::add(&st.read_zero_ops, 1);
                Stats::add(&st.read_zero_bytes, run.len);
                match &mut buf {
                    RequestBuf::Memory(b) => b[run.buf_off..][..run.len as usize].fill(0),
                    RequestBuf::Registered { index, .. } => {
                        let len = run.len as u32;
                        let op = Op::ReadFixed {
                            fd: ZERO_FD,
                            index: *index,
                            at: run.buf_off,
                            len,
                            pos: 0,
                        };
                        pending.push(PendingOp::push(q, op, len));
                    }
                }
                continue;
            }
            ReadSource::Base => {
                Stats::add(&st.read_base_ops, 1);
                Stats::add(&st.read_base_bytes, run.len);
                let miss = match sh.direct_align() {
                    Some(a) => RingRead::DirectBase(a, &st.read_base_direct_ops),
                    None => RingRead::Cached(BASE_FD),
                };
                (miss, &sh.base_io, run.off)
            }
            ReadSource::Overlay => {
                Stats::add(&st.read_overlay_ops, 1);
                Stats::add(&st.read_overlay_bytes, run.len);
                let pos = dev.overlay().data_pos(run.off);
                (RingRead::Cached(OVERLAY_FD), &sh.overlay_io, pos)
            }
        };
        let user_copy = buf.user_copy(run.buf_off);
        let dst = match &mut buf {
            RequestBuf::Memory(b) => &mut b[run.buf_off..][..run.len as usize],
            RequestBuf::Registered { index, .. } => {
                let len = run.len as u32;
                if user_copy.is_some()
                    && single
                    && let Some(op) = pipe_read(q, &s.pipe, reader, pos, *index, run.buf_off, len)
                {
                    Stats::add(&st.reads_from_mapping, 1);
                    Stats::add(&st.reads_spliced, 1);
                    spliced = true;
                    pending.push(op);
                    continue;
                }
                if let Some(to) = user_copy
                    && reader.copy_to_request(pos, len as usize, to) == Some(true)
                {
                    Stats::add(&st.reads_from_mapping, 1);
                    continue;
                }
                // The request's pages are out of `inline`'s reach: a run
                // the page cache holds is read through it.
                let fd = if miss.direct(reader, pos, len as u64, None) {
                    BASE_DIRECT_FD
                } else {
                    miss.cached_fd()
                };
                let op = Op::ReadFixed {
                    fd,
                    index: *index,
                    at: run.buf_off,
                    len,
                    pos,
                };
                pending.push(PendingOp::push(q, op, len));
                continue;
            }
        };
        if may_map
            && s.runs.len() == 1
            && let Some(at) = reader.mapped(pos, dst.len())
        {
            Stats::add(&st.reads_from_mapping, 1);
            return ReadDone::Mapped(at);
        }
        pending.extend(read_op(q, miss, reader, pos, dst));
    }
    let r = finish_all(q, pending).await;
    if r != 0
        && spliced
        && let Some(Some(p)) = s.pipe.get()
    {
        // What the failed read left in the pipe would reach the next one.
        p.drain();
    }
    ReadDone::Buffer(match r {
        0 => buf.len() as i32,
        e => e,
    })
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
    reader.mapped(pos, len as usize)?;
    let pipe = pipe.get_or_init(|| Pipe::new().ok()).as_ref()?;
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
