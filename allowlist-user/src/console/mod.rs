//! The web console at `/console/` on the admin TLS listener: server-rendered
//! pages (maud) with a little progressive JavaScript (copy buttons), served
//! from the binary. It acts only through the admin API, called in-process
//! with the session's token ([`client::Api`]), so the API decides what each
//! role may do and the pages only leave out what it would refuse.
//!
//! Every page is sent with a strict CSP (no inline script, no outside
//! asset), `no-store`, `DENY` framing and no referrer; every form carries
//! the session's CSRF token and is refused without it.

use std::sync::Arc;

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use maud::html;

mod chart;
mod client;
mod ips;
mod keys;
mod layout;
mod logs;
mod operators;
mod session;
mod signin;
mod unauthorized;

pub use client::Api;
use client::Refusal;
use session::{COOKIE, Flash, Lifetimes, Session, Sessions};

use crate::daemon::Daemon;

/// What every console handler reads.
pub struct Console {
    api: Api,
    sessions: Sessions,
    daemon: Arc<Daemon>,
}

type C = State<Arc<Console>>;

/// The admin API's token router `api` with the console beside it at
/// `/console/` (outside the API's bearer-token layer: the console's pages
/// are reached with a session cookie, and call `api` with its token).
pub fn mount(daemon: Arc<Daemon>, api: Router) -> Router {
    api.clone()
        .route("/console/", get(|| async { Redirect::to("/console/ips") }))
        .nest("/console", router(daemon, api))
}

fn router(daemon: Arc<Daemon>, api: Router) -> Router {
    let c = Arc::new(Console {
        api: Api::new(api),
        sessions: Sessions::default(),
        daemon,
    });
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/ips") }))
        .route("/assets/console.css", get(css))
        .route("/assets/console.js", get(js))
        .route("/signin", get(signin::page).post(signin::submit))
        .route("/signout", post(signin::signout))
        .route("/account", post(signin::switch_account))
        .route("/ips", get(ips::page))
        .route("/ips/add", post(ips::add))
        .route("/ips/delete", get(ips::confirm_delete).post(ips::delete))
        .route("/blocking/{service}", get(ips::confirm_mode).post(ips::set_mode))
        .route("/unauthorized", get(unauthorized::page))
        .route("/unauthorized/act", post(unauthorized::act))
        .route("/keys", get(keys::page).post(keys::create))
        .route("/keys/new", get(keys::new_page))
        .route("/keys/{id}", get(keys::show))
        .route("/keys/{id}/allow", post(keys::allow))
        .route("/keys/{id}/disallow", post(keys::disallow))
        .route("/keys/{id}/rotate", post(keys::rotate))
        .route("/keys/{id}/revoke", get(keys::confirm_revoke).post(keys::revoke))
        .route("/logs", get(logs::page))
        .route("/logs.csv", get(logs::csv))
        .route("/accounts", get(operators::accounts).post(operators::create_account))
        .route(
            "/accounts/{name}/remove",
            get(operators::confirm_remove_account).post(operators::remove_account),
        )
        .route("/tokens", get(operators::tokens).post(operators::create_token))
        .route("/tokens/{id}/revoke", post(operators::revoke_token))
        .route("/drops", get(operators::drops).post(operators::add_drop))
        .route("/drops/remove", post(operators::remove_drop))
        .route("/counters", get(operators::counters))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                layout::bare("Not found", html! { p { "No such console page. " a href="/console/" { "Go to the console" } } }),
            )
        })
        .layer(axum::middleware::from_fn(headers))
        .with_state(c)
}

/// The headers every console answer carries.
async fn headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (
            header::HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    resp
}

async fn css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/console.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/console.js"),
    )
        .into_response()
}

impl Console {
    fn now_ms(&self) -> i64 {
        self.daemon.clock.now_ms()
    }

