//! The daemon's in-memory mirror of the store's policy tables: what a
//! change edits before it reaches the kernel, the store and the snapshot.
//! Below both the daemon and its operations, so neither imports the other
//! for it.
//!
//! Each account sits behind its own `Arc`: copying the state for a change
//! copies pointers, and editing one account (through
//! [`State::account_mut`]) copies that account alone and bumps its
//! revision, which is how the snapshot builder knows which pieces to
//! rebuild.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;

use crate::store::{AccountRecord, AuthorizedRecord, KeyRecord};

/// One account's part of the state.
#[derive(Clone, Debug)]
pub struct AccountState {
    pub record: AccountRecord,
    pub keys: BTreeMap<String, KeyRecord>,
    pub authorized: BTreeMap<IpNet, AuthorizedRecord>,
    /// Addresses denied from the unauthorized list (refused until
    /// authorized explicitly).
    pub denied: BTreeSet<IpAddr>,
    /// Bumped on every edit (from [`State::rev`]).
    pub rev: u64,
}

impl AccountState {
    pub fn new(record: AccountRecord) -> AccountState {
        AccountState {
            record,
            keys: BTreeMap::new(),
            authorized: BTreeMap::new(),
            denied: BTreeSet::new(),
            rev: 0,
        }
    }

    /// Entries this account shares with its sub-accounts.
    pub fn shared(&self) -> impl Iterator<Item = &AuthorizedRecord> {
        self.authorized.values().filter(|a| a.shared)
    }
}

/// The daemon's in-memory mirror of the store's policy tables.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// By name; the names are shared (`Arc<str>`) so copying the state for
    /// a change allocates no strings.
    pub accounts: BTreeMap<Arc<str>, Arc<AccountState>>,
    /// The last revision handed out.
    pub rev: u64,
}

impl State {
    pub fn account(&self, name: &str) -> Option<&AccountState> {
        self.accounts.get(name).map(|a| a.as_ref())
    }

    /// An account to edit: copied out of the shared `Arc` if a snapshot
    /// still holds it, and marked as changed.
    pub fn account_mut(&mut self, name: &str) -> Option<&mut AccountState> {
        self.rev += 1;
        let rev = self.rev;
        let a = Arc::make_mut(self.accounts.get_mut(name)?);
        a.rev = rev;
        Some(a)
    }

    /// Adds an account (a new revision).
    pub fn insert_account(&mut self, mut account: AccountState) {
        self.rev += 1;
        account.rev = self.rev;
        self.accounts
            .insert(account.record.name.as_str().into(), Arc::new(account));
    }

    /// The organization of `name`, if it has one that exists.
    pub fn parent_of(&self, name: &str) -> Option<&AccountState> {
        let parent = self.account(name)?.record.parent.as_deref()?;
        self.account(parent)
    }

    /// The sub-accounts of `name`.
    pub fn children_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a AccountState> {
        self.accounts
            .values()
            .filter(move |a| a.record.parent.as_deref() == Some(name))
            .map(|a| a.as_ref())
    }

    /// The account holding key `id`.
    pub fn key_owner(&self, id: &str) -> Option<&AccountState> {
        self.accounts
            .values()
            .find(|a| a.keys.contains_key(id))
            .map(|a| a.as_ref())
    }
}
