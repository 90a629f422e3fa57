//! The HTTP surface: routes, OpenAPI document, offline docs.
//!
//! `/`, `/health`, `/openapi.json` and `/docs` are public; everything under
//! `/api/v1` passes through [`auth::require_principal`] first.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router, middleware};
use serde::Serialize;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_swagger_ui::SwaggerUi;

use crate::app::AppState;
use crate::auth;

pub mod audit;
pub mod chat;
pub mod error;
pub mod extract;
pub mod sessions;
pub mod users;

use error::{ApiError, ErrorBody};
use extract::BodyLimit;

/// Version reported by `/` and `/health`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Claude Agent HTTP API", description = "Multi-tenant HTTP/SSE service hosting the Claude Code CLI."),
    paths(
        root, health,
        sessions::create_session, sessions::list_sessions, sessions::get_session,
        sessions::delete_session, sessions::resume_session,
        chat::chat, chat::chat_stream, chat::session_stream, chat::messages, chat::interrupt, chat::usage, audit::model_requests,
        audit::egress,
        users::create_user, users::list_users, users::get_user, users::delete_user, users::me,
        users::set_allowed_domains,
        users::create_token, users::list_tokens, users::delete_token,
    ),
    components(schemas(ErrorBody, error::FieldError, sessions::SessionPage)),
    modifiers(&BearerAuth, &CommonResponses),
    tags(
        (name = "sessions", description = "Sessions of the Claude CLI"),
        (name = "chat", description = "Chat turns, sync and streamed"),
        (name = "users", description = "Users and API tokens"),
        (name = "audit", description = "What the model and egress proxies saw"),
        (name = "service", description = "Service information"),
    )
)]
pub struct ApiDoc;

/// Declares the `bearer` security scheme the routes refer to.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// Documents the error answers every route can give before its handler
/// runs, where they are produced (the auth middleware, [`extract::ApiJson`],
/// [`extract::ApiQuery`], the store), so no route's list can miss one:
/// 401, 429 (`api.requests_per_second_per_user`) and 503 (storage down) on
/// every `/api/v1` route; 413, 415 and 422 on routes with a body; 422 on
/// routes with query parameters. A route's own description of a status wins.
struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::{Operation, ParameterIn};
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};

        let add = |operation: &mut Operation, status: &str, description: &str| {
            let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
            let response = ResponseBuilder::new().description(description).content("application/json", content);
            operation.responses.responses.entry(status.to_owned()).or_insert_with(|| response.build().into());
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let api = path.starts_with("/api/v1/");
            let operations = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
            for operation in operations.into_iter().flatten() {
                if api {
                    add(operation, "401", "Not authenticated (no, unknown, expired or revoked token)");
                    add(operation, "429", "Too many requests from this user (`Retry-After` says when to retry)");
                    add(operation, "503", "Storage is unavailable");
                }
                if operation.request_body.is_some() {
                    add(operation, "413", "Body larger than `api.max_body_bytes`");
                    add(operation, "415", "Content-Type is not JSON");
                    add(operation, "422", "Validation error (`detail` lists each field)");
                }
                let has_query =
                    operation.parameters.iter().flatten().any(|p| matches!(p.parameter_in, ParameterIn::Query));
                if has_query {
                    add(operation, "422", "Bad query (`detail` lists each parameter)");
                }
            }
        }
    }
}

/// Builds the whole router for `state`.
pub fn router(state: AppState) -> Router {
    let limit = state.config.api.max_body_bytes;
    let api = Router::new()
        .route("/sessions", post(sessions::create_session).get(sessions::list_sessions))
        .route("/sessions/{session_id}", get(sessions::get_session).delete(sessions::delete_session))
        .route("/sessions/{session_id}/resume", post(sessions::resume_session))
        .route("/sessions/{session_id}/interrupt", post(chat::interrupt))
        .route("/sessions/{session_id}/stream", get(chat::session_stream))
        .route("/sessions/{session_id}/messages", get(chat::messages))
        .route("/chat", post(chat::chat))
        .route("/chat/stream", post(chat::chat_stream))
        .route("/usage", get(chat::usage))
        .route("/audit/model-requests", get(audit::model_requests))
        .route("/audit/egress", get(audit::egress))
        .route("/users", post(users::create_user).get(users::list_users))
        .route("/users/{user_id}", get(users::get_user).delete(users::delete_user))
        .route("/users/{user_id}/tokens", post(users::create_token).get(users::list_tokens))
        .route("/users/{user_id}/allowed-domains", put(users::set_allowed_domains))
        .route("/tokens/{token_id}", delete(users::delete_token))
        .route("/me", get(users::me))
        .route_layer(middleware::from_fn(refuse_undecodable_uri))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_principal));

    Router::new()
        .route("/", get(root))
        .route("/health", get(health))
        .route("/metrics", get(crate::metrics::metrics))
        .merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
        .nest("/api/v1", api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::Extension(BodyLimit(limit)))
        .layer(cors_layer(&state.config.api.cors_origins))
        .layer(middleware::from_fn_with_state(state.clone(), crate::metrics::track))
        .layer(middleware::from_fn(crate::request_id::request_id))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// CORS per `api.cors_origins`: `*` allows any origin without credentials
