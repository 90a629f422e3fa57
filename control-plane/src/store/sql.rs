//! The SQL implementation of [`Store`], shared by SQLite and PostgreSQL.
//!
//! Every query is written once, in the subset both databases speak: `$N`
//! placeholders (sqlx binds them by number on SQLite too), `RETURNING`,
//! `ON CONFLICT`, and types that sqlx maps on both (`DateTime<Utc>`, JSON,
//! `i64`, `f64`, text). The macro stamps the implementation onto each
//! backend's store type, because sqlx's executor traits are per database and
//! a generic `impl<DB>` would need a page of trait bounds.

use chrono::{DateTime, Utc};
use sqlx::types::Json;

use super::{
    ApiToken, EgressEvent, EgressEventQuery, ModelRequest, ModelRequestQuery, Role, Session, SessionOptions,
    SessionStatus, StoreError, StoreResult, StoredMessage, UsageTotals, User,
};

/// How long a token's `last_used_at` may lag: updating it on every request
/// would turn every authenticated read into a write.
pub(super) const LAST_USED_GRANULARITY: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

pub(super) const USER_COLUMNS: &str = "user_id, role, created_at, uid, allowed_domains";
pub(super) const TOKEN_COLUMNS: &str = "token_id, user_id, token_hash, label, created_at, expires_at, last_used_at";
pub(super) const SESSION_COLUMNS: &str = "session_id, user_id, subdir, cwd, options, metadata, status, created_at, \
     last_active_at, message_count, cli_session_id, input_tokens, output_tokens, cache_read_tokens, \
     cache_creation_tokens, total_cost_usd";

#[derive(sqlx::FromRow)]
pub(super) struct UserRow {
    user_id: String,
    role: String,
    created_at: DateTime<Utc>,
    uid: Option<i64>,
    /// JSON text (an array of strings), NULL for the global list.
    allowed_domains: Option<String>,
}

impl UserRow {
    pub(super) fn into_user(self) -> StoreResult<User> {
        let allowed_domains = match self.allowed_domains {
            Some(json) => Some(serde_json::from_str(&json).map_err(|e| {
                StoreError::Internal(format!("allowed domains of user {} in store are not JSON: {e}", self.user_id))
            })?),
            None => None,
        };
        Ok(User {
            user_id: self.user_id,
            role: Role::parse(&self.role)?,
            created_at: self.created_at,
            uid: self.uid,
            allowed_domains,
        })
    }
}

/// A user's allowed domains as stored: JSON text (TEXT on both backends,
/// like message content), NULL for none.
pub(super) fn allowed_domains_json(domains: Option<&[String]>) -> StoreResult<Option<String>> {
    domains
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| StoreError::Internal(format!("cannot serialise allowed domains: {e}")))
}

#[derive(sqlx::FromRow)]
pub(super) struct TokenRow {
    token_id: String,
    user_id: String,
    token_hash: String,
    label: Option<String>,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
}

impl From<TokenRow> for ApiToken {
    fn from(row: TokenRow) -> Self {
        Self {
            token_id: row.token_id,
            user_id: row.user_id,
            token_hash: row.token_hash,
            label: row.label,
            created_at: row.created_at,
            expires_at: row.expires_at,
            last_used_at: row.last_used_at,
        }
    }
}

/// A token with its user, read in one query when a request authenticates.
pub(super) const AUTHENTICATE_SQL: &str = "SELECT t.token_id, t.user_id, t.token_hash, t.label, t.created_at, \
     t.expires_at, t.last_used_at, u.role AS user_role, u.created_at AS user_created_at, u.uid AS user_uid, \
     u.allowed_domains AS user_allowed_domains \
     FROM api_tokens t JOIN users u ON u.user_id = t.user_id \
     WHERE t.token_hash = $1 AND (t.expires_at IS NULL OR t.expires_at > $2)";

#[derive(sqlx::FromRow)]
pub(super) struct AuthenticatedRow {
    #[sqlx(flatten)]
    token: TokenRow,
    user_role: String,
    user_created_at: DateTime<Utc>,
    user_uid: Option<i64>,
    user_allowed_domains: Option<String>,
}

