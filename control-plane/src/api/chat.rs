//! `POST /api/v1/chat` (sync), `POST /api/v1/chat/stream` (SSE),
//! `GET /api/v1/sessions/{id}/stream` (reconnect with `Last-Event-ID`),
//! `GET /api/v1/sessions/{id}/messages` (history),
//! `POST /api/v1/sessions/{id}/interrupt` and `GET /api/v1/usage`.
//!
//! Seed-compatible: the same body, the same sync response (with
//! `tool_calls` really filled and the turn's messages, cost and usage
//! added), the same SSE frames (`data:` JSON with `type`, `text`,
//! `tool_name`, `tool_input`, `error`) with the seed's gaps fixed: text
//! streams as the model produces it, `tool_use` and `tool_result` are sent,
//! every event has an `id:`, and an unknown or busy session is a 404/429
//! before the stream starts. A client that goes away does not stop the turn.

use std::convert::Infallible;
use std::io::Write as _;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio_util::bytes::{Bytes, BytesMut};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody, FieldError};
use super::extract::{ApiJson, ApiQuery, Validate};
use super::sessions::visible_session;
use crate::app::AppState;
use crate::auth::Principal;
use crate::chat::{self, Field, Fields, Frame, StreamItem, TurnError, TurnGuard, TurnOutcome, WarmScope};
use crate::store::{self, Session, SessionStatus};
use crate::stream_json::{self, CliMessage, MessageBody};
use shared::Text;

const MAX_MESSAGE_CHARS: usize = 100_000;
const KEEP_ALIVE: Duration = Duration::from_secs(15);

fn default_timeout() -> u64 {
    120
}

/// Body of both chat routes (the seed's).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// 1–200 of `[A-Za-z0-9_-]`.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,200}$")]
    pub session_id: String,
    /// 1–100,000 characters, not blank.
    #[schema(min_length = 1, max_length = 100_000, pattern = "\\S")]
    pub message: String,
    /// Seconds the turn may take (1–600, default 120); then it is
    /// interrupted and the request answers 504.
    #[serde(default = "default_timeout")]
    #[schema(minimum = 1, maximum = 600)]
    pub timeout: u64,
    /// `true`: while another turn runs in the session, wait for it (within
    /// `timeout`) instead of answering 429.
    #[serde(default)]
    pub queue: bool,
}

impl ChatRequest {
    /// The session's turn: at once, or after the running one when queued.
    async fn begin_turn(&self, state: &AppState, session: &Session) -> Result<TurnGuard, ApiError> {
        let conversation = state.conversations.get(session);
        let wait = self.queue.then(|| Duration::from_secs(self.timeout));
        conversation.begin_turn(wait).await.ok_or_else(busy)
    }
}

impl Validate for ChatRequest {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if shared::names::validate_session_id(&self.session_id).is_err() {
            errors.push(FieldError::new(
                "string_pattern_mismatch",
                ["body".into(), "session_id".into()],
                "String should match pattern '^[a-zA-Z0-9_-]+$' (1-200 characters)",
                self.session_id.as_str().into(),
            ));
        }
        let chars = self.message.chars().count();
        if self.message.trim().is_empty() || chars > MAX_MESSAGE_CHARS {
            errors.push(FieldError::body(
                "message",
                format!("must be 1-{MAX_MESSAGE_CHARS} characters and not blank"),
                Value::Null,
            ));
        }
        if !(1..=600).contains(&self.timeout) {
            errors.push(FieldError::body("timeout", "must be between 1 and 600", self.timeout.into()));
        }
        errors
    }
}

#[derive(Debug, ToSchema)]
pub struct ToolCall {
    pub tool: String,
    #[schema(value_type = Object)]
    pub input: Value,
}

/// The seed's response plus the whole turn: the schema of the body
/// [`chat_response`] writes.
#[derive(Debug, ToSchema)]
pub struct ChatResponse {
    pub session_id: String,
    /// The turn's final text.
    pub text: String,
    /// Every tool call of the turn.
    pub tool_calls: Vec<ToolCall>,
    pub timestamp: DateTime<Utc>,
    /// The result's subtype (`success`, `error_max_turns`, ...).
    pub subtype: Option<String>,
    pub is_error: bool,
    pub total_cost_usd: f64,
    #[schema(value_type = Object)]
    pub usage: Value,
    pub duration_ms: Option<u64>,
    pub num_turns: Option<u64>,
    /// Every message the CLI wrote during the turn, except the partial
    /// `stream_event` deltas (`POST /api/v1/chat/stream` relays those).
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<Value>,
}

