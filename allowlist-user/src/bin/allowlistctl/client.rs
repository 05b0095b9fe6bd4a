//! A small HTTP/1.1 client for the admin API over its Unix socket.

use std::path::PathBuf;

use allowlist::api::ErrorBody;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(
        "cannot reach allowlistd at {path}: {source}. Is it running? (--socket or ALLOWLIST_SOCKET selects another socket)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{message}")]
    Refused { code: String, message: String },
    #[error("talking to allowlistd: {0}")]
    Protocol(String),
}

impl CtlError {
    pub fn exit_code(&self) -> u8 {
        // Usage errors (2) are clap's; everything that reaches here is a
        // refused or failed request.
        1
    }
}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: PathBuf) -> Client {
        Client { socket }
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

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, CtlError> {
        self.call(Method::DELETE, path, None::<&()>).await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, CtlError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| CtlError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| CtlError::Protocol(e.to_string()))?;
        tokio::spawn(conn);
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| CtlError::Protocol(e.to_string()))?,
            None => Vec::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "allowlistd")
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
            return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => CtlError::Refused {
                    code: e.error.code,
                    message: e.error.message,
                },
                Err(_) => {
                    CtlError::Protocol(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)))
                }
            });
        }
        serde_json::from_slice(&body)
            .map_err(|e| CtlError::Protocol(format!("unexpected answer: {e}")))
    }
}

/// Percent-encodes a query value (CIDRs contain '/' and ':').
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
