#!/usr/bin/env python3
"""claude-agent-http from Python, with httpx and a small Server-Sent Events parser.

Creates a session, streams a chat turn over SSE, drops the connection on purpose
and picks the turn up again with Last-Event-ID, reads the session's history,
resumes the session and sends a follow-up message.

    python3 -m venv .venv && .venv/bin/pip install -r examples/python/requirements.txt
    BASE_URL=http://127.0.0.1:8000 TOKEN=cah_... .venv/bin/python examples/python/client.py

Environment:
    BASE_URL          the server (default http://127.0.0.1:8000)
    TOKEN             a user's API token (required)
    MESSAGE           the streamed message (default: a short greeting request)
    FOLLOW_UP         the message sent after the resume
    DISCONNECT_AFTER  text frames read before dropping the first connection (default 2)
    KEEP_SESSION      1: do not delete the session at the end

Prints one line per step and exits non-zero on the first failure.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import httpx


class Failure(Exception):
    """A step that did not go as it should."""


@dataclass
class Event:
    """One SSE event: its `id:` (absent on keep-alives and `gap` frames) and its JSON `data:`."""

    id: Optional[str]
    data: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.data.get("type", ""))


def sse_events(response: httpx.Response) -> Iterator[Event]:
    """Parses a `text/event-stream` body as it arrives (comments are keep-alives)."""
    event_id: Optional[str] = None
    data: list[str] = []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield Event(event_id, json.loads("\n".join(data)))
            event_id, data = None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "id":
            event_id = value
        elif name == "data":
            data.append(value)
    if data:
        yield Event(event_id, json.loads("\n".join(data)))


@dataclass
class Turn:
    """What the client knows of one turn, across connections."""

    last_id: Optional[str] = None
    reply: str = ""
    result: Optional[dict[str, Any]] = None
    terminal: Optional[str] = None  # "done" or "error"
    frames: int = field(default=0)

    def read(self, response: httpx.Response, stop_after_deltas: int = 0) -> int:
        """Reads frames until the turn's end or, if `stop_after_deltas` > 0, until that many
        text frames arrived. Returns the number of frames read."""
        count = deltas = 0
        for event in sse_events(response):
            count += 1
            if event.id is not None:
                self.last_id = event.id
            kind = event.type
            if kind == "text_delta":
                text = event.data.get("text") or ""
                self.reply += text
                deltas += 1
                print(f"  frame {event.id}: text_delta {json.dumps(text)}")
            elif kind == "result":
                self.result = event.data
                print(f"  frame {event.id}: result (is_error {json.dumps(event.data.get('is_error'))}, "
                      f"cost ${event.data.get('total_cost_usd')})")
            elif kind == "gap":
                print(f"  gap: {event.data.get('error')}")
            elif kind in ("done", "error"):
                self.terminal = kind
                detail = f" {event.data.get('error')}" if kind == "error" else ""
                print(f"  frame {event.id}: {kind}{detail}")
                break
            else:
                print(f"  frame {event.id}: {kind}")
            if stop_after_deltas and deltas >= stop_after_deltas:
                break
        self.frames += count
        return count


def checked(response: httpx.Response) -> httpx.Response:
    """Fails on a non-2xx status, with the server's JSON error."""
    if not response.is_success:
        response.read()
        raise Failure(f"{response.request.method} {response.request.url.path} answered "
                      f"{response.status_code}: {response.text}")
    return response


def run() -> None:
    base_url = os.environ.get("BASE_URL", "http://127.0.0.1:8000").rstrip("/")
    token = os.environ.get("TOKEN")
    if not token:
        raise Failure("set TOKEN to a user API token")
    message = os.environ.get("MESSAGE", "Say hello in one short sentence.")
    follow_up = os.environ.get("FOLLOW_UP", "Now say goodbye in one short sentence.")
    disconnect_after = int(os.environ.get("DISCONNECT_AFTER", "2"))
    keep_session = os.environ.get("KEEP_SESSION") == "1"

    # Frames can be seconds apart while the model thinks (keep-alives come every 15 s).
    timeout = httpx.Timeout(30.0, read=300.0)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=timeout) as client:
        # 1. Is the server up? (/health needs no token.)
        health = checked(client.get("/health")).json()
        print(f"health: {health['status']} (version {health['version']}, storage {health['storage_type']})")

        # 2. A session (in the user's directory; metadata is free-form).
        session = checked(client.post("/api/v1/sessions", json={"metadata": {"example": "python"}})).json()
        session_id = session["session_id"]
        print(f"session: created {session_id}")

        # 3. A streamed turn; hang up after a few text frames.
        turn = Turn()
        print("stream: POST /api/v1/chat/stream")
        body = {"session_id": session_id, "message": message, "timeout": 120}
        with client.stream("POST", "/api/v1/chat/stream", json=body) as response:
            count = turn.read(checked(response), stop_after_deltas=disconnect_after)
        # Leaving the `with` block closed the connection; the turn goes on on the server.
        if count == 0:
            raise Failure("the stream sent no frame")
        if turn.terminal is None:
            print(f"stream: {count} frames, last id {turn.last_id}; disconnected on purpose")
        else:
            print(f"stream: {count} frames, the turn ended ({turn.terminal}) before the planned disconnect")

        # 4. Reconnect: the frames after last_id still buffered, then live ones until the end.
        print(f"reconnect: GET /api/v1/sessions/{session_id}/stream with Last-Event-ID {turn.last_id}")
        resume_headers = {"Last-Event-ID": turn.last_id or "0", "Accept": "text/event-stream"}
        with client.stream("GET", f"/api/v1/sessions/{session_id}/stream", headers=resume_headers) as response:
            count = turn.read(checked(response))
        print(f"reconnect: {count} more frames, turn ended with {turn.terminal}")
        if turn.terminal != "done" or turn.result is None:
            raise Failure("the turn did not end with a result and done")
        if turn.reply != turn.result.get("text"):
            raise Failure(f"streamed text {turn.reply!r} differs from the result {turn.result.get('text')!r}")
        print(f"reply: {turn.reply}")

        # 5. The stored history, oldest first (paginate with `after` = next_after).
        history = checked(client.get(f"/api/v1/sessions/{session_id}/messages")).json()
        kinds = [m["kind"] for m in history["messages"]]
        print(f"history: {len(kinds)} messages ({', '.join(kinds)})")
        if not kinds or history["messages"][-1]["content"].get("result") != turn.reply:
            raise Failure("the history's last result is not the reply")

        # 6. Resume (reopens an expired session; a no-op for an open one) and go on.
        resumed = checked(client.post(f"/api/v1/sessions/{session_id}/resume")).json()
        print(f"resume: status {resumed['status']}")
        answer = checked(client.post("/api/v1/chat", json={"session_id": session_id, "message": follow_up,
                                                           "timeout": 120})).json()
        if answer["is_error"]:
            raise Failure(f"the follow-up failed: {answer}")
        print(f"follow-up: {answer['text']}")

        # 7. Clean up (the directory stays on the server).
        if keep_session:
            print(f"kept: {session_id}")
        else:
            checked(client.delete(f"/api/v1/sessions/{session_id}"))
            print(f"deleted: {session_id}")
    print("ok")


def main() -> int:
    try:
        run()
    except (Failure, httpx.HTTPError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
