//! Persistent state: users, API tokens, sessions and their chat history, the
//! model proxy's audit log of model requests and the egress proxy's audit log
//! of web requests, behind one [`Store`] trait with three implementations
//! (memory, SQLite, PostgreSQL).
//!
//! The SQL backends share one implementation ([`sql`]) whose queries run
//! unchanged on both; each backend's file only connects and migrates.
//! Migrations live in `migrations/<backend>/` and are applied at start-up.
//!
//! Timestamps are UTC truncated to microseconds (what PostgreSQL keeps), so a
//! value read back compares equal to the one written, and pagination cursors
//! built from them are exact.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::{StorageKind, StoreLocation};

mod memory;
mod postgres;
mod sql;
mod sqlite;

pub use memory::MemoryStore;
pub use sqlite::WAL_SIZE_LIMIT as SQLITE_WAL_SIZE_LIMIT;

/// Store failures. `Unavailable` means the database could not be reached or
/// refused the operation (the API answers 503); `Conflict` a unique key;
/// `Gone` a row the write needed no longer there.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} already exists")]
    Conflict(String),
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage error: {0}")]
    Internal(String),
    /// What the write was for is gone (a turn's session deleted meanwhile):
    /// not a fault of the store.
    #[error("{0}")]
    Gone(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(db) if db.is_unique_violation() => Self::Conflict(db.message().to_owned()),
            sqlx::Error::Database(db) if db.code().is_some_and(|code| is_outage_code(&code)) => {
                Self::Unavailable(error.to_string())
            }
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_) => Self::Unavailable(error.to_string()),
            _ => Self::Internal(error.to_string()),
        }
    }
}

/// Database error codes that mean "the database cannot serve us right now"
/// (an outage to answer with 503), not "this query is wrong".
fn is_outage_code(code: &str) -> bool {
    // A SQLSTATE always has five characters (and may be all digits);
    // SQLite's codes have at most four digits.
    if code.len() < 5
        && let Ok(extended) = code.parse::<i32>()
    {
        // SQLite (numeric, possibly extended): BUSY, LOCKED, READONLY,
        // IOERR, FULL, CANTOPEN.
        return matches!(extended & 0xff, 5 | 6 | 8 | 10 | 13 | 14);
    }
    // PostgreSQL SQLSTATE classes: connection exception, invalid
    // authorization, invalid catalog, insufficient resources, operator
    // intervention, system error; and "database not accepting connections".
    ["08", "28", "3D", "53", "57", "58"].iter().any(|class| code.starts_with(class)) || code == "55000"
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        Self::Internal(format!("migration failed: {error}"))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The current time as stored: UTC, microsecond precision.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::User => "user",
        }
    }

    pub fn parse(value: &str) -> StoreResult<Self> {
        match value {
            "admin" => Ok(Self::Admin),
            "user" => Ok(Self::User),
            other => Err(StoreError::Internal(format!("unknown role {other:?} in store"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct User {
    /// The user's name, also their directory under `user.base_dir`.
    pub user_id: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    /// Uid the user's worker runs as in privileged sandbox mode.
    pub uid: Option<i64>,
    /// The domains this user's tools may reach through the egress proxy,
    /// replacing `network.allowed_domains`; `null`: the global list applies.
    #[serde(default)]
    pub allowed_domains: Option<Vec<String>>,
}

/// An API token as stored: only the SHA-256 of the secret is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApiToken {
    pub token_id: String,
    pub user_id: String,
    #[serde(skip)]
    pub token_hash: String,
    pub label: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    /// Open: chat and resume work.
    Active,
    /// Idle longer than `session.ttl`; `resume` reopens it.
    Expired,
    /// Deleted by its owner: answers 404 everywhere, forever.
    Deleted,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Expired => "expired",
            Self::Deleted => "deleted",
        }
    }

    pub fn parse(value: &str) -> StoreResult<Self> {
        match value {
            "active" => Ok(Self::Active),
            "expired" => Ok(Self::Expired),
            "deleted" => Ok(Self::Deleted),
            other => Err(StoreError::Internal(format!("unknown session status {other:?} in store"))),
        }
    }
}

/// Per-session CLI options; each `None` falls back to the config defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_tools: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disallowed_tools: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_budget_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub mcp_servers: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub plugins: Option<Vec<serde_json::Value>>,
}

/// Token and cost totals of a session, summed from each turn's result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageTotals {
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_creation_tokens: i64,
    pub total_cost_usd: f64,
}

