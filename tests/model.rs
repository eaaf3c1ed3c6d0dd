//! Model-based test of the engine: random sequences of read, write
//! (512-byte aligned, block-unaligned included), discard/write-zeroes, flush,
//! cache requests in every mode (copy-on-cache included), clean reopen,
//! power cut and a sync that fails, run against a byte-array
//! reference. The overlay lives on a simulated disk that, at a power cut,
//! keeps what was synced plus any subset of the writes since, that can
//! lose power in the middle of a flush, and that can fail a sync and lose
//! the writes behind it while reads still see them (as a failed writeback).
//!
//! Crash rule checked after every power cut, and after a close that failed
//! because a sync had: each 512-byte sector reads as one of the contents it
//! had since the last completed flush (a sector not written since reads
//! exactly as flushed). After a failed sync every flush fails.

mod common;

use common::{Case, Op, Reference, XorShift, case, cases, pattern};
use proptest::prelude::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use ublk_cow::engine::base::BaseIdentity;
use ublk_cow::engine::cache::CacheMode;
use ublk_cow::engine::device::{CowDevice, MapSource};
use ublk_cow::engine::map::MapMemory;
use ublk_cow::engine::overlay::OpenCheck;
use ublk_cow::engine::storage::SimDisk;

type Dev = CowDevice<Arc<SimDisk>, Arc<SimDisk>>;

struct Model {
    base: Arc<SimDisk>,
    base_image: Vec<u8>,
    id: BaseIdentity,
    overlay: Arc<SimDisk>,
    blocks: u64,
    dev: Option<Dev>,
    reference: Reference,
    /// A sync of the overlay failed: the device must fail every flush.
    failed: bool,
}

impl Model {
    fn new(c: &Case) -> Model {
        let size = (c.sectors * 512) as usize;
        let base_image = pattern(size, 0xb5, 0);
        let base = Arc::new(SimDisk::new(base_image.clone()));
        let id = BaseIdentity::compute(&base, size as u64, 1).unwrap();
        let overlay = Arc::new(SimDisk::new(Vec::new()));
        let blocks = size.div_ceil(c.block_size as usize) as u64;
        let map = MapMemory::heap(blocks);
        let dev = CowDevice::create(base.clone(), &id, overlay.clone(), c.block_size, map).unwrap();
        Model {
            base,
            id,
            overlay,
            blocks,
            dev: Some(dev),
            reference: Reference::new(base_image.clone()),
            base_image,
            failed: false,
        }
    }

    fn dev(&self) -> &Dev {
        self.dev.as_ref().unwrap()
    }

    fn reopen(&mut self, overlay: Arc<SimDisk>) {
        let check = OpenCheck {
            base: &self.id,
            block_size: None,
            force: false,
        };
        let blocks = self.blocks;
        self.dev = None;
        self.overlay = overlay.clone();
        let dev = CowDevice::open(
            self.base.clone(),
            overlay,
            check,
            MapSource::Load(MapMemory::heap(blocks)),
        );
        self.dev = Some(dev.expect("reopen after close or power cut"));
        self.failed = false;
    }

    /// Opens the overlay as a crash left it and checks the crash rule.
    fn reopen_after_crash(&mut self, overlay: SimDisk) -> Result<(), TestCaseError> {
        self.reopen(Arc::new(overlay));
        let mut buf = vec![0u8; self.reference.current.len()];
        self.dev().read(0, &mut buf).unwrap();
        self.reference.after_power_cut(buf)
    }

    fn check_all(&self) -> Result<(), TestCaseError> {
        let mut buf = vec![0u8; self.reference.current.len()];
        self.dev().read(0, &mut buf).unwrap();
        prop_assert!(
            buf == self.reference.current,
            "device differs from the reference"
        );
        Ok(())
    }

