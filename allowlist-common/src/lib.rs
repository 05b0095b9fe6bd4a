//! Types shared by the eBPF programs and the daemon: map keys, map values,
//! event records and counter indices.
//!
//! Every type is `#[repr(C)]` with explicit padding, because hash and LPM
//! lookups compare raw bytes: an uninitialised padding byte would make two
//! equal keys differ. Sizes are pinned with `const` assertions so a layout
//! change cannot slip through unnoticed; any change to a type here must bump
//! [`LAYOUT_VERSION`].
#![no_std]

use core::mem::size_of;

/// Version of the pinned map layout. A daemon refuses to adopt pinned maps
/// whose `LAYOUT` map holds another value.
pub const LAYOUT_VERSION: u32 = 2;

/// Number of slots of the first-level IPv4 table: one `u32` per /24.
pub const V4_L1_SLOTS: u32 = 1 << 24;
/// The table's map elements: array elements are 8-byte aligned, so two
/// slots share one `u64` element (slot `2i` in the low half, `2i + 1` in the
/// high half, little-endian), which makes the mmap a plain `[u32; 2^24]`.
pub const V4_L1_ELEMENTS: u32 = V4_L1_SLOTS / 2;
/// Low bits of a v4 first-level slot: one bit per prefix length 25..=32
/// present below that /24 (bit `len - 25`).
pub const V4_L1_LEN_BITS: u32 = 8;
/// Largest rule index a first-level slot can name (24 bits).
pub const MAX_RULE_INDEX: u32 = (1 << 24) - 1;

/// Shortest IPv6 prefix held in the v6 first level (one hash entry per /32);
/// shorter drop prefixes are expanded into /32s.
pub const V6_L1_PREFIX: u32 = 32;
/// Shortest IPv6 drop prefix accepted (expanded into at most 2^8 /32s).
pub const V6_MIN_DROP_PREFIX: u32 = 24;
/// Shortest IPv4 drop prefix accepted (expanded into at most 2^16 /24 slots).
pub const V4_MIN_DROP_PREFIX: u32 = 8;

/// Packs a v4 first-level slot.
#[inline(always)]
pub const fn v4_slot(rule: u32, long_bits: u8) -> u32 {
    (rule << V4_L1_LEN_BITS) | long_bits as u32
}

/// Key of the v4 long-prefix hash (prefix lengths 25..=32).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct V4LongKey {
    /// Address masked to `len` bits, host byte order (numeric value).
    pub addr: u32,
    /// Prefix length, 25..=32.
    pub len: u32,
}
const _: () = assert!(size_of::<V4LongKey>() == 8);

/// Value of the v6 first-level hash, keyed by the address's top 32 bits
/// (host byte order `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V6L1Value {
    /// Rule index of the longest prefix of length <= 32 covering this /32,
    /// 0 for none.
    pub rule: u32,
    /// Bit `len - 33` set when a prefix of length 33..=64 exists below.
    pub bits_33_64: u32,
    /// Bit `len - 65` set when a prefix of length 65..=128 exists below.
    pub bits_65_128: u64,
}
const _: () = assert!(size_of::<V6L1Value>() == 16);

/// Key of the v6 long-prefix hash (prefix lengths 33..=128).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct V6LongKey {
    /// High 64 bits of the masked address, host byte order.
    pub hi: u64,
    /// Low 64 bits of the masked address, host byte order.
    pub lo: u64,
    /// Prefix length, 33..=128.
    pub len: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<V6LongKey>() == 24);

/// One drop rule, indexed by rule index in `DROP_RULES` (index 0 unused).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropRule {
    /// CLOCK_MONOTONIC ns after which the rule no longer drops; 0 = never.
    /// Userspace stores the latest expiry of this rule and every rule that
    /// covers it, so an expired longest match means nothing covering drops.
    pub expires_ns: u64,
    /// One of the `REASON_*` codes.
    pub reason: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<DropRule>() == 16);

