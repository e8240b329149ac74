//! Device configuration: one [`DeviceConfig`] per device and a VM-level
//! [`VmDeviceConfig`] list, buildable in code or (with the `config` feature)
//! loaded from TOML.
//!
//! The shape mirrors ArceOS's `EmulatedDeviceConfig` / `AxVmDeviceConfig`:
//! a name, a kind, a base address, a length and an interrupt line, plus named
//! parameters instead of an untyped `cfg_list`. Every error a configuration
//! can cause is a [`ConfigError`] that names the device and the field.
//!
//! # TOML format
//!
//! ```toml
//! [[devices]]
//! name = "uart0"
//! kind = "uart16550"
//! base = 0x3f8
//! length = 8
//! irq = 4
//!
//! [[devices]]
//! name = "disk0"
//! kind = "virtio-blk"
//! base = 0x1000_1000
//! length = 0x200
//! irq = 33
//! params = { ram_size = 1048576, serial = "disk0" }
//! ```
//!
//! TOML integers are signed 64-bit; an address above `i64::MAX` may be
//! written as a string (`base = "0xffff_ffff_ffff_f000"`). A key a device
//! table does not take (a typo, or a kind parameter outside `params`) is
//! refused with the list of keys it takes. Loaded with
//! [`VmDeviceConfig::from_toml_file`], a relative `path` parameter is
//! relative to the TOML file's folder.
//!
//! One reader parses TOML (`toml_load`): [`VmDeviceConfig::from_toml`] and
//! the serde `Deserialize` impls both go through it.

use alloc::borrow::ToOwned;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::addr::{AddressSpace, Mmio, Pio, RangeError, SysReg};

/// The address space a device lives in: which of the manager's buses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "config", derive(serde::Serialize))]
#[cfg_attr(feature = "config", serde(rename_all = "lowercase"))]
pub enum Space {
    /// Memory-mapped I/O.
    Mmio,
    /// x86 port I/O.
    Pio,
    /// System registers.
    SysReg,
}

impl Space {
    /// All three spaces, in bus order.
    pub const ALL: [Space; 3] = [Space::Mmio, Space::Pio, Space::SysReg];

    /// The name used in configurations and diagnostics.
    pub const fn name(self) -> &'static str {
        match self {
            Space::Mmio => Mmio::NAME,
            Space::Pio => Pio::NAME,
            Space::SysReg => SysReg::NAME,
        }
    }

    /// Parses `"mmio"`, `"pio"` (or `"port"`) and `"sysreg"`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "mmio" => Some(Space::Mmio),
            "pio" | "port" => Some(Space::Pio),
            "sysreg" => Some(Space::SysReg),
            _ => None,
        }
    }

    /// The highest address of the space.
    pub const fn last(self) -> u64 {
        match self {
            Space::Mmio => Mmio::LAST,
            Space::Pio => Pio::LAST,
            Space::SysReg => SysReg::LAST,
        }
    }
}

impl fmt::Display for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The value of one device parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "config", derive(serde::Serialize))]
#[cfg_attr(feature = "config", serde(untagged))]
pub enum ParamValue {
    /// A boolean (`read_only = true`).
    Bool(bool),
    /// An unsigned integer (`queues = 2`).
    Int(u64),
    /// A string (`serial = "disk0"`, `path = "/var/disk.img"`).
    Str(String),
}

