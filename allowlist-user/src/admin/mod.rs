//! The admin API: JSON over HTTP on a Unix socket (operators) and, with
//! `[admin] listen`, over TLS with bearer tokens; mirrored one to one by
//! `allowlistctl`. Every handler reads the caller and the account from
//! [`auth::Ctx`] and checks the role its route needs first.

use std::sync::Arc;

use axum::{
    Extension, Json, Router,
    extract::{Path as UrlPath, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};

mod auth;
mod listen;
mod logs;
mod notify;
mod socket;

pub use auth::{Ctx, Operators, Peer};
pub use listen::{admin_cert_path, load_admin_cert, serve_tls};
pub use socket::bind;

use crate::{
    api::{self, ErrorBody, ErrorDetail},
    daemon::{Authorize, Daemon, DenyRequest},
    policy::{ApiMode, Need, SmtpMode},
    store::{AuthorizedRecord, BlockingState},
};

/// An admin API error rendered in the one JSON shape; internals stay in the
/// daemon's log.
#[derive(Debug)]
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

type ApiResult<T> = Result<Json<T>, ApiError>;
type Cx = Extension<Ctx>;

/// The router on the admin socket: operators (peer credentials).
pub fn router(daemon: Arc<Daemon>) -> Router {
    let ops = Operators {
        group: Some(daemon.config.admin.group.as_str())
            .filter(|g| !g.is_empty())
            .and_then(crate::sys::group_gid),
    };
    routes(daemon).layer(axum::middleware::from_fn_with_state(
        ops,
        auth::socket_caller,
    ))
}

/// The router on the TCP listener: bearer tokens.
pub fn token_router(daemon: Arc<Daemon>) -> Router {
    routes(daemon.clone()).layer(axum::middleware::from_fn_with_state(
        daemon,
        auth::bearer_caller,
    ))
}

fn routes(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(|| async { "ready\n" }))
        .route(
            "/v1/drop",
            get(list_drops).post(add_drop).delete(remove_drop),
        )
        .route(
            "/v1/drop/import",
            post(import_drops).layer(axum::extract::DefaultBodyLimit::max(256 << 20)),
        )
        .route("/v1/stats", get(stats))
        .route("/v1/events", get(events))
        .route("/v1/audit", get(audit))
        .route("/v1/logs", get(logs::list))
        .route("/v1/logs/csv", get(logs::csv))
        .route("/v1/logs/summary", get(logs::summary))
        .route("/v1/whoami", get(whoami))
        .route("/v1/notify", get(notify::show))
        .route("/v1/notify/emails", axum::routing::put(notify::set_emails))
        .route(
            "/v1/notify/webhooks",
            post(notify::add_webhook).delete(notify::remove_webhook),
        )
        .route("/v1/accounts", get(list_accounts).post(create_account))
        .route(
            "/v1/accounts/{name}",
            get(show_account).delete(remove_account),
        )
        .route("/v1/accounts/{name}/enforce", post(enforce))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}/revoke", post(revoke_token))
        .route("/v1/keys", get(list_keys).post(create_key))
        .route("/v1/keys/{id}", get(show_key))
        .route("/v1/keys/{id}/revoke", post(revoke_key))
        .route("/v1/keys/{id}/rotate", post(rotate_key))
        .route("/v1/keys/{id}/allow", post(key_allow).delete(key_disallow))
        .route("/v1/ips", get(list_ips).post(authorize).delete(unauthorize))
        .route("/v1/ips/unauthorized", get(list_unauthorized))
        .route("/v1/ips/deny", post(deny))
        .route("/v1/ips/check", get(check_address))
        .route(
            "/v1/ips/import",
            post(import_ips).layer(axum::extract::DefaultBodyLimit::max(64 << 20)),
        )
        .route("/v1/blocking", get(blocking))
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

/// A JSON body, with serde's complaint turned into the one error shape.
type Body<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

fn body<T>(b: Body<T>) -> Result<T, ApiError> {
    b.map(|Json(t)| t)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))
}

type Q<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

fn query<T>(q: Q<T>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))
}

async fn list_drops(State(d): State<Arc<Daemon>>, Extension(cx): Cx) -> ApiResult<api::DropList> {
    cx.require(Need::Operator)?;
    Ok(Json(d.list_drops()?))
}

