//! Creating sandboxes: a restore of the template's snapshot (or a cold boot).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::Error;
use crate::envd::{ENVD_PORT, EnvdClient, InitRequest, fresh_entropy};
use crate::network::{EgressPolicy, Slot};
use crate::runtime::{
    CreateRequest, Entry, Runtime, SandboxInfo, SandboxRecord, SandboxState, info_of,
    new_sandbox_id, save_record, valid_sandbox_id,
};
use crate::sandbox::disk::{self, Layout};
use crate::template::TemplateMeta;

/// A container that is up and whose envd answers.
pub(crate) struct Booted {
    pub(crate) slot: Slot,
    /// Host pid of `runsc-sandbox`.
    pub(crate) pid: Option<u32>,
    pub(crate) client: EnvdClient,
    pub(crate) log: PathBuf,
}

/// Starts container `cid` from `rootfs`: a restore of `image` when given, else
/// a cold boot. On failure nothing of it is left behind.
pub(crate) async fn boot(
    rt: &Arc<Runtime>,
    cid: &str,
    meta: &TemplateMeta,
    rootfs: &Path,
    image: Option<&Path>,
    egress: &EgressPolicy,
) -> Result<Booted, Error> {
    boot_with(rt, cid, &meta.resources, rootfs, image, egress, None).await
}

/// [`boot`], optionally as a template build sandbox (`build`: gVisor's
/// overlay off, extra mounts), see [`crate::sandbox::build`].
pub(crate) async fn boot_with(
    rt: &Arc<Runtime>,
    cid: &str,
    resources: &crate::spec::Resources,
    rootfs: &Path,
    image: Option<&Path>,
    egress: &EgressPolicy,
    build: Option<&crate::sandbox::build::BuildMounts>,
) -> Result<Booted, Error> {
    let t0 = std::time::Instant::now();
    let net = rt.net.clone();
    let policy = egress.clone();
    // Its guest side is configured (gVisor's netstack takes the address off
    // `eth0`; a reused slot gets it back when released).
    let slot =
        tokio::task::spawn_blocking(move || -> Result<Slot, Error> { Ok(net.acquire(&policy)?) })
            .await
            .map_err(|e| Error::io("network task", std::io::Error::other(e)))??;

    let t_slot = t0.elapsed();
    let run_dir = rt.sandbox_run_dir(cid);
    let bundle = run_dir.join("bundle");
    let log = run_dir.join("runsc.log");
    // A restore must use the layout its checkpoint was taken with.
    let layout = image.map_or(Layout::CURRENT, disk::snapshot_layout);
    let without_overlay = build.is_some();
    let mut spec = crate::spec::sandbox_spec(
        cid,
        rootfs,
        &slot.netns_path,
        resources,
        layout.tmp_in_layer,
    );
    if let Some(build) = build {
        build.apply(&mut spec);
    }
    let pid_file = run_dir.join("pid");
    let started =
        crate::spec::write_bundle(&bundle, &spec).map_err(|e| Error::io("writing bundle", e));
    let started = match started {
        Ok(()) => {
            let (rt2, cid2, bundle2, log2, run_dir2, pid_file2) = (
                rt.clone(),
                cid.to_string(),
                bundle.clone(),
                log.clone(),
                run_dir.clone(),
                pid_file.clone(),
            );
            let image = image.map(Path::to_path_buf);
            let disk_mb = resources.disk_mb;
            let layers = rt.layers_dir();
            tokio::task::spawn_blocking(move || {
                let overlay = if without_overlay {
                    "none".to_string()
                } else {
                    disk::prepare(&run_dir2, &layers, layout, disk_mb)?
                };
                match image {
                    Some(image) => rt2
                        .runsc
                        .restore(&cid2, &bundle2, &image, &overlay, &pid_file2, &log2),
                    None => rt2.runsc.run(&cid2, &bundle2, &overlay, &pid_file2, &log2),
                }
            })
            .await
            .map_err(|e| Error::io("runsc task", std::io::Error::other(e)))?
        }
        Err(e) => Err(e),
    };
    let t_runsc = t0.elapsed();
    let client = EnvdClient::new(SocketAddr::new(slot.sandbox_ip.into(), ENVD_PORT), None);
    let healthy = match started {
        Ok(()) => client.wait_healthy(Duration::from_secs(20)).await,
        Err(e) => Err(e),
    };
    if let Err(mut e) = healthy {
        if let Error::Envd(msg) = &mut e {
            msg.push_str(&format!("; runsc log: {}", crate::runsc::log_tail(&log)));
        }
        tracing::warn!(container = %cid, error = %e, "boot failed");
        if std::env::var_os("KILN_DEBUG_KEEP_FAILED").is_some() {
            tracing::warn!(container = %cid, "KILN_DEBUG_KEEP_FAILED: leaving it for inspection");
            return Err(e);
        }
        crate::sandbox::destroy::teardown_container(rt, cid, Some(slot.index));
        return Err(e);
    }
    // runsc wrote the host pid of `runsc-sandbox` (what `runsc state` says).
    let pid = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|p| *p > 0);
    tracing::debug!(
        container = %cid,
        restore = image.is_some(),
        ?layout,
        slot_ms = t_slot.as_secs_f64() * 1e3,
        runsc_ms = (t_runsc - t_slot).as_secs_f64() * 1e3,
        healthy_ms = (t0.elapsed() - t_runsc).as_secs_f64() * 1e3,
        "container booted"
    );
    Ok(Booted {
        slot,
        pid,
        client,
        log,
    })
}

