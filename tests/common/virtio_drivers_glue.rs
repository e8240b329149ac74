//! Glue that lets the `virtio-drivers` crate (a guest-side driver used by
//! several Rust kernels) drive vmio devices:
//!
//! - [`BusTransport`] implements its `Transport` by turning every call into
//!   the 32-bit (or narrower, for config space) MMIO accesses a guest would
//!   make, dispatched through an [`IoBus`] to the virtio-mmio transport.
//! - [`GuestHal`] implements its `Hal` over one process-wide guest RAM (a
//!   [`GuestRam`] unless the test binary chose another [`GuestMemory`] with
//!   [`use_guest_memory`]): DMA pages come from guest RAM, and driver buffers
//!   outside guest RAM are bounced through it (copied in on `share`, back on
//!   `unshare`), exactly what a swiotlb does in a confidential guest.
//! - [`plug`] puts a device on a bus behind the virtio-mmio transport.
//! - [`write_read_verify`] and [`flush_and_check_id`]: the workload every
//!   end-to-end test runs through the crate's `VirtIOBlk`, checked against a
//!   shadow of the disk; [`ram_disk_end_to_end`] runs it from driver
//!   initialisation to the backend's contents.
//!
//! A test binary that includes this file includes `common/rng.rs` as `rng`
//! next to it.
#![allow(dead_code)]

use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};

use super::rng::Rng;
use virtio_drivers::device::blk::{SECTOR_SIZE, VirtIOBlk};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};
use vmio::testing::RecordingIrq;
use vmio::virtio::blk::{BlockBackend, RequestHeader, RequestType};
use vmio::virtio::spec::mmio as regs;
use vmio::virtio::{MmioTransport, Trigger, VirtioDevice};
use vmio::{GuestMemory, GuestRam};
use vmio::{IoBus, IoRange, Mmio, VcpuHandle, Width};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Guest-physical base of the shared guest RAM.
pub const RAM_BASE: u64 = 0x8000_0000;
/// Size of the shared guest RAM.
pub const RAM_SIZE: u64 = 64 << 20;
const PAGES: usize = (RAM_SIZE / PAGE_SIZE as u64) as usize;

struct Ram {
    ram: Arc<dyn GuestMemory>,
    /// Host address of guest-physical `RAM_BASE`.
    host: usize,
    /// One flag per page: allocated.
    used: Mutex<Vec<bool>>,
}

static RAM: OnceLock<Ram> = OnceLock::new();

impl Ram {
    fn over(ram: Arc<dyn GuestMemory>) -> Self {
        let host =
            ram.host_ptr(RAM_BASE, RAM_SIZE).expect("one contiguous region").as_ptr() as usize;
        Ram { ram, host, used: Mutex::new(vec![false; PAGES]) }
    }
}

fn ram() -> &'static Ram {
    RAM.get_or_init(|| Ram::over(Arc::new(GuestRam::new(RAM_BASE, RAM_SIZE).expect("guest RAM"))))
}

/// Makes `memory` (one contiguous region of `RAM_SIZE` bytes at `RAM_BASE`)
/// the guest RAM of this process instead of a [`GuestRam`]. Returns false
/// when guest RAM was already in use (chosen earlier, or used by a test
/// that ran first), so callers set it before anything else touches it.
pub fn use_guest_memory(memory: Arc<dyn GuestMemory>) -> bool {
    RAM.set(Ram::over(memory)).is_ok()
}

/// The guest RAM every [`GuestHal`] allocation lives in.
pub fn guest_ram() -> Arc<dyn GuestMemory> {
    ram().ram.clone()
}

