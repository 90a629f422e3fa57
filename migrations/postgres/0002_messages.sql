-- Each session's chat history, numbered from 1 per session. Content is the
-- message's JSON as text (not JSONB, which rejects \u0000 and would not keep
-- the text as written). History is purged when a session is deleted (by the
-- store; the cascade covers rows removed by hand).
CREATE TABLE messages (
    session_id  VARCHAR(200) COLLATE "C" NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    seq         BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    content     TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (session_id, seq)
);

-- The last seq handed out; appends bump it first, which locks the session row
-- (serialising appends to one session) and allocates their seqs in one
-- statement.
ALTER TABLE sessions ADD COLUMN last_message_seq BIGINT NOT NULL DEFAULT 0;
