//! Chat turns: one user message written to a session's warm CLI (streaming
//! input mode), its output lines read back until the CLI's `result`.
//!
//! Each session has a [`Conversation`]: its turn lock (one turn at a time; a
//! second is refused, never queued), its bounded log of SSE frames (so a
//! client that lost its stream reconnects with `Last-Event-ID` and misses
//! nothing still buffered), and when it was last used (idle stop, LRU
//! eviction of warm CLIs). Turns across the server share
//! `api.max_concurrent_requests` slots.
//!
//! The CLI process starts on session create (warm) and is restarted with
//! `--resume` when it is gone (idle stop, eviction, crash, server restart).
//! A turn that outlives its deadline is interrupted with the CLI's own
//! `interrupt` control request.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::value::RawValue;
use serde_json::{Value, json};
use shared::Text;
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore, broadcast, watch};
use tokio::time::Instant;
use tokio_util::bytes::Bytes;

use crate::app::AppState;
use crate::config::{ApiConfig, Secret};
use crate::store::{NewMessage, Session, UsageTotals};
use crate::stream_json::{self, CliLine, CliMessage};
use crate::workers::sandbox;
use crate::workers::supervisor::{ProcessEvent, SupervisorError};

/// How long an interrupted turn may take to deliver its `result`.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);
/// How long a finished turn waits for its streams to take its last frames
/// before it is stored (see [`Conversation::readers_caught_up`]).
const RESULT_DELIVERY_WAIT: Duration = Duration::from_millis(500);
/// How long an evicted or idle CLI gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// Why a turn failed before the CLI produced a result.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error("{0}")]
    Sandbox(#[from] SupervisorError),
    #[error("the session's CLI exited during the turn{0}")]
    Exited(String),
    #[error("no result within {0} s; the turn was interrupted")]
    Timeout(u64),
    #[error("the session's CLI is not reachable")]
    NotRunning,
    #[error("the session's CLI broke its protocol ({0}); it was stopped, the next message restarts it")]
    Protocol(String),
    #[error("all {0} chat slots of the server stayed busy for the whole timeout")]
    ServerBusy(u32),
    #[error("{scope} already has {cap} warm CLI processes, all of them in a turn")]
    TooManyWarm { scope: WarmScope, cap: u32 },
    /// The session was deleted or expired while its CLI was starting.
    #[error("the session was deleted or expired")]
    SessionGone,
}

/// Which cap on warm CLI processes was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmScope {
    User,
    Server,
}

impl std::fmt::Display for WarmScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::User => "this user",
            Self::Server => "the server",
        })
    }
}

/// What a finished turn produced.
#[derive(Debug, Clone)]
pub struct TurnOutcome {
    /// Every JSON message the CLI wrote during the turn, in order (control
    /// responses, the echo of the user's own message and the partial
    /// `stream_event` deltas left out).
    pub messages: Vec<CliLine>,
    /// What the API reports of the turn, read while its lines were parsed.
    pub summary: TurnSummary,
}

/// The turn's tool calls and its `result`'s fields, taken from the lines'
/// one parse (a reply of megabytes is in the assistant message and again
/// in the result: reading them a second time cost a scan of each). Values
/// kept as JSON text are parts of the CLI's line, not copies.
#[derive(Debug, Clone, Default)]
pub struct TurnSummary {
    /// The result's `result` as its JSON string literal (quotes and
    /// escapes included); `None` when it is no string.
    pub text: Option<Text>,
    pub subtype: Option<String>,
    pub is_error: bool,
    /// The result's `usage` as JSON text.
    pub usage_json: Option<Text>,
    /// Its counters, and the result's `total_cost_usd`.
    pub usage: UsageTotals,
    pub duration_ms: Option<u64>,
    pub num_turns: Option<u64>,
    /// `tool_use` blocks of the assistant's messages: name, input as JSON text.
    pub tool_calls: Vec<(String, Option<Text>)>,
}

impl TurnOutcome {
    /// The outcome of a turn that wrote these lines, read as `read_turn`
    /// reads them.
    #[cfg(test)]
    pub(crate) fn of_lines(lines: &[String]) -> Self {
        let mut summary = TurnSummary::default();
        let messages = lines
            .iter()
            .map(|line| {
                CliLine::read_with(Text::from(line.clone()), |line, message| summary.take(line, message)).expect("JSON")
            })
            .collect();
        Self { messages, summary }
    }
}

impl TurnSummary {
    /// Takes what it reports from one of the turn's messages.
    fn take(&mut self, line: &Text, message: &CliMessage) {
        let part = |raw: Option<&RawValue>| raw.and_then(|raw| line.part(raw.get()));
        match message.kind.as_deref() {
            Some("assistant") => {
                let blocks = message.message.as_ref().map(stream_json::MessageBody::blocks).unwrap_or_default();
                self.tool_calls.extend(blocks.iter().filter(|block| block.is("tool_use")).map(|block| {
                    (stream_json::string(block.name).unwrap_or_default().into_owned(), part(block.input))
                }));
            }
            Some("result") => {
                let usage: UsageFields = stream_json::view(message.usage).unwrap_or_default();
                let int = |raw| stream_json::view::<i64>(raw).unwrap_or(0);
                self.usage = UsageTotals {
                    input_tokens: int(usage.input_tokens),
                    output_tokens: int(usage.output_tokens),
                    cache_read_tokens: int(usage.cache_read_input_tokens),
                    cache_creation_tokens: int(usage.cache_creation_input_tokens),
                    total_cost_usd: stream_json::view(message.total_cost_usd).unwrap_or(0.0),
                };
                self.text = stream_json::string_literal(message.result).and_then(|literal| line.part(literal));
                self.subtype = stream_json::string(message.subtype).map(std::borrow::Cow::into_owned);
                self.is_error = stream_json::view(message.is_error).unwrap_or(false);
                self.usage_json = part(message.usage);
                self.duration_ms = stream_json::view(message.duration_ms);
                self.num_turns = stream_json::view(message.num_turns);
            }
            _ => {}
        }
    }
}

/// The counters of a `result`'s `usage`.
#[derive(Debug, Default, serde::Deserialize)]
struct UsageFields<'a> {
    #[serde(borrow, default)]
    input_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    output_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    cache_read_input_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    cache_creation_input_tokens: Option<&'a RawValue>,
}

