//! Pausing (checkpoint with memory, then free everything but the image) and
//! resuming (restore the image into a fresh network namespace).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Error;
use crate::envd::{InitRequest, fresh_entropy};
use crate::runtime::{Runtime, SandboxState, save_record};

impl Runtime {
    /// Pauses a running sandbox: its memory, processes and files are saved to
    /// `data_dir/sandboxes/<id>/snapshot` and its container and network freed.
    pub async fn pause(self: &Arc<Self>, id: &str) -> Result<Duration, Error> {
        let started = Instant::now();
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        let (slot, cid) = {
            let mut record = entry.record.lock().unwrap_or_else(|e| e.into_inner());
            if record.state != SandboxState::Running {
                return Err(Error::InvalidState {
                    id: id.to_string(),
                    state: record.state.to_string(),
                    action: "pause",
                });
            }
            record.state = SandboxState::Pausing;
            (record.slot.clone(), record.cid().to_string())
        };
        let span = tracing::info_span!("pause", sandbox = %id);
        let _enter = span.enter();
        let image = self.sandbox_data_dir(id).join("snapshot");
        let tmp = image.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        let result =
            std::fs::create_dir_all(&tmp).map_err(|e| Error::io("creating snapshot dir", e));
        let result = match result {
            Ok(()) => {
                let (rt, cid, tmp2) = (self.clone(), cid.clone(), tmp.clone());
                let log = self.sandbox_run_dir(&cid).join("runsc.log");
                tokio::task::spawn_blocking(move || rt.runsc.checkpoint(&cid, &tmp2, &log))
                    .await
                    .map_err(|e| Error::io("checkpoint task", std::io::Error::other(e)))?
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            // A failed checkpoint leaves the sandbox running as it was.
            let _ = std::fs::remove_dir_all(&tmp);
            entry.record.lock().unwrap_or_else(|e| e.into_inner()).state = SandboxState::Running;
            tracing::warn!(error = %e, "pause failed");
            return Err(e);
        }
        let layout = crate::sandbox::disk::container_layout(&self.sandbox_run_dir(&cid));
        crate::sandbox::disk::mark_complete(&tmp, layout, &self.runsc.platform)?;
        let _ = std::fs::remove_dir_all(&image);
        std::fs::rename(&tmp, &image).map_err(|e| Error::io("renaming snapshot", e))?;
        {
            let mut record = entry.record.lock().unwrap_or_else(|e| e.into_inner());
            record.state = SandboxState::Paused;
            record.slot = None;
            record.pid = None;
            save_record(&self.sandbox_data_dir(id), &record)?;
        }
        let index = slot.map(|s| s.index);
        // Freed in the background: `runsc delete` can take seconds, and the
        // resume uses a fresh container id, so nothing waits for it.
        crate::sandbox::destroy::teardown_in_background(self, &cid, index);
        let took = started.elapsed();
        tracing::info!(?took, "sandbox paused");
        Ok(took)
    }

    /// Resumes a paused sandbox exactly as it was when paused.
    pub async fn resume(self: &Arc<Self>, id: &str) -> Result<Duration, Error> {
        let started = Instant::now();
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        let (template_id, egress, token) = {
            let mut record = entry.record.lock().unwrap_or_else(|e| e.into_inner());
            if record.state != SandboxState::Paused {
                return Err(Error::InvalidState {
                    id: id.to_string(),
                    state: record.state.to_string(),
                    action: "resume",
                });
            }
            record.state = SandboxState::Resuming;
            (
                record.template_id.clone(),
                record.egress.clone(),
                record.access_token.clone(),
            )
        };
        let span = tracing::info_span!("resume", sandbox = %id);
        let _enter = span.enter();
        let fail = |e: Error| {
            entry.record.lock().unwrap_or_else(|e| e.into_inner()).state = SandboxState::Paused;
            tracing::warn!(error = %e, "resume failed");
            e
        };
        let meta = self.template(&template_id).map_err(fail)?;
        let image = self.sandbox_data_dir(id).join("snapshot");
        if !image.join("complete").exists() {
            return Err(fail(Error::InvalidState {
                id: id.to_string(),
                state: "paused without a snapshot".into(),
                action: "resume",
            }));
        }
        let platform = crate::sandbox::disk::snapshot_platform(&image).unwrap_or_default();
        if platform != self.runsc.platform {
            return Err(fail(Error::InvalidState {
                id: id.to_string(),
                state: format!(
                    "paused on the {platform} platform (this node runs {})",
                    self.runsc.platform
                ),
                action: "resume",
            }));
        }
        let rootfs = self.template_rootfs(&template_id);
        // A fresh container id: the paused one may still be being deleted.
        let cid = crate::runtime::new_sandbox_id();
        let _restoring = self.pools.caller_restore();
        let booted =
            crate::sandbox::create::boot(self, &cid, &meta, &rootfs, Some(&image), &egress)
                .await
                .map_err(fail)?;
        // The restored envd already holds the token; it must accompany /init.
        let mut client = crate::envd::EnvdClient::new(
            std::net::SocketAddr::new(booted.slot.sandbox_ip.into(), crate::envd::ENVD_PORT),
            token.clone(),
        );
        let init = InitRequest {
            timestamp: Some(crate::sandbox::create::now_rfc3339()),
            entropy: Some(fresh_entropy()),
            access_token: token,
            ..Default::default()
        };
        if let Err(e) = client.init(&init).await {
            crate::sandbox::destroy::teardown_container(self, &cid, Some(booted.slot.index));
            return Err(fail(e));
        }
        {
            let mut record = entry.record.lock().unwrap_or_else(|e| e.into_inner());
            record.state = SandboxState::Running;
            record.slot = Some(booted.slot);
            record.pid = booted.pid;
            record.container_id = cid;
            save_record(&self.sandbox_data_dir(id), &record)?;
        }
        // Restore is eager: the image is not needed any more.
        let _ = std::fs::remove_dir_all(&image);
        let took = started.elapsed();
        tracing::info!(?took, "sandbox resumed");
        Ok(took)
    }
}
