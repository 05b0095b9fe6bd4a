//! The connection hooks: attaching `sock_ops` and `cgroup_skb` to the
//! daemon's cgroup (its unit's, or a child it makes), and the proxy's handle for pairing a socket with
//! the key it presented and the client a balancer named.

use super::*;

/// The proxy's handle on `CONNS` and `CONN_CLIENT`: pairs a socket with
/// the key it presented (and, behind a trusted balancer, its client).
pub struct ConnTable {
    map: MapData,
    clients: MapData,
}

/// Who the kernel checks a paired connection's packets against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnClientKind {
    /// The TCP peer.
    Peer,
    /// The client a PROXY protocol header named.
    Proxy(std::net::IpAddr),
    /// Per-request clients from X-Forwarded-For: key state only.
    Forwarded,
}

impl ConnTable {
    pub fn pair(&self, cookie: u64, kid: u32, client: ConnClientKind) {
        use std::os::fd::AsFd;
        // The client goes in first: `conn_verdict` reads it once `CONNS`
        // holds the socket.
        let named = match client {
            ConnClientKind::Peer => None,
            ConnClientKind::Forwarded => Some(allowlist_common::ConnClient {
                mode: allowlist_common::CLIENT_XFF,
                ..Default::default()
            }),
            ConnClientKind::Proxy(addr) => {
                let mut c = allowlist_common::ConnClient {
                    mode: allowlist_common::CLIENT_PROXY,
                    ..Default::default()
                };
                match crate::policy::normalize(addr) {
                    std::net::IpAddr::V4(a) => {
                        c.family = 4;
                        c.addr[..4].copy_from_slice(&a.octets());
                    }
                    std::net::IpAddr::V6(a) => {
                        c.family = 6;
                        c.addr = a.octets();
                    }
                }
                Some(c)
            }
        };
        if let Some(c) = named
            && let Err(e) = sys::map_update(
                self.clients.fd().as_fd(),
                &cookie.to_ne_bytes(),
                sys::pod_bytes(&c),
            )
        {
            tracing::warn!(error = %e, "naming a connection's client in the kernel");
            return;
        }
        let value = ConnInfo {
            kid,
            checked_gen: 0,
        };
        if let Err(e) = sys::map_update(
            self.map.fd().as_fd(),
            &cookie.to_ne_bytes(),
            sys::pod_bytes(&value),
        ) {
            tracing::warn!(error = %e, "pairing a connection with its key in the kernel");
        }
    }
}

/// Which cgroup the connection hooks are attached to (`[kernel] cgroup`).
///
/// cgroup BPF programs see the sockets of the processes in their cgroup
/// and its descendants, so the hooks need a cgroup that holds the daemon
/// and little else. Under systemd that is the unit's own cgroup: attaching
/// there needs no move, so `systemctl stop`, `Restart=` and the unit's
/// resource limits keep seeing the daemon, and the unit needs neither
/// `Delegate=yes` nor write access to `/sys/fs/cgroup`. Elsewhere (a shell,
/// the tests) the daemon's cgroup is shared — the root cgroup, a login
/// session — so it makes a child of it, `allowlistd-<bpffs folder name>`,
/// and moves into that; daemons with different bpffs folders then never
/// see each other's sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// `self` when systemd started the daemon (`INVOCATION_ID` is set),
    /// `child` otherwise.
    #[default]
    Auto,
    /// The cgroup the daemon is in (its unit's under systemd); it is not
    /// moved. Refused in the root cgroup, where the hooks would see every
    /// socket of the host.
    #[serde(rename = "self")]
    Own,
    /// A child of the daemon's cgroup, which the daemon moves into (under
    /// systemd this needs `Delegate=yes` and a writable unit cgroup).
    Child,
}

/// Whether systemd started this process: it sets `INVOCATION_ID` for
/// every process of a unit. (`NOTIFY_SOCKET` alone is not enough: other
/// supervisors set it, and only `Type=notify` units get it.)
pub fn under_systemd() -> bool {
    std::env::var_os("INVOCATION_ID").is_some_and(|v| !v.is_empty())
}

/// The cgroup v2 path this process is in (`/` for the root cgroup), from
/// the `0::` line of /proc/self/cgroup.
pub fn own_cgroup() -> Result<PathBuf, KernelError> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| KernelError::Cgroup(format!("reading /proc/self/cgroup: {e}")))?;
    parse_own_cgroup(&text).ok_or_else(|| {
        KernelError::Cgroup(
            "/proc/self/cgroup has no cgroup v2 line (0::/...); this host needs a cgroup v2 \
             hierarchy (unified or hybrid)"
                .into(),
        )
    })
}

fn parse_own_cgroup(text: &str) -> Option<PathBuf> {
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    // A cgroup removed under a process reads as "/path (deleted)".
    let path = path.trim_end().trim_end_matches(" (deleted)");
    path.starts_with('/').then(|| PathBuf::from(path))
}

