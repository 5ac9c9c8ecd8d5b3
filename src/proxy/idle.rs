//! Idle clients: what counts as idle, when an idle connection is closed, and closing idle
//! connections first when `limits.max_connections` is reached.
//!
//! - **Before the TLS handshake** of an intercepted CONNECT, and before the first byte of a
//!   blind tunnel: `limits.handshake_timeout`.
//! - **An HTTP connection** (the listener's, or an intercepted TLS session, HTTP/1.1 or h2)
//!   with no request waiting for its response head: closed gracefully once it has been so
//!   for `limits.idle_timeout` (between one and two periods; a response body still streaming
//!   runs to its end).
//! - **An HTTP/1.1 connection waiting for a request head** (new, or its last answer sent to
//!   the end) for `limits.header_read_timeout` (between one and two of it): closed at once.
//!   A head sent a byte at a time never becomes a request, so this is what ends it.
//! - **A blind tunnel** that moves no byte either way for `limits.tunnel_idle_timeout`.
//! - **At the cap**, the accept loop asks every connection to close if it is idle by these
//!   rules (an HTTP connection with no request in flight, a CONNECT before its TLS hello, a
//!   tunnel the client has sent nothing on) before it waits for a free place.
//!
//! - **A response body** from which nothing arrives for `upstream.body_idle_timeout` (between
//!   one and two of it) is ended with an error ([`BodyIdle`]): the client sees a reset
//!   stream or a truncated response, not a silent hang.
//!
//! A request costs a few atomic additions here; the clock is read by the watchdog, never per
//! request. hyper's own `header_read_timeout` is not used: it armed a timer for every request
//! head (a boxed tokio `Sleep`, the clock read, the timer wheel's entry made and removed), about
//! half a microsecond a request in the harness's test (a) over HTTP/1.1.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use super::error::BodyError;

/// One HTTP connection's requests: how many are waiting for their response head, how many
/// answers are still being sent (HTTP/1.1, see [`counted`]), and how many have started.
#[derive(Default)]
pub(crate) struct Activity {
    in_flight: AtomicU64,
    sending: AtomicU64,
    started: AtomicU64,
}

impl Activity {
    /// A request starts; it counts until the guard drops (its response head is ready, or it
    /// was cancelled).
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.started.fetch_add(1, Ordering::Relaxed);
        Busy(Some(self.clone()))
    }

    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
    }

    /// No request in flight and no answer being sent: an HTTP/1.1 connection is waiting for
    /// the next request head.
    fn is_quiet(&self) -> bool {
        self.is_idle() && self.sending.load(Ordering::Relaxed) == 0
    }

    fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }
}

/// A request in flight; `None` once it has become a [`Sending`].
pub(crate) struct Busy(Option<Arc<Activity>>);

/// An answer whose body is still being sent, held by that body.
struct Sending(Arc<Activity>);

