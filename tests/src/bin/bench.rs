//! The benchmark harness: the service against the raw CLI, side by side in
//! one run on one machine. It starts the real server, the real pinned CLI
//! and the mock model on loopback, interleaves what it compares (so machine
//! noise hits both sides alike) and writes a markdown table of medians, p90
//! and p99 with the ratio or difference against the baseline of the same
//! run. Run as root (the confinement section drops uids, the proxy section
//! reads a CLI's credential from /proc):
//!
//! `cargo run --release -p integration-tests --bin bench -- [--quick] [--only turns,relay,...] [--out BENCHMARKS.md]`
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
    resume_runs: usize,
    /// Reply sizes of the relay section in MB (10^6 bytes), each with its repetitions.
    relay: &'static [(usize, usize)],
    /// The same with a stand-in CLI that writes its reply at once.
    relay_capacity: &'static [(usize, usize)],
}

const FULL: Plan = Plan {
    turns: 200,
    first_messages: 8,
    cold_runs: 5,
    proxy_requests: 400,
    api_seconds: 5.0,
    scale: &[1, 8, 32, 64],
    scale_turns: 10,
    confinement_runs: 100,
    resume_runs: 20,
    relay: &[(1, 10), (10, 5), (33, 2), (100, 2)],
    relay_capacity: &[(10, 5), (100, 3)],
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
    resume_runs: 2,
    relay: &[(1, 1), (10, 1), (100, 1)],
    relay_capacity: &[(10, 1)],
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
        self.row_with(name, baseline, &[])
    }

    /// A row of [`TABLE_HEAD`] followed by `extra` cells.
    fn row_with(&self, name: &str, baseline: Option<&Samples>, extra: &[String]) -> String {
        let versus = match baseline {
            Some(b) => format!("{:+.2} ms, ×{:.2}", self.pct(0.5) - b.pct(0.5), self.pct(0.5) / b.pct(0.5)),
            None => "baseline".into(),
        };
        let mut row = format!(
            "| {name} | {:.2} | {:.2} | {:.2} | {versus} | {} |",
            self.pct(0.5),
            self.pct(0.9),
            self.pct(0.99),
            self.0.len()
        );
        for cell in extra {
            let _ = write!(row, " {cell} |");
        }
        row.push('\n');
        row
    }
}

const TABLE_HEAD: &str = "| what | p50 ms | p90 ms | p99 ms | vs baseline (p50) | n |\n|---|---|---|---|---|---|\n";

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// The raw CLI in streaming-input mode, as a user would drive it.
struct RawCli {
    child: Child,
    /// `None` once closed by [`RawCli::finish`].
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    _own_home: Option<tempfile::TempDir>,
}

impl RawCli {
    /// A CLI with a fresh HOME of its own.
    fn start(mock: &MockServer, extra: &[&str]) -> Self {
        let home = tempfile::tempdir().expect("home");
        let mut cli = Self::start_in(mock, home.path(), extra);
        cli._own_home = Some(home);
        cli
    }

