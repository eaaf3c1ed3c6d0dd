//! I/O served on the queue's own thread, without a round trip through the
//! ring, when it cannot wait for a device: reads as a copy from a mapping of
//! a file in memory (tmpfs) or of pages the page cache already holds; writes
//! to a file in memory as `pwrite`, unless they are large (`RING_WRITE_MIN`).
//! The overlay's mapping is also where ublk can copy a WRITE's data itself
//! (`placeable`). A base or layer on a device is mapped too, but only for
//! the kernel's copies of ranges its page cache holds (`mapped_for_kernel`):
//! a READ's data then goes from the page cache into the request in one copy.
//!
//! io_uring tries buffered I/O without blocking too, but hands it to a
//! worker thread whenever the file cannot promise that (tmpfs has no
//! RWF_NOWAIT on 6.12, nor do device-mapper devices such as dm-delay), and
//! even an operation it completes at once costs a ring round trip before
//! the request can complete. Here a page-cache hit or a tmpfs write is one
//! memory copy. Whatever may wait for a device is left to the ring.

use crate::engine::Errno;
use crate::sys::{self, Pipe, SharedMap};
use crate::ublk::request_buf::UserCopyAt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU8, Ordering};

/// How cached pages are read without blocking; falls from one to the next
/// the first time the file refuses.
const NOWAIT: u8 = 0; // preadv2(RWF_NOWAIT)
const CACHESTAT: u8 = 1; // cachestat says all pages are cached, then pread
const RING_ONLY: u8 = 2; // neither: everything goes to the ring

/// From this size on, a write to a file in memory goes to the ring all the
/// same: its copy (and the allocation of new pages) then runs on an io_uring
/// worker, on another CPU, while the queue's thread serves other requests:
/// faster for large writes, slower for 4 KiB ones (docs/benchmarks.md).
const RING_WRITE_MIN: usize = 128 << 10;

/// From this size on, a READ of a file on a device whose range the page
/// cache holds is named to the kernel's copy (`mapped_for_kernel`). That
/// takes two system calls (`cachestat`, then making the pages present) to
/// save one copy; a smaller READ keeps its one `pread`, which copies little.
const KERNEL_MAP_MIN: usize = 32 << 10;

/// Pages are 4 KiB on every machine this runs on; `cachestat` counts them.
const PAGE: u64 = 4096;

/// What `MemoryPath::write` did with a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Written {
    /// Written, on this thread.
    Here,
    /// Not written: the ring must do it.
    ToRing,
}

/// Inline I/O of one file (the base or the overlay).
pub(crate) struct MemoryPath {
    /// The whole file mapped, when it lives in memory. This process only
    /// reads through it: a write fault on a full tmpfs would kill the
    /// daemon, where `pwrite` returns ENOSPC. The kernel's copies into it
    /// fail cleanly instead (see `ublk::write_data`).
    map: Option<SharedMap>,
    /// The whole file mapped read-only when it lives on a device (a base or
    /// a layer that is not in tmpfs), named to the kernel for ranges that
    /// `cachestat` finds cached (`mapped_for_kernel`). Never read by this
    /// process: a page evicted meanwhile is read again by the kernel's
    /// copy, whose failure (the device failing) is an error there, where
    /// a read here would raise SIGBUS.
    cache_map: Option<SharedMap>,
    /// The file lives in memory: a write only copies into its pages.
    in_memory: bool,
    /// The file (a second descriptor of the device's).
    file: File,
    way: AtomicU8,
}

impl MemoryPath {
    /// Inline I/O for `file`, whose first `len` bytes are read through it,
    /// mapped read-only: a file that nothing writes or punches while it is
    /// served (the base, a layer). In memory, pages it made present are
    /// remembered (`SharedMap::map_unchanging`); on a device, the mapping
    /// is only for the kernel's copies (`mapped_for_kernel`).
    pub(crate) fn new(file: &File, len: u64) -> io::Result<MemoryPath> {
        let mut p = MemoryPath::with_map(file, len, |len| SharedMap::map_unchanging(file, len))?;
        if p.map.is_none() && len > 0 && covers(file, len) {
            p.cache_map = SharedMap::map(file, len as usize, false).ok();
        }
        Ok(p)
    }

