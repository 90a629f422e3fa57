#!/usr/bin/env bash
# Fuzzes the whole API from its own OpenAPI document with schemathesis
# (pinned, from PyPI, installed into a venv under target/), against the real
# server binary on a loopback port with a fresh SQLite database:
#   - every operation, with the admin token, a fixed seed and a bounded
#     number of examples (examples, coverage, fuzzing and stateful phases);
#   - checks: not_a_server_error (no 5xx at all), response_schema_conformance
#     and status_code_conformance (every status and body is the documented one);
#   - afterwards the server must still be running and GET /health answer 200.
# Exits non-zero on any failure, printing the failing cases (with curl
# commands to reproduce them) and the end of the server's log.
#
# Environment: FUZZ_SEED (default 20261125), FUZZ_MAX_EXAMPLES (per operation
# and phase, default 25), FUZZ_PHASES (default all four), FUZZ_REPORTS
# (schemathesis --report, default junit), FUZZ_TIMEOUT (seconds for the whole
# schemathesis run, default 900), FUZZ_KEEP=1 keeps the temporary directory
# (server log, reports), FUZZ_DATABASE_URL=postgres://... runs the server on
# PostgreSQL (a schema of its own, dropped at the end) instead of SQLite.
# A schemathesis that cannot be installed fails the run (CI=true or not):
# the fuzzing is never skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
SEED="${FUZZ_SEED:-20261125}"
MAX_EXAMPLES="${FUZZ_MAX_EXAMPLES:-25}"
VENV=target/fuzz-venv
started_at=$(date +%s)

say() { printf '\n== %s\n' "$*"; }

say "schemathesis $SCHEMATHESIS_VERSION (venv $VENV)"
installed() { [ -x "$VENV/bin/schemathesis" ] && [ "$("$VENV/bin/schemathesis" --version 2>/dev/null)" = "schemathesis, version $SCHEMATHESIS_VERSION" ]; }
if ! installed; then
  { python3 -m venv "$VENV" && "$VENV/bin/pip" install --quiet --disable-pip-version-check \
      "schemathesis==$SCHEMATHESIS_VERSION"; } || true
fi
if ! installed; then
  # Never skipped, in CI (CI=true) or not: like every other dependency of
  # scripts/test.sh, a missing one fails the run.
  echo "FAILED: schemathesis $SCHEMATHESIS_VERSION could not be installed into $VENV" \
    "(python3 -m venv and pip reaching PyPI are required); the API was not fuzzed (CI=${CI:-unset})" >&2
  exit 1
fi
"$VENV/bin/schemathesis" --version

say "build"
cargo build --workspace --bins --locked
for bin in claude-agent-http mock-model; do
  [ -x "target/debug/$bin" ] || { echo "target/debug/$bin missing after the build" >&2; exit 1; }
done
cli=node_modules/@anthropic-ai/claude-code-linux-x64/claude
[ -x "$cli" ] || { echo "$cli missing: run \`npm ci --ignore-scripts\` first (scripts/test.sh does)" >&2; exit 1; }

