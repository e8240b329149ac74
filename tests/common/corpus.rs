//! Stable-toolchain replay of a fuzz corpus: every stored input once, then a
//! bounded batch of deterministic byte-level mutations of them, so a plain
//! `cargo test` guards what the fuzzer found without nightly.

use std::fs;
use std::panic::{self, RefUnwindSafe};
use std::path::Path;

#[path = "rng.rs"]
mod rng;
use rng::Rng;

/// The files of `fuzz/corpus/<target>`, sorted by name, with their contents.
///
/// # Panics
/// When the folder cannot be read, or holds fewer than `min_files` files
/// (a corpus that went missing must fail the test, not pass it vacuously).
pub fn load(target: &str, min_files: usize) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
        .collect();
    files.sort();
    assert!(files.len() >= min_files, "{target} seed corpus missing ({} files)", files.len());
    files
}

/// Feeds every corpus entry to `run`, failing on the first that panics.
pub fn replay(corpus: &[(String, Vec<u8>)], run: impl Fn(&[u8]) + RefUnwindSafe) {
    for (name, data) in corpus {
        let r = panic::catch_unwind(|| run(data));
        assert!(r.is_ok(), "corpus entry {name} panicked");
    }
}

/// Feeds `rounds` mutations of the corpus entries (taken in turn) to `run`:
/// each applies one to eight random byte overwrites, insertions or
/// removals, drawn from `seed` so a failure reproduces.
pub fn replay_mutations(
    corpus: &[(String, Vec<u8>)],
    seed: u64,
    rounds: usize,
    run: impl Fn(&[u8]) + RefUnwindSafe,
) {
    let mut rng = Rng::new(seed);
    for i in 0..rounds {
        let (name, seed_data) = &corpus[i % corpus.len()];
        let mut data = seed_data.clone();
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(data.len().max(1) as u64) as usize;
            match rng.below(3) {
                0 if !data.is_empty() => data[at] = rng.next() as u8,
                1 => data.insert(at.min(data.len()), rng.next() as u8),
                // `at < data.len()` here: it was drawn below the length.
                _ if data.len() > 1 => {
                    data.remove(at);
                }
                _ => {}
            }
        }
        let r = panic::catch_unwind(|| run(&data));
        assert!(r.is_ok(), "mutation {i} of {name} panicked: {data:02x?}");
    }
}
