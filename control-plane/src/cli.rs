//! Command line: `serve` (the default) and the admin subcommands, which work
//! on the configured store directly (no running server needed).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use chrono::TimeDelta;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::auth;
use crate::config::{Config, LogFormat};
use crate::store::{self, Role, SessionStatus, Store, StoreError, User};

#[derive(Debug, Parser)]
#[command(name = "claude-agent-http", version, about = "Multi-tenant HTTP/SSE service hosting the Claude Code CLI")]
pub struct Cli {
    /// YAML configuration file (default: $CLAUDE_AGENT_CONFIG, else ./config.yaml if present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Manage users.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Manage API tokens.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Apply database migrations and exit.
    Migrate,
    /// Validate the configuration and print the effective one, secrets masked.
    CheckConfig,
    /// Manage sessions.
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Check what the server needs (the CLI, the worker, Landlock, cgroups,
    /// capabilities, the database) and say which sandbox mode it will run.
    Doctor,
}

#[derive(Debug, Subcommand)]
enum SessionsCommand {
    /// List sessions (newest first).
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
        /// active (default), expired or all.
        #[arg(long, default_value = "active")]
        status: String,
    },
    /// Close a session: it answers 404 from then on and its history is purged.
    Close { session_id: String },
    /// Close every expired session.
    PurgeExpired,
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Create a user.
    Add {
        user_id: String,
        /// Make the user an admin.
        #[arg(long)]
        admin: bool,
    },
    /// List users.
    List,
    /// Delete a user, their tokens and sessions (their directory is kept).
    Delete { user_id: String },
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Issue a token for a user and print it (shown once).
    Create {
        user_id: String,
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// List a user's tokens (without secrets).
    List { user_id: String },
    /// Revoke a token by id.
    Revoke { token_id: String },
}

/// Entry point of the binary.
#[allow(clippy::print_stderr)]
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("claude-agent-http: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("claude-agent-http: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command.unwrap_or(Command::Serve), config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Each error's message already carries its cause.
            eprintln!("claude-agent-http: {e}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stdout)]
async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(config).await,
        Command::CheckConfig => {
            print!("{}", config.to_masked_yaml());
            Ok(())
        }
        Command::Migrate => {
            let store = open_store(&config).await?;
            println!("migrations applied ({} store)", store.kind().as_str());
            Ok(())
        }
        Command::Users(command) => users(command, &*open_store(&config).await?).await,
        Command::Tokens(command) => tokens(command, &*open_store(&config).await?).await,
        Command::Sessions(command) => sessions(command, &*open_store(&config).await?).await,
        Command::Doctor => doctor(&config).await,
    }
}

/// Every session of a listing, page by page.
async fn all_sessions(
    store: &dyn Store,
    user: Option<String>,
    statuses: Vec<SessionStatus>,
) -> anyhow::Result<Vec<store::Session>> {
    let mut sessions = Vec::new();
    let mut after = None;
    loop {
        let query = store::SessionQuery { user_id: user.clone(), statuses: statuses.clone(), after, limit: 1000 };
        let page = store.list_sessions(&query).await?;
        let full = page.len() == 1000;
        after =
            page.last().map(|s| store::SessionCursor { created_at: s.created_at, session_id: s.session_id.clone() });
        sessions.extend(page);
        if !full {
            return Ok(sessions);
        }
    }
}

#[allow(clippy::print_stdout)]
async fn sessions(command: SessionsCommand, store: &dyn Store) -> anyhow::Result<()> {
    match command {
        SessionsCommand::List { user, status } => {
            let statuses = match status.as_str() {
                "active" => vec![SessionStatus::Active],
                "expired" => vec![SessionStatus::Expired],
                "all" => vec![SessionStatus::Active, SessionStatus::Expired],
                other => anyhow::bail!("--status {other:?}: expected active, expired or all"),
            };
            println!("{:<36}  {:<24}  {:<7}  {:>5}  last_active_at", "session_id", "user_id", "status", "turns");
            for s in all_sessions(store, user, statuses).await? {
                println!(
                    "{:<36}  {:<24}  {:<7}  {:>5}  {}",
                    s.session_id,
                    s.user_id,
                    s.status.as_str(),
                    s.message_count,
                    s.last_active_at.to_rfc3339()
                );
            }
        }
        SessionsCommand::Close { session_id } => {
            match store.get_session(&session_id).await? {
                Some(s) if s.status != SessionStatus::Deleted => {}
                _ => anyhow::bail!("no open or expired session {session_id}"),
            }
            store.set_session_status(&session_id, SessionStatus::Deleted, store::now()).await?;
            println!("closed {session_id} (a running server stops its CLI at its next use or idle stop)");
        }
        SessionsCommand::PurgeExpired => {
            let expired = all_sessions(store, None, vec![SessionStatus::Expired]).await?;
            for s in &expired {
                store.set_session_status(&s.session_id, SessionStatus::Deleted, store::now()).await?;
            }
            println!("closed {} expired sessions", expired.len());
        }
    }
    Ok(())
}

/// One line of `doctor`: what, whether it is fine, and the detail.
#[allow(clippy::print_stdout)]
fn report(ok: bool, what: &str, detail: &str) -> bool {
    println!("{}  {what}: {detail}", if ok { "ok  " } else { "FAIL" });
    ok
}

/// The kernel's Landlock ABI version, if Landlock is enabled.
fn landlock_abi() -> Option<i64> {
    // landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    let abi = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<u8>(), 0usize, 1u32) };
    (abi > 0).then_some(abi)
}

#[allow(clippy::print_stdout)]
async fn doctor(config: &Config) -> anyhow::Result<()> {
    use crate::workers::{cgroup::CgroupManager, sandbox};
    let mut healthy = true;
    let cli = sandbox::cli_path(config);
    let version = std::process::Command::new(&cli).arg("--version").env_clear().output();
    healthy &= match version {
        Ok(out) if out.status.success() => {
            report(true, "Claude CLI", &format!("{} ({})", cli.display(), String::from_utf8_lossy(&out.stdout).trim()))
        }
        Ok(out) => report(false, "Claude CLI", &format!("{} exited with {}", cli.display(), out.status)),
        Err(e) => report(false, "Claude CLI", &format!("{}: {e}", cli.display())),
    };
    let worker = sandbox::worker_path(config);
    healthy &= report(worker.is_file(), "worker binary", &worker.display().to_string());
    let min_abi = i64::from(config.sandbox.landlock_min_abi);
    healthy &= match landlock_abi() {
        Some(abi) => report(abi >= min_abi, "Landlock", &format!("ABI {abi} (at least {min_abi} required)")),
        None => report(config.sandbox.best_effort.landlock, "Landlock", "not available in this kernel"),
    };
    let mode = sandbox::resolve_mode(config.sandbox.mode);
    report(true, "sandbox mode", &format!("{mode:?} (configured {:?})", config.sandbox.mode));
    report(true, "capabilities for the privileged mode", if sandbox::can_switch_uids() { "present" } else { "absent" });
    healthy &= match CgroupManager::detect() {
        Ok(Some(manager)) => {
            let detail = format!("{:?} writable, controllers {}", manager.version(), manager.controllers().join(","));
            manager.shutdown();
            report(true, "cgroups", &detail)
        }
        Ok(None) | Err(_) if config.sandbox.best_effort.cgroup => {
            report(true, "cgroups", "none writable; workers run without cgroup limits (best-effort)")
        }
        Ok(None) => report(false, "cgroups", "no writable hierarchy: delegate one or set sandbox.best_effort.cgroup"),
        Err(e) => report(false, "cgroups", &e.to_string()),
    };
    healthy &= match store::open(&config.session.location()).await {
        Ok(store) => match store.ping().await {
            Ok(()) => report(true, "database", store.kind().as_str()),
            Err(e) => report(false, "database", &e.to_string()),
        },
        Err(e) => report(false, "database", &e.to_string()),
    };
    if !healthy {
        anyhow::bail!("some checks failed");
    }
    println!("all checks passed");
    Ok(())
}

async fn open_store(config: &Config) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    let store = store::open(&config.session.location()).await?;
    if store.kind() == crate::config::StorageKind::Memory {
        anyhow::bail!("session.storage is `memory`: admin commands need a persistent store (sqlite or postgresql)");
    }
    Ok(store)
}

