//! Reclamation under the conditions that used to wedge a bus: a vCPU parked
//! inside a device call, a device destructor that panics, waits from inside
//! other buses' dispatches, and buses used from thread-local destructors.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vmio::{Access, Device, DeviceError, Edit, IoBus, IoRange, Mmio, Unplug, WaitError, Width};

const EDITS: usize = 20_000;
const SPARE: u64 = 0x7000_0000;

/// Answers 1; trivial.
struct Plain;
impl Device for Plain {
    fn read(&self, _: Access) -> Result<u64, DeviceError> {
        Ok(1)
    }
    fn write(&self, _: Access, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// A device whose reads block until `release` is set, after telling the
/// test it is inside (`entered`).
struct Parking {
    entered: Barrier,
    release: AtomicBool,
}
impl Device for Parking {
    fn read(&self, _: Access) -> Result<u64, DeviceError> {
        self.entered.wait();
        while !self.release.load(SeqCst) {
            thread::sleep(Duration::from_micros(200));
        }
        Ok(7)
    }
    fn write(&self, _: Access, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
}

fn range(start: u64, len: u64) -> IoRange<Mmio> {
    IoRange::new(start, len).unwrap()
}

/// A bus with a few dozen devices, like a small VM's MMIO space.
fn populated() -> IoBus<Mmio> {
    let bus = IoBus::new();
    bus.transaction((0..32u64).map(|i| Edit::Register {
        range: range(0x1000_0000 + i * 0x1000, 0x1000),
        device: Arc::new(Plain) as Arc<dyn Device>,
    }))
    .unwrap();
    bus
}

/// `EDITS` edits (a spare device plugged, then unplugged, alternately);
/// returns edits per second and the last unplug.
fn edit_storm(bus: &IoBus<Mmio>) -> (f64, Unplug) {
    let t0 = Instant::now();
    let mut last = None;
    for _ in 0..EDITS / 2 {
        let id = bus.register(range(SPARE, 0x1000), Arc::new(Plain)).unwrap();
        last = Some(bus.unregister(id).unwrap());
    }
    let rate = EDITS as f64 / t0.elapsed().as_secs_f64();
    (rate, last.expect("at least one edit"))
}

/// Runs `edit_storm` on a populated bus while vCPU 1 keeps dispatching
/// and, when `stuck`, vCPU 0 sits inside a device call. Returns the storm's
/// rate, the delay between releasing vCPU 0 and the last unplug
/// completing, and whether that unplug was still pending before.
fn storm_beside_vcpus(stuck: bool) -> (f64, Duration, bool) {
    let bus = populated();
    let parking = Arc::new(Parking { entered: Barrier::new(2), release: AtomicBool::new(false) });
    bus.register(range(0x2000_0000, 0x1000), parking.clone()).unwrap();
    let parked = stuck.then(|| {
        let bus = bus.clone();
        let vcpu = thread::spawn(move || bus.handle(0).read(0x2000_0000, Width::U32));
        parking.entered.wait();
        vcpu
    });

    // Another vCPU keeps dispatching meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (bus, stop) = (bus.clone(), stop.clone());
        thread::spawn(move || {
            let mut h = bus.handle(1);
            let mut n = 0u64;
            while !stop.load(SeqCst) {
                n += h.read(0x1000_0000, Width::U32).unwrap();
            }
            n
        })
    };
    let (rate, last) = edit_storm(&bus);
    stop.store(true, SeqCst);
    assert!(other.join().unwrap() > 0, "the other vCPU kept dispatching");
    let pending = !last.poll();

    let released = Instant::now();
    parking.release.store(true, SeqCst);
    last.wait().unwrap();
    let delay = released.elapsed();
    if let Some(vcpu) = parked {
        assert_eq!(vcpu.join().unwrap(), Ok(7));
    }
    (rate, delay, pending)
}

#[test]
fn a_stuck_vcpu_neither_slows_edits_nor_keeps_unplugs_from_completing_afterwards() {
    // Best of two each, so a moment of load on the machine does not decide.
    let (free, _, _) = storm_beside_vcpus(false);
    let (free2, _, _) = storm_beside_vcpus(false);
    let free = free.max(free2);
    let (stuck, delay, pending) = storm_beside_vcpus(true);
    let (stuck2, delay2, pending2) = storm_beside_vcpus(true);
    let (stuck, delay) = (stuck.max(stuck2), delay.max(delay2));
    eprintln!(
        "edits/s: {free:.0} with every vCPU free, {stuck:.0} with one parked in a device; \
         last unplug complete {delay:?} after the parked vCPU returned"
    );
    assert!(pending && pending2, "a grace period cannot end while a vCPU is pinned");
    assert!(
        stuck * 3.0 >= free,
        "edits slowed down by a parked vCPU: {stuck:.0}/s against {free:.0}/s"
    );
    assert!(delay < Duration::from_secs(1), "unplug completed {delay:?} after release");
}

/// Counts its drops; the one with `panics` set panics in `Drop`.
struct Fragile {
    panics: bool,
    drops: Arc<AtomicUsize>,
}
impl Device for Fragile {
    fn read(&self, _: Access) -> Result<u64, DeviceError> {
        Ok(0)
    }
    fn write(&self, _: Access, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
}
impl Drop for Fragile {
    fn drop(&mut self) {
        self.drops.fetch_add(1, SeqCst);
        if self.panics {
            panic!("device destructor panics (on purpose)");
        }
    }
}

/// Polls `unplug` for up to ten seconds (a broken implementation must fail
/// the test, not hang it).
fn completes(unplug: &Unplug) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if unplug.poll() {
            return true;
        }
        thread::sleep(Duration::from_millis(1));
    }
    false
}

#[test]
fn a_panicking_device_destructor_strands_nothing() {
    let bus = IoBus::<Mmio>::new();
    let drops = Arc::new(AtomicUsize::new(0));
    let ids: Vec<_> = (0..3u64)
        .map(|i| {
            let dev = Fragile { panics: i == 0, drops: drops.clone() };
            bus.register(range(0x1000 * (i + 1), 0x100), Arc::new(dev)).unwrap()
        })
        .collect();
    // Another unplug, retired just before: it shares the collector's batch.
    let other = bus.register(range(0x9000, 0x100), Arc::new(Plain)).unwrap();
    let other = bus.unregister(other).unwrap();

    let batch = bus.transaction(ids.iter().map(|&id| Edit::Unregister(id))).unwrap();
    assert!(completes(&batch.unplug), "the batch's unplug never completed");
    assert!(completes(&other), "an unplug beside the panicking one never completed");
    assert_eq!(drops.load(SeqCst), 3, "every device of the batch was dropped");
    assert_eq!(batch.unplug.wait(), Ok(()));

    // The bus goes on working.
    let id = bus.register(range(0x1000, 0x100), Arc::new(Plain)).unwrap();
    assert_eq!(bus.read(0x1000, Width::U8), Ok(1));
    assert!(completes(&bus.unregister(id).unwrap()));
}

/// On a write, unplugs `target` from `bus` and waits for it, recording the
/// result.
struct Ejector {
    bus: IoBus<Mmio>,
    target: Mutex<Option<vmio::DeviceId>>,
    result: Mutex<Option<Result<(), WaitError>>>,
}
impl Device for Ejector {
    fn read(&self, _: Access) -> Result<u64, DeviceError> {
        Ok(0)
    }
    fn write(&self, _: Access, _: u64) -> Result<(), DeviceError> {
        let id = self.target.lock().unwrap().take().expect("a target");
        let unplug = self.bus.unregister(id).map_err(|_| DeviceError::Failed("unplug"))?;
        *self.result.lock().unwrap() = Some(unplug.wait());
        Ok(())
    }
}

#[test]
fn waits_from_device_code_are_refused_only_when_they_would_deadlock() {
    let a = IoBus::<Mmio>::new();
    let b = IoBus::<Mmio>::new();

    // A device of bus `a` unplugs a device of unrelated bus `b` and waits:
    // nothing of `b` is open on this thread, so the wait completes.
    let victim = b.register(range(0x100, 0x10), Arc::new(Plain)).unwrap();
    let ejector = Arc::new(Ejector {
        bus: b.clone(),
        target: Mutex::new(Some(victim)),
        result: Mutex::new(None),
    });
    a.register(range(0x1000, 0x10), ejector.clone()).unwrap();
    a.handle(0).write(0x1000, Width::U8, 1).unwrap();
    assert_eq!(*ejector.result.lock().unwrap(), Some(Ok(())));

    // A device of `b`, called from inside a dispatch of `a`, waits on `a`:
    // that dispatch of `a` is open below it on this thread, so it is refused.
    struct Relay(IoBus<Mmio>);
    impl Device for Relay {
        fn read(&self, _: Access) -> Result<u64, DeviceError> {
            Ok(0)
        }
        fn write(&self, _: Access, v: u64) -> Result<(), DeviceError> {
            self.0.write(0x200, Width::U8, v).map_err(|_| DeviceError::Failed("relay"))
        }
    }
    let inner = a.register(range(0x3000, 0x10), Arc::new(Plain)).unwrap();
    let back = Arc::new(Ejector {
        bus: a.clone(),
        target: Mutex::new(Some(inner)),
        result: Mutex::new(None),
    });
    b.register(range(0x200, 0x10), back.clone()).unwrap();
    a.register(range(0x2000, 0x10), Arc::new(Relay(b.clone()))).unwrap();
    a.handle(0).write(0x2000, Width::U8, 1).unwrap();
    assert_eq!(*back.result.lock().unwrap(), Some(Err(WaitError::InsideDispatch)));

    // Once that dispatch has returned, the same thread may wait on `a`.
    let spare = a.register(range(0x5000, 0x10), Arc::new(Plain)).unwrap();
    assert_eq!(a.unregister(spare).unwrap().wait(), Ok(()));
}

#[test]
fn buses_work_from_thread_local_destructors() {
    /// Uses the bus's handle-free paths and edits it while its thread's
    /// thread-local storage is being torn down.
    struct Late(IoBus<Mmio>, Arc<Mutex<Vec<String>>>);
    impl Drop for Late {
        fn drop(&mut self) {
            let bus = &self.0;
            let id = bus.register(range(0x2000, 0x10), Arc::new(Plain)).unwrap();
            let read = bus.read(0x1000, Width::U8);
            let done = bus.unregister(id).unwrap().wait();
            self.1.lock().unwrap().push(format!("{} {read:?} {done:?}", bus.len()));
        }
    }
    thread_local! {
        static LATE: std::cell::RefCell<Option<Late>> = const { std::cell::RefCell::new(None) };
    }

    let bus = IoBus::<Mmio>::new();
    bus.register(range(0x1000, 0x10), Arc::new(Plain)).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    for before in [false, true] {
        let (bus, log) = (bus.clone(), log.clone());
        thread::spawn(move || {
            // Whether the bus's own thread-local state exists before `LATE`
            // decides which of the two is torn down first.
            if before {
                assert_eq!(bus.len(), 1);
            }
            LATE.with(|l| *l.borrow_mut() = Some(Late(bus.clone(), log)));
            if !before {
                assert_eq!(bus.len(), 1);
            }
        })
        .join()
        .expect("no panic in a thread-local destructor");
    }
    assert_eq!(*log.lock().unwrap(), ["1 Ok(1) Ok(())", "1 Ok(1) Ok(())"]);
}
