//! Per-user cgroups for confined workers, on cgroup v1 and cgroup v2, behind one interface.
//!
//! # Layout (delegation model)
//!
//! The server creates cgroups only beneath the cgroup it runs in and never writes limits into a
//! cgroup it did not create (on v2 it may enable controllers in its own cgroup and move itself, see
//! below). At start ([`CgroupManager::detect`]) it reads the cgroup it runs in from
//! `/proc/self/cgroup`, finds the matching mounts in `/proc/self/mountinfo` and creates its subtree:
//!
//! ```text
//! <own cgroup>/claude-agent-http-<server pid>/                   the server's subtree ("S")
//! <own cgroup>/claude-agent-http-<server pid>/<user id>          one cgroup per user, with the limits
//! <own cgroup>/claude-agent-http-<server pid>/<user id>/<child>  optional, e.g. per session (no limits
//!                                                                of its own, bounded by the user's)
//! <own cgroup>/claude-agent-http-<server pid>/supervisor.leaf    v2 only, see below
//! ```
//!
//! A `None` limit is written as "unlimited", so reusing a user's cgroup always leaves exactly the
//! requested limits. [`UserCgroup::pids`], [`UserCgroup::kill_all`] and [`UserCgroup::remove`] cover
//! the cgroup's children too.
//!
//! * **v1** (legacy or hybrid hosts): one subtree per hierarchy among `memory`, `pids`, `cpu` and
//!   `freezer` that is mounted and writable; a worker joins by writing its pid into the
//!   `cgroup.procs` of its user's cgroup in every hierarchy ([`UserCgroup::procs_files`]). The layer is
//!   usable when `memory`, or `pids` together with `freezer`, is writable.
//! * **v2** (unified hosts): one subtree in the unified hierarchy. It is used with resource limits
//!   when the own cgroup's `cgroup.controllers` lists `memory` and `pids` (`cpu` is used when present);
//!   otherwise only for grouping and `cgroup.kill` ("kill-only"), and [`CgroupManager::create_user`]
//!   refuses limits it cannot enforce ([`CgroupError::ControllerUnavailable`]): it fails closed.
//!   When both are mounted (hybrid), v2 is chosen only if it carries `memory` and `pids`; otherwise
//!   v1, and v2 kill-only as the last resort.
//!
//! # v2 and the "no internal processes" rule
//!
//! For the user cgroups to get `memory`/`pids`/`cpu`, the controllers must be enabled in
//! `cgroup.subtree_control` of the own cgroup *and* of S. A non-root cgroup that contains processes
//! cannot enable domain controllers (`EBUSY`), and the server itself runs in its own cgroup. So:
//!
//! 1. try `+memory +pids +cpu` on the own cgroup's `cgroup.subtree_control` (works when it is the
//!    root, already enabled, or empty);
//! 2. on `EBUSY`, move the server process (all its threads) into the leaf `S/supervisor.leaf` and
//!    retry for up to one second (other servers starting in the same cgroup do the same, so it
//!    becomes empty); workers spawned later start in that leaf and then join their user's cgroup;
//! 3. if the own cgroup still has other processes, move the server back, remove the leaf and fall
//!    back to kill-only, with a warning;
//! 4. enable the same controllers in S (which has no processes of its own).
//!
//! The leaf name contains a `.`, which a user id cannot, so it never collides with a user.
//! At [`CgroupManager::shutdown`] the users' cgroups are removed, the controllers are disabled again
//! in S, and in the own cgroup too if this manager enabled them there and no other child cgroup
//! exists (disabling them while another cgroup relies on them would silently drop its limits); then
//! the server moves back into its own cgroup and S is removed. If the move back is impossible
//! (another server still uses the controllers), the server stays in its leaf until it exits and the
//! next server's `detect` removes the leftover (below).
//!
//! # Ending everything in a cgroup
//!
//! v2 writes `1` to `cgroup.kill` (kernel ≥ 5.14; it also catches forks in flight). v1 has no such
//! file: the freezer freezes the cgroup (`freezer.state` = `FROZEN`, polled until it reads so), every
//! pid in `cgroup.procs` is SIGKILLed while nothing can fork, then it is thawed so the signals are
//! delivered; this repeats until the cgroup is empty, for at most two seconds. v2 kernels without
//! `cgroup.kill` (< 5.14) use the same loop with `cgroup.freeze`; without any freezer it is a plain
//! SIGKILL loop, which a process forking fast enough could outrun. Processes that left the
//! process group or session (`setsid` daemons) are still in the cgroup and die too. The kill never
//! signals the calling process: a cgroup containing it is an error.
//!
//! # Stale subtrees
//!
//! `detect` removes every sibling `claude-agent-http-<pid>[-<suffix>]` whose pid no longer runs
//! (kills what is left inside, then removes the directories), in every hierarchy it uses. The pid
//! is only made for subtrees of this server's PID namespace: the name carries the namespace
//! (`claude-agent-http-<pid>-pidns<inode>`), and subtrees of other namespaces are never touched (a
//! server in another container sharing the hierarchy, whose pid means nothing here: measured, two
//! servers in different PID namespaces killed each other's sandboxes). A reused pid keeps a stale
//! subtree alive until that process exits (conservative: a live server's subtree is never touched).
//!
//! # One manager per process; tests
//!
//! [`CgroupManager::detect`] names the subtree after the server's pid, so a second call in the same
//! process reuses the same subtree (idempotent), and a `shutdown` through either ends both. Tests
//! run in parallel in one process, so each builds its own manager with `detect_scoped(<test>)`
//! (subtree `claude-agent-http-<pid>-<test>`): the `<pid>` prefix lets a later `detect` clean up
//! after a crashed test run, and the distinct suffixes keep parallel tests apart. The v2 code takes
//! the own cgroup's directory as a parameter (`prepare_v2`), so the tests point it at the unified
//! mount of a hybrid host; the supervisor-leaf path is tested there with `hugetlb` standing in for
//! `memory`/`pids` and a `sleep` standing in for the server (an `#[ignore]`d test, since it enables
//! `hugetlb` in the unified root's `cgroup.subtree_control` while it runs).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::process::{Pid, Signal};
use shared::names::{NameError, validate_user_id};

/// Prefix of every server subtree; the server's pid follows.
const SUBTREE_PREFIX: &str = "claude-agent-http-";
/// v2 leaf the server moves into when its own cgroup must not hold processes (not a valid user id).
const SUPERVISOR_LEAF: &str = "supervisor.leaf";
/// Bound on one kill (freeze, kill, thaw, wait) or removal.
const KILL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `detect` waits for its own cgroup to become empty of other servers (v2).
const ENABLE_TIMEOUT: Duration = Duration::from_secs(1);
/// CFS period; `cpu_percent` 100 is one core (`quota == period`).
const CPU_PERIOD_US: u64 = 100_000;

const MEMORY: &str = "memory";
const PIDS: &str = "pids";
const CPU: &str = "cpu";
const FREEZER: &str = "freezer";
/// The v1 controllers this layer uses (each in its own or a shared hierarchy).
const V1_CONTROLLERS: [&str; 4] = [MEMORY, PIDS, CPU, FREEZER];
/// The v2 controllers this layer enables for user cgroups.
const V2_CONTROLLERS: [&str; 3] = [MEMORY, PIDS, CPU];

/// Resource limits of one user's cgroup; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// RAM of all the user's processes together; swap is denied when set (v2 `memory.swap.max=0`,
    /// v1 `memory.memsw.limit_in_bytes` equal to it).
    pub memory_bytes: Option<u64>,
    /// Processes and threads together.
    pub pids: Option<u64>,
    /// CPU time in percent of one core (100 = one core, 250 = two and a half).
    pub cpu_percent: Option<u32>,
}

