//! The usage log over the admin API: a page of rows as JSON, or every row
//! as CSV streamed while it is read (constant memory on both sides).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{
    Extension, Json,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use hyper::body::{Bytes, Frame};

use super::{ApiError, ApiResult, Cx, Q, query};
use crate::{api, daemon::Daemon, logs, policy::Need};

pub(super) async fn list(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    q: Q<api::LogsQuery>,
) -> ApiResult<api::LogList> {
    let account = cx.account()?;
    cx.require(Need::Read)?;
    let q = query(q)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("limit {limit} is out of range 1..=10000; use the CSV export for more"),
        ));
    }
    let offset = q.offset.unwrap_or(0);
    // Skipped rows are read too: past this, page with --until instead.
    if offset.saturating_add(limit) > 100_000 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "offset {offset} + limit {limit} is past 100000 rows; give an earlier --until to page further back, or use the CSV export"
            ),
        ));
    }
    let lq = d.log_query(&account, &q)?;
    let store = d.log_store();
    let rows = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut skip = offset;
        store
            .scan(&lq, &mut |r| {
                if skip > 0 {
                    skip -= 1;
                    return true;
                }
                out.push(r);
                out.len() < limit
            })
            .map(|()| out)
    })
    .await
    .map_err(|e| internal(e.to_string()))?
    .map_err(internal)?;
    Ok(Json(api::LogList { entries: rows }))
}

/// Requests over time by status class and refusals by reason, over the
/// query's range (the last 24 hours when it gives none).
pub(super) async fn summary(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    q: Q<api::LogsQuery>,
) -> ApiResult<api::LogSummary> {
    let account = cx.account()?;
    cx.require(Need::Read)?;
    let q = query(q)?;
    let buckets = q.buckets.unwrap_or(24);
    if !(1..=500).contains(&buckets) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("buckets {buckets} is out of range 1..=500"),
        ));
    }
    let lq = d.log_query(&account, &q)?;
    let until = lq.until_ms.unwrap_or_else(|| d.clock.now_ms());
    let since = lq.since_ms.unwrap_or(until - 24 * 3_600_000);
    if since > until {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "--since is after --until".into(),
        ));
    }
    let store = d.log_store();
    let s = tokio::task::spawn_blocking(move || store.summary(&lq, (since, until), buckets))
        .await
        .map_err(|e| internal(e.to_string()))?
        .map_err(internal)?;
    Ok(Json(s))
}

fn internal(m: String) -> ApiError {
    tracing::error!(error = %m, "reading the usage log");
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("reading the usage log: {m}"),
    )
}

/// A response body fed by a channel: the reader thread sends chunks as it
/// reads, and stops when the client goes away (the receiver is dropped).
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// Chunks of about this size are sent as they fill.
const CHUNK: usize = 64 * 1024;

pub(super) async fn csv(
    State(d): State<Arc<Daemon>>,
    Extension(cx): Cx,
    q: Q<api::LogsQuery>,
) -> Result<Response, ApiError> {
    let account = cx.account()?;
    cx.require(Need::Read)?;
    let q = query(q)?;
    let lq = d.log_query(&account, &q)?;
    let store = d.log_store();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    tokio::task::spawn_blocking(move || {
        let mut buf = String::from(logs::CSV_HEADER);
        let mut open = true;
        let r = store.scan(&lq, &mut |row| {
            row.csv(&mut buf);
            if buf.len() >= CHUNK {
                open = tx
                    .blocking_send(Bytes::from(std::mem::take(&mut buf)))
                    .is_ok();
            }
            open
        });
        if let Err(e) = r {
            // The header is out: the client sees a truncated export, and
            // the log says why.
            tracing::error!(error = %e, "streaming the usage log");
        }
        if open && !buf.is_empty() {
            let _ = tx.blocking_send(Bytes::from(buf));
        }
    });
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/csv; charset=utf-8; header=present",
            ),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"usage-log.csv\"",
            ),
        ],
        axum::body::Body::new(ChannelBody(rx)),
    )
        .into_response())
}
