//! Nothing half-applied to the kernel. A change is many map writes; any of
//! them can fail (a full map, memory). [`Journal`] sits between the drop
//! list's compiler and the maps, reads each entry before it is written, and
//! on failure writes every old value back, newest first, so the maps hold
//! exactly what they held before the change.

use allowlist_common::{DropRule, V4LongKey, V6L1Value, V6LongKey};

use super::drop_maps::DropMaps;

/// What a successful write replaced.
#[derive(Clone, Copy, Debug)]
enum Undo {
    Rule(u32, DropRule),
    V4Slot(u32, u32),
    V4Long(V4LongKey, Option<u32>),
    V6L1(u32, Option<V6L1Value>),
    V6Long(V6LongKey, Option<u32>),
}

/// A [`DropMaps`] that remembers how to undo every write it passed on.
pub struct Journal<'a, M: DropMaps> {
    maps: &'a mut M,
    undo: Vec<Undo>,
}

impl<'a, M: DropMaps> Journal<'a, M> {
    pub fn new(maps: &'a mut M) -> Self {
        Journal {
            maps,
            undo: Vec::new(),
        }
    }

    /// Writes every replaced value back, newest first. Keeps going past a
    /// failing write (each restored entry counts) and returns the first
    /// error.
    pub fn rollback(mut self) -> Result<(), M::Error> {
        let mut first = Ok(());
        while let Some(u) = self.undo.pop() {
            let r = match u {
                Undo::Rule(i, old) => self.maps.set_rule(i, old),
                Undo::V4Slot(s, old) => self.maps.set_v4_slot(s, old),
                Undo::V4Long(k, Some(v)) => self.maps.set_v4_long(k, v),
                Undo::V4Long(k, None) => self.maps.del_v4_long(k),
                Undo::V6L1(t, Some(v)) => self.maps.set_v6_l1(t, v),
                Undo::V6L1(t, None) => self.maps.del_v6_l1(t),
                Undo::V6Long(k, Some(v)) => self.maps.set_v6_long(k, v),
                Undo::V6Long(k, None) => self.maps.del_v6_long(k),
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    fn logged(&mut self, undo: Undo, r: Result<(), M::Error>) -> Result<(), M::Error> {
        // A failed write changed nothing: nothing to undo for it.
        r.map(|()| self.undo.push(undo))
    }
}

impl<M: DropMaps> DropMaps for Journal<'_, M> {
    type Error = M::Error;
    fn set_rule(&mut self, index: u32, rule: DropRule) -> Result<(), Self::Error> {
        let old = self.maps.rule(index);
        let r = self.maps.set_rule(index, rule);
        self.logged(Undo::Rule(index, old), r)
    }
    fn v4_slot(&self, slot: u32) -> u32 {
        self.maps.v4_slot(slot)
    }
    fn set_v4_slot(&mut self, slot: u32, value: u32) -> Result<(), Self::Error> {
        let old = self.maps.v4_slot(slot);
        let r = self.maps.set_v4_slot(slot, value);
        self.logged(Undo::V4Slot(slot, old), r)
    }
    fn set_v4_long(&mut self, key: V4LongKey, rule: u32) -> Result<(), Self::Error> {
        let old = self.maps.v4_long(key);
        let r = self.maps.set_v4_long(key, rule);
        self.logged(Undo::V4Long(key, old), r)
    }
    fn del_v4_long(&mut self, key: V4LongKey) -> Result<(), Self::Error> {
        let old = self.maps.v4_long(key);
        let r = self.maps.del_v4_long(key);
        self.logged(Undo::V4Long(key, old), r)
    }
    fn set_v6_l1(&mut self, top: u32, value: V6L1Value) -> Result<(), Self::Error> {
        let old = self.maps.v6_l1(top);
        let r = self.maps.set_v6_l1(top, value);
        self.logged(Undo::V6L1(top, old), r)
    }
    fn del_v6_l1(&mut self, top: u32) -> Result<(), Self::Error> {
        let old = self.maps.v6_l1(top);
        let r = self.maps.del_v6_l1(top);
        self.logged(Undo::V6L1(top, old), r)
    }
    fn set_v6_long(&mut self, key: V6LongKey, rule: u32) -> Result<(), Self::Error> {
        let old = self.maps.v6_long(key);
        let r = self.maps.set_v6_long(key, rule);
        self.logged(Undo::V6Long(key, old), r)
    }
    fn del_v6_long(&mut self, key: V6LongKey) -> Result<(), Self::Error> {
        let old = self.maps.v6_long(key);
        let r = self.maps.del_v6_long(key);
        self.logged(Undo::V6Long(key, old), r)
    }
    fn rule(&self, index: u32) -> DropRule {
        self.maps.rule(index)
    }
    fn v4_long(&self, key: V4LongKey) -> Option<u32> {
        self.maps.v4_long(key)
    }
    fn v6_l1(&self, top: u32) -> Option<V6L1Value> {
        self.maps.v6_l1(top)
    }
    fn v6_long(&self, key: V6LongKey) -> Option<u32> {
        self.maps.v6_long(key)
    }
}
