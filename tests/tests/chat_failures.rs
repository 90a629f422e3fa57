//! Chat when things go wrong, end to end: the real server, the real Claude
//! CLI inside the user's confined worker, and the mock of the remote model
//! scripted to fail (HTTP errors, cut streams), plus processes killed under
//! the server's feet, concurrent users, restarts and deletes.
//!
//! Processes are found under /proc: the CLI runs with `--session-id <id>`
//! or `--resume <id>` on its command line, and its parent is the user's
//! `claude-agent-worker`.

use std::time::{Duration, Instant};

use integration_tests::{
    Backend, Reply, ServerConfig, SseEvent, TestServer, read_sse, session_process_pids, wait_for_model_request,
};
use mock_model::{MockModel, MockServer};
use reqwest::StatusCode;
use serde_json::json;

/// A server whose sessions run the real CLI against `mock`.
async fn server_with_cli(mock: &MockServer, config: ServerConfig) -> TestServer {
    TestServer::start_with(config.with_cli(mock)).await
}

/// The model requests whose last user text contains `needle`.
fn requests_with(mock: &MockServer, needle: &str) -> Vec<mock_model::RequestRecord> {
    mock.message_requests()
        .into_iter()
        .filter(|r| r.last_user_text.as_deref().is_some_and(|t| t.contains(needle)))
        .collect()
}

/// A process's argv.
fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
        })
        .unwrap_or_default()
}

/// The `/proc/<pid>/stat` fields after the command name (state first).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// Exists and is not a zombie.
fn is_alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|state| state != "Z" && state != "X"))
}

fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// Whether `pid` runs the worker binary (by its executable, else by its
/// name, which the kernel cuts to 15 bytes).
fn is_worker(pid: u32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    exe.as_deref().and_then(|p| p.file_name()).is_some_and(|n| n == "claude-agent-worker")
        || comm.trim_end() == &"claude-agent-worker"[..15]
}

/// The session's CLI, waiting (a bounded time) for it to appear.
async fn wait_for_cli(session_id: &str, within: Duration) -> Vec<u32> {
    let until = Instant::now() + within;
    loop {
        let pids = session_process_pids(session_id);
        if !pids.is_empty() || Instant::now() >= until {
            return pids;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The text of a stream's `text_delta` frames.
fn streamed_text(events: &[SseEvent]) -> String {
    events.iter().filter(|e| e.kind() == "text_delta").filter_map(|e| e.data["text"].as_str()).collect()
}

fn kinds(events: &[SseEvent]) -> Vec<String> {
    events.iter().map(|e| e.kind().to_owned()).collect()
}

/// A sync turn scripted to reply `text` succeeds with exactly that.
async fn assert_replies(server: &TestServer, token: &str, session: &str, text: &str, when: &str) {
    let reply = server.chat(token, session, &format!("mock:reply {text}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{when}: the turn failed: {reply:?}\n{}", server.log());
    assert_eq!(reply.body["text"], text, "{when}: {reply:?}");
}

#[tokio::test]
async fn parallel_tool_calls_in_one_message_all_run() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({"subdir": "par"})).await;

    let message = "mock:tool Bash {\"command\": \"echo one > a.txt && echo wrote-a\"}\n\
                   mock:tool Bash {\"command\": \"echo two > b.txt && echo wrote-b\"}";
    let reply = server.chat(&alice, &session, message).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}\n{}", server.log());
    assert_eq!(reply.body["is_error"], false, "{reply:?}");

    let dir = server.users_dir().join("alice/par");
    let a = std::fs::read_to_string(dir.join("a.txt")).unwrap_or_else(|e| panic!("a.txt: {e}\n{reply:?}"));
    let b = std::fs::read_to_string(dir.join("b.txt")).unwrap_or_else(|e| panic!("b.txt: {e}\n{reply:?}"));
    assert_eq!((a.trim(), b.trim()), ("one", "two"), "file contents");

    let calls = reply.body["tool_calls"].as_array().cloned().unwrap_or_default();
    assert_eq!(calls.len(), 2, "two tool calls expected: {reply:?}");
    assert!(calls.iter().all(|c| c["tool"] == "Bash"), "{calls:?}");
    let commands: Vec<&str> = calls.iter().filter_map(|c| c["input"]["command"].as_str()).collect();
    assert_eq!(commands, ["echo one > a.txt && echo wrote-a", "echo two > b.txt && echo wrote-b"], "in call order");

    // The CLI sent both results back in one message; the mock echoes them.
    let text = reply.body["text"].as_str().unwrap_or_default();
    assert!(text.contains("wrote-a") && text.contains("wrote-b"), "both tool results in the reply: {text:?}");
    let followup = mock.message_requests().into_iter().find(|r| r.tool_results.len() == 2);
    let followup =
        followup.unwrap_or_else(|| panic!("no request with two tool results: {:?}", mock.message_requests()));
    assert!(followup.tool_results.iter().all(|r| !r.is_error), "{:?}", followup.tool_results);
    assert_eq!(mock.message_requests().len(), 2, "one tool round trip = 2 model requests");
}

/// Starts a slow streamed turn and waits until the model streams it; the
/// frames are read on a task of their own.
async fn start_slow_stream(
    server: &TestServer,
    mock: &MockServer,
    token: &str,
    session: &str,
    tag: &str,
) -> tokio::task::JoinHandle<Vec<SseEvent>> {
    let message = format!("mock:slow 500 40\nmock:reply {tag} a long slow answer that takes twenty seconds to stream");
    let response = server.open_stream(token, session, &message).await;
    let reader = tokio::spawn(read_sse(response, |_| false));
    assert!(
        wait_for_model_request(mock, tag, Duration::from_secs(30)).await,
        "the slow turn {tag} never reached the model\n{}",
        server.log()
    );
    reader
}

/// The session's CLI and the worker that runs it (its parent).
fn cli_and_worker(server: &TestServer, session: &str) -> (u32, u32) {
    let cli = session_process_pids(session);
    assert_eq!(cli.len(), 1, "one CLI process for the session: {cli:?}\n{}", server.log());
    let worker = parent_of(cli[0]).expect("the CLI's parent");
    assert!(is_worker(worker), "the CLI's parent {worker} is not claude-agent-worker: {:?}", cmdline(worker));
    (cli[0], worker)
}

fn sigkill(pid: u32) {
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0, "SIGKILL {pid}");
}

