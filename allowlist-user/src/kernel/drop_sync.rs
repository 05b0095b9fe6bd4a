//! The drop list's pinned maps behind [`DropMaps`]: what the compiler
//! writes, and what it reads back to adopt them or undo a failed change.
//! The rule array and the hashes move in batches ([`Table`]); the v4 first
//! level is a shared memory mapping.

use allowlist_common::{DropRule, V4LongKey, V6L1Value, V6LongKey};
use aya::maps::MapData;

use super::{MapWriteError, drop_maps::DropMaps, droplist, map_batch::Table, sys};

/// The pinned maps, written through [`DropMaps`].
pub(super) struct KernelDropMaps {
    pub(super) rules: Table<u32, DropRule>,
    pub(super) v4_l1: sys::MmapU32,
    /// Keeps the map (and so the mapping) alive.
    pub(super) _v4_l1_map: MapData,
    pub(super) v4_long: Table<V4LongKey, u32>,
    pub(super) v6_l1: Table<u32, V6L1Value>,
    pub(super) v6_long: Table<V6LongKey, u32>,
}

impl DropMaps for KernelDropMaps {
    type Error = MapWriteError;
    fn set_rules(&mut self, rules: &[(u32, DropRule)]) -> Result<(), Self::Error> {
        self.rules.set(rules)
    }
    fn v4_slot(&self, slot: u32) -> u32 {
        self.v4_l1.get(slot)
    }
    fn set_v4_slot(&mut self, slot: u32, value: u32) -> Result<(), Self::Error> {
        self.v4_l1.set(slot, value);
        Ok(())
    }
    fn set_v4_long(&mut self, entries: &[(V4LongKey, u32)]) -> Result<(), Self::Error> {
        self.v4_long.set(entries)
    }
    fn del_v4_long(&mut self, keys: &[V4LongKey]) -> Result<(), Self::Error> {
        self.v4_long.delete(keys)
    }
    fn set_v6_l1(&mut self, entries: &[(u32, V6L1Value)]) -> Result<(), Self::Error> {
        self.v6_l1.set(entries)
    }
    fn del_v6_l1(&mut self, tops: &[u32]) -> Result<(), Self::Error> {
        self.v6_l1.delete(tops)
    }
    fn set_v6_long(&mut self, entries: &[(V6LongKey, u32)]) -> Result<(), Self::Error> {
        self.v6_long.set(entries)
    }
    fn del_v6_long(&mut self, keys: &[V6LongKey]) -> Result<(), Self::Error> {
        self.v6_long.delete(keys)
    }
    fn rules(&self, indices: &[u32]) -> Result<Vec<DropRule>, Self::Error> {
        self.rules.array_values(indices)
    }
    fn v4_long(&self, keys: &[V4LongKey]) -> Result<Vec<Option<u32>>, Self::Error> {
        self.v4_long.get_many(keys)
    }
    fn v6_l1(&self, tops: &[u32]) -> Result<Vec<Option<V6L1Value>>, Self::Error> {
        self.v6_l1.get_many(tops)
    }
    fn v6_long(&self, keys: &[V6LongKey]) -> Result<Vec<Option<u32>>, Self::Error> {
        self.v6_long.get_many(keys)
    }
}

fn keys<K, V>(entries: Vec<(K, V)>) -> Vec<K> {
    entries.into_iter().map(|(k, _)| k).collect()
}

impl droplist::AdoptMaps for KernelDropMaps {
    fn used_rules(&self) -> Result<Vec<u32>, Self::Error> {
        // Index 0 is never used; a zeroed rule is a free one.
        Ok(self
            .rules
            .entries()?
            .into_iter()
            .filter(|&(i, r)| i != 0 && r != DropRule::default())
            .map(|(i, _)| i)
            .collect())
    }
    fn v4_long_keys(&self) -> Result<Vec<V4LongKey>, Self::Error> {
        Ok(keys(self.v4_long.entries()?))
    }
    fn v6_l1_keys(&self) -> Result<Vec<u32>, Self::Error> {
        Ok(keys(self.v6_l1.entries()?))
    }
    fn v6_long_keys(&self) -> Result<Vec<V6LongKey>, Self::Error> {
        Ok(keys(self.v6_long.entries()?))
    }
}
