//! The supervisor: one confined worker per active user.
//!
//! It starts a user's worker on their first session (socketpair end as fd
//! 3, empty environment, configuration in the first frame), reuses it for
//! their other sessions, stops it when idle, notices when it dies (every
//! session of it gets a `WorkerDied` event), and kills everything a user
//! ran — whole cgroup, process group — on session delete and at shutdown.
//! Nothing outlives the server: workers have PDEATHSIG, their CLIs too.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use shared::Text;
use shared::protocol::{
    ConfinementReport, FromWorker, MAX_FRAME_LEN, OutputStream, PROTOCOL_VERSION, ProcessSpec, ToWorker, UserIds,
};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{broadcast, mpsc};
use tokio_util::bytes::Bytes;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cgroup::{CgroupLimits, CgroupManager, UserCgroup};
use super::handoff::AmbientHandoff;
use super::sandbox;
use crate::config::{Config, SandboxMode};
use crate::store::Store;

/// Events of one session's CLI process, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum ProcessEvent {
    Started {
        pid: u32,
    },
    /// One output line, shared by every receiver (cloning it copies nothing).
    Line {
        seq: u64,
        stream: OutputStream,
        line: Text,
    },
    /// Lines were lost between `expected` and `got` (never expected: the
    /// socket is reliable; reported rather than hidden).
    Gap {
        expected: u64,
        got: u64,
    },
    Error(String),
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// The worker itself died; the process is gone.
    WorkerDied,
}

/// Why a worker or process could not be started; the API answers 503 with
/// the message (it names the failing layer, never a secret).
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("the sandbox could not be set up: {0}")]
    Sandbox(String),
    #[error("the worker failed to start: {0}")]
    Start(String),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Per-session bookkeeping inside a worker handle.
struct SessionSlot {
    events: broadcast::Sender<ProcessEvent>,
    lines: LineAssembler,
    pid: Option<u32>,
    cgroup: Option<UserCgroup>,
}

/// Reassembles one session's output lines from the worker's pieces (see
/// [`FromWorker::Output`]), checks their numbering, and drops a line that
/// grows past `max_line` bytes (`sandbox.max_output_line_mb`) as soon as it
/// does, ignoring its remaining pieces.
#[derive(Debug)]
struct LineAssembler {
    /// The seq the next line should carry.
    next_seq: u64,
    max_line: usize,
    /// The line being assembled on each stream (stdout, stderr).
    pending: [Option<PendingLine>; 2],
}

#[derive(Debug)]
struct PendingLine {
    seq: u64,
    /// The pieces so far; `None` once the line was dropped: its remaining
    /// pieces are ignored.
    pieces: Option<Vec<Text>>,
    /// Bytes in `pieces`.
    len: usize,
}

impl LineAssembler {
    fn new(max_line: usize) -> Self {
        Self { next_seq: 0, max_line, pending: [None, None] }
    }

    /// Takes one `Output` frame; returns the events it completes: a `Gap`
    /// when lines were lost, then the line, or the `Error` that says it was
    /// dropped (once per line). A line of several pieces is joined once, at
    /// its end, into a buffer of its exact size.
    fn push(&mut self, seq: u64, stream: OutputStream, piece: Text, partial: bool) -> Vec<ProcessEvent> {
        let mut events = Vec::new();
        let index = match stream {
            OutputStream::Stdout => 0,
            OutputStream::Stderr => 1,
        };
        let kept = match self.pending[index].take() {
            Some(PendingLine { seq: line, pieces, len }) if line == seq => match pieces {
                Some(mut pieces) if len + piece.len() <= self.max_line => {
                    let len = len + piece.len();
                    pieces.push(piece);
                    Some((pieces, len))
                }
                // Past the cap: the buffer goes now.
                Some(_) => None,
                // The rest of a dropped line.
                None => {
                    if partial {
                        self.pending[index] = Some(PendingLine { seq, pieces: None, len: 0 });
                    }
                    return events;
                }
            },
            unfinished => {
                // A line the worker never finished (it always does) is lost.
                if let Some(line) = unfinished {
                    events.push(ProcessEvent::Gap { expected: line.seq, got: seq });
                }
                if seq != self.next_seq {
                    events.push(ProcessEvent::Gap { expected: self.next_seq, got: seq });
                }
                self.next_seq = seq + 1;
                let len = piece.len();
                (len <= self.max_line).then(|| (vec![piece], len))
            }
        };
        match kept {
            Some((pieces, len)) if partial => {
                self.pending[index] = Some(PendingLine { seq, pieces: Some(pieces), len });
            }
            Some((pieces, _)) => events.push(ProcessEvent::Line { seq, stream, line: Text::concat(&pieces) }),
            None => {
                if partial {
                    self.pending[index] = Some(PendingLine { seq, pieces: None, len: 0 });
                }
                events.push(ProcessEvent::Error(self.too_long(stream)));
            }
        }
        events
    }

