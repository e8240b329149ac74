//! DeviceManager configuration: every refusal names the device and field,
//! and a refused build or batch leaves nothing registered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vmio::testing::RecordingController;
use vmio::{
    Access, Built, ConfigErrorKind, Device, DeviceConfig, DeviceError, DeviceKinds, DeviceManager,
    IoRange, ManagerError, Pio, Reserved, Space, Uart16550, VmDeviceConfig, Width,
};

/// A VMM-defined kind: a counter that needs a `step` parameter.
struct Counter {
    step: u64,
    value: AtomicU64,
}

impl Device for Counter {
    fn read(&self, _: Access) -> Result<u64, DeviceError> {
        // Relaxed: a standalone counter.
        Ok(self.value.fetch_add(self.step, Ordering::Relaxed))
    }
    fn write(&self, _: Access, v: u64) -> Result<(), DeviceError> {
        self.value.store(v, Ordering::Relaxed);
        Ok(())
    }
}

fn kinds() -> DeviceKinds {
    let mut k = DeviceKinds::default();
    k.register("counter", &["step", "space"], |env| {
        let cfg = env.config;
        let step = cfg.param_u64("step")?.ok_or_else(|| cfg.missing("step"))?;
        if step == 0 {
            return Err(cfg.invalid("step", "a non-zero step"));
        }
        let space = cfg.param_space(Space::SysReg)?;
        Ok(Built::new(space, Arc::new(Counter { step, value: AtomicU64::new(0) })))
    });
    k
}

fn manager() -> DeviceManager {
    DeviceManager::builder()
        .kinds(kinds())
        .interrupts(Arc::new(RecordingController::new()))
        .build_empty()
}

/// One valid device on each bus.
fn base_vm() -> Vec<DeviceConfig> {
    vec![
        DeviceConfig::new("com1", "uart16550", 0x3f8, 8)
            .with_irq(4)
            .with_param("output", "discard"),
        DeviceConfig::new("hole", "reserved", 0xfe00_0000, 0x1000).with_param("value", 0u64),
        DeviceConfig::new("cntr", "counter", 0xc000, 8).with_param("step", 2u64),
    ]
}

fn bus_lens(m: &DeviceManager) -> [usize; 3] {
    [m.mmio().len(), m.pio().len(), m.sysreg().len()]
}

#[test]
fn a_valid_vm_builds_on_all_three_buses() {
    let m = manager();
    m.add_all(&base_vm()).unwrap();
    assert_eq!(bus_lens(&m), [1, 1, 1]);
    assert_eq!(m.info("com1").unwrap().space, Space::Pio);
    assert_eq!(m.info("hole").unwrap().space, Space::Mmio);
    assert_eq!(m.info("cntr").unwrap().space, Space::SysReg);
    assert_eq!(m.handle_sysreg_read(0xc000, Width::U64).unwrap(), 0);
    assert_eq!(m.handle_sysreg_read(0xc000, Width::U64).unwrap(), 2);
    assert_eq!(m.handle_mmio_read(0xfe00_0010, Width::U32).unwrap(), 0);
    // The concrete device is reachable by name and type, not by a wrong type.
    assert!(m.device::<Uart16550>("com1").is_some());
    assert!(m.device::<Reserved>("com1").is_none());
    assert_eq!(m.device::<Reserved>("hole").unwrap().value(), 0);
    let names: Vec<_> = m.devices().into_iter().map(|d| d.config.name).collect();
    assert_eq!(names, ["cntr", "com1", "hole"]);
}

