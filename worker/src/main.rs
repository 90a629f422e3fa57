//! `claude-agent-worker`: one per active user, started by the control plane
//! with a socketpair end as fd 3 and nothing on argv.
//!
//! 1. Read the `Hello` frame (version + configuration) with a blocking read.
//! 2. Confine this process ([`confine::confine`]) while it is still
//!    single-threaded; any failure is reported as `Fatal` and ends the worker.
//! 3. Answer `Ready`, then start the single-threaded runtime that runs the
//!    user's CLI processes ([`runtime`]).

use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Instant;

use shared::protocol::{CONTROL_FD, FromWorker, PROTOCOL_VERSION, ToWorker, read_frame_blocking, write_frame_blocking};

mod confine;
mod landlock_rules;
mod runtime;
mod seccomp_filter;

#[allow(clippy::print_stderr)]
fn main() -> ExitCode {
    let started = Instant::now();
    // fd 3 must be a socket: refuse to run in any other setting.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(CONTROL_FD, &mut stat) } != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        eprintln!("claude-agent-worker: fd {CONTROL_FD} is not a socket; this program is started by claude-agent-http");
        return ExitCode::from(2);
    }
    let mut control = unsafe { UnixStream::from_raw_fd(CONTROL_FD) };
    let fatal = |control: &mut UnixStream, message: String| {
        eprintln!("claude-agent-worker: {message}");
        let _ = write_frame_blocking(control, &FromWorker::Fatal { message });
        ExitCode::from(3)
    };
    let config = match read_frame_blocking::<ToWorker>(&mut control) {
        Ok(ToWorker::Hello { version, config }) if version == PROTOCOL_VERSION => config,
        Ok(ToWorker::Hello { version, .. }) => {
            return fatal(
                &mut control,
                format!("protocol version {version} unsupported (worker speaks {PROTOCOL_VERSION})"),
            );
        }
        Ok(other) => return fatal(&mut control, format!("expected hello, got {other:?}")),
        Err(error) => return fatal(&mut control, format!("reading hello: {error}")),
    };
    let confined = match confine::confine(&config, started) {
        Ok(confined) => confined,
        Err(error) => return fatal(&mut control, error.to_string()),
    };
    let ready = FromWorker::Ready { version: PROTOCOL_VERSION, pid: std::process::id(), confinement: confined.report };
    if let Err(error) = write_frame_blocking(&mut control, &ready) {
        eprintln!("claude-agent-worker: cannot answer ready: {error}");
        return ExitCode::from(3);
    }
    drop(confined.user_dir);
    match runtime::run(control, *config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("claude-agent-worker: {error}");
            ExitCode::FAILURE
        }
    }
}
