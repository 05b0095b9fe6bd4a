//! Who the client is: the TCP peer, or — from a trusted proxy only — the
//! address a PROXY protocol header or `X-Forwarded-For` names.
//!
//! `X-Forwarded-For` is walked from the right: each hop right of the
//! client was appended by a proxy we trust, so the first hop that is not a
//! trusted proxy is the client, and everything left of it is whatever the
//! client chose to send — never parsed, never trusted. A hop that must be
//! read and cannot be is an error, not a fallback to the proxy's own
//! address (which in learning mode would authorize the balancer's /24 for
//! everyone behind it).

use std::{io, net::IpAddr, time::Duration};

use hyper::HeaderMap;
use tokio::{io::AsyncReadExt, net::TcpStream};

use crate::policy::{PrefixSet, normalize};

/// Why a request from a trusted proxy has no usable client address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwardedError {
    /// No PROXY header and no X-Forwarded-For.
    Missing,
    /// The hop that names the client cannot be parsed.
    BadHop(String),
    /// The PROXY header named no client (v1 `UNKNOWN`, v2 `LOCAL`).
    ProxyNoClient,
}

impl ForwardedError {
    pub fn message(&self) -> String {
        match self {
            ForwardedError::Missing => "The request came through a trusted proxy that named no \
                                        client address (no PROXY header, no X-Forwarded-For)"
                .to_string(),
            ForwardedError::ProxyNoClient => "The request came through a trusted proxy whose \
                                              PROXY header named no client address"
                .to_string(),
            ForwardedError::BadHop(hop) => {
                let shown: String = hop.chars().take(64).collect();
                format!(
                    "X-Forwarded-For hop {shown:?} is not an IP address (or IPv4:port, [IPv6]:port)"
                )
            }
        }
    }
}

