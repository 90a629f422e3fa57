-- Web access of the sandboxes through the egress proxy.
--
-- A user's own domain allow-list, replacing the global one
-- (`network.allowed_domains`): a JSON array of strings, NULL for the global
-- list.
ALTER TABLE users ADD COLUMN allowed_domains TEXT;

-- Every request the egress proxy allowed or refused: the audit log. No
-- foreign keys, like model_requests: an event outlives its session; the store
-- deletes a user's events with the user. `allowed` is 0 or 1.
CREATE TABLE egress_events (
    event_id    TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    session_id  TEXT NOT NULL,
    at          TEXT NOT NULL,
    method      TEXT NOT NULL,
    host        TEXT NOT NULL,
    port        INTEGER NOT NULL,
    allowed     INTEGER NOT NULL CHECK (allowed IN (0, 1)),
    reason      TEXT
);
-- A user's audit listing (and their deletion).
CREATE INDEX egress_events_user_at ON egress_events (user_id, at DESC, event_id DESC);
-- A session's audit listing.
CREATE INDEX egress_events_session_at ON egress_events (session_id, at DESC, event_id DESC);
-- Everyone's audit listing (admins).
CREATE INDEX egress_events_at ON egress_events (at DESC, event_id DESC);
