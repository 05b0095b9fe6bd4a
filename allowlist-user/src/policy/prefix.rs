//! Prefix sets with longest-match lookups, for the account list,
//! `always_allow`, trusted proxies and the guard unions.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A set of prefixes with longest-match lookups: one hash set per prefix
/// length present.
#[derive(Clone, Debug, Default)]
pub struct PrefixSet {
    v4: Vec<(u8, HashSet<u32>)>,
    v6: Vec<(u8, HashSet<u128>)>,
}

impl PrefixSet {
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> PrefixSet {
        let mut v4: HashMap<u8, HashSet<u32>> = HashMap::new();
        let mut v6: HashMap<u8, HashSet<u128>> = HashMap::new();
        for n in nets {
            match n.trunc() {
                IpNet::V4(n) => v4
                    .entry(n.prefix_len())
                    .or_default()
                    .insert(n.network().into()),
                IpNet::V6(n) => v6
                    .entry(n.prefix_len())
                    .or_default()
                    .insert(n.network().into()),
            };
        }
        let mut v4: Vec<_> = v4.into_iter().collect();
        let mut v6: Vec<_> = v6.into_iter().collect();
        v4.sort_by_key(|(l, _)| std::cmp::Reverse(*l));
        v6.sort_by_key(|(l, _)| std::cmp::Reverse(*l));
        PrefixSet { v4, v6 }
    }

    /// The longest prefix holding `addr`.
    pub fn longest_match(&self, addr: IpAddr) -> Option<IpNet> {
        match normalize(addr) {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().find_map(|(len, set)| {
                    let m = if *len == 0 {
                        0
                    } else {
                        a & (u32::MAX << (32 - len))
                    };
                    set.contains(&m)
                        .then(|| IpNet::V4(Ipv4Net::new(m.into(), *len).expect("valid")))
                })
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().find_map(|(len, set)| {
                    let m = if *len == 0 {
                        0
                    } else {
                        a & (u128::MAX << (128 - len))
                    };
                    set.contains(&m)
                        .then(|| IpNet::V6(Ipv6Net::new(m.into(), *len).expect("valid")))
                })
            }
        }
    }

    /// Whether some prefix of the set holds all of `net` (a prefix of the
    /// set no longer than `net` that contains its network).
    pub fn covers(&self, net: &IpNet) -> bool {
        match net.trunc() {
            IpNet::V4(n) => {
                let a = u32::from(n.network());
                self.v4.iter().any(|(len, set)| {
                    *len <= n.prefix_len()
                        && set.contains(&if *len == 0 {
                            0
                        } else {
                            a & (u32::MAX << (32 - len))
                        })
                })
            }
            IpNet::V6(n) => {
                let a = u128::from(n.network());
                self.v6.iter().any(|(len, set)| {
                    *len <= n.prefix_len()
                        && set.contains(&if *len == 0 {
                            0
                        } else {
                            a & (u128::MAX << (128 - len))
                        })
                })
            }
        }
    }

    /// Reads the first level of the set (its lengths and the first
    /// table's header), so a later lookup finds them in the cache.
    pub fn warm(&self) -> usize {
        self.v4.first().map_or(0, |(l, s)| *l as usize + s.len())
            + self.v6.first().map_or(0, |(l, s)| *l as usize + s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// Treats `::ffff:a.b.c.d` as `a.b.c.d`.
pub fn normalize(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    }
}
