//! Who is calling: the socket peer (operators) or a bearer token, and the
//! account a request names (`?account=`), resolved once per request into a
//! [`Ctx`] every handler reads.

use std::sync::Arc;

use axum::{
    extract::{Request, State, connect_info::ConnectInfo},
    http::{StatusCode, Uri, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use tokio::net::UnixListener;

use super::ApiError;
use crate::daemon::{Caller, Daemon, DaemonError};
use crate::store::StoreError;

/// Who is calling over the socket, from its peer credentials.
#[derive(Clone, Debug)]
pub struct Peer {
    pub uid: Option<u32>,
}

impl Peer {
    pub fn actor(&self) -> String {
        match self.uid {
            Some(uid) => format!("uid:{uid}"),
            None => "unknown".into(),
        }
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, UnixListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, UnixListener>) -> Self {
        Peer {
            uid: stream.io().peer_cred().ok().map(|c| c.uid()),
        }
    }
}

/// Who may use the admin socket: root, the daemon's own user (a
/// development run without root), and members of `[admin] group`.
#[derive(Clone, Copy, Debug)]
pub struct Operators {
    pub group: Option<u32>,
}

impl Operators {
    pub fn admits(&self, uid: u32) -> bool {
        uid == 0
            || uid == crate::sys::euid()
            || self
                .group
                .is_some_and(|gid| crate::sys::user_in_group(uid, gid))
    }
}

/// A request's caller and the account it names.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub caller: Caller,
    /// `?account=`, if given.
    pub named: Option<String>,
}

impl Ctx {
    /// The account the request acts on (see [`Caller::account_for`]).
    pub fn account(&self) -> Result<String, ApiError> {
        Ok(self.caller.account_for(self.named.as_deref())?)
    }

    pub fn require(&self, need: crate::policy::Need) -> Result<(), ApiError> {
        Ok(self.caller.require(need)?)
    }
}

/// Takes `account=` out of the query string (handlers' own query types
/// refuse unknown fields); a repeated or empty `account` is refused.
fn take_account(req: &mut Request) -> Result<Option<String>, ApiError> {
    let Some(query) = req.uri().query() else {
        return Ok(None);
    };
    let mut named = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("account", v)) => {
                let v = percent_decode(v).ok_or_else(|| bad("account is not valid UTF-8"))?;
                if v.is_empty() || named.replace(v).is_some() {
                    return Err(bad("give one non-empty account= at most"));
                }
            }
            _ => rest.push(pair),
        }
    }
    if named.is_some() {
        let path = req.uri().path();
        let pq = if rest.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{}", rest.join("&"))
        };
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = Some(pq.parse().map_err(|_| bad("malformed query"))?);
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| bad("malformed query"))?;
    }
    Ok(named)
}

fn bad(m: &str) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "invalid_request", m.to_string())
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            b'%' => return None,
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The socket: operators only, whatever the socket's mode let through
/// (defense in depth: the mode is the first check).
pub async fn socket_caller(
    State(ops): State<Operators>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    mut req: Request,
    next: Next,
) -> Response {
    let named = match take_account(&mut req) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    match peer.uid {
        Some(uid) if ops.admits(uid) => {
            req.extensions_mut().insert(Ctx {
                caller: Caller::operator(peer.actor()),
                named,
            });
            next.run(req).await
        }
        _ => ApiError(
            StatusCode::FORBIDDEN,
            "permission_denied",
            "the admin socket is for operators: root and members of [admin] group".into(),
        )
        .into_response(),
    }
}

/// The TCP listener: a bearer token, or 401 (one answer for a missing,
/// unknown, wrong, revoked or expired token).
pub async fn bearer_caller(
    State(daemon): State<Arc<Daemon>>,
    mut req: Request,
    next: Next,
) -> Response {
    let caller = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| daemon.authenticate(t.trim()));
    let Some(caller) = caller else {
        let mut resp = ApiError(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid admin token is needed: send Authorization: Bearer <token> \
             (`allowlistctl tokens create` makes one)"
                .into(),
        )
        .into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return resp;
    };
    let named = match take_account(&mut req) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    req.extensions_mut().insert(Ctx { caller, named });
    next.run(req).await
}

impl From<DaemonError> for ApiError {
    fn from(e: DaemonError) -> Self {
        match &e {
            DaemonError::Invalid(m) => {
                ApiError(StatusCode::BAD_REQUEST, "invalid_request", m.clone())
            }
            DaemonError::NotFound(m) => ApiError(StatusCode::NOT_FOUND, "not_found", m.clone()),
            DaemonError::Forbidden(m) => {
                ApiError(StatusCode::FORBIDDEN, "permission_denied", m.clone())
            }
            DaemonError::Capacity(m) => ApiError(StatusCode::CONFLICT, "capacity", m.clone()),
            DaemonError::Store(StoreError::Unavailable { .. }) => {
                tracing::warn!(error = %e, "admin change refused: the store is unavailable");
                ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    format!(
                        "{e}. Nothing was changed; this edge keeps enforcing the last policy it \
                         knew. Try again when the store is back (`allowlistctl stats` shows it)."
                    ),
                )
            }
            DaemonError::Store(_) | DaemonError::Kernel(_) => {
                tracing::error!(error = %e, "admin request failed");
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("{e}; nothing was changed. See the daemon's log for details."),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_is_taken_out_of_the_query() {
        let mut req = Request::builder()
            .uri("/v1/ips?cidr=10.0.0.0%2F8&account=acme")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(take_account(&mut req).unwrap().as_deref(), Some("acme"));
        assert_eq!(req.uri().to_string(), "/v1/ips?cidr=10.0.0.0%2F8");
        let mut twice = Request::builder()
            .uri("/v1/keys?account=a&account=b")
            .body(axum::body::Body::empty())
            .unwrap();
        assert!(take_account(&mut twice).is_err());
        assert_eq!(percent_decode("a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(percent_decode("a%2"), None);
    }
}