    /// The message of a dropped line, as the turn's error shows it.
    fn too_long(&self, stream: OutputStream) -> String {
        const MIB: usize = 1024 * 1024;
        let limit = if self.max_line.is_multiple_of(MIB) {
            format!("{} MiB", self.max_line / MIB)
        } else {
            format!("{} bytes", self.max_line)
        };
        format!("{stream:?} line longer than {limit} dropped, the limit set by sandbox.max_output_line_mb")
    }
}

/// A running worker of one user.
pub struct Worker {
    pub user_id: String,
    pub pid: u32,
    pub report: ConfinementReport,
    outbox: mpsc::UnboundedSender<ToWorker>,
    sessions: Mutex<HashMap<String, SessionSlot>>,
    cgroup: Option<UserCgroup>,
    last_active: Mutex<Instant>,
    /// The worker's socket closed: it exited or was killed.
    exited: CancellationToken,
    /// Everything it left behind has been killed.
    cleaned: CancellationToken,
    cleanup_started: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("user_id", &self.user_id).field("pid", &self.pid).finish_non_exhaustive()
    }
}

impl Worker {
    fn send(&self, message: ToWorker) -> bool {
        self.outbox.send(message).is_ok()
    }

    fn touch(&self) {
        if let Ok(mut last) = self.last_active.lock() {
            *last = Instant::now();
        }
    }

    fn running_sessions(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Routes one frame from the worker to its session's subscribers.
    fn dispatch(&self, message: FromWorker) {
        let Ok(mut sessions) = self.sessions.lock() else { return };
        let (session_id, event) = match message {
            FromWorker::Started { session_id, pid } => {
                if let Some(slot) = sessions.get_mut(&session_id) {
                    slot.pid = Some(pid);
                    // Into the session's own cgroup, so its daemons die with
                    // it (processes forked before this stay in the user's).
                    if let Some(cgroup) = &slot.cgroup {
                        for procs in cgroup.procs_files() {
                            let joined_itself = || {
                                std::fs::read_to_string(&procs)
                                    .is_ok_and(|text| text.lines().any(|line| line == pid.to_string()))
                            };
                            if let Err(e) = std::fs::write(&procs, pid.to_string())
                                && !joined_itself()
                            {
                                tracing::warn!(%session_id, error = %e, "cannot move the CLI into its session cgroup");
                            }
                        }
                    }
                }
                (session_id, ProcessEvent::Started { pid })
            }
            FromWorker::Output { session_id, seq, stream, line, partial } => {
                let Some(slot) = sessions.get_mut(&session_id) else { return };
                for event in slot.lines.push(seq, stream, line, partial) {
                    if let ProcessEvent::Error(message) = &event {
                        tracing::warn!(user_id = %self.user_id, %session_id, %message, "output line dropped");
                    }
                    let _ = slot.events.send(event);
                }
                return;
            }
            FromWorker::Exited { session_id, seq, code, signal } => {
                // A line still being assembled (cut off by the process's end)
                // goes with the slot.
                let Some(slot) = sessions.remove(&session_id) else { return };
                if seq != slot.lines.next_seq {
                    let _ = slot.events.send(ProcessEvent::Gap { expected: slot.lines.next_seq, got: seq });
                }
                // The session is over: whatever it left (setsid daemons
                // included) dies with its cgroup. This is the one place a
                // session cgroup is killed, so two kills never interleave.
                if let Some(cgroup) = slot.cgroup {
                    let session = session_id.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = cgroup.remove() {
                            tracing::warn!(session_id = %session, error = %e, "cannot remove the session cgroup");
                        }
                    });
                }
                let _ = slot.events.send(ProcessEvent::Exited { code, signal });
                return;
            }
            FromWorker::Error { session_id: Some(session_id), message } => {
                tracing::warn!(user_id = %self.user_id, %session_id, %message, "worker reported an error");
                (session_id, ProcessEvent::Error(message))
            }
            FromWorker::Error { session_id: None, message } | FromWorker::Fatal { message } => {
                tracing::warn!(user_id = %self.user_id, %message, "worker reported an error");
                return;
            }
            FromWorker::Ready { .. } => return,
        };
        if let Some(slot) = sessions.get(&session_id) {
            let _ = slot.events.send(event);
        }
    }

    /// The worker is gone: every session hears it, every process it left
    /// behind is killed. Blocking (cgroup kills wait for the kernel); once
    /// only.
    fn mark_dead(&self) {
        if self.cleanup_started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        self.exited.cancel();
        if let Ok(mut sessions) = self.sessions.lock() {
            for (_, slot) in sessions.drain() {
                let _ = slot.events.send(ProcessEvent::WorkerDied);
                if let Some(cgroup) = slot.cgroup {
                    let _ = cgroup.remove();
                }
            }
        }
        kill_group(self.pid);
        if let Some(cgroup) = &self.cgroup
            && let Err(e) = cgroup.kill_all()
        {
            tracing::warn!(user_id = %self.user_id, error = %e, "cannot kill the user's cgroup");
        }
        self.cleaned.cancel();
    }
}

