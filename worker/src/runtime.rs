//! The confined worker's event loop: one current-thread runtime (a single
//! thread, so PDEATHSIG of every CLI refers to a thread that lives as long
//! as the worker) serving the control socket.
//!
//! Each session's CLI runs in its own process group, with PDEATHSIG, an
//! environment built from scratch and piped stdio. Its output lines go back
//! as `Output` frames numbered per session (a long line in pieces, never
//! held whole); `Exited` carries the next number so the control plane can
//! tell whether it saw every line.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use shared::Text;
use shared::protocol::{
    FromWorker, MAX_FRAME_LEN, OUTPUT_PIECE_LEN, OutputStream, ProcessSpec, ToWorker, WorkerConfig,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

/// Bytes of output lines that may wait to be written to the control socket:
/// beyond, relaying waits (and the CLI blocks on its full pipe) instead of
/// the worker's memory growing with a CLI that writes faster than the
/// control plane reads.
const OUTPUT_BUDGET: usize = 4 * OUTPUT_PIECE_LEN;

/// How long output is still relayed after the CLI exited.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// The frames to the control plane, in order; output pieces hold a share
/// of [`OUTPUT_BUDGET`] until they are written.
#[derive(Clone)]
struct Outbox {
    frames: mpsc::UnboundedSender<(FromWorker, Option<OwnedSemaphorePermit>)>,
    output_budget: Arc<Semaphore>,
}

impl Outbox {
    fn new() -> (Self, mpsc::UnboundedReceiver<(FromWorker, Option<OwnedSemaphorePermit>)>) {
        let (frames, outgoing) = mpsc::unbounded_channel();
        (Self { frames, output_budget: Arc::new(Semaphore::new(OUTPUT_BUDGET)) }, outgoing)
    }

    fn send(&self, message: FromWorker) -> bool {
        self.frames.send((message, None)).is_ok()
    }

    /// Sends an `Output` frame once the budget has room for it.
    async fn send_output(&self, message: FromWorker) {
        let bytes = match &message {
            FromWorker::Output { line, .. } => line.len(),
            _ => 0,
        };
        let permits = bytes.clamp(1, OUTPUT_BUDGET) as u32;
        let Ok(permit) = self.output_budget.clone().acquire_many_owned(permits).await else { return };
        let _ = self.frames.send((message, Some(permit)));
    }
}

/// A running CLI process of one session.
struct Running {
    pgid: i32,
    stdin: mpsc::UnboundedSender<String>,
}

pub fn run(control: StdUnixStream, config: WorkerConfig) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(serve(control, config))
}

async fn serve(control: StdUnixStream, config: WorkerConfig) -> std::io::Result<()> {
    control.set_nonblocking(true)?;
    let codec = LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME_LEN).new_codec();
    let (reader, mut socket) = UnixStream::from_std(control)?.into_split();
    let mut frames = FramedRead::new(reader, codec);
    let (outbox, mut outgoing) = Outbox::new();
    let writer = tokio::spawn(async move {
        while let Some((message, budget)) = outgoing.recv().await {
            // The frame's head, then an output line from the buffer it was
            // read into: nothing is copied on the way to the socket.
            let Ok((head, line)) = shared::protocol::frame_from_worker(&message) else { continue };
            drop(message);
            let mut frame = Bytes::from(head).chain(line.unwrap_or_default());
            if socket.write_all_buf(&mut frame).await.is_err() {
                break;
            }
            // Written: its share of the output budget is free again.
            drop(budget);
        }
    });
    let (exits, mut exited) = mpsc::unbounded_channel::<FromWorker>();
    let mut running: HashMap<String, Running> = HashMap::new();
    // Not at once: the first tick of `interval` fires immediately, and the
    // first thing a new worker does is start a CLI.
    let mut reap = tokio::time::interval_at(tokio::time::Instant::now() + REAP_PERIOD, REAP_PERIOD);

    loop {
        tokio::select! {
            frame = frames.next() => {
                let message = match frame {
                    Some(Ok(bytes)) => serde_json::from_slice::<ToWorker>(&bytes),
                    // The control plane is gone or spoke nonsense: stop everything.
                    Some(Err(error)) => {
                        report(&outbox, None, format!("control socket: {error}"));
                        break;
                    }
                    None => break,
                };
                match message {
                    Ok(ToWorker::Shutdown) => break,
                    Ok(message) => handle(message, &config, &mut running, &outbox, &exits),
                    Err(error) => report(&outbox, None, format!("malformed frame ignored: {error}")),
                }
            }
            Some(exit) = exited.recv() => {
                // Forget the process before the control plane hears of its
                // exit: a Start it sends in reply must find the slot free.
                if let FromWorker::Exited { session_id, .. } = &exit {
                    running.remove(session_id);
                }
                let _ = outbox.send(exit);
            }
            _ = reap.tick() => reap_orphans(&running.values().map(|p| p.pgid).collect::<Vec<_>>()),
        }
    }
    for process in running.values() {
        signal_group(process.pgid, libc::SIGKILL);
    }
    kill_descendants();
    drop(outbox);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    Ok(())
}

