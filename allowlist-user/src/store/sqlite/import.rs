//! Loading a whole policy at once: accounts, their keys (with allowlists)
//! and authorized entries in one transaction, for fixtures and offline
//! imports, where one transaction per record (with its fsync and audit
//! row) would take minutes at 100k keys.

use super::SqliteStore;
use crate::store::{AccountRecord, AuthorizedRecord, KeyRecord, StoreError};

/// What an import wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Imported {
    pub accounts: usize,
    pub keys: usize,
    pub authorized: usize,
}

impl SqliteStore {
    /// Writes `accounts` (new; their indexes are assigned here), `keys` (of
    /// those or existing accounts; kids assigned here) and `authorized`
    /// (`(account, entry)`; a prefix already listed is skipped) in one
    /// transaction, with one audit entry: all of it, or nothing.
    pub fn import_policy(
        &self,
        accounts: &[AccountRecord],
        keys: &[KeyRecord],
        authorized: &[(String, AuthorizedRecord)],
        actor: &str,
    ) -> Result<Imported, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err("importing"))?;
        let mut done = Imported::default();
        for a in accounts {
            Self::insert_account(&tx, a).map_err(self.err("importing an account"))?;
            done.accounts += 1;
        }
        for k in keys {
            Self::insert_key(&tx, k).map_err(self.err("importing a key"))?;
            done.keys += 1;
        }
        for (account, rec) in authorized {
            done.authorized +=
                Self::insert_authorized(&tx, account, rec).map_err(self.err("importing"))?;
        }
        Self::audit(
            &tx,
            "",
            actor,
            "import",
            &serde_json::json!({
                "accounts": done.accounts, "keys": done.keys, "authorized": done.authorized
            }),
        )
        .map_err(self.err("auditing"))?;
        tx.commit().map_err(self.err("committing"))?;
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AccountStore, KeyStore, ListStore};

    #[test]
    fn an_import_is_whole_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("a.db")).unwrap();
        let mut acme = s.list_accounts().unwrap()[0].clone();
        acme.name = "acme".into();
        let key = KeyRecord {
            kid: 0,
            id: "00000000000000a1".into(),
            account: "acme".into(),
            name: "web".into(),
            description: String::new(),
            scopes: vec![],
            status: crate::policy::KeyStatus::Active,
            secret_hash: [7; 32],
            previous: None,
            rate: None,
            created_at: 0,
            last_used_ms: None,
            requests_day: 0,
            requests_today: 0,
            allow: vec![crate::store::AllowRecord {
                cidr: "198.51.100.0/24".parse().unwrap(),
                label: "office".into(),
            }],
        };
        let entry = AuthorizedRecord {
            cidr: "203.0.113.0/24".parse().unwrap(),
            label: String::new(),
            source: "manual".into(),
            key_id: None,
            created_at: 0,
            created_by: "import".into(),
            shared: false,
        };
        let done = s
            .import_policy(
                std::slice::from_ref(&acme),
                std::slice::from_ref(&key),
                &[("acme".into(), entry.clone())],
                "uid:0",
            )
            .unwrap();
        assert_eq!(
            done,
            Imported {
                accounts: 1,
                keys: 1,
                authorized: 1
            }
        );
        let keys = s.list_keys().unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].allow[0].label, "office");
        assert_eq!(s.list_authorized().unwrap().len(), 1);
        // The same account again: refused, and the second key with it.
        let mut other = key.clone();
        other.id = "00000000000000a2".into();
        assert!(s.import_policy(&[acme], &[other], &[], "uid:0").is_err());
        assert_eq!(s.list_keys().unwrap().len(), 1, "half an import landed");
    }
}
