//! Prometheus metrics (`GET /metrics`, text exposition format 0.0.4).
//!
//! Counters and histograms are plain atomics updated on the request path;
//! gauges (sessions, warm CLIs, workers) are read from their owners when
//! scraped. No metric carries a user id, session id or anything secret:
//! labels are route templates, methods, status codes and fixed names.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::app::AppState;
use crate::store::SessionStatus;

/// Store operations that failed (outage or internal error): counted by
/// [`store_error`] wherever one is handled, in requests and in background
/// work alike (a static: an API error's conversion has no state).
static STORE_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Counts a failed store operation; a conflict (the row exists) or a gone
/// row (a session deleted during its turn) is an answer, not a failure.
pub fn store_error(error: &crate::store::StoreError) {
    if !matches!(error, crate::store::StoreError::Conflict(_) | crate::store::StoreError::Gone(_)) {
        STORE_ERRORS.fetch_add(1, Ordering::Relaxed);
    }
}

/// SSE responses being sent now (a client that vanished counts until the
/// server notices: its next write fails).
pub static SSE_STREAMS_OPEN: AtomicU64 = AtomicU64::new(0);
/// SSE streams cut because their reader fell behind the session's buffer.
pub static SSE_STREAMS_LAGGED: AtomicU64 = AtomicU64::new(0);

/// Counts an SSE response in [`SSE_STREAMS_OPEN`] while it lives.
#[derive(Debug)]
pub struct OpenStream(());

impl OpenStream {
    pub fn counted() -> Self {
        SSE_STREAMS_OPEN.fetch_add(1, Ordering::Relaxed);
        Self(())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        SSE_STREAMS_OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Upper bounds of the latency histogram, in seconds.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    total: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (count, bound) in self.counts.iter_mut().zip(BUCKETS) {
            if seconds <= bound {
                *count += 1;
            }
        }
        self.sum += seconds;
        self.total += 1;
    }
}

/// Everything counted since the server started.
#[derive(Debug, Default)]
pub struct Metrics {
    /// (route, method, status) → requests.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    /// route → latency histogram.
    latency: Mutex<BTreeMap<String, Histogram>>,
    /// Chat turns by outcome (`ok`, `error`).
    pub turns_ok: AtomicU64,
    pub turns_failed: AtomicU64,
    /// Sandboxes (workers, CLIs) that could not be started.
    pub sandbox_failures: AtomicU64,
    /// Model requests seen by the model proxy, and what they carried.
    pub model_requests: AtomicU64,
    pub model_refusals: AtomicU64,
    pub input_tokens: AtomicU64,
    pub output_tokens: AtomicU64,
    /// Cost in micro-dollars (an integer counter; exported in dollars).
    pub cost_micro_usd: AtomicU64,
}

impl Metrics {
    fn record(&self, route: &str, method: &str, status: u16, seconds: f64) {
        if let Ok(mut requests) = self.requests.lock() {
            *requests.entry((route.to_owned(), method.to_owned(), status)).or_default() += 1;
        }
        if let Ok(mut latency) = self.latency.lock() {
            latency.entry(route.to_owned()).or_default().observe(seconds);
        }
    }

    /// Counts one model request of the proxy.
    pub fn model_request(&self, refused: bool, input: i64, output: i64, cost_usd: f64) {
        self.model_requests.fetch_add(1, Ordering::Relaxed);
        if refused {
            self.model_refusals.fetch_add(1, Ordering::Relaxed);
        }
        self.input_tokens.fetch_add(u64::try_from(input).unwrap_or(0), Ordering::Relaxed);
        self.output_tokens.fetch_add(u64::try_from(output).unwrap_or(0), Ordering::Relaxed);
        self.cost_micro_usd.fetch_add((cost_usd * 1e6).round().max(0.0) as u64, Ordering::Relaxed);
    }

