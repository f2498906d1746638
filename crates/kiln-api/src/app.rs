//! The server's shared state and the one place where the API creates,
//! pauses, resumes and kills sandboxes (the handlers and the lifetime task
//! both come here), keeping the database and the runtime in step.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use kiln_runtime::network::EgressPolicy;
use kiln_runtime::{CreateRequest, Runtime, SandboxState};

use crate::db::{Db, SandboxRow, Team};
use crate::error::ApiError;
use crate::lifecycle::Samples;
use crate::metrics::Metrics;
use crate::server::ServerConfig;
use crate::util::{now_ms, random_hex};

pub struct App {
    pub cfg: ServerConfig,
    pub db: Db,
    pub runtime: Arc<Runtime>,
    /// Set once the `base` template can be created from.
    pub ready: AtomicBool,
    /// Serialises the concurrency check and insert of one team's creates.
    team_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub samples: Samples,
    pub metrics: Metrics,
    pub proxy_client: crate::proxy::Client,
    /// The runtime template behind `base` (its warm pool is drained at shutdown).
    pub base_runtime: Mutex<Option<String>>,
    /// Template builds in progress (see [`crate::templates`]).
    pub builds: crate::templates::Builds,
}

/// What a create asks for, after parsing either API version.
#[derive(Debug, Clone, Default)]
pub struct NewSandbox {
    pub template: String,
    pub timeout_s: i64,
    pub metadata: HashMap<String, String>,
    pub env_vars: HashMap<String, String>,
    pub secure: bool,
    pub auto_pause: bool,
    pub allow_internet: bool,
    pub network: Option<serde_json::Value>,
    pub egress: EgressPolicy,
}

/// How a connect ended.
pub enum Connected {
    AlreadyRunning(SandboxRow),
    Resumed(SandboxRow),
}

impl App {
    pub fn new(cfg: ServerConfig, db: Db, runtime: Arc<Runtime>) -> App {
        App {
            cfg,
            db,
            runtime,
            ready: AtomicBool::new(false),
            team_locks: Mutex::new(HashMap::new()),
            samples: Samples::default(),
            metrics: Metrics::default(),
            proxy_client: crate::proxy::client(),
            base_runtime: Mutex::new(None),
            builds: Default::default(),
        }
    }

    fn team_lock(&self, team: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.team_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(team.to_string())
            .or_default()
            .clone()
    }

    /// A live sandbox of `team`, brought in step with the runtime: one that
    /// died on its own (e.g. out of memory) is gone.
    pub async fn sandbox_of(&self, team: &Team, id: &str) -> Result<SandboxRow, ApiError> {
        let row = self
            .db
            .sandbox(id)
            .await?
            .filter(|s| s.team_id == team.id)
            .ok_or_else(|| ApiError::sandbox_not_found(id))?;
        self.sync(row)
            .await
            .ok_or_else(|| ApiError::sandbox_not_found(id))
    }

    /// Checks a row against the runtime; `None` when the sandbox is gone.
    pub async fn sync(&self, row: SandboxRow) -> Option<SandboxRow> {
        if row.state == "creating" {
            return Some(row);
        }
        match self.runtime.info(&row.id) {
            Ok(info) if matches!(info.state, SandboxState::Exited | SandboxState::Killed) => {
                let reason = info.exit_reason.unwrap_or_else(|| "sandbox exited".into());
                self.db
                    .add_event(&row.id, "error", &format!("sandbox stopped: {reason}"))
                    .await;
                let _ = self.runtime.kill(&row.id).await;
                let _ = self.db.set_state(&row.id, "killed").await;
                None
            }
            Ok(_) => Some(row),
            Err(_) => {
                tracing::warn!(sandbox = %row.id, "sandbox unknown to the runtime: marking it killed");
                let _ = self.db.set_state(&row.id, "killed").await;
                None
            }
        }
    }

