//! E2B's template build API (v2 builder): request a build, upload COPY
//! sources, start the build, poll its status and logs.
//!
//! Builds run one at a time per node, in the order they were started, in a
//! background task driving [`kiln_templates::Builder`]. Every log line goes to
//! the database as it arrives, so the status endpoint is only a query.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use kiln_templates::{
    BuildFrom, BuildLog, BuildSpec, Builder, ImageDefaults, LogLevel, Step, StepKind,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::app::App;
use crate::auth::Caller;
use crate::db::{BuildRow, Team};
use crate::error::ApiError;
use crate::util::{random_hex, random_id, rfc3339, sha256_hex};

/// Largest upload of COPY sources.
const MAX_UPLOAD_BYTES: u64 = 5 << 30;
/// How long to try reaching a registry for E2B's base image before using Kiln's own.
const BASE_IMAGE_PROBE: Duration = Duration::from_secs(8);
/// E2B's base image, which `Template().from_base_image()` asks for.
const E2B_BASE_IMAGE: &str = "e2bdev/base";

/// Build state shared by the handlers.
pub struct Builds {
    /// Signs upload URLs (valid while this server runs).
    secret: String,
    /// Held by the build that is running; waiting builds queue on it (FIFO).
    run_lock: tokio::sync::Mutex<()>,
    /// Builds whose start was accepted (a second start is refused).
    started: Mutex<HashSet<String>>,
    builder: OnceLock<Arc<Builder>>,
}

impl Default for Builds {
    fn default() -> Self {
        Builds {
            secret: random_hex(32),
            run_lock: tokio::sync::Mutex::new(()),
            started: Mutex::new(HashSet::new()),
            builder: OnceLock::new(),
        }
    }
}

impl Builds {
    /// Whether a build was started and has not finished (queued or running).
    pub fn is_started(&self, build_id: &str) -> bool {
        self.started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(build_id)
    }

    fn upload_token(&self, team_id: &str, hash: &str) -> String {
        sha256_hex(&format!("{}:{team_id}:{hash}", self.secret))[..40].to_string()
    }
}

fn data_dir(app: &App) -> PathBuf {
    app.runtime.config().data_dir.clone()
}

fn builder(app: &Arc<App>) -> Arc<Builder> {
    app.builds
        .builder
        .get_or_init(|| {
            Arc::new(Builder::new(
                app.runtime.clone(),
                data_dir(app).join("cache").join("build"),
                app.cfg.envd.clone(),
                app.cfg.base_rootfs.clone(),
            ))
        })
        .clone()
}

/// Marks builds a previous run left unfinished as failed.
pub async fn recover(app: &App) -> Result<(), ApiError> {
    for id in app.db.unfinished_builds().await? {
        // Whatever the interrupted build made of its runtime template goes.
        if let Some(b) = app.db.build(&id).await?
            && app.runtime.template(&b.runtime_id).is_ok()
        {
            let _ = app.runtime.delete_template(&b.runtime_id);
        }
        app.db
            .set_build_status(&id, "error", Some("interrupted by a restart of kiln serve"))
            .await?;
        // As after any failure: a template without a finished build is not kept.
        if let Some(b) = app.db.build(&id).await?
            && let Some(t) = app.db.template(&b.template_id).await?
            && t.runtime_id.is_none()
        {
            app.db.delete_template(&t.id).await?;
        }
    }
    Ok(())
}

// --- names -------------------------------------------------------------------

