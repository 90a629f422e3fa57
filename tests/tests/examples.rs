//! The client examples (`examples/`) run against the real server, the real
//! Claude CLI in the user's confined worker and the mock model; and the checks
//! of the deployment files (`deploy/`) and the Postman collection (`postman/`)
//! that need no container engine.
//!
//! Every example creates a session, streams a turn over SSE, hangs up after two
//! text frames, reconnects with `Last-Event-ID`, reads the history, resumes the
//! session and sends a follow-up; the mock's directives make the replies known.
//! A tool an example needs (bash, curl, jq; python3 with venv and pip; node
//! and npm) that is missing fails the test under `CI=true` and skips it
//! elsewhere. The TypeScript example is compiled with its pinned `tsc`
//! (strict) before it runs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use integration_tests::{ServerConfig, TestServer, binary_path};
use mock_model::{MockModel, MockServer};
use reqwest::StatusCode;
use serde_json::Value;

/// The repository's root.
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("repository root")
}

/// The cargo target directory this test runs from (`target/`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test>
    exe.ancestors().nth(3).expect("target directory").to_path_buf()
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether `program args…` runs and succeeds.
fn runs(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the tools an example needs are there: a missing one fails the test
/// under CI and skips it (with a note) elsewhere.
fn tools_present(example: &str, tools: &[(&str, &[&str])]) -> bool {
    let missing: Vec<&str> = tools.iter().filter(|(tool, args)| !runs(tool, args)).map(|(tool, _)| *tool).collect();
    if missing.is_empty() {
        return true;
    }
    assert!(!under_ci(), "the {example} example needs {missing:?}, which CI must have");
    eprintln!("skipped: the {example} example needs {missing:?} (a failure under CI=true)");
    false
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The message the example streams: slow enough that its hang-up after two
/// text frames comes before the end of the turn.
fn streamed_message(label: &str) -> String {
    format!("mock:slow 100 6\nmock:reply hello from the {label} example")
}

fn follow_up_message(label: &str) -> String {
    format!("mock:reply hello again from the {label} example")
}

/// Runs an example against `server` as the user of `token`.
async fn run_example(server: &TestServer, token: &str, label: &str, program: &Path, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .current_dir(repo())
        .env("BASE_URL", &server.base_url)
        .env("TOKEN", token)
        .env("MESSAGE", streamed_message(label))
        .env("FOLLOW_UP", follow_up_message(label))
        .env("DISCONNECT_AFTER", "2")
        .env_remove("KEEP_SESSION")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(240), command.output()).await {
        Ok(output) => output.unwrap_or_else(|e| panic!("cannot run the {label} example ({}): {e}", program.display())),
        Err(_) => panic!("the {label} example did not finish within 240 s\nserver log:\n{}", server.log()),
    }
}

/// Starts a server with the real CLI and the mock model, and a user for the example.
async fn server_with_user() -> (MockServer, TestServer, String) {
    let mock = MockModel::start().await.expect("mock model");
    let server = TestServer::start_with(ServerConfig::default().with_cli(&mock)).await;
    let token = server.user_with_token("alice").await;
    (mock, server, token)
}

/// The example succeeded, printed every step with the mock's replies, really
/// reconnected mid-turn, and the server saw what it printed.
async fn assert_example_worked(label: &str, output: &Output, mock: &MockServer, server: &TestServer, token: &str) {
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}", server.log());
    assert!(output.status.success(), "the {label} example failed ({})\n{context}", output.status);
    eprintln!("the {label} example printed (visible with --nocapture):\n{stdout}");
    for expected in [
        "health: healthy".to_owned(),
        "session: created ".to_owned(),
        "disconnected on purpose".to_owned(),
        "turn ended with done".to_owned(),
        format!("reply: hello from the {label} example"),
        "history: 3 messages (user, assistant, result)".to_owned(),
        "resume: status active".to_owned(),
        format!("follow-up: hello again from the {label} example"),
        "deleted: ".to_owned(),
    ] {
        assert!(stdout.contains(&expected), "the {label} example did not print {expected:?}\n{context}");
    }
    assert_eq!(stdout.lines().last(), Some("ok"), "{context}");
    // The reconnect delivered the rest of the turn, not nothing.
    let reconnected = stdout
        .lines()
        .find_map(|l| l.strip_prefix("reconnect: ")?.split_once(" more frames")?.0.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no reconnect summary\n{context}"));
    assert!(reconnected >= 2, "the reconnect got {reconnected} frames\n{context}");
    // Both turns reached the model, and the session is gone as the example said.
    for needle in [format!("hello from the {label} example"), format!("hello again from the {label} example")] {
        let seen = mock
            .message_requests()
            .iter()
            .any(|r| r.last_user_text.as_deref().is_some_and(|t| t.contains(&format!("mock:reply {needle}"))));
        assert!(seen, "the model never saw {needle:?}\n{context}");
    }
    let session_id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("session: created "))
        .unwrap_or_else(|| panic!("no session id\n{context}"))
        .trim();
    let gone = server.get(&format!("/api/v1/sessions/{session_id}"), token).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND, "the example's session was not deleted: {gone:?}");
}