/// Waits (10 s at most) for a stream to end after something was killed,
/// and checks it ended with an `error` frame; returns the frames and how
/// long after `killed` the stream ended.
async fn stream_ends_with_error(
    server: &TestServer,
    reader: tokio::task::JoinHandle<Vec<SseEvent>>,
    killed: Instant,
) -> (Vec<SseEvent>, Duration) {
    let events = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .unwrap_or_else(|_| panic!("the stream still runs 10 s after the kill\n{}", server.log()))
        .expect("reader task");
    let ended = killed.elapsed();
    let kinds = kinds(&events);
    assert_eq!(kinds.last().map(String::as_str), Some("error"), "the stream must end with an error frame: {kinds:?}");
    assert!(!kinds.iter().any(|k| k == "done" || k == "result"), "{kinds:?}");
    assert!(ended < Duration::from_secs(5), "the error frame came {ended:?} after the kill\n{}", server.log());
    (events, ended)
}

/// Checks that `pid` runs in its session's own cgroup (memory and pids
/// hierarchies), not only in its user's.
fn assert_in_session_cgroup(server: &TestServer, pid: u32, session: &str) {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let limited: Vec<&str> = cgroups.lines().filter(|l| l.contains(":memory:") || l.contains(":pids:")).collect();
    let session_cgroup = format!("/session-{session}");
    assert!(
        !limited.is_empty() && limited.iter().all(|l| l.ends_with(&session_cgroup)),
        "{pid} is not in its session cgroup:\n{cgroups}\n{}",
        server.log()
    );
}

/// Waits until `pid` has disappeared from /proc (exited and reaped).
async fn wait_until_reaped(pid: u32, within: Duration) -> bool {
    let until = Instant::now() + within;
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test]
async fn a_worker_killed_mid_turn_ends_the_stream_with_an_error_and_the_session_resumes() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let first = server.chat(&alice, &session, "remember the word kiwi").await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}\n{}", server.log());

    let reader = start_slow_stream(&server, &mock, &alice, &session, "slow-kill-worker").await;
    let (cli, worker) = cli_and_worker(&server, &session);
    let killed = Instant::now();
    sigkill(worker);
    let (events, ended) = stream_ends_with_error(&server, reader, killed).await;
    let error = events.last().map(|e| e.data["error"].to_string()).unwrap_or_default();
    eprintln!("worker killed: the stream ended {ended:?} later with {error}");
    assert!(error.contains("worker died"), "the error says why: {error}");
    // The CLI died with its worker (PDEATHSIG, process group, cgroup), and
    // the server reaped the worker once it had cleaned up after it.
    let until = Instant::now() + Duration::from_secs(3);
    while is_alive(cli) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!is_alive(cli), "the CLI {cli} outlived its worker");
    assert!(wait_until_reaped(worker, Duration::from_secs(10)).await, "the dead worker {worker} was never reaped");

    let started = Instant::now();
    let next = server.chat(&alice, &session, "mock:reply back again").await;
    eprintln!("the next turn after the kill took {:?}", started.elapsed());
    assert_eq!(next.status, StatusCode::OK, "{next:?}\n{}", server.log());
    assert_eq!(next.body["is_error"], false, "{next:?}");
    assert_eq!(next.body["text"], "back again", "{next:?}");
    let (restarted, new_worker) = cli_and_worker(&server, &session);
    let args = cmdline(restarted);
    assert!(args.windows(2).any(|w| w[0] == "--resume" && w[1] == session), "the CLI was not resumed: {args:?}");
    assert_ne!(new_worker, worker, "a new worker runs the CLI");
    assert_in_session_cgroup(&server, restarted, &session);
    let last = mock.message_requests().pop().expect("a request");
    let texts: Vec<&str> = last.messages.iter().map(|m| m.text.as_str()).collect();
    assert!(texts.iter().any(|t| t.contains("kiwi")), "the resumed CLI lost the first turn: {texts:?}");
    // The history keeps the failed turn as an `error` entry.
    let history = server.get(&format!("/api/v1/sessions/{session}/messages"), &alice).await;
    let kinds: Vec<&str> =
        history.body["messages"].as_array().into_iter().flatten().filter_map(|m| m["kind"].as_str()).collect();
    assert!(kinds.contains(&"error"), "no error entry for the killed turn: {kinds:?}");
}

