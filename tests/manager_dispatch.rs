//! DeviceManager dispatch: the three buses, per-vCPU handles, miss
//! policies, interrupt wiring, moves and removals by name.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vmio::testing::IrqEvent;
use vmio::testing::RecordingController;
use vmio::{
    Access, AccessError, Built, ConsoleSink, Device, DeviceConfig, DeviceError, DeviceKinds,
    DeviceManager, ManagerError, MissPolicy, Space, Uart16550, VmDeviceConfig, Width,
};

/// Remembers the last access it saw, answers `offset` on reads.
#[derive(Default)]
struct Probe {
    last_vcpu: AtomicU32,
}

impl Device for Probe {
    fn read(&self, a: Access) -> Result<u64, DeviceError> {
        // Relaxed: inspected by the same thread after the call.
        self.last_vcpu.store(a.vcpu.map_or(u32::MAX, |v| v), Ordering::Relaxed);
        Ok(a.offset)
    }
    fn write(&self, a: Access, _: u64) -> Result<(), DeviceError> {
        self.last_vcpu.store(a.vcpu.map_or(u32::MAX, |v| v), Ordering::Relaxed);
        Ok(())
    }
}

fn kinds() -> DeviceKinds {
    let mut k = DeviceKinds::default();
    k.register("probe", &["space"], |env| {
        Ok(Built::new(env.config.param_space(Space::Mmio)?, Arc::new(Probe::default())))
    });
    k
}

/// Captures log records (one global logger per test binary).
struct Capture(Mutex<Vec<(log::Level, String)>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        self.0.lock().unwrap().push((r.level(), r.args().to_string()));
    }
    fn flush(&self) {}
}

fn logs() -> &'static Capture {
    static LOGGER: OnceLock<&'static Capture> = OnceLock::new();
    LOGGER.get_or_init(|| {
        let c: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        log::set_logger(c).expect("only this test binary sets a logger");
        log::set_max_level(log::LevelFilter::Trace);
        c
    })
}

#[test]
fn miss_policies_apply_per_bus_and_never_hide_other_errors() {
    let m = DeviceManager::builder()
        .kinds(kinds())
        .miss_policy(Space::Pio, MissPolicy::AllOnes)
        .miss_policy(Space::SysReg, MissPolicy::Log(log::Level::Warn))
        .build(&VmDeviceConfig::new(vec![
            DeviceConfig::new("p", "probe", 0x1000, 0x10),
            DeviceConfig::new("q", "probe", 0x70, 2).with_param("space", "pio"),
        ]))
        .unwrap();
    // MMIO: default Error.
    assert_eq!(m.miss_policy(Space::Mmio), MissPolicy::Error);
    assert_eq!(
        m.handle_mmio_read(0x2000, Width::U32).map_err(|e| e.error),
        Err(AccessError::Unmapped { addr: 0x2000 })
    );
    assert_eq!(
        m.handle_mmio_write(0x2000, Width::U32, 1).map_err(|e| e.error),
        Err(AccessError::Unmapped { addr: 0x2000 })
    );
    // Port I/O: all ones at every width, writes dropped.
    for w in [Width::U8, Width::U16, Width::U32, Width::U64] {
        assert_eq!(m.handle_port_read(0x80, w), Ok(w.mask()));
        assert_eq!(m.handle_port_write(0x80, w, 0), Ok(()));
    }
    // A straddle or a device refusal is never a "miss".
    let e = m.handle_port_read(0x71, Width::U16).unwrap_err();
    assert!(matches!(e.error, AccessError::Straddles { .. }), "{e}");
    // Manager-level errors name the device, not its per-bus id.
    assert_eq!(e.device.as_deref(), Some("q"));
    assert_eq!(e.to_string(), "2-byte pio access at 0x71 runs past the end of device `q`");

    // System registers: logged at the chosen level, then all ones.
    let logs = logs();
    assert_eq!(m.handle_sysreg_read(0xc000_0080, Width::U64), Ok(u64::MAX));
    assert_eq!(m.handle_sysreg_write(0xc000_0081, Width::U32, 0xab), Ok(()));
    {
        let got = logs.0.lock().unwrap();
        let read = got.iter().find(|(_, msg)| msg.contains("0xc0000080")).expect("read logged");
        assert_eq!(read.0, log::Level::Warn);
        assert!(read.1.contains("sysreg read"), "{}", read.1);
        let write = got.iter().find(|(_, msg)| msg.contains("0xc0000081")).expect("write logged");
        assert!(write.1.contains("0xab"), "{}", write.1);
    }

    // Policies change at run time and reach existing vCPU handles.
    let mut vcpu = m.vcpu(3);
    assert_eq!(
        vcpu.handle_mmio_read(0x2000, Width::U8).map_err(|e| e.error),
        Err(AccessError::Unmapped { addr: 0x2000 })
    );
    m.set_miss_policy(Space::Mmio, MissPolicy::Log(log::Level::Trace));
    assert_eq!(vcpu.handle_mmio_read(0x2000, Width::U8), Ok(0xff));
    assert_eq!(m.miss_policy(Space::Mmio), MissPolicy::Log(log::Level::Trace));
    let got = logs.0.lock().unwrap();
    assert!(got.iter().any(|(l, msg)| *l == log::Level::Trace && msg.contains("Some(3)")));
}