    /// Inline I/O for the overlay `file`, whose first `len` bytes are
    /// mapped writable, and whose pages made present for a read are
    /// remembered (`SharedMap::map_overlay`): the daemon reads only blocks
    /// that hold data through it.
    pub(crate) fn new_overlay(file: &File, len: u64) -> io::Result<MemoryPath> {
        MemoryPath::with_map(file, len, |len| SharedMap::map_overlay(file, len))
    }

    /// Inline I/O for `file`, mapped by `map` (given the length) when it
    /// lives in memory and covers `len` bytes.
    fn with_map(
        file: &File,
        len: u64,
        map: impl FnOnce(usize) -> io::Result<SharedMap>,
    ) -> io::Result<MemoryPath> {
        let in_memory = sys::is_tmpfs(file);
        // Only a file that covers the whole mapping: reading a mapping past
        // the end of its file raises SIGBUS.
        let whole = covers(file, len);
        let map = (whole && len > 0 && in_memory)
            .then(|| map(len as usize).ok())
            .flatten();
        Ok(MemoryPath {
            map,
            cache_map: None,
            in_memory,
            file: file.try_clone()?,
            way: AtomicU8::new(NOWAIT),
        })
    }

    /// Fills as much of `dst` from file offset `pos` as it can without
    /// waiting for the device; returns how many leading bytes of `dst` it
    /// filled (0 when the ring must read it all).
    pub(crate) fn read(&self, pos: u64, dst: &mut [u8]) -> usize {
        if let Some(m) = &self.map {
            // Pages that cannot be had (a hole of a full tmpfs) are left
            // to the ring, whose read gives a hole's zeros.
            return match m.copy_out(pos, dst) {
                Ok(()) => dst.len(),
                Err(_) => 0,
            };
        }
        match self.way.load(Ordering::Relaxed) {
            NOWAIT => self.read_nowait(pos, dst),
            CACHESTAT => self.read_if_cached(pos, dst),
            _ => 0,
        }
    }

    /// Whether the file lives in memory (tmpfs).
    pub(crate) fn in_memory(&self) -> bool {
        self.in_memory
    }

    /// Whether the file is mapped (the transfers that read the mapping may
    /// be tried).
    pub(crate) fn is_mapped(&self) -> bool {
        self.map.is_some()
    }

    /// Whether the kernel may be named a mapping of the file to copy a
    /// READ's data from (`mapped_for_kernel` may give one).
    pub(crate) fn is_mapped_for_kernel(&self) -> bool {
        self.map.is_some() || self.cache_map.is_some()
    }

    /// Where bytes `[pos, pos + len)` of the file are mapped, for the
    /// kernel to copy from (ublk at the commit, or `pwritev` into the
    /// request): as `mapped` for a file in memory; for a file on a device
    /// only a range of `KERNEL_MAP_MIN` or more whose every page
    /// `cachestat` finds cached, its pages then made present. `None`: the
    /// data must be read.
    pub(crate) fn mapped_for_kernel(&self, pos: u64, len: usize) -> Option<*const u8> {
        let Some(m) = &self.cache_map else {
            return self.mapped(pos, len);
        };
        if len < KERNEL_MAP_MIN || !self.cached(pos, len as u64).unwrap_or(false) {
            return None;
        }
        m.populate_for_reads(pos, len).ok()?;
        Some(m.addr(pos, len))
    }

    /// Where bytes `[pos, pos + len)` of the file are mapped, with their
    /// pages present, for this process or ublk to copy from: `None` when
    /// the file is not in memory or its pages cannot be had (a hole of a
    /// full tmpfs, whose read by ublk would fail and requeue the READ).
    pub(crate) fn mapped(&self, pos: u64, len: usize) -> Option<*const u8> {
        let m = self.map.as_ref()?;
        m.populate_for_reads(pos, len).ok()?;
        Some(m.addr(pos, len))
    }

