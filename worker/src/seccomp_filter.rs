//! seccomp (step 12): refuse the system calls a user's agent never needs and
//! that widen the attack surface or escape other layers.
//!
//! Refused with EPERM: namespaces (`unshare`, `setns`, `clone` with any
//! `CLONE_NEW*` flag), mounts, io_uring (its operations bypass seccomp),
//! `bpf`, keyrings, `ptrace` and cross-process memory access, `pidfd_getfd`,
//! `perf_event_open`, `userfaultfd`, SysV IPC, kernel modules and kexec,
//! `syslog`; socket families other than unix, inet, inet6 and netlink (and
//! unix too unless allowed: connecting to host sockets, which Landlock does
//! not govern; `socketpair` stays allowed); UDP when configured;
//! `ioctl(TIOCSTI/TIOCLINUX)` (typing into a terminal). `clone3` answers
//! ENOSYS, since its flags cannot be inspected, and libc falls back to
//! `clone`.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use shared::protocol::SeccompConfig;

use crate::confine::ConfineError;

const STEP: &str = "seccomp";

fn fail(message: impl std::fmt::Display) -> ConfineError {
    ConfineError { step: STEP, message: message.to_string() }
}

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

const CLONE_NEW_FLAGS: [u64; 8] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    0x80, // CLONE_NEWTIME
];

/// Refused whatever their arguments.
const DENIED: &[libc::c_long] = &[
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_bpf,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_shmget,
    libc::SYS_shmat,
    libc::SYS_shmctl,
    libc::SYS_msgget,
    libc::SYS_msgsnd,
    libc::SYS_msgrcv,
    libc::SYS_msgctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_semctl,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_open_by_handle_at,
    libc::SYS_syslog,
    libc::SYS_acct,
    libc::SYS_swapon,
    libc::SYS_swapoff,
];

/// The compiled filters: the EPERM list, and `clone3` → ENOSYS.
#[derive(Debug)]
pub struct Programs {
    deny: BpfProgram,
    clone3: BpfProgram,
}

fn condition(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, ConfineError> {
    SeccompCondition::new(arg, len, op, value).map_err(fail)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, ConfineError> {
    SeccompRule::new(conditions).map_err(fail)
}

pub fn build(config: &SeccompConfig) -> Result<Programs, ConfineError> {
    use SeccompCmpArgLen::{Dword, Qword};
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED.iter().map(|nr| (*nr, Vec::new())).collect();

    let clone_rules = CLONE_NEW_FLAGS
        .iter()
        .map(|flag| rule(vec![condition(0, Qword, SeccompCmpOp::MaskedEq(*flag), *flag)?]))
        .collect::<Result<_, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);

    // socket(domain, type, protocol): refuse every family but the allowed.
    let mut socket_rules = vec![
        rule(vec![condition(0, Dword, SeccompCmpOp::Eq, libc::AF_UNSPEC as u64)?])?,
        // 3..=9 lie between AF_INET (2) and AF_INET6 (10).
        rule(vec![condition(0, Dword, SeccompCmpOp::Ge, 3)?, condition(0, Dword, SeccompCmpOp::Le, 9)?])?,
        rule(vec![
            condition(0, Dword, SeccompCmpOp::Gt, libc::AF_INET6 as u64)?,
            condition(0, Dword, SeccompCmpOp::Ne, libc::AF_NETLINK as u64)?,
        ])?,
    ];
    if !config.allow_unix_sockets {
        socket_rules.push(rule(vec![condition(0, Dword, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?])?);
    }
    if config.deny_udp {
        for family in [libc::AF_INET, libc::AF_INET6] {
            socket_rules.push(rule(vec![
                condition(0, Dword, SeccompCmpOp::Eq, family as u64)?,
                condition(1, Dword, SeccompCmpOp::MaskedEq(0xf), libc::SOCK_DGRAM as u64)?,
            ])?);
        }
    }
    rules.insert(libc::SYS_socket, socket_rules);

    let ioctl_rules = [libc::TIOCSTI, libc::TIOCLINUX]
        .iter()
        .map(|request| rule(vec![condition(1, Dword, SeccompCmpOp::Eq, *request)?]))
        .collect::<Result<_, _>>()?;
    rules.insert(libc::SYS_ioctl, ioctl_rules);

    let deny = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), ARCH)
        .map_err(fail)?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        ARCH,
    )
    .map_err(fail)?;
    Ok(Programs { deny: deny.try_into().map_err(fail)?, clone3: clone3.try_into().map_err(fail)? })
}

/// Installs both filters (NO_NEW_PRIVS is already set).
pub fn apply(programs: &Programs) -> Result<(), ConfineError> {
    seccompiler::apply_filter(&programs.clone3).map_err(fail)?;
    seccompiler::apply_filter(&programs.deny).map_err(fail)
}
