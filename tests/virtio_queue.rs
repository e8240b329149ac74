//! Every hostile ring, once against a bare `SplitQueue` and once against a
//! device behind the virtio-mmio transport: no panic, no write outside the
//! used ring, the chain rejected or the device in DEVICE_NEEDS_RESET, and a
//! well-formed request working afterwards.

use std::sync::{Arc, Mutex};

use vmio::testing::RecordingIrq;
use vmio::testing::{
    Buf, DirectIo, EchoDevice, Expect, GuestQueue, Hostile, HostileEnv, InitOptions, MmioDriver,
};
use vmio::virtio::QueueArea;
use vmio::virtio::spec::features::{
    VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use vmio::virtio::spec::interrupt::CONFIG_CHANGE as INT_CONFIG_CHANGE;
use vmio::virtio::spec::status::DEVICE_NEEDS_RESET;
use vmio::virtio::{ChainError, MmioTransport, PopError, QueueError, SplitQueue, Trigger};
use vmio::{GuestMemory, GuestRam, MemoryError};

const RAM_END: u64 = 0x10_0000;
const QBASE: u64 = 0x1000;
const QSIZE: u16 = 16;
const ENV: HostileEnv = HostileEnv { scratch: 0x8000, ram_end: RAM_END };

/// Guest memory that records every write the device makes.
struct Watched {
    ram: GuestRam,
    writes: Mutex<Vec<(u64, u64)>>,
}

impl Watched {
    fn new() -> Self {
        Watched { ram: GuestRam::new(0, RAM_END).unwrap(), writes: Mutex::new(Vec::new()) }
    }
    fn assert_writes_within(&self, start: u64, len: u64) {
        for &(a, l) in self.writes.lock().unwrap().iter() {
            assert!(a >= start && a + l <= start + len, "device wrote {l} bytes at {a:#x}");
        }
    }
}

impl GuestMemory for Watched {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.ram.read(addr, buf)
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.writes.lock().unwrap().push((addr, data.len() as u64));
        self.ram.write(addr, data)
    }
    fn check(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        self.ram.check(addr, len)
    }
}

fn features(case: Hostile) -> u64 {
    let ind = if case.needs_indirect() { VIRTIO_F_INDIRECT_DESC } else { 0 };
    VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | ind
}

/// A well-formed chain goes through pop and push.
fn round_trip(mem: &Watched, gq: &mut GuestQueue, q: &mut SplitQueue) {
    let h = gq.add(&mem.ram, &[Buf::readable(0x9000, 8), Buf::writable(0xa000, 8)]).unwrap();
    let c = q.pop(mem).unwrap().expect("a chain");
    assert_eq!(c.head(), h);
    assert_eq!((c.readable_len(), c.writable_len()), (8, 8));
    q.push(mem, h, 8).unwrap();
    assert_eq!(gq.pop_used(&mem.ram).unwrap(), Some((u32::from(h), 8)));
}

fn against_queue(case: Hostile) {
    let mem = Watched::new();
    let mut gq = GuestQueue::new(QSIZE, QBASE);
    gq.init(&mem.ram).unwrap();
    let mut q = SplitQueue::new(gq.config(), features(case), &mem).unwrap();
    round_trip(&mem, &mut gq, &mut q);
    let expect = case.build(&mem.ram, &mut gq, ENV).unwrap();
    mem.writes.lock().unwrap().clear();
    match expect {
        Expect::Rejected { head, error } => {
            assert_eq!(q.pop(&mem), Err(PopError::Chain { head, error }));
            assert_eq!(q.in_flight(), 1);
            q.push(&mem, head, 0).unwrap();
            assert_eq!(gq.pop_used(&mem.ram).unwrap(), Some((u32::from(head), 0)));
            assert_eq!(q.pop(&mem), Ok(None));
            round_trip(&mem, &mut gq, &mut q);
        }
        Expect::Broken { good_first, error } => {
            for _ in 0..good_first {
                q.pop(&mem).unwrap().expect("a well-formed chain first");
            }
            assert_eq!(q.pop(&mem), Err(PopError::Queue(error)));
            assert!(q.is_broken());
            assert_eq!(q.pop(&mem), Err(PopError::Queue(QueueError::Broken)));
            assert_eq!(q.needs_interrupt(&mem), Err(QueueError::Broken));
            assert_eq!(q.enable_notification(&mem), Err(QueueError::Broken));
            // A reset (fresh rings, fresh queue) works again.
            gq.init(&mem.ram).unwrap();
            q = SplitQueue::new(gq.config(), features(case), &mem).unwrap();
            round_trip(&mem, &mut gq, &mut q);
        }
    }
    let used = gq.config().used_ring;
    mem.assert_writes_within(used, QueueArea::Used.len(QSIZE));
}

