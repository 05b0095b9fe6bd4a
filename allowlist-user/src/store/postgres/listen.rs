//! The change feed: one connection outside the pool that LISTENs on
//! [`CHANGES_CHANNEL`] and forwards each committed change, reconnecting
//! with backoff. After every (re)connection it says so, because
//! notifications sent while it was away are lost and the edge must resync.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Socket, tls::MakeTlsConnect};

use super::{CHANGES_CHANNEL, PgStore, describe};
use crate::store::{StoreError, StoreEvent};

impl PgStore {
    /// The latest audit row: every committed change writes one.
    pub(in crate::store) fn latest_seq(&self) -> Result<i64, StoreError> {
        self.with("reading the change sequence", async |c| {
            c.query_one("SELECT coalesce(max(id), 0) FROM audit", &[])
                .await?
                .try_get(0)
        })
    }

    /// Starts the change feed on the store's runtime; it runs until the
    /// receiver is dropped.
    pub(in crate::store) fn start_feed(&self) -> mpsc::UnboundedReceiver<StoreEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let cfg = self.cfg.clone();
        let tls = self.tls.clone();
        let target = self.target.clone();
        self.rt.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            while !tx.is_closed() {
                let r = match &tls {
                    None => session(&cfg, tokio_postgres::NoTls, &tx).await,
                    Some(t) => session(&cfg, t.clone(), &tx).await,
                };
                match r {
                    // It was up: try again at once, then back off.
                    Ok(()) => backoff = Duration::from_millis(100),
                    Err(e) => {
                        tracing::warn!(store = %target, error = %e, "change feed: cannot listen; retrying");
                    }
                }
                if tx.send(StoreEvent::Lost).is_err() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        });
        rx
    }
}

/// One connection's life: LISTEN, say so, forward notifications until the
/// connection ends. `Ok` when it was listening before it ended.
async fn session<T>(
    cfg: &tokio_postgres::Config,
    tls: T,
    tx: &mpsc::UnboundedSender<StoreEvent>,
) -> Result<(), String>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut conn) = cfg.connect(tls).await.map_err(|e| describe(&e))?;
    let (ntx, mut nrx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    if ntx.send(n.payload().to_string()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let listening = client
        .batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))
        .await;
    if let Err(e) = listening {
        driver.abort();
        return Err(describe(&e));
    }
    if tx.send(StoreEvent::Listening).is_err() {
        driver.abort();
        return Ok(());
    }
    while let Some(payload) = nrx.recv().await {
        let Some((seq, account)) = payload.split_once(':') else {
            continue;
        };
        let Ok(seq) = seq.parse::<i64>() else {
            continue;
        };
        let ev = StoreEvent::Changed {
            seq,
            account: account.to_string(),
        };
        if tx.send(ev).is_err() {
            break;
        }
    }
    driver.abort();
    drop(client);
    Ok(())
}
