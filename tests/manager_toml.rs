//! A whole VM from a TOML description: a UART, two virtio-blk disks (one on
//! a file, one in RAM) and a reserved hole. The manager builds it, dispatches
//! to each device, and the guest-side testing driver does I/O on both disks
//! through the manager's MMIO entry points.
#![cfg(feature = "config")]

use std::sync::{Arc, Mutex};

use vmio::testing::RecordingController;
use vmio::testing::{
    BlkRequest, Buf, DriverError, GuestAlloc, InitOptions, MmioDriver, RegisterIo,
};
use vmio::virtio::spec::blk::{S_OK, T_GET_ID, T_IN, T_OUT};
use vmio::virtio::spec::features::{
    VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use vmio::virtio::spec::interrupt::USED_BUFFER as INT_USED_BUFFER;
use vmio::{ConfigErrorKind, DeviceManager, ManagerError, VirtioBlkMmio, VmDeviceConfig, Width};
use vmio::{GuestMemory, GuestRam};

const RAM: u64 = 0x8000_0000;
const RAM_SIZE: u64 = 4 << 20;
const DISK0: u64 = 0x1000_1000;
const DISK1: u64 = 0x1000_2000;

/// Register accesses through the manager's MMIO dispatch, as a vCPU exit
/// would make them.
struct ManagerIo<'a> {
    m: &'a DeviceManager,
    base: u64,
}

impl RegisterIo for ManagerIo<'_> {
    fn read(&self, offset: u64, width: Width) -> Result<u64, DriverError> {
        self.m
            .handle_mmio_read(self.base + offset, width)
            .map_err(|_| DriverError::Register { offset })
    }
    fn write(&self, offset: u64, width: Width, value: u64) -> Result<(), DriverError> {
        self.m
            .handle_mmio_write(self.base + offset, width, value)
            .map_err(|_| DriverError::Register { offset })
    }
}

