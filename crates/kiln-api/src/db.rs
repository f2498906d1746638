//! The server's state in SQL: SQLite by default, PostgreSQL for a cluster.
//!
//! One schema and one set of queries serve both through sqlx's `Any`
//! driver, so the SQL sticks to what both accept: TEXT and BIGINT columns
//! (booleans 0/1, times in Unix milliseconds, maps as JSON text) and `$n`
//! parameters used once each, in order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::error::ApiError;
use crate::util::now_ms;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Database handle.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
}

/// A team: owns keys, templates and sandboxes.
#[derive(Debug, Clone)]
pub struct Team {
    pub id: String,
    pub name: String,
    pub max_concurrent: i64,
    pub max_lifetime_s: i64,
}

/// An API key as listed (never the key itself).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub team: String,
    pub name: String,
    pub mask: String,
    pub created_at: i64,
    pub last_used: Option<i64>,
}

/// A sandbox as the control plane knows it.
#[derive(Debug, Clone)]
pub struct SandboxRow {
    pub id: String,
    pub team_id: String,
    pub template_id: String,
    pub alias: Option<String>,
    pub runtime_template: String,
    pub state: String,
    pub metadata: HashMap<String, String>,
    pub env_vars: HashMap<String, String>,
    pub access_token: Option<String>,
    pub auto_pause: bool,
    pub allow_internet: bool,
    pub network: Option<serde_json::Value>,
    pub cpu: i64,
    pub memory_mb: i64,
    pub envd_version: String,
    pub started_at: i64,
    pub end_at: i64,
}

/// A template and its current build.
#[derive(Debug, Clone)]
pub struct TemplateRow {
    pub id: String,
    pub team_id: String,
    pub public: bool,
    pub build_id: Option<String>,
    pub runtime_id: Option<String>,
    pub cpu: i64,
    pub memory_mb: i64,
    pub envd_version: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub spawn_count: i64,
    pub aliases: Vec<String>,
}

/// A lifecycle event of a sandbox.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    pub ts: i64,
    pub level: String,
    pub message: String,
}

/// A build's log line.
#[derive(Debug, Clone)]
pub struct BuildLogRow {
    pub ts: i64,
    pub level: String,
    pub step: Option<String>,
    pub message: String,
}

/// A template build.
#[derive(Debug, Clone)]
pub struct BuildRow {
    pub id: String,
    pub template_id: String,
    pub status: String,
    pub runtime_id: String,
    pub reason: Option<String>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

/// Who asked for a build and what for (columns of migration 0002).
#[derive(Debug, Clone)]
pub struct BuildRequestRow {
    pub team_id: String,
    pub cpu: i64,
    pub memory_mb: i64,
    pub names: Vec<String>,
    pub reason_step: Option<String>,
}

/// Unique, increasing sequence numbers for event and log rows.
fn next_seq() -> i64 {
    static SEQ: AtomicI64 = AtomicI64::new(0);
    let now = now_ms() * 1000;
    let mut cur = SEQ.load(Ordering::Relaxed);
    loop {
        let next = if now > cur { now } else { cur + 1 };
        match SEQ.compare_exchange(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => cur = seen,
        }
    }
}

fn json_map(text: &str) -> HashMap<String, String> {
    serde_json::from_str(text).unwrap_or_default()
}

fn sandbox_of(row: &AnyRow) -> Result<SandboxRow, sqlx::Error> {
    Ok(SandboxRow {
        id: row.try_get("id")?,
        team_id: row.try_get("team_id")?,
        template_id: row.try_get("template_id")?,
        alias: row.try_get("alias")?,
        runtime_template: row.try_get("runtime_template")?,
        state: row.try_get("state")?,
        metadata: json_map(&row.try_get::<String, _>("metadata")?),
        env_vars: json_map(&row.try_get::<String, _>("env_vars")?),
        access_token: row.try_get("access_token")?,
        auto_pause: row.try_get::<i64, _>("auto_pause")? != 0,
        allow_internet: row.try_get::<i64, _>("allow_internet")? != 0,
        network: row
            .try_get::<Option<String>, _>("network")?
            .and_then(|t| serde_json::from_str(&t).ok()),
        cpu: row.try_get("cpu")?,
        memory_mb: row.try_get("memory_mb")?,
        envd_version: row.try_get("envd_version")?,
        started_at: row.try_get("started_at")?,
        end_at: row.try_get("end_at")?,
    })
}

const SANDBOX_COLUMNS: &str = "id, team_id, template_id, alias, runtime_template, state, metadata, \
     env_vars, access_token, auto_pause, allow_internet, network, cpu, memory_mb, envd_version, \
     started_at, end_at";

/// A query through sqlx's `Any` driver, before it runs.
type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

impl Db {
    /// One text column of every row a query returns.
    async fn strings(&self, query: AnyQuery<'_>, column: &str) -> Result<Vec<String>, ApiError> {
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(column))
            .collect::<Result<_, _>>()
            .map_err(Into::into)
    }

