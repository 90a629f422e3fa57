//! The sessions API against the real binary: seed-compatible shapes,
//! validation, path safety, limits, TTL, persistence, on every backend.

use integration_tests::{Backend, ServerConfig, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// The whole life of a session, run on each backend.
async fn session_lifecycle(backend: Backend) {
    let server = TestServer::start_with(ServerConfig::backend(backend)).await;
    let alice = server.user_with_token("alice").await;

    let created = server
        .post("/api/v1/sessions", &alice, json!({"user_id": "alice", "subdir": "proj/api", "metadata": {"k": "v"}}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let id = created.body["session_id"].as_str().expect("id").to_owned();
    assert_eq!(created.headers["location"], format!("/api/v1/sessions/{id}").as_str());
    let body = &created.body;
    assert_eq!(body["user_id"], "alice");
    assert_eq!(body["subdir"], "proj/api");
    assert_eq!(body["status"], "active");
    assert_eq!(body["message_count"], 0);
    assert_eq!(body["metadata"], json!({"k": "v"}));
    // Seed defaults copied into the session's options.
    assert_eq!(body["options"]["permission_mode"], "bypassPermissions");
    assert_eq!(body["options"]["max_turns"], 50);
    // Timezone-aware timestamps.
    let created_at = body["created_at"].as_str().expect("created_at");
    assert!(created_at.ends_with('Z') || created_at.ends_with("+00:00"), "{created_at}");
    let cwd = body["cwd"].as_str().expect("cwd");
    assert!(cwd.ends_with("/alice/proj/api"), "{cwd}");
    assert!(std::path::Path::new(cwd).is_dir(), "the session directory is created");

    let fetched = server.get(&format!("/api/v1/sessions/{id}"), &alice).await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(fetched.body["session_id"], id.as_str());

    let listed = server.get("/api/v1/sessions", &alice).await;
    assert_eq!(listed.body, json!([id]), "the seed's array of ids");

    let resumed = server.post(&format!("/api/v1/sessions/{id}/resume"), &alice, json!({})).await;
    assert_eq!(resumed.status, StatusCode::OK);
    assert_eq!(resumed.body["message_count"], 0, "resume does not count as a message (seed bug)");

    let deleted = server.delete(&format!("/api/v1/sessions/{id}"), &alice).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert!(deleted.text.is_empty());
    // A deleted session stays deleted everywhere.
    server.get(&format!("/api/v1/sessions/{id}"), &alice).await.assert_error(StatusCode::NOT_FOUND, "not_found");
    server.delete(&format!("/api/v1/sessions/{id}"), &alice).await.assert_error(StatusCode::NOT_FOUND, "not_found");
    server
        .post(&format!("/api/v1/sessions/{id}/resume"), &alice, json!({}))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(server.get("/api/v1/sessions?status=all", &alice).await.body, json!([]));
    assert!(std::path::Path::new(cwd).is_dir(), "delete keeps the directory");
}

#[tokio::test]
async fn session_lifecycle_on_memory() {
    session_lifecycle(Backend::Memory).await;
}

#[tokio::test]
async fn session_lifecycle_on_sqlite() {
    session_lifecycle(Backend::Sqlite).await;
}

#[tokio::test]
async fn session_lifecycle_on_postgres() {
    session_lifecycle(Backend::Postgres).await;
}

/// Sessions, users and tokens survive a restart on the persistent backends.
async fn survives_restart(backend: Backend) {
    let server = TestServer::start_with(ServerConfig::backend(backend)).await;
    let alice = server.user_with_token("alice").await;
    let id = server.session(&alice, json!({"system_prompt": "be brief"})).await;
    let server = server.restart().await;
    let fetched = server.get(&format!("/api/v1/sessions/{id}"), &alice).await;
    assert_eq!(fetched.status, StatusCode::OK, "{fetched:?}");
    assert_eq!(fetched.body["options"]["system_prompt"], "be brief");
}

#[tokio::test]
async fn survives_restart_on_sqlite() {
    survives_restart(Backend::Sqlite).await;
}

#[tokio::test]
async fn survives_restart_on_postgres() {
    survives_restart(Backend::Postgres).await;
}

#[tokio::test]
async fn session_options_override_defaults() {
    let server = TestServer::start().await;
    let alice = server.user_with_token("alice").await;
    let body = json!({
        "system_prompt": "You review code.",
        "permission_mode": "plan",
        "allowed_tools": ["Read"],
        "disallowed_tools": ["Bash"],
        "model": "claude-test-1",
        "max_turns": 3,
        "max_budget_usd": 0.5,
        "mcp_servers": {"fs": {"command": "mcp-fs", "args": []}},
        "plugins": [{"type": "local", "path": "./p"}]
    });
    let reply = server.post("/api/v1/sessions", &alice, body.clone()).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
    for key in body.as_object().expect("object").keys() {
        assert_eq!(reply.body["options"][key], body[key], "option {key}");
    }
}

#[tokio::test]
async fn invalid_options_are_422_naming_the_field() {
    let server = TestServer::start().await;
    let alice = server.user_with_token("alice").await;
    let cases = [
        (json!({"permission_mode": "yolo"}), "permission_mode"),
        (json!({"max_turns": 0}), "max_turns"),
        (json!({"max_turns": 100_000_000_000u64}), "max_turns"),
        (json!({"max_turns": -1}), "max_turns"),
        (json!({"max_budget_usd": -5}), "max_budget_usd"),
        (json!({"max_budget_usd": 0}), "max_budget_usd"),
        (json!({"max_turns": "many"}), "max_turns"),
        (json!({"allowed_tools": "Bash"}), "allowed_tools"),
        (json!({"mcp_servers": {"x": 1}}), "mcp_servers"),
        (json!({"mcp_servers": {"x": {"args": ["a"]}}}), "mcp_servers"),
        (json!({"mcp_servers": {"x": {"type": "http"}}}), "mcp_servers"),
        (json!({"mcp_servers": {"x": {"type": "http", "url": "ftp://h"}}}), "mcp_servers"),
        (json!({"mcp_servers": {"x": {"type": "ws", "url": "http://h"}}}), "mcp_servers"),
        (json!({"mcp_servers": {"x": {"command": "c", "args": "a b"}}}), "mcp_servers"),
        (json!({"mcp_servers": {"x": {"command": "c", "env": {"A": 1}}}}), "mcp_servers"),
        (json!({"mcp_servers": {"x": {"command": "c", "cmd": "typo"}}}), "mcp_servers"),
        (json!({"plugins": [{"type": "remote", "path": "p"}]}), "plugins"),
        (json!({"plugins": [{"type": "local", "path": "../other-user"}]}), "plugins"),
        (json!({"plugins": [{"type": "local", "path": "/etc"}]}), "plugins"),
        (json!({"plugins": [{"type": "local"}]}), "plugins"),
        (json!({"metadata": [1, 2]}), "metadata"),
        (json!({"model": "has space"}), "model"),
        (json!({"metadata": {"k": "nul\u{0}byte"}}), "metadata"),
        (json!({"mcp_servers": {"x": {"command": "a\u{0}"}}}), "mcp_servers"),
        (json!({"nmae": "typo"}), "nmae"),
    ];
    for (body, field) in cases {
        let reply = server.post("/api/v1/sessions", &alice, body.clone()).await;
        reply.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
        assert_eq!(reply.error_loc()[0], "body", "{body}: {reply:?}");
        assert_eq!(reply.error_loc()[1], field, "{body}: {reply:?}");
        assert!(reply.body["detail"][0]["msg"].is_string());
        assert!(reply.body["detail"][0]["type"].is_string());
    }
    let extra = server.post("/api/v1/sessions", &alice, json!({"nmae": 1})).await;
    assert_eq!(extra.body["detail"][0]["type"], "extra_forbidden");
}

#[tokio::test]
async fn bad_paths_are_400_naming_the_field() {
    let server = TestServer::start().await;
    let alice = server.user_with_token("alice").await;
    let cases = [
        (json!({"subdir": "../bob"}), "subdir"),
        (json!({"subdir": "a/../../bob"}), "subdir"),
        (json!({"subdir": ".."}), "subdir"),
        (json!({"subdir": "/etc"}), "subdir"),
        (json!({"subdir": "a\u{0}b"}), "subdir"),
        (json!({"subdir": "a//b"}), "subdir"),
        (json!({"subdir": "x".repeat(201)}), "subdir"),
        (json!({"subdir": "sp ace"}), "subdir"),
        (json!({"user_id": "a".repeat(65)}), "user_id"),
        (json!({"user_id": "al\u{0}ice"}), "user_id"),
        (json!({"user_id": "../alice"}), "user_id"),
    ];
    let admin = server.admin_token.clone();
    for (body, field) in cases {
        // user_id cases as admin, so the 403 for another user does not mask
        // the path check.
        let token = if field == "user_id" { &admin } else { &alice };
        let reply = server.post("/api/v1/sessions", token, body.clone()).await;
        reply.assert_error(StatusCode::BAD_REQUEST, "invalid_path");
        assert_eq!(reply.body["field"], field, "{body}: {reply:?}");
        assert!(reply.body["detail"].as_str().expect("detail").starts_with(field), "{reply:?}");
    }
    assert!(!server.users_dir().join("bob").exists());
}

#[tokio::test]
async fn symlinks_leading_out_are_refused() {
    let server = TestServer::start().await;
    let alice = server.user_with_token("alice").await;
    server.session(&alice, json!({})).await;
    let outside = server.dir.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    std::os::unix::fs::symlink(&outside, server.users_dir().join("alice/escape")).expect("symlink");
    let reply = server.post("/api/v1/sessions", &alice, json!({"subdir": "escape/inner"})).await;
    reply.assert_error(StatusCode::BAD_REQUEST, "invalid_path");
    assert_eq!(reply.body["field"], "subdir");
    assert!(!outside.join("inner").exists(), "nothing created through the symlink");
    // A file where a directory is expected.
    std::fs::write(server.users_dir().join("alice/file"), b"x").expect("write");
    let reply = server.post("/api/v1/sessions", &alice, json!({"subdir": "file"})).await;
    reply.assert_error(StatusCode::BAD_REQUEST, "invalid_path");
}

#[tokio::test]
async fn missing_directory_without_auto_create_is_400() {
    let config = ServerConfig::default().env("CLAUDE_AGENT_USER_AUTO_CREATE_DIR", "false");
    let server = TestServer::start_with(config).await;
    std::fs::create_dir_all(server.users_dir()).expect("base dir");
    let alice = server.user_with_token("alice").await;
    let reply = server.post("/api/v1/sessions", &alice, json!({})).await;
    reply.assert_error(StatusCode::BAD_REQUEST, "invalid_path");
    assert!(!server.users_dir().join("alice").exists());
    std::fs::create_dir(server.users_dir().join("alice")).expect("mkdir");
    server.session(&alice, json!({})).await;
}

#[tokio::test]
async fn malformed_bodies_are_clear_4xx() {
    let server = TestServer::start().await;
    let alice = server.user_with_token("alice").await;
    let raw = |body: &'static [u8], content_type: &'static str| {
        server
            .request(Method::POST, "/api/v1/sessions", Some(&alice))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let invalid_json = integration_tests::Reply::from(raw(b"{\"user_id\": ", "application/json").await).await;
    invalid_json.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    assert_eq!(invalid_json.body["detail"][0]["type"], "json_invalid");
    let invalid_utf8 =
        integration_tests::Reply::from(raw(b"{\"subdir\": \"\xff\xfe\"}", "application/json").await).await;
    invalid_utf8.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    let not_object = integration_tests::Reply::from(raw(b"[1,2]", "application/json").await).await;
    not_object.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    let wrong_type =
        integration_tests::Reply::from(raw(b"user_id=alice", "application/x-www-form-urlencoded").await).await;
    wrong_type.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    let nested = "[".repeat(10_000) + &"]".repeat(10_000);
    let deep = integration_tests::Reply::from(
        server
            .request(Method::POST, "/api/v1/sessions", Some(&alice))
            .header("content-type", "application/json")
            .body(nested)
            .send()
            .await,
    )
    .await;
    deep.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    // The server is still fine.
    server.session(&alice, json!({})).await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    // A small limit (through a nested env name), so the whole request is
    // read before the server answers.
    let server = TestServer::start_with(ServerConfig::default().env("CLAUDE_AGENT_API__MAX_BODY_BYTES", "2048")).await;
    let alice = server.user_with_token("alice").await;
    let big = json!({"metadata": {"blob": "x".repeat(4096)}});
    let reply = server.post("/api/v1/sessions", &alice, big).await;
    reply.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert!(reply.body["detail"].as_str().expect("detail").contains("2048"));
    server.session(&alice, json!({"metadata": {"blob": "x".repeat(1024)}})).await;
}

#[tokio::test]
async fn listing_paginates_with_cursors() {
    let server = TestServer::start().await;
    let alice = server.user_with_token("alice").await;
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(server.session(&alice, json!({})).await);
    }
    // Newest first.
    created.reverse();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/sessions?detail=true&limit=2&cursor={c}"),
            None => "/api/v1/sessions?detail=true&limit=2".to_owned(),
        };
        let page = server.get(&path, &alice).await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        let items = page.body["items"].as_array().expect("items");
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|s| s["session_id"].as_str().expect("id").to_owned()));
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, created);
    // The plain array form paginates too, with the cursor in a header.
    let first = server.get("/api/v1/sessions?limit=3", &alice).await;
    assert_eq!(first.body.as_array().expect("array").len(), 3);
    let next = first.headers["x-next-cursor"].to_str().expect("cursor").to_owned();
    let rest = server.get(&format!("/api/v1/sessions?limit=3&cursor={next}"), &alice).await;
    assert_eq!(rest.body.as_array().expect("array").len(), 2);
    assert!(rest.headers.get("x-next-cursor").is_none());
    // Bad query values.
    for query in ["limit=0", "limit=5000", "limit=abc", "cursor=zzz", "status=bogus", "detail=maybe"] {
        let reply = server.get(&format!("/api/v1/sessions?{query}"), &alice).await;
        reply.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
        assert_eq!(reply.error_loc()[0], "query", "{query}: {reply:?}");
    }
}

