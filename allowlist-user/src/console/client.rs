//! The console's only way to act: the admin API's own router, called
//! in-process with the session's bearer token. Every check (token, role,
//! account) is the API's; the console cannot do what a script could not.

use axum::{
    Router,
    body::Body,
    http::{Method, Request, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Serialize, de::DeserializeOwned};
use tower::ServiceExt;

use super::session::Session;
use crate::api::ErrorBody;

/// The API's refusal, as it said it.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl Refusal {
    /// The token stopped working (revoked, expired): the session is over.
    pub fn signed_out(&self) -> bool {
        self.status == StatusCode::UNAUTHORIZED
    }
}

/// Bodies the console reads are small (lists are bounded by the API);
/// this bounds a surprise.
const MAX_BODY: usize = 64 * 1024 * 1024;

#[derive(Clone)]
pub struct Api {
    router: Router,
}

/// `path?query&account=...`: the session's account is named on every call
/// (the API refuses an account token naming another account).
fn target(s: &Session, path: &str, query: &str) -> String {
    let account = serde_urlencoded::to_string([("account", s.account.as_str())])
        .expect("a string pair encodes");
    match query {
        "" => format!("{path}?{account}"),
        q => format!("{path}?{q}&{account}"),
    }
}

pub fn query<Q: Serialize>(q: &Q) -> String {
    serde_urlencoded::to_string(q).unwrap_or_default()
}

impl Api {
    pub fn new(router: Router) -> Api {
        Api { router }
    }

    /// The raw response of `GET path?query` (the CSV export streams it).
    pub async fn raw(&self, s: &Session, path: &str, query: &str) -> Response {
        let req = match Request::builder()
            .method(Method::GET)
            .uri(target(s, path, query))
            .header(header::AUTHORIZATION, format!("Bearer {}", s.token))
            .body(Body::empty())
        {
            Ok(r) => r,
            Err(e) => {
                return (StatusCode::BAD_REQUEST, format!("not a valid request: {e}"))
                    .into_response();
            }
        };
        match self.router.clone().oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        token: &str,
        method: Method,
        uri: String,
        body: Option<Vec<u8>>,
    ) -> Result<T, Refusal> {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(body.map(Body::from).unwrap_or_else(Body::empty))
            .map_err(|e| Refusal {
                status: StatusCode::BAD_REQUEST,
                message: format!("not a valid request: {e}"),
            })?;
        let resp = match self.router.clone().oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), MAX_BODY)
            .await
            .map_err(|e| Refusal {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!("reading the admin API's answer: {e}"),
            })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| Refusal {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!("the admin API's answer did not parse: {e}"),
            });
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| format!("the admin API answered {status}"));
        Err(Refusal { status, message })
    }

    /// `GET /v1/whoami` with a token not yet in a session (sign-in).
    pub async fn whoami(&self, token: &str) -> Result<crate::api::WhoAmI, Refusal> {
        self.call(token, Method::GET, "/v1/whoami".into(), None)
            .await
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        s: &Session,
        path: &str,
        query: &str,
    ) -> Result<T, Refusal> {
        self.call(&s.token, Method::GET, target(s, path, query), None)
            .await
    }

    pub async fn send<T: DeserializeOwned, B: Serialize>(
        &self,
        s: &Session,
        method: Method,
        path: &str,
        query: &str,
        body: Option<&B>,
    ) -> Result<T, Refusal> {
        let body = body.map(|b| serde_json::to_vec(b).expect("wire types serialize"));
        self.call(&s.token, method, target(s, path, query), body)
            .await
    }
}