impl Busy {
    /// The response head is ready and its body follows: counted as being sent from now on.
    fn into_sending(mut self) -> Option<Sending> {
        let activity = self.0.take()?;
        activity.sending.fetch_add(1, Ordering::Relaxed);
        activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        Some(Sending(activity))
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.sending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `fut`, counted as a request in flight until it completes or is dropped.
///
/// A future of its own rather than an `async fn`: an `async fn` keeps its argument apart from
/// what it awaits, so it was twice the size of the request it wraps (4,088 bytes around
/// `forward::request`'s 2,032, `-Zprint-type-sizes`), and every request's box was allocated
/// and copied at that size.
///
/// With `to_end` (HTTP/1.1), an answer with a body to send is counted as being sent until its
/// body is dropped, after the last byte or when the connection goes: hyper reads no next
/// request head on that connection before then, so its header deadline waits too.
pub(crate) fn counted<F>(busy: Busy, to_end: bool, fut: F) -> InFlight<F>
where
    F: Future,
    F::Output: Answered,
{
    InFlight {
        fut,
        busy: Some(busy),
        to_end,
    }
}

/// What a counted future gives: an answer whose body can carry a [`Sending`].
pub(crate) trait Answered {
    /// Let `busy` go now, or with the body if there is one and `to_end`.
    fn release(self, busy: Busy, to_end: bool) -> Self;
}

impl<E> Answered for Result<http::Response<super::Body>, E> {
    fn release(self, busy: Busy, to_end: bool) -> Self {
        match self {
            Ok(answer) if to_end && !answer.body().is_end_stream() => {
                let Some(sending) = busy.into_sending() else {
                    return Ok(answer);
                };
                Ok(answer.map(|body| {
                    super::Body::new(Carried {
                        body,
                        _sending: sending,
                    })
                }))
            }
            other => other,
        }
    }
}

pin_project_lite::pin_project! {
    /// A body that counts its answer as being sent for as long as it lives.
    struct Carried<B> {
        #[pin]
        body: B,
        _sending: Sending,
    }
}

impl<B: Body> Body for Carried<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// See [`counted`].
    pub(crate) struct InFlight<F> {
        #[pin]
        fut: F,
        // Let go when `fut` is ready, whoever holds this future after.
        busy: Option<Busy>,
        to_end: bool,
    }
}

impl<F> Future for InFlight<F>
where
    F: Future,
    F::Output: Answered,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.fut.poll(cx));
        Poll::Ready(match this.busy.take() {
            Some(busy) => out.release(busy, *this.to_end),
            None => out,
        })
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(activity) = &self.0 {
            activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Why a connection is being closed early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    Shutdown,
    Idle,
    AtCap,
    /// HTTP/1.1: no request head within `limits.header_read_timeout`.
    NoHead,
}

/// Drive an HTTP connection to its end. On shutdown, after `idle` with no request, or at the
/// connection cap while no request is in flight, ask it to finish gracefully (each hyper
/// connection type has its own `graceful_shutdown`) and keep driving it. With `head`
/// (HTTP/1.1), a connection left waiting for a request head for between one and two of it is
/// dropped at once, as hyper's own header timeout did: no request is in progress on it, and
/// a graceful end would wait for that head too.
///
/// The connection comes boxed: a future holds its arguments for its whole life, and the
/// caller's task held the connection again before passing it in, so an HTTP/1.1 connection
/// (1.9 KB) took up 6.4 KB of its task; boxed, it is there once (benches/idle.rs).
pub(crate) async fn serve<C, E>(
    mut conn: Pin<Box<C>>,
    mut stop: watch::Receiver<bool>,
    mut reclaim: watch::Receiver<u64>,
    activity: &Activity,
    idle: Duration,
    head: Option<Duration>,
    graceful: impl FnOnce(Pin<&mut C>),
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    let watch = std::pin::pin!(async {
        let mut seen = activity.started();
        let mut tick = Instant::now() + idle;
        // One timer for both deadlines: the idle check's and the request head's.
        let mut head_seen = seen;
        let mut head_tick = head.map(|h| Instant::now() + h);
        loop {
            let next = head_tick.map_or(tick, |h| h.min(tick));
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break Close::Shutdown,
                _ = tokio::time::sleep_until(next) => {
                    let now = Instant::now();
                    let now_seen = activity.started();
                    if let (Some(h), Some(at)) = (head, head_tick) {
                        if now >= at {
                            if activity.is_quiet() && now_seen == head_seen {
                                break Close::NoHead;
                            }
                            head_seen = now_seen;
                            head_tick = Some(now + h);
                        }
                    }
                    if now >= tick {
                        if activity.is_idle() && now_seen == seen {
                            break Close::Idle;
                        }
                        seen = now_seen;
                        tick = now + idle;
                    }
                }
                Ok(()) = reclaim.changed() => {
                    if activity.is_idle() {
                        break Close::AtCap;
                    }
                }
            }
        }
    });
    let why = match watched(conn.as_mut(), watch).await {
        Ok(done) => return done,
        Err(why) => why,
    };
    if why == Close::NoHead {
        tracing::debug!(
            "closing a client connection: no request head within limits.header_read_timeout"
        );
        return Ok(());
    }
    if why != Close::Shutdown {
        tracing::debug!(why = ?why, "closing an idle client connection");
    }
    graceful(conn.as_mut());
    conn.await
}

