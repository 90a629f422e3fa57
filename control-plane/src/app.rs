//! The application, built in one place: configuration → store (migrated) →
//! bootstrap admin → users' base directory → router → listener. Tests build
//! it on port 0 through the real binary; `main` only parses arguments.

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::TimeDelta;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{self, Bootstrap};
use crate::config::SandboxMode;
use crate::config::{AuthMode, Config};
use crate::proxy::ModelProxy;
use crate::proxy::network::Egress;
use crate::store::{self, Store};
use crate::userdir::UserDirs;
use crate::workers::supervisor::Supervisor;

/// Shared state of every request: `AppState(Arc<Services>)`, cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Services>);

impl Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

#[derive(Debug)]
pub struct Services {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub user_dirs: UserDirs,
    pub supervisor: Arc<Supervisor>,
    /// The only model endpoint the sandboxes reach.
    pub model_proxy: Arc<ModelProxy>,
    /// The only way from a sandbox to the web (when `network.egress_proxy`).
    pub egress: Option<Egress>,
    /// Each session's turn lock, SSE frame log and last use; the server's
    /// chat slots.
    pub conversations: crate::chat::Conversations,
    pub started: Instant,
    /// Counters behind `GET /metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// `api.requests_per_second_per_user`, checked after authentication.
    pub rate_limiter: crate::ratelimit::UserRateLimiter,
    /// Serialises "count open sessions, then insert" so two concurrent
    /// creates cannot both take the last slot.
    pub admission: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for dyn Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.kind().as_str())
    }
}

impl Services {
    /// `session.ttl` as a duration; `None` when sessions never expire.
    pub fn session_ttl(&self) -> Option<TimeDelta> {
        (self.config.session.ttl > 0).then(|| TimeDelta::seconds(self.config.session.ttl as i64))
    }

    /// Everything this server holds for a session that is no longer open
    /// (deleted, expired, its user deleted): its CLI stops, its stream
    /// readers end, its frame log is freed, its model credential revoked.
    pub async fn release_session(&self, user_id: &str, session_id: &str, grace: std::time::Duration) {
        self.supervisor.stop_process(user_id, session_id, grace).await;
        self.conversations.forget(session_id);
        self.model_proxy.revoke_session(session_id);
    }

    /// What this server keeps per user, for a deleted user (after their
    /// sessions were released): rate-limit bucket, spend and token windows,
    /// egress list. Without this, each user ever deleted stayed in memory.
    pub fn forget_user(&self, user_id: &str) {
        self.rate_limiter.forget(user_id);
        self.model_proxy.forget_user(user_id);
        if let Some(egress) = &self.egress {
            egress.forget_user(user_id);
        }
    }
}

/// Start-up failures, each with the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage: {0}")]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    UserDirs(#[from] crate::userdir::UserDirError),
    #[error("user.base_dir {path}: {message}")]
    BaseDir { path: std::path::PathBuf, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error(transparent)]
    ModelProxy(#[from] crate::proxy::ProxyError),
}

/// A built application, bound to its port, not yet serving.
#[derive(Debug)]
pub struct App {
    pub state: AppState,
    listener: TcpListener,
    proxy_listener: TcpListener,
    egress_listener: Option<TcpListener>,
}