/// A client that retries as soon as it sees the `error` frame of a turn
/// whose worker died must get a working turn: the new worker and CLI must
/// not be caught by the clean-up of the dead worker (same user cgroup,
/// same session cgroup name). Repeated, as it is a race.
#[tokio::test]
async fn a_message_sent_right_after_a_worker_died_is_not_killed_by_its_clean_up() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let first = server.chat(&alice, &session, "mock:reply first").await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}\n{}", server.log());
    for round in 0..3 {
        let reader = start_slow_stream(&server, &mock, &alice, &session, &format!("slow-race-{round}")).await;
        let (_, worker) = cli_and_worker(&server, &session);
        let killed = Instant::now();
        sigkill(worker);
        stream_ends_with_error(&server, reader, killed).await;
        // At once, as a client retrying on the error frame would.
        assert_replies(&server, &alice, &session, &format!("retry {round}"), "right after the worker died").await;
    }
}

/// The CLI dies (SIGKILL) mid-turn, its worker lives on: the stream ends
/// with an `error` frame, and a message sent right then starts a new CLI
/// (`--resume`) in the same worker. Repeated: the worker may still count
/// the dead CLI as running when the new start arrives.
#[tokio::test]
async fn a_cli_killed_mid_turn_ends_the_stream_with_an_error_and_the_next_message_restarts_it() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(
        &mock,
        ServerConfig::default().env("CLAUDE_AGENT_LOG__LEVEL", "info,sqlx=warn,control_plane::chat=debug"),
    )
    .await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let first = server.chat(&alice, &session, "remember the word mango").await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}\n{}", server.log());
    for round in 0..5 {
        let reader = start_slow_stream(&server, &mock, &alice, &session, &format!("slow-cli-{round}")).await;
        let (cli, worker) = cli_and_worker(&server, &session);
        let killed = Instant::now();
        sigkill(cli);
        let (events, ended) = stream_ends_with_error(&server, reader, killed).await;
        let error = events.last().map(|e| e.data["error"].to_string()).unwrap_or_default();
        eprintln!("round {round}: CLI killed, the stream ended {ended:?} later with {error}");
        assert!(error.contains("signal Some(9)"), "the error says why: {error}");
        // At once: the worker lives on and starts a new CLI with --resume.
        let body = json!({"session_id": session, "message": format!("mock:reply again {round}"), "timeout": 10});
        let next = server.post("/api/v1/chat", &alice, body).await;
        assert_eq!(
            next.status,
            StatusCode::OK,
            "round {round}: the turn right after the CLI was killed failed: {next:?}\n{}",
            server.log()
        );
        assert_eq!(next.body["text"], format!("again {round}"), "{next:?}");
        let (restarted, same_worker) = cli_and_worker(&server, &session);
        assert_ne!(restarted, cli, "a new CLI");
        assert_eq!(same_worker, worker, "the worker survives its CLI");
        assert!(cmdline(restarted).iter().any(|a| a == "--resume"), "{:?}", cmdline(restarted));
        assert_in_session_cgroup(&server, restarted, &session);
    }
    let last = mock.message_requests().pop().expect("a request");
    assert!(last.messages.iter().any(|m| m.text.contains("mango")), "the resumed CLI lost the first turn");
}

