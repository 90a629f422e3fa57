//! Admin side of the egress proxy over HTTP: a user's own domain allow-list
//! (`PUT /api/v1/users/{id}/allowed-domains`) and the egress audit log
//! (`GET /api/v1/audit/egress`). Real binary, every storage backend.

use integration_tests::{Backend, Reply, ServerConfig, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn put_domains(server: &TestServer, user_id: &str, token: &str, body: Value) -> Reply {
    let path = format!("/api/v1/users/{user_id}/allowed-domains");
    Reply::from(server.request(Method::PUT, &path, Some(token)).json(&body).send().await).await
}

/// The 422 errors' `(loc, input)` pairs.
fn errors(reply: &Reply) -> Vec<(Value, Value)> {
    reply.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    let detail = reply.body["detail"].as_array().unwrap_or_else(|| panic!("422 without a list: {reply:?}"));
    detail.iter().map(|e| (e["loc"].clone(), e["input"].clone())).collect()
}

/// Set, read back, refuse and reset a user's list on one backend.
async fn allowed_domains_round_trip(backend: Backend) {
    let server = TestServer::start_with(ServerConfig::backend(backend)).await;
    let admin = server.admin_token.clone();
    let alice = server.user_with_token("alice").await;
    let bob = server.user_with_token("bob").await;

    // A new user follows the global list: the field is there, null.
    let before = server.get("/api/v1/users/alice", &admin).await;
    assert_eq!(before.status, StatusCode::OK, "{before:?}");
    assert_eq!(before.body.get("allowed_domains"), Some(&Value::Null), "{before:?}");

    let list = json!(["example.com", "*.pypi.org", ".npmjs.org", "*", "xn--bcher-kva.example", "a-1.b2"]);
    let set = put_domains(&server, "alice", &admin, json!({"allowed_domains": list})).await;
    assert_eq!(set.status, StatusCode::OK, "{set:?}");
    assert_eq!(set.body["user_id"], "alice");
    assert_eq!(set.body["role"], "user");
    assert_eq!(set.body["allowed_domains"], list);
    assert_eq!(server.get("/api/v1/users/alice", &admin).await.body["allowed_domains"], list);
    // The user sees their own list; other users are untouched.
    assert_eq!(server.get("/api/v1/me", &alice).await.body["allowed_domains"], list);
    assert_eq!(server.get("/api/v1/users/bob", &admin).await.body["allowed_domains"], Value::Null);
    let listed = server.get("/api/v1/users", &admin).await;
    let alice_listed = listed.body.as_array().and_then(|users| users.iter().find(|u| u["user_id"] == "alice"));
    assert_eq!(alice_listed.map(|u| &u["allowed_domains"]), Some(&list), "{listed:?}");

    // Only admins may change a list, their own included.
    put_domains(&server, "alice", &alice, json!({"allowed_domains": ["evil.example"]}))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    put_domains(&server, "bob", &alice, json!({"allowed_domains": null}))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    put_domains(&server, "bob", &bob, json!({"allowed_domains": ["*"]}))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    // Unknown user.
    put_domains(&server, "nobody", &admin, json!({"allowed_domains": ["example.com"]}))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    put_domains(&server, "nobody", &admin, json!({"allowed_domains": null}))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    // An empty list is a list (nothing is reachable), not the global one.
    let empty = put_domains(&server, "bob", &admin, json!({"allowed_domains": []})).await;
    assert_eq!(empty.status, StatusCode::OK, "{empty:?}");
    assert_eq!(empty.body["allowed_domains"], json!([]));

    // null: back to the global list.
    let reset = put_domains(&server, "alice", &admin, json!({"allowed_domains": null})).await;
    assert_eq!(reset.status, StatusCode::OK, "{reset:?}");
    assert_eq!(reset.body.get("allowed_domains"), Some(&Value::Null), "{reset:?}");
    assert_eq!(server.get("/api/v1/users/alice", &admin).await.body.get("allowed_domains"), Some(&Value::Null));
    assert_eq!(server.get("/api/v1/me", &alice).await.body.get("allowed_domains"), Some(&Value::Null));
}

#[tokio::test]
async fn admins_set_and_reset_a_users_allowed_domains_on_sqlite() {
    allowed_domains_round_trip(Backend::Sqlite).await;
}

#[tokio::test]
async fn admins_set_and_reset_a_users_allowed_domains_on_postgres() {
    allowed_domains_round_trip(Backend::Postgres).await;
}

#[tokio::test]
async fn admins_set_and_reset_a_users_allowed_domains_in_memory() {
    allowed_domains_round_trip(Backend::Memory).await;
}

#[tokio::test]
async fn a_users_list_survives_a_restart() {
    let server = TestServer::start().await;
    // The harness gives a restarted server a new admin token: read the list
    // back with alice's, which the database keeps.
    let alice = server.user_with_token("alice").await;
    let list = json!(["example.com", "*.pypi.org"]);
    let set = put_domains(&server, "alice", &server.admin_token, json!({"allowed_domains": list})).await;
    assert_eq!(set.status, StatusCode::OK, "{set:?}");
    let server = server.restart().await;
    let me = server.get("/api/v1/me", &alice).await;
    assert_eq!(me.body["allowed_domains"], list, "{me:?}");
}

#[tokio::test]
async fn bad_allowed_domains_are_422_with_the_entry() {
    let server = TestServer::start().await;
    let admin = server.admin_token.clone();
    server.user_with_token("alice").await;
    let good = json!(["example.com"]);
    assert_eq!(put_domains(&server, "alice", &admin, json!({"allowed_domains": good})).await.status, StatusCode::OK);

    let loc = |index: usize| json!(["body", "allowed_domains", index]);
    let too_long = format!("{}.com", "a".repeat(250));
    for bad in [
        "Example.com",
        "exa mple.com",
        "",
        too_long.as_str(),
        "*.*.example.com",
        "**",
        "*example.com",
        "example.com/path",
        "example.com:443",
        "http://example.com",
        "ex_ample.com",
        "ünïcödé.example",
        "*.",
        ".",
        "..example.com",
        "example..com",
        "example.com.",
        " example.com",
    ] {
        let reply = put_domains(&server, "alice", &admin, json!({"allowed_domains": ["ok.example", bad]})).await;
        assert_eq!(errors(&reply), [(loc(1), json!(bad))], "{bad:?}: {reply:?}");
        assert_eq!(reply.body["detail"][0]["type"], "value_error", "{reply:?}");
    }
    // Every bad entry is reported, each with its index.
    let reply = put_domains(&server, "alice", &admin, json!({"allowed_domains": ["A.com", "ok.example", "b c"]})).await;
    assert_eq!(errors(&reply), [(loc(0), json!("A.com")), (loc(2), json!("b c"))]);

    // At most 200 entries, each at most 253 characters.
    let longest = format!("{}.com", "a".repeat(249));
    assert_eq!(longest.len(), 253);
    let many: Vec<String> = (0..200).map(|i| format!("host-{i}.example")).collect();
    for list in [json!([longest]), json!(many)] {
        let ok = put_domains(&server, "alice", &admin, json!({"allowed_domains": list})).await;
        assert_eq!(ok.status, StatusCode::OK, "{ok:?}");
        assert_eq!(ok.body["allowed_domains"], list);
    }
    let too_many: Vec<String> = (0..201).map(|i| format!("host-{i}.example")).collect();
    let reply = put_domains(&server, "alice", &admin, json!({"allowed_domains": too_many})).await;
    assert_eq!(errors(&reply), [(json!(["body", "allowed_domains"]), json!(too_many))]);
    assert_eq!(reply.body["detail"][0]["type"], "too_long");

    // The body's shape: the key is required (`{}` is no reset), typed, alone.
    for (body, expected_loc) in [
        (json!({}), json!(["body", "allowed_domains"])),
        (json!({"allowed_domains": "example.com"}), json!(["body", "allowed_domains"])),
        (json!({"allowed_domains": [1]}), json!(["body", "allowed_domains", 0])),
        (json!({"allowed_domains": null, "extra": 1}), json!(["body", "extra"])),
    ] {
        let reply = put_domains(&server, "alice", &admin, body.clone()).await;
        reply.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
        assert_eq!(reply.error_loc(), expected_loc, "{body}: {reply:?}");
    }

    // Nothing refused was stored.
    let stored = server.get("/api/v1/users/alice", &admin).await;
    assert_eq!(stored.body["allowed_domains"], json!(many), "{stored:?}");
}

#[tokio::test]
async fn egress_audit_is_for_admins() {
    let server = TestServer::start().await;
    let admin = server.admin_token.clone();
    let alice = server.user_with_token("alice").await;

    for path in ["/api/v1/audit/egress", "/api/v1/audit/egress?user_id=alice", "/api/v1/audit/egress?allowed=false"] {
        server.get(path, &alice).await.assert_error(StatusCode::FORBIDDEN, "forbidden");
    }
    for path in [
        "/api/v1/audit/egress",
        "/api/v1/audit/egress?user_id=alice&session_id=s-1&allowed=false&limit=1000",
        "/api/v1/audit/egress?allowed=true&limit=1",
    ] {
        let page = server.get(path, &admin).await;
        assert_eq!(page.status, StatusCode::OK, "{path}: {page:?}");
        assert_eq!(page.body, json!({"items": [], "next_cursor": null}), "{path}");
    }
    for (query, field) in [("limit=0", "limit"), ("limit=1001", "limit"), ("cursor=not-a-cursor", "cursor")] {
        let reply = server.get(&format!("/api/v1/audit/egress?{query}"), &admin).await;
        reply.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
        assert_eq!(reply.error_loc(), json!(["query", field]), "{query}: {reply:?}");
    }
    for query in ["allowed=maybe", "limit=-1", "nope=1"] {
        let reply = server.get(&format!("/api/v1/audit/egress?{query}"), &admin).await;
        reply.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
        assert_eq!(reply.error_loc(), json!(["query"]), "{query}: {reply:?}");
    }
    // Unauthenticated: 401, like every /api/v1 route.
    let anonymous = Reply::from(server.request(Method::GET, "/api/v1/audit/egress", None).send().await).await;
    anonymous.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
}
