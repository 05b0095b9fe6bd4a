//! Admin API tokens: who a bearer is, what its role allows, and the
//! tokens' lifecycle (created by operators or owners, shown once, stored
//! hashed, revocable, optionally expiring).

use subtle::ConstantTimeEq;

use crate::{
    api::{NewToken, TokenList, TokenView},
    daemon::{Daemon, DaemonError, keys::random_hex, no_account},
    policy::{DEFAULT_ACCOUNT, Need, Role, hash_secret},
    store::TokenRecord,
};

/// The readable prefix of every admin token: `alt_<id>_<secret>`.
pub const TOKEN_PREFIX: &str = "alt";

/// Who is calling the admin API, and over what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// What the audit log records: `uid:N` or `token:ID`.
    pub actor: String,
    pub role: Role,
    /// The account an account token belongs to; `None` for operators.
    pub account: Option<String>,
}

impl Caller {
    /// An operator (the admin socket, or an operator token).
    pub fn operator(actor: String) -> Caller {
        Caller {
            actor,
            role: Role::Operator,
            account: None,
        }
    }

    /// The account a request acts on: the one it names, else the caller's
    /// own (`default` for operators). An account token naming another
    /// account gets "no such account", exactly as for one that does not
    /// exist: it cannot learn that other accounts exist.
    pub fn account_for(&self, named: Option<&str>) -> Result<String, DaemonError> {
        match (&self.account, named) {
            (None, Some(n)) => Ok(n.to_string()),
            (None, None) => Ok(DEFAULT_ACCOUNT.to_string()),
            (Some(own), None) => Ok(own.clone()),
            (Some(own), Some(n)) if n == own => Ok(own.clone()),
            (Some(_), Some(n)) => Err(no_account(n)),
        }
    }

    /// Refuses with `permission_denied` naming the role needed.
    pub fn require(&self, need: Need) -> Result<(), DaemonError> {
        if self.role.may(need) {
            return Ok(());
        }
        Err(DaemonError::Forbidden(match need.least_role() {
            Role::Operator => {
                "this needs an operator (the admin socket, or an operator token)".to_string()
            }
            r => format!(
                "this needs the {} role or higher; this token's role is {}",
                r.as_str(),
                self.role.as_str()
            ),
        }))
    }
}

fn view(t: &TokenRecord) -> TokenView {
    TokenView {
        id: t.id.clone(),
        name: t.name.clone(),
        account: t.account.clone(),
        role: t.role,
        created_at: t.created_at,
        expires_at: t.expires_at,
        revoked_at: t.revoked_at,
        created_by: t.created_by.clone(),
        token: None,
    }
}

impl Daemon {
    /// Loads the tokens into memory (at start; kept in step by create and
    /// revoke).
    pub(crate) fn load_tokens(&self) -> Result<(), DaemonError> {
        let all = self.store.list_tokens()?;
        *self.tokens.lock().unwrap_or_else(|p| p.into_inner()) =
            all.into_iter().map(|t| (t.id.clone(), t)).collect();
        Ok(())
    }

    /// The caller a bearer token stands for; `None` for a missing,
    /// malformed, unknown, wrong, revoked or expired token (all one 401).
    pub fn authenticate(&self, bearer: &str) -> Option<Caller> {
        let rest = bearer.strip_prefix(TOKEN_PREFIX)?.strip_prefix('_')?;
        let (id, secret) = rest.split_once('_')?;
        // Hashed before the lookup, so an unknown id costs what a known one
        // does.
        let hash = hash_secret(secret);
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let t = tokens.get(id)?;
        if !bool::from(hash.ct_eq(&t.hash)) || t.revoked_at.is_some() {
            return None;
        }
        let now = self.clock.now_ms() / 1000;
        if t.expires_at.is_some_and(|at| now >= at) {
            return None;
        }
        if let Some(a) = &t.account
            && self.with_state(|st| st.account(a).is_none())
        {
            return None;
        }
        Some(Caller {
            actor: format!("token:{}", t.id),
            role: t.role,
            account: t.account.clone(),
        })
    }

    /// Creates a token: operators may create any; an owner, tokens of its
    /// own account with a role up to its own.
    pub async fn create_token(
        &self,
        caller: &Caller,
        account: &str,
        req: NewToken,
    ) -> Result<TokenView, DaemonError> {
        let (role, token_account) = match (req.operator, req.role.as_deref()) {
            (true, None) => {
                caller.require(Need::Operator)?;
                (Role::Operator, None)
            }
            (false, Some(r)) => {
                let role = Role::parse(r).map_err(DaemonError::Invalid)?;
                if role == Role::Operator {
                    return Err(DaemonError::Invalid(
                        "an operator token is made with --operator, not --role operator".into(),
                    ));
                }
                caller.require(Need::Keys)?;
                if self.with_state(|st| st.account(account).is_none()) {
                    return Err(no_account(account));
                }
                (role, Some(account.to_string()))
            }
            _ => {
                return Err(DaemonError::Invalid(
                    "give either --operator or --role owner|ips|viewer".into(),
                ));
            }
        };
        let name = req.name.unwrap_or_default().trim().to_string();
        if name.len() > 100 {
            return Err(DaemonError::Invalid(
                "--name is longer than 100 characters".into(),
            ));
        }
        let now = self.clock.now_ms() / 1000;
        let expires_at = match req.expires.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(e) => Some(
                now + super::parse_ttl(e)
                    .map_err(|m| DaemonError::Invalid(m.replace("TTL", "--expires")))?
                    .as_secs() as i64,
            ),
        };
        let id = random_hex(8)?;
        let secret = random_hex(32)?;
        let rec = TokenRecord {
            id: id.clone(),
            name,
            account: token_account,
            role,
            hash: hash_secret(&secret),
            created_at: now,
            expires_at,
            revoked_at: None,
            created_by: caller.actor.clone(),
        };
        self.store.create_token(&rec, &caller.actor)?;
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), rec.clone());
        tracing::info!(token = %id, role = role.as_str(), account = ?rec.account, actor = %caller.actor, "token created");
        let mut v = view(&rec);
        v.token = Some(format!("{TOKEN_PREFIX}_{id}_{secret}"));
        Ok(v)
    }

    /// Operators see every token (or one account's, when they name it);
    /// an account's callers see their account's.
    pub fn list_tokens(&self, caller: &Caller, named: Option<&str>) -> TokenList {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let scope: Option<&str> = caller.account.as_deref().or(named);
        let mut out: Vec<TokenView> = tokens
            .values()
            .filter(|t| scope.is_none() || t.account.as_deref() == scope)
            .map(view)
            .collect();
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        TokenList { tokens: out }
    }

    pub async fn revoke_token(&self, caller: &Caller, id: &str) -> Result<TokenView, DaemonError> {
        let not_found = || {
            DaemonError::NotFound(format!(
                "no token with id {id:?}; `allowlistctl tokens list` shows the ids"
            ))
        };
        let t = self
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(not_found)?;
        // Another account's token is "no token".
        if caller.account.is_some() && t.account != caller.account {
            return Err(not_found());
        }
        match t.account {
            None => caller.require(Need::Operator)?,
            Some(_) => caller.require(Need::Keys)?,
        }
        let now = self.clock.now_ms() / 1000;
        if !self.store.revoke_token(id, now, &caller.actor)? {
            return Err(DaemonError::Invalid(format!(
                "token {id} is already revoked"
            )));
        }
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let rec = tokens.get_mut(id).ok_or_else(not_found)?;
        rec.revoked_at = Some(now);
        tracing::info!(token = %id, actor = %caller.actor, "token revoked");
        Ok(view(rec))
    }
}
