//! Settings › Developer › API keys: the list, create (the secret shown
//! once), a key's page with its allowlist editor, rotate with a grace
//! period, revoke with a confirmation.

use axum::{
    Form,
    extract::{Path, State},
    http::{HeaderMap, Method},
    response::{IntoResponse, Redirect, Response},
};
use maud::{Markup, html};
use serde::Deserialize;

use super::{C, Session, client::query, layout, signin::encode_segment};
use crate::{
    api::{self, KeyView},
    policy::{MAX_ALLOW_ENTRIES, Need},
};

fn status_words(k: &KeyView) -> String {
    format!("{:?}", k.status).to_lowercase()
}

pub async fn page(State(c): C, headers: HeaderMap) -> Response {
    let (id, s) = match c.session(&headers) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let title = "API keys";
    let keys = match c.api.get::<api::KeyList>(&s, "/v1/keys", "").await {
        Ok(l) => l.keys,
        Err(e) => return c.failed(&id, &s, title, e),
    };
    layout::page(
        &s,
        title,
        html! {
            @if s.may(Need::Keys) {
                p { a class="button" href="/console/keys/new" { "Create a key" } }
            }
            @if keys.is_empty() {
                p { "No key yet." }
            } @else {
                table {
                    thead { tr {
                        th scope="col" { "Name" } th scope="col" { "Id" } th scope="col" { "Scopes" }
                        th scope="col" { "Status" } th scope="col" { "Allowlist" }
                        th scope="col" { "Last used" } th scope="col" { "Requests today" }
                    } }
                    tbody {
                        @for k in &keys {
                            tr {
                                td { a href=(format!("/console/keys/{}", encode_segment(&k.id))) { (k.name) } }
                                td class="mono" { (k.id) }
                                td { (scopes(k)) }
                                td { (status_words(k)) }
                                td { @if k.allow.is_empty() { "any address" } @else { (k.allow.len()) " entries" } }
                                td { (layout::maybe_time(k.last_used_at)) }
                                td class="num" { (k.requests_today) }
                            }
                        }
                    }
                }
            }
        },
    )
    .into_response()
}

fn scopes(k: &KeyView) -> String {
    if k.scopes.is_empty() {
        return "full".into();
    }
    k.scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

const SCOPES: &[(&str, &str)] = &[
    ("full", "Full access"),
    ("read", "Read"),
    ("send", "Send"),
    ("contacts", "Contacts"),
];

pub async fn new_page(State(c): C, headers: HeaderMap) -> Response {
    let (_, s) = match c.session(&headers) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    layout::page(&s, "Create a key", new_form(&s)).into_response()
}

fn new_form(s: &Session) -> Markup {
    html! {
        form method="post" action="/console/keys" class="card grid" {
            (layout::csrf(s))
            label for="name" { "Name" }
            input id="name" name="name" required maxlength="100";
            label for="description" { "Description" }
            input id="description" name="description" maxlength="500";
            fieldset {
                legend { "Scopes (none: full access)" }
                @for (v, words) in SCOPES {
                    label class="check" { input type="checkbox" name="scope" value=(v); " " (words) }
                }
            }
            label for="allow" { "IP allowlist: one entry per line, an address or CIDR and an optional label (empty: any address; at most " (MAX_ALLOW_ENTRIES) ")" }
            textarea id="allow" name="allow" rows="5" cols="50" placeholder="203.0.113.0/24 office" {}
            label for="rate" { "Rate limit (like 100/minute; empty: none)" }
            input id="rate" name="rate" placeholder="100/minute";
            button type="submit" { "Create the key" }
        }
    }
}

/// The allowlist lines as the API takes them: `CIDR` or `CIDR=LABEL`.
fn allow_entries(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_once(char::is_whitespace) {
            Some((cidr, label)) => format!("{cidr}={}", label.trim()),
            None => l.to_string(),
        })
        .collect()
}

