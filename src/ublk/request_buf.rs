//! Where a request's data is while the daemon serves it (see
//! `params::IoMode`): in the tag's buffer, which ublk copies to and from (or,
//! with user copy, the daemon itself, `TagBuf::UserCopied`); or in the
//! request's own pages, which ublk registered as a fixed buffer in the
//! queue's ring and which io_uring's fixed-buffer operations reach. Small
//! requests in the latter mode whose data is in a mapping already skip the
//! trip through an io_uring worker (`USER_COPY_MAX`): a WRITE is copied with
//! ublk's user copy (`pread` on the device's char device, into the
//! mapping; or, where the overlay has no page for it yet, into the tag's
//! staging buffer, to be written from there), a READ through the tag's
//! pipe (`exec::read::pipe_read`; user copy, `pwrite` from the mapping,
//! when there is no pipe). A larger READ, or one of several runs, all in
//! mappings goes through the tag's pipe whatever its size
//! (`exec::read::pipe_read_all`); user copy of each of its runs measured
//! slower than the ring's reads (docs/benchmarks.md).

use libublk::helpers::IoBuf;
use libublk::io::BufDesc;
use libublk::sys;
use std::io;
use std::os::fd::RawFd;

/// Largest request whose data is moved by user copy (or, for a READ, the
/// tag's pipe: `exec::read::pipe_read`) rather than the ring; a larger
/// READ whose runs all lie in mappings takes the pipe whole
/// (`exec::read::pipe_read_all`). User copy beats the ring's worker only
/// for small requests (the measurements are in docs/benchmarks.md).
pub(crate) const USER_COPY_MAX: usize = 4096;

/// ublk's user copy for one queue: `pread`/`pwrite` on the char device at a
/// position that names the request (`UBLK_F_USER_COPY`).
#[derive(Clone, Copy, Debug)]
pub struct UserCopy {
    pub(crate) fd: RawFd,
    pub(crate) qid: u16,
}

/// Where in the char device one request's bytes are.
#[derive(Clone, Copy, Debug)]
pub struct UserCopyAt {
    pub(crate) fd: RawFd,
    pub(crate) pos: u64,
}

impl UserCopy {
    /// Byte `at` of request `tag`'s data.
    pub(crate) fn at(self, tag: u16, at: usize) -> UserCopyAt {
        UserCopyAt {
            fd: self.fd,
            pos: libublk::io::UblkIOCtx::ublk_user_copy_pos(self.qid, tag, at as u32),
        }
    }
}

impl UserCopyAt {
    /// Byte `pos` of `fd`, a plain file that stands in for the char device
    /// (tests of the executor).
    pub fn in_file(fd: RawFd, pos: u64) -> UserCopyAt {
        UserCopyAt { fd, pos }
    }

