#!/usr/bin/env bash
# Sets up what the test suite needs on a fresh machine and runs all of it:
# the pinned Claude CLI (npm), PostgreSQL at 127.0.0.1:5432, the workspace's
# binaries, then every unit, conformance and integration test.
# Nothing is skipped: a missing dependency fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

say "toolchain"
command -v cargo >/dev/null || { echo "cargo is required (rustup)" >&2; exit 1; }
cargo --version

say "tools the tests run (bash, git, rg, curl inside workers; jq for the curl example; a Compose client for \`config\`; setcap for the non-root sandbox test)"
if ! command -v rg >/dev/null || ! command -v git >/dev/null || ! command -v curl >/dev/null \
  || ! command -v jq >/dev/null || ! { docker compose version || command -v docker-compose; } >/dev/null 2>&1 \
  || ! command -v setcap >/dev/null || ! command -v getcap >/dev/null; then
  apt-get update -qq && apt-get install -y -qq ripgrep git curl jq docker-compose libcap2-bin
fi

say "Python for the Python example (python3 >= 3.10 with venv, ensurepip and pip; the test builds a venv)"
if ! python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1 \
  || ! python3 -m pip --version >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq python3 python3-venv python3-pip
fi
python3 --version

say "Node >= 18 and npm (the Claude CLI's npm ci; the TypeScript example, which its test installs with npm ci and compiles)"
node_ok() { node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)' >/dev/null 2>&1; }
if ! node_ok || ! command -v npm >/dev/null; then
  apt-get update -qq && apt-get install -y -qq nodejs npm
fi
node_ok || { echo "Node >= 18 is required (found: $(node --version 2>&1))" >&2; exit 1; }
node --version

say "Claude CLI (pinned in package.json / package-lock.json)"
npm ci --ignore-scripts --no-audit --no-fund
test -x node_modules/@anthropic-ai/claude-code-linux-x64/claude \
  || { echo "the Claude CLI binary is missing after npm ci" >&2; exit 1; }

say "PostgreSQL at 127.0.0.1:5432"
pg_ready() { (command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432) \
  || (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
if ! pg_ready && [ -d /etc/postgresql ]; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 1 30); do pg_ready && break; sleep 1; done
fi
pg_ready || { echo "PostgreSQL is not reachable at 127.0.0.1:5432: the store and API tests need it" >&2; exit 1; }

say "build"
cargo build --workspace --bins --locked

say "tests"
cargo test --workspace --locked

say "API fuzzing (schemathesis from the OpenAPI document, fixed seed)"
bash scripts/fuzz-api.sh

say "benchmark harness, quick (proves it runs; no pass/fail on time)"
target/debug/bench --quick --out target/BENCHMARKS.quick.md >/dev/null
