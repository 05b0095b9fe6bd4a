//! Reading the usage log: a caller's query checked and turned into the
//! log room's own.

use crate::{
    api,
    daemon::{Daemon, DaemonError, no_account, parse_cidr, parse_since},
    logs::LogQuery,
};

impl Daemon {
    /// Where the usage log is read from: the store set at start, or this
    /// edge's day files.
    pub fn log_store(&self) -> std::sync::Arc<dyn crate::logs::LogStore> {
        match self.log_store.get() {
            Some(s) => s.clone(),
            None => std::sync::Arc::new(crate::logs::DayFiles::at(self.config.logs_dir())),
        }
    }

    /// The usage-log query of `account` that `q` asks for.
    pub fn log_query(&self, account: &str, q: &api::LogsQuery) -> Result<LogQuery, DaemonError> {
        if self.with_state(|st| st.account(account).is_none()) {
            return Err(no_account(account));
        }
        let now = self.clock.now_ms() / 1000;
        let time = |flag: &str, t: &Option<String>| -> Result<Option<i64>, DaemonError> {
            match t.as_deref().map(str::trim) {
                None | Some("") => Ok(None),
                Some(t) => parse_since(t, now)
                    .map(|s| Some(s * 1000))
                    .map_err(|m| DaemonError::Invalid(m.replace("--since", flag))),
            }
        };
        let since_ms = time("--since", &q.since)?;
        // An `until` second covers its whole second.
        let until_ms = time("--until", &q.until)?.map(|ms| ms + 999);
        let method = match q.method.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(m) if m.len() <= 16 && m.bytes().all(|b| b.is_ascii_alphabetic()) => {
                Some(m.to_ascii_uppercase())
            }
            Some(m) => {
                return Err(DaemonError::Invalid(format!(
                    "--method {m:?} is not an HTTP method; write it like GET or POST"
                )));
            }
        };
        if let Some(s) = q.status
            && !(100..=599).contains(&s)
        {
            return Err(DaemonError::Invalid(format!(
                "--status {s} is not an HTTP status (100 to 599)"
            )));
        }
        let ip = match q.ip.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(c) => Some(parse_cidr(c).map_err(|m| DaemonError::Invalid(format!("--ip: {m}")))?),
        };
        Ok(LogQuery {
            account: account.to_string(),
            key: q.key.clone().filter(|k| !k.is_empty()),
            method,
            status: q.status,
            reason: q.reason.clone().filter(|r| !r.is_empty()),
            ip,
            since_ms,
            until_ms,
        })
    }
}
