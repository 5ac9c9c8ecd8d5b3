//! Client connections spread evenly over the workers.
//!
//! Every worker accepts from the same listener, and whichever is woken first takes the
//! connection: of 20 connections, one of two workers took anywhere from 2 to 19 when they came
//! at once, and from 6 to 15 when they came one after another (12 runs each). Each worker has its own upstream pool, and an HTTP/1.1 pool needs a connection
//! for each request in flight on its worker: when the next burst split the other way, the
//! worker with the larger share opened new upstream connections (and their TLS handshakes)
//! although the proxy as a whole had enough idle ones. So a worker that serves more client
//! connections than the least busy one stops accepting until the others catch up: the kernel
//! wakes every worker for a new connection anyway, and the one whose turn it is takes it.
//! Nothing moves between threads, and a worker whose turn it is not makes no `accept` call.
//!
//! A worker waits its turn for at most [`PATIENCE`], then accepts one connection anyway: a
//! worker that is busy for that long (or stuck) delays new connections by that much at most.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit};

/// The longest a worker ahead of the others leaves new connections to them.
pub(crate) const PATIENCE: Duration = Duration::from_millis(10);

/// The client connections each worker serves now.
pub(crate) struct Balance {
    live: Box<[AtomicU64]>,
    /// Told whenever a count changes.
    changed: Notify,
}

/// What an accepted connection holds for its whole life: its place under
/// `limits.max_connections` and on its worker.
pub(crate) struct Admission {
    _permit: OwnedSemaphorePermit,
    _place: Place,
}

/// A connection counted on worker `worker` until dropped.
struct Place {
    balance: Arc<Balance>,
    worker: usize,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.balance.live[self.worker].fetch_sub(1, Ordering::Relaxed);
        self.balance.changed.notify_waiters();
    }
}

impl Balance {
    pub fn new(workers: usize) -> Arc<Balance> {
        Arc::new(Balance {
            live: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            changed: Notify::new(),
        })
    }

    /// Client connections worker `worker` serves now.
    pub fn live(&self, worker: usize) -> u64 {
        self.live
            .get(worker)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Workers there are.
    pub fn workers(&self) -> usize {
        self.live.len()
    }

    /// Whether worker `me` serves more connections than some other worker. Counts are read
    /// without a lock: a race costs an uneven split by one, never a lost count.
    pub fn ahead(&self, me: usize) -> bool {
        let mine = self.live(me);
        self.live.iter().any(|c| c.load(Ordering::Relaxed) < mine)
    }

    /// Return once worker `me` is not ahead of the others, or after `patience`.
    pub async fn turn(&self, me: usize, patience: Duration) {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            // Registered before the counts are read, so that no change is missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !self.ahead(me) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }

    /// Count a connection accepted by worker `me` there, for as long as it lives.
    pub fn admit(self: &Arc<Self>, me: usize, permit: OwnedSemaphorePermit) -> Admission {
        self.live[me].fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
        Admission {
            _permit: permit,
            _place: Place {
                balance: self.clone(),
                worker: me,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Semaphore;

    fn permit(s: &Arc<Semaphore>) -> OwnedSemaphorePermit {
        s.clone().try_acquire_owned().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_ahead_waits_until_the_others_catch_up() {
        let s = Arc::new(Semaphore::new(100));
        let b = Balance::new(2);
        assert!(!b.ahead(0) && !b.ahead(1));
        let a = b.admit(0, permit(&s));
        assert!(b.ahead(0) && !b.ahead(1));
        // Worker 0 waits; worker 1 accepting ends the wait, well before the patience.
        let waiting = tokio::spawn({
            let b = b.clone();
            async move {
                let began = tokio::time::Instant::now();
                b.turn(0, PATIENCE).await;
                began.elapsed()
            }
        });
        tokio::time::sleep(Duration::from_millis(3)).await;
        let c = b.admit(1, permit(&s));
        let waited = waiting.await.unwrap();
        assert_eq!(waited, Duration::from_millis(3));
        // A connection closing on the busier worker ends a wait too.
        let d = b.admit(1, permit(&s));
        assert!(b.ahead(1));
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.turn(1, PATIENCE).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!waiting.is_finished());
        drop(d);
        waiting.await.unwrap();
        assert_eq!((b.live(0), b.live(1)), (1, 1));
        drop((a, c));
        assert_eq!((b.live(0), b.live(1)), (0, 0));
        assert_eq!(s.available_permits(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_ahead_accepts_anyway_after_its_patience() {
        let s = Arc::new(Semaphore::new(10));
        let b = Balance::new(2);
        let _a = b.admit(0, permit(&s));
        let began = tokio::time::Instant::now();
        b.turn(0, PATIENCE).await;
        assert_eq!(began.elapsed(), PATIENCE);
        // Level: no wait at all.
        let _c = b.admit(1, permit(&s));
        let began = tokio::time::Instant::now();
        b.turn(0, PATIENCE).await;
        assert_eq!(began.elapsed(), Duration::ZERO);
    }

    #[test]
    fn one_worker_is_never_ahead() {
        let s = Arc::new(Semaphore::new(10));
        let b = Balance::new(1);
        let _a = b.admit(0, permit(&s));
        let _c = b.admit(0, permit(&s));
        assert!(!b.ahead(0));
    }
}
