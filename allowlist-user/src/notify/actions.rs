//! One-click action links: issued with a notification, served by the edge
//! at `/_allowlist/actions/{token}`.
//!
//! A link's token is 256 random bits; only its SHA-256 is stored. GET shows
//! what the link would do and changes nothing (mail scanners fetch, and
//! some render, every link); POST with the nonce that page carries acts,
//! once, and voids the other links of the same notification. Every use is
//! audited by the operation it performs, with `action:ID` as the actor.

use std::{future::Future, net::IpAddr, pin::Pin, sync::Arc, sync::atomic::Ordering};

use sha2::{Digest, Sha256};

use crate::{
    daemon::{Authorize, Daemon, DaemonError, DenyRequest, Notice},
    edge_host::{ActionHandler, ActionMethod, ActionReply, ActionRequest},
    policy::{ApiMode, SmtpMode},
    store::{ActionRecord, Claim},
    telemetry::NOTIFY,
};

use super::page;

/// What a link does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionKind {
    /// Authorize the refused address (its /64 for IPv6).
    Authorize,
    /// Add the address to the key's own allowlist (a refusal by it).
    AllowOnKey,
    /// Deny the address and rotate the key it used, with no grace.
    DenyRotate,
    /// Deny the address (a refusal without a key: nothing to rotate).
    Deny,
    DeactivateApi,
    DeactivateSmtp,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Authorize => "authorize",
            ActionKind::AllowOnKey => "allow_on_key",
            ActionKind::DenyRotate => "deny_rotate",
            ActionKind::Deny => "deny",
            ActionKind::DeactivateApi => "deactivate_api",
            ActionKind::DeactivateSmtp => "deactivate_smtp",
        }
    }

    fn parse(s: &str) -> Option<ActionKind> {
        [
            ActionKind::Authorize,
            ActionKind::AllowOnKey,
            ActionKind::DenyRotate,
            ActionKind::Deny,
            ActionKind::DeactivateApi,
            ActionKind::DeactivateSmtp,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// The button's words.
    pub fn describe(self, addr: &str, key: &str) -> String {
        match self {
            ActionKind::Authorize => format!("Authorize {addr}"),
            ActionKind::AllowOnKey => format!("Allow {addr} on key {key}"),
            ActionKind::DenyRotate => format!("Deny {addr} and rotate key {key}"),
            ActionKind::Deny => format!("Deny {addr}"),
            ActionKind::DeactivateApi => "Deactivate API blocking".into(),
            ActionKind::DeactivateSmtp => "Deactivate SMTP blocking".into(),
        }
    }

    /// The links a notice carries.
    pub fn for_notice(n: &Notice) -> Vec<ActionKind> {
        match n {
            // The key's own allowlist refused it: only the key can admit
            // it (the account's list and its blocking mode do not).
            Notice::Blocked {
                by_key: true,
                key_id,
                ..
            } if !key_id.is_empty() => vec![ActionKind::AllowOnKey, ActionKind::DenyRotate],
            Notice::Blocked {
                key_id, service, ..
            } => {
                let deny = if key_id.is_empty() {
                    ActionKind::Deny
                } else {
                    ActionKind::DenyRotate
                };
                let deactivate = if *service == "smtp" {
                    ActionKind::DeactivateSmtp
                } else {
                    ActionKind::DeactivateApi
                };
                vec![ActionKind::Authorize, deny, deactivate]
            }
            Notice::BlockingActivated { .. } => vec![ActionKind::DeactivateApi],
            Notice::RateLimit { .. } | Notice::GraceEnding { .. } => Vec::new(),
        }
    }
}

/// A link as issued: its kind and its plaintext token (for the URL only).
pub struct Issued {
    pub kind: ActionKind,
    pub token: String,
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).expect("the kernel's random source");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A token as it appears in a URL: 43 characters of unpadded base64url.
fn well_formed(token: &str) -> bool {
    token.len() == 43
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn new_token() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the kernel's random source");
    // 256 bits as 43 base64url digits (the last carries 4 bits).
    let mut bits: u32 = 0;
    let mut n = 0;
    let mut out = String::with_capacity(43);
    for byte in b {
        bits = (bits << 8) | u32::from(byte);
        n += 8;
        while n >= 6 {
            n -= 6;
            out.push(ALPHABET[((bits >> n) & 63) as usize] as char);
        }
    }
    if n > 0 {
        out.push(ALPHABET[((bits << (6 - n)) & 63) as usize] as char);
    }
    out
}

/// Issues and stores the links of one notice; returns them (with their
/// plaintext tokens) for the message.
pub fn issue(
    daemon: &Daemon,
    notice: &Notice,
    key_name: &str,
    ttl_secs: u64,
) -> Result<Vec<Issued>, DaemonError> {
    let kinds = ActionKind::for_notice(notice);
    if kinds.is_empty() {
        return Ok(Vec::new());
    }
    let (addr, key_id) = match notice {
        Notice::Blocked { addr, key_id, .. } => (addr.to_string(), key_id.clone()),
        _ => (String::new(), String::new()),
    };
    let now = daemon.clock.now_ms() / 1000;
    let group = random_hex(12);
    let issued: Vec<Issued> = kinds
        .into_iter()
        .map(|kind| Issued {
            kind,
            token: new_token(),
        })
        .collect();
    let records: Vec<ActionRecord> = issued
        .iter()
        .map(|i| ActionRecord {
            hash: token_hash(&i.token),
            id: random_hex(8),
            group: group.clone(),
            account: notice.account().to_string(),
            action: i.kind.as_str().into(),
            addr: addr.clone(),
            key_id: key_id.clone(),
            key_name: key_name.to_string(),
            nonce: random_hex(16),
            created_at: now,
            expires_at: now + ttl_secs as i64,
            used_at: None,
            used_by: None,
        })
        .collect();
    daemon.store.create_actions(&records)?;
    Ok(issued)
}

/// The edge's handler of action links.
pub struct ActionDesk {
    daemon: Arc<Daemon>,
    /// One POST acts at a time: the claim is atomic in the store, and the
    /// operation it triggers runs under this lock so a failed one can be
    /// released before another POST of the group is looked at.
    acting: tokio::sync::Mutex<()>,
}

impl ActionDesk {
    pub fn new(daemon: Arc<Daemon>) -> ActionDesk {
        ActionDesk {
            daemon,
            acting: tokio::sync::Mutex::new(()),
        }
    }

    async fn serve(&self, req: ActionRequest) -> ActionReply {
        let now = self.daemon.clock.now_ms() / 1000;
        if !well_formed(&req.token) {
            return self.refused(404, page::unknown());
        }
        let hash = token_hash(&req.token);
        match req.method {
            ActionMethod::Other => ActionReply {
                status: 405,
                html: page::method_not_allowed(),
            },
            ActionMethod::Get => match self.daemon.store.find_action(&hash) {
                Err(e) => {
                    tracing::warn!(error = %e, "reading an action link");
                    ActionReply {
                        status: 503,
                        html: page::failed("The link could not be checked; try again shortly."),
                    }
                }
                Ok(None) => ActionReply {
                    status: 404,
                    html: page::unknown(),
                },
                Ok(Some(rec)) => self.show(rec, now),
            },
            ActionMethod::Post => self.act(&hash, &req, now).await,
        }
    }

    /// GET: what the link does, or why it no longer can; changes nothing.
    fn show(&self, rec: ActionRecord, now: i64) -> ActionReply {
        let Some(kind) = ActionKind::parse(&rec.action) else {
            return ActionReply {
                status: 404,
                html: page::unknown(),
            };
        };
        if rec.used_at.is_some() {
            return ActionReply {
                status: 410,
                html: page::used(&rec),
            };
        }
        if rec.expires_at <= now {
            return ActionReply {
                status: 410,
                html: page::expired(&rec),
            };
        }
        ActionReply {
            status: 200,
            html: page::confirm(&rec, &kind.describe(&rec.addr, &rec.key_id)),
        }
    }

    fn refused(&self, status: u16, html: String) -> ActionReply {
        NOTIFY.actions_refused.fetch_add(1, Ordering::Relaxed);
        ActionReply { status, html }
    }

    async fn act(&self, hash: &[u8; 32], req: &ActionRequest, now: i64) -> ActionReply {
        let nonce = form_value(&req.form, "nonce").unwrap_or_default();
        let _one = self.acting.lock().await;
        let rec = match self.daemon.store.claim_action(hash, &nonce, now) {
            Err(e) => {
                tracing::warn!(error = %e, "claiming an action link");
                return ActionReply {
                    status: 503,
                    html: page::failed("The link could not be checked; try again shortly."),
                };
            }
            Ok(Claim::Unknown) => return self.refused(404, page::unknown()),
            Ok(Claim::Used(r)) => return self.refused(410, page::used(&r)),
            Ok(Claim::Expired(r)) => return self.refused(410, page::expired(&r)),
            Ok(Claim::BadNonce) => return self.refused(403, page::bad_nonce()),
            Ok(Claim::Claimed(r)) => r,
        };
        let Some(kind) = ActionKind::parse(&rec.action) else {
            return self.refused(404, page::unknown());
        };
        let actor = format!("action:{}", rec.id);
        match self.perform(kind, &rec, &actor).await {
            Ok(secret) => {
                NOTIFY.actions_used.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    account = %rec.account,
                    action = kind.as_str(),
                    addr = %rec.addr,
                    key = %rec.key_id,
                    client = %req.client,
                    actor,
                    "action link used"
                );
                ActionReply {
                    status: 200,
                    html: page::done(
                        &rec,
                        &kind.describe(&rec.addr, &rec.key_id),
                        secret.as_deref(),
                    ),
                }
            }
            Err(e) => {
                // Nothing was done: the link (and its siblings) can be used
                // again once the cause is fixed.
                if let Err(e) = self.daemon.store.release_action(&rec.group) {
                    tracing::warn!(error = %e, "releasing an action link after a failure");
                }
                tracing::warn!(account = %rec.account, action = kind.as_str(), error = %e, "action link failed");
                let status = match e {
                    DaemonError::Invalid(_) | DaemonError::NotFound(_) => 409,
                    _ => 503,
                };
                ActionReply {
                    status,
                    html: page::failed(&e.to_string()),
                }
            }
        }
    }

    /// Performs the action; returns the new key secret of a rotation (shown
    /// once, on the answer to this POST only).
    async fn perform(
        &self,
        kind: ActionKind,
        rec: &ActionRecord,
        actor: &str,
    ) -> Result<Option<String>, DaemonError> {
        let d = &self.daemon;
        let account = rec.account.as_str();
        let unit = || -> Result<String, DaemonError> {
            let addr: IpAddr = rec
                .addr
                .parse()
                .map_err(|_| DaemonError::Invalid(format!("{:?} is not an address", rec.addr)))?;
            Ok(match addr {
                IpAddr::V4(_) => addr.to_string(),
                IpAddr::V6(_) => format!("{}/64", crate::policy::source_unit(addr)),
            })
        };
        match kind {
            ActionKind::Authorize => {
                let cidr = unit()?;
                let req = Authorize {
                    cidr: &cidr,
                    label: Some("authorized from a notification".into()),
                    source: "unauthorized",
                    key_id: Some(rec.key_id.clone()).filter(|k| !k.is_empty()),
                    share: false,
                };
                d.authorize(account, req, actor).await?;
                Ok(None)
            }
            ActionKind::AllowOnKey => {
                let cidr = unit()?;
                d.key_allow(
                    account,
                    &rec.key_id,
                    &cidr,
                    Some("allowed from a notification".into()),
                    actor,
                )
                .await?;
                Ok(None)
            }
            ActionKind::DenyRotate | ActionKind::Deny => {
                let out = d
                    .deny(
                        account,
                        DenyRequest {
                            addr: rec.addr.clone(),
                            drop: false,
                            ttl: None,
                            rotate_key: kind == ActionKind::DenyRotate,
                        },
                        actor,
                    )
                    .await?;
                Ok(out
                    .rotated
                    .into_iter()
                    .find(|k| k.id == rec.key_id)
                    .and_then(|k| k.key))
            }
            ActionKind::DeactivateApi => {
                d.set_api_blocking(account, ApiMode::Inactive, false, actor)
                    .await?;
                Ok(None)
            }
            ActionKind::DeactivateSmtp => {
                d.set_smtp_blocking(account, SmtpMode::Inactive, false, actor)
                    .await?;
                Ok(None)
            }
        }
    }
}

