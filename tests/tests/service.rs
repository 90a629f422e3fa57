//! Service-level behaviour of the real binary: health, docs, error shapes,
//! configuration errors, admin subcommands, storage outages.

use std::process::Stdio;

use integration_tests::{POSTGRES_URL, Reply, ServerConfig, TestServer, binary_path, postgres_exec, unique_name};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn root_and_health_keep_the_seed_shape() {
    let server = TestServer::start().await;
    let root = Reply::from(server.request(Method::GET, "/", None).send().await).await;
    assert_eq!(root.body["name"], "Claude Agent HTTP API");
    assert_eq!(root.body["docs"], "/docs");
    let health = Reply::from(server.request(Method::GET, "/health", None).send().await).await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.body["status"], "healthy");
    assert_eq!(health.body["storage_type"], "sqlite");
    for key in ["version", "active_sessions", "in_memory_clients", "memory_mb", "uptime_seconds"] {
        assert!(health.body.get(key).is_some(), "health lacks {key}: {health:?}");
    }
    let alice = server.user_with_token("alice").await;
    server.session(&alice, json!({})).await;
    let health = Reply::from(server.request(Method::GET, "/health", None).send().await).await;
    assert_eq!(health.body["active_sessions"], 1);
}

#[tokio::test]
async fn openapi_describes_every_route_and_docs_work_offline() {
    let server = TestServer::start().await;
    let spec = Reply::from(server.request(Method::GET, "/openapi.json", None).send().await).await;
    assert_eq!(spec.status, StatusCode::OK);
    let paths = spec.body["paths"].as_object().expect("paths");
    let expected = [
        ("/", "get"),
        ("/health", "get"),
        ("/api/v1/sessions", "post"),
        ("/api/v1/sessions", "get"),
        ("/api/v1/sessions/{session_id}", "get"),
        ("/api/v1/sessions/{session_id}", "delete"),
        ("/api/v1/sessions/{session_id}/resume", "post"),
        ("/api/v1/sessions/{session_id}/interrupt", "post"),
        ("/api/v1/sessions/{session_id}/stream", "get"),
        ("/api/v1/sessions/{session_id}/messages", "get"),
        ("/api/v1/chat", "post"),
        ("/api/v1/chat/stream", "post"),
        ("/api/v1/usage", "get"),
        ("/api/v1/audit/model-requests", "get"),
        ("/api/v1/audit/egress", "get"),
        ("/api/v1/users", "post"),
        ("/api/v1/users", "get"),
        ("/api/v1/users/{user_id}", "get"),
        ("/api/v1/users/{user_id}", "delete"),
        ("/api/v1/users/{user_id}/tokens", "post"),
        ("/api/v1/users/{user_id}/tokens", "get"),
        ("/api/v1/users/{user_id}/allowed-domains", "put"),
        ("/api/v1/tokens/{token_id}", "delete"),
        ("/api/v1/me", "get"),
    ];
    for (path, method) in expected {
        assert!(paths.get(path).and_then(|p| p.get(method)).is_some(), "{method} {path} missing from the spec");
    }
    assert_eq!(paths.len(), 19, "a route the test does not know: {:?}", paths.keys().collect::<Vec<_>>());
    assert!(spec.body["components"]["securitySchemes"]["bearer"].is_object());

    // Swagger UI is served from the binary: the page and its assets, no CDN.
    let page = Reply::from(server.request(Method::GET, "/docs/", None).send().await).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text.contains("swagger-ui"), "{}", page.text);
    assert!(!page.text.contains("cdn") && !page.text.contains("unpkg"), "{}", page.text);
    for asset in ["/docs/swagger-ui.css", "/docs/swagger-ui-bundle.js", "/docs/swagger-initializer.js"] {
        let reply = server.request(Method::GET, asset, None).send().await.expect("asset");
        assert_eq!(reply.status(), StatusCode::OK, "{asset}");
    }
    let init = server.request(Method::GET, "/docs/swagger-initializer.js", None).send().await.expect("init");
    assert!(init.text().await.expect("text").contains("/openapi.json"));
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let server = TestServer::start().await;
    let missing = Reply::from(server.request(Method::GET, "/nope", None).send().await).await;
    missing.assert_error(StatusCode::NOT_FOUND, "not_found");
    let method = Reply::from(server.request(Method::PUT, "/health", None).send().await).await;
    method.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}

