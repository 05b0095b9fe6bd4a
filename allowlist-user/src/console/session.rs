//! Console sessions: a random id in a `__Host-` cookie (`HttpOnly`,
//! `Secure`, `SameSite=Strict`), the token it signed in with, and a CSRF
//! token every form carries. Sessions live in the daemon's memory only: a
//! restart signs everyone out, and no session secret is ever written down.
//!
//! The session keeps the bearer token because the console acts only
//! through the admin API, which checks the token on every call: a token
//! revoked or expired ends its sessions at their next request.

use std::{collections::HashMap, sync::Mutex};

use axum::http::{HeaderMap, HeaderValue, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::api::WhoAmI;

pub const COOKIE: &str = "__Host-allowlist-session";
/// The sign-in form's double-submit cookie: a login CSRF (an attacker
/// signing a victim into the attacker's account) needs this value.
pub const SIGNIN_COOKIE: &str = "__Host-allowlist-signin";
/// Sessions held at most; past it the least recently used goes.
const MAX_SESSIONS: usize = 10_000;
/// Sessions one token may hold; past it that token's least recently used
/// goes (so one token signing in in a loop cannot push out everyone
/// else's).
const MAX_PER_TOKEN: usize = 8;

/// A one-shot message shown on the next page.
#[derive(Clone, Debug)]
pub struct Flash {
    pub ok: bool,
    pub text: String,
}

#[derive(Clone)]
pub struct Session {
    pub token: String,
    pub csrf: String,
    pub who: WhoAmI,
    /// The account the pages act on: an account token's own; an
    /// operator's choice.
    pub account: String,
    pub created_ms: i64,
    pub seen_ms: i64,
    pub flash: Option<Flash>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("who", &self.who)
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub fn operator(&self) -> bool {
        self.who.role == crate::policy::Role::Operator
    }

    pub fn may(&self, need: crate::policy::Need) -> bool {
        self.who.role.may(need)
    }
}

/// How long sessions last.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    pub idle_ms: i64,
    pub max_ms: i64,
}

#[derive(Default)]
pub struct Sessions {
    /// By SHA-256 of the cookie's value, so the table holds no usable
    /// cookie.
    map: Mutex<HashMap<[u8; 32], Session>>,
}

pub fn random_token() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the kernel's random source");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// Constant-time comparison of two tokens.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl Sessions {
    /// Opens a session; returns the cookie value.
    pub fn open(&self, token: String, who: WhoAmI, now_ms: i64, life: Lifetimes) -> String {
        let id = random_token();
        let account = who
            .account
            .clone()
            .unwrap_or_else(|| crate::policy::DEFAULT_ACCOUNT.to_string());
        let s = Session {
            token,
            csrf: random_token(),
            who,
            account,
            created_ms: now_ms,
            seen_ms: now_ms,
            flash: None,
        };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mine: Vec<([u8; 32], i64)> = map
            .iter()
            .filter(|(_, o)| o.who.actor == s.who.actor)
            .map(|(k, o)| (*k, o.seen_ms))
            .collect();
        if mine.len() >= MAX_PER_TOKEN
            && let Some((oldest, _)) = mine.iter().min_by_key(|(_, seen)| *seen)
        {
            map.remove(oldest);
        }
        // Expired sessions go first; then, if still full, the least
        // recently used.
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, o| {
                now_ms - o.seen_ms <= life.idle_ms && now_ms - o.created_ms <= life.max_ms
            });
        }
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.seen_ms).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(digest(&id), s);
        id
    }

    /// The session `id` names, if it is live; touches it. An expired one
    /// is removed.
    pub fn get(&self, id: &str, now_ms: i64, life: Lifetimes) -> Option<Session> {
        let key = digest(id);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let s = map.get_mut(&key)?;
        if now_ms - s.seen_ms > life.idle_ms || now_ms - s.created_ms > life.max_ms {
            map.remove(&key);
            return None;
        }
        s.seen_ms = now_ms;
        let out = s.clone();
        s.flash = None;
        Some(out)
    }

    pub fn update(&self, id: &str, f: impl FnOnce(&mut Session)) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get_mut(&digest(id)) {
            f(s);
        }
    }

    pub fn close(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&digest(id));
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The value of cookie `name` in the request, if sent once.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut found = None;
    for v in headers.get_all(header::COOKIE) {
        for pair in v.to_str().ok()?.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=')
                && k == name
            {
                if found.is_some() {
                    // Two cookies of one name: one was planted (a
                    // sibling subdomain cannot set `__Host-` cookies, but
                    // refuse the ambiguity anyway).
                    return None;
                }
                found = Some(v);
            }
        }
    }
    found
}

/// A `Set-Cookie` for `name`; `max_age` 0 deletes it.
pub fn set_cookie(name: &str, value: &str, max_age: Option<i64>) -> HeaderValue {
    let age = max_age
        .map(|a| format!("; Max-Age={a}"))
        .unwrap_or_default();
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; Secure; HttpOnly; SameSite=Strict{age}"
    ))
    .expect("cookie values are hex")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Role;

    fn who() -> WhoAmI {
        WhoAmI {
            actor: "token:1".into(),
            role: Role::Owner,
            account: Some("acme".into()),
        }
    }

    #[test]
    fn sessions_expire_idle_and_in_any_case() {
        let s = Sessions::default();
        let life = Lifetimes {
            idle_ms: 1_000,
            max_ms: 5_000,
        };
        let id = s.open("t".into(), who(), 0, life);
        assert_eq!(s.get(&id, 900, life).unwrap().account, "acme");
        // Touched at 900: alive at 1800.
        assert!(s.get(&id, 1_800, life).is_some());
        assert!(s.get(&id, 2_900, life).is_none(), "idle past 1 s");
        let id = s.open("t".into(), who(), 0, life);
        for t in (800..5_000).step_by(800) {
            assert!(s.get(&id, t, life).is_some());
        }
        assert!(s.get(&id, 5_001, life).is_none(), "older than 5 s");
        assert!(s.get("forged", 0, life).is_none());
    }

    #[test]
    fn one_token_holds_a_bounded_number_of_sessions() {
        let s = Sessions::default();
        let life = Lifetimes {
            idle_ms: 1_000_000,
            max_ms: 1_000_000,
        };
        let first = s.open("t".into(), who(), 0, life);
        let mut other = who();
        other.actor = "token:2".into();
        let theirs = s.open("u".into(), other, 0, life);
        for t in 1..=MAX_PER_TOKEN as i64 {
            s.open("t".into(), who(), t, life);
        }
        assert_eq!(s.len(), MAX_PER_TOKEN + 1);
        assert!(
            s.get(&first, 100, life).is_none(),
            "the token's oldest went"
        );
        assert!(
            s.get(&theirs, 100, life).is_some(),
            "another token's stayed"
        );
    }

    #[test]
    fn a_repeated_cookie_is_refused() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        h.append(header::COOKIE, HeaderValue::from_static("b=3"));
        assert_eq!(cookie(&h, "b"), None);
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