#[tokio::test]
async fn session_limits_answer_429_and_503_not_500() {
    let config =
        ServerConfig::default().env("CLAUDE_AGENT_MAX_SESSIONS_PER_USER", "2").env("CLAUDE_AGENT_MAX_SESSIONS", "3");
    let server = TestServer::start_with(config).await;
    let alice = server.user_with_token("alice").await;
    let bob = server.user_with_token("bob").await;
    let first = server.session(&alice, json!({})).await;
    server.session(&alice, json!({})).await;
    let over = server.post("/api/v1/sessions", &alice, json!({})).await;
    over.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(over.headers.contains_key("retry-after"));
    server.session(&bob, json!({})).await;
    let full = server.post("/api/v1/sessions", &bob, json!({})).await;
    full.assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(full.headers.contains_key("retry-after"));
    // Deleting frees a slot.
    server.delete(&format!("/api/v1/sessions/{first}"), &alice).await;
    server.session(&bob, json!({})).await;
}

#[tokio::test]
async fn concurrent_creates_respect_the_per_user_limit() {
    let server = TestServer::start_with(ServerConfig::default().env("CLAUDE_AGENT_MAX_SESSIONS_PER_USER", "3")).await;
    let alice = server.user_with_token("alice").await;
    let replies = futures::future::join_all((0..12).map(|_| server.post("/api/v1/sessions", &alice, json!({})))).await;
    let created = replies.iter().filter(|r| r.status == StatusCode::CREATED).count();
    let refused = replies.iter().filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!((created, refused), (3, 9));
}

