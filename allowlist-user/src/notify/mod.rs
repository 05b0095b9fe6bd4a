//! Notifications: the daemon's notices become e-mails (to the account's
//! recipients and the installation's) and webhook calls (the
//! installation's and the account's), each carrying one-click action
//! links. A refused address is told once per address and key per
//! `[notify] window_secs`, so a flood sends one message. Deliveries are
//! queued (bounded, counted when full) and retried with exponential
//! backoff; one that keeps failing is logged and counted, never dropped
//! silently.

mod actions;
mod mail;
mod message;
pub mod page;
mod webhook;

pub use actions::{ActionDesk, ActionKind};
pub use webhook::signature;

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::sync::mpsc;

use crate::{
    config::NotifyConfig,
    daemon::{Daemon, Notice},
    telemetry::NOTIFY,
};

/// Distinct (address, key) pairs remembered for the window; past it the
/// oldest are forgotten (a sprayer then gets more messages, never fewer
/// checks).
const MAX_REMEMBERED: usize = 100_000;

/// One message to one destination.
enum Delivery {
    Mail {
        to: Vec<String>,
        subject: String,
        text: String,
        id: String,
    },
    Webhook {
        url: String,
        secret: String,
        body: hyper::body::Bytes,
        event: &'static str,
        id: String,
    },
}

impl Delivery {
    fn channel(&self) -> usize {
        match self {
            Delivery::Mail { .. } => 0,
            Delivery::Webhook { .. } => 1,
        }
    }

    fn target(&self) -> String {
        match self {
            Delivery::Mail { to, .. } => to.join(", "),
            Delivery::Webhook { url, .. } => url.clone(),
        }
    }
}

pub struct Notifier {
    daemon: Arc<Daemon>,
    tls: Arc<rustls::ClientConfig>,
}

impl Notifier {
    /// Reads `[notify]` from the daemon's copy on every notice, so a
    /// SIGHUP reload applies to the next one (deliveries in flight keep
    /// the settings they started with).
    pub fn new(daemon: Arc<Daemon>) -> Arc<Notifier> {
        Arc::new(Notifier {
            daemon,
            tls: webhook::tls_client(),
        })
    }

    /// Starts the notifier and the action-link handler; returns the task.
    pub fn start(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let rx = self.daemon.notices.open()?;
        let _ = self
            .daemon
            .actions
            .set(Arc::new(ActionDesk::new(self.daemon.clone())));
        let me = self.clone();
        Some(tokio::spawn(me.run(rx)))
    }

