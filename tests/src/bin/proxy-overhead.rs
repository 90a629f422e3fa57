//! What the model proxy adds to a model request, side by side in one run:
//! the same request sent straight to the mock model and through the real
//! server's model proxy (with a live session's credential), interleaved so
//! machine noise hits both alike. Measures a whole non-streamed request and,
//! for a streamed one, the time to the first byte and to the last. Run as
//! root (it reads the CLI's credential from /proc):
//!
//! `cargo run --release -p integration-tests --bin proxy-overhead -- [REQUESTS]`

use std::time::{Duration, Instant};

use futures::StreamExt;
use integration_tests::{ServerConfig, TestServer, session_model_credential};
use serde_json::json;

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

/// (time to the first body byte, time to the end) of one request, in ms.
async fn timed(client: &reqwest::Client, base_url: &str, credential: &str, stream: bool) -> (f64, f64) {
    let body = json!({
        "model": "claude-opus-4-bench", "max_tokens": 200, "stream": stream,
        "messages": [{"role": "user", "content": "mock:reply the quick brown fox jumps over the lazy dog"}],
    });
    let started = Instant::now();
    let response = client
        .post(format!("{base_url}/v1/messages?beta=true"))
        .header("x-api-key", credential)
        .json(&body)
        .send()
        .await
        .expect("request");
    assert!(response.status().is_success(), "{}", response.status());
    let mut first = None;
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        chunk.expect("chunk");
        first.get_or_insert_with(|| started.elapsed());
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(first.unwrap_or_default()), ms(started.elapsed()))
}

#[allow(clippy::print_stdout)]
#[tokio::main]
async fn main() {
    let requests: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(500);
    let mock = mock_model::MockModel::start().await.expect("mock");
    let server = TestServer::start_with(ServerConfig::default().with_cli(&mock)).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let (proxy_url, credential) = session_model_credential(&session).await;
    let client = reqwest::Client::new();
    let direct_url = mock.base_url();

    // Warm both paths (connections, caches).
    for _ in 0..20 {
        timed(&client, &direct_url, "bench", false).await;
        timed(&client, &proxy_url, &credential, false).await;
    }
    let mut samples: [[Vec<f64>; 2]; 3] = Default::default();
    for round in 0..requests {
        // Alternate which path goes first.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for path in order {
            let (url, key) = if path == 0 { (&direct_url, "bench") } else { (&proxy_url, credential.as_str()) };
            let (_, whole) = timed(&client, url, key, false).await;
            let (first_byte, streamed) = timed(&client, url, key, true).await;
            samples[0][path].push(whole);
            samples[1][path].push(first_byte);
            samples[2][path].push(streamed);
        }
    }
    println!(
        "| {requests} requests each, interleaved | direct p50 ms | proxy p50 ms | added p50 ms | direct p90 | proxy p90 | direct p99 | proxy p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let names = ["non-streamed request, whole", "streamed request, first byte", "streamed request, last byte"];
    for (name, [direct, proxied]) in names.iter().zip(samples.iter_mut()) {
        let (d50, p50) = (percentile(direct, 0.5), percentile(proxied, 0.5));
        println!(
            "| {name} | {d50:.3} | {p50:.3} | {:+.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            p50 - d50,
            percentile(direct, 0.9),
            percentile(proxied, 0.9),
            percentile(direct, 0.99),
            percentile(proxied, 0.99),
        );
    }
}
