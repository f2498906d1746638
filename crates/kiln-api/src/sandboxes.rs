//! The sandbox endpoints, on both path sets the SDKs use (`/sandboxes` for
//! SDK 2.45 and older, `/v2/sandboxes` for the newest).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::{App, Connected, NewSandbox};
use crate::auth::Caller;
use crate::db::SandboxRow;
use crate::error::ApiError;
use crate::util::{now_ms, parse_rfc3339, rfc3339};

/// Default lifetime of a sandbox created without a timeout.
const DEFAULT_TIMEOUT_S: i64 = 300;
/// What a v1 create without a timeout gets (E2B's v1 default).
const DEFAULT_TIMEOUT_V1_S: i64 = 15;

/// A JSON body that may be absent or empty (`{}` is allowed on connect).
pub struct OptionalJson<T>(pub Option<T>);

impl<S, T> axum::extract::FromRequest<S> for OptionalJson<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        serde_json::from_slice(&bytes)
            .map(|v| OptionalJson(Some(v)))
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
    }
}

/// A JSON body with E2B-shaped errors.
pub struct JsonBody<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match OptionalJson::<T>::from_request(req, state).await? {
            OptionalJson(Some(v)) => Ok(JsonBody(v)),
            OptionalJson(None) => Err(ApiError::BadRequest("a JSON body is required".into())),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct CreateBody {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<i64>,
    #[serde(default)]
    metadata: Option<HashMap<String, String>>,
    #[serde(default)]
    env_vars: Option<HashMap<String, String>>,
    secure: Option<bool>,
    #[serde(default)]
    auto_pause: Option<bool>,
    #[serde(rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    network: Option<Value>,
}

fn parse_create(body: CreateBody, default_timeout: i64) -> Result<NewSandbox, ApiError> {
    if body.template_id.trim().is_empty() {
        return Err(ApiError::BadRequest("templateID is required".into()));
    }
    let allow_internet = body.allow_internet_access.unwrap_or(true);
    let mut egress = kiln_runtime::network::EgressPolicy {
        internet: allow_internet,
        ..Default::default()
    };
    if let Some(net) = &body.network {
        for (field, list) in [
            ("allowOut", &mut egress.allow_out),
            ("denyOut", &mut egress.deny_out),
        ] {
            let Some(items) = net.get(field).and_then(Value::as_array) else {
                continue;
            };
            for item in items {
                let text = item.as_str().unwrap_or_default();
                let parsed = text
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
                match parsed {
                    Ok(n) => list.push(n),
                    Err(_) => {
                        return Err(ApiError::BadRequest(format!(
                            "network.{field}: '{text}' is not an IP address or CIDR range \
                             (host names are not supported)"
                        )));
                    }
                }
            }
        }
    }
    Ok(NewSandbox {
        template: body.template_id,
        timeout_s: body.timeout.unwrap_or(default_timeout),
        metadata: body.metadata.unwrap_or_default(),
        env_vars: body.env_vars.unwrap_or_default(),
        secure: body.secure.unwrap_or(true),
        auto_pause: body.auto_pause.unwrap_or(false),
        allow_internet,
        network: body.network,
        egress,
    })
}

/// The `Sandbox` object a create or connect returns.
fn sandbox_json(app: &App, s: &SandboxRow) -> Value {
    json!({
        "templateID": s.template_id,
        "sandboxID": s.id,
        "alias": s.alias,
        "clientID": app.cfg.client_id,
        "envdVersion": s.envd_version,
        "envdAccessToken": s.access_token,
        "trafficAccessToken": null,
        "domain": app.cfg.domain,
    })
}

fn listed_json(app: &App, s: &SandboxRow) -> Value {
    json!({
        "templateID": s.template_id,
        "alias": s.alias,
        "sandboxID": s.id,
        "clientID": app.cfg.client_id,
        "startedAt": rfc3339(s.started_at),
        "endAt": rfc3339(s.end_at),
        "cpuCount": s.cpu,
        "memoryMB": s.memory_mb,
        // The writable layer's limit (see docs/runtime.md).
        "diskSizeMB": crate::lifecycle::DEFAULT_DISK_MB,
        "metadata": s.metadata,
        "state": if s.state == "paused" { "paused" } else { "running" },
        "envdVersion": s.envd_version,
        "volumeMounts": [],
    })
}

fn detail_json(app: &App, s: &SandboxRow) -> Value {
    let mut v = listed_json(app, s);
    let extra = json!({
        "envdAccessToken": s.access_token,
        "allowInternetAccess": s.allow_internet,
        "domain": app.cfg.domain,
        "network": s.network,
        "lifecycle": {
            "autoResume": false,
            "onTimeout": if s.auto_pause { "pause" } else { "kill" },
        },
    });
    if let (Some(obj), Some(more)) = (v.as_object_mut(), extra.as_object()) {
        obj.extend(more.clone());
        // The SDKs parse these as objects when present.
        if s.network.is_none() {
            obj.remove("network");
        }
    }
    v
}

pub async fn create_v2(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<Response, ApiError> {
    let req = parse_create(body, DEFAULT_TIMEOUT_S)?;
    let row = app.create_sandbox(&team, req).await?;
    Ok((StatusCode::CREATED, Json(sandbox_json(&app, &row))).into_response())
}

pub async fn create_v1(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<Response, ApiError> {
    let req = parse_create(body, DEFAULT_TIMEOUT_V1_S)?;
    let row = app.create_sandbox(&team, req).await?;
    Ok((StatusCode::CREATED, Json(sandbox_json(&app, &row))).into_response())
}

#[derive(Debug, Deserialize, Default)]
pub struct ListQuery {
    metadata: Option<String>,
    state: Option<String>,
    order: Option<String>,
    #[serde(rename = "startedAfter")]
    started_after: Option<String>,
    template: Option<String>,
    limit: Option<i64>,
    #[serde(rename = "nextToken")]
    next_token: Option<String>,
}

/// The metadata filter: a form-encoded `k=v&k2=v2` whose keys and values are
/// percent-encoded once more by the SDKs.
fn parse_metadata_filter(text: &str) -> HashMap<String, String> {
    form_urlencoded::parse(text.as_bytes())
        .map(|(k, v)| {
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(&k), decode(&v))
        })
        .collect()
}

/// Sandboxes of the caller's team after the list filters, in list order.
async fn filtered(app: &App, team_id: &str, q: &ListQuery) -> Result<Vec<SandboxRow>, ApiError> {
    let states: Vec<String> = q
        .state
        .as_deref()
        .map(|s| {
            s.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect()
        })
        .unwrap_or_default();
    for s in &states {
        if s != "running" && s != "paused" {
            return Err(ApiError::BadRequest(format!(
                "invalid state '{s}': use running, paused or both"
            )));
        }
    }
    let metadata = q
        .metadata
        .as_deref()
        .map(parse_metadata_filter)
        .unwrap_or_default();
    let started_after = match &q.started_after {
        Some(t) => Some(parse_rfc3339(t).ok_or_else(|| {
            ApiError::BadRequest(format!("startedAfter '{t}' is not an RFC 3339 time"))
        })?),
        None => None,
    };
    let mut out = Vec::new();
    for row in app.db.live_sandboxes(Some(team_id)).await? {
        if row.state == "creating" {
            continue;
        }
        let Some(row) = app.sync(row).await else {
            continue;
        };
        if !states.is_empty() && !states.contains(&row.state) {
            continue;
        }
        if !metadata.iter().all(|(k, v)| row.metadata.get(k) == Some(v)) {
            continue;
        }
        if started_after.is_some_and(|t| row.started_at < t) {
            continue;
        }
        if let Some(t) = &q.template
            && &row.template_id != t
            && row.alias.as_ref() != Some(t)
        {
            continue;
        }
        out.push(row);
    }
    let asc = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(o) => {
            return Err(ApiError::BadRequest(format!(
                "invalid order '{o}': use asc or desc"
            )));
        }
    };
    out.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
    if !asc {
        out.reverse();
    }
    Ok(out)
}

pub async fn list_v2(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let all = filtered(&app, &team.id, &q).await?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest(
            "limit must be between 1 and 1000".into(),
        ));
    }
    // The token is the id of the last sandbox of the previous page.
    let start = match q.next_token.as_deref().filter(|t| !t.is_empty()) {
        Some(token) => {
            let after = String::from_utf8(
                base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, token)
                    .map_err(|_| ApiError::BadRequest("invalid nextToken".into()))?,
            )
            .map_err(|_| ApiError::BadRequest("invalid nextToken".into()))?;
            all.iter()
                .position(|s| s.id == after)
                .map(|i| i + 1)
                .unwrap_or(all.len())
        }
        None => 0,
    };
    let page: Vec<&SandboxRow> = all.iter().skip(start).take(limit as usize).collect();
    let mut headers = HeaderMap::new();
    let running = all.iter().filter(|s| s.state == "running").count();
    headers.insert("x-total-running", HeaderValue::from(running));
    if start + page.len() < all.len()
        && let Some(last) = page.last()
    {
        let token =
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &last.id);
        if let Ok(v) = HeaderValue::from_str(&token) {
            headers.insert("x-next-token", v);
        }
    }
    let body: Vec<Value> = page.iter().map(|s| listed_json(&app, s)).collect();
    Ok((StatusCode::OK, headers, Json(body)).into_response())
}

