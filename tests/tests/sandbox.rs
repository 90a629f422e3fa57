//! Red-team tests of the confined worker: a probe program runs in place of
//! the Claude CLI inside a real worker started by the real control plane,
//! for two users, and tries every forbidden operation (each must fail) and
//! the allowed work (each must succeed). Run in both sandbox modes:
//! privileged (the server is root, each user gets a uid) and unprivileged
//! (the server runs as a plain uid with delegated cgroups).

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::{ServerConfig, TestServer, unique_name};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The uid the unprivileged server runs as.
const UNPRIVILEGED_UID: u32 = 64_123;

/// A listener standing in for the model's port (the one port allowed).
fn model_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    port
}

fn sandbox_yaml(model_port: u16) -> String {
    sandbox_yaml_idle(model_port, 60)
}

fn sandbox_yaml_idle(model_port: u16, idle_secs: u64) -> String {
    format!(
        "sandbox:\n  allowed_tcp_ports: [{model_port}]\n  memory_mb: 256\n  pids: 64\n  rlimit_fsize_mb: 8\n  \
         rlimit_data_mb: 1024\n  worker_idle_timeout: {idle_secs}\n"
    )
}

/// Waits up to 10 s for `done`.
async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Owner of the user's files: their uid (privileged) or the server's.
async fn owner_uid(server: &TestServer, user: &str) -> u32 {
    match server.config.run_as {
        Some(uid) if !server.config.file_capabilities => uid,
        _ => {
            let reply = server.get(&format!("/api/v1/users/{user}"), &server.admin_token).await;
            reply.body["uid"].as_u64().unwrap_or_else(|| panic!("no uid for {user}: {reply:?}")) as u32
        }
    }
}

