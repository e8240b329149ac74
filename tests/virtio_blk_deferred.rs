//! virtio-blk served off the vCPU thread: QueueNotify only signals a
//! per-queue event, [`QueueWorkers`] serve the queues, completions go out
//! through the interrupt line.
//!
//! - `deferred_virtio_drivers_end_to_end`: the `virtio-drivers` crate's
//!   `VirtIOBlk` drives the device through the bus while per-queue workers
//!   serve it; every request completes, data is verified, and every backend
//!   call ran on a worker thread, none on the vCPU.
//! - `ioeventfd_notifies_that_never_reach_the_transport`: notifies are
//!   absorbed in front of the transport (as a KVM ioeventfd absorbs them)
//!   and only signal the event; the workers serve on the event alone.
//! - `unplug_and_dispatch_go_on_while_a_worker_flushes`: while a backend
//!   is stuck in a flush on a worker, vCPUs keep dispatching (to that
//!   device too) and `Unplug::wait` for another device on the same bus
//!   returns; `inline_flush_holds_up_unplug_control` shows the same scene
//!   served inline holding the unplug up, so the test can fail.
//! - `unplug_the_device_itself_mid_flush`: the unplug completes at once,
//!   worker shutdown waits for the flush, whose completion is published.
//! - `two_queues_served_by_two_workers_at_once_match_shadow`: two vCPUs on
//!   two queues, two workers; the first reads only complete while both
//!   workers are inside the backend at once, and every read matches a
//!   shadow of the disk, as does the backend at the end.

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

#[path = "common/virtio_drivers_glue.rs"]
mod glue;

#[path = "common/gate.rs"]
mod gate;
use gate::Gate;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use glue::{BusTransport, GuestHal, bring_up, flush_and_check_id, guest_ram, write_read_verify};
use virtio_drivers::device::blk::{SECTOR_SIZE, VirtIOBlk};
use vmio::testing::{BackendOp, FaultyDisk};
use vmio::virtio::blk::{BackendError, BlkConfig, BlockBackend, RamDisk, VirtioBlk};
use vmio::virtio::spec::blk::{S_OK, T_FLUSH, T_IN, T_OUT};
use vmio::virtio::spec::mmio::QUEUE_NOTIFY;
use vmio::virtio::{CondvarEvent, MmioTransport, QueueEvent, QueueWorkers, Trigger};
use vmio::{Access, Device, DeviceError, IoBus, IoRange, IrqLine, Mmio, Width};

const BASE: u64 = 0x1000_0000;

/// A RAM disk that records the name of every thread that calls it.
fn traced(size: u64) -> (Arc<FaultyDisk>, Arc<Mutex<Vec<String>>>) {
    let threads = Arc::new(Mutex::new(Vec::new()));
    let seen = threads.clone();
    let disk = FaultyDisk::ram(size).on(move |_| {
        let name = std::thread::current().name().unwrap_or("<unnamed>").to_owned();
        seen.lock().unwrap().push(name);
        Ok(())
    });
    (Arc::new(disk), threads)
}