/// Which cgroup interface a [`CgroupManager`] drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroup name {name:?}: {source}")]
    InvalidName { name: String, source: NameError },
    #[error("cgroup name {name:?} collides with the cgroup interface file {path}")]
    NameCollision { name: String, path: PathBuf },
    #[error("invalid cgroup limit: {0}")]
    InvalidLimit(&'static str),
    #[error("cannot enforce a {controller} limit: the {controller} controller is not available to this server")]
    ControllerUnavailable { controller: &'static str },
    #[error("cgroup {path} contains the calling process; refusing to kill it")]
    ContainsSelf { path: PathBuf },
    #[error("processes still in cgroup {path} after {waited:?}: {pids:?}")]
    KillTimeout { path: PathBuf, waited: Duration, pids: Vec<i32> },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { op, path, source }
}

/// One hierarchy this server uses: the cgroup it runs in and its subtree beneath.
#[derive(Debug, Clone)]
struct Hierarchy {
    /// The cgroup the server runs in (v1: of this hierarchy).
    own_dir: PathBuf,
    /// `<own_dir>/claude-agent-http-<pid>`.
    subtree: PathBuf,
    /// Controllers usable in the user cgroups below `subtree` (v1: those bound to this hierarchy).
    controllers: BTreeSet<&'static str>,
}

/// What a v2 manager changed outside its subtree, to undo at shutdown.
#[derive(Debug, Clone, Default)]
struct V2Changes {
    /// Controllers this manager enabled in the own cgroup's `cgroup.subtree_control`.
    enabled_in_parent: Vec<&'static str>,
    /// The process moved into the supervisor leaf (the server; a stand-in in tests).
    moved: Option<i32>,
}

/// The per-user cgroup layer of one server process; see the module documentation.
#[derive(Debug)]
pub struct CgroupManager {
    version: CgroupVersion,
    /// v2: exactly one.
    hierarchies: Vec<Hierarchy>,
    v2_changes: V2Changes,
}

/// One user's cgroup (in every hierarchy used); cheap to clone.
#[derive(Debug, Clone)]
pub struct UserCgroup {
    name: String,
    version: CgroupVersion,
    /// The user's cgroup directory in each hierarchy (v2: one).
    dirs: Vec<PathBuf>,
    /// v1: the directory in the freezer hierarchy, if that is used.
    freezer_dir: Option<PathBuf>,
}

impl CgroupManager {
    /// Detects the cgroup layout and prepares this server's subtree (see the module documentation).
    /// `Ok(None)` when no usable hierarchy is writable; the reason is logged.
    pub fn detect() -> Result<Option<CgroupManager>, CgroupError> {
        let pid = std::process::id();
        Self::detect_with(&own_subtree_name(), pid_i32(pid))
    }

    /// [`detect`](Self::detect) with the subtree `claude-agent-http-<pid>-<scope>`, for tests in this
    /// crate: [`detect`](Self::detect) gives every caller in one process the same subtree, so one
    /// test's [`shutdown`](Self::shutdown) would end another's cgroups. `scope` is `[A-Za-z0-9_-]+`.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn detect_scoped(scope: &str) -> Result<Option<CgroupManager>, CgroupError> {
        validate_child_name(scope).map_err(|source| CgroupError::InvalidName { name: scope.to_owned(), source })?;
        let pid = std::process::id();
        Self::detect_with(&format!("{SUBTREE_PREFIX}{pid}-{scope}"), pid_i32(pid))
    }

    /// [`detect`](Self::detect) with an explicit subtree name (which must start with
    /// `claude-agent-http-<own pid>`) and the pid of the process that counts as the server (moved into
    /// the v2 supervisor leaf if needed).
    fn detect_with(subtree_name: &str, server_pid: i32) -> Result<Option<CgroupManager>, CgroupError> {
        let proc_cgroup = match fs::read_to_string("/proc/self/cgroup") {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(error = %e, "cgroups disabled: cannot read /proc/self/cgroup");
                return Ok(None);
            }
        };
        let mountinfo = match fs::read_to_string("/proc/self/mountinfo") {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(error = %e, "cgroups disabled: cannot read /proc/self/mountinfo");
                return Ok(None);
            }
        };
        let layout = discover(&proc_cgroup, &mountinfo);
        let mut reasons = Vec::new();

        let v2_dir = layout.v2.iter().find(|dir| dir.is_dir()).cloned();
        let v2_controllers = v2_dir.as_ref().map(|dir| read_list(&dir.join("cgroup.controllers"))).unwrap_or_default();
        let v2_limits = v2_controllers.contains(MEMORY) && v2_controllers.contains(PIDS);
        if let (Some(dir), true) = (&v2_dir, v2_limits)
            && let Some(manager) = Self::prepare_v2(dir, subtree_name, server_pid, &V2_CONTROLLERS, &mut reasons)?
        {
            return Ok(Some(manager));
        }
        if layout.v1.is_empty() {
            reasons.push("no cgroup v1 hierarchy with memory, pids, cpu or freezer contains this process".to_owned());
        } else if let Some(manager) = Self::prepare_v1(&layout.v1, subtree_name, &mut reasons)? {
            return Ok(Some(manager));
        }
        match &v2_dir {
            Some(dir) if !v2_limits => {
                reasons.push(format!(
                    "{} lacks the memory and pids controllers",
                    dir.join("cgroup.controllers").display()
                ));
                if let Some(manager) = Self::prepare_v2(dir, subtree_name, server_pid, &V2_CONTROLLERS, &mut reasons)? {
                    return Ok(Some(manager));
                }
            }
            Some(_) => {}
            None => reasons.push("no cgroup2 mount contains this process's cgroup".to_owned()),
        }
        tracing::warn!(reasons = %reasons.join("; "), "cgroups disabled: no usable cgroup hierarchy is writable");
        Ok(None)
    }

    /// Builds a v1 manager from the own cgroup directory of each hierarchy and its controllers.
    fn prepare_v1(
        hierarchies: &[(PathBuf, BTreeSet<&'static str>)],
        subtree_name: &str,
        reasons: &mut Vec<String>,
    ) -> Result<Option<CgroupManager>, CgroupError> {
        let mut usable = Vec::new();
        let mut created = Vec::new();
        for (own_dir, controllers) in hierarchies {
            let names = controllers.iter().copied().collect::<Vec<_>>().join(",");
            if !own_dir.is_dir() {
                reasons.push(format!("v1 {names}: {} is not a directory", own_dir.display()));
                continue;
            }
            let subtree = own_dir.join(subtree_name);
            match mkdir_cgroup(&subtree) {
                Ok(new) => {
                    if new {
                        created.push(subtree.clone());
                    }
                    usable.push(Hierarchy { own_dir: own_dir.clone(), subtree, controllers: controllers.clone() });
                }
                Err(e) if not_permitted(&e) => {
                    reasons.push(format!("v1 {names}: cannot create {}: {e}", subtree.display()))
                }
                Err(e) => {
                    remove_dirs(&created);
                    return Err(CgroupError::Io { op: "mkdir", path: subtree, source: e });
                }
            }
        }
        let has = |c: &str| usable.iter().any(|h| h.controllers.contains(c));
        if !(has(MEMORY) || has(PIDS) && has(FREEZER)) {
            remove_dirs(&created);
            reasons.push("v1: neither memory nor pids+freezer is writable".to_owned());
            return Ok(None);
        }
        let manager =
            CgroupManager { version: CgroupVersion::V1, hierarchies: usable, v2_changes: V2Changes::default() };
        manager.clean_stale();
        tracing::info!(
            version = "v1",
            controllers = %manager.controllers().join(","),
            subtrees = ?manager.hierarchies.iter().map(|h| &h.subtree).collect::<Vec<_>>(),
            "cgroup subtree ready"
        );
        Ok(Some(manager))
    }

    /// Builds a v2 manager beneath `own_dir`, enabling those of `wanted` that the own cgroup offers.
    fn prepare_v2(
        own_dir: &Path,
        subtree_name: &str,
        server_pid: i32,
        wanted: &[&'static str],
        reasons: &mut Vec<String>,
    ) -> Result<Option<CgroupManager>, CgroupError> {
        let subtree = own_dir.join(subtree_name);
        match mkdir_cgroup(&subtree) {
            Ok(_) => {}
            Err(e) if not_permitted(&e) => {
                reasons.push(format!("v2: cannot create {}: {e}", subtree.display()));
                return Ok(None);
            }
            Err(e) => return Err(CgroupError::Io { op: "mkdir", path: subtree, source: e }),
        }
        let offered = read_list(&own_dir.join("cgroup.controllers"));
        let available: Vec<&'static str> = wanted.iter().copied().filter(|c| offered.contains(*c)).collect();
        let mut manager = CgroupManager {
            version: CgroupVersion::V2,
            hierarchies: vec![Hierarchy { own_dir: own_dir.to_path_buf(), subtree, controllers: BTreeSet::new() }],
            v2_changes: V2Changes::default(),
        };
        manager.clean_stale();
        if !available.is_empty() {
            match manager.enable_v2_controllers(server_pid, &available) {
                Ok(()) => manager.hierarchies[0].controllers = available.iter().copied().collect(),
                Err(reason) => {
                    manager.v2_changes = manager.restore_v2();
                    tracing::warn!(
                        cgroup = %own_dir.display(),
                        controllers = %available.join(","),
                        %reason,
                        "cgroup v2 controllers cannot be enabled: user cgroups get no resource limits, only cgroup.kill"
                    );
                }
            }
        }
        tracing::info!(
            version = "v2",
            controllers = %manager.controllers().join(","),
            subtree = %manager.hierarchies[0].subtree.display(),
            supervisor_leaf = manager.v2_changes.moved.is_some(),
            "cgroup subtree ready"
        );
        Ok(Some(manager))
    }

    /// Enables `controllers` in the own cgroup and in the subtree, moving `server_pid` into the
    /// supervisor leaf when the own cgroup holds processes (see the module documentation). Records
    /// what it changed in `v2_changes`; the caller undoes it on error.
    fn enable_v2_controllers(&mut self, server_pid: i32, controllers: &[&'static str]) -> Result<(), String> {
        let own_dir = self.hierarchies[0].own_dir.clone();
        let subtree = self.hierarchies[0].subtree.clone();
        let parent_control = own_dir.join("cgroup.subtree_control");
        let enabled = read_list(&parent_control);
        let missing: Vec<&'static str> = controllers.iter().copied().filter(|c| !enabled.contains(*c)).collect();
        if !missing.is_empty() {
            let line = control_line('+', &missing);
            match write_value(&parent_control, &line) {
                Ok(()) => self.v2_changes.enabled_in_parent = missing,
                Err(e) if is_errno(&e, Errno::BUSY) => {
                    // No internal processes: the server leaves its own cgroup for a leaf of its subtree.
                    let leaf = subtree.join(SUPERVISOR_LEAF);
                    mkdir_cgroup(&leaf).map_err(|e| format!("mkdir {}: {e}", leaf.display()))?;
                    let procs = leaf.join("cgroup.procs");
                    write_value(&procs, &server_pid.to_string())
                        .map_err(|e| format!("moving pid {server_pid} into {}: {e}", procs.display()))?;
                    self.v2_changes.moved = Some(server_pid);
                    tracing::info!(pid = server_pid, leaf = %leaf.display(), "moved the server into its supervisor leaf");
                    let deadline = Instant::now() + ENABLE_TIMEOUT;
                    loop {
                        match write_value(&parent_control, &line) {
                            Ok(()) => {
                                self.v2_changes.enabled_in_parent = missing;
                                break;
                            }
                            Err(e) if is_errno(&e, Errno::BUSY) && Instant::now() < deadline => {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            Err(e) => {
                                return Err(format!(
                                    "writing {line:?} to {}: {e} (other processes run in {})",
                                    parent_control.display(),
                                    own_dir.display()
                                ));
                            }
                        }
                    }
                }
                Err(e) => return Err(format!("writing {line:?} to {}: {e}", parent_control.display())),
            }
        }
        let subtree_control = subtree.join("cgroup.subtree_control");
        let line = control_line('+', controllers);
        write_value(&subtree_control, &line)
            .map_err(|e| format!("writing {line:?} to {}: {e}", subtree_control.display()))
    }

    /// Undoes what `enable_v2_controllers` changed outside the users' cgroups, as far as is safe, and
    /// returns what is left undone: disables the controllers in the subtree (only once no user cgroup
    /// is left, else running users would silently lose their limits), in the own cgroup if this
    /// manager enabled them there and no other child cgroup may rely on them, and moves the server
    /// back into its own cgroup.
    fn restore_v2(&self) -> V2Changes {
        let mut remaining = self.v2_changes.clone();
        let Some(h) = self.hierarchies.first() else { return remaining };
        let users_left = child_dirs(&h.subtree).iter().any(|d| d.file_name().is_some_and(|n| n != SUPERVISOR_LEAF));
        if users_left {
            tracing::warn!(subtree = %h.subtree.display(), "user cgroups remain; leaving the controllers enabled");
            return remaining;
        }
        let subtree_control = h.subtree.join("cgroup.subtree_control");
        let in_subtree: Vec<String> = read_list(&subtree_control).into_iter().collect();
        if !in_subtree.is_empty()
            && let Err(e) = write_value(&subtree_control, &control_line('-', &in_subtree))
        {
            tracing::debug!(path = %subtree_control.display(), error = %e, "cannot disable controllers");
        }
        if !remaining.enabled_in_parent.is_empty() {
            let subtree_name = h.subtree.file_name();
            let others = child_dirs(&h.own_dir).iter().filter(|d| d.file_name() != subtree_name).count();
            if others == 0 {
                let parent_control = h.own_dir.join("cgroup.subtree_control");
                match write_value(&parent_control, &control_line('-', &remaining.enabled_in_parent)) {
                    Ok(()) => remaining.enabled_in_parent.clear(),
                    Err(e) => {
                        tracing::debug!(path = %parent_control.display(), error = %e, "cannot disable controllers")
                    }
                }
            }
        }
        if let Some(pid) = remaining.moved {
            let procs = h.own_dir.join("cgroup.procs");
            let leaf = h.subtree.join(SUPERVISOR_LEAF);
            match write_value(&procs, &pid.to_string()) {
                Ok(()) => {
                    remaining.moved = None;
                    if let Err(e) = fs::remove_dir(&leaf) {
                        tracing::warn!(path = %leaf.display(), error = %e, "cannot remove the supervisor leaf");
                    }
                }
                Err(e) => tracing::info!(
                    pid,
                    leaf = %leaf.display(),
                    error = %e,
                    "the server stays in its supervisor leaf until it exits; the next server's detect removes it"
                ),
            }
        }
        remaining
    }

    /// Which interface this manager drives.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The controllers usable in user cgroups (`memory`, `pids`, `cpu`, and v1 `freezer`); a limit
    /// whose controller is missing makes [`create_user`](Self::create_user) fail.
    pub fn controllers(&self) -> Vec<&'static str> {
        let all = self.hierarchies.iter().flat_map(|h| h.controllers.iter().copied()).collect::<BTreeSet<_>>();
        V1_CONTROLLERS.iter().copied().filter(|c| all.contains(c)).collect()
    }

    /// Creates (or reuses) the cgroup `<subtree>/<name>` in every hierarchy and sets `limits` (a
    /// `None` resets that limit to unlimited when the controller is present). Fails, without leaving a
    /// newly created directory behind, on an invalid name or limit, on a limit whose controller is
    /// unavailable, or when the kernel refuses a value. A name equal to a v1 interface file without a
    /// dot (`tasks`, `notify_on_release`) fails with [`CgroupError::NameCollision`].
    pub fn create_user(&self, name: &str, limits: &CgroupLimits) -> Result<UserCgroup, CgroupError> {
        validate_user_id(name).map_err(|source| CgroupError::InvalidName { name: name.to_owned(), source })?;
        if limits.memory_bytes == Some(0) || limits.memory_bytes.is_some_and(|b| b > i64::MAX as u64) {
            return Err(CgroupError::InvalidLimit("memory_bytes must be between 1 and 2^63-1"));
        }
        if limits.pids == Some(0) {
            return Err(CgroupError::InvalidLimit("pids must be at least 1"));
        }
        if limits.cpu_percent == Some(0) {
            return Err(CgroupError::InvalidLimit("cpu_percent must be at least 1"));
        }
        let available = self.controllers();
        let needed = [
            (limits.memory_bytes.is_some(), MEMORY),
            (limits.pids.is_some(), PIDS),
            (limits.cpu_percent.is_some(), CPU),
        ];
        if let Some(&(_, controller)) = needed.iter().find(|(set, c)| *set && !available.contains(c)) {
            return Err(CgroupError::ControllerUnavailable { controller });
        }
        let mut created = Vec::new();
        let result = self.populate_user(name, limits, &mut created);
        if let Err(e) = result {
            remove_dirs(&created);
            return Err(e);
        }
        Ok(self.user_group(name))
    }

    fn populate_user(&self, name: &str, limits: &CgroupLimits, created: &mut Vec<PathBuf>) -> Result<(), CgroupError> {
        for h in &self.hierarchies {
            let dir = h.subtree.join(name);
            match fs::create_dir(&dir) {
                Ok(()) => created.push(dir.clone()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if !dir.is_dir() {
                        return Err(CgroupError::NameCollision { name: name.to_owned(), path: dir });
                    }
                }
                Err(e) => return Err(CgroupError::Io { op: "mkdir", path: dir, source: e }),
            }
            match self.version {
                CgroupVersion::V1 => apply_v1_limits(&dir, &h.controllers, limits)?,
                CgroupVersion::V2 => apply_v2_limits(&dir, &h.controllers, limits)?,
            }
        }
        Ok(())
    }

    /// The [`UserCgroup`] named `name` below `base(h)` in every hierarchy.
    fn group_below(&self, name: &str, base: impl Fn(&Hierarchy) -> &Path) -> UserCgroup {
        let dirs = self.hierarchies.iter().map(|h| base(h).join(name)).collect();
        let freezer_dir = match self.version {
            CgroupVersion::V1 => {
                self.hierarchies.iter().find(|h| h.controllers.contains(FREEZER)).map(|h| base(h).join(name))
            }
            CgroupVersion::V2 => None,
        };
        UserCgroup { name: name.to_owned(), version: self.version, dirs, freezer_dir }
    }

    fn user_group(&self, name: &str) -> UserCgroup {
        self.group_below(name, |h| &h.subtree)
    }

    /// Removes the subtrees of servers that no longer run (see the module documentation).
    fn clean_stale(&self) {
        let own_pid = std::process::id();
        let own_namespace = own_pid_namespace();
        let mut stale = BTreeSet::new();
        for h in &self.hierarchies {
            for dir in child_dirs(&h.own_dir) {
                let Some(name) = dir.file_name().and_then(|n| n.to_str()) else { continue };
                let Some(pid) = subtree_pid(name) else { continue };
                // A server in another PID namespace (another container
                // sharing this hierarchy) cannot be checked: never touched.
                if u32::try_from(pid).is_ok_and(|p| p == own_pid)
                    || from_another_pid_namespace(name, own_namespace)
                    || pid_alive(pid)
                {
                    continue;
                }
                stale.insert(name.to_owned());
            }
        }
        for name in stale {
            let group = self.group_below(&name, |h| &h.own_dir);
            let group = UserCgroup { dirs: group.dirs.into_iter().filter(|d| d.is_dir()).collect(), ..group };
            tracing::info!(subtree = %name, dirs = ?group.dirs, "removing the cgroup subtree of a server that no longer runs");
            if let Err(e) = group.remove() {
                tracing::warn!(subtree = %name, error = %e, "cannot remove a stale cgroup subtree");
            }
        }
    }

    /// Kills every process in every user cgroup and removes this server's subtree. Errors are logged
    /// (this runs at shutdown); a second call is harmless.
    pub fn shutdown(&self) {
        let mut users = BTreeSet::new();
        for h in &self.hierarchies {
            for dir in child_dirs(&h.subtree) {
                if let Some(name) = dir.file_name().and_then(|n| n.to_str())
                    && name != SUPERVISOR_LEAF
                {
                    users.insert(name.to_owned());
                }
            }
        }
        for name in &users {
            if let Err(e) = self.user_group(name).remove() {
                tracing::warn!(user = %name, error = %e, "cannot remove a user cgroup");
            }
        }
        if self.version == CgroupVersion::V2 {
            // A repeated shutdown redoes these writes harmlessly (no-ops by then).
            self.restore_v2();
        }
        let deadline = Instant::now() + KILL_TIMEOUT;
        for h in &self.hierarchies {
            match rmdir_tree(&h.subtree, deadline) {
                Ok(()) => tracing::info!(subtree = %h.subtree.display(), "cgroup subtree removed"),
                Err(e) => {
                    tracing::warn!(subtree = %h.subtree.display(), error = %e, "cannot remove the cgroup subtree")
                }
            }
        }
    }
}

impl UserCgroup {
    /// The user id this cgroup belongs to.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates (or reuses) the cgroup `<this cgroup>/<name>` in every hierarchy, e.g. one per session,
    /// without limits of its own: the user's limits bound it, and killing or removing the user's
    /// cgroup includes it. `name` is 1–255 characters of `[A-Za-z0-9_-]`. (v2: the user's cgroup
    /// enables no controllers for its children, so the "no internal processes" rule does not apply
    /// and the worker may stay in the user's cgroup itself.)
    pub fn child(&self, name: &str) -> Result<UserCgroup, CgroupError> {
        validate_child_name(name).map_err(|source| CgroupError::InvalidName { name: name.to_owned(), source })?;
        let mut created = Vec::new();
        for dir in &self.dirs {
            let path = dir.join(name);
            match fs::create_dir(&path) {
                Ok(()) => created.push(path),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
                Err(e) => {
                    remove_dirs(&created);
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        return Err(CgroupError::NameCollision { name: name.to_owned(), path });
                    }
                    return Err(CgroupError::Io { op: "mkdir", path, source: e });
                }
            }
        }
        if let Some(freezer) = &self.freezer_dir {
            // A reused cgroup left frozen would freeze the process that joins it.
            let state = freezer.join(name).join("freezer.state");
            if let Err(e) = write_file(&state, "THAWED") {
                remove_dirs(&created);
                return Err(e);
            }
        }
        Ok(UserCgroup {
            name: name.to_owned(),
            version: self.version,
            dirs: self.dirs.iter().map(|d| d.join(name)).collect(),
            freezer_dir: self.freezer_dir.as_ref().map(|d| d.join(name)),
        })
    }

    /// The `cgroup.procs` files a process writes its pid into to join (one per v1 hierarchy, or the
    /// single v2 file). A worker must join all of them, before it drops privileges.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Pids currently in the cgroup and any cgroup below it (union over hierarchies, sorted).
    /// Unreadable or missing directories count as empty.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = BTreeSet::new();
        for dir in &self.dirs {
            collect_pids(dir, &mut pids);
        }
        pids.into_iter().collect()
    }

    /// Kills everything inside, including daemons that left the session (see the module
    /// documentation), waiting until the cgroup is empty, for at most two seconds.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let start = Instant::now();
        let deadline = start + KILL_TIMEOUT;
        let own = std::process::id();
        if self.pids().iter().any(|&p| u32::try_from(p).is_ok_and(|p| p == own)) {
            return Err(CgroupError::ContainsSelf { path: self.first_dir() });
        }
        if self.version == CgroupVersion::V2
            && let Some(kill) = self.dirs.first().map(|d| d.join("cgroup.kill")).filter(|k| k.exists())
        {
            return self.kill_v2(&kill, start, deadline);
        }
        let freezer = match (self.version, &self.freezer_dir) {
            (CgroupVersion::V1, Some(dir)) => Some(Freezer::V1(dir.clone())),
            (CgroupVersion::V2, _) => {
                self.dirs.first().filter(|d| d.join("cgroup.freeze").exists()).cloned().map(Freezer::V2)
            }
            (CgroupVersion::V1, None) => None,
        };
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::KillTimeout { path: self.first_dir(), waited: start.elapsed(), pids });
            }
            if let Some(freezer) = &freezer {
                freezer.freeze(deadline);
            }
            for pid in self.pids() {
                sigkill(pid);
            }
            if let Some(freezer) = &freezer {
                freezer.thaw();
            }
            self.wait_empty(deadline.min(Instant::now() + Duration::from_millis(200)));
        }
    }

    fn kill_v2(&self, kill: &Path, start: Instant, deadline: Instant) -> Result<(), CgroupError> {
        loop {
            match write_value(kill, "1") {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) => return Err(CgroupError::Io { op: "write", path: kill.to_path_buf(), source: e }),
            }
            if self.wait_empty(deadline.min(Instant::now() + Duration::from_millis(500))) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let pids = self.pids();
                return Err(CgroupError::KillTimeout { path: self.first_dir(), waited: start.elapsed(), pids });
            }
        }
    }

    /// Polls until no pid is left or `until`; true when empty.
    fn wait_empty(&self, until: Instant) -> bool {
        loop {
            if self.pids().is_empty() {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// [`kill_all`](Self::kill_all), then removes the user's cgroup (and anything below it) in every
    /// hierarchy. Missing directories are fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        self.kill_all()?;
        let deadline = Instant::now() + KILL_TIMEOUT;
        let mut first_error = None;
        for dir in &self.dirs {
            if let Err(e) = rmdir_tree(dir, deadline) {
                first_error.get_or_insert(CgroupError::Io { op: "rmdir", path: dir.clone(), source: e });
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn first_dir(&self) -> PathBuf {
        self.dirs.first().cloned().unwrap_or_default()
    }
}

/// A freezer of a cgroup and its descendants.
#[derive(Debug)]
enum Freezer {
    /// v1: the cgroup's directory in the freezer hierarchy (`freezer.state`).
    V1(PathBuf),
    /// v2: the cgroup's directory (`cgroup.freeze`, `cgroup.events`).
    V2(PathBuf),
}

impl Freezer {
    /// Freezes and waits until frozen (at most half a second or `deadline`); failures are logged, the
    /// kill loop goes on regardless and repeats if something escaped.
    fn freeze(&self, deadline: Instant) {
        let (file, value) = match self {
            Freezer::V1(dir) => (dir.join("freezer.state"), "FROZEN"),
            Freezer::V2(dir) => (dir.join("cgroup.freeze"), "1"),
        };
        if let Err(e) = write_value(&file, value) {
            tracing::debug!(path = %file.display(), error = %e, "cannot freeze");
            return;
        }
        let until = deadline.min(Instant::now() + Duration::from_millis(500));
        loop {
            let frozen = match self {
                Freezer::V1(dir) => fs::read_to_string(dir.join("freezer.state")).is_ok_and(|s| s.trim() == "FROZEN"),
                Freezer::V2(dir) => fs::read_to_string(dir.join("cgroup.events"))
                    .is_ok_and(|s| s.lines().any(|l| l.trim() == "frozen 1")),
            };
            if frozen || Instant::now() >= until {
                if !frozen {
                    tracing::debug!(path = %file.display(), "cgroup not frozen in time; killing anyway");
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Thaws the cgroup and every cgroup below it (a descendant frozen on its own stays frozen when
    /// only its parent is thawed).
    fn thaw(&self) {
        let (root, file, value) = match self {
            Freezer::V1(dir) => (dir, "freezer.state", "THAWED"),
            Freezer::V2(dir) => (dir, "cgroup.freeze", "0"),
        };
        let mut dirs = vec![root.clone()];
        let mut i = 0;
        while i < dirs.len() {
            let children = child_dirs(&dirs[i]);
            dirs.extend(children);
            i += 1;
        }
        for dir in dirs {
            let path = dir.join(file);
            if let Err(e) = write_value(&path, value)
                && !is_not_found(&e)
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot thaw");
            }
        }
    }
}

/// A child cgroup's name: like a user id, but up to 255 characters (`NAME_MAX`), since it may embed a
/// session id.
fn validate_child_name(name: &str) -> Result<(), NameError> {
    const MAX: usize = 255;
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX {
        return Err(NameError::TooLong { max: MAX, got: name.chars().count() });
    }
    match name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        Some(c) => Err(NameError::BadCharacter(c)),
        None => Ok(()),
    }
}

/// Writes v1 limits for the controllers bound to this hierarchy.
fn apply_v1_limits(dir: &Path, controllers: &BTreeSet<&'static str>, limits: &CgroupLimits) -> Result<(), CgroupError> {
    if controllers.contains(MEMORY) {
        let value = limits.memory_bytes.map_or_else(|| "-1".to_owned(), |b| b.to_string());
        let limit = dir.join("memory.limit_in_bytes");
        let memsw = dir.join("memory.memsw.limit_in_bytes");
        let has_memsw = memsw.exists();
        // memsw (memory + swap) must stay >= limit: lowering sets the limit first, raising memsw first.
        match write_value(&limit, &value) {
            Ok(()) if has_memsw => write_file(&memsw, &value)?,
            Ok(()) => tracing::debug!(path = %dir.display(), "no memory.memsw.limit_in_bytes (swap accounting off)"),
            Err(e) if has_memsw && is_errno(&e, Errno::INVAL) => {
                write_file(&memsw, &value)?;
                write_file(&limit, &value)?;
            }
            Err(e) => return Err(CgroupError::Io { op: "write", path: limit, source: e }),
        }
    }
    if controllers.contains(PIDS) {
        write_file(&dir.join("pids.max"), &limits.pids.map_or_else(|| "max".to_owned(), |n| n.to_string()))?;
    }
    if controllers.contains(CPU) {
        write_file(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
        let quota = limits.cpu_percent.map_or_else(|| "-1".to_owned(), |p| cpu_quota_us(p).to_string());
        write_file(&dir.join("cpu.cfs_quota_us"), &quota)?;
    }
    if controllers.contains(FREEZER) {
        // A reused cgroup left frozen would freeze the worker that joins it.
        write_file(&dir.join("freezer.state"), "THAWED")?;
    }
    Ok(())
}

/// Writes v2 limits for the controllers enabled in the subtree.
fn apply_v2_limits(dir: &Path, controllers: &BTreeSet<&'static str>, limits: &CgroupLimits) -> Result<(), CgroupError> {
    if controllers.contains(MEMORY) {
        write_file(&dir.join("memory.max"), &limits.memory_bytes.map_or_else(|| "max".to_owned(), |b| b.to_string()))?;
        let swap = dir.join("memory.swap.max");
        if swap.exists() {
            write_file(&swap, if limits.memory_bytes.is_some() { "0" } else { "max" })?;
        } else {
            tracing::debug!(path = %dir.display(), "no memory.swap.max (swap accounting off)");
        }
        let oom_group = dir.join("memory.oom.group");
        if oom_group.exists() {
            write_file(&oom_group, "1")?;
        }
    }
    if controllers.contains(PIDS) {
        write_file(&dir.join("pids.max"), &limits.pids.map_or_else(|| "max".to_owned(), |n| n.to_string()))?;
    }
    if controllers.contains(CPU) {
        let quota = limits.cpu_percent.map_or_else(|| "max".to_owned(), |p| cpu_quota_us(p).to_string());
        write_file(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
    }
    Ok(())
}

fn cpu_quota_us(percent: u32) -> u64 {
    u64::from(percent) * CPU_PERIOD_US / 100
}

/// `+memory +pids` / `-memory -pids`.
fn control_line<S: AsRef<str>>(sign: char, controllers: &[S]) -> String {
    controllers.iter().map(|c| format!("{sign}{}", c.as_ref())).collect::<Vec<_>>().join(" ")
}

/// Writes `value` in one `write(2)`, as cgroupfs expects.
fn write_value(path: &Path, value: &str) -> io::Result<()> {
    let mut file = fs::OpenOptions::new().write(true).open(path)?;
    file.write_all(value.as_bytes())
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    write_value(path, value).map_err(io_error("write", path))
}

/// The whitespace-separated words of a file such as `cgroup.controllers`; empty if unreadable.
fn read_list(path: &Path) -> BTreeSet<String> {
    fs::read_to_string(path).map(|s| s.split_whitespace().map(str::to_owned).collect()).unwrap_or_default()
}

/// Creates a cgroup directory; `Ok(false)` if it already exists as a directory.
fn mkdir_cgroup(path: &Path) -> io::Result<bool> {
    match fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Best-effort removal of directories this module just created (in reverse order).
fn remove_dirs(dirs: &[PathBuf]) {
    for dir in dirs.iter().rev() {
        if let Err(e) = fs::remove_dir(dir) {
            tracing::warn!(path = %dir.display(), error = %e, "cannot remove a cgroup created moments ago");
        }
    }
}

/// Removes a cgroup and its descendants (deepest first), retrying `EBUSY` (processes still exiting)
/// until `deadline`. A missing directory is fine.
fn rmdir_tree(dir: &Path, deadline: Instant) -> io::Result<()> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    rmdir_tree(&entry.path(), deadline)?;
                }
            }
        }
        Err(e) if is_not_found(&e) => return Ok(()),
        Err(e) => return Err(e),
    }
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) if is_errno(&e, Errno::BUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The sub-directories (child cgroups) of `dir`; empty if unreadable.
fn child_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect()
}

fn collect_pids(dir: &Path, pids: &mut BTreeSet<i32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()).filter(|&p| p > 0));
    }
    for child in child_dirs(dir) {
        collect_pids(&child, pids);
    }
}

/// SIGKILL, ignoring processes that are already gone; never the calling process or pid 1.
fn sigkill(pid: i32) {
    if pid <= 1 || u32::try_from(pid).is_ok_and(|p| p == std::process::id()) {
        return;
    }
    let Some(target) = Pid::from_raw(pid) else { return };
    if let Err(e) = rustix::process::kill_process(target, Signal::KILL)
        && e != Errno::SRCH
    {
        tracing::debug!(pid, error = %e, "kill failed");
    }
}

/// True unless the kernel says no such process (`EPERM` means it exists).
fn pid_alive(pid: i32) -> bool {
    match Pid::from_raw(pid) {
        Some(target) => rustix::process::test_kill_process(target) != Err(Errno::SRCH),
        None => true,
    }
}

/// The PID namespace of this process (the inode of `/proc/self/ns/pid`).
fn own_pid_namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// `claude-agent-http-<pid>-pidns<inode>`: the pid means something only in
/// the PID namespace named after it.
fn own_subtree_name() -> String {
    let pid = std::process::id();
    match own_pid_namespace() {
        Some(namespace) => format!("{SUBTREE_PREFIX}{pid}-pidns{namespace}"),
        None => format!("{SUBTREE_PREFIX}{pid}"),
    }
}

/// Whether a subtree name says its server ran in another PID namespace,
/// where its pid cannot be checked from here.
fn from_another_pid_namespace(name: &str, own_namespace: Option<u64>) -> bool {
    let Some((_, namespace)) = name.rsplit_once("-pidns") else { return false };
    let namespace = namespace.split('-').next().and_then(|n| n.parse::<u64>().ok());
    namespace.is_some() && namespace != own_namespace
}

/// The pid in a subtree name `claude-agent-http-<pid>[-<suffix>]`.
fn subtree_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(SUBTREE_PREFIX)?;
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    let (digits, suffix) = rest.split_at(end);
    if digits.is_empty() || !(suffix.is_empty() || suffix.starts_with('-')) {
        return None;
    }
    digits.parse().ok().filter(|&p: &i32| p > 0)
}

fn pid_i32(pid: u32) -> i32 {
    i32::try_from(pid).unwrap_or(i32::MAX)
}

fn is_errno(e: &io::Error, errno: Errno) -> bool {
    e.raw_os_error() == Some(errno.raw_os_error())
}

fn is_not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// Errors meaning "this hierarchy is not ours to write" (no delegation, read-only mount).
fn not_permitted(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem)
}