fn kill_group(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// Starts, tracks and stops workers.
pub struct Supervisor {
    config: Config,
    mode: SandboxMode,
    store: Arc<dyn Store>,
    base_dir: PathBuf,
    cgroups: Option<Arc<CgroupManager>>,
    /// The control plane's proxies (model, egress): the TCP ports every
    /// sandbox may reach.
    proxy_ports: Vec<u16>,
    uid_allocation: tokio::sync::Mutex<()>,
    workers: tokio::sync::Mutex<HashMap<String, Arc<Worker>>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor").field("mode", &self.mode).finish_non_exhaustive()
    }
}

impl Supervisor {
    pub fn new(config: Config, store: Arc<dyn Store>, base_dir: PathBuf, proxy_ports: Vec<u16>) -> Self {
        let mode = sandbox::resolve_mode(config.sandbox.mode);
        let cgroups = match CgroupManager::detect() {
            Ok(manager) => manager.map(Arc::new),
            Err(e) => {
                tracing::warn!(error = %e, "cgroups unavailable");
                None
            }
        };
        match (&cgroups, config.sandbox.best_effort.cgroup) {
            (Some(_), _) => {}
            (None, true) => tracing::warn!("no writable cgroup: workers run without memory/pids/cpu limits"),
            (None, false) => tracing::warn!(
                "no writable cgroup: workers will refuse to start (set sandbox.best_effort.cgroup to run without)"
            ),
        }
        if mode == SandboxMode::Unprivileged {
            tracing::warn!(
                "sandbox mode is unprivileged: all users share this server's uid; isolation relies on \
                 Landlock, seccomp and cgroups, and same-uid /proc entries not guarded by ptrace checks \
                 (argv) stay readable across users"
            );
        }
        Self {
            config,
            mode,
            store,
            base_dir,
            cgroups,
            proxy_ports,
            uid_allocation: tokio::sync::Mutex::new(()),
            workers: tokio::sync::Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        }
    }

    pub fn mode(&self) -> SandboxMode {
        self.mode
    }

    /// Live workers (an exited one stays in the map until its user's next
    /// start replaces it).
    pub async fn worker_count(&self) -> usize {
        self.workers.lock().await.values().filter(|worker| !worker.exited.is_cancelled()).count()
    }

    /// The running worker of a user, if any.
    pub async fn worker(&self, user_id: &str) -> Option<Arc<Worker>> {
        self.workers.lock().await.get(user_id).cloned()
    }

