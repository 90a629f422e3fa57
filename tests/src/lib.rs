//! Test harness: starts the real `claude-agent-http` binary on port 0 with
//! its own data directory and database (a fresh SQLite file, a fresh
//! PostgreSQL schema, or memory), and talks to it over HTTP.
//!
//! The binary is found through `CLAUDE_AGENT_HTTP_BIN`, else next to the
//! test executable in `target/<profile>/` (`cargo build --workspace --bins`
//! puts it there; `CARGO_BIN_EXE_*` only covers a crate's own binaries).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// PostgreSQL of every machine and of CI.
pub const POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Where the server keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Sqlite,
    Postgres,
}

/// Path of a workspace binary (`claude-agent-http`, `claude-agent-worker`).
pub fn binary_path(name: &str) -> PathBuf {
    let env = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&env) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> or target/<profile>/<bin> → target/<profile>/<name>
    let mut dir = exe.parent().expect("target directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target directory");
    }
    let path = dir.join(name);
    assert!(path.is_file(), "{} not found: run `cargo build --workspace --bins` first or set {env}", path.display());
    path
}

/// A random lowercase identifier usable as a schema or database name.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Runs one statement on the test PostgreSQL (fails loudly if it is down).
pub async fn postgres_exec(sql: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(POSTGRES_URL)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {POSTGRES_URL} is required by this test: {e}"));
    sqlx::query(sql).execute(&mut conn).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub backend: Backend,
    /// Extra YAML appended to the generated config (top-level sections must
    /// not repeat the generated ones: `api`, `user`, `session`, `log`; use
    /// `env` for those keys).
    pub extra_yaml: String,
    /// Environment of the server, beyond the harness's own.
    pub env: Vec<(String, String)>,
    /// Give the server a configured admin token (else it generates one).
    pub admin_token: bool,
    /// Run the server as this uid (and gid) instead of root: the
    /// unprivileged sandbox mode, with cgroups delegated to it.
    pub run_as: Option<u32>,
    /// With `run_as`: copies of the server and worker binaries carrying the
    /// file capabilities of `deploy/Dockerfile`, so the non-root server runs
    /// the privileged sandbox mode (each user their own uid).
    pub file_capabilities: bool,
}

/// The file capabilities `deploy/Dockerfile` gives the server (the worker
/// binary has none: the server hands them over as ambient capabilities).
pub const SERVER_CAPABILITIES: &str =
    "cap_chown,cap_dac_override,cap_fowner,cap_kill,cap_setgid,cap_setuid,cap_setpcap+ep";

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Sqlite,
            extra_yaml: String::new(),
            env: Vec::new(),
            admin_token: true,
            run_as: None,
            file_capabilities: false,
        }
    }
}

impl ServerConfig {
    pub fn backend(backend: Backend) -> Self {
        Self { backend, ..Self::default() }
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    pub fn yaml(mut self, yaml: &str) -> Self {
        self.extra_yaml.push_str(yaml);
        self.extra_yaml.push('\n');
        self
    }

    /// Sessions run the real pinned Claude CLI; `mock` is the upstream model
    /// API behind the server's model proxy (the CLIs cannot reach it
    /// directly: the proxy's port is the only one their sandbox allows).
    pub fn with_cli(self, mock: &mock_model::MockServer) -> Self {
        self.env("CLAUDE_AGENT_CLI_PATH", claude_cli().display().to_string()).env("ANTHROPIC_BASE_URL", mock.base_url())
    }
}

/// The pinned Claude CLI (`npm ci --ignore-scripts` at the repo root).
pub fn claude_cli() -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../node_modules/@anthropic-ai/claude-code-linux-x64/claude");
    assert!(path.is_file(), "{} missing: run `npm ci --ignore-scripts` at the repository root", path.display());
    path.canonicalize().expect("cli path")
}

/// One Server-Sent Event as received.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<String>,
    pub data: Value,
    /// When it arrived, since the reader started.
    pub at: std::time::Duration,
}

impl SseEvent {
    /// One event block (`id:` and JSON `data:` lines); `None` for a block
    /// without data (a keep-alive comment).
    pub fn parse(block: &str, at: std::time::Duration) -> Option<Self> {
        let id = block.lines().find_map(|l| l.strip_prefix("id:")).map(|s| s.trim().to_owned());
        let data = block.lines().find_map(|l| l.strip_prefix("data:"))?;
        let data = serde_json::from_str(data.trim()).unwrap_or_else(|e| panic!("frame {data:?}: {e}"));
        Some(Self { id, data, at })
    }

