//! The model proxy: the only model endpoint a sandbox can reach.
//!
//! Users' agents run arbitrary commands, so whatever a CLI's environment
//! holds, its user can read. The operator's credentials therefore never
//! leave the control plane: each CLI process gets a random credential of
//! its own and `ANTHROPIC_BASE_URL` pointing here, on loopback. The proxy
//! maps the credential to its session and user, checks the user's budget
//! and rate limits, swaps in the upstream credentials and forwards the
//! request; the response streams back byte for byte while a
//! [`meter::ResponseMeter`] reads its usage and tool calls on the side.
//! Every request lands in the audit log (`model_requests`), the source of
//! truth for usage. A credential dies with its CLI process.

pub mod egress;
pub mod meter;
pub mod network;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures::Stream;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ModelProxyConfig, Secret};
use crate::metrics::Metrics;
use crate::store::{self, ModelRequest, Store};
use meter::ResponseMeter;

/// Largest request body forwarded (the CLI's requests carry the whole
/// conversation).
const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
/// How long a user's spend read from the store is trusted before it is read
/// again (requests recorded by this server are added as they finish).
const SPEND_REFRESH: Duration = Duration::from_secs(60);
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Headers that belong to one connection: neither proxy forwards them.
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];
/// What the model proxy drops besides: what it sets itself, the sandbox's
/// credential (replaced by the upstream's), and compression (identity, so
/// the meter can read the body).
const REPLACED_HEADERS: &[&str] =
    &["transfer-encoding", "host", "content-length", "x-api-key", "authorization", "accept-encoding"];

/// Whose a credential is.
#[derive(Debug, Clone)]
struct Grant {
    user_id: String,
    session_id: String,
}

/// A user's recent requests and tokens, for the per-minute limits.
#[derive(Debug, Default)]
struct RateWindow {
    requests: VecDeque<Instant>,
    tokens: VecDeque<(Instant, u64)>,
}

impl RateWindow {
    fn prune(&mut self, now: Instant) {
        while self.requests.front().is_some_and(|t| now.duration_since(*t) >= RATE_WINDOW) {
            self.requests.pop_front();
        }
        while self.tokens.front().is_some_and(|(t, _)| now.duration_since(*t) >= RATE_WINDOW) {
            self.tokens.pop_front();
        }
    }
}

/// The proxy's state; cheap to share.
pub struct ModelProxy {
    config: ModelProxyConfig,
    /// Upstream base URL, without a trailing slash.
    upstream: String,
    api_key: Option<Secret>,
    auth_token: Option<Secret>,
    client: reqwest::Client,
    store: Arc<dyn Store>,
    /// SHA-256 of each live credential → its grant.
    grants: Mutex<HashMap<[u8; 32], Grant>>,
    /// Each user's spend in the budget window, and when it was read.
    spend: Mutex<HashMap<String, (f64, Instant)>>,
    rates: Mutex<HashMap<String, RateWindow>>,
    /// Audit writes in flight (waited for at shutdown).
    writes: TaskTracker,
    metrics: Arc<Metrics>,
    addr: SocketAddr,
}

impl std::fmt::Debug for ModelProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelProxy").field("addr", &self.addr).field("upstream", &self.upstream).finish_non_exhaustive()
    }
}

/// The proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("model proxy: cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("model proxy: HTTP client: {0}")]
    Client(String),
}