/// Drop-list reasons (also the counter offset from [`C_DROP_LIST_BASE`]).
pub const REASON_MANUAL: u32 = 1;
pub const REASON_DENIED: u32 = 2;
pub const REASON_AUTO: u32 = 3;
pub const REASON_IMPORT: u32 = 4;
pub const REASON_MAX: u32 = 7;

/// `GUARD_PORTS` is an array indexed by destination port (host byte order):
/// an inlined load on every connection-opening packet, where a hash lookup
/// would cost ~10 ns. Its value holds the `SERVICE_*` guarding the port for
/// TCP in the low 16 bits and for UDP in the high 16 bits (0 = unguarded).
pub const GUARD_PORT_SLOTS: u32 = 1 << 16;

/// The part of a `GUARD_PORTS` value that concerns `proto`.
#[inline(always)]
pub const fn guard_service(value: u32, proto: u8) -> u32 {
    if proto == PROTO_UDP {
        value >> 16
    } else {
        value & 0xffff
    }
}

/// Slot 0 of `GUARD_PORTS` (port 0 never carries a connection) holds the
/// services whose guard is armed, as a mask of `1 << SERVICE_*`: what a
/// packet whose port cannot be read (a tiny fragment, an IPv6 chain that
/// cannot be walked) is checked against.
pub const ARMED_SLOT: u16 = 0;

/// The armed-services mask of the `ARMED_SLOT` value.
#[inline(always)]
pub const fn armed_services(value: u32) -> u32 {
    value & 0xffff
}

/// A `GUARD_PORTS` value with `service` set for `proto`, other protocol kept.
#[inline(always)]
pub const fn with_guard_service(value: u32, proto: u8, service: u32) -> u32 {
    if proto == PROTO_UDP {
        (value & 0xffff) | (service << 16)
    } else {
        (value & 0xffff_0000) | (service & 0xffff)
    }
}
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Services a guarded port belongs to (value of `GUARD_PORTS`).
pub const SERVICE_API: u32 = 1;
pub const SERVICE_SMTP: u32 = 2;

/// `KeyState::state` values.
pub const KEY_ACTIVE: u32 = 1;
pub const KEY_REVOKED: u32 = 2;

/// `KEY_STATE` value: a key's state and the account it belongs to (whose
/// `ACCOUNT_ALLOW*` entries and `ACCOUNT_MODE` bits the connection hooks
/// check it against).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyState {
    /// `KEY_ACTIVE` or `KEY_REVOKED`.
    pub state: u32,
    /// Account index (any value, 0 included).
    pub account: u32,
}
const _: () = assert!(size_of::<KeyState>() == 8);

/// `ACCOUNT_ALLOW4`/`ACCOUNT_ALLOW6` values: the account authorized the
/// prefix, or denied it (refused whatever the account's mode, even inside
/// a shorter authorized prefix).
pub const ACCOUNT_DENIED: u8 = 0;
pub const ACCOUNT_ADMIT: u8 = 1;

/// `ACCOUNT_MODE` bit: the account's API blocking is active, so an address
/// without any entry in the account's trie is refused. An account without
/// an `ACCOUNT_MODE` entry has no bit set.
pub const ACCOUNT_API_ACTIVE: u32 = 1;

/// `CONNS` value: the key a connection of the proxy presented.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    pub kid: u32,
    /// The `POLICY_GEN` under which `conn_verdict` last admitted this
    /// connection; 0 = not yet checked. Until the daemon changes a policy
    /// map (and bumps the generation) the verdict cannot change, so later
    /// packets skip the lookups.
    pub checked_gen: u32,
}
const _: () = assert!(size_of::<ConnInfo>() == 8);

/// `CONN_CLIENT` value: who the client of a proxy connection is when a
/// trusted balancer named it, rather than the TCP peer (the balancer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnClient {
    /// `CLIENT_PROXY` or `CLIENT_XFF`.
    pub mode: u32,
    /// 4 or 6.
    pub family: u32,
    /// The address (IPv4 in the first four bytes), network order.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<ConnClient>() == 24);

