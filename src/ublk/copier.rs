//! The copy helper: a thread beside a queue's thread that copies a large
//! READ's runs from the mappings that hold them (files in memory) into the
//! tag's buffer, while the queue's thread serves other requests.
//!
//! In copy mode a READ of several runs costs two copies per byte: into the
//! tag's buffer, then ublk's own into the request at the commit, which the
//! queue's thread makes. With both on that one thread a queue keeps one
//! CPU busy while the others idle; the helper takes the first copy to a
//! CPU of its own. Small READs stay on the queue's thread
//! (`exec::read`'s `HELPER_MIN`), where a copy costs less than the handing.
//!
//! A tag hands one batch at a time and waits for it on its ring (`Copying`),
//! so the queue's thread never blocks; the helper signals the tag's eventfd
//! when the batch is copied.

use crate::sys::{self, EventFd};
use crate::ublk::ops::{Op, Ring};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

/// One copy of a batch: `len` bytes from `from` to `to`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece {
    pub(crate) from: *const u8,
    pub(crate) to: *mut u8,
    pub(crate) len: usize,
}

/// A tag's batch and the signal that it was copied.
struct Batch {
    pieces: Vec<Piece>,
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
    /// Signalled after `copied` is set, for the tag's ring to wake on.
    event: EventFd,
}

impl Finished {
    pub(crate) fn new() -> io::Result<Finished> {
        Ok(Finished {
            copied: AtomicBool::new(true),
            event: EventFd::new()?,
        })
    }

    fn copied(&self) -> bool {
        self.copied.load(Ordering::Acquire)
    }
}

/// A queue's copy helper thread; dropping it lets the thread finish what
/// was handed to it and joins it.
pub struct Copier {
    /// Batches to copy, in order; `None` once dropping.
    to_copy: Option<mpsc::Sender<Batch>>,
    thread: Option<JoinHandle<()>>,
}

impl Copier {
    /// Starts the helper thread, named `name`.
    pub fn new(name: String) -> io::Result<Copier> {
        let (to_copy, batches) = mpsc::channel::<Batch>();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            while let Ok(batch) = batches.recv() {
                copy_all(&batch.pieces);
                batch.done.copied.store(true, Ordering::Release);
                batch.done.event.signal();
            }
        })?;
        Ok(Copier {
            to_copy: Some(to_copy),
            thread: Some(thread),
        })
    }

    /// Hands `pieces` to the helper (or, if it is gone, copies them here);
    /// `done` is the tag's, with no other batch of it unfinished.
    ///
    /// # Safety
    ///
    /// Each piece's source must be readable and its destination writable
    /// for its length, without a fault that could fail (mapped pages made
    /// present), and destinations must not overlap sources or each other;
    /// all of it must stay so until the returned `Copying` was waited for
    /// or dropped (both wait for the copy), and it must not be forgotten.
    pub(crate) unsafe fn start<'a>(
        &self,
        pieces: Vec<Piece>,
        done: &'a Arc<Finished>,
    ) -> Copying<'a> {
        done.copied.store(false, Ordering::Relaxed);
        let batch = Batch {
            pieces,
            done: done.clone(),
        };
        if let Some(Err(mpsc::SendError(batch))) = self.to_copy.as_ref().map(|t| t.send(batch)) {
            copy_all(&batch.pieces);
            done.copied.store(true, Ordering::Release);
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

/// Copies every piece.
fn copy_all(pieces: &[Piece]) {
    for p in pieces {
        // SAFETY: `Copier::start`'s contract: valid, present, disjoint,
        // until the batch is marked copied, which is after this.
        unsafe { sys::copy_by_pieces(p.from, p.to, p.len) };
    }
}

/// A batch being copied by the helper.
pub(crate) struct Copying<'a> {
    done: &'a Finished,
}

impl Copying<'_> {
    /// Waits on the ring until the batch is copied.
    pub(crate) async fn wait<R: Ring>(self, q: &R) {
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
                // The ring cannot wait for it: the drop below does.
                break;
            }
        }
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
    use crate::ublk::exec::RingFiles;
    use crate::ublk::plain_ring::PlainRing;
    use std::os::fd::AsRawFd;

    #[test]
    fn copies_every_piece_and_wakes_the_ring() {
        let copier = Copier::new("copier-test".into()).unwrap();
        let f = crate::ublk::test_files::unlinked(&std::env::temp_dir(), "copier");
        let fd = f.as_raw_fd();
        let files = RingFiles {
            base: fd,
            overlay: fd,
            zero: fd,
            base_direct: fd,
            overlay_direct: fd,
            layers: Vec::new(),
        };
        let ring = PlainRing::new(&files, 8).unwrap();
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
            let copying = unsafe { copier.start(pieces, &done) };
            ring.block_on(copying.wait(&ring));
            assert!(dst == src, "round {round}");
        }
    }

    #[test]
    fn a_dropped_wait_still_waits_for_the_copy() {
        let copier = Copier::new("copier-test".into()).unwrap();
        let done = Arc::new(Finished::new().unwrap());
        // Long enough to copy that the helper cannot be done by the time
        // `start` returns.
        let src = vec![0x5au8; 64 << 20];
        let mut dst = vec![0u8; src.len()];
        let pieces = vec![Piece {
            from: src.as_ptr(),
            to: dst.as_mut_ptr(),
            len: src.len(),
        }];
        // SAFETY: `src` and `dst` outlive the drop, which waits.
        drop(unsafe { copier.start(pieces, &done) });
        assert!(done.copied(), "the drop returned before the copy was done");
        assert!(dst == src);
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
        let pieces = vec![Piece {
            from: src.as_ptr(),
            to: dst.as_mut_ptr(),
            len: src.len(),
        }];
        // SAFETY: as above.
        let copying = unsafe { copier.start(pieces, &done) };
        assert!(done.copied(), "copied before start returned");
        drop(copying);
        assert!(dst == src);
    }
}
