//! Metrics for `/metrics`: what is counted, where the label handles live, and how a request
//! reaches them without a lock or an allocation.
//!
//! - `mod.rs`: [`Metrics`] (the proxy-wide counters and the label sets seen so far) and
//!   [`SeriesTable`], the handles of one config generation.
//! - `histogram.rs`: a histogram that takes no lock.
//! - `body.rs`: [`Metered`], the response body that times the end of the response and counts
//!   its bytes.
//! - `exposition.rs`: the OpenMetrics text, through prometheus-client's encoder.
//!
//! **Label handles are resolved when the config compiles.** [`crate::proxy::Live`] holds a
//! [`SeriesTable`]: one [`RequestSeries`] per (route, client) of its generation, each holding
//! its route's [`RouteSeries`] (the latency histograms). A request indexes the table with the
//! route and client indexes it has already found, and does relaxed atomic additions through
//! that pointer: no lock, no allocation, no hashing. Compiling looks every label set up in
//! [`Metrics`]' map, so a route, client or identity that keeps its name across a reload keeps
//! its series; a label set no generation uses any more is dropped at the next compile.

mod body;
mod exposition;
pub mod histogram;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use http::Method;

pub use body::Metered;
pub use exposition::{encode, CONTENT_TYPE};
pub use histogram::Histogram;

/// The label value for "no such thing": no route applied, no identity (passthrough), no
/// client configured.
pub const NONE: &str = "none";

/// Method classes, the `method` label.
pub const METHOD_CLASSES: [&str; 3] = ["read", "write", "other"];
/// Status classes, the `status` label.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// `read` (GET, HEAD, OPTIONS), `write` (POST, PUT, PATCH, DELETE) or `other`, as an index
/// into [`METHOD_CLASSES`].
#[inline]
pub fn method_class(m: &Method) -> usize {
    if m == Method::GET || m == Method::HEAD || m == Method::OPTIONS {
        0
    } else if m == Method::POST || m == Method::PUT || m == Method::PATCH || m == Method::DELETE {
        1
    } else {
        2
    }
}

