//! Sandbox traffic: a request for a port inside a sandbox is forwarded to it,
//! streamed both ways (HTTP/1.1 and h2c in, WebSocket and other upgrades
//! spliced).
//!
//! A request is sandbox traffic when it carries `E2b-Sandbox-Id` and
//! `E2b-Sandbox-Port` (what the SDKs send with `E2B_SANDBOX_URL`), when its
//! host is `<port>-<sandboxId>.<domain>`, or when it is a signed `/files` URL
//! without either (the SDKs' `download_url()`): the signature is checked
//! against each running sandbox's access token to find its sandbox.
//!
//! Connections to a sandbox are pooled per sandbox *container*: a pause
//! replaces the container (and its network stack), so its pooled
//! connections are dropped rather than reused against the resumed one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kiln_runtime::SandboxState;

use crate::app::App;

pub const ENVD_PORT: u16 = 49983;

type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Body>;

/// Pooled HTTP clients, one per sandbox container.
#[derive(Default)]
pub struct Client(Mutex<HashMap<String, (String, HttpClient)>>);

pub fn client() -> Client {
    Client::default()
}

impl Client {
    fn for_container(&self, sandbox: &str, cid: &str) -> HttpClient {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((c, client)) = map.get(sandbox)
            && c == cid
        {
            return client.clone();
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.set_nodelay(true);
        // A sandbox that dies (killed, out of memory) never closes its
        // connections: its network stack is gone with it. Keepalive probes
        // then fail or meet a reset within ~11 s, so a client streaming a
        // command's output gets an error instead of waiting forever.
        connector.set_keepalive(Some(Duration::from_secs(5)));
        connector.set_keepalive_interval(Some(Duration::from_secs(2)));
        connector.set_keepalive_retries(Some(3));
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(32)
            .build(connector);
        map.insert(sandbox.to_string(), (cid.to_string(), client.clone()));
        client
    }

    /// Drops a sandbox's pooled connections (it was paused or killed).
    pub fn forget(&self, sandbox: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(sandbox);
    }
}

/// E2B's 502 for a sandbox that does not run (unknown, killed or paused).
fn not_found(sandbox_id: &str) -> Response {
    let body = serde_json::json!({
        "sandboxId": sandbox_id,
        "message": "The sandbox was not found",
        "code": 502,
    });
    json_response(StatusCode::BAD_GATEWAY, body)
}

fn port_closed(sandbox_id: &str, port: u16) -> Response {
    let body = serde_json::json!({
        "sandboxId": sandbox_id,
        "message": "The sandbox is running but port is not open",
        "port": port,
        "code": 502,
    });
    json_response(StatusCode::BAD_GATEWAY, body)
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

fn bad_request(message: &str) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        serde_json::json!({"code": 400, "message": message}),
    )
}

