//! API usage logs: the filters of `allowlistctl logs`, newest first, paged;
//! the CSV export of the filtered view; charts of the same rows.

use axum::{
    extract::{Query, State},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use maud::html;

use super::{C, chart, client::query, layout};
use crate::api;

const PAGE: usize = 50;

fn filters(q: &api::LogsQuery) -> api::LogsQuery {
    let keep = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
    api::LogsQuery {
        key: keep(&q.key),
        method: keep(&q.method),
        status: q.status,
        reason: keep(&q.reason),
        ip: keep(&q.ip),
        since: keep(&q.since),
        until: keep(&q.until),
        ..Default::default()
    }
}

/// The filter form sends empty fields; the API wants them absent (and a
/// status that is not a number gets the API's own message).
#[derive(serde::Deserialize, Default)]
pub struct Raw {
    #[serde(default)]
    key: String,
    #[serde(default)]
    method: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    ip: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    #[serde(default)]
    offset: Option<usize>,
}

impl Raw {
    fn query(&self) -> Result<api::LogsQuery, String> {
        let s = |v: &str| Some(v.trim().to_string()).filter(|v| !v.is_empty());
        let status = match self.status.trim() {
            "" => None,
            t => Some(
                t.parse::<u16>()
                    .map_err(|_| format!("--status {t:?} is not an HTTP status (100 to 599)"))?,
            ),
        };
        Ok(api::LogsQuery {
            key: s(&self.key),
            method: s(&self.method),
            status,
            reason: s(&self.reason),
            ip: s(&self.ip),
            since: s(&self.since),
            until: s(&self.until),
            ..Default::default()
        })
    }
}

pub async fn page(State(c): C, headers: HeaderMap, Query(raw): Query<Raw>) -> Response {
    let (id, s) = match c.session(&headers) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let title = "Usage logs";
    let form = html! {
        form method="get" action="/console/logs" class="card grid filters" {
            label for="f-key" { "Key id" } input id="f-key" name="key" value=(raw.key);
            label for="f-method" { "Method" } input id="f-method" name="method" value=(raw.method) size="8";
            label for="f-status" { "Status" } input id="f-status" name="status" value=(raw.status) size="4" inputmode="numeric";
            label for="f-reason" { "Reason" } input id="f-reason" name="reason" value=(raw.reason) placeholder="key_allowlist";
            label for="f-ip" { "Client address or CIDR" } input id="f-ip" name="ip" value=(raw.ip);
            label for="f-since" { "Since (24h, 7d, RFC 3339)" } input id="f-since" name="since" value=(raw.since);
            label for="f-until" { "Until" } input id="f-until" name="until" value=(raw.until);
            button type="submit" { "Filter" }
        }
    };
    let q = match raw.query() {
        Ok(q) => q,
        Err(m) => {
            return layout::page(
                &s,
                title,
                html! { (form) p class="flash err" role="alert" { (m) } },
            )
            .into_response();
        }
    };
    // Pages after the first keep the first page's end, so rows that
    // arrive meanwhile do not shift them.
    let mut fixed = filters(&q);
    if fixed.until.is_none() {
        fixed.until = Some((c.now_ms() / 1000).to_string());
    }
    let offset = raw.offset.unwrap_or(0);
    let list_q = api::LogsQuery {
        limit: Some(PAGE + 1),
        offset: Some(offset),
        ..fixed.clone()
    };
    let rows = match c
        .api
        .get::<api::LogList>(&s, "/v1/logs", &query(&list_q))
        .await
    {
        Ok(l) => l.entries,
        Err(e) if e.signed_out() => return c.signed_out(&id),
        Err(e) => {
            return (
                e.status,
                layout::page(
                    &s,
                    title,
                    html! { (form) p class="flash err" role="alert" { (e.message) } },
                ),
            )
                .into_response();
        }
    };
    let summary = c
        .api
        .get::<api::LogSummary>(&s, "/v1/logs/summary", &query(&fixed))
        .await;
    let more = rows.len() > PAGE;
    let shown = &rows[..rows.len().min(PAGE)];
    let page_link = |off: usize| {
        let mut l = query(&fixed);
        l.push_str(&format!("&offset={off}"));
        format!("/console/logs?{l}")
    };
    let csv = format!("/console/logs.csv?{}", query(&filters(&q)));
    layout::page(
        &s,
        title,
        html! {
            (form)
            p { a class="button" href=(csv) download { "Download CSV of this view" } }
            @match &summary {
                Ok(sum) => {
                    section aria-labelledby="chart-h" {
                        h2 id="chart-h" { "Requests (" (sum.total) ")" }
                        (chart::over_time(sum))
                        h2 { "Refusals by reason" }
                        (chart::refusals(sum))
                    }
                }
                Err(e) => { p class="flash err" role="alert" { (e.message) } }
            }
            section aria-labelledby="rows-h" {
                h2 id="rows-h" { "Requests, newest first" }
                @if shown.is_empty() {
                    p { "No request matches." }
                } @else {
                    table class="logs" {
                        thead { tr {
                            th scope="col" { "Time" } th scope="col" { "Client" } th scope="col" { "Key" }
                            th scope="col" { "Method" } th scope="col" { "Path" } th scope="col" { "Status" }
                            th scope="col" { "Reason" } th scope="col" { "Rule" } th scope="col" { "Latency (µs)" }
                        } }
                        tbody {
                            @for r in shown {
                                tr {
                                    td { (layout::time_ms(r.at_ms)) }
                                    td class="mono" { (r.client) }
                                    td class="mono" { (r.key_id) }
                                    td { (r.method) }
                                    td class="mono path" { (r.path) }
                                    td class="num" { (r.status) }
                                    td { (r.reason) }
                                    td { (r.rule) }
                                    td class="num" { (r.latency_us) }
                                }
                            }
                        }
                    }
                }
                nav aria-label="Pages" class="pager" {
                    @if offset > 0 { a href=(page_link(offset.saturating_sub(PAGE))) rel="prev" { "Newer" } }
                    span { "Rows " (offset.saturating_add(1)) "–" (offset.saturating_add(shown.len())) }
                    @if more && offset + PAGE < 100_000 - PAGE { a href=(page_link(offset + PAGE)) rel="next" { "Older" } }
                }
            }
        },
    )
    .into_response()
}

/// The filtered view as CSV, streamed from the API as it reads.
pub async fn csv(State(c): C, headers: HeaderMap, Query(raw): Query<Raw>) -> Response {
    let (id, s) = match c.session(&headers) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let q = match raw.query() {
        Ok(q) => q,
        Err(m) => return (axum::http::StatusCode::BAD_REQUEST, m).into_response(),
    };
    let mut resp = c.api.raw(&s, "/v1/logs/csv", &query(&q)).await;
    if resp.status() == axum::http::StatusCode::UNAUTHORIZED {
        return c.signed_out(&id);
    }
    if resp.status().is_success() {
        let name = format!("allowlist-{}-usage.csv", s.account);
        if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
            resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
    }
    resp
}