/// Runs the binary with arguments and env; returns (exit code, stdout, stderr).
fn run_cli(args: &[&str], env: &[(&str, &str)], dir: &std::path::Path) -> (i32, String, String) {
    let output = std::process::Command::new(binary_path("claude-agent-http"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run claude-agent-http");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_configuration_stops_the_start_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.yaml");
    // (config file, environment, words the error must contain)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case; 7] = [
        ("api:\n  prot: 1\n", &[], &["prot"]),
        ("session:\n  storage: mongo\n", &[], &["session.storage", "mongo", "sqlite", "postgresql"]),
        ("api:\n  port: 99999\n", &[], &["api.port"]),
        ("", &[("CLAUDE_AGENT_API_PORT", "abc")], &["api.port", "CLAUDE_AGENT_API_PORT"]),
        ("defaults:\n  permission_mode: yolo\n", &[], &["defaults.permission_mode", "bypassPermissions"]),
        ("api:\n  host: 0.0.0.0\nauth:\n  mode: none\n", &[], &["auth.mode", "loopback"]),
        ("", &[("CLAUDE_AGENT_ADMIN_TOKEN", "short")], &["auth.admin_token", "32"]),
    ];
    for (yaml, env, needles) in cases {
        std::fs::write(&config, yaml).expect("write");
        let (code, _, stderr) =
            run_cli(&["--config", config.to_str().expect("utf-8"), "check-config"], env, dir.path());
        assert_eq!(code, 2, "{yaml:?} {env:?}: {stderr}");
        for needle in needles {
            assert!(stderr.contains(needle), "{yaml:?} {env:?}: {needle:?} not in {stderr}");
        }
    }
    let (code, _, stderr) = run_cli(&["--config", "/nonexistent/config.yaml"], &[], dir.path());
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/config.yaml"), "{stderr}");
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_masked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_key = "sk-ant-this-must-never-print";
    let admin = "admin-token-that-must-never-print-000000";
    let env = [
        ("ANTHROPIC_API_KEY", secret_key),
        ("CLAUDE_AGENT_ADMIN_TOKEN", admin),
        ("CLAUDE_AGENT_SESSION_PG_PASSWORD", "pg-secret"),
        ("CLAUDE_AGENT_USER_BASE_DIR", "~/users"),
        ("CLAUDE_AGENT_API_HOST", "::1"),
        ("CLAUDE_AGENT_MAX_CONCURRENT", "9"),
    ];
    let (code, stdout, stderr) = run_cli(&["check-config"], &env, dir.path());
    assert_eq!(code, 0, "{stderr}");
    for secret in [secret_key, admin, "pg-secret"] {
        assert!(!stdout.contains(secret) && !stderr.contains(secret), "{secret} printed:\n{stdout}");
    }
    assert!(stdout.contains("api_key: '***'") || stdout.contains("api_key: \"***\""), "{stdout}");
    assert!(stdout.contains(&format!("base_dir: {}/users", dir.path().display())), "~ expanded: {stdout}");
    assert!(stdout.contains("host: ::1") || stdout.contains("host: '::1'"), "{stdout}");
    assert!(stdout.contains("max_concurrent_requests: 9"), "{stdout}");
}

#[test]
fn the_shipped_config_yaml_documents_exactly_the_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.yaml");
    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "").expect("write");
    let (code, from_shipped, err) =
        run_cli(&["--config", shipped.to_str().expect("utf-8"), "check-config"], &[], dir.path());
    assert_eq!(code, 0, "{err}");
    let (_, defaults, _) = run_cli(&["--config", empty.to_str().expect("utf-8"), "check-config"], &[], dir.path());
    assert_eq!(from_shipped, defaults, "config.yaml and the built-in defaults differ");
}

