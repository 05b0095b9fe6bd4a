//! Drop events: a record per dropped packet's source to userspace through
//! the `EVENTS` ring buffer, at most one per source per
//! `EVENT_INTERVAL_NS` and at most `EVENTS_PER_CPU_PER_SEC` per CPU, so a
//! flood costs the ring buffer (and the daemon) next to nothing.

use allowlist_common::{
    C_EVENTS_LOST, C_EVENTS_RATE_LIMITED, C_EVENTS_SENT, DropEvent, EVENT_CACHE_SLOTS,
    EVENT_INTERVAL_NS, EVENTS_BYTES, EVENTS_PER_CPU_PER_SEC, EventCacheSlot,
};
use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::XdpContext,
};

use crate::{L4, count, now_ns};

#[map]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);
/// Source (v4 as ::ffff:a.b.c.d) -> time of its last event. Authoritative.
#[map]
static EVENT_LAST: LruHashMap<[u8; 16], u64> = LruHashMap::pinned(65536, 0);
/// Per-CPU direct-mapped cache of `EVENT_LAST`: a flood from one source is
/// suppressed by an inlined array load instead of an LRU hash lookup.
#[map]
static EVENT_CACHE: PerCpuArray<EventCacheSlot> = PerCpuArray::pinned(EVENT_CACHE_SLOTS, 0);

/// The total budget: at most `EVENTS_PER_CPU_PER_SEC` events per CPU per
/// second, whatever the sources. The per-source limit alone lets a flood
/// of spoofed sources (every address of a dropped /8) send one event each.
/// Kept in the last slot of this CPU's `EVENT_CACHE` (`addr[0]`: start of
/// the current second, `addr[1]`: events sent in it), so the pinned layout
/// is unchanged.
#[inline(always)]
fn within_budget(now: u64) -> bool {
    let Some(b) = EVENT_CACHE.get_ptr_mut(EVENT_CACHE_SLOTS - 1) else {
        return true;
    };
    // SAFETY: this CPU's own slot; no other writer.
    let b = unsafe { &mut *b };
    if now.wrapping_sub(b.addr[0]) >= 1_000_000_000 {
        b.addr = [now, 0];
    }
    if b.addr[1] >= EVENTS_PER_CPU_PER_SEC {
        return false;
    }
    b.addr[1] += 1;
    true
}

/// Whether an event about this source may be sent now: at most one per
/// source per `EVENT_INTERVAL_NS`. The LRU map decides; the per-CPU cache in
/// front of it only ever holds the LRU's own last-event times, so it
/// suppresses nothing the LRU would let through, and turns a one-source
/// flood into one array load per packet.
#[inline(always)]
pub(crate) fn may_report(saddr: &[u8; 16]) -> bool {
    let now = now_ns();
    let w = [
        u64::from_ne_bytes([
            saddr[0], saddr[1], saddr[2], saddr[3], saddr[4], saddr[5], saddr[6], saddr[7],
        ]),
        u64::from_ne_bytes([
            saddr[8], saddr[9], saddr[10], saddr[11], saddr[12], saddr[13], saddr[14], saddr[15],
        ]),
    ];
    let h = (w[0] ^ w[1]) as u32 ^ ((w[0] ^ w[1]) >> 32) as u32;
    let idx = h.wrapping_mul(0x9E37_79B1) >> 22;
    // The last slot is this CPU's budget, not a cache entry.
    let cache = EVENT_CACHE.get_ptr_mut(idx % (EVENT_CACHE_SLOTS - 1));
    if let Some(c) = cache {
        // SAFETY: this CPU's own slot.
        let c = unsafe { &*c };
        if c.addr == w && now.wrapping_sub(c.last_ns) < EVENT_INTERVAL_NS {
            count(C_EVENTS_RATE_LIMITED);
            return false;
        }
    }
    // The per-source limit first, then the total budget; the source's time
    // is recorded only for an event actually sent, so a source the budget
    // turned away is not also silenced for the next second.
    let last = EVENT_LAST.get_ptr_mut(saddr);
    // SAFETY: a racing writer on another CPU can at worst let one extra
    // event through; the value is a plain u64.
    let last_event = last.map(|l| unsafe { *l });
    let allowed =
        last_event.is_none_or(|t| now.wrapping_sub(t) >= EVENT_INTERVAL_NS) && within_budget(now);
    if allowed {
        match last {
            // SAFETY: as above.
            Some(l) => unsafe { *l = now },
            None => {
                let _ = EVENT_LAST.insert(saddr, now, 0);
            }
        }
    }
    if let Some(c) = cache {
        // SAFETY: this CPU's own slot.
        unsafe {
            *c = EventCacheSlot {
                addr: w,
                last_ns: if allowed {
                    now
                } else {
                    last_event.unwrap_or(0)
                },
            }
        };
    }
    if !allowed {
        count(C_EVENTS_RATE_LIMITED);
    }
    allowed
}

#[inline(always)]
pub(crate) fn send_event(
    ctx: &XdpContext,
    saddr: [u8; 16],
    family: u8,
    verdict: u32,
    reason: u32,
    l4: Option<&L4>,
) {
    match EVENTS.reserve::<DropEvent>(0) {
        Some(mut entry) => {
            entry.write(DropEvent {
                ts_ns: now_ns(),
                saddr,
                // SAFETY: ctx points at a live xdp_md.
                ifindex: unsafe { (*ctx.ctx).ingress_ifindex },
                dport: l4.map_or(0, |l| l.dport),
                family,
                proto: l4.map_or(0, |l| l.proto),
                verdict,
                reason,
            });
            entry.submit(0);
            count(C_EVENTS_SENT);
        }
        None => count(C_EVENTS_LOST),
    }
}
