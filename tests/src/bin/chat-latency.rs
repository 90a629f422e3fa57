//! Warm text turn latency, side by side in one run: the raw CLI in
//! streaming-input mode (write a user line, read until `result`) against
//! `POST /api/v1/chat` through the real server, both on the same mock model;
//! plus the first message after session create. Interleaved in rounds so
//! machine noise hits both alike. Run as root:
//!
//! `cargo run --release -p integration-tests --bin chat-latency -- [TURNS]`

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use integration_tests::{ServerConfig, TestServer};
use serde_json::json;

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

#[allow(clippy::print_stdout)]
#[tokio::main]
async fn main() {
    let turns: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(50);
    let cli = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../node_modules/@anthropic-ai/claude-code-linux-x64/claude")
        .canonicalize()
        .expect("run `npm ci --ignore-scripts` first");
    let mock = mock_model::MockModel::start().await.expect("mock");

    // Raw CLI, warm, streaming input.
    let home = tempfile::tempdir().expect("home");
    let mut raw = Command::new(&cli)
        .args(["-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose"])
        .args(["--permission-mode", "bypassPermissions"])
        .env_clear()
        .env("HOME", home.path())
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("ANTHROPIC_BASE_URL", mock.base_url())
        .env("ANTHROPIC_API_KEY", "bench")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("IS_SANDBOX", "1")
        .current_dir(home.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("raw CLI");
    let mut raw_in = raw.stdin.take().expect("stdin");
    let mut raw_out = BufReader::new(raw.stdout.take().expect("stdout"));
    let mut raw_turn = |text: &str| {
        let started = Instant::now();
        let line = json!({"type": "user", "message": {"role": "user", "content": text}});
        writeln!(raw_in, "{line}").expect("write");
        raw_in.flush().expect("flush");
        let mut buffer = String::new();
        loop {
            buffer.clear();
            if raw_out.read_line(&mut buffer).expect("read") == 0 {
                panic!("raw CLI exited");
            }
            if buffer.contains("\"type\":\"result\"") {
                return started.elapsed().as_secs_f64() * 1000.0;
            }
        }
    };

    // The service, with the same CLI and mock.
    let config = ServerConfig::default()
        .env("CLAUDE_AGENT_CLI_PATH", cli.display().to_string())
        .env("ANTHROPIC_BASE_URL", mock.base_url())
        .yaml(&format!("sandbox:\n  allowed_tcp_ports: [{}]\n", mock.addr.port()));
    let server = TestServer::start_with(config).await;
    let token = server.user_with_token("bench").await;
    let api_turn = |session: String, text: String| {
        let (server, token) = (&server, token.clone());
        async move {
            let started = Instant::now();
            let reply = server.post("/api/v1/chat", &token, json!({"session_id": session, "message": text})).await;
            assert_eq!(reply.status, reqwest::StatusCode::OK, "{reply:?}");
            started.elapsed().as_secs_f64() * 1000.0
        }
    };

    // First message after create (the CLI warms up in the background).
    let mut first = Vec::new();
    for _ in 0..5 {
        let session = server.session(&token, json!({})).await;
        first.push(api_turn(session.clone(), "first".into()).await);
        server.delete(&format!("/api/v1/sessions/{session}"), &token).await;
    }
    let session = server.session(&token, json!({})).await;
    // Warm both up.
    for _ in 0..3 {
        raw_turn("warm up");
        api_turn(session.clone(), "warm up".into()).await;
    }
    let (mut raw_ms, mut api_ms) = (Vec::new(), Vec::new());
    for i in 0..turns {
        let text = format!("turn {i}");
        if i % 2 == 0 {
            raw_ms.push(raw_turn(&text));
            api_ms.push(api_turn(session.clone(), text).await);
        } else {
            api_ms.push(api_turn(session.clone(), text.clone()).await);
            raw_ms.push(raw_turn(&text));
        }
    }
    let _ = raw.kill();
    let _ = raw.wait();
    let (raw50, api50) = (percentile(&mut raw_ms, 0.5), percentile(&mut api_ms, 0.5));
    println!("| measurement ({turns} turns each, interleaved) | p50 ms | p90 ms |");
    println!("|---|---|---|");
    println!("| raw CLI warm text turn | {raw50:.1} | {:.1} |", percentile(&mut raw_ms, 0.9));
    println!("| POST /api/v1/chat warm text turn | {api50:.1} | {:.1} |", percentile(&mut api_ms, 0.9));
    println!("| API minus raw (p50) | {:.1} | |", api50 - raw50);
    println!(
        "| first message after session create (5 sessions) | {:.1} | {:.1} |",
        percentile(&mut first, 0.5),
        percentile(&mut first, 0.9)
    );
}