#[tokio::test]
async fn the_curl_example_streams_reconnects_reads_history_and_resumes() {
    let tools: &[(&str, &[&str])] = &[("bash", &["--version"]), ("curl", &["--version"]), ("jq", &["--version"])];
    if !tools_present("curl", tools) {
        return;
    }
    let (mock, server, token) = server_with_user().await;
    let output = run_example(&server, &token, "curl", Path::new("bash"), &["examples/curl.sh"]).await;
    assert_example_worked("curl", &output, &mock, &server, &token).await;
}

/// `target/examples-venv` with the pinned requirements of the Python example
/// (installed from PyPI once, again when `requirements.txt` changes).
fn python_venv() -> Option<PathBuf> {
    let tools: &[(&str, &[&str])] = &[
        ("python3", &["--version"]),
        ("python3", &["-c", "import venv, ensurepip"]),
        ("python3", &["-m", "pip", "--version"]),
    ];
    if !tools_present("Python", tools) {
        return None;
    }
    let venv = target_dir().join("examples-venv");
    let python = venv.join("bin/python");
    let requirements_path = repo().join("examples/python/requirements.txt");
    let requirements = std::fs::read_to_string(&requirements_path).expect("examples/python/requirements.txt");
    let stamp = venv.join("requirements.installed");
    if python.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == requirements) {
        return Some(python);
    }
    let created = std::process::Command::new("python3").arg("-m").arg("venv").arg("--clear").arg(&venv).output();
    let created = created.expect("python3 -m venv");
    assert!(created.status.success(), "python3 -m venv {} failed: {}", venv.display(), text(&created.stderr));
    let installed = std::process::Command::new(&python)
        .args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q", "-r"])
        .arg(&requirements_path)
        .output()
        .expect("pip install");
    assert!(
        installed.status.success(),
        "pip install -r examples/python/requirements.txt failed (PyPI must be reachable):\n{}{}",
        text(&installed.stdout),
        text(&installed.stderr)
    );
    std::fs::write(&stamp, requirements).expect("write the venv's stamp");
    Some(python)
}

#[tokio::test]
async fn the_python_example_streams_reconnects_reads_history_and_resumes() {
    let Some(python) = python_venv() else { return };
    let (mock, server, token) = server_with_user().await;
    let output = run_example(&server, &token, "python", &python, &["examples/python/client.py"]).await;
    assert_example_worked("python", &output, &mock, &server, &token).await;
}

