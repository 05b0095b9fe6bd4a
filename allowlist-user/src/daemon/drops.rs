//! The kernel drop list: operator entries, denials, promotions, expiry.

use crate::{
    api,
    kernel::{self, DropSpec, KernelError},
    store::{DropKind, DropRecord, unix_now},
};

use super::*;

impl Daemon {
    /// Writes the stored drop list into the kernel maps (as a diff).
    pub fn sync_kernel(&self, records: &[DropRecord]) -> Result<(), KernelError> {
        let Some(mut k) = self.kernel() else {
            return Ok(());
        };
        let (wall, mono) = (wall_now_ms(), crate::sys::monotonic_ns());
        let always = &self.config.blocking.always_allow;
        let specs: Vec<DropSpec> = records
            .iter()
            // Lockout protection holds for entries stored before the
            // configuration named the network too.
            .filter(|r| {
                let overlap = always
                    .iter()
                    .find(|a| a.contains(&r.cidr) || r.cidr.contains(*a));
                if let Some(a) = overlap {
                    tracing::warn!(cidr = %r.cidr, always_allow = %a, "drop entry not enforced: it overlaps [blocking] always_allow");
                }
                overlap.is_none()
            })
            .filter_map(|r| to_spec(r, wall, mono))
            .collect();
        k.sync_drops(&specs)
    }

    pub fn list_drops(&self) -> Result<api::DropList, DaemonError> {
        let drops = self.store.list_drops()?.into_iter().map(view).collect();
        Ok(api::DropList { drops })
    }

    pub async fn add_drop(
        &self,
        req: api::AddDrop,
        actor: &str,
    ) -> Result<api::DropView, DaemonError> {
        self.add_drop_kind(req, DropKind::Manual, actor).await
    }

    /// Adds many entries in one change: every entry checked first (one
    /// bad entry refuses the whole import, naming it), then one kernel
    /// write of the list, one store transaction.
    pub async fn add_drops(
        &self,
        reqs: Vec<api::AddDrop>,
        actor: &str,
    ) -> Result<api::DropImportOutcome, DaemonError> {
        const MAX: usize = 2_000_000;
        if reqs.is_empty() || reqs.len() > MAX {
            return Err(DaemonError::Invalid(format!(
                "an import holds 1 to {MAX} entries ({} given)",
                reqs.len()
            )));
        }
        let now = unix_now();
        let given = reqs.len();
        let mut bad = BadEntries::default();
        let mut recs: std::collections::HashMap<ipnet::IpNet, DropRecord> = Default::default();
        for (i, req) in reqs.into_iter().enumerate() {
            let cidr = req.cidr.clone();
            match self.drop_record(req, DropKind::Manual, actor, now) {
                Ok(r) => {
                    recs.insert(r.cidr, r);
                }
                Err(e) => bad.push(i, &cidr, e),
            }
        }
        bad.check(given)?;
        let _guard = self.changes.lock().await;
        let old = self.store.list_drops()?;
        let mut all: Vec<DropRecord> = old
            .iter()
            .filter(|r| !recs.contains_key(&r.cidr))
            .cloned()
            .collect();
        let written: Vec<DropRecord> = recs.into_values().collect();
        all.extend(written.iter().cloned());
        self.sync_kernel(&all)?;
        if let Err(e) = self.store.put_drops(&written, actor) {
            if let Err(k) = self.sync_kernel(&old) {
                tracing::error!(error = %k, "restoring the kernel drop list after a store failure");
            }
            return Err(e.into());
        }
        tracing::info!(
            written = written.len(),
            total = all.len(),
            actor,
            "drop list: imported"
        );
        Ok(api::DropImportOutcome {
            written: written.len(),
            total: all.len(),
        })
    }

    pub async fn add_drop_kind(
        &self,
        req: api::AddDrop,
        kind: DropKind,
        actor: &str,
    ) -> Result<api::DropView, DaemonError> {
        let now = unix_now();
        let rec = self.drop_record(req.clone(), kind, actor, now)?;
        let cidr = rec.cidr;
        let _guard = self.changes.lock().await;
        let mut all = self.store.list_drops()?;
        let old = all.clone();
        all.retain(|r| r.cidr != cidr);
        all.push(rec.clone());
        // Kernel first: a change that does not fit is refused before
        // anything is stored. If storing then fails, the kernel goes back.
        self.sync_kernel(&all)?;
        if let Err(e) = self.store.put_drop(&rec, actor) {
            if let Err(k) = self.sync_kernel(&old) {
                tracing::error!(error = %k, "restoring the kernel drop list after a store failure");
            }
            return Err(e.into());
        }
        tracing::info!(%cidr, ttl = ?req.ttl, actor, "drop list: added");
        // As made: its expiry counted from the same clock reading that set
        // it, so `--ttl 1h` answers 3600 even when a second ticks over
        // while the change is written.
        Ok(view_at(rec, now))
    }

