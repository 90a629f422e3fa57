//! The REAL Claude Code CLI (the pinned npm package) against the mock. Nothing here is skipped: if the CLI is not
//! installed, every test fails and says how to install it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use mock_model::{MockModel, MockServer, RequestRecord};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// How long one CLI run or one awaited line may take.
const TIMEOUT: Duration = Duration::from_secs(120);

fn claude_bin() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../node_modules/@anthropic-ai/claude-code-linux-x64/claude");
    assert!(
        path.is_file(),
        "the Claude Code CLI is not installed at {}: run `npm ci --ignore-scripts` at the repo root",
        path.display()
    );
    path
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A temporary HOME and working directory for one CLI.
struct Sandbox {
    home: TempDir,
    cwd: TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox { home: TempDir::new().expect("home"), cwd: TempDir::new().expect("cwd") }
    }

    fn stderr_path(&self) -> PathBuf {
        self.home.path().join("cli-stderr.log")
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// The CLI with a clean environment, pointed at the mock.
    fn command(&self, server: &MockServer) -> Command {
        let mut cmd = Command::new(claude_bin());
        cmd.env_clear()
            .current_dir(self.cwd.path())
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", self.home.path())
            .env("LANG", "C.UTF-8")
            .env("ANTHROPIC_BASE_URL", server.base_url())
            .env("ANTHROPIC_API_KEY", "test-key")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .kill_on_drop(true);
        if is_root() {
            // bypassPermissions is refused as root unless the CLI is told it is sandboxed.
            cmd.env("IS_SANDBOX", "1");
        }
        cmd
    }

    /// `claude -p PROMPT --output-format json ARGS…`: the parsed result object.
    async fn print_json(&self, server: &MockServer, prompt: &str, args: &[&str], env: &[(&str, &str)]) -> Value {
        let mut cmd = self.command(server);
        cmd.arg("-p").arg(prompt).args(["--output-format", "json"]).args(args).stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let output = tokio::time::timeout(TIMEOUT, cmd.output()).await.expect("claude -p timed out").expect("spawn");
        let stdout = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "claude -p did not print one JSON object ({e}); status {:?}\nstdout: {stdout}\nstderr: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }

    /// `claude -p --input-format stream-json --output-format stream-json --verbose ARGS…`.
    fn stream(&self, server: &MockServer, args: &[&str]) -> StreamCli {
        let stderr = std::fs::File::create(self.stderr_path()).expect("stderr file");
        let mut child = self
            .command(server)
            .args(["-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn claude");
        let stdin = child.stdin.take().expect("stdin");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        StreamCli { child, stdin: Some(stdin), lines }
    }
}

/// A CLI in streaming-input mode.
struct StreamCli {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl StreamCli {
    async fn send(&mut self, line: Value) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(format!("{line}\n").as_bytes()).await.expect("write stdin");
        stdin.flush().await.expect("flush stdin");
    }

    async fn send_user(&mut self, text: &str) {
        self.send(json!({"type": "user", "message": {"role": "user", "content": text}})).await;
    }

    /// The next stdout line, parsed.
    async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(TIMEOUT, self.lines.next_line())
            .await
            .expect("timed out waiting for a line from the CLI")
            .expect("read stdout")
            .expect("the CLI closed stdout");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Lines up to and including the first one `stop` accepts, each with when it arrived.
    async fn until(&mut self, stop: impl Fn(&Value) -> bool) -> Vec<(Instant, Value)> {
        let mut seen = Vec::new();
        loop {
            let v = self.next().await;
            let done = stop(&v);
            seen.push((Instant::now(), v));
            if done {
                return seen;
            }
        }
    }

    async fn until_result(&mut self) -> (Vec<(Instant, Value)>, Value) {
        let seen = self.until(|v| v["type"] == "result").await;
        let result = seen.last().map(|(_, v)| v.clone()).expect("a result");
        (seen, result)
    }

    /// Close stdin and wait for the CLI to exit.
    async fn finish(mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        tokio::time::timeout(TIMEOUT, self.child.wait()).await.expect("CLI did not exit").expect("wait")
    }
}

fn messages(server: &MockServer) -> Vec<RequestRecord> {
    server.message_requests()
}

fn text_deltas(lines: &[(Instant, Value)]) -> Vec<(Instant, String)> {
    lines
        .iter()
        .filter(|(_, v)| v["type"] == "stream_event" && v["event"]["delta"]["type"] == "text_delta")
        .map(|(t, v)| (*t, v["event"]["delta"]["text"].as_str().unwrap_or_default().to_owned()))
        .collect()
}

async fn start() -> MockServer {
    MockModel::start().await.expect("start mock")
}

// a) -----------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_mode_gets_scripted_text() {
    let server = start().await;
    let sandbox = Sandbox::new();
    let result = sandbox.print_json(&server, "mock:reply scripted hello from the mock", &[], &[]).await;
    assert_eq!(result["type"], "result", "{result}");
    assert_eq!(result["is_error"], false, "{result}");
    assert_eq!(result["result"], "scripted hello from the mock", "{result}");
    assert!(result["usage"]["output_tokens"].as_u64().unwrap_or(0) > 0, "{result}");

    let reqs = server.requests();
    assert_eq!(reqs.len(), 1, "one request per -p turn (nonessential traffic off): {reqs:#?}");
    let r = &reqs[0];
    assert_eq!((r.method.as_str(), r.path.as_str(), r.query.as_deref()), ("POST", "/v1/messages", Some("beta=true")));
    assert!(r.stream);
    assert_eq!(r.auth, "x-api-key");
    assert!(r.headers["user-agent"].starts_with("claude-cli/"), "{:?}", r.headers);
    assert_eq!(r.headers["anthropic-version"], "2023-06-01");
    assert!(r.model.is_some());
    assert_eq!(r.last_user_text.as_deref(), Some("mock:reply scripted hello from the mock"));
    assert_eq!(r.outcome, "message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_mode_echo_thinking_and_model() {
    let server = start().await;
    let sandbox = Sandbox::new();
    let echo = sandbox.print_json(&server, "just some words", &["--model", "claude-sonnet-4-5"], &[]).await;
    assert_eq!(echo["result"], "echo: just some words", "{echo}");
    assert_eq!(server.requests()[0].model.as_deref(), Some("claude-sonnet-4-5"));

    let thought =
        sandbox.print_json(&server, "mock:thinking pondering deeply\nmock:reply after thinking", &[], &[]).await;
    assert_eq!(thought["result"], "after thinking", "{thought}");
    assert_eq!(thought["is_error"], false, "{thought}");
}

// b) -----------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bash_tool_really_runs() {
    let server = start().await;
    let sandbox = Sandbox::new();
    let prompt = r#"mock:tool Bash {"command": "echo made-by-mock > created.txt && cat created.txt", "description": "create a file"}"#;
    let result = sandbox.print_json(&server, prompt, &["--permission-mode", "bypassPermissions"], &[]).await;
    let created = sandbox.cwd.path().join("created.txt");
    assert_eq!(std::fs::read_to_string(&created).expect("created.txt exists"), "made-by-mock\n");
    assert_eq!(result["is_error"], false, "{result}");
    assert_eq!(result["num_turns"], 2, "{result}");

    let reqs = messages(&server);
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    assert_eq!(reqs[0].stop_reason.as_deref(), Some("tool_use"));
    let id = reqs[0].tool_use_ids[0].clone();
    assert!(id.starts_with("toolu_"), "{id}");
    assert_eq!(reqs[1].tool_results.len(), 1);
    assert_eq!(reqs[1].tool_results[0].tool_use_id, id);
    assert_eq!(reqs[1].tool_results[0].content, "made-by-mock");
    assert_eq!(result["result"], format!("tool_result {id}: made-by-mock"), "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_tools_in_one_message() {
    let server = start().await;
    let sandbox = Sandbox::new();
    let written = sandbox.cwd.path().join("written.txt");
    let prompt = format!(
        "mock:reply running two tools\nmock:tool Write {}\nmock:tool Bash {}",
        json!({"file_path": written, "content": "from the Write tool\n"}),
        json!({"command": "echo bash-ran", "description": "say something"}),
    );
    let result = sandbox.print_json(&server, &prompt, &["--permission-mode", "bypassPermissions"], &[]).await;
    assert_eq!(std::fs::read_to_string(&written).expect("written.txt exists"), "from the Write tool\n");
    let reqs = messages(&server);
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    let ids = &reqs[0].tool_use_ids;
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1], "tool-use ids are unique");
    let results = &reqs[1].tool_results;
    assert_eq!(results.iter().map(|r| &r.tool_use_id).collect::<Vec<_>>(), ids.iter().collect::<Vec<_>>());
    assert_eq!(results[1].content, "bash-ran");
    let text = result["result"].as_str().unwrap_or_default();
    assert!(text.contains(&format!("tool_result {}: ", ids[0])), "{result}");
    assert!(text.contains(&format!("tool_result {}: bash-ran", ids[1])), "{result}");
}

