//! The audit logs (admins), newest first with keyset pagination:
//! `GET /api/v1/audit/model-requests`, every model request the model proxy
//! forwarded or refused, and `GET /api/v1/audit/egress`, every web request
//! the egress proxy allowed or refused.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody, FieldError};
use super::extract::ApiQuery;
use super::sessions::{decode_time_cursor, encode_time_cursor};
use crate::app::AppState;
use crate::auth::Principal;
use crate::store::{EgressEvent, EgressEventQuery, ModelRequest, ModelRequestQuery};

/// Page size when none is asked for.
const DEFAULT_LIMIT: u32 = 100;
/// Largest page size.
const MAX_LIMIT: u32 = 1000;

/// Query of the model request audit listing.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
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

/// Query of the egress audit listing.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EgressAuditQuery {
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    /// Only allowed (`true`) or refused (`false`) requests; both if absent.
    pub allowed: Option<bool>,
    /// Page size, 1–1000 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A page of the egress audit log.
#[derive(Debug, Serialize, ToSchema)]
pub struct EgressPage {
    pub items: Vec<EgressEvent>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// The audit logs are for admins only.
fn require_admin(principal: &Principal) -> Result<(), ApiError> {
    if principal.is_admin() { Ok(()) } else { Err(ApiError::Forbidden("Admin role required".into())) }
}

/// A listing's page size and keyset position from its query: `limit` (1–1000,
/// default 100) and `cursor`, each a 422 when malformed.
struct Page {
    limit: u32,
    before: Option<(DateTime<Utc>, String)>,
}

impl Page {
    fn from_query(limit: Option<u32>, cursor: Option<&str>) -> Result<Self, ApiError> {
        let limit = limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::Validation(vec![FieldError::new(
                "value_error",
                ["query".into(), "limit".into()],
                format!("must be between 1 and {MAX_LIMIT}"),
                limit.into(),
            )]));
        }
        let before = cursor.map(decode_time_cursor).transpose()?;
        Ok(Self { limit, before })
    }

    /// How many rows to fetch: one more than the page tells whether
    /// another page follows.
    fn fetch(&self) -> u32 {
        self.limit + 1
    }

    /// Trims `items` (fetched with [`Self::fetch`]) to the page and returns
    /// the cursor of the next page, if there is one: the `(time, id)` of the
    /// last row kept.
    fn finish<T>(&self, items: &mut Vec<T>, key: impl Fn(&T) -> (DateTime<Utc>, &str)) -> Option<String> {
        if items.len() <= self.limit as usize {
            return None;
        }
        items.truncate(self.limit as usize);
        let (at, id) = key(items.last()?);
        Some(encode_time_cursor(at, id))
    }
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
    require_admin(&principal)?;
    let page = Page::from_query(query.limit, query.cursor.as_deref())?;
    let mut items = state
        .store
        .list_model_requests(&ModelRequestQuery {
            user_id: query.user_id,
            session_id: query.session_id,
            before: page.before.clone(),
            limit: page.fetch(),
        })
        .await?;
    let next_cursor = page.finish(&mut items, |r| (r.at, &r.request_id));
    Ok(Json(AuditPage { items, next_cursor }))
}

/// Web requests seen by the egress proxy: time, user, session, method,
/// host, port, whether the allow-list let it through and why not.
#[utoipa::path(
    get, path = "/api/v1/audit/egress", tag = "audit", params(EgressAuditQuery),
    responses(
        (status = 200, description = "A page of the egress audit log, newest first", body = EgressPage),
        (status = 403, description = "Admin role required", body = ErrorBody),
        (status = 422, description = "Bad query", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn egress(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<EgressAuditQuery>,
) -> Result<Json<EgressPage>, ApiError> {
    require_admin(&principal)?;
    let page = Page::from_query(query.limit, query.cursor.as_deref())?;
    let mut items = state
        .store
        .list_egress_events(&EgressEventQuery {
            user_id: query.user_id,
            session_id: query.session_id,
            allowed: query.allowed,
            before: page.before.clone(),
            limit: page.fetch(),
        })
        .await?;
    let next_cursor = page.finish(&mut items, |e| (e.at, &e.event_id));
    Ok(Json(EgressPage { items, next_cursor }))
}
