//! The request phase: one lock-free decision per request, the answers the
//! edge writes itself (refusals, the action pages), forwarding to the
//! upstream, and the side effects a request leaves, batched per worker.

use super::*;

/// The upstream's streamed body, or one the edge wrote itself; no
/// allocation to box either.
pub(super) type Inner = Either<upstream::PooledBody, Full<Bytes>>;
/// Either, keeping its request in flight until it is sent.
pub(super) type Body = Tracked<Inner>;

pub(super) fn full(bytes: impl Into<Bytes>) -> Inner {
    Either::Right(Full::new(bytes.into()))
}

/// Reads and discards a refused request's body, bounded in size and time.
async fn drain(body: Incoming) {
    use http_body_util::BodyExt;
    use hyper::body::Body as _;
    if body.is_end_stream() {
        return;
    }
    let mut body = body;
    let mut read = 0usize;
    let _ = tokio::time::timeout(REFUSED_BODY_TIMEOUT, async {
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len());
            if read > REFUSED_BODY_LIMIT {
                break;
            }
        }
    })
    .await;
}

fn rate_headers(h: &mut HeaderMap, info: &RateInfo) {
    const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
    const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
    const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
    h.insert(LIMIT, HeaderValue::from(info.limit));
    h.insert(REMAINING, HeaderValue::from(info.remaining));
    h.insert(RESET, HeaderValue::from(info.reset));
    if let Some(after) = info.retry_after {
        h.insert(hyper::header::RETRY_AFTER, HeaderValue::from(after));
    }
}

fn error_response(reason: Reason) -> Response<Inner> {
    json_error(
        StatusCode::from_u16(reason.status()).unwrap_or(StatusCode::FORBIDDEN),
        reason.code(),
        reason.message(),
    )
}

/// The one JSON error shape of SPEC.md.
pub(super) fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Inner> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The key from `api-key`, else `Authorization: Bearer`; and whether it
/// came from Authorization (which is then stripped too).
pub fn credential(h: &HeaderMap) -> Option<(&str, bool)> {
    if let Some(v) = h.get(&API_KEY).and_then(|v| v.to_str().ok()) {
        return Some((v.trim(), false));
    }
    let auth = h.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| (token.trim(), true))
}