/// A user message line in the CLI's stream-json input format. The CLI
/// keeps `uuid` as the message's id in its transcript.
pub fn user_message_line(text: &str, uuid: &str) -> String {
    let mut line = json!({"type": "user", "uuid": uuid, "message": {"role": "user", "content": text}}).to_string();
    line.push('\n');
    line
}

/// A value of one of a frame's keys.
#[derive(Debug, Clone, Copy, Default)]
pub enum Field<'a> {
    #[default]
    Null,
    /// Text, escaped into the frame.
    Str(&'a str),
    /// JSON already (a value from the CLI's line), put in as it is.
    Json(&'a str),
}

/// The seed's keys of a frame besides `type` and `raw`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fields<'a> {
    pub text: Field<'a>,
    pub tool_name: Field<'a>,
    pub tool_input: Field<'a>,
    pub error: Field<'a>,
}

/// Parts of the CLI's line at least this long go into a frame shared, not
/// copied: below, a copy costs less than one more chunk to write, and a
/// frame never holds a line's buffer for a few bytes of it.
const SHARE_MIN: usize = 16 * 1024;

/// One SSE frame, serialised once: its `type` and its JSON object.
#[derive(Debug)]
pub struct Frame {
    pub kind: &'static str,
    pub json: FrameJson,
}

/// A frame's JSON object in parts: copied bytes, and big values of the
/// CLI's line (a reply's text, the line itself as `raw`) shared with the
/// line, so a 100 MB reply is never copied on its way to the client's
/// socket. Compact JSON: no CR or LF, so it is one SSE `data:` line.
#[derive(Debug, Clone, Default)]
pub struct FrameJson {
    parts: Vec<Bytes>,
    len: usize,
}

impl FrameJson {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// The whole object in one string (a copy).
    pub fn to_text(&self) -> String {
        let mut text = String::with_capacity(self.len);
        for part in &self.parts {
            text.push_str(&String::from_utf8_lossy(part));
        }
        text
    }
}

/// Writes a [`FrameJson`]: small pieces into one buffer, big parts of
/// `line` shared.
struct FrameWriter<'a> {
    line: Option<&'a Text>,
    parts: Vec<Bytes>,
    buffer: Vec<u8>,
    len: usize,
}

impl<'a> FrameWriter<'a> {
    fn new(line: Option<&'a Text>) -> Self {
        Self { line, parts: Vec::new(), buffer: Vec::with_capacity(256), len: 0 }
    }

    fn copy(&mut self, text: &str) {
        self.buffer.extend_from_slice(text.as_bytes());
    }

    fn json(&mut self, json: &str) {
        let shared = (json.len() >= SHARE_MIN).then(|| self.line.and_then(|line| line.part(json))).flatten();
        match shared {
            Some(part) => {
                self.flush();
                self.len += part.len();
                self.parts.push(part.into_bytes());
            }
            None => self.copy(json),
        }
    }

    fn string(&mut self, text: &str) {
        // Escaping a `str` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut self.buffer, text);
    }

    fn field(&mut self, key: &str, value: Field) {
        self.copy(",");
        self.string(key);
        self.copy(":");
        match value {
            Field::Null => self.copy("null"),
            Field::Str(text) => self.string(text),
            Field::Json(json) => self.json(json),
        }
    }

    fn flush(&mut self) {
        if !self.buffer.is_empty() {
            let buffer = std::mem::replace(&mut self.buffer, Vec::with_capacity(256));
            self.len += buffer.len();
            self.parts.push(Bytes::from(buffer));
        }
    }

    fn finish(mut self) -> FrameJson {
        self.flush();
        FrameJson { parts: self.parts, len: self.len }
    }
}

impl Frame {
    /// A frame in the seed's shape: every key present, unused ones null,
    /// `raw` the CLI's line as it wrote it (JSON already; `fields` may hold
    /// parts of it).
    pub fn new(kind: &'static str, fields: Fields, raw: Option<&Text>) -> Self {
        Self::with_extra(kind, fields, raw, &[])
    }

    /// [`Frame::new`] with more keys after the seed's.
    pub fn with_extra(kind: &'static str, fields: Fields, raw: Option<&Text>, extra: &[(&str, Field)]) -> Self {
        let mut writer = FrameWriter::new(raw);
        writer.copy("{\"type\":");
        writer.string(kind);
        writer.field("text", fields.text);
        writer.field("tool_name", fields.tool_name);
        writer.field("tool_input", fields.tool_input);
        writer.field("error", fields.error);
        for (key, value) in extra {
            writer.field(key, *value);
        }
        writer.field("raw", raw.map_or(Field::Null, |line| Field::Json(line)));
        writer.copy("}");
        Self { kind, json: writer.finish() }
    }

    /// `done` or `error`: the turn's last frame.
    pub fn is_final(&self) -> bool {
        matches!(self.kind, "done" | "error")
    }
}

/// A control request line (`initialize`, `interrupt`, ...).
pub fn control_request_line(subtype: &str) -> String {
    control_request_with(json!({"subtype": subtype}))
}

fn control_request_with(request: Value) -> String {
    let id = format!("req_{}", uuid::Uuid::new_v4().simple());
    let mut line = json!({"type": "control_request", "request_id": id, "request": request}).to_string();
    line.push('\n');
    line
}

/// Why a CLI is started: ahead of its session's messages (create, resume),
/// or for a message that waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CliStart {
    Prewarm,
    ForMessage,
}

/// The final frame of a turn that failed without a CLI result.
pub fn error_frame(message: &str) -> Frame {
    Frame::new("error", Fields { error: Field::Str(message), ..Fields::default() }, None)
}

/// One SSE frame of a session, as sent: `id:` and the JSON `data:`.
#[derive(Debug)]
pub struct StreamFrame {
    pub id: u64,
    pub data: FrameJson,
    /// `done` or `error`: the turn is over.
    pub terminal: bool,
}

/// What a stream reader gets next.
#[derive(Debug)]
pub enum StreamItem {
    Frame(Arc<StreamFrame>),
    /// Frames from `from` up to (not including) `resumed_at` were dropped
    /// from the buffer (or belong to an earlier run of the server) before
    /// this reader asked for them.
    Gap {
        from: u64,
        resumed_at: u64,
    },
    /// The last item of a stream whose reader fell so far behind that the
    /// buffer dropped frames it had not read yet: it is cut, and reconnects
    /// with `Last-Event-ID: last_delivered` (it gets a [`StreamItem::Gap`]
    /// then). A reader never holds more than [`READ_BATCH`] frames, so a
    /// slow or vanished client costs no memory beyond the session's buffer.
    Lagged {
        last_delivered: u64,
        resumed_at: u64,
    },
}

