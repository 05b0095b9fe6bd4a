//! Loading, pinning and feeding the eBPF programs.
//!
//! Everything lives under the configured bpffs folder:
//!
//! ```text
//! {bpffs}/maps/<MAP>            every map, pinned by name
//! {bpffs}/progs/edge_filter     the XDP program
//! {bpffs}/links/xdp-<ifname>    one XDP link per attached interface
//! ```
//!
//! A restarted daemon adopts that state: it reuses the pinned maps (after
//! checking `LAYOUT` holds [`LAYOUT_VERSION`]), swaps its freshly loaded
//! program into each pinned link atomically (`bpf_link_update`), and rewrites
//! the maps from the store as a diff, so enforcement never has a gap. The
//! daemon leaves all of it in place when it stops; `allowlistd --unload`
//! removes it.

mod conns;
mod drop_maps;
pub mod droplist;
mod journal;
pub mod policy_maps;

pub use conns::{ConnClientKind, ConnTable};
pub use policy_maps::{AccountSpec, KeySpec};
use policy_maps::{ExecError, GuardRecord, KeyRecord, PolicyMaps, PolicyOp, TooMany};

use std::{
    collections::BTreeMap,
    fs, io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use allowlist_common::{
    ALL_STATS_SLOTS, C_CONN_CUT_ACCOUNT, C_CONN_CUT_ALLOW, C_CONN_CUT_REVOKED, C_DROP_GUARD,
    C_DROP_GUARD_SMTP, C_DROP_LIST_BASE, C_EVENTS_LOST, C_EVENTS_RATE_LIMITED, C_EVENTS_SENT,
    C_MALFORMED, C_PASS, ConnInfo, DropEvent, DropRule, KeyState, LAYOUT_VERSION, REASON_AUTO,
    REASON_DENIED, REASON_IMPORT, REASON_MANUAL, V4_L1_SLOTS, V4LongKey, V6L1Value, V6LongKey,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap as BpfHashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, RingBuf,
        lpm_trie::Key,
    },
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::sys;
use serde::Serialize;

pub use droplist::{DropList, DropListError, DropMaps, DropSpec};

/// The eBPF object built by build.rs (empty when built with AYA_BUILD_SKIP).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/allowlist"));

/// The benchmark's baselines (`bench_pass`, `bench_lpm`); never loaded by
/// the daemon.
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench"));

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "this allowlistd was built without its eBPF programs (AYA_BUILD_SKIP); rebuild with \
         `cargo xtask build`, or run with --no-kernel"
    )]
    NoObject,
    #[error("{what} needs root or CAP_BPF + CAP_NET_ADMIN; run as root, or with --no-kernel")]
    NotPrivileged { what: &'static str },
    #[error(
        "this kernel has no BTF (/sys/kernel/btf/vmlinux is missing); allowlistd needs a kernel \
         built with CONFIG_DEBUG_INFO_BTF, or run with --no-kernel"
    )]
    NoBtf,
    #[error("bpffs at {path}: {source}; mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the pinned maps under {path} have layout version {found}, this allowlistd needs \
         {wanted}; stop the old daemon and run its `allowlistd --unload` (or remove {path}) \
         before starting this one"
    )]
    LayoutMismatch {
        path: PathBuf,
        found: u32,
        wanted: u32,
    },
    #[error("loading the eBPF programs failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("interface {ifname}: {message}")]
    Interface { ifname: String, message: String },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    DropList(#[from] DropListError),
    #[error(
        "the {family} map would hold {wanted} entries while the change is written (old and new \
         side by side) but holds {capacity}; raise [kernel] guard_capacity (nothing was changed)"
    )]
    GuardFull {
        family: &'static str,
        wanted: usize,
        capacity: u32,
    },
    #[error("writing the kernel policy maps: {0}")]
    Write(String),
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Generic mode on virtual devices (veth, where driver mode collapses
    /// in VMs), driver mode on real NICs.
    #[default]
    Auto,
    Driver,
    Generic,
}

impl AttachMode {
    fn resolve(self, ifname: &str) -> (XdpMode, &'static str) {
        match self {
            AttachMode::Driver => (XdpMode::Driver, "driver"),
            AttachMode::Generic => (XdpMode::Skb, "generic"),
            AttachMode::Auto if sys::is_virtual_interface(ifname) => (XdpMode::Skb, "generic"),
            AttachMode::Auto => (XdpMode::Driver, "driver"),
        }
    }
}