/// `examples/typescript/dist/client.js`: the pinned dependencies installed
/// with `npm ci` (from the npm registry, again when `package-lock.json`
/// changes) and `client.ts` compiled by the pinned TypeScript in strict mode
/// (`tsc -p`, which fails on any type error).
fn typescript_client() -> Option<PathBuf> {
    // fetch, web streams, AbortSignal.timeout, Array.prototype.at: Node 18 has them all.
    let node_18: &[&str] = &["-e", "process.exit(Number(process.versions.node.split('.')[0]) >= 18 ? 0 : 1)"];
    if !tools_present("TypeScript", &[("node", node_18), ("npm", &["--version"])]) {
        return None;
    }
    let dir = repo().join("examples/typescript");
    let lock = std::fs::read_to_string(dir.join("package-lock.json")).expect("examples/typescript/package-lock.json");
    let stamp = dir.join("node_modules/.installed-package-lock.json");
    if !std::fs::read_to_string(&stamp).is_ok_and(|s| s == lock) {
        let installed = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()
            .expect("npm ci");
        assert!(
            installed.status.success(),
            "npm ci in examples/typescript failed (the npm registry must be reachable):\n{}{}",
            text(&installed.stdout),
            text(&installed.stderr)
        );
        std::fs::write(&stamp, lock).expect("write the node_modules stamp");
    }
    let compiled = std::process::Command::new("node")
        .arg(dir.join("node_modules/typescript/bin/tsc"))
        .arg("-p")
        .arg(&dir)
        .output()
        .expect("tsc");
    assert!(
        compiled.status.success(),
        "tsc -p examples/typescript failed:\n{}{}",
        text(&compiled.stdout),
        text(&compiled.stderr)
    );
    Some(dir.join("dist/client.js"))
}

#[tokio::test]
async fn the_typescript_example_streams_reconnects_reads_history_and_resumes() {
    let Some(client) = typescript_client() else { return };
    let (mock, server, token) = server_with_user().await;
    let client = client.to_str().expect("UTF-8 path");
    let output = run_example(&server, &token, "typescript", Path::new("node"), &[client]).await;
    assert_example_worked("typescript", &output, &mock, &server, &token).await;
}

/// Every `(METHOD, path)` the router serves, read from its source:
/// `.route("…", get(…).post(…))` on the `/api/v1` router and the root one,
/// plus the Swagger UI's `/docs` and `/openapi.json`. Path parameters become `{}`.
fn router_routes() -> BTreeSet<(String, String)> {
    let source = std::fs::read_to_string(repo().join("control-plane/src/api/mod.rs")).expect("api/mod.rs");
    let start = source.find("pub fn router(").expect("fn router in api/mod.rs");
    let body = &source[start..];
    let body = &body[..body.find("\n}\n").expect("end of fn router")];
    let nest = body
        .split(".nest(\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the router nests the API (.nest(\"/api/v1\", api))");
    let mut routes = BTreeSet::new();
    for statement in body.split(';') {
        let prefix = if statement.contains("let api = Router::new()") { nest } else { "" };
        for call in statement.split(".route(\"").skip(1) {
            let (path, rest) = call.split_once('"').expect("route path");
            let handlers = rest.split(".route(").next().unwrap_or(rest);
            for method in ["get", "post", "put", "delete", "patch"] {
                let bare = handlers.match_indices(&format!("{method}(")).any(|(at, _)| {
                    at == 0 || !handlers[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':')
                });
                if bare {
                    routes.insert((method.to_uppercase(), normalize_path(&format!("{prefix}{path}"))));
                }
            }
        }
        if statement.contains("SwaggerUi::new(\"") {
            for marker in ["SwaggerUi::new(\"", ".url(\""] {
                if let Some(path) = statement.split(marker).nth(1).and_then(|r| r.split('"').next()) {
                    routes.insert(("GET".to_owned(), normalize_path(path)));
                }
            }
        }
    }
    routes
}

/// `/a/{id}/b`, `/a/{{sessionId}}/b` and `/a/:id/b` all become `/a/{}/b`; the
/// query and Postman's `{{baseUrl}}` go.
fn normalize_path(path: &str) -> String {
    let path = path.trim_start_matches("{{baseUrl}}");
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> =
        path.split('/').map(|s| if s.starts_with('{') || s.starts_with(':') { "{}" } else { s }).collect();
    let joined = segments.join("/");
    if joined.is_empty() { "/".to_owned() } else { joined }
}

fn postman_requests(items: &[Value], found: &mut Vec<(String, String, String)>) {
    for item in items {
        if let Some(children) = item["item"].as_array() {
            postman_requests(children, found);
        }
        if let Some(request) = item.get("request") {
            let method = request["method"].as_str().expect("request method").to_owned();
            let raw = request["url"]["raw"].as_str().expect("request url.raw");
            let name = item["name"].as_str().unwrap_or_default().to_owned();
            found.push((method, normalize_path(raw), name));
        }
    }
}