    pub fn kind(&self) -> &str {
        self.data["type"].as_str().unwrap_or("")
    }

    pub fn id_number(&self) -> u64 {
        self.id.as_deref().and_then(|id| id.parse().ok()).unwrap_or_else(|| panic!("no numeric id: {self:?}"))
    }
}

/// Reads an SSE response to its end (or until `stop` says so), parsing each
/// event's `id:` and JSON `data:`; comments (keep-alives) are skipped. A
/// connection that breaks off (the server died) ends the list.
pub async fn read_sse(response: Response, mut stop: impl FnMut(&SseEvent) -> bool) -> Vec<SseEvent> {
    use futures::StreamExt;
    let started = std::time::Instant::now();
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let Some(event) = SseEvent::parse(&block, started.elapsed()) else { continue };
            let last = stop(&event);
            events.push(event);
            if last {
                return events;
            }
        }
    }
    events
}

/// A running server, killed when dropped.
#[derive(Debug)]
pub struct TestServer {
    child: Child,
    pub base_url: String,
    pub admin_token: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    pub config: ServerConfig,
    pub pid: u32,
    pg_schema: Option<String>,
    delegated: Vec<PathBuf>,
}

impl TestServer {
    /// A server on SQLite with a configured admin token.
    pub async fn start() -> Self {
        Self::start_with(ServerConfig::default()).await
    }

    pub async fn start_with(config: ServerConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pg_schema = (config.backend == Backend::Postgres).then(|| unique_name("it"));
        Self::launch(config, dir, pg_schema).await
    }

