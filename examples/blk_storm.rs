//! vCPU threads drive a multi-queue virtio-blk through an MMIO bus while a
//! hot-plug thread keeps editing that same bus.
//!
//! Each vCPU thread owns one request queue and brings nothing but guest
//! memory and register accesses: it builds request chains in guest RAM with
//! the crate's testing driver, writes QueueNotify through its own
//! `VcpuHandle` (so every notify is a lock-free dispatch racing the table
//! swaps), and reaps the used ring. It writes and reads random extents of its
//! own part of the disk, `--depth` requests per notify, and checks every read
//! against a shadow of what the device acknowledged. At the end every sector
//! of the backend is compared with the shadows too. With `--deferred` the
//! notify only signals the queue's event and one worker thread per queue
//! serves it (`QueueWorkers`), outside the bus.
//!
//! ```sh
//! cargo run --release --features testing --example blk_storm -- [--seconds N] [--vcpus N] [--depth N] [--disk-mib N] [--deferred]
//! ```
//!
//! The run ends with an IOPS table and a verdict; the exit code is non-zero
//! when any request failed or any byte differs.

#[path = "../tests/common/rng.rs"]
mod rng;
use rng::Rng;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vmio::testing::{Buf, BusIo, GuestAlloc, GuestQueue, InitOptions, MmioDriver};
use vmio::virtio::blk::{BlkConfig, BlockBackend, RamDisk, RequestHeader, RequestType, VirtioBlk};
use vmio::virtio::spec::blk::S_OK;
use vmio::virtio::spec::mmio as regs;
use vmio::virtio::{CondvarEvent, MmioTransport, QueueEvent, QueueWorkers, Trigger};
use vmio::{Access, Device, DeviceError, IoBus, IoRange, Mmio, Width};
use vmio::{GuestMemory, GuestRam, IrqLine};

const BLK_BASE: u64 = 0x1000_1000;
/// Scratch devices come and go in slots above the disk.
const SCRATCH_BASE: u64 = 0x1001_0000;
const SCRATCH_SLOTS: u64 = 64;
const RAM_BASE: u64 = 0x8000_0000;
const SECTOR: usize = 512;
/// Most sectors per request.
const MAX_SECTORS: usize = 8;
const QUEUE_SIZE: u16 = 256;

struct Options {
    seconds: f64,
    vcpus: u16,
    depth: usize,
    disk_mib: u64,
    deferred: bool,
}

