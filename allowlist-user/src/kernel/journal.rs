//! Nothing half-applied to the kernel. A change is many map writes; any of
//! them can fail (a full map, memory). [`Journal`] sits between the drop
//! list's compiler and the maps, reads what each write will replace before
//! it is made, and on failure writes every old value back, newest first,
//! so the maps hold exactly what they held before the change.

use allowlist_common::{DropRule, V4LongKey, V6L1Value, V6LongKey};

use super::drop_maps::DropMaps;

/// What one write (of one or many entries) replaced.
#[derive(Clone, Debug)]
enum Undo {
    Rules(Vec<(u32, DropRule)>),
    V4Slot(u32, u32),
    V4Long(Vec<(V4LongKey, Option<u32>)>),
    V6L1(Vec<(u32, Option<V6L1Value>)>),
    V6Long(Vec<(V6LongKey, Option<u32>)>),
}

/// A [`DropMaps`] that remembers how to undo every write it passed on.
pub struct Journal<'a, M: DropMaps> {
    maps: &'a mut M,
    undo: Vec<Undo>,
}

/// Old values split into those to write back and the keys that held
/// none, to delete.
fn split<K: Copy, V: Copy>(old: &[(K, Option<V>)]) -> (Vec<(K, V)>, Vec<K>) {
    let back = old.iter().filter_map(|&(k, v)| Some((k, v?))).collect();
    let gone = old
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|&(k, _)| k)
        .collect();
    (back, gone)
}

/// Both results, the first error first: a restore goes on past a failure.
fn both<E>(a: Result<(), E>, b: Result<(), E>) -> Result<(), E> {
    a.and(b)
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
            let maps = &mut *self.maps;
            let r = match u {
                Undo::Rules(old) => maps.set_rules(&old),
                Undo::V4Slot(s, old) => maps.set_v4_slot(s, old),
                Undo::V4Long(old) => {
                    let (back, gone) = split(&old);
                    both(maps.set_v4_long(&back), maps.del_v4_long(&gone))
                }
                Undo::V6L1(old) => {
                    let (back, gone) = split(&old);
                    both(maps.set_v6_l1(&back), maps.del_v6_l1(&gone))
                }
                Undo::V6Long(old) => {
                    let (back, gone) = split(&old);
                    both(maps.set_v6_long(&back), maps.del_v6_long(&gone))
                }
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// The keys of a write's entries.
fn keys<K: Copy, V>(entries: &[(K, V)]) -> Vec<K> {
    entries.iter().map(|(k, _)| *k).collect()
}

/// Keys paired with what they held.
fn zip<K: Copy, V>(keys: &[K], old: Vec<V>) -> Vec<(K, V)> {
    keys.iter().copied().zip(old).collect()
}

// Each write records what it replaces before it is made: a write of many
// entries that fails partway has made some of them, and restoring an entry
// that was not written rewrites the value it still holds.
impl<M: DropMaps> DropMaps for Journal<'_, M> {
    type Error = M::Error;
    fn set_rules(&mut self, rules: &[(u32, DropRule)]) -> Result<(), Self::Error> {
        let indices = keys(rules);
        let old = self.maps.rules(&indices)?;
        self.undo.push(Undo::Rules(zip(&indices, old)));
        self.maps.set_rules(rules)
    }
    fn v4_slot(&self, slot: u32) -> u32 {
        self.maps.v4_slot(slot)
    }
    fn set_v4_slot(&mut self, slot: u32, value: u32) -> Result<(), Self::Error> {
        let old = self.maps.v4_slot(slot);
        self.undo.push(Undo::V4Slot(slot, old));
        self.maps.set_v4_slot(slot, value)
    }
    fn set_v4_long(&mut self, entries: &[(V4LongKey, u32)]) -> Result<(), Self::Error> {
        let k = keys(entries);
        let old = self.maps.v4_long(&k)?;
        self.undo.push(Undo::V4Long(zip(&k, old)));
        self.maps.set_v4_long(entries)
    }
    fn del_v4_long(&mut self, keys: &[V4LongKey]) -> Result<(), Self::Error> {
        let old = self.maps.v4_long(keys)?;
        self.undo.push(Undo::V4Long(zip(keys, old)));
        self.maps.del_v4_long(keys)
    }
    fn set_v6_l1(&mut self, entries: &[(u32, V6L1Value)]) -> Result<(), Self::Error> {
        let k = keys(entries);
        let old = self.maps.v6_l1(&k)?;
        self.undo.push(Undo::V6L1(zip(&k, old)));
        self.maps.set_v6_l1(entries)
    }
    fn del_v6_l1(&mut self, tops: &[u32]) -> Result<(), Self::Error> {
        let old = self.maps.v6_l1(tops)?;
        self.undo.push(Undo::V6L1(zip(tops, old)));
        self.maps.del_v6_l1(tops)
    }
    fn set_v6_long(&mut self, entries: &[(V6LongKey, u32)]) -> Result<(), Self::Error> {
        let k = keys(entries);
        let old = self.maps.v6_long(&k)?;
        self.undo.push(Undo::V6Long(zip(&k, old)));
        self.maps.set_v6_long(entries)
    }
    fn del_v6_long(&mut self, keys: &[V6LongKey]) -> Result<(), Self::Error> {
        let old = self.maps.v6_long(keys)?;
        self.undo.push(Undo::V6Long(zip(keys, old)));
        self.maps.del_v6_long(keys)
    }
    fn rules(&self, indices: &[u32]) -> Result<Vec<DropRule>, Self::Error> {
        self.maps.rules(indices)
    }
    fn v4_long(&self, keys: &[V4LongKey]) -> Result<Vec<Option<u32>>, Self::Error> {
        self.maps.v4_long(keys)
    }
    fn v6_l1(&self, tops: &[u32]) -> Result<Vec<Option<V6L1Value>>, Self::Error> {
        self.maps.v6_l1(tops)
    }
    fn v6_long(&self, keys: &[V6LongKey]) -> Result<Vec<Option<u32>>, Self::Error> {
        self.maps.v6_long(keys)
    }
}
