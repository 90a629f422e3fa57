-- Every model request the model proxy answered (forwarded or refused): the
-- audit log and the source of metering. No foreign keys: a request outlives
-- its session (a deleted session stays audited, and a request may be recorded
-- after its session was deleted); the store deletes a user's requests with the
-- user. Tool calls are JSON text, returned exactly as written.
CREATE TABLE model_requests (
    request_id            TEXT PRIMARY KEY,
    user_id               TEXT NOT NULL,
    session_id            TEXT NOT NULL,
    at                    TEXT NOT NULL,
    method                TEXT NOT NULL,
    path                  TEXT NOT NULL,
    model                 TEXT,
    status                INTEGER NOT NULL,
    input_tokens          INTEGER NOT NULL,
    output_tokens         INTEGER NOT NULL,
    cache_read_tokens     INTEGER NOT NULL,
    cache_creation_tokens INTEGER NOT NULL,
    total_cost_usd        REAL NOT NULL,
    duration_ms           INTEGER NOT NULL,
    tool_calls            TEXT NOT NULL,
    refusal               TEXT
);
-- A user's usage since a time (metering, budgets) and their audit listing.
CREATE INDEX model_requests_user_at ON model_requests (user_id, at DESC, request_id DESC);
-- A session's audit listing.
CREATE INDEX model_requests_session_at ON model_requests (session_id, at DESC, request_id DESC);
-- Everyone's audit listing (admins).
CREATE INDEX model_requests_at ON model_requests (at DESC, request_id DESC);
