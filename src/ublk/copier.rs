//! The copy helper: a thread beside a queue's thread that copies a large
//! READ's data while the queue's thread serves other requests.
//!
//! In copy mode a READ of several runs costs two copies per byte: into the
//! tag's buffer, then ublk's own into the request at the commit, which the
//! queue's thread makes. With both on that one thread a queue keeps one
//! CPU busy while the others idle; the helper takes the first copy (from
//! the mappings that hold the runs, files in memory, into the tag's
//! buffer: `Work::Gather`) to a CPU of its own. With user copy the one copy
//! there is, each run into the request (`pwritev` on ublk's char device:
//! `Work::ToRequest`), goes to the helper whole. Small READs stay on the
//! queue's thread (`HELPER_MIN`), where a copy costs less than the handing.
//!
//! A tag hands one batch at a time and waits for it on its ring (`Copying`),
//! so the queue's thread never blocks; the helper signals the tag's eventfd
//! when the batch is copied. A READ is handed over only while the helper
//! has fewer than `HELPER_BACKLOG` batches: else the queue's thread copies
//! it itself, rather than leave it waiting behind the others.

use crate::sys::{self, EventFd};
use crate::ublk::ops::{Op, Ring};
use crate::ublk::request_buf::UserCopyAt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

/// The smallest READ whose data a queue with a copy helper hands to it;
/// below it the handing costs more than the copy it takes off the queue's
/// thread (docs/benchmarks.md).
pub(crate) const HELPER_MIN: u64 = 256 << 10;

/// The most batches the helper holds (copying or waiting); a READ that
/// finds it holding this many is copied on the queue's thread
/// (docs/benchmarks.md).
pub(crate) const HELPER_BACKLOG: usize = 1;

/// One copy of a gather: `len` bytes from `from` to `to`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece {
    pub(crate) from: *const u8,
    pub(crate) to: *mut u8,
    pub(crate) len: usize,
}

/// What the helper is to copy.
pub(crate) enum Work {
    /// Each piece, into the tag's buffer.
    Gather(Vec<Piece>),
    /// Memory (`(address, length)` pieces, in order) into the request at
    /// `UserCopyAt` (one `pwritev`).
    ToRequest(Vec<(usize, usize)>, UserCopyAt),
    /// A bug in the helper, for the test that it fails only its READ.
    #[cfg(test)]
    Panic,
}

/// A tag's batch and the signal that it was copied.
struct Batch {
    work: Work,
    done: Arc<Finished>,
}

// SAFETY: the pointers of a batch name memory that stays valid until the
// batch was copied (`Copier::start`'s contract), and only the helper's
// thread touches it meanwhile.
unsafe impl Send for Batch {}

/// One tag's signal from the helper: its batch is copied.
pub(crate) struct Finished {
    /// Set (Release) once every piece of the batch was copied; read
    /// (Acquire) by the tag before it uses the buffer.
    copied: AtomicBool,
    /// The batch's error (an errno), 0 for none; set before `copied`.
    error: AtomicI32,
    /// Signalled after `copied` is set, for the tag's ring to wake on.
    event: EventFd,
}

impl Finished {
    pub(crate) fn new() -> io::Result<Finished> {
        Ok(Finished {
            copied: AtomicBool::new(true),
            error: AtomicI32::new(0),
            event: EventFd::new()?,
        })
    }

    fn copied(&self) -> bool {
        self.copied.load(Ordering::Acquire)
    }

    /// Marks the batch copied, with the outcome of its work.
    fn finish(&self, work: io::Result<()>) {
        let errno = work.map_or_else(|e| e.raw_os_error().unwrap_or(libc::EIO), |()| 0);
        self.error.store(errno, Ordering::Relaxed);
        self.copied.store(true, Ordering::Release);
    }

