//! Configuration: built-in defaults < `config.yaml` < environment.
//!
//! The key names are the seed service's (see `SEED_API.md` §4) so its
//! `config.yaml` files and `CLAUDE_AGENT_*` variables keep working; the
//! behaviour of the names the seed ignored (`CLAUDE_AGENT_API_HOST`,
//! `CLAUDE_AGENT_USER_AUTO_CREATE_DIR`, `~` in paths) is fixed. Unknown keys
//! and invalid values stop the start with a message that names the key.
//!
//! Secrets (`ANTHROPIC_API_KEY`, tokens, passwords, database URLs) are held in
//! [`Secret`], which never prints its value: not in `Debug`, not in logs, not
//! in `check-config`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Yaml};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Environment variable naming the config file (the `--config` flag wins).
pub const CONFIG_PATH_ENV: &str = "CLAUDE_AGENT_CONFIG";

/// The CLI's `--setting-sources` values: which settings files it reads.
pub const SETTING_SOURCES: &[&str] = &["user", "project", "local"];

/// The permission modes the Claude CLI accepts for `--permission-mode`
/// (CLI 2.1.332), plus the SDK's `default`, which the seed used and which
/// means "the CLI's own default" (no flag).
pub const PERMISSION_MODES: &[&str] =
    &["acceptEdits", "auto", "bypassPermissions", "default", "dontAsk", "manual", "plan"];

/// Flat environment names (the seed's, plus ours) and the key each sets.
/// They rank above nested `CLAUDE_AGENT_<SECTION>__<KEY>` names and above
/// the YAML file.
const FLAT_ENV: &[(&str, &str)] = &[
    ("CLAUDE_AGENT_USER_BASE_DIR", "user.base_dir"),
    ("CLAUDE_AGENT_USER_AUTO_CREATE_DIR", "user.auto_create_dir"),
    ("CLAUDE_AGENT_SESSION_STORAGE", "session.storage"),
    ("CLAUDE_AGENT_SESSION_TTL", "session.ttl"),
    ("CLAUDE_AGENT_SESSION_SQLITE_PATH", "session.sqlite_path"),
    ("CLAUDE_AGENT_SESSION_PG_HOST", "session.pg_host"),
    ("CLAUDE_AGENT_SESSION_PG_PORT", "session.pg_port"),
    ("CLAUDE_AGENT_SESSION_PG_DATABASE", "session.pg_database"),
    ("CLAUDE_AGENT_SESSION_PG_USER", "session.pg_user"),
    ("CLAUDE_AGENT_SESSION_PG_PASSWORD", "session.pg_password"),
    ("CLAUDE_AGENT_DATABASE_URL", "session.database_url"),
    ("CLAUDE_AGENT_API_HOST", "api.host"),
    ("CLAUDE_AGENT_API_PORT", "api.port"),
    ("CLAUDE_AGENT_MAX_SESSIONS", "api.max_sessions"),
    ("CLAUDE_AGENT_MAX_SESSIONS_PER_USER", "api.max_sessions_per_user"),
    ("CLAUDE_AGENT_MAX_CONCURRENT", "api.max_concurrent_requests"),
    ("CLAUDE_AGENT_MEMORY_LIMIT_MB", "api.memory_limit_mb"),
    ("CLAUDE_AGENT_IDLE_SESSION_TIMEOUT", "api.idle_session_timeout"),
    ("CLAUDE_AGENT_CLI_PATH", "defaults.cli_path"),
    ("CLAUDE_AGENT_ADMIN_TOKEN", "auth.admin_token"),
    ("ANTHROPIC_API_KEY", "anthropic.api_key"),
    ("ANTHROPIC_AUTH_TOKEN", "anthropic.auth_token"),
    ("ANTHROPIC_BASE_URL", "anthropic.base_url"),
    ("ANTHROPIC_MODEL", "anthropic.model"),
];

/// A configuration error, naming the key and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration: key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

impl ConfigError {
    fn invalid(key: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid { key, message: message.into() }
    }
}

/// The whole configuration. Every section has defaults, so an empty file (or
/// none) is a valid configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub user: UserConfig,
    pub session: SessionConfig,
    pub api: ApiConfig,
    pub auth: AuthConfig,
    pub defaults: SessionDefaults,
    /// MCP servers given to every session's CLI (`--mcp-config`), by name.
    pub mcp_servers: BTreeMap<String, serde_json::Value>,
    /// Plugins given to every session's CLI.
    pub plugins: Vec<serde_json::Value>,
    /// Upstream model credentials. Read from `ANTHROPIC_*`; never logged.
    pub anthropic: AnthropicConfig,
    pub log: LogConfig,
    /// How each user's worker is confined.
    pub sandbox: SandboxConfig,
    /// The model proxy every CLI talks to instead of the upstream API.
    pub model_proxy: ModelProxyConfig,
    /// Web access of the sandboxes, through the egress proxy.
    pub network: NetworkConfig,
}

