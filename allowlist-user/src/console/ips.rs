//! Settings › Security › Authorized IPs: blocking per service (activation
//! shows its impact first), the authorized list with add and delete, and
//! "check an address".

use axum::{
    Form,
    extract::{Path, Query, State},
    http::{HeaderMap, Method},
    response::{IntoResponse, Response},
};
use maud::{Markup, html};
use serde::Deserialize;

use super::{C, client::query, layout};
use crate::{
    api::{self, AuthorizedView},
    policy::{ApiMode, Need, SmtpMode},
    store::BlockingState,
};

#[derive(Deserialize, Default)]
pub struct PageQuery {
    #[serde(default)]
    check: Option<String>,
    #[serde(default)]
    key: Option<String>,
}

pub async fn page(State(c): C, headers: HeaderMap, Query(q): Query<PageQuery>) -> Response {
    let (id, s) = match c.session(&headers) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let title = "Authorized IPs";
    let blocking = match c.api.get::<api::Blocking>(&s, "/v1/blocking", "").await {
        Ok(b) => b,
        Err(e) => return c.failed(&id, &s, title, e),
    };
    let list = match c.api.get::<api::AuthorizedList>(&s, "/v1/ips", "").await {
        Ok(l) => l.authorized,
        Err(e) => return c.failed(&id, &s, title, e),
    };
    let check = match q.check.as_deref().map(str::trim).filter(|a| !a.is_empty()) {
        None => None,
        Some(addr) => {
            let cq = api::CheckQuery {
                addr: addr.to_string(),
                key: q.key.clone().filter(|k| !k.trim().is_empty()),
            };
            Some(
                c.api
                    .get::<api::AddressCheck>(&s, "/v1/ips/check", &query(&cq))
                    .await,
            )
        }
    };
    let lists = s.may(Need::Lists);
    let content = html! {
        section aria-labelledby="blocking-h" {
            h2 id="blocking-h" { "Blocking" }
            div class="cards" {
                (service_card("api", "API", &blocking, lists))
                (service_card("smtp", "SMTP", &blocking, lists))
            }
        }
        section aria-labelledby="list-h" {
            h2 id="list-h" { "Authorized list (" (list.len()) ")" }
            @if list.is_empty() {
                p { "No address is authorized yet." }
            } @else {
                table {
                    thead { tr {
                        th scope="col" { "Address or range" } th scope="col" { "Type" }
                        th scope="col" { "Source" } th scope="col" { "Label" }
                        th scope="col" { "Added by" } th scope="col" { "Added" }
                        th scope="col" { "Last seen" } th scope="col" { "Hits" }
                        @if lists { th scope="col" { span class="visually-hidden" { "Actions" } } }
                    } }
                    tbody {
                        @for v in &list { (row(v, lists)) }
                    }
                }
            }
        }
        @if lists { (add_form(&s)) }
        section aria-labelledby="check-h" {
            h2 id="check-h" { "Check an address" }
            form method="get" action="/console/ips" class="row" {
                label for="check" { "Address" }
                input id="check" name="check" value=[q.check.as_deref()] placeholder="203.0.113.7" required;
                label for="check-key" { "Key id (optional)" }
                input id="check-key" name="key" value=[q.key.as_deref()] size="18";
                button type="submit" { "Check" }
            }
            @match &check {
                None => {}
                Some(Ok(r)) => { (check_result(r)) }
                Some(Err(e)) => { p class="flash err" role="alert" { (e.message) } }
            }
        }
    };
    layout::page(&s, title, content).into_response()
}

fn mode_words(api: &str) -> &'static str {
    match api {
        "active" => "Active",
        "learning" => "Learning",
        _ => "Inactive",
    }
}

