//! Connection hooks on the daemon's own cgroup.
//!
//! `conn_ops` (sock_ops) asks for state callbacks on every accepted
//! connection and forgets its `CONNS` entry when it closes, so the map
//! never fills with dead sockets. `conn_ingress`/`conn_egress`
//! (cgroup_skb) check every packet of a paired connection against the
//! current policy, in this order:
//!
//! 1. the key's state (`KEY_STATE`) must be active;
//! 2. behind an L7 balancer (X-Forwarded-For) nothing else: the proxy
//!    checks each request's client;
//! 3. the key's allowlist (`KEY_ALLOW*`) must match the client;
//! 4. the account of the key (from `KEY_STATE`): the longest match in the
//!    account's trie (`ACCOUNT_ALLOW*`) decides — a denied entry refuses,
//!    an authorized one admits — and without a match the client is
//!    refused only while the account's API blocking is active
//!    (`ACCOUNT_MODE`).
//!
//! A connection the policy no longer admits gets no packet through, in
//! either direction, the moment the maps change; RSTs still leave so the
//! client learns at once. Fail-open for sockets that are not paired (TLS
//! handshakes, the admin socket, the upstream client).

use allowlist_common::{
    ACCOUNT_API_ACTIVE, ACCOUNT_DENIED, C_CONN_CUT_ACCOUNT, C_CONN_CUT_ALLOW, C_CONN_CUT_REVOKED,
    CLIENT_PROXY, CLIENT_XFF, ConnClient, ConnInfo, KEY_ACTIVE, KeyState,
};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    cty::c_void,
    helpers::bpf_get_socket_cookie,
    macros::{cgroup_skb, map, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, lpm_trie::Key},
    programs::{SkBuffContext, SockOpsContext},
};

use crate::{DEFAULT_GUARD, NO_PREALLOC, count};

/// Per-key allowlists: key id (big-endian) then the address, prefix length
/// 32 + the entry's; a key with an empty allowlist has one entry of length
/// 32 (every address).
#[map]
static KEY_ALLOW4: LpmTrie<[u8; 8], u8> = LpmTrie::pinned(DEFAULT_GUARD, NO_PREALLOC);
#[map]
static KEY_ALLOW6: LpmTrie<[u8; 20], u8> = LpmTrie::pinned(DEFAULT_GUARD, NO_PREALLOC);
/// Key id -> state and account.
#[map]
static KEY_STATE: HashMap<u32, KeyState> = HashMap::pinned(DEFAULT_GUARD, NO_PREALLOC);
/// Per-account address lists: account index (big-endian) then the
/// address, prefix length 32 + the entry's; value `ACCOUNT_ADMIT` or
/// `ACCOUNT_DENIED`.
#[map]
static ACCOUNT_ALLOW4: LpmTrie<[u8; 8], u8> = LpmTrie::pinned(DEFAULT_GUARD, NO_PREALLOC);
#[map]
static ACCOUNT_ALLOW6: LpmTrie<[u8; 20], u8> = LpmTrie::pinned(DEFAULT_GUARD, NO_PREALLOC);
/// Account index -> `ACCOUNT_*` bits; absent = no bit set.
#[map]
static ACCOUNT_MODE: HashMap<u32, u32> = HashMap::pinned(DEFAULT_GUARD, NO_PREALLOC);

/// Socket cookie of a proxy connection -> the key it presented. Written by
/// the proxy once it has read the key; removed when the socket closes.
#[map]
static CONNS: LruHashMap<u64, ConnInfo> = LruHashMap::pinned(1 << 18, 0);
/// Socket cookie -> the client a trusted balancer named for that proxy
/// connection (PROXY header, or X-Forwarded-For per request). Written by
/// the proxy before `CONNS`; absent, the TCP peer is the client.
#[map]
static CONN_CLIENT: LruHashMap<u64, ConnClient> = LruHashMap::pinned(1 << 18, 0);
/// Slot 0: bumped by the daemon after each change to the maps
/// `conn_verdict` reads (KEY_STATE, KEY_ALLOW*, ACCOUNT_ALLOW*,
/// ACCOUNT_MODE).
#[map]
static POLICY_GEN: Array<u32> = Array::pinned(1, 0);

#[sock_ops]
pub fn conn_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // SAFETY: ctx.ops is the live bpf_sock_ops.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
            let _ = CONNS.remove(cookie);
            let _ = CONN_CLIENT.remove(cookie);
        }
        _ => {}
    }
    1
}

#[cgroup_skb]
pub fn conn_ingress(ctx: SkBuffContext) -> i32 {
    conn_verdict(&ctx, false)
}