/// The child cgroup a daemon with this bpffs folder name makes in `child`
/// mode.
pub fn child_cgroup_name(bpffs_name: &str) -> String {
    format!("allowlistd-{bpffs_name}")
}

/// Where the hooks go, decided from the mode, whether systemd started the
/// daemon, and the cgroup it is in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookCgroup {
    /// Relative to the cgroup2 mount, starting with `/`.
    pub path: PathBuf,
    /// Whether the daemon moves itself into `path` first.
    pub join: bool,
    /// `self` or `child`, for the log.
    pub mode: &'static str,
}

impl HookCgroup {
    pub fn resolve(
        mode: CgroupMode,
        systemd: bool,
        own: &Path,
        bpffs_name: &str,
    ) -> Result<HookCgroup, KernelError> {
        let root = own == Path::new("/");
        let mode = match mode {
            CgroupMode::Auto if systemd && !root => CgroupMode::Own,
            CgroupMode::Auto => CgroupMode::Child,
            m => m,
        };
        match mode {
            CgroupMode::Own if root => Err(KernelError::Cgroup(
                "[kernel] cgroup = \"self\" but allowlistd runs in the root cgroup, where the \
                 hooks would see every socket on the host; start it in a cgroup of its own \
                 (a systemd unit) or use cgroup = \"child\""
                    .into(),
            )),
            CgroupMode::Own | CgroupMode::Auto => Ok(HookCgroup {
                path: own.to_path_buf(),
                join: false,
                mode: "self",
            }),
            CgroupMode::Child => {
                let name = child_cgroup_name(bpffs_name);
                // Already in it (started from inside it): no nesting.
                let path = if own.file_name().is_some_and(|n| n == name.as_str()) {
                    own.to_path_buf()
                } else {
                    own.join(name)
                };
                Ok(HookCgroup {
                    path,
                    join: true,
                    mode: "child",
                })
            }
        }
    }

    /// The cgroup's folder under `mount`.
    pub fn dir(&self, mount: &Path) -> PathBuf {
        mount.join(self.path.strip_prefix("/").unwrap_or(&self.path))
    }
}

/// Removes the empty child cgroups `child` mode may have left for this
/// bpffs folder: under this process's own cgroup, and at the top of the
/// hierarchy where earlier versions made it. Only folders named
/// `allowlistd-*` are touched, so a unit's own cgroup never is.
pub(super) fn remove_child_cgroups(bpffs_name: &str) {
    let Some(mount) = sys::cgroup2_mount() else {
        return;
    };
    let name = child_cgroup_name(bpffs_name);
    let mut dirs = vec![mount.join(&name)];
    if let Ok(own) = own_cgroup() {
        dirs.push(
            HookCgroup {
                path: own.join(&name),
                join: true,
                mode: "child",
            }
            .dir(&mount),
        );
    }
    for dir in dirs {
        // Fails while a process is still in it, which is what we want.
        let _ = fs::remove_dir(&dir);
    }
}