#[allow(clippy::print_stdout)]
async fn users(command: UsersCommand, store: &dyn Store) -> anyhow::Result<()> {
    match command {
        UsersCommand::Add { user_id, admin } => {
            shared::names::validate_user_id(&user_id).map_err(|e| anyhow::anyhow!("user_id: {e}"))?;
            let role = if admin { Role::Admin } else { Role::User };
            let user =
                User { user_id: user_id.clone(), role, created_at: store::now(), uid: None, allowed_domains: None };
            match store.create_user(&user).await {
                Err(StoreError::Conflict(_)) => anyhow::bail!("user {user_id} already exists"),
                other => other?,
            }
            println!("created {} {user_id}", role.as_str());
        }
        UsersCommand::List => {
            println!("{:<64}  {:<5}  created_at", "user_id", "role");
            for user in store.list_users().await? {
                println!("{:<64}  {:<5}  {}", user.user_id, user.role.as_str(), user.created_at.to_rfc3339());
            }
        }
        UsersCommand::Delete { user_id } => {
            if !store.delete_user(&user_id).await? {
                anyhow::bail!("no user {user_id}");
            }
            println!("deleted {user_id}");
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn tokens(command: TokensCommand, store: &dyn Store) -> anyhow::Result<()> {
    match command {
        TokensCommand::Create { user_id, label, expires_in_days } => {
            if store.get_user(&user_id).await?.is_none() {
                anyhow::bail!("no user {user_id} (create it with `users add {user_id}`)");
            }
            let mut issued = auth::issue_token(&user_id, label);
            issued.record.expires_at =
                expires_in_days.map(|days| issued.record.created_at + TimeDelta::days(i64::from(days)));
            store.create_token(&issued.record).await?;
            // Only the secret on stdout, so `TOKEN=$(... tokens create alice)` works.
            println!("{}", issued.secret);
        }
        TokensCommand::List { user_id } => {
            for token in store.list_tokens(&user_id).await? {
                println!(
                    "{}  created {}  last used {}  {}",
                    token.token_id,
                    token.created_at.to_rfc3339(),
                    token.last_used_at.map_or("never".into(), |t| t.to_rfc3339()),
                    token.label.unwrap_or_default()
                );
            }
        }
        TokensCommand::Revoke { token_id } => {
            if !store.delete_token(&token_id).await? {
                anyhow::bail!("no token {token_id}");
            }
            println!("revoked {token_id}");
        }
    }
    Ok(())
}

/// Runs the server until SIGINT or SIGTERM.
#[allow(clippy::print_stdout)]
async fn serve(config: Config) -> anyhow::Result<()> {
    init_tracing(&config);
    // Handlers first: a SIGTERM right after the "listening" line must shut
    // down gracefully, not kill the process.
    let shutdown = CancellationToken::new();
    let signals = ShutdownSignals::install()?;
    tokio::spawn(signals.cancel(shutdown.clone()));
    let app = App::build(config).await?;
    let addr = app.local_addr()?;
    // One machine-readable line on stdout: tests and scripts wait for it to
    // learn the port when started with port 0.
    println!("claude-agent-http listening on http://{addr}");
    tracing::info!(%addr, storage = app.state.store.kind().as_str(), "listening");
    app.run(shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM and SIGINT, registered before the server announces itself.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    async fn cancel(mut self, shutdown: CancellationToken) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = self.int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
    }
}

/// Logs to stderr: JSON when not on a terminal (or when configured), else
/// human-readable. `RUST_LOG` beats `log.level`.
fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let json = match config.log.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
