//! Chat end to end: the real server, the real Claude CLI inside the user's
//! confined worker, and the mock of the remote model.

use std::time::{Duration, Instant};

use integration_tests::{ServerConfig, TestServer, read_sse, wait_for_model_request};
use mock_model::{MockModel, MockServer};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A server whose sessions run the real CLI against `mock`.
async fn server_with_cli(mock: &MockServer, extra: ServerConfig) -> TestServer {
    TestServer::start_with(extra.with_cli(mock)).await
}

#[tokio::test]
async fn a_text_turn_and_a_second_turn_that_remembers_the_first() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;

    let first = server.chat(&alice, &session, "hello there").await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}\n{}", server.log());
    assert_eq!(first.body["text"], "echo: hello there");
    assert_eq!(first.body["is_error"], false);
    assert_eq!(first.body["subtype"], "success");
    assert!(first.body["messages"].as_array().is_some_and(|m| m.iter().any(|x| x["type"] == "assistant")));

    let second = server.chat(&alice, &session, "mock:reply second").await;
    assert_eq!(second.body["text"], "second", "{second:?}");
    // The model saw the first turn in the second request.
    let last = mock.message_requests().pop().expect("a request");
    let texts: Vec<String> = last.messages.iter().map(|m| m.text.clone()).collect();
    assert!(texts.iter().any(|t| t.contains("hello there")), "{texts:?}");

    let stored = server.get(&format!("/api/v1/sessions/{session}"), &alice).await;
    assert_eq!(stored.body["message_count"], 2);
    let output_tokens = stored.body["usage"]["output_tokens"].as_i64().unwrap_or(0);
    assert!(output_tokens > 0, "{stored:?}");

    // Usage per user: own, or anyone's for admins; never another user's.
    let usage = server.get("/api/v1/usage", &alice).await;
    assert_eq!(usage.status, StatusCode::OK, "{usage:?}");
    assert_eq!(usage.body["turns"], 2);
    assert_eq!(usage.body["total"]["output_tokens"], output_tokens);
    assert_eq!(usage.body["sessions"][0]["session_id"], session.as_str());
    let bob = server.user_with_token("bob").await;
    server.get("/api/v1/usage?user_id=alice", &bob).await.assert_error(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(server.get("/api/v1/usage", &bob).await.body["turns"], 0);
    let by_admin = server.get("/api/v1/usage?user_id=alice", &server.admin_token).await;
    assert_eq!(by_admin.body["total"]["output_tokens"], output_tokens);
}