/// Allocates `pages` zeroed contiguous pages of guest RAM.
pub fn alloc_pages(pages: usize) -> u64 {
    let r = ram();
    let mut used = r.used.lock().unwrap();
    let mut run = 0;
    for i in 0..PAGES {
        run = if used[i] { 0 } else { run + 1 };
        if run == pages {
            let first = i + 1 - pages;
            used[first..=i].fill(true);
            let paddr = RAM_BASE + (first * PAGE_SIZE) as u64;
            r.ram.fill(paddr, (pages * PAGE_SIZE) as u64, 0).expect("inside guest RAM");
            return paddr;
        }
    }
    panic!("guest RAM exhausted ({pages} pages wanted)");
}

/// Frees pages from [`alloc_pages`].
pub fn free_pages(paddr: u64, pages: usize) {
    let first = ((paddr - RAM_BASE) / PAGE_SIZE as u64) as usize;
    let mut used = ram().used.lock().unwrap();
    assert!(used[first..first + pages].iter().all(|&u| u), "double free at {paddr:#x}");
    used[first..first + pages].fill(false);
}

/// The guest-physical address of a host pointer into guest RAM, if it is one.
fn guest_addr_of(ptr: *const u8, len: usize) -> Option<u64> {
    let r = ram();
    let at = ptr as usize;
    (at >= r.host && at + len <= r.host + RAM_SIZE as usize)
        .then(|| RAM_BASE + (at - r.host) as u64)
}

/// `virtio_drivers::Hal` over the shared guest RAM.
pub struct GuestHal;

// SAFETY: `dma_alloc` returns zeroed, page-aligned, exclusively owned guest
// RAM whose host pointer stays valid for the life of the process (the RAM is
// never freed); `share` returns a guest-physical address whose bytes hold the
// buffer's contents (the buffer itself if it lies in guest RAM, else a bounce
// copy that `unshare` copies back and frees).
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let paddr = alloc_pages(pages);
        let host = ram().ram.host_ptr(paddr, (pages * PAGE_SIZE) as u64).expect("guest RAM");
        (paddr, host)
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        free_pages(paddr, pages);
        0
    }

    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // BusTransport reaches the device through the bus, never through a
        // mapping, so nothing ever asks for one.
        panic!("BusTransport does not map MMIO into memory");
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let len = buffer.len();
        if let Some(paddr) = guest_addr_of(buffer.as_ptr().cast(), len) {
            return paddr;
        }
        let pages = len.div_ceil(PAGE_SIZE).max(1);
        let paddr = alloc_pages(pages);
        if direction != BufferDirection::DeviceToDriver {
            // SAFETY: the driver owns `buffer` for the duration of the share
            // and does not write it while the device may read it.
            let bytes = unsafe { buffer.as_ref() };
            ram().ram.write(paddr, bytes).expect("bounce buffer in guest RAM");
        }
        paddr
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let len = buffer.len();
        if guest_addr_of(buffer.as_ptr().cast(), len).is_some() {
            return;
        }
        if direction != BufferDirection::DriverToDevice {
            // SAFETY: the device is done with the buffer (the driver popped
            // it), so the driver owns it exclusively again.
            let bytes = unsafe { &mut *buffer.as_ptr() };
            ram().ram.read(paddr, bytes).expect("bounce buffer in guest RAM");
        }
        free_pages(paddr, len.div_ceil(PAGE_SIZE).max(1));
    }
}

/// `virtio_drivers::transport::Transport` as MMIO accesses through a bus.
pub struct BusTransport {
    vcpu: RefCell<VcpuHandle<Mmio>>,
    base: u64,
}

impl BusTransport {
    /// A transport for the virtio-mmio device at `base` on `bus`, issuing its
    /// accesses as vCPU `vcpu`.
    pub fn new(bus: &IoBus<Mmio>, base: u64, vcpu: u32) -> Self {
        BusTransport { vcpu: RefCell::new(bus.handle(vcpu)), base }
    }

    fn read32(&self, reg: u64) -> u32 {
        let v = self.vcpu.borrow_mut().read(self.base + reg, Width::U32).expect("MMIO read");
        v as u32
    }

