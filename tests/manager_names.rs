//! The manager's names against its buses: edits made on a bus directly,
//! overlaps found by the bus, errors that name devices, devices added
//! already built, and kind registries built in one chain.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vmio::testing::RecordingController;
use vmio::{
    Access, AccessError, Built, ConfigErrorKind, Device, DeviceConfig, DeviceError, DeviceKinds,
    DeviceManager, IoRange, ManagerError, Mmio, Pio, Reserved, Space, VmDeviceConfig, Width,
};

fn uart(name: &str, base: u64) -> DeviceConfig {
    DeviceConfig::new(name, "uart16550", base, 8).with_param("output", "discard")
}

fn manager(irqs: &Arc<RecordingController>) -> DeviceManager {
    DeviceManager::builder().interrupts(irqs.clone()).build_empty()
}

fn config_error(r: Result<(), ManagerError>) -> vmio::ConfigError {
    match r {
        Err(ManagerError::Config(e)) => e,
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[test]
fn a_named_device_unplugged_on_its_bus_leaves_the_manager_too() {
    let irqs = Arc::new(RecordingController::new());
    let m = manager(&irqs);
    m.add(uart("com1", 0x3f8).with_irq(4)).unwrap();
    let id = m.info("com1").unwrap().id;

    // The bus-level path a vm-device user reaches for first.
    m.pio().unregister(id).unwrap().wait().unwrap();

    assert_eq!(m.info("com1"), None);
    assert!(m.devices().is_empty());
    assert!(m.device::<vmio::Uart16550>("com1").is_none());
    assert_eq!(m.remove("com1").unwrap_err(), ManagerError::NoSuchDevice("com1".into()));
    // Name, range and interrupt number are free again.
    m.add(uart("com1", 0x3f8).with_irq(4)).unwrap();
    assert_ne!(m.info("com1").unwrap().id, id);
    m.handle_port_write(0x3f9, Width::U8, 0x02).unwrap();
    assert!(irqs.recording(4).level(), "the new com1 drives line 4");
    m.remove_and_wait("com1").unwrap();
    assert!(m.pio().is_empty());
}

#[test]
fn a_named_device_moved_on_its_bus_is_followed() {
    let m = DeviceManager::new();
    m.add(DeviceConfig::new("hole", "reserved", 0x1000, 0x100)).unwrap();
    let id = m.info("hole").unwrap().id;
    m.mmio().remap(id, IoRange::new(0x8000, 0x200).unwrap()).unwrap();
    let info = m.info("hole").unwrap();
    assert_eq!((info.config.base, info.config.length), (0x8000, 0x200));
    // Manager edits start from where the bus has it.
    m.move_device("hole", 0x9000).unwrap().wait().unwrap();
    assert_eq!(m.mmio().range(id), Some(IoRange::new(0x9000, 0x200).unwrap()));
    assert_eq!(m.handle_mmio_read(0x91ff, Width::U8).unwrap(), 0xff);
}

#[test]
fn dispatch_errors_name_the_device_not_its_bus_id() {
    let m = DeviceManager::new();
    m.add(uart("com1", 0x3f8)).unwrap();
    let mut io = m.vcpu(0);

    // The UART refuses a 2-byte write rather than keep its low byte.
    let e = io.handle_port_write(0x3f8, Width::U16, 0x4142).unwrap_err();
    assert_eq!(e.space, Space::Pio);
    assert_eq!(e.device.as_deref(), Some("com1"));
    assert!(matches!(
        e.error,
        AccessError::Device { error: DeviceError::InvalidWidth(Width::U16), .. }
    ));
    assert_eq!(e.to_string(), "pio device `com1`: 2-byte access not supported");
    let e = m.handle_port_read(0x3ff, Width::U16).unwrap_err();
    assert_eq!(e.to_string(), "2-byte pio access at 0x3ff runs past the end of device `com1`");

    // A device registered without a name keeps its id; a miss has neither.
    let id = m.mmio().register(IoRange::new(0x1000, 8).unwrap(), Arc::new(Refuser)).unwrap();
    let e = io.handle_mmio_read(0x1000, Width::U8).unwrap_err();
    assert_eq!(e.device, None);
    assert!(e.to_string().contains(&id.to_string()), "{e}");
    let e = io.handle_mmio_read(0x5000, Width::U8).unwrap_err();
    assert!(e.is_unmapped());
    assert_eq!(e.to_string(), "no mmio device at 0x5000");
}

struct Refuser;

impl Device for Refuser {
    fn read(&self, _: Access) -> Result<u64, DeviceError> {
        Err(DeviceError::Failed("no"))
    }
    fn write(&self, _: Access, _: u64) -> Result<(), DeviceError> {
        Err(DeviceError::Failed("no"))
    }
}

#[test]
fn overlaps_are_found_by_the_bus_and_name_both_devices() {
    let m = DeviceManager::new();
    m.add(DeviceConfig::new("low", "reserved", 0x1000, 0x100)).unwrap();
    let direct = m.mmio().register(IoRange::new(0x4000, 0x10).unwrap(), Arc::new(Refuser)).unwrap();

    // Against a named device on the bus.
    let e = config_error(m.add(DeviceConfig::new("x", "reserved", 0x10ff, 2)));
    assert_eq!((e.device.as_str(), e.field.as_str()), ("x", "base"));
    assert_eq!(e.kind, ConfigErrorKind::Overlap { other: "low".into() });
    // Against one registered directly: its bus id.
    let e = config_error(m.add(DeviceConfig::new("x", "reserved", 0x400f, 1)));
    assert_eq!(e.kind, ConfigErrorKind::Overlap { other: direct.to_string() });
    // Within one list, identical ranges: the second is refused, naming the
    // first, and nothing of the list is placed.
    let list = [
        DeviceConfig::new("fine", "reserved", 0x2000, 0x10),
        DeviceConfig::new("a", "reserved", 0x3000, 0x10),
        DeviceConfig::new("b", "reserved", 0x3000, 0x10),
    ];
    let e = config_error(m.add_all(&list));
    assert_eq!((e.device.as_str(), e.kind), ("b", ConfigErrorKind::Overlap { other: "a".into() }));
    // Partly overlapping, listed in reverse address order.
    let list = [
        DeviceConfig::new("c", "reserved", 0x3008, 0x10),
        DeviceConfig::new("d", "reserved", 0x3000, 0x10),
    ];
    let e = config_error(m.add_all(&list));
    assert_eq!((e.device.as_str(), e.kind), ("d", ConfigErrorKind::Overlap { other: "c".into() }));
    assert_eq!(m.devices().len(), 1);
    assert_eq!(m.mmio().len(), 2);
    // A move is checked by the bus too.
    m.add(DeviceConfig::new("high", "reserved", 0x2000, 0x100)).unwrap();
    let Err(ManagerError::Config(e)) = m.move_device("high", 0x4008) else { panic!() };
    assert_eq!(e.kind, ConfigErrorKind::Overlap { other: direct.to_string() });
    assert_eq!(m.info("high").unwrap().config.base, 0x2000);
}

/// A register that counts its reads.
#[derive(Default)]
struct Counter(AtomicU64);

impl Device for Counter {
    fn read(&self, _: Access) -> Result<u64, DeviceError> {
        // Relaxed: a standalone counter.
        Ok(self.0.fetch_add(1, Ordering::Relaxed))
    }
    fn write(&self, _: Access, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
}

#[test]
fn kinds_register_in_one_builder_chain() {
    let m = DeviceManager::builder()
        .kinds(
            DeviceKinds::default()
                .with("counter", &[], |_| Ok(Built::new(Space::Pio, Arc::new(Counter::default()))))
                .with("rom", &["value"], |env| {
                    let value = env.config.param_u64("value")?.unwrap_or(0);
                    Ok(Built::new(Space::Mmio, Arc::new(Reserved::new(value))))
                }),
        )
        .build(&VmDeviceConfig::new(vec![
            DeviceConfig::new("ticks", "counter", 0x80, 1),
            DeviceConfig::new("rom", "rom", 0xf000, 8).with_param("value", 7u64),
            uart("com1", 0x3f8),
        ]))
        .unwrap();
    assert_eq!(m.handle_port_read(0x80, Width::U8).unwrap(), 0);
    assert_eq!(m.handle_port_read(0x80, Width::U8).unwrap(), 1);
    assert_eq!(m.handle_mmio_read(0xf000, Width::U8).unwrap(), 7);
    let e =
        config_error(m.add(DeviceConfig::new("t2", "counter", 0x81, 1).with_param("step", 1u64)));
    assert_eq!(e.kind, ConfigErrorKind::UnknownParam { expected: String::new() });
    assert!(e.to_string().ends_with("unknown key; none is taken here"), "{e}");
}

#[test]
fn prebuilt_devices_are_named_dispatched_and_removed_like_configured_ones() {
    let irqs = Arc::new(RecordingController::new());
    let m = manager(&irqs);
    let counter = Arc::new(Counter::default());
    m.add_device("ticks", IoRange::<Pio>::new(0x80, 1).unwrap(), counter.clone(), Some(5)).unwrap();
    assert_eq!(m.handle_port_read(0x80, Width::U8).unwrap(), 0);
    assert!(Arc::ptr_eq(&m.device::<Counter>("ticks").unwrap(), &counter));
    let info = m.info("ticks").unwrap();
    assert_eq!((info.space, info.config.base, info.config.length), (Space::Pio, 0x80, 1));
    assert_eq!(info.config.irq, Some(5));
    assert!(info.config.kind.ends_with("Counter"), "{}", info.config.kind);

    // Its name and interrupt number are taken, its range is the bus's.
    let e = config_error(m.add(uart("ticks", 0x3f8)));
    assert_eq!(e.kind, ConfigErrorKind::DuplicateName);
    let e = config_error(m.add(uart("com1", 0x3f8).with_irq(5)));
    assert_eq!(e.kind, ConfigErrorKind::IrqInUse { other: "ticks".into() });
    let other = Arc::new(Counter::default());
    let e = config_error(m.add_device("t2", IoRange::<Pio>::new(0x7f, 2).unwrap(), other, None));
    assert_eq!(e.kind, ConfigErrorKind::Overlap { other: "ticks".into() });

    // An `Arc<dyn Device>` goes in as itself.
    let dynamic: Arc<dyn Device> = Arc::new(Reserved::new(0xab));
    m.add_device("dyn", IoRange::<Mmio>::new(0x1000, 4).unwrap(), Arc::new(dynamic), None).unwrap();
    assert_eq!(m.handle_mmio_read(0x1000, Width::U8).unwrap(), 0xab);
    assert!(m.device::<Arc<dyn Device>>("dyn").is_some());

    // remove_and_wait lowers the line the controller has for it.
    vmio::IrqLine::set_level(&*irqs.recording(5), true);
    m.move_device("ticks", 0x90).unwrap().wait().unwrap();
    assert_eq!(m.handle_port_read(0x90, Width::U8).unwrap(), 1);
    m.remove_and_wait("ticks").unwrap();
    assert!(!irqs.recording(5).level());
    assert!(m.handle_port_read(0x90, Width::U8).unwrap_err().is_unmapped());
    m.add(uart("com1", 0x3f8).with_irq(5)).unwrap();
}