impl ActionHandler for ActionDesk {
    fn handle(&self, req: ActionRequest) -> Pin<Box<dyn Future<Output = ActionReply> + Send + '_>> {
        Box::pin(self.serve(req))
    }
}

/// One value of an `application/x-www-form-urlencoded` body.
fn form_value(body: &[u8], name: &str) -> Option<String> {
    let body = std::str::from_utf8(body).ok()?;
    body.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_43_url_safe_characters_and_distinct() {
        let a = new_token();
        let b = new_token();
        assert!(well_formed(&a), "{a}");
        assert_ne!(a, b);
        assert!(!well_formed(&a[1..]));
        assert!(!well_formed(&format!("{}/", &a[1..])));
    }

    #[test]
    fn the_nonce_is_read_from_the_form() {
        assert_eq!(
            form_value(b"a=1&nonce=abc", "nonce").as_deref(),
            Some("abc")
        );
        assert_eq!(form_value(b"nonce", "nonce"), None);
        assert_eq!(form_value(b"\xff", "nonce"), None);
    }

    #[test]
    fn a_blocked_notice_offers_three_links() {
        let n = Notice::Blocked {
            account: "acme".into(),
            addr: "192.0.2.1".parse().unwrap(),
            key_id: "k".into(),
            service: "api",
            by_key: false,
        };
        assert_eq!(
            ActionKind::for_notice(&n),
            vec![
                ActionKind::Authorize,
                ActionKind::DenyRotate,
                ActionKind::DeactivateApi
            ]
        );
        let by_key = Notice::Blocked {
            account: "acme".into(),
            addr: "192.0.2.1".parse().unwrap(),
            key_id: "k".into(),
            service: "api",
            by_key: true,
        };
        assert_eq!(
            ActionKind::for_notice(&by_key),
            vec![ActionKind::AllowOnKey, ActionKind::DenyRotate]
        );
    }
}
