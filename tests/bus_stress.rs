//! Readers dispatch continuously while a writer hot-plugs; every device checks
//! each call against its own ownership history.
//!
//! A logical clock ticks before and after every publish. A device's history
//! holds `(start, last, from, until)`: `from` is the tick before the publish
//! that gave it the range, `until` the tick after the publish that took it
//! away. A call is legal only if some history entry covers the access and
//! its window meets the window of the dispatch (clock read before the
//! dispatch ..= clock read inside the call).

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vmio::{
    Access, AccessError, Committed, Device, DeviceError, DeviceId, Edit, IoBus, IoRange, Mmio,
    Unplug, Width,
};

const SLOT: u64 = 0x100;
const SLOTS: u64 = 48;
/// Slots `0..MOVERS` always hold one of the movers: they only ever swap
/// places, in transactions, so those addresses are never unmapped.
const MOVERS: u64 = 6;
const BASE: u64 = 0x4000_0000;

static CLOCK: AtomicU64 = AtomicU64::new(0);
static VIOLATIONS: AtomicUsize = AtomicUsize::new(0);
static FIRST_VIOLATION: Mutex<Option<String>> = Mutex::new(None);

thread_local! {
    static DISPATCH_START: Cell<u64> = const { Cell::new(0) };
}

fn violation(msg: String) {
    if VIOLATIONS.fetch_add(1, SeqCst) == 0 {
        *FIRST_VIOLATION.lock().unwrap() = Some(msg);
    }
}

struct Record {
    start: u64,
    last: u64,
    from: u64,
    until: Option<u64>,
}

/// What the test keeps about a device; outlives the device itself.
#[derive(Default)]
struct Stats {
    history: Mutex<Vec<Record>>,
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    /// Set once the unplug completed: no call may start after this.
    retired: AtomicBool,
    dropped: AtomicBool,
}

struct Tracked {
    tag: u64,
    stats: Arc<Stats>,
}

impl Tracked {
    fn enter(&self, a: Access) {
        let s = &self.stats;
        s.in_flight.fetch_add(1, SeqCst);
        s.calls.fetch_add(1, SeqCst);
        if s.retired.load(SeqCst) {
            violation(format!("device {} called after its unplug completed", self.tag));
        }
        if s.dropped.load(SeqCst) {
            violation(format!("device {} called after it was dropped", self.tag));
        }
        let before = DISPATCH_START.with(Cell::get);
        let now = CLOCK.load(SeqCst);
        let start = a.addr - a.offset;
        let ok = s.history.lock().unwrap().iter().any(|r| {
            r.start == start
                && a.addr + (a.width.bytes() - 1) <= r.last
                && r.from <= now
                && r.until.is_none_or(|u| u >= before)
        });
        if !ok {
            violation(format!(
                "device {} reached at {:#x} (start {start:#x}) in clock window {before}..={now}",
                self.tag, a.addr
            ));
        }
    }

    fn leave(&self) {
        self.stats.in_flight.fetch_sub(1, SeqCst);
    }
}

impl Device for Tracked {
    fn read(&self, a: Access) -> Result<u64, DeviceError> {
        self.enter(a);
        self.leave();
        Ok(self.tag)
    }
    fn write(&self, a: Access, _: u64) -> Result<(), DeviceError> {
        self.enter(a);
        self.leave();
        Ok(())
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.stats.in_flight.load(SeqCst) != 0 {
            violation(format!("device {} dropped while a call was inside", self.tag));
        }
        self.stats.dropped.store(true, SeqCst);
    }
}

fn slot_range(slot: u64) -> IoRange<Mmio> {
    IoRange::new(BASE + slot * SLOT, SLOT).unwrap()
}

struct Live {
    id: DeviceId,
    slot: u64,
    stats: Arc<Stats>,
}

/// The writer's side: which slot holds which device, and histories kept
/// honest around each publish. It holds no reference to any device, so an
/// unplugged device is dropped by the bus alone.
struct Writer {
    bus: IoBus<Mmio>,
    slots: Vec<Option<usize>>,
    live: Vec<Option<Live>>,
    unplugged: Vec<(Arc<Stats>, Unplug)>,
    next_tag: u64,
    edits: u64,
}

