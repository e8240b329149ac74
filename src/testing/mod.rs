//! A guest-side virtio driver for tests, behind the `testing` feature so
//! other crates can test their own devices with it.
//!
//! - [`GuestQueue`]: the driver half of a split virtqueue in guest memory —
//!   direct and indirect chains, publishing, reaping the used ring, plus raw
//!   writers for building malformed rings.
//! - [`MmioDriver`]: brings a device up through its virtio-mmio registers in
//!   the order Linux does (or with ACKNOWLEDGE | DRIVER in one write), sets up
//!   queues, notifies, acknowledges interrupts, reads config space; over a
//!   [`Device`](crate::Device) directly ([`DirectIo`]) or through a bus
//!   ([`BusIo`]).
//! - [`EchoDevice`]: a minimal multi-queue [`VirtioDevice`](crate::virtio::VirtioDevice)
//!   with one lock per queue, for testing transports.
//! - [`Hostile`]: builders for every malformed ring, each with the outcome a
//!   correct device must show ([`Expect`]).
//! - proptest strategies: [`chain`] (well-formed chains as [`ChainSpec`]),
//!   [`queue_size`], [`garbage`] (ring bytes biased towards edge values).
//! - [`fuzz_mmio`]: the body of the virtio-mmio fuzz target, so its corpus
//!   replays under an ordinary `cargo test`; [`fuzz_blk`] the same for the
//!   virtio-blk target.
//! - [`GuestAlloc`]: a bump allocator for buffers in guest memory.
//! - [`BlkRequest`]: a virtio-blk request laid out as a driver does;
//!   [`FaultyDisk`]: a backend that counts operations and fails, delays or
//!   blocks them on a test's hook ([`BackendOp`]).
//! - [`RecordingIrq`] / [`RecordingController`]: interrupt lines that
//!   record what they were asked ([`IrqEvent`]).
//! - [`Intercept`]: a device wrapper that forwards every call and runs a
//!   [`ServeHook`] around the queue calls (serve, queue stopped/started);
//!   [`CountCalls`] counts them.

mod blk;
mod echo;
mod fuzz;
mod fuzz_blk;
mod hostile;
mod intercept;
mod irq;
mod mmio;
mod queue;
mod strategies;

pub use blk::{BackendOp, BlkRequest, FaultyDisk};
pub use echo::{ECHO_CONFIG_LEN, ECHO_DEVICE_TYPE, EchoDevice};
pub use fuzz::{FUZZ_RAM, fuzz_mmio};
pub use fuzz_blk::{FUZZ_BLK_RAM, fuzz_blk};
pub use hostile::{Expect, Hostile, HostileEnv};
pub use intercept::{CountCalls, Intercept, ServeHook};
pub use irq::{IrqEvent, RecordingController, RecordingIrq};
#[cfg(feature = "std")]
pub use mmio::BusIo;
pub use mmio::{DirectIo, InitOptions, MmioDriver, RegisterIo};
pub use queue::{Buf, DriverError, GuestAlloc, GuestQueue, write_desc_at};
pub use strategies::{ChainSpec, chain, garbage, queue_size};