/// `work`'s output, or `Err` with `watch`'s if that is ready first; `watch` is polled only
/// when something it waits on has woken the task (and on the first poll).
///
/// A connection's task is woken for every read and write; with both polled each time, every
/// wake of every connection re-registered with the proxy-wide `stop` and `reclaim` channels,
/// taking their waiter lists' locks, which all connections on all workers share, and polled
/// the idle timer. `watch` gets a waker of its own instead, which notes that it was woken
/// before it wakes the task: its registrations stay in place between its polls, as tokio's
/// channels and timers keep them until they fire.
fn watched<'a, W, T>(
    mut work: Pin<&'a mut W>,
    mut watch: Pin<&'a mut T>,
) -> impl Future<Output = Result<W::Output, T::Output>> + 'a
where
    W: Future + ?Sized,
    T: Future + ?Sized,
{
    // A plain function around `poll_fn`, both futures pinned by the caller: an `async fn`
    // would hold its arguments apart from what it awaits, and every idle connection would
    // carry the watch twice (benches/idle.rs).
    let woken = Arc::new(Woken::default());
    let waker = std::task::Waker::from(woken.clone());
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        woken.task.register(cx.waker());
        if woken.again.swap(false, Ordering::AcqRel) {
            if let Poll::Ready(why) = watch.as_mut().poll(&mut Context::from_waker(&waker)) {
                return Poll::Ready(Err(why));
            }
        }
        Poll::Pending
    })
}

/// The waker [`watched`] polls its `watch` with.
struct Woken {
    /// Set when `watch` is to be polled: at first, and whenever it was woken since.
    again: std::sync::atomic::AtomicBool,
    /// The task to wake then.
    task: futures_util::task::AtomicWaker,
}

impl Default for Woken {
    fn default() -> Self {
        Woken {
            again: std::sync::atomic::AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        }
    }
}

impl std::task::Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.again.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// `fut`, unless `limit` passes or the proxy reaches its connection cap first (the client
/// has not finished its handshake, so it is idle by definition).
///
/// `fut` comes pinned by the caller (`std::pin::pin!`), not by value: an async fn keeps an
/// argument in its state beside the local it is moved to, so a handshake's ~5.7 KB future
/// passed by value was held twice in every connection's task, and copied with it.
pub(crate) async fn before_handshake<F: Future + Unpin>(
    mut fut: F,
    limit: Duration,
    mut reclaim: watch::Receiver<u64>,
) -> Result<F::Output, Close> {
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    // Whether the cap can still be signalled (the sender lives as long as the proxy).
    let mut watching = true;
    loop {
        tokio::select! {
            r = &mut fut => return Ok(r),
            _ = deadline.as_mut() => return Err(Close::Idle),
            r = reclaim.changed(), if watching => match r {
                Ok(()) => return Err(Close::AtCap),
                Err(_) => watching = false,
            },
        }
    }
}

/// How a blind tunnel ended.
pub(crate) enum TunnelEnd {
    /// Either side closed (or failed).
    Done(io::Result<(u64, u64)>),
    /// Closed by the proxy, with the reason for the access line.
    Closed(&'static str),
}

/// Copy bytes both ways between `client` and `origin` until either closes, the client sends
/// nothing within `first_byte`, nothing moves for `idle`, or the proxy reaches its cap before
/// the client sent anything. Returns how it ended and the bytes each way (client to origin,
/// origin to client).
pub(crate) async fn tunnel<A, B>(
    client: &mut A,
    origin: &mut B,
    first_byte: Duration,
    idle: Duration,
    mut reclaim: watch::Receiver<u64>,
) -> (TunnelEnd, u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let end = {
        let mut c = Counted { io: client, n: &up };
        let mut o = Counted {
            io: origin,
            n: &down,
        };
        let copy = tokio::io::copy_bidirectional(&mut c, &mut o);
        tokio::pin!(copy);
        let watch = std::pin::pin!(async {
            let start = Instant::now();
            let first_deadline = start + first_byte;
            let mut tick = start + first_byte.min(idle);
            let mut last = 0;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(tick) => {
                        let now = Instant::now();
                        let from_client = up.load(Ordering::Relaxed);
                        let moved = from_client + down.load(Ordering::Relaxed);
                        if from_client == 0 {
                            if now >= first_deadline {
                                break TunnelEnd::Closed("no byte from the client within limits.handshake_timeout");
                            }
                            tick = first_deadline.min(now + idle);
                        } else if moved == last {
                            break TunnelEnd::Closed("idle for limits.tunnel_idle_timeout");
                        } else {
                            tick = now + idle;
                        }
                        last = moved;
                    }
                    Ok(()) = reclaim.changed() => {
                        if up.load(Ordering::Relaxed) == 0 {
                            break TunnelEnd::Closed("closed at limits.max_connections: no byte from the client yet");
                        }
                    }
                }
            }
        });
        match watched(copy.as_mut(), watch).await {
            Ok(r) => TunnelEnd::Done(r),
            Err(closed) => closed,
        }
    };
    (end, up.into_inner(), down.into_inner())
}

