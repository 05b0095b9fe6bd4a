//! What the policy snapshot means for the kernel maps: the whole of it (at
//! start and on a reload), or only what one change touched — the changed
//! accounts' key and account entries, and the guard-union prefixes whose
//! count crossed zero. The counts (how many sources put each prefix in
//! the API union) make the union incremental: at 100k keys a change costs
//! what it changes, not what the policy holds.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;

use crate::{
    daemon::{Daemon, DaemonError},
    kernel::{AccountSpec, KeySpec},
    policy::{self, AccountPolicy, ApiMode, KeyStatus, PrefixSet, SmtpMode, Snapshot, source_unit},
};

/// How many sources (`always_allow`, trusted proxies, each account's
/// API sources) put each prefix in the API guard union.
pub(crate) type UnionCounts = HashMap<IpNet, u32>;

fn union_counts(snap: &Snapshot) -> UnionCounts {
    let mut counts = UnionCounts::new();
    let sources = snap
        .always_allow_list
        .iter()
        .chain(&snap.trusted_list)
        .chain(snap.accounts.values().flat_map(|a| a.api_sources.iter()));
    for n in sources {
        *counts.entry(n.trunc()).or_default() += 1;
    }
    counts
}

fn key_specs(a: &AccountPolicy, out: &mut Vec<KeySpec>) {
    out.extend(a.keys.iter().map(|key| KeySpec {
        kid: key.kid,
        revoked: key.status == KeyStatus::Revoked,
        allow: key.allow.clone(),
        account: key.account,
    }));
}

impl Daemon {
    /// What the kernel's account tries hold for `account`: its list in
    /// force and `always_allow` admit; its denied sources (an IPv4 address,
    /// an IPv6 /64) refuse unless `always_allow` covers them, and a listed
    /// prefix inside a denied one is left out (the denial wins there, as in
    /// `decide`). Blocking is active with API blocking in force.
    fn account_spec(&self, account: &AccountPolicy, always: &PrefixSet) -> AccountSpec {
        let denied: Vec<IpNet> = account
            .denied
            .iter()
            .map(|a| unit_net(*a))
            .filter(|n| !always.covers(n))
            .collect();
        let denied_set = PrefixSet::new(denied.iter().copied());
        let mut entries: BTreeMap<IpNet, bool> = account
            .list_entries
            .iter()
            .map(IpNet::trunc)
            .filter(|n| !denied_set.covers(n))
            .chain(self.config.blocking.always_allow.iter().map(IpNet::trunc))
            .map(|n| (n, true))
            .collect();
        entries.extend(denied.into_iter().map(|n| (n, false)));
        AccountSpec {
            idx: account.idx,
            api_active: account.api == ApiMode::Active,
            entries: entries.into_iter().collect(),
        }
    }

    /// The guarded ports `snap` wants: the API port while some account's
    /// API blocking is active and `[kernel] api_guard` wants it, the SMTP
    /// ports while the SMTP account's blocking is active.
    fn guard_ports(&self, snap: &Snapshot) -> Vec<(u8, u16, u32)> {
        let mut ports = Vec::new();
        if snap.api_blocking_active() && self.api_guard_wanted() {
            ports.push((
                allowlist_common::PROTO_TCP,
                self.config.proxy.listen.port(),
                allowlist_common::SERVICE_API,
            ));
        }
        if snap.smtp().is_some_and(|a| a.smtp == SmtpMode::Active) {
            for p in &self.config.kernel.smtp_ports {
                ports.push((
                    allowlist_common::PROTO_TCP,
                    *p,
                    allowlist_common::SERVICE_SMTP,
                ));
            }
        }
        ports
    }

    /// Writes what `snap` means for the kernel, whole: per-key allowlists
    /// and states, per-account lists and modes, and, for services whose
    /// blocking is active, the guard. At start, on a reload, and to put a
    /// whole policy back.
    pub(crate) fn sync_policy_kernel(&self, snap: &Snapshot) -> Result<(), DaemonError> {
        let Some(mut k) = self.kernel() else {
            return Ok(());
        };
        let mut specs = Vec::new();
        for a in snap.accounts.values() {
            key_specs(a, &mut specs);
        }
        let accounts: Vec<AccountSpec> = snap
            .accounts
            .values()
            .map(|a| self.account_spec(a, &snap.always_allow))
            .collect();
        k.sync_keys(&specs, &accounts)?;
        let counts = union_counts(snap);
        let unions = [
            (
                allowlist_common::SERVICE_API,
                counts.keys().copied().collect(),
            ),
            (allowlist_common::SERVICE_SMTP, snap.smtp_guard_union()),
        ];
        k.sync_guard(&unions, &self.guard_ports(snap))?;
        *self.union_counts.lock().unwrap_or_else(|p| p.into_inner()) = counts;
        Ok(())
    }