fn service_card(service: &str, words: &str, b: &api::Blocking, lists: bool) -> Markup {
    let (mode, since, in_force) = match service {
        "api" => (
            mode_str_api(b.state.api),
            b.state.api_since,
            mode_str_api(b.api_in_force),
        ),
        _ => (
            mode_str_smtp(b.state.smtp),
            b.state.smtp_since,
            mode_str_smtp(b.smtp_in_force),
        ),
    };
    let enforced = b.enforced_by.is_some() && mode != in_force;
    html! {
        div class="card" id=(format!("blocking-{service}")) {
            h3 { (words) " blocking" }
            p { "Status: " strong class=(format!("mode {in_force}")) { (mode_words(in_force)) } }
            @if let Some(org) = &b.enforced_by {
                @if enforced { p { "Enforced by the organization " strong { (org) } "; it cannot be lowered here." } }
            }
            p class="muted" { "Since " (layout::time(since)) }
            @if service == "api" && in_force == "learning" {
                @if let Some(days) = b.activates_in_days {
                    p { "Blocking activates in " strong { (days) } " quiet " (if days == 1 { "day" } else { "days" })
                        " (after " (b.learning_days) " days without a newly learned address)." }
                }
            }
            @if lists && !enforced {
                div class="actions" {
                    @for (target, label) in transitions(service, in_force) {
                        a class="button" href=(format!("/console/blocking/{service}?mode={target}")) { (label) }
                    }
                }
            }
        }
    }
}

fn mode_str_api(m: ApiMode) -> &'static str {
    match m {
        ApiMode::Active => "active",
        ApiMode::Learning => "learning",
        ApiMode::Inactive => "inactive",
    }
}

fn mode_str_smtp(m: SmtpMode) -> &'static str {
    match m {
        SmtpMode::Active => "active",
        SmtpMode::Inactive => "inactive",
    }
}

fn transitions(service: &str, mode: &str) -> Vec<(&'static str, &'static str)> {
    match (service, mode) {
        ("api", "active") => vec![("inactive", "Deactivate")],
        ("api", "learning") => vec![("active", "Activate now"), ("inactive", "Deactivate")],
        ("api", _) => vec![("active", "Activate"), ("learning", "Start learning")],
        (_, "active") => vec![("inactive", "Deactivate")],
        _ => vec![("active", "Activate")],
    }
}

fn check_result(r: &api::AddressCheck) -> Markup {
    let line = |layer: &str, v: &api::Verdict| {
        html! {
            li {
                strong { (layer) ": " }
                @if v.admitted { span class="yes" { "admitted" } } @else { span class="no" { "refused" } }
                " — " (v.rule)
            }
        }
    };
    html! {
        div class="card" role="status" id="check-result" {
            p { "For " strong { (r.addr) } " in account " (r.account) ":" }
            ul {
                @if let Some(k) = &r.key { (line("Key allowlist", k)) }
                (line("API", &r.api))
                (line("SMTP", &r.smtp))
            }
        }
    }
}

fn add_form(s: &super::Session) -> Markup {
    html! {
        section aria-labelledby="add-h" {
            h2 id="add-h" { "Add an entry" }
            form method="post" action="/console/ips/add" class="card grid" {
                (layout::csrf(s))
                label for="kind" { "Type" }
                select id="kind" name="kind" {
                    option value="ipv4" { "IPv4 address" }
                    option value="ipv4-range" { "IPv4 range" }
                    option value="ipv6" { "IPv6 address" }
                    option value="ipv6-range" { "IPv6 range" }
                }
                label for="address" { "Address" }
                input id="address" name="address" required placeholder="203.0.113.7";
                label for="prefix" { "Range prefix length (ranges only)" }
                input id="prefix" name="prefix" inputmode="numeric" size="4" placeholder="24";
                label for="label" { "Label" }
                input id="label" name="label" maxlength="200" placeholder="office";
                button type="submit" { "Add" }
            }
        }
    }
}

fn kind_of(v: &AuthorizedView) -> &'static str {
    match (v.entry.cidr, v.entry.cidr.prefix_len()) {
        (ipnet::IpNet::V4(_), 32) => "IPv4",
        (ipnet::IpNet::V4(_), _) => "IPv4 range",
        (ipnet::IpNet::V6(_), 128) => "IPv6",
        (ipnet::IpNet::V6(_), _) => "IPv6 range",
    }
}

fn source_words(v: &AuthorizedView) -> String {
    if let Some(org) = &v.shared_by {
        return format!("shared by {org}");
    }
    match v.entry.source.as_str() {
        "learned" => format!("learned /{}", v.entry.cidr.prefix_len()),
        "unauthorized" => "from the unauthorized list".into(),
        s => s.to_string(),
    }
}

