//! Hostile input the fuzzer (scripts/fuzz-api.sh) does not generate, against
//! the real binary: oversized bodies and headers, invalid UTF-8, NUL bytes and
//! `..` in names and ids, 10,000-level nested JSON, unknown fields,
//! out-of-range numbers, wrong content types, bad tokens and other users'
//! session ids. Every case answers a JSON error with `detail` (hyper's own
//! refusal of oversized headers excepted: it has no body), never a 5xx, and
//! the server is still alive and healthy afterwards.

use integration_tests::{Backend, Reply, ServerConfig, TestServer};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Every route that takes a JSON body, with a body it would accept for
/// `alice` (the session id is filled in by [`body_routes`]).
fn body_routes(session: &str) -> Vec<(Method, &'static str, Value)> {
    vec![
        (Method::POST, "/api/v1/sessions", json!({"subdir": "ok"})),
        (Method::POST, "/api/v1/chat", json!({"session_id": session, "message": "hi", "timeout": 1})),
        (Method::POST, "/api/v1/chat/stream", json!({"session_id": session, "message": "hi", "timeout": 1})),
        (Method::POST, "/api/v1/users", json!({"user_id": "carol"})),
        (Method::POST, "/api/v1/users/alice/tokens", json!({"label": "x"})),
        (Method::PUT, "/api/v1/users/alice/allowed-domains", json!({"allowed_domains": ["example.com"]})),
    ]
}

/// Every route about one session, as `(method, path)` for `id`.
fn session_routes(id: &str) -> Vec<(Method, String)> {
    vec![
        (Method::GET, format!("/api/v1/sessions/{id}")),
        (Method::DELETE, format!("/api/v1/sessions/{id}")),
        (Method::POST, format!("/api/v1/sessions/{id}/resume")),
        (Method::POST, format!("/api/v1/sessions/{id}/interrupt")),
        (Method::GET, format!("/api/v1/sessions/{id}/stream")),
        (Method::GET, format!("/api/v1/sessions/{id}/messages")),
    ]
}

/// Sends `body` as is with `content_type` (none if `None`).
async fn raw(
    server: &TestServer,
    method: Method,
    path: &str,
    token: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> Reply {
    let mut request = server.request(method, path, Some(token)).body(body);
    if let Some(content_type) = content_type {
        request = request.header(CONTENT_TYPE, content_type);
    }
    Reply::from(request.send().await).await
}

/// A request with `body` as JSON.
async fn send(server: &TestServer, method: Method, path: &str, token: &str, body: &Value) -> Reply {
    Reply::from(server.request(method, path, Some(token)).json(body).send().await).await
}

/// The server process is running (not gone, not a zombie) and answers
/// `GET /health` with 200 on a new connection.
async fn assert_healthy(server: &TestServer) {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", server.pid)).unwrap_or_default();
    let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()).unwrap_or("gone");
    assert!(!matches!(state, "Z" | "X" | "gone"), "the server process is {state}\n{}", server.log());
    // On a new connection: one a client left mid-body cannot be reused.
    let fresh = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30)).build().expect("client");
    let health = Reply::from(fresh.get(server.url("/health")).send().await).await;
    assert_eq!(health.status, StatusCode::OK, "{health:?}\n{}", server.log());
    assert_eq!(health.body["status"], "healthy");
}

/// `reply` is the JSON error `status`/`code` with a `detail`, and the server
/// is healthy after it.
async fn assert_refused(server: &TestServer, reply: &Reply, status: StatusCode, code: &str, what: &str) {
    assert_eq!(reply.status, status, "{what}: {reply:?}");
    reply.assert_error(status, code);
    let content_type = reply.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(content_type.starts_with("application/json"), "{what}: {content_type:?}");
    assert_healthy(server).await;
}

/// A 422 whose first error has pydantic's `type` `kind` at `loc`.
async fn assert_invalid(server: &TestServer, reply: &Reply, kind: &str, loc: Option<Value>, what: &str) {
    assert_refused(server, reply, StatusCode::UNPROCESSABLE_ENTITY, "validation_error", what).await;
    assert_eq!(reply.body["detail"][0]["type"], kind, "{what}: {reply:?}");
    if let Some(loc) = loc {
        assert_eq!(reply.error_loc(), loc, "{what}: {reply:?}");
    }
}

/// A server with alice (who has a session) and bob.
async fn server_with_users(config: ServerConfig) -> (TestServer, String, String, String) {
    let server = TestServer::start_with(config).await;
    let alice = server.user_with_token("alice").await;
    let bob = server.user_with_token("bob").await;
    let session = server.session(&alice, json!({})).await;
    (server, alice, bob, session)
}

