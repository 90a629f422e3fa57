//! Who is calling: Bearer API tokens (stored as SHA-256 hashes), a user name
//! in a header set by a trusted reverse proxy, or nobody (loopback-only
//! development).
//!
//! Every `/api/v1` route goes through [`require_principal`]; handlers take
//! the resulting [`Principal`] as an extractor and ask it what the caller may
//! touch ([`Principal::can_act_for`]).

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::api::error::ApiError;
use crate::app::AppState;
use crate::config::AuthMode;
use crate::store::{self, ApiToken, Role, Store, StoreError, StoreResult, User};

/// Prefix of every token we issue, so leaked tokens are easy to grep for.
pub const TOKEN_PREFIX: &str = "cah_";
/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;
/// Label of the token that mirrors `CLAUDE_AGENT_ADMIN_TOKEN`.
pub const CONFIGURED_ADMIN_LABEL: &str = "configured admin token (CLAUDE_AGENT_ADMIN_TOKEN)";
/// The user created on first start.
pub const BOOTSTRAP_ADMIN: &str = "admin";
/// The principal of `auth.mode: none`.
pub const ANONYMOUS_ADMIN: &str = "local";

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: String,
    pub role: Role,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Whether the caller may see and change `owner`'s resources.
    pub fn can_act_for(&self, owner: &str) -> bool {
        self.is_admin() || self.user_id == owner
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // Set by `require_principal`; absent only if a route was mounted
        // outside the authenticated router, which is a bug, so fail closed.
        parts.extensions.get::<Principal>().cloned().ok_or(ApiError::Unauthorized)
    }
}

/// A freshly issued token: the secret (shown once) and what is stored.
#[derive(Debug)]
pub struct IssuedToken {
    pub secret: String,
    pub record: ApiToken,
}

/// Creates a random token for `user_id`.
pub fn issue_token(user_id: &str, label: Option<String>) -> IssuedToken {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let record = token_record(user_id, &secret, label);
    IssuedToken { secret, record }
}

/// The stored form of a token whose secret is `secret`.
fn token_record(user_id: &str, secret: &str, label: Option<String>) -> ApiToken {
    ApiToken {
        token_id: uuid::Uuid::new_v4().to_string(),
        user_id: user_id.to_owned(),
        token_hash: hash_token(secret),
        label,
        created_at: store::now(),
        expires_at: None,
        last_used_at: None,
    }
}

/// SHA-256, hex. Tokens carry 256 random bits, so a fast hash is enough: no
/// dictionary exists to attack it with.
pub fn hash_token(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Outcome of [`bootstrap_admin`] that the caller must report.
#[derive(Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// Users existed and no admin token is configured.
    Unchanged,
    /// The configured admin token is in place.
    ConfiguredToken,
    /// First start without a configured token: this one, to print once.
    GeneratedToken(String),
}

