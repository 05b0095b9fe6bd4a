//! The admin API: JSON over HTTP on a Unix socket (mode 0600), mirrored one
//! to one by `allowlistctl`.

use std::{io, os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use axum::{
    Json, Router,
    extract::{Query, State, connect_info::ConnectInfo},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tokio::net::UnixListener;

use crate::{
    api::{self, ErrorBody, ErrorDetail},
    daemon::{Daemon, DaemonError},
    daemon::{DenyOutcome, KeyView, NewKey},
    policy::{ApiMode, SmtpMode},
    store::{AuthorizedRecord, BlockingState, UnauthorizedRecord},
};

/// Who is calling, from the socket's peer credentials (for the audit log).
#[derive(Clone, Debug)]
pub struct Peer {
    pub uid: Option<u32>,
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

/// Refuses callers that are not operators, whatever the socket's mode
/// let through (defense in depth: the mode is the first check).
async fn operators_only(
    State(ops): State<Operators>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match peer.uid {
        Some(uid) if ops.admits(uid) => next.run(req).await,
        _ => ApiError(
            StatusCode::FORBIDDEN,
            "permission_denied",
            "the admin socket is for operators: root and members of [admin] group".into(),
        )
        .into_response(),
    }
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
    let ops = Operators {
        group: Some(daemon.config.admin.group.as_str())
            .filter(|g| !g.is_empty())
            .and_then(crate::sys::group_gid),
    };
    routes(daemon).layer(axum::middleware::from_fn_with_state(ops, operators_only))
}

fn routes(daemon: Arc<Daemon>) -> Router {
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
        .route("/v1/audit", get(audit))
        .route("/v1/keys", get(list_keys).post(create_key))
        .route("/v1/keys/{id}", get(show_key))
        .route("/v1/keys/{id}/revoke", post(revoke_key))
        .route("/v1/keys/{id}/rotate", post(rotate_key))
        .route("/v1/keys/{id}/allow", post(key_allow).delete(key_disallow))
        .route("/v1/ips", get(list_ips).post(authorize).delete(unauthorize))
        .route("/v1/ips/unauthorized", get(list_unauthorized))
        .route("/v1/ips/deny", post(deny))
        .route("/v1/blocking/api", post(set_api))
        .route("/v1/blocking/smtp", post(set_smtp))
        .route("/v1/blocking/impact", get(impact))
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

async fn remove_drop(
    State(d): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    q: Result<Query<api::CidrQuery>, axum::extract::rejection::QueryRejection>,
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

/// A JSON body, with serde's complaint turned into the one error shape.
type Body<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

fn body<T>(b: Body<T>) -> Result<T, ApiError> {
    b.map(|Json(t)| t)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))
}

use axum::extract::Path as UrlPath;

async fn audit(
    State(d): State<Arc<Daemon>>,
    q: Result<axum::extract::Query<api::AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<api::Audit> {
    let axum::extract::Query(q) =
        q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))?;
    Ok(Json(d.audit(&q)?))
}

async fn list_keys(State(d): State<Arc<Daemon>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "keys": d.list_keys() }))
}

async fn create_key(
    State(d): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    b: Body<NewKey>,
) -> Result<(StatusCode, Json<KeyView>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(d.create_key(body(b)?, &peer.actor()).await?),
    ))
}

async fn show_key(
    State(d): State<Arc<Daemon>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<KeyView> {
    Ok(Json(d.show_key(&id)?))
}

async fn revoke_key(
    State(d): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<KeyView> {
    Ok(Json(d.revoke_key(&id, &peer.actor()).await?))
}

async fn rotate_key(
    State(d): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(id): UrlPath<String>,
    b: Body<api::RotateKey>,
) -> ApiResult<KeyView> {
    let r = body(b)?;
    Ok(Json(
        d.rotate_key(&id, r.grace.as_deref(), &peer.actor()).await?,
    ))
}

async fn key_allow(
    State(d): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(id): UrlPath<String>,
    b: Body<api::AllowEntry>,
) -> ApiResult<KeyView> {
    let r = body(b)?;
    Ok(Json(
        d.key_allow(&id, &r.cidr, r.label, &peer.actor()).await?,
    ))
}

async fn key_disallow(
    State(d): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(id): UrlPath<String>,
    q: Result<Query<api::CidrQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<KeyView> {
    let Query(q) =
        q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))?;
    Ok(Json(d.key_disallow(&id, &q.cidr, &peer.actor()).await?))
}

async fn list_ips(State(d): State<Arc<Daemon>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "authorized": d.list_authorized() }))
}