    /// Starts `spec` for a session in its user's worker (starting the worker
    /// first if needed) and returns the session's event stream.
    pub async fn start_process(
        &self,
        user_id: &str,
        session_id: &str,
        mut spec: ProcessSpec,
    ) -> Result<broadcast::Receiver<ProcessEvent>, SupervisorError> {
        let worker = self.ensure_worker(user_id).await?;
        let max_line = self.config.sandbox.max_output_line_bytes();
        let (events, receiver) = broadcast::channel(4096);
        let cgroup = worker.cgroup.as_ref().and_then(|c| match c.child(&session_cgroup_name(session_id)) {
            Ok(child) => Some(child),
            Err(e) => {
                tracing::warn!(%session_id, error = %e, "no session cgroup; the user's cgroup bounds it");
                None
            }
        });
        if let Some(cgroup) = &cgroup {
            // The CLI joins it itself (see `ProcessSpec::join_cgroups`); with
            // its own uid it needs the files to be its own.
            let user = rustix::process::Uid::from_raw(worker.report.uid);
            if user != rustix::process::geteuid() {
                let group = rustix::process::Gid::from_raw(worker.report.gid);
                for procs in cgroup.procs_files() {
                    if let Err(e) = rustix::fs::chown(&procs, Some(user), Some(group)) {
                        tracing::warn!(%session_id, error = %e, path = %procs.display(), "cannot hand the session cgroup to the user");
                    }
                }
                spec.join_cgroups = cgroup.procs_files();
            }
        }
        worker.sessions.lock().map_err(|_| SupervisorError::Start("worker state poisoned".into()))?.insert(
            session_id.to_owned(),
            SessionSlot { events, lines: LineAssembler::new(max_line), pid: None, cgroup },
        );
        worker.touch();
        if !worker.send(ToWorker::Start { session_id: session_id.to_owned(), spec }) {
            return Err(SupervisorError::Start("the worker exited".into()));
        }
        Ok(receiver)
    }

    /// A new receiver of a running session process's events; `None` when no
    /// process runs for the session.
    pub async fn subscribe(&self, user_id: &str, session_id: &str) -> Option<broadcast::Receiver<ProcessEvent>> {
        let worker = self.worker(user_id).await?;
        if worker.exited.is_cancelled() {
            return None;
        }
        let sessions = worker.sessions.lock().ok()?;
        sessions.get(session_id).map(|slot| slot.events.subscribe())
    }

    /// Every (user, session) with a CLI process in a live worker.
    pub async fn running_processes(&self) -> Vec<(String, String)> {
        let workers = self.workers.lock().await;
        workers
            .values()
            .filter(|worker| !worker.exited.is_cancelled())
            .flat_map(|worker| {
                let sessions =
                    worker.sessions.lock().map(|s| s.keys().cloned().collect()).unwrap_or_else(|_| Vec::new());
                sessions.into_iter().map(|session| (worker.user_id.clone(), session))
            })
            .collect()
    }

    /// Writes to a session's CLI stdin.
    pub async fn write_stdin(&self, user_id: &str, session_id: &str, data: String) -> bool {
        match self.worker(user_id).await {
            Some(worker) => {
                worker.touch();
                worker.send(ToWorker::Stdin { session_id: session_id.to_owned(), data })
            }
            None => false,
        }
    }

    /// Stops a session's CLI: SIGTERM to its process group, SIGKILL after
    /// `grace`; when it has exited, its session cgroup (daemons included)
    /// is killed and removed.
    pub async fn stop_process(&self, user_id: &str, session_id: &str, grace: Duration) {
        let Some(worker) = self.worker(user_id).await else { return };
        worker.send(ToWorker::Stop { session_id: session_id.to_owned(), grace_ms: grace.as_millis() as u64 });
    }

    /// Privileged mode: the user's own uid/gid (allocated once, stored with
    /// the user). Unprivileged: `None`, the server's uid is shared.
    pub async fn user_ids(&self, user_id: &str) -> Result<Option<UserIds>, SupervisorError> {
        if self.mode != SandboxMode::Privileged {
            return Ok(None);
        }
        let sandbox = &self.config.sandbox;
        let range = (i64::from(sandbox.uid_min), i64::from(sandbox.uid_max));
        // One allocation at a time in this server (users' first sessions
        // arrive together); the store still settles races between servers.
        let _one_at_a_time = self.uid_allocation.lock().await;
        let uid = self
            .store
            .assign_uid(user_id, range)
            .await
            .map_err(|e| SupervisorError::Sandbox(e.to_string()))?
            .ok_or_else(|| SupervisorError::Sandbox(format!("unknown user {user_id}")))?;
        let uid = u32::try_from(uid).map_err(|_| SupervisorError::Sandbox(format!("bad uid {uid}")))?;
        Ok(Some(UserIds { uid, gid: uid }))
    }