/// One X-Forwarded-For element: an address, optionally with a port, IPv6
/// optionally in brackets — the forms balancers send.
pub fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(a) = hop.parse::<IpAddr>() {
        return Some(a);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        let (addr, tail) = rest.split_once(']')?;
        let ok_tail = tail.is_empty()
            || tail
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok());
        return ok_tail
            .then(|| addr.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6))
            .flatten();
    }
    let (addr, port) = hop.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The client named by X-Forwarded-For (every header of that name, in
/// order, elements separated by commas): the rightmost hop that is not a
/// trusted proxy; when every hop is a trusted proxy, the leftmost.
pub fn forwarded_for(h: &HeaderMap, trusted: &PrefixSet) -> Result<IpAddr, ForwardedError> {
    forwarded_chain(h, trusted).map(|(client, _)| client)
}

/// The client, and the verified chain for the upstream: the client and
/// the trusted hops right of it, left to right (`203.0.113.7, 10.1.2.3`).
/// What is left of the client is never parsed and never passed on.
pub fn forwarded_chain(
    h: &HeaderMap,
    trusted: &PrefixSet,
) -> Result<(IpAddr, String), ForwardedError> {
    let mut values = h.get_all("x-forwarded-for").iter().rev().peekable();
    if values.peek().is_none() {
        return Err(ForwardedError::Missing);
    }
    // The trusted hops walked, right to left.
    let mut walked: Vec<IpAddr> = Vec::new();
    let chain = |client: IpAddr, walked: &[IpAddr]| {
        std::iter::once(client)
            .chain(walked.iter().rev().copied())
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for v in values {
        // A header that is not visible ASCII cannot name an address; what
        // it says matters only if we get this far left.
        let text = v
            .to_str()
            .map_err(|_| ForwardedError::BadHop(String::from_utf8_lossy(v.as_bytes()).into()))?;
        for hop in text.rsplit(',') {
            if hop.trim().is_empty() {
                continue;
            }
            let addr = normalize(parse_hop(hop).ok_or_else(|| ForwardedError::BadHop(hop.into()))?);
            if trusted.longest_match(addr).is_none() {
                return Ok((addr, chain(addr, &walked)));
            }
            walked.push(addr);
        }
    }
    // Every hop a trusted proxy: the leftmost is the client.
    let client = walked.pop().ok_or(ForwardedError::Missing)?;
    Ok((client, chain(client, &walked)))
}

/// What a trusted peer's connection starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// No PROXY header: the stream starts with TLS (clients come per
    /// request in X-Forwarded-For).
    Absent,
    /// The client the header names.
    Client(IpAddr),
    /// A header that names no client (v1 `UNKNOWN`, v2 `LOCAL`, a unix or
    /// unspecified address family). Behind an L4 balancer the HTTP headers
    /// are the client's own, so X-Forwarded-For must not stand in for it.
    NoClient,
}

/// Reads a PROXY protocol v1 or v2 header from a trusted peer, consuming
/// exactly its bytes.
pub async fn read_proxy_header(stream: &mut TcpStream) -> io::Result<ProxyHeader> {
    const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut buf = [0u8; 536];
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let n = loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // A TLS record starts with 0x16: no PROXY header.
        if buf[0] == 0x16 {
            return Ok(ProxyHeader::Absent);
        }
        let need = if buf[..n].starts_with(b"PROXY ") {
            buf[..n]
                .windows(2)
                .position(|w| w == b"\r\n")
                .map(|p| p + 2)
        } else if n >= 16 && buf[..12] == *V2_SIG {
            Some(16 + u16::from_be_bytes([buf[14], buf[15]]) as usize)
        } else if (12..16).contains(&n) && buf[..12] == *V2_SIG {
            // The signature, but not yet the length: wait for it.
            None
        } else if n >= 12
            || !(V2_SIG.starts_with(&buf[..n]) || b"PROXY ".starts_with(&buf[..n.min(6)]))
        {
            return Err(bad("neither TLS nor a PROXY protocol header"));
        } else {
            None
        };
        match need {
            Some(need) if need <= n => break need,
            Some(need) if need > buf.len() => return Err(bad("PROXY header too long")),
            _ if n == buf.len() => return Err(bad("PROXY header too long")),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let mut header = vec![0u8; n];
    stream.read_exact(&mut header).await?;
    Ok(match parse_proxy_header(&header).map_err(|e| bad(&e))? {
        Some(a) => ProxyHeader::Client(a),
        None => ProxyHeader::NoClient,
    })
}

/// Parses one complete PROXY v1 or v2 header.
pub fn parse_proxy_header(header: &[u8]) -> Result<Option<IpAddr>, String> {
    if header.starts_with(b"PROXY ") {
        // The v1 header is US-ASCII. (Found by fuzzing: ppp 2.3 slices a
        // v1 header by byte offsets and panics inside a multi-byte UTF-8
        // character, so non-ASCII must never reach it.)
        if !header.is_ascii() {
            return Err("PROXY v1 header is not ASCII".into());
        }
        let text = std::str::from_utf8(header).map_err(|_| "PROXY v1 header is not text")?;
        Ok(
            match ppp::v1::Header::try_from(text)
                .map_err(|e| format!("PROXY v1: {e}"))?
                .addresses
            {
                ppp::v1::Addresses::Tcp4(a) => Some(IpAddr::V4(a.source_address)),
                ppp::v1::Addresses::Tcp6(a) => Some(IpAddr::V6(a.source_address)),
                ppp::v1::Addresses::Unknown => None,
            },
        )
    } else {
        let h = ppp::v2::Header::try_from(header).map_err(|e| format!("PROXY v2: {e}"))?;
        if h.command == ppp::v2::Command::Local {
            return Ok(None);
        }
        Ok(match h.addresses {
            ppp::v2::Addresses::IPv4(a) => Some(IpAddr::V4(a.source_address)),
            ppp::v2::Addresses::IPv6(a) => Some(IpAddr::V6(a.source_address)),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn trusted() -> PrefixSet {
        PrefixSet::new([
            "198.51.100.70/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ])
    }

    fn xff(values: &[&str]) -> Result<IpAddr, ForwardedError> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        forwarded_for(&h, &trusted())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        assert_eq!(xff(&["203.0.113.7"]), Ok(ip("203.0.113.7")));
        assert_eq!(
            xff(&["192.0.2.1, 203.0.113.7, 10.1.2.3"]),
            Ok(ip("203.0.113.7"))
        );
        // Several headers are one list, in order.
        assert_eq!(
            xff(&["192.0.2.1", "203.0.113.7 , 10.1.2.3"]),
            Ok(ip("203.0.113.7"))
        );
        // Every hop trusted: the leftmost.
        assert_eq!(xff(&["10.9.9.9, 10.1.2.3"]), Ok(ip("10.9.9.9")));
        // The forms real balancers send.
        assert_eq!(xff(&["203.0.113.7:5000"]), Ok(ip("203.0.113.7")));
        assert_eq!(xff(&["[2001:db8::1]:443"]), Ok(ip("2001:db8::1")));
        assert_eq!(xff(&["[2001:db8::1]"]), Ok(ip("2001:db8::1")));
        assert_eq!(xff(&["2001:db8::1"]), Ok(ip("2001:db8::1")));
        assert_eq!(xff(&["::ffff:203.0.113.7"]), Ok(ip("203.0.113.7")));
        assert_eq!(xff(&["  203.0.113.7  ,,"]), Ok(ip("203.0.113.7")));
    }

    #[test]
    fn the_verified_chain_is_the_client_and_the_trusted_hops_right_of_it() {
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.7"),
        );
        h.append("x-forwarded-for", HeaderValue::from_static(" 10.1.2.3"));
        let (client, chain) = forwarded_chain(&h, &trusted()).unwrap();
        assert_eq!(client, ip("203.0.113.7"));
        assert_eq!(chain, "203.0.113.7, 10.1.2.3");
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("10.9.9.9, 10.1.2.3"),
        );
        assert_eq!(
            forwarded_chain(&h, &trusted()).unwrap().1,
            "10.9.9.9, 10.1.2.3"
        );
    }

    #[test]
    fn what_is_left_of_the_client_is_never_parsed() {
        assert_eq!(xff(&["garbage, 203.0.113.7"]), Ok(ip("203.0.113.7")));
        assert_eq!(xff(&["x", "203.0.113.7"]), Ok(ip("203.0.113.7")));
    }

    #[test]
    fn a_needed_hop_that_cannot_be_read_is_an_error_never_the_proxy() {
        assert_eq!(xff(&["x"]), Err(ForwardedError::BadHop("x".into())));
        assert!(matches!(
            xff(&["203.0.113.7, unknown"]),
            Err(ForwardedError::BadHop(_))
        ));
        assert!(matches!(
            xff(&["203.0.113.7:99999"]),
            Err(ForwardedError::BadHop(_))
        ));
        assert!(matches!(
            xff(&["[2001:db8::1"]),
            Err(ForwardedError::BadHop(_))
        ));
        assert!(matches!(
            xff(&["2001:db8::1:443x"]),
            Err(ForwardedError::BadHop(_))
        ));
        assert_eq!(xff(&[]), Err(ForwardedError::Missing));
        assert_eq!(xff(&[" , "]), Err(ForwardedError::Missing));
    }

    #[test]
    fn proxy_v2_local_and_v1_unknown_name_no_client() {
        assert_eq!(parse_proxy_header(b"PROXY UNKNOWN\r\n").unwrap(), None);
        assert_eq!(
            parse_proxy_header(b"PROXY TCP4 203.0.113.7 192.0.2.2 5000 8443\r\n").unwrap(),
            Some(ip("203.0.113.7"))
        );
        let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(parse_proxy_header(&local).unwrap(), None);
        assert!(parse_proxy_header(b"PROXY TCP4 x y 1 2\r\n").is_err());
        // Found by fuzzing: non-ASCII made the PROXY parser panic.
        assert!(
            parse_proxy_header("PROXY TCP6 P\u{18}Y TCP6 P\u{18}]ధTCP\r\n".as_bytes()).is_err()
        );
    }
}
