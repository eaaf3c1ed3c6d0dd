//! A WRITE's data, and where ublk copies it.
//!
//! With zero copy the data is already in the request's registered pages, and
//! the write path writes it to the overlay from there (`registered`), or for
//! a small request has ublk's user copy put it into the overlay's mapped
//! pages (`user_copy`) or into the tag's staging buffer (`in_buffer`).
//!
//! In copy mode the device sets `UBLK_F_NEED_GET_DATA`: a WRITE arrives
//! without its data, and ublk copies the data only when the daemon answers
//! with `UBLK_U_IO_NEED_GET_DATA` and an address (sent by
//! `queue::get_data`, with ublk's other commands); this file decides which
//! address and keeps what became of the data. That address is the tag's
//! buffer, from which the data is then written to the overlay; or it is the
//! overlay's own pages, mapped (`MemoryPath::placeable`), which saves that
//! second copy. ublk takes no commit of a WRITE before its data was asked
//! for, so whatever the write path did, `settle` asks for it before the
//! commit.
//!
//! With user copy (`params::IoMode::UserCopy`) the device has no
//! NEED_GET_DATA and ublk copies nothing: the same two places are filled by
//! the daemon's own `pread` from the request in the char device, on the
//! queue's thread. The data stays in the request, so a copy into the
//! overlay's pages that falls short is made again, whole, into the buffer.
//!
//! ublk copies into pages it faults in. When it cannot fault in the first
//! (a page missing on a full tmpfs), it asks for the data again after a
//! short delay; the data is then fetched into the buffer, and the ordinary
//! write to the overlay reports the error (`Placement::Refused`). A copy
//! that stops part way is `Placement::Done` with fewer bytes.

use crate::engine::Errno;
use crate::ublk::queue::{self, GetData};
use crate::ublk::request_buf::{RequestBuf, UserCopyAt};
use libublk::UblkError;
use libublk::io::UblkQueue;

/// A WRITE's data: bytes the daemon has, or a request's data in ublk.
pub struct WriteData<'a> {
    source: Source<'a>,
}

enum Source<'a> {
    /// Bytes made by the daemon itself (the zeros of a partial DISCARD).
    Bytes(&'a [u8]),
    Request(Fetch<'a>),
    /// The request's pages: fixed buffer `index` of the queue's ring, and
    /// where user copy reaches them if the request is small, with the tag's
    /// staging buffer to copy them into.
    Registered {
        index: u16,
        len: usize,
        copy: Option<UserCopyAt>,
        staging: &'a mut [u8],
    },
}

/// A request's data, fetched at most once.
struct Fetch<'a> {
    q: &'a UblkQueue<'a>,
    tag: u16,
    /// With user copy, where the data is in the char device: the daemon
    /// copies it out itself (`pread`) instead of asking ublk to.
    copy: Option<UserCopyAt>,
    /// The tag's buffer, as long as the request.
    buf: &'a mut [u8],
    state: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Still in ublk.
    Pending,
    /// Copied into `buf`.
    InBuffer,
    /// Copied where the write path asked (the overlay).
    Placed,
    /// Not to be had. The tag serves no more requests.
    Lost(Loss),
}

/// Why a request's data cannot be had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loss {
    /// The queue is going down.
    QueueDown,
    /// ublk failed the command.
    Failed(Errno),
}

/// What became of `WriteData::place`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// ublk copied this many leading bytes there: all of the request, or
    /// fewer if it could fault in only some pages (what the kernel then
    /// does with the rest differs between versions; see `exec::write::place`).
    Done(u64),
    /// ublk copied nothing there; the data can still be had in the buffer.
    Refused,
    /// The data is lost (see `State::Lost`): fail the request.
    Lost,
}

impl<'a> WriteData<'a> {
    /// Bytes the daemon already has.
    pub fn bytes(data: &'a [u8]) -> WriteData<'a> {
        WriteData {
            source: Source::Bytes(data),
        }
    }

    /// The data of WRITE `tag`. In the tag's buffer, ublk still holds it
    /// if `pending` (else it is already there, as on a device made without
    /// NEED_GET_DATA); with user copy (`copied_at`, where it is in the char
    /// device) ublk holds it until the daemon copies it.
    pub(crate) fn request(
        q: &'a UblkQueue<'a>,
        tag: u16,
        buf: RequestBuf<'a>,
        pending: bool,
        copied_at: Option<UserCopyAt>,
    ) -> WriteData<'a> {
        let copy = buf.user_copy(0);
        let buf = match buf {
            RequestBuf::Memory(b) => b,
            RequestBuf::Registered {
                index,
                len,
                staging,
                ..
            } => {
                return WriteData {
                    source: Source::Registered {
                        index,
                        len,
                        copy,
                        staging,
                    },
                };
            }
        };
        let state = if pending || copied_at.is_some() {
            State::Pending
        } else {
            State::InBuffer
        };
        WriteData {
            source: Source::Request(Fetch {
                q,
                tag,
                copy: copied_at,
                buf,
                state,
            }),
        }
    }

    pub(crate) fn size(&self) -> usize {
        match &self.source {
            Source::Bytes(b) => b.len(),
            Source::Request(f) => f.buf.len(),
            Source::Registered { len, .. } => *len,
        }
    }

