//! Streams that outlive their connection, history, and the lifecycle of
//! warm CLIs: the real server, the real Claude CLI in the user's confined
//! worker, the mock of the remote model.

use std::time::{Duration, Instant};

use integration_tests::{
    Reply, ServerConfig, SseEvent, TestServer, read_sse, session_process_pids, wait_for_model_request,
};
use mock_model::{MockModel, MockServer};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Opens `GET /api/v1/sessions/{id}/stream`, with `Last-Event-ID` if given.
async fn reconnect(server: &TestServer, token: &str, session: &str, last_event_id: Option<&str>) -> reqwest::Response {
    let mut request = server.request(Method::GET, &format!("/api/v1/sessions/{session}/stream"), Some(token));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    request.send().await.expect("reconnect")
}

fn text_of(events: &[SseEvent]) -> String {
    events.iter().filter(|e| e.kind() == "text_delta").filter_map(|e| e.data["text"].as_str()).collect()
}

/// Waits until `pids` are all gone (zombies count as gone).
async fn wait_gone(pids: &[u32], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if pids.iter().all(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |stat| stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
        }) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn start(mock: &MockServer, config: ServerConfig) -> TestServer {
    TestServer::start_with(config.with_cli(mock)).await
}

const SLOW: &str = "mock:slow 150 12\nmock:reply alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu";
const SLOW_TEXT: &str = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu";

