//! Arming the API guard, recording guard drops, promoting sources that
//! keep failing (the bookkeeping is in `crate::defense`).

use std::{net::IpAddr, sync::atomic::Ordering};

use crate::{
    daemon::{Daemon, DaemonError},
    flood::ApiGuardMode,
};

impl Daemon {
    /// Whether `[kernel] api_guard` wants the API port guarded now (API
    /// blocking active is checked by the caller).
    pub(super) fn api_guard_wanted(&self) -> bool {
        match self.config.kernel.api_guard {
            ApiGuardMode::On => true,
            ApiGuardMode::Off => false,
            ApiGuardMode::Auto => self.defense.api_armed(),
        }
    }

    /// What `stats` says about the API guard.
    pub fn api_guard_state(&self) -> crate::api::ApiGuardState {
        let mode = self.config.kernel.api_guard;
        let active = self.policy.load().api_blocking_active();
        let (armed, reason) = match (self.kernel().is_some(), active, mode) {
            (false, _, _) => (false, "kernel enforcement is off".to_string()),
            (_, false, _) => (false, "API blocking is not active".to_string()),
            (_, true, ApiGuardMode::Off) => (false, "api_guard = off".to_string()),
            (_, true, ApiGuardMode::On) => (
                true,
                "api_guard = on and API blocking is active".to_string(),
            ),
            (_, true, ApiGuardMode::Auto) => {
                let why = self.defense.reason();
                let armed = self.defense.api_armed();
                let why = if why.is_empty() {
                    "api_guard = auto: no connection flood seen".to_string()
                } else {
                    format!("api_guard = auto: {why}")
                };
                (armed, why)
            }
        };
        crate::api::ApiGuardState {
            mode: mode.as_str().into(),
            armed,
            reason,
        }
    }

    /// Arms or disarms the API guard (`auto` mode) and writes the guard
    /// ports to the kernel when that changes.
    pub async fn set_api_guard(&self, armed: bool, why: String) -> Result<(), DaemonError> {
        let _guard = self.changes.lock().await;
        let before = self.defense.reason();
        if !self.defense.set_api_armed(armed, why.clone()) {
            return Ok(());
        }
        let snap = self.policy.load();
        if let Err(e) = self.sync_guard_ports(&snap) {
            // The kernel did not take it: say what is really in force.
            self.defense.set_api_armed(!armed, before);
            return Err(e);
        }
        tracing::info!(armed, reason = %why, "API guard");
        Ok(())
    }

    /// Writes the guard drops gathered from kernel events to the
    /// unauthorized list (API while armed, SMTP always).
    pub fn flush_guard_drops(&self) -> Result<(), DaemonError> {
        let batch = self.defense.take_guard_drops();
        if batch.is_empty() {
            return Ok(());
        }
        let evicted = self
            .store
            .record_unauthorized(&batch, self.config.blocking.unauthorized_max)?;
        for r in &batch {
            self.notices.raise(super::Notice::Blocked {
                account: r.account.clone(),
                addr: r.addr,
                key_id: String::new(),
                service: if r.service == "smtp" { "smtp" } else { "api" },
                by_key: false,
            });
        }
        self.unauthorized_evicted
            .fetch_add(evicted, Ordering::Relaxed);
        Ok(())
    }

    /// Counts refusals per source and promotes those that keep failing to
    /// the drop list, with an expiry that doubles each time one returns.
    pub async fn note_refusals(&self, refused: &[(IpAddr, u64)]) {
        let k = &self.config.kernel;
        let now = self.clock.now_ms() / 1000;
        let promote = self.defense.failures(
            refused,
            now,
            k.promote_after,
            k.promote_window_secs,
            k.promote_ttl_secs,
        );
        for (source, secs) in promote {
            let cidr = match source {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("{a}/64"),
            };
            let req = crate::api::AddDrop {
                cidr: cidr.clone(),
                ttl: Some(format!("{secs}s")),
                reason: Some(format!(
                    "promoted: {} refusals within {} s",
                    k.promote_after, k.promote_window_secs
                )),
            };
            match self
                .add_drop_kind(req, crate::store::DropKind::Auto, "promotion")
                .await
            {
                Ok(_) => {
                    self.defense.promoted(source, secs, now);
                    tracing::info!(%cidr, ttl_secs = secs, "promoted a source that keeps failing to the drop list");
                }
                Err(e) => tracing::warn!(%cidr, error = %e, "promoting a source to the drop list"),
            }
        }
    }
}
