//! virtio-blk through the whole path: the `virtio-drivers` guest driver
//! builds the chains in guest RAM, one QueueNotify per batch is dispatched
//! through the `IoBus` to the virtio-mmio transport, the device processes the
//! requests on the RAM backend, fills the used ring and raises the
//! interrupt; the driver reaps the completions.
//!
//! Two ways to serve a queue: `inline` (the notify write runs the requests
//! on the vCPU thread, inside the bus's read section) and `deferred` (the
//! notify signals a per-queue event; one `QueueWorkers` thread per queue
//! serves it and raises the interrupt).
//!
//! Groups:
//! * `copy_4k`: a plain 4 KiB memcpy, measured in the same run: `hot` copies
//!   the same cache-resident block; `read_random` / `write_random` copy a
//!   random block of a disk-sized buffer out / in — the floor a read / write
//!   request's data movement cannot beat.
//! * `blk-{read,write}-{q}q{t}t/batch{n}`: 4 KiB requests at random
//!   4 KiB-aligned sectors of a 16 MiB RAM disk, `n` requests per notify,
//!   `t` vCPU threads each driving its own of `q` queues. One iteration is
//!   one batch on every thread; throughput is reported in requests
//!   (elements/s = IOPS). `batch` is wall-clock time; `batch-cputime` (at
//!   batch 32) the largest per-thread CPU time, which factors out other
//!   processes on a shared host while still counting any spinning on a
//!   contended lock: the queue-scaling figure on a busy machine.
//!   `device-cputime` (batch 32): the CPU time spent inside the device's
//!   serve calls, summed over all queues (on the vCPU inline, on the
//!   workers deferred): divided by `32 × q` it is the device-side cost of
//!   one request, with the handoff's wake-up excluded.
//!   The `-deferred` groups are the same with per-queue workers.
//! * `handoff`: the cost of the handoff itself. `event_roundtrip`: one
//!   thread signals a `CondvarEvent` another waits on, which answers on a
//!   second one (one iteration = two handoffs, each a futex wake of a
//!   sleeping thread). `notify_empty_{inline,deferred}`: a QueueNotify
//!   through the bus for a live, empty queue: inline it serves the empty
//!   ring (notifications off, on, re-check), deferred it only signals the
//!   event.
//!
//! Per-request overhead = time per request − the matching `copy_4k` floor.
//! Run:
//! `cargo bench --features testing --bench virtio_blk -- --warm-up-time 1 --measurement-time 3`

#[path = "../tests/common/rng.rs"]
mod rng;
use rng::Rng;
#[path = "../tests/common/virtio_drivers_glue.rs"]
mod glue;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use glue::{BlkQueue, RAM_BASE, RequestBufs, bring_up, guest_ram};
use vmio::IrqLine;
use vmio::testing::{Intercept, ServeHook};
use vmio::virtio::blk::{BlkConfig, BlockBackend, RamDisk, RequestHeader, RequestType, VirtioBlk};
use vmio::virtio::spec::blk::{T_IN, T_OUT};
use vmio::virtio::spec::mmio as regs;
use vmio::virtio::{
    CondvarEvent, MmioTransport, QueueEvent, QueueStop, QueueWorkers, Trigger, VirtioDevice,
};
use vmio::{IoBus, IoRange, Mmio, Width};

const BASE: u64 = 0x1000_0000;
const DISK: u64 = 16 << 20;
const BLOCK: usize = 4096;
const MAX_BATCH: usize = 32;
/// VERSION_1 only: no EVENT_IDX, so every batch gets its notify and its
/// interrupt (the path the benchmark is about); no INDIRECT_DESC, whose
/// tables virtio-drivers allocates on the host heap per request.
const FEATURES: u64 = 1 << 32;

