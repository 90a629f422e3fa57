-- Users, API tokens (hashes only) and sessions. Ids use the "C" collation so
-- they sort byte by byte, as in SQLite and the memory store.
CREATE TABLE users (
    user_id     VARCHAR(64) COLLATE "C" PRIMARY KEY,
    role        VARCHAR(16) NOT NULL CHECK (role IN ('admin', 'user')),
    created_at  TIMESTAMPTZ NOT NULL,
    uid         BIGINT UNIQUE
);

CREATE TABLE api_tokens (
    token_id     VARCHAR(64) COLLATE "C" PRIMARY KEY,
    user_id      VARCHAR(64) COLLATE "C" NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    token_hash   VARCHAR(128) NOT NULL UNIQUE,
    label        VARCHAR(200),
    created_at   TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ,
    last_used_at TIMESTAMPTZ
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);

-- Sessions outlive their user (status 'deleted') so usage history is kept.
CREATE TABLE sessions (
    session_id            VARCHAR(200) COLLATE "C" PRIMARY KEY,
    user_id               VARCHAR(64) COLLATE "C" NOT NULL,
    subdir                VARCHAR(255),
    cwd                   TEXT NOT NULL,
    options               JSONB NOT NULL DEFAULT '{}',
    metadata              JSONB NOT NULL DEFAULT '{}',
    status                VARCHAR(16) NOT NULL CHECK (status IN ('active', 'expired', 'deleted')),
    created_at            TIMESTAMPTZ NOT NULL,
    last_active_at        TIMESTAMPTZ NOT NULL,
    message_count         BIGINT NOT NULL DEFAULT 0,
    cli_session_id        VARCHAR(200),
    input_tokens          BIGINT NOT NULL DEFAULT 0,
    output_tokens         BIGINT NOT NULL DEFAULT 0,
    cache_read_tokens     BIGINT NOT NULL DEFAULT 0,
    cache_creation_tokens BIGINT NOT NULL DEFAULT 0,
    total_cost_usd        DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE INDEX sessions_user_created ON sessions (user_id, created_at DESC, session_id DESC);
CREATE INDEX sessions_created ON sessions (created_at DESC, session_id DESC);
CREATE INDEX sessions_status_active ON sessions (status, last_active_at);
