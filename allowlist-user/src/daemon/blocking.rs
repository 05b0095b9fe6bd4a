//! API and SMTP blocking modes: manual moves, the impact of activating,
//! and the switch to active after the quiet learning period.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::{
    daemon::{Daemon, DaemonError},
    policy::PrefixSet,
    policy::{ApiMode, SmtpMode},
    store::BlockingState,
};

impl Daemon {
    /// Sets API blocking. Activation by hand that would refuse sources
    /// that called successfully within `learning_days` needs `force`.
    pub async fn set_api_blocking(
        &self,
        mode: ApiMode,
        force: bool,
        actor: &str,
    ) -> Result<BlockingState, DaemonError> {
        if mode == ApiMode::Active && !force {
            let cut = self.activation_impact()?;
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
            "api",
            serde_json::to_value(mode).unwrap_or_default(),
            actor,
            move |b| b.api = mode,
        )
        .await
    }

    pub async fn set_smtp_blocking(
        &self,
        mode: SmtpMode,
        force: bool,
        actor: &str,
    ) -> Result<BlockingState, DaemonError> {
        if mode == SmtpMode::Active && !force && self.with_state(|st| st.authorized.is_empty()) {
            return Err(DaemonError::Invalid(
                "the authorized list is empty, so activating SMTP blocking would cut all SMTP traffic at once; \
                 authorize your senders first (`allowlistctl ips authorize CIDR`), or pass --force"
                    .into(),
            ));
        }
        self.set_blocking_mode(
            "smtp",
            serde_json::to_value(mode).unwrap_or_default(),
            actor,
            move |b| b.smtp = mode,
        )
        .await
    }

    async fn set_blocking_mode(
        &self,
        service: &'static str,
        mode: serde_json::Value,
        actor: &str,
        set: impl FnOnce(&mut BlockingState),
    ) -> Result<BlockingState, DaemonError> {
        let now = self.clock.now_ms() / 1000;
        let mode = mode.as_str().unwrap_or_default().to_string();
        self.change(
            |st| {
                set(&mut st.blocking);
                match service {
                    "api" => st.blocking.api_since = now,
                    _ => st.blocking.smtp_since = now,
                }
                Ok(())
            },
            |_| Ok(self.store.set_blocking(service, &mode, actor, now)?),
        )
        .await?;
        tracing::info!(service, %mode, actor, "blocking mode changed");
        Ok(self.with_state(|st| st.blocking.clone()))
    }

    /// Sources that called successfully within the learning window and
    /// that the authorized list (with `always_allow`) would now refuse.
    pub fn activation_impact(&self) -> Result<Vec<(IpAddr, String)>, DaemonError> {
        let authorized: Vec<IpNet> = self.with_state(|st| st.authorized.keys().copied().collect());
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
            .filter(|(_, at)| **at >= since_ms)
            .filter(|((addr, _), _)| account.longest_match(*addr).is_none())
            .map(|((addr, key), _)| (*addr, key.clone()))
            .collect();
        out.sort();
        Ok(out)
    }

    /// After `learning_days` without a newly learned address, API blocking
    /// turns active by itself (it cannot cut anything: every caller of that
    /// period was learned). Returns whether it switched.
    pub async fn auto_activate(&self) -> Result<bool, DaemonError> {
        if self.with_state(|st| st.blocking.api) != ApiMode::Learning {
            return Ok(false);
        }
        let last = self.store.last_learned_at()?;
        let quiet = i64::from(self.config.blocking.learning_days) * 86_400;
        if self.clock.now_ms() / 1000 - last < quiet {
            return Ok(false);
        }
        self.set_blocking_mode("api", "active".into(), "allowlistd", |b| {
            b.api = ApiMode::Active
        })
        .await?;
        tracing::warn!(
            days = self.config.blocking.learning_days,
            "API blocking switched to active by itself: no new address was learned in the quiet period"
        );
        Ok(true)
    }
}