/// CPU time consumed by the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the call writes only it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_THREAD_CPUTIME_ID");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// An interrupt line that counts.
#[derive(Default)]
struct CountingLine(AtomicU64);
impl IrqLine for CountingLine {
    fn pulse(&self) {
        // Relaxed: a statistic.
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Adds up the time its device's serve calls take, while `on`: thread CPU
/// time for the criterion groups (`device-cputime`), wall-clock time for the
/// summary table (`wall`), whose per-request figures at batch 1 cannot
/// afford a system call per serve.
struct Timed {
    on: Arc<AtomicBool>,
    wall: Arc<AtomicBool>,
    serve_ns: Arc<AtomicU64>,
    /// Serve calls begun and ended while `on`: equal when no serve is in
    /// progress, so the sum is complete.
    started: Arc<AtomicU64>,
    finished: Arc<AtomicU64>,
}

impl ServeHook for Timed {
    fn serve<D: VirtioDevice + ?Sized>(&self, device: &D, queue: u16, stop: &QueueStop) {
        // Relaxed: set between runs, while no request is in flight.
        if !self.on.load(Ordering::Relaxed) {
            return device.serve(queue, stop);
        }
        // Relaxed: counted before the serve publishes anything, so a driver
        // that saw a completion sees this count through the used ring's
        // Release/Acquire.
        self.started.fetch_add(1, Ordering::Relaxed);
        let ns = if self.wall.load(Ordering::Relaxed) {
            let t = Instant::now();
            device.serve(queue, stop);
            t.elapsed().as_nanos() as u64
        } else {
            let t = thread_cpu_time();
            device.serve(queue, stop);
            (thread_cpu_time() - t).as_nanos() as u64
        };
        self.serve_ns.fetch_add(ns, Ordering::Relaxed);
        // Release: the sum is in place before a reader sees the count.
        self.finished.fetch_add(1, Ordering::Release);
    }
}

/// One request's buffers, in guest RAM like a real guest's.
struct Slot {
    header: &'static mut [u8],
    data: &'static mut [u8],
    status: &'static mut [u8],
}

fn guest_slice(len: usize) -> &'static mut [u8] {
    let paddr = glue::alloc_pages(len.div_ceil(4096));
    let ram = guest_ram();
    let ptr = ram.host_ptr(paddr, len as u64).expect("guest RAM").as_ptr();
    assert!(paddr >= RAM_BASE);
    // SAFETY: the pages were just allocated to this slice alone and guest RAM
    // lives for the whole process. The device writes them (by raw copies)
    // only while a request owns them, the hand-off virtio-drivers' own
    // buffers follow.
    unsafe { std::slice::from_raw_parts_mut(ptr, len) }
}

impl RequestBufs for Slot {
    fn parts(&mut self) -> (&[u8], &mut [u8], &mut [u8]) {
        (&*self.header, &mut *self.data, &mut *self.status)
    }
}

impl Slot {
    fn new() -> Self {
        Slot { header: guest_slice(16), data: guest_slice(BLOCK), status: guest_slice(1) }
    }
}

/// A vCPU thread's side: its queue, its request slots, its random stream.
struct Worker {
    queue: BlkQueue,
    slots: Vec<Slot>,
    rng: Rng,
}

impl Worker {
    fn next_sector(&mut self) -> u64 {
        let r = self.rng.next();
        (r % (DISK / BLOCK as u64)) * (BLOCK as u64 / 512)
    }

    /// One batch of `n` requests: add all, notify once, reap all.
    fn batch(&mut self, kind: u32, n: usize) {
        for i in 0..n {
            let sector = self.next_sector();
            let slot = &mut self.slots[i];
            let header = RequestHeader::new(RequestType::from_raw(kind), sector);
            slot.header.copy_from_slice(&header.to_bytes());
        }
        self.queue.submit_batch(kind == T_OUT, &mut self.slots[..n]);
        for s in &self.slots[..n] {
            assert_eq!(s.status[0], 0, "request failed");
        }
    }
}

/// What a vCPU thread measures over its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Elapsed wall-clock time.
    Wall,
    /// The thread's CPU time.
    Cpu,
    /// The device time of each batch (see [`Rig::sample_device_time`]).
    Sample,
}

/// Persistent vCPU threads: each runs `iters` batches on command, starting
/// together, and reports its elapsed time.
struct Rig {
    commands: Vec<mpsc::Sender<(u32, usize, u64, Mode)>>,
    samples: mpsc::Receiver<Vec<u64>>,
    results: mpsc::Receiver<Duration>,
    timing: Arc<AtomicBool>,
    serve_ns: Arc<AtomicU64>,
    wall: Arc<AtomicBool>,
    // Declared before the bus: stopped first.
    _workers: Option<QueueWorkers>,
    _bus: IoBus<Mmio>,
}