/// Splits `name[:tag]` and checks the name (it becomes an alias).
pub fn parse_name(text: &str) -> Result<(String, Option<String>), ApiError> {
    let (name, tag) = match text.rsplit_once(':') {
        Some((n, t)) => (n, Some(t.to_string())),
        None => (text, None),
    };
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if !ok {
        return Err(ApiError::BadRequest(format!(
            "template name '{name}': use 1-128 lowercase letters, digits, '-', '_' and '.', \
             starting with a letter or digit"
        )));
    }
    if let Some(t) = &tag
        && (t.is_empty()
            || t.len() > 128
            || !t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
    {
        return Err(ApiError::BadRequest(format!(
            "template tag '{t}': use letters, digits, '-', '_' and '.'"
        )));
    }
    Ok((name.to_string(), tag))
}

fn valid_hash(hash: &str) -> bool {
    (16..=128).contains(&hash.len()) && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

// --- POST /v3/templates ------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct TemplateRequest {
    name: Option<String>,
    alias: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    cpu_count: Option<i64>,
    #[serde(rename = "memoryMB")]
    memory_mb: Option<i64>,
}

pub async fn request(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    crate::sandboxes::OptionalJson(body): crate::sandboxes::OptionalJson<TemplateRequest>,
) -> Result<Response, ApiError> {
    let body = body.unwrap_or_default();
    let text = body
        .name
        .or(body.alias)
        .ok_or_else(|| ApiError::BadRequest("the template needs a name".into()))?;
    let (name, tag) = parse_name(&text)?;
    let existing = app.db.template(&name).await?;
    if let Some(t) = &existing
        && t.team_id != team.id
    {
        return Err(ApiError::Conflict(format!(
            "the template name '{name}' is taken by another team; choose another name"
        )));
    }
    // A rebuild keeps the template's resources unless it asks for others.
    let defaults = kiln_runtime::Resources::default();
    let cpu = body
        .cpu_count
        .or(existing.as_ref().map(|t| t.cpu))
        .unwrap_or(defaults.vcpus as i64);
    let memory_mb = body
        .memory_mb
        .or(existing.as_ref().map(|t| t.memory_mb))
        .unwrap_or(defaults.memory_mb as i64);
    if !(1..=64).contains(&cpu) {
        return Err(ApiError::BadRequest(format!(
            "cpuCount {cpu}: between 1 and 64"
        )));
    }
    if !(128..=262_144).contains(&memory_mb) {
        return Err(ApiError::BadRequest(format!(
            "memoryMB {memory_mb}: between 128 and 262144"
        )));
    }
    let template_id = match existing {
        Some(t) => t.id,
        None => {
            let id = random_id();
            let envd_version = kiln_runtime::template::TemplateMeta::new("x").envd_version;
            app.db
                .upsert_template(&id, &team.id, false, cpu, memory_mb, &envd_version)
                .await?;
            // The name is reserved now, so a second request reuses this template.
            app.db.add_alias(&name, &id).await?;
            id
        }
    };
    let build_id = random_id();
    let runtime_id = format!("{template_id}-{build_id}").to_lowercase();
    app.db
        .insert_build(&build_id, &template_id, &runtime_id, "waiting")
        .await?;
    app.db
        .set_build_request(
            &build_id,
            &team.id,
            cpu,
            memory_mb,
            std::slice::from_ref(&name),
        )
        .await?;
    let mut tags = body.tags;
    if let Some(t) = tag
        && !tags.contains(&t)
    {
        tags.insert(0, t);
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "templateID": template_id,
            "buildID": build_id,
            "public": false,
            "names": [name],
            "aliases": [name],
            "tags": tags,
        })),
    )
        .into_response())
}

// --- files -------------------------------------------------------------------

fn upload_path(app: &App, team_id: &str, hash: &str) -> PathBuf {
    data_dir(app)
        .join("build-files")
        .join(team_id)
        .join(format!("{hash}.tar"))
}

async fn own_template(
    app: &App,
    team: &Team,
    id: &str,
) -> Result<crate::db::TemplateRow, ApiError> {
    app.db
        .template(id)
        .await?
        .filter(|t| t.team_id == team.id)
        .ok_or_else(|| ApiError::NotFound(format!("template '{id}' not found")))
}

/// `GET /templates/{id}/files/{hash}`: whether the sources are here, and where to upload them.
pub async fn file_link(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    UrlPath((id, hash)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !valid_hash(&hash) {
        return Err(ApiError::BadRequest(format!(
            "files hash '{hash}': expected 16-128 hex digits"
        )));
    }
    let tpl = own_template(&app, &team, &id).await?;
    let present = upload_path(&app, &team.id, &hash).is_file();
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| ApiError::BadRequest("the request has no Host header".into()))?;
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|p| *p == "https")
        .unwrap_or("http");
    let token = app.builds.upload_token(&team.id, &hash);
    let url = format!(
        "{scheme}://{host}/templates/{}/files/{hash}?token={token}",
        tpl.id
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({"present": present, "url": url})),
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct UploadQuery {
    token: Option<String>,
}

/// `PUT /templates/{id}/files/{hash}?token=`: the tar(.gz) of a COPY step's
/// sources (the URL is the credential, as a presigned URL would be).
pub async fn upload(
    State(app): State<Arc<App>>,
    UrlPath((id, hash)): UrlPath<(String, String)>,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    if !valid_hash(&hash) {
        return Err(ApiError::BadRequest(format!(
            "files hash '{hash}': expected 16-128 hex digits"
        )));
    }
    let tpl = app
        .db
        .template(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("template '{id}' not found")))?;
    let expected = app.builds.upload_token(&tpl.team_id, &hash);
    if q.token.as_deref() != Some(expected.as_str()) {
        return Err(ApiError::Forbidden(
            "bad or missing upload token: ask GET /templates/{id}/files/{hash} for the URL".into(),
        ));
    }
    let dest = upload_path(&app, &tpl.team_id, &hash);
    let dir = dest.parent().unwrap_or(Path::new("/")).to_path_buf();
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::Internal(format!("creating {}: {e}", dir.display())))?;
    let tmp = dir.join(format!(".{hash}.{}.part", random_hex(6)));
    let result = write_body(body, &tmp).await;
    match result {
        Ok(()) => tokio::fs::rename(&tmp, &dest)
            .await
            .map_err(|e| ApiError::Internal(format!("storing the upload: {e}")))
            .map(|()| StatusCode::OK),
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

async fn write_body(body: Body, tmp: &Path) -> Result<(), ApiError> {
    let mut file = tokio::fs::File::create(tmp)
        .await
        .map_err(|e| ApiError::Internal(format!("creating {}: {e}", tmp.display())))?;
    let mut stream = body.into_data_stream();
    let mut total: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the upload: {e}")))?;
        total += chunk.len() as u64;
        if total > MAX_UPLOAD_BYTES {
            return Err(ApiError::BadRequest(format!(
                "the upload is larger than {} GiB",
                MAX_UPLOAD_BYTES >> 30
            )));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::Internal(format!("writing the upload: {e}")))?;
    }
    file.sync_all()
        .await
        .map_err(|e| ApiError::Internal(format!("writing the upload: {e}")))?;
    Ok(())
}