fn report(outbox: &Outbox, session_id: Option<&str>, message: String) {
    let _ = outbox.send(FromWorker::Error { session_id: session_id.map(str::to_owned), message });
}

fn handle(
    message: ToWorker,
    config: &WorkerConfig,
    running: &mut HashMap<String, Running>,
    outbox: &Outbox,
    exits: &mpsc::UnboundedSender<FromWorker>,
) {
    match message {
        ToWorker::Start { session_id, spec } => {
            if running.contains_key(&session_id) {
                report(outbox, Some(&session_id), "a process already runs for this session".into());
                return;
            }
            match start(&session_id, spec, config, outbox, exits) {
                Ok(process) => {
                    running.insert(session_id, process);
                }
                Err(error) => {
                    report(outbox, Some(&session_id), format!("cannot start the CLI: {error}"));
                    // Nothing runs: say so the way a finished process does,
                    // so the control plane frees the session's slot.
                    let _ = outbox.send(FromWorker::Exited { session_id, seq: 0, code: None, signal: None });
                }
            }
        }
        ToWorker::Stdin { session_id, data } => match running.get(&session_id) {
            Some(process) => {
                let _ = process.stdin.send(data);
            }
            None => report(outbox, Some(&session_id), "no process runs for this session".into()),
        },
        ToWorker::Signal { session_id, signal } => match running.get(&session_id) {
            Some(process) => signal_group(process.pgid, signal),
            None => report(outbox, Some(&session_id), "no process runs for this session".into()),
        },
        ToWorker::Stop { session_id, grace_ms } => {
            if let Some(process) = running.get(&session_id) {
                let pgid = process.pgid;
                signal_group(pgid, libc::SIGTERM);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(grace_ms)).await;
                    signal_group(pgid, libc::SIGKILL);
                });
            }
        }
        ToWorker::Hello { .. } => report(outbox, None, "unexpected second hello".into()),
        ToWorker::Shutdown => {}
    }
}

/// Starts one session's CLI and the tasks that relay it.
fn start(
    session_id: &str,
    spec: ProcessSpec,
    config: &WorkerConfig,
    outbox: &Outbox,
    exits: &mpsc::UnboundedSender<FromWorker>,
) -> std::io::Result<Running> {
    // Landlock enforces this too; refusing early gives a clear message.
    let cwd = std::fs::canonicalize(&spec.cwd)?;
    if !cwd.starts_with(&config.user_dir) {
        return Err(std::io::Error::other(format!("{} is outside the user's directory", cwd.display())));
    }
    let join_cgroups = session_cgroup_files(&spec, config)?;
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // Only async-signal-safe syscalls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Into the session's cgroup where the file lets us; where it
            // does not (cgroup v2 needs the common ancestor's file), the
            // control plane moves the process after `Started`.
            for path in &join_cgroups {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, c"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let pid = child.id().ok_or_else(|| std::io::Error::other("the CLI exited at once"))?;
    let _ = outbox.send(FromWorker::Started { session_id: session_id.to_owned(), pid });

    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
    if let Some(stdin) = child.stdin.take() {
        tokio::spawn(feed_stdin(stdin, stdin_rx));
    }
    tokio::spawn(supervise(session_id.to_owned(), child, outbox.clone(), exits.clone()));
    Ok(Running { pgid: pid as i32, stdin: stdin_tx })
}

/// The session cgroup files a CLI joins itself: only `cgroup.procs` files
/// beneath the user's own cgroup directories.
fn session_cgroup_files(spec: &ProcessSpec, config: &WorkerConfig) -> std::io::Result<Vec<std::ffi::CString>> {
    use std::os::unix::ffi::OsStrExt;
    spec.join_cgroups
        .iter()
        .map(|path| {
            let inside = config.landlock.own_cgroup_dirs.iter().any(|dir| path.starts_with(dir) && path != dir);
            let no_dots =
                path.components().all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_)));
            if !inside || !no_dots || path.file_name() != Some("cgroup.procs".as_ref()) {
                return Err(std::io::Error::other(format!("{} is not a session cgroup of this user", path.display())));
            }
            std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)
        })
        .collect()
}