/// What the kernel module needs from the configuration.
#[derive(Clone, Debug)]
pub struct KernelOptions {
    pub bpffs: PathBuf,
    pub interfaces: Vec<String>,
    pub mode: AttachMode,
    pub drop_capacity: u32,
    pub guard_capacity: u32,
    /// Attach the connection hooks to a cgroup of this name under the
    /// cgroup2 mount, after moving this process into it. `None`: no hooks.
    pub cgroup: Option<String>,
}

/// The pinned maps, written through [`DropMaps`].
struct KernelDropMaps {
    rules: Array<MapData, DropRule>,
    v4_l1: sys::MmapU32,
    /// Keeps the map (and so the mapping) alive.
    _v4_l1_map: MapData,
    v4_long: BpfHashMap<MapData, V4LongKey, u32>,
    v6_l1: BpfHashMap<MapData, u32, V6L1Value>,
    v6_long: BpfHashMap<MapData, V6LongKey, u32>,
}

/// A map write that failed.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {source}")]
pub struct MapWriteError {
    name: &'static str,
    #[source]
    source: MapError,
}

fn mw(name: &'static str) -> impl FnOnce(MapError) -> MapWriteError {
    move |source| MapWriteError { name, source }
}

/// Deleting a key that is already gone is what we wanted anyway.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

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

impl DropMaps for KernelDropMaps {
    type Error = MapWriteError;
    fn set_rule(&mut self, index: u32, rule: DropRule) -> Result<(), Self::Error> {
        self.rules.set(index, rule, 0).map_err(mw("DROP_RULES"))
    }
    fn v4_slot(&self, slot: u32) -> u32 {
        self.v4_l1.get(slot)
    }
    fn set_v4_slot(&mut self, slot: u32, value: u32) -> Result<(), Self::Error> {
        self.v4_l1.set(slot, value);
        Ok(())
    }
    fn set_v4_long(&mut self, key: V4LongKey, rule: u32) -> Result<(), Self::Error> {
        self.v4_long.insert(key, rule, 0).map_err(mw("DROP4_LONG"))
    }
    fn del_v4_long(&mut self, key: V4LongKey) -> Result<(), Self::Error> {
        ignore_missing(self.v4_long.remove(&key)).map_err(mw("DROP4_LONG"))
    }
    fn set_v6_l1(&mut self, top: u32, value: V6L1Value) -> Result<(), Self::Error> {
        self.v6_l1.insert(top, value, 0).map_err(mw("DROP6_L1"))
    }
    fn del_v6_l1(&mut self, top: u32) -> Result<(), Self::Error> {
        ignore_missing(self.v6_l1.remove(&top)).map_err(mw("DROP6_L1"))
    }
    fn set_v6_long(&mut self, key: V6LongKey, rule: u32) -> Result<(), Self::Error> {
        self.v6_long.insert(key, rule, 0).map_err(mw("DROP6_LONG"))
    }
    fn del_v6_long(&mut self, key: V6LongKey) -> Result<(), Self::Error> {
        ignore_missing(self.v6_long.remove(&key)).map_err(mw("DROP6_LONG"))
    }
    fn rule(&self, index: u32) -> DropRule {
        self.rules.get(&index, 0).unwrap_or_default()
    }
    fn v4_long(&self, key: V4LongKey) -> Option<u32> {
        self.v4_long.get(&key, 0).ok()
    }
    fn v6_l1(&self, top: u32) -> Option<V6L1Value> {
        self.v6_l1.get(&top, 0).ok()
    }
    fn v6_long(&self, key: V6LongKey) -> Option<u32> {
        self.v6_long.get(&key, 0).ok()
    }
}

impl droplist::AdoptMaps for KernelDropMaps {
    fn used_rules(&self) -> Vec<u32> {
        // Index 0 is never used; a zeroed rule is a free one.
        (1..self.rules.len())
            .filter(|&i| {
                self.rules
                    .get(&i, 0)
                    .is_ok_and(|r| r != DropRule::default())
            })
            .collect()
    }
    fn v4_long_keys(&self) -> Vec<V4LongKey> {
        self.v4_long.keys().filter_map(Result::ok).collect()
    }
    fn v6_l1_keys(&self) -> Vec<u32> {
        self.v6_l1.keys().filter_map(Result::ok).collect()
    }
    fn v6_long_keys(&self) -> Vec<V6LongKey> {
        self.v6_long.keys().filter_map(Result::ok).collect()
    }
}