fn session_gone() -> ApiError {
    ApiError::NotFound("Session not found or expired".into())
}

fn busy() -> ApiError {
    ApiError::TooManyRequests { message: "Session is busy processing another request".into(), retry_after_secs: 1 }
}

/// The session a chat may use: visible, not deleted, not expired.
async fn chat_session(state: &AppState, principal: &Principal, session_id: &str) -> Result<Session, ApiError> {
    let session = visible_session(state, principal, session_id).await.map_err(|_| session_gone())?;
    if session.status != SessionStatus::Active {
        return Err(session_gone());
    }
    Ok(session)
}

pub(super) fn turn_error(error: TurnError) -> ApiError {
    match error {
        TurnError::Timeout(secs) => {
            ApiError::GatewayTimeout(format!("No result within {secs} s; the turn was interrupted"))
        }
        TurnError::SessionGone => session_gone(),
        TurnError::Sandbox(e) => ApiError::Unavailable { message: e.to_string(), retry_after_secs: 5 },
        e @ TurnError::TooManyWarm { scope: WarmScope::User, .. } => {
            ApiError::TooManyRequests { message: e.to_string(), retry_after_secs: 5 }
        }
        e @ (TurnError::TooManyWarm { .. } | TurnError::ServerBusy(_)) => {
            ApiError::Unavailable { message: e.to_string(), retry_after_secs: 5 }
        }
        other => ApiError::BadGateway(other.to_string()),
    }
}

/// Records the turn in the store (count, activity, usage).
/// Runs a turn whose frames go to the session's log as they come (for the
/// SSE response and any watcher), recorded before its final frame is sent.
async fn published_turn(
    state: &AppState,
    session: &Session,
    turn: TurnGuard,
    request: &ChatRequest,
) -> Result<TurnOutcome, ApiError> {
    let conversation = turn.conversation().clone();
    let mut finals = Vec::new();
    let result =
        chat::run_turn(state, session, &request.message, Duration::from_secs(request.timeout), |line, message| {
            for frame in frames_of(line, message) {
                if frame.is_final() {
                    finals.push(frame);
                } else {
                    conversation.publish(frame);
                }
            }
        })
        .await
        .map_err(turn_error);
    if let Err(error) = &result {
        finals = vec![chat::error_frame(&error.to_string())];
    }
    turn.finish(finals);
    result
}

