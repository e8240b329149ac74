//! Property tests: random operation sequences checked against simple models.

mod bus_model;
mod virtio_blk;
mod virtqueue;