impl From<bool> for ParamValue {
    fn from(v: bool) -> Self {
        ParamValue::Bool(v)
    }
}
impl From<u64> for ParamValue {
    fn from(v: u64) -> Self {
        ParamValue::Int(v)
    }
}
impl From<u32> for ParamValue {
    fn from(v: u32) -> Self {
        ParamValue::Int(v.into())
    }
}
impl From<&str> for ParamValue {
    fn from(v: &str) -> Self {
        ParamValue::Str(v.to_owned())
    }
}
impl From<String> for ParamValue {
    fn from(v: String) -> Self {
        ParamValue::Str(v)
    }
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Bool(b) => write!(f, "{b}"),
            ParamValue::Int(i) => write!(f, "{i:#x}"),
            ParamValue::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// One emulated device: what it is, where it sits and what it is wired to.
///
/// The counterpart of ArceOS's `EmulatedDeviceConfig` (`name`, `emu_type`,
/// `base_gpa`, `length`, `irq_id`, `cfg_list`).
///
/// # Example
///
/// ```
/// use vmio::DeviceConfig;
///
/// let disk = DeviceConfig::new("disk0", "virtio-blk", 0x1000_1000, 0x200)
///     .with_irq(33)
///     .with_param("ram_size", 1u64 << 20)
///     .with_param("serial", "disk0");
/// assert_eq!(disk.param("serial").map(|v| v.to_string()).as_deref(), Some("\"disk0\""));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "config", derive(serde::Serialize))]
pub struct DeviceConfig {
    /// Unique name within the VM; hot-plug refers to devices by it.
    pub name: String,
    /// Device kind, looked up in the [`DeviceKinds`](crate::DeviceKinds) registry.
    pub kind: String,
    /// First address in the device's address space (which the kind decides).
    #[cfg_attr(feature = "config", serde(serialize_with = "toml_load::address"))]
    pub base: u64,
    /// Size of the decoded window in bytes (ports for port I/O).
    #[cfg_attr(feature = "config", serde(serialize_with = "toml_load::address"))]
    pub length: u64,
    /// Interrupt line, if the device raises one. No two devices share a line.
    #[cfg_attr(feature = "config", serde(skip_serializing_if = "Option::is_none"))]
    pub irq: Option<u32>,
    /// Kind-specific parameters.
    #[cfg_attr(feature = "config", serde(skip_serializing_if = "BTreeMap::is_empty"))]
    pub params: BTreeMap<String, ParamValue>,
}

impl DeviceConfig {
    /// A device without interrupt or parameters.
    pub fn new(name: impl Into<String>, kind: impl Into<String>, base: u64, length: u64) -> Self {
        DeviceConfig {
            name: name.into(),
            kind: kind.into(),
            base,
            length,
            irq: None,
            params: BTreeMap::new(),
        }
    }

    /// Sets the interrupt line.
    #[must_use]
    pub fn with_irq(mut self, irq: u32) -> Self {
        self.irq = Some(irq);
        self
    }

    /// Sets parameter `key`.
    #[must_use]
    pub fn with_param(mut self, key: impl Into<String>, value: impl Into<ParamValue>) -> Self {
        self.params.insert(key.into(), value.into());
        self
    }

    /// The raw value of parameter `key`.
    pub fn param(&self, key: &str) -> Option<&ParamValue> {
        self.params.get(key)
    }

    /// An error about this device's field `field`.
    pub fn error(&self, field: impl Into<String>, kind: ConfigErrorKind) -> ConfigError {
        ConfigError { device: self.name.clone(), field: field.into(), kind }
    }

    fn param_field(key: &str) -> String {
        let mut f = String::from("params.");
        f.push_str(key);
        f
    }

    /// Integer parameter `key`, if present.
    ///
    /// # Errors
    /// [`ConfigErrorKind::InvalidValue`] when present but not an integer.
    pub fn param_u64(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.params.get(key) {
            None => Ok(None),
            Some(ParamValue::Int(v)) => Ok(Some(*v)),
            // Large addresses may be spelled as strings (TOML integers are signed).
            Some(ParamValue::Str(s)) => parse_int(s).map(Some).ok_or_else(|| {
                self.error(
                    Self::param_field(key),
                    ConfigErrorKind::InvalidValue { expected: "an integer" },
                )
            }),
            Some(ParamValue::Bool(_)) => Err(self.error(
                Self::param_field(key),
                ConfigErrorKind::InvalidValue { expected: "an integer" },
            )),
        }
    }

    /// Boolean parameter `key`, if present.
    ///
    /// # Errors
    /// [`ConfigErrorKind::InvalidValue`] when present but not a boolean.
    pub fn param_bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.params.get(key) {
            None => Ok(None),
            Some(ParamValue::Bool(v)) => Ok(Some(*v)),
            Some(_) => Err(self.error(
                Self::param_field(key),
                ConfigErrorKind::InvalidValue { expected: "true or false" },
            )),
        }
    }

