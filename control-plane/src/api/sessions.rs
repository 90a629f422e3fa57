//! `/api/v1/sessions`: create, list, get, delete, resume.
//!
//! Seed-compatible: 201 on create, 204 on delete, the plain listing is the
//! seed's array of ids, `SessionResp` keeps its fields (plus `subdir`,
//! `status`, `options`, `usage`; timestamps carry their offset). A caller only
//! ever sees their own sessions: anyone else's id answers 404.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use shared::names::Subdir;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody, FieldError};
use super::extract::{ApiJson, ApiQuery, Validate};
use crate::app::AppState;
use crate::auth::Principal;
use crate::chat;
use crate::chat::STOP_GRACE;
use crate::config::{PERMISSION_MODES, SessionDefaults};
use crate::store::{
    self, Role, Session, SessionCursor, SessionOptions, SessionQuery, SessionStatus, UsageTotals, User,
};
use crate::userdir::UserDirError;

/// Largest `max_turns` a session may ask for.
const MAX_TURNS_LIMIT: u32 = 10_000;
/// Largest `max_budget_usd` a session may ask for.
const MAX_BUDGET_LIMIT: f64 = 1_000_000.0;
/// Largest serialized `metadata`.
const MAX_METADATA_BYTES: usize = 64 * 1024;
/// Longest `system_prompt`.
const MAX_PROMPT_CHARS: usize = 100_000;
/// Page size of the detailed listing unless `limit` says otherwise.
const DEFAULT_PAGE: u32 = 50;
/// Largest page of either listing.
const MAX_PAGE: u32 = 1000;

/// Body of `POST /api/v1/sessions`: the seed's fields plus the session's CLI
/// options, each overriding the configured default.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSessionRequest {
    /// Owner (1–64 of `[A-Za-z0-9_-]`); defaults to the caller. Only admins
    /// may name another user.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Relative directory under the user's directory (≤ 200 characters).
    #[serde(default)]
    pub subdir: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// One of the CLI's permission modes.
    #[serde(default)]
    pub permission_mode: Option<String>,
    #[serde(default)]
    pub allowed_tools: Option<Vec<String>>,
    #[serde(default)]
    pub disallowed_tools: Option<Vec<String>>,
    #[serde(default)]
    pub model: Option<String>,
    /// At least 1.
    #[serde(default)]
    pub max_turns: Option<u32>,
    /// Greater than 0.
    #[serde(default)]
    pub max_budget_usd: Option<f64>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub mcp_servers: Option<Map<String, Value>>,
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub plugins: Option<Vec<Value>>,
}

/// Checks a list of tool names: non-empty printable names, not too many.
fn check_tools(field: &str, tools: &Option<Vec<String>>, errors: &mut Vec<FieldError>) {
    let Some(tools) = tools else { return };
    if tools.len() > 200 {
        errors.push(FieldError::body(field, "at most 200 tools", tools.len().into()));
    }
    for tool in tools {
        if tool.is_empty() || tool.len() > 200 || tool.chars().any(char::is_control) {
            errors.push(FieldError::body(field, "tool names are 1-200 printable characters", tool.as_str().into()));
        }
    }
}