/// Send a message and wait for the whole turn.
#[utoipa::path(
    post, path = "/api/v1/chat", tag = "chat", request_body = ChatRequest,
    responses(
        (status = 200, description = "The turn's result", body = ChatResponse),
        (status = 404, description = "Session not found or expired", body = ErrorBody),
        (status = 422, description = "Validation error", body = ErrorBody),
        (status = 429, description = "A turn already runs in this session", body = ErrorBody),
        (status = 502, description = "The CLI failed during the turn", body = ErrorBody),
        (status = 503, description = "The sandbox could not be started", body = ErrorBody),
        (status = 504, description = "No result within `timeout`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn chat(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let session = chat_session(&state, &principal, &request.session_id).await?;
    let turn = request.begin_turn(&state, &session).await?;
    // A sync turn is streamed to the session's frame log too, so a client can
    // watch it on GET /api/v1/sessions/{id}/stream.
    let outcome = published_turn(&state, &session, turn, &request).await?;
    Ok(chat_response(&session.session_id, &outcome))
}

/// The body of `POST /api/v1/chat` ([`ChatResponse`]), written from the
/// turn's parts: the CLI's lines, the result's text, tool inputs and usage
/// go out as the CLI wrote them (parts of its lines, as in the SSE frames).
/// Serialising the struct re-parsed each line, decoded and re-escaped the
/// text, and copied all of it into one growing buffer: for a 10 MB reply,
/// some five scans and four copies of 10 MB.
fn chat_response(session_id: &str, outcome: &TurnOutcome) -> Response {
    fn json(chunks: &mut Chunks, value: &impl Serialize) {
        // Plain values (strings, numbers, times) always serialise.
        let _ = serde_json::to_writer(chunks.small_writer(), value);
    }
    fn raw_or(chunks: &mut Chunks, raw: Option<&Text>, otherwise: &'static [u8]) {
        match raw {
            Some(raw) => chunks.shared(raw.as_bytes()),
            None => chunks.small(otherwise),
        }
    }
    let summary = &outcome.summary;
    let mut chunks = Chunks::default();
    chunks.small(b"{\"session_id\":");
    json(&mut chunks, &session_id);
    chunks.small(b",\"text\":");
    raw_or(&mut chunks, summary.text.as_ref(), b"\"\"");
    chunks.small(b",\"tool_calls\":[");
    for (index, (tool, input)) in summary.tool_calls.iter().enumerate() {
        chunks.small(if index == 0 { b"{\"tool\":" } else { b",{\"tool\":" });
        json(&mut chunks, tool);
        chunks.small(b",\"input\":");
        raw_or(&mut chunks, input.as_ref(), b"null");
        chunks.small(b"}");
    }
    chunks.small(b"],\"timestamp\":");
    json(&mut chunks, &store::now());
    chunks.small(b",\"subtype\":");
    json(&mut chunks, &summary.subtype);
    chunks.small(b",\"is_error\":");
    json(&mut chunks, &summary.is_error);
    chunks.small(b",\"total_cost_usd\":");
    json(&mut chunks, &summary.usage.total_cost_usd);
    chunks.small(b",\"usage\":");
    raw_or(&mut chunks, summary.usage_json.as_ref(), b"null");
    chunks.small(b",\"duration_ms\":");
    json(&mut chunks, &summary.duration_ms);
    chunks.small(b",\"num_turns\":");
    json(&mut chunks, &summary.num_turns);
    chunks.small(b",\"messages\":[");
    for (index, message) in outcome.messages.iter().enumerate() {
        if index > 0 {
            chunks.small(b",");
        }
        chunks.shared(message.line.as_bytes());
    }
    chunks.small(b"]}");
    let chunks = chunks.finish();
    let length: usize = chunks.iter().map(Bytes::len).sum();
    let body = futures::stream::iter(chunks.into_iter().map(Ok::<_, Infallible>));
    let mut response = axum::body::Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("content-length", HeaderValue::from(length));
    response
}

/// A response body as a list of chunks: small pieces are joined into one
/// buffer, big ones (parts of CLI lines) go out as they are, shared.
#[derive(Default)]
struct Chunks {
    chunks: Vec<Bytes>,
    small: BytesMut,
}

impl Chunks {
    /// Below this, a shared piece is copied into its neighbours' chunk
    /// rather than sent as a chunk of its own.
    const JOIN_BELOW: usize = 4096;

    fn small(&mut self, bytes: &[u8]) {
        self.small.extend_from_slice(bytes);
    }

    fn small_writer(&mut self) -> impl std::io::Write + '_ {
        tokio_util::bytes::BufMut::writer(&mut self.small)
    }

    fn shared(&mut self, bytes: &Bytes) {
        if bytes.len() < Self::JOIN_BELOW {
            self.small(bytes);
            return;
        }
        if !self.small.is_empty() {
            self.chunks.push(self.small.split().freeze());
        }
        self.chunks.push(bytes.clone());
    }

    fn finish(mut self) -> Vec<Bytes> {
        if !self.small.is_empty() {
            self.chunks.push(self.small.freeze());
        }
        self.chunks
    }
}

