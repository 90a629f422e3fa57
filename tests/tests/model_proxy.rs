//! The model proxy: the operator's key never reaches a sandbox, each CLI's
//! credential dies with it, usage is metered at the proxy, budgets and rate
//! limits hold, and streams pass through unchanged. Real server, real CLI in
//! its sandbox, the mock as the upstream model API.

use std::time::Duration;

use integration_tests::{
    ServerConfig, TestServer, session_cli_environment, session_model_credential, session_process_pids,
};
use mock_model::{MockModel, MockServer};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The operator's key in these tests; it must never show up on the sandbox side.
const REAL_KEY: &str = "sk-ant-operator-secret-7f3a9c2e5b1d4k8q";

async fn start(mock: &MockServer, config: ServerConfig) -> TestServer {
    TestServer::start_with(config.with_cli(mock).env("ANTHROPIC_API_KEY", REAL_KEY)).await
}

/// A small model request sent straight to `base_url` with `credential`.
async fn direct_request(base_url: &str, credential: &str, text: &str, stream: bool) -> reqwest::Response {
    let body = json!({
        "model": "claude-opus-4-test", "max_tokens": 100, "stream": stream,
        "messages": [{"role": "user", "content": text}],
    });
    reqwest::Client::new()
        .post(format!("{base_url}/v1/messages?beta=true"))
        .header("x-api-key", credential)
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .expect("request")
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if meta.is_file()
            && std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        {
            found.push(path);
        }
    }
    found
}

#[tokio::test]
async fn the_operators_key_never_reaches_a_sandbox() {
    let mock = MockModel::start().await.expect("mock");
    let server = start(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    // What a curious agent would try, with its output echoed back by the mock.
    let probe = r#"mock:tool Bash {"command": "env; tr '\\0' '\\n' < /proc/self/environ; for p in /proc/[0-9]*; do tr '\\0' '\\n' < $p/environ 2>/dev/null; tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done; cat ~/.claude.json ~/.claude/*.json 2>/dev/null"}"#;
    let reply = server.chat(&alice, &session, probe).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let text = reply.body["text"].as_str().unwrap_or_default();
    assert!(text.contains("ANTHROPIC_BASE_URL="), "the probe did not run: {text}");
    assert!(!text.contains(REAL_KEY) && !text.contains(&REAL_KEY[8..]), "the key leaked into the sandbox: {text}");

    // The CLI's own environment and argv hold only its session credential.
    let env = session_cli_environment(&session).await;
    let (base_url, credential) = session_model_credential(&session).await;
    assert!(credential.starts_with("cah-") && credential != REAL_KEY);
    assert!(env.iter().all(|(_, v)| !v.contains(REAL_KEY)), "{env:?}");
    assert!(base_url.starts_with("http://127.0.0.1:"));
    for pid in session_process_pids(&session) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&cmdline).contains(REAL_KEY));
    }
    // Nothing the CLI wrote in the user's directory holds it.
    let leaks = files_containing(&server.users_dir().join("alice"), REAL_KEY.as_bytes());
    assert!(leaks.is_empty(), "key found in {leaks:?}");
    // The upstream did get the real key, from the proxy.
    let upstream = mock.message_requests();
    assert!(!upstream.is_empty());
    let real_suffix = &REAL_KEY[REAL_KEY.len() - 4..];
    assert!(upstream.iter().all(|r| r.credential_suffix.as_deref() == Some(real_suffix)), "{upstream:?}");
    // Nor does the server's log.
    assert!(!server.log().contains(REAL_KEY));
}

