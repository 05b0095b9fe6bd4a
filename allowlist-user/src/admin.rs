//! The admin API: JSON over HTTP on a Unix socket (mode 0600), mirrored one
//! to one by `allowlistctl`.

use std::{io, os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use axum::{
    Json, Router,
    extract::{Query, State, connect_info::ConnectInfo},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use tokio::net::UnixListener;

use crate::{
    api::{self, ErrorBody, ErrorDetail},
    daemon::{Daemon, DaemonError},
};

/// Who is calling, from the socket's peer credentials (for the audit log).
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

/// An admin API error rendered in the one JSON shape; internals stay in the
/// daemon's log.
pub struct ApiError(pub StatusCode, pub &'static str, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.1.into(),
                message: self.2,
            },
        };
        (self.0, Json(body)).into_response()
    }
}

impl From<DaemonError> for ApiError {
    fn from(e: DaemonError) -> Self {
        match &e {
            DaemonError::Invalid(m) => {
                ApiError(StatusCode::BAD_REQUEST, "invalid_request", m.clone())
            }
            DaemonError::NotFound(m) => ApiError(StatusCode::NOT_FOUND, "not_found", m.clone()),
            DaemonError::Capacity(m) => ApiError(StatusCode::CONFLICT, "capacity", m.clone()),
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

type ApiResult<T> = Result<Json<T>, ApiError>;

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(|| async { "ready\n" }))
        .route(
            "/v1/drop",
            get(list_drops).post(add_drop).delete(remove_drop),
        )
        .route("/v1/stats", get(stats))
        .route("/v1/blocking", get(blocking))
        .route("/v1/events", get(events))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such admin API route; see `allowlistctl --help`".into(),
            )
        })
        .with_state(daemon)
}

async fn list_drops(State(d): State<Arc<Daemon>>) -> ApiResult<api::DropList> {
    Ok(Json(d.list_drops()?))
}

async fn add_drop(
    State(d): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: Result<Json<api::AddDrop>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<api::DropView>), ApiError> {
    let Json(req) =
        body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))?;
    let view = d.add_drop(req, &peer.actor()).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Deserialize)]
struct CidrQuery {
    cidr: String,
}

async fn remove_drop(
    State(d): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    q: Result<Query<CidrQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<api::DropView> {
    let Query(q) =
        q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))?;
    Ok(Json(d.remove_drop(&q.cidr, &peer.actor()).await?))
}

async fn stats(State(d): State<Arc<Daemon>>) -> ApiResult<api::Stats> {
    Ok(Json(d.stats()?))
}

async fn blocking(State(d): State<Arc<Daemon>>) -> ApiResult<api::Blocking> {
    Ok(Json(d.blocking()?))
}

async fn events(State(d): State<Arc<Daemon>>) -> ApiResult<api::Events> {
    Ok(Json(d.recent_events()))
}

/// Binds the admin socket with mode 0600, replacing a stale socket file but
/// refusing to steal one a running daemon still answers on.
pub async fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use by a running allowlistd; stop it first or set [admin] socket",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Bind under a tight umask so the socket is never reachable by others,
    // not even between bind and chmod.
    // SAFETY: umask has no preconditions; the daemon binds before it spawns
    // anything that creates files concurrently.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = listener?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
