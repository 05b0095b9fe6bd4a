//! allowlist: per-key network allowlists for API edges, enforced in the
//! proxy and in the kernel (eBPF).
//!
//! Rooms, top to bottom (ARCHITECTURE.md; a module uses only those below
//! it): `reload` (SIGHUP: the configuration applied to the running
//! daemon, edge and admin listener), `admin` (the admin API), `exporter` (Prometheus metrics), `proxy` (the edge), `daemon` (every
//! operation, through one change protocol), `api` (wire types), `live`,
//! `defense`, `state`, `config`, `store` (persistence), `kernel` (eBPF
//! load, pin, map sync), `policy` (pure decisions), `telemetry`
//! (counters), `flood`, and `sys`,
//! the one module allowed `unsafe`.
#![deny(unsafe_code)]

pub mod admin;
pub mod api;
pub mod config;
pub mod console;
pub mod daemon;
pub mod defense;
pub mod edge_host;
pub mod exporter;
pub mod flood;
pub mod kernel;
pub mod live;
pub mod logs;
pub mod notify;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod state;
pub mod store;
pub mod sys;
pub mod telemetry;
