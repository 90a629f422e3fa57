//! What a worker is told: the sandbox mode this server runs in, and the
//! [`WorkerConfig`] and CLI [`ProcessSpec`] built for a user and session.

use std::path::{Path, PathBuf};

use shared::protocol::{BestEffort, LandlockConfig, ProcessSpec, Rlimits, SeccompConfig, UserIds, WorkerConfig};

use crate::config::{Config, SandboxMode};
use crate::store::Session;

/// System paths every CLI may read and execute (the CLI re-execs itself,
/// runs bash, git, rg; reads certificates, resolver and user databases;
/// Node/Bun read `/proc/self` and `/sys` for limits). Not `/etc` as a whole:
/// the server's own configuration may live there.
const SYSTEM_READ_ONLY: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/lib32",
    "/opt",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/bash.bashrc",
    "/etc/profile",
    "/etc/profile.d",
    "/etc/inputrc",
    "/etc/gitconfig",
    "/etc/os-release",
    "/etc/terminfo",
    "/etc/mime.types",
    "/proc",
    "/sys",
];

/// Device files a CLI may write.
const DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty"];

/// Whether this server can give each user a uid of their own.
pub fn resolve_mode(configured: SandboxMode) -> SandboxMode {
    match configured {
        SandboxMode::Auto if can_switch_uids() => SandboxMode::Privileged,
        SandboxMode::Auto => SandboxMode::Unprivileged,
        other => other,
    }
}

/// Root, or every capability privileged mode uses in the permitted set
/// (file capabilities on the binary, as in the Docker image): the server
/// gives each user's directory to the user's uid (CAP_CHOWN) and still
/// creates sessions' directories inside it (CAP_DAC_OVERRIDE, CAP_FOWNER);
/// the worker switches uids (CAP_SETUID, CAP_SETGID, CAP_SETPCAP; a non-root
/// server hands them to it as ambient capabilities, `handoff.rs`).
pub fn can_switch_uids() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    let Some(permitted) =
        status.lines().find_map(|l| l.strip_prefix("CapPrm:")).and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    else {
        return false;
    };
    const CAP_CHOWN: u64 = 0;
    const CAP_DAC_OVERRIDE: u64 = 1;
    const CAP_FOWNER: u64 = 3;
    const CAP_SETGID: u64 = 6;
    const CAP_SETUID: u64 = 7;
    const CAP_SETPCAP: u64 = 8;
    [CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_SETGID, CAP_SETUID, CAP_SETPCAP]
        .iter()
        .all(|cap| permitted & (1 << cap) != 0)
}

/// The worker binary: configured, else next to this executable.
pub fn worker_path(config: &Config) -> PathBuf {
    config.sandbox.worker_path.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("claude-agent-worker")))
            .unwrap_or_else(|| PathBuf::from("claude-agent-worker"))
    })
}

/// The Claude CLI: `defaults.cli_path`, else the project's `node_modules`
/// (next to the working directory or the executable), else `claude` on PATH.
pub fn cli_path(config: &Config) -> PathBuf {
    if let Some(path) = &config.defaults.cli_path {
        return path.clone();
    }
    const BUNDLED: &str = "node_modules/@anthropic-ai/claude-code-linux-x64/claude";
    let mut roots: Vec<PathBuf> = std::env::current_dir().into_iter().collect();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
    }
    roots
        .into_iter()
        .map(|root| root.join(BUNDLED))
        .find(|candidate| candidate.is_file())
        .or_else(|| {
            std::env::var_os("PATH")
                .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join("claude")).find(|p| p.is_file()))
        })
        .unwrap_or_else(|| PathBuf::from("claude"))
}

/// Whether the CLI has a transcript of conversation `cli_session_id` in
/// the user's directory (`$CLAUDE_CONFIG_DIR/projects/<cwd>/<id>.jsonl`).
pub fn has_transcript(user_dir: &Path, cli_session_id: &str) -> bool {
    let file = format!("{cli_session_id}.jsonl");
    let Ok(projects) = std::fs::read_dir(user_dir.join(".claude/projects")) else { return false };
    projects.flatten().any(|project| std::fs::symlink_metadata(project.path().join(&file)).is_ok_and(|m| m.is_file()))
}

/// Where a CLI sends its model requests and its web requests, and with
/// which credential (the same one for both, valid while the process runs).
#[derive(Debug)]
pub struct ModelEndpoint {
    pub base_url: String,
    pub credential: crate::config::Secret,
    /// `http://cah:<credential>@127.0.0.1:<port>` of the egress proxy.
    pub egress_proxy: Option<crate::config::Secret>,
}

