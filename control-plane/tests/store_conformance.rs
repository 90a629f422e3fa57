//! Conformance suite for the [`Store`] trait: the same cases run against the
//! memory store, SQLite (a fresh file in a temporary directory) and
//! PostgreSQL (a fresh schema, dropped afterwards).
//!
//! Every case is a plain `async fn(&dyn Store)` in [`cases`]; the
//! `conformance!` macro stamps one `#[tokio::test]` per case into the
//! `memory`, `sqlite` and `postgres` modules, so a failure names both the
//! backend and the case (`postgres::list_sessions_pagination`).
//!
//! PostgreSQL must be reachable at `postgres://postgres@127.0.0.1:5432/test`
//! (or at `$STORE_CONFORMANCE_PG_URL`): when it is not, the PostgreSQL tests
//! fail, they are never skipped.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use control_plane::config::{Secret, StorageKind, StoreLocation};
use control_plane::store::{
    self, ApiToken, EgressEvent, EgressEventQuery, ModelRequest, ModelRequestQuery, NewMessage, Role, Session,
    SessionCursor, SessionOptions, SessionQuery, SessionStatus, Store, StoreError, StoreResult, StoredMessage,
    UsageTotals, User,
};
use serde_json::{Map, Value, json};

const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const POSTGRES_URL_ENV: &str = "STORE_CONFORMANCE_PG_URL";

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Memory,
    Sqlite,
    Postgres,
}

/// An open store plus what must outlive it (the SQLite directory) or be
/// cleaned up after it (the PostgreSQL schema).
struct Harness {
    store: Option<Arc<dyn Store>>,
    _dir: Option<tempfile::TempDir>,
    pg_schema: Option<(String, String)>,
}

fn postgres_url() -> (String, String) {
    match std::env::var(POSTGRES_URL_ENV) {
        // Never echo a URL that may carry a password.
        Ok(url) if !url.is_empty() => (url, format!("${POSTGRES_URL_ENV}")),
        _ => (DEFAULT_POSTGRES_URL.to_owned(), DEFAULT_POSTGRES_URL.to_owned()),
    }
}

impl Harness {
    async fn open(backend: Backend) -> Self {
        let (location, dir, pg_schema, kind) = match backend {
            Backend::Memory => (StoreLocation::Memory, None, None, StorageKind::Memory),
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("create a temporary directory for SQLite");
                let location = StoreLocation::Sqlite(dir.path().join("store.db"));
                (location, Some(dir), None, StorageKind::Sqlite)
            }
            Backend::Postgres => {
                let (url, _) = postgres_url();
                let schema = format!("conf_{}", uuid::Uuid::new_v4().simple());
                let location = StoreLocation::Postgres {
                    url: Secret::new(url.clone()),
                    schema: Some(schema.clone()),
                    max_connections: 4,
                };
                (location, None, Some((url, schema)), StorageKind::Postgresql)
            }
        };
        let opened = tokio::time::timeout(Duration::from_secs(30), store::open(&location)).await;
        let store = match (opened, backend) {
            (Ok(Ok(store)), _) => store,
            (Ok(Err(error)), Backend::Postgres) => panic!(
                "PostgreSQL is required by the store conformance tests and could not be opened at {}: {error} \
                 (start it with trust auth for user `postgres`, or point ${POSTGRES_URL_ENV} at one)",
                postgres_url().1
            ),
            (Err(_), Backend::Postgres) => panic!(
                "PostgreSQL is required by the store conformance tests and did not answer within 30s at {}",
                postgres_url().1
            ),
            (Ok(Err(error)), _) => panic!("cannot open the {backend:?} store: {error}"),
            (Err(_), _) => panic!("opening the {backend:?} store took longer than 30s"),
        };
        assert_eq!(store.kind(), kind, "store::open returned the wrong backend");
        Self { store: Some(store), _dir: dir, pg_schema }
    }

    fn store(&self) -> Arc<dyn Store> {
        Arc::clone(self.store.as_ref().expect("store already released"))
    }

    /// Releases the store, drops the PostgreSQL schema (best effort) and
    /// re-raises the case's panic, if any.
    async fn finish(mut self, outcome: Result<(), tokio::task::JoinError>) {
        drop(self.store.take());
        if let Some((url, schema)) = self.pg_schema.take() {
            use sqlx::Connection;
            if let Ok(mut conn) = sqlx::PgConnection::connect(&url).await {
                let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")).execute(&mut conn).await;
                let _ = conn.close().await;
            }
        }
        match outcome {
            Ok(()) => {}
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => panic!("conformance case did not complete: {error}"),
        }
    }
}

macro_rules! conformance {
    ($($case:ident),+ $(,)?) => {
        conformance!(@backend memory, crate::Backend::Memory, $($case),+);
        conformance!(@backend sqlite, crate::Backend::Sqlite, $($case),+);
        conformance!(@backend postgres, crate::Backend::Postgres, $($case),+);
    };
    (@backend $module:ident, $backend:expr, $($case:ident),+) => {
        mod $module {
            $(
                #[tokio::test]
                async fn $case() {
                    let harness = crate::Harness::open($backend).await;
                    let store = harness.store();
                    let outcome = tokio::spawn(async move { crate::cases::$case(&*store).await }).await;
                    harness.finish(outcome).await;
                }
            )+
        }
    };
}

conformance!(
    ping,
    users_create_get_list_count,
    duplicate_user_conflicts,
    concurrent_duplicate_users_conflict,
    delete_user_removes_tokens_and_deletes_sessions,
    token_authenticate_records_use,
    token_expiry,
    unknown_token_hash,
    duplicate_token_conflicts,
    tokens_list_get_delete,
    delete_tokens_by_label,
    session_roundtrip,
    duplicate_session_conflicts,
    list_sessions_filters,
    list_sessions_pagination,
    count_sessions,
    set_session_status,
    touch_session,
    concurrent_touches_are_atomic,
    store_turn_records_usage_and_messages_at_once,
    a_turn_larger_than_one_insert_batch,
    assign_uid_allocates_once,
    expire_idle_sessions,
    messages_append_and_list,
    messages_pagination,
    messages_roundtrip,
    concurrent_appends_are_contiguous,
    deleted_session_purges_messages_expired_keeps_them,
    delete_user_purges_messages,
    append_to_unknown_or_deleted_session_fails,
    messages_stay_in_their_session,
    model_request_roundtrip,
    model_request_with_nul_is_rejected,
    duplicate_model_request_conflicts,
    concurrent_duplicate_model_requests_conflict,
    model_requests_list_filters,
    model_requests_pagination,
    model_usage_since,
    model_usage_overflow_is_an_error,
    model_usage_by_session,
    model_requests_survive_session_deletion,
    delete_user_removes_model_requests,
    concurrent_model_requests,
    user_allowed_domains_roundtrip,
    set_allowed_domains_of_unknown_user,
    egress_event_roundtrip,
    egress_event_with_nul_is_rejected,
    duplicate_egress_event_conflicts,
    egress_events_list_filters,
    egress_events_pagination,
    delete_user_removes_egress_events,
);

// ---------------------------------------------------------------------------
// Fixtures and helpers
// ---------------------------------------------------------------------------

/// A whole second near the present: offsets from it produce timestamps with
/// no, millisecond and microsecond fractions in the same second.
fn base() -> DateTime<Utc> {
    store::now().trunc_subsecs(0)
}

fn micros(n: i64) -> TimeDelta {
    TimeDelta::microseconds(n)
}

fn user(user_id: &str, role: Role, created_at: DateTime<Utc>, uid: Option<i64>) -> User {
    User { user_id: user_id.to_owned(), role, created_at, uid, allowed_domains: None }
}

fn token(token_id: &str, user_id: &str, hash: &str, label: Option<&str>, created_at: DateTime<Utc>) -> ApiToken {
    ApiToken {
        token_id: token_id.to_owned(),
        user_id: user_id.to_owned(),
        token_hash: hash.to_owned(),
        label: label.map(str::to_owned),
        created_at,
        expires_at: None,
        last_used_at: None,
    }
}

fn session(session_id: &str, user_id: &str, created_at: DateTime<Utc>, status: SessionStatus) -> Session {
    Session {
        session_id: session_id.to_owned(),
        user_id: user_id.to_owned(),
        subdir: None,
        cwd: format!("/srv/users/{user_id}"),
        options: SessionOptions::default(),
        metadata: Map::new(),
        status,
        created_at,
        last_active_at: created_at,
        message_count: 0,
        cli_session_id: None,
        usage: UsageTotals::default(),
    }
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("expected a JSON object, got {other}"),
    }
}

fn query(user_id: Option<&str>, statuses: &[SessionStatus], limit: u32) -> SessionQuery {
    SessionQuery { user_id: user_id.map(str::to_owned), statuses: statuses.to_vec(), after: None, limit }
}

fn cursor_of(session: &Session) -> SessionCursor {
    SessionCursor { created_at: session.created_at, session_id: session.session_id.clone() }
}

fn ids(sessions: &[Session]) -> Vec<&str> {
    sessions.iter().map(|s| s.session_id.as_str()).collect()
}

fn token_ids(tokens: &[ApiToken]) -> Vec<&str> {
    tokens.iter().map(|t| t.token_id.as_str()).collect()
}

#[track_caller]
fn assert_conflict<T: std::fmt::Debug>(result: StoreResult<T>, what: &str) {
    match result {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("{what}: expected StoreError::Conflict, got {other:?}"),
    }
}

async fn create_users(store: &dyn Store, users: &[&str]) {
    for id in users {
        store.create_user(&user(id, Role::User, store::now(), None)).await.expect("create user");
    }
}

async fn create_sessions(store: &dyn Store, sessions: &[Session]) {
    for s in sessions {
        store.create_session(s).await.unwrap_or_else(|e| panic!("create session {}: {e}", s.session_id));
    }
}

async fn get_session(store: &dyn Store, session_id: &str) -> Session {
    store
        .get_session(session_id)
        .await
        .expect("get session")
        .unwrap_or_else(|| panic!("session {session_id} should exist"))
}

fn message(kind: &str, content: Value) -> NewMessage {
    NewMessage::json(kind, &content)
}

fn stored(seq: i64, new: &NewMessage, created_at: DateTime<Utc>) -> StoredMessage {
    let content = serde_json::from_str(&new.content).expect("the content is JSON");
    StoredMessage { seq, kind: new.kind.clone(), content, created_at }
}

fn seqs(messages: &[StoredMessage]) -> Vec<i64> {
    messages.iter().map(|m| m.seq).collect()
}

/// A session's whole history, in one call.
async fn history(store: &dyn Store, session_id: &str) -> Vec<StoredMessage> {
    store.list_messages(session_id, 0, u32::MAX).await.unwrap_or_else(|e| panic!("list messages of {session_id}: {e}"))
}

/// The reference ordering: newest first by `(created_at, session_id)`.
fn newest_first(mut sessions: Vec<Session>) -> Vec<Session> {
    sessions.sort_by(|a, b| (b.created_at, &b.session_id).cmp(&(a.created_at, &a.session_id)));
    sessions
}

/// Follows `after` cursors page by page until an empty page.
async fn walk_pages(store: &dyn Store, user_id: Option<&str>, statuses: &[SessionStatus], limit: u32) -> Vec<Session> {
    let mut all = Vec::new();
    let mut after = None;
    for _ in 0..1000 {
        let page = store
            .list_sessions(&SessionQuery {
                user_id: user_id.map(str::to_owned),
                statuses: statuses.to_vec(),
                after: after.clone(),
                limit,
            })
            .await
            .expect("list sessions page");
        assert!(page.len() <= limit as usize, "page of {} rows exceeds limit {limit}", page.len());
        let Some(last) = page.last() else {
            return all;
        };
        after = Some(cursor_of(last));
        all.extend(page);
    }
    panic!("pagination did not terminate (user {user_id:?}, statuses {statuses:?}, limit {limit})");
}

fn usage(input: i64, output: i64, cache_read: i64, cache_creation: i64, cost: f64) -> UsageTotals {
    UsageTotals {
        input_tokens: input,
        output_tokens: output,
        cache_read_tokens: cache_read,
        cache_creation_tokens: cache_creation,
        total_cost_usd: cost,
    }
}

/// A proxied `POST /v1/messages` that succeeded. Its cost is a multiple of
/// 1/64, so sums of such costs are exact in any order.
fn model_request(request_id: &str, user_id: &str, session_id: &str, at: DateTime<Utc>) -> ModelRequest {
    ModelRequest {
        request_id: request_id.to_owned(),
        user_id: user_id.to_owned(),
        session_id: session_id.to_owned(),
        at,
        method: "POST".into(),
        path: "/v1/messages".into(),
        model: Some("claude-sonnet-4-5".into()),
        status: 200,
        usage: usage(1200, 350, 4000, 800, 0.015_625),
        duration_ms: 2345,
        tool_calls: json!([{"name": "Bash", "input_bytes": 18, "input": "{\"command\":\"ls\"}"}]),
        refusal: None,
    }
}

fn requests_query(user_id: Option<&str>, session_id: Option<&str>, limit: u32) -> ModelRequestQuery {
    ModelRequestQuery {
        user_id: user_id.map(str::to_owned),
        session_id: session_id.map(str::to_owned),
        before: None,
        limit,
    }
}

fn request_ids(requests: &[ModelRequest]) -> Vec<&str> {
    requests.iter().map(|r| r.request_id.as_str()).collect()
}

async fn record_requests(store: &dyn Store, requests: &[ModelRequest]) {
    for r in requests {
        store.record_model_request(r).await.unwrap_or_else(|e| panic!("record model request {}: {e}", r.request_id));
    }
}

async fn list_requests(store: &dyn Store, user_id: Option<&str>, session_id: Option<&str>) -> Vec<ModelRequest> {
    store.list_model_requests(&requests_query(user_id, session_id, u32::MAX)).await.expect("list model requests")
}

/// The reference listing: the matching requests, newest first by
/// `(at, request_id)`.
fn expected_requests<'a>(
    all: impl IntoIterator<Item = &'a ModelRequest>,
    keep: impl Fn(&ModelRequest) -> bool,
) -> Vec<ModelRequest> {
    let mut found: Vec<ModelRequest> = all.into_iter().filter(|r| keep(r)).cloned().collect();
    found.sort_by(|a, b| (b.at, &b.request_id).cmp(&(a.at, &a.request_id)));
    found
}

/// The reference usage: request count and sums.
fn expected_usage<'a>(requests: impl IntoIterator<Item = &'a ModelRequest>) -> (i64, UsageTotals) {
    let mut total = (0, UsageTotals::default());
    for r in requests {
        total.0 += 1;
        total.1 += &r.usage;
    }
    total
}

