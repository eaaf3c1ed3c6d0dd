//! The file layer under the engine: positional read/write, hole punching and
//! durability, for real files and for a simulated disk that can lose power.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

/// What the engine needs from a base or overlay file.
#[allow(clippy::len_without_is_empty)] // a file's length, not a collection's
pub trait Storage: Send + Sync {
    /// Fills `buf` from `off`; bytes past the end of the file read as zeros.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Makes `[off, off+len)` read as zeros and frees its space.
    fn punch(&self, off: u64, len: u64) -> io::Result<()>;
    /// Makes every completed write durable (`fdatasync`), and what reading
    /// them needs; not the file's modification time.
    fn sync(&self) -> io::Result<()>;
    /// As [`Storage::sync`], and the file's metadata too (`fsync`): its
    /// modification time, which an overlay above a layer, or over a base
    /// that a commit wrote, records as the file's identity.
    fn sync_all(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Sets the length (extending leaves a hole).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Allocates the space of `[off, off+len)` (its data stays), so that a
    /// later write there cannot fail for lack of space.
    fn allocate(&self, off: u64, len: u64) -> io::Result<()>;
    /// Hints that `[off, off+len)` will be read soon (`fadvise WILLNEED`).
    fn will_need(&self, _off: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Hints that `[off, off+len)` will not be read again soon (`fadvise
    /// DONTNEED`): its clean cached pages may go.
    fn dont_need(&self, _off: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// The open file behind this storage, if it is one: lets two files copy
    /// between them inside the kernel (`copy_file_range`).
    fn as_file(&self) -> Option<&File> {
        None
    }
}

/// Makes the name of the file at `path` durable: an `fsync` of the
/// directory holding it. A new overlay is synced so before it takes a
/// write, or a power cut could lose its name, and with it every write,
/// flushed or not (journaling file systems make the name durable with the
/// file's first sync in practice; this does not rely on it).
pub fn sync_name(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match File::open(dir)?.sync_all() {
        // A file system that cannot sync a directory (some network and
        // FUSE ones) keeps names as it does: nothing more to ask of it.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | libc::EBADF)
            ) =>
        {
            Ok(())
        }
        r => r,
    }
}

impl Storage for File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], off + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.write_all_at(buf, off)
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        crate::sys::punch_hole(self, off, len)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        File::sync_all(self)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn allocate(&self, off: u64, len: u64) -> io::Result<()> {
        match crate::sys::allocate(self, off, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // No fallocate here: write what is there back, which
                // allocates it as well.
                let mut buf = vec![0u8; (len.min(1 << 20)) as usize];
                let mut at = off;
                while at < off + len {
                    let n = buf.len().min((off + len - at) as usize);
                    Storage::read_at(self, &mut buf[..n], at)?;
                    self.write_all_at(&buf[..n], at)?;
                    at += n as u64;
                }
                Ok(())
            }
            r => r,
        }
    }

    fn will_need(&self, off: u64, len: u64) -> io::Result<()> {
        crate::sys::fadvise(self, off, len, libc::POSIX_FADV_WILLNEED)
    }

    fn dont_need(&self, off: u64, len: u64) -> io::Result<()> {
        crate::sys::fadvise(self, off, len, libc::POSIX_FADV_DONTNEED)
    }

    fn as_file(&self) -> Option<&File> {
        Some(self)
    }
}

impl<T: Storage + ?Sized> Storage for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        (**self).read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        (**self).write_at(buf, off)
    }
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        (**self).punch(off, len)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn sync_all(&self) -> io::Result<()> {
        (**self).sync_all()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn allocate(&self, off: u64, len: u64) -> io::Result<()> {
        (**self).allocate(off, len)
    }
    fn will_need(&self, off: u64, len: u64) -> io::Result<()> {
        (**self).will_need(off, len)
    }
    fn dont_need(&self, off: u64, len: u64) -> io::Result<()> {
        (**self).dont_need(off, len)
    }
    fn as_file(&self) -> Option<&File> {
        (**self).as_file()
    }
}

