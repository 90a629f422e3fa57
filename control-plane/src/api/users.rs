//! Users and API tokens. Creating and deleting users, issuing tokens and
//! setting a user's egress allow-list is for admins; a user may list and
//! revoke their own tokens and read themselves (`/api/v1/me`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody, FieldError};
use super::extract::{ApiJson, Validate};
use crate::app::AppState;
use crate::auth::{self, Principal};
use crate::store::{self, ApiToken, Role, StoreError, User};

/// Longest token lifetime that can be asked for.
const MAX_TOKEN_DAYS: u32 = 3650;

/// Most entries a user's egress allow-list may have.
const MAX_ALLOWED_DOMAINS: usize = 200;

/// Longest allow-list entry (a DNS name's limit).
const MAX_DOMAIN_LEN: usize = 253;

fn require_admin(principal: &Principal) -> Result<(), ApiError> {
    if principal.is_admin() { Ok(()) } else { Err(ApiError::Forbidden("Admin role required".into())) }
}

fn user_not_found() -> ApiError {
    ApiError::NotFound("User not found".into())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    /// 1–64 of `[A-Za-z0-9_-]`; also the user's directory name.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub user_id: String,
    /// `user` (default) or `admin`.
    #[serde(default)]
    pub role: Option<Role>,
}

impl Validate for CreateUserRequest {
    fn validate(&self) -> Vec<FieldError> {
        match shared::names::validate_user_id(&self.user_id) {
            Ok(()) => Vec::new(),
            Err(e) => vec![FieldError::new(
                "string_pattern_mismatch",
                ["body".into(), "user_id".into()],
                format!("user_id {e}"),
                self.user_id.as_str().into(),
            )],
        }
    }
}

