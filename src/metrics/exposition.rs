//! `/metrics` as OpenMetrics text, written by prometheus-client's encoder from our own
//! counters: a [`Collector`] reads them at scrape time, so the request path never touches the
//! library. The README's metrics table lists every family written here.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{Histogram, METHOD_CLASSES, NONE, STATUS_CLASSES};
use crate::proxy::ProxyState;
use crate::tokens::{TokenKind, TokenSpec};

/// The content type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric of the proxy, as OpenMetrics text (ending in `# EOF`).
pub fn encode(state: &Arc<ProxyState>) -> Result<String, fmt::Error> {
    let mut registry = Registry::with_prefix("impersonate_proxy");
    registry.register_collector(Box::new(Exposed(state.clone())));
    let mut text = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

struct Exposed(Arc<ProxyState>);

impl fmt::Debug for Exposed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Exposed")
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: impl EncodeGaugeValue,
) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

/// A counter family; series whose value is 0 are left out (a series appears with its first
/// event, as with any labelled family).
fn counters<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut f = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        if v > 0 {
            f.encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
    }
    Ok(())
}

fn histogram(e: &mut DescriptorEncoder, name: &str, help: &str, h: &Histogram) -> fmt::Result {
    let s = h.snapshot();
    e.encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(s.sum_seconds, s.count, &s.buckets, None)
}

/// A histogram family; series with no observation are left out.
fn histograms<'h, L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, &'h Histogram)>,
) -> fmt::Result {
    let mut f = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in series {
        let s = h.snapshot();
        if s.count > 0 {
            f.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                s.sum_seconds,
                s.count,
                &s.buckets,
                None,
            )?;
        }
    }
    Ok(())
}

impl Collector for Exposed {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let state = &*self.0;
        requests(state, &mut e)?;
        connections(state, &mut e)?;
        tokens(state, &mut e)?;
        let m = &state.metrics;
        counters(
            &mut e,
            "refused",
            "Requests refused before any route applied (port, host, malformed, unreachable tunnel target, 407), by status class.",
            STATUS_CLASSES
                .iter()
                .enumerate()
                .map(|(i, s)| ([("status", *s)], m.refused_count(i))),
        )?;
        counter(
            &mut e,
            "auth_failures",
            "Requests answered 407: no or wrong proxy credentials.",
            load(&m.auth_failures_total),
        )?;
        counter(
            &mut e,
            "transparent_closed",
            "Transparent-listener connections closed without being served.",
            load(&m.transparent_closed_total),
        )?;
        counter(
            &mut e,
            "token_errors",
            "Requests answered 503 because no token could be had.",
            load(&m.token_errors_total),
        )?;
        counter(
            &mut e,
            "upstream_errors",
            "Requests answered 502 or 504 because the origin failed.",
            load(&m.upstream_errors_total),
        )?;
        counters(
            &mut e,
            "reloads",
            "Config reloads, by result.",
            [
                ([("result", "ok")], load(&state.reload.ok_total)),
                ([("result", "failed")], load(&state.reload.failed_total)),
            ],
        )?;
        gauge(
            &mut e,
            "config_generation",
            "The config generation in force (1 at start, one more per reload).",
            state.live.load().generation,
        )?;
        gauge(
            &mut e,
            "leaf_certificates_cached",
            "Minted leaf certificates in the cache.",
            state.ca.cached_leaves() as u64,
        )?;
        Ok(())
    }
}

fn requests(state: &ProxyState, e: &mut DescriptorEncoder) -> fmt::Result {
    let known = state.metrics.known();
    let cell_labels = |k: &(String, String, String)| {
        [
            ("route", k.0.clone()),
            ("identity", k.1.clone()),
            ("client", k.2.clone()),
        ]
    };
    let mut f = e.encode_descriptor(
        "requests",
        "Requests on intercepted connections and plain-http requests, by route, identity, client, method class and status class.",
        None,
        MetricType::Counter,
    )?;
    for (k, s) in &known.cells {
        for (mi, method) in METHOD_CLASSES.iter().enumerate() {
            for (si, status) in STATUS_CLASSES.iter().enumerate() {
                let v = s.requests(mi, si);
                if v > 0 {
                    let labels = [
                        ("route", k.0.as_str()),
                        ("identity", k.1.as_str()),
                        ("client", k.2.as_str()),
                        ("method", method),
                        ("status", status),
                    ];
                    f.encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
                }
            }
        }
    }
    histograms(
        e,
        "response_headers_duration_seconds",
        "From a request's arrival to its response head being ready for the client, by route and identity.",
        known
            .routes
            .iter()
            .map(|(k, s)| ([("route", k.0.as_str()), ("identity", k.1.as_str())], &s.headers)),
    )?;
    histograms(
        e,
        "request_duration_seconds",
        "From a request's arrival to the end of its response body, by route and identity.",
        known.routes.iter().map(|(k, s)| {
            (
                [("route", k.0.as_str()), ("identity", k.1.as_str())],
                &s.complete,
            )
        }),
    )?;
    counters(
        e,
        "request_body_bytes",
        "Request body bytes read from clients and sent upstream, by route, identity and client.",
        known
            .cells
            .iter()
            .map(|(k, s)| (cell_labels(k), load(&s.request_bytes))),
    )?;
    counters(
        e,
        "response_body_bytes",
        "Response body bytes sent to clients, by route, identity and client.",
        known
            .cells
            .iter()
            .map(|(k, s)| (cell_labels(k), load(&s.response_bytes))),
    )
}