    /// Writes the config file, starts the binary and waits for its
    /// "listening" line.
    async fn launch(config: ServerConfig, dir: tempfile::TempDir, pg_schema: Option<String>) -> Self {
        let root = dir.path();
        std::fs::create_dir_all(root.join("users")).expect("users dir");
        // Users' uids traverse (not list) the test directory to their own.
        set_mode(root, 0o711);
        let mut yaml = format!(
            "api:\n  host: 127.0.0.1\n  port: 0\nuser:\n  base_dir: {users}\nlog:\n  level: info,sqlx=warn\n  format: json\n",
            users = root.join("users").display(),
        );
        let session = match (config.backend, &pg_schema) {
            (Backend::Memory, _) => "session:\n  storage: memory\n".to_owned(),
            (Backend::Sqlite, _) => {
                format!("session:\n  storage: sqlite\n  sqlite_path: {}\n", root.join("db/sessions.db").display())
            }
            (Backend::Postgres, schema) => format!(
                "session:\n  storage: postgresql\n  database_url: {POSTGRES_URL}\n  pg_schema: {}\n",
                schema.as_deref().unwrap_or("public")
            ),
        };
        yaml.push_str(&session);
        yaml.push_str(&config.extra_yaml);
        let config_path = root.join("config.yaml");
        std::fs::write(&config_path, yaml).expect("write config");

        let admin_token = format!("test-admin-{}", uuid::Uuid::new_v4().simple());
        if let Some(uid) = config.run_as {
            chown_tree(root, uid);
        }
        // After the chown: a chown would clear the file capabilities.
        let server_binary =
            if config.file_capabilities { capable_binaries(root) } else { binary_path("claude-agent-http") };
        let mut command = Command::new(server_binary);
        command.env_clear();
        // The probe stands in for the Claude CLI unless a test says otherwise.
        command.env("CLAUDE_AGENT_CLI_PATH", binary_path("sandbox-probe"));
        // Delegate cgroups to an unprivileged server: it joins them before
        // exec (so it never starts outside them) and creates its workers'
        // cgroups beneath.
        let mut delegated = Vec::new();
        if let Some(uid) = config.run_as {
            delegated = delegate_cgroups(uid);
            let procs: Vec<std::ffi::CString> = delegated
                .iter()
                .filter_map(|d| {
                    std::ffi::CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes()).ok()
                })
                .collect();
            command.uid(uid).gid(uid);
            // Runs after the uid change, in the child: only open/write/close.
            unsafe {
                command.pre_exec(move || {
                    for path in &procs {
                        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                        if fd >= 0 {
                            libc::write(fd, c"0".as_ptr().cast(), 1);
                            libc::close(fd);
                        }
                    }
                    Ok(())
                });
            }
        }
        command
            .arg("--config")
            .arg(&config_path)
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", root)
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(root.join("server.log")).expect("log file"))
            .kill_on_drop(true);
        if config.admin_token {
            command.env("CLAUDE_AGENT_ADMIN_TOKEN", &admin_token);
        }
        for (key, value) in &config.env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start claude-agent-http");
        let pid = child.id().expect("server pid");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let wait = async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(url) = line.strip_prefix("claude-agent-http listening on ") {
                    return Some(url.trim().to_owned());
                }
            }
            None
        };
        let base_url = match tokio::time::timeout(Duration::from_secs(60), wait).await {
            Ok(Some(url)) => url,
            other => {
                let log = std::fs::read_to_string(root.join("server.log")).unwrap_or_default();
                panic!("server did not start ({other:?}); its log:\n{log}");
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
        Self { child, base_url, admin_token, client, dir, config, pid, pg_schema, delegated }
    }

    /// Stops the server (SIGTERM) and starts it again on the same data.
    pub async fn restart(mut self) -> Self {
        self.terminate().await;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        let pg_schema = self.pg_schema.take();
        remove_delegated(std::mem::take(&mut self.delegated));
        let config = self.config.clone();
        let mut restarted = Self::launch(config, dir, pg_schema).await;
        restarted.admin_token = self.admin_token.clone();
        restarted
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("server exits within 30 s of SIGTERM")
            .expect("wait")
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn users_dir(&self) -> PathBuf {
        self.dir.path().join("users")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// A request with `token` as Bearer (none if `None`).
    pub fn request(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let builder = self.client.request(method, self.url(path));
        match token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        Reply::from(self.request(Method::GET, path, Some(token)).send().await).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Reply {
        Reply::from(self.request(Method::DELETE, path, Some(token)).send().await).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Reply {
        Reply::from(self.request(Method::POST, path, Some(token)).json(&body).send().await).await
    }

    /// Sends `POST /api/v1/chat` with `body` in the background: a turn the
    /// test acts on while it runs.
    pub fn spawn_chat(&self, token: &str, body: Value) -> tokio::task::JoinHandle<Reply> {
        let request = self.request(Method::POST, "/api/v1/chat", Some(token)).json(&body);
        tokio::spawn(async move { Reply::from(request.send().await).await })
    }

    /// Creates `user_id` (as admin) and returns a fresh token for it.
    /// A sync chat turn (`timeout` 120 s); a request that hangs fails the
    /// test with the server's log rather than the HTTP client's bare timeout.
    pub async fn chat(&self, token: &str, session: &str, message: &str) -> Reply {
        let body = serde_json::json!({"session_id": session, "message": message, "timeout": 120});
        tokio::time::timeout(std::time::Duration::from_secs(150), self.post("/api/v1/chat", token, body))
            .await
            .unwrap_or_else(|_| panic!("POST /api/v1/chat {message:?} hangs\n{}", self.log()))
    }

    /// Opens `POST /api/v1/chat/stream` and checks that it started (200).
    pub async fn open_stream(&self, token: &str, session: &str, message: &str) -> Response {
        let response = self
            .request(Method::POST, "/api/v1/chat/stream", Some(token))
            .json(&serde_json::json!({"session_id": session, "message": message, "timeout": 120}))
            .send()
            .await
            .expect("stream request sent");
        assert_eq!(response.status(), StatusCode::OK, "the stream did not start\n{}", self.log());
        response
    }

    pub async fn user_with_token(&self, user_id: &str) -> String {
        let created = self.post("/api/v1/users", &self.admin_token, serde_json::json!({"user_id": user_id})).await;
        assert!(created.status == StatusCode::CREATED || created.status == StatusCode::CONFLICT, "{created:?}");
        let token =
            self.post(&format!("/api/v1/users/{user_id}/tokens"), &self.admin_token, serde_json::json!({})).await;
        assert_eq!(token.status, StatusCode::CREATED, "{token:?}");
        token.body["token"].as_str().expect("token").to_owned()
    }

    /// Creates a session for the token's user and returns its id.
    pub async fn session(&self, token: &str, body: Value) -> String {
        let reply = self.post("/api/v1/sessions", token, body).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
        reply.body["session_id"].as_str().expect("session_id").to_owned()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Gracefully if possible, so the server removes its cgroups.
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
            for _ in 0..100 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.start_kill();
        }
        remove_delegated(std::mem::take(&mut self.delegated));
        if let Some(schema) = self.pg_schema.take() {
            // Best-effort cleanup on a thread of its own (no runtime here).
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
                if let Ok(runtime) = runtime {
                    runtime.block_on(async {
                        use sqlx::Connection;
                        if let Ok(mut conn) = sqlx::PgConnection::connect(POSTGRES_URL).await {
                            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                                .execute(&mut conn)
                                .await;
                        }
                    });
                }
            })
            .join();
        }
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).expect("chown");
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path).expect("read_dir").flatten() {
            chown_tree(&entry.path(), uid);
        }
    }
}

