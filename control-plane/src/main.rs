//! `claude-agent-http`: see the library crate for everything.

fn main() -> std::process::ExitCode {
    control_plane::cli::main()
}
