//! Operations on the queue's ring, and their completion: every operation is
//! pushed at once (`UblkQueue::ublk_submit_sqe`) and awaited later, so that
//! the operations of one request are in flight together. An operation has
//! done its work when it moved all the bytes it was asked to; a write that
//! moved fewer is pushed again for the rest, since the kernel tells why it
//! stopped (ENOSPC, say) only to the next write.
//!
//! The rule of every operation built here: the memory its SQE points to (a
//! buffer, a `Timespec`) stays valid and in place until the operation's
//! completion has been reaped, i.e. its `PendingOp` finished. So every
//! caller awaits each operation it pushed before it lets go of the memory,
//! even after another operation of the same request failed (`finish_all`).

use crate::engine::Errno;
use crate::sys;
use io_uring::{opcode, squeue, types};
use libublk::io::UblkQueue;
use libublk::uring_async::UblkUringOpFuture;
use std::future::Future;
use std::os::fd::RawFd;

/// Where the executor's operations go: a queue's ring (`UblkQueue`, the
/// one libublk drives), or a plain io_uring (`plain_ring::PlainRing`, for
/// the executor on its own, as the host tests run it).
pub trait Ring {
    /// The completion of one operation: its result (bytes, 0, or a
    /// negative errno).
    type Done: Future<Output = i32>;

    /// Pushes `op`, to be submitted with the ring's next submission. What
    /// `op` points to must stay valid until `Done` has completed.
    fn push(&self, op: Op<'_>) -> Self::Done;

    /// Carries out `op` on the calling thread, through `fd`, the descriptor
    /// its fixed file names, and returns what its completion would: for a
    /// sync that nothing else waits for, where handing it to an io_uring
    /// worker costs more than the thread's wait (`SyncsOn::Thread`). Only
    /// writes from memory and data syncs (`Op::run_here`).
    fn run_here(&self, op: Op<'_>, fd: RawFd) -> i32 {
        op.run_here(fd)
    }
}

impl Ring for UblkQueue<'_> {
    type Done = UblkUringOpFuture;

    fn push(&self, op: Op<'_>) -> UblkUringOpFuture {
        self.ublk_submit_sqe(op.sqe())
    }
}

/// One operation of the executor, as it names it; `sqe` makes the io_uring
/// entry. Fixed files are the ring's (`exec::RingFiles`); fixed buffers
/// are requests' pages that ublk registered (zero copy), and a registered
/// buffer starts at address 0 for io_uring, so `at` is the address.
#[derive(Clone, Copy, Debug)]
pub enum Op<'a> {
    /// Reads `len` bytes at `pos` of `fd` into memory at `to`.
    Read {
        fd: types::Fixed,
        to: *mut u8,
        len: u32,
        pos: u64,
    },
    /// Reads `len` bytes at `pos` of `fd` into fixed buffer `index`, `at`
    /// bytes from its start.
    ReadFixed {
        fd: types::Fixed,
        index: u16,
        at: usize,
        len: u32,
        pos: u64,
    },
    /// Reads `len` bytes from pipe `fd` (a stream: no offset; not a fixed
    /// file) into fixed buffer `index` at `at`.
    ReadFixedFromPipe {
        fd: RawFd,
        index: u16,
        at: usize,
        len: u32,
    },
    Write(FileWrite),
    /// `fdatasync` of `fd`.
    DataSync {
        fd: types::Fixed,
    },
    /// Punches a hole of `len` bytes at `pos` of `fd`, keeping its size.
    Punch {
        fd: types::Fixed,
        pos: u64,
        len: u64,
    },
    /// `POSIX_FADV_WILLNEED` for `len` bytes at `pos` of `fd`.
    WillNeed {
        fd: types::Fixed,
        pos: u64,
        len: u64,
    },
    /// Completes (with -ETIME) once this time has passed.
    Timeout(&'a types::Timespec),
    /// Reads eventfd `fd`'s counter (8 bytes, into `to`): completes once
    /// another thread has signalled it.
    ReadEvent {
        fd: RawFd,
        to: *mut u64,
    },
}

