//! The VM's devices: read from the TOML file, built by vmio's
//! `DeviceManager`, plus the one kind this VMM adds (the i8042 reset port).

use std::sync::Arc;

use vmio::GuestMemory;
use vmio::{
    Access, Built, ConfigErrorKind, Device, DeviceError, DeviceKinds, DeviceManager, MissPolicy,
    ParamValue, Space, VmDeviceConfig,
};

use crate::console::Console;
use crate::irq::IrqfdController;

/// The kind name of the reset port in the TOML file.
pub const I8042_KIND: &str = "i8042-reset";

/// The i8042 keyboard controller's command port, reduced to what a guest
/// uses to reset the machine: command 0xfe pulses the CPU reset line.
/// Reads report an idle controller (no input waiting, input buffer empty),
/// so the kernel's wait-for-ready loop before the command ends at once.
pub struct I8042Reset {
    on_reset: Arc<dyn Fn() + Send + Sync>,
}

const CMD_RESET: u64 = 0xfe;

impl Device for I8042Reset {
    fn read(&self, _access: Access) -> Result<u64, DeviceError> {
        Ok(0)
    }

    fn write(&self, _access: Access, value: u64) -> Result<(), DeviceError> {
        if value & 0xff == CMD_RESET {
            (self.on_reset)();
        }
        Ok(())
    }
}

/// A virtio-blk disk of the configuration, as the kernel command line and
/// the report need it.
pub struct Disk {
    /// Its name in the TOML file.
    pub name: String,
    /// MMIO window.
    pub base: u64,
    /// Window length.
    pub length: u64,
    /// IOAPIC pin.
    pub irq: u32,
    /// The transport vmio built.
    pub transport: Arc<vmio::VirtioBlkMmio>,
}

/// Reads the TOML file and points the named disks at the given images.
pub fn load_config(path: &str, disks: &[(String, String)]) -> Result<VmDeviceConfig, String> {
    let mut vm = VmDeviceConfig::from_toml_file(path).map_err(|e| format!("{path}: {e}"))?;
    for (name, image) in disks {
        let dev = vm
            .devices
            .iter_mut()
            .find(|d| &d.name == name)
            .ok_or_else(|| format!("--disk {name}: no device of that name in {path}"))?;
        if dev.kind != "virtio-blk" {
            return Err(format!("--disk {name}: `{name}` is a {}, not a virtio-blk", dev.kind));
        }
        dev.params.remove("ram_size");
        dev.params.insert("path".into(), ParamValue::Str(image.clone()));
    }
    Ok(vm)
}

/// Everything `build` makes.
pub struct Devices {
    pub manager: Arc<DeviceManager>,
    pub disks: Vec<Disk>,
}

/// Builds every device of `vm` with a `DeviceManager`.
///
/// Misses are errors at the manager (the vCPU loop counts them, then
/// answers as an undecoded bus would); the console goes to `console`; a
/// guest reset calls `on_reset`.
pub fn build(
    vm: &VmDeviceConfig,
    memory: Arc<dyn GuestMemory>,
    interrupts: Arc<IrqfdController>,
    console: Arc<Console>,
    on_reset: Arc<dyn Fn() + Send + Sync>,
) -> Result<Devices, String> {
    let mut kinds = DeviceKinds::default();
    kinds.register(I8042_KIND, &[], move |env| {
        let cfg = env.config;
        if cfg.length != 1 {
            return Err(cfg.error(
                "length",
                ConfigErrorKind::InvalidValue { expected: "1 (the command port alone)" },
            ));
        }
        let device = I8042Reset { on_reset: on_reset.clone() };
        Ok(Built::new(Space::Pio, Arc::new(device)))
    });
    let manager = DeviceManager::builder()
        .kinds(kinds)
        .console(Arc::new(move |_name: &str, bytes: &[u8]| console.output(bytes)))
        .interrupts(interrupts)
        .memory(memory)
        .miss_policy(Space::Mmio, MissPolicy::Error)
        .miss_policy(Space::Pio, MissPolicy::Error)
        .build(vm)
        .map_err(|e| format!("devices: {e}"))?;
    let mut disks = Vec::new();
    for cfg in vm.devices.iter().filter(|d| d.kind == "virtio-blk") {
        let transport = manager
            .device::<vmio::VirtioBlkMmio>(&cfg.name)
            .ok_or_else(|| format!("{}: not a virtio-blk transport", cfg.name))?;
        let irq = cfg.irq.ok_or_else(|| format!("{}: a disk needs an irq", cfg.name))?;
        disks.push(Disk {
            name: cfg.name.clone(),
            base: cfg.base,
            length: cfg.length,
            irq,
            transport,
        });
    }
    Ok(Devices { manager: Arc::new(manager), disks })
}

/// The kernel command-line entries announcing the disks, in TOML order
/// (the first becomes `vda`).
pub fn cmdline_entries(disks: &[Disk]) -> String {
    disks
        .iter()
        .map(|d| format!(" virtio_mmio.device={}@{:#x}:{}", d.length, d.base, d.irq))
        .collect()
}
