//! A gate that backend calls wait at until the test opens it, so a test can
//! hold a request inside the backend while it does something else.
//!
//! Included by path (`#[path = "common/gate.rs"] mod gate;`).
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Closed until [`open`](Gate::open); counts the calls that reached it and
/// the calls that went through.
pub struct Gate {
    closed: Mutex<bool>,
    cv: Condvar,
    entered: AtomicUsize,
    passed: AtomicUsize,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            closed: Mutex::new(true),
            cv: Condvar::new(),
            entered: AtomicUsize::new(0),
            passed: AtomicUsize::new(0),
        }
    }
}

impl Gate {
    /// Waits here while the gate is closed.
    pub fn pass(&self) {
        // Release: pairs with the Acquire in `wait_entered`.
        self.entered.fetch_add(1, Ordering::Release);
        let mut closed = self.closed.lock().unwrap();
        while *closed {
            closed = self.cv.wait(closed).unwrap();
        }
        drop(closed);
        // Relaxed: a counter read after the threads are joined.
        self.passed.fetch_add(1, Ordering::Relaxed);
    }

    /// Lets every waiting and later call through.
    pub fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.cv.notify_all();
    }

    /// Returns once a call has reached the gate; fails the test with
    /// `what` if none does within `timeout`.
    pub fn wait_entered(&self, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        // Acquire: pairs with the Release increment in `pass`.
        while self.entered.load(Ordering::Acquire) == 0 {
            assert!(Instant::now() < deadline, "{what} never reached the backend");
            std::thread::yield_now();
        }
    }

    /// Calls that went through so far.
    pub fn passed(&self) -> usize {
        // Relaxed: see `pass`.
        self.passed.load(Ordering::Relaxed)
    }
}