impl Writer {
    fn free_slot(&self, rng: &mut Rng) -> Option<u64> {
        let free: Vec<u64> =
            (MOVERS..SLOTS).filter(|&s| self.slots[s as usize].is_none()).collect();
        (!free.is_empty()).then(|| free[rng.below(free.len() as u64) as usize])
    }

    /// Opens history entries for `adds`, publishes, closes entries for
    /// `removes`: `from` is read before the publish, `until` after it.
    fn publish(
        &mut self,
        edits: Vec<Edit<Mmio>>,
        adds: &[(&Arc<Stats>, u64)],
        removes: &[(&Arc<Stats>, u64)],
    ) -> Committed {
        let from = CLOCK.fetch_add(1, SeqCst);
        for (stats, slot) in adds {
            let r = slot_range(*slot);
            let rec = Record { start: r.start(), last: r.last(), from, until: None };
            stats.history.lock().unwrap().push(rec);
        }
        let committed = self.bus.transaction(edits).expect("the writer's plan is valid");
        let until = CLOCK.fetch_add(1, SeqCst) + 1;
        for (stats, slot) in removes {
            let start = slot_range(*slot).start();
            for r in stats.history.lock().unwrap().iter_mut() {
                if r.start == start && r.until.is_none() {
                    r.until = Some(until);
                }
            }
        }
        self.edits += 1;
        committed
    }

    fn register(&mut self, slot: u64) {
        self.next_tag += 1;
        let stats = Arc::new(Stats::default());
        let dev = Arc::new(Tracked { tag: self.next_tag, stats: stats.clone() });
        let edit = Edit::Register { range: slot_range(slot), device: dev };
        let c = self.publish(vec![edit], &[(&stats, slot)], &[]);
        self.slots[slot as usize] = Some(self.live.len());
        self.live.push(Some(Live { id: c.registered[0], slot, stats }));
    }

    fn live_at(&self, slot: u64) -> &Live {
        self.live[self.slots[slot as usize].unwrap()].as_ref().unwrap()
    }

    /// Swaps two movers through a parking slot in one transaction: their
    /// slots are never empty and never doubly owned.
    fn swap_movers(&mut self, a: u64, b: u64) {
        let Some(park) = (MOVERS..SLOTS).find(|&s| self.slots[s as usize].is_none()) else {
            return;
        };
        let (ida, sa) = (self.live_at(a).id, self.live_at(a).stats.clone());
        let (idb, sb) = (self.live_at(b).id, self.live_at(b).stats.clone());
        self.publish(
            vec![
                Edit::Remap { id: ida, range: slot_range(park) },
                Edit::Remap { id: idb, range: slot_range(a) },
                Edit::Remap { id: ida, range: slot_range(b) },
            ],
            &[(&sa, b), (&sb, a)],
            &[(&sa, a), (&sb, b)],
        );
        self.slots.swap(a as usize, b as usize);
        for slot in [a, b] {
            let idx = self.slots[slot as usize].unwrap();
            self.live[idx].as_mut().unwrap().slot = slot;
        }
    }

    fn unplug_one(&mut self, rng: &mut Rng) {
        let candidates: Vec<usize> =
            (MOVERS..SLOTS).filter_map(|s| self.slots[s as usize]).collect();
        if candidates.is_empty() {
            return;
        }
        let idx = candidates[rng.below(candidates.len() as u64) as usize];
        let live = self.live[idx].take().unwrap();
        let c = self.publish(vec![Edit::Unregister(live.id)], &[], &[(&live.stats, live.slot)]);
        self.slots[live.slot as usize] = None;
        if rng.below(2) == 0 {
            c.unplug.wait().expect("the writer is not inside a dispatch");
            retire(&live.stats);
        } else {
            self.unplugged.push((live.stats, c.unplug));
        }
    }

    fn move_one(&mut self, rng: &mut Rng) {
        let Some(to) = self.free_slot(rng) else { return };
        let Some(idx) = (MOVERS..SLOTS).find_map(|s| self.slots[s as usize]) else { return };
        let (id, from, stats) = {
            let l = self.live[idx].as_ref().unwrap();
            (l.id, l.slot, l.stats.clone())
        };
        self.publish(
            vec![Edit::Remap { id, range: slot_range(to) }],
            &[(&stats, to)],
            &[(&stats, from)],
        );
        self.slots[from as usize] = None;
        self.slots[to as usize] = Some(idx);
        self.live[idx].as_mut().unwrap().slot = to;
    }