/// The CLI's transcript of a session (`<session>.jsonl` under the user's
/// `.claude/projects/`), waiting (a bounded time) for it to appear.
async fn wait_for_transcript(
    server: &TestServer,
    user: &str,
    session: &str,
    within: Duration,
) -> Option<std::path::PathBuf> {
    let projects = server.users_dir().join(user).join(".claude/projects");
    let name = format!("{session}.jsonl");
    let until = Instant::now() + within;
    loop {
        let found = std::fs::read_dir(&projects)
            .into_iter()
            .flatten()
            .flatten()
            .map(|project| project.path().join(&name))
            .find(|path| path.is_file());
        if found.is_some() || Instant::now() >= until {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first turn fails before any turn was recorded, after the CLI wrote
/// its transcript: the restarted CLI must continue that conversation (a
/// second `--session-id <id>` is refused by the CLI: "Session ID … is
/// already in use", exit 1).
#[tokio::test]
async fn a_worker_killed_during_the_first_turn_leaves_a_usable_session() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(
        &mock,
        ServerConfig::default().env("CLAUDE_AGENT_LOG__LEVEL", "info,sqlx=warn,control_plane::chat=debug"),
    )
    .await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let reader = start_slow_stream(&server, &mock, &alice, &session, "slow-first").await;
    // Killed once the CLI has written the conversation's start to disk.
    let transcript = wait_for_transcript(&server, "alice", &session, Duration::from_secs(10)).await;
    assert!(transcript.is_some(), "the CLI never wrote its transcript\n{}", server.log());
    let (_, worker) = cli_and_worker(&server, &session);
    let killed = Instant::now();
    sigkill(worker);
    stream_ends_with_error(&server, reader, killed).await;
    // Not the race above: the dead worker is cleaned up and reaped first.
    assert!(wait_until_reaped(worker, Duration::from_secs(10)).await, "the dead worker {worker} was never reaped");

    let next = server.chat(&alice, &session, "mock:reply second try").await;
    assert_eq!(next.status, StatusCode::OK, "{next:?}\n{}", server.log());
    assert_eq!(next.body["is_error"], false, "{next:?}\n{}", server.log());
    let text = next.body["text"].as_str().unwrap_or_default();
    eprintln!("after a killed first turn: {text:?}, CLI args {:?}", cmdline(session_process_pids(&session)[0]));
    assert!(text.ends_with("second try"), "{next:?}");
}

#[tokio::test]
async fn model_500_and_529_are_retried_until_the_answer_comes() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    for status in [500, 529] {
        let line = format!("mock:fail {status} 2 tag-{status}");
        let started = Instant::now();
        let reply = server.chat(&alice, &session, &format!("{line}\nmock:reply ok")).await;
        let took = started.elapsed();
        let requests = requests_with(&mock, &line);
        let at: Vec<u64> = requests.iter().map(|r| r.at_ms).collect();
        eprintln!("{status} twice, then the answer: {took:?}, requests at {at:?} ms");
        assert_eq!(reply.status, StatusCode::OK, "{status}: {reply:?}\n{}", server.log());
        assert_eq!(reply.body["text"], "ok", "{status}: {reply:?}");
        assert_eq!(reply.body["is_error"], false, "{status}: {reply:?}");
        let outcomes: Vec<&str> = requests.iter().map(|r| r.outcome.as_str()).collect();
        assert_eq!(outcomes, ["error", "error", "message"], "{status}: two failures, then the answer");
        assert!(took < Duration::from_secs(15), "{status}: two retries took {took:?}");
    }
}

/// Errors the CLI gives up on: a result with `is_error` (HTTP 200), quickly.
/// The server cannot lower the CLI's retries (`CLAUDE_CODE_MAX_RETRIES` is
/// not passed through: the CLI's environment is built from scratch), so
/// only statuses the CLI does not back off on are used here.
#[tokio::test]
async fn model_errors_the_cli_gives_up_on_are_an_error_result_in_bounded_time() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;

    // 400 on every attempt: the CLI retries at once with fewer beta
    // features, then gives up.
    let session = server.session(&alice, json!({})).await;
    let started = Instant::now();
    let reply = server.chat(&alice, &session, "mock:fail 400 100 tag-400\nmock:reply never").await;
    let took = started.elapsed();
    let attempts = requests_with(&mock, "tag-400").len();
    eprintln!("400 always: {took:?}, {attempts} requests, {}", reply.body["text"]);
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}\n{}", server.log());
    assert_eq!(reply.body["is_error"], true, "{reply:?}");
    let text = reply.body["text"].as_str().unwrap_or_default();
    assert!(text.starts_with("API Error: 400") && text.contains("scripted failure"), "{reply:?}");
    assert!((1..=10).contains(&attempts), "{attempts} attempts for a 400");
    assert!(took < Duration::from_secs(20), "a 400 took {took:?}");

    // 402 once, on the stream: not retried; the stream ends with the
    // result and an `error` frame.
    let session = server.session(&alice, json!({})).await;
    let started = Instant::now();
    let response = server.open_stream(&alice, &session, "mock:fail 402 1 tag-402\nmock:reply never").await;
    let events = tokio::time::timeout(Duration::from_secs(30), read_sse(response, |_| false))
        .await
        .unwrap_or_else(|_| panic!("the stream of a 402 does not end\n{}", server.log()));
    let took = started.elapsed();
    eprintln!("402 once: {took:?}, frames {:?}", kinds(&events));
    assert_eq!(kinds(&events), ["result", "error"], "{events:?}");
    assert_eq!(events[0].data["is_error"], true, "{events:?}");
    let error = events[1].data["error"].as_str().unwrap_or_default();
    assert!(error.contains("API Error: 402"), "the error frame carries the CLI's message: {error:?}");
    assert_eq!(requests_with(&mock, "tag-402").len(), 1, "a 402 is not retried");
    assert!(took < Duration::from_secs(20), "a 402 took {took:?}");

    // The session stays usable. The CLI sends the failed message again,
    // merged with the new one into one user message (its 402 is spent).
    let after = server.chat(&alice, &session, "mock:reply after").await;
    assert_eq!(after.status, StatusCode::OK, "{after:?}\n{}", server.log());
    assert_eq!(after.body["is_error"], false, "{after:?}");
    assert_eq!(after.body["text"], "never\nafter", "{after:?}");
}

