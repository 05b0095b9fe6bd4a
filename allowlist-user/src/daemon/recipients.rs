//! Where an account's notifications go: its e-mail recipients and its own
//! webhooks (beside the installation's, from `[notify]`).

use crate::{
    api::{NewWebhook, NotifySettings, WebhookView},
    daemon::{Caller, Daemon, DaemonError, no_account},
    policy::Role,
    store::WebhookRecord,
};

/// Webhooks one account may register.
const MAX_WEBHOOKS: usize = 10;

impl Daemon {
    pub fn notify_settings(&self, account: &str) -> Result<NotifySettings, DaemonError> {
        let emails = self.with_state(|st| {
            st.account(account)
                .map(|a| a.record.emails.clone())
                .ok_or_else(|| no_account(account))
        })?;
        let webhooks = self
            .store
            .list_webhooks(Some(account))?
            .into_iter()
            .map(|w| WebhookView {
                url: w.url,
                created_at: w.created_at,
                created_by: w.created_by,
            })
            .collect();
        let installation = self.notify_config.load();
        Ok(NotifySettings {
            account: account.to_string(),
            emails,
            webhooks,
            smtp_configured: installation.smtp.is_some(),
            installation_webhooks: installation.webhooks.len(),
        })
    }

    /// Replaces the account's e-mail recipients.
    pub async fn set_emails(
        &self,
        account: &str,
        emails: Vec<String>,
        actor: &str,
    ) -> Result<NotifySettings, DaemonError> {
        let mut emails: Vec<String> = emails.into_iter().map(|e| e.trim().to_string()).collect();
        for e in &emails {
            crate::config::check_mailbox(e).map_err(DaemonError::Invalid)?;
        }
        emails.sort();
        emails.dedup();
        if emails.len() > 20 {
            return Err(DaemonError::Invalid(format!(
                "{} recipients; an account has at most 20 (use a list address)",
                emails.len()
            )));
        }
        let mut rec = self.with_state(|st| {
            st.account(account)
                .map(|a| a.record.clone())
                .ok_or_else(|| no_account(account))
        })?;
        rec.emails = emails.clone();
        let r = rec.clone();
        self.change(
            |st| {
                st.account_mut(account)
                    .ok_or_else(|| no_account(account))?
                    .record = r;
                Ok(())
            },
            |_| {
                Ok(self.store.update_account(
                    &rec,
                    "account.emails",
                    serde_json::json!({ "emails": emails }),
                    actor,
                )?)
            },
        )
        .await?;
        self.notify_settings(account)
    }

    /// Adds (or replaces, same URL) one of the account's webhooks. Account
    /// owners must use https: the daemon calls the URL from inside the
    /// installation's network; plain http is the operators' choice.
    pub fn add_webhook(
        &self,
        account: &str,
        req: NewWebhook,
        caller: &Caller,
    ) -> Result<WebhookView, DaemonError> {
        self.with_state(|st| {
            st.account(account)
                .map(|_| ())
                .ok_or_else(|| no_account(account))
        })?;
        let url = req.url.trim().to_string();
        let uri: hyper::Uri = url
            .parse()
            .map_err(|_| DaemonError::Invalid(format!("{url:?} is not a URL")))?;
        let scheme_ok = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => caller.role == Role::Operator,
            _ => false,
        };
        if !scheme_ok || uri.host().is_none() {
            return Err(DaemonError::Invalid(format!(
                "{url:?} must be an https:// URL (plain http:// only by an operator)"
            )));
        }
        if req.secret.len() < 16 || req.secret.len() > 1024 {
            return Err(DaemonError::Invalid(
                "the webhook secret must be 16 to 1024 characters (it keys the HMAC signature)"
                    .into(),
            ));
        }
        let existing = self.store.list_webhooks(Some(account))?;
        if existing.len() >= MAX_WEBHOOKS && !existing.iter().any(|w| w.url == url) {
            return Err(DaemonError::Invalid(format!(
                "{account} has {MAX_WEBHOOKS} webhooks already; remove one first"
            )));
        }
        let rec = WebhookRecord {
            account: account.to_string(),
            url: url.clone(),
            secret: req.secret,
            created_at: self.clock.now_ms() / 1000,
            created_by: caller.actor.clone(),
        };
        self.store.put_webhook(&rec, &caller.actor)?;
        tracing::info!(account, url, actor = %caller.actor, "webhook added");
        Ok(WebhookView {
            url,
            created_at: rec.created_at,
            created_by: rec.created_by,
        })
    }

    pub fn remove_webhook(&self, account: &str, url: &str, actor: &str) -> Result<(), DaemonError> {
        if !self.store.remove_webhook(account, url, actor)? {
            return Err(DaemonError::NotFound(format!(
                "{account} has no webhook at {url:?}; `allowlistctl notify show` lists them"
            )));
        }
        tracing::info!(account, url, actor, "webhook removed");
        Ok(())
    }
}