/// (browsers refuse credentials with a wildcard); a list allows those with.
fn cors_layer(origins: &[String]) -> CorsLayer {
    let methods = [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS];
    if origins.is_empty() {
        return CorsLayer::new();
    }
    if origins.iter().any(|o| o == "*") {
        return CorsLayer::new()
            .allow_origin(AllowOrigin::any())
            .allow_methods(methods)
            .allow_headers(tower_http::cors::Any);
    }
    let list: Vec<HeaderValue> = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    CorsLayer::new()
        .allow_origin(list)
        .allow_methods(methods)
        .allow_headers([axum::http::header::AUTHORIZATION, axum::http::header::CONTENT_TYPE])
        .allow_credentials(true)
}

/// Refuses, after authentication and before any handler, a URI that no id or
/// query value of this API can match: a path that decodes to a NUL character
/// or to bytes that are not UTF-8, and a query holding a NUL. PostgreSQL
/// cannot store NUL in text, so looking such an id up failed with a 500, and
/// axum's own rejection of a non-UTF-8 path parameter is a plain-text 400. A
/// path answers 404 (as any unknown id), a query 422.
async fn refuse_undecodable_uri(request: axum::extract::Request, next: middleware::Next) -> Response {
    let uri = request.uri();
    let path = percent_decode(uri.path());
    if path.contains(&0) || std::str::from_utf8(&path).is_err() {
        return ApiError::NotFound("Not Found".into()).into_response();
    }
    if let Some(query) = uri.query()
        && percent_decode(query).contains(&0)
    {
        let error = error::FieldError::new(
            "value_error",
            ["query".into()],
            "query parameters must not contain NUL characters",
            query.into(),
        );
        return ApiError::Validation(vec![error]).into_response();
    }
    next.run(request).await
}

/// `%XY` sequences decoded, anything else (a stray `%` included) kept as is,
/// as axum decodes path parameters.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let hex = |i: usize| bytes.get(i).and_then(|b| char::from(*b).to_digit(16));
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(high), Some(low)) => {
                decoded.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    decoded
}

async fn not_found() -> ApiError {
    ApiError::NotFound("Not Found".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RootInfo {
    name: &'static str,
    version: &'static str,
    docs: &'static str,
    health: &'static str,
}

/// Service information (the seed's root document).
#[utoipa::path(get, path = "/", tag = "service", responses((status = 200, body = RootInfo)))]
pub async fn root() -> Json<RootInfo> {
    Json(RootInfo { name: "Claude Agent HTTP API", version: VERSION, docs: "/docs", health: "/health" })
}

/// `/health`: the seed's fields, plus whether storage answered.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    /// `healthy` or `unhealthy`.
    status: &'static str,
    version: &'static str,
    active_sessions: u64,
    /// Warm CLI processes held by the server.
    in_memory_clients: u64,
    memory_mb: f64,
    storage_type: &'static str,
    uptime_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Health: 200 when storage answers, else 503 (no authentication).
#[utoipa::path(
    get, path = "/health", tag = "service",
    responses((status = 200, body = HealthResponse), (status = 503, body = HealthResponse))
)]
pub async fn health(State(state): State<AppState>) -> Response {
    let store = state.store.clone();
    let probe = async move {
        store.ping().await?;
        store.count_sessions(None, crate::store::SessionStatus::Active).await
    };
    let (status, active_sessions, error) = match tokio::time::timeout(Duration::from_secs(3), probe).await {
        Ok(Ok(active)) => (StatusCode::OK, active, None),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check: storage failed");
            (StatusCode::SERVICE_UNAVAILABLE, 0, Some("storage unavailable".to_owned()))
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, 0, Some("storage did not answer within 3 s".to_owned())),
    };
    let body = HealthResponse {
        status: if status == StatusCode::OK { "healthy" } else { "unhealthy" },
        version: VERSION,
        active_sessions,
        in_memory_clients: 0,
        memory_mb: crate::app::resident_memory_mb().unwrap_or(0.0),
        storage_type: state.store.kind().as_str(),
        uptime_seconds: state.started.elapsed().as_secs_f64(),
        error,
    };
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn percent_decoding_keeps_what_is_not_an_escape() {
        assert_eq!(percent_decode("a%00b"), b"a\0b");
        assert_eq!(percent_decode("%FF%fe/x"), b"\xff\xfe/x");
        assert_eq!(percent_decode("100%"), b"100%");
        assert_eq!(percent_decode("%zz%4"), b"%zz%4");
        assert_eq!(percent_decode("%2525"), b"%25");
    }
}