fn against_device(case: Hostile) {
    let ram = Arc::new(GuestRam::new(0, RAM_END).unwrap());
    let line = Arc::new(RecordingIrq::new());
    let dev = MmioTransport::new(EchoDevice::new(1), ram.clone(), line, Trigger::Edge);
    let mut drv = MmioDriver::new(DirectIo(&dev));
    let opts = InitOptions { features: features(case), ack_and_driver_together: false };
    drv.init(&*ram, opts, &[(0, QSIZE, QBASE)]).unwrap();
    let good = [Buf::readable(0x9000, 8), Buf::writable(0xa000, 8)];
    let h = drv.submit(&*ram, 0, &good).unwrap();
    assert_eq!(drv.queue(0).pop_used(&*ram).unwrap(), Some((u32::from(h), 8)));
    drv.ack_interrupt().unwrap();
    let expect = case.build(&*ram, drv.queue(0), ENV).unwrap();
    drv.notify(0).unwrap();
    match expect {
        Expect::Rejected { head, error } => {
            assert_eq!(drv.queue(0).pop_used(&*ram).unwrap(), Some((u32::from(head), 0)));
            assert_eq!(dev.device().rejected(), 1);
            assert_eq!(dev.device().last_error(), Some(PopError::Chain { head, error }));
            assert_eq!(drv.status().unwrap() & DEVICE_NEEDS_RESET, 0);
        }
        // The echo device serves with the same loop as virtio-blk: a head
        // repeated before its completion was written is caught in flight.
        Expect::Broken { error, .. } => {
            assert_ne!(drv.status().unwrap() & DEVICE_NEEDS_RESET, 0);
            assert_ne!(drv.ack_interrupt().unwrap() & INT_CONFIG_CHANGE, 0);
            assert_eq!(dev.device().last_error(), Some(PopError::Queue(error)));
            // Further notifies are harmless.
            drv.notify(0).unwrap();
            drv.init(&*ram, opts, &[(0, QSIZE, QBASE)]).unwrap();
        }
    }
    let h = drv.submit(&*ram, 0, &good).unwrap();
    assert_eq!(drv.queue(0).pop_used(&*ram).unwrap(), Some((u32::from(h), 8)));
}

macro_rules! hostile_tests {
    ($($name:ident => $case:ident,)*) => {
        $(
            #[test]
            fn $name() {
                against_queue(Hostile::$case);
                against_device(Hostile::$case);
            }
        )*

        #[test]
        fn every_case_has_a_test() {
            let tested = [$(Hostile::$case),*];
            for c in Hostile::ALL {
                assert!(tested.contains(c), "{c:?} has no test");
            }
        }
    };
}

hostile_tests! {
    next_index_out_of_range => NextOutOfRange,
    two_descriptor_loop => Loop,
    descriptor_chained_to_itself => SelfLoop,
    zero_length_descriptor => ZeroLength,
    huge_descriptor_length => HugeLength,
    buffer_one_byte_past_end_of_ram => PastEndOfRam,
    buffer_address_overflow => AddressOverflow,
    readable_after_writable => ReadableAfterWritable,
    indirect_not_negotiated => IndirectNotNegotiated,
    indirect_with_next => IndirectWithNext,
    nested_indirect => NestedIndirect,
    indirect_length_not_multiple_of_16 => IndirectLenNotMultiple,
    indirect_length_zero => IndirectLenZero,
    indirect_table_overflowing_the_sg_list => IndirectTooManySegments,
    loop_inside_indirect_table => IndirectLoop,
    next_past_indirect_table => IndirectNextOutOfRange,
    indirect_table_outside_ram => IndirectTableOutsideRam,
    avail_index_jumps_ahead => AvailIndexJump,
    avail_index_goes_backwards => AvailIndexBackwards,
    head_out_of_range => HeadOutOfRange,
    head_made_available_twice_while_in_flight => HeadInFlight,
}

