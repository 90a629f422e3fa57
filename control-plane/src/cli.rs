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
use crate::store::{self, Role, Store, StoreError, User};

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
    }
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