fn row(v: &AuthorizedView, lists: bool) -> Markup {
    let cidr = v.entry.cidr.to_string();
    html! {
        tr {
            td class="mono" { (cidr) }
            td { (kind_of(v)) }
            td { (source_words(v)) @if v.entry.shared && v.shared_by.is_none() { " (shared with sub-accounts)" } }
            td { (v.entry.label) }
            td { (v.entry.created_by) }
            td { (layout::time(v.entry.created_at)) }
            td { (layout::maybe_time(v.last_seen_at)) }
            td class="num" { (v.hits) }
            @if lists {
                td {
                    @if v.shared_by.is_none() {
                        a class="button danger" href=(format!("/console/ips/delete?cidr={}", super::signin::encode_segment(&cidr)))
                            aria-label=(format!("Delete {cidr}")) { "Delete" }
                    }
                }
            }
        }
    }
}

#[derive(Deserialize)]
pub struct AddForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    label: String,
}

/// The entry the form describes, checked against the type chosen; the
/// API then checks it as it checks `allowlistctl ips authorize`.
fn entry_of(f: &AddForm) -> Result<String, String> {
    let addr = f.address.trim();
    let v6 = f.kind.starts_with("ipv6");
    let range = f.kind.ends_with("-range");
    let family = if v6 { "IPv6" } else { "IPv4" };
    let parsed: std::net::IpAddr = addr.parse().map_err(|_| {
        format!(
            "{addr:?} is not an {family} address; write it like {}",
            if v6 { "2001:db8::7" } else { "203.0.113.7" }
        )
    })?;
    if parsed.is_ipv6() != v6 {
        return Err(format!(
            "{addr} is not an {family} address; choose the type that matches it"
        ));
    }
    if !range {
        return Ok(addr.to_string());
    }
    let prefix = f.prefix.trim();
    if prefix.is_empty() {
        return Err(format!(
            "an {family} range needs a prefix length, like {}",
            if v6 { "/48" } else { "/24" }
        ));
    }
    let prefix = prefix.trim_start_matches('/');
    Ok(format!("{addr}/{prefix}"))
}

