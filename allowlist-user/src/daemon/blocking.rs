//! API and SMTP blocking modes: manual moves, the impact of activating,
//! and the switch to active after the quiet learning period.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::{
    daemon::{Daemon, DaemonError, no_account},
    policy::PrefixSet,
    policy::{ApiMode, SmtpMode},
    store::BlockingState,
};

impl Daemon {
    /// Sets API blocking. Activation by hand that would refuse sources
    /// that called successfully within `learning_days` needs `force`.
    pub async fn set_api_blocking(
        &self,
        account: &str,
        mode: ApiMode,
        force: bool,
        actor: &str,
    ) -> Result<BlockingState, DaemonError> {
        self.check_not_enforced(account, "api", mode != ApiMode::Active)?;
        if mode == ApiMode::Active && !force {
            let cut = self.activation_impact(account)?;
            if !cut.is_empty() {
                let list: Vec<String> = cut
                    .iter()
                    .take(10)
                    .map(|(addr, key)| format!("{addr} (key {key})"))
                    .collect();
                return Err(DaemonError::Invalid(format!(
                    "activating would refuse {} source(s) that called successfully in the last {} days: {}{}; \
                     authorize them first (`allowlistctl ips authorize CIDR`), or pass --force",
                    cut.len(),
                    self.config.blocking.learning_days,
                    list.join(", "),
                    if cut.len() > 10 { ", ..." } else { "" }
                )));
            }
        }
        self.set_blocking_mode(
            account,
            "api",
            serde_json::to_value(mode).unwrap_or_default(),
            actor,
            move |b| b.api = mode,
        )
        .await
    }

    pub async fn set_smtp_blocking(
        &self,
        account: &str,
        mode: SmtpMode,
        force: bool,
        actor: &str,
    ) -> Result<BlockingState, DaemonError> {
        self.check_not_enforced(account, "smtp", mode != SmtpMode::Active)?;
        let empty = self.with_state(|st| {
            st.account(account)
                .map(|a| {
                    a.authorized.is_empty()
                        && st
                            .parent_of(account)
                            .is_none_or(|o| o.shared().next().is_none())
                })
                .ok_or_else(|| no_account(account))
        })?;
        if mode == SmtpMode::Active && !force && empty {
            return Err(DaemonError::Invalid(
                "the authorized list is empty, so activating SMTP blocking would cut all SMTP traffic at once; \
                 authorize your senders first (`allowlistctl ips authorize CIDR`), or pass --force"
                    .into(),
            ));
        }
        self.set_blocking_mode(
            account,
            "smtp",
            serde_json::to_value(mode).unwrap_or_default(),
            actor,
            move |b| b.smtp = mode,
        )
        .await
    }

    /// A sub-account whose organization enforces blocking (and has it
    /// active) cannot lower its own.
    fn check_not_enforced(
        &self,
        account: &str,
        service: &str,
        lowering: bool,
    ) -> Result<(), DaemonError> {
        self.with_state(|st| {
            st.account(account).ok_or_else(|| no_account(account))?;
            let Some(org) = st.parent_of(account) else {
                return Ok(());
            };
            let active = match service {
                "api" => org.record.blocking.api == ApiMode::Active,
                _ => org.record.blocking.smtp == SmtpMode::Active,
            };
            if lowering && org.record.enforce_blocking && active {
                return Err(DaemonError::Invalid(format!(
                    "{service} blocking of {account} is enforced by its organization {}; \
                     it stays active while the organization enforces it",
                    org.record.name
                )));
            }
            Ok(())
        })
    }

    async fn set_blocking_mode(
        &self,
        account: &str,
        service: &'static str,
        mode: serde_json::Value,
        actor: &str,
        set: impl FnOnce(&mut BlockingState),
    ) -> Result<BlockingState, DaemonError> {
        let now = self.clock.now_ms() / 1000;
        let mode = mode.as_str().unwrap_or_default().to_string();
        self.change(
            |st| {
                let b = &mut st
                    .account_mut(account)
                    .ok_or_else(|| no_account(account))?
                    .record
                    .blocking;
                set(b);
                match service {
                    "api" => b.api_since = now,
                    _ => b.smtp_since = now,
                }
                Ok(())
            },
            |_| {
                Ok(self
                    .store
                    .set_blocking(account, service, &mode, actor, now)?)
            },
        )
        .await?;
        tracing::info!(account, service, %mode, actor, "blocking mode changed");
        self.with_state(|st| {
            st.account(account)
                .map(|a| a.record.blocking.clone())
                .ok_or_else(|| no_account(account))
        })
    }

    /// Sources that called successfully within the learning window and
    /// that the authorized list (with `always_allow`) would now refuse.
    pub fn activation_impact(&self, account: &str) -> Result<Vec<(IpAddr, String)>, DaemonError> {
        let (authorized, keys): (Vec<IpNet>, std::collections::HashSet<String>) =
            self.with_state(|st| {
                let a = st.account(account).ok_or_else(|| no_account(account))?;
                let mut list: Vec<IpNet> = a.authorized.keys().copied().collect();
                if let Some(org) = st.parent_of(account) {
                    list.extend(org.shared().map(|e| e.cidr));
                }
                Ok::<_, DaemonError>((list, a.keys.keys().cloned().collect()))
            })?;
        let since_ms =
            self.clock.now_ms() - i64::from(self.config.blocking.learning_days) * 86_400_000;
        let recent = self
            .recent_successes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let account = PrefixSet::new(
            authorized
                .into_iter()
                .chain(self.config.blocking.always_allow.iter().copied()),
        );
        let mut out: Vec<(IpAddr, String)> = recent
            .iter()
            .filter(|((_, key), at)| **at >= since_ms && keys.contains(key))
            .filter(|((addr, _), _)| account.longest_match(*addr).is_none())
            .map(|((addr, key), _)| (*addr, key.clone()))
            .collect();
        out.sort();
        Ok(out)
    }

    /// After `learning_days` without a newly learned address, API blocking
    /// turns active by itself (it cannot cut anything: every caller of that
    /// period was learned). Returns whether it switched.
    /// Each account's clock runs on its own. Returns the accounts that
    /// switched.
    pub async fn auto_activate(&self) -> Result<Vec<String>, DaemonError> {
        let quiet = i64::from(self.config.blocking.learning_days) * 86_400;
        let now = self.clock.now_ms() / 1000;
        let due: Vec<String> = self.with_state(|st| {
            st.accounts
                .values()
                .filter(|a| {
                    a.record.blocking.api == ApiMode::Learning
                        && now - a.record.last_learned_at.max(a.record.blocking.api_since) >= quiet
                })
                .map(|a| a.record.name.clone())
                .collect()
        });
        let mut switched = Vec::new();
        for account in due {
            self.set_blocking_mode(&account, "api", "active".into(), "allowlistd", |b| {
                b.api = ApiMode::Active
            })
            .await?;
            tracing::warn!(
                account,
                days = self.config.blocking.learning_days,
                "API blocking switched to active by itself: no new address was learned in the quiet period"
            );
            self.notices.raise(super::Notice::BlockingActivated {
                account: account.clone(),
            });
            switched.push(account);
        }
        Ok(switched)
    }
}