/// Where this process's cgroups are, from `/proc/self/cgroup` and `/proc/self/mountinfo`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Layout {
    /// v1: the own cgroup's directory in each hierarchy holding some of [`V1_CONTROLLERS`].
    v1: Vec<(PathBuf, BTreeSet<&'static str>)>,
    /// v2: the own cgroup's directory under each cgroup2 mount that contains it.
    v2: Vec<PathBuf>,
}

/// One line of `/proc/self/mountinfo`, the fields this module needs.
#[derive(Debug)]
struct Mount {
    /// The path inside the filesystem (for cgroupfs, the cgroup) that is mounted.
    root: String,
    mount_point: PathBuf,
    fs_type: String,
    super_options: Vec<String>,
}

fn discover(proc_cgroup: &str, mountinfo: &str) -> Layout {
    // `<id>:<controllers>:<path>`; v2 is `0::<path>`.
    let mut v1_paths: BTreeMap<&str, &str> = BTreeMap::new();
    let mut v2_path = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if id == "0" && controllers.is_empty() {
            v2_path = Some(path);
        } else {
            for controller in controllers.split(',') {
                v1_paths.insert(controller, path);
            }
        }
    }
    let mounts: Vec<Mount> = mountinfo.lines().filter_map(parse_mount).collect();
    let mut layout = Layout::default();
    let mut assigned = BTreeSet::new();
    for mount in mounts.iter().filter(|m| m.fs_type == "cgroup") {
        let here: BTreeSet<&'static str> = V1_CONTROLLERS
            .iter()
            .copied()
            .filter(|c| !assigned.contains(c) && mount.super_options.iter().any(|o| o == c))
            .collect();
        let Some(first) = here.iter().next() else { continue };
        let Some(path) = v1_paths.get(first) else { continue };
        let Some(dir) = cgroup_dir(mount, path) else { continue };
        assigned.extend(here.iter().copied());
        layout.v1.push((dir, here));
    }
    if let Some(path) = v2_path {
        for mount in mounts.iter().filter(|m| m.fs_type == "cgroup2") {
            if let Some(dir) = cgroup_dir(mount, path) {
                layout.v2.push(dir);
            }
        }
    }
    layout
}

