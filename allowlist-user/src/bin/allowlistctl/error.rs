//! What can go wrong talking to the admin API, and the exit status each
//! error gives.

use std::path::PathBuf;

use hyper::StatusCode;

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
    #[error(
        "cannot reach the admin API at {url}: {source}. Is allowlistd running with [admin] listen set to that address?"
    )]
    ConnectTcp {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {url} failed: {message}; {hint}")]
    Tls {
        url: String,
        message: String,
        hint: &'static str,
    },
    /// The daemon answered with an error.
    #[error("{}", refusal(.status, .code, .message))]
    Refused {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("talking to allowlistd: {0}")]
    Protocol(String),
    /// A local problem before any request: an unreadable token or CA file.
    #[error("{0}")]
    Setup(String),
}

/// How a refusal reads: the daemon's message, with the error code where it
/// tells the reader more (who may do this) than the message alone.
fn refusal(status: &StatusCode, code: &str, message: &str) -> String {
    match *status {
        StatusCode::UNAUTHORIZED => format!(
            "{code}: {message} (HTTP 401: the admin API did not accept the token in \
             --token-file; it may be mistyped, revoked or expired)"
        ),
        StatusCode::FORBIDDEN => format!("{code}: {message}"),
        _ => message.to_string(),
    }
}

impl CtlError {
    pub fn exit_code(&self) -> u8 {
        // Usage errors (2) are clap's; everything that reaches here is a
        // refused or failed request.
        1
    }
}
