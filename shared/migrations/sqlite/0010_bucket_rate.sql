-- The bucket's adaptive rate: the share of the configured ceilings in force, halved when the
-- store answers SlowDown and climbing back from `lowered_at_ms`. One row, shared by every
-- worker; no row means the ceilings in full.
CREATE TABLE IF NOT EXISTS bucket_rate (
    id INTEGER PRIMARY KEY,
    lowered_to_ppm INTEGER NOT NULL,
    lowered_at_ms INTEGER NOT NULL
);