/// A model error the CLI backs off on for minutes (401, like 5xx) is
/// bounded by the turn's timeout: 504, and the session is not left busy.
#[tokio::test]
async fn a_model_error_the_cli_keeps_retrying_ends_at_the_turn_timeout() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    for round in 0..2 {
        let started = Instant::now();
        let body =
            json!({"session_id": session, "message": "mock:fail 401 1000 tag-401\nmock:reply never", "timeout": 3});
        let reply = server.post("/api/v1/chat", &alice, body).await;
        let took = started.elapsed();
        let attempts = requests_with(&mock, "tag-401").len();
        eprintln!(
            "401 always, timeout 3 s (round {round}): {} after {took:?}, {attempts} requests so far",
            reply.status
        );
        reply.assert_error(StatusCode::GATEWAY_TIMEOUT, "timeout");
        assert!(took < Duration::from_secs(7), "the turn outlived its 3 s timeout: {took:?}\n{}", server.log());
        assert!(attempts >= 2, "the CLI was retrying: {attempts}");
    }
}

/// A model stream cut in the middle (connection closed after half of the
/// deltas): the CLI 2.1.332 retries it as a new streamed request and the
/// turn completes; the session goes on.
#[tokio::test]
async fn a_cut_stream_is_retried_and_the_session_stays_usable() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let started = Instant::now();
    let reply = server.chat(&alice, &session, "mock:cut 1 tag-cut\nmock:reply one two three four five six").await;
    let took = started.elapsed();
    let outcomes: Vec<String> = requests_with(&mock, "tag-cut").iter().map(|r| r.outcome.clone()).collect();
    eprintln!("cut once: {took:?}, requests {outcomes:?}, text {}", reply.body["text"]);
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}\n{}", server.log());
    assert_eq!(outcomes, ["cut", "message"], "the CLI retries a cut stream once");
    assert_eq!(reply.body["is_error"], false, "{reply:?}");
    assert_eq!(reply.body["text"], "one two three four five six", "{reply:?}");
    assert!(took < Duration::from_secs(20), "the retry took {took:?}");

    // Streamed: what a client sees of the cut attempt and of the retry.
    let response =
        server.open_stream(&alice, &session, "mock:cut 1 tag-cut-sse\nmock:reply seven eight nine ten eleven").await;
    let events = tokio::time::timeout(Duration::from_secs(30), read_sse(response, |_| false))
        .await
        .unwrap_or_else(|_| panic!("the stream does not end\n{}", server.log()));
    let kinds = kinds(&events);
    eprintln!("cut once, streamed: frames {kinds:?}, deltas {:?}", streamed_text(&events));
    assert_eq!(kinds.last().map(String::as_str), Some("done"), "{kinds:?}");
    let result = events.iter().find(|e| e.kind() == "result").expect("a result frame");
    assert_eq!(result.data["text"], "seven eight nine ten eleven", "{result:?}");
    // The deltas of the cut attempt were already sent and are not taken
    // back (measured: "seven eight nine " + the whole retry); the retry's
    // deltas are all there.
    let deltas = streamed_text(&events);
    assert!(deltas.ends_with("seven eight nine ten eleven"), "the retry's text is missing: {deltas:?}");

    let after = server.chat(&alice, &session, "mock:reply next turn").await;
    assert_eq!(after.status, StatusCode::OK, "{after:?}\n{}", server.log());
    assert_eq!(after.body["is_error"], false, "{after:?}");
    assert_eq!(after.body["text"], "next turn", "{after:?}");
}

/// A client that sends its next message as soon as the stream said `done`
/// (or `error`) must not be told the session is busy: the final frame
/// means the turn is over. On PostgreSQL, whose writes after the turn take
/// longest, so that a turn still holding the session is seen.
#[tokio::test]
async fn the_next_message_is_accepted_as_soon_as_the_stream_says_done() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::backend(Backend::Postgres)).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    for round in 0..20 {
        let response = server.open_stream(&alice, &session, &format!("mock:reply streamed {round}")).await;
        let events = tokio::time::timeout(
            Duration::from_secs(30),
            read_sse(response, |e| e.kind() == "done" || e.kind() == "error"),
        )
        .await
        .unwrap_or_else(|_| panic!("the stream does not end\n{}", server.log()));
        assert_eq!(events.last().map(SseEvent::kind), Some("done"), "{:?}", kinds(&events));
        // At once, as a client that read `done` would.
        assert_replies(&server, &alice, &session, &format!("sync {round}"), "right after `done`").await;
    }
}