    /// A CLI whose HOME (its transcripts) is `home`.
    fn start_in(mock: &MockServer, home: &Path, extra: &[&str]) -> Self {
        let mut child = raw_command(mock, home)
            .args(["-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("raw CLI");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self { child, stdin, stdout, _own_home: None }
    }

    /// One turn: write a user line, read until `result`; its latency.
    fn turn(&mut self, text: &str) -> f64 {
        self.try_turn(text).unwrap_or_else(|e| panic!("raw CLI turn: {e}"))
    }

    /// One turn; its latency, or why it did not end in a successful `result`.
    fn try_turn(&mut self, text: &str) -> Result<f64, String> {
        let started = Instant::now();
        let line = json!({"type": "user", "message": {"role": "user", "content": text}});
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").and_then(|()| stdin.flush()).map_err(|e| format!("write: {e}"))?;
        let mut buffer = String::new();
        loop {
            buffer.clear();
            if self.stdout.read_line(&mut buffer).map_err(|e| format!("read: {e}"))? == 0 {
                return Err(format!("the CLI exited ({:?})", self.child.wait().map_err(|e| e.to_string())?));
            }
            // The filler text of big replies holds no quotes: only a real `result` line matches.
            if buffer.contains("\"type\":\"result\"") {
                if buffer.contains("\"is_error\":true") {
                    return Err(format!("error result: {:.200}", buffer.trim()));
                }
                return Ok(ms(started));
            }
        }
    }

    /// Closes stdin and waits until the CLI has exited (its transcript written).
    fn finish(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
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

/// The bench's server configuration: limits raised for the scale section.
fn bench_config(backend: Backend) -> ServerConfig {
    ServerConfig::backend(backend)
        .env("CLAUDE_AGENT_MAX_SESSIONS", "200")
        .env("CLAUDE_AGENT_MAX_SESSIONS_PER_USER", "100")
        .env("CLAUDE_AGENT_MAX_CONCURRENT", "100")
        .env("CLAUDE_AGENT_API__MAX_WARM_SESSIONS", "100")
        .env("CLAUDE_AGENT_API__MAX_WARM_SESSIONS_PER_USER", "100")
        .env("CLAUDE_AGENT_LOG__LEVEL", "warn")
}

/// A server with the real CLI.
async fn server(mock: &MockServer, backend: Backend) -> TestServer {
    TestServer::start_with(bench_config(backend).with_cli(mock)).await
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

/// The flag the server gives every CLI beyond the raw CLI's: one stream
/// event per model delta (the SSE relay is made of them).
const PARTIAL_MESSAGES: &str = "--include-partial-messages";

/// A conversation resumed after a server restart vs the raw CLI resuming its own.
async fn resume_after_restart(plan: &Plan, mock: &MockServer, out: &mut String) {
    // The SQLite file and the users' directories (the CLIs' transcripts)
    // outlive the restart, as in production.
    let mut server = server(mock, Backend::Sqlite).await;
    let token = server.user_with_token("resumer").await;
    let (mut raw, mut api) = (Samples::default(), Samples::default());
    for i in 0..plan.resume_runs {
        // Alternate the order so neither side always goes first.
        let raw_first = i % 2 == 0;
        if raw_first {
            raw.push(raw_resume(mock, i));
        }
        let session = server.session(&token, json!({})).await;
        api_turn(&server, &token, &session, &format!("before restart {i}")).await;
        server = server.restart().await;
        // The CLI is gone with the old server: this turn starts it with `--resume`.
        api.push(api_turn(&server, &token, &session, &format!("after restart {i}")).await);
        server.delete(&format!("/api/v1/sessions/{session}"), &token).await;
        if !raw_first {
            raw.push(raw_resume(mock, i));
        }
    }
    out.push_str("\n## 4. Resume after a server restart (raw `claude --resume` vs the API)\n\n");
    out.push_str(TABLE_HEAD);
    out.push_str(&raw.row("raw CLI: `claude --resume` of a one-turn conversation, process start to `result`", None));
    out.push_str(&api.row("POST /api/v1/chat, first turn after a server restart (CLI resumed)", Some(&raw)));
    let ratio = api.pct(0.5) / raw.pct(0.5);
    let _ = writeln!(out, "\nTarget: ≤ 1.1 × raw; measured ×{ratio:.2}: {}.", met(ratio <= 1.1));
}

/// The raw CLI: a one-turn conversation whose CLI has exited, then the
/// latency of `claude --resume` from process start to its next `result`.
fn raw_resume(mock: &MockServer, i: usize) -> f64 {
    let home = tempfile::tempdir().expect("home");
    let id = uuid::Uuid::new_v4().to_string();
    let mut first = RawCli::start_in(mock, home.path(), &[PARTIAL_MESSAGES, "--session-id", &id]);
    first.turn(&format!("before exit {i}"));
    first.finish();
    let started = Instant::now();
    let mut resumed = RawCli::start_in(mock, home.path(), &[PARTIAL_MESSAGES, "--resume", &id]);
    resumed.turn(&format!("after exit {i}"));
    ms(started)
}

fn met(yes: bool) -> &'static str {
    if yes { "met" } else { "not met" }
}

/// A run that failed: when it showed (ms since the timed request) and how.
#[derive(Clone)]
struct Failure {
    after: f64,
    error: String,
}

impl Failure {
    fn since(started: Instant, error: impl Into<String>) -> Self {
        // Its text goes into a markdown table.
        Self { after: ms(started), error: error.into().replace('|', "/") }
    }
}

/// Latencies of one side of a comparison that may fail, and its failures.
#[derive(Default)]
struct Outcomes {
    times: Samples,
    failures: Vec<Failure>,
}

impl Outcomes {
    fn record(&mut self, outcome: Result<f64, Failure>) {
        match outcome {
            Ok(took) => self.times.push(took),
            Err(failure) => self.failures.push(failure),
        }
    }

    /// A row with MB/s at p50 for `bytes`, or what went wrong if no run succeeded.
    fn row(&self, name: &str, baseline: Option<&Samples>, bytes: usize) -> String {
        let failed = match self.failures.first() {
            Some(Failure { after, error }) => {
                format!("{} of {} runs fail (first after {after:.0} ms: {error})", self.failures.len(), self.runs())
            }
            None => "none".into(),
        };
        if self.times.0.is_empty() {
            return format!("| {name} | – | – | – | – | 0 | – | {failed} |\n");
        }
        let baseline = baseline.filter(|b| !b.0.is_empty());
        let rate = bytes as f64 / 1e6 / (self.times.pct(0.5) / 1000.0);
        self.times.row_with(name, baseline, &[format!("{rate:.1}"), failed])
    }

    fn runs(&self) -> usize {
        self.times.0.len() + self.failures.len()
    }
}

/// A big reply (`mock:reply-bytes`) relayed by the service (SSE and sync)
/// vs read from the raw CLI.
async fn relay_throughput(plan: &Plan, mock: &MockServer, out: &mut String) {
    let server = server(mock, Backend::Sqlite).await;
    let token = server.user_with_token("relay").await;
    // Without the harness client's 60 s limit on a whole response.
    let client = reqwest::Client::new();
    out.push_str("\n## 7. Relay throughput: a big reply through the API vs read from the raw CLI\n\n");
    out.push_str(
        "The mock streams N MB (10^6 bytes) of text in 64 KiB deltas. Raw CLI: write a line, read stdout until \
         `result`. SSE: `POST /api/v1/chat/stream` until the `result` event, and until `done` (sent once the turn \
         is stored). Sync: `POST /api/v1/chat` until its whole body (the text, and every message of the turn). \
         Each run uses a fresh conversation after one small warm-up turn (a big reply would go back to the model \
         with every later turn); the raw CLI runs with `--include-partial-messages` as the server's do.\n\n",
    );
    out.push_str(RELAY_TABLE_HEAD);
    let mut verdicts = Vec::new();
    for &(megabytes, runs) in plan.relay {
        let bytes = megabytes * 1_000_000;
        let prompt = format!("mock:reply-bytes {bytes}");
        let [mut raw, mut sse_result, mut sse_done, mut sync] = <[Outcomes; 4]>::default();
        for run in 0..runs {
            // Alternate the order so neither side always goes first.
            let raw_first = run % 2 == 0;
            if raw_first {
                raw.record(raw_relay(mock, &prompt));
            }
            let session = warm_session(&server, &token).await;
            let outcome = sse_timed_raw(&client, &server, &token, &session, &prompt).await;
            record_sse(&mut sse_result, &mut sse_done, outcome);
            server.delete(&format!("/api/v1/sessions/{session}"), &token).await;
            let session = warm_session(&server, &token).await;
            sync.record(sync_timed_raw(&client, &server, &token, &session, &prompt).await);
            server.delete(&format!("/api/v1/sessions/{session}"), &token).await;
            if !raw_first {
                raw.record(raw_relay(mock, &prompt));
            }
            // The mock's request log keeps every reply's text.
            mock.model.clear_requests();
        }
        relay_rows(out, &format!("raw CLI, {megabytes} MB reply"), megabytes, [&raw, &sse_result, &sse_done, &sync]);
        let ok = sse_result.failures.is_empty() && sse_result.times.pct(0.5) <= 1.1 * raw.times.pct(0.5);
        verdicts.push(format!("{megabytes} MB {}", met(ok)));
    }
    let _ =
        writeln!(out, "\nTarget: every size streams through SSE, `result` p50 ≤ 1.1 × raw; {}.", verdicts.join(", "));
}

const RELAY_TABLE_HEAD: &str = "| what | p50 ms | p90 ms | p99 ms | vs baseline (p50) | n | MB/s at p50 | failures |\n\
     |---|---|---|---|---|---|---|---|\n";

/// An SSE run's two figures (to `result`, to `done`), or its failure in both.
fn record_sse(to_result: &mut Outcomes, to_done: &mut Outcomes, outcome: Result<(f64, f64), Failure>) {
    match outcome {
        Ok((result, done)) => {
            to_result.record(Ok(result));
            to_done.record(Ok(done));
        }
        Err(failure) => {
            to_result.record(Err(failure.clone()));
            to_done.record(Err(failure));
        }
    }
}

/// The rows of one reply size: the baseline, then SSE to `result` and to
/// `done`, and sync, against it.
fn relay_rows(
    out: &mut String,
    baseline_name: &str,
    megabytes: usize,
    [raw, sse_result, sse_done, sync]: [&Outcomes; 4],
) {
    let bytes = megabytes * 1_000_000;
    let baseline = Some(&raw.times);
    out.push_str(&raw.row(baseline_name, None, bytes));
    out.push_str(&sse_result.row(&format!("SSE, {megabytes} MB reply, `result` event"), baseline, bytes));
    out.push_str(&sse_done.row(&format!("SSE, {megabytes} MB reply, `done` event"), baseline, bytes));
    out.push_str(&sync.row(&format!("POST /api/v1/chat, {megabytes} MB reply"), baseline, bytes));
}

/// The relay's own capacity: the stand-in CLI (`sandbox-probe`) writes a
/// reply of N MB in the CLI's stream-json at once, so the figure is the
/// worker's, the control plane's and the HTTP stack's, not the CLI's (whose
/// own rate, section 7, is 10–20 MB/s).
async fn relay_capacity(plan: &Plan, out: &mut String) {
    let server = TestServer::start_with(bench_config(Backend::Sqlite)).await;
    let token = server.user_with_token("capacity").await;
    let client = reqwest::Client::new();
    out.push_str("\n### Relay capacity (stand-in CLI that writes the reply at once)\n\n");
    out.push_str(
        "The stand-in writes N MB as 64 KiB `text_delta` stream events, then the assistant message and the result \
         (each holding the whole text), like the CLI. Baseline: the stand-in run directly, write a line, read stdout \
         until `result`. The service adds the worker (pipe, framing, socket), the control plane (parsing each line, \
         building frames) and HTTP. The SSE client reads the stream as bytes and each event's type from its first \
         key, without holding events; a `gap` (a frame dropped before the client read it) fails the run.\n\n",
    );
    out.push_str(RELAY_TABLE_HEAD);
    let mut verdicts = Vec::new();
    for &(megabytes, runs) in plan.relay_capacity {
        let bytes = megabytes * 1_000_000;
        let prompt = format!("probe:reply-bytes {bytes}");
        let [mut raw, mut sse_result, mut sse_done, mut sync] = <[Outcomes; 4]>::default();
        for run in 0..runs {
            let raw_first = run % 2 == 0;
            if raw_first {
                raw.record(stand_in_relay(&prompt));
            }
            let session = server.session(&token, json!({})).await;
            let outcome = sse_timed_raw(&client, &server, &token, &session, &prompt).await;
            record_sse(&mut sse_result, &mut sse_done, outcome);
            sync.record(sync_timed_raw(&client, &server, &token, &session, &prompt).await);
            server.delete(&format!("/api/v1/sessions/{session}"), &token).await;
            if !raw_first {
                raw.record(stand_in_relay(&prompt));
            }
        }
        let baseline = format!("stand-in read directly, {megabytes} MB reply");
        relay_rows(out, &baseline, megabytes, [&raw, &sse_result, &sse_done, &sync]);
        let rate = |outcomes: &Outcomes| bytes as f64 / 1e6 / (outcomes.times.pct(0.5) / 1000.0);
        let ok = sse_result.failures.is_empty() && rate(&sse_result) >= 100.0;
        verdicts.push(format!("{megabytes} MB {:.0} MB/s, {}", rate(&sse_result), met(ok)));
    }
    let _ = writeln!(out, "\nTarget: ≥ 100 MB/s through SSE (to `result`); {}.", verdicts.join("; "));
}

/// The stand-in CLI run directly: write the request, read until `result`.
fn stand_in_relay(prompt: &str) -> Result<f64, Failure> {
    let dir = tempfile::tempdir().expect("dir");
    let mut child = Command::new(integration_tests::binary_path("sandbox-probe"))
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("stand-in");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let started = Instant::now();
    let line = json!({"type": "user", "message": {"role": "user", "content": prompt}});
    let written = writeln!(stdin, "{line}").and_then(|()| stdin.flush());
    let mut buffer = String::new();
    let outcome = loop {
        if let Err(e) = &written {
            break Err(Failure::since(started, e.to_string()));
        }
        buffer.clear();
        match stdout.read_line(&mut buffer) {
            Ok(0) => break Err(Failure::since(started, "the stand-in exited")),
            Ok(_) if buffer.contains("\"type\":\"result\"") => break Ok(ms(started)),
            Ok(_) => {}
            Err(e) => break Err(Failure::since(started, e.to_string())),
        }
    };
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    outcome
}

/// The raw side of the relay section: a fresh CLI, a warm-up turn, the big turn.
fn raw_relay(mock: &MockServer, prompt: &str) -> Result<f64, Failure> {
    let mut cli = RawCli::start(mock, &[PARTIAL_MESSAGES]);
    cli.turn("warm up");
    let started = Instant::now();
    cli.try_turn(prompt).map_err(|error| Failure::since(started, error))
}

/// A fresh session with one small turn done: its CLI warm, its conversation started.
async fn warm_session(server: &TestServer, token: &str) -> String {
    let session = server.session(token, json!({})).await;
    api_turn(server, token, &session, "warm up").await;
    session
}

/// The body of a chat request with a timeout that big replies do not hit.
fn big_chat(session: &str, text: &str) -> serde_json::Value {
    json!({"session_id": session, "message": text, "timeout": 600})
}

/// A sync turn whose (big) body is read whole but not parsed.
async fn sync_timed_raw(
    client: &reqwest::Client,
    server: &TestServer,
    token: &str,
    session: &str,
    text: &str,
) -> Result<f64, Failure> {
    let started = Instant::now();
    let response = client
        .post(server.url("/api/v1/chat"))
        .bearer_auth(token)
        .json(&big_chat(session, text))
        .send()
        .await
        .map_err(|e| Failure::since(started, e.to_string()))?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| Failure::since(started, e.to_string()))?;
    if status != reqwest::StatusCode::OK {
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        return Err(Failure::since(started, format!("HTTP {status}: {}", error["detail"].as_str().unwrap_or("?"))));
    }
    Ok(ms(started))
}

/// An SSE turn read as bytes: frames of megabytes are not parsed (the raw
/// CLI's lines are not either); a frame's kind is its first key, `type`.
async fn sse_timed_raw(
    client: &reqwest::Client,
    server: &TestServer,
    token: &str,
    session: &str,
    text: &str,
) -> Result<(f64, f64), Failure> {
    let started = Instant::now();
    let response = client
        .post(server.url("/api/v1/chat/stream"))
        .bearer_auth(token)
        .json(&big_chat(session, text))
        .send()
        .await
        .map_err(|e| Failure::since(started, e.to_string()))?;
    if response.status() != reqwest::StatusCode::OK {
        return Err(Failure::since(started, format!("HTTP {}", response.status())));
    }
    let mut body = response.bytes_stream();
    // Read as a stream of bytes, never held whole: a frame's type is its
    // first key, so the first bytes of an event say what it is, and its end
    // is the first blank line. (What the harness does with a frame stays
    // out of the figure; a client that uses the text reads the same bytes.)
    let mut head: Vec<u8> = Vec::new();
    const HEAD: usize = 512;
    let mut after_newline = false;
    let mut result_at = None;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Failure::since(started, format!("the stream broke: {e}")))?;
        let mut from = 0;
        for newline in memchr::memchr_iter(b'\n', &chunk).chain(std::iter::once(chunk.len())) {
            let segment = &chunk[from..newline];
            if head.len() < HEAD {
                head.extend_from_slice(&segment[..segment.len().min(HEAD - head.len())]);
            }
            if newline == chunk.len() {
                after_newline &= segment.is_empty();
                break;
            }
            let blank_line = segment.is_empty() && after_newline;
            after_newline = true;
            from = newline + 1;
            if !blank_line {
                head.push(b'\n');
                continue;
            }
            // An event ended: its `data:` line's start says its type.
            let data = head.split(|b| *b == b'\n').find_map(|l| l.strip_prefix(b"data: ")).unwrap_or_default();
            let is = |kind: &str| data.starts_with(format!("{{\"type\":\"{kind}\"").as_bytes());
            // A `gap` means frames were dropped before this client read
            // them: the reply did not stream whole.
            if is("error") || is("lagged") || is("gap") {
                return Err(Failure::since(started, format!("`{}` event", String::from_utf8_lossy(data))));
            }
            if is("done") {
                return Ok((result_at.unwrap_or(f64::NAN), ms(started)));
            }
            if is("result") {
                result_at = Some(ms(started));
            }
            head.clear();
        }
    }
    Err(Failure::since(started, "the stream ended without `done`"))
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

/// Concurrent clients of the API-only throughput section.
const API_CLIENTS: usize = 16;

/// Requests per second and latencies of `request` sent by [`API_CLIENTS`]
/// clients at once for `seconds` (the rate over the time until the last
/// answer: slow requests still running at the deadline count);
/// `request(client)` builds client number `client`'s next request, which
/// must answer `expected`.
async fn hammer(
    seconds: f64,
    expected: reqwest::StatusCode,
    request: impl Fn(usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
) -> (f64, Samples) {
    let request = std::sync::Arc::new(request);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    // A task each, so the clients use every runtime thread.
    let clients: Vec<_> = (0..API_CLIENTS)
        .map(|client| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut latencies = Samples::default();
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let response = request(client).send().await.expect("request");
                    assert_eq!(response.status(), expected);
                    response.bytes().await.expect("body");
                    latencies.push(ms(started));
                }
                latencies
            })
        })
        .collect();
    let mut all = Samples::default();
    for client in clients {
        all.0.extend(client.await.expect("client task").0);
    }
    (all.0.len() as f64 / started.elapsed().as_secs_f64(), all)
}

