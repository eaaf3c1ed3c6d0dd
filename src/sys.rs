//! The few system calls the standard library does not wrap: shared file
//! mappings, hole punching and fadvise. Every `unsafe` block of the engine is
//! here, each with the reason it is sound.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
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
        assert!(len % 8 == 0 && len > 0);
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

    pub fn words(&self) -> &[AtomicU64] {
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

/// Frees `[off, off+len)` of `file`, which then reads as zeros; the size stays.
pub fn punch_hole(file: &File, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `posix_fadvise` on a descriptor we own.
pub fn fadvise(file: &File, off: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
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
pub fn block_device_size(file: &File) -> io::Result<u64> {
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

/// Whether the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
