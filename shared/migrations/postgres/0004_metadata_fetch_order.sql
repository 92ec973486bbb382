-- Page metadata fetches are numbered; page_data.json is written only from a fetch newer than
-- the one it was last written from, so a slow job that fetched older metadata never
-- overwrites newer metadata.
ALTER TABLE pages ADD COLUMN metadata_fetch_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE pages ADD COLUMN metadata_written_seq BIGINT NOT NULL DEFAULT 0;