    /// Writes only what differs between `old` and `new` (snapshots that
    /// share every account piece a change did not touch). On a failure
    /// nothing is changed.
    pub(crate) fn sync_policy_delta(
        &self,
        old: &Snapshot,
        new: &Snapshot,
    ) -> Result<(), DaemonError> {
        let Some(mut k) = self.kernel() else {
            return Ok(());
        };
        let (mut old_keys, mut old_accounts, mut new_keys, mut new_accounts) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut api: BTreeMap<IpNet, i64> = BTreeMap::new();
        let mut smtp_changed = false;
        let mut touch = |a: &Arc<AccountPolicy>,
                         keys: &mut Vec<KeySpec>,
                         accounts: &mut Vec<AccountSpec>,
                         sign: i64| {
            key_specs(a, keys);
            accounts.push(self.account_spec(a, &new.always_allow));
            for n in &a.api_sources {
                *api.entry(n.trunc()).or_default() += sign;
            }
            if a.name == new.smtp_account {
                smtp_changed = true;
            }
        };
        for (idx, a) in &new.accounts {
            match old.accounts.get(idx) {
                Some(o) if Arc::ptr_eq(o, a) => continue,
                Some(o) => touch(o, &mut old_keys, &mut old_accounts, -1),
                None => {}
            }
            touch(a, &mut new_keys, &mut new_accounts, 1);
        }
        for (idx, o) in &old.accounts {
            if !new.accounts.contains_key(idx) {
                touch(o, &mut old_keys, &mut old_accounts, -1);
            }
        }
        k.sync_keys_delta((&old_keys, &old_accounts), (&new_keys, &new_accounts))?;
        let mut counts = self.union_counts.lock().unwrap_or_else(|p| p.into_inner());
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        for (n, d) in &api {
            let before = i64::from(counts.get(n).copied().unwrap_or(0));
            let after = before + d;
            if before == 0 && after > 0 {
                add.push((allowlist_common::SERVICE_API, *n));
            } else if before > 0 && after <= 0 {
                remove.push((allowlist_common::SERVICE_API, *n));
            }
        }
        if smtp_changed {
            let (was, now) = (old.smtp_guard_union(), new.smtp_guard_union());
            let was: std::collections::HashSet<IpNet> = was.into_iter().collect();
            let now: std::collections::HashSet<IpNet> = now.into_iter().collect();
            add.extend(
                now.difference(&was)
                    .map(|n| (allowlist_common::SERVICE_SMTP, *n)),
            );
            remove.extend(
                was.difference(&now)
                    .map(|n| (allowlist_common::SERVICE_SMTP, *n)),
            );
        }
        if let Err(e) = k.sync_guard_delta(&add, &remove, &self.guard_ports(new)) {
            // The key maps took the change; put them back.
            if let Err(undo) =
                k.sync_keys_delta((&new_keys, &new_accounts), (&old_keys, &old_accounts))
            {
                tracing::error!(error = %undo, "restoring the key maps after a failed guard write");
            }
            return Err(e.into());
        }
        for (n, d) in api {
            let c = counts.entry(n).or_default();
            let after = i64::from(*c) + d;
            if after <= 0 {
                counts.remove(&n);
            } else {
                *c = after as u32;
            }
        }
        Ok(())
    }

    /// Writes the guarded ports alone (the API guard armed or disarmed).
    pub(crate) fn sync_guard_ports(&self, snap: &Snapshot) -> Result<(), DaemonError> {
        let Some(mut k) = self.kernel() else {
            return Ok(());
        };
        k.sync_guard_delta(&[], &[], &self.guard_ports(snap))?;
        Ok(())
    }
}

/// The kernel entry of a denied source: an IPv4 address, or an IPv6 /64.
fn unit_net(addr: IpAddr) -> IpNet {
    match source_unit(addr) {
        IpAddr::V4(a) => IpNet::from(IpAddr::V4(a)),
        IpAddr::V6(a) => IpNet::new(IpAddr::V6(a), policy::LEARN_V6_PREFIX).expect("valid"),
    }
}