#[tokio::test]
async fn a_cli_credential_works_only_while_its_session_lives_and_only_as_its_session() {
    let mock = MockModel::start().await.expect("mock");
    let server = start(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let (base_url, credential) = session_model_credential(&session).await;

    let live = direct_request(&base_url, &credential, "mock:reply direct", false).await;
    assert_eq!(live.status(), StatusCode::OK);
    // Whatever it is used for, the proxy books it to alice's session (the
    // audit row is written after the answer: wait for it).
    let audit_path = format!("/api/v1/audit/model-requests?session_id={session}");
    let mut rows = Vec::new();
    for _ in 0..100 {
        let audit = server.get(&audit_path, &server.admin_token).await;
        rows = audit.body["items"].as_array().expect("items").clone();
        if !rows.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!rows.is_empty(), "no audit row for the direct request");
    assert!(rows.iter().all(|r| r["user_id"] == "alice" && r["session_id"] == session.as_str()), "{rows:?}");
    // Users do not read the audit log.
    server.get("/api/v1/audit/model-requests", &alice).await.assert_error(StatusCode::FORBIDDEN, "forbidden");

    for bogus in ["", "cah-0000", REAL_KEY, &credential[..credential.len() - 1]] {
        let refused = direct_request(&base_url, bogus, "hi", false).await;
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "{bogus:?}");
        let body: Value = refused.json().await.expect("json");
        assert_eq!(body["error"]["type"], "authentication_error");
    }
    assert_eq!(server.delete(&format!("/api/v1/sessions/{session}"), &alice).await.status, StatusCode::NO_CONTENT);
    let dead = direct_request(&base_url, &credential, "hi", false).await;
    assert_eq!(dead.status(), StatusCode::UNAUTHORIZED, "a deleted session's credential still works");
}

