//! Device-side split virtqueue: pop a chain, touch its buffers, push it used
//! — vmio's `SplitQueue` against rust-vmm's `virtio-queue` on the very same
//! ring contents (one mmap, seen through vm-memory and through `GuestRam`).
//!
//! Each chain looks like a block request: a 16-byte readable header, a
//! 512-byte writable data buffer and a 1-byte writable status. Serving it
//! means collecting the descriptors, reading the header and writing the
//! status byte. Per iteration the driver makes a batch available (one index
//! store; the ring entries stay in place across laps) and the device drains
//! it the way a device loop does: pop until empty, re-enable notifications,
//! then decide on the interrupt. EVENT_IDX is on for both.
//!
//! `cargo bench --features testing --bench virtqueue -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use arrayvec::ArrayVec;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap};
use vmio::testing::{Buf, GuestQueue};
use vmio::virtio::spec::features::VIRTIO_F_RING_EVENT_IDX;
use vmio::virtio::{Chain, SplitQueue};
use vmio::{GuestMemory, GuestRam};

const RAM: u64 = 16 << 20;
const QSIZE: u16 = 256;
const QBASE: u64 = 0x1000;
/// 3 descriptors per chain: 64 chains fill 192 of 256 descriptors, and 64
/// divides 256, so ring position p always names chain p % 64.
const CHAINS: u16 = 64;

struct Rig {
    mmap: GuestMemoryMmap<()>,
    ram: GuestRam,
    gq: GuestQueue,
}

fn rig() -> Rig {
    let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let host = mmap.get_host_address(GuestAddress(0)).unwrap();
    // SAFETY: the mmap lives in the same `Rig` as the `GuestRam` and is
    // dropped after it (field order); nobody builds references into it.
    let ram = unsafe { GuestRam::from_host(&[(0, NonNull::new(host).unwrap(), RAM)]) }.unwrap();
    let mut gq = GuestQueue::new(QSIZE, QBASE);
    gq.init(&ram).unwrap();
    for i in 0..u64::from(CHAINS) {
        let base = 0x10_0000 + i * 0x1000;
        ram.write(base, &[0x5a; 16]).unwrap();
        let bufs = [
            Buf::readable(base, 16),
            Buf::writable(base + 0x100, 512),
            Buf::writable(base + 0x400, 1),
        ];
        gq.add_unpublished(&ram, &bufs).unwrap();
    }
    // Fill the rest of the ring with the same heads, lap after lap.
    let avail = gq.config().avail_ring;
    for p in CHAINS..QSIZE {
        let head = ram.read_u16(avail + 4 + 2 * u64::from(p % CHAINS)).unwrap();
        ram.write_u16(avail + 4 + 2 * u64::from(p), head).unwrap();
    }
    Rig { ram, mmap, gq }
}

impl Rig {
    /// The driver's side: `batch` more chains available (idx store only).
    fn publish(&self, avail_idx: &mut u16, batch: u16) {
        *avail_idx = avail_idx.wrapping_add(batch);
        self.ram.store_u16(self.gq.config().avail_ring + 2, *avail_idx, Ordering::Release).unwrap();
    }
}

fn vmio_queue(r: &Rig) -> SplitQueue {
    SplitQueue::new(r.gq.config(), VIRTIO_F_RING_EVENT_IDX, &r.ram).unwrap()
}

fn rust_vmm_queue(r: &Rig) -> Queue {
    let c = r.gq.config();
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(c.desc_table as u32), Some((c.desc_table >> 32) as u32));
    q.set_avail_ring_address(Some(c.avail_ring as u32), Some((c.avail_ring >> 32) as u32));
    q.set_used_ring_address(Some(c.used_ring as u32), Some((c.used_ring >> 32) as u32));
    q.set_event_idx(true);
    q.set_ready(true);
    assert!(q.is_valid(&r.mmap));
    q
}

/// vmio: drain the queue into one reused chain; returns chains served.
fn drain_vmio(q: &mut SplitQueue, ram: &GuestRam, c: &mut Chain) -> u32 {
    let mut served = 0;
    loop {
        while q.pop_into(ram, c).unwrap() {
            let mut hdr = [0u8; 16];
            ram.read(c.readable()[0].addr, &mut hdr).unwrap();
            let status = c.writable().last().unwrap();
            ram.write(status.addr + u64::from(status.len) - 1, &[hdr[0] & 1]).unwrap();
            q.push(ram, c.head(), c.writable_len()).unwrap();
            served += 1;
        }
        if !q.enable_notification(ram).unwrap() {
            break;
        }
    }
    black_box(q.needs_interrupt(ram).unwrap());
    served
}

/// virtio-queue: the same work, collecting each chain as a device must.
fn drain_rust_vmm(q: &mut Queue, mem: &GuestMemoryMmap<()>) -> u32 {
    let mut served = 0;
    loop {
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut sg: ArrayVec<(u64, u32, bool), 64> = ArrayVec::new();
            for d in chain {
                sg.push((d.addr().0, d.len(), d.is_write_only()));
            }
            let hdr: [u8; 16] = mem.read_obj(GuestAddress(sg[0].0)).unwrap();
            let (addr, len, _) = *sg.last().unwrap();
            mem.write_obj(hdr[0] & 1, GuestAddress(addr + u64::from(len) - 1)).unwrap();
            let written: u32 = sg.iter().filter(|d| d.2).map(|d| d.1).sum();
            q.add_used(mem, head, written).unwrap();
            served += 1;
        }
        if !q.enable_notification(mem).unwrap() {
            break;
        }
    }
    black_box(q.needs_notification(mem).unwrap());
    served
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("virtqueue");
    for batch in [1u16, 32] {
        g.throughput(Throughput::Elements(u64::from(batch)));
        {
            let r = rig();
            let mut q = vmio_queue(&r);
            let mut idx = 0u16;
            let mut chain = Chain::new();
            g.bench_function(format!("vmio/batch{batch}"), |b| {
                b.iter(|| {
                    r.publish(&mut idx, batch);
                    assert_eq!(drain_vmio(&mut q, &r.ram, &mut chain), u32::from(batch));
                })
            });
        }
        {
            let r = rig();
            let mut q = rust_vmm_queue(&r);
            let mut idx = 0u16;
            g.bench_function(format!("virtio-queue/batch{batch}"), |b| {
                b.iter(|| {
                    r.publish(&mut idx, batch);
                    assert_eq!(drain_rust_vmm(&mut q, &r.mmap), u32::from(batch));
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