/// An MCP server as the CLI's `--mcp-config` takes it. The CLI silently
/// drops a server it cannot use, so a wrong shape would only show as a
/// missing tool later: it is refused here instead.
fn check_mcp_server(name: &str, server: &Value) -> Result<(), String> {
    let strings = |value: &Value| value.as_object().is_some_and(|m| m.values().all(Value::is_string));
    if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        return Err("MCP server names are 1-100 printable characters".into());
    }
    let Some(fields) = server.as_object() else { return Err("each MCP server must be an object".into()) };
    let kind = fields.get("type").map_or(Some("stdio"), Value::as_str);
    let (allowed, required): (&[&str], &str) = match kind {
        Some("stdio") => (&["type", "command", "args", "env"], "command"),
        Some("sse" | "http") => (&["type", "url", "headers"], "url"),
        _ => return Err("`type` must be one of stdio (the default), sse, http".into()),
    };
    if let Some(unknown) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("unknown field `{unknown}` for a {} server", kind.unwrap_or("stdio")));
    }
    if fields.get(required).and_then(Value::as_str).is_none_or(|v| v.trim().is_empty()) {
        return Err(format!("`{required}` (a non-empty string) is required"));
    }
    if let Some(url) = fields.get("url").and_then(Value::as_str)
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err("`url` must start with http:// or https://".into());
    }
    if fields.get("args").is_some_and(|a| !a.as_array().is_some_and(|a| a.iter().all(Value::is_string))) {
        return Err("`args` must be a list of strings".into());
    }
    for map in ["env", "headers"] {
        if fields.get(map).is_some_and(|m| !strings(m)) {
            return Err(format!("`{map}` must map names to strings"));
        }
    }
    Ok(())
}

/// A plugin: `{"type": "local", "path": "<directory relative to the
/// session's directory>"}`, loaded with the CLI's `--plugin-dir`.
fn check_plugin(plugin: &Value) -> Result<(), String> {
    let fields = plugin.as_object().ok_or("each plugin must be an object")?;
    if fields.get("type").and_then(Value::as_str) != Some("local") {
        return Err("only `{\"type\": \"local\", \"path\": ...}` plugins are supported".into());
    }
    if let Some(unknown) = fields.keys().find(|k| !matches!(k.as_str(), "type" | "path")) {
        return Err(format!("unknown field `{unknown}`"));
    }
    let path = fields.get("path").and_then(Value::as_str).ok_or("`path` (a string) is required")?;
    let relative = std::path::Path::new(path);
    let inside = !path.is_empty()
        && path.len() <= 1024
        && relative.is_relative()
        && relative.components().all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir));
    if !inside {
        return Err("`path` must be a relative path inside the session's directory (no `..`)".into());
    }
    Ok(())
}

/// Whether any key or string inside `value` holds a NUL character.
fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

impl Validate for CreateSessionRequest {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(mode) = &self.permission_mode
            && !PERMISSION_MODES.contains(&mode.as_str())
        {
            let msg = format!("Input should be one of {}", PERMISSION_MODES.join(", "));
            errors.push(FieldError::new("enum", ["body".into(), "permission_mode".into()], msg, mode.as_str().into()));
        }
        if let Some(turns) = self.max_turns
            && !(1..=MAX_TURNS_LIMIT).contains(&turns)
        {
            errors.push(FieldError::body(
                "max_turns",
                format!("must be between 1 and {MAX_TURNS_LIMIT}"),
                turns.into(),
            ));
        }
        if let Some(budget) = self.max_budget_usd
            && !(budget > 0.0 && budget <= MAX_BUDGET_LIMIT)
        {
            let msg = format!("must be greater than 0 and at most {MAX_BUDGET_LIMIT}");
            errors.push(FieldError::body("max_budget_usd", msg, budget.into()));
        }
        if let Some(model) = &self.model
            && (model.is_empty() || model.len() > 200 || model.chars().any(|c| c.is_control() || c.is_whitespace()))
        {
            errors.push(FieldError::body("model", "must be 1-200 characters without spaces", model.as_str().into()));
        }
        if let Some(prompt) = &self.system_prompt
            && (prompt.contains('\0') || prompt.chars().count() > MAX_PROMPT_CHARS)
        {
            let msg = format!("must be at most {MAX_PROMPT_CHARS} characters without NUL bytes");
            errors.push(FieldError::body("system_prompt", msg, Value::Null));
        }
        check_tools("allowed_tools", &self.allowed_tools, &mut errors);
        check_tools("disallowed_tools", &self.disallowed_tools, &mut errors);
        if let Some(servers) = &self.mcp_servers {
            for (name, server) in servers {
                if let Err(msg) = check_mcp_server(name, server) {
                    errors.push(FieldError::new(
                        "value_error",
                        ["body".into(), "mcp_servers".into(), name.as_str().into()],
                        msg,
                        server.clone(),
                    ));
                }
            }
        }
        for (index, plugin) in self.plugins.iter().flatten().enumerate() {
            if let Err(msg) = check_plugin(plugin) {
                errors.push(FieldError::new(
                    "value_error",
                    ["body".into(), "plugins".into(), index.into()],
                    msg,
                    plugin.clone(),
                ));
            }
        }
        if let Some(metadata) = &self.metadata
            && serde_json::to_vec(metadata).map_or(0, |v| v.len()) > MAX_METADATA_BYTES
        {
            let msg = format!("must be at most {MAX_METADATA_BYTES} bytes as JSON");
            errors.push(FieldError::body("metadata", msg, Value::Null));
        }
        // PostgreSQL cannot store NUL in text or JSON; no CLI option needs one.
        let json_fields = [
            ("metadata", self.metadata.as_ref().map(|m| Value::Object(m.clone()))),
            ("mcp_servers", self.mcp_servers.as_ref().map(|m| Value::Object(m.clone()))),
            ("plugins", self.plugins.as_ref().map(|p| Value::Array(p.clone()))),
        ];
        for (field, value) in json_fields {
            if value.as_ref().is_some_and(contains_nul) {
                errors.push(FieldError::body(field, "must not contain NUL characters", Value::Null));
            }
        }
        errors
    }
}

