//! The drop list's hot-path layout, and its incremental compiler.
//!
//! The kernel's LPM trie costs ~100 ns a lookup at 100k prefixes (a walk of
//! ~20 nodes). `edge_filter` instead uses:
//!
//! - **IPv4**: a 2^24-slot array indexed by the address's top 24 bits (one
//!   inlined array load, no hashing). A slot holds the rule index of the
//!   longest prefix of length <= 24 covering that /24 (prefixes shorter than
//!   /24 are painted over every slot they cover) and an 8-bit mask of the
//!   lengths 25..=32 present below it; only when that mask is non-zero does
//!   the program probe a hash of (masked address, length), longest first.
//! - **IPv6**: a hash keyed by the top 32 bits, holding the longest prefix of
//!   length <= 32 covering it (shorter prefixes, down to /24, are expanded)
//!   and a 96-bit mask of the lengths 33..=128 present below it; then, again,
//!   one hash probe per present length, longest first.
//! - Reason and expiry live in a rule array indexed by rule number.
//!
//! A miss (the common case: legitimate traffic) costs one array load for
//! IPv4 and one hash lookup for IPv6. Memory: 64 MiB for the v4 array
//! (fixed), 16 B per rule, and a hash entry per long prefix and per /32 used.
//!
//! Changes are applied as diffs: only the slots and hash entries that a
//! changed prefix covers are recomputed, and writes happen in an order that
//! never shows the program a slot naming a rule that is not yet written.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use allowlist_common::{
    DropRule, MAX_RULE_INDEX, V4_MIN_DROP_PREFIX, V4LongKey, V6_L1_PREFIX, V6_MIN_DROP_PREFIX,
    V6L1Value, V6LongKey, v4_slot,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// One wanted drop entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropSpec {
    pub net: IpNet,
    pub reason: u32,
    /// CLOCK_MONOTONIC ns, 0 = never.
    pub expires_ns: u64,
}

pub use super::drop_maps::{AdoptMaps, DropMaps};