    /// Connects (creating an SQLite file if needed) and brings the schema up to date.
    pub async fn connect(url: &str) -> Result<Db, ApiError> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 16 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // WAL, and no fsync per commit (only at checkpoints):
                        // a create writes five times, and SQLite's default
                        // (rollback journal, fsync on every commit) cost it
                        // ~10 ms here. A power cut can lose the last commits;
                        // it also ends every sandbox of the node.
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(|e| ApiError::Internal(format!("connecting to the database: {e}")))?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| ApiError::Internal(format!("migrating the database: {e}")))?;
        Ok(Db { pool })
    }

    // --- teams and keys ------------------------------------------------------

    pub async fn team_by_name(&self, name: &str) -> Result<Option<Team>, ApiError> {
        let row = sqlx::query(
            "SELECT id, name, max_concurrent, max_lifetime_s FROM teams WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| team_of(&r)).transpose().map_err(Into::into)
    }

    pub async fn create_team(
        &self,
        name: &str,
        max_concurrent: i64,
        max_lifetime_s: i64,
    ) -> Result<Team, ApiError> {
        let team = Team {
            id: crate::util::random_id(),
            name: name.to_string(),
            max_concurrent,
            max_lifetime_s,
        };
        sqlx::query(
            "INSERT INTO teams (id, name, max_concurrent, max_lifetime_s, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&team.id)
        .bind(&team.name)
        .bind(max_concurrent)
        .bind(max_lifetime_s)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(team)
    }

    pub async fn set_team_limits(
        &self,
        team_id: &str,
        max_concurrent: i64,
        max_lifetime_s: i64,
    ) -> Result<(), ApiError> {
        sqlx::query("UPDATE teams SET max_concurrent = $1, max_lifetime_s = $2 WHERE id = $3")
            .bind(max_concurrent)
            .bind(max_lifetime_s)
            .bind(team_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn count_keys(&self) -> Result<i64, ApiError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM api_keys")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("n")?)
    }

    pub async fn insert_key(
        &self,
        team_id: &str,
        name: &str,
        key_hash: &str,
        mask: &str,
    ) -> Result<String, ApiError> {
        let id = crate::util::random_id();
        sqlx::query(
            "INSERT INTO api_keys (id, team_id, name, key_hash, key_mask, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(team_id)
        .bind(name)
        .bind(key_hash)
        .bind(mask)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// The team owning the key with this hash.
    pub async fn team_of_key(&self, key_hash: &str) -> Result<Option<Team>, ApiError> {
        let row = sqlx::query(
            "SELECT t.id AS id, t.name AS name, t.max_concurrent AS max_concurrent, \
             t.max_lifetime_s AS max_lifetime_s \
             FROM api_keys k JOIN teams t ON t.id = k.team_id WHERE k.key_hash = $1",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| team_of(&r)).transpose().map_err(Into::into)
    }

    pub async fn touch_key(&self, key_hash: &str) -> Result<(), ApiError> {
        sqlx::query("UPDATE api_keys SET last_used = $1 WHERE key_hash = $2")
            .bind(now_ms())
            .bind(key_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Keys of one team (`Some`) or of all teams.
    pub async fn list_keys(&self, team_id: Option<&str>) -> Result<Vec<KeyInfo>, ApiError> {
        let sql = "SELECT k.id AS id, t.name AS team, k.name AS name, k.key_mask AS key_mask, \
                   k.created_at AS created_at, k.last_used AS last_used \
                   FROM api_keys k JOIN teams t ON t.id = k.team_id";
        let rows = match team_id {
            Some(team) => {
                sqlx::query(&format!("{sql} WHERE k.team_id = $1 ORDER BY k.created_at"))
                    .bind(team)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(&format!("{sql} ORDER BY k.created_at"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter()
            .map(|r| {
                Ok(KeyInfo {
                    id: r.try_get("id")?,
                    team: r.try_get("team")?,
                    name: r.try_get("name")?,
                    mask: r.try_get("key_mask")?,
                    created_at: r.try_get("created_at")?,
                    last_used: r.try_get("last_used")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Deletes a key (of `team_id` when given); false when there was none.
    pub async fn delete_key(&self, id: &str, team_id: Option<&str>) -> Result<bool, ApiError> {
        let done = match team_id {
            Some(team) => {
                sqlx::query("DELETE FROM api_keys WHERE id = $1 AND team_id = $2")
                    .bind(id)
                    .bind(team)
                    .execute(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("DELETE FROM api_keys WHERE id = $1")
                    .bind(id)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(done.rows_affected() > 0)
    }

    // --- sandboxes -----------------------------------------------------------

    pub async fn insert_sandbox(&self, s: &SandboxRow) -> Result<(), ApiError> {
        sqlx::query(&format!(
            "INSERT INTO sandboxes ({SANDBOX_COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
        ))
        .bind(&s.id)
        .bind(&s.team_id)
        .bind(&s.template_id)
        .bind(&s.alias)
        .bind(&s.runtime_template)
        .bind(&s.state)
        .bind(serde_json::to_string(&s.metadata).unwrap_or_default())
        .bind(serde_json::to_string(&s.env_vars).unwrap_or_default())
        .bind(&s.access_token)
        .bind(s.auto_pause as i64)
        .bind(s.allow_internet as i64)
        .bind(s.network.as_ref().map(|n| n.to_string()))
        .bind(s.cpu)
        .bind(s.memory_mb)
        .bind(&s.envd_version)
        .bind(s.started_at)
        .bind(s.end_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A sandbox that is not gone (killed or expired).
    pub async fn sandbox(&self, id: &str) -> Result<Option<SandboxRow>, ApiError> {
        let row = sqlx::query(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = $1 AND state <> 'killed'"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| sandbox_of(&r)).transpose().map_err(Into::into)
    }

    /// A sandbox in any state, gone ones included (for logs).
    pub async fn sandbox_any(&self, id: &str) -> Result<Option<SandboxRow>, ApiError> {
        let row = sqlx::query(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| sandbox_of(&r)).transpose().map_err(Into::into)
    }

    /// Live (running, paused, creating) sandboxes of a team, or of every team.
    pub async fn live_sandboxes(&self, team_id: Option<&str>) -> Result<Vec<SandboxRow>, ApiError> {
        let rows = match team_id {
            Some(team) => {
                sqlx::query(&format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes \
                     WHERE team_id = $1 AND state <> 'killed'"
                ))
                .bind(team)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state <> 'killed'"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter()
            .map(sandbox_of)
            .collect::<Result<_, _>>()
            .map_err(Into::into)
    }

    /// How many sandboxes of the team are running or being created.
    pub async fn count_running(&self, team_id: &str) -> Result<i64, ApiError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM sandboxes \
             WHERE team_id = $1 AND state IN ('running', 'creating')",
        )
        .bind(team_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("n")?)
    }

    pub async fn set_state(&self, id: &str, state: &str) -> Result<(), ApiError> {
        let ended = (state == "killed").then(now_ms);
        sqlx::query("UPDATE sandboxes SET state = $1, ended_at = $2 WHERE id = $3")
            .bind(state)
            .bind(ended)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_end(&self, id: &str, end_at: i64) -> Result<(), ApiError> {
        sqlx::query("UPDATE sandboxes SET end_at = $1 WHERE id = $2")
            .bind(end_at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Running sandboxes whose end time has passed.
    pub async fn expired(&self, now: i64) -> Result<Vec<SandboxRow>, ApiError> {
        let rows = sqlx::query(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state = 'running' AND end_at <= $1"
        ))
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(sandbox_of)
            .collect::<Result<_, _>>()
            .map_err(Into::into)
    }

    pub async fn add_event(&self, sandbox_id: &str, level: &str, message: &str) {
        let result = sqlx::query(
            "INSERT INTO sandbox_events (sandbox_id, seq, ts, level, message) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(sandbox_id)
        .bind(next_seq())
        .bind(now_ms())
        .bind(level)
        .bind(message)
        .execute(&self.pool)
        .await;
        if let Err(e) = result {
            tracing::warn!(sandbox = %sandbox_id, error = %e, "could not record an event");
        }
    }

    /// Events of a sandbox from `start_ms` on, oldest first.
    pub async fn events(
        &self,
        sandbox_id: &str,
        start_ms: i64,
        limit: i64,
    ) -> Result<Vec<Event>, ApiError> {
        let rows = sqlx::query(
            "SELECT ts, level, message FROM sandbox_events \
             WHERE sandbox_id = $1 AND ts >= $2 ORDER BY seq LIMIT $3",
        )
        .bind(sandbox_id)
        .bind(start_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Event {
                    ts: r.try_get("ts")?,
                    level: r.try_get("level")?,
                    message: r.try_get("message")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    // --- templates -----------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    pub async fn upsert_template(
        &self,
        id: &str,
        team_id: &str,
        public: bool,
        cpu: i64,
        memory_mb: i64,
        envd_version: &str,
    ) -> Result<(), ApiError> {
        let now = now_ms();
        let updated = sqlx::query(
            "UPDATE templates SET public = $1, cpu = $2, memory_mb = $3, envd_version = $4, \
             updated_at = $5 WHERE id = $6",
        )
        .bind(public as i64)
        .bind(cpu)
        .bind(memory_mb)
        .bind(envd_version)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 0 {
            sqlx::query(
                "INSERT INTO templates (id, team_id, public, cpu, memory_mb, envd_version, \
                 created_at, updated_at, spawn_count) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0)",
            )
            .bind(id)
            .bind(team_id)
            .bind(public as i64)
            .bind(cpu)
            .bind(memory_mb)
            .bind(envd_version)
            .bind(now)
            .bind(now)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// Points a template at a finished build.
    pub async fn set_template_build(
        &self,
        id: &str,
        build_id: &str,
        runtime_id: &str,
    ) -> Result<(), ApiError> {
        sqlx::query(
            "UPDATE templates SET build_id = $1, runtime_id = $2, updated_at = $3 WHERE id = $4",
        )
        .bind(build_id)
        .bind(runtime_id)
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn add_alias(&self, alias: &str, template_id: &str) -> Result<(), ApiError> {
        sqlx::query("DELETE FROM template_aliases WHERE alias = $1")
            .bind(alias)
            .execute(&self.pool)
            .await?;
        sqlx::query("INSERT INTO template_aliases (alias, template_id) VALUES ($1, $2)")
            .bind(alias)
            .bind(template_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn bump_spawn_count(&self, id: &str) -> Result<(), ApiError> {
        sqlx::query("UPDATE templates SET spawn_count = spawn_count + 1 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A template by id or alias.
    pub async fn template(&self, id_or_alias: &str) -> Result<Option<TemplateRow>, ApiError> {
        let id = match sqlx::query("SELECT template_id FROM template_aliases WHERE alias = $1")
            .bind(id_or_alias)
            .fetch_optional(&self.pool)
            .await?
        {
            Some(row) => row.try_get::<String, _>("template_id")?,
            None => id_or_alias.to_string(),
        };
        let row = sqlx::query(
            "SELECT id, team_id, public, build_id, runtime_id, cpu, memory_mb, envd_version, \
             created_at, updated_at, spawn_count FROM templates WHERE id = $1",
        )
        .bind(&id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Ok(Some(self.template_of(&r).await?)),
            None => Ok(None),
        }
    }

    /// Templates a team may use: its own and public ones.
    pub async fn templates(&self, team_id: &str) -> Result<Vec<TemplateRow>, ApiError> {
        let rows = sqlx::query(
            "SELECT id, team_id, public, build_id, runtime_id, cpu, memory_mb, envd_version, \
             created_at, updated_at, spawn_count FROM templates \
             WHERE team_id = $1 OR public = 1 ORDER BY created_at",
        )
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(self.template_of(r).await?);
        }
        Ok(out)
    }

    async fn template_of(&self, r: &AnyRow) -> Result<TemplateRow, ApiError> {
        let id: String = r.try_get("id")?;
        let aliases = self
            .strings(
                sqlx::query("SELECT alias FROM template_aliases WHERE template_id = $1").bind(&id),
                "alias",
            )
            .await?;
        Ok(TemplateRow {
            id,
            team_id: r.try_get("team_id")?,
            public: r.try_get::<i64, _>("public")? != 0,
            build_id: r.try_get("build_id")?,
            runtime_id: r.try_get("runtime_id")?,
            cpu: r.try_get("cpu")?,
            memory_mb: r.try_get("memory_mb")?,
            envd_version: r.try_get("envd_version")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
            spawn_count: r.try_get("spawn_count")?,
            aliases,
        })
    }

    pub async fn delete_template(&self, id: &str) -> Result<(), ApiError> {
        sqlx::query("DELETE FROM template_aliases WHERE template_id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM templates WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Runtime templates that live sandboxes still use.
    pub async fn runtime_templates_in_use(&self) -> Result<Vec<String>, ApiError> {
        self.strings(
            sqlx::query("SELECT DISTINCT runtime_template FROM sandboxes WHERE state <> 'killed'"),
            "runtime_template",
        )
        .await
    }

    // --- builds --------------------------------------------------------------

    pub async fn insert_build(
        &self,
        id: &str,
        template_id: &str,
        runtime_id: &str,
        status: &str,
    ) -> Result<(), ApiError> {
        sqlx::query(
            "INSERT INTO template_builds (id, template_id, status, runtime_id, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(template_id)
        .bind(status)
        .bind(runtime_id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn set_build_status(
        &self,
        id: &str,
        status: &str,
        reason: Option<&str>,
    ) -> Result<(), ApiError> {
        let finished = matches!(status, "ready" | "error").then(now_ms);
        sqlx::query(
            "UPDATE template_builds SET status = $1, reason = $2, finished_at = $3 WHERE id = $4",
        )
        .bind(status)
        .bind(reason)
        .bind(finished)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn build(&self, id: &str) -> Result<Option<BuildRow>, ApiError> {
        let row = sqlx::query(
            "SELECT id, template_id, status, runtime_id, reason, created_at, finished_at \
             FROM template_builds WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(BuildRow {
                id: r.try_get("id")?,
                template_id: r.try_get("template_id")?,
                status: r.try_get("status")?,
                runtime_id: r.try_get("runtime_id")?,
                reason: r.try_get("reason")?,
                created_at: r.try_get("created_at")?,
                finished_at: r.try_get("finished_at")?,
            })
        })
        .transpose()
        .map_err(|e: sqlx::Error| e.into())
    }

    pub async fn builds_of(&self, template_id: &str) -> Result<Vec<String>, ApiError> {
        self.strings(
            sqlx::query("SELECT runtime_id FROM template_builds WHERE template_id = $1")
                .bind(template_id),
            "runtime_id",
        )
        .await
    }

    pub async fn add_build_log(
        &self,
        build_id: &str,
        ts: i64,
        level: &str,
        step: Option<&str>,
        message: &str,
    ) -> Result<(), ApiError> {
        sqlx::query(
            "INSERT INTO build_logs (build_id, seq, ts, level, step, message) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(build_id)
        .bind(next_seq())
        .bind(ts)
        .bind(level)
        .bind(step)
        .bind(message)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn build_logs(
        &self,
        build_id: &str,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<BuildLogRow>, ApiError> {
        let rows = sqlx::query(
            "SELECT ts, level, step, message FROM build_logs WHERE build_id = $1 \
             ORDER BY seq LIMIT $2 OFFSET $3",
        )
        .bind(build_id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(BuildLogRow {
                    ts: r.try_get("ts")?,
                    level: r.try_get("level")?,
                    step: r.try_get("step")?,
                    message: r.try_get("message")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    // --- build requests (migration 0002) -------------------------------------

    /// Records who asked for a build and what for.
    pub async fn set_build_request(
        &self,
        id: &str,
        team_id: &str,
        cpu: i64,
        memory_mb: i64,
        names: &[String],
    ) -> Result<(), ApiError> {
        sqlx::query(
            "UPDATE template_builds SET team_id = $1, cpu = $2, memory_mb = $3, names = $4 \
             WHERE id = $5",
        )
        .bind(team_id)
        .bind(cpu)
        .bind(memory_mb)
        .bind(serde_json::to_string(names).unwrap_or_default())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn build_request(&self, id: &str) -> Result<Option<BuildRequestRow>, ApiError> {
        let row = sqlx::query(
            "SELECT team_id, cpu, memory_mb, names, reason_step FROM template_builds WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(BuildRequestRow {
                team_id: r
                    .try_get::<Option<String>, _>("team_id")?
                    .unwrap_or_default(),
                cpu: r.try_get::<Option<i64>, _>("cpu")?.unwrap_or(2),
                memory_mb: r.try_get::<Option<i64>, _>("memory_mb")?.unwrap_or(512),
                names: r
                    .try_get::<Option<String>, _>("names")?
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or_default(),
                reason_step: r.try_get("reason_step")?,
            })
        })
        .transpose()
        .map_err(|e: sqlx::Error| e.into())
    }

    pub async fn set_build_reason_step(
        &self,
        id: &str,
        step: Option<&str>,
    ) -> Result<(), ApiError> {
        sqlx::query("UPDATE template_builds SET reason_step = $1 WHERE id = $2")
            .bind(step)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Ids of a template's builds that are waiting or running.
    pub async fn active_builds_of(&self, template_id: &str) -> Result<Vec<String>, ApiError> {
        self.strings(
            sqlx::query(
                "SELECT id FROM template_builds \
                 WHERE template_id = $1 AND status IN ('waiting', 'building')",
            )
            .bind(template_id),
            "id",
        )
        .await
    }

    /// Build ids left waiting or building (by a previous run of the server).
    pub async fn unfinished_builds(&self) -> Result<Vec<String>, ApiError> {
        self.strings(
            sqlx::query("SELECT id FROM template_builds WHERE status IN ('waiting', 'building')"),
            "id",
        )
        .await
    }
}

fn team_of(r: &AnyRow) -> Result<Team, sqlx::Error> {
    Ok(Team {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        max_concurrent: r.try_get("max_concurrent")?,
        max_lifetime_s: r.try_get("max_lifetime_s")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_runs_in_wal_mode_without_a_sync_per_commit() {
        let dir = std::env::temp_dir().join(format!("kiln-db-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.join("kiln.db").display());
        let db = Db::connect(&url).await.unwrap();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        // 1 = NORMAL: WAL is synced at checkpoints, not at every commit.
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(sync, 1);
        let team = db.create_team("t", 1, 60).await.unwrap();
        assert_eq!(db.team_by_name("t").await.unwrap().unwrap().id, team.id);
        db.pool.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
