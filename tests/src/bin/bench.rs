//! The benchmark harness: the service against the raw CLI, side by side in
//! one run on one machine. It starts the real server, the real pinned CLI
//! and the mock model on loopback, interleaves what it compares (so machine
//! noise hits both sides alike) and writes a markdown table of medians, p90
//! and p99 with the ratio or difference against the baseline of the same
//! run. Run as root (the confinement section drops uids, the proxy section
//! reads a CLI's credential from /proc):
//!
//! `cargo run --release -p integration-tests --bin bench -- [--quick] [--out BENCHMARKS.md]`
//!
//! `--quick` runs every section with few repetitions: it proves the harness
//! works (CI runs it), its figures are not for comparison.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use integration_tests::{Backend, ServerConfig, TestServer, claude_cli, read_sse, session_model_credential};
use mock_model::{MockModel, MockServer};
use serde_json::json;

/// Repetitions per section.
struct Plan {
    turns: usize,
    first_messages: usize,
    cold_runs: usize,
    proxy_requests: usize,
    api_seconds: f64,
    scale: &'static [usize],
    scale_turns: usize,
    confinement_runs: usize,
}

const FULL: Plan = Plan {
    turns: 60,
    first_messages: 8,
    cold_runs: 5,
    proxy_requests: 400,
    api_seconds: 5.0,
    scale: &[1, 8, 32],
    scale_turns: 10,
    confinement_runs: 100,
};
const QUICK: Plan = Plan {
    turns: 5,
    first_messages: 2,
    cold_runs: 1,
    proxy_requests: 20,
    api_seconds: 0.5,
    scale: &[1, 4],
    scale_turns: 2,
    confinement_runs: 5,
};

/// Milliseconds, sorted on demand.
#[derive(Default, Clone)]
struct Samples(Vec<f64>);

impl Samples {
    fn push(&mut self, ms: f64) {
        self.0.push(ms);
    }

    fn pct(&self, p: f64) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() - 1) as f64 * p).round() as usize]
    }

    fn row(&self, name: &str, baseline: Option<&Samples>) -> String {
        let versus = match baseline {
            Some(b) => format!("{:+.2} ms, ×{:.2}", self.pct(0.5) - b.pct(0.5), self.pct(0.5) / b.pct(0.5)),
            None => "baseline".into(),
        };
        format!(
            "| {name} | {:.2} | {:.2} | {:.2} | {versus} | {} |\n",
            self.pct(0.5),
            self.pct(0.9),
            self.pct(0.99),
            self.0.len()
        )
    }
}

const TABLE_HEAD: &str = "| what | p50 ms | p90 ms | p99 ms | vs baseline (p50) | n |\n|---|---|---|---|---|---|\n";

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// The raw CLI in streaming-input mode, as a user would drive it.
struct RawCli {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    _home: tempfile::TempDir,
}

