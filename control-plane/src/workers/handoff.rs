//! Hands a non-root server's capabilities to its worker as ambient
//! capabilities, so only the server binary carries file capabilities.
//!
//! A non-root process loses its capabilities at `execve` unless the new
//! program has file capabilities of its own, or the capabilities are in the
//! process's ambient set (capabilities(7), "Transformation of capabilities
//! during execve"). Raising a capability into the ambient set needs it in
//! both the permitted and the inheritable set. So, in the forked child just
//! before it executes the worker, this copies the permitted set into the
//! inheritable set (`capset`) and raises each capability into the ambient
//! set (`prctl(PR_CAP_AMBIENT_RAISE)`). The server itself is not changed.
//!
//! The worker drops them all (securebits locked, bounding, ambient,
//! inheritable, effective and permitted sets cleared, and checked) before it
//! runs anything of the user's; every sandboxed process runs with
//! `no_new_privs`. A root server needs none of this: root's exec keeps them.

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapabilityHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct CapabilityData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// What the child raises before `execve`, computed in the parent (the child
/// of a multi-threaded process may only make async-signal-safe calls).
#[derive(Debug, Clone)]
pub struct AmbientHandoff {
    sets: [CapabilityData; 2],
    capabilities: Vec<u32>,
}

impl AmbientHandoff {
    /// The hand-off of this process's permitted capabilities; `None` for root
    /// (which keeps them across exec anyway) or when there are none.
    pub fn of_this_process() -> std::io::Result<Option<Self>> {
        if rustix::process::geteuid().is_root() {
            return Ok(None);
        }
        let mut sets = [CapabilityData::default(); 2];
        let mut header = CapabilityHeader { version: CAPABILITY_VERSION_3, pid: 0 };
        // SAFETY: capget fills two CapabilityData for version 3.
        if unsafe { libc::syscall(libc::SYS_capget, &mut header, sets.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let capabilities: Vec<u32> =
            (0..64u32).filter(|cap| sets[(cap / 32) as usize].permitted & (1 << (cap % 32)) != 0).collect();
        if capabilities.is_empty() {
            return Ok(None);
        }
        for set in &mut sets {
            set.inheritable = set.permitted;
        }
        Ok(Some(Self { sets, capabilities }))
    }

    /// Runs in the forked child before `execve`: system calls only, no
    /// allocation.
    pub fn apply(&self) -> std::io::Result<()> {
        let mut header = CapabilityHeader { version: CAPABILITY_VERSION_3, pid: 0 };
        // SAFETY: capset reads two CapabilityData for version 3.
        if unsafe { libc::syscall(libc::SYS_capset, &mut header, self.sets.as_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for &capability in &self.capabilities {
            let raise = libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong;
            // SAFETY: plain prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_CAP_AMBIENT, raise, capability as libc::c_ulong, 0, 0) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}
