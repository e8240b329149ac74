//! Property tests: random operation sequences checked against simple models.
//!
//! The virtio models drive devices with the guest-side driver of the
//! `testing` feature; `cargo test --all-features` runs them.

mod bus_model;
#[cfg(feature = "testing")]
mod virtio_blk;
#[cfg(feature = "testing")]
mod virtqueue;