    async fn ensure_worker(&self, user_id: &str) -> Result<Arc<Worker>, SupervisorError> {
        if self.shutdown.is_cancelled() {
            return Err(SupervisorError::ShuttingDown);
        }
        let mut workers = self.workers.lock().await;
        if let Some(worker) = workers.get(user_id) {
            if !worker.exited.is_cancelled() {
                return Ok(worker.clone());
            }
            // A dead worker's clean-up kills everything in the user's (and
            // its sessions') cgroups: the new worker must start after it.
            let cleaned = worker.cleaned.clone();
            if tokio::time::timeout(Duration::from_secs(10), cleaned.cancelled()).await.is_err() {
                return Err(SupervisorError::Start("the previous worker is still being cleaned up".into()));
            }
        }
        let worker = self.spawn_worker(user_id).await?;
        workers.insert(user_id.to_owned(), worker.clone());
        Ok(worker)
    }

    /// Prepares the user's directory, uid and cgroup, starts the worker and
    /// waits for it to confine itself.
    async fn spawn_worker(&self, user_id: &str) -> Result<Arc<Worker>, SupervisorError> {
        let sandbox_cfg = &self.config.sandbox;
        let user_dir = self.base_dir.join(user_id);
        let drop_to = self.user_ids(user_id).await?;
        prepare_user_dir(&user_dir, drop_to).map_err(|e| SupervisorError::Sandbox(e.to_string()))?;
        let cgroup = match &self.cgroups {
            Some(manager) => {
                let limits = CgroupLimits {
                    memory_bytes: Some(sandbox_cfg.memory_mb * 1024 * 1024),
                    pids: Some(sandbox_cfg.pids),
                    cpu_percent: Some(sandbox_cfg.cpu_percent),
                };
                match manager.create_user(user_id, &limits) {
                    Ok(cgroup) => Some(cgroup),
                    Err(e) if sandbox_cfg.best_effort.cgroup => {
                        tracing::warn!(%user_id, error = %e, "cgroup skipped (best-effort)");
                        None
                    }
                    Err(e) => return Err(SupervisorError::Sandbox(format!("cgroup: {e}"))),
                }
            }
            None if sandbox_cfg.best_effort.cgroup => None,
            None => {
                return Err(SupervisorError::Sandbox(
                    "no writable cgroup hierarchy (delegate one to the server, or set sandbox.best_effort.cgroup)"
                        .into(),
                ));
            }
        };
        let procs = cgroup.as_ref().map(UserCgroup::procs_files).unwrap_or_default();
        let worker_config = sandbox::worker_config(&self.config, user_id, &user_dir, drop_to, procs, &self.proxy_ports);

        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|e| SupervisorError::Start(format!("socketpair: {e}")))?;
        let theirs_fd = theirs.as_raw_fd();
        let handoff = AmbientHandoff::of_this_process()
            .map_err(|e| SupervisorError::Start(format!("reading the server's capabilities: {e}")))?;
        let mut command = tokio::process::Command::new(sandbox::worker_path(&self.config));
        command.env_clear().stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
        // Between fork and exec only async-signal-safe calls: put our end...
        // their end of the socketpair on fd 3, without close-on-exec.
        unsafe {
            command.pre_exec(move || {
                if theirs_fd == shared::protocol::CONTROL_FD {
                    if libc::fcntl(theirs_fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(theirs_fd, shared::protocol::CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // ...and a non-root server's capabilities, which the worker
                // needs to switch to the user's uid (it drops them all).
                if let Some(handoff) = &handoff {
                    handoff.apply()?;
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| SupervisorError::Start(format!("{}: {e}", sandbox::worker_path(&self.config).display())))?;
        drop(theirs);
        let pid = child.id().unwrap_or_default();

        if let Some(stderr) = child.stderr.take() {
            let user = user_id.to_owned();
            self.tasks.spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::warn!(user_id = %user, worker_pid = pid, "worker: {line}");
                }
            });
        }

        ours.set_nonblocking(true).map_err(|e| SupervisorError::Start(e.to_string()))?;
        let stream = tokio::net::UnixStream::from_std(ours).map_err(|e| SupervisorError::Start(e.to_string()))?;
        let codec = LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME_LEN).new_codec();
        let mut framed = Framed::new(stream, codec);
        let hello = ToWorker::Hello { version: PROTOCOL_VERSION, config: Box::new(worker_config) };
        let bytes = serde_json::to_vec(&hello).map_err(|e| SupervisorError::Start(e.to_string()))?;
        framed.send(Bytes::from(bytes)).await.map_err(|e| SupervisorError::Start(format!("hello: {e}")))?;

        let timeout = Duration::from_secs(sandbox_cfg.worker_start_timeout.max(1));
        let first = tokio::time::timeout(timeout, framed.next()).await;
        let report = match first {
            Ok(Some(Ok(bytes))) => match shared::protocol::decode_from_worker(bytes.freeze()) {
                Ok(FromWorker::Ready { version, confinement, .. }) if version == PROTOCOL_VERSION => confinement,
                Ok(FromWorker::Ready { version, .. }) => {
                    return Err(SupervisorError::Start(format!("worker speaks protocol {version}")));
                }
                Ok(FromWorker::Fatal { message }) => return Err(SupervisorError::Sandbox(message)),
                Ok(other) => return Err(SupervisorError::Start(format!("unexpected first frame {other:?}"))),
                Err(e) => return Err(SupervisorError::Start(format!("malformed first frame: {e}"))),
            },
            Ok(Some(Err(e))) => return Err(SupervisorError::Start(format!("reading ready: {e}"))),
            Ok(None) => {
                let status = child.wait().await.ok();
                return Err(SupervisorError::Start(format!("the worker exited before it was ready ({status:?})")));
            }
            Err(_) => return Err(SupervisorError::Start(format!("no answer within {}s", timeout.as_secs()))),
        };
        for skipped in &report.skipped {
            tracing::warn!(%user_id, layer = %skipped, "sandbox layer skipped (best-effort)");
        }
        tracing::info!(
            %user_id, worker_pid = pid, uid = report.uid, landlock_abi = ?report.landlock_abi,
            seccomp = report.seccomp, cgroup = report.cgroup, setup_micros = report.setup_micros,
            "worker confined and ready"
        );

        let (outbox, mut outgoing) = mpsc::unbounded_channel::<ToWorker>();
        let worker = Arc::new(Worker {
            user_id: user_id.to_owned(),
            pid,
            report,
            outbox,
            sessions: Mutex::new(HashMap::new()),
            cgroup,
            last_active: Mutex::new(Instant::now()),
            exited: CancellationToken::new(),
            cleaned: CancellationToken::new(),
            cleanup_started: std::sync::atomic::AtomicBool::new(false),
        });
        let (mut sink, mut frames) = framed.split::<Bytes>();
        self.tasks.spawn(async move {
            while let Some(message) = outgoing.recv().await {
                let Ok(bytes) = serde_json::to_vec(&message) else { continue };
                if sink.send(Bytes::from(bytes)).await.is_err() {
                    break;
                }
            }
        });
        let reader = worker.clone();
        self.tasks.spawn(async move {
            while let Some(frame) = frames.next().await {
                match frame
                    .map_err(|e| e.to_string())
                    .and_then(|b| shared::protocol::decode_from_worker(b.freeze()).map_err(|e| e.to_string()))
                {
                    Ok(message) => reader.dispatch(message),
                    Err(error) => {
                        // A broken or oversized frame ends this worker: its
                        // stream can no longer be trusted.
                        tracing::error!(user_id = %reader.user_id, %error, "bad frame from worker; stopping it");
                        break;
                    }
                }
            }
            reader.exited.cancel();
            let dead = reader.clone();
            let _ = tokio::task::spawn_blocking(move || dead.mark_dead()).await;
            let status = child.wait().await;
            tracing::info!(user_id = %reader.user_id, ?status, "worker exited");
        });
        self.tasks.spawn(idle_watch(
            worker.clone(),
            Duration::from_secs(sandbox_cfg.worker_idle_timeout.max(1)),
            self.shutdown.clone(),
        ));
        Ok(worker)
    }

    /// Stops every worker and kills everything they ran.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let workers: Vec<Arc<Worker>> = self.workers.lock().await.drain().map(|(_, w)| w).collect();
        for worker in &workers {
            worker.send(ToWorker::Shutdown);
        }
        for worker in workers {
            let _ = tokio::time::timeout(Duration::from_secs(3), worker.exited.cancelled()).await;
            let cleaned = worker.cleaned.clone();
            let _ = tokio::task::spawn_blocking(move || worker.mark_dead()).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), cleaned.cancelled()).await;
        }
        if let Some(cgroups) = self.cgroups.clone() {
            let _ = tokio::task::spawn_blocking(move || cgroups.shutdown()).await;
        }
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }
}