/// Follows `before` cursors page by page until an empty page.
async fn walk_requests(
    store: &dyn Store,
    user_id: Option<&str>,
    session_id: Option<&str>,
    limit: u32,
) -> Vec<ModelRequest> {
    let mut all = Vec::new();
    let mut before = None;
    for _ in 0..1000 {
        let query = ModelRequestQuery { before: before.clone(), ..requests_query(user_id, session_id, limit) };
        let page = store.list_model_requests(&query).await.expect("list model requests page");
        assert!(page.len() <= limit as usize, "page of {} rows exceeds limit {limit}", page.len());
        let Some(last) = page.last() else {
            return all;
        };
        before = Some((last.at, last.request_id.clone()));
        all.extend(page);
    }
    panic!("model request pagination did not terminate (user {user_id:?}, session {session_id:?}, limit {limit})");
}

fn domains(list: &[&str]) -> Vec<String> {
    list.iter().map(|d| (*d).to_owned()).collect()
}

/// A `CONNECT` the egress proxy let through.
fn egress_event(event_id: &str, user_id: &str, session_id: &str, at: DateTime<Utc>) -> EgressEvent {
    EgressEvent {
        event_id: event_id.to_owned(),
        user_id: user_id.to_owned(),
        session_id: session_id.to_owned(),
        at,
        method: "CONNECT".into(),
        host: "pypi.org".into(),
        port: 443,
        allowed: true,
        reason: None,
    }
}

/// The same, refused.
fn refused_event(event_id: &str, user_id: &str, session_id: &str, at: DateTime<Utc>) -> EgressEvent {
    EgressEvent {
        host: "evil.example".into(),
        allowed: false,
        reason: Some("evil.example is not on the allow-list".into()),
        ..egress_event(event_id, user_id, session_id, at)
    }
}

fn events_query(
    user_id: Option<&str>,
    session_id: Option<&str>,
    allowed: Option<bool>,
    limit: u32,
) -> EgressEventQuery {
    EgressEventQuery {
        user_id: user_id.map(str::to_owned),
        session_id: session_id.map(str::to_owned),
        allowed,
        before: None,
        limit,
    }
}

fn event_ids(events: &[EgressEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event_id.as_str()).collect()
}

async fn record_events(store: &dyn Store, events: &[EgressEvent]) {
    for e in events {
        store.record_egress_event(e).await.unwrap_or_else(|err| panic!("record egress event {}: {err}", e.event_id));
    }
}

async fn list_events(
    store: &dyn Store,
    user_id: Option<&str>,
    session_id: Option<&str>,
    allowed: Option<bool>,
) -> Vec<EgressEvent> {
    store.list_egress_events(&events_query(user_id, session_id, allowed, u32::MAX)).await.expect("list egress events")
}

/// The reference listing: the matching events, newest first by
/// `(at, event_id)`.
fn expected_events<'a>(
    all: impl IntoIterator<Item = &'a EgressEvent>,
    keep: impl Fn(&EgressEvent) -> bool,
) -> Vec<EgressEvent> {
    let mut found: Vec<EgressEvent> = all.into_iter().filter(|e| keep(e)).cloned().collect();
    found.sort_by(|a, b| (b.at, &b.event_id).cmp(&(a.at, &a.event_id)));
    found
}

/// Follows `before` cursors page by page until an empty page.
async fn walk_events(store: &dyn Store, user_id: Option<&str>, allowed: Option<bool>, limit: u32) -> Vec<EgressEvent> {
    let mut all = Vec::new();
    let mut before = None;
    for _ in 0..1000 {
        let query = EgressEventQuery { before: before.clone(), ..events_query(user_id, None, allowed, limit) };
        let page = store.list_egress_events(&query).await.expect("list egress events page");
        assert!(page.len() <= limit as usize, "page of {} rows exceeds limit {limit}", page.len());
        let Some(last) = page.last() else {
            return all;
        };
        before = Some((last.at, last.event_id.clone()));
        all.extend(page);
    }
    panic!("egress event pagination did not terminate (user {user_id:?}, allowed {allowed:?}, limit {limit})");
}

// ---------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------

mod cases {
    use super::*;

    pub async fn ping(store: &dyn Store) {
        store.ping().await.expect("ping");
        store.ping().await.expect("second ping");
    }

    pub async fn users_create_get_list_count(store: &dyn Store) {
        assert_eq!(store.count_users().await.expect("count"), 0);
        assert!(store.list_users().await.expect("list").is_empty());
        assert_eq!(store.get_user("alice").await.expect("get"), None);

        let t = base();
        let carol = user("carol", Role::User, t, None);
        let alice_underscore = user("alice_2", Role::User, t + micros(1), Some(2002));
        let bob = user("Bob", Role::User, t - TimeDelta::days(400), Some(i64::from(u32::MAX)));
        let alice = user("alice", Role::Admin, t + micros(123_456), Some(1001));
        let alice_dash = user("alice-2", Role::Admin, t + TimeDelta::milliseconds(5), Some(0));
        for u in [&carol, &alice_underscore, &bob, &alice, &alice_dash] {
            store.create_user(u).await.unwrap_or_else(|e| panic!("create {}: {e}", u.user_id));
        }

        for u in [&carol, &alice_underscore, &bob, &alice, &alice_dash] {
            assert_eq!(store.get_user(&u.user_id).await.expect("get").as_ref(), Some(u));
        }
        // Ids are case-sensitive.
        assert_eq!(store.get_user("ALICE").await.expect("get"), None);
        assert_eq!(store.get_user("bob").await.expect("get"), None);

        // Ordered by user_id, bytewise.
        let listed = store.list_users().await.expect("list");
        assert_eq!(listed, vec![bob, alice, alice_dash, alice_underscore, carol]);
        assert_eq!(store.count_users().await.expect("count"), 5);
    }

    pub async fn duplicate_user_conflicts(store: &dyn Store) {
        let alice = user("alice", Role::User, store::now(), Some(5000));
        store.create_user(&alice).await.expect("create");
        let again = user("alice", Role::Admin, store::now() + TimeDelta::seconds(1), Some(5001));
        assert_conflict(store.create_user(&again).await, "second user with the same id");
        assert_eq!(store.get_user("alice").await.expect("get"), Some(alice.clone()));
        assert_eq!(store.count_users().await.expect("count"), 1);
        assert_eq!(store.list_users().await.expect("list"), vec![alice]);
    }

    pub async fn concurrent_duplicate_users_conflict(store: &dyn Store) {
        let attempts: Vec<_> = (0..8_i64)
            .map(|i| async move {
                let u = user("racer", if i % 2 == 0 { Role::User } else { Role::Admin }, store::now(), None);
                store.create_user(&u).await
            })
            .collect();
        let results = futures::future::join_all(attempts).await;
        let created = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(created, 1, "exactly one concurrent create must win: {results:?}");
        for result in results.into_iter().filter(Result::is_err) {
            assert_conflict(result, "losing concurrent create");
        }
        assert_eq!(store.count_users().await.expect("count"), 1);
    }

    pub async fn delete_user_removes_tokens_and_deletes_sessions(store: &dyn Store) {
        let t = base();
        let alice = user("alice", Role::User, t, None);
        let bob = user("bob", Role::Admin, t, None);
        store.create_user(&alice).await.expect("create alice");
        store.create_user(&bob).await.expect("create bob");

        let ta1 = token("ta1", "alice", "hash-a1", None, t);
        let ta2 = token("ta2", "alice", "hash-a2", Some("cli"), t + micros(1));
        let tb1 = token("tb1", "bob", "hash-b1", Some("cli"), t);
        for tok in [&ta1, &ta2, &tb1] {
            store.create_token(tok).await.expect("create token");
        }

        let mut sa1 = session("sa1", "alice", t, SessionStatus::Active);
        sa1.message_count = 4;
        sa1.usage.input_tokens = 10;
        let sa2 = session("sa2", "alice", t + micros(1), SessionStatus::Expired);
        let sa3 = session("sa3", "alice", t + micros(2), SessionStatus::Deleted);
        let sb1 = session("sb1", "bob", t, SessionStatus::Active);
        create_sessions(store, &[sa1.clone(), sa2.clone(), sa3.clone(), sb1.clone()]).await;

        assert!(store.delete_user("alice").await.expect("delete alice"));

        assert_eq!(store.get_user("alice").await.expect("get"), None);
        assert_eq!(store.list_users().await.expect("list"), vec![bob.clone()]);
        assert_eq!(store.count_users().await.expect("count"), 1);

        assert!(store.list_tokens("alice").await.expect("list tokens").is_empty());
        assert_eq!(store.get_token("ta1").await.expect("get token"), None);
        assert_eq!(store.get_token("ta2").await.expect("get token"), None);
        assert!(store.authenticate_token("hash-a1", t).await.expect("auth").is_none());
        assert!(store.authenticate_token("hash-a2", t).await.expect("auth").is_none());

        // Sessions outlive their user, marked deleted, otherwise untouched.
        for s in [&sa1, &sa2, &sa3] {
            let expected = Session { status: SessionStatus::Deleted, ..s.clone() };
            assert_eq!(get_session(store, &s.session_id).await, expected);
        }
        assert_eq!(store.count_sessions(Some("alice"), SessionStatus::Deleted).await.expect("count"), 3);
        assert_eq!(store.count_sessions(Some("alice"), SessionStatus::Active).await.expect("count"), 0);
        assert_eq!(store.count_sessions(Some("alice"), SessionStatus::Expired).await.expect("count"), 0);
        assert!(store.list_sessions(&query(Some("alice"), &[], 100)).await.expect("list").is_empty());

        // Bob is untouched.
        assert_eq!(store.list_tokens("bob").await.expect("list tokens"), vec![tb1]);
        assert_eq!(get_session(store, "sb1").await, sb1);
        let (_, who) = store.authenticate_token("hash-b1", t).await.expect("auth").expect("bob still authenticates");
        assert_eq!(who, bob);

        assert!(!store.delete_user("alice").await.expect("delete again"));
        assert!(!store.delete_user("nobody").await.expect("delete unknown"));

        // The id can be reused; the old sessions stay deleted and the old
        // tokens stay gone.
        let alice_again = user("alice", Role::Admin, t + TimeDelta::seconds(1), None);
        store.create_user(&alice_again).await.expect("recreate alice");
        assert!(store.list_tokens("alice").await.expect("list tokens").is_empty());
        assert!(store.authenticate_token("hash-a1", t).await.expect("auth").is_none());
        assert_eq!(get_session(store, "sa1").await.status, SessionStatus::Deleted);
        assert!(store.list_sessions(&query(Some("alice"), &[], 100)).await.expect("list").is_empty());
    }

    pub async fn token_authenticate_records_use(store: &dyn Store) {
        let t = base();
        let alice = user("alice", Role::Admin, t, Some(42));
        store.create_user(&alice).await.expect("create user");
        let tok = token("tok-1", "alice", "hash-1", Some("laptop"), t);
        store.create_token(&tok).await.expect("create token");
        assert_eq!(store.get_token("tok-1").await.expect("get"), Some(tok.clone()));

        let at = t + TimeDelta::seconds(5) + micros(250);
        let (got, who) = store.authenticate_token("hash-1", at).await.expect("auth").expect("live token");
        assert_eq!(who, alice);
        assert_eq!(got, ApiToken { last_used_at: Some(at), ..tok.clone() });
        assert_eq!(store.get_token("tok-1").await.expect("get"), Some(got.clone()));

        // A use more than a minute later is recorded exactly.
        let later = at + TimeDelta::seconds(61) + micros(1);
        let (got, _) = store.authenticate_token("hash-1", later).await.expect("auth").expect("live token");
        assert_eq!(got.last_used_at, Some(later));
        assert_eq!(store.get_token("tok-1").await.expect("get"), Some(got));

        // A use within the minute may be recorded lazily (SQL backends keep
        // the older value), but what is returned and what is stored agree.
        let soon = later + TimeDelta::seconds(10);
        let (got, _) = store.authenticate_token("hash-1", soon).await.expect("auth").expect("live token");
        assert!(
            got.last_used_at == Some(later) || got.last_used_at == Some(soon),
            "last_used_at {:?} is neither the previous use {later} nor this one {soon}",
            got.last_used_at
        );
        assert_eq!(store.get_token("tok-1").await.expect("get"), Some(got.clone()));
        assert_eq!(ApiToken { last_used_at: None, ..got }, tok);

        // A token with a future expiry works; its expiry is returned intact.
        let expires = t + TimeDelta::hours(1) + micros(7);
        let tok2 = ApiToken { expires_at: Some(expires), ..token("tok-2", "alice", "hash-2", None, t) };
        store.create_token(&tok2).await.expect("create token");
        let (got, _) = store.authenticate_token("hash-2", at).await.expect("auth").expect("unexpired token");
        assert_eq!(got, ApiToken { last_used_at: Some(at), ..tok2 });
    }

    pub async fn token_expiry(store: &dyn Store) {
        let now = store::now();
        create_users(store, &["alice"]).await;

        let past = ApiToken {
            expires_at: Some(now - TimeDelta::seconds(1)),
            ..token("past", "alice", "hash-past", None, now - TimeDelta::hours(1))
        };
        store.create_token(&past).await.expect("create token");
        assert!(store.authenticate_token("hash-past", now).await.expect("auth").is_none());
        // A refused token is not marked as used.
        assert_eq!(store.get_token("past").await.expect("get"), Some(past));

        // Expiry is exclusive: a token is dead at its expires_at instant.
        let at = now + TimeDelta::minutes(3);
        let edge = ApiToken { expires_at: Some(at), ..token("edge", "alice", "hash-edge", None, now) };
        store.create_token(&edge).await.expect("create token");
        assert!(store.authenticate_token("hash-edge", at).await.expect("auth").is_none());
        assert!(store.authenticate_token("hash-edge", at + micros(1)).await.expect("auth").is_none());
        let (got, _) = store
            .authenticate_token("hash-edge", at - micros(1))
            .await
            .expect("auth")
            .expect("token is live one microsecond before its expiry");
        assert_eq!(got.last_used_at, Some(at - micros(1)));
    }

    pub async fn unknown_token_hash(store: &dyn Store) {
        let now = store::now();
        create_users(store, &["alice"]).await;
        store.create_token(&token("tok-1", "alice", "hash-1", None, now)).await.expect("create token");

        for hash in ["no-such-hash", "hash", "hash-10", "HASH-1", ""] {
            assert!(store.authenticate_token(hash, now).await.expect("auth").is_none(), "hash {hash:?} matched");
        }
        // The token id is not a credential.
        assert!(store.authenticate_token("tok-1", now).await.expect("auth").is_none());
        assert_eq!(store.get_token("nope").await.expect("get"), None);
        assert_eq!(store.get_token("tok-1").await.expect("get").expect("token").last_used_at, None);
    }

