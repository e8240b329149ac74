//! Store-buffer stress: readers enter and load again and again while a
//! writer swaps a device out and reclaims it as fast as it can.
//!
//! A reader's announcement (its pin) is a store and its table load is a
//! load; if the load could pass the store, a reclaimer could miss the
//! reader and free the table and device under it. Every device poisons
//! itself on drop and checks its poison on every call; every dispatch also
//! checks that it did not reach a device whose `unregister` had returned
//! before the dispatch began. CI runs this in release
//! (`cargo test --release --test bus_store_buffer`), where the window is
//! narrowest; a plain `cargo test` runs a shorter version.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use vmio::{Access, Device, DeviceError, Edit, IoBus, IoRange, Mmio, Width};

const LIVE: u64 = 0x1ee7_1ee7_1ee7_1ee7;
const POISON: u64 = 0xdead_dead_dead_dead;
const ADDR: u64 = 0x1000_0000;

static VIOLATIONS: AtomicU64 = AtomicU64::new(0);

/// Answers its serial number; poisoned once dropped.
struct Poisoning {
    state: AtomicU64,
    serial: u64,
}

impl Device for Poisoning {
    fn read(&self, _: Access) -> Result<u64, DeviceError> {
        if self.state.load(SeqCst) != LIVE {
            VIOLATIONS.fetch_add(1, SeqCst);
        }
        Ok(self.serial)
    }
    fn write(&self, _: Access, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
}

impl Drop for Poisoning {
    fn drop(&mut self) {
        self.state.store(POISON, SeqCst);
    }
}

fn device(serial: u64) -> Arc<dyn Device> {
    Arc::new(Poisoning { state: AtomicU64::new(LIVE), serial })
}

#[test]
fn readers_never_reach_a_reclaimed_or_unregistered_device() {
    let swaps: u64 = if cfg!(miri) {
        50
    } else if cfg!(debug_assertions) {
        20_000
    } else {
        300_000
    };
    let budget = Duration::from_secs(if cfg!(debug_assertions) { 10 } else { 20 });
    let bus = IoBus::<Mmio>::new();
    let range = IoRange::new(ADDR, 0x1000).unwrap();
    let mut current = bus.register(range, device(0)).unwrap();
    // Highest serial whose `unregister` has returned.
    let unregistered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(3));
    let readers: Vec<_> = (0..2)
        .map(|k| {
            let (bus, unregistered, stop) = (bus.clone(), unregistered.clone(), stop.clone());
            let start = start.clone();
            thread::spawn(move || {
                let mut h = bus.handle(k);
                start.wait();
                let mut calls = 0u64;
                while !stop.load(SeqCst) {
                    let gone = unregistered.load(SeqCst);
                    // Both paths: the handle's own participant and the
                    // thread's cached one.
                    let got = if calls.is_multiple_of(2) {
                        h.read(ADDR, Width::U64)
                    } else {
                        bus.read(ADDR, Width::U64)
                    };
                    let serial = got.expect("the address is never unmapped");
                    if serial <= gone && gone > 0 {
                        VIOLATIONS.fetch_add(1, SeqCst);
                    }
                    calls += 1;
                }
                calls
            })
        })
        .collect();

    start.wait();
    let t0 = Instant::now();
    let mut done = 0;
    for serial in 1..=swaps {
        // Swap in one publish, so the address never misses; then reclaim
        // as soon as the grace period allows.
        let c = bus
            .transaction([
                Edit::Unregister(current),
                Edit::Register { range, device: device(serial) },
            ])
            .unwrap();
        unregistered.store(serial - 1, SeqCst);
        current = c.registered[0];
        while !c.unplug.poll() {
            std::hint::spin_loop();
        }
        done = serial;
        if t0.elapsed() > budget {
            break;
        }
    }
    stop.store(true, SeqCst);
    let calls: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    eprintln!("{done} swaps, {calls} reads in {:?}", t0.elapsed());
    assert!(done >= swaps.min(1000), "too few swaps to mean anything: {done}");
    assert!(calls >= 1000, "readers must have raced the writer: {calls} reads");
    assert_eq!(VIOLATIONS.load(SeqCst), 0, "a reader reached a dropped or unplugged device");
}
