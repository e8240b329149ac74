//! The virtio-mmio transport register by register, its status machine and
//! reset, and a device brought up through a bus the way Linux does it.

use std::sync::Arc;

use vmio::testing::{
    Buf, BusIo, DirectIo, ECHO_DEVICE_TYPE, EchoDevice, GuestQueue, InitOptions, MmioDriver,
};
use vmio::virtio::features::{VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1};
use vmio::virtio::mmio::{MAGIC_VALUE, regs};
use vmio::virtio::status::{
    ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,
};
use vmio::virtio::{
    GuestMemory, GuestRam, INT_CONFIG_CHANGE, INT_USED_BUFFER, MmioTransport, QueueConfig,
    RecordingIrq, Trigger,
};
use vmio::{Access, Device, DeviceError, IoBus, IoRange, Mmio, Width};

const RAM: u64 = 0x4000_0000;
const RAM_SIZE: u64 = 0x10_0000;
const ALL: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX;

struct Rig {
    ram: Arc<GuestRam>,
    line: Arc<RecordingIrq>,
    dev: Arc<MmioTransport<EchoDevice>>,
}

fn rig_with(queues: u16, trigger: Trigger) -> Rig {
    let ram = Arc::new(GuestRam::new(RAM, RAM_SIZE).unwrap());
    let line = Arc::new(RecordingIrq::new());
    let dev =
        Arc::new(MmioTransport::new(EchoDevice::new(queues), ram.clone(), line.clone(), trigger));
    Rig { ram, line, dev }
}

fn rig() -> Rig {
    rig_with(2, Trigger::Edge)
}

fn acc(offset: u64, width: Width) -> Access {
    Access { offset, addr: 0x1000_0000 + offset, width, vcpu: Some(0) }
}

fn rd(d: &dyn Device, off: u64) -> u32 {
    d.read(acc(off, Width::U32)).unwrap() as u32
}

fn wr(d: &dyn Device, off: u64, v: u32) {
    d.write(acc(off, Width::U32), u64::from(v)).unwrap()
}

const fn opts(features: u64) -> InitOptions {
    InitOptions { features, ack_and_driver_together: false }
}

#[test]
fn identity_and_read_only_registers() {
    let r = rig();
    let d = &*r.dev;
    assert_eq!(rd(d, regs::MAGIC_VALUE), MAGIC_VALUE);
    assert_eq!(rd(d, regs::VERSION), 2);
    assert_eq!(rd(d, regs::DEVICE_ID), ECHO_DEVICE_TYPE);
    assert_eq!(rd(d, regs::VENDOR_ID), 0);
    wr(d, regs::DEVICE_FEATURES_SEL, 0);
    assert_eq!(rd(d, regs::DEVICE_FEATURES), ALL as u32);
    wr(d, regs::DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(d, regs::DEVICE_FEATURES), (ALL >> 32) as u32);
    wr(d, regs::DEVICE_FEATURES_SEL, 2);
    assert_eq!(rd(d, regs::DEVICE_FEATURES), 0);
    wr(d, regs::QUEUE_SEL, 1);
    assert_eq!(rd(d, regs::QUEUE_NUM_MAX), 256);
    assert_eq!(rd(d, regs::QUEUE_READY), 0);
    for sel in [2, 0xffff, 0xffff_ffff] {
        wr(d, regs::QUEUE_SEL, sel);
        assert_eq!(rd(d, regs::QUEUE_NUM_MAX), 0, "queue {sel} does not exist");
        assert_eq!(rd(d, regs::QUEUE_READY), 0);
    }
    // No shared memory regions, whatever is selected.
    wr(d, regs::SHM_SEL, 3);
    for reg in [regs::SHM_LEN_LOW, regs::SHM_LEN_HIGH, regs::SHM_BASE_LOW, regs::SHM_BASE_HIGH] {
        assert_eq!(rd(d, reg), u32::MAX);
    }
    assert_eq!(rd(d, regs::QUEUE_RESET), 0);
    assert_eq!(rd(d, regs::INTERRUPT_STATUS), 0);
    assert_eq!(rd(d, regs::STATUS), 0);
    assert_eq!(rd(d, regs::CONFIG_GENERATION), 0);
    // Read-only registers refuse writes and keep their value.
    for reg in [regs::MAGIC_VALUE, regs::VERSION, regs::DEVICE_ID, regs::QUEUE_NUM_MAX] {
        assert_eq!(d.write(acc(reg, Width::U32), 5), Err(DeviceError::ReadOnly));
    }
    assert_eq!(rd(d, regs::MAGIC_VALUE), MAGIC_VALUE);
    // Write-only registers refuse reads.
    for reg in [regs::QUEUE_NOTIFY, regs::QUEUE_DESC_LOW, regs::DRIVER_FEATURES, regs::QUEUE_SEL] {
        assert_eq!(d.read(acc(reg, Width::U32)), Err(DeviceError::WriteOnly));
    }
}