/// The frames one CLI message (read from `line`) becomes. Their text and
/// `raw` are parts of the CLI's line, not copies.
fn frames_of(line: &Text, message: &CliMessage) -> Vec<Frame> {
    fn json(value: Option<&RawValue>) -> Field<'_> {
        value.map_or(Field::Null, |value| Field::Json(value.get()))
    }
    let raw = Some(line);
    let text = |value| stream_json::string_literal(value).map_or(Field::Null, Field::Json);
    let blocks = || message.message.as_ref().map(MessageBody::blocks).unwrap_or_default().iter();
    match message.kind.as_deref() {
        Some("stream_event") => {
            let Some(delta) = message.event.as_ref().and_then(|event| event.delta.as_ref()) else {
                return Vec::new();
            };
            match delta.kind.as_deref() {
                Some("text_delta") => {
                    vec![Frame::new("text_delta", Fields { text: text(delta.text), ..Fields::default() }, raw)]
                }
                Some("thinking_delta") => {
                    vec![Frame::new("thinking", Fields { text: text(delta.thinking), ..Fields::default() }, raw)]
                }
                _ => Vec::new(),
            }
        }
        Some("assistant") => blocks()
            .filter(|block| block.is("tool_use"))
            .map(|block| {
                let name = stream_json::string_literal(block.name).map_or(Field::Str(""), Field::Json);
                let input = json(block.input);
                Frame::new("tool_use", Fields { tool_name: name, tool_input: input, ..Fields::default() }, raw)
            })
            .collect(),
        Some("user") => blocks()
            .filter(|block| block.is("tool_result"))
            .map(|block| {
                // A string as it is; other content (blocks) as its JSON text.
                let content = match (stream_json::string_literal(block.content), block.content) {
                    (Some(literal), _) => Field::Json(literal),
                    (None, Some(json)) => Field::Str(json.get()),
                    (None, None) => Field::Str("null"),
                };
                Frame::new("tool_result", Fields { text: content, ..Fields::default() }, raw)
            })
            .collect(),
        Some("result") => {
            let extra = [
                ("subtype", json(message.subtype)),
                ("is_error", json(message.is_error)),
                ("total_cost_usd", json(message.total_cost_usd)),
                ("usage", json(message.usage)),
                ("duration_ms", json(message.duration_ms)),
                ("num_turns", json(message.num_turns)),
            ];
            let result =
                Frame::with_extra("result", Fields { text: text(message.result), ..Fields::default() }, raw, &extra);
            let last = if message.is_error.is_some_and(|is_error| is_error.get() == "true") {
                let error =
                    stream_json::string_literal(message.result).map_or(Field::Str("the turn failed"), Field::Json);
                Frame::new("error", Fields { error, ..Fields::default() }, raw)
            } else {
                Frame::new("done", Fields::default(), None)
            };
            vec![result, last]
        }
        _ => Vec::new(),
    }
}

/// Send a message and stream the turn as Server-Sent Events.
#[utoipa::path(
    post, path = "/api/v1/chat/stream", tag = "chat", request_body = ChatRequest,
    responses(
        (status = 200, description = "`text/event-stream` of frames {type, text, tool_name, tool_input, error, raw}"),
        (status = 404, description = "Session not found or expired", body = ErrorBody),
        (status = 429, description = "A turn already runs in this session", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn chat_stream(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let session = chat_session(&state, &principal, &request.session_id).await?;
    let turn = request.begin_turn(&state, &session).await?;
    // Subscribed before the turn starts, so the response misses nothing.
    let frames = turn.conversation().clone().frames(turn.first_frame, false);
    // The turn runs on its own task: a client that disconnects does not
    // stop it, and the session is free again when the CLI's result is in.
    tokio::spawn(async move {
        let _ = published_turn(&state, &session, turn, &request).await;
    });
    Ok(sse_response(frames))
}

/// An SSE response of a session's frames, with keep-alives and no proxy
/// buffering. Written here rather than with axum's `Sse`, which copies each
/// event into its own buffer: a frame's parts go to the socket as they are
/// (see [`chat::FrameJson`]).
fn sse_response(frames: impl futures::Stream<Item = StreamItem> + Send + 'static) -> Response {
    use futures::StreamExt;
    let open = crate::metrics::OpenStream::counted();
    let chunks = Box::pin(frames.flat_map(move |item| {
        let _counted_while_the_stream_lives = &open;
        futures::stream::iter(sse_event(item))
    }));
    // A comment line when nothing was sent for KEEP_ALIVE; `next` is
    // cancel-safe, so a timed-out wait loses nothing.
    let body = futures::stream::unfold(chunks, |mut chunks| async move {
        let chunk = match tokio::time::timeout(KEEP_ALIVE, chunks.next()).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return None,
            Err(_) => Bytes::from_static(b":\n\n"),
        };
        Some((Ok::<_, Infallible>(chunk), chunks))
    });
    let mut response = axum::body::Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("text/event-stream"));
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The chunks of one SSE event: `id:` (for frames of the log), `data:` with
/// the frame's JSON (one line: compact JSON holds no CR or LF), a blank
/// line. Small neighbouring pieces are joined into one chunk.
fn sse_event(item: StreamItem) -> Vec<Bytes> {
    let (id, json) = match item {
        StreamItem::Frame(frame) => (Some(frame.id), frame.data.clone()),
        StreamItem::Gap { from, resumed_at } => {
            let missed = resumed_at.saturating_sub(from);
            let message = format!(
                "events before id {resumed_at} are no longer buffered (up to {missed} missed); \
                 GET /api/v1/sessions/{{id}}/messages has the full history"
            );
            let resumed_at = resumed_at.to_string();
            let fields = Fields { error: Field::Str(&message), ..Fields::default() };
            (None, Frame::with_extra("gap", fields, None, &[("resumed_at", Field::Json(&resumed_at))]).json)
        }
        StreamItem::Lagged { last_delivered, resumed_at } => {
            crate::metrics::SSE_STREAMS_LAGGED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let message = format!(
                "this stream fell behind the session's event buffer and is closed; reconnect to \
                 GET /api/v1/sessions/{{id}}/stream with Last-Event-ID: {last_delivered} \
                 (events before id {resumed_at} are no longer buffered)"
            );
            let (last_delivered, resumed_at) = (last_delivered.to_string(), resumed_at.to_string());
            let extra = [("last_event_id", Field::Json(&last_delivered)), ("resumed_at", Field::Json(&resumed_at))];
            let fields = Fields { error: Field::Str(&message), ..Fields::default() };
            (None, Frame::with_extra("lagged", fields, None, &extra).json)
        }
    };
    let mut chunks = Chunks::default();
    if let Some(id) = id {
        let _ = writeln!(chunks.small_writer(), "id: {id}");
    }
    chunks.small(b"data: ");
    for part in json.parts() {
        chunks.shared(part);
    }
    chunks.small(b"\n\n");
    chunks.finish()
}

/// Query of `GET /api/v1/sessions/{id}/stream`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Resume after this event id (the `Last-Event-ID` header wins).
    pub last_event_id: Option<u64>,
    /// `true`: stay open across turns until the session is gone.
    #[serde(default)]
    pub follow: bool,
}

