//! Client connections spread evenly over the workers.
//!
//! Every worker accepts from the same listener, and whichever is woken first takes the
//! connection, so a burst of connections could land 40 on one worker and 24 on the other.
//! Each worker has its own upstream pool, and an HTTP/1.1 pool needs a connection for each
//! request in flight on its worker: when the next burst split the other way, the worker with
//! the larger share opened new upstream connections (and their TLS handshakes) although the
//! proxy as a whole had enough idle ones. So a worker that accepts a connection while it
//! serves more connections than the least busy worker hands it over to that one: one
//! cross-thread hand-over per connection moved, none per request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// The client connections each worker serves now, and where to send a connection to a worker.
pub(crate) struct Balance {
    live: Arc<[AtomicU64]>,
    inboxes: Box<[mpsc::UnboundedSender<Handover>]>,
}

/// A connection accepted by one worker for another to serve.
pub(crate) struct Handover {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    pub transparent: bool,
    pub admission: Admission,
}

/// What an accepted connection holds for its whole life: its place under
/// `limits.max_connections` and on its worker.
pub(crate) struct Admission {
    _permit: OwnedSemaphorePermit,
    _place: Place,
}

/// A connection counted on worker `worker` until dropped.
pub(crate) struct Place {
    live: Arc<[AtomicU64]>,
    worker: usize,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.live[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balance {
    /// A balance over `workers` workers, and each worker's inbox, by index.
    pub fn new(workers: usize) -> (Arc<Balance>, Vec<mpsc::UnboundedReceiver<Handover>>) {
        let live: Arc<[AtomicU64]> = (0..workers).map(|_| AtomicU64::new(0)).collect();
        let (inboxes, receivers): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let balance = Balance {
            live,
            inboxes: inboxes.into_boxed_slice(),
        };
        (Arc::new(balance), receivers)
    }

    /// Client connections each worker serves now (for the metrics).
    pub fn live(&self) -> Arc<[AtomicU64]> {
        self.live.clone()
    }

    /// Where a connection accepted by worker `me` is served: `me`, unless it serves more
    /// connections than the least busy worker; then that one. The
    /// connection is counted there at once, so a burst accepted by one worker spreads out.
    /// Workers read each other's counts without a lock: a race costs an uneven split by one,
    /// never a lost count.
    pub fn place(&self, me: usize, permit: OwnedSemaphorePermit) -> (usize, Admission) {
        let mine = self.live[me].load(Ordering::Relaxed);
        let (least, count) = self
            .live
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.load(Ordering::Relaxed)))
            .min_by_key(|&(i, c)| (c, i != me))
            .unwrap_or((me, mine));
        let worker = if mine > count { least } else { me };
        self.live[worker].fetch_add(1, Ordering::Relaxed);
        let place = Place {
            live: self.live.clone(),
            worker,
        };
        let admission = Admission {
            _permit: permit,
            _place: place,
        };
        (worker, admission)
    }

    /// Send `h` to worker `to`; it comes back if that worker no longer takes connections
    /// (it is shutting down), for the caller to serve or drop.
    pub fn hand_over(&self, to: usize, h: Handover) -> Result<(), Handover> {
        self.inboxes[to].send(h).map_err(|e| e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Semaphore;

    fn permit(s: &Arc<Semaphore>) -> OwnedSemaphorePermit {
        s.clone().try_acquire_owned().unwrap()
    }

    #[test]
    fn a_burst_on_one_worker_is_spread_evenly() {
        let s = Arc::new(Semaphore::new(1000));
        let (b, _inboxes) = Balance::new(2);
        let live = b.live();
        // Worker 0 wins every accept of a 64-connection burst.
        let placed: Vec<_> = (0..64).map(|_| b.place(0, permit(&s))).collect();
        assert_eq!(placed.iter().filter(|(to, _)| *to == 1).count(), 32);
        assert_eq!(live[0].load(Ordering::Relaxed), 32);
        assert_eq!(live[1].load(Ordering::Relaxed), 32);
        // Worker 1's connections end: worker 0 hands its next accepts over until even again.
        let (ones, zeros): (Vec<_>, Vec<_>) = placed.into_iter().partition(|(to, _)| *to == 1);
        drop(ones);
        assert_eq!(live[1].load(Ordering::Relaxed), 0);
        let (to, _a) = b.place(0, permit(&s));
        assert_eq!(to, 1);
        let (to, _b) = b.place(1, permit(&s));
        assert_eq!(
            to, 1,
            "worker 1 keeps what it accepts while it is the less busy"
        );
        drop(zeros);
        assert_eq!(live[0].load(Ordering::Relaxed), 0);
        assert_eq!(s.available_permits(), 998);
    }

    #[test]
    fn an_even_split_moves_nothing() {
        let s = Arc::new(Semaphore::new(1000));
        let (b, _inboxes) = Balance::new(3);
        let mut held = Vec::new();
        for i in 0..30 {
            let (to, a) = b.place(i % 3, permit(&s));
            assert_eq!(to, i % 3);
            held.push(a);
        }
        // Level: the accepting worker keeps it; one ahead: the next goes elsewhere.
        let (to, _a) = b.place(2, permit(&s));
        assert_eq!(to, 2);
        let (to, _b) = b.place(2, permit(&s));
        assert_eq!(to, 0);
    }

    #[test]
    fn a_stopped_worker_gives_the_connection_back() {
        let s = Arc::new(Semaphore::new(10));
        let (b, mut inboxes) = Balance::new(2);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let peer = stream.local_addr().unwrap();
        let (_, admission) = b.place(1, permit(&s));
        drop(inboxes.pop());
        let h = Handover {
            stream,
            peer,
            transparent: false,
            admission,
        };
        let back = b.hand_over(1, h).expect_err("worker 1 is gone");
        assert_eq!(back.peer, peer);
        drop(back);
        assert_eq!(s.available_permits(), 10);
        assert_eq!(b.live()[1].load(Ordering::Relaxed), 0);
    }
}
