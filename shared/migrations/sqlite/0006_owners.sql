-- Shop owners who connected through Shopify OAuth: one user UUID per shop (a shop that
-- connects again keeps its UUID), the shop's token sealed (bound to "shop:<domain>"), and the
-- app-scoped Facebook user id of the person who last connected its Pages (Meta's deauthorize and
-- data-deletion callbacks name that id).
CREATE TABLE IF NOT EXISTS users (
    user_uuid          TEXT PRIMARY KEY,
    shop               TEXT NOT NULL UNIQUE,
    shop_token_sealed  BLOB,
    facebook_user_id   TEXT,
    created_at_ms      INTEGER NOT NULL,
    connected_at_ms    INTEGER
);
CREATE INDEX IF NOT EXISTS users_facebook_user ON users (facebook_user_id);

-- Owner sessions: the SHA-256 of the cookie's random id (a copy of the database holds no usable
-- session), whose user it is, and until when.
CREATE TABLE IF NOT EXISTS sessions (
    session_hash   TEXT PRIMARY KEY,
    user_uuid      TEXT NOT NULL,
    expires_at_ms  INTEGER NOT NULL
);

-- Nonces of OAuth states already used: a state is accepted once.
CREATE TABLE IF NOT EXISTS oauth_nonces (
    nonce          TEXT PRIMARY KEY,
    expires_at_ms  INTEGER NOT NULL
);

-- Data-deletion requests from Meta: what was deleted at once, and when the objects went.
CREATE TABLE IF NOT EXISTS data_deletions (
    confirmation_code  TEXT PRIMARY KEY,
    facebook_user_id   TEXT NOT NULL,
    user_uuids         TEXT NOT NULL,
    requested_at_ms    INTEGER NOT NULL,
    pages_removed      INTEGER NOT NULL,
    sessions_removed   INTEGER NOT NULL,
    objects_deleted    INTEGER,
    completed_at_ms    INTEGER,
    last_error         TEXT
);

-- The outcome of each onboarding step of a Page connected through Facebook Login.
ALTER TABLE pages ADD COLUMN onboard_subscribe TEXT;
ALTER TABLE pages ADD COLUMN onboard_page_data TEXT;
ALTER TABLE pages ADD COLUMN onboard_backfill TEXT;
