//! Model-based test of chains: random operations on a random stack of
//! layers against a reference of the bytes each overlay reads as.
//!
//! The overlays are files (in /dev/shm when there is one); the live top's
//! file is held in a simulated disk while it is in use, so that a power cut
//! keeps only what was flushed plus any subset of the writes since, and is
//! written back to its file when it is closed. Operations: read, write,
//! write-zeroes, flush, copy-on-cache (`Copied` blocks), clean reopen, power
//! cut (with a flush cut short), snapshot (the top closed and frozen, a new
//! overlay made over it), fork (a new overlay over any frozen layer, the
//! old top left as it is), and commit of any overlay into its backing
//! (refused exactly when another overlay is stacked on that backing).
//!
//! Checked: every read against the reference; after a power cut the crash
//! rule of `tests/model.rs` (each sector one of its contents since the last
//! flush); after a commit, the top reads the same, the committed overlay's
//! backing now reads as the overlay did, and a refused commit changes no
//! file; at the end, every frozen layer and the base read as the model says.

mod common;

use common::{Reference, XorShift, cases, pattern};
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use ublk_cow::engine::cache::CacheMode;
use ublk_cow::engine::chain::{Backed, Lower, create_overlay, freeze, open_lower};
use ublk_cow::engine::commit::{CommitOptions, commit};
use ublk_cow::engine::device::{CowDevice, MapSource};
use ublk_cow::engine::map::MapMemory;
use ublk_cow::engine::overlay::OpenCheck;
use ublk_cow::engine::storage::{SimDisk, Storage};

type Dev = CowDevice<Backed, Arc<SimDisk>>;

/// The deepest chain a case builds (the top included).
const MAX_DEPTH: usize = 8;

#[derive(Clone, Debug)]
enum Op {
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
    CopyUp {
        off: u64,
        len: u64,
    },
    Reopen,
    PowerCut {
        keep_seed: u64,
        cut_flush_after: Option<u8>,
    },
    Snapshot,
    Fork {
        pick: u16,
    },
    Commit {
        pick: u16,
    },
}

#[derive(Clone, Debug)]
struct Case {
    block_size: u32,
    sectors: u64,
    ops: Vec<Op>,
}

fn range(sectors: u64) -> impl Strategy<Value = (u64, u64)> {
    (0..sectors).prop_flat_map(move |s| {
        let max = (sectors - s).min(200);
        (Just(s * 512), (1..=max).prop_map(|n| n * 512))
    })
}

