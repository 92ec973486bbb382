-- A Page's name as Facebook Login last handed it over: the owner's status page names Pages
-- (an owner with several cannot tell 15-digit ids apart). NULL for Pages an operator added.
ALTER TABLE pages ADD COLUMN name TEXT;
