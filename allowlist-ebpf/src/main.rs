//! `edge_filter`: the XDP program on the edge interfaces.
//!
//! Order of checks for every IPv4/IPv6 packet (one 802.1Q/802.1ad tag is
//! looked through; anything else passes untouched):
//!
//! 1. IPv6 neighbour discovery always passes (never break ND, like ARP).
//! 2. Drop list: the source's longest matching drop prefix, unless expired,
//!    drops the packet.
//! 3. Guard: a connection-opening packet (TCP SYN without ACK, or any UDP
//!    datagram) to a port in `GUARD_PORTS` from a source outside the guard
//!    union of that family is dropped.
//!
//! Every drop is counted per reason and reported to userspace through the
//! `EVENTS` ring buffer, at most once per source per second.
//!
//! IPv6 extension headers are walked (a bounded chain) to the L4 header.
//! A packet that may open a connection but cannot be classified — an IPv4
//! first fragment too short to hold the TCP flags or ports, an IPv6 chain
//! too long or truncated, ESP — is checked against the unions of every
//! armed service: from a source outside all of them it is dropped, never
//! passed, or a fragmented or disguised SYN would walk past the guard.
//! Non-first fragments carry no L4 header and pass: without their first
//! fragment they reassemble into nothing.
//!
//! Otherwise fail-open: a frame this program cannot parse at all (not IP,
//! a broken IP header), or a map lookup that cannot be made, passes. The
//! filter narrows what reaches the host; it must never cut the host off
//! because of a bug or a malformed frame.
//!
//! The connection hooks on the daemon's cgroup, which share this object
//! (and its `STATS`), live in `conn.rs`.
#![no_std]
#![no_main]

use core::mem::size_of;

use allowlist_common::{
    ALL_STATS_SLOTS, C_DROP_GUARD, C_DROP_GUARD_SMTP, C_DROP_LIST_BASE, C_DROP_UNCLASSIFIED,
    C_MALFORMED, C_PASS, GUARD_PORT_SLOTS, PROTO_TCP, PROTO_UDP, REASON_MAX, SERVICE_API,
    SERVICE_SMTP, VERDICT_DROP_GUARD, VERDICT_DROP_LIST, armed_services, guard_service,
};
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    cty::c_void,
    helpers::{bpf_ktime_get_coarse_ns, bpf_xdp_load_bytes},
    macros::{map, xdp},
    maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};

/// The connection hooks (`conn_ops`, `conn_ingress`, `conn_egress`) and
/// the maps only they read.
mod conn;
/// The drop list's maps and its longest-prefix match.
mod droplist;
/// Drop events to userspace, with their per-source and per-CPU limits.
mod events;

use droplist::{drop4, drop6};
use events::{may_report, send_event};

/// `BPF_F_NO_PREALLOC`: required for LPM tries, and keeps hash maps from
/// reserving their full capacity up front.
pub(crate) const NO_PREALLOC: u32 = 1;
/// `BPF_F_MMAPABLE`: the daemon writes the 16M-slot v4 table through mmap,
/// since expanding a short prefix touches up to 65536 slots.
pub(crate) const MMAPABLE: u32 = 1 << 10;

/// Default capacities; the daemon overrides them from its configuration.
pub(crate) const DEFAULT_RULES: u32 = 1 << 20;
pub(crate) const DEFAULT_LONG: u32 = 1 << 20;
const DEFAULT_GUARD: u32 = 1 << 18;

/// Layout version of the pinned maps (slot 0), written by the daemon.
#[map]
static LAYOUT: Array<u32> = Array::pinned(1, 0);

/// Guard unions, one per service: every source that some rule could allow
/// for that service. Key: the service (`SERVICE_*`, one byte) then the
/// address, prefix length 8 + the address prefix.
#[map]
static GUARD4: LpmTrie<[u8; 5], u8> = LpmTrie::pinned(DEFAULT_GUARD, NO_PREALLOC);
#[map]
static GUARD6: LpmTrie<[u8; 17], u8> = LpmTrie::pinned(DEFAULT_GUARD, NO_PREALLOC);

