//! A guest-side virtio driver for tests, behind the `testing` feature so
//! other crates can test their own devices with it.
//!
//! - [`GuestQueue`]: the driver half of a split virtqueue in guest memory —
//!   direct and indirect chains, publishing, reaping the used ring, plus raw
//!   writers for building malformed rings.
//! - [`GuestAlloc`]: a bump allocator for buffers in guest memory.

mod queue;

pub use queue::{Buf, DriverError, GuestAlloc, GuestQueue, write_desc_at};
