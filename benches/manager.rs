//! What the `DeviceManager` layer costs on top of the bus, in one run.
//!
//! Every subject routes the same 1024-address stream over 64 named devices
//! on the MMIO bus; one iteration is one pass over the stream:
//!
//! * `bus`: `VcpuHandle::read` on the manager's MMIO bus (the baseline);
//! * `vcpu_io`: `VcpuIo::handle_mmio_read`, the manager's per-vCPU path;
//! * `manager`: `DeviceManager::handle_mmio_read`, the handle-free path;
//! * `miss_error` / `miss_all_ones`: the same stream shifted so every access
//!   misses, under `MissPolicy::Error` and `MissPolicy::AllOnes`.
//!
//! The ratio `vcpu_io / bus` is the manager's overhead on the hot path.

#[path = "../tests/common/rng.rs"]
mod rng;
use rng::Rng;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vmio::{
    Access, Built, Device, DeviceConfig, DeviceError, DeviceKinds, DeviceManager, MissPolicy,
    Space, Width,
};

const DEVICES: u64 = 64;
const SLOT: u64 = 0x1000;
const BASE: u64 = 0x1_0000_0000;
const STREAM: usize = 1024;

struct Echo;

impl Device for Echo {
    fn read(&self, a: Access) -> Result<u64, DeviceError> {
        Ok(a.offset)
    }
    fn write(&self, _: Access, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
}

fn manager() -> DeviceManager {
    let mut kinds = DeviceKinds::empty();
    kinds.register("echo", &[], |_| Ok(Built::new(Space::Mmio, Arc::new(Echo))));
    let m = DeviceManager::builder().kinds(kinds).build_empty();
    let configs: Vec<DeviceConfig> = (0..DEVICES)
        .map(|i| DeviceConfig::new(format!("echo{i}"), "echo", BASE + i * SLOT, SLOT))
        .collect();
    m.add_all(&configs).expect("disjoint layout");
    m
}

fn stream(shift: u64) -> Vec<u64> {
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    (0..STREAM)
        .map(|_| {
            let rng = rng.next();
            shift + BASE + (rng >> 8) % DEVICES * SLOT + (rng >> 40) % (SLOT / 8) * 8
        })
        .collect()
}

fn layer(c: &mut Criterion) {
    let m = manager();
    let hits = stream(0);
    let misses = stream(DEVICES * SLOT);
    let mut g = c.benchmark_group("manager");
    g.throughput(Throughput::Elements(STREAM as u64));

    let mut bus = m.mmio().handle(0);
    g.bench_function("bus", |b| {
        b.iter(|| {
            for &a in &hits {
                black_box(bus.read(a, Width::U32).ok());
            }
        })
    });
    let mut io = m.vcpu(0);
    g.bench_function("vcpu_io", |b| {
        b.iter(|| {
            for &a in &hits {
                black_box(io.handle_mmio_read(a, Width::U32).ok());
            }
        })
    });
    g.bench_function("manager", |b| {
        b.iter(|| {
            for &a in &hits {
                black_box(m.handle_mmio_read(a, Width::U32).ok());
            }
        })
    });
    m.set_miss_policy(Space::Mmio, MissPolicy::Error);
    g.bench_function("miss_error", |b| {
        b.iter(|| {
            for &a in &misses {
                black_box(io.handle_mmio_read(a, Width::U32).ok());
            }
        })
    });
    m.set_miss_policy(Space::Mmio, MissPolicy::AllOnes);
    g.bench_function("miss_all_ones", |b| {
        b.iter(|| {
            for &a in &misses {
                black_box(io.handle_mmio_read(a, Width::U32).ok());
            }
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(900))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = layer
}
criterion_main!(benches);
