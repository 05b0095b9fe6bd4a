//! The frame every page shares: head, navigation by role, the signed-in
//! caller, the account switcher for operators, the one-shot message.

use axum::response::Html;
use maud::{DOCTYPE, Markup, html};

use super::session::Session;
use crate::policy::Need;

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · allowlist" }
            link rel="stylesheet" href="/console/assets/console.css";
            script src="/console/assets/console.js" defer {}
        }
    }
}

/// A page outside a session (sign-in, refusals).
pub fn bare(title: &str, content: Markup) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                (head(title))
                body {
                    header class="top" { span class="brand" { "allowlist" } }
                    main id="main" { h1 { (title) } (content) }
                }
            }
        }
        .into_string(),
    )
}

/// The pages of the navigation: path, words, what the role needs to see
/// it at all.
const NAV: &[(&str, &str, Option<Need>, bool)] = &[
    ("/console/ips", "Authorized IPs", None, false),
    ("/console/unauthorized", "Unauthorized IPs", None, false),
    ("/console/keys", "API keys", None, false),
    ("/console/logs", "Usage logs", None, false),
    ("/console/tokens", "Tokens", Some(Need::Keys), false),
    ("/console/accounts", "Accounts", Some(Need::Operator), true),
    ("/console/drops", "Drop list", Some(Need::Operator), true),
    ("/console/counters", "Counters", Some(Need::Operator), true),
];

/// A page of the signed-in console.
pub fn page(s: &Session, title: &str, content: Markup) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                (head(title))
                body {
                    a class="skip" href="#main" { "Skip to the content" }
                    header class="top" {
                        span class="brand" { "allowlist" }
                        nav aria-label="Console" {
                            ul {
                                @for (href, words, need, _) in NAV {
                                    @if need.is_none_or(|n| s.may(n)) {
                                        li {
                                            @if title == *words {
                                                a href=(href) aria-current="page" { (words) }
                                            } @else {
                                                a href=(href) { (words) }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                        div class="who" {
                            span { "Signed in as " strong { (s.who.actor) } " (" (role_words(s)) ")" }
                            @if s.operator() {
                                form method="post" action="/console/account" class="inline" {
                                    (csrf(s))
                                    label for="account-switch" { "Account" }
                                    input id="account-switch" name="account" value=(s.account) size="14" required;
                                    button type="submit" { "Switch" }
                                }
                            } @else {
                                span { "Account " strong { (s.account) } }
                            }
                            form method="post" action="/console/signout" class="inline" {
                                (csrf(s))
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                    main id="main" {
                        h1 { (title) @if !s.operator() || s.account != crate::policy::DEFAULT_ACCOUNT { span class="sub" { " · " (s.account) } } }
                        @if let Some(f) = &s.flash {
                            @if f.ok {
                                p class="flash ok" role="status" { (f.text) }
                            } @else {
                                p class="flash err" role="alert" { (f.text) }
                            }
                        }
                        (content)
                    }
                }
            }
        }
        .into_string(),
    )
}

fn role_words(s: &Session) -> &'static str {
    use crate::policy::Role;
    match s.who.role {
        Role::Operator => "operator",
        Role::Owner => "owner",
        Role::Ips => "authorized IPs",
        Role::Viewer => "viewer",
    }
}

/// The hidden CSRF field every form carries.
pub fn csrf(s: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

/// Unix seconds as `2026-11-30 17:05:03 UTC`.
pub fn time(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

pub fn time_ms(ms: i64) -> String {
    time(ms / 1000)
}

/// An optional time, or a dash.
pub fn maybe_time(secs: Option<i64>) -> String {
    secs.map(time).unwrap_or_else(|| "—".into())
}

/// A secret shown once, with a copy button (console.js) and what to do.
pub fn secret_once(label: &str, value: &str, dom_id: &str) -> Markup {
    html! {
        div class="secret" {
            p { strong { (label) } " — shown this once; copy it now, it cannot be shown again." }
            div class="copyrow" {
                label for=(dom_id) class="visually-hidden" { (label) }
                input id=(dom_id) class="mono secret-value" readonly value=(value) size="80";
                button type="button" class="copy" data-copy=(dom_id) { "Copy" }
            }
        }
    }
}