    /// String parameter `key`, if present.
    ///
    /// # Errors
    /// [`ConfigErrorKind::InvalidValue`] when present but not a string.
    pub fn param_str(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        match self.params.get(key) {
            None => Ok(None),
            Some(ParamValue::Str(v)) => Ok(Some(v)),
            Some(_) => Err(self.error(
                Self::param_field(key),
                ConfigErrorKind::InvalidValue { expected: "a string" },
            )),
        }
    }

    /// The address space named by parameter `space`, or `default`.
    ///
    /// # Errors
    /// [`ConfigErrorKind::InvalidValue`] for anything but `"mmio"`, `"pio"`
    /// (`"port"`) or `"sysreg"`.
    pub fn param_space(&self, default: Space) -> Result<Space, ConfigError> {
        match self.param_str("space")? {
            None => Ok(default),
            Some(s) => Space::from_name(s).ok_or_else(|| {
                self.error(
                    "params.space",
                    ConfigErrorKind::InvalidValue { expected: "\"mmio\", \"pio\" or \"sysreg\"" },
                )
            }),
        }
    }

    /// An error for a parameter the kind requires but the config lacks.
    pub fn missing(&self, key: &str) -> ConfigError {
        self.error(Self::param_field(key), ConfigErrorKind::MissingParam)
    }

    /// An error for a parameter whose value the kind cannot accept.
    pub fn invalid(&self, key: &str, expected: &'static str) -> ConfigError {
        self.error(Self::param_field(key), ConfigErrorKind::InvalidValue { expected })
    }
}

/// Parses a decimal or `0x`/`0o`/`0b`-prefixed integer with `_` separators.
fn parse_int(s: &str) -> Option<u64> {
    let s: String = s.trim().chars().filter(|&c| c != '_').collect();
    let (digits, radix) = match s.get(..2) {
        Some("0x" | "0X") => (&s[2..], 16),
        Some("0o") => (&s[2..], 8),
        Some("0b") => (&s[2..], 2),
        _ => (&s[..], 10),
    };
    u64::from_str_radix(digits, radix).ok()
}

/// A VM's whole device set: the counterpart of ArceOS's `AxVmDeviceConfig`.
///
/// In TOML (feature `config`), one `[[devices]]` table per device:
///
/// ```toml
/// [[devices]]
/// name = "com1"
/// kind = "uart16550"
/// base = 0x3f8
/// length = 8
/// irq = 4
///
/// [[devices]]
/// name = "hole"
/// kind = "reserved"
/// base = 0xfed0_0000
/// length = 0x1000
/// params = { value = 0 }
/// ```
///
/// TOML integers are signed 64-bit: an address above `i64::MAX` may be
/// written as a string (`base = "0xffff_ffff_ffff_f000"`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "config", derive(serde::Serialize))]
pub struct VmDeviceConfig {
    /// The devices, built in order.
    pub devices: Vec<DeviceConfig>,
}

impl VmDeviceConfig {
    /// A VM with these devices.
    pub fn new(devices: Vec<DeviceConfig>) -> Self {
        VmDeviceConfig { devices }
    }

    /// Adds a device.
    #[must_use]
    pub fn with(mut self, device: DeviceConfig) -> Self {
        self.devices.push(device);
        self
    }

