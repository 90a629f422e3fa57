//! Runs in place of the Claude CLI inside a real worker and reports what it
//! could do. With `probe-plan.json` in its working directory it tries every
//! forbidden operation of the plan (each must fail) and the allowed work
//! (each must succeed), writes `probe-report.json`, then behaves like an idle
//! CLI (reads stdin until EOF). Without a plan it is only an idle CLI, which
//! is what the API tests use it for.

use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// One check: what was tried, whether it had to be denied, what happened.
struct Checks(Vec<Value>);

impl Checks {
    fn record(&mut self, name: &str, must_be_denied: bool, outcome: Result<String, String>) {
        let (allowed, detail) = match outcome {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
        let pass = allowed != must_be_denied;
        self.0.push(json!({
            "name": name,
            "expected": if must_be_denied { "denied" } else { "allowed" },
            "outcome": if allowed { "allowed" } else { "denied" },
            "detail": detail,
            "pass": pass,
        }));
    }

    fn denied(&mut self, name: &str, outcome: Result<String, String>) {
        self.record(name, true, outcome);
    }

    fn allowed(&mut self, name: &str, outcome: Result<String, String>) {
        self.record(name, false, outcome);
    }
}

fn errno_result(ret: libc::c_long) -> Result<String, String> {
    if ret < 0 { Err(std::io::Error::last_os_error().to_string()) } else { Ok(format!("returned {ret}")) }
}

fn io<T>(result: std::io::Result<T>) -> Result<String, String> {
    result.map(|_| "ok".to_owned()).map_err(|e| e.to_string())
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program).args(args).stdin(Stdio::null()).output().map_err(|e| e.to_string())?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() { Ok(text) } else { Err(format!("{}: {text}", output.status)) }
}

/// The cgroup directories this process is in, one per hierarchy (v1:
/// `/sys/fs/cgroup/<controllers>/<path>`; v2: `/sys/fs/cgroup/<path>`).
fn own_cgroup_dirs() -> Vec<std::path::PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let root = Path::new("/sys/fs/cgroup").join(controllers.strip_prefix("name=").unwrap_or(controllers));
            Some(root.join(path.trim_start_matches('/'))).filter(|dir| dir.join("cgroup.procs").exists())
        })
        .collect()
}

/// Limits of its own cgroup and its parent (the user's), and moving itself
/// up into the user's cgroup (out of its session's): all denied.
fn cgroup_checks(checks: &mut Checks) {
    const LIMITS: [&str; 6] =
        ["memory.limit_in_bytes", "memory.max", "pids.max", "cpu.cfs_quota_us", "cpu.max", "freezer.state"];
    let dirs = own_cgroup_dirs();
    checks.allowed(
        "find its own cgroups",
        if dirs.is_empty() { Err("none found".into()) } else { Ok(format!("{dirs:?}")) },
    );
    for dir in dirs {
        let parent = dir.parent().map(Path::to_path_buf).unwrap_or_default();
        for file in LIMITS {
            for target in [dir.join(file), parent.join(file)] {
                if target.exists() {
                    let value = if file == "freezer.state" { "THAWED" } else { "max" };
                    checks.denied(&format!("write {}", target.display()), io(std::fs::write(&target, value)));
                }
            }
        }
        let up = parent.join("cgroup.procs");
        checks.denied(&format!("move itself into {}", up.display()), io(std::fs::write(&up, "0")));
    }
}

fn strings(plan: &Value, key: &str) -> Vec<String> {
    plan[key].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect()
}

fn numbers(plan: &Value, key: &str) -> Vec<i64> {
    plan[key].as_array().into_iter().flatten().filter_map(Value::as_i64).collect()
}

