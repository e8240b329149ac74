//! Dispatch throughput: vmio against an unsynchronized floor and the patterns
//! other VMMs use, all in one run.
//!
//! Every subject routes the same address streams to the same trivial devices
//! (a read answers a value derived from the offset and the width), so the
//! ratios between them are the cost of each synchronization scheme:
//!
//! * `floor`: a frozen sorted array searched with no synchronization at all,
//!   using vmio's own search code (what a VMM without hot-plug could do);
//! * `vmio`: through a `VcpuHandle`; `vmio_std`: through `IoBus::read`;
//! * `rwlock_btree`: `RwLock<BTreeMap>` of `Weak` devices upgraded per access
//!   (Cloud Hypervisor's pattern);
//! * `mutex_btree`: `Mutex<BTreeMap>` with an `Arc` clone per access (crosvm's);
//! * `vm_device`: rust-vmm's `IoManager` behind an `RwLock` so it can hot-plug;
//! * `linear_vec`: a linear scan over a `Vec` (axdevice 0.2's), behind an
//!   `RwLock` for the same reason;
//! * `arc_swap`: an `ArcSwap` over a sorted array (Dragonball's);
//! * `naive_epoch`: the obvious crossbeam-epoch design — the default
//!   collector's `pin()`, an `Atomic` sorted `Vec` of `(start, last,
//!   device)` and `slice::binary_search_by_key` — which vmio's handle path
//!   must beat.
//!
//! Groups are named `{pattern}-{threads}t[-writer]`; each benchmark id is
//! `{subject}/{n}` and one iteration is 1024 accesses
//! (split across the threads, so times are aggregate); successive iterations
//! walk through a 64 Ki-address stream. `-writer` groups run a
//! hot-plug thread at 10,000 edits/s beside the readers. The `writer` group
//! times single edits and a 100-edit batch.
//!
//! `scripts/perf-table` turns the results into the README's table.

extern crate alloc;

#[path = "../tests/common/rng.rs"]
mod rng;
use rng::Rng;

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex, RwLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vm_device::bus::{MmioAddress, MmioAddressOffset, MmioRange};
use vm_device::device_manager::{IoManager, MmioManager};
use vmio::{Access, Device, DeviceError, DeviceId, Edit, IoBus, IoRange, Mmio, Width};

/// vmio's search, compiled into the floor so the floor differs from vmio
/// only by synchronization.
#[allow(dead_code, unused_imports)]
#[path = "../src/bus/search.rs"]
mod search;

const BASE: u64 = 0x1_0000_0000;
const STRIDE: u64 = 0x2000;
const SIZE: u64 = 0x1000;
/// Spare devices plugged and unplugged by writers live far above the stream.
const SPARE_BASE: u64 = 0x7000_0000_0000;
/// Accesses per iteration.
const WINDOW: usize = 1024;
/// Windows per stream: 64 Ki addresses, far more than a branch predictor can
/// learn, so a branchy search pays for its mispredictions as it would on an
/// unpredictable guest.
const WINDOWS: usize = 64;
const WIDTH: Width = Width::U32;
const EDITS_PER_SEC: u64 = 10_000;

fn start_of(i: u64) -> u64 {
    BASE + i * STRIDE
}

/// The trivial device every subject dispatches to.
struct Trivial;

fn answer(offset: u64, bytes: u64) -> u64 {
    offset.wrapping_mul(0x9e37_79b9) ^ bytes
}

impl Device for Trivial {
    fn read(&self, a: Access) -> Result<u64, DeviceError> {
        Ok(answer(a.offset, a.width.bytes()))
    }
    fn write(&self, _: Access, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
}

impl vm_device::DeviceMmio for Trivial {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let v = answer(offset, data.len() as u64).to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&v[..n]);
    }
    fn mmio_write(&self, _: MmioAddress, _: MmioAddressOffset, _: &[u8]) {}
}

