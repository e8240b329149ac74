//! TOML to configuration, by hand so every error can name its device
//! and list what was expected; the serde impls delegate here.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde::de::{Deserialize, Deserializer, Error as _};
use serde::ser::Serializer;
use toml::{Table, Value};

use super::{
    ConfigError, ConfigErrorKind, DeviceConfig, ParamValue, Space, VmDeviceConfig, parse_int,
};

/// The keys of a `[[devices]]` table.
const DEVICE_KEYS: &str =
    "name, kind, base, length, irq, params (kind parameters go inside `params`)";

fn err(device: &str, field: &str, kind: ConfigErrorKind) -> ConfigError {
    ConfigError { device: device.into(), field: field.into(), kind }
}

fn unknown(device: &str, field: &str, expected: &str) -> ConfigError {
    err(device, field, ConfigErrorKind::UnknownParam { expected: expected.into() })
}

pub(super) fn parse(text: &str) -> Result<VmDeviceConfig, ConfigError> {
    let root: Table = toml::from_str(text)
        .map_err(|e| err("<toml>", "syntax", ConfigErrorKind::Failed(e.to_string())))?;
    vm(&root)
}

fn vm(root: &Table) -> Result<VmDeviceConfig, ConfigError> {
    let mut devices = Vec::new();
    for (key, value) in root {
        if key != "devices" {
            return Err(unknown("<toml>", key, "devices (one `[[devices]]` table each)"));
        }
        let Value::Array(list) = value else {
            return Err(err(
                "<toml>",
                "devices",
                ConfigErrorKind::InvalidValue { expected: "an array of tables" },
            ));
        };
        for (i, item) in list.iter().enumerate() {
            let label = format!("devices[{i}]");
            let Value::Table(t) = item else {
                return Err(err(
                    &label,
                    "devices",
                    ConfigErrorKind::InvalidValue { expected: "a table" },
                ));
            };
            devices.push(device(&label, t)?);
        }
    }
    Ok(VmDeviceConfig { devices })
}

fn device(label: &str, t: &Table) -> Result<DeviceConfig, ConfigError> {
    let name = match t.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => {
            return Err(err(
                label,
                "name",
                ConfigErrorKind::InvalidValue { expected: "a non-empty string" },
            ));
        }
        None => return Err(err(label, "name", ConfigErrorKind::MissingParam)),
    };
    let n = name.as_str();
    if let Some(key) = t
        .keys()
        .find(|k| !matches!(k.as_str(), "name" | "kind" | "base" | "length" | "irq" | "params"))
    {
        return Err(unknown(n, key, DEVICE_KEYS));
    }
    let kind = match t.get("kind") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(err(n, "kind", ConfigErrorKind::InvalidValue { expected: "a string" }));
        }
        None => return Err(err(n, "kind", ConfigErrorKind::MissingParam)),
    };
    let base = int(n, "base", t.get("base"))?
        .ok_or_else(|| err(n, "base", ConfigErrorKind::MissingParam))?;
    let length = int(n, "length", t.get("length"))?
        .ok_or_else(|| err(n, "length", ConfigErrorKind::MissingParam))?;
    let irq = int(n, "irq", t.get("irq"))?
        .map(|v| {
            u32::try_from(v).map_err(|_| {
                err(n, "irq", ConfigErrorKind::InvalidValue { expected: "a 32-bit line number" })
            })
        })
        .transpose()?;
    let mut cfg = DeviceConfig::new(name.clone(), kind, base, length);
    cfg.irq = irq;
    match t.get("params") {
        None => {}
        Some(Value::Table(params)) => {
            for (k, v) in params {
                let value = param(v).map_err(|expected| {
                    err(n, &format!("params.{k}"), ConfigErrorKind::InvalidValue { expected })
                })?;
                cfg.params.insert(String::from(k.as_str()), value);
            }
        }
        Some(_) => {
            return Err(err(n, "params", ConfigErrorKind::InvalidValue { expected: "a table" }));
        }
    }
    Ok(cfg)
}

fn param(v: &Value) -> Result<ParamValue, &'static str> {
    match v {
        Value::Boolean(b) => Ok(ParamValue::Bool(*b)),
        Value::String(s) => Ok(ParamValue::Str(s.clone())),
        Value::Integer(i) => {
            u64::try_from(*i).map(ParamValue::Int).map_err(|_| "a non-negative integer")
        }
        _ => Err("a boolean, an integer or a string"),
    }
}

fn int(device: &str, field: &str, v: Option<&Value>) -> Result<Option<u64>, ConfigError> {
    let bad =
        || err(device, field, ConfigErrorKind::InvalidValue { expected: "a non-negative integer" });
    match v {
        None => Ok(None),
        Some(Value::Integer(i)) => u64::try_from(*i).map(Some).map_err(|_| bad()),
        Some(Value::String(s)) => parse_int(s).map(Some).ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

/// Serializes an address as a TOML integer, or as a hex string above
/// `i64::MAX` (TOML integers are signed), which [`int`] reads back.
pub(super) fn address<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    match i64::try_from(*v) {
        Ok(i) => s.serialize_i64(i),
        Err(_) => s.serialize_str(&format!("{v:#x}")),
    }
}

impl<'de> Deserialize<'de> for VmDeviceConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        vm(&Table::deserialize(d)?).map_err(D::Error::custom)
    }
}

impl<'de> Deserialize<'de> for DeviceConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        device("<device>", &Table::deserialize(d)?).map_err(D::Error::custom)
    }
}

impl<'de> Deserialize<'de> for ParamValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        param(&Value::deserialize(d)?)
            .map_err(|expected| D::Error::custom(format!("expected {expected}")))
    }
}

impl<'de> Deserialize<'de> for Space {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Space::from_name(&name).ok_or_else(|| {
            D::Error::custom(format!("unknown space `{name}`: expected mmio, pio or sysreg"))
        })
    }
}