/// GET /api/v1/sessions/{id} requests per second.
async fn get_throughput(seconds: f64, server: &TestServer, token: &str) -> (f64, Samples) {
    let session = server.session(token, json!({})).await;
    let (client, url, token) =
        (reqwest::Client::new(), server.url(&format!("/api/v1/sessions/{session}")), token.to_owned());
    hammer(seconds, reqwest::StatusCode::OK, move |_| client.get(&url).bearer_auth(&token)).await
}

/// POST /api/v1/sessions per second, each client creating for a user of its own.
async fn create_throughput(seconds: f64, server: &TestServer) -> (f64, Samples) {
    let mut tokens = Vec::new();
    for client in 0..API_CLIENTS {
        let token = server.user_with_token(&format!("creator{client}")).await;
        // The user's first session also starts the user's worker: not timed.
        server.session(&token, json!({})).await;
        tokens.push(token);
    }
    let (client, url) = (reqwest::Client::new(), server.url("/api/v1/sessions"));
    hammer(seconds, reqwest::StatusCode::CREATED, move |i| client.post(&url).bearer_auth(&tokens[i]).json(&json!({})))
        .await
}

/// Warm CLIs of the create section's server with the real CLI: beyond,
/// each create stops the least recently used one (as a full server does).
const CREATE_WARM_CAP: &str = "32";

