//! Connections held for free. A client that completes the TLS handshake
//! and then sends nothing — or keeps a connection open between requests
//! forever — holds one of `max_connections` without presenting a key.
//! hyper's own timers do not cover it: HTTP/1's header timer starts with
//! the first byte of a request, and HTTP/2 keep-alive pings are answered by
//! any live client. So each connection counts its requests in flight (until
//! the response body is finished) and a watchdog closes it once it has had
//! none for the header timeout (before its first request) or the idle
//! timeout (after).

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use hyper::body::{Body, Buf, Frame, SizeHint};

use super::usage::Done;
use crate::live::Active;

/// A response body that keeps its request in flight until it is finished
/// (a long download is not an idle connection), and writes the request's
/// usage-log record then.
pub struct Tracked<B> {
    pub inner: B,
    pub active: Option<Active>,
    pub done: Option<Done>,
    /// Body bytes sent so far.
    pub sent: u64,
}

impl<B> Tracked<B> {
    fn finish(&mut self) {
        self.active = None;
        if let Some(d) = self.done.take() {
            d.finish(self.sent);
        }
    }
}

impl<B> Drop for Tracked<B> {
    /// A client that leaves mid-response still gets its log line.
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let out = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &out
            && let Some(d) = f.data_ref()
        {
            self.sent += d.remaining() as u64;
        }
        if matches!(out, Poll::Ready(None) | Poll::Ready(Some(Err(_))))
            || self.inner.is_end_stream()
        {
            self.finish();
        }
        out
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
