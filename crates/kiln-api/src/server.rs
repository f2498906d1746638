//! Start-up and the router of `kiln serve`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use kiln_runtime::template::TemplateMeta;
use kiln_runtime::{Runtime, RuntimeConfig};
use serde_json::{Value, json};

use crate::app::App;
use crate::auth::Caller;
use crate::db::{Db, Team};
use crate::error::ApiError;

/// The team that owns the public `base` template.
pub const SYSTEM_TEAM: &str = "kiln-system";
/// The team the first key belongs to.
pub const DEFAULT_TEAM: &str = "default";
/// The default template's id and alias.
pub const BASE_TEMPLATE: &str = "base";

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `sqlite://...` or `postgres://...`; default: SQLite in the data dir.
    pub database_url: String,
    /// Sandbox domain returned to the SDKs (`None`: they keep `E2B_SANDBOX_URL`).
    pub domain: Option<String>,
    /// The debootstrap base image the `base` template is made from.
    pub base_rootfs: PathBuf,
    /// The static envd placed in every template.
    pub envd: PathBuf,
    /// Warm sandboxes kept ready for `base`.
    pub pool_size: usize,
    /// Limits of new teams.
    pub default_concurrency: i64,
    pub default_max_lifetime_s: i64,
    /// `KILN_API_KEY`: use this key instead of generating one.
    pub api_key: Option<String>,
    pub client_id: String,
    pub runtime: RuntimeConfig,
}

pub struct Server {
    pub app: Arc<App>,
    /// A key made at this start (first start only), to be printed once.
    pub new_key: Option<String>,
}

impl Server {
    /// Opens the database, starts the runtime (recovering what a previous
    /// run left), brings the database in step with it, makes sure a key
    /// exists, and prepares `base` in the background (`/health` says when).
    pub async fn start(cfg: ServerConfig) -> Result<Server, ApiError> {
        let db = Db::connect(&cfg.database_url).await?;
        let rt_cfg = cfg.runtime.clone();
        let runtime = tokio::task::spawn_blocking(move || Runtime::start(rt_cfg))
            .await
            .map_err(|e| ApiError::Internal(format!("runtime start task: {e}")))??;
        let app = Arc::new(App::new(cfg, db, runtime));
        reconcile(&app).await?;
        crate::builds::recover(&app).await?;
        let default_team = ensure_team(&app, DEFAULT_TEAM).await?;
        let mut new_key = None;
        if let Some(key) = &app.cfg.api_key {
            crate::auth::import_key(&app.db, &default_team, key).await?;
        } else if app.db.count_keys().await? == 0 {
            let (_, key) = crate::auth::create_key(&app.db, &default_team, "default").await?;
            new_key = Some(key);
        }
        let base_app = app.clone();
        tokio::spawn(async move {
            match prepare_base(&base_app).await {
                Ok(()) => {
                    base_app.ready.store(true, Ordering::SeqCst);
                    tracing::info!("ready: template '{BASE_TEMPLATE}' can be created from");
                }
                Err(e) => tracing::error!(error = %e, "preparing the base template failed"),
            }
        });
        crate::lifecycle::spawn(app.clone());
        Ok(Server { app, new_key })
    }

    pub fn router(&self) -> Router {
        router(self.app.clone())
    }

    /// A clean stop: warm pools are emptied (their sandboxes are disposable)
    /// and background teardowns finish. Users' sandboxes keep running and
    /// are adopted at the next start.
    pub async fn shutdown(&self) {
        let base = self
            .app
            .base_runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(id) = base
            && let Err(e) = self.app.runtime.set_pool_size(&id, 0).await
        {
            tracing::warn!(error = %e, "emptying the warm pool");
        }
        let rt = self.app.runtime.clone();
        let _ = tokio::task::spawn_blocking(move || rt.wait_for_teardowns()).await;
    }
}