// c) -----------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_twice_then_succeeds() {
    let server = start().await;
    let sandbox = Sandbox::new();
    let result = sandbox.print_json(&server, "mock:fail 429 2\nmock:reply recovered after 429s", &[], &[]).await;
    // Observed: the CLI retries 429s itself (x-stainless-retry-count stays 0) and succeeds.
    assert_eq!(result["is_error"], false, "{result}");
    assert_eq!(result["result"], "recovered after 429s", "{result}");
    let statuses: Vec<u16> = messages(&server).iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![429, 429, 200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_then_succeeds() {
    let server = start().await;
    let sandbox = Sandbox::new();
    let result = sandbox.print_json(&server, "mock:fail 529 1\nmock:reply fine now", &[], &[]).await;
    assert_eq!(result["result"], "fine now", "{result}");
    let statuses: Vec<u16> = messages(&server).iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![529, 200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_error_beyond_retries_is_an_error_result() {
    let server = start().await;
    let sandbox = Sandbox::new();
    // The CLI retries 10 times by default (11 attempts, about 3 minutes of backoff); CLAUDE_CODE_MAX_RETRIES=2
    // makes it 3 attempts.
    let result = sandbox.print_json(&server, "mock:fail 500 5", &[], &[("CLAUDE_CODE_MAX_RETRIES", "2")]).await;
    assert_eq!(result["is_error"], true, "{result}");
    assert_eq!(result["api_error_status"], 500, "{result}");
    // Observed: subtype stays "success"; the error is in is_error, api_error_status and the result text.
    assert_eq!(result["subtype"], "success", "{result}");
    let text = result["result"].as_str().unwrap_or_default();
    assert!(text.starts_with("API Error: 500"), "{result}");
    assert!(text.contains("scripted failure"), "{result}");
    let statuses: Vec<u16> = messages(&server).iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![500, 500, 500]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_stream_is_retried() {
    let server = start().await;
    let sandbox = Sandbox::new();
    let result = sandbox.print_json(&server, "mock:cut\nmock:reply the whole reply, this time", &[], &[]).await;
    assert_eq!(result["is_error"], false, "{result}");
    assert_eq!(result["result"], "the whole reply, this time", "{result}");
    let outcomes: Vec<String> = messages(&server).iter().map(|r| r.outcome.clone()).collect();
    assert_eq!(outcomes, vec!["cut", "message"]);

    // Cut every time: the CLI gives up with a connection error.
    let result = sandbox
        .print_json(&server, "mock:cut 99\nmock:reply never whole", &[], &[("CLAUDE_CODE_MAX_RETRIES", "1")])
        .await;
    assert_eq!(result["is_error"], true, "{result}");
    assert!(result["result"].as_str().unwrap_or_default().contains("ECONNRESET"), "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_makes_the_cli_continue() {
    let server = start().await;
    let sandbox = Sandbox::new();
    let result = sandbox.print_json(&server, "mock:max-tokens\nmock:reply cut short", &[], &[]).await;
    let reqs = messages(&server);
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    assert_eq!(reqs[0].stop_reason.as_deref(), Some("max_tokens"));
    // The CLI asks again with the truncated reply and a user message that is only a system reminder
    // ("Output token limit hit. Resume directly …"), which the mock answers with an empty echo.
    assert_eq!(reqs[1].last_user_text.as_deref(), Some(""));
    let last_two: Vec<&str> = reqs[1].messages.iter().rev().take(2).map(|m| m.role.as_str()).collect();
    assert_eq!(last_two, vec!["user", "assistant"]);
    assert_eq!(result["is_error"], false, "{result}");
    assert_eq!(result["result"], "echo: ", "{result}");
}

// d) -----------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_json_two_turns_remember_the_first() {
    let server = start().await;
    let sandbox = Sandbox::new();
    let mut cli = sandbox.stream(&server, &[]);
    cli.send(json!({"type": "control_request", "request_id": "r1", "request": {"subtype": "initialize"}})).await;
    cli.send_user("first message").await;

    let init = cli.until(|v| v["type"] == "control_response").await.pop().expect("line").1;
    assert_eq!(init["response"]["subtype"], "success", "{init}");
    assert_eq!(init["response"]["request_id"], "r1", "{init}");
    let body = &init["response"]["response"];
    for key in ["commands", "agents", "models", "account", "output_style", "pid", "claude_code_version"] {
        assert!(body.get(key).is_some(), "initialize response has no {key}: {body}");
    }
    assert_eq!(body["account"]["apiKeySource"], "ANTHROPIC_API_KEY", "{body}");

    let (lines, first) = cli.until_result().await;
    assert_eq!(first["subtype"], "success", "{first}");
    assert_eq!(first["result"], "echo: first message", "{first}");
    assert!(lines.iter().any(|(_, v)| v["type"] == "system" && v["subtype"] == "init"));

    cli.send_user("second message").await;
    let (_, second) = cli.until_result().await;
    assert_eq!(second["subtype"], "success", "{second}");
    assert_eq!(second["result"], "echo: second message", "{second}");
    assert_eq!(second["session_id"], first["session_id"]);
    let status = cli.finish().await;
    assert!(status.success(), "{status:?}\n{}", sandbox.stderr());

    let reqs = messages(&server);
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    let convo: Vec<(String, String)> =
        reqs[1].messages.iter().filter(|m| m.role != "system").map(|m| (m.role.clone(), m.text.clone())).collect();
    assert_eq!(
        convo,
        vec![
            ("user".to_owned(), "first message".to_owned()),
            ("assistant".to_owned(), "echo: first message".to_owned()),
            ("user".to_owned(), "second message".to_owned()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_json_interrupt_during_slow_stream() {
    let server = start().await;
    let sandbox = Sandbox::new();
    let mut cli = sandbox.stream(&server, &["--include-partial-messages"]);
    cli.send(json!({"type": "control_request", "request_id": "r1", "request": {"subtype": "initialize"}})).await;
    cli.send_user("mock:slow 200 30\nmock:reply one two three four five six seven eight nine ten eleven twelve").await;
    cli.until(|v| v["type"] == "stream_event" && v["event"]["delta"]["type"] == "text_delta").await;

    cli.send(json!({"type": "control_request", "request_id": "r2", "request": {"subtype": "interrupt"}})).await;
    let (lines, result) = cli.until_result().await;
    let ack = lines
        .iter()
        .map(|(_, v)| v)
        .find(|v| v["type"] == "control_response")
        .expect("a control_response to the interrupt");
    assert_eq!(
        ack,
        &json!({"type": "control_response", "response": {"subtype": "success", "request_id": "r2", "response": {"still_queued": []}}})
    );
    assert!(
        lines
            .iter()
            .any(|(_, v)| v["type"] == "user" && v["message"]["content"][0]["text"] == "[Request interrupted by user]"),
        "{lines:?}"
    );
    assert_eq!(result["subtype"], "error_during_execution", "{result}");
    assert_eq!(result["is_error"], true, "{result}");
    assert_eq!(result["terminal_reason"], "aborted_streaming", "{result}");

    // The session goes on; the interruption note is sent with the next message.
    cli.send_user("after the interrupt").await;
    let (_, next) = cli.until_result().await;
    assert_eq!(next["subtype"], "success", "{next}");
    assert_eq!(next["result"], "echo: [Request interrupted by user]\n\nafter the interrupt", "{next}");
    cli.finish().await;
}

// e) -----------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_messages_stream_incrementally() {
    let server = start().await;
    let sandbox = Sandbox::new();
    let reply = "The quick brown fox jumps over the lazy dog";
    let stderr = std::fs::File::create(sandbox.stderr_path()).expect("stderr file");
    let mut child = sandbox
        .command(&server)
        .arg("-p")
        .arg(format!("mock:slow 150 8\nmock:reply {reply}"))
        .args(["--output-format", "stream-json", "--verbose", "--include-partial-messages"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn");
    let mut cli = StreamCli { lines: BufReader::new(child.stdout.take().expect("stdout")).lines(), child, stdin: None };
    let (lines, result) = cli.until_result().await;
    assert_eq!(result["result"], reply, "{result}");
    let deltas = text_deltas(&lines);
    assert_eq!(deltas.len(), 8, "{lines:?}");
    assert_eq!(deltas.iter().map(|(_, t)| t.as_str()).collect::<String>(), reply);
    // They arrive as they are sent (7 pauses of 150 ms between the first and the last), not all at the end.
    let spread = deltas[7].0 - deltas[0].0;
    assert!(spread >= Duration::from_millis(700), "deltas arrived within {spread:?}");
    cli.finish().await;
}

// Measurements ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_cold_print_and_warm_stream_turns() {
    let server = start().await;

    let mut cold = Vec::new();
    for i in 0..3 {
        let sandbox = Sandbox::new();
        let started = Instant::now();
        let result = sandbox.print_json(&server, &format!("mock:reply cold {i}"), &[], &[]).await;
        cold.push(started.elapsed());
        assert_eq!(result["result"], format!("cold {i}"), "{result}");
    }

    let sandbox = Sandbox::new();
    let mut cli = sandbox.stream(&server, &[]);
    let mut warm = Vec::new();
    let mut first_turn = Duration::ZERO;
    for i in 0..21 {
        let started = Instant::now();
        cli.send_user(&format!("mock:reply turn {i}")).await;
        let (_, result) = cli.until_result().await;
        assert_eq!(result["result"], format!("turn {i}"), "{result}");
        if i > 0 {
            warm.push(started.elapsed());
        } else {
            first_turn = started.elapsed(); // includes the CLI's start-up
        }
    }
    cli.finish().await;
    cold.sort();
    warm.sort();
    let median = warm[warm.len() / 2];
    eprintln!(
        "latency: cold `claude -p` to result {:?} (min {:?}, max {:?}); stream-json first turn (with start-up) {:?}; \
         warm stream-json turn median of {} {:?} (min {:?}, max {:?})",
        cold[cold.len() / 2],
        cold[0],
        cold[cold.len() - 1],
        first_turn,
        warm.len(),
        median,
        warm[0],
        warm[warm.len() - 1],
    );
    assert!(cold[0] < Duration::from_secs(30), "{cold:?}");
    assert!(median < Duration::from_secs(5), "{warm:?}");
}

// The mock on its own ---------------------------------------------------------------------------------------------

/// A minimal HTTP/1.1 client (the tests do not need one more dependency): the status and the raw body.
async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\n\
         x-api-key: k\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await; // a cut connection ends with an error
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.into() };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            out.push_str(&rest[..rest.len().min(n)]);
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

fn sse_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter_map(|frame| {
            let event = frame.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = frame.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((event.to_owned(), serde_json::from_str(data).expect("data is JSON")))
        })
        .collect()
}

#[tokio::test]
async fn wire_format_without_the_cli() {
    let server = start().await;
    let ask = |text: &str, stream: bool| json!({"model": "m", "max_tokens": 100, "stream": stream, "messages": [{"role": "user", "content": text}]});

    let (status, body) = http(server.addr, "POST", "/v1/messages", Some(&ask("hi there", false))).await;
    assert_eq!(status, 200);
    let msg: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(msg["type"], "message");
    assert_eq!(msg["content"], json!([{"type": "text", "text": "echo: hi there"}]));
    assert_eq!(msg["stop_reason"], "end_turn");
    assert_eq!(msg["usage"]["cache_read_input_tokens"], 0);

    let text = "mock:thinking hmm\nmock:reply a b c d\nmock:tool Read {\"file_path\": \"/etc/hostname\"}";
    let (status, body) = http(server.addr, "POST", "/v1/messages", Some(&ask(text, true))).await;
    assert_eq!(status, 200);
    let events = sse_events(&body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"]);
    assert_eq!(names.iter().filter(|n| **n == "content_block_start").count(), 3);
    let delta_types: Vec<&str> =
        events.iter().filter_map(|(_, d)| d["delta"]["type"].as_str()).filter(|t| t.ends_with("_delta")).collect();
    for t in ["thinking_delta", "signature_delta", "text_delta", "input_json_delta"] {
        assert!(delta_types.contains(&t), "{delta_types:?}");
    }
    assert!(delta_types.iter().filter(|t| **t == "text_delta").count() >= 4, "{delta_types:?}");
    assert_eq!(events[names.len() - 2].1["delta"]["stop_reason"], "tool_use");
    let json: String = events.iter().filter_map(|(_, d)| d["delta"]["partial_json"].as_str()).collect();
    assert_eq!(serde_json::from_str::<Value>(&json).expect("input"), json!({"file_path": "/etc/hostname"}));

    let (status, body) = http(server.addr, "POST", "/v1/messages", Some(&ask("mock:fail 529 1", false))).await;
    assert_eq!(status, 529);
    let err: Value = serde_json::from_str(&body).expect("json");
    assert_eq!((err["type"].as_str(), err["error"]["type"].as_str()), (Some("error"), Some("overloaded_error")));
    let (status, _) = http(server.addr, "POST", "/v1/messages", Some(&ask("mock:fail 529 1", false))).await;
    assert_eq!(status, 200, "the count is used up");

    let (status, body) =
        http(server.addr, "POST", "/v1/messages", Some(&ask("mock:cut\nmock:reply a b c d e f", true))).await;
    assert_eq!(status, 200);
    assert!(!body.contains("message_stop"), "{body}");
    assert!(body.contains("text_delta"), "{body}");
    let (status, body) =
        http(server.addr, "POST", "/v1/messages", Some(&ask("mock:cut 1 json\nmock:reply a b", false))).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("{\"content\"") && serde_json::from_str::<Value>(&body).is_err(), "{body}");

    let (status, body) = http(server.addr, "POST", "/v1/messages", Some(&ask("mock:bogus", false))).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_request_error") && body.contains("mock:bogus"), "{body}");

    let (status, body) = http(server.addr, "POST", "/v1/messages/count_tokens", Some(&ask("x", false))).await;
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<Value>(&body).expect("json")["input_tokens"].as_u64().expect("n") > 0);

    let started = Instant::now();
    let (status, _) = http(server.addr, "POST", "/v1/messages", Some(&ask("mock:delay 300", false))).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    let (status, body) = http(server.addr, "GET", "/v1/models", None).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).expect("json")["data"][0]["type"], "model");
    let (status, _) = http(server.addr, "HEAD", "/api/hello", None).await;
    assert_eq!(status, 200);

    let (status, body) = http(server.addr, "GET", "/v1/nope", None).await;
    assert_eq!(status, 404);
    assert_eq!(serde_json::from_str::<Value>(&body).expect("json")["error"]["type"], "not_found_error");

    let (status, body) = http(server.addr, "GET", "/_mock/requests", None).await;
    assert_eq!(status, 200);
    let log: Vec<RequestRecord> = serde_json::from_str(&body).expect("log");
    assert_eq!(log, server.requests());
    assert_eq!(log.len(), 12);
    assert_eq!(log[0].last_user_text.as_deref(), Some("hi there"));
    assert_eq!(log.last().map(|r| r.path.as_str()), Some("/v1/nope"));
    assert!(log.windows(2).all(|w| w[0].seq < w[1].seq && w[0].at_ms <= w[1].at_ms));
    let (status, _) = http(server.addr, "DELETE", "/_mock/requests", None).await;
    assert_eq!(status, 204);
    assert!(server.requests().is_empty());
}