    /// Copies `pieces` of memory (`(address, length)`, in order) into the
    /// request from here (one `pwritev`): all of them, or an error.
    pub fn write_pieces(self, pieces: &[(usize, usize)]) -> io::Result<()> {
        let want: usize = pieces.iter().map(|p| p.1).sum();
        let n = crate::sys::pwritev(self.fd, pieces, self.pos)?;
        if n != want {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    /// Copies the request's bytes from here into `buf` (one `pread`): all
    /// of them, or an error.
    pub(crate) fn read_into(self, buf: &mut [u8]) -> io::Result<()> {
        let n = crate::sys::pread(self.fd, buf, self.pos)?;
        if n != buf.len() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

/// A tag's data space, for all the requests it serves.
pub(crate) enum TagBuf {
    /// Copy mode: the tag's buffer, as large as the largest request.
    Memory(IoBuf<u8>),
    /// User copy (`params::IoMode::UserCopy`): the tag's buffer as in copy
    /// mode, and where the tag's request is in the char device, from which
    /// the daemon copies a WRITE's data and into which a READ's.
    UserCopied { buf: IoBuf<u8>, at: UserCopyAt },
    /// Zero copy: the request's pages are fixed buffer `index`, and user
    /// copy reaches them too if the device has it. `staging` (as long as
    /// `USER_COPY_MAX` with user copy, else empty) is where user copy puts
    /// a small WRITE's data that must pass through the daemon's memory.
    Registered {
        index: u16,
        copy: Option<UserCopy>,
        staging: Box<[u8]>,
    },
}

impl TagBuf {
    /// Zero copy's data space of tag `index`.
    pub(crate) fn registered(index: u16, copy: Option<UserCopy>) -> TagBuf {
        let staging = match copy {
            Some(_) => vec![0u8; USER_COPY_MAX].into_boxed_slice(),
            None => Box::default(),
        };
        TagBuf::Registered {
            index,
            copy,
            staging,
        }
    }

    /// How the tag's fetch and commit commands name its data space. Zero
    /// copy asks ublk to register each request's pages as fixed buffer
    /// `index`, without fallback: a request whose pages cannot be registered
    /// fails.
    pub(crate) fn desc(&self) -> BufDesc<'_> {
        match self {
            TagBuf::Memory(b) => BufDesc::Slice(b.as_slice()),
            // ublk takes no address with user copy.
            TagBuf::UserCopied { .. } => BufDesc::Slice(&[]),
            TagBuf::Registered { index, .. } => BufDesc::AutoReg(sys::ublk_auto_buf_reg {
                index: *index,
                ..Default::default()
            }),
        }
    }

    /// The buffer the first fetch registers with libublk, in copy mode.
    pub(crate) fn io_buf(&self) -> Option<&IoBuf<u8>> {
        match self {
            TagBuf::Memory(b) => Some(b),
            TagBuf::UserCopied { .. } | TagBuf::Registered { .. } => None,
        }
    }

    /// Where the daemon copies the request's data to and from, in user
    /// copy mode.
    pub(crate) fn copied_at(&self) -> Option<UserCopyAt> {
        match self {
            TagBuf::UserCopied { at, .. } => Some(*at),
            _ => None,
        }
    }

    /// The data space of a request of `len` bytes.
    pub(crate) fn request(&mut self, len: usize) -> RequestBuf<'_> {
        match self {
            TagBuf::Memory(b) | TagBuf::UserCopied { buf: b, .. } => {
                RequestBuf::Memory(&mut b.as_mut_slice()[..len])
            }
            TagBuf::Registered {
                index,
                copy,
                staging,
            } => RequestBuf::Registered {
                index: *index,
                len,
                copy: *copy,
                staging,
            },
        }
    }
}

/// One request's data.
pub enum RequestBuf<'a> {
    /// In the daemon's memory, exactly as long as the request.
    Memory(&'a mut [u8]),
    /// In fixed buffer `index` of the queue's ring, `len` bytes; the tag's
    /// staging buffer beside it (see `TagBuf::Registered`).
    Registered {
        index: u16,
        len: usize,
        copy: Option<UserCopy>,
        staging: &'a mut [u8],
    },
}

impl RequestBuf<'_> {
    /// Where user copy reaches byte `at` of the request, if the request is
    /// small enough for it (`USER_COPY_MAX`).
    pub(crate) fn user_copy(&self, at: usize) -> Option<UserCopyAt> {
        match self {
            &RequestBuf::Registered {
                index,
                len,
                copy: Some(c),
                ..
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
    pub(crate) fn reborrow(&mut self) -> RequestBuf<'_> {
        match self {
            RequestBuf::Memory(b) => RequestBuf::Memory(b),
            RequestBuf::Registered {
                index,
                len,
                copy,
                staging,
            } => RequestBuf::Registered {
                index: *index,
                len: *len,
                copy: *copy,
                staging,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    /// A small WRITE's data with zero copy: user copy reads it at the
    /// request's position in the char device into the tag's staging
    /// buffer. A plain file stands in for the char device, its bytes at the
    /// position ublk gives queue 1, tag 3.
    #[test]
    fn staging_takes_a_small_write_by_user_copy() {
        let dev = crate::test_files::unlinked(&std::env::temp_dir(), "staging");
        let copy = UserCopy {
            fd: dev.as_raw_fd(),
            qid: 1,
        };
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 251) as u8).collect();
        dev.write_all_at(&data, copy.at(3, 0).pos).unwrap();

        let mut tag = TagBuf::registered(3, Some(copy));
        let TagBuf::Registered { staging, .. } = &tag else {
            unreachable!()
        };
        assert_eq!(staging.len(), USER_COPY_MAX);
        let RequestBuf::Registered {
            len, copy, staging, ..
        } = tag.request(4096)
        else {
            unreachable!()
        };
        let from = copy.unwrap().at(3, 0);
        from.read_into(&mut staging[..len]).unwrap();
        assert_eq!(&staging[..len], &data[..]);
        // A part of the request, from an offset in it.
        let mut part = vec![0u8; 1000];
        copy.unwrap().at(3, 512).read_into(&mut part).unwrap();
        assert_eq!(part, data[512..1512]);
        // Fewer bytes than asked for (past the end here) are an error.
        let err = copy.unwrap().at(3, 4000).read_into(&mut part).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        // Without user copy there is no staging buffer.
        let TagBuf::Registered { staging, .. } = TagBuf::registered(3, None) else {
            unreachable!()
        };
        assert!(staging.is_empty());
    }
}