pub async fn create(
    State(c): C,
    headers: HeaderMap,
    Form(f): Form<Vec<(String, String)>>,
) -> Response {
    let field = |n: &str| {
        f.iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let (id, s) = match c.post(&headers, &field("csrf")) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let rate = field("rate");
    let body = api::NewKey {
        name: field("name").trim().to_string(),
        description: field("description").trim().to_string(),
        scopes: f
            .iter()
            .filter(|(k, _)| k == "scope")
            .map(|(_, v)| v.clone())
            .collect(),
        allow: allow_entries(&field("allow")),
        rate: Some(rate.trim().to_string()).filter(|r| !r.is_empty()),
    };
    match c
        .api
        .send::<KeyView, _>(&s, Method::POST, "/v1/keys", "", Some(&body))
        .await
    {
        Ok(k) => layout::page(
            &s,
            "Key created",
            html! {
                p class="flash ok" role="status" { "Created key " strong { (k.name) } " (" span class="mono" { (k.id) } ")." }
                @if let Some(secret) = &k.key { (layout::secret_once("The key", secret, "secret-new")) }
                p { "Send it as " code { "Authorization: Bearer <key>" } "." }
                p { a href=(format!("/console/keys/{}", encode_segment(&k.id))) { "Go to the key" } " · " a href="/console/keys" { "All keys" } }
            },
        )
        .into_response(),
        Err(e) if e.signed_out() => c.signed_out(&id),
        Err(e) => {
            let mut s = s;
            s.flash = Some(super::Flash { ok: false, text: e.message });
            (e.status, layout::page(&s, "Create a key", new_form(&s))).into_response()
        }
    }
}

pub async fn show(State(c): C, headers: HeaderMap, Path(kid): Path<String>) -> Response {
    let (id, s) = match c.session(&headers) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let path = format!("/v1/keys/{}", encode_segment(&kid));
    let k = match c.api.get::<KeyView>(&s, &path, "").await {
        Ok(k) => k,
        Err(e) => return c.failed(&id, &s, "API key", e),
    };
    layout::page(&s, &format!("Key {}", k.name), key_page(&s, &k)).into_response()
}

fn key_page(s: &Session, k: &KeyView) -> Markup {
    let base = format!("/console/keys/{}", encode_segment(&k.id));
    let edit = s.may(Need::Keys) && status_words(k) != "revoked";
    html! {
        dl class="facts" {
            dt { "Id" } dd class="mono" { (k.id) }
            dt { "Description" } dd { @if k.description.is_empty() { "—" } @else { (k.description) } }
            dt { "Scopes" } dd { (scopes(k)) }
            dt { "Status" } dd { (status_words(k))
                @if let Some(t) = k.previous_secret_expires_at { " — the previous secret works until " (layout::time(t)) } }
            dt { "Rate limit" } dd { (k.rate.as_deref().unwrap_or("none")) }
            dt { "Created" } dd { (layout::time(k.created_at)) }
            dt { "Last used" } dd { (layout::maybe_time(k.last_used_at)) }
            dt { "Requests today" } dd { (k.requests_today) }
        }
        section aria-labelledby="allow-h" {
            h2 id="allow-h" { "IP allowlist (" (k.allow.len()) " of " (MAX_ALLOW_ENTRIES) ")" }
            @if k.allow.is_empty() {
                p id="any-address" { "Empty: the key works from any address (the account's authorized list still applies)." }
            } @else {
                table {
                    thead { tr { th scope="col" { "Entry" } th scope="col" { "Label" } @if edit { th scope="col" { span class="visually-hidden" { "Actions" } } } } }
                    tbody {
                        @for a in &k.allow {
                            tr {
                                td class="mono" { (a.cidr) }
                                td { (a.label) }
                                @if edit {
                                    td {
                                        form method="post" action=(format!("{base}/disallow")) class="inline" {
                                            (layout::csrf(s))
                                            input type="hidden" name="cidr" value=(a.cidr);
                                            button type="submit" class="danger" aria-label=(format!("Remove {}", a.cidr)) { "Remove" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if edit && k.allow.len() < MAX_ALLOW_ENTRIES {
                form method="post" action=(format!("{base}/allow")) class="row" {
                    (layout::csrf(s))
                    label for="allow-cidr" { "Address or CIDR" }
                    input id="allow-cidr" name="cidr" required placeholder="203.0.113.0/24";
                    label for="allow-label" { "Label" }
                    input id="allow-label" name="label" maxlength="200";
                    button type="submit" { "Add to the allowlist" }
                }
            }
        }
        @if edit {
            section aria-labelledby="rotate-h" {
                h2 id="rotate-h" { "Rotate" }
                form method="post" action=(format!("{base}/rotate")) class="row" {
                    (layout::csrf(s))
                    label for="grace" { "The old secret keeps working for" }
                    select id="grace" name="grace" {
                        option value="0" { "no time (stops now)" }
                        option value="1h" { "1 hour" }
                        option value="24h" selected { "24 hours" }
                        option value="48h" { "48 hours" }
                    }
                    button type="submit" { "Rotate the secret" }
                }
            }
            section aria-labelledby="revoke-h" {
                h2 id="revoke-h" { "Revoke" }
                p { a class="button danger" href=(format!("{base}/revoke")) { "Revoke this key" } }
            }
        }
        p { a href="/console/keys" { "All keys" } }
    }
}

#[derive(Deserialize)]
pub struct AllowForm {
    #[serde(default)]
    csrf: String,
    cidr: String,
    #[serde(default)]
    label: String,
}

pub async fn allow(
    State(c): C,
    headers: HeaderMap,
    Path(kid): Path<String>,
    Form(f): Form<AllowForm>,
) -> Response {
    let (id, s) = match c.post(&headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let base = format!("/v1/keys/{}/allow", encode_segment(&kid));
    let body = api::AllowEntry {
        cidr: f.cidr.trim().to_string(),
        label: Some(f.label.trim().to_string()).filter(|l| !l.is_empty()),
    };
    let r = c
        .api
        .send::<KeyView, _>(&s, Method::POST, &base, "", Some(&body))
        .await;
    let back = format!("/console/keys/{}", encode_segment(&kid));
    c.done(
        &id,
        r,
        |_| format!("Added {} to the key's allowlist.", f.cidr.trim()),
        &back,
    )
}

pub async fn disallow(
    State(c): C,
    headers: HeaderMap,
    Path(kid): Path<String>,
    Form(f): Form<AllowForm>,
) -> Response {
    let (id, s) = match c.post(&headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let base = format!("/v1/keys/{}/allow", encode_segment(&kid));
    let q = query(&api::CidrQuery {
        cidr: f.cidr.clone(),
    });
    let r = c
        .api
        .send::<KeyView, ()>(&s, Method::DELETE, &base, &q, None)
        .await;
    let back = format!("/console/keys/{}", encode_segment(&kid));
    c.done(
        &id,
        r,
        |k| {
            if k.allow.is_empty() {
                format!(
                    "Removed {}; the allowlist is empty, so the key works from any address.",
                    f.cidr
                )
            } else {
                format!("Removed {} from the key's allowlist.", f.cidr)
            }
        },
        &back,
    )
}

#[derive(Deserialize)]
pub struct RotateForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    grace: String,
}

pub async fn rotate(
    State(c): C,
    headers: HeaderMap,
    Path(kid): Path<String>,
    Form(f): Form<RotateForm>,
) -> Response {
    let (id, s) = match c.post(&headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let path = format!("/v1/keys/{}/rotate", encode_segment(&kid));
    let body = api::RotateKey {
        grace: Some(f.grace).filter(|g| !g.is_empty()),
    };
    match c.api.send::<KeyView, _>(&s, Method::POST, &path, "", Some(&body)).await {
        Ok(k) => layout::page(
            &s,
            "Key rotated",
            html! {
                p class="flash ok" role="status" { "Rotated key " strong { (k.name) } "."
                    @if let Some(t) = k.previous_secret_expires_at { " The previous secret works until " (layout::time(t)) "." } }
                @if let Some(secret) = &k.key { (layout::secret_once("The new key", secret, "secret-new")) }
                p { a href=(format!("/console/keys/{}", encode_segment(&k.id))) { "Back to the key" } }
            },
        )
        .into_response(),
        r => {
            let back = format!("/console/keys/{}", encode_segment(&kid));
            c.done(&id, r, |_| String::new(), &back)
        }
    }
}

pub async fn confirm_revoke(State(c): C, headers: HeaderMap, Path(kid): Path<String>) -> Response {
    let (_, s) = match c.session(&headers) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let base = format!("/console/keys/{}", encode_segment(&kid));
    layout::page(
        &s,
        "Revoke a key",
        html! {
            p { "Revoke key " strong class="mono" { (kid) } "? Every call with it is refused from now on and its open connections are cut. This cannot be undone." }
            form method="post" action=(format!("{base}/revoke")) class="actions" {
                (layout::csrf(&s))
                button type="submit" class="danger" { "Revoke the key" }
                a class="button" href=(base) { "Cancel" }
            }
        },
    )
    .into_response()
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

pub async fn revoke(
    State(c): C,
    headers: HeaderMap,
    Path(kid): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    let (id, s) = match c.post(&headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let path = format!("/v1/keys/{}/revoke", encode_segment(&kid));
    let r = c
        .api
        .send::<KeyView, ()>(&s, Method::POST, &path, "", None)
        .await;
    match r {
        Ok(k) => {
            c.flash(&id, true, format!("Revoked key {} ({}).", k.name, k.id));
            Redirect::to("/console/keys").into_response()
        }
        r => c.done(
            &id,
            r,
            |_| String::new(),
            &format!("/console/keys/{}", encode_segment(&kid)),
        ),
    }
}
