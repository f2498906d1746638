//! Warm pools: per template, up to n sandboxes restored from the template's
//! snapshot ahead of time, never used, and frozen with the cgroup freezer so
//! they cost no CPU while they wait. A create takes one, thaws it and sends
//! the usual `/init`: much faster than a restore (~200 ms).
//!
//! - One background task per pool refills it. All pools share one permit, so
//!   at most one refill restore runs on the node and refills never crowd out
//!   real creates.
//! - A pooled sandbox has no record and its own container id: it never shows
//!   in `list()`, and a restarted runtime deletes it as an orphan (pools start
//!   empty). Once handed out, the record keeps that container id.
//! - Each pooled sandbox remembers the snapshot it came from (the identity of
//!   `snapshot/complete`). After a snapshot refresh the old ones are never
//!   handed out; the refill task, which looks every second, replaces them.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore, watch};

use crate::Error;
use crate::envd::{ENVD_PORT, EnvdClient, InitRequest};
use crate::network::{EgressPolicy, Slot};
use crate::runtime::{Runtime, new_sandbox_id};

/// How often an idle refill task checks for a refreshed snapshot.
const STALE_CHECK: Duration = Duration::from_secs(1);
/// Longest wait between failed refills.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A pooled sandbox whose envd does not take `/init` by then is discarded.
const INIT_TIMEOUT: Duration = Duration::from_secs(3);

/// The warm pools of one node.
pub(crate) struct Pools {
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    /// One refill restore at a time, node-wide.
    refill: Arc<Semaphore>,
    /// Restores a caller waits for (creates the pool could not serve,
    /// resumes) in flight: refills wait until there are none, so as not to
    /// share the CPU with them. A hand-out does not hold refills back: a
    /// drained pool costs the next create a whole restore (~250 ms here),
    /// while a refill beside a new sandbox's first commands costs them
    /// ~10-20 ms (measured with creates every 0.4 s: p90 335 ms when refills
    /// waited 500 ms after every create, 82-111 ms without).
    busy: watch::Sender<usize>,
}

impl Default for Pools {
    fn default() -> Self {
        Self {
            pools: Mutex::new(HashMap::new()),
            refill: Arc::new(Semaphore::new(1)),
            busy: watch::Sender::new(0),
        }
    }
}

impl Pools {
    fn get(&self, template_id: &str) -> Option<Arc<Pool>> {
        lock(&self.pools).get(template_id).cloned()
    }

    /// Marks a restore a caller waits for as in flight until the guard drops.
    pub(crate) fn caller_restore(&self) -> CallerRestore {
        self.busy.send_modify(|n| *n += 1);
        CallerRestore(self.busy.clone())
    }
}

/// See [`Pools::caller_restore`].
pub(crate) struct CallerRestore(watch::Sender<usize>);

