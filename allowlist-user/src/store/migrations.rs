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
    // 3: accounts. Everything written before belongs to `default`: its
    // blocking modes and learning clock move from `settings` into its row,
    // keys gain their account, and the lists are keyed by account (SQLite
    // cannot change a primary key in place, so they are copied). Admin API
    // tokens.
    "CREATE TABLE accounts (
        idx INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        parent TEXT,
        emails TEXT NOT NULL DEFAULT '[]',
        enforce_blocking INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        api_mode TEXT NOT NULL,
        api_since INTEGER NOT NULL,
        smtp_mode TEXT NOT NULL,
        smtp_since INTEGER NOT NULL,
        last_learned_at INTEGER NOT NULL
    );
    INSERT INTO accounts(name, created_at, api_mode, api_since, smtp_mode, smtp_since, last_learned_at)
    SELECT 'default',
        coalesce((SELECT min(CAST(value AS INTEGER)) FROM settings WHERE key IN ('api_since', 'smtp_since')),
                 CAST(strftime('%s', 'now') AS INTEGER)),
        coalesce((SELECT value FROM settings WHERE key = 'api_blocking'), 'learning'),
        coalesce((SELECT CAST(value AS INTEGER) FROM settings WHERE key = 'api_since'),
                 CAST(strftime('%s', 'now') AS INTEGER)),
        coalesce((SELECT value FROM settings WHERE key = 'smtp_blocking'), 'inactive'),
        coalesce((SELECT CAST(value AS INTEGER) FROM settings WHERE key = 'smtp_since'),
                 CAST(strftime('%s', 'now') AS INTEGER)),
        coalesce((SELECT CAST(value AS INTEGER) FROM settings WHERE key = 'last_learned_at'),
                 CAST(strftime('%s', 'now') AS INTEGER));
    DELETE FROM settings WHERE key IN ('api_blocking', 'api_since', 'smtp_blocking', 'smtp_since', 'last_learned_at');
    ALTER TABLE keys ADD COLUMN account TEXT NOT NULL DEFAULT 'default';
    CREATE INDEX keys_account ON keys(account);
    CREATE TABLE authorized_v3 (
        account TEXT NOT NULL,
        cidr TEXT NOT NULL,
        label TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL,
        key_id TEXT,
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL DEFAULT '',
        shared INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (account, cidr)
    );
    INSERT INTO authorized_v3(account, cidr, label, source, key_id, created_at)
        SELECT 'default', cidr, label, source, key_id, created_at FROM authorized;
    DROP TABLE authorized;
    ALTER TABLE authorized_v3 RENAME TO authorized;
    CREATE TABLE unauthorized_v3 (
        account TEXT NOT NULL,
        addr TEXT NOT NULL,
        service TEXT NOT NULL,
        key_id TEXT NOT NULL DEFAULT '',
        port INTEGER NOT NULL DEFAULT 0,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'refused',
        PRIMARY KEY (account, addr, service, key_id, port)
    );
    INSERT INTO unauthorized_v3(account, addr, service, key_id, port, first_seen, last_seen, attempts, status)
        SELECT 'default', addr, service, key_id, port, first_seen, last_seen, attempts, status FROM unauthorized;
    DROP TABLE unauthorized;
    ALTER TABLE unauthorized_v3 RENAME TO unauthorized;
    ALTER TABLE audit ADD COLUMN account TEXT NOT NULL DEFAULT '';
    UPDATE audit SET account = 'default' WHERE action NOT LIKE 'drop.%';
    CREATE INDEX audit_account ON audit(account, id);
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL DEFAULT '',
        account TEXT,
        role TEXT NOT NULL,
        hash BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        revoked_at INTEGER,
        created_by TEXT NOT NULL
    );
    CREATE UNIQUE INDEX tokens_hash ON tokens(hash);",
    // 4: notifications: per-account webhooks, and the one-click action
    // links sent with each notification (only the token's hash is kept).
    "CREATE TABLE webhooks (
        account TEXT NOT NULL,
        url TEXT NOT NULL,
        secret TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        PRIMARY KEY (account, url)
    );
    CREATE TABLE actions (
        hash BLOB PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        grp TEXT NOT NULL,
        account TEXT NOT NULL,
        action TEXT NOT NULL,
        addr TEXT NOT NULL DEFAULT '',
        key_id TEXT NOT NULL DEFAULT '',
        key_name TEXT NOT NULL DEFAULT '',
        nonce TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at INTEGER,
        used_by TEXT
    );
    CREATE INDEX actions_grp ON actions(grp);
    CREATE INDEX actions_expires ON actions(expires_at);",
    // 5: how often each authorized entry admitted a keyed call, and when
    // last, per account (an organization's shared entry counts in each
    // sub-account that used it).
    "CREATE TABLE entry_usage (
        account TEXT NOT NULL,
        cidr TEXT NOT NULL,
        hits INTEGER NOT NULL DEFAULT 0,
        last_seen_ms INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (account, cidr)
    );",
];