/// A team by name, created with the default limits if missing.
pub async fn ensure_team(app: &App, name: &str) -> Result<Team, ApiError> {
    match app.db.team_by_name(name).await? {
        Some(t) => Ok(t),
        None => {
            app.db
                .create_team(
                    name,
                    app.cfg.default_concurrency,
                    app.cfg.default_max_lifetime_s,
                )
                .await
        }
    }
}

/// Sandboxes the database thinks live but the runtime lost (a crash, a
/// reboot) are marked gone; the runtime's own recovery already freed them.
async fn reconcile(app: &App) -> Result<(), ApiError> {
    for row in app.db.live_sandboxes(None).await? {
        let state = app.runtime.info(&row.id).map(|i| i.state).ok();
        let db_state = match state {
            Some(kiln_runtime::SandboxState::Running) => "running",
            Some(kiln_runtime::SandboxState::Paused) => "paused",
            _ => "killed",
        };
        if db_state != row.state {
            tracing::info!(sandbox = %row.id, from = %row.state, to = db_state, "reconciled after restart");
            app.db.set_state(&row.id, db_state).await?;
            app.db
                .add_event(
                    &row.id,
                    "warn",
                    &format!("found {db_state} after a server restart"),
                )
                .await;
        }
    }
    Ok(())
}

/// The runtime template behind `base`: named after what it is made of
/// (the envd binary and the base image's recipe), so an upgrade makes a new
/// one while sandboxes of the old one keep running.
async fn prepare_base(app: &Arc<App>) -> Result<(), ApiError> {
    let envd = std::fs::read(&app.cfg.envd).map_err(|e| {
        ApiError::Internal(format!("reading envd at {}: {e}", app.cfg.envd.display()))
    })?;
    let recipe = std::fs::read(app.cfg.base_rootfs.join(".kiln-base-recipe")).unwrap_or_default();
    let mut stamp = crate::util::sha256_hex_bytes(&envd);
    stamp.push_str(&crate::util::sha256_hex_bytes(&recipe));
    // The template holds the resolver address, which follows the subnet.
    stamp.push_str(&app.runtime.config().network.subnet.to_string());
    // Snapshots of an older runtime restore, but without today's features.
    stamp.push_str(&kiln_runtime::SNAPSHOT_FORMAT.to_string());
    stamp.push_str(&app.runtime.config().platform);
    let runtime_id = format!("base-{}", &crate::util::sha256_hex(&stamp)[..12]);
    let system = ensure_team(app, SYSTEM_TEAM).await?;
    let meta = TemplateMeta::new(runtime_id.clone());
    if !app.runtime.has_snapshot(&runtime_id) {
        tracing::info!(template = %runtime_id, "making the base template (first start or upgrade)");
        let rt = app.runtime.clone();
        let (m, base, envd_path) = (
            meta.clone(),
            app.cfg.base_rootfs.clone(),
            app.cfg.envd.clone(),
        );
        tokio::task::spawn_blocking(move || rt.create_template(&m, &base, &envd_path))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
        app.runtime.snapshot_template(&runtime_id).await?;
    }
    app.db
        .upsert_template(
            BASE_TEMPLATE,
            &system.id,
            true,
            meta.resources.vcpus as i64,
            meta.resources.memory_mb as i64,
            &meta.envd_version,
        )
        .await?;
    app.db
        .set_template_build(BASE_TEMPLATE, &runtime_id, &runtime_id)
        .await?;
    app.db.add_alias(BASE_TEMPLATE, BASE_TEMPLATE).await?;
    *app.base_runtime.lock().unwrap_or_else(|e| e.into_inner()) = Some(runtime_id.clone());
    if app.cfg.pool_size > 0 {
        app.runtime
            .set_pool_size(&runtime_id, app.cfg.pool_size)
            .await?;
    }
    // Older base builds that no sandbox uses any more.
    let in_use = app.db.runtime_templates_in_use().await?;
    if let Ok(dirs) = std::fs::read_dir(app.runtime.config().data_dir.join("templates")) {
        for d in dirs.flatten() {
            let name = d.file_name().to_string_lossy().into_owned();
            if name.starts_with("base-") && name != runtime_id && !in_use.contains(&name) {
                tracing::info!(template = %name, "removing an old base build");
                let _ = app.runtime.delete_template(&name);
            }
        }
    }
    Ok(())
}

