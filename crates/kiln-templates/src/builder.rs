//! [`Builder::build`]: steps → cached layers → flattened rootfs → runtime
//! template → snapshot.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use kiln_runtime::Runtime;
use kiln_runtime::network::EgressPolicy;
use kiln_runtime::sandbox::build::{BindMount, BuildCommand, BuildSandboxConfig, OutputStream};
use kiln_runtime::template::{TemplateMeta, valid_template_id};

use crate::cache::{LayerStore, hash_fields, step_key, step_text};
use crate::context::{self, Sources};
use crate::overlay;
use crate::vars::{expand, shell_quote, valid_env_name};
use crate::{BuildError, BuildFrom, BuildLog, BuildOutcome, BuildSpec, LogLevel, StepKind};

/// Where COPY sources appear inside a build sandbox.
const STAGE_MOUNT: &str = "/.kiln-stage";
/// How many lines of a failed step's output its error carries.
const TAIL_LINES: usize = 20;
/// Bumped when the provisioning script changes.
const PROVISION_VERSION: &str = "kiln-provision-v1";

/// Builds templates on one node.
pub struct Builder {
    runtime: Arc<Runtime>,
    cache_dir: PathBuf,
    envd: PathBuf,
    base_rootfs: PathBuf,
    step_timeout: Duration,
    ready_timeout: Duration,
}

/// The settings steps accumulate.
#[derive(Debug, Clone)]
struct State {
    env: BTreeMap<String, String>,
    workdir: String,
    user: String,
    /// Whether the steps (or the base) chose a user / workdir; if not, the
    /// template gets E2B's defaults, `user` and `/home/user`.
    user_set: bool,
    workdir_set: bool,
}

type LogFn<'a> = &'a (dyn Fn(BuildLog) + Send + Sync);
/// Build sandboxes being deleted in the background; a build returns only
/// once they are gone.
type Pending = Mutex<Vec<tokio::task::JoinHandle<()>>>;

fn emit(log: LogFn<'_>, level: LogLevel, step: Option<&str>, message: impl Into<String>) {
    let message = message.into();
    match level {
        LogLevel::Error => tracing::warn!(step, "{message}"),
        _ => tracing::debug!(step, "{message}"),
    }
    log(BuildLog {
        timestamp: SystemTime::now(),
        level,
        step: step.map(str::to_string),
        message,
    });
}

/// A host overlay mount and its directories; unmounted and removed on drop.
struct Workspace {
    dir: PathBuf,
    merged: PathBuf,
    upper: PathBuf,
    stage: PathBuf,
}