async fn feed_stdin(mut stdin: ChildStdin, mut lines: mpsc::UnboundedReceiver<String>) {
    while let Some(data) = lines.recv().await {
        if stdin.write_all(data.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
            break;
        }
    }
}

/// Relays both output streams, then reports the exit after the last line.
async fn supervise(session_id: String, mut child: Child, outbox: Outbox, exits: mpsc::UnboundedSender<FromWorker>) {
    let seq = Arc::new(AtomicU64::new(0));
    let status = relay_until_exit(&session_id, &mut child, &seq, &outbox).await;
    use std::os::unix::process::ExitStatusExt;
    let (code, signal) = match status {
        Ok(status) => (status.code(), status.signal()),
        Err(_) => (None, None),
    };
    // Through the main loop, which frees the session's slot first.
    let _ = exits.send(FromWorker::Exited { session_id, seq: seq.load(Ordering::SeqCst), code, signal });
}

/// Relays the CLI's output until it has exited (and its output drained).
async fn relay_until_exit(
    session_id: &str,
    child: &mut Child,
    seq: &AtomicU64,
    outbox: &Outbox,
) -> std::io::Result<std::process::ExitStatus> {
    if let Some(stdout) = &child.stdout {
        widen_pipe(stdout.as_raw_fd());
    }
    let stdout = child.stdout.take().map(|s| relay(s, OutputStream::Stdout, session_id, seq, outbox));
    let stderr = child.stderr.take().map(|s| relay(s, OutputStream::Stderr, session_id, seq, outbox));
    let relays = async {
        tokio::join!(opt(stdout), opt(stderr));
    };
    tokio::pin!(relays);
    let mut relayed = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            () = &mut relays, if !relayed => relayed = true,
        }
    };
    // A daemon the CLI left may hold its pipes open forever: once the CLI
    // has exited, its remaining output gets a moment, not a wait for EOF.
    if !relayed {
        let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, &mut relays).await;
    }
    status
}

async fn opt(future: Option<impl std::future::Future<Output = ()>>) {
    if let Some(future) = future {
        future.await;
    }
}

/// How much is read from a CLI's pipe at a time: what its stdout pipe
/// holds (see [`widen_pipe`]).
const READ_CHUNK: usize = 256 * 1024;

/// Lets a CLI's stdout pipe hold [`READ_CHUNK`] bytes instead of 64 KiB: a
/// CLI writing a big reply (64 KiB deltas, then lines of megabytes) blocks,
/// and the worker wakes, far less often. Kept well under what the kernel
/// lets one uid hold in pipes before it shrinks new ones
/// (`/proc/sys/fs/pipe-user-pages-soft`, 64 MiB: many sessions share a uid
/// in unprivileged mode). Where it is refused the pipe keeps its size.
fn widen_pipe(fd: i32) {
    // SAFETY: F_SETPIPE_SZ on a pipe fd we own changes only its capacity.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, READ_CHUNK as libc::c_int) };
}

