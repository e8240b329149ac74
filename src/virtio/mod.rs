//! virtio devices.

pub mod blk;