/// The egress proxy: the only way from a sandbox to the web (HTTP_PROXY /
/// HTTPS_PROXY of every CLI), limited to allow-listed domains.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Run the egress proxy. Off: sandboxes reach no host at all.
    pub egress_proxy: bool,
    /// A loopback address.
    pub host: String,
    /// 0: a free port, chosen at start.
    pub port: u16,
    /// Domains every user's tools may reach (`example.com` includes its
    /// subdomains, `*.example.com` only them, `*` everything); admins can
    /// replace the list per user. Empty: none.
    pub allowed_domains: Vec<String>,
    /// Destination ports allowed through the proxy.
    pub allowed_ports: Vec<u16>,
    /// Let allowed names resolve to private, loopback or link-local
    /// addresses (off: such answers are refused, so DNS cannot point a
    /// sandbox at the host's own services or a metadata endpoint).
    pub allow_private_addresses: bool,
    /// Host name → `ip:port` used instead of DNS (split horizon, tests).
    pub resolve_overrides: BTreeMap<String, String>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            egress_proxy: true,
            host: "127.0.0.1".into(),
            port: 0,
            allowed_domains: Vec::new(),
            allowed_ports: vec![80, 443],
            allow_private_addresses: false,
            resolve_overrides: BTreeMap::new(),
        }
    }
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input: f64,
    pub output: f64,
    pub cache_read: f64,
    pub cache_write: f64,
}

/// The loopback reverse proxy between the CLIs and the upstream model API:
/// per-process credentials, metering, budgets and rate limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelProxyConfig {
    /// A loopback address (the sandboxes reach it on `port` only).
    pub host: String,
    /// 0: a free port, chosen at start.
    pub port: u16,
    /// Spending cap per user in USD over `budget_window_hours` (null: none).
    pub user_budget_usd: Option<f64>,
    /// 0: the budget covers all time.
    pub budget_window_hours: u32,
    /// Model requests per user per minute (0: unlimited).
    pub requests_per_minute: u32,
    /// Input + output tokens per user per minute (0: unlimited).
    pub tokens_per_minute: u64,
    /// Prices by model name prefix (the longest matching prefix wins;
    /// `default` for the rest).
    pub prices: BTreeMap<String, ModelPrice>,
}

impl Default for ModelProxyConfig {
    fn default() -> Self {
        let price =
            |input: f64, output: f64| ModelPrice { input, output, cache_read: input / 10.0, cache_write: input * 1.25 };
        Self {
            host: "127.0.0.1".into(),
            port: 0,
            user_budget_usd: None,
            budget_window_hours: 0,
            requests_per_minute: 0,
            tokens_per_minute: 0,
            prices: [
                ("default".to_owned(), price(15.0, 75.0)),
                ("claude-opus".to_owned(), price(15.0, 75.0)),
                ("claude-sonnet".to_owned(), price(3.0, 15.0)),
                ("claude-haiku".to_owned(), price(1.0, 5.0)),
            ]
            .into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserConfig {
    /// Parent of every user's directory (`<base_dir>/<user_id>[/<subdir>]`).
    pub base_dir: PathBuf,
    /// Create missing user and session directories.
    pub auto_create_dir: bool,
}

impl Default for UserConfig {
    fn default() -> Self {
        Self { base_dir: PathBuf::from("./data/users"), auto_create_dir: true }
    }
}

/// Which `Store` implementation holds users, tokens and sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    Memory,
    #[default]
    Sqlite,
    Postgresql,
}

impl StorageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Sqlite => "sqlite",
            Self::Postgresql => "postgresql",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    pub storage: StorageKind,
    /// Seconds of inactivity after which a session is marked `expired`
    /// (0 = never).
    pub ttl: u64,
    pub sqlite_path: PathBuf,
    /// A SQLite path / `sqlite://` URL or a `postgres://` URL. When set it
    /// wins over `storage`, `sqlite_path` and `pg_*`.
    pub database_url: Option<Secret>,
    pub pg_host: String,
    pub pg_port: u16,
    pub pg_database: String,
    pub pg_user: String,
    pub pg_password: Secret,
    /// Schema for every table (created if missing); default `public`.
    pub pg_schema: Option<String>,
    pub pg_max_connections: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            storage: StorageKind::Sqlite,
            ttl: 3600,
            sqlite_path: PathBuf::from("./data/sessions.db"),
            database_url: None,
            pg_host: "localhost".into(),
            pg_port: 5432,
            pg_database: "claude_agent".into(),
            pg_user: "postgres".into(),
            pg_password: Secret::default(),
            pg_schema: None,
            pg_max_connections: 10,
        }
    }
}

