-- When the oldest event of the conversation still waiting to be stored was received (ms): the
-- flusher takes the conversation waiting longest first, so none starves while more are due
-- than the bucket's write rate allows. It orders claims only; it never decides what is stored
-- (0, after an upgrade or a race with a flush ending, just puts the conversation first).
ALTER TABLE conversations ADD COLUMN waiting_since_ms INTEGER NOT NULL DEFAULT 0;
DROP INDEX IF EXISTS conversations_due;
CREATE INDEX IF NOT EXISTS conversations_waiting ON conversations (waiting_since_ms) WHERE staged_gen > flushed_gen;