impl Workspace {
    fn new(cache_dir: &Path) -> std::io::Result<Self> {
        use rand::Rng;
        let name = format!(
            "{}-{:016x}",
            std::process::id(),
            rand::thread_rng().r#gen::<u64>()
        );
        let dir = cache_dir.join("tmp").join(name);
        for sub in ["upper", "work", "merged", "stage"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        Ok(Self {
            merged: dir.join("merged"),
            upper: dir.join("upper"),
            stage: dir.join("stage"),
            dir,
        })
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if let Err(e) = overlay::unmount(&self.merged) {
            tracing::warn!(path = %self.merged.display(), error = %e, "unmounting build overlay failed");
        }
        if !overlay::is_mounted(&self.merged) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes leftovers of builds by processes that are gone.
fn clean_stale(cache_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir.join("tmp")) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if alive {
            continue;
        }
        let _ = overlay::unmount(&entry.path().join("merged"));
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

fn dir_size(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// The working directory `dir` names when the current one is `cwd`.
fn resolve_dir(cwd: &str, dir: &str) -> String {
    if dir.starts_with('/') {
        dir.to_string()
    } else {
        format!("{}/{dir}", cwd.trim_end_matches('/'))
    }
}

impl Builder {
    pub fn new(
        runtime: Arc<Runtime>,
        cache_dir: PathBuf,
        envd: PathBuf,
        base_rootfs: PathBuf,
    ) -> Self {
        clean_stale(&cache_dir);
        Self {
            runtime,
            cache_dir,
            envd,
            base_rootfs,
            step_timeout: Duration::from_secs(3600),
            ready_timeout: Duration::from_secs(120),
        }
    }

    /// Most time one RUN step may take (default 1 h).
    pub fn with_step_timeout(mut self, timeout: Duration) -> Self {
        self.step_timeout = timeout;
        self
    }

    /// How long the ready command may take to succeed (default 120 s).
    pub fn with_ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Builds runtime template `spec.target_id`; calls `log` for every log line while it runs.
    pub async fn build(
        &self,
        spec: BuildSpec,
        log: &(dyn Fn(BuildLog) + Send + Sync),
    ) -> Result<BuildOutcome, BuildError> {
        let started = Instant::now();
        let pending = Pending::default();
        let result = self.build_inner(&spec, log, started, &pending).await;
        let handles = std::mem::take(&mut *pending.lock().unwrap_or_else(|e| e.into_inner()));
        for handle in handles {
            let _ = handle.await;
        }
        match &result {
            Ok(o) => emit(
                log,
                LogLevel::Info,
                Some("finalize"),
                format!(
                    "template {} built in {:.1} s ({} steps run, {} cached)",
                    spec.target_id,
                    o.took.as_secs_f64(),
                    o.steps_run,
                    o.steps_cached
                ),
            ),
            Err(e) => emit(log, LogLevel::Error, None, format!("build failed: {e}")),
        }
        result
    }

    async fn build_inner(
        &self,
        spec: &BuildSpec,
        log: LogFn<'_>,
        started: Instant,
        pending: &Pending,
    ) -> Result<BuildOutcome, BuildError> {
        if !valid_template_id(&spec.target_id) {
            return Err(BuildError::Invalid(format!(
                "template id '{}': ids are 1-64 lowercase letters, digits, '-' and '_'",
                spec.target_id
            )));
        }
        if spec.resources.vcpus == 0 || spec.resources.memory_mb < 64 {
            return Err(BuildError::Invalid(
                "resources: at least 1 vCPU and 64 MB of memory".into(),
            ));
        }
        for dir in ["tmp", "layers", "flat"] {
            std::fs::create_dir_all(self.cache_dir.join(dir))
                .map_err(|e| BuildError::io(format!("creating {}", self.cache_dir.display()), e))?;
        }
        let store = LayerStore::new(&self.cache_dir);
        let (base, base_key, mut state) = self.resolve_base(&spec.from)?;
        emit(
            log,
            LogLevel::Info,
            Some("base"),
            format!("base: {}", describe_from(&spec.from)),
        );
        let envd_layer = self.envd_layer()?;

        let n = spec.steps.len();
        let mut parent = base_key;
        let mut layers: Vec<PathBuf> = Vec::new(); // relative to the cache dir, bottom first
        let mut forced = spec.force;
        let (mut run, mut cached) = (0, 0);
        for (i, step) in spec.steps.iter().enumerate() {
            let index = i + 1;
            let label = format!("step {index}");
            let text = step_text(&step.kind);
            emit(
                log,
                LogLevel::Info,
                Some(&label),
                format!("[{index}/{n}] {text}"),
            );
            forced |= step.force;
            let invalid = |reason: String| BuildError::StepInvalid {
                index,
                step: text.clone(),
                reason,
            };
            // COPY/ADD: the files' content is part of the key.
            let sources = match &step.kind {
                StepKind::Copy { context, src, .. } | StepKind::Add { context, src, .. } => {
                    let (context, src) = (context.clone(), src.clone());
                    let sources = tokio::task::spawn_blocking(move || {
                        let s = context::collect(&context, &src)?;
                        let h = s.hash()?;
                        Ok::<_, String>((s, h))
                    })
                    .await
                    .map_err(|e| invalid(e.to_string()))?
                    .map_err(invalid)?;
                    Some(sources)
                }
                _ => None,
            };
            let key = step_key(
                &parent,
                &step.kind,
                sources.as_ref().map(|(_, h)| h.as_str()),
            );
            let mut next = state.clone();
            self.advance(&mut next, &step.kind).map_err(invalid)?;
            let layer = match (forced, store.get(&key)) {
                (false, Some(layer)) => {
                    emit(log, LogLevel::Info, Some(&label), "CACHED");
                    cached += 1;
                    layer
                }
                _ => {
                    let step_started = Instant::now();
                    let layer = self
                        .execute(
                            &store,
                            &key,
                            &step.kind,
                            sources.map(|(s, _)| s),
                            &state,
                            &base,
                            &envd_layer,
                            &layers,
                            spec,
                            log,
                            &label,
                            pending,
                        )
                        .await
                        .map_err(|e| match e {
                            StepError::Failed { exit_code, tail } => BuildError::StepFailed {
                                index,
                                step: text.clone(),
                                exit_code,
                                output_tail: tail,
                            },
                            StepError::Other(e) => e,
                        })?;
                    emit(
                        log,
                        LogLevel::Debug,
                        Some(&label),
                        format!("done in {:.1} s", step_started.elapsed().as_secs_f64()),
                    );
                    run += 1;
                    layer
                }
            };
            if let Some(diff) = layer.diff {
                layers.push(diff);
            }
            state = next;
            parent = key;
        }

        // Finalize: what every Kiln template needs, then the template itself.
        let user = if state.user_set {
            state.user.clone()
        } else {
            "user".to_string()
        };
        let workdir = if state.workdir_set {
            Some(state.workdir.clone())
        } else if user == "user" {
            Some("/home/user".to_string())
        } else {
            None
        };
        let dns = self.runtime.dns_address().to_string();
        let provision = StepKind::Run {
            cmd: provision_script(&user, workdir.as_deref(), &dns),
            user: Some("root".into()),
        };
        let key = hash_fields(&[
            PROVISION_VERSION.as_bytes(),
            step_key(&parent, &provision, None).as_bytes(),
        ]);
        emit(
            log,
            LogLevel::Info,
            Some("finalize"),
            "provisioning the template (user, DNS, hosts)",
        );
        let layer = match (forced, store.get(&key)) {
            (false, Some(layer)) => layer,
            _ => self
                .execute(
                    &store,
                    &key,
                    &provision,
                    None,
                    &state,
                    &base,
                    &envd_layer,
                    &layers,
                    spec,
                    log,
                    "finalize",
                    pending,
                )
                .await
                .map_err(|e| match e {
                    StepError::Failed { exit_code, tail } => BuildError::StepFailed {
                        index: n + 1,
                        step: "finalize (provisioning)".into(),
                        exit_code,
                        output_tail: tail,
                    },
                    StepError::Other(e) => e,
                })?,
        };
        if let Some(diff) = layer.diff {
            layers.push(diff);
        }

        let meta = TemplateMeta {
            resources: spec.resources,
            start_cmd: spec.start_cmd.clone().filter(|c| !c.trim().is_empty()),
            ready_cmd: spec.ready_cmd.clone().filter(|c| !c.trim().is_empty()),
            user,
            workdir,
            env: state.env.clone(),
            ready_timeout_secs: Some(self.ready_timeout.as_secs().max(1)),
            ..TemplateMeta::new(spec.target_id.clone())
        };
        let snapshot_took = self.install(&meta, &base, &layers, log).await?;
        let template_dir = self.runtime.template_dir(&spec.target_id);
        let (rootfs_bytes, snapshot_bytes) = tokio::task::spawn_blocking(move || {
            (
                dir_size(&template_dir.join("rootfs")),
                dir_size(&template_dir.join("snapshot")),
            )
        })
        .await
        .unwrap_or_default();
        emit(
            log,
            LogLevel::Info,
            Some("finalize"),
            format!(
                "snapshot taken in {:.1} s (rootfs {} MB, snapshot {} MB)",
                snapshot_took.as_secs_f64(),
                rootfs_bytes / 1_000_000,
                snapshot_bytes / 1_000_000
            ),
        );
        Ok(BuildOutcome {
            steps_run: run,
            steps_cached: cached,
            took: started.elapsed(),
            rootfs_bytes,
            snapshot_bytes,
        })
    }

    /// The base's rootfs, cache key and starting settings.
    fn resolve_base(&self, from: &BuildFrom) -> Result<(PathBuf, String, State), BuildError> {
        let root_state = State {
            env: BTreeMap::new(),
            workdir: "/".into(),
            user: "root".into(),
            user_set: false,
            workdir_set: false,
        };
        match from {
            BuildFrom::Base => {
                let path = self.base_rootfs.clone();
                if !path.join("etc").is_dir() {
                    return Err(BuildError::Invalid(format!(
                        "the base rootfs {} is missing (scripts/build-base-rootfs.sh builds it)",
                        path.display()
                    )));
                }
                let recipe = std::fs::read(path.join(".kiln-base-recipe")).unwrap_or_default();
                let key = hash_fields(&[b"base", path.to_string_lossy().as_bytes(), &recipe]);
                Ok((path, key, root_state))
            }
            BuildFrom::Template(id) => {
                let meta = self.runtime.template(id).map_err(|e| match e {
                    kiln_runtime::Error::TemplateNotFound(id) => BuildError::UnknownTemplate(id),
                    other => BuildError::Runtime(other),
                })?;
                let dir = self.runtime.template_dir(id);
                let json = std::fs::read(dir.join("template.json"))
                    .map_err(|e| BuildError::io("reading template.json", e))?;
                // A template rebuilt under the same id gets a new template.json inode.
                let stamp = std::fs::metadata(dir.join("template.json"))
                    .map(|m| {
                        use std::os::unix::fs::MetadataExt;
                        format!("{}-{}-{}", m.ino(), m.mtime(), m.mtime_nsec())
                    })
                    .unwrap_or_default();
                let key = hash_fields(&[b"template", id.as_bytes(), &json, stamp.as_bytes()]);
                let state = State {
                    env: meta.env.clone(),
                    workdir: meta.workdir.clone().unwrap_or_else(|| "/".into()),
                    user: meta.user.clone(),
                    user_set: true,
                    workdir_set: meta.workdir.is_some(),
                };
                Ok((dir.join("rootfs"), key, state))
            }
            BuildFrom::Rootfs { path, key, config } => {
                if !path.is_dir() {
                    return Err(BuildError::Invalid(format!(
                        "image rootfs {} does not exist",
                        path.display()
                    )));
                }
                let config_text = format!("{config:?}");
                let key = hash_fields(&[b"rootfs", key.as_bytes(), config_text.as_bytes()]);
                let mut state = root_state;
                state.env = config.env.iter().cloned().collect();
                if let Some(u) = config.user.as_ref().filter(|u| !u.is_empty()) {
                    state.user = u.split(':').next().unwrap_or(u).to_string();
                    state.user_set = true;
                }
                if let Some(w) = config.workdir.as_ref().filter(|w| !w.is_empty()) {
                    state.workdir = w.clone();
                    state.workdir_set = true;
                }
                Ok((path.clone(), key, state))
            }
        }
    }

    /// The settings after `step`.
    fn advance(&self, state: &mut State, step: &StepKind) -> Result<(), String> {
        match step {
            StepKind::Env(pairs) => {
                for (k, v) in pairs {
                    if !valid_env_name(k) {
                        return Err(format!("'{k}' is not a valid variable name"));
                    }
                    let value = expand(v, &|name: &str| state.env.get(name).cloned());
                    state.env.insert(k.clone(), value);
                }
            }
            StepKind::Workdir(dir) => {
                if dir.trim().is_empty() {
                    return Err("WORKDIR needs a path".into());
                }
                state.workdir = resolve_dir(&state.workdir, dir);
                state.workdir_set = true;
            }
            StepKind::User { name, .. } => {
                if name.is_empty() || name.contains([':', '/', ' ']) {
                    return Err(format!("'{name}' is not a valid user name"));
                }
                state.user = name.clone();
                state.user_set = true;
            }
            StepKind::Run { cmd, .. } if cmd.trim().is_empty() => {
                return Err("RUN needs a command".into());
            }
            StepKind::Copy { dest, .. } | StepKind::Add { dest, .. } if dest.is_empty() => {
                return Err("COPY needs a destination".into());
            }
            _ => {}
        }
        Ok(())
    }

    /// A directory with what build sandboxes need above the image: envd and
    /// the node's DNS, hosts and hostname (not part of any cached layer).
    fn envd_layer(&self) -> Result<PathBuf, BuildError> {
        let dns = self.runtime.dns_address().to_string();
        let envd = std::fs::read(&self.envd)
            .map_err(|e| BuildError::io(format!("reading envd {}", self.envd.display()), e))?;
        let key = hash_fields(&[b"envd-layer", &envd, dns.as_bytes(), b"sudo-link"]);
        let rel = PathBuf::from("envd").join(&key[..24]);
        let dir = self.cache_dir.join(&rel);
        if dir.join("done").exists() {
            return Ok(rel.join("root"));
        }
        let io = |e| BuildError::io("preparing the envd layer", e);
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("usr/bin")).map_err(io)?;
        std::fs::create_dir_all(root.join("etc")).map_err(io)?;
        std::fs::write(root.join("usr/bin/envd"), &envd).map_err(io)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            root.join("usr/bin/envd"),
            std::fs::Permissions::from_mode(0o755),
        )
        .map_err(io)?;
        // RUN steps get Kiln's sudo too (gVisor ignores set-user-ID bits);
        // templates get it from `create_template` when the image has sudo.
        std::os::unix::fs::symlink("envd", root.join("usr/bin/sudo")).map_err(io)?;
        std::fs::write(root.join("etc/resolv.conf"), format!("nameserver {dns}\n")).map_err(io)?;
        std::fs::write(root.join("etc/hostname"), "kiln\n").map_err(io)?;
        std::fs::write(root.join("etc/hosts"), HOSTS).map_err(io)?;
        std::fs::write(dir.join("done"), &key).map_err(io)?;
        Ok(rel.join("root"))
    }

    /// Runs one step in a build sandbox and stores its layer.
    #[allow(clippy::too_many_arguments)]
    async fn execute(
        &self,
        store: &LayerStore,
        key: &str,
        step: &StepKind,
        sources: Option<Sources>,
        state: &State,
        base: &Path,
        envd_layer: &Path,
        layers: &[PathBuf],
        spec: &BuildSpec,
        log: LogFn<'_>,
        label: &str,
        pending: &Pending,
    ) -> Result<crate::cache::Layer, StepError> {
        let (command, user, cwd) = match step {
            StepKind::Env(_) => {
                // Nothing changes on disk.
                return store
                    .put(key, None)
                    .map_err(|e| StepError::Other(BuildError::io("storing a layer", e)));
            }
            StepKind::Run { cmd, user } => (
                cmd.clone(),
                user.clone().unwrap_or_else(|| state.user.clone()),
                state.workdir.clone(),
            ),
            StepKind::Copy {
                dest, user, mode, ..
            }
            | StepKind::Add {
                dest, user, mode, ..
            } => {
                let sources = sources.as_ref().expect("COPY steps have sources");
                let owner = user.clone().unwrap_or_else(|| state.user.clone());
                let extract = matches!(step, StepKind::Add { .. });
                let dest = resolve_dir(&state.workdir, dest)
                    + if dest.ends_with('/') && dest.len() > 1 {
                        "/"
                    } else {
                        ""
                    };
                (
                    copy_script(sources, &dest, &owner, *mode, extract),
                    "root".to_string(),
                    "/".to_string(),
                )
            }
            StepKind::Workdir(dir) => {
                let dir = resolve_dir(&state.workdir, dir);
                let script = format!(
                    "set -e\nd={}\nif [ ! -d \"$d\" ]; then mkdir -p \"$d\"; chown {} \"$d\"; fi",
                    shell_quote(&dir),
                    shell_quote(&state.user)
                );
                (script, "root".to_string(), "/".to_string())
            }
            StepKind::User { name, sudo } => (
                user_script(name, *sudo),
                "root".to_string(),
                "/".to_string(),
            ),
        };
        let ws = Workspace::new(&self.cache_dir)
            .map_err(|e| StepError::Other(BuildError::io("creating a build workspace", e)))?;
        if let Some(sources) = &sources {
            let (s, stage) = (sources.entries.clone(), ws.stage.clone());
            let staged = tokio::task::spawn_blocking(move || {
                Sources {
                    matched: Vec::new(),
                    entries: s,
                }
                .stage(&stage)
            })
            .await
            .map_err(|e| {
                StepError::Other(BuildError::io("staging files", std::io::Error::other(e)))
            })?;
            staged.map_err(|e| StepError::Other(BuildError::io("staging files", e)))?;
        }
        // Lowers, top first: envd layer, the steps so far, the base.
        let mut lowers = vec![envd_layer.to_path_buf()];
        lowers.extend(layers.iter().rev().cloned());
        lowers.push(base.to_path_buf());
        overlay::mount(
            &self.cache_dir,
            &lowers,
            &ws.upper,
            &ws.dir.join("work"),
            &ws.merged,
        )
        .map_err(|e| StepError::Other(BuildError::io("mounting the build overlay", e)))?;

        let sandbox = self
            .runtime
            .start_build_sandbox(BuildSandboxConfig {
                rootfs: ws.merged.clone(),
                resources: spec.resources,
                mounts: vec![BindMount {
                    source: ws.stage.clone(),
                    destination: STAGE_MOUNT.into(),
                    readonly: true,
                }],
                egress: EgressPolicy::default(),
            })
            .await
            .map_err(|e| StepError::Other(e.into()))?;
        let tail = Mutex::new(VecDeque::<String>::new());
        let mut partial: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        let line_out = |line: &[u8]| {
            let text = String::from_utf8_lossy(line)
                .trim_end_matches('\r')
                .to_string();
            emit(log, LogLevel::Info, Some(label), text.clone());
            let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(text);
        };
        let mut on_output = |stream: OutputStream, data: &[u8]| {
            let buf = &mut partial[stream as usize];
            buf.extend_from_slice(data);
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                line_out(&line[..line.len() - 1]);
            }
        };
        let cmd = BuildCommand {
            cmd: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                // bash when the image has it (as E2B), else sh (as Docker).
                "if [ -x /bin/bash ]; then exec /bin/bash -c \"$1\"; else exec /bin/sh -c \"$1\"; fi"
                    .into(),
                "kiln-build".into(),
                command,
            ],
            user,
            cwd: Some(cwd),
            env: state.env.clone(),
            timeout: Some(self.step_timeout),
        };
        let run_started = Instant::now();
        let result = sandbox.run(&cmd, &mut on_output).await;
        for buf in partial.clone() {
            if !buf.is_empty() {
                line_out(&buf);
            }
        }
        let code = match result {
            Ok(code) => code,
            Err(e) => {
                let _ = sandbox.stop().await;
                return Err(StepError::Other(e.into()));
            }
        };
        if code != 0 {
            sandbox
                .stop()
                .await
                .map_err(|e| StepError::Other(e.into()))?;
            let mut tail = tail.into_inner().unwrap_or_default();
            if code == -1 && run_started.elapsed() >= self.step_timeout {
                tail.push_back(format!(
                    "(killed: the step timed out after {:?})",
                    self.step_timeout
                ));
            }
            return Err(StepError::Failed {
                exit_code: code,
                tail: Vec::from(tail).join("\n"),
            });
        }
        let mut sandbox = sandbox;
        let running = match sandbox.halt().await {
            Ok(()) => Some(sandbox),
            Err(e) => {
                tracing::warn!(error = %e, "halting the build sandbox failed; stopping it");
                sandbox
                    .stop()
                    .await
                    .map_err(|e| StepError::Other(e.into()))?;
                overlay::unmount(&ws.merged).map_err(|e| {
                    StepError::Other(BuildError::io("unmounting the build overlay", e))
                })?;
                None
            }
        };
        // The staging mount point is no part of the layer.
        let _ = std::fs::remove_dir(ws.upper.join(STAGE_MOUNT.trim_start_matches('/')));
        // Nothing writes to the upper dir any more: it becomes the layer now,
        // and the container is deleted in the background (~1.5 s).
        let layer = store.put(key, Some(&ws.upper));
        if let Some(sandbox) = running {
            pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(tokio::spawn(async move {
                    if let Err(e) = sandbox.stop().await {
                        tracing::warn!(error = %e, "stopping a build sandbox failed");
                    }
                    let _ = tokio::task::spawn_blocking(move || drop(ws)).await;
                }));
        }
        layer.map_err(|e| StepError::Other(BuildError::io("storing a layer", e)))
    }