/// Counts the bytes read through it.
struct Counted<'a, T> {
    io: &'a mut T,
    n: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.n.fetch_add(read as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// A response body that fails once its origin has sent nothing for a while. The timer is
    /// armed when the body first waits and re-armed, at most once a period, only if frames
    /// arrived meanwhile, so a streaming body costs a flag per frame.
    pub(crate) struct BodyIdle<B> {
        #[pin]
        inner: B,
        #[pin]
        timer: tokio::time::Sleep,
        armed: bool,
        progressed: bool,
        limit: Duration,
    }
}

impl<B> BodyIdle<B> {
    pub fn new(inner: B, limit: Duration) -> BodyIdle<B> {
        BodyIdle {
            inner,
            timer: tokio::time::sleep(limit),
            armed: false,
            progressed: false,
            limit,
        }
    }
}

impl<B> Body for BodyIdle<B>
where
    B: Body,
    B::Error: Into<BodyError>,
{
    type Data = B::Data;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, Self::Error>>> {
        let mut this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            *this.progressed = true;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        loop {
            if !*this.armed {
                this.timer.as_mut().reset(Instant::now() + *this.limit);
                *this.armed = true;
                *this.progressed = false;
            }
            match this.timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if *this.progressed => *this.armed = false,
                Poll::Ready(()) => {
                    let e = BodyError::Idle(crate::config::show(*this.limit));
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
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
    use tokio::io::AsyncWriteExt;

    /// Counts its polls.
    struct Polls<F> {
        fut: Pin<Box<F>>,
        n: Arc<AtomicU64>,
    }

    impl<F: Future> Future for Polls<F> {
        type Output = F::Output;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
            self.n.fetch_add(1, Ordering::Relaxed);
            self.fut.as_mut().poll(cx)
        }
    }

    #[tokio::test]
    async fn the_watch_is_polled_when_it_was_woken_not_with_every_wake_of_the_work() {
        let (items, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let (fire, fired) = tokio::sync::oneshot::channel::<&str>();
        let (work_polls, watch_polls) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let work = Polls {
            fut: Box::pin(async move {
                let mut sum = 0;
                while let Some(i) = rx.recv().await {
                    sum += i;
                }
                sum
            }),
            n: work_polls.clone(),
        };
        let watch = Polls {
            fut: Box::pin(async move { fired.await.unwrap() }),
            n: watch_polls.clone(),
        };
        let mut work = Box::pin(work);
        let watch = std::pin::pin!(watch);
        let mut watching = Box::pin(watched(work.as_mut(), watch));
        // The work is woken and polled 100 times; the watch, only on the first poll.
        for i in 0..100 {
            items.send(i).unwrap();
            let now = std::future::poll_fn(|cx| Poll::Ready(watching.as_mut().poll(cx))).await;
            assert!(now.is_pending());
        }
        assert!(work_polls.load(Ordering::Relaxed) >= 100);
        assert_eq!(watch_polls.load(Ordering::Relaxed), 1);
        // Woken itself, the watch is polled and its answer comes first.
        fire.send("idle").unwrap();
        items.send(1).unwrap();
        assert_eq!(watching.await.err(), Some("idle"));
        assert_eq!(watch_polls.load(Ordering::Relaxed), 2);
        // The work ending first is its answer.
        drop(work);
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let (_keep, never) = tokio::sync::oneshot::channel::<()>();
        let mut work = Box::pin(async move { rx.await.unwrap() });
        let never = std::pin::pin!(never);
        let watching = watched(work.as_mut(), never);
        tx.send(7).unwrap();
        assert_eq!(watching.await.ok(), Some(7));
    }

    /// A connection that runs until asked to finish gracefully.
    struct Conn {
        graceful: bool,
    }

    impl Future for Conn {
        type Output = Result<(), ()>;
        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
            if self.graceful {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }
    }

    fn channels() -> (
        watch::Sender<bool>,
        watch::Receiver<bool>,
        watch::Sender<u64>,
        watch::Receiver<u64>,
    ) {
        let (stop_tx, stop) = watch::channel(false);
        let (reclaim_tx, reclaim) = watch::channel(0);
        (stop_tx, stop, reclaim_tx, reclaim)
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_closes_after_one_to_two_periods_and_a_busy_one_does_not() {
        let (_s, stop, _r, reclaim) = channels();
        let activity = Arc::new(Activity::default());
        let idle = Duration::from_secs(120);
        let t0 = Instant::now();
        let served = serve(
            Box::pin(Conn { graceful: false }),
            stop.clone(),
            reclaim.clone(),
            &activity,
            idle,
            None,
            |c| c.get_mut().graceful = true,
        );
        served.await.unwrap();
        let took = t0.elapsed();
        assert!(took >= idle && took <= 2 * idle, "{took:?}");

        // A request in flight keeps it open past any number of periods.
        let busy = activity.begin();
        let served = serve(
            Box::pin(Conn { graceful: false }),
            stop,
            reclaim,
            &activity,
            idle,
            None,
            |c| c.get_mut().graceful = true,
        );
        tokio::pin!(served);
        assert!(
            tokio::time::timeout(10 * idle, served.as_mut())
                .await
                .is_err(),
            "still open"
        );
        drop(busy);
        let t1 = Instant::now();
        served.await.unwrap();
        assert!(t1.elapsed() <= 2 * idle);
    }

    /// An answer with a body, as `forward` gives one.
    fn answer() -> Result<http::Response<super::super::Body>, ()> {
        use http_body_util::BodyExt;
        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"data"))
            .map_err(|never| match never {})
            .boxed();
        Ok(http::Response::new(body))
    }

    #[tokio::test(start_paused = true)]
    async fn an_http1_connection_waiting_for_a_head_is_dropped_and_one_sending_is_not() {
        let (_s, stop, _r, reclaim) = channels();
        let activity = Arc::new(Activity::default());
        let (idle, head) = (Duration::from_secs(3600), Duration::from_secs(30));
        let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let serving = || {
            let asked = asked.clone();
            serve(
                Box::pin(Conn { graceful: false }),
                stop.clone(),
                reclaim.clone(),
                &activity,
                idle,
                Some(head),
                move |c| {
                    asked.store(true, Ordering::Relaxed);
                    c.get_mut().graceful = true
                },
            )
        };
        // No request: dropped between one and two periods, without a graceful end (which
        // would wait for the head).
        let t0 = Instant::now();
        serving().await.unwrap();
        let took = t0.elapsed();
        assert!(took >= head && took <= 2 * head, "{took:?}");
        assert!(!asked.load(Ordering::Relaxed));

        // An answer whose body is still being sent keeps it open, long after its head.
        let sent = counted(activity.begin(), true, async { answer() }).await;
        assert!(activity.is_idle() && !activity.is_quiet());
        let served = serving();
        tokio::pin!(served);
        assert!(
            tokio::time::timeout(10 * head, served.as_mut())
                .await
                .is_err(),
            "open while the answer is sent"
        );
        drop(sent);
        assert!(activity.is_quiet());
        let t1 = Instant::now();
        served.await.unwrap();
        assert!(t1.elapsed() <= 2 * head);

        // A request every 20 s keeps it open too.
        let served = serving();
        tokio::pin!(served);
        for _ in 0..10 {
            assert!(
                tokio::time::timeout(Duration::from_secs(20), served.as_mut())
                    .await
                    .is_err()
            );
            drop(counted(activity.begin(), true, async { answer() }).await);
        }
        // An h2 session's answers are let go with their heads; so are bodiless ones.
        let h2 = counted(activity.begin(), false, async { answer() }).await;
        assert!(activity.is_quiet());
        let empty = counted(activity.begin(), true, async {
            use http_body_util::BodyExt;
            let body = http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed();
            Ok::<_, ()>(http::Response::new(body))
        })
        .await;
        assert!(activity.is_quiet());
        drop((h2, empty));
        assert!(!asked.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_idle_connections_close_at_once_and_busy_ones_stay() {
        let (_s, stop, reclaim_tx, reclaim) = channels();
        let idle_one = Arc::new(Activity::default());
        let busy_one = Arc::new(Activity::default());
        let _busy = busy_one.begin();
        let long = Duration::from_secs(3600);
        let a = serve(
            Box::pin(Conn { graceful: false }),
            stop.clone(),
            reclaim.clone(),
            &idle_one,
            long,
            None,
            |c| c.get_mut().graceful = true,
        );
        let b = serve(
            Box::pin(Conn { graceful: false }),
            stop,
            reclaim,
            &busy_one,
            long,
            None,
            |c| c.get_mut().graceful = true,
        );
        tokio::pin!(a, b);
        tokio::time::advance(Duration::from_secs(1)).await;
        reclaim_tx.send_modify(|g| *g += 1);
        let t0 = Instant::now();
        a.as_mut().await.unwrap();
        assert_eq!(t0.elapsed(), Duration::ZERO, "closed at once");
        assert!(tokio::time::timeout(Duration::from_secs(60), b.as_mut())
            .await
            .is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn handshake_deadline_and_cap() {
        let (_s, _stop, reclaim_tx, reclaim) = channels();
        let never = std::future::pending::<()>();
        let t0 = Instant::now();
        let r = before_handshake(never, Duration::from_secs(10), reclaim.clone()).await;
        assert_eq!(r, Err(Close::Idle));
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
        let waiting = before_handshake(
            std::future::pending::<()>(),
            Duration::from_secs(10),
            reclaim,
        );
        tokio::pin!(waiting);
        tokio::time::advance(Duration::from_secs(1)).await;
        reclaim_tx.send_modify(|g| *g += 1);
        assert_eq!(waiting.await, Err(Close::AtCap));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_body_fails_and_a_slow_one_does_not() {
        use http_body_util::{BodyExt, StreamBody};
        let limit = Duration::from_secs(60);
        // A frame every 50 s (under the limit), three times, then silence.
        let stream = futures_util::stream::unfold(0u32, |n| async move {
            if n == 3 {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_secs(50)).await;
            Some((
                Ok::<_, hyper::Error>(Frame::data(bytes::Bytes::from_static(b"x"))),
                n + 1,
            ))
        });
        let mut body = std::pin::pin!(BodyIdle::new(StreamBody::new(stream), limit));
        let t0 = Instant::now();
        for _ in 0..3 {
            body.frame().await.unwrap().unwrap();
        }
        let e = body.frame().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("body_idle_timeout"), "{e}");
        let silent = t0.elapsed() - Duration::from_secs(150);
        assert!(silent >= limit && silent <= 2 * limit, "{silent:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn tunnel_needs_a_first_byte_then_closes_when_idle() {
        let first = Duration::from_secs(10);
        let idle = Duration::from_secs(600);
        let (_r, reclaim) = watch::channel(0u64);
        // Nothing from the client: closed at the first-byte deadline.
        let (mut client, _client_peer) = tokio::io::duplex(64);
        let (mut origin, _origin_peer) = tokio::io::duplex(64);
        let t0 = Instant::now();
        let (end, up, down) = tunnel(&mut client, &mut origin, first, idle, reclaim.clone()).await;
        assert!(matches!(end, TunnelEnd::Closed(r) if r.contains("handshake_timeout")));
        assert_eq!((up, down, t0.elapsed()), (0, 0, first));

        // A byte, then silence: closed one to two idle periods later.
        let (mut client, mut client_peer) = tokio::io::duplex(64);
        let (mut origin, _origin_peer) = tokio::io::duplex(64);
        client_peer.write_all(b"x").await.unwrap();
        let t0 = Instant::now();
        let (end, up, _) = tunnel(&mut client, &mut origin, first, idle, reclaim).await;
        assert!(matches!(end, TunnelEnd::Closed(r) if r.contains("tunnel_idle_timeout")));
        assert_eq!(up, 1);
        let took = t0.elapsed();
        assert!(took >= first + idle && took <= first + 2 * idle, "{took:?}");
    }
}