    /// The entry `req` asks for, checked: a valid prefix outside
    /// `always_allow`, a TTL, a reason of at most 500 characters.
    fn drop_record(
        &self,
        req: api::AddDrop,
        kind: DropKind,
        actor: &str,
        now: i64,
    ) -> Result<DropRecord, DaemonError> {
        let cidr = parse_cidr(&req.cidr).map_err(DaemonError::Invalid)?;
        kernel::droplist::validate(&cidr).map_err(|e| DaemonError::Invalid(e.to_string()))?;
        if let Some(allowed) = self
            .config
            .blocking
            .always_allow
            .iter()
            .find(|a| a.contains(&cidr) || cidr.contains(*a))
        {
            return Err(DaemonError::Invalid(format!(
                "{cidr} overlaps {allowed} in [blocking] always_allow, which is never dropped (lockout protection); \
                 drop a narrower prefix outside it, or change the configuration"
            )));
        }
        let expires_at = match &req.ttl {
            Some(t) => Some(now + parse_ttl(t).map_err(DaemonError::Invalid)?.as_secs() as i64),
            None => None,
        };
        let reason = req.reason.unwrap_or_default();
        if reason.len() > 500 {
            return Err(DaemonError::Invalid(
                "--reason is longer than 500 characters".into(),
            ));
        }
        Ok(DropRecord {
            cidr,
            kind,
            reason,
            created_at: now,
            expires_at,
            created_by: actor.to_string(),
        })
    }

    pub async fn remove_drop(&self, cidr: &str, actor: &str) -> Result<api::DropView, DaemonError> {
        let cidr = parse_cidr(cidr).map_err(DaemonError::Invalid)?;
        let _guard = self.changes.lock().await;
        let old = self.store.list_drops()?;
        if !old.iter().any(|r| r.cidr == cidr) {
            return Err(DaemonError::NotFound(format!(
                "{cidr} is not on the drop list; `allowlistctl drop list` shows what is"
            )));
        }
        let all: Vec<DropRecord> = old.iter().filter(|r| r.cidr != cidr).cloned().collect();
        // The same order as every change: kernel, then store, and the
        // kernel put back if the store fails.
        self.sync_kernel(&all)?;
        let prev = match self.store.remove_drop(&cidr, actor) {
            Ok(Some(prev)) => prev,
            Ok(None) => {
                return Err(DaemonError::NotFound(format!(
                    "{cidr} is not on the drop list"
                )));
            }
            Err(e) => {
                if let Err(k) = self.sync_kernel(&old) {
                    tracing::error!(error = %k, "restoring the kernel drop list after a store failure");
                }
                return Err(e.into());
            }
        };
        tracing::info!(%cidr, actor, "drop list: removed");
        Ok(view(prev))
    }

    pub async fn sweep(&self) -> Result<usize, DaemonError> {
        let _guard = self.changes.lock().await;
        // One indexed DELETE when nothing expired (the common second). The
        // kernel checks expiries itself, so entries it still holds after a
        // failed sync below are never enforced.
        let expired = self.store.remove_expired_drops(unix_now())?;
        if !expired.is_empty() {
            let all = self.store.list_drops()?;
            self.sync_kernel(&all)?;
            for r in &expired {
                tracing::info!(cidr = %r.cidr, "drop list: expired");
            }
        }
        Ok(expired.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing() {
        assert_eq!(parse_cidr("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(
            parse_cidr("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        assert_eq!(
            parse_cidr("198.51.100.0/24").unwrap().to_string(),
            "198.51.100.0/24"
        );
        let e = parse_cidr("203.0.113.5/24").unwrap_err();
        assert!(e.contains("did you mean 203.0.113.0/24?"), "{e}");
        let e = parse_cidr("2001:db8::1/32").unwrap_err();
        assert!(e.contains("did you mean 2001:db8::/32?"), "{e}");
        assert!(
            parse_cidr("300.1.1.1")
                .unwrap_err()
                .contains("not an IP address")
        );
        assert!(parse_cidr("1.2.3.4/33").is_err());
    }

    #[test]
    fn since_parsing() {
        assert_eq!(parse_since("1700000000", 0), Ok(1_700_000_000));
        assert_eq!(parse_since("24h", 100_000), Ok(100_000 - 86_400));
        assert_eq!(parse_since("2026-11-30T00:00:00Z", 0), Ok(1_795_996_800));
        assert!(
            parse_since("yesterday-ish", 0)
                .unwrap_err()
                .contains("--since")
        );
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert!(parse_ttl("soon").unwrap_err().contains("like 90s"));
        assert!(parse_ttl("0s").is_err());
    }

    #[test]
    fn expired_records_are_not_enforced() {
        let mut r = DropRecord {
            cidr: "192.0.2.0/24".parse().unwrap(),
            kind: DropKind::Manual,
            reason: String::new(),
            created_at: 0,
            expires_at: Some(100),
            created_by: "t".into(),
        };
        assert!(to_spec(&r, 100_000, 5).is_none());
        let s = to_spec(&r, 99_000, 5).unwrap();
        assert_eq!(s.expires_ns, 5 + 1_000_000_000);
        r.expires_at = None;
        assert_eq!(to_spec(&r, 99_000, 5).unwrap().expires_ns, 0);
    }
}