impl CreateSessionRequest {
    /// The session's effective options: its own, else the configured
    /// defaults (copied now, so a later config change does not alter an
    /// existing session).
    fn resolve_options(&self, defaults: &SessionDefaults, config: &crate::config::Config) -> SessionOptions {
        SessionOptions {
            system_prompt: self.system_prompt.clone().or_else(|| defaults.system_prompt.clone()),
            permission_mode: Some(self.permission_mode.clone().unwrap_or_else(|| defaults.permission_mode.clone())),
            allowed_tools: Some(self.allowed_tools.clone().unwrap_or_else(|| defaults.allowed_tools.clone())),
            disallowed_tools: Some(self.disallowed_tools.clone().unwrap_or_else(|| defaults.disallowed_tools.clone())),
            model: self.model.clone().or_else(|| defaults.model.clone()).or_else(|| config.anthropic.model.clone()),
            max_turns: self.max_turns.or(defaults.max_turns),
            max_budget_usd: self.max_budget_usd.or(defaults.max_budget_usd),
            mcp_servers: Some(
                self.mcp_servers
                    .clone()
                    .unwrap_or_else(|| config.mcp_servers.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            ),
            plugins: Some(self.plugins.clone().unwrap_or_else(|| config.plugins.clone())),
        }
    }
}

/// A session as the API shows it (the seed's `SessionResp` plus ours).
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionResponse {
    pub session_id: String,
    pub user_id: String,
    /// Absolute working directory of the session's CLI.
    pub cwd: String,
    pub subdir: Option<String>,
    pub created_at: DateTime<Utc>,
    pub last_active_at: DateTime<Utc>,
    pub message_count: i64,
    pub status: SessionStatus,
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
    /// The CLI options in effect for this session.
    pub options: SessionOptions,
    pub usage: UsageTotals,
}

impl From<Session> for SessionResponse {
    fn from(s: Session) -> Self {
        Self {
            session_id: s.session_id,
            user_id: s.user_id,
            cwd: s.cwd,
            subdir: s.subdir,
            created_at: s.created_at,
            last_active_at: s.last_active_at,
            message_count: s.message_count,
            status: s.status,
            metadata: s.metadata,
            options: s.options,
            usage: s.usage,
        }
    }
}

/// Maps a directory error: the caller's fault is a 400 naming the field.
fn dir_error(error: UserDirError) -> ApiError {
    match error.field() {
        Some(field) => ApiError::bad_field("invalid_path", field, error.to_string()),
        None => ApiError::Internal(error.to_string()),
    }
}

/// Fetches a user, creating it (role `user`) when an admin acts for a name
/// that does not exist yet, as the seed accepted any `user_id`.
async fn ensure_user(state: &AppState, user_id: &str) -> Result<User, ApiError> {
    if let Some(user) = state.store.get_user(user_id).await? {
        return Ok(user);
    }
    let user = User {
        user_id: user_id.to_owned(),
        role: Role::User,
        created_at: store::now(),
        uid: None,
        allowed_domains: None,
    };
    match state.store.create_user(&user).await {
        Ok(()) => Ok(user),
        Err(store::StoreError::Conflict(_)) => state
            .store
            .get_user(user_id)
            .await?
            .ok_or_else(|| ApiError::Internal(format!("user {user_id} vanished while being created"))),
        Err(e) => Err(e.into()),
    }
}

/// The owner a request acts for: `user_id` if given (admins only, unless it
/// is the caller), else the caller.
pub fn owner_for(principal: &Principal, requested: Option<&str>) -> Result<String, ApiError> {
    match requested {
        None => Ok(principal.user_id.clone()),
        Some(owner) if principal.can_act_for(owner) => Ok(owner.to_owned()),
        Some(_) => Err(ApiError::Forbidden("user_id must be your own user unless you are an admin".into())),
    }
}

/// Refuses a new open session when the user or the server is at its limit
/// (429 / 503 with `Retry-After`, where the seed answered 500), or when the
/// server is above its memory limit.
async fn admit_session(state: &AppState, user_id: &str) -> Result<(), ApiError> {
    let api = &state.config.api;
    if api.memory_limit_mb > 0
        && let Some(rss) = crate::app::resident_memory_mb()
        && rss > api.memory_limit_mb as f64
    {
        return Err(ApiError::Unavailable {
            message: format!("Server memory is above its limit ({} MiB); try again later", api.memory_limit_mb),
            retry_after_secs: 30,
        });
    }
    let user_open = state.store.count_sessions(Some(user_id), SessionStatus::Active).await?;
    if user_open >= u64::from(api.max_sessions_per_user) {
        return Err(ApiError::TooManyRequests {
            message: format!(
                "Too many open sessions for user {user_id} (limit {}); delete one first",
                api.max_sessions_per_user
            ),
            retry_after_secs: 10,
        });
    }
    let open = state.store.count_sessions(None, SessionStatus::Active).await?;
    if open >= u64::from(api.max_sessions) {
        return Err(ApiError::Unavailable {
            message: format!("Server session limit reached ({}); try again later", api.max_sessions),
            retry_after_secs: 10,
        });
    }
    Ok(())
}

/// Create a session.
#[utoipa::path(
    post, path = "/api/v1/sessions", tag = "sessions",
    request_body = CreateSessionRequest,
    responses(
        (status = 201, description = "Created", body = SessionResponse),
        (status = 400, description = "Bad path (`field` names it)", body = ErrorBody),
        (status = 401, description = "Not authenticated", body = ErrorBody),
        (status = 403, description = "user_id of another user", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Validation error", body = ErrorBody),
        (status = 429, description = "Too many open sessions for this user", body = ErrorBody),
        (status = 503, description = "Server at capacity or storage down", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_session(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(request): ApiJson<CreateSessionRequest>,
) -> Result<Response, ApiError> {
    let owner = owner_for(&principal, request.user_id.as_deref())?;
    shared::names::validate_user_id(&owner)
        .map_err(|e| ApiError::bad_field("invalid_path", "user_id", format!("user_id: {e}")))?;
    let subdir = request
        .subdir
        .as_deref()
        .map(Subdir::parse)
        .transpose()
        .map_err(|e| ApiError::bad_field("invalid_path", "subdir", format!("subdir: {e}")))?;
    ensure_user(&state, &owner).await?;
    // Privileged sandbox: directories belong to the user's own uid.
    let dir_owner = state
        .supervisor
        .user_ids(&owner)
        .await
        .map_err(|e| ApiError::Unavailable { message: e.to_string(), retry_after_secs: 5 })?
        .map(|ids| (ids.uid, ids.gid));

    let cwd = {
        let (state, owner, subdir) = (state.clone(), owner.clone(), subdir.clone());
        tokio::task::spawn_blocking(move || state.user_dirs.resolve(&owner, subdir.as_ref(), dir_owner))
            .await
            .map_err(|e| ApiError::Internal(format!("directory task failed: {e}")))?
            .map_err(dir_error)?
    };

    let now = store::now();
    let session_id = uuid::Uuid::new_v4().to_string();
    let session = Session {
        session_id: session_id.clone(),
        user_id: owner.clone(),
        subdir: subdir.map(|s| s.to_string()),
        cwd: cwd.to_string_lossy().into_owned(),
        options: request.resolve_options(&state.config.defaults, &state.config),
        metadata: request.metadata.clone().unwrap_or_default(),
        status: SessionStatus::Active,
        created_at: now,
        last_active_at: now,
        message_count: 0,
        cli_session_id: Some(session_id.clone()),
        usage: UsageTotals::default(),
    };
    {
        // Count and insert as one step, so concurrent creates cannot both
        // take the last slot.
        let _admission = state.admission.lock().await;
        admit_session(&state, &owner).await?;
        state.store.create_session(&session).await?;
    }
    // The session's CLI starts now in the user's confined worker; a sandbox
    // that cannot be set up fails the create (503), leaving no session.
    if let Err(error) = chat::start_cli(&state, &session, chat::CliStart::Prewarm).await {
        state.store.set_session_status(&session.session_id, SessionStatus::Deleted, store::now()).await?;
        state.conversations.forget(&session.session_id);
        state.model_proxy.revoke_session(&session.session_id);
        tracing::error!(session_id = %session.session_id, user_id = %owner, %error, "session not started");
        return Err(super::chat::turn_error(error));
    }
    tracing::info!(session_id = %session.session_id, user_id = %owner, "session created");
    let location = HeaderValue::from_str(&format!("/api/v1/sessions/{session_id}"))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut response = (StatusCode::CREATED, Json(SessionResponse::from(session))).into_response();
    response.headers_mut().insert(header::LOCATION, location);
    Ok(response)
}

/// Loads a session the caller may see: unknown, deleted and other users'
/// sessions are all 404. An active session idle past the TTL is reported
/// (and stored) as expired even if the reaper has not run yet.
pub async fn visible_session(state: &AppState, principal: &Principal, session_id: &str) -> Result<Session, ApiError> {
    if shared::names::validate_session_id(session_id).is_err() {
        return Err(ApiError::session_not_found());
    }
    let mut session = match state.store.get_session(session_id).await? {
        Some(s) if s.status != SessionStatus::Deleted && principal.can_act_for(&s.user_id) => s,
        _ => return Err(ApiError::session_not_found()),
    };
    if session.status == SessionStatus::Active
        && let Some(ttl) = state.session_ttl()
        && store::now() - session.last_active_at > ttl
    {
        state.store.set_session_status(session_id, SessionStatus::Expired, store::now()).await?;
        session.status = SessionStatus::Expired;
        // As the reaper would have done (an expired session keeps its files).
        state.release_session(&session.user_id, session_id, STOP_GRACE).await;
    }
    Ok(session)
}

/// Get a session.
#[utoipa::path(
    get, path = "/api/v1/sessions/{session_id}", tag = "sessions",
    params(("session_id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session", body = SessionResponse),
        (status = 401, description = "Not authenticated", body = ErrorBody),
        (status = 404, description = "Session not found", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_session(
    State(state): State<AppState>,
    principal: Principal,
    Path(session_id): Path<String>,
) -> Result<Json<SessionResponse>, ApiError> {
    Ok(Json(visible_session(&state, &principal, &session_id).await?.into()))
}

/// Delete a session. Its id answers 404 from then on; its directory is kept.
#[utoipa::path(
    delete, path = "/api/v1/sessions/{session_id}", tag = "sessions",
    params(("session_id" = String, Path, description = "Session id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Not authenticated", body = ErrorBody),
        (status = 404, description = "Session not found", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_session(
    State(state): State<AppState>,
    principal: Principal,
    Path(session_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let session = visible_session(&state, &principal, &session_id).await?;
    if !state.store.set_session_status(&session.session_id, SessionStatus::Deleted, store::now()).await? {
        return Err(ApiError::session_not_found());
    }
    state.release_session(&session.user_id, &session.session_id, STOP_GRACE).await;
    tracing::info!(session_id = %session.session_id, user_id = %session.user_id, "session deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Resume a session: a no-op for an open one; an expired one is reopened
/// (subject to the open-session limits).
#[utoipa::path(
    post, path = "/api/v1/sessions/{session_id}/resume", tag = "sessions",
    params(("session_id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session, open", body = SessionResponse),
        (status = 401, description = "Not authenticated", body = ErrorBody),
        (status = 404, description = "Session not found or expired", body = ErrorBody),
        (status = 429, description = "Too many open sessions for this user", body = ErrorBody),
        (status = 503, description = "Server at capacity", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn resume_session(
    State(state): State<AppState>,
    principal: Principal,
    Path(session_id): Path<String>,
) -> Result<Json<SessionResponse>, ApiError> {
    let not_found = || ApiError::NotFound("Session not found or expired".into());
    let mut session = visible_session(&state, &principal, &session_id).await.map_err(|_| not_found())?;
    if session.status == SessionStatus::Expired {
        let _admission = state.admission.lock().await;
        admit_session(&state, &session.user_id).await?;
        let now = store::now();
        if !state.store.set_session_status(&session_id, SessionStatus::Active, now).await? {
            return Err(not_found());
        }
        session.status = SessionStatus::Active;
        session.last_active_at = now;
        tracing::info!(session_id = %session_id, "expired session reopened");
    }
    // Warm again, so the next message does not pay the CLI's start.
    if state.supervisor.subscribe(&session.user_id, &session.session_id).await.is_none() {
        chat::start_cli(&state, &session, chat::CliStart::Prewarm).await.map_err(super::chat::turn_error)?;
    }
    Ok(Json(session.into()))
}

/// Query of `GET /api/v1/sessions`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListSessionsQuery {
    /// Only this user's sessions (admins: anyone's; users: their own).
    pub user_id: Option<String>,
    /// `true`: a page of full sessions instead of the seed's array of ids.
    #[serde(default)]
    pub detail: bool,
    /// Page size (1–1000; default 50 with `detail`, else 1000).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// `active` (default, as the seed listed), `expired` or `all`.
    pub status: Option<String>,
}

/// What `GET /api/v1/sessions` answers: the seed's array of ids, or with
/// `detail=true` a [`SessionPage`] (for the OpenAPI document).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum SessionListing {
    Ids(Vec<String>),
    Page(SessionPage),
}

/// A page of the detailed listing.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionPage {
    pub items: Vec<SessionResponse>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

fn encode_cursor(session: &Session) -> String {
    encode_time_cursor(session.created_at, &session.session_id)
}

fn decode_cursor(raw: &str) -> Result<SessionCursor, ApiError> {
    let (created_at, session_id) = decode_time_cursor(raw)?;
    Ok(SessionCursor { created_at, session_id })
}

/// An opaque keyset cursor: a time and an id.
pub(super) fn encode_time_cursor(at: DateTime<Utc>, id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}|{id}", at.to_rfc3339()))
}

/// The time and id of a cursor from [`encode_time_cursor`]; 422 otherwise.
pub(super) fn decode_time_cursor(raw: &str) -> Result<(DateTime<Utc>, String), ApiError> {
    let invalid = || {
        ApiError::Validation(vec![FieldError::new(
            "value_error",
            ["query".into(), "cursor".into()],
            "not a cursor returned by this API",
            raw.into(),
        )])
    };
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let (time, id) = text.split_once('|').ok_or_else(invalid)?;
    let at = DateTime::parse_from_rfc3339(time).map_err(|_| invalid())?.with_timezone(&Utc);
    Ok((at, id.to_owned()))
}

fn query_error(field: &str, msg: &str, input: Value) -> ApiError {
    ApiError::Validation(vec![FieldError::new("value_error", ["query".into(), field.into()], msg, input)])
}

/// List sessions: the seed's array of ids, or with `detail=true` a page of
/// sessions. Both are paginated with `limit`/`cursor`; the array form puts
/// the next cursor in the `X-Next-Cursor` header.
#[utoipa::path(
    get, path = "/api/v1/sessions", tag = "sessions",
    params(ListSessionsQuery),
    responses(
        (status = 200, description = "Session ids (or a SessionPage with detail=true)", body = SessionListing),
        (status = 401, description = "Not authenticated", body = ErrorBody),
        (status = 403, description = "Another user's sessions", body = ErrorBody),
        (status = 422, description = "Bad query", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_sessions(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<ListSessionsQuery>,
) -> Result<Response, ApiError> {
    let user_id = match (&query.user_id, principal.is_admin()) {
        (Some(user), _) => Some(owner_for(&principal, Some(user))?),
        (None, true) => None,
        (None, false) => Some(principal.user_id.clone()),
    };
    let default_limit = if query.detail { DEFAULT_PAGE } else { MAX_PAGE };
    let limit = query.limit.unwrap_or(default_limit);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(query_error("limit", "must be between 1 and 1000", limit.into()));
    }
    let statuses = match query.status.as_deref() {
        None | Some("active") => vec![SessionStatus::Active],
        Some("expired") => vec![SessionStatus::Expired],
        Some("all") => Vec::new(),
        Some(other) => return Err(query_error("status", "must be one of active, expired, all", other.into())),
    };
    let after = query.cursor.as_deref().map(decode_cursor).transpose()?;
    // One extra row tells whether a next page exists.
    let mut sessions = state.store.list_sessions(&SessionQuery { user_id, statuses, after, limit: limit + 1 }).await?;
    let next_cursor = if sessions.len() > limit as usize {
        sessions.truncate(limit as usize);
        sessions.last().map(encode_cursor)
    } else {
        None
    };
    if query.detail {
        let items = sessions.into_iter().map(SessionResponse::from).collect();
        return Ok(Json(SessionPage { items, next_cursor }).into_response());
    }
    let ids: Vec<String> = sessions.into_iter().map(|s| s.session_id).collect();
    let mut headers = HeaderMap::new();
    if let Some(cursor) = next_cursor.and_then(|c| HeaderValue::from_str(&c).ok()) {
        headers.insert("x-next-cursor", cursor);
    }
    Ok((headers, Json(ids)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let session = Session::for_test("abc", "u");
        let cursor = decode_cursor(&encode_cursor(&session)).expect("round trip");
        assert_eq!(cursor, SessionCursor { created_at: session.created_at, session_id: "abc".into() });
        assert!(decode_cursor("not-a-cursor!").is_err());
    }

    #[test]
    fn options_are_validated_with_field_names() {
        let request = CreateSessionRequest {
            permission_mode: Some("yolo".into()),
            max_turns: Some(0),
            max_budget_usd: Some(-1.0),
            allowed_tools: Some(vec![String::new()]),
            ..Default::default()
        };
        let fields: Vec<Value> = request.validate().into_iter().map(|e| e.loc[1].clone()).collect();
        assert_eq!(fields, ["permission_mode", "max_turns", "max_budget_usd", "allowed_tools"]);
    }
}