impl Rig {
    fn new(queues: u16, deferred: bool) -> Self {
        let disk = RamDisk::new(DISK);
        // Every chunk allocated, so reads copy real data.
        let fill = vec![0x5au8; 1 << 20];
        for off in (0..DISK).step_by(fill.len()) {
            disk.write_at(off, &fill).unwrap();
        }
        let config = BlkConfig { num_queues: queues, queue_size: 256, ..BlkConfig::default() };
        let serve_ns = Arc::new(AtomicU64::new(0));
        let timing = Arc::new(AtomicBool::new(false));
        let wall = Arc::new(AtomicBool::new(false));
        let (started, finished) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let blk = Intercept {
            device: VirtioBlk::new(disk, config).unwrap(),
            hook: Timed {
                on: timing.clone(),
                wall: wall.clone(),
                serve_ns: serve_ns.clone(),
                started: started.clone(),
                finished: finished.clone(),
            },
        };
        let line = Arc::new(CountingLine::default());
        let transport = Arc::new(MmioTransport::new(blk, guest_ram(), line, Trigger::Edge));
        let workers = deferred.then(|| {
            let events = (0..queues).map(|_| Arc::new(CondvarEvent::new()) as _).collect();
            QueueWorkers::spawn(transport.clone(), events).expect("worker threads")
        });
        let bus = IoBus::<Mmio>::new();
        bus.register(IoRange::new(BASE, 0x200).unwrap(), transport).unwrap();
        let (_, pending) = bring_up(&bus, BASE, queues, FEATURES);
        let (done_tx, results) = mpsc::channel();
        let (samples_tx, samples) = mpsc::channel();
        let start = Arc::new(Barrier::new(usize::from(queues)));
        let mut commands = Vec::new();
        for (i, p) in pending.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel::<(u32, usize, u64, Mode)>();
            commands.push(tx);
            let done = done_tx.clone();
            let sampled = samples_tx.clone();
            let start = start.clone();
            let (serve_ns, started, finished) =
                (serve_ns.clone(), started.clone(), finished.clone());
            thread::spawn(move || {
                let mut w = Worker {
                    queue: p.attach(),
                    slots: (0..MAX_BATCH).map(|_| Slot::new()).collect(),
                    rng: Rng::new(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1)),
                };
                for (kind, n, iters, mode) in rx {
                    start.wait();
                    if mode == Mode::Sample {
                        // Device time of each batch: the serve time added
                        // while it ran, once no serve is still in progress.
                        let mut out = Vec::with_capacity(iters as usize);
                        for _ in 0..iters {
                            let before = serve_ns.load(Ordering::Relaxed);
                            w.batch(kind, n);
                            // Acquire pairs with the Release in `Timed::serve`.
                            while finished.load(Ordering::Acquire)
                                != started.load(Ordering::Relaxed)
                            {
                                std::hint::spin_loop();
                            }
                            out.push(serve_ns.load(Ordering::Relaxed) - before);
                        }
                        sampled.send(out).unwrap();
                        continue;
                    }
                    let (t, c) = (Instant::now(), thread_cpu_time());
                    for _ in 0..iters {
                        w.batch(kind, n);
                    }
                    let cpu = mode == Mode::Cpu;
                    done.send(if cpu { thread_cpu_time() - c } else { t.elapsed() }).unwrap();
                }
            });
        }
        Rig { commands, samples, results, timing, serve_ns, wall, _workers: workers, _bus: bus }
    }

    /// CPU time spent in the device's serve calls while every thread runs
    /// `iters` batches.
    fn run_device_time(&self, kind: u32, n: usize, iters: u64) -> Duration {
        // Relaxed: no serve runs between batches (every batch is reaped),
        // and the channels of `run` order these with the threads.
        self.serve_ns.store(0, Ordering::Relaxed);
        self.timing.store(true, Ordering::Relaxed);
        self.run(kind, n, iters, false);
        self.timing.store(false, Ordering::Relaxed);
        Duration::from_nanos(self.serve_ns.load(Ordering::Relaxed))
    }

    /// Wall-clock device (serve) time of each of `batches` batches of `n`
    /// requests on the one queue.
    fn sample_device_time(&self, kind: u32, n: usize, batches: u64) -> Vec<u64> {
        assert_eq!(self.commands.len(), 1, "sampling drives one queue");
        // Relaxed: set while no request is in flight; the command channel
        // orders it before the batches.
        self.wall.store(true, Ordering::Relaxed);
        self.timing.store(true, Ordering::Relaxed);
        self.commands[0].send((kind, n, batches, Mode::Sample)).unwrap();
        let samples = self.samples.recv().unwrap();
        self.timing.store(false, Ordering::Relaxed);
        self.wall.store(false, Ordering::Relaxed);
        samples
    }

    /// Time for every thread to run `iters` batches: wall-clock, or with
    /// `cpu` the largest per-thread CPU time (what the threads would take
    /// with a core each, whatever else the host runs).
    fn run(&self, kind: u32, n: usize, iters: u64, cpu: bool) -> Duration {
        let mode = if cpu { Mode::Cpu } else { Mode::Wall };
        for c in &self.commands {
            c.send((kind, n, iters, mode)).unwrap();
        }
        (0..self.commands.len()).map(|_| self.results.recv().unwrap()).max().unwrap()
    }
}

