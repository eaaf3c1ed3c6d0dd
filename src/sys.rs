//! The system calls the standard library does not wrap, each behind a safe
//! function (but `fork`, an `unsafe fn` whose caller says why it is sound):
//!
//! - shared file mappings: the live map as atomic words (`MappedFile`); the
//!   base or overlay in memory (`SharedMap`), read by copying, written by
//!   the kernel (ublk's user copy, `MADV_POPULATE_WRITE`), and put in a
//!   `Pipe` by `vmsplice`;
//! - file I/O: `fallocate` (allocate, punch a hole), `pread` on a raw
//!   descriptor, `preadv2(RWF_NOWAIT)`, `cachestat`, `copy_file_range`,
//!   `posix_fadvise`, a block device's size, the alignment `O_DIRECT` needs
//!   (`statx`), whether a file is on tmpfs;
//! - the process: the open-files limit, root or not, `fork`, detaching from
//!   the terminal, waiting for and sending termination signals.
//!
//! Every `unsafe` block here has a `// SAFETY:` line saying why it is sound.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;

/// A file mapped read-write and shared, viewed as 64-bit atomic words.
/// Stores through it reach the file's page cache at once, so they survive the
/// process even if it is killed.
pub struct MappedFile {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics.
unsafe impl Send for MappedFile {}
// SAFETY: as above; `&[AtomicU64]` is Sync.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Maps the first `len` bytes of `file` (which must be at least that long;
    /// `len` a multiple of 8).
    pub fn map(file: &File, len: usize) -> io::Result<MappedFile> {
        assert!(len.is_multiple_of(8) && len > 0);
        // SAFETY: a fresh mapping of a descriptor we own; the kernel checks
        // the arguments and returns MAP_FAILED on error, which we test.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MappedFile { ptr, len })
    }

