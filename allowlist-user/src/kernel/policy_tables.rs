//! The pinned policy maps behind [`PolicyMaps`]. A plan's consecutive
//! writes to one map (a cold start writes millions of allowlist entries)
//! go to the kernel as one run, in batches where it has batch commands
//! (on 6.18 the LPM tries do too).

use allowlist_common::KeyState;
use aya::{Ebpf, maps::lpm_trie::Key};

use super::{
    KernelError, MapWriteError,
    map_batch::Table,
    policy_maps::{PolicyMaps, PolicyOp},
    policy_sync::{guard_key4, guard_key6, trie_key4, trie_key6},
    table,
};

/// The policy maps, for writing.
pub(super) struct PolicyTables {
    key_state: Table<u32, KeyState>,
    key_allow4: Table<Key<[u8; 8]>, u8>,
    key_allow6: Table<Key<[u8; 20]>, u8>,
    account_allow4: Table<Key<[u8; 8]>, u8>,
    account_allow6: Table<Key<[u8; 20]>, u8>,
    account_mode: Table<u32, u32>,
    guard4: Table<Key<[u8; 5]>, u8>,
    guard6: Table<Key<[u8; 17]>, u8>,
    guard_ports: Table<u32, u32>,
}

impl PolicyTables {
    pub(super) fn new(ebpf: &Ebpf, batched: bool) -> Result<Self, KernelError> {
        Ok(PolicyTables {
            key_state: table(ebpf, "KEY_STATE", batched)?,
            key_allow4: table(ebpf, "KEY_ALLOW4", batched)?,
            key_allow6: table(ebpf, "KEY_ALLOW6", batched)?,
            account_allow4: table(ebpf, "ACCOUNT_ALLOW4", batched)?,
            account_allow6: table(ebpf, "ACCOUNT_ALLOW6", batched)?,
            account_mode: table(ebpf, "ACCOUNT_MODE", batched)?,
            guard4: table(ebpf, "GUARD4", batched)?,
            guard6: table(ebpf, "GUARD6", batched)?,
            guard_ports: table(ebpf, "GUARD_PORTS", batched)?,
        })
    }
}

/// Every entry of every policy map, as a restarted daemon reads them.
pub(super) struct PolicyRead {
    pub(super) key_state: Vec<(u32, KeyState)>,
    pub(super) key_allow4: Vec<(Key<[u8; 8]>, u8)>,
    pub(super) key_allow6: Vec<(Key<[u8; 20]>, u8)>,
    pub(super) account_allow4: Vec<(Key<[u8; 8]>, u8)>,
    pub(super) account_allow6: Vec<(Key<[u8; 20]>, u8)>,
    pub(super) account_mode: Vec<(u32, u32)>,
    pub(super) guard4: Vec<(Key<[u8; 5]>, u8)>,
    pub(super) guard6: Vec<(Key<[u8; 17]>, u8)>,
    pub(super) guard_ports: Vec<(u32, u32)>,
}

impl PolicyTables {
    pub(super) fn read(&self) -> Result<PolicyRead, MapWriteError> {
        Ok(PolicyRead {
            key_state: self.key_state.entries()?,
            key_allow4: self.key_allow4.entries()?,
            key_allow6: self.key_allow6.entries()?,
            account_allow4: self.account_allow4.entries()?,
            account_allow6: self.account_allow6.entries()?,
            account_mode: self.account_mode.entries()?,
            guard4: self.guard4.entries()?,
            guard6: self.guard6.entries()?,
            guard_ports: self.guard_ports.entries()?,
        })
    }
}

/// The tables, borrowed for one planned change.
pub(super) struct KernelPolicyMaps<'a>(pub(super) &'a PolicyTables);

/// What one op writes: its key, and its value when the entry exists after.
type Entry<K, V> = (K, Option<V>);