fn copy_floor(c: &mut Criterion) {
    let mut g = c.benchmark_group("copy_4k");
    g.throughput(Throughput::Elements(1));
    // Cache-hot: the same 4 KiB every time.
    let src = vec![0x3cu8; BLOCK];
    let mut dst = vec![0u8; BLOCK];
    g.bench_function("hot", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        })
    });
    // The disk's working set: a random 4 KiB block of a disk-sized buffer
    // copied out (what a read must do) or in (what a write must do).
    let mut disk = vec![0x3cu8; DISK as usize];
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut next_block = move || rng.below(DISK / BLOCK as u64) as usize * BLOCK;
    g.bench_function("read_random", |b| {
        b.iter(|| {
            let at = next_block();
            dst.copy_from_slice(&disk[at..at + BLOCK]);
            black_box(&mut dst);
        })
    });
    g.bench_function("write_random", |b| {
        b.iter(|| {
            let at = next_block();
            disk[at..at + BLOCK].copy_from_slice(black_box(&src));
            black_box(&mut disk);
        })
    });
    g.finish();
}

fn blk(c: &mut Criterion) {
    for (deferred, queues) in
        [(false, 1u16), (false, 2), (false, 4), (true, 1), (true, 2), (true, 4)]
    {
        let rig = Rig::new(queues, deferred);
        let mode = if deferred { "-deferred" } else { "" };
        for (name, kind) in [("read", T_IN), ("write", T_OUT)] {
            let mut g = c.benchmark_group(format!("blk-{name}-{queues}q{queues}t{mode}"));
            for batch in [1usize, 32] {
                g.throughput(Throughput::Elements((batch * usize::from(queues)) as u64));
                g.bench_with_input(BenchmarkId::new("batch", batch), &batch, |b, &n| {
                    b.iter_custom(|iters| rig.run(kind, n, iters, false));
                });
                if batch == MAX_BATCH {
                    g.bench_with_input(
                        BenchmarkId::new("batch-cputime", batch),
                        &batch,
                        |b, &n| {
                            b.iter_custom(|iters| rig.run(kind, n, iters, true));
                        },
                    );
                    g.bench_with_input(
                        BenchmarkId::new("device-cputime", batch),
                        &batch,
                        |b, &n| {
                            b.iter_custom(|iters| rig.run_device_time(kind, n, iters));
                        },
                    );
                }
            }
            g.finish();
        }
    }
}

/// The handoff alone: event ping-pong between two threads, and the vCPU's
/// side of a notify for an empty queue in both modes.
fn handoff(c: &mut Criterion) {
    let mut g = c.benchmark_group("handoff");
    {
        let there = Arc::new(CondvarEvent::new());
        let back = Arc::new(CondvarEvent::new());
        let stop = Arc::new(AtomicBool::new(false));
        let echo = {
            let (there, back, stop) = (there.clone(), back.clone(), stop.clone());
            thread::spawn(move || {
                loop {
                    there.wait();
                    // Relaxed: set before the final signal, whose mutex
                    // orders it.
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    back.signal();
                }
            })
        };
        g.bench_function("event_roundtrip", |b| {
            b.iter(|| {
                there.signal();
                back.wait();
            })
        });
        stop.store(true, Ordering::Relaxed);
        there.signal();
        echo.join().unwrap();
    }
    for deferred in [false, true] {
        let rig = Rig::new(1, deferred);
        let mut vcpu = rig._bus.handle(0);
        let name = if deferred { "notify_empty_deferred" } else { "notify_empty_inline" };
        g.bench_function(name, |b| {
            b.iter(|| vcpu.write(BASE + regs::QUEUE_NOTIFY, Width::U32, 0).unwrap())
        });
    }
    g.finish();
}