/// The v1 controllers the server uses.
const CGROUP_CONTROLLERS: &[&str] = &["memory", "pids", "cpu", "freezer"];

/// Creates a cgroup owned by `uid` beneath the test's own, in each v1
/// hierarchy the server uses: the delegation that systemd or a container
/// runtime gives an unprivileged service.
fn delegate_cgroups(uid: u32) -> Vec<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let name = unique_name("cah_delegated");
    let mut created = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let Some(c) = CGROUP_CONTROLLERS.iter().find(|c| controllers.split(',').any(|x| x == **c)) else {
            continue;
        };
        let mount = PathBuf::from("/sys/fs/cgroup").join(c);
        if !mount.is_dir() {
            continue;
        }
        let dir = mount.join(path.trim_start_matches('/')).join(&name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        chown_tree(&dir, uid);
        created.push(dir);
    }
    assert!(!created.is_empty(), "no cgroup hierarchy to delegate");
    created
}

/// Removes delegated cgroups (after killing what is left in them).
fn remove_delegated(dirs: Vec<PathBuf>) {
    for dir in dirs {
        for _ in 0..50 {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            // Children the server left behind, depth first.
            let mut nested: Vec<PathBuf> = walk_dirs(&dir);
            nested.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for child in nested {
                let _ = std::fs::remove_dir(child);
            }
            if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk_dirs(&path));
            found.push(path);
        }
    }
    found
}

/// A response read whole: status, headers, JSON body (or `Value::Null`).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    pub async fn from(response: reqwest::Result<Response>) -> Self {
        let response = response.expect("request sent");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Self { status, headers, body, text }
    }

    /// Asserts the status and the JSON error shape `{"detail", "code"}`.
    pub fn assert_error(&self, status: StatusCode, code: &str) -> &Self {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.body["code"], code, "{self:?}");
        assert!(self.body.get("detail").is_some(), "error without detail: {self:?}");
        self
    }

    /// The `loc` of the first 422 error.
    pub fn error_loc(&self) -> Value {
        self.body["detail"][0]["loc"].clone()
    }
}

/// Pids of the processes started for `session_id` (the CLI is started with
/// `--session-id <id>` or `--resume <id>`), read from /proc.
pub fn session_process_pids(session_id: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.windows(2)
                .any(|pair| (pair[0] == b"--session-id" || pair[0] == b"--resume") && pair[1] == session_id.as_bytes())
        })
        .collect()
}

/// The environment of the session's CLI process as the kernel holds it
/// (read as root, from outside the sandbox). Waits up to 5 s for the CLI.
pub async fn session_cli_environment(session_id: &str) -> Vec<(String, String)> {
    for _ in 0..100 {
        if let Some(pid) = session_process_pids(session_id).first()
            && let Ok(raw) = std::fs::read(format!("/proc/{pid}/environ"))
        {
            return raw
                .split(|b| *b == 0)
                .filter_map(|kv| String::from_utf8_lossy(kv).split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
                .collect();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no CLI process for session {session_id}");
}

/// The model proxy URL and credential a session's CLI was given.
pub async fn session_model_credential(session_id: &str) -> (String, String) {
    let env = session_cli_environment(session_id).await;
    let get = |key: &str| {
        env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("{key} not set: {env:?}"))
    };
    (get("ANTHROPIC_BASE_URL"), get("ANTHROPIC_API_KEY"))
}

/// Waits until `mock` has received a model request whose last user text
/// contains `needle`.
pub async fn wait_for_model_request(mock: &mock_model::MockServer, needle: &str, within: std::time::Duration) -> bool {
    let until = std::time::Instant::now() + within;
    while std::time::Instant::now() < until {
        if mock.message_requests().iter().any(|r| r.last_user_text.as_deref().is_some_and(|t| t.contains(needle))) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// Copies of the server and worker under `<root>/bin` (root-owned, 0755),
/// the server with the file capabilities of the Docker image and the worker
/// with none, as in the image; the server's path.
fn capable_binaries(root: &Path) -> PathBuf {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    set_mode(&bin, 0o755);
    for name in ["claude-agent-http", "claude-agent-worker"] {
        let copy = bin.join(name);
        std::fs::copy(binary_path(name), &copy).expect("copy binary");
        set_mode(&copy, 0o755);
    }
    let server = bin.join("claude-agent-http");
    let status = std::process::Command::new("setcap").arg(SERVER_CAPABILITIES).arg(&server).status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "setcap {SERVER_CAPABILITIES} {} failed (libcap2-bin)",
        server.display()
    );
    server
}