#[tokio::test]
async fn admin_subcommands_manage_the_same_store_as_the_server() {
    let server = TestServer::start().await;
    let config = server.dir.path().join("config.yaml");
    let config = config.to_str().expect("utf-8");
    let dir = server.dir.path();
    let (code, out, err) = run_cli(&["--config", config, "users", "add", "alice"], &[], dir);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = run_cli(&["--config", config, "users", "add", "alice"], &[], dir);
    assert_ne!(code, 0);
    assert!(err.contains("already exists"), "{err}");
    let (code, _, err) = run_cli(&["--config", config, "users", "add", "bad/name"], &[], dir);
    assert_ne!(code, 0);
    assert!(err.contains("user_id"), "{err}");
    let (code, token, err) = run_cli(&["--config", config, "tokens", "create", "alice", "--label", "cli"], &[], dir);
    assert_eq!(code, 0, "{err}");
    let token = token.trim();
    assert!(token.starts_with("cah_"), "{token}");
    // The running server accepts the token issued by the subcommand.
    let me = server.get("/api/v1/me", token).await;
    assert_eq!(me.body["user_id"], "alice", "{me:?}");
    let (_, listed, _) = run_cli(&["--config", config, "users", "list"], &[], dir);
    assert!(listed.contains("alice") && listed.contains("admin"), "{listed}");
    let (_, tokens, _) = run_cli(&["--config", config, "tokens", "list", "alice"], &[], dir);
    assert!(tokens.contains("cli") && !tokens.contains(token), "{tokens}");
    let token_id = tokens.split_whitespace().next().expect("token id");
    let (code, _, err) = run_cli(&["--config", config, "tokens", "revoke", token_id], &[], dir);
    assert_eq!(code, 0, "{err}");
    server.get("/api/v1/me", token).await.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    let (code, _, _) = run_cli(&["--config", config, "users", "delete", "alice"], &[], dir);
    assert_eq!(code, 0);
    let (code, out, _) = run_cli(&["--config", config, "migrate"], &[], dir);
    assert_eq!(code, 0);
    assert!(out.contains("sqlite"), "{out}");
}