    /// The address of bytes `[pos, pos + len)` of the file in its mapping,
    /// if it is mapped, for the kernel to take its pages from
    /// (`Pipe::hold`), which faults them in itself: nothing is made present
    /// here.
    pub(crate) fn mapped_at(&self, pos: u64, len: usize) -> Option<usize> {
        self.map.as_ref().map(|m| m.addr(pos, len) as usize)
    }

    /// Where ublk may copy bytes `[pos, pos + len)` of the file straight
    /// into its pages, if the file is mapped writable.
    pub(crate) fn placeable(&self, pos: u64, len: usize) -> Option<*mut u8> {
        self.map
            .as_ref()
            .and_then(|m| m.addr_for_kernel_writes(pos, len))
    }

    /// Copies bytes `[pos, pos + len)` of the file, if it is mapped, into
    /// the request `to` names (ublk's user copy): `Some(true)` when all of
    /// them went.
    pub(crate) fn copy_to_request(&self, pos: u64, len: usize, to: UserCopyAt) -> Option<bool> {
        let m = self.map.as_ref()?;
        Some(m.write_to(pos, len, to.fd, to.pos).is_ok_and(|n| n == len))
    }

    /// Has `pipe` hold bytes `[pos, pos + len)` of the file, if it is
    /// mapped (see `sys::Pipe`): true when it holds all of them.
    pub(crate) fn splice_to(&self, pos: u64, len: usize, pipe: &Pipe) -> bool {
        self.map
            .as_ref()
            .is_some_and(|m| m.splice_to(pos, len, pipe).is_ok())
    }

    /// Copies `len` bytes of the request `from` names (ublk's user copy)
    /// straight into the file's pages at `pos`, if it is mapped writable:
    /// `Some(true)` when all of them came. A short or failed copy leaves
    /// those pages partly written; the caller writes them all again.
    pub(crate) fn copy_from_request(&self, pos: u64, len: usize, from: UserCopyAt) -> Option<bool> {
        let m = self.map.as_ref().filter(|m| m.is_writable())?;
        Some(
            m.read_from(pos, len, from.fd, from.pos)
                .is_ok_and(|n| n == len),
        )
    }

    /// Makes the allocated pages of `[pos, pos + len)` ready for ublk's
    /// copies (see `SharedMap::populate_for_writes`).
    pub(crate) fn populate(&self, pos: u64, len: u64) -> io::Result<()> {
        match &self.map {
            Some(m) => m.populate_for_writes(pos, len as usize),
            None => Err(io::Error::other("the file is not mapped")),
        }
    }

    /// Whether `write` takes `len` bytes on the calling thread.
    pub(crate) fn writes_inline(&self, len: usize) -> bool {
        self.in_memory && len < RING_WRITE_MIN
    }

    /// Writes `data` at `pos` if the file lives in memory and `data` is
    /// shorter than `RING_WRITE_MIN` (`Written::Here`); else leaves it to
    /// the ring (`Written::ToRing`).
    pub(crate) fn write(&self, pos: u64, data: &[u8]) -> Result<Written, Errno> {
        if !self.writes_inline(data.len()) {
            return Ok(Written::ToRing);
        }
        match self.file.write_all_at(data, pos) {
            Ok(()) => Ok(Written::Here),
            Err(e) => Err(Errno::of(&e)),
        }
    }

    /// Whether every page of `[pos, pos + len)` is in memory: the file is
    /// mapped, or `cachestat` finds them all in the page cache. False when
    /// it cannot tell.
    pub(crate) fn is_cached(&self, pos: u64, len: u64) -> bool {
        self.map.is_some() || self.cached(pos, len).unwrap_or(false)
    }

    /// `cachestat`'s answer: all pages of `[pos, pos + len)` are cached.
    fn cached(&self, pos: u64, len: u64) -> io::Result<bool> {
        let first = pos / PAGE;
        let end = (pos + len).div_ceil(PAGE);
        let n = sys::cached_pages(&self.file, first * PAGE, (end - first) * PAGE)?;
        Ok(n == end - first)
    }