/// Port -> `SERVICE_*` per protocol (see `allowlist_common::guard_service`),
/// for services whose blocking is active.
#[map]
static GUARD_PORTS: Array<u32> = Array::pinned(GUARD_PORT_SLOTS, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(ALL_STATS_SLOTS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers the guard walks.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
const IPV6_MOBILITY: u8 = 135;
const IPV6_HIP: u8 = 139;
const IPV6_SHIM6: u8 = 140;
const IPV6_ESP: u8 = 50;
/// Longest extension-header chain walked; a longer one is unclassifiable.
const IPV6_MAX_EXT: usize = 8;

#[xdp]
pub fn edge_filter(ctx: XdpContext) -> u32 {
    match try_edge_filter(&ctx) {
        Ok(action) => action,
        Err(()) => {
            count(C_MALFORMED);
            XDP_PASS
        }
    }
}

/// Pointer to a `T` at `offset` into the packet, if the packet is long enough.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, ()> {
    // SAFETY: ptr_at checked that the whole T lies inside the packet; packet
    // data has no alignment guarantee, hence read_unaligned.
    Ok(unsafe { ptr_at::<T>(ctx, offset)?.read_unaligned() })
}

/// A `T` at a variable `offset` (past IPv6 extension headers) through the
/// `bpf_xdp_load_bytes` helper: the verifier cannot follow a direct packet
/// access at an offset that grows in a loop.
#[inline(always)]
fn load<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, ()> {
    let mut v = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: the helper writes exactly size_of::<T>() bytes into `v` or
    // fails; on failure `v` is never read.
    let r = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            offset as u32,
            v.as_mut_ptr() as *mut c_void,
            size_of::<T>() as u32,
        )
    };
    if r != 0 {
        return Err(());
    }
    // SAFETY: fully written by the helper.
    Ok(unsafe { v.assume_init() })
}

/// `read` at an offset the verifier can follow, `load` otherwise.
#[inline(always)]
fn rd<T: Copy>(ctx: &XdpContext, offset: usize, variable: bool) -> Result<T, ()> {
    if variable {
        load(ctx, offset)
    } else {
        read(ctx, offset)
    }
}