    fn write32(&self, reg: u64, value: u32) {
        self.vcpu
            .borrow_mut()
            .write(self.base + reg, Width::U32, u64::from(value))
            .expect("MMIO write");
    }

    /// Config-space access at the field's own width (4-byte pieces for wider
    /// fields), as the spec asks of drivers.
    fn config_pieces(offset: usize, len: usize) -> impl Iterator<Item = (usize, Width)> {
        let width = match len {
            1 => Width::U8,
            2 => Width::U16,
            _ => Width::U32,
        };
        let step = width.bytes() as usize;
        (0..len / step).map(move |i| (offset + i * step, width))
    }
}

impl Transport for BusTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::try_from(self.read32(regs::DEVICE_ID)).expect("known device type")
    }

    fn read_device_features(&mut self) -> u64 {
        self.write32(regs::DEVICE_FEATURES_SEL, 0);
        let low = self.read32(regs::DEVICE_FEATURES);
        self.write32(regs::DEVICE_FEATURES_SEL, 1);
        let high = self.read32(regs::DEVICE_FEATURES);
        u64::from(high) << 32 | u64::from(low)
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.write32(regs::DRIVER_FEATURES_SEL, 0);
        self.write32(regs::DRIVER_FEATURES, driver_features as u32);
        self.write32(regs::DRIVER_FEATURES_SEL, 1);
        self.write32(regs::DRIVER_FEATURES, (driver_features >> 32) as u32);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.write32(regs::QUEUE_SEL, u32::from(queue));
        self.read32(regs::QUEUE_NUM_MAX)
    }

    fn notify(&mut self, queue: u16) {
        self.write32(regs::QUEUE_NOTIFY, u32::from(queue));
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(self.read32(regs::STATUS))
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.write32(regs::STATUS, status.bits());
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {
        // Legacy (version 1) only; a version 2 device has no such register.
    }

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.write32(regs::QUEUE_SEL, u32::from(queue));
        self.write32(regs::QUEUE_NUM, size);
        self.write32(regs::QUEUE_DESC_LOW, descriptors as u32);
        self.write32(regs::QUEUE_DESC_HIGH, (descriptors >> 32) as u32);
        self.write32(regs::QUEUE_DRIVER_LOW, driver_area as u32);
        self.write32(regs::QUEUE_DRIVER_HIGH, (driver_area >> 32) as u32);
        self.write32(regs::QUEUE_DEVICE_LOW, device_area as u32);
        self.write32(regs::QUEUE_DEVICE_HIGH, (device_area >> 32) as u32);
        self.write32(regs::QUEUE_READY, 1);
    }

    fn queue_unset(&mut self, queue: u16) {
        self.write32(regs::QUEUE_SEL, u32::from(queue));
        self.write32(regs::QUEUE_READY, 0);
        assert_eq!(self.read32(regs::QUEUE_READY), 0, "QueueReady reads back 0");
        for reg in [
            regs::QUEUE_NUM,
            regs::QUEUE_DESC_LOW,
            regs::QUEUE_DESC_HIGH,
            regs::QUEUE_DRIVER_LOW,
            regs::QUEUE_DRIVER_HIGH,
            regs::QUEUE_DEVICE_LOW,
            regs::QUEUE_DEVICE_HIGH,
        ] {
            self.write32(reg, 0);
        }
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.write32(regs::QUEUE_SEL, u32::from(queue));
        self.read32(regs::QUEUE_READY) != 0
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        let pending = self.read32(regs::INTERRUPT_STATUS);
        if pending != 0 {
            self.write32(regs::INTERRUPT_ACK, pending);
        }
        InterruptStatus::from_bits_truncate(pending)
    }

    fn read_config_generation(&self) -> u32 {
        self.read32(regs::CONFIG_GENERATION)
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        let mut value = T::new_zeroed();
        let bytes = value.as_mut_bytes();
        let len = bytes.len();
        for (at, width) in Self::config_pieces(offset, len) {
            let v = self
                .vcpu
                .borrow_mut()
                .read(self.base + regs::CONFIG + at as u64, width)
                .map_err(|_| virtio_drivers::Error::ConfigSpaceTooSmall)?;
            let n = width.bytes() as usize;
            bytes[at - offset..at - offset + n].copy_from_slice(&v.to_le_bytes()[..n]);
        }
        Ok(value)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> virtio_drivers::Result<()> {
        let bytes = value.as_bytes();
        for (at, width) in Self::config_pieces(offset, bytes.len()) {
            let n = width.bytes() as usize;
            let mut v = [0u8; 8];
            v[..n].copy_from_slice(&bytes[at - offset..at - offset + n]);
            self.vcpu
                .borrow_mut()
                .write(self.base + regs::CONFIG + at as u64, width, u64::from_le_bytes(v))
                .map_err(|_| virtio_drivers::Error::ConfigSpaceTooSmall)?;
        }
        Ok(())
    }
}