/// `<id> <parent> <major:minor> <root> <mount point> <options> [optional...] - <type> <source> <super options>`
fn parse_mount(line: &str) -> Option<Mount> {
    let fields: Vec<&str> = line.split(' ').collect();
    let separator = fields.iter().skip(6).position(|f| *f == "-")? + 6;
    Some(Mount {
        root: String::from_utf8_lossy(&unescape(fields.get(3)?)).into_owned(),
        mount_point: PathBuf::from(OsString::from_vec(unescape(fields.get(4)?))),
        fs_type: (*fields.get(separator + 1)?).to_owned(),
        super_options: fields.get(separator + 3)?.split(',').map(str::to_owned).collect(),
    })
}

/// Undoes mountinfo's octal escapes (`\040` is a space).
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value = bytes[i + 1..i + 4].iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// The directory of cgroup `path` under `mount`, if the mount contains it.
fn cgroup_dir(mount: &Mount, path: &str) -> Option<PathBuf> {
    if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        // Outside this cgroup namespace's view.
        return None;
    }
    let relative = if mount.root == "/" {
        path
    } else {
        let rest = path.strip_prefix(mount.root.as_str())?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        rest
    };
    let relative = relative.trim_start_matches('/');
    Some(if relative.is_empty() { mount.mount_point.clone() } else { mount.mount_point.join(relative) })
}

