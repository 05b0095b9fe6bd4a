//! Where an account's notifications go, over the admin API.

use std::sync::Arc;

use axum::{Extension, Json, extract::State, http::StatusCode};

use super::{ApiError, ApiResult, Body, Cx, Q, body, query};
use crate::{api, daemon::Daemon, policy::Need};

pub(super) async fn show(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
) -> ApiResult<api::NotifySettings> {
    let account = cx.account()?;
    cx.require(Need::Read)?;
    Ok(Json(d.notify_settings(&account)?))
}

pub(super) async fn set_emails(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    b: Body<api::SetEmails>,
) -> ApiResult<api::NotifySettings> {
    let account = cx.account()?;
    cx.require(Need::Keys)?;
    let r = body(b)?;
    Ok(Json(
        d.set_emails(&account, r.emails, &cx.caller.actor).await?,
    ))
}

pub(super) async fn add_webhook(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    b: Body<api::NewWebhook>,
) -> Result<(StatusCode, Json<api::WebhookView>), ApiError> {
    let account = cx.account()?;
    cx.require(Need::Keys)?;
    let r = body(b)?;
    Ok((
        StatusCode::CREATED,
        Json(d.add_webhook(&account, r, &cx.caller)?),
    ))
}

pub(super) async fn remove_webhook(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    q: Q<api::WebhookQuery>,
) -> ApiResult<api::NotifySettings> {
    let account = cx.account()?;
    cx.require(Need::Keys)?;
    let q = query(q)?;
    d.remove_webhook(&account, &q.url, &cx.caller.actor)?;
    Ok(Json(d.notify_settings(&account)?))
}
