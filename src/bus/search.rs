//! The lookup at the heart of every dispatch: which range starts at or
//! below an address.
//!
//! Both shapes cost the same whatever the guest's address pattern, picked by
//! table size:
//!
//! * up to [`LINEAR_MAX`] starts, count the starts `<= addr` with no branch
//!   at all (every compare is independent, so the CPU runs them in parallel);
//! * above, a binary search whose step is a conditional move, so an address
//!   stream the branch predictor cannot learn costs no mispredictions.
//!
//! The benchmark that chose these (and the variants that lost) is
//! `benches/dispatch.rs`; see the `docs::performance` module.

/// Largest table searched by counting rather than bisecting. Counting is
/// a little faster up to 16 starts (no dependent loads) but costs an
/// instruction per start; with the epoch pin's fence serializing each
/// dispatch anyway, bisecting from 5 starts up keeps both low.
pub(crate) const LINEAR_MAX: usize = 4;

/// Largest table whose lookups skip the per-vCPU hint: below this, checking
/// and maintaining the hint costs about what the search does.
pub(crate) const HINT_MIN: usize = 16;

/// Index of the last element of the strictly increasing `starts` that is
/// `<= addr`, or `None` when every start is above `addr`.
#[inline]
pub(crate) fn last_start_at_or_below(starts: &[u64], addr: u64) -> Option<usize> {
    if starts.len() <= LINEAR_MAX {
        count_at_or_below(starts, addr).checked_sub(1)
    } else {
        bisect(starts, addr)
    }
}

/// How many of `starts` are `<= addr`: with sorted starts, one past the
/// answer.
#[inline(always)]
fn count_at_or_below(starts: &[u64], addr: u64) -> usize {
    starts.iter().map(|&s| usize::from(s <= addr)).sum()
}

/// Branch-free binary search over a non-empty `starts`.
#[inline(always)]
fn bisect(starts: &[u64], addr: u64) -> Option<usize> {
    let mut base = 0usize;
    let mut len = starts.len();
    while len > 1 {
        let half = len / 2;
        let mid = base + half;
        // SAFETY: `base + len <= starts.len()` holds on entry (0 + len) and
        // after each step (`base` grows by at most `half`, `len` shrinks by
        // exactly `half`), and `half < len`, so `mid < starts.len()`.
        let s = unsafe { *starts.get_unchecked(mid) };
        // The outcome is a coin flip for a random address: ask for a
        // conditional move, never a branch.
        base = core::hint::select_unpredictable(s <= addr, mid, base);
        len -= half;
    }
    // `len` started above `LINEAR_MAX`, so `starts` is not empty.
    (starts[base] <= addr).then_some(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn matches_partition_point_on_both_sides_of_the_cutover() {
        let starts: Vec<u64> = (0..70).map(|i| i * 10 + 5).collect();
        for n in 0..starts.len() {
            let s = &starts[..n];
            for addr in [0, 4, 5, 6, 14, 15, 155, 160, 165, 200, 365, 366, 694, 695, u64::MAX] {
                let want = s.partition_point(|&x| x <= addr).checked_sub(1);
                assert_eq!(last_start_at_or_below(s, addr), want, "n={n} addr={addr}");
                if n > 0 {
                    assert_eq!(bisect(s, addr), want, "bisect n={n} addr={addr}");
                }
            }
        }
    }
}