/// `1xx` .. `5xx` as an index into [`STATUS_CLASSES`] (anything above 599 counts as 5xx).
#[inline]
pub fn status_class(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// The latency histograms of one (route, identity).
#[derive(Default)]
pub struct RouteSeries {
    /// From the request's arrival to its response head being ready for the client.
    pub headers: Histogram,
    /// From the request's arrival to the end of its response body.
    pub complete: Histogram,
}

/// The counters of one (route, identity, client).
pub struct RequestSeries {
    /// Requests by method class and status class.
    requests: [[AtomicU64; 5]; 3],
    /// Request body bytes read from the client (and sent upstream).
    pub request_bytes: AtomicU64,
    /// Response body bytes sent to the client.
    pub response_bytes: AtomicU64,
    /// The route's histograms, shared by every client of the route.
    pub route: Arc<RouteSeries>,
}

impl RequestSeries {
    fn new(route: Arc<RouteSeries>) -> RequestSeries {
        RequestSeries {
            requests: Default::default(),
            request_bytes: AtomicU64::new(0),
            response_bytes: AtomicU64::new(0),
            route,
        }
    }

    #[inline]
    pub fn count(&self, method: usize, status: usize) {
        if let Some(n) = self.requests.get(method).and_then(|r| r.get(status)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn requests(&self, method: usize, status: usize) -> u64 {
        self.requests
            .get(method)
            .and_then(|r| r.get(status))
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }
}

/// The handles of one config generation: a [`RequestSeries`] for each route (and one for
/// "no route") and each client (and one for "no client"), row by row.
pub struct SeriesTable {
    /// Routes + 1 and clients + 1 (the `none` row and column): never 0.
    rows: usize,
    cols: usize,
    cells: Vec<Arc<RequestSeries>>,
    /// (`none`, `none`, `none`): where an index out of range would land (never expected).
    fallback: Arc<RequestSeries>,
}

impl SeriesTable {
    /// The series of a request on route `route` (`None`: no route applied) from the client
    /// at `client` in this generation's table (`None`: no clients configured, or the
    /// connection's client is gone).
    #[inline]
    pub fn cell(&self, route: Option<usize>, client: Option<usize>) -> &Arc<RequestSeries> {
        let row = route.unwrap_or(self.rows - 1);
        let col = client.unwrap_or(self.cols - 1);
        if row >= self.rows || col >= self.cols {
            return &self.fallback;
        }
        self.cells
            .get(row * self.cols + col)
            .unwrap_or(&self.fallback)
    }
}

/// A route as the series table sees it.
pub struct RouteLabels<'a> {
    pub name: &'a str,
    /// `None` for passthrough routes.
    pub identity: Option<&'a str>,
}

/// A client as the series table sees it: its name, and whether it may use each route.
pub struct ClientLabels<'a> {
    pub name: &'a str,
    pub may_use: Box<dyn Fn(usize) -> bool + 'a>,
}

type CellKey = (String, String, String);
type RouteKey = (String, String);

/// Every label set compiled so far, for the next compile to reuse and for scrapes to read.
#[derive(Default)]
struct Known {
    cells: BTreeMap<CellKey, Arc<RequestSeries>>,
    routes: BTreeMap<RouteKey, Arc<RouteSeries>>,
}

impl Known {
    fn cell(&mut self, route: &str, identity: &str, client: &str) -> Arc<RequestSeries> {
        let key = (route.to_string(), identity.to_string(), client.to_string());
        if let Some(s) = self.cells.get(&key) {
            return s.clone();
        }
        let r = self
            .routes
            .entry((route.to_string(), identity.to_string()))
            .or_default()
            .clone();
        let s = Arc::new(RequestSeries::new(r));
        self.cells.insert(key, s.clone());
        s
    }
}

/// Proxy-wide counters, and the label sets of the per-route series.
#[derive(Default)]
pub struct Metrics {
    /// Client connections accepted, and open now (including the tunnel or intercepted
    /// session a CONNECT became).
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    /// Client connections each worker serves now (set when the workers start).
    pub(crate) worker_connections: std::sync::OnceLock<Arc<crate::proxy::balance::Balance>>,
    /// CONNECTs intercepted with the local CA, and those sessions open now.
    pub intercepts_total: AtomicU64,
    pub intercepts_open: AtomicU64,
    /// CONNECTs tunnelled blind, and those tunnels open now.
    pub tunnels_total: AtomicU64,
    pub tunnels_open: AtomicU64,
    /// Upstream connections opened for intercepted and plain-http requests, and open now.
    pub upstream_total: AtomicU64,
    pub upstream_open: AtomicU64,
    /// Requests refused before any route applied (a port, a host, a malformed request, an
    /// unreachable tunnel target, 407), by status class.
    refused: [AtomicU64; 5],
    /// Requests answered 503 because no token could be had.
    pub token_errors_total: AtomicU64,
    /// Requests answered 502/504 because the origin failed.
    pub upstream_errors_total: AtomicU64,
    /// Requests answered 407 (no or wrong proxy credentials).
    pub auth_failures_total: AtomicU64,
    /// Transparent-listener connections closed without being served: no server name, a
    /// refused host, an unknown client, a loop back to the proxy.
    pub transparent_closed_total: AtomicU64,
    /// Bytes a blind tunnel carried, client to origin and back.
    pub tunnel_bytes_up: AtomicU64,
    pub tunnel_bytes_down: AtomicU64,
    /// The TCP connect of a new upstream connection.
    pub upstream_connect: Histogram,
    /// The TLS handshake of a new upstream connection, after its TCP connect.
    pub upstream_tls: Histogram,
    /// Taken when a config compiles and when `/metrics` is scraped; never per request.
    known: Mutex<Known>,
}

impl Metrics {
    pub fn refused(&self, status: u16) {
        if let Some(n) = self.refused.get(status_class(status)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn refused_count(&self, class: usize) -> u64 {
        self.refused
            .get(class)
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    fn known(&self) -> MutexGuard<'_, Known> {
        // A panic while holding it cannot leave the maps half-updated in a way that matters.
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The series table of a generation with these routes and clients (no clients: everyone
    /// counts as `none`). Label sets seen before get their series back; those no generation
    /// holds any more are dropped.
    pub fn compile(&self, routes: &[RouteLabels<'_>], clients: &[ClientLabels<'_>]) -> SeriesTable {
        let mut known = self.known();
        let known = &mut *known;
        let cols = clients.len() + 1;
        let none_row: Vec<Arc<RequestSeries>> = clients
            .iter()
            .map(|c| c.name)
            .chain([NONE])
            .map(|client| known.cell(NONE, NONE, client))
            .collect();
        let mut cells = Vec::with_capacity((routes.len() + 1) * cols);
        for (i, route) in routes.iter().enumerate() {
            let identity = route.identity.unwrap_or(NONE);
            for (c, client) in clients.iter().enumerate() {
                // A client that may not use the route never lands here: share its no-route
                // series rather than creating one.
                let s = if (client.may_use)(i) {
                    known.cell(route.name, identity, client.name)
                } else {
                    none_row
                        .get(c)
                        .cloned()
                        .unwrap_or_else(|| known.cell(NONE, NONE, NONE))
                };
                cells.push(s);
            }
            cells.push(known.cell(route.name, identity, NONE));
        }
        let fallback = known.cell(NONE, NONE, NONE);
        cells.extend(none_row);
        // Held only here (and in no table): no generation uses them any more.
        known.cells.retain(|_, s| Arc::strong_count(s) > 1);
        known.routes.retain(|_, s| Arc::strong_count(s) > 1);
        SeriesTable {
            rows: routes.len() + 1,
            cols,
            cells,
            fallback,
        }
    }
}

/// Counts a connection of one kind as open for as long as it lives.
pub struct Open<'a>(&'a AtomicU64);

impl<'a> Open<'a> {
    pub fn new(total: &AtomicU64, open: &'a AtomicU64) -> Open<'a> {
        total.fetch_add(1, Ordering::Relaxed);
        open.fetch_add(1, Ordering::Relaxed);
        Open(open)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels<'a>(names: &'a [(&'a str, Option<&'a str>)]) -> Vec<RouteLabels<'a>> {
        names
            .iter()
            .map(|&(name, identity)| RouteLabels { name, identity })
            .collect()
    }

    #[test]
    fn classes() {
        assert_eq!(method_class(&Method::HEAD), 0);
        assert_eq!(method_class(&Method::PATCH), 1);
        assert_eq!(method_class(&Method::CONNECT), 2);
        assert_eq!(status_class(101), 0);
        assert_eq!(status_class(204), 1);
        assert_eq!(status_class(503), 4);
        assert_eq!(status_class(999), 4);
        assert_eq!(status_class(42), 0);
    }

    #[test]
    fn a_label_set_keeps_its_series_across_compiles_and_a_dropped_one_goes() {
        let m = Metrics::default();
        let clients = [
            ClientLabels {
                name: "etl",
                may_use: Box::new(|_| true),
            },
            ClientLabels {
                name: "reports",
                may_use: Box::new(|i| i == 1),
            },
        ];
        let t1 = m.compile(&labels(&[("a", Some("reader")), ("b", None)]), &clients);
        t1.cell(Some(0), Some(0)).count(0, 1);
        t1.cell(Some(1), Some(1)).count(1, 4);
        t1.cell(None, None).count(2, 3);
        // reports may not use route a: its cell there is its no-route one.
        assert!(Arc::ptr_eq(
            t1.cell(Some(0), Some(1)),
            t1.cell(None, Some(1))
        ));
        // Out of range lands on the fallback rather than panicking.
        assert!(Arc::ptr_eq(t1.cell(Some(9), Some(9)), &t1.fallback));

        // Route b renamed c; a keeps its name, identity and clients.
        let t2 = m.compile(&labels(&[("a", Some("reader")), ("c", None)]), &clients);
        assert_eq!(t2.cell(Some(0), Some(0)).requests(0, 1), 1, "kept");
        assert_eq!(
            t2.cell(Some(1), Some(1)).requests(1, 4),
            0,
            "a new label set"
        );
        assert_eq!(t2.cell(None, None).requests(2, 3), 1);
        drop(t1);
        // b's series goes at the compile after its last table.
        let _t3 = m.compile(&labels(&[("a", Some("reader"))]), &clients);
        let known = m.known();
        assert!(!known.cells.keys().any(|k| k.0 == "b"));
        assert!(known.cells.keys().any(|k| k.0 == "c"), "t2 still holds it");
        assert!(known.routes.contains_key(&("a".into(), "reader".into())));
    }
}
