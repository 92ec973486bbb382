-- The fencing generation of a conversation's claim: bumped by every claim, checked by every
-- later step of that claim, so a worker whose lease expired can change nothing.
ALTER TABLE conversations ADD COLUMN lease_gen INTEGER NOT NULL DEFAULT 0;