say "server"
work=$(mktemp -d /tmp/fuzz-api.XXXXXX)
pg_schema="fuzz_$(basename "$work" | tr -dc 'a-zA-Z0-9' | tr 'A-Z' 'a-z')"
server_pid=
mock_pid=
stop() { # pid: SIGTERM, then SIGKILL after 10 s
  [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 0
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
}
cleanup() {
  stop "$server_pid"
  stop "$mock_pid"
  if [ -n "${FUZZ_DATABASE_URL:-}" ] && command -v psql >/dev/null; then
    psql -q "$FUZZ_DATABASE_URL" -c "DROP SCHEMA IF EXISTS \"$pg_schema\" CASCADE" >/dev/null 2>&1 || true
  fi
  if [ "${FUZZ_KEEP:-}" = "1" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
# Waits for "<name> listening on URL" in file $2 of process $3; prints URL.
listening() {
  local url=
  for _ in $(seq 1 600); do
    url=$(sed -n "s/^$1 listening on //p" "$2" | head -n1)
    [ -n "$url" ] && { echo "$url"; return 0; }
    kill -0 "$3" 2>/dev/null || break
    sleep 0.1
  done
  return 1
}

# The model the sessions' CLIs talk to (through the server's model proxy).
target/debug/mock-model --port 0 >"$work/mock.out" 2>"$work/mock.log" </dev/null &
mock_pid=$!
mock_url=$(listening mock-model "$work/mock.out" "$mock_pid") \
  || { echo "the mock model did not start:" >&2; cat "$work/mock.log" >&2; exit 1; }

mkdir -p "$work/users" "$work/db"
# Users' uids traverse (not list) the directory to their own, as in the tests.
chmod 0711 "$work"
# Limits high enough that the fuzzer's own volume of sessions is never what
# answers (a 503 for "server at capacity" would be a correct answer, but
# this run checks that nothing answers 5xx). Sessions run the real pinned
# CLI in its sandbox against the mock model, so chat turns really complete.
cat >"$work/config.yaml" <<EOF
api:
  host: 127.0.0.1
  port: 0
  max_sessions: 100000
  max_sessions_per_user: 100000
  max_warm_sessions: 8
  max_warm_sessions_per_user: 8
  memory_limit_mb: 0
user:
  base_dir: $work/users
session:
$(if [ -n "${FUZZ_DATABASE_URL:-}" ]; then
    printf '  storage: postgresql\n  database_url: %s\n  pg_schema: %s\n' "$FUZZ_DATABASE_URL" "$pg_schema"
  else
    printf '  storage: sqlite\n  sqlite_path: %s\n' "$work/db/sessions.db"
  fi)
log:
  level: info,sqlx=warn
  format: json
EOF
admin_token="fuzz-admin-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
env -i PATH="$PATH" HOME="$work" \
  CLAUDE_AGENT_ADMIN_TOKEN="$admin_token" \
  CLAUDE_AGENT_CLI_PATH="$PWD/$cli" ANTHROPIC_BASE_URL="$mock_url" \
  target/debug/claude-agent-http --config "$work/config.yaml" \
  >"$work/server.out" 2>"$work/server.log" </dev/null &
server_pid=$!
base_url=$(listening claude-agent-http "$work/server.out" "$server_pid") \
  || { echo "the server did not start; its log:" >&2; cat "$work/server.log" >&2; exit 1; }
echo "listening on $base_url (pid $server_pid)"

# Three adjustments to the generated requests (hooks.py), so that what is
# checked is the server and not the run's own setup:
# - The run's own credential must survive it: the fuzzer may delete any user
#   and revoke any token (and does: it learns ids from the listings), but not
#   the admin user or the token it authenticates with, else every later
#   request is a 401 and nothing past authentication is tested.
# - A generated chat request rarely names an existing session (the document
#   has no link from a created session into a chat body), so one chat request
#   in three that has a well-formed session id gets a live session's instead:
#   real turns of the real CLI, sync and streamed, are fuzzed too. That
#   session is kept from DELETE like the credential.
# - A chat `timeout` below 60 s is raised to 60: a real CLI turn on a loaded
#   machine may take longer than a few seconds, and its documented answer
#   then is 504, which would count as a 5xx. Out-of-range timeouts (< 1,
#   > 600, not an integer) are kept, so their 422 is still tested.
admin_token_id=$(curl -sf --max-time 10 -H "Authorization: Bearer $admin_token" "$base_url/api/v1/users/admin/tokens" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["token_id"])') \
  || { echo "cannot read the admin token's id" >&2; exit 1; }
chat_session=$(curl -sf --max-time 30 -H "Authorization: Bearer $admin_token" -H 'Content-Type: application/json' \
  -d '{"metadata": {"purpose": "fuzz chat"}}' "$base_url/api/v1/sessions" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["session_id"])') \
  || { echo "cannot create the chat session" >&2; exit 1; }
cat >"$work/hooks.py" <<'EOF'
import itertools
import os
import re

import schemathesis

CHAT_SESSION = os.environ["FUZZ_CHAT_SESSION"]
KEEP = {
    "/api/v1/users/{user_id}": ("user_id", "admin"),
    "/api/v1/tokens/{token_id}": ("token_id", os.environ["FUZZ_ADMIN_TOKEN_ID"]),
    "/api/v1/sessions/{session_id}": ("session_id", CHAT_SESSION),
}
chats = itertools.count()


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    method = str(case.method).upper()
    keep = KEEP.get(case.operation.path)
    if method == "DELETE" and keep and case.path_parameters:
        name, value = keep
        if str(case.path_parameters.get(name)) == value:
            case.path_parameters[name] = value + "-kept-by-fuzz"
    if method == "POST" and case.operation.path.startswith("/api/v1/chat") and isinstance(case.body, dict):
        session = case.body.get("session_id")
        if isinstance(session, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,200}", session) and next(chats) % 3 == 0:
            case.body["session_id"] = CHAT_SESSION
        timeout = case.body.get("timeout")
        if type(timeout) is int and 1 <= timeout < 60:
            case.body["timeout"] = 60
EOF

say "schemathesis run (seed $SEED, at most $MAX_EXAMPLES examples per operation and phase)"
cat >"$work/schemathesis.toml" <<EOF
# The stream routes are read up to this many SSE events.
max-stream-events = 50
request-timeout = 30

[generation]
database = "none"

[phases.stateful]
max-steps = 200
EOF
status=0
# Each request is bounded (request-timeout) and so is the number of cases; the
# whole run is bounded too, so a hang fails the run instead of stalling CI.
(cd "$work" && timeout --kill-after=30 "${FUZZ_TIMEOUT:-900}" env SCHEMATHESIS_HOOKS="$work/hooks.py" FUZZ_ADMIN_TOKEN_ID="$admin_token_id" FUZZ_CHAT_SESSION="$chat_session" \
  "$OLDPWD/$VENV/bin/schemathesis" --config-file "$work/schemathesis.toml" run "$base_url/openapi.json" \
  --url "$base_url" \
  --header "Authorization: Bearer $admin_token" \
  --checks not_a_server_error,response_schema_conformance,status_code_conformance \
  --phases "${FUZZ_PHASES:-examples,coverage,fuzzing,stateful}" \
  --seed "$SEED" \
  --max-examples "$MAX_EXAMPLES" \
  --workers 2 \
  --no-color \
  --report "${FUZZ_REPORTS:-junit}" --report-dir "$work/report") || status=$?
[ "$status" -ne 124 ] && [ "$status" -ne 137 ] \
  || echo "FAILED: schemathesis did not finish within ${FUZZ_TIMEOUT:-900} s" >&2

say "server after the run"
if ! kill -0 "$server_pid" 2>/dev/null; then
  echo "FAILED: the server process is gone" >&2
  status=1
fi
health=$(curl -s -o "$work/health.json" -w '%{http_code}' --max-time 10 "$base_url/health" || true)
echo "GET /health: $health $(cat "$work/health.json" 2>/dev/null)"
[ "$health" = "200" ] || { echo "FAILED: /health is not 200 after the run" >&2; status=1; }
me=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -H "Authorization: Bearer $admin_token" "$base_url/api/v1/me" || true)
echo "GET /api/v1/me as the run's admin: $me"
[ "$me" = "200" ] || { echo "FAILED: the run's admin token no longer works (the run tested little past authentication)" >&2; status=1; }
if grep -q '"level":"ERROR"' "$work/server.log"; then
  echo "the server logged errors:"
  grep '"level":"ERROR"' "$work/server.log" | tail -n 20
fi
if grep -qi 'panicked' "$work/server.log"; then
  echo "FAILED: the server panicked:" >&2
  grep -i -A5 'panicked' "$work/server.log" | tail -n 40 >&2
  status=1
fi
if [ "$status" -ne 0 ]; then
  echo "last lines of the server log:"
  tail -n 40 "$work/server.log"
fi
echo "fuzz-api: $(($(date +%s) - started_at)) s, exit $status"
exit "$status"