/// Writes `plan` into `<user>/probe-<n>` (owned by the user), starts a
/// session there and returns (session id, the probe's report).
async fn run_probe(server: &TestServer, token: &str, user: &str, subdir: &str, plan: &Value) -> (String, Value) {
    if !server.users_dir().join(user).exists() {
        // A first session creates the user's directory (and, privileged, uid).
        server.session(token, json!({"subdir": "setup"})).await;
    }
    let uid = owner_uid(server, user).await;
    let dir = server.users_dir().join(user).join(subdir);
    std::fs::create_dir_all(&dir).expect("probe dir");
    std::fs::write(dir.join("probe-plan.json"), plan.to_string()).expect("plan");
    chown(&dir, uid);
    chown(&dir.join("probe-plan.json"), uid);
    let session = server.session(token, json!({"subdir": subdir})).await;
    let report_path = dir.join("probe-report.json");
    for _ in 0..600 {
        if let Ok(text) = std::fs::read_to_string(&report_path) {
            return (session, serde_json::from_str(&text).expect("report JSON"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no probe report for {user} in 60 s; server log:\n{}", server.log());
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).expect("chown");
}

/// The parent of a process (for the probe: its worker).
fn parent_of(pid: u64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .expect("ppid")
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

async fn red_team(run_as: Option<u32>, file_capabilities: bool) {
    let model = model_port();
    let mut config = ServerConfig::default().yaml(&sandbox_yaml(model));
    let cgroup_v1 = Path::new("/sys/fs/cgroup/freezer").is_dir();
    config.run_as = run_as;
    config.file_capabilities = file_capabilities;
    let privileged = run_as.is_none() || file_capabilities;
    let server = TestServer::start_with(config).await;
    let alice = server.user_with_token("alice").await;
    let bob = server.user_with_token("bob").await;

    // Bob: a secret and a running probe (its pid and its worker are targets).
    let (_, bob_report) = run_probe(&server, &bob, "bob", "probe", &json!({})).await;
    let bob_pid = bob_report["pid"].as_u64().expect("bob pid");
    let bob_worker = parent_of(bob_pid);
    let bob_dir = server.users_dir().join("bob");
    let secret = bob_dir.join("secret.txt");
    std::fs::write(&secret, "bob's secret").expect("secret");
    chown(&secret, owner_uid(&server, "bob").await);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    // A setuid-root copy of `id` in alice's directory.
    let alice_probe_dir = server.users_dir().join("alice/probe");
    server.session(&alice, json!({"subdir": "setup"})).await;
    assert!(server.get("/api/v1/sessions", &alice).await.body.as_array().is_some_and(|s| s.len() == 1));
    std::fs::create_dir_all(&alice_probe_dir).expect("dir");
    let suid = alice_probe_dir.join("id-suid");
    std::fs::copy("/usr/bin/id", &suid).expect("copy id");
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).expect("setuid");

    let abstract_name = unique_name("cah-abstract");
    let _abstract = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes()).expect("addr");
        std::os::unix::net::UnixListener::bind_addr(&addr).expect("abstract listener")
    };
    let root = server.dir.path();
    let api_port = server.base_url.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).expect("api port");
    let pg_socket = PathBuf::from("/var/run/postgresql/.s.PGSQL.5432");
    let plan = json!({
        "read_denied": [
            secret,
            alice_probe_dir.join("../../bob/secret.txt"),
            root.join("config.yaml"),
            root.join("db/sessions.db"),
            "/etc/shadow",
            format!("/proc/{}/environ", server.pid),
            format!("/proc/{bob_worker}/environ"),
        ],
        "list_denied": [server.users_dir(), bob_dir, root.join("db")],
        "write_denied": [
            bob_dir.join("pwned.txt"),
            root.join("pwned.txt"),
            format!("/tmp/{}", unique_name("cah-pwned")),
        ],
        "link_target": secret,
        "pids_denied": [bob_pid, bob_worker, server.pid],
        "tcp_denied": [5432, api_port],
        "tcp_allowed": [model],
        "abstract_socket": abstract_name,
        "unix_sockets_denied": if pg_socket.exists() { vec![pg_socket] } else { Vec::new() },
        "setuid_binary": suid,
        "file_size_limit": 8 * 1024 * 1024,
        "fork_bound": 200,
        "memory_bomb_bytes": 1536u64 * 1024 * 1024,
    });
    let (session, report) = run_probe(&server, &alice, "alice", "probe", &plan).await;

    let checks = report["checks"].as_array().expect("checks");
    let failed: Vec<&Value> = checks.iter().filter(|c| c["pass"] != true).collect();
    assert!(
        failed.is_empty(),
        "{} of {} checks failed:\n{}",
        failed.len(),
        checks.len(),
        serde_json::to_string_pretty(&failed).unwrap_or_default()
    );
    assert!(checks.len() >= 40, "the probe ran only {} checks", checks.len());
    // The evidence for the table (visible with --nocapture).
    for check in checks {
        eprintln!("{:?} | {} | {} | {}", run_as, check["name"], check["outcome"], check["detail"]);
    }
    assert!(std::fs::read_to_string(&secret).expect("secret") == "bob's secret");
    assert!(!bob_dir.join("pwned.txt").exists());
    let alice_uid = report["uid"].as_u64().expect("uid");
    match run_as {
        Some(uid) if !privileged => assert_eq!(alice_uid, u64::from(uid)),
        _ => {
            assert_ne!(alice_uid, 0, "privileged mode drops root");
            assert_ne!(Some(alice_uid), run_as.map(u64::from), "privileged mode gives users their own uid");
            assert_ne!(alice_uid, bob_report["uid"].as_u64().expect("bob uid"), "each user has their own uid");
        }
    }

    // The daemon escaped the CLI's process group and session: deleting the
    // session must still kill it.
    let daemon = report["daemon_pid"].as_u64().expect("daemon pid");
    assert!(daemon > 1 && alive(daemon), "the probe's daemon runs");
    // In its session's cgroup in every hierarchy (v1: four).
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", report["pid"])).expect("the CLI's cgroups");
    let hierarchies = if cgroup_v1 { 4 } else { 1 };
    let in_session = cgroups.lines().filter(|line| line.ends_with(&format!("/session-{session}"))).count();
    assert!(in_session >= hierarchies, "the CLI is not in its session's cgroup:\n{cgroups}");
    let deleted = server.delete(&format!("/api/v1/sessions/{session}"), &alice).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let mut gone = false;
    for _ in 0..100 {
        if !alive(daemon) && !alive(report["pid"].as_u64().expect("pid")) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = std::fs::read_to_string(format!("/proc/{daemon}/status")).unwrap_or_default();
    let mut cgroups = std::fs::read_to_string(format!("/proc/{daemon}/cgroup")).unwrap_or_default();
    if let Some(freezer) = cgroups.lines().find_map(|l| l.strip_prefix("6:freezer:")).map(str::to_owned) {
        let mut dir = PathBuf::from("/sys/fs/cgroup/freezer").join(freezer.trim_start_matches('/'));
        loop {
            let state = std::fs::read_to_string(dir.join("freezer.state")).unwrap_or_default();
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            cgroups.push_str(&format!("{}: {} procs {:?}\n", dir.display(), state.trim(), procs.lines().count()));
            if !dir.pop() || dir == Path::new("/sys/fs/cgroup") {
                break;
            }
        }
    }
    assert!(
        gone,
        "{status}\n{cgroups}\nthe session's CLI ({}) and its setsid daemon ({daemon}) die with the session: alive {} {}\n{}",
        report["pid"],
        alive(report["pid"].as_u64().unwrap_or(0)),
        alive(daemon),
        server.log()
    );
    // Bob's probe was not touched by any of it.
    assert!(alive(bob_pid), "bob's process survived alice's attacks");
}

#[tokio::test]
async fn red_team_privileged() {
    red_team(None, false).await;
}

#[tokio::test]
async fn red_team_unprivileged() {
    red_team(Some(UNPRIVILEGED_UID), false).await;
}

/// The Docker image's setup, natively: a non-root server whose binaries
/// carry file capabilities runs the privileged mode (each user their own
/// uid) and passes the same attacks.
#[tokio::test]
async fn red_team_non_root_server_with_file_capabilities() {
    red_team(Some(UNPRIVILEGED_UID), true).await;
}

/// Nothing a worker ran survives the server: SIGTERM stops workers and
/// CLIs; `kill -9` of the server takes them down through PDEATHSIG.
#[tokio::test]
async fn no_process_outlives_the_server() {
    for graceful in [true, false] {
        let mut server = TestServer::start_with(ServerConfig::default().yaml(&sandbox_yaml(model_port()))).await;
        let alice = server.user_with_token("alice").await;
        let (_, report) = run_probe(&server, &alice, "alice", "probe", &json!({})).await;
        let probe = report["pid"].as_u64().expect("pid");
        let worker = parent_of(probe);
        assert!(alive(probe) && alive(worker));
        if graceful {
            assert!(server.terminate().await.success());
        } else {
            unsafe { libc::kill(server.pid as i32, libc::SIGKILL) };
        }
        let mut gone = false;
        for _ in 0..100 {
            if !alive(probe) && !alive(worker) {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(gone, "worker {worker} or CLI {probe} survived the server (graceful: {graceful})");
    }
}

/// A worker killed by `kill -9` takes its CLIs along and the next session
/// gets a fresh one; a worker without running CLIs stops after its idle time.
#[tokio::test]
async fn crashed_workers_are_replaced_and_idle_ones_stop() {
    let server = TestServer::start_with(ServerConfig::default().yaml(&sandbox_yaml_idle(model_port(), 1))).await;
    let alice = server.user_with_token("alice").await;
    let (_, report) = run_probe(&server, &alice, "alice", "probe", &json!({})).await;
    let probe = report["pid"].as_u64().expect("pid");
    let daemon = report["daemon_pid"].as_u64().expect("daemon");
    let worker = parent_of(probe);
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    assert!(
        eventually(|| !alive(worker) && !alive(probe) && !alive(daemon)).await,
        "the crashed worker's CLI ({probe}) or daemon ({daemon}) survived"
    );

    let (_, report) = run_probe(&server, &alice, "alice", "probe2", &json!({})).await;
    let replacement = parent_of(report["pid"].as_u64().expect("pid"));
    assert_ne!(replacement, worker);
    assert!(alive(replacement));

    for id in server.get("/api/v1/sessions", &alice).await.body.as_array().expect("ids") {
        let reply = server.delete(&format!("/api/v1/sessions/{}", id.as_str().expect("id")), &alice).await;
        assert_eq!(reply.status, StatusCode::NO_CONTENT);
    }
    assert!(eventually(|| !alive(replacement)).await, "the idle worker {replacement} was not stopped");
}

/// A session that expires (TTL) keeps its directory but its CLI is stopped.
#[tokio::test]
async fn ttl_expiry_stops_the_cli() {
    let config = ServerConfig::default().yaml(&sandbox_yaml(model_port())).env("CLAUDE_AGENT_SESSION_TTL", "2");
    let server = TestServer::start_with(config).await;
    let alice = server.user_with_token("alice").await;
    let (session, report) = run_probe(&server, &alice, "alice", "probe", &json!({})).await;
    let probe = report["pid"].as_u64().expect("pid");
    assert!(alive(probe));
    let mut stopped = false;
    for _ in 0..100 {
        if !alive(probe) {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stopped, "the expired session's CLI still runs");
    let fetched = server.get(&format!("/api/v1/sessions/{session}"), &alice).await;
    assert_eq!(fetched.body["status"], "expired");
    assert!(server.users_dir().join("alice/probe").is_dir());
}

/// A layer that cannot be applied stops the worker and the API says so.
#[tokio::test]
async fn an_unmet_sandbox_requirement_is_a_clear_503() {
    let config = ServerConfig::default().yaml("sandbox:\n  landlock_min_abi: 99\n");
    let server = TestServer::start_with(config).await;
    let alice = server.user_with_token("alice").await;
    let reply = server.post("/api/v1/sessions", &alice, json!({})).await;
    reply.assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    let detail = reply.body["detail"].as_str().expect("detail");
    assert!(detail.contains("landlock") && detail.contains("99"), "{detail}");
    // No session was left behind.
    assert_eq!(server.get("/api/v1/sessions?status=all", &alice).await.body, json!([]));
}
