//! Signing in with an admin token, signing out, and an operator's choice of
//! account.

use axum::{
    Form,
    extract::{Query, State},
    http::{HeaderMap, header},
    response::{IntoResponse, Redirect, Response},
};
use maud::html;
use serde::Deserialize;

use super::{
    C, forbidden, layout, same_origin,
    session::{self, COOKIE, SIGNIN_COOKIE},
};

#[derive(Deserialize, Default)]
pub struct SigninQuery {
    #[serde(default)]
    expired: Option<String>,
}

pub async fn page(State(c): C, headers: HeaderMap, q: Query<SigninQuery>) -> Response {
    if c.session(&headers).is_ok() {
        return Redirect::to("/console/ips").into_response();
    }
    signin_form(q.expired.is_some(), None)
}

fn signin_form(expired: bool, error: Option<&str>) -> Response {
    let nonce = session::random_token();
    let body = layout::bare(
        "Sign in",
        html! {
            @if expired {
                p class="flash err" role="alert" { "Your session ended. Sign in again." }
            }
            @if let Some(e) = error {
                p class="flash err" role="alert" { (e) }
            }
            p { "Sign in with an admin token. An operator makes one with "
                code { "allowlistctl tokens create --role owner" } " (or "
                code { "--operator" } "); it is shown once when made." }
            form method="post" action="/console/signin" class="card" {
                input type="hidden" name="csrf" value=(nonce);
                label for="token" { "Admin token" }
                input id="token" name="token" type="password" autocomplete="off" required size="60";
                button type="submit" { "Sign in" }
            }
        },
    );
    let mut resp = body.into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        session::set_cookie(SIGNIN_COOKIE, &nonce, Some(600)),
    );
    resp
}

#[derive(Deserialize)]
pub struct SigninForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    token: String,
}

pub async fn submit(State(c): C, headers: HeaderMap, Form(f): Form<SigninForm>) -> Response {
    let planted = session::cookie(&headers, SIGNIN_COOKIE);
    let why = if !same_origin(&headers) {
        Some("sent from another origin")
    } else if planted.is_none() {
        Some("no sign-in cookie")
    } else if !planted.is_some_and(|p| session::same(p, &f.csrf)) {
        Some("the form's token is not the cookie's")
    } else {
        None
    };
    if let Some(why) = why {
        tracing::info!(why, "console sign-in form refused");
        return forbidden(
            "This sign-in form is old or did not come from this console. Reload it and try again.",
        );
    }
    let token = f.token.trim().to_string();
    // Tokens are `alt_<hex>_<hex>`: anything else cannot be one, and must
    // not reach a header.
    let shaped = !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !shaped {
        return signin_form(
            false,
            Some(
                "That token is not valid: unknown, revoked or expired. Ask an operator for a new one.",
            ),
        );
    }
    let who = match c.api.whoami(&token).await {
        Ok(w) => w,
        Err(e) if e.signed_out() => {
            tracing::info!("console sign-in refused: token not valid");
            return signin_form(
                false,
                Some(
                    "That token is not valid: unknown, revoked or expired. Ask an operator for a new one.",
                ),
            );
        }
        Err(e) => return signin_form(false, Some(&e.message)),
    };
    tracing::info!(actor = %who.actor, "console sign-in");
    let id = c.sessions.open(token, who, c.now_ms(), c.lifetimes());
    let mut resp = Redirect::to("/console/ips").into_response();
    let h = resp.headers_mut();
    h.append(header::SET_COOKIE, session::set_cookie(COOKIE, &id, None));
    h.append(
        header::SET_COOKIE,
        session::set_cookie(SIGNIN_COOKIE, "", Some(0)),
    );
    resp
}

#[derive(Deserialize)]
pub struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

pub async fn signout(State(c): C, headers: HeaderMap, Form(f): Form<CsrfOnly>) -> Response {
    let (id, _) = match c.post(&headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    c.sessions.close(&id);
    let mut resp = Redirect::to("/console/signin").into_response();
    resp.headers_mut()
        .append(header::SET_COOKIE, session::set_cookie(COOKIE, "", Some(0)));
    resp
}

#[derive(Deserialize)]
pub struct SwitchForm {
    #[serde(default)]
    csrf: String,
    account: String,
}

/// An operator picks the account the pages act on; the API confirms it
/// exists (and refuses an account token, which has its own).
pub async fn switch_account(
    State(c): C,
    headers: HeaderMap,
    Form(f): Form<SwitchForm>,
) -> Response {
    let (id, mut s) = match c.post(&headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let name = f.account.trim().to_string();
    if !s.operator() {
        return forbidden("Only operators choose the account; an account token has its own.");
    }
    s.account = name.clone();
    let path = format!("/v1/accounts/{}", encode_segment(&name));
    let r = c.api.get::<crate::api::AccountView>(&s, &path, "").await;
    if r.is_ok() {
        c.sessions.update(&id, |s| s.account = name.clone());
    }
    c.done(
        &id,
        r,
        |a| format!("Now acting on account {}.", a.record.name),
        "/console/ips",
    )
}

/// One path segment, percent-encoded (names and ids are checked by the
/// API; this only keeps a stray `/` or `?` from changing the route).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