// --- starting a build ----------------------------------------------------------

/// A step as the SDKs send it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WireStep {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub files_hash: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryConfig {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// `TemplateBuildStartV2`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct BuildStart {
    pub from_image: Option<String>,
    pub from_template: Option<String>,
    pub from_image_registry: Option<RegistryConfig>,
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub steps: Vec<WireStep>,
    pub start_cmd: Option<String>,
    pub ready_cmd: Option<String>,
}

fn arg(args: &[String], i: usize) -> Option<String> {
    args.get(i).filter(|a| !a.is_empty()).cloned()
}

/// One wire step → a builder step; `context` gives the directory holding the
/// extracted sources of a files hash. `index` is 1-based, for messages.
pub fn wire_to_step(
    index: usize,
    step: &WireStep,
    context: &mut dyn FnMut(&str) -> Result<PathBuf, String>,
) -> Result<Step, String> {
    let a = &step.args;
    let need = |n: usize, what: &str| -> Result<(), String> {
        if a.len() < n {
            Err(format!(
                "step {index}: {} needs {what}, got {} argument(s)",
                step.kind,
                a.len()
            ))
        } else {
            Ok(())
        }
    };
    let kind = match step.kind.to_ascii_uppercase().as_str() {
        "RUN" => {
            need(1, "a command")?;
            StepKind::Run {
                cmd: a[0].clone(),
                user: arg(a, 1),
            }
        }
        kind @ ("COPY" | "ADD") => {
            need(2, "a source and a destination")?;
            let mode = match arg(a, 3) {
                None => None,
                Some(m) => Some(
                    u32::from_str_radix(&m, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or_else(|| {
                            format!("step {index}: bad mode '{m}' (octal, e.g. 0644)")
                        })?,
                ),
            };
            let hash = step
                .files_hash
                .as_deref()
                .ok_or_else(|| format!("step {index}: {kind} has no filesHash"))?;
            let context = context(hash).map_err(|e| format!("step {index}: {e}"))?;
            let (src, dest, user) = (a[0].clone(), a[1].clone(), arg(a, 2));
            if kind == "COPY" {
                StepKind::Copy {
                    context,
                    src,
                    dest,
                    user,
                    mode,
                }
            } else {
                StepKind::Add {
                    context,
                    src,
                    dest,
                    user,
                    mode,
                }
            }
        }
        "ENV" => {
            if !a.len().is_multiple_of(2) {
                return Err(format!(
                    "step {index}: ENV needs name/value pairs, got {} argument(s)",
                    a.len()
                ));
            }
            StepKind::Env(a.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect())
        }
        "WORKDIR" => {
            need(1, "a directory")?;
            StepKind::Workdir(a[0].clone())
        }
        "USER" => {
            need(1, "a user name")?;
            StepKind::User {
                name: a[0].clone(),
                sudo: a.get(1).is_some_and(|s| s.eq_ignore_ascii_case("true")),
            }
        }
        other => {
            return Err(format!(
                "step {index}: unknown step type '{other}' (Kiln builds RUN, COPY, ADD, ENV, WORKDIR and USER)"
            ));
        }
    };
    Ok(Step {
        kind,
        force: step.force,
    })
}

/// `POST /v2/templates/{id}/builds/{buildID}`.
pub async fn start(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    UrlPath((id, build_id)): UrlPath<(String, String)>,
    Json(body): Json<BuildStart>,
) -> Result<StatusCode, ApiError> {
    let build = own_build(&app, &team, &id, &build_id).await?;
    if build.status != "waiting" {
        return Err(ApiError::Conflict(format!(
            "build '{build_id}' has already run (status {})",
            build.status
        )));
    }
    if !app
        .builds
        .started
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(build_id.clone())
    {
        return Err(ApiError::Conflict(format!(
            "build '{build_id}' has already been started"
        )));
    }
    let app2 = app.clone();
    tokio::spawn(async move {
        let _turn = app2.builds.run_lock.lock().await;
        run_build(&app2, &team, build, body).await;
        app2.builds
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&build_id);
    });
    Ok(StatusCode::ACCEPTED)
}

async fn own_build(
    app: &App,
    team: &Team,
    template_id: &str,
    build_id: &str,
) -> Result<BuildRow, ApiError> {
    let not_found = || {
        ApiError::NotFound(format!(
            "build '{build_id}' of template '{template_id}' not found"
        ))
    };
    let build = app.db.build(build_id).await?.ok_or_else(not_found)?;
    let req = app
        .db
        .build_request(build_id)
        .await?
        .ok_or_else(not_found)?;
    if req.team_id != team.id || build.template_id != template_id {
        return Err(not_found());
    }
    Ok(build)
}

