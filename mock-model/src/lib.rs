//! A scriptable stand-in for the Anthropic Messages API, so the real Claude Code CLI can be tested offline.
//!
//! Point the CLI at it with `ANTHROPIC_BASE_URL=http://127.0.0.1:<port>` and any `ANTHROPIC_API_KEY`.
//! It speaks the real wire format: `POST /v1/messages` answers a `Message` JSON, or with `"stream": true` the
//! real SSE sequence (`message_start`, `ping`, per block `content_block_start` / `content_block_delta` /
//! `content_block_stop`, `message_delta`, `message_stop`). Text is streamed in several small deltas.
//!
//! # Directives
//!
//! What the mock answers is scripted by lines in the text of the **last user message** (the last message with
//! `"role": "user"`; text blocks that are a whole `<system-reminder>…</system-reminder>` are ignored). A
//! directive is a line that starts with `mock:` (leading whitespace allowed; case-sensitive). Other lines are
//! plain text. An unknown or malformed directive is answered with HTTP 400 `invalid_request_error` naming it.
//!
//! | line | effect |
//! | --- | --- |
//! | *(no directive)* | reply with the text `echo: <the plain text>` |
//! | `mock:reply TEXT` | reply with `TEXT` (several lines are joined with `\n`; replaces the echo) |
//! | `mock:reply-bytes N` | reply with `N` bytes of printable ASCII filler (words and spaces, no newline; replaces `mock:reply` and the echo), streamed in text deltas of 64 KiB: for throughput tests with big replies |
//! | `mock:thinking TEXT` | a thinking block (with a signature) before the text (several lines joined) |
//! | `mock:tool NAME {JSON}` | call tool `NAME` with the JSON object as input (`{}` if left out); several lines call several tools in parallel in one message; `stop_reason` `tool_use`; no text block unless `mock:reply` is given too |
//! | `mock:slow MS N` | stream the text as `N` deltas (default 10; fewer if the text is shorter), each `MS` ms after the previous event |
//! | `mock:fail STATUS TIMES [type=T] [retry-after=S] [retry-after-ms=MS] [should-retry=true\|false] [TAG…]` | answer the first `TIMES` requests carrying this exact line with HTTP `STATUS` and `{"type":"error","error":{"type":T,"message":…}}`, then answer normally. `T` defaults from the status: 429 `rate_limit_error`, 529 `overloaded_error`, 500 and other 5xx `api_error`, 400 `invalid_request_error`, 401 `authentication_error`, 403 `permission_error`, 404 `not_found_error`, 413 `request_too_large`, 504 `timeout_error`. The options set the `retry-after`, `retry-after-ms` and `x-should-retry` headers |
//! | `mock:cut [TIMES] [TAG…]` | close the connection in the middle of the response (after half of the content deltas) for the first `TIMES` (default 1) requests carrying this exact line, then answer normally |
//! | `mock:max-tokens` | `stop_reason` `max_tokens` (the text is still sent; `output_tokens` is the request's `max_tokens`) |
//! | `mock:delay MS` | wait `MS` ms before answering (before the status line) |
//!
//! The counts of `mock:fail` and `mock:cut` are kept per distinct line (the whole trimmed line) for the life of
//! the mock, so the CLI's retries of the same conversation consume them. Add a tag word to make a line distinct
//! (`mock:fail 429 2 run-7`).
//!
//! When the last user message holds `tool_result` blocks (the CLI ran a tool), the reply is text, one line per
//! result: `tool_result <tool_use_id>: <content>` (`tool_result <id> (error): …` if `is_error`), `end_turn`;
//! directives in that message are ignored. Tool-use ids are unique: `toolu_01` followed by 32 hex digits.
//!
//! # Other endpoints
//!
//! `POST /v1/messages/count_tokens` answers `{"input_tokens": N}`, `GET /v1/models` and `GET /v1/models/{id}`
//! answer a model list / model, `GET|HEAD /api/hello` (the CLI's connectivity check) answers 200,
//! `GET /_mock/requests` the request log (JSON array of [`RequestRecord`]),
//! `DELETE /_mock/requests` clears it, `GET /_mock/health` answers `ok`. Anything else: 404 in the Anthropic
//! error shape (and logged).
//!
//! Usage: `input_tokens` is the request body's size / 4, `output_tokens` the reply's size / 4, cache fields 0.
//!
//! # Use from tests
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let server = mock_model::MockModel::start().await?; // 127.0.0.1, port 0
//! let base_url = server.base_url(); // give this to the CLI as ANTHROPIC_BASE_URL
//! // … run the CLI …
//! for r in server.requests() {
//!     println!("{} {} model={:?} stream={} text={:?}", r.method, r.path, r.model, r.stream, r.last_user_text);
//! }
//! # let _ = base_url;
//! # Ok(())
//! # }
//! ```

