//! Adoption: a restarted daemon takes over the drop maps an earlier one
//! filled, without a moment in which they drop less than either list.

use super::*;

impl DropList {
    /// Takes over maps an earlier daemon filled: writes `wanted` with rule
    /// indices that do not collide with the rules in use, repaints every
    /// first-level slot that differs, then deletes what is no longer wanted.
    /// The old rules keep dropping until their slots point elsewhere, so
    /// enforcement has no gap.
    pub fn adopt<M: AdoptMaps>(
        &mut self,
        maps: &mut M,
        wanted: &[DropSpec],
    ) -> Result<(), DropListError> {
        let (want4, want6) = self.wanted_sets(wanted)?;
        let maps_err = |e: M::Error| DropListError::Maps(Box::new(e));
        let old_rules: Vec<u32> = maps.used_rules().map_err(maps_err)?;
        *self = DropList::new(self.capacity);
        self.reserved = old_rules.iter().copied().collect();
        for (net, (reason, expires_ns)) in want4 {
            let index = self.alloc();
            self.v4.insert(
                net,
                Entry {
                    index,
                    reason,
                    expires_ns,
                },
            );
        }
        for (net, (reason, expires_ns)) in want6 {
            let index = self.alloc();
            self.v6.insert(
                net,
                Entry {
                    index,
                    reason,
                    expires_ns,
                },
            );
        }
        self.reserved.clear();
        self.write_rules(maps).map_err(maps_err)?;

        let mut long4 = Vec::new();
        for (net, e) in &self.v4 {
            if net.prefix_len() > 24 {
                let key = v4_long_key(net);
                long4.push((key, e.index));
                *self
                    .v4_long_count
                    .entry((key.addr >> 8, net.prefix_len()))
                    .or_default() += 1;
            }
        }
        maps.set_v4_long(&long4).map_err(maps_err)?;
        let mut long6 = Vec::new();
        let mut tops = HashSet::new();
        let mut counted6 = Vec::new();
        for (net, e) in &self.v6 {
            let first = top32(net);
            tops.extend(first..first + (1u32 << (32u8.saturating_sub(net.prefix_len()))));
            if u32::from(net.prefix_len()) > V6_L1_PREFIX {
                long6.push((v6_long_key(net), e.index));
                counted6.push((first, net.prefix_len()));
            }
        }
        maps.set_v6_long(&long6).map_err(maps_err)?;
        for (top, len) in counted6 {
            self.count6(top, len, true);
        }

        self.repaint_v4(maps).map_err(maps_err)?;
        self.write_v6_l1(maps, tops.iter().copied())
            .map_err(maps_err)?;
        let stale = not_in(maps.v6_l1_keys().map_err(maps_err)?, &tops);
        maps.del_v6_l1(&stale).map_err(maps_err)?;
        let wanted4: HashSet<V4LongKey> = long4.iter().map(|&(k, _)| k).collect();
        let stale = not_in(maps.v4_long_keys().map_err(maps_err)?, &wanted4);
        maps.del_v4_long(&stale).map_err(maps_err)?;
        let wanted6: HashSet<V6LongKey> = long6.iter().map(|&(k, _)| k).collect();
        let stale = not_in(maps.v6_long_keys().map_err(maps_err)?, &wanted6);
        maps.del_v6_long(&stale).map_err(maps_err)?;
        let in_use: HashSet<u32> = self
            .v4
            .values()
            .chain(self.v6.values())
            .map(|e| e.index)
            .collect();
        let unused: Vec<u32> = old_rules
            .into_iter()
            .filter(|i| !in_use.contains(i))
            .collect();
        self.release(maps, &unused).map_err(maps_err)?;
        Ok(())
    }
}

/// The keys the maps hold that are not wanted.
fn not_in<K: std::hash::Hash + Eq>(held: Vec<K>, wanted: &HashSet<K>) -> Vec<K> {
    held.into_iter().filter(|k| !wanted.contains(k)).collect()
}