/// A server for the create section, whose session limits never bind.
/// `real_cli`: sessions start the real CLI (the pre-warm); else an idle
/// stand-in (the harness's `sandbox-probe`), so the figure is the control
/// plane's, the store's and the worker's spawn, not the CLI's start.
async fn create_bench_server(backend: Backend, real_cli: Option<&MockServer>) -> TestServer {
    let unlimited = "1000000";
    let warm = if real_cli.is_some() { CREATE_WARM_CAP } else { unlimited };
    let mut config = bench_config(backend)
        .env("CLAUDE_AGENT_MAX_SESSIONS", unlimited)
        .env("CLAUDE_AGENT_MAX_SESSIONS_PER_USER", unlimited)
        .env("CLAUDE_AGENT_API__MAX_WARM_SESSIONS", warm)
        .env("CLAUDE_AGENT_API__MAX_WARM_SESSIONS_PER_USER", warm);
    if let Some(mock) = real_cli {
        config = config.with_cli(mock);
    }
    TestServer::start_with(config).await
}

fn rss_mib(pid: u32) -> f64 {
    kib_field_mib(&std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(), "VmRSS:")
}

/// A `/proc` field given in kB (`VmRSS:   1234 kB`), in MiB; 0 when absent.
fn kib_field_mib(text: &str, key: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Milliseconds of one clock tick (the unit of /proc CPU times).
fn tick_ms() -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    1000.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// CPU time (user + system) a process has used so far, ms.
fn process_cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command's closing parenthesis start with the
    // state (field 3); utime and stime are fields 14 and 15.
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().map(|f| f.parse().unwrap_or(0.0)).collect())
        .unwrap_or_default();
    (fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)) * tick_ms()
}

