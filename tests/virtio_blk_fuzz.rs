//! Replays the virtio-blk fuzz seeds (`fuzz/corpus/virtio_blk`, written by
//! `fuzz/gen_blk_seeds.py`) on stable, plus a bounded batch of deterministic
//! mutations of them, so `cargo test` covers the request parser with
//! arbitrary contents without needing nightly.

#[path = "common/corpus.rs"]
mod corpus;

use vmio::testing::fuzz_blk;

#[test]
fn corpus_replays_without_panic() {
    corpus::replay(&corpus::load("virtio_blk", 11), fuzz_blk);
}

#[test]
fn seed_mutations_do_not_panic() {
    let rounds = if cfg!(miri) { 4 } else { 600 };
    corpus::replay_mutations(
        &corpus::load("virtio_blk", 11),
        0x9e37_79b9_7f4a_7c15,
        rounds,
        fuzz_blk,
    );
}