/// Create a user (admin).
#[utoipa::path(
    post, path = "/api/v1/users", tag = "users", request_body = CreateUserRequest,
    responses(
        (status = 201, description = "Created", body = User),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 409, description = "User exists", body = ErrorBody),
        (status = 422, description = "Validation error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_user(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(request): ApiJson<CreateUserRequest>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    require_admin(&principal)?;
    let user = User {
        user_id: request.user_id,
        role: request.role.unwrap_or(Role::User),
        created_at: store::now(),
        uid: None,
        allowed_domains: None,
    };
    match state.store.create_user(&user).await {
        Ok(()) => {}
        Err(StoreError::Conflict(_)) => {
            return Err(ApiError::Conflict(format!("User {} already exists", user.user_id)));
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(user_id = %user.user_id, role = user.role.as_str(), by = %principal.user_id, "user created");
    Ok((StatusCode::CREATED, Json(user)))
}

/// List users (admin).
#[utoipa::path(
    get, path = "/api/v1/users", tag = "users",
    responses((status = 200, description = "All users", body = Vec<User>), (status = 403, description = "Not an admin", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn list_users(State(state): State<AppState>, principal: Principal) -> Result<Json<Vec<User>>, ApiError> {
    require_admin(&principal)?;
    Ok(Json(state.store.list_users().await?))
}

/// Get a user (admin, or the user themself).
#[utoipa::path(
    get, path = "/api/v1/users/{user_id}", tag = "users",
    params(("user_id" = String, Path)),
    responses((status = 200, description = "The user", body = User), (status = 404, description = "Not found", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn get_user(
    State(state): State<AppState>,
    principal: Principal,
    Path(user_id): Path<String>,
) -> Result<Json<User>, ApiError> {
    if !principal.can_act_for(&user_id) {
        return Err(user_not_found());
    }
    state.store.get_user(&user_id).await?.map(Json).ok_or_else(user_not_found)
}

/// The caller.
#[utoipa::path(
    get, path = "/api/v1/me", tag = "users",
    responses((status = 200, description = "The authenticated user", body = User)),
    security(("bearer" = []))
)]
pub async fn me(State(state): State<AppState>, principal: Principal) -> Result<Json<User>, ApiError> {
    match state.store.get_user(&principal.user_id).await? {
        Some(user) => Ok(Json(user)),
        // auth.mode none: the anonymous admin has no row.
        None => Ok(Json(User {
            user_id: principal.user_id.clone(),
            role: principal.role,
            created_at: store::now(),
            uid: None,
            allowed_domains: None,
        })),
    }
}

/// Delete a user (admin): their tokens are revoked and their sessions
/// deleted; their directory is kept. The last admin cannot be deleted.
#[utoipa::path(
    delete, path = "/api/v1/users/{user_id}", tag = "users",
    params(("user_id" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "Not found", body = ErrorBody),
        (status = 409, description = "Last admin", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_user(
    State(state): State<AppState>,
    principal: Principal,
    Path(user_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    require_admin(&principal)?;
    let user = state.store.get_user(&user_id).await?.ok_or_else(user_not_found)?;
    if user.role == Role::Admin {
        let admins = state.store.list_users().await?.into_iter().filter(|u| u.role == Role::Admin).count();
        if admins <= 1 {
            return Err(ApiError::Conflict("Cannot delete the last admin".into()));
        }
    }
    if !state.store.delete_user(&user_id).await? {
        return Err(user_not_found());
    }
    // Its sessions are closed in the store: stop what runs for them here.
    let mut sessions = state.conversations.sessions_of(&user_id);
    let running = state.supervisor.running_processes().await;
    sessions.extend(running.into_iter().filter(|(user, _)| *user == user_id).map(|(_, session)| session));
    sessions.sort();
    sessions.dedup();
    for session_id in sessions {
        state.release_session(&user_id, &session_id, crate::chat::STOP_GRACE).await;
    }
    state.forget_user(&user_id);
    tracing::info!(user_id = %user_id, by = %principal.user_id, "user deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetAllowedDomainsRequest {
    /// The domains the user's tools may reach through the egress proxy,
    /// replacing the global `network.allowed_domains` (at most 200):
    /// `example.com` (and its subdomains), `*.example.com` or `.example.com`
    /// (only the subdomains), or `*` (everything). Lower case letters,
    /// digits, `-` and `.`, 1–253 characters each. `null`: the global list
    /// applies again. Required (`{}` is refused, not a reset).
    // Without a default: the key must be present, `null` included.
    #[serde(deserialize_with = "Option::deserialize")]
    #[schema(required = true, example = json!(["example.com", "*.pypi.org"]))]
    pub allowed_domains: Option<Vec<String>>,
}

/// Why `entry` is not a valid allow-list entry, if it is not.
fn domain_entry_error(entry: &str) -> Option<&'static str> {
    if entry.is_empty() || entry.chars().count() > MAX_DOMAIN_LEN {
        return Some("must be 1-253 characters long");
    }
    if entry == "*" {
        return None;
    }
    let name = entry.strip_prefix("*.").or_else(|| entry.strip_prefix('.')).unwrap_or(entry);
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.') {
        return Some(
            "must be a domain name of lowercase letters, digits, '-' and '.', optionally starting with '*.' or '.', \
             or exactly '*'",
        );
    }
    if name.split('.').any(str::is_empty) {
        return Some("must not have an empty label (a leading, trailing or doubled '.')");
    }
    None
}

impl Validate for SetAllowedDomainsRequest {
    fn validate(&self) -> Vec<FieldError> {
        let Some(domains) = &self.allowed_domains else { return Vec::new() };
        if domains.len() > MAX_ALLOWED_DOMAINS {
            return vec![FieldError::new(
                "too_long",
                ["body".into(), "allowed_domains".into()],
                format!("List should have at most {MAX_ALLOWED_DOMAINS} items after validation, not {}", domains.len()),
                domains.clone().into(),
            )];
        }
        domains
            .iter()
            .enumerate()
            .filter_map(|(index, entry)| {
                let msg = domain_entry_error(entry)?;
                let loc = ["body".into(), "allowed_domains".into(), index.into()];
                Some(FieldError::new("value_error", loc, msg, entry.as_str().into()))
            })
            .collect()
    }
}

/// Set a user's egress allow-list (admin): the domains their tools may
/// reach through the egress proxy instead of the global list, or `null` to
/// return to the global list. Applies to the user's next request.
#[utoipa::path(
    put, path = "/api/v1/users/{user_id}/allowed-domains", tag = "users",
    params(("user_id" = String, Path)), request_body = SetAllowedDomainsRequest,
    responses(
        (status = 200, description = "The user, with their new list", body = User),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "User not found", body = ErrorBody),
        (status = 422, description = "Validation error", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn set_allowed_domains(
    State(state): State<AppState>,
    principal: Principal,
    Path(user_id): Path<String>,
    ApiJson(request): ApiJson<SetAllowedDomainsRequest>,
) -> Result<Json<User>, ApiError> {
    require_admin(&principal)?;
    if !state.store.set_user_allowed_domains(&user_id, request.allowed_domains.as_deref()).await? {
        return Err(user_not_found());
    }
    let user = state.store.get_user(&user_id).await?.ok_or_else(user_not_found)?;
    // The running egress proxy applies it to the user's next request.
    if let Some(egress) = &state.egress {
        egress.set_user(&user_id, user.allowed_domains.clone());
    }
    tracing::info!(
        user_id = %user_id, domains = ?user.allowed_domains, by = %principal.user_id, "allowed domains set"
    );
    Ok(Json(user))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// A note to recognise the token by (≤ 200 characters).
    #[serde(default)]
    pub label: Option<String>,
    /// Lifetime in days (1–3650); none: no expiry.
    #[serde(default)]
    pub expires_in_days: Option<u32>,
}

impl Validate for CreateTokenRequest {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(label) = &self.label
            && (label.chars().count() > 200 || label.chars().any(char::is_control))
        {
            errors.push(FieldError::body("label", "at most 200 printable characters", label.as_str().into()));
        }
        if let Some(days) = self.expires_in_days
            && !(1..=MAX_TOKEN_DAYS).contains(&days)
        {
            errors.push(FieldError::body(
                "expires_in_days",
                format!("must be between 1 and {MAX_TOKEN_DAYS}"),
                days.into(),
            ));
        }
        errors
    }
}

/// A new token: `token` is shown only in this response.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    /// The secret, for `Authorization: Bearer <token>`. Store it now: only
    /// its hash is kept.
    pub token: String,
    pub token_id: String,
    pub user_id: String,
    pub label: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Issue a token for a user (admin).
#[utoipa::path(
    post, path = "/api/v1/users/{user_id}/tokens", tag = "users",
    params(("user_id" = String, Path)), request_body = CreateTokenRequest,
    responses(
        (status = 201, description = "Created; the secret is shown once", body = CreatedToken),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "User not found", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_token(
    State(state): State<AppState>,
    principal: Principal,
    Path(user_id): Path<String>,
    ApiJson(request): ApiJson<CreateTokenRequest>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    require_admin(&principal)?;
    state.store.get_user(&user_id).await?.ok_or_else(user_not_found)?;
    let mut issued = auth::issue_token(&user_id, request.label);
    issued.record.expires_at =
        request.expires_in_days.map(|days| issued.record.created_at + TimeDelta::days(i64::from(days)));
    state.store.create_token(&issued.record).await?;
    tracing::info!(user_id = %user_id, token_id = %issued.record.token_id, by = %principal.user_id, "token issued");
    let record = issued.record;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: issued.secret,
            token_id: record.token_id,
            user_id: record.user_id,
            label: record.label,
            created_at: record.created_at,
            expires_at: record.expires_at,
        }),
    ))
}

/// List a user's tokens, without secrets (admin, or the user themself).
#[utoipa::path(
    get, path = "/api/v1/users/{user_id}/tokens", tag = "users",
    params(("user_id" = String, Path)),
    responses((status = 200, description = "Tokens", body = Vec<ApiToken>), (status = 404, description = "User not found", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn list_tokens(
    State(state): State<AppState>,
    principal: Principal,
    Path(user_id): Path<String>,
) -> Result<Json<Vec<ApiToken>>, ApiError> {
    if !principal.can_act_for(&user_id) {
        return Err(user_not_found());
    }
    state.store.get_user(&user_id).await?.ok_or_else(user_not_found)?;
    Ok(Json(state.store.list_tokens(&user_id).await?))
}

/// Revoke a token (admin, or the token's owner).
#[utoipa::path(
    delete, path = "/api/v1/tokens/{token_id}", tag = "users",
    params(("token_id" = String, Path)),
    responses((status = 204, description = "Revoked"), (status = 404, description = "Token not found", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn delete_token(
    State(state): State<AppState>,
    principal: Principal,
    Path(token_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let not_found = || ApiError::NotFound("Token not found".into());
    let token = state.store.get_token(&token_id).await?.ok_or_else(not_found)?;
    if !principal.can_act_for(&token.user_id) {
        return Err(not_found());
    }
    if !state.store.delete_token(&token_id).await? {
        return Err(not_found());
    }
    tracing::info!(token_id = %token_id, user_id = %token.user_id, by = %principal.user_id, "token revoked");
    Ok(StatusCode::NO_CONTENT)
}
