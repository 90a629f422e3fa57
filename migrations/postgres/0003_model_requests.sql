-- Every model request the model proxy answered (forwarded or refused): the
-- audit log and the source of metering. No foreign keys: a request outlives
-- its session (a deleted session stays audited, and a request may be recorded
-- after its session was deleted); the store deletes a user's requests with the
-- user. Ids and free text are unbounded (a long model name must not lose an
-- audit row); ids use the "C" collation, like the other tables. Tool calls
-- are JSON text (not JSONB, which rejects \u0000 and would not keep the text
-- as written).
CREATE TABLE model_requests (
    request_id            TEXT COLLATE "C" PRIMARY KEY,
    user_id               TEXT COLLATE "C" NOT NULL,
    session_id            TEXT COLLATE "C" NOT NULL,
    at                    TIMESTAMPTZ NOT NULL,
    method                TEXT NOT NULL,
    path                  TEXT NOT NULL,
    model                 TEXT,
    status                INTEGER NOT NULL,
    input_tokens          BIGINT NOT NULL,
    output_tokens         BIGINT NOT NULL,
    cache_read_tokens     BIGINT NOT NULL,
    cache_creation_tokens BIGINT NOT NULL,
    total_cost_usd        DOUBLE PRECISION NOT NULL,
    duration_ms           BIGINT NOT NULL,
    tool_calls            TEXT NOT NULL,
    refusal               TEXT
);
-- A user's usage since a time (metering, budgets) and their audit listing.
CREATE INDEX model_requests_user_at ON model_requests (user_id, at DESC, request_id DESC);
-- A session's audit listing.
CREATE INDEX model_requests_session_at ON model_requests (session_id, at DESC, request_id DESC);
-- Everyone's audit listing (admins).
CREATE INDEX model_requests_at ON model_requests (at DESC, request_id DESC);