impl Runtime {
    /// Creates a sandbox from a template: restores the template's snapshot
    /// (or boots it cold) in a fresh network namespace, then hands envd the
    /// sandbox's env vars, access token, clock and fresh entropy.
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<SandboxInfo, Error> {
        let meta = self.template(&req.template_id)?;
        if !req.cold && self.has_foreign_snapshot(&meta.id) {
            // Taken on another gVisor platform: take it again, once.
            let _one = self.resnapshot.lock().await;
            if self.has_foreign_snapshot(&meta.id) {
                tracing::info!(template = %meta.id, "snapshot is from another platform; taking it again");
                self.snapshot_template(&meta.id).await?;
            }
        }
        let image = (!req.cold && self.has_snapshot(&meta.id))
            .then(|| self.template_snapshot(&meta.id).clone());
        if !req.cold && image.is_none() {
            return Err(Error::TemplateInvalid {
                id: meta.id.clone(),
                reason: "it has no snapshot yet".into(),
            });
        }
        let id = match req.sandbox_id.clone() {
            Some(id) if !valid_sandbox_id(&id) => return Err(Error::SandboxNotFound(id)),
            Some(id) => id,
            None => new_sandbox_id(),
        };
        let span = tracing::info_span!("create", sandbox = %id, template = %meta.id);
        let _enter = span.enter();
        let record = SandboxRecord {
            id: id.clone(),
            container_id: id.clone(),
            template_id: meta.id.clone(),
            state: SandboxState::Creating,
            resources: meta.resources,
            env_vars: req.env_vars.clone(),
            access_token: req.access_token.clone(),
            egress: req.egress.clone(),
            slot: None,
            started_at: SystemTime::now(),
            pid: None,
            exit_reason: None,
        };
        let entry = Arc::new(Entry {
            record: Mutex::new(record),
            op: tokio::sync::Mutex::new(()),
        });
        {
            let mut map = self.sandboxes.lock().unwrap_or_else(|e| e.into_inner());
            if map.contains_key(&id) {
                return Err(Error::AlreadyExists(id));
            }
            map.insert(id.clone(), entry.clone());
        }
        let _op = entry.op.lock().await;
        let started = std::time::Instant::now();
        let rootfs = self.template_rootfs(&meta.id);
        // The template's variables, overridden by the request's.
        let mut env_vars: std::collections::HashMap<String, String> =
            meta.env.clone().into_iter().collect();
        env_vars.extend(req.env_vars.clone());
        let make_init = || InitRequest {
            env_vars: env_vars.clone(),
            access_token: req.access_token.clone(),
            default_user: Some(meta.user.clone()),
            default_workdir: meta.workdir.clone(),
            timestamp: Some(now_rfc3339()),
            entropy: Some(fresh_entropy()),
            hostname: Some(format!("kiln-{}", &id[..8])),
        };
        let result = async {
            // A warm pool's sandbox, if there is one, else a restore.
            if !req.cold
                && let Some(taken) =
                    crate::sandbox::pool::hand_out(self, &meta.id, &id, &make_init(), &req.egress)
                        .await
            {
                return Ok(taken);
            }
            let _restoring = self.pools.caller_restore();
            let booted = boot(self, &id, &meta, &rootfs, image.as_deref(), &req.egress).await?;
            let mut client = booted.client.clone();
            if let Err(e) = client.init(&make_init()).await {
                crate::sandbox::destroy::teardown_container(self, &id, Some(booted.slot.index));
                return Err(e);
            }
            if req.cold
                && let Some(cmd) = &meta.start_cmd
            {
                client.start_background(cmd, &meta.user, "start").await?;
            }
            Ok((id.clone(), booted.slot, booted.pid))
        }
        .await;
        match result {
            Ok((cid, slot, pid)) => {
                let mut record = entry.record.lock().unwrap_or_else(|e| e.into_inner());
                record.state = SandboxState::Running;
                record.container_id = cid;
                record.slot = Some(slot);
                record.pid = pid;
                save_record(&self.sandbox_data_dir(&id), &record)?;
                tracing::info!(
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    pooled = record.container_id != id,
                    "sandbox running"
                );
                Ok(info_of(&record))
            }
            Err(e) => {
                self.sandboxes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                let _ = std::fs::remove_dir_all(self.sandbox_data_dir(&id));
                Err(e)
            }
        }
    }

    /// A client for the envd of a running sandbox.
    pub fn envd(&self, id: &str) -> Result<EnvdClient, Error> {
        let entry = self.entry(id)?;
        let record = entry.record.lock().unwrap_or_else(|e| e.into_inner());
        let info = info_of(&record);
        match info.envd_addr {
            Some(addr) => Ok(EnvdClient::new(addr, record.access_token.clone())),
            None => Err(Error::InvalidState {
                id: id.to_string(),
                state: record.state.to_string(),
                action: "reach envd",
            }),
        }
    }
}

/// The current time in RFC 3339 (UTC, nanoseconds).
pub(crate) fn now_rfc3339() -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_788), (2026, 12, 1));
    }
}