/// Stops a worker that has had no running process for `idle`.
async fn idle_watch(worker: Arc<Worker>, idle: Duration, shutdown: CancellationToken) {
    let period = (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = worker.exited.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        let idle_for = worker.last_active.lock().map(|t| t.elapsed()).unwrap_or_default();
        if worker.running_sessions() == 0 && idle_for >= idle {
            tracing::info!(user_id = %worker.user_id, "stopping idle worker");
            worker.send(ToWorker::Shutdown);
            return;
        }
    }
}

fn session_cgroup_name(session_id: &str) -> String {
    format!("session-{session_id}")
}

/// The user's directory as the worker expects it: present, owned by the
/// user's uid (privileged) with mode 0700, and a `.tmp` for TMPDIR.
fn prepare_user_dir(user_dir: &Path, owner: Option<UserIds>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(user_dir)?;
    let tmp = user_dir.join(".tmp");
    if !tmp.exists() {
        std::fs::create_dir(&tmp)?;
    }
    for dir in [user_dir, tmp.as_path()] {
        if let Some(ids) = owner {
            std::os::unix::fs::lchown(dir, Some(ids.uid), Some(ids.gid))?;
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: u64, stream: OutputStream, text: &str) -> ProcessEvent {
        ProcessEvent::Line { seq, stream, line: text.to_owned().into() }
    }

    #[test]
    fn pieces_are_reassembled_per_stream_in_order() {
        use OutputStream::{Stderr, Stdout};
        let mut lines = LineAssembler::new(1024);
        assert_eq!(lines.push(0, Stdout, "whole".into(), false), [line(0, Stdout, "whole")]);
        assert!(lines.push(1, Stdout, "{\"a\":".into(), true).is_empty());
        // A stderr line between two pieces of a stdout line.
        assert!(lines.push(2, Stderr, "warn".into(), true).is_empty());
        assert!(lines.push(1, Stdout, "\"é".into(), true).is_empty());
        assert_eq!(lines.push(2, Stderr, "ing".into(), false), [line(2, Stderr, "warning")]);
        assert_eq!(lines.push(1, Stdout, "\"}".into(), false), [line(1, Stdout, "{\"a\":\"é\"}")]);
        // An empty last piece ends the line too.
        assert!(lines.push(3, Stdout, "abc".into(), true).is_empty());
        assert_eq!(lines.push(3, Stdout, Text::default(), false), [line(3, Stdout, "abc")]);
        assert_eq!(lines.next_seq, 4);
        // A lost line shows as a gap, the line itself still arrives.
        assert_eq!(
            lines.push(5, Stdout, "x".into(), false),
            [ProcessEvent::Gap { expected: 4, got: 5 }, line(5, Stdout, "x")]
        );
    }

    #[test]
    fn a_line_past_the_cap_is_dropped_once_and_the_next_line_passes() {
        use OutputStream::Stdout;
        let mut lines = LineAssembler::new(10);
        assert_eq!(lines.push(0, Stdout, "0123456789".into(), false), [line(0, Stdout, "0123456789")]);
        // Over the cap in one piece.
        let events = lines.push(1, Stdout, "0123456789a".into(), false);
        assert!(matches!(&events[..], [ProcessEvent::Error(m)] if m.contains("longer than 10 bytes")), "{events:?}");
        // Over the cap after a few pieces: one error, the buffer is freed at
        // once and the remaining pieces are ignored.
        assert!(lines.push(2, Stdout, "01234".into(), true).is_empty());
        let events = lines.push(2, Stdout, "567890".into(), true);
        assert!(
            matches!(&events[..], [ProcessEvent::Error(m)] if m.contains("sandbox.max_output_line_mb")),
            "{events:?}"
        );
        assert!(matches!(&lines.pending[0], Some(PendingLine { seq: 2, pieces: None, .. })));
        assert!(lines.push(2, Stdout, "more".into(), true).is_empty());
        assert!(lines.push(2, Stdout, "end".into(), false).is_empty());
        assert!(lines.pending[0].is_none());
        assert_eq!(lines.push(3, Stdout, "fine".into(), false), [line(3, Stdout, "fine")]);
        assert_eq!(lines.next_seq, 4);
    }

    #[test]
    fn the_message_names_the_limit_in_mib_and_the_key() {
        let lines = LineAssembler::new(Config::default().sandbox.max_output_line_bytes());
        assert_eq!(
            lines.too_long(OutputStream::Stdout),
            "Stdout line longer than 128 MiB dropped, the limit set by sandbox.max_output_line_mb"
        );
    }
}