    /// The outcome of the batch, once copied.
    fn outcome(&self) -> io::Result<()> {
        match self.error.load(Ordering::Relaxed) {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// A queue's copy helper thread; dropping it lets the thread finish what
/// was handed to it and joins it.
pub struct Copier {
    /// Batches to copy, in order; `None` once dropping.
    to_copy: Option<mpsc::Sender<Batch>>,
    /// Batches handed to the helper and not yet copied: raised by the
    /// queue's thread before it hands one, lowered by the helper once it
    /// is copied.
    held: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Copier {
    /// Starts the helper thread, named `name`.
    pub fn new(name: String) -> io::Result<Copier> {
        let (to_copy, batches) = mpsc::channel::<Batch>();
        let held = Arc::new(AtomicUsize::new(0));
        let helper_held = held.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            while let Ok(batch) = batches.recv() {
                // A panic fails the READ (a bug, logged) instead of leaving
                // its tag waiting for good.
                let work = std::panic::AssertUnwindSafe(|| batch.work.run());
                let outcome = std::panic::catch_unwind(work).unwrap_or_else(|_| {
                    log::error!("the copy helper panicked; the READ fails with EIO");
                    Err(io::Error::from_raw_os_error(libc::EIO))
                });
                // Lowered before the batch is marked copied: a tag that saw
                // its batch copied finds the helper's room for its next.
                helper_held.fetch_sub(1, Ordering::Relaxed);
                batch.done.finish(outcome);
                batch.done.event.signal();
            }
        })?;
        Ok(Copier {
            to_copy: Some(to_copy),
            held,
            thread: Some(thread),
        })
    }

    /// Whether the helper holds fewer than `HELPER_BACKLOG` batches, so
    /// that one handed now is copied without waiting behind them.
    pub(crate) fn has_room(&self) -> bool {
        self.held.load(Ordering::Relaxed) < HELPER_BACKLOG
    }

    /// Hands `work` to the helper (or, if it is gone, does it here);
    /// `done` is the tag's, with no other batch of it unfinished.
    ///
    /// # Safety
    ///
    /// The memory `work` names must stay valid (and, for a gather,
    /// otherwise untouched) until the returned `Copying` was waited for or
    /// dropped (both wait for the copy), which must not be forgotten. Each
    /// piece of a gather must be readable at its source and writable at its
    /// destination for its length without a fault that could fail (mapped
    /// pages made present), destinations overlapping nothing else.
    pub(crate) unsafe fn start<'a>(&self, work: Work, done: &'a Arc<Finished>) -> Copying<'a> {
        done.copied.store(false, Ordering::Relaxed);
        let batch = Batch {
            work,
            done: done.clone(),
        };
        self.held.fetch_add(1, Ordering::Relaxed);
        if let Some(Err(mpsc::SendError(batch))) = self.to_copy.as_ref().map(|t| t.send(batch)) {
            self.held.fetch_sub(1, Ordering::Relaxed);
            done.finish(batch.work.run());
        }
        Copying { done }
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        self.to_copy = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Work {
    /// Does the copy.
    fn run(&self) -> io::Result<()> {
        match self {
            Work::Gather(pieces) => {
                for p in pieces {
                    // SAFETY: `Copier::start`'s contract: valid, present,
                    // disjoint, until the batch is marked copied, which is
                    // after this.
                    unsafe { sys::copy_by_pieces(p.from, p.to, p.len) };
                }
                Ok(())
            }
            Work::ToRequest(pieces, to) => to.write_pieces(pieces),
            #[cfg(test)]
            Work::Panic => panic!("a bug in the copy helper"),
        }
    }
}

/// A batch being copied by the helper.
pub(crate) struct Copying<'a> {
    done: &'a Finished,
}

impl Copying<'_> {
    /// Waits on the ring until the batch is copied; its outcome.
    pub(crate) async fn wait<R: Ring>(self, q: &R) -> io::Result<()> {
        let mut counter = Box::new(0u64);
        while !self.done.copied() {
            let wait = Op::ReadEvent {
                fd: self.done.event.raw(),
                to: &mut *counter,
            };
            // `counter` stays in place until the read completes: awaited.
            // A signal left from a batch that was copied before its tag
            // looked only brings one more turn of this loop.
            let r = q.push(wait).await;
            if r < 0 && r != -libc::EINTR && r != -libc::EAGAIN {
                // The ring cannot wait for it: the thread does.
                while !self.done.copied() {
                    std::thread::yield_now();
                }
            }
        }
        self.done.outcome()
    }
}