    pub async fn duplicate_token_conflicts(store: &dyn Store) {
        let now = store::now();
        create_users(store, &["alice", "bob"]).await;
        let first = token("tok-1", "alice", "hash-1", Some("a"), now);
        store.create_token(&first).await.expect("create token");

        assert_conflict(
            store.create_token(&token("tok-2", "alice", "hash-1", Some("b"), now)).await,
            "same hash, same user",
        );
        assert_conflict(store.create_token(&token("tok-3", "bob", "hash-1", None, now)).await, "same hash, other user");
        assert_conflict(store.create_token(&token("tok-1", "alice", "hash-9", None, now)).await, "same token id");

        assert_eq!(store.list_tokens("alice").await.expect("list"), vec![first.clone()]);
        assert!(store.list_tokens("bob").await.expect("list").is_empty());
        assert_eq!(store.get_token("tok-2").await.expect("get"), None);
        assert!(store.authenticate_token("hash-9", now).await.expect("auth").is_none());
        let (got, who) = store.authenticate_token("hash-1", now).await.expect("auth").expect("first token");
        assert_eq!((got.token_id.as_str(), who.user_id.as_str()), ("tok-1", "alice"));
    }

    pub async fn tokens_list_get_delete(store: &dyn Store) {
        let t = base();
        create_users(store, &["alice", "bob"]).await;
        let tokens = [
            token("tok-c", "alice", "h-c", Some("ci"), t + TimeDelta::seconds(2)),
            token("tok-b", "alice", "h-b", None, t),
            token("tok-x", "bob", "h-x", None, t - TimeDelta::hours(2)),
            token("tok-e", "alice", "h-e", None, t + TimeDelta::milliseconds(1)),
            token("tok-a", "alice", "h-a", Some("ci"), t),
            ApiToken {
                expires_at: Some(t - TimeDelta::seconds(1)),
                ..token("tok-d", "alice", "h-d", None, t - TimeDelta::hours(1) + micros(1))
            },
            token("tok-f", "alice", "h-f", None, t + micros(1)),
        ];
        for tok in &tokens {
            store.create_token(tok).await.expect("create token");
        }

        // Oldest first, ties by token id; expired tokens are listed too.
        let alice_tokens = store.list_tokens("alice").await.expect("list");
        assert_eq!(token_ids(&alice_tokens), ["tok-d", "tok-a", "tok-b", "tok-f", "tok-e", "tok-c"]);
        for listed in &alice_tokens {
            let original = tokens.iter().find(|t| t.token_id == listed.token_id).expect("known token");
            assert_eq!(listed, original);
        }
        assert_eq!(token_ids(&store.list_tokens("bob").await.expect("list")), ["tok-x"]);
        assert!(store.list_tokens("nobody").await.expect("list").is_empty());

        for tok in &tokens {
            assert_eq!(store.get_token(&tok.token_id).await.expect("get").as_ref(), Some(tok));
        }

        assert!(store.delete_token("tok-b").await.expect("delete"));
        assert!(!store.delete_token("tok-b").await.expect("delete again"));
        assert!(!store.delete_token("unknown").await.expect("delete unknown"));
        assert_eq!(store.get_token("tok-b").await.expect("get"), None);
        assert!(store.authenticate_token("h-b", t).await.expect("auth").is_none());
        assert_eq!(
            token_ids(&store.list_tokens("alice").await.expect("list")),
            ["tok-d", "tok-a", "tok-f", "tok-e", "tok-c"]
        );
        assert_eq!(token_ids(&store.list_tokens("bob").await.expect("list")), ["tok-x"]);
        assert!(store.authenticate_token("h-a", t).await.expect("auth").is_some());
    }

    pub async fn delete_tokens_by_label(store: &dyn Store) {
        let t = base();
        create_users(store, &["alice", "bob"]).await;
        let tokens = [
            token("t1", "alice", "h1", Some("admin"), t),
            token("t2", "alice", "h2", Some("admin"), t + micros(1)),
            token("t3", "alice", "h3", Some("admin"), t + micros(2)),
            token("t4", "alice", "h4", Some("other"), t + micros(3)),
            token("t5", "alice", "h5", None, t + micros(4)),
            token("t6", "alice", "h6", Some("Admin"), t + micros(5)),
            token("t7", "bob", "h7", Some("admin"), t + micros(6)),
        ];
        for tok in &tokens {
            store.create_token(tok).await.expect("create token");
        }

        assert_eq!(store.delete_tokens_by_label("alice", "admin", "t1").await.expect("delete"), 2);
        assert_eq!(token_ids(&store.list_tokens("alice").await.expect("list")), ["t1", "t4", "t5", "t6"]);
        assert_eq!(token_ids(&store.list_tokens("bob").await.expect("list")), ["t7"]);
        assert_eq!(store.get_token("t2").await.expect("get"), None);
        assert!(store.authenticate_token("h3", t).await.expect("auth").is_none());

        assert_eq!(store.delete_tokens_by_label("alice", "admin", "t1").await.expect("again"), 0);
        assert_eq!(store.delete_tokens_by_label("alice", "missing", "t1").await.expect("missing"), 0);
        assert_eq!(store.delete_tokens_by_label("nobody", "admin", "t1").await.expect("nobody"), 0);

        // `keep` naming another user's or no token keeps nothing of alice's.
        assert_eq!(store.delete_tokens_by_label("alice", "admin", "t7").await.expect("delete"), 1);
        assert_eq!(token_ids(&store.list_tokens("alice").await.expect("list")), ["t4", "t5", "t6"]);
        assert_eq!(token_ids(&store.list_tokens("bob").await.expect("list")), ["t7"]);
    }

    pub async fn session_roundtrip(store: &dyn Store) {
        let created = store::now();
        let full = Session {
            session_id: "0b7c3f0e-5d7a-4c47-9a43-9b7e3c1d2a10".into(),
            user_id: "alice".into(),
            subdir: Some("projects/apollo".into()),
            cwd: "/srv/users/alice/projects/apollo dir/ünïcödé".into(),
            options: SessionOptions {
                system_prompt: Some("Be terse.\nSecond line — with \"quotes\", \\backslashes\\ and ✓".into()),
                permission_mode: Some("acceptEdits".into()),
                allowed_tools: Some(vec!["Read".into(), "Bash(git:*)".into()]),
                disallowed_tools: Some(Vec::new()),
                model: Some("claude-sonnet-4-5".into()),
                max_turns: Some(12),
                max_budget_usd: Some(2.75),
                mcp_servers: Some(object(json!({
                    "filesystem": {
                        "command": "npx",
                        "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"],
                        "env": {"DEBUG": "1", "EMPTY": ""},
                    },
                    "remote": {
                        "type": "http",
                        "url": "https://mcp.example.com/v1",
                        "headers": {"Authorization": "Bearer x"},
                        "timeout": 30,
                        "retry": {"attempts": 3, "backoff": 0.5, "on": [502, 503]},
                    },
                }))),
                plugins: Some(vec![json!({"type": "local", "path": "/opt/plugins/a"}), json!("named-plugin")]),
            },
            metadata: object(json!({
                "project": "apollo",
                "tags": ["a", "b", "ç"],
                "nested": {"n": 1, "neg": -42, "f": 0.1, "b": true, "z": null, "deep": {"list": [[1, 2], []]}},
                "big": i64::MAX,
                "empty": {},
            })),
            status: SessionStatus::Active,
            created_at: created,
            last_active_at: created + micros(1_234_567),
            message_count: 7,
            cli_session_id: Some("cli-5b0a".into()),
            usage: UsageTotals {
                input_tokens: 123_456_789_012,
                output_tokens: 42,
                cache_read_tokens: 7,
                cache_creation_tokens: 1,
                total_cost_usd: 0.123_456_789,
            },
        };
        let minimal = Session {
            subdir: None,
            cwd: "/srv/users/bob".into(),
            ..session("minimal", "bob", created.trunc_subsecs(0) - TimeDelta::seconds(1), SessionStatus::Expired)
        };
        let deleted = Session {
            subdir: Some(String::new()),
            metadata: object(json!({"k": "v"})),
            ..session("deleted", "bob", created - TimeDelta::days(3) + micros(999), SessionStatus::Deleted)
        };
        create_sessions(store, &[full.clone(), minimal.clone(), deleted.clone()]).await;

        assert_eq!(get_session(store, &full.session_id).await, full);
        assert_eq!(get_session(store, "minimal").await, minimal);
        assert_eq!(get_session(store, "deleted").await, deleted);
        assert_eq!(store.get_session("missing").await.expect("get"), None);
        assert_eq!(store.get_session("MINIMAL").await.expect("get"), None);