async fn add_drop(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    b: Body<api::AddDrop>,
) -> Result<(StatusCode, Json<api::DropView>), ApiError> {
    cx.require(Need::Operator)?;
    let view = d.add_drop(body(b)?, &cx.caller.actor).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn remove_drop(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    q: Q<api::CidrQuery>,
) -> ApiResult<api::DropView> {
    cx.require(Need::Operator)?;
    let q = query(q)?;
    Ok(Json(d.remove_drop(&q.cidr, &cx.caller.actor).await?))
}

async fn import_drops(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    b: Body<api::ImportDrops>,
) -> ApiResult<api::DropImportOutcome> {
    cx.require(Need::Operator)?;
    let r = body(b)?;
    Ok(Json(d.add_drops(r.entries, &cx.caller.actor).await?))
}

async fn stats(State(d): State<Arc<Daemon>>, Extension(cx): Cx) -> ApiResult<api::Stats> {
    cx.require(Need::Operator)?;
    Ok(Json(d.stats()?))
}

async fn events(State(d): State<Arc<Daemon>>, Extension(cx): Cx) -> ApiResult<api::Events> {
    cx.require(Need::Operator)?;
    Ok(Json(d.recent_events()))
}

async fn audit(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    q: Q<api::AuditQuery>,
) -> ApiResult<api::Audit> {
    cx.require(Need::Read)?;
    let q = query(q)?;
    // Operators read every account's entries unless they name one; an
    // account's callers read their account's.
    let account = match (&cx.caller.account, &cx.named) {
        (None, None) => None,
        _ => Some(cx.account()?),
    };
    Ok(Json(d.audit(account.as_deref(), &q)?))
}

async fn whoami(Extension(cx): Cx) -> ApiResult<api::WhoAmI> {
    Ok(Json(api::WhoAmI {
        actor: cx.caller.actor.clone(),
        role: cx.caller.role,
        account: cx.caller.account.clone(),
    }))
}

async fn check_address(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    q: Q<api::CheckQuery>,
) -> ApiResult<api::AddressCheck> {
    let account = cx.account()?;
    cx.require(Need::Read)?;
    let q = query(q)?;
    Ok(Json(d.check_address(
        &account,
        &q.addr,
        q.key.as_deref(),
    )?))
}

async fn import_ips(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    b: Body<api::ImportEntries>,
) -> ApiResult<api::ImportOutcome> {
    let account = cx.account()?;
    cx.require(Need::Lists)?;
    let r = body(b)?;
    let entries = r.entries.into_iter().map(|e| (e.cidr, e.label)).collect();
    Ok(Json(
        d.authorize_many(&account, entries, r.share, &cx.caller.actor)
            .await?,
    ))
}

async fn list_accounts(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
) -> ApiResult<api::AccountList> {
    cx.require(Need::Operator)?;
    Ok(Json(d.list_accounts()))
}

async fn create_account(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    b: Body<api::NewAccount>,
) -> Result<(StatusCode, Json<api::AccountView>), ApiError> {
    cx.require(Need::Operator)?;
    let v = d.create_account(body(b)?, &cx.caller.actor).await?;
    Ok((StatusCode::CREATED, Json(v)))
}

async fn show_account(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<api::AccountView> {
    cx.require(Need::Read)?;
    let name = cx.caller.account_for(Some(&name))?;
    Ok(Json(d.show_account(&name)?))
}

async fn remove_account(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    UrlPath(name): UrlPath<String>,
    q: Q<api::RemoveQuery>,
) -> ApiResult<api::AccountRemoved> {
    cx.require(Need::Operator)?;
    let q = query(q)?;
    Ok(Json(
        d.remove_account(&name, q.force, &cx.caller.actor).await?,
    ))
}

async fn enforce(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    UrlPath(name): UrlPath<String>,
    b: Body<api::Enforce>,
) -> ApiResult<api::AccountView> {
    let name = cx.caller.account_for(Some(&name))?;
    cx.require(Need::Lists)?;
    let r = body(b)?;
    Ok(Json(
        d.set_enforce(&name, r.enforce, &cx.caller.actor).await?,
    ))
}

async fn list_tokens(State(d): State<Arc<Daemon>>, Extension(cx): Cx) -> ApiResult<api::TokenList> {
    if let Some(n) = &cx.named {
        cx.caller.account_for(Some(n))?;
    }
    cx.require(Need::Keys)?;
    Ok(Json(d.list_tokens(&cx.caller, cx.named.as_deref())))
}

async fn create_token(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    b: Body<api::NewToken>,
) -> Result<(StatusCode, Json<api::TokenView>), ApiError> {
    let account = cx.account()?;
    let v = d.create_token(&cx.caller, &account, body(b)?).await?;
    Ok((StatusCode::CREATED, Json(v)))
}

async fn revoke_token(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    UrlPath(id): UrlPath<String>,
    b: Body<api::Empty>,
) -> ApiResult<api::TokenView> {
    body(b)?;
    Ok(Json(d.revoke_token(&cx.caller, &id).await?))
}

async fn list_keys(State(d): State<Arc<Daemon>>, Extension(cx): Cx) -> ApiResult<api::KeyList> {
    let account = cx.account()?;
    cx.require(Need::Read)?;
    Ok(Json(api::KeyList {
        keys: d.list_keys(&account)?,
    }))
}

async fn create_key(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    b: Body<api::NewKey>,
) -> Result<(StatusCode, Json<api::KeyView>), ApiError> {
    let account = cx.account()?;
    cx.require(Need::Keys)?;
    Ok((
        StatusCode::CREATED,
        Json(d.create_key(&account, body(b)?, &cx.caller.actor).await?),
    ))
}

async fn show_key(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<api::KeyView> {
    let account = cx.account()?;
    cx.require(Need::Read)?;
    Ok(Json(d.show_key(&account, &id)?))
}

async fn revoke_key(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<api::KeyView> {
    let account = cx.account()?;
    cx.require(Need::Keys)?;
    Ok(Json(d.revoke_key(&account, &id, &cx.caller.actor).await?))
}

async fn rotate_key(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    UrlPath(id): UrlPath<String>,
    b: Body<api::RotateKey>,
) -> ApiResult<api::KeyView> {
    let account = cx.account()?;
    cx.require(Need::Keys)?;
    let r = body(b)?;
    Ok(Json(
        d.rotate_key(&account, &id, r.grace.as_deref(), &cx.caller.actor)
            .await?,
    ))
}

async fn key_allow(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    UrlPath(id): UrlPath<String>,
    b: Body<api::AllowEntry>,
) -> ApiResult<api::KeyView> {
    let account = cx.account()?;
    cx.require(Need::Keys)?;
    let r = body(b)?;
    Ok(Json(
        d.key_allow(&account, &id, &r.cidr, r.label, &cx.caller.actor)
            .await?,
    ))
}

async fn key_disallow(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    UrlPath(id): UrlPath<String>,
    q: Q<api::CidrQuery>,
) -> ApiResult<api::KeyView> {
    let account = cx.account()?;
    cx.require(Need::Keys)?;
    let q = query(q)?;
    Ok(Json(
        d.key_disallow(&account, &id, &q.cidr, &cx.caller.actor)
            .await?,
    ))
}

async fn list_ips(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
) -> ApiResult<api::AuthorizedList> {
    let account = cx.account()?;
    cx.require(Need::Read)?;
    Ok(Json(api::AuthorizedList {
        authorized: d.list_authorized(&account)?,
    }))
}

async fn authorize(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    b: Body<api::Authorize>,
) -> Result<(StatusCode, Json<AuthorizedRecord>), ApiError> {
    let account = cx.account()?;
    cx.require(Need::Lists)?;
    let r = body(b)?;
    let req = Authorize {
        cidr: &r.cidr,
        label: r.label,
        source: "manual",
        key_id: None,
        share: r.share,
    };
    Ok((
        StatusCode::CREATED,
        Json(d.authorize(&account, req, &cx.caller.actor).await?),
    ))
}

async fn unauthorize(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    q: Q<api::CidrQuery>,
) -> ApiResult<AuthorizedRecord> {
    let account = cx.account()?;
    cx.require(Need::Lists)?;
    let q = query(q)?;
    Ok(Json(
        d.unauthorize(&account, &q.cidr, &cx.caller.actor).await?,
    ))
}

async fn list_unauthorized(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
) -> ApiResult<api::UnauthorizedList> {
    let account = cx.account()?;
    cx.require(Need::Read)?;
    Ok(Json(api::UnauthorizedList {
        unauthorized: d.list_unauthorized(&account)?,
    }))
}

async fn deny(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    b: Body<api::Deny>,
) -> ApiResult<api::DenyOutcome> {
    let account = cx.account()?;
    let r = body(b)?;
    // The drop list is installation-wide: one account must not drop a
    // source for every other.
    if r.drop {
        cx.require(Need::Operator)?;
    }
    if r.rotate_key {
        cx.require(Need::Keys)?;
    }
    cx.require(Need::Lists)?;
    let req = DenyRequest {
        addr: r.addr,
        drop: r.drop,
        ttl: r.ttl,
        rotate_key: r.rotate_key,
    };
    Ok(Json(d.deny(&account, req, &cx.caller.actor).await?))
}

async fn blocking(State(d): State<Arc<Daemon>>, Extension(cx): Cx) -> ApiResult<api::Blocking> {
    let account = cx.account()?;
    cx.require(Need::Read)?;
    Ok(Json(d.blocking(&account)?))
}

async fn set_api(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    b: Body<api::SetMode>,
) -> ApiResult<BlockingState> {
    let account = cx.account()?;
    cx.require(Need::Lists)?;
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
        d.set_api_blocking(&account, mode, r.force, &cx.caller.actor)
            .await?,
    ))
}

async fn set_smtp(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    b: Body<api::SetMode>,
) -> ApiResult<BlockingState> {
    let account = cx.account()?;
    cx.require(Need::Lists)?;
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
        d.set_smtp_blocking(&account, mode, r.force, &cx.caller.actor)
            .await?,
    ))
}

async fn impact(State(d): State<Arc<Daemon>>, Extension(cx): Cx) -> ApiResult<api::Impact> {
    let account = cx.account()?;
    cx.require(Need::Read)?;
    Ok(Json(api::Impact {
        would_refuse: d
            .activation_impact(&account)?
            .into_iter()
            .map(|(addr, key_id)| api::ImpactEntry { addr, key_id })
            .collect(),
    }))
}

#[cfg(test)]
mod role_table;