fn op(sectors: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => range(sectors).prop_map(|(off, len)| Op::Read { off, len }),
        6 => (range(sectors), any::<u8>())
            .prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        2 => range(sectors).prop_map(|(off, len)| Op::Zero { off, len }),
        1 => Just(Op::Flush),
        1 => range(sectors).prop_map(|(off, len)| Op::CopyUp { off, len }),
        1 => Just(Op::Reopen),
        2 => (any::<u64>(), proptest::option::of(0u8..8))
            .prop_map(|(keep_seed, cut_flush_after)| Op::PowerCut { keep_seed, cut_flush_after }),
        3 => Just(Op::Snapshot),
        1 => any::<u16>().prop_map(|pick| Op::Fork { pick }),
        3 => any::<u16>().prop_map(|pick| Op::Commit { pick }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    prop_oneof![Just(4096u32), Just(8192)].prop_flat_map(|bs| {
        let per_block = bs as u64 / 512;
        (1..=per_block * 12).prop_flat_map(move |sectors| {
            proptest::collection::vec(op(sectors), 1..13).prop_map(move |ops| Case {
                block_size: bs,
                sectors,
                ops,
            })
        })
    })
}

/// One overlay file of the case.
struct Node {
    path: PathBuf,
    /// The node it is made over; `None`: the base.
    below: Option<usize>,
    frozen: bool,
    /// What it reads as (for the top: as of its last close).
    expect: Vec<u8>,
}

struct Model {
    dir: PathBuf,
    base: PathBuf,
    base_expect: Vec<u8>,
    block_size: u32,
    nodes: Vec<Node>,
    top: usize,
    disk: Arc<SimDisk>,
    dev: Option<Dev>,
    reference: Reference,
    commits: u64,
    refused: u64,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn scratch_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let root = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    root.join(format!(
        "ublk-cow-chain-model-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Model {
    fn new(c: &Case) -> Model {
        let dir = scratch_dir();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let size = (c.sectors * 512) as usize;
        let image = pattern(size, 0xb5, 0);
        let base = dir.join("base.img");
        std::fs::write(&base, &image).unwrap();
        let mut m = Model {
            dir,
            base,
            base_expect: image.clone(),
            block_size: c.block_size,
            nodes: Vec::new(),
            top: 0,
            disk: Arc::new(SimDisk::new(Vec::new())),
            dev: None,
            reference: Reference::new(image.clone()),
            commits: 0,
            refused: 0,
        };
        m.new_top(None, image).expect("the first overlay opens");
        m
    }

    fn dev(&self) -> &Dev {
        self.dev.as_ref().unwrap()
    }

    fn size(&self) -> u64 {
        self.base_expect.len() as u64
    }

    /// A new overlay over `below` (`None`: the base), which reads as
    /// `expect`, becomes the top.
    fn new_top(&mut self, below: Option<usize>, expect: Vec<u8>) -> Result<(), TestCaseError> {
        let path = self.dir.join(format!("o{}", self.nodes.len()));
        let backing = match below {
            Some(n) => self.nodes[n].path.clone(),
            None => self.base.clone(),
        };
        create_overlay(&path, &backing, Some(self.block_size)).unwrap();
        self.nodes.push(Node {
            path,
            below,
            frozen: false,
            expect: expect.clone(),
        });
        self.top = self.nodes.len() - 1;
        self.reference = Reference::new(expect);
        self.open_top(Arc::new(SimDisk::new(
            std::fs::read(&self.nodes[self.top].path).unwrap(),
        )))
    }

    /// Opens the top over its chain, its file's bytes held in `disk`.
    fn open_top(&mut self, disk: Arc<SimDisk>) -> Result<(), TestCaseError> {
        let n = &self.nodes[self.top];
        let backing = match n.below {
            Some(b) => self.nodes[b].path.clone(),
            None => self.base.clone(),
        };
        let Lower {
            backed,
            identity: id,
            ..
        } = open_lower(&backing)
            .map_err(|e| TestCaseError::fail(format!("the top's chain opens: {e}")))?;
        let check = OpenCheck {
            base: &id,
            block_size: None,
            force: false,
        };
        let blocks = self.size().div_ceil(self.block_size as u64);
        self.dev = None;
        self.disk = disk.clone();
        let dev = CowDevice::open(
            backed,
            disk,
            check,
            MapSource::Load(MapMemory::heap(blocks)),
        )
        .map_err(|e| TestCaseError::fail(format!("the top opens over its chain: {e}")))?;
        self.dev = Some(dev);
        Ok(())
    }

    /// Closes the top cleanly and writes it back to its file.
    fn close_top(&mut self) {
        let dev = self.dev.take().unwrap();
        let (_, disk) = dev.close().unwrap();
        self.reference.flushed();
        let n = &mut self.nodes[self.top];
        write_sparse(&n.path, &disk.contents());
        n.expect = self.reference.current.clone();
    }

    fn read_whole(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.size() as usize];
        self.dev().read(0, &mut buf).unwrap();
        buf
    }

    fn check_all(&self, what: &str) -> Result<(), TestCaseError> {
        prop_assert!(
            self.read_whole() == self.reference.current,
            "the top differs from the reference ({})",
            what
        );
        Ok(())
    }

    /// The node to act on: `pick` among those `ok` accepts.
    fn pick(&self, pick: u16, ok: impl Fn(&Node) -> bool) -> Option<usize> {
        let all: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| ok(&self.nodes[i]))
            .collect();
        (!all.is_empty()).then(|| all[pick as usize % all.len()])
    }

    fn depth(&self, mut n: usize) -> usize {
        let mut d = 1;
        while let Some(b) = self.nodes[n].below {
            n = b;
            d += 1;
        }
        d
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
                self.dev().flush().unwrap();
                self.reference.flushed();
            }
            Op::CopyUp { off, len } => {
                self.dev().cache(off, len, CacheMode::Cow).unwrap();
            }
            Op::Reopen => {
                self.close_top();
                let disk = Arc::new(SimDisk::new(self.disk.contents()));
                self.open_top(disk)?;
                self.check_all("after a reopen")?;
            }
            Op::PowerCut {
                keep_seed,
                cut_flush_after,
            } => {
                if let Some(n) = cut_flush_after {
                    self.disk.cut_power_after(n as u64);
                    if self.dev().flush().is_ok() {
                        self.reference.flushed();
                    }
                }
                let mut rng = XorShift(keep_seed);
                let after = self.disk.after_power_cut(|_| rng.bit());
                self.open_top(Arc::new(after))?;
                let got = self.read_whole();
                self.reference.after_power_cut(got)?;
            }
            Op::Snapshot => {
                if self.depth(self.top) >= MAX_DEPTH {
                    return Ok(());
                }
                self.close_top();
                let top = self.top;
                freeze(&self.nodes[top].path).unwrap();
                self.nodes[top].frozen = true;
                let expect = self.nodes[top].expect.clone();
                self.new_top(Some(top), expect)?;
                self.check_all("after a snapshot")?;
            }
            Op::Fork { pick } => {
                let Some(f) = self.pick(pick, |n| n.frozen) else {
                    return Ok(());
                };
                if self.depth(f) >= MAX_DEPTH {
                    return Ok(());
                }
                self.close_top();
                let expect = self.nodes[f].expect.clone();
                self.new_top(Some(f), expect)?;
                self.check_all("after a fork")?;
            }
            Op::Commit { pick } => {
                self.close_top();
                let n = self.pick(pick, |_| true).unwrap();
                let below = self.nodes[n].below;
                let stacked = (0..self.nodes.len()).any(|x| x != n && self.nodes[x].below == below);
                let backing = match below {
                    Some(b) => self.nodes[b].path.clone(),
                    None => self.base.clone(),
                };
                let files = |m: &Model| {
                    (
                        std::fs::read(&m.nodes[n].path).unwrap(),
                        std::fs::read(&backing).unwrap(),
                    )
                };
                let before = files(self);
                let opts = CommitOptions {
                    force: false,
                    devices: Vec::new(),
                };
                let r = commit(&self.nodes[n].path, &opts, &mut |_, _| {});
                if stacked {
                    let e = r.err();
                    prop_assert!(
                        e.as_ref()
                            .is_some_and(|e| e.to_string().contains("also has its backing")),
                        "a commit under a stacked backing: {:?}",
                        e
                    );
                    prop_assert!(files(self) == before, "a refused commit changed a file");
                    self.refused += 1;
                } else {
                    prop_assert!(r.is_ok(), "commit failed: {}", r.err().unwrap());
                    let expect = self.nodes[n].expect.clone();
                    match below {
                        Some(b) => self.nodes[b].expect = expect,
                        None => self.base_expect = expect,
                    }
                    self.commits += 1;
                }
                let disk = Arc::new(SimDisk::new(
                    std::fs::read(&self.nodes[self.top].path).unwrap(),
                ));
                self.open_top(disk)?;
                self.check_all("after a commit")?;
            }
        }
        Ok(())
    }

    /// Every frozen layer reads as the model says, and so does the base.
    fn check_layers(&self) -> Result<(), TestCaseError> {
        for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.frozen) {
            let backed = open_lower(&n.path).expect("a layer opens").backed;
            let mut buf = vec![0u8; self.size() as usize];
            backed.read_at(&mut buf, 0).unwrap();
            prop_assert!(buf == n.expect, "layer o{} reads wrong", i);
        }
        prop_assert!(
            std::fs::read(&self.base).unwrap() == self.base_expect,
            "the base reads wrong"
        );
        Ok(())
    }
}