        // Listing returns the same complete values.
        let listed = store.list_sessions(&query(None, &[], 10)).await.expect("list");
        assert_eq!(listed, vec![full, minimal]);
    }

    pub async fn duplicate_session_conflicts(store: &dyn Store) {
        let now = store::now();
        let original = Session { message_count: 3, ..session("s-1", "alice", now, SessionStatus::Active) };
        store.create_session(&original).await.expect("create");
        let clash = Session { cwd: "/elsewhere".into(), ..session("s-1", "bob", now, SessionStatus::Expired) };
        assert_conflict(store.create_session(&clash).await, "second session with the same id");
        assert_eq!(get_session(store, "s-1").await, original);
        assert_eq!(store.count_sessions(None, SessionStatus::Active).await.expect("count"), 1);
        assert_eq!(store.count_sessions(None, SessionStatus::Expired).await.expect("count"), 0);
        assert_eq!(store.count_sessions(Some("bob"), SessionStatus::Expired).await.expect("count"), 0);
    }

    pub async fn list_sessions_filters(store: &dyn Store) {
        use SessionStatus::{Active, Deleted, Expired};
        let t = base();
        let a1 = session("a-1", "alice", t + TimeDelta::seconds(1), Active);
        let a2 = session("a-2", "alice", t + TimeDelta::seconds(2), Expired);
        let a3 = session("a-3", "alice", t + TimeDelta::seconds(3), Deleted);
        let b1 = session("b-1", "bob", t + TimeDelta::seconds(4), Active);
        let b2 = session("b-2", "bob", t + TimeDelta::seconds(5), Deleted);
        let b3 = session("b-3", "bob", t, Expired);
        create_sessions(store, &[a1.clone(), b2, a3, b3, a2.clone(), b1]).await;

        let list = |user: Option<&'static str>, statuses: &'static [SessionStatus], limit: u32| async move {
            let found = store.list_sessions(&query(user, statuses, limit)).await.expect("list");
            found.into_iter().map(|s| s.session_id).collect::<Vec<_>>()
        };

        // Empty statuses: active and expired, never deleted.
        assert_eq!(list(Some("alice"), &[], 100).await, ["a-2", "a-1"]);
        assert_eq!(list(Some("alice"), &[Deleted], 100).await, ["a-3"]);
        assert_eq!(list(Some("alice"), &[Active], 100).await, ["a-1"]);
        assert_eq!(list(Some("alice"), &[Expired], 100).await, ["a-2"]);
        assert_eq!(list(Some("alice"), &[Active, Expired, Deleted], 100).await, ["a-3", "a-2", "a-1"]);
        assert_eq!(list(None, &[], 100).await, ["b-1", "a-2", "a-1", "b-3"]);
        assert_eq!(list(None, &[Active], 100).await, ["b-1", "a-1"]);
        assert_eq!(list(None, &[Expired, Deleted], 100).await, ["b-2", "a-3", "a-2", "b-3"]);
        assert_eq!(list(None, &[Deleted, Active, Expired], 100).await, ["b-2", "b-1", "a-3", "a-2", "a-1", "b-3"]);
        assert_eq!(list(Some("bob"), &[], 100).await, ["b-1", "b-3"]);

        // Limit.
        assert_eq!(list(None, &[], 2).await, ["b-1", "a-2"]);
        assert_eq!(list(None, &[], 1).await, ["b-1"]);
        assert!(list(None, &[], 0).await.is_empty());

        // Unknown user: nothing (not everyone's).
        assert!(list(Some("nobody"), &[], 100).await.is_empty());
        assert!(list(Some(""), &[], 100).await.is_empty());

        // Rows are complete.
        let found = store.list_sessions(&query(Some("alice"), &[], 100)).await.expect("list");
        assert_eq!(found, vec![a2, a1]);
    }

    pub async fn list_sessions_pagination(store: &dyn Store) {
        use SessionStatus::{Active, Deleted, Expired};
        let t = base();
        // Offsets in microseconds; several sessions share each instant, and
        // the instants mix whole seconds, milliseconds and microseconds.
        let offsets: [i64; 12] = [0, 0, 0, 1, 1, 1_000, 999_999, 1_000_000, -1, -1_000_000, -86_400_000_000, 1_000];
        let names = ["k", "B", "a", "z9", "a-", "a_", "0", "Z", "m", "kk", "b", "x"];
        let mut sessions = Vec::new();
        for (i, offset) in offsets.iter().enumerate() {
            for (j, user_id) in ["alice", "bob", "alice"].into_iter().enumerate() {
                let n = i * 3 + j;
                let status = match n % 5 {
                    0 => Deleted,
                    1 => Expired,
                    _ => Active,
                };
                // Ids deliberately not in creation order.
                let id = format!("{}{}-{}", names[(i * 7 + j * 5) % names.len()], (n * 11) % 37, user_id);
                sessions.push(session(&id, user_id, t + micros(*offset), status));
            }
        }
        // Create in an order unrelated to both keys.
        let mut creation = sessions.clone();
        creation.reverse();
        creation.rotate_left(5);
        create_sessions(store, &creation).await;

        let expect = |user_id: Option<&str>, statuses: &[SessionStatus]| {
            let wanted = if statuses.is_empty() { vec![Active, Expired] } else { statuses.to_vec() };
            newest_first(
                sessions
                    .iter()
                    .filter(|s| user_id.is_none_or(|u| s.user_id == u) && wanted.contains(&s.status))
                    .cloned()
                    .collect(),
            )
        };

        let filters: [(Option<&str>, &[SessionStatus]); 5] = [
            (Some("alice"), &[]),
            (None, &[]),
            (None, &[Active]),
            (Some("bob"), &[Deleted, Expired]),
            (None, &[Active, Expired, Deleted]),
        ];
        for (user_id, statuses) in filters {
            let expected = expect(user_id, statuses);
            assert!(expected.len() > 3, "fixture too small for {user_id:?} {statuses:?}");
            let single = store.list_sessions(&query(user_id, statuses, 1000)).await.expect("list");
            assert_eq!(ids(&single), ids(&expected), "one page, user {user_id:?}, statuses {statuses:?}");
            assert_eq!(single, expected);
            for limit in [1, 2, 3, 4, 7] {
                let walked = walk_pages(store, user_id, statuses, limit).await;
                assert_eq!(ids(&walked), ids(&expected), "pages of {limit}, user {user_id:?}, statuses {statuses:?}");
            }
        }

        // Cursors need not name an existing session.
        let everyone = expect(None, &[]);
        let probes = [
            (t, "~"),
            (t, ""),
            (t, "a"),
            (t + micros(500), ""),
            (t + micros(500), "~"),
            (t + micros(1), "m"),
            (t + TimeDelta::seconds(10), ""),
            (t - TimeDelta::days(2), "~"),
        ];
        for (created_at, session_id) in probes {
            let after = SessionCursor { created_at, session_id: session_id.to_owned() };
            let expected: Vec<&str> = everyone
                .iter()
                .filter(|s| (s.created_at, s.session_id.as_str()) < (created_at, session_id))
                .map(|s| s.session_id.as_str())
                .collect();
            let page = store
                .list_sessions(&SessionQuery { after: Some(after.clone()), ..query(None, &[], 1000) })
                .await
                .expect("list after cursor");
            assert_eq!(ids(&page), expected, "after {after:?}");
        }
    }

    pub async fn count_sessions(store: &dyn Store) {
        use SessionStatus::{Active, Deleted, Expired};
        let t = base();
        create_users(store, &["alice", "bob"]).await;
        let mut model = vec![
            session("a1", "alice", t, Active),
            session("a2", "alice", t, Active),
            session("a3", "alice", t, Expired),
            session("a4", "alice", t, Deleted),
            session("b1", "bob", t, Active),
            session("b2", "bob", t, Deleted),
            session("b3", "bob", t, Deleted),
        ];
        create_sessions(store, &model).await;

        async fn check(store: &dyn Store, model: &[Session]) {
            for user_id in [Some("alice"), Some("bob"), Some("nobody"), None] {
                for status in [Active, Expired, Deleted] {
                    let expected =
                        model.iter().filter(|s| s.status == status && user_id.is_none_or(|u| s.user_id == u)).count()
                            as u64;
                    let got = store.count_sessions(user_id, status).await.expect("count");
                    assert_eq!(got, expected, "count_sessions({user_id:?}, {status:?})");
                }
            }
        }
        check(store, &model).await;
        assert_eq!(store.count_sessions(None, Active).await.expect("count"), 3);
        assert_eq!(store.count_sessions(Some("alice"), Active).await.expect("count"), 2);

        let at = t + TimeDelta::seconds(1);
        assert!(store.set_session_status("a1", Expired, at).await.expect("set"));
        model[0].status = Expired;
        assert!(store.set_session_status("b1", Deleted, at).await.expect("set"));
        model[4].status = Deleted;
        check(store, &model).await;

        assert!(store.delete_user("alice").await.expect("delete user"));
        for s in model.iter_mut().filter(|s| s.user_id == "alice") {
            s.status = Deleted;
        }
        check(store, &model).await;
    }

    pub async fn set_session_status(store: &dyn Store) {
        use SessionStatus::{Active, Deleted, Expired};
        let t = base();
        let original = Session {
            message_count: 9,
            cli_session_id: Some("cli-1".into()),
            last_active_at: t + micros(10),
            ..session("s-1", "alice", t, Active)
        };
        let other = session("s-2", "alice", t, Active);
        create_sessions(store, &[original.clone(), other.clone()]).await;

        // To expired: last_active_at is kept.
        let x = t + TimeDelta::seconds(100);
        assert!(store.set_session_status("s-1", Expired, x).await.expect("set"));
        let expired = Session { status: Expired, ..original.clone() };
        assert_eq!(get_session(store, "s-1").await, expired);

        // Expired to expired: still true, still no activity.
        assert!(store.set_session_status("s-1", Expired, x + micros(1)).await.expect("set"));
        assert_eq!(get_session(store, "s-1").await, expired);

        // Back to active: counts as activity at `at`.
        let y = t + TimeDelta::seconds(200) + micros(3);
        assert!(store.set_session_status("s-1", Active, y).await.expect("set"));
        let reopened = Session { status: Active, last_active_at: y, ..original.clone() };
        assert_eq!(get_session(store, "s-1").await, reopened);

        // Active to active moves last_active_at too.
        let y2 = y + TimeDelta::milliseconds(1);
        assert!(store.set_session_status("s-1", Active, y2).await.expect("set"));
        let reopened = Session { last_active_at: y2, ..reopened };
        assert_eq!(get_session(store, "s-1").await, reopened);

        // To deleted: last_active_at is kept.
        let z = t + TimeDelta::seconds(300);
        assert!(store.set_session_status("s-1", Deleted, z).await.expect("set"));
        let deleted = Session { status: Deleted, ..reopened };
        assert_eq!(get_session(store, "s-1").await, deleted);

        // Deleted is final.
        for status in [Active, Expired, Deleted] {
            assert!(
                !store.set_session_status("s-1", status, z + TimeDelta::seconds(1)).await.expect("set"),
                "a deleted session moved to {status:?}"
            );
            assert_eq!(get_session(store, "s-1").await, deleted);
        }

        assert!(!store.set_session_status("unknown", Active, z).await.expect("set unknown"));
        assert_eq!(store.get_session("unknown").await.expect("get"), None);
        // The neighbour is untouched.
        assert_eq!(get_session(store, "s-2").await, other);
    }

    pub async fn touch_session(store: &dyn Store) {
        use SessionStatus::{Active, Deleted, Expired};
        let t = base();
        let active = Session { message_count: 3, ..session("s-active", "alice", t, Active) };
        let expired = Session { message_count: 1, ..session("s-expired", "alice", t, Expired) };
        let deleted = Session { message_count: 5, ..session("s-deleted", "alice", t, Deleted) };
        create_sessions(store, &[active.clone(), expired.clone(), deleted.clone()]).await;

        let at = t + TimeDelta::seconds(30) + micros(17);
        assert!(store.touch_session("s-active", at, 2).await.expect("touch"));
        let active = Session { message_count: 5, last_active_at: at, ..active };
        assert_eq!(get_session(store, "s-active").await, active);

        let at2 = at + TimeDelta::milliseconds(250);
        assert!(store.touch_session("s-active", at2, 0).await.expect("touch"));
        let active = Session { last_active_at: at2, ..active };
        assert_eq!(get_session(store, "s-active").await, active);

        // Touching does not change the status.
        assert!(store.touch_session("s-expired", at, 4).await.expect("touch expired"));
        assert_eq!(get_session(store, "s-expired").await, Session { message_count: 5, last_active_at: at, ..expired });

        assert!(!store.touch_session("s-deleted", at, 1).await.expect("touch deleted"));
        assert_eq!(get_session(store, "s-deleted").await, deleted);
        assert!(!store.touch_session("unknown", at, 1).await.expect("touch unknown"));
        assert_eq!(store.get_session("unknown").await.expect("get"), None);
    }

    pub async fn store_turn_records_usage_and_messages_at_once(store: &dyn Store) {
        let t = base();
        let start = Session { message_count: 2, ..session("s-1", "alice", t, SessionStatus::Active) };
        store.create_session(&start).await.expect("create");
        let turn = UsageTotals {
            input_tokens: 10,
            output_tokens: 20,
            cache_read_tokens: 3,
            cache_creation_tokens: 4,
            total_cost_usd: 0.25,
        };
        let at = t + TimeDelta::seconds(5);
        store.store_turn("s-1", at, &[], Some(&turn)).await.expect("turn 1");
        let messages = [message("user", json!("hi")), message("result", json!({"type": "result"}))];
        store.store_turn("s-1", at + TimeDelta::seconds(1), &messages, Some(&turn)).await.expect("turn 2");
        let got = get_session(store, "s-1").await;
        assert_eq!(got.message_count, 4);
        assert_eq!(got.last_active_at, at + TimeDelta::seconds(1));
        assert_eq!(
            (
                got.usage.input_tokens,
                got.usage.output_tokens,
                got.usage.cache_read_tokens,
                got.usage.cache_creation_tokens
            ),
            (
                start.usage.input_tokens + 20,
                start.usage.output_tokens + 40,
                start.usage.cache_read_tokens + 6,
                start.usage.cache_creation_tokens + 8
            )
        );
        assert!((got.usage.total_cost_usd - (start.usage.total_cost_usd + 0.5)).abs() < 1e-9);
        let stored = store.list_messages("s-1", 0, 10).await.expect("list");
        let seqs_and_kinds: Vec<_> = stored.iter().map(|m| (m.seq, m.kind.as_str())).collect();
        assert_eq!(seqs_and_kinds, [(1, "user"), (2, "result")]);
        assert!(stored.iter().all(|m| m.created_at == at + TimeDelta::seconds(1)));
        // A turn that failed stores its messages but is not counted.
        store.store_turn("s-1", at + TimeDelta::seconds(2), &messages[..1], None).await.expect("failed turn");
        let got = get_session(store, "s-1").await;
        assert_eq!((got.message_count, got.last_active_at), (4, at + TimeDelta::seconds(1)));
        assert_eq!(store.list_messages("s-1", 2, 10).await.expect("list").len(), 1);
        store.set_session_status("s-1", SessionStatus::Deleted, at).await.expect("delete");
        assert_eq!(store.list_messages("s-1", 0, 10).await.expect("list").len(), 0, "deleting purges the history");
        // Refused as gone (the server logs it; no store failure is counted).
        assert!(
            matches!(store.store_turn("s-1", at, &messages, Some(&turn)).await, Err(StoreError::Gone(_))),
            "stored a turn of a deleted session"
        );
        assert!(
            matches!(store.store_turn("unknown", at, &[], Some(&turn)).await, Err(StoreError::Gone(_))),
            "stored a turn of an unknown session"
        );
        assert_eq!(get_session(store, "s-1").await.message_count, 4, "a refused turn changed the session");
    }

    pub async fn assign_uid_allocates_once(store: &dyn Store) {
        for name in ["alice", "bob", "carol"] {
            store.create_user(&user(name, Role::User, base(), None)).await.expect("create");
        }
        let range = (200_000, 200_001);
        let alice = store.assign_uid("alice", range).await.expect("alice");
        assert_eq!(alice, Some(200_000));
        assert_eq!(store.assign_uid("alice", range).await.expect("again"), alice, "allocated once");
        assert_eq!(store.assign_uid("bob", range).await.expect("bob"), Some(200_001));
        assert!(matches!(store.assign_uid("carol", range).await, Err(StoreError::Unavailable(_))), "range exhausted");
        assert_eq!(store.assign_uid("nobody", range).await.expect("unknown"), None);
        assert_eq!(store.get_user("bob").await.expect("get").and_then(|u| u.uid), Some(200_001));
    }

    pub async fn concurrent_touches_are_atomic(store: &dyn Store) {
        let t = base();
        store.create_session(&session("s-1", "alice", t, SessionStatus::Active)).await.expect("create");
        let touches: Vec<_> =
            (1..=24_i64).map(|i| async move { store.touch_session("s-1", t + micros(i), 1).await }).collect();
        for result in futures::future::join_all(touches).await {
            assert!(result.expect("touch"), "touch of an active session must succeed");
        }
        let s = get_session(store, "s-1").await;
        assert_eq!(s.message_count, 24, "concurrent increments were lost");
        assert!(s.last_active_at > t && s.last_active_at <= t + micros(24));
    }

    pub async fn expire_idle_sessions(store: &dyn Store) {
        use SessionStatus::{Active, Deleted, Expired};
        let cutoff = base() + micros(500);
        let idle = |id: &str, user_id: &str, last_active: DateTime<Utc>, status: SessionStatus| Session {
            last_active_at: last_active,
            message_count: 2,
            ..session(id, user_id, cutoff - TimeDelta::days(1), status)
        };
        let sessions = [
            idle("old-alice", "alice", cutoff - TimeDelta::hours(1), Active),
            idle("just-before", "bob", cutoff - micros(1), Active),
            idle("whole-second", "bob", cutoff - micros(500), Active),
            idle("at-cutoff", "alice", cutoff, Active),
            idle("after", "alice", cutoff + micros(1), Active),
            idle("future", "bob", cutoff + TimeDelta::hours(1), Active),
            idle("already-expired", "alice", cutoff - TimeDelta::hours(2), Expired),
            idle("deleted", "bob", cutoff - TimeDelta::hours(3), Deleted),
        ];
        create_sessions(store, &sessions).await;

        let mut expired = store.expire_idle_sessions(cutoff).await.expect("expire");
        expired.sort();
        assert_eq!(expired, ["just-before", "old-alice", "whole-second"]);

        for s in &sessions {
            let now_expired = ["just-before", "old-alice", "whole-second"].contains(&s.session_id.as_str());
            let expected = if now_expired { Session { status: Expired, ..s.clone() } } else { s.clone() };
            assert_eq!(get_session(store, &s.session_id).await, expected, "after expiry: {}", s.session_id);
        }

        // Idempotent: nothing left to expire at the same cutoff.
        assert!(store.expire_idle_sessions(cutoff).await.expect("expire again").is_empty());

        // A later cutoff catches the rest of the active ones, and only them.
        let mut expired = store.expire_idle_sessions(cutoff + TimeDelta::hours(2)).await.expect("expire later");
        expired.sort();
        assert_eq!(expired, ["after", "at-cutoff", "future"]);
        assert_eq!(get_session(store, "deleted").await.status, Deleted);
        assert_eq!(store.count_sessions(None, Active).await.expect("count"), 0);
        assert_eq!(store.count_sessions(None, Expired).await.expect("count"), 7);
    }

    pub async fn messages_append_and_list(store: &dyn Store) {
        let t = base();
        create_sessions(store, &[session("s-1", "alice", t, SessionStatus::Active)]).await;
        assert!(history(store, "s-1").await.is_empty(), "a new session has no history");

        // An empty append is a no-op: the first real message is still seq 1.
        store.store_turn("s-1", t, &[], None).await.expect("empty append");
        assert!(history(store, "s-1").await.is_empty());

        let at1 = t + micros(1);
        let first = [
            message("user", json!({"type": "user", "text": "hello"})),
            message("assistant", json!({"type": "assistant", "text": "hi"})),
            message("result", json!({"type": "result", "cost": 0.5})),
        ];
        store.store_turn("s-1", at1, &first, None).await.expect("append 1");
        let at2 = t + TimeDelta::seconds(2) + micros(999_999);
        let second = [message("user", json!("again"))];
        store.store_turn("s-1", at2, &second, None).await.expect("append 2");
        store.store_turn("s-1", at2, &[], None).await.expect("empty append");
        // A later call may carry an earlier timestamp: seqs follow calls.
        let at3 = t - TimeDelta::days(1);
        let third = [message("assistant", json!(["a", 1])), message("assistant", json!(null))];
        store.store_turn("s-1", at3, &third, None).await.expect("append 3");

        let expected = vec![
            stored(1, &first[0], at1),
            stored(2, &first[1], at1),
            stored(3, &first[2], at1),
            stored(4, &second[0], at2),
            stored(5, &third[0], at3),
            stored(6, &third[1], at3),
        ];
        assert_eq!(history(store, "s-1").await, expected);
        assert_eq!(store.list_messages("s-1", 0, 6).await.expect("list"), expected);
        assert_eq!(store.list_messages("s-1", -5, 100).await.expect("list from a negative seq"), expected);

        // Appending does not touch the session itself.
        assert_eq!(get_session(store, "s-1").await, session("s-1", "alice", t, SessionStatus::Active));
    }

    pub async fn messages_pagination(store: &dyn Store) {
        let t = base();
        create_sessions(store, &[session("s-1", "alice", t, SessionStatus::Active)]).await;
        let all: Vec<NewMessage> = (1..=23).map(|i| message("user", json!({ "i": i }))).collect();
        for (call, chunk) in all.chunks(4).enumerate() {
            store.store_turn("s-1", t + micros(call as i64), chunk, None).await.expect("append");
        }
        let expected: Vec<StoredMessage> =
            all.iter().enumerate().map(|(i, m)| stored(i as i64 + 1, m, t + micros(i as i64 / 4))).collect();
        assert_eq!(history(store, "s-1").await, expected);

        for limit in [1_u32, 2, 5, 22, 23, 24] {
            let mut walked = Vec::new();
            let mut after = 0;
            for _ in 0..100 {
                let page = store.list_messages("s-1", after, limit).await.expect("page");
                assert!(page.len() <= limit as usize, "page of {} exceeds limit {limit}", page.len());
                let Some(last) = page.last() else { break };
                after = last.seq;
                walked.extend(page);
            }
            assert_eq!(walked, expected, "pages of {limit}");
        }

        for after in [0_i64, 1, 7, 22] {
            for limit in [0_u32, 1, 3, 100] {
                let want: Vec<_> = expected.iter().filter(|m| m.seq > after).take(limit as usize).cloned().collect();
                let got = store.list_messages("s-1", after, limit).await.expect("list");
                assert_eq!(seqs(&got), seqs(&want), "after {after}, limit {limit}");
                assert_eq!(got, want);
            }
        }
        assert!(store.list_messages("s-1", 23, 10).await.expect("past the end").is_empty());
        assert!(store.list_messages("s-1", i64::MAX, 10).await.expect("far past the end").is_empty());
        assert_eq!(seqs(&store.list_messages("s-1", i64::MIN, 2).await.expect("from i64::MIN")), [1, 2]);
    }

    /// More messages than one multi-row INSERT takes: every one is stored,
    /// in order, with contiguous seqs after the earlier turn's.
    pub async fn a_turn_larger_than_one_insert_batch(store: &dyn Store) {
        let t = base();
        create_sessions(store, &[session("s-1", "alice", t, SessionStatus::Active)]).await;
        store.store_turn("s-1", t, &[message("user", json!("first"))], None).await.expect("first turn");
        let turn: Vec<_> = (0..1201).map(|i| message("assistant", json!({"i": i}))).collect();
        let usage = UsageTotals { output_tokens: 7, ..UsageTotals::default() };
        store.store_turn("s-1", t + micros(1), &turn, Some(&usage)).await.expect("big turn");
        let mut stored = Vec::new();
        let mut after = 0;
        loop {
            let page = store.list_messages("s-1", after, 500).await.expect("list");
            let Some(last) = page.last() else { break };
            after = last.seq;
            stored.extend(page);
        }
        assert_eq!(stored.len(), 1202);
        for (expected_seq, m) in (1..).zip(&stored) {
            assert_eq!(m.seq, expected_seq);
        }
        assert_eq!(stored[0].content, json!("first"));
        for (i, m) in stored[1..].iter().enumerate() {
            assert_eq!((m.kind.as_str(), &m.content), ("assistant", &json!({"i": i})));
        }
        let got = get_session(store, "s-1").await;
        assert_eq!((got.message_count, got.usage.output_tokens), (1, 7));
    }

    pub async fn messages_roundtrip(store: &dyn Store) {
        let t = base();
        create_sessions(store, &[session("s-1", "alice", t, SessionStatus::Active)]).await;
        let big: String = "0123456789abcdef☃".repeat(200 * 1024 / 19);
        assert!(big.len() > 200_000);
        let messages = [
            message(
                "assistant",
                json!({
                    "type": "assistant",
                    "message": {
                        "content": [
                            {"type": "text", "text": "héllo wörld — 你好 🌍 \"quoted\" \\ back\nslash\ttab"},
                            {"type": "tool_use", "id": "t1", "input": {"z": 1, "a": [true, false, null], "m": {}}},
                        ],
                        "usage": {"input_tokens": 12, "output_tokens": 0},
                    },
                    "nul": "a\u{0}b",
                    "control": "\u{1}\u{1f}\u{7f}",
                    "numbers": [0, -1, 1.5, -2.25, 0.1, 1e-7, 0.1 + 0.2, 1.0 / 3.0, u64::MAX, i64::MIN],
                    "empty": {"obj": {}, "arr": [], "str": ""},
                    "deep": {"a": {"b": {"c": {"d": {"e": {"f": [[[[["deep"]]]]]}}}}}},
                }),
            ),
            message("user", Value::String(big.clone())),
            message("tool_result", json!({"output": big, "lines": (0..2000).collect::<Vec<_>>()})),
            message("", json!({})),
            message("kind with spaces and ünïcödé ✓", json!(42)),
            message("null", Value::Null),
            message("bool", json!(false)),
            message("float", json!(-0.0)),
        ];
        // Stored at microsecond precision: nanoseconds are truncated.
        let at = t + TimeDelta::nanoseconds(123_456_789);
        store.store_turn("s-1", at, &messages, None).await.expect("append");
        let stored_at = t + micros(123_456);
        let expected: Vec<_> = messages.iter().zip(1..).map(|(m, seq)| stored(seq, m, stored_at)).collect();
        let got = history(store, "s-1").await;
        assert_eq!(got.len(), expected.len());
        for (got, expected) in got.iter().zip(&expected) {
            assert_eq!(got, expected, "message {} did not round-trip", expected.seq);
        }
        // Object keys compare as maps, whatever order the backend keeps.
        assert_eq!(
            got[0].content["message"]["content"][1]["input"],
            json!({"a": [true, false, null], "m": {}, "z": 1})
        );
        assert_eq!(got[1].content.as_str().map(str::len), Some(big.len()));
    }

    pub async fn concurrent_appends_are_contiguous(store: &dyn Store) {
        const TASKS: i64 = 8;
        const CALLS: i64 = 2;
        const PER_CALL: i64 = 5;
        let t = base();
        create_sessions(store, &[session("s-1", "alice", t, SessionStatus::Active)]).await;
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| async move {
                for call in 0..CALLS {
                    let batch: Vec<_> =
                        (0..PER_CALL).map(|n| message("user", json!({"task": task, "call": call, "n": n}))).collect();
                    store.store_turn("s-1", t + micros(task), &batch, None).await?;
                }
                StoreResult::Ok(())
            })
            .collect();
        for result in futures::future::join_all(tasks).await {
            result.expect("concurrent append");
        }

        let all = history(store, "s-1").await;
        assert_eq!(seqs(&all), (1..=TASKS * CALLS * PER_CALL).collect::<Vec<_>>(), "seqs are 1..=N, unique, no gaps");
        let field = |m: &StoredMessage, name: &str| m.content[name].as_i64().expect("numeric field");
        let mut first_seq_of = std::collections::HashMap::new();
        for m in &all {
            let (task, call, n) = (field(m, "task"), field(m, "call"), field(m, "n"));
            assert_eq!(m.created_at, t + micros(task), "timestamp of task {task}");
            let first = *first_seq_of.entry((task, call)).or_insert(m.seq - n);
            assert_eq!(m.seq, first + n, "task {task} call {call}: message {n} is not contiguous with its call");
        }
        assert_eq!(first_seq_of.len() as i64, TASKS * CALLS, "every call's messages are there");
        for task in 0..TASKS {
            assert!(first_seq_of[&(task, 0)] < first_seq_of[&(task, 1)], "task {task}: its calls out of order");
        }
        // Calls start on multiples of the batch size since all have 5 messages.
        assert!(first_seq_of.values().all(|first| (first - 1) % PER_CALL == 0));
    }

    pub async fn deleted_session_purges_messages_expired_keeps_them(store: &dyn Store) {
        use SessionStatus::{Active, Deleted, Expired};
        let t = base();
        create_sessions(
            store,
            &[
                session("s-del", "alice", t, Active),
                session("s-exp", "alice", t, Active),
                session("s-idle", "alice", t, Active),
            ],
        )
        .await;
        let batch = [message("user", json!("one")), message("assistant", json!({"two": 2}))];
        for id in ["s-del", "s-exp", "s-idle"] {
            store.store_turn(id, t, &batch, None).await.expect("append");
        }

        // Expired, by hand or by the idle sweep: the history stays, and a
        // resumed session continues its numbering.
        assert!(store.set_session_status("s-exp", Expired, t).await.expect("expire"));
        let swept = store.expire_idle_sessions(t + TimeDelta::hours(1)).await.expect("sweep");
        assert!(swept.contains(&"s-idle".to_owned()), "s-idle was swept: {swept:?}");
        for id in ["s-exp", "s-idle"] {
            assert_eq!(get_session(store, id).await.status, Expired);
            assert_eq!(history(store, id).await, vec![stored(1, &batch[0], t), stored(2, &batch[1], t)], "{id}");
        }
        store.store_turn("s-exp", t, &batch[..1], None).await.expect("append to an expired session");
        assert!(store.set_session_status("s-exp", Active, t + micros(5)).await.expect("resume"));
        store.store_turn("s-exp", t + micros(5), &batch[1..], None).await.expect("append after resume");
        assert_eq!(seqs(&history(store, "s-exp").await), [1, 2, 3, 4]);

        // Deleted: the history is gone at once, for good.
        assert!(store.set_session_status("s-del", Deleted, t).await.expect("delete"));
        assert!(history(store, "s-del").await.is_empty(), "a deleted session's history lingers");
        assert!(store.list_messages("s-del", 0, 10).await.expect("list").is_empty());
        assert!(store.store_turn("s-del", t, &batch, None).await.is_err(), "appended to a deleted session");
        assert!(history(store, "s-del").await.is_empty());
        // Deleting an expired session purges it too.
        assert!(store.set_session_status("s-idle", Deleted, t).await.expect("delete expired"));
        assert!(history(store, "s-idle").await.is_empty());
        // The neighbour keeps its history.
        assert_eq!(seqs(&history(store, "s-exp").await), [1, 2, 3, 4]);
    }

    pub async fn delete_user_purges_messages(store: &dyn Store) {
        use SessionStatus::{Active, Expired};
        let t = base();
        create_users(store, &["alice", "bob"]).await;
        create_sessions(
            store,
            &[
                session("a-1", "alice", t, Active),
                session("a-2", "alice", t, Expired),
                session("b-1", "bob", t, Active),
            ],
        )
        .await;
        let batch = [message("user", json!({"secret": "alice's"})), message("assistant", json!("ok"))];
        for id in ["a-1", "a-2", "b-1"] {
            store.store_turn(id, t, &batch, None).await.expect("append");
        }

        assert!(store.delete_user("alice").await.expect("delete alice"));
        for id in ["a-1", "a-2"] {
            assert!(history(store, id).await.is_empty(), "{id}: a deleted user's history lingers");
            assert!(store.store_turn(id, t, &batch, None).await.is_err(), "{id}: appended after the user was deleted");
        }
        assert_eq!(history(store, "b-1").await, vec![stored(1, &batch[0], t), stored(2, &batch[1], t)]);

        // Deleting an unknown user purges nothing.
        assert!(!store.delete_user("nobody").await.expect("delete unknown"));
        assert_eq!(seqs(&history(store, "b-1").await), [1, 2]);
    }

    pub async fn append_to_unknown_or_deleted_session_fails(store: &dyn Store) {
        let t = base();
        create_sessions(store, &[session("s-dead", "alice", t, SessionStatus::Deleted)]).await;
        let batch = [message("user", json!("lost"))];
        for id in ["unknown", "s-dead", ""] {
            match store.store_turn(id, t, &batch, None).await {
                Err(StoreError::Gone(_)) => {}
                other => panic!("append to {id:?}: expected StoreError::Gone, got {other:?}"),
            }
            assert!(history(store, id).await.is_empty(), "{id:?}: a failed append left messages");
        }
        assert_eq!(store.get_session("unknown").await.expect("get"), None, "a failed append created a session");
        // Listing an unknown session is not an error.
        assert!(store.list_messages("unknown", 0, 10).await.expect("list unknown").is_empty());

        // The session created later starts at seq 1.
        create_sessions(store, &[session("unknown", "alice", t, SessionStatus::Active)]).await;
        store.store_turn("unknown", t, &batch, None).await.expect("append once it exists");
        assert_eq!(history(store, "unknown").await, vec![stored(1, &batch[0], t)]);
    }

    pub async fn messages_stay_in_their_session(store: &dyn Store) {
        let t = base();
        // Ids that differ by case, prefix and suffix only.
        let ids = ["s-1", "s-10", "S-1", "s-1 "];
        let sessions: Vec<_> = ids.iter().map(|id| session(id, "alice", t, SessionStatus::Active)).collect();
        create_sessions(store, &sessions).await;
        // Interleaved appends: each session numbers its own history from 1.
        for round in 0..3 {
            for (i, id) in ids.iter().enumerate() {
                let batch: Vec<_> =
                    (0..=i).map(|n| message("user", json!({"session": id, "round": round, "n": n}))).collect();
                store.store_turn(id, t + micros(round), &batch, None).await.expect("append");
            }
        }
        for (i, id) in ids.iter().enumerate() {
            let got = history(store, id).await;
            let per_round = i as i64 + 1;
            assert_eq!(seqs(&got), (1..=3 * per_round).collect::<Vec<_>>(), "{id:?}");
            for m in &got {
                assert_eq!(m.content["session"], json!(id), "{id:?} shows another session's message");
                let (round, n) = (m.content["round"].as_i64().expect("round"), m.content["n"].as_i64().expect("n"));
                assert_eq!(m.seq, round * per_round + n + 1, "{id:?}");
            }
        }
        assert!(history(store, "s-").await.is_empty());
        assert!(history(store, "s-1%").await.is_empty());
    }
    pub async fn model_request_roundtrip(store: &dyn Store) {
        let t = base();
        let input: String = "é\"\\\n\u{0}☃ {}".repeat(200).chars().take(1000).collect();
        let full = ModelRequest {
            request_id: "5d0f6f3e-8f0b-4b8e-9d6c-2f1a7c3e9b10".into(),
            user_id: "alice".into(),
            session_id: "0b7c3f0e-5d7a-4c47-9a43-9b7e3c1d2a10".into(),
            // Stored at microsecond precision: nanoseconds are truncated.
            at: t + TimeDelta::nanoseconds(123_456_789),
            method: "POST".into(),
            path: "/v1/messages?beta=true".into(),
            model: Some("claude-opus-4-1-20250805".into()),
            status: 200,
            usage: usage(i64::MAX, 9_007_199_254_740_993, 3_000_000_000_000, i64::from(u32::MAX) + 1, 0.1 + 0.2),
            duration_ms: i64::from(i32::MAX) * 3,
            tool_calls: json!([
                {"name": "Bash", "input_bytes": 4096, "input": input},
                {
                    "name": "mcp__remote__query",
                    "input_bytes": 0,
                    "input": "",
                    "extra": {"nested": [1, -2.5, 1e-7, u64::MAX, null, true, {"deep": {"deeper": ["x"]}}], "e": {}},
                },
                {"name": "ünïcödé ✓ 你好 🌍", "input_bytes": 1, "input": "\u{1}\u{1f}\u{7f}"},
            ]),
            refusal: None,
        };
        let refused = ModelRequest {
            request_id: "r-refused".into(),
            user_id: "alice".into(),
            session_id: "a session id with spaces".into(),
            at: t - TimeDelta::days(400) + micros(1),
            method: "GET".into(),
            path: "/v1/models".into(),
            model: None,
            status: 429,
            usage: UsageTotals::default(),
            duration_ms: 0,
            tool_calls: json!([]),
            refusal: Some("budget exceeded: $12.50 of $12.50 this month — \"try later\"".into()),
        };
        let upstream_error = ModelRequest {
            request_id: "r-502".into(),
            user_id: "bob".into(),
            session_id: String::new(),
            status: 502,
            model: Some(String::new()),
            refusal: Some(String::new()),
            usage: usage(1, 0, 0, 0, 1.0 / 3.0),
            tool_calls: json!([{"name": "Read", "input_bytes": 2, "input": "{}"}]),
            ..model_request("r-502", "bob", "", t + TimeDelta::milliseconds(5))
        };
        record_requests(store, &[full.clone(), refused.clone(), upstream_error.clone()]).await;

        let full_stored = ModelRequest { at: t + micros(123_456), ..full.clone() };
        assert_eq!(
            list_requests(store, None, None).await,
            vec![full_stored.clone(), upstream_error.clone(), refused.clone()]
        );
        let got = list_requests(store, Some("alice"), Some(&full.session_id)).await;
        assert_eq!(got, vec![full_stored.clone()]);
        assert_eq!(got[0].tool_calls[0]["input"].as_str().map(|s| s.chars().count()), Some(1000));
        assert_eq!(got[0].usage.total_cost_usd, 0.1 + 0.2);
        assert_eq!(list_requests(store, None, Some("a session id with spaces")).await, vec![refused]);
        assert_eq!(list_requests(store, Some("bob"), Some("")).await, vec![upstream_error.clone()]);

        // One request's usage comes back exactly, at the limits of i64.
        assert_eq!(store.model_usage("bob", None).await.expect("usage"), (1, upstream_error.usage));
        let (count, alice) = store.model_usage("alice", Some(t)).await.expect("usage");
        assert_eq!((count, alice), (1, full.usage));
        assert_eq!(
            store.model_usage_by_session("alice").await.expect("by session")[0],
            (full.session_id.clone(), 1, full.usage)
        );

        // The serialised form keeps the tool calls as a JSON array.
        let json = serde_json::to_value(&full_stored).expect("serialise");
        assert!(json["tool_calls"].is_array());
        assert_eq!(serde_json::from_value::<ModelRequest>(json).expect("deserialise"), full_stored);
    }

    pub async fn model_request_with_nul_is_rejected(store: &dyn Store) {
        let t = base();
        let good = model_request("r-1", "alice", "s-1", t);
        let bad = [
            ModelRequest { model: Some("claude\u{0}".into()), ..good.clone() },
            ModelRequest { path: "/v1/messages\u{0}".into(), ..good.clone() },
            ModelRequest { refusal: Some("\u{0}".into()), ..good.clone() },
            ModelRequest { method: "PO\u{0}ST".into(), ..good.clone() },
            ModelRequest { session_id: "s-1\u{0}".into(), ..good.clone() },
            ModelRequest { user_id: "\u{0}alice".into(), ..good.clone() },
            ModelRequest { request_id: "r-1\u{0}".into(), ..good.clone() },
        ];
        for request in &bad {
            match store.record_model_request(request).await {
                Err(StoreError::Internal(_)) => {}
                other => panic!("recording {request:?}: expected StoreError::Internal, got {other:?}"),
            }
        }
        assert!(list_requests(store, None, None).await.is_empty(), "a rejected request was recorded");
        // A NUL inside the tool calls' JSON is escaped, so it is stored.
        let escaped = ModelRequest { tool_calls: json!([{"name": "x\u{0}", "input": "\u{0}"}]), ..good };
        store.record_model_request(&escaped).await.expect("record");
        assert_eq!(list_requests(store, None, None).await, vec![escaped]);
    }

    pub async fn duplicate_model_request_conflicts(store: &dyn Store) {
        let t = base();
        let original = model_request("r-1", "alice", "s-1", t);
        store.record_model_request(&original).await.expect("record");
        let clash = ModelRequest {
            status: 500,
            usage: usage(1, 1, 1, 1, 1.0),
            ..model_request("r-1", "bob", "s-2", t + TimeDelta::seconds(1))
        };
        assert_conflict(store.record_model_request(&clash).await, "second model request with the same id");
        assert_conflict(store.record_model_request(&original).await, "the same model request twice");
        assert_eq!(list_requests(store, None, None).await, vec![original.clone()]);
        assert_eq!(store.model_usage("alice", None).await.expect("usage"), (1, original.usage));
        assert_eq!(store.model_usage("bob", None).await.expect("usage"), (0, UsageTotals::default()));
        // Ids are case-sensitive.
        let upper = model_request("R-1", "alice", "s-1", t);
        store.record_model_request(&upper).await.expect("record an id differing by case");
        assert_eq!(request_ids(&list_requests(store, None, None).await), ["r-1", "R-1"]);
    }

    pub async fn concurrent_duplicate_model_requests_conflict(store: &dyn Store) {
        let t = base();
        let attempts: Vec<_> = (0..8_i64)
            .map(|i| async move {
                let r = model_request("racer", if i % 2 == 0 { "alice" } else { "bob" }, "s-1", t + micros(i));
                store.record_model_request(&r).await
            })
            .collect();
        let results = futures::future::join_all(attempts).await;
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "exactly one record must win: {results:?}");
        for result in results.into_iter().filter(Result::is_err) {
            assert_conflict(result, "losing concurrent record");
        }
        assert_eq!(list_requests(store, None, None).await.len(), 1);
        let (alice, _) = store.model_usage("alice", None).await.expect("usage");
        let (bob, _) = store.model_usage("bob", None).await.expect("usage");
        assert_eq!(alice + bob, 1);
    }

    pub async fn model_requests_list_filters(store: &dyn Store) {
        let t = base();
        let requests = [
            model_request("r-1", "alice", "a-1", t + TimeDelta::seconds(1)),
            model_request("r-2", "alice", "a-2", t + TimeDelta::seconds(2)),
            model_request("r-3", "alice", "a-1", t + TimeDelta::seconds(3)),
            model_request("r-4", "bob", "b-1", t + TimeDelta::seconds(4)),
            // Another user's request in alice's session (shared id space).
            model_request("r-5", "bob", "a-1", t + TimeDelta::seconds(5)),
            model_request("r-6", "alice", "a-1", t),
            // Ids differing from the filters by case, prefix and suffix.
            model_request("r-7", "Alice", "A-1", t + micros(7)),
            model_request("r-8", "alice-2", "a-1 ", t + micros(8)),
            // Same `at`: ordered by id, bytewise, descending.
            model_request("r-b", "alice", "a-2", t + micros(9)),
            model_request("r-B", "alice", "a-2", t + micros(9)),
            model_request("r-a", "alice", "a-2", t + micros(9)),
        ];
        // Recorded out of order.
        for i in [4, 9, 0, 10, 2, 6, 8, 1, 5, 3, 7] {
            store.record_model_request(&requests[i]).await.expect("record");
        }

        let check = async |user: Option<&str>, session: Option<&str>| {
            let want = expected_requests(&requests, |r| {
                user.is_none_or(|u| r.user_id == u) && session.is_none_or(|x| r.session_id == x)
            });
            let got = list_requests(store, user, session).await;
            assert_eq!(request_ids(&got), request_ids(&want), "user {user:?}, session {session:?}");
            assert_eq!(got, want);
            for limit in [0_u32, 1, 2] {
                let page =
                    store.list_model_requests(&requests_query(user, session, limit)).await.expect("list with a limit");
                assert_eq!(page, want[..want.len().min(limit as usize)], "user {user:?}, session {session:?}");
            }
            want.len()
        };
        assert_eq!(check(None, None).await, requests.len());
        assert_eq!(check(Some("alice"), None).await, 7);
        assert_eq!(check(Some("bob"), None).await, 2);
        assert_eq!(check(None, Some("a-1")).await, 4);
        assert_eq!(check(Some("alice"), Some("a-1")).await, 3);
        assert_eq!(check(Some("bob"), Some("a-1")).await, 1);
        assert_eq!(check(Some("alice"), Some("a-2")).await, 4);
        assert_eq!(check(Some("bob"), Some("a-2")).await, 0);
        for (user, session) in [(Some("ALICE"), None), (Some("alice "), None), (None, Some("a-")), (None, Some("a-1%"))]
        {
            assert_eq!(check(user, session).await, 0, "user {user:?}, session {session:?}");
        }
        assert_eq!(request_ids(&list_requests(store, Some("alice"), Some("a-2")).await), ["r-2", "r-b", "r-a", "r-B"]);
    }

    pub async fn model_requests_pagination(store: &dyn Store) {
        let t = base();
        let users = ["alice", "bob"];
        let sessions = ["s-1", "s-2", "s-3"];
        // Several rows share each `at`; ids are not in time order.
        let requests: Vec<ModelRequest> = (0..30_i64)
            .map(|i| {
                let at = match i % 5 {
                    0 => t,
                    1 => t + micros(1),
                    2 => t + TimeDelta::milliseconds(1),
                    3 => t + TimeDelta::seconds(1) + micros(999_999),
                    _ => t - TimeDelta::days(1),
                };
                let id = format!("req-{:02}", (i * 7) % 30);
                model_request(&id, users[(i % 2) as usize], sessions[(i % 3) as usize], at)
            })
            .collect();
        record_requests(store, &requests).await;

        for user in [None, Some("alice"), Some("bob")] {
            for session in [None, Some("s-1"), Some("s-3")] {
                let want = expected_requests(&requests, |r| {
                    user.is_none_or(|u| r.user_id == u) && session.is_none_or(|x| r.session_id == x)
                });
                assert!(!want.is_empty());
                for limit in [1_u32, 2, 3, 4, 7, 29, 30, 31] {
                    let walked = walk_requests(store, user, session, limit).await;
                    assert_eq!(
                        request_ids(&walked),
                        request_ids(&want),
                        "user {user:?}, session {session:?}, pages of {limit}"
                    );
                }
            }
        }

        // `before` is exclusive on (at, request_id), and a cursor finer than
        // microseconds means the same on every backend.
        let cursors = [
            (t + micros(1), "req-10".to_owned()),
            (t + micros(1), String::new()),
            (t + micros(1), "~".to_owned()),
            (t + micros(1) + TimeDelta::nanoseconds(1), String::new()),
            (t + micros(1) - TimeDelta::nanoseconds(1), "~".to_owned()),
            (t + TimeDelta::nanoseconds(999), "req-00".to_owned()),
            (t - TimeDelta::days(2), "~".to_owned()),
            (t + TimeDelta::days(1), String::new()),
        ];
        for before in cursors {
            for user in [None, Some("bob")] {
                let want = expected_requests(&requests, |r| {
                    user.is_none_or(|u| r.user_id == u)
                        && (r.at < before.0 || (r.at == before.0 && r.request_id < before.1))
                });
                let query = ModelRequestQuery { before: Some(before.clone()), ..requests_query(user, None, 100) };
                let got = store.list_model_requests(&query).await.expect("list before");
                assert_eq!(request_ids(&got), request_ids(&want), "before {before:?}, user {user:?}");
            }
        }
    }

    pub async fn model_usage_since(store: &dyn Store) {
        let t = base();
        let with_usage = |id: &str, user: &str, at: DateTime<Utc>, usage: UsageTotals| ModelRequest {
            usage,
            ..model_request(id, user, "s-1", at)
        };
        let requests = [
            with_usage("old", "alice", t - TimeDelta::days(1), usage(1, 2, 3, 4, 0.5)),
            with_usage("edge-1", "alice", t, usage(10, 20, 30, 40, 0.25)),
            with_usage("edge-2", "alice", t, usage(100, 200, 300, 400, 0.125)),
            with_usage("next", "alice", t + micros(1), usage(1000, 2000, 3000, 4000, 0.0625)),
            with_usage("late", "alice", t + TimeDelta::hours(1), usage(10_000, 20_000, 30_000, 40_000, 2.0)),
            with_usage("refused", "alice", t + TimeDelta::hours(2), UsageTotals::default()),
            with_usage("bob", "bob", t, usage(7, 7, 7, 7, 7.0)),
        ];
        record_requests(store, &requests).await;
        let alice: Vec<&ModelRequest> = requests.iter().filter(|r| r.user_id == "alice").collect();
        let since = |bound: DateTime<Utc>| expected_usage(alice.iter().copied().filter(|r| r.at >= bound));

        assert_eq!(store.model_usage("alice", None).await.expect("usage"), expected_usage(alice.iter().copied()));
        assert_eq!(
            store.model_usage("alice", None).await.expect("usage"),
            (6, usage(11_111, 22_222, 33_333, 44_444, 2.9375))
        );
        for bound in [
            t - TimeDelta::days(2),
            t - TimeDelta::days(1),
            t - TimeDelta::nanoseconds(1),
            // At == since is included.
            t,
            t + TimeDelta::nanoseconds(1),
            t + micros(1),
            t + micros(2),
            t + TimeDelta::hours(1),
            t + TimeDelta::hours(2),
        ] {
            assert_eq!(store.model_usage("alice", Some(bound)).await.expect("usage"), since(bound), "since {bound:?}");
        }
        assert_eq!(
            store.model_usage("alice", Some(t)).await.expect("usage"),
            (5, usage(11_110, 22_220, 33_330, 44_440, 2.4375))
        );
        assert_eq!(store.model_usage("alice", Some(t + TimeDelta::nanoseconds(1))).await.expect("usage").0, 3);
        let nothing = (0, UsageTotals::default());
        assert_eq!(store.model_usage("alice", Some(t + TimeDelta::hours(3))).await.expect("usage"), nothing);
        assert_eq!(store.model_usage("bob", None).await.expect("usage"), (1, usage(7, 7, 7, 7, 7.0)));
        assert_eq!(store.model_usage("bob", Some(t + micros(1))).await.expect("usage"), nothing);
        assert_eq!(store.model_usage("nobody", None).await.expect("usage"), nothing);
        assert_eq!(store.model_usage("ALICE", Some(t)).await.expect("usage"), nothing);
    }

    pub async fn model_usage_overflow_is_an_error(store: &dyn Store) {
        let t = base();
        let half = i64::MAX / 2 + 1;
        let requests = [
            ModelRequest { usage: usage(half, 1, 1, 1, 1.0), ..model_request("r-1", "alice", "s-1", t) },
            ModelRequest { usage: usage(half, 1, 1, 1, 1.0), ..model_request("r-2", "alice", "s-1", t + micros(1)) },
            ModelRequest { usage: usage(i64::MAX, 0, 0, 0, 0.0), ..model_request("r-3", "bob", "s-2", t) },
        ];
        record_requests(store, &requests).await;
        // Each request alone sums fine.
        assert_eq!(store.model_usage("alice", Some(t + micros(1))).await.expect("usage"), (1, requests[1].usage));
        assert_eq!(store.model_usage("bob", None).await.expect("usage"), (1, requests[2].usage));
        // Both overflow i64: an error, never a wrapped or clamped total.
        match store.model_usage("alice", None).await {
            Err(StoreError::Internal(_)) => {}
            other => panic!("overflowing model usage: expected StoreError::Internal, got {other:?}"),
        }
        match store.model_usage_by_session("alice").await {
            Err(StoreError::Internal(_)) => {}
            other => panic!("overflowing usage by session: expected StoreError::Internal, got {other:?}"),
        }
        assert_eq!(list_requests(store, Some("alice"), None).await.len(), 2);
    }

    pub async fn model_usage_by_session(store: &dyn Store) {
        let t = base();
        let with_usage = |id: &str, user: &str, session: &str, usage: UsageTotals| ModelRequest {
            usage,
            ..model_request(id, user, session, t)
        };
        let requests = [
            with_usage("r-1", "alice", "s-b", usage(1, 2, 3, 4, 0.5)),
            with_usage("r-2", "alice", "s-a", usage(10, 20, 30, 40, 0.25)),
            with_usage("r-3", "alice", "s-b", usage(100, 200, 300, 400, 0.125)),
            with_usage("r-4", "alice", "S-c", usage(1000, 2000, 3000, 4000, 1.5)),
            with_usage("r-5", "alice", "s-a ", usage(5, 5, 5, 5, 0.0)),
            with_usage("r-6", "alice", "s-b", UsageTotals::default()),
            with_usage("r-7", "alice", "", usage(3_000_000_000_000, 1, 0, 0, 1024.0)),
            with_usage("r-8", "bob", "s-a", usage(9, 9, 9, 9, 9.0)),
            with_usage("r-9", "bob", "s-z", usage(8, 8, 8, 8, 8.0)),
        ];
        record_requests(store, &requests).await;

        let by_session = store.model_usage_by_session("alice").await.expect("by session");
        assert_eq!(
            by_session,
            vec![
                (String::new(), 1, usage(3_000_000_000_000, 1, 0, 0, 1024.0)),
                ("S-c".to_owned(), 1, usage(1000, 2000, 3000, 4000, 1.5)),
                ("s-a".to_owned(), 1, usage(10, 20, 30, 40, 0.25)),
                ("s-a ".to_owned(), 1, usage(5, 5, 5, 5, 0.0)),
                ("s-b".to_owned(), 3, usage(101, 202, 303, 404, 0.625)),
            ]
        );
        // The sessions add up to the user's total.
        let mut total = (0, UsageTotals::default());
        for (_, count, usage) in &by_session {
            total.0 += count;
            total.1 += usage;
        }
        assert_eq!(store.model_usage("alice", None).await.expect("usage"), total);
        assert_eq!(
            store.model_usage_by_session("bob").await.expect("by session"),
            vec![("s-a".to_owned(), 1, usage(9, 9, 9, 9, 9.0)), ("s-z".to_owned(), 1, usage(8, 8, 8, 8, 8.0))]
        );
        assert!(store.model_usage_by_session("nobody").await.expect("by session").is_empty());
        assert!(store.model_usage_by_session("Alice").await.expect("by session").is_empty());
    }

    pub async fn model_requests_survive_session_deletion(store: &dyn Store) {
        use SessionStatus::{Active, Deleted};
        let t = base();
        create_users(store, &["alice"]).await;
        create_sessions(store, &[session("s-1", "alice", t, Active), session("s-2", "alice", t, Active)]).await;
        let before = [model_request("r-1", "alice", "s-1", t), model_request("r-2", "alice", "s-1", t + micros(1))];
        record_requests(store, &before).await;
        store.store_turn("s-1", t, &[message("user", json!("hi"))], None).await.expect("append");

        assert!(store.set_session_status("s-1", Deleted, t + micros(2)).await.expect("delete session"));
        assert!(history(store, "s-1").await.is_empty(), "the session's history is purged");
        assert_eq!(list_requests(store, None, Some("s-1")).await, expected_requests(&before, |_| true));

        // A request that finishes after its session was deleted is recorded,
        // and so is one for a session that never existed.
        let after = [
            model_request("r-3", "alice", "s-1", t + micros(3)),
            model_request("r-4", "alice", "never-created", t + micros(4)),
        ];
        record_requests(store, &after).await;
        let all: Vec<ModelRequest> = before.iter().chain(&after).cloned().collect();
        assert_eq!(list_requests(store, Some("alice"), None).await, expected_requests(&all, |_| true));
        assert_eq!(store.model_usage("alice", None).await.expect("usage"), expected_usage(&all));
        let sessions: Vec<(String, i64)> = store
            .model_usage_by_session("alice")
            .await
            .expect("by session")
            .into_iter()
            .map(|(id, count, _)| (id, count))
            .collect();
        assert_eq!(sessions, [("never-created".to_owned(), 1), ("s-1".to_owned(), 3)]);
        // Recording does not create or revive sessions.
        assert_eq!(get_session(store, "s-1").await.status, Deleted);
        assert_eq!(store.get_session("never-created").await.expect("get"), None);
    }

    pub async fn delete_user_removes_model_requests(store: &dyn Store) {
        let t = base();
        create_users(store, &["alice", "bob"]).await;
        create_sessions(
            store,
            &[session("a-1", "alice", t, SessionStatus::Active), session("b-1", "bob", t, SessionStatus::Active)],
        )
        .await;
        let alice = [
            model_request("a-r1", "alice", "a-1", t),
            model_request("a-r2", "alice", "a-1", t + micros(1)),
            model_request("a-r3", "alice", "b-1", t + micros(2)),
        ];
        let others = [
            model_request("b-r1", "bob", "b-1", t),
            model_request("b-r2", "bob", "a-1", t + micros(3)),
            // Not users: recorded all the same, and not alice's.
            model_request("c-r1", "carol", "c-1", t),
            model_request("x-r1", "Alice", "a-1", t),
            model_request("x-r2", "alice-2", "a-1", t),
        ];
        record_requests(store, &alice).await;
        record_requests(store, &others).await;

        assert!(store.delete_user("alice").await.expect("delete alice"));
        assert!(list_requests(store, Some("alice"), None).await.is_empty(), "a deleted user's requests linger");
        assert_eq!(store.model_usage("alice", None).await.expect("usage"), (0, UsageTotals::default()));
        assert!(store.model_usage_by_session("alice").await.expect("by session").is_empty());
        assert_eq!(list_requests(store, None, None).await, expected_requests(&others, |_| true));
        assert_eq!(store.model_usage("bob", None).await.expect("usage"), expected_usage(&others[..2]));

        // An unknown user changes nothing, even with recorded requests.
        assert!(!store.delete_user("carol").await.expect("delete unknown"));
        assert_eq!(list_requests(store, Some("carol"), None).await, vec![others[2].clone()]);

        // The id can be reused: the new alice starts with no requests, and
        // her old request ids are free again.
        create_users(store, &["alice"]).await;
        assert!(list_requests(store, Some("alice"), None).await.is_empty());
        record_requests(store, &alice[..1]).await;
        assert_eq!(list_requests(store, Some("alice"), None).await, vec![alice[0].clone()]);
    }

    pub async fn concurrent_model_requests(store: &dyn Store) {
        const TASKS: i64 = 8;
        const PER_TASK: i64 = 25;
        let t = base();
        let make = move |task: i64, n: i64| ModelRequest {
            // Several tasks share each `at`.
            usage: usage(task * 1000 + n, n + 1, task, 1, (task * PER_TASK + n) as f64 / 64.0),
            ..model_request(
                &format!("t{task}-n{n:02}"),
                if task % 2 == 0 { "alice" } else { "bob" },
                &format!("s-{}", task % 3),
                t + micros(n),
            )
        };
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| async move {
                for n in 0..PER_TASK {
                    store.record_model_request(&make(task, n)).await?;
                }
                StoreResult::Ok(())
            })
            .collect();
        for result in futures::future::join_all(tasks).await {
            result.expect("concurrent record");
        }

        let all: Vec<ModelRequest> = (0..TASKS).flat_map(|task| (0..PER_TASK).map(move |n| make(task, n))).collect();
        let listed = list_requests(store, None, None).await;
        assert_eq!(listed.len() as i64, TASKS * PER_TASK, "every request was recorded once");
        assert_eq!(listed, expected_requests(&all, |_| true));
        assert_eq!(request_ids(&walk_requests(store, None, None, 7).await), request_ids(&listed));
        for user in ["alice", "bob"] {
            let mine: Vec<&ModelRequest> = all.iter().filter(|r| r.user_id == user).collect();
            assert_eq!(store.model_usage(user, None).await.expect("usage"), expected_usage(mine.iter().copied()));
            let since = t + micros(PER_TASK - 5);
            assert_eq!(
                store.model_usage(user, Some(since)).await.expect("usage"),
                expected_usage(mine.iter().copied().filter(|r| r.at >= since)),
                "{user} since {since:?}"
            );
            let mut by_session: Vec<(String, i64, UsageTotals)> = Vec::new();
            for session in ["s-0", "s-1", "s-2"] {
                let (count, usage) = expected_usage(mine.iter().copied().filter(|r| r.session_id == session));
                if count > 0 {
                    by_session.push((session.to_owned(), count, usage));
                }
            }
            assert_eq!(store.model_usage_by_session(user).await.expect("by session"), by_session, "{user}");
        }
    }

    pub async fn user_allowed_domains_roundtrip(store: &dyn Store) {
        let t = base();
        let listed = domains(&["example.com", "*.pypi.org", ".npmjs.org", "*"]);
        // Stored as given: the API validates, the store keeps any text.
        let odd = domains(&["", "ünïcödé.example", "quote\"back\\slash", "nul\u{0}inside", "x".repeat(300).as_str()]);
        let alice = User { allowed_domains: Some(listed.clone()), ..user("alice", Role::User, t, None) };
        let bob = user("bob", Role::Admin, t + micros(1), Some(1001));
        let carol = User { allowed_domains: Some(Vec::new()), ..user("carol", Role::User, t, None) };
        for u in [&alice, &bob, &carol] {
            store.create_user(u).await.unwrap_or_else(|e| panic!("create {}: {e}", u.user_id));
        }
        // Created with a list (an empty list is not the global one).
        for u in [&alice, &bob, &carol] {
            assert_eq!(store.get_user(&u.user_id).await.expect("get").as_ref(), Some(u));
        }
        assert_eq!(store.list_users().await.expect("list"), vec![alice.clone(), bob.clone(), carol.clone()]);

        let get = async |user_id: &str| store.get_user(user_id).await.expect("get").expect("user exists");
        assert!(store.set_user_allowed_domains("bob", Some(&listed)).await.expect("set"));
        assert_eq!(get("bob").await, User { allowed_domains: Some(listed.clone()), ..bob.clone() });
        assert!(store.set_user_allowed_domains("bob", Some(&odd)).await.expect("set odd"));
        assert_eq!(get("bob").await.allowed_domains.as_ref(), Some(&odd));
        assert!(store.set_user_allowed_domains("bob", Some(&[])).await.expect("set empty"));
        assert_eq!(get("bob").await.allowed_domains, Some(Vec::new()));
        // Back to the global list; setting it twice is fine.
        for _ in 0..2 {
            assert!(store.set_user_allowed_domains("bob", None).await.expect("reset"));
            assert_eq!(get("bob").await, bob);
        }
        // Only that user changes.
        assert_eq!(get("alice").await, alice);
        assert_eq!(get("carol").await, carol);
        assert!(store.set_user_allowed_domains("alice", None).await.expect("reset alice"));
        assert_eq!(get("alice").await.allowed_domains, None);

        // Other updates keep the list, and authentication returns it.
        assert!(store.set_user_allowed_domains("bob", Some(&listed)).await.expect("set"));
        assert_eq!(store.assign_uid("bob", (1000, 2000)).await.expect("assign"), Some(1001));
        store.create_token(&token("tok-1", "bob", "hash-1", None, t)).await.expect("create token");
        let (_, authenticated) =
            store.authenticate_token("hash-1", t + micros(5)).await.expect("authenticate").expect("live token");
        assert_eq!(authenticated.allowed_domains.as_ref(), Some(&listed));

        // A deleted user's list goes with them.
        assert!(store.delete_user("bob").await.expect("delete"));
        store.create_user(&user("bob", Role::User, t, None)).await.expect("recreate");
        assert_eq!(get("bob").await.allowed_domains, None);

        // The serialised form always has the field; JSON without it reads
        // as the global list.
        let json = serde_json::to_value(&bob).expect("serialise");
        assert_eq!(json["allowed_domains"], Value::Null);
        let mut old = serde_json::to_value(&alice).expect("serialise");
        assert_eq!(old["allowed_domains"], json!(listed));
        old.as_object_mut().expect("object").remove("allowed_domains");
        let read: User = serde_json::from_value(old).expect("deserialise without allowed_domains");
        assert_eq!(read, User { allowed_domains: None, ..alice.clone() });
    }

    pub async fn set_allowed_domains_of_unknown_user(store: &dyn Store) {
        let list = domains(&["example.com"]);
        assert!(!store.set_user_allowed_domains("alice", Some(&list)).await.expect("set unknown"));
        assert!(!store.set_user_allowed_domains("alice", None).await.expect("reset unknown"));
        assert_eq!(store.get_user("alice").await.expect("get"), None);
        assert_eq!(store.count_users().await.expect("count"), 0);
        // Ids are exact: neither case nor a prefix matches.
        create_users(store, &["alice"]).await;
        for other in ["ALICE", "alic", "alice ", "alice%", ""] {
            assert!(!store.set_user_allowed_domains(other, Some(&list)).await.expect("set other"), "{other:?}");
        }
        assert_eq!(store.get_user("alice").await.expect("get").expect("alice").allowed_domains, None);
        assert!(!store.delete_user("ghost").await.expect("delete unknown"));
        assert!(!store.set_user_allowed_domains("ghost", Some(&list)).await.expect("set unknown"));
    }

    pub async fn egress_event_roundtrip(store: &dyn Store) {
        let t = base();
        let full = EgressEvent {
            event_id: "0f1d5c9e-2b7a-4e3f-9c1d-8a6b4e2f1c30".into(),
            user_id: "alice".into(),
            session_id: "5d0f6f3e-8f0b-4b8e-9d6c-2f1a7c3e9b10".into(),
            // Stored at microsecond precision: nanoseconds are truncated.
            at: t + TimeDelta::nanoseconds(123_456_789),
            method: "GET".into(),
            host: "ünïcödé.example".into(),
            port: 65_535,
            allowed: true,
            reason: Some("upstream unreachable: connection refused — \"try later\"".into()),
        };
        let refused = EgressEvent {
            host: "2001:db8::1".into(),
            port: 0,
            ..refused_event("e-refused", "alice", "a session id with spaces", t - TimeDelta::days(400) + micros(1))
        };
        let empty = EgressEvent {
            method: String::new(),
            host: String::new(),
            port: i32::MAX,
            reason: Some(String::new()),
            ..egress_event("e-empty", "bob", "", t + TimeDelta::milliseconds(5))
        };
        record_events(store, &[full.clone(), refused.clone(), empty.clone()]).await;

        let full_stored = EgressEvent { at: t + micros(123_456), ..full.clone() };
        assert_eq!(
            list_events(store, None, None, None).await,
            vec![full_stored.clone(), empty.clone(), refused.clone()]
        );
        assert_eq!(list_events(store, Some("alice"), Some(&full.session_id), None).await, vec![full_stored.clone()]);
        assert_eq!(list_events(store, None, Some("a session id with spaces"), None).await, vec![refused.clone()]);
        assert_eq!(list_events(store, Some("bob"), Some(""), Some(true)).await, vec![empty]);
        assert_eq!(list_events(store, None, None, Some(false)).await, vec![refused]);

        // The serialised form has every field.
        let json = serde_json::to_value(&full_stored).expect("serialise");
        assert_eq!(json["allowed"], json!(true));
        assert_eq!(json["port"], json!(65_535));
        assert_eq!(serde_json::from_value::<EgressEvent>(json).expect("deserialise"), full_stored);
    }

    pub async fn egress_event_with_nul_is_rejected(store: &dyn Store) {
        let t = base();
        let good = egress_event("e-1", "alice", "s-1", t);
        let bad = [
            EgressEvent { host: "pypi.org\u{0}".into(), ..good.clone() },
            EgressEvent { reason: Some("\u{0}".into()), ..good.clone() },
            EgressEvent { method: "CON\u{0}NECT".into(), ..good.clone() },
            EgressEvent { session_id: "s-1\u{0}".into(), ..good.clone() },
            EgressEvent { user_id: "\u{0}alice".into(), ..good.clone() },
            EgressEvent { event_id: "e-1\u{0}".into(), ..good.clone() },
        ];
        for event in &bad {
            match store.record_egress_event(event).await {
                Err(StoreError::Internal(_)) => {}
                other => panic!("recording {event:?}: expected StoreError::Internal, got {other:?}"),
            }
        }
        assert!(list_events(store, None, None, None).await.is_empty(), "a rejected event was recorded");
        store.record_egress_event(&good).await.expect("record");
        assert_eq!(list_events(store, None, None, None).await, vec![good]);
    }

    pub async fn duplicate_egress_event_conflicts(store: &dyn Store) {
        let t = base();
        let original = egress_event("e-1", "alice", "s-1", t);
        store.record_egress_event(&original).await.expect("record");
        let clash = refused_event("e-1", "bob", "s-2", t + TimeDelta::seconds(1));
        assert_conflict(store.record_egress_event(&clash).await, "second egress event with the same id");
        assert_conflict(store.record_egress_event(&original).await, "the same egress event twice");
        assert_eq!(list_events(store, None, None, None).await, vec![original.clone()]);
        // Ids are case-sensitive, and independent of model request ids.
        store
            .record_egress_event(&egress_event("E-1", "alice", "s-1", t))
            .await
            .expect("record an id differing by case");
        store.record_model_request(&model_request("e-1", "alice", "s-1", t)).await.expect("record a model request");
        assert_eq!(event_ids(&list_events(store, None, None, None).await), ["e-1", "E-1"]);
    }

    pub async fn egress_events_list_filters(store: &dyn Store) {
        let t = base();
        let events = [
            egress_event("e-1", "alice", "a-1", t + TimeDelta::seconds(1)),
            refused_event("e-2", "alice", "a-2", t + TimeDelta::seconds(2)),
            egress_event("e-3", "alice", "a-1", t + TimeDelta::seconds(3)),
            refused_event("e-4", "bob", "b-1", t + TimeDelta::seconds(4)),
            // Another user's event in alice's session (shared id space).
            egress_event("e-5", "bob", "a-1", t + TimeDelta::seconds(5)),
            refused_event("e-6", "alice", "a-1", t),
            // Ids differing from the filters by case, prefix and suffix.
            egress_event("e-7", "Alice", "A-1", t + micros(7)),
            refused_event("e-8", "alice-2", "a-1 ", t + micros(8)),
            // Same `at`: ordered by id, bytewise, descending.
            egress_event("e-b", "alice", "a-2", t + micros(9)),
            refused_event("e-B", "alice", "a-2", t + micros(9)),
            egress_event("e-a", "alice", "a-2", t + micros(9)),
        ];
        // Recorded out of order.
        for i in [4, 9, 0, 10, 2, 6, 8, 1, 5, 3, 7] {
            store.record_egress_event(&events[i]).await.expect("record");
        }

        let check = async |user: Option<&str>, session: Option<&str>, allowed: Option<bool>| {
            let want = expected_events(&events, |e| {
                user.is_none_or(|u| e.user_id == u)
                    && session.is_none_or(|x| e.session_id == x)
                    && allowed.is_none_or(|a| e.allowed == a)
            });
            let got = list_events(store, user, session, allowed).await;
            assert_eq!(event_ids(&got), event_ids(&want), "user {user:?}, session {session:?}, allowed {allowed:?}");
            assert_eq!(got, want);
            for limit in [0_u32, 1, 2] {
                let page = store
                    .list_egress_events(&events_query(user, session, allowed, limit))
                    .await
                    .expect("list with a limit");
                assert_eq!(page, want[..want.len().min(limit as usize)], "user {user:?}, session {session:?}");
            }
            want.len()
        };
        assert_eq!(check(None, None, None).await, events.len());
        assert_eq!(check(None, None, Some(true)).await, 6);
        assert_eq!(check(None, None, Some(false)).await, 5);
        assert_eq!(check(Some("alice"), None, None).await, 7);
        assert_eq!(check(Some("alice"), None, Some(false)).await, 3);
        assert_eq!(check(Some("bob"), None, Some(true)).await, 1);
        assert_eq!(check(None, Some("a-1"), None).await, 4);
        assert_eq!(check(None, Some("a-1"), Some(false)).await, 1);
        assert_eq!(check(Some("alice"), Some("a-1"), Some(true)).await, 2);
        assert_eq!(check(Some("alice"), Some("a-2"), None).await, 4);
        assert_eq!(check(Some("bob"), Some("a-2"), None).await, 0);
        for (user, session) in [(Some("ALICE"), None), (Some("alice "), None), (None, Some("a-")), (None, Some("a-1%"))]
        {
            assert_eq!(check(user, session, None).await, 0, "user {user:?}, session {session:?}");
        }
        assert_eq!(
            event_ids(&list_events(store, Some("alice"), Some("a-2"), None).await),
            ["e-2", "e-b", "e-a", "e-B"]
        );
        // Model requests are another log.
        assert!(list_requests(store, None, None).await.is_empty());
    }

    pub async fn egress_events_pagination(store: &dyn Store) {
        let t = base();
        let users = ["alice", "bob"];
        // Several rows share each `at`; ids are not in time order.
        let events: Vec<EgressEvent> = (0..30_i64)
            .map(|i| {
                let at = match i % 5 {
                    0 => t,
                    1 => t + micros(1),
                    2 => t + TimeDelta::milliseconds(1),
                    3 => t + TimeDelta::seconds(1) + micros(999_999),
                    _ => t - TimeDelta::days(1),
                };
                let id = format!("ev-{:02}", (i * 7) % 30);
                let user = users[(i % 2) as usize];
                if i % 3 == 0 { refused_event(&id, user, "s-1", at) } else { egress_event(&id, user, "s-1", at) }
            })
            .collect();
        record_events(store, &events).await;

        for user in [None, Some("alice"), Some("bob")] {
            for allowed in [None, Some(true), Some(false)] {
                let want = expected_events(&events, |e| {
                    user.is_none_or(|u| e.user_id == u) && allowed.is_none_or(|a| e.allowed == a)
                });
                assert!(!want.is_empty());
                for limit in [1_u32, 2, 3, 4, 7, 29, 30, 31] {
                    let walked = walk_events(store, user, allowed, limit).await;
                    assert_eq!(
                        event_ids(&walked),
                        event_ids(&want),
                        "user {user:?}, allowed {allowed:?}, pages of {limit}"
                    );
                }
            }
        }

        // `before` is exclusive on (at, event_id), and a cursor finer than
        // microseconds means the same on every backend.
        let cursors = [
            (t + micros(1), "ev-10".to_owned()),
            (t + micros(1), String::new()),
            (t + micros(1), "~".to_owned()),
            (t + micros(1) + TimeDelta::nanoseconds(1), String::new()),
            (t + micros(1) - TimeDelta::nanoseconds(1), "~".to_owned()),
            (t + TimeDelta::nanoseconds(999), "ev-00".to_owned()),
            (t - TimeDelta::days(2), "~".to_owned()),
            (t + TimeDelta::days(1), String::new()),
        ];
        for before in cursors {
            for (user, allowed) in [(None, None), (Some("bob"), None), (None, Some(false)), (Some("alice"), Some(true))]
            {
                let want = expected_events(&events, |e| {
                    user.is_none_or(|u| e.user_id == u)
                        && allowed.is_none_or(|a| e.allowed == a)
                        && (e.at < before.0 || (e.at == before.0 && e.event_id < before.1))
                });
                let query = EgressEventQuery { before: Some(before.clone()), ..events_query(user, None, allowed, 100) };
                let got = store.list_egress_events(&query).await.expect("list before");
                assert_eq!(event_ids(&got), event_ids(&want), "before {before:?}, user {user:?}, allowed {allowed:?}");
            }
        }
    }

    pub async fn delete_user_removes_egress_events(store: &dyn Store) {
        let t = base();
        create_users(store, &["alice", "bob"]).await;
        create_sessions(
            store,
            &[session("a-1", "alice", t, SessionStatus::Active), session("b-1", "bob", t, SessionStatus::Active)],
        )
        .await;
        let alice = [
            egress_event("a-e1", "alice", "a-1", t),
            refused_event("a-e2", "alice", "a-1", t + micros(1)),
            egress_event("a-e3", "alice", "b-1", t + micros(2)),
        ];
        let others = [
            egress_event("b-e1", "bob", "b-1", t),
            refused_event("b-e2", "bob", "a-1", t + micros(3)),
            // Not users: recorded all the same, and not alice's.
            egress_event("c-e1", "carol", "c-1", t),
            egress_event("x-e1", "Alice", "a-1", t),
            refused_event("x-e2", "alice-2", "a-1", t),
        ];
        record_events(store, &alice).await;
        record_events(store, &others).await;
        // Deleting a session keeps its events.
        assert!(store.set_session_status("a-1", SessionStatus::Deleted, t).await.expect("delete session"));
        assert_eq!(list_events(store, None, Some("a-1"), None).await.len(), 5);

        assert!(store.delete_user("alice").await.expect("delete alice"));
        assert!(list_events(store, Some("alice"), None, None).await.is_empty(), "a deleted user's events linger");
        assert_eq!(list_events(store, None, None, None).await, expected_events(&others, |_| true));

        // An unknown user changes nothing, even with recorded events.
        assert!(!store.delete_user("carol").await.expect("delete unknown"));
        assert_eq!(list_events(store, Some("carol"), None, None).await, vec![others[2].clone()]);

        // The id can be reused: the new alice starts with no events, and her
        // old event ids are free again.
        create_users(store, &["alice"]).await;
        assert!(list_events(store, Some("alice"), None, None).await.is_empty());
        record_events(store, &alice[..1]).await;
        assert_eq!(list_events(store, Some("alice"), None, None).await, vec![alice[0].clone()]);
    }
}