/// Size of the queues [`bring_up`] creates.
pub const QSIZE: usize = 128;

/// A set-up queue on its way to the vCPU thread that will drive it (bus
/// handles belong to one thread, so [`attach`](Self::attach) there).
pub struct PendingQueue {
    bus: IoBus<Mmio>,
    base: u64,
    vq: virtio_drivers::queue::VirtQueue<GuestHal, QSIZE>,
    index: u16,
}

impl PendingQueue {
    /// Takes the queue over on the calling thread, as vCPU `index`.
    pub fn attach(self) -> BlkQueue {
        BlkQueue {
            transport: BusTransport::new(&self.bus, self.base, u32::from(self.index)),
            vq: self.vq,
            index: self.index,
        }
    }
}

/// The driver half of one virtio-blk request queue, owned by one vCPU
/// thread: its own bus handle and its own `virtio_drivers` queue.
pub struct BlkQueue {
    transport: BusTransport,
    vq: virtio_drivers::queue::VirtQueue<GuestHal, QSIZE>,
    index: u16,
}

/// Brings up the virtio-blk device at `base` the way a guest does (reset,
/// ACKNOWLEDGE | DRIVER, features, FEATURES_OK, queues, DRIVER_OK) and
/// returns the accepted features and one [`PendingQueue`] per queue, queue
/// `i` to issue its accesses as vCPU `i`.
pub fn bring_up(
    bus: &IoBus<Mmio>,
    base: u64,
    queues: u16,
    wanted: u64,
) -> (u64, Vec<PendingQueue>) {
    use virtio_drivers::queue::VirtQueue;
    let mut t = BusTransport::new(bus, base, 0);
    t.set_status(DeviceStatus::empty());
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    let features = t.read_device_features() & wanted;
    t.write_driver_features(features);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    assert!(t.get_status().contains(DeviceStatus::FEATURES_OK), "features refused");
    let indirect = features & (1 << 28) != 0;
    let event_idx = features & (1 << 29) != 0;
    let vqs: Vec<_> = (0..queues)
        .map(|q| VirtQueue::new(&mut t, q, indirect, event_idx).expect("queue set up"))
        .collect();
    t.set_status(
        DeviceStatus::ACKNOWLEDGE
            | DeviceStatus::DRIVER
            | DeviceStatus::FEATURES_OK
            | DeviceStatus::DRIVER_OK,
    );
    assert!(!t.get_status().contains(DeviceStatus::DEVICE_NEEDS_RESET));
    let queues = vqs
        .into_iter()
        .enumerate()
        .map(|(i, vq)| PendingQueue { bus: bus.clone(), base, vq, index: i as u16 })
        .collect();
    (features, queues)
}

/// A request's buffers for [`BlkQueue::submit_batch`]: header, data, status.
pub trait RequestBufs {
    /// The three buffers.
    fn parts(&mut self) -> (&[u8], &mut [u8], &mut [u8]);
}

