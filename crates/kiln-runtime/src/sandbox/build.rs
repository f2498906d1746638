//! Build sandboxes: the sandboxes template builds run their steps in.
//!
//! A build sandbox differs from a normal one in three ways:
//! - gVisor's overlay is off (`--overlay2=none`), so its writes land in the
//!   rootfs on the host; the template builder gives it a host overlayfs mount
//!   whose upper dir becomes the step's cached layer;
//! - `/tmp` is part of the rootfs (as in a Docker build), not a tmpfs;
//! - host directories can be bind-mounted into it (COPY sources).
//!
//! It never appears in the runtime's sandbox list and has no record: a
//! restarted runtime removes a leftover one as an orphan container.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use crate::Error;
use crate::envd::ENVD_PORT;
use crate::network::EgressPolicy;
use crate::runtime::{Runtime, new_sandbox_id};
use crate::spec::Resources;

/// A host path mounted into a build sandbox.
#[derive(Debug, Clone)]
pub struct BindMount {
    pub source: PathBuf,
    /// Absolute path inside the sandbox.
    pub destination: String,
    pub readonly: bool,
}

/// How a build sandbox's spec differs from a normal sandbox's.
#[derive(Debug, Clone, Default)]
pub struct BuildMounts {
    pub mounts: Vec<BindMount>,
}

impl BuildMounts {
    pub(crate) fn apply(&self, spec: &mut Value) {
        if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
            // Files a step leaves in /tmp belong to its layer, as in Docker.
            mounts.retain(|m| m.get("destination").and_then(Value::as_str) != Some("/tmp"));
            for m in &self.mounts {
                let mut options = vec!["rbind"];
                if m.readonly {
                    options.push("ro");
                }
                mounts.push(json!({
                    "destination": m.destination,
                    "type": "bind",
                    "source": m.source,
                    "options": options,
                }));
            }
        }
    }
}

/// What a build sandbox runs on.
#[derive(Debug, Clone)]
pub struct BuildSandboxConfig {
    /// The root filesystem; the sandbox writes to it directly.
    pub rootfs: PathBuf,
    pub resources: Resources,
    pub mounts: Vec<BindMount>,
    pub egress: EgressPolicy,
}

/// A command run to completion in a build sandbox.
#[derive(Debug, Clone)]
pub struct BuildCommand {
    pub cmd: String,
    pub args: Vec<String>,
    pub user: String,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    /// The process is killed after it.
    pub timeout: Option<Duration>,
}

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A running build sandbox. [`BuildSandbox::stop`] frees it and returns once
/// it is gone; dropping it frees it in the background.
pub struct BuildSandbox {
    rt: Arc<Runtime>,
    cid: String,
    slot: Option<u32>,
    /// Host pid of `runsc-sandbox`.
    pid: Option<u32>,
    addr: SocketAddr,
    http: reqwest::Client,
}

impl Runtime {
    /// The resolver address sandboxes on this node use.
    pub fn dns_address(&self) -> Ipv4Addr {
        self.net.dns_address()
    }

    /// Boots a build sandbox (cold, envd as init) on `cfg.rootfs`.
    pub async fn start_build_sandbox(
        self: &Arc<Self>,
        cfg: BuildSandboxConfig,
    ) -> Result<BuildSandbox, Error> {
        let cid = new_sandbox_id();
        let extras = BuildMounts {
            mounts: cfg.mounts.clone(),
        };
        let booted = crate::sandbox::create::boot_with(
            self,
            &cid,
            &cfg.resources,
            &cfg.rootfs,
            None,
            &cfg.egress,
            Some(&extras),
        )
        .await?;
        tracing::info!(container = %cid, rootfs = %cfg.rootfs.display(), "build sandbox up");
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| Error::Envd(format!("HTTP client: {e}")))?;
        Ok(BuildSandbox {
            rt: self.clone(),
            addr: SocketAddr::new(booted.slot.sandbox_ip.into(), ENVD_PORT),
            slot: Some(booted.slot.index),
            pid: booted.pid,
            cid,
            http,
        })
    }
}

impl BuildSandbox {
    /// The runsc container id.
    pub fn id(&self) -> &str {
        &self.cid
    }