impl std::ops::AddAssign<&UsageTotals> for UsageTotals {
    fn add_assign(&mut self, other: &UsageTotals) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_read_tokens += other.cache_read_tokens;
        self.cache_creation_tokens += other.cache_creation_tokens;
        self.total_cost_usd += other.total_cost_usd;
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub session_id: String,
    pub user_id: String,
    pub subdir: Option<String>,
    pub cwd: String,
    pub options: SessionOptions,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub status: SessionStatus,
    pub created_at: DateTime<Utc>,
    pub last_active_at: DateTime<Utc>,
    pub message_count: i64,
    /// The CLI's own session id, for `--resume` (ours, given with
    /// `--session-id`, unless the CLI forked it).
    pub cli_session_id: Option<String>,
    pub usage: UsageTotals,
}

#[cfg(test)]
impl Session {
    /// An active session, created now, with nothing else set (unit tests).
    pub(crate) fn for_test(session_id: &str, user_id: &str) -> Self {
        Self {
            session_id: session_id.into(),
            user_id: user_id.into(),
            subdir: None,
            cwd: "/x".into(),
            options: SessionOptions::default(),
            metadata: serde_json::Map::new(),
            status: SessionStatus::Active,
            created_at: now(),
            last_active_at: now(),
            message_count: 0,
            cli_session_id: None,
            usage: UsageTotals::default(),
        }
    }
}

/// Position after which a page of sessions starts (newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCursor {
    pub created_at: DateTime<Utc>,
    pub session_id: String,
}

/// Which sessions a listing returns.
#[derive(Debug, Clone, Default)]
pub struct SessionQuery {
    /// Only this user's sessions (`None`: everyone's, for admins).
    pub user_id: Option<String>,
    /// Only sessions in these states; empty means every state but `deleted`.
    pub statuses: Vec<SessionStatus>,
    pub after: Option<SessionCursor>,
    pub limit: u32,
}

impl SessionQuery {
    /// The statuses to match, `deleted` excluded unless asked for.
    fn effective_statuses(&self) -> Vec<SessionStatus> {
        if self.statuses.is_empty() {
            vec![SessionStatus::Active, SessionStatus::Expired]
        } else {
            self.statuses.clone()
        }
    }
}

/// A message to append to a session's history.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// What the message is (e.g. the CLI's message type); stored as given.
    pub kind: String,
    /// JSON text, stored as it is: a line the CLI wrote, so a turn's
    /// messages are stored without being serialised again.
    pub content: shared::Text,
}

impl NewMessage {
    /// A message the service writes itself.
    pub fn json(kind: &str, content: &serde_json::Value) -> Self {
        Self { kind: kind.to_owned(), content: content.to_string().into() }
    }
}

/// One entry of a session's history, numbered from 1 in append order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StoredMessage {
    /// Position in the session's history: 1, 2, 3, … with no gaps.
    pub seq: i64,
    pub kind: String,
    #[schema(value_type = Object)]
    pub content: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// One model request seen by the model proxy (the audit log and the metering
/// source).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelRequest {
    /// Unique (a UUID): the primary key.
    pub request_id: String,
    pub user_id: String,
    pub session_id: String,
    /// When the request started (stored truncated to microseconds).
    pub at: DateTime<Utc>,
    /// `"POST"`.
    pub method: String,
    /// `"/v1/messages"`.
    pub path: String,
    pub model: Option<String>,
    /// HTTP status answered to the CLI: upstream's, or ours (401, 403, 429,
    /// 502).
    pub status: i32,
    /// Tokens of the response and its cost (computed by the proxy).
    pub usage: UsageTotals,
    pub duration_ms: i64,
    /// Tool calls the model made in this response:
    /// `[{"name": ..., "input_bytes": n, "input": "<first 1000 chars>"}]`.
    #[schema(value_type = Vec<Object>)]
    pub tool_calls: serde_json::Value,
    /// Why the proxy refused it (budget, rate limit, unknown credential...),
    /// if it did.
    pub refusal: Option<String>,
}

