//! Device kinds: the registry that turns a [`DeviceConfig`] into a device,
//! and the kinds built in (`uart16550`, `reserved`, `virtio-blk`).

mod blk;
mod reserved;
mod uart;

use alloc::borrow::ToOwned;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::any::Any;
use core::fmt;

pub use blk::{MAX_RAM_DISK, VirtioBlkMmio};
pub use reserved::Reserved;
pub use uart::{RX_CAPACITY, Uart16550, UartOutput};

use crate::GuestMemory;
use crate::config::{ConfigError, ConfigErrorKind, DeviceConfig, Space};
use crate::device::Device;
use crate::irq::IrqLine;

/// Receives what a configured console device (a `uart16550`) transmits:
/// the device's name and the bytes.
pub type ConsoleSink = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

/// What a kind constructor gets to build one device.
#[non_exhaustive]
pub struct BuildEnv<'a> {
    /// The device's configuration.
    pub config: &'a DeviceConfig,
    /// The line for `config.irq`, already looked up in the manager's
    /// interrupt controller (`None` when `irq` is unset).
    pub interrupt: Option<Arc<dyn IrqLine>>,
    /// The manager's console sink, if it has one.
    pub console: Option<&'a ConsoleSink>,
    /// The guest's memory, for devices that do DMA (virtio), if the manager
    /// was given it.
    pub memory: Option<&'a Arc<dyn GuestMemory>>,
}

/// A device a kind constructor built, and the bus it goes on.
pub struct Built {
    space: Space,
    device: Arc<dyn Device>,
    any: Arc<dyn Any + Send + Sync>,
}

impl Built {
    /// `device`, to be placed on the `space` bus at the config's range.
    pub fn new<D: Device + Any>(space: Space, device: Arc<D>) -> Self {
        Built { space, device: device.clone(), any: device }
    }

    /// The bus the device goes on.
    pub fn space(&self) -> Space {
        self.space
    }

    pub(crate) fn into_parts(self) -> (Space, Arc<dyn Device>, Arc<dyn Any + Send + Sync>) {
        (self.space, self.device, self.any)
    }
}

impl fmt::Debug for Built {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Built").field("space", &self.space).finish_non_exhaustive()
    }
}

/// A kind constructor.
pub type Constructor = dyn Fn(&BuildEnv<'_>) -> Result<Built, ConfigError> + Send + Sync;

#[derive(Clone)]
struct Kind {
    params: Vec<String>,
    build: Arc<Constructor>,
}

/// Maps kind names to constructors. [`DeviceKinds::default`] holds the
/// built-in kinds; a VMM adds its own with [`DeviceKinds::with`] (by value,
/// for a builder chain) or [`DeviceKinds::register`] (through `&mut`).
///
/// | kind | bus | params |
/// |---|---|---|
/// | `uart16550` | `pio` (or `space = "mmio"`) | `space`, `reg_shift`, `output` (`"console"`, `"stdout"`, `"stderr"`, `"discard"`) |
/// | `reserved` | `mmio` (or `space`) | `space`, `value` (read value, default all ones) |
/// | `virtio-blk` | `mmio` (≥ 0x200 bytes, needs `irq` and the manager's guest memory) | `path` (disk image) or `ram_size` (bytes, ≤ [`MAX_RAM_DISK`]), `read_only`, `queues`, `queue_size`, `serial` (≤ 20 bytes), `trigger` (`"level"` or `"edge"`) |
///
/// # Example
///
/// A custom kind: a bank of 64-bit scratch registers whose count comes from
/// the configuration, next to the built-in kinds.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use vmio::{Access, Built, DeviceConfig, DeviceError, DeviceKinds, DeviceManager, Space, Width};
///
/// struct Scratch(Vec<AtomicU64>);
///
/// impl vmio::Device for Scratch {
///     fn read(&self, a: Access) -> Result<u64, DeviceError> {
///         let reg = self.0.get(a.offset as usize / 8).ok_or(DeviceError::InvalidOffset(a.offset))?;
///         Ok(reg.load(Ordering::Relaxed))
///     }
///     fn write(&self, a: Access, value: u64) -> Result<(), DeviceError> {
///         let reg = self.0.get(a.offset as usize / 8).ok_or(DeviceError::InvalidOffset(a.offset))?;
///         reg.store(value, Ordering::Relaxed);
///         Ok(())
///     }
/// }
///
/// let kinds = DeviceKinds::default().with("scratch", &["registers"], |env| {
///     let cfg = env.config;
///     let n = cfg.param_u64("registers")?.unwrap_or(1);
///     if n == 0 || n * 8 > cfg.length {
///         return Err(cfg.invalid("registers", "at least 1, and 8 bytes each within `length`"));
///     }
///     let regs = (0..n).map(|_| AtomicU64::new(0)).collect();
///     Ok(Built::new(Space::Mmio, Arc::new(Scratch(regs))))
/// });
/// let manager = DeviceManager::builder().kinds(kinds).build_empty();
/// manager.add(DeviceConfig::new("scratch0", "scratch", 0x9000_0000, 0x20).with_param("registers", 4u64))?;
/// manager.handle_mmio_write(0x9000_0018, Width::U64, 7)?;
/// assert_eq!(manager.handle_mmio_read(0x9000_0018, Width::U64)?, 7);
///
/// // A parameter the kind does not take is refused, listing those it does.
/// let typo = DeviceConfig::new("scratch1", "scratch", 0x9000_1000, 0x20).with_param("regs", 4u64);
/// let e = manager.add(typo).unwrap_err().to_string();
/// assert!(e.ends_with("field `params.regs`: unknown key; expected one of: registers"), "{e}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct DeviceKinds {
    kinds: BTreeMap<String, Kind>,
}