fn header(kind: u32, sector: u64) -> [u8; 16] {
    RequestHeader::new(RequestType::from_raw(kind), sector).to_bytes()
}

/// One discard / write-zeroes segment.
pub fn dwz_segment(sector: u64, sectors: u32, unmap: bool) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..].copy_from_slice(&u32::from(unmap).to_le_bytes());
    s
}

impl BlkQueue {
    /// The queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Sends one request (header, then `out` device-readable, then `inp`
    /// device-writable, then the status byte), waits for it and returns the
    /// status and the used length.
    ///
    /// # Panics
    /// If the device does not complete it within 10 s.
    pub fn request(&mut self, kind: u32, sector: u64, out: &[u8], inp: &mut [u8]) -> (u8, u32) {
        let hdr = header(kind, sector);
        let mut status = [0xffu8];
        let mut inputs: Vec<&[u8]> = vec![&hdr];
        if !out.is_empty() {
            inputs.push(out);
        }
        let mut outputs: Vec<&mut [u8]> = Vec::new();
        if !inp.is_empty() {
            outputs.push(inp);
        }
        outputs.push(&mut status);
        // SAFETY: the buffers outlive the request: we wait for it below and
        // pop it before returning.
        let token = unsafe { self.vq.add(&inputs, &mut outputs) }.expect("queue has room");
        if self.vq.should_notify() {
            self.transport.notify(self.index);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !self.vq.can_pop() {
            assert!(std::time::Instant::now() < deadline, "request not completed in 10 s");
            // Yield, not spin: a worker thread serving the queue may need
            // this core (inline, the request is done before we get here).
            std::thread::yield_now();
        }
        // SAFETY: the same buffers as were added with this token.
        let len = unsafe { self.vq.pop_used(token, &inputs, &mut outputs) }.expect("our token");
        (status[0], len)
    }

    /// Adds one request per element of `reqs` without notifying, notifies
    /// once, and reaps them all (in order: one queue completes in order).
    /// Writes send `data`, reads fill it. Allocation-free, for benchmarks.
    ///
    /// # Panics
    /// If the queue lacks room or the batch does not complete within 10 s.
    pub fn submit_batch<R: RequestBufs>(&mut self, write: bool, reqs: &mut [R]) {
        let mut tokens = [0u16; QSIZE];
        for (r, token) in reqs.iter_mut().zip(&mut tokens) {
            let (hdr, data, status) = r.parts();
            // SAFETY: the buffers live until popped below.
            *token = unsafe {
                if write {
                    self.vq.add(&[hdr, data], &mut [status])
                } else {
                    self.vq.add(&[hdr], &mut [data, status])
                }
            }
            .expect("queue has room");
        }
        if self.vq.should_notify() {
            self.transport.notify(self.index);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for (r, &token) in reqs.iter_mut().zip(&tokens) {
            while self.vq.peek_used() != Some(token) {
                assert!(std::time::Instant::now() < deadline, "batch not completed in 10 s");
                std::thread::yield_now();
            }
            let (hdr, data, status) = r.parts();
            // SAFETY: the same buffers as were added with this token.
            unsafe {
                if write {
                    self.vq.pop_used(token, &[hdr, data], &mut [status])
                } else {
                    self.vq.pop_used(token, &[hdr], &mut [data, status])
                }
            }
            .expect("our token");
        }
    }
}

/// Writes `rounds` random extents of 1 to 16 sectors (drawn from `seed`)
/// through `driver`, keeping a shadow of the disk, and reads each back at
/// once; then reads the whole disk, 64 KiB at a time, against the shadow.
/// Returns the shadow, for comparing with the backend.
pub fn write_read_verify(
    driver: &mut VirtIOBlk<GuestHal, BusTransport>,
    rounds: usize,
    seed: u64,
) -> Vec<u8> {
    let sectors = driver.capacity() as usize;
    let mut shadow = vec![0u8; sectors * SECTOR_SIZE];
    let mut rng = Rng::new(seed);
    for round in 0..rounds {
        let n = 1 + rng.below(16) as usize;
        let start = rng.below((sectors - n) as u64) as usize;
        let data: Vec<u8> = (0..n * SECTOR_SIZE).map(|_| rng.next() as u8).collect();
        driver.write_blocks(start, &data).unwrap_or_else(|e| panic!("round {round}: write: {e:?}"));
        shadow[start * SECTOR_SIZE..(start + n) * SECTOR_SIZE].copy_from_slice(&data);
        let mut back = vec![0u8; data.len()];
        driver.read_blocks(start, &mut back).unwrap();
        assert_eq!(back, data, "round {round}: sectors {start}+{n}");
    }
    let mut chunk = vec![0u8; 128 * SECTOR_SIZE];
    for start in (0..sectors).step_by(128) {
        let n = (sectors - start).min(128);
        driver.read_blocks(start, &mut chunk[..n * SECTOR_SIZE]).unwrap();
        let want = &shadow[start * SECTOR_SIZE..(start + n) * SECTOR_SIZE];
        assert!(chunk[..n * SECTOR_SIZE] == *want, "disk differs from shadow at sector {start}");
    }
    shadow
}

/// Flushes through `driver` and checks that the device id it reads is `id`.
pub fn flush_and_check_id(driver: &mut VirtIOBlk<GuestHal, BusTransport>, id: &[u8]) {
    driver.flush().expect("flush");
    let mut buf = [0u8; 20];
    let len = driver.device_id(&mut buf).expect("GET_ID");
    assert_eq!(&buf[..len], id);
}

/// A bus with `device` behind a virtio-mmio transport at `base`, over the
/// process's guest RAM, interrupting on a recording line with `trigger`.
pub fn plug(device: impl VirtioDevice + 'static, base: u64, trigger: Trigger) -> IoBus<Mmio> {
    let irq = Arc::new(RecordingIrq::new());
    let transport = MmioTransport::new(device, guest_ram(), irq, trigger);
    let bus = IoBus::<Mmio>::new();
    bus.register(IoRange::new(base, 0x200).unwrap(), Arc::new(transport)).unwrap();
    bus
}

/// The crate's driver against the writable virtio-blk at `base` on `bus`,
/// whose backend is `disk` and whose device id is `id`: it initializes the
/// device and sees the disk's capacity, runs [`write_read_verify`] and
/// [`flush_and_check_id`]; the backend then holds what the driver wrote,
/// and a read beyond capacity fails without stopping the device.
pub fn ram_disk_end_to_end(
    bus: &IoBus<Mmio>,
    base: u64,
    disk: &dyn BlockBackend,
    id: &[u8],
    rounds: usize,
    seed: u64,
) {
    let transport = BusTransport::new(bus, base, 0);
    assert_eq!(transport.device_type(), DeviceType::Block);
    let mut driver =
        VirtIOBlk::<GuestHal, _>::new(transport).expect("driver initializes the device");
    let sectors = driver.capacity() as usize;
    assert_eq!(sectors as u64, disk.size() / SECTOR_SIZE as u64);
    assert!(!driver.readonly());

    let shadow = write_read_verify(&mut driver, rounds, seed);
    flush_and_check_id(&mut driver, id);

    // What the driver wrote is what the backend holds.
    let mut on_disk = vec![0u8; shadow.len()];
    disk.read_at(0, &mut on_disk).unwrap();
    assert!(on_disk == shadow, "backend differs from the driver's shadow");

    // Beyond capacity: the device answers IOERR and the driver goes on.
    let mut buf = [0u8; SECTOR_SIZE];
    assert!(driver.read_blocks(sectors, &mut buf).is_err());
    driver.read_blocks(sectors - 1, &mut buf).expect("the last sector is readable");
}