/// An edge line counting its pulses (what an irqfd write would be).
#[derive(Default)]
struct CountingLine(AtomicUsize);
impl IrqLine for CountingLine {
    fn pulse(&self) {
        // Relaxed: a counter read after the fact.
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn events(n: u16) -> Vec<Arc<dyn QueueEvent>> {
    (0..n).map(|_| Arc::new(CondvarEvent::new()) as Arc<dyn QueueEvent>).collect()
}

#[test]
fn deferred_virtio_drivers_end_to_end() {
    let rounds = if cfg!(miri) { 8 } else { 200 };
    let (disk, calls) = traced(2 << 20);
    // Two queues, two workers; the driver uses queue 0 (it does not do MQ),
    // queue 1's worker must stay harmlessly idle.
    let config = BlkConfig { num_queues: 2, ..BlkConfig::default() }.with_id("deferred");
    let blk = VirtioBlk::new(disk.clone(), config).unwrap();
    let line = Arc::new(CountingLine::default());
    let transport = Arc::new(MmioTransport::new(blk, guest_ram(), line.clone(), Trigger::Edge));
    let workers = QueueWorkers::spawn(transport.clone(), events(2)).unwrap();
    assert_eq!(workers.len(), 2);
    let bus = IoBus::<Mmio>::new();
    bus.register(IoRange::new(BASE, 0x200).unwrap(), transport.clone()).unwrap();

    let mut driver = VirtIOBlk::<GuestHal, _>::new(BusTransport::new(&bus, BASE, 0)).unwrap();
    let shadow = write_read_verify(&mut driver, rounds, 0xdef0_1234_5678_9abc);
    flush_and_check_id(&mut driver, b"deferred");

    let mut on_disk = vec![0u8; shadow.len()];
    disk.inner().read_at(0, &mut on_disk).unwrap();
    assert!(on_disk == shadow, "backend differs from the driver's shadow");
    // Every backend call ran on queue 0's worker, none on the vCPU.
    let threads = std::mem::take(&mut *calls.lock().unwrap());
    assert!(!threads.is_empty());
    assert!(
        threads.iter().all(|t| t == "vmio-queue-0"),
        "backend called off the worker: {:?}",
        threads.iter().find(|t| *t != "vmio-queue-0")
    );
    // Completions were signalled through the line (the driver polls, but
    // the device still interrupts when the driver has not suppressed it).
    assert!(line.0.load(Ordering::Relaxed) > 0, "no interrupt raised from the workers");

    // Shut down, the transport is inline again: the vCPU serves.
    workers.shutdown();
    let data = vec![0x77u8; 4 * SECTOR_SIZE];
    driver.write_blocks(8, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    driver.read_blocks(8, &mut back).unwrap();
    assert_eq!(back, data);
    let me = std::thread::current().name().map(str::to_owned);
    let threads = std::mem::take(&mut *calls.lock().unwrap());
    assert!(
        !threads.is_empty() && threads.iter().all(|t| Some(t) == me.as_ref()),
        "after shutdown the vCPU serves inline: {threads:?}"
    );
}

#[test]
fn workers_need_one_event_per_queue() {
    let blk =
        VirtioBlk::new(RamDisk::new(1 << 20), BlkConfig { num_queues: 2, ..BlkConfig::default() })
            .unwrap();
    let transport = Arc::new(MmioTransport::new(
        blk,
        guest_ram(),
        Arc::new(CountingLine::default()),
        Trigger::Edge,
    ));
    let err = QueueWorkers::spawn(transport.clone(), events(1)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    let workers = QueueWorkers::spawn(transport, events(2)).unwrap();
    assert_eq!(workers.len(), 2);
}

/// Stands in front of the transport the way KVM does with an ioeventfd
/// registered at QueueNotify: a notify write with datamatch `q` signals
/// event `q` and never reaches the transport.
struct IoEventFd<D: vmio::virtio::VirtioDevice> {
    transport: Arc<MmioTransport<D>>,
    events: Vec<Arc<dyn QueueEvent>>,
    absorbed: AtomicUsize,
}

impl<D: vmio::virtio::VirtioDevice> Device for IoEventFd<D> {
    fn read(&self, access: Access) -> Result<u64, DeviceError> {
        self.transport.read(access)
    }
    fn write(&self, access: Access, value: u64) -> Result<(), DeviceError> {
        if access.offset == QUEUE_NOTIFY
            && let Some(ev) = usize::try_from(value).ok().and_then(|q| self.events.get(q))
        {
            // Relaxed: a counter read after the fact.
            self.absorbed.fetch_add(1, Ordering::Relaxed);
            ev.signal();
            return Ok(());
        }
        self.transport.write(access, value)
    }
}

#[test]
fn ioeventfd_notifies_that_never_reach_the_transport() {
    let rounds = if cfg!(miri) { 4 } else { 50 };
    let (disk, _) = traced(1 << 20);
    let blk = VirtioBlk::new(disk.clone(), BlkConfig::default()).unwrap();
    let line = Arc::new(CountingLine::default());
    let transport = Arc::new(MmioTransport::new(blk, guest_ram(), line, Trigger::Edge));
    let evs = events(1);
    let workers = QueueWorkers::spawn(transport.clone(), evs.clone()).unwrap();
    let front =
        Arc::new(IoEventFd { transport: transport.clone(), events: evs, absorbed: 0.into() });
    let bus = IoBus::<Mmio>::new();
    bus.register(IoRange::new(BASE, 0x200).unwrap(), front.clone()).unwrap();

    let mut driver = VirtIOBlk::<GuestHal, _>::new(BusTransport::new(&bus, BASE, 0)).unwrap();
    write_read_verify(&mut driver, rounds, 0xdef0_1234_5678_9abc);
    assert!(front.absorbed.load(Ordering::Relaxed) > 0, "no notify went through the eventfd");
    drop(driver);
    drop(workers);
}

/// What makes a [`FaultyDisk`] slow: flushes wait at a gate, and the first
/// `parties` reads only complete once that many are inside the backend at
/// once.
struct Slow {
    flush: Gate,
    /// (reads still to meet, reads arrived in this round)
    meet: Mutex<(usize, usize)>,
    met: Condvar,
    inside: AtomicUsize,
    most_inside: AtomicUsize,
}

impl Slow {
    /// The state, and a disk of `size` bytes that obeys it.
    fn disk(size: u64, parties: usize) -> (Arc<FaultyDisk>, Arc<Slow>) {
        let slow = Arc::new(Slow {
            flush: Gate::default(),
            meet: Mutex::new((parties, 0)),
            met: Condvar::new(),
            inside: AtomicUsize::new(0),
            most_inside: AtomicUsize::new(0),
        });
        let state = slow.clone();
        let disk = FaultyDisk::ram(size).on(move |op| match op {
            BackendOp::Read { .. } => state.read(),
            BackendOp::Flush => {
                state.flush.pass();
                Ok(())
            }
            _ => Ok(()),
        });
        (Arc::new(disk), slow)
    }
    fn read(&self) -> Result<(), BackendError> {
        // Relaxed: statistics, read after the threads are joined.
        let now = self.inside.fetch_add(1, Ordering::Relaxed) + 1;
        self.most_inside.fetch_max(now, Ordering::Relaxed);
        let mut m = self.meet.lock().unwrap();
        let mut result = Ok(());
        if m.0 > 0 {
            m.1 += 1;
            if m.1 == m.0 {
                // Everyone is here: the meeting is over for good.
                *m = (0, 0);
                self.met.notify_all();
            } else {
                let (g, r) = self.met.wait_timeout_while(m, TIMEOUT, |m| m.0 > 0).unwrap();
                m = g;
                if r.timed_out() {
                    m.1 -= 1;
                    result = Err(BackendError::Io { op: "no other queue came", os_error: None });
                }
            }
        }
        drop(m);
        self.inside.fetch_sub(1, Ordering::Relaxed);
        result
    }
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// A device that answers every read with a constant.
struct Constant;
impl Device for Constant {
    fn read(&self, _: Access) -> Result<u64, DeviceError> {
        Ok(0x5a)
    }
    fn write(&self, _: Access, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
}

const OTHER: u64 = 0x2000_0000;

/// A bus with a virtio-blk over `disk` at `BASE` and a [`Constant`] at
/// `OTHER`, and one vCPU thread sending a FLUSH that blocks in the backend.
fn flush_blocked(
    disk: Arc<FaultyDisk>,
    slow: &Slow,
    deferred: bool,
) -> (IoBus<Mmio>, vmio::DeviceId, Option<QueueWorkers>, std::thread::JoinHandle<u8>) {
    let blk = VirtioBlk::new(disk.clone(), BlkConfig::default()).unwrap();
    let line = Arc::new(CountingLine::default());
    let transport = Arc::new(MmioTransport::new(blk, guest_ram(), line, Trigger::Edge));
    let workers = deferred.then(|| QueueWorkers::spawn(transport.clone(), events(1)).unwrap());
    let bus = IoBus::<Mmio>::new();
    bus.register(IoRange::new(BASE, 0x200).unwrap(), transport).unwrap();
    let other = bus.register(IoRange::new(OTHER, 0x1000).unwrap(), Arc::new(Constant)).unwrap();
    let (_, queues) = bring_up(&bus, BASE, 1, u64::MAX);
    let q = queues.into_iter().next().unwrap();
    let vcpu = std::thread::spawn(move || {
        let mut q = q.attach();
        q.request(T_FLUSH, 0, &[], &mut []).0
    });
    slow.flush.wait_entered(TIMEOUT, "the flush");
    (bus, other, workers, vcpu)
}

#[test]
fn unplug_and_dispatch_go_on_while_a_worker_flushes() {
    let (disk, slow) = Slow::disk(1 << 20, 0);
    let (bus, other, workers, vcpu) = flush_blocked(disk, &slow, true);

    // vCPUs keep dispatching, to the flushing device too.
    let mut h = bus.handle(7);
    for _ in 0..100 {
        assert_eq!(h.read(OTHER, Width::U32).unwrap(), 0x5a);
        assert_eq!(h.read(BASE, Width::U32).unwrap(), 0x7472_6976, "magic");
        // A notify on the busy queue returns at once (it only signals).
        h.write(BASE + QUEUE_NOTIFY, Width::U32, 0).unwrap();
    }
    drop(h);

    // Unplugging the other device completes while the flush is stuck.
    let unplug = bus.unregister(other).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || tx.send(unplug.wait()).unwrap());
    let waited = rx.recv_timeout(TIMEOUT);
    assert!(
        matches!(waited, Ok(Ok(()))),
        "Unplug::wait held up by a flush on a worker: {waited:?}"
    );
    waiter.join().unwrap();
    assert!(bus.read(OTHER, Width::U32).is_err(), "the other device is gone");

    slow.flush.open();
    assert_eq!(vcpu.join().unwrap(), S_OK, "the flush completed");
    drop(workers);
}

#[test]
fn inline_flush_holds_up_unplug_control() {
    // The same scene served inline: the vCPU is inside the bus's read
    // section for the whole flush, so no unplug on that bus can complete.
    let (disk, slow) = Slow::disk(1 << 20, 0);
    let (bus, other, workers, vcpu) = flush_blocked(disk, &slow, false);
    assert!(workers.is_none());
    let unplug = bus.unregister(other).unwrap();
    for _ in 0..100 {
        assert!(!unplug.poll(), "unplug completed while a vCPU was inside the bus");
    }
    slow.flush.open();
    assert_eq!(vcpu.join().unwrap(), S_OK);
    unplug.wait().unwrap();
}

#[test]
fn unplug_the_device_itself_mid_flush() {
    let (disk, slow) = Slow::disk(1 << 20, 0);
    let (bus, _, workers, vcpu) = flush_blocked(disk, &slow, true);
    let id = bus.lookup(BASE).unwrap().0;
    // Serves run outside the bus: the unplug completes at once...
    bus.unregister(id).unwrap().wait().unwrap();
    // ...and shutting the workers down waits for the flush in progress,
    // which completes and is published (the driver's poll sees it).
    let opener = {
        let slow = slow.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            slow.flush.open();
        })
    };
    workers.unwrap().shutdown();
    opener.join().unwrap();
    assert_eq!(vcpu.join().unwrap(), S_OK, "the flush in flight completed");
}

#[test]
fn two_queues_served_by_two_workers_at_once_match_shadow() {
    const QUEUES: u16 = 2;
    let ops = if cfg!(miri) { 10 } else { 300 };
    // The first read of each queue completes only while the other queue's
    // read is inside the backend too: serialized workers fail the request.
    let (disk, slow) = Slow::disk(2 << 20, usize::from(QUEUES));
    slow.flush.open();
    let sectors = disk.size() as usize / SECTOR_SIZE;
    let config = BlkConfig { num_queues: QUEUES, ..BlkConfig::default() };
    let blk = VirtioBlk::new(disk.clone(), config).unwrap();
    let transport = Arc::new(MmioTransport::new(
        blk,
        guest_ram(),
        Arc::new(CountingLine::default()),
        Trigger::Edge,
    ));
    let workers = QueueWorkers::spawn(transport.clone(), events(QUEUES)).unwrap();
    let bus = IoBus::<Mmio>::new();
    bus.register(IoRange::new(BASE, 0x200).unwrap(), transport).unwrap();
    let (_, queues) = bring_up(&bus, BASE, QUEUES, u64::MAX);

    // Each vCPU owns half the disk: its shadow is exact.
    let half = sectors / usize::from(QUEUES);
    let threads: Vec<_> = queues
        .into_iter()
        .map(|q| {
            std::thread::spawn(move || {
                let mut q = q.attach();
                let base = usize::from(q.index()) * half;
                let mut shadow = vec![0u8; half * SECTOR_SIZE];
                let mut rng = Rng::new(0x5eed ^ u64::from(q.index()));
                let mut first = vec![0u8; SECTOR_SIZE];
                let (status, _) = q.request(T_IN, base as u64, &[], &mut first);
                assert_eq!(status, S_OK, "queue {}: the two queues never ran at once", q.index());
                for op in 0..ops {
                    let n = 1 + rng.below(16) as usize;
                    let start = rng.below((half - n) as u64) as usize;
                    let what = format!("queue {} op {op}", q.index());
                    if rng.below(2) == 0 {
                        let data: Vec<u8> =
                            (0..n * SECTOR_SIZE).map(|_| rng.next() as u8).collect();
                        let (s, _) = q.request(T_OUT, (base + start) as u64, &data, &mut []);
                        assert_eq!(s, S_OK, "{what}");
                        shadow[start * SECTOR_SIZE..(start + n) * SECTOR_SIZE]
                            .copy_from_slice(&data);
                    } else {
                        let mut back = vec![0u8; n * SECTOR_SIZE];
                        let (s, _) = q.request(T_IN, (base + start) as u64, &[], &mut back);
                        assert_eq!(s, S_OK, "{what}");
                        assert!(
                            back[..] == shadow[start * SECTOR_SIZE..(start + n) * SECTOR_SIZE],
                            "{what}: read differs from the shadow"
                        );
                    }
                }
                (base, shadow)
            })
        })
        .collect();
    let shadows: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(slow.most_inside.load(Ordering::Relaxed), 2, "the workers never overlapped");
    for (base, shadow) in shadows {
        let mut on_disk = vec![0u8; shadow.len()];
        disk.read_at((base * SECTOR_SIZE) as u64, &mut on_disk).unwrap();
        assert!(on_disk == shadow, "backend differs from the shadow of sectors {base}..");
    }
    workers.shutdown();
}