impl Default for DeviceKinds {
    fn default() -> Self {
        let mut k = DeviceKinds::empty();
        k.register("uart16550", &["space", "reg_shift", "output"], build_uart);
        k.register("reserved", &["space", "value"], build_reserved);
        k.register("virtio-blk", blk::PARAMS, blk::build);
        k
    }
}

impl fmt::Debug for DeviceKinds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.kinds.keys()).finish()
    }
}

impl DeviceKinds {
    /// A registry with no kinds at all.
    pub fn empty() -> Self {
        DeviceKinds { kinds: BTreeMap::new() }
    }

    /// This registry with kind `name` added (or replaced), taking parameters
    /// `params`; the by-value form of [`Self::register`], for builder chains:
    /// `DeviceKinds::default().with(..).with(..)`.
    #[must_use]
    pub fn with(
        mut self,
        name: &str,
        params: &[&str],
        build: impl Fn(&BuildEnv<'_>) -> Result<Built, ConfigError> + Send + Sync + 'static,
    ) -> Self {
        self.register(name, params, build);
        self
    }

    /// Adds (or replaces) kind `name`, taking parameters `params` (any other
    /// parameter in a config is refused as a likely typo, with the list of
    /// those the kind takes).
    pub fn register(
        &mut self,
        name: &str,
        params: &[&str],
        build: impl Fn(&BuildEnv<'_>) -> Result<Built, ConfigError> + Send + Sync + 'static,
    ) -> &mut Self {
        let params = params.iter().map(|&p| p.to_owned()).collect();
        self.kinds.insert(name.to_owned(), Kind { params, build: Arc::new(build) });
        self
    }

    /// Whether kind `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.kinds.contains_key(name)
    }

    /// The registered kind names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }

    /// Checks the kind and its parameter names, then runs its constructor.
    pub(crate) fn build(&self, env: &BuildEnv<'_>) -> Result<Built, ConfigError> {
        let cfg = env.config;
        let kind = self
            .kinds
            .get(&cfg.kind)
            .ok_or_else(|| cfg.error("kind", ConfigErrorKind::UnknownKind(cfg.kind.clone())))?;
        if let Some(unknown) = cfg.params.keys().find(|p| !kind.params.contains(p)) {
            let mut field = String::from("params.");
            field.push_str(unknown);
            let expected = kind.params.join(", ");
            return Err(cfg.error(field, ConfigErrorKind::UnknownParam { expected }));
        }
        (kind.build)(env)
    }
}

fn build_uart(env: &BuildEnv<'_>) -> Result<Built, ConfigError> {
    let cfg = env.config;
    let space = cfg.param_space(Space::Pio)?;
    let shift = cfg.param_u64("reg_shift")?.unwrap_or(0);
    if shift > 3 {
        return Err(cfg.invalid("reg_shift", "0, 1, 2 or 3"));
    }
    let output = cfg.param_str("output")?.unwrap_or("console");
    let uart = match (output, env.console) {
        ("console", Some(sink)) => {
            let (sink, name) = (sink.clone(), cfg.name.clone());
            Uart16550::new(move |bytes| sink(&name, bytes))
        }
        #[cfg(feature = "std")]
        ("console" | "stdout", _) => Uart16550::with_writer(std::io::stdout()),
        #[cfg(feature = "std")]
        ("stderr", _) => Uart16550::with_writer(std::io::stderr()),
        #[cfg(not(feature = "std"))]
        ("console", None) => Uart16550::new(|_| {}),
        ("discard", _) => Uart16550::new(|_| {}),
        _ => {
            return Err(cfg.invalid("output", "\"console\", \"stdout\", \"stderr\" or \"discard\""));
        }
    };
    // `shift <= 3` was checked above.
    let mut uart = uart.with_reg_shift(shift as u32);
    if let Some(irq) = env.interrupt.clone() {
        uart = uart.with_interrupt(irq);
    }
    if cfg.length < uart.window() {
        return Err(cfg.error(
            "length",
            ConfigErrorKind::InvalidValue { expected: "at least 8 << reg_shift bytes" },
        ));
    }
    Ok(Built::new(space, Arc::new(uart)))
}

fn build_reserved(env: &BuildEnv<'_>) -> Result<Built, ConfigError> {
    let cfg = env.config;
    let space = cfg.param_space(Space::Mmio)?;
    let value = cfg.param_u64("value")?.unwrap_or(u64::MAX);
    if cfg.irq.is_some() {
        return Err(cfg.error(
            "irq",
            ConfigErrorKind::InvalidValue { expected: "no interrupt for a reserved hole" },
        ));
    }
    Ok(Built::new(space, Arc::new(Reserved::new(value))))
}
