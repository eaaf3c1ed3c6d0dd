//! One queue: its thread runs a local executor with one task per tag. A task
//! fetches a request, dispatches it by operation to `exec`, and commits the
//! result, forever, until the queue goes down.

use crate::target::exec::{self, QueueBufs, Shared, TagScratch};
use libublk::helpers::IoBuf;
use libublk::io::{BufDesc, UblkDev, UblkQueue};
use libublk::{UblkError, sys};
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
            flags: iod.op_flags >> 8,
            off: iod.start_sector << 9,
            len: (iod.nr_sectors as u64) << 9,
        }
    }
}

/// Carries out one request; returns bytes done or a negative errno.
async fn handle(
    q: &UblkQueue<'_>,
    sh: &Shared,
    qb: &QueueBufs,
    s: &mut TagScratch,
    req: Request,
    buf: &mut [u8],
) -> i32 {
    let geo = sh.dev.geometry();
    if req.op != sys::UBLK_IO_OP_FLUSH && geo.check_range(req.off, req.len).is_err() {
        return -libc::EINVAL;
    }
    match req.op {
        sys::UBLK_IO_OP_READ => exec::read(q, sh, s, req.off, &mut buf[..req.len as usize]).await,
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
    qb: Rc<QueueBufs>,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    let mut scratch = TagScratch::default();
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let req = Request::of(&q, tag);
        let res = handle(&q, &sh, &qb, &mut scratch, req, buf.as_mut_slice()).await;
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
    let qb = Rc::new(QueueBufs::new(sh.dev.geometry().block_size()));
    let exe = Rc::new(smol::LocalExecutor::new());
    let tasks: Vec<_> = q
        .tags()
        .map(|tag| {
            let fut = tag_task(q.clone(), tag, sh.clone(), qb.clone());
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
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            log::error!("queue {qid}: {e}");
        }
    }));
}