/// Where the store lives, after `database_url` has been applied.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    Memory,
    Sqlite(PathBuf),
    Postgres { url: Secret, schema: Option<String>, max_connections: u32 },
}

impl SessionConfig {
    pub fn location(&self) -> StoreLocation {
        let postgres = |url: Secret| StoreLocation::Postgres {
            url,
            schema: self.pg_schema.clone(),
            max_connections: self.pg_max_connections,
        };
        if let Some(url) = &self.database_url {
            let raw = url.expose();
            if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
                return postgres(url.clone());
            }
            let path = raw.strip_prefix("sqlite://").or_else(|| raw.strip_prefix("sqlite:")).unwrap_or(raw);
            return StoreLocation::Sqlite(expand_tilde(Path::new(path)));
        }
        match self.storage {
            StorageKind::Memory => StoreLocation::Memory,
            StorageKind::Sqlite => StoreLocation::Sqlite(self.sqlite_path.clone()),
            StorageKind::Postgresql => postgres(Secret(format!(
                "postgres://{}:{}@{}:{}/{}",
                encode_url_part(&self.pg_user),
                encode_url_part(self.pg_password.expose()),
                self.pg_host,
                self.pg_port,
                encode_url_part(&self.pg_database)
            ))),
        }
    }

    /// The storage kind in effect (`database_url` decides when it is set).
    pub fn effective_kind(&self) -> StorageKind {
        match self.location() {
            StoreLocation::Memory => StorageKind::Memory,
            StoreLocation::Sqlite(_) => StorageKind::Sqlite,
            StoreLocation::Postgres { .. } => StorageKind::Postgresql,
        }
    }
}

/// Percent-encodes what a URL's user, password or path may not hold as is.
fn encode_url_part(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub host: String,
    pub port: u16,
    /// Origins allowed by CORS; `["*"]` allows any origin (without
    /// credentials). Empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// Open sessions on the whole server (503 beyond).
    pub max_sessions: u32,
    /// Open sessions per user (429 beyond).
    pub max_sessions_per_user: u32,
    /// Chat turns running at once on the whole server.
    pub max_concurrent_requests: u32,
    /// Refuse new sessions (503) while the server's memory is above this
    /// many MiB (0 = off).
    pub memory_limit_mb: u64,
    /// Seconds after which an idle CLI process is stopped (0 = never); the
    /// session stays open.
    pub idle_session_timeout: u64,
    /// Largest request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Warm CLI processes on the whole server; starting one more stops the
    /// least recently used idle one (its session resumes on its next message).
    pub max_warm_sessions: u32,
    /// Warm CLI processes per user, likewise.
    pub max_warm_sessions_per_user: u32,
    /// SSE frames kept per session for reconnects with `Last-Event-ID`.
    pub stream_buffer_events: usize,
    /// Authenticated requests per second per user, on average (0: no
    /// limit); bursts of twice as many (at least 10) pass.
    pub requests_per_second_per_user: f64,
    /// Seconds running turns get to finish after SIGTERM before their
    /// streams are ended and their CLIs stopped.
    pub shutdown_grace: u64,
    /// Bytes of SSE frames kept per session (the older frames go first).
    pub stream_buffer_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            cors_origins: Vec::new(),
            max_sessions: 20,
            max_sessions_per_user: 5,
            max_concurrent_requests: 5,
            memory_limit_mb: 7168,
            idle_session_timeout: 300,
            max_body_bytes: 1024 * 1024,
            max_warm_sessions: 10,
            max_warm_sessions_per_user: 3,
            stream_buffer_events: 2000,
            shutdown_grace: 30,
            requests_per_second_per_user: 0.0,
            stream_buffer_bytes: 4 * 1024 * 1024,
        }
    }
}

