//! The token cache's hot path: a read of a warm slot among 10,000, and reads from 64 threads
//! while refreshers keep replacing entries. Tokens come from an in-process minter, never the
//! network.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use futures_util::FutureExt;
use impersonate_proxy::tokens::{
    Mint, Minted, Settings, TokenEngine, TokenError, TokenKind, TokenSlot, TokenSpec,
};

struct Local {
    life: Duration,
    calls: AtomicU64,
}

impl Mint for Local {
    fn mint<'a>(
        &'a self,
        _spec: &'a TokenSpec,
    ) -> Pin<Box<dyn Future<Output = Result<Minted, TokenError>> + Send + 'a>> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let life = self.life;
        Box::pin(async move {
            Ok(Minted {
                token: format!("ya29.bench-token-{n:0>180}"),
                expires_in: life,
            })
        })
    }
}

fn spec(i: usize) -> TokenSpec {
    TokenSpec {
        target: format!("sa-{i}@bench.iam.gserviceaccount.com"),
        delegates: vec![],
        kind: TokenKind::Access {
            scopes: vec!["https://www.googleapis.com/auth/cloud-platform".into()],
            lifetime: Duration::from_secs(3600),
        },
    }
}

fn warm(
    rt: &tokio::runtime::Runtime,
    n: usize,
    life: Duration,
) -> (Arc<TokenEngine>, Vec<Arc<TokenSlot>>, Arc<Local>) {
    let minter = Arc::new(Local {
        life,
        calls: AtomicU64::new(0),
    });
    let settings = Settings {
        refresh_margin: None,
        jitter: Duration::from_millis(50),
        safety_window: Duration::from_millis(10),
    };
    let engine =
        rt.block_on(async { TokenEngine::with_minter(minter.clone(), settings, "bench".into()) });
    let slots: Vec<_> = rt.block_on(async { (0..n).map(|i| engine.slot(spec(i))).collect() });
    rt.block_on(engine.warm());
    (engine, slots, minter)
}

fn hot_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (_engine, slots, minter) = warm(&rt, 10_000, Duration::from_secs(3600));
    let before = minter.calls.load(Ordering::Relaxed);
    let mut g = c.benchmark_group("token_cache");
    let hot = slots[4242].clone();
    g.bench_function("read, one warm slot of 10k (try_current)", |b| {
        b.iter(|| black_box(hot.try_current()))
    });
    let mut i = 0usize;
    g.bench_function("read, striding over all 10k slots (try_current)", |b| {
        b.iter(|| {
            i = (i + 7919) % slots.len();
            black_box(slots[i].try_current())
        })
    });
    g.bench_function(
        "read, striding over all 10k slots (authorization, ready)",
        |b| {
            b.iter(|| {
                i = (i + 7919) % slots.len();
                black_box(slots[i].authorization().now_or_never())
            })
        },
    );
    assert_eq!(
        minter.calls.load(Ordering::Relaxed),
        before,
        "no mint on the read path"
    );
    g.finish();
}

fn readers_during_refresh(c: &mut Criterion) {
    // 1,000 slots whose tokens live 300 ms: the refreshers replace thousands of entries a
    // second while 64 threads read.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (_engine, slots, minter) = warm(&rt, 1_000, Duration::from_millis(300));
    let slots = Arc::new(slots);
    let mut g = c.benchmark_group("token_cache");
    g.sample_size(10);
    g.bench_function(
        "read, 64 threads, refresher replacing entries (per read)",
        |b| {
            b.iter_custom(|iters| {
                let per = (iters / 64).max(1);
                let start = Instant::now();
                let handles: Vec<_> = (0..64)
                    .map(|t| {
                        let slots = slots.clone();
                        std::thread::spawn(move || {
                            let mut hits = 0u64;
                            let mut i = t * 131;
                            for _ in 0..per {
                                i = (i + 7919) % slots.len();
                                hits += u64::from(slots[i].try_current().is_some());
                            }
                            hits
                        })
                    })
                    .collect();
                let hits: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
                black_box(hits);
                // Wall time for 64 x per reads, scaled to `iters` reads: the aggregate cost of a
                // read with 64 readers sharing the machine's cores.
                start.elapsed().mul_f64(iters as f64 / (64 * per) as f64)
            })
        },
    );
    g.finish();
    eprintln!(
        "refresher mints during the run: {}",
        minter.calls.load(Ordering::Relaxed)
    );
}

criterion_group!(benches, hot_path, readers_during_refresh);
criterion_main!(benches);
