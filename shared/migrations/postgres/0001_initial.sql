-- Page registry: who owns a Page, its sealed token, and its health.
CREATE TABLE IF NOT EXISTS pages (
    page_id        TEXT PRIMARY KEY,
    user_uuid      TEXT NOT NULL,
    token_sealed   BYTEA NOT NULL,
    status         TEXT NOT NULL DEFAULT 'active',
    created_at_ms  BIGINT NOT NULL,
    last_event_ms  BIGINT,
    last_flush_ms  BIGINT,
    last_error_ms  BIGINT,
    last_error     TEXT
);

-- Events accepted from the queue but not yet in the store. One row per event identity and
-- conversation: duplicates vanish on insert.
CREATE TABLE IF NOT EXISTS staged_events (
    seq             BIGSERIAL PRIMARY KEY,
    page_id         TEXT NOT NULL,
    user_psid       TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    source          TEXT NOT NULL,
    timestamp_ms    BIGINT NOT NULL,
    received_at_ms  BIGINT NOT NULL,
    staged_at_ms    BIGINT NOT NULL,
    body            TEXT NOT NULL,
    UNIQUE (page_id, user_psid, event_id)
);

-- Flush state per conversation: the claim lease, the write budget, and the staging generation
-- (staged_gen > flushed_gen means events are waiting).
CREATE TABLE IF NOT EXISTS conversations (
    page_id         TEXT NOT NULL,
    user_psid       TEXT NOT NULL,
    staged_gen      BIGINT NOT NULL DEFAULT 0,
    flushed_gen     BIGINT NOT NULL DEFAULT 0,
    due_at_ms       BIGINT NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_until_ms  BIGINT NOT NULL DEFAULT 0,
    recent_puts     TEXT NOT NULL DEFAULT '',
    failures        BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT,
    PRIMARY KEY (page_id, user_psid)
);
CREATE INDEX IF NOT EXISTS conversations_due ON conversations (due_at_ms) WHERE staged_gen > flushed_gen;

-- The bucket's request budget, shared by every worker: one row per 100 ms window.
CREATE TABLE IF NOT EXISTS bucket_budget (
    window_ms  BIGINT PRIMARY KEY,
    writes     BIGINT NOT NULL,
    ops        BIGINT NOT NULL
);

-- Recent PUT times of objects written outside the conversation flush (page_data.json), so their
-- per-object budget holds across workers.
CREATE TABLE IF NOT EXISTS object_puts (
    object_key   TEXT PRIMARY KEY,
    recent_puts  TEXT NOT NULL DEFAULT ''
);