#[tokio::test]
async fn two_users_streaming_at_once_each_get_only_their_own_frames() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let bob = server.user_with_token("bob").await;
    let alice_session = server.session(&alice, json!({})).await;
    let bob_session = server.session(&bob, json!({})).await;
    let alice_text = "alpha apple apricot avocado almond anise arugula acorn";
    let bob_text = "bravo banana blueberry basil barley beet borage bean";
    let run = |token: String, session: String, text: &str| {
        let message = format!("mock:slow 200 8\nmock:reply {text}");
        let server = &server;
        async move {
            let response = server.open_stream(&token, &session, &message).await;
            let start = Instant::now();
            let events = read_sse(response, |_| false).await;
            (start, events)
        }
    };
    let ((alice_start, alice_events), (bob_start, bob_events)) = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join(
            run(alice.clone(), alice_session.clone(), alice_text),
            run(bob.clone(), bob_session.clone(), bob_text),
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("the streams did not end\n{}", server.log()));

    for (who, events, own, other, other_session) in [
        ("alice", &alice_events, alice_text, "bravo", &bob_session),
        ("bob", &bob_events, bob_text, "alpha", &alice_session),
    ] {
        assert_eq!(events.last().map(SseEvent::kind), Some("done"), "{who}: {:?}", kinds(events));
        assert_eq!(streamed_text(events), own, "{who}'s stream");
        let foreign: Vec<&SseEvent> = events
            .iter()
            .filter(|e| e.data.to_string().contains(other) || e.data.to_string().contains(other_session.as_str()))
            .collect();
        assert!(foreign.is_empty(), "{who} got the other user's frames: {foreign:?}");
    }
    // The turns really overlapped: each stream got text while the other was
    // still streaming.
    let deltas = |start: Instant, events: &[SseEvent]| -> Vec<Instant> {
        events.iter().filter(|e| e.kind() == "text_delta").map(|e| start + e.at).collect()
    };
    let (a, b) = (deltas(alice_start, &alice_events), deltas(bob_start, &bob_events));
    let (a_first, a_last) = (a[0], *a.last().expect("a delta"));
    let (b_first, b_last) = (b[0], *b.last().expect("a delta"));
    assert!(a_first < b_last && b_first < a_last, "the two turns ran one after the other, not at once");
}

/// Seconds since boot, as /proc/uptime tells (10 ms resolution).
fn uptime() -> f64 {
    let uptime = std::fs::read_to_string("/proc/uptime").expect("/proc/uptime");
    uptime.split_whitespace().next().and_then(|s| s.parse().ok()).expect("uptime")
}

/// When a process started, in seconds since boot.
fn started_at(pid: u32) -> Option<f64> {
    let ticks: f64 = stat_fields(pid)?.get(19)?.parse().ok()?;
    Some(ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

/// Creating a session starts its CLI (warm) without waiting for it: the
/// create answers at once, the CLI process starts around then, and a
/// message sent right after the create is served.
#[tokio::test]
async fn session_create_does_not_wait_for_the_cli_and_the_first_message_works_at_once() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;

    // The first session also starts alice's worker; the message follows at once.
    let started = Instant::now();
    let first = server.session(&alice, json!({})).await;
    let create_first = started.elapsed();
    let reply = server.chat(&alice, &first, "mock:reply first ok").await;
    let first_turn = started.elapsed();
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}\n{}", server.log());
    assert_eq!(reply.body["text"], "first ok", "{reply:?}");
    assert_eq!(reply.body["is_error"], false, "{reply:?}");

    // A second session (the worker runs): when did its CLI start, relative
    // to the create's answer?
    let started = Instant::now();
    let second = server.session(&alice, json!({})).await;
    let create_second = started.elapsed();
    let answered_at = uptime();
    let cli = wait_for_cli(&second, Duration::from_secs(5)).await;
    assert_eq!(cli.len(), 1, "the CLI starts on create, before any message: {cli:?}\n{}", server.log());
    let cli_started = started_at(cli[0]).expect("CLI start time");
    let cli_age_at_answer = answered_at - cli_started;
    let reply = server.chat(&alice, &second, "mock:reply second ok").await;
    let second_turn = started.elapsed();
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}\n{}", server.log());
    assert_eq!(reply.body["text"], "second ok", "{reply:?}");
    eprintln!(
        "create with the worker's start {create_first:?}, its first turn done {first_turn:?} after the create began; \
         create {create_second:?}, the CLI was {cli_age_at_answer:.2} s old when it answered, \
         turn done {second_turn:?} after the create began"
    );
    assert!(create_first < Duration::from_millis(1500), "create took {create_first:?}");
    assert!(create_second < Duration::from_millis(1500), "create took {create_second:?}");
    // A CLI needs ~0.5 s (cold) before it can answer: had the create waited
    // for it, the process would have been older than that.
    assert!(
        cli_age_at_answer < 0.25,
        "the CLI had started {cli_age_at_answer:.2} s before the create answered: the create waited for it"
    );
    assert!(
        create_first < first_turn / 2,
        "the create ({create_first:?}) took most of the first turn ({first_turn:?})"
    );
}

#[tokio::test]
async fn conversations_resume_after_a_server_restart_on_postgres() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::backend(Backend::Postgres)).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let first = server.chat(&alice, &session, "remember the word pineapple").await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}\n{}", server.log());
    assert_eq!(first.body["text"], "echo: remember the word pineapple", "{first:?}");
    let old_cli = session_process_pids(&session);

    let server = server.restart().await;
    assert!(old_cli.iter().all(|pid| !is_alive(*pid)), "the CLI {old_cli:?} outlived the server");
    let stored = server.get(&format!("/api/v1/sessions/{session}"), &alice).await;
    assert_eq!(stored.status, StatusCode::OK, "{stored:?}\n{}", server.log());
    assert_eq!(stored.body["message_count"], 1, "{stored:?}");

    let second = server.chat(&alice, &session, "mock:reply ok").await;
    assert_eq!(second.status, StatusCode::OK, "{second:?}\n{}", server.log());
    assert_eq!(second.body["text"], "ok", "{second:?}");
    assert_eq!(second.body["is_error"], false, "{second:?}");
    let last = mock.message_requests().pop().expect("request");
    assert!(last.messages.iter().any(|m| m.text.contains("pineapple")), "the resumed CLI lost the first turn");
    let cli = session_process_pids(&session);
    assert_eq!(cli.len(), 1, "{cli:?}");
    assert!(cmdline(cli[0]).windows(2).any(|w| w[0] == "--resume" && w[1] == session), "{:?}", cmdline(cli[0]));

    let stored = server.get(&format!("/api/v1/sessions/{session}"), &alice).await;
    assert_eq!(stored.body["message_count"], 2, "{stored:?}");
    let history = server.get(&format!("/api/v1/sessions/{session}/messages"), &alice).await;
    assert_eq!(history.status, StatusCode::OK, "{history:?}");
    let results: Vec<&str> = history.body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["kind"] == "result")
        .filter_map(|m| m["content"]["result"].as_str())
        .collect();
    assert_eq!(results, ["echo: remember the word pineapple", "ok"], "{history:?}");
}

