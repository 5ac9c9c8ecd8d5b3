//! The client's request body on its way upstream, and what happens to the rest of it when the
//! origin answers before reading all of it.
//!
//! An origin may send its final answer early: a 413 for an upload that is too large, a 401
//! or 403 before the body matters. The upstream client then drops the request body. On an
//! HTTP/1.x client connection, hyper would close the socket with the client's unread bytes
//! still arriving, and the kernel answers those with a reset, which can destroy the answer
//! before the client reads it (curl reports "Send failure: Broken pipe" instead of the 413).
//! So an [`Upload`] that is dropped part-way lingers like a web server's lingering close: a
//! task reads and discards the rest, for at most [`LINGER_TIME`] and [`LINGER_BYTES`], while
//! hyper writes the answer. A client that stops sending on the answer (curl does) closes the
//! connection itself; one that sends everything gets its connection kept alive.
//!
//! HTTP/2 needs none of this: the stream is reset with NO_ERROR after the answer, which is
//! the protocol's own way of saying "stop sending" (RFC 9113 §8.1).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// How long a dropped upload is read and discarded before the connection is given up.
pub const LINGER_TIME: Duration = Duration::from_secs(5);
/// How many bytes of a dropped upload are read and discarded at most.
pub const LINGER_BYTES: u64 = 64 * 1024 * 1024;

/// A request body forwarded upstream; see the module documentation.
pub struct Upload {
    inner: Option<Incoming>,
    /// The client speaks HTTP/1.x, so an early drop must drain instead of closing.
    linger: bool,
    /// The body was read at least once. Until then nothing was asked of the client: for an
    /// `Expect: 100-continue` request, hyper sends the 100 on the first read, and draining an
    /// unread body would invite an upload nobody wants.
    started: bool,
    /// The body reached its end (or failed): there is nothing left to drain.
    done: bool,
}

impl Upload {
    pub fn new(body: Incoming, version: http::Version) -> Self {
        Upload {
            inner: Some(body),
            linger: version <= http::Version::HTTP_11,
            started: false,
            done: false,
        }
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        this.started = true;
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.done = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        let Some(body) = self.inner.take() else {
            return;
        };
        if !self.linger || !self.started || self.done || body.is_end_stream() {
            return;
        }
        // Dropped on one of the proxy's runtimes; outside one (never expected), the body is
        // simply dropped and hyper closes the connection as it would have.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            tracing::debug!("the origin answered before the whole upload: discarding the rest");
            rt.spawn(discard(body));
        }
    }
}

/// Reads and throws away what is left of `body`, within the linger limits.
async fn discard(mut body: Incoming) {
    let drain = async {
        let mut left = LINGER_BYTES;
        while let Some(Ok(frame)) = body.frame().await {
            let n = frame.data_ref().map_or(0, |d| d.len() as u64);
            left = left.saturating_sub(n);
            if left == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}