pub async fn add(State(c): C, headers: HeaderMap, Form(f): Form<AddForm>) -> Response {
    let (id, s) = match c.post(&headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let cidr = match entry_of(&f) {
        Ok(e) => e,
        Err(m) => {
            c.flash(&id, false, m);
            return axum::response::Redirect::to("/console/ips").into_response();
        }
    };
    let label = Some(f.label.trim().to_string()).filter(|l| !l.is_empty());
    let body = api::Authorize {
        cidr,
        label,
        share: false,
    };
    let r = c
        .api
        .send::<crate::store::AuthorizedRecord, _>(&s, Method::POST, "/v1/ips", "", Some(&body))
        .await;
    c.done(
        &id,
        r,
        |e| format!("Authorized {}.", e.cidr),
        "/console/ips",
    )
}

#[derive(Deserialize)]
pub struct CidrParam {
    cidr: String,
}

pub async fn confirm_delete(
    State(c): C,
    headers: HeaderMap,
    Query(q): Query<CidrParam>,
) -> Response {
    let (_, s) = match c.session(&headers) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    layout::page(
        &s,
        "Delete an authorized entry",
        html! {
            p { "Delete " strong class="mono" { (q.cidr) } " from the authorized list of " (s.account) "?" }
            p { "Callers from it are refused at once where blocking is active, and their open connections are cut." }
            form method="post" action="/console/ips/delete" class="actions" {
                (layout::csrf(&s))
                input type="hidden" name="cidr" value=(q.cidr);
                button type="submit" class="danger" { "Delete " (q.cidr) }
                a class="button" href="/console/ips" { "Cancel" }
            }
        },
    )
    .into_response()
}

#[derive(Deserialize)]
pub struct CidrForm {
    #[serde(default)]
    csrf: String,
    cidr: String,
}

pub async fn delete(State(c): C, headers: HeaderMap, Form(f): Form<CidrForm>) -> Response {
    let (id, s) = match c.post(&headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let q = query(&api::CidrQuery {
        cidr: f.cidr.clone(),
    });
    let r = c
        .api
        .send::<crate::store::AuthorizedRecord, ()>(&s, Method::DELETE, "/v1/ips", &q, None)
        .await;
    c.done(&id, r, |e| format!("Deleted {}.", e.cidr), "/console/ips")
}

#[derive(Deserialize)]
pub struct ModeQuery {
    mode: String,
}

/// The confirmation of a mode change; activating API blocking first shows
/// the recent callers it would cut (the preview `allowlistctl blocking
/// activate` shows).
pub async fn confirm_mode(
    State(c): C,
    headers: HeaderMap,
    Path(service): Path<String>,
    Query(q): Query<ModeQuery>,
) -> Response {
    let (id, s) = match c.session(&headers) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    // Only the two services and three modes exist; the page's form action
    // is built from these fixed words alone, never from the request (a
    // path like `..%2Fkeys%2FID%2Frevoke` must not become the action).
    let service: &'static str = match service.as_str() {
        "api" => "api",
        "smtp" => "smtp",
        _ => return (axum::http::StatusCode::NOT_FOUND, "no such service").into_response(),
    };
    let mode: &'static str = match q.mode.as_str() {
        "active" => "active",
        "learning" if service == "api" => "learning",
        "inactive" => "inactive",
        _ => return (axum::http::StatusCode::BAD_REQUEST, "no such mode").into_response(),
    };
    let q = ModeQuery { mode: mode.into() };
    let title = "Change blocking";
    let words = if service == "smtp" { "SMTP" } else { "API" };
    let impact = if service == "api" && q.mode == "active" {
        match c
            .api
            .get::<api::Impact>(&s, "/v1/blocking/impact", "")
            .await
        {
            Ok(i) => Some(i.would_refuse),
            Err(e) => return c.failed(&id, &s, title, e),
        }
    } else {
        None
    };
    let verb = match q.mode.as_str() {
        "active" => "Activate",
        "learning" => "Start learning for",
        _ => "Deactivate",
    };
    layout::page(
        &s,
        title,
        html! {
            p { strong { (verb) " " (words) " blocking" } " for account " (s.account) "?" }
            @if let Some(cut) = &impact {
                @if cut.is_empty() {
                    p class="flash ok" role="status" id="impact" { "No recent caller would be refused: every address that used a key lately is authorized." }
                } @else {
                    div class="flash warn" role="alert" id="impact" {
                        p { strong { (cut.len()) " recent " (if cut.len() == 1 { "caller" } else { "callers" }) " would be refused" }
                            " — they used a key lately from an address the authorized list does not cover. Authorize them first, or confirm to cut them off." }
                        table {
                            thead { tr { th scope="col" { "Address" } th scope="col" { "Key" } } }
                            tbody { @for e in cut { tr { td class="mono" { (e.addr) } td class="mono" { (e.key_id) } } } }
                        }
                    }
                }
            }
            form method="post" action=(format!("/console/blocking/{service}")) class="actions" {
                (layout::csrf(&s))
                input type="hidden" name="mode" value=(q.mode);
                @if impact.as_ref().is_some_and(|c| !c.is_empty()) {
                    input type="hidden" name="force" value="true";
                }
                button type="submit" class=(if q.mode == "active" { "danger" } else { "" }) { "Confirm: " (verb) " " (words) " blocking" }
                a class="button" href="/console/ips" { "Cancel" }
            }
        },
    )
    .into_response()
}

#[derive(Deserialize)]
pub struct ModeForm {
    #[serde(default)]
    csrf: String,
    mode: String,
    #[serde(default)]
    force: bool,
}

pub async fn set_mode(
    State(c): C,
    headers: HeaderMap,
    Path(service): Path<String>,
    Form(f): Form<ModeForm>,
) -> Response {
    let (id, s) = match c.post(&headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let path = match service.as_str() {
        "api" => "/v1/blocking/api",
        "smtp" => "/v1/blocking/smtp",
        _ => {
            c.flash(&id, false, format!("unknown service {service:?}"));
            return axum::response::Redirect::to("/console/ips").into_response();
        }
    };
    let body = api::SetMode {
        mode: f.mode,
        force: f.force,
    };
    let r = c
        .api
        .send::<BlockingState, _>(&s, Method::POST, path, "", Some(&body))
        .await;
    let words = if service == "smtp" { "SMTP" } else { "API" };
    c.done(
        &id,
        r,
        |b| {
            let m = if service == "smtp" {
                mode_str_smtp(b.smtp)
            } else {
                mode_str_api(b.api)
            };
            format!("{words} blocking is now {}.", mode_words(m).to_lowercase())
        },
        "/console/ips",
    )
}
