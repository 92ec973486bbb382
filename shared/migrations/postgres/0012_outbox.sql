-- Jobs that must follow a database change (an owner's onboarding and data-deletion jobs),
-- written in the change's own transaction: ingest publishes them at once, and a worker's relay
-- publishes whatever is still here (the broker was away) once the broker answers. A row goes
-- when the broker has confirmed its job. `attempt_after_ms` is when it may next be tried: a
-- grace for ingest's own attempt at first, then a lease while a relay tries, then the retry
-- policy's delay after a failure.
CREATE TABLE IF NOT EXISTS outbox (
    id                TEXT PRIMARY KEY,
    kind              TEXT NOT NULL,
    body              BYTEA NOT NULL,
    created_at_ms     BIGINT NOT NULL,
    attempt_after_ms  BIGINT NOT NULL,
    attempts          BIGINT NOT NULL DEFAULT 0,
    last_error        TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (attempt_after_ms);