/// How callers prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// `Authorization: Bearer <token>` (tokens stored hashed).
    #[default]
    Token,
    /// Trust a user name in `auth.header_name`, set by a reverse proxy at one
    /// of `auth.trusted_proxies`.
    Header,
    /// No authentication: single-user development on loopback only.
    None,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// Token of the built-in `admin` user (at least 32 characters). Without
    /// it, the first start prints a fresh admin token once to stderr.
    pub admin_token: Option<Secret>,
    /// Header holding the user name in `header` mode.
    pub header_name: String,
    /// Peer addresses allowed to set `header_name`.
    pub trusted_proxies: Vec<IpAddr>,
    /// Users who are admins in `header` mode.
    pub admin_users: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Token,
            admin_token: None,
            header_name: "X-Forwarded-User".into(),
            trusted_proxies: Vec::new(),
            admin_users: Vec::new(),
        }
    }
}

/// Defaults for every session's CLI; a session's own options override them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionDefaults {
    pub system_prompt: Option<String>,
    pub permission_mode: String,
    pub allowed_tools: Vec<String>,
    pub disallowed_tools: Vec<String>,
    pub setting_sources: Vec<String>,
    /// The Claude CLI; default: the project's `node_modules`, then `PATH`.
    pub cli_path: Option<PathBuf>,
    pub model: Option<String>,
    pub max_turns: Option<u32>,
    pub max_budget_usd: Option<f64>,
}

impl Default for SessionDefaults {
    fn default() -> Self {
        Self {
            system_prompt: Some("You are a helpful AI assistant.".into()),
            permission_mode: "bypassPermissions".into(),
            allowed_tools: ["Bash", "Read", "Write", "Edit", "Glob", "Grep", "Skill"].map(String::from).into(),
            disallowed_tools: Vec::new(),
            setting_sources: vec!["user".into(), "project".into()],
            cli_path: None,
            model: None,
            max_turns: Some(50),
            max_budget_usd: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnthropicConfig {
    pub api_key: Option<Secret>,
    pub auth_token: Option<Secret>,
    pub base_url: Option<String>,
    pub model: Option<String>,
}

/// Whether workers get a uid of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxMode {
    /// Privileged when the server is root or holds the capabilities
    /// privileged mode uses (`can_switch_uids`); else unprivileged.
    #[default]
    Auto,
    /// Each user's worker runs as that user's own uid (from `uid_range`).
    Privileged,
    /// Workers share the server's uid; isolation relies on Landlock,
    /// seccomp and cgroups.
    Unprivileged,
}

/// Layers that may be missing without stopping a worker.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BestEffortConfig {
    pub landlock: bool,
    pub seccomp: bool,
    pub cgroup: bool,
    pub privileges: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    pub mode: SandboxMode,
    /// The worker binary; default: `claude-agent-worker` next to the server.
    pub worker_path: Option<PathBuf>,
    /// Uids (and gids) handed to users in privileged mode, inclusive.
    pub uid_min: u32,
    pub uid_max: u32,
    /// Oldest Landlock ABI accepted (6 brings signal and socket scopes).
    pub landlock_min_abi: u8,
    /// TCP ports a CLI may connect to besides the model proxy's (which is
    /// always allowed); null or empty: none.
    pub allowed_tcp_ports: Option<Vec<u16>>,
    /// More read-only paths for every worker (tools, language runtimes).
    pub extra_read_only_paths: Vec<PathBuf>,
    /// Refuse UDP sockets (DNS included) inside the sandbox.
    pub deny_udp: bool,
    /// Allow `socket(AF_UNIX)`: connecting to the host's unix sockets.
    pub allow_unix_sockets: bool,
    pub rlimit_nofile: u64,
    /// Largest file a CLI may write, MiB.
    pub rlimit_fsize_mb: u64,
    /// Heap (RLIMIT_DATA) of each process, MiB. Generous: the CLI's runtime
    /// maps far more than it uses (measured outside a sandbox: 5.4 GiB of
    /// VmData idle, 7.5 GiB while relaying a 100 MB reply with 1.4 GiB
    /// resident), and allocations past the limit broke its output lines
    /// at 2 GiB. The memory cgroup (`memory_mb`) bounds what it really uses.
    pub rlimit_data_mb: u64,
    /// Processes per user uid (privileged mode only).
    pub rlimit_nproc: u64,
    /// Memory of all of a user's processes, MiB (cgroup).
    pub memory_mb: u64,
    /// Processes of a user (cgroup pids.max).
    pub pids: u64,
    /// CPU of a user, percent of one core (cgroup).
    pub cpu_percent: u32,
    /// Seconds a worker with no running process is kept.
    pub worker_idle_timeout: u64,
    /// Seconds a worker may take to start and confine itself.
    pub worker_start_timeout: u64,
    /// Longest line of a CLI's output, MiB (its final `assistant` and
    /// `result` lines carry the whole reply); a longer one ends the turn
    /// with an error. 1 to 2048.
    pub max_output_line_mb: u64,
    pub best_effort: BestEffortConfig,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            mode: SandboxMode::Auto,
            worker_path: None,
            uid_min: 200_000,
            uid_max: 299_999,
            landlock_min_abi: 6,
            allowed_tcp_ports: None,
            extra_read_only_paths: Vec::new(),
            deny_udp: false,
            allow_unix_sockets: false,
            rlimit_nofile: 4096,
            rlimit_fsize_mb: 1024,
            rlimit_data_mb: 8192,
            rlimit_nproc: 1024,
            memory_mb: 4096,
            pids: 512,
            cpu_percent: 200,
            worker_idle_timeout: 600,
            worker_start_timeout: 10,
            max_output_line_mb: 128,
            best_effort: BestEffortConfig::default(),
        }
    }
}

