//! Templates on a node: a root filesystem, its settings, and a snapshot of a
//! booted sandbox that new sandboxes are restored from.
//!
//! Layout: `data_dir/templates/<id>/{template.json, rootfs/, snapshot/}`;
//! `snapshot/complete` marks a snapshot that was fully written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::envd::InitRequest;
use crate::network::EgressPolicy;
use crate::runtime::{Runtime, new_sandbox_id};
use crate::spec::Resources;

/// A template's settings (`template.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TemplateMeta {
    pub id: String,
    #[serde(default)]
    pub resources: Resources,
    /// Started in the background before the snapshot is taken.
    #[serde(default)]
    pub start_cmd: Option<String>,
    /// Polled until it exits 0 before the snapshot is taken.
    #[serde(default)]
    pub ready_cmd: Option<String>,
    /// Default user of processes and files.
    #[serde(default = "default_user")]
    pub user: String,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default = "default_envd_version")]
    pub envd_version: String,
    /// Environment variables every process in the template's sandboxes sees
    /// (a sandbox's own variables override them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// How long `snapshot_template` polls the ready command (default 120 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_secs: Option<u64>,
}

fn default_user() -> String {
    "user".into()
}

fn default_envd_version() -> String {
    "0.6.4".into()
}

impl TemplateMeta {
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            resources: Resources::default(),
            start_cmd: None,
            ready_cmd: None,
            user: default_user(),
            workdir: None,
            envd_version: default_envd_version(),
            env: BTreeMap::new(),
            ready_timeout_secs: None,
        }
    }
}

/// Whether `id` can name a template (it becomes a directory name).
pub fn valid_template_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !id.starts_with(['-', '_'])
}

