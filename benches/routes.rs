//! Route matching: a 10,000-rule table against a 10-rule one, for exact hosts, `*.` suffixes,
//! path globs and a miss. The large table should cost about the same per lookup.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::Method;
use impersonate_proxy::config::Config;
use impersonate_proxy::routes::RouteTable;

fn table(n: usize) -> RouteTable {
    let mut y = String::from(
        "identities:\n  a: { service_account: a@p.iam.gserviceaccount.com }\nroutes:\n",
    );
    for i in 0..n {
        match i % 3 {
            0 => y.push_str(&format!("  - {{ host: svc{i}.googleapis.com, identity: a }}\n")),
            1 => y.push_str(&format!("  - {{ host: '*.r{i}.example.com', identity: a }}\n")),
            _ => y.push_str(&format!(
                "  - {{ host: storage{i}.googleapis.com, path: '/storage/v1/b/prod-*', methods: [GET, HEAD], identity: a }}\n"
            )),
        }
    }
    // The catch-all comes last, as in real configs.
    y.push_str("  - { host: '*.googleapis.com', identity: a }\n");
    RouteTable::compile(&Config::from_yaml(&y, "bench").unwrap()).unwrap()
}

fn matching(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_match");
    for n in [10usize, 10_000] {
        let t = table(n);
        let exact = format!("svc{}.googleapis.com", (n - 1) / 3 * 3);
        let glob_host = format!("storage{}.googleapis.com", (n - 1) / 3 * 3 + 2);
        let suffix = format!("a.b.r{}.example.com", (n - 2) / 3 * 3 + 1);
        g.bench_function(format!("{n} rules: exact host"), |b| {
            b.iter(|| black_box(t.find(black_box(&exact), "/v1/x", &Method::POST)))
        });
        g.bench_function(format!("{n} rules: *. suffix"), |b| {
            b.iter(|| black_box(t.find(black_box(&suffix), "/v1/x", &Method::GET)))
        });
        g.bench_function(format!("{n} rules: path glob"), |b| {
            b.iter(|| {
                black_box(t.find(
                    black_box(&glob_host),
                    "/storage/v1/b/prod-logs/o/a.txt",
                    &Method::GET,
                ))
            })
        });
        g.bench_function(format!("{n} rules: catch-all"), |b| {
            b.iter(|| black_box(t.find(black_box("pubsub.googleapis.com"), "/v1/x", &Method::GET)))
        });
        g.bench_function(format!("{n} rules: miss"), |b| {
            b.iter(|| black_box(t.routes_host(black_box("www.example.org"))))
        });
    }
    g.finish();
}

criterion_group!(benches, matching);
criterion_main!(benches);