#[tokio::test]
async fn health_is_503_while_postgres_refuses_connections_and_recovers() {
    let database = unique_name("cah_health");
    postgres_exec(&format!("CREATE DATABASE {database}")).await;
    let url = POSTGRES_URL.replace("/test", &format!("/{database}"));
    let config = ServerConfig::default().env("CLAUDE_AGENT_DATABASE_URL", url);
    let server = TestServer::start_with(config).await;
    let health = || async { Reply::from(server.request(Method::GET, "/health", None).send().await).await };
    assert_eq!(health().await.body["storage_type"], "postgresql");
    assert_eq!(health().await.status, StatusCode::OK);

    postgres_exec(&format!("ALTER DATABASE {database} ALLOW_CONNECTIONS false")).await;
    postgres_exec(&format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"))
        .await;
    let down = health().await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE, "{down:?}");
    assert_eq!(down.body["status"], "unhealthy");
    assert!(!down.text.contains("postgres://"), "no connection details in the body: {}", down.text);
    // API calls fail with 503 and a clear body, not 500.
    let alice = server.admin_token.clone();
    let reply = server.get("/api/v1/sessions", &alice).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}\n{}", server.log());
    reply.assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    let metrics = Reply::from(server.request(Method::GET, "/metrics", None).send().await).await;
    let errors = metrics.text.lines().find_map(|l| l.strip_prefix("cah_store_errors_total ")).unwrap_or("0");
    assert!(errors.parse::<u64>().is_ok_and(|n| n >= 1), "{}", metrics.text);

    postgres_exec(&format!("ALTER DATABASE {database} ALLOW_CONNECTIONS true")).await;
    let mut recovered = false;
    for _ in 0..50 {
        if health().await.status == StatusCode::OK {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(recovered, "the pool reconnects by itself");
    drop(server);
    postgres_exec(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).await;
}

#[tokio::test]
async fn postgres_database_is_created_when_missing() {
    let database = unique_name("cah_create");
    let url = POSTGRES_URL.replace("/test", &format!("/{database}"));
    let server = TestServer::start_with(ServerConfig::default().env("CLAUDE_AGENT_DATABASE_URL", url)).await;
    let alice = server.user_with_token("alice").await;
    server.session(&alice, json!({})).await;
    drop(server);
    postgres_exec(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).await;
}

#[tokio::test]
async fn sqlite_database_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start().await;
    let mode = std::fs::metadata(server.dir.path().join("db/sessions.db")).expect("db").permissions().mode();
    assert_eq!(mode & 0o077, 0, "database readable by others: {mode:o}");
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly() {
    let mut server = TestServer::start().await;
    let status = server.terminate().await;
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(server.log().contains("stopped"));
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_every_answer_has_a_request_id() {
    let server = TestServer::start().await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    server.get(&format!("/api/v1/sessions/{session}"), &alice).await;
    let missing = server.get("/api/v1/sessions/nope", &alice).await;
    missing.assert_error(StatusCode::NOT_FOUND, "not_found");
    // The id is in the header and in the error body, and they agree.
    let id = missing.headers["x-request-id"].to_str().expect("ascii").to_owned();
    assert_eq!(missing.body["request_id"], id.as_str());
    // A caller's plain id is kept; anything else is replaced.
    let kept =
        server.request(Method::GET, "/health", None).header("x-request-id", "trace-42").send().await.expect("get");
    assert_eq!(kept.headers()["x-request-id"], "trace-42");
    let replaced =
        server.request(Method::GET, "/health", None).header("x-request-id", "bad id;drop").send().await.expect("get");
    assert_ne!(replaced.headers()["x-request-id"], "bad id;drop");

    let metrics = Reply::from(server.request(Method::GET, "/metrics", None).send().await).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = &metrics.text;
    // By route template: no session id in any label.
    assert!(
        text.contains(r#"cah_http_requests_total{route="/api/v1/sessions/{session_id}",method="GET",status="200"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"route="/api/v1/sessions/{session_id}",method="GET",status="404"} 1"#), "{text}");
    assert!(!text.contains(&session), "a session id leaked into the labels");
    assert!(text.contains("cah_sessions_open 1"), "{text}");
    assert!(text.contains("cah_workers 1"), "{text}");
    assert!(text.contains("cah_http_request_duration_seconds_bucket{route=\"/health\",le=\"+Inf\"} 2"), "{text}");
}

#[tokio::test]
async fn admin_subcommands_list_and_close_sessions() {
    let server = TestServer::start().await;
    let config = server.dir.path().join("config.yaml");
    let config = config.to_str().expect("utf-8");
    let dir = server.dir.path();
    let alice = server.user_with_token("alice").await;
    let first = server.session(&alice, json!({})).await;
    let second = server.session(&alice, json!({})).await;
    let (code, listed, err) = run_cli(&["--config", config, "sessions", "list", "--user", "alice"], &[], dir);
    assert_eq!(code, 0, "{err}");
    assert!(listed.contains(&first) && listed.contains(&second), "{listed}");
    let (code, _, err) = run_cli(&["--config", config, "sessions", "close", &first], &[], dir);
    assert_eq!(code, 0, "{err}");
    server.get(&format!("/api/v1/sessions/{first}"), &alice).await.assert_error(StatusCode::NOT_FOUND, "not_found");
    let (code, _, err) = run_cli(&["--config", config, "sessions", "close", &first], &[], dir);
    assert_ne!(code, 0);
    assert!(err.contains("no open or expired session"), "{err}");
    let (code, _, err) = run_cli(&["--config", config, "sessions", "list", "--status", "bogus"], &[], dir);
    assert_ne!(code, 0);
    assert!(err.contains("active, expired or all"), "{err}");
    let (code, out, err) = run_cli(&["--config", config, "sessions", "purge-expired"], &[], dir);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("closed 0 expired sessions"), "{out}");
}

#[test]
fn doctor_checks_what_the_server_needs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("doctor.db");
    let env =
        [("CLAUDE_AGENT_DATABASE_URL", db.to_str().expect("utf-8")), ("CLAUDE_AGENT_CLI_PATH", "/nonexistent/claude")];
    let (code, out, err) = run_cli(&["doctor"], &env, dir.path());
    assert_ne!(code, 0, "a missing CLI must fail the doctor: {out}");
    assert!(out.contains("FAIL  Claude CLI: /nonexistent/claude"), "{out}");
    // Everything else on this machine (root, Landlock, cgroups) is fine.
    for check in
        ["ok    worker binary", "ok    Landlock: ABI", "ok    cgroups", "ok    database: sqlite", "sandbox mode"]
    {
        assert!(out.contains(check), "{check} missing:\n{out}{err}");
    }
    let cli = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../node_modules/@anthropic-ai/claude-code-linux-x64/claude");
    let env = [
        ("CLAUDE_AGENT_DATABASE_URL", db.to_str().expect("utf-8")),
        ("CLAUDE_AGENT_CLI_PATH", cli.to_str().expect("utf-8")),
    ];
    let (code, out, err) = run_cli(&["doctor"], &env, dir.path());
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("all checks passed") && out.contains("(Claude Code)"), "{out}");
}

/// Every answer during a storage fault: a success, or 503 with the JSON
/// error body; never a 500, a hang or a 401 for a valid token.
fn assert_ok_or_unavailable(reply: &Reply, what: &str) -> bool {
    if reply.status.is_success() {
        return true;
    }
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{what}: {reply:?}");
    assert_eq!(reply.body["code"], "unavailable", "{what}: {reply:?}");
    false
}

#[tokio::test]
async fn postgres_connections_killed_during_traffic_give_503_then_recover_with_nothing_lost() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let database = unique_name("cah_kill");
    postgres_exec(&format!("CREATE DATABASE {database}")).await;
    let url = POSTGRES_URL.replace("/test", &format!("/{database}"));
    let server = Arc::new(TestServer::start_with(ServerConfig::default().env("CLAUDE_AGENT_DATABASE_URL", url)).await);
    let admin = server.admin_token.clone();
    let mut acknowledged = Vec::new();
    for n in 0..5 {
        let user = format!("before-{n}");
        let created = server.post("/api/v1/users", &admin, json!({"user_id": user})).await;
        assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
        acknowledged.push(user);
    }

    // Four clients write (create a user) and read (get one back) in a loop.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let (server, admin, stop) = (server.clone(), admin.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut written, mut failures, mut last_ok) = (Vec::new(), 0, Instant::now());
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let user = format!("during-{client}-{n}");
                    let created = server.post("/api/v1/users", &admin, json!({"user_id": user})).await;
                    if assert_ok_or_unavailable(&created, "create") {
                        written.push(user.clone());
                        let read = server.get(&format!("/api/v1/users/{user}"), &admin).await;
                        if assert_ok_or_unavailable(&read, "read") {
                            last_ok = Instant::now();
                        } else {
                            failures += 1;
                        }
                    } else {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                (written, failures, last_ok)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    for _ in 0..3 {
        postgres_exec(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}' AND pid <> pg_backend_pid()"
        ))
        .await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let last_kill = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let mut failures = 0;
    for client in clients {
        let (written, failed, last_ok) = client.await.expect("client");
        assert!(last_ok > last_kill, "a client never succeeded after the last kill: the pool did not recover");
        failures += failed;
        acknowledged.extend(written);
    }
    eprintln!("{} writes acknowledged, {failures} requests answered 503", acknowledged.len());
    // Every acknowledged write is still there.
    let listed = server.get("/api/v1/users", &admin).await;
    assert_eq!(listed.status, StatusCode::OK, "{listed:?}");
    let ids: std::collections::HashSet<&str> =
        listed.body.as_array().expect("users").iter().filter_map(|u| u["user_id"].as_str()).collect();
    let lost: Vec<&String> = acknowledged.iter().filter(|u| !ids.contains(u.as_str())).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(!server.log().contains("panicked"), "{}", server.log());
    drop(server);
    postgres_exec(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).await;
}