impl Op<'_> {
    /// The io_uring entry. Every SQE of the executor is built here.
    pub(crate) fn sqe(&self) -> squeue::Entry {
        match *self {
            Op::Read { fd, to, len, pos } => opcode::Read::new(fd, to, len).offset(pos).build(),
            Op::ReadFixed {
                fd,
                index,
                at,
                len,
                pos,
            } => opcode::ReadFixed::new(fd, at as *mut u8, len, index)
                .offset(pos)
                .build(),
            Op::ReadFixedFromPipe { fd, index, at, len } => {
                opcode::ReadFixed::new(types::Fd(fd), at as *mut u8, len, index)
                    .offset(u64::MAX)
                    .build()
            }
            Op::Write(w) => w.sqe(),
            Op::DataSync { fd } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Punch { fd, pos, len } => opcode::Fallocate::new(fd, len)
                .offset(pos)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            Op::WillNeed { fd, pos, len } => {
                opcode::Fadvise::new(fd, len as libc::off_t, libc::POSIX_FADV_WILLNEED)
                    .offset(pos)
                    .build()
            }
            Op::Timeout(ts) => opcode::Timeout::new(ts).build(),
            Op::ReadEvent { fd, to } => opcode::Read::new(types::Fd(fd), to.cast(), 8)
                .offset(u64::MAX)
                .build(),
        }
    }

    /// The operation as a system call on the calling thread, through `fd`
    /// (the descriptor its fixed file names): a write from memory
    /// (`pwritev2`, with `RWF_DSYNC` if it asks) or a data sync; the
    /// result as its completion gives it. Any other operation is EINVAL.
    pub(crate) fn run_here(&self, fd: RawFd) -> i32 {
        let r = match *self {
            Op::Write(FileWrite {
                from: WriteSource::Memory(p),
                len,
                pos,
                dsync,
                ..
            }) => sys::pwrite_from(fd, p, len as usize, pos, dsync).map(|n| n as i32),
            Op::DataSync { .. } => sys::fdatasync(fd).map(|()| 0),
            _ => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        };
        r.unwrap_or_else(|e| -e.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// A pushed operation.
pub(crate) struct PendingOp<R: Ring + ?Sized> {
    done: R::Done,
    /// The result that says it did it all: bytes to move, or 0.
    want: u32,
    /// For a write: the write itself, to push the rest if it comes up short.
    write: Option<FileWrite>,
}

impl<R: Ring + ?Sized> PendingOp<R> {
    /// Pushes `op`, which has done it all when it returns `want`.
    pub(crate) fn push(q: &R, op: Op<'_>, want: u32) -> PendingOp<R> {
        PendingOp {
            done: q.push(op),
            want,
            write: None,
        }
    }
}

/// Where a write's data comes from.
#[derive(Clone, Copy, Debug)]
pub enum WriteSource {
    /// The daemon's memory. It must stay put until the write completes.
    Memory(*const u8),
    /// Fixed buffer `index` of the queue's ring, from `at` bytes on.
    Registered { index: u16, at: usize },
}

/// A write of `len` bytes to file offset `pos` of fixed file `fd`; with
/// `dsync`, durable when it completes (`RWF_DSYNC`: the write and an
/// `fdatasync` of its range in one operation).
#[derive(Clone, Copy, Debug)]
pub struct FileWrite {
    pub fd: types::Fixed,
    pub from: WriteSource,
    pub len: u32,
    pub pos: u64,
    pub dsync: bool,
}

impl FileWrite {
    fn sqe(&self) -> squeue::Entry {
        let flags = if self.dsync { libc::RWF_DSYNC } else { 0 };
        match self.from {
            WriteSource::Memory(p) => opcode::Write::new(self.fd, p, self.len)
                .offset(self.pos)
                .rw_flags(flags)
                .build(),
            WriteSource::Registered { index, at } => {
                opcode::WriteFixed::new(self.fd, at as *const u8, self.len, index)
                    .offset(self.pos)
                    .rw_flags(flags)
                    .build()
            }
        }
    }

    /// What is left after the first `n` bytes.
    fn rest(&self, n: u32) -> FileWrite {
        let from = match self.from {
            WriteSource::Memory(p) => WriteSource::Memory(p.wrapping_add(n as usize)),
            WriteSource::Registered { index, at } => WriteSource::Registered {
                index,
                at: at + n as usize,
            },
        };
        FileWrite {
            from,
            len: self.len - n,
            pos: self.pos + n as u64,
            ..*self
        }
    }

    /// Pushes the write.
    pub(crate) fn push<R: Ring + ?Sized>(self, q: &R) -> PendingOp<R> {
        PendingOp {
            done: q.push(Op::Write(self)),
            want: self.len,
            write: Some(self),
        }
    }
}

/// Completes `op`; fewer bytes than asked is EIO, but for a write, which is
/// pushed again for the rest first.
pub(crate) async fn finish<R: Ring + ?Sized>(q: &R, op: PendingOp<R>) -> Result<(), Errno> {
    let mut op = op;
    loop {
        let r = op.done.await;
        if r < 0 {
            return Err(Errno::from_negative(r));
        }
        if r as u32 == op.want {
            return Ok(());
        }
        match op.write {
            Some(w) if r > 0 => op = w.rest(r as u32).push(q),
            _ => return Err(Errno::EIO),
        }
    }
}

/// Carries out write `w` on the calling thread (`Ring::run_here`) through
/// `fd`, the descriptor its fixed file names: all of it, the rest written
/// again after a short write as `finish` does, or the error.
pub(crate) fn write_here<R: Ring + ?Sized>(q: &R, w: FileWrite, fd: RawFd) -> Result<(), Errno> {
    let mut w = w;
    loop {
        let r = q.run_here(Op::Write(w), fd);
        if r < 0 {
            return Err(Errno::from_negative(r));
        }
        match r as u32 {
            n if n == w.len => return Ok(()),
            0 => return Err(Errno::EIO),
            n => w = w.rest(n),
        }
    }
}

/// `fdatasync` of fixed file `fixed` on the calling thread
/// (`Ring::run_here`), through `fd`, the descriptor it names.
pub(crate) fn sync_here<R: Ring + ?Sized>(
    q: &R,
    fixed: types::Fixed,
    fd: RawFd,
) -> Result<(), Errno> {
    match q.run_here(Op::DataSync { fd: fixed }, fd) {
        r if r < 0 => Err(Errno::from_negative(r)),
        _ => Ok(()),
    }
}

/// Completes each pushed operation, in order; the first failure is the
/// result.
pub(crate) async fn finish_all<R: Ring + ?Sized>(
    q: &R,
    ops: Vec<PendingOp<R>>,
) -> Result<(), Errno> {
    let mut res = Ok(());
    for op in ops {
        let r = finish(q, op).await;
        if res.is_ok() {
            res = r;
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rest_of_a_short_write_follows_on() {
        let buf = [0u8; 64];
        let w = FileWrite {
            fd: types::Fixed(2),
            from: WriteSource::Memory(buf.as_ptr()),
            len: 64,
            pos: 4096,
            dsync: false,
        };
        let r = w.rest(24);
        assert_eq!((r.len, r.pos, r.fd.0), (40, 4120, 2));
        assert!(matches!(r.from, WriteSource::Memory(p) if p == buf[24..].as_ptr()));
        let w = FileWrite {
            from: WriteSource::Registered { index: 7, at: 512 },
            ..w
        };
        let r = w.rest(8).rest(8);
        assert_eq!((r.len, r.pos), (48, 4112));
        assert!(matches!(
            r.from,
            WriteSource::Registered { index: 7, at: 528 }
        ));
    }
}