impl ModelProxy {
    /// Binds the proxy's loopback listener.
    pub async fn bind(
        config: &Config,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Self>, TcpListener), ProxyError> {
        let proxy = &config.model_proxy;
        let addr = format!("{}:{}", proxy.host, proxy.port);
        let listener =
            TcpListener::bind(&addr).await.map_err(|source| ProxyError::Bind { addr: addr.clone(), source })?;
        let addr = listener.local_addr().map_err(|source| ProxyError::Bind { addr, source })?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ProxyError::Client(e.to_string()))?;
        let upstream =
            config.anthropic.base_url.as_deref().unwrap_or("https://api.anthropic.com").trim_end_matches('/');
        let proxy = Arc::new(Self {
            config: proxy.clone(),
            upstream: upstream.to_owned(),
            api_key: config.anthropic.api_key.clone(),
            auth_token: config.anthropic.auth_token.clone(),
            client,
            store,
            grants: Mutex::default(),
            spend: Mutex::default(),
            rates: Mutex::default(),
            writes: TaskTracker::new(),
            metrics,
            addr,
        });
        Ok((proxy, listener))
    }

    /// Where the CLIs reach the proxy.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Serves until `shutdown`, then waits for audit writes in flight.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
        use axum::serve::ListenerExt;
        let router = axum::Router::new().fallback(forward).with_state(self.clone());
        // Streamed events are small writes: without TCP_NODELAY, Nagle's
        // algorithm holds each behind the client's delayed ACK (~40 ms).
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let result = axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        self.writes.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.writes.wait()).await;
        result
    }

    /// A new credential for one CLI process of `session_id`.
    pub fn issue(&self, user_id: &str, session_id: &str) -> Secret {
        let credential = format!("cah-{}", hex(&rand::random::<[u8; 32]>()));
        let grant = Grant { user_id: user_id.to_owned(), session_id: session_id.to_owned() };
        self.lock_grants().insert(digest(&credential), grant);
        Secret::new(credential)
    }

    /// The credential's process is gone: from now on it gets 401.
    pub fn revoke(&self, credential: &Secret) {
        self.lock_grants().remove(&digest(credential.expose()));
    }

    /// Every credential of a session (deleted, expired).
    pub fn revoke_session(&self, session_id: &str) {
        self.lock_grants().retain(|_, grant| grant.session_id != session_id);
    }

    /// The user is deleted: their cached spend and request windows go.
    pub fn forget_user(&self, user_id: &str) {
        self.lock_grants().retain(|_, grant| grant.user_id != user_id);
        if let Ok(mut spend) = self.spend.lock() {
            spend.remove(user_id);
        }
        if let Ok(mut rates) = self.rates.lock() {
            rates.remove(user_id);
        }
    }

    fn lock_grants(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Grant>> {
        self.grants.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The (user, session) a live credential belongs to.
    pub fn owner_of(&self, credential: &str) -> Option<(String, String)> {
        self.lock_grants().get(&digest(credential)).map(|g| (g.user_id.clone(), g.session_id.clone()))
    }

    fn grant(&self, headers: &HeaderMap) -> Option<Grant> {
        let credential = headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .or_else(|| headers.get("authorization")?.to_str().ok()?.strip_prefix("Bearer "))?;
        self.lock_grants().get(&digest(credential.trim())).cloned()
    }

    /// Why this user may not send a request now, if they may not.
    async fn refusal(&self, user_id: &str) -> Option<Refusal> {
        if let Some(budget) = self.config.user_budget_usd {
            let spent = self.spent(user_id).await;
            if spent >= budget {
                return Some(Refusal::Budget { spent, budget });
            }
        }
        let (rpm, tpm) = (self.config.requests_per_minute, self.config.tokens_per_minute);
        if rpm == 0 && tpm == 0 {
            return None;
        }
        let now = Instant::now();
        let mut rates = self.rates.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let window = rates.entry(user_id.to_owned()).or_default();
        window.prune(now);
        let wait_for = |since: Instant| RATE_WINDOW.saturating_sub(now.duration_since(since)).as_secs().max(1);
        if rpm > 0 && window.requests.len() >= rpm as usize {
            let retry_after = window.requests.front().map_or(1, |t| wait_for(*t));
            return Some(Refusal::Rate { what: format!("{rpm} requests per minute"), retry_after });
        }
        let tokens: u64 = window.tokens.iter().map(|(_, n)| n).sum();
        if tpm > 0 && tokens >= tpm {
            let retry_after = window.tokens.front().map_or(1, |(t, _)| wait_for(*t));
            return Some(Refusal::Rate { what: format!("{tpm} tokens per minute"), retry_after });
        }
        window.requests.push_back(now);
        None
    }

    /// The user's spend in the budget window.
    async fn spent(&self, user_id: &str) -> f64 {
        let cached = self.spend.lock().ok().and_then(|s| s.get(user_id).copied());
        if let Some((usd, read_at)) = cached
            && read_at.elapsed() < SPEND_REFRESH
        {
            return usd;
        }
        let since = (self.config.budget_window_hours > 0)
            .then(|| store::now() - chrono::TimeDelta::hours(i64::from(self.config.budget_window_hours)));
        match self.store.model_usage(user_id, since).await {
            Ok((_, usage)) => {
                if let Ok(mut spend) = self.spend.lock() {
                    spend.insert(user_id.to_owned(), (usage.total_cost_usd, Instant::now()));
                }
                usage.total_cost_usd
            }
            Err(e) => {
                crate::metrics::store_error(&e);
                // Fail closed: without the spend, the budget cannot be checked.
                tracing::warn!(%user_id, error = %e, "cannot read the user's spend");
                f64::INFINITY
            }
        }
    }

    /// Writes an audit row (in the background) and counts its cost and
    /// tokens against the user.
    fn record(self: &Arc<Self>, request: ModelRequest) {
        let usage = &request.usage;
        let refused = matches!(request.status, 401 | 403 | 429);
        self.metrics.model_request(refused, usage.input_tokens, usage.output_tokens, usage.total_cost_usd);
        let tokens = u64::try_from(request.usage.input_tokens + request.usage.output_tokens).unwrap_or_default();
        if let Ok(mut spend) = self.spend.lock()
            && let Some((usd, _)) = spend.get_mut(&request.user_id)
        {
            *usd += request.usage.total_cost_usd;
        }
        // Kept only while a token limit reads them, and pruned as they are
        // added (a window nobody prunes would grow with every request).
        if tokens > 0
            && self.config.tokens_per_minute > 0
            && let Ok(mut rates) = self.rates.lock()
        {
            let now = Instant::now();
            let window = rates.entry(request.user_id.clone()).or_default();
            window.prune(now);
            window.tokens.push_back((now, tokens));
        }
        let proxy = self.clone();
        self.writes.spawn(async move {
            if let Err(e) = proxy.store.record_model_request(&request).await {
                crate::metrics::store_error(&e);
                tracing::warn!(request_id = %request.request_id, error = %e, "cannot record a model request");
            }
        });
    }
}

fn digest(credential: &str) -> [u8; 32] {
    Sha256::digest(credential.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why the proxy answered instead of the model.
#[derive(Debug)]
enum Refusal {
    Budget { spent: f64, budget: f64 },
    Rate { what: String, retry_after: u64 },
}

impl Refusal {
    fn response(&self) -> Response {
        match self {
            Self::Budget { spent, budget } => anthropic_error(
                StatusCode::FORBIDDEN,
                "permission_error",
                &format!("Budget exhausted: this user has spent ${spent:.4} of a ${budget:.2} budget"),
            ),
            Self::Rate { what, retry_after } => {
                let mut response = anthropic_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    &format!("Rate limit: at most {what} for this user"),
                );
                response.headers_mut().insert("retry-after", HeaderValue::from(*retry_after));
                response
            }
        }
    }
}

/// An error in the Anthropic API's shape, which the CLI shows to its user.
fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    (status, [("content-type", "application/json")], body.to_string()).into_response()
}

/// What is known about a request before its response ends.
struct Exchange {
    proxy: Arc<ModelProxy>,
    grant: Grant,
    request_id: String,
    at: DateTime<Utc>,
    started: Instant,
    method: String,
    path: String,
    model: Option<String>,
}

impl Exchange {
    fn finish(self, status: u16, meter: Option<&ResponseMeter>, refusal: Option<String>) {
        let usage = meter.map(|m| m.totals(&self.proxy.config.prices)).unwrap_or_default();
        // PostgreSQL text cannot hold NUL; the model name comes from the sandbox.
        let model = meter.and_then(|m| m.model.clone()).or(self.model).map(|m| m.replace('\0', "\u{fffd}"));
        let record = ModelRequest {
            request_id: self.request_id,
            user_id: self.grant.user_id,
            session_id: self.grant.session_id,
            at: self.at,
            method: self.method,
            path: self.path,
            model,
            status: i32::from(status),
            usage,
            duration_ms: i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX),
            tool_calls: meter.map_or_else(|| Value::Array(Vec::new()), ResponseMeter::tool_calls),
            refusal,
        };
        self.proxy.record(record);
    }
}

