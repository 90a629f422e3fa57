//! The worker's confinement, as one ordered function ([`confine`]).
//!
//! It runs on the main thread before any runtime or thread exists, and fails
//! closed: a step that cannot be applied stops the worker, unless the
//! operator marked that layer best-effort (then it is listed in the report's
//! `skipped`). The order is SANDBOX.md's, and it matters:
//!
//! - fds are closed before anything can be restricted, since Landlock does
//!   not re-check descriptors that are already open;
//! - the cgroup is joined and the Landlock/seccomp programs are prepared
//!   while the process may still read files and allocate freely;
//! - capability clean-up needs CAP_SETPCAP, so it precedes the uid change;
//! - the uid change resets PDEATHSIG, so PDEATHSIG follows it;
//! - Landlock needs NO_NEW_PRIVS; seccomp comes last, so that the syscalls
//!   of the earlier steps are not filtered.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use shared::protocol::{CONTROL_FD, ConfinementReport, Rlimits, UserIds, WorkerConfig};

use crate::{landlock_rules, seccomp_filter};

/// A confinement step that failed (and was not best-effort).
#[derive(Debug, thiserror::Error)]
#[error("confinement step `{step}` failed: {message}")]
pub struct ConfineError {
    pub step: &'static str,
    pub message: String,
}

fn fail(step: &'static str, message: impl Into<String>) -> ConfineError {
    ConfineError { step, message: message.into() }
}

fn os_fail(step: &'static str, what: &str) -> ConfineError {
    fail(step, format!("{what}: {}", io::Error::last_os_error()))
}

/// Applies a step; a failure of a best-effort layer is recorded, not fatal.
fn layer<T>(
    result: Result<T, ConfineError>,
    best_effort: bool,
    report: &mut ConfinementReport,
) -> Result<Option<T>, ConfineError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(error) if best_effort => {
            report.skipped.push(error.to_string());
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// What the confined worker keeps: the user's directory, opened.
#[derive(Debug)]
pub struct Confined {
    pub report: ConfinementReport,
    pub user_dir: OwnedFd,
}

/// Confines the calling process for `config`'s user. Step numbers follow
/// SANDBOX.md.
pub fn confine(config: &WorkerConfig, started: Instant) -> Result<Confined, ConfineError> {
    let mut report = ConfinementReport::default();
    let best = config.best_effort;

    // 1. Single-threaded, or changing credentials and seccomp would apply to
    //    this thread only.
    let threads = thread_count().map_err(|e| fail("threads", e.to_string()))?;
    if threads != 1 {
        return Err(fail("threads", format!("{threads} threads exist; confinement must run first")));
    }

    // 2. No inherited descriptor survives but the control socket, and even
    //    that one is close-on-exec, so no CLI inherits it.
    close_inherited_fds()?;

    // 3. Own session and process group, no controlling terminal; and a
    //    subreaper, so daemons that escape their parent come back to us and
    //    die with the worker.
    if unsafe { libc::setsid() } < 0 {
        return Err(os_fail("setsid", "setsid"));
    }
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(os_fail("setsid", "PR_SET_CHILD_SUBREAPER"));
    }

    // 4. Open the user's directory without following links and check who
    //    owns it: the target uid, or (unprivileged) ourselves.
    let user_dir = open_user_dir(config)?;

    // 5. Join the user's cgroup, prepared by the control plane beneath its
    //    own cgroup.
    if !config.cgroup_procs.is_empty() {
        report.cgroup = layer(join_cgroup(config), best.cgroup, &mut report)?.is_some();
    } else if !best.cgroup {
        return Err(fail("cgroup", "no cgroup given and the cgroup layer is not best-effort"));
    }

    // 6. Resource limits (no RLIMIT_AS: it breaks Node/Bun's reservations).
    set_rlimits(&config.rlimits, config.drop_to.is_some())?;

    // 7. Build the Landlock ruleset and the seccomp program now, while files
    //    can be opened and memory allocated without restriction.
    let ruleset = if config.landlock.enabled {
        layer(landlock_rules::prepare(&config.landlock, &config.user_dir), best.landlock, &mut report)?
    } else {
        None
    };
    let seccomp = if config.seccomp.enabled {
        layer(seccomp_filter::build(&config.seccomp), best.seccomp, &mut report)?
    } else {
        None
    };

    // 8. Privileges: lock securebits and empty the bounding and ambient sets
    //    (these need CAP_SETPCAP, so before the uid change), then become the
    //    user, then empty every set and verify that root cannot come back.
    match config.drop_to {
        Some(ids) => layer(drop_privileges(ids), best.privileges, &mut report)?,
        None => layer(clear_capabilities(), best.privileges, &mut report)?,
    };
    report.uid = unsafe { libc::geteuid() };
    report.gid = unsafe { libc::getegid() };

    // 9. Die with the control plane (set after the uid change, which resets
    //    it), then make sure it did not die in between.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(os_fail("pdeathsig", "PR_SET_PDEATHSIG"));
    }
    if unsafe { libc::getppid() } as u32 != config.parent_pid {
        return Err(fail("pdeathsig", "the control plane exited during start-up"));
    }

    // 10. No exec may ever gain privileges (setuid binaries, file caps).
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(os_fail("no_new_privs", "PR_SET_NO_NEW_PRIVS"));
    }
    report.no_new_privs = true;

    // 11. Landlock: read-only system paths, read-write user directory, TCP
    //     connect to the allowed ports only, no bind; scoped signals and
    //     abstract unix sockets. A partially enforced ruleset is refused.
    if let Some(ruleset) = ruleset {
        let enforced = layer(landlock_rules::restrict(ruleset), best.landlock, &mut report)?;
        if let Some(abi) = enforced {
            report.landlock_abi = Some(abi);
            report.landlock_enforced = true;
        }
    }

    // 12. seccomp, last: namespaces, io_uring, bpf, keyrings, ptrace, perf,
    //     SysV IPC, mounts, unwanted socket families, TIOCSTI.
    if let Some(program) = seccomp {
        report.seccomp = layer(seccomp_filter::apply(&program), best.seccomp, &mut report)?.is_some();
    }

    // 13. Work from the user's directory; each CLI is then started with an
    //     environment built from scratch (see the runtime).
    if unsafe { libc::fchdir(user_dir.as_raw_fd()) } != 0 {
        return Err(os_fail("chdir", "fchdir to the user directory"));
    }
    report.setup_micros = started.elapsed().as_micros() as u64;
    Ok(Confined { report, user_dir })
}

fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads: line in /proc/self/status"))
}

fn close_inherited_fds() -> Result<(), ConfineError> {
    let control = CONTROL_FD as libc::c_uint;
    // close_range(4, ~0, 0): every fd above the control socket is closed.
    if unsafe { libc::syscall(libc::SYS_close_range, control + 1, libc::c_uint::MAX, 0) } != 0 {
        return Err(os_fail("close_fds", "close_range"));
    }
    if unsafe { libc::fcntl(CONTROL_FD, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(os_fail("close_fds", "FD_CLOEXEC on the control socket"));
    }
    Ok(())
}

fn open_user_dir(config: &WorkerConfig) -> Result<OwnedFd, ConfineError> {
    let path = CString::new(config.user_dir.as_os_str().as_encoded_bytes())
        .map_err(|_| fail("user_dir", "path contains NUL"))?;
    let fd =
        unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(os_fail("user_dir", &format!("open {}", config.user_dir.display())));
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let owner = File::from(fd.try_clone().map_err(|e| fail("user_dir", e.to_string()))?)
        .metadata()
        .map_err(|e| fail("user_dir", e.to_string()))?
        .uid();
    let expected = config.drop_to.map_or_else(|| unsafe { libc::geteuid() }, |ids| ids.uid);
    if owner != expected {
        return Err(fail(
            "user_dir",
            format!("{} is owned by uid {owner}, expected {expected}", config.user_dir.display()),
        ));
    }
    Ok(fd)
}

fn join_cgroup(config: &WorkerConfig) -> Result<(), ConfineError> {
    let pid = std::process::id().to_string();
    for procs in &config.cgroup_procs {
        std::fs::write(procs, &pid).map_err(|e| fail("cgroup", format!("join {}: {e}", procs.display())))?;
    }
    Ok(())
}

fn set_rlimits(limits: &Rlimits, own_uid: bool) -> Result<(), ConfineError> {
    let set = |resource, value: u64, name: &str| {
        let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(os_fail("rlimits", name));
        }
        Ok(())
    };
    set(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    set(libc::RLIMIT_NOFILE, limits.nofile, "RLIMIT_NOFILE")?;
    set(libc::RLIMIT_FSIZE, limits.fsize, "RLIMIT_FSIZE")?;
    set(libc::RLIMIT_DATA, limits.data, "RLIMIT_DATA")?;
    // RLIMIT_NPROC counts every process of the uid: meaningful (and safe)
    // only when the uid is the user's own.
    if let (true, Some(nproc)) = (own_uid, limits.nproc) {
        set(libc::RLIMIT_NPROC, nproc.max(256), "RLIMIT_NPROC")?;
    }
    Ok(())
}

/// Securebits that keep root powerless for good: no caps for uid 0, no
/// automatic cap changes on uid switches, no keep-caps, no ambient raise;
/// each locked.
const SECUREBITS: libc::c_ulong = (1 << 0) // SECBIT_NOROOT
    | (1 << 1) // SECBIT_NOROOT_LOCKED
    | (1 << 2) // SECBIT_NO_SETUID_FIXUP
    | (1 << 3) // SECBIT_NO_SETUID_FIXUP_LOCKED
    | (1 << 5) // SECBIT_KEEP_CAPS_LOCKED (KEEP_CAPS itself off)
    | (1 << 6) // SECBIT_NO_CAP_AMBIENT_RAISE
    | (1 << 7); // SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED

fn drop_privileges(ids: UserIds) -> Result<(), ConfineError> {
    const STEP: &str = "privileges";
    if unsafe { libc::prctl(libc::PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0) } != 0 {
        return Err(os_fail(STEP, "PR_SET_SECUREBITS (needs CAP_SETPCAP)"));
    }
    for cap in caps::all() {
        caps::drop(None, caps::CapSet::Bounding, cap).map_err(|e| fail(STEP, format!("bounding set: {e}")))?;
    }
    caps::clear(None, caps::CapSet::Ambient).map_err(|e| fail(STEP, format!("ambient set: {e}")))?;
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(os_fail(STEP, "setgroups([])"));
    }
    if unsafe { libc::setresgid(ids.gid, ids.gid, ids.gid) } != 0 {
        return Err(os_fail(STEP, "setresgid"));
    }
    if unsafe { libc::setresuid(ids.uid, ids.uid, ids.uid) } != 0 {
        return Err(os_fail(STEP, "setresuid"));
    }
    clear_capabilities()?;
    // Verify rather than assume.
    let (mut r, mut e, mut s) = (0, 0, 0);
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if [r, e, s] != [ids.uid; 3] {
        return Err(fail(STEP, format!("uids are {r}/{e}/{s}, expected {}", ids.uid)));
    }
    unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    if [r, e, s] != [ids.gid; 3] {
        return Err(fail(STEP, format!("gids are {r}/{e}/{s}, expected {}", ids.gid)));
    }
    if unsafe { libc::setuid(0) } == 0 {
        return Err(fail(STEP, "setuid(0) succeeded after the drop"));
    }
    if !caps::read(None, caps::CapSet::Bounding).map_err(|e| fail(STEP, e.to_string()))?.is_empty() {
        return Err(fail(STEP, "bounding set is not empty"));
    }
    Ok(())
}

/// Empties every capability set this process may change, then checks that
/// effective, permitted, inheritable and ambient are all empty. (A non-root
/// process with file capabilities keeps them across setresuid.)
fn clear_capabilities() -> Result<(), ConfineError> {
    const STEP: &str = "capabilities";
    caps::clear(None, caps::CapSet::Ambient).map_err(|e| fail(STEP, format!("ambient: {e}")))?;
    for set in [caps::CapSet::Inheritable, caps::CapSet::Effective, caps::CapSet::Permitted] {
        caps::clear(None, set).map_err(|e| fail(STEP, format!("{set:?}: {e}")))?;
    }
    for set in [caps::CapSet::Effective, caps::CapSet::Permitted, caps::CapSet::Inheritable, caps::CapSet::Ambient] {
        let left = caps::read(None, set).map_err(|e| fail(STEP, e.to_string()))?;
        if !left.is_empty() {
            return Err(fail(STEP, format!("{set:?} still holds {left:?}")));
        }
    }
    Ok(())
}