#[derive(Clone, Copy)]
enum Pattern {
    /// Every access picks a device uniformly at random.
    Uniform,
    /// 95 % of accesses go to one device, the rest uniformly.
    Hot,
    /// Devices in address order, one access each, wrapping around.
    Sequential,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Uniform => "uniform",
            Pattern::Hot => "hot",
            Pattern::Sequential => "sequential",
        }
    }

    fn stream(self, n: u64, seed: u64) -> Vec<u64> {
        let mut rng = Rng::new(0x2545_f491_4f6c_dd1d ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let hot = n / 2;
        (0..(WINDOW * WINDOWS) as u64)
            .map(|k| {
                let dev = match self {
                    Pattern::Uniform => rng.below(n),
                    Pattern::Hot if rng.below(100) < 95 => hot,
                    Pattern::Hot => rng.below(n),
                    Pattern::Sequential => (k + seed) % n,
                };
                start_of(dev) + rng.below(SIZE / 4) * 4
            })
            .collect()
    }
}

/// Calls `f` on the addresses of `reps` consecutive windows of `stream`.
#[inline(always)]
fn each(stream: &[u64], reps: u64, mut f: impl FnMut(u64)) {
    for r in 0..reps as usize {
        let w = (r % WINDOWS) * WINDOW;
        for &a in &stream[w..w + WINDOW] {
            f(black_box(a));
        }
    }
}

/// The one reader loop every subject runs: `lookup` dispatches an address
/// (0 on a miss) and the results are summed, so nothing is optimized out.
/// Generic, so each subject's lookup is inlined into its own copy of the loop.
#[inline(always)]
fn sweep(stream: &[u64], reps: u64, mut lookup: impl FnMut(u64) -> u64) -> u64 {
    let mut sum = 0u64;
    each(stream, reps, |a| sum = sum.wrapping_add(lookup(a)));
    sum
}

/// One dispatch implementation under test.
trait Subject: Sync {
    /// Dispatches every address of `stream`, `reps` times, from the calling
    /// thread as vCPU `vcpu` (through [`sweep`]); returns its checksum.
    fn run(&self, vcpu: u32, stream: &[u64], reps: u64) -> u64;
    /// Plugs spares at every start in one critical section or publish;
    /// returns what `unplug_batch` needs.
    fn plug_batch(&self, starts: &[u64]) -> Vec<u64>;
    /// Unplugs a batch.
    fn unplug_batch(&self, tokens: &[u64]);
    /// Plugs a spare device at `start`; returns what `unplug` needs.
    fn plug(&self, start: u64) -> u64 {
        self.plug_batch(&[start])[0]
    }
    /// Unplugs what `plug` returned.
    fn unplug(&self, token: u64) {
        self.unplug_batch(&[token]);
    }
}

/// `empty` with the `n` bench devices plugged in one batch.
fn populated<S: Subject>(empty: S, n: u64) -> S {
    empty.plug_batch(&(0..n).map(start_of).collect::<Vec<_>>());
    empty
}

fn new_device() -> Arc<Trivial> {
    Arc::new(Trivial)
}

/// The bounds check every hand-written subject does, as vmio and vm-device do.
#[inline(always)]
fn fits(addr: u64, last: u64) -> bool {
    matches!(addr.checked_add(WIDTH.bytes() - 1), Some(end) if end <= last)
}

/// Calls the device the way a bus does; the value masked to the width.
#[inline(always)]
fn call(dev: &dyn Device, start: u64, addr: u64, vcpu: u32) -> u64 {
    let access = Access { offset: addr - start, addr, width: WIDTH, vcpu: Some(vcpu) };
    dev.read(access).unwrap_or(0) & WIDTH.mask()
}

/// `start -> (last, device)`, the map the lock-based peers keep.
type Map<D> = BTreeMap<u64, (u64, D)>;
/// `(start, last, device)` in a flat list.
type Entries = Vec<(u64, u64, Arc<dyn Device>)>;

// ---------------------------------------------------------------- floor

struct Floor {
    starts: Vec<u64>,
    slots: Vec<(u64, Arc<dyn Device>)>,
}

impl Floor {
    fn new(n: u64) -> Self {
        Floor {
            starts: (0..n).map(start_of).collect(),
            slots: (0..n)
                .map(|i| (start_of(i) + SIZE - 1, new_device() as Arc<dyn Device>))
                .collect(),
        }
    }

    #[inline(always)]
    fn read(&self, addr: u64, vcpu: u32) -> u64 {
        let Some(i) = search::last_start_at_or_below(&self.starts, addr) else { return 0 };
        let (last, dev) = &self.slots[i];
        if !fits(addr, *last) {
            return 0;
        }
        call(&**dev, self.starts[i], addr, vcpu)
    }
}