#[test]
fn vcpu_handles_reach_all_three_buses_and_carry_the_vcpu_id() {
    let m = DeviceManager::builder()
        .kinds(kinds())
        .build(&VmDeviceConfig::new(vec![
            DeviceConfig::new("m", "probe", 0x1000_0000, 0x100),
            DeviceConfig::new("p", "probe", 0x500, 0x10).with_param("space", "pio"),
            DeviceConfig::new("s", "probe", 0x3000, 0x10).with_param("space", "sysreg"),
        ]))
        .unwrap();
    let probe = |name| m.device::<Probe>(name).unwrap();
    let seen = |name| probe(name).last_vcpu.load(Ordering::Relaxed);
    std::thread::scope(|s| {
        for v in 0..2u32 {
            let m = &m;
            s.spawn(move || {
                let mut io = m.vcpu(v);
                assert_eq!(io.vcpu(), v);
                assert_eq!(io.handle_mmio_read(0x1000_0010, Width::U32), Ok(0x10));
                assert_eq!(io.handle_port_read(0x504, Width::U16), Ok(4));
                assert_eq!(io.handle_sysreg_read(0x3008, Width::U64), Ok(8));
                io.handle_mmio_write(0x1000_0000, Width::U64, 1).unwrap();
                io.handle_port_write(0x500, Width::U8, 1).unwrap();
                io.handle_sysreg_write(0x3000, Width::U32, 1).unwrap();
                assert!(io.handle_port_write(0x510, Width::U8, 1).is_err());
                assert!(io.handle_sysreg_write(0x3010, Width::U8, 1).is_err());
            });
        }
    });
    assert!(seen("m") < 2 && seen("p") < 2 && seen("s") < 2);
    // The handle-free entry points say "no vCPU".
    m.handle_port_read(0x500, Width::U8).unwrap();
    assert_eq!(seen("p"), u32::MAX);
}

#[test]
fn configured_uart_prints_to_the_console_and_raises_its_irq() {
    let out = Arc::new(Mutex::new(Vec::<(String, u8)>::new()));
    let sink = out.clone();
    let console: ConsoleSink = Arc::new(move |name: &str, bytes: &[u8]| {
        let mut o = sink.lock().unwrap();
        o.extend(bytes.iter().map(|&b| (name.to_string(), b)));
    });
    let irqs = Arc::new(RecordingController::new());
    let m = DeviceManager::builder()
        .console(console)
        .interrupts(irqs.clone())
        .build(&VmDeviceConfig::new(vec![
            DeviceConfig::new("com1", "uart16550", 0x3f8, 8).with_irq(4),
            DeviceConfig::new("com2", "uart16550", 0x2f8, 8).with_irq(3),
            DeviceConfig::new("mmio-uart", "uart16550", 0x0900_0000, 0x20)
                .with_irq(33)
                .with_param("space", "mmio")
                .with_param("reg_shift", 2u64),
        ]))
        .unwrap();
    for &b in b"ok\n" {
        m.handle_port_write(0x3f8, Width::U8, b.into()).unwrap();
    }
    m.handle_port_write(0x2f8, Width::U8, b'2'.into()).unwrap();
    m.handle_mmio_write(0x0900_0000, Width::U32, b'M'.into()).unwrap();
    let got: Vec<(String, u8)> = out.lock().unwrap().clone();
    let of = |n: &str| got.iter().filter(|(d, _)| d == n).map(|(_, b)| *b).collect::<Vec<_>>();
    assert_eq!(of("com1"), b"ok\n");
    assert_eq!(of("com2"), b"2");
    assert_eq!(of("mmio-uart"), b"M");

    // Enable "THR empty" on com1: its line (4), and only its line, goes high.
    m.handle_port_write(0x3f9, Width::U8, 0x02).unwrap();
    assert!(irqs.recording(4).level());
    assert!(!irqs.recording(3).level());
    assert_eq!(m.handle_port_read(0x3fa, Width::U8).unwrap() & 0x0f, 0x02);
    assert!(!irqs.recording(4).level(), "IIR read acknowledges THRE");
    // Input from the VMM side reaches the guest, with a receive interrupt.
    m.handle_port_write(0x2f9, Width::U8, 0x01).unwrap();
    assert_eq!(m.device::<Uart16550>("com2").unwrap().push_input(b"y"), 1);
    assert!(irqs.recording(3).level());
    assert_eq!(m.handle_port_read(0x2f8, Width::U8).unwrap(), u64::from(b'y'));
    assert!(!irqs.recording(3).level());
    let highs = irqs.recording(3).events().iter().filter(|e| **e == IrqEvent::Level(true)).count();
    assert_eq!(highs, 1);
}