#[test]
fn the_postman_collection_is_valid_and_covers_every_route_of_the_router() {
    let dir = repo().join("postman");
    let read = |name: &str| -> Value {
        let raw = std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("postman/{name}: {e}"));
        serde_json::from_str(&raw).unwrap_or_else(|e| panic!("postman/{name} is not valid JSON: {e}"))
    };
    let collection = read("claude-agent-http.postman_collection.json");
    let environment = read("local.postman_environment.json");

    assert_eq!(collection["info"]["schema"], "https://schema.getpostman.com/json/collection/v2.1.0/collection.json");
    let variables: BTreeSet<&str> = environment["values"]
        .as_array()
        .expect("environment values")
        .iter()
        .filter_map(|v| v["key"].as_str())
        .collect();
    for key in ["baseUrl", "token"] {
        assert!(variables.contains(key), "the environment lacks {key}: {variables:?}");
    }
    assert_eq!(collection["auth"]["bearer"][0]["value"], "{{token}}", "requests authenticate with {{token}}");

    let mut requests = Vec::new();
    postman_requests(collection["item"].as_array().expect("collection items"), &mut requests);
    for (method, path, name) in &requests {
        assert!(path.starts_with('/'), "{name}: the URL must start with {{{{baseUrl}}}}/…, not {path}");
        assert!(!method.is_empty(), "{name}: no method");
    }
    let covered: BTreeSet<(String, String)> = requests.iter().map(|(m, p, _)| (m.clone(), p.clone())).collect();
    let routes = router_routes();
    assert!(routes.len() >= 20, "the router parse found only {routes:?}");
    let missing: Vec<_> = routes.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "postman/claude-agent-http.postman_collection.json lacks these routes of control-plane/src/api/mod.rs: \
         {missing:?} (add a request for each)"
    );
    let unknown: Vec<_> = covered.difference(&routes).collect();
    assert!(
        unknown.is_empty(),
        "the Postman collection has requests for routes the router does not serve: {unknown:?}"
    );
}

/// `KEY=VALUE` pairs of the Dockerfile's `ENV` instructions (with `\` continuations).
fn dockerfile_env(dockerfile: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut continued = false;
    for line in dockerfile.lines().map(str::trim) {
        let rest = match line.strip_prefix("ENV ") {
            Some(rest) => rest,
            None if continued => line,
            None => continue,
        };
        continued = rest.ends_with('\\');
        for word in rest.trim_end_matches('\\').split_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or_else(|| panic!("ENV {word:?} is not KEY=VALUE"));
            pairs.push((key.to_owned(), value.trim_matches('"').to_owned()));
        }
    }
    pairs
}

/// The `config.yaml: |` block of a ConfigMap, de-indented.
fn configmap_config(manifest: &str) -> String {
    let mut lines = manifest.lines().skip_while(|l| !l.trim_start().starts_with("config.yaml: |")).skip(1).peekable();
    let indent = lines.peek().map(|l| l.len() - l.trim_start().len()).expect("config.yaml block");
    let mut config = String::new();
    for line in lines {
        if !line.trim().is_empty() && line.len() - line.trim_start().len() < indent {
            break;
        }
        config.push_str(line.get(indent..).unwrap_or(""));
        config.push('\n');
    }
    config
}

/// The constant (not `${…}`) variables of the compose files' `environment:` maps.
fn compose_constant_env(compose: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut indent = None;
    for line in compose.lines() {
        let depth = line.len() - line.trim_start().len();
        if line.trim_start().starts_with("environment:") {
            indent = Some(depth);
            continue;
        }
        let Some(outer) = indent else { continue };
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if depth <= outer {
            indent = None;
            continue;
        }
        if let Some((key, value)) = line.trim().split_once(':')
            && !value.contains("${")
        {
            pairs.push((key.trim().to_owned(), value.trim().trim_matches('"').to_owned()));
        }
    }
    pairs
}