/// Every request: authenticate, check limits, forward, stream back, meter.
async fn forward(State(proxy): State<Arc<ModelProxy>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Some(grant) = proxy.grant(&parts.headers) else {
        tracing::warn!(path = %parts.uri.path(), "model proxy: unknown or expired credential");
        return anthropic_error(StatusCode::UNAUTHORIZED, "authentication_error", "invalid or expired credential");
    };
    let mut exchange = Exchange {
        proxy: proxy.clone(),
        grant,
        request_id: uuid::Uuid::new_v4().to_string(),
        at: store::now(),
        started: Instant::now(),
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        model: None,
    };
    if let Some(refusal) = proxy.refusal(&exchange.grant.user_id).await {
        let response = refusal.response();
        exchange.finish(response.status().as_u16(), None, Some(format!("{refusal:?}")));
        return response;
    }
    let body = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(body) => body,
        Err(e) => {
            let response = anthropic_error(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", &e.to_string());
            exchange.finish(413, None, Some("request body too large or unreadable".into()));
            return response;
        }
    };
    let streaming = match serde_json::from_slice::<Value>(&body) {
        Ok(json) => {
            exchange.model = json["model"].as_str().map(str::to_owned);
            json["stream"] == true
        }
        Err(_) => false,
    };

    let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let url = format!("{}{}{query}", proxy.upstream, parts.uri.path());
    let mut headers = parts.headers.clone();
    for name in HOP_BY_HOP.iter().chain(REPLACED_HEADERS) {
        headers.remove(*name);
    }
    if let Some(key) = &proxy.api_key
        && let Ok(value) = HeaderValue::from_str(key.expose())
    {
        headers.insert("x-api-key", value);
    }
    if let Some(token) = &proxy.auth_token
        && let Ok(value) = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
    {
        headers.insert("authorization", value);
    }
    let upstream = proxy.client.request(parts.method.clone(), url).headers(headers).body(body).send().await;
    let upstream = match upstream {
        Ok(response) => response,
        Err(e) => {
            // Never echo the URL's credentials or the error's details.
            tracing::warn!(error = %e.without_url(), "model proxy: upstream unreachable");
            exchange.finish(502, None, Some("upstream unreachable".into()));
            return anthropic_error(StatusCode::BAD_GATEWAY, "api_error", "the model API is unreachable");
        }
    };
    let status = upstream.status();
    let mut response_headers = upstream.headers().clone();
    for name in HOP_BY_HOP.iter().chain(REPLACED_HEADERS) {
        response_headers.remove(*name);
    }
    let event_stream = response_headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let metered = MeteredBody {
        inner: Box::pin(upstream.bytes_stream()),
        meter: ResponseMeter::new(streaming || event_stream),
        exchange: Some(exchange),
        status: status.as_u16(),
    };
    let mut response = Response::new(Body::from_stream(metered));
    *response.status_mut() = status;
    *response.headers_mut() = response_headers;
    response.headers_mut().insert(HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"));
    response
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// The upstream body, passed on chunk by chunk as it arrives; the meter
/// reads each chunk on the way. The exchange is recorded when the body ends,
/// fails, or is dropped (the CLI went away).
struct MeteredBody {
    inner: ByteStream,
    meter: ResponseMeter,
    exchange: Option<Exchange>,
    status: u16,
}

impl MeteredBody {
    fn finish(&mut self, refusal: Option<String>) {
        if let Some(exchange) = self.exchange.take() {
            self.meter.finish();
            exchange.finish(self.status, Some(&self.meter), refusal);
        }
    }
}

impl Stream for MeteredBody {
    type Item = reqwest::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.inner.as_mut().poll_next(cx);
        match &polled {
            Poll::Ready(Some(Ok(chunk))) => {
                let chunk = chunk.clone();
                self.meter.feed(&chunk);
            }
            Poll::Ready(Some(Err(_))) => self.finish(Some("upstream response broke off".into())),
            Poll::Ready(None) => self.finish(None),
            Poll::Pending => {}
        }
        polled
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        self.finish(Some("the client went away before the response ended".into()));
    }
}