#[tokio::test]
async fn deleting_a_session_kills_its_cli() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let other = server.session(&alice, json!({})).await;
    let reply = server.chat(&alice, &session, "mock:reply hi").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}\n{}", server.log());
    let cli = session_process_pids(&session);
    assert_eq!(cli.len(), 1, "one CLI process for the session: {cli:?}");
    let others = wait_for_cli(&other, Duration::from_secs(5)).await;
    assert_eq!(others.len(), 1, "{others:?}");

    let started = Instant::now();
    let deleted = server.delete(&format!("/api/v1/sessions/{session}"), &alice).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{deleted:?}");
    while is_alive(cli[0]) && started.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    eprintln!("CLI gone {took:?} after DELETE");
    assert!(!is_alive(cli[0]), "the CLI {} still runs {took:?} after the delete\n{}", cli[0], server.log());
    // The user's other session keeps its CLI.
    assert!(is_alive(others[0]), "the other session's CLI died too");
    let still = server.chat(&alice, &other, "mock:reply still here").await;
    assert_eq!(still.body["text"], "still here", "{still:?}");
}

#[tokio::test]
async fn a_session_deleted_during_its_turn_ends_the_turn_without_a_store_failure() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let turn =
        server.spawn_chat(&alice, json!({"session_id": session, "message": "mock:slow 300 20\nmock:reply cut short"}));
    assert!(wait_for_model_request(&mock, "cut short", Duration::from_secs(30)).await, "{}", server.log());
    let deleted = server.delete(&format!("/api/v1/sessions/{session}"), &alice).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{deleted:?}");
    let reply = turn.await.expect("turn");
    assert!(reply.status.is_client_error() || reply.status.is_server_error(), "{reply:?}");
    // The turn's history had nowhere to go: that is no failure of the store.
    let metrics = Reply::from(server.request(reqwest::Method::GET, "/metrics", None).send().await).await;
    assert_eq!(metrics.status, StatusCode::OK, "{metrics:?}");
    let errors = metrics.text.lines().find_map(|l| l.strip_prefix("cah_store_errors_total "));
    assert_eq!(errors, Some("0"), "{}\n{}", metrics.text, server.log());
    assert!(server.log().contains("turn not stored"), "{}", server.log());
}

/// A stand-in CLI that breaks the stream-json protocol on demand: a user
/// message containing `not-json` gets a line that is not JSON, `huge` a
/// 40 MB line that is not JSON either (it crosses the worker in pieces and
/// arrives whole, under the default cap); anything else a result.
const BROKEN_CLI: &str = r#"#!/bin/sh
while IFS= read -r line; do
  case "$line" in
    *'"type":"user"'*)
      case "$line" in
        *not-json*) echo 'this is not json' ;;
        *huge*) head -c 40000000 /dev/zero | tr '\0' 'x'; echo ;;
        *) echo '{"type":"result","subtype":"success","is_error":false,"result":"fine","usage":{}}' ;;
      esac ;;
  esac
done
"#;

#[tokio::test]
async fn a_cli_that_breaks_the_protocol_ends_its_turn_not_the_worker_or_the_server() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("dir");
    let cli = dir.path().join("broken-cli");
    std::fs::write(&cli, BROKEN_CLI).expect("script");
    // The user's uid (privileged mode) must reach and run it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let server =
        TestServer::start_with(ServerConfig::default().env("CLAUDE_AGENT_CLI_PATH", cli.display().to_string())).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    assert_replies_fine(&server, &alice, &session).await;
    for (message, expected) in [("not-json please", "not JSON"), ("huge please", "not JSON")] {
        let broken = server.chat(&alice, &session, message).await;
        broken.assert_error(StatusCode::BAD_GATEWAY, "cli_failed");
        assert!(broken.body["detail"].as_str().is_some_and(|d| d.contains(expected)), "{broken:?}");
        // The session goes on with a new CLI; the worker and the server live.
        assert_replies_fine(&server, &alice, &session).await;
    }
    assert_eq!(server.get("/health", &alice).await.status, StatusCode::OK);
    let log = server.log();
    assert!(!log.contains("bad frame from worker") && !log.contains("worker exited"), "{log}");
}