/// Where a request should go, when it is sandbox traffic.
enum Target {
    Sandbox(String, u16),
    Invalid(&'static str),
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// `<port>-<sandboxId>.<anything>` → (id, port).
fn parse_host(host: &str) -> Option<(String, u16)> {
    let host = host.split(':').next()?;
    let (first, rest) = host.split_once('.')?;
    if rest.is_empty() {
        return None;
    }
    let (port, id) = first.split_once('-')?;
    let port: u16 = port.parse().ok()?;
    kiln_runtime::runtime::valid_sandbox_id(id).then(|| (id.to_string(), port))
}

fn target_of(req: &Request) -> Option<Target> {
    let headers = req.headers();
    let id = header_str(headers, "e2b-sandbox-id");
    let port = header_str(headers, "e2b-sandbox-port");
    match (id, port) {
        (Some(id), Some(port)) => {
            return Some(match port.parse::<u16>() {
                Ok(p) => Target::Sandbox(id.to_string(), p),
                Err(_) => Target::Invalid("invalid E2b-Sandbox-Port header"),
            });
        }
        (Some(_), None) => return Some(Target::Invalid("missing E2b-Sandbox-Port header")),
        (None, Some(_)) => return Some(Target::Invalid("missing E2b-Sandbox-Id header")),
        (None, None) => {}
    }
    let host = header_str(headers, "host")
        .map(str::to_string)
        .or_else(|| req.uri().host().map(str::to_string))?;
    parse_host(&host).map(|(id, port)| Target::Sandbox(id, port))
}

/// The running sandbox whose access token signs this `/files` URL.
async fn signed_files_sandbox(app: &App, query: Option<String>, get: bool) -> Option<String> {
    let query = query?;
    let params: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let signature = params.get("signature")?;
    let path = params.get("path").map(String::as_str).unwrap_or_default();
    let username = params
        .get("username")
        .map(String::as_str)
        .unwrap_or_default();
    let expiration = params
        .get("signature_expiration")
        .and_then(|e| e.parse::<i64>().ok());
    let operation = if get { "read" } else { "write" };
    let rows = app.db.live_sandboxes(None).await.ok()?;
    rows.into_iter()
        .filter(|r| r.state == "running")
        .find(|r| {
            r.access_token.as_deref().is_some_and(|token| {
                &kiln_proto::signature::signature(path, operation, username, token, expiration)
                    == signature
            })
        })
        .map(|r| r.id)
}

/// Middleware in front of the API: sandbox traffic is forwarded, the rest
/// goes on to the control API.
pub async fn route(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    match target_of(&req) {
        Some(Target::Sandbox(id, port)) => forward(&app, &id, port, req).await,
        Some(Target::Invalid(why)) => bad_request(why),
        None => {
            let files = req.uri().path() == "/files" && req.headers().get("x-api-key").is_none();
            let query = req.uri().query().map(str::to_string);
            let get = req.method() == axum::http::Method::GET;
            if files && let Some(id) = signed_files_sandbox(&app, query, get).await {
                return forward(&app, &id, ENVD_PORT, req).await;
            }
            next.run(req).await
        }
    }
}

/// Headers that describe one hop, not the request.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
];

async fn forward(app: &Arc<App>, id: &str, port: u16, mut req: Request) -> Response {
    let info = match app.runtime.info(id) {
        Ok(info) if info.state == SandboxState::Running => info,
        _ => return not_found(id),
    };
    let (Some(ip), Ok(cid)) = (info.ip, app.runtime.container_id(id)) else {
        return not_found(id);
    };
    let client = app.proxy_client.for_container(id, &cid);
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let uri: Uri = match format!("http://{ip}:{port}{path}").parse() {
        Ok(u) => u,
        Err(_) => return bad_request("invalid request path"),
    };
    let upgrade = req.headers().get(header::UPGRADE).cloned();
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    for name in HOP_BY_HOP {
        parts.headers.remove(*name);
    }
    parts.headers.remove("upgrade");
    if let Some(up) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, up.clone());
    }
    parts.uri = uri;
    // Whatever came in (h2c included), the hop into the sandbox is HTTP/1.1.
    parts.version = axum::http::Version::HTTP_11;
    let upstream = Request::from_parts(parts, body);
    let mut resp = match client.request(upstream).await {
        Ok(r) => r,
        Err(e) if e.is_connect() => return port_closed(id, port),
        Err(e) => {
            tracing::warn!(sandbox = %id, port, error = ?e, "proxying failed");
            return json_response(
                StatusCode::BAD_GATEWAY,
                serde_json::json!({"sandboxId": id, "code": 502,
                    "message": format!("error talking to the sandbox: {e}")}),
            );
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let sandbox = id.to_string();
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((down, up)) => {
                    let mut down = TokioIo::new(down);
                    let mut up = TokioIo::new(up);
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
                Err(e) => tracing::debug!(sandbox = %sandbox, error = %e, "upgrade failed"),
            }
        });
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    let (mut parts, body) = resp.into_parts();
    for name in HOP_BY_HOP {
        parts.headers.remove(*name);
    }
    Response::from_parts(parts, Body::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert_eq!(
            parse_host("49983-abcdefghij0123456789.kiln.local:3000"),
            Some(("abcdefghij0123456789".into(), 49983))
        );
        assert_eq!(parse_host("localhost:3000"), None);
        assert_eq!(parse_host("8080-short.example.com"), None);
        assert_eq!(parse_host("x-abcdefghij0123456789.example.com"), None);
        assert_eq!(parse_host("49983-abcdefghij0123456789"), None);
    }
}
