//! Allowlist entries (key allowlists, the account list): never a panic; an
//! accepted entry has no host bits, is not wider than the minimum, and
//! parses back to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &str| {
    if let Ok(net) = allowlist::policy::parse_allow_entry(data) {
        assert_eq!(net.trunc(), net);
        match net {
            ipnet::IpNet::V4(n) => assert!(n.prefix_len() >= allowlist::policy::MIN_V4_PREFIX),
            ipnet::IpNet::V6(n) => assert!(n.prefix_len() >= allowlist::policy::MIN_V6_PREFIX),
        }
        assert_eq!(allowlist::policy::parse_allow_entry(&net.to_string()), Ok(net));
    }
});
