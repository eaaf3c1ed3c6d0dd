//! The copy-vs-write race of docs/design.md's concurrency rule: a copy of base
//! data into the overlay (copy-on-cache, copy-on-read) that read the old base
//! data must not land after a newer guest write and undo it.

// The library's helper for its own host tests (not part of its API).
#[path = "../src/test_files.rs"]
mod test_files;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use ublk_cow::engine::base::BaseIdentity;
use ublk_cow::engine::cache::CacheMode;
use ublk_cow::engine::device::CowDevice;
use ublk_cow::engine::map::{BlockState, MapMemory};
use ublk_cow::engine::storage::{SimDisk, Storage};

const BS: usize = 4096;

fn device(blocks: usize) -> (CowDevice<Arc<SimDisk>, Arc<SimDisk>>, Vec<u8>) {
    let base: Vec<u8> = (0..blocks * BS).map(|i| (i / 512) as u8 | 0x80).collect();
    let disk = Arc::new(SimDisk::new(base.clone()));
    let id = BaseIdentity::compute(&disk, base.len() as u64, 0).unwrap();
    let map = MapMemory::heap(blocks as u64);
    let dev = CowDevice::create(
        disk,
        &id,
        Arc::new(SimDisk::new(Vec::new())),
        BS as u32,
        map,
    );
    (dev.unwrap(), base)
}

/// Copy reads old base data; a full-block guest write completes; the copy
/// then tries to install: it must find the block allocated and drop itself.
#[test]
fn copy_after_full_write_is_dropped() {
    let (dev, _) = device(8);
    let job = dev
        .copy_read(3..4)
        .unwrap()
        .expect("block 3 is unallocated");
    let new = vec![0x11u8; BS];
    dev.write(3 * BS as u64, &new).unwrap();
    assert_eq!(
        dev.copy_install(job).unwrap(),
        0,
        "a stale copy was installed"
    );
    let mut got = vec![0u8; BS];
    dev.read(3 * BS as u64, &mut got).unwrap();
    assert_eq!(got, new, "the guest write was undone by the copy");
}

/// The same with an unaligned write (read-modify-write of the block).
#[test]
fn copy_after_partial_write_is_dropped() {
    let (dev, base) = device(8);
    let job = dev.copy_read(5..6).unwrap().unwrap();
    dev.write(5 * BS as u64 + 1024, &[0x22u8; 512]).unwrap();
    assert_eq!(dev.copy_install(job).unwrap(), 0);
    let mut got = vec![0u8; BS];
    dev.read(5 * BS as u64, &mut got).unwrap();
    let mut want = base[5 * BS..6 * BS].to_vec();
    want[1024..1536].fill(0x22);
    assert_eq!(got, want);
}

/// A discard between the copy's read and install wins too.
#[test]
fn copy_after_discard_is_dropped() {
    let (dev, _) = device(8);
    let job = dev.copy_read(2..3).unwrap().unwrap();
    dev.write_zeroes(2 * BS as u64, BS as u64).unwrap();
    assert_eq!(dev.copy_install(job).unwrap(), 0);
    assert_eq!(dev.map().get(2), BlockState::Zero);
}

/// A copy over several blocks installs only those no write reached.
#[test]
fn range_copy_skips_written_blocks() {
    let (dev, base) = device(8);
    let job = dev.copy_read(0..4).unwrap().unwrap();
    dev.write(BS as u64, &[0x33u8; BS]).unwrap();
    assert_eq!(dev.copy_install(job).unwrap(), 3);
    let mut got = vec![0u8; 4 * BS];
    dev.read(0, &mut got).unwrap();
    let mut want = base[..4 * BS].to_vec();
    want[BS..2 * BS].fill(0x33);
    assert_eq!(got, want);
}

/// An uncontended copy is installed and changes no data.
#[test]
fn copy_of_untouched_block_is_installed() {
    let (dev, base) = device(8);
    let job = dev.copy_read(1..2).unwrap().unwrap();
    assert_eq!(dev.copy_install(job).unwrap(), 1);
    assert_eq!(dev.map().get(1), BlockState::Copied);
    let mut got = vec![0u8; BS];
    dev.read(BS as u64, &mut got).unwrap();
    assert_eq!(got, base[BS..2 * BS]);
}

