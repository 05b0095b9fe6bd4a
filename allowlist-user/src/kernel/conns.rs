//! The connection hooks: attaching `sock_ops` and `cgroup_skb` to the
//! daemon's own cgroup, and the proxy's handle for pairing a socket with
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

impl Kernel {
    /// Moves this process into its own cgroup and attaches the connection
    /// hooks there, pinned. Earlier pins (a previous daemon's) are replaced:
    /// they guarded that process's sockets, which died with it.
    pub(super) fn attach_cgroup(&mut self, name: &str) -> Result<(), KernelError> {
        use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SockOps};
        let mount = sys::cgroup2_mount().ok_or_else(|| KernelError::Interface {
            ifname: "cgroup2".into(),
            message: "no cgroup v2 mount in /proc/self/mounts; mount one, or run without the connection hooks".into(),
        })?;
        let dir = mount.join(name);
        fs::create_dir_all(&dir).map_err(io_err("creating the cgroup", &dir))?;
        fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .map_err(io_err("moving allowlistd into its cgroup", &dir))?;
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
        tracing::info!(cgroup = %dir.display(), "connection hooks attached to allowlistd's cgroup");
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
