//! One queue: its thread runs a local executor with one task per tag. A task
//! fetches a request, dispatches it by operation to `exec`, and commits the
//! result, forever, until the queue goes down.

use crate::engine::cache::CacheMode;
use crate::engine::plan::ReadSource;
use crate::engine::readahead::Detector;
use crate::stats::{CacheSource, Stats};
use crate::target::background::{self, Background, Job};
use crate::target::exec::{self, QueueBufs, Shared, TagScratch};
use libublk::helpers::IoBuf;
use libublk::io::{BufDesc, UblkDev, UblkQueue};
use libublk::{UblkError, sys};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// A request as ublk describes it.
struct Request {
    op: u32,
    flags: u32,
    off: u64,
    len: u64,
}

impl Request {
    fn of(q: &UblkQueue<'_>, tag: u16) -> Request {
        let iod = q.get_iod(tag);
        Request {
            op: iod.op_flags & 0xff,
            // The UBLK_IO_F_* flags are defined at their bit positions in
            // op_flags (FAILFAST_DEV is 1 << 8, FUA 1 << 13).
            flags: iod.op_flags & !0xff,
            off: iod.start_sector << 9,
            len: (iod.nr_sectors as u64) << 9,
        }
    }
}

/// What a queue's tasks share besides the device.
pub struct QueueState {
    bufs: QueueBufs,
    detector: RefCell<Detector>,
    background: Background,
}

/// All three fail-fast bits: blk-mq sets them on readahead bios.
const READAHEAD_FLAGS: u32 = sys::UBLK_IO_F_FAILFAST_DEV
    | sys::UBLK_IO_F_FAILFAST_TRANSPORT
    | sys::UBLK_IO_F_FAILFAST_DRIVER;

/// After a READ: queue the prefetch it calls for, and the copy of the base
/// data it read if the policy installs such data (copy-on-readahead with the
/// `cow` mode for kernel hints; `--cow-on-read` for every read).
fn after_read(sh: &Shared, qs: &QueueState, s: &TagScratch, req: &Request, buf: &[u8]) {
    let hinted = req.flags & READAHEAD_FLAGS == READAHEAD_FLAGS;
    if hinted {
        Stats::add(&sh.stats.readahead_flagged_reads, 1);
    }
    let ahead = {
        let mut d = qs.detector.borrow_mut();
        if hinted {
            d.on_hint(req.off, req.len)
        } else {
            d.on_read(req.off, req.len)
        }
    };
    let source = if hinted {
        CacheSource::KernelHint
    } else {
        CacheSource::Detector
    };
    if let Some((off, len)) = ahead {
        let len = len.min(sh.dev.geometry().size().saturating_sub(off));
        if len > 0 {
            qs.background.push(Job::Cache { off, len }, source, sh);
        }
    }
    let install = sh.policy.cow_on_read || (hinted && sh.policy.mode == CacheMode::Cow);
    let bs = sh.dev.geometry().block_size() as u64;
    if install
        && s.runs()
            .iter()
            .any(|r| r.source == ReadSource::Base && r.len >= bs)
    {
        let source = if sh.policy.cow_on_read {
            CacheSource::CowOnRead
        } else {
            CacheSource::KernelHint
        };
        let job = Job::Install {
            off: req.off,
            data: buf[..req.len as usize].to_vec(),
        };
        qs.background.push(job, source, sh);
    }
}

/// Carries out one request; returns bytes done or a negative errno.
async fn handle(
    q: &UblkQueue<'_>,
    sh: &Shared,
    qs: &QueueState,
    s: &mut TagScratch,
    req: Request,
    buf: &mut [u8],
) -> i32 {
    let qb = &qs.bufs;
    let geo = sh.dev.geometry();
    if req.op != sys::UBLK_IO_OP_FLUSH && geo.check_range(req.off, req.len).is_err() {
        return -libc::EINVAL;
    }
    match req.op {
        sys::UBLK_IO_OP_READ => {
            let r = exec::read(q, sh, s, req.off, &mut buf[..req.len as usize]).await;
            if r >= 0 {
                after_read(sh, qs, s, &req, buf);
            }
            r
        }
        sys::UBLK_IO_OP_WRITE => {
            let r = exec::write(q, sh, qb, s, req.off, &buf[..req.len as usize]).await;
            if r >= 0 && req.flags & sys::UBLK_IO_F_FUA != 0 {
                match exec::flush(q, sh).await {
                    0 => r,
                    e => e,
                }
            } else {
                r
            }
        }
        sys::UBLK_IO_OP_FLUSH => exec::flush(q, sh).await,
        sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {
            exec::write_zeroes(q, sh, qb, s, req.off, req.len).await
        }
        _ => -libc::EINVAL,
    }
}

async fn tag_task(
    q: Rc<UblkQueue<'_>>,
    tag: u16,
    sh: Arc<Shared>,
    qs: Rc<QueueState>,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    let mut scratch = TagScratch::default();
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let req = Request::of(&q, tag);
        let res = handle(&q, &sh, &qs, &mut scratch, req, buf.as_mut_slice()).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// The body of queue thread `qid`: returns when the device stops.
pub fn run_queue(qid: u16, dev: &UblkDev, sh: Arc<Shared>) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            log::error!("queue {qid}: setup failed: {e}");
            return;
        }
    };
    let bs = sh.dev.geometry().block_size();
    let qs = Rc::new(QueueState {
        bufs: QueueBufs::new(bs),
        detector: RefCell::new(Detector::new(sh.policy.readahead, bs)),
        background: Background::default(),
    });
    let exe = Rc::new(smol::LocalExecutor::new());
    let worker = {
        let (q, sh, qs) = (q.clone(), sh.clone(), qs.clone());
        exe.spawn(async move { background::worker(&q, &sh, &qs.background).await })
    };
    let tasks: Vec<_> = q
        .tags()
        .map(|tag| {
            let fut = tag_task(q.clone(), tag, sh.clone(), qs.clone());
            exe.spawn(async move {
                match fut.await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => log::error!("queue {qid} tag {tag}: {e}"),
                }
            })
        })
        .collect();
    let exe2 = exe.clone();
    smol::block_on(exe.run(async move {
        let run_ops = || while exe2.try_tick() {};
        // Background work must finish too: its operations use its buffers.
        let done = || tasks.iter().all(|t| t.is_finished()) && qs.background.idle();
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            log::error!("queue {qid}: {e}");
        }
        drop(worker);
    }));
}
