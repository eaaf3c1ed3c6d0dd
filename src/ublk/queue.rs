//! One queue: its thread runs a local executor with one task per tag. A task
//! fetches a request, passes the device's gate (held closed while a live
//! snapshot swaps the device, see `current`), dispatches it by operation to
//! `exec`, and commits the result, forever, until the queue goes down. The ublk commands of a tag
//! (fetch, commit, NEED_GET_DATA) are all sent and answered here.
//!
//! With zero copy (`params::IoMode`) ublk registers each request's pages as
//! the tag's fixed buffer, and its commit names that buffer again. In copy
//! mode a WRITE arrives without its data (the device sets
//! `UBLK_F_NEED_GET_DATA`); the write path says where ublk copies it
//! (`write_data`). A READ's commit names where ublk copies its data from:
//! the tag's buffer, or the mapping that holds all of it. With user copy
//! ublk copies nothing itself: the daemon copies a WRITE's data out of the
//! request (`write_data`) and a READ's into it (`copy_read_out`: each run
//! from the mapping or buffer that holds it, in one `pwritev`) before the
//! commit, which names no address.

use crate::engine::Errno;
use crate::engine::after_read::{self, CompletedRead};
use crate::engine::gate::Pass;
use crate::engine::readahead::Detector;
use crate::stats::Stats;
use crate::ublk::background::{Background, Job};
use crate::ublk::copier::{Copier, Work};
use crate::ublk::exec::{self, Fua, MayLeave, ReadData, ReadDone, SyncsOn, TagScratch, ZeroBlocks};
use crate::ublk::ops::{Op, Ring};
use crate::ublk::params::{self, IoMode};
use crate::ublk::request_buf::{RequestBuf, TagBuf, UserCopy, UserCopyAt};
use crate::ublk::write_data::WriteData;
use crate::ublk::{Current, ServedDevice};
use libublk::helpers::IoBuf;
use libublk::io::{BufDesc, UblkDev, UblkQueue};
use libublk::{UblkError, sys};
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

/// A request as ublk describes it.
struct Request {
    tag: u16,
    /// A WRITE whose data ublk still holds (see `write_data`).
    data_pending: bool,
    op: u32,
    flags: u32,
    off: u64,
    len: u64,
}