/// Makes sure an admin can log in: on first start (no users), creates the
/// `admin` user; when `CLAUDE_AGENT_ADMIN_TOKEN` is set, makes it that
/// admin's token (replacing an earlier configured one, so rotation works).
pub async fn bootstrap_admin(store: &dyn Store, configured: Option<&str>) -> StoreResult<Bootstrap> {
    let first_start = store.count_users().await? == 0;
    if !first_start && configured.is_none() {
        return Ok(Bootstrap::Unchanged);
    }
    match store.get_user(BOOTSTRAP_ADMIN).await? {
        Some(user) if user.role != Role::Admin => {
            return Err(StoreError::Internal(format!(
                "user {BOOTSTRAP_ADMIN:?} exists but is not an admin; cannot attach the configured admin token"
            )));
        }
        Some(_) => {}
        None => {
            let admin = User {
                user_id: BOOTSTRAP_ADMIN.into(),
                role: Role::Admin,
                created_at: store::now(),
                uid: None,
                allowed_domains: None,
            };
            match store.create_user(&admin).await {
                Ok(()) | Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    let Some(secret) = configured else {
        let issued = issue_token(BOOTSTRAP_ADMIN, Some("generated at first start".into()));
        store.create_token(&issued.record).await?;
        return Ok(Bootstrap::GeneratedToken(issued.secret));
    };
    let hash = hash_token(secret);
    let keep = match store.authenticate_token(&hash, store::now()).await? {
        Some((token, _)) => token.token_id,
        None => {
            let record = token_record(BOOTSTRAP_ADMIN, secret, Some(CONFIGURED_ADMIN_LABEL.into()));
            store.create_token(&record).await?;
            record.token_id
        }
    };
    store.delete_tokens_by_label(BOOTSTRAP_ADMIN, CONFIGURED_ADMIN_LABEL, &keep).await?;
    Ok(Bootstrap::ConfiguredToken)
}

/// Middleware on every `/api/v1` route: resolves the caller per `auth.mode`
/// and stores the [`Principal`] in the request's extensions.
pub async fn require_principal(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    // Only `Sync` parts of the request may be held across an await.
    let headers = request.headers().clone();
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|info| info.0.ip());
    let principal = match state.config.auth.mode {
        AuthMode::Token => principal_from_token(&state, &headers).await?,
        AuthMode::Header => principal_from_header(&state, &headers, peer).await?,
        AuthMode::None => Principal { user_id: ANONYMOUS_ADMIN.into(), role: Role::Admin },
    };
    if let Err(wait) = state.rate_limiter.check(&principal.user_id) {
        return Err(ApiError::TooManyRequests {
            message: format!(
                "Too many requests for user {}: at most {} per second",
                principal.user_id, state.config.api.requests_per_second_per_user
            ),
            retry_after_secs: wait.as_secs().max(1),
        });
    }
    request.extensions_mut().insert(principal);
    Ok(next.run(request).await)
}

async fn principal_from_token(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let header = headers.get(axum::http::header::AUTHORIZATION).ok_or(ApiError::Unauthorized)?;
    let value = header.to_str().map_err(|_| ApiError::Unauthorized)?;
    let (scheme, secret) = value.split_once(' ').ok_or(ApiError::Unauthorized)?;
    if !scheme.eq_ignore_ascii_case("bearer") || secret.trim().is_empty() {
        return Err(ApiError::Unauthorized);
    }
    let (_, user) = state
        .store
        .authenticate_token(&hash_token(secret.trim()), store::now())
        .await?
        .ok_or(ApiError::Unauthorized)?;
    Ok(Principal { user_id: user.user_id, role: user.role })
}

async fn principal_from_header(
    state: &AppState,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Result<Principal, ApiError> {
    let auth = &state.config.auth;
    // Only the configured proxies may assert a user name; anyone else could
    // simply set the header.
    if !peer.is_some_and(|ip| auth.trusted_proxies.contains(&ip)) {
        return Err(ApiError::Unauthorized);
    }
    let name = headers.get(auth.header_name.as_str()).and_then(|v| v.to_str().ok()).ok_or(ApiError::Unauthorized)?;
    shared::names::validate_user_id(name).map_err(|_| ApiError::Unauthorized)?;
    let role = if auth.admin_users.iter().any(|a| a == name) { Role::Admin } else { Role::User };
    // The proxy is the identity provider: its users exist here on first use.
    let user = match state.store.get_user(name).await? {
        Some(user) => user,
        None => {
            let user =
                User { user_id: name.to_owned(), role, created_at: store::now(), uid: None, allowed_domains: None };
            match state.store.create_user(&user).await {
                Ok(()) | Err(StoreError::Conflict(_)) => user,
                Err(e) => return Err(e.into()),
            }
        }
    };
    Ok(Principal { user_id: user.user_id, role })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn tokens_are_long_random_and_hashed() {
        let a = issue_token("alice", None);
        let b = issue_token("alice", None);
        assert_ne!(a.secret, b.secret);
        assert!(a.secret.starts_with(TOKEN_PREFIX) && a.secret.len() >= TOKEN_PREFIX.len() + 43);
        assert_eq!(a.record.token_hash, hash_token(&a.secret));
        assert!(!a.record.token_hash.contains(&a.secret));
    }

    #[tokio::test]
    async fn bootstrap_creates_admin_once_and_rotates_configured_token() {
        let store = MemoryStore::default();
        let Bootstrap::GeneratedToken(first) = bootstrap_admin(&store, None).await.expect("bootstrap") else {
            panic!("first start must generate a token");
        };
        assert!(store.authenticate_token(&hash_token(&first), store::now()).await.expect("auth").is_some());
        assert_eq!(bootstrap_admin(&store, None).await.expect("again"), Bootstrap::Unchanged);

        let one = "x".repeat(40);
        let two = "y".repeat(40);
        assert_eq!(bootstrap_admin(&store, Some(&one)).await.expect("one"), Bootstrap::ConfiguredToken);
        assert_eq!(bootstrap_admin(&store, Some(&one)).await.expect("idempotent"), Bootstrap::ConfiguredToken);
        assert_eq!(store.list_tokens(BOOTSTRAP_ADMIN).await.expect("list").len(), 2);
        bootstrap_admin(&store, Some(&two)).await.expect("two");
        assert!(store.authenticate_token(&hash_token(&one), store::now()).await.expect("auth").is_none());
        assert!(store.authenticate_token(&hash_token(&two), store::now()).await.expect("auth").is_some());
    }
}