/// The configuration a user's worker receives in its `Hello` frame.
pub fn worker_config(
    config: &Config,
    user_id: &str,
    user_dir: &Path,
    drop_to: Option<UserIds>,
    cgroup_procs: Vec<PathBuf>,
    proxy_ports: &[u16],
) -> WorkerConfig {
    let sandbox = &config.sandbox;
    let cli = cli_path(config);
    let mut read_only: Vec<PathBuf> = SYSTEM_READ_ONLY.iter().map(PathBuf::from).collect();
    // The CLI's whole install (it re-execs itself, reads its vendored files).
    if let Some(install) = cli.canonicalize().ok().as_deref().and_then(Path::parent) {
        read_only.push(install.to_path_buf());
    }
    read_only.extend(sandbox.extra_read_only_paths.iter().cloned());
    WorkerConfig {
        user_id: user_id.to_owned(),
        user_dir: user_dir.to_path_buf(),
        parent_pid: std::process::id(),
        drop_to,
        landlock: LandlockConfig {
            enabled: true,
            min_abi: sandbox.landlock_min_abi,
            read_only,
            read_write_files: DEVICES.iter().map(PathBuf::from).collect(),
            tcp_connect_ports: sandbox.tcp_ports(proxy_ports),
            // With its own uid, the user may write only what the server
            // hands to that uid there (its sessions' `cgroup.procs`); with
            // the server's uid it could write its own limits, so nothing.
            own_cgroup_dirs: match drop_to {
                Some(_) => cgroup_procs.iter().filter_map(|p| p.parent().map(Path::to_path_buf)).collect(),
                None => Vec::new(),
            },
        },
        seccomp: SeccompConfig {
            enabled: true,
            deny_udp: sandbox.deny_udp,
            allow_unix_sockets: sandbox.allow_unix_sockets,
        },
        rlimits: Rlimits {
            nofile: sandbox.rlimit_nofile,
            fsize: sandbox.rlimit_fsize_mb * 1024 * 1024,
            data: sandbox.rlimit_data_mb * 1024 * 1024,
            nproc: drop_to.map(|_| sandbox.rlimit_nproc),
        },
        cgroup_procs,
        best_effort: BestEffort {
            landlock: sandbox.best_effort.landlock,
            seccomp: sandbox.best_effort.seccomp,
            cgroup: sandbox.best_effort.cgroup,
            privileges: sandbox.best_effort.privileges,
        },
    }
}

/// How to start a session's CLI in streaming mode: flags from the session's
/// options, an environment built from scratch. No secret goes in: argv is
/// readable by every process through `/proc`, and anything in the
/// environment is readable by the user's own agent.
///
/// `resume`: the conversation exists (earlier turns), continue it with
/// `--resume`; else start it under our own id with `--session-id`.
/// `model`: the model proxy and this process's own credential for it.
pub fn cli_spec(
    config: &Config,
    session: &Session,
    user_dir: &Path,
    privileged: bool,
    resume: bool,
    model: &ModelEndpoint,
) -> ProcessSpec {
    let options = &session.options;
    let mut args: Vec<String> = [
        "--print",
        "--input-format",
        "stream-json",
        "--output-format",
        "stream-json",
        "--verbose",
        "--include-partial-messages",
        if resume { "--resume" } else { "--session-id" },
    ]
    .map(String::from)
    .into();
    args.push(session.cli_session_id.clone().unwrap_or_else(|| session.session_id.clone()));
    let mut flag = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            args.push(name.to_owned());
            args.push(value);
        }
    };
    flag("--permission-mode", options.permission_mode.clone().filter(|mode| mode != "default"));
    // As the seed's SDK does: the settings files (and their skills, hooks)
    // the CLI reads; an empty list reads none.
    flag("--setting-sources", Some(config.defaults.setting_sources.join(",")));
    flag("--system-prompt", options.system_prompt.clone());
    flag("--model", options.model.clone());
    flag("--max-turns", options.max_turns.map(|n| n.to_string()));
    flag("--max-budget-usd", options.max_budget_usd.map(|n| n.to_string()));
    flag("--allowedTools", options.allowed_tools.as_ref().filter(|t| !t.is_empty()).map(|t| t.join(",")));
    flag("--disallowedTools", options.disallowed_tools.as_ref().filter(|t| !t.is_empty()).map(|t| t.join(",")));
    flag(
        "--mcp-config",
        options
            .mcp_servers
            .as_ref()
            .filter(|m| !m.is_empty())
            .map(|servers| serde_json::json!({ "mcpServers": servers }).to_string()),
    );
    // Local plugins, relative to the session's directory (checked at create).
    for plugin in options.plugins.iter().flatten() {
        if let Some(path) = plugin["path"].as_str() {
            args.push("--plugin-dir".to_owned());
            args.push(Path::new(&session.cwd).join(path).to_string_lossy().into_owned());
        }
    }

    let home = user_dir.to_string_lossy().into_owned();
    let mut env = vec![
        ("HOME".to_owned(), home.clone()),
        ("TMPDIR".to_owned(), format!("{home}/.tmp")),
        ("CLAUDE_CODE_TMPDIR".to_owned(), format!("{home}/.tmp")),
        ("CLAUDE_CONFIG_DIR".to_owned(), format!("{home}/.claude")),
        ("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".to_owned(), "1".to_owned()),
        ("CLAUDE_AGENT_SESSION_ID".to_owned(), session.session_id.clone()),
    ];
    // The operator's credentials never enter a sandbox: the CLI talks to the
    // model proxy with a credential of its own, valid while it runs.
    env.push(("ANTHROPIC_BASE_URL".to_owned(), model.base_url.clone()));
    env.push(("ANTHROPIC_API_KEY".to_owned(), model.credential.expose().to_owned()));
    // Web access only through the egress proxy (its allow-list); the model
    // proxy is reached directly.
    if let Some(proxy) = &model.egress_proxy {
        for name in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
            env.push((name.to_owned(), proxy.expose().to_owned()));
        }
        for name in ["NO_PROXY", "no_proxy"] {
            env.push((name.to_owned(), "127.0.0.1,localhost".to_owned()));
        }
    }
    if let Some(model) = &config.anthropic.model {
        env.push(("ANTHROPIC_MODEL".to_owned(), model.clone()));
    }
    // The CLI refuses bypassPermissions as root unless told it is sandboxed.
    // A privileged worker drops root first; only a root server forced into
    // unprivileged mode runs CLIs as root.
    if !privileged && rustix::process::geteuid().is_root() {
        env.push(("IS_SANDBOX".to_owned(), "1".to_owned()));
    }
    ProcessSpec { program: cli_path(config), args, cwd: PathBuf::from(&session.cwd), env, join_cgroups: Vec::new() }
}