impl Runtime {
    pub fn template_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("templates").join(id)
    }

    pub(crate) fn template_rootfs(&self, id: &str) -> PathBuf {
        self.template_dir(id).join("rootfs")
    }

    pub(crate) fn template_snapshot(&self, id: &str) -> PathBuf {
        self.template_dir(id).join("snapshot")
    }

    /// Reads a template's settings.
    pub fn template(&self, id: &str) -> Result<TemplateMeta, Error> {
        if !valid_template_id(id) {
            return Err(Error::TemplateNotFound(id.to_string()));
        }
        let path = self.template_dir(id).join("template.json");
        let text = std::fs::read(&path).map_err(|_| Error::TemplateNotFound(id.to_string()))?;
        serde_json::from_slice(&text).map_err(|e| Error::TemplateInvalid {
            id: id.to_string(),
            reason: format!("template.json: {e}"),
        })
    }

    /// Whether the template has a complete snapshot this node can restore
    /// (taken on its gVisor platform).
    pub fn has_snapshot(&self, id: &str) -> bool {
        crate::sandbox::disk::snapshot_platform(&self.template_snapshot(id))
            .is_some_and(|p| p == self.runsc.platform)
    }

    /// Whether the template has a complete snapshot from another platform,
    /// which must be taken again before sandboxes can be restored from it.
    pub fn has_foreign_snapshot(&self, id: &str) -> bool {
        crate::sandbox::disk::snapshot_platform(&self.template_snapshot(id))
            .is_some_and(|p| p != self.runsc.platform)
    }

    /// Creates template `meta.id` from a root filesystem directory, with `envd`
    /// as its init. The rootfs is hard-linked, not copied (sandboxes never
    /// write to it: their writes live in their overlay).
    pub fn create_template(
        &self,
        meta: &TemplateMeta,
        base_rootfs: &Path,
        envd: &Path,
    ) -> Result<(), Error> {
        if !valid_template_id(&meta.id) {
            return Err(Error::TemplateInvalid {
                id: meta.id.clone(),
                reason: "ids are 1-64 lowercase letters, digits, '-' and '_'".into(),
            });
        }
        if !base_rootfs.join("bin").exists() && !base_rootfs.join("usr/bin").exists() {
            return Err(Error::TemplateInvalid {
                id: meta.id.clone(),
                reason: format!(
                    "{} does not look like a root filesystem",
                    base_rootfs.display()
                ),
            });
        }
        let dir = self.template_dir(&meta.id);
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        let status = Command::new("cp")
            .arg("-al")
            .arg(base_rootfs)
            .arg(tmp.join("rootfs"))
            .status()
            .map_err(|e| Error::io("running cp", e))?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::io(
                "hard-linking the rootfs",
                std::io::Error::other(status.to_string()),
            ));
        }
        // Replace (never write through) the hard link, so the base stays intact.
        let target = tmp.join("rootfs/usr/bin/envd");
        // Minimal images may have no /usr/bin.
        std::fs::create_dir_all(tmp.join("rootfs/usr/bin"))
            .map_err(|e| Error::io("creating usr/bin", e))?;
        let _ = std::fs::remove_file(&target);
        std::fs::copy(envd, &target)
            .map_err(|e| Error::io(format!("copying {}", envd.display()), e))?;
        // gVisor ignores set-user-ID bits, so the image's sudo cannot work;
        // envd called as `sudo` asks envd to run the command instead.
        let sudo = tmp.join("rootfs/usr/bin/sudo");
        if sudo.symlink_metadata().is_ok() {
            std::fs::remove_file(&sudo).map_err(|e| Error::io("replacing usr/bin/sudo", e))?;
            std::os::unix::fs::symlink("envd", &sudo)
                .map_err(|e| Error::io("linking usr/bin/sudo to envd", e))?;
        }
        // The sandbox resolver is the node's DNS address, which depends on
        // its subnet: write it rather than trust the image's.
        let resolv = tmp.join("rootfs/etc/resolv.conf");
        let _ = std::fs::remove_file(&resolv);
        std::fs::write(&resolv, format!("nameserver {}\n", self.net.dns_address()))
            .map_err(|e| Error::io("writing etc/resolv.conf", e))?;
        let text = serde_json::to_vec_pretty(meta)
            .map_err(|e| Error::io("encoding template", std::io::Error::other(e)))?;
        std::fs::write(tmp.join("template.json"), text)
            .map_err(|e| Error::io("writing template.json", e))?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| Error::io(format!("removing {}", dir.display()), e))?;
        }
        std::fs::rename(&tmp, &dir)
            .map_err(|e| Error::io(format!("renaming {}", tmp.display()), e))?;
        tracing::info!(template = %meta.id, "template created");
        Ok(())
    }

    /// Boots the template, runs its start command until its ready command
    /// succeeds, and checkpoints it: every later create restores this snapshot.
    pub async fn snapshot_template(self: &Arc<Self>, id: &str) -> Result<Duration, Error> {
        let started = Instant::now();
        let meta = self.template(id)?;
        let cid = new_sandbox_id();
        let span = tracing::info_span!("snapshot_template", template = %id, container = %cid);
        let _enter = span.enter();
        let rootfs = self.template_rootfs(id);
        let booted = crate::sandbox::create::boot(
            self,
            &cid,
            &meta,
            &rootfs,
            None,
            &EgressPolicy::default(),
        )
        .await?;
        let result = async {
            let mut client = booted.client.clone();
            client
                .init(&InitRequest {
                    env_vars: meta.env.clone().into_iter().collect(),
                    default_user: Some(meta.user.clone()),
                    default_workdir: meta.workdir.clone(),
                    ..Default::default()
                })
                .await?;
            if let Some(cmd) = &meta.start_cmd {
                client.start_background(cmd, &meta.user, "start").await?;
            }
            if let Some(ready) = &meta.ready_cmd {
                let timeout = Duration::from_secs(meta.ready_timeout_secs.unwrap_or(120));
                let deadline = Instant::now() + timeout;
                loop {
                    let attempt = timeout.min(Duration::from_secs(10));
                    let out = client.run(ready, &meta.user, attempt).await;
                    if matches!(&out, Ok(o) if o.exit_code == 0) {
                        break;
                    }
                    if Instant::now() > deadline {
                        let last = match out {
                            Ok(o) => format!(
                                "exit code {}: {}{}",
                                o.exit_code,
                                o.stdout.trim(),
                                o.stderr.trim()
                            ),
                            Err(e) => e.to_string(),
                        };
                        return Err(Error::NotReady {
                            id: id.to_string(),
                            timeout,
                            last,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            drop(client);
            // Let envd finish the connections we just closed, so the
            // checkpoint captures a quiet sandbox.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let snapshot = self.template_snapshot(id);
            let tmp = snapshot.with_extension("tmp");
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(|e| Error::io("creating snapshot dir", e))?;
            let rt = self.clone();
            let (cid2, tmp2, log) = (cid.clone(), tmp.clone(), booted.log.clone());
            tokio::task::spawn_blocking(move || rt.runsc.checkpoint(&cid2, &tmp2, &log))
                .await
                .map_err(|e| Error::io("checkpoint task", std::io::Error::other(e)))??;
            let layout = crate::sandbox::disk::container_layout(&self.sandbox_run_dir(&cid));
            crate::sandbox::disk::mark_complete(&tmp, layout, &self.runsc.platform)?;
            let _ = std::fs::remove_dir_all(&snapshot);
            std::fs::rename(&tmp, &snapshot).map_err(|e| Error::io("renaming snapshot", e))?;
            Ok(())
        }
        .await;
        crate::sandbox::destroy::teardown_container(self, &cid, Some(booted.slot.index));
        result?;
        let took = started.elapsed();
        tracing::info!(?took, "template snapshot ready");
        Ok(took)
    }

    /// Removes a template from the node.
    pub fn delete_template(&self, id: &str) -> Result<(), Error> {
        if !valid_template_id(id) {
            return Err(Error::TemplateNotFound(id.to_string()));
        }
        let dir = self.template_dir(id);
        if !dir.exists() {
            return Err(Error::TemplateNotFound(id.to_string()));
        }
        std::fs::remove_dir_all(&dir)
            .map_err(|e| Error::io(format!("removing {}", dir.display()), e))
    }
}