    fn lifetimes(&self) -> Lifetimes {
        let a = &self.daemon.config.admin;
        Lifetimes {
            idle_ms: i64::from(a.console_idle_mins) * 60_000,
            max_ms: i64::from(a.console_session_hours) * 3_600_000,
        }
    }

    /// The signed-in session, or the sign-in page.
    fn session(&self, headers: &HeaderMap) -> Result<(String, Session), Denied> {
        let found = session::cookie(headers, COOKIE).and_then(|id| {
            self.sessions
                .get(id, self.now_ms(), self.lifetimes())
                .map(|s| (id.to_string(), s))
        });
        found.ok_or(Denied::SignIn)
    }

    /// The session of a form post: signed in, the form's CSRF token
    /// matching the session's, and sent from this console's own pages.
    fn post(&self, headers: &HeaderMap, csrf: &str) -> Result<(String, Session), Denied> {
        if !same_origin(headers) {
            return Err(Denied::Forbidden(
                "This form was sent from another site, so it was refused.",
            ));
        }
        let (id, s) = self.session(headers)?;
        if !session::same(csrf, &s.csrf) {
            return Err(Denied::Forbidden(
                "This form is missing its security token or has an old one. Reload the page and try again.",
            ));
        }
        Ok((id, s))
    }

    fn flash(&self, id: &str, ok: bool, text: impl Into<String>) {
        let text = text.into();
        self.sessions
            .update(id, |s| s.flash = Some(Flash { ok, text }));
    }

    /// After a form: back to `to` with the API's answer as a message; a
    /// token that stopped working signs the session out.
    fn done<T>(
        &self,
        id: &str,
        r: Result<T, Refusal>,
        ok: impl FnOnce(T) -> String,
        to: &str,
    ) -> Response {
        match r {
            Ok(v) => self.flash(id, true, ok(v)),
            Err(e) if e.signed_out() => return self.signed_out(id),
            Err(e) => self.flash(id, false, e.message),
        }
        Redirect::to(to).into_response()
    }

    fn signed_out(&self, id: &str) -> Response {
        self.sessions.close(id);
        Redirect::to("/console/signin?expired=1").into_response()
    }

    /// A page whose API read failed: the message in place of the content.
    fn failed(&self, id: &str, s: &Session, title: &str, e: Refusal) -> Response {
        if e.signed_out() {
            return self.signed_out(id);
        }
        let status = e.status;
        (
            status,
            layout::page(
                s,
                title,
                html! { p class="flash err" role="alert" { (e.message) } },
            ),
        )
            .into_response()
    }
}

/// Why a request gets no page: not signed in, or a refused form.
enum Denied {
    SignIn,
    Forbidden(&'static str),
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Denied::SignIn => Redirect::to("/console/signin").into_response(),
            Denied::Forbidden(why) => forbidden(why),
        }
    }
}

/// Whether a post comes from this console's own pages. `Sec-Fetch-Site`
/// (sent by every current browser) decides when present; otherwise a real
/// `Origin` must be this host. Browsers send `Origin: null` on our pages'
/// own posts (the pages' `Referrer-Policy: no-referrer` asks for that), so
/// `null` alone proves nothing and is refused without `Sec-Fetch-Site`.
/// SameSite=Strict already keeps the cookie off cross-site posts and the
/// CSRF token is checked after this; this refuses them even without both.
fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return site.as_bytes() == b"same-origin";
    }
    match (headers.get(header::ORIGIN), headers.get(header::HOST)) {
        (None, _) => true,
        (Some(o), Some(h)) => {
            o.to_str().ok().and_then(|o| o.strip_prefix("https://")) == h.to_str().ok()
        }
        (Some(_), None) => false,
    }
}

fn forbidden(text: &str) -> Response {
    (
        StatusCode::FORBIDDEN,
        layout::bare(
            "Refused",
            html! { p class="flash err" role="alert" { (text) } p { a href="/console/" { "Back to the console" } } },
        ),
    )
        .into_response()
}