/// A disk in memory that keeps, across a simulated power cut, only what was
/// made durable by [`Storage::sync`] plus any subset of the writes issued
/// since — as a disk with a volatile write cache may. It can also be told to
/// fail every operation after a number of them, to cut a flush in the middle,
/// and to fail one sync as a disk that lost the writes behind it does.
pub struct SimDisk {
    inner: Mutex<SimInner>,
}

struct SimInner {
    /// What reads see now.
    live: Vec<u8>,
    /// What survives a power cut for sure.
    durable: Vec<u8>,
    /// Writes and punches since the last sync, in order.
    pending: Vec<(u64, Option<Vec<u8>>, u64)>,
    /// Operations left before every operation fails (power is gone).
    ops_left: Option<u64>,
    ops: u64,
    /// The next sync fails, and the writes it should have made durable
    /// are lost on a power cut while reads still see them — as when the
    /// kernel's writeback of a file fails (it reports that once).
    fail_sync: bool,
    /// Bytes whose writeback failed: no later sync makes them durable
    /// until they are written again (the kernel keeps such pages clean).
    lost: Vec<bool>,
    /// The modification time: each write or punch moves it; only
    /// `sync_all` makes it durable (`fdatasync` does not write it).
    mtime: u64,
    durable_mtime: u64,
}

impl SimDisk {
    pub fn new(contents: Vec<u8>) -> SimDisk {
        SimDisk {
            inner: Mutex::new(SimInner {
                durable: contents.clone(),
                live: contents,
                pending: Vec::new(),
                ops_left: None,
                ops: 0,
                fail_sync: false,
                lost: Vec::new(),
                mtime: 1,
                durable_mtime: 1,
            }),
        }
    }

    /// The modification time as `stat` shows it now: a count of the
    /// writes and punches, starting at 1.
    pub fn mtime(&self) -> u64 {
        self.inner.lock().unwrap().mtime
    }

    /// Everything as it reads now.
    pub fn contents(&self) -> Vec<u8> {
        self.inner.lock().unwrap().live.clone()
    }

    /// After `n` more operations, every operation fails with EIO.
    pub fn cut_power_after(&self, n: u64) {
        self.inner.lock().unwrap().ops_left = Some(n);
    }

    /// Makes the next sync fail (see `fail_sync`).
    pub fn fail_next_sync(&self) {
        self.inner.lock().unwrap().fail_sync = true;
    }

    /// The disk after a power cut: the durable image plus those pending
    /// writes for which `keep(i)` is true, applied in issue order.
    pub fn after_power_cut(&self, mut keep: impl FnMut(usize) -> bool) -> SimDisk {
        let inner = self.inner.lock().unwrap();
        let mut image = inner.durable.clone();
        for (i, (off, data, len)) in inner.pending.iter().enumerate() {
            if keep(i) {
                apply(&mut image, *off, data.as_deref(), *len);
            }
        }
        let cut = SimDisk::new(image);
        let mtime = inner.durable_mtime;
        let mut g = cut.inner.lock().unwrap();
        (g.mtime, g.durable_mtime) = (mtime, mtime);
        drop(g);
        cut
    }

    fn op(&self) -> io::Result<std::sync::MutexGuard<'_, SimInner>> {
        let mut g = self.inner.lock().unwrap();
        g.ops += 1;
        if let Some(left) = g.ops_left.as_mut() {
            if *left == 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            *left -= 1;
        }
        Ok(g)
    }
}

impl SimInner {
    fn mark_lost(&mut self, off: u64, len: u64, lost: bool) {
        let end = (off + len) as usize;
        if lost && self.lost.len() < end {
            self.lost.resize(end, false);
        }
        let stop = end.min(self.lost.len());
        if (off as usize) < stop {
            self.lost[off as usize..stop].fill(lost);
        }
    }
}

fn apply(image: &mut Vec<u8>, off: u64, data: Option<&[u8]>, len: u64) {
    let end = (off + len) as usize;
    if image.len() < end {
        if data.is_none() {
            let stop = image.len().max(off as usize);
            image[off.min(stop as u64) as usize..stop].fill(0);
            return;
        }
        image.resize(end, 0);
    }
    match data {
        Some(d) => image[off as usize..end].copy_from_slice(d),
        None => image[off as usize..end].fill(0),
    }
}