/// CPU time the whole machine has been busy so far, all CPUs (idle and
/// iowait left out), ms.
fn machine_busy_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .map(|l| l.split_whitespace().map(|f| f.parse().unwrap_or(0.0)).collect())
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let busy: f64 = ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    busy * tick_ms()
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

    out.push_str(&format!(
        "\n### Session create (POST /api/v1/sessions, {API_CLIENTS} concurrent clients, one user each)\n\n"
    ));
    out.push_str("| backend | CLI started by each create | creates/s | p50 ms | p99 ms |\n|---|---|---|---|---|\n");
    let mut sqlite_creates = 0.0;
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let server = create_bench_server(backend, None).await;
        let (rate, latency) = create_throughput(plan.api_seconds, &server).await;
        if backend == Backend::Sqlite {
            sqlite_creates = rate;
        }
        let _ = writeln!(
            out,
            "| {backend:?} | idle stand-in (`sandbox-probe`) | {rate:.0} | {:.2} | {:.2} |",
            latency.pct(0.5),
            latency.pct(0.99)
        );
    }
    // The same with the real CLI, to show what bounds it: every create
    // starts a CLI, and their starts share the machine's CPUs.
    {
        let server = create_bench_server(Backend::Sqlite, Some(mock)).await;
        let (rate, latency) = create_throughput(plan.api_seconds, &server).await;
        let _ = writeln!(
            out,
            "| Sqlite | the real CLI (pre-warm; at most {CREATE_WARM_CAP} warm, then each create stops one) | \
             {rate:.0} | {:.2} | {:.2} |",
            latency.pct(0.5),
            latency.pct(0.99)
        );
    }
    let _ = writeln!(
        out,
        "\nTarget: ≥ 100 creates/s on SQLite with the stand-in CLI (the control plane, store and worker spawn); \
         measured {sqlite_creates:.0}: {}.",
        met(sqlite_creates >= 100.0)
    );

    out.push_str("\n## 6. Memory of the control plane\n\n| state | RSS MiB |\n|---|---|\n");
    let mut server = server(mock, Backend::Sqlite).await;
    let token = server.user_with_token("mem").await;
    let _ = writeln!(out, "| idle, after start | {:.1} |", rss_mib(server.pid));
    // 10,000 stored sessions, written straight into the database (through
    // the API each would start a CLI; stored as expired, so they do not
    // count against the open-session limits), then the server restarted.
    // The users of the open sessions below (one each), made now: the
    // admin token does not outlive the restart.
    let open = if plan.turns > 10 { 64 } else { 2 };
    let mut user_tokens = Vec::new();
    for i in 0..open {
        user_tokens.push(server.user_with_token(&format!("mem-{i}")).await);
    }
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
    // One user per session: each session has a worker of its own, the most
    // a session can cost (a user's sessions share one worker).
    for (i, user_token) in user_tokens.iter().enumerate() {
        let session = server.session(user_token, json!({})).await;
        api_turn(&server, user_token, &session, &format!("hello {i}")).await;
    }
    let after = rss_mib(server.pid);
    let (workers, workers_rss, workers_pss) = worker_memory(server.pid);
    let _ = writeln!(
        out,
        "| {open} open sessions of {open} users, a turn each (CLIs not counted: own processes) | {after:.1} |"
    );
    let _ = writeln!(
        out,
        "| their {workers} workers together: RSS (each counts the shared code) / PSS (shared pages split) | \
         {workers_rss:.1} / {workers_pss:.1} |"
    );
    let control_plane = (after - before) / open as f64;
    let per_session_verdict = if workers == open {
        let worker = workers_pss / workers as f64;
        let per_session = control_plane + worker;
        format!(
            "≤ 5 MB per open session beyond the CLI's own (measured {per_session:.2} MiB: {control_plane:.2} in the \
             control plane and {worker:.2} for its worker's PSS; a user's further sessions share that worker): {}",
            met(per_session <= 5.0)
        )
    } else {
        format!(
            "≤ 5 MB per open session: not measured ({workers} worker processes found for {open} users; \
             {control_plane:.2} MiB per session in the control plane)"
        )
    };
    let _ = writeln!(
        out,
        "\nTargets: ≤ 40 MB with 10,000 stored sessions (measured {stored_rss:.1} MiB with {stored}): {}; \
         {per_session_verdict}.",
        met(stored_rss <= 40.0)
    );
}

