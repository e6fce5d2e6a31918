//! A set of address ranges with a lookup in O(log n): CIDRs become sorted, merged,
//! non-overlapping ranges over one 128-bit space (IPv4 as its v4-mapped IPv6 address, so a
//! v4-mapped client matches its v4 rule and `::ffff:0:0/96` covers all of IPv4), searched
//! with a binary search.
//!
//! Written here rather than taken from a crate: `ipnet` parses CIDRs but has no lookup
//! structure, and the prefix-trie crates (`ip_network_table`, `treebitmap`) are larger, keep
//! v4 and v6 in separate tables (the v4-mapped case would need handling on top anyway) and
//! are barely maintained. Two sorted `u128` arrays are 32 bytes a range, build in a sort
//! (100,000 ranges: a few ms) and answer in about 17 comparisons.

use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpSet {
    /// First address of each range, ascending.
    starts: Vec<u128>,
    /// Last address of each range (inclusive); ranges neither overlap nor touch.
    ends: Vec<u128>,
}

/// An address as a point in the one 128-bit space.
pub fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => mapped(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn mapped(v4: u32) -> u128 {
    (0xffff_u128 << 32) | u128::from(v4)
}

fn range(net: &IpNet) -> (u128, u128) {
    match net {
        IpNet::V4(n) => (mapped(u32::from(n.network())), mapped(u32::from(n.broadcast()))),
        IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
    }
}

impl IpSet {
    pub fn new<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> IpSet {
        let mut ranges: Vec<(u128, u128)> = nets.into_iter().map(range).collect();
        ranges.sort_unstable();
        let mut set = IpSet { starts: Vec::with_capacity(ranges.len()), ends: Vec::with_capacity(ranges.len()) };
        for (start, end) in ranges {
            match set.ends.last_mut() {
                // Overlapping or adjacent: one range.
                Some(last) if start <= last.saturating_add(1) => *last = (*last).max(end),
                _ => {
                    set.starts.push(start);
                    set.ends.push(end);
                }
            }
        }
        set.starts.shrink_to_fit();
        set.ends.shrink_to_fit();
        set
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Merged ranges held.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let k = key(ip);
        // The last range starting at or before `k`.
        let i = self.starts.partition_point(|&s| s <= k);
        i > 0 && self.ends[i - 1] >= k
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::config::parse_net;

    fn set(nets: &[&str]) -> IpSet {
        let nets: Vec<IpNet> = nets.iter().map(|n| parse_net(n).unwrap()).collect();
        IpSet::new(&nets)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_v6_and_v4_mapped() {
        let s = set(&["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]);
        assert!(s.contains(ip("10.255.0.1")));
        assert!(s.contains(ip("::ffff:10.1.2.3")), "a v4-mapped address matches its v4 rule");
        assert!(s.contains(ip("192.0.2.7")));
        assert!(!s.contains(ip("192.0.2.8")));
        assert!(!s.contains(ip("11.0.0.0")));
        assert!(!s.contains(ip("9.255.255.255")));
        assert!(s.contains(ip("2001:db8:ffff::1")));
        assert!(!s.contains(ip("2001:db9::")));
        assert!(!s.contains(ip("::1")));
        let all_v4 = set(&["::ffff:0:0/96"]);
        assert!(all_v4.contains(ip("1.2.3.4")));
        assert!(!all_v4.contains(ip("::2")));
        assert!(!set(&[]).contains(ip("1.2.3.4")));
        assert!(set(&["0.0.0.0/0"]).contains(ip("255.255.255.255")));
        assert!(set(&["::/0"]).contains(ip("1.2.3.4")));
    }

    #[test]
    fn overlapping_and_adjacent_ranges_merge() {
        let s = set(&["10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25", "10.0.3.0/24"]);
        assert_eq!(s.len(), 2);
        assert!(s.contains(ip("10.0.1.255")));
        assert!(!s.contains(ip("10.0.2.0")));
        assert!(s.contains(ip("10.0.3.0")));
    }

    /// 100,000 entries (a real blocklist's size): built in under a second, each lookup under
    /// a microsecond. Figures printed for the README (`--nocapture`, and `--release` for the
    /// real ones); an unoptimised build is given ten times the room.
    #[test]
    fn hundred_thousand_entries_build_and_lookup_cost() {
        let mut nets = Vec::with_capacity(100_000);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..100_000 {
            let r = next();
            let text = if i % 4 == 0 {
                format!("2001:db8:{:x}:{:x}::/64", (r >> 16) as u16, r as u16)
            } else {
                let a = (r >> 32) as u32;
                format!("{}.{}.{}.{}/{}", a >> 24, (a >> 16) & 255, (a >> 8) & 255, a & 255, 24 + (r % 9))
            };
            nets.push(text);
        }
        let start = Instant::now();
        let parsed: Vec<IpNet> = nets.iter().map(|n| parse_net(n).unwrap()).collect();
        let s = IpSet::new(&parsed);
        let built = start.elapsed();
        let probes: Vec<IpAddr> = (0..1_000_000)
            .map(|i| {
                let r = next();
                if i % 4 == 0 {
                    IpAddr::V6(std::net::Ipv6Addr::from(r as u128 | (0x2001_0db8_u128 << 96)))
                } else {
                    IpAddr::V4(std::net::Ipv4Addr::from((r >> 32) as u32))
                }
            })
            .collect();
        let start = Instant::now();
        let hits = probes.iter().filter(|p| s.contains(**p)).count();
        let per_lookup = start.elapsed() / probes.len() as u32;
        println!(
            "100000 entries ({} ranges): parsed and built in {built:?}; {per_lookup:?} per lookup ({hits} hits in 1M)",
            s.len()
        );
        let room = if cfg!(debug_assertions) { 10 } else { 1 };
        assert!(built.as_secs_f64() < room as f64, "{built:?}");
        assert!(per_lookup.as_nanos() < 1000 * room, "{per_lookup:?}");
    }
}