/// What the image, the compose file and the Kubernetes ConfigMap give the
/// server is a configuration it accepts (`check-config` refuses unknown keys
/// and bad values), with the container's paths; and the two copies of the
/// build context's ignore list agree.
#[test]
fn the_deployment_configuration_is_accepted_by_the_server() {
    let deploy = repo().join("deploy");
    let read = |name: &str| std::fs::read_to_string(deploy.join(name)).unwrap_or_else(|e| panic!("deploy/{name}: {e}"));
    let image_env = dockerfile_env(&read("Dockerfile"));
    assert!(image_env.iter().any(|(k, v)| k == "CLAUDE_AGENT_API_HOST" && v == "0.0.0.0"), "{image_env:?}");
    let compose_env = compose_constant_env(&read("docker-compose.yml"));
    assert!(compose_env.iter().any(|(k, _)| k == "CLAUDE_AGENT_SANDBOX__BEST_EFFORT__CGROUP"), "{compose_env:?}");

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, configmap_config(&read("k8s/configmap.yaml"))).expect("write config");
    let check = |extra: &[(String, String)], with_file: bool| {
        let mut command = std::process::Command::new(binary_path("claude-agent-http"));
        command.env_clear().current_dir(dir.path()).arg("check-config");
        command.env("CLAUDE_AGENT_ADMIN_TOKEN", "check-config-admin-token-0123456789abcdef");
        command.env("ANTHROPIC_API_KEY", "sk-not-a-real-key");
        if with_file {
            command.env("CLAUDE_AGENT_CONFIG", &config);
        }
        command.envs(image_env.iter().chain(extra).map(|(k, v)| (k, v)));
        let output = command.output().expect("claude-agent-http check-config");
        let stdout = text(&output.stdout);
        assert!(output.status.success(), "check-config refused it: {}\n{stdout}", text(&output.stderr));
        stdout
    };
    // docker compose: the image's environment plus the compose file's.
    let effective = check(&compose_env, false);
    for expected in
        ["host: 0.0.0.0", "base_dir: /users", "sqlite_path: /data/sessions.db", "cli_path: /opt/claude-code/claude"]
    {
        assert!(effective.contains(expected), "compose: {expected:?} missing from\n{effective}");
    }
    assert!(effective.contains("cgroup: true"), "{effective}");
    // Kubernetes: the image's environment plus the ConfigMap's file.
    let effective = check(&[], true);
    assert!(effective.contains("host: 0.0.0.0") && effective.contains("cgroup: true"), "{effective}");

    let patterns = |name: &str| -> Vec<String> {
        read(name).lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).map(str::to_owned).collect()
    };
    assert_eq!(
        patterns("Dockerfile.dockerignore"),
        patterns("dockerignore.example"),
        "deploy/Dockerfile.dockerignore and deploy/dockerignore.example must list the same patterns"
    );
}

/// A Compose client: the `docker compose` plugin, else `docker-compose` (v1).
fn compose_client() -> Option<Vec<&'static str>> {
    if runs("docker", &["compose", "version"]) {
        Some(vec!["docker", "compose"])
    } else if runs("docker-compose", &["version"]) {
        Some(vec!["docker-compose"])
    } else {
        None
    }
}