#[inline(always)]
pub(crate) fn count(slot: u32) {
    if let Some(c) = STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// What the L4 header says, when there is one we can read.
pub(crate) struct L4 {
    proto: u8,
    dport: u16,
    /// TCP SYN without ACK, or any UDP datagram.
    opens: bool,
}

/// The L4 header at `off`, read no further than `end` — the end of the IP
/// payload by its own length field, not the end of the frame: a runt frame
/// is padded to 60 bytes, and a TCP header cut short by a tiny first
/// fragment must not have its flags read from that padding.
#[inline(always)]
fn parse_l4(
    ctx: &XdpContext,
    proto: u8,
    off: usize,
    end: usize,
    var: bool,
) -> Result<Option<L4>, ()> {
    match proto {
        PROTO_TCP => {
            if off + 14 > end {
                return Err(());
            }
            let dport = u16::from_be(rd::<u16>(ctx, off + 2, var)?);
            let flags: u8 = rd(ctx, off + 13, var)?;
            Ok(Some(L4 {
                proto,
                dport,
                opens: flags & 0x02 != 0 && flags & 0x10 == 0,
            }))
        }
        PROTO_UDP => {
            if off + 4 > end {
                return Err(());
            }
            let dport = u16::from_be(rd::<u16>(ctx, off + 2, var)?);
            Ok(Some(L4 {
                proto,
                dport,
                opens: true,
            }))
        }
        _ => Ok(None),
    }
}

/// What the guard does with a TCP or UDP packet whose header is not all
/// there (`Err` from `parse_l4`): with a readable destination port it is
/// judged as an opening packet to that port; without one, against every
/// armed service's union.
#[inline(always)]
fn truncated_l4(
    ctx: &XdpContext,
    saddr: [u8; 16],
    family: u8,
    proto: u8,
    off: usize,
    end: usize,
    var: bool,
) -> u32 {
    if off + 4 <= end
        && let Ok(dport) = rd::<u16>(ctx, off + 2, var)
    {
        let l4 = L4 {
            proto,
            dport: u16::from_be(dport),
            opens: true,
        };
        return match guarded(&l4) {
            Some(service) if !in_guard(service, family, &saddr) => {
                drop_guard(ctx, saddr, family, service, &l4)
            }
            _ => pass(),
        };
    }
    unclassified(ctx, saddr, family)
}

/// A packet that might open a connection but cannot be classified: passes
/// only from a source inside some armed service's union.
#[inline(always)]
fn unclassified(ctx: &XdpContext, saddr: [u8; 16], family: u8) -> u32 {
    let armed = GUARD_PORTS.get(0).map_or(0, |v| armed_services(*v));
    if armed == 0 {
        return pass();
    }
    let mut reported = SERVICE_API;
    for service in [SERVICE_API, SERVICE_SMTP] {
        if armed & (1 << service) != 0 {
            if in_guard(service, family, &saddr) {
                return pass();
            }
            reported = service;
        }
    }
    count(C_DROP_UNCLASSIFIED);
    if may_report(&saddr) {
        send_event(ctx, saddr, family, VERDICT_DROP_GUARD, reported, None);
    }
    XDP_DROP
}

#[inline(always)]
fn in_guard(service: u32, family: u8, saddr: &[u8; 16]) -> bool {
    if family == 4 {
        in_guard4(
            service,
            u32::from_ne_bytes([saddr[12], saddr[13], saddr[14], saddr[15]]),
        )
    } else {
        in_guard6(service, saddr)
    }
}

fn try_edge_filter(ctx: &XdpContext) -> Result<u32, ()> {
    let mut proto: u16 = u16::from_be(read::<u16>(ctx, 12)?);
    let mut off = ETH_HLEN;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = u16::from_be(read::<u16>(ctx, off + 2)?);
        off += 4;
    }
    match proto {
        ETH_P_IP => ipv4(ctx, off),
        ETH_P_IPV6 => ipv6(ctx, off),
        _ => Ok(pass()),
    }
}

#[inline(always)]
fn pass() -> u32 {
    count(C_PASS);
    XDP_PASS
}

fn ipv4(ctx: &XdpContext, off: usize) -> Result<u32, ()> {
    let vihl: u8 = read(ctx, off)?;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(());
    }
    let tot_len = u16::from_be(read::<u16>(ctx, off + 2)?) as usize;
    if tot_len < ihl {
        return Err(());
    }
    let ip_end = off + tot_len;
    let frag = u16::from_be(read::<u16>(ctx, off + 6)?);
    let l4proto: u8 = read(ctx, off + 9)?;
    let saddr_be: u32 = read(ctx, off + 12)?;
    let saddr = u32::from_be(saddr_be);

    if let Some(reason) = drop4(saddr) {
        // Only a first fragment carries the L4 header the event reports.
        let l4_at = (frag & 0x1fff == 0).then_some((l4proto, off + ihl, ip_end, false));
        return Ok(drop_list(ctx, mapped4(saddr_be), 4, reason, l4_at));
    }
    // Only a first fragment carries the L4 header.
    if frag & 0x1fff != 0 {
        return Ok(pass());
    }
    let l4 = match parse_l4(ctx, l4proto, off + ihl, ip_end, false) {
        Ok(Some(l4)) => l4,
        Ok(None) => return Ok(pass()),
        // A TCP/UDP header cut short: a tiny first fragment, say.
        Err(()) => {
            return Ok(truncated_l4(
                ctx,
                mapped4(saddr_be),
                4,
                l4proto,
                off + ihl,
                ip_end,
                false,
            ));
        }
    };
    if l4.opens
        && let Some(service) = guarded(&l4)
        && !in_guard4(service, saddr_be)
    {
        return Ok(drop_guard(ctx, mapped4(saddr_be), 4, service, &l4));
    }
    Ok(pass())
}

