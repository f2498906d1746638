-- What a build was asked for (team, resources, names) and which step failed.
-- Portable: TEXT and BIGINT only.
ALTER TABLE template_builds ADD COLUMN team_id TEXT;
ALTER TABLE template_builds ADD COLUMN cpu BIGINT;
ALTER TABLE template_builds ADD COLUMN memory_mb BIGINT;
ALTER TABLE template_builds ADD COLUMN names TEXT;
ALTER TABLE template_builds ADD COLUMN reason_step TEXT;
