//! `/_allowlist/` on the edge: the one-click action links of
//! notifications. The whole prefix is the edge's own and never reaches the
//! upstream; the page itself comes from the application's handler.

use hyper::{
    HeaderMap, Method, Request, Response, StatusCode, body::Incoming, header::HeaderValue,
};

use super::{Inner, full};
use crate::edge_host::{ActionHandler, ActionMethod, ActionRequest};

/// Where the edge's own pages live (matched on the normalized path, so no
/// spelling of it reaches the upstream either).
pub const PREFIX: &str = "/_allowlist/";
const ACTIONS: &str = "/_allowlist/actions/";

/// `path` as the usage log may keep it: an action link's token replaced.
pub fn redacted(path: &str) -> String {
    match path.strip_prefix(ACTIONS) {
        Some(_) => format!("{ACTIONS}(token)"),
        None => path.chars().take(2048).collect(),
    }
}

/// A confirmation form is a few dozen bytes.
const MAX_FORM: usize = 4096;

fn page(status: StatusCode, html: String) -> Response<Inner> {
    let mut resp = Response::new(full(html));
    *resp.status_mut() = status;
    secure_headers(resp.headers_mut());
    resp
}

/// The token is in the URL: no cache may keep the page, no referrer may
/// carry it away, no other site may frame the button.
fn secure_headers(h: &mut HeaderMap) {
    let set = |h: &mut HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, "content-type", "text/html; charset=utf-8");
    set(h, "cache-control", "no-store");
    set(h, "referrer-policy", "no-referrer");
    set(h, "x-frame-options", "DENY");
    set(h, "x-content-type-options", "nosniff");
    set(
        h,
        "content-security-policy",
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
    );
}

/// Answers a request under [`PREFIX`]; `path` is the normalized path.
pub async fn answer(
    handler: Option<&std::sync::Arc<dyn ActionHandler>>,
    req: Request<Incoming>,
    path: &str,
    client: std::net::IpAddr,
) -> Response<Inner> {
    let not_found = || {
        page(
            StatusCode::NOT_FOUND,
            "<!doctype html><title>Not found</title><p>Not found.</p>\n".into(),
        )
    };
    let (Some(handler), Some(token)) = (handler, path.strip_prefix(ACTIONS)) else {
        return not_found();
    };
    if token.is_empty() || token.contains('/') {
        return not_found();
    }
    let method = match *req.method() {
        Method::GET => ActionMethod::Get,
        Method::POST => ActionMethod::Post,
        _ => ActionMethod::Other,
    };
    let form = if method == ActionMethod::Post {
        use http_body_util::BodyExt;
        let limited = http_body_util::Limited::new(req.into_body(), MAX_FORM);
        match tokio::time::timeout(std::time::Duration::from_secs(10), limited.collect()).await {
            Ok(Ok(b)) => b.to_bytes().to_vec(),
            _ => {
                return page(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "<!doctype html><title>Too large</title><p>The form is too large or too slow.</p>\n"
                        .into(),
                );
            }
        }
    } else {
        Vec::new()
    };
    let token = token.to_string();
    let reply = handler
        .handle(ActionRequest {
            method,
            token,
            form,
            client,
        })
        .await;
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if method == ActionMethod::Other {
        // No body: a HEAD answer must not carry one (HTTP/2 clients treat
        // DATA after a HEAD as a protocol error).
        let mut resp = page(status, String::new());
        resp.headers_mut()
            .insert("allow", HeaderValue::from_static("GET, POST"));
        return resp;
    }
    page(status, reply.html)
}