/// How many times `api.stream_buffer_events` frames a connected reader
/// may have unread (a 100 MB reply is 1,600 deltas of 64 KiB).
const UNREAD_FRAMES_FACTOR: usize = 64;

/// Frames a stream reader takes from the log at a time.
const READ_BATCH: usize = 64;

/// How long a reader may go without catching up with its session's log
/// before losing frames cuts it (see [`Conversation::frames`]).
const LAG_GRACE: Duration = Duration::from_secs(2);

/// Bounds of a session's frame log.
#[derive(Debug, Clone, Copy)]
struct LogLimits {
    /// What is kept for clients that reconnect (`api.stream_buffer_*`).
    frames: usize,
    bytes: usize,
    /// How far frames a connected reader has not read yet may go beyond
    /// those bounds before they are dropped anyway (and the reader gets a
    /// gap, or is cut when it is too slow).
    unread_frames: usize,
    unread_bytes: usize,
}

/// The frames of a session's recent turns, oldest first, bounded in count
/// and bytes. A frame a connected reader has not read yet stays (up to
/// the `unread` bounds): a reader that keeps up with the network loses
/// nothing, even when the CLI writes faster than it reads.
#[derive(Debug)]
struct FrameLog {
    frames: VecDeque<Arc<StreamFrame>>,
    bytes: usize,
    /// The id the next frame gets. Starts at the creation time in
    /// microseconds, so ids of a later server run are larger than any a
    /// client kept from an earlier one (and are answered with a gap).
    next_id: u64,
    /// First frame id of the running turn, if one runs.
    turn_start: Option<u64>,
    /// The session is gone: readers stop once they have read everything.
    closed: bool,
    limits: LogLimits,
    /// Where each connected reader is, by reader.
    readers: HashMap<u64, ReaderPosition>,
    next_reader: u64,
}

impl FrameLog {
    fn push(&mut self, data: FrameJson, terminal: bool) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.bytes += data.len();
        self.frames.push_back(Arc::new(StreamFrame { id, data, terminal }));
        // A reader that had read everything was waiting, not stuck: its
        // grace starts now that there is something to read.
        for reader in self.readers.values_mut().filter(|reader| reader.next >= id) {
            reader.moved_at = std::time::Instant::now();
        }
        self.evict();
        if terminal {
            self.turn_start = None;
        }
        id
    }

    /// When the last reader that keeps frames beyond the replay bounds
    /// stops counting as progressing, if one does.
    fn held_beyond_bounds_until(&self) -> Option<std::time::Instant> {
        if !self.over_replay_bounds() {
            return None;
        }
        self.readers
            .values()
            .filter(|reader| reader.progressing() && reader.next < self.next_id)
            .map(|reader| reader.moved_at + LAG_GRACE)
            .max()
    }

    /// More frames or bytes than kept for reconnects.
    fn over_replay_bounds(&self) -> bool {
        self.frames.len() > self.limits.frames || self.bytes > self.limits.bytes
    }

    /// Drops the oldest frames beyond the bounds: first those every
    /// connected reader has read, the unread ones only beyond the `unread`
    /// bounds or when no reader that still makes progress needs them. The
    /// newest frame always stays.
    fn evict(&mut self) {
        let unread_from = self.readers.values().filter(|reader| reader.progressing()).map(|reader| reader.next).min();
        while self.frames.len() > 1 && self.over_replay_bounds() {
            let oldest = self.frames.front().map_or(0, |frame| frame.id);
            let unread = unread_from.is_some_and(|from| oldest >= from);
            let beyond = self.frames.len() > self.limits.unread_frames || self.bytes > self.limits.unread_bytes;
            if unread && !beyond {
                break;
            }
            if let Some(old) = self.frames.pop_front() {
                self.bytes -= old.data.len();
            }
        }
    }

    /// Up to [`READ_BATCH`] frames with id ≥ `from`, and where the buffer
    /// resumes if some of those are gone.
    fn read(&self, from: u64) -> (Option<u64>, Vec<Arc<StreamFrame>>) {
        let oldest = self.frames.front().map_or(self.next_id, |f| f.id);
        let resumed_at = (from < oldest).then_some(oldest);
        let skip = self.frames.partition_point(|f| f.id < from);
        (resumed_at, self.frames.iter().skip(skip).take(READ_BATCH).cloned().collect())
    }
}

/// A session's live state on this server.
#[derive(Debug)]
pub struct Conversation {
    pub session_id: String,
    pub user_id: String,
    turn: Arc<tokio::sync::Mutex<()>>,
    log: Mutex<FrameLog>,
    /// The next frame id, announced after every push.
    published: watch::Sender<u64>,
    /// A reader took frames (see [`Conversation::readers_caught_up`]).
    readers_moved: tokio::sync::Notify,
    last_used: Mutex<std::time::Instant>,
    /// The turn lock's holder is about to let go: a turn that has sent its
    /// final frame, or a CLI being stopped. A new turn waits for it instead
    /// of being refused.
    releasing: std::sync::atomic::AtomicBool,
}

