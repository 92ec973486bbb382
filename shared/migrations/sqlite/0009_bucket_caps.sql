-- Each budget window's own caps, set when its row is made: the bucket's rate less what the
-- windows of the second before it took, so that every run of windows one sliding second can
-- touch stays within the rate (instead of an equal share per window, which left a ninth of
-- the rate unused). Rows made before this have no caps and are of no use: they go.
DELETE FROM bucket_budget;
ALTER TABLE bucket_budget ADD COLUMN writes_cap INTEGER NOT NULL DEFAULT 0;
ALTER TABLE bucket_budget ADD COLUMN ops_cap INTEGER NOT NULL DEFAULT 0;