fn entry(op: &PolicyOp) -> OpEntry {
    match *op {
        PolicyOp::KeyState(kid, st) => OpEntry::KeyState((kid, st)),
        PolicyOp::KeyAllow4(kid, n, on) => {
            OpEntry::KeyAllow4((trie_key4(kid, &n), on.then_some(1)))
        }
        PolicyOp::KeyAllow6(kid, n, on) => {
            OpEntry::KeyAllow6((trie_key6(kid, &n), on.then_some(1)))
        }
        PolicyOp::AccountAllow4(acc, n, v) => OpEntry::AccountAllow4((trie_key4(acc, &n), v)),
        PolicyOp::AccountAllow6(acc, n, v) => OpEntry::AccountAllow6((trie_key6(acc, &n), v)),
        PolicyOp::AccountMode(acc, bits) => OpEntry::AccountMode((acc, bits)),
        PolicyOp::Guard4(svc, n, on) => OpEntry::Guard4((guard_key4(svc, &n), on.then_some(1))),
        PolicyOp::Guard6(svc, n, on) => OpEntry::Guard6((guard_key6(svc, &n), on.then_some(1))),
        // A port slot always exists (an array); zero disarms it.
        PolicyOp::GuardPort(port, v) => OpEntry::GuardPort((u32::from(port), Some(v))),
    }
}

enum OpEntry {
    KeyState(Entry<u32, KeyState>),
    KeyAllow4(Entry<Key<[u8; 8]>, u8>),
    KeyAllow6(Entry<Key<[u8; 20]>, u8>),
    AccountAllow4(Entry<Key<[u8; 8]>, u8>),
    AccountAllow6(Entry<Key<[u8; 20]>, u8>),
    AccountMode(Entry<u32, u32>),
    Guard4(Entry<Key<[u8; 5]>, u8>),
    Guard6(Entry<Key<[u8; 17]>, u8>),
    GuardPort(Entry<u32, u32>),
}

/// Writes a run of entries to one table: all sets or all deletes (a run
/// never mixes them, see `policy_maps::execute`).
fn write<K: aya::Pod, V: aya::Pod>(
    table: &Table<K, V>,
    entries: impl Iterator<Item = Entry<K, V>>,
) -> Result<(), MapWriteError> {
    let mut set = Vec::new();
    let mut gone = Vec::new();
    for (k, v) in entries {
        match v {
            Some(v) => set.push((k, v)),
            None => gone.push(k),
        }
    }
    table.set(&set)?;
    table.delete(&gone)
}

impl PolicyMaps for KernelPolicyMaps<'_> {
    type Error = MapWriteError;

    fn apply(&mut self, op: &PolicyOp) -> Result<(), MapWriteError> {
        self.apply_run(std::slice::from_ref(op))
    }

    fn apply_run(&mut self, ops: &[PolicyOp]) -> Result<(), MapWriteError> {
        let t = self.0;
        // Every op of a run names the same map (`PolicyOp::entry`).
        macro_rules! run {
            ($variant:ident, $table:expr) => {
                write(
                    $table,
                    ops.iter().map(|op| match entry(op) {
                        OpEntry::$variant(e) => e,
                        _ => unreachable!("a run holds ops of one map"),
                    }),
                )
            };
        }
        let Some(first) = ops.first() else {
            return Ok(());
        };
        match entry(first) {
            OpEntry::KeyState(_) => run!(KeyState, &t.key_state),
            OpEntry::KeyAllow4(_) => run!(KeyAllow4, &t.key_allow4),
            OpEntry::KeyAllow6(_) => run!(KeyAllow6, &t.key_allow6),
            OpEntry::AccountAllow4(_) => run!(AccountAllow4, &t.account_allow4),
            OpEntry::AccountAllow6(_) => run!(AccountAllow6, &t.account_allow6),
            OpEntry::AccountMode(_) => run!(AccountMode, &t.account_mode),
            OpEntry::Guard4(_) => run!(Guard4, &t.guard4),
            OpEntry::Guard6(_) => run!(Guard6, &t.guard6),
            OpEntry::GuardPort(_) => run!(GuardPort, &t.guard_ports),
        }
    }
}