/// Holds a session's turn lock while its CLI stops.
struct StopGuard {
    conversation: Arc<Conversation>,
    _lock: OwnedMutexGuard<()>,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.conversation.releasing.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Conversation {
    fn log(&self) -> MutexGuard<'_, FrameLog> {
        // A panic while holding the lock leaves a consistent log (every
        // mutation is a single push/pop): keep using it.
        self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn touch(&self) {
        if let Ok(mut last) = self.last_used.lock() {
            *last = std::time::Instant::now();
        }
    }

    pub fn idle_for(&self) -> Duration {
        self.last_used.lock().map(|t| t.elapsed()).unwrap_or_default()
    }

    /// Whether a turn runs now.
    pub fn busy(&self) -> bool {
        self.turn.try_lock().is_err()
    }

    /// The session's turn, if none runs. Dropping the guard ends it (a
    /// client that goes away never leaves its session locked); a turn that
    /// ends without a final frame gets an `error` frame then, so no reader
    /// waits forever. While the session's CLI is being stopped (idle,
    /// evicted) or a turn is letting go, this waits instead of refusing;
    /// with `queue`, it waits that long for a running turn too.
    pub async fn begin_turn(self: &Arc<Self>, queue: Option<Duration>) -> Option<TurnGuard> {
        let lock = match self.turn.clone().try_lock_owned() {
            Ok(lock) => lock,
            Err(_) => {
                let releasing = self.releasing.load(std::sync::atomic::Ordering::SeqCst);
                let wait = match (queue, releasing) {
                    (Some(queue), true) => queue.max(STOP_GRACE * 3),
                    (Some(queue), false) => queue,
                    (None, true) => STOP_GRACE * 3,
                    (None, false) => return None,
                };
                tokio::time::timeout(wait, self.turn.clone().lock_owned()).await.ok()?
            }
        };
        self.touch();
        let first_frame = {
            let mut log = self.log();
            log.turn_start = Some(log.next_id);
            log.next_id
        };
        Some(TurnGuard { conversation: self.clone(), first_frame, _lock: lock })
    }

    /// Holds the turn lock while the session's CLI is stopped, so no turn
    /// starts on a dying process; `None` when a turn runs.
    fn try_begin_stop(self: &Arc<Self>) -> Option<StopGuard> {
        let lock = self.turn.clone().try_lock_owned().ok()?;
        self.releasing.store(true, std::sync::atomic::Ordering::SeqCst);
        Some(StopGuard { conversation: self.clone(), _lock: lock })
    }

    /// Appends a frame and wakes readers.
    pub fn publish(self: &Arc<Self>, frame: Frame) -> u64 {
        let terminal = frame.is_final();
        let (id, next) = {
            let mut log = self.log();
            let id = log.push(frame.json, terminal);
            (id, log.next_id)
        };
        self.published.send_replace(next);
        if terminal && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // A reader stuck behind a client that stopped reading holds its
            // unread frames only while it takes frames; with no frame to
            // come, look again when the grace of each reader that holds
            // some has run out, until none does.
            let conversation = Arc::downgrade(self);
            runtime.spawn(async move {
                let mut wait = LAG_GRACE;
                loop {
                    tokio::time::sleep(wait + Duration::from_millis(100)).await;
                    let Some(conversation) = conversation.upgrade() else { return };
                    let mut log = conversation.log();
                    log.evict();
                    match log.held_beyond_bounds_until() {
                        Some(until) => wait = until.saturating_duration_since(std::time::Instant::now()),
                        None => return,
                    }
                }
            });
        }
        id
    }

    /// Waits, `within` at most, until every connected reader that still
    /// makes progress has taken every frame published so far. A turn waits
    /// so before it is stored: storing a big reply (its text twice, with
    /// fsync) would otherwise compete with sending the `result` to its
    /// streams, and `done` follows the store anyway.
    pub async fn readers_caught_up(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let moved = self.readers_moved.notified();
            tokio::pin!(moved);
            // Registered before looking, so a move in between is not missed.
            moved.as_mut().enable();
            {
                let log = self.log();
                if log.readers.values().filter(|r| r.progressing()).all(|r| r.next >= log.next_id) {
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, moved).await.is_err() {
                return;
            }
        }
    }

    fn close(&self) {
        self.log().closed = true;
        self.published.send_modify(|_| {});
    }

    /// Where a reader without `Last-Event-ID` starts: the running turn's
    /// first frame, else whatever comes next.
    pub fn default_start(&self) -> u64 {
        let log = self.log();
        log.turn_start.unwrap_or(log.next_id)
    }

    /// Frames from id `from` on: first what the buffer still holds (a gap
    /// first if some are gone), then live ones. With `follow` it goes on
    /// across turns until the session is gone; without, it ends after the
    /// first final frame (`done`/`error`), or at once when no turn runs and
    /// nothing is left to read.
    ///
    /// A reader that loses frames it had not read (after its first read) is
    /// cut with [`StreamItem::Lagged`] when it has not caught up with the log
    /// for [`LAG_GRACE`]: it is too slow. One that was keeping up and lost
    /// frames to a burst (a reply bigger than the buffer evicts everything
    /// before it) gets a [`StreamItem::Gap`] and goes on.
    pub fn frames(self: Arc<Self>, from: u64, follow: bool) -> impl futures::Stream<Item = StreamItem> + Send {
        let receiver = self.published.subscribe();
        let reader = Reader::new(self, from);
        let state = (reader, receiver, from, VecDeque::<StreamItem>::new(), false, true, Instant::now());
        futures::stream::unfold(
            state,
            move |(reader, mut receiver, mut from, mut pending, mut done, first_read, mut caught_up_at)| async move {
                loop {
                    if let Some(item) = pending.pop_front() {
                        return Some((item, (reader, receiver, from, pending, done, false, caught_up_at)));
                    }
                    if done {
                        return None;
                    }
                    receiver.borrow_and_update();
                    let (resumed_at, frames, running, closed) = {
                        let mut log = reader.conversation.log();
                        // An id from the future (a client's invention) reads as "now".
                        from = from.min(log.next_id);
                        // Everything before `from` went to the client (its
                        // connection asks for more only once it has sent
                        // what it had): those frames are no longer held for it.
                        log.readers.insert(reader.id, ReaderPosition::at(from));
                        log.evict();
                        let (resumed_at, frames) = log.read(from);
                        (resumed_at, frames, log.turn_start.is_some(), log.closed)
                    };
                    reader.conversation.readers_moved.notify_waiters();
                    if let Some(resumed_at) = resumed_at {
                        if !first_read && caught_up_at.elapsed() > LAG_GRACE {
                            let lagged = StreamItem::Lagged { last_delivered: from.saturating_sub(1), resumed_at };
                            return Some((lagged, (reader, receiver, from, pending, true, false, caught_up_at)));
                        }
                        pending.push_back(StreamItem::Gap { from, resumed_at });
                        from = resumed_at;
                    }
                    for frame in frames {
                        from = frame.id + 1;
                        let end = frame.terminal && !follow;
                        pending.push_back(StreamItem::Frame(frame));
                        if end {
                            done = true;
                            break;
                        }
                    }
                    if !pending.is_empty() {
                        continue;
                    }
                    caught_up_at = Instant::now();
                    if closed || (!running && !follow) || receiver.changed().await.is_err() {
                        return None;
                    }
                }
            },
        )
    }
}

/// Where a connected reader is: the id it reads next, and when it last
/// took frames (or found none left). A reader stuck behind a client that
/// does not read (its socket full) stops taking frames: after
/// [`LAG_GRACE`] it no longer holds frames in the log.
#[derive(Debug, Clone, Copy)]
struct ReaderPosition {
    next: u64,
    moved_at: std::time::Instant,
}

