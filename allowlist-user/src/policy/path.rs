//! Request paths as the scope check sees them and the upstream receives
//! them. Scopes are decided on path prefixes, so the path checked must be
//! the path the upstream will act on: `POST /emails/../admin` is an `/admin`
//! request, whatever prefix it starts with.
//!
//! RFC 3986 normalization: percent-encoded unreserved characters decoded
//! (so `%2e%2e` is `..`), other escapes kept with upper-case hex, dot
//! segments removed, repeated slashes merged. What different upstreams
//! would read differently is refused rather than guessed at: an encoded
//! `/` or `\` (one server splits there, another does not), a literal `\`
//! (some treat it as `/`), an encoded NUL or control byte, a broken escape,
//! and a dot segment that climbs above the root.

/// Why a path cannot be normalized safely (answered with `400`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// Not starting with `/` (absolute-form targets are reduced to their
    /// path by the HTTP layer before this).
    NotAbsolute,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// `%2F` or `%5C`: an encoded separator.
    EncodedSeparator,
    /// A literal `\`.
    Backslash,
    /// An encoded NUL or other control character.
    ControlByte,
    /// `..` above the root.
    AboveRoot,
    /// A dot segment with parameters (`..;x`): some servers strip the
    /// parameters and climb.
    DotSegmentParams,
}