/// Runs one build to its end, recording logs and the outcome.
async fn run_build(app: &Arc<App>, team: &Team, build: BuildRow, body: BuildStart) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<BuildLog>();
    let db = app.db.clone();
    let build_id = build.id.clone();
    let writer = tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            let ts = crate::util::ms_of(line.timestamp);
            if let Err(e) = db
                .add_build_log(
                    &build_id,
                    ts,
                    level_name(line.level),
                    line.step.as_deref(),
                    &line.message,
                )
                .await
            {
                tracing::warn!(build = %build_id, error = %e, "could not record a build log line");
            }
        }
    });
    let log_tx = tx.clone();
    let log = move |line: BuildLog| {
        let _ = log_tx.send(line);
    };
    let _ = app.db.set_build_status(&build.id, "building", None).await;
    let ctx_dir = data_dir(app)
        .join("cache")
        .join("build-context")
        .join(&build.id);
    let result = sendable(build_inner(app, team, &build, body, &ctx_dir, &log)).await;
    let _ = tokio::fs::remove_dir_all(&ctx_dir).await;
    drop(log);
    drop(tx);
    let _ = writer.await;
    match result {
        Ok(()) => {
            if let Err(e) = app.db.set_build_status(&build.id, "ready", None).await {
                tracing::error!(build = %build.id, error = %e, "recording a finished build");
            }
            tracing::info!(build = %build.id, template = %build.template_id, "template build ready");
        }
        Err((message, step)) => {
            tracing::info!(build = %build.id, template = %build.template_id, %message, "template build failed");
            let _ = app
                .db
                .set_build_reason_step(&build.id, step.as_deref())
                .await;
            let _ = app
                .db
                .set_build_status(&build.id, "error", Some(&message))
                .await;
            // A template whose first build failed is not kept (its name is free again).
            if let Ok(Some(t)) = app.db.template(&build.template_id).await
                && t.runtime_id.is_none()
                && app.db.active_builds_of(&t.id).await.is_ok_and(|ids| {
                    ids.iter()
                        .all(|id| id == &build.id || !app.builds.is_started(id))
                })
            {
                let _ = app.db.delete_template(&t.id).await;
            }
        }
    }
}

fn sendable<'a, T>(
    f: impl std::future::Future<Output = T> + Send + 'a,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>> {
    Box::pin(f)
}

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
    }
}

type Failure = (String, Option<String>);

fn say(log: &(dyn Fn(BuildLog) + Send + Sync), level: LogLevel, step: &str, message: String) {
    log(BuildLog {
        timestamp: std::time::SystemTime::now(),
        level,
        step: Some(step.to_string()),
        message,
    });
}

async fn build_inner(
    app: &Arc<App>,
    team: &Team,
    build: &BuildRow,
    body: BuildStart,
    ctx_dir: &Path,
    log: &(dyn Fn(BuildLog) + Send + Sync),
) -> Result<(), Failure> {
    let req = app
        .db
        .build_request(&build.id)
        .await
        .ok()
        .flatten()
        .ok_or_else(|| ("the build request is gone".to_string(), None))?;
    // Sources of COPY steps: each uploaded archive extracted once.
    let mut extracted: HashMap<String, PathBuf> = HashMap::new();
    let mut steps = Vec::with_capacity(body.steps.len());
    for (i, wire) in body.steps.iter().enumerate() {
        let mut context = |hash: &str| -> Result<PathBuf, String> {
            if let Some(dir) = extracted.get(hash) {
                return Ok(dir.clone());
            }
            if !valid_hash(hash) {
                return Err(format!("bad filesHash '{hash}'"));
            }
            let archive = upload_path(app, &team.id, hash);
            if !archive.is_file() {
                return Err(format!(
                    "the files of this step (hash {hash}) were not uploaded"
                ));
            }
            let dir = ctx_dir.join(hash);
            extract(&archive, &dir)?;
            extracted.insert(hash.to_string(), dir.clone());
            Ok(dir)
        };
        let step =
            wire_to_step(i + 1, wire, &mut context).map_err(|m| (m, Some((i + 1).to_string())))?;
        steps.push(step);
    }
    let from = sendable(resolve_from(app, team, &body, log))
        .await
        .map_err(|m| (m, Some("base".to_string())))?;
    let spec = BuildSpec {
        target_id: build.runtime_id.clone(),
        from,
        steps,
        start_cmd: body.start_cmd.clone().filter(|c| !c.trim().is_empty()),
        ready_cmd: body.ready_cmd.clone().filter(|c| !c.trim().is_empty()),
        resources: kiln_runtime::Resources {
            vcpus: req.cpu.max(1) as u32,
            memory_mb: req.memory_mb.max(64) as u64,
            ..Default::default()
        },
        force: body.force,
    };
    let builder = builder(app);
    sendable(builder.build(spec, log)).await.map_err(|e| {
        let step = match &e {
            kiln_templates::BuildError::StepFailed { index, .. }
            | kiln_templates::BuildError::StepInvalid { index, .. } => Some(index.to_string()),
            kiln_templates::BuildError::NotReady { .. } => Some("finalize".to_string()),
            _ => None,
        };
        (e.to_string(), step)
    })?;
    // The new build becomes the template's current one.
    if let Err(e) = sendable(make_current(app, team, build, &req)).await {
        let _ = app.runtime.delete_template(&build.runtime_id);
        return Err((format!("recording the build: {e}"), Some("finalize".into())));
    }
    sendable(remove_unused_builds(
        app,
        &build.template_id,
        &build.runtime_id,
    ))
    .await;
    Ok(())
}

