//! A virtio-blk device.

mod backend;
mod request;

#[cfg(all(feature = "std", unix))]
pub use backend::FileDisk;
pub use backend::{BackendError, BackendFeatures, BlockBackend, RamDisk, SECTOR_SIZE};