#[test]
fn move_and_remove_by_name() {
    let m = DeviceManager::builder()
        .kinds(kinds())
        .build(&VmDeviceConfig::new(vec![
            DeviceConfig::new("a", "probe", 0x1000, 0x100),
            DeviceConfig::new("b", "probe", 0x2000, 0x100),
        ]))
        .unwrap();
    m.move_device("a", 0x8000).unwrap().wait().unwrap();
    assert_eq!(
        m.handle_mmio_read(0x1010, Width::U8).map_err(|e| e.error),
        Err(AccessError::Unmapped { addr: 0x1010 })
    );
    assert_eq!(m.handle_mmio_read(0x8010, Width::U8), Ok(0x10));
    assert_eq!(m.info("a").unwrap().config.base, 0x8000);
    // A move onto another device names it, and moves nothing.
    let Err(ManagerError::Config(e)) = m.move_device("a", 0x20ff) else { panic!() };
    assert_eq!((e.device.as_str(), e.field.as_str()), ("a", "base"));
    assert_eq!(e.kind, vmio::ConfigErrorKind::Overlap { other: "b".into() });
    assert!(m.move_device("a", u64::MAX).is_err());
    assert_eq!(m.handle_mmio_read(0x8000, Width::U8), Ok(0));
    assert_eq!(m.move_device("zz", 0).unwrap_err(), ManagerError::NoSuchDevice("zz".into()));

    // Remove: the device is dropped by the bus once the wait returns.
    let b = m.device::<Probe>("b").unwrap();
    m.remove("b").unwrap().wait().unwrap();
    assert_eq!(Arc::strong_count(&b), 1, "the bus let go of the device");
    assert!(m.handle_mmio_read(0x2000, Width::U8).is_err());
    assert!(m.info("b").is_none());
    // The name and range are free again.
    m.add(DeviceConfig::new("b", "probe", 0x2000, 0x100)).unwrap();
    assert_eq!(m.handle_mmio_read(0x2001, Width::U8), Ok(1));
}

#[test]
fn remove_and_wait_lowers_a_level_line_and_frees_it() {
    let irqs = Arc::new(RecordingController::new());
    let m = DeviceManager::builder().interrupts(irqs.clone()).build_empty();
    let uart = |name: &str| {
        DeviceConfig::new(name, "uart16550", 0x3f8, 8).with_irq(4).with_param("output", "discard")
    };
    m.add(uart("com1")).unwrap();
    // THR-empty interrupt enabled: the line goes high and stays high.
    m.handle_port_write(0x3f9, Width::U8, 0x02).unwrap();
    assert!(irqs.recording(4).level());
    // A plain remove leaves the line as the device left it...
    m.remove("com1").unwrap().wait().unwrap();
    assert!(irqs.recording(4).level());
    // ...`remove_and_wait` lowers it once no vCPU can raise it again.
    m.add(uart("com1")).unwrap();
    m.handle_port_write(0x3f9, Width::U8, 0x02).unwrap();
    m.remove_and_wait("com1").unwrap();
    assert!(!irqs.recording(4).level());
    assert_eq!(m.remove_and_wait("com1"), Err(ManagerError::NoSuchDevice("com1".into())));
    // The line is free for the next device.
    m.add(uart("com1b")).unwrap();
    assert_eq!(m.info("com1b").unwrap().config.irq, Some(4));
}