async fn make_current(
    app: &App,
    team: &Team,
    build: &BuildRow,
    req: &crate::db::BuildRequestRow,
) -> Result<(), ApiError> {
    let envd_version = app
        .runtime
        .template(&build.runtime_id)
        .map(|m| m.envd_version)
        .unwrap_or_else(|_| kiln_runtime::template::TemplateMeta::new("x").envd_version);
    app.db
        .upsert_template(
            &build.template_id,
            &team.id,
            false,
            req.cpu,
            req.memory_mb,
            &envd_version,
        )
        .await?;
    app.db
        .set_template_build(&build.template_id, &build.id, &build.runtime_id)
        .await?;
    for name in &req.names {
        app.db.add_alias(name, &build.template_id).await?;
    }
    Ok(())
}

/// Older builds of a template that no sandbox uses are removed from the node.
async fn remove_unused_builds(app: &App, template_id: &str, current: &str) {
    let (Ok(all), Ok(in_use)) = (
        app.db.builds_of(template_id).await,
        app.db.runtime_templates_in_use().await,
    ) else {
        return;
    };
    for runtime_id in all {
        if runtime_id != current
            && !in_use.contains(&runtime_id)
            && app.runtime.template(&runtime_id).is_ok()
        {
            tracing::info!(template = %runtime_id, "removing an old build");
            let _ = app.runtime.delete_template(&runtime_id);
        }
    }
}

/// Extracts an uploaded tar (plain or gzip) into `dir`; entries cannot leave it.
fn extract(archive: &Path, dir: &Path) -> Result<(), String> {
    use std::io::{Read, Seek};
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut file =
        std::fs::File::open(archive).map_err(|e| format!("opening the uploaded files: {e}"))?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).unwrap_or(0);
    file.rewind()
        .map_err(|e| format!("reading the uploaded files: {e}"))?;
    let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut tar = tar::Archive::new(reader);
    tar.set_preserve_permissions(true);
    tar.set_overwrite(true);
    tar.unpack(dir)
        .map_err(|e| format!("the uploaded files are not a valid tar archive: {e}"))
}

/// The reference without its tag or digest (`e2bdev/base:latest` → `e2bdev/base`).
fn repository(reference: &str) -> &str {
    let no_digest = reference.split('@').next().unwrap_or(reference);
    match no_digest.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => no_digest,
    }
}

fn is_e2b_base(reference: &str) -> bool {
    let repo = repository(reference);
    repo == E2B_BASE_IMAGE
        || repo == format!("docker.io/{E2B_BASE_IMAGE}")
        || repo == format!("index.docker.io/{E2B_BASE_IMAGE}")
}

async fn resolve_from(
    app: &Arc<App>,
    team: &Team,
    body: &BuildStart,
    log: &(dyn Fn(BuildLog) + Send + Sync),
) -> Result<BuildFrom, String> {
    match (&body.from_template, &body.from_image) {
        (Some(t), _) if !t.is_empty() => {
            let name = repository(t);
            let tpl = app
                .db
                .template(name)
                .await
                .map_err(|e| e.to_string())?
                .filter(|x| x.public || x.team_id == team.id)
                .ok_or_else(|| format!("base template '{t}' not found"))?;
            let runtime_id = tpl
                .runtime_id
                .ok_or_else(|| format!("base template '{t}' has no finished build"))?;
            Ok(BuildFrom::Template(runtime_id))
        }
        (_, Some(image)) if !image.is_empty() => {
            let auth =
                body.from_image_registry
                    .as_ref()
                    .and_then(|r| match (&r.username, &r.password) {
                        (Some(u), Some(p))
                            if r.kind.as_deref().unwrap_or("registry") == "registry" =>
                        {
                            Some(kiln_oci::RegistryAuth {
                                username: u.clone(),
                                password: p.clone(),
                            })
                        }
                        _ => None,
                    });
            if let Some(r) = &body.from_image_registry
                && let Some(kind) = r.kind.as_deref()
                && kind != "registry"
            {
                return Err(format!(
                    "registry type '{kind}' is not supported (use 'registry' with a username and password)"
                ));
            }
            if is_e2b_base(image) {
                // Without a registry to reach (no internet), Kiln's own base stands in.
                let opts = pull_options(app, image, auth.clone());
                let owned = image.to_string();
                let probe = tokio::time::timeout(
                    BASE_IMAGE_PROBE,
                    off_task(move || async move { kiln_oci::resolve_digest(&owned, &opts).await }),
                )
                .await;
                let why = match probe {
                    Ok(Ok(Ok(_))) => return pull_image(app, image, auth, log).await,
                    Ok(Ok(Err(e))) => e.to_string(),
                    Ok(Err(e)) => e,
                    Err(_) => "timed out".to_string(),
                };
                say(
                    log,
                    LogLevel::Info,
                    "base",
                    format!("{image} cannot be pulled ({why}); using Kiln's base image"),
                );
                return Ok(BuildFrom::Base);
            }
            pull_image(app, image, auth, log).await
        }
        _ => Ok(BuildFrom::Base),
    }
}