    /// Runs a command through envd, handing its output to `on_output` as it
    /// arrives; returns its exit code (-1 when killed by a signal).
    pub async fn run(
        &self,
        cmd: &BuildCommand,
        on_output: &mut (dyn FnMut(OutputStream, &[u8]) + Send),
    ) -> Result<i32, Error> {
        let mut process = json!({ "cmd": cmd.cmd, "args": cmd.args, "envs": cmd.env });
        if let Some(cwd) = &cmd.cwd {
            process["cwd"] = cwd.clone().into();
        }
        let payload = json!({ "process": process, "stdin": false }).to_string();
        let mut frame = Vec::with_capacity(payload.len() + 5);
        frame.push(0);
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload.as_bytes());
        let mut req = self
            .http
            .post(format!("http://{}/process.Process/Start", self.addr))
            .header("Content-Type", "application/connect+json")
            .header("Connect-Protocol-Version", "1")
            .header(
                "Authorization",
                format!("Basic {}", B64.encode(format!("{}:", cmd.user))),
            )
            .body(frame);
        if let Some(t) = cmd.timeout {
            req = req
                .header("Connect-Timeout-Ms", t.as_millis().to_string())
                .timeout(t + Duration::from_secs(5));
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| Error::Envd(format!("Start: {e}")))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return Err(Error::Envd(format!("Start: {status}: {body}")));
        }
        let mut buf: Vec<u8> = Vec::new();
        let mut exit = None;
        loop {
            // One Connect envelope: flags, big-endian length, JSON.
            while buf.len() >= 5 {
                let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if buf.len() < 5 + len {
                    break;
                }
                let flags = buf[0];
                let msg: Value = serde_json::from_slice(&buf[5..5 + len])
                    .map_err(|e| Error::Envd(format!("bad frame: {e}")))?;
                buf.drain(..5 + len);
                if flags & 0x02 != 0 {
                    if let Some(err) = msg.get("error") {
                        return Err(Error::Envd(format!("Start: {err}")));
                    }
                    return exit.ok_or_else(|| {
                        Error::Envd("Start: stream ended without an end event".into())
                    });
                }
                let event = &msg["event"];
                if let Some(data) = event.get("data") {
                    for (key, stream) in [
                        ("stdout", OutputStream::Stdout),
                        ("stderr", OutputStream::Stderr),
                    ] {
                        if let Some(s) = data.get(key).and_then(Value::as_str) {
                            on_output(stream, &B64.decode(s).unwrap_or_default());
                        }
                    }
                } else if let Some(end) = event.get("end") {
                    // JSON leaves out defaults: no exitCode means 0.
                    let code = end.get("exitCode").and_then(Value::as_i64).unwrap_or(0);
                    let exited = end.get("exited").and_then(Value::as_bool) == Some(true);
                    exit = Some(if exited || code != 0 { code as i32 } else { -1 });
                }
            }
            match resp.chunk().await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                Ok(None) => {
                    return exit.ok_or_else(|| {
                        Error::Envd("Start: stream ended without an end event".into())
                    });
                }
                Err(e) => return Err(Error::Envd(format!("reading output: {e}"))),
            }
        }
    }

    /// Makes the rootfs quiescent fast: flushes the sandbox's writes to the
    /// host (`sync` inside it), then kills its gVisor process and waits for
    /// it to be gone. Nothing writes to the rootfs afterwards, though the
    /// container still needs [`BuildSandbox::stop`] (a graceful stop of
    /// gVisor takes ~1.5 s; callers may run it in the background).
    pub async fn halt(&mut self) -> Result<(), Error> {
        let sync = BuildCommand {
            cmd: "/bin/sync".into(),
            args: Vec::new(),
            user: "root".into(),
            cwd: Some("/".into()),
            env: BTreeMap::new(),
            timeout: Some(Duration::from_secs(120)),
        };
        match self.run(&sync, &mut |_, _| {}).await {
            Ok(0) => {}
            Ok(code) => return Err(Error::Envd(format!("sync exited with {code}"))),
            Err(e) => return Err(e),
        }
        let Some(pid) = self.pid else {
            return Err(Error::Envd("the sandbox's pid is unknown".into()));
        };
        tokio::task::spawn_blocking(move || {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)
                .map_err(|e| Error::io("killing the build sandbox", e.into()))?;
            // Gone, or a zombie: either way it runs no more.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let state = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .unwrap_or("X");
                if state == "Z" || state == "X" {
                    return Ok(());
                }
                if std::time::Instant::now() > deadline {
                    return Err(Error::Envd("the build sandbox did not die".into()));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
        .await
        .map_err(|e| Error::io("halt task", std::io::Error::other(e)))?
    }

    /// Stops and deletes the sandbox and frees its network; returns once
    /// runsc no longer uses the rootfs.
    pub async fn stop(mut self) -> Result<(), Error> {
        let (rt, cid, slot) = (self.rt.clone(), self.cid.clone(), self.slot.take());
        tokio::task::spawn_blocking(move || {
            crate::sandbox::destroy::teardown_blocking(&rt, &cid, slot)
        })
        .await
        .map_err(|e| Error::io("teardown task", std::io::Error::other(e)))?;
        self.cid.clear();
        Ok(())
    }
}

impl Drop for BuildSandbox {
    fn drop(&mut self) {
        if !self.cid.is_empty() {
            crate::sandbox::destroy::teardown_in_background(&self.rt, &self.cid, self.slot.take());
        }
    }
}
