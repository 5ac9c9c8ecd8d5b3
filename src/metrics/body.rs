//! The response body of a forwarded request, metered: its bytes, and the time from the
//! request's arrival to the body's end.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};

use super::RequestSeries;

pin_project_lite::pin_project! {
    /// Counts the bytes it passes on (in a plain field: one atomic addition at the end) and,
    /// at its end or when dropped early (a client gone mid-body), observes the request's
    /// complete duration.
    pub struct Metered<B> {
        #[pin]
        inner: B,
        series: Option<Arc<RequestSeries>>,
        started: Instant,
        bytes: u64,
    }

    impl<B> PinnedDrop for Metered<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            finish(this.series, *this.started, *this.bytes);
        }
    }
}

impl<B> Metered<B> {
    pub fn new(inner: B, series: Arc<RequestSeries>, started: Instant) -> Metered<B> {
        Metered {
            inner,
            series: Some(series),
            started,
            bytes: 0,
        }
    }
}

fn finish(series: &mut Option<Arc<RequestSeries>>, started: Instant, bytes: u64) {
    if let Some(s) = series.take() {
        s.route.complete.observe(started.elapsed());
        s.response_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl<B: Body> Body for Metered<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    *this.bytes += d.remaining() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                finish(this.series, *this.started, *this.bytes)
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Metrics, RouteLabels};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn counts_bytes_and_times_the_end_once() {
        let m = Metrics::default();
        let t = m.compile(
            &[RouteLabels {
                name: "r",
                identity: None,
            }],
            &[],
        );
        let series = t.cell(Some(0), None).clone();
        let body = Metered::new(
            Full::new(Bytes::from_static(b"hello")),
            series.clone(),
            Instant::now(),
        );
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello");
        assert_eq!(series.response_bytes.load(Ordering::Relaxed), 5);
        assert_eq!(
            series.route.complete.count(),
            1,
            "at the end, not again on drop"
        );
        // Dropped before it was read: still timed.
        drop(Metered::new(
            Full::new(Bytes::from_static(b"x")),
            series.clone(),
            Instant::now(),
        ));
        assert_eq!(series.route.complete.count(), 2);
        assert_eq!(series.response_bytes.load(Ordering::Relaxed), 5);
    }
}
