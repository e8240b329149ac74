//! Replays the virtio-blk fuzz seeds (`fuzz/corpus/virtio_blk`, written by
//! `fuzz/gen_blk_seeds.py`) on stable, plus a bounded batch of deterministic
//! mutations of them, so a plain `cargo test` covers the request parser
//! with arbitrary contents without needing nightly.

use std::fs;
use std::path::Path;

use vmio::testing::fuzz_blk;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/virtio_blk");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

#[test]
fn corpus_replays_without_panic() {
    let files = corpus();
    assert!(files.len() >= 11, "seed corpus missing ({} files)", files.len());
    for (name, data) in &files {
        let r = std::panic::catch_unwind(|| fuzz_blk(data));
        assert!(r.is_ok(), "corpus entry {name} panicked");
    }
}

#[test]
fn seed_mutations_do_not_panic() {
    // xorshift64*: deterministic, so a failure reproduces.
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let seeds = corpus();
    let rounds = if cfg!(miri) { 4 } else { 600 };
    for i in 0..rounds {
        let mut data = seeds[i % seeds.len()].1.clone();
        for _ in 0..1 + rand() % 8 {
            let at = (rand() as usize) % data.len().max(1);
            match rand() % 3 {
                0 if !data.is_empty() => data[at] = rand() as u8,
                1 => data.insert(at.min(data.len()), rand() as u8),
                _ if data.len() > 1 => {
                    data.remove(at.min(data.len() - 1));
                }
                _ => {}
            }
        }
        let r = std::panic::catch_unwind(|| fuzz_blk(&data));
        assert!(r.is_ok(), "mutation {i} of {} panicked: {data:?}", seeds[i % seeds.len()].0);
    }
}