    /// Parses a TOML VM description (format in the type's docs).
    ///
    /// This is the crate's only TOML parser: the serde `Deserialize` impls
    /// of [`VmDeviceConfig`], [`DeviceConfig`], [`ParamValue`] and
    /// [`Space`] go through it too, so `toml::from_str` accepts and refuses
    /// exactly what this does. Every error names the device (its `name`,
    /// or `devices[i]` when the name itself is missing) and the field; an
    /// unknown key lists the keys expected there.
    ///
    /// # Errors
    /// [`ConfigError`] with device `"<toml>"` for a syntax error, otherwise
    /// naming the offending device and field.
    #[cfg(feature = "config")]
    #[cfg_attr(docsrs, doc(cfg(feature = "config")))]
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml_load::parse(text)
    }

    /// Reads and parses a TOML VM description file.
    ///
    /// A relative `path` parameter (a `virtio-blk` disk image, or any
    /// kind's parameter named `path`) is resolved against the folder that
    /// holds the TOML file, not the working directory, so a VM file and its
    /// images can move together.
    ///
    /// # Errors
    /// As [`Self::from_toml`], with the file's path in place of `"<toml>"`;
    /// an unreadable file is [`ConfigErrorKind::Io`], naming the path and
    /// the I/O error.
    #[cfg(all(feature = "config", feature = "std"))]
    #[cfg_attr(docsrs, doc(cfg(all(feature = "config", feature = "std"))))]
    pub fn from_toml_file(path: impl AsRef<std::path::Path>) -> Result<Self, ConfigError> {
        use alloc::string::ToString;

        let path = path.as_ref();
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            device: shown.clone(),
            field: String::new(),
            kind: ConfigErrorKind::Io { path: shown.clone(), error: e.to_string() },
        })?;
        let mut vm = Self::from_toml(&text).map_err(|mut e| {
            if e.device == "<toml>" {
                e.device = shown.clone();
            }
            e
        })?;
        let folder = path.parent().unwrap_or_else(|| std::path::Path::new(""));
        for device in &mut vm.devices {
            if let Some(ParamValue::Str(p)) = device.params.get_mut("path")
                && std::path::Path::new(p.as_str()).is_relative()
            {
                *p = folder.join(p.as_str()).to_string_lossy().into_owned();
            }
        }
        Ok(vm)
    }
}

/// A configuration the manager refuses: which device, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The device's name (or `devices[i]` when it has none; `"<toml>"` or
    /// the file's path for an error in the TOML text or file itself).
    pub device: String,
    /// The offending field: `kind`, `base`, `length`, `irq`, `name` or
    /// `params.<key>` (empty when the file itself is at fault).
    pub field: String,
    /// What is wrong with it.
    pub kind: ConfigErrorKind,
}

/// What is wrong with a configuration field.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// No constructor is registered for this kind.
    UnknownKind(String),
    /// A field or parameter the kind requires is absent.
    MissingParam,
    /// A key not taken here (likely a typo, or a kind parameter written
    /// outside `params`).
    UnknownParam {
        /// The keys taken here, comma-separated (empty when none is).
        expected: String,
    },
    /// A field or parameter has a value the kind cannot use.
    InvalidValue {
        /// What would have been accepted.
        expected: &'static str,
    },
    /// Another device already has this name.
    DuplicateName,
    /// The range is empty or runs past the end of its address space.
    Range(RangeError),
    /// The range overlaps another device's.
    Overlap {
        /// The other device (`#id` when it was registered without a name).
        other: String,
    },
    /// The interrupt line is already wired to another device.
    IrqInUse {
        /// The device that has it.
        other: String,
    },
    /// The device has an `irq` but the manager has no interrupt controller.
    NoInterruptController,
    /// The kind does DMA but the manager was given no guest memory.
    NoGuestMemory,
    /// The kind's constructor failed (a backend file could not be opened…).
    Failed(String),
    /// The configuration file could not be read.
    Io {
        /// The file.
        path: String,
        /// The I/O error, as the OS reported it.
        error: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let ConfigErrorKind::Io { path, error } = &self.kind {
            return write!(f, "cannot read `{path}`: {error}");
        }
        write!(f, "device `{}`, field `{}`: ", self.device, self.field)?;
        match &self.kind {
            ConfigErrorKind::UnknownKind(k) => write!(f, "unknown device kind `{k}`"),
            ConfigErrorKind::MissingParam => f.write_str("missing"),
            ConfigErrorKind::UnknownParam { expected } if expected.is_empty() => {
                f.write_str("unknown key; none is taken here")
            }
            ConfigErrorKind::UnknownParam { expected } => {
                write!(f, "unknown key; expected one of: {expected}")
            }
            ConfigErrorKind::InvalidValue { expected } => write!(f, "expected {expected}"),
            ConfigErrorKind::DuplicateName => f.write_str("name already in use"),
            ConfigErrorKind::Range(e) => e.fmt(f),
            ConfigErrorKind::Overlap { other } => write!(f, "range overlaps device `{other}`"),
            ConfigErrorKind::IrqInUse { other } => write!(f, "line already used by `{other}`"),
            ConfigErrorKind::NoInterruptController => {
                f.write_str("an interrupt line needs an interrupt controller")
            }
            ConfigErrorKind::NoGuestMemory => {
                f.write_str("this kind needs the manager's guest memory")
            }
            ConfigErrorKind::Failed(why) => f.write_str(why),
            ConfigErrorKind::Io { .. } => Ok(()),
        }
    }
}
impl core::error::Error for ConfigError {}