#[tokio::test]
async fn memory_limit_refuses_new_sessions_with_503() {
    let server = TestServer::start_with(ServerConfig::default().env("CLAUDE_AGENT_MEMORY_LIMIT_MB", "1")).await;
    let alice = server.user_with_token("alice").await;
    let reply = server.post("/api/v1/sessions", &alice, json!({})).await;
    reply.assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(reply.body["detail"].as_str().expect("detail").contains("memory"));
}

#[tokio::test]
async fn idle_sessions_expire_after_the_ttl_and_resume_reopens_them() {
    let server = TestServer::start_with(ServerConfig::default().env("CLAUDE_AGENT_SESSION_TTL", "1")).await;
    let alice = server.user_with_token("alice").await;
    let id = server.session(&alice, json!({})).await;
    // The reaper runs every second; wait until it has seen the session idle.
    let mut expired = Value::Null;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        expired = server.get("/api/v1/sessions?status=expired", &alice).await.body;
        if expired == json!([id]) {
            break;
        }
    }
    assert_eq!(expired, json!([id]), "the reaper marked the session expired");
    assert_eq!(server.get("/api/v1/sessions", &alice).await.body, json!([]), "not listed as active");
    let fetched = server.get(&format!("/api/v1/sessions/{id}"), &alice).await;
    assert_eq!(fetched.body["status"], "expired");
    let resumed = server.post(&format!("/api/v1/sessions/{id}/resume"), &alice, json!({})).await;
    assert_eq!(resumed.status, StatusCode::OK);
    assert_eq!(resumed.body["status"], "active");
    assert!(server.log().contains("sessions expired"));
}

#[tokio::test]
async fn unknown_and_malformed_session_ids_are_404() {
    let server = TestServer::start().await;
    let alice = server.user_with_token("alice").await;
    for id in ["00000000-0000-0000-0000-000000000000", "..", "a.b", &"x".repeat(300)] {
        let path = format!("/api/v1/sessions/{id}");
        let reply = server.get(&path, &alice).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{id}: {reply:?}");
    }
}