/// Reconnect to a session's events: with `Last-Event-ID` (header, or
/// `last_event_id` in the query), everything after that id still buffered,
/// then live; without, the running turn from its start. Ends after the
/// turn's `done`/`error` (at once when no turn runs and nothing was
/// missed), unless `follow=true`. Frames that were dropped from the buffer
/// are reported by one `gap` frame.
#[utoipa::path(
    get, path = "/api/v1/sessions/{session_id}/stream", tag = "chat",
    params(("session_id" = String, Path, description = "Session id"), StreamQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Id of the last event received")),
    responses(
        (status = 200, description = "`text/event-stream` of the session's frames"),
        (status = 404, description = "Session not found or expired", body = ErrorBody),
        (status = 422, description = "Bad Last-Event-ID", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn session_stream(
    State(state): State<AppState>,
    principal: Principal,
    Path(session_id): Path<String>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<StreamQuery>,
) -> Result<Response, ApiError> {
    let session = chat_session(&state, &principal, &session_id).await?;
    let header = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()).ok_or_else(|| {
            ApiError::Validation(vec![FieldError::new(
                "int_parsing",
                ["header".into(), "Last-Event-ID".into()],
                "must be an event id received from this API",
                value.to_str().unwrap_or("").into(),
            )])
        })?),
    };
    let conversation = state.conversations.get(&session);
    let from = match header.or(query.last_event_id) {
        Some(last) => last.saturating_add(1),
        None => conversation.default_start(),
    };
    Ok(sse_response(conversation.frames(from, query.follow)))
}

/// Query of `GET /api/v1/sessions/{id}/messages`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MessagesQuery {
    /// Only entries after this `seq` (the previous page's `next_after`).
    #[serde(default)]
    #[param(minimum = 0)]
    pub after: i64,
    /// Page size, 1–500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// A page of a session's history.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessagePage {
    pub session_id: String,
    /// Oldest first: the user's messages, the assistant's, tool results,
    /// each turn's result (and `error` entries for turns that failed).
    pub messages: Vec<store::StoredMessage>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<i64>,
}

