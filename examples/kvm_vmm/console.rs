//! The guest console: what the UART transmits goes to standard output, and
//! each line is matched against the boot milestones the report times.

use std::io::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Boot milestones recognised on the console: (label, text in the line).
const MILESTONES: &[(&str, &str)] = &[
    ("virtio-mmio device registered", "virtio-mmio: Registering device"),
    ("virtio-blk probe", "virtio_blk virtio"),
    ("disk size line", "512-byte logical blocks"),
    ("ext4 mounted", "EXT4-fs (vda): mounted filesystem"),
    ("root mounted", "VFS: Mounted root"),
    ("kernel panic", "Kernel panic"),
];

/// One milestone reached: when (after VMM start) and the line that showed it.
#[derive(Clone)]
pub struct Reached {
    /// What it is.
    pub label: String,
    /// Time since the VMM started.
    pub at: Duration,
    /// The console line (or event) that marked it.
    pub line: String,
}

struct State {
    line: Vec<u8>,
    reached: Vec<Reached>,
    bytes: u64,
}

/// Console output and milestone clock.
pub struct Console {
    start: Instant,
    state: Mutex<State>,
}

impl Console {
    /// A console whose clock starts at `start`.
    pub fn new(start: Instant) -> Self {
        let state = State { line: Vec::new(), reached: Vec::new(), bytes: 0 };
        Console { start, state: Mutex::new(state) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an event seen outside the console (first time only).
    pub fn mark(&self, label: &str, what: &str) {
        let at = self.start.elapsed();
        let mut s = self.lock();
        if !s.reached.iter().any(|r| r.label == label) {
            s.reached.push(Reached { label: label.into(), at, line: what.into() });
        }
    }

    /// Takes bytes the guest transmitted.
    pub fn output(&self, bytes: &[u8]) {
        let at = self.start.elapsed();
        let mut out = std::io::stdout().lock();
        // The console is best effort: a closed stdout must not stop the VM.
        let _ = out.write_all(bytes);
        let _ = out.flush();
        let mut s = self.lock();
        if s.bytes == 0 && !bytes.is_empty() {
            s.reached.push(Reached {
                label: "first console output".into(),
                at,
                line: String::from_utf8_lossy(bytes).trim_end().into(),
            });
        }
        s.bytes += bytes.len() as u64;
        for &b in bytes {
            if b != b'\n' {
                // Bound the line buffer against a guest that never ends one.
                if s.line.len() < 4096 {
                    s.line.push(b);
                }
                continue;
            }
            let line = String::from_utf8_lossy(&s.line).trim_end().to_string();
            s.line.clear();
            for (label, needle) in MILESTONES {
                if line.contains(needle) && !s.reached.iter().any(|r| r.label == *label) {
                    s.reached.push(Reached { label: (*label).into(), at, line: line.clone() });
                }
            }
        }
    }

    /// Milestones in the order they were reached.
    pub fn reached(&self) -> Vec<Reached> {
        let mut r = self.lock().reached.clone();
        r.sort_by_key(|m| m.at);
        r
    }
}
