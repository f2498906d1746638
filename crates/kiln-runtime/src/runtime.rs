//! The runtime of one node: its configuration, its sandboxes and their records.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::envd::ENVD_PORT;
use crate::network::{EgressPolicy, NetworkConfig, NetworkManager, Slot};
use crate::runsc::Runsc;
use crate::spec::Resources;

/// Where a node keeps its state and how it runs gVisor.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Templates, paused sandboxes' snapshots, records (`/var/lib/kiln`).
    pub data_dir: PathBuf,
    /// runsc state, bundles and logs of running sandboxes (`/run/kiln`).
    pub run_dir: PathBuf,
    pub runsc: PathBuf,
    pub platform: String,
    pub network: NetworkConfig,
}

impl RuntimeConfig {
    pub fn new(data_dir: impl Into<PathBuf>, run_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            run_dir: run_dir.into(),
            runsc: PathBuf::from("runsc"),
            platform: "systrap".into(),
            network: NetworkConfig::default(),
        }
    }
}

/// The life of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Creating,
    Running,
    Pausing,
    Paused,
    Resuming,
    /// The sandbox stopped on its own (e.g. killed for running out of memory).
    Exited,
    Killed,
}

impl std::fmt::Display for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).ok();
        f.write_str(s.as_ref().and_then(|v| v.as_str()).unwrap_or("unknown"))
    }
}

/// What a new sandbox should be.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub template_id: String,
    /// Chosen by the runtime when `None`.
    pub sandbox_id: Option<String>,
    pub env_vars: HashMap<String, String>,
    /// When set, envd requires it on every request.
    pub access_token: Option<String>,
    pub egress: EgressPolicy,
    /// Boot the template's rootfs instead of restoring its snapshot.
    pub cold: bool,
}

/// The persistent record of a sandbox (`data_dir/sandboxes/<id>/record.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    /// The runsc container (and cgroup) behind the sandbox: a sandbox taken
    /// from a warm pool keeps the container id it was restored under. Empty
    /// in records written before pools existed, meaning the sandbox id.
    #[serde(default)]
    pub container_id: String,
    pub template_id: String,
    pub state: SandboxState,
    pub resources: Resources,
    pub env_vars: HashMap<String, String>,
    pub access_token: Option<String>,
    pub egress: EgressPolicy,
    pub slot: Option<Slot>,
    pub started_at: SystemTime,
    /// Host pid of the running sandbox (`runsc-sandbox`), to notice its death cheaply.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Why an exited sandbox stopped.
    #[serde(default)]
    pub exit_reason: Option<String>,
}

impl SandboxRecord {
    /// The container id every runsc and cgroup call must use.
    pub fn cid(&self) -> &str {
        if self.container_id.is_empty() {
            &self.id
        } else {
            &self.container_id
        }
    }
}

/// What callers see of a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxInfo {
    pub id: String,
    pub template_id: String,
    pub state: SandboxState,
    pub resources: Resources,
    /// envd's address while running.
    pub envd_addr: Option<SocketAddr>,
    pub ip: Option<Ipv4Addr>,
    pub started_at: SystemTime,
    /// Why the sandbox stopped, when its state is `Exited` (e.g. "out of memory").
    pub exit_reason: Option<String>,
}

pub(crate) struct Entry {
    pub(crate) record: Mutex<SandboxRecord>,
    /// Serialises lifecycle operations on one sandbox.
    pub(crate) op: tokio::sync::Mutex<()>,
}

/// One node's sandboxes.
pub struct Runtime {
    pub(crate) cfg: RuntimeConfig,
    pub(crate) runsc: Runsc,
    pub(crate) net: Arc<NetworkManager>,
    pub(crate) sandboxes: Mutex<HashMap<String, Arc<Entry>>>,
    /// Warm pools per template ([`crate::sandbox::pool`]).
    pub(crate) pools: crate::sandbox::pool::Pools,
    /// Teardowns still running in the background.
    pub(crate) teardowns: Arc<Background>,
    /// One re-snapshot of a template from another platform at a time.
    pub(crate) resnapshot: tokio::sync::Mutex<()>,
}

/// Counts background work so that it can be waited for.
#[derive(Default)]
pub(crate) struct Background {
    running: Mutex<usize>,
    idle: std::sync::Condvar,
}

impl Background {
    /// Runs `work` on a new thread, counted until it returns (or panics).
    pub(crate) fn spawn(
        self: &Arc<Self>,
        work: impl FnOnce() + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        struct Done(Arc<Background>);
        impl Drop for Done {
            fn drop(&mut self) {
                let mut running = self.0.running.lock().unwrap_or_else(|e| e.into_inner());
                *running -= 1;
                self.0.idle.notify_all();
            }
        }
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        let done = Done(self.clone());
        std::thread::spawn(move || {
            let _done = done;
            work();
        })
    }

