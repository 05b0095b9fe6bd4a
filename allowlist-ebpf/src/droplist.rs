//! The drop list as `edge_filter` reads it (the layout is explained in the
//! daemon's `kernel/droplist.rs`): a v4 first level indexed by /24, a v6
//! first level hashed by /32, long prefixes in hashes probed longest
//! first, and the rules with their reason and expiry.

use allowlist_common::{DropRule, V4_L1_ELEMENTS, V4_L1_LEN_BITS, V4LongKey, V6L1Value, V6LongKey};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap},
};

use crate::{DEFAULT_LONG, DEFAULT_RULES, MMAPABLE, NO_PREALLOC, now_ns};

/// v4 drop first level: one `u32` slot per /24, two per element; see
/// `allowlist_common::{v4_slot, V4_L1_ELEMENTS}`.
#[map]
static DROP4_L1: Array<u64> = Array::pinned(V4_L1_ELEMENTS, MMAPABLE);
/// v4 drop prefixes of length 25..=32 -> rule index.
#[map]
static DROP4_LONG: HashMap<V4LongKey, u32> = HashMap::pinned(DEFAULT_LONG, NO_PREALLOC);
/// v6 drop first level: top 32 bits -> rule for <= /32 + lengths below.
#[map]
static DROP6_L1: HashMap<u32, V6L1Value> = HashMap::pinned(DEFAULT_LONG, NO_PREALLOC);
/// v6 drop prefixes of length 33..=128 -> rule index.
#[map]
static DROP6_LONG: HashMap<V6LongKey, u32> = HashMap::pinned(DEFAULT_LONG, NO_PREALLOC);
/// Rule index -> reason and expiry, shared by both families.
#[map]
static DROP_RULES: Array<DropRule> = Array::pinned(DEFAULT_RULES, 0);

/// The reason of the rule that drops `rule`, if it has not expired.
#[inline(always)]
fn rule_verdict(rule: u32) -> Option<u32> {
    if rule == 0 {
        return None;
    }
    let r = DROP_RULES.get(rule)?;
    if r.expires_ns != 0 && r.expires_ns <= now_ns() {
        return None;
    }
    Some(r.reason)
}

/// Longest-prefix match of `addr` (host order) in the v4 drop list.
#[inline(always)]
pub(crate) fn drop4(addr: u32) -> Option<u32> {
    let pair = *DROP4_L1.get(addr >> 9)?;
    let slot = if addr & (1 << 8) == 0 {
        pair as u32
    } else {
        (pair >> 32) as u32
    };
    let mut bits = (slot & ((1 << V4_L1_LEN_BITS) - 1)) as u8;
    // Lengths 32 down to 25 present under this /24, longest first.
    for _ in 0..8 {
        if bits == 0 {
            break;
        }
        let top = 7 - bits.leading_zeros();
        bits &= !(1u8 << top);
        let len = 25 + top;
        let key = V4LongKey {
            addr: addr & (u32::MAX << (32 - len)),
            len,
        };
        // SAFETY: plain value read of a map entry.
        if let Some(rule) = unsafe { DROP4_LONG.get(key) } {
            return rule_verdict(*rule);
        }
    }
    rule_verdict(slot >> V4_L1_LEN_BITS)
}

/// Longest-prefix match of `hi:lo` (host order) in the v6 drop list.
#[inline(always)]
pub(crate) fn drop6(hi: u64, lo: u64) -> Option<u32> {
    // SAFETY: plain value read of a map entry.
    let l1 = unsafe { DROP6_L1.get((hi >> 32) as u32) }?;
    let mut low = l1.bits_65_128;
    for _ in 0..64 {
        if low == 0 {
            break;
        }
        let top = 63 - low.leading_zeros();
        low &= !(1u64 << top);
        let len = 65 + top;
        let key = V6LongKey {
            hi,
            lo: lo & (u64::MAX << (128 - len)),
            len,
            _pad: 0,
        };
        // SAFETY: plain value read of a map entry.
        if let Some(rule) = unsafe { DROP6_LONG.get(key) } {
            return rule_verdict(*rule);
        }
    }
    let mut high = l1.bits_33_64;
    for _ in 0..32 {
        if high == 0 {
            break;
        }
        let top = 31 - high.leading_zeros();
        high &= !(1u32 << top);
        let len = 33 + top;
        let key = V6LongKey {
            hi: hi & (u64::MAX << (64 - len)),
            lo: 0,
            len,
            _pad: 0,
        };
        // SAFETY: plain value read of a map entry.
        if let Some(rule) = unsafe { DROP6_LONG.get(key) } {
            return rule_verdict(*rule);
        }
    }
    rule_verdict(l1.rule)
}
