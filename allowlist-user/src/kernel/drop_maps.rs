//! The drop list's maps as the compiler sees them: what it writes, and what
//! it reads back (for adoption and for undoing a failed change).

use allowlist_common::{DropRule, V4LongKey, V6L1Value, V6LongKey};

/// Where the compiled layout is written: the pinned kernel maps, or an
/// in-memory model in tests.
pub trait DropMaps {
    type Error: std::error::Error + Send + Sync + 'static;
    fn set_rule(&mut self, index: u32, rule: DropRule) -> Result<(), Self::Error>;
    fn v4_slot(&self, slot: u32) -> u32;
    fn set_v4_slot(&mut self, slot: u32, value: u32) -> Result<(), Self::Error>;
    fn set_v4_long(&mut self, key: V4LongKey, rule: u32) -> Result<(), Self::Error>;
    fn del_v4_long(&mut self, key: V4LongKey) -> Result<(), Self::Error>;
    fn set_v6_l1(&mut self, top: u32, value: V6L1Value) -> Result<(), Self::Error>;
    fn del_v6_l1(&mut self, top: u32) -> Result<(), Self::Error>;
    fn set_v6_long(&mut self, key: V6LongKey, rule: u32) -> Result<(), Self::Error>;
    fn del_v6_long(&mut self, key: V6LongKey) -> Result<(), Self::Error>;
    // What an entry holds now, so a failed change can be undone
    // (`journal::Journal`).
    fn rule(&self, index: u32) -> DropRule;
    fn v4_long(&self, key: V4LongKey) -> Option<u32>;
    fn v6_l1(&self, top: u32) -> Option<V6L1Value>;
    fn v6_long(&self, key: V6LongKey) -> Option<u32>;
}
