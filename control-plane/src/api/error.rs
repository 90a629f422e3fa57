//! The API's one error type and its policy.
//!
//! Policy: every error is JSON, `{"detail": <str or list>, "code": <str>}`,
//! as the seed's FastAPI answered (`detail`), plus a stable machine-readable
//! `code`. Client mistakes say exactly what was wrong and which field.
//! Server-side failures (store errors, bugs) are logged in full and answered
//! with a generic message: no SQL, paths of other users, or secrets ever
//! reach a response body. Another user's resources answer 404, never 403, so
//! ids cannot be probed.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::StoreError;

/// One validation failure, shaped like FastAPI/pydantic's.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FieldError {
    /// pydantic's error type: `missing`, `string_type`, `value_error`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// Where: `["body", "user_id"]`, `["query", "limit"]`.
    pub loc: Vec<serde_json::Value>,
    pub msg: String,
    /// The value that was refused (any JSON value, `null` if not shown).
    pub input: serde_json::Value,
}

impl FieldError {
    pub fn new(
        kind: &str,
        loc: impl IntoIterator<Item = serde_json::Value>,
        msg: impl Into<String>,
        input: serde_json::Value,
    ) -> Self {
        Self { kind: kind.into(), loc: loc.into_iter().collect(), msg: msg.into(), input }
    }

    /// A `value_error` on a body field.
    pub fn body(field: &str, msg: impl Into<String>, input: serde_json::Value) -> Self {
        Self::new("value_error", ["body".into(), field.into()], msg, input)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Not authenticated")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A request that is well-formed JSON but semantically refused (bad
    /// path, bad option) with the field it concerns.
    #[error("{message}")]
    BadRequest { code: &'static str, field: Option<&'static str>, message: String },
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("Request body too large (limit {limit} bytes)")]
    PayloadTooLarge { limit: usize },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("Method not allowed")]
    MethodNotAllowed,
    /// A per-user limit: retry later.
    #[error("{message}")]
    TooManyRequests { message: String, retry_after_secs: u64 },
    /// The server is at capacity or a dependency is down.
    #[error("{message}")]
    Unavailable { message: String, retry_after_secs: u64 },
    /// The CLI or its worker failed during the request.
    #[error("{0}")]
    BadGateway(String),
    /// The CLI did not finish within the request's timeout.
    #[error("{0}")]
    GatewayTimeout(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest { code, field: None, message: message.into() }
    }

    /// A 400 about one request field, named in the body's `field`.
    pub fn bad_field(code: &'static str, field: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest { code, field: Some(field), message: message.into() }
    }

    pub fn session_not_found() -> Self {
        Self::NotFound("Session not found".into())
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::BadRequest { code, .. } => code,
            Self::Validation(_) => "validation_error",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::TooManyRequests { .. } => "rate_limited",
            Self::Unavailable { .. } => "unavailable",
            Self::BadGateway(_) => "cli_failed",
            Self::GatewayTimeout(_) => "timeout",
            Self::Internal(_) => "internal_error",
        }
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A message, or for 422 a list of field errors.
    #[schema(schema_with = detail_schema)]
    pub detail: serde_json::Value,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// The request field a 400 concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'static str>,
}

/// `detail`'s schema: a string, or (422) a list of [`FieldError`].
fn detail_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::String))
        .item(ArrayBuilder::new().items(utoipa::openapi::Ref::from_schema_name("FieldError")))
        .description(Some("A message, or for 422 a list of field errors."))
        .build()
        .into()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let detail = match &self {
            Self::Validation(errors) => serde_json::to_value(errors).unwrap_or_default(),
            Self::Internal(message) => {
                tracing::error!(error = %message, "request failed");
                "Internal server error".into()
            }
            Self::Unavailable { message, .. } => {
                tracing::warn!(error = %message, "service unavailable");
                message.as_str().into()
            }
            other => other.to_string().into(),
        };
        let field = match &self {
            Self::BadRequest { field, .. } => *field,
            _ => None,
        };
        let retry_after = match &self {
            Self::TooManyRequests { retry_after_secs, .. } | Self::Unavailable { retry_after_secs, .. } => {
                Some(*retry_after_secs)
            }
            _ => None,
        };
        let mut response = (status, Json(ErrorBody { detail, code: self.code(), field })).into_response();
        if let Some(secs) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, Self::Unauthorized) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        crate::metrics::store_error(&error);
        match error {
            StoreError::Conflict(_) => Self::Conflict("Resource already exists".into()),
            // The store's message may name hosts or files: log it, answer
            // generically.
            StoreError::Unavailable(message) => {
                tracing::error!(error = %message, "store unavailable");
                Self::Unavailable { message: "Storage is unavailable, try again later".into(), retry_after_secs: 5 }
            }
            StoreError::Internal(message) => Self::Internal(message),
            StoreError::Gone(message) => Self::NotFound(message),
        }
    }
}