/// A reply far longer than a worker frame (the CLI's `assistant` and
/// `result` lines carry all of it) crosses the worker in pieces and arrives
/// whole, over sync chat and over SSE.
#[tokio::test]
async fn a_40_mb_reply_arrives_whole_over_sync_chat_and_sse() {
    const REPLY_BYTES: usize = 40_000_000;
    let mock = MockModel::start().await.expect("mock");
    // A session buffer that holds the whole turn's frames (some 130 MB: the
    // deltas twice, the result once): a live reader slower than the CLI
    // (this test's, unoptimised) would otherwise get a `gap` for frames that
    // went out of the default 4 MiB one.
    let config = ServerConfig::default().env("CLAUDE_AGENT_API__STREAM_BUFFER_BYTES", (256 << 20).to_string());
    let server = server_with_cli(&mock, config).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let message = format!("mock:reply-bytes {REPLY_BYTES}");

    let started = Instant::now();
    let reply = server.chat(&alice, &session, &message).await;
    let took = started.elapsed();
    eprintln!("a {REPLY_BYTES}-byte reply over POST /api/v1/chat took {took:?}");
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}
{}",
        &reply.text[..reply.text.len().min(2000)],
        server.log()
    );
    assert_eq!(reply.body["text"].as_str().map(str::len), Some(REPLY_BYTES));

    let started = Instant::now();
    let stream = server.open_stream(&alice, &session, &message).await;
    let events = read_sse(stream, |e| matches!(e.kind(), "done" | "error")).await;
    eprintln!("the same over SSE took {:?}", started.elapsed());
    let kinds: Vec<&str> = events.iter().map(SseEvent::kind).filter(|k| *k != "text_delta").collect();
    assert_eq!(kinds.last(), Some(&"done"), "{kinds:?}\n{}", server.log());
    assert!(kinds.contains(&"result") && !kinds.contains(&"gap"), "{kinds:?}");
    assert_eq!(streamed_text(&events).len(), REPLY_BYTES);
}

/// A line longer than `sandbox.max_output_line_mb` ends its turn with 502
/// naming the limit; the server and the user's worker go on.
#[tokio::test]
async fn a_line_over_the_configured_cap_ends_the_turn_with_502_naming_the_limit() {
    let mock = MockModel::start().await.expect("mock");
    let config = ServerConfig::default().yaml("sandbox:\n  max_output_line_mb: 1\n");
    let server = server_with_cli(&mock, config).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let reply = server.chat(&alice, &session, "mock:reply-bytes 3000000").await;
    reply.assert_error(StatusCode::BAD_GATEWAY, "cli_failed");
    let detail = reply.body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("longer than 1 MiB") && detail.contains("sandbox.max_output_line_mb"),
        "{detail}\n{}",
        server.log()
    );
    let other = server.session(&alice, json!({})).await;
    assert_replies(&server, &alice, &other, "small again", "after the dropped line").await;
    let log = server.log();
    assert!(!log.contains("bad frame from worker") && !log.contains("worker exited"), "{log}");
}

async fn assert_replies_fine(server: &TestServer, token: &str, session: &str) {
    let reply = server.chat(token, session, "hello").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}\n{}", server.log());
    assert_eq!(reply.body["text"], "fine");
}

/// `kill -9` of the control plane mid-turn: the client's stream closes (no
/// hang), nothing of the old run survives, and after a restart the session
/// resumes with its history.
#[tokio::test]
async fn a_control_plane_killed_mid_turn_leaves_nothing_behind_and_the_session_resumes() {
    let mock = MockModel::start().await.expect("mock");
    let server = server_with_cli(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    assert_replies(&server, &alice, &session, "remember the word quince", "first turn").await;
    let message = "mock:slow 300 30\nmock:reply a slow answer cut short by a crash";
    let stream = server.open_stream(&alice, &session, message).await;
    let reader = tokio::spawn(read_sse(stream, |_| false));
    assert!(wait_for_model_request(&mock, "cut short by a crash", Duration::from_secs(30)).await, "{}", server.log());
    let old_processes = session_process_pids(&session);
    assert!(!old_processes.is_empty());

    let pid = rustix::process::Pid::from_raw(server.pid as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill -9");
    let events = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the stream closes when the server dies")
        .expect("reader");
    assert!(events.iter().all(|e| e.kind() != "done"), "{events:?}");
    // PDEATHSIG takes the workers and their CLIs down with the server.
    let deadline = Instant::now() + Duration::from_secs(5);
    while old_processes.iter().any(|p| {
        std::path::Path::new(&format!("/proc/{p}/cmdline")).exists()
            && !std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default().is_empty()
    }) {
        assert!(Instant::now() < deadline, "processes of the killed server survive: {old_processes:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let server = server.restart().await;
    let reply = server.chat(&alice, &session, "mock:reply back after the crash").await;
    assert_eq!(reply.body["text"], "back after the crash", "{reply:?}\n{}", server.log());
    let last = mock.message_requests().pop().expect("request");
    assert!(last.messages.iter().any(|m| m.text.contains("quince")), "the conversation was lost");
    let history = server.get(&format!("/api/v1/sessions/{session}/messages"), &alice).await;
    let texts = history.body["messages"].to_string();
    assert!(texts.contains("remember the word quince") && texts.contains("back after the crash"), "{texts}");
}
