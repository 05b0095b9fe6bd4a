//! SYNs dressed up to slip past the XDP guard: IPv4 first fragments too
//! short to hold the TCP flags (or even the ports), IPv6 SYNs behind
//! extension headers, chains too long to walk, ESP. Each is checked with
//! crafted frames through BPF_PROG_TEST_RUN on the real program, and the
//! fragmented and extension-header SYNs are also sent for real across the
//! veth with scapy (Debian's python3-scapy), asserting that no handshake
//! answer comes back — and that the same packets from inside the union are
//! answered, so the test could fail.

use std::net::IpAddr;

use allowlist::kernel::{AttachMode, Kernel, KernelOptions};
use allowlist_common::{PROTO_TCP, SERVICE_API, SERVICE_SMTP};
use allowlist_tests::{
    bpf::{self, XDP_DROP, XDP_PASS},
    kernel_tests_enabled,
    net::{Pair, SERVER_IF, SERVER_V4, SERVER_V6, Server},
    proc::Setup,
};

const API: u16 = 8443;
const SMTP: u16 = 2525;
const INSIDE4: &str = "198.51.100.20";
const OUTSIDE4: &str = "198.51.100.21";
const INSIDE6: &str = "2001:db8:1::20";
const OUTSIDE6: &str = "2001:db8:1::21";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An IPv4 frame whose IP payload is `l4` (cut to `keep` bytes), with the
/// fragment field `frag` (flags and offset, host order).
fn v4_fragment(src: &str, l4: &[u8], keep: usize, frag: u16) -> Vec<u8> {
    let mut f = bpf::l4_frame(ip(src), ip(SERVER_V4), 6, &l4[..keep]);
    f[14 + 6..14 + 8].copy_from_slice(&frag.to_be_bytes());
    f
}

/// An IPv6 frame: extension headers `chain` (each: its type and body,
/// padded to 8 bytes), then `proto` with payload `l4`.
fn v6_chain(src: &str, chain: &[u8], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (i, &kind) in chain.iter().enumerate() {
        let next = chain.get(i + 1).copied().unwrap_or(proto);
        match kind {
            // Fragment header, offset 0, more fragments.
            44 => payload.extend_from_slice(&[next, 0, 0, 1, 0, 0, 0, 7]),
            _ => payload.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
        }
    }
    payload.extend_from_slice(l4);
    let first = chain.first().copied().unwrap_or(proto);
    bpf::l4_frame(ip(src), ip(SERVER_V6), first, &payload)
}

