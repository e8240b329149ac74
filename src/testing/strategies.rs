//! proptest strategies for descriptor chains and ring garbage.

use alloc::vec::Vec;

use proptest::prelude::*;

use super::queue::{Buf, GuestAlloc};

/// The shape of one well-formed chain: buffer lengths, readable ones first,
/// and whether it travels in an indirect table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSpec {
    /// `(len, writable)` per buffer; every readable buffer precedes every
    /// writable one, and no length is 0.
    pub bufs: Vec<(u32, bool)>,
    /// Put the buffers in an indirect table.
    pub indirect: bool,
}

impl ChainSpec {
    /// Allocates the buffers from `alloc` (8-byte aligned).
    pub fn place(&self, alloc: &mut GuestAlloc) -> Vec<Buf> {
        self.bufs
            .iter()
            .map(|&(len, writable)| Buf { addr: alloc.alloc(u64::from(len), 8), len, writable })
            .collect()
    }

    /// Total bytes of the readable buffers.
    pub fn readable_len(&self) -> u32 {
        self.bufs.iter().filter(|b| !b.1).map(|b| b.0).sum()
    }

    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> u32 {
        self.bufs.iter().filter(|b| b.1).map(|b| b.0).sum()
    }
}

/// A well-formed chain of 1 to `max_bufs` buffers of 1 to `max_len` bytes,
/// direct or indirect.
pub fn chain(max_bufs: usize, max_len: u32) -> impl Strategy<Value = ChainSpec> {
    (prop::collection::vec(1..=max_len, 1..=max_bufs), any::<prop::sample::Index>(), any::<bool>())
        .prop_map(|(lens, split, indirect)| {
            let k = split.index(lens.len() + 1);
            let bufs = lens.into_iter().enumerate().map(|(i, l)| (l, i >= k)).collect();
            ChainSpec { bufs, indirect }
        })
}

/// A split-queue size: a power of two from 1 to `max`.
pub fn queue_size(max: u16) -> impl Strategy<Value = u16> {
    let top = 15 - max.leading_zeros().min(15);
    (0..=top).prop_map(|shift| 1u16 << shift)
}

/// `len` arbitrary bytes, biased towards values that hit edge cases in
/// ring fields (0, all-ones, small indices, the flag bits).
pub fn garbage(len: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => any::<u8>(),
        2 => Just(0u8),
        1 => Just(0xffu8),
        2 => 0u8..8,
    ];
    prop::collection::vec(byte, len)
}
