//! Where a request's data is while the daemon serves it (see
//! `params::IoMode`): in the tag's buffer, which ublk copies to and from; or
//! in the request's own pages, which ublk registered as a fixed buffer in the
//! queue's ring and which only io_uring's fixed-buffer operations reach.

use libublk::helpers::IoBuf;
use libublk::io::BufDesc;
use libublk::sys;

/// A tag's data space, for all the requests it serves.
pub enum TagBuf {
    /// Copy mode: the tag's buffer, as large as the largest request.
    Memory(IoBuf<u8>),
    /// Zero copy: the request's pages are fixed buffer `index`.
    Registered { index: u16 },
}

impl TagBuf {
    /// How the tag's fetch and commit commands name its data space. Zero
    /// copy asks ublk to register each request's pages as fixed buffer
    /// `index`, without fallback: a request whose pages cannot be registered
    /// fails.
    pub fn desc(&self) -> BufDesc<'_> {
        match self {
            TagBuf::Memory(b) => BufDesc::Slice(b.as_slice()),
            TagBuf::Registered { index } => BufDesc::AutoReg(sys::ublk_auto_buf_reg {
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
            TagBuf::Registered { index } => RequestBuf::Registered { index: *index, len },
        }
    }
}

/// One request's data.
pub enum RequestBuf<'a> {
    /// In the daemon's memory, exactly as long as the request.
    Memory(&'a mut [u8]),
    /// In fixed buffer `index` of the queue's ring, `len` bytes.
    Registered { index: u16, len: usize },
}

impl RequestBuf<'_> {
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
            RequestBuf::Registered { index, len } => RequestBuf::Registered {
                index: *index,
                len: *len,
            },
        }
    }
}