impl RawCli {
    fn start(mock: &MockServer, extra: &[&str]) -> Self {
        let home = tempfile::tempdir().expect("home");
        let mut child = raw_command(mock, home.path())
            .args(["-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("raw CLI");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self { child, stdin, stdout, _home: home }
    }

    /// One turn: write a user line, read until `result`; its latency.
    fn turn(&mut self, text: &str) -> f64 {
        let started = Instant::now();
        let line = json!({"type": "user", "message": {"role": "user", "content": text}});
        writeln!(self.stdin, "{line}").expect("write");
        self.stdin.flush().expect("flush");
        let mut buffer = String::new();
        loop {
            buffer.clear();
            assert!(self.stdout.read_line(&mut buffer).expect("read") > 0, "raw CLI exited");
            if buffer.contains("\"type\":\"result\"") {
                return ms(started);
            }
        }
    }
}

impl Drop for RawCli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn raw_command(mock: &MockServer, home: &Path) -> Command {
    let mut command = Command::new(claude_cli());
    command
        .args(["--permission-mode", "bypassPermissions"])
        .env_clear()
        .env("HOME", home)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("ANTHROPIC_BASE_URL", mock.base_url())
        .env("ANTHROPIC_API_KEY", "bench")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("IS_SANDBOX", "1")
        .current_dir(home)
        .stderr(Stdio::null());
    command
}

/// A server with the real CLI, limits raised for the scale section.
async fn server(mock: &MockServer, backend: Backend) -> TestServer {
    let config = ServerConfig::backend(backend)
        .with_cli(mock)
        .env("CLAUDE_AGENT_MAX_SESSIONS", "200")
        .env("CLAUDE_AGENT_MAX_SESSIONS_PER_USER", "100")
        .env("CLAUDE_AGENT_MAX_CONCURRENT", "100")
        .env("CLAUDE_AGENT_API__MAX_WARM_SESSIONS", "100")
        .env("CLAUDE_AGENT_API__MAX_WARM_SESSIONS_PER_USER", "100")
        .env("CLAUDE_AGENT_LOG__LEVEL", "warn");
    TestServer::start_with(config).await
}

async fn api_turn(server: &TestServer, token: &str, session: &str, text: &str) -> f64 {
    let started = Instant::now();
    let reply = server.chat(token, session, text).await;
    assert_eq!(reply.status, reqwest::StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body["is_error"], false, "{reply:?}");
    ms(started)
}

/// An SSE turn: (time to the first event, time to the `result` event).
async fn sse_turn(server: &TestServer, token: &str, session: &str, text: &str) -> (f64, f64) {
    let started = Instant::now();
    let response = server.open_stream(token, session, text).await;
    let mut first = None;
    let mut result = None;
    let events = read_sse(response, |event| {
        first.get_or_insert_with(|| ms(started));
        if event.kind() == "result" {
            result = Some(ms(started));
        }
        event.kind() == "done" || event.kind() == "error"
    })
    .await;
    assert_eq!(events.last().map(|e| e.kind().to_owned()).as_deref(), Some("done"));
    (first.unwrap_or(f64::NAN), result.unwrap_or(f64::NAN))
}

/// Warm turns and tool turns: raw CLI vs sync API vs SSE, interleaved.
async fn turns(plan: &Plan, mock: &MockServer, server: &TestServer, token: &str, out: &mut String) {
    let session = server.session(token, json!({})).await;
    let mut raw = RawCli::start(mock, &[]);
    for _ in 0..3 {
        raw.turn("warm up");
        api_turn(server, token, &session, "warm up").await;
    }
    let (mut raw_ms, mut api_ms, mut sse_first, mut sse_result) =
        (Samples::default(), Samples::default(), Samples::default(), Samples::default());
    let (mut raw_tool, mut api_tool) = (Samples::default(), Samples::default());
    let tool = r#"mock:tool Bash {"command": "echo bench"}"#;
    for i in 0..plan.turns {
        let text = format!("turn {i}");
        // Alternate the order so neither side always goes first.
        if i % 2 == 0 {
            raw_ms.push(raw.turn(&text));
            api_ms.push(api_turn(server, token, &session, &text).await);
        } else {
            api_ms.push(api_turn(server, token, &session, &text).await);
            raw_ms.push(raw.turn(&text));
        }
        let (first, result) = sse_turn(server, token, &session, &text).await;
        sse_first.push(first);
        sse_result.push(result);
        if i % 3 == 0 {
            raw_tool.push(raw.turn(tool));
            api_tool.push(api_turn(server, token, &session, tool).await);
        }
    }
    out.push_str("\n## 1. Warm text turn and 3. tool turn (raw CLI vs API)\n\n");
    out.push_str(TABLE_HEAD);
    out.push_str(&raw_ms.row("raw CLI, warm text turn (write a line, read until result)", None));
    out.push_str(&api_ms.row("POST /api/v1/chat, warm text turn", Some(&raw_ms)));
    out.push_str(&sse_first.row("POST /api/v1/chat/stream, first event", Some(&raw_ms)));
    out.push_str(&sse_result.row("POST /api/v1/chat/stream, `result` event", Some(&raw_ms)));
    out.push_str(&raw_tool.row("raw CLI, turn with one Bash tool call", None));
    out.push_str(&api_tool.row("POST /api/v1/chat, turn with one Bash tool call", Some(&raw_tool)));
    let _ = writeln!(out, "\nTarget: API p50 ≤ raw + 5 ms; measured {:+.2} ms.", api_ms.pct(0.5) - raw_ms.pct(0.5));
}

/// First message after create vs a warm turn vs a cold `claude -p`.
async fn first_messages(plan: &Plan, mock: &MockServer, server: &TestServer, token: &str, out: &mut String) {
    let (mut first, mut warm, mut cold) = (Samples::default(), Samples::default(), Samples::default());
    for i in 0..plan.first_messages {
        let session = server.session(token, json!({})).await;
        // What a client does: create, then send its first message after
        // a realistic pause (reading the response, a user typing).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        first.push(api_turn(server, token, &session, &format!("first {i}")).await);
        warm.push(api_turn(server, token, &session, &format!("second {i}")).await);
        server.delete(&format!("/api/v1/sessions/{session}"), token).await;
    }
    // The same for the raw CLI: its first turn after a pause, then a second.
    let (mut raw_first, mut raw_warm) = (Samples::default(), Samples::default());
    for i in 0..plan.first_messages {
        let mut raw = RawCli::start(mock, &[]);
        std::thread::sleep(Duration::from_millis(1500));
        raw_first.push(raw.turn(&format!("first {i}")));
        raw_warm.push(raw.turn(&format!("second {i}")));
    }
    let home = tempfile::tempdir().expect("home");
    for i in 0..plan.cold_runs {
        let started = Instant::now();
        let status = raw_command(mock, home.path()).args(["-p", &format!("cold {i}")]).stdout(Stdio::null()).status();
        assert!(status.expect("claude -p").success());
        cold.push(ms(started));
    }
    out.push_str("\n## 2. First message after session create\n\n");
    out.push_str(TABLE_HEAD);
    out.push_str(&warm.row("warm turn (second message of the session)", None));
    out.push_str(&first.row("first message, 1.5 s after create (CLI pre-warmed)", Some(&warm)));
    out.push_str(&cold.row("cold `claude -p` (process start to exit)", Some(&warm)));
    out.push_str(&raw_warm.row("raw CLI: warm turn (second message)", None));
    out.push_str(&raw_first.row("raw CLI: first message, 1.5 s after its start", Some(&raw_warm)));
    let _ =
        writeln!(out, "\nTarget: first message ≤ 1.2 × warm turn; measured ×{:.2}.", first.pct(0.5) / warm.pct(0.5));
}

/// (first byte, last byte) of a model request.
async fn model_request(client: &reqwest::Client, base: &str, key: &str, stream: bool) -> (f64, f64) {
    let body = json!({
        "model": "claude-opus-4-bench", "max_tokens": 200, "stream": stream,
        "messages": [{"role": "user", "content": "mock:reply the quick brown fox jumps over the lazy dog"}],
    });
    let started = Instant::now();
    let response = client
        .post(format!("{base}/v1/messages?beta=true"))
        .header("x-api-key", key)
        .json(&body)
        .send()
        .await
        .expect("request");
    assert!(response.status().is_success(), "{}", response.status());
    let mut first = None;
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        chunk.expect("chunk");
        first.get_or_insert_with(|| ms(started));
    }
    (first.unwrap_or(f64::NAN), ms(started))
}

/// The model proxy against direct access to the mock.
async fn proxy(plan: &Plan, mock: &MockServer, server: &TestServer, token: &str, out: &mut String) {
    let session = server.session(token, json!({})).await;
    let (proxy_url, credential) = session_model_credential(&session).await;
    let client = reqwest::Client::new();
    let direct = mock.base_url();
    let mut s: [[Samples; 2]; 3] = Default::default();
    for round in 0..plan.proxy_requests + 20 {
        for path in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            let (url, key) =
                if path == 0 { (direct.as_str(), "bench") } else { (proxy_url.as_str(), credential.as_str()) };
            let (_, whole) = model_request(&client, url, key, false).await;
            let (first, last) = model_request(&client, url, key, true).await;
            if round >= 20 {
                s[0][path].push(whole);
                s[1][path].push(first);
                s[2][path].push(last);
            }
        }
    }
    out.push_str("\n## Model proxy overhead (issue 7)\n\n");
    out.push_str(TABLE_HEAD);
    for (name, [d, p]) in
        ["non-streamed request", "streamed request, first byte", "streamed request, last byte"].iter().zip(s.iter())
    {
        out.push_str(&d.row(&format!("direct to the mock: {name}"), None));
        out.push_str(&p.row(&format!("through the proxy: {name}"), Some(d)));
    }
}