fn main() {
    let plan_path = Path::new("probe-plan.json");
    if let Ok(text) = std::fs::read_to_string(plan_path) {
        let plan: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let report = probe(&plan);
        let tmp = "probe-report.json.tmp";
        if std::fs::write(tmp, serde_json::to_vec_pretty(&report).unwrap_or_default()).is_ok() {
            let _ = std::fs::rename(tmp, "probe-report.json");
        }
    }
    // Idle CLI: echo each stdin line back as a JSON event until EOF; a user
    // message asking for `probe:reply-bytes N` gets a reply of N bytes.
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        match requested_reply_bytes(&line) {
            Some(bytes) => reply_like_the_cli(&mut stdout, bytes),
            None => {
                let _ = writeln!(stdout, "{}", json!({"type": "probe_echo", "line": line}));
            }
        }
        let _ = stdout.flush();
    }
}

/// `N` of a stream-json user message whose text holds `probe:reply-bytes N`.
fn requested_reply_bytes(line: &str) -> Option<usize> {
    let message: Value = serde_json::from_str(line).ok()?;
    if message["type"] != "user" {
        return None;
    }
    let text = message["message"]["content"].as_str()?;
    text.lines().find_map(|l| l.trim().strip_prefix("probe:reply-bytes ")?.trim().parse().ok())
}

/// The stream-json a CLI writes for a text reply, with no model behind it:
/// 64 KiB `text_delta` stream events, the assistant message, the result.
/// It measures the service's relay without the CLI's own speed.
fn reply_like_the_cli(out: &mut impl Write, bytes: usize) {
    const DELTA: usize = 64 * 1024;
    let filler: Vec<u8> = (0..bytes).map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789 "[i % 37]).collect();
    let text = String::from_utf8(filler).unwrap_or_default();
    for delta in text.as_bytes().chunks(DELTA) {
        let delta = std::str::from_utf8(delta).unwrap_or_default();
        let event = json!({"type": "stream_event", "event": {"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": delta}}});
        let _ = writeln!(out, "{event}");
    }
    let assistant = json!({"type": "assistant", "message": {"role": "assistant",
        "content": [{"type": "text", "text": text}]}});
    let _ = writeln!(out, "{assistant}");
    let result = json!({"type": "result", "subtype": "success", "is_error": false, "result": text,
        "total_cost_usd": 0.0, "usage": {"input_tokens": 0, "output_tokens": 0}, "duration_ms": 0, "num_turns": 1});
    let _ = writeln!(out, "{result}");
}

