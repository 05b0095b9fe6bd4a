//! The accept phase: the listener, one single-threaded worker per CPU, and
//! per connection its limits, PROXY header, TLS handshake and HTTP
//! service.

use super::*;

/// Binds the edge listener. It is returned unregistered: each edge worker
/// registers its own duplicate with its own runtime.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, ProxyError> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        // A deeper accept queue than the usual 128 rides out bursts of new
        // connections (the kernel caps it at net.core.somaxconn).
        socket.listen(4096)?.into_std()
    };
    listen().map_err(|source| ProxyError::Bind { addr, source })
}

/// Accepts and serves connections until `shutdown` turns true, then drains
/// in-flight requests (bounded).
///
/// The edge runs one single-threaded runtime per CPU, each accepting from
/// its own duplicate of the listening socket, the way nginx runs one worker
/// per CPU: a connection, its requests and its upstream connections then
/// live on one thread, with no work-stealing handoffs or cross-thread
/// wake-ups on the per-request path. Every worker is woken for a new
/// connection; one that holds clearly more connections than another
/// leaves it to the others for a moment (`Shared::busier`), so long-lived
/// keep-alive connections spread evenly instead of by who won the race.
/// (Per-worker SO_REUSEPORT sockets were tried: they spare the wake-up of
/// the worker that loses the accept race, but hashing pins connections to
/// a busy worker while the other idles, and p99 doubled.)
///
/// The edge knows the application only through `host` (the policy
/// snapshot, the clock, kernel pairing, the live-connection table) and
/// hands side effects over `effects`, in batches; when every worker has
/// stopped, that sender is dropped, so the consumer flushes and ends.
pub async fn serve(
    host: Arc<dyn EdgeHost>,
    cfg: ProxyConfig,
    effects: mpsc::Sender<Vec<SideEffect>>,
    listener: std::net::TcpListener,
    tls: Arc<ServerConfig>,
    stats: Arc<EdgeStats>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shared = Arc::new(Shared {
        upstream: Upstream::parse(&cfg.upstream),
        acceptor: TlsAcceptor::from(tls),
        slots: Arc::new(Semaphore::new(cfg.max_connections)),
        load: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
        preserve_host: cfg.preserve_host,
        first_request: Duration::from_secs(cfg.header_timeout_secs),
        idle: Duration::from_secs(cfg.idle_timeout_secs),
        host,
        effects,
        stats,
        cfg,
    });
    let mut done = Vec::with_capacity(workers);
    for i in 0..workers {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let spawned = listener.try_clone().and_then(|l| {
            let (shared, shutdown) = (shared.clone(), shutdown.clone());
            std::thread::Builder::new()
                .name(format!("edge-{i}"))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(async move {
                            match crate::sys::async_fd(l, Interest::READABLE) {
                                Ok(l) => worker(shared, i, l, shutdown).await,
                                Err(e) => tracing::error!(error = %e, "edge worker listener"),
                            }
                        }),
                        Err(e) => tracing::error!(error = %e, "edge worker runtime"),
                    }
                    drop(done_tx);
                })
        });
        match spawned {
            Ok(_) => done.push(done_rx),
            Err(e) => tracing::error!(error = %e, worker = i, "starting an edge worker"),
        }
    }
    drop((listener, shared));
    for d in done {
        let _ = d.await;
    }
}