    fn step(&mut self, rng: &mut Rng) {
        match rng.below(10) {
            0..=2 => {
                let (a, b) = (rng.below(MOVERS), rng.below(MOVERS));
                if a != b {
                    self.swap_movers(a, b);
                }
            }
            3..=5 => {
                if let Some(slot) = self.free_slot(rng) {
                    self.register(slot);
                }
            }
            6..=7 => self.unplug_one(rng),
            _ => self.move_one(rng),
        }
        self.unplugged.retain(|(stats, unplug)| {
            let done = unplug.poll();
            if done {
                retire(stats);
            }
            !done
        });
    }
}

/// The unplug is complete: nobody may be inside, nobody may come in, and
/// the bus has let go of the device.
fn retire(stats: &Stats) {
    if stats.in_flight.load(SeqCst) != 0 {
        violation("a call was still inside a device after its unplug completed".into());
    }
    stats.retired.store(true, SeqCst);
    if !stats.dropped.load(SeqCst) {
        violation("the bus still held a device after its unplug completed".into());
    }
}

#[test]
fn hotplug_under_concurrent_dispatch_never_misroutes() {
    let duration = Duration::from_millis(if cfg!(miri) { 50 } else { 1500 });
    let bus = IoBus::<Mmio>::new();
    let mut writer = Writer {
        bus: bus.clone(),
        slots: vec![None; SLOTS as usize],
        live: Vec::new(),
        unplugged: Vec::new(),
        next_tag: 0,
        edits: 0,
    };
    for slot in 0..MOVERS + 10 {
        writer.register(slot);
    }
    let stop = AtomicBool::new(false);
    let dispatches = AtomicU64::new(0);
    thread::scope(|s| {
        for vcpu in 0..3u32 {
            let (bus, stop, dispatches) = (&bus, &stop, &dispatches);
            s.spawn(move || {
                let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15 ^ u64::from(vcpu + 1));
                let mut h = bus.handle(vcpu);
                let mut n = 0u64;
                while !stop.load(SeqCst) {
                    let slot = rng.below(SLOTS + 2); // a little past the end too
                    let width =
                        [Width::U8, Width::U16, Width::U32, Width::U64][rng.below(4) as usize];
                    let addr = BASE + slot * SLOT + rng.below(SLOT - 7);
                    DISPATCH_START.with(|c| c.set(CLOCK.load(SeqCst)));
                    let r = if rng.below(2) == 0 {
                        h.read(addr, width).map(drop)
                    } else {
                        h.write(addr, width, n)
                    };
                    match r {
                        Ok(()) => {}
                        Err(AccessError::Unmapped { .. }) if slot >= MOVERS => {}
                        Err(e) => violation(format!("vCPU {vcpu}: {e} at {addr:#x}")),
                    }
                    n += 1;
                }
                dispatches.fetch_add(n, SeqCst);
            });
        }
        let mut rng = Rng::new(42);
        let start = Instant::now();
        while start.elapsed() < duration {
            writer.step(&mut rng);
            // Every snapshot holds each mover exactly once.
            let snapshot = bus.devices();
            for slot in 0..MOVERS {
                let start = slot_range(slot).start();
                if snapshot.iter().filter(|(_, r)| r.start() == start).count() != 1 {
                    violation(format!("mover slot {slot} not owned exactly once"));
                }
            }
        }
        stop.store(true, SeqCst);
    });
    // Everything still pending completes once the readers are gone.
    for (stats, unplug) in writer.unplugged.drain(..) {
        unplug.wait().unwrap();
        retire(&stats);
    }
    let first = FIRST_VIOLATION.lock().unwrap().take();
    assert_eq!(VIOLATIONS.load(SeqCst), 0, "first violation: {first:?}");
    let calls: usize = writer.live.iter().flatten().map(|l| l.stats.calls.load(SeqCst)).sum();
    assert!(calls > 0, "readers reached live devices");
    assert!(writer.edits > 10, "the writer published {} times", writer.edits);
    assert!(dispatches.load(SeqCst) > 1000);
}
