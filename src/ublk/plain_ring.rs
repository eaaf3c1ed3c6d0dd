//! A plain io_uring for the executor (`exec`) outside a ublk queue: the
//! same fixed files as a queue's ring (`exec::RingFiles`), its operations
//! submitted and completed here, and [`PlainRing::block_on`] to run one of
//! the executor's futures to its end. The host tests run the io_uring
//! executor through it on machines without ublk_drv.
//!
//! Single-threaded like a queue: the ring and the table of operations in
//! flight sit in `RefCell`s that only this thread touches.
//!
//! A wait that sees no completion for [`KICK_AFTER`] pushes a no-op that
//! must run on an io-wq worker: on Linux 6.18 a ring's first writes to a
//! file were seen pending in io-wq with no worker thread to run them, and
//! the worker made for the no-op ran them at once (docs/design.md,
//! "Testing without a ublk kernel"). A wait that sees no completion for
//! [`STUCK_AFTER`] fails, naming the operations in flight and what the
//! kernel says of the ring and of this process's threads: a test stops
//! with that, not a hang.

use crate::ublk::exec::{FIRST_FILE, RingFiles};
use crate::ublk::ops::{Op, Ring};
use io_uring::IoUring;
use std::cell::{Cell, RefCell};
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How long a wait sees no completion before it kicks io-wq.
pub const KICK_AFTER: Duration = Duration::from_secs(5);

/// The user data of a kick's no-op: no slot has it.
const KICK: u64 = u64::MAX;

/// How long a wait may see no completion at all before it fails: every
/// operation the executor pushes to a plain ring (file I/O, a timeout of
/// at most seconds) ends long before.
pub const STUCK_AFTER: Duration = Duration::from_secs(60);

/// A plain io_uring with the executor's fixed files.
pub struct PlainRing {
    inner: Rc<Inner>,
    /// Stands in at the fixed-file indices before `FIRST_FILE` (a queue's
    /// ring has ublk's char device there).
    _placeholder: File,
}

struct Inner {
    ring: RefCell<IoUring>,
    /// One slot per operation pushed and not yet taken by its `PlainDone`;
    /// an operation's user data is its slot's index.
    slots: RefCell<Slots>,
    /// [`KICK_AFTER`] and [`STUCK_AFTER`], shorter in this file's tests.
    kick_after: Cell<Duration>,
    stuck_after: Cell<Duration>,
    /// The kicks pushed so far.
    kicks: Cell<u64>,
}

#[derive(Default)]
struct Slots {
    state: Vec<Slot>,
    /// What each slot's operation is (`Op`'s `Debug`), for a stuck wait.
    what: Vec<String>,
    free: Vec<usize>,
    in_flight: usize,
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Slot {
    #[default]
    Free,
    InFlight,
    /// In flight, and its `PlainDone` was dropped: freed at completion.
    Abandoned,
    Done(i32),
}

impl Slots {
    fn take(&mut self, what: String) -> usize {
        let i = self.free.pop().unwrap_or_else(|| {
            self.state.push(Slot::Free);
            self.what.push(String::new());
            self.state.len() - 1
        });
        self.state[i] = Slot::InFlight;
        self.what[i] = what;
        self.in_flight += 1;
        i
    }

    /// The operations still in flight, one a line.
    fn in_flight_list(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.state.iter().enumerate() {
            if matches!(s, Slot::InFlight | Slot::Abandoned) {
                out += &format!("  slot {i}: {}\n", self.what[i]);
            }
        }
        out
    }

    fn release(&mut self, i: usize) {
        self.state[i] = Slot::Free;
        self.free.push(i);
    }

