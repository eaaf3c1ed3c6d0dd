//! Where a request's data is while the daemon serves it (see
//! `params::IoMode`): in the tag's buffer, which ublk copies to and from; or
//! in the request's own pages, which ublk registered as a fixed buffer in the
//! queue's ring and which io_uring's fixed-buffer operations reach. Small
//! requests in the latter mode whose data is in a mapping already skip the
//! trip through an io_uring worker (`USER_COPY_MAX`): a WRITE is copied with
//! ublk's user copy (`pread` on the device's char device, into the
//! mapping), a READ through the tag's pipe (`exec::pipe_read`; user copy,
//! `pwrite` from the mapping, when there is no pipe).

use libublk::helpers::IoBuf;
use libublk::io::BufDesc;
use libublk::sys;
use std::os::fd::RawFd;

/// Largest request whose data is moved by user copy (or, for a READ,
/// through the tag's pipe) rather than the ring.
/// Measured in the benchmark guest (7.3, random reads from a tmpfs base at
/// QD32, medians of 3 rounds): 16 KiB reads 322 MB/s by user copy against
/// 445 through the ring, 64 KiB 379 against 955 (one boot); 4 KiB reads
/// 45,314 IOPS by user copy (a probe boot) where the ring gave 35,795 (the
/// benchmark boot before). The ring's worker copies faster; the system call
/// wins only for small requests.
pub const USER_COPY_MAX: usize = 4096;

/// ublk's user copy for one queue: `pread`/`pwrite` on the char device at a
/// position that names the request (`UBLK_F_USER_COPY`).
#[derive(Clone, Copy, Debug)]
pub struct UserCopy {
    pub fd: RawFd,
    pub qid: u16,
}

/// Where in the char device one request's bytes are.
#[derive(Clone, Copy, Debug)]
pub struct UserCopyAt {
    pub fd: RawFd,
    pub pos: u64,
}

impl UserCopy {
    /// Byte `at` of request `tag`'s data.
    pub fn at(self, tag: u16, at: usize) -> UserCopyAt {
        UserCopyAt {
            fd: self.fd,
            pos: libublk::io::UblkIOCtx::ublk_user_copy_pos(self.qid, tag, at as u32),
        }
    }
}

/// A tag's data space, for all the requests it serves.
pub enum TagBuf {
    /// Copy mode: the tag's buffer, as large as the largest request.
    Memory(IoBuf<u8>),
    /// Zero copy: the request's pages are fixed buffer `index`, and user
    /// copy reaches them too if the device has it.
    Registered { index: u16, copy: Option<UserCopy> },
}

impl TagBuf {
    /// How the tag's fetch and commit commands name its data space. Zero
    /// copy asks ublk to register each request's pages as fixed buffer
    /// `index`, without fallback: a request whose pages cannot be registered
    /// fails.
    pub fn desc(&self) -> BufDesc<'_> {
        match self {
            TagBuf::Memory(b) => BufDesc::Slice(b.as_slice()),
            TagBuf::Registered { index, .. } => BufDesc::AutoReg(sys::ublk_auto_buf_reg {
                index: *index,
                ..Default::default()
            }),
        }
    }

    /// The buffer the first fetch registers with libublk, in copy mode.
    pub fn io_buf(&self) -> Option<&IoBuf<u8>> {
        match self {
            TagBuf::Memory(b) => Some(b),
            TagBuf::Registered { .. } => None,
        }
    }

    /// The data space of a request of `len` bytes.
    pub fn request(&mut self, len: usize) -> RequestBuf<'_> {
        match self {
            TagBuf::Memory(b) => RequestBuf::Memory(&mut b.as_mut_slice()[..len]),
            TagBuf::Registered { index, copy } => RequestBuf::Registered {
                index: *index,
                len,
                copy: *copy,
            },
        }
    }
}

/// One request's data.
pub enum RequestBuf<'a> {
    /// In the daemon's memory, exactly as long as the request.
    Memory(&'a mut [u8]),
    /// In fixed buffer `index` of the queue's ring, `len` bytes.
    Registered {
        index: u16,
        len: usize,
        copy: Option<UserCopy>,
    },
}

impl RequestBuf<'_> {
    /// Where user copy reaches byte `at` of the request, if the request is
    /// small enough for it (`USER_COPY_MAX`).
    pub fn user_copy(&self, at: usize) -> Option<UserCopyAt> {
        match *self {
            RequestBuf::Registered {
                index,
                len,
                copy: Some(c),
            } if len <= USER_COPY_MAX => Some(c.at(index, at)),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            RequestBuf::Memory(b) => b.len(),
            RequestBuf::Registered { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same data space, borrowed for a shorter time.
    pub fn reborrow(&mut self) -> RequestBuf<'_> {
        match self {
            RequestBuf::Memory(b) => RequestBuf::Memory(b),
            RequestBuf::Registered { index, len, copy } => RequestBuf::Registered {
                index: *index,
                len: *len,
                copy: *copy,
            },
        }
    }
}
