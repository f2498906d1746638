//! HTTP clients of `kiln serve`: the control API, and envd inside a
//! sandbox through the server's proxy (Connect protocol, JSON codec).

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use bytes::{Buf, BytesMut};
use clap::Args;
use futures::StreamExt;
use serde_json::{Value, json};

/// Where the server is and who we are.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// Base URL of `kiln serve`.
    #[arg(
        long,
        global = true,
        env = "E2B_API_URL",
        default_value = "http://127.0.0.1:3000"
    )]
    pub api_url: String,
    /// API key (printed by the first `kiln serve`, or from `kiln keys create`).
    #[arg(long, global = true, env = "E2B_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    pub fn new(args: &ApiArgs) -> anyhow::Result<Api> {
        let key = args
            .api_key
            .clone()
            .or_else(|| std::env::var("KILN_API_KEY").ok())
            .filter(|k| !k.is_empty())
            .context("no API key: set E2B_API_KEY or pass --api-key")?;
        Ok(Api {
            http: reqwest::Client::new(),
            base: args.api_url.trim_end_matches('/').to_string(),
            key,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = req
            .header("X-API-KEY", &self.key)
            .send()
            .await
            .with_context(|| format!("cannot reach kiln at {}", self.base))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let message = body
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("no details")
            .to_string();
        bail!("{} ({})", message, status.as_u16())
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self.send(self.http.get(self.url(path))).await?;
        Ok(resp.json().await?)
    }

    /// GET that also returns one response header.
    pub async fn get_with_header(
        &self,
        path: &str,
        header: &str,
    ) -> anyhow::Result<(Value, Option<String>)> {
        let resp = self.send(self.http.get(self.url(path))).await?;
        let h = resp
            .headers()
            .get(header)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok((resp.json().await?, h))
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let resp = self.send(self.http.post(self.url(path)).json(body)).await?;
        let text = resp.text().await?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_str(&text)?)
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send(self.http.delete(self.url(path))).await?;
        Ok(())
    }

    /// Connects to a sandbox (resuming it if paused) and returns a client of its envd.
    pub async fn envd(&self, sandbox_id: &str) -> anyhow::Result<Envd> {
        let sbx = self
            .post(&format!("/v2/sandboxes/{sandbox_id}/connect"), &json!({}))
            .await?;
        Ok(Envd {
            http: self.http.clone(),
            base: self.base.clone(),
            sandbox_id: sandbox_id.to_string(),
            token: sbx
                .get("envdAccessToken")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }
}

/// envd of one sandbox, reached through the server's proxy.
pub struct Envd {
    http: reqwest::Client,
    base: String,
    sandbox_id: String,
    token: Option<String>,
}

/// What a process stream delivers.
#[derive(Debug)]
pub enum ProcessEvent {
    Start(u32),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Pty(Vec<u8>),
    End {
        exit_code: i32,
        error: Option<String>,
    },
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl Envd {
    fn request(&self, method: &str, content_type: &str, user: &str) -> reqwest::RequestBuilder {
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
        );
        let mut req = self
            .http
            .post(format!("{}/process.Process/{method}", self.base))
            .header("E2b-Sandbox-Id", &self.sandbox_id)
            .header("E2b-Sandbox-Port", "49983")
            .header("Content-Type", content_type)
            .header("Connect-Protocol-Version", "1")
            .header("Authorization", auth);
        if let Some(t) = &self.token {
            req = req.header("X-Access-Token", t);
        }
        req
    }

    async fn unary(&self, method: &str, body: Value) -> anyhow::Result<Value> {
        let resp = self
            .request(method, "application/json", "root")
            .body(body.to_string())
            .send()
            .await?;
        let status = resp.status();
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "envd {method}: {} ({status})",
                value.get("message").unwrap_or(&value)
            );
        }
        Ok(value)
    }

    /// Starts a process and streams its events to `on_event`.
    pub async fn start(
        &self,
        process: Value,
        pty: Option<(u16, u16)>,
        user: &str,
        mut on_event: impl FnMut(ProcessEvent),
    ) -> anyhow::Result<()> {
        let mut req = json!({"process": process, "stdin": false});
        if let Some((cols, rows)) = pty {
            req["pty"] = json!({"size": {"cols": cols, "rows": rows}});
        }
        let body = req.to_string();
        let mut frame = Vec::with_capacity(body.len() + 5);
        frame.push(0u8);
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(body.as_bytes());
        let resp = self
            .request("Start", "application/connect+json", user)
            .body(frame)
            .send()
            .await
            .context("starting the process")?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            bail!("starting the process failed ({status}): {text}");
        }
        let mut stream = resp.bytes_stream();
        let mut buf = BytesMut::new();
        loop {
            while buf.len() >= 5 {
                let flags = buf[0];
                let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if buf.len() < 5 + len {
                    break;
                }
                buf.advance(5);
                let msg = buf.split_to(len);
                let value: Value = serde_json::from_slice(&msg).context("bad frame from envd")?;
                if flags & 0x02 != 0 {
                    if let Some(err) = value.get("error") {
                        return Err(anyhow!(
                            "process stream ended with an error: {}",
                            err.get("message").unwrap_or(err)
                        ));
                    }
                    return Ok(());
                }
                if let Some(event) = parse_event(&value) {
                    on_event(event);
                }
            }
            match stream.next().await {
                Some(chunk) => buf.extend_from_slice(&chunk.context("reading the process stream")?),
                None => return Ok(()),
            }
        }
    }

    pub async fn send_pty_input(&self, pid: u32, data: &[u8]) -> anyhow::Result<()> {
        self.unary(
            "SendInput",
            json!({"process": {"pid": pid}, "input": {"pty": b64(data)}}),
        )
        .await
        .map(|_| ())
    }

    pub async fn resize(&self, pid: u32, cols: u16, rows: u16) -> anyhow::Result<()> {
        self.unary(
            "Update",
            json!({"process": {"pid": pid}, "pty": {"size": {"cols": cols, "rows": rows}}}),
        )
        .await
        .map(|_| ())
    }
}

fn decode(v: Option<&Value>) -> Option<Vec<u8>> {
    v.and_then(Value::as_str)
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
}

fn parse_event(v: &Value) -> Option<ProcessEvent> {
    let event = v.get("event")?;
    if let Some(start) = event.get("start") {
        return Some(ProcessEvent::Start(
            start.get("pid").and_then(Value::as_u64).unwrap_or(0) as u32,
        ));
    }
    if let Some(data) = event.get("data") {
        if let Some(b) = decode(data.get("stdout")) {
            return Some(ProcessEvent::Stdout(b));
        }
        if let Some(b) = decode(data.get("stderr")) {
            return Some(ProcessEvent::Stderr(b));
        }
        if let Some(b) = decode(data.get("pty")) {
            return Some(ProcessEvent::Pty(b));
        }
        return None;
    }
    if let Some(end) = event.get("end") {
        return Some(ProcessEvent::End {
            exit_code: end.get("exitCode").and_then(Value::as_i64).unwrap_or(0) as i32,
            error: end.get("error").and_then(Value::as_str).map(str::to_string),
        });
    }
    None
}
