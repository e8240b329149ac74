//! Replays the virtio-mmio fuzz corpus (`fuzz/corpus/virtio_mmio`) on
//! stable, plus a bounded batch of seed mutations, so `cargo test` guards
//! what the fuzzer found without needing nightly.

#[path = "common/corpus.rs"]
mod corpus;

use vmio::testing::fuzz_mmio;

#[test]
fn corpus_replays_without_panic() {
    corpus::replay(&corpus::load("virtio_mmio", 29), fuzz_mmio);
}

#[test]
fn seed_mutations_do_not_panic() {
    let rounds = if cfg!(miri) { 4 } else { 400 };
    corpus::replay_mutations(
        &corpus::load("virtio_mmio", 29),
        0x2545_f491_4f6c_dd1d,
        rounds,
        fuzz_mmio,
    );
}