impl Storage for SimDisk {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let g = self.op()?;
        let off = off as usize;
        buf.fill(0);
        if off < g.live.len() {
            let n = buf.len().min(g.live.len() - off);
            buf[..n].copy_from_slice(&g.live[off..off + n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut g = self.op()?;
        g.mark_lost(off, buf.len() as u64, false);
        g.mtime += 1;
        apply(&mut g.live, off, Some(buf), buf.len() as u64);
        g.pending.push((off, Some(buf.to_vec()), buf.len() as u64));
        Ok(())
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        let mut g = self.op()?;
        g.mark_lost(off, len, false);
        g.mtime += 1;
        apply(&mut g.live, off, None, len);
        g.pending.push((off, None, len));
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut g = self.op()?;
        if std::mem::take(&mut g.fail_sync) {
            let pending = std::mem::take(&mut g.pending);
            for (off, _, len) in pending {
                g.mark_lost(off, len, true);
            }
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let g = &mut *g;
        if g.lost.iter().any(|&l| l) {
            g.durable.resize(g.live.len(), 0);
            for (i, d) in g.durable.iter_mut().enumerate() {
                if !g.lost.get(i).copied().unwrap_or(false) {
                    *d = g.live[i];
                }
            }
        } else {
            g.durable = g.live.clone();
        }
        g.pending.clear();
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync()?;
        let mut g = self.inner.lock().unwrap();
        g.durable_mtime = g.mtime;
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.inner.lock().unwrap().live.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // Metadata: durable at once, as a journaling file system would make it
        // by the next sync; the model never depends on this being lost.
        let mut g = self.op()?;
        g.live.resize(len as usize, 0);
        g.durable.resize(len as usize, 0);
        Ok(())
    }

    fn allocate(&self, off: u64, len: u64) -> io::Result<()> {
        // Nothing runs out of space in memory; only the length grows.
        let mut g = self.op()?;
        let end = (off + len) as usize;
        if g.live.len() < end {
            g.live.resize(end, 0);
            g.durable.resize(end, 0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_sync_all_keeps_the_modification_time() {
        let d = SimDisk::new(vec![0; 4]);
        d.write_at(&[1], 0).unwrap();
        d.sync().unwrap();
        assert_eq!(d.mtime(), 2);
        let cut = d.after_power_cut(|_| true);
        assert_eq!((cut.contents()[0], cut.mtime()), (1, 1));
        d.sync_all().unwrap();
        assert_eq!(d.after_power_cut(|_| false).mtime(), 2);
    }

    #[test]
    fn power_cut_keeps_synced_and_chosen_writes() {
        let d = SimDisk::new(vec![0; 8]);
        d.write_at(&[1, 1], 0).unwrap();
        d.sync().unwrap();
        d.write_at(&[2, 2], 2).unwrap();
        d.write_at(&[3, 3], 4).unwrap();
        let cut = d.after_power_cut(|i| i == 1);
        assert_eq!(cut.contents(), vec![1, 1, 0, 0, 3, 3, 0, 0]);
        d.cut_power_after(1);
        assert!(d.sync().is_ok());
        assert!(d.write_at(&[9], 0).is_err());
    }

    #[test]
    fn a_failed_sync_loses_its_writes_for_good() {
        let d = SimDisk::new(vec![0; 4]);
        d.write_at(&[1, 1], 0).unwrap();
        d.fail_next_sync();
        assert!(d.sync().is_err());
        d.write_at(&[2], 3).unwrap();
        d.sync().unwrap();
        // Reads still see the lost bytes; the disk never got them.
        assert_eq!(d.contents(), vec![1, 1, 0, 2]);
        assert_eq!(d.after_power_cut(|_| false).contents(), vec![0, 0, 0, 2]);
        d.write_at(&[3], 1).unwrap();
        d.sync().unwrap();
        assert_eq!(d.after_power_cut(|_| false).contents(), vec![0, 3, 0, 2]);
    }
}
