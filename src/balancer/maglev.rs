//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted, written here: a few dozen
//! lines, and the crates that offer it either use an unstable hash (so two Velocity processes,
//! or two versions, would disagree on the mapping) or lack weights.
//!
//! The table has a prime number M of slots (at least 65,537, and 128 per backend); each backend
//! claims slots along its own permutation of them, in turns, as often as its weight says, so
//! its share of the slots is its share of the weight to within one slot in M. A key hashes to
//! a slot. The table depends only on the set of backends (their ids) and weights, not on
//! their order: removing one moves little more than its own keys, and putting it back restores
//! the table exactly.
//!
//! Unusable backends (down, draining, full) are not taken out of the table: a key whose
//! backend cannot take it walks on to further slots, its next choices, so the keys of every
//! other backend stay where they are. The walk's stride comes from the key's hash (any stride
//! visits every slot, M being prime): neighbouring slots are correlated by the fill, so a
//! walk of +1 would pile a down backend's keys onto a few of the others.

/// Slots per backend at least; more slots, less disruption and truer weights (the paper uses
/// M ≥ 100 N).
const SLOTS_PER_BACKEND: usize = 128;
const MIN_SLOTS: usize = 65_537;

#[derive(Debug)]
pub struct Maglev {
    /// Slot → index of the backend in the pool.
    table: Box<[u32]>,
}

impl Maglev {
    /// `ids[i]`: a stable identity of backend `i` (a hash of its address); `weights[i]` its
    /// weight. Building is O(M log M) for equal weights; it runs at load, never per request.
    pub fn new(ids: &[u64], weights: &[u32]) -> Maglev {
        let n = ids.len();
        if n == 0 {
            return Maglev { table: Box::new([]) };
        }
        let m = next_prime(MIN_SLOTS.max(n * SLOTS_PER_BACKEND)) as u64;
        // Fill in the order of the ids, so the config's order does not matter.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| (ids[i], i));
        let offset: Vec<u64> = ids.iter().map(|&id| super::fmix64(id) % m).collect();
        let skip: Vec<u64> = ids.iter().map(|&id| super::fmix64(id ^ 0x5851_F42D_4C95_7F2D) % (m - 1) + 1).collect();
        let weight: Vec<u64> = weights.iter().map(|&w| u64::from(w.max(1))).collect();
        let total_weight: u64 = weight.iter().sum();
        let mut next = vec![0u64; n];
        let mut claimed = vec![0u64; n];
        let mut table = vec![u32::MAX; m as usize];
        let mut filled = 0u64;
        while filled < m {
            for &i in &order {
                // A turn while the backend's share of the claimed slots is at or below its share
                // of the weight; the one furthest behind always qualifies, so each round claims.
                if claimed[i] * total_weight > filled * weight[i] {
                    continue;
                }
                loop {
                    let slot = ((offset[i] + next[i] * skip[i]) % m) as usize;
                    next[i] += 1;
                    if table[slot] == u32::MAX {
                        table[slot] = i as u32;
                        break;
                    }
                }
                claimed[i] += 1;
                filled += 1;
                if filled == m {
                    break;
                }
            }
        }
        Maglev { table: table.into_boxed_slice() }
    }

    pub fn slots(&self) -> usize {
        self.table.len()
    }

    /// The backend for `hash`: its slot's, or, while that one is unusable, the backends of the
    /// key's further slots in turn. After a long walk (most of the pool unusable) the first
    /// usable backend after the key's own in pool order, so a key still lands somewhere fixed.
    pub fn lookup(&self, hash: u64, n: usize, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
        let m = self.table.len();
        if m == 0 || n == 0 {
            return None;
        }
        let own = self.table[(hash % m as u64) as usize] as usize;
        if own < n && usable(own) {
            return Some(own);
        }
        let m64 = m as u64;
        let stride = (hash >> 32) % (m64 - 1) + 1;
        let mut slot = hash % m64;
        for _ in 0..(4 * n + 32).min(m) {
            slot = (slot + stride) % m64;
            let i = self.table[slot as usize] as usize;
            if i < n && usable(i) {
                return Some(i);
            }
        }
        (1..=n).map(|k| (own + k) % n).find(|&i| usable(i))
    }
}

