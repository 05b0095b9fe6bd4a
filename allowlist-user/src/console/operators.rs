//! What operators see besides an account's pages: accounts, tokens (also
//! an owner's, for their account), the kernel drop list, counters and map
//! fill levels.

use axum::{
    Form,
    extract::{Path, Query, State},
    http::{HeaderMap, Method},
    response::{IntoResponse, Response},
};
use maud::{Markup, html};
use serde::Deserialize;

use super::{C, client::query, layout, signin::encode_segment};
use crate::{api, policy::Need};

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

pub async fn accounts(State(c): C, headers: HeaderMap) -> Response {
    let (id, s) = match c.session(&headers) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let title = "Accounts";
    let list = match c.api.get::<api::AccountList>(&s, "/v1/accounts", "").await {
        Ok(l) => l.accounts,
        Err(e) => return c.failed(&id, &s, title, e),
    };
    layout::page(
        &s,
        title,
        html! {
            table {
                thead { tr {
                    th scope="col" { "Name" } th scope="col" { "Organization" } th scope="col" { "API blocking" }
                    th scope="col" { "SMTP blocking" } th scope="col" { "Keys (active)" } th scope="col" { "Authorized" }
                    th scope="col" { "Created" } th scope="col" { span class="visually-hidden" { "Actions" } }
                } }
                tbody {
                    @for a in &list {
                        tr {
                            td { (a.record.name) }
                            td { (a.record.parent.as_deref().unwrap_or("—")) }
                            td { (format!("{:?}", a.api_in_force).to_lowercase()) }
                            td { (format!("{:?}", a.smtp_in_force).to_lowercase()) }
                            td class="num" { (a.keys) " (" (a.active_keys) ")" }
                            td class="num" { (a.authorized) }
                            td { (layout::time(a.record.created_at)) }
                            td {
                                @if a.record.name != crate::policy::DEFAULT_ACCOUNT {
                                    a class="button danger" href=(format!("/console/accounts/{}/remove", encode_segment(&a.record.name)))
                                        aria-label=(format!("Remove {}", a.record.name)) { "Remove" }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Create an account" }
            form method="post" action="/console/accounts" class="card grid" {
                (layout::csrf(&s))
                label for="a-name" { "Name (a-z, 0-9, -)" } input id="a-name" name="name" required pattern="[a-z0-9][a-z0-9-]{0,62}";
                label for="a-parent" { "Organization (optional)" } input id="a-parent" name="parent";
                label for="a-emails" { "Notification e-mails (comma-separated)" } input id="a-emails" name="emails" type="text";
                button type="submit" { "Create" }
            }
        },
    )
    .into_response()
}

#[derive(Deserialize)]
pub struct AccountForm {
    #[serde(default)]
    csrf: String,
    name: String,
    #[serde(default)]
    parent: String,
    #[serde(default)]
    emails: String,
}

pub async fn create_account(
    State(c): C,
    headers: HeaderMap,
    Form(f): Form<AccountForm>,
) -> Response {
    let (id, s) = match c.post(&headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let body = api::NewAccount {
        name: f.name.trim().to_string(),
        parent: Some(f.parent.trim().to_string()).filter(|p| !p.is_empty()),
        emails: f
            .emails
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect(),
    };
    let r = c
        .api
        .send::<api::AccountView, _>(&s, Method::POST, "/v1/accounts", "", Some(&body))
        .await;
    c.done(
        &id,
        r,
        |a| format!("Created account {}.", a.record.name),
        "/console/accounts",
    )
}

pub async fn confirm_remove_account(
    State(c): C,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let (_, s) = match c.session(&headers) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    layout::page(
        &s,
        "Remove an account",
        html! {
            p { "Remove account " strong { (name) } "? Its keys are revoked (their connections cut) and its lists deleted." }
            form method="post" action=(format!("/console/accounts/{}/remove", encode_segment(&name))) class="actions" {
                (layout::csrf(&s))
                label class="check" { input type="checkbox" name="force" value="true"; " Even if it has active keys" }
                button type="submit" class="danger" { "Remove " (name) }
                a class="button" href="/console/accounts" { "Cancel" }
            }
        },
    )
    .into_response()
}

#[derive(Deserialize)]
pub struct RemoveForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    force: bool,
}

pub async fn remove_account(
    State(c): C,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(f): Form<RemoveForm>,
) -> Response {
    let (id, s) = match c.post(&headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let path = format!("/v1/accounts/{}", encode_segment(&name));
    let q = query(&api::RemoveQuery { force: f.force });
    let r = c
        .api
        .send::<api::AccountRemoved, ()>(&s, Method::DELETE, &path, &q, None)
        .await;
    c.done(
        &id,
        r,
        |a| {
            format!(
                "Removed account {} ({} keys revoked).",
                a.name,
                a.keys_revoked.len()
            )
        },
        "/console/accounts",
    )
}

pub async fn tokens(State(c): C, headers: HeaderMap) -> Response {
    let (id, s) = match c.session(&headers) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let title = "Tokens";
    let list = match c.api.get::<api::TokenList>(&s, "/v1/tokens", "").await {
        Ok(l) => l.tokens,
        Err(e) => return c.failed(&id, &s, title, e),
    };
    layout::page(&s, title, tokens_body(&s, &list, None)).into_response()
}

fn tokens_body(
    s: &super::Session,
    list: &[api::TokenView],
    made: Option<&api::TokenView>,
) -> Markup {
    html! {
        @if let Some(t) = made {
            p class="flash ok" role="status" { "Created token " span class="mono" { (t.id) } "." }
            @if let Some(secret) = &t.token { (layout::secret_once("The token", secret, "secret-token")) }
        }
        table {
            thead { tr {
                th scope="col" { "Id" } th scope="col" { "Name" } th scope="col" { "Account" } th scope="col" { "Role" }
                th scope="col" { "Created" } th scope="col" { "Expires" } th scope="col" { "Status" }
                th scope="col" { span class="visually-hidden" { "Actions" } }
            } }
            tbody {
                @for t in list {
                    tr {
                        td class="mono" { (t.id) }
                        td { (t.name) }
                        td { (t.account.as_deref().unwrap_or("(all: operator)")) }
                        td { (format!("{:?}", t.role).to_lowercase()) }
                        td { (layout::time(t.created_at)) }
                        td { (layout::maybe_time(t.expires_at)) }
                        td { @if t.revoked_at.is_some() { "revoked" } @else { "active" } }
                        td {
                            @if t.revoked_at.is_none() {
                                form method="post" action=(format!("/console/tokens/{}/revoke", encode_segment(&t.id))) class="inline" {
                                    (layout::csrf(s))
                                    button type="submit" class="danger" aria-label=(format!("Revoke token {}", t.id)) { "Revoke" }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Create a token" }
        form method="post" action="/console/tokens" class="card grid" {
            (layout::csrf(s))
            label for="t-role" { "Role" }
            select id="t-role" name="role" {
                @if s.operator() { option value="operator" { "operator (every account)" } }
                option value="owner" { "owner of " (s.account) }
                option value="ips" { "authorized IPs of " (s.account) }
                option value="viewer" selected { "viewer of " (s.account) }
            }
            label for="t-name" { "Name" } input id="t-name" name="name";
            label for="t-expires" { "Expires after (like 30d; empty: never)" } input id="t-expires" name="expires";
            button type="submit" { "Create the token" }
        }
    }
}

#[derive(Deserialize)]
pub struct TokenForm {
    #[serde(default)]
    csrf: String,
    role: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    expires: String,
}

pub async fn create_token(State(c): C, headers: HeaderMap, Form(f): Form<TokenForm>) -> Response {
    let (id, s) = match c.post(&headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let operator = f.role == "operator";
    let body = api::NewToken {
        operator,
        role: (!operator).then(|| f.role.clone()),
        name: Some(f.name.trim().to_string()).filter(|n| !n.is_empty()),
        expires: Some(f.expires.trim().to_string()).filter(|e| !e.is_empty()),
    };
    match c
        .api
        .send::<api::TokenView, _>(&s, Method::POST, "/v1/tokens", "", Some(&body))
        .await
    {
        Ok(t) => {
            let list = c
                .api
                .get::<api::TokenList>(&s, "/v1/tokens", "")
                .await
                .map(|l| l.tokens)
                .unwrap_or_default();
            layout::page(&s, "Tokens", tokens_body(&s, &list, Some(&t))).into_response()
        }
        r => c.done(&id, r, |_| String::new(), "/console/tokens"),
    }
}

pub async fn revoke_token(
    State(c): C,
    headers: HeaderMap,
    Path(tid): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    let (id, s) = match c.post(&headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let path = format!("/v1/tokens/{}/revoke", encode_segment(&tid));
    let r = c
        .api
        .send::<api::TokenView, _>(&s, Method::POST, &path, "", Some(&api::Empty {}))
        .await;
    c.done(
        &id,
        r,
        |t| format!("Revoked token {}.", t.id),
        "/console/tokens",
    )
}

pub async fn drops(State(c): C, headers: HeaderMap) -> Response {
    let (id, s) = match c.session(&headers) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let title = "Drop list";
    let list = match c.api.get::<api::DropList>(&s, "/v1/drop", "").await {
        Ok(l) => l.drops,
        Err(e) => return c.failed(&id, &s, title, e),
    };
    layout::page(
        &s,
        title,
        html! {
            p { "Sources dropped by the kernel (XDP) before any TCP or TLS work, for every account." }
            table {
                thead { tr {
                    th scope="col" { "Range" } th scope="col" { "Kind" } th scope="col" { "Reason" }
                    th scope="col" { "Added by" } th scope="col" { "Added" } th scope="col" { "Expires" }
                    th scope="col" { span class="visually-hidden" { "Actions" } }
                } }
                tbody {
                    @for d in &list {
                        tr {
                            td class="mono" { (d.record.cidr) }
                            td { (format!("{:?}", d.record.kind).to_lowercase()) }
                            td { (d.record.reason) }
                            td { (d.record.created_by) }
                            td { (layout::time(d.record.created_at)) }
                            td { (layout::maybe_time(d.record.expires_at)) }
                            td {
                                form method="post" action="/console/drops/remove" class="inline" {
                                    (layout::csrf(&s))
                                    input type="hidden" name="cidr" value=(d.record.cidr);
                                    button type="submit" class="danger" aria-label=(format!("Remove {}", d.record.cidr)) { "Remove" }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Drop a range" }
            form method="post" action="/console/drops" class="card grid" {
                (layout::csrf(&s))
                label for="d-cidr" { "Address or CIDR" } input id="d-cidr" name="cidr" required;
                label for="d-ttl" { "For (like 10m, 24h, 7d; empty: until removed)" } input id="d-ttl" name="ttl";
                label for="d-reason" { "Reason" } input id="d-reason" name="reason";
                button type="submit" class="danger" { "Drop" }
            }
        },
    )
    .into_response()
}

#[derive(Deserialize)]
pub struct DropForm {
    #[serde(default)]
    csrf: String,
    cidr: String,
    #[serde(default)]
    ttl: String,
    #[serde(default)]
    reason: String,
}

pub async fn add_drop(State(c): C, headers: HeaderMap, Form(f): Form<DropForm>) -> Response {
    let (id, s) = match c.post(&headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let body = api::AddDrop {
        cidr: f.cidr.trim().to_string(),
        ttl: Some(f.ttl.trim().to_string()).filter(|t| !t.is_empty()),
        reason: Some(f.reason.trim().to_string()).filter(|r| !r.is_empty()),
    };
    let r = c
        .api
        .send::<api::DropView, _>(&s, Method::POST, "/v1/drop", "", Some(&body))
        .await;
    c.done(
        &id,
        r,
        |d| format!("Dropping {}.", d.record.cidr),
        "/console/drops",
    )
}

pub async fn remove_drop(State(c): C, headers: HeaderMap, Form(f): Form<DropForm>) -> Response {
    let (id, s) = match c.post(&headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let q = query(&api::CidrQuery {
        cidr: f.cidr.clone(),
    });
    let r = c
        .api
        .send::<api::DropView, ()>(&s, Method::DELETE, "/v1/drop", &q, None)
        .await;
    c.done(
        &id,
        r,
        |d| format!("No longer dropping {}.", d.record.cidr),
        "/console/drops",
    )
}

/// Every figure of `allowlistctl stats`, flattened to rows, with the map
/// fill levels as percentages.
pub async fn counters(State(c): C, headers: HeaderMap, _q: Query<()>) -> Response {
    let (id, s) = match c.session(&headers) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let title = "Counters";
    if !s.may(Need::Operator) {
        return c.failed(
            &id,
            &s,
            title,
            super::client::Refusal {
                status: axum::http::StatusCode::FORBIDDEN,
                message: "Counters are for operators.".into(),
            },
        );
    }
    let stats = match c.api.get::<api::Stats>(&s, "/v1/stats", "").await {
        Ok(st) => st,
        Err(e) => return c.failed(&id, &s, title, e),
    };
    let mut rows = Vec::new();
    flatten(
        "",
        &serde_json::to_value(&stats).unwrap_or_default(),
        &mut rows,
    );
    let fill = stats.maps.as_ref().map(|m| {
        vec![
            ("Drop list", m.drop_rules, m.drop_capacity as usize),
            ("XDP guard (IPv4)", m.guard_v4, m.guard_capacity as usize),
            ("XDP guard (IPv6)", m.guard_v6, m.guard_capacity as usize),
        ]
    });
    layout::page(
        &s,
        title,
        html! {
            @if let Some(fill) = fill {
                h2 { "Map fill levels" }
                table {
                    thead { tr { th scope="col" { "Map" } th scope="col" { "Entries" } th scope="col" { "Capacity" } th scope="col" { "Full" } } }
                    tbody {
                        @for (name, n, cap) in fill {
                            tr {
                                td { (name) } td class="num" { (n) } td class="num" { (cap) }
                                td class="num" { (format!("{:.1} %", n as f64 * 100.0 / cap.max(1) as f64)) }
                            }
                        }
                    }
                }
            } @else {
                p { "The kernel is off (" code { "--no-kernel" } "): no map to show." }
            }
            p { "Console sessions open: " (c.sessions.len()) }
            h2 { "All counters" }
            table {
                thead { tr { th scope="col" { "Counter" } th scope="col" { "Value" } } }
                tbody { @for (k, v) in &rows { tr { td class="mono" { (k) } td class="num" { (v) } } } }
            }
        },
    )
    .into_response()
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        serde_json::Value::Null => out.push((prefix.to_string(), "—".into())),
        serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}