/// Sends each line of `reader` as `Output` frames: whole when it fits in
/// [`OUTPUT_PIECE_LEN`] bytes, else in pieces of at most that many bytes
/// (each but the last `partial`), so no line is ever held whole; the control
/// plane reassembles them and caps their length. Bytes that are not UTF-8
/// become U+FFFD, as in a whole line: a character cut by a piece's end goes
/// into the next piece.
///
/// Lines are cut out of the buffer the pipe is read into and sent from it:
/// output is not copied in the worker.
async fn relay(
    mut reader: impl AsyncRead + Unpin,
    stream: OutputStream,
    session_id: &str,
    seq: &AtomicU64,
    outbox: &Outbox,
) {
    let mut buffer = BytesMut::with_capacity(READ_CHUNK);
    // `buffer[..searched]` holds no newline.
    let mut searched = 0;
    let mut ended = false;
    // The seq of the line whose first pieces were sent, if any.
    let mut line_seq = None;
    loop {
        // A newline past a piece's length ends a line too long for one piece.
        let newline =
            memchr::memchr(b'\n', &buffer[searched..]).map(|at| searched + at).filter(|at| *at <= OUTPUT_PIECE_LEN);
        let (piece, partial) = match newline {
            Some(at) => {
                let mut line = buffer.split_to(at + 1);
                line.truncate(at);
                (line, false)
            }
            None if buffer.len() >= OUTPUT_PIECE_LEN => {
                let cut = char_cut(&buffer[..OUTPUT_PIECE_LEN]);
                (buffer.split_to(cut), true)
            }
            // The end of the output: a line in progress (or a last line
            // without its newline) ends here.
            None if ended => {
                if buffer.is_empty() && line_seq.is_none() {
                    return;
                }
                (buffer.split(), false)
            }
            None => {
                searched = buffer.len();
                // A long line is read into room for a whole piece at once,
                // not grown (and copied) 64 KiB at a time.
                let room = if buffer.len() >= READ_CHUNK { OUTPUT_PIECE_LEN - buffer.len() } else { READ_CHUNK };
                buffer.reserve(room);
                if !matches!(reader.read_buf(&mut buffer).await, Ok(read) if read > 0) {
                    ended = true;
                }
                continue;
            }
        };
        searched = 0;
        let piece = piece.freeze();
        let line =
            Text::try_from(piece.clone()).unwrap_or_else(|_| Text::from(String::from_utf8_lossy(&piece).into_owned()));
        let seq = *line_seq.get_or_insert_with(|| seq.fetch_add(1, Ordering::SeqCst));
        line_seq = partial.then_some(seq);
        outbox.send_output(FromWorker::Output { session_id: session_id.to_owned(), seq, stream, line, partial }).await;
    }
}

/// Where `bytes` may be cut so that no character is split: before the last
/// character when that one is incomplete, else at the end. (Bytes that are
/// no character anyway are left where they are: they become U+FFFD either
/// way.)
fn char_cut(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let at = bytes.len() - back;
        let byte = bytes[at];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue; // a continuation byte: its lead is further back
        }
        let needs = match byte {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => 1,
        };
        return if back < needs { at } else { bytes.len() };
    }
    bytes.len()
}

fn signal_group(pgid: i32, signal: i32) {
    if pgid > 1 {
        unsafe { libc::kill(-pgid, signal) };
    }
}

/// How often zombie orphans are reaped.
const REAP_PERIOD: Duration = Duration::from_secs(1);

/// Children of this worker (orphans reparented to us as subreaper
/// included) with their state. Read from each thread's `children` list,
/// which costs per child, not per process on the machine: the scan of
/// every `/proc/<pid>/stat` it replaces took milliseconds on a busy host,
/// in the loop that relays the CLIs' output.
fn children() -> Vec<(i32, char)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    let mut pids: Vec<i32> = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("children")).ok())
        .flat_map(|list| list.split_whitespace().filter_map(|pid| pid.parse().ok()).collect::<Vec<_>>())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The field after the command's closing parenthesis: the state.
            let state = stat.rsplit_once(')')?.1.split_whitespace().next()?.chars().next()?;
            Some((pid, state))
        })
        .collect()
}

/// Reaps zombie orphans (daemons whose parent died), never one of the CLIs
/// in `keep`: tokio waits for those itself.
fn reap_orphans(keep: &[i32]) {
    for (pid, state) in children() {
        if state == 'Z' && !keep.contains(&pid) {
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        }
    }
}

