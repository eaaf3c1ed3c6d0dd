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

use io_uring::{opcode, squeue, types};
use libublk::io::UblkQueue;
use libublk::uring_async::UblkUringOpFuture;
use std::os::fd::RawFd;

/// A pushed operation.
pub struct PendingOp {
    done: UblkUringOpFuture,
    /// The result that says it did it all: bytes to move, or 0.
    want: u32,
    /// For a write: the write itself, to push the rest if it comes up short.
    write: Option<FileWrite>,
}

impl PendingOp {
    /// Pushes `sqe`, which has done it all when it returns `want`.
    pub fn push(q: &UblkQueue<'_>, sqe: squeue::Entry, want: u32) -> PendingOp {
        PendingOp {
            done: q.ublk_submit_sqe(sqe),
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

/// A write of `len` bytes to file offset `pos` of fixed file `fd`.
#[derive(Clone, Copy, Debug)]
pub struct FileWrite {
    pub fd: types::Fixed,
    pub from: WriteSource,
    pub len: u32,
    pub pos: u64,
}

impl FileWrite {
    fn sqe(&self) -> squeue::Entry {
        match self.from {
            WriteSource::Memory(p) => opcode::Write::new(self.fd, p, self.len),
            WriteSource::Registered { index, at } => {
                return write_fixed(self.fd, index, at, self.len, self.pos);
            }
        }
        .offset(self.pos)
        .build()
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
    pub fn push(self, q: &UblkQueue<'_>) -> PendingOp {
        PendingOp {
            done: q.ublk_submit_sqe(self.sqe()),
            want: self.len,
            write: Some(self),
        }
    }
}

/// Completes `op`: 0, or a negative errno; fewer bytes than asked is EIO,
/// but for a write, which is pushed again for the rest first.
pub async fn finish(q: &UblkQueue<'_>, op: PendingOp) -> i32 {
    let mut op = op;
    loop {
        let r = op.done.await;
        if r < 0 {
            return r;
        }
        if r as u32 == op.want {
            return 0;
        }
        match op.write {
            Some(w) if r > 0 => op = w.rest(r as u32).push(q),
            _ => return -libc::EIO,
        }
    }
}

/// Completes each pushed operation, in order; the first failure is the
/// result.
pub async fn finish_all(q: &UblkQueue<'_>, ops: Vec<PendingOp>) -> i32 {
    let mut res = 0;
    for op in ops {
        let r = finish(q, op).await;
        if res == 0 {
            res = r;
        }
    }
    res
}

/// Reads `len` bytes at file offset `pos` of `fd` into `buf`.
pub fn read(fd: types::Fixed, buf: *mut u8, len: u32, pos: u64) -> squeue::Entry {
    opcode::Read::new(fd, buf, len).offset(pos).build()
}

/// Reads `len` bytes at file offset `pos` of `fd` into fixed buffer `index`
/// at `at` bytes from its start. A buffer that ublk registered starts at
/// address 0 for io_uring, so `at` is the address.
pub fn read_fixed(fd: types::Fixed, index: u16, at: usize, len: u32, pos: u64) -> squeue::Entry {
    opcode::ReadFixed::new(fd, at as *mut u8, len, index)
        .offset(pos)
        .build()
}

/// Reads `len` bytes from the pipe `fd` (not a fixed file; a stream has no
/// offset) into fixed buffer `index` at `at` bytes from its start.
pub fn read_fixed_from_pipe(fd: RawFd, index: u16, at: usize, len: u32) -> squeue::Entry {
    opcode::ReadFixed::new(types::Fd(fd), at as *mut u8, len, index)
        .offset(u64::MAX)
        .build()
}

/// Writes `len` bytes from fixed buffer `index`, from `at` bytes on, to file
/// offset `pos` of `fd`.
fn write_fixed(fd: types::Fixed, index: u16, at: usize, len: u32, pos: u64) -> squeue::Entry {
    opcode::WriteFixed::new(fd, at as *const u8, len, index)
        .offset(pos)
        .build()
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