impl Drop for CallerRestore {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

struct Pool {
    template_id: String,
    state: Mutex<PoolState>,
    /// Wakes the refill task: a sandbox was taken or the size changed.
    wake: Notify,
    /// True while no refill task runs (nothing of the pool is in flight).
    idle: watch::Sender<bool>,
}

#[derive(Default)]
struct PoolState {
    target: usize,
    ready: VecDeque<Pooled>,
    /// Whether the refill task runs.
    running: bool,
}

/// A restored, frozen, never-used sandbox.
struct Pooled {
    cid: String,
    slot: Slot,
    /// Host pid of its `runsc-sandbox`.
    pid: Option<u32>,
    snapshot: SnapshotId,
}

/// Identifies one snapshot of a template: device, inode and mtime of its
/// `complete` marker, which every snapshot writes anew.
type SnapshotId = (u64, u64, i64, i64);

fn snapshot_id(rt: &Runtime, template_id: &str) -> Option<SnapshotId> {
    let meta = std::fs::metadata(rt.template_snapshot(template_id).join("complete")).ok()?;
    Some((meta.dev(), meta.ino(), meta.mtime(), meta.mtime_nsec()))
}

/// What a pool holds now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStatus {
    /// The size asked for.
    pub target: usize,
    /// Container ids of the sandboxes ready to hand out (all frozen).
    pub ready: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Runtime {
    /// Keeps up to `n` restored, frozen sandboxes of `template_id` ready for
    /// [`Runtime::create`]; refilled in the background. `n == 0` tears the
    /// pool down and returns once nothing of it is left. Must be called
    /// inside a tokio runtime (the refill task runs on it).
    pub async fn set_pool_size(self: &Arc<Self>, template_id: &str, n: usize) -> Result<(), Error> {
        if n > 0 {
            self.template(template_id)?;
            if !self.has_snapshot(template_id) {
                return Err(Error::TemplateInvalid {
                    id: template_id.to_string(),
                    reason: "it has no snapshot yet".into(),
                });
            }
        }
        let pool = {
            let mut pools = lock(&self.pools.pools);
            match pools.get(template_id) {
                Some(pool) => pool.clone(),
                None if n == 0 => return Ok(()),
                None => {
                    let pool = Arc::new(Pool {
                        template_id: template_id.to_string(),
                        state: Mutex::new(PoolState::default()),
                        wake: Notify::new(),
                        idle: watch::channel(true).0,
                    });
                    pools.insert(template_id.to_string(), pool.clone());
                    pool
                }
            }
        };
        let (excess, spawn) = {
            let mut st = lock(&pool.state);
            st.target = n;
            let excess: Vec<Pooled> = if st.ready.len() > n {
                st.ready.drain(n..).collect()
            } else {
                Vec::new()
            };
            let spawn = n > 0 && !st.running;
            if spawn {
                st.running = true;
                pool.idle.send_replace(false);
            }
            (excess, spawn)
        };
        tracing::info!(template = %template_id, size = n, "warm pool size set");
        discard_all(self, excess).await;
        if spawn {
            tokio::spawn(refill_loop(
                Arc::downgrade(self),
                pool.clone(),
                self.pools.refill.clone(),
                self.pools.busy.subscribe(),
            ));
        } else {
            pool.wake.notify_one();
        }
        if n == 0 {
            // The refill task discards what it holds or restores, then stops;
            // unless a concurrent call sized the pool up again.
            let mut idle = pool.idle.subscribe();
            while !*idle.borrow_and_update() && lock(&pool.state).target == 0 {
                let _ = tokio::time::timeout(Duration::from_millis(100), idle.changed()).await;
            }
        }
        Ok(())
    }

    /// The size and ready sandboxes of `template_id`'s pool.
    pub fn pool_status(&self, template_id: &str) -> PoolStatus {
        let Some(pool) = self.pools.get(template_id) else {
            return PoolStatus::default();
        };
        let st = lock(&pool.state);
        PoolStatus {
            target: st.target,
            ready: st.ready.iter().map(|p| p.cid.clone()).collect(),
        }
    }

    /// The container (and cgroup) id behind a sandbox; differs from the
    /// sandbox id for sandboxes taken from a warm pool.
    pub fn container_id(&self, id: &str) -> Result<String, Error> {
        let entry = self.entry(id)?;
        let record = lock(&entry.record);
        Ok(record.cid().to_string())
    }
}

/// Takes a pooled sandbox of `template_id` for sandbox `id`: thaws it,
/// applies `egress` and sends `init`. Returns its container id, network
/// slot and host pid, or `None` when the pool has none (or the one taken failed, which is
/// then discarded): the caller restores as usual.
pub(crate) async fn hand_out(
    rt: &Arc<Runtime>,
    template_id: &str,
    id: &str,
    init: &InitRequest,
    egress: &EgressPolicy,
) -> Option<(String, Slot, Option<u32>)> {
    let pool = rt.pools.get(template_id)?;
    let current = snapshot_id(rt, template_id);
    let (taken, stale) = {
        let mut st = lock(&pool.state);
        let mut stale = Vec::new();
        let mut taken = None;
        while let Some(p) = st.ready.pop_front() {
            if Some(p.snapshot) == current {
                taken = Some(p);
                break;
            }
            stale.push(p);
        }
        (taken, stale)
    };
    pool.wake.notify_one();
    for p in stale {
        discard_in_background(rt, p);
    }
    let pooled = taken?;
    let started = Instant::now();
    match activate(rt, &pooled, init, egress).await {
        Ok(()) => {
            tracing::info!(
                sandbox = %id,
                container = %pooled.cid,
                took_us = started.elapsed().as_micros() as u64,
                "took a sandbox from the warm pool"
            );
            Some((pooled.cid, pooled.slot, pooled.pid))
        }
        Err(e) => {
            tracing::warn!(sandbox = %id, container = %pooled.cid, error = %e,
                "pooled sandbox unusable; discarding it and restoring instead");
            discard_in_background(rt, pooled);
            None
        }
    }
}

async fn activate(
    rt: &Arc<Runtime>,
    p: &Pooled,
    init: &InitRequest,
    egress: &EgressPolicy,
) -> Result<(), Error> {
    let cid = p.cid.clone();
    blocking(move || crate::cgroup::thaw(&cid).map_err(Error::from)).await?;
    // Pooled sandboxes start with the default policy.
    if *egress != EgressPolicy::default() {
        let (net, slot, egress) = (rt.net.clone(), p.slot.clone(), egress.clone());
        blocking(move || net.apply_policy(&slot, &egress).map_err(Error::from)).await?;
    }
    let mut client = EnvdClient::new(SocketAddr::new(p.slot.sandbox_ip.into(), ENVD_PORT), None);
    tokio::time::timeout(INIT_TIMEOUT, client.init(init))
        .await
        .map_err(|_| Error::Envd(format!("POST /init timed out after {INIT_TIMEOUT:?}")))?
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io("blocking task", std::io::Error::other(e)))?
}