fn pull_options(
    app: &App,
    image: &str,
    auth: Option<kiln_oci::RegistryAuth>,
) -> kiln_oci::PullOptions {
    let mut opts = kiln_oci::PullOptions::new(data_dir(app).join("cache").join("blobs"));
    opts.auth = auth;
    let host = image.split('/').next().unwrap_or("");
    if image.contains('/')
        && (host.starts_with("127.0.0.1:") || host.starts_with("localhost:") || host == "localhost")
    {
        opts.insecure_registries.push(host.to_string());
    }
    opts
}

/// envd resolves users through `/etc/passwd` and `/etc/group`; minimal
/// images (busybox, distroless) may have neither, and no `useradd` either:
/// such an image gets files with root and E2B's default user `user` (uid
/// 1000, home `/home/user`). Never follows a symlink out of the image.
fn add_passwd(rootfs: &Path) -> Result<(), String> {
    use std::io::Write;
    // The runtime places envd in /usr/bin, which e.g. busybox images lack.
    let usr = rootfs.join("usr");
    if std::fs::symlink_metadata(&usr).is_err() {
        std::fs::create_dir_all(usr.join("bin"))
            .map_err(|e| format!("creating {}: {e}", usr.display()))?;
    }
    let etc = rootfs.join("etc");
    match std::fs::symlink_metadata(&etc) {
        Ok(m) if m.file_type().is_symlink() || !m.is_dir() => return Ok(()),
        Ok(_) => {}
        Err(_) => {
            std::fs::create_dir(&etc).map_err(|e| format!("creating {}: {e}", etc.display()))?
        }
    }
    for (name, line) in [
        (
            "passwd",
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
        ),
        ("group", "root:x:0:\nuser:x:1000:\n"),
    ] {
        let path = etc.join(name);
        if std::fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        if name == "passwd" {
            make_home(rootfs)?;
        }
        // create_new: fails instead of following a symlink created meanwhile.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        f.write_all(line.as_bytes())
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// An image's USER (`name`, `uid`, `name:group`, `uid:gid`) as a user name,
/// which is what envd takes; a uid with no name in the image counts as unset.
fn image_user(rootfs: &Path, user: &str) -> Option<String> {
    let user = user.split(':').next().unwrap_or(user).trim();
    if user.is_empty() {
        return None;
    }
    if !user.bytes().all(|b| b.is_ascii_digit()) {
        return Some(user.to_string());
    }
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let uid = fields.nth(1)?;
        (uid == user).then(|| name.to_string())
    })
}