pub mod directive;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::directive::Script;
use crate::wire::{Block, Reply, Step};

/// The models `GET /v1/models` lists.
pub const MODELS: &[&str] = &["claude-opus-5-5", "claude-sonnet-4-5", "claude-haiku-4-5"];

/// One request the mock received.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RequestRecord {
    /// 0, 1, 2, … in arrival order.
    pub seq: u64,
    /// When it was answered (status decided), in ms since the mock was created.
    pub at_ms: u64,
    /// `GET`, `POST`, …
    pub method: String,
    /// The path, without the query (e.g. `/v1/messages`).
    pub path: String,
    /// The query string, if any (the CLI sends `beta=true`).
    pub query: Option<String>,
    /// The request's `model`, for JSON bodies that have one.
    pub model: Option<String>,
    /// Whether the request asked for `"stream": true`.
    pub stream: bool,
    /// The request's `max_tokens`.
    pub max_tokens: Option<u64>,
    /// The request's `system` prompt: a string, or its text blocks joined with `\n`.
    pub system: Option<String>,
    /// The user text of the last user message (system reminders left out), for message requests.
    pub last_user_text: Option<String>,
    /// The `tool_result` blocks of the last user message.
    pub tool_results: Vec<ToolResultRecord>,
    /// Every message of the request, summarised.
    pub messages: Vec<MessageRecord>,
    /// The body's size in bytes.
    pub body_len: usize,
    /// How the client authenticated: `x-api-key`, `bearer`, `both` or `none`.
    pub auth: String,
    /// The last 4 characters of the `x-api-key` (or bearer token) sent, so
    /// tests can tell which credential arrived without the mock keeping it.
    pub credential_suffix: Option<String>,
    /// `[input_tokens, output_tokens]` reported in the reply's usage, for messages.
    pub usage: Option<[u64; 2]>,
    /// The request headers (lower-case names), with `x-api-key` and `authorization` values redacted.
    pub headers: BTreeMap<String, String>,
    /// The HTTP status answered.
    pub status: u16,
    /// `message`, `error`, `cut`, `count_tokens`, `models`, `hello`, `not_found`.
    pub outcome: String,
    /// The reply's `stop_reason`, for messages.
    pub stop_reason: Option<String>,
    /// The reply's text (text blocks joined), for messages.
    pub reply_text: Option<String>,
    /// The ids of the `tool_use` blocks replied.
    pub tool_use_ids: Vec<String>,
}

/// One message of a request, summarised.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MessageRecord {
    /// `user`, `assistant`, `system`, …
    pub role: String,
    /// The text blocks (except system reminders) joined with `\n`.
    pub text: String,
    /// The type of each content block (`text`, `tool_use`, `tool_result`, `thinking`, …).
    pub block_types: Vec<String>,
}

/// One `tool_result` block of the last user message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ToolResultRecord {
    /// The `tool_use_id` it answers.
    pub tool_use_id: String,
    /// Its content as text.
    pub content: String,
    /// Its `is_error`.
    pub is_error: bool,
}

#[derive(Debug)]
struct Inner {
    started: std::time::Instant,
    seq: AtomicU64,
    requests: Mutex<Vec<RequestRecord>>,
    /// Uses of each `mock:fail` / `mock:cut` line so far.
    counts: Mutex<HashMap<String, u32>>,
}

/// The mock: a cheap, cloneable handle to its state (request log and directive counts).
#[derive(Debug, Clone)]
pub struct MockModel {
    inner: Arc<Inner>,
}

impl Default for MockModel {
    fn default() -> MockModel {
        MockModel {
            inner: Arc::new(Inner {
                started: std::time::Instant::now(),
                seq: AtomicU64::new(0),
                requests: Mutex::default(),
                counts: Mutex::default(),
            }),
        }
    }
}

