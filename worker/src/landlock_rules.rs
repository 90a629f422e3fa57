//! Landlock: the file system, TCP and scope rules of a worker (step 11).
//!
//! The ruleset handles every access right the running kernel knows, so
//! anything not granted below is denied: read (and execute) on the system
//! paths and the CLI's install, read-write on the user's directory, write on
//! a few device files, `connect` to the allowed TCP ports, never `bind`;
//! signals and abstract unix sockets are scoped to the worker's own domain.
//! Because each worker creates its own domain, Landlock also denies ptrace
//! access (and so `/proc/<pid>/environ`, `cwd`, `root`, `mem`) to every process
//! outside it: other users' workers and the control plane.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope,
};
use shared::protocol::LandlockConfig;

use crate::confine::ConfineError;

const STEP: &str = "landlock";

fn fail(message: impl std::fmt::Display) -> ConfineError {
    ConfineError { step: STEP, message: message.to_string() }
}

/// The kernel's Landlock ABI version, or why there is none.
pub fn kernel_abi() -> Result<u8, String> {
    // landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    let version = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<u8>(), 0usize, 1u32) };
    if version < 0 {
        return Err(format!("Landlock is not available: {}", std::io::Error::last_os_error()));
    }
    Ok(version as u8)
}

/// A ruleset with every rule added, not yet enforced, and its ABI.
pub struct Prepared {
    ruleset: RulesetCreated,
    abi: u8,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Prepared(abi {})", self.abi)
    }
}

/// Builds the ruleset (opening every path now, while that is still allowed).
pub fn prepare(config: &LandlockConfig, user_dir: &Path) -> Result<Prepared, ConfineError> {
    let kernel = kernel_abi().map_err(fail)?;
    if kernel < config.min_abi {
        return Err(fail(format!("kernel Landlock ABI {kernel} is older than the required {}", config.min_abi)));
    }
    let abi = ABI::from(i32::from(kernel));
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))
        .map_err(fail)?;
    if abi >= ABI::V4 {
        ruleset = ruleset.handle_access(AccessNet::from_all(abi)).map_err(fail)?;
    }
    if abi >= ABI::V6 {
        ruleset = ruleset.scope(Scope::from_all(abi)).map_err(fail)?;
    }
    let mut created = ruleset.create().map_err(fail)?;

    let read = AccessFs::from_read(abi);
    for path in existing(&config.read_only) {
        created = created.add_rule(beneath(&path, read, abi)?).map_err(fail)?;
    }
    let read_write = AccessFs::from_all(abi);
    for path in existing(&config.read_write_files) {
        created = created.add_rule(beneath(&path, read_write, abi)?).map_err(fail)?;
    }
    created = created.add_rule(beneath(user_dir, read_write, abi)?).map_err(fail)?;
    for path in existing(&config.own_cgroup_dirs) {
        created = created.add_rule(beneath(&path, AccessFs::WriteFile.into(), abi)?).map_err(fail)?;
    }
    if abi >= ABI::V4 {
        for port in &config.tcp_connect_ports {
            created = created.add_rule(NetPort::new(*port, AccessNet::ConnectTcp)).map_err(fail)?;
        }
    }
    Ok(Prepared { ruleset: created, abi: kernel })
}

/// Paths that exist; a missing system path (no `/lib32`, say) grants nothing.
fn existing(paths: &[PathBuf]) -> impl Iterator<Item = PathBuf> + '_ {
    paths.iter().filter(|p| p.exists()).cloned()
}

/// A rule for `path`, narrowed to the rights a file can hold when it is one.
fn beneath(path: &Path, access: BitFlags<AccessFs>, abi: ABI) -> Result<PathBeneath<PathFd>, ConfineError> {
    let fd = PathFd::new(path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    let access = if path.is_dir() { access } else { access & AccessFs::from_file(abi) };
    Ok(PathBeneath::new(fd, access))
}

/// Enforces the ruleset; anything but full enforcement is an error.
pub fn restrict(prepared: Prepared) -> Result<u8, ConfineError> {
    let status = prepared.ruleset.restrict_self().map_err(fail)?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(fail(format!("ruleset not fully enforced: {:?}", status.ruleset)));
    }
    Ok(prepared.abi)
}
