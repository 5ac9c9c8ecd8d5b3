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
//!
//! `Expect: 100-continue`: hyper's server tells the client to go on when the body is first
//! read. Towards an origin that speaks HTTP/1.1 (a connect finds out if no connection has told
//! yet), the body waits behind a [`Continue`] gate until the origin sends its own 100 (or
//! [`EXPECT_WAIT`] passes, as a client does with an origin that ignores the expectation), so an
//! origin that refuses the upload before it starts has the client send nothing. Towards h2
//! origins, whose 1xx hyper's client does not report, the body flows at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::metrics::RequestSeries;

/// How long a dropped upload is read and discarded before the connection is given up.
pub const LINGER_TIME: Duration = Duration::from_secs(5);
/// How many bytes of a dropped upload are read and discarded at most.
pub const LINGER_BYTES: u64 = 64 * 1024 * 1024;
/// How long an `Expect: 100-continue` body waits for the origin's 100 before it goes anyway
/// (curl's own default wait).
pub const EXPECT_WAIT: Duration = Duration::from_secs(1);

/// Opened by the origin's `100 Continue`; see the module documentation.
#[derive(Default)]
pub struct Continue {
    open: AtomicBool,
    waker: AtomicWaker,
}

impl Continue {
    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// A body held back until its [`Continue`] opens or the wait runs out.
struct Gate {
    signal: Arc<Continue>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Gate {
    fn poll_open(&mut self, cx: &mut Context<'_>) -> bool {
        if self.signal.open.load(Ordering::Acquire) {
            return true;
        }
        self.signal.waker.register(cx.waker());
        self.signal.open.load(Ordering::Acquire) || self.deadline.as_mut().poll(cx).is_ready()
    }
}

/// A request body forwarded upstream; see the module documentation.
pub struct Upload {
    inner: Option<Incoming>,
    /// Holds the body back until the origin's 100, for an expectation towards HTTP/1.1.
    gate: Option<Gate>,
    /// The client speaks HTTP/1.x, so an early drop must drain instead of closing.
    linger: bool,
    /// The body was read at least once. Until then nothing was asked of the client: for an
    /// `Expect: 100-continue` request, hyper sends the 100 on the first read, and draining an
    /// unread body would invite an upload nobody wants.
    started: bool,
    /// The body reached its end (or failed): there is nothing left to drain.
    done: bool,
    /// Bytes passed upstream so far, added to `series` once, when the upload is dropped.
    bytes: u64,
    series: Arc<RequestSeries>,
}

impl Upload {
    pub fn new(body: Incoming, version: http::Version, series: Arc<RequestSeries>) -> Self {
        Upload {
            inner: Some(body),
            gate: None,
            linger: version <= http::Version::HTTP_11,
            started: false,
            done: false,
            bytes: 0,
            series,
        }
    }

    /// Holds the body back until `signal` opens, or [`EXPECT_WAIT`] passes.
    pub fn wait_for(mut self, signal: Arc<Continue>) -> Self {
        self.gate = Some(Gate {
            signal,
            deadline: Box::pin(tokio::time::sleep(EXPECT_WAIT)),
        });
        self
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
        if let Some(gate) = this.gate.as_mut() {
            if !gate.poll_open(cx) {
                return Poll::Pending;
            }
            this.gate = None;
        }
        this.started = true;
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.done = true,
            Poll::Pending => {}
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
        self.series
            .request_bytes
            .fetch_add(self.bytes, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> (Gate, Arc<Continue>) {
        let signal = Arc::new(Continue::default());
        let gate = Gate {
            signal: signal.clone(),
            deadline: Box::pin(tokio::time::sleep(EXPECT_WAIT)),
        };
        (gate, signal)
    }

    async fn is_open(gate: &mut Gate) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(gate.poll_open(cx))).await
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_opens_on_the_origins_100() {
        let started = tokio::time::Instant::now();
        let (mut gate, signal) = gate();
        assert!(!is_open(&mut gate).await);
        // A body read parked on the gate is woken by the 100.
        let opener = tokio::spawn(async move {
            tokio::task::yield_now().await;
            signal.open();
        });
        std::future::poll_fn(|cx| match gate.poll_open(cx) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        })
        .await;
        opener.await.unwrap();
        // Paused time jumps to the deadline only if nothing else can run: had the 100 not woken
        // the read, the gate would have opened on the timer instead.
        assert!(started.elapsed() < EXPECT_WAIT, "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_opens_by_itself_once_the_wait_is_over() {
        let (mut gate, _signal) = gate();
        tokio::time::advance(EXPECT_WAIT - Duration::from_millis(1)).await;
        assert!(!is_open(&mut gate).await, "still waiting for the origin");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            is_open(&mut gate).await,
            "an origin that ignores Expect gets the body"
        );
    }
}
