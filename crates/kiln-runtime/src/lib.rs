//! Kiln's node runtime: turns templates into running, isolated sandboxes.
//!
//! Where things happen, one place each:
//! - a sandbox is created (cold boot or restore of its template's snapshot) in
//!   [`sandbox::create`], paused and resumed in [`sandbox::pause`], destroyed in
//!   [`sandbox::destroy`];
//! - a template's snapshot is made in [`template::snapshot_template`];
//! - gVisor is driven through [`runsc`], networking through [`network`];
//! - warm pools of frozen, restored sandboxes live in [`sandbox::pool`], the
//!   freezer and usage figures in [`cgroup`];
//! - template builds run their steps in build sandboxes ([`sandbox::build`]).

pub mod cgroup;
pub mod envd;
pub mod network;
pub mod runsc;
pub mod runtime;
pub mod sandbox;
pub mod spec;
pub mod template;

pub use cgroup::SandboxStats;
pub use runtime::{CreateRequest, Runtime, RuntimeConfig, SandboxInfo, SandboxState};
pub use sandbox::pool::PoolStatus;
pub use spec::Resources;

/// Errors of the runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("runsc {what} failed: {detail}")]
    Runsc { what: String, detail: String },
    #[error("network: {0}")]
    Network(#[from] network::NetworkError),
    #[error("cgroup: {0}")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("envd: {0}")]
    Envd(String),
    #[error("template '{0}' not found")]
    TemplateNotFound(String),
    #[error("template '{id}' is not usable: {reason}")]
    TemplateInvalid { id: String, reason: String },
    #[error(
        "template '{id}': its ready command did not succeed within {timeout:?} (last attempt: {last})"
    )]
    NotReady {
        id: String,
        timeout: std::time::Duration,
        last: String,
    },
    #[error("sandbox '{0}' not found")]
    SandboxNotFound(String),
    #[error("sandbox '{id}' is {state}, cannot {action}")]
    InvalidState {
        id: String,
        state: String,
        action: &'static str,
    },
    #[error("sandbox id '{0}' already exists")]
    AlreadyExists(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Version of what a snapshot made by this runtime contains. 2: the writable
/// layer lives on a size-limited tmpfs (`sandbox/disk.rs`); 3: on a disk-backed
/// filesystem, with `/tmp` in it. Older snapshots still restore as they were
/// (format 1, in-memory layer, without the limit).
pub const SNAPSHOT_FORMAT: u32 = 3;