    fn complete(&mut self, i: usize, res: i32) {
        self.in_flight -= 1;
        match self.state[i] {
            Slot::Abandoned => self.release(i),
            _ => self.state[i] = Slot::Done(res),
        }
    }
}

impl PlainRing {
    /// A ring of `entries` submission entries over `files`.
    pub fn new(files: &RingFiles, entries: u32) -> io::Result<PlainRing> {
        let ring = IoUring::new(entries)?;
        let placeholder = File::open("/dev/null")?;
        let mut fds = vec![placeholder.as_raw_fd(); FIRST_FILE as usize];
        fds.extend(files.table());
        ring.submitter().register_files(&fds)?;
        Ok(PlainRing {
            inner: Rc::new(Inner {
                ring: RefCell::new(ring),
                slots: RefCell::default(),
                kick_after: KICK_AFTER.into(),
                stuck_after: STUCK_AFTER.into(),
                kicks: Cell::new(0),
            }),
            _placeholder: placeholder,
        })
    }

    /// Points the ring's fixed files at `files`, as a queue does after a
    /// live snapshot swapped its device.
    pub fn update_files(&self, files: &RingFiles) -> io::Result<()> {
        let ring = self.inner.ring.borrow();
        ring.submitter()
            .register_files_update(FIRST_FILE, &files.table())?;
        Ok(())
    }

    /// How many times a wait kicked io-wq (see the module's doc).
    pub fn kicks(&self) -> u64 {
        self.inner.kicks.get()
    }

    /// Empties the ring's fixed files from `FIRST_FILE` on, so that it
    /// holds none of a device's files until `update_files` points it at
    /// another: a ring kept for many devices, as a test thread keeps one.
    pub fn release_files(&self) -> io::Result<()> {
        let ring = self.inner.ring.borrow();
        ring.submitter()
            .register_files_update(FIRST_FILE, &vec![-1; RingFiles::table_len()])?;
        Ok(())
    }

    /// Runs `fut` to its end, submitting the operations it pushes and
    /// waiting for their completions.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        let mut fut = pin!(fut);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
            assert!(
                self.inner.slots.borrow().in_flight > 0,
                "the future waits, but no operation is in flight"
            );
            if let Err(e) = self.inner.wait_one() {
                panic!("waiting for io_uring completions: {e}");
            }
        }
    }
}

impl Inner {
    /// Submits what was pushed, waits for at least one completion and
    /// records every completion there is. Kicks io-wq every
    /// [`KICK_AFTER`] without a completion; fails once there was none for
    /// [`STUCK_AFTER`].
    fn wait_one(&self) -> io::Result<()> {
        let mut ring = self.ring.borrow_mut();
        let start = Instant::now();
        let mut kicked = start;
        let tick = io_uring::types::Timespec::from(Duration::from_secs(1));
        let args = io_uring::types::SubmitArgs::new().timespec(&tick);
        loop {
            match ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                Err(e) => return Err(e),
            }
            let mut slots = self.slots.borrow_mut();
            let mut any = false;
            for cqe in ring.completion() {
                if cqe.user_data() != KICK {
                    slots.complete(cqe.user_data() as usize, cqe.result());
                    any = true;
                }
            }
            if any {
                return Ok(());
            }
            if kicked.elapsed() >= self.kick_after.get() {
                log::warn!(
                    "no io_uring completion for {:?}: kicking io-wq; in flight:\n{}",
                    start.elapsed(),
                    slots.in_flight_list()
                );
                // The no-op runs on an io-wq worker (ASYNC), made for it if
                // there is none free.
                let nop = io_uring::opcode::Nop::new()
                    .build()
                    .flags(io_uring::squeue::Flags::ASYNC)
                    .user_data(KICK);
                // SAFETY: a no-op points to no memory.
                while unsafe { ring.submission().push(&nop) }.is_err() {
                    ring.submit()?;
                }
                self.kicks.set(self.kicks.get() + 1);
                kicked = Instant::now();
            }
            if start.elapsed() >= self.stuck_after.get() {
                return Err(io::Error::other(format!(
                    "no io_uring completion for {} s; in flight:\n{}{}",
                    self.stuck_after.get().as_secs(),
                    slots.in_flight_list(),
                    stuck_report(ring.as_raw_fd())
                )));
            }
        }
    }
}