    async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Notice>) {
        // (dedup key) -> when it was last told (Unix s).
        let mut told: HashMap<String, i64> = HashMap::new();
        // Every 10 s: rotation graces about to end (a scan of the keys in
        // memory), forgotten windows and expired links.
        let mut sweep = tokio::time::interval(Duration::from_secs(10));
        loop {
            let notice = tokio::select! {
                n = rx.recv() => match n {
                    Some(n) => n,
                    None => break,
                },
                _ = sweep.tick() => {
                    let cfg = self.daemon.notify_config.load();
                    let now = self.daemon.clock.now_ms() / 1000;
                    self.daemon
                        .raise_grace_notices(cfg.grace_warning_secs as i64);
                    told.retain(|_, at| now - *at < cfg.window_secs as i64);
                    // Links are kept a day past expiry, so a late click is
                    // told "expired" rather than "unknown".
                    if let Err(e) = self.daemon.store.sweep_actions(now - 86_400) {
                        tracing::warn!(error = %e, "removing expired action links");
                    }
                    continue;
                }
            };
            let cfg = self.daemon.notify_config.load_full();
            let now = self.daemon.clock.now_ms() / 1000;
            let key = dedup_key(&notice);
            if let Some(key) = key.clone() {
                match told.get(&key) {
                    Some(at) if now - *at < cfg.window_secs as i64 => {
                        NOTIFY.suppressed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    _ => {}
                }
                if told.len() >= MAX_REMEMBERED {
                    told.retain(|_, at| now - *at < cfg.window_secs as i64);
                    if told.len() >= MAX_REMEMBERED {
                        told.clear();
                    }
                }
                told.insert(key, now);
            }
            match self.prepare(&notice, &cfg, now) {
                Ok(deliveries) => {
                    for d in deliveries {
                        self.dispatch(d, &cfg);
                    }
                }
                Err(e) => {
                    // Not told: the next refusal of the window tries again.
                    if let Some(key) = &key {
                        told.remove(key);
                    }
                    tracing::warn!(account = notice.account(), error = %e, "preparing a notification")
                }
            }
        }
    }

    /// Renders a notice for every destination it has; issues its links
    /// only when someone will receive them.
    fn prepare(
        &self,
        notice: &Notice,
        cfg: &NotifyConfig,
        now: i64,
    ) -> Result<Vec<Delivery>, crate::daemon::DaemonError> {
        let account = notice.account();
        let (emails, key_name) = self.daemon.with_state(|st| {
            let a = st.account(account);
            let emails = a.map(|a| a.record.emails.clone()).unwrap_or_default();
            let key_id = match notice {
                Notice::Blocked { key_id, .. }
                | Notice::RateLimit { key_id, .. }
                | Notice::GraceEnding { key_id, .. } => key_id.as_str(),
                Notice::BlockingActivated { .. } => "",
            };
            let name = a
                .and_then(|a| a.keys.get(key_id))
                .map(|k| k.name.clone())
                .unwrap_or_default();
            (emails, name)
        });
        let mut hooks: Vec<(String, String)> = cfg
            .webhooks
            .iter()
            .map(|w| (w.url.clone(), w.secret.clone()))
            .collect();
        hooks.extend(
            self.daemon
                .store
                .list_webhooks(Some(account))?
                .into_iter()
                .map(|w| (w.url, w.secret)),
        );
        let smtp = cfg.smtp.as_ref();
        let mut mail_to: Vec<Vec<String>> = Vec::new();
        if smtp.is_some() {
            // The account's recipients and the installation's get separate
            // messages: neither sees the other's addresses.
            if !emails.is_empty() {
                mail_to.push(emails);
            }
            if let Some(s) = smtp
                && !s.to.is_empty()
            {
                mail_to.push(s.to.clone());
            }
        }
        if mail_to.is_empty() && hooks.is_empty() {
            return Ok(Vec::new());
        }
        let links = actions::issue(&self.daemon, notice, &key_name, cfg.action_ttl_secs)?;
        let id = random_id();
        let msg = message::render(
            notice,
            id.clone(),
            now,
            &key_name,
            &links,
            &cfg.action_base_url,
        );
        let body = hyper::body::Bytes::from(serde_json::to_vec(&msg.payload).unwrap_or_default());
        let mut out: Vec<Delivery> = mail_to
            .into_iter()
            .map(|to| Delivery::Mail {
                to,
                subject: msg.subject.clone(),
                text: msg.text.clone(),
                id: id.clone(),
            })
            .collect();
        out.extend(hooks.into_iter().map(|(url, secret)| Delivery::Webhook {
            url,
            secret,
            body: body.clone(),
            event: msg.payload.event,
            id: id.clone(),
        }));
        Ok(out)
    }

    /// Queues a delivery, trying it until it succeeds or its attempts run
    /// out; past `[notify] queue` deliveries in flight it is counted and
    /// dropped.
    fn dispatch(self: &Arc<Self>, d: Delivery, cfg: &Arc<NotifyConfig>) {
        let ch = d.channel();
        if NOTIFY.pending.load(Ordering::Relaxed) >= cfg.queue as u64 {
            NOTIFY.dropped[ch].fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target = %d.target(), "notification queue full; notification dropped");
            return;
        }
        NOTIFY.pending.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_secs_f64(cfg.retry_secs);
            for attempt in 1..=cfg.attempts {
                match me.try_once(&d, &cfg).await {
                    Ok(()) => {
                        NOTIFY.sent[ch].fetch_add(1, Ordering::Relaxed);
                        tracing::info!(channel = crate::telemetry::CHANNELS[ch], target = %d.target(), attempt, "notification sent");
                        break;
                    }
                    Err(e) if attempt == cfg.attempts => {
                        NOTIFY.failed[ch].fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(channel = crate::telemetry::CHANNELS[ch], target = %d.target(), attempts = attempt, error = %e, "notification failed; giving up");
                    }
                    Err(e) => {
                        NOTIFY.retried[ch].fetch_add(1, Ordering::Relaxed);
                        tracing::info!(channel = crate::telemetry::CHANNELS[ch], target = %d.target(), attempt, error = %e, retry_in = ?delay, "notification failed; will retry");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(600));
                    }
                }
            }
            NOTIFY.pending.fetch_sub(1, Ordering::Relaxed);
        });
    }

    async fn try_once(&self, d: &Delivery, cfg: &NotifyConfig) -> Result<(), String> {
        match d {
            Delivery::Mail {
                to,
                subject,
                text,
                id,
            } => {
                let smtp = cfg
                    .smtp
                    .as_ref()
                    .ok_or("[notify.smtp] was removed by a reload")?;
                mail::send(smtp, to, subject, text, id).await
            }
            Delivery::Webhook {
                url,
                secret,
                body,
                event,
                id,
            } => webhook::post(url, secret, body.clone(), event, id, &self.tls).await,
        }
    }
}

/// Notices told once per window: a refused address per key, a rate level
/// per key.
fn dedup_key(n: &Notice) -> Option<String> {
    match n {
        Notice::Blocked {
            account,
            addr,
            key_id,
            service,
            ..
        } => Some(format!("blocked {account} {service} {addr} {key_id}")),
        Notice::RateLimit {
            account,
            key_id,
            percent,
        } => Some(format!("rate {account} {key_id} {percent}")),
        Notice::BlockingActivated { .. } | Notice::GraceEnding { .. } => None,
    }
}

fn random_id() -> String {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).expect("the kernel's random source");
    b.iter().map(|x| format!("{x:02x}")).collect()
}
