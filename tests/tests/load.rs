//! A bounded load test: many users' sessions chatting at once through sync
//! and SSE turns with text and tool calls, on loopback, stopping by itself.
//! Every turn's result must arrive, every SSE stream must be complete and in
//! order, nothing may answer 5xx, and the server's memory and open file
//! descriptors must come back to their baseline once the sessions close: the
//! load runs `LOAD_ROUNDS` times (at least 2, by default 2), and after the
//! last round (pools warm, idle workers stopped) they are no higher than after
//! the first, which warms the pools.
//!
//! CI runs a reduced size; the issue's size is
//! `LOAD_USERS=16 LOAD_SESSIONS=64 LOAD_TURNS=20 cargo test -p integration-tests --test load -- --nocapture`.
//! The server's environment is cleared, so the allocator's tuning
//! (`MALLOC_ARENA_MAX`, `MALLOC_TRIM_THRESHOLD_`, `GLIBC_TUNABLES`) is passed
//! on to it when set for the test.

use std::time::{Duration, Instant};

use integration_tests::{ServerConfig, SseEvent, TestServer, read_sse};
use mock_model::MockModel;
use reqwest::StatusCode;
use serde_json::json;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `RssAnon`).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn pct(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(((values.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN)
}

#[allow(clippy::print_stderr)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sessions_chat_at_once_and_the_server_returns_to_its_baseline() {
    let (users, sessions, turns) = (env_or("LOAD_USERS", 3), env_or("LOAD_SESSIONS", 9), env_or("LOAD_TURNS", 3));
    let rounds = env_or("LOAD_ROUNDS", 2).max(2);
    let mock = MockModel::start().await.expect("mock");
    let mut config = ServerConfig::default()
        .with_cli(&mock)
        .env("CLAUDE_AGENT_MAX_SESSIONS", (sessions + 8).to_string())
        .env("CLAUDE_AGENT_MAX_SESSIONS_PER_USER", sessions.to_string())
        .env("CLAUDE_AGENT_MAX_CONCURRENT", sessions.to_string())
        .env("CLAUDE_AGENT_API__MAX_WARM_SESSIONS", sessions.to_string())
        .env("CLAUDE_AGENT_API__MAX_WARM_SESSIONS_PER_USER", sessions.to_string())
        .yaml("sandbox:\n  worker_idle_timeout: 1\n");
    for name in ["MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"] {
        if let Ok(value) = std::env::var(name) {
            config = config.env(name, value);
        }
    }
    let server = TestServer::start_with(config).await;
    let mut tokens = Vec::new();
    for u in 0..users {
        tokens.push(server.user_with_token(&format!("load{u}")).await);
    }
    let mut settled: Vec<(u64, usize)> = Vec::new();
    for round in 0..rounds {
        let (latencies, elapsed, peak_rss) = load_round(&server, &tokens, sessions, turns).await;
        // Sessions closed, idle workers stopped: wait for the numbers to settle.
        let mut last = (rss_kib(server.pid), open_fds(server.pid));
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = (rss_kib(server.pid), open_fds(server.pid));
            if now.1 == last.1 && server_ref_workers_gone(&server).await {
                last = now;
                break;
            }
            last = now;
        }
        let mut latencies = latencies;
        let growth = settled.first().map_or(0, |first| last.0 as i64 - first.0 as i64);
        eprintln!(
            "load round {}/{rounds}: {users} users, {sessions} sessions, {turns} turns each: {:.1} turns/s, \
             p50 {:.0} ms, p99 {:.0} ms; server RSS peak {peak_rss} KiB, settled {} KiB (anon {} KiB, \
             {growth:+} KiB since round 1); fds settled {}",
            round + 1,
            latencies.len() as f64 / elapsed,
            pct(&mut latencies, 0.5),
            pct(&mut latencies, 0.99),
            last.0,
            status_kib(server.pid, "RssAnon"),
            last.1
        );
        settled.push(last);
    }
    // The server answered nothing with 5xx.
    let log = server.log();
    assert!(!log.contains("response failed"), "5xx during the load:\n{log}");
    // After the first round (it warms the pools) against after the last.
    let ((rss_before, fds_before), (rss_after, fds_after)) = (settled[0], settled[rounds - 1]);
    let fd_kinds = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/fd", server.pid))
            .map(|d| {
                d.flatten().filter_map(|e| std::fs::read_link(e.path()).ok()).map(|p| p.display().to_string()).collect()
            })
            .unwrap_or_default()
    };
    assert!(
        fds_after <= fds_before + 8,
        "descriptors leaked: {fds_before} after round 1 → {fds_after} after round {rounds}: {:?}",
        fd_kinds()
    );
    assert!(
        rss_after <= rss_before + 16 * 1024,
        "memory did not settle: {rss_before} KiB after round 1 → {rss_after} KiB after round {rounds}"
    );
}

