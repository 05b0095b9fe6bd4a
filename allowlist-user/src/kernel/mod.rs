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
mod drop_sync;
pub mod droplist;
mod journal;
mod map_batch;
pub mod policy_maps;
mod policy_sync;
mod policy_tables;

pub use conns::{
    CgroupMode, ConnClientKind, ConnTable, HookCgroup, child_cgroup_name, own_cgroup, under_systemd,
};
use drop_sync::KernelDropMaps;
pub use policy_maps::{AccountSpec, KeySpec};
use policy_maps::{ExecError, GuardRecord, KeyRecord, TooMany};

use std::{
    collections::BTreeMap,
    fs, io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use allowlist_common::{
    ALL_STATS_SLOTS, C_CONN_CUT_ACCOUNT, C_CONN_CUT_ALLOW, C_CONN_CUT_REVOKED, C_DROP_GUARD,
    C_DROP_GUARD_SMTP, C_DROP_LIST_BASE, C_EVENTS_LOST, C_EVENTS_RATE_LIMITED, C_EVENTS_SENT,
    C_MALFORMED, C_PASS, ConnInfo, DropEvent, LAYOUT_VERSION, REASON_AUTO, REASON_DENIED,
    REASON_IMPORT, REASON_MANUAL, V4_L1_SLOTS,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, MapError, PerCpuArray, RingBuf, lpm_trie::Key},
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
    #[error("connection hooks: {0}")]
    Cgroup(String),
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
    /// Where the connection hooks go (see [`CgroupMode`]). `None`: no hooks.
    pub cgroup: Option<CgroupMode>,
    /// Bulk writes and reads of the drop list and the policy maps through
    /// the kernel's batch map commands (thousands of entries per syscall).
    /// Where the kernel has none they are not used, whatever this says;
    /// `false` moves one entry per syscall, which the benchmarks measure
    /// against.
    pub batch_writes: bool,
}

/// A map write that failed.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {source}")]
pub struct MapWriteError {
    name: &'static str,
    #[source]
    source: io::Error,
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

pub struct Kernel {
    opts: KernelOptions,
    ebpf: Ebpf,
    drop_maps: KernelDropMaps,
    drops: DropList,
    /// False until the first sync, which rewrites whatever an earlier daemon
    /// left in the pinned maps.
    adopted: bool,
    /// The policy maps, written in runs (batched) and read back on adoption.
    policy_tables: policy_tables::PolicyTables,
    /// What the per-key and per-account maps hold.
    keys: KeyRecord,
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

/// A hash, array or LPM trie map, to be read and written in batches.
fn table<K: aya::Pod, V: aya::Pod>(
    ebpf: &Ebpf,
    name: &'static str,
    batched: bool,
) -> Result<map_batch::Table<K, V>, KernelError> {
    match ebpf.map(name) {
        Some(Map::Array(data) | Map::HashMap(data) | Map::LpmTrie(data)) => {
            map_batch::Table::new(data, name, batched)
        }
        _ => Err(KernelError::Map {
            name,
            source: MapError::InvalidName { name: name.into() },
        }),
    }
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
            rules: table(&ebpf, "DROP_RULES", opts.batch_writes)?,
            v4_l1,
            _v4_l1_map: v4_l1_map,
            v4_long: table(&ebpf, "DROP4_LONG", opts.batch_writes)?,
            v6_l1: table(&ebpf, "DROP6_L1", opts.batch_writes)?,
            v6_long: table(&ebpf, "DROP6_LONG", opts.batch_writes)?,
        };
        let policy_tables = policy_tables::PolicyTables::new(&ebpf, opts.batch_writes)?;
        let mut kernel = Kernel {
            drops: DropList::new(opts.drop_capacity as usize),
            policy_tables,
            drop_maps,
            adopted: !adopting,
            keys: KeyRecord::default(),
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
        if let Some(mode) = kernel.opts.cgroup {
            kernel.attach_cgroup(mode)?;
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
    if let Some(name) = bpffs.file_name() {
        conns::remove_child_cgroups(&name.to_string_lossy());
    }
    Ok(true)
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
