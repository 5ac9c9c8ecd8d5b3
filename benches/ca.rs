//! Leaf certificates: minting one (ECDSA P-256 key + signature + rustls config) against the
//! cached lookup that every CONNECT after the first does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use impersonate_proxy::ca::CertificateAuthority;
use impersonate_proxy::config::CaConfig;

fn leaves(c: &mut Criterion) {
    impersonate_proxy::install_crypto_provider();
    let dir = std::env::temp_dir().join(format!("ip-bench-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = CertificateAuthority::load_or_create(&CaConfig {
        cert: dir.join("ca.pem"),
        key: dir.join("ca-key.pem"),
        ..CaConfig::default()
    })
    .unwrap();
    let mut g = c.benchmark_group("leaf");
    let mut i = 0u64;
    g.bench_function("mint (uncached)", |b| {
        b.iter(|| {
            i += 1;
            black_box(ca.mint(&format!("h{i}.googleapis.com")).unwrap())
        })
    });
    ca.server_config("storage.googleapis.com").unwrap();
    g.bench_function("server_config (cached)", |b| {
        b.iter(|| {
            black_box(
                ca.server_config(black_box("storage.googleapis.com"))
                    .unwrap(),
            )
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(benches, leaves);
criterion_main!(benches);
