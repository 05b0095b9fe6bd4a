//! The one place allowlistctl talks HTTP: JSON requests to the admin API,
//! over the Unix socket or TLS (see `transport.rs`), with `--account`
//! applied to every request.

use allowlist::api::ErrorBody;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, body::Bytes};
use serde::{Serialize, de::DeserializeOwned};

pub use crate::error::CtlError;
use crate::transport::Transport;

pub struct Client {
    transport: Transport,
    /// `--account`: appended to every request as `account=NAME`.
    account: Option<String>,
}

impl Client {
    pub fn new(transport: Transport, account: Option<String>) -> Client {
        Client { transport, account }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CtlError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CtlError> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CtlError> {
        self.call(Method::PUT, path, Some(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, CtlError> {
        self.call(Method::DELETE, path, None::<&()>).await
    }

    /// GETs `path` and hands the body to `each` chunk by chunk as it
    /// arrives (a long export never sits in memory whole).
    pub async fn stream(
        &self,
        path: &str,
        mut each: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), CtlError> {
        let mut sender = self.transport.connect().await?;
        let uri = self.transport.uri(&self.with_account(path));
        let req = self
            .transport
            .headers(Request::builder().method(Method::GET).uri(uri))
            .body(Full::new(Bytes::new()))
            .map_err(|e| CtlError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| CtlError::Protocol(e.to_string()))?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map_err(|e| CtlError::Protocol(e.to_string()))?
                .to_bytes();
            return Err(refused(status, &bytes));
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| CtlError::Protocol(e.to_string()))?;
            if let Some(data) = frame.data_ref() {
                each(data).map_err(|e| CtlError::Setup(format!("writing the output: {e}")))?;
            }
        }
        Ok(())
    }

    /// `path` with `account=NAME` added when `--account` was given.
    fn with_account(&self, path: &str) -> String {
        match &self.account {
            Some(a) => format!(
                "{path}{}account={}",
                if path.contains('?') { '&' } else { '?' },
                query_value(a)
            ),
            None => path.to_string(),
        }
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, CtlError> {
        let mut sender = self.transport.connect().await?;
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| CtlError::Protocol(e.to_string()))?,
            None => Vec::new(),
        };
        let uri = self.transport.uri(&self.with_account(path));
        let req = self
            .transport
            .headers(Request::builder().method(method).uri(uri))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| CtlError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| CtlError::Protocol(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CtlError::Protocol(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(refused(status, &body));
        }
        serde_json::from_slice(&body)
            .map_err(|e| CtlError::Protocol(format!("unexpected answer: {e}")))
    }
}

/// The error an unsuccessful answer carries.
fn refused(status: StatusCode, body: &[u8]) -> CtlError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => CtlError::Refused {
            status,
            code: e.error.code,
            message: e.error.message,
        },
        Err(_) if status == StatusCode::UNAUTHORIZED => CtlError::Refused {
            status,
            code: "unauthorized".into(),
            message: String::from_utf8_lossy(body).trim().to_string(),
        },
        Err(_) => CtlError::Protocol(format!("HTTP {status}: {}", String::from_utf8_lossy(body))),
    }
}

/// Percent-encodes a query value or path segment (CIDRs contain '/' and
/// ':').
pub fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