/// `GET /sandboxes` (1.x SDKs): running sandboxes only.
pub async fn list_v1(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    Query(mut q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    q.state = Some("running".into());
    let all = filtered(&app, &team.id, &q).await?;
    let body: Vec<Value> = all.iter().map(|s| listed_json(&app, s)).collect();
    Ok(Json(body).into_response())
}

pub async fn info(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = app.sandbox_of(&team, &id).await?;
    Ok(Json(detail_json(&app, &row)))
}

pub async fn kill(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let row = app.sandbox_of(&team, &id).await?;
    app.kill_sandbox(&row, "killed through the API").await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
pub struct TimeoutBody {
    timeout: i64,
}

pub async fn set_timeout(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<TimeoutBody>,
) -> Result<StatusCode, ApiError> {
    let row = app.sandbox_of(&team, &id).await?;
    if body.timeout < 0 || body.timeout > team.max_lifetime_s {
        return Err(ApiError::BadRequest(format!(
            "timeout must be between 0 and {} s",
            team.max_lifetime_s
        )));
    }
    let end = now_ms() + body.timeout * 1000;
    app.db.set_end(&row.id, end).await?;
    app.db
        .add_event(
            &row.id,
            "info",
            &format!("timeout set to {} s", body.timeout),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn pause(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let row = app.sandbox_of(&team, &id).await?;
    app.pause_sandbox(&row, "paused through the API").await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, Default)]
pub struct ConnectBody {
    timeout: Option<i64>,
}

async fn do_connect(
    app: &App,
    team: &crate::db::Team,
    id: &str,
    timeout: Option<i64>,
) -> Result<Response, ApiError> {
    let row = app.sandbox_of(team, id).await?;
    let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT_S);
    Ok(match app.connect_sandbox(team, row, timeout).await? {
        Connected::AlreadyRunning(r) => {
            (StatusCode::OK, Json(sandbox_json(app, &r))).into_response()
        }
        Connected::Resumed(r) => (StatusCode::CREATED, Json(sandbox_json(app, &r))).into_response(),
    })
}

pub async fn connect(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<ConnectBody>,
) -> Result<Response, ApiError> {
    do_connect(&app, &team, &id, body.unwrap_or_default().timeout).await
}

/// `POST /sandboxes/{id}/resume` (legacy): 409 when it is running.
pub async fn resume(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<ConnectBody>,
) -> Result<Response, ApiError> {
    let row = app.sandbox_of(&team, &id).await?;
    if row.state == "running" {
        return Err(ApiError::Conflict(format!(
            "sandbox {id} is already running"
        )));
    }
    do_connect(&app, &team, &id, body.unwrap_or_default().timeout).await
}

#[derive(Debug, Deserialize, Default)]
pub struct MetricsQuery {
    start: Option<i64>,
    end: Option<i64>,
}

pub async fn metrics(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    Query(q): Query<MetricsQuery>,
) -> Result<Json<Value>, ApiError> {
    let row = app.sandbox_of(&team, &id).await?;
    if row.state == "running" {
        crate::lifecycle::sample_now(&app, &row);
    }
    let start = q.start.map(|s| s * 1000).unwrap_or(i64::MIN);
    let end = q.end.map(|s| s * 1000 + 999).unwrap_or(i64::MAX);
    let out: Vec<Value> = app
        .samples
        .of(&row.id)
        .into_iter()
        .filter(|s| s.ts_ms >= start && s.ts_ms <= end)
        .map(|s| {
            json!({
                "timestamp": rfc3339(s.ts_ms),
                "timestampUnix": s.ts_ms / 1000,
                "cpuCount": row.cpu,
                "cpuUsedPct": s.cpu_pct,
                "memUsed": s.mem_used,
                "memTotal": s.mem_total,
                "memCache": 0,
                "diskUsed": s.disk_used,
                "diskTotal": s.disk_total,
            })
        })
        .collect();
    Ok(Json(Value::Array(out)))
}

#[derive(Debug, Deserialize, Default)]
pub struct LogsQuery {
    start: Option<i64>,
    limit: Option<i64>,
}

pub async fn logs(
    State(app): State<Arc<App>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Json<Value>, ApiError> {
    let row = app
        .db
        .sandbox_any(&id)
        .await?
        .filter(|s| s.team_id == team.id)
        .ok_or_else(|| ApiError::sandbox_not_found(&id))?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let start = q.start.unwrap_or(0);
    let mut events: Vec<(i64, String, String, &str)> = app
        .db
        .events(&row.id, start, limit)
        .await?
        .into_iter()
        .map(|e| (e.ts, e.level, e.message, "kiln"))
        .collect();
    // envd's own lines, from the log of the sandbox's current run.
    if let Ok(path) = app.runtime.sandbox_log_path(&row.id) {
        events.extend(
            envd_log_lines(&path)
                .into_iter()
                .filter(|(ts, ..)| *ts >= start)
                .map(|(ts, level, message)| (ts, level, message, "envd")),
        );
    }
    events.sort_by_key(|e| e.0);
    events.truncate(limit as usize);
    let logs: Vec<Value> = events
        .iter()
        .map(|(ts, _, message, _)| json!({"timestamp": rfc3339(*ts), "line": message}))
        .collect();
    let entries: Vec<Value> = events
        .iter()
        .map(|(ts, level, message, source)| {
            json!({"timestamp": rfc3339(*ts), "level": level, "message": message,
                   "fields": {"sandboxID": row.id, "source": source}})
        })
        .collect();
    Ok(Json(json!({"logs": logs, "logEntries": entries})))
}

/// The last lines envd logged (`<RFC 3339> <LEVEL> <target>: <message>`),
/// as (time in ms, level, message); gVisor's own lines are skipped.
fn envd_log_lines(path: &std::path::Path) -> Vec<(i64, String, String)> {
    const TAIL: u64 = 256 * 1024;
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut text = String::new();
    {
        use std::io::{Read, Seek, SeekFrom};
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text.push_str(&String::from_utf8_lossy(&bytes));
    }
    text.lines()
        .filter_map(|line| {
            let (ts, rest) = line.trim().split_once(char::is_whitespace)?;
            let ts = parse_rfc3339(ts)?;
            let (level, rest) = rest.trim_start().split_once(char::is_whitespace)?;
            let level = level.to_ascii_lowercase();
            let rest = rest.trim();
            if !matches!(
                level.as_str(),
                "error" | "warn" | "info" | "debug" | "trace"
            ) {
                return None;
            }
            let message = rest
                .strip_prefix("kiln_envd")
                .map_or(rest, |r| r.split_once(": ").map_or(r, |(_, m)| m));
            Some((ts, level, message.to_string()))
        })
        .collect()
}