impl PathError {
    pub fn message(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "The request path must start with /",
            PathError::BadEscape => "The request path has a % not followed by two hex digits",
            PathError::EncodedSeparator => {
                "The request path has an encoded / or \\ (%2F, %5C); send the path unencoded"
            }
            PathError::Backslash => "The request path has a \\; separate path segments with /",
            PathError::ControlByte => "The request path has an encoded control character",
            PathError::AboveRoot => "The request path climbs above the root with ..",
            PathError::DotSegmentParams => {
                "The request path has a dot segment with parameters (like ..;); remove them"
            }
        }
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The normalized form of `path` (no query: the caller keeps the query as
/// it came). Returns `None` when `path` is already normal, so the common
/// request costs one scan and no allocation.
pub fn normalize_path(path: &str) -> Result<Option<String>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // First pass: is anything to be done at all?
    let mut plain = true;
    let mut prev = 0u8;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\\' => return Err(PathError::Backslash),
            b'%' | b';' => plain = false,
            b'/' if prev == b'/' => plain = false,
            b'.' if prev == b'/' => {
                // "/." or "/.." followed by "/" or the end is a dot segment.
                let rest = &bytes[i..];
                let seg_end = rest.iter().position(|&c| c == b'/').unwrap_or(rest.len());
                if &rest[..seg_end] == b"." || &rest[..seg_end] == b".." {
                    plain = false;
                }
            }
            _ => {}
        }
        prev = b;
    }
    if plain {
        return Ok(None);
    }

    // Decode unreserved escapes, validate the others, split into segments.
    // Bytes, not chars: whatever is not an escape is copied as it came (the
    // HTTP layer admits only visible ASCII in a path, but this function
    // must not corrupt anything else either).
    let mut out_bytes: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let v = h << 4 | l;
            match v {
                b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                0..=0x1f | 0x7f => return Err(PathError::ControlByte),
                v if unreserved(v) => out_bytes.push(v),
                v => out_bytes.extend_from_slice(format!("%{v:02X}").as_bytes()),
            }
            i += 3;
        } else {
            out_bytes.push(b);
            i += 1;
        }
    }
    // Only ASCII was added to bytes of a valid &str, at char boundaries.
    let decoded = String::from_utf8(out_bytes).map_err(|_| PathError::BadEscape)?;

    let trailing = decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
        || decoded == "/";
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/').skip(1) {
        // Servers that take `;params` off a segment (Tomcat, Spring) would
        // read `..;x` as `..`: refuse what would climb for them.
        let core = seg.split(';').next().unwrap_or(seg);
        let core = core.split("%3B").next().unwrap_or(core);
        if core.len() < seg.len() && (core == "." || core == "..") {
            return Err(PathError::DotSegmentParams);
        }
        match seg {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => out.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for s in &out {
        normal.push('/');
        normal.push_str(s);
    }
    if trailing || normal.is_empty() {
        normal.push('/');
    }
    // Escapes that were already in their normal form: nothing changed.
    Ok((normal != path).then_some(normal))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize_path(p).map(|o| o.unwrap_or_else(|| p.to_string()))
    }

    #[test]
    fn normal_paths_are_left_alone() {
        for p in [
            "/",
            "/emails",
            "/emails/",
            "/a/b.c/d",
            "/a/.hidden",
            "/a/..b",
            "/a/b..",
            "/v1/x?",
        ] {
            assert_eq!(normalize_path(p), Ok(None), "{p}");
        }
    }

    #[test]
    fn dot_segments_slashes_and_unreserved_escapes() {
        assert_eq!(n("/emails/../admin").unwrap(), "/admin");
        assert_eq!(n("/emails/%2e%2e/admin").unwrap(), "/admin");
        assert_eq!(n("/emails/%2E%2e/admin").unwrap(), "/admin");
        assert_eq!(n("/emails/.%2e/admin").unwrap(), "/admin");
        assert_eq!(n("//admin").unwrap(), "/admin");
        assert_eq!(n("/emails//x///y").unwrap(), "/emails/x/y");
        assert_eq!(n("/emails/./x").unwrap(), "/emails/x");
        assert_eq!(n("/emails/x/.").unwrap(), "/emails/x/");
        assert_eq!(n("/emails/x/..").unwrap(), "/emails/");
        assert_eq!(n("/%65mails").unwrap(), "/emails");
        assert_eq!(n("/a%20b").unwrap(), "/a%20b");
        assert_eq!(n("/a%3fb").unwrap(), "/a%3Fb");
        // Found by the fuzzer: a path already in normal form with an escape
        // is reported unchanged.
        assert_eq!(normalize_path("/%2C"), Ok(None));
        assert_eq!(n("/\u{9a}%22").unwrap(), "/\u{9a}%22");
        assert_eq!(n("/.").unwrap(), "/");
    }

    #[test]
    fn what_upstreams_would_read_differently_is_refused() {
        assert_eq!(n("/emails/..%2Fadmin"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/emails%2f..%2fadmin"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/emails%5C..%5Cadmin"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/emails\\..\\admin"), Err(PathError::Backslash));
        assert_eq!(n("/.."), Err(PathError::AboveRoot));
        assert_eq!(n("/a/../../b"), Err(PathError::AboveRoot));
        assert_eq!(n("/%2e%2e/x"), Err(PathError::AboveRoot));
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(n("/a%2"), Err(PathError::BadEscape));
        assert_eq!(n("/a%00"), Err(PathError::ControlByte));
        assert_eq!(n("a"), Err(PathError::NotAbsolute));
        // Found in review: Tomcat reads `..;` as `..`.
        assert_eq!(n("/emails/..;/admin"), Err(PathError::DotSegmentParams));
        assert_eq!(
            n("/emails/..;jsessionid=1/admin"),
            Err(PathError::DotSegmentParams)
        );
        assert_eq!(n("/emails/%2e%2e;/admin"), Err(PathError::DotSegmentParams));
        assert_eq!(n("/emails/..%3b/admin"), Err(PathError::DotSegmentParams));
        assert_eq!(n("/emails/.;/x"), Err(PathError::DotSegmentParams));
        // Parameters on an ordinary segment are the upstream's business.
        assert_eq!(n("/emails;v=1/x").unwrap(), "/emails;v=1/x");
    }

    proptest::proptest! {
        /// Normalizing is idempotent, and its output has no dot segment, no
        /// empty segment and no escape of an unreserved character: what the
        /// scope check saw is what any upstream resolves.
        #[test]
        fn normal_form_is_a_fixed_point(segs in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::strategy::Just("..".to_string()),
                proptest::strategy::Just(".".to_string()),
                proptest::strategy::Just("".to_string()),
                proptest::strategy::Just("%2e".to_string()),
                proptest::strategy::Just("%2E%2e".to_string()),
                proptest::strategy::Just("%41".to_string()),
                proptest::strategy::Just("%20".to_string()),
                "[a-z]{1,3}",
            ], 0..8)) {
            let p = format!("/{}", segs.join("/"));
            if let Ok(out) = n(&p) {
                proptest::prop_assert_eq!(n(&out).unwrap(), out.clone());
                proptest::prop_assert!(!out.contains("//"));
                for seg in out.split('/') {
                    proptest::prop_assert!(seg != "." && seg != "..", "{}", out);
                }
                let lower = out.to_ascii_lowercase();
                proptest::prop_assert!(!lower.contains("%2e") && !lower.contains("%41"));
            }
        }
    }
}