impl Subject for Floor {
    fn run(&self, vcpu: u32, stream: &[u64], reps: u64) -> u64 {
        sweep(stream, reps, |a| self.read(a, vcpu))
    }
    fn plug(&self, _: u64) -> u64 {
        unreachable!("the floor is frozen")
    }
    fn unplug(&self, _: u64) {
        unreachable!("the floor is frozen")
    }
    fn plug_batch(&self, _: &[u64]) -> Vec<u64> {
        unreachable!("the floor is frozen")
    }
    fn unplug_batch(&self, _: &[u64]) {
        unreachable!("the floor is frozen")
    }
}

// ---------------------------------------------------------------- vmio

struct Vmio {
    bus: IoBus<Mmio>,
    /// Dispatch through `IoBus::read` instead of a `VcpuHandle`.
    std_path: bool,
}

impl Vmio {
    fn new(n: u64, std_path: bool) -> Self {
        let bus = IoBus::new();
        let edits = (0..n).map(|i| Edit::Register {
            range: IoRange::new(start_of(i), SIZE).unwrap(),
            device: new_device() as Arc<dyn Device>,
        });
        bus.transaction(edits).unwrap();
        Vmio { bus, std_path }
    }
}

impl Subject for Vmio {
    fn run(&self, vcpu: u32, stream: &[u64], reps: u64) -> u64 {
        if self.std_path {
            sweep(stream, reps, |a| self.bus.read(a, WIDTH).unwrap_or(0))
        } else {
            let mut h = self.bus.handle(vcpu);
            sweep(stream, reps, |a| h.read(a, WIDTH).unwrap_or(0))
        }
    }
    fn plug(&self, start: u64) -> u64 {
        self.bus.register(IoRange::new(start, SIZE).unwrap(), new_device()).unwrap().get()
    }
    fn unplug(&self, token: u64) {
        drop(self.bus.unregister(DeviceId::from_raw(token)).unwrap());
    }
    fn plug_batch(&self, starts: &[u64]) -> Vec<u64> {
        let g = self.bus.generation();
        let c = self
            .bus
            .transaction(starts.iter().map(|&s| Edit::Register {
                range: IoRange::new(s, SIZE).unwrap(),
                device: new_device() as Arc<dyn Device>,
            }))
            .unwrap();
        debug_assert_eq!(self.bus.generation(), g + 1, "a transaction publishes once");
        c.registered.iter().map(|id| id.get()).collect()
    }
    fn unplug_batch(&self, tokens: &[u64]) {
        let edits = tokens.iter().map(|&t| Edit::Unregister(DeviceId::from_raw(t)));
        drop(self.bus.transaction(edits).unwrap());
    }
}

// ------------------------------------------------- RwLock + BTreeMap + Weak

/// Cloud Hypervisor's shape: the map holds `Weak`s, each access upgrades.
struct RwLockBTree {
    map: RwLock<Map<Weak<dyn Device>>>,
    /// The owners of the devices (the VMM's device list).
    owners: Mutex<BTreeMap<u64, Arc<dyn Device>>>,
}

impl RwLockBTree {
    fn new(n: u64) -> Self {
        populated(RwLockBTree { map: RwLock::default(), owners: Mutex::default() }, n)
    }
}

impl Subject for RwLockBTree {
    fn run(&self, vcpu: u32, stream: &[u64], reps: u64) -> u64 {
        sweep(stream, reps, |a| {
            let found = {
                let map = self.map.read().unwrap();
                map.range(..=a).next_back().and_then(|(&start, (last, weak))| {
                    fits(a, *last).then(|| weak.upgrade().map(|d| (start, d))).flatten()
                })
            };
            if let Some((start, dev)) = found { call(&*dev, start, a, vcpu) } else { 0 }
        })
    }
    fn plug_batch(&self, starts: &[u64]) -> Vec<u64> {
        let devs: Vec<Arc<dyn Device>> = starts.iter().map(|_| new_device() as _).collect();
        let mut map = self.map.write().unwrap();
        for (&s, d) in starts.iter().zip(&devs) {
            map.insert(s, (s + SIZE - 1, Arc::downgrade(d)));
        }
        drop(map);
        self.owners.lock().unwrap().extend(starts.iter().copied().zip(devs));
        starts.to_vec()
    }
    fn unplug_batch(&self, tokens: &[u64]) {
        let mut map = self.map.write().unwrap();
        for t in tokens {
            map.remove(t);
        }
        drop(map);
        let mut owners = self.owners.lock().unwrap();
        for t in tokens {
            owners.remove(t);
        }
    }
}