fn vm_toml(image: &str) -> String {
    format!(
        r#"
[[devices]]
name = "com1"
kind = "uart16550"
base = 0x3f8
length = 8
irq = 4

[[devices]]
name = "disk0"
kind = "virtio-blk"
base = {DISK0:#x}
length = 0x200
irq = 32
params = {{ path = "{image}", serial = "file-disk", queues = 2 }}

[[devices]]
name = "disk1"
kind = "virtio-blk"
base = {DISK1:#x}
length = 0x200
irq = 33
params = {{ ram_size = 0x10_0000, serial = "ram-disk", trigger = "edge" }}

[[devices]]
name = "hole"
kind = "reserved"
base = 0xfed0_0000
length = 0x1000
params = {{ value = 0 }}
"#
    )
}

/// One request: header, optional data buffer, status byte. Returns the
/// status and the used length.
fn request(
    drv: &mut MmioDriver<ManagerIo<'_>>,
    ram: &GuestRam,
    alloc: &mut GuestAlloc,
    queue: u16,
    kind: u32,
    sector: u64,
    data: Option<(u64, u32, bool)>,
) -> (u8, u32) {
    let hdr = alloc.alloc(16, 16);
    let status = alloc.alloc(1, 1);
    let data: Vec<Buf> =
        data.map(|(addr, len, writable)| Buf { addr, len, writable }).into_iter().collect();
    let bufs = BlkRequest::raw(kind, sector).data(&data).place(ram, hdr, status).unwrap();
    let head = drv.submit(ram, queue, &bufs).unwrap();
    drv.notify(queue).unwrap();
    let (id, len) = drv.queue(queue).pop_used(ram).unwrap().expect("request completed");
    assert_eq!(id, u32::from(head));
    let mut st = [0u8];
    ram.read(status, &mut st).unwrap();
    (st[0], len)
}

#[test]
fn toml_vm_with_uart_two_disks_and_a_hole() {
    let dir = std::env::temp_dir().join(format!("vmio-manager-toml-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk0.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();

    let vm = VmDeviceConfig::from_toml(&vm_toml(image.to_str().unwrap())).unwrap();
    let ram = Arc::new(GuestRam::new(RAM, RAM_SIZE).unwrap());
    let irqs = Arc::new(RecordingController::new());
    let console = Arc::new(Mutex::new(Vec::new()));
    let out = console.clone();
    let m = DeviceManager::builder()
        .memory(ram.clone())
        .interrupts(irqs.clone())
        .console(Arc::new(move |_: &str, b: &[u8]| out.lock().unwrap().extend_from_slice(b)))
        .build(&vm)
        .unwrap();
    assert_eq!(m.devices().len(), 4);

    // The UART and the hole answer on their buses.
    for &b in b"boot\n" {
        m.handle_port_write(0x3f8, Width::U8, b.into()).unwrap();
    }
    assert_eq!(console.lock().unwrap().as_slice(), b"boot\n");
    assert_eq!(m.handle_port_read(0x3fd, Width::U8).unwrap() & 0x60, 0x60);
    assert_eq!(m.handle_mmio_read(0xfed0_0040, Width::U32).unwrap(), 0);
    m.handle_mmio_write(0xfed0_0040, Width::U32, 7).unwrap();

    // Both disks: identity, bring-up, write, read back, GET_ID.
    let features = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_F_INDIRECT_DESC;
    let mut alloc = GuestAlloc::new(RAM + 0x10_0000, RAM_SIZE - 0x10_0000);
    for (i, (base, serial, irq)) in
        [(DISK0, &b"file-disk"[..], 32), (DISK1, &b"ram-disk"[..], 33)].into_iter().enumerate()
    {
        assert_eq!(m.handle_mmio_read(base, Width::U32).unwrap(), 0x7472_6976, "MagicValue");
        assert_eq!(m.handle_mmio_read(base + 8, Width::U32).unwrap(), 2, "DeviceID: block");
        let mut drv = MmioDriver::new(ManagerIo { m: &m, base });
        let queues: Vec<(u16, u16, u64)> = (0..if i == 0 { 2 } else { 1 })
            .map(|q| (q, 64, RAM + 0x1_0000 * (4 * i as u64 + q as u64 + 1)))
            .collect();
        let opts = InitOptions { features, ack_and_driver_together: i == 1 };
        drv.init(&*ram, opts, &queues).unwrap();
        assert_eq!(drv.read_config_u64(0).unwrap(), (1 << 20) / 512, "capacity in sectors");

        for &(q, _, _) in &queues {
            let pattern: Vec<u8> =
                (0..4096u32).map(|b| (b as u8) ^ (i as u8 * 0x5a) ^ q as u8).collect();
            let sector = 8 + 16 * u64::from(q);
            let wbuf = alloc.alloc(4096, 16);
            ram.write(wbuf, &pattern).unwrap();
            let (st, _) =
                request(&mut drv, &ram, &mut alloc, q, T_OUT, sector, Some((wbuf, 4096, false)));
            assert_eq!(st, S_OK);
            let rbuf = alloc.alloc(4096, 16);
            let (st, len) =
                request(&mut drv, &ram, &mut alloc, q, T_IN, sector, Some((rbuf, 4096, true)));
            assert_eq!((st, len), (S_OK, 4097));
            let mut back = vec![0u8; 4096];
            ram.read(rbuf, &mut back).unwrap();
            assert_eq!(back, pattern, "disk {i} queue {q}");
            // The bytes reached the disk's backend.
            let disk = m.device::<VirtioBlkMmio>(["disk0", "disk1"][i]).unwrap();
            let mut stored = vec![0u8; 4096];
            vmio::virtio::blk::BlockBackend::read_at(
                disk.device().backend(),
                sector * 512,
                &mut stored,
            )
            .unwrap();
            assert_eq!(stored, pattern);
        }
        let idbuf = alloc.alloc(20, 4);
        let (st, _) = request(&mut drv, &ram, &mut alloc, 0, T_GET_ID, 0, Some((idbuf, 20, true)));
        assert_eq!(st, S_OK);
        let mut id = [0u8; 20];
        ram.read(idbuf, &mut id).unwrap();
        assert_eq!(&id[..serial.len()], serial);

        // Each disk interrupted on its own configured line.
        let line = irqs.recording(irq);
        if i == 0 {
            assert!(line.level(), "level-triggered line stays up until acknowledged");
            assert_eq!(drv.ack_interrupt().unwrap() & INT_USED_BUFFER, INT_USED_BUFFER);
            assert!(!line.level());
        } else {
            assert!(line.pulses() > 0, "edge-triggered line pulsed");
        }
    }
    // The image file holds exactly disk0's two writes (sectors 8 and 24,
    // 4 KiB each) and nothing of the RAM disk's.
    let file = std::fs::read(&image).unwrap();
    for (q, sector) in [(0u8, 8usize), (1, 24)] {
        let want: Vec<u8> = (0..4096u32).map(|b| b as u8 ^ q).collect();
        assert_eq!(&file[sector * 512..sector * 512 + 4096], &want[..], "queue {q}");
    }
    assert!(file[..8 * 512].iter().chain(&file[16 * 512..24 * 512]).all(|&b| b == 0));
    assert!(file[32 * 512..].iter().all(|&b| b == 0));

    // Hot-unplug a disk by name; its window then misses.
    m.remove("disk1").unwrap().wait().unwrap();
    assert!(m.handle_mmio_read(DISK1, Width::U32).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn virtio_blk_config_errors_name_the_field() {
    let ram: Arc<dyn GuestMemory> = Arc::new(GuestRam::new(RAM, 0x1000).unwrap());
    let disk = |params: &str, extra: &str| {
        format!(
            "[[devices]]\nname='d'\nkind='virtio-blk'\nbase=0x1000\nlength=0x200\n{extra}\n\
             params={{ {params} }}\n"
        )
    };
    let cases = [
        (disk("ram_size = 4096", "irq = 5"), "kind", Some(ConfigErrorKind::NoGuestMemory)),
        (disk("ram_size = 4096", ""), "irq", Some(ConfigErrorKind::MissingParam)),
        (disk("", "irq = 5"), "params", None),
        (disk("ram_size = 4096, path = '/x'", "irq = 5"), "params.ram_size", None),
        (disk("ram_size = 0x1_0000_0000_0", "irq = 5"), "params.ram_size", None),
        (disk("ram_size = 100", "irq = 5"), "params.ram_size", None),
        (disk("ram_size = 4096, queues = 0", "irq = 5"), "params.queues", None),
        (disk("ram_size = 4096, queue_size = 3", "irq = 5"), "params.queue_size", None),
        (
            disk("ram_size = 4096, serial = '123456789012345678901'", "irq = 5"),
            "params.serial",
            None,
        ),
        (disk("ram_size = 4096, trigger = 'both'", "irq = 5"), "params.trigger", None),
        (disk("ram_size = 4096, readonly = true", "irq = 5"), "params.readonly", None),
        (disk("path = '/nonexistent/disk.img'", "irq = 5"), "params.path", None),
        (disk("ram_size = 4096", "irq = 5").replace("0x200", "0x100"), "length", None),
    ];
    for (i, (text, field, kind)) in cases.into_iter().enumerate() {
        let vm = VmDeviceConfig::from_toml(&text).unwrap();
        let mut b = DeviceManager::builder().interrupts(Arc::new(RecordingController::new()));
        if i != 0 {
            b = b.memory(ram.clone());
        }
        let Err(ManagerError::Config(e)) = b.build(&vm) else { panic!("{text}: accepted") };
        assert_eq!((e.device.as_str(), e.field.as_str()), ("d", field), "{text}: {e}");
        if let Some(kind) = kind {
            assert_eq!(e.kind, kind);
        }
    }
}

#[test]
fn shipped_example_vm_builds_with_guest_memory() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/vm.toml");
    let vm = VmDeviceConfig::from_toml_file(path).unwrap();
    let m = DeviceManager::builder()
        .memory(Arc::new(GuestRam::new(RAM, 0x1000).unwrap()))
        .interrupts(Arc::new(RecordingController::new()))
        .build(&vm)
        .unwrap();
    let disks: Vec<_> = m.devices().into_iter().filter(|d| d.config.kind == "virtio-blk").collect();
    assert_eq!(disks.len(), 2);
    for d in disks {
        assert_eq!(m.handle_mmio_read(d.config.base, Width::U32).unwrap(), 0x7472_6976);
    }
}