/// Each broken config, appended after valid devices on every bus, is
/// refused with the right device, field and reason, and nothing of the
/// batch stays registered — on a fresh manager and on one that already
/// holds devices.
#[test]
fn every_config_error_names_device_and_field_and_registers_nothing() {
    let uart = |name: &str, port: u64| {
        DeviceConfig::new(name, "uart16550", port, 8).with_param("output", "discard")
    };
    let cases: Vec<(DeviceConfig, &str, ConfigErrorKind)> = vec![
        (
            DeviceConfig::new("x", "floppy", 0x1000, 8),
            "kind",
            ConfigErrorKind::UnknownKind("floppy".into()),
        ),
        (
            DeviceConfig::new("x", "counter", 0xc008, 8),
            "params.step",
            ConfigErrorKind::MissingParam,
        ),
        (
            DeviceConfig::new("x", "counter", 0xc008, 8).with_param("step", 0u64),
            "params.step",
            ConfigErrorKind::InvalidValue { expected: "a non-zero step" },
        ),
        (
            DeviceConfig::new("x", "counter", 0xc008, 8).with_param("step", "two"),
            "params.step",
            ConfigErrorKind::InvalidValue { expected: "an integer" },
        ),
        (
            uart("x", 0x2f8).with_param("baud", 9600u64),
            "params.baud",
            ConfigErrorKind::UnknownParam { expected: "space, reg_shift, output".into() },
        ),
        (
            uart("x", 0x2f8).with_param("space", "dma"),
            "params.space",
            ConfigErrorKind::InvalidValue { expected: "\"mmio\", \"pio\" or \"sysreg\"" },
        ),
        (uart("x", 0x3fc), "base", ConfigErrorKind::Overlap { other: "com1".into() }),
        (
            DeviceConfig::new("x", "reserved", 0xfe00_0fff, 2),
            "base",
            ConfigErrorKind::Overlap { other: "hole".into() },
        ),
        (uart("x", 0x2f8).with_irq(4), "irq", ConfigErrorKind::IrqInUse { other: "com1".into() }),
        (uart("com1", 0x2f8), "name", ConfigErrorKind::DuplicateName),
        (uart("", 0x2f8), "name", ConfigErrorKind::InvalidValue { expected: "a non-empty name" }),
        (
            DeviceConfig::new("x", "reserved", 0x1000, 0),
            "length",
            ConfigErrorKind::Range(vmio::RangeError::Empty { start: 0x1000 }),
        ),
        (
            // Port I/O ends at 0xffff.
            uart("x", 0xfffc),
            "length",
            ConfigErrorKind::Range(vmio::RangeError::Wraps { start: 0xfffc, len: 8, top: 0xffff }),
        ),
        (
            uart("x", 0x1_0000),
            "base",
            ConfigErrorKind::Range(vmio::RangeError::Wraps {
                start: 0x1_0000,
                len: 8,
                top: 0xffff,
            }),
        ),
        (
            uart("x", 0x2f8).with_param("reg_shift", 2u64),
            "length",
            ConfigErrorKind::InvalidValue { expected: "at least 8 << reg_shift bytes" },
        ),
        (
            DeviceConfig::new("x", "reserved", 0x1000, 8).with_irq(9),
            "irq",
            ConfigErrorKind::InvalidValue { expected: "no interrupt for a reserved hole" },
        ),
    ];
    for (bad, field, kind) in cases {
        let label = format!("{bad:?}");
        let want_device = bad.name.clone();
        // Fresh manager: valid devices first, the bad one last.
        let m = manager();
        let mut vm = base_vm();
        vm.push(bad.clone());
        let Err(ManagerError::Config(e)) = m.add_all(&vm) else {
            panic!("{label}: accepted");
        };
        assert_eq!((e.device.as_str(), e.field.as_str()), (want_device.as_str(), field), "{label}");
        assert_eq!(e.kind, kind, "{label}");
        assert!(e.to_string().contains(field), "{label}: {e}");
        assert_eq!(bus_lens(&m), [0, 0, 0], "{label}: a refused build left devices behind");
        assert!(m.devices().is_empty());

        // Populated manager: a refused batch changes nothing.
        let m = manager();
        m.add_all(&base_vm()).unwrap();
        let before = m.devices();
        let mut batch = vec![
            uart("com2", 0x2e8),
            DeviceConfig::new("hole2", "reserved", 0xfd00_0000, 0x10),
            DeviceConfig::new("cntr2", "counter", 0xc100, 8).with_param("step", 1u64),
        ];
        batch.push(bad);
        assert!(m.add_all(&batch).is_err(), "{label}");
        assert_eq!(bus_lens(&m), [1, 1, 1], "{label}");
        assert_eq!(m.devices(), before, "{label}");
        assert_eq!(m.handle_port_read(0x2e8 + 7, Width::U8).ok(), None, "{label}");
    }
}

#[test]
fn build_through_the_builder_is_all_or_nothing_too() {
    let vm = VmDeviceConfig::new(base_vm())
        .with(DeviceConfig::new("dup", "reserved", 0x3fa, 1).with_param("space", "pio"));
    let err = DeviceManager::builder()
        .kinds(kinds())
        .interrupts(Arc::new(RecordingController::new()))
        .build(&vm)
        .unwrap_err();
    assert_eq!(err.to_string(), "device `dup`, field `base`: range overlaps device `com1`");
}

#[test]
fn irq_needs_a_controller_that_has_the_line() {
    let m = DeviceManager::new();
    let cfg = DeviceConfig::new("com1", "uart16550", 0x3f8, 8).with_irq(4);
    let Err(ManagerError::Config(e)) = m.add(cfg.clone()) else { panic!() };
    assert_eq!((e.field.as_str(), e.kind), ("irq", ConfigErrorKind::NoInterruptController));

    struct NoLines;
    impl vmio::InterruptController for NoLines {
        fn line(&self, _: u32) -> Option<Arc<dyn vmio::IrqLine>> {
            None
        }
    }
    let m = DeviceManager::builder().interrupts(Arc::new(NoLines)).build_empty();
    let Err(ManagerError::Config(e)) = m.add(cfg) else { panic!() };
    assert_eq!(e.field, "irq");
    assert!(m.pio().is_empty());
}