#[test]
fn wrong_widths_and_offsets_are_refused() {
    let r = rig();
    let d = &*r.dev;
    for w in [Width::U8, Width::U16, Width::U64] {
        assert_eq!(d.read(acc(regs::MAGIC_VALUE, w)), Err(DeviceError::InvalidWidth(w)));
        assert_eq!(d.write(acc(regs::STATUS, w), 1), Err(DeviceError::InvalidWidth(w)));
    }
    assert!(d.read(acc(0x001, Width::U32)).is_err());
    assert!(d.write(acc(0x072, Width::U32), 1).is_err());
    for off in [0x018, 0x03c, 0x0f0, 0x0f8] {
        assert_eq!(d.read(acc(off, Width::U32)), Err(DeviceError::InvalidOffset(off)));
        assert_eq!(d.write(acc(off, Width::U32), 1), Err(DeviceError::InvalidOffset(off)));
    }
    assert_eq!(rd(d, regs::STATUS), 0, "nothing refused changed the status");
    // Config space: 8-, 16-, 32-bit aligned only.
    assert_eq!(d.read(acc(0x100, Width::U64)), Err(DeviceError::InvalidWidth(Width::U64)));
    assert!(d.read(acc(0x101, Width::U16)).is_err());
    assert!(d.read(acc(0x102, Width::U32)).is_err());
    assert_eq!(d.read(acc(0x101, Width::U8)).unwrap(), u64::from(b'm'));
    assert_eq!(d.read(acc(0x102, Width::U16)).unwrap(), u64::from(u16::from_le_bytes(*b"io")));
    assert!(d.write(acc(0x108, Width::U64), 1).is_err());
}

#[test]
fn config_space_reads_writes_and_bounds() {
    let r = rig();
    let drv = MmioDriver::new(DirectIo(&*r.dev));
    assert_eq!(drv.read_config(0, Width::U32).unwrap(), u64::from(u32::from_le_bytes(*b"vmio")));
    // Read-only bytes ignore writes; writable ones keep them.
    drv.write_config(0, Width::U32, 0x1234_5678).unwrap();
    assert_eq!(drv.read_config(0, Width::U32).unwrap(), u64::from(u32::from_le_bytes(*b"vmio")));
    drv.write_config(8, Width::U32, 0xdead_beef).unwrap();
    drv.write_config(14, Width::U16, 0xcafe).unwrap();
    assert_eq!(drv.read_config(8, Width::U32).unwrap(), 0xdead_beef);
    assert_eq!(drv.read_config_u64(8).unwrap(), 0xcafe_0000_dead_beef);
    // Past the end: zeros, at the very end of a big window too.
    assert_eq!(drv.read_config(16, Width::U32).unwrap(), 0);
    assert_eq!(drv.read_config(0xefc, Width::U32).unwrap(), 0);
    drv.write_config(0xefc, Width::U32, 1).unwrap();
}