    /// Blocks until no counted work is running.
    pub(crate) fn wait(&self) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        while *running > 0 {
            running = self.idle.wait(running).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Runtime {
    /// Starts the runtime: creates its directories, sets up networking and
    /// recovers what an earlier run left (see [`crate::sandbox::recover`]).
    pub fn start(cfg: RuntimeConfig) -> Result<Arc<Runtime>, Error> {
        for dir in [
            cfg.data_dir.join("templates"),
            cfg.data_dir.join("sandboxes"),
            cfg.run_dir.join("runsc"),
            cfg.run_dir.join("sandboxes"),
        ] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let runsc = Runsc {
            bin: cfg.runsc.clone(),
            root: cfg.run_dir.join("runsc"),
            platform: cfg.platform.clone(),
        };
        let records = crate::sandbox::recover::load_records(&cfg.data_dir);
        let net = crate::sandbox::recover::adopt_network(&cfg, &runsc, &records)?;
        let runtime = Arc::new(Runtime {
            cfg,
            runsc,
            net,
            sandboxes: Mutex::new(HashMap::new()),
            pools: Default::default(),
            teardowns: Default::default(),
            resnapshot: Default::default(),
        });
        crate::sandbox::recover::recover(&runtime, records);
        Ok(runtime)
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    /// The node's network slots (e.g. to see which are kept ready ahead).
    pub fn network(&self) -> &Arc<NetworkManager> {
        &self.net
    }

    pub(crate) fn sandbox_data_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("sandboxes").join(id)
    }

    /// Writable-layer images (see `sandbox::disk`): on disk, not in `run_dir`.
    pub(crate) fn layers_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("layers")
    }

    pub(crate) fn sandbox_run_dir(&self, id: &str) -> PathBuf {
        self.cfg.run_dir.join("sandboxes").join(id)
    }

    pub(crate) fn entry(&self, id: &str) -> Result<Arc<Entry>, Error> {
        self.sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Error::SandboxNotFound(id.to_string()))
    }

    /// Every sandbox this node knows.
    pub fn list(self: &Arc<Self>) -> Vec<SandboxInfo> {
        let entries: Vec<Arc<Entry>> = self
            .sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        entries
            .iter()
            .map(|e| info_of(&e.record.lock().unwrap_or_else(|e| e.into_inner())))
            .collect()
    }

    pub fn info(self: &Arc<Self>, id: &str) -> Result<SandboxInfo, Error> {
        let entry = self.entry(id)?;
        Ok(self.refresh(&entry))
    }

    /// The sandbox's info, after noticing whether a running sandbox died on
    /// its own (its `runsc-sandbox` process is gone): it then becomes
    /// `Exited`, with "out of memory" as the reason when its memory cgroup
    /// recorded an OOM kill, and its container and network are freed.
    pub(crate) fn refresh(self: &Arc<Self>, entry: &Entry) -> SandboxInfo {
        let mut record = entry.record.lock().unwrap_or_else(|e| e.into_inner());
        let dead = record.state == SandboxState::Running
            && record.pid.is_some_and(|pid| !process_alive(pid));
        if dead {
            let oom = crate::cgroup::usage(record.cid()).is_ok_and(|u| u.oom_kills > 0);
            record.exit_reason = Some(
                if oom {
                    "out of memory"
                } else {
                    "sandbox exited"
                }
                .to_string(),
            );
            record.state = SandboxState::Exited;
            tracing::warn!(sandbox = %record.id, reason = ?record.exit_reason, "sandbox exited on its own");
            let slot = record.slot.take().map(|s| s.index);
            let _ = save_record(&self.sandbox_data_dir(&record.id), &record);
            crate::sandbox::destroy::teardown_in_background(self, record.cid(), slot);
        }
        info_of(&record)
    }

    /// The log of the sandbox's current container: envd's own log lines
    /// (it is the sandbox's init) and gVisor's messages.
    pub fn sandbox_log_path(&self, id: &str) -> Result<PathBuf, Error> {
        let entry = self.entry(id)?;
        let cid = entry
            .record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cid()
            .to_string();
        Ok(self.sandbox_run_dir(&cid).join("runsc.log"))
    }

    /// Blocks until every teardown running in the background has finished
    /// (before a clean shutdown, so nothing is left half-freed).
    pub fn wait_for_teardowns(&self) {
        self.teardowns.wait();
    }

    /// Removes every sandbox's network and the node's firewall table (tests, shutdown).
    pub fn shutdown_network(&self) -> Result<(), Error> {
        Ok(self.net.shutdown()?)
    }
}

pub(crate) fn info_of(r: &SandboxRecord) -> SandboxInfo {
    let running = r.state == SandboxState::Running;
    let ip = r.slot.as_ref().filter(|_| running).map(|s| s.sandbox_ip);
    SandboxInfo {
        id: r.id.clone(),
        template_id: r.template_id.clone(),
        state: r.state,
        resources: r.resources,
        envd_addr: ip.map(|ip| SocketAddr::new(ip.into(), ENVD_PORT)),
        ip,
        started_at: r.started_at,
        exit_reason: r.exit_reason.clone(),
    }
}

/// Whether host process `pid` is alive (not gone, not a zombie).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Writes a record atomically (temp file + rename).
pub(crate) fn save_record(dir: &Path, record: &SandboxRecord) -> Result<(), Error> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let tmp = dir.join("record.json.tmp");
    let text = serde_json::to_vec_pretty(record)
        .map_err(|e| Error::io("encoding record", std::io::Error::other(e)))?;
    std::fs::write(&tmp, text).map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, dir.join("record.json"))
        .map_err(|e| Error::io(format!("renaming {}", tmp.display()), e))
}

/// A new sandbox id: 20 lowercase letters and digits. Fixed length matters:
/// runsc matches container ids by prefix.
pub fn new_sandbox_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    let mut id = String::with_capacity(20);
    id.push(ALPHABET[rng.gen_range(0..26)] as char);
    for _ in 1..20 {
        id.push(ALPHABET[rng.gen_range(0..ALPHABET.len())] as char);
    }
    id
}

/// Whether `id` is an acceptable sandbox id.
pub fn valid_sandbox_id(id: &str) -> bool {
    id.len() == 20
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}
