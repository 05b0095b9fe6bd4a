//! The credential headers (`api-key`, `Authorization: Bearer`) and the key
//! format: never a panic; what is parsed is a substring of what was sent.
#![no_main]
use hyper::{HeaderMap, header::HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (a, b) = data.split_at(data.len() / 2);
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(a) {
        h.insert("authorization", v);
    }
    if data.first().is_some_and(|x| x & 1 == 1)
        && let Ok(v) = HeaderValue::from_bytes(b)
    {
        h.insert("api-key", v);
    }
    if let Some((cred, _)) = allowlist::proxy::credential(&h)
        && let Some((id, secret)) = allowlist::policy::parse_credential(cred)
    {
        assert!(!id.is_empty() && !secret.is_empty() && cred.contains(id));
    }
});
