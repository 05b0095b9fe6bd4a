//! The daemon's in-memory mirror of the store's policy tables: what a
//! change edits before it reaches the kernel, the store and the snapshot.
//! Below both the daemon and its operations, so neither imports the other
//! for it.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;

use crate::store::{AuthorizedRecord, BlockingState, KeyRecord};

/// The daemon's in-memory mirror of the store's policy tables.
#[derive(Clone, Debug)]
pub struct State {
    pub keys: BTreeMap<String, KeyRecord>,
    pub authorized: BTreeMap<IpNet, AuthorizedRecord>,
    pub blocking: BlockingState,
    /// Addresses denied from the unauthorized list (refused until
    /// authorized explicitly).
    pub denied: std::collections::BTreeSet<IpAddr>,
}
