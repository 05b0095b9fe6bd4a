//! What the upstream is told. It trusts its edge, so it hears the truth and
//! nothing a client made up: the client's own forwarding headers are
//! removed and the edge sets the verified client, the protocol, and which
//! key and account called. Hop-by-hop headers and the credential never
//! leave the edge.

use std::net::IpAddr;

use hyper::{
    HeaderMap,
    header::{HeaderName, HeaderValue},
};

pub const API_KEY: HeaderName = HeaderName::from_static("api-key");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_KEY_ID: HeaderName = HeaderName::from_static("x-allowlist-key-id");
const X_ACCOUNT: HeaderName = HeaderName::from_static("x-allowlist-account");

/// Headers that stay on one hop, and the key; names made once, not parsed
/// per request.
const HOP_BY_HOP: [HeaderName; 8] = [
    hyper::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    hyper::header::TE,
    hyper::header::TRAILER,
    hyper::header::TRANSFER_ENCODING,
    hyper::header::UPGRADE,
    API_KEY,
];

/// Headers a client may send but only the edge may set.
const EDGE_SET: [HeaderName; 7] = [
    X_FORWARDED_FOR,
    hyper::header::FORWARDED,
    X_REAL_IP,
    X_FORWARDED_PROTO,
    HeaderName::from_static("x-forwarded-host"),
    X_KEY_ID,
    X_ACCOUNT,
];

/// Removes the hop-by-hop headers and the key. Most messages carry none of
/// them, and one pass over the few names present is cheaper than a hashed
/// lookup of each of the eight.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    if h.keys().any(|k| HOP_BY_HOP.contains(k)) {
        for name in &HOP_BY_HOP {
            h.remove(name);
        }
    }
    // `Connection` may name further hop-by-hop headers; they went with it
    // only if listed above, which is what upstream servers expect.
}

/// Who called, as the upstream is told.
pub struct Caller<'a> {
    pub client: IpAddr,
    /// Behind trusted proxies: the verified X-Forwarded-For chain (the
    /// client, then the trusted hops); else the client alone is sent.
    pub chain: Option<&'a str>,
    pub key_id: &'a str,
    pub account: &'a str,
}

/// Rewrites a request's headers for the upstream: the client's forwarding
/// and identity headers replaced by the edge's own.
pub fn upstream_headers(h: &mut HeaderMap, caller: &Caller<'_>, bearer: bool) {
    strip_hop_by_hop(h);
    if bearer {
        h.remove(hyper::header::AUTHORIZATION);
    }
    for name in &EDGE_SET {
        h.remove(name);
    }
    let client = HeaderValue::from_str(&caller.client.to_string())
        .expect("an IP address is a valid header value");
    let chain = caller
        .chain
        .and_then(|c| HeaderValue::from_str(c).ok())
        .unwrap_or_else(|| client.clone());
    h.insert(X_FORWARDED_FOR, chain);
    h.insert(X_REAL_IP, client);
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    if let Ok(v) = HeaderValue::from_str(caller.key_id) {
        h.insert(X_KEY_ID, v);
    }
    if let Ok(v) = HeaderValue::from_str(caller.account) {
        h.insert(X_ACCOUNT, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_key_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert("api-key", HeaderValue::from_static("alk_x"));
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-request-id", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-request-id"));
    }

    #[test]
    fn what_the_client_made_up_is_replaced() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-proto", "http"),
            ("x-allowlist-key-id", "other"),
            ("x-allowlist-account", "other"),
            ("authorization", "Bearer alk_x_y"),
            ("host", "api.example"),
        ] {
            h.append(n, HeaderValue::from_static(v));
        }
        h.append("x-forwarded-for", HeaderValue::from_static("7.7.7.7"));
        let caller = Caller {
            client: "203.0.113.7".parse().unwrap(),
            chain: None,
            key_id: "00aa",
            account: "default",
        };
        upstream_headers(&mut h, &caller, true);
        let get = |n: &str| {
            h.get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("x-forwarded-for"), ["203.0.113.7"]);
        assert_eq!(get("x-real-ip"), ["203.0.113.7"]);
        assert_eq!(get("x-forwarded-proto"), ["https"]);
        assert_eq!(get("x-allowlist-key-id"), ["00aa"]);
        assert_eq!(get("x-allowlist-account"), ["default"]);
        assert!(get("forwarded").is_empty() && get("authorization").is_empty());
        assert_eq!(get("host"), ["api.example"]);
    }
}
