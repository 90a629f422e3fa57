//! The worker protocol: length-delimited frames (4-byte big-endian length,
//! [`MAX_FRAME_LEN`] at most) carrying one message each (JSON, but for
//! output lines: see below), over the
//! socketpair the control plane hands the worker as fd 3.
//!
//! The control plane speaks first with [`ToWorker::Hello`] (protocol version
//! and the worker's whole configuration, never on argv); the worker confines
//! itself, then answers [`FromWorker::Ready`] with the same version, or
//! [`FromWorker::Fatal`] and exits. After that, one worker serves every
//! session of its user: each session-scoped frame names its session, and
//! output lines carry a per-session sequence number so the control plane can
//! detect loss.
//!
//! An output line of any length fits: the worker sends it in pieces of at
//! most [`OUTPUT_PIECE_LEN`] bytes (see [`FromWorker::Output`]), and the
//! control plane reassembles them up to its own cap. Output frames carry the
//! line's bytes as they are after a small JSON header, not as a JSON string
//! (see [`frame_from_worker`]): a CLI line is JSON full of quotes, and
//! escaping it on one side and unescaping it on the other cost more than
//! the rest of the relay.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::Text;

/// Bumped on every incompatible change of the messages below (3: output
/// lines in pieces, [`FromWorker::Output`]'s `partial`; 4: output frames
/// carry the line unescaped, [`frame_from_worker`]).
pub const PROTOCOL_VERSION: u32 = 4;

/// Largest frame either side accepts.
pub const MAX_FRAME_LEN: usize = 32 * 1024 * 1024;

/// Most bytes of a CLI's output one [`FromWorker::Output`] frame carries;
/// longer lines go in several pieces. Far below [`MAX_FRAME_LEN`] even in
/// the worst case: bytes that are not UTF-8 become U+FFFD (3 bytes each),
/// and the frame adds a small header.
pub const OUTPUT_PIECE_LEN: usize = 4 * 1024 * 1024;

const _: () = assert!(3 * OUTPUT_PIECE_LEN + 64 * 1024 <= MAX_FRAME_LEN);

/// The fd the worker finds its control socket on.
pub const CONTROL_FD: i32 = 3;

/// Control plane → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// First frame: the version and the worker's configuration.
    Hello { version: u32, config: Box<WorkerConfig> },
    /// Start the session's CLI process.
    Start { session_id: String, spec: ProcessSpec },
    /// Write `data` to the process's stdin as is (the caller adds `\n`).
    Stdin { session_id: String, data: String },
    /// Send a signal to the process's group (e.g. SIGINT).
    Signal { session_id: String, signal: i32 },
    /// Stop the process: SIGTERM to its group, SIGKILL after `grace_ms`.
    Stop { session_id: String, grace_ms: u64 },
    /// Stop every process and exit.
    Shutdown,
}

/// Worker → control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    /// Confined and ready; what was applied.
    Ready { version: u32, pid: u32, confinement: ConfinementReport },
    /// The session's process runs.
    Started { session_id: String, pid: u32 },
    /// One line of the process's output (without the newline), or one piece
    /// of it: a line longer than [`OUTPUT_PIECE_LEN`] bytes goes in several
    /// frames, in order, each but the last with `partial` set ("the line
    /// continues in the next `Output` frame of the same session and
    /// stream"); the line ends with the first piece whose `partial` is
    /// false. Pieces are cut at character boundaries, so each is valid
    /// UTF-8 on its own. All pieces of a line carry the line's `seq`
    /// (sequence numbers count lines, not frames); lines of the other
    /// stream may come between two pieces.
    Output {
        session_id: String,
        seq: u64,
        stream: OutputStream,
        line: Text,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        partial: bool,
    },
    /// The session's process ended; `seq` is the next sequence number, so
    /// the receiver knows how many lines it should have seen.
    Exited { session_id: String, seq: u64, code: Option<i32>, signal: Option<i32> },
    /// Something failed for one session (or for the worker, without one).
    Error { session_id: Option<String>, message: String },
    /// The worker cannot go on (bad version, confinement failed) and exits.
    Fatal { message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// How to run one CLI process inside the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Must lie inside the worker's user directory.
    pub cwd: PathBuf,
    /// The whole environment (the worker starts from an empty one).
    pub env: Vec<(String, String)>,
    /// `cgroup.procs` files of the session's cgroup, which the process
    /// writes itself into before it executes the program (each must lie in
    /// one of [`LandlockConfig::own_cgroup_dirs`]). Under cgroup v1 only
    /// root or the same uid may move a process, so a non-root server cannot
    /// move its users' CLIs (another uid); a process may always move itself
    /// where the file lets it write.
    #[serde(default)]
    pub join_cgroups: Vec<PathBuf>,
}

