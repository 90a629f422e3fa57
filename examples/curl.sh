#!/usr/bin/env bash
# claude-agent-http from the shell: curl for HTTP, jq for JSON.
#
# Creates a session, streams a chat turn over Server-Sent Events, drops the
# connection on purpose and picks the turn up again with Last-Event-ID, reads
# the session's history, resumes the session and sends a follow-up message.
#
#   BASE_URL=http://127.0.0.1:8000 TOKEN=cah_... bash examples/curl.sh
#
# Environment:
#   BASE_URL          the server (default http://127.0.0.1:8000)
#   TOKEN             a user's API token (required; see README "A curl session")
#   MESSAGE           the streamed message (default: a short greeting request)
#   FOLLOW_UP         the message sent after the resume
#   DISCONNECT_AFTER  text frames read before dropping the first connection (default 2)
#   KEEP_SESSION      1: do not delete the session at the end
#
# Prints one line per step and exits non-zero on the first failure.
set -euo pipefail

BASE_URL=${BASE_URL:-http://127.0.0.1:8000}
BASE_URL=${BASE_URL%/}
TOKEN=${TOKEN:?set TOKEN to a user API token}
MESSAGE=${MESSAGE:-Say hello in one short sentence.}
FOLLOW_UP=${FOLLOW_UP:-Now say goodbye in one short sentence.}
DISCONNECT_AFTER=${DISCONNECT_AFTER:-2}
KEEP_SESSION=${KEEP_SESSION:-0}

for tool in curl jq; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 1; }
done

fail() { echo "error: $*" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# api METHOD PATH [JSON_BODY]: prints the response body; fails on a non-2xx status.
api() {
  local method=$1 path=$2 body=${3-} status
  local args=(-sS -X "$method" -H "Authorization: Bearer $TOKEN" -o "$WORK/body" -w '%{http_code}')
  if [ -n "$body" ]; then
    args+=(-H 'Content-Type: application/json' --data-binary "$body")
  fi
  status=$(curl "${args[@]}" "$BASE_URL$path") || fail "$method $path: curl failed"
  case "$status" in
    2??) cat "$WORK/body" ;;
    *) fail "$method $path answered $status: $(cat "$WORK/body")" ;;
  esac
}

# Stream state, shared by read_sse's callers.
LAST_ID=""        # id of the last frame received
TERMINAL=""       # "done" or "error" once the turn's final frame arrived
REPLY=""          # text_delta frames concatenated
RESULT_TEXT=""    # the result frame's text
FRAMES=0          # frames read by the last read_sse

# read_sse LIMIT CURL_ARGS...: runs curl and parses its SSE body. Stops after
# the turn's done/error frame, at the end of the body, or, when LIMIT > 0, after
# LIMIT text_delta frames (closing the connection early, as a flaky network would).
read_sse() {
  local limit=$1 deltas=0 ended="" line id="" data="" kind text curl_pid status=0
  shift
  FRAMES=0
  exec {sse}< <(exec curl -sS -N --fail-with-body -H "Authorization: Bearer $TOKEN" \
    -H 'Accept: text/event-stream' "$@")
  curl_pid=$!
  while IFS= read -r line <&"$sse" || [ -n "$line" ]; do
    line=${line%$'\r'}
    case "$line" in
      "")  # end of an event
        if [ -n "$data" ]; then
          FRAMES=$((FRAMES + 1))
          [ -n "$id" ] && LAST_ID=$id
          kind=$(jq -r '.type' <<<"$data")
          text=$(jq -j '.text // ""' <<<"$data"; printf x)
          text=${text%x}
          case "$kind" in
            text_delta)
              REPLY+=$text
              deltas=$((deltas + 1))
              printf '  frame %s: text_delta %s\n' "${id:-?}" "$(jq -c '.text' <<<"$data")" ;;
            result)
              RESULT_TEXT=$text
              printf '  frame %s: result (is_error %s, cost $%s)\n' "${id:-?}" \
                "$(jq -r '.is_error' <<<"$data")" "$(jq -r '.total_cost_usd' <<<"$data")" ;;
            gap)
              printf '  gap: %s\n' "$(jq -r '.error' <<<"$data")" ;;
            done)
              TERMINAL=done ended=1
              printf '  frame %s: done\n' "${id:-?}" ;;
            error)
              TERMINAL=error ended=1
              printf '  frame %s: error %s\n' "${id:-?}" "$(jq -r '.error' <<<"$data")" ;;
            *)
              printf '  frame %s: %s\n' "${id:-?}" "$kind" ;;
          esac
        fi
        id="" data=""
        [ -n "$ended" ] && break
        if [ "$limit" -gt 0 ] && [ "$deltas" -ge "$limit" ]; then break; fi
        ;;
      :*) ;;  # a keep-alive comment
      id:*) id=${line#id:}; id=${id# } ;;
      data:*) text=${line#data:}; data=${data:+$data$'\n'}${text# } ;;
      '{'*) echo "  response: $line" >&2 ;;  # an error body (--fail-with-body)
      *) ;;
    esac
  done
  exec {sse}<&-
  if kill -0 "$curl_pid" 2>/dev/null; then
    kill "$curl_pid" 2>/dev/null || true   # we hung up on purpose
    wait "$curl_pid" 2>/dev/null || true
  else
    wait "$curl_pid" || status=$?
    [ "$status" -eq 0 ] || fail "the stream request failed (curl exit $status)"
  fi
}

