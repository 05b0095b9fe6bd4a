//! Who may change what through the admin API: roles and what each allows.

use serde::{Deserialize, Serialize};

/// A caller's role. Operators (the admin socket, operator tokens) reach
/// every account and the installation-wide settings; the others reach
/// their own account only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Operator,
    /// Everything in its account, including keys and the account's tokens.
    Owner,
    /// The seeds' "SMTP & API – Authorized IPs" permission: the authorized
    /// and unauthorized lists and blocking; reads keys and logs.
    Ips,
    /// Reads only.
    Viewer,
}

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Reading the account's objects.
    Read,
    /// Changing the authorized/unauthorized lists and blocking modes.
    Lists,
    /// Changing keys and the account's tokens.
    Keys,
    /// Installation-wide: accounts, the drop list, counters, operator tokens.
    Operator,
}

impl Need {
    /// The least role that has this, for the `permission_denied` message.
    pub fn least_role(self) -> Role {
        match self {
            Need::Read => Role::Viewer,
            Need::Lists => Role::Ips,
            Need::Keys => Role::Owner,
            Need::Operator => Role::Operator,
        }
    }
}

impl Role {
    pub fn parse(s: &str) -> Result<Role, String> {
        Ok(match s {
            "operator" => Role::Operator,
            "owner" => Role::Owner,
            "ips" => Role::Ips,
            "viewer" => Role::Viewer,
            _ => {
                return Err(format!(
                    "unknown role {s:?}; use owner, ips or viewer (or --operator)"
                ));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Owner => "owner",
            Role::Ips => "ips",
            Role::Viewer => "viewer",
        }
    }

    pub fn may(self, need: Need) -> bool {
        match need {
            Need::Read => true,
            Need::Lists => matches!(self, Role::Operator | Role::Owner | Role::Ips),
            Need::Keys => matches!(self, Role::Operator | Role::Owner),
            Need::Operator => self == Role::Operator,
        }
    }
}

/// Account names: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn check_account_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "account name {name:?} is not valid: 1 to 63 characters, lowercase letters, digits and '-', \
             not starting with '-' (like acme or acme-eu)"
        ))
    }
}

/// The account every command that names none acts on.
pub const DEFAULT_ACCOUNT: &str = "default";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_nest() {
        for need in [Need::Read, Need::Lists, Need::Keys, Need::Operator] {
            assert!(Role::Operator.may(need));
            assert!(need.least_role().may(need));
        }
        assert!(!Role::Viewer.may(Need::Lists));
        assert!(!Role::Ips.may(Need::Keys));
        assert!(Role::Ips.may(Need::Lists));
        assert!(!Role::Owner.may(Need::Operator));
    }

    #[test]
    fn account_names() {
        for ok in ["default", "a", "acme-eu", "0x", &"a".repeat(63)] {
            assert!(check_account_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "Acme", "a_b", "a.b", "a/b", &"a".repeat(64), "é"] {
            assert!(check_account_name(bad).is_err(), "{bad}");
        }
    }
}