fn next_prime(mut n: usize) -> usize {
    let is_prime = |n: usize| n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d));
    while !is_prime(n) {
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::balancer::hash64;

    fn ids(names: &[String]) -> Vec<u64> {
        names.iter().map(|s| hash64(0, s.as_bytes())).collect()
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.{}.{}:8080", i / 250, i % 250)).collect()
    }

    const KEYS: u64 = 100_000;

    fn key(k: u64) -> u64 {
        hash64(1, &k.to_le_bytes())
    }

    /// Backend of each of the keys, as backend names.
    fn mapping<'a>(names: &'a [String], weights: &[u32]) -> Vec<&'a str> {
        let t = Maglev::new(&ids(names), weights);
        (0..KEYS).map(|k| t.lookup(key(k), names.len(), &|_| true).map_or("", |i| names[i].as_str())).collect()
    }

    #[test]
    fn primes() {
        assert_eq!(next_prime(65_537), 65_537);
        assert_eq!(next_prime(65_538), 65_539);
        assert_eq!(Maglev::new(&[1, 2, 3], &[1, 1, 1]).slots(), 65_537);
        // 1,000 backends: 128 slots each, rounded up to a prime.
        let thousand: Vec<u64> = (0..1000).collect();
        assert_eq!(Maglev::new(&thousand, &[1; 1000]).slots(), 128_021);
    }

    #[test]
    fn unusable_backends_keys_go_elsewhere_and_only_theirs() {
        let names = names(5);
        let t = Maglev::new(&ids(&names), &[1; 5]);
        let mut moved_to = [0usize; 5];
        for k in 0..KEYS {
            let h = key(k);
            let before = t.lookup(h, 5, &|_| true);
            let after = t.lookup(h, 5, &|i| i != 2);
            if before == Some(2) {
                moved_to[after.unwrap_or(2)] += 1;
            } else {
                assert_eq!(before, after);
            }
        }
        // Spread over the four others, not dumped on a neighbour.
        assert_eq!(moved_to[2], 0);
        assert!(moved_to.iter().enumerate().filter(|(i, _)| *i != 2).all(|(_, &c)| c > 3_500), "{moved_to:?}");
        assert_eq!(t.lookup(1, 5, &|_| false), None);
        assert_eq!(t.lookup(1, 5, &|i| i == 4), Some(4));
    }

    #[test]
    fn removing_one_of_ten_equal_moves_about_its_tenth() {
        let names = names(10);
        let before = mapping(&names, &[1; 10]);
        for gone in [0, 4, 9] {
            let fewer: Vec<String> =
                names.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, n)| n.clone()).collect();
            let after = mapping(&fewer, &[1; 9]);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / KEYS as f64;
            // Its own 10%, and a little more: Maglev trades some disruption for perfect balance.
            assert!((0.09..0.12).contains(&moved), "{:.2}% moved", moved * 100.0);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        /// Each backend's share of 100,000 keys is within ±10% of its share of the weight.
        #[test]
        fn keys_spread_by_weight(weights in prop::collection::vec(1u32..=10, 2..=10)) {
            let names = names(weights.len());
            let map = mapping(&names, &weights);
            let total: u32 = weights.iter().sum();
            for (name, &w) in names.iter().zip(&weights) {
                let got = map.iter().filter(|&&b| b == name).count() as f64;
                let want = KEYS as f64 * f64::from(w) / f64::from(total);
                prop_assert!((got - want).abs() <= want * 0.10, "{name} w{w}: {got} keys, want {want}");
            }
        }

        /// Removing one of 10 backends moves at most 15% of the keys with equal weights (ideal:
        /// its 10%), and at most 5 points more than its share of the weight otherwise; putting
        /// it back restores the mapping exactly.
        #[test]
        fn removing_one_moves_few_and_adding_it_back_restores(
            weights in prop_oneof![Just(vec![1u32; 10]), prop::collection::vec(1u32..=5, 10)],
            gone in 0usize..10,
        ) {
            let names = names(10);
            let before = mapping(&names, &weights);
            let (mut fewer, mut fewer_w) = (names.clone(), weights.clone());
            fewer.remove(gone);
            fewer_w.remove(gone);
            let after = mapping(&fewer, &fewer_w);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / KEYS as f64;
            let share = f64::from(weights[gone]) / f64::from(weights.iter().sum::<u32>());
            prop_assert!(moved <= share + 0.05, "{:.1}% moved, its share {:.1}%", moved * 100.0, share * 100.0);
            if weights.iter().all(|&w| w == 1) {
                prop_assert!(moved <= 0.15, "{:.1}% moved", moved * 100.0);
            }
            // Back, at the end of the list rather than where it was: the order does not matter.
            let (mut back, mut back_w) = (fewer, fewer_w);
            back.push(names[gone].clone());
            back_w.push(weights[gone]);
            prop_assert_eq!(mapping(&back, &back_w), before);
        }
    }
}