/// GET /api/v1/sessions/{id} requests per second, 16 at a time.
async fn get_throughput(seconds: f64, server: &TestServer, token: &str) -> (f64, Samples) {
    let session = server.session(token, json!({})).await;
    let url = server.url(&format!("/api/v1/sessions/{session}"));
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (client, url, token) = (client.clone(), url.clone(), token.to_owned());
            tokio::spawn(async move {
                let mut latencies = Samples::default();
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let response = client.get(&url).bearer_auth(&token).send().await.expect("get");
                    assert!(response.status().is_success());
                    response.bytes().await.expect("body");
                    latencies.push(ms(started));
                }
                latencies
            })
        })
        .collect();
    let mut all = Samples::default();
    for task in tasks {
        all.0.extend(task.await.expect("task").0);
    }
    (all.0.len() as f64 / seconds, all)
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// API-only throughput on both backends, and the control plane's memory.
async fn api_and_memory(plan: &Plan, mock: &MockServer, out: &mut String) {
    out.push_str("\n## 8. API-only throughput (GET /api/v1/sessions/{id}, 16 concurrent clients)\n\n");
    out.push_str("| backend | requests/s | p50 ms | p99 ms |\n|---|---|---|---|\n");
    let mut sqlite_rate = 0.0;
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let server = server(mock, backend).await;
        let token = server.user_with_token("reader").await;
        let (rate, latency) = get_throughput(plan.api_seconds, &server, &token).await;
        if backend == Backend::Sqlite {
            sqlite_rate = rate;
        }
        let _ = writeln!(out, "| {backend:?} | {rate:.0} | {:.2} | {:.2} |", latency.pct(0.5), latency.pct(0.99));
    }
    let _ = writeln!(out, "\nTarget: ≥ 5,000 GET/s on SQLite; measured {sqlite_rate:.0}.");

    out.push_str("\n## 6. Memory of the control plane\n\n| state | RSS MiB |\n|---|---|\n");
    let mut server = server(mock, Backend::Sqlite).await;
    let token = server.user_with_token("mem").await;
    let _ = writeln!(out, "| idle, after start | {:.1} |", rss_mib(server.pid));
    // 10,000 stored sessions, written straight into the database (through
    // the API each would start a CLI; stored as expired, so they do not
    // count against the open-session limits), then the server restarted.
    let template = server.session(&token, json!({})).await;
    server.delete(&format!("/api/v1/sessions/{template}"), &token).await;
    server.terminate().await;
    let stored = if plan.turns > 10 { 10_000 } else { 500 };
    insert_sessions(&server.dir.path().join("db/sessions.db"), "mem", stored).await;
    let server = server.restart().await;
    let page = server.get("/api/v1/sessions?detail=true&limit=1000&status=all", &token).await;
    assert_eq!(page.status, reqwest::StatusCode::OK, "{page:?}");
    let stored_rss = rss_mib(server.pid);
    let _ = writeln!(out, "| {stored} sessions stored, after listing a page | {stored_rss:.1} |");
    let before = rss_mib(server.pid);
    let open = if plan.turns > 10 { 16 } else { 2 };
    let mut sessions = Vec::new();
    for i in 0..open {
        let session = server.session(&token, json!({})).await;
        api_turn(&server, &token, &session, &format!("hello {i}")).await;
        sessions.push(session);
    }
    let after = rss_mib(server.pid);
    let _ = writeln!(out, "| {open} open sessions with a turn each (CLIs not counted: own processes) | {after:.1} |");
    let _ = writeln!(
        out,
        "\nTargets: ≤ 40 MB with 10,000 stored sessions (measured {stored_rss:.1} MiB); ≤ 5 MB per open session \
         beyond the CLI's own (measured {:.2} MiB in the control plane; the worker, shared by a user's sessions, \
         is about 3 MiB, section 5).",
        (after - before) / open as f64
    );
}