    /// The fixed buffer that holds the data, with zero copy.
    pub(crate) fn registered(&self) -> Option<u16> {
        match self.source {
            Source::Registered { index, .. } => Some(index),
            _ => None,
        }
    }

    /// Where user copy reaches the data, with zero copy for a small request.
    pub(crate) fn user_copy(&self) -> Option<UserCopyAt> {
        match self.source {
            Source::Registered { copy, .. } => copy,
            _ => None,
        }
    }

    /// Whether `in_buffer` can have the data: the daemon has it, ublk copies
    /// it on request, or (zero copy) user copy reaches it and it fits the
    /// tag's staging buffer.
    pub(crate) fn can_buffer(&self) -> bool {
        match &self.source {
            Source::Bytes(_) | Source::Request(_) => true,
            Source::Registered {
                len, copy, staging, ..
            } => copy.is_some() && *len <= staging.len(),
        }
    }

    /// Whether ublk can still be told where to copy the data.
    pub(crate) fn placeable(&self) -> bool {
        matches!(&self.source, Source::Request(f) if f.state == State::Pending)
    }

    /// Has ublk copy the data to `at`, which must be `size()` bytes of a
    /// shared mapping that nothing else writes meanwhile. Only while
    /// `placeable`.
    pub(crate) async fn place(&mut self, at: *mut u8) -> Placement {
        let Source::Request(f) = &mut self.source else {
            return Placement::Refused;
        };
        if f.state != State::Pending {
            return Placement::Refused;
        }
        match f.ask(at).await {
            State::Placed => {
                // A short copy by ublk shortens the request's descriptor;
                // user copy places all or nothing (`ask`).
                let got = match f.copy {
                    Some(_) => f.buf.len() as u64,
                    None => (f.q.get_iod(f.tag).nr_sectors as u64) << 9,
                };
                f.state = State::Placed;
                Placement::Done(got.min(f.buf.len() as u64))
            }
            State::Pending => Placement::Refused,
            lost => {
                f.state = lost;
                Placement::Lost
            }
        }
    }

    /// The data, fetched into the buffer first if ublk still holds it (with
    /// zero copy: copied into the staging buffer by user copy, each time
    /// this is called); an error when it cannot be had there.
    pub(crate) async fn in_buffer(&mut self) -> Result<&[u8], Errno> {
        let stageable = self.can_buffer();
        let f = match &mut self.source {
            Source::Bytes(b) => return Ok(b),
            Source::Request(f) => f,
            Source::Registered {
                len,
                copy: Some(from),
                staging,
                ..
            } if stageable => {
                let buf = &mut staging[..*len];
                return match from.read_into(buf) {
                    Ok(()) => Ok(buf),
                    Err(e) => Err(Errno::of(&e)),
                };
            }
            // Only `registered` reaches it.
            Source::Registered { .. } => return Err(Errno::EINVAL),
        };
        if f.state == State::Pending {
            let at = f.buf.as_mut_ptr();
            f.state = match f.ask(at).await {
                State::Placed => State::InBuffer,
                // The tag's own buffer is always there to copy into.
                State::Pending => State::Lost(Loss::Failed(Errno(libc::EFAULT))),
                lost => lost,
            };
        }
        match f.state {
            State::InBuffer => Ok(&*f.buf),
            _ => Err(Errno::EIO),
        }
    }

    /// Before the commit: asks for data nobody asked for yet (the request
    /// failed before it was needed), so that ublk takes the commit. `Err`
    /// when the tag can serve no more requests.
    pub(crate) async fn settle(&mut self) -> Result<(), UblkError> {
        if self.placeable() {
            let _ = self.in_buffer().await;
        }
        match &self.source {
            // With user copy ublk needs nothing before the commit: the
            // request fails, the tag goes on.
            Source::Request(Fetch {
                state: State::Lost(lost),
                copy: None,
                ..
            }) => Err(match lost {
                Loss::QueueDown => UblkError::QueueIsDown,
                Loss::Failed(e) => UblkError::OtherError(e.negative()),
            }),
            _ => Ok(()),
        }
    }
}

impl Fetch<'_> {
    /// Has ublk copy the data to `at` (`queue::get_data`) and waits:
    /// `Placed` when it did, `Pending` when it could not and asks again,
    /// else `Lost`. With user copy the daemon copies it (`pread`, on this
    /// thread): `Placed` when all of it came, `Pending` when a page at `at`
    /// could not be faulted in (the data stays in the request, to be had
    /// again), else `Lost`.
    async fn ask(&self, at: *mut u8) -> State {
        if let Some(from) = self.copy {
            let len = self.buf.len();
            return match crate::sys::pread_to(from.fd, at, len, from.pos) {
                Ok(n) if n == len => State::Placed,
                Ok(_) => State::Pending,
                Err(e) if e.raw_os_error() == Some(libc::EFAULT) => State::Pending,
                Err(e) => State::Lost(Loss::Failed(Errno::of(&e))),
            };
        }
        match queue::get_data(self.q, self.tag, at).await {
            GetData::Copied => State::Placed,
            GetData::Again => State::Pending,
            GetData::QueueDown => State::Lost(Loss::QueueDown),
            GetData::Failed(e) => State::Lost(Loss::Failed(e)),
        }
    }
}
