//! allowlistd: the daemon.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use allowlist::{
    admin,
    config::{self, Config},
    daemon::{Clock, Daemon},
    kernel::{self, Kernel, KernelOptions},
    proxy,
    store::{PgOptions, PgStore, SqliteStore, Store, StoreUrl, parse_url},
};
use anyhow::Context as _;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

// The edge allocates and frees many small buffers per request on several
// threads; mimalloc's per-thread free lists take a third less time per
// request than glibc's arenas (BENCHMARKS.md, edge).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Per-key network allowlists for API edges, enforced in the proxy and in
/// the kernel.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Configuration file (TOML). Missing default file = built-in defaults.
    #[arg(long, short, env = "ALLOWLIST_CONFIG")]
    config: Option<PathBuf>,
    /// Run without eBPF (development): no XDP, no kernel maps.
    #[arg(long)]
    no_kernel: bool,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Remove every eBPF program, link and map this daemon pinned, then exit.
    /// (A normal stop leaves them in place so enforcement has no gap.)
    #[arg(long)]
    unload: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ALLOWLIST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let explicit = args.config.is_some();
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| config::DEFAULT_PATH.into());
    let config = match Config::load(&path, explicit) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("allowlistd: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("{}: configuration is valid", path.display());
        return ExitCode::SUCCESS;
    }
    if args.unload {
        return match kernel::unload(&config.kernel.bpffs) {
            Ok(true) => {
                println!(
                    "removed every program, link and map under {}",
                    config.kernel.bpffs.display()
                );
                ExitCode::SUCCESS
            }
            Ok(false) => {
                println!("nothing pinned under {}", config.kernel.bpffs.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("allowlistd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("allowlistd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, path, explicit, args.no_kernel)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("allowlistd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, path: PathBuf, explicit: bool, no_kernel: bool) -> anyhow::Result<()> {
    // The PostgreSQL store also keeps the shared usage log.
    let mut pg: Option<Arc<PgStore>> = None;
    let store: Arc<dyn Store> =
        match parse_url(&config.store.url).map_err(|e| anyhow::anyhow!("[store] url: {e}"))? {
            StoreUrl::Sqlite(db) => {
                let s = SqliteStore::open(&db)?;
                tracing::info!(store = %db.display(), "store opened");
                Arc::new(s)
            }
            StoreUrl::Postgres(url) => {
                let opts = PgOptions {
                    url,
                    ca: config.store.ca.clone(),
                    pool: config.store.pool,
                };
                let s = Arc::new(tokio::task::spawn_blocking(move || PgStore::open(&opts)).await??);
                tracing::info!(store = %s.target(), "store opened");
                pg = Some(s.clone());
                s
            }
        };

    let mut kernel = None;
    if config.kernel.enabled && !no_kernel {
        let opts = KernelOptions {
            bpffs: config.kernel.bpffs.clone(),
            interfaces: config.kernel.interfaces.clone(),
            mode: config.kernel.xdp_mode,
            drop_capacity: config.kernel.drop_capacity,
            guard_capacity: config.kernel.guard_capacity,
            cgroup: Some(config.kernel.cgroup),
            batch_writes: true,
        };
        let k = tokio::task::spawn_blocking(move || Kernel::load(opts)).await??;
        if k.attached.is_empty() {
            tracing::info!("XDP not attached: [kernel] interfaces is empty");
        }
        kernel = Some(k);
    } else {
        tracing::warn!("kernel enforcement is off (--no-kernel or [kernel] enabled = false)");
    }
    let events = match kernel.as_mut() {
        Some(k) => Some(k.take_events()?),
        None => None,
    };
    let conns = match kernel.as_mut() {
        Some(k) => Some(k.conn_table()?),
        None => None,
    };
    let mut daemon = Daemon::new(config.clone(), store.clone(), kernel, Clock::from_env())?;
    daemon.conns = conns;
    let daemon = Arc::new(daemon);
    // A shared store: listen before loading, so every change committed
    // after the load is announced (and one committed before is in it).
    let feed = match store.subscribe() {
        Some(mut feed) => {
            let listening = tokio::time::timeout(Duration::from_secs(15), async {
                while let Some(ev) = feed.recv().await {
                    if ev == allowlist::store::StoreEvent::Listening {
                        return true;
                    }
                }
                false
            })
            .await;
            if listening != Ok(true) {
                anyhow::bail!(
                    "the store's change feed did not start listening within 15 s; is the PostgreSQL server reachable?"
                );
            }
            Some(feed)
        }
        None => None,
    };
    daemon
        .init_policy()
        .context("loading keys and allowlists into the policy and the kernel maps")?;
    {
        let d = daemon.clone();
        let records = store.list_drops()?;
        tokio::task::spawn_blocking(move || d.sync_kernel(&records))
            .await?
            .context("writing the stored drop list into the kernel maps")?;
    }
    if let Some(ring) = events {
        tokio::spawn(daemon.clone().read_events(ring));
    }
    // Other edges on the same PostgreSQL: apply what they change.
    if let Some(feed) = feed {
        tokio::spawn(
            daemon
                .clone()
                .follow_store(feed, Duration::from_secs(config.store.resync_secs)),
        );
    }
    let (ck, fingerprint) = proxy::load_cert(
        config.proxy.cert.as_deref(),
        config.proxy.key.as_deref(),
        config.proxy.listen,
    )?;
    let certs = proxy::CertStore::new(ck, fingerprint.clone());
    let tls = proxy::tls_config(certs.clone())?;
    let edge_listener = proxy::bind(config.proxy.listen)?;
    tracing::info!(
        listen = %edge_listener.local_addr()?,
        upstream = %config.proxy.upstream,
        certificate = if config.proxy.cert.is_some() { "configured" } else { "self-signed (generated)" },
        sha256 = %fingerprint,
        "API edge listening (TLS)"
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let edge_stats = Arc::new(proxy::EdgeStats::default());
    edge_stats.counters.per_account.store(
        config.metrics.per_account,
        std::sync::atomic::Ordering::Relaxed,
    );
    // The usage log: its queue lives as long as the process (the edge's
    // workers hold a plain reference to it, no reference count).
    let log_writer = if config.logs.enabled {
        let log_sink: &'static allowlist::logs::LogSink =
            Box::leak(Box::new(allowlist::logs::LogSink::new(config.logs.buffer)));
        let _ = daemon.logs.set(log_sink);
        let d = daemon.clone();
        let log_store = match &pg {
            // Every edge writes the one shared log.
            Some(pg) => pg.clone() as Arc<dyn allowlist::logs::LogStore>,
            None => Arc::new(
                allowlist::logs::DayFiles::new(config.logs_dir())
                    .with_context(|| format!("usage logs in {}", config.logs_dir().display()))?,
            ),
        };
        let _ = daemon.log_store.set(log_store.clone());
        Some(
            allowlist::logs::start(
                log_sink,
                log_store,
                config.logs.retention_days,
                Duration::from_millis(200),
                move || d.clock.now_ms(),
            )
            .context("starting the usage-log writer")?,
        )
    } else {
        None
    };
    // Before the edge: it serves the action links from the first request.
    let notifier = allowlist::notify::Notifier::new(daemon.clone());
    let notify_task = notifier.start();
    let (effects_tx, effects_rx) = allowlist::edge_host::effects_channel();
    let effects = tokio::spawn(daemon.clone().apply_effects(effects_rx));
    let edge = tokio::spawn(proxy::serve(
        daemon.clone(),
        config.proxy.clone(),
        effects_tx,
        edge_listener,
        tls,
        edge_stats.clone(),
        stop_rx.clone(),
    ));
    let metrics = match config.metrics.listen {
        Some(addr) => Some(
            allowlist::exporter::serve(
                allowlist::exporter::registry(daemon.clone(), edge_stats.clone()),
                addr,
                stop_rx.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let listener = admin::bind(&config.admin.socket, &config.admin.group)
        .await
        .with_context(|| format!("admin socket {}", config.admin.socket.display()))?;
    tracing::info!(socket = %config.admin.socket.display(), "admin API listening");

    let sweeper = {
        let d = daemon.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Err(e) = d.sweep().await {
                    tracing::warn!(error = %e, "sweeping expired drop entries");
                }
            }
        })
    };

    let housekeeping = {
        let d = daemon.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            let mut n: u64 = 0;
            loop {
                tick.tick().await;
                n += 1;
                if let Err(e) = d.auto_activate().await {
                    tracing::warn!(error = %e, "checking the learning period");
                }
                // Usage counters: every 10 s, one transaction.
                if n.is_multiple_of(5)
                    && let Err(e) = d.flush_usage()
                {
                    tracing::warn!(error = %e, "flushing key usage counters");
                }
            }
        })
    };

    // Guard drops from kernel events enter the unauthorized list in
    // batches, twice a second.
    let guard_drops = {
        let d = daemon.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let d = d.clone();
                let r = tokio::task::spawn_blocking(move || d.flush_guard_drops()).await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "recording guard drops");
                }
            }
        })
    };
    // `[kernel] api_guard = "auto"`: arm the API guard under a connection
    // flood, disarm it after a calm period.
    let flood = (daemon.kernel_enabled()
        && config.kernel.api_guard == allowlist::flood::ApiGuardMode::Auto)
        .then(|| {
            let d = daemon.clone();
            let stats = edge_stats.clone();
            let (threshold, calm) = (
                config.kernel.flood_threshold,
                Duration::from_secs(config.kernel.flood_calm_secs),
            );
            tokio::spawn(async move {
                use allowlist::flood::{FloodDetector, Reading, listen_pressure};
                use std::sync::atomic::Ordering;
                let mut detector = FloodDetector::new(threshold, calm);
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                // After a stall, no burst of ticks a millisecond apart (a
                // rate over a millisecond would be a thousandfold).
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut last = (
                    stats.accepted.load(Ordering::Relaxed),
                    listen_pressure().unwrap_or(0),
                    std::time::Instant::now(),
                );
                loop {
                    tick.tick().await;
                    let now = (
                        stats.accepted.load(Ordering::Relaxed),
                        listen_pressure().unwrap_or(last.1),
                        std::time::Instant::now(),
                    );
                    let reading = Reading {
                        accepted: now.0.saturating_sub(last.0),
                        overflowed: now.1.saturating_sub(last.1),
                    };
                    let elapsed = now.2 - last.2;
                    if elapsed < Duration::from_millis(500) {
                        // Too short to rate: its counts go into the next.
                        continue;
                    }
                    if let Some((armed, why)) = detector.observe(reading, elapsed)
                        && let Err(e) = d.set_api_guard(armed, why).await
                    {
                        tracing::warn!(error = %e, "arming the API guard; will try again");
                        // Start over unarmed: the next flooded second
                        // tries again.
                        detector = FloodDetector::new(threshold, calm);
                    }
                    last = now;
                }
            })
        });

    let admin_addr = config
        .admin
        .listen_addr()
        .map_err(|m| anyhow::anyhow!("[admin] listen: {m}"))?;
    let (admin_tls, admin_certs) = match admin_addr {
        Some(addr) => {
            let (ck, fp) = admin::load_admin_cert(&config, addr)?;
            let admin_certs = proxy::CertStore::new(ck, fp);
            let api = admin::token_router(daemon.clone());
            // The console calls the same API router in-process, so it can
            // do nothing a token could not do over HTTP.
            let app = if config.admin.console {
                allowlist::console::mount(daemon.clone(), api)
            } else {
                api
            };
            let task = admin::serve_tls(app, addr, admin_certs.clone(), stop_rx.clone()).await?;
            (Some(task), Some((admin_certs, addr)))
        }
        None => (None, None),
    };
    let app = admin::router(daemon.clone());
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let reloader = allowlist::reload::Reloader {
        path,
        explicit,
        daemon: daemon.clone(),
        edge_certs: certs,
        admin_certs,
        log_retention: log_writer.as_ref().map(|w| w.retention()),
    };
    let mut in_force = config.clone();
    let shutdown = async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => in_force = reloader.reload(&in_force).await,
            }
        }
        tracing::info!(
            "stopping; kernel enforcement stays pinned (allowlistd --unload removes it)"
        );
        let _ = stop_tx.send(true);
    };
    notify_ready();
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<admin::Peer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await?;
    // Let the edge drain its in-flight requests (bounded inside serve);
    // its workers' senders are then gone, so the effects task flushes what
    // it holds and ends.
    let _ = edge.await;
    // Whatever the edge queued while draining is written.
    if let Some(w) = log_writer {
        w.stop();
    }
    if let Some(t) = metrics {
        let _ = t.await;
    }
    if let Some(t) = admin_tls {
        let _ = t.await;
    }
    let _ = effects.await;
    if let Some(t) = notify_task {
        t.abort();
    }
    sweeper.abort();
    housekeeping.abort();
    guard_drops.abort();
    if let Some(f) = flood {
        f.abort();
    }
    if let Err(e) = daemon.flush_guard_drops() {
        tracing::warn!(error = %e, "recording guard drops at exit");
    }
    if let Err(e) = daemon.flush_usage() {
        tracing::warn!(error = %e, "flushing key usage counters at exit");
    }
    let _ = std::fs::remove_file(&config.admin.socket);
    Ok(())
}

/// Tells systemd (Type=notify) that the maps are loaded and the admin API
/// listens. A no-op outside systemd.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "sd_notify: cannot create a socket");
            return;
        }
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(b"READY=1\n", &addr))
    } else {
        sock.send_to(b"READY=1\n", &path)
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "sd_notify READY=1 failed");
    }
}