// ------------------------------------------------- Mutex + BTreeMap + Arc

/// crosvm's shape: the device `Arc` is cloned under the lock, called after.
struct MutexBTree {
    map: Mutex<Map<Arc<dyn Device>>>,
}

impl MutexBTree {
    fn new(n: u64) -> Self {
        populated(MutexBTree { map: Mutex::default() }, n)
    }
}

impl Subject for MutexBTree {
    fn run(&self, vcpu: u32, stream: &[u64], reps: u64) -> u64 {
        sweep(stream, reps, |a| {
            let found = {
                let map = self.map.lock().unwrap();
                map.range(..=a)
                    .next_back()
                    .and_then(|(&start, (last, d))| fits(a, *last).then(|| (start, d.clone())))
            };
            if let Some((start, dev)) = found { call(&*dev, start, a, vcpu) } else { 0 }
        })
    }
    fn plug_batch(&self, starts: &[u64]) -> Vec<u64> {
        let devs: Vec<Arc<dyn Device>> = starts.iter().map(|_| new_device() as _).collect();
        let mut map = self.map.lock().unwrap();
        for (&s, d) in starts.iter().zip(devs) {
            map.insert(s, (s + SIZE - 1, d));
        }
        starts.to_vec()
    }
    fn unplug_batch(&self, tokens: &[u64]) {
        let removed: Vec<_> = {
            let mut map = self.map.lock().unwrap();
            tokens.iter().filter_map(|t| map.remove(t)).collect()
        };
        drop(removed);
    }
}

// ------------------------------------------------- rust-vmm vm-device

/// rust-vmm's `IoManager` needs `&mut` to register, so hot-plug puts it
/// behind an `RwLock`.
struct VmDevice {
    mgr: RwLock<IoManager>,
}

impl VmDevice {
    fn new(n: u64) -> Self {
        populated(VmDevice { mgr: RwLock::new(IoManager::new()) }, n)
    }
}

impl Subject for VmDevice {
    fn run(&self, _vcpu: u32, stream: &[u64], reps: u64) -> u64 {
        sweep(stream, reps, |a| {
            let mut data = [0u8; 4];
            let ok = self.mgr.read().unwrap().mmio_read(MmioAddress(a), &mut data);
            if ok.is_ok() { u64::from(u32::from_le_bytes(data)) } else { 0 }
        })
    }
    fn plug_batch(&self, starts: &[u64]) -> Vec<u64> {
        let devs: Vec<Arc<dyn vm_device::DeviceMmio + Send + Sync>> =
            starts.iter().map(|_| new_device() as _).collect();
        let mut mgr = self.mgr.write().unwrap();
        for (&s, d) in starts.iter().zip(devs) {
            mgr.register_mmio(MmioRange::new(MmioAddress(s), SIZE).unwrap(), d).unwrap();
        }
        starts.to_vec()
    }
    fn unplug_batch(&self, tokens: &[u64]) {
        let removed: Vec<_> = {
            let mut mgr = self.mgr.write().unwrap();
            tokens.iter().filter_map(|&t| mgr.deregister_mmio(MmioAddress(t))).collect()
        };
        drop(removed);
    }
}

// ------------------------------------------------- linear scan over a Vec

/// axdevice 0.2's shape: scan every device's range in order.
struct LinearVec {
    devs: RwLock<Entries>,
}

impl LinearVec {
    fn new(n: u64) -> Self {
        populated(LinearVec { devs: RwLock::default() }, n)
    }
}