/// Everything a worker needs to confine itself and run its user's CLIs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerConfig {
    pub user_id: String,
    /// `<base_dir>/<user_id>`: the only writable place.
    pub user_dir: PathBuf,
    /// The control plane's pid: after PDEATHSIG is set the worker checks its
    /// parent is still this one.
    pub parent_pid: u32,
    /// Privileged mode: drop to this uid/gid (and clear every capability).
    pub drop_to: Option<UserIds>,
    pub landlock: LandlockConfig,
    pub seccomp: SeccompConfig,
    pub rlimits: Rlimits,
    /// `cgroup.procs` files to join (one per v1 hierarchy, or one for v2).
    pub cgroup_procs: Vec<PathBuf>,
    /// Layers allowed to be missing (logged in the report) instead of
    /// stopping the worker.
    pub best_effort: BestEffort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserIds {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LandlockConfig {
    pub enabled: bool,
    /// Refuse to run on a kernel whose Landlock ABI is older.
    pub min_abi: u8,
    /// Readable (and executable) paths: system directories, the CLI's install.
    pub read_only: Vec<PathBuf>,
    /// Device files that must be writable (`/dev/null`, ...).
    pub read_write_files: Vec<PathBuf>,
    /// TCP ports connect() may reach; binding is never allowed.
    pub tcp_connect_ports: Vec<u16>,
    /// The user's own cgroup directories (privileged mode only), where
    /// files may be written (no other right): the control plane hands only
    /// the `cgroup.procs` of the user's session cgroups to the user's uid,
    /// every other file there stays the server's.
    #[serde(default)]
    pub own_cgroup_dirs: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeccompConfig {
    pub enabled: bool,
    /// Also refuse UDP sockets.
    pub deny_udp: bool,
    /// Allow `socket(AF_UNIX)` (connecting to host sockets); socketpair is
    /// always allowed.
    pub allow_unix_sockets: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimits {
    pub nofile: u64,
    /// Largest file a process may write, bytes.
    pub fsize: u64,
    /// Data segment (heap), bytes.
    pub data: u64,
    /// Processes of the uid; applied only with a per-user uid.
    pub nproc: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BestEffort {
    pub landlock: bool,
    pub seccomp: bool,
    pub cgroup: bool,
    pub privileges: bool,
}

/// What the worker applied, for the control plane's log and `/health`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfinementReport {
    pub uid: u32,
    pub gid: u32,
    pub landlock_abi: Option<u8>,
    pub landlock_enforced: bool,
    pub seccomp: bool,
    pub cgroup: bool,
    pub no_new_privs: bool,
    /// Layers that could not be applied (best-effort only).
    pub skipped: Vec<String>,
    /// Microseconds from the worker's start to the end of confinement.
    pub setup_micros: u64,
}

/// First byte of an output frame's body; a JSON body starts with `{`.
const OUTPUT_FRAME_MARK: u8 = 0;

/// The header of an output frame: [`FromWorker::Output`] but its line.
#[derive(Serialize, Deserialize)]
struct OutputHeader<'a> {
    #[serde(borrow)]
    session_id: std::borrow::Cow<'a, str>,
    seq: u64,
    stream: OutputStream,
    #[serde(default)]
    partial: bool,
}

/// A worker message as a whole frame, in two parts to write one after the
/// other: the length prefix with the body's head, then (for `Output`) the
/// line, written from its own buffer rather than copied behind the head.
/// The body is `Output` as a mark byte, its header as JSON, a newline,
/// then the line's bytes unescaped; anything else as JSON.
pub fn frame_from_worker(message: &FromWorker) -> Result<(Vec<u8>, Option<Bytes>), FrameError> {
    let mut head = vec![0; 4];
    let line = match message {
        FromWorker::Output { session_id, seq, stream, line, partial } => {
            let header = OutputHeader { session_id: session_id.into(), seq: *seq, stream: *stream, partial: *partial };
            head.push(OUTPUT_FRAME_MARK);
            serde_json::to_writer(&mut head, &header)?;
            head.push(b'\n');
            Some(line.as_bytes().clone())
        }
        other => {
            serde_json::to_writer(&mut head, other)?;
            None
        }
    };
    let len = head.len() - 4 + line.as_ref().map_or(0, Bytes::len);
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLong(len));
    }
    head[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok((head, line))
}

/// A frame's body (after its length prefix) as [`frame_from_worker`]
/// writes it. An output line stays in the frame's buffer (no copy).
pub fn decode_from_worker(body: Bytes) -> Result<FromWorker, FrameError> {
    let Some(rest) = body.strip_prefix(&[OUTPUT_FRAME_MARK]) else {
        return Ok(serde_json::from_slice(&body)?);
    };
    // Compact JSON holds no raw newline: the first one ends the header.
    let end = rest
        .iter()
        .position(|b| *b == b'\n')
        .ok_or(FrameError::Malformed("an output frame without its header's end"))?;
    let header: OutputHeader = serde_json::from_slice(&rest[..end])?;
    let line =
        Text::try_from(body.slice(end + 2..)).map_err(|_| FrameError::Malformed("an output line that is not UTF-8"))?;
    Ok(FromWorker::Output {
        session_id: header.session_id.into_owned(),
        seq: header.seq,
        stream: header.stream,
        line,
        partial: header.partial,
    })
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLong(usize),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

/// Blocking read of one frame, for the worker before it starts its runtime.
pub fn read_frame_blocking<T: for<'de> Deserialize<'de>>(reader: &mut impl Read) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    reader.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLong(len));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

/// Blocking write of one frame (same format as `LengthDelimitedCodec`).
pub fn write_frame_blocking<T: Serialize>(writer: &mut impl Write, message: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(message)?;
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLong(body.len()));
    }
    writer.write_all(&(body.len() as u32).to_be_bytes())?;
    writer.write_all(&body)?;
    writer.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame's body in one buffer, as the reader sees it.
    fn encode_from_worker(message: &FromWorker) -> Result<Vec<u8>, FrameError> {
        let (head, line) = frame_from_worker(message)?;
        let mut body = head[4..].to_vec();
        body.extend_from_slice(line.as_ref().map_or(&[][..], |line| &line[..]));
        Ok(body)
    }

    #[test]
    fn output_frames_carry_the_line_unescaped_and_round_trip() {
        let line = "{\"type\":\"assistant\",\"text\":\"a \\\"quote\\\", a\nnewline, ünïcödé 🌍\"}";
        let message = FromWorker::Output {
            session_id: "s-1".into(),
            seq: 42,
            stream: OutputStream::Stderr,
            line: line.into(),
            partial: true,
        };
        let body = encode_from_worker(&message).expect("encode");
        assert_eq!(body[0], OUTPUT_FRAME_MARK);
        assert!(body.ends_with(line.as_bytes()), "the line is not sent as it is");
        // As written: the length prefix, the head, then the line from its own buffer.
        let (head, rest) = frame_from_worker(&message).expect("frame");
        let rest = rest.expect("an output frame writes its line after the head");
        assert_eq!(rest, line.as_bytes());
        assert_eq!(&head[..4], &((body.len()) as u32).to_be_bytes());
        assert_eq!([&head[4..], &rest[..]].concat(), body);
        assert_eq!(decode_from_worker(body.into()).expect("decode"), message);
        // Every other message is plain JSON, both ways.
        let exited = FromWorker::Exited { session_id: "s-1".into(), seq: 43, code: Some(0), signal: None };
        let body = encode_from_worker(&exited).expect("encode");
        assert_eq!(body, serde_json::to_vec(&exited).expect("json"));
        assert_eq!(decode_from_worker(body.into()).expect("decode"), exited);
        // Broken output frames are errors, not panics.
        for broken in [
            &b"\0{\"session_id\":\"s\"}"[..],
            b"\0{}\nline",
            b"\0{\"session_id\":\"s\",\"seq\":1,\"stream\":\"stdout\"}\n\xff",
            b"\0",
        ] {
            assert!(decode_from_worker(Bytes::from_static(broken)).is_err(), "{broken:?}");
        }
    }

    #[test]
    fn frames_round_trip_and_oversized_ones_are_refused() {
        let message = FromWorker::Output {
            session_id: "s1".into(),
            seq: 7,
            stream: OutputStream::Stdout,
            line: "{\"type\":\"result\"}".into(),
            partial: false,
        };
        let mut buffer = Vec::new();
        write_frame_blocking(&mut buffer, &message).expect("write");
        assert_eq!(&buffer[..4], &((buffer.len() - 4) as u32).to_be_bytes());
        let read: FromWorker = read_frame_blocking(&mut buffer.as_slice()).expect("read");
        assert_eq!(read, message);

        let mut huge = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(matches!(read_frame_blocking::<FromWorker>(&mut huge.as_slice()), Err(FrameError::TooLong(_))));
        let mut garbage = 3u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"{x]");
        assert!(matches!(read_frame_blocking::<FromWorker>(&mut garbage.as_slice()), Err(FrameError::Json(_))));
    }

    /// Cuts `line` into pieces of at most `max` bytes at char boundaries,
    /// as the worker does.
    fn pieces(line: &str, max: usize) -> Vec<&str> {
        let mut pieces = Vec::new();
        let mut rest = line;
        while rest.len() > max {
            let mut cut = max;
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            let (piece, tail) = rest.split_at(cut);
            pieces.push(piece);
            rest = tail;
        }
        pieces.push(rest);
        pieces
    }

    #[test]
    fn a_long_line_split_in_pieces_round_trips() {
        // 2.5 pieces of text with multi-byte characters and characters JSON
        // escapes, so cuts fall inside characters.
        let unit = "é\u{1F600}x\"\\\n\u{1}€";
        let line = unit.repeat(OUTPUT_PIECE_LEN * 5 / 2 / unit.len());
        let pieces = pieces(&line, OUTPUT_PIECE_LEN);
        assert_eq!(pieces.len(), 3);
        let mut wire = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let message = FromWorker::Output {
                session_id: "s1".into(),
                seq: 41,
                stream: OutputStream::Stdout,
                line: (*piece).to_owned().into(),
                partial: i + 1 < pieces.len(),
            };
            write_frame_blocking(&mut wire, &message).expect("a piece fits in a frame");
        }
        let mut reader = wire.as_slice();
        let mut assembled = String::new();
        loop {
            let FromWorker::Output { seq, line, partial, .. } = read_frame_blocking(&mut reader).expect("read") else {
                panic!("not an output frame");
            };
            assert_eq!(seq, 41, "every piece carries the line's seq");
            assert!(line.len() <= OUTPUT_PIECE_LEN);
            assembled.push_str(&line);
            if !partial {
                break;
            }
        }
        assert!(reader.is_empty());
        assert_eq!(assembled, line);
    }

    #[test]
    fn partial_is_left_out_when_false_and_defaults_to_false() {
        let whole = FromWorker::Output {
            session_id: "s".into(),
            seq: 0,
            stream: OutputStream::Stderr,
            line: "x".into(),
            partial: false,
        };
        let json = serde_json::to_string(&whole).expect("json");
        assert!(!json.contains("partial"), "{json}");
        assert_eq!(serde_json::from_str::<FromWorker>(&json).expect("parse"), whole);
        let FromWorker::Output { session_id, seq, stream, line, .. } = whole else { unreachable!() };
        let piece = FromWorker::Output { session_id, seq, stream, line, partial: true };
        let json = serde_json::to_string(&piece).expect("json");
        assert!(json.contains(r#""partial":true"#), "{json}");
        assert_eq!(serde_json::from_str::<FromWorker>(&json).expect("parse"), piece);
    }
}