/// Kernel counters, summed over CPUs.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct KernelStats {
    pub passed: u64,
    /// Drop-list drops by reason name.
    pub dropped: BTreeMap<String, u64>,
    pub guard_dropped_api: u64,
    pub guard_dropped_smtp: u64,
    /// Fragments and IPv6 chains the guard could not classify, dropped from
    /// outside every armed union.
    #[serde(default)]
    pub guard_dropped_unclassified: u64,
    pub events_sent: u64,
    pub events_rate_limited: u64,
    pub events_lost: u64,
    pub malformed: u64,
    /// Packets of live proxy connections dropped because the key was
    /// revoked, its allowlist no longer admits the peer, or the account
    /// list no longer does.
    pub conn_cut_revoked: u64,
    pub conn_cut_allowlist: u64,
    pub conn_cut_account: u64,
}

pub fn reason_name(code: u32) -> &'static str {
    match code {
        REASON_MANUAL => "manual",
        REASON_DENIED => "denied",
        REASON_AUTO => "auto",
        REASON_IMPORT => "import",
        _ => "other",
    }
}

/// Map fill levels, for metrics and warnings. `guard_capacity` bounds
/// each per-key and per-account map as well (the guard tries hold twice
/// that).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct FillLevels {
    pub drop_rules: usize,
    pub drop_capacity: u32,
    pub guard_v4: usize,
    pub guard_v6: usize,
    pub guard_capacity: u32,
    pub key_entries_v4: usize,
    pub key_entries_v6: usize,
    /// Entries of `ACCOUNT_ALLOW4`/`ACCOUNT_ALLOW6` (every account).
    #[serde(default)]
    pub account_entries_v4: usize,
    #[serde(default)]
    pub account_entries_v6: usize,
    /// Accounts with a bit set in `ACCOUNT_MODE`.
    #[serde(default)]
    pub account_modes: usize,
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

pub struct Kernel {
    opts: KernelOptions,
    ebpf: Ebpf,
    drop_maps: KernelDropMaps,
    drops: DropList,
    /// False until the first sync, which rewrites whatever an earlier daemon
    /// left in the pinned maps.
    adopted: bool,
    guard4: LpmTrie<MapData, [u8; 5], u8>,
    guard6: LpmTrie<MapData, [u8; 17], u8>,
    key_allow4: LpmTrie<MapData, [u8; 8], u8>,
    key_allow6: LpmTrie<MapData, [u8; 20], u8>,
    key_state: BpfHashMap<MapData, u32, KeyState>,
    account_allow4: LpmTrie<MapData, [u8; 8], u8>,
    account_allow6: LpmTrie<MapData, [u8; 20], u8>,
    account_mode: BpfHashMap<MapData, u32, u32>,
    /// What the per-key and per-account maps hold.
    keys: KeyRecord,
    guard_ports: Array<MapData, u32>,
    guard: GuardRecord,
    policy_gen: Array<MapData, u32>,
    stats: PerCpuArray<MapData, u64>,
    /// Interface -> attach mode in use.
    pub attached: BTreeMap<String, &'static str>,
}

fn maps_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("maps")
}

