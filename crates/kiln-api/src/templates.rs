//! Template endpoints: list, aliases, delete. Builds are in [`crate::builds`].

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::app::App;
use crate::auth::Caller;
use crate::db::TemplateRow;
use crate::error::ApiError;
use crate::util::rfc3339;

pub use crate::builds::Builds;

pub fn template_json(t: &TemplateRow) -> Value {
    json!({
        "templateID": t.id,
        "buildID": t.build_id,
        "cpuCount": t.cpu,
        "memoryMB": t.memory_mb,
        "diskSizeMB": crate::lifecycle::DEFAULT_DISK_MB,
        "public": t.public,
        "aliases": t.aliases,
        "names": t.aliases,
        "createdAt": rfc3339(t.created_at),
        "updatedAt": rfc3339(t.updated_at),
        "lastSpawnedAt": null,
        "spawnCount": t.spawn_count,
        "buildCount": 1,
        "envdVersion": t.envd_version,
        "buildStatus": if t.runtime_id.is_some() { "ready" } else { "building" },
    })
}

pub async fn list(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
) -> Result<Json<Value>, ApiError> {
    let rows = app.db.templates(&team.id).await?;
    Ok(Json(Value::Array(rows.iter().map(template_json).collect())))
}

pub async fn alias(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    Path(alias): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match app.db.template(&alias).await? {
        Some(t) if t.public || t.team_id == team.id => {
            Ok(Json(json!({"templateID": t.id, "public": t.public})))
        }
        Some(_) => Err(ApiError::Forbidden(format!(
            "template '{alias}' belongs to another team"
        ))),
        None => Err(ApiError::NotFound(format!("template '{alias}' not found"))),
    }
}

/// Deletes a template and its builds; refused while sandboxes use any of them.
pub async fn delete(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let tpl = app
        .db
        .template(&id)
        .await?
        .filter(|t| t.team_id == team.id)
        .ok_or_else(|| ApiError::NotFound(format!("template '{id}' not found")))?;
    // Requested builds never started do not count: a client may give up.
    let active = app.db.active_builds_of(&tpl.id).await?;
    if active.iter().any(|b| app.builds.is_started(b)) {
        return Err(ApiError::Conflict(format!(
            "template '{id}' is being built: wait for the build to finish"
        )));
    }
    let mut runtime_ids = app.db.builds_of(&tpl.id).await?;
    runtime_ids.extend(tpl.runtime_id.clone());
    let in_use = app.db.runtime_templates_in_use().await?;
    if runtime_ids.iter().any(|r| in_use.contains(r)) {
        return Err(ApiError::BadRequest(format!(
            "template '{id}' is used by running or paused sandboxes: kill them first"
        )));
    }
    app.db.delete_template(&tpl.id).await?;
    for runtime_id in runtime_ids {
        let _ = app.runtime.set_pool_size(&runtime_id, 0).await;
        if let Err(e) = app.runtime.delete_template(&runtime_id) {
            tracing::debug!(template = %runtime_id, error = %e, "removing a build");
        }
    }
    Ok(StatusCode::NO_CONTENT)
}