pub fn router(app: Arc<App>) -> Router {
    use crate::sandboxes as s;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/sandboxes", post(s::create_v1).get(s::list_v1))
        .route("/v2/sandboxes", post(s::create_v2).get(s::list_v2))
        .route("/sandboxes/{id}", get(s::info).delete(s::kill))
        .route("/sandboxes/{id}/timeout", post(s::set_timeout))
        .route("/sandboxes/{id}/pause", post(s::pause))
        .route("/sandboxes/{id}/resume", post(s::resume))
        .route("/sandboxes/{id}/connect", post(s::connect))
        .route("/v2/sandboxes/{id}/connect", post(s::connect))
        .route("/sandboxes/{id}/metrics", get(s::metrics))
        .route("/sandboxes/{id}/logs", get(s::logs))
        .route("/templates", get(crate::templates::list))
        .route("/templates/aliases/{alias}", get(crate::templates::alias))
        .route("/templates/{id}", delete(crate::templates::delete))
        .route("/v3/templates", post(crate::builds::request))
        .route(
            "/templates/{id}/files/{hash}",
            get(crate::builds::file_link).put(crate::builds::upload),
        )
        .route(
            "/v2/templates/{id}/builds/{build}",
            post(crate::builds::start),
        )
        .route(
            "/templates/{id}/builds/{build}/status",
            get(crate::builds::status),
        )
        .route("/api-keys", get(list_keys).post(create_key))
        .route("/api-keys/{id}", delete(delete_key))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            crate::proxy::route,
        ))
        .with_state(app)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        ApiError::Unavailable("starting: the base template is not ready yet".into()).into_response()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let live = app.db.live_sandboxes(None).await.unwrap_or_default();
    let running = live.iter().filter(|s| s.state == "running").count() as f64;
    let paused = live.iter().filter(|s| s.state == "paused").count() as f64;
    let text = app.metrics.render(&[
        ("kiln_sandboxes_running", "Sandboxes running now.", running),
        ("kiln_sandboxes_paused", "Sandboxes paused now.", paused),
        (
            "kiln_server_resident_memory_bytes",
            "Resident memory of kiln serve.",
            crate::metrics::self_rss_bytes() as f64,
        ),
        (
            "kiln_ready",
            "1 once the base template can be created from.",
            if app.ready.load(Ordering::SeqCst) {
                1.0
            } else {
                0.0
            },
        ),
    ]);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

async fn list_keys(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
) -> Result<Json<Value>, ApiError> {
    let keys = app.db.list_keys(Some(&team.id)).await?;
    Ok(Json(Value::Array(
        keys.iter()
            .map(|k| {
                json!({"id": k.id, "name": k.name, "mask": {"maskedValuePrefix": "e2b_", "valueLength": 44, "prefix": k.mask},
                       "createdAt": crate::util::rfc3339(k.created_at),
                       "lastUsed": k.last_used.map(crate::util::rfc3339)})
            })
            .collect(),
    )))
}

#[derive(serde::Deserialize, Default)]
struct NewKey {
    name: Option<String>,
}

async fn create_key(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    crate::sandboxes::OptionalJson(body): crate::sandboxes::OptionalJson<NewKey>,
) -> Result<Response, ApiError> {
    let name = body
        .and_then(|b| b.name)
        .unwrap_or_else(|| "unnamed".into());
    let (id, key) = crate::auth::create_key(&app.db, &team, &name).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "name": name, "key": key})),
    )
        .into_response())
}

async fn delete_key(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if app.db.delete_key(&id, Some(&team.id)).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("API key '{id}' not found")))
    }
}
