//! `mock-model [--host HOST] [--port PORT]`: serve the mock Anthropic Messages API (see the library docs).
//! Prints `mock-model listening on http://ADDR` on stdout once it accepts connections; logs requests to stderr
//! (`RUST_LOG`, default `mock_model=info`).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use tokio::net::TcpListener;

const USAGE: &str = "usage: mock-model [--host HOST] [--port PORT]   (PORT 0 picks a free port; default 127.0.0.1:0)";

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("mock_model=info")),
        )
        .init();

    let mut host = "127.0.0.1".to_owned();
    let mut port: u16 = 0;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        match name.as_str() {
            "--port" | "--host" => {
                let Some(value) = inline.or_else(|| args.next()) else {
                    eprintln!("{name} needs a value\n{USAGE}");
                    return ExitCode::from(2);
                };
                if name == "--host" {
                    host = value;
                } else if let Ok(p) = value.parse() {
                    port = p;
                } else {
                    eprintln!("--port: not a port: {value}\n{USAGE}");
                    return ExitCode::from(2);
                }
            }
            "-h" | "--help" => {
                eprintln!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("unknown argument {arg}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }

    let listener = match TcpListener::bind((host.as_str(), port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mock-model: cannot listen on {host}:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mock-model: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "mock-model listening on http://{addr}").and_then(|()| stdout.flush()).is_err() {
        return ExitCode::FAILURE;
    }
    drop(stdout);
    match mock_model::serve(listener, mock_model::MockModel::new()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mock-model: {e}");
            ExitCode::FAILURE
        }
    }
}