    /// Flattens the layers into a rootfs, creates the runtime template and
    /// snapshots it. A template of the same id is replaced only on success.
    async fn install(
        &self,
        meta: &TemplateMeta,
        base: &Path,
        layers: &[PathBuf],
        log: LogFn<'_>,
    ) -> Result<Duration, BuildError> {
        use rand::Rng;
        let flat = self.cache_dir.join("flat").join(format!(
            "{}-{:016x}",
            std::process::id(),
            rand::thread_rng().r#gen::<u64>()
        ));
        let abs_layers: Vec<PathBuf> = layers.iter().map(|l| self.cache_dir.join(l)).collect();
        emit(
            log,
            LogLevel::Info,
            Some("finalize"),
            format!("flattening {} layers", layers.len()),
        );
        let (base2, flat2) = (base.to_path_buf(), flat.clone());
        let flattened =
            tokio::task::spawn_blocking(move || overlay::flatten(&base2, &abs_layers, &flat2))
                .await
                .map_err(|e| BuildError::io("flatten task", std::io::Error::other(e)))?;
        let created = flattened
            .map_err(|e| BuildError::io("flattening the layers", e))
            .and_then(|()| {
                // Keep the previous template aside until the new one is snapshotted.
                let dir = self.runtime.template_dir(&meta.id);
                let backup = dir.with_extension(format!("previous{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&backup);
                if dir.exists() {
                    std::fs::rename(&dir, &backup)
                        .map_err(|e| BuildError::io("moving the previous template aside", e))?;
                }
                let r = self.runtime.create_template(meta, &flat, &self.envd);
                if r.is_err() && backup.exists() {
                    let _ = std::fs::rename(&backup, &dir);
                }
                r.map_err(BuildError::from).map(|()| backup)
            });
        let _ = std::fs::remove_dir_all(&flat);
        let backup = created?;
        emit(
            log,
            LogLevel::Info,
            Some("finalize"),
            "starting the template and taking its snapshot",
        );
        match self.runtime.snapshot_template(&meta.id).await {
            Ok(took) => {
                let _ = std::fs::remove_dir_all(&backup);
                Ok(took)
            }
            Err(e) => {
                let _ = self.runtime.delete_template(&meta.id);
                if backup.exists() {
                    let _ = std::fs::rename(&backup, self.runtime.template_dir(&meta.id));
                }
                Err(match e {
                    kiln_runtime::Error::NotReady { timeout, last, .. } => BuildError::NotReady {
                        cmd: meta.ready_cmd.clone().unwrap_or_default(),
                        timeout,
                        last,
                    },
                    other => other.into(),
                })
            }
        }
    }
}

enum StepError {
    Failed { exit_code: i32, tail: String },
    Other(BuildError),
}

const HOSTS: &str = "127.0.0.1\tlocalhost kiln\n::1\tlocalhost ip6-localhost ip6-loopback\n";

fn describe_from(from: &BuildFrom) -> String {
    match from {
        BuildFrom::Base => "Kiln base image".into(),
        BuildFrom::Template(id) => format!("template {id}"),
        BuildFrom::Rootfs { key, .. } => format!("image {key}"),
    }
}

/// Shell for a COPY/ADD: staged files (at [`STAGE_MOUNT`]) into `dest`,
/// owned by `owner`, with `mode`.
fn copy_script(
    sources: &Sources,
    dest: &str,
    owner: &str,
    mode: Option<u32>,
    extract: bool,
) -> String {
    let q = |s: &str| shell_quote(s);
    let mut s = String::from("set -e\n");
    let single_file = sources.matched.len() == 1 && !sources.matched[0].is_dir;
    let mut targets: Vec<String> = Vec::new();
    let dest_dir = dest.trim_end_matches('/');
    let dest_dir = if dest_dir.is_empty() { "/" } else { dest_dir };
    let join = |name: &str| {
        if dest_dir == "/" {
            format!("/{name}")
        } else {
            format!("{dest_dir}/{name}")
        }
    };
    if single_file && !dest.ends_with('/') {
        let m = &sources.matched[0];
        let staged = format!("{STAGE_MOUNT}/{}/{}", m.index, m.name);
        if extract && context::is_archive_staged(sources, m) {
            s += &format!(
                "mkdir -p {d}\ntar -xf {f} -C {d}\n",
                d = q(dest),
                f = q(&staged)
            );
            return s;
        }
        // An existing directory receives the file, as in Docker.
        s += &format!(
            "t={d}\nif [ -d \"$t\" ]; then t=\"$t\"/{n}; else mkdir -p \"$(dirname \"$t\")\"; fi\nrm -rf \"$t\"\ncp -a {f} \"$t\"\n",
            d = q(dest),
            n = q(&m.name),
            f = q(&staged)
        );
        s += &owner_var(owner);
        s += "chown -R \"$o\" \"$t\"\n";
        if let Some(mode) = mode {
            s += &format!("chmod {mode:o} \"$t\"\n");
        }
        return s;
    }
    s += &format!("mkdir -p {}\n", q(dest_dir));
    for m in &sources.matched {
        let staged = format!("{STAGE_MOUNT}/{}", m.index);
        if m.is_dir {
            s += &format!("cp -a {}/. {}/\n", q(&staged), q(dest_dir));
            targets.extend(m.top_names.iter().map(|n| join(n)));
        } else if extract && context::is_archive_staged(sources, m) {
            s += &format!("tar -xf {}/{} -C {}\n", q(&staged), q(&m.name), q(dest_dir));
        } else {
            let t = join(&m.name);
            s += &format!(
                "rm -rf {t}\ncp -a {}/{} {t}\n",
                q(&staged),
                q(&m.name),
                t = q(&t)
            );
            targets.push(t);
        }
    }
    if !targets.is_empty() {
        let list: Vec<String> = targets.iter().map(|t| q(t)).collect();
        s += &owner_var(owner);
        s += &format!("chown -R \"$o\" {}\n", list.join(" "));
        if let Some(mode) = mode {
            s += &format!("chmod -R {mode:o} {}\n", list.join(" "));
        }
    }
    s
}

/// Sets `$o` to the owner: `user` → `user:<its group>`; `user:group` as given.
fn owner_var(owner: &str) -> String {
    format!(
        "o={}
case \"$o\" in *:*) ;; *) o=\"$o:$(id -g \"$o\" 2>/dev/null || echo 0)\" ;; esac\n",
        shell_quote(owner)
    )
}

fn user_script(name: &str, sudo: bool) -> String {
    let q = shell_quote(name);
    let mut s = format!(
        "set -e\nif ! id -u {q} >/dev/null 2>&1; then\n  {}\nfi\n",
        create_user_cmd(&q, false)
    );
    if sudo {
        s += &format!(
            "mkdir -p /etc/sudoers.d\necho {} > /etc/sudoers.d/{q}\nchmod 440 /etc/sudoers.d/{q}\n",
            shell_quote(&format!("{name} ALL=(ALL:ALL) NOPASSWD: ALL"))
        );
    }
    s
}

/// Creates user `q` (shell-quoted) with a home; uid 1000 when asked and free.
fn create_user_cmd(q: &str, uid1000: bool) -> String {
    let uid = if uid1000 {
        "if ! cut -d: -f3 /etc/passwd | grep -qx 1000; then uid='-u 1000'; fi; "
    } else {
        ""
    };
    format!(
        "uid=''; {uid}shell=/bin/sh; [ -x /bin/bash ] && shell=/bin/bash; \
         if command -v useradd >/dev/null 2>&1; then useradd -m $uid -s \"$shell\" {q}; \
         elif command -v adduser >/dev/null 2>&1; then adduser -D $uid -s \"$shell\" {q}; \
         else echo 'cannot create user {q}: no useradd or adduser in the image' >&2; exit 1; fi"
    )
}

/// What every template needs: user `user` (uid 1000 when free, home
/// /home/user, passwordless sudo when sudo exists), resolv.conf, hosts,
/// hostname, and its default workdir.
fn provision_script(user: &str, workdir: Option<&str>, dns: &str) -> String {
    let mut s = format!(
        "set -e\nif ! id -u user >/dev/null 2>&1; then\n  {}\nfi\n",
        create_user_cmd("user", true)
    );
    s += "mkdir -p /home/user && chown user:$(id -g user) /home/user\n";
    s += "if command -v sudo >/dev/null 2>&1; then\n  mkdir -p /etc/sudoers.d\n  \
          echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/kiln-user\n  \
          chmod 440 /etc/sudoers.d/kiln-user\nfi\n";
    s += &format!(
        "rm -f /etc/resolv.conf /etc/hosts /etc/hostname\n\
         echo 'nameserver {dns}' > /etc/resolv.conf\n\
         echo kiln > /etc/hostname\n\
         printf '127.0.0.1\\tlocalhost kiln\\n::1\\tlocalhost ip6-localhost ip6-loopback\\n' > /etc/hosts\n"
    );
    if let Some(w) = workdir {
        s += &format!(
            "if [ ! -d {w} ]; then mkdir -p {w}; chown {u} {w}; fi\n",
            w = shell_quote(w),
            u = shell_quote(user)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirs_resolve_against_the_workdir() {
        assert_eq!(resolve_dir("/app", "src"), "/app/src");
        assert_eq!(resolve_dir("/", "src"), "/src");
        assert_eq!(resolve_dir("/app", "/etc"), "/etc");
    }

    #[test]
    fn scripts_quote_names() {
        let s = user_script("app", true);
        assert!(s.contains("useradd -m $uid -s \"$shell\" app"), "{s}");
        assert!(s.contains("/etc/sudoers.d/app"), "{s}");
        let p = provision_script("user", Some("/home/user"), "10.11.255.254");
        assert!(p.contains("nameserver 10.11.255.254"), "{p}");
        assert!(p.contains("uid='-u 1000'"), "{p}");
    }
}