    /// As much as `preadv2(RWF_NOWAIT)` gives.
    fn read_nowait(&self, pos: u64, dst: &mut [u8]) -> usize {
        let mut done = 0;
        while done < dst.len() {
            match sys::pread_nowait(&self.file, &mut dst[done..], pos + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => {
                    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                        self.way.store(CACHESTAT, Ordering::Relaxed);
                        return self.read_if_cached(pos, dst);
                    }
                    break;
                }
            }
        }
        done
    }

    /// All of `dst` when every page of it is cached, else nothing. A page
    /// whose read is in flight counts as cached, so this may wait for that
    /// read, never for a new one.
    fn read_if_cached(&self, pos: u64, dst: &mut [u8]) -> usize {
        match self.cached(pos, dst.len() as u64) {
            Ok(true) => {}
            Ok(false) => return 0,
            Err(_) => {
                self.way.store(RING_ONLY, Ordering::Relaxed);
                return 0;
            }
        }
        let mut done = 0;
        while done < dst.len() {
            match self.file.read_at(&mut dst[done..], pos + done as u64) {
                Ok(0) | Err(_) => break,
                Ok(n) => done += n,
            }
        }
        done
    }
}

/// Whether `file` (a block device or a regular file) holds at least `len`
/// bytes: a mapping of `len` bytes may be read in full.
fn covers(file: &File, len: u64) -> bool {
    use std::os::unix::fs::FileTypeExt;
    match file.metadata() {
        Ok(m) if m.file_type().is_block_device() => {
            sys::block_device_size(file).is_ok_and(|n| n >= len)
        }
        Ok(m) => m.len() >= len,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A file with known content in `dir`, just written (so its pages are
    /// cached), already unlinked.
    fn file_in(dir: &std::path::Path, name: &str) -> (File, Vec<u8>) {
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut f = crate::test_files::unlinked(dir, &format!("inline-{name}"));
        f.write_all(&data).unwrap();
        (f, data)
    }

    /// Every read of a file whose pages are all in memory is served whole,
    /// with the file's bytes.
    fn check(r: &MemoryPath, data: &[u8]) {
        for (pos, len) in [(0, 4096), (512, 1000), (8192, 32768), (60000, 5536)] {
            let mut buf = vec![0u8; len];
            let n = r.read(pos as u64, &mut buf);
            assert_eq!(n, len, "served {n} of {len} bytes at {pos}");
            assert_eq!(buf, &data[pos..pos + len], "at {pos}+{len}");
        }
    }

    /// A directory on a file system that is not tmpfs: the temporary
    /// directory, or else the crate's own; `None` (the caller says it
    /// skipped) when both are tmpfs.
    fn disk_dir() -> Option<std::path::PathBuf> {
        let tmp = std::env::temp_dir();
        let cwd = std::env::current_dir().unwrap();
        [tmp, cwd].into_iter().find(|d| {
            let probe = crate::test_files::unlinked(d, "inline-probe");
            !sys::is_tmpfs(&probe)
        })
    }

    #[test]
    fn reads_cached_pages_of_a_file() {
        let Some(dir) = disk_dir() else {
            eprintln!("skipped: no directory off tmpfs for a page-cache file");
            return;
        };
        let (f, data) = file_in(&dir, "file");
        let r = MemoryPath::new(&f, data.len() as u64).unwrap();
        assert!(r.map.is_none(), "a file off tmpfs is not mapped");
        // Just written, so cached: the first way serves it whole.
        check(&r, &data);
        // The cachestat way on its own gives the same bytes. It needs the
        // cachestat system call (Linux 6.5).
        if let Err(e) = sys::cached_pages(&f, 0, 4096) {
            panic!("cachestat is not available ({e}): its way cannot be tested");
        }
        r.way.store(CACHESTAT, Ordering::Relaxed);
        check(&r, &data);
        assert_eq!(r.way.load(Ordering::Relaxed), CACHESTAT, "it kept its way");
    }

    #[test]
    fn writes_a_tmpfs_file_and_leaves_others_to_the_ring() {
        let (f, _) = file_in(std::path::Path::new("/dev/shm"), "w");
        let r = MemoryPath::new(&f, 64 * 1024).unwrap();
        assert_eq!(r.write(1000, &[9u8; 5000]), Ok(Written::Here));
        let mut back = vec![0u8; 5000];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 1000).unwrap();
        assert!(back.iter().all(|&b| b == 9));
        assert_eq!(
            r.write(0, &vec![1u8; RING_WRITE_MIN]),
            Ok(Written::ToRing),
            "a large write"
        );
        let Some(dir) = disk_dir() else {
            eprintln!("skipped: no directory off tmpfs for a file the ring writes");
            return;
        };
        let (f, _) = file_in(&dir, "w");
        assert_eq!(
            MemoryPath::new(&f, 64 * 1024).unwrap().write(0, &[1u8; 10]),
            Ok(Written::ToRing)
        );
    }

    #[test]
    fn reads_a_tmpfs_file_through_its_mapping() {
        let shm = std::path::Path::new("/dev/shm");
        if !shm.is_dir() {
            panic!("/dev/shm is missing: the tmpfs case cannot run");
        }
        let (f, data) = file_in(shm, "shm");
        let r = MemoryPath::new(&f, data.len() as u64).unwrap();
        assert!(r.map.is_some(), "a tmpfs file is mapped");
        check(&r, &data);
        let mut buf = vec![0u8; 100];
        assert_eq!(r.read(1, &mut buf), 100);
    }

    /// Whether the page at `addr` is in this process's page table
    /// (`/proc/self/pagemap`, bit 63).
    fn in_page_table(addr: usize) -> bool {
        use std::os::unix::fs::FileExt;
        let pm = File::open("/proc/self/pagemap").unwrap();
        let mut e = [0u8; 8];
        pm.read_exact_at(&mut e, (addr / PAGE as usize * 8) as u64)
            .unwrap();
        u64::from_le_bytes(e) >> 63 == 1
    }

    /// Drops `[addr, addr + len)` of a shared mapping from this process's
    /// page table; the file keeps its pages.
    fn drop_from_page_table(addr: usize, len: usize) {
        // SAFETY: a range of a live shared file mapping of this test's;
        // MADV_DONTNEED only unmaps its pages, which the file keeps, and
        // nothing holds a reference into them.
        let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
    }

    /// Pages of the overlay, the base or a layer made present for a read
    /// are remembered, page by page: naming them again asks the kernel for
    /// nothing (their page table entries, dropped in between, stay
    /// dropped), whichever read made them present. A read of part of a page
    /// is not remembered, and a mapping without a record makes the pages
    /// present at every read.
    #[test]
    fn pages_made_present_are_remembered() {
        let shm = std::path::Path::new("/dev/shm");
        let (f, _) = file_in(shm, "present");
        const LEN: usize = 64 * 1024;
        let overlay = MemoryPath::new_overlay(&f, LEN as u64).unwrap();
        let base = MemoryPath::new(&f, LEN as u64).unwrap();
        let plain = MemoryPath::with_map(&f, LEN as u64, |l| SharedMap::map(&f, l, true)).unwrap();
        for (r, remembers) in [(&overlay, true), (&base, true), (&plain, false)] {
            let at = r.mapped_at(0, LEN).unwrap();
            let pages = |from: usize, n: usize| {
                (from..from + n)
                    .map(|p| in_page_table(at + p * PAGE as usize))
                    .collect::<Vec<_>>()
            };
            // Pages 0 to 3, as two runs of a READ.
            drop_from_page_table(at, LEN);
            assert!(r.mapped(0, 8192).is_some());
            assert!(r.mapped(8192, 8192).is_some());
            assert_eq!(pages(0, 4), [true; 4], "made present");
            drop_from_page_table(at, LEN);
            assert!(r.mapped(4096, 8192).is_some());
            assert_eq!(pages(1, 2), [!remembers; 2], "named again");
            // Part of page 4.
            assert!(r.mapped(16384 + 100, 1000).is_some());
            assert!(in_page_table(at + 16384));
            drop_from_page_table(at, LEN);
            assert!(r.mapped(16384 + 100, 1000).is_some());
            assert!(in_page_table(at + 16384), "part of a page remembered");
        }
    }

    /// A file off tmpfs (a base on a device) is named to the kernel's copies
    /// for ranges its page cache holds, with the file's bytes there, and for
    /// no range that must be read from the device; a file shorter than the
    /// mapping would be is not mapped at all.
    #[test]
    fn a_file_on_a_device_is_named_to_the_kernel_where_cached() {
        let Some(dir) = disk_dir() else {
            panic!("no directory off tmpfs: the page-cache mapping cannot be tested");
        };
        let (f, data) = file_in(&dir, "kernel");
        let len = data.len();
        let r = MemoryPath::new(&f, len as u64).unwrap();
        assert!(!r.is_mapped() && r.is_mapped_for_kernel());
        assert!(r.mapped(4096, 8192).is_none(), "never read here");
        // Just written, so cached.
        let n = KERNEL_MAP_MIN;
        let at = r.mapped_for_kernel(100, n).expect("a cached range");
        // SAFETY: `n` bytes inside the live mapping of a file that covers
        // them and that nothing shortens, their pages just made present.
        let seen = unsafe { std::slice::from_raw_parts(at, n) };
        assert_eq!(seen, &data[100..][..n]);
        assert!(
            r.mapped_for_kernel(100, n - 1).is_none(),
            "a small READ is read"
        );
        // Out of the page cache: clean, unmapped from this process, dropped.
        f.sync_all().unwrap();
        let map = r.cache_map.as_ref().unwrap();
        drop_from_page_table(map.addr(0, len) as usize, len);
        sys::fadvise(&f, 0, len as u64, libc::POSIX_FADV_DONTNEED).unwrap();
        let cached = sys::cached_pages(&f, 0, len as u64).expect("cachestat (Linux 6.5)");
        assert_eq!(
            cached, 0,
            "the file's pages stayed cached: the case cannot be made"
        );
        assert!(r.mapped_for_kernel(4096, n).is_none(), "uncached");
        let longer = MemoryPath::new(&f, len as u64 + 4096).unwrap();
        assert!(
            !longer.is_mapped_for_kernel(),
            "a mapping past the file's end"
        );
    }

    /// A device node lives in devtmpfs, which `fstatfs` reports as tmpfs;
    /// a block device's data does not: such a base must be neither mapped
    /// nor taken for memory (which turns prefetch off beside an overlay in
    /// tmpfs).
    #[test]
    fn a_device_node_is_not_in_memory() {
        let fs = std::process::Command::new("stat")
            .args(["-f", "-c", "%T", "/dev/null"])
            .output()
            .expect("stat -f");
        let fs = String::from_utf8_lossy(&fs.stdout);
        assert_eq!(
            fs.trim(),
            "tmpfs",
            "/dev is not (dev)tmpfs here: the case cannot be made"
        );
        let null = File::open("/dev/null").unwrap();
        assert!(
            !sys::is_tmpfs(&null),
            "/dev/null taken for a file in memory"
        );
        let r = MemoryPath::new(&null, 0).unwrap();
        assert!(!r.in_memory() && !r.is_mapped());
    }

    /// Set in the child process of `holes_of_a_full_tmpfs_raise_no_signal`:
    /// the directory of the small tmpfs its parent mounted.
    const FULL_TMPFS: &str = "UBLK_COW_TEST_FULL_TMPFS";

    /// Unmounts the test's tmpfs and removes its directory.
    struct Mounted(std::path::PathBuf);

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    /// Reading a hole of a sparse tmpfs file through a mapping needs a new
    /// page; on a full tmpfs that fault fails and the kernel raises SIGBUS.
    /// Every way the daemon reads a mapping must instead fail (the ring then
    /// reads the file, which gives zeros) or give zeros. The reads run in a
    /// child process, so a signal is a failed assertion here, not a crash.
    #[test]
    fn holes_of_a_full_tmpfs_raise_no_signal() {
        if let Some(dir) = std::env::var_os(FULL_TMPFS) {
            read_holes_of_full_tmpfs(std::path::Path::new(&dir));
            return;
        }
        assert!(
            sys::is_root(),
            "this test mounts a small tmpfs: run it as root"
        );
        let dir = std::env::temp_dir().join(format!("ublk-cow-full-tmpfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount -t tmpfs on {} failed", dir.display());
        let _mounted = Mounted(dir.clone());
        let name = format!(
            "{}::holes_of_a_full_tmpfs_raise_no_signal",
            module_path!().split_once("::").unwrap().1
        );
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &name, "--nocapture", "--test-threads=1"])
            .env(FULL_TMPFS, &dir)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            None,
            "reading holes of a full tmpfs killed the process with a signal:\n{said}"
        );
        assert!(out.status.success(), "the reads failed:\n{said}");
        assert!(said.contains("1 passed"), "the child ran no test:\n{said}");
    }

    /// The child's side: a sparse base and overlay on the full tmpfs `dir`,
    /// their holes read every way the daemon reads a mapping.
    fn read_holes_of_full_tmpfs(dir: &std::path::Path) {
        const LEN: u64 = 1 << 20;
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(dir.join(name))
                .unwrap()
        };
        let base = open("base");
        base.write_all_at(&[5u8; 4096], 0).unwrap();
        base.set_len(LEN).unwrap();
        let overlay = open("overlay");
        overlay.set_len(LEN).unwrap();
        // Fill the file system: no page is left for a hole.
        let mut filler = open("filler");
        let page = [1u8; 4096];
        let e = loop {
            if let Err(e) = filler.write_all(&page) {
                break e;
            }
        };
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ENOSPC),
            "filling the tmpfs: {e}"
        );
        let sink = crate::test_files::unlinked(&std::env::temp_dir(), "inline-sink");
        let to = UserCopyAt {
            fd: std::os::fd::AsRawFd::as_raw_fd(&sink),
            pos: 0,
        };
        let p = Pipe::new().unwrap();
        for (file, is_overlay) in [(&base, false), (&overlay, true)] {
            let r = match is_overlay {
                false => MemoryPath::new(file, LEN),
                true => MemoryPath::new_overlay(file, LEN),
            }
            .unwrap();
            assert!(r.is_mapped(), "a tmpfs file is mapped");
            let hole = 512 * 1024;
            let mut buf = vec![9u8; 8192];
            let n = r.read(hole, &mut buf);
            // What the read left is the ring's: a read of the file.
            file.read_exact_at(&mut buf[n..], hole + n as u64).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "a hole reads as zeros");
            assert!(
                r.mapped(hole, 4096).is_none(),
                "a hole named for the commit"
            );
            assert!(!r.splice_to(hole, 4096, &p), "a hole held by the pipe");
            let pieces = [(r.mapped_at(hole, 4096).unwrap(), 4096)];
            assert!(p.hold(&pieces).is_err(), "a hole held by the pipe");
            assert_ne!(
                r.copy_to_request(hole, 4096, to),
                Some(true),
                "a hole copied to the request"
            );
        }
        // Pages that exist are read through the mapping all the same.
        let r = MemoryPath::new(&base, LEN).unwrap();
        let mut buf = vec![0u8; 4096];
        assert_eq!(r.read(0, &mut buf), 4096);
        assert!(buf.iter().all(|&b| b == 5));
        assert!(r.mapped(0, 4096).is_some());
        // A hole beside them (`sys::Present` remembers pages made present):
        // their read must not have marked it present.
        assert_eq!(r.read(8192, &mut buf), 0, "a hole read through the map");
        assert!(r.mapped(8192, 4096).is_none());
    }

    /// One pipe holds pieces of two mappings, in order, from one call, as
    /// a READ of several runs over base and overlay has them: all of them,
    /// or none when they do not fit.
    #[test]
    fn a_pipe_holds_pieces_of_mappings_in_order() {
        let shm = std::path::Path::new("/dev/shm");
        let (f, data) = file_in(shm, "hold-a");
        let (g, _) = file_in(shm, "hold-b");
        let other: Vec<u8> = data.iter().map(|b| b ^ 0xff).collect();
        g.write_all_at(&other, 0).unwrap();
        let a = MemoryPath::new(&f, data.len() as u64).unwrap();
        let b = MemoryPath::new_overlay(&g, data.len() as u64).unwrap();
        let p = Pipe::with_capacity(1 << 20).unwrap();
        assert!(p.capacity() >= 64 << 10, "capacity {}", p.capacity());
        let mut want = Vec::new();
        let mut pieces = Vec::new();
        let mut pos = 512;
        for (k, len) in [4096, 8192, 100, 4096, 12288, 512, 3000]
            .into_iter()
            .enumerate()
        {
            let (m, src) = if k % 2 == 0 {
                (&a, &data)
            } else {
                (&b, &other)
            };
            want.extend_from_slice(&src[pos..pos + len]);
            pieces.push((m.mapped_at(pos as u64, len).unwrap(), len));
            pos += len + 1000;
        }
        p.hold(&pieces).unwrap();
        assert_eq!(take(&p, want.len()), want);
        // More than the pipe has room for: nothing of it is left there.
        let whole = (a.mapped_at(0, data.len()).unwrap(), data.len());
        let many = vec![whole; p.capacity() / data.len() + 1];
        assert!(p.hold(&many).is_err());
        let mut one = [0u8; 1];
        // SAFETY: reads into our own buffer; the pipe does not block.
        let n = unsafe { libc::read(p.read_end(), one.as_mut_ptr().cast(), 1) };
        assert_eq!(n, -1, "a refused hold leaves the pipe empty");
        p.hold(&pieces[..2]).unwrap();
        assert_eq!(take(&p, 4096 + 8192), want[..4096 + 8192]);
    }

    /// Reads what the pipe holds (the way io_uring's read takes it out).
    fn take(p: &Pipe, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let mut got = 0;
        while got < len {
            // SAFETY: reads into our own buffer.
            let n = unsafe { libc::read(p.read_end(), out[got..].as_mut_ptr().cast(), len - got) };
            assert!(n > 0, "the pipe held {got} of {len} bytes");
            got += n as usize;
        }
        out
    }

    #[test]
    fn a_pipe_holds_mapped_bytes_all_or_none() {
        let (f, data) = file_in(std::path::Path::new("/dev/shm"), "pipe");
        let r = MemoryPath::new(&f, data.len() as u64).unwrap();
        let p = Pipe::new().unwrap();
        for (pos, len) in [(0, 4096), (512, 4096), (65536 - 100, 100)] {
            assert!(r.splice_to(pos as u64, len, &p), "at {pos}+{len}");
            assert_eq!(take(&p, len), &data[pos..pos + len], "at {pos}+{len}");
        }
        // The pipe reads what the pages hold when it is read.
        assert!(r.splice_to(0, 10, &p));
        std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 10], 0).unwrap();
        assert_eq!(take(&p, 10), [7u8; 10]);
        // More than the pipe has room for: nothing of it is left there.
        // SAFETY: fcntl on our own pipe.
        let cap = unsafe { libc::fcntl(p.read_end(), libc::F_GETPIPE_SZ) } as usize;
        assert!(cap >= 2 * 4096 && cap <= data.len(), "pipe size {cap}");
        assert!(r.splice_to(0, cap - 4096, &p));
        assert!(!r.splice_to(0, 2 * 4096, &p), "two pages where one fits");
        let mut one = [0u8; 1];
        // SAFETY: reads into our own buffer; the pipe does not block.
        let n = unsafe { libc::read(p.read_end(), one.as_mut_ptr().cast(), 1) };
        assert_eq!(n, -1, "a refused hold leaves the pipe empty");
        assert!(r.splice_to(0, 4096, &p));
        p.drain();
        // SAFETY: as above.
        let n = unsafe { libc::read(p.read_end(), one.as_mut_ptr().cast(), 1) };
        assert_eq!(n, -1, "drained, the pipe is empty");
        // A file that is not mapped: nothing to hold.
        let Some(dir) = disk_dir() else {
            eprintln!("skipped: no directory off tmpfs for a file that is not mapped");
            return;
        };
        let (g, _) = file_in(&dir, "pipe");
        let n = MemoryPath::new(&g, 64 * 1024).unwrap();
        assert!(!n.splice_to(0, 4096, &p));
    }
}
