-- A Page's name as Facebook Login last handed it over: the owner's status page names Pages
-- (an owner with several cannot tell 15-digit ids apart). NULL for Pages an operator added.
ALTER TABLE pages ADD COLUMN name TEXT;

-- Facebook's last policy enforcement on the Page's messaging (`messaging_policy_enforcement`:
-- warning, block or unblock), its reason and its event's time: a block shows on the owner's
-- status page, in `pages list` and as an alert. A later event replaces an earlier one only.
ALTER TABLE pages ADD COLUMN policy_action TEXT;
ALTER TABLE pages ADD COLUMN policy_reason TEXT;
ALTER TABLE pages ADD COLUMN policy_at_ms BIGINT;
