-- Who connected each Page, per person: Meta's deauthorize and data-deletion callbacks name a
-- Facebook person, and two people of one shop (or two admins of one Page) connect separately.
-- One row per (Page, person) with that person's Page token sealed; `pages.token_sealed` is
-- the token in use and `pages.connected_by` names whose it is. A person's deauthorization
-- deletes their tokens but keeps their rows (`deauthorized_at_ms`), so their data deletion,
-- which Meta sends later, still finds what they connected; a data deletion removes the rows. A
-- Page nobody is left connecting is removed, otherwise it goes on with another person's token.
CREATE TABLE IF NOT EXISTS page_connections (
    page_id           TEXT NOT NULL,
    facebook_user_id  TEXT NOT NULL,
    user_uuid         TEXT NOT NULL,
    token_sealed      BYTEA,
    connected_at_ms   BIGINT NOT NULL,
    deauthorized_at_ms BIGINT,
    PRIMARY KEY (page_id, facebook_user_id)
);
CREATE INDEX IF NOT EXISTS page_connections_person ON page_connections (facebook_user_id);
CREATE INDEX IF NOT EXISTS page_connections_user ON page_connections (user_uuid);
ALTER TABLE pages ADD COLUMN connected_by TEXT;

-- Until now each shop recorded only the last person who connected it; their Pages are taken
-- to be that person's.
INSERT INTO page_connections (page_id, facebook_user_id, user_uuid, token_sealed, connected_at_ms)
SELECT p.page_id, u.facebook_user_id, p.user_uuid, p.token_sealed, COALESCE(u.connected_at_ms, 0)
FROM pages p JOIN users u ON u.user_uuid = p.user_uuid
WHERE u.facebook_user_id IS NOT NULL AND p.token_sealed IS NOT NULL;
UPDATE pages SET connected_by = (
    SELECT u.facebook_user_id FROM users u WHERE u.user_uuid = pages.user_uuid
);
DROP INDEX IF EXISTS users_facebook_user;
ALTER TABLE users DROP COLUMN facebook_user_id;

-- The person whose Facebook Login started a session: their data deletion ends it.
ALTER TABLE sessions ADD COLUMN facebook_user_id TEXT;

-- What a data-deletion request removed, Page by Page (`<uuid>/<page_id>`, space separated),
-- and the Pages it left because another person of the shop still connects them (only this
-- person's token went); `user_uuids` are now the shops nobody is left connected to, whose
-- whole `users/<uuid>/` goes. The SHA-256 of the request's signed_request, so a replay is
-- answered with the same confirmation code and does nothing.
ALTER TABLE data_deletions ADD COLUMN removed_pages TEXT NOT NULL DEFAULT '';
ALTER TABLE data_deletions ADD COLUMN kept_pages TEXT NOT NULL DEFAULT '';
ALTER TABLE data_deletions ADD COLUMN signed_request_sha256 TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS data_deletions_signed_request
    ON data_deletions (signed_request_sha256);
