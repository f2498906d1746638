//! Sandbox lifetimes and usage samples.
//!
//! Every sandbox has an end time; when it passes, the sandbox is killed, or
//! paused when it was created with auto-pause. Usage (CPU, memory) is
//! sampled every few seconds for the metrics endpoint.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::app::App;
use crate::db::SandboxRow;
use crate::util::now_ms;

/// How often end times are checked.
const EXPIRY_TICK: Duration = Duration::from_millis(500);
/// How often usage is sampled.
const SAMPLE_TICK: Duration = Duration::from_secs(5);
/// Samples kept per sandbox (an hour at one per 5 s).
const SAMPLES_KEPT: usize = 720;

/// Size limit of a sandbox's writable layer, as templates get it today.
pub const DEFAULT_DISK_MB: u64 = kiln_runtime::Resources::DEFAULT_DISK_MB;

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub ts_ms: i64,
    pub cpu_ns: u64,
    pub cpu_pct: f64,
    pub mem_used: u64,
    pub mem_total: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

#[derive(Default)]
pub struct Samples(Mutex<HashMap<String, VecDeque<Sample>>>);

impl Samples {
    pub fn of(&self, id: &str) -> Vec<Sample> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(id)
            .map(|q| q.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn forget(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    fn push(&self, id: &str, mut s: Sample, vcpus: i64) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let q = map.entry(id.to_string()).or_default();
        if let Some(prev) = q.back() {
            let wall_ns = (s.ts_ms - prev.ts_ms).max(1) as f64 * 1e6;
            let used = s.cpu_ns.saturating_sub(prev.cpu_ns) as f64;
            s.cpu_pct = (used / (wall_ns * vcpus.max(1) as f64) * 100.0).clamp(0.0, 100.0);
        }
        q.push_back(s);
        while q.len() > SAMPLES_KEPT {
            q.pop_front();
        }
    }
}

/// Takes a usage sample of a running sandbox now.
pub fn sample_now(app: &App, row: &SandboxRow) {
    if let Ok(stats) = app.runtime.stats(&row.id) {
        let mem_total = if stats.memory_limit_bytes == u64::MAX {
            row.memory_mb as u64 * 1024 * 1024
        } else {
            stats.memory_limit_bytes
        };
        app.samples.push(
            &row.id,
            Sample {
                ts_ms: now_ms(),
                cpu_ns: stats.cpu_usage_ns,
                cpu_pct: 0.0,
                mem_used: stats.memory_bytes,
                mem_total,
                disk_used: stats.disk_bytes,
                disk_total: if stats.disk_limit_bytes > 0 {
                    stats.disk_limit_bytes
                } else {
                    DEFAULT_DISK_MB * 1024 * 1024
                },
            },
            row.cpu,
        );
    }
}

/// Runs the end-time and sampling loops until the process ends.
pub fn spawn(app: Arc<App>) {
    let expiry = app.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EXPIRY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = expire(&expiry).await {
                tracing::warn!(error = %e, "checking sandbox end times failed");
            }
        }
    });
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match app.db.live_sandboxes(None).await {
                Ok(rows) => {
                    for row in rows.iter().filter(|r| r.state == "running") {
                        sample_now(&app, row);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "sampling usage failed"),
            }
        }
    });
}

/// Sandboxes being ended right now, so a slow end is not started twice.
static ENDING: Mutex<Option<std::collections::HashSet<String>>> = Mutex::new(None);

async fn expire(app: &Arc<App>) -> Result<(), crate::ApiError> {
    for row in app.db.expired(now_ms()).await? {
        {
            let mut ending = ENDING.lock().unwrap_or_else(|e| e.into_inner());
            if !ending
                .get_or_insert_with(Default::default)
                .insert(row.id.clone())
            {
                continue;
            }
        }
        let app = app.clone();
        // One slow teardown must not hold up the others.
        tokio::spawn(async move {
            let result = if row.auto_pause {
                app.pause_sandbox(&row, "paused: its timeout passed (auto-pause)")
                    .await
            } else {
                app.kill_sandbox(&row, "killed: its timeout passed").await
            };
            if let Err(e) = result {
                tracing::warn!(sandbox = %row.id, error = %e, "ending an expired sandbox failed");
            }
            if let Some(ending) = ENDING.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                ending.remove(&row.id);
            }
        });
    }
    Ok(())
}