/// Median of `v` (sorted in place).
fn median(v: &mut [u64]) -> f64 {
    v.sort_unstable();
    v[v.len() / 2] as f64
}

/// Median cost of the `Instant` pair that brackets each timed serve.
fn timer_overhead_ns() -> f64 {
    let mut v: Vec<u64> = (0..20_000)
        .map(|_| {
            let t = Instant::now();
            black_box(());
            t.elapsed().as_nanos() as u64
        })
        .collect();
    median(&mut v)
}

/// Median time of one random 4 KiB copy out of (`read`) or into a
/// disk-sized buffer, timed `batch` copies at a time as the device's serve
/// is timed once per batch (so a batch of 1 pays a cache miss's latency
/// alone, a batch of 32 overlaps them), the timer's cost taken out.
fn copy_ns(read: bool, batch: usize, timer: f64) -> f64 {
    let mut disk = vec![0x3cu8; DISK as usize];
    let mut buf = vec![0u8; BLOCK];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut v: Vec<u64> = (0..20_000 / batch + 1000)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..batch {
                rng ^= rng >> 12;
                rng ^= rng << 25;
                rng ^= rng >> 27;
                let blocks = DISK / BLOCK as u64;
                let at = (rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks) as usize * BLOCK;
                if read {
                    buf.copy_from_slice(&disk[at..at + BLOCK]);
                    black_box(&mut buf);
                } else {
                    disk[at..at + BLOCK].copy_from_slice(black_box(&buf));
                    black_box(&mut disk);
                }
            }
            t.elapsed().as_nanos() as u64
        })
        .collect();
    (median(&mut v) - timer).max(0.0) / batch as f64
}

/// The table the README shows: per-request device time (the serve calls,
/// on the vCPU inline or on the worker deferred; median over many batches,
/// the timer's own cost taken out) for 4 KiB random reads and writes at
/// batch 1 and 32, against plain random 4 KiB copies timed the same way in
/// the same run, with the overhead beyond the copy and the ratio.
fn summary() {
    let timer = timer_overhead_ns();
    println!();
    println!("virtio-blk per-request device time vs a plain 4 KiB copy (median ns)");
    // The floors, once: [read, write] x [batch 1, batch 32].
    let floors: Vec<f64> = [(true, 1), (true, MAX_BATCH), (false, 1), (false, MAX_BATCH)]
        .into_iter()
        .map(|(read, batch)| copy_ns(read, batch, timer))
        .collect();
    println!("timer {timer:.0} ns (taken out of both)");
    println!(
        "{:<9} {:<6} {:>5} {:>10} {:>8} {:>9} {:>6}",
        "mode", "op", "batch", "device", "copy", "overhead", "ratio"
    );
    for deferred in [false, true] {
        let rig = Rig::new(1, deferred);
        let mode = if deferred { "deferred" } else { "inline" };
        for (op, kind, floor) in [("read", T_IN, &floors[..2]), ("write", T_OUT, &floors[2..])] {
            for (batch, copy) in [1usize, MAX_BATCH].into_iter().zip(floor.iter().copied()) {
                let batches = if batch == 1 { 20_000 } else { 2_000 };
                rig.sample_device_time(kind, batch, batches / 10); // warm-up
                let mut v = rig.sample_device_time(kind, batch, batches);
                let per_request = (median(&mut v) - timer).max(0.0) / batch as f64;
                println!(
                    "{:<9} {:<6} {:>5} {:>10.0} {:>8.0} {:>9.0} {:>6.2}",
                    mode,
                    op,
                    batch,
                    per_request,
                    copy,
                    per_request - copy,
                    per_request / copy
                );
            }
        }
    }
}

criterion_group!(benches, copy_floor, blk, handoff);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // Not when only listing or smoke-testing the benchmarks.
    if !std::env::args().any(|a| a == "--list" || a == "--test") {
        summary();
    }
}