/// Sends a body over the limit until a response arrives: the server answers
/// 413 without reading all of it and closes the connection, and the unread
/// rest makes the kernel reset it, which can reach the client before the
/// response (a client error, not an answer of the server). Each retry is a
/// new connection.
async fn over_limit(server: &TestServer, method: Method, path: &str, token: &str, chunked: bool) -> Reply {
    let mut body = json!({"padding": "x".repeat(16 * 1024)}).to_string().into_bytes();
    for _ in 0..20 {
        let request = server.request(method.clone(), path, Some(token)).header(CONTENT_TYPE, "application/json");
        let request = if chunked {
            // No Content-Length: the limit must hold while reading.
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body.chunks(1024).map(|c| Ok(c.to_vec())).collect();
            request.body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        } else {
            request.body(body.clone())
        };
        match request.send().await {
            Ok(response) => return Reply::from(Ok(response)).await,
            Err(error) => assert!(error.is_request() && !error.is_status(), "{path}: {error}"),
        }
        body.push(b' ');
    }
    panic!("{path}: no response in 20 attempts\n{}", server.log());
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_on_every_body_route() {
    let config = ServerConfig::default().env("CLAUDE_AGENT_API__MAX_BODY_BYTES", "4096");
    let (server, alice, _, session) = server_with_users(config).await;
    for (method, path, _) in body_routes(&session) {
        for chunked in [false, true] {
            let reply = over_limit(&server, method.clone(), path, &alice, chunked).await;
            let what = format!("{path} (chunked: {chunked})");
            assert_refused(&server, &reply, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", &what).await;
            assert!(reply.body["detail"].as_str().is_some_and(|d| d.contains("4096")), "{reply:?}");
        }
    }
    // Just under the limit is fine.
    let fits = json!({"metadata": {"pad": "x".repeat(3000)}});
    assert_eq!(send(&server, Method::POST, "/api/v1/sessions", &alice, &fits).await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_body_far_over_the_default_limit_is_413() {
    let (server, alice, _, _) = server_with_users(ServerConfig::default()).await;
    // 4 MiB against the default 1 MiB: refused from its Content-Length,
    // before it is read (the client, still sending, may only see the
    // connection reset: then it tries again).
    let body = json!({"metadata": {"pad": "x".repeat(4 << 20)}}).to_string();
    for attempt in 0.. {
        let request =
            server.request(Method::POST, "/api/v1/sessions", Some(&alice)).header(CONTENT_TYPE, "application/json");
        match request.body(body.clone()).send().await {
            Ok(response) => {
                let reply = Reply::from(Ok(response)).await;
                assert_refused(&server, &reply, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "4 MiB").await;
                break;
            }
            Err(error) => {
                assert!(error.is_request() && attempt < 20, "{error}");
                assert_healthy(&server).await;
            }
        }
    }
}

#[tokio::test]
async fn oversized_headers_are_refused_without_a_5xx() {
    let (server, alice, _, _) = server_with_users(ServerConfig::default()).await;
    // hyper refuses a header section over its buffer (~400 KiB) or with more
    // than 100 headers itself, with 431 and no body (there is no JSON to give
    // at that point); a client still sending may see the connection close.
    let huge = "a".repeat(512 * 1024);
    let many: Vec<(String, String)> = (0..200).map(|i| (format!("x-filler-{i}"), "v".to_owned())).collect();
    let cases: Vec<(&str, Vec<(String, String)>)> =
        vec![("one 512 KiB header", vec![("x-huge".to_owned(), huge.clone())]), ("200 headers", many)];
    for (what, headers) in cases {
        let mut request = server.request(Method::GET, "/api/v1/me", Some(&alice));
        for (name, value) in &headers {
            request = request.header(name, value);
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status();
                assert!(
                    status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE || status == StatusCode::BAD_REQUEST,
                    "{what}: {status}"
                );
            }
            Err(error) => assert!(!error.is_status(), "{what}: {error}"),
        }
        assert_healthy(&server).await;
    }
    // A long Authorization header within hyper's limits is just a bad token.
    let long_token = format!("Bearer {}", "t".repeat(64 * 1024));
    let reply =
        Reply::from(server.request(Method::GET, "/api/v1/me", None).header(AUTHORIZATION, long_token).send().await)
            .await;
    assert_refused(&server, &reply, StatusCode::UNAUTHORIZED, "unauthorized", "64 KiB token").await;
    // A long header of no meaning to the API is ignored.
    let ok = server.request(Method::GET, "/api/v1/me", Some(&alice)).header("x-long", "a".repeat(64 * 1024));
    assert_eq!(Reply::from(ok.send().await).await.status, StatusCode::OK);
}

#[tokio::test]
async fn invalid_utf8_in_bodies_paths_and_headers_is_a_client_error() {
    let (server, alice, _, session) = server_with_users(ServerConfig::default()).await;
    for (method, path, _) in body_routes(&session) {
        for body in [&b"{\"subdir\": \"\xff\xfe\"}"[..], b"\xef\xbb\xbf{}", b"{\"\xc0\x80\": 1}"] {
            let reply = raw(&server, method.clone(), path, &alice, Some("application/json"), body.to_vec()).await;
            assert_invalid(&server, &reply, "json_invalid", None, &format!("{path} {body:?}")).await;
        }
    }
    // Path ids that are not UTF-8 once decoded: 404 like any unknown id (was
    // axum's plain-text 400).
    let mut paths: Vec<(Method, String)> = session_routes("%FF%FE");
    paths.extend(session_routes("a%C0%80b"));
    paths.extend([
        (Method::GET, "/api/v1/users/%FF".to_owned()),
        (Method::DELETE, "/api/v1/users/%FF".to_owned()),
        (Method::GET, "/api/v1/users/%FF/tokens".to_owned()),
        (Method::POST, "/api/v1/users/%FF/tokens".to_owned()),
        (Method::PUT, "/api/v1/users/%FF/allowed-domains".to_owned()),
        (Method::DELETE, "/api/v1/tokens/%FF".to_owned()),
    ]);
    for (method, path) in paths {
        let reply = send(&server, method.clone(), &path, &alice, &json!({"allowed_domains": null})).await;
        assert_refused(&server, &reply, StatusCode::NOT_FOUND, "not_found", &format!("{method} {path}")).await;
    }
    // Header values that are not UTF-8.
    let bad_bearer = HeaderValue::from_bytes(b"Bearer \xff\xfe").expect("opaque header bytes");
    let reply =
        Reply::from(server.request(Method::GET, "/api/v1/me", None).header(AUTHORIZATION, bad_bearer).send().await)
            .await;
    assert_refused(&server, &reply, StatusCode::UNAUTHORIZED, "unauthorized", "non-UTF-8 bearer").await;
    let bad_type = HeaderValue::from_bytes(b"application/\xffjson").expect("opaque header bytes");
    let reply = Reply::from(
        server
            .request(Method::POST, "/api/v1/sessions", Some(&alice))
            .header(CONTENT_TYPE, bad_type)
            .body("{}")
            .send()
            .await,
    )
    .await;
    assert_refused(&server, &reply, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "content type").await;
    let last_event = HeaderValue::from_bytes(b"\xff").expect("opaque header bytes");
    let reply = Reply::from(
        server
            .request(Method::GET, &format!("/api/v1/sessions/{session}/stream"), Some(&alice))
            .header("last-event-id", last_event)
            .send()
            .await,
    )
    .await;
    assert_invalid(&server, &reply, "int_parsing", Some(json!(["header", "Last-Event-ID"])), "Last-Event-ID").await;
    // Query values that are not UTF-8 where a number is expected.
    let reply = server.get("/api/v1/sessions?limit=%FF", &alice).await;
    assert_invalid(&server, &reply, "query_invalid", None, "limit=%FF").await;
}

/// NUL in every kind of path id and query value: 404 / 422 on both SQL
/// backends (PostgreSQL cannot store NUL in text: these were 500s).
async fn nul_in_paths_and_queries(backend: Backend) {
    let (server, alice, _, _) = server_with_users(ServerConfig::backend(backend)).await;
    let admin = server.admin_token.clone();
    let mut paths = session_routes("a%00b");
    paths.extend([
        (Method::GET, "/api/v1/users/a%00b".to_owned()),
        (Method::DELETE, "/api/v1/users/a%00b".to_owned()),
        (Method::GET, "/api/v1/users/a%00b/tokens".to_owned()),
        (Method::POST, "/api/v1/users/a%00b/tokens".to_owned()),
        (Method::PUT, "/api/v1/users/a%00b/allowed-domains".to_owned()),
        (Method::DELETE, "/api/v1/tokens/a%00b".to_owned()),
        (Method::GET, "/api/v1/users/%00".to_owned()),
    ]);
    for (method, path) in paths {
        for token in [&admin, &alice] {
            let reply = send(&server, method.clone(), &path, token, &json!({"allowed_domains": null})).await;
            assert_refused(&server, &reply, StatusCode::NOT_FOUND, "not_found", &format!("{method} {path}")).await;
        }
    }
    for query in [
        "/api/v1/sessions?user_id=a%00b",
        "/api/v1/sessions?status=%00",
        "/api/v1/sessions?cursor=%00",
        "/api/v1/usage?user_id=a%00b",
        "/api/v1/audit/model-requests?user_id=a%00b",
        "/api/v1/audit/model-requests?session_id=a%00b",
        "/api/v1/audit/egress?user_id=a%00b",
        "/api/v1/audit/egress?session_id=%00",
    ] {
        let reply = server.get(query, &admin).await;
        assert_invalid(&server, &reply, "value_error", Some(json!(["query"])), query).await;
    }
    // Still everything works.
    assert_eq!(server.get("/api/v1/users/alice", &admin).await.status, StatusCode::OK);
}

#[tokio::test]
async fn nul_in_paths_and_queries_sqlite() {
    nul_in_paths_and_queries(Backend::Sqlite).await;
}

#[tokio::test]
async fn nul_in_paths_and_queries_postgres() {
    nul_in_paths_and_queries(Backend::Postgres).await;
}

/// NUL in every name and text field of the bodies: refused before the store.
async fn nul_in_bodies(backend: Backend) {
    let (server, alice, _, session) = server_with_users(ServerConfig::backend(backend)).await;
    let admin = server.admin_token.clone();
    let unprocessable = [
        ("/api/v1/users", json!({"user_id": "car\u{0}ol"}), "user_id"),
        ("/api/v1/users/alice/tokens", json!({"label": "lap\u{0}top"}), "label"),
        ("/api/v1/sessions", json!({"metadata": {"k\u{0}": "v"}}), "metadata"),
        ("/api/v1/sessions", json!({"metadata": {"k": ["v\u{0}"]}}), "metadata"),
        ("/api/v1/sessions", json!({"system_prompt": "be\u{0}nice"}), "system_prompt"),
        ("/api/v1/sessions", json!({"model": "claude\u{0}"}), "model"),
        ("/api/v1/sessions", json!({"permission_mode": "plan\u{0}"}), "permission_mode"),
        ("/api/v1/sessions", json!({"allowed_tools": ["Bash\u{0}"]}), "allowed_tools"),
        ("/api/v1/sessions", json!({"disallowed_tools": ["\u{0}"]}), "disallowed_tools"),
        ("/api/v1/sessions", json!({"mcp_servers": {"fs\u{0}": {"command": "x"}}}), "mcp_servers"),
        ("/api/v1/sessions", json!({"mcp_servers": {"fs": {"command": "x\u{0}"}}}), "mcp_servers"),
        ("/api/v1/sessions", json!({"plugins": [{"type": "local", "path": "p\u{0}"}]}), "plugins"),
        ("/api/v1/chat", json!({"session_id": "a\u{0}b", "message": "hi"}), "session_id"),
        ("/api/v1/chat/stream", json!({"session_id": "a\u{0}b", "message": "hi"}), "session_id"),
    ];
    for (path, body, field) in unprocessable {
        let reply = server.post(path, &admin, body.clone()).await;
        assert_refused(&server, &reply, StatusCode::UNPROCESSABLE_ENTITY, "validation_error", path).await;
        assert_eq!(reply.error_loc()[1], field, "{body}: {reply:?}");
    }
    let domains = json!({"allowed_domains": ["exa\u{0}mple.com"]});
    let reply = send(&server, Method::PUT, "/api/v1/users/alice/allowed-domains", &admin, &domains).await;
    assert_invalid(&server, &reply, "value_error", Some(json!(["body", "allowed_domains", 0])), "domain").await;
    // Names that become paths: 400 naming the field.
    for (body, field) in [(json!({"subdir": "a\u{0}b"}), "subdir"), (json!({"user_id": "al\u{0}ice"}), "user_id")] {
        let reply = server.post("/api/v1/sessions", &admin, body).await;
        assert_refused(&server, &reply, StatusCode::BAD_REQUEST, "invalid_path", field).await;
        assert_eq!(reply.body["field"], field);
    }
    // A NUL in a chat message is just text: the turn is attempted (the probe
    // CLI never answers, so it times out) and nothing fails in the store.
    let body = json!({"session_id": session, "message": "a\u{0}b", "timeout": 1});
    let reply = server.post("/api/v1/chat", &alice, body).await;
    assert_refused(&server, &reply, StatusCode::GATEWAY_TIMEOUT, "timeout", "NUL in a message").await;
    let history = server.get(&format!("/api/v1/sessions/{session}/messages"), &alice).await;
    assert_eq!(history.status, StatusCode::OK, "{history:?}");
    assert_eq!(history.body["messages"][0]["content"]["message"]["content"], "a\u{0}b", "{history:?}");
}

#[tokio::test]
async fn nul_in_bodies_sqlite() {
    nul_in_bodies(Backend::Sqlite).await;
}

#[tokio::test]
async fn nul_in_bodies_postgres() {
    nul_in_bodies(Backend::Postgres).await;
}

#[tokio::test]
async fn dot_dot_in_names_and_ids_never_leaves_a_directory() {
    let (server, alice, _, _) = server_with_users(ServerConfig::default()).await;
    let admin = server.admin_token.clone();
    for subdir in ["..", "../bob", "a/../../bob", "a/..", "./a", "/etc", "a//b", "..\\bob", "%2e%2e/bob"] {
        let reply = server.post("/api/v1/sessions", &alice, json!({"subdir": subdir})).await;
        assert_refused(&server, &reply, StatusCode::BAD_REQUEST, "invalid_path", subdir).await;
        assert_eq!(reply.body["field"], "subdir");
    }
    for user_id in ["..", "../bob", ".", "a/b", "a\\b"] {
        let reply = server.post("/api/v1/sessions", &admin, json!({"user_id": user_id})).await;
        assert_refused(&server, &reply, StatusCode::BAD_REQUEST, "invalid_path", user_id).await;
        assert_eq!(reply.body["field"], "user_id");
        let reply = server.post("/api/v1/users", &admin, json!({"user_id": user_id})).await;
        assert_invalid(&server, &reply, "string_pattern_mismatch", Some(json!(["body", "user_id"])), user_id).await;
        let chat = json!({"session_id": user_id, "message": "hi"});
        let reply = server.post("/api/v1/chat", &alice, chat).await;
        assert_invalid(&server, &reply, "string_pattern_mismatch", Some(json!(["body", "session_id"])), user_id).await;
    }
    for path in ["../x", "a/../../x", "/abs"] {
        let body = json!({"plugins": [{"type": "local", "path": path}]});
        let reply = server.post("/api/v1/sessions", &alice, body).await;
        assert_invalid(&server, &reply, "value_error", Some(json!(["body", "plugins", 0])), path).await;
    }
    // `..` in path ids, encoded so the client does not resolve it: never
    // another resource (here: never the user `admin` or alice's sessions).
    // (A bare `..` or `%2E%2E` segment is resolved by the client itself.)
    let mut paths = session_routes("..%2F..%2Fetc%2Fpasswd");
    paths.extend(session_routes("..%2F"));
    paths.extend([
        (Method::GET, "/api/v1/users/...".to_owned()),
        (Method::GET, "/api/v1/users/..%2Fadmin".to_owned()),
        (Method::GET, "/api/v1/users/alice%2F..%2Fadmin/tokens".to_owned()),
        (Method::DELETE, "/api/v1/users/..%2Fadmin".to_owned()),
        (Method::DELETE, "/api/v1/tokens/..%2F..".to_owned()),
    ]);
    for (method, path) in paths {
        let reply = send(&server, method.clone(), &path, &admin, &json!({})).await;
        assert_refused(&server, &reply, StatusCode::NOT_FOUND, "not_found", &format!("{method} {path}")).await;
    }
    // Nothing was created outside the users' own directories.
    let mut entries: Vec<String> = std::fs::read_dir(server.users_dir())
        .expect("users dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert!(entries.iter().all(|e| e == "alice" || e == "bob"), "{entries:?}");
    assert!(!server.dir.path().join("bob").exists() && !server.dir.path().join("x").exists());
    assert_eq!(server.get("/api/v1/users/admin", &admin).await.status, StatusCode::OK);
}

#[tokio::test]
async fn ten_thousand_levels_of_nesting_are_a_422_not_a_crash() {
    let (server, alice, _, session) = server_with_users(ServerConfig::default()).await;
    let admin = server.admin_token.clone();
    let arrays = "[".repeat(10_000) + &"]".repeat(10_000);
    let objects = "{\"a\":".repeat(10_000) + "1" + &"}".repeat(10_000);
    let in_metadata = format!("{{\"metadata\": {objects}}}");
    let unclosed = "[".repeat(10_000);
    for (method, path, _) in body_routes(&session) {
        for body in [&arrays, &objects, &in_metadata, &unclosed] {
            let reply = raw(&server, method.clone(), path, &admin, Some("application/json"), body.clone()).await;
            assert_invalid(&server, &reply, "json_invalid", None, path).await;
            assert!(reply.body["detail"][0]["msg"].as_str().is_some_and(|m| m.contains("JSON")), "{reply:?}");
        }
    }
    // Nesting the parser accepts (it stops at 128 levels) is stored and read
    // back whole.
    let mut deep = json!("bottom");
    for _ in 0..120 {
        deep = json!({"a": deep});
    }
    let reply = server.post("/api/v1/sessions", &alice, json!({"metadata": {"deep": deep}})).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
    let id = reply.body["session_id"].as_str().expect("id");
    let fetched = server.get(&format!("/api/v1/sessions/{id}"), &alice).await;
    assert_eq!(fetched.status, StatusCode::OK, "{fetched:?}");
    assert_eq!(fetched.body["metadata"]["deep"], deep);
    assert_eq!(server.get("/api/v1/sessions?detail=true", &alice).await.status, StatusCode::OK);
    assert_healthy(&server).await;
}

#[tokio::test]
async fn unknown_fields_and_parameters_are_422() {
    let (server, alice, _, session) = server_with_users(ServerConfig::default()).await;
    let admin = server.admin_token.clone();
    for (method, path, mut body) in body_routes(&session) {
        body["bogus"] = json!(1);
        let reply = send(&server, method, path, &admin, &body).await;
        assert_invalid(&server, &reply, "extra_forbidden", Some(json!(["body", "bogus"])), path).await;
    }
    // Misspelled, nested and differently cased names are unknown too.
    for body in [json!({"subDir": "x"}), json!({"max_turn": 5}), json!({"MaxTurns": 5}), json!({"user_id ": "alice"})] {
        let reply = server.post("/api/v1/sessions", &alice, body.clone()).await;
        assert_invalid(&server, &reply, "extra_forbidden", None, &body.to_string()).await;
    }
    for query in [
        "/api/v1/sessions?bogus=1",
        "/api/v1/usage?bogus=1",
        "/api/v1/audit/model-requests?bogus=1",
        "/api/v1/audit/egress?bogus=1",
        &format!("/api/v1/sessions/{session}/messages?bogus=1"),
        &format!("/api/v1/sessions/{session}/stream?bogus=1"),
    ] {
        let reply = server.get(query, &admin).await;
        assert_invalid(&server, &reply, "query_invalid", Some(json!(["query"])), query).await;
    }
}

#[tokio::test]
async fn out_of_range_numbers_are_422() {
    let (server, alice, _, session) = server_with_users(ServerConfig::default()).await;
    let admin = server.admin_token.clone();
    // (route, body, loc[1], pydantic type); `json_invalid` when the number
    // does not fit any JSON number the parser takes.
    let cases = [
        ("/api/v1/sessions", json!({"max_turns": 0}), "value_error"),
        ("/api/v1/sessions", json!({"max_turns": 10_001}), "value_error"),
        ("/api/v1/sessions", json!({"max_turns": 4_294_967_296_u64}), "type_error"),
        ("/api/v1/sessions", json!({"max_turns": u64::MAX}), "type_error"),
        ("/api/v1/sessions", json!({"max_turns": -1}), "type_error"),
        ("/api/v1/sessions", json!({"max_turns": 1.5}), "type_error"),
        ("/api/v1/sessions", json!({"max_turns": "5"}), "type_error"),
        ("/api/v1/sessions", json!({"max_budget_usd": -1}), "value_error"),
        ("/api/v1/sessions", json!({"max_budget_usd": -0.000_001}), "value_error"),
        ("/api/v1/sessions", json!({"max_budget_usd": 0}), "value_error"),
        ("/api/v1/sessions", json!({"max_budget_usd": 1e300}), "value_error"),
        ("/api/v1/sessions", json!({"max_budget_usd": "1"}), "type_error"),
        ("/api/v1/chat", json!({"session_id": session, "message": "hi", "timeout": 0}), "value_error"),
        ("/api/v1/chat", json!({"session_id": session, "message": "hi", "timeout": 601}), "value_error"),
        ("/api/v1/chat", json!({"session_id": session, "message": "hi", "timeout": -5}), "type_error"),
        ("/api/v1/chat", json!({"session_id": session, "message": "hi", "timeout": 1e20}), "type_error"),
        ("/api/v1/chat/stream", json!({"session_id": session, "message": "hi", "timeout": u64::MAX}), "value_error"),
        ("/api/v1/users/alice/tokens", json!({"expires_in_days": 0}), "value_error"),
        ("/api/v1/users/alice/tokens", json!({"expires_in_days": 3651}), "value_error"),
        ("/api/v1/users/alice/tokens", json!({"expires_in_days": 1e12}), "type_error"),
    ];
    for (path, body, kind) in cases {
        let reply = server.post(path, &admin, body.clone()).await;
        assert_invalid(&server, &reply, kind, None, &body.to_string()).await;
        let field = body.as_object().and_then(|o| o.keys().find(|k| *k != "session_id" && *k != "message")).cloned();
        assert_eq!(reply.error_loc()[1], field.as_deref().unwrap_or(""), "{body}: {reply:?}");
    }
    // Numbers beyond f64: the parser refuses them.
    for text in ["{\"max_budget_usd\": 1e400}", "{\"max_turns\": 1e400}", "{\"max_budget_usd\": -1e400}"] {
        let reply = raw(&server, Method::POST, "/api/v1/sessions", &alice, Some("application/json"), text).await;
        assert_invalid(&server, &reply, "json_invalid", None, text).await;
    }
    for query in [
        "/api/v1/sessions?limit=0",
        "/api/v1/sessions?limit=1001",
        "/api/v1/sessions?limit=99999999999999999999",
        "/api/v1/sessions?limit=-1",
        "/api/v1/audit/model-requests?limit=0",
        "/api/v1/audit/egress?limit=100000",
        &format!("/api/v1/sessions/{session}/messages?limit=501"),
        &format!("/api/v1/sessions/{session}/messages?after=-1"),
        &format!("/api/v1/sessions/{session}/stream?last_event_id=-1"),
        &format!("/api/v1/sessions/{session}/stream?last_event_id=18446744073709551616"),
    ] {
        let reply = server.get(query, &admin).await;
        assert_refused(&server, &reply, StatusCode::UNPROCESSABLE_ENTITY, "validation_error", query).await;
        assert_eq!(reply.error_loc()[0], "query", "{query}: {reply:?}");
    }
    // The largest values that are allowed are accepted.
    let biggest = json!({"max_turns": 10_000, "max_budget_usd": 1_000_000.0});
    let reply = server.post("/api/v1/sessions", &alice, biggest).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
    assert_eq!(reply.body["options"]["max_turns"], 10_000);
}

#[tokio::test]
async fn wrong_content_types_are_415() {
    let (server, alice, _, session) = server_with_users(ServerConfig::default()).await;
    let admin = server.admin_token.clone();
    for (method, path, body) in body_routes(&session) {
        for content_type in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/xml",
            "application/jsonp",
            "json",
            "",
        ] {
            let reply = raw(&server, method.clone(), path, &admin, Some(content_type), body.to_string()).await;
            let what = format!("{path} as {content_type:?}");
            assert_refused(&server, &reply, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", &what).await;
        }
    }
    // JSON with parameters, in any case, and `+json` types are JSON.
    for content_type in ["application/json; charset=utf-8", "Application/JSON", "application/merge-patch+json"] {
        let reply =
            raw(&server, Method::POST, "/api/v1/sessions", &alice, Some(content_type), "{\"subdir\": \"ct\"}").await;
        assert_eq!(reply.status, StatusCode::CREATED, "{content_type}: {reply:?}");
    }
}

#[tokio::test]
async fn invalid_expired_and_revoked_tokens_are_401() {
    let (server, alice, _, session) = server_with_users(ServerConfig::default()).await;
    let admin = server.admin_token.clone();
    let check = |authorization: String, what: &'static str| unauthorized(&server, &session, authorization, what);
    check("Bearer".into(), "no secret").await;
    check("Bearer    ".into(), "blank secret").await;
    check(format!("Basic {alice}"), "another scheme").await;
    check(format!("Bearer {alice}x"), "altered token").await;
    check(format!("Bearer {}", &alice[..alice.len() - 1]), "truncated token").await;
    check(format!("Bearer {}", alice.to_uppercase()), "token in another case").await;
    check("Bearer cah_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(), "unknown token").await;
    check(format!("Bearer {}", "x".repeat(10_000)), "10 KB token").await;
    check(format!("Bearer {alice} {alice}"), "two tokens").await;

    // Expired: a token issued for a day whose expiry is moved to the past.
    let issued = server.post("/api/v1/users/alice/tokens", &admin, json!({"expires_in_days": 1})).await;
    assert_eq!(issued.status, StatusCode::CREATED, "{issued:?}");
    let expiring = issued.body["token"].as_str().expect("token").to_owned();
    assert_eq!(server.get("/api/v1/me", &expiring).await.status, StatusCode::OK);
    let db = server.dir.path().join("db/sessions.db");
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!("sqlite://{}", db.display()))
        .await
        .expect("open the server's database");
    let updated = sqlx::query("UPDATE api_tokens SET expires_at = $1 WHERE token_id = $2")
        .bind("2000-01-01T00:00:00+00:00")
        .bind(issued.body["token_id"].as_str().expect("token_id"))
        .execute(&mut conn)
        .await
        .expect("expire the token");
    assert_eq!(updated.rows_affected(), 1);
    drop(conn);
    check(format!("Bearer {expiring}"), "expired token").await;

    // Revoked: deleted through the API (by its owner).
    let issued = server.post("/api/v1/users/alice/tokens", &admin, json!({"label": "to revoke"})).await;
    let revoked = issued.body["token"].as_str().expect("token").to_owned();
    let token_id = issued.body["token_id"].as_str().expect("token_id");
    assert_eq!(server.delete(&format!("/api/v1/tokens/{token_id}"), &revoked).await.status, StatusCode::NO_CONTENT);
    check(format!("Bearer {revoked}"), "revoked token").await;

    // A deleted user's tokens.
    let dave = server.user_with_token("dave").await;
    assert_eq!(server.delete("/api/v1/users/dave", &admin).await.status, StatusCode::NO_CONTENT);
    check(format!("Bearer {dave}"), "deleted user's token").await;

    // The valid token still works, in either case of the scheme.
    let me = Reply::from(
        server.request(Method::GET, "/api/v1/me", None).header(AUTHORIZATION, format!("bearer {alice}")).send().await,
    )
    .await;
    assert_eq!(me.status, StatusCode::OK, "{me:?}");
}

/// `authorization` as the whole Authorization header gets 401 (with
/// `WWW-Authenticate: Bearer`) on a sample of routes.
async fn unauthorized(server: &TestServer, session: &str, authorization: String, what: &str) {
    let routes = [
        (Method::GET, "/api/v1/me".to_owned()),
        (Method::POST, "/api/v1/sessions".to_owned()),
        (Method::GET, format!("/api/v1/sessions/{session}")),
        (Method::DELETE, format!("/api/v1/sessions/{session}")),
        (Method::POST, "/api/v1/chat".to_owned()),
        (Method::GET, format!("/api/v1/sessions/{session}/stream")),
    ];
    for (method, path) in routes {
        let request = server.request(method.clone(), &path, None).header(AUTHORIZATION, &authorization);
        let reply = Reply::from(request.json(&json!({"session_id": session, "message": "hi"})).send().await).await;
        let what = format!("{what}: {method} {path}");
        assert_refused(server, &reply, StatusCode::UNAUTHORIZED, "unauthorized", &what).await;
        assert_eq!(reply.headers["www-authenticate"], "Bearer", "{what}");
    }
}

#[tokio::test]
async fn another_users_session_ids_are_404_on_every_session_route() {
    let (server, alice, bob, session) = server_with_users(ServerConfig::default()).await;
    let bobs_own = server.session(&bob, json!({})).await;
    for (method, path) in session_routes(&session) {
        let reply = send(&server, method.clone(), &path, &bob, &json!({})).await;
        assert_refused(&server, &reply, StatusCode::NOT_FOUND, "not_found", &format!("bob: {method} {path}")).await;
    }
    for path in ["/api/v1/chat", "/api/v1/chat/stream"] {
        for queue in [false, true] {
            let body = json!({"session_id": session, "message": "hi", "timeout": 5, "queue": queue});
            let reply = server.post(path, &bob, body).await;
            assert_refused(&server, &reply, StatusCode::NOT_FOUND, "not_found", &format!("bob: {path}")).await;
        }
    }
    // Also when asked with a Last-Event-ID, through the query or the header.
    let stream = format!("/api/v1/sessions/{session}/stream?last_event_id=0&follow=true");
    let reply = server.get(&stream, &bob).await;
    assert_refused(&server, &reply, StatusCode::NOT_FOUND, "not_found", "bob: stream with last_event_id").await;
    // The same answer as for an id that does not exist: nothing to probe.
    let unknown = server.get(&format!("/api/v1/sessions/{}", uuid::Uuid::new_v4()), &bob).await;
    let foreign = server.get(&format!("/api/v1/sessions/{session}"), &bob).await;
    let answer = |r: &Reply| (r.status, r.body["code"].clone(), r.body["detail"].clone());
    assert_eq!(answer(&unknown), answer(&foreign));
    // Nothing happened to alice's session, and bob's own still works.
    let mine = server.get(&format!("/api/v1/sessions/{session}"), &alice).await;
    assert_eq!((mine.status, mine.body["status"].as_str()), (StatusCode::OK, Some("active")), "{mine:?}");
    let listed = server.get("/api/v1/sessions", &alice).await;
    assert_eq!(listed.body, json!([session]));
    assert_eq!(server.get(&format!("/api/v1/sessions/{bobs_own}"), &bob).await.status, StatusCode::OK);
    // Nor may bob list alice's sessions or usage by naming her.
    for path in ["/api/v1/sessions?user_id=alice", "/api/v1/usage?user_id=alice"] {
        let reply = server.get(path, &bob).await;
        assert_refused(&server, &reply, StatusCode::FORBIDDEN, "forbidden", path).await;
    }
}
