-- Page registry: who owns a Page, its sealed token, and its health.
CREATE TABLE IF NOT EXISTS pages (
    page_id        TEXT PRIMARY KEY,
    user_uuid      TEXT NOT NULL,
    token_sealed   BLOB NOT NULL,
    status         TEXT NOT NULL DEFAULT 'active',
    created_at_ms  INTEGER NOT NULL,
    last_event_ms  INTEGER,
    last_flush_ms  INTEGER,
    last_error_ms  INTEGER,
    last_error     TEXT
);

-- Events accepted from the queue but not yet in the store. One row per event identity and
-- conversation: duplicates vanish on insert.
CREATE TABLE IF NOT EXISTS staged_events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    page_id         TEXT NOT NULL,
    user_psid       TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    source          TEXT NOT NULL,
    timestamp_ms    INTEGER NOT NULL,
    received_at_ms  INTEGER NOT NULL,
    staged_at_ms    INTEGER NOT NULL,
    body            TEXT NOT NULL,
    UNIQUE (page_id, user_psid, event_id)
);

-- Flush state per conversation: the claim lease, the write budget, and the staging generation
-- (staged_gen > flushed_gen means events are waiting).
CREATE TABLE IF NOT EXISTS conversations (
    page_id         TEXT NOT NULL,
    user_psid       TEXT NOT NULL,
    staged_gen      INTEGER NOT NULL DEFAULT 0,
    flushed_gen     INTEGER NOT NULL DEFAULT 0,
    due_at_ms       INTEGER NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_until_ms  INTEGER NOT NULL DEFAULT 0,
    recent_puts     TEXT NOT NULL DEFAULT '',
    failures        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    PRIMARY KEY (page_id, user_psid)
);
CREATE INDEX IF NOT EXISTS conversations_due ON conversations (due_at_ms) WHERE staged_gen > flushed_gen;

-- The bucket's request budget, shared by every worker: one row per 100 ms window.
CREATE TABLE IF NOT EXISTS bucket_budget (
    window_ms  INTEGER PRIMARY KEY,
    writes     INTEGER NOT NULL,
    ops        INTEGER NOT NULL
);

-- Recent PUT times of objects written outside the conversation flush (page_data.json), so their
-- per-object budget holds across workers.
CREATE TABLE IF NOT EXISTS object_puts (
    object_key   TEXT PRIMARY KEY,
    recent_puts  TEXT NOT NULL DEFAULT ''
);