impl Edge {
    /// Queues a side effect in this worker. The first one of a batch
    /// schedules its hand-over a few milliseconds later, so the background
    /// task (on another thread) is woken once per batch, not per request or
    /// per new connection.
    fn effect(self: &Arc<Self>, e: SideEffect) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() >= QUEUE {
            self.shared
                .stats
                .queue_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.push(e);
        if pending.len() == 1 {
            let edge = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(EFFECT_BATCH_DELAY).await;
                edge.flush_effects();
            });
        }
    }

    pub(super) fn flush_effects(&self) {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let n = batch.len() as u64;
        if n > 0 && self.shared.effects.try_send(batch).is_err() {
            self.shared
                .stats
                .queue_dropped
                .fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(super) async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        conn: &LiveConn,
        source: ClientSource,
    ) -> Result<Response<Body>, Infallible> {
        let active = conn.activity.start();
        let started = std::time::Instant::now();
        let logs = self.shared.host.logs();
        // What the log needs of the request, before it is consumed.
        let (at_ms, method, bytes_in) = match logs {
            Some(_) => (
                self.shared.host.now_ms(),
                method_name(req.method()),
                req.headers()
                    .get(hyper::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(0),
            ),
            None => (0, std::borrow::Cow::Borrowed(""), 0),
        };
        let mut note = Note::default();
        let resp = self.respond(req, conn, source, &mut note).await;
        let status = resp.status().as_u16();
        let counters = &self.shared.stats.counters;
        counters.worker(self.slot).request(note.outcome, status);
        if counters.per_account.load(Ordering::Relaxed) {
            counters
                .worker(self.slot)
                .account_request(&note.account, status);
        }
        let done = logs.map(|sink| usage::Done {
            record: LogRecord {
                at_ms,
                account: note.account,
                key_id: note.key_id,
                client: Some(note.client.unwrap_or(conn.client)),
                method,
                path: note.path,
                status,
                reason: note.outcome.as_str(),
                rule: note.rule,
                note: "",
                latency_us: 0,
                bytes_in,
                bytes_out: 0,
            },
            started,
            sink,
        });
        Ok(resp.map(|inner| Tracked {
            inner,
            active: Some(active),
            done,
            sent: 0,
        }))
    }

    /// A refusal, once the request's body has been read (bounded).
    async fn refuse(&self, req: Request<Incoming>, resp: Response<Inner>) -> Response<Inner> {
        self.shared.stats.refused.fetch_add(1, Ordering::Relaxed);
        drain(req.into_body()).await;
        resp
    }

    /// Answers one request; `note` says how it ended (for the counters and
    /// the usage log).
    async fn respond(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        conn: &LiveConn,
        source: ClientSource,
        note: &mut Note,
    ) -> Response<Inner> {
        self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        note.path = bounded(req.uri().path());
        let via_xff = source == ClientSource::Forwarded;
        let (client, chain) = match source {
            ClientSource::Peer => (conn.client, None),
            ClientSource::Forwarded => {
                let forwarded = {
                    let snap = self.shared.host.snapshot();
                    // A reload that stopped trusting this peer makes it a
                    // plain client from its next request on: its header is
                    // no longer believed.
                    if snap.trusted.longest_match(conn.client).is_none() {
                        Ok((conn.client, None))
                    } else {
                        forwarded_chain(req.headers(), &snap.trusted).map(|(a, c)| (a, Some(c)))
                    }
                };
                match forwarded {
                    Ok(found) => found,
                    Err(e) => {
                        tracing::debug!(peer = %conn.client, error = ?e, "no usable client address");
                        let resp = json_error(StatusCode::BAD_REQUEST, "bad_request", &e.message());
                        return self.refuse(req, resp).await;
                    }
                }
            }
            ClientSource::Missing => {
                let resp = json_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &ForwardedError::ProxyNoClient.message(),
                );
                return self.refuse(req, resp).await;
            }
        };
        // Scope is decided on the path the upstream will act on.
        let normal = match normalize_path(req.uri().path()) {
            Ok(n) => n,
            Err(e) => {
                let resp = json_error(StatusCode::BAD_REQUEST, "bad_request", e.message());
                return self.refuse(req, resp).await;
            }
        };
        let path = normal.as_deref().unwrap_or_else(|| req.uri().path());
        note.client = Some(client);
        note.path = bounded(path);
        if path.starts_with(actions::PREFIX) {
            // The edge's own pages: no key, never forwarded. The token is
            // the link's only secret: the usage log (which viewers read)
            // gets the path without it.
            note.outcome = Outcome::Action;
            let path = path.to_string();
            return actions::answer(self.shared.host.actions(), req, &path, client).await;
        }
        let now_ms = self.shared.host.now_ms();
        let (d, bearer): (Decision, bool) = {
            let cred = credential(req.headers());
            let snap = self.shared.host.snapshot();
            let started = std::time::Instant::now();
            let d = snap.decide(
                cred.map(|c| c.0),
                req.method().as_str(),
                path,
                client,
                now_ms,
            );
            self.shared
                .stats
                .counters
                .worker(self.slot)
                .decided_in(started.elapsed().as_nanos() as u64);
            (d, cred.is_some_and(|c| c.1))
        };
        note.outcome = Outcome::Decided(d.reason);
        note.rule = Some(d.rule);
        if let Some(k) = &d.key {
            note.key_id = k.id.clone();
        }
        if let Some(a) = d.account_name() {
            note.account = if a == policy::DEFAULT_ACCOUNT {
                policy::DEFAULT_ACCOUNT.into()
            } else {
                a.to_string().into()
            };
        }
        let key_id = || d.key.as_ref().map(|k| k.id.clone()).unwrap_or_default();
        // Rate headers on every keyed response when the key has a limit —
        // but never on a 401, which must not say whether the key exists.
        let rate = if d.reason.status() == 401 {
            None
        } else {
            d.rate.or_else(|| {
                let k = d.key.as_ref()?;
                k.rate.map(|limit| k.runtime.limiter.peek(&limit, now_ms))
            })
        };
        if let (Some(k), Some(info)) = (&d.key, &rate) {
            // 80 %: a fifth or less of the budget left.
            let level = if d.reason == Reason::RateLimited {
                Some(1)
            } else if u64::from(info.remaining) * 5 <= u64::from(info.limit) {
                Some(0)
            } else {
                None
            };
            if let Some(level) = level
                && k.runtime.tell_rate(level, now_ms)
            {
                self.effect(SideEffect::RateLimit {
                    account: d.account_name().unwrap_or_default().to_string(),
                    key_id: k.id.clone(),
                    percent: if level == 1 { 100 } else { 80 },
                });
            }
        }
        if !d.allowed() {
            tracing::debug!(%client, key = %key_id(), reason = ?d.reason, rule = %d.rule, "refused");
            if matches!(
                d.reason,
                Reason::KeyAllowlist | Reason::AccountList | Reason::Denied
            ) {
                self.effect(SideEffect::Refused {
                    account: d.account_name().unwrap_or_default().to_string(),
                    addr: policy::source_unit(client),
                    key_id: key_id(),
                    at: now_ms / 1000,
                    by_key: d.reason == Reason::KeyAllowlist,
                });
            }
            let mut resp = error_response(d.reason);
            if let Some(info) = &rate {
                rate_headers(resp.headers_mut(), info);
            }
            return self.refuse(req, resp).await;
        }
        self.shared.stats.allowed.fetch_add(1, Ordering::Relaxed);
        if via_xff {
            *conn.forwarded.lock().unwrap_or_else(|p| p.into_inner()) = Some(client);
        }
        let mut new_key = false;
        if let Some(k) = &d.key
            && conn.set_key(&k.id, k.kid)
        {
            new_key = true;
            if let Some(cookie) = conn.cookie {
                // From now on the kernel checks every packet of this
                // connection against this key's policy.
                self.shared.host.pair(cookie, k.kid, conn.binding);
            }
        }
        if let Some(net) = d.learn {
            self.effect(SideEffect::Learn {
                account: d.account_name().unwrap_or_default().to_string(),
                net,
                key_id: key_id(),
            });
        }
        if new_key || via_xff || now_ms - conn.reported_ms.load(Ordering::Relaxed) >= 60_000 {
            conn.reported_ms.store(now_ms, Ordering::Relaxed);
            self.effect(SideEffect::Success {
                addr: client,
                key_id: key_id(),
                at_ms: now_ms,
            });
        }

        // Forward: same method, the normalized path with the query as it
        // came, headers and body; what only the edge may say set by it.
        let up = &self.shared.upstream;
        let pq = match normal {
            None => up.path_and_query(req.uri().path_and_query()),
            Some(p) => {
                let joined = match req.uri().query() {
                    Some(q) => format!("{p}?{q}"),
                    None => p,
                };
                joined
                    .parse::<PathAndQuery>()
                    .ok()
                    .and_then(|pq| up.path_and_query(Some(&pq)))
            }
        };
        let Some(pq) = pq else {
            note.outcome = Outcome::BadRequest;
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "The request path cannot be forwarded to the upstream",
            );
        };
        // HTTP/2 clients name the host in :authority, not in a header.
        let authority = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        *req.uri_mut() = hyper::Uri::from(pq);
        *req.version_mut() = hyper::Version::HTTP_11;
        let key_id = key_id();
        let h = req.headers_mut();
        upstream_headers(
            h,
            &Caller {
                client,
                chain: chain.as_deref(),
                key_id: &key_id,
                account: d.account_name().unwrap_or_default(),
            },
            bearer,
        );
        if !self.shared.preserve_host {
            h.insert(hyper::header::HOST, up.host.clone());
        } else if !h.contains_key(hyper::header::HOST) {
            h.insert(
                hyper::header::HOST,
                authority.unwrap_or_else(|| up.host.clone()),
            );
        }
        match self.pool.send(req).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                if let Some(info) = &rate {
                    rate_headers(&mut parts.headers, info);
                }
                Response::from_parts(parts, Either::Left(body))
            }
            Err(e) => {
                note.outcome = Outcome::UpstreamError;
                self.shared
                    .stats
                    .upstream_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "upstream request failed");
                json_error(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    "The upstream API did not answer",
                )
            }
        }
    }
}

