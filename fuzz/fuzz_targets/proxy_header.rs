//! PROXY protocol v1/v2 headers from a trusted peer: never a panic; a
//! parsed v1 header names exactly the source address written in it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(addr)) = allowlist::proxy::parse_proxy_header(data)
        && data.starts_with(b"PROXY ")
    {
        let text = String::from_utf8_lossy(data);
        let src = text.split(' ').nth(2).unwrap_or_default();
        assert_eq!(src.parse::<std::net::IpAddr>().ok(), Some(addr), "{text:?}");
    }
});