impl SandboxConfig {
    /// The TCP ports a CLI may reach: configured, else the model's port.
    /// The ports a CLI may connect to: the control plane's proxies' and the
    /// extra ones.
    pub fn tcp_ports(&self, proxy_ports: &[u16]) -> Vec<u16> {
        let mut ports = proxy_ports.to_vec();
        ports.extend(self.allowed_tcp_ports.iter().flatten());
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// `max_output_line_mb` in bytes.
    pub fn max_output_line_bytes(&self) -> usize {
        usize::try_from(self.max_output_line_mb.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX)
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, else human-readable.
    #[default]
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter (`RUST_LOG` wins when set).
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Auto }
    }
}

/// A secret string: deserializes from any scalar, never shows its value in
/// `Debug` or when serialized (`check-config` prints `"***"`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Environment values are parsed loosely (a numeric password arrives as
        // a number), so accept any scalar and keep its text.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            Text(String),
            Int(i64),
            Float(f64),
            Bool(bool),
        }
        Ok(Self(match Scalar::deserialize(deserializer)? {
            Scalar::Text(s) => s,
            Scalar::Int(n) => n.to_string(),
            Scalar::Float(n) => n.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }))
    }
}

/// Replaces a leading `~` with `$HOME` (the seed left it literal).
pub fn expand_tilde(path: &Path) -> PathBuf {
    let Ok(rest) = path.strip_prefix("~") else {
        return path.to_path_buf();
    };
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(rest),
        None => path.to_path_buf(),
    }
}