#[tokio::test]
async fn usage_metered_at_the_proxy_equals_what_the_model_reported() {
    let mock = MockModel::start().await.expect("mock");
    let server = start(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    assert_eq!(server.chat(&alice, &session, "hello").await.status, StatusCode::OK);
    let tool = r#"mock:tool Bash {"command": "echo metered"}"#;
    assert_eq!(server.chat(&alice, &session, tool).await.status, StatusCode::OK);

    let upstream: Vec<[u64; 2]> = mock.message_requests().iter().filter_map(|r| r.usage).collect();
    let (input, output) = upstream.iter().fold((0, 0), |(i, o), u| (i + u[0], o + u[1]));
    // Audit rows are written just after each response ends.
    let mut rows = Vec::new();
    for _ in 0..50 {
        let audit =
            server.get(&format!("/api/v1/audit/model-requests?session_id={session}"), &server.admin_token).await;
        rows = audit.body["items"].as_array().expect("items").clone();
        if rows.len() >= upstream.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sum = |key: &str| rows.iter().map(|r| r["usage"][key].as_u64().unwrap_or(0)).sum::<u64>();
    assert_eq!(rows.len(), upstream.len(), "{rows:#?}");
    assert_eq!((sum("input_tokens"), sum("output_tokens")), (input, output));
    assert!(rows.iter().all(|r| r["status"] == 200 && r["path"] == "/v1/messages"));
    // The tool call was seen in the stream.
    let calls: Vec<&Value> = rows.iter().flat_map(|r| r["tool_calls"].as_array().into_iter().flatten()).collect();
    assert!(calls.iter().any(|c| c["name"] == "Bash" && c["input"].as_str().is_some_and(|i| i.contains("metered"))));
    // The usage report carries the same metered totals, priced.
    let report = server.get("/api/v1/usage", &alice).await;
    assert_eq!(report.body["metered"]["requests"].as_u64(), Some(upstream.len() as u64), "{report:?}");
    assert_eq!(report.body["metered"]["usage"]["input_tokens"].as_u64(), Some(input));
    assert!(report.body["metered"]["usage"]["total_cost_usd"].as_f64().is_some_and(|c| c > 0.0));
    // And the metrics.
    let metrics = server.request(reqwest::Method::GET, "/metrics", None).send().await.expect("metrics");
    let text = metrics.text().await.expect("text");
    assert!(text.contains(&format!("cah_model_tokens_total{{kind=\"input\"}} {input}")), "{text}");
    assert!(text.contains(&format!("cah_model_requests_total {}", upstream.len())), "{text}");
    assert!(text.contains("cah_turns_total{outcome=\"ok\"} 2"), "{text}");
}

#[tokio::test]
async fn a_spent_budget_stops_the_next_model_request_with_a_clear_error() {
    let mock = MockModel::start().await.expect("mock");
    // One turn (about 12k input tokens at the default opus price) costs more.
    let server = start(&mock, ServerConfig::default().yaml("model_proxy:\n  user_budget_usd: 0.01\n")).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let first = server.chat(&alice, &session, "hello").await;
    assert_eq!(first.body["is_error"], false, "{first:?}");
    let asked = mock.message_requests().len();
    let second = server.chat(&alice, &session, "and again").await;
    assert_eq!(second.status, StatusCode::OK, "{second:?}");
    assert_eq!(second.body["is_error"], true, "{second:?}");
    assert!(second.body["text"].as_str().is_some_and(|t| t.contains("Budget exhausted")), "{second:?}");
    assert_eq!(mock.message_requests().len(), asked, "the refused request reached the model");
    // Another user has their own budget.
    let bob = server.user_with_token("bob").await;
    let bobs = server.session(&bob, json!({})).await;
    assert_eq!(server.chat(&bob, &bobs, "hi").await.body["is_error"], false);
}

#[tokio::test]
async fn a_rate_limit_answers_429_with_retry_after() {
    let mock = MockModel::start().await.expect("mock");
    let server = start(&mock, ServerConfig::default().yaml("model_proxy:\n  requests_per_minute: 2\n")).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let (base_url, credential) = session_model_credential(&session).await;
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..3 {
        let response = direct_request(&base_url, &credential, "mock:reply ok", false).await;
        statuses.push(response.status());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(response);
            break;
        }
    }
    assert_eq!(statuses.first(), Some(&StatusCode::OK), "{statuses:?}");
    let limited = limited.unwrap_or_else(|| panic!("no 429 within 3 requests: {statuses:?}"));
    let retry_after: u64 = limited.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((1..=60).contains(&retry_after));
    let body: Value = limited.json().await.expect("json");
    assert_eq!(body["error"]["type"], "rate_limit_error");
}

/// (event name, data without the ids that differ per response).
fn sse_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let event = block.lines().find_map(|l| l.strip_prefix("event:")).unwrap_or_default().trim().to_owned();
            let mut data: Value = block
                .lines()
                .find_map(|l| l.strip_prefix("data:"))
                .map_or(Value::Null, |d| serde_json::from_str(d.trim()).expect("json data"));
            if let Some(message) = data.get_mut("message") {
                message["id"] = Value::Null;
            }
            (event, data)
        })
        .collect()
}

#[tokio::test]
async fn streams_pass_through_the_proxy_event_for_event() {
    let mock = MockModel::start().await.expect("mock");
    let server = start(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let (base_url, credential) = session_model_credential(&session).await;
    let script = "mock:slow 20 6\nmock:reply one two three four five six\nmock:tool Read {\"file_path\": \"x\"}";
    let proxied = direct_request(&base_url, &credential, script, true).await;
    assert!(proxied.headers()["content-type"].to_str().is_ok_and(|t| t.starts_with("text/event-stream")));
    let proxied = proxied.text().await.expect("body");
    let direct = direct_request(&mock.base_url(), "direct", script, true).await.text().await.expect("body");
    let (proxied, direct) = (sse_events(&proxied), sse_events(&direct));
    assert!(proxied.len() > 10, "{proxied:?}");
    // Tool-use ids differ per response; everything else is the same, in order.
    let strip = |events: Vec<(String, Value)>| -> Vec<(String, Value)> {
        events
            .into_iter()
            .map(|(name, mut data)| {
                if let Some(block) = data.get_mut("content_block") {
                    block["id"] = Value::Null;
                }
                (name, data)
            })
            .collect()
    };
    assert_eq!(strip(proxied), strip(direct));
}