/// Which model requests the audit listing returns: newest first, by
/// `(at, request_id)` descending.
#[derive(Debug, Clone, Default)]
pub struct ModelRequestQuery {
    /// Only this user's requests (`None`: everyone's).
    pub user_id: Option<String>,
    /// Only this session's requests (`None`: every session's).
    pub session_id: Option<String>,
    /// Keyset cursor: only requests strictly before this `(at, request_id)`,
    /// i.e. the last row of the previous page.
    pub before: Option<(DateTime<Utc>, String)>,
    pub limit: u32,
}

/// One web request the egress proxy allowed or refused (the audit log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EgressEvent {
    /// Unique (a UUID): the primary key.
    pub event_id: String,
    pub user_id: String,
    pub session_id: String,
    /// When the proxy decided (stored truncated to microseconds).
    pub at: DateTime<Utc>,
    /// `CONNECT`, `GET`, ...
    pub method: String,
    /// The destination as checked: lower case, no trailing dot, IPv6
    /// without brackets.
    pub host: String,
    pub port: i32,
    /// Whether the policy let the request through.
    pub allowed: bool,
    /// Why it was refused, or what went wrong upstream.
    pub reason: Option<String>,
}

/// Which egress events the audit listing returns: newest first, by `(at,
/// event_id)` descending.
#[derive(Debug, Clone, Default)]
pub struct EgressEventQuery {
    /// Only this user's events (`None`: everyone's).
    pub user_id: Option<String>,
    /// Only this session's events (`None`: every session's).
    pub session_id: Option<String>,
    /// Only allowed (`true`) or refused (`false`) requests (`None`: both).
    pub allowed: Option<bool>,
    /// Keyset cursor: only events strictly before this `(at, event_id)`,
    /// i.e. the last row of the previous page.
    pub before: Option<(DateTime<Utc>, String)>,
    pub limit: u32,
}

/// Checks what every backend can store: PostgreSQL's text types reject NUL
/// characters, so the others do too (callers replace them in what they
/// copy from requests, such as the model name). `what` names the record.
fn check_texts<'a>(
    what: &str,
    id: &str,
    texts: impl IntoIterator<Item = (&'a str, Option<&'a String>)>,
) -> StoreResult<()> {
    match texts.into_iter().find(|(_, text)| text.is_some_and(|t| t.contains('\0'))) {
        Some((field, _)) => {
            Err(StoreError::Internal(format!("cannot record {what} {id:?}: its {field} contains a NUL character")))
        }
        None => Ok(()),
    }
}

fn check_model_request(request: &ModelRequest) -> StoreResult<()> {
    let texts = [
        ("request_id", Some(&request.request_id)),
        ("user_id", Some(&request.user_id)),
        ("session_id", Some(&request.session_id)),
        ("method", Some(&request.method)),
        ("path", Some(&request.path)),
        ("model", request.model.as_ref()),
        ("refusal", request.refusal.as_ref()),
    ];
    check_texts("model request", &request.request_id, texts)
}

fn check_egress_event(event: &EgressEvent) -> StoreResult<()> {
    let texts = [
        ("event_id", Some(&event.event_id)),
        ("user_id", Some(&event.user_id)),
        ("session_id", Some(&event.session_id)),
        ("method", Some(&event.method)),
        ("host", Some(&event.host)),
        ("reason", event.reason.as_ref()),
    ];
    check_texts("egress event", &event.event_id, texts)
}