#[test]
fn devices_registered_directly_on_a_bus_are_respected_and_named_by_id() {
    let m = manager();
    let id = m
        .pio()
        .register(IoRange::<Pio>::new(0x60, 5).unwrap(), Arc::new(Reserved::new(0)))
        .unwrap();
    let cfg = DeviceConfig::new("kbd", "reserved", 0x64, 1).with_param("space", "pio");
    let Err(ManagerError::Config(e)) = m.add(cfg) else { panic!() };
    assert_eq!(e.kind, ConfigErrorKind::Overlap { other: id.to_string() });
    assert_eq!(m.pio().len(), 1);
    // The named device cannot be removed by a name it never had.
    assert_eq!(m.remove("kbd").unwrap_err(), ManagerError::NoSuchDevice("kbd".into()));
}

#[test]
fn a_registry_without_built_ins_refuses_them() {
    let m = DeviceManager::builder().kinds(DeviceKinds::empty()).build_empty();
    let Err(ManagerError::Config(e)) = m.add(DeviceConfig::new("com1", "uart16550", 0x3f8, 8))
    else {
        panic!()
    };
    assert_eq!(e.kind, ConfigErrorKind::UnknownKind("uart16550".into()));
    assert!(DeviceKinds::default().names().eq(["reserved", "uart16550", "virtio-blk"]));
}

#[cfg(feature = "config")]
#[test]
fn example_toml_file_builds_and_bad_files_are_named() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/vm.toml");
    let vm = VmDeviceConfig::from_toml_file(path).unwrap();
    assert!(vm.devices.iter().any(|d| d.kind == "uart16550"));
    let e = VmDeviceConfig::from_toml_file("/nonexistent/vm.toml").unwrap_err();
    let ConfigErrorKind::Io { path, error } = &e.kind else { panic!("{e}") };
    assert_eq!(path, "/nonexistent/vm.toml");
    let os = std::fs::read("/nonexistent/vm.toml").unwrap_err().to_string();
    assert_eq!(error, &os);
    assert_eq!(e.to_string(), format!("cannot read `/nonexistent/vm.toml`: {os}"));

    let text = "[[devices]]\nname = 'com1'\nkind = 'uart16550'\nbase = 0x3f8\nlength = 8\n\
                params = { output = 'discard' }\n\
                [[devices]]\nname = 'com2'\nkind = 'uart16550'\nbase = 0x3f9\nlength = 8\n";
    let vm = VmDeviceConfig::from_toml(text).unwrap();
    let Err(ManagerError::Config(e)) = DeviceManager::from_config(&vm) else { panic!() };
    assert_eq!((e.device.as_str(), e.field.as_str()), ("com2", "base"));
}

mod batches {
    //! Random batches against a model: a batch is placed whole or not at all.

    use proptest::prelude::*;

    use super::{DeviceConfig, ManagerError, bus_lens, manager};

    fn arb_config() -> impl Strategy<Value = DeviceConfig> {
        (
            0u8..6,
            prop::sample::select(vec!["reserved", "uart16550", "counter", "nope"]),
            0u64..0x40,
            prop::sample::select(vec![0u64, 1, 4, 8, 0x10, 0x100]),
            prop::option::of(0u32..6),
            prop::sample::select(vec!["mmio", "pio", "sysreg", "dma"]),
        )
            .prop_map(|(n, kind, slot, length, irq, space)| {
                let mut c = DeviceConfig::new(format!("d{n}"), kind, slot * 8, length)
                    .with_param("space", space);
                c.irq = irq;
                match kind {
                    "uart16550" => c.with_param("output", "discard"),
                    "counter" => c.with_param("step", 1u64),
                    _ => c,
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(if cfg!(miri) { 8 } else { 256 }))]

        #[test]
        fn batches_are_all_or_nothing(
            first in prop::collection::vec(arb_config(), 0..5),
            second in prop::collection::vec(arb_config(), 0..5),
        ) {
            let m = manager();
            for batch in [first, second] {
                let before = m.devices();
                let lens = bus_lens(&m);
                match m.add_all(&batch) {
                    Ok(()) => {
                        prop_assert_eq!(m.devices().len(), before.len() + batch.len());
                        let added = bus_lens(&m).iter().sum::<usize>() - lens.iter().sum::<usize>();
                        prop_assert_eq!(added, batch.len());
                        for c in &batch {
                            prop_assert!(m.info(&c.name).is_some());
                        }
                    }
                    Err(ManagerError::Config(e)) => {
                        prop_assert!(batch.iter().any(|c| c.name == e.device), "{}", e);
                        prop_assert_eq!(m.devices(), before);
                        prop_assert_eq!(bus_lens(&m), lens);
                    }
                    Err(other) => prop_assert!(false, "unexpected {}", other),
                }
            }
            // Whatever was placed never overlaps, and IRQs are unique.
            let all = m.devices();
            for (i, a) in all.iter().enumerate() {
                for b in &all[i + 1..] {
                    if a.space == b.space {
                        let (a0, a1) = (a.config.base, a.config.base + a.config.length - 1);
                        let (b0, b1) = (b.config.base, b.config.base + b.config.length - 1);
                        prop_assert!(a1 < b0 || b1 < a0, "{:?} overlaps {:?}", a, b);
                    }
                    prop_assert!(a.config.irq.is_none() || a.config.irq != b.config.irq);
                }
            }
        }
    }
}