impl Kernel {
    /// Attaches the connection hooks, pinned, to the cgroup `mode` picks
    /// (moving this process into it first in `child` mode). Earlier pins
    /// (a previous daemon's) are replaced: they guarded that process's
    /// sockets, which died with it. The kernel makes every cgroup
    /// bpf_link attachment `BPF_F_ALLOW_MULTI`, so the hooks sit beside
    /// the programs systemd attaches to a unit's cgroup (`IPAddressDeny=`,
    /// device policy) rather than displacing them.
    pub(super) fn attach_cgroup(&mut self, mode: CgroupMode) -> Result<(), KernelError> {
        use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SockOps};
        let mount = sys::cgroup2_mount().ok_or_else(|| {
            KernelError::Cgroup(
                "no cgroup v2 mount in /proc/self/mounts; mount one (mount -t cgroup2 none \
                 /sys/fs/cgroup), or run with --no-kernel"
                    .into(),
            )
        })?;
        let bpffs_name = self
            .opts
            .bpffs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = HookCgroup::resolve(mode, under_systemd(), &own_cgroup()?, &bpffs_name)?;
        let dir = target.dir(&mount);
        if target.join {
            fs::create_dir_all(&dir).map_err(io_err("creating the cgroup", &dir))?;
            fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
                .map_err(io_err("moving allowlistd into its cgroup", &dir))?;
        }
        let cg = fs::File::open(&dir).map_err(io_err("opening the cgroup", &dir))?;
        let links = self.opts.bpffs.join("links");
        let pe = |name: &'static str| move |source| KernelError::Program { name, source };
        let unexpected = |name: &'static str| KernelError::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        };
        for (prog, pin, skb) in [
            (
                "conn_ingress",
                "cgroup-ingress",
                Some(CgroupSkbAttachType::Ingress),
            ),
            (
                "conn_egress",
                "cgroup-egress",
                Some(CgroupSkbAttachType::Egress),
            ),
            ("conn_ops", "cgroup-sockops", None),
        ] {
            let pin = links.join(pin);
            if pin.exists() {
                fs::remove_file(&pin).map_err(io_err("replacing", &pin))?;
            }
            let p = self.ebpf.program_mut(prog).ok_or(unexpected(prog))?;
            let link = match skb {
                None => {
                    let p: &mut SockOps = p.try_into().map_err(pe(prog))?;
                    p.load().map_err(pe(prog))?;
                    let id = p.attach(&cg, CgroupAttachMode::Single).map_err(pe(prog))?;
                    p.take_link(id).map_err(pe(prog))?.try_into()
                }
                Some(kind) => {
                    let p: &mut CgroupSkb = p.try_into().map_err(pe(prog))?;
                    p.load().map_err(pe(prog))?;
                    let id = p
                        .attach(&cg, kind, CgroupAttachMode::Single)
                        .map_err(pe(prog))?;
                    p.take_link(id).map_err(pe(prog))?.try_into()
                }
            };
            let fd_link: FdLink = link.map_err(|_| unexpected(prog))?;
            fd_link.pin(&pin).map_err(|e| KernelError::Io {
                op: "pinning",
                path: pin.clone(),
                source: io::Error::other(e.to_string()),
            })?;
        }
        tracing::info!(
            cgroup = %dir.display(),
            mode = target.mode,
            "connection hooks attached"
        );
        Ok(())
    }

    /// The proxy's handle on `CONNS` and `CONN_CLIENT`. Call once.
    pub fn conn_table(&mut self) -> Result<ConnTable, KernelError> {
        let mut lru = |name: &'static str| match self.ebpf.take_map(name) {
            Some(Map::LruHashMap(map)) => Ok(map),
            _ => Err(KernelError::Map {
                name,
                source: MapError::InvalidName { name: name.into() },
            }),
        };
        Ok(ConnTable {
            map: lru("CONNS")?,
            clients: lru("CONN_CLIENT")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_v2_line_of_proc_self_cgroup_is_the_own_cgroup() {
        let hybrid = "9:name=systemd:/\n4:memory:/x\n0::/system.slice/allowlistd.service\n";
        assert_eq!(
            parse_own_cgroup(hybrid),
            Some(PathBuf::from("/system.slice/allowlistd.service"))
        );
        assert_eq!(parse_own_cgroup("0::/\n"), Some(PathBuf::from("/")));
        assert_eq!(
            parse_own_cgroup("0::/gone (deleted)\n"),
            Some(PathBuf::from("/gone"))
        );
        assert_eq!(parse_own_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn systemd_keeps_the_unit_cgroup_and_a_shell_gets_a_child() {
        let unit = Path::new("/system.slice/allowlistd.service");
        let under_unit = HookCgroup::resolve(CgroupMode::Auto, true, unit, "allowlist").unwrap();
        assert_eq!(
            under_unit,
            HookCgroup {
                path: unit.into(),
                join: false,
                mode: "self"
            }
        );
        // Started by hand in the root cgroup, or in a login session.
        let root = HookCgroup::resolve(CgroupMode::Auto, false, Path::new("/"), "t1").unwrap();
        assert_eq!(root.path, Path::new("/allowlistd-t1"));
        assert!(root.join);
        let session = Path::new("/user.slice/user-0.slice/session-3.scope");
        let s = HookCgroup::resolve(CgroupMode::Auto, false, session, "t1").unwrap();
        assert_eq!(s.path, session.join("allowlistd-t1"));
        // INVOCATION_ID leaked into a process in the root cgroup: never
        // the root.
        let leaked = HookCgroup::resolve(CgroupMode::Auto, true, Path::new("/"), "t1").unwrap();
        assert_eq!((leaked.mode, leaked.join), ("child", true));
        // `child` under systemd (Delegate=yes): a child of the unit.
        let c = HookCgroup::resolve(CgroupMode::Child, true, unit, "allowlist").unwrap();
        assert_eq!(c.path, unit.join("allowlistd-allowlist"));
        // Restarted from inside its own child: no nesting.
        let again =
            HookCgroup::resolve(CgroupMode::Child, false, Path::new("/allowlistd-t1"), "t1")
                .unwrap();
        assert_eq!(again.path, Path::new("/allowlistd-t1"));
        assert_eq!(
            again.dir(Path::new("/sys/fs/cgroup")),
            Path::new("/sys/fs/cgroup/allowlistd-t1")
        );
    }

    #[test]
    fn self_is_refused_in_the_root_cgroup() {
        let e = HookCgroup::resolve(CgroupMode::Own, true, Path::new("/"), "x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("root cgroup") && e.contains("cgroup = \"child\""),
            "{e}"
        );
        let ok = HookCgroup::resolve(CgroupMode::Own, false, Path::new("/t"), "x").unwrap();
        assert_eq!((ok.path.as_path(), ok.join), (Path::new("/t"), false));
    }
}