#[test]
fn fragmented_and_extension_header_syns_do_not_pass_the_guard() {
    if !kernel_tests_enabled("fragmented_and_extension_header_syns_do_not_pass_the_guard") {
        return;
    }
    let pair = Pair::new();
    for a in [INSIDE4, OUTSIDE4, INSIDE6, OUTSIDE6] {
        pair.client_addr(a);
    }
    let _api = Server::start(&pair.server, API);
    let _smtp = Server::start(&pair.server, SMTP);
    let setup = Setup::new(true, "");
    let bpffs = setup.bpffs.clone();
    let union: Vec<ipnet::IpNet> = vec![
        format!("{INSIDE4}/32").parse().unwrap(),
        format!("{INSIDE6}/128").parse().unwrap(),
    ];
    let unions = [(SERVICE_API, union.clone()), (SERVICE_SMTP, union)];
    let ports = [
        (PROTO_TCP, API, SERVICE_API),
        (PROTO_TCP, SMTP, SERVICE_SMTP),
    ];
    let mut kernel = pair.server.run(move || {
        let mut k = Kernel::load(KernelOptions {
            bpffs,
            interfaces: vec![SERVER_IF.into()],
            mode: AttachMode::Generic,
            drop_capacity: 1024,
            guard_capacity: 1024,
            cgroup: None,
            batch_writes: true,
        })
        .expect("load");
        k.sync_guard(&unions, &ports).expect("guard");
        k
    });
    let prog = bpf::edge_filter(&setup.bpffs);
    let run = |frame: &[u8]| bpf::test_run(&prog, frame, 1).unwrap().0;
    let syn = |port: u16| bpf::tcp_syn(port);
    const MF: u16 = 0x2000;

    for port in [API, SMTP] {
        for (src, want) in [(OUTSIDE4, XDP_DROP), (INSIDE4, XDP_PASS)] {
            // The first 8 bytes of TCP (ports, sequence): no flags.
            assert_eq!(
                run(&v4_fragment(src, &syn(port), 8, MF)),
                want,
                "{src} tiny first fragment to {port}"
            );
            // Two bytes: not even the destination port.
            assert_eq!(
                run(&v4_fragment(src, &syn(port), 2, MF)),
                want,
                "{src} 2-byte first fragment"
            );
            // A complete SYN in a first fragment.
            assert_eq!(
                run(&v4_fragment(src, &syn(port), 20, MF)),
                want,
                "{src} whole SYN, MF"
            );
        }
        // A runt frame is padded to 60 bytes on the wire: the flags must
        // not be read from the padding past the IP packet's own length.
        for (src, want) in [(OUTSIDE4, XDP_DROP), (INSIDE4, XDP_PASS)] {
            let mut runt = v4_fragment(src, &syn(port), 8, MF);
            runt.resize(60, 0);
            assert_eq!(
                run(&runt),
                want,
                "{src} padded tiny first fragment to {port}"
            );
        }
        for (src, want) in [(OUTSIDE6, XDP_DROP), (INSIDE6, XDP_PASS)] {
            let mut runt = v6_chain(src, &[44], 6, &syn(port)[..2]);
            runt.resize(runt.len().max(60) + 8, 0);
            assert_eq!(
                run(&runt),
                want,
                "{src} padded IPv6 first fragment to {port}"
            );
        }
        // Later fragments carry no TCP header; without their first they
        // reassemble into nothing.
        assert_eq!(
            run(&v4_fragment(OUTSIDE4, &syn(port), 20, MF | 1)),
            XDP_PASS
        );
        for (src, want) in [(OUTSIDE6, XDP_DROP), (INSIDE6, XDP_PASS)] {
            for chain in [&[60][..], &[0, 43, 60], &[44], &[0, 44, 60], &[60; 8]] {
                assert_eq!(
                    run(&v6_chain(src, chain, 6, &syn(port))),
                    want,
                    "{src} SYN to {port} behind {chain:?}"
                );
            }
            // Too long a chain, ESP, a truncated TCP header: unclassifiable.
            assert_eq!(
                run(&v6_chain(src, &[60; 9], 6, &syn(port))),
                want,
                "{src} 9 headers"
            );
            assert_eq!(
                run(&bpf::l4_frame(ip(src), ip(SERVER_V6), 50, &[0; 16])),
                want,
                "{src} ESP"
            );
            assert_eq!(
                run(&v6_chain(src, &[60], 6, &syn(port)[..2])),
                want,
                "{src} truncated TCP"
            );
        }
    }
    // Unguarded ports, ACKs and neighbour discovery are untouched.
    assert_eq!(run(&v4_fragment(OUTSIDE4, &syn(8080), 8, MF)), XDP_PASS);
    assert_eq!(run(&v6_chain(OUTSIDE6, &[60], 6, &syn(8080))), XDP_PASS);
    let mut ack = syn(API);
    ack[13] = 0x10;
    assert_eq!(run(&v6_chain(OUTSIDE6, &[60], 6, &ack)), XDP_PASS);
    let mut ns = vec![135u8, 0, 0, 0];
    ns.extend_from_slice(&[0; 20]);
    assert_eq!(run(&v6_chain(OUTSIDE6, &[], 58, &ns)), XDP_PASS);
    assert!(kernel.stats().unwrap().guard_dropped_unclassified >= 2);

    // For real, across the veth: scapy sends each disguised SYN from outside
    // and from inside the union and counts the SYN-ACKs that come back.
    let script = format!(
        r#"
import time
from scapy.all import IP, IPv6, TCP, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, fragment, send, AsyncSniffer, conf
conf.verb = 0
def answers(pkts, src, port):
    sn = AsyncSniffer(iface="vc", filter="tcp and src port %d and tcp[tcpflags] & tcp-syn != 0" % port if ":" not in src else "ip6 and tcp", store=True)
    sn.start(); time.sleep(0.3)
    send(pkts, iface="vc")
    time.sleep(1.2); sn.stop()
    return sum(1 for p in sn.results if p.haslayer(TCP) and p[TCP].flags & 0x12 == 0x12 and p[TCP].sport == port)
out = []
for port in ({API}, {SMTP}):
    for src in ("{OUTSIDE4}", "{INSIDE4}"):
        syn = IP(src=src, dst="{SERVER_V4}") / TCP(sport=41000 + port % 1000, dport=port, flags="S")
        out.append(answers(fragment(syn, fragsize=8), src, port))
    for src in ("{OUTSIDE6}", "{INSIDE6}"):
        p = IPv6(src=src, dst="{SERVER_V6}") / IPv6ExtHdrDestOpt() / TCP(sport=42000 + port % 1000, dport=port, flags="S")
        out.append(answers(p, src, port))
print(" ".join(str(n) for n in out))
"#
    );
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &pair.client.name,
            "timeout",
            "60",
            "/usr/bin/python3",
            "-c",
            &script,
        ])
        .output()
        .expect("python3 with scapy");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let n: Vec<u32> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(
        n.len(),
        8,
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (i, what) in [
        "API v4 fragments",
        "API v6 dest-opts",
        "SMTP v4 fragments",
        "SMTP v6 dest-opts",
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(
            n[i * 2],
            0,
            "{what} from outside the union got a SYN-ACK: {text}"
        );
        assert!(
            n[i * 2 + 1] >= 1,
            "{what} from inside the union was not answered: {text}"
        );
    }

    // Disarmed, nothing is dropped for being unclassifiable.
    kernel.sync_guard(&[], &[]).unwrap();
    assert_eq!(run(&v4_fragment(OUTSIDE4, &syn(SMTP), 2, MF)), XDP_PASS);
    assert_eq!(run(&v6_chain(OUTSIDE6, &[60; 9], 6, &syn(SMTP))), XDP_PASS);
}