fn take<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, KernelError> {
    let map = ebpf.take_map(name).ok_or(KernelError::Map {
        name,
        source: MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| KernelError::Map { name, source })
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> KernelError + 'a {
    move |source| KernelError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Refuses early, with a message that says what to do, when this host
/// cannot run the programs.
pub fn preflight(bpffs: &Path) -> Result<(), KernelError> {
    if EBPF_OBJECT.is_empty() {
        return Err(KernelError::NoObject);
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(KernelError::NoBtf);
    }
    if sys::euid() != 0 && !has_caps() {
        return Err(KernelError::NotPrivileged {
            what: "loading eBPF programs",
        });
    }
    sys::ensure_bpffs(bpffs).map_err(|source| KernelError::Bpffs {
        path: bpffs.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// CAP_BPF (39) and CAP_NET_ADMIN (12) in the effective set.
fn has_caps() -> bool {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 39) != 0 && caps & (1 << 12) != 0)
}

fn read_layout(path: &Path) -> Result<Option<u32>, KernelError> {
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(path).map_err(|source| KernelError::Map {
        name: "LAYOUT",
        source,
    })?;
    let layout: Array<MapData, u32> =
        Array::try_from(Map::Array(data)).map_err(|source| KernelError::Map {
            name: "LAYOUT",
            source,
        })?;
    let v = layout.get(&0, 0).map_err(|source| KernelError::Map {
        name: "LAYOUT",
        source,
    })?;
    Ok(Some(v))
}

impl Kernel {
    /// Loads (or adopts) the programs and maps and attaches to the
    /// configured interfaces.
    pub fn load(opts: KernelOptions) -> Result<Kernel, KernelError> {
        preflight(&opts.bpffs)?;
        let maps = maps_dir(&opts.bpffs);
        fs::create_dir_all(&maps).map_err(io_err("creating", &maps))?;
        let layout_pin = maps.join("LAYOUT");
        let adopting = match read_layout(&layout_pin)? {
            Some(v) if v != LAYOUT_VERSION => {
                return Err(KernelError::LayoutMismatch {
                    path: opts.bpffs.clone(),
                    found: v,
                    wanted: LAYOUT_VERSION,
                });
            }
            Some(_) => true,
            // A layout of 0 means a daemon died between creating the maps
            // and writing the version: same layout, adopt it.
            None => false,
        };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps)
            .map_max_entries("DROP_RULES", 2 * opts.drop_capacity + 1)
            .map_max_entries("DROP4_LONG", opts.drop_capacity)
            .map_max_entries("DROP6_L1", opts.drop_capacity)
            .map_max_entries("DROP6_LONG", opts.drop_capacity)
            .map_max_entries("GUARD4", 2 * opts.guard_capacity)
            .map_max_entries("GUARD6", 2 * opts.guard_capacity)
            .map_max_entries("KEY_ALLOW4", opts.guard_capacity)
            .map_max_entries("KEY_ALLOW6", opts.guard_capacity)
            .map_max_entries("KEY_STATE", opts.guard_capacity)
            .map_max_entries("ACCOUNT_ALLOW4", opts.guard_capacity)
            .map_max_entries("ACCOUNT_ALLOW6", opts.guard_capacity)
            .map_max_entries("ACCOUNT_MODE", opts.guard_capacity)
            .load(EBPF_OBJECT)?;
        let mut layout: Array<MapData, u32> = take(&mut ebpf, "LAYOUT")?;
        layout
            .set(0, LAYOUT_VERSION, 0)
            .map_err(|source| KernelError::Map {
                name: "LAYOUT",
                source,
            })?;

        let v4_l1_map = match ebpf.take_map("DROP4_L1") {
            Some(Map::Array(data)) => data,
            _ => {
                return Err(KernelError::Map {
                    name: "DROP4_L1",
                    source: MapError::InvalidName {
                        name: "DROP4_L1".into(),
                    },
                });
            }
        };
        let v4_l1 = sys::MmapU32::new(v4_l1_map.fd().as_fd(), V4_L1_SLOTS as usize)
            .map_err(io_err("mmap", &maps.join("DROP4_L1")))?;
        let drop_maps = KernelDropMaps {
            rules: take(&mut ebpf, "DROP_RULES")?,
            v4_l1,
            _v4_l1_map: v4_l1_map,
            v4_long: take(&mut ebpf, "DROP4_LONG")?,
            v6_l1: take(&mut ebpf, "DROP6_L1")?,
            v6_long: take(&mut ebpf, "DROP6_LONG")?,
        };
        let mut kernel = Kernel {
            drops: DropList::new(opts.drop_capacity as usize),
            drop_maps,
            adopted: !adopting,
            guard4: take(&mut ebpf, "GUARD4")?,
            guard6: take(&mut ebpf, "GUARD6")?,
            key_allow4: take(&mut ebpf, "KEY_ALLOW4")?,
            key_allow6: take(&mut ebpf, "KEY_ALLOW6")?,
            key_state: take(&mut ebpf, "KEY_STATE")?,
            account_allow4: take(&mut ebpf, "ACCOUNT_ALLOW4")?,
            account_allow6: take(&mut ebpf, "ACCOUNT_ALLOW6")?,
            account_mode: take(&mut ebpf, "ACCOUNT_MODE")?,
            keys: KeyRecord::default(),
            guard_ports: take(&mut ebpf, "GUARD_PORTS")?,
            guard: GuardRecord::default(),
            policy_gen: take(&mut ebpf, "POLICY_GEN")?,
            stats: take(&mut ebpf, "STATS")?,
            attached: BTreeMap::new(),
            ebpf,
            opts,
        };
        if adopting {
            kernel.load_guard_state()?;
        }
        kernel.attach_all()?;
        if let Some(name) = kernel.opts.cgroup.clone() {
            kernel.attach_cgroup(&name)?;
        }
        Ok(kernel)
    }

    fn program(&mut self) -> Result<&mut Xdp, KernelError> {
        let prog = self
            .ebpf
            .program_mut("edge_filter")
            .ok_or(KernelError::Program {
                name: "edge_filter",
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?;
        prog.try_into().map_err(|source| KernelError::Program {
            name: "edge_filter",
            source,
        })
    }

    /// Loads the program, pins it, and attaches it to every configured
    /// interface: through the pinned link when one exists (an atomic program
    /// swap), else with a new link that is then pinned. Links to interfaces
    /// no longer configured are removed.
    fn attach_all(&mut self) -> Result<(), KernelError> {
        let progs = self.opts.bpffs.join("progs");
        let links = self.opts.bpffs.join("links");
        fs::create_dir_all(&progs).map_err(io_err("creating", &progs))?;
        fs::create_dir_all(&links).map_err(io_err("creating", &links))?;
        let interfaces = self.opts.interfaces.clone();
        let mode = self.opts.mode;
        let prog = self.program()?;
        prog.load().map_err(|source| KernelError::Program {
            name: "edge_filter",
            source,
        })?;
        let mut attached = BTreeMap::new();
        for ifname in &interfaces {
            let pin = links.join(format!("xdp-{ifname}"));
            let (xdp_mode, mode_name) = mode.resolve(ifname);
            let iface_err = |message: String| KernelError::Interface {
                ifname: ifname.clone(),
                message,
            };
            if pin.exists() {
                let pinned = PinnedLink::from_pin(&pin).map_err(|e| {
                    iface_err(format!("opening pinned link {}: {e}", pin.display()))
                })?;
                let link = XdpLink::try_from(FdLink::from(pinned))
                    .map_err(|e| iface_err(format!("pinned link is not an XDP link: {e}")))?;
                prog.attach_to_link(link).map_err(|e| {
                    iface_err(format!("replacing the program in the pinned link: {e}"))
                })?;
                tracing::info!(interface = %ifname, "adopted pinned XDP link; program replaced atomically");
                attached.insert(ifname.clone(), "adopted");
            } else {
                let id = prog
                    .attach(ifname, xdp_mode)
                    .map_err(|e| iface_err(format!("attaching XDP in {mode_name} mode: {e}")))?;
                let link = prog
                    .take_link(id)
                    .map_err(|e| iface_err(format!("taking the XDP link: {e}")))?;
                let fd_link = FdLink::try_from(link).map_err(|e| {
                    iface_err(format!(
                        "this kernel attached XDP without a bpf_link, which cannot be pinned: {e}"
                    ))
                })?;
                fd_link.pin(&pin).map_err(|e| {
                    iface_err(format!("pinning the link at {}: {e}", pin.display()))
                })?;
                tracing::info!(interface = %ifname, mode = mode_name, "attached XDP edge_filter");
                attached.insert(ifname.clone(), mode_name);
            }
        }
        // Interfaces dropped from the configuration: unpinning their link
        // detaches the program.
        for entry in fs::read_dir(&links).map_err(io_err("reading", &links))? {
            let entry = entry.map_err(io_err("reading", &links))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(ifname) = name.strip_prefix("xdp-")
                && !interfaces.iter().any(|i| i == ifname)
            {
                fs::remove_file(entry.path()).map_err(io_err("removing", &entry.path()))?;
                tracing::info!(interface = %ifname, "detached XDP edge_filter (no longer configured)");
            }
        }
        let prog_pin = progs.join("edge_filter");
        if prog_pin.exists() {
            fs::remove_file(&prog_pin).map_err(io_err("replacing", &prog_pin))?;
        }
        self.program()?
            .pin(&prog_pin)
            .map_err(|e| KernelError::Io {
                op: "pinning",
                path: prog_pin.clone(),
                source: io::Error::other(e.to_string()),
            })?;
        self.attached = attached;
        Ok(())
    }

    /// Makes the drop maps hold exactly `wanted`. The first call after
    /// adopting pinned maps rewrites them whole (as a diff against what is
    /// there); later calls touch only what changed.
    pub fn sync_drops(&mut self, wanted: &[DropSpec]) -> Result<(), KernelError> {
        if self.adopted {
            self.drops.apply(&mut self.drop_maps, wanted)?;
        } else {
            self.drops.adopt(&mut self.drop_maps, wanted)?;
            self.adopted = true;
        }
        Ok(())
    }

    fn load_guard_state(&mut self) -> Result<(), KernelError> {
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

    pub fn stats(&self) -> Result<KernelStats, KernelError> {
        let mut sums = vec![0u64; ALL_STATS_SLOTS as usize];
        for (i, sum) in sums.iter_mut().enumerate() {
            let v = self
                .stats
                .get(&(i as u32), 0)
                .map_err(|source| KernelError::Map {
                    name: "STATS",
                    source,
                })?;
            *sum = v.iter().sum();
        }
        let mut dropped = BTreeMap::new();
        for reason in [REASON_MANUAL, REASON_DENIED, REASON_AUTO, REASON_IMPORT] {
            dropped.insert(
                reason_name(reason).to_string(),
                sums[(C_DROP_LIST_BASE + reason) as usize],
            );
        }
        Ok(KernelStats {
            passed: sums[C_PASS as usize],
            dropped,
            guard_dropped_api: sums[C_DROP_GUARD as usize],
            guard_dropped_smtp: sums[C_DROP_GUARD_SMTP as usize],
            guard_dropped_unclassified: sums[allowlist_common::C_DROP_UNCLASSIFIED as usize],
            events_sent: sums[C_EVENTS_SENT as usize],
            events_rate_limited: sums[C_EVENTS_RATE_LIMITED as usize],
            events_lost: sums[C_EVENTS_LOST as usize],
            malformed: sums[C_MALFORMED as usize],
            conn_cut_revoked: sums[C_CONN_CUT_REVOKED as usize],
            conn_cut_allowlist: sums[C_CONN_CUT_ALLOW as usize],
            conn_cut_account: sums[C_CONN_CUT_ACCOUNT as usize],
        })
    }

    pub fn fill_levels(&self) -> FillLevels {
        FillLevels {
            drop_rules: self.drops.len(),
            drop_capacity: self.opts.drop_capacity,
            guard_v4: self.guard.v4.len(),
            guard_v6: self.guard.v6.len(),
            key_entries_v4: self.keys.v4.len(),
            key_entries_v6: self.keys.v6.len(),
            account_entries_v4: self.keys.accounts.v4.len(),
            account_entries_v6: self.keys.accounts.v6.len(),
            account_modes: self.keys.accounts.mode.len(),
            guard_capacity: self.opts.guard_capacity,
        }
    }

    /// The ring buffer of drop events, for [`read_events`]. Call once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, KernelError> {
        take(&mut self.ebpf, "EVENTS")
    }

    pub fn bpffs(&self) -> &Path {
        &self.opts.bpffs
    }
}

/// Removes every program, link and map this daemon pinned under `bpffs`.
/// Unpinning the links detaches the programs.
pub fn unload(bpffs: &Path) -> Result<bool, KernelError> {
    if !bpffs.exists() {
        return Ok(false);
    }
    // Links first, so nothing is left attached while maps disappear.
    for sub in ["links", "progs", "maps"] {
        let dir = bpffs.join(sub);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io_err("removing", &dir))?;
        }
    }
    fs::remove_dir(bpffs).map_err(io_err("removing", bpffs))?;
    // The daemon's cgroup, once no process is left in it.
    if let (Some(mount), Some(name)) = (sys::cgroup2_mount(), bpffs.file_name()) {
        let dir = mount.join(cgroup_name(&name.to_string_lossy()));
        if dir.exists() {
            let _ = fs::remove_dir(&dir);
        }
    }
    Ok(true)
}

/// The cgroup a daemon with this bpffs folder name runs in.
pub fn cgroup_name(bpffs_name: &str) -> String {
    format!("allowlistd-{bpffs_name}")
}

/// Decodes one ring-buffer record.
pub fn decode_event(bytes: &[u8]) -> Option<DropEvent> {
    sys::read_pod(bytes)
}

/// The source address of an event.
pub fn event_source(ev: &DropEvent) -> std::net::IpAddr {
    let v6 = std::net::Ipv6Addr::from(ev.saddr);
    match v6.to_ipv4_mapped() {
        Some(v4) if ev.family == 4 => std::net::IpAddr::V4(v4),
        _ => std::net::IpAddr::V6(v6),
    }
}
