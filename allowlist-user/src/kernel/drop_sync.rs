//! The drop list's pinned maps behind [`DropMaps`]: what the compiler
//! writes, and what it reads back to adopt them or undo a failed change.

use super::*;

/// The pinned maps, written through [`DropMaps`].
pub(super) struct KernelDropMaps {
    pub(super) rules: Array<MapData, DropRule>,
    pub(super) v4_l1: sys::MmapU32,
    /// Keeps the map (and so the mapping) alive.
    pub(super) _v4_l1_map: MapData,
    pub(super) v4_long: BpfHashMap<MapData, V4LongKey, u32>,
    pub(super) v6_l1: BpfHashMap<MapData, u32, V6L1Value>,
    pub(super) v6_long: BpfHashMap<MapData, V6LongKey, u32>,
}

impl DropMaps for KernelDropMaps {
    type Error = MapWriteError;
    fn set_rule(&mut self, index: u32, rule: DropRule) -> Result<(), Self::Error> {
        self.rules.set(index, rule, 0).map_err(mw("DROP_RULES"))
    }
    fn v4_slot(&self, slot: u32) -> u32 {
        self.v4_l1.get(slot)
    }
    fn set_v4_slot(&mut self, slot: u32, value: u32) -> Result<(), Self::Error> {
        self.v4_l1.set(slot, value);
        Ok(())
    }
    fn set_v4_long(&mut self, key: V4LongKey, rule: u32) -> Result<(), Self::Error> {
        self.v4_long.insert(key, rule, 0).map_err(mw("DROP4_LONG"))
    }
    fn del_v4_long(&mut self, key: V4LongKey) -> Result<(), Self::Error> {
        ignore_missing(self.v4_long.remove(&key)).map_err(mw("DROP4_LONG"))
    }
    fn set_v6_l1(&mut self, top: u32, value: V6L1Value) -> Result<(), Self::Error> {
        self.v6_l1.insert(top, value, 0).map_err(mw("DROP6_L1"))
    }
    fn del_v6_l1(&mut self, top: u32) -> Result<(), Self::Error> {
        ignore_missing(self.v6_l1.remove(&top)).map_err(mw("DROP6_L1"))
    }
    fn set_v6_long(&mut self, key: V6LongKey, rule: u32) -> Result<(), Self::Error> {
        self.v6_long.insert(key, rule, 0).map_err(mw("DROP6_LONG"))
    }
    fn del_v6_long(&mut self, key: V6LongKey) -> Result<(), Self::Error> {
        ignore_missing(self.v6_long.remove(&key)).map_err(mw("DROP6_LONG"))
    }
    fn rule(&self, index: u32) -> DropRule {
        self.rules.get(&index, 0).unwrap_or_default()
    }
    fn v4_long(&self, key: V4LongKey) -> Option<u32> {
        self.v4_long.get(&key, 0).ok()
    }
    fn v6_l1(&self, top: u32) -> Option<V6L1Value> {
        self.v6_l1.get(&top, 0).ok()
    }
    fn v6_long(&self, key: V6LongKey) -> Option<u32> {
        self.v6_long.get(&key, 0).ok()
    }
}

impl droplist::AdoptMaps for KernelDropMaps {
    fn used_rules(&self) -> Vec<u32> {
        // Index 0 is never used; a zeroed rule is a free one.
        (1..self.rules.len())
            .filter(|&i| {
                self.rules
                    .get(&i, 0)
                    .is_ok_and(|r| r != DropRule::default())
            })
            .collect()
    }
    fn v4_long_keys(&self) -> Vec<V4LongKey> {
        self.v4_long.keys().filter_map(Result::ok).collect()
    }
    fn v6_l1_keys(&self) -> Vec<u32> {
        self.v6_l1.keys().filter_map(Result::ok).collect()
    }
    fn v6_long_keys(&self) -> Vec<V6LongKey> {
        self.v6_long.keys().filter_map(Result::ok).collect()
    }
}