/// Kills every descendant, daemons included (they were reparented to us).
fn kill_descendants() {
    for _ in 0..50 {
        let live: Vec<i32> = children().into_iter().filter(|(_, s)| *s != 'Z').map(|(p, _)| p).collect();
        if live.is_empty() {
            return;
        }
        for pid in live {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
        reap_orphans(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_lists_own_children_with_their_state() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("spawn sleep");
        let pid = child.id() as i32;
        let state = children().into_iter().find(|(p, _)| *p == pid).map(|(_, s)| s);
        assert!(matches!(state, Some('S' | 'R')), "{state:?}");
        child.kill().expect("kill");
        // Killed, not yet waited for: a zombie until reaped.
        let mut zombie = false;
        for _ in 0..100 {
            if children().contains(&(pid, 'Z')) {
                zombie = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(zombie, "the killed child never showed as a zombie");
        child.wait().expect("wait");
        assert!(children().iter().all(|(p, _)| *p != pid), "a reaped child is still listed");
    }

    #[test]
    fn cuts_fall_before_an_incomplete_character_only() {
        assert_eq!(char_cut(b"abc"), 3);
        assert_eq!(char_cut("aé".as_bytes()), 3);
        assert_eq!(char_cut(&"aé".as_bytes()[..2]), 1);
        let smiley = "a\u{1F600}".as_bytes();
        for end in 2..5 {
            assert_eq!(char_cut(&smiley[..end]), 1, "{end}");
        }
        assert_eq!(char_cut(smiley), 5);
        // Stray continuation bytes and bytes that lead nothing stay.
        assert_eq!(char_cut(b"a\x80\x80\x80\x80"), 5);
        assert_eq!(char_cut(b"a\xff"), 2);
    }

    /// The frames `relay` sends for `output`, and the lines they make.
    async fn relayed(output: &[u8]) -> (Vec<(u64, String, bool)>, u64) {
        let (outbox, mut outgoing) = Outbox::new();
        let seq = AtomicU64::new(0);
        let collect = async {
            let mut frames = Vec::new();
            while let Some((message, _budget)) = outgoing.recv().await {
                let FromWorker::Output { seq, line, partial, session_id, stream } = message else {
                    panic!("{message:?}")
                };
                assert_eq!((session_id.as_str(), stream), ("s", OutputStream::Stdout));
                frames.push((seq, line.to_string(), partial));
            }
            frames
        };
        let relay = async move {
            relay(output, OutputStream::Stdout, "s", &seq, &outbox).await;
            drop(outbox);
            seq.load(Ordering::SeqCst)
        };
        let (frames, lines) = tokio::join!(collect, relay);
        (frames, lines)
    }

    fn assemble(frames: &[(u64, String, bool)]) -> Vec<(u64, String)> {
        let mut lines: Vec<(u64, String)> = Vec::new();
        let mut open = false;
        for (seq, piece, partial) in frames {
            assert!(piece.len() <= OUTPUT_PIECE_LEN);
            match lines.last_mut() {
                Some((last, text)) if open => {
                    assert_eq!(last, seq, "every piece carries its line's seq");
                    text.push_str(piece);
                }
                _ => lines.push((*seq, piece.clone())),
            }
            open = *partial;
        }
        assert!(!open, "the last line was ended");
        lines
    }

    #[tokio::test]
    async fn long_lines_go_in_pieces_cut_between_characters() {
        // 2.5 pieces, the cuts falling inside 3- and 4-byte characters.
        let unit = "ab€\u{1F600}";
        let long = unit.repeat(OUTPUT_PIECE_LEN * 5 / 2 / unit.len());
        let output = format!("short\n{long}\n\nlast without newline");
        let (frames, count) = relayed(output.as_bytes()).await;
        assert_eq!(frames.iter().filter(|f| f.2).count(), 2, "two partial pieces");
        let lines = assemble(&frames);
        let expected: Vec<(u64, String)> = ["short", long.as_str(), "", "last without newline"]
            .iter()
            .zip(0..)
            .map(|(l, s)| (s, (*l).to_owned()))
            .collect();
        assert_eq!(lines, expected);
        assert_eq!(count, 4);
    }

    #[tokio::test]
    async fn invalid_utf8_becomes_replacement_characters_as_in_a_whole_line() {
        // A line of exactly one piece whose end cuts a character, with
        // invalid bytes around the cut and a cut character at the very end.
        let mut line = vec![b'x'; OUTPUT_PIECE_LEN - 2];
        line.extend_from_slice("€".as_bytes()); // cut after its first 2 bytes
        line.extend_from_slice(b"\xff\x80ok\xe2\x82");
        let mut output = line.clone();
        output.push(b'\n');
        output.extend_from_slice(b"\xc3");
        let (frames, count) = relayed(&output).await;
        let lines = assemble(&frames);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].1, String::from_utf8_lossy(&line));
        assert_eq!(lines[1].1, "\u{FFFD}");
        assert_eq!(count, 2);
    }
}