fn probe(plan: &Value) -> Value {
    let mut checks = Checks(Vec::new());
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };

    // Allowed work first: the sandbox must not break the agent.
    checks.allowed(
        "write and read own file",
        io(std::fs::write("own.txt", b"mine")).and_then(|_| {
            std::fs::read_to_string("own.txt")
                .map_err(|e| e.to_string())
                .and_then(|s| if s == "mine" { Ok(s) } else { Err(format!("read back {s:?}")) })
        }),
    );
    checks.allowed("run bash", run("bash", &["-c", "echo hi > from-bash.txt && cat from-bash.txt"]));
    checks.allowed(
        "run git",
        run("git", &["init", "-q", "repo"]).and_then(|_| run("git", &["-C", "repo", "status", "--short"])),
    );
    checks.allowed("run rg", run("rg", &["--version"]));
    for port in numbers(plan, "tcp_allowed") {
        checks.allowed(&format!("connect to allowed port {port}"), io(TcpStream::connect(("127.0.0.1", port as u16))));
    }

    // Other users' files and the server's.
    for path in strings(plan, "read_denied") {
        checks.denied(&format!("read {path}"), io(std::fs::read(&path)));
    }
    for path in strings(plan, "list_denied") {
        checks.denied(&format!("list {path}"), io(std::fs::read_dir(&path)));
    }
    for path in strings(plan, "readlink_denied") {
        checks.denied(
            &format!("readlink {path}"),
            std::fs::read_link(&path).map(|p| p.display().to_string()).map_err(|e| e.to_string()),
        );
    }
    for path in strings(plan, "write_denied") {
        checks.denied(&format!("write {path}"), io(std::fs::write(&path, b"pwned")));
    }
    if let Some(target) = plan["link_target"].as_str() {
        let _ = std::fs::remove_file("link-out");
        let created = std::os::unix::fs::symlink(target, "link-out");
        checks.denied("read through a planted symlink", io(created.and_then(|_| std::fs::read("link-out"))));
        checks.denied("hard link to another user's file", io(std::fs::hard_link(target, "hardlink-out")));
        checks.denied("rename another user's file into own dir", io(std::fs::rename(target, "stolen")));
    }

    // Its cgroups: a CLI may join its session's cgroup, nothing more.
    cgroup_checks(&mut checks);

    // Processes of others.
    for pid in numbers(plan, "pids_denied") {
        let pid = pid as libc::pid_t;
        checks.denied(&format!("signal 0 to {pid}"), errno_result(unsafe { libc::kill(pid, 0) } as libc::c_long));
        checks.denied(
            &format!("SIGTERM to {pid}"),
            errno_result(unsafe { libc::kill(pid, libc::SIGTERM) } as libc::c_long),
        );
        let attach = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) };
        checks.denied(&format!("ptrace attach {pid}"), errno_result(attach));
        checks.denied(&format!("read /proc/{pid}/environ"), io(std::fs::read(format!("/proc/{pid}/environ"))));
        checks.denied(&format!("readlink /proc/{pid}/cwd"), io(std::fs::read_link(format!("/proc/{pid}/cwd"))));
        checks.denied(&format!("list /proc/{pid}/root"), io(std::fs::read_dir(format!("/proc/{pid}/root/"))));
        checks.denied(&format!("read /proc/{pid}/mem"), io(std::fs::File::open(format!("/proc/{pid}/mem"))));
    }

    // Kernel attack surface.
    checks
        .denied("unshare(CLONE_NEWUSER)", errno_result(unsafe { libc::unshare(libc::CLONE_NEWUSER) } as libc::c_long));
    checks.denied("unshare(CLONE_NEWNS)", errno_result(unsafe { libc::unshare(libc::CLONE_NEWNS) } as libc::c_long));
    checks.denied("unshare -U (the binary)", run("unshare", &["-U", "true"]));
    let _ = std::fs::create_dir_all("mnt");
    let mount = unsafe { libc::mount(c"none".as_ptr(), c"mnt".as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()) };
    checks.denied("mount tmpfs", errno_result(mount as libc::c_long));
    let mut params = [0u8; 120];
    let uring = unsafe { libc::syscall(libc::SYS_io_uring_setup, 8u32, params.as_mut_ptr()) };
    checks.denied("io_uring_setup", errno_result(uring));
    checks.denied("bpf", errno_result(unsafe { libc::syscall(libc::SYS_bpf, 0, 0, 0) }));

    // Network.
    for port in numbers(plan, "tcp_denied") {
        let outcome = TcpStream::connect_timeout(&([127, 0, 0, 1], port as u16).into(), Duration::from_secs(2));
        checks.denied(&format!("connect to port {port}"), io(outcome));
    }
    checks.denied("bind a listening TCP port", io(TcpListener::bind("127.0.0.1:0")));
    if let Some(name) = plan["abstract_socket"].as_str() {
        use std::os::linux::net::SocketAddrExt;
        let outcome = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|addr| std::os::unix::net::UnixStream::connect_addr(&addr));
        checks.denied("connect to a host abstract unix socket", io(outcome));
    }
    for path in strings(plan, "unix_sockets_denied") {
        checks.denied(&format!("connect to unix socket {path}"), io(std::os::unix::net::UnixStream::connect(&path)));
    }

    // Privileges.
    if let Some(binary) = plan["setuid_binary"].as_str() {
        // The copy of `id` is setuid root: with NO_NEW_PRIVS it must run as us.
        let outcome = run(binary, &["-u"])
            .and_then(|out| if out.trim() == "0" { Ok("euid 0".into()) } else { Err(format!("euid {}", out.trim())) });
        checks.denied("gain root through a setuid binary", outcome);
    }
    checks.denied("setuid(0)", errno_result(unsafe { libc::setuid(0) } as libc::c_long));

    // Resource limits.
    if let Some(limit) = plan["file_size_limit"].as_u64() {
        let outcome = std::fs::File::create("big.bin").and_then(|mut f| {
            let chunk = vec![0u8; 1 << 20];
            for _ in 0..=(limit >> 20) + 1 {
                f.write_all(&chunk)?;
            }
            Ok(())
        });
        let _ = std::fs::remove_file("big.bin");
        checks.denied(&format!("write a file over {limit} bytes"), io(outcome));
    }
    if let Some(bound) = plan["fork_bound"].as_u64() {
        checks.denied(&format!("fork more than {bound} processes"), fork_bomb(bound));
    }
    if let Some(bytes) = plan["memory_bomb_bytes"].as_u64() {
        checks.denied(&format!("allocate {bytes} bytes"), memory_bomb(bytes));
    }

    // A daemon that leaves the process group and session: it must die with
    // the session (the test checks after deleting it).
    let daemon_pid = spawn_daemon();

    json!({
        "pid": std::process::id(),
        "uid": unsafe { libc::getuid() },
        "daemon_pid": daemon_pid,
        "checks": checks.0,
    })
}