#[cgroup_skb]
pub fn conn_egress(ctx: SkBuffContext) -> i32 {
    conn_verdict(&ctx, true)
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// The client of a connection: whether it is IPv4, and its address
/// (IPv4 in the first four bytes, network order); `[0xff; 16]` when the
/// socket is of neither family.
#[inline(always)]
fn client(ctx: &SkBuffContext, named: Option<ConnClient>) -> (bool, [u8; 16]) {
    match named {
        // The one a PROXY header named, else the TCP peer.
        Some(c) if c.mode == CLIENT_PROXY => (c.family == 4, c.addr),
        _ => {
            let family = ctx.skb.family();
            let v6 = *ctx.skb.remote_ipv6();
            let mapped =
                family == AF_INET6 && v6[0] == 0 && v6[1] == 0 && v6[2] == u32::to_be(0xffff);
            if family == AF_INET || mapped {
                let b = if mapped { v6[3] } else { ctx.skb.remote_ipv4() }.to_ne_bytes();
                (
                    true,
                    [b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                )
            } else if family == AF_INET6 {
                let mut a = [0u8; 16];
                for (i, w) in v6.iter().enumerate() {
                    let b = w.to_ne_bytes();
                    a[i * 4..i * 4 + 4].copy_from_slice(&b);
                }
                (false, a)
            } else {
                (false, [0xff; 16])
            }
        }
    }
}

/// `key` (a key id or an account index, big-endian) then the address, at
/// full length: the lookup key of the per-key and per-account tries.
#[inline(always)]
fn trie_key4(id: u32, a: &[u8; 16]) -> Key<[u8; 8]> {
    let b = id.to_be_bytes();
    Key::new(64, [b[0], b[1], b[2], b[3], a[0], a[1], a[2], a[3]])
}

#[inline(always)]
fn trie_key6(id: u32, a: &[u8; 16]) -> Key<[u8; 20]> {
    let mut k = [0u8; 20];
    k[..4].copy_from_slice(&id.to_be_bytes());
    k[4..].copy_from_slice(a);
    Key::new(160, k)
}

/// Whether the account layer refuses the client: a denied entry refuses
/// whatever the mode; no entry refuses while API blocking is active.
#[inline(always)]
fn account_refuses(account: u32, v4: bool, a: &[u8; 16]) -> bool {
    let entry = if v4 {
        ACCOUNT_ALLOW4.get(trie_key4(account, a)).copied()
    } else {
        ACCOUNT_ALLOW6.get(trie_key6(account, a)).copied()
    };
    match entry {
        Some(v) => v == ACCOUNT_DENIED,
        // SAFETY: plain value read of a map entry.
        None => {
            unsafe { ACCOUNT_MODE.get(account) }.is_some_and(|bits| bits & ACCOUNT_API_ACTIVE != 0)
        }
    }
}

#[inline(always)]
fn conn_verdict(ctx: &SkBuffContext, egress: bool) -> i32 {
    // SAFETY: the skb pointer is the live __sk_buff.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
    let Some(info) = CONNS.get_ptr_mut(cookie) else {
        return 1;
    };
    // Read before the policy maps: a change that lands while this packet
    // is checked bumps the generation past `generation`, so the next packet
    // is checked again.
    let generation = POLICY_GEN.get(0).copied().unwrap_or(0);
    // SAFETY: a live map value; a racing writer can only store another
    // whole u32 into either field.
    let (kid, checked) = unsafe { ((*info).kid, (*info).checked_gen) };
    if generation != 0 && checked == generation {
        return 1;
    }
    // SAFETY: plain value reads of map entries.
    let named = unsafe { CONN_CLIENT.get(cookie) }.copied();
    let state = unsafe { KEY_STATE.get(kid) }.copied();
    let cut = match state {
        Some(st) if st.state == KEY_ACTIVE => {
            if named.is_some_and(|c| c.mode == CLIENT_XFF) {
                // Clients change per request behind an L7 balancer: the
                // proxy checks each; the kernel holds the key's state only.
                None
            } else {
                let (v4, a) = client(ctx, named);
                if !v4 && a == [0xff; 16] {
                    // Neither family: nothing to check an address against.
                    None
                } else if (v4 && KEY_ALLOW4.get(trie_key4(kid, &a)).is_none())
                    || (!v4 && KEY_ALLOW6.get(trie_key6(kid, &a)).is_none())
                {
                    Some(C_CONN_CUT_ALLOW)
                } else if account_refuses(st.account, v4, &a) {
                    Some(C_CONN_CUT_ACCOUNT)
                } else {
                    None
                }
            }
        }
        _ => Some(C_CONN_CUT_REVOKED),
    };
    match cut {
        None => {
            // SAFETY: as above.
            unsafe { (*info).checked_gen = generation };
            1
        }
        Some(counter) => {
            // Let our own RST out, so the client learns at once.
            if egress && is_rst(ctx) {
                return 1;
            }
            count(counter);
            0
        }
    }
}

/// Whether an egress packet (L3 first) is a TCP segment with RST set.
#[inline(always)]
fn is_rst(ctx: &SkBuffContext) -> bool {
    let Ok(first) = ctx.load::<u8>(0) else {
        return false;
    };
    let flags_at = match first >> 4 {
        4 => ((first & 0x0f) as usize) * 4 + 13,
        6 => 40 + 13,
        _ => return false,
    };
    ctx.load::<u8>(flags_at).is_ok_and(|f| f & 0x04 != 0)
}