impl Config {
    /// Loads defaults, then the YAML file (`path`, else `$CLAUDE_AGENT_CONFIG`,
    /// else `./config.yaml` when it exists), then the environment; validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let explicit = path.map(Path::to_path_buf).or_else(|| std::env::var_os(CONFIG_PATH_ENV).map(PathBuf::from));
        let file = match explicit {
            Some(path) => {
                // An explicitly named file must exist: a typo must not
                // silently start the server on defaults.
                std::fs::metadata(&path).map_err(|source| ConfigError::Unreadable { path: path.clone(), source })?;
                Some(path)
            }
            None => Some(PathBuf::from("config.yaml")).filter(|p| p.is_file()),
        };
        Self::from_figment(Self::figment(file.as_deref()))
    }

    /// The layered sources, lowest first.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::new();
        if let Some(file) = file {
            figment = figment.merge(Yaml::file_exact(file));
        }
        let nested = Env::prefixed("CLAUDE_AGENT_").filter(|key| key.as_str().contains("__")).split("__");
        let flat = Env::raw().filter_map(|key| {
            FLAT_ENV
                .iter()
                .find(|(name, _)| key.as_str().eq_ignore_ascii_case(name))
                .map(|(_, target)| (*target).into())
        });
        figment.merge(nested).merge(flat)
    }

    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let mut config: Self = figment.extract().map_err(|e| ConfigError::Parse(describe_figment_error(e)))?;
        config.user.base_dir = expand_tilde(&config.user.base_dir);
        config.session.sqlite_path = expand_tilde(&config.session.sqlite_path);
        config.defaults.cli_path = config.defaults.cli_path.as_deref().map(expand_tilde);
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde's types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(unknown) = self.defaults.setting_sources.iter().find(|s| !SETTING_SOURCES.contains(&s.as_str())) {
            return Err(ConfigError::invalid(
                "defaults.setting_sources",
                format!("{unknown:?} is not one of {}", SETTING_SOURCES.join(", ")),
            ));
        }
        if !PERMISSION_MODES.contains(&self.defaults.permission_mode.as_str()) {
            return Err(ConfigError::invalid(
                "defaults.permission_mode",
                format!("{:?} is not one of {}", self.defaults.permission_mode, PERMISSION_MODES.join(", ")),
            ));
        }
        if self.defaults.max_turns == Some(0) {
            return Err(ConfigError::invalid("defaults.max_turns", "must be at least 1 (or null)"));
        }
        if let Some(budget) = self.defaults.max_budget_usd
            && !(budget > 0.0 && budget.is_finite())
        {
            return Err(ConfigError::invalid("defaults.max_budget_usd", "must be a positive number (or null)"));
        }
        if self.api.host.parse::<IpAddr>().is_err() && self.api.host != "localhost" {
            return Err(ConfigError::invalid(
                "api.host",
                format!("{:?} is not an IP address (or `localhost`)", self.api.host),
            ));
        }
        if !self.model_proxy.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
            return Err(ConfigError::invalid(
                "model_proxy.host",
                format!(
                    "{:?} is not a loopback address; the proxy must not be reachable from outside",
                    self.model_proxy.host
                ),
            ));
        }
        if !self.network.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
            return Err(ConfigError::invalid(
                "network.host",
                format!(
                    "{:?} is not a loopback address; the egress proxy must not be reachable from outside",
                    self.network.host
                ),
            ));
        }
        for (host, addr) in &self.network.resolve_overrides {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::invalid(
                    "network.resolve_overrides",
                    format!("{host}: {addr:?} is not an ip:port address"),
                ));
            }
        }
        if let Some(budget) = self.model_proxy.user_budget_usd
            && !(budget >= 0.0 && budget.is_finite())
        {
            return Err(ConfigError::invalid("model_proxy.user_budget_usd", "must be a number >= 0 (or null)"));
        }
        for (model, price) in &self.model_proxy.prices {
            if [price.input, price.output, price.cache_read, price.cache_write]
                .iter()
                .any(|p| !(p.is_finite() && *p >= 0.0))
            {
                return Err(ConfigError::invalid(
                    "model_proxy.prices",
                    format!("{model}: prices must be numbers >= 0"),
                ));
            }
        }
        if !(self.api.requests_per_second_per_user >= 0.0 && self.api.requests_per_second_per_user.is_finite()) {
            return Err(ConfigError::invalid("api.requests_per_second_per_user", "must be a number >= 0"));
        }
        if self.api.stream_buffer_bytes < 4096 {
            return Err(ConfigError::invalid("api.stream_buffer_bytes", "must be at least 4096"));
        }
        if self.api.max_body_bytes < 1024 {
            return Err(ConfigError::invalid("api.max_body_bytes", "must be at least 1024"));
        }
        for (key, value) in [
            ("api.max_sessions", self.api.max_sessions),
            ("api.max_sessions_per_user", self.api.max_sessions_per_user),
            ("api.max_concurrent_requests", self.api.max_concurrent_requests),
            ("api.max_warm_sessions", self.api.max_warm_sessions),
            ("api.max_warm_sessions_per_user", self.api.max_warm_sessions_per_user),
            ("api.stream_buffer_events", u32::try_from(self.api.stream_buffer_events).unwrap_or(u32::MAX)),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        if self.auth.mode == AuthMode::None && !self.binds_loopback() {
            return Err(ConfigError::invalid(
                "auth.mode",
                format!("`none` is only allowed when api.host is a loopback address, not {:?}", self.api.host),
            ));
        }
        if self.auth.mode == AuthMode::Header && self.auth.trusted_proxies.is_empty() {
            return Err(ConfigError::invalid(
                "auth.trusted_proxies",
                "`header` mode needs at least one trusted proxy address",
            ));
        }
        if let Some(token) = &self.auth.admin_token
            && token.expose().len() < 32
        {
            return Err(ConfigError::invalid(
                "auth.admin_token",
                "must be at least 32 characters (CLAUDE_AGENT_ADMIN_TOKEN)",
            ));
        }
        for name in &self.auth.admin_users {
            shared::names::validate_user_id(name)
                .map_err(|e| ConfigError::invalid("auth.admin_users", format!("{name:?}: {e}")))?;
        }
        if self.sandbox.uid_min == 0 || self.sandbox.uid_min > self.sandbox.uid_max {
            return Err(ConfigError::invalid("sandbox.uid_min", "must be at least 1 and not above sandbox.uid_max"));
        }
        if self.sandbox.landlock_min_abi == 0 {
            return Err(ConfigError::invalid("sandbox.landlock_min_abi", "must be at least 1"));
        }
        if !(1..=2048).contains(&self.sandbox.max_output_line_mb) {
            return Err(ConfigError::invalid(
                "sandbox.max_output_line_mb",
                format!("{} is not between 1 and 2048 (MiB)", self.sandbox.max_output_line_mb),
            ));
        }
        if let Some(schema) = &self.session.pg_schema {
            shared::names::validate_user_id(schema)
                .map_err(|e| ConfigError::invalid("session.pg_schema", format!("{schema:?}: {e}")))?;
        }
        for (name, server) in &self.mcp_servers {
            if !server.is_object() {
                return Err(ConfigError::invalid("mcp_servers", format!("server {name:?} must be a mapping")));
            }
        }
        Ok(())
    }

    pub fn binds_loopback(&self) -> bool {
        self.api.host == "localhost" || self.api.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// The effective configuration as YAML, secrets masked: the `Secret`
    /// fields, and the values of MCP servers' `env` and `headers` (where
    /// their tokens go).
    pub fn to_masked_yaml(&self) -> String {
        let mut masked = self.clone();
        for server in masked.mcp_servers.values_mut() {
            for key in ["env", "headers"] {
                if let Some(serde_json::Value::Object(values)) = server.get_mut(key) {
                    values.values_mut().for_each(|value| *value = serde_json::Value::String("***".into()));
                }
            }
        }
        serde_yaml::to_string(&masked).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

/// One line per problem: the key, what is wrong with it (figment lists the
/// allowed values), and where the value came from.
fn describe_figment_error(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let source = match FLAT_ENV.iter().find(|(name, target)| *target == key && std::env::var_os(name).is_some())
            {
                Some((name, _)) => format!(" (from {name})"),
                None => e.metadata.as_ref().map(|m| format!(" (from {})", m.name)).unwrap_or_default(),
            };
            format!("key `{key}`: {}{source}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in_jail(yaml: &str) -> Result<Config, ConfigError> {
        let mut out = None;
        Jail::expect_with(|jail| {
            jail.create_file("config.yaml", yaml)?;
            out = Some(Config::from_figment(Config::figment(Some(Path::new("config.yaml")))));
            Ok(())
        });
        out.expect("jail ran")
    }

    #[test]
    fn defaults_are_valid_and_use_sqlite() {
        let config = load_in_jail("").expect("defaults load");
        assert_eq!(config.session.storage, StorageKind::Sqlite);
        assert_eq!(config.api.port, 8000);
        assert!(config.user.auto_create_dir);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = load_in_jail("api:\n  prot: 1\n").expect_err("unknown key").to_string();
        assert!(err.contains("prot"), "{err}");
    }

    #[test]
    fn invalid_enum_values_list_the_allowed_ones() {
        let err = load_in_jail("session:\n  storage: mongo\n").expect_err("bad storage").to_string();
        assert!(err.contains("mongo") && err.contains("postgresql") && err.contains("session.storage"), "{err}");
    }

    #[test]
    fn flat_env_names_beat_yaml_and_nested_env() {
        Jail::expect_with(|jail| {
            jail.create_file("config.yaml", "api:\n  port: 9000\n  host: 127.0.0.1\n")?;
            jail.set_env("CLAUDE_AGENT_API__PORT", "9100");
            jail.set_env("CLAUDE_AGENT_API_PORT", "9200");
            jail.set_env("CLAUDE_AGENT_API_HOST", "::1");
            jail.set_env("CLAUDE_AGENT_USER_AUTO_CREATE_DIR", "false");
            jail.set_env("CLAUDE_AGENT_SESSION_PG_PASSWORD", "12345");
            let config = Config::from_figment(Config::figment(Some(Path::new("config.yaml")))).expect("valid");
            assert_eq!(config.api.port, 9200);
            assert_eq!(config.api.host, "::1");
            assert!(!config.user.auto_create_dir);
            assert_eq!(config.session.pg_password.expose(), "12345");
            Ok(())
        });
    }

    #[test]
    fn database_url_selects_the_backend() {
        let mut session = SessionConfig { database_url: Some(Secret::new("postgres://u@h/db")), ..Default::default() };
        assert_eq!(session.effective_kind(), StorageKind::Postgresql);
        session.database_url = Some(Secret::new("sqlite:///tmp/x.db"));
        assert!(matches!(session.location(), StoreLocation::Sqlite(p) if p == Path::new("/tmp/x.db")));
    }

    #[test]
    fn the_proxy_ports_and_the_extra_ports_are_allowed() {
        let mut sandbox = SandboxConfig::default();
        assert_eq!(sandbox.tcp_ports(&[4100, 4200]), [4100, 4200]);
        sandbox.allowed_tcp_ports = Some(vec![4100, 443]);
        assert_eq!(sandbox.tcp_ports(&[4100]), [443, 4100]);
    }

    #[test]
    fn max_output_line_mb_defaults_to_128_is_set_by_env_and_bounded() {
        let config = load_in_jail("").expect("defaults load");
        assert_eq!(config.sandbox.max_output_line_mb, 128);
        assert_eq!(config.sandbox.max_output_line_bytes(), 128 * 1024 * 1024);
        assert_eq!(load_in_jail("sandbox:\n  max_output_line_mb: 1\n").expect("valid").sandbox.max_output_line_mb, 1);
        Jail::expect_with(|jail| {
            jail.create_file("config.yaml", "sandbox:\n  max_output_line_mb: 64\n")?;
            jail.set_env("CLAUDE_AGENT_SANDBOX__MAX_OUTPUT_LINE_MB", "512");
            let config = Config::from_figment(Config::figment(Some(Path::new("config.yaml")))).expect("valid");
            assert_eq!(config.sandbox.max_output_line_mb, 512);
            Ok(())
        });
        for bad in ["0", "2049", "1000000"] {
            let err = load_in_jail(&format!("sandbox:\n  max_output_line_mb: {bad}\n")).expect_err(bad).to_string();
            assert!(err.contains("sandbox.max_output_line_mb") && err.contains("2048"), "{err}");
        }
        assert!(load_in_jail("sandbox:\n  max_output_line_mb: 2048\n").is_ok());
    }

    #[test]
    fn tilde_expands_to_home() {
        Jail::expect_with(|jail| {
            jail.set_env("HOME", "/home/someone");
            jail.create_file("config.yaml", "user:\n  base_dir: ~/claude-users\n")?;
            let config = Config::from_figment(Config::figment(Some(Path::new("config.yaml")))).expect("valid");
            assert_eq!(config.user.base_dir, Path::new("/home/someone/claude-users"));
            Ok(())
        });
    }

    #[test]
    fn secrets_never_print() {
        let mut config = Config::default();
        config.anthropic.api_key = Some(Secret::new("sk-ant-very-secret"));
        assert!(!format!("{config:?}").contains("very-secret"));
        assert!(!config.to_masked_yaml().contains("very-secret"));
        config.mcp_servers.insert(
            "tracker".into(),
            serde_json::json!({"command": "tracker-mcp", "env": {"TRACKER_TOKEN": "very-secret-env"},
                               "url": "https://mcp.example", "headers": {"Authorization": "Bearer very-secret-header"}}),
        );
        let yaml = config.to_masked_yaml();
        assert!(!yaml.contains("very-secret"), "{yaml}");
        assert!(yaml.contains("TRACKER_TOKEN") && yaml.contains("tracker-mcp"), "{yaml}");
    }

    #[test]
    fn auth_none_needs_loopback() {
        let err = load_in_jail("api:\n  host: 0.0.0.0\nauth:\n  mode: none\n").expect_err("refused").to_string();
        assert!(err.contains("auth.mode"), "{err}");
        assert!(load_in_jail("auth:\n  mode: none\n").is_ok());
    }

    #[test]
    fn setting_sources_are_checked() {
        let err = load_in_jail("defaults:\n  setting_sources: [user, global]\n").expect_err("refused").to_string();
        assert!(err.contains("defaults.setting_sources") && err.contains("\"global\""), "{err}");
        assert!(load_in_jail("defaults:\n  setting_sources: []\n").is_ok());
        assert!(load_in_jail("defaults:\n  setting_sources: [user, project, local]\n").is_ok());
    }

    #[test]
    fn permission_mode_is_checked() {
        let err = load_in_jail("defaults:\n  permission_mode: yolo\n").expect_err("refused").to_string();
        assert!(err.contains("defaults.permission_mode") && err.contains("bypassPermissions"), "{err}");
    }
}