impl ReaderPosition {
    fn at(next: u64) -> Self {
        Self { next, moved_at: std::time::Instant::now() }
    }

    fn progressing(&self) -> bool {
        self.moved_at.elapsed() <= LAG_GRACE
    }
}

/// A connected reader of a session's frames: the frames it has not read
/// yet stay in the log (up to its `unread` bounds) until it has, or is gone.
struct Reader {
    conversation: Arc<Conversation>,
    id: u64,
}

impl Reader {
    fn new(conversation: Arc<Conversation>, from: u64) -> Self {
        let id = {
            let mut log = conversation.log();
            let id = log.next_reader;
            log.next_reader += 1;
            log.readers.insert(id, ReaderPosition::at(from));
            id
        };
        Self { conversation, id }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        {
            let mut log = self.conversation.log();
            log.readers.remove(&self.id);
            log.evict();
        }
        // A turn waiting for its streams no longer waits for this one.
        self.conversation.readers_moved.notify_waiters();
    }
}

/// A running turn: holds the session's turn lock.
#[derive(Debug)]
pub struct TurnGuard {
    conversation: Arc<Conversation>,
    /// Id of the turn's first frame.
    pub first_frame: u64,
    _lock: OwnedMutexGuard<()>,
}

impl TurnGuard {
    pub fn conversation(&self) -> &Arc<Conversation> {
        &self.conversation
    }

    /// Ends the turn with its final frames (`done` or `error`), published
    /// after everything else of the turn is stored: a client that sends its
    /// next message as soon as it reads `done` finds the session free (it
    /// waits for the few microseconds until the lock is released).
    pub fn finish(self, finals: Vec<Frame>) {
        self.conversation.releasing.store(true, std::sync::atomic::Ordering::SeqCst);
        for frame in finals {
            self.conversation.publish(frame);
        }
    }
}

impl Drop for TurnGuard {
    fn drop(&mut self) {
        self.conversation.releasing.store(false, std::sync::atomic::Ordering::SeqCst);
        self.conversation.touch();
        let unfinished = self.conversation.log().turn_start.is_some();
        if unfinished {
            self.conversation.publish(error_frame("the turn ended without a result"));
        }
    }
}

/// Every session's [`Conversation`] on this server, and the server-wide
/// chat slots.
#[derive(Debug)]
pub struct Conversations {
    sessions: Mutex<HashMap<String, Arc<Conversation>>>,
    limits: LogLimits,
    turn_slots: Arc<Semaphore>,
    max_turns: u32,
    /// Serialises "count warm CLIs, evict, start" so two starts cannot both
    /// take the last place.
    warm_admission: tokio::sync::Mutex<()>,
    /// A session's state was freed since the allocator was last trimmed.
    freed: std::sync::atomic::AtomicBool,
}

