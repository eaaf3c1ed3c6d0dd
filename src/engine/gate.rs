//! The pause gate of a served device: all work that touches the device (a
//! request, a piece of background cache work, a piece of a `cache`
//! command) holds a [`Pass`] while it runs. A live snapshot closes the gate,
//! waits until no pass is held ([`Closed::drained`]), swaps the device's top
//! overlay, and opens it again; work that came meanwhile waits at the gate
//! and then runs on the new device.
//!
//! Each passer has a slot (a queue, or the control socket's threads), so
//! that taking a pass is an atomic add on a counter of its own, not on one
//! that every queue's thread writes. How to wait while the gate is closed
//! is the caller's: a queue waits on its ring, a thread sleeps.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One slot's count of passes held, alone on its cache line.
#[repr(align(64))]
#[derive(Default)]
struct Slot(AtomicU64);

/// The gate; see the module.
pub struct Gate {
    closed: AtomicBool,
    slots: Box<[Slot]>,
}

/// Leave to do work on the device, until dropped.
#[must_use]
pub struct Pass<'a> {
    slot: &'a AtomicU64,
}

/// The gate held closed, until dropped (which opens it).
#[must_use]
pub struct Closed<'a> {
    gate: &'a Gate,
}

impl Gate {
    /// An open gate for passers in slots `0..slots`.
    pub fn new(slots: usize) -> Gate {
        Gate {
            closed: AtomicBool::new(false),
            slots: (0..slots).map(|_| Slot::default()).collect(),
        }
    }

    /// A pass for slot `slot`, or `None` while the gate is closed.
    pub fn try_pass(&self, slot: usize) -> Option<Pass<'_>> {
        let count = &self.slots[slot].0;
        // The count goes up before the gate is looked at, and `close` sets
        // the gate before it counts (both SeqCst): either this sees the gate
        // closed, or `drained` sees this pass.
        count.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            count.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Pass { slot: count })
    }

    /// Whether the gate is closed now.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Closes the gate: no new pass is given until the result is dropped.
    /// `None` if it is closed already (by another snapshot).
    pub fn close(&self) -> Option<Closed<'_>> {
        self.closed
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| Closed { gate: self })
    }
}

impl Closed<'_> {
    /// Whether no pass is held: nothing touches the device until the gate
    /// opens.
    pub fn drained(&self) -> bool {
        self.gate
            .slots
            .iter()
            .all(|s| s.0.load(Ordering::SeqCst) == 0)
    }
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.gate.closed.store(false, Ordering::SeqCst);
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.slot.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;
    use std::time::{Duration, Instant};

    #[test]
    fn a_closed_gate_gives_no_pass_and_drains_when_passes_end() {
        let g = Gate::new(2);
        let p = g.try_pass(1).expect("open");
        let c = g.close().expect("not closed yet");
        assert!(g.close().is_none(), "closed twice");
        assert!(g.try_pass(0).is_none());
        assert!(!c.drained(), "a pass is held");
        drop(p);
        assert!(c.drained());
        drop(c);
        assert!(!g.is_closed());
        assert!(g.try_pass(0).is_some());
    }

    /// Threads take passes and, holding one, read then write a shared
    /// value that a closer changes only while the gate is drained. A closer
    /// that ran while a pass was held would be seen as a torn update.
    #[test]
    fn no_pass_is_held_while_the_gate_is_drained() {
        let g = Arc::new(Gate::new(3));
        // Passers add 1 to `work` and subtract it again holding a pass; the
        // closer checks it is 0 while drained.
        let work = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let passers: Vec<_> = (0..3)
            .map(|slot| {
                let (g, work, stop) = (g.clone(), work.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut passed = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(_p) = g.try_pass(slot) {
                            work.fetch_add(1, Ordering::SeqCst);
                            std::hint::spin_loop();
                            work.fetch_sub(1, Ordering::SeqCst);
                            passed += 1;
                        }
                    }
                    passed
                })
            })
            .collect();
        let end = Instant::now() + Duration::from_millis(300);
        let mut pauses = 0;
        while Instant::now() < end {
            let c = g.close().expect("one closer");
            while !c.drained() {
                std::hint::spin_loop();
            }
            assert_eq!(work.load(Ordering::SeqCst), 0, "work ran while drained");
            pauses += 1;
            drop(c);
        }
        stop.store(true, Ordering::Relaxed);
        let passed: u64 = passers.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(
            pauses > 10 && passed > 10,
            "pauses {pauses}, passes {passed}"
        );
    }
}