impl Subject for LinearVec {
    fn run(&self, vcpu: u32, stream: &[u64], reps: u64) -> u64 {
        sweep(stream, reps, |a| {
            let devs = self.devs.read().unwrap();
            if let Some((start, last, dev)) =
                devs.iter().find(|(start, last, _)| *start <= a && a <= *last)
                && fits(a, *last)
            {
                call(&**dev, *start, a, vcpu)
            } else {
                0
            }
        })
    }
    fn plug_batch(&self, starts: &[u64]) -> Vec<u64> {
        let mut devs = self.devs.write().unwrap();
        devs.extend(starts.iter().map(|&s| (s, s + SIZE - 1, new_device() as Arc<dyn Device>)));
        starts.to_vec()
    }
    fn unplug_batch(&self, tokens: &[u64]) {
        let mut devs = self.devs.write().unwrap();
        devs.retain(|(s, _, _)| !tokens.contains(s));
    }
}

// ------------------------------------------------- arc-swap over a sorted array

/// Dragonball's shape: readers `load` the current sorted array, writers
/// clone, edit and `store`.
struct ArcSwapEntries {
    table: ArcSwap<Entries>,
    writer: Mutex<()>,
}

impl ArcSwapEntries {
    fn new(n: u64) -> Self {
        populated(
            ArcSwapEntries { table: ArcSwap::from_pointee(Vec::new()), writer: Mutex::new(()) },
            n,
        )
    }
}

impl Subject for ArcSwapEntries {
    fn run(&self, vcpu: u32, stream: &[u64], reps: u64) -> u64 {
        sweep(stream, reps, |a| {
            let t = self.table.load();
            let i = t.partition_point(|(s, _, _)| *s <= a);
            if let Some((start, last, dev)) = i.checked_sub(1).map(|i| &t[i])
                && fits(a, *last)
            {
                call(&**dev, *start, a, vcpu)
            } else {
                0
            }
        })
    }
    fn plug_batch(&self, starts: &[u64]) -> Vec<u64> {
        let _w = self.writer.lock().unwrap();
        let mut next: Entries = (**self.table.load()).clone();
        for &s in starts {
            let pos = next.partition_point(|(x, _, _)| *x < s);
            next.insert(pos, (s, s + SIZE - 1, new_device() as Arc<dyn Device>));
        }
        self.table.store(Arc::new(next));
        starts.to_vec()
    }
    fn unplug_batch(&self, tokens: &[u64]) {
        let _w = self.writer.lock().unwrap();
        let mut next: Entries = (**self.table.load()).clone();
        next.retain(|(s, _, _)| !tokens.contains(s));
        self.table.store(Arc::new(next));
    }
}

// ------------------------------------------------- naive crossbeam-epoch

/// The obvious epoch design: default collector, one sorted array of
/// entries, the standard library's binary search.
struct NaiveEpoch {
    table: crossbeam_epoch::Atomic<Entries>,
    writer: Mutex<()>,
}

impl NaiveEpoch {
    fn new(n: u64) -> Self {
        let empty =
            NaiveEpoch { table: crossbeam_epoch::Atomic::new(Vec::new()), writer: Mutex::new(()) };
        populated(empty, n)
    }

    /// Copies the table, lets `edit` change the copy, publishes it and
    /// retires the old one.
    fn edit(&self, edit: impl FnOnce(&mut Entries)) {
        let _w = self.writer.lock().unwrap();
        let guard = crossbeam_epoch::pin();
        // SAFETY: never null; only writers retire it, and we are the writer.
        let mut next: Entries =
            unsafe { self.table.load(Ordering::Acquire, &guard).deref() }.clone();
        edit(&mut next);
        let old = self.table.swap(crossbeam_epoch::Owned::new(next), Ordering::AcqRel, &guard);
        // SAFETY: unlinked by the swap; freed after every pinned reader left.
        unsafe { guard.defer_destroy(old) };
        guard.flush();
    }
}

