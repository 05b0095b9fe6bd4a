//! The store's schema, one migration per version; a store opens at any
//! earlier version and is brought up to date in one transaction each.

/// Schema migrations, applied in order; `PRAGMA user_version` records how
/// many have run. Append only.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: drop list, blocking state, audit log.
    "CREATE TABLE drops (
        cidr TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        created_by TEXT NOT NULL
    );
    CREATE INDEX drops_expires ON drops(expires_at) WHERE expires_at IS NOT NULL;
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        detail TEXT NOT NULL
    );",
    // 2: API keys and their allowlists, the account's authorized list, the
    // unauthorized list.
    "CREATE TABLE keys (
        kid INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        scopes TEXT NOT NULL,
        status TEXT NOT NULL,
        secret_hash BLOB NOT NULL,
        prev_hash BLOB,
        prev_expires_ms INTEGER,
        rate TEXT,
        created_at INTEGER NOT NULL,
        last_used_ms INTEGER,
        requests_day INTEGER NOT NULL DEFAULT 0,
        requests_today INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE key_allow (
        kid INTEGER NOT NULL REFERENCES keys(kid) ON DELETE CASCADE,
        cidr TEXT NOT NULL,
        label TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (kid, cidr)
    );
    CREATE TABLE authorized (
        cidr TEXT PRIMARY KEY,
        label TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL,
        key_id TEXT,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE unauthorized (
        addr TEXT NOT NULL,
        service TEXT NOT NULL,
        key_id TEXT NOT NULL DEFAULT '',
        port INTEGER NOT NULL DEFAULT 0,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'refused',
        PRIMARY KEY (addr, service, key_id, port)
    );",
];