impl Conversations {
    /// `max_line`: the longest CLI line (`sandbox.max_output_line_mb`);
    /// a connected reader's unread frames may hold two of them (a line's
    /// text and the line itself, shared), so a reply of any size the
    /// server takes reaches a reader that keeps up.
    pub fn new(api: &ApiConfig, max_line: usize) -> Self {
        let (frames, bytes) = (api.stream_buffer_events.max(1), api.stream_buffer_bytes.max(1));
        let limits = LogLimits {
            frames,
            bytes,
            unread_frames: frames.saturating_mul(UNREAD_FRAMES_FACTOR),
            unread_bytes: bytes.max(max_line.saturating_mul(2)),
        };
        Self {
            sessions: Mutex::new(HashMap::new()),
            limits,
            turn_slots: Arc::new(Semaphore::new(api.max_concurrent_requests.max(1) as usize)),
            max_turns: api.max_concurrent_requests.max(1),
            warm_admission: tokio::sync::Mutex::new(()),
            freed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Conversation>>> {
        self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The session's conversation, created on first use.
    pub fn get(&self, session: &Session) -> Arc<Conversation> {
        self.map()
            .entry(session.session_id.clone())
            .or_insert_with(|| {
                let start = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or_default();
                let log = FrameLog {
                    frames: VecDeque::new(),
                    bytes: 0,
                    next_id: start,
                    turn_start: None,
                    closed: false,
                    limits: self.limits,
                    readers: HashMap::new(),
                    next_reader: 0,
                };
                Arc::new(Conversation {
                    session_id: session.session_id.clone(),
                    user_id: session.user_id.clone(),
                    turn: Arc::default(),
                    log: Mutex::new(log),
                    published: watch::Sender::new(start),
                    readers_moved: tokio::sync::Notify::new(),
                    last_used: Mutex::new(std::time::Instant::now()),
                    releasing: std::sync::atomic::AtomicBool::new(false),
                })
            })
            .clone()
    }

    pub fn existing(&self, session_id: &str) -> Option<Arc<Conversation>> {
        self.map().get(session_id).cloned()
    }

    /// Whether a session's state was freed since the last call.
    pub fn take_freed(&self) -> bool {
        self.freed.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Sessions of `user_id` this server holds state for.
    pub fn sessions_of(&self, user_id: &str) -> Vec<String> {
        self.map().values().filter(|c| c.user_id == user_id).map(|c| c.session_id.clone()).collect()
    }

    /// The session is gone (deleted, expired): readers end, state is freed.
    pub fn forget(&self, session_id: &str) {
        if let Some(conversation) = self.map().remove(session_id) {
            conversation.close();
            self.freed.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Waits until no turn runs, or `grace` has passed; whether they all
    /// finished.
    pub async fn wait_for_turns(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        loop {
            let running = self
                .all()
                .iter()
                .filter(|c| c.busy() && !c.releasing.load(std::sync::atomic::Ordering::SeqCst))
                .count();
            if running == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                tracing::warn!(running, "shutdown grace over: ending the turns still running");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server stops: a turn still running ends its stream with an error
    /// frame, and every stream ends once read to its end.
    pub fn close_all(&self) {
        for conversation in self.map().drain().map(|(_, c)| c) {
            if conversation.log().turn_start.is_some() {
                conversation.publish(error_frame(
                    "the server is shutting down; the turn was stopped (reconnect later with Last-Event-ID)",
                ));
            }
            conversation.close();
        }
    }

    fn all(&self) -> Vec<Arc<Conversation>> {
        self.map().values().cloned().collect()
    }

    /// A chat slot of the server, waiting until `deadline` at most.
    async fn slot(&self, deadline: Instant) -> Result<OwnedSemaphorePermit, TurnError> {
        match tokio::time::timeout_at(deadline, self.turn_slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(TurnError::ServerBusy(self.max_turns)),
        }
    }
}

/// Starts the session's CLI (resuming its conversation when it already had
/// turns) and sends `initialize`, so the first message finds it warm. Makes
/// room first when the user or the server is at its cap of warm CLIs.
pub async fn start_cli(
    state: &AppState,
    session: &Session,
    why: CliStart,
) -> Result<broadcast::Receiver<ProcessEvent>, TurnError> {
    let _admission = state.conversations.warm_admission.lock().await;
    // Idempotent: a concurrent start (a resume racing a message) already did it.
    if let Some(events) = state.supervisor.subscribe(&session.user_id, &session.session_id).await {
        return Ok(events);
    }
    make_room(state, &session.user_id).await?;
    let user_dir = state.user_dirs.base_path().join(&session.user_id);
    let privileged = state.supervisor.mode() == crate::config::SandboxMode::Privileged;
    // The CLI refuses `--session-id` for a conversation it already has and
    // `--resume` for one it has not: ask its transcript, not our counters
    // (a first turn that failed still left one).
    let cli_session = session.cli_session_id.as_deref().unwrap_or(&session.session_id);
    let resume = sandbox::has_transcript(&user_dir, cli_session);
    if session.message_count > 0 && !resume {
        tracing::warn!(session_id = %session.session_id, "the CLI's transcript is gone; the conversation starts afresh");
    }
    let credential = state.model_proxy.issue(&session.user_id, &session.session_id);
    let model = sandbox::ModelEndpoint {
        base_url: state.model_proxy.base_url(),
        egress_proxy: state.egress.as_ref().map(|egress| Secret::new(egress.proxy.proxy_url(credential.expose()))),
        credential,
    };
    if let Some(egress) = &state.egress {
        egress.load_user(state.store.as_ref(), &session.user_id).await;
    }
    let spec = sandbox::cli_spec(&state.config, session, &user_dir, privileged, resume, &model);
    let events = match state.supervisor.start_process(&session.user_id, &session.session_id, spec).await {
        Ok(events) => events,
        Err(e) => {
            state.model_proxy.revoke(&model.credential);
            state.metrics.sandbox_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(e.into());
        }
    };
    // The session's entry exists before the re-check below, so a release
    // for a gone session removes it too (made after, it would outlive it).
    state.conversations.get(session).touch();
    // A DELETE (or the expiry reaper) that ran since the caller read the
    // session stopped whatever CLI was registered then, and this one may
    // have registered after it: read the status again now that it is. The
    // store's status changes before a release stops processes and drops
    // the session's entry, so every order of the two ends with neither for
    // a gone session.
    if !session_still_active(state, &session.session_id).await {
        state.model_proxy.revoke(&model.credential);
        state.release_session(&session.user_id, &session.session_id, STOP_GRACE).await;
        tracing::info!(session_id = %session.session_id, "session gone while its CLI started; stopped it");
        return Err(TurnError::SessionGone);
    }
    // The credential dies with the process.
    let (proxy, mut watch) = (state.model_proxy.clone(), events.resubscribe());
    tokio::spawn(async move {
        loop {
            match watch.recv().await {
                Ok(ProcessEvent::Exited { .. } | ProcessEvent::WorkerDied)
                | Err(broadcast::error::RecvError::Closed) => {
                    break;
                }
                _ => {}
            }
        }
        proxy.revoke(&model.credential);
    });
    state.supervisor.write_stdin(&session.user_id, &session.session_id, control_request_line("initialize")).await;
    if why == CliStart::Prewarm {
        // Makes the CLI build what its first turn would (system prompt,
        // tools, skills listing): no model call, nothing in the transcript;
        // measured 20–90 ms off the first message. Not when a message
        // waits: it would queue behind this.
        let summary = control_request_with(json!({"subtype": "get_context_usage", "detail": "summary"}));
        state.supervisor.write_stdin(&session.user_id, &session.session_id, summary).await;
    }
    Ok(events)
}

/// Whether the session is still open in the store. A store error counts as
/// open: the turn then fails or succeeds on its own, and a later DELETE
/// still stops the CLI.
async fn session_still_active(state: &AppState, session_id: &str) -> bool {
    match state.store.get_session(session_id).await {
        Ok(Some(session)) => session.status == crate::store::SessionStatus::Active,
        Ok(None) => false,
        Err(e) => {
            crate::metrics::store_error(&e);
            tracing::warn!(session_id, error = %e, "cannot read the session back after starting its CLI");
            true
        }
    }
}

/// Stops least recently used idle CLIs until one more fits under
/// `api.max_warm_sessions_per_user` and `api.max_warm_sessions`.
async fn make_room(state: &AppState, user_id: &str) -> Result<(), TurnError> {
    let api = &state.config.api;
    let caps = [(WarmScope::User, api.max_warm_sessions_per_user), (WarmScope::Server, api.max_warm_sessions)];
    for (scope, cap) in caps {
        loop {
            let warm: Vec<(String, String)> = state
                .supervisor
                .running_processes()
                .await
                .into_iter()
                .filter(|(user, _)| scope == WarmScope::Server || user == user_id)
                .collect();
            if warm.len() < cap.max(1) as usize {
                break;
            }
            let mut idle: Vec<Arc<Conversation>> = warm
                .iter()
                .filter_map(|(_, session_id)| state.conversations.existing(session_id))
                .filter(|c| !c.busy())
                .collect();
            idle.sort_by_key(|c| std::cmp::Reverse(c.idle_for()));
            // The least recently used one whose turn lock we get (a turn may
            // have started since).
            let Some((victim, _stop)) = idle.into_iter().find_map(|c| c.try_begin_stop().map(|stop| (c, stop))) else {
                return Err(TurnError::TooManyWarm { scope, cap });
            };
            tracing::info!(
                session_id = %victim.session_id, user_id = %victim.user_id, %scope, cap,
                "stopping the least recently used warm CLI to make room"
            );
            stop_and_wait(state, &victim.user_id, &victim.session_id).await;
        }
    }
    Ok(())
}

/// Stops a session's CLI and waits (a bounded time) until it has exited.
pub async fn stop_and_wait(state: &AppState, user_id: &str, session_id: &str) {
    let Some(mut events) = state.supervisor.subscribe(user_id, session_id).await else { return };
    state.supervisor.stop_process(user_id, session_id, STOP_GRACE).await;
    let _ = tokio::time::timeout(STOP_GRACE + Duration::from_secs(2), async {
        loop {
            match events.recv().await {
                Ok(ProcessEvent::Exited { .. } | ProcessEvent::WorkerDied)
                | Err(broadcast::error::RecvError::Closed) => {
                    return;
                }
                _ => {}
            }
        }
    })
    .await;
}

/// Stops CLIs idle for `api.idle_session_timeout` (their sessions stay
/// open; the next message resumes them). Runs until `shutdown`.
pub async fn idle_cli_reaper(state: AppState, shutdown: tokio_util::sync::CancellationToken) {
    let idle = state.config.api.idle_session_timeout;
    if idle == 0 {
        return;
    }
    let idle = Duration::from_secs(idle);
    let mut ticker = tokio::time::interval((idle / 4).clamp(Duration::from_millis(500), Duration::from_secs(30)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let running = state.supervisor.running_processes().await;
        for conversation in state.conversations.all() {
            let warm = running.iter().any(|(_, session)| *session == conversation.session_id);
            if warm
                && conversation.idle_for() >= idle
                && let Some(stop) = conversation.try_begin_stop()
            {
                tracing::info!(session_id = %conversation.session_id, "stopping an idle CLI");
                let state = state.clone();
                tokio::spawn(async move {
                    stop_and_wait(&state, &conversation.user_id, &conversation.session_id).await;
                    drop(stop);
                });
            }
        }
    }
}

/// What a turn wrote to the session's history: the user's message, the
/// assistant's messages, tool results, the result; as the CLI wrote them.
fn history_entry(line: &CliLine) -> Option<NewMessage> {
    let kind = line.kind.as_deref()?;
    matches!(kind, "user" | "assistant" | "result")
        .then(|| NewMessage { kind: kind.to_owned(), content: line.line.clone() })
}

/// Runs one turn; `on_message` sees every CLI message of the turn as it
/// arrives. The caller holds the session's turn.
pub async fn run_turn(
    state: &AppState,
    session: &Session,
    text: &str,
    timeout: Duration,
    mut on_message: impl FnMut(&Text, &CliMessage),
) -> Result<TurnOutcome, TurnError> {
    let (user, id) = (session.user_id.as_str(), session.session_id.as_str());
    let mut deadline = Instant::now() + timeout;
    let _slot = state.conversations.slot(deadline).await?;
    let mut events = match state.supervisor.subscribe(user, id).await {
        Some(events) => events,
        None => start_cli(state, session, CliStart::ForMessage).await?,
    };
    let uuid = uuid::Uuid::new_v4().to_string();
    let line = user_message_line(text, &uuid);
    let own = NewMessage { kind: "user".into(), content: Text::from(line.trim_end().to_owned()) };
    if !state.supervisor.write_stdin(user, id, line).await {
        return Err(TurnError::NotRunning);
    }
    let mut history = vec![own];
    let result = read_turn(state, session, &mut events, &mut deadline, timeout, &mut history, &mut on_message).await;
    if let Err(error) = &result {
        history.push(NewMessage::json("error", &json!({"type": "error", "error": error.to_string()})));
    }
    state.metrics.turn(result.is_ok());
    if let Some(conversation) = state.conversations.existing(id) {
        conversation.readers_caught_up(RESULT_DELIVERY_WAIT).await;
    }
    let now = crate::store::now();
    let store_started = std::time::Instant::now();
    let usage = result.as_ref().ok().map(|outcome| outcome.summary.usage);
    match state.store.store_turn(id, now, &history, usage.as_ref()).await {
        Ok(()) => {
            tracing::debug!(session_id = %id, micros = store_started.elapsed().as_micros() as u64, "turn stored");
        }
        // Deleted during the turn: its history went with it.
        Err(e @ crate::store::StoreError::Gone(_)) => tracing::info!(session_id = %id, error = %e, "turn not stored"),
        Err(e) => {
            crate::metrics::store_error(&e);
            tracing::warn!(session_id = %id, error = %e, "cannot store the turn");
        }
    }
    result
}

/// Reads the CLI's output until the turn's `result`. Every message the CLI
/// takes ends with exactly one `result`, even one it refuses without
/// running (a spent budget): the first result is this turn's. (Turns never
/// overlap, and a turn that ends without its result stops the CLI.)
async fn read_turn(
    state: &AppState,
    session: &Session,
    events: &mut broadcast::Receiver<ProcessEvent>,
    deadline: &mut Instant,
    timeout: Duration,
    history: &mut Vec<NewMessage>,
    on_message: &mut impl FnMut(&Text, &CliMessage),
) -> Result<TurnOutcome, TurnError> {
    let (user, id) = (session.user_id.as_str(), session.session_id.as_str());
    let mut interrupted = false;
    let mut messages = Vec::new();
    let mut summary = TurnSummary::default();
    loop {
        let event = match tokio::time::timeout_at(*deadline, events.recv()).await {
            Ok(event) => event,
            Err(_) if !interrupted => {
                // Ask the CLI to stop; it still answers with a result.
                interrupted = true;
                state.supervisor.write_stdin(user, id, control_request_line("interrupt")).await;
                *deadline = Instant::now() + INTERRUPT_GRACE;
                continue;
            }
            Err(_) => {
                // Gone before the turn ends, so the next message starts a new CLI.
                stop_and_wait(state, user, id).await;
                return Err(TurnError::Timeout(timeout.as_secs()));
            }
        };
        match event {
            Ok(ProcessEvent::Line { stream: shared::protocol::OutputStream::Stdout, line, .. }) => {
                let bytes = line.len();
                let read = CliLine::read_with(line, |line, message| {
                    if message.kind.as_deref() != Some("control_response") {
                        on_message(line, message);
                        summary.take(line, message);
                    }
                });
                let line = match read {
                    Ok(line) => line,
                    Err(error) => {
                        // Its output can no longer be matched to turns: end the
                        // turn and the process (the next message resumes). The
                        // error says where, not what (the line is the user's).
                        tracing::warn!(session_id = %id, bytes, %error, "CLI wrote a line that is not JSON");
                        // Gone before the turn ends, so the next message starts a new CLI.
                        stop_and_wait(state, user, id).await;
                        return Err(TurnError::Protocol("an output line that is not JSON".into()));
                    }
                };
                if line.is("control_response") {
                    continue;
                }
                // Partial deltas only feed the SSE frames: the assistant
                // message that follows them holds the same text.
                if line.is("stream_event") {
                    continue;
                }
                history.extend(history_entry(&line));
                if !line.is("result") {
                    messages.push(line);
                    continue;
                }
                if interrupted {
                    return Err(TurnError::Timeout(timeout.as_secs()));
                }
                messages.push(line);
                return Ok(TurnOutcome { messages, summary });
            }
            Ok(ProcessEvent::Line { line, .. }) => tracing::debug!(session_id = %id, %line, "CLI stderr"),
            Ok(ProcessEvent::Exited { code, signal }) => {
                return Err(TurnError::Exited(format!(" (code {code:?}, signal {signal:?})")));
            }
            Ok(ProcessEvent::WorkerDied) => return Err(TurnError::Exited(": its worker died".into())),
            Ok(ProcessEvent::Error(message)) => {
                // A dropped (oversized) line or a failed start: the turn's
                // output is incomplete.
                tracing::warn!(session_id = %id, %message, "worker error during a turn");
                // Gone before the turn ends, so the next message starts a new CLI.
                stop_and_wait(state, user, id).await;
                return Err(TurnError::Protocol(message));
            }
            Ok(ProcessEvent::Started { .. } | ProcessEvent::Gap { .. }) => {}
            Err(broadcast::error::RecvError::Lagged(n)) => {
                return Err(TurnError::Exited(format!(": {n} output lines were lost")));
            }
            Err(broadcast::error::RecvError::Closed) => return Err(TurnError::Exited(String::new())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(bytes: usize, unread_bytes: usize) -> FrameLog {
        let limits = LogLimits { frames: 100, bytes, unread_frames: 1000, unread_bytes };
        FrameLog {
            frames: VecDeque::new(),
            bytes: 0,
            next_id: 1,
            turn_start: None,
            closed: false,
            limits,
            readers: HashMap::new(),
            next_reader: 0,
        }
    }

    fn frame(len: usize) -> FrameJson {
        FrameJson { parts: vec![Bytes::from(vec![b'x'; len])], len }
    }

    fn ids(log: &FrameLog) -> Vec<u64> {
        log.frames.iter().map(|f| f.id).collect()
    }

    #[test]
    fn without_readers_the_log_keeps_its_replay_bounds() {
        let mut log = log(100, 1000);
        for _ in 0..5 {
            log.push(frame(40), false);
        }
        assert_eq!(ids(&log), [4, 5]);
        // One frame bigger than the bound stays alone.
        log.push(frame(500), true);
        assert_eq!(ids(&log), [6]);
    }

    #[test]
    fn a_connected_readers_unread_frames_stay_until_read_or_beyond_their_bound() {
        let mut log = log(100, 1000);
        log.readers.insert(0, ReaderPosition::at(1));
        for _ in 0..5 {
            log.push(frame(40), false);
        }
        assert_eq!(ids(&log), [1, 2, 3, 4, 5], "unread frames were dropped");
        // The reader took frames 1-3: they go, down to the replay bound.
        log.readers.insert(0, ReaderPosition::at(4));
        log.evict();
        assert_eq!(ids(&log), [4, 5]);
        // A big last frame (a result) stays while the final frame follows it.
        log.push(frame(600), false);
        log.push(frame(10), true);
        assert_eq!(ids(&log), [4, 5, 6, 7]);
        // Beyond the unread bound the oldest go anyway (the reader gets a gap).
        log.push(frame(400), false);
        assert_eq!(ids(&log), [7, 8]);
        let (resumed_at, _) = log.read(4);
        assert_eq!(resumed_at, Some(7));
        // A reader that is gone holds nothing.
        log.readers.clear();
        log.evict();
        assert_eq!(ids(&log), [8]);
    }

    fn conversation() -> Arc<Conversation> {
        Conversations::new(&ApiConfig::default(), 1 << 20).get(&Session::for_test("s", "u"))
    }

    #[tokio::test]
    async fn a_turn_waits_until_its_streams_have_sent_what_was_published() {
        use futures::StreamExt;
        let conversation = conversation();
        // No stream: no wait.
        let started = std::time::Instant::now();
        conversation.readers_caught_up(Duration::from_secs(5)).await;
        assert!(started.elapsed() < Duration::from_secs(1));

        let mut stream = Box::pin(conversation.clone().frames(conversation.default_start(), true));
        conversation.publish(Frame::new("text_delta", Fields::default(), None));
        let waiting = tokio::spawn({
            let conversation = conversation.clone();
            async move { conversation.readers_caught_up(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "returned before the stream took the frame");
        // Taken, then sent: the stream asks for more, which ends the wait.
        assert!(matches!(stream.next().await, Some(StreamItem::Frame(_))));
        let _ = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
        tokio::time::timeout(Duration::from_secs(2), waiting).await.expect("the wait ended").expect("task");

        // A stream that takes nothing holds a turn for `within` at most.
        conversation.publish(Frame::new("text_delta", Fields::default(), None));
        let started = std::time::Instant::now();
        conversation.readers_caught_up(Duration::from_millis(200)).await;
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn a_reader_that_was_waiting_keeps_a_burst_and_a_stuck_one_is_looked_at_again() {
        let mut log = log(100, 1000);
        // Caught up long ago, waiting: a burst after the wait stays for it.
        let long_ago = std::time::Instant::now() - LAG_GRACE * 2;
        log.readers.insert(0, ReaderPosition { next: 1, moved_at: long_ago });
        for _ in 0..5 {
            log.push(frame(40), false);
        }
        assert_eq!(ids(&log), [1, 2, 3, 4, 5]);
        // It holds frames beyond the bounds until its grace runs out.
        let until = log.held_beyond_bounds_until().expect("held");
        assert!(until > std::time::Instant::now() && until <= std::time::Instant::now() + LAG_GRACE);
        // Once it has read them, nothing is held.
        log.readers.insert(0, ReaderPosition::at(6));
        log.evict();
        assert_eq!(log.held_beyond_bounds_until(), None);
    }

    #[test]
    fn a_reader_that_stopped_taking_frames_holds_none() {
        let mut log = log(100, 1000);
        // It has not taken frame 1 (its client stopped reading) for longer
        // than its grace.
        log.push(frame(40), false);
        let stuck_since = std::time::Instant::now() - LAG_GRACE - Duration::from_millis(10);
        log.readers.insert(0, ReaderPosition { next: 1, moved_at: stuck_since });
        for _ in 0..4 {
            log.push(frame(40), false);
        }
        assert_eq!(ids(&log), [4, 5]);
        assert_eq!(log.held_beyond_bounds_until(), None);
    }
}
