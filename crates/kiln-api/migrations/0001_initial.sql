-- Portable between SQLite and PostgreSQL: TEXT and BIGINT only (booleans are 0/1,
-- times are Unix milliseconds, maps are JSON text).
CREATE TABLE teams (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    max_concurrent BIGINT NOT NULL,
    max_lifetime_s BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams (id),
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    key_mask TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_used BIGINT
);

CREATE TABLE templates (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL,
    public BIGINT NOT NULL,
    build_id TEXT,
    runtime_id TEXT,
    cpu BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    envd_version TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    spawn_count BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE template_aliases (
    alias TEXT PRIMARY KEY,
    template_id TEXT NOT NULL
);

CREATE TABLE template_builds (
    id TEXT PRIMARY KEY,
    template_id TEXT NOT NULL,
    status TEXT NOT NULL,
    runtime_id TEXT NOT NULL,
    reason TEXT,
    created_at BIGINT NOT NULL,
    finished_at BIGINT
);

CREATE TABLE build_logs (
    build_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    ts BIGINT NOT NULL,
    level TEXT NOT NULL,
    step TEXT,
    message TEXT NOT NULL,
    PRIMARY KEY (build_id, seq)
);

CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL,
    template_id TEXT NOT NULL,
    alias TEXT,
    runtime_template TEXT NOT NULL,
    state TEXT NOT NULL,
    metadata TEXT NOT NULL,
    env_vars TEXT NOT NULL,
    access_token TEXT,
    auto_pause BIGINT NOT NULL,
    allow_internet BIGINT NOT NULL,
    network TEXT,
    cpu BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    envd_version TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    end_at BIGINT NOT NULL,
    ended_at BIGINT
);

CREATE INDEX sandboxes_team_state ON sandboxes (team_id, state);
CREATE INDEX sandboxes_state_end ON sandboxes (state, end_at);

CREATE TABLE sandbox_events (
    sandbox_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    ts BIGINT NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, seq)
);