/// Forks children that wait, until fork fails or `bound` is exceeded.
fn fork_bomb(bound: u64) -> Result<String, String> {
    let mut children = Vec::new();
    let mut failure = None;
    while (children.len() as u64) <= bound {
        match unsafe { libc::fork() } {
            0 => unsafe {
                libc::pause();
                libc::_exit(0);
            },
            pid if pid > 0 => children.push(pid),
            _ => {
                failure = Some(std::io::Error::last_os_error().to_string());
                break;
            }
        }
    }
    let count = children.len();
    for pid in children {
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    match failure {
        Some(error) => Err(format!("fork failed after {count} children: {error}")),
        None => Ok(format!("{count} children forked")),
    }
}

/// A child that allocates and touches `bytes`; it must be stopped (OOM
/// kill or allocation failure), never finish.
fn memory_bomb(bytes: u64) -> Result<String, String> {
    match unsafe { libc::fork() } {
        0 => {
            let mut blocks: Vec<Vec<u8>> = Vec::new();
            let mut total = 0u64;
            while total < bytes {
                let mut block = Vec::new();
                if block.try_reserve_exact(64 << 20).is_err() {
                    unsafe { libc::_exit(3) };
                }
                block.resize(64 << 20, 1u8);
                total += 64 << 20;
                blocks.push(block);
            }
            unsafe { libc::_exit(0) };
        }
        pid if pid > 0 => {
            let mut status = 0;
            unsafe { libc::waitpid(pid, &mut status, 0) };
            let status = std::process::ExitStatus::from_raw(status);
            if status.success() { Ok("allocated everything".into()) } else { Err(format!("stopped: {status}")) }
        }
        _ => Err(std::io::Error::last_os_error().to_string()),
    }
}

/// Double fork + setsid: a daemon outside the CLI's process group.
fn spawn_daemon() -> i64 {
    let mut fds = [0; 2];
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return -1;
    }
    match unsafe { libc::fork() } {
        0 => unsafe {
            libc::setsid();
            if libc::fork() == 0 {
                let pid = libc::getpid();
                libc::write(fds[1], (&pid as *const libc::pid_t).cast(), std::mem::size_of::<libc::pid_t>());
                loop {
                    libc::pause();
                }
            }
            libc::_exit(0);
        },
        pid if pid > 0 => {
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            let mut daemon: libc::pid_t = 0;
            let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
            unsafe { libc::close(fds[1]) };
            let mut buffer = [0u8; 4];
            if file.read_exact(&mut buffer).is_ok() {
                daemon = libc::pid_t::from_ne_bytes(buffer);
            }
            i64::from(daemon)
        }
        _ => -1,
    }
}