    /// Counts one finished chat turn.
    pub fn turn(&self, ok: bool) {
        if ok { &self.turns_ok } else { &self.turns_failed }.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(&mut out, "cah_http_requests_total", "counter", "HTTP requests by route template, method and status.");
        if let Ok(requests) = self.requests.lock() {
            for ((route, method, status), count) in requests.iter() {
                let _ = writeln!(
                    out,
                    "cah_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {count}"
                );
            }
        }
        head(&mut out, "cah_http_request_duration_seconds", "histogram", "HTTP request latency by route template.");
        if let Ok(latency) = self.latency.lock() {
            for (route, histogram) in latency.iter() {
                for (bound, count) in BUCKETS.iter().zip(histogram.counts) {
                    let _ = writeln!(
                        out,
                        "cah_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {count}"
                    );
                }
                let _ = writeln!(
                    out,
                    "cah_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}\n\
                     cah_http_request_duration_seconds_sum{{route=\"{route}\"}} {}\n\
                     cah_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                    histogram.total, histogram.sum, histogram.total
                );
            }
        }
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        head(&mut out, "cah_turns_total", "counter", "Chat turns by outcome.");
        let _ = writeln!(out, "cah_turns_total{{outcome=\"ok\"}} {}", load(&self.turns_ok));
        let _ = writeln!(out, "cah_turns_total{{outcome=\"error\"}} {}", load(&self.turns_failed));
        let counters = [
            ("cah_sandbox_failures_total", "Workers or CLIs that could not be started.", load(&self.sandbox_failures)),
            ("cah_store_errors_total", "Store operations that failed.", load(&STORE_ERRORS)),
            ("cah_model_requests_total", "Model requests through the model proxy.", load(&self.model_requests)),
            ("cah_model_refusals_total", "Model requests refused (budget, rate limit).", load(&self.model_refusals)),
            ("cah_sse_streams_lagged_total", "SSE streams cut: the reader fell behind.", load(&SSE_STREAMS_LAGGED)),
        ];
        for (name, help, value) in counters {
            head(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {value}");
        }
        head(&mut out, "cah_model_tokens_total", "counter", "Tokens metered by the model proxy.");
        let _ = writeln!(out, "cah_model_tokens_total{{kind=\"input\"}} {}", load(&self.input_tokens));
        let _ = writeln!(out, "cah_model_tokens_total{{kind=\"output\"}} {}", load(&self.output_tokens));
        head(&mut out, "cah_model_cost_usd_total", "counter", "Cost metered by the model proxy, in USD.");
        let _ = writeln!(out, "cah_model_cost_usd_total {}", load(&self.cost_micro_usd) as f64 / 1e6);
        for (name, help, value) in gauges {
            head(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

/// Counts every request by its route template (never the raw path: ids
/// would make unbounded label sets).
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    state.metrics.record(&route, method, response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

/// A request's method as a label: HTTP lets a client invent methods
/// (`FOO1`, `FOO2`, ...), and each would be a new label set kept forever.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    KNOWN.iter().find(|known| *known == method).map_or("other", Method::as_str)
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let open = state.store.count_sessions(None, SessionStatus::Active).await.map_or(f64::NAN, |n| n as f64);
    let warm = state.supervisor.running_processes().await.len() as f64;
    let workers = state.supervisor.worker_count().await as f64;
    let gauges = [
        ("cah_sessions_open", "Open (active) sessions.", open),
        ("cah_cli_processes_warm", "CLI processes running (warm).", warm),
        ("cah_workers", "Confined workers running (one per active user).", workers),
        ("cah_sse_streams_open", "SSE responses being sent.", SSE_STREAMS_OPEN.load(Ordering::Relaxed) as f64),
        ("cah_uptime_seconds", "Seconds since the server started.", state.started.elapsed().as_secs_f64()),
    ];
    ([("content-type", "text/plain; version=0.0.4")], state.metrics.render(&gauges)).into_response()
}

#[cfg(test)]
mod tests {
    use axum::http::Method;

    use super::*;

    #[test]
    fn invented_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::DELETE), "DELETE");
        for invented in ["FOO1", "FOO2", "PROPFIND"] {
            let method = Method::from_bytes(invented.as_bytes()).expect("a token is a method");
            assert_eq!(method_label(&method), "other", "{invented}");
        }
        let metrics = Metrics::default();
        for invented in ["FOO1", "FOO2"] {
            let method = Method::from_bytes(invented.as_bytes()).expect("method");
            metrics.record("unmatched", method_label(&method), 405, 0.001);
        }
        let text = metrics.render(&[]);
        assert!(text.contains(r#"method="other",status="405"} 2"#), "{text}");
    }
}