#[test]
fn status_accepts_several_bits_in_one_write() {
    let r = rig();
    let mut drv = MmioDriver::new(DirectIo(&*r.dev));
    let f = drv
        .init(
            &*r.ram,
            InitOptions { features: ALL, ack_and_driver_together: true },
            &[(0, 16, RAM)],
        )
        .unwrap();
    assert_eq!(f, ALL);
    assert_eq!(drv.status().unwrap(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(r.dev.is_active());
}

#[test]
fn features_ok_refused_for_unoffered_or_missing_version_1() {
    let r = rig();
    let drv = MmioDriver::new(DirectIo(&*r.dev));
    let d = &*r.dev;
    // An unoffered feature (bit 0) accepted.
    wr(d, regs::STATUS, ACKNOWLEDGE | DRIVER);
    drv.write_driver_features(ALL | 1).unwrap();
    wr(d, regs::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(d, regs::STATUS), ACKNOWLEDGE | DRIVER, "FEATURES_OK refused");
    // A feature in a window past bit 63.
    wr(d, regs::STATUS, 0);
    wr(d, regs::STATUS, ACKNOWLEDGE | DRIVER);
    drv.write_driver_features(VIRTIO_F_VERSION_1).unwrap();
    wr(d, regs::DRIVER_FEATURES_SEL, 2);
    wr(d, regs::DRIVER_FEATURES, 1);
    wr(d, regs::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(d, regs::STATUS) & FEATURES_OK, 0);
    // Without VERSION_1 (a legacy driver on a modern-only transport).
    wr(d, regs::STATUS, 0);
    wr(d, regs::STATUS, ACKNOWLEDGE | DRIVER);
    drv.write_driver_features(VIRTIO_F_INDIRECT_DESC).unwrap();
    wr(d, regs::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(d, regs::STATUS) & FEATURES_OK, 0);
    // Out of order: FEATURES_OK before DRIVER.
    wr(d, regs::STATUS, 0);
    drv.write_driver_features(VIRTIO_F_VERSION_1).unwrap();
    wr(d, regs::STATUS, ACKNOWLEDGE | FEATURES_OK);
    assert_eq!(rd(d, regs::STATUS), ACKNOWLEDGE);
    // And accepted when all is right; features are then frozen.
    wr(d, regs::STATUS, 0);
    wr(d, regs::STATUS, ACKNOWLEDGE | DRIVER);
    drv.write_driver_features(VIRTIO_F_VERSION_1).unwrap();
    wr(d, regs::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(d, regs::STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    drv.write_driver_features(ALL | 1).unwrap();
    assert_eq!(r.dev.driver_features(), VIRTIO_F_VERSION_1);
}

#[test]
fn status_bits_cannot_be_cleared_and_driver_ok_needs_features_ok() {
    let r = rig();
    let d = &*r.dev;
    wr(d, regs::STATUS, ACKNOWLEDGE | DRIVER);
    wr(d, regs::STATUS, ACKNOWLEDGE);
    assert_eq!(rd(d, regs::STATUS), ACKNOWLEDGE | DRIVER, "clearing a bit is ignored");
    // DEVICE_NEEDS_RESET is the device's to set.
    wr(d, regs::STATUS, ACKNOWLEDGE | DRIVER | DEVICE_NEEDS_RESET);
    assert_eq!(rd(d, regs::STATUS), ACKNOWLEDGE | DRIVER);
    wr(d, regs::STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert_eq!(rd(d, regs::STATUS), ACKNOWLEDGE | DRIVER | DEVICE_NEEDS_RESET);
    assert!(!r.dev.is_active());
    wr(d, regs::STATUS, 0);
    assert_eq!(rd(d, regs::STATUS), 0, "reset clears DEVICE_NEEDS_RESET");
    wr(d, regs::STATUS, ACKNOWLEDGE | DRIVER | FAILED);
    assert_eq!(rd(d, regs::STATUS), ACKNOWLEDGE | DRIVER | FAILED);
}

#[test]
fn reset_clears_queues_interrupts_and_features() {
    let r = rig();
    let mut drv = MmioDriver::new(DirectIo(&*r.dev));
    drv.init(&*r.ram, opts(ALL), &[(0, 16, RAM), (1, 8, RAM + 0x1000)]).unwrap();
    drv.submit(&*r.ram, 0, &[Buf::readable(RAM + 0x8000, 4), Buf::writable(RAM + 0x9000, 4)])
        .unwrap();
    assert_eq!(rd(&*r.dev, regs::INTERRUPT_STATUS), INT_USED_BUFFER);
    let d = &*r.dev;
    wr(d, regs::STATUS, 0);
    assert_eq!(rd(d, regs::STATUS), 0);
    assert_eq!(rd(d, regs::INTERRUPT_STATUS), 0);
    assert_eq!(r.dev.driver_features(), 0);
    assert!(!r.dev.is_active());
    for q in 0..2 {
        wr(d, regs::QUEUE_SEL, q);
        assert_eq!(rd(d, regs::QUEUE_READY), 0);
        assert!(!r.dev.device().queue_active(q as u16));
    }
    // Notifies after a reset reach nothing.
    let before = r.dev.device().completed();
    drv.notify(0).unwrap();
    assert_eq!(r.dev.device().completed(), before);
    // And the device comes up again from scratch.
    drv.init(&*r.ram, opts(ALL), &[(0, 16, RAM)]).unwrap();
    let h = drv
        .submit(&*r.ram, 0, &[Buf::readable(RAM + 0x8000, 4), Buf::writable(RAM + 0x9000, 4)])
        .unwrap();
    assert_eq!(drv.queue(0).pop_used(&*r.ram).unwrap(), Some((u32::from(h), 4)));
}

#[test]
fn queues_are_not_touched_before_driver_ok() {
    let r = rig();
    let mut drv = MmioDriver::new(DirectIo(&*r.dev));
    drv.negotiate(opts(ALL)).unwrap();
    drv.setup_queue(&*r.ram, 0, 16, RAM).unwrap();
    let h = drv
        .queue(0)
        .add(&*r.ram, &[Buf::readable(RAM + 0x8000, 2), Buf::writable(RAM + 0x9000, 2)])
        .unwrap();
    let used_before = r.ram.read_u32(drv.queue(0).config().used_ring).unwrap();
    drv.notify(0).unwrap();
    assert_eq!(r.dev.device().completed(), 0);
    assert_eq!(r.ram.read_u32(drv.queue(0).config().used_ring).unwrap(), used_before);
    drv.driver_ok().unwrap();
    drv.notify(0).unwrap();
    assert_eq!(drv.queue(0).pop_used(&*r.ram).unwrap(), Some((u32::from(h), 2)));
}

#[test]
fn queue_registers_freeze_once_ready_and_after_driver_ok() {
    let r = rig();
    let mut drv = MmioDriver::new(DirectIo(&*r.dev));
    drv.negotiate(opts(ALL)).unwrap();
    drv.setup_queue(&*r.ram, 0, 16, RAM).unwrap();
    let d = &*r.dev;
    // Rewriting the size or an address of a ready queue changes nothing.
    wr(d, regs::QUEUE_SEL, 0);
    wr(d, regs::QUEUE_NUM, 3);
    wr(d, regs::QUEUE_DESC_LOW, 0x1234);
    drv.driver_ok().unwrap();
    // Setting up queue 1 after DRIVER_OK serves nothing (no RING_RESET),
    // but the register reads back what was written (4.2.2.1).
    wr(d, regs::QUEUE_SEL, 1);
    wr(d, regs::QUEUE_READY, 1);
    assert_eq!(rd(d, regs::QUEUE_READY), 1);
    assert!(!r.dev.queue_live(1), "a queue unused at DRIVER_OK stays unused");
    assert!(r.dev.queue_live(0));
    let h = drv
        .submit(&*r.ram, 0, &[Buf::readable(RAM + 0x8000, 2), Buf::writable(RAM + 0x9000, 2)])
        .unwrap();
    assert_eq!(drv.queue(0).pop_used(&*r.ram).unwrap(), Some((u32::from(h), 2)));
}

#[test]
fn invalid_queue_setup_sets_needs_reset() {
    let bad = [
        QueueConfig { size: 12, desc_table: RAM, avail_ring: RAM + 0x400, used_ring: RAM + 0x800 },
        QueueConfig {
            size: 512,
            desc_table: RAM,
            avail_ring: RAM + 0x2000,
            used_ring: RAM + 0x3000,
        },
        QueueConfig {
            size: 16,
            desc_table: RAM + 8,
            avail_ring: RAM + 0x400,
            used_ring: RAM + 0x800,
        },
        QueueConfig { size: 16, desc_table: RAM, avail_ring: RAM + 0x401, used_ring: RAM + 0x800 },
        QueueConfig { size: 16, desc_table: RAM, avail_ring: RAM + 0x400, used_ring: RAM + 0x802 },
        QueueConfig {
            size: 16,
            desc_table: RAM,
            avail_ring: RAM + 0x400,
            used_ring: RAM + RAM_SIZE - 8,
        },
        QueueConfig {
            size: 16,
            desc_table: u64::MAX - 15,
            avail_ring: RAM,
            used_ring: RAM + 0x800,
        },
    ];
    for cfg in bad {
        let r = rig();
        let mut drv = MmioDriver::new(DirectIo(&*r.dev));
        drv.negotiate(opts(ALL)).unwrap();
        drv.program_queue(0, GuestQueue::with_config(cfg)).unwrap();
        assert_eq!(rd(&*r.dev, regs::QUEUE_READY), 0, "{cfg:?}");
        assert_ne!(drv.status().unwrap() & DEVICE_NEEDS_RESET, 0, "{cfg:?}");
        // A reset recovers the device completely.
        drv.init(&*r.ram, opts(ALL), &[(0, 16, RAM)]).unwrap();
        let h = drv
            .submit(&*r.ram, 0, &[Buf::readable(RAM + 0x8000, 2), Buf::writable(RAM + 0x9000, 2)])
            .unwrap();
        assert_eq!(drv.queue(0).pop_used(&*r.ram).unwrap(), Some((u32::from(h), 2)));
    }
    // QueueNum wider than 16 bits never becomes a valid size.
    let r = rig();
    let drv = MmioDriver::new(DirectIo(&*r.dev));
    wr(&*r.dev, regs::STATUS, ACKNOWLEDGE | DRIVER);
    wr(&*r.dev, regs::QUEUE_NUM, 0x1_0010);
    wr(&*r.dev, regs::QUEUE_READY, 1);
    assert_eq!(rd(&*r.dev, regs::QUEUE_READY), 0);
    assert_ne!(drv.status().unwrap() & DEVICE_NEEDS_RESET, 0);
}

#[test]
fn notify_with_bad_queue_index_is_ignored() {
    let r = rig();
    let mut drv = MmioDriver::new(DirectIo(&*r.dev));
    drv.init(&*r.ram, opts(ALL), &[(0, 16, RAM)]).unwrap();
    for q in [1, 2, 0xffff, 0x1_0000, 0xffff_ffff] {
        wr(&*r.dev, regs::QUEUE_NOTIFY, q);
    }
    assert_eq!(r.dev.device().completed(), 0);
    assert_eq!(drv.status().unwrap() & DEVICE_NEEDS_RESET, 0);
}

#[test]
fn linux_order_bring_up_through_the_bus() {
    let r = rig();
    let bus = IoBus::<Mmio>::new();
    let base = 0x1000_0000;
    bus.register(IoRange::new(base, 0x200).unwrap(), r.dev.clone()).unwrap();
    let mut drv = MmioDriver::new(BusIo { bus: &bus, base });
    let ram = &*r.ram;
    let f = drv.init(ram, opts(ALL), &[(0, 16, RAM), (1, 32, RAM + 0x1000)]).unwrap();
    assert_eq!(f, ALL);
    // A direct chain on queue 0.
    ram.write(RAM + 0x8000, b"ping").unwrap();
    let h = drv
        .submit(ram, 0, &[Buf::readable(RAM + 0x8000, 4), Buf::writable(RAM + 0x9000, 8)])
        .unwrap();
    assert_eq!(drv.queue(0).pop_used(ram).unwrap(), Some((u32::from(h), 4)));
    let mut out = [0u8; 4];
    ram.read(RAM + 0x9000, &mut out).unwrap();
    assert_eq!(&out, b"ping");
    assert_eq!(drv.ack_interrupt().unwrap(), INT_USED_BUFFER);
    assert_eq!(r.line.pulses(), 1);
    // An indirect chain on queue 1.
    ram.write(RAM + 0xa000, b"indirect").unwrap();
    let bufs = [
        Buf::readable(RAM + 0xa000, 3),
        Buf::readable(RAM + 0xa003, 5),
        Buf::writable(RAM + 0xb000, 4),
        Buf::writable(RAM + 0xc000, 4),
    ];
    let h = drv.queue(1).add_indirect(ram, RAM + 0xd000, &bufs).unwrap();
    drv.notify(1).unwrap();
    assert_eq!(drv.queue(1).pop_used(ram).unwrap(), Some((u32::from(h), 8)));
    ram.read(RAM + 0xc000, &mut out).unwrap();
    assert_eq!(&out, b"rect");
    assert_eq!(r.dev.device().completed(), 2);
    assert_eq!(drv.ack_interrupt().unwrap(), INT_USED_BUFFER);
    assert_eq!(drv.ack_interrupt().unwrap(), 0);
}

#[test]
fn level_triggered_line_follows_ack() {
    let r = rig_with(1, Trigger::Level);
    let mut drv = MmioDriver::new(DirectIo(&*r.dev));
    drv.init(&*r.ram, opts(ALL), &[(0, 16, RAM)]).unwrap();
    assert!(!r.line.level());
    drv.submit(&*r.ram, 0, &[Buf::readable(RAM + 0x8000, 4), Buf::writable(RAM + 0x9000, 4)])
        .unwrap();
    assert!(r.line.level());
    assert_eq!(drv.ack_interrupt().unwrap(), INT_USED_BUFFER);
    assert!(!r.line.level());
    assert_eq!(r.line.pulses(), 0);
}

#[test]
fn broken_queue_sets_needs_reset_with_config_interrupt() {
    let r = rig();
    let mut drv = MmioDriver::new(DirectIo(&*r.dev));
    drv.init(&*r.ram, opts(ALL), &[(0, 16, RAM)]).unwrap();
    let gen_before = rd(&*r.dev, regs::CONFIG_GENERATION);
    // The avail index jumps 17 ahead of a 16-entry queue.
    drv.queue(0).set_avail_idx(&*r.ram, 17).unwrap();
    drv.notify(0).unwrap();
    assert_ne!(drv.status().unwrap() & DEVICE_NEEDS_RESET, 0);
    assert_eq!(drv.ack_interrupt().unwrap(), INT_CONFIG_CHANGE);
    assert_ne!(rd(&*r.dev, regs::CONFIG_GENERATION), gen_before);
    assert!(!r.dev.device().queue_active(0));
    // Reset and bring-up make it work again.
    drv.init(&*r.ram, opts(ALL), &[(0, 16, RAM)]).unwrap();
    let h = drv
        .submit(&*r.ram, 0, &[Buf::readable(RAM + 0x8000, 4), Buf::writable(RAM + 0x9000, 4)])
        .unwrap();
    assert_eq!(drv.queue(0).pop_used(&*r.ram).unwrap(), Some((u32::from(h), 4)));
}

/// A device whose notify blocks until released: proves the transport holds
/// no lock of its own while a queue is processed.
struct Gate {
    entered: std::sync::Mutex<std::sync::mpsc::Sender<u16>>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    inside: std::sync::atomic::AtomicUsize,
}

impl vmio::virtio::VirtioDevice for Gate {
    fn device_type(&self) -> u32 {
        0x7e57
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn num_queues(&self) -> u16 {
        2
    }
    fn max_queue_size(&self, _: u16) -> u16 {
        16
    }
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&self, _: u64, _: &[u8]) {}
    fn activate(&self, _: vmio::virtio::Activation) -> Result<(), vmio::virtio::ActivateError> {
        Ok(())
    }
    fn serve(&self, queue: u16, _: &vmio::virtio::QueueStop) {
        use std::sync::atomic::Ordering::SeqCst;
        self.inside.fetch_add(1, SeqCst);
        self.entered.lock().unwrap().send(queue).unwrap();
        // Only queue 0 waits; queue 1 passes straight through.
        if queue == 0 {
            let r = self.release.lock().unwrap().recv_timeout(std::time::Duration::from_secs(10));
            assert!(r.is_ok(), "never released");
        }
        self.inside.fetch_sub(1, SeqCst);
    }
    fn reset(&self) {}
}

#[test]
fn notify_holds_no_transport_lock() {
    use std::sync::mpsc::channel;
    use std::time::Duration;
    let (entered_tx, entered_rx) = channel();
    let (release_tx, release_rx) = channel();
    let gate = Gate {
        entered: std::sync::Mutex::new(entered_tx),
        release: std::sync::Mutex::new(release_rx),
        inside: std::sync::atomic::AtomicUsize::new(0),
    };
    let ram = Arc::new(GuestRam::new(RAM, RAM_SIZE).unwrap());
    let dev = Arc::new(MmioTransport::new(
        gate,
        ram.clone(),
        Arc::new(RecordingIrq::new()),
        Trigger::Edge,
    ));
    let mut drv = MmioDriver::new(DirectIo(&*dev));
    drv.init(&*ram, opts(VIRTIO_F_VERSION_1), &[(0, 16, RAM), (1, 16, RAM + 0x1000)]).unwrap();
    let d2 = dev.clone();
    let t = std::thread::spawn(move || wr(&*d2, regs::QUEUE_NOTIFY, 0));
    assert_eq!(entered_rx.recv_timeout(Duration::from_secs(10)), Ok(0));
    // Queue 0 is being processed: registers still answer, and a notify on
    // queue 1 goes through at the same time.
    assert_eq!(rd(&*dev, regs::STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    wr(&*dev, regs::INTERRUPT_ACK, 1);
    wr(&*dev, regs::QUEUE_NOTIFY, 1);
    assert_eq!(entered_rx.recv_timeout(Duration::from_secs(10)), Ok(1));
    assert_eq!(dev.device().inside.load(std::sync::atomic::Ordering::SeqCst), 1);
    release_tx.send(()).unwrap();
    t.join().unwrap();
}
