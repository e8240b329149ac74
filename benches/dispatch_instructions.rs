//! Instruction counts of the dispatch hot path under valgrind's callgrind:
//! deterministic, so a small regression shows even on a noisy machine where
//! `benches/dispatch.rs` drifts by tens of percent.
//!
//! Each benchmark dispatches [`ACCESSES`] reads; setup (building the bus,
//! the handle and the address list) is not counted. Run it with
//! `scripts/instructions check`, which installs the runner
//! (`.ci/install-gungraun-runner`), runs this bench and compares every
//! count with `benches/dispatch_instructions.baseline`.
//!
//! Without the runner or valgrind (a fresh machine), the bench prints why
//! and exits successfully, so `cargo bench` and `cargo test --all-targets`
//! pass everywhere; `scripts/instructions` installs both.

extern crate alloc;

#[path = "../tests/common/rng.rs"]
mod rng;
use rng::Rng;

use std::hint::black_box;
use std::sync::Arc;

use gungraun::{library_benchmark, library_benchmark_group};
use vmio::{Access, Device, DeviceError, Edit, IoBus, IoRange, Mmio, VcpuHandle, Width};

/// vmio's search, for the unsynchronized floor.
#[allow(dead_code, unused_imports)]
#[path = "../src/bus/search.rs"]
mod search;

const ACCESSES: usize = 1000;
const BASE: u64 = 0x1_0000_0000;
const STRIDE: u64 = 0x2000;
const SIZE: u64 = 0x1000;