/// Writes `bytes` into the file at `path` (replacing it), leaving holes
/// where they are zero: most of an overlay is a hole.
fn write_sparse(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    let zeros = [0u8; 4096];
    for (i, chunk) in bytes.chunks(4096).enumerate() {
        if chunk != &zeros[..chunk.len()] {
            f.write_all_at(chunk, i as u64 * 4096).unwrap();
        }
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        self.dev = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static OPS: AtomicU64 = AtomicU64::new(0);
static COMMITS: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);

fn run_case(c: Case) -> Result<(), TestCaseError> {
    let mut m = Model::new(&c);
    for (i, op) in c.ops.iter().enumerate() {
        m.run(op)
            .map_err(|e| TestCaseError::fail(format!("op {i} ({op:?}): {e}")))?;
    }
    m.check_all("at the end")?;
    m.check_layers()?;
    OPS.fetch_add(c.ops.len() as u64, Ordering::Relaxed);
    COMMITS.fetch_add(m.commits, Ordering::Relaxed);
    REFUSED.fetch_add(m.refused, Ordering::Relaxed);
    Ok(())
}

/// Runs `want` cases and says how many passed; two tests share the
/// 10,000 cases so that they run on two threads.
fn run_cases(name: &str, want: u32) {
    let cfg = ProptestConfig {
        cases: want,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let passed = AtomicU64::new(0);
    let before = (
        OPS.load(Ordering::Relaxed),
        COMMITS.load(Ordering::Relaxed),
        REFUSED.load(Ordering::Relaxed),
    );
    proptest!(cfg, |(c in case())| {
        run_case(c)?;
        passed.fetch_add(1, Ordering::Relaxed);
    });
    let n = passed.load(Ordering::Relaxed);
    println!(
        "{name}: {n} cases (both halves so far: {} operations, {} commits, {} refused; \
         this half from {:?}), 0 divergences",
        OPS.load(Ordering::Relaxed),
        COMMITS.load(Ordering::Relaxed),
        REFUSED.load(Ordering::Relaxed),
        before
    );
    assert!(n >= want as u64, "only {n} model cases ran");
}

/// Half of the cases; [`chains_match_the_reference_model_second_half`] runs
/// the other.
#[test]
fn chains_match_the_reference_model() {
    run_cases("chain model, first half", cases(10_000).div_ceil(2));
}

#[test]
fn chains_match_the_reference_model_second_half() {
    run_cases("chain model, second half", cases(10_000).div_ceil(2));
}

/// The sequence that showed that a copied block written over before a power
/// cut may keep `Copied` in the overlay's map while holding the write: a
/// commit (which skips copies) would then lose the write. Fixed, as the
/// random cases meet it rarely.
#[test]
fn a_copy_written_over_before_a_power_cut_is_committed() {
    let ops = vec![
        Op::CopyUp { off: 0, len: 4096 },
        Op::Flush,
        Op::Write {
            off: 0,
            len: 512,
            seed: 7,
        },
        // Keeps the write's data (the first write since the flush), not
        // the map change, which a flush had not yet written.
        Op::PowerCut {
            keep_seed: 1,
            cut_flush_after: None,
        },
        Op::Commit { pick: 0 },
    ];
    run_case(Case {
        block_size: 4096,
        sectors: 16,
        ops,
    })
    .unwrap();
}

/// The sequence that showed a layer's modification time set back under
/// the overlay above it: a commit into the layer that wrote nothing (the
/// overlay held only a copy) rewrote its header anyway, and a later commit
/// of the layer itself, with nothing left to merge, restored the time an
/// earlier commit of it had kept. Found by the random cases, rarely, as it
/// needs the two times to differ.
#[test]
fn a_layer_keeps_the_time_the_overlay_above_it_recorded() {
    let ops = vec![
        Op::Write {
            off: 0,
            len: 512,
            seed: 0,
        },
        Op::Snapshot,
        Op::CopyUp { off: 0, len: 512 },
        Op::Commit { pick: 40044 },
        Op::Snapshot,
        Op::Commit { pick: 36622 },
        Op::Commit { pick: 2028 },
    ];
    run_case(Case {
        block_size: 8192,
        sectors: 20,
        ops,
    })
    .unwrap();
}
