//! The drop list's maps as the compiler sees them: what it writes, and what
//! it reads back (for adoption and for undoing a failed change).
//!
//! Writes and reads take many entries at once, so that the pinned maps can
//! move them in batches (`map_batch`). A write of several entries that
//! fails leaves the ones before the failing entry written.

use allowlist_common::{DropRule, V4LongKey, V6L1Value, V6LongKey};

/// Where the compiled layout is written: the pinned kernel maps, or an
/// in-memory model in tests.
pub trait DropMaps {
    type Error: std::error::Error + Send + Sync + 'static;
    fn set_rules(&mut self, rules: &[(u32, DropRule)]) -> Result<(), Self::Error>;
    // The v4 first level is a memory mapping: one slot at a time costs
    // nothing more.
    fn v4_slot(&self, slot: u32) -> u32;
    fn set_v4_slot(&mut self, slot: u32, value: u32) -> Result<(), Self::Error>;
    fn set_v4_long(&mut self, entries: &[(V4LongKey, u32)]) -> Result<(), Self::Error>;
    fn del_v4_long(&mut self, keys: &[V4LongKey]) -> Result<(), Self::Error>;
    fn set_v6_l1(&mut self, entries: &[(u32, V6L1Value)]) -> Result<(), Self::Error>;
    fn del_v6_l1(&mut self, tops: &[u32]) -> Result<(), Self::Error>;
    fn set_v6_long(&mut self, entries: &[(V6LongKey, u32)]) -> Result<(), Self::Error>;
    fn del_v6_long(&mut self, keys: &[V6LongKey]) -> Result<(), Self::Error>;
    // What entries hold now, so a failed change can be undone
    // (`journal::Journal`).
    fn rules(&self, indices: &[u32]) -> Result<Vec<DropRule>, Self::Error>;
    fn v4_long(&self, keys: &[V4LongKey]) -> Result<Vec<Option<u32>>, Self::Error>;
    fn v6_l1(&self, tops: &[u32]) -> Result<Vec<Option<V6L1Value>>, Self::Error>;
    fn v6_long(&self, keys: &[V6LongKey]) -> Result<Vec<Option<u32>>, Self::Error>;
}

/// What adoption needs to read back from maps an earlier daemon filled.
pub trait AdoptMaps: DropMaps {
    /// Indices of non-zero rules.
    fn used_rules(&self) -> Result<Vec<u32>, Self::Error>;
    fn v4_long_keys(&self) -> Result<Vec<V4LongKey>, Self::Error>;
    fn v6_l1_keys(&self) -> Result<Vec<u32>, Self::Error>;
    fn v6_long_keys(&self) -> Result<Vec<V6LongKey>, Self::Error>;
}
