//! Confined per-user workers: the cgroup layer ([`cgroup`]), what a worker
//! is told ([`sandbox`]), and the [`supervisor`] that starts, tracks and
//! stops them. The worker binary itself is `worker/`.

pub mod cgroup;
pub mod handoff;
pub mod sandbox;
pub mod supervisor;