/// Needs a Compose client (`docker compose` or `docker-compose`; no engine
/// is needed for `config`; scripts/test.sh installs Debian's
/// `docker-compose`). Under CI a missing client fails; elsewhere the test
/// passes with a note. The compose files are valid, take their secrets from
/// the environment only, and the PostgreSQL override points the server at it.
#[test]
fn compose_files_pass_compose_config() {
    let Some(client) = compose_client() else {
        assert!(!under_ci(), "no Compose client (`docker compose` or `docker-compose`): scripts/test.sh installs one");
        eprintln!("skipped: no Compose client (`docker compose` or `docker-compose`) is installed");
        return;
    };
    let deploy = repo().join("deploy");
    let config = |files: &[&str], secrets: bool| {
        let mut command = std::process::Command::new(client[0]);
        command.args(&client[1..]).current_dir(&deploy).env_remove("COMPOSE_FILE").env_remove("COMPOSE_PROJECT_NAME");
        for file in files {
            command.arg("-f").arg(file);
        }
        // An empty env file instead of a developer's deploy/.env.
        let empty = tempfile::NamedTempFile::new().expect("empty env file");
        command.arg("--env-file").arg(empty.path()).arg("config");
        for key in ["ANTHROPIC_API_KEY", "CLAUDE_AGENT_ADMIN_TOKEN", "POSTGRES_PASSWORD"] {
            command.env_remove(key);
        }
        if secrets {
            command
                .env("ANTHROPIC_API_KEY", "sk-not-a-real-key")
                .env("CLAUDE_AGENT_ADMIN_TOKEN", "compose-admin-token-0123456789abcdef")
                .env("POSTGRES_PASSWORD", "not-a-real-password");
        }
        let output = command.output().expect("compose config");
        (output.status.success(), text(&output.stdout), text(&output.stderr))
    };
    let sqlite = ["docker-compose.yml"];
    let postgres = ["docker-compose.yml", "docker-compose.postgres.yml"];

    let (ok, stdout, stderr) = config(&sqlite, true);
    assert!(ok, "{client:?} config refused docker-compose.yml: {stderr}");
    assert!(stdout.contains("compose-admin-token-0123456789abcdef"), "the admin token comes from the environment");
    assert!(!stdout.contains("CLAUDE_AGENT_DATABASE_URL"), "SQLite by default:\n{stdout}");

    let (ok, stdout, stderr) = config(&postgres, true);
    assert!(ok, "{client:?} config refused docker-compose.yml + docker-compose.postgres.yml: {stderr}");
    assert!(
        stdout.contains("postgres://claude_agent:not-a-real-password@postgres:5432/claude_agent"),
        "the server's CLAUDE_AGENT_DATABASE_URL points at the postgres service:\n{stdout}"
    );
    assert!(stdout.contains("pg_isready"), "PostgreSQL has a healthcheck:\n{stdout}");

    // No secret has a default: without them, both refuse to render.
    for files in [&sqlite[..], &postgres[..]] {
        let (ok, _, stderr) = config(files, false);
        assert!(!ok, "{files:?} rendered without the secrets in the environment");
        assert!(stderr.contains("ANTHROPIC_API_KEY") || stderr.contains("CLAUDE_AGENT_ADMIN_TOKEN"), "{stderr}");
    }
}

/// The non-root red-team test gives the server copy exactly the image's file
/// capabilities, and compose and Kubernetes keep each of them in the
/// container's bounding set (else the kernel refuses to execute the server).
#[test]
fn the_image_the_compose_file_and_the_manifests_agree_on_capabilities() {
    let deploy = repo().join("deploy");
    let read = |name: &str| std::fs::read_to_string(deploy.join(name)).expect(name);
    let dockerfile = read("Dockerfile");
    let setcap = dockerfile
        .lines()
        .find_map(|line| line.trim().strip_prefix("setcap ").and_then(|rest| rest.split_whitespace().next()))
        .expect("a setcap line in deploy/Dockerfile");
    assert_eq!(setcap, integration_tests::SERVER_CAPABILITIES, "the tests must run what the image runs");
    let setcap_lines = dockerfile.lines().filter(|line| line.trim().starts_with("setcap ")).count();
    assert_eq!(setcap_lines, 1, "only the server binary carries file capabilities");
    let names: BTreeSet<String> =
        setcap.trim_end_matches("+ep").split(',').map(|cap| cap.trim_start_matches("cap_").to_uppercase()).collect();
    let compose = read("docker-compose.yml");
    let compose_adds: BTreeSet<String> = compose
        .split("cap_add:")
        .nth(1)
        .expect("cap_add in docker-compose.yml")
        .lines()
        .skip(1)
        .map_while(|line| line.trim().strip_prefix("- ").map(str::to_owned))
        .collect();
    assert_eq!(compose_adds, names, "docker-compose.yml cap_add");
    let statefulset = read("k8s/statefulset.yaml");
    let k8s_adds: BTreeSet<String> = statefulset
        .lines()
        .find_map(|line| line.trim().strip_prefix("add: "))
        .expect("capabilities.add in the StatefulSet")
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|cap| cap.trim().trim_matches('"').to_owned())
        .collect();
    assert_eq!(k8s_adds, names, "deploy/k8s/statefulset.yaml capabilities.add");
}
