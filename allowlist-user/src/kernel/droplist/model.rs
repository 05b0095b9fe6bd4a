//! The drop list's maps in memory, with `edge_filter`'s lookup step for
//! step: what the property tests and the benchmark check the compiler's
//! writes against, apart from the compiler itself.

use super::*;

/// An in-memory [`DropMaps`] with a lookup that mirrors `edge_filter`'s,
/// step for step. Used by the property tests and the benchmark's check.
#[derive(Debug)]
pub struct ModelMaps {
    pub rules: HashMap<u32, DropRule>,
    pub v4_l1: Vec<u32>,
    pub v4_long: HashMap<V4LongKey, u32>,
    pub v6_l1: HashMap<u32, V6L1Value>,
    pub v6_long: HashMap<V6LongKey, u32>,
}

impl Default for ModelMaps {
    fn default() -> Self {
        ModelMaps {
            rules: HashMap::new(),
            v4_l1: vec![0; allowlist_common::V4_L1_SLOTS as usize],
            v4_long: HashMap::new(),
            v6_l1: HashMap::new(),
            v6_long: HashMap::new(),
        }
    }
}

impl DropMaps for ModelMaps {
    type Error = std::convert::Infallible;
    fn set_rules(&mut self, rules: &[(u32, DropRule)]) -> Result<(), Self::Error> {
        self.rules.extend(rules.iter().copied());
        Ok(())
    }
    fn v4_slot(&self, slot: u32) -> u32 {
        self.v4_l1[slot as usize]
    }
    fn set_v4_slot(&mut self, slot: u32, value: u32) -> Result<(), Self::Error> {
        self.v4_l1[slot as usize] = value;
        Ok(())
    }
    fn set_v4_long(&mut self, entries: &[(V4LongKey, u32)]) -> Result<(), Self::Error> {
        self.v4_long.extend(entries.iter().copied());
        Ok(())
    }
    fn del_v4_long(&mut self, keys: &[V4LongKey]) -> Result<(), Self::Error> {
        for k in keys {
            self.v4_long.remove(k);
        }
        Ok(())
    }
    fn set_v6_l1(&mut self, entries: &[(u32, V6L1Value)]) -> Result<(), Self::Error> {
        self.v6_l1.extend(entries.iter().copied());
        Ok(())
    }
    fn del_v6_l1(&mut self, tops: &[u32]) -> Result<(), Self::Error> {
        for t in tops {
            self.v6_l1.remove(t);
        }
        Ok(())
    }
    fn set_v6_long(&mut self, entries: &[(V6LongKey, u32)]) -> Result<(), Self::Error> {
        self.v6_long.extend(entries.iter().copied());
        Ok(())
    }
    fn del_v6_long(&mut self, keys: &[V6LongKey]) -> Result<(), Self::Error> {
        for k in keys {
            self.v6_long.remove(k);
        }
        Ok(())
    }
    fn rules(&self, indices: &[u32]) -> Result<Vec<DropRule>, Self::Error> {
        Ok(indices
            .iter()
            .map(|i| self.rules.get(i).copied().unwrap_or_default())
            .collect())
    }
    fn v4_long(&self, keys: &[V4LongKey]) -> Result<Vec<Option<u32>>, Self::Error> {
        Ok(keys.iter().map(|k| self.v4_long.get(k).copied()).collect())
    }
    fn v6_l1(&self, tops: &[u32]) -> Result<Vec<Option<V6L1Value>>, Self::Error> {
        Ok(tops.iter().map(|t| self.v6_l1.get(t).copied()).collect())
    }
    fn v6_long(&self, keys: &[V6LongKey]) -> Result<Vec<Option<u32>>, Self::Error> {
        Ok(keys.iter().map(|k| self.v6_long.get(k).copied()).collect())
    }
}

impl AdoptMaps for ModelMaps {
    fn used_rules(&self) -> Result<Vec<u32>, Self::Error> {
        Ok(self
            .rules
            .iter()
            .filter(|(_, r)| **r != DropRule::default())
            .map(|(i, _)| *i)
            .collect())
    }
    fn v4_long_keys(&self) -> Result<Vec<V4LongKey>, Self::Error> {
        Ok(self.v4_long.keys().copied().collect())
    }
    fn v6_l1_keys(&self) -> Result<Vec<u32>, Self::Error> {
        Ok(self.v6_l1.keys().copied().collect())
    }
    fn v6_long_keys(&self) -> Result<Vec<V6LongKey>, Self::Error> {
        Ok(self.v6_long.keys().copied().collect())
    }
}

impl ModelMaps {
    fn verdict(&self, rule: u32, now_ns: u64) -> Option<u32> {
        if rule == 0 {
            return None;
        }
        let r = self.rules.get(&rule)?;
        if r.expires_ns != 0 && r.expires_ns <= now_ns {
            return None;
        }
        Some(r.reason)
    }

    /// The reason `edge_filter` would drop `addr` for, if it would.
    pub fn lookup_v4(&self, addr: Ipv4Addr, now_ns: u64) -> Option<u32> {
        let addr = u32::from(addr);
        let slot = self.v4_l1[(addr >> 8) as usize];
        for len in (25..=32u32).rev() {
            if slot & (1 << (len - 25)) != 0 {
                let key = V4LongKey {
                    addr: addr & (u32::MAX << (32 - len)),
                    len,
                };
                if let Some(rule) = self.v4_long.get(&key) {
                    return self.verdict(*rule, now_ns);
                }
            }
        }
        self.verdict(slot >> 8, now_ns)
    }

    pub fn lookup_v6(&self, addr: Ipv6Addr, now_ns: u64) -> Option<u32> {
        let a = u128::from(addr);
        let l1 = self.v6_l1.get(&((a >> 96) as u32))?;
        for len in (33..=128u32).rev() {
            let present = if len > 64 {
                l1.bits_65_128 & (1 << (len - 65)) != 0
            } else {
                l1.bits_33_64 & (1 << (len - 33)) != 0
            };
            if present {
                let masked = a & (u128::MAX << (128 - len));
                let key = V6LongKey {
                    hi: (masked >> 64) as u64,
                    lo: masked as u64,
                    len,
                    _pad: 0,
                };
                if let Some(rule) = self.v6_long.get(&key) {
                    return self.verdict(*rule, now_ns);
                }
            }
        }
        self.verdict(l1.rule, now_ns)
    }
}