/// Restores one sandbox of the template under a fresh container id and
/// freezes it.
async fn restore_one(rt: &Arc<Runtime>, template_id: &str) -> Result<Pooled, Error> {
    let meta = rt.template(template_id)?;
    let snapshot = snapshot_id(rt, template_id).ok_or_else(|| Error::TemplateInvalid {
        id: template_id.to_string(),
        reason: "it has no snapshot yet".into(),
    })?;
    let cid = new_sandbox_id();
    let started = Instant::now();
    let booted = crate::sandbox::create::boot(
        rt,
        &cid,
        &meta,
        &rt.template_rootfs(template_id),
        Some(&rt.template_snapshot(template_id)),
        &EgressPolicy::default(),
    )
    .await?;
    let (slot, pid) = (booted.slot, booted.pid);
    let c = cid.clone();
    if let Err(e) = blocking(move || crate::cgroup::freeze(&c).map_err(Error::from)).await {
        let (rt, c, index) = (rt.clone(), cid.clone(), slot.index);
        let _ = blocking(move || {
            crate::sandbox::destroy::teardown_blocking(&rt, &c, Some(index));
            Ok(())
        })
        .await;
        return Err(e);
    }
    tracing::debug!(template = %template_id, container = %cid,
        took_ms = started.elapsed().as_millis() as u64, "pooled sandbox restored and frozen");
    Ok(Pooled {
        cid,
        slot,
        pid,
        snapshot,
    })
}

fn discard_in_background(rt: &Arc<Runtime>, p: Pooled) {
    crate::sandbox::destroy::teardown_in_background(rt, &p.cid, Some(p.slot.index));
}

/// Tears pooled sandboxes down and waits until they are gone.
async fn discard_all(rt: &Arc<Runtime>, pooled: Vec<Pooled>) {
    let handles: Vec<_> = pooled
        .into_iter()
        .map(|p| {
            tracing::debug!(container = %p.cid, "discarding pooled sandbox");
            crate::sandbox::destroy::teardown_in_background(rt, &p.cid, Some(p.slot.index))
        })
        .collect();
    let _ = tokio::task::spawn_blocking(move || {
        for h in handles {
            let _ = h.join();
        }
    })
    .await;
}

/// Keeps one pool at its size until the size becomes 0 (or the runtime goes).
async fn refill_loop(
    rt: Weak<Runtime>,
    pool: Arc<Pool>,
    permits: Arc<Semaphore>,
    mut busy: watch::Receiver<usize>,
) {
    let template_id = pool.template_id.clone();
    let mut backoff = Duration::ZERO;
    let mut next_try = Instant::now();
    loop {
        let Some(rt) = rt.upgrade() else {
            break;
        };
        let current = snapshot_id(&rt, &template_id);
        let (stale, need) = {
            let mut st = lock(&pool.state);
            let target = st.target;
            let (keep, stale): (VecDeque<Pooled>, VecDeque<Pooled>) = std::mem::take(&mut st.ready)
                .into_iter()
                .partition(|p| target > 0 && Some(p.snapshot) == current);
            st.ready = keep;
            let stale: Vec<Pooled> = stale.into();
            (stale, target.saturating_sub(st.ready.len()))
        };
        if !stale.is_empty() {
            tracing::info!(template = %template_id, count = stale.len(),
                "discarding pooled sandboxes (pool shrunk or snapshot refreshed)");
            discard_all(&rt, stale).await;
        }
        {
            let mut st = lock(&pool.state);
            if st.target == 0 && st.ready.is_empty() {
                st.running = false;
                pool.idle.send_replace(true);
                return;
            }
        }
        if need == 0 || Instant::now() < next_try {
            let wait = if need == 0 {
                STALE_CHECK
            } else {
                next_try - Instant::now()
            };
            drop(rt);
            let _ = tokio::time::timeout(wait, pool.wake.notified()).await;
            continue;
        }
        let Ok(permit) = permits.acquire().await else {
            break;
        };
        // The sender lives as long as the runtime, which this task outlives
        // only when it is shutting down.
        let _ = busy.wait_for(|n| *n == 0).await;
        if lock(&pool.state).target == 0 {
            continue;
        }
        let result = restore_one(&rt, &template_id).await;
        drop(permit);
        match result {
            Ok(p) => {
                backoff = Duration::ZERO;
                let surplus = {
                    let mut st = lock(&pool.state);
                    if st.ready.len() < st.target
                        && snapshot_id(&rt, &template_id) == Some(p.snapshot)
                    {
                        tracing::debug!(template = %template_id, container = %p.cid,
                            ready = st.ready.len() + 1, "pooled sandbox ready");
                        st.ready.push_back(p);
                        None
                    } else {
                        Some(p)
                    }
                };
                if let Some(p) = surplus {
                    discard_all(&rt, vec![p]).await;
                }
            }
            Err(Error::TemplateNotFound(_)) => {
                tracing::warn!(template = %template_id, "template gone; emptying its warm pool");
                lock(&pool.state).target = 0;
            }
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_secs(1), MAX_BACKOFF);
                next_try = Instant::now() + backoff;
                tracing::warn!(template = %template_id, error = %e, retry_in = ?backoff,
                    "warm pool refill failed");
            }
        }
    }
    // The runtime is gone: whatever is pooled is left to the next start's recovery.
    let mut st = lock(&pool.state);
    st.running = false;
    pool.idle.send_replace(true);
}