/// A mock serving on a port, from [`MockModel::start`]. Dropping it stops the server.
#[derive(Debug)]
pub struct MockServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its state.
    pub model: MockModel,
    task: JoinHandle<std::io::Result<()>>,
}

impl MockServer {
    /// `http://ADDR`, for `ANTHROPIC_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.model.requests()
    }

    /// The `POST /v1/messages` requests received so far.
    pub fn message_requests(&self) -> Vec<RequestRecord> {
        self.model.message_requests()
    }

    /// Stop serving.
    pub fn shutdown(self) {
        self.task.abort();
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serve `model` on `listener` until the task is dropped or fails.
pub async fn serve(listener: TcpListener, model: MockModel) -> std::io::Result<()> {
    axum::serve(listener, model.router()).await
}

impl MockModel {
    /// A new mock with an empty log.
    pub fn new() -> MockModel {
        MockModel::default()
    }

    /// Bind 127.0.0.1 on a free port and serve a new mock there in a background task.
    pub async fn start() -> std::io::Result<MockServer> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let model = MockModel::new();
        let task = tokio::spawn(serve(listener, model.clone()));
        Ok(MockServer { addr, model, task })
    }

    /// The axum router (all endpoints), for embedding.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/messages", post(messages))
            .route("/v1/messages/count_tokens", post(count_tokens))
            .route("/v1/models", get(list_models))
            .route("/v1/models/{id}", get(get_model))
            .route("/_mock/requests", get(log).delete(clear_log))
            .route("/api/hello", any(hello))
            .route("/_mock/health", get(|| async { "ok" }))
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(256 * 1024 * 1024))
            .with_state(self.clone())
    }

    /// Every request received so far (not the `/_mock/…` ones).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.inner.requests.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The `POST /v1/messages` requests received so far.
    pub fn message_requests(&self) -> Vec<RequestRecord> {
        self.requests().into_iter().filter(|r| r.path == "/v1/messages").collect()
    }

    /// Forget the requests received so far (the directive counts are kept).
    pub fn clear_requests(&self) {
        self.inner.requests.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// Count one use of a `mock:fail` / `mock:cut` line; true while it has been used fewer than `times` times.
    fn take(&self, kind: &str, key: &str, times: u32) -> bool {
        let mut counts = self.inner.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let used = counts.entry(format!("{kind}\0{key}")).or_insert(0);
        if *used < times {
            *used += 1;
            true
        } else {
            false
        }
    }

    fn record(&self, mut record: RequestRecord) {
        record.seq = self.inner.seq.fetch_add(1, Ordering::SeqCst);
        record.at_ms = u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::info!(
            seq = record.seq,
            method = %record.method,
            path = %record.path,
            model = ?record.model,
            stream = record.stream,
            status = record.status,
            outcome = %record.outcome,
            "request"
        );
        self.inner.requests.lock().unwrap_or_else(PoisonError::into_inner).push(record);
    }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// An Anthropic-shaped error response.
fn error_response(status: u16, error_type: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": new_id("req_mock_"),
    });
    (status, [("content-type", "application/json")], body.to_string()).into_response()
}

/// A record with the request-level fields filled in.
fn base_record(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> RequestRecord {
    let mut header_map = BTreeMap::new();
    for (name, value) in headers {
        let name = name.as_str().to_ascii_lowercase();
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        let value = if name == "x-api-key" || name == "authorization" {
            format!("<redacted, {} bytes>", value.len())
        } else {
            value
        };
        header_map.insert(name, value);
    }
    let auth = match (headers.contains_key("x-api-key"), headers.contains_key("authorization")) {
        (true, true) => "both",
        (true, false) => "x-api-key",
        (false, true) => "bearer",
        (false, false) => "none",
    };
    RequestRecord {
        seq: 0,
        at_ms: 0,
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        model: None,
        stream: false,
        max_tokens: None,
        system: None,
        last_user_text: None,
        tool_results: Vec::new(),
        messages: Vec::new(),
        body_len: body.len(),
        auth: auth.to_owned(),
        credential_suffix: headers
            .get("x-api-key")
            .or_else(|| headers.get("authorization"))
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect()),
        usage: None,
        headers: header_map,
        status: 200,
        outcome: String::new(),
        stop_reason: None,
        reply_text: None,
        tool_use_ids: Vec::new(),
    }
}

