-- Each session's chat history, numbered from 1 per session. Content is the
-- message's JSON as text, returned exactly as written. History is purged when
-- a session is deleted (by the store; the cascade covers rows removed by hand).
CREATE TABLE messages (
    session_id  TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    content     TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);

-- The last seq handed out; appends bump it first, which takes the write lock
-- and allocates their seqs in one statement.
ALTER TABLE sessions ADD COLUMN last_message_seq INTEGER NOT NULL DEFAULT 0;