impl App {
    /// Opens everything the server needs and binds the listener.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let store = store::open(&config.session.location()).await?;
        match auth::bootstrap_admin(store.as_ref(), config.auth.admin_token.as_ref().map(|s| s.expose())).await? {
            Bootstrap::GeneratedToken(secret) => announce_generated_token(&secret),
            Bootstrap::ConfiguredToken => tracing::info!("admin token from CLAUDE_AGENT_ADMIN_TOKEN is active"),
            Bootstrap::Unchanged => {}
        }
        if config.auth.mode == AuthMode::None {
            tracing::warn!("auth.mode is `none`: every caller is an admin; use only for local development");
        }
        let user_dirs = UserDirs::open(&config.user.base_dir, config.user.auto_create_dir)?;
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let (model_proxy, proxy_listener) = ModelProxy::bind(&config, store.clone(), metrics.clone()).await?;
        let (egress, egress_listener) = match Egress::bind(&config.network, model_proxy.clone(), store.clone()).await {
            Ok(Some((egress, listener))) => (Some(egress), Some(listener)),
            Ok(None) => (None, None),
            Err(source) => return Err(StartError::Bind { addr: "network (egress proxy)".into(), source }),
        };
        let proxy_ports = [Some(model_proxy.port()), egress.as_ref().map(|e| e.proxy.port())];
        let supervisor = Arc::new(Supervisor::new(
            config.clone(),
            store.clone(),
            user_dirs.base_path().to_path_buf(),
            proxy_ports.into_iter().flatten().collect(),
        ));
        if supervisor.mode() == SandboxMode::Privileged {
            // Users' uids must traverse the base directory, not list it.
            open_base_for_users(user_dirs.base_path())?;
        }
        let addr = format!("{}:{}", config.api.host, config.api.port);
        let listener =
            TcpListener::bind(&addr).await.map_err(|source| StartError::Bind { addr: addr.clone(), source })?;
        let rate = config.api.requests_per_second_per_user;
        let rate_limiter = crate::ratelimit::UserRateLimiter::new(rate, (rate * 2.0).max(10.0));
        let state = AppState(Arc::new(Services {
            conversations: crate::chat::Conversations::new(&config.api, config.sandbox.max_output_line_bytes()),
            config,
            store,
            user_dirs,
            supervisor,
            model_proxy,
            egress,
            started: Instant::now(),
            rate_limiter,
            metrics,
            admission: tokio::sync::Mutex::new(()),
        }));
        Ok(Self { state, listener, proxy_listener, egress_listener })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then drains requests and stops
    /// background tasks.
    pub async fn run(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let tasks = TaskTracker::new();
        // The proxies outlive the API's listener: running turns still talk to
        // the model while they finish.
        let drained = CancellationToken::new();
        let proxy = self.state.model_proxy.clone().serve(self.proxy_listener, drained.clone());
        tasks.spawn(async move {
            if let Err(e) = proxy.await {
                tracing::error!(error = %e, "model proxy stopped");
            }
        });
        if let (Some(egress), Some(listener)) = (&self.state.egress, self.egress_listener) {
            let egress = egress.proxy.clone().serve(listener, drained.clone());
            tasks.spawn(async move {
                if let Err(e) = egress.await {
                    tracing::error!(error = %e, "egress proxy stopped");
                }
            });
        }
        tasks.spawn(session_reaper(self.state.clone(), shutdown.clone()));
        tasks.spawn(crate::chat::idle_cli_reaper(self.state.clone(), shutdown.clone()));
        tasks.spawn(return_freed_memory(self.state.clone(), shutdown.clone()));
        let router = crate::api::router(self.state.clone());
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        // SSE frames are small writes: TCP_NODELAY, or Nagle's algorithm holds
        // each behind the client's delayed ACK.
        let listener = axum::serve::ListenerExt::tap_io(self.listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let grace = Duration::from_secs(self.state.config.api.shutdown_grace);
        tasks.spawn(drain_turns(self.state.clone(), shutdown.clone(), drained.clone(), grace));
        let serve = axum::serve(listener, service).with_graceful_shutdown(shutdown.clone().cancelled_owned());
        // Open streams end once the turns are drained; a client that keeps a
        // connection open regardless does not hold the shutdown up.
        let result = tokio::select! {
            result = serve => result,
            () = async {
                shutdown.cancelled().await;
                tokio::time::sleep(grace + Duration::from_secs(5)).await;
            } => {
                tracing::warn!("connections still open after the shutdown grace; closing them");
                Ok(())
            }
        };
        shutdown.cancel();
        drained.cancelled().await;
        self.state.supervisor.shutdown().await;
        tasks.close();
        tasks.wait().await;
        result
    }
}

/// Privileged mode: each user's uid must reach `<base>/<user>`. The base
/// becomes 0711 (traverse, not list), and every ancestor must be
/// traversable by others, or start-up stops with the directory to fix.
fn open_base_for_users(base: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |message: String| StartError::BaseDir { path: base.to_path_buf(), message };
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o711)).map_err(|e| fail(e.to_string()))?;
    for ancestor in base.ancestors().skip(1) {
        let mode = std::fs::metadata(ancestor).map_err(|e| fail(e.to_string()))?.permissions().mode();
        if mode & 0o001 == 0 {
            return Err(fail(format!(
                "{} is not traversable by other users (mode {:o}); users' workers could not reach their directories",
                ancestor.display(),
                mode & 0o777
            )));
        }
    }
    Ok(())
}

/// First start without `CLAUDE_AGENT_ADMIN_TOKEN`: the only time this
/// secret is ever shown. Straight to stderr, never through the log.
#[allow(clippy::print_stderr)]
fn announce_generated_token(secret: &str) {
    eprintln!(
        "\n  First start: created user `admin` with this API token (shown once, store it now):\n\n    {secret}\n\n  \
         Set CLAUDE_AGENT_ADMIN_TOKEN to choose your own instead.\n"
    );
}

/// On shutdown: lets running turns finish (up to `grace`), then ends every
/// session stream, then lets the proxies stop.
async fn drain_turns(state: AppState, shutdown: CancellationToken, drained: CancellationToken, grace: Duration) {
    shutdown.cancelled().await;
    tracing::info!(grace_secs = grace.as_secs(), "shutting down: new connections refused, running turns finish");
    state.conversations.wait_for_turns(grace).await;
    state.conversations.close_all();
    drained.cancel();
}

/// Marks sessions idle past `session.ttl` as expired. Runs every quarter of
/// the TTL (between 1 s and 60 s); reads also expire lazily, so the reaper's
/// period never lets an expired session be used.
async fn session_reaper(state: AppState, shutdown: CancellationToken) {
    let Some(ttl) = state.session_ttl() else { return };
    let period = Duration::from_secs((state.config.session.ttl / 4).clamp(1, 60));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match state.store.expire_idle_sessions(store::now() - ttl).await {
            Ok(expired) if !expired.is_empty() => {
                tracing::info!(count = expired.len(), ?expired, "sessions expired");
                // An expired session keeps its directory, not its CLI.
                for session_id in expired {
                    match state.store.get_session(&session_id).await {
                        Ok(Some(session)) => {
                            state.release_session(&session.user_id, &session_id, Duration::from_secs(2)).await;
                        }
                        _ => {
                            state.conversations.forget(&session_id);
                            state.model_proxy.revoke_session(&session_id);
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                crate::metrics::store_error(&e);
                tracing::warn!(error = %e, "session reaper: store error");
            }
        }
    }
}

/// Gives memory freed by closed sessions back to the OS. glibc keeps freed
/// memory in per-thread arenas: measured under the load test, the live heap
/// stayed at ~5 MiB while RSS kept 8-16 MiB more after sessions closed,
/// which `malloc_trim(0)` returned every time.
async fn return_freed_memory(state: AppState, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if state.conversations.take_freed() {
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only walks the allocator's own arenas.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// This process's resident memory in MiB (from `/proc/self/statm`).
pub fn resident_memory_mb() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page_size = rustix::param::page_size() as u64;
    Some((pages * page_size) as f64 / (1024.0 * 1024.0))
}