async fn authorize(
    State(d): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    b: Body<api::AllowEntry>,
) -> Result<(StatusCode, Json<AuthorizedRecord>), ApiError> {
    let r = body(b)?;
    Ok((
        StatusCode::CREATED,
        Json(
            d.authorize(&r.cidr, r.label, "manual", None, &peer.actor())
                .await?,
        ),
    ))
}

async fn unauthorize(
    State(d): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    q: Result<Query<api::CidrQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<AuthorizedRecord> {
    let Query(q) =
        q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))?;
    Ok(Json(d.unauthorize(&q.cidr, &peer.actor()).await?))
}

async fn list_unauthorized(
    State(d): State<Arc<Daemon>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let list: Vec<UnauthorizedRecord> = d.list_unauthorized()?;
    Ok(Json(serde_json::json!({ "unauthorized": list })))
}

async fn deny(
    State(d): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    b: Body<api::Deny>,
) -> ApiResult<DenyOutcome> {
    let r = body(b)?;
    Ok(Json(
        d.deny(&r.addr, r.drop, r.ttl, r.rotate_key, &peer.actor())
            .await?,
    ))
}

async fn set_api(
    State(d): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    b: Body<api::SetMode>,
) -> ApiResult<BlockingState> {
    let r = body(b)?;
    let mode = match r.mode.as_str() {
        "learning" => ApiMode::Learning,
        "active" | "activate" => ApiMode::Active,
        "inactive" | "deactivate" => ApiMode::Inactive,
        m => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("unknown API blocking mode {m:?}; use learning, activate or deactivate"),
            ));
        }
    };
    Ok(Json(
        d.set_api_blocking(mode, r.force, &peer.actor()).await?,
    ))
}

async fn set_smtp(
    State(d): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    b: Body<api::SetMode>,
) -> ApiResult<BlockingState> {
    let r = body(b)?;
    let mode = match r.mode.as_str() {
        "active" | "activate" => SmtpMode::Active,
        "inactive" | "deactivate" => SmtpMode::Inactive,
        m => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("unknown SMTP blocking mode {m:?}; use activate or deactivate"),
            ));
        }
    };
    Ok(Json(
        d.set_smtp_blocking(mode, r.force, &peer.actor()).await?,
    ))
}

async fn impact(State(d): State<Arc<Daemon>>) -> Result<Json<serde_json::Value>, ApiError> {
    let cut: Vec<serde_json::Value> = d
        .activation_impact()?
        .into_iter()
        .map(|(addr, key)| serde_json::json!({ "addr": addr, "key_id": key }))
        .collect();
    Ok(Json(serde_json::json!({ "would_refuse": cut })))
}

/// Binds the admin socket with mode 0600 (0660 for `group`), replacing a stale socket file but
/// refusing to steal one a running daemon still answers on.
pub async fn bind(path: &Path, group: &str) -> io::Result<UnixListener> {
    let gid = if group.is_empty() {
        None
    } else {
        Some(crate::sys::group_gid(group).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("[admin] group {group:?} does not exist"),
            )
        })?)
    };
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
    // Bind inside a fresh private folder (0700), set the socket's mode, then
    // rename it into place: nobody else can reach it before it is 0600, and
    // the process-wide umask (which the edge workers, already running,
    // also create files under) is never touched.
    use std::os::unix::fs::DirBuilderExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let private = dir.join(format!(".allowlist-admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("admin.sock");
    let bound = (|| {
        let listener = UnixListener::bind(&staged)?;
        // 0600, or 0660 owned by the operators' group.
        let mode = match gid {
            Some(gid) => {
                std::os::unix::fs::chown(&staged, None, Some(gid))?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&staged, path)?;
        Ok::<_, io::Error>(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    let listener = bound?;
    Ok(listener)
}