impl Subject for NaiveEpoch {
    fn run(&self, vcpu: u32, stream: &[u64], reps: u64) -> u64 {
        sweep(stream, reps, |a| {
            let guard = crossbeam_epoch::pin();
            // SAFETY: never null; retired tables are freed only after this
            // guard is dropped.
            let t = unsafe { self.table.load(Ordering::Acquire, &guard).deref() };
            let i = match t.binary_search_by_key(&a, |e| e.0) {
                Ok(i) => Some(i),
                Err(i) => i.checked_sub(1),
            };
            if let Some((start, last, dev)) = i.map(|i| &t[i])
                && fits(a, *last)
            {
                call(&**dev, *start, a, vcpu)
            } else {
                0
            }
        })
    }
    fn plug_batch(&self, starts: &[u64]) -> Vec<u64> {
        self.edit(|next| {
            for &s in starts {
                let pos = next.partition_point(|(x, _, _)| *x < s);
                next.insert(pos, (s, s + SIZE - 1, new_device() as Arc<dyn Device>));
            }
        });
        starts.to_vec()
    }
    fn unplug_batch(&self, tokens: &[u64]) {
        self.edit(|next| next.retain(|(s, _, _)| !tokens.contains(s)));
    }
}

impl Drop for NaiveEpoch {
    fn drop(&mut self) {
        // SAFETY: exclusive access; no reader is left.
        drop(unsafe {
            self.table.load(Ordering::Relaxed, crossbeam_epoch::unprotected()).into_owned()
        });
    }
}

// ---------------------------------------------------------------- harness

const SIZES: [u64; 5] = [1, 8, 64, 512, 4096];
const SUBJECTS: [&str; 9] = [
    "floor",
    "vmio",
    "vmio_std",
    "rwlock_btree",
    "mutex_btree",
    "vm_device",
    "linear_vec",
    "arc_swap",
    "naive_epoch",
];

fn build(name: &str, n: u64) -> Box<dyn Subject> {
    match name {
        "floor" => Box::new(Floor::new(n)),
        "vmio" => Box::new(Vmio::new(n, false)),
        "vmio_std" => Box::new(Vmio::new(n, true)),
        "rwlock_btree" => Box::new(RwLockBTree::new(n)),
        "mutex_btree" => Box::new(MutexBTree::new(n)),
        "vm_device" => Box::new(VmDevice::new(n)),
        "linear_vec" => Box::new(LinearVec::new(n)),
        "arc_swap" => Box::new(ArcSwapEntries::new(n)),
        "naive_epoch" => Box::new(NaiveEpoch::new(n)),
        other => unreachable!("unknown subject {other}"),
    }
}

/// Toggles a spare device at `EDITS_PER_SEC` until `stop`: each edit is a
/// register or an unregister. Paced against the clock with catch-up, so the
/// average rate holds even though sleeps overshoot.
fn hot_plug_writer(subject: &dyn Subject, stop: &AtomicBool) {
    let t0 = Instant::now();
    let mut done = 0u64;
    let mut plugged = None;
    // Relaxed: the flag carries no data, only "time to stop".
    while !stop.load(Ordering::Relaxed) {
        let due = t0.elapsed().as_nanos() as u64 * EDITS_PER_SEC / 1_000_000_000;
        while done < due {
            plugged = match plugged.take() {
                None => Some(subject.plug(SPARE_BASE)),
                Some(t) => {
                    subject.unplug(t);
                    None
                }
            };
            done += 1;
        }
        thread::sleep(Duration::from_micros(1_000_000 / EDITS_PER_SEC));
    }
    if let Some(t) = plugged {
        subject.unplug(t);
    }
}

/// Runs `iters` passes over the streams split across `streams.len()` reader
/// threads, with a hot-plug writer beside them when `writer`; returns the
/// wall time of the readers.
fn timed(subject: &dyn Subject, streams: &[Vec<u64>], iters: u64, writer: bool) -> Duration {
    let threads = streams.len() as u64;
    if threads == 1 && !writer {
        let t0 = Instant::now();
        black_box(subject.run(0, &streams[0], iters));
        return t0.elapsed();
    }
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(threads as usize + 1);
    thread::scope(|s| {
        let w = writer.then(|| s.spawn(|| hot_plug_writer(subject, &stop)));
        let readers: Vec<_> = streams
            .iter()
            .enumerate()
            .map(|(k, stream)| {
                let reps = iters / threads + u64::from((k as u64) < iters % threads);
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let t0 = Instant::now();
                    black_box(subject.run(k as u32, stream, reps));
                    (t0, Instant::now())
                })
            })
            .collect();
        barrier.wait();
        // Each reader times itself: the main thread may be descheduled
        // between the barrier and its own clock read.
        let spans: Vec<(Instant, Instant)> =
            readers.into_iter().map(|r| r.join().unwrap()).collect();
        let start = spans.iter().map(|s| s.0).min().expect("at least one reader");
        let end = spans.iter().map(|s| s.1).max().expect("at least one reader");
        let elapsed = end - start;
        // Relaxed: see `hot_plug_writer`.
        stop.store(true, Ordering::Relaxed);
        if let Some(w) = w {
            w.join().unwrap();
        }
        elapsed
    })
}

