//! Destroying sandboxes. `runsc delete` of a running sandbox blocks for about
//! two seconds, so teardown runs in the background once the sandbox is gone
//! from the caller's view.

use std::sync::Arc;

use crate::Error;
use crate::runtime::{Runtime, SandboxState};

/// Stops and deletes container `cid`, frees its network slot and run dir.
/// Blocking; callers that must not wait use [`teardown_in_background`].
pub(crate) fn teardown_blocking(rt: &Runtime, cid: &str, slot: Option<u32>) {
    let run_dir = rt.sandbox_run_dir(cid);
    let log = run_dir.join("runsc.log");
    // A frozen sandbox (warm pool) would ignore the SIGKILL of `runsc delete`.
    crate::cgroup::ensure_thawed(cid);
    if rt.runsc.state(cid) != crate::runsc::ContainerStatus::Missing
        && let Err(e) = rt.runsc.delete(cid, &log)
    {
        tracing::warn!(container = %cid, error = %e, "runsc delete failed");
    }
    crate::sandbox::disk::release(&run_dir);
    if let Some(index) = slot
        && let Err(e) = rt.net.release(index)
    {
        tracing::warn!(container = %cid, error = %e, "releasing network failed");
    }
    let _ = std::fs::remove_dir_all(&run_dir);
}

pub(crate) fn teardown_in_background(
    rt: &Arc<Runtime>,
    cid: &str,
    slot: Option<u32>,
) -> std::thread::JoinHandle<()> {
    let (rt, cid) = (rt.clone(), cid.to_string());
    let background = rt.teardowns.clone();
    background.spawn(move || teardown_blocking(&rt, &cid, slot))
}

/// Tears a container down without waiting.
pub(crate) fn teardown_container(rt: &Arc<Runtime>, cid: &str, slot: Option<u32>) {
    teardown_in_background(rt, cid, slot);
}

impl Runtime {
    /// Kills a sandbox (running or paused): it disappears at once, its
    /// resources are freed in the background.
    pub async fn kill(self: &Arc<Self>, id: &str) -> Result<(), Error> {
        self.kill_inner(id).await.map(|_| ())
    }

    /// Like [`Runtime::kill`], but returns only once everything is freed.
    pub async fn kill_and_wait(self: &Arc<Self>, id: &str) -> Result<(), Error> {
        let handle = self.kill_inner(id).await?;
        tokio::task::spawn_blocking(move || handle.join())
            .await
            .map_err(|e| Error::io("teardown task", std::io::Error::other(e)))?
            .map_err(|_| Error::io("teardown", std::io::Error::other("teardown panicked")))
    }

    async fn kill_inner(self: &Arc<Self>, id: &str) -> Result<std::thread::JoinHandle<()>, Error> {
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        let (slot, cid) = {
            let mut record = entry.record.lock().unwrap_or_else(|e| e.into_inner());
            if record.state == SandboxState::Killed {
                return Err(Error::SandboxNotFound(id.to_string()));
            }
            record.state = SandboxState::Killed;
            (
                record.slot.take().map(|s| s.index),
                record.cid().to_string(),
            )
        };
        self.sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        // The record goes first: a crash now must not resurrect the sandbox.
        let _ = std::fs::remove_dir_all(self.sandbox_data_dir(id));
        tracing::info!(sandbox = %id, "sandbox killed");
        Ok(teardown_in_background(self, &cid, slot))
    }
}