/// The first stored timestamp (microsecond precision) at or after `at`:
/// `stored >= at` exactly when `stored >= micros_ceil(at)`, on every backend
/// (PostgreSQL would truncate a finer bound, the others compare it as is).
fn micros_ceil(at: DateTime<Utc>) -> DateTime<Utc> {
    let truncated = at.trunc_subsecs(6);
    if truncated < at {
        truncated.checked_add_signed(chrono::TimeDelta::microseconds(1)).unwrap_or(truncated)
    } else {
        truncated
    }
}

/// A `(time, id)` listing cursor (model requests, egress events) in stored
/// precision, with the same meaning: a bound finer than microseconds becomes
/// "before the next microsecond", which no id precedes.
fn listing_cursor(before: &(DateTime<Utc>, String)) -> (DateTime<Utc>, &str) {
    let ceil = micros_ceil(before.0);
    if ceil == before.0 { (before.0, before.1.as_str()) } else { (ceil, "") }
}

/// Storage of users, tokens and sessions. Every method is one atomic step.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    fn kind(&self) -> StorageKind;

    /// Checks that the database answers (for `/health`).
    async fn ping(&self) -> StoreResult<()>;

    /// Creates a user; `Conflict` if the id is taken.
    async fn create_user(&self, user: &User) -> StoreResult<()>;
    async fn get_user(&self, user_id: &str) -> StoreResult<Option<User>>;
    async fn list_users(&self) -> StoreResult<Vec<User>>;
    async fn count_users(&self) -> StoreResult<u64>;
    /// Deletes a user and their tokens, marks their sessions deleted, purges
    /// those sessions' message history and deletes their model requests and
    /// egress events. An unknown user changes nothing (false).
    async fn delete_user(&self, user_id: &str) -> StoreResult<bool>;
    /// Replaces a user's own egress allow-list (`None`: the global list
    /// applies again). The list is stored as given. False for an unknown
    /// user.
    async fn set_user_allowed_domains(&self, user_id: &str, domains: Option<&[String]>) -> StoreResult<bool>;
    /// The user's own uid for privileged sandboxing: the stored one, or the
    /// lowest free one in `range`, stored once. `Unavailable` when the range
    /// is exhausted; `None` when the user does not exist.
    async fn assign_uid(&self, user_id: &str, range: (i64, i64)) -> StoreResult<Option<i64>>;

    /// Stores a token; `Conflict` if its hash exists.
    async fn create_token(&self, token: &ApiToken) -> StoreResult<()>;
    /// The live (unexpired) token with this hash and its user; records the use.
    async fn authenticate_token(&self, token_hash: &str, at: DateTime<Utc>) -> StoreResult<Option<(ApiToken, User)>>;
    async fn list_tokens(&self, user_id: &str) -> StoreResult<Vec<ApiToken>>;
    async fn get_token(&self, token_id: &str) -> StoreResult<Option<ApiToken>>;
    async fn delete_token(&self, token_id: &str) -> StoreResult<bool>;
    /// Deletes a user's tokens with this label except `keep` (rotation of the
    /// configured admin token).
    async fn delete_tokens_by_label(&self, user_id: &str, label: &str, keep: &str) -> StoreResult<u64>;

    async fn create_session(&self, session: &Session) -> StoreResult<()>;
    /// A session in any state, `deleted` included (callers decide).
    async fn get_session(&self, session_id: &str) -> StoreResult<Option<Session>>;
    async fn list_sessions(&self, query: &SessionQuery) -> StoreResult<Vec<Session>>;
    /// Sessions in `status`, of one user or of everyone.
    async fn count_sessions(&self, user_id: Option<&str>, status: SessionStatus) -> StoreResult<u64>;
    /// Moves a session to `status` unless it is deleted; false if absent or
    /// deleted. Moving it to `Deleted` also purges its message history (an
    /// expired session keeps its history: it can be resumed).
    async fn set_session_status(&self, session_id: &str, status: SessionStatus, at: DateTime<Utc>)
    -> StoreResult<bool>;
    /// Records activity: `last_active_at = at`, `message_count += messages`.
    async fn touch_session(&self, session_id: &str, at: DateTime<Utc>, messages: i64) -> StoreResult<bool>;
    /// Marks active sessions idle since before `cutoff` as expired; returns
    /// their ids.
    async fn expire_idle_sessions(&self, cutoff: DateTime<Utc>) -> StoreResult<Vec<String>>;

    /// Stores one chat turn in one transaction. Appends `messages` to the
    /// session's history, all stamped `at` (truncated to microseconds): they
    /// get the next seqs after the session's last one (the first message of
    /// a session is 1), in slice order. When the turn `finished` with a
    /// result, also records it: `last_active_at = at`, one more message,
    /// its usage added to the totals. One call is atomic and its seqs are
    /// contiguous: concurrent calls for the same session never share or
    /// interleave seqs.
    ///
    /// No messages and no result is a no-op (`Ok`, nothing is checked).
    /// Storing a turn of a session that does not exist or is deleted changes
    /// nothing and returns `StoreError::Internal`: callers check the session
    /// first, so this is a bug or a race with its deletion, like a broken
    /// foreign key.
    async fn store_turn(
        &self,
        session_id: &str,
        at: DateTime<Utc>,
        messages: &[NewMessage],
        finished: Option<&UsageTotals>,
    ) -> StoreResult<()>;
    /// Up to `limit` messages of a session with `seq > after_seq`, ascending.
    /// Empty for an unknown or deleted session.
    async fn list_messages(&self, session_id: &str, after_seq: i64, limit: u32) -> StoreResult<Vec<StoredMessage>>;

    /// Records one model request, `at` truncated to microseconds; `Conflict`
    /// if its `request_id` exists. Neither the user nor the session is
    /// checked: the audit outlives sessions (a request may be recorded after
    /// its session was deleted), and only [`Store::delete_user`] removes a
    /// user's requests. `Internal` if a text field contains a NUL character.
    async fn record_model_request(&self, request: &ModelRequest) -> StoreResult<()>;
    /// Up to `query.limit` model requests matching the query, newest first
    /// (`at` descending, then `request_id` descending), strictly before
    /// `query.before`.
    async fn list_model_requests(&self, query: &ModelRequestQuery) -> StoreResult<Vec<ModelRequest>>;
    /// The number of a user's model requests with `at >= since` (all of them
    /// when `None`) and their summed usage. `Internal` if a sum overflows.
    async fn model_usage(&self, user_id: &str, since: Option<DateTime<Utc>>) -> StoreResult<(i64, UsageTotals)>;
    /// A user's model requests grouped by session: `(session_id, requests,
    /// summed usage)`, ordered by session id (bytewise). `Internal` if a sum
    /// overflows.
    async fn model_usage_by_session(&self, user_id: &str) -> StoreResult<Vec<(String, i64, UsageTotals)>>;

    /// Records one egress decision, `at` truncated to microseconds;
    /// `Conflict` if its `event_id` exists. Neither the user nor the session
    /// is checked (like model requests): only [`Store::delete_user`] removes
    /// a user's events. `Internal` if a text field contains a NUL character.
    async fn record_egress_event(&self, event: &EgressEvent) -> StoreResult<()>;
    /// Up to `query.limit` egress events matching the query, newest first
    /// (`at` descending, then `event_id` descending), strictly before
    /// `query.before`.
    async fn list_egress_events(&self, query: &EgressEventQuery) -> StoreResult<Vec<EgressEvent>>;
}

/// The error for appending to a session that is absent or deleted.
fn no_session_for_turn(session_id: &str) -> StoreError {
    StoreError::Gone(format!("cannot store a turn: session {session_id} does not exist or is deleted"))
}

/// Opens the configured store and applies its migrations.
pub async fn open(location: &StoreLocation) -> StoreResult<Arc<dyn Store>> {
    Ok(match location {
        StoreLocation::Memory => Arc::new(MemoryStore::default()),
        StoreLocation::Sqlite(path) => Arc::new(sqlite::open(path).await?),
        StoreLocation::Postgres { url, schema, max_connections } => {
            Arc::new(postgres::open(url.expose(), schema.as_deref(), *max_connections).await?)
        }
    })
}