# 1. Is the server up? (/health needs no token.)
health=$(curl -sS --fail-with-body "$BASE_URL/health") || fail "GET /health: $health"
echo "health: $(jq -r '"\(.status) (version \(.version), storage \(.storage_type))"' <<<"$health")"

# 2. A session (in the user's directory; metadata is free-form).
session=$(api POST /api/v1/sessions '{"metadata": {"example": "curl"}}')
SESSION_ID=$(jq -r '.session_id' <<<"$session")
[ -n "$SESSION_ID" ] && [ "$SESSION_ID" != null ] || fail "no session_id in $session"
echo "session: created $SESSION_ID"

# 3. A streamed turn; hang up after a few text frames.
body=$(jq -n --arg s "$SESSION_ID" --arg m "$MESSAGE" '{session_id: $s, message: $m, timeout: 120}')
echo "stream: POST /api/v1/chat/stream"
read_sse "$DISCONNECT_AFTER" -X POST -H 'Content-Type: application/json' --data-binary "$body" \
  "$BASE_URL/api/v1/chat/stream"
[ "$FRAMES" -gt 0 ] || fail "the stream sent no frame"
if [ -z "$TERMINAL" ]; then
  echo "stream: $FRAMES frames, last id $LAST_ID; disconnected on purpose"
else
  echo "stream: $FRAMES frames, the turn ended ($TERMINAL) before the planned disconnect"
fi

# 4. Reconnect: the frames after LAST_ID (still buffered by the server), then
#    live ones until the turn's end. The turn kept running while we were away.
echo "reconnect: GET /api/v1/sessions/$SESSION_ID/stream with Last-Event-ID $LAST_ID"
read_sse 0 -H "Last-Event-ID: $LAST_ID" "$BASE_URL/api/v1/sessions/$SESSION_ID/stream"
echo "reconnect: $FRAMES more frames, turn ended with ${TERMINAL:-nothing}"
[ "$TERMINAL" = done ] || fail "the turn did not end with done"
[ "$REPLY" = "$RESULT_TEXT" ] || fail "streamed text \"$REPLY\" differs from the result \"$RESULT_TEXT\""
echo "reply: $REPLY"

# 5. The stored history, oldest first.
history=$(api GET "/api/v1/sessions/$SESSION_ID/messages")
echo "history: $(jq -r '"\(.messages | length) messages (\(.messages | map(.kind) | join(", ")))"' <<<"$history")"
[ "$(jq -r '.messages[-1].content.result' <<<"$history")" = "$RESULT_TEXT" ] \
  || fail "the history's last result is not the reply"

# 6. Resume (reopens an expired session; a no-op for an open one) and go on.
resumed=$(api POST "/api/v1/sessions/$SESSION_ID/resume")
echo "resume: status $(jq -r '.status' <<<"$resumed")"
body=$(jq -n --arg s "$SESSION_ID" --arg m "$FOLLOW_UP" '{session_id: $s, message: $m, timeout: 120}')
answer=$(api POST /api/v1/chat "$body")
[ "$(jq -r '.is_error' <<<"$answer")" = false ] || fail "the follow-up failed: $answer"
echo "follow-up: $(jq -r '.text' <<<"$answer")"

# 7. Clean up (the directory stays on the server).
if [ "$KEEP_SESSION" = 1 ]; then
  echo "kept: $SESSION_ID"
else
  api DELETE "/api/v1/sessions/$SESSION_ID" >/dev/null
  echo "deleted: $SESSION_ID"
fi
echo ok
