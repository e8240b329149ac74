//! The one pseudo-random generator of the tests, benches and examples:
//! Marsaglia's xorshift64 (shifts 13, 7, 17). Deterministic, so a failure
//! reproduces from its seed and a bench measures the same address stream on
//! every run; no dependency, and a step costs a few instructions, so it
//! never dominates what a bench measures.
//!
//! Included by path (`#[path = ".../common/rng.rs"] mod rng;`), since
//! tests, benches and examples are separate crates; the library's unit
//! tests include it the same way.
#![allow(dead_code)]

/// An xorshift64 generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator started from `seed`. Zero, the one state xorshift never
    /// leaves, is replaced by a fixed non-zero constant.
    pub const fn new(seed: u64) -> Self {
        Rng(if seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { seed })
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `0..n` (`n > 0`); the modulo bias is negligible for the
    /// small `n` used here.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