/// Where an IPv6 packet's upper-layer header is, once the extension
/// headers are walked. A plain struct with every field always set, not an
/// enum: the verifier refuses to see the undefined payload of an enum
/// variant copied around.
#[derive(Clone, Copy)]
struct Upper {
    kind: u8,
    /// Protocol and offset of the header after the chain (`UPPER_AT`), and
    /// whether that offset is variable (headers were walked: read with
    /// `load`).
    proto: u8,
    off: usize,
    var: bool,
}

const UPPER_AT: u8 = 0;
/// A fragment other than the first: no upper-layer header.
const UPPER_LATER_FRAGMENT: u8 = 1;
/// A chain too long, cut short, or one that cannot be walked (ESP).
const UPPER_UNWALKABLE: u8 = 2;

impl Upper {
    #[inline(always)]
    fn at(proto: u8, off: usize, var: bool) -> Upper {
        Upper {
            kind: UPPER_AT,
            proto,
            off,
            var,
        }
    }

    #[inline(always)]
    fn not(kind: u8) -> Upper {
        Upper {
            kind,
            proto: 0,
            off: 0,
            var: false,
        }
    }
}

#[inline(always)]
fn ext_header(next: u8) -> bool {
    matches!(
        next,
        IPV6_HOP_BY_HOP
            | IPV6_ROUTING
            | IPV6_FRAGMENT
            | IPV6_AH
            | IPV6_DEST_OPTS
            | IPV6_MOBILITY
            | IPV6_HIP
            | IPV6_SHIM6
            | IPV6_ESP
    )
}

#[inline(always)]
fn walk_ipv6(ctx: &XdpContext, first: u8, start: usize) -> Upper {
    // Nearly every packet has no extension header: its L4 header is at a
    // fixed offset, read directly.
    if !ext_header(first) {
        return Upper::at(first, start, false);
    }
    let mut next = first;
    let mut off = start;
    for _ in 0..IPV6_MAX_EXT {
        let len = match next {
            IPV6_FRAGMENT => match (load::<u8>(ctx, off), load::<u16>(ctx, off + 2)) {
                (Ok(nh), Ok(fo)) => {
                    if u16::from_be(fo) & 0xfff8 != 0 {
                        return Upper::not(UPPER_LATER_FRAGMENT);
                    }
                    next = nh;
                    8
                }
                _ => return Upper::not(UPPER_UNWALKABLE),
            },
            // ESP hides what it carries.
            IPV6_ESP => return Upper::not(UPPER_UNWALKABLE),
            kind if ext_header(kind) => match load::<[u8; 2]>(ctx, off) {
                Ok([nh, len]) => {
                    next = nh;
                    if kind == IPV6_AH {
                        (len as usize + 2) * 4
                    } else {
                        (len as usize + 1) * 8
                    }
                }
                Err(()) => return Upper::not(UPPER_UNWALKABLE),
            },
            proto => return Upper::at(proto, off, true),
        };
        off += len;
    }
    if ext_header(next) {
        Upper::not(UPPER_UNWALKABLE)
    } else {
        Upper::at(next, off, true)
    }
}