fn parse_args() -> Result<Options, String> {
    let cores = thread::available_parallelism().map_or(2, usize::from) as u16;
    let mut o = Options { seconds: 3.0, vcpus: cores, depth: 16, disk_mib: 64, deferred: false };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => o.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--vcpus" => o.vcpus = value()?.parse().map_err(|e| format!("--vcpus: {e}"))?,
            "--depth" => o.depth = value()?.parse().map_err(|e| format!("--depth: {e}"))?,
            "--disk-mib" => {
                o.disk_mib = value()?.parse().map_err(|e| format!("--disk-mib: {e}"))?
            }
            "--deferred" => o.deferred = true,
            "--help" | "-h" => {
                return Err("usage: blk_storm [--seconds N] [--vcpus N] [--depth N] \
                            [--disk-mib N] [--deferred]"
                    .into());
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    // Each request takes 3 descriptors; the queue must hold a whole batch.
    if o.vcpus == 0 || o.depth == 0 || o.depth * 3 > usize::from(QUEUE_SIZE) {
        return Err(format!("need 1+ vCPUs and a depth of 1 to {}", QUEUE_SIZE / 3));
    }
    let per_vcpu = (o.disk_mib << 20) / u64::from(o.vcpus);
    if per_vcpu < (o.depth * MAX_SECTORS * SECTOR) as u64 {
        return Err("disk too small for that many vCPUs at that depth".into());
    }
    Ok(o)
}

/// A device the hot-plug thread moves around; answers its own tag.
struct Scratch(u64);
impl Device for Scratch {
    fn read(&self, _: Access) -> Result<u64, DeviceError> {
        Ok(self.0)
    }
    fn write(&self, _: Access, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// The disk's interrupt line: counts pulses.
#[derive(Default)]
struct Line(AtomicU64);
impl IrqLine for Line {
    fn pulse(&self) {
        // Relaxed: a statistic.
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct VcpuReport {
    reads: u64,
    writes: u64,
    bytes: u64,
    failed: u64,
    mismatches: u64,
    notifies: u64,
}

/// One request slot's guest buffers.
#[derive(Clone, Copy)]
struct Slot {
    header: u64,
    data: u64,
    status: u64,
}

#[allow(clippy::too_many_arguments)]
fn vcpu(
    index: u16,
    bus: IoBus<Mmio>,
    mem: Arc<GuestRam>,
    mut queue: GuestQueue,
    mut alloc: GuestAlloc,
    first_sector: u64,
    sectors: u64,
    depth: usize,
    stop: Arc<AtomicBool>,
) -> (VcpuReport, Vec<u8>) {
    let mut io = bus.handle(u32::from(index));
    let slots: Vec<Slot> = (0..depth)
        .map(|_| Slot {
            header: alloc.alloc(16, 16),
            data: alloc.alloc((MAX_SECTORS * SECTOR) as u64, 4096),
            status: alloc.alloc(1, 1),
        })
        .collect();
    let mut shadow = vec![0u8; sectors as usize * SECTOR];
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15 ^ (u64::from(index) + 1));
    let mut report = VcpuReport::default();
    // Each slot of a batch works in its own stripe: no two requests of a
    // batch overlap, so the shadow is exact whatever order they complete in.
    let stripe = sectors / depth as u64;
    let mut data = vec![0u8; MAX_SECTORS * SECTOR];
    let mut plan = Vec::with_capacity(depth);
    while !stop.load(Ordering::Relaxed) {
        plan.clear();
        for (j, slot) in slots.iter().enumerate() {
            let n = 1 + (rng.next() % MAX_SECTORS as u64);
            let start = j as u64 * stripe + rng.next() % (stripe - n + 1);
            let write = rng.next() % 5 < 3;
            let kind = if write { RequestType::Out } else { RequestType::In };
            let h = RequestHeader::new(kind, first_sector + start);
            mem.write(slot.header, &h.to_bytes()).expect("guest RAM");
            mem.write(slot.status, &[0xff]).expect("guest RAM");
            let len = n as usize * SECTOR;
            if write {
                data[..len].iter_mut().for_each(|b| *b = rng.next() as u8);
                mem.write(slot.data, &data[..len]).expect("guest RAM");
            }
            let bufs = [
                Buf::readable(slot.header, 16),
                Buf { addr: slot.data, len: len as u32, writable: !write },
                Buf::writable(slot.status, 1),
            ];
            let head = queue.add(&*mem, &bufs).expect("queue has room");
            plan.push((head, write, start, len));
        }
        // One notify for the whole batch, dispatched through the bus.
        io.write(BLK_BASE + regs::QUEUE_NOTIFY, Width::U32, u64::from(index)).expect("QueueNotify");
        report.notifies += 1;
        let mut done = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while done < plan.len() {
            match queue.pop_used(&*mem).expect("used ring") {
                Some(_) => done += 1,
                None if Instant::now() > deadline => {
                    eprintln!("vCPU {index}: batch not completed in 10 s");
                    report.failed += (plan.len() - done) as u64;
                    return (report, shadow);
                }
                // Yield: with `--deferred` a worker may need this core.
                None => thread::yield_now(),
            }
        }
        for (slot, &(_, write, start, len)) in slots.iter().zip(&plan) {
            let mut status = [0u8];
            mem.read(slot.status, &mut status).expect("guest RAM");
            if status[0] != S_OK {
                report.failed += 1;
                continue;
            }
            let at = start as usize * SECTOR;
            if write {
                mem.read(slot.data, &mut shadow[at..at + len]).expect("guest RAM");
                report.writes += 1;
            } else {
                mem.read(slot.data, &mut data[..len]).expect("guest RAM");
                if data[..len] != shadow[at..at + len] {
                    report.mismatches += 1;
                }
                report.reads += 1;
            }
            report.bytes += len as u64;
        }
    }
    (report, shadow)
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let disk = Arc::new(RamDisk::new(o.disk_mib << 20));
    let config = BlkConfig { num_queues: o.vcpus, queue_size: QUEUE_SIZE, ..BlkConfig::default() }
        .with_id("blk-storm");
    let blk = VirtioBlk::new(disk.clone(), config).expect("valid configuration");
    let queue_bytes = GuestQueue::footprint(QUEUE_SIZE).next_multiple_of(4096);
    // Header, data (page-aligned) and status per slot, with alignment slack.
    let per_vcpu_buffers = (o.depth * (MAX_SECTORS * SECTOR + 2 * 4096)) as u64;
    let ram_size = (queue_bytes + per_vcpu_buffers) * u64::from(o.vcpus) + (1 << 20);
    let mem = Arc::new(GuestRam::new(RAM_BASE, ram_size).expect("guest RAM"));
    let line = Arc::new(Line::default());
    let transport = Arc::new(MmioTransport::new(blk, mem.clone(), line.clone(), Trigger::Edge));
    let workers = o.deferred.then(|| {
        let events: Vec<Arc<dyn QueueEvent>> =
            (0..o.vcpus).map(|_| Arc::new(CondvarEvent::new()) as _).collect();
        QueueWorkers::spawn(transport.clone(), events).expect("worker threads")
    });
    let bus = IoBus::<Mmio>::new();
    bus.register(IoRange::new(BLK_BASE, 0x200).unwrap(), transport.clone()).unwrap();

    // Bring-up, as a guest kernel does, through the bus.
    let mut driver = MmioDriver::new(BusIo { bus: &bus, base: BLK_BASE });
    let queues: Vec<(u16, u16, u64)> =
        (0..o.vcpus).map(|q| (q, QUEUE_SIZE, RAM_BASE + u64::from(q) * queue_bytes)).collect();
    let opts = InitOptions { features: u64::MAX, ack_and_driver_together: false };
    let features = match driver.init(&*mem, opts, &queues) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("bring-up failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let capacity = driver.read_config_u64(0).expect("capacity");

    println!(
        "virtio-blk: {} MiB RAM disk, {} queues (features {features:#x}), {} vCPUs, depth {}, {:.1} s, served {}, hot-plug running",
        (capacity * 512) >> 20,
        o.vcpus,
        o.vcpus,
        o.depth,
        o.seconds,
        if o.deferred { "by per-queue workers" } else { "inline" },
    );

    let stop = Arc::new(AtomicBool::new(false));
    let sectors_per_vcpu = capacity / u64::from(o.vcpus);
    let buffers_base = RAM_BASE + queue_bytes * u64::from(o.vcpus);
    let vcpus: Vec<_> = (0..o.vcpus)
        .map(|i| {
            let (bus, mem, stop) = (bus.clone(), mem.clone(), stop.clone());
            let queue = driver.queue(i).clone();
            let alloc =
                GuestAlloc::new(buffers_base + u64::from(i) * per_vcpu_buffers, per_vcpu_buffers);
            let first = u64::from(i) * sectors_per_vcpu;
            let depth = o.depth;
            thread::spawn(move || {
                vcpu(i, bus, mem, queue, alloc, first, sectors_per_vcpu, depth, stop)
            })
        })
        .collect();

    // Hot-plug: register, move and remove scratch devices next to the disk.
    let edits = Arc::new(AtomicU64::new(0));
    let plugger = {
        let (bus, stop, edits) = (bus.clone(), stop.clone(), edits.clone());
        thread::spawn(move || {
            let mut rng = Rng::new(7);
            let mut live = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let slot = rng.next() % SCRATCH_SLOTS;
                let at = SCRATCH_BASE + slot * 0x1000;
                if let Ok(id) =
                    bus.register(IoRange::new(at, 0x1000).unwrap(), Arc::new(Scratch(slot)))
                {
                    live.push(id);
                }
                if live.len() > 8 {
                    let id = live.swap_remove((rng.next() % live.len() as u64) as usize);
                    let to = SCRATCH_BASE + (rng.next() % SCRATCH_SLOTS) * 0x1000;
                    // A move may collide with a live neighbour; that is fine.
                    let _ = bus.remap(id, IoRange::new(to, 0x1000).unwrap());
                    if let Ok(unplug) = bus.unregister(id) {
                        unplug.wait().expect("not inside a dispatch");
                    }
                }
                // Relaxed: a statistic.
                edits.fetch_add(3, Ordering::Relaxed);
            }
        })
    };

    let started = Instant::now();
    thread::sleep(Duration::from_secs_f64(o.seconds));
    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = vcpus.into_iter().map(|t| t.join().expect("vCPU thread")).collect();
    let elapsed = started.elapsed().as_secs_f64();
    plugger.join().expect("hot-plug thread");
    // Every batch was reaped: the workers have nothing left to do.
    drop(workers);

    println!();
    println!("| vCPU | queue | reads | writes | MiB | IOPS | notifies | failed | mismatches |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut total = VcpuReport::default();
    for (i, (r, _)) in results.iter().enumerate() {
        let ops = r.reads + r.writes;
        println!(
            "| {i} | {i} | {} | {} | {:.1} | {:.0} | {} | {} | {} |",
            r.reads,
            r.writes,
            r.bytes as f64 / (1 << 20) as f64,
            ops as f64 / elapsed,
            r.notifies,
            r.failed,
            r.mismatches
        );
        total.reads += r.reads;
        total.writes += r.writes;
        total.bytes += r.bytes;
        total.failed += r.failed;
        total.mismatches += r.mismatches;
        total.notifies += r.notifies;
    }
    let ops = total.reads + total.writes;
    println!(
        "| all | {} | {} | {} | {:.1} | {:.0} | {} | {} | {} |",
        o.vcpus,
        total.reads,
        total.writes,
        total.bytes as f64 / (1 << 20) as f64,
        ops as f64 / elapsed,
        total.notifies,
        total.failed,
        total.mismatches
    );
    println!();
    println!(
        "bus edits during the run: {} ({:.0}/s); interrupts: {}",
        edits.load(Ordering::Relaxed),
        edits.load(Ordering::Relaxed) as f64 / elapsed,
        line.0.load(Ordering::Relaxed)
    );

    // Every byte the device holds must be what the vCPUs were told.
    let mut backend_mismatches = 0u64;
    let mut buf = vec![0u8; sectors_per_vcpu as usize * SECTOR];
    for (i, (_, shadow)) in results.iter().enumerate() {
        let at = i as u64 * sectors_per_vcpu * SECTOR as u64;
        disk.read_at(at, &mut buf).expect("backend read");
        backend_mismatches +=
            buf.chunks(SECTOR).zip(shadow.chunks(SECTOR)).filter(|(a, b)| a != b).count() as u64;
    }
    let ok = total.failed == 0 && total.mismatches == 0 && backend_mismatches == 0 && ops > 0;
    println!(
        "integrity: {} ({} requests, {} failed, {} read mismatches, {} backend sectors differ)",
        if ok { "PASS" } else { "FAIL" },
        ops,
        total.failed,
        total.mismatches,
        backend_mismatches
    );
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
