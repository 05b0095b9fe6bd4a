//! X-Forwarded-For walked from the right: never a panic, and the client it
//! names is never a trusted proxy unless every hop is one.
#![no_main]
use hyper::{HeaderMap, header::HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let trusted = allowlist::policy::PrefixSet::new([
        "198.51.100.70/32".parse().unwrap(),
        "10.0.0.0/8".parse().unwrap(),
        "2001:db8:70::/48".parse().unwrap(),
    ]);
    let mut h = HeaderMap::new();
    // Several headers: split the input at NUL bytes.
    for part in data.split(|b| *b == 0).take(8) {
        if let Ok(v) = HeaderValue::from_bytes(part) {
            h.append("x-forwarded-for", v);
        }
    }
    if let Ok(client) = allowlist::proxy::forwarded_for(&h, &trusted) {
        let all_trusted = h.get_all("x-forwarded-for").iter().all(|v| {
            v.to_str().is_ok_and(|t| {
                t.split(',').filter(|x| !x.trim().is_empty()).all(|hop| {
                    allowlist::proxy::parse_hop(hop)
                        .is_some_and(|a| trusted.longest_match(allowlist::policy::normalize(a)).is_some())
                })
            })
        });
        assert!(trusted.longest_match(client).is_none() || all_trusted);
    }
});