    pub async fn create_sandbox(
        &self,
        team: &Team,
        req: NewSandbox,
    ) -> Result<SandboxRow, ApiError> {
        let tpl = self
            .db
            .template(&req.template)
            .await?
            .filter(|t| t.public || t.team_id == team.id)
            .ok_or_else(|| ApiError::NotFound(format!("template '{}' not found", req.template)))?;
        let runtime_template = tpl.runtime_id.clone().ok_or_else(|| {
            ApiError::BadRequest(format!("template '{}' has no finished build", req.template))
        })?;
        if req.timeout_s < 0 {
            return Err(ApiError::BadRequest("timeout must not be negative".into()));
        }
        if req.timeout_s > team.max_lifetime_s {
            return Err(ApiError::BadRequest(format!(
                "timeout {} s is over the team's maximum sandbox lifetime of {} s",
                req.timeout_s, team.max_lifetime_s
            )));
        }
        let id = crate::util::random_id();
        let now = now_ms();
        let row = SandboxRow {
            id: id.clone(),
            team_id: team.id.clone(),
            template_id: tpl.id.clone(),
            alias: tpl.aliases.first().cloned(),
            runtime_template: runtime_template.clone(),
            state: "creating".into(),
            metadata: req.metadata.clone(),
            env_vars: req.env_vars.clone(),
            access_token: req.secure.then(|| random_hex(32)),
            auto_pause: req.auto_pause,
            allow_internet: req.allow_internet,
            network: req.network.clone(),
            cpu: tpl.cpu,
            memory_mb: tpl.memory_mb,
            envd_version: tpl.envd_version.clone(),
            started_at: now,
            end_at: now + req.timeout_s * 1000,
        };
        {
            let lock = self.team_lock(&team.id);
            let _guard = lock.lock().await;
            let running = self.db.count_running(&team.id).await?;
            if running >= team.max_concurrent {
                self.metrics.inc("kiln_sandbox_create_rejected_total");
                return Err(ApiError::TooManyRequests(format!(
                    "You have reached the maximum number of concurrent sandboxes ({}). \
                     Kill some sandboxes or ask for a higher limit.",
                    team.max_concurrent
                )));
            }
            self.db.insert_sandbox(&row).await?;
        }
        let span = tracing::info_span!("api_create", sandbox = %id, template = %tpl.id);
        let _enter = span.enter();
        let result = self
            .runtime
            .create(CreateRequest {
                template_id: runtime_template,
                sandbox_id: Some(id.clone()),
                env_vars: req.env_vars.clone(),
                access_token: row.access_token.clone(),
                egress: req.egress.clone(),
                cold: false,
            })
            .await;
        match result {
            Ok(_) => {
                self.db.set_state(&id, "running").await?;
                let _ = self.db.bump_spawn_count(&tpl.id).await;
                self.db
                    .add_event(&id, "info", &format!("created from template {}", tpl.id))
                    .await;
                self.metrics.inc("kiln_sandboxes_created_total");
                tracing::info!("sandbox created");
                Ok(SandboxRow {
                    state: "running".into(),
                    ..row
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "create failed");
                self.metrics.inc("kiln_sandbox_create_failed_total");
                let _ = self.db.set_state(&id, "killed").await;
                self.db
                    .add_event(&id, "error", &format!("create failed: {e}"))
                    .await;
                Err(match ApiError::from(e) {
                    ApiError::NotFound(m) | ApiError::Conflict(m) => ApiError::Internal(m),
                    other => other,
                })
            }
        }
    }

    pub async fn kill_sandbox(&self, row: &SandboxRow, why: &str) -> Result<(), ApiError> {
        match self.runtime.kill(&row.id).await {
            Ok(()) | Err(kiln_runtime::Error::SandboxNotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.db.set_state(&row.id, "killed").await?;
        self.samples.forget(&row.id);
        self.proxy_client.forget(&row.id);
        self.db.add_event(&row.id, "info", why).await;
        self.metrics.inc("kiln_sandboxes_killed_total");
        tracing::info!(sandbox = %row.id, why, "sandbox killed");
        Ok(())
    }

    pub async fn pause_sandbox(&self, row: &SandboxRow, why: &str) -> Result<(), ApiError> {
        if row.state == "paused" {
            return Err(ApiError::Conflict(format!(
                "sandbox {} is already paused",
                row.id
            )));
        }
        let took = self.runtime.pause(&row.id).await.map_err(|e| match e {
            kiln_runtime::Error::InvalidState { state, .. } if state == "paused" => {
                ApiError::Conflict(format!("sandbox {} is already paused", row.id))
            }
            other => other.into(),
        })?;
        self.proxy_client.forget(&row.id);
        self.db.set_state(&row.id, "paused").await?;
        self.db
            .add_event(
                &row.id,
                "info",
                &format!("{why} (took {} ms)", took.as_millis()),
            )
            .await;
        self.metrics.inc("kiln_sandboxes_paused_total");
        Ok(())
    }

    /// Connects to a sandbox: resumes it when paused; its end time moves to
    /// `timeout_s` from now, but never earlier than it was.
    pub async fn connect_sandbox(
        &self,
        team: &Team,
        row: SandboxRow,
        timeout_s: i64,
    ) -> Result<Connected, ApiError> {
        let timeout_s = timeout_s.clamp(0, team.max_lifetime_s);
        let end = now_ms() + timeout_s * 1000;
        if row.state == "paused" {
            let took = self.runtime.resume(&row.id).await?;
            self.db.set_state(&row.id, "running").await?;
            self.db.set_end(&row.id, end).await?;
            self.db
                .add_event(
                    &row.id,
                    "info",
                    &format!("resumed (took {} ms)", took.as_millis()),
                )
                .await;
            self.metrics.inc("kiln_sandboxes_resumed_total");
            Ok(Connected::Resumed(SandboxRow {
                state: "running".into(),
                end_at: end,
                ..row
            }))
        } else {
            let end = end.max(row.end_at);
            self.db.set_end(&row.id, end).await?;
            Ok(Connected::AlreadyRunning(SandboxRow { end_at: end, ..row }))
        }
    }
}