/// `/home/user` owned by uid 1000, unless `/home` is something else than a directory.
fn make_home(rootfs: &Path) -> Result<(), String> {
    let home = rootfs.join("home");
    match std::fs::symlink_metadata(&home) {
        Ok(m) if m.file_type().is_symlink() || !m.is_dir() => return Ok(()),
        Ok(_) => {}
        Err(_) => {
            std::fs::create_dir(&home).map_err(|e| format!("creating {}: {e}", home.display()))?
        }
    }
    let dir = home.join("user");
    if std::fs::symlink_metadata(&dir).is_err() {
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        std::os::unix::fs::lchown(&dir, Some(1000), Some(1000))
            .map_err(|e| format!("chown {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Runs a future that the compiler cannot prove `Send` (kiln-oci's pull) on
/// a blocking thread of the runtime.
async fn off_task<F, Fut, T>(make: F) -> Result<T, String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || handle.block_on(make()))
        .await
        .map_err(|e| format!("pull task: {e}"))
}

/// Pulls `image` into the image cache (keyed by digest; reused when there).
async fn pull_image(
    app: &App,
    image: &str,
    auth: Option<kiln_oci::RegistryAuth>,
    log: &(dyn Fn(BuildLog) + Send + Sync),
) -> Result<BuildFrom, String> {
    let opts = pull_options(app, image, auth);
    let digest = {
        let (owned, opts) = (image.to_string(), opts.clone());
        off_task(move || async move { kiln_oci::resolve_digest(&owned, &opts).await })
            .await?
            .map_err(|e| format!("image {image}: {e}"))?
    };
    let dir = data_dir(app)
        .join("cache")
        .join("images")
        .join(digest.replace(':', "-"));
    let rootfs = dir.join("rootfs");
    let config_path = dir.join("config.json");
    let config: kiln_oci::ImageConfig = match std::fs::read(&config_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(c) if rootfs.is_dir() => {
            say(
                log,
                LogLevel::Info,
                "base",
                format!("image {image} ({digest}) is in the cache"),
            );
            c
        }
        _ => {
            say(
                log,
                LogLevel::Info,
                "base",
                format!("pulling {image} ({digest})"),
            );
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            let pulled = {
                let (owned, opts, rootfs) = (image.to_string(), opts.clone(), rootfs.clone());
                off_task(move || async move { kiln_oci::pull(&owned, &opts, &rootfs).await })
                    .await?
                    .map_err(|e| format!("pulling {image}: {e}"))?
            };
            say(
                log,
                LogLevel::Info,
                "base",
                format!(
                    "pulled {image}: {} layers, {} bytes downloaded",
                    pulled.layers.len(),
                    pulled.stats.bytes_downloaded
                ),
            );
            add_passwd(&rootfs)?;
            let text = serde_json::to_vec(&pulled.config).map_err(|e| e.to_string())?;
            std::fs::write(&config_path, text)
                .map_err(|e| format!("writing {}: {e}", config_path.display()))?;
            pulled.config
        }
    };
    let user = config.user.as_deref().and_then(|u| image_user(&rootfs, u));
    Ok(BuildFrom::Rootfs {
        path: rootfs,
        key: digest,
        config: ImageDefaults {
            env: config.env,
            workdir: config.working_dir,
            user,
        },
    })
}

// --- status ----------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusQuery {
    logs_offset: Option<i64>,
    limit: Option<i64>,
    level: Option<String>,
}

fn level_rank(level: &str) -> u8 {
    match level {
        "debug" => 0,
        "info" => 1,
        "warn" => 2,
        _ => 3,
    }
}

/// The wire name of a log line's step: step numbers bare (`step 3` → `3`).
fn wire_step(step: &str) -> String {
    step.strip_prefix("step ").unwrap_or(step).to_string()
}

/// `GET /templates/{id}/builds/{buildID}/status`.
pub async fn status(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    UrlPath((id, build_id)): UrlPath<(String, String)>,
    Query(q): Query<StatusQuery>,
) -> Result<Json<Value>, ApiError> {
    let build = own_build(&app, &team, &id, &build_id).await?;
    let offset = q.logs_offset.unwrap_or(0).max(0);
    let limit = q.limit.unwrap_or(100).clamp(0, 100);
    let min_level = q.level.as_deref().map(level_rank).unwrap_or(0);
    let entries: Vec<_> = if min_level == 0 {
        app.db.build_logs(&build_id, offset, limit).await?
    } else {
        app.db
            .build_logs(&build_id, 0, i64::MAX / 2)
            .await?
            .into_iter()
            .filter(|l| level_rank(&l.level) >= min_level)
            .skip(offset as usize)
            .take(limit as usize)
            .collect()
    };
    let log_entries: Vec<Value> = entries
        .iter()
        .map(|l| {
            let mut v = json!({"timestamp": rfc3339(l.ts), "level": l.level, "message": l.message});
            if let Some(s) = &l.step {
                v["step"] = json!(wire_step(s));
            }
            v
        })
        .collect();
    let logs: Vec<String> = entries
        .iter()
        .map(|l| format!("[{}] {}", rfc3339(l.ts), l.message))
        .collect();
    let mut out = json!({
        "templateID": build.template_id,
        "buildID": build.id,
        "status": build.status,
        "logEntries": log_entries,
        "logs": logs,
    });
    if build.status == "error" {
        let step = app
            .db
            .build_request(&build_id)
            .await?
            .and_then(|r| r.reason_step);
        let mut reason =
            json!({"message": build.reason.clone().unwrap_or_else(|| "build failed".into())});
        if let Some(s) = step {
            reason["step"] = json!(s);
        }
        out["reason"] = reason;
    }
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(kind: &str, args: &[&str]) -> WireStep {
        WireStep {
            kind: kind.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            force: false,
            files_hash: None,
        }
    }

    fn no_files(_: &str) -> Result<PathBuf, String> {
        Err("no files".into())
    }

    #[test]
    fn sdk_steps_translate() {
        let json = r#"{"fromImage": "python:3.12", "force": false, "steps": [
            {"type": "COPY", "args": ["app.py", "/app/app.py", "", ""], "filesHash": "0890585a671d17ce", "force": false},
            {"type": "COPY", "args": ["requirements.txt", "/app/", "root", "0644"], "filesHash": "9321a8a11c27259b", "force": true},
            {"type": "RUN", "args": ["pip install flask", "root"], "force": false},
            {"type": "ENV", "args": ["A", "1", "B", "2"], "force": false},
            {"type": "WORKDIR", "args": ["/app"], "force": false},
            {"type": "USER", "args": ["user"], "force": false},
            {"type": "USER", "args": ["admin", "true"], "force": false},
            {"type": "RUN", "args": ["echo hi"], "force": false}],
            "startCmd": "python app.py", "readyCmd": "true"}"#;
        let start: BuildStart = serde_json::from_str(json).unwrap();
        assert_eq!(start.from_image.as_deref(), Some("python:3.12"));
        assert_eq!(start.start_cmd.as_deref(), Some("python app.py"));
        let mut asked = Vec::new();
        let mut ctx = |h: &str| {
            asked.push(h.to_string());
            Ok(PathBuf::from(format!("/ctx/{h}")))
        };
        let steps: Vec<Step> = start
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| wire_to_step(i + 1, s, &mut ctx).unwrap())
            .collect();
        assert_eq!(asked, ["0890585a671d17ce", "9321a8a11c27259b"]);
        assert_eq!(
            steps[0].kind,
            StepKind::Copy {
                context: "/ctx/0890585a671d17ce".into(),
                src: "app.py".into(),
                dest: "/app/app.py".into(),
                user: None,
                mode: None
            }
        );
        assert!(!steps[0].force);
        assert_eq!(
            steps[1].kind,
            StepKind::Copy {
                context: "/ctx/9321a8a11c27259b".into(),
                src: "requirements.txt".into(),
                dest: "/app/".into(),
                user: Some("root".into()),
                mode: Some(0o644)
            }
        );
        assert!(steps[1].force);
        assert_eq!(
            steps[2].kind,
            StepKind::Run {
                cmd: "pip install flask".into(),
                user: Some("root".into())
            }
        );
        assert_eq!(
            steps[3].kind,
            StepKind::Env(vec![("A".into(), "1".into()), ("B".into(), "2".into())])
        );
        assert_eq!(steps[4].kind, StepKind::Workdir("/app".into()));
        assert_eq!(
            steps[5].kind,
            StepKind::User {
                name: "user".into(),
                sudo: false
            }
        );
        assert_eq!(
            steps[6].kind,
            StepKind::User {
                name: "admin".into(),
                sudo: true
            }
        );
        assert_eq!(
            steps[7].kind,
            StepKind::Run {
                cmd: "echo hi".into(),
                user: None
            }
        );
    }

    #[test]
    fn bad_steps_are_refused_with_the_reason() {
        let cases = [
            (
                wire("HEALTHCHECK", &["x"]),
                "unknown step type 'HEALTHCHECK'",
            ),
            (wire("RUN", &[]), "RUN needs a command"),
            (wire("ENV", &["A"]), "name/value pairs"),
            (wire("WORKDIR", &[]), "needs a directory"),
            (wire("COPY", &["a", "/b"]), "has no filesHash"),
        ];
        for (step, want) in cases {
            let err = wire_to_step(3, &step, &mut no_files).unwrap_err();
            assert!(err.contains(want) && err.starts_with("step 3"), "{err}");
        }
        let mut bad_mode = wire("COPY", &["a", "/b", "", "999"]);
        bad_mode.files_hash = Some("ab".repeat(8));
        let err = wire_to_step(1, &bad_mode, &mut |_: &str| Ok(PathBuf::from("/c"))).unwrap_err();
        assert!(err.contains("bad mode '999'"), "{err}");
        let mut missing = wire("COPY", &["a", "/b"]);
        missing.files_hash = Some("ab".repeat(8));
        let err = wire_to_step(1, &missing, &mut no_files).unwrap_err();
        assert!(err.contains("no files"), "{err}");
    }

    #[test]
    fn numeric_image_users_become_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
        )
        .unwrap();
        assert_eq!(image_user(dir.path(), "1000:1000").as_deref(), Some("user"));
        assert_eq!(image_user(dir.path(), "0").as_deref(), Some("root"));
        assert_eq!(image_user(dir.path(), "app:staff").as_deref(), Some("app"));
        assert_eq!(image_user(dir.path(), "4242"), None);
        assert_eq!(image_user(dir.path(), ""), None);
    }

    #[test]
    fn minimal_images_get_users_and_usr_bin() {
        let dir = tempfile::tempdir().unwrap();
        add_passwd(dir.path()).unwrap();
        let passwd = std::fs::read_to_string(dir.path().join("etc/passwd")).unwrap();
        assert!(passwd.starts_with("root:x:0:0:") && passwd.contains("user:x:1000:1000:"));
        assert!(dir.path().join("usr/bin").is_dir());
        assert!(dir.path().join("home/user").is_dir());
        // An image's own files are left alone.
        std::fs::write(dir.path().join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
        add_passwd(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("etc/passwd")).unwrap(),
            "root:x:0:0::/:/bin/sh\n"
        );
        // A symlinked /etc is never written through.
        let other = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), other.path().join("etc")).unwrap();
        add_passwd(other.path()).unwrap();
        assert!(!outside.path().join("passwd").exists());
    }

    #[test]
    fn names_and_images() {
        assert_eq!(parse_name("my-tpl").unwrap(), ("my-tpl".into(), None));
        assert_eq!(
            parse_name("my-tpl:v2").unwrap(),
            ("my-tpl".into(), Some("v2".into()))
        );
        for bad in ["", "My", "-x", "a b", "x:", "x:a/b", "team/x"] {
            assert!(parse_name(bad).is_err(), "{bad}");
        }
        assert!(is_e2b_base("e2bdev/base"));
        assert!(is_e2b_base("e2bdev/base:latest"));
        assert!(is_e2b_base("docker.io/e2bdev/base:1.2"));
        assert!(!is_e2b_base("e2bdev/desktop"));
        assert_eq!(
            repository("127.0.0.1:5000/kiln-test/busybox:gzip"),
            "127.0.0.1:5000/kiln-test/busybox"
        );
        assert_eq!(repository("127.0.0.1:5000/x"), "127.0.0.1:5000/x");
        assert_eq!(wire_step("step 12"), "12");
        assert_eq!(wire_step("base"), "base");
        assert!(valid_hash(&"a".repeat(64)) && !valid_hash("xyz") && !valid_hash("../x"));
    }
}