fn ipv6(ctx: &XdpContext, off: usize) -> Result<u32, ()> {
    let payload = u16::from_be(read::<u16>(ctx, off + 4)?) as usize;
    // 0 is a jumbogram (its length is in a hop-by-hop option): bounded by
    // the frame alone.
    let ip_end = if payload == 0 {
        usize::MAX
    } else {
        off + 40 + payload
    };
    let first: u8 = read(ctx, off + 6)?;
    let saddr: [u8; 16] = read(ctx, off + 8)?;
    let upper = walk_ipv6(ctx, first, off + 40);
    if upper.kind == UPPER_AT && upper.proto == IPPROTO_ICMPV6 {
        let icmp_type: u8 = rd(ctx, upper.off, upper.var)?;
        // Router/neighbour solicitation and advertisement, redirect.
        if (133..=137).contains(&icmp_type) {
            return Ok(pass());
        }
    }
    let hi = u64::from_be_bytes([
        saddr[0], saddr[1], saddr[2], saddr[3], saddr[4], saddr[5], saddr[6], saddr[7],
    ]);
    let lo = u64::from_be_bytes([
        saddr[8], saddr[9], saddr[10], saddr[11], saddr[12], saddr[13], saddr[14], saddr[15],
    ]);
    if let Some(reason) = drop6(hi, lo) {
        let l4_at = (upper.kind == UPPER_AT).then_some((upper.proto, upper.off, ip_end, upper.var));
        return Ok(drop_list(ctx, saddr, 6, reason, l4_at));
    }
    match upper.kind {
        UPPER_AT => {}
        UPPER_LATER_FRAGMENT => return Ok(pass()),
        _ => return Ok(unclassified(ctx, saddr, 6)),
    }
    let (proto, at, var) = (upper.proto, upper.off, upper.var);
    let l4 = match parse_l4(ctx, proto, at, ip_end, var) {
        Ok(Some(l4)) => l4,
        Ok(None) => return Ok(pass()),
        Err(()) => return Ok(truncated_l4(ctx, saddr, 6, proto, at, ip_end, var)),
    };
    if l4.opens
        && let Some(service) = guarded(&l4)
        && !in_guard6(service, &saddr)
    {
        return Ok(drop_guard(ctx, saddr, 6, service, &l4));
    }
    Ok(pass())
}

#[inline(always)]
fn in_guard4(service: u32, saddr_be: u32) -> bool {
    let a = saddr_be.to_ne_bytes();
    GUARD4
        .get(Key::new(40, [service as u8, a[0], a[1], a[2], a[3]]))
        .is_some()
}

#[inline(always)]
fn in_guard6(service: u32, a: &[u8; 16]) -> bool {
    let k = [
        service as u8,
        a[0],
        a[1],
        a[2],
        a[3],
        a[4],
        a[5],
        a[6],
        a[7],
        a[8],
        a[9],
        a[10],
        a[11],
        a[12],
        a[13],
        a[14],
        a[15],
    ];
    GUARD6.get(Key::new(136, k)).is_some()
}

#[inline(always)]
fn guarded(l4: &L4) -> Option<u32> {
    // Slot 0 holds the armed-services mask, not a port's service.
    if l4.dport == 0 {
        return None;
    }
    let value = *GUARD_PORTS.get(u32::from(l4.dport))?;
    match guard_service(value, l4.proto) {
        0 => None,
        service => Some(service),
    }
}

#[inline(always)]
fn mapped4(saddr_be: u32) -> [u8; 16] {
    let b = saddr_be.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

/// `l4_at`: protocol and offset of the L4 header, parsed only if an event
/// is actually sent (the rate limiter suppresses nearly all in a flood).
#[inline(always)]
fn drop_list(
    ctx: &XdpContext,
    saddr: [u8; 16],
    family: u8,
    reason: u32,
    l4_at: Option<(u8, usize, usize, bool)>,
) -> u32 {
    count(C_DROP_LIST_BASE + reason.min(REASON_MAX));
    if may_report(&saddr) {
        let l4 = l4_at
            .and_then(|(proto, off, end, var)| parse_l4(ctx, proto, off, end, var).ok().flatten());
        send_event(ctx, saddr, family, VERDICT_DROP_LIST, reason, l4.as_ref());
    }
    XDP_DROP
}

#[inline(always)]
fn drop_guard(ctx: &XdpContext, saddr: [u8; 16], family: u8, service: u32, l4: &L4) -> u32 {
    count(if service == SERVICE_SMTP {
        C_DROP_GUARD_SMTP
    } else {
        C_DROP_GUARD
    });
    if may_report(&saddr) {
        send_event(ctx, saddr, family, VERDICT_DROP_GUARD, service, Some(l4));
    }
    XDP_DROP
}

/// Coarse monotonic time (CLOCK_MONOTONIC_COARSE, a few ms behind
/// CLOCK_MONOTONIC): cheaper, and ample for one-second limits and expiries.
#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
