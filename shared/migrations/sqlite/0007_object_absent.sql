-- 1 when a listing of the bucket showed the conversation's object absent and no flush has
-- written it since: its first flush writes without reading first (If-None-Match: *). Any
-- flush that ends, well or not, clears it, so a flush after a failure reads again.
ALTER TABLE conversations ADD COLUMN object_absent INTEGER NOT NULL DEFAULT 0;
