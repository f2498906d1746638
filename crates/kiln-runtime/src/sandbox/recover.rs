//! Crash recovery: what a restarted runtime finds and keeps.
//!
//! Running sandboxes whose container is still up are adopted with their
//! network slots; paused sandboxes with a complete snapshot stay paused; any
//! other leftover (a half-made sandbox, a container without a record, a
//! stale network namespace) is removed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::Error;
use crate::network::{EgressPolicy, NetworkManager};
use crate::runsc::{ContainerStatus, Runsc};
use crate::runtime::{Entry, Runtime, RuntimeConfig, SandboxRecord, SandboxState, save_record};

pub(crate) fn load_records(data_dir: &Path) -> Vec<SandboxRecord> {
    let Ok(dirs) = std::fs::read_dir(data_dir.join("sandboxes")) else {
        return Vec::new();
    };
    dirs.flatten()
        .filter_map(|d| std::fs::read(d.path().join("record.json")).ok())
        .filter_map(|text| serde_json::from_slice(&text).ok())
        .collect()
}

fn is_live(runsc: &Runsc, r: &SandboxRecord) -> bool {
    r.state == SandboxState::Running
        && r.slot.is_some()
        && runsc.state(r.cid()) == ContainerStatus::Running
}

pub(crate) fn adopt_network(
    cfg: &RuntimeConfig,
    runsc: &Runsc,
    records: &[SandboxRecord],
) -> Result<Arc<NetworkManager>, Error> {
    let in_use: HashMap<u32, EgressPolicy> = records
        .iter()
        .filter(|r| is_live(runsc, r))
        .filter_map(|r| r.slot.as_ref().map(|s| (s.index, r.egress.clone())))
        .collect();
    Ok(NetworkManager::adopt(cfg.network.clone(), &in_use)?)
}

pub(crate) fn recover(rt: &Arc<Runtime>, records: Vec<SandboxRecord>) {
    let mut kept = HashMap::new();
    for mut record in records {
        let dir = rt.sandbox_data_dir(&record.id);
        let snapshot_ok = dir.join("snapshot/complete").exists();
        if is_live(&rt.runsc, &record) {
            record.pid = rt.runsc.pid(record.cid());
            tracing::info!(sandbox = %record.id, "adopted running sandbox");
        } else if snapshot_ok && record.state != SandboxState::Running {
            record.state = SandboxState::Paused;
            record.slot = None;
            let _ = save_record(&dir, &record);
            tracing::info!(sandbox = %record.id, "recovered paused sandbox");
        } else {
            tracing::warn!(sandbox = %record.id, state = %record.state, "removing sandbox lost in a crash");
            crate::sandbox::destroy::teardown_blocking(rt, record.cid(), None);
            let _ = std::fs::remove_dir_all(&dir);
            continue;
        }
        kept.insert(
            record.id.clone(),
            Arc::new(Entry {
                record: Mutex::new(record),
                op: tokio::sync::Mutex::new(()),
            }),
        );
    }
    // Containers nobody owns any more (e.g. a template build interrupted, or
    // a warm pool's sandboxes: pools start empty).
    let owned: std::collections::HashSet<String> = kept
        .values()
        .map(|e| {
            e.record
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .cid()
                .to_string()
        })
        .collect();
    for cid in rt.runsc.list() {
        if !owned.contains(&cid) {
            tracing::warn!(container = %cid, "deleting orphaned container");
            crate::sandbox::destroy::teardown_blocking(rt, &cid, None);
        }
    }
    // Run dirs of containers that never started (e.g. a crash during a
    // boot): their writable-layer mounts must go too.
    if let Ok(dirs) = std::fs::read_dir(rt.cfg.run_dir.join("sandboxes")) {
        for dir in dirs.flatten() {
            let cid = dir.file_name().to_string_lossy().into_owned();
            if !owned.contains(&cid) {
                tracing::warn!(container = %cid, "removing a stale run dir");
                crate::sandbox::disk::release(&dir.path());
                let _ = std::fs::remove_dir_all(dir.path());
            }
        }
    }
    *rt.sandboxes.lock().unwrap_or_else(|e| e.into_inner()) = kept;
}
