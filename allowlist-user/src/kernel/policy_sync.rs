//! The policy maps the connection hooks and the guard read, written as
//! the plans of `policy_maps`: the pinned maps behind [`PolicyMaps`], their
//! trie keys, and the `Kernel` methods that plan, write and record them.

use super::*;

/// The policy maps, borrowed for one planned change.
struct KernelPolicyMaps<'a> {
    key_state: &'a mut BpfHashMap<MapData, u32, KeyState>,
    key_allow4: &'a mut LpmTrie<MapData, [u8; 8], u8>,
    key_allow6: &'a mut LpmTrie<MapData, [u8; 20], u8>,
    account_allow4: &'a mut LpmTrie<MapData, [u8; 8], u8>,
    account_allow6: &'a mut LpmTrie<MapData, [u8; 20], u8>,
    account_mode: &'a mut BpfHashMap<MapData, u32, u32>,
    guard4: &'a mut LpmTrie<MapData, [u8; 5], u8>,
    guard6: &'a mut LpmTrie<MapData, [u8; 17], u8>,
    guard_ports: &'a mut Array<MapData, u32>,
}

impl PolicyMaps for KernelPolicyMaps<'_> {
    type Error = MapWriteError;
    fn apply(&mut self, op: &PolicyOp) -> Result<(), MapWriteError> {
        match *op {
            PolicyOp::KeyState(kid, Some(st)) => {
                self.key_state.insert(kid, st, 0).map_err(mw("KEY_STATE"))
            }
            PolicyOp::KeyState(kid, None) => {
                ignore_missing(self.key_state.remove(&kid)).map_err(mw("KEY_STATE"))
            }
            PolicyOp::KeyAllow4(kid, n, true) => self
                .key_allow4
                .insert(&trie_key4(kid, &n), 1, 0)
                .map_err(mw("KEY_ALLOW4")),
            PolicyOp::KeyAllow4(kid, n, false) => {
                ignore_missing(self.key_allow4.remove(&trie_key4(kid, &n)))
                    .map_err(mw("KEY_ALLOW4"))
            }
            PolicyOp::KeyAllow6(kid, n, true) => self
                .key_allow6
                .insert(&trie_key6(kid, &n), 1, 0)
                .map_err(mw("KEY_ALLOW6")),
            PolicyOp::KeyAllow6(kid, n, false) => {
                ignore_missing(self.key_allow6.remove(&trie_key6(kid, &n)))
                    .map_err(mw("KEY_ALLOW6"))
            }
            PolicyOp::AccountAllow4(acc, n, Some(v)) => self
                .account_allow4
                .insert(&trie_key4(acc, &n), v, 0)
                .map_err(mw("ACCOUNT_ALLOW4")),
            PolicyOp::AccountAllow4(acc, n, None) => {
                ignore_missing(self.account_allow4.remove(&trie_key4(acc, &n)))
                    .map_err(mw("ACCOUNT_ALLOW4"))
            }
            PolicyOp::AccountAllow6(acc, n, Some(v)) => self
                .account_allow6
                .insert(&trie_key6(acc, &n), v, 0)
                .map_err(mw("ACCOUNT_ALLOW6")),
            PolicyOp::AccountAllow6(acc, n, None) => {
                ignore_missing(self.account_allow6.remove(&trie_key6(acc, &n)))
                    .map_err(mw("ACCOUNT_ALLOW6"))
            }
            PolicyOp::AccountMode(acc, Some(bits)) => self
                .account_mode
                .insert(acc, bits, 0)
                .map_err(mw("ACCOUNT_MODE")),
            PolicyOp::AccountMode(acc, None) => {
                ignore_missing(self.account_mode.remove(&acc)).map_err(mw("ACCOUNT_MODE"))
            }
            PolicyOp::Guard4(svc, n, true) => self
                .guard4
                .insert(&guard_key4(svc, &n), 1, 0)
                .map_err(mw("GUARD4")),
            PolicyOp::Guard4(svc, n, false) => {
                ignore_missing(self.guard4.remove(&guard_key4(svc, &n))).map_err(mw("GUARD4"))
            }
            PolicyOp::Guard6(svc, n, true) => self
                .guard6
                .insert(&guard_key6(svc, &n), 1, 0)
                .map_err(mw("GUARD6")),
            PolicyOp::Guard6(svc, n, false) => {
                ignore_missing(self.guard6.remove(&guard_key6(svc, &n))).map_err(mw("GUARD6"))
            }
            PolicyOp::GuardPort(port, v) => self
                .guard_ports
                .set(u32::from(port), v, 0)
                .map_err(mw("GUARD_PORTS")),
        }
    }
}

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