async fn messages(
    State(mock): State<MockModel>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut record = base_record(&method, &uri, &headers, &body);
    let (response, record) = match serde_json::from_slice::<Value>(&body) {
        Ok(request) => answer_messages(&mock, &request, body.len(), record).await,
        Err(e) => {
            record.status = 400;
            record.outcome = "error".into();
            (error_response(400, "invalid_request_error", &format!("mock-model: body is not JSON: {e}")), record)
        }
    };
    mock.record(record);
    response
}

async fn answer_messages(
    mock: &MockModel,
    request: &Value,
    body_len: usize,
    mut record: RequestRecord,
) -> (Response, RequestRecord) {
    let model = request.get("model").and_then(Value::as_str).unwrap_or("claude-mock").to_owned();
    let stream = request.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let max_tokens = request.get("max_tokens").and_then(Value::as_u64);
    let msgs = request.get("messages").and_then(Value::as_array).cloned().unwrap_or_default();
    record.model = Some(model.clone());
    record.stream = stream;
    record.max_tokens = max_tokens;
    record.system = match request.get("system") {
        Some(Value::String(text)) => Some(text.clone()),
        Some(Value::Array(blocks)) => {
            Some(blocks.iter().filter_map(|b| b.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n"))
        }
        _ => None,
    };
    record.messages = msgs
        .iter()
        .map(|m| MessageRecord {
            role: m.get("role").and_then(Value::as_str).unwrap_or_default().to_owned(),
            text: wire::user_text(m),
            block_types: wire::blocks(m)
                .iter()
                .map(|b| b.get("type").and_then(Value::as_str).unwrap_or_default().to_owned())
                .collect(),
        })
        .collect();
    let last_user = msgs.iter().rev().find(|m| m.get("role").and_then(Value::as_str) == Some("user"));
    let user_text = last_user.map(wire::user_text).unwrap_or_default();
    record.last_user_text = last_user.map(|_| user_text.clone());
    record.tool_results = last_user
        .map(wire::blocks)
        .unwrap_or_default()
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
        .map(|b| ToolResultRecord {
            tool_use_id: b.get("tool_use_id").and_then(Value::as_str).unwrap_or_default().to_owned(),
            content: wire::tool_result_text(b),
            is_error: b.get("is_error").and_then(Value::as_bool).unwrap_or(false),
        })
        .collect();

    let script = if record.tool_results.is_empty() {
        match Script::parse(&user_text) {
            Ok(script) => script,
            Err(e) => {
                record.status = 400;
                record.outcome = "error".into();
                return (error_response(400, "invalid_request_error", &format!("mock-model: {e}")), record);
            }
        }
    } else {
        Script::default()
    };

    if let Some(delay) = script.delay {
        tokio::time::sleep(delay).await;
    }

    if let Some(fail) = &script.fail
        && mock.take("fail", &fail.key, fail.times)
    {
        record.status = fail.status;
        record.outcome = "error".into();
        let mut response = error_response(
            fail.status,
            &fail.error_type,
            &format!("mock-model: scripted failure ({} {})", fail.status, fail.error_type),
        );
        let headers = response.headers_mut();
        let mut set = |name: &'static str, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        };
        if let Some(s) = &fail.retry_after {
            set("retry-after", s);
        }
        if let Some(ms) = &fail.retry_after_ms {
            set("retry-after-ms", ms);
        }
        if let Some(b) = fail.should_retry {
            set("x-should-retry", if b { "true" } else { "false" });
        }
        return (response, record);
    }
    let cut = script.cut.as_ref().is_some_and(|c| mock.take("cut", &c.key, c.times));

    let mut blocks = Vec::new();
    if !script.thinking.is_empty() {
        blocks.push(Block::Thinking { thinking: script.thinking.join("\n"), signature: fake_signature() });
    }
    let text = if !record.tool_results.is_empty() {
        Some(
            record
                .tool_results
                .iter()
                .map(|r| {
                    let error = if r.is_error { " (error)" } else { "" };
                    format!("tool_result {}{error}: {}", r.tool_use_id, r.content)
                })
                .collect::<Vec<_>>()
                .join("\n"),
        )
    } else if let Some(len) = script.reply_bytes {
        Some(wire::filler_text(len))
    } else if !script.replies.is_empty() {
        Some(script.replies.join("\n"))
    } else if script.tools.is_empty() {
        Some(format!("echo: {}", script.plain_text))
    } else {
        None
    };
    if let Some(text) = &text {
        blocks.push(Block::Text { text: text.clone() });
    }
    for tool in &script.tools {
        let id = new_id("toolu_01");
        record.tool_use_ids.push(id.clone());
        blocks.push(Block::ToolUse { id, name: tool.name.clone(), input: tool.input.clone() });
    }
    let stop_reason = if script.max_tokens {
        "max_tokens"
    } else if script.tools.is_empty() {
        "end_turn"
    } else {
        "tool_use"
    };
    let output_len: usize = blocks.iter().map(Block::output_len).sum();
    let output_tokens = match (script.max_tokens, max_tokens) {
        (true, Some(max)) => max,
        _ => wire::tokens_for_len(output_len),
    };
    let reply = Reply {
        id: new_id("msg_01"),
        model,
        blocks,
        stop_reason,
        input_tokens: wire::tokens_for_len(body_len),
        output_tokens,
        slow: script.slow.map(|s| (s.per_delta, s.deltas)),
        text_delta_bytes: script.reply_bytes.map(|_| wire::BULK_TEXT_DELTA_BYTES),
    };
    record.stop_reason = Some(stop_reason.to_owned());
    record.usage = Some([reply.input_tokens, reply.output_tokens]);
    record.reply_text = text;
    record.outcome = if cut { "cut" } else { "message" }.into();

    let response = if stream { sse_response(&reply, cut) } else { json_response(&reply, cut) };
    (response, record)
}

fn fake_signature() -> String {
    // Looks like the real (base64) signatures; the CLI only passes it back.
    format!("EqMB{}", uuid::Uuid::new_v4().simple())
}

fn with_request_id(mut response: Response) -> Response {
    if let Ok(v) = HeaderValue::from_str(&new_id("req_mock_")) {
        response.headers_mut().insert("request-id", v);
    }
    response
}

fn json_response(reply: &Reply, cut: bool) -> Response {
    let body = reply.message_json().to_string();
    if !cut {
        return with_request_id((StatusCode::OK, [("content-type", "application/json")], body).into_response());
    }
    // Half the body, then the connection is closed.
    let half = body.as_bytes()[..body.len() / 2].to_vec();
    let steps = vec![Step::Raw(half), Step::Sleep(CUT_PAUSE), Step::Cut];
    streamed_response(steps, "application/json")
}

/// The pause before a cut, so that what was sent before it reaches the client (hyper flushes its buffer when
/// the body is not ready) rather than being dropped with the connection.
const CUT_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

fn streamed_response(steps: Vec<Step>, content_type: &'static str) -> Response {
    let stream = futures::stream::unfold(steps.into_iter(), |mut steps| async move {
        loop {
            match steps.next()? {
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Raw(raw) => return Some((Ok(Bytes::from(raw)), steps)),
                Step::Event(name, data) => return Some((Ok(Bytes::from(Step::sse(name, &data))), steps)),
                Step::Cut => return Some((Err(std::io::Error::other("mock-model: scripted cut")), steps)),
            }
        }
    });
    let response = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", content_type)
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    with_request_id(response)
}

fn sse_response(reply: &Reply, cut: bool) -> Response {
    let mut steps = reply.events();
    if cut {
        let deltas: Vec<usize> = steps
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Step::Event("content_block_delta", _)))
            .map(|(i, _)| i)
            .collect();
        let cut_after = deltas.get(deltas.len().div_ceil(2).saturating_sub(1)).copied().unwrap_or(0);
        steps.truncate(cut_after + 1);
        steps.push(Step::Sleep(CUT_PAUSE));
        steps.push(Step::Cut);
    }
    streamed_response(steps, "text/event-stream; charset=utf-8")
}

