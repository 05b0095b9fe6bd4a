//! The policy maps the connection hooks and the guard read, written as
//! the plans of `policy_maps`: their trie keys, and the `Kernel` methods
//! that plan, write (through `policy_tables`) and record them.

use super::*;
use policy_tables::KernelPolicyMaps;

fn full(family: &'static str) -> impl Fn(TooMany) -> KernelError {
    move |t| KernelError::GuardFull {
        family,
        wanted: t.peak,
        capacity: t.capacity as u32,
    }
}

/// A per-key or per-account map that would overflow, named as it is.
fn full_map(t: TooMany) -> KernelError {
    KernelError::GuardFull {
        family: t.map,
        wanted: t.peak,
        capacity: t.capacity as u32,
    }
}

fn exec_error(e: ExecError<MapWriteError>) -> KernelError {
    KernelError::Write(e.to_string())
}

pub(super) fn guard_key4(service: u32, n: &Ipv4Net) -> Key<[u8; 5]> {
    let o = n.network().octets();
    Key::new(
        8 + u32::from(n.prefix_len()),
        [service as u8, o[0], o[1], o[2], o[3]],
    )
}

pub(super) fn guard_key6(service: u32, n: &Ipv6Net) -> Key<[u8; 17]> {
    let mut k = [0u8; 17];
    k[0] = service as u8;
    k[1..].copy_from_slice(&n.network().octets());
    Key::new(8 + u32::from(n.prefix_len()), k)
}

/// Key of the per-key and per-account v4 tries: the key id or account
/// index (big-endian), then the prefix.
pub(super) fn trie_key4(id: u32, n: &Ipv4Net) -> Key<[u8; 8]> {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&id.to_be_bytes());
    k[4..].copy_from_slice(&n.network().octets());
    Key::new(32 + u32::from(n.prefix_len()), k)
}

pub(super) fn trie_key6(id: u32, n: &Ipv6Net) -> Key<[u8; 20]> {
    let mut k = [0u8; 20];
    k[..4].copy_from_slice(&id.to_be_bytes());
    k[4..].copy_from_slice(&n.network().octets());
    Key::new(32 + u32::from(n.prefix_len()), k)
}

/// The id and prefix of a per-key or per-account v4 trie key.
fn trie_entry4(key: &Key<[u8; 8]>) -> Option<(u32, Ipv4Net)> {
    let d = key.data();
    let net = Ipv4Net::new(
        [d[4], d[5], d[6], d[7]].into(),
        key.prefix_len().checked_sub(32)? as u8,
    )
    .ok()?;
    Some((u32::from_be_bytes([d[0], d[1], d[2], d[3]]), net))
}

fn trie_entry6(key: &Key<[u8; 20]>) -> Option<(u32, Ipv6Net)> {
    let d = key.data();
    let mut a = [0u8; 16];
    a.copy_from_slice(&d[4..]);
    let net = Ipv6Net::new(a.into(), key.prefix_len().checked_sub(32)? as u8).ok()?;
    Some((u32::from_be_bytes([d[0], d[1], d[2], d[3]]), net))
}

impl Kernel {
    /// Reads back what an earlier daemon wrote to the pinned policy maps,
    /// whole maps per syscall batch, so the next sync writes a diff.
    pub(super) fn load_guard_state(&mut self) -> Result<(), KernelError> {
        let read = self
            .policy_tables
            .read()
            .map_err(|e| KernelError::Write(format!("reading the pinned policy maps: {e}")))?;
        for (key, _) in read.guard4 {
            let d = key.data();
            if let Ok(net) = Ipv4Net::new(
                [d[1], d[2], d[3], d[4]].into(),
                (key.prefix_len() - 8) as u8,
            ) {
                self.guard.v4.insert((u32::from(d[0]), net));
            }
        }
        for (key, _) in read.guard6 {
            let d = key.data();
            let mut a = [0u8; 16];
            a.copy_from_slice(&d[1..]);
            if let Ok(net) = Ipv6Net::new(a.into(), (key.prefix_len() - 8) as u8) {
                self.guard.v6.insert((u32::from(d[0]), net));
            }
        }
        for (port, v) in read.guard_ports {
            if let (Ok(port), true) = (u16::try_from(port), v != 0) {
                self.guard.ports.insert(port, v);
            }
        }
        self.keys
            .v4
            .extend(read.key_allow4.iter().filter_map(|(k, _)| trie_entry4(k)));
        self.keys
            .v6
            .extend(read.key_allow6.iter().filter_map(|(k, _)| trie_entry6(k)));
        self.keys.state.extend(read.key_state);
        // With their values: an entry whose value changes is an update.
        for (key, v) in read.account_allow4 {
            if let Some(entry) = trie_entry4(&key) {
                self.keys.accounts.v4.insert(entry, v);
            }
        }
        for (key, v) in read.account_allow6 {
            if let Some(entry) = trie_entry6(&key) {
                self.keys.accounts.v6.insert(entry, v);
            }
        }
        self.keys.accounts.mode.extend(read.account_mode);
        Ok(())
    }

