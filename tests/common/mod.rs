//! What the model tests share: random cases of block requests, power cuts
//! and reopens, the data they write, and the reference that says what a
//! device must read, now and after a power cut.

#![allow(dead_code)] // each test uses its own part of it

use proptest::prelude::*;
use std::collections::HashMap;
use ublk_cow::engine::cache::CacheMode;

pub const SECTOR: usize = 512;

#[derive(Clone, Debug)]
pub enum Op {
    Read {
        off: u64,
        len: u64,
    },
    Write {
        off: u64,
        len: u64,
        seed: u8,
    },
    Zero {
        off: u64,
        len: u64,
    },
    Flush,
    Cache {
        off: u64,
        len: u64,
        mode: CacheMode,
    },
    Reopen,
    PowerCut {
        keep_seed: u64,
        cut_flush_after: Option<u8>,
    },
    /// The overlay's next sync fails; a flush is issued (and fails).
    SyncFails,
}

#[derive(Clone, Debug)]
pub struct Case {
    pub block_size: u32,
    pub sectors: u64,
    pub ops: Vec<Op>,
}

pub fn range(sectors: u64) -> impl Strategy<Value = (u64, u64)> {
    (0..sectors).prop_flat_map(move |s| {
        let max = (sectors - s).min(300);
        (Just(s * 512), (1..=max).prop_map(|n| n * 512))
    })
}

pub fn op(sectors: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => range(sectors).prop_map(|(off, len)| Op::Read { off, len }),
        6 => (range(sectors), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        2 => range(sectors).prop_map(|(off, len)| Op::Zero { off, len }),
        2 => Just(Op::Flush),
        2 => (range(sectors), prop_oneof![
                Just(CacheMode::Ignore),
                Just(CacheMode::Passthrough),
                Just(CacheMode::Read),
                Just(CacheMode::Cow)
            ])
            .prop_map(|((off, len), mode)| Op::Cache { off, len, mode }),
        1 => Just(Op::Reopen),
        2 => (any::<u64>(), proptest::option::of(0u8..12))
            .prop_map(|(keep_seed, cut_flush_after)| Op::PowerCut { keep_seed, cut_flush_after }),
        1 => Just(Op::SyncFails),
    ]
}

pub fn case() -> impl Strategy<Value = Case> {
    prop_oneof![Just(4096u32), Just(8192), Just(65536)].prop_flat_map(|bs| {
        let per_block = bs as u64 / 512;
        (1..=per_block * 24).prop_flat_map(move |sectors| {
            proptest::collection::vec(op(sectors), 1..40).prop_map(move |ops| Case {
                block_size: bs,
                sectors,
                ops,
            })
        })
    })
}

pub fn pattern(len: usize, seed: u8, off: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (seed as u64)
                .wrapping_mul(31)
                .wrapping_add((off + i as u64) / 7) as u8
                ^ 0x5a
        })
        .collect()
}

/// What a device must read: now, and after a power cut.
pub struct Reference {
    /// What the device must read now.
    pub current: Vec<u8>,
    /// What it must read after a power cut, for sectors not written since.
    flushed: Vec<u8>,
    /// Sectors written since the last completed flush: every content they
    /// had, the flushed one first.
    versions: HashMap<usize, Vec<Vec<u8>>>,
}

impl Reference {
    /// A device that reads `image`, all of it durable.
    pub fn new(image: Vec<u8>) -> Reference {
        Reference {
            flushed: image.clone(),
            current: image,
            versions: HashMap::new(),
        }
    }

    /// A write of `data` at `off` completed.
    pub fn record(&mut self, off: u64, data: &[u8]) {
        for (i, sector) in data.chunks(SECTOR).enumerate() {
            let s = off as usize / SECTOR + i;
            let flushed = &self.flushed[s * SECTOR..(s + 1) * SECTOR];
            let v = self
                .versions
                .entry(s)
                .or_insert_with(|| vec![flushed.to_vec()]);
            v.push(sector.to_vec());
        }
        self.current[off as usize..off as usize + data.len()].copy_from_slice(data);
    }

    /// A write of `data` at `off` failed, and the device now reads `got`
    /// there: each sector must be its old or its new contents. A failed
    /// write may have reached the disk in part, so after a power cut each
    /// of its sectors may read as its new contents too.
    pub fn record_uncertain(
        &mut self,
        off: u64,
        got: &[u8],
        data: &[u8],
    ) -> Result<(), TestCaseError> {
        for (i, (g, d)) in got.chunks(SECTOR).zip(data.chunks(SECTOR)).enumerate() {
            let at = off as usize + i * SECTOR;
            if g == d {
                self.record(at as u64, d);
            } else {
                prop_assert!(
                    g == &self.current[at..at + SECTOR],
                    "sector {} after a failed write is neither old nor new",
                    at / SECTOR
                );
                let s = at / SECTOR;
                let flushed = &self.flushed[at..at + SECTOR];
                let v = self
                    .versions
                    .entry(s)
                    .or_insert_with(|| vec![flushed.to_vec()]);
                v.push(d.to_vec());
                v.push(g.to_vec());
            }
        }
        Ok(())
    }

    /// A write of `data` at `off` with FUA completed: those sectors are
    /// durable as written; the others are as they were.
    pub fn record_durable(&mut self, off: u64, data: &[u8]) {
        self.record(off, data);
        let (from, to) = (off as usize, off as usize + data.len());
        self.flushed[from..to].copy_from_slice(data);
        for s in from / SECTOR..to / SECTOR {
            self.versions.remove(&s);
        }
    }

    /// A flush completed: everything written so far is durable.
    pub fn flushed(&mut self) {
        self.flushed = self.current.clone();
        self.versions.clear();
    }

    /// Checks what a device reads after a power cut: each sector one of the
    /// contents it had since the last completed flush (a sector not written
    /// since reads exactly as flushed). Then takes it as the new, durable
    /// state.
    pub fn after_power_cut(&mut self, got: Vec<u8>) -> Result<(), TestCaseError> {
        for (s, sector) in got.chunks(SECTOR).enumerate() {
            match self.versions.get(&s) {
                Some(v) => prop_assert!(
                    v.iter().any(|x| x == sector),
                    "sector {} after power cut is none of its versions",
                    s
                ),
                None => prop_assert!(
                    sector == &self.flushed[s * SECTOR..(s + 1) * SECTOR],
                    "sector {} lost flushed data",
                    s
                ),
            }
        }
        self.current = got;
        self.flushed();
        Ok(())
    }
}

/// Cases per run: `MODEL_CASES` or `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small xorshift generator, for choices a case's seed fixes.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        let x = &mut self.0;
        *x |= 1;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    pub fn bit(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

/// `len` bytes that differ at every offset and between seeds, with no
/// short period: data read from the wrong place never passes for right.
pub fn noise(len: u64, seed: u64) -> Vec<u8> {
    let mut x = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (0..len).map(|_| x.next() as u8).collect()
}