/// The session's history, oldest first, paginated.
#[utoipa::path(
    get, path = "/api/v1/sessions/{session_id}/messages", tag = "chat",
    params(("session_id" = String, Path, description = "Session id"), MessagesQuery),
    responses(
        (status = 200, description = "A page of the history", body = MessagePage),
        (status = 404, description = "Session not found", body = ErrorBody),
        (status = 422, description = "Bad query", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn messages(
    State(state): State<AppState>,
    principal: Principal,
    Path(session_id): Path<String>,
    ApiQuery(query): ApiQuery<MessagesQuery>,
) -> Result<Json<MessagePage>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) || query.after < 0 {
        let (field, input): (&str, Value) =
            if query.after < 0 { ("after", query.after.into()) } else { ("limit", limit.into()) };
        return Err(ApiError::Validation(vec![FieldError::new(
            "value_error",
            ["query".into(), field.into()],
            "limit must be 1-500 and after at least 0",
            input,
        )]));
    }
    // Expired sessions keep their history (they can be resumed).
    let session = visible_session(&state, &principal, &session_id).await?;
    // One more than asked tells whether another page exists.
    let mut messages = state.store.list_messages(&session.session_id, query.after, limit + 1).await?;
    let next_after = (messages.len() > limit as usize).then(|| {
        messages.truncate(limit as usize);
        messages.last().map_or(query.after, |m| m.seq)
    });
    Ok(Json(MessagePage { session_id: session.session_id, messages, next_after }))
}