fn threads_per_core() -> usize {
    thread::available_parallelism().map_or(2, |n| n.get())
}

fn dispatch(c: &mut Criterion) {
    let cores = threads_per_core();
    let mut runs = vec![];
    for pattern in [Pattern::Uniform, Pattern::Hot, Pattern::Sequential] {
        for threads in [1, cores] {
            runs.push((pattern, threads, false));
        }
    }
    for threads in [1, cores] {
        runs.push((Pattern::Uniform, threads, true));
    }
    for (pattern, threads, writer) in runs {
        let name = format!("{}-{threads}t{}", pattern.name(), if writer { "-writer" } else { "" });
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Elements(WINDOW as u64));
        for n in SIZES {
            let streams: Vec<Vec<u64>> =
                (0..threads as u64).map(|k| pattern.stream(n, k)).collect();
            for subject in SUBJECTS {
                if writer && subject == "floor" {
                    continue;
                }
                // Built on first use, so a filtered run skips the setup.
                let s = OnceCell::new();
                g.bench_with_input(BenchmarkId::new(subject, n), &streams, |b, streams| {
                    let s = s.get_or_init(|| build(subject, n));
                    b.iter_custom(|iters| timed(&**s, streams, iters, writer))
                });
            }
        }
        g.finish();
    }
}

fn writer(c: &mut Criterion) {
    let mut g = c.benchmark_group("writer");
    for n in [64, 4096] {
        for subject in &SUBJECTS[1..] {
            if *subject == "vmio_std" {
                continue;
            }
            let s = OnceCell::new();
            let s = || -> &dyn Subject { &**s.get_or_init(|| build(subject, n)) };
            g.bench_function(BenchmarkId::new(format!("{subject}/register"), n), |b| {
                b.iter_custom(|iters| {
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        let t0 = Instant::now();
                        let tok = s().plug(SPARE_BASE);
                        t += t0.elapsed();
                        s().unplug(tok);
                    }
                    t
                })
            });
            g.bench_function(BenchmarkId::new(format!("{subject}/unregister"), n), |b| {
                b.iter_custom(|iters| {
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        let tok = s().plug(SPARE_BASE);
                        let t0 = Instant::now();
                        s().unplug(tok);
                        t += t0.elapsed();
                    }
                    t
                })
            });
            let batch: Vec<u64> = (0..100).map(|i| SPARE_BASE + i * STRIDE).collect();
            g.bench_function(BenchmarkId::new(format!("{subject}/batch100"), n), |b| {
                b.iter_custom(|iters| {
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        let t0 = Instant::now();
                        let toks = s().plug_batch(&batch);
                        t += t0.elapsed();
                        s().unplug_batch(&toks);
                    }
                    t
                })
            });
        }
    }
    g.finish();
}

/// Checks, once per run and outside any timing, what the numbers rely on:
/// every subject answers the same stream with the same checksum, and a
/// 100-edit vmio transaction publishes exactly once.
fn sanity(_: &mut Criterion) {
    let stream = Pattern::Uniform.stream(64, 7);
    let want = build("floor", 64).run(0, &stream, 1);
    for subject in SUBJECTS {
        assert_eq!(
            build(subject, 64).run(0, &stream, 1),
            want,
            "{subject} disagrees with the floor"
        );
    }
    let v = Vmio::new(4096, false);
    let g = v.bus.generation();
    let toks = v.plug_batch(&(0..100).map(|i| SPARE_BASE + i * STRIDE).collect::<Vec<_>>());
    assert_eq!(v.bus.generation(), g + 1, "a 100-edit transaction publishes exactly once");
    v.unplug_batch(&toks);
}

fn config() -> Criterion {
    // Short windows keep the full run (about 330 benchmarks) near ten
    // minutes on two cores; command-line flags still override these.
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(900))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = sanity, dispatch, writer
}
criterion_main!(benches);