/// A small ext4 file system on a loop device, mounted for one test (the
/// tests run as root), so the database's disk can be filled up or turned
/// read-only under the running server the way the kernel does it after an
/// I/O error (`errors=remount-ro`).
struct SmallFileSystem {
    image: std::path::PathBuf,
    mount_point: std::path::PathBuf,
}

fn run(program: &str, args: &[&std::ffi::OsStr]) {
    let output = std::process::Command::new(program).args(args).output().expect(program);
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

impl SmallFileSystem {
    fn create(dir: &std::path::Path) -> Self {
        let image = dir.join("disk.img");
        std::fs::File::create(&image).and_then(|f| f.set_len(64 << 20)).expect("image");
        run("mkfs.ext4", &["-q".as_ref(), image.as_os_str()]);
        let disk = Self { image, mount_point: dir.join("disk") };
        std::fs::create_dir_all(&disk.mount_point).expect("mount point");
        disk.mount();
        disk
    }

    fn mount(&self) {
        run(
            "mount",
            &["-o".as_ref(), "loop,errors=remount-ro".as_ref(), self.image.as_os_str(), self.mount_point.as_os_str()],
        );
    }

    fn unmount(&self) {
        run("umount", &[self.mount_point.as_os_str()]);
    }

    /// The kernel's reaction to a metadata error: the file system turns
    /// read-only under its open files.
    fn fail_read_only(&self) {
        let output = std::process::Command::new("findmnt").args(["-n", "-o", "SOURCE"]).arg(&self.mount_point).output();
        let device = String::from_utf8(output.expect("findmnt").stdout).expect("utf-8");
        let name = device.trim().rsplit('/').next().expect("device name").to_owned();
        std::fs::write(format!("/sys/fs/ext4/{name}/trigger_fs_error"), "1").expect("trigger_fs_error");
    }

    /// Writes a file until the file system is full.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.mount_point.join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        while file.write_all(&[0u8; 512]).is_ok() {}
        filler
    }
}

