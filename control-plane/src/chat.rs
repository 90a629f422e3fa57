//! Chat turns: one user message written to a session's warm CLI (streaming
//! input mode), its output lines read back until the CLI's `result`.
//!
//! A session runs one turn at a time ([`TurnLocks`]); a turn that outlives
//! its deadline is interrupted with the CLI's own `interrupt` control
//! request. The CLI process is started on session create (warm) and
//! restarted with `--resume` when it is gone (idle stop, crash, restart of
//! the server).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{OwnedMutexGuard, broadcast};
use tokio::time::Instant;

use crate::app::AppState;
use crate::store::{Session, UsageTotals};
use crate::workers::sandbox;
use crate::workers::supervisor::{ProcessEvent, SupervisorError};

/// How long an interrupted turn may take to deliver its `result`.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);

/// Per-session turn locks: a second turn while one runs is refused, never
/// queued behind it.
#[derive(Debug, Default)]
pub struct TurnLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl TurnLocks {
    /// The session's lock if it is free. Dropping the guard frees it, so a
    /// client that goes away never leaves its session locked.
    pub fn try_lock(&self, session_id: &str) -> Option<OwnedMutexGuard<()>> {
        let lock = self.0.lock().ok()?.entry(session_id.to_owned()).or_default().clone();
        lock.try_lock_owned().ok()
    }

    pub fn forget(&self, session_id: &str) {
        if let Ok(mut locks) = self.0.lock() {
            locks.remove(session_id);
        }
    }
}

/// Why a turn failed before the CLI produced a result.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error("{0}")]
    Sandbox(#[from] SupervisorError),
    #[error("the session's CLI exited during the turn{0}")]
    Exited(String),
    #[error("no result within {0} s; the turn was interrupted")]
    Timeout(u64),
    #[error("the session's CLI is not reachable")]
    NotRunning,
}

/// What a finished turn produced.
#[derive(Debug, Clone)]
pub struct TurnOutcome {
    /// Every JSON message the CLI wrote during the turn, in order.
    pub messages: Vec<Value>,
    /// The final `result` message.
    pub result: Value,
}

impl TurnOutcome {
    /// The usage and cost of the turn, from the CLI's `result`.
    pub fn usage(&self) -> UsageTotals {
        let usage = &self.result["usage"];
        let int = |key: &str| usage[key].as_i64().unwrap_or(0);
        UsageTotals {
            input_tokens: int("input_tokens"),
            output_tokens: int("output_tokens"),
            cache_read_tokens: int("cache_read_input_tokens"),
            cache_creation_tokens: int("cache_creation_input_tokens"),
            total_cost_usd: self.result["total_cost_usd"].as_f64().unwrap_or(0.0),
        }
    }
}

/// A user message line in the CLI's stream-json input format.
pub fn user_message_line(text: &str) -> String {
    let mut line = json!({"type": "user", "message": {"role": "user", "content": text}}).to_string();
    line.push('\n');
    line
}

/// A control request line (`initialize`, `interrupt`, ...).
pub fn control_request_line(subtype: &str) -> String {
    let id = format!("req_{}", uuid::Uuid::new_v4().simple());
    let mut line = json!({"type": "control_request", "request_id": id, "request": {"subtype": subtype}}).to_string();
    line.push('\n');
    line
}

/// Starts the session's CLI (resuming its conversation when it already had
/// turns) and sends `initialize`, so the first message finds it warm.
pub async fn start_cli(
    state: &AppState,
    session: &Session,
) -> Result<broadcast::Receiver<ProcessEvent>, SupervisorError> {
    let user_dir = state.user_dirs.base_path().join(&session.user_id);
    let privileged = state.supervisor.mode() == crate::config::SandboxMode::Privileged;
    let resume = session.message_count > 0;
    let spec = sandbox::cli_spec(&state.config, session, &user_dir, privileged, resume);
    let events = state.supervisor.start_process(&session.user_id, &session.session_id, spec).await?;
    state.supervisor.write_stdin(&session.user_id, &session.session_id, control_request_line("initialize")).await;
    Ok(events)
}

/// Runs one turn; `on_message` sees every CLI message as it arrives. The
/// caller holds the session's turn lock.
pub async fn run_turn(
    state: &AppState,
    session: &Session,
    text: &str,
    timeout: Duration,
    mut on_message: impl FnMut(&Value),
) -> Result<TurnOutcome, TurnError> {
    let (user, id) = (session.user_id.as_str(), session.session_id.as_str());
    let mut events = match state.supervisor.subscribe(user, id).await {
        Some(events) => events,
        None => start_cli(state, session).await?,
    };
    if !state.supervisor.write_stdin(user, id, user_message_line(text)).await {
        return Err(TurnError::NotRunning);
    }
    let mut deadline = Instant::now() + timeout;
    let mut interrupted = false;
    let mut messages = Vec::new();
    loop {
        let event = match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(event) => event,
            Err(_) if !interrupted => {
                // Ask the CLI to stop; it still answers with a result.
                interrupted = true;
                state.supervisor.write_stdin(user, id, control_request_line("interrupt")).await;
                deadline = Instant::now() + INTERRUPT_GRACE;
                continue;
            }
            Err(_) => {
                state.supervisor.stop_process(user, id, Duration::from_millis(500)).await;
                return Err(TurnError::Timeout(timeout.as_secs()));
            }
        };
        match event {
            Ok(ProcessEvent::Line { stream: shared::protocol::OutputStream::Stdout, line, .. }) => {
                let Ok(message) = serde_json::from_str::<Value>(&line) else {
                    tracing::warn!(session_id = %id, "CLI wrote a line that is not JSON; ignored");
                    continue;
                };
                on_message(&message);
                let is_result = message["type"] == "result";
                if message["type"] != "control_response" {
                    messages.push(message.clone());
                }
                if is_result {
                    if interrupted {
                        return Err(TurnError::Timeout(timeout.as_secs()));
                    }
                    return Ok(TurnOutcome { messages, result: message });
                }
            }
            Ok(ProcessEvent::Line { line, .. }) => tracing::debug!(session_id = %id, %line, "CLI stderr"),
            Ok(ProcessEvent::Exited { code, signal }) => {
                return Err(TurnError::Exited(format!(" (code {code:?}, signal {signal:?})")));
            }
            Ok(ProcessEvent::WorkerDied) => return Err(TurnError::Exited(": its worker died".into())),
            Ok(ProcessEvent::Error(message)) => tracing::warn!(session_id = %id, %message, "worker error"),
            Ok(ProcessEvent::Started { .. } | ProcessEvent::Gap { .. }) => {}
            Err(broadcast::error::RecvError::Lagged(n)) => {
                return Err(TurnError::Exited(format!(": {n} output lines were lost")));
            }
            Err(broadcast::error::RecvError::Closed) => return Err(TurnError::Exited(String::new())),
        }
    }
}