/// What the kernel says of ring `fd` and of this process's threads (their
/// kernel stacks, where it lets them be read): for a wait that is stuck.
fn stuck_report(fd: i32) -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_else(|e| format!("({p}: {e})\n"));
    let mut out = format!("ring fdinfo:\n{}", read(&format!("/proc/self/fdinfo/{fd}")));
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let dir = t.path();
            let dir = dir.display();
            out += &format!(
                "thread {} {}{}",
                t.file_name().to_string_lossy(),
                read(&format!("{dir}/comm")),
                read(&format!("{dir}/stack"))
            );
        }
    }
    out
}

impl Ring for PlainRing {
    type Done = PlainDone;

    fn push(&self, op: Op<'_>) -> PlainDone {
        let slot = self.inner.slots.borrow_mut().take(format!("{op:?}"));
        let sqe = op.sqe().user_data(slot as u64);
        let mut ring = self.inner.ring.borrow_mut();
        loop {
            // SAFETY: the rule of `Ring::push`: what the operation points
            // to stays valid until its completion has been taken, and the
            // fixed files it names are registered for the ring's life.
            if unsafe { ring.submission().push(&sqe) }.is_ok() {
                break;
            }
            ring.submit().expect("submitting to io_uring");
        }
        PlainDone {
            inner: self.inner.clone(),
            slot: Some(slot),
        }
    }
}

impl Drop for PlainRing {
    /// Lets go of the fixed files now. A closed ring puts its files in its
    /// teardown, which the kernel runs later (tens of milliseconds, longer
    /// on a busy machine), and until then an overlay's lock stays taken
    /// through its file.
    fn drop(&mut self) {
        if let Err(e) = self.inner.ring.borrow().submitter().unregister_files() {
            log::warn!("unregistering a plain ring's files: {e}");
        }
    }
}

/// The completion of an operation pushed to a [`PlainRing`].
pub struct PlainDone {
    inner: Rc<Inner>,
    /// `None` once the result was taken.
    slot: Option<usize>,
}

impl Future for PlainDone {
    type Output = i32;

    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<i32> {
        let slot = self.slot.expect("polled after completion");
        let mut slots = self.inner.slots.borrow_mut();
        match slots.state[slot] {
            Slot::Done(res) => {
                slots.release(slot);
                drop(slots);
                self.slot = None;
                Poll::Ready(res)
            }
            _ => Poll::Pending,
        }
    }
}

impl Drop for PlainDone {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            let mut slots = self.inner.slots.borrow_mut();
            match slots.state[slot] {
                Slot::Done(_) => slots.release(slot),
                _ => slots.state[slot] = Slot::Abandoned,
            }
        }
    }
}

