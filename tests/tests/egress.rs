//! Web access from a sandbox: only through the egress proxy, only to
//! allowed domains, every decision audited. Real server, real CLI running
//! curl in its sandbox; a loopback HTTP server stands in for the allowed
//! site (the proxy's resolver override points its name there).

use std::time::Duration;

use integration_tests::{ServerConfig, TestServer};
use mock_model::MockModel;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A tiny HTTP server answering every request with `site says hello`.
async fn fake_site() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = "site says hello";
                let reply =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    port
}

/// Runs `command` with Bash in the session; the mock echoes its output.
async fn bash(server: &TestServer, token: &str, session: &str, command: &str) -> String {
    let message = format!("mock:tool Bash {}", json!({ "command": command }));
    let reply = server.chat(token, session, &message).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}\n{}", server.log());
    reply.body["text"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn sandboxes_reach_allowed_domains_through_the_egress_proxy_only() {
    assert!(std::path::Path::new("/usr/bin/curl").exists(), "curl is required (scripts/test.sh installs it)");
    let site = fake_site().await;
    let mock = MockModel::start().await.expect("mock");
    let yaml = format!(
        "network:\n  allowed_domains: [allowed.test]\n  resolve_overrides:\n    allowed.test: \"127.0.0.1:{site}\"\n    denied.test: \"127.0.0.1:{site}\"\n"
    );
    let server = TestServer::start_with(ServerConfig::default().with_cli(&mock).yaml(&yaml)).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;

    // Plain HTTP through the proxy, and a CONNECT tunnel (what HTTPS uses).
    let plain = bash(&server, &alice, &session, "curl -sS --max-time 10 http://allowed.test/hello").await;
    assert!(plain.contains("site says hello"), "{plain}");
    let tunnel = bash(&server, &alice, &session, "curl -sS --max-time 10 --proxytunnel http://allowed.test/x").await;
    assert!(tunnel.contains("site says hello"), "{tunnel}");
    // A domain off the list: 403, for both.
    let denied = bash(
        &server,
        &alice,
        &session,
        "curl -sS --max-time 10 -o /dev/null -w 'status=%{http_code}' http://denied.test/; echo; \
         curl -sS --max-time 10 --proxytunnel http://denied.test/ 2>&1",
    )
    .await;
    assert!(denied.contains("status=403") && denied.contains("403"), "{denied}");
    assert!(!denied.contains("site says hello"), "{denied}");
    // Around the proxy: Landlock refuses the connection.
    let direct = bash(
        &server,
        &alice,
        &session,
        &format!("curl -sS --max-time 5 --noproxy '*' http://127.0.0.1:{site}/ 2>&1; echo rc=$?"),
    )
    .await;
    assert!(!direct.contains("site says hello") && direct.contains("rc=7"), "{direct}");

    // Every decision is in the audit log, booked to alice's session.
    let mut events = Vec::new();
    for _ in 0..50 {
        let audit = server.get(&format!("/api/v1/audit/egress?session_id={session}"), &server.admin_token).await;
        events = audit.body["items"].as_array().cloned().unwrap_or_default();
        if events.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = |host: &str, allowed: bool| events.iter().any(|e| e["host"] == host && e["allowed"] == allowed);
    assert!(seen("allowed.test", true) && seen("denied.test", false), "{events:#?}");
    assert!(events.iter().all(|e: &Value| e["user_id"] == "alice"));

    // An admin opens denied.test for alice only; it applies at once.
    let opened = server
        .request(reqwest::Method::PUT, "/api/v1/users/alice/allowed-domains", Some(&server.admin_token))
        .json(&json!({"allowed_domains": ["denied.test"]}))
        .send()
        .await
        .expect("put");
    assert_eq!(opened.status(), StatusCode::OK);
    let now_open = bash(&server, &alice, &session, "curl -sS --max-time 10 http://denied.test/").await;
    assert!(now_open.contains("site says hello"), "{now_open}");
    // Her list replaced the global one.
    let closed = bash(
        &server,
        &alice,
        &session,
        "curl -sS --max-time 10 -o /dev/null -w 'status=%{http_code}' http://allowed.test/",
    )
    .await;
    assert!(closed.contains("status=403"), "{closed}");
}
