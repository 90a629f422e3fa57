-- Users, API tokens (hashes only) and sessions. Timestamps are RFC 3339 UTC
-- text with microsecond precision, which sorts chronologically.
CREATE TABLE users (
    user_id     TEXT PRIMARY KEY,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'user')),
    created_at  TEXT NOT NULL,
    uid         INTEGER UNIQUE
);

CREATE TABLE api_tokens (
    token_id     TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    token_hash   TEXT NOT NULL UNIQUE,
    label        TEXT,
    created_at   TEXT NOT NULL,
    expires_at   TEXT,
    last_used_at TEXT
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);

-- Sessions outlive their user (status 'deleted') so usage history is kept.
CREATE TABLE sessions (
    session_id            TEXT PRIMARY KEY,
    user_id               TEXT NOT NULL,
    subdir                TEXT,
    cwd                   TEXT NOT NULL,
    options               TEXT NOT NULL DEFAULT '{}',
    metadata              TEXT NOT NULL DEFAULT '{}',
    status                TEXT NOT NULL CHECK (status IN ('active', 'expired', 'deleted')),
    created_at            TEXT NOT NULL,
    last_active_at        TEXT NOT NULL,
    message_count         INTEGER NOT NULL DEFAULT 0,
    cli_session_id        TEXT,
    input_tokens          INTEGER NOT NULL DEFAULT 0,
    output_tokens         INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens     INTEGER NOT NULL DEFAULT 0,
    cache_creation_tokens INTEGER NOT NULL DEFAULT 0,
    total_cost_usd        REAL NOT NULL DEFAULT 0
);
CREATE INDEX sessions_user_created ON sessions (user_id, created_at DESC, session_id DESC);
CREATE INDEX sessions_created ON sessions (created_at DESC, session_id DESC);
CREATE INDEX sessions_status_active ON sessions (status, last_active_at);