    fn run(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Read { off, len } => {
                let mut buf = vec![0u8; len as usize];
                self.dev().read(off, &mut buf).unwrap();
                prop_assert!(
                    buf == self.reference.current[off as usize..(off + len) as usize],
                    "read {}+{} differs",
                    off,
                    len
                );
            }
            Op::Write { off, len, seed } => {
                let data = pattern(len as usize, seed, off);
                self.dev().write(off, &data).unwrap();
                self.reference.record(off, &data);
            }
            Op::Zero { off, len } => {
                self.dev().write_zeroes(off, len).unwrap();
                self.reference.record(off, &vec![0u8; len as usize]);
            }
            Op::Flush => {
                if self.failed {
                    prop_assert!(self.dev().flush().is_err(), "a flush after a failed sync");
                } else {
                    self.dev().flush().unwrap();
                    self.reference.flushed();
                }
            }
            Op::SyncFails => {
                if !self.failed {
                    self.overlay.fail_next_sync();
                    prop_assert!(self.dev().flush().is_err(), "a flush whose sync failed");
                    self.failed = true;
                }
            }
            Op::Cache { off, len, mode } => {
                let before = self.dev().map().counts();
                let done = self.dev().cache(off, len, mode).unwrap();
                let after = self.dev().map().counts();
                prop_assert!(
                    mode == CacheMode::Cow || (done.copied == 0 && before == after),
                    "{} cache changed the map",
                    mode
                );
                prop_assert!(
                    mode != CacheMode::Cow
                        || (after.zero == before.zero && after.unallocated <= before.unallocated),
                    "cow cache changed more than unallocated blocks"
                );
                // A copy is marked copied, never written.
                prop_assert_eq!(
                    after.copied - before.copied,
                    before.unallocated - after.unallocated,
                    "a copy was not marked copied"
                );
                // What reads return is checked by every later read.
            }
            Op::Reopen if self.failed => {
                // The close fails, writing nothing that names lost data:
                // the overlay is then as after a crash (without power cut).
                prop_assert!(self.dev().shut_down().is_err(), "a failed device closed");
                self.dev = None;
                let after = self.overlay.after_power_cut(|_| true);
                self.reopen_after_crash(after)?;
                self.check_all()?;
            }
            Op::Reopen => {
                let dev = self.dev.take().unwrap();
                let (_, overlay) = dev.close().unwrap();
                self.reference.flushed();
                self.reopen(overlay);
                self.check_all()?;
            }
            Op::PowerCut {
                keep_seed,
                cut_flush_after,
            } => {
                if let Some(n) = cut_flush_after {
                    self.overlay.cut_power_after(n as u64);
                    if self.dev().flush().is_ok() {
                        self.reference.flushed();
                    }
                }
                let mut rng = XorShift(keep_seed);
                let after = self.overlay.after_power_cut(|_| rng.bit());
                self.reopen_after_crash(after)?;
            }
        }
        Ok(())
    }
}

static OPS: AtomicU64 = AtomicU64::new(0);

fn run_case(c: Case) -> Result<(), TestCaseError> {
    let mut m = Model::new(&c);
    for op in &c.ops {
        m.run(op)?;
    }
    m.check_all()?;
    prop_assert!(m.base.contents() == m.base_image, "the base was modified");
    OPS.fetch_add(c.ops.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Runs `want` cases on this thread.
fn run_cases(name: &str, want: u32) {
    let cfg = ProptestConfig {
        cases: want,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let passed = AtomicU64::new(0);
    proptest!(cfg, |(c in case())| {
        run_case(c)?;
        passed.fetch_add(1, Ordering::Relaxed);
    });
    let n = passed.load(Ordering::Relaxed);
    println!(
        "{name}: {n} cases ({} operations in both halves so far), 0 divergences",
        OPS.load(Ordering::Relaxed)
    );
    assert!(n >= want as u64, "only {n} model cases ran");
}

/// Half of the cases (12,000 in all, `MODEL_CASES` to change); the other
/// half runs at the same time in [`engine_matches_reference_model_second_half`].
#[test]
fn engine_matches_reference_model() {
    run_cases("model, first half", cases(12_000).div_ceil(2));
}

#[test]
fn engine_matches_reference_model_second_half() {
    run_cases("model, second half", cases(12_000).div_ceil(2));
}