async fn count_tokens(
    State(mock): State<MockModel>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut record = base_record(&method, &uri, &headers, &body);
    record.outcome = "count_tokens".into();
    if let Ok(request) = serde_json::from_slice::<Value>(&body) {
        record.model = request.get("model").and_then(Value::as_str).map(str::to_owned);
    }
    mock.record(record);
    let body = json!({"input_tokens": wire::tokens_for_len(body.len())});
    with_request_id((StatusCode::OK, [("content-type", "application/json")], body.to_string()).into_response())
}

fn model_json(id: &str) -> Value {
    json!({"type": "model", "id": id, "display_name": id, "created_at": "2025-01-01T00:00:00Z"})
}

async fn list_models(State(mock): State<MockModel>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let mut record = base_record(&method, &uri, &headers, &[]);
    record.outcome = "models".into();
    mock.record(record);
    let data: Vec<Value> = MODELS.iter().map(|m| model_json(m)).collect();
    let body = json!({
        "data": data,
        "has_more": false,
        "first_id": MODELS.first(),
        "last_id": MODELS.last(),
    });
    (StatusCode::OK, [("content-type", "application/json")], body.to_string()).into_response()
}

async fn get_model(
    State(mock): State<MockModel>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let mut record = base_record(&method, &uri, &headers, &[]);
    record.outcome = "models".into();
    record.model = Some(id.clone());
    mock.record(record);
    (StatusCode::OK, [("content-type", "application/json")], model_json(&id).to_string()).into_response()
}