#[tokio::test]
async fn a_reconnect_with_last_event_id_loses_nothing_and_duplicates_nothing() {
    let mock = MockModel::start().await.expect("mock");
    let server = start(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;

    // The client drops its connection after the third text delta.
    let mut deltas = 0;
    let first = read_sse(server.open_stream(&alice, &session, SLOW).await, |e| {
        deltas += usize::from(e.kind() == "text_delta");
        deltas == 3
    })
    .await;
    let last_seen = first.last().expect("frames").id.clone().expect("id");
    assert!(first.iter().all(|e| e.kind() != "done"), "the turn ended before the disconnect: {first:?}");

    let response = reconnect(&server, &alice, &session, Some(&last_seen)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let rest = read_sse(response, |_| false).await;
    assert_eq!(rest.last().map(SseEvent::kind), Some("done"), "{rest:?}");

    // Together: ids consecutive from the first frame to `done`, the whole text once.
    let all: Vec<&SseEvent> = first.iter().chain(&rest).collect();
    let base = all[0].id_number();
    for (i, event) in all.iter().enumerate() {
        assert_eq!(event.id_number(), base + i as u64, "lost or repeated frames: {all:?}");
    }
    let text: String =
        all.iter().filter(|e| e.kind() == "text_delta").filter_map(|e| e.data["text"].as_str()).collect();
    assert_eq!(text, SLOW_TEXT);

    // The turn is over and the client has everything: a reconnect ends at once.
    let caught_up = reconnect(&server, &alice, &session, rest.last().and_then(|e| e.id.as_deref())).await;
    assert!(read_sse(caught_up, |_| false).await.is_empty());
    // From before the turn: the whole turn again, as it was.
    let replay = read_sse(reconnect(&server, &alice, &session, Some(&(base - 1).to_string())).await, |_| false).await;
    assert_eq!(replay.len(), all.len());
    assert_eq!(text_of(&replay), SLOW_TEXT);
}

#[tokio::test]
async fn a_watcher_without_last_event_id_sees_a_running_sync_turn_from_its_start() {
    let mock = MockModel::start().await.expect("mock");
    let server = start(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let turn = server.spawn_chat(&alice, json!({"session_id": session, "message": SLOW}));
    // Let the turn start streaming, then attach.
    let reached = wait_for_model_request(&mock, SLOW_TEXT, Duration::from_secs(30)).await;
    assert!(reached, "the turn never reached the model\n{}", server.log());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let watched = read_sse(reconnect(&server, &alice, &session, None).await, |_| false).await;
    let reply = turn.await.expect("turn");
    assert_eq!(reply.body["text"], SLOW_TEXT, "{reply:?}");
    assert_eq!(text_of(&watched), SLOW_TEXT, "the watcher missed the start: {watched:?}");
    assert_eq!(watched.last().map(SseEvent::kind), Some("done"));
    // Nobody else's session: another user gets 404, a bad id 422.
    let bob = server.user_with_token("bob").await;
    let foreign = Reply::from(Ok(reconnect(&server, &bob, &session, None).await)).await;
    foreign.assert_error(StatusCode::NOT_FOUND, "not_found");
    let bad = Reply::from(Ok(reconnect(&server, &alice, &session, Some("yesterday")).await)).await;
    bad.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
}

#[tokio::test]
async fn frames_dropped_from_a_small_buffer_are_reported_as_a_gap() {
    let mock = MockModel::start().await.expect("mock");
    let server = start(&mock, ServerConfig::default().env("CLAUDE_AGENT_API__STREAM_BUFFER_EVENTS", "5")).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let all = read_sse(server.open_stream(&alice, &session, SLOW).await, |_| false).await;
    assert!(all.len() > 10, "{all:?}");
    let first = all[0].id_number();
    let replay = read_sse(reconnect(&server, &alice, &session, Some(&first.to_string())).await, |_| false).await;
    assert_eq!(replay[0].kind(), "gap", "{replay:?}");
    let resumed_at = replay[0].data["resumed_at"].as_u64().expect("resumed_at");
    assert_eq!(replay.len(), 6, "the gap and the 5 buffered frames: {replay:?}");
    assert_eq!(replay[1].id_number(), resumed_at);
    assert_eq!(replay.last().map(SseEvent::kind), Some("done"));
    // The same frames as the live stream sent.
    for event in &replay[1..] {
        let live = all.iter().find(|e| e.id == event.id).expect("same id in the live stream");
        assert_eq!(live.data, event.data);
    }
}

#[tokio::test]
async fn a_reader_that_keeps_up_gets_every_frame_of_a_reply_far_bigger_than_the_buffer() {
    // 5 frames kept for reconnects; a 12 MB reply is about 190 deltas of
    // 64 KiB, which the CLI writes faster than one client reads them. The
    // frames a connected reader has not read yet stay until it has.
    const REPLY_BYTES: usize = 12_000_000;
    let mock = MockModel::start().await.expect("mock");
    let server = start(&mock, ServerConfig::default().env("CLAUDE_AGENT_API__STREAM_BUFFER_EVENTS", "5")).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let message = format!("mock:reply-bytes {REPLY_BYTES}");
    let events = read_sse(server.open_stream(&alice, &session, &message).await, |_| false).await;
    let kinds: Vec<&str> = events.iter().map(SseEvent::kind).filter(|k| *k != "text_delta").collect();
    assert_eq!(kinds, ["result", "done"], "a frame was lost or the turn failed");
    let ids: Vec<u64> = events.iter().map(SseEvent::id_number).collect();
    assert!(ids.windows(2).all(|pair| pair[1] == pair[0] + 1), "in order, without holes");
    assert_eq!(text_of(&events).len(), REPLY_BYTES);
    assert_eq!(events[events.len() - 2].data["text"].as_str().map(str::len), Some(REPLY_BYTES));
}

#[tokio::test]
async fn history_lists_each_turn_in_order_with_pages() {
    let mock = MockModel::start().await.expect("mock");
    let server = start(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    assert_eq!(server.chat(&alice, &session, "first question").await.status, StatusCode::OK);
    let tool = r#"mock:tool Bash {"command": "echo from-the-tool"}"#;
    assert_eq!(server.chat(&alice, &session, tool).await.status, StatusCode::OK);

    let path = format!("/api/v1/sessions/{session}/messages");
    let page = server.get(&path, &alice).await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    let messages = page.body["messages"].as_array().expect("messages").clone();
    let kinds: Vec<&str> = messages.iter().filter_map(|m| m["kind"].as_str()).collect();
    // Turn 1: user, assistant, result. Turn 2: user, assistant (tool_use),
    // user (tool_result), assistant, result.
    assert_eq!(
        kinds,
        ["user", "assistant", "result", "user", "assistant", "user", "assistant", "result"],
        "{messages:#?}"
    );
    let seqs: Vec<i64> = messages.iter().filter_map(|m| m["seq"].as_i64()).collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
    assert_eq!(messages[0]["content"]["message"]["content"], "first question");
    assert_eq!(messages[2]["content"]["result"], "echo: first question");
    assert!(messages[5].to_string().contains("from-the-tool"), "{}", messages[5]);
    assert!(page.body["next_after"].is_null());

    // Pages of 3 walk the same list.
    let mut walked: Vec<Value> = Vec::new();
    let mut after = 0;
    loop {
        let page = server.get(&format!("{path}?limit=3&after={after}"), &alice).await;
        walked.extend(page.body["messages"].as_array().expect("page").iter().cloned());
        match page.body["next_after"].as_i64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(walked, messages);

    let bob = server.user_with_token("bob").await;
    server.get(&path, &bob).await.assert_error(StatusCode::NOT_FOUND, "not_found");
    server
        .get(&format!("{path}?limit=0"), &alice)
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    assert_eq!(server.delete(&format!("/api/v1/sessions/{session}"), &alice).await.status, StatusCode::NO_CONTENT);
    server.get(&path, &alice).await.assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn an_idle_cli_is_stopped_and_the_next_message_resumes_it() {
    let mock = MockModel::start().await.expect("mock");
    let server = start(&mock, ServerConfig::default().env("CLAUDE_AGENT_IDLE_SESSION_TIMEOUT", "2")).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    assert_eq!(server.chat(&alice, &session, "remember the word walnut").await.status, StatusCode::OK);
    let pids = session_process_pids(&session);
    assert!(!pids.is_empty(), "no CLI found for the session");
    assert!(wait_gone(&pids, Duration::from_secs(10)).await, "the idle CLI {pids:?} still runs\n{}", server.log());
    assert!(server.log().contains("stopping an idle CLI"), "{}", server.log());
    // The session is still open; the next message resumes the conversation.
    let session_state = server.get(&format!("/api/v1/sessions/{session}"), &alice).await;
    assert_eq!(session_state.body["status"], "active");
    let next = server.chat(&alice, &session, "mock:reply resumed").await;
    assert_eq!(next.body["text"], "resumed", "{next:?}");
    let last = mock.message_requests().pop().expect("request");
    assert!(last.messages.iter().any(|m| m.text.contains("walnut")), "the resumed CLI lost the first turn");
}

#[tokio::test]
async fn the_least_recently_used_warm_cli_makes_room_for_a_new_one() {
    let mock = MockModel::start().await.expect("mock");
    let server = start(&mock, ServerConfig::default().env("CLAUDE_AGENT_API__MAX_WARM_SESSIONS_PER_USER", "2")).await;
    let alice = server.user_with_token("alice").await;
    let first = server.session(&alice, json!({})).await;
    assert_eq!(server.chat(&alice, &first, "remember the word hazel").await.status, StatusCode::OK);
    let second = server.session(&alice, json!({})).await;
    assert_eq!(server.chat(&alice, &second, "hello").await.status, StatusCode::OK);
    // Use the first again: the second is now the least recently used.
    assert_eq!(server.chat(&alice, &first, "hello again").await.status, StatusCode::OK);
    let second_pids = session_process_pids(&second);
    let first_pids = session_process_pids(&first);
    assert!(!second_pids.is_empty() && !first_pids.is_empty());

    let third = server.session(&alice, json!({})).await;
    assert!(wait_gone(&second_pids, Duration::from_secs(5)).await, "the LRU CLI was not stopped\n{}", server.log());
    assert_eq!(session_process_pids(&first), first_pids, "the recently used CLI was stopped");
    assert_eq!(server.chat(&alice, &third, "hi").await.status, StatusCode::OK);

    // The evicted session still works, and remembers.
    let resumed = server.chat(&alice, &second, "mock:reply back").await;
    assert_eq!(resumed.body["text"], "back", "{resumed:?}");
    // Another user has their own cap.
    let bob = server.user_with_token("bob").await;
    let bobs = server.session(&bob, json!({})).await;
    assert_eq!(server.chat(&bob, &bobs, "hi").await.status, StatusCode::OK);
}

/// A server with one chat slot, held by a slow turn of alice's that has
/// reached the model, and a second session of alice's.
struct SlotHeld {
    mock: MockServer,
    server: TestServer,
    alice: String,
    other: String,
    slow: tokio::task::JoinHandle<Reply>,
}

/// [`SlotHeld`], the slow turn answering `reply` in 500 ms chunks.
async fn one_slot_held(chunks: u32, reply: &str) -> SlotHeld {
    let mock = MockModel::start().await.expect("mock");
    let server = start(&mock, ServerConfig::default().env("CLAUDE_AGENT_MAX_CONCURRENT", "1")).await;
    let alice = server.user_with_token("alice").await;
    let busy_session = server.session(&alice, json!({})).await;
    let other = server.session(&alice, json!({})).await;
    let message = format!("mock:slow 500 {chunks}\nmock:reply {reply}");
    let slow = server.spawn_chat(&alice, json!({"session_id": busy_session, "message": message}));
    let reached = wait_for_model_request(&mock, reply, Duration::from_secs(30)).await;
    assert!(reached, "the slow turn never reached the model\n{}", server.log());
    SlotHeld { mock, server, alice, other, slow }
}

#[tokio::test]
async fn turns_beyond_max_concurrent_requests_wait_for_a_slot() {
    // The mock must live as long as the server's CLIs talk to it.
    let SlotHeld { mock: _mock, server, alice, other, slow } = one_slot_held(12, "one slot only here").await;
    // A turn that cannot get the slot within its timeout: 503.
    let refused =
        server.post("/api/v1/chat", &alice, json!({"session_id": other, "message": "hi", "timeout": 1})).await;
    refused.assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(refused.headers.contains_key("retry-after"));
    // One with time to wait runs once the slot is free.
    let waited = server.chat(&alice, &other, "mock:reply after the wait").await;
    assert_eq!(waited.body["text"], "after the wait", "{waited:?}");
    assert_eq!(slow.await.expect("slow").body["text"], "one slot only here");
}

#[tokio::test]
async fn a_message_waiting_for_a_slot_does_not_restart_the_cli_of_a_session_deleted_meanwhile() {
    let SlotHeld { mock, server, alice, other: doomed, slow } = one_slot_held(10, "holding the slot").await;
    // This message passes its session check, then waits for the only slot.
    let waiting = server.spawn_chat(
        &alice,
        json!({"session_id": doomed, "message": "mock:reply ran on a deleted session", "timeout": 60}),
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!slow.is_finished(), "the slow turn ended before the session was deleted: the test proves nothing");
    assert_eq!(server.delete(&format!("/api/v1/sessions/{doomed}"), &alice).await.status, StatusCode::NO_CONTENT);
    // Had the message not passed its session check before the DELETE, it
    // would have its 404 by now: still waiting means it did.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the message did not wait for the slot: the test proves nothing");
    assert!(wait_until_gone(&doomed).await, "DELETE left its CLI");
    assert_eq!(slow.await.expect("slow").body["text"], "holding the slot");
    // Once the slot is free, the waiting message finds its session gone:
    // the CLI it started is stopped again, its message never sent.
    let reply = waiting.await.expect("waiting");
    reply.assert_error(StatusCode::NOT_FOUND, "not_found");
    assert!(wait_until_gone(&doomed).await, "a CLI runs for the deleted session\n{}", server.log());
    let asked =
        mock.message_requests().iter().any(|r| r.last_user_text.as_deref().is_some_and(|t| t.contains("deleted")));
    assert!(!asked, "the deleted session's message reached the model");
}

/// Waits (up to 10 s) until no process runs for the session.
async fn wait_until_gone(session_id: &str) -> bool {
    for _ in 0..100 {
        if session_process_pids(session_id).is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn a_queued_message_waits_for_the_running_turn_instead_of_429() {
    let mock = MockModel::start().await.expect("mock");
    let server = start(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let send = |message: &str, queue: bool| {
        let (client, url, token, session) =
            (server.client.clone(), server.url("/api/v1/chat"), alice.clone(), session.clone());
        let body = json!({"session_id": session, "message": message, "queue": queue, "timeout": 60});
        async move { Reply::from(client.post(url).bearer_auth(token).json(&body).send().await).await }
    };
    let first = tokio::spawn(send("mock:slow 100 10\nmock:reply first of two in order", false));
    assert!(wait_for_model_request(&mock, "first of two", Duration::from_secs(30)).await, "{}", server.log());
    // Not queued: refused. Queued: answered after the first.
    send("hello", false).await.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let second = send("mock:reply second", true).await;
    let first = first.await.expect("first");
    assert_eq!(first.body["text"], "first of two in order", "{first:?}");
    assert_eq!(second.body["text"], "second", "{second:?}");
}

#[tokio::test]
async fn sigterm_lets_a_running_turn_finish_and_ends_every_stream() {
    let mock = MockModel::start().await.expect("mock");
    let mut server = start(&mock, ServerConfig::default().env("CLAUDE_AGENT_API__SHUTDOWN_GRACE", "20")).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let idle = server.session(&alice, json!({})).await;
    // A stream that would stay open forever, and a turn that takes ~1.8 s.
    let follower = reconnect_follow(&server, &alice, &idle).await;
    let follower = tokio::spawn(read_sse(follower, |_| false));
    let turn = server.open_stream(&alice, &session, SLOW).await;
    let turn = tokio::spawn(read_sse(turn, |_| false));
    assert!(wait_for_model_request(&mock, SLOW_TEXT, Duration::from_secs(30)).await, "{}", server.log());

    let started = Instant::now();
    let status = server.terminate().await;
    assert!(status.success(), "{status:?}\n{}", server.log());
    let events = turn.await.expect("turn stream");
    assert_eq!(events.last().map(SseEvent::kind), Some("done"), "the running turn was cut: {events:?}");
    assert_eq!(text_of(&events), SLOW_TEXT);
    assert!(follower.await.expect("follower").is_empty());
    assert!(started.elapsed() < Duration::from_secs(15), "shutdown took {:?}", started.elapsed());
    // Nothing of the sessions outlives the server.
    assert!(session_process_pids(&session).is_empty() && session_process_pids(&idle).is_empty());
}

/// `GET /api/v1/sessions/{id}/stream?follow=true`.
async fn reconnect_follow(server: &TestServer, token: &str, session: &str) -> reqwest::Response {
    let response = server
        .request(Method::GET, &format!("/api/v1/sessions/{session}/stream?follow=true"), Some(token))
        .send()
        .await
        .expect("follow");
    assert_eq!(response.status(), StatusCode::OK);
    response
}

/// A raw HTTP/1.1 client on a socket with a tiny receive buffer, so the
/// server cannot push much ahead of what it reads: the slowest consumer.
async fn raw_stream(server: &TestServer, token: &str, path: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let address: std::net::SocketAddr = server.base_url.trim_start_matches("http://").parse().expect("server address");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(2048).expect("SO_RCVBUF");
    let mut stream = socket.connect(address).await.expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\n\
         Accept: text/event-stream\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("request");
    stream
}

/// The SSE events of a whole raw HTTP/1.1 response (chunked body).
fn events_of_raw_response(raw: &[u8]) -> Vec<SseEvent> {
    let text = String::from_utf8_lossy(raw);
    let (head, mut body) = text.split_once("\r\n\r\n").expect("response head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut decoded = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if size == 0 {
            break;
        }
        decoded.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").expect("chunk end");
    }
    decoded.split("\n\n").filter_map(|block| SseEvent::parse(block, Duration::ZERO)).collect()
}

async fn metric(server: &TestServer, name: &str) -> f64 {
    let metrics = Reply::from(server.request(Method::GET, "/metrics", None).send().await).await;
    let line = metrics.text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).map(str::to_owned);
    line.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} missing:\n{}", metrics.text))
}

async fn wait_metric(server: &TestServer, name: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(server, name).await != value {
        assert!(Instant::now() < deadline, "{name} never became {value}\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_consumer_reading_one_byte_a_second_is_cut_and_resumes_with_last_event_id() {
    use tokio::io::AsyncReadExt;
    const BUFFER: usize = 40;
    let mock = MockModel::start().await.expect("mock");
    let config = ServerConfig::default().env("CLAUDE_AGENT_API__STREAM_BUFFER_EVENTS", BUFFER.to_string());
    let server = start(&mock, config).await;
    let alice = server.user_with_token("alice").await;
    let bob = server.user_with_token("bob").await;
    let session = server.session(&alice, json!({})).await;
    let other = server.session(&bob, json!({})).await;

    let mut slow = raw_stream(&server, &alice, &format!("/api/v1/sessions/{session}/stream?follow=true")).await;
    wait_metric(&server, "cah_sse_streams_open", 1.0).await;
    // About 24 MB of frames (12 MB of text in 64 KiB deltas, each frame
    // carrying its delta twice), far more than the buffer (4 MiB) and the
    // sockets (loopback send buffers grow up to 4 MiB) hold.
    const REPLY_BYTES: usize = 12_000_000;
    let message = format!("mock:reply-bytes {REPLY_BYTES}");
    let turn = tokio::spawn({
        let (server_url, client, alice, session) =
            (server.base_url.clone(), server.client.clone(), alice.clone(), session.clone());
        async move {
            let body = json!({"session_id": session, "message": message, "timeout": 120});
            let response = client.post(format!("{server_url}/api/v1/chat")).bearer_auth(alice).json(&body).send();
            Reply::from(response.await).await
        }
    });
    // One byte a second while the turn runs; another user's session works
    // normally meanwhile.
    let mut received = Vec::new();
    let mut byte = [0u8; 1];
    while !turn.is_finished() {
        let started = Instant::now();
        let reply = server.chat(&bob, &other, "hello while someone reads slowly").await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert!(started.elapsed() < Duration::from_secs(20), "another session was slowed down");
        if slow.read(&mut byte).await.expect("read") == 1 {
            received.push(byte[0]);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Still one byte a second for a while: far longer than the server's
    // grace for a reader that does not catch up.
    for _ in 0..3 {
        if slow.read(&mut byte).await.expect("read") == 1 {
            received.push(byte[0]);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let result = turn.await.expect("turn");
    assert_eq!(result.status, StatusCode::OK, "{result:?}");
    let text = result.body["text"].as_str().unwrap_or_default();
    assert_eq!(text.len(), REPLY_BYTES, "the turn itself is complete");

    // The slow reader gets what was on its way, then a final `lagged` frame.
    let read_rest = slow.read_to_end(&mut received);
    tokio::time::timeout(Duration::from_secs(30), read_rest).await.expect("the cut stream ends").expect("read");
    let events = events_of_raw_response(&received);
    let (last, delivered) = events.split_last().expect("events");
    assert_eq!(last.kind(), "lagged", "{last:?}");
    assert!(!delivered.iter().any(|e| e.kind() == "done"), "the lagging reader did not get to the end");
    let ids: Vec<u64> = delivered.iter().map(SseEvent::id_number).collect();
    assert!(ids.windows(2).all(|pair| pair[1] == pair[0] + 1), "in order, without holes: {ids:?}");
    let last_delivered = *ids.last().expect("some frames were delivered");
    assert_eq!(last.data["last_event_id"], last_delivered, "{last:?}");
    assert!(last.data["error"].as_str().is_some_and(|e| e.contains("Last-Event-ID")), "{last:?}");
    assert_eq!(metric(&server, "cah_sse_streams_lagged_total").await, 1.0);
    wait_metric(&server, "cah_sse_streams_open", 0.0).await;

    // Reconnecting with that id: a gap, then the rest up to `done`.
    let resumed =
        read_sse(reconnect(&server, &alice, &session, Some(&last_delivered.to_string())).await, |_| false).await;
    assert_eq!(resumed[0].kind(), "gap", "{:?}", &resumed[..2]);
    assert_eq!(resumed[1].id_number(), resumed[0].data["resumed_at"].as_u64().expect("resumed_at"));
    assert!(resumed.len() <= BUFFER + 1, "only the buffer is replayed: {}", resumed.len());
    assert_eq!(resumed.last().map(SseEvent::kind), Some("done"));
}

#[tokio::test]
async fn a_consumer_that_vanishes_mid_turn_is_let_go() {
    use tokio::io::AsyncReadExt;
    let mock = MockModel::start().await.expect("mock");
    let server = start(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    let mut stream = raw_stream(&server, &alice, &format!("/api/v1/sessions/{session}/stream?follow=true")).await;
    wait_metric(&server, "cah_sse_streams_open", 1.0).await;
    let turn = tokio::spawn({
        let (url, client, alice, session) =
            (server.base_url.clone(), server.client.clone(), alice.clone(), session.clone());
        async move {
            let body = json!({"session_id": session, "message": "mock:slow 100 30\nmock:reply a reply in thirty parts, told slowly", "timeout": 120});
            Reply::from(client.post(format!("{url}/api/v1/chat")).bearer_auth(alice).json(&body).send().await).await
        }
    });
    let mut first = [0u8; 256];
    assert!(stream.read(&mut first).await.expect("read") > 0);
    drop(stream);
    let reply = turn.await.expect("turn");
    assert_eq!(reply.status, StatusCode::OK, "the turn does not depend on its watchers: {reply:?}");
    // The server lets go of the dead connection at its next write.
    wait_metric(&server, "cah_sse_streams_open", 0.0).await;
    assert_eq!(server.chat(&alice, &session, "still there?").await.status, StatusCode::OK);
}

#[tokio::test]
async fn deleting_a_user_stops_its_warm_clis_and_frees_their_sessions() {
    let mock = MockModel::start().await.expect("mock");
    let server = start(&mock, ServerConfig::default()).await;
    let alice = server.user_with_token("alice").await;
    let session = server.session(&alice, json!({})).await;
    assert_eq!(server.chat(&alice, &session, "hello before the delete").await.status, StatusCode::OK);
    let pids = session_process_pids(&session);
    assert!(!pids.is_empty(), "the session's CLI is warm");
    let follower = tokio::spawn(read_sse(reconnect_follow(&server, &alice, &session).await, |_| false));

    let deleted = server.delete("/api/v1/users/alice", &server.admin_token).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{deleted:?}");
    assert!(wait_gone(&pids, Duration::from_secs(15)).await, "alice's CLI outlived her\n{}", server.log());
    // A reader of her session's events is let go.
    tokio::time::timeout(Duration::from_secs(15), follower).await.expect("the follower ends").expect("reader");
    server.get("/api/v1/me", &alice).await.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
}
