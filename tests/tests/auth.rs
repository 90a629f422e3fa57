//! Authentication, roles and isolation between users, against the real binary.

use integration_tests::{Reply, ServerConfig, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn every_api_route_needs_a_valid_token() {
    let server = TestServer::start().await;
    let routes = [
        (Method::POST, "/api/v1/sessions"),
        (Method::GET, "/api/v1/sessions"),
        (Method::GET, "/api/v1/sessions/x"),
        (Method::DELETE, "/api/v1/sessions/x"),
        (Method::POST, "/api/v1/sessions/x/resume"),
        (Method::POST, "/api/v1/sessions/x/interrupt"),
        (Method::POST, "/api/v1/chat"),
        (Method::POST, "/api/v1/chat/stream"),
        (Method::GET, "/api/v1/usage"),
        (Method::POST, "/api/v1/users"),
        (Method::GET, "/api/v1/users"),
        (Method::GET, "/api/v1/users/admin"),
        (Method::DELETE, "/api/v1/users/admin"),
        (Method::POST, "/api/v1/users/admin/tokens"),
        (Method::GET, "/api/v1/users/admin/tokens"),
        (Method::DELETE, "/api/v1/tokens/x"),
        (Method::GET, "/api/v1/me"),
    ];
    for (method, path) in routes {
        for token in [None, Some("cah_not-a-real-token"), Some("")] {
            let mut request = server.request(method.clone(), path, None);
            if let Some(token) = token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            let reply = Reply::from(request.json(&json!({})).send().await).await;
            reply.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
            assert_eq!(reply.headers["www-authenticate"], "Bearer", "{method} {path}");
        }
    }
    let basic =
        Reply::from(server.request(Method::GET, "/api/v1/me", None).header("authorization", "Basic YTpi").send().await)
            .await;
    basic.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    // /health and / are public.
    assert_eq!(Reply::from(server.request(Method::GET, "/health", None).send().await).await.status, StatusCode::OK);
    assert_eq!(Reply::from(server.request(Method::GET, "/", None).send().await).await.status, StatusCode::OK);
}

#[tokio::test]
async fn users_only_see_their_own_sessions() {
    let server = TestServer::start().await;
    let alice = server.user_with_token("alice").await;
    let bob = server.user_with_token("bob").await;
    let alices = server.session(&alice, json!({})).await;
    let bobs = server.session(&bob, json!({})).await;

    // Another user's session id is 404, not 403, on every route.
    let path = format!("/api/v1/sessions/{alices}");
    server.get(&path, &bob).await.assert_error(StatusCode::NOT_FOUND, "not_found");
    server.delete(&path, &bob).await.assert_error(StatusCode::NOT_FOUND, "not_found");
    server.post(&format!("{path}/resume"), &bob, json!({})).await.assert_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(server.get(&path, &alice).await.status, StatusCode::OK, "bob's delete did nothing");

    assert_eq!(server.get("/api/v1/sessions", &alice).await.body, json!([alices]));
    assert_eq!(server.get("/api/v1/sessions", &bob).await.body, json!([bobs]));
    server.get("/api/v1/sessions?user_id=alice", &bob).await.assert_error(StatusCode::FORBIDDEN, "forbidden");

    // The seed's user_id field must be the caller for a user token.
    let reply = server.post("/api/v1/sessions", &bob, json!({"user_id": "alice"})).await;
    reply.assert_error(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(server.post("/api/v1/sessions", &bob, json!({"user_id": "bob"})).await.status, StatusCode::CREATED);

    // Admins see and act for everyone.
    let admin = &server.admin_token;
    assert_eq!(server.get(&path, admin).await.status, StatusCode::OK);
    let all = server.get("/api/v1/sessions", admin).await.body;
    assert_eq!(all.as_array().expect("array").len(), 3);
    assert_eq!(server.get("/api/v1/sessions?user_id=alice", admin).await.body, json!([alices]));
    let for_carol = server.post("/api/v1/sessions", admin, json!({"user_id": "carol"})).await;
    assert_eq!(for_carol.status, StatusCode::CREATED, "{for_carol:?}");
    assert_eq!(for_carol.body["user_id"], "carol");
}

#[tokio::test]
async fn admin_endpoints_manage_users_and_tokens() {
    let server = TestServer::start().await;
    let admin = server.admin_token.clone();
    let created = server.post("/api/v1/users", &admin, json!({"user_id": "alice"})).await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(created.body["role"], "user");
    server
        .post("/api/v1/users", &admin, json!({"user_id": "alice"}))
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    server
        .post("/api/v1/users", &admin, json!({"user_id": "bad name"}))
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    let missing = server.post("/api/v1/users", &admin, json!({})).await;
    missing.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    assert_eq!(missing.body["detail"][0]["type"], "missing");
    assert_eq!(missing.error_loc(), json!(["body", "user_id"]));
    server
        .post("/api/v1/users", &admin, json!({"user_id": "x", "role": "root"}))
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");

    let users = server.get("/api/v1/users", &admin).await.body;
    let names: Vec<&str> = users.as_array().expect("array").iter().filter_map(|u| u["user_id"].as_str()).collect();
    assert_eq!(names, ["admin", "alice"]);

    let token =
        server.post("/api/v1/users/alice/tokens", &admin, json!({"label": "laptop", "expires_in_days": 30})).await;
    assert_eq!(token.status, StatusCode::CREATED);
    let secret = token.body["token"].as_str().expect("secret").to_owned();
    assert!(secret.len() >= 43, "at least 32 random bytes");
    assert!(token.body["expires_at"].is_string());
    let token_id = token.body["token_id"].as_str().expect("id").to_owned();
    server
        .post("/api/v1/users/nobody/tokens", &admin, json!({}))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    server
        .post("/api/v1/users/alice/tokens", &admin, json!({"expires_in_days": 0}))
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");

    // The new token works and sees itself; listings never include secrets.
    let me = server.get("/api/v1/me", &secret).await;
    assert_eq!(me.body["user_id"], "alice");
    let listed = server.get("/api/v1/users/alice/tokens", &secret).await;
    assert_eq!(listed.status, StatusCode::OK);
    assert!(!listed.text.contains(&secret));
    assert!(!listed.text.contains("token_hash"));
    assert_eq!(listed.body[0]["label"], "laptop");

    // Users cannot use admin endpoints.
    server.get("/api/v1/users", &secret).await.assert_error(StatusCode::FORBIDDEN, "forbidden");
    server
        .post("/api/v1/users", &secret, json!({"user_id": "eve"}))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    server
        .post("/api/v1/users/alice/tokens", &secret, json!({}))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    server.delete("/api/v1/users/admin", &secret).await.assert_error(StatusCode::FORBIDDEN, "forbidden");
    server.get("/api/v1/users/admin", &secret).await.assert_error(StatusCode::NOT_FOUND, "not_found");

    // Revoked tokens stop working at once.
    assert_eq!(server.delete(&format!("/api/v1/tokens/{token_id}"), &admin).await.status, StatusCode::NO_CONTENT);
    server.get("/api/v1/me", &secret).await.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    server.delete(&format!("/api/v1/tokens/{token_id}"), &admin).await.assert_error(StatusCode::NOT_FOUND, "not_found");

    // Deleting a user revokes their tokens and deletes their sessions.
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    assert_eq!(server.delete("/api/v1/users/alice", &admin).await.status, StatusCode::NO_CONTENT);
    server.get("/api/v1/me", &alice).await.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    server.get(&format!("/api/v1/sessions/{session}"), &admin).await.assert_error(StatusCode::NOT_FOUND, "not_found");
    server.delete("/api/v1/users/alice", &admin).await.assert_error(StatusCode::NOT_FOUND, "not_found");
    // The last admin stays.
    server.delete("/api/v1/users/admin", &admin).await.assert_error(StatusCode::CONFLICT, "conflict");
}

#[tokio::test]
async fn users_revoke_their_own_tokens_but_not_others() {
    let server = TestServer::start().await;
    let alice = server.user_with_token("alice").await;
    let bob = server.user_with_token("bob").await;
    let alice_tokens = server.get("/api/v1/users/alice/tokens", &alice).await.body;
    let alice_token_id = alice_tokens[0]["token_id"].as_str().expect("id").to_owned();
    server.get("/api/v1/users/alice/tokens", &bob).await.assert_error(StatusCode::NOT_FOUND, "not_found");
    server
        .delete(&format!("/api/v1/tokens/{alice_token_id}"), &bob)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(server.get("/api/v1/me", &alice).await.status, StatusCode::OK);
    assert_eq!(server.delete(&format!("/api/v1/tokens/{alice_token_id}"), &alice).await.status, StatusCode::NO_CONTENT);
    server.get("/api/v1/me", &alice).await.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test]
async fn first_start_prints_a_generated_admin_token_once() {
    let server = TestServer::start_with(ServerConfig { admin_token: false, ..Default::default() }).await;
    let log = server.log();
    let token = log
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("cah_"))
        .unwrap_or_else(|| panic!("no generated token in stderr:\n{log}"))
        .to_owned();
    let me = server.get("/api/v1/me", &token).await;
    assert_eq!(me.body["role"], "admin", "{me:?}");
    // A restart does not print a new one, and the old one keeps working.
    let server = server.restart().await;
    assert!(!server.log().contains("cah_"), "{}", server.log());
    assert_eq!(server.get("/api/v1/me", &token).await.status, StatusCode::OK);
}

#[tokio::test]
async fn configured_admin_token_rotates() {
    let mut server = TestServer::start().await;
    let old = server.admin_token.clone();
    let new_token = format!("rotated-admin-token-{}", uuid::Uuid::new_v4().simple());
    server.config.admin_token = false;
    server.config = server.config.clone().env("CLAUDE_AGENT_ADMIN_TOKEN", new_token.clone());
    let server = server.restart().await;
    assert_eq!(server.get("/api/v1/me", &new_token).await.status, StatusCode::OK);
    server.get("/api/v1/me", &old).await.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test]
async fn header_mode_trusts_only_configured_proxies() {
    let trusted =
        ServerConfig::default().yaml("auth:\n  mode: header\n  trusted_proxies: [127.0.0.1]\n  admin_users: [boss]\n");
    let server = TestServer::start_with(trusted).await;
    let as_user =
        |name: &'static str| server.request(Method::GET, "/api/v1/me", None).header("x-forwarded-user", name).send();
    let alice = Reply::from(as_user("alice").await).await;
    assert_eq!(alice.status, StatusCode::OK, "{alice:?}");
    assert_eq!(alice.body["user_id"], "alice");
    assert_eq!(alice.body["role"], "user");
    assert_eq!(Reply::from(as_user("boss").await).await.body["role"], "admin");
    Reply::from(as_user("../etc").await).await.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    Reply::from(server.request(Method::GET, "/api/v1/me", None).send().await)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    // Sessions are per header user.
    let created = Reply::from(
        server
            .request(Method::POST, "/api/v1/sessions", None)
            .header("x-forwarded-user", "alice")
            .json(&json!({}))
            .send()
            .await,
    )
    .await;
    assert_eq!(created.body["user_id"], "alice");

    // The same header from an address that is not a trusted proxy is ignored.
    let untrusted = ServerConfig::default().yaml("auth:\n  mode: header\n  trusted_proxies: [192.0.2.1]\n");
    let server = TestServer::start_with(untrusted).await;
    let reply =
        Reply::from(server.request(Method::GET, "/api/v1/me", None).header("x-forwarded-user", "alice").send().await)
            .await;
    reply.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test]
async fn auth_none_serves_seed_clients_without_tokens_on_loopback() {
    let server = TestServer::start_with(ServerConfig::default().yaml("auth:\n  mode: none\n")).await;
    let created = Reply::from(
        server.request(Method::POST, "/api/v1/sessions", None).json(&json!({"user_id": "dev"})).send().await,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    assert!(server.log().contains("auth.mode is `none`"), "a warning at start");
}

#[tokio::test]
async fn requests_per_second_per_user_answer_429_with_retry_after() {
    let server =
        TestServer::start_with(ServerConfig::default().env("CLAUDE_AGENT_API__REQUESTS_PER_SECOND_PER_USER", "2"))
            .await;
    let alice = server.user_with_token("alice").await;
    // A burst of 10 passes, then alice is limited; bob is not.
    let mut statuses = Vec::new();
    for _ in 0..15 {
        statuses.push(server.get("/api/v1/me", &alice).await.status);
    }
    assert!(statuses[..10].iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
    let limited = server.get("/api/v1/me", &alice).await;
    limited.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(limited.headers.get("retry-after").is_some());
    let bob = server.user_with_token("bob").await;
    assert_eq!(server.get("/api/v1/me", &bob).await.status, StatusCode::OK);
    // The bucket refills at 2 per second.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(server.get("/api/v1/me", &alice).await.status, StatusCode::OK);
}
