//! A request id for every request: the caller's `X-Request-Id` when it is a
//! plain token, else a new one. It is returned in the `X-Request-Id` header,
//! added to JSON error bodies (`request_id`), and carried by every log line
//! of the request (a tracing span), so a user's error report finds its logs.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::Value;
use tracing::Instrument;

/// Largest error body rewritten to carry the id.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A caller's id is kept only if it cannot smuggle anything into logs.
fn acceptable(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub async fn request_id(request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| acceptable(id))
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned);
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = next.run(request).instrument(span).await;
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if (response.status().is_client_error() || response.status().is_server_error()) && is_json {
        let (mut parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, MAX_ERROR_BODY).await.unwrap_or_default();
        let body = match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(mut object)) => {
                object.insert("request_id".into(), Value::String(id.clone()));
                parts.headers.remove(header::CONTENT_LENGTH);
                Body::from(Value::Object(object).to_string())
            }
            _ => Body::from(bytes),
        };
        response = Response::from_parts(parts, body);
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_plain_tokens_are_kept() {
        assert!(super::acceptable("abc-123_X"));
        assert!(!super::acceptable(""));
        assert!(!super::acceptable("a b"));
        assert!(!super::acceptable("x\ny"));
        assert!(!super::acceptable(&"a".repeat(65)));
    }
}
