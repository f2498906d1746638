//! The runtime's client for the envd inside a sandbox.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;

use crate::Error;

/// envd's port inside every sandbox.
pub const ENVD_PORT: u16 = 49983;

/// What `POST /init` sets inside a sandbox.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitRequest {
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub env_vars: HashMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_workdir: Option<String>,
    /// RFC 3339; a restored sandbox's clock is set forward to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// Kiln extension: fresh random bytes (base64) for the sandbox's entropy
    /// pool, so clones of one snapshot do not share random state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy: Option<String>,
    /// Kiln extension: the sandbox's hostname.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// The result of a command run to completion.
#[derive(Debug, Clone, Default)]
pub struct CommandOutput {
    pub exit_code: i32,
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

/// Talks to one sandbox's envd.
#[derive(Debug, Clone)]
pub struct EnvdClient {
    base: String,
    http: reqwest::Client,
    access_token: Option<String>,
}

impl EnvdClient {
    pub fn new(addr: SocketAddr, access_token: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .build()
            .expect("building an HTTP client without TLS cannot fail");
        Self {
            base: format!("http://{addr}"),
            http,
            access_token,
        }
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.post(format!("{}{path}", self.base));
        if let Some(token) = &self.access_token {
            req = req.header("X-Access-Token", token);
        }
        req
    }

    /// Whether `/health` answers 204 within `timeout`.
    pub async fn healthy(&self, timeout: Duration) -> bool {
        let req = self
            .http
            .get(format!("{}/health", self.base))
            .timeout(timeout)
            .send()
            .await;
        matches!(req, Ok(r) if r.status() == reqwest::StatusCode::NO_CONTENT)
    }

    /// Polls `/health` until it answers or `timeout` passes.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.healthy(Duration::from_millis(500)).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Envd(format!(
                    "envd at {} did not become healthy within {timeout:?}",
                    self.base
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Configures envd; a token in `init` becomes this client's token.
    pub async fn init(&mut self, init: &InitRequest) -> Result<(), Error> {
        let resp = self
            .post("/init")
            .json(init)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| Error::Envd(format!("POST /init: {e}")))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return Err(Error::Envd(format!("POST /init: {status}: {body}")));
        }
        if init.access_token.is_some() {
            self.access_token.clone_from(&init.access_token);
        }
        Ok(())
    }

    fn start_request(
        &self,
        cmd: &str,
        user: &str,
        tag: Option<&str>,
        timeout: Option<Duration>,
    ) -> reqwest::RequestBuilder {
        let mut body = serde_json::json!({
            "process": { "cmd": "/bin/bash", "args": ["-c", cmd] },
            "stdin": false,
        });
        if let Some(tag) = tag {
            body["tag"] = tag.into();
        }
        let payload = body.to_string();
        let mut frame = Vec::with_capacity(payload.len() + 5);
        frame.push(0);
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload.as_bytes());
        let mut req = self
            .post("/process.Process/Start")
            .header("Content-Type", "application/connect+json")
            .header("Connect-Protocol-Version", "1")
            .header(
                "Authorization",
                format!("Basic {}", B64.encode(format!("{user}:"))),
            )
            .body(frame);
        if let Some(t) = timeout {
            req = req.header("Connect-Timeout-Ms", t.as_millis().to_string());
        }
        req
    }

    /// Runs `cmd` with `bash -c` as `user` and waits for it.
    pub async fn run(
        &self,
        cmd: &str,
        user: &str,
        timeout: Duration,
    ) -> Result<CommandOutput, Error> {
        let resp = self
            .start_request(cmd, user, None, Some(timeout))
            .timeout(timeout + Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| Error::Envd(format!("Start: {e}")))?;
        let mut frames = FrameReader::new(resp);
        let mut out = CommandOutput::default();
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut ended = false;
        while let Some((flags, json)) = frames.next().await? {
            if flags & 0x02 != 0 {
                if let Some(err) = json.get("error") {
                    return Err(Error::Envd(format!("Start: {err}")));
                }
                break;
            }
            let event = &json["event"];
            if let Some(data) = event.get("data") {
                for (key, buf) in [("stdout", &mut stdout), ("stderr", &mut stderr)] {
                    if let Some(s) = data.get(key).and_then(|v| v.as_str()) {
                        buf.extend(B64.decode(s).unwrap_or_default());
                    }
                }
            } else if let Some(end) = event.get("end") {
                out.exit_code = end.get("exitCode").and_then(|v| v.as_i64()).unwrap_or(0) as i32;
                out.status = end
                    .get("status")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string();
                ended = true;
            }
        }
        if !ended {
            return Err(Error::Envd(
                "Start: stream ended without an end event".into(),
            ));
        }
        out.stdout = String::from_utf8_lossy(&stdout).into_owned();
        out.stderr = String::from_utf8_lossy(&stderr).into_owned();
        Ok(out)
    }

    /// Starts `cmd` in the background (tagged), returning its pid once it started.
    pub async fn start_background(&self, cmd: &str, user: &str, tag: &str) -> Result<u32, Error> {
        let resp = self
            .start_request(cmd, user, Some(tag), None)
            .send()
            .await
            .map_err(|e| Error::Envd(format!("Start: {e}")))?;
        let mut frames = FrameReader::new(resp);
        match frames.next().await? {
            Some((0, json)) => json["event"]["start"]["pid"]
                .as_u64()
                .map(|p| p as u32)
                .ok_or_else(|| Error::Envd(format!("Start: unexpected first event {json}"))),
            other => Err(Error::Envd(format!("Start: {other:?}"))),
        }
        // Dropping the stream leaves the process running inside the sandbox.
    }
}

/// Reads Connect envelopes from a streaming response.
struct FrameReader {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl FrameReader {
    fn new(resp: reqwest::Response) -> Self {
        Self {
            resp,
            buf: Vec::new(),
        }
    }

    async fn next(&mut self) -> Result<Option<(u8, serde_json::Value)>, Error> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() >= 5 + len {
                    let flags = self.buf[0];
                    let json = serde_json::from_slice(&self.buf[5..5 + len])
                        .map_err(|e| Error::Envd(format!("bad frame: {e}")))?;
                    self.buf.drain(..5 + len);
                    return Ok(Some((flags, json)));
                }
            }
            match self.resp.chunk().await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) => return Ok(None),
                Err(e) => return Err(Error::Envd(format!("reading stream: {e}"))),
            }
        }
    }
}

/// Fresh entropy for `/init`.
pub fn fresh_entropy() -> String {
    let mut bytes = [0u8; 64];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    B64.encode(bytes)
}