/// The CLI's connectivity check (`HEAD /api/hello`, sent unless `CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC` is set).
async fn hello(State(mock): State<MockModel>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let mut record = base_record(&method, &uri, &headers, &[]);
    record.outcome = "hello".into();
    mock.record(record);
    (StatusCode::OK, [("content-type", "application/json")], r#"{"message":"hello"}"#).into_response()
}

async fn log(State(mock): State<MockModel>) -> Response {
    axum::Json(mock.requests()).into_response()
}

async fn clear_log(State(mock): State<MockModel>) -> StatusCode {
    mock.clear_requests();
    StatusCode::NO_CONTENT
}

async fn not_found(
    State(mock): State<MockModel>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut record = base_record(&method, &uri, &headers, &body);
    record.status = 404;
    record.outcome = "not_found".into();
    mock.record(record);
    error_response(404, "not_found_error", &format!("mock-model: no route for {method} {}", uri.path()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SSE events of a response body: (event name, data).
    fn sse_events(body: &[u8]) -> Vec<(String, Value)> {
        String::from_utf8_lossy(body)
            .split("\n\n")
            .filter_map(|block| {
                let name = block.lines().find_map(|l| l.strip_prefix("event: "))?;
                let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
                Some((name.to_owned(), serde_json::from_str(data).expect("event data")))
            })
            .collect()
    }

    async fn answer(text: &str, stream: bool) -> (StatusCode, Vec<u8>, RequestRecord) {
        let request = json!({
            "model": "claude-mock", "max_tokens": 100, "stream": stream,
            "messages": [{"role": "user", "content": text}],
        });
        let record = base_record(&Method::POST, &Uri::from_static("/v1/messages"), &HeaderMap::new(), &[]);
        let (response, record) = answer_messages(&MockModel::new(), &request, 100, record).await;
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
        (status, body.to_vec(), record)
    }

    #[tokio::test]
    async fn reply_bytes_streams_big_deltas() {
        let len = 3 * wire::BULK_TEXT_DELTA_BYTES + 10;
        let (status, body, record) = answer("mock:reply-bytes 196618", true).await;
        assert_eq!(status, StatusCode::OK);
        let deltas: Vec<String> = sse_events(&body)
            .into_iter()
            .filter(|(name, _)| name == "content_block_delta")
            .map(|(_, data)| data["delta"]["text"].as_str().expect("text delta").to_owned())
            .collect();
        assert_eq!(deltas.iter().map(String::len).collect::<Vec<_>>(), [65536, 65536, 65536, 10]);
        assert_eq!(deltas.concat(), wire::filler_text(len));
        assert_eq!(record.reply_text.as_deref().map(str::len), Some(len));
        assert_eq!(record.usage, Some([25, wire::tokens_for_len(len)]));
    }

    #[tokio::test]
    async fn reply_bytes_not_streamed_and_over_reply() {
        // It replaces `mock:reply` text; without streaming it is one text block.
        let (status, body, _) = answer("mock:reply short\nmock:reply-bytes 1000", false).await;
        assert_eq!(status, StatusCode::OK);
        let message: Value = serde_json::from_slice(&body).expect("message");
        assert_eq!(message["content"][0]["text"], wire::filler_text(1000));
        assert_eq!(message["stop_reason"], "end_turn");
    }
}