#[tokio::test]
async fn tools_run_inside_the_users_directory_only() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let bob = server.user_with_token("bob").await;
    server.session(&bob, json!({})).await;
    let secret = server.users_dir().join("bob/secret.txt");
    std::fs::write(&secret, "bob's secret").expect("secret");
    let session = server.session(&alice, json!({"subdir": "work"})).await;

    let bash = server
        .chat(&alice, &session, r#"mock:tool Bash {"command": "echo made-by-bash > made.txt && cat made.txt"}"#)
        .await;
    assert_eq!(bash.status, StatusCode::OK, "{bash:?}");
    assert_eq!(bash.body["tool_calls"][0]["tool"], "Bash", "{bash:?}");
    assert!(bash.body["text"].as_str().unwrap_or("").contains("made-by-bash"), "{bash:?}");
    let made = server.users_dir().join("alice/work/made.txt");
    assert_eq!(std::fs::read_to_string(&made).expect("the file exists in alice's dir").trim(), "made-by-bash");

    let read = format!(r#"mock:tool Read {{"file_path": "{}"}}"#, secret.display());
    let denied = server.chat(&alice, &session, &read).await;
    assert_eq!(denied.status, StatusCode::OK, "{denied:?}");
    let text = denied.body["text"].as_str().unwrap_or("");
    assert!(text.contains("(error)") && !text.contains("bob's secret"), "{text}");

    let cat = format!(r#"mock:tool Bash {{"command": "cat {}"}}"#, secret.display());
    let denied = server.chat(&alice, &session, &cat).await;
    let text = denied.body["text"].as_str().unwrap_or("");
    assert!(!text.contains("bob's secret") && text.contains("Permission denied"), "{text}");
}

#[tokio::test]
async fn sse_streams_text_as_it_is_produced_with_ids_and_a_final_done() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let response = server
        .request(Method::POST, "/api/v1/chat/stream", Some(&alice))
        .json(&json!({"session_id": session, "message": "mock:slow 150 8\nmock:reply one two three four five six seven eight"}))
        .send()
        .await
        .expect("stream");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events: Vec<(String, Value, Duration)> = read_sse(response, |_| false)
        .await
        .into_iter()
        .map(|e| (e.id.clone().unwrap_or_default(), e.data, e.at))
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|(_, e, _)| e["type"].as_str()).collect();
    assert_eq!(kinds.last(), Some(&"done"), "{kinds:?}");
    assert!(kinds.contains(&"result"), "{kinds:?}");
    let deltas: Vec<&(String, Value, Duration)> = events.iter().filter(|(_, e, _)| e["type"] == "text_delta").collect();
    assert!(deltas.len() >= 4, "incremental deltas: {kinds:?}");
    let text: String = deltas.iter().filter_map(|(_, e, _)| e["text"].as_str()).collect();
    assert_eq!(text, "one two three four five six seven eight");
    // The first words arrived well before the last.
    assert!(deltas.last().expect("last").2 - deltas[0].2 >= Duration::from_millis(600), "not incremental");
    // Ids increase by one without gaps; every frame has the seed's keys.
    let first: u64 = events[0].0.parse().expect("numeric id");
    for (i, (id, frame, _)) in events.iter().enumerate() {
        assert_eq!(id, &(first + i as u64).to_string());
        for key in ["type", "text", "tool_name", "tool_input", "error"] {
            assert!(frame.get(key).is_some(), "{frame}");
        }
    }
}

#[tokio::test]
async fn a_second_turn_while_one_runs_is_429_and_interrupt_ends_it() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let slow = server.spawn_chat(&alice, json!({"session_id": session, "message": "mock:slow 500 40\nmock:reply a long slow answer that takes twenty seconds to stream out"}));
    // Wait until the model is really streaming the slow reply (the CLI may
    // still be starting on a loaded machine).
    let streaming = wait_for_model_request(&mock, "mock:slow 500 40", Duration::from_secs(30)).await;
    assert!(streaming, "the slow turn never reached the model\n{}", server.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy = server.chat(&alice, &session, "hello").await;
    busy.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert_eq!(busy.body["detail"], "Session is busy processing another request");

    let started = Instant::now();
    let interrupted = server.post(&format!("/api/v1/sessions/{session}/interrupt"), &alice, json!({})).await;
    assert_eq!(interrupted.status, StatusCode::ACCEPTED, "{interrupted:?}");
    let reply = slow.await.expect("slow turn");
    assert!(started.elapsed() < Duration::from_secs(3), "the turn ended {:?} after the interrupt", started.elapsed());
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body["is_error"], true);
    // The session stays usable.
    // (The CLI prefixes its own "[Request interrupted by user]" note.)
    let after = server.chat(&alice, &session, "still there?").await;
    assert_eq!(after.body["is_error"], false, "{after:?}");
    assert!(after.body["text"].as_str().is_some_and(|t| t.ends_with("still there?")), "{after:?}");
}

#[tokio::test]
async fn chat_on_unknown_deleted_or_foreign_sessions_is_404_and_bad_bodies_422() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let bob = server.user_with_token("bob").await;
    let session = server.session(&alice, json!({})).await;
    server.chat(&bob, &session, "hi").await.assert_error(StatusCode::NOT_FOUND, "not_found");
    let stream = server.post("/api/v1/chat/stream", &bob, json!({"session_id": session, "message": "hi"})).await;
    stream.assert_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(server.delete(&format!("/api/v1/sessions/{session}"), &alice).await.status, StatusCode::NO_CONTENT);
    let gone = server.chat(&alice, &session, "hi").await;
    gone.assert_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(gone.body["detail"], "Session not found or expired");
    for body in [
        json!({"session_id": "x", "message": ""}),
        json!({"session_id": "x", "message": "   "}),
        json!({"session_id": "x/../y", "message": "hi"}),
        json!({"session_id": "x", "message": "hi", "timeout": 0}),
        json!({"session_id": "x", "message": "hi", "timeout": 601}),
        json!({"message": "hi"}),
    ] {
        server
            .post("/api/v1/chat", &alice, body)
            .await
            .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    }
}

