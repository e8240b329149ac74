//! Arbitrary register accesses and guest-memory contents against a virtio
//! device behind the virtio-mmio transport. The body lives in
//! `vmio::testing::fuzz_mmio` so `cargo test` replays the corpus on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmio::testing::fuzz_mmio(data));
