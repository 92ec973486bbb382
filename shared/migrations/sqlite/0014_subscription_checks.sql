-- The scheduler's claims of subscription checks: one row per Page and check period, as
-- poll_claims are for polls, so two schedulers check each Page once per
-- SUBSCRIPTION_CHECK_INTERVAL. Facebook unsubscribes an app from a Page after an hour of failed
-- deliveries; the check finds it and subscribes the Page again.
CREATE TABLE IF NOT EXISTS subscription_claims (
    page_id         TEXT NOT NULL,
    period_ms       INTEGER NOT NULL,
    claimed_at_ms   INTEGER NOT NULL,
    enqueued_at_ms  INTEGER,
    PRIMARY KEY (page_id, period_ms)
);

-- When a Page's webhook subscription was last found complete, and when it was last found lost
-- and subscribed again (a reconciliation poll follows).
ALTER TABLE pages ADD COLUMN subscription_checked_at_ms INTEGER;
ALTER TABLE pages ADD COLUMN subscription_restored_at_ms INTEGER;