/// Rows for `sessions`, as the server's migrations define them.
async fn insert_sessions(db: &Path, user: &str, count: usize) {
    use sqlx::Connection;
    let url = format!("sqlite://{}", db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.expect("sqlite");
    let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info('sessions')")
        .fetch_all(&mut conn)
        .await
        .expect("columns");
    // Copy an existing row's shape: clone the user's newest session row.
    let mut tx = conn.begin().await.expect("tx");
    let select: Vec<String> = columns
        .iter()
        .map(|c| match c.as_str() {
            "session_id" | "cli_session_id" => format!("'bench-' || ?1 || '-' || {c}"),
            "user_id" => "?2".into(),
            "status" => "'expired'".into(),
            other => other.to_owned(),
        })
        .collect();
    let seed = format!(
        "INSERT INTO sessions ({cols}) SELECT {sel} FROM sessions LIMIT 1",
        cols = columns.join(", "),
        sel = select.join(", ")
    );
    let exists: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions").fetch_one(&mut *tx).await.expect("count");
    assert!(exists > 0, "needs one session to copy");
    for i in 0..count {
        sqlx::query(&seed).bind(i.to_string()).bind(user).execute(&mut *tx).await.expect("insert");
    }
    tx.commit().await.expect("commit");
}

/// Concurrent sessions doing warm turns: throughput and tail latency.
async fn scale(plan: &Plan, mock: &MockServer, out: &mut String) {
    out.push_str("\n## 9. Scale: concurrent sessions doing warm turns (one user each)\n\n");
    out.push_str("| sessions | turns/s | p50 ms | p99 ms | control plane RSS MiB |\n|---|---|---|---|---|\n");
    for &n in plan.scale {
        let server = server(mock, Backend::Sqlite).await;
        let mut clients = Vec::new();
        for i in 0..n {
            let token = server.user_with_token(&format!("u{i}")).await;
            let session = server.session(&token, json!({})).await;
            api_turn(&server, &token, &session, "warm up").await;
            clients.push((token, session));
        }
        let started = Instant::now();
        let server_ref = &server;
        let runs = clients.iter().map(|(token, session)| async move {
            let mut latencies = Samples::default();
            for t in 0..plan.scale_turns {
                latencies.push(api_turn(server_ref, token, session, &format!("turn {t}")).await);
            }
            latencies
        });
        let results = futures::future::join_all(runs).await;
        let elapsed = started.elapsed().as_secs_f64();
        let mut all = Samples::default();
        for r in results {
            all.0.extend(r.0);
        }
        let _ = writeln!(
            out,
            "| {n} | {:.1} | {:.1} | {:.1} | {:.1} |",
            all.0.len() as f64 / elapsed,
            all.pct(0.5),
            all.pct(0.99),
            rss_mib(server.pid)
        );
    }
}

/// The worker's confinement, per layer (the `worker-startup` binary).
fn confinement(plan: &Plan, out: &mut String) {
    out.push_str("\n## 5. Confinement: worker start to ready, per layer (cgroup join not included)\n\n");
    let binary = integration_tests::binary_path("worker-startup");
    let output = Command::new(binary).arg(plan.confinement_runs.to_string()).output().expect("worker-startup");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    out.push_str(&String::from_utf8_lossy(&output.stdout));
}

fn machine() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo").lines().find_map(|l| l.strip_prefix("model name")).unwrap_or(": ?").to_owned();
    let version = Command::new(claude_cli())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    format!(
        "- machine: {} CPUs ({}), kernel {}\n- Claude CLI: {}\n- build: {}\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu.trim_start_matches(|c: char| c == ':' || c.is_whitespace()),
        read("/proc/sys/kernel/osrelease").trim(),
        version.unwrap_or_default(),
        if cfg!(debug_assertions) { "debug (figures not comparable)" } else { "release" },
    )
}

#[allow(clippy::print_stdout)]
#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out_path = args.iter().position(|a| a == "--out").and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let plan = if quick { &QUICK } else { &FULL };
    let started = Instant::now();
    let mut out = format!(
        "# Benchmarks\n\nProduced by `cargo run --release -p integration-tests --bin bench --{}` (as root), on loopback with the \
         real server, the real pinned CLI and the mock model; compared figures are interleaved in one run.\n\n{}",
        if quick { " --quick" } else { "" },
        machine()
    );
    let mock = MockModel::start().await.expect("mock");
    {
        let server = server(&mock, Backend::Sqlite).await;
        let token = server.user_with_token("bench").await;
        turns(plan, &mock, &server, &token, &mut out).await;
        first_messages(plan, &mock, &server, &token, &mut out).await;
        proxy(plan, &mock, &server, &token, &mut out).await;
    }
    api_and_memory(plan, &mock, &mut out).await;
    scale(plan, &mock, &mut out).await;
    confinement(plan, &mut out);
    let _ = writeln!(out, "\nTotal run time: {:.0} s.", started.elapsed().as_secs_f64());
    println!("{out}");
    if let Some(path) = out_path {
        std::fs::write(&path, &out).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}
