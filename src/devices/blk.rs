//! The `virtio-blk` kind: a [`VirtioBlk`] on a virtio-mmio transport.

use alloc::string::ToString;
use alloc::sync::Arc;

use crate::config::{ConfigError, ConfigErrorKind, Space};
use crate::virtio::blk::{BlkConfig, BlkConfigError, BlockBackend, ID_LEN, RamDisk, VirtioBlk};
use crate::virtio::{MmioTransport, Trigger};

use super::{BuildEnv, Built};

/// What the `virtio-blk` kind builds: every disk has this type whatever its
/// backend, so `DeviceManager::device::<VirtioBlkMmio>(name)` finds it.
pub type VirtioBlkMmio = MmioTransport<VirtioBlk<Arc<dyn BlockBackend>>>;

/// Largest RAM disk the kind creates from a configuration. Creating one
/// costs next to nothing (on Linux its pages are mapped lazily, and the
/// chunk locks are a fixed set of 1024 stripes whatever the size), but the
/// guest can make every sector resident by writing it, and a RAM disk never
/// gives memory back while it lives (discard and write-zeroes only zero), so
/// this bounds the host RAM one configured disk can take; bigger disks
/// belong in a file (`path`). Without `std` the disk is allocated and
/// zeroed in full when created.
pub const MAX_RAM_DISK: u64 = 4 << 30;

/// Bytes of MMIO window a virtio-mmio device decodes (registers and config).
const WINDOW: u64 = 0x200;

pub(super) const PARAMS: &[&str] =
    &["path", "ram_size", "read_only", "queues", "queue_size", "serial", "trigger"];

pub(super) fn build(env: &BuildEnv<'_>) -> Result<Built, ConfigError> {
    let cfg = env.config;
    let memory =
        env.memory.cloned().ok_or_else(|| cfg.error("kind", ConfigErrorKind::NoGuestMemory))?;
    let line =
        env.interrupt.clone().ok_or_else(|| cfg.error("irq", ConfigErrorKind::MissingParam))?;
    if cfg.length < WINDOW {
        return Err(
            cfg.error("length", ConfigErrorKind::InvalidValue { expected: "at least 0x200 bytes" })
        );
    }
    let read_only = cfg.param_bool("read_only")?.unwrap_or(false);
    let mut blk = BlkConfig { read_only, ..BlkConfig::default() };
    if let Some(n) = cfg.param_u64("queues")? {
        blk.num_queues = u16::try_from(n).map_err(|_| cfg.invalid("queues", "1 to 1024"))?;
    }
    if let Some(n) = cfg.param_u64("queue_size")? {
        blk.queue_size = u16::try_from(n)
            .map_err(|_| cfg.invalid("queue_size", "a power of two up to 32768"))?;
    }
    if let Some(serial) = cfg.param_str("serial")? {
        if serial.len() > ID_LEN {
            return Err(cfg.invalid("serial", "at most 20 bytes"));
        }
        blk = blk.with_id(serial);
    }
    let trigger = match cfg.param_str("trigger")?.unwrap_or("level") {
        "level" => Trigger::Level,
        "edge" => Trigger::Edge,
        _ => return Err(cfg.invalid("trigger", "\"level\" or \"edge\"")),
    };
    let backend = backend(env, read_only)?;
    let device = VirtioBlk::new(backend, blk).map_err(|e| {
        let field = match e {
            BlkConfigError::NumQueues(_) => "queues",
            BlkConfigError::QueueSize(_) => "queue_size",
            BlkConfigError::EmptyDisk if cfg.params.contains_key("path") => "path",
            BlkConfigError::EmptyDisk => "ram_size",
            _ => return cfg.error("params", ConfigErrorKind::Failed(e.to_string())),
        };
        let mut f = alloc::string::String::from("params.");
        f.push_str(field);
        cfg.error(f, ConfigErrorKind::Failed(e.to_string()))
    })?;
    let transport: VirtioBlkMmio = MmioTransport::new(device, memory, line, trigger);
    Ok(Built::new(Space::Mmio, Arc::new(transport)))
}

fn backend(env: &BuildEnv<'_>, read_only: bool) -> Result<Arc<dyn BlockBackend>, ConfigError> {
    let cfg = env.config;
    let ram_size = cfg.param_u64("ram_size")?;
    let path = cfg.param_str("path")?;
    match (path, ram_size) {
        (Some(_), Some(_)) => Err(cfg.invalid("ram_size", "either `path` or `ram_size`, not both")),
        (None, None) => Err(cfg.error(
            "params",
            ConfigErrorKind::InvalidValue {
                expected: "a backend: `path` (a disk image) or `ram_size` (bytes)",
            },
        )),
        (None, Some(size)) => {
            if size > MAX_RAM_DISK {
                return Err(cfg.invalid("ram_size", "at most 4 GiB (use `path` for larger disks)"));
            }
            let disk = RamDisk::new(size);
            Ok(Arc::new(if read_only { disk.read_only() } else { disk }))
        }
        #[cfg(all(feature = "std", unix))]
        (Some(path), None) => {
            let disk = crate::virtio::blk::FileDisk::open(path, read_only).map_err(|e| {
                cfg.error("params.path", ConfigErrorKind::Failed(std::format!("{path}: {e}")))
            })?;
            Ok(Arc::new(disk))
        }
        #[cfg(not(all(feature = "std", unix)))]
        (Some(_), None) => {
            Err(cfg.invalid("path", "no file backend in this build: use `ram_size`"))
        }
    }
}
