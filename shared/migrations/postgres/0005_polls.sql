-- The scheduler's claims: one row per Page and poll period, so two schedulers never enqueue a
-- Page twice in one period. A claim whose job was not confirmed on the queue (enqueued_at_ms
-- NULL) may be taken again once it is old: its scheduler died between claim and publish.
CREATE TABLE IF NOT EXISTS poll_claims (
    page_id         TEXT NOT NULL,
    period_ms       BIGINT NOT NULL,
    claimed_at_ms   BIGINT NOT NULL,
    enqueued_at_ms  BIGINT,
    PRIMARY KEY (page_id, period_ms)
);

-- Each Page's Graph polls: the one in progress (its cursor, so a poll that stops half-way
-- resumes there; its lease, so one worker runs it), the last complete one (a daily poll reads
-- only conversations updated since it started), and the counts operators see.
CREATE TABLE IF NOT EXISTS page_polls (
    page_id                 TEXT PRIMARY KEY,
    -- The poll in progress: when it started (NULL: none), whether it reads the whole history,
    -- the time before which conversations need no reading, and where to resume.
    started_at_ms           BIGINT,
    backfill                BIGINT NOT NULL DEFAULT 0,
    since_ms                BIGINT,
    resume_url              TEXT,
    lease_gen               BIGINT NOT NULL DEFAULT 0,
    lease_until_ms          BIGINT NOT NULL DEFAULT 0,
    -- Counts of the poll in progress (or the last one).
    messages_found          BIGINT NOT NULL DEFAULT 0,
    messages_new            BIGINT NOT NULL DEFAULT 0,
    details_unavailable     BIGINT NOT NULL DEFAULT 0,
    -- The last complete poll: when it started (the next daily poll's cut-off) and ended.
    last_complete_start_ms  BIGINT,
    last_complete_end_ms    BIGINT,
    last_backfill_end_ms    BIGINT,
    -- Messages whose details the Graph API refused (older than a conversation's 20 most
    -- recent), over every poll.
    details_unavailable_total BIGINT NOT NULL DEFAULT 0
);