/// The server's worker processes (its children running the worker binary):
/// how many, their RSS summed, and their proportional set size summed (the
/// pages they share, such as the binary's code, split between them), MiB.
fn worker_memory(server_pid: u32) -> (usize, f64, f64) {
    let (mut count, mut rss, mut pss) = (0, 0.0, 0.0);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let is_worker = status.lines().any(|l| l.strip_prefix("Name:").is_some_and(|n| n.trim() == "claude-agent-wo"));
        let child = status.lines().any(|l| l.strip_prefix("PPid:").is_some_and(|p| p.trim() == server_pid.to_string()));
        if is_worker && child {
            count += 1;
            rss += kib_field_mib(&status, "VmRSS:");
            let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            pss += kib_field_mib(&rollup, "Pss:");
        }
    }
    (count, rss, pss)
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
    out.push_str(
        "CPU: control plane = the server process's utime + stime; machine = all CPUs' busy time (CLIs, workers, \
         the mock, this client and anything else running on the machine), both over the timed turns; /proc \
         counts in 10 ms ticks.\n\n",
    );
    out.push_str(
        "| sessions | turns/s | p50 ms | p99 ms | control plane CPU ms/turn | machine CPU ms/turn | machine busy % \
         | control plane RSS MiB |\n|---|---|---|---|---|---|---|---|\n",
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    for &n in plan.scale {
        let server = server(mock, Backend::Sqlite).await;
        let mut clients = Vec::new();
        for i in 0..n {
            let token = server.user_with_token(&format!("u{i}")).await;
            let session = server.session(&token, json!({})).await;
            api_turn(&server, &token, &session, "warm up").await;
            clients.push((token, session));
        }
        let (started, server_cpu, machine_cpu) = (Instant::now(), process_cpu_ms(server.pid), machine_busy_ms());
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
        let (server_cpu, machine_cpu) = (process_cpu_ms(server.pid) - server_cpu, machine_busy_ms() - machine_cpu);
        let mut all = Samples::default();
        for r in results {
            all.0.extend(r.0);
        }
        let turns = all.0.len() as f64;
        let _ = writeln!(
            out,
            "| {n} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.0} | {:.1} |",
            turns / elapsed,
            all.pct(0.5),
            all.pct(0.99),
            server_cpu / turns,
            machine_cpu / turns,
            100.0 * machine_cpu / (elapsed * 1000.0 * cpus),
            rss_mib(server.pid)
        );
    }
}