/// Interrupt the running turn: the CLI stops and answers with its result;
/// the session stays usable.
#[utoipa::path(
    post, path = "/api/v1/sessions/{session_id}/interrupt", tag = "chat",
    params(("session_id" = String, Path, description = "Session id")),
    responses(
        (status = 202, description = "Interrupt sent"),
        (status = 404, description = "Session not found", body = ErrorBody),
        (status = 409, description = "No CLI runs for this session", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn interrupt(
    State(state): State<AppState>,
    principal: Principal,
    Path(session_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let session = visible_session(&state, &principal, &session_id).await?;
    let sent = state
        .supervisor
        .write_stdin(&session.user_id, &session.session_id, chat::control_request_line("interrupt"))
        .await;
    if sent { Ok(StatusCode::ACCEPTED) } else { Err(ApiError::Conflict("No CLI runs for this session".into())) }
}

/// Query of `GET /api/v1/usage`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// Whose usage (admins: anyone; users: themselves). Default: the caller.
    pub user_id: Option<String>,
}

/// A user's token and cost totals, overall and per session.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    pub user_id: String,
    /// As the CLIs reported it in each turn's result.
    pub total: store::UsageTotals,
    /// As the model proxy metered it (the source of truth for budgets):
    /// every model request of the user, priced with `model_proxy.prices`.
    pub metered: MeteredUsage,
    /// Turns (messages) of all the user's sessions.
    pub turns: i64,
    pub sessions: Vec<SessionUsage>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionUsage {
    pub session_id: String,
    pub status: SessionStatus,
    pub message_count: i64,
    pub usage: store::UsageTotals,
    /// Metered by the model proxy.
    pub metered: MeteredUsage,
}

/// Model requests and their summed usage, as the model proxy saw them.
#[derive(Debug, Default, Clone, Serialize, ToSchema)]
pub struct MeteredUsage {
    pub requests: i64,
    pub usage: store::UsageTotals,
}

/// Token and cost totals recorded from each turn's result (deleted
/// sessions included: their turns were spent).
#[utoipa::path(
    get, path = "/api/v1/usage", tag = "chat", params(UsageQuery),
    responses(
        (status = 200, description = "Usage totals", body = UsageReport),
        (status = 403, description = "Another user's usage", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn usage(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<UsageQuery>,
) -> Result<Json<UsageReport>, ApiError> {
    let user_id = super::sessions::owner_for(&principal, query.user_id.as_deref())?;
    let (requests, usage) = state.store.model_usage(&user_id, None).await?;
    let by_session: std::collections::HashMap<String, MeteredUsage> = state
        .store
        .model_usage_by_session(&user_id)
        .await?
        .into_iter()
        .map(|(session_id, requests, usage)| (session_id, MeteredUsage { requests, usage }))
        .collect();
    let mut report = UsageReport {
        user_id: user_id.clone(),
        total: store::UsageTotals::default(),
        metered: MeteredUsage { requests, usage },
        turns: 0,
        sessions: Vec::new(),
    };
    let mut after = None;
    loop {
        let page = state
            .store
            .list_sessions(&store::SessionQuery {
                user_id: Some(user_id.clone()),
                statuses: vec![SessionStatus::Active, SessionStatus::Expired, SessionStatus::Deleted],
                after: after.take(),
                limit: 1000,
            })
            .await?;
        let full = page.len() == 1000;
        for session in page {
            report.total += &session.usage;
            report.turns += session.message_count;
            after =
                Some(store::SessionCursor { created_at: session.created_at, session_id: session.session_id.clone() });
            report.sessions.push(SessionUsage {
                metered: by_session.get(&session.session_id).cloned().unwrap_or_default(),
                session_id: session.session_id,
                status: session.status,
                message_count: session.message_count,
                usage: session.usage,
            });
        }
        if !full {
            return Ok(Json(report));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::stream_json::CliLine;

    fn parsed(frames: Vec<Frame>) -> Vec<(&'static str, Value)> {
        frames.into_iter().map(|f| (f.kind, serde_json::from_str(&f.json.to_text()).expect("frame is JSON"))).collect()
    }

    fn read(line: String) -> CliLine {
        CliLine::read(Text::from(line)).expect("JSON")
    }

    fn frames_of_line(line: &CliLine) -> Vec<Frame> {
        frames_of(&line.line, &line.message())
    }

    fn of(message: Value) -> Vec<(&'static str, Value)> {
        parsed(frames_of_line(&read(message.to_string())))
    }

    #[tokio::test]
    async fn the_sync_response_holds_the_turn_as_the_cli_wrote_it() {
        let big = "é \"quoted\"\n".repeat(1000);
        let assistant = json!({"type": "assistant", "message": {"content": [
            {"type": "text", "text": big},
            {"type": "tool_use", "name": "Bash", "input": {"command": "ls", "z": [1, 2]}},
            {"type": "tool_use", "name": "Read"}]}});
        let user = json!({"type": "user", "message": {"content": [{"type": "tool_result", "content": "out"}]}});
        let result = json!({"type": "result", "subtype": "success", "is_error": false, "result": big,
                            "total_cost_usd": 0.25, "usage": {"input_tokens": 3, "output_tokens": 5},
                            "duration_ms": 7, "num_turns": 2});
        let lines: Vec<String> = [&assistant, &user, &result].iter().map(|m| m.to_string()).collect();
        let outcome = TurnOutcome::of_lines(&lines);
        assert_eq!(outcome.summary.usage.output_tokens, 5);
        let response = chat_response("s-1", &outcome);
        let length = response.headers()["content-length"].to_str().expect("length").parse::<usize>().expect("number");
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
        assert_eq!(body.len(), length);
        let mut body: Value = serde_json::from_slice(&body).expect("the body is JSON");
        let timestamp = body["timestamp"].take();
        assert!(timestamp.as_str().and_then(|t| t.parse::<DateTime<Utc>>().ok()).is_some(), "{timestamp}");
        assert_eq!(
            body,
            json!({"session_id": "s-1", "text": big,
                   "tool_calls": [{"tool": "Bash", "input": {"command": "ls", "z": [1, 2]}},
                                  {"tool": "Read", "input": null}],
                   "timestamp": null, "subtype": "success", "is_error": false, "total_cost_usd": 0.25,
                   "usage": {"input_tokens": 3, "output_tokens": 5}, "duration_ms": 7, "num_turns": 2,
                   "messages": [assistant, user, result]})
        );
        // An error result without text or usage.
        let failed = json!({"type": "result", "subtype": "error_during_execution", "is_error": true});
        let response = chat_response("s-2", &TurnOutcome::of_lines(&[failed.to_string()]));
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
        let body: Value = serde_json::from_slice(&body).expect("the body is JSON");
        assert_eq!((&body["text"], &body["tool_calls"], &body["usage"]), (&json!(""), &json!([]), &Value::Null));
        assert_eq!(
            (&body["is_error"], &body["duration_ms"], &body["messages"]),
            (&json!(true), &Value::Null, &json!([failed]))
        );
    }

    #[test]
    fn frames_have_the_seeds_keys_and_the_cli_line_as_raw() {
        let delta = json!({"type": "stream_event", "event": {"delta": {"type": "text_delta", "text": "hé \"x\"\n"}}});
        assert_eq!(
            of(delta.clone()),
            [(
                "text_delta",
                json!({"type": "text_delta", "text": "hé \"x\"\n", "tool_name": null, "tool_input": null,
                         "error": null, "raw": delta})
            )]
        );
        let tool = json!({"type": "assistant", "message": {"content": [
            {"type": "text", "text": "t"}, {"type": "tool_use", "name": "Bash", "input": {"command": "ls"}}]}});
        assert_eq!(
            of(tool.clone()),
            [(
                "tool_use",
                json!({"type": "tool_use", "text": null, "tool_name": "Bash", "tool_input": {"command": "ls"},
                         "error": null, "raw": tool})
            )]
        );
        let tool_results = json!({"type": "user", "message": {"content": [
            {"type": "tool_result", "content": "out\n"}, {"type": "tool_result", "content": [{"type": "text"}]},
            {"type": "text", "text": "not a result"}]}});
        let frames = of(tool_results);
        assert_eq!(frames.len(), 2);
        assert_eq!((&frames[0].1["text"], &frames[1].1["text"]), (&json!("out\n"), &json!(r#"[{"type":"text"}]"#)));
        let result = json!({"type": "result", "subtype": "success", "is_error": false, "result": "done.",
                            "total_cost_usd": 0.5, "usage": {"input_tokens": 3}, "duration_ms": 7, "num_turns": 1});
        let frames = of(result.clone());
        assert_eq!(frames[0].1["type"], "result");
        assert_eq!(frames[0].1["text"], "done.");
        assert_eq!((&frames[0].1["subtype"], &frames[0].1["usage"]), (&json!("success"), &json!({"input_tokens": 3})));
        assert_eq!(frames[0].1["raw"], result);
        assert_eq!(
            frames[1],
            (
                "done",
                json!({"type": "done", "text": null, "tool_name": null, "tool_input": null,
                                              "error": null, "raw": null})
            )
        );
        let failed = json!({"type": "result", "is_error": true, "result": "budget"});
        assert_eq!(of(failed)[1].1["error"], "budget");
        // Missing keys read as null, as in the seed.
        let bare = of(json!({"type": "result"}));
        assert_eq!((&bare[0].1["text"], &bare[0].1["usage"], bare[1].0), (&Value::Null, &Value::Null, "done"));
        assert!(of(json!({"type": "system"})).is_empty());
        assert!(of(json!({"type": "stream_event", "event": "odd"})).is_empty());
    }

    #[test]
    fn a_line_with_a_carriage_return_is_written_anew() {
        // CR is JSON whitespace but would break the SSE framing.
        let line = "{\"type\":\"stream_event\",\r\"event\":{\"delta\":{\"type\":\"text_delta\",\"text\":\"a\"}}}";
        let message: Value = serde_json::from_str(line).expect("valid JSON");
        let frames = frames_of_line(&read(line.to_owned()));
        let json = frames[0].json.to_text();
        assert!(!json.contains('\r'));
        let frame: Value = serde_json::from_str(&json).expect("JSON");
        assert_eq!(frame["raw"], message);
    }

    #[test]
    fn a_big_reply_is_shared_with_the_line_not_copied() {
        let text = "x".repeat(100_000);
        let line = read(json!({"type": "result", "result": text, "is_error": false}).to_string());
        let frames = frames_of_line(&line);
        let buffer = line.line.as_bytes().as_ptr_range();
        let shared: Vec<usize> = frames[0]
            .json
            .parts()
            .iter()
            .filter(|part| buffer.contains(&part.as_ptr()))
            .map(|part| part.len())
            .collect();
        // The text (with its quotes) and the whole line as `raw`.
        assert_eq!(shared, [text.len() + 2, line.line.len()]);
        assert_eq!(parsed(frames)[0].1["text"], text);
    }

    #[test]
    fn an_sse_event_is_one_data_line_and_small_pieces_go_in_one_chunk() {
        let line = read(
            json!({"type": "stream_event", "event": {"delta": {"type": "text_delta",
            "text": "y".repeat(20_000)}}})
            .to_string(),
        );
        let frame = frames_of_line(&line).remove(0);
        let expected = format!("id: 7\ndata: {}\n\n", frame.json.to_text());
        let chunks =
            sse_event(StreamItem::Frame(Arc::new(chat::StreamFrame { id: 7, data: frame.json, terminal: false })));
        // `id:`+`data:`+the frame's head, the text, the middle, the line, the end.
        assert_eq!(chunks.len(), 5, "{:?}", chunks.iter().map(Bytes::len).collect::<Vec<_>>());
        assert_eq!(chunks.concat(), expected.as_bytes());
        let gap = sse_event(StreamItem::Gap { from: 3, resumed_at: 9 });
        let text = String::from_utf8(gap.concat()).expect("UTF-8");
        let data: Value = serde_json::from_str(
            text.strip_prefix("data: ").and_then(|t| t.strip_suffix("\n\n")).expect("one data line"),
        )
        .expect("JSON");
        assert_eq!((&data["type"], &data["resumed_at"]), (&json!("gap"), &json!(9)));
    }
}