    /// Makes the per-key maps (allowlist tries, states with their account)
    /// hold exactly `keys` and the per-account maps (tries, modes) exactly
    /// `accounts`. Every write that narrows what the connection hooks admit
    /// runs before every write that widens it (see `policy_maps`), so while
    /// the change is written the kernel never admits a (key, client) that
    /// neither the old nor the new policy admits. A write that fails undoes
    /// the others; nothing is changed.
    pub fn sync_keys(
        &mut self,
        keys: &[KeySpec],
        accounts: &[AccountSpec],
    ) -> Result<(), KernelError> {
        let r = self.write_keys(keys, accounts);
        self.bump_policy_gen();
        r
    }

    /// Tells the connection hooks that the maps they read have changed, so
    /// every live connection is checked again on its next packet. Also after
    /// a failed sync: some of its writes may have landed.
    fn bump_policy_gen(&mut self) {
        let next = match self.policy_gen.get(&0, 0).unwrap_or(0).wrapping_add(1) {
            0 => 1,
            n => n,
        };
        if let Err(e) = self.policy_gen.set(0, next, 0) {
            tracing::warn!(error = %e, "bumping POLICY_GEN");
        }
    }

    /// [`Kernel::sync_keys`] for the keys and accounts one change touched
    /// (see [`policy_maps::plan_keys_delta`]): `old` and `new` are their
    /// specs before and after. The same order and the same undo, at the
    /// cost of the change rather than of the whole policy.
    pub fn sync_keys_delta(
        &mut self,
        old: (&[KeySpec], &[AccountSpec]),
        new: (&[KeySpec], &[AccountSpec]),
    ) -> Result<(), KernelError> {
        let r = self.write_keys_delta(old, new);
        self.bump_policy_gen();
        r
    }

    fn write_keys_delta(
        &mut self,
        old: (&[KeySpec], &[AccountSpec]),
        new: (&[KeySpec], &[AccountSpec]),
    ) -> Result<(), KernelError> {
        let plan =
            policy_maps::plan_keys_delta(&self.keys, old, new, self.opts.guard_capacity as usize)
                .map_err(full_map)?;
        policy_maps::execute(&mut self.policy_maps(), &plan.ops).map_err(exec_error)?;
        self.keys.apply(plan.record);
        Ok(())
    }

    /// [`Kernel::sync_guard`] for prefixes entering (`add`) and leaving
    /// (`remove`) the unions, as `(service, prefix)`; `ports` is every
    /// guarded port afterwards.
    pub fn sync_guard_delta(
        &mut self,
        add: &[(u32, IpNet)],
        remove: &[(u32, IpNet)],
        ports: &[(u8, u16, u32)],
    ) -> Result<(), KernelError> {
        let r = policy_maps::plan_guard_delta(
            &self.guard,
            add,
            remove,
            ports,
            2 * self.opts.guard_capacity as usize,
        )
        .map_err(full("guard union"))
        .and_then(|plan| {
            policy_maps::execute(&mut self.policy_maps(), &plan.ops).map_err(exec_error)?;
            self.guard.apply(plan.record);
            Ok(())
        });
        self.bump_policy_gen();
        r
    }

    fn write_keys(
        &mut self,
        keys: &[KeySpec],
        accounts: &[AccountSpec],
    ) -> Result<(), KernelError> {
        let plan = policy_maps::plan_keys(
            &self.keys,
            keys,
            accounts,
            self.opts.guard_capacity as usize,
        )
        .map_err(full_map)?;
        policy_maps::execute(&mut self.policy_maps(), &plan.ops).map_err(exec_error)?;
        self.keys = plan.record;
        Ok(())
    }

    /// Makes the guard hold exactly `unions` (per service: the sources
    /// that service may be reached from) and guard exactly `ports`
    /// (`(proto, port, service)`). Additions are written before removals,
    /// and ports are armed last, so a change never drops a source that both
    /// the old and the new union admit; a write that fails undoes the rest.
    pub fn sync_guard(
        &mut self,
        unions: &[(u32, Vec<IpNet>)],
        ports: &[(u8, u16, u32)],
    ) -> Result<(), KernelError> {
        let r = self.write_guard(unions, ports);
        self.bump_policy_gen();
        r
    }

    fn write_guard(
        &mut self,
        unions: &[(u32, Vec<IpNet>)],
        ports: &[(u8, u16, u32)],
    ) -> Result<(), KernelError> {
        let plan = policy_maps::plan_guard(
            &self.guard,
            unions,
            ports,
            2 * self.opts.guard_capacity as usize,
        )
        .map_err(full("guard union"))?;
        policy_maps::execute(&mut self.policy_maps(), &plan.ops).map_err(exec_error)?;
        self.guard = plan.record;
        Ok(())
    }

    fn policy_maps(&self) -> KernelPolicyMaps<'_> {
        KernelPolicyMaps(&self.policy_tables)
    }
}