    pub(crate) fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is `len` bytes, page aligned (so 8-byte
        // aligned), lives until drop, and is only ever accessed atomically.
        unsafe { std::slice::from_raw_parts(self.ptr as *const AtomicU64, self.len / 8) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `map`, once.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// A file mapped shared: reading it is a memory copy, with no system call.
/// Used for the base and the overlay when they live in memory. This process
/// only ever reads through it. The kernel writes the file: io_uring writes,
/// hole punching, and, when mapped `writable`, ublk's copy of a WRITE's data
/// into the address the daemon names (see `ublk::write_data`). A read
/// racing a write to the same bytes sees old or new bytes, as on any block
/// device.
pub(crate) struct SharedMap {
    ptr: *mut u8,
    len: usize,
    writable: bool,
    /// Pages made present once, remembered where they stay the file's
    /// (`Present`); `None`: every read makes its pages present again.
    present: Option<Present>,
}

/// Which pages of a `SharedMap` a read once made present, one bit each: a
/// read of pages all set needs no new `populate_for_reads`,
/// whose walk of a large range, or system call for a small one, costs more
/// than the copy it protects. A tmpfs page once present stays the file's
/// (it may be swapped out, never dropped) until the file is punched or
/// shortened, so a record is kept only for files whose read ranges are never
/// punched while they can be read:
///
/// - a file that nothing writes, shortens or punches while it is mapped
///   (the base, a frozen layer: `map_unchanging`). Something outside that
///   truncates or punches it while it is served could then make a read
///   fault: they are under shared locks, and must not be changed;
/// - the overlay (`map_overlay`), read in whole blocks of pages: the daemon
///   reads through the mapping only blocks that the map says hold data, a
///   write gave each of their pages, and only a punch of a block that the
///   map no longer reads from the overlay (`Zero`) takes them. A bit left
///   set for a punched block does no harm to a READ planned after the
///   block became `Zero`: the block is read from the overlay again only
///   after a write that succeeded gave it its pages back, and a copy from
///   pages the file holds takes at most a fault that maps them. A READ
///   planned before (a DISCARD of the same block racing it) that copies
///   after the punch can fault on the hole; on a tmpfs full by then that
///   fault is SIGBUS, and the daemon dies (the device waits for `recover`,
///   nothing is lost). The punch would have to wait for such READs, which
///   take no lock: not done (docs/design.md, "Known limits").
///
/// A bit per page, where a READ's runs are whole blocks of pages: a record
/// by any larger granule would never see a run of a disk written in small
/// blocks cover one whole. It costs a 32,768th of the mapping.
struct Present {
    bits: Box<[AtomicU64]>,
}

impl Present {
    fn new(len: usize) -> Present {
        let pages = (len as u64).div_ceil(PRESENT_GRANULE);
        Present {
            bits: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// The most bytes `SharedMap::copy_out` hands one `memcpy`. glibc's
/// `memcpy` copies larger sizes with `rep movsb`, which QEMU's software
/// emulation (where the benchmarks run) executes several times slower than
/// the vector loop it uses below this size; on hardware, copying in pieces
/// of this size costs about a tenth more than one `memcpy`
/// (docs/benchmarks.md).
const COPY_PIECE: usize = 8192;

/// Copies `len` bytes from `from` to `to`, in `memcpy`s of at most
/// `COPY_PIECE` bytes.
///
/// # Safety
///
/// `from` must be readable and `to` writable for `len` bytes without a
/// fault that could fail, and the two must not overlap.
pub(crate) unsafe fn copy_by_pieces(from: *const u8, to: *mut u8, len: usize) {
    let mut at = 0;
    while at < len {
        let n = COPY_PIECE.min(len - at);
        // SAFETY: inside both ranges, which the caller vouches for.
        unsafe { std::ptr::copy_nonoverlapping(from.add(at), to.add(at), n) };
        at += n;
    }
}

/// The bytes one bit of `Present` stands for: a page.
const PRESENT_GRANULE: u64 = 4096;

// SAFETY: this process only ever reads through the mapping; writes to the
// file come from the kernel, so sharing reads across threads is sound.
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Maps the first `len` bytes of `file`; `writable` lets the kernel
    /// copy into the mapping on this process's behalf.
    pub(crate) fn map(file: &File, len: usize, writable: bool) -> io::Result<SharedMap> {
        assert!(len > 0);
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a descriptor we own; failure is
        // MAP_FAILED, which we test.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedMap {
            ptr: ptr as *mut u8,
            len,
            writable,
            present: None,
        })
    }

    /// As `map`, read-only, for a file that nothing writes, shortens or
    /// punches while it is mapped (the base, a frozen layer): pages made
    /// present once are remembered (`Present`).
    pub(crate) fn map_unchanging(file: &File, len: usize) -> io::Result<SharedMap> {
        let mut m = SharedMap::map(file, len, false)?;
        m.present = Some(Present::new(len));
        Ok(m)
    }

    /// As `map`, writable, for the overlay, whose blocks are read through
    /// the mapping only while they hold data: pages made present once are
    /// remembered (`Present`).
    pub(crate) fn map_overlay(file: &File, len: usize) -> io::Result<SharedMap> {
        let mut m = SharedMap::map(file, len, true)?;
        m.present = Some(Present::new(len));
        Ok(m)
    }

    /// Copies `dst.len()` bytes from offset `off` into `dst`, once their
    /// pages are present (`populate_for_reads`); the error of that, with
    /// `dst` untouched, when they cannot be.
    pub(crate) fn copy_out(&self, off: u64, dst: &mut [u8]) -> io::Result<()> {
        self.populate_for_reads(off, dst.len())?;
        let src = self.addr(off, dst.len());
        // SAFETY: the source is inside the mapping (`addr` checked the
        // whole range), which lives until drop and which the file backs in
        // full (the file is never shortened while mapped); its pages were
        // made present (just now, or once before in a file that keeps them:
        // `present`), so the copy takes no fault that could fail; `dst` is
        // distinct, writable memory of the same length.
        unsafe { copy_by_pieces(src, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Makes every page of `[off, off + len)` present in the mapping now
    /// (`MADV_POPULATE_READ`, Linux 5.14), so that reading them through it,
    /// here or by ublk at a commit, takes no page fault. A hole of a tmpfs
    /// file needs a new page for that: on a full tmpfs this call fails
    /// (EFAULT or ENOMEM) where a plain read of the mapping would raise
    /// SIGBUS; the caller then reads the file (`pread` gives a hole's zeros
    /// without allocating). For pages already present it only walks the
    /// page table.
    pub fn populate_for_reads(&self, off: u64, len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let Some(present) = &self.present else {
            return self.populate(off, len);
        };
        use std::sync::atomic::Ordering::Relaxed;
        let g = PRESENT_GRANULE;
        let bit = |i: u64| (&present.bits[(i / 64) as usize], 1u64 << (i % 64));
        if (off / g..(off + len as u64).div_ceil(g)).all(|i| {
            let (w, b) = bit(i);
            w.load(Relaxed) & b != 0
        }) {
            return Ok(());
        }
        // The range itself (no page more: a hole's page costs memory), and
        // then the pages it covers whole are remembered.
        self.populate(off, len)?;
        let end = off + len as u64;
        let whole = off.div_ceil(g)..(end / g).max(off.div_ceil(g));
        for i in whole {
            let (w, b) = bit(i);
            w.fetch_or(b, Relaxed);
        }
        // The last page of a mapping whose length is not a multiple of one
        // is whole when the range reaches the end.
        if end == self.len as u64 && !end.is_multiple_of(g) && off <= end / g * g {
            let (w, b) = bit(end / g);
            w.fetch_or(b, Relaxed);
        }
        Ok(())
    }

    fn populate(&self, off: u64, len: usize) -> io::Result<()> {
        let at = self.addr(off, len);
        let lead = at as usize % 4096;
        // SAFETY: madvise on pages inside our own live mapping (`addr`
        // checks the range); POPULATE_READ faults them in, reporting a
        // failed fault as an error instead of a signal, and changes no byte.
        let r = unsafe {
            libc::madvise(
                at.wrapping_sub(lead) as *mut libc::c_void,
                len + lead,
                libc::MADV_POPULATE_READ,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The address of bytes `[off, off + len)` of the mapping (panics if
    /// they are not all inside it). ublk also copies a READ's data from such
    /// an address, the one its commit names.
    pub(crate) fn addr(&self, off: u64, len: usize) -> *const u8 {
        let off = off as usize;
        assert!(off.checked_add(len).is_some_and(|end| end <= self.len));
        self.ptr.wrapping_add(off)
    }

    /// Whether the kernel may copy into the mapping.
    pub(crate) fn is_writable(&self) -> bool {
        self.writable
    }

    /// As `addr`, for the kernel to copy into: `None` unless `writable`.
    pub(crate) fn addr_for_kernel_writes(&self, off: u64, len: usize) -> Option<*mut u8> {
        self.writable.then(|| self.addr(off, len) as *mut u8)
    }

    /// Writes bytes `[off, off + len)` of the mapping to `fd` at `pos`
    /// (one `pwrite`): how ublk's user copy takes a READ's data into the
    /// request. Returns the bytes written. The kernel reads the mapping: a
    /// page it cannot fault in (a hole of a full tmpfs) ends the copy short
    /// or fails it (EFAULT), never with a signal.
    pub(crate) fn write_to(&self, off: u64, len: usize, fd: RawFd, pos: u64) -> io::Result<usize> {
        let src = self.addr(off, len);
        // SAFETY: the source range is inside the live mapping (`addr`
        // checks); the kernel only reads it.
        let r = unsafe { libc::pwrite(fd, src.cast(), len, pos as libc::off_t) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Reads `len` bytes of `fd` at `pos` into the mapping at `off` (one
    /// `pread`): how ublk's user copy puts a WRITE's data straight into the
    /// file's pages. The kernel writes them; a page it cannot fault in (on
    /// a full tmpfs) ends the copy short or fails it (EFAULT). EACCES unless
    /// `writable`. Returns the bytes read.
    pub(crate) fn read_from(&self, off: u64, len: usize, fd: RawFd, pos: u64) -> io::Result<usize> {
        let Some(dst) = self.addr_for_kernel_writes(off, len) else {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        };
        // SAFETY: the destination range is inside the live, writable
        // mapping (`addr` checks); only the kernel writes through it, and a
        // failed fault is an error return, not a signal.
        let r = unsafe { libc::pread(fd, dst.cast(), len, pos as libc::off_t) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Makes every page of `[off, off + len)` present, initialized and
    /// writable in the mapping now (`MADV_POPULATE_WRITE`, Linux 5.14), so
    /// the kernel's copies into them later need no page fault. Meant for
    /// pages already allocated (`allocate`); one that is missing on a full
    /// file system fails this call (ENOMEM or EFAULT).
    pub(crate) fn populate_for_writes(&self, off: u64, len: usize) -> io::Result<()> {
        let Some(at) = self.addr_for_kernel_writes(off, len) else {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        };
        let lead = at as usize % 4096;
        // SAFETY: madvise on pages inside our own live mapping (`addr`
        // checks the range); POPULATE_WRITE faults them in and changes no
        // byte of their content.
        let r = unsafe {
            libc::madvise(
                at.wrapping_sub(lead).cast(),
                len + lead,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Puts bytes `[off, off + len)` of the mapping into `pipe` by
    /// reference (`vmsplice`: the pipe holds the file's pages, and a read
    /// from it copies what they hold then). All of them or, as an error,
    /// none: a pipe that cannot take them all is emptied again. A page
    /// the kernel cannot fault in (a hole of a full tmpfs) fails it
    /// (EFAULT), never with a signal.
    pub(crate) fn splice_to(&self, off: u64, len: usize, pipe: &Pipe) -> io::Result<()> {
        let iov = libc::iovec {
            iov_base: self.addr(off, len) as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: the range is inside the live mapping (`addr` checks); the
        // kernel takes references to its pages and writes nothing to it.
        let n = unsafe { libc::vmsplice(pipe.write.as_raw_fd(), &iov, 1, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != len {
            pipe.drain();
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        Ok(())
    }
}

/// A pipe that holds pages of a mapping (`SharedMap::splice_to`) until a
/// read takes them out. With zero copy a small READ of mapped data is read
/// from one into the request's registered pages: the kernel copies pipe
/// pages into a fixed buffer with `memcpy`, where user copy (`pwrite` from
/// the mapping) copies from user memory with `rep movsb`, which QEMU's
/// software emulation runs a byte at a time (docs/benchmarks.md). Both ends are non-blocking, so a read never waits for bytes
/// that are not there. It holds one request's run at a time: a tag has its
/// own, empty between requests.
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// The bytes it can hold (`grow`).
    capacity: usize,
}

impl Pipe {
    pub(crate) fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array we pass.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: two fresh descriptors that nothing else owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut p = Pipe {
            read,
            write,
            capacity: 0,
        };
        p.capacity = p.grow(0);
        Ok(p)
    }

    /// Lets the pipe hold `bytes` if the system allows it (0: only asks);
    /// returns how many bytes it holds, kept if it could not grow.
    fn grow(&self, bytes: usize) -> usize {
        let fd = self.write.as_raw_fd();
        // SAFETY: fcntl on our own pipe; F_SETPIPE_SZ fails cleanly (EPERM
        // above the unprivileged limit, EBUSY) and changes nothing then.
        unsafe {
            if bytes > 0 {
                libc::fcntl(fd, libc::F_SETPIPE_SZ, bytes as libc::c_int);
            }
            libc::fcntl(fd, libc::F_GETPIPE_SZ).max(0) as usize
        }
    }

    /// A pipe that holds `bytes` if the system allows it, else as much as
    /// it can (`capacity`).
    pub(crate) fn with_capacity(bytes: usize) -> io::Result<Pipe> {
        let mut p = Pipe::new()?;
        p.capacity = p.grow(bytes);
        Ok(p)
    }

    /// The bytes the pipe can hold, in pages: a piece that does not start
    /// or end on a page boundary takes a page for each it touches.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Puts `pieces` of this process's memory, `(address, length)` of
    /// mappings in order, into the pipe by reference in one `vmsplice`, as
    /// `SharedMap::splice_to` does one range: all of them or, as an error,
    /// none (the pipe emptied again). A page the kernel cannot fault in (a
    /// hole of a full tmpfs) fails it (EFAULT), never with a signal.
    pub(crate) fn hold(&self, pieces: &[(usize, usize)]) -> io::Result<()> {
        let iov = iovecs(pieces)?;
        let want: usize = pieces.iter().map(|p| p.1).sum();
        // SAFETY: the kernel takes references to the pages the iovecs name
        // and writes nothing to them; an address it cannot reach is an
        // error return. The array lives across the call.
        let n = unsafe { libc::vmsplice(self.write.as_raw_fd(), iov.as_ptr(), iov.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            self.drain();
            return Err(e);
        }
        if n as usize != want {
            self.drain();
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        Ok(())
    }

    /// The end the held bytes are read from.
    pub(crate) fn read_end(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Discards whatever the pipe holds.
    pub(crate) fn drain(&self) {
        let mut sink = [0u8; 4096];
        loop {
            // SAFETY: reads into our own buffer; the read end does not block.
            let n =
                unsafe { libc::read(self.read.as_raw_fd(), sink.as_mut_ptr().cast(), sink.len()) };
            if n <= 0 {
                break;
            }
        }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `map`, once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// An eventfd: a counter that any thread adds to ([`EventFd::signal`]) and
/// one reader reads (a queue's ring reads it, so its thread never blocks).
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; a valid fd is owned at once.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and nothing else owns it.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds 1 to the counter, waking its reader.
    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one`, which outlives the call. It
        // can only fail if the counter would overflow, which 1 at a time
        // per fetch never makes it.
        unsafe {
            libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The size of a memory page, in bytes.
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf only reads the value it is asked for.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as u64 } else { 4096 }
}

/// The most one `fadvise(WILLNEED)` of `file` reads ahead, in bytes: the
/// kernel reads at most max(readahead size, largest I/O) of the block
/// device that holds the file's pages per call, and ignores the rest of the
/// range. Read from that device's queue in sysfs (a partition's is its
/// disk's); `None` when no block device's queue describes the file (tmpfs,
/// a network file system, btrfs's anonymous devices).
pub(crate) fn willneed_limit(file: &File) -> Option<u64> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = file.metadata().ok()?;
    let dev = if m.file_type().is_block_device() {
        m.rdev()
    } else {
        m.dev()
    };
    let node = std::path::PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(dev),
        libc::minor(dev)
    ));
    let queue = if node.join("partition").exists() {
        node.join("../queue")
    } else {
        node.join("queue")
    };
    let kib = |name: &str| -> Option<u64> {
        std::fs::read_to_string(queue.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let limit = kib("read_ahead_kb")?.max(kib("max_sectors_kb")?) << 10;
    (limit > 0).then_some(limit)
}

/// Whether `file` lives in memory: a regular file in tmpfs, whose "I/O" is
/// memory copies. A device node is not, wherever it lives: /dev is
/// devtmpfs, which `fstatfs` reports as tmpfs, but a block device's data is
/// on the device.
pub(crate) fn is_tmpfs(file: &File) -> bool {
    const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
    if !file.metadata().is_ok_and(|m| m.file_type().is_file()) {
        return false;
    }
    // SAFETY: fstatfs fills the local struct we pass.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::fstatfs(file.as_raw_fd(), &mut st) == 0 && st.f_type as libc::c_long == TMPFS_MAGIC
    }
}

/// Allocates `[off, off+len)` of `file` (data already there stays).
pub(crate) fn allocate(file: &File, off: u64, len: u64) -> io::Result<()> {
    fallocate(file, 0, off, len)
}

/// Frees `[off, off+len)` of `file`, which then reads as zeros; the size stays.
pub(crate) fn punch_hole(file: &File, off: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )
}

fn fallocate(file: &File, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Most pieces one `Pipe::hold` takes (`IOV_MAX`).
const GATHER_MAX: usize = 1024;

/// `pread` on a descriptor the caller keeps open (ublk's char device, for
/// user copy): the bytes read into `buf`.
pub(crate) fn pread(fd: RawFd, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    // SAFETY: `buf` is live and writable for the whole call and the kernel
    // writes at most `buf.len()` bytes into it; a closed `fd` is an error
    // return.
    let r = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), pos as libc::off_t) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// The iovecs of `pieces`, `(address, length)` of this process's memory,
/// for a gathering system call; more than `GATHER_MAX` is EINVAL.
fn iovecs(pieces: &[(usize, usize)]) -> io::Result<Vec<libc::iovec>> {
    if pieces.len() > GATHER_MAX {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(pieces
        .iter()
        .map(|&(at, len)| libc::iovec {
            iov_base: at as *mut libc::c_void,
            iov_len: len,
        })
        .collect())
}

/// `pwritev` of `pieces` of this process's memory, `(address, length)` in
/// order, to `fd` at `pos` (ublk's user copy: a READ's runs, each from the
/// mapping or buffer that holds it, into the request): the bytes written.
/// The kernel only reads the pieces; an address it cannot reach (a hole of
/// a full tmpfs) is an error return or a short count, never a signal.
pub(crate) fn pwritev(fd: RawFd, pieces: &[(usize, usize)], pos: u64) -> io::Result<usize> {
    pwritev2(fd, &iovecs(pieces)?, pos, 0)
}

/// `pwritev2` of `len` bytes of this process's memory at `from` to `fd` at
/// `pos`, with `RWF_DSYNC` (durable when it returns) if `dsync`: the bytes
/// written. For the executor's writes on a queue's thread
/// (`ops::Op::run_here`), whose memory the caller keeps in place.
pub(crate) fn pwrite_from(
    fd: RawFd,
    from: *const u8,
    len: usize,
    pos: u64,
    dsync: bool,
) -> io::Result<usize> {
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    // One piece needs no gathering array on the heap.
    let iov = libc::iovec {
        iov_base: from as *mut libc::c_void,
        iov_len: len,
    };
    pwritev2(fd, &[iov], pos, flags)
}

/// `pwritev2` of the memory `iov` names (as `pwritev`) with `flags`
/// (`RWF_*`).
fn pwritev2(fd: RawFd, iov: &[libc::iovec], pos: u64, flags: i32) -> io::Result<usize> {
    // SAFETY: the kernel reads the memory the iovecs name and writes none of
    // it; an address it cannot reach is an error return. The array is
    // borrowed across the call.
    let r = unsafe {
        libc::pwritev2(
            fd,
            iov.as_ptr(),
            iov.len() as i32,
            pos as libc::off_t,
            flags,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// `fdatasync(fd)`.
pub(crate) fn fdatasync(fd: RawFd) -> io::Result<()> {
    // SAFETY: no memory is passed; a closed `fd` is an error return.
    if unsafe { libc::fdatasync(fd) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `pread` of `len` bytes of `fd` at `pos` into memory at `at` (ublk's user
/// copy: a WRITE's data into the tag's buffer or the overlay's mapped
/// pages, as `UBLK_U_IO_NEED_GET_DATA` has ublk do in copy mode): the bytes
/// read. The caller names memory that nothing else reads or writes
/// meanwhile; an address the kernel cannot reach is an error return or a
/// short count, never a signal.
pub(crate) fn pread_to(fd: RawFd, at: *mut u8, len: usize, pos: u64) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `len` bytes at `at`, memory the
    // caller reserves for it (above); a page it cannot fault in ends the
    // copy with an error or short count.
    let r = unsafe { libc::pread(fd, at.cast(), len, pos as libc::off_t) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// `preadv2(RWF_NOWAIT)`: reads what the page cache holds of
/// `[off, off+buf.len())` without waiting for I/O. `EAGAIN` when the first
/// page is not cached; `EOPNOTSUPP` when the file cannot do it (tmpfs).
pub(crate) fn pread_nowait(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: one iovec describing `buf`, which is live and writable for the
    // whole call; `file` is open.
    let r = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            off as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// How many pages of `[off, off+len)` are in the page cache (`cachestat`,
/// Linux 6.5). A page counts while its read is still in flight.
pub(crate) fn cached_pages(file: &File, off: u64, len: u64) -> io::Result<u64> {
    /// `__NR_cachestat`, the same on every architecture.
    const SYS_CACHESTAT: libc::c_long = 451;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Cachestat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    let range = Range { off, len };
    let mut cs = Cachestat::default();
    // SAFETY: cachestat reads `range` and writes one `struct cachestat` into
    // `cs`; both are live locals with the kernel's layout (repr(C), u64s).
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut cs as *mut Cachestat,
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cs.nr_cache)
}

/// `copy_file_range`: copies up to `len` bytes from `src` at `src_off` to
/// `dst` at `dst_off` inside the kernel; returns how many it copied (0 at the
/// end of `src`). `EXDEV`, `EINVAL`, `EOPNOTSUPP` or `ENOSYS` when these two
/// files cannot (another file system, a block device, an old kernel).
pub(crate) fn copy_file_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
) -> io::Result<u64> {
    let mut from = src_off as libc::loff_t;
    let mut to = dst_off as libc::loff_t;
    // SAFETY: both offsets point at live locals the kernel updates; the
    // descriptors are open for the call.
    let r = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut from,
            dst.as_raw_fd(),
            &mut to,
            len as usize,
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

/// `posix_fadvise` on a descriptor we own.
pub(crate) fn fadvise(file: &File, off: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: posix_fadvise takes no memory; the descriptor is valid.
    let r = unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            off as libc::off_t,
            len as libc::off_t,
            advice,
        )
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Size in bytes of a block device (`BLKGETSIZE64`).
pub(crate) fn block_device_size(file: &File) -> io::Result<u64> {
    const BLKGETSIZE64: libc::c_ulong = 0x80081272;
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer we pass, which points
    // at a live local.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// The alignment that direct I/O (O_DIRECT) of `file` needs, as
/// `(memory, file offset and length)` in bytes: what `statx` reports
/// (`STATX_DIOALIGN`), or for a block device that does not report it its
/// logical block size. Zeros: the file cannot do direct I/O. `None`: it
/// does not say.
pub(crate) fn direct_io_align(file: &File) -> io::Result<Option<(u64, u64)>> {
    // SAFETY: statx only writes the struct we pass, a zeroed local; the
    // empty path with AT_EMPTY_PATH names the open descriptor itself.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the path is a NUL-terminated literal.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_TYPE | libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if stx.stx_mask & libc::STATX_DIOALIGN != 0 {
        return Ok(Some((
            stx.stx_dio_mem_align as u64,
            stx.stx_dio_offset_align as u64,
        )));
    }
    if u32::from(stx.stx_mode) & libc::S_IFMT == libc::S_IFBLK {
        const BLKSSZGET: libc::c_ulong = 0x1268;
        let mut sector: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int to the pointer we pass, which
        // points at a live local.
        let r =
            unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut sector as *mut libc::c_int) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(Some((sector as u64, sector as u64)));
    }
    Ok(None)
}

/// Raises this process's limit of open files to its hard limit. A tag of a
/// zero-copy queue may hold a pipe (`Pipe`, two descriptors), which at the
/// default depth of 128 is 256 descriptors a queue, and the usual soft
/// limit is 1024. Where even the hard limit is reached, a tag goes without
/// its pipe (user copy then does its reads).
pub(crate) fn raise_open_files_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the local struct; setrlimit reads it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Whether the effective user is root.
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Which side of a fork this is.
pub(crate) enum Forked {
    Parent,
    Child,
}

/// Forks the process.
///
/// # Safety
/// The process must have a single thread: the child gets a copy of this
/// thread only, and a lock another thread held (the allocator's, say)
/// would stay held in the child forever.
pub(crate) unsafe fn fork() -> io::Result<Forked> {
    // SAFETY: the caller guarantees a single-threaded process, so the child
    // inherits no lock held by another thread.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        _ => Ok(Forked::Parent),
    }
}

/// Detaches from the terminal's session and points stdin/stdout at
/// /dev/null and stderr at `log` (a file we own).
pub(crate) fn detach(log: &File) -> io::Result<()> {
    let null = File::options().read(true).write(true).open("/dev/null")?;
    // SAFETY: setsid and dup2 take no memory; the descriptors are valid for
    // the duration of the calls.
    unsafe {
        libc::setsid();
        for (src, dst) in [
            (null.as_raw_fd(), 0),
            (null.as_raw_fd(), 1),
            (log.as_raw_fd(), 2),
        ] {
            if libc::dup2(src, dst) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the local set we pass.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread and the threads it
/// starts afterwards, so that only [`wait_termination`] receives them.
pub(crate) fn block_termination_signals() {
    let set = termination_set();
    // SAFETY: the set is initialised; the old-mask pointer may be null.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits for SIGTERM, SIGINT or SIGHUP (blocked beforehand).
pub(crate) fn wait_termination() -> i32 {
    let set = termination_set();
    let mut sig = 0;
    // SAFETY: sigwait writes the signal number to a live local.
    unsafe {
        libc::sigwait(&set, &mut sig);
    }
    sig
}

/// Sends `sig` to `pid`; Ok(false) if there is no such process.
pub(crate) fn kill(pid: i32, sig: i32) -> io::Result<bool> {
    // SAFETY: kill takes no memory.
    if unsafe { libc::kill(pid, sig) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ESRCH) => Ok(false),
        _ => Err(e),
    }
}

/// The real user id of this process: who ran the command.
pub(crate) fn uid() -> u32 {
    // SAFETY: getuid has no arguments and cannot fail.
    unsafe { libc::getuid() }
}

/// The effective user id of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// The effective user id of the process at the other end of a connected
/// Unix socket, as the kernel recorded it when the connection was made
/// (`SO_PEERCRED`): the peer cannot choose it.
pub(crate) fn peer_uid(sock: &impl AsRawFd) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the local `cred`
    // and the length it wrote into the local `len`; the descriptor is valid
    // while `sock` is borrowed.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::other("SO_PEERCRED returned a short answer"));
    }
    Ok(cred.uid)
}

/// Takes a `flock` lock on `file` (exclusive, or shared) without waiting.
/// `Ok(false)` when another open file holds a lock that conflicts (in this
/// process too: the lock belongs to the open file, not the process). The
/// lock lasts until every descriptor of that open file is closed.
pub(crate) fn try_flock(file: &File, exclusive: bool) -> io::Result<bool> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    loop {
        // SAFETY: flock takes a descriptor this `File` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block device's limit is read from its own queue (found through its
    /// device number), and a file in tmpfs has none.
    #[test]
    fn willneed_limit_is_the_larger_of_readahead_and_largest_io() {
        let path = format!("/dev/shm/ublk-cow-test-{}-willneed", std::process::id());
        let shm = File::create(&path).expect("a file in /dev/shm");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(willneed_limit(&shm), None, "tmpfs has no queue");

        // A whole disk this machine has, opened read-only (tests run as
        // root), beside what its queue under /sys/block says.
        let disk = std::fs::read_dir("/sys/block")
            .expect("/sys/block")
            .filter_map(|e| e.ok())
            .find_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let file = File::open(format!("/dev/{name}")).ok()?;
                Some((name, file))
            });
        let Some((name, file)) = disk else {
            panic!("no block device can be opened: the limit of one cannot be checked");
        };
        let kib = |what: &str| -> u64 {
            std::fs::read_to_string(format!("/sys/block/{name}/queue/{what}"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let want = kib("read_ahead_kb").max(kib("max_sectors_kb")) << 10;
        assert_eq!(willneed_limit(&file), Some(want), "/dev/{name}");
    }
}
