//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, §3.4), with weights.
//!
//! The lookup table is a **pure function of the set of members** `(address, port, weight)`:
//! members are put in a canonical order before the table is filled and every hash is a fixed
//! function of the member's bytes (no per-process seed, no `std` hasher whose output may change
//! between Rust releases). So every LB node given the same targets builds the same table and a
//! fleet behind ECMP agrees on every flow without sharing state.
//!
//! Weights: in round `r` a member may hold up to `⌊r · w / w_max⌋` slots; members with the
//! largest weight take one slot per round (plain Maglev when all weights are equal), lighter
//! ones take turns less often. Shares are then proportional to the weights.
use std::net::IpAddr;

/// Slot value meaning "no member" (only when there are no members with a weight above 0).
pub const EMPTY: u32 = u32::MAX;

/// One member of a ring: its identity and weight.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    /// Backend address.
    pub addr: IpAddr,
    /// Backend port (part of the identity: two services on one host are two members).
    pub port: u16,
    /// Relative weight; 0 means the member holds no slots.
    pub weight: u32,
}

/// Whether `n` is prime (trial division; table sizes are small enough).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// FNV-1a over the member's identity with a seed: fixed forever, so tables stay comparable
/// across versions and hosts.
fn identity_hash(m: &Member, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    match m.addr {
        IpAddr::V4(a) => eat(&a.octets()),
        IpAddr::V6(a) => eat(&a.octets()),
    }
    eat(&m.port.to_be_bytes());
    // Final avalanche (splitmix64): FNV's low bits are weak for nearby addresses.
    let mut z = h;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Builds the lookup table of `size` slots (`size` must be prime, so every `skip` generates a
/// full permutation). Each slot holds an index into `members`, or [`EMPTY`] when no member has
/// a weight above 0. `members` must not contain the same `(addr, port)` twice.
pub fn build(members: &[Member], size: u32) -> Vec<u32> {
    debug_assert!(is_prime(size), "Maglev table size must be prime");
    let m = size as u64;
    let mut table = vec![EMPTY; size as usize];

    // Canonical order: the table must not depend on the order the members were given in.
    let mut order: Vec<usize> = (0..members.len())
        .filter(|&i| members[i].weight > 0)
        .collect();
    order.sort_by(|&a, &b| {
        (members[a].addr, members[a].port).cmp(&(members[b].addr, members[b].port))
    });
    if order.is_empty() || size == 0 {
        return table;
    }
    debug_assert!(
        order
            .windows(2)
            .all(|w| (members[w[0]].addr, members[w[0]].port)
                != (members[w[1]].addr, members[w[1]].port)),
        "duplicate member"
    );

    struct State {
        index: u32,
        offset: u64,
        skip: u64,
        next: u64,
        weight: u64,
        placed: u64,
    }
    let mut states: Vec<State> = order
        .iter()
        .map(|&i| {
            let mbr = &members[i];
            State {
                index: i as u32,
                offset: identity_hash(mbr, 0x6d61_676c_6576_0001) % m,
                skip: identity_hash(mbr, 0x6d61_676c_6576_0002) % (m - 1) + 1,
                next: 0,
                weight: u64::from(mbr.weight),
                placed: 0,
            }
        })
        .collect();
    let max_weight = states.iter().map(|s| s.weight).max().unwrap_or(1);

    let mut filled = 0u64;
    let mut round = 0u64;
    while filled < m {
        round += 1;
        for s in states.iter_mut() {
            if s.placed >= round * s.weight / max_weight {
                continue;
            }
            // Walk this member's permutation to its next free slot. Terminates: the
            // permutation visits every slot (m prime, 0 < skip < m) and one is free.
            loop {
                let slot = ((s.offset + s.next * s.skip) % m) as usize;
                s.next += 1;
                if table[slot] == EMPTY {
                    table[slot] = s.index;
                    s.placed += 1;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const M: u32 = 65_537;

    fn members(n: usize) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                addr: IpAddr::V4(Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250) as u8 + 1)),
                port: 80,
                weight: 1,
            })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<u64> {
        let mut c = vec![0u64; n];
        for &s in table {
            c[s as usize] += 1;
        }
        c
    }

    /// Table as member identities, to compare tables built from differently ordered inputs.
    fn as_identities(table: &[u32], ms: &[Member]) -> Vec<(IpAddr, u16)> {
        table
            .iter()
            .map(|&i| (ms[i as usize].addr, ms[i as usize].port))
            .collect()
    }

    #[test]
    fn default_table_size_is_prime_and_primality_is_right() {
        assert!(is_prime(lb_common::DEFAULT_RING_SIZE));
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(!is_prime(65_535));
        assert!(is_prime(4_294_967_291));
    }

    #[test]
    fn equal_weights_fill_evenly_within_one_percent() {
        for n in [3, 10, 100] {
            let ms = members(n);
            let table = build(&ms, M);
            assert!(table.iter().all(|&s| (s as usize) < n), "every slot filled");
            let c = counts(&table, n);
            let avg = f64::from(M) / n as f64;
            let max = *c.iter().max().unwrap() as f64;
            assert!(max / avg <= 1.01, "n={n}: max/avg = {}", max / avg);
        }
    }

    #[test]
    fn removing_a_backend_moves_few_other_slots() {
        for n in [3, 10, 100] {
            let ms = members(n);
            let before = as_identities(&build(&ms, M), &ms);
            for removed in [0, n / 2, n - 1] {
                let mut rest = ms.clone();
                rest.remove(removed);
                let after = as_identities(&build(&rest, M), &rest);
                let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
                let share = changed as f64 / f64::from(M);
                let bound = 1.0 / n as f64 + 0.008;
                assert!(
                    share <= bound,
                    "n={n}, removed #{removed}: {share:.4} of slots moved, bound {bound:.4}"
                );
                // The real claim: the removed backend's slots go to the others, and the
                // others keep (almost all of) their own slots. Maglev does not promise zero
                // disruption (a slot the removed member took first in some permutation walk
                // can shift the walk of another), so the bound is a small share of the
                // others' slots; the flow table, not the ring, keeps their established flows.
                let gone = (ms[removed].addr, ms[removed].port);
                let others_slots = before.iter().filter(|id| **id != gone).count();
                let others_moved = before
                    .iter()
                    .zip(&after)
                    .filter(|(b, a)| **b != gone && a != b)
                    .count();
                let moved_share = others_moved as f64 / others_slots as f64;
                assert!(
                    moved_share <= 0.01,
                    "n={n}, removed #{removed}: {others_moved} of the other backends' \
                     {others_slots} slots moved ({moved_share:.4})"
                );
                let freed = before.iter().filter(|id| **id == gone).count();
                assert!(freed > 0, "the removed backend held slots before");
            }
        }
    }

    #[test]
    fn table_is_independent_of_member_order() {
        let ms = members(10);
        let mut shuffled = ms.clone();
        shuffled.reverse();
        shuffled.swap(1, 7);
        assert_eq!(
            as_identities(&build(&ms, M), &ms),
            as_identities(&build(&shuffled, M), &shuffled)
        );
    }

    #[test]
    fn two_builds_from_the_same_set_are_identical() {
        let ms = members(100);
        assert_eq!(build(&ms, M), build(&ms.clone(), M));
    }

    #[test]
    fn shares_follow_weights() {
        for weights in [vec![1u32, 3], vec![1, 2, 3, 4], vec![5, 1, 1, 1, 1, 1]] {
            let ms: Vec<Member> = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| Member {
                    addr: IpAddr::V4(Ipv4Addr::new(10, 2, 0, i as u8 + 1)),
                    port: 443,
                    weight: w,
                })
                .collect();
            let c = counts(&build(&ms, M), ms.len());
            let total: u32 = weights.iter().sum();
            for (i, &w) in weights.iter().enumerate() {
                let want = f64::from(w) / f64::from(total);
                let got = c[i] as f64 / f64::from(M);
                assert!(
                    (got - want).abs() < 0.005,
                    "weights {weights:?}: member {i} has {got:.4}, want {want:.4}"
                );
            }
        }
    }

    #[test]
    fn zero_weight_members_get_nothing_and_no_members_means_empty() {
        let mut ms = members(3);
        ms[1].weight = 0;
        let c = counts(&build(&ms, 251), 3);
        assert_eq!(c[1], 0);
        assert_eq!(c[0] + c[2], 251);
        assert!(build(&[], 251).iter().all(|&s| s == EMPTY));
        ms.iter_mut().for_each(|m| m.weight = 0);
        assert!(build(&ms, 251).iter().all(|&s| s == EMPTY));
    }

    #[test]
    fn same_address_on_two_ports_is_two_members() {
        let a = IpAddr::V4(Ipv4Addr::new(10, 3, 0, 1));
        let ms = vec![
            Member {
                addr: a,
                port: 80,
                weight: 1,
            },
            Member {
                addr: a,
                port: 8080,
                weight: 1,
            },
        ];
        let c = counts(&build(&ms, 251), 2);
        assert!(c[0] > 100 && c[1] > 100, "{c:?}");
    }
}
