//! Kiln template builds.
//!
//! A template is built from a base (Kiln's base rootfs, another template or
//! an unpacked image), a list of steps (RUN, COPY, ENV, WORKDIR, USER — E2B's
//! build-step model; [`parse_dockerfile`] maps a Dockerfile onto it) and
//! start and ready commands. Each step that changes files runs in a gVisor
//! build sandbox whose root is a host overlayfs mount; the overlay's upper dir
//! is the step's layer, cached by a key over everything the step depends on
//! ([`cache`]). The layers are then flattened into the template's rootfs,
//! which the runtime boots, starts and snapshots ([`Builder::build`]).

pub mod builder;
pub mod cache;
pub mod context;
pub mod dockerfile;
mod overlay;
pub mod vars;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

pub use builder::Builder;
pub use dockerfile::{DockerfileError, ParsedDockerfile, parse_dockerfile};

/// What a template is built on.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildFrom {
    /// Kiln's base rootfs.
    Base,
    /// An existing runtime template: its rootfs and recorded env, workdir, user.
    Template(String),
    /// An unpacked image; `key` (its digest) identifies it in the cache.
    Rootfs {
        path: PathBuf,
        key: String,
        config: ImageDefaults,
    },
}

/// The settings an image carries (its config's Env, WorkingDir, User).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageDefaults {
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// One build step.
#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    /// A shell command (`bash -c`, or `sh -c` without bash), as `user` or the current USER.
    Run { cmd: String, user: Option<String> },
    /// Files from the build context: `src` is a path or glob relative to
    /// `context`; `dest` is a directory when it ends with '/' or `src`
    /// matches several files.
    Copy {
        context: PathBuf,
        src: String,
        dest: String,
        user: Option<String>,
        mode: Option<u32>,
    },
    /// Like `Copy`, but a local tar archive (plain, gzip, bzip2, xz) is
    /// extracted into `dest` (Dockerfile ADD).
    Add {
        context: PathBuf,
        src: String,
        dest: String,
        user: Option<String>,
        mode: Option<u32>,
    },
    /// Variables for later steps and the template; values may use `$A`/`${A}`.
    Env(Vec<(String, String)>),
    /// The working directory of later steps (created if missing).
    Workdir(String),
    /// The user of later steps (created if missing; `sudo` makes it a passwordless sudoer).
    User { name: String, sudo: bool },
}

/// A step and whether it skips the cache (and so does every later step).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub kind: StepKind,
    pub force: bool,
}

impl Step {
    pub fn new(kind: StepKind) -> Self {
        Self { kind, force: false }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    /// The runtime template to create (replaced when it exists).
    pub target_id: String,
    pub from: BuildFrom,
    pub steps: Vec<Step>,
    pub start_cmd: Option<String>,
    pub ready_cmd: Option<String>,
    pub resources: kiln_runtime::Resources,
    /// Skip the cache for every step.
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// One line of a build's log.
#[derive(Debug, Clone)]
pub struct BuildLog {
    pub timestamp: SystemTime,
    pub level: LogLevel,
    /// `base`, `step 3`, `finalize`, ... (E2B names its phases the same way).
    pub step: Option<String>,
    pub message: String,
}

/// What a finished build did.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    pub steps_run: usize,
    pub steps_cached: usize,
    pub took: Duration,
    /// Size of the template's root filesystem.
    pub rootfs_bytes: u64,
    /// Size of its snapshot (memory and state).
    pub snapshot_bytes: u64,
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("step {index} ({step}) failed with exit code {exit_code}; last output:\n{output_tail}")]
    StepFailed {
        /// 1-based, as in the build log.
        index: usize,
        step: String,
        exit_code: i32,
        output_tail: String,
    },
    #[error("step {index} ({step}): {reason}")]
    StepInvalid {
        index: usize,
        step: String,
        reason: String,
    },
    #[error("the ready command '{cmd}' did not succeed within {timeout:?}: {last}")]
    NotReady {
        cmd: String,
        timeout: Duration,
        last: String,
    },
    #[error("template '{0}' not found")]
    UnknownTemplate(String),
    #[error("invalid build: {0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("runtime: {0}")]
    Runtime(#[from] kiln_runtime::Error),
}

impl BuildError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BuildError::Io {
            context: context.into(),
            source,
        }
    }
}