#[tokio::test]
async fn model_errors_end_as_an_error_result_and_the_cli_retries_429() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let retried = server.chat(&alice, &session, "mock:fail 429 2 retry-after=0\nmock:reply finally").await;
    assert_eq!(retried.body["text"], "finally", "{retried:?}");
    assert_eq!(retried.body["is_error"], false);
}

#[tokio::test]
async fn conversations_resume_after_a_server_restart() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let first = server.chat(&alice, &session, "remember the word pineapple").await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let server = server.restart().await;
    let second = server.chat(&alice, &session, "mock:reply ok").await;
    assert_eq!(second.status, StatusCode::OK, "{second:?}\n{}", server.log());
    let last = mock.message_requests().pop().expect("request");
    assert!(last.messages.iter().any(|m| m.text.contains("pineapple")), "the resumed CLI lost the first turn");
}

#[tokio::test]
async fn session_options_reach_the_cli() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let options = json!({
        "system_prompt": "You are the option-test assistant.",
        "model": "claude-option-test",
        "disallowed_tools": ["Bash"],
    });
    let session = server.session(&alice, options).await;
    let reply = server.chat(&alice, &session, r#"mock:tool Bash {"command": "touch bash-ran"}"#).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let requests = mock.message_requests();
    let first = requests.iter().find(|r| r.last_user_text.as_deref().is_some_and(|t| t.contains("bash-ran")));
    let first = first.expect("the turn reached the model");
    assert_eq!(first.model.as_deref(), Some("claude-option-test"));
    assert!(first.system.as_deref().is_some_and(|s| s.contains("option-test assistant")), "{:?}", first.system);
    // A disallowed tool does not run.
    assert!(!server.users_dir().join("alice/bash-ran").exists(), "a disallowed Bash ran");

    // A budget the first turn exceeds: the CLI stops with its budget subtype.
    let capped = server.session(&alice, json!({"max_budget_usd": 0.000001})).await;
    let first = server.chat(&alice, &capped, "hello").await;
    let second = server.chat(&alice, &capped, "again").await;
    let subtypes = [first.body["subtype"].clone(), second.body["subtype"].clone()];
    assert!(subtypes.iter().any(|s| s == "error_max_budget_usd"), "{first:?}\n{second:?}");
}

#[tokio::test]
async fn setting_sources_choose_the_settings_files_the_cli_reads() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    // The same rule (no Bash) in a project's shared settings and in another
    // project's local settings; by default (`[user, project]`) the CLI reads
    // the first only.
    let deny_bash = r#"{"permissions": {"deny": ["Bash"]}}"#;
    for (subdir, file) in [("shared", "settings.json"), ("local", "settings.local.json")] {
        let dir = server.users_dir().join("alice").join(subdir).join(".claude");
        std::fs::create_dir_all(&dir).expect("settings dir");
        std::fs::write(dir.join(file), deny_bash).expect("settings");
        // Written as root: the user's uid must be able to create files in it.
        let project = dir.parent().expect("project dir");
        std::fs::set_permissions(project, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    }
    let ran = |subdir: &str| server.users_dir().join("alice").join(subdir).join("bash-ran").exists();
    for subdir in ["shared", "local"] {
        let session = server.session(&alice, json!({"subdir": subdir})).await;
        let reply = server.chat(&alice, &session, r#"mock:tool Bash {"command": "touch bash-ran"}"#).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    assert!(!ran("shared"), "the project's settings.json was not read: Bash ran");
    assert!(ran("local"), "settings.local.json was read although `local` is not a setting source");
}
