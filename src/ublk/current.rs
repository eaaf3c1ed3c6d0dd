//! The device a running daemon serves now, and the pause that replaces it.
//! A live snapshot closes the device's gate (`engine::gate`), waits until
//! no request, background job or `cache` piece is in flight, swaps the
//! device for the one over the new overlay, and opens the gate again
//! ([`Paused`]). Each queue takes the new device when its next request
//! passes the gate, and points its ring's fixed files at the new files
//! then (`queue`); requests that came meanwhile waited at the gate.

use crate::engine::gate::{Closed, Gate, Pass};
use crate::sys::EventFd;
use crate::ublk::ServedDevice;
use std::fs::File;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// See the module.
pub struct Current {
    /// The device served now. The lock guards the swap and the clone of the
    /// `Arc`, nothing else: nobody holds it across I/O.
    device: Mutex<Arc<ServedDevice>>,
    /// How many swaps there were: a queue whose count differs takes the
    /// new device.
    epoch: AtomicU64,
    /// Slots `0..queues` are the queues', the last one the control
    /// socket's threads'.
    gate: Gate,
    /// One per queue, signalled each time the gate opens: a queue whose
    /// requests wait at the closed gate reads its own on its ring.
    opened: Vec<EventFd>,
    /// /dev/zero, a fixed file of every ring (zero copy reads zero runs
    /// from it); open as long as the device is served.
    zero: File,
}

/// The gate held closed with nothing in flight, until dropped.
pub struct Paused<'a> {
    current: &'a Current,
    closed: Option<Closed<'a>>,
}

impl Current {
    /// Serves `sh` to `queues` queues.
    pub fn new(sh: Arc<ServedDevice>, queues: u16) -> std::io::Result<Current> {
        Ok(Current {
            device: Mutex::new(sh),
            epoch: AtomicU64::new(0),
            gate: Gate::new(queues as usize + 1),
            opened: (0..queues)
                .map(|_| EventFd::new())
                .collect::<std::io::Result<_>>()?,
            zero: File::open("/dev/zero")?,
        })
    }

    /// The device served now.
    pub fn device(&self) -> Arc<ServedDevice> {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many swaps there were.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    pub(crate) fn zero(&self) -> &File {
        &self.zero
    }

    /// A pass for a request of queue `qid`, or `None` while paused.
    pub(crate) fn try_pass(&self, qid: u16) -> Option<Pass<'_>> {
        self.gate.try_pass(qid as usize)
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.gate.is_closed()
    }

    /// The eventfd queue `qid` reads while paused.
    pub(crate) fn opened_fd(&self, qid: u16) -> RawFd {
        self.opened[qid as usize].raw()
    }

    /// A pass for a thread of the control socket, waiting while paused.
    pub fn pass_blocking(&self) -> Pass<'_> {
        let slot = self.opened.len();
        loop {
            if let Some(p) = self.gate.try_pass(slot) {
                return p;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Closes the gate and waits until nothing is in flight; gives up after
    /// `patience` (the gate opens again).
    pub fn pause(&self, patience: Duration) -> Result<Paused<'_>, String> {
        let closed = self
            .gate
            .close()
            .ok_or("another snapshot of the device is in progress")?;
        let paused = Paused {
            current: self,
            closed: Some(closed),
        };
        let deadline = Instant::now() + patience;
        while !paused.closed.as_ref().is_some_and(|c| c.drained()) {
            if Instant::now() > deadline {
                return Err(format!(
                    "the device's requests in flight did not complete in {} s",
                    patience.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(paused)
    }
}

impl Paused<'_> {
    /// Serves `sh` from when the gate opens.
    pub fn swap(&self, sh: Arc<ServedDevice>) {
        let c = self.current;
        *c.device.lock().unwrap_or_else(|e| e.into_inner()) = sh;
        c.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        // Open first, then wake: a queue that read its eventfd sees the
        // gate open.
        drop(self.closed.take());
        for e in &self.current.opened {
            e.signal();
        }
    }
}