struct Trivial;
impl Device for Trivial {
    fn read(&self, a: Access) -> Result<u64, DeviceError> {
        Ok(a.offset.wrapping_mul(0x9e37_79b9) ^ a.width.bytes())
    }
    fn write(&self, _: Access, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
}

fn bus(n: u64) -> IoBus<Mmio> {
    let bus = IoBus::new();
    bus.transaction((0..n).map(|i| Edit::Register {
        range: IoRange::new(BASE + i * STRIDE, SIZE).unwrap(),
        device: Arc::new(Trivial) as Arc<dyn Device>,
    }))
    .unwrap();
    bus
}

/// `ACCESSES` addresses: uniformly random devices, or 95 % on one when `hot`.
fn addrs(n: u64, hot: bool) -> Vec<u64> {
    let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
    let mut next = move || rng.next();
    (0..ACCESSES)
        .map(|_| {
            let dev = if hot && next() % 100 < 95 { n / 2 } else { next() % n };
            BASE + dev * STRIDE + (next() % (SIZE / 4)) * 4
        })
        .collect()
}

fn handle_setup(n: u64, hot: bool) -> (IoBus<Mmio>, VcpuHandle<Mmio>, Vec<u64>) {
    let bus = bus(n);
    let mut h = bus.handle(0);
    // One dispatch first, so lazily built state is not counted.
    black_box(h.read(BASE, Width::U32).unwrap());
    (bus, h, addrs(n, hot))
}

#[library_benchmark]
#[bench::n8(handle_setup(8, false))]
#[bench::n64(handle_setup(64, false))]
#[bench::n4096(handle_setup(4096, false))]
#[bench::hot_n4096(handle_setup(4096, true))]
fn vcpu_handle(mut input: (IoBus<Mmio>, VcpuHandle<Mmio>, Vec<u64>)) -> impl Sized {
    let (_, h, addrs) = &mut input;
    let mut sum = 0u64;
    for &a in addrs.iter() {
        sum = sum.wrapping_add(h.read(black_box(a), Width::U32).unwrap());
    }
    // Returned, so their drops happen outside the counted call.
    (input, sum)
}

fn std_setup(n: u64) -> (IoBus<Mmio>, Vec<u64>) {
    let bus = bus(n);
    black_box(bus.read(BASE, Width::U32).unwrap());
    (bus, addrs(n, false))
}

#[library_benchmark]
#[bench::n64(std_setup(64))]
fn std_path(input: (IoBus<Mmio>, Vec<u64>)) -> impl Sized {
    let (bus, addrs) = &input;
    let mut sum = 0u64;
    for &a in addrs {
        sum = sum.wrapping_add(bus.read(black_box(a), Width::U32).unwrap());
    }
    (input, sum)
}

/// Sorted starts, `(last, device)` beside each, and the addresses.
type FloorInput = (Vec<u64>, Vec<(u64, Arc<dyn Device>)>, Vec<u64>);

fn floor_setup(n: u64) -> FloorInput {
    let starts = (0..n).map(|i| BASE + i * STRIDE).collect();
    let slots = (0..n).map(|i| (BASE + i * STRIDE + SIZE - 1, Arc::new(Trivial) as _)).collect();
    (starts, slots, addrs(n, false))
}

// The unsynchronized floor: the same search and checks, no pinning.
#[library_benchmark]
#[bench::n64(floor_setup(64))]
#[bench::n4096(floor_setup(4096))]
fn floor(input: FloorInput) -> impl Sized {
    let (starts, slots, addrs) = &input;
    let mut sum = 0u64;
    for &a in addrs {
        let a = black_box(a);
        let i = search::last_start_at_or_below(starts, a).unwrap();
        let (last, dev) = &slots[i];
        assert!(a + 3 <= *last);
        let access = Access { offset: a - starts[i], addr: a, width: Width::U32, vcpu: Some(0) };
        sum = sum.wrapping_add(dev.read(access).unwrap() & Width::U32.mask());
    }
    (input, sum)
}

/// The naive design: the default crossbeam-epoch collector, a sorted
/// `Vec` of `(start, last, device)` and `slice::binary_search_by_key`.
type NaiveInput = (crossbeam_epoch::Atomic<Vec<(u64, u64, Arc<dyn Device>)>>, Vec<u64>);

fn naive_setup(n: u64) -> NaiveInput {
    let table = (0..n)
        .map(|i| (BASE + i * STRIDE, BASE + i * STRIDE + SIZE - 1, Arc::new(Trivial) as _))
        .collect();
    // One pin first, so the thread's lazily registered handle is not counted.
    drop(crossbeam_epoch::pin());
    (crossbeam_epoch::Atomic::new(table), addrs(n, false))
}

#[library_benchmark]
#[bench::n8(naive_setup(8))]
#[bench::n64(naive_setup(64))]
#[bench::n4096(naive_setup(4096))]
fn naive_epoch(input: NaiveInput) -> impl Sized {
    let (table, addrs) = &input;
    let mut sum = 0u64;
    for &a in addrs {
        let a = black_box(a);
        let guard = crossbeam_epoch::pin();
        // SAFETY: never null, and never retired in this benchmark.
        let t = unsafe { table.load(std::sync::atomic::Ordering::Acquire, &guard).deref() };
        let i = match t.binary_search_by_key(&a, |e| e.0) {
            Ok(i) => i,
            Err(i) => i.checked_sub(1).unwrap(),
        };
        let (start, last, dev) = &t[i];
        assert!(a + 3 <= *last);
        let access = Access { offset: a - start, addr: a, width: Width::U32, vcpu: Some(0) };
        sum = sum.wrapping_add(dev.read(access).unwrap() & Width::U32.mask());
    }
    (input, sum)
}

// One register and one unregister of a spare device (the writer side).
#[library_benchmark]
#[bench::n64(bus(64))]
#[bench::n4096(bus(4096))]
fn register_unregister(bus: IoBus<Mmio>) -> impl Sized {
    let range = IoRange::new(0x7000_0000_0000, SIZE).unwrap();
    let device = Arc::new(Trivial);
    let id = bus.register(black_box(range), device).unwrap();
    let unplug = bus.unregister(id).unwrap();
    (bus, unplug)
}

library_benchmark_group!(
    name = dispatch,
    benchmarks = [vcpu_handle, std_path, floor, naive_epoch, register_unregister]
);

/// gungraun's generated `main`, kept in a module so that ours can decide
/// first whether there is anything to run it with.
mod callgrind {
    use super::dispatch;
    use gungraun::main;

    main!(library_benchmark_groups = dispatch);

    pub(super) fn run() {
        main();
    }
}

/// Whether `program` is an executable file in `PATH`.
fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn main() {
    // Started by the runner (under valgrind): always run.
    let by_runner = std::env::args().nth(1).is_some_and(|a| a == "--gungraun-run");
    if !by_runner {
        // Where gungraun looks for its runner: a path fixed at build time,
        // else `PATH`.
        let runner = match option_env!("GUNGRAUN_RUNNER") {
            Some(path) => std::path::Path::new(path).is_file(),
            None => in_path("gungraun-runner"),
        };
        let missing: Vec<&str> = [("gungraun-runner", runner), ("valgrind", in_path("valgrind"))]
            .into_iter()
            .filter(|(_, found)| !found)
            .map(|(name, _)| name)
            .collect();
        if !missing.is_empty() {
            println!(
                "dispatch_instructions: skipped, {} not installed (scripts/instructions \
                 installs the runner; valgrind comes from the OS packages)",
                missing.join(" and ")
            );
            return;
        }
    }
    callgrind::run();
}
