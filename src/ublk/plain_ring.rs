//! A plain io_uring for the executor (`exec`) outside a ublk queue: the
//! same fixed files as a queue's ring (`exec::RingFiles`), its operations
//! submitted and completed here, and [`PlainRing::block_on`] to run one of
//! the executor's futures to its end. The host tests run the io_uring
//! executor through it on machines without ublk_drv.
//!
//! Single-threaded like a queue: the ring and the table of operations in
//! flight sit in `RefCell`s that only this thread touches.

use crate::ublk::exec::{FIRST_FILE, RingFiles};
use crate::ublk::ops::{Op, Ring};
use io_uring::IoUring;
use std::cell::RefCell;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

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
}

#[derive(Default)]
struct Slots {
    state: Vec<Slot>,
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
    fn take(&mut self) -> usize {
        let i = self.free.pop().unwrap_or_else(|| {
            self.state.push(Slot::Free);
            self.state.len() - 1
        });
        self.state[i] = Slot::InFlight;
        self.in_flight += 1;
        i
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
            self.inner
                .wait_one()
                .expect("waiting for io_uring completions");
        }
    }
}

impl Inner {
    /// Submits what was pushed, waits for at least one completion and
    /// records every completion there is.
    fn wait_one(&self) -> io::Result<()> {
        let mut ring = self.ring.borrow_mut();
        ring.submit_and_wait(1)?;
        let mut slots = self.slots.borrow_mut();
        for cqe in ring.completion() {
            slots.complete(cqe.user_data() as usize, cqe.result());
        }
        Ok(())
    }
}

impl Ring for PlainRing {
    type Done = PlainDone;

    fn push(&self, op: Op<'_>) -> PlainDone {
        let slot = self.inner.slots.borrow_mut().take();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ublk::exec::{BASE_FD, OVERLAY_FD};
    use crate::ublk::ops::{FileWrite, PendingOp, WriteSource, finish_all};
    use std::os::unix::fs::FileExt;

    #[test]
    fn operations_in_flight_together_complete_with_their_results() {
        let dir = std::env::temp_dir();
        let base = crate::ublk::test_files::unlinked(&dir, "plain-base");
        base.write_all_at(&[7u8; 8192], 0).unwrap();
        let overlay = crate::ublk::test_files::unlinked(&dir, "plain-overlay");
        let files = RingFiles {
            base: base.as_raw_fd(),
            overlay: overlay.as_raw_fd(),
            zero: base.as_raw_fd(),
            base_direct: base.as_raw_fd(),
            overlay_direct: overlay.as_raw_fd(),
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

    fn read(buf: &mut [u8; 4096], pos: u64) -> Op<'static> {
        Op::Read {
            fd: BASE_FD,
            to: buf.as_mut_ptr(),
            len: 4096,
            pos,
        }
    }
}