/// The client came in a PROXY protocol header: the kernel checks it in
/// place of the peer.
pub const CLIENT_PROXY: u32 = 1;
/// The clients come per request in X-Forwarded-For: the kernel checks the
/// key's state only; addresses are checked per request in userspace.
pub const CLIENT_XFF: u32 = 2;

/// Counters of the connection hooks (indices into `STATS`).
pub const C_CONN_CUT_REVOKED: u32 = STATS_SLOTS;
pub const C_CONN_CUT_ALLOW: u32 = STATS_SLOTS + 1;
pub const C_CONN_CUT_ACCOUNT: u32 = STATS_SLOTS + 2;
/// Size of `STATS` including the connection-hook counters.
pub const ALL_STATS_SLOTS: u32 = STATS_SLOTS + 3;

/// Verdicts carried by events.
pub const VERDICT_DROP_LIST: u32 = 1;
pub const VERDICT_DROP_GUARD: u32 = 2;

/// A kernel drop, reported through the `EVENTS` ring buffer (at most one per
/// source per second).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    /// CLOCK_MONOTONIC ns.
    pub ts_ns: u64,
    /// Source address, network byte order; IPv4 as `::ffff:a.b.c.d`.
    pub saddr: [u8; 16],
    pub ifindex: u32,
    /// Destination port, host byte order (0 when not TCP/UDP).
    pub dport: u16,
    /// 4 or 6.
    pub family: u8,
    pub proto: u8,
    /// `VERDICT_*`.
    pub verdict: u32,
    /// `REASON_*` for drop-list drops, `SERVICE_*` for guard drops.
    pub reason: u32,
}
const _: () = assert!(size_of::<DropEvent>() == 40);

/// Indices into the per-CPU `STATS` array.
pub const C_PASS: u32 = 0;
pub const C_DROP_GUARD: u32 = 1;
pub const C_EVENTS_SENT: u32 = 2;
pub const C_EVENTS_RATE_LIMITED: u32 = 3;
pub const C_EVENTS_LOST: u32 = 4;
pub const C_MALFORMED: u32 = 5;
pub const C_DROP_GUARD_SMTP: u32 = 6;
/// Packets that might open a connection but could not be classified,
/// dropped from outside every armed union.
pub const C_DROP_UNCLASSIFIED: u32 = 7;
/// `C_DROP_LIST_BASE + reason` counts drop-list drops per reason.
pub const C_DROP_LIST_BASE: u32 = 8;
pub const STATS_SLOTS: u32 = C_DROP_LIST_BASE + REASON_MAX + 1;

/// One slot of the per-CPU cache in front of the event rate limiter's LRU
/// map: the last source this CPU checked in the slot and the time of that
/// source's last event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventCacheSlot {
    /// The source address as two native-endian words (compared word-wise,
    /// since eBPF has no memcmp).
    pub addr: [u64; 2],
    pub last_ns: u64,
}
const _: () = assert!(size_of::<EventCacheSlot>() == 24);
pub const EVENT_CACHE_SLOTS: u32 = 1024;

/// Ring buffer size (bytes; power of two, multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 20;
/// Events each CPU may send per second in total (see `within_budget` in
/// the eBPF crate): with the per-source interval, what bounds the daemon's
/// work under a flood of spoofed sources.
pub const EVENTS_PER_CPU_PER_SEC: u64 = 500;
/// Minimum interval between two events about one source.
pub const EVENT_INTERVAL_NS: u64 = 1_000_000_000;

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for V4LongKey {}
    unsafe impl aya::Pod for V6L1Value {}
    unsafe impl aya::Pod for V6LongKey {}
    unsafe impl aya::Pod for DropRule {}
    unsafe impl aya::Pod for DropEvent {}
    unsafe impl aya::Pod for EventCacheSlot {}
    unsafe impl aya::Pod for ConnInfo {}
    unsafe impl aya::Pod for ConnClient {}
    unsafe impl aya::Pod for KeyState {}
}
