//! What an account's owner must be told about, handed to the notifier
//! (`notify`) over a bounded queue: the daemon raises notices, it never
//! sends mail or calls webhooks itself.

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::mpsc;

use crate::daemon::Daemon;

/// Something an account's owner is told about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// An address was refused: by the edge (a key's `key_id`) or, with an
    /// empty `key_id`, by the kernel on a guarded port.
    Blocked {
        account: String,
        addr: IpAddr,
        key_id: String,
        /// "api" or "smtp".
        service: &'static str,
        /// Refused by the key's own allowlist: authorizing the address for
        /// the account would not admit it; allowing it on the key would.
        by_key: bool,
    },
    /// API blocking switched to active by itself after the quiet period.
    BlockingActivated { account: String },
    /// A key used `percent` (80 or 100) of its rate limit.
    RateLimit {
        account: String,
        key_id: String,
        percent: u8,
    },
    /// A rotated key's previous secret stops working at `ends_at` (Unix s).
    GraceEnding {
        account: String,
        key_id: String,
        ends_at: i64,
    },
}

impl Notice {
    pub fn account(&self) -> &str {
        match self {
            Notice::Blocked { account, .. }
            | Notice::BlockingActivated { account }
            | Notice::RateLimit { account, .. }
            | Notice::GraceEnding { account, .. } => account,
        }
    }
}

/// Notices in flight to the notifier; past it a notice is counted and
/// dropped (the daemon never waits for a mail relay).
pub const QUEUE: usize = 4096;

/// The daemon's end of the notice queue.
#[derive(Default)]
pub struct Notices {
    tx: OnceLock<mpsc::Sender<Notice>>,
    pub dropped: AtomicU64,
    /// (key id, end of grace) already announced.
    grace_told: Mutex<HashSet<(String, i64)>>,
}

impl Notices {
    /// Opens the queue once; the notifier reads the receiver.
    pub fn open(&self) -> Option<mpsc::Receiver<Notice>> {
        let (tx, rx) = mpsc::channel(QUEUE);
        self.tx.set(tx).ok().map(|_| rx)
    }

    /// Queues a notice without waiting; nothing happens before `open`.
    pub fn raise(&self, notice: Notice) {
        if let Some(tx) = self.tx.get()
            && tx.try_send(notice).is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Notices waiting for the notifier.
    pub fn depth(&self) -> usize {
        self.tx
            .get()
            .map(|tx| tx.max_capacity() - tx.capacity())
            .unwrap_or(0)
    }
}

impl Daemon {
    /// Announces, once per rotation, every rotation grace that ends within
    /// `within_s` seconds.
    pub fn raise_grace_notices(&self, within_s: i64) {
        let now_ms = self.clock.now_ms();
        let ending: Vec<(String, String, i64)> = self.with_state(|st| {
            st.accounts
                .values()
                .flat_map(|a| a.keys.values())
                .filter_map(|k| {
                    let (_, ends_ms) = k.previous?;
                    (ends_ms > now_ms && ends_ms - now_ms <= within_s * 1000)
                        .then(|| (k.account.clone(), k.id.clone(), ends_ms / 1000))
                })
                .collect()
        });
        let mut told = self
            .notices
            .grace_told
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Graces that ended are forgotten, so the set stays bounded.
        told.retain(|(_, ends)| *ends * 1000 > now_ms);
        for (account, key_id, ends_at) in ending {
            if told.insert((key_id.clone(), ends_at)) {
                self.notices.raise(Notice::GraceEnding {
                    account,
                    key_id,
                    ends_at,
                });
            }
        }
    }
}