/// One round: every session created, `turns` turns each (sync and SSE
/// alternating, text and tool calls), then deleted. (latencies ms, seconds,
/// peak RSS KiB)
async fn load_round(server: &TestServer, tokens: &[String], sessions: usize, turns: usize) -> (Vec<f64>, f64, u64) {
    let users = tokens.len();
    let started = Instant::now();
    let server_ref = server;
    let runs = (0..sessions).map(|s| {
        let token = tokens[s % users].clone();
        async move {
            let session = server_ref.session(&token, json!({})).await;
            let mut latencies = Vec::new();
            for t in 0..turns {
                let text = if t % 3 == 2 {
                    format!(r#"mock:tool Bash {{"command": "echo s{s}-t{t}"}}"#)
                } else {
                    format!("mock:reply s{s} t{t}")
                };
                let begun = Instant::now();
                if (s + t) % 2 == 0 {
                    let reply = server_ref.chat(&token, &session, &text).await;
                    assert_eq!(reply.status, StatusCode::OK, "session {s} turn {t}: {reply:?}");
                    assert_eq!(reply.body["is_error"], false, "session {s} turn {t}: {reply:?}");
                    let expected = if t % 3 == 2 { format!("s{s}-t{t}") } else { format!("s{s} t{t}") };
                    assert!(reply.body["text"].as_str().is_some_and(|x| x.contains(&expected)), "{reply:?}");
                } else {
                    let stream = server_ref.open_stream(&token, &session, &text).await;
                    let events: Vec<SseEvent> = read_sse(stream, |_| false).await;
                    let kinds: Vec<&str> = events.iter().map(SseEvent::kind).collect();
                    assert_eq!(kinds.last(), Some(&"done"), "session {s} turn {t}: {kinds:?}");
                    assert!(kinds.contains(&"result"), "{kinds:?}");
                    let first = events[0].id_number();
                    for (i, event) in events.iter().enumerate() {
                        assert_eq!(event.id_number(), first + i as u64, "session {s} turn {t}: ids with a gap");
                    }
                }
                latencies.push(begun.elapsed().as_secs_f64() * 1000.0);
            }
            let deleted = server_ref.delete(&format!("/api/v1/sessions/{session}"), &token).await;
            assert_eq!(deleted.status, StatusCode::NO_CONTENT);
            latencies
        }
    });
    let latencies: Vec<f64> = futures::future::join_all(runs).await.into_iter().flatten().collect();
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(latencies.len(), sessions * turns);
    let peak_rss = rss_kib(server.pid);
    (latencies, elapsed, peak_rss)
}

/// Whether the server has no worker left (idle ones stop after 1 s here).
async fn server_ref_workers_gone(server: &TestServer) -> bool {
    let metrics = server.request(reqwest::Method::GET, "/metrics", None).send().await.expect("metrics");
    metrics.text().await.unwrap_or_default().contains("cah_workers 0")
}