#[cfg(test)]
mod tests {
    //! Kernel tests: they run as root on the v1 hybrid test machine (SANDBOX.md) and panic with a
    //! clear message elsewhere. Each test builds its own manager with the subtree
    //! `claude-agent-http-<pid>-<test>` (see the module documentation), shut down on drop.

    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command, Stdio};

    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn require_root() {
        assert!(
            rustix::process::geteuid().is_root(),
            "the cgroup tests create cgroups and move processes: run them as root"
        );
        assert!(
            Path::new("/sys/fs/cgroup").is_dir() && Path::new("/proc/self/cgroup").is_file(),
            "the cgroup tests need a cgroup filesystem at /sys/fs/cgroup and /proc/self/cgroup"
        );
    }

    fn own_pid() -> u32 {
        std::process::id()
    }

    fn subtree_name(tag: &str) -> String {
        format!("{SUBTREE_PREFIX}{}-{tag}", own_pid())
    }

    fn real_layout() -> Layout {
        let proc_cgroup = fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
        discover(&proc_cgroup, &mountinfo)
    }

    /// A manager plus the processes a test started; everything is killed and removed on drop.
    struct Fixture {
        manager: CgroupManager,
        children: Vec<Child>,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            // Thaw everything first, independently of the code under test: waiting for a SIGKILLed
            // child in a frozen cgroup would hang instead of letting the failure show.
            let mut dirs: Vec<PathBuf> = self.manager.hierarchies.iter().map(|h| h.subtree.clone()).collect();
            while let Some(dir) = dirs.pop() {
                let _ = write_value(&dir.join("freezer.state"), "THAWED");
                let _ = write_value(&dir.join("cgroup.freeze"), "0");
                dirs.extend(child_dirs(&dir));
            }
            for child in &mut self.children {
                let _ = child.kill();
                let _ = child.wait();
            }
            self.manager.shutdown();
        }
    }

    impl Fixture {
        /// A v1 manager through the real detection, with its own subtree.
        fn v1(tag: &str) -> Fixture {
            require_root();
            let manager = CgroupManager::detect_scoped(tag).expect("detect failed").expect(
                "detect found no usable cgroup hierarchy (SANDBOX.md: this machine has v1 memory, pids, cpu, freezer)",
            );
            assert_eq!(manager.version(), CgroupVersion::V1, "these tests target the v1 hybrid machine of SANDBOX.md");
            Fixture { manager, children: Vec::new() }
        }

        /// `sh -c script`, started only once a line arrives on its stdin (see [`release`]), so that it
        /// can be moved into a cgroup before it forks anything.
        fn gated_sh(&mut self, script: &str) -> u32 {
            let child = Command::new("sh")
                .arg("-c")
                .arg(format!("read _gate; {script}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn sh");
            let pid = child.id();
            self.children.push(child);
            pid
        }

        fn child(&mut self, pid: u32) -> &mut Child {
            self.children.iter_mut().find(|c| c.id() == pid).expect("a child of this fixture")
        }

        fn release(&mut self, pid: u32) {
            let mut stdin = self.child(pid).stdin.take().expect("stdin");
            stdin.write_all(b"go\n").expect("release the gated shell");
        }

        /// Waits for the child to exit (at most 5 s) and returns how it ended.
        fn wait_exit(&mut self, pid: u32) -> std::process::ExitStatus {
            let child = self.child(pid);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    return status;
                }
                assert!(Instant::now() < deadline, "child {pid} still running after 5 s");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// What a worker does: writes its pid into every `cgroup.procs`.
    fn join(group: &UserCgroup, pid: u32) {
        for file in group.procs_files() {
            fs::write(&file, pid.to_string()).unwrap_or_else(|e| panic!("join {}: {e}", file.display()));
        }
    }

    fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Gone, or a zombie nobody reaped yet: either way no longer running.
    fn dead(pid: i32) -> bool {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        }
    }

    /// The session id of `pid` as /proc shows it to us. Not getsid(2) through rustix: when our own
    /// session leader lives outside our PID namespace (CI containers), the kernel answers 0 and
    /// rustix panics on it. A `setsid` child is its own leader, so its value is always visible.
    fn session_of(pid: i32) -> i32 {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_else(|e| panic!("stat {pid}: {e}"));
        // After "pid (comm)": state ppid pgrp session ...
        let fields: Vec<&str> = stat.rsplit(')').next().expect("stat").split_whitespace().collect();
        fields[3].parse().expect("session field")
    }

    fn read_trimmed(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())).trim().to_owned()
    }

    /// The file `file` of the user's cgroup in the hierarchy holding `controller`.
    fn v1_file(manager: &CgroupManager, user: &str, controller: &str, file: &str) -> PathBuf {
        let h = manager
            .hierarchies
            .iter()
            .find(|h| h.controllers.contains(controller))
            .unwrap_or_else(|| panic!("no v1 {controller} hierarchy (SANDBOX.md lists it)"));
        h.subtree.join(user).join(file)
    }

    /// The `0::` line of `/proc/<pid>/cgroup`.
    fn v2_cgroup_of(pid: u32) -> String {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read /proc/<pid>/cgroup");
        text.lines().find_map(|l| l.strip_prefix("0::")).expect("a 0:: line").to_owned()
    }

    #[test]
    fn parses_proc_cgroup_and_mountinfo() {
        // This machine's hybrid layout (SANDBOX.md), trimmed.
        let proc_cgroup =
            "9:name=systemd:/\n8:pids:/\n6:freezer:/\n4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n";
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let layout = discover(proc_cgroup, mountinfo);
        let v1: Vec<(String, Vec<&str>)> =
            layout.v1.iter().map(|(d, c)| (d.display().to_string(), c.iter().copied().collect())).collect();
        assert_eq!(
            v1,
            vec![
                ("/sys/fs/cgroup/cpu".to_owned(), vec!["cpu"]),
                ("/sys/fs/cgroup/memory/process_api/abc".to_owned(), vec!["memory"]),
                ("/sys/fs/cgroup/freezer".to_owned(), vec!["freezer"]),
                ("/sys/fs/cgroup/pids".to_owned(), vec!["pids"]),
            ]
        );
        assert_eq!(layout.v2, vec![PathBuf::from("/sys/fs/cgroup/unified")]);

        // A container without a cgroup namespace: mount roots are the container's cgroup, a combined
        // cpu,cpuacct hierarchy, optional fields, an escaped space, and a mount that does not contain us.
        let proc_cgroup = "5:cpu,cpuacct:/docker/c1/app\n4:memory:/docker/c1\n3:pids:/elsewhere\n";
        let mountinfo = "\
50 40 0:40 /docker/c1 /sys/fs/cgroup/cpu,cpuacct rw shared:9 - cgroup cgroup rw,cpu,cpuacct
51 40 0:41 /docker/c1 /sys/fs/my\\040cgroups/memory rw - cgroup cgroup rw,memory
52 40 0:42 /docker/c1 /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
";
        let layout = discover(proc_cgroup, mountinfo);
        let v1: Vec<(String, Vec<&str>)> =
            layout.v1.iter().map(|(d, c)| (d.display().to_string(), c.iter().copied().collect())).collect();
        assert_eq!(
            v1,
            vec![
                ("/sys/fs/cgroup/cpu,cpuacct/app".to_owned(), vec!["cpu"]),
                ("/sys/fs/my cgroups/memory".to_owned(), vec!["memory"]),
            ]
        );
        assert!(layout.v2.is_empty());

        // Pure v2 under systemd; and a cgroup outside the namespace's view.
        let mountinfo = "25 20 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let layout = discover("0::/system.slice/claude.service\n", mountinfo);
        assert_eq!(layout.v2, vec![PathBuf::from("/sys/fs/cgroup/system.slice/claude.service")]);
        assert!(layout.v1.is_empty());
        assert!(discover("0::/../other\n", mountinfo).v2.is_empty());

        assert_eq!(subtree_pid("claude-agent-http-123"), Some(123));
        assert_eq!(subtree_pid("claude-agent-http-123-test-x"), Some(123));
        assert_eq!(subtree_pid("claude-agent-http-123x"), None);
        assert_eq!(subtree_pid("claude-agent-http-"), None);
        assert_eq!(subtree_pid("claude-agent-http-0"), None);
        assert_eq!(subtree_pid("other-123"), None);
        assert_eq!(cpu_quota_us(100), 100_000);
        assert_eq!(cpu_quota_us(250), 250_000);
        assert_eq!(control_line('+', &["memory", "pids"]), "+memory +pids");
    }

    #[test]
    fn create_user_sets_and_resets_v1_limits() {
        let fx = Fixture::v1("limits");
        let m = &fx.manager;
        let own_memory = real_layout().v1.into_iter().find(|(_, c)| c.contains(MEMORY)).expect("v1 memory").0;
        let limits = CgroupLimits { memory_bytes: Some(64 * MIB), pids: Some(10), cpu_percent: Some(50) };
        let user = m.create_user("limits-user", &limits).expect("create_user");
        assert_eq!(user.name(), "limits-user");
        assert_eq!(user.procs_files().len(), m.hierarchies.len());
        // Beneath the cgroup the process runs in, never elsewhere.
        let memory_dir = v1_file(m, "limits-user", MEMORY, "");
        assert!(memory_dir.starts_with(&own_memory), "{} not under {}", memory_dir.display(), own_memory.display());
        assert_eq!(read_trimmed(&v1_file(m, "limits-user", MEMORY, "memory.limit_in_bytes")), (64 * MIB).to_string());
        assert_eq!(
            read_trimmed(&v1_file(m, "limits-user", MEMORY, "memory.memsw.limit_in_bytes")),
            (64 * MIB).to_string()
        );
        assert_eq!(read_trimmed(&v1_file(m, "limits-user", PIDS, "pids.max")), "10");
        assert_eq!(read_trimmed(&v1_file(m, "limits-user", CPU, "cpu.cfs_period_us")), "100000");
        assert_eq!(read_trimmed(&v1_file(m, "limits-user", CPU, "cpu.cfs_quota_us")), "50000");
        assert_eq!(read_trimmed(&v1_file(m, "limits-user", FREEZER, "freezer.state")), "THAWED");

        // Raising memory needs memsw first; the reuse path must handle it.
        let raised = CgroupLimits { memory_bytes: Some(128 * MIB), pids: Some(20), cpu_percent: Some(200) };
        m.create_user("limits-user", &raised).expect("reuse with higher limits");
        assert_eq!(read_trimmed(&v1_file(m, "limits-user", MEMORY, "memory.limit_in_bytes")), (128 * MIB).to_string());
        assert_eq!(
            read_trimmed(&v1_file(m, "limits-user", MEMORY, "memory.memsw.limit_in_bytes")),
            (128 * MIB).to_string()
        );
        assert_eq!(read_trimmed(&v1_file(m, "limits-user", CPU, "cpu.cfs_quota_us")), "200000");

        // None resets to unlimited.
        m.create_user("limits-user", &CgroupLimits::default()).expect("reuse without limits");
        let unlimited: u64 =
            read_trimmed(&v1_file(m, "limits-user", MEMORY, "memory.limit_in_bytes")).parse().expect("number");
        assert!(unlimited > 1 << 62, "memory limit not reset: {unlimited}");
        assert_eq!(read_trimmed(&v1_file(m, "limits-user", PIDS, "pids.max")), "max");
        assert_eq!(read_trimmed(&v1_file(m, "limits-user", CPU, "cpu.cfs_quota_us")), "-1");

        user.remove().expect("remove");
        for dir in &user.dirs {
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
    }

    #[test]
    fn invalid_names_and_limits_are_refused_without_leftovers() {
        let fx = Fixture::v1("invalid");
        let m = &fx.manager;
        let long = "a".repeat(65);
        for name in ["", ".", "..", "a/b", "a b", "ü", "supervisor.leaf", long.as_str()] {
            match m.create_user(name, &CgroupLimits::default()) {
                Err(CgroupError::InvalidName { .. }) => {}
                other => panic!("{name:?}: expected InvalidName, got {other:?}"),
            }
        }
        assert!(m.create_user(&"a".repeat(64), &CgroupLimits::default()).is_ok());
        // v1 interface files without a dot.
        match m.create_user("tasks", &CgroupLimits::default()) {
            Err(CgroupError::NameCollision { .. }) => {}
            other => panic!("expected NameCollision, got {other:?}"),
        }
        for limits in [
            CgroupLimits { memory_bytes: Some(0), ..CgroupLimits::default() },
            CgroupLimits { pids: Some(0), ..CgroupLimits::default() },
            CgroupLimits { cpu_percent: Some(0), ..CgroupLimits::default() },
        ] {
            match m.create_user("zero", &limits) {
                Err(CgroupError::InvalidLimit(_)) => {}
                other => panic!("{limits:?}: expected InvalidLimit, got {other:?}"),
            }
        }
        // The kernel refuses this pids.max after the directories in the other hierarchies exist:
        // they must be removed again.
        let err = m.create_user("refused", &CgroupLimits { pids: Some(u64::MAX), ..CgroupLimits::default() });
        assert!(matches!(err, Err(CgroupError::Io { .. })), "expected the kernel to refuse: {err:?}");
        for h in &m.hierarchies {
            assert!(!h.subtree.join("refused").exists(), "{} left behind", h.subtree.join("refused").display());
            assert!(!h.subtree.join("zero").exists());
        }
    }

    #[test]
    fn child_moved_into_the_cgroup_shows_in_pids() {
        let mut fx = Fixture::v1("pids");
        let user = fx.manager.create_user("pids-user", &CgroupLimits::default()).expect("create_user");
        assert!(user.pids().is_empty());
        let sh = fx.gated_sh("sleep 100 & wait");
        join(&user, sh);
        fx.release(sh);
        // The shell and the sleep it forked after joining.
        wait_until("sh and its sleep in the cgroup", || user.pids().len() == 2);
        let pids = user.pids();
        assert!(pids.contains(&pid_i32(sh)), "{pids:?} lacks {sh}");
        // Every hierarchy, not just one, holds the processes.
        for file in user.procs_files() {
            assert!(read_trimmed(&file).lines().any(|l| l == sh.to_string()), "{} lacks {sh}", file.display());
        }
        user.remove().expect("remove");
        assert_eq!(fx.wait_exit(sh).signal(), Some(9));
        assert!(pids.iter().all(|&p| dead(p)));
    }

    #[test]
    fn pids_max_stops_a_fork_bomb() {
        let mut fx = Fixture::v1("forkbomb");
        let user = fx
            .manager
            .create_user("bomb", &CgroupLimits { pids: Some(10), ..CgroupLimits::default() })
            .expect("create_user");
        let sh = fx.gated_sh("for i in $(seq 50); do sleep 100 & done; wait");
        join(&user, sh);
        fx.release(sh);
        // dash gives up at the first failed fork ("Cannot fork") and exits; the sleeps it started stay.
        let status = fx.wait_exit(sh);
        let running = user.pids();
        let events = read_trimmed(&v1_file(&fx.manager, "bomb", PIDS, "pids.events"));
        let current = read_trimmed(&v1_file(&fx.manager, "bomb", PIDS, "pids.current"));
        user.remove().expect("remove");
        // The sleeps hold the stderr pipe open: read it only once they are dead.
        let mut stderr = String::new();
        fx.child(sh).stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read stderr");
        let denied: u64 = events.strip_prefix("max ").and_then(|n| n.parse().ok()).expect("pids.events: max <n>");
        assert!(denied >= 1, "no fork was refused: pids.events {events:?}");
        assert!(stderr.to_lowercase().contains("fork"), "no fork failure reported: {status:?}, stderr {stderr:?}");
        assert!((5..=10).contains(&running.len()), "expected 5..=10 processes (the sleeps), got {running:?}");
        assert_eq!(current, running.len().to_string());
        assert!(running.iter().all(|&p| dead(p)));
    }

    #[test]
    fn kill_all_kills_a_setsid_daemon_and_remove_leaves_nothing() {
        let mut fx = Fixture::v1("daemon");
        let user = fx.manager.create_user("daemon-user", &CgroupLimits::default()).expect("create_user");
        user.kill_all().expect("kill_all on an empty cgroup");
        let sh = fx.gated_sh("setsid sh -c 'echo $$; exec sleep 100' & sleep 100");
        join(&user, sh);
        fx.release(sh);
        let mut line = String::new();
        BufReader::new(fx.child(sh).stdout.as_mut().expect("stdout")).read_line(&mut line).expect("daemon pid");
        let daemon: i32 = line.trim().parse().expect("daemon pid");
        assert_eq!(session_of(daemon), daemon, "the daemon did not start its own session");
        assert_ne!(session_of(pid_i32(sh)), daemon);
        wait_until("sh, daemon and sleep in the cgroup", || user.pids().len() == 3);
        assert!(user.pids().contains(&daemon));

        user.kill_all().expect("kill_all");
        assert!(user.pids().is_empty());
        assert_eq!(fx.wait_exit(sh).signal(), Some(9));
        wait_until("the daemon to be gone", || dead(daemon));
        assert_eq!(read_trimmed(&v1_file(&fx.manager, "daemon-user", FREEZER, "freezer.state")), "THAWED");

        user.remove().expect("remove");
        for dir in &user.dirs {
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
        user.remove().expect("a second remove finds nothing to do");
    }

    #[test]
    fn session_child_nests_under_the_user_and_dies_with_it() {
        let mut fx = Fixture::v1("child");
        let user = fx
            .manager
            .create_user("child-user", &CgroupLimits { pids: Some(20), ..CgroupLimits::default() })
            .expect("user");
        for name in ["", "a/b", "..", "x.y"] {
            assert!(matches!(user.child(name), Err(CgroupError::InvalidName { .. })), "{name:?} accepted");
        }
        assert!(matches!(user.child("tasks"), Err(CgroupError::NameCollision { .. })));
        let session = user.child(&format!("session-{}", "s".repeat(200))).expect("long session child");
        session.remove().expect("remove the long one");
        let session = user.child("session-1").expect("child");
        assert_eq!(session.procs_files().len(), user.procs_files().len());
        for (child, parent) in session.dirs.iter().zip(&user.dirs) {
            assert_eq!(child.parent(), Some(parent.as_path()));
            assert!(child.is_dir());
        }
        let sh = fx.gated_sh("setsid sleep 100 & sleep 100");
        join(&session, sh);
        fx.release(sh);
        wait_until("sh, setsid sleep and sleep in the session", || session.pids().len() == 3);
        // The user's view includes its sessions; the user's pids.max counts them (hierarchical).
        assert_eq!(user.pids(), session.pids());
        assert_eq!(read_trimmed(&v1_file(&fx.manager, "child-user", PIDS, "pids.current")), "3");
        let pids = session.pids();
        user.kill_all().expect("kill_all of the user kills its sessions");
        assert_eq!(fx.wait_exit(sh).signal(), Some(9));
        wait_until("session processes gone", || pids.iter().all(|&p| dead(p)));
        assert!(session.dirs.iter().all(|d| d.is_dir()), "kill_all must not remove");
        user.remove().expect("remove the user with its session");
        assert!(session.dirs.iter().chain(&user.dirs).all(|d| !d.exists()));
    }

    #[test]
    fn shutdown_removes_the_server_subtree() {
        let mut fx = Fixture::v1("shutdown");
        let busy =
            fx.manager.create_user("busy", &CgroupLimits { pids: Some(50), ..CgroupLimits::default() }).expect("busy");
        fx.manager.create_user("idle", &CgroupLimits::default()).expect("idle");
        let sh = fx.gated_sh("setsid sleep 100 & sleep 100");
        join(&busy, sh);
        fx.release(sh);
        wait_until("sh, setsid sleep and sleep in busy", || busy.pids().len() == 3);
        let pids = busy.pids();
        let subtrees: Vec<PathBuf> = fx.manager.hierarchies.iter().map(|h| h.subtree.clone()).collect();
        assert!(subtrees.iter().all(|s| s.is_dir()));

        fx.manager.shutdown();
        for subtree in &subtrees {
            assert!(!subtree.exists(), "{} left behind", subtree.display());
        }
        assert_eq!(fx.wait_exit(sh).signal(), Some(9));
        wait_until("all processes gone", || pids.iter().all(|&p| dead(p)));
    }

    #[test]
    fn detect_removes_stale_subtrees_of_dead_servers_only() {
        require_root();
        let own_dirs: Vec<PathBuf> = real_layout().v1.into_iter().map(|(d, _)| d).filter(|d| d.is_dir()).collect();
        assert!(!own_dirs.is_empty(), "no v1 hierarchy (SANDBOX.md: memory, pids, cpu, freezer)");
        let freezer_own = real_layout().v1.into_iter().find(|(_, c)| c.contains(FREEZER)).expect("v1 freezer").0;

        struct Cleanup(Vec<Child>, Vec<PathBuf>);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                for child in &mut self.0 {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                for dir in &self.1 {
                    let _ = rmdir_tree(dir, Instant::now() + KILL_TIMEOUT);
                }
            }
        }
        let spawn_sleep = || Command::new("sleep").arg("100").spawn().expect("spawn sleep");
        // Stand-ins for two other servers: both alive while their subtrees are built (so parallel
        // detects leave them alone), then one of them dies.
        let mut cleanup = Cleanup(vec![spawn_sleep(), spawn_sleep()], Vec::new());
        let (dead_server, live_server) = (cleanup.0[0].id(), cleanup.0[1].id());
        let dead_name = format!("{SUBTREE_PREFIX}{dead_server}-stale");
        let live_name = format!("{SUBTREE_PREFIX}{live_server}-stale");
        // A server of another PID namespace (inode 1 is never a namespace) whose pid, from here,
        // looks dead: not ours to judge.
        let foreign_name = format!("{SUBTREE_PREFIX}{dead_server}-pidns1");
        // A worker left behind in the dead server's user cgroup, in a cgroup frozen mid-kill.
        let victim = spawn_sleep();
        let victim_pid = victim.id();
        cleanup.0.push(victim);
        for own in &own_dirs {
            for name in [&dead_name, &live_name, &foreign_name] {
                fs::create_dir_all(own.join(name).join("u1")).expect("mkdir stale");
                cleanup.1.push(own.join(name));
            }
            fs::write(own.join(&dead_name).join("u1/cgroup.procs"), victim_pid.to_string()).expect("move victim");
        }
        fs::write(freezer_own.join(&dead_name).join("u1/freezer.state"), "FROZEN").expect("freeze");

        let _ = cleanup.0[0].kill();
        let _ = cleanup.0[0].wait();
        assert!(!pid_alive(pid_i32(dead_server)));

        let fx = Fixture::v1("stale");
        for own in &own_dirs {
            assert!(!own.join(&dead_name).exists(), "stale {} not removed", own.join(&dead_name).display());
            assert!(
                own.join(&live_name).join("u1").is_dir(),
                "live server's {} removed",
                own.join(&live_name).display()
            );
            assert!(own.join(&foreign_name).join("u1").is_dir(), "another namespace's subtree removed");
        }
        let victim = cleanup.0.iter_mut().find(|c| c.id() == victim_pid).expect("victim");
        assert_sigkilled(victim, "the stale subtree's process survived");
        drop(fx);

        let _ = cleanup.0[1].kill();
        let _ = cleanup.0[1].wait();
        let _fx = Fixture::v1("stale-again");
        for own in &own_dirs {
            assert!(
                !own.join(&live_name).exists(),
                "{} not removed after its server died",
                own.join(&live_name).display()
            );
        }
    }

    #[test]
    fn production_detect_uses_the_own_cgroup_and_is_idempotent() {
        require_root();
        let manager = CgroupManager::detect().expect("detect").expect("detect found no usable hierarchy");
        assert_eq!(manager.version(), CgroupVersion::V1);
        assert_eq!(manager.controllers(), vec![MEMORY, PIDS, CPU, FREEZER]);
        // Independently of `discover`: the memory line of /proc/self/cgroup.
        let proc_cgroup = fs::read_to_string("/proc/self/cgroup").expect("read");
        let memory_path = proc_cgroup
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.trim_start_matches('/').to_owned()))
            .expect("a memory line in /proc/self/cgroup");
        let expected = Path::new("/sys/fs/cgroup/memory").join(memory_path).join(own_subtree_name());
        let memory = manager.hierarchies.iter().find(|h| h.controllers.contains(MEMORY)).expect("memory");
        assert_eq!(memory.subtree, expected);
        assert!(expected.is_dir());
        assert!(
            manager.hierarchies.iter().all(|h| h.subtree.is_dir() && h.subtree.parent() == Some(h.own_dir.as_path()))
        );
        // Idempotent per process.
        let again = CgroupManager::detect().expect("detect").expect("again");
        let subtrees = |m: &CgroupManager| m.hierarchies.iter().map(|h| h.subtree.clone()).collect::<Vec<_>>();
        assert_eq!(subtrees(&again), subtrees(&manager));
        // No `shutdown`: other tests of this process may use `detect()` (the shared subtree) at the
        // same time (`shutdown` is tested on a scoped subtree). Remove the subtree only if empty
        // (rmdir of a cgroup with children fails); a leftover goes at the next detect after exit.
        for subtree in subtrees(&manager) {
            let _ = fs::remove_dir(subtree);
        }
    }

    /// The own cgroup in the unified (v2) hierarchy; on this machine `/sys/fs/cgroup/unified`.
    fn unified_own_dir() -> PathBuf {
        require_root();
        real_layout()
            .v2
            .into_iter()
            .find(|d| d.is_dir())
            .expect("no cgroup2 mount contains this process (SANDBOX.md: /sys/fs/cgroup/unified)")
    }

    #[test]
    fn v2_cgroup_kill_kills_a_setsid_grandchild() {
        let own = unified_own_dir();
        let mut reasons = Vec::new();
        let manager =
            CgroupManager::prepare_v2(&own, &subtree_name("v2kill"), pid_i32(own_pid()), &V2_CONTROLLERS, &mut reasons)
                .expect("prepare_v2")
                .unwrap_or_else(|| panic!("no v2 subtree: {reasons:?}"));
        let mut fx = Fixture { manager, children: Vec::new() };
        assert_eq!(fx.manager.version(), CgroupVersion::V2);
        assert!(fx.manager.v2_changes.moved.is_none());
        // SANDBOX.md: the unified mount carries no memory/pids/cpu here, so limits must be refused.
        assert!(fx.manager.controllers().is_empty(), "{:?}", fx.manager.controllers());
        match fx.manager.create_user("v2-user", &CgroupLimits { pids: Some(10), ..CgroupLimits::default() }) {
            Err(CgroupError::ControllerUnavailable { controller: "pids" }) => {}
            other => panic!("expected ControllerUnavailable, got {other:?}"),
        }
        let user = fx.manager.create_user("v2-user", &CgroupLimits::default()).expect("create_user");
        assert_eq!(user.procs_files(), vec![fx.manager.hierarchies[0].subtree.join("v2-user/cgroup.procs")]);
        assert!(user.dirs[0].join("cgroup.kill").is_file(), "kernel without cgroup.kill: the test would not test it");

        // The shell goes into a session child; the user's cgroup.kill covers it.
        let session_cgroup = user.child("session-v2").expect("child");
        let sh = fx.gated_sh("setsid sh -c 'echo $$; exec sleep 100' & sleep 100");
        join(&session_cgroup, sh);
        fx.release(sh);
        let mut line = String::new();
        BufReader::new(fx.child(sh).stdout.as_mut().expect("stdout")).read_line(&mut line).expect("daemon pid");
        let daemon: i32 = line.trim().parse().expect("daemon pid");
        assert_eq!(session_of(daemon), daemon, "the daemon did not start its own session");
        assert_ne!(session_of(pid_i32(sh)), daemon);
        wait_until("sh, daemon and sleep in the v2 cgroup", || user.pids().len() == 3);
        assert_eq!(session_cgroup.pids(), user.pids());
        assert!(v2_cgroup_of(sh).ends_with("/v2-user/session-v2"), "{}", v2_cgroup_of(sh));
        let pids = user.pids();
        assert!(pids.contains(&daemon) && pids.contains(&pid_i32(sh)));

        user.kill_all().expect("kill_all");
        assert_eq!(fx.wait_exit(sh).signal(), Some(9));
        wait_until("every process gone", || pids.iter().all(|&p| dead(p)));
        user.remove().expect("remove");
        assert!(!user.dirs[0].exists());
        let subtree = fx.manager.hierarchies[0].subtree.clone();
        fx.manager.shutdown();
        assert!(!subtree.exists(), "{} left behind", subtree.display());
    }

    #[test]
    #[ignore = "enables hugetlb in the unified hierarchy's root cgroup.subtree_control while it runs; \
                run explicitly with --ignored (as root, on the hybrid machine)"]
    fn v2_supervisor_leaf_enables_controllers_despite_internal_processes() {
        // hugetlb is the only controller of the unified hierarchy here; it stands in for memory/pids,
        // and a `sleep` stands in for the server, so the test process itself never moves.
        let root = unified_own_dir();
        assert!(read_list(&root.join("cgroup.controllers")).contains("hugetlb"), "no hugetlb in {}", root.display());
        let root_control = root.join("cgroup.subtree_control");
        let had_hugetlb = read_list(&root_control).contains("hugetlb");

        struct Restore {
            root_control: PathBuf,
            disable: bool,
            own: PathBuf,
            children: Vec<Child>,
        }
        impl Drop for Restore {
            fn drop(&mut self) {
                for child in &mut self.children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                let _ = rmdir_tree(&self.own, Instant::now() + KILL_TIMEOUT);
                if self.disable
                    && let Err(e) = write_value(&self.root_control, "-hugetlb")
                {
                    panic!("cannot restore {}: {e}", self.root_control.display());
                }
            }
        }
        // The server's "own cgroup" holding the stand-in server.
        let own = root.join(subtree_name("v2sup-own"));
        let mut restore = Restore {
            root_control: root_control.clone(),
            disable: !had_hugetlb,
            own: own.clone(),
            children: Vec::new(),
        };
        if !had_hugetlb {
            write_value(&root_control, "+hugetlb").expect("enable hugetlb at the unified root");
        }
        fs::create_dir(&own).expect("mkdir own");
        let spawn_in_own = |restore: &mut Restore| {
            let child = Command::new("sleep").arg("100").spawn().expect("spawn");
            let pid = child.id();
            restore.children.push(child);
            write_value(&own.join("cgroup.procs"), &pid.to_string()).expect("move into own");
            pid
        };
        let server = spawn_in_own(&mut restore);
        let own_path = v2_cgroup_of(server);

        // 1. The server is the only process: it moves into the leaf and the controllers get enabled.
        let name = subtree_name("v2sup");
        let mut reasons = Vec::new();
        let manager = CgroupManager::prepare_v2(&own, &name, pid_i32(server), &["hugetlb"], &mut reasons)
            .expect("prepare_v2")
            .unwrap_or_else(|| panic!("no subtree: {reasons:?}"));
        assert_eq!(manager.controllers(), Vec::<&str>::new(), "controllers() lists memory/pids/cpu/freezer only");
        assert!(manager.hierarchies[0].controllers.contains("hugetlb"));
        assert_eq!(manager.v2_changes.moved, Some(pid_i32(server)));
        assert_eq!(v2_cgroup_of(server), format!("{own_path}/{name}/{SUPERVISOR_LEAF}"));
        assert!(read_list(&own.join("cgroup.subtree_control")).contains("hugetlb"));
        assert!(read_list(&own.join(&name).join("cgroup.subtree_control")).contains("hugetlb"));
        let user = manager.create_user("u1", &CgroupLimits::default()).expect("create_user");
        assert!(read_list(&user.dirs[0].join("cgroup.controllers")).contains("hugetlb"));
        let worker = Command::new("sleep").arg("100").spawn().expect("spawn worker");
        let worker_pid = worker.id();
        restore.children.push(worker);
        join(&user, worker_pid);
        assert_eq!(user.pids(), vec![pid_i32(worker_pid)]);

        manager.shutdown();
        assert_eq!(v2_cgroup_of(server), own_path, "the server did not move back");
        assert!(read_list(&own.join("cgroup.subtree_control")).is_empty());
        assert!(!own.join(&name).exists());
        let worker = restore.children.iter_mut().find(|c| c.id() == worker_pid).expect("worker");
        assert_sigkilled(worker, "shutdown left the worker running");

        // 2. Another process shares the own cgroup: after a bounded wait the server moves back and
        //    the manager runs kill-only.
        let _other = spawn_in_own(&mut restore);
        let name = subtree_name("v2sup-busy");
        let started = Instant::now();
        let manager = CgroupManager::prepare_v2(&own, &name, pid_i32(server), &["hugetlb"], &mut reasons)
            .expect("prepare_v2")
            .expect("kill-only manager");
        assert!(started.elapsed() >= ENABLE_TIMEOUT);
        assert!(manager.hierarchies[0].controllers.is_empty());
        assert_eq!(manager.v2_changes.moved, None);
        assert_eq!(v2_cgroup_of(server), own_path);
        assert!(!own.join(&name).join(SUPERVISOR_LEAF).exists());
        assert!(read_list(&own.join("cgroup.subtree_control")).is_empty());
        manager.shutdown();
        assert!(!own.join(&name).exists());
    }

    /// Waits up to 5 s for `child` to end and asserts SIGKILL ended it.
    fn assert_sigkilled(child: &mut std::process::Child, survived: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "{survived}");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.signal(), Some(9));
    }
}
