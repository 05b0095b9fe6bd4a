//! Baselines for the kernel benchmark, measured beside `edge_filter` with
//! BPF_PROG_TEST_RUN in the same run: a bare program, and the plain kernel
//! LPM trie doing the drop-list lookup. Never loaded by the daemon.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::{map, xdp},
    maps::{LpmTrie, lpm_trie::Key},
    programs::XdpContext,
};

#[map]
static BENCH_LPM4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(1 << 21, 1);
#[map]
static BENCH_LPM6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(1 << 21, 1);

#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// Baseline of the flood benchmark: the cheapest possible XDP drop.
#[xdp]
pub fn bench_drop(_ctx: XdpContext) -> u32 {
    XDP_DROP
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked above; packet data is unaligned.
    Some(unsafe { ((start + offset) as *const T).read_unaligned() })
}

/// Parses Ethernet + IPv4/IPv6 like `edge_filter` and drops when the source
/// is in the LPM trie of its family.
#[xdp]
pub fn bench_lpm(ctx: XdpContext) -> u32 {
    let Some(proto) = read::<u16>(&ctx, 12) else {
        return XDP_PASS;
    };
    match u16::from_be(proto) {
        0x0800 => match read::<[u8; 4]>(&ctx, 14 + 12) {
            Some(src) if BENCH_LPM4.get(Key::new(32, src)).is_some() => XDP_DROP,
            _ => XDP_PASS,
        },
        0x86DD => match read::<[u8; 16]>(&ctx, 14 + 8) {
            Some(src) if BENCH_LPM6.get(Key::new(128, src)).is_some() => XDP_DROP,
            _ => XDP_PASS,
        },
        _ => XDP_PASS,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
