//! virtio-blk requests with fuzzer-chosen types, sectors, layouts and
//! payloads, plus notifies, config writes, resets and raw guest-memory
//! writes. The body lives in `vmio::testing::fuzz_blk` so `cargo test`
//! replays the seeds on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmio::testing::fuzz_blk(data));
