//! Bodies stream through the proxy without being buffered. Alone in its own test binary: it
//! reads this process's peak RSS, which tests running beside it would otherwise inflate.

mod common;

use common::*;

#[tokio::test]
async fn a_hundred_mib_streams_both_ways_with_flat_memory() {
    const N: u64 = 100 * 1024 * 1024;
    let sb = sandbox().await;
    let client = sb.client().unwrap();
    // Warm up the connection and allocator first, then measure the peak across the transfer.
    client
        .get("https://storage.googleapis.com/download?bytes=1")
        .send()
        .await
        .unwrap();
    let before = peak_rss_kib();

    let mut resp = client
        .get(format!("https://storage.googleapis.com/download?bytes={N}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut got = 0u64;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        got += chunk.len() as u64;
    }
    assert_eq!(got, N);

    let chunks = futures_util::stream::iter(
        (0..(N / (64 * 1024)))
            .map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![7u8; 64 * 1024]))),
    );
    let r = client
        .post("https://storage.googleapis.com/upload")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(json(r).await["received"], N);
    assert_eq!(sb.origin.uploaded(), N);

    let growth_mib = (peak_rss_kib().saturating_sub(before)) / 1024;
    eprintln!("peak RSS growth across 2 x 100 MiB: {growth_mib} MiB");
    assert!(
        growth_mib < 48,
        "bodies must stream, not buffer: grew {growth_mib} MiB"
    );
    sb.shutdown().await;
}
