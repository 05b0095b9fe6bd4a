//! The guard's plans: the per-service unions XDP checks opening packets
//! against, and the ports it guards, written in an order that never judges
//! a packet at a port armed against a union that is not yet complete.

use super::*;

/// Plans the guard: unions grown, ports narrowed to what old and new
/// agree on, unions shrunk, new ports armed — so no packet is ever judged
/// at a port armed against a union that is not yet complete.
pub fn plan_guard(
    old: &GuardRecord,
    unions: &[(u32, Vec<IpNet>)],
    ports: &[(u8, u16, u32)],
    capacity: usize,
) -> Result<Plan<GuardRecord>, TooMany> {
    let mut new = GuardRecord::default();
    for (service, union) in unions {
        for n in union {
            match n.trunc() {
                IpNet::V4(n) => new.v4.insert((*service, n)),
                IpNet::V6(n) => new.v6.insert((*service, n)),
            };
        }
    }
    check("GUARD4", peak(&old.v4, &new.v4), capacity)?;
    check("GUARD6", peak(&old.v6, &new.v6), capacity)?;
    new.ports = guard_ports(ports);
    let change = GuardChange {
        add4: new.v4.difference(&old.v4).copied().collect(),
        add6: new.v6.difference(&old.v6).copied().collect(),
        remove4: old.v4.difference(&new.v4).copied().collect(),
        remove6: old.v6.difference(&new.v6).copied().collect(),
        ports: new.ports.clone(),
    };
    let ops = guard_ops(old, &change);
    Ok(Plan { ops, record: new })
}

/// Prefixes entering and leaving the guard unions, and the ports guarded
/// afterwards.
#[derive(Debug, Default)]
pub struct GuardChange {
    pub add4: Vec<(u32, Ipv4Net)>,
    pub add6: Vec<(u32, Ipv6Net)>,
    pub remove4: Vec<(u32, Ipv4Net)>,
    pub remove6: Vec<(u32, Ipv6Net)>,
    pub ports: BTreeMap<u16, u32>,
}

/// Plans a change the caller computed (the unions' prefixes whose count
/// went from none to some, or back), in [`plan_guard`]'s order, without
/// building the whole unions: `add` and `remove` are `(service, prefix)`.
pub fn plan_guard_delta(
    old: &GuardRecord,
    add: &[(u32, IpNet)],
    remove: &[(u32, IpNet)],
    ports: &[(u8, u16, u32)],
    capacity: usize,
) -> Result<Plan<GuardChange>, TooMany> {
    let mut change = GuardChange {
        ports: guard_ports(ports),
        ..GuardChange::default()
    };
    for (svc, n) in add {
        match n.trunc() {
            IpNet::V4(n) if !old.v4.contains(&(*svc, n)) => change.add4.push((*svc, n)),
            IpNet::V6(n) if !old.v6.contains(&(*svc, n)) => change.add6.push((*svc, n)),
            _ => {}
        }
    }
    for (svc, n) in remove {
        match n.trunc() {
            IpNet::V4(n) if old.v4.contains(&(*svc, n)) => change.remove4.push((*svc, n)),
            IpNet::V6(n) if old.v6.contains(&(*svc, n)) => change.remove6.push((*svc, n)),
            _ => {}
        }
    }
    // Additions are written before removals: the peak is old plus added.
    check("GUARD4", old.v4.len() + change.add4.len(), capacity)?;
    check("GUARD6", old.v6.len() + change.add6.len(), capacity)?;
    let ops = guard_ops(old, &change);
    Ok(Plan {
        ops,
        record: change,
    })
}

impl GuardRecord {
    /// The record after a [`plan_guard_delta`]'s writes.
    pub fn apply(&mut self, change: GuardChange) {
        for e in &change.remove4 {
            self.v4.remove(e);
        }
        for e in &change.remove6 {
            self.v6.remove(e);
        }
        self.v4.extend(change.add4);
        self.v6.extend(change.add6);
        self.ports = change.ports;
    }
}

/// `GUARD_PORTS` values for `(proto, port, service)`, with the armed mask.
fn guard_ports(ports: &[(u8, u16, u32)]) -> BTreeMap<u16, u32> {
    let mut out = BTreeMap::new();
    let mut armed = 0u32;
    for &(proto, port, service) in ports {
        let v = out.entry(port).or_default();
        *v = with_guard_service(*v, proto, service);
        armed |= 1 << service;
    }
    if armed != 0 {
        out.insert(ARMED_SLOT, armed);
    }
    out
}

/// The guard's writes in their safe order: unions grown, ports narrowed
/// to what old and new agree on, unions shrunk, new ports armed.
fn guard_ops(old: &GuardRecord, change: &GuardChange) -> Ops {
    let mut ops = Vec::new();
    for (svc, n) in &change.add4 {
        ops.push((
            PolicyOp::Guard4(*svc, *n, true),
            PolicyOp::Guard4(*svc, *n, false),
        ));
    }
    for (svc, n) in &change.add6 {
        ops.push((
            PolicyOp::Guard6(*svc, *n, true),
            PolicyOp::Guard6(*svc, *n, false),
        ));
    }
    // Ports whose service changes keep only what old and new agree on
    // while the unions shrink.
    let mut now: BTreeMap<u16, u32> = old.ports.clone();
    for (port, old_v) in &old.ports {
        let new_v = change.ports.get(port).copied().unwrap_or(0);
        let both = if *port == ARMED_SLOT {
            // A mask: the services armed before and after stay armed
            // throughout (never 0 in between, which would let
            // unclassifiable packets through for them).
            old_v & new_v
        } else {
            [PROTO_TCP, PROTO_UDP].into_iter().fold(0, |acc, proto| {
                let (o, n) = (guard_service(*old_v, proto), guard_service(new_v, proto));
                with_guard_service(acc, proto, if o == n { o } else { 0 })
            })
        };
        if both != *old_v {
            ops.push((
                PolicyOp::GuardPort(*port, both),
                PolicyOp::GuardPort(*port, *old_v),
            ));
            now.insert(*port, both);
        }
    }
    for (svc, n) in &change.remove4 {
        ops.push((
            PolicyOp::Guard4(*svc, *n, false),
            PolicyOp::Guard4(*svc, *n, true),
        ));
    }
    for (svc, n) in &change.remove6 {
        ops.push((
            PolicyOp::Guard6(*svc, *n, false),
            PolicyOp::Guard6(*svc, *n, true),
        ));
    }
    for (port, v) in &change.ports {
        let was = now.get(port).copied().unwrap_or(0);
        if *v != was {
            ops.push((
                PolicyOp::GuardPort(*port, *v),
                PolicyOp::GuardPort(*port, was),
            ));
        }
    }
    ops
}