impl AuthenticatedRow {
    pub(super) fn into_token_and_user(self) -> StoreResult<(ApiToken, User)> {
        let user = UserRow {
            user_id: self.token.user_id.clone(),
            role: self.user_role,
            created_at: self.user_created_at,
            uid: self.user_uid,
            allowed_domains: self.user_allowed_domains,
        }
        .into_user()?;
        Ok((self.token.into(), user))
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct SessionRow {
    session_id: String,
    user_id: String,
    subdir: Option<String>,
    cwd: String,
    options: Json<SessionOptions>,
    metadata: Json<serde_json::Map<String, serde_json::Value>>,
    status: String,
    created_at: DateTime<Utc>,
    last_active_at: DateTime<Utc>,
    message_count: i64,
    cli_session_id: Option<String>,
    input_tokens: i64,
    output_tokens: i64,
    cache_read_tokens: i64,
    cache_creation_tokens: i64,
    total_cost_usd: f64,
}

impl SessionRow {
    pub(super) fn into_session(self) -> StoreResult<Session> {
        Ok(Session {
            session_id: self.session_id,
            user_id: self.user_id,
            subdir: self.subdir,
            cwd: self.cwd,
            options: self.options.0,
            metadata: self.metadata.0,
            status: SessionStatus::parse(&self.status)?,
            created_at: self.created_at,
            last_active_at: self.last_active_at,
            message_count: self.message_count,
            cli_session_id: self.cli_session_id,
            usage: UsageTotals {
                input_tokens: self.input_tokens,
                output_tokens: self.output_tokens,
                cache_read_tokens: self.cache_read_tokens,
                cache_creation_tokens: self.cache_creation_tokens,
                total_cost_usd: self.total_cost_usd,
            },
        })
    }
}

/// A history entry as stored. `content` is JSON text (TEXT on both backends:
/// PostgreSQL's JSONB rejects `\u0000` and rewrites the text).
#[derive(sqlx::FromRow)]
pub(super) struct MessageRow {
    seq: i64,
    kind: String,
    content: String,
    created_at: DateTime<Utc>,
}

impl MessageRow {
    pub(super) fn into_message(self) -> StoreResult<StoredMessage> {
        let content = serde_json::from_str(&self.content)
            .map_err(|e| StoreError::Internal(format!("message {} in store is not JSON: {e}", self.seq)))?;
        Ok(StoredMessage { seq: self.seq, kind: self.kind, content, created_at: self.created_at })
    }
}

/// Messages per INSERT statement: 5 bound parameters each, far below
/// SQLite's 32,766 and PostgreSQL's 65,535 per statement.
pub(super) const INSERT_BATCH_ROWS: usize = 500;

pub(super) const MODEL_REQUEST_COLUMNS: &str = "request_id, user_id, session_id, at, method, path, model, status, \
     input_tokens, output_tokens, cache_read_tokens, cache_creation_tokens, total_cost_usd, duration_ms, tool_calls, \
     refusal";

/// A model request as stored. `tool_calls` is JSON text (TEXT on both
/// backends, like message content).
#[derive(sqlx::FromRow)]
pub(super) struct ModelRequestRow {
    request_id: String,
    user_id: String,
    session_id: String,
    at: DateTime<Utc>,
    method: String,
    path: String,
    model: Option<String>,
    status: i32,
    input_tokens: i64,
    output_tokens: i64,
    cache_read_tokens: i64,
    cache_creation_tokens: i64,
    total_cost_usd: f64,
    duration_ms: i64,
    tool_calls: String,
    refusal: Option<String>,
}

impl ModelRequestRow {
    pub(super) fn into_model_request(self) -> StoreResult<ModelRequest> {
        let tool_calls = serde_json::from_str(&self.tool_calls).map_err(|e| {
            StoreError::Internal(format!("tool calls of model request {} in store are not JSON: {e}", self.request_id))
        })?;
        Ok(ModelRequest {
            request_id: self.request_id,
            user_id: self.user_id,
            session_id: self.session_id,
            at: self.at,
            method: self.method,
            path: self.path,
            model: self.model,
            status: self.status,
            usage: UsageTotals {
                input_tokens: self.input_tokens,
                output_tokens: self.output_tokens,
                cache_read_tokens: self.cache_read_tokens,
                cache_creation_tokens: self.cache_creation_tokens,
                total_cost_usd: self.total_cost_usd,
            },
            duration_ms: self.duration_ms,
            tool_calls,
            refusal: self.refusal,
        })
    }
}

/// A model request's tool calls as stored.
pub(super) fn model_request_tool_calls(request: &ModelRequest) -> StoreResult<String> {
    serde_json::to_string(&request.tool_calls)
        .map_err(|e| StoreError::Internal(format!("cannot serialise tool calls: {e}")))
}

/// The aggregates of a set of model requests, selected as [`UsageSums`]:
/// request count and summed usage. PostgreSQL sums BIGINT as NUMERIC (cast
/// back, failing on overflow like SQLite's integer sum); an empty set sums
/// to zero.
pub(super) const USAGE_SUMS: &str = "COUNT(*), CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT), \
     CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT), CAST(COALESCE(SUM(cache_read_tokens), 0) AS BIGINT), \
     CAST(COALESCE(SUM(cache_creation_tokens), 0) AS BIGINT), COALESCE(SUM(total_cost_usd), 0.0)";

/// The columns of [`USAGE_SUMS`].
pub(super) type UsageSums = (i64, i64, i64, i64, i64, f64);

pub(super) fn usage_sums((count, input, output, cache_read, cache_creation, cost): UsageSums) -> (i64, UsageTotals) {
    let usage = UsageTotals {
        input_tokens: input,
        output_tokens: output,
        cache_read_tokens: cache_read,
        cache_creation_tokens: cache_creation,
        total_cost_usd: cost,
    };
    (count, usage)
}

pub(super) const EGRESS_EVENT_COLUMNS: &str = "event_id, user_id, session_id, at, method, host, port, allowed, reason";

/// An egress event as stored (`allowed` is BOOLEAN on PostgreSQL, 0/1 on
/// SQLite).
#[derive(sqlx::FromRow)]
pub(super) struct EgressEventRow {
    event_id: String,
    user_id: String,
    session_id: String,
    at: DateTime<Utc>,
    method: String,
    host: String,
    port: i32,
    allowed: bool,
    reason: Option<String>,
}

impl From<EgressEventRow> for EgressEvent {
    fn from(row: EgressEventRow) -> Self {
        Self {
            event_id: row.event_id,
            user_id: row.user_id,
            session_id: row.session_id,
            at: row.at,
            method: row.method,
            host: row.host,
            port: row.port,
            allowed: row.allowed,
            reason: row.reason,
        }
    }
}

/// The `WHERE` clause of a newest-first `(at, id_column)` listing (model
/// requests, egress events) and the values to bind to its `$1..`, in order:
/// only the filters given, so that each shape of the query is one plan that
/// uses its index.
fn listing_filter<'a>(
    id_column: &str,
    user_id: Option<&'a str>,
    session_id: Option<&'a str>,
    allowed: Option<bool>,
    before: Option<&'a (DateTime<Utc>, String)>,
) -> (String, Vec<ListingBind<'a>>) {
    let mut conditions = Vec::new();
    let mut binds = Vec::new();
    if let Some(user_id) = user_id {
        binds.push(ListingBind::Text(user_id));
        conditions.push(format!("user_id = ${}", binds.len()));
    }
    if let Some(session_id) = session_id {
        binds.push(ListingBind::Text(session_id));
        conditions.push(format!("session_id = ${}", binds.len()));
    }
    if let Some(allowed) = allowed {
        binds.push(ListingBind::Bool(allowed));
        conditions.push(format!("allowed = ${}", binds.len()));
    }
    if let Some(before) = before {
        let (at, id) = super::listing_cursor(before);
        binds.push(ListingBind::At(at));
        binds.push(ListingBind::Text(id));
        conditions.push(format!("(at, {id_column}) < (${}, ${})", binds.len() - 1, binds.len()));
    }
    let clause = if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
    (clause, binds)
}

/// The `WHERE` clause of a model request listing and its binds (see
/// [`listing_filter`]).
pub(super) fn model_request_filter(query: &ModelRequestQuery) -> (String, Vec<ListingBind<'_>>) {
    let (user_id, session_id) = (query.user_id.as_deref(), query.session_id.as_deref());
    listing_filter("request_id", user_id, session_id, None, query.before.as_ref())
}

/// The `WHERE` clause of an egress event listing and its binds (see
/// [`listing_filter`]).
pub(super) fn egress_event_filter(query: &EgressEventQuery) -> (String, Vec<ListingBind<'_>>) {
    let (user_id, session_id) = (query.user_id.as_deref(), query.session_id.as_deref());
    listing_filter("event_id", user_id, session_id, query.allowed, query.before.as_ref())
}

/// A value bound by [`listing_filter`]'s clause.
pub(super) enum ListingBind<'a> {
    Text(&'a str),
    At(DateTime<Utc>),
    Bool(bool),
}

/// Up to three statuses as separate binds (`status IN ($a, $b, $c)`), padded
/// with NULL, which never matches.
pub(super) fn status_binds(statuses: &[SessionStatus]) -> [Option<&'static str>; 3] {
    let mut binds = [None; 3];
    for (slot, status) in binds.iter_mut().zip(statuses) {
        *slot = Some(status.as_str());
    }
    binds
}

/// Implements [`Store`](super::Store) for a struct with a `pool:
/// sqlx::Pool<$db>` field.
macro_rules! impl_sql_store {
    ($store:ty, $db:ty, $kind:expr) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            fn kind(&self) -> $crate::config::StorageKind {
                $kind
            }

            async fn ping(&self) -> $crate::store::StoreResult<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn create_user(&self, user: &$crate::store::User) -> $crate::store::StoreResult<()> {
                let allowed_domains = $crate::store::sql::allowed_domains_json(user.allowed_domains.as_deref())?;
                sqlx::query(
                    "INSERT INTO users (user_id, role, created_at, uid, allowed_domains) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&user.user_id)
                .bind(user.role.as_str())
                .bind(user.created_at)
                .bind(user.uid)
                .bind(allowed_domains)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn get_user(&self, user_id: &str) -> $crate::store::StoreResult<Option<$crate::store::User>> {
                let sql = format!("SELECT {} FROM users WHERE user_id = $1", $crate::store::sql::USER_COLUMNS);
                sqlx::query_as::<_, $crate::store::sql::UserRow>(&sql)
                    .bind(user_id)
                    .fetch_optional(&self.pool)
                    .await?
                    .map($crate::store::sql::UserRow::into_user)
                    .transpose()
            }

            async fn list_users(&self) -> $crate::store::StoreResult<Vec<$crate::store::User>> {
                let sql = format!("SELECT {} FROM users ORDER BY user_id", $crate::store::sql::USER_COLUMNS);
                sqlx::query_as::<_, $crate::store::sql::UserRow>(&sql)
                    .fetch_all(&self.pool)
                    .await?
                    .into_iter()
                    .map($crate::store::sql::UserRow::into_user)
                    .collect()
            }

            async fn count_users(&self) -> $crate::store::StoreResult<u64> {
                let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM users").fetch_one(&self.pool).await?;
                Ok(count as u64)
            }

            async fn delete_user(&self, user_id: &str) -> $crate::store::StoreResult<bool> {
                let mut tx = self.pool.begin().await?;
                sqlx::query("DELETE FROM api_tokens WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
                let deleted =
                    sqlx::query("DELETE FROM users WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
                if deleted.rows_affected() == 0 {
                    // Unknown user: change nothing, like the memory store.
                    tx.rollback().await?;
                    return Ok(false);
                }
                // Marking the sessions first locks them against appends (which
                // update the session row before inserting), so none slips
                // between this and the purge.
                sqlx::query("UPDATE sessions SET status = 'deleted' WHERE user_id = $1")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "DELETE FROM messages WHERE session_id IN (SELECT session_id FROM sessions WHERE user_id = $1)",
                )
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM model_requests WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
                sqlx::query("DELETE FROM egress_events WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn set_user_allowed_domains(
                &self,
                user_id: &str,
                domains: Option<&[String]>,
            ) -> $crate::store::StoreResult<bool> {
                let allowed_domains = $crate::store::sql::allowed_domains_json(domains)?;
                let result = sqlx::query("UPDATE users SET allowed_domains = $1 WHERE user_id = $2")
                    .bind(allowed_domains)
                    .bind(user_id)
                    .execute(&self.pool)
                    .await?;
                Ok(result.rows_affected() > 0)
            }

            async fn assign_uid(&self, user_id: &str, range: (i64, i64)) -> $crate::store::StoreResult<Option<i64>> {
                // Lowest free uid above the highest taken one; the UNIQUE
                // index settles a race between two servers (retry, with
                // jitter so the losers do not collide again).
                for attempt in 0..50u64 {
                    if attempt > 0 {
                        let jitter = rand::random::<u64>() % (1 + attempt.min(10) * 2);
                        tokio::time::sleep(std::time::Duration::from_millis(jitter)).await;
                    }
                    let Some((current,)): Option<(Option<i64>,)> =
                        sqlx::query_as("SELECT uid FROM users WHERE user_id = $1")
                            .bind(user_id)
                            .fetch_optional(&self.pool)
                            .await?
                    else {
                        return Ok(None);
                    };
                    if current.is_some() {
                        return Ok(current);
                    }
                    let (next,): (i64,) = sqlx::query_as(
                        "SELECT COALESCE(MAX(uid) + 1, $1) FROM users WHERE uid BETWEEN $1 AND $2",
                    )
                    .bind(range.0)
                    .bind(range.1)
                    .fetch_one(&self.pool)
                    .await?;
                    if next > range.1 {
                        return Err($crate::store::StoreError::Unavailable(format!(
                            "uid range {}-{} exhausted",
                            range.0, range.1
                        )));
                    }
                    let updated = sqlx::query("UPDATE users SET uid = $1 WHERE user_id = $2 AND uid IS NULL")
                        .bind(next)
                        .bind(user_id)
                        .execute(&self.pool)
                        .await;
                    match updated {
                        Ok(_) => continue,
                        Err(sqlx::Error::Database(db)) if db.is_unique_violation() => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Err($crate::store::StoreError::Unavailable("could not allocate a uid (contention)".into()))
            }

            async fn create_token(&self, token: &$crate::store::ApiToken) -> $crate::store::StoreResult<()> {
                sqlx::query(
                    "INSERT INTO api_tokens (token_id, user_id, token_hash, label, created_at, expires_at, last_used_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&token.token_id)
                .bind(&token.user_id)
                .bind(&token.token_hash)
                .bind(&token.label)
                .bind(token.created_at)
                .bind(token.expires_at)
                .bind(token.last_used_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn authenticate_token(
                &self,
                token_hash: &str,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::store::StoreResult<Option<($crate::store::ApiToken, $crate::store::User)>> {
                // One query for the token and its user: every request runs it.
                let Some(row) = sqlx::query_as::<_, $crate::store::sql::AuthenticatedRow>(
                    $crate::store::sql::AUTHENTICATE_SQL,
                )
                .bind(token_hash)
                .bind(at)
                .fetch_optional(&self.pool)
                .await?
                else {
                    return Ok(None);
                };
                let (mut token, user) = row.into_token_and_user()?;
                if token.last_used_at.is_none_or(|t| at - t >= $crate::store::sql::LAST_USED_GRANULARITY) {
                    sqlx::query("UPDATE api_tokens SET last_used_at = $1 WHERE token_id = $2")
                        .bind(at)
                        .bind(&token.token_id)
                        .execute(&self.pool)
                        .await?;
                    token.last_used_at = Some(at);
                }
                Ok(Some((token, user)))
            }

            async fn list_tokens(&self, user_id: &str) -> $crate::store::StoreResult<Vec<$crate::store::ApiToken>> {
                let sql = format!(
                    "SELECT {} FROM api_tokens WHERE user_id = $1 ORDER BY created_at, token_id",
                    $crate::store::sql::TOKEN_COLUMNS
                );
                Ok(sqlx::query_as::<_, $crate::store::sql::TokenRow>(&sql)
                    .bind(user_id)
                    .fetch_all(&self.pool)
                    .await?
                    .into_iter()
                    .map(Into::into)
                    .collect())
            }

            async fn get_token(&self, token_id: &str) -> $crate::store::StoreResult<Option<$crate::store::ApiToken>> {
                let sql = format!("SELECT {} FROM api_tokens WHERE token_id = $1", $crate::store::sql::TOKEN_COLUMNS);
                Ok(sqlx::query_as::<_, $crate::store::sql::TokenRow>(&sql)
                    .bind(token_id)
                    .fetch_optional(&self.pool)
                    .await?
                    .map(Into::into))
            }

            async fn delete_token(&self, token_id: &str) -> $crate::store::StoreResult<bool> {
                let result =
                    sqlx::query("DELETE FROM api_tokens WHERE token_id = $1").bind(token_id).execute(&self.pool).await?;
                Ok(result.rows_affected() > 0)
            }

            async fn delete_tokens_by_label(
                &self,
                user_id: &str,
                label: &str,
                keep: &str,
            ) -> $crate::store::StoreResult<u64> {
                let result =
                    sqlx::query("DELETE FROM api_tokens WHERE user_id = $1 AND label = $2 AND token_id <> $3")
                        .bind(user_id)
                        .bind(label)
                        .bind(keep)
                        .execute(&self.pool)
                        .await?;
                Ok(result.rows_affected())
            }

            async fn create_session(&self, session: &$crate::store::Session) -> $crate::store::StoreResult<()> {
                let sql = format!(
                    "INSERT INTO sessions ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
                    $crate::store::sql::SESSION_COLUMNS
                );
                sqlx::query(&sql)
                    .bind(&session.session_id)
                    .bind(&session.user_id)
                    .bind(&session.subdir)
                    .bind(&session.cwd)
                    .bind(sqlx::types::Json(&session.options))
                    .bind(sqlx::types::Json(&session.metadata))
                    .bind(session.status.as_str())
                    .bind(session.created_at)
                    .bind(session.last_active_at)
                    .bind(session.message_count)
                    .bind(&session.cli_session_id)
                    .bind(session.usage.input_tokens)
                    .bind(session.usage.output_tokens)
                    .bind(session.usage.cache_read_tokens)
                    .bind(session.usage.cache_creation_tokens)
                    .bind(session.usage.total_cost_usd)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn get_session(
                &self,
                session_id: &str,
            ) -> $crate::store::StoreResult<Option<$crate::store::Session>> {
                let sql =
                    format!("SELECT {} FROM sessions WHERE session_id = $1", $crate::store::sql::SESSION_COLUMNS);
                sqlx::query_as::<_, $crate::store::sql::SessionRow>(&sql)
                    .bind(session_id)
                    .fetch_optional(&self.pool)
                    .await?
                    .map($crate::store::sql::SessionRow::into_session)
                    .transpose()
            }

            async fn list_sessions(
                &self,
                query: &$crate::store::SessionQuery,
            ) -> $crate::store::StoreResult<Vec<$crate::store::Session>> {
                let sql = format!(
                    "SELECT {} FROM sessions \
                     WHERE ($1 IS NULL OR user_id = $1) AND status IN ($2, $3, $4) \
                       AND ($5 IS NULL OR created_at < $5 OR (created_at = $5 AND session_id < $6)) \
                     ORDER BY created_at DESC, session_id DESC LIMIT $7",
                    $crate::store::sql::SESSION_COLUMNS
                );
                let [s1, s2, s3] = $crate::store::sql::status_binds(&query.effective_statuses());
                sqlx::query_as::<_, $crate::store::sql::SessionRow>(&sql)
                    .bind(query.user_id.as_deref())
                    .bind(s1)
                    .bind(s2)
                    .bind(s3)
                    .bind(query.after.as_ref().map(|c| c.created_at))
                    .bind(query.after.as_ref().map(|c| c.session_id.as_str()).unwrap_or(""))
                    .bind(i64::from(query.limit))
                    .fetch_all(&self.pool)
                    .await?
                    .into_iter()
                    .map($crate::store::sql::SessionRow::into_session)
                    .collect()
            }

            async fn count_sessions(
                &self,
                user_id: Option<&str>,
                status: $crate::store::SessionStatus,
            ) -> $crate::store::StoreResult<u64> {
                let (count,): (i64,) =
                    sqlx::query_as("SELECT COUNT(*) FROM sessions WHERE ($1 IS NULL OR user_id = $1) AND status = $2")
                        .bind(user_id)
                        .bind(status.as_str())
                        .fetch_one(&self.pool)
                        .await?;
                Ok(count as u64)
            }

            async fn set_session_status(
                &self,
                session_id: &str,
                status: $crate::store::SessionStatus,
                at: chrono::DateTime<chrono::Utc>,
            ) -> $crate::store::StoreResult<bool> {
                // Reopening counts as activity, so the TTL starts again.
                const SQL: &str = "UPDATE sessions SET status = $1, \
                       last_active_at = CASE WHEN $1 = 'active' THEN $2 ELSE last_active_at END \
                     WHERE session_id = $3 AND status <> 'deleted'";
                if status != $crate::store::SessionStatus::Deleted {
                    let result =
                        sqlx::query(SQL).bind(status.as_str()).bind(at).bind(session_id).execute(&self.pool).await?;
                    return Ok(result.rows_affected() > 0);
                }
                // Deleting purges the history in the same transaction; the
                // update comes first and locks the row against appends.
                let mut tx = self.pool.begin().await?;
                let result =
                    sqlx::query(SQL).bind(status.as_str()).bind(at).bind(session_id).execute(&mut *tx).await?;
                if result.rows_affected() == 0 {
                    tx.rollback().await?;
                    return Ok(false);
                }
                sqlx::query("DELETE FROM messages WHERE session_id = $1").bind(session_id).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn touch_session(
                &self,
                session_id: &str,
                at: chrono::DateTime<chrono::Utc>,
                messages: i64,
            ) -> $crate::store::StoreResult<bool> {
                let result = sqlx::query(
                    "UPDATE sessions SET last_active_at = $1, message_count = message_count + $2 \
                     WHERE session_id = $3 AND status <> 'deleted'",
                )
                .bind(at)
                .bind(messages)
                .bind(session_id)
                .execute(&self.pool)
                .await?;
                Ok(result.rows_affected() > 0)
            }

            async fn expire_idle_sessions(
                &self,
                cutoff: chrono::DateTime<chrono::Utc>,
            ) -> $crate::store::StoreResult<Vec<String>> {
                let rows: Vec<(String,)> = sqlx::query_as(
                    "UPDATE sessions SET status = 'expired' WHERE status = 'active' AND last_active_at < $1 \
                     RETURNING session_id",
                )
                .bind(cutoff)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(|(id,)| id).collect())
            }

            async fn store_turn(
                &self,
                session_id: &str,
                at: chrono::DateTime<chrono::Utc>,
                messages: &[$crate::store::NewMessage],
                finished: Option<&$crate::store::UsageTotals>,
            ) -> $crate::store::StoreResult<()> {
                if messages.is_empty() && finished.is_none() {
                    return Ok(());
                }
                let at = chrono::SubsecRound::trunc_subsecs(at, 6);
                let count = i64::try_from(messages.len())
                    .map_err(|_| $crate::store::StoreError::Internal("too many messages".into()))?;
                // The session row's update is the transaction's first
                // statement and a write: it locks the row on PostgreSQL and
                // takes the database's write lock on SQLite (waiting like
                // BEGIN IMMEDIATE would), so concurrent turns of a session
                // run one after the other and their seq ranges never overlap.
                // One transaction per turn: one commit (one fsync) per turn.
                let mut tx = self.pool.begin().await?;
                let last: Option<(i64,)> = match finished {
                    None => sqlx::query_as(
                        "UPDATE sessions SET last_message_seq = last_message_seq + $1 \
                         WHERE session_id = $2 AND status <> 'deleted' RETURNING last_message_seq",
                    )
                    .bind(count)
                    .bind(session_id)
                    .fetch_optional(&mut *tx)
                    .await?,
                    Some(usage) => sqlx::query_as(
                        "UPDATE sessions SET last_message_seq = last_message_seq + $1, last_active_at = $3, \
                           message_count = message_count + 1, input_tokens = input_tokens + $4, \
                           output_tokens = output_tokens + $5, cache_read_tokens = cache_read_tokens + $6, \
                           cache_creation_tokens = cache_creation_tokens + $7, \
                           total_cost_usd = total_cost_usd + $8 \
                         WHERE session_id = $2 AND status <> 'deleted' RETURNING last_message_seq",
                    )
                    .bind(count)
                    .bind(session_id)
                    .bind(at)
                    .bind(usage.input_tokens)
                    .bind(usage.output_tokens)
                    .bind(usage.cache_read_tokens)
                    .bind(usage.cache_creation_tokens)
                    .bind(usage.total_cost_usd)
                    .fetch_optional(&mut *tx)
                    .await?,
                };
                let Some((last,)) = last else {
                    tx.rollback().await?;
                    return Err($crate::store::no_session_for_turn(session_id));
                };
                let rows: Vec<_> = messages.iter().zip(last - count + 1..).collect();
                // Multi-row INSERTs: one statement (one trip to the database)
                // for a usual turn, well under either backend's limit on bound
                // parameters per statement.
                for batch in rows.chunks($crate::store::sql::INSERT_BATCH_ROWS) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO messages (session_id, seq, kind, content, created_at) ",
                    );
                    insert.push_values(batch, |mut row, (message, seq)| {
                        row.push_bind(session_id)
                            .push_bind(*seq)
                            .push_bind(message.kind.as_str())
                            .push_bind(message.content.as_str())
                            .push_bind(at);
                    });
                    insert.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn list_messages(
                &self,
                session_id: &str,
                after_seq: i64,
                limit: u32,
            ) -> $crate::store::StoreResult<Vec<$crate::store::StoredMessage>> {
                sqlx::query_as::<_, $crate::store::sql::MessageRow>(
                    "SELECT seq, kind, content, created_at FROM messages WHERE session_id = $1 AND seq > $2 \
                     ORDER BY seq LIMIT $3",
                )
                .bind(session_id)
                .bind(after_seq)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .map($crate::store::sql::MessageRow::into_message)
                .collect()
            }

            async fn record_model_request(
                &self,
                request: &$crate::store::ModelRequest,
            ) -> $crate::store::StoreResult<()> {
                $crate::store::check_model_request(request)?;
                let tool_calls = $crate::store::sql::model_request_tool_calls(request)?;
                let sql = format!(
                    "INSERT INTO model_requests ({}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
                    $crate::store::sql::MODEL_REQUEST_COLUMNS
                );
                sqlx::query(&sql)
                    .bind(&request.request_id)
                    .bind(&request.user_id)
                    .bind(&request.session_id)
                    .bind(chrono::SubsecRound::trunc_subsecs(request.at, 6))
                    .bind(&request.method)
                    .bind(&request.path)
                    .bind(&request.model)
                    .bind(request.status)
                    .bind(request.usage.input_tokens)
                    .bind(request.usage.output_tokens)
                    .bind(request.usage.cache_read_tokens)
                    .bind(request.usage.cache_creation_tokens)
                    .bind(request.usage.total_cost_usd)
                    .bind(request.duration_ms)
                    .bind(tool_calls)
                    .bind(&request.refusal)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn list_model_requests(
                &self,
                query: &$crate::store::ModelRequestQuery,
            ) -> $crate::store::StoreResult<Vec<$crate::store::ModelRequest>> {
                let (filter, binds) = $crate::store::sql::model_request_filter(query);
                let sql = format!(
                    "SELECT {} FROM model_requests {filter} ORDER BY at DESC, request_id DESC LIMIT ${}",
                    $crate::store::sql::MODEL_REQUEST_COLUMNS,
                    binds.len() + 1
                );
                let mut select = sqlx::query_as::<_, $crate::store::sql::ModelRequestRow>(&sql);
                for bind in binds {
                    select = match bind {
                        $crate::store::sql::ListingBind::Text(text) => select.bind(text),
                        $crate::store::sql::ListingBind::At(at) => select.bind(at),
                        $crate::store::sql::ListingBind::Bool(flag) => select.bind(flag),
                    };
                }
                select
                    .bind(i64::from(query.limit))
                    .fetch_all(&self.pool)
                    .await?
                    .into_iter()
                    .map($crate::store::sql::ModelRequestRow::into_model_request)
                    .collect()
            }

            async fn model_usage(
                &self,
                user_id: &str,
                since: Option<chrono::DateTime<chrono::Utc>>,
            ) -> $crate::store::StoreResult<(i64, $crate::store::UsageTotals)> {
                // Two statements rather than `$2 IS NULL OR ...`, so that each
                // is one range scan of the (user_id, at) index.
                let sums: $crate::store::sql::UsageSums = match since {
                    Some(since) => {
                        let sql = format!(
                            "SELECT {} FROM model_requests WHERE user_id = $1 AND at >= $2",
                            $crate::store::sql::USAGE_SUMS
                        );
                        sqlx::query_as(&sql)
                            .bind(user_id)
                            .bind($crate::store::micros_ceil(since))
                            .fetch_one(&self.pool)
                            .await?
                    }
                    None => {
                        let sql =
                            format!("SELECT {} FROM model_requests WHERE user_id = $1", $crate::store::sql::USAGE_SUMS);
                        sqlx::query_as(&sql).bind(user_id).fetch_one(&self.pool).await?
                    }
                };
                Ok($crate::store::sql::usage_sums(sums))
            }

            async fn model_usage_by_session(
                &self,
                user_id: &str,
            ) -> $crate::store::StoreResult<Vec<(String, i64, $crate::store::UsageTotals)>> {
                let sql = format!(
                    "SELECT session_id, {} FROM model_requests WHERE user_id = $1 \
                     GROUP BY session_id ORDER BY session_id",
                    $crate::store::sql::USAGE_SUMS
                );
                let rows: Vec<(String, i64, i64, i64, i64, i64, f64)> =
                    sqlx::query_as(&sql).bind(user_id).fetch_all(&self.pool).await?;
                Ok(rows
                    .into_iter()
                    .map(|(session_id, count, input, output, cache_read, cache_creation, cost)| {
                        let (count, usage) =
                            $crate::store::sql::usage_sums((count, input, output, cache_read, cache_creation, cost));
                        (session_id, count, usage)
                    })
                    .collect())
            }

            async fn record_egress_event(
                &self,
                event: &$crate::store::EgressEvent,
            ) -> $crate::store::StoreResult<()> {
                $crate::store::check_egress_event(event)?;
                let sql = format!(
                    "INSERT INTO egress_events ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    $crate::store::sql::EGRESS_EVENT_COLUMNS
                );
                sqlx::query(&sql)
                    .bind(&event.event_id)
                    .bind(&event.user_id)
                    .bind(&event.session_id)
                    .bind(chrono::SubsecRound::trunc_subsecs(event.at, 6))
                    .bind(&event.method)
                    .bind(&event.host)
                    .bind(event.port)
                    .bind(event.allowed)
                    .bind(&event.reason)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn list_egress_events(
                &self,
                query: &$crate::store::EgressEventQuery,
            ) -> $crate::store::StoreResult<Vec<$crate::store::EgressEvent>> {
                let (filter, binds) = $crate::store::sql::egress_event_filter(query);
                let sql = format!(
                    "SELECT {} FROM egress_events {filter} ORDER BY at DESC, event_id DESC LIMIT ${}",
                    $crate::store::sql::EGRESS_EVENT_COLUMNS,
                    binds.len() + 1
                );
                let mut select = sqlx::query_as::<_, $crate::store::sql::EgressEventRow>(&sql);
                for bind in binds {
                    select = match bind {
                        $crate::store::sql::ListingBind::Text(text) => select.bind(text),
                        $crate::store::sql::ListingBind::At(at) => select.bind(at),
                        $crate::store::sql::ListingBind::Bool(flag) => select.bind(flag),
                    };
                }
                Ok(select
                    .bind(i64::from(query.limit))
                    .fetch_all(&self.pool)
                    .await?
                    .into_iter()
                    .map(Into::into)
                    .collect())
            }
        }
    };
}

pub(super) use impl_sql_store;