impl Request {
    fn of(q: &UblkQueue<'_>, tag: u16, data_pending: bool) -> Request {
        let iod = q.get_iod(tag);
        Request {
            tag,
            data_pending,
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
pub(crate) struct QueueState {
    /// A READ's commit may name a mapping to copy from: the device fetches
    /// a WRITE's data only when asked (`UBLK_F_NEED_GET_DATA`), so the
    /// address a commit names is never written into.
    commit_from_map: bool,
    /// How requests' data moves (`params::IoMode`).
    mode: IoMode,
    /// ublk's user copy reaches them too.
    user_copy: Option<UserCopy>,
    bufs: ZeroBlocks,
    /// The queue's copy helper (`copier_for`).
    copier: Option<Rc<Copier>>,
    detector: RefCell<Detector>,
    /// READs of this queue being served (for the detector: a reader that
    /// keeps several in flight reads ahead itself).
    reads_in_flight: Cell<u32>,
    /// Requests of this queue being served (`Serving`): a request alone
    /// makes its syncs on the queue's thread (`exec::SyncsOn`).
    serving: Cell<u32>,
    background: Background,
    qid: u16,
    /// The device served now, and its gate (see `current`).
    current: Arc<Current>,
    /// The device this queue's requests use: `current`'s as of `epoch`.
    /// A request clones the `Rc`, not the `Arc`, whose count every queue's
    /// thread would write.
    #[allow(clippy::redundant_allocation)]
    sh: RefCell<Rc<Arc<ServedDevice>>>,
    epoch: Cell<u64>,
    /// A task of this queue reads its eventfd, waiting for the gate to
    /// open; the others wait in `parked` for it.
    watching: Cell<bool>,
    parked: RefCell<Vec<Waker>>,
}

impl QueueState {
    /// The device this queue's requests use now.
    #[allow(clippy::redundant_allocation)]
    fn device(&self) -> Rc<Arc<ServedDevice>> {
        self.sh.borrow().clone()
    }

    /// Waits until the device's gate lets work of this queue pass. The
    /// first to pass after a live snapshot's swap takes the new device for
    /// the whole queue, before anything of the queue uses it.
    async fn pass(&self, q: &UblkQueue<'_>) -> Pass<'_> {
        loop {
            if let Some(p) = self.current.try_pass(self.qid) {
                if self.epoch.get() != self.current.epoch() {
                    self.take_new_device();
                }
                return p;
            }
            self.wait_open(q).await;
        }
    }

    /// Takes the device a live snapshot swapped in: the ring's fixed files
    /// name its files from now on, and background work queued for the old
    /// one is dropped (a copy read from the old device must not land in
    /// the new one's map, where a write since the read is not seen). The
    /// readahead detector starts afresh: what it had asked for was dropped
    /// with that work, and the new chain's files decide its window.
    fn take_new_device(&self) {
        let sh = self.current.device();
        let files = sh.ring_files(self.current.zero()).table();
        let updated = libublk::io::with_task_io_ring(|ring| {
            ring.submitter()
                .register_files_update(exec::FIRST_FILE, &files)
        });
        if let Err(e) = updated {
            // The panic ends the daemon; the device waits for `recover`,
            // which serves the new chain that the state file names.
            panic!(
                "queue {}: pointing the ring at the new overlay's files: {e}",
                self.qid
            );
        }
        self.background.clear();
        let bs = sh.dev.geometry().block_size();
        *self.detector.borrow_mut() = Detector::new(sh.readahead(), bs);
        *self.sh.borrow_mut() = Rc::new(sh);
        self.epoch.set(self.current.epoch());
    }

    /// Waits until the gate is open: one task of the queue reads the
    /// queue's eventfd on the ring (its thread never blocks), the others
    /// park until it saw the gate open.
    async fn wait_open(&self, q: &UblkQueue<'_>) {
        if self.watching.replace(true) {
            poll_fn(|cx| {
                if self.watching.get() {
                    self.parked.borrow_mut().push(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            return;
        }
        let mut counter = Box::new(0u64);
        while self.current.is_paused() {
            let wait = Op::ReadEvent {
                fd: self.current.opened_fd(self.qid),
                to: &mut *counter,
            };
            // `counter` stays in place until the read completes: awaited.
            let r = q.push(wait).await;
            if r < 0 && r != -libc::EINTR && r != -libc::EAGAIN {
                // The ring cannot read it: look again in a millisecond.
                let ts = io_uring::types::Timespec::new().nsec(1_000_000);
                q.push(Op::Timeout(&ts)).await;
            }
        }
        self.watching.set(false);
        for w in self.parked.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

/// All three fail-fast bits: blk-mq sets them on readahead bios.
const READAHEAD_FLAGS: u32 = sys::UBLK_IO_F_FAILFAST_DEV
    | sys::UBLK_IO_F_FAILFAST_TRANSPORT
    | sys::UBLK_IO_F_FAILFAST_DRIVER;

impl Request {
    /// The kernel marked this READ as readahead.
    fn hinted(&self) -> bool {
        self.flags & READAHEAD_FLAGS == READAHEAD_FLAGS
    }
}

/// After a READ: the prefetch and the copy into the overlay that the
/// policy asks for (`engine::after_read`), queued for the background.
fn after_read(
    sh: &ServedDevice,
    qs: &QueueState,
    done: &ReadDone,
    req: &Request,
    buf: &RequestBuf<'_>,
) {
    let hinted = req.hinted();
    if hinted {
        Stats::add(&sh.stats.readahead_flagged_reads, 1);
    }
    let read = CompletedRead {
        off: req.off,
        len: req.len,
        hinted,
        others_in_flight: qs.reads_in_flight.get() > 0,
        read_base_block: done.read_base_block,
    };
    let size = sh.dev.geometry().size();
    let todo = after_read::after_read(&sh.policy, &mut qs.detector.borrow_mut(), size, &read);
    Stats::add(&sh.stats.prefetch_read_bytes, todo.read_ahead);
    if let Some((off, len, source)) = todo.prefetch {
        qs.background.push(Job::Cache { off, len }, source, sh);
    }
    if let Some(source) = todo.install {
        let job = match buf {
            RequestBuf::Memory(b) => Job::Install {
                off: req.off,
                data: b.to_vec(),
            },
            RequestBuf::Registered { .. } => Job::InstallFromBase {
                off: req.off,
                len: req.len,
            },
        };
        qs.background.push(job, source, sh);
    }
}

/// A request counted in `QueueState::serving` from when its task begins
/// to serve it until its result is ready.
struct Serving<'a>(&'a Cell<u32>);

impl<'a> Serving<'a> {
    fn begin(n: &'a Cell<u32>) -> Serving<'a> {
        n.set(n.get() + 1);
        Serving(n)
    }

    /// Where the request's syncs run: on the queue's thread when no other
    /// request of the queue is being served as it begins. Requests that
    /// arrive together begin one after another, so the first of a burst
    /// after a quiet spell may take the thread: the others then wait for
    /// one sync.
    fn syncs(&self) -> SyncsOn {
        match self.0.get() {
            1 => SyncsOn::Thread,
            _ => SyncsOn::Ring,
        }
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// What a request's commit tells ublk.
struct Commit {
    /// Bytes done, or a negative errno.
    res: i32,
    /// Where a READ's data is, when not in the tag's buffer.
    from: Option<*const u8>,
}

impl Commit {
    /// A request that did `n` (bytes, or 0 for a FLUSH or DISCARD), or
    /// failed: the result as ublk takes it, a negative errno for a failure.
    fn of(r: Result<(), Errno>, n: u64) -> Commit {
        let res = match r {
            Ok(()) => n as i32,
            Err(e) => e.negative(),
        };
        Commit { res, from: None }
    }
}

/// Carries out one request. `Err` when the tag can serve no more requests.
async fn handle(
    q: &UblkQueue<'_>,
    sh: &ServedDevice,
    qs: &QueueState,
    s: &mut TagScratch,
    req: Request,
    buf: &mut TagBuf,
) -> Result<Commit, UblkError> {
    let serving = Serving::begin(&qs.serving);
    let qb = &qs.bufs;
    let geo = sh.dev.geometry();
    let in_range = req.op == sys::UBLK_IO_OP_FLUSH || geo.check_range(req.off, req.len).is_ok();
    let commit = match req.op {
        // This arm must stay before the range check below: ublk takes the
        // commit of a WRITE only once its data was asked for, so even a
        // WRITE refused for its range settles its data first.
        sys::UBLK_IO_OP_WRITE => {
            let copied_at = buf.copied_at();
            let buf = buf.request(req.len as usize);
            let mut data = WriteData::request(q, req.tag, buf, req.data_pending, copied_at);
            let fua = match req.flags & sys::UBLK_IO_F_FUA != 0 {
                true => Fua::Yes(serving.syncs()),
                false => Fua::No,
            };
            let r = if in_range {
                exec::write_request(q, sh, qb, s, req.off, &mut data, fua).await
            } else {
                Err(Errno::EINVAL)
            };
            data.settle().await?;
            Commit::of(r, req.len)
        }
        _ if !in_range => Commit::of(Err(Errno::EINVAL), 0),
        sys::UBLK_IO_OP_READ => {
            let copied_at = buf.copied_at();
            // An install copies the data from the buffer.
            let leave = match (after_read::installs(&sh.policy, req.hinted()), copied_at) {
                (true, _) => MayLeave::Nothing,
                (false, Some(_)) => MayLeave::Runs,
                (false, None) if qs.commit_from_map => MayLeave::OneMapping,
                (false, None) => MayLeave::Nothing,
            };
            let mut buf = buf.request(req.len as usize);
            let n = &qs.reads_in_flight;
            n.set(n.get() + 1);
            let done = exec::read(q, sh, s, req.off, buf.reborrow(), leave).await;
            n.set(n.get() - 1);
            match done {
                Ok(done) => {
                    after_read(sh, qs, &done, &req, &buf);
                    match (copied_at, done.data) {
                        (Some(to), data) => {
                            let sent = copy_read_out(q, sh, s, to, data, &buf).await;
                            Commit::of(sent.map_err(|e| Errno::of(&e)), req.len)
                        }
                        (None, ReadData::Mapped(at)) => Commit {
                            res: req.len as i32,
                            from: Some(at),
                        },
                        (None, _) => Commit::of(Ok(()), req.len),
                    }
                }
                Err(e) => Commit::of(Err(e), 0),
            }
        }
        sys::UBLK_IO_OP_FLUSH => Commit::of(exec::flush(q, sh, serving.syncs()).await, 0),
        sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {
            Commit::of(exec::write_zeroes(q, sh, qb, s, req.off, req.len).await, 0)
        }
        _ => Commit::of(Err(Errno::EINVAL), 0),
    };
    Ok(commit)
}

/// With user copy: copies a READ's data, wherever `exec::read` left it,
/// into the request (one `pwritev` at `to`); by the queue's copy helper
/// when the READ is large, and there is one.
async fn copy_read_out(
    q: &UblkQueue<'_>,
    sh: &ServedDevice,
    s: &TagScratch,
    to: UserCopyAt,
    data: ReadData,
    buf: &RequestBuf<'_>,
) -> std::io::Result<()> {
    let len = buf.len();
    let whole;
    let pieces = match (data, buf) {
        (ReadData::Pieces, _) => s.pieces(),
        (ReadData::Mapped(at), _) => {
            whole = [(at as usize, len)];
            &whole[..]
        }
        (ReadData::Buffer, RequestBuf::Memory(b)) => {
            whole = [(b.as_ptr() as usize, len)];
            &whole[..]
        }
        (ReadData::Buffer, RequestBuf::Registered { .. }) => {
            unreachable!("user copy mode serves from the daemon's memory")
        }
    };
    match s.helper_for(len as u64) {
        Some((copier, done)) => {
            Stats::add(&sh.stats.reads_copied_by_helper, 1);
            let work = Work::ToRequest(pieces.to_vec(), to);
            // SAFETY: the pieces lie in the tag's buffer and in mappings of
            // the device this request holds until its commit, after this
            // wait; the kernel only reads them.
            let copying = unsafe { copier.start(work, &done) };
            copying.wait(q).await
        }
        None => to.write_pieces(pieces),
    }
}

// The ublk command exchange of a tag. Every command the daemon sends to
// ublk is sent here, and every answer is read here:
//
// - `fetch`: FETCH_REQ, once, names the tag's buffer and waits for the
//   first request;
// - `commit`: COMMIT_AND_FETCH_REQ completes a request (its result, and
//   where a READ's data is) and waits for the next;
// - `get_data`: NEED_GET_DATA, in copy mode, has ublk copy a WRITE's data
//   to an address (`write_data` decides which).
//
// A FETCH or COMMIT answered with UBLK_IO_RES_NEED_GET_DATA brings a WRITE
// whose data ublk still holds; ublk takes no commit of such a WRITE before
// its data was asked for (`WriteData::settle`).

/// Sends the tag's FETCH_REQ and waits for its first request: true when it
/// is a WRITE whose data ublk still holds.
async fn fetch(q: &UblkQueue<'_>, tag: u16, buf: &TagBuf) -> Result<bool, UblkError> {
    let r = q
        .submit_io_prep_cmd(tag, buf.desc(), 0, buf.io_buf())
        .await?;
    Ok(r == sys::UBLK_IO_RES_NEED_GET_DATA as i32)
}

/// Commits the tag's request with `done` and waits for the next one: true
/// when it is a WRITE whose data ublk still holds.
async fn commit(
    q: &UblkQueue<'_>,
    tag: u16,
    buf: &TagBuf,
    done: Commit,
) -> Result<bool, UblkError> {
    let from = match done.from {
        Some(at) => BufDesc::RawAddress(at),
        None => buf.desc(),
    };
    let r = q.submit_io_commit_cmd(tag, from, done.res).await?;
    Ok(r == sys::UBLK_IO_RES_NEED_GET_DATA as i32)
}

/// What ublk did with a NEED_GET_DATA.
pub(crate) enum GetData {
    /// It copied the WRITE's data to the address.
    Copied,
    /// It could not (a page it could not fault in) and will ask again.
    Again,
    /// The queue is going down.
    QueueDown,
    /// It failed the command.
    Failed(Errno),
}

/// Sends NEED_GET_DATA for WRITE `tag`, naming `at` as where ublk copies its
/// data (the request's length), and waits.
pub(crate) async fn get_data(q: &UblkQueue<'_>, tag: u16, at: *mut u8) -> GetData {
    #[allow(deprecated)] // libublk 0.4.8 has no other call for this command
    let r = q
        .submit_io_cmd(tag, sys::UBLK_U_IO_NEED_GET_DATA, at, 0)
        .await;
    match r {
        r if r == sys::UBLK_IO_RES_OK as i32 => GetData::Copied,
        r if r == sys::UBLK_IO_RES_NEED_GET_DATA as i32 => GetData::Again,
        r if r == sys::UBLK_IO_RES_ABORT => GetData::QueueDown,
        r if r < 0 => GetData::Failed(Errno::from_negative(r)),
        _ => GetData::Failed(Errno(libc::EPROTO)),
    }
}

async fn tag_task(q: Rc<UblkQueue<'_>>, tag: u16, qs: Rc<QueueState>) -> Result<(), UblkError> {
    let memory = || IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    let mut buf = match qs.mode {
        IoMode::ZeroCopy => TagBuf::registered(tag, qs.user_copy),
        IoMode::Copy => TagBuf::Memory(memory()),
        IoMode::UserCopy => TagBuf::UserCopied {
            buf: memory(),
            at: qs
                .user_copy
                .expect("a user copy device has the flag")
                .at(tag, 0),
        },
    };
    let mut scratch = match &qs.copier {
        Some(c) => TagScratch::with_copier(c.clone()),
        None => TagScratch::default(),
    };
    let mut data_pending = fetch(&q, tag, &buf).await?;
    loop {
        let req = Request::of(&q, tag, data_pending);
        let pass = qs.pass(&q).await;
        let sh = qs.device();
        let done = handle(&q, &sh, &qs, &mut scratch, req, &mut buf).await?;
        drop(pass);
        data_pending = commit(&q, tag, &buf, done).await?;
        // Held until here: a READ's commit may name the device's mappings.
        drop(sh);
    }
}

/// The queue's background task: runs its jobs one after another, each
/// with a pass of the gate, forever.
async fn background_worker(q: &UblkQueue<'_>, qs: &QueueState) {
    loop {
        let (job, generation) = qs.background.next().await;
        let _pass = qs.pass(q).await;
        if qs.background.generation() != generation {
            // Queued for a device a snapshot swapped out: dropped.
            qs.background.dropped();
            continue;
        }
        let sh = qs.device();
        qs.background.run(q, &sh, job).await;
    }
}

/// The copy helper of queue `qid` of `queues`: in copy mode and with user
/// copy (where the daemon copies READs; with zero copy the kernel does),
/// when the machine has more CPUs than the device has queues. Without it
/// the queue's thread copies on its own.
fn copier_for(qid: u16, mode: IoMode, queues: u16) -> Option<Rc<Copier>> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if mode == IoMode::ZeroCopy || cpus <= queues as usize {
        return None;
    }
    match Copier::new(format!("ublk-cow-cp{qid}")) {
        Ok(c) => Some(Rc::new(c)),
        Err(e) => {
            log::warn!("queue {qid}: no copy helper thread ({e}): READs are copied on the queue's");
            None
        }
    }
}

/// The body of queue thread `qid`: returns when the device stops.
pub(crate) fn run_queue(qid: u16, dev: &UblkDev, current: Arc<Current>) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            log::error!("queue {qid}: setup failed: {e}");
            return;
        }
    };
    let epoch = current.epoch();
    let sh = current.device();
    let bs = sh.dev.geometry().block_size();
    let mode = params::io_mode_of(dev.dev_info.flags);
    let qs = Rc::new(QueueState {
        commit_from_map: dev.dev_info.flags & sys::UBLK_F_NEED_GET_DATA as u64 != 0,
        mode,
        user_copy: (dev.dev_info.flags & sys::UBLK_F_USER_COPY as u64 != 0).then(|| UserCopy {
            // Fixed file 0 of every queue's ring is the char device.
            fd: dev.tgt.fds[0],
            qid,
        }),
        bufs: ZeroBlocks::new(bs),
        copier: copier_for(qid, mode, dev.dev_info.nr_hw_queues),
        detector: RefCell::new(Detector::new(sh.readahead(), bs)),
        reads_in_flight: Cell::new(0),
        serving: Cell::new(0),
        background: Background::default(),
        qid,
        current,
        sh: RefCell::new(Rc::new(sh)),
        epoch: Cell::new(epoch),
        watching: Cell::new(false),
        parked: RefCell::default(),
    });
    let exe = Rc::new(smol::LocalExecutor::new());
    let worker = {
        let (q, qs) = (q.clone(), qs.clone());
        exe.spawn(async move { background_worker(&q, &qs).await })
    };
    let tasks: Vec<_> = q
        .tags()
        .map(|tag| {
            let fut = tag_task(q.clone(), tag, qs.clone());
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
