//! A notice rendered once for every channel: the e-mail's subject and text,
//! and the webhook's JSON. Names account, address, key id and name — never
//! a secret.

use serde::Serialize;

use crate::daemon::Notice;

use super::actions::Issued;

/// One action link in a message.
#[derive(Clone, Debug, Serialize)]
pub struct Link {
    pub action: &'static str,
    pub label: String,
    pub url: String,
}

/// The webhook body (and the facts of the e-mail).
#[derive(Clone, Debug, Serialize)]
pub struct Payload {
    /// Unique per notification: receivers drop a repeat of an id they saw.
    pub id: String,
    pub event: &'static str,
    /// Unix seconds.
    pub at: i64,
    pub account: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<&'static str>,
    /// Which list refused it: `key_allowlist` or `account_list`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_by: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_ends_at: Option<i64>,
    pub summary: String,
    pub actions: Vec<Link>,
}

pub struct Message {
    pub subject: String,
    pub text: String,
    pub payload: Payload,
}

/// Renders a notice with its links (`base` is `[notify] action_base_url`).
pub fn render(
    notice: &Notice,
    id: String,
    at: i64,
    key_name: &str,
    links: &[Issued],
    base: &str,
) -> Message {
    let base = base.trim_end_matches('/');
    let mut p = Payload {
        id,
        event: "",
        at,
        account: notice.account().to_string(),
        address: None,
        service: None,
        refused_by: None,
        key_id: None,
        key_name: None,
        percent: None,
        grace_ends_at: None,
        summary: String::new(),
        actions: Vec::new(),
    };
    let key = |id: &str| {
        if key_name.is_empty() {
            id.to_string()
        } else {
            format!("{id} ({key_name})")
        }
    };
    let subject = match notice {
        Notice::Blocked {
            account,
            addr,
            key_id,
            service,
            by_key,
        } => {
            p.event = "address_blocked";
            p.address = Some(addr.to_string());
            p.service = Some(service);
            p.refused_by = Some(if *by_key {
                "key_allowlist"
            } else {
                "account_list"
            });
            if *by_key && !key_id.is_empty() {
                p.key_id = Some(key_id.clone());
                p.key_name = Some(key_name.to_string());
                p.summary = format!(
                    "{addr} called account {account}'s API with key {} and was refused: the key's own \
                     allowlist does not include the address.",
                    key(key_id)
                );
            } else if !key_id.is_empty() {
                p.key_id = Some(key_id.clone());
                p.key_name = Some(key_name.to_string());
                p.summary = format!(
                    "{addr} called account {account}'s API with key {} and was refused: the address is not authorized.",
                    key(key_id)
                );
            } else {
                p.summary = format!(
                    "{addr} was refused on account {account}'s {} port(s): the address is not authorized.",
                    service.to_uppercase()
                );
            }
            format!("[allowlist] {account}: {addr} was refused")
        }
        Notice::BlockingActivated { account } => {
            p.event = "blocking_activated";
            p.summary = format!(
                "API blocking of account {account} switched to active by itself: no new address was learned \
                 during the quiet period. Calls from addresses outside the authorized list are now refused."
            );
            format!("[allowlist] {account}: API blocking is now active")
        }
        Notice::RateLimit {
            account,
            key_id,
            percent,
        } => {
            p.event = "rate_limit";
            p.key_id = Some(key_id.clone());
            p.key_name = Some(key_name.to_string());
            p.percent = Some(*percent);
            p.summary = if *percent >= 100 {
                format!(
                    "Key {} of account {account} reached its rate limit; further calls get 429 until the budget refills.",
                    key(key_id)
                )
            } else {
                format!(
                    "Key {} of account {account} used {percent} % of its rate limit.",
                    key(key_id)
                )
            };
            format!("[allowlist] {account}: key {key_id} at {percent} % of its rate limit")
        }
        Notice::GraceEnding {
            account,
            key_id,
            ends_at,
        } => {
            p.event = "rotation_grace_ending";
            p.key_id = Some(key_id.clone());
            p.key_name = Some(key_name.to_string());
            p.grace_ends_at = Some(*ends_at);
            let when = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs((*ends_at).max(0) as u64),
            );
            p.summary = format!(
                "The previous secret of key {} (account {account}) stops working at {when}. \
                 Clients still using it must switch to the new secret before then.",
                key(key_id)
            );
            format!("[allowlist] {account}: key {key_id}'s old secret stops at {when}")
        }
    };
    p.actions = links
        .iter()
        .map(|l| Link {
            action: l.kind.as_str(),
            label: l.kind.describe(
                p.address.as_deref().unwrap_or(""),
                p.key_id.as_deref().unwrap_or(""),
            ),
            url: format!("{base}/_allowlist/actions/{}", l.token),
        })
        .collect();
    let mut text = p.summary.clone();
    text += "\n\n";
    text += &format!("Account: {}\n", p.account);
    if let Some(a) = &p.address {
        text += &format!("Address: {a}\n");
    }
    if let Some(k) = &p.key_id {
        text += &format!("Key: {}\n", key(k));
    }
    if !p.actions.is_empty() {
        text += "\nOne click (each link opens a page that asks you to confirm; \
                 using one voids the others):\n\n";
        for l in &p.actions {
            text += &format!("{}:\n{}\n\n", l.label, l.url);
        }
    }
    text += "\n-- \nallowlist\n";
    Message {
        subject,
        text,
        payload: p,
    }
}
