//! EVENT_IDX under real concurrency: a driver thread that notifies only when
//! the device asked (`avail_event`) and sleeps until an interrupt it asked
//! for (`used_event`), against a device thread that sleeps until notified
//! and interrupts only when the driver asked. A lost notification or a lost
//! interrupt stalls one side; every wait has a timeout, so that fails the
//! test instead of hanging it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use vmio::IrqLine;
use vmio::testing::{Buf, DirectIo, InitOptions, MmioDriver};
use vmio::virtio::features::{VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1};
use vmio::virtio::{
    ActivateError, Activation, Chain, GuestMemory, GuestRam, Interrupt, InterruptCause,
    MmioTransport, SplitQueue, Trigger, VirtioDevice,
};

const RAM_SIZE: u64 = 0x10_0000;
const TIMEOUT: Duration = Duration::from_secs(20);

/// A level that one side sets and the other waits for.
#[derive(Default)]
struct Signal {
    count: Mutex<u64>,
    cv: Condvar,
}

impl Signal {
    fn post(&self) {
        *self.count.lock().unwrap() += 1;
        self.cv.notify_all();
    }
    /// Waits until the count passes `seen`; false on timeout.
    fn wait_past(&self, seen: u64) -> bool {
        let g = self.count.lock().unwrap();
        let (g, r) = self.cv.wait_timeout_while(g, TIMEOUT, |c| *c <= seen).unwrap();
        drop(g);
        !r.timed_out()
    }
    fn now(&self) -> u64 {
        *self.count.lock().unwrap()
    }
}

struct Line(Arc<Signal>);
impl IrqLine for Line {
    fn pulse(&self) {
        self.0.post();
    }
}

struct Ctx {
    queue: SplitQueue,
    mem: Arc<dyn GuestMemory>,
    irq: Arc<dyn Interrupt>,
}

/// Notify only wakes the worker; the worker serves the queue.
#[derive(Default)]
struct Threaded {
    ctx: Mutex<Option<Ctx>>,
    kick: Signal,
    served: AtomicU64,
}

impl VirtioDevice for Threaded {
    fn device_type(&self) -> u32 {
        0x7e57
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
    }
    fn num_queues(&self) -> u16 {
        1
    }
    fn max_queue_size(&self, _: u16) -> u16 {
        64
    }
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&self, _: u64, _: &[u8]) {}
    fn activate(&self, a: Activation) -> Result<(), ActivateError> {
        let queue = a.queues.into_iter().next().flatten().ok_or(ActivateError::MissingQueue(0))?;
        *self.ctx.lock().unwrap() = Some(Ctx { queue, mem: a.memory, irq: a.interrupt });
        Ok(())
    }
    fn serve(&self, _: u16, _: &vmio::virtio::QueueStop) {
        self.kick.post();
    }
    fn reset(&self) {
        *self.ctx.lock().unwrap() = None;
    }
}

impl Threaded {
    /// Serves everything available; echoes the first readable u64 into the
    /// writable buffer, +1.
    fn serve(&self) {
        let mut guard = self.ctx.lock().unwrap();
        let ctx = guard.as_mut().expect("active");
        let mem = &*ctx.mem;
        let mut c = Chain::new();
        loop {
            while ctx.queue.pop_into(mem, &mut c).unwrap() {
                let mut b = [0u8; 8];
                c.read_at(mem, 0, &mut b).unwrap();
                let v = u64::from_le_bytes(b) + 1;
                c.write_at(mem, 0, &v.to_le_bytes()).unwrap();
                ctx.queue.push(mem, c.head(), 8).unwrap();
                self.served.fetch_add(1, Ordering::Relaxed);
            }
            if !ctx.queue.enable_notification(mem).unwrap() {
                break;
            }
        }
        if ctx.queue.needs_interrupt(mem).unwrap() {
            ctx.irq.raise(InterruptCause::UsedBuffer { queue: 0 });
        }
    }
}

#[test]
fn no_lost_notification_or_interrupt() {
    let total: u64 = if cfg!(miri) { 50 } else { 20_000 };
    let ram = Arc::new(GuestRam::new(0, RAM_SIZE).unwrap());
    let irq = Arc::new(Signal::default());
    let dev = Arc::new(MmioTransport::new(
        Threaded::default(),
        ram.clone(),
        Arc::new(Line(irq.clone())),
        Trigger::Edge,
    ));
    let mut drv = MmioDriver::new(DirectIo(&*dev));
    let opts = InitOptions {
        features: VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX,
        ack_and_driver_together: false,
    };
    drv.init(&*ram, opts, &[(0, 64, 0x1000)]).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (dev, stop) = (dev.clone(), stop.clone());
        thread::spawn(move || {
            let d = dev.device();
            let mut seen = 0;
            while !stop.load(Ordering::Acquire) {
                if !d.kick.wait_past(seen) {
                    continue; // the driver may simply be done
                }
                seen = d.kick.now();
                d.serve();
            }
        })
    };

    let mem = &*ram;
    let (mut sent, mut reaped) = (0u64, 0u64);
    // Slot i's buffers: request at 0x10000 + 16 i, response 8 bytes after.
    let mut slot_of_head = [0u64; 64];
    while reaped < total {
        // Fill the ring (each chain takes 2 descriptors).
        while sent < total && drv.queue(0).free_descriptors() >= 2 {
            let slot = sent % 32;
            let req = 0x10000 + 16 * slot;
            mem.write_u64(req, sent).unwrap();
            let head =
                drv.submit(mem, 0, &[Buf::readable(req, 8), Buf::writable(req + 8, 8)]).unwrap();
            slot_of_head[usize::from(head)] = slot;
            sent += 1;
        }
        // Sleep until an interrupt we asked for, unless work is already there.
        let before = irq.now();
        if !drv.queue(0).arm_interrupt(mem).unwrap() {
            assert!(
                irq.wait_past(before),
                "lost interrupt or notification: sent {sent}, reaped {reaped}, served {}",
                dev.device().served.load(Ordering::Relaxed)
            );
        }
        drv.ack_interrupt().unwrap();
        while let Some((head, len)) = drv.queue(0).pop_used(mem).unwrap() {
            assert_eq!(len, 8);
            let req = 0x10000 + 16 * slot_of_head[head as usize];
            let v = mem.read_u64(req + 8).unwrap();
            assert_eq!(v, mem.read_u64(req).unwrap() + 1);
            reaped += 1;
        }
    }
    stop.store(true, Ordering::Release);
    dev.device().kick.post();
    worker.join().unwrap();
    assert_eq!(dev.device().served.load(Ordering::Relaxed), total);
    // The driver asked for an interrupt once per wait, and each wait reaped
    // a batch: far fewer interrupts than requests.
    let interrupts = irq.now();
    assert!(interrupts < total, "{interrupts} interrupts for {total} requests");
}