/// Ring files that are all `f` (for tests of the ring itself).
#[cfg(test)]
pub(crate) fn all_in(f: &std::fs::File) -> RingFiles {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    RingFiles {
        base: fd,
        overlay: fd,
        zero: fd,
        base_direct: fd,
        overlay_direct: fd,
        overlay_dsync: fd,
        layers: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ublk::exec::{BASE_FD, OVERLAY_FD};
    use crate::ublk::ops::{FileWrite, PendingOp, WriteSource, finish_all};
    use std::os::unix::fs::FileExt;

    #[test]
    fn operations_in_flight_together_complete_with_their_results() {
        let dir = std::env::temp_dir();
        let base = crate::test_files::unlinked(&dir, "plain-base");
        base.write_all_at(&[7u8; 8192], 0).unwrap();
        let overlay = crate::test_files::unlinked(&dir, "plain-overlay");
        let files = RingFiles {
            base: base.as_raw_fd(),
            overlay: overlay.as_raw_fd(),
            zero: base.as_raw_fd(),
            base_direct: base.as_raw_fd(),
            overlay_direct: overlay.as_raw_fd(),
            overlay_dsync: overlay.as_raw_fd(),
            layers: Vec::new(),
        };
        let ring = PlainRing::new(&files, 4).unwrap();
        let mut a = [0u8; 4096];
        let mut b = [0u8; 4096];
        let data = [9u8; 4096];
        let res = ring.block_on(async {
            // More operations than the ring has entries: pushing submits.
            let mut ops = vec![
                PendingOp::push(&ring, read(&mut a, 0), 4096),
                PendingOp::push(&ring, read(&mut b, 4096), 4096),
            ];
            for i in 0..4u64 {
                let w = FileWrite {
                    fd: OVERLAY_FD,
                    from: WriteSource::Memory(data.as_ptr()),
                    len: 4096,
                    pos: i * 4096,
                    dsync: false,
                };
                ops.push(w.push(&ring));
            }
            finish_all(&ring, ops).await
        });
        assert_eq!(res, Ok(()));
        assert_eq!((a, b), ([7u8; 4096], [7u8; 4096]));
        let mut back = vec![0u8; 4 * 4096];
        overlay.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&x| x == 9));
        // A read past the end is short: EIO.
        let r = ring.block_on(async {
            let op = PendingOp::push(&ring, read(&mut a, 8192 - 100), 4096);
            finish_all(&ring, vec![op]).await
        });
        assert_eq!(r, Err(crate::engine::Errno::EIO));
        assert_eq!(ring.inner.slots.borrow().in_flight, 0);
    }

    #[test]
    fn a_wait_without_completions_fails_naming_what_is_in_flight() {
        let dir = std::env::temp_dir();
        let f = crate::test_files::unlinked(&dir, "plain-stuck");
        let files = all_in(&f);
        let ring = PlainRing::new(&files, 4).unwrap();
        ring.inner.kick_after.set(Duration::from_secs(1));
        ring.inner.stuck_after.set(Duration::from_secs(3));
        // An eventfd that nobody signals: its read never completes.
        let event = crate::sys::EventFd::new().unwrap();
        // Leaked: the read still in flight may write it after the test.
        let count: &'static mut u64 = Box::leak(Box::new(0));
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ring.block_on(ring.push(Op::ReadEvent {
                fd: event.raw(),
                to: count,
            }))
        }))
        .expect_err("a read of an eventfd nobody signals completed");
        let msg = err.downcast_ref::<String>().unwrap();
        assert!(
            msg.contains("no io_uring completion for 3 s") && msg.contains("ReadEvent"),
            "{msg}"
        );
        assert!(
            msg.contains("ring fdinfo:") && msg.contains("thread "),
            "{msg}"
        );
        // It kicked io-wq on the way (a no-op cannot complete the read),
        // and the kicks' completions were not taken for the read's.
        assert!(ring.kicks() >= 2, "{} kicks", ring.kicks());
        assert_eq!(ring.inner.slots.borrow().in_flight, 1);
    }

    #[test]
    fn released_files_are_no_longer_held() {
        let dir = std::env::temp_dir();
        let f = crate::test_files::unlinked(&dir, "plain-release");
        let files = all_in(&f);
        let ring = PlainRing::new(&files, 4).unwrap();
        let info = || {
            let fd = ring.inner.ring.borrow().as_raw_fd();
            std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap()
        };
        assert!(info().contains("plain-release"), "{}", info());
        ring.release_files().unwrap();
        assert!(!info().contains("plain-release"), "{}", info());
        ring.update_files(&files).unwrap();
        assert!(info().contains("plain-release"), "{}", info());
    }

    fn read(buf: &mut [u8; 4096], pos: u64) -> Op<'static> {
        Op::Read {
            fd: BASE_FD,
            to: buf.as_mut_ptr(),
            len: 4096,
            pos,
        }
    }
}
