//! Types shared by the control plane (`claude-agent-http`) and the worker
//! (`claude-agent-worker`).
//!
//! [`protocol`] is the worker protocol. [`names`] holds the syntactic rules for the names that end up in file
//! system paths (user ids, session ids, sub-directories). Both sides check
//! them: the control plane before it stores anything, the worker again before
//! it opens a directory, so a bug on one side cannot become a path escape.

pub mod names;
pub mod protocol;
pub mod text;

pub use text::Text;
