//! allowlist: per-key network allowlists for API edges, enforced in the
//! proxy and in the kernel (eBPF).
//!
//! Modules, one per concern: `config`, `store` (persistence), `kernel`
//! (eBPF loading, pinning, map sync, events), `admin` (HTTP admin API),
//! `api` (its wire types), `daemon` (the state the admin API acts on).

pub mod admin;
pub mod api;
pub mod config;
pub mod daemon;
pub mod defense;
pub mod flood;
pub mod kernel;
pub mod live;

pub mod policy;
pub mod proxy;
pub mod state;
pub mod store;
