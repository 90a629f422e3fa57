//! Measures the worker's confinement: starts `claude-agent-worker` the way
//! the supervisor does (socketpair end on fd 3, configuration in the first
//! frame) N times per layer set, and prints the median and p90 of the
//! worker's own confinement time (`setup_micros`, from its start to the end
//! of step 13), the time from spawn to `Ready`, and the worker's RSS once
//! ready (no CLI running). Run as root (the uid drop needs it):
//!
//! `cargo run --release -p integration-tests --bin worker-startup -- [N]`

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use shared::protocol::{
    BestEffort, CONTROL_FD, FromWorker, LandlockConfig, PROTOCOL_VERSION, Rlimits, SeccompConfig, ToWorker, UserIds,
    WorkerConfig, read_frame_blocking, write_frame_blocking,
};

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

struct Layers {
    name: &'static str,
    landlock: bool,
    seccomp: bool,
    uid: bool,
    cgroup: bool,
}

/// The hierarchies a worker joins, as the server's cgroup layer uses them:
/// cgroup v2's unified one, or v1's memory, pids, cpu and freezer. Each run
/// gets fresh cgroups beneath a directory of this program's own (a fresh
/// user's worker joins cgroups made for it), removed after the worker exits.
struct BenchCgroups {
    parents: Vec<PathBuf>,
}

impl BenchCgroups {
    fn new() -> Option<Self> {
        let root = PathBuf::from("/sys/fs/cgroup");
        let hierarchies: Vec<PathBuf> = if root.join("cgroup.controllers").exists() {
            vec![root]
        } else {
            ["memory", "pids", "cpu", "freezer"]
                .iter()
                .map(|h| root.join(h))
                .filter(|h| h.join("cgroup.procs").exists())
                .collect()
        };
        let name = format!("cah-worker-startup-{}", std::process::id());
        let mut made = Self { parents: Vec::new() };
        for parent in hierarchies.iter().map(|h| h.join(&name)) {
            // On failure, `made` removes the ones made so far.
            std::fs::create_dir(&parent).ok()?;
            made.parents.push(parent);
        }
        (!made.parents.is_empty()).then_some(made)
    }

    /// `cgroup.procs` of fresh cgroups for run `run`.
    fn fresh(&self, run: usize) -> Vec<PathBuf> {
        self.parents
            .iter()
            .map(|parent| {
                let dir = parent.join(format!("w{run}"));
                std::fs::create_dir(&dir).expect("create a cgroup");
                dir.join("cgroup.procs")
            })
            .collect()
    }

    fn remove(&self, run: usize) {
        for parent in &self.parents {
            let _ = std::fs::remove_dir(parent.join(format!("w{run}")));
        }
    }
}

impl Drop for BenchCgroups {
    fn drop(&mut self) {
        for parent in &self.parents {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

#[allow(clippy::print_stdout)]
fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(100);
    let worker = integration_tests::binary_path("claude-agent-worker");
    let dir = tempfile::tempdir().expect("tempdir");
    let user_dir = dir.path().join("user");
    std::fs::create_dir(&user_dir).expect("user dir");
    let uid = 250_000;
    let cgroups = BenchCgroups::new();
    let sets = [
        Layers { name: "none", landlock: false, seccomp: false, uid: false, cgroup: false },
        Layers { name: "landlock", landlock: true, seccomp: false, uid: false, cgroup: false },
        Layers { name: "seccomp", landlock: false, seccomp: true, uid: false, cgroup: false },
        Layers { name: "uid drop", landlock: false, seccomp: false, uid: true, cgroup: false },
        Layers { name: "cgroup join", landlock: false, seccomp: false, uid: false, cgroup: true },
        Layers { name: "all but the cgroup", landlock: true, seccomp: true, uid: true, cgroup: false },
        Layers { name: "all", landlock: true, seccomp: true, uid: true, cgroup: true },
    ];
    println!("| layers | confinement p50 (µs) | p90 | spawn→ready p50 (µs) | p90 | RSS ready (KiB) |");
    println!("|---|---|---|---|---|---|");
    for layers in sets {
        if layers.cgroup && cgroups.is_none() {
            println!("| {} | no cgroup hierarchy could be made here | | | | |", layers.name);
            continue;
        }
        let owner = if layers.uid { uid } else { 0 };
        std::os::unix::fs::chown(&user_dir, Some(owner), Some(owner)).expect("chown");
        let mut config = WorkerConfig {
            user_id: "bench".into(),
            user_dir: user_dir.clone(),
            parent_pid: std::process::id(),
            drop_to: layers.uid.then_some(UserIds { uid, gid: uid }),
            landlock: LandlockConfig {
                enabled: layers.landlock,
                min_abi: 6,
                read_only: ["/usr", "/lib", "/lib64", "/bin", "/etc/ssl", "/proc"].map(PathBuf::from).into(),
                read_write_files: vec![PathBuf::from("/dev/null")],
                tcp_connect_ports: vec![443],
                own_cgroup_dirs: Vec::new(),
            },
            seccomp: SeccompConfig { enabled: layers.seccomp, deny_udp: false, allow_unix_sockets: false },
            rlimits: Rlimits { nofile: 4096, fsize: 1 << 30, data: 2 << 30, nproc: None },
            cgroup_procs: Vec::new(),
            best_effort: BestEffort { cgroup: !layers.cgroup, ..BestEffort::default() },
        };
        let (mut setup, mut ready, mut rss) = (Vec::new(), Vec::new(), Vec::new());
        let run_cgroups = cgroups.as_ref().filter(|_| layers.cgroup);
        for run in 0..runs {
            if let Some(cgroups) = run_cgroups {
                config.cgroup_procs = cgroups.fresh(run);
            }
            let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
            let fd = theirs.as_raw_fd();
            let started = Instant::now();
            let mut command = Command::new(&worker);
            command.env_clear().stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
            unsafe {
                command.pre_exec(move || {
                    if libc::dup2(fd, CONTROL_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = command.spawn().expect("spawn worker");
            drop(theirs);
            let hello = ToWorker::Hello { version: PROTOCOL_VERSION, config: Box::new(config.clone()) };
            write_frame_blocking(&mut ours, &hello).expect("hello");
            match read_frame_blocking::<FromWorker>(&mut ours).expect("ready") {
                FromWorker::Ready { confinement, .. } => {
                    ready.push(started.elapsed().as_micros() as f64);
                    setup.push(confinement.setup_micros as f64);
                }
                other => panic!("{}: {other:?}", layers.name),
            }
            let mut status = String::new();
            std::fs::File::open(format!("/proc/{}/status", child.id()))
                .and_then(|mut f| f.read_to_string(&mut status))
                .expect("status");
            let kib = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            rss.push(kib);
            write_frame_blocking(&mut ours, &ToWorker::Shutdown).expect("shutdown");
            child.wait().expect("wait");
            if let Some(cgroups) = run_cgroups {
                cgroups.remove(run);
            }
        }
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            layers.name,
            percentile(&mut setup, 0.5),
            percentile(&mut setup, 0.9),
            percentile(&mut ready, 0.5),
            percentile(&mut ready, 0.9),
            percentile(&mut rss, 0.5)
        );
    }
}
