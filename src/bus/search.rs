//! The lookup at the heart of every dispatch.

/// Index of the last element of the sorted `starts` that is `<= addr`.
///
/// Branch-free binary search: the loop runs `log2(n)` times whatever the
/// data, and the compare compiles to a conditional move, so a random address
/// stream costs no mispredictions.
#[inline]
pub(crate) fn last_start_at_or_below(starts: &[u64], addr: u64) -> Option<usize> {
    let mut base = 0usize;
    let mut len = starts.len();
    if len == 0 {
        return None;
    }
    while len > 1 {
        let half = len / 2;
        // `base + half < base + len <= starts.len()`.
        base = if starts[base + half] <= addr { base + half } else { base };
        len -= half;
    }
    if starts[base] <= addr { Some(base) } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_partition_point() {
        let starts: alloc::vec::Vec<u64> = (0..37).map(|i| i * 10 + 5).collect();
        for n in 0..starts.len() {
            let s = &starts[..n];
            for addr in [0, 4, 5, 6, 14, 15, 200, 365, 366, u64::MAX] {
                let want = s.partition_point(|&x| x <= addr).checked_sub(1);
                assert_eq!(last_start_at_or_below(s, addr), want, "n={n} addr={addr}");
            }
        }
    }
}
