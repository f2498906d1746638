//! Shared helpers for envd's integration tests: they start the real `envd`
//! binary on a free loopback port and talk to it over HTTP.
//!
//! These tests run as root (envd switches to other users) and expect the
//! user `user` (any uid) to exist, as `scripts/test.sh` ensures.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Envd {
    pub base: String,
    pub client: reqwest::Client,
    child: Child,
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Envd {
    /// Starts envd and waits until `/health` answers.
    pub async fn start() -> Envd {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_envd"))
            .args(["--addr", "127.0.0.1", "--port", &port.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .expect("starting envd");
        let envd = Envd {
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = envd.client.get(envd.url("/health")).send().await
                && r.status() == 204
            {
                return envd;
            }
            assert!(Instant::now() < deadline, "envd did not become healthy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A unary Connect call with JSON; returns (HTTP status, body JSON).
    pub async fn unary(&self, method: &str, body: Value) -> (u16, Value) {
        self.unary_with(method, body, &[]).await
    }

    pub async fn unary_with(
        &self,
        method: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self
            .client
            .post(self.url(&format!("/{method}")))
            .header("content-type", "application/json")
            .header("connect-protocol-version", "1")
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("unary request");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, json)
    }

    /// Opens a server-streaming Connect call with JSON.
    pub async fn stream(&self, method: &str, body: Value, headers: &[(&str, &str)]) -> Frames {
        let mut req = self
            .client
            .post(self.url(&format!("/{method}")))
            .header("content-type", "application/connect+json")
            .header("connect-protocol-version", "1")
            .body(envelope(0, body.to_string().as_bytes()));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("stream request");
        assert_eq!(resp.status(), 200, "stream status");
        Frames {
            resp,
            buf: Vec::new(),
        }
    }
}

/// A Connect envelope: flag byte, 4-byte big-endian length, payload.
pub fn envelope(flag: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.push(flag);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Frames of a streaming response.
pub struct Frames {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

/// One decoded frame: `end` is true for the end-stream frame (flag 0x02).
#[derive(Debug, Clone)]
pub struct Frame {
    pub end: bool,
    pub json: Value,
}

impl Frames {
    /// The next frame, or None when the body ended.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() >= 5 + len {
                    let flag = self.buf[0];
                    let payload: Vec<u8> = self.buf[5..5 + len].to_vec();
                    self.buf.drain(..5 + len);
                    return Some(Frame {
                        end: flag & 0x02 != 0,
                        json: serde_json::from_slice(&payload).expect("frame JSON"),
                    });
                }
            }
            match self.resp.chunk().await.expect("reading stream") {
                Some(chunk) => self.buf.extend_from_slice(&chunk),
                None => return None,
            }
        }
    }

    /// Reads all frames until the end-stream frame (inclusive).
    pub async fn collect(mut self) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(f) = self.next().await {
            let end = f.end;
            out.push(f);
            if end {
                break;
            }
        }
        out
    }
}

/// `Authorization` header value for Basic auth as `user` with no password.
pub fn basic(user: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    )
}
