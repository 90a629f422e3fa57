#!/usr/bin/env bash
# Builds and starts claude-agent-http on a fresh machine with the defaults:
# SQLite in ./data, users' directories in ./data/users, http://127.0.0.1:8000.
# On first start the server prints an admin token once (or set
# CLAUDE_AGENT_ADMIN_TOKEN to choose one). Extra arguments go to the server.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required (rustup)" >&2; exit 1; }
if command -v npm >/dev/null; then
  npm ci --ignore-scripts --no-audit --no-fund
else
  echo "npm not found: the Claude CLI is not installed (needed for chat, not for the sessions API)" >&2
fi
cargo build --release --locked --bins
exec target/release/claude-agent-http "$@"