impl Drop for Copying<'_> {
    fn drop(&mut self) {
        // The memory of the batch is the caller's again only once copied
        // (a READ dropped while it waits, as a queue goes down).
        while !self.done.copied() {
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ublk::plain_ring::{self, PlainRing};
    use std::os::fd::AsRawFd;

    /// A plain ring whose fixed files are all `f`.
    fn test_ring(f: &std::fs::File) -> PlainRing {
        PlainRing::new(&plain_ring::all_in(f), 8).unwrap()
    }

    /// A gather of all of `src` into `dst`, in one piece.
    fn whole(src: &[u8], dst: &mut [u8]) -> Vec<Piece> {
        assert_eq!(src.len(), dst.len());
        vec![Piece {
            from: src.as_ptr(),
            to: dst.as_mut_ptr(),
            len: src.len(),
        }]
    }

    #[test]
    fn copies_every_piece_and_wakes_the_ring() {
        let copier = Copier::new("copier-test".into()).unwrap();
        let f = crate::test_files::unlinked(&std::env::temp_dir(), "copier");
        let ring = test_ring(&f);
        let done = Arc::new(Finished::new().unwrap());
        let src: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 4096) as u8).collect();
        for round in 0..20usize {
            let mut dst = vec![0u8; src.len()];
            // Pieces of many sizes, the last ones taken out of order.
            let mut pieces = Vec::new();
            let (mut at, mut n) = (0, 1 + round);
            while at < src.len() {
                let len = n.min(src.len() - at);
                pieces.push(Piece {
                    from: src[at..].as_ptr(),
                    to: dst[at..].as_mut_ptr(),
                    len,
                });
                at += len;
                n = n * 3 + 4095;
            }
            pieces.reverse();
            // SAFETY: `src` and `dst` are distinct and outlive the wait.
            let copying = unsafe { copier.start(Work::Gather(pieces), &done) };
            ring.block_on(copying.wait(&ring)).unwrap();
            assert!(dst == src, "round {round}");
        }
    }

    #[test]
    fn writes_pieces_into_the_request_and_reports_a_failure() {
        let copier = Copier::new("copier-test".into()).unwrap();
        let f = crate::test_files::unlinked(&std::env::temp_dir(), "copier-char");
        let ring = test_ring(&f);
        let done = Arc::new(Finished::new().unwrap());
        let a: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let b = vec![0xc3u8; 300_000];
        let pieces = vec![
            (a.as_ptr() as usize, a.len()),
            (b.as_ptr() as usize, b.len()),
        ];
        let to = UserCopyAt::in_file(f.as_raw_fd(), 4096);
        // SAFETY: `a` and `b` outlive the wait.
        let copying = unsafe { copier.start(Work::ToRequest(pieces, to), &done) };
        ring.block_on(copying.wait(&ring)).unwrap();
        let mut back = vec![0u8; a.len() + b.len()];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 4096).unwrap();
        assert!(back[..a.len()] == a[..] && back[a.len()..] == b[..]);
        // A request the copy cannot reach: its error is the wait's.
        let to = UserCopyAt::in_file(-1, 0);
        let pieces = vec![(a.as_ptr() as usize, a.len())];
        // SAFETY: as above.
        let copying = unsafe { copier.start(Work::ToRequest(pieces, to), &done) };
        let err = ring.block_on(copying.wait(&ring)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn a_panic_of_the_helper_fails_its_batch_and_no_other() {
        let copier = Copier::new("copier-test".into()).unwrap();
        let f = crate::test_files::unlinked(&std::env::temp_dir(), "copier-panic");
        let ring = test_ring(&f);
        let done = Arc::new(Finished::new().unwrap());
        // SAFETY: the work names no memory.
        let copying = unsafe { copier.start(Work::Panic, &done) };
        let started = std::time::Instant::now();
        while !done.copied() {
            if started.elapsed() > std::time::Duration::from_secs(10) {
                // Its drop would wait for good; it names no memory.
                std::mem::forget(copying);
                panic!("the helper's panic left its batch unfinished");
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let err = ring.block_on(copying.wait(&ring)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        let src = vec![3u8; 5000];
        let mut dst = vec![0u8; src.len()];
        let pieces = whole(&src, &mut dst);
        // SAFETY: `src` and `dst` outlive the wait.
        let copying = unsafe { copier.start(Work::Gather(pieces), &done) };
        ring.block_on(copying.wait(&ring)).unwrap();
        assert!(dst == src);
    }

    #[test]
    fn a_dropped_wait_still_waits_for_the_copy() {
        let copier = Copier::new("copier-test".into()).unwrap();
        let done = Arc::new(Finished::new().unwrap());
        // Long enough to copy that the helper cannot be done by the time
        // `start` returns.
        let src = vec![0x5au8; 64 << 20];
        let mut dst = vec![0u8; src.len()];
        let pieces = whole(&src, &mut dst);
        // SAFETY: `src` and `dst` outlive the drop, which waits.
        drop(unsafe { copier.start(Work::Gather(pieces), &done) });
        assert!(done.copied(), "the drop returned before the copy was done");
        assert!(dst == src);
    }

    /// A helper holding `HELPER_BACKLOG` batches has no room for another
    /// until one is copied; a tag that saw its batch copied finds room.
    #[test]
    fn a_helper_holding_its_backlog_has_no_room_until_a_batch_is_copied() {
        assert_eq!(HELPER_BACKLOG, 1, "the test hands one batch");
        let copier = Copier::new("copier-test".into()).unwrap();
        assert!(copier.has_room());
        let done = Arc::new(Finished::new().unwrap());
        // Long enough to copy that the helper cannot be done by the time
        // `start` returns.
        let src = vec![0x5au8; 64 << 20];
        let mut dst = vec![0u8; src.len()];
        let pieces = whole(&src, &mut dst);
        // SAFETY: `src` and `dst` outlive the drop, which waits.
        let copying = unsafe { copier.start(Work::Gather(pieces), &done) };
        assert!(!copier.has_room(), "room beside a batch being copied");
        drop(copying);
        assert!(copier.has_room(), "no room once the batch was copied");
    }

    #[test]
    fn copies_in_place_once_the_helper_is_gone() {
        let mut copier = Copier::new("copier-test".into()).unwrap();
        copier.to_copy = None;
        copier.thread.take().unwrap().join().unwrap();
        let (tx, _) = mpsc::channel();
        copier.to_copy = Some(tx);
        let done = Arc::new(Finished::new().unwrap());
        let src = vec![7u8; 10_000];
        let mut dst = vec![0u8; src.len()];
        let pieces = whole(&src, &mut dst);
        // SAFETY: as above.
        let copying = unsafe { copier.start(Work::Gather(pieces), &done) };
        assert!(done.copied(), "copied before start returned");
        drop(copying);
        assert!(dst == src);
        assert!(copier.has_room(), "a batch copied in place is not held");
    }
}