impl Drop for SmallFileSystem {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.mount_point).status();
    }
}

async fn create_user(server: &TestServer, user: &str) -> Reply {
    server.post("/api/v1/users", &server.admin_token, json!({"user_id": user})).await
}

async fn user_exists(server: &TestServer, user: &str) -> bool {
    let reply = server.get(&format!("/api/v1/users/{user}"), &server.admin_token).await;
    assert!(reply.status == StatusCode::OK || reply.status == StatusCode::NOT_FOUND, "{reply:?}");
    reply.status == StatusCode::OK
}

#[tokio::test]
async fn sqlite_on_a_full_or_read_only_disk_gives_503_and_keeps_what_it_acknowledged() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let disk = SmallFileSystem::create(scratch.path());
    let database = disk.mount_point.join("sessions.db");
    let config = ServerConfig::default().env("CLAUDE_AGENT_SESSION_SQLITE_PATH", database.to_str().expect("utf-8"));
    let mut server = TestServer::start_with(config.clone()).await;
    assert_eq!(create_user(&server, "before").await.status, StatusCode::CREATED);

    let filler = disk.fill();
    let full = create_user(&server, "while-full").await;
    full.assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(!full.text.contains(database.to_str().expect("utf-8")), "no paths in the body: {}", full.text);
    assert!(user_exists(&server, "before").await, "reads still work");
    std::fs::remove_file(filler).expect("free the disk");
    // ext4 reuses freed blocks once the journal has committed the delete.
    run("sync", &[disk.mount_point.as_os_str()]);
    assert_eq!(create_user(&server, "after-full").await.status, StatusCode::CREATED, "{}", server.log());

    disk.fail_read_only();
    create_user(&server, "while-read-only").await.assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(user_exists(&server, "after-full").await, "reads still work");
    assert!(server.terminate().await.success(), "{}", server.log());
    assert!(!server.log().contains("panicked"), "{}", server.log());
    drop(server);

    // The operator's repair: unmount, check, mount again.
    disk.unmount();
    let _ = std::process::Command::new("e2fsck").arg("-fy").arg(&disk.image).output().expect("e2fsck");
    disk.mount();
    let server = TestServer::start_with(config).await;
    assert_eq!(create_user(&server, "after-repair").await.status, StatusCode::CREATED, "{}", server.log());
    for user in ["before", "after-full", "after-repair"] {
        assert!(user_exists(&server, user).await, "{user} lost");
    }
    assert!(!user_exists(&server, "while-read-only").await);
    drop(server);
    drop(disk);
}
