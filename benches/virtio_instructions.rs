//! Instruction counts of the virtio-blk request path under valgrind's
//! callgrind: deterministic, so an extra copy of a chain or a buffer, a
//! second `used.idx` publish, or any other added work per request shows up
//! on a noisy machine where `benches/virtio_blk.rs` drifts.
//!
//! Each benchmark is one `VirtioDevice::serve` of a queue holding `n`
//! 4 KiB requests at distinct sectors (a header descriptor, one data
//! descriptor, a status byte: the layout Linux uses), the device a
//! `VirtioBlk<RamDisk>` driven directly, without transport or bus (those are
//! `benches/dispatch_instructions.rs`'s). Setup — building the device,
//! activating it, making the requests available — is not counted.
//! `empty` serves a queue with nothing in it: the cost of a spurious notify
//! (notifications off, a look, notifications on with the re-check).
//!
//! Run it with `scripts/instructions check`, which compares every count with
//! `benches/virtio_instructions.baseline`.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use gungraun::{library_benchmark, library_benchmark_group, main};
use vmio::GuestRam;
use vmio::testing::{BlkRequest, Buf, GuestAlloc, GuestQueue};
use vmio::virtio::blk::{BlkConfig, BlockBackend, RamDisk, RequestType, VirtioBlk};
use vmio::virtio::spec::features::{VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1};
use vmio::virtio::{Activation, Interrupt, InterruptCause, QueueStop, SplitQueue, VirtioDevice};

const RAM_BASE: u64 = 0x8000_0000;
const RAM_SIZE: u64 = 4 << 20;
const QSIZE: u16 = 128;
const BLOCK: u32 = 4096;

/// An interrupt that only counts: what a VMM's irqfd write costs is not
/// the device's.
#[derive(Default)]
struct Counting(AtomicU64);
impl Interrupt for Counting {
    fn raise(&self, _: InterruptCause) {
        // Relaxed: a statistic.
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything a serve needs, kept alive outside the counted call.
struct Setup {
    blk: VirtioBlk<RamDisk>,
    _ram: Arc<GuestRam>,
    _irq: Arc<Counting>,
    _queue: GuestQueue,
}

/// A device with `n` requests of `kind` available on queue 0, served once
/// before (an empty serve) so lazily built state is not counted.
fn setup(kind: RequestType, n: u16, features: u64) -> Setup {
    let disk = RamDisk::new(1 << 20);
    // Every chunk written once: reads copy real pages, writes fault nothing.
    disk.write_at(0, &vec![0x5a; 1 << 20]).unwrap();
    let blk = VirtioBlk::new(disk, BlkConfig::default()).unwrap();
    let ram = Arc::new(GuestRam::new(RAM_BASE, RAM_SIZE).unwrap());
    let irq = Arc::new(Counting::default());
    let mut queue = GuestQueue::new(QSIZE, RAM_BASE);
    queue.init(&*ram).unwrap();
    let split = SplitQueue::new(queue.config(), features, &*ram).unwrap();
    blk.activate(Activation {
        queues: vec![Some(split)],
        memory: ram.clone(),
        interrupt: irq.clone(),
        features,
    })
    .unwrap();
    blk.serve(0, &QueueStop::new());
    let mut alloc = GuestAlloc::new(RAM_BASE + (1 << 20), 3 << 20);
    for i in 0..n {
        let data = alloc.alloc(u64::from(BLOCK), u64::from(BLOCK));
        let buf = match kind {
            RequestType::In => Buf::writable(data, BLOCK),
            _ => Buf::readable(data, BLOCK),
        };
        BlkRequest::new(kind, u64::from(i) * 8)
            .data(&[buf])
            .add(&*ram, &mut alloc, &mut queue)
            .unwrap();
    }
    Setup { blk, _ram: ram, _irq: irq, _queue: queue }
}

#[library_benchmark]
#[bench::read_batch1(setup(RequestType::In, 1, VIRTIO_F_VERSION_1))]
#[bench::read_batch32(setup(RequestType::In, 32, VIRTIO_F_VERSION_1))]
#[bench::write_batch1(setup(RequestType::Out, 1, VIRTIO_F_VERSION_1))]
#[bench::write_batch32(setup(RequestType::Out, 32, VIRTIO_F_VERSION_1))]
#[bench::read_batch1_event_idx(setup(
    RequestType::In,
    1,
    VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
))]
#[bench::empty(setup(RequestType::In, 0, VIRTIO_F_VERSION_1))]
fn serve(setup: Setup) -> Setup {
    setup.blk.serve(black_box(0), &QueueStop::new());
    // Returned, so its drop happens outside the counted call.
    setup
}

library_benchmark_group!(name = virtio, benchmarks = [serve]);

main!(library_benchmark_groups = virtio);