/// Memory that claims 1 TiB of RAM for bounds checks (reads of unbacked
/// bytes return zeros): lets a chain add up past 4 GiB with every buffer
/// "inside" memory, so the length check itself is what must refuse it.
struct Sparse(GuestRam);

impl GuestMemory for Sparse {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.0.read(addr, buf).or_else(|_| {
            buf.fill(0);
            Ok(())
        })
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.0.write(addr, data)
    }
    fn check(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        match addr.checked_add(len) {
            Some(end) if end <= 1 << 40 => Ok(()),
            _ => Err(MemoryError::OutOfBounds { addr, len }),
        }
    }
}

#[test]
fn total_length_over_4_gib() {
    let mem = Sparse(GuestRam::new(0, RAM_END).unwrap());
    let mut gq = GuestQueue::new(QSIZE, QBASE);
    gq.init(&mem.0).unwrap();
    let mut q = SplitQueue::new(gq.config(), 0, &mem).unwrap();
    let big = 0x8000_0000;
    let head = gq
        .add(
            &mem.0,
            &[Buf::readable(1 << 32, big), Buf::writable(1 << 33, big), Buf::writable(0x9000, 1)],
        )
        .unwrap();
    assert_eq!(q.pop(&mem), Err(PopError::Chain { head, error: ChainError::LengthOverflow }));
    q.push(&mem, head, 0).unwrap();
    // Exactly u32::MAX in total is fine.
    let h =
        gq.add(&mem.0, &[Buf::readable(1 << 32, big), Buf::writable(1 << 33, big - 1)]).unwrap();
    let c = q.pop(&mem).unwrap().unwrap();
    assert_eq!((c.head(), c.readable_len(), c.writable_len()), (h, big, big - 1));
}

#[test]
fn head_only_chain_is_returned() {
    // A chain with nothing to write into still goes back to the driver.
    let ram = Arc::new(GuestRam::new(0, RAM_END).unwrap());
    let dev = MmioTransport::new(
        EchoDevice::new(1),
        ram.clone(),
        Arc::new(RecordingIrq::new()),
        Trigger::Edge,
    );
    let mut drv = MmioDriver::new(DirectIo(&dev));
    let opts = InitOptions { features: features(Hostile::Loop), ack_and_driver_together: false };
    drv.init(&*ram, opts, &[(0, QSIZE, QBASE)]).unwrap();
    let h = drv.submit(&*ram, 0, &[Buf::readable(0x9000, 16)]).unwrap();
    assert_eq!(drv.queue(0).pop_used(&*ram).unwrap(), Some((u32::from(h), 0)));
}

#[test]
fn outstanding_requests_are_bounded_by_queue_size() {
    let mem = Watched::new();
    let mut gq = GuestQueue::new(4, QBASE);
    gq.init(&mem.ram).unwrap();
    let mut q = SplitQueue::new(gq.config(), 0, &mem).unwrap();
    let mut heads = Vec::new();
    for _ in 0..4 {
        heads.push(gq.add(&mem.ram, &[Buf::writable(0x9000, 4)]).unwrap());
        q.pop(&mem).unwrap().unwrap();
    }
    assert_eq!(q.in_flight(), 4);
    // The driver re-offers a head without waiting: the queue stops instead
    // of tracking a fifth request.
    gq.put_avail(&mem.ram, heads[0]).unwrap();
    gq.publish(&mem.ram).unwrap();
    assert_eq!(q.pop(&mem), Err(PopError::Queue(QueueError::HeadInFlight { head: heads[0] })));
}

#[test]
fn spurious_notifications_are_harmless() {
    let ram = Arc::new(GuestRam::new(0, RAM_END).unwrap());
    let dev = MmioTransport::new(
        EchoDevice::new(1),
        ram.clone(),
        Arc::new(RecordingIrq::new()),
        Trigger::Edge,
    );
    let mut drv = MmioDriver::new(DirectIo(&dev));
    let opts = InitOptions { features: features(Hostile::Loop), ack_and_driver_together: false };
    drv.init(&*ram, opts, &[(0, QSIZE, QBASE)]).unwrap();
    for _ in 0..100 {
        drv.notify(0).unwrap();
    }
    assert_eq!(dev.device().completed(), 0);
    let h = drv.submit(&*ram, 0, &[Buf::readable(0x9000, 4), Buf::writable(0xa000, 4)]).unwrap();
    assert_eq!(drv.queue(0).pop_used(&*ram).unwrap(), Some((u32::from(h), 4)));
}
