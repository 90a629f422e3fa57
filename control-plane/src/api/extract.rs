//! Extractors that turn every malformed request into an [`ApiError`] with
//! the seed's FastAPI shape, never into axum's plain-text rejections.
//!
//! [`ApiJson`] reads the body (413 over `api.max_body_bytes`), checks the
//! content type (415), parses JSON (422 `json_invalid`), maps serde's errors
//! to pydantic's (`missing`, `extra_forbidden`, …, with the field path in
//! `loc`) and finally runs the type's own [`Validate`] rules.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::{ApiError, FieldError};

/// Semantic checks after deserialization; each failure names its field.
pub trait Validate {
    fn validate(&self) -> Vec<FieldError>;
}

/// A JSON body of type `T`, validated.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Validate,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !has_json_content_type(request.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = request.extensions().get::<BodyLimit>().map_or(usize::MAX, |l| l.0);
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::bad_request("unreadable_body", rejection.body_text())
            }
        })?;
        let value = parse_json(&bytes)?;
        let parsed: T = deserialize_body(value)?;
        let errors = parsed.validate();
        if errors.is_empty() { Ok(Self(parsed)) } else { Err(ApiError::Validation(errors)) }
    }
}

/// The configured body limit, put in request extensions by the router so
/// the 413 message can state it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// JSON or a `+json` type; a missing header is taken as JSON, as FastAPI
/// clients often omit it.
fn has_json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return true;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let mime = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::Validation(vec![FieldError::new(
            "json_invalid",
            ["body".into(), e.column().into()],
            format!("JSON decode error: {e}"),
            Value::Object(Default::default()),
        )])
    })
}

/// Deserializes with the path of the failing field, in pydantic's terms.
pub fn deserialize_body<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    let input = value.clone();
    serde_path_to_error::deserialize(value).map_err(|error| {
        let mut loc: Vec<Value> = vec!["body".into()];
        for segment in error.path().iter() {
            match segment {
                serde_path_to_error::Segment::Seq { index } => loc.push((*index).into()),
                serde_path_to_error::Segment::Map { key } => loc.push(key.as_str().into()),
                serde_path_to_error::Segment::Enum { variant } => loc.push(variant.as_str().into()),
                serde_path_to_error::Segment::Unknown => {}
            }
        }
        let message = error.inner().to_string();
        let (kind, msg) = if let Some(field) = backticked(&message, "missing field `") {
            loc.push(field.into());
            ("missing", "Field required".to_owned())
        } else if let Some(field) = backticked(&message, "unknown field `") {
            // The path already ends with the unknown key.
            if loc.last() != Some(&Value::from(field)) {
                loc.push(field.into());
            }
            ("extra_forbidden", "Extra inputs are not permitted".to_owned())
        } else {
            ("type_error", message)
        };
        let field_input = loc.iter().skip(1).try_fold(&input, |v, key| match key {
            Value::String(k) => v.get(k),
            Value::Number(n) => n.as_u64().and_then(|i| v.get(i as usize)),
            _ => None,
        });
        ApiError::Validation(vec![FieldError::new(kind, loc, msg, field_input.cloned().unwrap_or(Value::Null))])
    })
}

/// The name in `` prefix`name` `` at the start of serde's message.
fn backticked<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    message.strip_prefix(prefix)?.split('`').next()
}

/// Query parameters of type `T`; a bad one is a 422 naming `query`.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::Validation(vec![FieldError::new(
                "query_invalid",
                ["query".into()],
                rejection.body_text(),
                parts.uri.query().unwrap_or("").into(),
            )])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        items: Vec<u32>,
    }

    fn error_of(value: Value) -> FieldError {
        match deserialize_body::<Body>(value) {
            Err(ApiError::Validation(mut errors)) => errors.remove(0),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn serde_errors_become_pydantic_errors_with_locations() {
        let missing = error_of(serde_json::json!({"items": []}));
        assert_eq!((missing.kind.as_str(), missing.loc.clone()), ("missing", vec!["body".into(), "name".into()]));
        let extra = error_of(serde_json::json!({"name": "x", "items": [], "nmae": 1}));
        assert_eq!(extra.kind, "extra_forbidden");
        assert_eq!(extra.loc, vec![Value::from("body"), "nmae".into()]);
        let wrong = error_of(serde_json::json!({"name": "x", "items": [1, "two"]}));
        assert_eq!(wrong.kind, "type_error");
        assert_eq!(wrong.loc, vec![Value::from("body"), "items".into(), 1.into()]);
        assert_eq!(wrong.input, Value::from("two"));
    }

    #[test]
    fn deep_nesting_is_a_json_error_not_a_crash() {
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert!(matches!(parse_json(deep.as_bytes()), Err(ApiError::Validation(_))));
    }
}