fn guard_key4(service: u32, n: &Ipv4Net) -> Key<[u8; 5]> {
    let o = n.network().octets();
    Key::new(
        8 + u32::from(n.prefix_len()),
        [service as u8, o[0], o[1], o[2], o[3]],
    )
}

fn guard_key6(service: u32, n: &Ipv6Net) -> Key<[u8; 17]> {
    let mut k = [0u8; 17];
    k[0] = service as u8;
    k[1..].copy_from_slice(&n.network().octets());
    Key::new(8 + u32::from(n.prefix_len()), k)
}

/// Key of the per-key and per-account v4 tries: the key id or account
/// index (big-endian), then the prefix.
fn trie_key4(id: u32, n: &Ipv4Net) -> Key<[u8; 8]> {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&id.to_be_bytes());
    k[4..].copy_from_slice(&n.network().octets());
    Key::new(32 + u32::from(n.prefix_len()), k)
}

fn trie_key6(id: u32, n: &Ipv6Net) -> Key<[u8; 20]> {
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
    pub(super) fn load_guard_state(&mut self) -> Result<(), KernelError> {
        let me = |name: &'static str| move |source| KernelError::Map { name, source };
        for key in self.guard4.keys() {
            let key = key.map_err(me("GUARD4"))?;
            let d = key.data();
            if let Ok(net) = Ipv4Net::new(
                [d[1], d[2], d[3], d[4]].into(),
                (key.prefix_len() - 8) as u8,
            ) {
                self.guard.v4.insert((u32::from(d[0]), net));
            }
        }
        for key in self.guard6.keys() {
            let key = key.map_err(me("GUARD6"))?;
            let d = key.data();
            let mut a = [0u8; 16];
            a.copy_from_slice(&d[1..]);
            if let Ok(net) = Ipv6Net::new(a.into(), (key.prefix_len() - 8) as u8) {
                self.guard.v6.insert((u32::from(d[0]), net));
            }
        }
        for port in 0..=u16::MAX {
            let v = self
                .guard_ports
                .get(&u32::from(port), 0)
                .map_err(me("GUARD_PORTS"))?;
            if v != 0 {
                self.guard.ports.insert(port, v);
            }
        }
        for key in self.key_allow4.keys() {
            let key = key.map_err(me("KEY_ALLOW4"))?;
            if let Some(entry) = trie_entry4(&key) {
                self.keys.v4.insert(entry);
            }
        }
        for key in self.key_allow6.keys() {
            let key = key.map_err(me("KEY_ALLOW6"))?;
            if let Some(entry) = trie_entry6(&key) {
                self.keys.v6.insert(entry);
            }
        }
        for item in self.key_state.iter() {
            let (k, v) = item.map_err(me("KEY_STATE"))?;
            self.keys.state.insert(k, v);
        }
        // With their values: an entry whose value changes is an update.
        for item in self.account_allow4.iter() {
            let (key, v) = item.map_err(me("ACCOUNT_ALLOW4"))?;
            if let Some(entry) = trie_entry4(&key) {
                self.keys.accounts.v4.insert(entry, v);
            }
        }
        for item in self.account_allow6.iter() {
            let (key, v) = item.map_err(me("ACCOUNT_ALLOW6"))?;
            if let Some(entry) = trie_entry6(&key) {
                self.keys.accounts.v6.insert(entry, v);
            }
        }
        for item in self.account_mode.iter() {
            let (acc, bits) = item.map_err(me("ACCOUNT_MODE"))?;
            self.keys.accounts.mode.insert(acc, bits);
        }
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

    fn policy_maps(&mut self) -> KernelPolicyMaps<'_> {
        KernelPolicyMaps {
            key_state: &mut self.key_state,
            key_allow4: &mut self.key_allow4,
            key_allow6: &mut self.key_allow6,
            account_allow4: &mut self.account_allow4,
            account_allow6: &mut self.account_allow6,
            account_mode: &mut self.account_mode,
            guard4: &mut self.guard4,
            guard6: &mut self.guard6,
            guard_ports: &mut self.guard_ports,
        }
    }
}