/// One edge worker: its own accept loop, connections and upstream pool.
async fn worker(
    shared: Arc<Shared>,
    me: usize,
    listener: AsyncFd<std::net::TcpListener>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let cfg = &shared.cfg;
    let edge = Arc::new(Edge {
        pool: upstream::Pool::new(shared.upstream.addr.clone()),
        shared: shared.clone(),
        pending: Default::default(),
        slot: me,
    });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(cfg.header_timeout_secs))
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(cfg.max_streams)
        // Rapid reset (CVE-2023-44487): a client that opens and cancels
        // streams faster than they are served gets a GOAWAY.
        .max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .max_local_error_reset_streams(Some(MAX_ERROR_RESETS))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    loop {
        let mut ready = tokio::select! {
            r = listener.readable() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "edge listener");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.wait_for(|s| *s) => break,
        };
        if shared.busier(me) {
            // The other workers were woken for this connection too; if none
            // takes it within BALANCE_DEFER (all busy), this one does.
            tokio::time::sleep(BALANCE_DEFER).await;
        }
        let (stream, peer) = match ready.try_io(|l| crate::sys::accept_nonblocking(l.as_raw_fd())) {
            Ok(Ok(x)) => x,
            // Another worker took it (readiness is now cleared).
            Err(_would_block) => continue,
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        drop(ready);
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
            // Over the connection limit: refuse at once rather than queue.
            drop(stream);
            continue;
        };
        let mut stream = match TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "registering a connection");
                continue;
            }
        };
        shared.load[me].fetch_add(1, Ordering::Relaxed);
        let held = Held {
            shared: shared.clone(),
            worker: me,
        };
        let _ = stream.set_nodelay(true);
        let edge = edge.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = (permit, held);
            let shared = &edge.shared;
            let peer_ip = normalize(peer.ip());
            let mut client_ip = peer_ip;
            // `[proxy] trusted_proxies` as of now: a reload swaps it.
            let trusted = shared
                .host
                .snapshot()
                .trusted
                .longest_match(peer_ip)
                .is_some();
            // From a trusted proxy the client is named by its PROXY header,
            // or else per request by X-Forwarded-For; never the proxy itself.
            let mut source = ClientSource::Peer;
            if trusted {
                match tokio::time::timeout(PROXY_HEADER_TIMEOUT, read_proxy_header(&mut stream))
                    .await
                {
                    Ok(Ok(ProxyHeader::Client(a))) => client_ip = normalize(a),
                    Ok(Ok(ProxyHeader::Absent)) => source = ClientSource::Forwarded,
                    Ok(Ok(ProxyHeader::NoClient)) => source = ClientSource::Missing,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "bad PROXY header");
                        return;
                    }
                    Err(_) => return,
                }
            }
            let fd = stream.as_raw_fd();
            let cookie = crate::sys::socket_cookie(fd).ok();
            let tls =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, shared.acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    _ => return,
                };
            let live = Arc::new(LiveConn {
                client: client_ip,
                fd,
                cookie,
                key: Default::default(),
                reported_ms: AtomicI64::new(0),
                kill: tokio::sync::Notify::new(),
                activity: Activity::new(),
                forwarded: Default::default(),
                binding: if source == ClientSource::Forwarded {
                    ConnClientKind::Forwarded
                } else if client_ip != peer_ip {
                    ConnClientKind::Proxy(client_ip)
                } else {
                    ConnClientKind::Peer
                },
            });
            let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
            shared.host.register(id, live.clone());
            let conn_edge = edge.clone();
            let conn_live = live.clone();
            let service = hyper::service::service_fn(move |req| {
                let edge = conn_edge.clone();
                let live = conn_live.clone();
                // Boxed: the request's future is large, and hyper moves it
                // into place per request; a pointer is cheaper to move.
                Box::pin(async move { edge.handle(req, &live, source).await })
            });
            let conn = builder
                .serve_connection(TokioIo::new(tls), service)
                .into_owned();
            let mut conn = Box::pin(watcher.watch(conn));
            let cut = tokio::select! {
                _ = &mut conn => false,
                _ = live.kill.notified() => true,
                // No request for too long: closed, a plain close (nothing is
                // in flight to lose).
                _ = live.activity.idle(shared.first_request, shared.idle) => false,
            };
            if cut {
                // `conn` still owns the socket: make its close an RST.
                crate::sys::abortive_close(live.fd);
            }
            drop(conn);
            // The kernel forgets the socket's CONNS entry itself when it
            // closes (conn_ops), which spares a syscall per connection here.
            shared.host.unregister(id);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!("edge worker drained"),
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("edge drain timed out; closing remaining connections"),
    }
    edge.flush_effects();
}
