//! `GET /api/v1/audit/model-requests`: every model request the model proxy
//! forwarded or refused, newest first (admins).

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody, FieldError};
use super::extract::ApiQuery;
use super::sessions::{decode_time_cursor, encode_time_cursor};
use crate::app::AppState;
use crate::auth::Principal;
use crate::store::{ModelRequest, ModelRequestQuery};

/// Query of the audit listing.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    /// Page size, 1–1000 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A page of the audit log.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<ModelRequest>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Model requests seen by the model proxy: time, user, session, model,
/// tokens, cost, status, refusals and the tool calls of each response.
#[utoipa::path(
    get, path = "/api/v1/audit/model-requests", tag = "audit", params(AuditQuery),
    responses(
        (status = 200, description = "A page of the audit log, newest first", body = AuditPage),
        (status = 403, description = "Admin role required", body = ErrorBody),
        (status = 422, description = "Bad query", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn model_requests(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    if !principal.is_admin() {
        return Err(ApiError::Forbidden("Admin role required".into()));
    }
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::Validation(vec![FieldError::new(
            "value_error",
            ["query".into(), "limit".into()],
            "must be between 1 and 1000",
            limit.into(),
        )]));
    }
    let before = query.cursor.as_deref().map(decode_time_cursor).transpose()?;
    let mut items = state
        .store
        .list_model_requests(&ModelRequestQuery {
            user_id: query.user_id,
            session_id: query.session_id,
            before,
            limit: limit + 1,
        })
        .await?;
    let next_cursor = (items.len() > limit as usize).then(|| {
        items.truncate(limit as usize);
        items.last().map(|r| encode_time_cursor(r.at, &r.request_id)).unwrap_or_default()
    });
    Ok(Json(AuditPage { items, next_cursor }))
}
