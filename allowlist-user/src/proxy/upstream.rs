//! One edge worker's keep-alive connections to the upstream (HTTP/1.1).
//!
//! Each worker runs on its own thread, so the pool is that thread's alone:
//! a connection is lent to one request at a time and comes back when its
//! response body has been read to the end. A connection whose body was
//! dropped half-read is closed instead (HTTP/1 cannot resume it). Compared
//! with a general-purpose pooled client this skips the per-request URI
//! resolution, the shared pool map and its bookkeeping, which were a tenth
//! of the edge's user time per request.

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use hyper::{
    Request, Response,
    body::{Body, Bytes, Frame, Incoming, SizeHint},
    client::conn::http1::{self, SendRequest},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Connections idle longer than this are closed rather than reused: the
/// upstream may be about to close them itself.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per worker; more are closed when they come back.
const MAX_IDLE: usize = 256;
/// An upstream that does not accept within this is answered with a 502
/// rather than left to the kernel's SYN retries (about two minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

struct Idle {
    tx: SendRequest<Incoming>,
    since: Instant,
}

pub struct Pool {
    /// `host:port` to connect to.
    addr: String,
    idle: Mutex<Vec<Idle>>,
}

impl Pool {
    pub fn new(addr: String) -> Arc<Pool> {
        Arc::new(Pool {
            addr,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// The most recently used idle connection that is still open.
    fn take_idle(&self) -> Option<SendRequest<Incoming>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if !c.tx.is_closed() && c.since.elapsed() < IDLE_TIMEOUT {
                return Some(c.tx);
            }
        }
        None
    }

    fn put_back(&self, tx: SendRequest<Incoming>) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // The oldest sit at the front: close the one that has waited too
        // long, so a pool that once grew shrinks again.
        if idle
            .first()
            .is_some_and(|c| c.since.elapsed() >= IDLE_TIMEOUT)
        {
            idle.remove(0);
        }
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                tx,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<SendRequest<Incoming>, UpstreamError> {
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr));
        let stream = match connect.await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
            )),
        }
        .map_err(|source| UpstreamError::Connect {
            addr: self.addr.clone(),
            source,
        })?;
        let _ = stream.set_nodelay(true);
        let (tx, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection closed");
            }
        });
        Ok(tx)
    }

    /// Sends `req` (origin-form URI, with a Host header) on an idle
    /// connection, or a new one. A request that a reused connection closed
    /// before sending it is sent again on another: the upstream may close an
    /// idle connection at any moment.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        loop {
            let (mut tx, reused) = match self.take_idle() {
                Some(tx) => (tx, true),
                None => (self.connect().await?, false),
            };
            // A connection just given back may not have asked for its next
            // request yet; this wait is at most one turn of its task. (A new
            // one takes its first request unasked.)
            if reused && tx.ready().await.is_err() {
                continue;
            }
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    return Ok(resp.map(|body| PooledBody {
                        body,
                        lease: Some((tx, Arc::downgrade(self))),
                    }));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }
}

/// A response body that returns its connection to the pool once read to
/// the end.
pub struct PooledBody {
    body: Incoming,
    lease: Option<(SendRequest<Incoming>, Weak<Pool>)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((tx, pool)) = self.lease.take()
            && let Some(pool) = pool.upgrade()
        {
            pool.put_back(tx);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            None => self.release(),
            Some(Ok(_)) if self.body.is_end_stream() => self.release(),
            Some(Err(_)) => self.lease = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // An empty body may never be polled; a half-read one leaves the
        // connection unusable, and dropping its sender closes it.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}