/// Real threads: copiers sweep the device while writers write with
/// unaligned and aligned sizes; at the end every byte is what the writers
/// wrote or the base, never a copy of old data over a write.
#[test]
fn concurrent_copies_never_undo_writes() {
    let (dev, base) = device(64);
    writers_race_copiers(Arc::new(dev), base, |dev, blocks| {
        if let Some(job) = dev.copy_read(blocks).unwrap() {
            dev.copy_install(job).unwrap();
        }
    });
}

/// The same with real files, where copies run inside the kernel
/// (`copy_file_range`) under the blocks' locks.
#[test]
fn concurrent_kernel_copies_never_undo_writes() {
    let (dev, base) = file_device(64, "race");
    assert!(
        dev.copy_in_kernel(0..1).unwrap().is_some(),
        "files on tmpfs copy in the kernel"
    );
    writers_race_copiers(Arc::new(dev), base, |dev, blocks| {
        dev.copy_in_kernel(blocks).unwrap().unwrap();
    });
}

/// A whole-device copy-on-cache over real files copies every block still on
/// the base, leaves written blocks alone and changes no data.
#[test]
fn kernel_copy_on_cache_installs_unwritten_blocks() {
    let (dev, base) = file_device(64, "cache");
    dev.write(5 * BS as u64 + 512, &[0x44u8; 512]).unwrap();
    let done = dev.cache(0, base.len() as u64, CacheMode::Cow).unwrap();
    assert_eq!(done.copied, 63 * BS as u64);
    assert!((0..64).all(|b| dev.map().get(b)
        == if b == 5 {
            BlockState::Allocated
        } else {
            BlockState::Copied
        }));
    let mut want = base;
    want[5 * BS + 512..5 * BS + 1024].fill(0x44);
    let mut got = vec![0u8; want.len()];
    dev.read(0, &mut got).unwrap();
    assert!(got == want, "copy-on-cache changed data");
}

/// A device over real files in /dev/shm (tmpfs), already unlinked.
fn file_device(blocks: usize, name: &str) -> (CowDevice<File, File>, Vec<u8>) {
    let base: Vec<u8> = (0..blocks * BS).map(|i| (i / 512) as u8 | 0x80).collect();
    let open =
        |what: &str| test_files::unlinked(Path::new("/dev/shm"), &format!("race-{name}-{what}"));
    let base_file = open("base");
    base_file.write_all_at(&base, 0).unwrap();
    let id = BaseIdentity::compute(&base_file, base.len() as u64, 0).unwrap();
    let map = MapMemory::heap(blocks as u64);
    let dev = CowDevice::create(base_file, &id, open("overlay"), BS as u32, map).unwrap();
    (dev, base)
}

/// Four writers (each owning every fourth sector) and two copiers running
/// `copy` over the device in 3-block pieces; then checks every byte.
fn writers_race_copiers<B, O>(
    dev: Arc<CowDevice<B, O>>,
    base: Vec<u8>,
    copy: fn(&CowDevice<B, O>, std::ops::Range<u64>),
) where
    B: Storage + 'static,
    O: Storage + 'static,
{
    let blocks = base.len() / BS;
    let mut want = base;
    // Writer w owns the sectors s with s % 4 == w, so writers never overlap
    // and the expected result does not depend on the interleaving.
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                for round in 0..40u64 {
                    for s in (w..(blocks * BS / 512) as u64).step_by(4) {
                        if (s + round) % 7 == 0 {
                            dev.write(s * 512, &[(w as u8 + 1) ^ round as u8; 512])
                                .unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    let copiers: Vec<_> = (0..2)
        .map(|_| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                for _ in 0..40 {
                    for b in (0..blocks as u64).step_by(3) {
                        copy(&dev, b..(b + 3).min(blocks as u64));
                    }
                }
            })
        })
        .collect();
    for t in writers.into_iter().chain(copiers) {
        t.join().unwrap();
    }
    for s in 0..(blocks * BS / 512) as u64 {
        let w = s % 4;
        if let Some(round) = (0..40u64).rev().find(|r| (s + r) % 7 == 0) {
            want[s as usize * 512..(s as usize + 1) * 512].fill((w as u8 + 1) ^ round as u8);
        }
    }
    let mut got = vec![0u8; blocks * BS];
    dev.read(0, &mut got).unwrap();
    assert!(got == want, "a copy undid a write");
}