/// SQLite only: what the database's files are left at.
mod sqlite_file {
    use super::*;

    #[tokio::test]
    async fn after_a_huge_turn_the_wal_file_shrinks_back_to_its_limit() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("store.db");
        let store = store::open(&StoreLocation::Sqlite(path.clone())).await.expect("open");
        create_users(store.as_ref(), &["alice"]).await;
        create_sessions(store.as_ref(), &[session("s-1", "alice", Utc::now(), SessionStatus::Active)]).await;
        let wal_size = || std::fs::metadata(dir.path().join("store.db-wal")).map(|m| m.len()).unwrap_or(0);
        let limit = store::SQLITE_WAL_SIZE_LIMIT;
        // A reply of 1.5 × the limit, stored twice as the CLI writes it.
        let big = "x".repeat(usize::try_from(limit).expect("limit") * 3 / 2);
        let messages = [
            message("assistant", json!({"type": "assistant", "text": big})),
            message("result", json!({"type": "result", "result": big})),
        ];
        store.store_turn("s-1", Utc::now(), &messages, Some(&UsageTotals::default())).await.expect("big turn");
        assert!(wal_size() > 2 * limit, "the WAL holds the turn: {} bytes", wal_size());
        // The big commit checkpointed the WAL; the next write starts it over
        // and cuts the file back.
        let small = [message("user", json!({"type": "user", "text": "next"}))];
        store.store_turn("s-1", Utc::now(), &small, Some(&UsageTotals::default())).await.expect("small turn");
        assert!(wal_size() <= limit, "the WAL file stayed at {} bytes (limit {limit})", wal_size());
        let stored = store.list_messages("s-1", 0, 10).await.expect("list");
        assert_eq!(stored.len(), 3);
        assert_eq!(stored[1].content["result"].as_str().map(str::len), Some(big.len()));
    }
}