/// How one request ended, filled in as `respond` learns it.
struct Note {
    outcome: Outcome,
    account: std::borrow::Cow<'static, str>,
    key_id: String,
    /// The client the checks judged (a forwarded one behind a balancer).
    client: Option<std::net::IpAddr>,
    path: String,
    rule: Option<policy::Rule>,
}

impl Default for Note {
    fn default() -> Self {
        Note {
            // Until a decision is made, an answer is a refusal of the
            // request itself; a request no key ties to an account is the
            // installation's (`default`'s).
            outcome: Outcome::BadRequest,
            account: policy::DEFAULT_ACCOUNT.into(),
            key_id: String::new(),
            client: None,
            path: String::new(),
            rule: None,
        }
    }
}

/// A path as the log keeps it: at most 2 KiB (a client chooses its length).
fn bounded(path: &str) -> String {
    if path.starts_with(actions::PREFIX) {
        return actions::redacted(path);
    }
    let mut end = path.len().min(2048);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    path[..end].to_string()
}

/// The method for the log: the common ones without an allocation.
fn method_name(m: &hyper::Method) -> std::borrow::Cow<'static, str> {
    use hyper::Method;
    let known: Option<&'static str> = match *m {
        Method::GET => Some("GET"),
        Method::POST => Some("POST"),
        Method::PUT => Some("PUT"),
        Method::DELETE => Some("DELETE"),
        Method::PATCH => Some("PATCH"),
        Method::HEAD => Some("HEAD"),
        Method::OPTIONS => Some("OPTIONS"),
        _ => None,
    };
    match known {
        Some(s) => s.into(),
        None => m.as_str().to_string().into(),
    }
}
