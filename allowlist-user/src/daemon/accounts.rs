//! Accounts: create, list, show, remove, and an organization's
//! enforcement of blocking on its sub-accounts.

use crate::{
    api::{AccountList, AccountRemoved, AccountView, NewAccount},
    daemon::{Daemon, DaemonError, no_account},
    policy::{ApiMode, DEFAULT_ACCOUNT, KeyStatus, SmtpMode, check_account_name},
    state::{AccountState, State},
    store::{AccountRecord, BlockingState},
};

/// E-mail addresses: something@something, no spaces or control bytes (the
/// relay checks the rest).
impl Daemon {
    fn account_view(&self, st: &State, a: &AccountState) -> AccountView {
        let (api_in_force, smtp_in_force) = Self::modes_in_force(st, a);
        AccountView {
            record: a.record.clone(),
            api_in_force,
            smtp_in_force,
            keys: a.keys.len(),
            active_keys: a
                .keys
                .values()
                .filter(|k| k.status != KeyStatus::Revoked)
                .count(),
            authorized: a.authorized.len(),
            sub_accounts: st
                .children_of(&a.record.name)
                .map(|c| c.record.name.clone())
                .collect(),
        }
    }

    pub async fn create_account(
        &self,
        req: NewAccount,
        actor: &str,
    ) -> Result<AccountView, DaemonError> {
        let name = req.name.trim().to_string();
        check_account_name(&name).map_err(DaemonError::Invalid)?;
        for e in &req.emails {
            crate::config::check_mailbox(e).map_err(DaemonError::Invalid)?;
        }
        let now = self.clock.now_ms() / 1000;
        let mut record = AccountRecord {
            idx: 0,
            name: name.clone(),
            parent: req.parent.clone(),
            emails: req.emails,
            enforce_blocking: false,
            created_at: now,
            blocking: BlockingState {
                api: ApiMode::Learning,
                api_since: now,
                smtp: SmtpMode::Inactive,
                smtp_since: now,
            },
            last_learned_at: now,
        };
        // The store assigns the index; it is committed first here, since
        // nothing about a new account (no keys, no list) reaches the kernel
        // before the change below.
        let stored = self
            .change(
                |st| {
                    if st.account(&name).is_some() {
                        return Err(DaemonError::Invalid(format!(
                            "an account named {name} already exists"
                        )));
                    }
                    if let Some(p) = &req.parent {
                        let org = st.account(p).ok_or_else(|| no_account(p))?;
                        if org.record.parent.is_some() {
                            return Err(DaemonError::Invalid(format!(
                                "{p} is itself a sub-account of {}; organizations are one level deep",
                                org.record.parent.as_deref().unwrap_or_default()
                            )));
                        }
                    }
                    record = self.store.create_account(&record, actor)?;
                    st.insert_account(AccountState::new(record.clone()));
                    Ok(())
                },
                |_| Ok(()),
            )
            .await;
        if let Err(e) = stored {
            // The row was written before the change failed further on:
            // take it back so store and memory agree.
            if record.idx != 0
                && let Err(undo) = self.store.remove_account(&name, actor)
            {
                tracing::error!(error = %undo, account = %name, "undoing an account creation");
            }
            return Err(e);
        }
        tracing::info!(account = %name, actor, "account created");
        self.show_account(&name)
    }

    pub fn list_accounts(&self) -> AccountList {
        self.with_state(|st| AccountList {
            accounts: st
                .accounts
                .values()
                .map(|a| self.account_view(st, a))
                .collect(),
        })
    }

    pub fn show_account(&self, name: &str) -> Result<AccountView, DaemonError> {
        self.with_state(|st| {
            let a = st.account(name).ok_or_else(|| no_account(name))?;
            Ok(self.account_view(st, a))
        })
    }

    /// Removes an account: its keys are revoked (their live connections
    /// cut) and its lists deleted. Refused while it has active keys unless
    /// `force`, while it has sub-accounts, and for `default`.
    pub async fn remove_account(
        &self,
        name: &str,
        force: bool,
        actor: &str,
    ) -> Result<AccountRemoved, DaemonError> {
        if name == DEFAULT_ACCOUNT {
            return Err(DaemonError::Invalid(
                "the account default cannot be removed: commands that name no account act on it"
                    .into(),
            ));
        }
        if name == self.config.blocking.smtp_account {
            return Err(DaemonError::Invalid(format!(
                "{name} is [blocking] smtp_account; point smtp_account at another account first"
            )));
        }
        let keys: Vec<String> = self.with_state(|st| {
            let a = st.account(name).ok_or_else(|| no_account(name))?;
            let subs: Vec<String> = st
                .children_of(name)
                .map(|c| c.record.name.clone())
                .collect();
            if !subs.is_empty() {
                return Err(DaemonError::Invalid(format!(
                    "{name} is the organization of {}; remove those accounts first",
                    subs.join(", ")
                )));
            }
            let active: Vec<&String> = a
                .keys
                .values()
                .filter(|k| k.status != KeyStatus::Revoked)
                .map(|k| &k.id)
                .collect();
            if !active.is_empty() && !force {
                return Err(DaemonError::Invalid(format!(
                    "{name} has {} active key(s) ({}); revoke them first, or pass --force to revoke them with the account",
                    active.len(),
                    active
                        .iter()
                        .take(5)
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            Ok(a.keys.keys().cloned().collect())
        })?;
        self.change(
            |st| {
                st.accounts
                    .remove(name)
                    .map(|_| ())
                    .ok_or_else(|| no_account(name))
            },
            |_| Ok(self.store.remove_account(name, actor)?),
        )
        .await?;
        // Its tokens die with it (the store revoked them in the same
        // transaction): a new account of the same name must not inherit
        // them.
        let now = self.clock.now_ms() / 1000;
        for t in self
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values_mut()
        {
            if t.account.as_deref() == Some(name) && t.revoked_at.is_none() {
                t.revoked_at = Some(now);
            }
        }
        tracing::info!(account = name, keys = keys.len(), actor, "account removed");
        Ok(AccountRemoved {
            name: name.to_string(),
            keys_revoked: keys,
        })
    }

    /// An organization enforces (or stops enforcing) blocking on its
    /// sub-accounts: while its own API or SMTP blocking is active, theirs
    /// is too.
    pub async fn set_enforce(
        &self,
        name: &str,
        enforce: bool,
        actor: &str,
    ) -> Result<AccountView, DaemonError> {
        let mut rec = self.with_state(|st| {
            let a = st.account(name).ok_or_else(|| no_account(name))?;
            if a.record.parent.is_some() {
                return Err(DaemonError::Invalid(format!(
                    "{name} is a sub-account; only an organization enforces blocking on its sub-accounts"
                )));
            }
            Ok(a.record.clone())
        })?;
        rec.enforce_blocking = enforce;
        let r = rec.clone();
        self.change(
            |st| {
                st.account_mut(name).ok_or_else(|| no_account(name))?.record = r;
                // The sub-accounts' pieces depend on their organization's
                // revision, so they are rebuilt with it.
                Ok(())
            },
            |_| {
                Ok(self.store.update_account(
                    &rec,
                    "account.enforce",
                    serde_json::json!({ "enforce_blocking": enforce }),
                    actor,
                )?)
            },
        )
        .await?;
        self.show_account(name)
    }
}
