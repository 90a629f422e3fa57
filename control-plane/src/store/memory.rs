//! In-memory store: nothing survives a restart. For development and tests,
//! and for the seed's `session.storage: memory`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};

use super::{
    ApiToken, EgressEvent, EgressEventQuery, ModelRequest, ModelRequestQuery, NewMessage, Session, SessionQuery,
    SessionStatus, Store, StoreError, StoreResult, StoredMessage, UsageTotals, User, check_egress_event,
    check_model_request, listing_cursor, micros_ceil, no_session_for_turn,
};
use crate::config::StorageKind;

#[derive(Debug, Default)]
struct State {
    users: BTreeMap<String, User>,
    /// Tokens by id.
    tokens: HashMap<String, ApiToken>,
    sessions: HashMap<String, Session>,
    /// Each session's history in seq order (seq `i` at index `i - 1`).
    messages: HashMap<String, Vec<StoredMessage>>,
    /// The model proxy's audit log, by request id.
    model_requests: BTreeMap<String, ModelRequest>,
    /// The egress proxy's audit log, by event id.
    egress_events: BTreeMap<String, EgressEvent>,
}

#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> StoreResult<T> {
        let mut state = self.state.lock().map_err(|_| StoreError::Internal("memory store poisoned".into()))?;
        Ok(f(&mut state))
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> StorageKind {
        StorageKind::Memory
    }

    async fn ping(&self) -> StoreResult<()> {
        self.with(|_| ())
    }

    async fn create_user(&self, user: &User) -> StoreResult<()> {
        self.with(|s| {
            if s.users.contains_key(&user.user_id) {
                return Err(StoreError::Conflict(format!("user {}", user.user_id)));
            }
            if user.uid.is_some() && s.users.values().any(|u| u.uid == user.uid) {
                return Err(StoreError::Conflict(format!("uid of user {}", user.user_id)));
            }
            s.users.insert(user.user_id.clone(), user.clone());
            Ok(())
        })?
    }

    async fn get_user(&self, user_id: &str) -> StoreResult<Option<User>> {
        self.with(|s| s.users.get(user_id).cloned())
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        self.with(|s| s.users.values().cloned().collect())
    }

    async fn count_users(&self) -> StoreResult<u64> {
        self.with(|s| s.users.len() as u64)
    }

    async fn delete_user(&self, user_id: &str) -> StoreResult<bool> {
        self.with(|s| {
            if s.users.remove(user_id).is_none() {
                return false;
            }
            s.tokens.retain(|_, t| t.user_id != user_id);
            s.model_requests.retain(|_, r| r.user_id != user_id);
            s.egress_events.retain(|_, e| e.user_id != user_id);
            for session in s.sessions.values_mut().filter(|x| x.user_id == user_id) {
                session.status = SessionStatus::Deleted;
                s.messages.remove(&session.session_id);
            }
            true
        })
    }

    async fn set_user_allowed_domains(&self, user_id: &str, domains: Option<&[String]>) -> StoreResult<bool> {
        self.with(|s| match s.users.get_mut(user_id) {
            Some(user) => {
                user.allowed_domains = domains.map(<[String]>::to_vec);
                true
            }
            None => false,
        })
    }

    async fn assign_uid(&self, user_id: &str, range: (i64, i64)) -> StoreResult<Option<i64>> {
        self.with(|s| {
            let taken: std::collections::HashSet<i64> = s.users.values().filter_map(|u| u.uid).collect();
            let Some(user) = s.users.get_mut(user_id) else { return Ok(None) };
            if let Some(uid) = user.uid {
                return Ok(Some(uid));
            }
            let uid = (range.0..=range.1)
                .find(|uid| !taken.contains(uid))
                .ok_or_else(|| StoreError::Unavailable(format!("uid range {}-{} exhausted", range.0, range.1)))?;
            user.uid = Some(uid);
            Ok(Some(uid))
        })?
    }

    async fn create_token(&self, token: &ApiToken) -> StoreResult<()> {
        self.with(|s| {
            if s.tokens.values().any(|t| t.token_hash == token.token_hash) || s.tokens.contains_key(&token.token_id) {
                return Err(StoreError::Conflict("token".into()));
            }
            // The SQL backends' foreign key.
            if !s.users.contains_key(&token.user_id) {
                return Err(StoreError::Internal(format!("token for unknown user {}", token.user_id)));
            }
            s.tokens.insert(token.token_id.clone(), token.clone());
            Ok(())
        })?
    }

    async fn authenticate_token(&self, token_hash: &str, at: DateTime<Utc>) -> StoreResult<Option<(ApiToken, User)>> {
        self.with(|s| {
            let token =
                s.tokens.values_mut().find(|t| t.token_hash == token_hash && t.expires_at.is_none_or(|e| e > at))?;
            token.last_used_at = Some(at);
            let token = token.clone();
            let user = s.users.get(&token.user_id)?.clone();
            Some((token, user))
        })
    }

    async fn list_tokens(&self, user_id: &str) -> StoreResult<Vec<ApiToken>> {
        self.with(|s| {
            let mut tokens: Vec<_> = s.tokens.values().filter(|t| t.user_id == user_id).cloned().collect();
            tokens.sort_by(|a, b| (a.created_at, &a.token_id).cmp(&(b.created_at, &b.token_id)));
            tokens
        })
    }

    async fn get_token(&self, token_id: &str) -> StoreResult<Option<ApiToken>> {
        self.with(|s| s.tokens.get(token_id).cloned())
    }

    async fn delete_token(&self, token_id: &str) -> StoreResult<bool> {
        self.with(|s| s.tokens.remove(token_id).is_some())
    }

    async fn delete_tokens_by_label(&self, user_id: &str, label: &str, keep: &str) -> StoreResult<u64> {
        self.with(|s| {
            let before = s.tokens.len();
            s.tokens.retain(|id, t| !(t.user_id == user_id && t.label.as_deref() == Some(label) && id != keep));
            (before - s.tokens.len()) as u64
        })
    }

    async fn create_session(&self, session: &Session) -> StoreResult<()> {
        self.with(|s| {
            if s.sessions.contains_key(&session.session_id) {
                return Err(StoreError::Conflict(format!("session {}", session.session_id)));
            }
            s.sessions.insert(session.session_id.clone(), session.clone());
            Ok(())
        })?
    }

    async fn get_session(&self, session_id: &str) -> StoreResult<Option<Session>> {
        self.with(|s| s.sessions.get(session_id).cloned())
    }

    async fn list_sessions(&self, query: &SessionQuery) -> StoreResult<Vec<Session>> {
        let statuses = query.effective_statuses();
        self.with(|s| {
            let mut found: Vec<Session> =
                s.sessions
                    .values()
                    .filter(|x| query.user_id.as_ref().is_none_or(|u| &x.user_id == u))
                    .filter(|x| statuses.contains(&x.status))
                    .filter(|x| {
                        query.after.as_ref().is_none_or(|c| {
                            (x.created_at, x.session_id.as_str()) < (c.created_at, c.session_id.as_str())
                        })
                    })
                    .cloned()
                    .collect();
            // Newest first, ties broken by id, like the SQL backends.
            found.sort_by(|a, b| (b.created_at, &b.session_id).cmp(&(a.created_at, &a.session_id)));
            found.truncate(query.limit as usize);
            found
        })
    }

    async fn count_sessions(&self, user_id: Option<&str>, status: SessionStatus) -> StoreResult<u64> {
        self.with(|s| {
            s.sessions.values().filter(|x| x.status == status && user_id.is_none_or(|u| x.user_id == u)).count() as u64
        })
    }

    async fn set_session_status(
        &self,
        session_id: &str,
        status: SessionStatus,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        self.with(|s| match s.sessions.get_mut(session_id) {
            Some(session) if session.status != SessionStatus::Deleted => {
                session.status = status;
                if status == SessionStatus::Active {
                    session.last_active_at = at;
                }
                if status == SessionStatus::Deleted {
                    s.messages.remove(session_id);
                }
                true
            }
            _ => false,
        })
    }

    async fn touch_session(&self, session_id: &str, at: DateTime<Utc>, messages: i64) -> StoreResult<bool> {
        self.with(|s| match s.sessions.get_mut(session_id) {
            Some(session) if session.status != SessionStatus::Deleted => {
                session.last_active_at = at;
                session.message_count += messages;
                true
            }
            _ => false,
        })
    }

    async fn expire_idle_sessions(&self, cutoff: DateTime<Utc>) -> StoreResult<Vec<String>> {
        self.with(|s| {
            s.sessions
                .values_mut()
                .filter(|x| x.status == SessionStatus::Active && x.last_active_at < cutoff)
                .map(|x| {
                    x.status = SessionStatus::Expired;
                    x.session_id.clone()
                })
                .collect()
        })
    }

    async fn store_turn(
        &self,
        session_id: &str,
        at: DateTime<Utc>,
        messages: &[NewMessage],
        finished: Option<&UsageTotals>,
    ) -> StoreResult<()> {
        if messages.is_empty() && finished.is_none() {
            return Ok(());
        }
        let at = at.trunc_subsecs(6);
        // Parsed before anything changes: a turn is stored whole or not at all.
        let contents = messages
            .iter()
            .map(|m| serde_json::from_str(&m.content))
            .collect::<Result<Vec<serde_json::Value>, _>>()
            .map_err(|e| StoreError::Internal(format!("a message's content is not JSON: {e}")))?;
        self.with(|s| {
            let Some(session) = s.sessions.get_mut(session_id).filter(|x| x.status != SessionStatus::Deleted) else {
                return Err(no_session_for_turn(session_id));
            };
            if let Some(usage) = finished {
                session.last_active_at = at;
                session.message_count += 1;
                session.usage += usage;
            }
            let history = s.messages.entry(session_id.to_owned()).or_default();
            let last = history.last().map_or(0, |m| m.seq);
            history.extend(messages.iter().zip(contents).zip(last + 1..).map(|((m, content), seq)| StoredMessage {
                seq,
                kind: m.kind.clone(),
                content,
                created_at: at,
            }));
            Ok(())
        })?
    }

    async fn list_messages(&self, session_id: &str, after_seq: i64, limit: u32) -> StoreResult<Vec<StoredMessage>> {
        self.with(|s| {
            s.messages
                .get(session_id)
                .map(|history| history.iter().filter(|m| m.seq > after_seq).take(limit as usize).cloned().collect())
                .unwrap_or_default()
        })
    }

    async fn record_model_request(&self, request: &ModelRequest) -> StoreResult<()> {
        check_model_request(request)?;
        self.with(|s| {
            if s.model_requests.contains_key(&request.request_id) {
                return Err(StoreError::Conflict(format!("model request {}", request.request_id)));
            }
            let stored = ModelRequest { at: request.at.trunc_subsecs(6), ..request.clone() };
            s.model_requests.insert(request.request_id.clone(), stored);
            Ok(())
        })?
    }

    async fn list_model_requests(&self, query: &ModelRequestQuery) -> StoreResult<Vec<ModelRequest>> {
        let before = query.before.as_ref().map(listing_cursor);
        self.with(|s| {
            let mut found: Vec<ModelRequest> = s
                .model_requests
                .values()
                .filter(|r| query.user_id.as_ref().is_none_or(|u| &r.user_id == u))
                .filter(|r| query.session_id.as_ref().is_none_or(|x| &r.session_id == x))
                .filter(|r| before.is_none_or(|b| (r.at, r.request_id.as_str()) < b))
                .cloned()
                .collect();
            found.sort_by(|a, b| (b.at, &b.request_id).cmp(&(a.at, &a.request_id)));
            found.truncate(query.limit as usize);
            found
        })
    }

    async fn model_usage(&self, user_id: &str, since: Option<DateTime<Utc>>) -> StoreResult<(i64, UsageTotals)> {
        let since = since.map(micros_ceil);
        self.with(|s| {
            let mut total = (0, UsageTotals::default());
            for r in s.model_requests.values().filter(|r| r.user_id == user_id && since.is_none_or(|t| r.at >= t)) {
                add_request(&mut total, &r.usage)?;
            }
            Ok(total)
        })?
    }

    async fn model_usage_by_session(&self, user_id: &str) -> StoreResult<Vec<(String, i64, UsageTotals)>> {
        self.with(|s| {
            let mut by_session: BTreeMap<&str, (i64, UsageTotals)> = BTreeMap::new();
            for r in s.model_requests.values().filter(|r| r.user_id == user_id) {
                add_request(by_session.entry(&r.session_id).or_default(), &r.usage)?;
            }
            Ok(by_session.into_iter().map(|(id, (count, usage))| (id.to_owned(), count, usage)).collect())
        })?
    }

    async fn record_egress_event(&self, event: &EgressEvent) -> StoreResult<()> {
        check_egress_event(event)?;
        self.with(|s| {
            if s.egress_events.contains_key(&event.event_id) {
                return Err(StoreError::Conflict(format!("egress event {}", event.event_id)));
            }
            let stored = EgressEvent { at: event.at.trunc_subsecs(6), ..event.clone() };
            s.egress_events.insert(event.event_id.clone(), stored);
            Ok(())
        })?
    }

    async fn list_egress_events(&self, query: &EgressEventQuery) -> StoreResult<Vec<EgressEvent>> {
        let before = query.before.as_ref().map(listing_cursor);
        self.with(|s| {
            let mut found: Vec<EgressEvent> = s
                .egress_events
                .values()
                .filter(|e| query.user_id.as_ref().is_none_or(|u| &e.user_id == u))
                .filter(|e| query.session_id.as_ref().is_none_or(|x| &e.session_id == x))
                .filter(|e| query.allowed.is_none_or(|a| e.allowed == a))
                .filter(|e| before.is_none_or(|b| (e.at, e.event_id.as_str()) < b))
                .cloned()
                .collect();
            found.sort_by(|a, b| (b.at, &b.event_id).cmp(&(a.at, &a.event_id)));
            found.truncate(query.limit as usize);
            found
        })
    }
}

/// Counts one more request and adds its usage; `Internal` on overflow, like
/// the SQL backends' sums.
fn add_request(total: &mut (i64, UsageTotals), usage: &UsageTotals) -> StoreResult<()> {
    let overflow = || StoreError::Internal("model usage sum overflows".into());
    let (count, sum) = total;
    *count += 1;
    for (field, add) in [
        (&mut sum.input_tokens, usage.input_tokens),
        (&mut sum.output_tokens, usage.output_tokens),
        (&mut sum.cache_read_tokens, usage.cache_read_tokens),
        (&mut sum.cache_creation_tokens, usage.cache_creation_tokens),
    ] {
        *field = field.checked_add(add).ok_or_else(overflow)?;
    }
    sum.total_cost_usd += usage.total_cost_usd;
    Ok(())
}