/// The worker's confinement, per layer (the `worker-startup` binary).
fn confinement(plan: &Plan, out: &mut String) {
    out.push_str("\n## 5. Confinement: worker start to ready, per layer\n\n");
    out.push_str(
        "Confinement: the worker's own time from its start to the end of its last confinement step; spawn→ready: \
         from spawning it to reading its `Ready` frame. The cgroup join writes the worker's pid into fresh \
         cgroups of every hierarchy the server's cgroup layer uses (v2's unified one, or v1's memory, pids, cpu \
         and freezer), as a new user's worker does.\n\n",
    );
    let binary = integration_tests::binary_path("worker-startup");
    let output = Command::new(binary).arg(plan.confinement_runs.to_string()).output().expect("worker-startup");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let table = String::from_utf8_lossy(&output.stdout);
    out.push_str(&table);
    // | all | confinement p50 | p90 | spawn→ready p50 | ...
    let all_ready = table
        .lines()
        .find(|l| l.starts_with("| all |"))
        .and_then(|l| l.split('|').nth(4))
        .and_then(|v| v.trim().parse::<f64>().ok());
    let _ = match all_ready {
        Some(micros) => writeln!(
            out,
            "\nTarget: all layers ≤ 5 ms; spawn→ready with all layers {:.2} ms: {}.",
            micros / 1000.0,
            met(micros <= 5000.0)
        ),
        None => writeln!(out, "\nTarget: all layers ≤ 5 ms; not measured (no cgroup hierarchy could be made)."),
    };
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

/// The names `--only` takes, in the order the sections run.
const SECTIONS: [&str; 9] = ["turns", "first", "proxy", "resume", "relay", "capacity", "api", "scale", "confinement"];

#[allow(clippy::print_stdout)]
#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out_path = args.iter().position(|a| a == "--out").and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let plan = if quick { &QUICK } else { &FULL };
    // `--only turns,relay` runs those sections (while working on one figure).
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(str::to_owned).collect());
    if let Some(unknown) = only.iter().flatten().find(|name| !SECTIONS.contains(&name.as_str())) {
        eprintln!("bench: unknown section {unknown:?} for --only; sections: {}", SECTIONS.join(","));
        std::process::exit(2);
    }
    if only.is_some() && out_path.is_some() {
        eprintln!("bench: --only writes no results file (BENCHMARKS.md holds whole runs); drop --out");
        std::process::exit(2);
    }
    let wanted = |section: &str| only.as_ref().is_none_or(|names| names.iter().any(|name| name == section));
    let started = Instant::now();
    let mut out = format!(
        "# Benchmarks\n\nProduced by `cargo run --release -p integration-tests --bin bench --{}` (as root), on loopback with the \
         real server, the real pinned CLI and the mock model; compared figures are interleaved in one run.\n\n{}",
        if quick { " --quick" } else { "" },
        machine()
    );
    let mock = MockModel::start().await.expect("mock");
    if wanted("turns") || wanted("first") || wanted("proxy") {
        let server = server(&mock, Backend::Sqlite).await;
        let token = server.user_with_token("bench").await;
        if wanted("turns") {
            turns(plan, &mock, &server, &token, &mut out).await;
        }
        if wanted("first") {
            first_messages(plan, &mock, &server, &token, &mut out).await;
        }
        if wanted("proxy") {
            proxy(plan, &mock, &server, &token, &mut out).await;
        }
    }
    if wanted("resume") {
        resume_after_restart(plan, &mock, &mut out).await;
    }
    if wanted("relay") {
        relay_throughput(plan, &mock, &mut out).await;
    }
    if wanted("capacity") {
        relay_capacity(plan, &mut out).await;
    }
    if wanted("api") {
        api_and_memory(plan, &mock, &mut out).await;
    }
    if wanted("scale") {
        scale(plan, &mock, &mut out).await;
    }
    if wanted("confinement") {
        confinement(plan, &mut out);
    }
    let _ = writeln!(out, "\nTotal run time: {:.0} s.", started.elapsed().as_secs_f64());
    println!("{out}");
    if let Some(path) = out_path {
        out.push_str(&hand_written_notes(&path));
        std::fs::write(&path, &out).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

/// The heading of the notes written by hand at the end of the output file
/// (profiles are not taken by this harness): kept when the file is rewritten.
const NOTES_HEADING: &str = "\n## Profiling notes";

fn hand_written_notes(path: &Path) -> String {
    let previous = std::fs::read_to_string(path).unwrap_or_default();
    previous.find(NOTES_HEADING).map(|at| previous[at..].to_owned()).unwrap_or_default()
}