#[cfg(feature = "config")]
mod toml_load;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_strings_parse_in_every_radix() {
        assert_eq!(parse_int("0xffff_ffff_ffff_f000"), Some(0xffff_ffff_ffff_f000));
        assert_eq!(parse_int("4096"), Some(4096));
        assert_eq!(parse_int("0b101"), Some(5));
        assert_eq!(parse_int("0o17"), Some(15));
        assert_eq!(parse_int("0x"), None);
        assert_eq!(parse_int("12z"), None);
    }

    #[test]
    fn typed_params_refuse_the_wrong_type() {
        let c = DeviceConfig::new("d", "k", 0, 1)
            .with_param("n", 3u64)
            .with_param("b", true)
            .with_param("s", "0x10");
        assert_eq!(c.param_u64("n"), Ok(Some(3)));
        assert_eq!(c.param_u64("s"), Ok(Some(16)));
        assert_eq!(c.param_u64("missing"), Ok(None));
        let e = c.param_u64("b").unwrap_err();
        assert_eq!((e.device.as_str(), e.field.as_str()), ("d", "params.b"));
        assert!(c.param_bool("n").is_err());
        assert!(c.param_str("b").is_err());
        assert_eq!(c.param_space(Space::Pio), Ok(Space::Pio));
        let bad = c.clone().with_param("space", "dma");
        assert_eq!(bad.param_space(Space::Mmio).unwrap_err().field, "params.space");
    }

    #[cfg(feature = "config")]
    #[test]
    fn toml_errors_name_device_and_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("[[devices]]\nkind='reserved'\nbase=0\nlength=1", "devices[0]", "name"),
            ("[[devices]]\nname='a'\nbase=0\nlength=1", "a", "kind"),
            ("[[devices]]\nname='a'\nkind='x'\nlength=1", "a", "base"),
            ("[[devices]]\nname='a'\nkind='x'\nbase=-1\nlength=1", "a", "base"),
            ("[[devices]]\nname='a'\nkind='x'\nbase=0", "a", "length"),
            ("[[devices]]\nname='a'\nkind='x'\nbase=0\nlength=1\nirq=0x1_0000_0000", "a", "irq"),
            ("[[devices]]\nname='a'\nkind='x'\nbase=0\nlength=1\nirqq=3", "a", "irqq"),
            ("[[devices]]\nname='a'\nkind='x'\nbase=0\nlength=1\nparams={v=1.5}", "a", "params.v"),
            ("[[devices]]\nname='a'\nkind='x'\nbase=0\nlength=1\nparams=3", "a", "params"),
            ("machine = 1", "<toml>", "machine"),
            ("[[devices]\n", "<toml>", "syntax"),
        ];
        for (text, device, field) in cases {
            let e = VmDeviceConfig::from_toml(text).unwrap_err();
            assert_eq!((e.device.as_str(), e.field.as_str()), (*device, *field), "{text}: {e}");
        }
    }

    #[cfg(feature = "config")]
    #[test]
    fn toml_round_trips_every_value_type() {
        let vm = VmDeviceConfig::from_toml(
            "[[devices]]\nname='d'\nkind='k'\nbase='0xffff_ffff_ffff_f000'\nlength=0x1000\n\
             irq=7\nparams={ a = true, b = 5, c = 'x' }\n",
        )
        .unwrap();
        let want = DeviceConfig::new("d", "k", 0xffff_ffff_ffff_f000, 0x1000)
            .with_irq(7)
            .with_param("a", true)
            .with_param("b", 5u64)
            .with_param("c", "x");
        assert_eq!(vm.devices, [want]);
    }
}