#[derive(Debug, thiserror::Error)]
pub enum DropListError {
    #[error(
        "{net} is too wide for the drop list: IPv4 prefixes must be /{V4_MIN_DROP_PREFIX} or \
         longer and IPv6 prefixes /{V6_MIN_DROP_PREFIX} or longer; split it into longer prefixes"
    )]
    TooWide { net: IpNet },
    #[error(
        "the drop list would hold {wanted} entries but the kernel maps hold {capacity}; raise \
         [kernel] drop_capacity or remove entries (nothing was changed)"
    )]
    Full { wanted: usize, capacity: usize },
    #[error(
        "the IPv6 drop list would need {wanted} first-level entries (a prefix shorter than /32 \
         takes one per /32 it covers) but the kernel map holds {capacity}; raise \
         [kernel] drop_capacity or use longer prefixes (nothing was changed)"
    )]
    V6FirstLevelFull { wanted: usize, capacity: usize },
    #[error("writing the kernel drop maps failed: {0} (nothing was changed)")]
    Maps(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(
        "writing the kernel drop maps failed: {write}; undoing the change failed too: {undo}. \
         Restart allowlistd: it rewrites the maps from the store"
    )]
    Inconsistent {
        write: Box<dyn std::error::Error + Send + Sync>,
        undo: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Checks that `net` can go in the drop list.
pub fn validate(net: &IpNet) -> Result<(), DropListError> {
    let min = match net {
        IpNet::V4(_) => V4_MIN_DROP_PREFIX,
        IpNet::V6(_) => V6_MIN_DROP_PREFIX,
    };
    if u32::from(net.prefix_len()) < min {
        return Err(DropListError::TooWide { net: *net });
    }
    Ok(())
}

/// Above this many touched /24 slots a change repaints the v4 table whole.
const FULL_REPAINT_SLOTS: u64 = 1 << 20;

type Wanted = (HashMap<Ipv4Net, (u32, u64)>, HashMap<Ipv6Net, (u32, u64)>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    index: u32,
    reason: u32,
    expires_ns: u64,
}

/// The compiler's memory of what the maps hold, so that the next change is
/// written as a diff.
#[derive(Clone, Debug, PartialEq)]
pub struct DropList {
    capacity: usize,
    v4: HashMap<Ipv4Net, Entry>,
    v6: HashMap<Ipv6Net, Entry>,
    /// (slot /24, len) -> number of v4 prefixes of that length below it.
    v4_long_count: HashMap<(u32, u8), u32>,
    /// (top /32, len) -> number of v6 prefixes of that length below it.
    v6_long_count: HashMap<(u32, u8), u32>,
    /// top /32 -> lengths 33..=64 and 65..=128 present below it (the
    /// non-zero counts above, as the L1 value's masks).
    v6_bits: HashMap<u32, (u32, u64)>,
    /// Rule values as last written, to skip unchanged writes.
    written: HashMap<u32, DropRule>,
    free: Vec<u32>,
    next_index: u32,
    /// Indices an earlier daemon's rules still use during adoption.
    reserved: HashSet<u32>,
}

impl DropList {
    /// `capacity` is the number of prefixes the list may hold; the rule
    /// array must have `2 * capacity + 1` slots (see [`Self::max_index`]).
    pub fn new(capacity: usize) -> Self {
        DropList {
            capacity: capacity.min(MAX_RULE_INDEX as usize / 2),
            v4: HashMap::new(),
            v6: HashMap::new(),
            v4_long_count: HashMap::new(),
            v6_long_count: HashMap::new(),
            v6_bits: HashMap::new(),
            written: HashMap::new(),
            free: Vec::new(),
            next_index: 1,
            reserved: HashSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes the maps hold exactly `wanted` (last spec wins for a duplicate
    /// prefix). Refused as a whole, before any write, when it does not fit.
    fn wanted_sets(&self, wanted: &[DropSpec]) -> Result<Wanted, DropListError> {
        let mut want4: HashMap<Ipv4Net, (u32, u64)> = HashMap::new();
        let mut want6: HashMap<Ipv6Net, (u32, u64)> = HashMap::new();
        for spec in wanted {
            validate(&spec.net)?;
            match spec.net.trunc() {
                IpNet::V4(n) => want4.insert(n, (spec.reason, spec.expires_ns)),
                IpNet::V6(n) => want6.insert(n, (spec.reason, spec.expires_ns)),
            };
        }
        let total = want4.len() + want6.len();
        if total > self.capacity {
            return Err(DropListError::Full {
                wanted: total,
                capacity: self.capacity,
            });
        }
        // The v6 first level holds one entry per /32 in use, and a prefix
        // shorter than /32 is expanded into every /32 it covers.
        let mut tops: HashSet<u32> = HashSet::new();
        for net in want6.keys() {
            let first = top32(net);
            let count = 1u32 << 32u8.saturating_sub(net.prefix_len());
            tops.extend(first..first + count);
        }
        if tops.len() > self.capacity {
            return Err(DropListError::V6FirstLevelFull {
                wanted: tops.len(),
                capacity: self.capacity,
            });
        }
        Ok((want4, want6))
    }

    /// Makes the maps hold exactly `wanted` (last spec wins for a duplicate
    /// prefix). Refused as a whole, before any write, when it does not fit;
    /// when a write fails midway, every write already made is undone and
    /// this record restored, so maps and record are as before the call.
    pub fn apply<M: DropMaps>(
        &mut self,
        maps: &mut M,
        wanted: &[DropSpec],
    ) -> Result<(), DropListError> {
        // A copy of the record, O(entries) — as is every apply, which reads
        // the whole wanted list.
        let before = self.clone();
        let mut journal = super::journal::Journal::new(maps);
        match self.apply_diff(&mut journal, wanted) {
            Ok(()) => Ok(()),
            Err(e) => {
                *self = before;
                match (e, journal.rollback()) {
                    (e, Ok(())) => Err(e),
                    (DropListError::Maps(write), Err(undo)) => Err(DropListError::Inconsistent {
                        write,
                        undo: Box::new(undo),
                    }),
                    (e, Err(_)) => Err(e),
                }
            }
        }
    }

    fn apply_diff<M: DropMaps>(
        &mut self,
        maps: &mut M,
        wanted: &[DropSpec],
    ) -> Result<(), DropListError> {
        let (want4, want6) = self.wanted_sets(wanted)?;
        let maps_err = |e: M::Error| DropListError::Maps(Box::new(e));

        // 1. New and changed rules get an index and their rule value first.
        let removed4: Vec<Ipv4Net> = self
            .v4
            .keys()
            .filter(|n| !want4.contains_key(n))
            .copied()
            .collect();
        let removed6: Vec<Ipv6Net> = self
            .v6
            .keys()
            .filter(|n| !want6.contains_key(n))
            .copied()
            .collect();
        let mut added4 = Vec::new();
        let mut added6 = Vec::new();
        let mut changed = false;
        for (net, &(reason, expires_ns)) in &want4 {
            match self.v4.get_mut(net) {
                Some(e) if e.reason == reason && e.expires_ns == expires_ns => {}
                Some(e) => {
                    (e.reason, e.expires_ns) = (reason, expires_ns);
                    changed = true;
                }
                None => added4.push(*net),
            }
        }
        for (net, &(reason, expires_ns)) in &want6 {
            match self.v6.get_mut(net) {
                Some(e) if e.reason == reason && e.expires_ns == expires_ns => {}
                Some(e) => {
                    (e.reason, e.expires_ns) = (reason, expires_ns);
                    changed = true;
                }
                None => added6.push(*net),
            }
        }
        for net in &added4 {
            let (reason, expires_ns) = want4[net];
            let index = self.alloc();
            self.v4.insert(
                *net,
                Entry {
                    index,
                    reason,
                    expires_ns,
                },
            );
        }
        for net in &added6 {
            let (reason, expires_ns) = want6[net];
            let index = self.alloc();
            self.v6.insert(
                *net,
                Entry {
                    index,
                    reason,
                    expires_ns,
                },
            );
        }
        // Removed entries leave the set now (so covering expiries are
        // computed without them) but keep their rule until nothing points
        // at it.
        let mut removed_entries4 = Vec::new();
        for net in &removed4 {
            let e = self.v4.remove(net).expect("listed from the map");
            removed_entries4.push((*net, e));
            if net.prefix_len() > 24 {
                let k = (v4_long_key(net).addr >> 8, net.prefix_len());
                decrement(&mut self.v4_long_count, k);
            }
        }
        let mut removed_entries6 = Vec::new();
        for net in &removed6 {
            let e = self.v6.remove(net).expect("listed from the map");
            removed_entries6.push((*net, e));
            if u32::from(net.prefix_len()) > V6_L1_PREFIX {
                self.count6(top32(net), net.prefix_len(), false);
            }
        }

        if changed
            || !added4.is_empty()
            || !added6.is_empty()
            || !removed4.is_empty()
            || !removed6.is_empty()
        {
            self.write_rules(maps).map_err(maps_err)?;
        }

        // 2. Long prefixes added, then first levels recomputed where touched.
        let mut long4 = Vec::new();
        for net in &added4 {
            if net.prefix_len() > 24 {
                let key = v4_long_key(net);
                long4.push((key, self.v4[net].index));
                *self
                    .v4_long_count
                    .entry((key.addr >> 8, net.prefix_len()))
                    .or_default() += 1;
            }
        }
        maps.set_v4_long(&long4).map_err(maps_err)?;
        let mut long6 = Vec::new();
        for net in &added6 {
            if u32::from(net.prefix_len()) > V6_L1_PREFIX {
                long6.push((v6_long_key(net), self.v6[net].index));
                self.count6(top32(net), net.prefix_len(), true);
            }
        }
        maps.set_v6_long(&long6).map_err(maps_err)?;
        let touched: u64 = added4
            .iter()
            .chain(&removed4)
            .map(|n| 1u64 << 24u8.saturating_sub(n.prefix_len()))
            .sum();
        if touched > FULL_REPAINT_SLOTS {
            // Cheaper to repaint everything linearly than to recompute this
            // many slots by lookups.
            self.repaint_v4(maps).map_err(maps_err)?;
        } else {
            let mut dirty4: HashSet<u32> = HashSet::new();
            for net in added4.iter().chain(&removed4) {
                let first = u32::from(net.network()) >> 8;
                let count = 1u32 << (24u8.saturating_sub(net.prefix_len()));
                dirty4.extend(first..first + count);
            }
            for slot in dirty4 {
                let value = self.v4_slot_value(slot);
                if maps.v4_slot(slot) != value {
                    maps.set_v4_slot(slot, value).map_err(maps_err)?;
                }
            }
        }
        let mut dirty6: HashSet<u32> = HashSet::new();
        for net in added6.iter().chain(&removed6) {
            let first = top32(net);
            let count = 1u32 << (32u8.saturating_sub(net.prefix_len()));
            dirty6.extend(first..first + count);
        }
        self.write_v6_l1(maps, dirty6).map_err(maps_err)?;

        // 3. Only now that nothing points at them, drop removed long keys
        // and recycle the indices of removed rules.
        let gone4: Vec<V4LongKey> = removed_entries4
            .iter()
            .filter(|(net, _)| net.prefix_len() > 24)
            .map(|(net, _)| v4_long_key(net))
            .collect();
        maps.del_v4_long(&gone4).map_err(maps_err)?;
        let gone6: Vec<V6LongKey> = removed_entries6
            .iter()
            .filter(|(net, _)| u32::from(net.prefix_len()) > V6_L1_PREFIX)
            .map(|(net, _)| v6_long_key(net))
            .collect();
        maps.del_v6_long(&gone6).map_err(maps_err)?;
        let released: Vec<u32> = removed_entries4
            .iter()
            .map(|(_, e)| e.index)
            .chain(removed_entries6.iter().map(|(_, e)| e.index))
            .collect();
        self.release(maps, &released).map_err(maps_err)?;
        Ok(())
    }

    /// Writes the v6 first-level entry of every top in `tops`: its value,
    /// or a delete where nothing is left below it.
    fn write_v6_l1<M: DropMaps>(
        &self,
        maps: &mut M,
        tops: impl IntoIterator<Item = u32>,
    ) -> Result<(), M::Error> {
        let mut set = Vec::new();
        let mut gone = Vec::new();
        for top in tops {
            match self.v6_l1_value(top) {
                Some(v) => set.push((top, v)),
                None => gone.push(top),
            }
        }
        maps.set_v6_l1(&set)?;
        maps.del_v6_l1(&gone)
    }

    /// Indices run up to twice the capacity: within one change the new
    /// rules are written before the removed ones are released, so up to
    /// `capacity` old and `capacity` new can be live at once.
    pub fn max_index(&self) -> usize {
        self.capacity * 2
    }

    fn alloc(&mut self) -> u32 {
        if let Some(i) = self.free.pop() {
            return i;
        }
        while self.reserved.contains(&self.next_index) {
            self.next_index += 1;
        }
        if self.next_index as usize > self.max_index()
            && let Some(&i) = self.reserved.iter().next()
        {
            // No room beside the earlier daemon's rules: reuse one of them.
            // Until its slots are rewritten a few addresses may see this
            // rule's expiry instead of their own (never a missed drop of a
            // permanent entry, which is rewritten in the same pass).
            self.reserved.remove(&i);
            return i;
        }
        let i = self.next_index;
        self.next_index += 1;
        i
    }

    fn release<M: DropMaps>(&mut self, maps: &mut M, indices: &[u32]) -> Result<(), M::Error> {
        // A zeroed rule never drops, should a stale pointer still reach it.
        let zeroed: Vec<(u32, DropRule)> =
            indices.iter().map(|&i| (i, DropRule::default())).collect();
        maps.set_rules(&zeroed)?;
        for &index in indices {
            self.written.remove(&index);
            self.free.push(index);
        }
        Ok(())
    }

    /// Writes every rule whose value changed. A rule's stored expiry is the
    /// latest among it and every prefix covering it (0 = never wins), so
    /// when the longest match has expired nothing covering it still drops.
    fn write_rules<M: DropMaps>(&mut self, maps: &mut M) -> Result<(), M::Error> {
        let mut values: Vec<(u32, DropRule)> = Vec::with_capacity(self.len());
        for (net, e) in &self.v4 {
            let mut expires = e.expires_ns;
            if expires != 0 {
                for len in (0..net.prefix_len()).rev() {
                    let parent = Ipv4Net::new(net.network(), len).expect("len < 32").trunc();
                    if let Some(p) = self.v4.get(&parent) {
                        expires = later(expires, p.expires_ns);
                    }
                }
            }
            values.push((e.index, rule(e.reason, expires)));
        }
        for (net, e) in &self.v6 {
            let mut expires = e.expires_ns;
            if expires != 0 {
                for len in (0..net.prefix_len()).rev() {
                    let parent = Ipv6Net::new(net.network(), len).expect("len < 128").trunc();
                    if let Some(p) = self.v6.get(&parent) {
                        expires = later(expires, p.expires_ns);
                    }
                }
            }
            values.push((e.index, rule(e.reason, expires)));
        }
        values.retain(|(index, value)| self.written.get(index) != Some(value));
        maps.set_rules(&values)?;
        self.written.extend(values);
        Ok(())
    }

    /// Paints the whole v4 first level (shorter prefixes first, longer ones
    /// over them, then the long-length bits) and writes the slots that
    /// differ from what the maps hold.
    fn repaint_v4<M: DropMaps>(&self, maps: &mut M) -> Result<(), M::Error> {
        let mut paint = vec![0u32; allowlist_common::V4_L1_SLOTS as usize];
        let mut short: Vec<(&Ipv4Net, &Entry)> = self
            .v4
            .iter()
            .filter(|(n, _)| n.prefix_len() <= 24)
            .collect();
        short.sort_by_key(|(n, _)| n.prefix_len());
        for (net, e) in short {
            let first = (u32::from(net.network()) >> 8) as usize;
            let count = 1usize << (24 - net.prefix_len());
            paint[first..first + count].fill(v4_slot(e.index, 0));
        }
        for &(slot, len) in self.v4_long_count.keys() {
            paint[slot as usize] |= 1 << (len - 25);
        }
        for (slot, &value) in paint.iter().enumerate() {
            if maps.v4_slot(slot as u32) != value {
                maps.set_v4_slot(slot as u32, value)?;
            }
        }
        Ok(())
    }

    /// Counts a v6 prefix of length `len` (> 32) below `top` in or out,
    /// keeping the length masks in step.
    fn count6(&mut self, top: u32, len: u8, add: bool) {
        let (bit_hi, bit_lo) = if len <= 64 {
            (1u32 << (len - 33), 0)
        } else {
            (0, 1u64 << (len - 65))
        };
        if add {
            *self.v6_long_count.entry((top, len)).or_default() += 1;
            let bits = self.v6_bits.entry(top).or_default();
            bits.0 |= bit_hi;
            bits.1 |= bit_lo;
            return;
        }
        decrement(&mut self.v6_long_count, (top, len));
        if !self.v6_long_count.contains_key(&(top, len))
            && let Some(bits) = self.v6_bits.get_mut(&top)
        {
            bits.0 &= !bit_hi;
            bits.1 &= !bit_lo;
            if *bits == (0, 0) {
                self.v6_bits.remove(&top);
            }
        }
    }

    fn v4_slot_value(&self, slot: u32) -> u32 {
        let base = Ipv4Addr::from(slot << 8);
        let mut rule = 0;
        for len in (0..=24u8).rev() {
            let net = Ipv4Net::new(base, len).expect("len <= 24").trunc();
            if let Some(e) = self.v4.get(&net) {
                rule = e.index;
                break;
            }
        }
        let mut bits = 0u8;
        for len in 25..=32u8 {
            if self.v4_long_count.contains_key(&(slot, len)) {
                bits |= 1 << (len - 25);
            }
        }
        v4_slot(rule, bits)
    }

    fn v6_l1_value(&self, top: u32) -> Option<V6L1Value> {
        let base = Ipv6Addr::from((top as u128) << 96);
        let mut value = V6L1Value::default();
        for len in (V6_MIN_DROP_PREFIX as u8..=V6_L1_PREFIX as u8).rev() {
            let net = Ipv6Net::new(base, len).expect("len <= 32").trunc();
            if let Some(e) = self.v6.get(&net) {
                value.rule = e.index;
                break;
            }
        }
        if let Some(&(hi, lo)) = self.v6_bits.get(&top) {
            value.bits_33_64 = hi;
            value.bits_65_128 = lo;
        }
        (value != V6L1Value::default()).then_some(value)
    }
}

fn rule(reason: u32, expires_ns: u64) -> DropRule {
    DropRule {
        expires_ns,
        reason,
        _pad: 0,
    }
}

/// The later of two expiries, where 0 means never.
fn later(a: u64, b: u64) -> u64 {
    if a == 0 || b == 0 { 0 } else { a.max(b) }
}

fn decrement(counts: &mut HashMap<(u32, u8), u32>, key: (u32, u8)) {
    if let Some(c) = counts.get_mut(&key) {
        *c -= 1;
        if *c == 0 {
            counts.remove(&key);
        }
    }
}

fn top32(net: &Ipv6Net) -> u32 {
    (u128::from(net.network()) >> 96) as u32
}

pub fn v4_long_key(net: &Ipv4Net) -> V4LongKey {
    V4LongKey {
        addr: u32::from(net.network()),
        len: u32::from(net.prefix_len()),
    }
}

pub fn v6_long_key(net: &Ipv6Net) -> V6LongKey {
    let a = u128::from(net.network());
    V6LongKey {
        hi: (a >> 64) as u64,
        lo: a as u64,
        len: u32::from(net.prefix_len()),
        _pad: 0,
    }
}

mod adopt;
mod model;
pub use model::ModelMaps;

#[cfg(test)]
mod tests;
