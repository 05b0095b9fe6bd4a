//! The Unauthorized IP addresses list: refused sources with Authorize,
//! Deny, and Deny and rotate the key (its new secret shown once).

use axum::{
    Form,
    extract::State,
    http::{HeaderMap, Method},
    response::{IntoResponse, Response},
};
use maud::html;
use serde::Deserialize;

use super::{C, layout};
use crate::{api, policy::Need};

pub async fn page(State(c): C, headers: HeaderMap) -> Response {
    let (id, s) = match c.session(&headers) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let title = "Unauthorized IPs";
    let list = match c
        .api
        .get::<api::UnauthorizedList>(&s, "/v1/ips/unauthorized", "")
        .await
    {
        Ok(l) => l.unauthorized,
        Err(e) => return c.failed(&id, &s, title, e),
    };
    let lists = s.may(Need::Lists);
    let keys = s.may(Need::Keys);
    layout::page(
        &s,
        title,
        html! {
            p { "Addresses refused because they are not authorized, newest first. Authorize the ones you know; deny the others." }
            @if list.is_empty() {
                p { "No refused address." }
            } @else {
                table {
                    thead { tr {
                        th scope="col" { "Address" } th scope="col" { "Service" } th scope="col" { "Key" }
                        th scope="col" { "First attempt" } th scope="col" { "Last attempt" }
                        th scope="col" { "Attempts" } th scope="col" { "Status" }
                        @if lists { th scope="col" { span class="visually-hidden" { "Actions" } } }
                    } }
                    tbody {
                        @for u in &list {
                            tr {
                                td class="mono" { (u.addr) }
                                td { (if u.service == "smtp" { format!("SMTP (port {})", u.port) } else { "API".to_string() }) }
                                td class="mono" { @if u.key_id.is_empty() { "—" } @else { (u.key_id) } }
                                td { (layout::time(u.first_seen)) }
                                td { (layout::time(u.last_seen)) }
                                td class="num" { (u.attempts) }
                                td { (u.status) }
                                @if lists {
                                    td {
                                        form method="post" action="/console/unauthorized/act" class="inline" {
                                            (layout::csrf(&s))
                                            input type="hidden" name="addr" value=(u.addr);
                                            button type="submit" name="action" value="authorize" aria-label=(format!("Authorize {}", u.addr)) { "Authorize" }
                                            @if u.status != "denied" {
                                                button type="submit" name="action" value="deny" class="danger" aria-label=(format!("Deny {}", u.addr)) { "Deny" }
                                                @if keys && !u.key_id.is_empty() {
                                                    button type="submit" name="action" value="deny-rotate" class="danger"
                                                        aria-label=(format!("Deny and rotate key {} (for {})", u.key_id, u.addr)) { "Deny and rotate key" }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
    .into_response()
}

#[derive(Deserialize)]
pub struct ActForm {
    #[serde(default)]
    csrf: String,
    addr: String,
    action: String,
}

pub async fn act(State(c): C, headers: HeaderMap, Form(f): Form<ActForm>) -> Response {
    let (id, s) = match c.post(&headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let back = "/console/unauthorized";
    match f.action.as_str() {
        "authorize" => {
            let body = api::Authorize {
                cidr: f.addr.clone(),
                label: Some("from the unauthorized list".into()),
                share: false,
            };
            let r = c
                .api
                .send::<crate::store::AuthorizedRecord, _>(
                    &s,
                    Method::POST,
                    "/v1/ips",
                    "",
                    Some(&body),
                )
                .await;
            c.done(&id, r, |e| format!("Authorized {}.", e.cidr), back)
        }
        "deny" | "deny-rotate" => {
            let rotate = f.action == "deny-rotate";
            let body = api::Deny {
                addr: f.addr.clone(),
                drop: false,
                ttl: None,
                rotate_key: rotate,
            };
            let r = c
                .api
                .send::<api::DenyOutcome, _>(&s, Method::POST, "/v1/ips/deny", "", Some(&body))
                .await;
            match r {
                Ok(out) if !out.rotated.is_empty() => layout::page(
                    &s,
                    "Denied, key rotated",
                    html! {
                        p class="flash ok" role="status" { "Denied " (out.addr) "; " (out.rotated.len()) " key(s) rotated. The old secret stops working after its grace period." }
                        @for k in &out.rotated {
                            h2 { "Key " (k.name) " (" span class="mono" { (k.id) } ")" }
                            @if let Some(secret) = &k.key { (layout::secret_once("New secret", secret, &format!("secret-{}", k.id))) }
                        }
                        p { a href=(back) { "Back to Unauthorized IPs" } }
                    },
                )
                .into_response(),
                r => c.done(&id, r, |o| format!("Denied {}.", o.addr), back),
            }
        }
        other => {
            c.flash(&id, false, format!("unknown action {other:?}"));
            axum::response::Redirect::to(back).into_response()
        }
    }
}