fn connections(state: &ProxyState, e: &mut DescriptorEncoder) -> fmt::Result {
    let m = &state.metrics;
    counters(
        e,
        "connections",
        "Connections opened, by kind: client (accepted on the listener), intercepted (CONNECT served with the local CA), tunnel (CONNECT tunnelled blind), upstream (to origins, for intercepted and plain-http requests).",
        [
            ([("kind", "client")], load(&m.connections_total)),
            ([("kind", "intercepted")], load(&m.intercepts_total)),
            ([("kind", "tunnel")], load(&m.tunnels_total)),
            ([("kind", "upstream")], load(&m.upstream_total)),
        ],
    )?;
    let mut f = e.encode_descriptor(
        "open_connections",
        "Connections open now, by kind (as for connections_total; a client connection that became an intercepted session or a tunnel counts as both).",
        None,
        MetricType::Gauge,
    )?;
    for (kind, v) in [
        ("client", &m.connections_active),
        ("intercepted", &m.intercepts_open),
        ("tunnel", &m.tunnels_open),
        ("upstream", &m.upstream_open),
    ] {
        f.encode_family(&[("kind", kind)])?.encode_gauge(&load(v))?;
    }
    if let Some(workers) = m.worker_connections.get() {
        let mut f = e.encode_descriptor(
            "worker_connections",
            "Client connections each worker thread serves now (they are spread evenly).",
            None,
            MetricType::Gauge,
        )?;
        for i in 0..workers.workers() {
            f.encode_family(&[("worker", i.to_string())])?
                .encode_gauge(&workers.live(i))?;
        }
    }
    histogram(
        e,
        "upstream_connect_duration_seconds",
        "TCP connect time of new upstream connections.",
        &m.upstream_connect,
    )?;
    histogram(
        e,
        "upstream_tls_handshake_duration_seconds",
        "TLS handshake time of new upstream connections, after the TCP connect.",
        &m.upstream_tls,
    )?;
    counters(
        e,
        "tunnel_bytes",
        "Bytes carried by blind tunnels, by direction (up: client to origin).",
        [
            ([("direction", "up")], load(&m.tunnel_bytes_up)),
            ([("direction", "down")], load(&m.tunnel_bytes_down)),
        ],
    )
}

/// What one token series adds up: its mints and the earliest expiry among its slots.
#[derive(Default)]
struct TokenRow {
    ok: u64,
    failed: u64,
    expires: Option<SystemTime>,
}

fn tokens(state: &ProxyState, e: &mut DescriptorEncoder) -> fmt::Result {
    let engine = &state.engine;
    let live = state.live.load();
    // Identity names by token spec, from the routes in force and the metadata facade.
    let mut names: HashMap<&TokenSpec, &str> = HashMap::new();
    for t in &live.targets {
        if let (Some(slot), Some(name)) = (&t.slot, &t.identity) {
            names.entry(slot.spec()).or_insert(name.as_str());
        }
    }
    let facade = state.config.facade.metadata.as_ref().and_then(|m| {
        let id = state.config.identities.get(&m.identity)?;
        Some((TokenSpec::access(id), m.identity.as_str()))
    });
    let slots = engine.slots();
    let mut rows: BTreeMap<(String, &'static str, String), TokenRow> = BTreeMap::new();
    let mut ready = 0u64;
    for slot in &slots {
        let spec = slot.spec();
        let name = names
            .get(spec)
            .copied()
            .or_else(|| facade.as_ref().filter(|f| &f.0 == spec).map(|f| f.1))
            .unwrap_or(NONE);
        let (kind, audience) = match &spec.kind {
            TokenKind::Access { .. } => ("access", NONE),
            TokenKind::Id { audience, .. } => ("id_token", audience.as_str()),
        };
        let row = rows
            .entry((name.to_string(), kind, audience.to_string()))
            .or_default();
        let (ok, failed) = slot.mints();
        row.ok += ok;
        row.failed += failed;
        if let Some(t) = slot.expires_at() {
            row.expires = Some(row.expires.map_or(t, |e| e.min(t)));
        }
        if slot.is_ready() {
            ready += 1;
        }
    }
    let labels = |k: &(String, &'static str, String)| {
        [
            ("identity", k.0.clone()),
            ("kind", k.1.to_string()),
            ("audience", k.2.clone()),
        ]
    };
    counters(
        e,
        "token_mints",
        "IAM mint attempts (first mints and refreshes), by identity, token kind, audience and result.",
        rows.iter().flat_map(|(k, r)| {
            let l = labels(k);
            let with = |result: &'static str| {
                let [a, b, c] = l.clone();
                [a, b, c, ("result", result.to_string())]
            };
            [(with("ok"), r.ok), (with("failed"), r.failed)]
        }),
    )?;
    let mut f = e.encode_descriptor(
        "token_expiry_timestamp_seconds",
        "When the token each identity serves now expires, in Unix seconds; it stops being served tokens.safety_window before.",
        None,
        MetricType::Gauge,
    )?;
    for (k, r) in &rows {
        if let Some(t) = r.expires {
            let secs = t
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            f.encode_family(&labels(k))?.encode_gauge(&secs)?;
        }
    }
    gauge(
        e,
        "token_safety_window_seconds",
        "tokens.safety_window: a token with less left is never served.",
        engine.safety_window().as_secs_f64(),
    )?;
    counter(
        e,
        "token_refreshes",
        "Background refreshes started.",
        load(&engine.metrics().refreshes_total),
    )?;
    histogram(
        e,
        "iam_request_duration_seconds",
        "Time of one mint: the source credential (cached) and the IAM Credentials call, failed or not.",
        &engine.metrics().iam,
    )?;
    gauge(e, "token_slots", "Token cache entries.", slots.len() as u64)?;
    gauge(
        e,
        "token_slots_ready",
        "Token cache entries with a servable token.",
        ready,
    )
}
